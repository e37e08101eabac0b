//! Generates the gRPC code from `proto/tollgate/v1` with the protoc that ships inside the
//! `protoc-bin-vendored` crate, so a fresh machine needs no system protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // prost-build reads PROTOC; this build script is the only code in the process.
    std::env::set_var("PROTOC", protoc);

    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let files = ["common", "enforcement", "admin", "coordination"]
        .map(|name| root.join(format!("tollgate/v1/{name}.proto")));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tollgate_v1_descriptor.bin"))
        .compile_protos(&files, &[root, well_known])?;
    Ok(())
}
