//! Parked usage is visible and resolvable: over real gRPC on the embedded node, usage the
//! ledger refuses (its region spent a grant's slice the ledger had already lost, to a
//! correction written into the ledger file behind the authority's back) is parked by the reconciler, listed by `ListParkedUsage`, counted on
//! `/metrics`, charged (`ResolveParkedUsage` CHARGE) or written off (WRITE_OFF), idempotently
//! and audited.

mod common;
#[path = "support/ledger_only.rs"]
mod ledger_only;

use std::time::Duration;

use common::grpc::{
    chat_at_one_credit, create_account, debit, debited, grant, ledger_balance,
    reconciled_ledger_balance, Admin,
};
use common::{Node, WAIT_MS};
use tollgate_proto::pb;

fn list(account: &str, state: pb::ParkedState) -> pb::ListParkedUsageRequest {
    pb::ListParkedUsageRequest {
        account_id: account.into(),
        state: state.into(),
        ..pb::ListParkedUsageRequest::default()
    }
}

/// Resolves parked record `id` with `action` under `key`.
async fn resolve(
    admin: &mut Admin,
    key: &str,
    id: &str,
    action: pb::ParkedAction,
    reason: &str,
) -> Result<pb::ResolveParkedUsageReply, tonic::Status> {
    admin
        .resolve_parked_usage(pb::ResolveParkedUsageRequest {
            idempotency_key: key.into(),
            id: id.into(),
            action: action.into(),
            reason: reason.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn parked(admin: &mut Admin, account: &str, state: pb::ParkedState) -> Vec<pb::ParkedUsage> {
    admin
        .list_parked_usage(list(account, state))
        .await
        .unwrap()
        .into_inner()
        .records
}

/// Polls until `account` has `count` open parked records (the background loop reconciles).
async fn wait_parked(admin: &mut Admin, account: &str, count: usize) -> Vec<pb::ParkedUsage> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        let records = parked(admin, account, pb::ParkedState::Open).await;
        if records.len() >= count || tokio::time::Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of one metric line on the node's /metrics.
async fn metric(node: &Node, name: &str) -> String {
    common::http_client::metric(&node.http.to_string(), name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_usage_is_listed_counted_charged_and_written_off() {
    let node = Node::start().await;
    let mut admin = node.admin();
    let mut edge = node.edge();
    chat_at_one_credit(&mut admin, "").await;
    create_account(&mut admin, "acme").await;
    grant(&mut admin, "acme", "g1", "10").await;
    // The first debit brings g1's credits to the region.
    debited(debit(&mut edge, "acme", "k1", "1", pb::EnforcementMode::Strict).await);
    assert_eq!(
        reconciled_ledger_balance(&mut admin, "acme", "9", WAIT_MS).await,
        "9"
    );
    assert_eq!(
        metric(&node, "tollgate_authority_parked_usage_open").await,
        "0"
    );

    // The ledger alone loses g1's credits; the region still holds its slice and spends it.
    ledger_only::take_away(&node.data, "acme", "9", "adjust.1").await;
    assert_eq!(ledger_balance(&mut admin, "acme").await, "0");
    // Two messages at one credit each: the parked record keeps its quantity and rate.
    debited(
        edge.debit(pb::DebitRequest {
            idempotency_key: "k2".into(),
            account_id: "acme".into(),
            usage: Some(pb::Usage {
                feature: "chat".into(),
                amount: Some(pb::usage::Amount::Quantity("2".into())),
            }),
            mode: pb::EnforcementMode::Strict.into(),
            ..pb::DebitRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .outcome
        .expect("a debit outcome"),
    );
    debited(debit(&mut edge, "acme", "k3", "1.5", pb::EnforcementMode::Strict).await);

    let open = wait_parked(&mut admin, "acme", 2).await;
    assert_eq!(open.len(), 2, "{open:?}");
    let (first, second) = (open[0].clone(), open[1].clone());
    assert_eq!(first.key, "k2");
    assert_eq!(first.kind, "debit");
    assert_eq!(first.feature, "chat");
    assert_eq!(first.cost, "2");
    assert_eq!((first.quantity.as_str(), first.rate.as_str()), ("2", "1"));
    assert_eq!(first.account_id, "acme");
    assert_eq!(first.state(), pb::ParkedState::Open);
    assert!(!first.reason.is_empty());
    assert_eq!(first.draws.len(), 1, "{first:?}");
    assert_eq!(first.draws[0].grant_id, "g1");
    assert!(first.event_time.is_some() && first.parked_at.is_some());
    assert_eq!(second.key, "k3");
    assert_eq!(second.cost, "1.5");
    // A named cost has no quantity behind it.
    assert_eq!((second.quantity.as_str(), second.rate.as_str()), ("", ""));
    assert!(parked(&mut admin, "acme", pb::ParkedState::Resolved)
        .await
        .is_empty());
    assert!(parked(&mut admin, "globex", pb::ParkedState::Unspecified)
        .await
        .is_empty());
    assert_eq!(
        metric(&node, "tollgate_authority_parked_usage_open").await,
        "2"
    );
    assert_eq!(
        metric(&node, "tollgate_authority_parked_usage_open_micros").await,
        "3500000"
    );

    // Nothing to charge it from yet: refused, nothing moved, still open.
    let refused = resolve(
        &mut admin,
        "resolve.1",
        &first.id,
        pb::ParkedAction::Charge,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("cannot pay"), "{refused:?}");
    assert_eq!(ledger_balance(&mut admin, "acme").await, "0");
    assert_eq!(
        parked(&mut admin, "acme", pb::ParkedState::Open)
            .await
            .len(),
        2
    );

    // With a new grant it is charged now: the ledger balance drops by its cost.
    grant(&mut admin, "acme", "g2", "5").await;
    let charged = resolve(
        &mut admin,
        "resolve.1",
        &first.id,
        pb::ParkedAction::Charge,
        "",
    )
    .await
    .unwrap();
    assert!(!charged.replayed);
    let record = charged.record.clone().unwrap();
    assert_eq!(record.state(), pb::ParkedState::Resolved);
    assert_eq!(record.resolution, "charged");
    assert_eq!(record.charged, "2");
    assert!(!record.debit_id.is_empty());
    assert_eq!(record.resolved_by, "dev");
    assert_eq!(ledger_balance(&mut admin, "acme").await, "3");
    // The ledger's debit says what was served: 2 messages at 1 credit each.
    let entries = admin
        .list_entries(pb::ListEntriesRequest {
            account_id: "acme".into(),
            debit_id: record.debit_id.clone(),
            ..pb::ListEntriesRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let priced: Vec<_> = entries
        .iter()
        .filter(|e| e.kind() == pb::EntryKind::Debit)
        .map(|e| (e.quantity.as_str(), e.unit.as_str(), e.rate.as_str()))
        .collect();
    assert_eq!(priced, [("2", "message", "1")], "{entries:?}");
    assert_eq!(
        metric(&node, "tollgate_authority_parked_usage_open").await,
        "1"
    );
    // Replayed: the same answer, nothing charged again.
    let again = resolve(
        &mut admin,
        "resolve.1",
        &first.id,
        pb::ParkedAction::Charge,
        "",
    )
    .await
    .unwrap();
    assert!(again.replayed);
    assert_eq!(again.record, charged.record);
    assert_eq!(ledger_balance(&mut admin, "acme").await, "3");

    // Written off: nothing charged, listed as resolved with the reason.
    let missing = resolve(
        &mut admin,
        "resolve.2",
        &second.id,
        pb::ParkedAction::WriteOff,
        " ",
    )
    .await
    .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    assert!(missing.message().starts_with("reason:"), "{missing:?}");
    let written = resolve(
        &mut admin,
        "resolve.2",
        &second.id,
        pb::ParkedAction::WriteOff,
        "goodwill",
    )
    .await
    .unwrap();
    let record = written.record.clone().unwrap();
    assert_eq!(record.resolution, "written_off");
    assert_eq!(record.resolution_reason, "goodwill");
    assert_eq!(record.charged, "");
    assert_eq!(ledger_balance(&mut admin, "acme").await, "3");
    let again = resolve(
        &mut admin,
        "resolve.2",
        &second.id,
        pb::ParkedAction::WriteOff,
        "goodwill",
    )
    .await
    .unwrap();
    assert!(again.replayed);
    assert_eq!(again.record, written.record);
    assert_eq!(
        metric(&node, "tollgate_authority_parked_usage_open").await,
        "0"
    );
    assert_eq!(
        metric(&node, "tollgate_authority_parked_usage_open_micros").await,
        "0"
    );
    let resolved = parked(&mut admin, "acme", pb::ParkedState::Resolved).await;
    assert_eq!(resolved.len(), 2);
    assert!(parked(&mut admin, "acme", pb::ParkedState::Open)
        .await
        .is_empty());

    // Resolved already, under another key: refused; the same key for another action: a conflict.
    let twice = resolve(
        &mut admin,
        "resolve.3",
        &second.id,
        pb::ParkedAction::Charge,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(twice.code(), tonic::Code::FailedPrecondition, "{twice:?}");
    let conflict = resolve(
        &mut admin,
        "resolve.2",
        &second.id,
        pb::ParkedAction::Charge,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(conflict.code(), tonic::Code::AlreadyExists, "{conflict:?}");
    assert_eq!(ledger_balance(&mut admin, "acme").await, "3");

    // Bad input names its field; an unknown id is NOT_FOUND.
    for ((key, id, action), field, code) in [
        (
            ("r", "999", pb::ParkedAction::WriteOff),
            "",
            tonic::Code::NotFound,
        ),
        (
            ("r", "abc", pb::ParkedAction::WriteOff),
            "id:",
            tonic::Code::InvalidArgument,
        ),
        (
            ("r", &first.id, pb::ParkedAction::Unspecified),
            "action:",
            tonic::Code::InvalidArgument,
        ),
        (
            ("", &first.id, pb::ParkedAction::WriteOff),
            "idempotency_key:",
            tonic::Code::InvalidArgument,
        ),
    ] {
        let status = resolve(&mut admin, key, id, action, "x").await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    }
    let bad_token = admin
        .list_parked_usage(pb::ListParkedUsageRequest {
            page_token: "x".into(),
            ..pb::ListParkedUsageRequest::default()
        })
        .await
        .unwrap_err();
    assert!(
        bad_token.message().starts_with("page_token:"),
        "{bad_token:?}"
    );

    // Paged: one record a page, then the next.
    let page = admin
        .list_parked_usage(pb::ListParkedUsageRequest {
            page_size: 1,
            ..pb::ListParkedUsageRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.records.len(), 1);
    let next = admin
        .list_parked_usage(pb::ListParkedUsageRequest {
            page_size: 1,
            page_token: page.next_page_token,
            ..pb::ListParkedUsageRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.records[0].id, second.id);

    let verified = admin
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    let audit = admin
        .list_audit_records(pb::ListAuditRecordsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let resolutions: Vec<&str> = audit
        .records
        .iter()
        .filter(|r| r.method == "ResolveParkedUsage" && r.outcome == "done")
        .map(|r| r.idempotency_key.as_str())
        .collect();
    assert!(resolutions.contains(&"resolve.1"), "{audit:?}");
    assert!(resolutions.contains(&"resolve.2"), "{audit:?}");
    node.stop().await;
}
