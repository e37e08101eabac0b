//! `kill -9` of a `tollgate-edge` process under load, with the authority (in this process)
//! reconciling the region into a SQLite ledger afterwards. Strict mode loses no acknowledged
//! debit; cached mode loses at most what was decided since its last flush, and the test
//! measures and prints that loss.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "common.rs"]
mod common;

use common::acct;
use tollgate_authority::{Authority, AuthoritySettings, StateStore, SystemClock};
use tollgate_core::{Credits, IdempotencyKey, RegionId};
use tollgate_ledger::SqliteLedger;
use tollgate_proto::pb;
use tollgate_region::{RedisRegionStore, RETAIN_MS_DEFAULT};
use tollgate_testkit::process::free_port;
use tollgate_testkit::RedisServer;

/// Acknowledged debits after which the edge is killed.
const ACKNOWLEDGED_BEFORE_KILL: usize = 300;
/// Concurrent clients.
const CLIENTS: usize = 8;
/// The edge's flush interval (its default).
const FLUSH_MS: u64 = tollgate_edge::settings::FLUSH_INTERVAL_MS_DEFAULT;

/// The edge process, ended by its pid when the test ends.
struct Edge(Child);

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type Node = Authority<SqliteLedger, RedisRegionStore>;

fn region() -> RegionId {
    RegionId::new("crash").unwrap()
}

async fn world(dir: &std::path::Path, redis: &RedisServer) -> (Node, Arc<SqliteLedger>) {
    let ledger = Arc::new(SqliteLedger::open(&dir.join("ledger.db")).await.unwrap());
    let state_url = format!("sqlite://{}?mode=rwc", dir.join("state.db").display());
    let store = Arc::new(
        RedisRegionStore::connect(&redis.url(), "tg:crash", RETAIN_MS_DEFAULT)
            .await
            .unwrap(),
    );
    let node = Authority::new(
        Arc::clone(&ledger),
        StateStore::connect(&state_url).await.unwrap(),
        BTreeMap::from([(region(), store)]),
        Arc::new(SystemClock),
        AuthoritySettings {
            allocation_micros_min: 500_000_000,
            allocation_micros_max: 500_000_000,
            watermark_lateness_ms: 0,
            ..AuthoritySettings::default()
        },
    );
    let now = tollgate_authority::Clock::now(&SystemClock);
    common::price_gen(&node).await;
    common::open_account(ledger.as_ref(), now).await;
    node.request_allocation(&region(), &acct(), None, tollgate_core::Credits::ZERO)
        .await
        .unwrap();
    (node, ledger)
}

