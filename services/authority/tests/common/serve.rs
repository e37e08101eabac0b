//! `tollgate-authority serve` as a real process of the test's own, with region `eu` on the
//! test's redis-server and its ledger and state on the test's PostgreSQL; and an edge of `eu`
//! in the test whose cold path asks that process over gRPC.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_core::{AccountId, FeatureKey, IdempotencyKey, Quantity, RegionId};
use tollgate_edge::coordination::AuthorityClient;
use tollgate_edge::{DebitRequest, EdgeSettings, Engine, Spend, SystemClock};
use tollgate_proto::pb;
use tollgate_region::{RedisRegionStore, RETAIN_MS_DEFAULT};
use tollgate_testkit::process::free_port;
use tollgate_testkit::{PostgresServer, RedisServer};
use tonic::transport::Channel;

use super::grpc::Admin;

/// How long a test waits for the process to listen.
const LISTEN_WITHIN_MS: u64 = 30_000;

/// The process; ended by its own id when the test ends (or fails half way).
pub struct Serve {
    pub child: Child,
    pub listen: String,
    pub http: String,
    _dir: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Starts `serve` on free ports with admin key `admin_key`; `extra` is appended to its
    /// configuration (after region `eu`), `env` set on the process, `log` is its `RUST_LOG`.
    pub fn start(
        postgres: &PostgresServer,
        redis: &RedisServer,
        admin_key: &str,
        extra: &str,
        env: &[(&str, &str)],
        log: &str,
    ) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("authority.toml");
        let listen = format!("127.0.0.1:{}", free_port().unwrap());
        let http = format!("127.0.0.1:{}", free_port().unwrap());
        std::fs::write(
            &config,
            format!(
                "http_listen = \"{http}\"\ndatabase_url = \"{}\"\n\
                 [[regions]]\nname = \"eu\"\nredis_url = \"{}\"\nkey_prefix = \"tg:eu\"\n{extra}",
                postgres.url(),
                redis.url()
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate-authority"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("TOLLGATE_LISTEN", &listen)
            .env("TOLLGATE_ADMIN_API_KEY", admin_key)
            .envs(env.iter().copied())
            .env("RUST_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Serve {
            child,
            listen,
            http,
            _dir: dir,
        }
    }

    /// A channel to its gRPC listener, once it listens.
    pub async fn channel(&self) -> Channel {
        let deadline = Instant::now() + Duration::from_millis(LISTEN_WITHIN_MS);
        loop {
            if let Ok(channel) = Channel::from_shared(format!("http://{}", self.listen))
                .unwrap()
                .connect()
                .await
            {
                return channel;
            }
            assert!(
                Instant::now() < deadline,
                "the authority did not start listening"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An edge of region `eu` on `redis` whose cold path asks this process.
    pub async fn eu_edge(&self, redis: &RedisServer, admin_key: &str) -> Engine<RedisRegionStore> {
        let store = Arc::new(
            RedisRegionStore::connect(&redis.url(), "tg:eu", RETAIN_MS_DEFAULT)
                .await
                .unwrap(),
        );
        let eu = RegionId::new("eu").unwrap();
        let client = AuthorityClient::new(
            &format!("http://{}", self.listen),
            eu.clone(),
            Some(admin_key),
            "edge-t".into(),
        )
        .unwrap();
        Engine::new(store, EdgeSettings::new(eu), Arc::new(SystemClock))
            .with_allocator(Arc::new(client))
    }
}

/// How long a test waits for `serve`'s background loops (reconciliation every 200 ms, webhooks
/// every second) to do what it checks; a bound on waiting, not a timing assertion.
pub const SCRAPE_WAIT_MS: u64 = 30_000;

/// The `/metrics` page of the HTTP listener at `http`.
pub async fn scrape(http: &str) -> String {
    let url = format!("http://{http}/metrics");
    let (status, _, body) = super::http_client::call("GET", &url, &[], "").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the sample of `name` that has every one of `labels` (`key="value"`), if any.
pub fn sample(page: &str, name: &str, labels: &[&str]) -> Option<f64> {
    page.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        let matches = match rest.strip_prefix('{') {
            Some(set) => labels.iter().all(|label| set.contains(label)),
            None => rest.is_empty() && labels.is_empty(),
        };
        matches.then(|| value.parse().ok()).flatten()
    })
}

/// Like [`sample`], failing the test when the sample is missing.
pub fn value(page: &str, name: &str, labels: &[&str]) -> f64 {
    sample(page, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{page}"))
}

/// What the `serve` tests start from: feature `chat` at 0.5 credits a call, account `acme`
/// with 100 credits and account `tiny` with 1 (whose balance one debit exhausts).
pub async fn acme_and_tiny(admin: &mut Admin) {
    super::grpc::define_chat(admin, "").await;
    super::grpc::price_chat(admin, "0.5").await;
    account_with_grant(admin, "acme", "100").await;
    account_with_grant(admin, "tiny", "1").await;
}

/// Scrapes until `ready` holds for the page (at most [`SCRAPE_WAIT_MS`]); returns the last page.
pub async fn scrape_until(http: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_millis(SCRAPE_WAIT_MS);
    loop {
        let page = scrape(http).await;
        if ready(&page) {
            return page;
        }
        assert!(Instant::now() < deadline, "{what}; last /metrics:\n{page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn account_with_grant(admin: &mut Admin, account: &str, amount: &str) {
    admin
        .create_account(pb::CreateAccountRequest {
            idempotency_key: format!("a-{account}"),
            account_id: account.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .issue_grant(pb::IssueGrantRequest {
            idempotency_key: format!("g-{account}"),
            account_id: account.into(),
            grant_id: "bought".into(),
            amount: amount.into(),
            source: pb::GrantSource::Purchase.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

pub fn chat(account: &str, key: &str, calls: &str) -> DebitRequest {
    DebitRequest {
        account: AccountId::new(account).unwrap(),
        key: IdempotencyKey::new(key).unwrap(),
        feature: FeatureKey::new("chat").unwrap(),
        spend: Spend::Quantity(Quantity::parse(calls).unwrap()),
        actor: None,
        mode: None,
        event_time: None,
    }
}
