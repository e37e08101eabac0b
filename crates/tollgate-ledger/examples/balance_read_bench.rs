//! Benchmark (not a test): the median time of a balance read on PostgreSQL with 10 entries and
//! with 1,000,000 entries on the account. The balance is a column of the account row, so both
//! should cost the same. Starts its own PostgreSQL through the testkit.
//!
//! `cargo run --release -p tollgate-ledger --example balance_read_bench [-- ENTRIES]`

use std::time::{Duration, Instant};

use tollgate_core::command::UsageDebit;
use tollgate_core::command::{CreateAccount, GrantTerms, IssueGrant, Memo, Metadata};
use tollgate_core::{
    AccountId, BurnPlan, Credits, DebitId, Draw, FeatureKey, GrantId, GrantSource, IdempotencyKey,
    PriceRule, Timestamp,
};
use tollgate_ledger::{LedgerStore, PostgresLedger};
use tollgate_testkit::postgres::PostgresServer;

/// Balance reads timed at each size.
const READS: usize = 2_000;
/// Debits per usage batch while filling (one transaction each).
const FILL_BATCH: usize = 5_000;
const ENTRIES_DEFAULT: u64 = 1_000_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target: u64 = match std::env::args().nth(1) {
        Some(text) => text.parse()?,
        None => ENTRIES_DEFAULT,
    };
    let server = PostgresServer::start()?;
    let store = PostgresLedger::connect(&server.url()).await?;
    let account = AccountId::new("bench")?;
    let t0 = Timestamp::from_millis(1_767_225_600_000)?;
    store
        .create_account(
            CreateAccount {
                key: IdempotencyKey::new("create")?,
                account: account.clone(),
                overdraft_limit: Credits::ZERO,
                metadata: Metadata::default(),
            },
            t0,
        )
        .await?;
    store
        .issue_grant(
            IssueGrant {
                key: IdempotencyKey::new("grant")?,
                account: account.clone(),
                terms: GrantTerms {
                    effective_at: Some(t0),
                    ..GrantTerms::new(
                        GrantId::new("big")?,
                        Credits::from_whole(1_000_000_000)?,
                        GrantSource::Purchase,
                    )
                },
                metadata: Metadata::default(),
                memo: Memo::default(),
            },
            t0,
        )
        .await?
        .map_err(|refusal| refusal.to_string())?;

    let mut written = store.account(&account).await?.entry_count;
    fill(&store, &account, t0, &mut written, 10).await?;
    let small = median_read(&store, &account).await?;
    println!("balance read, {written} entries: median {small:?} over {READS} reads");

    let started = Instant::now();
    fill(&store, &account, t0, &mut written, target).await?;
    println!("filled to {written} entries in {:?}", started.elapsed());
    let large = median_read(&store, &account).await?;
    println!("balance read, {written} entries: median {large:?} over {READS} reads");
    let report = store.verify(Some(&account)).await?;
    println!(
        "verify: {} entries checked, {} problems",
        report.entries_checked,
        report.problems.len()
    );
    Ok(())
}

async fn fill(
    store: &PostgresLedger,
    account: &AccountId,
    t0: Timestamp,
    written: &mut u64,
    target: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let feature = FeatureKey::new("bench")?;
    let grant = GrantId::new("big")?;
    while *written < target {
        let count = (target - *written).min(FILL_BATCH as u64);
        let batch = (0..count)
            .map(|i| {
                let n = *written + i;
                Ok(UsageDebit {
                    debit_id: DebitId::new(format!("d{n}"))?,
                    idempotency_key: None,
                    account: account.clone(),
                    feature: feature.clone(),
                    at: t0,
                    plan: BurnPlan {
                        draws: vec![Draw {
                            grant_id: grant.clone(),
                            amount: Credits::MICRO,
                        }],
                        overdraft: Credits::ZERO,
                    },
                    price_version: 1,
                    price_rule: PriceRule::Default,
                    quantity: None,
                    rate: None,
                    unit: None,
                    actor: None,
                    region: None,
                    hold: None,
                })
            })
            .collect::<Result<Vec<_>, tollgate_core::IdError>>()?;
        store.apply_usage(batch, t0).await?;
        *written = store.account(account).await?.entry_count;
        if *written % 100_000 < FILL_BATCH as u64 {
            println!("  … {written} entries");
        }
    }
    Ok(())
}

async fn median_read(
    store: &PostgresLedger,
    account: &AccountId,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let mut times = Vec::with_capacity(READS);
    for _ in 0..READS {
        let started = Instant::now();
        let snapshot = store.account(account).await?;
        times.push(started.elapsed());
        assert!(snapshot.balance.is_positive());
    }
    times.sort();
    Ok(times[times.len() / 2])
}
