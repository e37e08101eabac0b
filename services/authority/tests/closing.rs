//! Voiding a grant on the embedded node over gRPC: the region and the edge's lease give its
//! credits back before the ledger closes them, so nothing more is spent from it, what the void
//! closes is what was really left, and a grant with credits under a pending hold is not voided
//! until the hold ends (FAILED_PRECONDITION, saying so). A negative adjustment takes its
//! credits back from the region the same way before the ledger shrinks the grants.

use tollgate_proto::pb;

mod common;

use common::grpc::{
    chat_at_one_credit, create_account, debit, debited, grant, hold, reconciled_ledger_balance,
    refusal_code, release, Admin,
};
use common::{Node, WAIT_MS};

async fn void(admin: &mut Admin, key: &str, grant_id: &str) -> Result<pb::Receipt, tonic::Status> {
    let reply = admin
        .void_grant(pb::VoidGrantRequest {
            idempotency_key: key.into(),
            account_id: "acme".into(),
            grant_id: grant_id.into(),
            memo: "voided in a test".into(),
        })
        .await?
        .into_inner();
    Ok(done(reply, "void"))
}

/// The receipt of a mutation that went through.
fn done(reply: pb::MutationReply, what: &str) -> pb::Receipt {
    match reply.outcome {
        Some(pb::mutation_reply::Outcome::Done(receipt)) => receipt,
        other => panic!("the {what} was refused: {other:?}"),
    }
}

