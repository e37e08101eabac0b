//! The open-loop load engine: requests leave on a schedule (the offered rate), whether or not
//! earlier ones have answered, and each latency counts from the request's *intended* send time,
//! so a slow system cannot hide its queueing (no coordinated omission). Completions are
//! aggregated per region into HDR histograms and one-second timelines, and a progress line is
//! printed to stderr every second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};

use crate::LATENCY_US_MAX;

/// Completions waiting for the aggregator; senders wait when it is full.
const COMPLETIONS_CHANNEL_CAPACITY: usize = 65_536;
/// Requests in flight at most, whatever is asked.
pub const IN_FLIGHT_MAX: usize = 100_000;

/// How the offered rate moves over the run.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "shape", rename_all = "kebab-case")]
pub enum RateShape {
    Steady {
        rate: f64,
    },
    /// Linear from `from` to `to` over the whole run.
    Ramp {
        from: f64,
        to: f64,
    },
    /// `rate`, with `factor` times that for `length_s` at the start of every `every_s`.
    Burst {
        rate: f64,
        factor: f64,
        every_s: f64,
        length_s: f64,
    },
}

impl RateShape {
    /// Offered requests per second at `t` seconds into a run of `duration_s`.
    pub fn at(&self, t: f64, duration_s: f64) -> f64 {
        match *self {
            RateShape::Steady { rate } => rate,
            RateShape::Ramp { from, to } => {
                from + (to - from) * (t / duration_s.max(1e-9)).min(1.0)
            }
            RateShape::Burst {
                rate,
                factor,
                every_s,
                length_s,
            } => {
                if t % every_s.max(1e-3) < length_s {
                    rate * factor
                } else {
                    rate
                }
            }
        }
    }
}

/// One request of the run: which region, edge, account and idempotency key.
#[derive(Clone, Debug)]
pub struct Request {
    pub region: usize,
    pub edge: usize,
    pub account: u64,
    /// The sequence number whose key this request carries (itself, or an earlier one's for a
    /// deliberate replay).
    pub key_index: u64,
}

/// Which requests go where: a pure function of the request's index, so every system of a
/// comparison gets exactly the same requests.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Edges per region (baselines without edges use 1 per region).
    pub edges: Vec<usize>,
    pub accounts: u64,
    /// One request in this many re-sends an earlier request's key to another edge of the same
    /// region (0: never).
    pub replay_every: u64,
}

impl Plan {
    fn account_of(&self, index: u64) -> u64 {
        if self.accounts <= 1 {
            return 0;
        }
        // A fixed scramble (splitmix64) spreads consecutive requests over the accounts.
        let mut z = index.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % self.accounts
    }

    pub fn request(&self, index: u64) -> Request {
        let regions = self.edges.len().max(1) as u64;
        let region = (index % regions) as usize;
        let edges = self.edges.get(region).copied().unwrap_or(1).max(1) as u64;
        let edge = ((index / regions) % edges) as usize;
        // The same region as the original (keys are unique per region), the next request of it.
        let key_index =
            if self.replay_every > 0 && index >= regions && index % self.replay_every == 1 {
                index - regions
            } else {
                index
            };
        Request {
            region,
            edge,
            account: self.account_of(key_index),
            key_index,
        }
    }
}

/// What one call came to.
#[derive(Clone, Debug)]
pub enum Outcome {
    Allowed {
        cost_micros: i64,
    },
    /// An expected refusal, by its code (`INSUFFICIENT_CREDITS`, …).
    Refused(String),
    /// A fault, by gRPC code (or `timeout`, `transport`); `unknown` when the call may have
    /// moved credits all the same.
    Error {
        code: String,
        unknown: bool,
    },
}

/// A system under load.
pub trait Driver: Send + Sync + 'static {
    fn call(&self, request: Request) -> BoxFuture<'static, Outcome>;
}

/// The run's bounds.
#[derive(Clone, Debug)]
pub struct RunLimits {
    pub duration: Duration,
    pub requests_max: u64,
    pub in_flight_max: usize,
    pub timeout: Duration,
}

