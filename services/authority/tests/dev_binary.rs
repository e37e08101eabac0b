//! The real `tollgate-authority dev` binary, started by the test as a process of its own on a
//! data directory of its own: extra keys with chosen scopes, and restarts (SIGTERM, then
//! SIGKILL) after which the account spends the ledger's credits in burn-down order.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tollgate_proto::pb;
use tollgate_testkit::process::free_port;
use tonic::transport::Channel;
use tonic::Code;

/// The development key (every scope).
const DEV_KEY: &str = "dev-binary-test-key";
/// A key with the `enforce` scope only, given in clear.
const GATEWAY_KEY: &str = "gateway-secret-0123456789";
/// A key with the `read` scope only, given in a `--keys` file by its digest.
const SUPPORT_KEY: &str = "support-secret-0123456789";
/// Bounded waits: to listen, to stop, to reconcile (the node reconciles every 200 ms).
const START_WITHIN_MS: u64 = 30_000;
const STOP_WITHIN_MS: u64 = 20_000;
const RECONCILED_WITHIN_MS: u64 = 30_000;
const POLL_MS: u64 = 50;

/// One run of the binary; dropping it kills exactly that process.
struct DevProcess {
    child: Child,
    channel: Channel,
    log: PathBuf,
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `tollgate-authority dev` on `data` with free ports; its log goes to `log`.
fn spawn(data: &Path, log: &Path, env: &[(&str, &str)], args: &[&str]) -> (Child, String) {
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let http = format!("127.0.0.1:{}", free_port().unwrap());
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate-authority"));
    command
        .args(["dev", "--listen", &listen, "--http-listen", &http, "--data"])
        .arg(data)
        .args(args)
        .env("TOLLGATE_DEV_API_KEY", DEV_KEY)
        .env_remove("TOLLGATE_DEV_EXTRA_KEYS")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (name, value) in env {
        command.env(name, value);
    }
    (command.spawn().unwrap(), listen)
}

impl DevProcess {
    async fn start(data: &Path, env: &[(&str, &str)], args: &[&str]) -> DevProcess {
        let log = data.with_extension("log");
        let (mut child, listen) = spawn(data, &log, env, args);
        let deadline = Instant::now() + Duration::from_millis(START_WITHIN_MS);
        loop {
            if let Ok(channel) = Channel::from_shared(format!("http://{listen}"))
                .unwrap()
                .connect()
                .await
            {
                return DevProcess {
                    child,
                    channel,
                    log,
                };
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("dev exited with {status}: {}", read(&log));
            }
            assert!(Instant::now() < deadline, "dev did not listen");
            tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
        }
    }

