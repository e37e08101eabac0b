//! A deterministic simulation of Tollgate: several regions (the in-memory store, which has the
//! Redis scripts' semantics, behind a fault switch), several edges per region (the real
//! `Engine`, strict and cached), and the real authority on a SQLite ledger, all on one virtual
//! clock and a current-thread runtime. Every step — an operation, a fault, a clock advance,
//! the edges' flushes and lease maintenance, reconciliation, the lifecycle — is chosen and
//! driven by the simulator from one seed, so a seed replays a run exactly. After every step the
//! invariants are checked (see `docs/simulation.md`), and every spending decision is compared
//! with the reference model of the account (`oracle`, `shadow`).
//!
//! Owns nothing the product runs; depends on the product's crates, never the other way.

mod faulty;
mod link;
pub mod oracle;
mod rng;
mod shadow;
mod sim;

pub use faulty::{AnswerLost, DebitFault, FaultyRegion, InstallFault};
pub use oracle::OracleFigures;
pub use rng::Rng;
pub use shadow::{ShadowAccount, ShadowBook};
pub use sim::{Config, Failure, Report, Sim, VirtualClock, FLUSH_INTERVAL_MS};

/// Runs one seed to the end on a current-thread runtime of its own: `ops` steps, then the
/// drain and the exact end-of-run checks.
pub fn run(config: Config) -> Result<Report, Failure> {
    run_observed(config, 0, |_| {})
}

/// [`run`], calling `progress` with the number of steps done after every `every` steps (never
/// when `every` is 0), so a long run can say how far it is.
pub fn run_observed(
    config: Config,
    every: u64,
    mut progress: impl FnMut(u64),
) -> Result<Report, Failure> {
    let seed = config.seed;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure {
            seed,
            step: 0,
            message: format!("runtime: {e}"),
            recent: Vec::new(),
        })?;
    runtime.block_on(async move {
        let ops = config.ops;
        let mut sim = Sim::new(config).await.map_err(|message| Failure {
            seed,
            step: 0,
            message,
            recent: Vec::new(),
        })?;
        for done in 1..=ops {
            sim.step().await?;
            if every > 0 && done.is_multiple_of(every) {
                progress(done);
            }
        }
        sim.finish().await
    })
}
