//! One conformance suite for every `LedgerStore`: each check is an async function over a
//! [`Fixture`], and `tests/postgres.rs` and `tests/sqlite.rs` instantiate all of them.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use tollgate_core::command::{
    Adjust, CloseGrant, CloseKind, CreateAccount, GrantTerms, IssueGrant, Memo, Metadata, Refund,
    SettleDebt, UpdateAccount, UsageDebit,
};
use tollgate_core::{
    AccountId, BurnPlan, Credits, DebitId, Draw, EntryKind, FeatureKey, GrantId, GrantSource,
    GrantState, IdempotencyKey, PriceRule, Quantity, Rate, Timestamp,
};
use tollgate_ledger::{
    EntryFilter, LedgerError, LedgerStore, PageRequest, PostgresLedger, ProblemKind, Receipt,
    RefusalCode, SqliteLedger, UsageOutcome, OPEN_GRANTS_MAX,
};
use tollgate_testkit::postgres::PostgresServer;

/// A store under test, with raw SQL access to play an attacker or count rows.
pub enum Fixture {
    Postgres {
        store: Arc<PostgresLedger>,
        _server: PostgresServer,
    },
    Sqlite {
        store: Arc<SqliteLedger>,
        _dir: tempfile::TempDir,
    },
}

impl Fixture {
    pub async fn postgres() -> Fixture {
        let server = PostgresServer::start().expect("start an ephemeral PostgreSQL");
        let store = PostgresLedger::connect(&server.url())
            .await
            .expect("connect and migrate");
        Fixture::Postgres {
            store: Arc::new(store),
            _server: server,
        }
    }

    pub async fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = SqliteLedger::open(&dir.path().join("ledger.db"))
            .await
            .expect("open and migrate");
        Fixture::Sqlite {
            store: Arc::new(store),
            _dir: dir,
        }
    }

    pub fn store(&self) -> Arc<dyn LedgerStore> {
        match self {
            Fixture::Postgres { store, .. } => store.clone(),
            Fixture::Sqlite { store, .. } => store.clone(),
        }
    }

    /// Runs raw SQL (several statements allowed), as an operator with a SQL shell would.
    pub async fn execute(&self, sql: &str) -> Result<(), sqlx::Error> {
        match self {
            Fixture::Postgres { store, .. } => {
                sqlx::raw_sql(sql).execute(store.pool()).await.map(|_| ())
            }
            Fixture::Sqlite { store, .. } => {
                sqlx::raw_sql(sql).execute(store.pool()).await.map(|_| ())
            }
        }
    }

    /// Disables the append-only guard on `ledger_entries`, as a privileged attacker could.
    pub async fn disable_append_only_guard(&self) {
        let sql = match self {
            Fixture::Postgres { .. } => {
                "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only"
            }
            Fixture::Sqlite { .. } => "DROP TRIGGER ledger_entries_no_update",
        };
        self.execute(sql).await.expect("disable the guard");
    }

    /// One more credit than recorded, in the column's own unit.
    pub fn plus_one_credit(&self) -> &'static str {
        match self {
            Fixture::Postgres { .. } => "amount + 1",
            Fixture::Sqlite { .. } => "amount + 1000000",
        }
    }

    pub fn remaining_plus_one_credit(&self) -> &'static str {
        match self {
            Fixture::Postgres { .. } => "remaining + 1",
            Fixture::Sqlite { .. } => "remaining + 1000000",
        }
    }
}

/// Instantiates every check of the suite as a `#[tokio::test]` on the given fixture.
#[macro_export]
macro_rules! conformance_suite {
    ($fixture:path) => {
        $crate::conformance_suite!(@tests $fixture;
            accounts_are_created_once_and_read_back,
            account_terms_change_without_entries,
            idempotency_records_are_forgotten_after_their_retention,
            grants_usage_and_refunds_move_the_materialized_balance,
            a_refund_larger_than_what_remains_refundable_is_refused,
            a_refund_to_an_expired_grant_lands_in_a_new_refund_grant,
            replayed_usage_is_a_no_op,
            a_debit_id_reused_for_another_decision_is_charged_under_its_next_generation,
            usage_the_ledger_cannot_take_is_refused_per_debit,
            debt_whose_usage_arrives_after_a_grant_is_settled_from_it,
            grants_spent_to_zero_are_read_only_when_named,
            idempotent_mutations_replay_their_first_result,
            adjustments_and_voids_follow_the_rules,
            entries_page_and_filter,
            usage_entries_carry_the_quantity_unit_and_rate_they_were_priced_with,
            entries_are_append_only,
            a_changed_entry_is_reported_with_its_account_and_sequence,
            a_changed_grant_is_reported,
            concurrent_writers_keep_the_invariants,
        );
    };
    (@tests $fixture:path; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let fixture = $fixture().await;
                conformance::$check(&fixture).await;
            }
        )*
    };
}

pub const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

pub fn at(offset_ms: i64) -> Timestamp {
    Timestamp::from_millis(T0 + offset_ms).unwrap()
}

pub fn credits(text: &str) -> Credits {
    Credits::parse(text).unwrap()
}

pub fn account(id: &str) -> AccountId {
    AccountId::new(id).unwrap()
}

pub fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::new(text).unwrap()
}

pub fn grant_id(id: &str) -> GrantId {
    GrantId::new(id).unwrap()
}

pub fn debit_id(id: &str) -> DebitId {
    DebitId::new(id).unwrap()
}

pub fn feature() -> FeatureKey {
    FeatureKey::new("ai_message_gen").unwrap()
}

pub async fn create(store: &dyn LedgerStore, id: &str, overdraft: &str) {
    store
        .create_account(
            CreateAccount {
                key: key(&format!("create-{id}")),
                account: account(id),
                overdraft_limit: credits(overdraft),
                metadata: Metadata::default(),
            },
            at(0),
        )
        .await
        .expect("create account");
}

pub fn terms(id: &str, amount: &str) -> GrantTerms {
    GrantTerms {
        effective_at: Some(at(0)),
        ..GrantTerms::new(grant_id(id), credits(amount), GrantSource::Purchase)
    }
}

pub async fn issue(
    store: &dyn LedgerStore,
    acct: &str,
    terms: GrantTerms,
    now: Timestamp,
) -> Receipt {
    store
        .issue_grant(
            IssueGrant {
                key: key(&format!("issue-{acct}-{}", terms.id)),
                account: account(acct),
                terms,
                metadata: Metadata::default(),
                memo: Memo::default(),
            },
            now,
        )
        .await
        .expect("issue grant")
        .expect("grant accepted")
}