/// What the void entries of the receipt closed.
fn voided(receipt: &pb::Receipt) -> Vec<(&str, &str)> {
    receipt
        .movements
        .iter()
        .filter(|m| m.kind() == pb::EntryKind::Void)
        .map(|m| (m.grant_id.as_str(), m.amount.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voided_grant_is_spent_no_more_in_strict_or_cached_mode() {
    let node = Node::start().await;
    let mut admin = node.admin();
    let mut edge = node.edge();
    chat_at_one_credit(&mut admin, "one chat message").await;
    create_account(&mut admin, "acme").await;
    grant(&mut admin, "acme", "bought", "100").await;
    // A strict spend, then cached ones: the edge holds a lease of the grant's credits.
    debited(debit(&mut edge, "acme", "s1", "3", pb::EnforcementMode::Strict).await);
    for n in 0..4 {
        debited(
            debit(
                &mut edge,
                "acme",
                &format!("c{n}"),
                "1",
                pb::EnforcementMode::Cached,
            )
            .await,
        );
    }

    // The void waits for the region and the lease to give back, and for the 7 spent to be
    // reconciled: it closes the 93 left, not the 100 the ledger had before.
    let receipt = void(&mut admin, "v1", "bought").await.unwrap();
    assert_eq!(voided(&receipt), vec![("bought", "93")]);
    for mode in [pb::EnforcementMode::Strict, pb::EnforcementMode::Cached] {
        let after = debit(&mut edge, "acme", &format!("after-{mode:?}"), "1", mode).await;
        assert_eq!(refusal_code(after), pb::RefusalCode::InsufficientCredits);
    }
    assert_eq!(
        reconciled_ledger_balance(&mut admin, "acme", "0", WAIT_MS).await,
        "0"
    );
    // The same void again replays its receipt.
    let again = void(&mut admin, "v1", "bought").await.unwrap();
    assert!(again.replayed);
    assert_eq!(voided(&again), vec![("bought", "93")]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_under_a_pending_hold_is_voided_only_once_the_hold_ends() {
    let node = Node::start().await;
    let mut admin = node.admin();
    let mut edge = node.edge();
    chat_at_one_credit(&mut admin, "one chat message").await;
    create_account(&mut admin, "acme").await;
    grant(&mut admin, "acme", "bought", "50").await;
    let held = hold(&mut edge, "acme", "h1", "5").await;

    let refused = void(&mut admin, "v1", "bought").await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("pending hold"),
        "{}",
        refused.message()
    );
    // Nothing was closed: the account still spends the grant.
    debited(debit(&mut edge, "acme", "d1", "2", pb::EnforcementMode::Strict).await);

    release(&mut edge, "acme", "r1", &held.hold_id).await;
    let receipt = void(&mut admin, "v2", "bought").await.unwrap();
    assert_eq!(voided(&receipt), vec![("bought", "48")]);
    let after = debit(&mut edge, "acme", "d2", "1", pb::EnforcementMode::Strict).await;
    assert_eq!(refusal_code(after), pb::RefusalCode::InsufficientCredits);
    node.stop().await;
}

async fn adjust(admin: &mut Admin, key: &str, amount: &str) -> Result<pb::Receipt, tonic::Status> {
    let reply = admin
        .adjust(pb::AdjustRequest {
            idempotency_key: key.into(),
            account_id: "acme".into(),
            amount: amount.into(),
            memo: "adjusted in a test".into(),
            ..pb::AdjustRequest::default()
        })
        .await?
        .into_inner();
    Ok(done(reply, "adjustment"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_adjustment_takes_its_credits_back_from_the_region_and_the_lease() {
    let node = Node::start().await;
    let mut admin = node.admin();
    let mut edge = node.edge();
    chat_at_one_credit(&mut admin, "one chat message").await;
    create_account(&mut admin, "acme").await;
    grant(&mut admin, "acme", "bought", "100").await;
    // The region holds a slice of the grant and the edge a lease of it.
    debited(debit(&mut edge, "acme", "s1", "3", pb::EnforcementMode::Strict).await);
    for n in 0..3 {
        let key = format!("c{n}");
        debited(debit(&mut edge, "acme", &key, "1", pb::EnforcementMode::Cached).await);
    }
    // 94 left: taking 90 away leaves 4 the account can spend, in the ledger and at the edge.
    let receipt = adjust(&mut admin, "a1", "-90").await.unwrap();
    let taken: Vec<(&str, &str)> = receipt
        .movements
        .iter()
        .filter(|m| m.kind() == pb::EntryKind::Adjust)
        .map(|m| (m.grant_id.as_str(), m.amount.as_str()))
        .collect();
    assert_eq!(taken, vec![("bought", "-90")]);
    debited(debit(&mut edge, "acme", "d1", "4", pb::EnforcementMode::Strict).await);
    for mode in [pb::EnforcementMode::Strict, pb::EnforcementMode::Cached] {
        let after = debit(&mut edge, "acme", &format!("after-{mode:?}"), "1", mode).await;
        assert_eq!(refusal_code(after), pb::RefusalCode::InsufficientCredits);
    }
    assert_eq!(
        reconciled_ledger_balance(&mut admin, "acme", "0", WAIT_MS).await,
        "0"
    );
    let parked = admin
        .list_parked_usage(pb::ListParkedUsageRequest {
            account_id: "acme".into(),
            ..pb::ListParkedUsageRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(
        parked.is_empty(),
        "nothing served beyond the ledger: {parked:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_adjustment_needing_held_credits_waits_for_the_hold_and_others_go_through() {
    let node = Node::start().await;
    let mut admin = node.admin();
    let mut edge = node.edge();
    chat_at_one_credit(&mut admin, "one chat message").await;
    create_account(&mut admin, "acme").await;
    grant(&mut admin, "acme", "bought", "50").await;
    let held = hold(&mut edge, "acme", "h1", "5").await;
    // 45 can be taken back; the 5 under the hold cannot, and nothing else would pay for them.
    let refused = adjust(&mut admin, "a1", "-48").await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("pending hold"),
        "{}",
        refused.message()
    );
    // Nothing was adjusted: the account still spends the grant.
    debited(debit(&mut edge, "acme", "d1", "2", pb::EnforcementMode::Strict).await);
    // An adjustment the free credits cover goes through while the hold stays.
    adjust(&mut admin, "a2", "-40").await.unwrap();
    release(&mut edge, "acme", "r1", &held.hold_id).await;
    assert_eq!(
        reconciled_ledger_balance(&mut admin, "acme", "8", WAIT_MS).await,
        "8"
    );
    debited(debit(&mut edge, "acme", "d2", "8", pb::EnforcementMode::Strict).await);
    let after = debit(&mut edge, "acme", "d3", "1", pb::EnforcementMode::Strict).await;
    assert_eq!(refusal_code(after), pb::RefusalCode::InsufficientCredits);
    node.stop().await;
}
