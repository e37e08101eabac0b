//! Writes the seeds of every target into `corpus/<target>/` (under the directory given as the
//! first argument, `fuzz/` by default): valid requests, so that fuzzing starts past the decoders'
//! first checks. Existing files are overwritten; the rest of a corpus is kept.

use std::path::PathBuf;

use tollgate_fuzz::edge::{runtime, Edge};
use tollgate_fuzz::seeds::{self, Seed};

fn main() -> std::io::Result<()> {
    let root = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let hold_id = runtime().block_on(Edge::start()).hold_id;
    let targets: [(&str, Vec<Seed>); 3] = [
        ("admin_requests", seeds::admin_requests()),
        ("amounts", seeds::amounts()),
        (
            "enforcement_requests",
            seeds::enforcement_requests(&hold_id),
        ),
    ];
    for (target, seeds) in targets {
        let dir = root.join("corpus").join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
        println!("{target}: {} seeds in {}", seeds.len(), dir.display());
    }
    Ok(())
}