pub fn usage(
    acct: &str,
    id: &str,
    event: Timestamp,
    draws: &[(&str, &str)],
    overdraft: &str,
) -> UsageDebit {
    UsageDebit {
        debit_id: debit_id(id),
        idempotency_key: None,
        account: account(acct),
        feature: feature(),
        at: event,
        plan: BurnPlan {
            draws: draws
                .iter()
                .map(|(grant, amount)| Draw {
                    grant_id: grant_id(grant),
                    amount: credits(amount),
                })
                .collect(),
            overdraft: credits(overdraft),
        },
        price_version: 3,
        price_rule: PriceRule::Default,
        quantity: None,
        rate: None,
        unit: None,
        actor: None,
        region: None,
        hold: None,
    }
}

pub fn refund_cmd(acct: &str, k: &str, debit: &str, amount: &str) -> Refund {
    Refund {
        key: key(k),
        account: account(acct),
        debit: debit_id(debit),
        amount: credits(amount),
        refund_grant_id: None,
        refund_grant_expires_at: None,
        memo: Memo::default(),
    }
}

async fn balance(store: &dyn LedgerStore, acct: &str) -> Credits {
    store.account(&account(acct)).await.unwrap().balance
}

async fn assert_clean(store: &dyn LedgerStore) {
    let report = store.verify(None).await.unwrap();
    assert!(
        report.is_clean(),
        "verify found problems: {:#?}",
        report.problems
    );
}

// ---------------------------------------------------------------------------------------------

pub async fn accounts_are_created_once_and_read_back(f: &Fixture) {
    let store = f.store();
    let metadata = Metadata::new(BTreeMap::from([("plan".to_owned(), "pro".to_owned())])).unwrap();
    let command = CreateAccount {
        key: key("k-create"),
        account: account("acme"),
        overdraft_limit: credits("5"),
        metadata,
    };
    let created = store.create_account(command.clone(), at(0)).await.unwrap();
    assert_eq!(created.balance, Credits::ZERO);
    assert_eq!(created.entry_count, 0);
    let read = store.account(&account("acme")).await.unwrap();
    assert_eq!(read, created);

    // The same key and request: the first result again, at a later time.
    let replay = store.create_account(command.clone(), at(99)).await.unwrap();
    assert_eq!(replay, created);
    // A new key for an existing account is refused.
    let again = CreateAccount {
        key: key("k-create-2"),
        ..command.clone()
    };
    assert!(matches!(
        store.create_account(again, at(1)).await,
        Err(LedgerError::AccountExists(_))
    ));
    // The same key for a different request is a conflict.
    let different = CreateAccount {
        overdraft_limit: credits("6"),
        ..command
    };
    assert!(matches!(
        store.create_account(different, at(1)).await,
        Err(LedgerError::IdempotencyConflict { .. })
    ));
    assert!(matches!(
        store.account(&account("nobody")).await,
        Err(LedgerError::UnknownAccount(_))
    ));
}

