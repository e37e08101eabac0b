//! One slow webhook receiver holds nothing else back: `tollgate-authority serve` (a real
//! process on PostgreSQL and a redis-server of the test's own) delivers a webhook to an endpoint
//! that takes the connection and never answers, and while that delivery hangs (up to the
//! authority's 10 s HTTP timeout) the region's usage is reconciled and its allocation kept up.
//! A background loop that ran reconciliation, refills and deliveries one after another would
//! reconcile only once the delivery gave up and closed its connection.

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_edge::Decision;
use tollgate_testkit::{PostgresServer, RedisServer};

mod common;

use common::serve::{acme_and_tiny, chat, sample, scrape_until, Serve, SCRAPE_WAIT_MS};

const ADMIN_KEY: &str = "slow-hook-admin-key";

/// An endpoint that accepts connections, reads what is sent and never answers. Counts the
/// connections taken and the ones the sender closed.
struct SilentEndpoint {
    port: u16,
    taken: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl SilentEndpoint {
    fn start() -> SilentEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let taken = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (taken_by, closed_by) = (Arc::clone(&taken), Arc::clone(&closed));
        // Threads end with the test process; the listener is dropped with it.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                taken_by.fetch_add(1, Ordering::SeqCst);
                let closed_by = Arc::clone(&closed_by);
                std::thread::spawn(move || {
                    let mut buffer = [0_u8; 4096];
                    // Read until the sender closes (end of stream or a reset).
                    while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {}
                    closed_by.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        SilentEndpoint {
            port,
            taken,
            closed,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_receiver_that_never_answers_holds_back_no_reconciliation() {
    let postgres = PostgresServer::start().unwrap();
    let redis = RedisServer::start().unwrap();
    let endpoint = SilentEndpoint::start();
    let node = Serve::start(
        &postgres,
        &redis,
        ADMIN_KEY,
        &format!(
            "[[webhooks]]\nname = \"billing\"\nurl = \"http://127.0.0.1:{}/hook\"\n\
             secret_env = \"SLOW_HOOK_SECRET\"\n",
            endpoint.port
        ),
        &[("SLOW_HOOK_SECRET", "whsec-slow-hook-test")],
        "error",
    );
    let http = node.http.clone();
    let mut admin = common::grpc::admin(node.channel().await, ADMIN_KEY);
    acme_and_tiny(&mut admin).await;
    let engine = node.eu_edge(&redis, ADMIN_KEY).await;

    // tiny spends all it has: its balance.exhausted webhook goes to the silent endpoint.
    let spent = engine.debit(chat("tiny", "d-tiny", "2")).await.unwrap();
    assert!(matches!(&spent, Decision::Done(_)), "{spent:?}");
    let deadline = Instant::now() + Duration::from_millis(SCRAPE_WAIT_MS);
    while endpoint.taken.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "no webhook delivery was attempted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // While that delivery waits for an answer, acme spends and its usage is reconciled.
    let region = r#"region="eu""#;
    for n in 0..3 {
        let decided = engine
            .debit(chat("acme", &format!("d-acme-{n}"), "3"))
            .await
            .unwrap();
        assert!(matches!(&decided, Decision::Done(_)), "{decided:?}");
    }
    // Reconciled: the stream is empty and what is out in the region is acme's 95.5.
    scrape_until(&http, "acme's debits were not reconciled", |page| {
        sample(page, "tollgate_authority_usage_stream_records", &[region]) == Some(0.0)
            && sample(
                page,
                "tollgate_authority_allocation_outstanding_micros",
                &[region],
            ) == Some(95_500_000.0)
    })
    .await;
    // The first delivery's connection is still open: reconciliation did not wait for it to
    // time out (a reconciliation slower than the 10 s timeout would fail here too).
    assert_eq!(
        endpoint.closed.load(Ordering::SeqCst),
        0,
        "the delivery gave up before the debits were reconciled"
    );
    assert_eq!(endpoint.taken.load(Ordering::SeqCst), 1);
}
