//! Through the authority's Admin API: seeding a run (the feature, its price, accounts and their
//! grants) and, after the run, the audit against the ledger.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tollgate_core::Credits;
use tollgate_proto::pb;
use tonic::transport::Channel;

use crate::drivers::{account_id, authorized, idempotency_key, FEATURE};
use crate::load::Decided;

/// Admin calls in flight while seeding or auditing.
const ADMIN_PARALLEL: usize = 32;
/// Pages of one account's entries read at most (1,000 entries a page).
const ENTRY_PAGES_MAX: usize = 10_000;
/// Pages of price book versions read at most.
const VERSION_PAGES_MAX: usize = 100;
/// How long edges may take to price the feature after it is published.
const PRICE_VISIBLE_WITHIN_MS: u64 = 15_000;
/// The grant every load account receives.
pub const GRANT_ID: &str = "lt";
/// Hex digits of the key's digest in a ledger debit id (the authority's reconciler).
const DEBIT_ID_DIGEST_HEX: usize = 48;

type Admin = pb::admin_client::AdminClient<Channel>;

#[derive(Clone)]
pub struct AdminApi {
    client: Admin,
    api_key: Arc<str>,
}

/// What a run's accounts were given.
#[derive(Clone, Debug, Serialize)]
pub struct Funding {
    pub run_id: String,
    pub accounts: u64,
    pub grant_micros: i64,
    pub overdraft_micros: i64,
    pub price_micros: i64,
}

fn credits_text(micros: i64) -> String {
    Credits::from_micros(micros).to_string()
}