pub async fn account_terms_change_without_entries(f: &Fixture) {
    let store = f.store();
    let store = &*store;
    create(store, "acme", "5").await;
    issue(store, "acme", terms("g1", "10"), at(1)).await;
    let before = store.account(&account("acme")).await.unwrap();
    let entries = |pairs: &[(&str, &str)]| {
        Metadata::new(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
        .unwrap()
    };
    let command = UpdateAccount {
        key: key("k-update"),
        account: account("acme"),
        overdraft_limit: Some(credits("12.5")),
        metadata: entries(&[("tier", "gold")]),
        replace_metadata: false,
    };
    let updated = store.update_account(command.clone(), at(10)).await.unwrap();
    assert_eq!(updated.overdraft_limit, credits("12.5"));
    assert_eq!(updated.metadata.entries().get("tier").unwrap(), "gold");
    // No entry, no balance movement, the chain untouched.
    assert_eq!(updated.entry_count, before.entry_count);
    assert_eq!(updated.balance, before.balance);
    assert_eq!(updated.last_hash, before.last_hash);
    assert_eq!(store.account(&account("acme")).await.unwrap(), updated);

    // A replay returns the first result; the same key for another change is a conflict.
    assert_eq!(
        store.update_account(command.clone(), at(20)).await.unwrap(),
        updated
    );
    let other = UpdateAccount {
        overdraft_limit: Some(credits("1")),
        ..command.clone()
    };
    assert!(matches!(
        store.update_account(other, at(20)).await,
        Err(LedgerError::IdempotencyConflict { .. })
    ));

    // Merge keeps what is there; replace starts again; an unset limit stays.
    let merged = store
        .update_account(
            UpdateAccount {
                key: key("k-update-2"),
                account: account("acme"),
                overdraft_limit: None,
                metadata: entries(&[("region", "eu")]),
                replace_metadata: false,
            },
            at(30),
        )
        .await
        .unwrap();
    assert_eq!(merged.overdraft_limit, credits("12.5"));
    assert_eq!(merged.metadata.entries().len(), 2);
    let replaced = store
        .update_account(
            UpdateAccount {
                key: key("k-update-3"),
                account: account("acme"),
                overdraft_limit: None,
                metadata: entries(&[("only", "this")]),
                replace_metadata: true,
            },
            at(40),
        )
        .await
        .unwrap();
    assert_eq!(
        replaced.metadata.entries().keys().collect::<Vec<_>>(),
        ["only"]
    );

    // Too many entries after a merge: refused, nothing changes.
    let many: Vec<(String, String)> = (0..tollgate_core::command::METADATA_ENTRIES_MAX)
        .map(|i| (format!("k{i}"), "v".to_owned()))
        .collect();
    let too_many = UpdateAccount {
        key: key("k-update-4"),
        account: account("acme"),
        overdraft_limit: Some(credits("99")),
        metadata: Metadata::new(many.into_iter().collect()).unwrap(),
        replace_metadata: false,
    };
    assert!(matches!(
        store.update_account(too_many, at(50)).await,
        Err(LedgerError::InvalidArgument {
            field: "metadata",
            ..
        })
    ));
    assert_eq!(store.account(&account("acme")).await.unwrap(), replaced);
    assert!(matches!(
        store
            .update_account(
                UpdateAccount {
                    key: key("k-update-5"),
                    account: account("nobody"),
                    overdraft_limit: None,
                    metadata: Metadata::default(),
                    replace_metadata: false,
                },
                at(60),
            )
            .await,
        Err(LedgerError::UnknownAccount(_))
    ));
    assert_clean(store).await;
}

pub async fn idempotency_records_are_forgotten_after_their_retention(f: &Fixture) {
    let store = f.store();
    let store = &*store;
    create(store, "acme", "0").await;
    let first = issue(store, "acme", terms("g1", "10"), at(1_000)).await;
    issue(store, "acme", terms("g2", "5"), at(5_000)).await;
    // Nothing is old enough yet.
    assert_eq!(store.prune_idempotency(at(0), 100).await.unwrap(), 0);
    // Records before 2 s go (the account's creation and g1's issue); g2's stays.
    assert_eq!(store.prune_idempotency(at(2_000), 100).await.unwrap(), 2);
    assert_eq!(store.prune_idempotency(at(2_000), 100).await.unwrap(), 0);
    // The limit bounds one call.
    assert_eq!(store.prune_idempotency(at(9_000), 0).await.unwrap(), 0);
    assert_eq!(store.prune_idempotency(at(9_000), 1).await.unwrap(), 1);
    // A retry of g1's issue after its retention is a new request: the grant id is taken,
    // so it is refused rather than granted twice.
    let retried = store
        .issue_grant(
            IssueGrant {
                key: key("issue-acme-g1"),
                account: account("acme"),
                terms: terms("g1", "10"),
                metadata: Metadata::default(),
                memo: Memo::default(),
            },
            at(10_000),
        )
        .await
        .unwrap();
    assert!(retried.is_err(), "{retried:?} after {first:?}");
    assert_eq!(balance(store, "acme").await, credits("15"));
    assert_clean(store).await;
}

pub async fn grants_usage_and_refunds_move_the_materialized_balance(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "0").await;
    let receipt = issue(&*store, "acme", terms("g1", "10"), at(1)).await;
    assert_eq!(receipt.balance, credits("10"));
    assert_eq!((receipt.first_seq, receipt.last_seq), (1, 1));
    let mut cheap = terms("g0", "2");
    cheap.priority = Some(0);
    issue(&*store, "acme", cheap, at(2)).await;

    let outcomes = store
        .apply_usage(
            vec![usage(
                "acme",
                "d1",
                at(3),
                &[("g0", "2"), ("g1", "1.5")],
                "0",
            )],
            at(10),
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![UsageOutcome::Applied {
            debit_id: debit_id("d1"),
            first_seq: 3,
            last_seq: 4
        }]
    );
    assert_eq!(balance(&*store, "acme").await, credits("8.5"));

    let refunded = store
        .refund(refund_cmd("acme", "k-r1", "d1", "2.5"), at(11))
        .await
        .unwrap()
        .unwrap();
    // The last draw goes back first: 1.5 to g1, then 1 to g0.
    let lines: Vec<(EntryKind, String, Option<String>)> = refunded
        .movements
        .iter()
        .map(|m| {
            (
                m.kind,
                m.amount.to_string(),
                m.grant_id.as_ref().map(ToString::to_string),
            )
        })
        .collect();
    assert_eq!(
        lines,
        vec![
            (EntryKind::Refund, "1.5".into(), Some("g1".into())),
            (EntryKind::Refund, "1".into(), Some("g0".into())),
        ]
    );
    assert_eq!(refunded.balance, credits("11"));
    let snapshot = store.account(&account("acme")).await.unwrap();
    assert_eq!(snapshot.totals.granted, credits("12"));
    assert_eq!(snapshot.totals.debited, credits("3.5"));
    assert_eq!(snapshot.totals.refunded, credits("2.5"));
    assert_eq!(snapshot.entry_count, 6);
    let grants = store
        .grants(&account("acme"), false, PageRequest::default())
        .await
        .unwrap();
    let remaining: Vec<(String, String)> = grants
        .items
        .iter()
        .map(|r| (r.grant.id.to_string(), r.grant.remaining.to_string()))
        .collect();
    assert_eq!(
        remaining,
        vec![("g0".into(), "1".into()), ("g1".into(), "10".into())]
    );
    assert_clean(&*store).await;
}

pub async fn a_refund_larger_than_what_remains_refundable_is_refused(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "0").await;
    issue(&*store, "acme", terms("g1", "10"), at(1)).await;
    store
        .apply_usage(vec![usage("acme", "d1", at(2), &[("g1", "4")], "0")], at(3))
        .await
        .unwrap();
    store
        .refund(refund_cmd("acme", "k-r1", "d1", "3"), at(4))
        .await
        .unwrap()
        .unwrap();
    let before = store.account(&account("acme")).await.unwrap();
    // 4 debited, 3 refunded: 1 remains refundable, 1.000001 is refused.
    let refused = store
        .refund(refund_cmd("acme", "k-r2", "d1", "1.000001"), at(5))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.code, RefusalCode::RefundExceedsDebit);
    let after = store.account(&account("acme")).await.unwrap();
    assert_eq!(after, before, "a refusal moves nothing");
    // Exactly what remains is fine.
    store
        .refund(refund_cmd("acme", "k-r3", "d1", "1"), at(6))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        store
            .refund(refund_cmd("acme", "k-r4", "nope", "1"), at(7))
            .await,
        Err(LedgerError::UnknownDebit { .. })
    ));
    assert_clean(&*store).await;
}

