//! `tollgate-authority serve`'s `/metrics` with a configured region, as a real process on
//! PostgreSQL and a redis-server of the test's own, and a webhook endpoint nobody listens on:
//! an edge in this test debits two accounts (the cold path allocates), the background loop
//! reconciles the debits, one account runs out so its `balance.exhausted` webhook fails; then
//! every family of the authority's metrics is scraped over HTTP and checked.

use tollgate_edge::Decision;
use tollgate_testkit::process::free_port;
use tollgate_testkit::{PostgresServer, RedisServer};

mod common;

use common::serve::{acme_and_tiny, chat, sample, scrape_until, value, Serve};

const ADMIN_KEY: &str = "metrics-admin-key";

/// Starts `serve` with region `eu` on `redis` and a webhook endpoint `billing` at a port
/// nothing listens on.
fn start_serve(postgres: &PostgresServer, redis: &RedisServer) -> Serve {
    let dead_port = free_port().unwrap();
    Serve::start(
        postgres,
        redis,
        ADMIN_KEY,
        &format!(
            "[[webhooks]]\nname = \"billing\"\nurl = \"http://127.0.0.1:{dead_port}/hook\"\n\
             secret_env = \"METRICS_TEST_HOOK_SECRET\"\n"
        ),
        &[("METRICS_TEST_HOOK_SECRET", "whsec-metrics-test")],
        "error",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exports_stream_reconciliation_allocation_and_outbox_metrics() {
    let postgres = PostgresServer::start().unwrap();
    let redis = RedisServer::start().unwrap();
    let node = start_serve(&postgres, &redis);
    let http = node.http.clone();
    let mut admin = common::grpc::admin(node.channel().await, ADMIN_KEY);
    acme_and_tiny(&mut admin).await;

    // An edge of region eu: both accounts are cold there, so it asks this authority.
    let engine = node.eu_edge(&redis, ADMIN_KEY).await;
    // 1.5 of acme's 100; all of tiny's 1, so tiny's balance is exhausted.
    for debit in [chat("acme", "d-acme", "3"), chat("tiny", "d-tiny", "2")] {
        let decided = engine.debit(debit).await.unwrap();
        assert!(matches!(&decided, Decision::Done(_)), "{decided:?}");
    }

    let region = r#"region="eu""#;
    let billing = r#"endpoint="billing""#;
    // Reconciled: the stream is empty and the ledger took both debits, so what is out in
    // the region is acme's 98.5 credits (tiny's slice is spent).
    let page = scrape_until(&http, "the debits were not reconciled", |page| {
        sample(page, "tollgate_authority_usage_stream_records", &[region]) == Some(0.0)
            && sample(
                page,
                "tollgate_authority_allocation_outstanding_micros",
                &[region],
            ) == Some(98_500_000.0)
    })
    .await;
    assert_eq!(
        value(
            &page,
            "tollgate_authority_usage_stream_oldest_age_seconds",
            &[region]
        ),
        0.0,
        "an empty stream has no oldest record"
    );
    assert!(
        value(
            &page,
            "tollgate_authority_reconciliation_last_success_timestamp_seconds",
            &[region]
        ) > 0.0
    );
    // The watermark trails now by at least the lateness allowance (15 min by default).
    assert!(
        value(
            &page,
            "tollgate_authority_reconciliation_watermark_lag_seconds",
            &[region]
        ) >= 900.0
    );
    // Each account's cold path asked for an allocation.
    assert!(
        value(
            &page,
            "tollgate_authority_allocation_duration_seconds_count",
            &[region, r#"reason="requested""#, r#"outcome="ok""#]
        ) >= 2.0
    );
    assert_eq!(
        value(&page, "tollgate_authority_parked_usage_open", &[]),
        0.0
    );
    assert_eq!(
        value(&page, "tollgate_authority_parked_usage_open_micros", &[]),
        0.0
    );

    // tiny's balance.exhausted goes to an endpoint nobody listens on: the attempt fails and
    // the delivery waits in the outbox for its retry.
    let page = scrape_until(&http, "no webhook delivery failed", |page| {
        sample(
            page,
            "tollgate_authority_webhook_delivery_failures_total",
            &[billing],
        )
        .is_some_and(|failures| failures >= 1.0)
    })
    .await;
    assert!(value(&page, "tollgate_authority_outbox_pending_deliveries", &[]) >= 1.0);
    assert!(
        value(
            &page,
            "tollgate_authority_outbox_oldest_pending_age_seconds",
            &[]
        ) >= 0.0
    );
    assert_eq!(
        value(
            &page,
            "tollgate_authority_webhook_deliveries_given_up_total",
            &[billing]
        ),
        0.0,
        "the first failures are retried, not given up"
    );

    // Every family says what it measures and in which unit.
    for family in [
        "tollgate_authority_usage_stream_records",
        "tollgate_authority_usage_stream_oldest_age_seconds",
        "tollgate_authority_reconciliation_watermark_lag_seconds",
        "tollgate_authority_reconciliation_last_success_timestamp_seconds",
        "tollgate_authority_allocation_outstanding_micros",
        "tollgate_authority_allocation_duration_seconds",
        "tollgate_authority_webhook_delivery_failures_total",
        "tollgate_authority_webhook_deliveries_given_up_total",
        "tollgate_authority_outbox_pending_deliveries",
        "tollgate_authority_outbox_oldest_pending_age_seconds",
        "tollgate_authority_parked_usage_open",
        "tollgate_authority_parked_usage_open_micros",
    ] {
        assert!(
            page.lines()
                .any(|line| line.starts_with(&format!("# HELP {family} "))),
            "no HELP for {family}"
        );
    }
}
