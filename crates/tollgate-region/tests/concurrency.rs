//! Many clients spending from one account at once, on a real redis-server: the total allowed
//! never exceeds allocation plus overdraft, and every idempotency key is charged once, counted
//! from the usage stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tollgate_core::Credits;
use tollgate_region::conformance::{account, at, debit_command, install, segment};
use tollgate_region::{DebitOutcome, RedisRegionStore, RegionStore, RETAIN_MS_DEFAULT};
use tollgate_testkit::RedisServer;

const CLIENTS: u64 = 32;
const REQUESTS_PER_CLIENT: u64 = 150;
/// Keys every client may send, so the same key reaches Redis from several clients at once.
const SHARED_KEYS: u64 = 300;

/// The cost of a shared key is fixed by the key, as a replayed request carries the same body.
fn shared_cost_micros(n: u64) -> i64 {
    1_000_000 + (n as i64 % 19) * 1_000_000 + 7
}

#[derive(Default)]
struct Seen {
    /// key -> (cost, usage id) of every allowed first answer.
    first: HashMap<String, (i64, String)>,
    /// key -> usage ids of answers marked as replays.
    replays: Vec<(String, String)>,
    refused: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_never_overspend_and_charge_each_key_once() {
    let server = RedisServer::start().expect("start redis-server");
    let store = Arc::new(
        RedisRegionStore::connect(&server.url(), "tg:conc", RETAIN_MS_DEFAULT)
            .await
            .expect("connect"),
    );
    let a = account("acct-hot");
    install(store.as_ref(), &a, segment("monthly", "600", 10, None)).await;
    install(store.as_ref(), &a, segment("bought", "400", 50, None)).await;
    store
        .set_overdraft_limit(&a, Credits::parse("50").unwrap(), at(0))
        .await
        .unwrap();
    store.create_usage_group("audit").await.unwrap();

    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let store = Arc::clone(&store);
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            let mut state = client.wrapping_mul(2_654_435_761).wrapping_add(17);
            for request in 0..REQUESTS_PER_CLIENT {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let roll = (state >> 33) % 100;
                let (key, cost) = if roll < 40 {
                    let n = (state >> 13) % SHARED_KEYS;
                    (format!("shared-{n}"), shared_cost_micros(n))
                } else {
                    (
                        format!("c{client}-{request}"),
                        500_000 + ((state >> 20) % 15_000_000) as i64,
                    )
                };
                let mut command = debit_command(&a, &key, "gen", "0", at(request as i64));
                command.cost = Credits::from_micros(cost);
                match store.debit(&command).await.expect("debit") {
                    DebitOutcome::Allowed(allowed) if allowed.replayed => {
                        seen.replays.push((key, allowed.usage_id.0))
                    }
                    DebitOutcome::Allowed(allowed) => {
                        let previous = seen.first.insert(key.clone(), (cost, allowed.usage_id.0));
                        assert!(
                            previous.is_none(),
                            "key {key} was answered as new twice to one client"
                        );
                    }
                    DebitOutcome::Refused(_) => seen.refused += 1,
                }
            }
            seen
        }));
    }
    let mut first: HashMap<String, (i64, String)> = HashMap::new();
    let mut replays = Vec::new();
    let mut refused = 0;
    for task in tasks {
        let seen = task.await.expect("client task");
        for (key, answer) in seen.first {
            assert!(
                first.insert(key.clone(), answer).is_none(),
                "key {key} was charged as new for two clients"
            );
        }
        replays.extend(seen.replays);
        refused += seen.refused;
    }

    // Every replay answered with the usage record of the first charge.
    for (key, usage_id) in &replays {
        assert_eq!(
            first.get(key).map(|(_, id)| id),
            Some(usage_id),
            "replay of {key} pointed elsewhere"
        );
    }

    // Count from the usage stream: one record per key, and nothing beyond what was granted.
    let mut charged: BTreeMap<String, i64> = BTreeMap::new();
    for _ in 0..1_000 {
        let records = store
            .read_usage("audit", "auditor", 500)
            .await
            .expect("read usage");
        if records.is_empty() {
            break;
        }
        for record in &records {
            let previous = charged.insert(record.key.to_string(), record.cost.micros());
            assert!(
                previous.is_none(),
                "key {} appears twice in the usage stream",
                record.key
            );
            let drawn: i64 = record.draws.iter().map(|d| d.amount.micros()).sum::<i64>()
                + record.overdraft.micros();
            assert_eq!(
                drawn,
                record.cost.micros(),
                "draws of {} do not sum to its cost",
                record.key
            );
        }
        let ids: Vec<_> = records.iter().map(|r| r.id.clone()).collect();
        store.ack_usage("audit", &ids).await.expect("ack");
    }
    let total: i64 = charged.values().sum();
    let allowed_total: i64 = first.values().map(|(cost, _)| cost).sum();
    let view = store.view(&a, at(1_000_000)).await.unwrap();
    println!(
        "{} keys charged for {} credits; {} replays answered; {} refused; pool left {}, overdraft used {}",
        charged.len(),
        Credits::from_micros(total),
        replays.len(),
        refused,
        view.pool(),
        view.overdraft_used
    );
    assert_eq!(
        charged.len(),
        first.len(),
        "the stream has exactly the keys clients saw charged"
    );
    assert_eq!(
        total, allowed_total,
        "the stream charges what clients were told"
    );
    assert!(
        total <= 1_050_000_000,
        "allowed {total} micro-credits beyond allocation + overdraft"
    );
    assert_eq!(
        1_000_000_000 - view.pool().micros() + view.overdraft_used.micros(),
        total,
        "segments account for every charge"
    );
    assert!(
        refused > 0 && !replays.is_empty(),
        "the test must exhaust the account and replay keys"
    );
}
