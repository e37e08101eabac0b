//! Purchases against the real embedded node (`dev`): Stripe's signed webhooks over real HTTP
//! grant each payment exactly once; the Admin `Purchase` call grants once per payment
//! reference whatever the idempotency key; `RefundPurchase` voids what a debit through the
//! Enforcement API left and reports the money due.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tollgate_authority::stripe::sign;
use tollgate_proto::pb;
use tonic::transport::Channel;

const STRIPE_SECRET: &str = "whsec_purchases_test_secret";

type Admin = pb::admin_client::AdminClient<Channel>;

mod common;

use common::grpc::chat_at_one_credit;
use common::{request, Node, WAIT_MS};

fn now_s() -> i64 {
    let elapsed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(elapsed.as_secs()).unwrap()
}

/// POSTs `body` to /webhooks/stripe over a plain TCP socket; returns (status, body).
async fn post(http: SocketAddr, signature: Option<&str>, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = format!(
        "POST /webhooks/stripe HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(signature) = signature {
        head.push_str(&format!("Stripe-Signature: {signature}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(http).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A delivery signed the way Stripe signs it, at `t`.
async fn deliver(http: SocketAddr, secret: &str, t: i64, body: &[u8]) -> (u16, String) {
    let signature = format!("t={t},v1={}", sign(secret, t, body));
    post(http, Some(&signature), body).await
}

fn event(id: &str, kind: &str, object: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id,
        "object": "event",
        "type": kind,
        "data": { "object": object },
    }))
    .unwrap()
}

async fn create_account(admin: &mut Admin, account: &str) {
    admin
        .create_account(request(pb::CreateAccountRequest {
            idempotency_key: format!("create-{account}"),
            account_id: account.into(),
            ..pb::CreateAccountRequest::default()
        }))
        .await
        .unwrap();
}

async fn balance(admin: &mut Admin, account: &str) -> String {
    admin
        .get_balance(request(pb::AdminGetBalanceRequest {
            account_id: account.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap()
        .balance
}

/// The account's ledger entries as (kind, amount, grant id), in sequence order.
async fn entries(admin: &mut Admin, account: &str) -> Vec<(pb::EntryKind, String, String)> {
    admin
        .list_entries(request(pb::ListEntriesRequest {
            account_id: account.into(),
            ..pb::ListEntriesRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| (e.kind(), e.amount, e.grant_id))
        .collect()
}

async fn grants(admin: &mut Admin, account: &str) -> Vec<pb::Grant> {
    admin
        .list_grants(request(pb::ListGrantsRequest {
            account_id: account.into(),
            ..pb::ListGrantsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .grants
}

/// Waits (bounded) until the ledger's balance of `account` is `expected`.
async fn wait_for_balance(admin: &mut Admin, account: &str, expected: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        let now = balance(admin, account).await;
        if now == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "balance of {account} stayed {now}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_webhooks_grant_each_payment_exactly_once() {
    let node = Node::start_with(Some(STRIPE_SECRET)).await;
    let mut admin = pb::admin_client::AdminClient::new(node.channel.clone());
    create_account(&mut admin, "acme").await;

    let session = json!({
        "id": "cs_test_a1",
        "object": "checkout.session",
        "amount_total": 1999,
        "currency": "usd",
        "client_reference_id": "acme",
        "payment_status": "paid",
        "metadata": { "tollgate_credits": "100" },
    });
    let completed = event("evt_1", "checkout.session.completed", session.clone());
    // Delivered three times (Stripe retries), each with a fresh signature.
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(deliver(node.http, STRIPE_SECRET, now_s(), &completed).await);
    }
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert!(body.contains("\"granted\""), "{body}");
    }
    assert!(
        answers[0].1.contains("\"replayed\":false"),
        "{}",
        answers[0].1
    );
    assert!(
        answers[1].1.contains("\"replayed\":true"),
        "{}",
        answers[1].1
    );
    assert!(
        answers[2].1.contains("\"replayed\":true"),
        "{}",
        answers[2].1
    );
    // Another event about the same session is the same purchase.
    let succeeded = event("evt_2", "checkout.session.async_payment_succeeded", session);
    let (status, body) = deliver(node.http, STRIPE_SECRET, now_s(), &succeeded).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"replayed\":true"), "{body}");

    assert_eq!(balance(&mut admin, "acme").await, "100");
    let listed = grants(&mut admin, "acme").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let grant = &listed[0];
    assert!(
        grant.grant_id.starts_with("purchase:"),
        "{}",
        grant.grant_id
    );
    assert_eq!(grant.source(), pb::GrantSource::Purchase);
    assert_eq!(grant.amount, "100");
    assert_eq!(grant.external_ref, "cs_test_a1");
    let cost = grant.cost_basis.clone().unwrap();
    assert_eq!(
        (cost.amount.as_str(), cost.currency.as_str()),
        ("19.99", "USD")
    );
    assert_eq!(
        entries(&mut admin, "acme").await,
        vec![(
            pb::EntryKind::Grant,
            "100".to_owned(),
            grant.grant_id.clone()
        )]
    );

    // An invoice in a zero-decimal currency, the account from the metadata.
    let invoice = event(
        "evt_3",
        "invoice.paid",
        json!({
            "id": "in_test_b2",
            "object": "invoice",
            "amount_paid": 500,
            "currency": "jpy",
            "metadata": { "tollgate_account": "acme", "tollgate_credits": "50" },
        }),
    );
    let (status, body) = deliver(node.http, STRIPE_SECRET, now_s(), &invoice).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"replayed\":false"), "{body}");
    assert_eq!(balance(&mut admin, "acme").await, "150");
    let invoiced = grants(&mut admin, "acme")
        .await
        .into_iter()
        .find(|g| g.external_ref == "in_test_b2")
        .unwrap();
    let cost = invoiced.cost_basis.unwrap();
    assert_eq!(
        (cost.amount.as_str(), cost.currency.as_str()),
        ("500", "JPY")
    );

    // Forged, stale, future, unsigned and malformed deliveries answer 400 and grant nothing.
    let other = event(
        "evt_4",
        "checkout.session.completed",
        json!({
            "id": "cs_test_c3",
            "amount_total": 1000,
            "currency": "eur",
            "metadata": { "tollgate_account": "acme", "tollgate_credits": "1000" },
        }),
    );
    let wrong = deliver(node.http, "whsec_not_the_secret", now_s(), &other).await;
    assert_eq!(wrong.0, 400, "{}", wrong.1);
    let stale = deliver(node.http, STRIPE_SECRET, now_s() - 3_600, &other).await;
    assert_eq!(stale.0, 400, "{}", stale.1);
    assert!(stale.1.contains("tolerance"), "{}", stale.1);
    let future = deliver(node.http, STRIPE_SECRET, now_s() + 3_600, &other).await;
    assert_eq!(future.0, 400, "{}", future.1);
    let unsigned = post(node.http, None, &other).await;
    assert_eq!(unsigned.0, 400, "{}", unsigned.1);
    let garbled = post(node.http, Some("t=1,v1"), &other).await;
    assert_eq!(garbled.0, 400, "{}", garbled.1);
    let not_json = deliver(node.http, STRIPE_SECRET, now_s(), b"{not json").await;
    assert_eq!(not_json.0, 400, "{}", not_json.1);
    let unknown_account = event(
        "evt_5",
        "invoice.paid",
        json!({
            "id": "in_test_d4", "amount_paid": 100, "currency": "eur",
            "metadata": { "tollgate_account": "nobody", "tollgate_credits": "5" },
        }),
    );
    let unknown = deliver(node.http, STRIPE_SECRET, now_s(), &unknown_account).await;
    assert_eq!(unknown.0, 422, "{}", unknown.1);
    // Event types Tollgate does not handle are acknowledged and ignored.
    let ignored = event("evt_6", "customer.created", json!({ "id": "cus_1" }));
    let (status, body) = deliver(node.http, STRIPE_SECRET, now_s(), &ignored).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ignored"), "{body}");

    assert_eq!(balance(&mut admin, "acme").await, "150");
    assert_eq!(entries(&mut admin, "acme").await.len(), 2);
    assert_eq!(grants(&mut admin, "acme").await.len(), 2);
    let verified = admin
        .verify(request(pb::VerifyRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_the_webhook_answers_503() {
    let node = Node::start().await;
    let http = node.http;
    let body = event("evt_1", "invoice.paid", json!({}));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(WAIT_MS);
    let (status, text) = loop {
        if tokio::net::TcpStream::connect(http).await.is_ok() {
            break deliver(http, STRIPE_SECRET, now_s(), &body).await;
        }
        assert!(tokio::time::Instant::now() < deadline, "no HTTP listener");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("not configured"), "{text}");
    node.stop().await;
}

fn purchase_request(key: &str, account: &str, reference: &str) -> pb::PurchaseRequest {
    pb::PurchaseRequest {
        idempotency_key: key.into(),
        account_id: account.into(),
        credits: "100".into(),
        money: Some(pb::Money {
            amount: "10.00".into(),
            currency: "EUR".into(),
        }),
        payment_reference: reference.into(),
        memo: "bundle of 100".into(),
        ..pb::PurchaseRequest::default()
    }
}

fn receipt(reply: &pb::PurchaseReply) -> &pb::Receipt {
    match &reply.outcome {
        Some(pb::purchase_reply::Outcome::Done(receipt)) => receipt,
        other => panic!("not done: {other:?}"),
    }
}

async fn debit(
    edge: &mut pb::enforcement_client::EnforcementClient<Channel>,
    key: &str,
    account: &str,
    quantity: &str,
) {
    let outcome = debit_outcome(edge, key, account, quantity).await;
    assert!(
        matches!(outcome, pb::debit_reply::Outcome::Debited(_)),
        "{outcome:?}"
    );
}

async fn debit_outcome(
    edge: &mut pb::enforcement_client::EnforcementClient<Channel>,
    key: &str,
    account: &str,
    quantity: &str,
) -> pb::debit_reply::Outcome {
    edge.debit(request(pb::DebitRequest {
        idempotency_key: key.into(),
        account_id: account.into(),
        usage: Some(pb::Usage {
            feature: "chat".into(),
            amount: Some(pb::usage::Amount::Quantity(quantity.into())),
        }),
        ..pb::DebitRequest::default()
    }))
    .await
    .unwrap()
    .into_inner()
    .outcome
    .expect("a debit outcome")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchase_grants_once_per_reference_and_refund_voids_the_rest() {
    let node = Node::start_with(Some(STRIPE_SECRET)).await;
    let mut admin = pb::admin_client::AdminClient::new(node.channel.clone());
    let mut edge = pb::enforcement_client::EnforcementClient::new(node.channel.clone());
    chat_at_one_credit(&mut node.admin(), "").await;
    create_account(&mut admin, "acme").await;
    create_account(&mut admin, "beta").await;

    // Every bad field is refused, named, and changes nothing.
    type Spoil = fn(&mut pb::PurchaseRequest);
    let spoiled: [(&str, Spoil); 10] = [
        ("idempotency_key", |r| r.idempotency_key.clear()),
        ("account_id", |r| r.account_id = "not valid!".into()),
        ("credits", |r| r.credits = "-1".into()),
        ("credits", |r| r.credits = "0".into()),
        ("money", |r| r.money = None),
        ("money.amount", |r| {
            r.money.as_mut().unwrap().amount = "10.001".into()
        }),
        ("money.amount", |r| {
            r.money.as_mut().unwrap().amount = "-5".into()
        }),
        ("money.currency", |r| {
            r.money.as_mut().unwrap().currency = "eur".into()
        }),
        ("payment_reference", |r| r.payment_reference.clear()),
        ("memo", |r| r.memo = "a\nb".into()),
    ];
    for (field, spoil) in spoiled {
        let mut bad = purchase_request("k-bad", "acme", "pi_1");
        spoil(&mut bad);
        let refused = admin.purchase(request(bad)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(
            refused.message().contains(field),
            "{field}: {}",
            refused.message()
        );
    }
    assert_eq!(balance(&mut admin, "acme").await, "0");
    assert!(entries(&mut admin, "acme").await.is_empty());

    // The first purchase grants; a retry under another key replays it.
    let first = admin
        .purchase(request(purchase_request("k1", "acme", "pi_1")))
        .await
        .unwrap()
        .into_inner();
    assert!(!receipt(&first).replayed);
    let grant = first.grant.clone().unwrap();
    assert_eq!(grant.amount, "100");
    assert_eq!(grant.external_ref, "pi_1");
    assert_eq!(grant.source(), pb::GrantSource::Purchase);
    assert_eq!(grant.priority, 50);
    let cost = grant.cost_basis.clone().unwrap();
    assert_eq!(
        (cost.amount.as_str(), cost.currency.as_str()),
        ("10.00", "EUR")
    );
    let retried = admin
        .purchase(request(purchase_request("k2", "acme", "pi_1")))
        .await
        .unwrap()
        .into_inner();
    assert!(receipt(&retried).replayed);
    assert_eq!(receipt(&retried).grant_id, grant.grant_id);
    // The same reference with other terms, or on another account, is refused.
    let mut other = purchase_request("k3", "acme", "pi_1");
    other.credits = "200".into();
    let conflict = admin.purchase(request(other)).await.unwrap_err();
    assert_eq!(conflict.code(), tonic::Code::AlreadyExists);
    assert!(
        conflict.message().contains("payment_reference"),
        "{}",
        conflict.message()
    );
    let elsewhere = admin
        .purchase(request(purchase_request("k4", "beta", "pi_1")))
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), tonic::Code::AlreadyExists);
    assert_eq!(balance(&mut admin, "acme").await, "100");
    assert_eq!(balance(&mut admin, "beta").await, "0");
    assert_eq!(entries(&mut admin, "acme").await.len(), 1);

    // A debit through the Enforcement API on the same node, reconciled into the ledger.
    debit(&mut edge, "d1", "acme", "5").await;
    wait_for_balance(&mut admin, "acme", "95").await;

    let refund = pb::RefundPurchaseRequest {
        idempotency_key: "r1".into(),
        account_id: "acme".into(),
        payment_reference: "pi_1".into(),
        memo: "customer asked".into(),
        ..pb::RefundPurchaseRequest::default()
    };
    let bad = admin
        .refund_purchase(request(pb::RefundPurchaseRequest {
            grant_id: grant.grant_id.clone(),
            ..refund.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("grant_id"), "{}", bad.message());
    let refunded = admin
        .refund_purchase(request(refund.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(&refunded.outcome, Some(pb::refund_purchase_reply::Outcome::Done(r)) if !r.replayed),
        "{refunded:?}"
    );
    assert_eq!(refunded.grant_id, grant.grant_id);
    assert_eq!(refunded.credits_voided, "95");
    let due = refunded.money_due.clone().unwrap();
    assert_eq!(
        (due.amount.as_str(), due.currency.as_str()),
        ("9.50", "EUR")
    );
    assert_eq!(balance(&mut admin, "acme").await, "0");
    // Finance sees the sale, the consumption and the money owed back.
    let revenue = admin
        .get_revenue_report(request(pb::GetRevenueReportRequest {
            from: Some(prost_types::Timestamp {
                seconds: now_s() - 3_600,
                nanos: 0,
            }),
            until: Some(prost_types::Timestamp {
                seconds: now_s() + 3_600,
                nanos: 0,
            }),
            account_id: "acme".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let eur = revenue
        .lines
        .iter()
        .find(|l| l.currency == "EUR")
        .expect("a EUR line");
    assert_eq!(
        (
            eur.money_sold.as_str(),
            eur.money_consumed.as_str(),
            eur.credits_voided.as_str(),
            eur.money_voided.as_str()
        ),
        ("10", "0.5", "95", "9.5"),
        "{eur:?}"
    );
    // The region gave the purchase back before it was voided: nothing more is spent from it.
    let after = debit_outcome(&mut edge, "d2", "acme", "1").await;
    assert!(
        matches!(&after, pb::debit_reply::Outcome::Refused(r) if r.code() == pb::RefusalCode::InsufficientCredits),
        "{after:?}"
    );
    let ledger = entries(&mut admin, "acme").await;
    assert_eq!(ledger.len(), 3, "{ledger:?}");
    assert_eq!(
        ledger[0],
        (
            pb::EntryKind::Grant,
            "100".to_owned(),
            grant.grant_id.clone()
        )
    );
    assert_eq!(
        ledger[1],
        (pb::EntryKind::Debit, "5".to_owned(), grant.grant_id.clone())
    );
    assert_eq!(
        ledger[2],
        (pb::EntryKind::Void, "95".to_owned(), grant.grant_id.clone())
    );
    // The same refund again replays; another refund of the same purchase is refused.
    let again = admin
        .refund_purchase(request(refund.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(&again.outcome, Some(pb::refund_purchase_reply::Outcome::Done(r)) if r.replayed),
        "{again:?}"
    );
    assert_eq!(
        (again.credits_voided.as_str(), again.money_due),
        ("95", refunded.money_due)
    );
    let twice = admin
        .refund_purchase(request(pb::RefundPurchaseRequest {
            idempotency_key: "r2".into(),
            ..refund
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(&twice.outcome, Some(pb::refund_purchase_reply::Outcome::Refused(r))
            if r.code() == pb::RefusalCode::GrantClosed),
        "{twice:?}"
    );
    assert_eq!(entries(&mut admin, "acme").await.len(), 3);

    // A purchase used up entirely: the refund voids nothing and owes nothing.
    let mut small = purchase_request("k5", "beta", "pi_2");
    small.credits = "10".into();
    small.money = Some(pb::Money {
        amount: "3.00".into(),
        currency: "EUR".into(),
    });
    let bought = admin.purchase(request(small)).await.unwrap().into_inner();
    let used_grant = bought.grant.unwrap().grant_id;
    debit(&mut edge, "d2", "beta", "10").await;
    wait_for_balance(&mut admin, "beta", "0").await;
    let used = admin
        .refund_purchase(request(pb::RefundPurchaseRequest {
            idempotency_key: "r3".into(),
            account_id: "beta".into(),
            grant_id: used_grant.clone(),
            ..pb::RefundPurchaseRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(
            &used.outcome,
            Some(pb::refund_purchase_reply::Outcome::Done(_))
        ),
        "{used:?}"
    );
    assert_eq!(used.credits_voided, "0");
    let due = used.money_due.unwrap();
    assert_eq!(
        (due.amount.as_str(), due.currency.as_str()),
        ("0.00", "EUR")
    );
    let ledger = entries(&mut admin, "beta").await;
    assert_eq!(
        ledger,
        vec![
            (pb::EntryKind::Grant, "10".to_owned(), used_grant.clone()),
            (pb::EntryKind::Debit, "10".to_owned(), used_grant.clone()),
            (pb::EntryKind::Void, "0".to_owned(), used_grant),
        ]
    );
    let verified = admin
        .verify(request(pb::VerifyRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    node.stop().await;
}
