//! `tollgate-sim`: runs seeded simulations and prints what they did.
//!
//! `cargo run -p tollgate-sim -- --seed 42` replays seed 42; `--seeds 100` runs seeds
//! `seed..seed+100`; `--ops` sets the steps per seed. Exit status 1 when an invariant broke.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use tollgate_sim::{run_observed, Config, Failure, OracleFigures, Report};

#[derive(Parser, Debug)]
#[command(
    name = "tollgate-sim",
    about = "Deterministic simulation of Tollgate with faults"
)]
struct Args {
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How many seeds to run, from `--seed` on.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Steps per seed.
    #[arg(long, default_value_t = 300)]
    ops: u64,
    /// Full ledger verification every this many steps (and at the end).
    #[arg(long, default_value_t = 50)]
    verify_every: u64,
    /// Regions.
    #[arg(long, default_value_t = 2)]
    regions: usize,
    /// Edges per region (alternately strict and cached).
    #[arg(long, default_value_t = 2)]
    edges: usize,
    /// Accounts at most.
    #[arg(long, default_value_t = 5)]
    accounts: usize,
    /// Run without faults.
    #[arg(long)]
    no_faults: bool,
    /// With one region, count false refusals instead of failing on the first (to measure
    /// them; the tests always fail on them).
    #[arg(long)]
    count_false_refusals: bool,
    /// Run every seed even after one fails, and say at the end which failed.
    #[arg(long)]
    keep_going: bool,
    /// Print every step as it happens.
    #[arg(long)]
    trace: bool,
    /// Print progress (steps done, rate over the last stretch) to stderr every this many steps.
    #[arg(long, default_value_t = 0)]
    progress: u64,
    /// Print the product's own logs (warnings and errors) while replaying a seed.
    #[arg(long)]
    log: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.log {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_writer(std::io::stderr)
            .init();
    }
    let mut summary = Summary::default();
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        let config = Config {
            seed,
            ops: args.ops,
            regions: args.regions.max(1),
            edges_per_region: args.edges.max(1),
            accounts_max: args.accounts.max(1),
            verify_every: args.verify_every,
            faults: !args.no_faults,
            false_refusals_fail: !args.count_false_refusals,
            print_trace: args.trace,
        };
        let started = Instant::now();
        let mut last = (0_u64, started);
        let progress = |done: u64| {
            let stretch = last.1.elapsed().as_secs_f64().max(1e-9);
            eprintln!(
                "seed {seed}: {done} steps, {:.0} s, {:.0} steps/s over the last {}",
                started.elapsed().as_secs_f64(),
                (done - last.0) as f64 / stretch,
                done - last.0
            );
            last = (done, Instant::now());
        };
        match run_observed(config, args.progress, progress) {
            Ok(report) => {
                print_report(&report, started.elapsed().as_secs_f64());
                summary.passed(&report);
            }
            Err(failure) => {
                eprintln!("{failure}");
                summary.failed(&failure);
                if !args.keep_going {
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    if args.seeds > 1 {
        summary.print();
    }
    if summary.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_report(report: &Report, seconds: f64) {
    println!(
        "seed {}: {} steps in {seconds:.1} s ({:.0} steps/s), {} region(s), trace {}",
        report.seed,
        report.steps,
        report.steps as f64 / seconds.max(1e-9),
        report.regions,
        &report.trace_hash[..16]
    );
    println!(
        "  invariant checks {}, full verifications {}, acknowledged spends {}, charged {}, reversals {}, refunds {}",
        report.checks,
        report.verifies,
        report.acknowledged,
        report.charged,
        report.reversals,
        report.admin_refunds
    );
    println!(
        "  lost with crashed edges: {} decisions ({} micro-credits); made again by a client retry: {}; counted lost by edges: {}",
        report.lost_crash_entries,
        report.lost_crash_micros,
        report.lost_then_retried,
        report.lost_edge_entries
    );
    println!(
        "  served = charged + parked + pending checked {} times; debits applied with their answer lost {}; client retries {}",
        report.served_checks, report.answers_lost, report.client_retries
    );
    println!("  operations: {:?}", report.ops);
    println!("  faults: {:?}", report.faults);
    let mut seconds: Vec<_> = report.seconds.iter().collect();
    seconds.sort_by(|a, b| b.1.total_cmp(a.1));
    let seconds: Vec<String> = seconds
        .iter()
        .map(|(what, s)| format!("{what} {s:.1}"))
        .collect();
    println!("  seconds: {}", seconds.join(", "));
    for line in report.oracle.to_string().lines() {
        println!("  oracle: {line}");
    }
}

/// What many seeds came to: the oracle's figures summed by topology, and the seeds that
/// failed with the first line of their failure.
#[derive(Default)]
struct Summary {
    one_region: (u64, OracleFigures),
    several_regions: (u64, OracleFigures),
    failures: Vec<(u64, String)>,
}

impl Summary {
    fn passed(&mut self, report: &Report) {
        let (seeds, figures) = if report.regions == 1 {
            &mut self.one_region
        } else {
            &mut self.several_regions
        };
        *seeds += 1;
        figures.add(&report.oracle);
    }

    fn failed(&mut self, failure: &Failure) {
        let first = failure.message.lines().next().unwrap_or_default();
        self.failures.push((failure.seed, first.to_owned()));
    }

    fn print(&self) {
        for (name, (seeds, figures)) in [
            ("one region", &self.one_region),
            ("several regions", &self.several_regions),
        ] {
            if *seeds == 0 {
                continue;
            }
            println!("{name}, {seeds} seeds passed:");
            for line in figures.to_string().lines() {
                println!("  oracle: {line}");
            }
        }
        println!("seeds failed: {}", self.failures.len());
        for (seed, message) in &self.failures {
            println!("  seed {seed}: {message}");
        }
    }
}
