//! Generates the gRPC code from `proto/tollgate/v1`, and the reflection descriptors of Envoy's
//! rate-limit service from `proto/third_party`, with the protoc that ships inside the
//! `protoc-bin-vendored` crate, so a fresh machine needs no system protoc.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // prost-build reads PROTOC; this build script is the only code in the process.
    std::env::set_var("PROTOC", &protoc);

    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let files = ["common", "enforcement", "admin", "coordination"]
        .map(|name| root.join(format!("tollgate/v1/{name}.proto")));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tollgate_v1_descriptor.bin"))
        .compile_protos(&files, &[root.clone(), well_known.clone()])?;
    envoy_rate_limit_descriptors(&protoc, &root.join("third_party"), &well_known, &out_dir)
}

/// Envoy's rate-limit service is served by every node that decides (its Rust code comes from
/// the `envoy-types` crate), so reflection must describe it too: compile its definition and
/// every file it imports into a descriptor set, without generating code.
fn envoy_rate_limit_descriptors(
    protoc: &Path,
    third_party: &Path,
    well_known: &Path,
    out_dir: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={}", third_party.display());
    let status = Command::new(protoc)
        .arg(format!("--proto_path={}", third_party.display()))
        .arg(format!("--proto_path={}", well_known.display()))
        .arg("--include_imports")
        .arg(format!(
            "--descriptor_set_out={}",
            out_dir.join("envoy_rate_limit_descriptor.bin").display()
        ))
        .arg("envoy/service/ratelimit/v3/rls.proto")
        .status()?;
    if !status.success() {
        return Err(format!("protoc failed on Envoy's rate-limit service: {status}").into());
    }
    Ok(())
}