pub async fn a_refund_to_an_expired_grant_lands_in_a_new_refund_grant(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "0").await;
    let mut monthly = terms("monthly", "10");
    monthly.source = GrantSource::Subscription;
    monthly.expires_at = Some(at(1_000));
    issue(&*store, "acme", monthly, at(1)).await;
    store
        .apply_usage(
            vec![usage("acme", "d1", at(500), &[("monthly", "4")], "0")],
            at(501),
        )
        .await
        .unwrap();
    let expired = store
        .close_grant(
            CloseGrant {
                key: key("k-expire"),
                account: account("acme"),
                grant: grant_id("monthly"),
                kind: CloseKind::Expire,
                memo: Memo::default(),
            },
            at(1_000),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(expired.movements[0].kind, EntryKind::Expire);
    assert_eq!(expired.movements[0].amount, credits("6"));
    assert_eq!(expired.balance, Credits::ZERO);

    let mut command = refund_cmd("acme", "k-refund", "d1", "4");
    command.refund_grant_expires_at = Some(at(90_000));
    let receipt = store.refund(command, at(2_000)).await.unwrap().unwrap();
    let refund_grant = receipt.grant_id.clone().expect("a new refund grant");
    assert_eq!(receipt.balance, credits("4"));
    let grants = store
        .grants(&account("acme"), true, PageRequest::default())
        .await
        .unwrap();
    assert_eq!(grants.items.len(), 1, "only the refund grant is open");
    let grant = &grants.items[0].grant;
    assert_eq!(grant.id, refund_grant);
    assert_eq!(grant.source, GrantSource::Refund);
    assert_eq!(grant.amount, credits("4"));
    assert_eq!(grant.expires_at, Some(at(90_000)));
    assert_eq!(grant.priority, GrantSource::Subscription.default_priority());
    let all = store
        .grants(&account("acme"), false, PageRequest::default())
        .await
        .unwrap();
    let monthly = all
        .items
        .iter()
        .find(|r| r.grant.id == grant_id("monthly"))
        .unwrap();
    assert_eq!(monthly.grant.state, GrantState::Expired);
    assert_eq!(monthly.grant.remaining, Credits::ZERO);
    assert_clean(&*store).await;
}

pub async fn replayed_usage_is_a_no_op(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "0").await;
    issue(&*store, "acme", terms("g1", "10"), at(1)).await;
    let batch = vec![
        usage("acme", "d1", at(2), &[("g1", "1")], "0"),
        usage("acme", "d2", at(3), &[("g1", "2")], "0"),
        // The same id twice in one batch: the second is a duplicate.
        usage("acme", "d2", at(3), &[("g1", "2")], "0"),
    ];
    let first = store.apply_usage(batch.clone(), at(10)).await.unwrap();
    assert!(matches!(first[0], UsageOutcome::Applied { .. }));
    assert!(matches!(first[1], UsageOutcome::Applied { .. }));
    assert_eq!(
        first[2],
        UsageOutcome::Duplicate {
            debit_id: debit_id("d2")
        }
    );
    let before = store.account(&account("acme")).await.unwrap();
    assert_eq!(before.balance, credits("7"));
    let again = store.apply_usage(batch, at(20)).await.unwrap();
    assert!(again
        .iter()
        .all(|o| matches!(o, UsageOutcome::Duplicate { .. })));
    assert_eq!(store.account(&account("acme")).await.unwrap(), before);
    assert_clean(&*store).await;
}

/// A region forgets an idempotency key after its retention; the ledger keeps debit ids for
/// ever. A key reused later is another decision (another event time): it is charged under the
/// id's next generation, not taken for a replay. The same decision again is still a duplicate.
pub async fn a_debit_id_reused_for_another_decision_is_charged_under_its_next_generation(
    f: &Fixture,
) {
    let store = f.store();
    create(&*store, "acme", "0").await;
    issue(&*store, "acme", terms("g1", "10"), at(1)).await;
    let first = usage("acme", "d1", at(2), &[("g1", "1")], "0");
    let day_later = usage("acme", "d1", at(2 + 86_400_001), &[("g1", "3")], "0");
    let outcomes = store
        .apply_usage(vec![first.clone(), day_later.clone()], at(10))
        .await
        .unwrap();
    let second_id = tollgate_ledger::debit_generation(&debit_id("d1"), 2).unwrap();
    assert!(
        matches!(&outcomes[0], UsageOutcome::Applied { debit_id: id, .. } if *id == debit_id("d1")),
        "{outcomes:?}"
    );
    assert!(
        matches!(&outcomes[1], UsageOutcome::Applied { debit_id: id, .. } if *id == second_id),
        "{outcomes:?}"
    );
    assert_eq!(
        store.account(&account("acme")).await.unwrap().balance,
        credits("6")
    );
    // Both again, and a third decision under the same id, in a later batch.
    let third = usage("acme", "d1", at(2 + 2 * 86_400_001), &[("g1", "2")], "0");
    let again = store
        .apply_usage(vec![day_later, first, third], at(20))
        .await
        .unwrap();
    assert_eq!(
        again[..2],
        [
            UsageOutcome::Duplicate {
                debit_id: second_id.clone()
            },
            UsageOutcome::Duplicate {
                debit_id: debit_id("d1")
            },
        ]
    );
    let third_id = tollgate_ledger::debit_generation(&debit_id("d1"), 3).unwrap();
    assert!(
        matches!(&again[2], UsageOutcome::Applied { debit_id: id, .. } if *id == third_id),
        "{again:?}"
    );
    assert_eq!(
        store.account(&account("acme")).await.unwrap().balance,
        credits("4")
    );
    assert_clean(&*store).await;
}

pub async fn usage_the_ledger_cannot_take_is_refused_per_debit(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "1").await;
    issue(&*store, "acme", terms("g1", "5"), at(1)).await;
    let outcomes = store
        .apply_usage(
            vec![
                usage("acme", "too-much", at(2), &[("g1", "6")], "0"),
                usage("acme", "unknown-grant", at(2), &[("ghost", "1")], "0"),
                usage("nobody", "unknown-account", at(2), &[("g1", "1")], "0"),
                usage("acme", "over-limit", at(2), &[("g1", "5")], "1.5"),
                usage("acme", "fine", at(2), &[("g1", "5")], "1"),
            ],
            at(3),
        )
        .await
        .unwrap();
    let codes: Vec<Option<RefusalCode>> = outcomes
        .iter()
        .map(|o| match o {
            UsageOutcome::Refused { refusal, .. } => Some(refusal.code),
            _ => None,
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            Some(RefusalCode::DrawExceedsGrant),
            Some(RefusalCode::UnknownGrant),
            Some(RefusalCode::UnknownAccount),
            Some(RefusalCode::OverdraftExceeded),
            None,
        ]
    );
    let snapshot = store.account(&account("acme")).await.unwrap();
    assert_eq!(snapshot.balance, credits("-1"));
    assert_eq!(snapshot.debt, credits("1"));
    // The next grant settles the debt first.
    let receipt = issue(&*store, "acme", terms("g2", "3"), at(4)).await;
    assert_eq!(receipt.movements[1].kind, EntryKind::Settle);
    assert_eq!(receipt.balance, credits("2"));
    assert_eq!(
        store.account(&account("acme")).await.unwrap().debt,
        Credits::ZERO
    );
    assert_clean(&*store).await;
}