/// A decided request, kept for the audit (allowed and unknown outcomes only).
#[derive(Clone, Copy, Debug)]
pub struct Decided {
    pub region: u16,
    pub account: u64,
    pub key_index: u64,
    /// Micro-credits charged (allowed) or that may have been (unknown).
    pub cost_micros: i64,
    pub allowed: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Second {
    pub t_s: u64,
    pub ok: u64,
    pub refused: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LatencySummary {
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        LatencySummary {
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// One region's figures.
#[derive(Clone, Debug, Serialize)]
pub struct RegionFigures {
    pub region: String,
    pub ok: u64,
    pub refused: u64,
    pub errors: u64,
    pub ops_per_s: f64,
    /// Every answer, allowed or refused, from its intended send time.
    pub latency: LatencySummary,
    pub refusals: BTreeMap<String, u64>,
    pub errors_by_code: BTreeMap<String, u64>,
    pub timeline: Vec<Second>,
    #[serde(skip)]
    pub histogram: Histogram<u64>,
}

/// What a run measured.
#[derive(Debug, Serialize)]
pub struct RunFigures {
    pub system: String,
    pub elapsed_s: f64,
    /// Requests the schedule asked for within the duration.
    pub scheduled: u64,
    pub sent: u64,
    /// Requests the schedule asked for that could not leave before the end (the in-flight
    /// limit was reached): the system could not keep up with the offered rate.
    pub unsent: u64,
    pub ok: u64,
    pub refused: u64,
    pub errors: u64,
    pub ops_per_s: f64,
    pub latency: LatencySummary,
    pub regions: Vec<RegionFigures>,
    #[serde(skip)]
    pub decided: Vec<Decided>,
}

struct Completion {
    request: Request,
    latency_us: u64,
    outcome: Outcome,
}

fn histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// Runs `driver` under `shape` and `plan` within `limits`; `regions` names the plan's regions.
pub async fn run(
    system: &str,
    driver: Arc<dyn Driver>,
    shape: &RateShape,
    plan: &Plan,
    regions: &[String],
    limits: &RunLimits,
) -> anyhow::Result<RunFigures> {
    let (sender, receiver) = mpsc::channel::<Completion>(COMPLETIONS_CHANNEL_CAPACITY);
    let aggregator = tokio::spawn(aggregate(
        system.to_owned(),
        regions.to_vec(),
        receiver,
        limits.duration,
    ));
    let permits = Arc::new(Semaphore::new(limits.in_flight_max.clamp(1, IN_FLIGHT_MAX)));
    let duration_s = limits.duration.as_secs_f64();
    let started = Instant::now();
    let deadline = started + limits.duration;
    let (mut t, mut index, mut sent) = (0.0_f64, 0_u64, 0_u64);
    // Bounded by the duration (t grows by at least 1 µs a step) and by `requests_max`.
    while t < duration_s && index < limits.requests_max {
        let intended = started + Duration::from_secs_f64(t);
        tokio::time::sleep_until(intended.into()).await;
        let permit = tokio::select! {
            // A free slot wins over the deadline when both are ready: a request due before
            // the end is sent, not counted as unsent.
            biased;
            permit = Arc::clone(&permits).acquire_owned() => permit?,
            _ = tokio::time::sleep_until(deadline.into()) => break,
        };
        let request = plan.request(index);
        let call = driver.call(request.clone());
        let sender = sender.clone();
        let timeout = limits.timeout;
        tokio::spawn(async move {
            let outcome = match tokio::time::timeout(timeout, call).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Error {
                    code: "timeout".into(),
                    unknown: true,
                },
            };
            let latency_us = intended.elapsed().as_micros() as u64;
            drop(permit);
            let _ = sender
                .send(Completion {
                    request,
                    latency_us,
                    outcome,
                })
                .await;
        });
        sent += 1;
        index += 1;
        let rate = shape.at(t, duration_s).max(0.1);
        t += (1.0 / rate).max(1e-6);
    }
    // What the schedule asked for within the duration but could not be sent.
    let mut scheduled = index;
    while t < duration_s && scheduled < limits.requests_max && scheduled < sent + 100_000_000 {
        let rate = shape.at(t, duration_s).max(0.1);
        t += (1.0 / rate).max(1e-6);
        scheduled += 1;
    }
    drop(sender);
    // Every spawned call ends within its timeout; the aggregator ends when the last one has.
    let mut figures = aggregator.await??;
    figures.scheduled = scheduled;
    figures.sent = sent;
    figures.unsent = scheduled - sent;
    Ok(figures)
}

struct RegionState {
    figures: RegionFigures,
    second: Histogram<u64>,
    second_counts: (u64, u64, u64),
}

async fn aggregate(
    system: String,
    regions: Vec<String>,
    mut receiver: mpsc::Receiver<Completion>,
    duration: Duration,
) -> anyhow::Result<RunFigures> {
    let started = Instant::now();
    let mut states: Vec<RegionState> = regions
        .iter()
        .map(|name| RegionState {
            figures: RegionFigures {
                region: name.clone(),
                ok: 0,
                refused: 0,
                errors: 0,
                ops_per_s: 0.0,
                latency: LatencySummary::of(&histogram()),
                refusals: BTreeMap::new(),
                errors_by_code: BTreeMap::new(),
                timeline: Vec::new(),
                histogram: histogram(),
            },
            second: histogram(),
            second_counts: (0, 0, 0),
        })
        .collect();
    let mut decided = Vec::new();
    let mut ticker = tokio::time::interval_at(
        (started + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    let mut seconds = 0_u64;
    loop {
        tokio::select! {
            completion = receiver.recv() => {
                let Some(completion) = completion else { break };
                record(&mut states, &mut decided, completion);
            }
            _ = ticker.tick() => {
                seconds += 1;
                progress(&system, seconds, duration, &mut states);
            }
        }
    }
    if states.iter().any(|s| s.second_counts != (0, 0, 0)) {
        progress(&system, seconds + 1, duration, &mut states);
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let mut total = histogram();
    let (mut ok, mut refused, mut errors) = (0, 0, 0);
    let mut region_figures = Vec::new();
    for state in states {
        let mut figures = state.figures;
        figures.ops_per_s = figures.ok as f64 / elapsed;
        figures.latency = LatencySummary::of(&figures.histogram);
        total.add(&figures.histogram)?;
        ok += figures.ok;
        refused += figures.refused;
        errors += figures.errors;
        region_figures.push(figures);
    }
    Ok(RunFigures {
        system,
        elapsed_s: elapsed,
        scheduled: 0,
        sent: 0,
        unsent: 0,
        ok,
        refused,
        errors,
        ops_per_s: ok as f64 / elapsed,
        latency: LatencySummary::of(&total),
        regions: region_figures,
        decided,
    })
}

fn record(states: &mut [RegionState], decided: &mut Vec<Decided>, completion: Completion) {
    let Completion {
        request,
        latency_us,
        outcome,
    } = completion;
    let Some(state) = states.get_mut(request.region) else {
        return;
    };
    let figures = &mut state.figures;
    let mut keep = |cost_micros: i64, allowed: bool| {
        decided.push(Decided {
            region: request.region as u16,
            account: request.account,
            key_index: request.key_index,
            cost_micros,
            allowed,
        })
    };
    match outcome {
        Outcome::Allowed { cost_micros } => {
            figures.ok += 1;
            state.second_counts.0 += 1;
            keep(cost_micros, true);
        }
        Outcome::Refused(code) => {
            figures.refused += 1;
            state.second_counts.1 += 1;
            *figures.refusals.entry(code).or_default() += 1;
        }
        Outcome::Error { code, unknown } => {
            figures.errors += 1;
            state.second_counts.2 += 1;
            *figures.errors_by_code.entry(code).or_default() += 1;
            if unknown {
                keep(0, false);
            }
        }
    }
    figures.histogram.saturating_record(latency_us.max(1));
    state.second.saturating_record(latency_us.max(1));
}

/// Closes one second of every region's timeline and prints one line.
fn progress(system: &str, t_s: u64, duration: Duration, states: &mut [RegionState]) {
    let mut line = format!("[{t_s:>3}/{}s] {system}:", duration.as_secs());
    for state in states.iter_mut() {
        let (ok, refused, errors) = state.second_counts;
        let second = Second {
            t_s,
            ok,
            refused,
            errors,
            p50_us: state.second.value_at_quantile(0.5),
            p99_us: state.second.value_at_quantile(0.99),
        };
        line.push_str(&format!(
            "  {} {} ok/s {} refused {} err p99 {:.2} ms",
            state.figures.region,
            ok,
            refused,
            errors,
            second.p99_us as f64 / 1000.0
        ));
        state.figures.timeline.push(second);
        state.second.reset();
        state.second_counts = (0, 0, 0);
    }
    eprintln!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_spread_regions_edges_accounts_and_replay_within_a_region() {
        let plan = Plan {
            edges: vec![2, 2],
            accounts: 10,
            replay_every: 5,
        };
        let requests: Vec<Request> = (0..40).map(|i| plan.request(i)).collect();
        assert!(requests.iter().all(|r| r.account < 10));
        assert_eq!(
            requests.iter().map(|r| r.region).collect::<Vec<_>>()[..4],
            [0, 1, 0, 1]
        );
        assert_eq!(
            requests.iter().map(|r| r.edge).collect::<Vec<_>>()[..4],
            [0, 0, 1, 1]
        );
        let replay = &requests[6];
        assert_eq!(replay.key_index, 4);
        assert_eq!(replay.region, requests[4].region);
        assert_eq!(replay.account, requests[4].account);
        assert_ne!(
            replay.edge, requests[4].edge,
            "a replay reaches another edge"
        );
        let one = Plan {
            edges: vec![1],
            accounts: 1,
            replay_every: 0,
        };
        assert!((0..100).all(|i| one.request(i).account == 0 && one.request(i).key_index == i));
    }

    #[test]
    fn rate_shapes() {
        let ramp = RateShape::Ramp {
            from: 10.0,
            to: 110.0,
        };
        assert_eq!(ramp.at(5.0, 10.0), 60.0);
        let burst = RateShape::Burst {
            rate: 100.0,
            factor: 4.0,
            every_s: 5.0,
            length_s: 1.0,
        };
        assert_eq!(burst.at(0.5, 10.0), 400.0);
        assert_eq!(burst.at(2.0, 10.0), 100.0);
        assert_eq!(burst.at(5.2, 10.0), 400.0);
    }
}
