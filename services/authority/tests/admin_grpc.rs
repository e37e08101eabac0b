//! The Admin service through a real server on 127.0.0.1:0 and a real client: authentication,
//! scopes, bad input that writes nothing, refusals as typed outcomes, health and reflection.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tollgate_authority_service::admin::SystemClock;
use tollgate_authority_service::auth::{key_digest, KeyEntry, KeyRing, Scope};
use tollgate_ledger::{LedgerStore, PostgresLedger, SqliteLedger};
use tollgate_proto::pb;
use tollgate_proto::pb::admin_client::AdminClient;
use tollgate_testkit::postgres::PostgresServer;
use tonic::transport::Channel;
use tonic::{Code, Request};

const ADMIN_KEY: &str = "admin-secret";
const READ_KEY: &str = "read-secret";
/// A second admin key, so the audit can tell who did what.
const BILLING_KEY: &str = "billing-secret";

/// Row counts straight from the tables, to prove a refused request wrote nothing.
enum Tables {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl Tables {
    async fn counts(&self) -> Vec<i64> {
        let mut counts = Vec::new();
        for table in [
            "accounts",
            "grants",
            "debits",
            "ledger_entries",
            "idempotency",
        ] {
            let sql = format!("SELECT COUNT(*) FROM {table}");
            let count: i64 = match self {
                Tables::Postgres(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await,
                Tables::Sqlite(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await,
            }
            .expect("count rows");
            counts.push(count);
        }
        counts
    }
}

struct Authority {
    address: String,
    tables: Tables,
    stop: Option<oneshot::Sender<()>>,
    _postgres: Option<PostgresServer>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Authority {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start(store: Arc<dyn LedgerStore>, tables: Tables, state_url: &str) -> Authority {
    let state = tollgate_authority::StateStore::connect(state_url)
        .await
        .expect("open the authority's state");
    let keys = KeyRing::new(vec![
        KeyEntry {
            name: "ops".into(),
            digest: key_digest(ADMIN_KEY),
            scope: Scope::Admin,
        },
        KeyEntry {
            name: "billing".into(),
            digest: key_digest(BILLING_KEY),
            scope: Scope::Admin,
        },
        KeyEntry {
            name: "support".into(),
            digest: key_digest(READ_KEY),
            scope: Scope::Read,
        },
    ]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(tollgate_authority_service::server::serve(
        listener,
        store,
        state,
        Arc::new(keys),
        Arc::new(SystemClock),
        None,
        async {
            let _ = stopped.await;
        },
    ));
    Authority {
        address,
        tables,
        stop: Some(stop),
        _postgres: None,
        _dir: None,
    }
}

async fn on_sqlite() -> Authority {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteLedger::open(&dir.path().join("ledger.db"))
        .await
        .unwrap();
    let tables = Tables::Sqlite(store.pool().clone());
    let state_url = format!("sqlite://{}", dir.path().join("authority.db").display());
    let mut authority = start(Arc::new(store), tables, &state_url).await;
    authority._dir = Some(dir);
    authority
}

async fn on_postgres() -> Authority {
    let server = PostgresServer::start().expect("start an ephemeral PostgreSQL");
    let store = PostgresLedger::connect(&server.url()).await.unwrap();
    let tables = Tables::Postgres(store.pool().clone());
    let mut authority = start(Arc::new(store), tables, &server.url()).await;
    authority._postgres = Some(server);
    authority
}

async fn client(authority: &Authority) -> AdminClient<Channel> {
    AdminClient::connect(authority.address.clone())
        .await
        .expect("connect")
}

fn with_key<T>(message: T, key: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        let value = format!("Bearer {key}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

fn admin<T>(message: T) -> Request<T> {
    with_key(message, Some(ADMIN_KEY))
}

fn create_account(id: &str, key: &str) -> pb::CreateAccountRequest {
    pb::CreateAccountRequest {
        idempotency_key: key.into(),
        account_id: id.into(),
        overdraft_limit: String::new(),
        metadata: Default::default(),
    }
}

fn issue(account: &str, grant: &str, amount: &str, key: &str) -> pb::IssueGrantRequest {
    pb::IssueGrantRequest {
        idempotency_key: key.into(),
        account_id: account.into(),
        grant_id: grant.into(),
        amount: amount.into(),
        source: pb::GrantSource::Purchase.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn admin_calls_need_a_key_with_the_right_scope() {
    let authority = on_sqlite().await;
    let mut client = client(&authority).await;

    let status = client
        .create_account(with_key(create_account("acme", "k1"), None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let status = client
        .create_account(with_key(create_account("acme", "k1"), Some("wrong")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let status = client
        .create_account(with_key(create_account("acme", "k1"), Some(READ_KEY)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(authority.tables.counts().await, vec![0, 0, 0, 0, 0]);

    let created = client
        .create_account(admin(create_account("acme", "k1")))
        .await
        .expect("an admin key may create")
        .into_inner();
    assert_eq!(created.account.unwrap().account_id, "acme");

    // A read key reads.
    let balance = client
        .get_balance(with_key(
            pb::AdminGetBalanceRequest {
                account_id: "acme".into(),
            },
            Some(READ_KEY),
        ))
        .await
        .expect("a read key may read")
        .into_inner();
    assert_eq!(balance.balance.unwrap().balance, "0");
    // This authority serves the ledger alone: it says it read no region's holds rather than
    // counting none.
    assert_eq!(balance.held, "0");
    assert_eq!(balance.holds_unread.len(), 1, "{:?}", balance.holds_unread);
    assert!(
        balance.holds_unread[0].starts_with("every region: "),
        "{:?}",
        balance.holds_unread
    );
    let status = client
        .get_balance(with_key(
            pb::AdminGetBalanceRequest {
                account_id: "acme".into(),
            },
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

async fn bad_input_writes_nothing(authority: Authority) {
    let mut client = client(&authority).await;
    client
        .create_account(admin(create_account("acme", "k-acme")))
        .await
        .unwrap();
    client
        .issue_grant(admin(issue("acme", "g1", "10", "k-g1")))
        .await
        .unwrap();
    let before = authority.tables.counts().await;
    assert_eq!(before, vec![1, 1, 0, 1, 2]);

    let cases: Vec<(pb::IssueGrantRequest, Code, &str)> = vec![
        (
            issue("acme", "g2", "-5", "k2"),
            Code::InvalidArgument,
            "amount: must not be negative",
        ),
        (
            issue("acme", "g2", "1.0000001", "k2"),
            Code::InvalidArgument,
            "amount: 7 decimals, at most 6 allowed",
        ),
        (
            issue("acme", "g2", "1e3", "k2"),
            Code::InvalidArgument,
            "amount: ",
        ),
        (
            issue("", "g2", "1", "k2"),
            Code::InvalidArgument,
            "account_id: must not be empty",
        ),
        (
            issue(&"a".repeat(129), "g2", "1", "k2"),
            Code::InvalidArgument,
            "account_id: 129 bytes, at most 128 allowed",
        ),
        (
            issue("acme", "", "1", "k2"),
            Code::InvalidArgument,
            "grant_id: must not be empty",
        ),
        (
            issue("acme", "g2", "1", ""),
            Code::InvalidArgument,
            "idempotency_key: must not be empty",
        ),
        (
            issue("acme", "g2", "1", &"k".repeat(129)),
            Code::InvalidArgument,
            "idempotency_key: 129 bytes",
        ),
        (
            issue("nobody", "g2", "1", "k2"),
            Code::NotFound,
            "account nobody does not exist",
        ),
    ];
    for (request, code, message) in cases {
        let status = client.issue_grant(admin(request)).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().starts_with(message), "{status:?}");
    }
    let mut oversized = issue("acme", "g2", "1", "k2");
    oversized.metadata.insert("note".into(), "x".repeat(5_000));
    let status = client.issue_grant(admin(oversized)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("metadata: "), "{status:?}");

    let status = client
        .create_account(admin(create_account("bad id!", "k3")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("account_id: "), "{status:?}");
    let refund = pb::RefundRequest {
        idempotency_key: "k4".into(),
        account_id: "acme".into(),
        debit_id: "never-debited".into(),
        amount: "1".into(),
        ..Default::default()
    };
    let status = client.refund(admin(refund)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client
        .void_grant(admin(pb::VoidGrantRequest {
            idempotency_key: "k5".into(),
            account_id: "acme".into(),
            grant_id: "ghost".into(),
            memo: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    assert_eq!(
        authority.tables.counts().await,
        before,
        "bad input wrote nothing"
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_writes_nothing_on_sqlite() {
    bad_input_writes_nothing(on_sqlite().await).await;
}

#[tokio::test]
async fn bad_input_is_refused_and_writes_nothing_on_postgres() {
    bad_input_writes_nothing(on_postgres().await).await;
}

#[tokio::test]
async fn refusals_are_typed_outcomes_and_replays_return_the_first_result() {
    let authority = on_sqlite().await;
    let mut client = client(&authority).await;
    client
        .create_account(admin(create_account("acme", "k-acme")))
        .await
        .unwrap();
    let first = client
        .issue_grant(admin(issue("acme", "g1", "10", "k-g1")))
        .await
        .unwrap()
        .into_inner();
    let replay = client
        .issue_grant(admin(issue("acme", "g1", "10", "k-g1")))
        .await
        .unwrap()
        .into_inner();
    let (
        Some(pb::mutation_reply::Outcome::Done(first)),
        Some(pb::mutation_reply::Outcome::Done(replay)),
    ) = (first.outcome, replay.outcome)
    else {
        panic!("both issued");
    };
    assert!(!first.replayed && replay.replayed);
    assert_eq!(first.balance_after, "10");
    assert_eq!(replay.first_seq, first.first_seq);
    let status = client
        .issue_grant(admin(issue("acme", "g1", "11", "k-g1")))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::AlreadyExists,
        "same key, different request"
    );

    let expire = pb::ExpireGrantRequest {
        idempotency_key: "k-expire".into(),
        account_id: "acme".into(),
        grant_id: "g1".into(),
        memo: String::new(),
    };
    let reply = client
        .expire_grant(admin(expire))
        .await
        .unwrap()
        .into_inner();
    match reply.outcome {
        Some(pb::mutation_reply::Outcome::Refused(refusal)) => {
            assert_eq!(refusal.code(), pb::RefusalCode::GrantNotYetExpired);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let entries = client
        .list_entries(with_key(
            pb::ListEntriesRequest {
                account_id: "acme".into(),
                ..Default::default()
            },
            Some(READ_KEY),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(entries.entries.len(), 1);
    assert_eq!(entries.entries[0].kind(), pb::EntryKind::Grant);
    assert_eq!(entries.entries[0].hash.len(), 64);
    let verify = client
        .verify(with_key(pb::VerifyRequest::default(), Some(READ_KEY)))
        .await
        .unwrap()
        .into_inner();
    assert!(verify.ok, "{verify:?}");
    assert_eq!(verify.entries_checked, 1);
}

#[tokio::test]
async fn health_and_reflection_answer_without_a_key() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let authority = on_sqlite().await;
    let channel = Channel::from_shared(authority.address.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let serving = health
        .check(HealthCheckRequest {
            service: "tollgate.v1.Admin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status, 1, "SERVING");

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"tollgate.v1.Admin".to_owned()), "{names:?}");
    assert!(
        names.contains(&"tollgate.v1.Enforcement".to_owned()),
        "{names:?}"
    );
}

fn list_audit(account: &str) -> pb::ListAuditRecordsRequest {
    pb::ListAuditRecordsRequest {
        account_id: account.into(),
        ..Default::default()
    }
}

/// (key name, method, account, idempotency key, outcome) of every audit record.
async fn audit_trail(
    client: &mut AdminClient<Channel>,
    account: &str,
) -> Vec<(String, String, String, String, String)> {
    let mut trail = Vec::new();
    let mut request = list_audit(account);
    request.page_size = 2;
    // Bounded: a page of 2 at a time, far fewer records than pages allowed.
    for _ in 0..50 {
        let reply = client
            .list_audit_records(admin(request.clone()))
            .await
            .unwrap()
            .into_inner();
        for record in reply.records {
            assert!(record.recorded_at.is_some());
            trail.push((
                record.key_name,
                record.method,
                record.account_id,
                record.idempotency_key,
                record.outcome,
            ));
        }
        if reply.next_page_token.is_empty() {
            return trail;
        }
        request.page_token = reply.next_page_token;
    }
    panic!("the audit did not end within 50 pages");
}

async fn changes_are_recorded_with_the_key_that_made_them(authority: Authority) {
    let mut client = client(&authority).await;
    fn ops<T>(message: T) -> Request<T> {
        with_key(message, Some(ADMIN_KEY))
    }
    fn billing<T>(message: T) -> Request<T> {
        with_key(message, Some(BILLING_KEY))
    }
    fn support<T>(message: T) -> Request<T> {
        with_key(message, Some(READ_KEY))
    }
    client
        .create_account(ops(create_account("acme", "c-acme")))
        .await
        .unwrap();
    client
        .create_account(billing(create_account("globex", "c-globex")))
        .await
        .unwrap();
    client
        .issue_grant(billing(issue("acme", "g1", "10", "i-acme")))
        .await
        .unwrap();
    // A replay changes nothing but is still a call the key made: recorded again.
    client
        .issue_grant(billing(issue("acme", "g1", "10", "i-acme")))
        .await
        .unwrap();
    // Refused by scope: recorded as a refusal, and nothing changes.
    let before = authority.tables.counts().await;
    let refused = client
        .issue_grant(support(issue("acme", "g2", "5", "i-support")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    // Failed (bad input): nothing changed, nothing recorded.
    let failed = client
        .issue_grant(ops(issue("acme", "g3", "-5", "i-bad")))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::InvalidArgument);
    // Without a key: nobody to record it against.
    let anonymous = client
        .issue_grant(with_key(issue("acme", "g4", "5", "i-anon"), None))
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    assert_eq!(authority.tables.counts().await, before);
    // Reads are not recorded.
    client
        .get_account(ops(pb::GetAccountRequest {
            account_id: "acme".into(),
        }))
        .await
        .unwrap();

    let row = |key: &str, method: &str, account: &str, idempotency: &str, outcome: &str| {
        (
            key.to_owned(),
            method.to_owned(),
            account.to_owned(),
            idempotency.to_owned(),
            outcome.to_owned(),
        )
    };
    assert_eq!(
        audit_trail(&mut client, "").await,
        vec![
            row("ops", "CreateAccount", "acme", "c-acme", "done"),
            row("billing", "CreateAccount", "globex", "c-globex", "done"),
            row("billing", "IssueGrant", "acme", "i-acme", "done"),
            row("billing", "IssueGrant", "acme", "i-acme", "done"),
            row("support", "IssueGrant", "acme", "i-support", "refused"),
        ]
    );
    let globex = audit_trail(&mut client, "globex").await;
    assert_eq!(
        globex,
        vec![row(
            "billing",
            "CreateAccount",
            "globex",
            "c-globex",
            "done"
        )]
    );
    // Who changed what is for administrators only.
    let denied = client
        .list_audit_records(support(list_audit("")))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let bad = client
        .list_audit_records(ops(pb::ListAuditRecordsRequest {
            page_token: "nope".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("page_token"), "{}", bad.message());
}

#[tokio::test]
async fn changes_are_recorded_with_the_key_that_made_them_on_sqlite() {
    changes_are_recorded_with_the_key_that_made_them(on_sqlite().await).await;
}

#[tokio::test]
async fn changes_are_recorded_with_the_key_that_made_them_on_postgres() {
    changes_are_recorded_with_the_key_that_made_them(on_postgres().await).await;
}

#[tokio::test]
async fn an_oversized_request_is_refused_and_changes_nothing() {
    let authority = on_sqlite().await;
    let mut client = client(&authority)
        .await
        // The client would refuse to send it otherwise; the server is what is tested.
        .max_encoding_message_size(8 * 1024 * 1024);
    let before = authority.tables.counts().await;
    let oversized = tollgate_authority_service::server::REQUEST_BYTES_MAX + 1;
    let mut request = create_account("acme", "c-big");
    request
        .metadata
        .insert("padding".into(), "x".repeat(oversized));
    let refused = client.create_account(admin(request)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let mut read = pb::GetAccountRequest {
        account_id: "x".repeat(oversized),
    };
    let refused = client.get_account(admin(read.clone())).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(authority.tables.counts().await, before);
    assert!(audit_trail(&mut client, "").await.is_empty());
    // Just under the limit is read (and refused for what it says, not for its size).
    read.account_id = "x".repeat(1024);
    let small = client.get_account(admin(read)).await.unwrap_err();
    assert_eq!(small.code(), Code::InvalidArgument, "{small:?}");
}