/// Usage that ran into overdraft before a grant was issued and reached the ledger after it
/// leaves debt beside the grant's credits; `settle_debt` settles it from that grant, at most
/// the debt and what the grant has, once per key; a grant not in effect yet settles nothing.
pub async fn debt_whose_usage_arrives_after_a_grant_is_settled_from_it(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "10").await;
    issue(&*store, "acme", terms("g1", "5"), at(1)).await;
    // Issued at 3, while usage of 2 is still on its way.
    issue(&*store, "acme", terms("g2", "20"), at(3)).await;
    let outcomes = store
        .apply_usage(vec![usage("acme", "d1", at(2), &[("g1", "5")], "4")], at(4))
        .await
        .unwrap();
    assert!(matches!(outcomes[0], UsageOutcome::Applied { .. }));
    let before = store.account(&account("acme")).await.unwrap();
    assert_eq!((before.balance, before.debt), (credits("16"), credits("4")));
    let settle = |k: &str, grant: &str, amount: &str| SettleDebt {
        key: key(k),
        account: account("acme"),
        grant: grant_id(grant),
        amount: credits(amount),
        memo: Memo::default(),
    };
    // At most what was asked: 3 of the 4.
    let receipt = store
        .settle_debt(settle("s1", "g2", "3"), at(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(receipt.movements.len(), 1);
    assert_eq!(receipt.movements[0].kind, EntryKind::Settle);
    assert_eq!(receipt.movements[0].amount, credits("3"));
    assert_eq!(receipt.balance, credits("16"));
    // The same key again moves nothing.
    let again = store
        .settle_debt(settle("s1", "g2", "3"), at(6))
        .await
        .unwrap()
        .unwrap();
    assert!(again.replayed);
    // Never more than the debt left.
    let rest = store
        .settle_debt(settle("s2", "g2", "50"), at(7))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest.movements[0].amount, credits("1"));
    let after = store.account(&account("acme")).await.unwrap();
    assert_eq!((after.balance, after.debt), (credits("16"), Credits::ZERO));
    let g2 = store
        .grant(&account("acme"), &grant_id("g2"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g2.grant.remaining, credits("16"));
    // No debt: nothing to settle, nothing written.
    let none = store
        .settle_debt(settle("s3", "g2", "1"), at(8))
        .await
        .unwrap()
        .unwrap();
    assert!(none.movements.is_empty());
    // A grant not in effect yet is refused.
    issue(
        &*store,
        "acme",
        GrantTerms {
            effective_at: Some(at(1_000)),
            ..terms("later", "5")
        },
        at(9),
    )
    .await;
    let refused = store
        .settle_debt(settle("s4", "later", "1"), at(10))
        .await
        .unwrap();
    assert_eq!(refused.unwrap_err().code, RefusalCode::GrantClosed);
    assert_clean(&*store).await;
}

/// Mutations and allocations read an account's open grants that hold credits, so their work
/// does not grow with every grant ever spent. A grant spent to zero stays open and is still
/// found by what names it: a refund of a debit that drew it, usage that draws it, a new grant
/// reusing its id.
pub async fn grants_spent_to_zero_are_read_only_when_named(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "0").await;
    issue(&*store, "acme", terms("g1", "10"), at(1)).await;
    let mut first = terms("g0", "5");
    first.priority = Some(0);
    issue(&*store, "acme", first, at(2)).await;
    let ids = |grants: Vec<tollgate_core::Grant>| -> Vec<(String, String)> {
        grants
            .iter()
            .map(|g| (g.id.to_string(), g.remaining.to_string()))
            .collect()
    };
    store
        .apply_usage(vec![usage("acme", "d1", at(3), &[("g0", "5")], "0")], at(4))
        .await
        .unwrap();
    assert_eq!(
        ids(store
            .grants_with_credits(&account("acme"), OPEN_GRANTS_MAX)
            .await
            .unwrap()),
        [("g1".to_string(), "10".to_string())]
    );
    let open = store
        .grants(&account("acme"), true, PageRequest::default())
        .await
        .unwrap();
    assert_eq!(open.items.len(), 2, "a grant spent to zero stays open");

    // Usage naming the empty grant is refused for that debit only.
    let outcomes = store
        .apply_usage(
            vec![
                usage("acme", "stale", at(5), &[("g0", "1")], "0"),
                usage("acme", "d2", at(5), &[("g1", "1")], "0"),
            ],
            at(6),
        )
        .await
        .unwrap();
    assert!(matches!(
        &outcomes[0],
        UsageOutcome::Refused { refusal, .. } if refusal.code == RefusalCode::DrawExceedsGrant
    ));
    assert!(matches!(outcomes[1], UsageOutcome::Applied { .. }));

    // A refund of the debit that spent it gives its credits back to it.
    let refunded = store
        .refund(refund_cmd("acme", "k-r1", "d1", "2"), at(7))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(refunded.movements[0].grant_id, Some(grant_id("g0")));
    assert_eq!(refunded.balance, credits("11"));
    assert_eq!(
        ids(store
            .grants_with_credits(&account("acme"), OPEN_GRANTS_MAX)
            .await
            .unwrap()),
        [
            ("g0".to_string(), "2".to_string()),
            ("g1".to_string(), "9".to_string())
        ]
    );

    // Spent to zero again, its id is still taken.
    store
        .apply_usage(vec![usage("acme", "d3", at(8), &[("g0", "2")], "0")], at(9))
        .await
        .unwrap();
    let again = store
        .issue_grant(
            IssueGrant {
                key: key("issue-g0-again"),
                account: account("acme"),
                terms: terms("g0", "1"),
                metadata: Metadata::default(),
                memo: Memo::default(),
            },
            at(10),
        )
        .await
        .unwrap();
    assert!(matches!(again, Err(refusal) if refusal.code == RefusalCode::DuplicateGrant));
    assert!(matches!(
        store
            .grants_with_credits(&account("nobody"), OPEN_GRANTS_MAX)
            .await,
        Err(LedgerError::UnknownAccount(_))
    ));

    // A refund that must land in a new grant, whose generated id a caller already took, is
    // refused rather than written over a grant it never read.
    store
        .close_grant(
            CloseGrant {
                key: key("k-void-g0"),
                account: account("acme"),
                grant: grant_id("g0"),
                kind: CloseKind::Void,
                memo: Memo::default(),
            },
            at(11),
        )
        .await
        .unwrap()
        .unwrap();
    let entries = store.account(&account("acme")).await.unwrap().entry_count;
    // The issue below is entry `entries + 1`; the refund would name its grant after the next.
    let taken = format!("d3.refund.{}", entries + 2);
    issue(&*store, "acme", terms(&taken, "1"), at(12)).await;
    let refused = store
        .refund(refund_cmd("acme", "k-r3", "d3", "2"), at(13))
        .await
        .unwrap();
    assert!(
        matches!(&refused, Err(refusal) if refusal.code == RefusalCode::DuplicateGrant),
        "{refused:?}"
    );
    assert_eq!(balance(&*store, "acme").await, credits("10"));

    // Grants holding credits come in burn-down order: priority, expiry (none last), effective
    // time, then id byte by byte ("B" before "a", whatever the database's collation).
    for (id, priority, expires) in [
        ("a-tie", 60, None),
        ("B-tie", 60, None),
        ("soon", 60, Some(at(100_000))),
        ("first", 5, None),
    ] {
        let mut grant = terms(id, "1");
        grant.priority = Some(priority);
        grant.expires_at = expires;
        issue(&*store, "acme", grant, at(14)).await;
    }
    let order = |grants: Vec<tollgate_core::Grant>| -> Vec<String> {
        grants.iter().map(|g| g.id.to_string()).collect()
    };
    let all = order(
        store
            .grants_with_credits(&account("acme"), OPEN_GRANTS_MAX)
            .await
            .unwrap(),
    );
    assert_eq!(
        all,
        ["first", taken.as_str(), "g1", "soon", "B-tie", "a-tie"]
    );
    let first = order(
        store
            .grants_with_credits(&account("acme"), 3)
            .await
            .unwrap(),
    );
    assert_eq!(first, all[..3]);
    assert_clean(&*store).await;
}

