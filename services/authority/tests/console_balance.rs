//! The console and the widget show the account's balance — its grants effective and unexpired
//! now, less holds in flight, less debt: the figure an edge's `GetBalance` answers — never the
//! ledger's sum of every open grant nor what a region holds. Grants not effective yet say when
//! they start; grants past their expiry that the expiry run has not closed yet are listed as
//! such, not as "expiring".
//!
//! Two setups over plain HTTP: the console over a SQLite ledger with a manual clock (time moves
//! past an expiry without the lifecycle closing the grant), and the embedded dev node with its
//! region (a hold in flight and a reconciled debit, compared with the edge's answer).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::grpc::{
    chat_at_one_credit, cost, create_account, debit, debited, edge_balance, ledger_balance, Admin,
};
use common::http_client::call;
use tollgate_authority::ManualClock;
use tollgate_authority_service::admin::AdminService;
use tollgate_authority_service::console::Console;
use tollgate_core::{RegionId, Timestamp};
use tollgate_proto::pb;
use tollgate_proto::pb::admin_server::Admin as _;
use tollgate_serve::auth::{key_digest, KeyEntry, KeyRing, Scope};

const ADMIN_KEY: &str = "console-balance-admin-key";
/// Bounded polls for the dev node's background loop to reconcile (it runs every 200 ms).
const RECONCILE_POLLS_MAX: u32 = 300;
const RECONCILE_POLL_STEP_MS: u64 = 100;
const HOUR_MS: i64 = 60 * 60 * 1_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// 2026-01-10T00:00:00Z.
const T0_MS: i64 = 1_768_003_200_000;

/// The session cookie (`name=value`) a response sets.
fn session_cookie(headers: &http::HeaderMap) -> String {
    let set = headers["set-cookie"].to_str().unwrap();
    set.split(';').next().unwrap().to_owned()
}

/// Signs in with `key` and answers the session cookie.
async fn sign_in(base: &str, key: &str) -> String {
    let (status, headers, page) = call("GET", &format!("{base}/console/login"), &[], "").await;
    assert_eq!(status, 200, "{page}");
    let cookie = session_cookie(&headers);
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the sign-in form's csrf token")
        .to_owned();
    let (status, headers, page) = call(
        "POST",
        &format!("{base}/console/login"),
        &[
            ("cookie", &cookie),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        &format!("csrf={csrf}&key={key}"),
    )
    .await;
    assert_eq!(status, 303, "signed in: {page}");
    session_cookie(&headers)
}

async fn page(base: &str, path: &str, cookie: &str) -> String {
    let (status, _, page) = call("GET", &format!("{base}{path}"), &[("cookie", cookie)], "").await;
    assert_eq!(status, 200, "{path}: {page}");
    page
}

/// The text of the element with this id, up to the end of its tag (`</b>`, `</dd>`, `</p>`,
/// `</table>`).
fn element<'a>(page: &'a str, id: &str) -> &'a str {
    let start = page
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {page}"));
    let rest = &page[start..];
    let rest = &rest[rest.find('>').unwrap() + 1..];
    let end = ["</b>", "</dd>", "</p>", "</table>", "</div>"]
        .iter()
        .filter_map(|tag| rest.find(tag))
        .min()
        .unwrap();
    &rest[..end]
}

fn at(millis: i64) -> prost_types::Timestamp {
    tollgate_proto::decode::timestamp_to_pb(Timestamp::from_millis(millis).unwrap())
}

fn grant(
    grant_id: &str,
    amount: &str,
    effective_ms: i64,
    expires_ms: Option<i64>,
) -> pb::IssueGrantRequest {
    pb::IssueGrantRequest {
        idempotency_key: format!("grant.{grant_id}"),
        account_id: "acme".into(),
        grant_id: grant_id.into(),
        amount: amount.into(),
        source: pb::GrantSource::Purchase.into(),
        effective_at: Some(at(effective_ms)),
        expires_at: expires_ms.map(at),
        ..pb::IssueGrantRequest::default()
    }
}

/// The console alone over a SQLite ledger, with a clock the test moves; no region.
struct Quiet {
    base: String,
    console: Arc<Console>,
    admin: AdminService,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

impl Quiet {
    async fn start() -> Quiet {
        let dir = tempfile::tempdir().unwrap();
        let ledger: Arc<dyn tollgate_ledger::LedgerStore> = Arc::new(
            tollgate_ledger::SqliteLedger::open(&dir.path().join("ledger.db"))
                .await
                .unwrap(),
        );
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(T0_MS).unwrap()));
        let keys = Arc::new(KeyRing::new(vec![KeyEntry {
            name: "support".into(),
            digest: key_digest(ADMIN_KEY),
            scope: Scope::Admin,
        }]));
        let console = Arc::new(
            Console::new(
                AdminService::new(Arc::clone(&ledger), clock.clone()),
                Arc::clone(&ledger),
                None,
                clock.clone(),
                keys,
                vec![RegionId::new("local").unwrap()],
            )
            .unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let router = Arc::clone(&console).router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        Quiet {
            base,
            console,
            admin: AdminService::new(ledger, clock.clone()),
            clock,
            _dir: dir,
        }
    }
}

