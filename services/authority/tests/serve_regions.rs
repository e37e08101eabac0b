//! `tollgate-authority serve` with a configured region, as a real process on PostgreSQL and a
//! redis-server of the test's own: prices, an account and a grant through Admin; an edge in
//! this test whose cold path asks this authority over gRPC; the debit reconciled into the
//! ledger by the authority's background loop; its /metrics scraped; then SIGTERM.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_core::{AccountId, FeatureKey, IdempotencyKey, Quantity, RegionId};
use tollgate_edge::coordination::AuthorityClient;
use tollgate_edge::{DebitRequest, Decision, EdgeSettings, Engine, Spend, SystemClock};
use tollgate_proto::pb;
use tollgate_region::{RedisRegionStore, RETAIN_MS_DEFAULT};
use tollgate_testkit::process::free_port;
use tollgate_testkit::{PostgresServer, RedisServer};
use tonic::transport::Channel;

mod common;

use common::grpc::{define_chat, price_chat};

const ADMIN_KEY: &str = "serve-admin-key";
/// How long the test waits for the background loop to reconcile (it runs every 200 ms).
const RECONCILED_WITHIN_MS: u64 = 30_000;

/// The authority process this test started; ended by its own id if the test fails half way.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reconciles_allocates_and_answers_the_cold_path_for_a_configured_region() {
    let postgres = PostgresServer::start().unwrap();
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("authority.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"{}\"\n[[regions]]\nname = \"eu\"\nredis_url = \"{}\"\nkey_prefix = \"tg:eu\"\n",
            postgres.url(),
            redis.url()
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let http = format!("127.0.0.1:{}", free_port().unwrap());
    let mut config_text = std::fs::read_to_string(&config).unwrap();
    config_text.insert_str(0, &format!("http_listen = \"{http}\"\n"));
    std::fs::write(&config, config_text).unwrap();
    let mut node = Node(
        Command::new(env!("CARGO_BIN_EXE_tollgate-authority"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("TOLLGATE_LISTEN", &listen)
            .env("TOLLGATE_ADMIN_API_KEY", ADMIN_KEY)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let channel = loop {
        if let Ok(channel) = Channel::from_shared(format!("http://{listen}"))
            .unwrap()
            .connect()
            .await
        {
            break channel;
        }
        assert!(
            Instant::now() < deadline,
            "the authority did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
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
    let store = Arc::new(
        RedisRegionStore::connect(&redis.url(), "tg:eu", RETAIN_MS_DEFAULT)
            .await
            .unwrap(),
    );
    let eu = RegionId::new("eu").unwrap();
    let client = AuthorityClient::new(
        &format!("http://{listen}"),
        eu.clone(),
        Some(ADMIN_KEY),
        "edge-t".into(),
    )
    .unwrap();
    let engine = Engine::new(store, EdgeSettings::new(eu), Arc::new(SystemClock))
        .with_allocator(Arc::new(client));
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

    let pid = node.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let stop_deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = node.0.try_wait().unwrap() {
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