pub async fn idempotent_mutations_replay_their_first_result(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "0").await;
    let command = IssueGrant {
        key: key("grant-key"),
        account: account("acme"),
        terms: terms("g1", "10"),
        metadata: Metadata::default(),
        memo: Memo::new("order 42").unwrap(),
    };
    let first = store
        .issue_grant(command.clone(), at(1))
        .await
        .unwrap()
        .unwrap();
    assert!(!first.replayed);
    let replay = store
        .issue_grant(command.clone(), at(50))
        .await
        .unwrap()
        .unwrap();
    assert!(replay.replayed);
    assert_eq!(
        Receipt {
            replayed: false,
            ..replay
        },
        first
    );
    let snapshot = store.account(&account("acme")).await.unwrap();
    assert_eq!(snapshot.entry_count, 1, "a replay writes nothing");
    let mut different = command;
    different.terms.amount = credits("11");
    assert!(matches!(
        store.issue_grant(different, at(2)).await,
        Err(LedgerError::IdempotencyConflict { .. })
    ));
    // A refusal is remembered too.
    let void = CloseGrant {
        key: key("void-key"),
        account: account("acme"),
        grant: grant_id("g1"),
        kind: CloseKind::Expire,
        memo: Memo::default(),
    };
    let refused = store
        .close_grant(void.clone(), at(3))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.code, RefusalCode::GrantNotYetExpired);
    let refused_again = store.close_grant(void, at(4)).await.unwrap().unwrap_err();
    assert_eq!(refused_again, refused);
}

pub async fn adjustments_and_voids_follow_the_rules(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "0").await;
    issue(&*store, "acme", terms("g1", "3"), at(1)).await;
    let adjust = |k: &str, amount: &str| Adjust {
        key: key(k),
        account: account("acme"),
        amount: credits(amount),
        grant_id: None,
        memo: Memo::new("support ticket").unwrap(),
        beyond_overdraft: false,
        out: Default::default(),
    };
    let up = store
        .adjust(adjust("a1", "2"), at(2))
        .await
        .unwrap()
        .unwrap();
    assert!(up.grant_id.is_some());
    assert_eq!(up.balance, credits("5"));
    // Taking 7 would take all 5 from grants and leave 2 of debt, beyond the limit of 0:
    // refused, saying what the balance would be, and nothing moves.
    let refused = store
        .adjust(adjust("a2", "-7"), at(3))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.code, RefusalCode::OverdraftExceeded);
    assert!(
        refused.message.contains("balance -2 (debt 2)"),
        "{}",
        refused.message
    );
    assert_eq!(
        store.account(&account("acme")).await.unwrap().balance,
        credits("5")
    );
    // Said explicitly, it goes through.
    let down = store
        .adjust(
            Adjust {
                beyond_overdraft: true,
                ..adjust("a2-beyond", "-7")
            },
            at(3),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(down.balance, credits("-2"));
    assert_eq!(
        store.account(&account("acme")).await.unwrap().debt,
        credits("2")
    );
    assert!(matches!(
        store.adjust(adjust("a3", "0"), at(3)).await,
        Err(LedgerError::InvalidArgument { .. })
    ));
    issue(&*store, "acme", terms("g2", "10"), at(4)).await;
    let void = |k: &str, grant: &str| CloseGrant {
        key: key(k),
        account: account("acme"),
        grant: grant_id(grant),
        kind: CloseKind::Void,
        memo: Memo::default(),
    };
    let voided = store
        .close_grant(void("v1", "g2"), at(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(voided.movements[0].kind, EntryKind::Void);
    assert_eq!(
        voided.movements[0].amount,
        credits("8"),
        "2 settled the debt first"
    );
    let refused = store
        .close_grant(void("v2", "g2"), at(6))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.code, RefusalCode::GrantClosed);
    assert!(matches!(
        store.close_grant(void("v3", "ghost"), at(6)).await,
        Err(LedgerError::UnknownGrant { .. })
    ));
    // A grant id cannot be reused, even once closed.
    let duplicate = store
        .issue_grant(
            IssueGrant {
                key: key("dup"),
                account: account("acme"),
                terms: terms("g2", "1"),
                metadata: Metadata::default(),
                memo: Memo::default(),
            },
            at(7),
        )
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(duplicate.code, RefusalCode::DuplicateGrant);
    assert_clean(&*store).await;
}

pub async fn entries_page_and_filter(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "0").await;
    issue(&*store, "acme", terms("g1", "100"), at(1)).await;
    let batch: Vec<UsageDebit> = (0..25)
        .map(|i| usage("acme", &format!("d{i}"), at(10 + i), &[("g1", "1")], "0"))
        .collect();
    store.apply_usage(batch, at(100)).await.unwrap();

    let mut filter = EntryFilter::account(account("acme"));
    let mut seqs = Vec::new();
    let mut page = PageRequest {
        size: 10,
        token: None,
    };
    loop {
        let result = store.entries(&filter, page.clone()).await.unwrap();
        assert!(result.items.len() <= 10);
        seqs.extend(result.items.iter().map(|e| e.seq));
        match result.next_token {
            Some(token) => page.token = Some(token),
            None => break,
        }
    }
    assert_eq!(seqs, (1..=26).collect::<Vec<u64>>());

    filter.kinds = vec![EntryKind::Debit];
    filter.from = Some(at(20));
    filter.until = Some(at(25));
    let debits = store
        .entries(&filter, PageRequest::default())
        .await
        .unwrap();
    let ids: Vec<String> = debits
        .items
        .iter()
        .map(|e| e.debit_id.as_ref().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["d10", "d11", "d12", "d13", "d14"]);
    let one = EntryFilter {
        debit: Some(debit_id("d3")),
        ..EntryFilter::account(account("acme"))
    };
    let found = store.entries(&one, PageRequest::default()).await.unwrap();
    assert_eq!(found.items.len(), 1);
    assert_eq!(found.items[0].price_version, Some(3));
    assert_eq!(found.items[0].event_at, at(13));
    assert_eq!(found.items[0].recorded_at, at(100));

    let forged = PageRequest {
        size: 10,
        token: Some("not-a-token".into()),
    };
    assert!(matches!(
        store.entries(&filter, forged).await,
        Err(LedgerError::InvalidArgument {
            field: "page_token",
            ..
        })
    ));
    let huge = PageRequest {
        size: 100_000,
        token: None,
    };
    assert!(matches!(
        store.entries(&filter, huge).await,
        Err(LedgerError::InvalidArgument {
            field: "page_size",
            ..
        })
    ));
}

