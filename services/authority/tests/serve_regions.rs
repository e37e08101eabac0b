//! `tollgate-authority serve` with a configured region, as a real process on PostgreSQL and a
//! redis-server of the test's own: prices, an account and a grant through Admin; an edge in
//! this test whose cold path asks this authority over gRPC; the debit reconciled into the
//! ledger by the authority's background loop; its /metrics scraped; then SIGTERM.

use std::process::Command;
use std::time::{Duration, Instant};

use tollgate_core::{AccountId, FeatureKey, IdempotencyKey, Quantity};
use tollgate_edge::{DebitRequest, Decision, Spend};
use tollgate_proto::pb;
use tollgate_testkit::{PostgresServer, RedisServer};

mod common;

use common::grpc::{define_chat, price_chat};
use common::serve::Serve;

const ADMIN_KEY: &str = "serve-admin-key";
/// How long the test waits for the background loop to reconcile (it runs every 200 ms).
const RECONCILED_WITHIN_MS: u64 = 30_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reconciles_allocates_and_answers_the_cold_path_for_a_configured_region() {
    let postgres = PostgresServer::start().unwrap();
    let redis = RedisServer::start().unwrap();
    let mut node = Serve::start(&postgres, &redis, ADMIN_KEY, "", &[], "warn");
    let http = node.http.clone();
    let channel = node.channel().await;
    let mut admin = common::grpc::admin(channel, ADMIN_KEY);
    define_chat(&mut admin, "").await;
    price_chat(&mut admin, "0.5").await;
    admin
        .create_account(pb::CreateAccountRequest {
            idempotency_key: "a1".into(),
            account_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .issue_grant(pb::IssueGrantRequest {
            idempotency_key: "g1".into(),
            account_id: "acme".into(),
            grant_id: "bought".into(),
            amount: "100".into(),
            source: pb::GrantSource::Purchase.into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // An edge of region eu: the account is cold there, so it asks this authority.
    let engine = node.eu_edge(&redis, ADMIN_KEY).await;
    let debit = DebitRequest {
        account: AccountId::new("acme").unwrap(),
        key: IdempotencyKey::new("d1").unwrap(),
        feature: FeatureKey::new("chat").unwrap(),
        spend: Spend::Quantity(Quantity::parse("3").unwrap()),
        actor: None,
        mode: None,
        event_time: None,
    };
    let decided = engine.debit(debit).await.unwrap();
    assert!(matches!(&decided, Decision::Done(_)), "{decided:?}");

    let deadline = Instant::now() + Duration::from_millis(RECONCILED_WITHIN_MS);
    let balance = loop {
        let reply = admin
            .get_balance(pb::AdminGetBalanceRequest {
                account_id: "acme".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let balance = reply.balance.unwrap().balance;
        if balance != "100" || Instant::now() > deadline {
            break balance;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        balance, "98.5",
        "the authority reconciled the region's debit into the ledger"
    );
    // Its /metrics says nothing is parked.
    assert_eq!(
        common::http_client::metric(&http, "tollgate_authority_parked_usage_open").await,
        "0"
    );
    assert_eq!(
        common::http_client::metric(&http, "tollgate_authority_parked_usage_open_micros").await,
        "0"
    );

    let pid = node.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let stop_deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < stop_deadline,
            "serve did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}