impl AdminApi {
    pub async fn connect(endpoint: &str, api_key: &str) -> anyhow::Result<AdminApi> {
        let channel = crate::drivers::connect(endpoint)
            .await
            .context("--admin: the authority's Admin endpoint")?;
        Ok(AdminApi {
            client: Admin::new(channel),
            api_key: api_key.into(),
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        authorized(message, &self.api_key)
    }

    /// Defines the feature and makes sure the newest price book version prices it at `price`.
    pub async fn publish_price(&self, price_micros: i64) -> anyhow::Result<()> {
        let mut admin = self.client.clone();
        admin
            .define_feature(self.request(pb::DefineFeatureRequest {
                idempotency_key: format!("loadtest.feature.{FEATURE}"),
                feature: Some(pb::Feature {
                    feature: FEATURE.into(),
                    unit: "call".into(),
                    description: "tollgate-loadtest requests".into(),
                }),
            }))
            .await
            .context("defining the load test's feature")?;
        let mut newest: Option<pb::PriceBookVersion> = None;
        let mut token = String::new();
        for _ in 0..VERSION_PAGES_MAX {
            let page = admin
                .list_price_book_versions(self.request(pb::ListPriceBookVersionsRequest {
                    page_size: 1_000,
                    page_token: token.clone(),
                }))
                .await?
                .into_inner();
            for version in page.versions {
                if newest.as_ref().is_none_or(|n| version.version > n.version) {
                    newest = Some(version);
                }
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let price = credits_text(price_micros);
        let mut version = newest.unwrap_or_default();
        let rates = version.default_rates.get_or_insert_with(Default::default);
        let current = rates
            .rates
            .get(FEATURE)
            .and_then(|r| Credits::parse(r).ok());
        if current.map(Credits::micros) == Some(price_micros) {
            return Ok(());
        }
        rates.rates.insert(FEATURE.into(), price.clone());
        version.version += 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        version.effective_from = Some(prost_types::Timestamp {
            seconds: now.as_secs() as i64 - 1,
            nanos: 0,
        });
        eprintln!(
            "  publishing price book version {} ({FEATURE} at {price})",
            version.version
        );
        admin
            .publish_price_book_version(self.request(pb::PublishPriceBookVersionRequest {
                idempotency_key: format!("loadtest.price.{}.{price}", version.version),
                version: Some(version),
            }))
            .await
            .context("publishing the load test's price")?;
        Ok(())
    }

    /// Creates the run's accounts, each with one purchase grant, `ADMIN_PARALLEL` at a time.
    pub async fn seed_accounts(&self, funding: &Funding) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut done = 0_u64;
        let mut last_print = Instant::now();
        let mut calls = futures_util::stream::iter(0..funding.accounts)
            .map(|index| {
                let mut admin = self.client.clone();
                let account = account_id(&funding.run_id, index);
                let create = self.request(pb::CreateAccountRequest {
                    idempotency_key: format!("loadtest.create.{account}"),
                    account_id: account.clone(),
                    overdraft_limit: credits_text(funding.overdraft_micros),
                    metadata: Default::default(),
                });
                let grant = self.request(pb::IssueGrantRequest {
                    idempotency_key: format!("loadtest.grant.{account}"),
                    account_id: account.clone(),
                    grant_id: GRANT_ID.into(),
                    amount: credits_text(funding.grant_micros),
                    source: pb::GrantSource::Purchase.into(),
                    ..Default::default()
                });
                async move {
                    admin
                        .create_account(create)
                        .await
                        .with_context(|| format!("creating account {account}"))?;
                    admin
                        .issue_grant(grant)
                        .await
                        .with_context(|| format!("granting account {account}"))?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(ADMIN_PARALLEL);
        while let Some(result) = calls.next().await {
            result?;
            done += 1;
            if last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                eprintln!(
                    "  seeding: {done}/{} accounts ({:.0}/s)",
                    funding.accounts,
                    done as f64 / started.elapsed().as_secs_f64()
                );
            }
        }
        eprintln!(
            "  seeded {} accounts in {:.1} s",
            funding.accounts,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// Waits until every edge prices the feature at `price_micros` (edges reload the price book
/// within about a second of a publication).
pub async fn wait_priced(
    edges: &[Channel],
    api_key: &str,
    account: &str,
    price_micros: i64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(PRICE_VISIBLE_WITHIN_MS);
    for channel in edges {
        let mut client = pb::enforcement_client::EnforcementClient::new(channel.clone());
        loop {
            let quote = client
                .quote(authorized(
                    pb::QuoteRequest {
                        account_id: account.into(),
                        usage: Some(pb::Usage {
                            feature: FEATURE.into(),
                            amount: Some(pb::usage::Amount::Quantity("1".into())),
                        }),
                    },
                    api_key,
                ))
                .await;
            let priced = quote
                .ok()
                .and_then(|q| q.into_inner().priced)
                .and_then(|p| Credits::parse(&p.cost).ok());
            if priced.map(Credits::micros) == Some(price_micros) {
                break;
            }
            if Instant::now() >= deadline {
                bail!("an edge did not price {FEATURE} at the published price within {PRICE_VISIBLE_WITHIN_MS} ms");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The ledger's debit id of a region's decision (as the authority's reconciler derives it).
pub fn debit_id(region: &str, key: &str) -> String {
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    format!("{region}.{}", &digest[..DEBIT_ID_DIGEST_HEX])
}

/// One check of the audit.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Audit {
    pub passed: bool,
    pub accounts_checked: u64,
    pub accounts_sampled: bool,
    pub acknowledged_debits: u64,
    pub acknowledged_micros: i64,
    pub unknown_outcomes: u64,
    pub waited_s: f64,
    pub checks: Vec<Check>,
}

impl Audit {
    pub fn print(&self) {
        println!(
            "audit: {} ({} accounts{}, {} acknowledged debits = {} credits, {} unknown outcomes, reconciled after {:.1} s)",
            if self.passed { "PASSED" } else { "FAILED" },
            self.accounts_checked,
            if self.accounts_sampled { ", sampled" } else { "" },
            self.acknowledged_debits,
            credits_text(self.acknowledged_micros),
            self.unknown_outcomes,
            self.waited_s,
        );
        for check in &self.checks {
            println!(
                "  [{}] {}: {}",
                if check.passed { "ok" } else { "FAIL" },
                check.name,
                check.detail
            );
        }
    }
}

/// What the load tool knows about one account after the run.
#[derive(Default)]
struct Expected {
    /// Debit id → cost, of every key some edge acknowledged as debited.
    acknowledged: HashMap<String, i64>,
    /// Debit ids of keys whose outcome is unknown (a timeout, a lost connection) and that no
    /// edge acknowledged: each may or may not be charged.
    unknown: HashMap<String, i64>,
}

/// The ledger's view of one account.
struct Observed {
    balance: i64,
    granted: i64,
    /// Debit id → micro-credits the ledger charged under it, and how many entries.
    debits: HashMap<String, (i64, u64)>,
}

/// Accounts whose ledger view disagrees with what was acknowledged, per check.
#[derive(Default)]
struct Findings {
    beyond_grants: Vec<String>,
    charged_twice: Vec<String>,
    unexpected: Vec<String>,
    missing: Vec<String>,
    balance: Vec<String>,
}

impl Findings {
    fn is_clean(&self) -> bool {
        self.beyond_grants.is_empty()
            && self.charged_twice.is_empty()
            && self.unexpected.is_empty()
            && self.missing.is_empty()
            && self.balance.is_empty()
    }
}

fn parse_micros(text: &str, what: &str) -> anyhow::Result<i64> {
    Ok(Credits::parse(text)
        .with_context(|| format!("the ledger's {what} {text:?} is not an amount"))?
        .micros())
}

impl AdminApi {
    async fn observe(&self, account: &str) -> anyhow::Result<Observed> {
        let mut admin = self.client.clone();
        let reply = admin
            .get_balance(self.request(pb::AdminGetBalanceRequest {
                account_id: account.into(),
            }))
            .await
            .with_context(|| format!("reading the balance of {account}"))?
            .into_inner();
        // The ledger's own sum (`ledger_balance`), not the account's balance in
        // `balance.balance`, which leaves out holds in flight and grants not effective now.
        let ledger_balance = reply.ledger_balance;
        let totals = reply
            .balance
            .with_context(|| format!("no balance for {account}"))?
            .totals
            .unwrap_or_default();
        let mut debits: HashMap<String, (i64, u64)> = HashMap::new();
        let mut token = String::new();
        for _ in 0..ENTRY_PAGES_MAX {
            let page = admin
                .list_entries(self.request(pb::ListEntriesRequest {
                    account_id: account.into(),
                    kinds: vec![pb::EntryKind::Debit.into()],
                    page_size: 1_000,
                    page_token: token.clone(),
                    ..Default::default()
                }))
                .await
                .with_context(|| format!("listing the debits of {account}"))?
                .into_inner();
            for entry in page.entries {
                let amount = parse_micros(&entry.amount, "debit amount")?.abs();
                let slot = debits.entry(entry.debit_id).or_default();
                slot.0 += amount;
                slot.1 += 1;
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        Ok(Observed {
            balance: parse_micros(&ledger_balance, "balance")?,
            granted: parse_micros(&totals.granted, "granted total")?,
            debits,
        })
    }
}

/// Compares one account's ledger view with what the run knows; returns whether the ledger has
/// caught up (every acknowledged debit is in), and adds disagreements to `findings`.
fn compare(
    account: &str,
    expected: &Expected,
    observed: &Observed,
    funding: &Funding,
    findings: &mut Findings,
) -> bool {
    let acknowledged: i64 = expected.acknowledged.values().sum();
    if acknowledged > funding.grant_micros + funding.overdraft_micros
        || observed.balance < -funding.overdraft_micros
    {
        findings.beyond_grants.push(format!(
            "{account}: {} acknowledged, balance {}, grant {} + overdraft {}",
            credits_text(acknowledged),
            credits_text(observed.balance),
            credits_text(funding.grant_micros),
            credits_text(funding.overdraft_micros)
        ));
    }
    let mut charged = 0_i64;
    let mut caught_up = true;
    for (debit_id, (amount, entries)) in &observed.debits {
        charged += amount;
        let cost = expected
            .acknowledged
            .get(debit_id)
            .or_else(|| expected.unknown.get(debit_id));
        match cost {
            None => findings.unexpected.push(format!(
                "{account}: {debit_id} was never sent or never acknowledged"
            )),
            Some(cost) if amount > cost => findings.charged_twice.push(format!(
                "{account}: {debit_id} charged {} in {entries} entries, its cost is {}",
                credits_text(*amount),
                credits_text(*cost)
            )),
            Some(_) => {}
        }
    }
    let missing = expected
        .acknowledged
        .keys()
        .filter(|id| !observed.debits.contains_key(*id))
        .count();
    if missing > 0 {
        caught_up = false;
        findings.missing.push(format!(
            "{account}: {missing} acknowledged debits are not in the ledger"
        ));
    }
    let expected_balance = observed.granted - charged;
    if observed.granted != funding.grant_micros
        || observed.balance != expected_balance
        || charged < acknowledged
    {
        caught_up = false;
        findings.balance.push(format!(
            "{account}: balance {} but grants {} − acknowledged {} (− charged unknown outcomes {}) = {}",
            credits_text(observed.balance),
            credits_text(observed.granted),
            credits_text(acknowledged),
            credits_text(charged - acknowledged),
            credits_text(funding.grant_micros - charged),
        ));
    }
    caught_up
}

/// The audit's parameters.
pub struct AuditPlan<'a> {
    pub funding: &'a Funding,
    pub regions: &'a [String],
    pub decided: &'a [Decided],
    pub wait: Duration,
    pub accounts_max: u64,
}

/// Waits (at most `plan.wait`) for reconciliation to take in every acknowledged debit, then
/// checks the ledger against what the edges acknowledged.
pub async fn audit(admin: &AdminApi, plan: AuditPlan<'_>) -> anyhow::Result<Audit> {
    let funding = plan.funding;
    let mut expected: BTreeMap<u64, Expected> = BTreeMap::new();
    let (mut acknowledged_debits, mut acknowledged_micros) = (0_u64, 0_i64);
    for decided in plan.decided {
        let region = plan
            .regions
            .get(decided.region as usize)
            .map(String::as_str)
            .unwrap_or("?");
        let key = idempotency_key(&funding.run_id, decided.key_index);
        let id = debit_id(region, &key);
        let slot = expected.entry(decided.account).or_default();
        if decided.allowed {
            // A replayed key acknowledged twice is one debit.
            if slot
                .acknowledged
                .insert(id.clone(), decided.cost_micros)
                .is_none()
            {
                acknowledged_debits += 1;
                acknowledged_micros += decided.cost_micros;
            }
            slot.unknown.remove(&id);
        } else if !slot.acknowledged.contains_key(&id) {
            slot.unknown.insert(id, funding.price_micros);
        }
    }
    let unknown_outcomes = expected.values().map(|e| e.unknown.len() as u64).sum();
    // Touched accounts (sampled down to the limit), and a few untouched ones, which must be
    // whole.
    let touched: Vec<u64> = expected.keys().copied().collect();
    let sampled = touched.len() as u64 > plan.accounts_max;
    let stride = (touched.len() as u64 / plan.accounts_max.max(1)).max(1) as usize;
    let mut accounts: Vec<u64> = touched.iter().step_by(stride).copied().collect();
    let untouched = (0..funding.accounts)
        .filter(|a| !expected.contains_key(a))
        .take(100);
    accounts.extend(untouched);
    let empty = Expected::default();

    let started = Instant::now();
    let deadline = started + plan.wait;
    let mut pending = accounts.clone();
    // The latest reading of each account (a re-read replaces the one before).
    let mut by_account: BTreeMap<u64, Findings> = BTreeMap::new();
    // Bounded by the deadline: each round re-reads only the accounts not caught up yet.
    loop {
        let mut behind = Vec::new();
        let results: Vec<(u64, anyhow::Result<Observed>)> = futures_util::stream::iter(pending)
            .map(|index| async move {
                let account = account_id(&funding.run_id, index);
                (index, admin.observe(&account).await)
            })
            .buffer_unordered(ADMIN_PARALLEL)
            .collect()
            .await;
        for (index, observed) in results {
            let account = account_id(&funding.run_id, index);
            let observed = observed?;
            let wanted = expected.get(&index).unwrap_or(&empty);
            let mut found = Findings::default();
            if !compare(&account, wanted, &observed, funding, &mut found) {
                behind.push(index);
            }
            by_account.insert(index, found);
        }
        if behind.is_empty() || Instant::now() >= deadline {
            break;
        }
        eprintln!(
            "  audit: {} of {} accounts not reconciled yet",
            behind.len(),
            accounts.len()
        );
        pending = behind;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut findings = Findings::default();
    for found in by_account.into_values() {
        findings.beyond_grants.extend(found.beyond_grants);
        findings.charged_twice.extend(found.charged_twice);
        findings.unexpected.extend(found.unexpected);
        findings.missing.extend(found.missing);
        findings.balance.extend(found.balance);
    }
    let waited_s = started.elapsed().as_secs_f64();
    let check = |name: &'static str, list: &[String], ok: String| Check {
        name,
        passed: list.is_empty(),
        detail: if list.is_empty() {
            ok
        } else {
            format!(
                "{} accounts, e.g. {}",
                list.len(),
                list.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
            )
        },
    };
    let checks = vec![
        check(
            "nothing allowed beyond grants plus overdraft",
            &findings.beyond_grants,
            format!(
                "every account's acknowledged debits ≤ {} + {} overdraft",
                credits_text(funding.grant_micros),
                credits_text(funding.overdraft_micros)
            ),
        ),
        check(
            "no idempotency key charged twice",
            &findings.charged_twice,
            "every debit id charged at most its cost".into(),
        ),
        check(
            "no debit that was never acknowledged",
            &findings.unexpected,
            "every ledger debit is an acknowledged key (or one whose outcome was unknown)".into(),
        ),
        check(
            "every acknowledged debit is in the ledger",
            &findings.missing,
            format!("{acknowledged_debits} acknowledged debits found"),
        ),
        check(
            "balance = grants − acknowledged debits",
            &findings.balance,
            "to the micro-credit on every account checked".into(),
        ),
    ];
    Ok(Audit {
        passed: findings.is_clean(),
        accounts_checked: accounts.len() as u64,
        accounts_sampled: sampled,
        acknowledged_debits,
        acknowledged_micros,
        unknown_outcomes,
        waited_s,
        checks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debit_ids_are_the_reconcilers() {
        let id = debit_id("eu", "k1");
        assert!(id.starts_with("eu."));
        assert_eq!(id.len(), 3 + DEBIT_ID_DIGEST_HEX);
    }

    fn funding() -> Funding {
        Funding {
            run_id: "r".into(),
            accounts: 1,
            grant_micros: 10,
            overdraft_micros: 0,
            price_micros: 2,
        }
    }

    #[test]
    fn the_comparison_finds_each_kind_of_disagreement() {
        let mut expected = Expected::default();
        expected.acknowledged.insert("eu.a".into(), 2);
        expected.acknowledged.insert("eu.b".into(), 2);
        expected.unknown.insert("eu.c".into(), 2);
        let observed = |debits: &[(&str, i64)], balance| Observed {
            balance,
            granted: 10,
            debits: debits
                .iter()
                .map(|(id, amount)| (id.to_string(), (*amount, 1)))
                .collect(),
        };
        let mut findings = Findings::default();
        let good = observed(&[("eu.a", 2), ("eu.b", 2), ("eu.c", 2)], 4);
        assert!(compare("x", &expected, &good, &funding(), &mut findings));
        assert!(findings.is_clean());
        let behind = observed(&[("eu.a", 2)], 8);
        assert!(!compare("x", &expected, &behind, &funding(), &mut findings));
        assert_eq!(findings.missing.len(), 1);
        let mut findings = Findings::default();
        let twice = observed(&[("eu.a", 4), ("eu.b", 2), ("eu.z", 2)], 2);
        compare("x", &expected, &twice, &funding(), &mut findings);
        assert_eq!(
            (findings.charged_twice.len(), findings.unexpected.len()),
            (1, 1)
        );
        let mut over = Expected::default();
        for n in 0..6 {
            over.acknowledged.insert(format!("eu.{n}"), 2);
        }
        let mut findings = Findings::default();
        compare("x", &over, &observed(&[], 10), &funding(), &mut findings);
        assert_eq!(findings.beyond_grants.len(), 1);
    }
}