/// A usage debit priced from a quantity records the quantity, unit and rate on each of its
/// entries (and on its debit row), where support reads "2 image × 3 credits"; they are part of
/// the hash, so changing one is caught. A debit whose caller named the cost records none.
pub async fn usage_entries_carry_the_quantity_unit_and_rate_they_were_priced_with(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "0").await;
    issue(&*store, "acme", terms("g1", "4"), at(1)).await;
    issue(&*store, "acme", terms("g2", "10"), at(1)).await;
    let priced = UsageDebit {
        quantity: Some(Quantity::parse("2").unwrap()),
        rate: Some(Rate::parse("3").unwrap()),
        unit: Some("image".to_owned()),
        // Two draws: the pricing is on every entry of the debit, not only the first.
        ..usage("acme", "d1", at(2), &[("g1", "4"), ("g2", "2")], "0")
    };
    let named = usage("acme", "d2", at(3), &[("g2", "1")], "0");
    let outcomes = store
        .apply_usage(vec![priced, named], at(10))
        .await
        .unwrap();
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, UsageOutcome::Applied { .. })));

    let entries_of = |debit: &str| {
        let filter = EntryFilter {
            debit: Some(debit_id(debit)),
            ..EntryFilter::account(account("acme"))
        };
        let store = store.clone();
        async move {
            store
                .entries(&filter, PageRequest::default())
                .await
                .unwrap()
                .items
        }
    };
    let d1 = entries_of("d1").await;
    assert_eq!(d1.len(), 2);
    for entry in &d1 {
        assert_eq!(entry.kind, EntryKind::Debit);
        assert_eq!(entry.quantity, Some(Quantity::parse("2").unwrap()));
        assert_eq!(entry.quantity.unwrap().to_string(), "2");
        assert_eq!(entry.unit.as_deref(), Some("image"));
        assert_eq!(entry.rate.unwrap().to_string(), "3");
        assert_eq!(entry.price_version, Some(3));
    }
    let d2 = entries_of("d2").await;
    assert_eq!(d2.len(), 1);
    assert_eq!(
        (d2[0].quantity, d2[0].unit.as_deref(), d2[0].rate),
        (None, None, None)
    );
    // Grants carry none either.
    let all = store
        .entries(
            &EntryFilter::account(account("acme")),
            PageRequest::default(),
        )
        .await
        .unwrap()
        .items;
    assert!(all
        .iter()
        .filter(|e| e.kind != EntryKind::Debit)
        .all(|e| e.quantity.is_none() && e.unit.is_none() && e.rate.is_none()));
    // Reports read them from the debit row.
    let debits = store
        .debits(
            &tollgate_ledger::DebitQuery {
                account: Some(account("acme")),
                from: at(0),
                until: at(100),
            },
            PageRequest::default(),
        )
        .await
        .unwrap()
        .items;
    let row = debits
        .iter()
        .find(|d| d.debit_id == debit_id("d1"))
        .unwrap();
    assert_eq!(row.quantity, Some(Quantity::parse("2").unwrap()));
    assert_eq!(row.unit.as_deref(), Some("image"));
    assert_eq!(row.rate, Some(Rate::parse("3").unwrap()));
    let row = debits
        .iter()
        .find(|d| d.debit_id == debit_id("d2"))
        .unwrap();
    assert_eq!(
        (row.quantity, row.unit.as_deref(), row.rate),
        (None, None, None)
    );
    assert_clean(&*store).await;

    // The quantity is hashed: changing it is reported as a changed entry.
    f.disable_append_only_guard().await;
    let seq = d1[0].seq;
    f.execute(&format!(
        "UPDATE ledger_entries SET quantity = '1' WHERE account_id = 'acme' AND seq = {seq}"
    ))
    .await
    .unwrap();
    let report = store.verify(Some(&account("acme"))).await.unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::HashMismatch && p.seq == Some(seq)),
        "a changed quantity must break the entry's hash: {:#?}",
        report.problems
    );
}

pub async fn entries_are_append_only(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "0").await;
    issue(&*store, "acme", terms("g1", "10"), at(1)).await;
    let update = format!(
        "UPDATE ledger_entries SET amount = {} WHERE seq = 1",
        f.plus_one_credit()
    );
    assert!(
        f.execute(&update).await.is_err(),
        "the database refuses to change an entry"
    );
    assert!(f.execute("DELETE FROM ledger_entries").await.is_err());
    assert_clean(&*store).await;
}