    /// SIGTERM, and the exit status once the node has drained and reconciled.
    async fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_millis(STOP_WITHIN_MS);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "dev did not stop after SIGTERM: {}",
                read(&self.log)
            );
            tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
        }
    }

    /// SIGKILL: nothing is flushed nor reconciled on the way out.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn admin(&self) -> pb::admin_client::AdminClient<Channel> {
        pb::admin_client::AdminClient::new(self.channel.clone())
    }

    fn edge(&self) -> pb::enforcement_client::EnforcementClient<Channel> {
        pb::enforcement_client::EnforcementClient::new(self.channel.clone())
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

/// `chat` at one credit per message.
async fn define_chat(node: &DevProcess) {
    let mut admin = node.admin();
    admin
        .define_feature(with_key(
            pb::DefineFeatureRequest {
                idempotency_key: "f1".into(),
                feature: Some(pb::Feature {
                    feature: "chat".into(),
                    unit: "message".into(),
                    description: String::new(),
                }),
            },
            DEV_KEY,
        ))
        .await
        .unwrap();
    admin
        .publish_price_book_version(with_key(
            pb::PublishPriceBookVersionRequest {
                idempotency_key: "p1".into(),
                version: Some(pb::PriceBookVersion {
                    version: 1,
                    effective_from: Some(prost_types::Timestamp {
                        seconds: 0,
                        nanos: 0,
                    }),
                    default_rates: Some(pb::RateTable {
                        rates: [("chat".to_owned(), "1".to_owned())].into(),
                    }),
                    ..pb::PriceBookVersion::default()
                }),
            },
            DEV_KEY,
        ))
        .await
        .unwrap();
}

/// An account with grants of (id, credits, source), each at its source's default priority.
async fn account_with(node: &DevProcess, account: &str, grants: &[(&str, &str, pb::GrantSource)]) {
    let mut admin = node.admin();
    admin
        .create_account(with_key(
            pb::CreateAccountRequest {
                idempotency_key: format!("create-{account}"),
                account_id: account.into(),
                ..pb::CreateAccountRequest::default()
            },
            DEV_KEY,
        ))
        .await
        .unwrap();
    for (grant, amount, source) in grants {
        admin
            .issue_grant(with_key(
                pb::IssueGrantRequest {
                    idempotency_key: format!("grant-{account}-{grant}"),
                    account_id: account.into(),
                    grant_id: (*grant).into(),
                    amount: (*amount).into(),
                    source: (*source).into(),
                    ..pb::IssueGrantRequest::default()
                },
                DEV_KEY,
            ))
            .await
            .unwrap();
    }
}

fn chat(key: &str, account: &str, messages: &str) -> pb::DebitRequest {
    pb::DebitRequest {
        idempotency_key: key.into(),
        account_id: account.into(),
        usage: Some(pb::Usage {
            feature: "chat".into(),
            amount: Some(pb::usage::Amount::Quantity(messages.into())),
        }),
        ..pb::DebitRequest::default()
    }
}

/// The debit's draws (grant, credits), or a panic naming the refusal.
async fn debited(node: &DevProcess, request: pb::DebitRequest) -> Vec<(String, String)> {
    let reply = node
        .edge()
        .debit(with_key(request, DEV_KEY))
        .await
        .unwrap()
        .into_inner();
    match reply.outcome {
        Some(pb::debit_reply::Outcome::Debited(debited)) => debited
            .draws
            .into_iter()
            .map(|d| (d.grant_id, d.amount))
            .collect(),
        other => panic!("expected a debit, got {other:?}"),
    }
}

/// Waits (bounded) until the ledger's balance of `account` is `balance`.
async fn reconciled_to(node: &DevProcess, account: &str, balance: &str) {
    let deadline = Instant::now() + Duration::from_millis(RECONCILED_WITHIN_MS);
    let mut admin = node.admin();
    loop {
        let reply = admin
            .get_balance(with_key(
                pb::AdminGetBalanceRequest {
                    account_id: account.into(),
                },
                DEV_KEY,
            ))
            .await
            .unwrap()
            .into_inner();
        let seen = reply.balance.unwrap().balance;
        if seen == balance {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{account}: the ledger says {seen}, expected {balance}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the ledger's debit entries took from each grant of `account`.
async fn debited_per_grant(node: &DevProcess, account: &str) -> Vec<(String, String)> {
    let reply = node
        .admin()
        .list_grants(with_key(
            pb::ListGrantsRequest {
                account_id: account.into(),
                ..pb::ListGrantsRequest::default()
            },
            DEV_KEY,
        ))
        .await
        .unwrap()
        .into_inner();
    let entries = node
        .admin()
        .list_entries(with_key(
            pb::ListEntriesRequest {
                account_id: account.into(),
                kinds: vec![pb::EntryKind::Debit.into()],
                ..pb::ListEntriesRequest::default()
            },
            DEV_KEY,
        ))
        .await
        .unwrap()
        .into_inner();
    reply
        .grants
        .iter()
        .map(|grant| {
            let taken = entries
                .entries
                .iter()
                .filter(|entry| entry.grant_id == grant.grant_id)
                .map(|entry| rust_decimal::Decimal::from_str_exact(&entry.amount).unwrap())
                .sum::<rust_decimal::Decimal>();
            (grant.grant_id.clone(), taken.normalize().to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enforce_only_key_can_debit_but_is_refused_admin_calls_on_the_dev_node() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    std::fs::write(
        &keys_file,
        format!(
            "[[api_keys]]\nname = \"support\"\nsha256 = \"{}\"\nscope = \"read\"\n",
            hex::encode(tollgate_serve::auth::key_digest(SUPPORT_KEY))
        ),
    )
    .unwrap();
    let extra = format!("gateway:enforce:{GATEWAY_KEY}");
    let node = DevProcess::start(
        &dir.path().join("data"),
        &[("TOLLGATE_DEV_EXTRA_KEYS", &extra)],
        &["--keys", keys_file.to_str().unwrap()],
    )
    .await;
    define_chat(&node).await;
    account_with(&node, "acme", &[("welcome", "100", pb::GrantSource::Promo)]).await;

    let reply = node
        .edge()
        .debit(with_key(chat("d1", "acme", "3"), GATEWAY_KEY))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(reply.outcome, Some(pb::debit_reply::Outcome::Debited(_))),
        "{reply:?}"
    );
    let mut admin = node.admin();
    let balance = || pb::AdminGetBalanceRequest {
        account_id: "acme".into(),
    };
    let refused = admin
        .get_balance(with_key(balance(), GATEWAY_KEY))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let grant = pb::IssueGrantRequest {
        idempotency_key: "g2".into(),
        account_id: "acme".into(),
        grant_id: "more".into(),
        amount: "5".into(),
        source: pb::GrantSource::Promo.into(),
        ..pb::IssueGrantRequest::default()
    };
    let refused = admin
        .issue_grant(with_key(grant.clone(), GATEWAY_KEY))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // The file's read key reads, and may neither spend nor change anything.
    admin
        .get_balance(with_key(balance(), SUPPORT_KEY))
        .await
        .unwrap();
    let refused = admin
        .issue_grant(with_key(grant, SUPPORT_KEY))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = node
        .edge()
        .debit(with_key(chat("d2", "acme", "1"), SUPPORT_KEY))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert_eq!(node.terminate().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_extra_key_stops_the_dev_node_naming_the_variable_and_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("dev.log");
    let extra = format!("gateway:enforce:{GATEWAY_KEY},support:reed:{SUPPORT_KEY}");
    let (mut child, _) = spawn(&data, &log, &[("TOLLGATE_DEV_EXTRA_KEYS", &extra)], &[]);
    let deadline = Instant::now() + Duration::from_millis(START_WITHIN_MS);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "dev started with a bad key");
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    };
    assert!(!status.success());
    let log = read(&log);
    assert!(
        log.contains("TOLLGATE_DEV_EXTRA_KEYS: entry 2 (\"support\"): unknown scope \"reed\""),
        "{log}"
    );
    assert!(
        !log.contains(SUPPORT_KEY),
        "the secret never reaches the log"
    );
}

/// The region lives in memory: a restart empties it while the authority's counters still said
/// it held credits. After SIGTERM (which reconciles on the way out) the account's next spend
/// is allowed and burns the promo (priority 30) before the purchase (priority 50); after
/// SIGKILL what the account can spend is exactly what the ledger says it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_dev_node_spends_the_ledgers_credits_in_burn_down_order() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = DevProcess::start(&data, &[], &[]).await;
    define_chat(&node).await;
    account_with(
        &node,
        "acme",
        &[
            ("promo", "10", pb::GrantSource::Promo),
            ("bought", "100", pb::GrantSource::Purchase),
        ],
    )
    .await;
    account_with(&node, "solo", &[("trial", "10", pb::GrantSource::Promo)]).await;
    assert_eq!(
        debited(&node, chat("d1", "acme", "3")).await,
        vec![("promo".to_owned(), "3".to_owned())]
    );
    reconciled_to(&node, "acme", "107").await;
    assert_eq!(node.terminate().await.code(), Some(0));

    let node = DevProcess::start(&data, &[], &[]).await;
    assert_eq!(
        debited(&node, chat("d2", "acme", "8")).await,
        vec![
            ("promo".to_owned(), "7".to_owned()),
            ("bought".to_owned(), "1".to_owned())
        ],
        "the promo's rest burns before the purchase"
    );
    reconciled_to(&node, "acme", "99").await;
    assert_eq!(
        debited_per_grant(&node, "acme").await,
        vec![
            ("bought".to_owned(), "1".to_owned()),
            ("promo".to_owned(), "10".to_owned())
        ]
    );
    // The region now holds the rest of solo's trial, reconciled: the ledger says 6 are left.
    debited(&node, chat("s1", "solo", "4")).await;
    reconciled_to(&node, "solo", "6").await;
    node.kill();

    // Killed: nothing was flushed nor reconciled on the way out, and the region is gone.
    let node = DevProcess::start(&data, &[], &[]).await;
    debited(&node, chat("s2", "solo", "6")).await;
    let reply = node
        .edge()
        .debit(with_key(chat("s3", "solo", "0.000001"), DEV_KEY))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(reply.outcome, Some(pb::debit_reply::Outcome::Refused(ref r)) if r.code == pb::RefusalCode::InsufficientCredits as i32),
        "the ledger's 6 credits and no more: {reply:?}"
    );
    reconciled_to(&node, "solo", "0").await;
    assert_eq!(node.terminate().await.code(), Some(0));
}