async fn start_edge(redis: &RedisServer) -> (Edge, tonic::transport::Channel) {
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let edge = Edge(
        Command::new(env!("CARGO_BIN_EXE_tollgate-edge"))
            .env("TOLLGATE_REGION", "crash")
            .env("TOLLGATE_REDIS_URL", redis.url())
            .env("TOLLGATE_KEY_PREFIX", "tg:crash")
            .env("TOLLGATE_LISTEN", &listen)
            .env(
                "TOLLGATE_HTTP_LISTEN",
                format!("127.0.0.1:{}", free_port().unwrap()),
            )
            .env("TOLLGATE_ENFORCE_API_KEY", "k")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{listen}"))
            .unwrap()
            .connect()
            .await
        {
            return (edge, channel);
        }
        assert!(Instant::now() < deadline, "the edge did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the clients saw: each key tried, and each acknowledged with its cost and when.
#[derive(Default)]
struct Seen {
    attempted: BTreeMap<String, i64>,
    acknowledged: BTreeMap<String, (i64, Instant)>,
}

async fn load(
    channel: tonic::transport::Channel,
    mode: pb::EnforcementMode,
    seen: Arc<Mutex<Seen>>,
    client: usize,
) {
    let mut stub = pb::enforcement_client::EnforcementClient::new(channel);
    // Bounded: the edge is killed long before, and every call fails after that.
    for n in 0..5_000 {
        let key = format!("c{client}-{n}");
        let mut request = tonic::Request::new(pb::DebitRequest {
            idempotency_key: key.clone(),
            account_id: "acme".into(),
            usage: Some(pb::Usage {
                feature: "gen".into(),
                amount: Some(pb::usage::Amount::Quantity("1".into())),
            }),
            mode: mode.into(),
            ..pb::DebitRequest::default()
        });
        request
            .metadata_mut()
            .insert("authorization", "Bearer k".parse().unwrap());
        seen.lock().unwrap().attempted.insert(key.clone(), 10_000);
        match stub.debit(request).await {
            Ok(reply) => {
                if let Some(pb::debit_reply::Outcome::Debited(_)) = reply.into_inner().outcome {
                    seen.lock()
                        .unwrap()
                        .acknowledged
                        .insert(key, (10_000, Instant::now()));
                }
            }
            Err(_) => return,
        }
    }
}

async fn kill_under_load(mode: pb::EnforcementMode) -> (Seen, BTreeMap<String, i64>, Instant) {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start().unwrap();
    let (node, ledger) = world(dir.path(), &redis).await;
    let (mut edge, channel) = start_edge(&redis).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(load(channel.clone(), mode, Arc::clone(&seen), c)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().acknowledged.len() < ACKNOWLEDGED_BEFORE_KILL {
        assert!(
            Instant::now() < deadline,
            "the edge acknowledged too little"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed_at = Instant::now();
    let pid = edge.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap()
        .success());
    edge.0.wait().unwrap();
    for client in clients {
        client.await.unwrap();
    }
    // The region settles what the dead edge flushed; its lease expires and returns the rest.
    for _ in 0..50 {
        if node.reconcile_once(&region()).await.unwrap().records == 0 {
            break;
        }
    }
    let seen = Arc::try_unwrap(seen).ok().unwrap().into_inner().unwrap();
    (
        seen,
        common::ledger_debits(ledger.as_ref()).await,
        killed_at,
    )
}

fn id_of(key: &str) -> String {
    tollgate_authority::reconciler::debit_id(&region(), &IdempotencyKey::new(key).unwrap())
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_strict_edge_loses_no_acknowledged_debit() {
    let (seen, debits, _) = kill_under_load(pb::EnforcementMode::Strict).await;
    for (key, (micros, _)) in &seen.acknowledged {
        assert_eq!(debits.get(&id_of(key)), Some(micros), "{key} in the ledger");
    }
    let attempted: BTreeMap<String, i64> =
        seen.attempted.iter().map(|(k, m)| (id_of(k), *m)).collect();
    for (id, micros) in &debits {
        assert_eq!(attempted.get(id), Some(micros), "{id} was attempted once");
    }
    println!(
        "strict: {} acknowledged, {} in the ledger, none lost",
        seen.acknowledged.len(),
        debits.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_cached_edge_loses_at_most_its_last_flush() {
    let (seen, debits, killed_at) = kill_under_load(pb::EnforcementMode::Cached).await;
    let attempted: BTreeMap<String, i64> =
        seen.attempted.iter().map(|(k, m)| (id_of(k), *m)).collect();
    for (id, micros) in &debits {
        assert_eq!(attempted.get(id), Some(micros), "{id} was attempted once");
    }
    let lost: Vec<(&String, &(i64, Instant))> = seen
        .acknowledged
        .iter()
        .filter(|(key, _)| !debits.contains_key(&id_of(key)))
        .collect();
    let lost_micros: i64 = lost.iter().map(|(_, (m, _))| *m).sum();
    let oldest_ms = lost
        .iter()
        .map(|(_, (_, at))| killed_at.saturating_duration_since(*at).as_millis())
        .max()
        .unwrap_or(0);
    println!(
        "cached: {} acknowledged, {} in the ledger; lost {} decisions ({} credits), the oldest \
         acknowledged {oldest_ms} ms before the kill (flush interval {FLUSH_MS} ms)",
        seen.acknowledged.len(),
        debits.len(),
        lost.len(),
        Credits::from_micros(lost_micros)
    );
    // What is lost is what the edge decided since its last flush: the decisions of the last
    // moments before the kill, never older ones. (A generous window: the flusher runs every
    // few milliseconds, and a loaded machine delays it.)
    assert!(
        oldest_ms <= 2_000,
        "a decision acknowledged {oldest_ms} ms before the kill was lost"
    );
    assert!(
        lost.len() < seen.acknowledged.len() / 2,
        "{} lost",
        lost.len()
    );
}