/// The account `acme` with 10 credits spendable, 50 starting tomorrow, 7 expiring in an hour
/// and 3 in five days; then two hours pass. "lapsing" is past its expiry, and nothing runs the
/// expiry here, so it stays open in the ledger with its 7 credits. Answers the session cookie.
async fn acme_two_hours_on(quiet: &Quiet) -> String {
    let admin = &quiet.admin;
    admin
        .create_account(tonic::Request::new(pb::CreateAccountRequest {
            idempotency_key: "account.acme".into(),
            account_id: "acme".into(),
            ..pb::CreateAccountRequest::default()
        }))
        .await
        .unwrap();
    for request in [
        grant("spendable", "10", T0_MS - DAY_MS, None),
        grant("tomorrow", "50", T0_MS + DAY_MS, None),
        grant("lapsing", "7", T0_MS - DAY_MS, Some(T0_MS + HOUR_MS)),
        grant("next-week", "3", T0_MS - DAY_MS, Some(T0_MS + 5 * DAY_MS)),
    ] {
        admin
            .issue_grant(tonic::Request::new(request))
            .await
            .unwrap();
    }
    quiet.clock.advance_ms(2 * HOUR_MS);
    sign_in(&quiet.base, ADMIN_KEY).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_not_effective_yet_or_past_expiry_are_named_and_never_counted() {
    let quiet = Quiet::start().await;
    let cookie = acme_two_hours_on(&quiet).await;
    let base = &quiet.base;

    // The account: 10 + 3 are spendable; 50 start tomorrow, 7 expired. The ledger's sum of
    // open grants is 70, and that is not the balance.
    let account = page(base, "/console/accounts/acme", &cookie).await;
    assert_eq!(element(&account, "balance"), "13");
    let grants = element(&account, "grants");
    assert!(
        grants.contains("open, starts 2026-01-11 00:00 UTC"),
        "{grants}"
    );
    assert!(
        grants.contains("expired 2026-01-10 01:00 UTC, awaiting the expiry run"),
        "{grants}"
    );
    let terms = element(&account, "balance-terms");
    assert!(
        terms.contains("50 credits of grants not effective yet"),
        "{terms}"
    );
    assert!(
        terms.contains("7 credits of grants past their expiry"),
        "{terms}"
    );
    let per_scope = element(&account, "per-scope");
    assert!(per_scope.contains(">13<"), "{per_scope}");
    let found = page(base, "/console/accounts?q=ac", &cookie).await;
    assert!(element(&found, "accounts").contains(">13<"), "{found}");

    // The widget tells the same balance, and when the next grant starts.
    let (token, _) = quiet.console.mint_widget_token("acme", Some(600)).unwrap();
    let widget = page(base, &format!("/widget?token={token}"), "").await;
    assert_eq!(element(&widget, "widget-balance"), "13");
    let upcoming = element(&widget, "widget-upcoming");
    assert!(
        upcoming.contains("50 credits, starts 2026-01-11 00:00 UTC"),
        "{upcoming}"
    );
    // What expires next is in the balance: the lapsed grant is not news.
    let expiry = element(&widget, "widget-expiry");
    assert!(expiry.starts_with("3 credits on 2026-01-15"), "{expiry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_past_its_expiry_is_not_expiring_but_awaits_the_expiry_run() {
    let quiet = Quiet::start().await;
    let cookie = acme_two_hours_on(&quiet).await;

    let home = page(&quiet.base, "/console?below=20", &cookie).await;
    let expiring = element(&home, "expiring-soon");
    assert!(expiring.contains("next-week"), "{expiring}");
    assert!(!expiring.contains("lapsing"), "{expiring}");
    let lapsed = element(&home, "expired-awaiting");
    assert!(lapsed.contains("lapsing"), "{lapsed}");
    assert!(!lapsed.contains("next-week"), "{lapsed}");
    assert!(
        lapsed.contains("expired 2026-01-10 01:00 UTC, awaiting the expiry run"),
        "{lapsed}"
    );
    // The account is under 20 by its balance (13), whatever the ledger's sum (70).
    let low = element(&home, "low-balance");
    assert!(low.contains(">acme<") && low.contains(">13<"), "{low}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_get_balance_tells_the_consoles_balance_and_names_the_lapsed_grant() {
    let quiet = Quiet::start().await;
    let cookie = acme_two_hours_on(&quiet).await;
    let account = page(&quiet.base, "/console/accounts/acme", &cookie).await;

    let told = quiet
        .admin
        .get_balance(tonic::Request::new(pb::AdminGetBalanceRequest {
            account_id: "acme".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(told.balance.as_ref().unwrap().balance, "13", "{told:?}");
    assert_eq!(element(&account, "balance"), "13");
    assert_eq!(told.ledger_balance, "70", "{told:?}");
    let named = |grants: &[pb::GrantAside]| -> Vec<(String, String, i64)> {
        let at = |g: &pb::GrantAside| {
            let at = g.at.expect("an instant");
            tollgate_proto::decode::timestamp("at", &at)
                .unwrap()
                .millis()
        };
        grants
            .iter()
            .map(|g| (g.grant_id.clone(), g.remaining.clone(), at(g)))
            .collect()
    };
    assert_eq!(
        named(&told.upcoming),
        [("tomorrow".into(), "50".into(), T0_MS + DAY_MS)]
    );
    assert_eq!(
        named(&told.lapsed),
        [("lapsing".into(), "7".into(), T0_MS + HOUR_MS)]
    );
    // No lifecycle here, so no region is read: the reply says so rather than count no holds.
    assert_eq!(told.holds_unread.len(), 1, "{told:?}");
}

/// Polls until the ledger's sum of open grants is `want` (the debit was reconciled).
async fn wait_reconciled(admin: &mut Admin, want: &str) {
    let mut last = String::new();
    for _ in 0..RECONCILE_POLLS_MAX {
        last = ledger_balance(admin, "acme").await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(RECONCILE_POLL_STEP_MS)).await;
    }
    panic!("the ledger stayed at {last}, expected {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_and_the_widget_tell_the_balance_the_edge_answers() {
    let node = common::Node::start().await;
    let mut admin = node.admin();
    let mut edge = node.edge();
    chat_at_one_credit(&mut admin, "").await;
    create_account(&mut admin, "acme").await;
    let now_ms = Timestamp::from_datetime(chrono::Utc::now())
        .unwrap()
        .millis();
    admin
        .issue_grant(grant("now", "10", now_ms - HOUR_MS, None))
        .await
        .unwrap();
    admin
        .issue_grant(grant("later", "5", now_ms + DAY_MS, None))
        .await
        .unwrap();

    // A hold of 2 stays in flight; a debit of 1 is reconciled into the ledger.
    let held = edge
        .authorize(pb::AuthorizeRequest {
            idempotency_key: "hold-1".into(),
            account_id: "acme".into(),
            usage: cost("2"),
            ttl_seconds: 600,
            ..pb::AuthorizeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(
            held.outcome,
            Some(pb::authorize_reply::Outcome::Authorized(_))
        ),
        "{held:?}"
    );
    debited(debit(&mut edge, "acme", "d1", "1", pb::EnforcementMode::default()).await);
    // The ledger's sum of open grants: 10 + 5 - 1 (it knows nothing of the hold).
    wait_reconciled(&mut admin, "14").await;
    let answer = edge_balance(&mut edge, "acme").await;
    let edge_says = answer.balance.unwrap().balance;
    assert_eq!(edge_says, "7", "10 - 1 debited - 2 held; 5 start tomorrow");

    let base = format!("http://{}", node.http);
    let cookie = sign_in(&base, common::KEY).await;
    let account = page(&base, "/console/accounts/acme", &cookie).await;
    assert_eq!(element(&account, "balance"), edge_says);
    assert_eq!(element(&account, "held"), "2");
    // The region's slice is labelled as what the region holds, never as spendable.
    let regions = element(&account, "regions");
    assert!(regions.contains("held by region local"), "{regions}");
    assert!(!account.to_lowercase().contains("spendable"), "{account}");

    // The widget, through a link minted with the admin key.
    let (status, _, minted) = call(
        "POST",
        &format!("{base}/widget/tokens"),
        &[
            ("authorization", &format!("Bearer {}", common::KEY)),
            ("content-type", "application/json"),
        ],
        r#"{"account_id": "acme", "ttl_seconds": 600}"#,
    )
    .await;
    assert_eq!(status, 200, "{minted}");
    let minted: serde_json::Value = serde_json::from_str(&minted).unwrap();
    let widget = page(&base, minted["path"].as_str().unwrap(), "").await;
    assert_eq!(element(&widget, "widget-balance"), edge_says);
    assert!(
        element(&widget, "widget-held").starts_with("2 "),
        "{widget}"
    );
    node.stop().await;
}
