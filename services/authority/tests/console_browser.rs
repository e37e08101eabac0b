//! The admin console and the balance widget in a real headless Chromium, driven over
//! WebDriver: the embedded node runs in this process, `chromedriver` is started on a free port
//! and killed by its pid. Screenshots of the main pages go to `target/screenshots/`.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use support::webdriver::{Browser, Driver};
use tollgate_authority_service::dev::{run_with_keys, DevOptions};
use tollgate_proto::pb;
use tollgate_serve::auth::{key_digest, KeyEntry, Scope};
use tollgate_testkit::process::free_port;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

const ADMIN_KEY: &str = "console-admin-key";
const READ_KEY: &str = "console-read-key";
/// Bounded waits: attempts × step.
const WAIT_ATTEMPTS: u32 = 300;
const WAIT_STEP_MS: u64 = 100;

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {ADMIN_KEY}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

fn address() -> SocketAddr {
    format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap()
}

fn screenshots_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

/// The ledger's sum for `account` (Admin `GetBalance`'s `ledger_balance`): what the background
/// loop's reconciliation moves.
async fn balance(admin: &mut pb::admin_client::AdminClient<Channel>, account: &str) -> String {
    admin
        .get_balance(request(pb::AdminGetBalanceRequest {
            account_id: account.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .ledger_balance
}

/// The account's open parked usage, once there is some (bounded wait).
async fn wait_for_parked(
    admin: &mut pb::admin_client::AdminClient<Channel>,
    account: &str,
) -> Vec<pb::ParkedUsage> {
    let mut parked = Vec::new();
    for _ in 0..WAIT_ATTEMPTS {
        parked = admin
            .list_parked_usage(request(pb::ListParkedUsageRequest {
                account_id: account.into(),
                state: pb::ParkedState::Open.into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .records;
        if !parked.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(WAIT_STEP_MS)).await;
    }
    parked
}

async fn wait_for_balance(
    admin: &mut pb::admin_client::AdminClient<Channel>,
    account: &str,
    expected: &str,
) {
    let mut last = String::new();
    for _ in 0..WAIT_ATTEMPTS {
        last = balance(admin, account).await;
        if last == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(WAIT_STEP_MS)).await;
    }
    panic!("the ledger balance of {account} stayed {last}, expected {expected}");
}

async fn seed(admin: &mut pb::admin_client::AdminClient<Channel>) {
    for (feature, unit) in [("chat", "message"), ("search", "query")] {
        admin
            .define_feature(request(pb::DefineFeatureRequest {
                idempotency_key: format!("f-{feature}"),
                feature: Some(pb::Feature {
                    feature: feature.into(),
                    unit: unit.into(),
                    description: format!("one {unit}"),
                }),
            }))
            .await
            .unwrap();
    }
    admin
        .publish_price_book_version(request(pb::PublishPriceBookVersionRequest {
            idempotency_key: "p1".into(),
            version: Some(pb::PriceBookVersion {
                version: 1,
                effective_from: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
                default_rates: Some(pb::RateTable {
                    rates: [("chat".into(), "0.5".into()), ("search".into(), "2".into())].into(),
                }),
                ..Default::default()
            }),
        }))
        .await
        .unwrap();
    admin
        .create_account(request(pb::CreateAccountRequest {
            idempotency_key: "a1".into(),
            account_id: "acme".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
}

async fn spend(
    edge: &mut pb::enforcement_client::EnforcementClient<Channel>,
    key: &str,
    feature: &str,
    quantity: &str,
    actor: &str,
) {
    let reply = edge
        .debit(request(pb::DebitRequest {
            idempotency_key: key.into(),
            account_id: "acme".into(),
            usage: Some(pb::Usage {
                feature: feature.into(),
                amount: Some(pb::usage::Amount::Quantity(quantity.into())),
            }),
            actor_id: actor.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(reply.outcome, Some(pb::debit_reply::Outcome::Debited(_))),
        "{reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_and_the_widget_work_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, http) = (address(), address());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let support_key = KeyEntry {
        name: "support".into(),
        digest: key_digest(READ_KEY),
        scope: Scope::Read,
    };
    let node = tokio::spawn(run_with_keys(
        DevOptions {
            listen,
            http_listen: http,
            data: dir.path().join("data"),
            api_key: Some(ADMIN_KEY.into()),
            stripe_webhook_secret: None,
        },
        vec![support_key],
        async {
            let _ = stopped.await;
        },
    ));
    let mut channel = None;
    for _ in 0..WAIT_ATTEMPTS {
        if let Ok(connected) = Channel::from_shared(format!("http://{listen}"))
            .unwrap()
            .connect()
            .await
        {
            channel = Some(connected);
            break;
        }
        tokio::time::sleep(Duration::from_millis(WAIT_STEP_MS)).await;
    }
    let channel = channel.expect("the dev node never listened");
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    let mut edge = pb::enforcement_client::EnforcementClient::new(channel);
    seed(&mut admin).await;

    let shots = screenshots_dir();
    println!("screenshots: {}", shots.display());
    let driver = Driver::start(free_port().unwrap(), &dir.path().join("chromedriver.log"));
    let browser = Browser::open(&driver, &dir.path().join("profile")).await;
    let base = format!("http://{http}");

    // Not signed in: the console sends the browser to the sign-in page.
    browser.goto(&format!("{base}/console/accounts/acme")).await;
    browser.find("#key").await;
    assert!(browser.url().await.ends_with("/console/login"));
    browser.type_into("#key", "not-a-key").await;
    browser.click("#sign-in").await;
    browser.wait_text("#failure", "key: unknown").await;
    browser.screenshot(&shots.join("01-sign-in.png")).await;
    browser.type_into("#key", ADMIN_KEY).await;
    browser.click("#sign-in").await;
    browser.wait_text("#key-name", "dev").await;

    // Find the account, give it credits, and see the balance change.
    browser.type_into("#find", "acme").await;
    browser.click("#find-button").await;
    browser.wait_text("#account-id", "acme").await;
    assert_eq!(browser.text("#balance").await, "0");
    browser.type_into("#grant-amount", "100").await;
    browser.click("#grant-submit").await;
    browser.wait_text("#outcome", "Grant done").await;
    assert_eq!(browser.text("#balance-after").await, "100");
    browser.click("#back-to-account").await;
    browser.wait_text("#balance", "100").await;
    browser.wait_text("#grants", "promo").await;
    browser.wait_text("#ledger", "[console, key dev]").await;
    assert_eq!(balance(&mut admin, "acme").await, "100");

    // Spend through Enforcement; once reconciled, the ledger and the charts show it.
    spend(&mut edge, "d1", "chat", "3", "alice").await;
    spend(&mut edge, "d2", "search", "1", "bob").await;
    wait_for_balance(&mut admin, "acme", "96.5").await;
    browser.goto(&format!("{base}/console/accounts/acme")).await;
    browser.wait_text("#balance", "96.5").await;
    let ledger = browser.text("#ledger").await;
    assert_eq!(ledger.matches("debit").count(), 2, "{ledger}");
    // The region's own view: the dev node's one region holds a slice of the grant.
    let regions = browser.text("#regions").await;
    assert!(regions.contains("local"), "{regions}");
    let page = browser.source().await;
    assert!(
        page.contains("<title>chat ·"),
        "the feature chart draws chat"
    );
    assert!(
        page.contains("<title>search ·"),
        "the feature chart draws search"
    );
    assert!(page.contains("<title>alice ·") && page.contains("<title>bob ·"));
    assert_eq!(browser.count("#chart-feature rect").await, 2);
    browser.screenshot(&shots.join("02-account.png")).await;

    // Any debit opens its explanation; refund it with a reason, after a confirmation.
    let debits = browser.count("#ledger a.explain").await;
    assert_eq!(debits, 2);
    browser.execute(
        "Array.from(document.querySelectorAll('#ledger tr')).find(r => r.textContent.includes('alice')).querySelector('a.explain').click()",
        vec![],
    )
    .await;
    // The rate reads "× 0.5 credits" from an entry that kept its quantity and "rate: 0.5
    // credits per unit" from the price book for one that did not; either names version 1.
    browser
        .wait_text("#explanation", "price book version 1, default rate")
        .await;
    let explanation = browser.text("#explanation").await;
    assert!(
        explanation.contains("alice")
            && explanation.contains("chat")
            && explanation.contains("0.5 credits"),
        "{explanation}"
    );
    browser.wait_text("#burned", "promo").await;
    browser.screenshot(&shots.join("03-debit.png")).await;
    browser.type_into("#refund-amount", "1").await;
    browser
        .type_into("#refund-reason", "the answer was wrong")
        .await;
    browser.click("#refund-submit").await;
    browser
        .wait_text("#confirm-summary", "Refund 1 credits")
        .await;
    assert_eq!(
        balance(&mut admin, "acme").await,
        "96.5",
        "nothing moves before confirming"
    );
    browser
        .screenshot(&shots.join("04-refund-confirm.png"))
        .await;
    browser.click("#confirm").await;
    browser.wait_text("#outcome", "Refund done").await;
    assert_eq!(browser.text("#balance-after").await, "97.5");
    assert_eq!(balance(&mut admin, "acme").await, "97.5");
    let refunds = admin
        .list_entries(request(pb::ListEntriesRequest {
            account_id: "acme".into(),
            kinds: vec![pb::EntryKind::Refund.into()],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0].memo, "the answer was wrong [console, key dev]");
    // An adjustment beyond the overdraft limit says what the balance would be before anything
    // moves; cancelled, nothing does.
    browser.goto(&format!("{base}/console/accounts/acme")).await;
    browser.type_into("#adjust-amount", "-1000").await;
    browser.type_into("#adjust-reason", "too much").await;
    browser.click("#adjust-submit").await;
    let summary = browser
        .wait_text("#confirm-summary", "it will be -902.5 (overdraft limit 0)")
        .await;
    assert!(
        summary.contains("The ledger's balance is 97.5")
            && summary.contains("902.5 beyond the overdraft limit: it will be refused unless"),
        "{summary}"
    );
    browser
        .screenshot(&shots.join("04b-adjust-beyond-confirm.png"))
        .await;
    browser.click("#confirm + a").await;
    browser.wait_text("#account-id", "acme").await;
    assert_eq!(balance(&mut admin, "acme").await, "97.5");
    // Console changes are in the audit table too, with the key that made them.
    let audit = admin
        .list_audit_records(request(pb::ListAuditRecordsRequest {
            account_id: "acme".into(),
            ..pb::ListAuditRecordsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(
        audit
            .iter()
            .any(|r| r.method == "console:issue grant" && r.key_name == "dev"),
        "{audit:?}"
    );

    // A bad price book names every problem and publishes nothing; a good one publishes.
    browser.goto(&format!("{base}/console/prices")).await;
    browser.find("#price-text").await;
    let bad = "version = 2\neffective_from = \"2020-01-02T00:00:00Z\"\n[default_rates]\n\
               chat = \"-1\"\nsearch = \"abc\"\nimage = \"0.3\"\n[plan_rates.gold]\nchat = \"0.1\"\n";
    browser
        .execute(
            "document.querySelector('#price-text').value = arguments[0]",
            vec![json!(bad)],
        )
        .await;
    browser.click("#price-publish").await;
    browser.find("#price-problems").await;
    let problems = browser.text("#price-problems").await;
    assert_eq!(browser.count("#price-problems li").await, 4, "{problems}");
    for wanted in [
        "rates[chat]",
        "rates[search]",
        "[image]: unknown feature",
        "[gold]: unknown plan",
    ] {
        assert!(problems.contains(wanted), "{wanted} in {problems}");
    }
    browser
        .screenshot(&shots.join("05-price-book-problems.png"))
        .await;
    let listed = |versions: pb::ListPriceBookVersionsReply| {
        versions
            .versions
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>()
    };
    let versions = admin
        .list_price_book_versions(request(pb::ListPriceBookVersionsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed(versions), [1], "the bad version published nothing");
    let good = "version = 2\neffective_from = \"2020-01-02T00:00:00Z\"\n[default_rates]\n\
                chat = \"0.25\"\nsearch = \"2\"\n";
    browser
        .execute(
            "document.querySelector('#price-text').value = arguments[0]",
            vec![json!(good)],
        )
        .await;
    browser.click("#price-publish").await;
    browser
        .wait_text("#price-notice", "Published version 2.")
        .await;
    assert!(browser.exists("#version-2").await);
    browser.screenshot(&shots.join("06-price-book.png")).await;
    let versions = admin
        .list_price_book_versions(request(pb::ListPriceBookVersionsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed(versions), [1, 2]);

    // The widget: a short-lived link for one account, with balance, burn, expiry and a quote.
    browser.goto(&format!("{base}/console/accounts/acme")).await;
    browser.click("#widget-submit").await;
    browser.click("#widget-link").await;
    browser.wait_text("#widget-balance", "97.5").await;
    assert!(browser.text("#widget-burn").await.contains("credits a day"));
    assert_eq!(browser.text("#widget-expiry").await, "nothing expires");
    browser
        .execute(
            "document.querySelector('#widget-feature').value = 'chat'",
            vec![],
        )
        .await;
    browser.type_into("#widget-quantity", "4").await;
    browser.click("#widget-quote").await;
    let cost = browser.wait_text("#widget-cost", "costs 1 credits").await;
    assert!(cost.contains("price book version 2"), "{cost}");
    browser.screenshot(&shots.join("07-widget.png")).await;
    let widget_url = browser.url().await;
    let forged = widget_url.replace("acme", "other");
    browser.goto(&forged).await;
    browser.wait_text("#failure", "token: bad signature").await;

    // The revenue report and the record of changes.
    browser.goto(&format!("{base}/console/revenue")).await;
    browser.wait_text("#revenue", "credits sold").await;
    browser.screenshot(&shots.join("08-revenue.png")).await;
    browser.goto(&format!("{base}/console/changes")).await;
    let changes = browser.text("#changes").await;
    for wanted in [
        "issue grant",
        "refund",
        "publish price book",
        "widget token",
    ] {
        assert!(changes.contains(wanted), "{wanted} in {changes}");
    }
    browser.goto(&format!("{base}/console")).await;
    browser.wait_text("#low-balance", "").await;
    browser.screenshot(&shots.join("09-home.png")).await;

    // A read key sees everything and changes nothing: refused on the server, not only hidden.
    browser.click("header button").await;
    browser.type_into("#key", READ_KEY).await;
    browser.click("#sign-in").await;
    browser.wait_text("#key-name", "support").await;
    browser.goto(&format!("{base}/console/accounts/acme")).await;
    browser.wait_text("#balance", "97.5").await;
    assert!(browser.exists("#read-only").await);
    assert!(!browser.exists("#grant-form").await);
    let forge = "const f = document.createElement('form'); f.method = 'post'; \
                 f.action = arguments[0]; \
                 for (const [k, v] of Object.entries(arguments[1])) { \
                   const i = document.createElement('input'); i.name = k; i.value = v; f.appendChild(i); } \
                 document.body.appendChild(f); f.submit();";
    let csrf = browser
        .execute(
            "return document.querySelector('meta[name=csrf]').content",
            vec![],
        )
        .await;
    browser
        .execute(
            forge,
            vec![
                json!("/console/accounts/acme/grants"),
                json!({"csrf": csrf, "op": "console-forged-1", "amount": "5", "source": "promo"}),
            ],
        )
        .await;
    browser.wait_text("#failure", "has the read scope").await;
    browser
        .screenshot(&shots.join("10-read-key-refused.png"))
        .await;
    browser.goto(&format!("{base}/console/prices")).await;
    assert!(!browser.exists("#price-publish").await);
    browser
        .execute(
            forge,
            vec![
                json!("/console/prices"),
                json!({"csrf": csrf, "op": "console-forged-2", "action": "publish", "text": good.replace("version = 2", "version = 3")}),
            ],
        )
        .await;
    browser.wait_text("#failure", "has the read scope").await;
    // A form without the session's CSRF token is refused before anything else.
    browser.goto(&format!("{base}/console")).await;
    browser
        .execute(
            forge,
            vec![
                json!("/console/accounts/acme/adjust"),
                json!({"csrf": "forged", "op": "console-forged-3", "amount": "5", "reason": "x", "confirm": "yes"}),
            ],
        )
        .await;
    browser.wait_text("#failure", "csrf").await;
    assert_eq!(balance(&mut admin, "acme").await, "97.5");
    let versions = admin
        .list_price_book_versions(request(pb::ListPriceBookVersionsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed(versions), [1, 2], "the read key published nothing");

    // Usage the ledger could not take is listed, and charged from the console. Every credit
    // is taken away in the ledger alone while the region still holds them; the next spend is
    // served there and parked when reconciled.
    let left = balance(&mut admin, "acme").await;
    support::ledger_only::take_away(&dir.path().join("data"), "acme", &left, "take-all").await;
    spend(&mut edge, "d-parked", "chat", "2", "alice").await;
    let parked = wait_for_parked(&mut admin, "acme").await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    let id = parked[0].id.clone();
    admin
        .issue_grant(request(pb::IssueGrantRequest {
            idempotency_key: "refill".into(),
            account_id: "acme".into(),
            grant_id: "refill".into(),
            amount: "10".into(),
            source: pb::GrantSource::Purchase.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    browser.goto(&format!("{base}/console")).await;
    browser.click("header button").await;
    browser.type_into("#key", ADMIN_KEY).await;
    browser.click("#sign-in").await;
    browser.wait_text("#key-name", "dev").await;
    browser.goto(&format!("{base}/console/parked")).await;
    browser.wait_text("#parked", "d-parked").await;
    browser.screenshot(&shots.join("12-parked.png")).await;
    browser.click(&format!("#charge-{id}")).await;
    browser.click("#confirm").await;
    browser.wait_text("#outcome", "charged").await;
    browser.goto(&format!("{base}/console/parked")).await;
    let open = browser.text("#parked").await;
    assert!(!open.contains("d-parked"), "{open}");
    browser
        .goto(&format!("{base}/console/parked?state=resolved"))
        .await;
    browser.wait_text("#parked", "charged").await;
    let after = balance(&mut admin, "acme").await;
    assert!(
        after.parse::<f64>().unwrap() < 10.0,
        "the parked spend was charged: {after}"
    );

    // Another parked spend, written off with a reason: nothing is charged, and the resolved
    // list says who wrote it off and why.
    support::ledger_only::take_away(&dir.path().join("data"), "acme", &after, "take-all-again")
        .await;
    let emptied = balance(&mut admin, "acme").await;
    spend(&mut edge, "d-written-off", "chat", "2", "alice").await;
    let parked = wait_for_parked(&mut admin, "acme").await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].key, "d-written-off", "{parked:?}");
    let id = parked[0].id.clone();
    browser.goto(&format!("{base}/console/parked")).await;
    browser.wait_text("#parked", "d-written-off").await;
    browser
        .type_into(&format!("#reason-{id}"), "goodwill after an outage")
        .await;
    browser.click(&format!("#write-off-{id}")).await;
    browser.wait_text("body", "goodwill after an outage").await;
    browser.click("#confirm").await;
    browser.wait_text("#outcome", "written_off").await;
    browser
        .goto(&format!("{base}/console/parked?state=resolved"))
        .await;
    let resolved = browser.wait_text("#parked", "d-written-off").await;
    assert!(
        resolved.contains("written_off by dev") && resolved.contains("goodwill after an outage"),
        "{resolved}"
    );
    browser
        .screenshot(&shots.join("13-parked-written-off.png"))
        .await;
    assert_eq!(
        balance(&mut admin, "acme").await,
        emptied,
        "a write-off charges nothing"
    );

    browser.close().await;
    drop(driver);
    let _ = stop.send(());
    node.await.unwrap().unwrap();
    for shot in std::fs::read_dir(&shots).unwrap() {
        println!("  {}", shot.unwrap().path().display());
    }
}