pub async fn a_changed_entry_is_reported_with_its_account_and_sequence(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "0").await;
    create(&*store, "other", "0").await;
    issue(&*store, "acme", terms("g1", "10"), at(1)).await;
    issue(&*store, "other", terms("g1", "10"), at(1)).await;
    store
        .apply_usage(
            vec![
                usage("acme", "d1", at(2), &[("g1", "3")], "0"),
                usage("acme", "d2", at(3), &[("g1", "2")], "0"),
            ],
            at(4),
        )
        .await
        .unwrap();
    assert_clean(&*store).await;

    f.disable_append_only_guard().await;
    let tamper = format!(
        "UPDATE ledger_entries SET amount = {} WHERE account_id = 'acme' AND seq = 2",
        f.plus_one_credit()
    );
    f.execute(&tamper).await.unwrap();

    let report = store.verify(None).await.unwrap();
    assert_eq!(report.accounts_checked, 2);
    let hash = report
        .problems
        .iter()
        .find(|p| p.kind == ProblemKind::HashMismatch)
        .expect("a hash mismatch");
    assert_eq!(hash.account, account("acme"));
    assert_eq!(hash.seq, Some(2));
    assert!(
        report.problems.iter().all(|p| p.account == account("acme")),
        "the other account is clean: {:#?}",
        report.problems
    );
    let one = store.verify(Some(&account("acme"))).await.unwrap();
    assert!(one
        .problems
        .iter()
        .any(|p| p.kind == ProblemKind::HashMismatch && p.seq == Some(2)));
}

pub async fn a_changed_grant_is_reported(f: &Fixture) {
    let store = f.store();
    create(&*store, "acme", "0").await;
    issue(&*store, "acme", terms("g1", "10"), at(1)).await;
    store
        .apply_usage(vec![usage("acme", "d1", at(2), &[("g1", "3")], "0")], at(4))
        .await
        .unwrap();
    let tamper = format!(
        "UPDATE grants SET remaining = {} WHERE account_id = 'acme' AND grant_id = 'g1'",
        f.remaining_plus_one_credit()
    );
    f.execute(&tamper).await.unwrap();
    let report = store.verify(Some(&account("acme"))).await.unwrap();
    let kinds: Vec<ProblemKind> = report.problems.iter().map(|p| p.kind).collect();
    assert!(kinds.contains(&ProblemKind::GrantMismatch), "{kinds:?}");
    assert!(kinds.contains(&ProblemKind::BalanceEquation), "{kinds:?}");
    let grant = report
        .problems
        .iter()
        .find(|p| p.kind == ProblemKind::GrantMismatch)
        .unwrap();
    assert_eq!(grant.grant, Some(grant_id("g1")));

    // Pushed past its amount, the grant is also out of range.
    let tamper = format!(
        "UPDATE grants SET remaining = {} WHERE account_id = 'acme' AND grant_id = 'g1'",
        f.remaining_plus_one_credit()
    );
    for _ in 0..3 {
        f.execute(&tamper).await.unwrap();
    }
    let report = store.verify(Some(&account("acme"))).await.unwrap();
    assert!(report
        .problems
        .iter()
        .any(|p| p.kind == ProblemKind::GrantOutOfRange));
}

/// Sixteen writers on one account: grants, usage, refunds and adjustments interleave, and
/// the balance equation, every grant's bounds and the chain still hold; nothing is lost.
pub async fn concurrent_writers_keep_the_invariants(f: &Fixture) {
    const WRITERS: usize = 16;
    const OPERATIONS_PER_WRITER: usize = 20;
    let store = f.store();
    create(&*store, "hot", "0").await;
    issue(&*store, "hot", terms("base", "500"), at(1)).await;

    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut entries_written = 0_u64;
            let mut debited = Credits::ZERO;
            for op in 0..OPERATIONS_PER_WRITER {
                let tag = format!("w{writer}.o{op}");
                let now = at(10 + op as i64);
                let entries = match op % 5 {
                    0 => {
                        let receipt = issue(&*store, "hot", terms(&tag, "4"), now).await;
                        receipt.movements.len() as u64
                    }
                    1 | 3 => {
                        let outcome = store
                            .apply_usage(vec![usage("hot", &tag, now, &[("base", "3")], "0")], now)
                            .await
                            .expect("usage batch");
                        match &outcome[0] {
                            UsageOutcome::Applied {
                                first_seq,
                                last_seq,
                                ..
                            } => {
                                debited = debited.checked_add(credits("3")).unwrap();
                                last_seq - first_seq + 1
                            }
                            UsageOutcome::Refused { refusal, .. } => {
                                assert_eq!(refusal.code, RefusalCode::DrawExceedsGrant);
                                0
                            }
                            UsageOutcome::Duplicate { .. } => panic!("unique ids"),
                        }
                    }
                    2 => {
                        let debit = format!("w{writer}.o{}", op - 1);
                        match store
                            .refund(refund_cmd("hot", &tag, &debit, "1"), now)
                            .await
                        {
                            Ok(Ok(receipt)) => receipt.movements.len() as u64,
                            Ok(Err(refusal)) => panic!("refund refused: {refusal}"),
                            Err(LedgerError::UnknownDebit { .. }) => 0,
                            Err(error) => panic!("refund failed: {error}"),
                        }
                    }
                    _ => {
                        let command = Adjust {
                            key: key(&tag),
                            account: account("hot"),
                            amount: credits(if writer % 2 == 0 { "-2" } else { "1" }),
                            grant_id: None,
                            memo: Memo::default(),
                            beyond_overdraft: true,
                            out: Default::default(),
                        };
                        let receipt = store.adjust(command, now).await.unwrap().unwrap();
                        receipt.movements.len() as u64
                    }
                };
                entries_written += entries;
            }
            (entries_written, debited)
        }));
    }
    let mut entries_written = 1; // the base grant
    let mut debited = Credits::ZERO;
    for task in tasks {
        let (entries, amount) = task.await.expect("writer finished");
        entries_written += entries;
        debited = debited.checked_add(amount).unwrap();
    }
    let snapshot = store.account(&account("hot")).await.unwrap();
    assert_eq!(
        snapshot.entry_count, entries_written,
        "no entry lost or doubled"
    );
    assert_eq!(
        snapshot.totals.debited, debited,
        "every applied debit counted once"
    );
    let report = store.verify(None).await.unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
    let grants = store
        .grants(
            &account("hot"),
            false,
            PageRequest {
                size: 1_000,
                token: None,
            },
        )
        .await
        .unwrap();
    for record in &grants.items {
        let grant = &record.grant;
        assert!(
            !grant.remaining.is_negative() && grant.remaining <= grant.amount,
            "grant {} has remaining {} of {}",
            grant.id,
            grant.remaining,
            grant.amount
        );
    }
}
