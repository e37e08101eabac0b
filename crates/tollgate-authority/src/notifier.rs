//! Notifications: events derived from the ledger, a transactional outbox, signed webhooks
//! with retries, and the live stream `WatchEvents` reads.
//!
//! The ledger is append-only, so the notifier derives events from it: per account it keeps a
//! cursor (the last entry it looked at) and which thresholds are crossed. One pass reads the
//! account's balance and new entries, decides the events (a threshold fires once when it is
//! crossed and re-arms when the balance is back above it; each expiry entry is a
//! `grant.expired`), and commits the new cursor, the flags, the events and their deliveries
//! (and a top-up attempt, see `topup`) in one transaction of the authority's state. A pass
//! that crashes commits nothing and is redone; a pass that lost a race to another commits
//! nothing either. So each event is in the outbox exactly once, with an id derived from its
//! cause that receivers deduplicate on.

use std::collections::BTreeSet;

use tollgate_core::{AccountId, Credits, EntryKind, Timestamp};
use tollgate_ledger::{EntryFilter, LedgerStore, PageRequest, PAGE_SIZE_MAX};
use tollgate_region::RegionStore;
use tracing::{info, warn};

use crate::authority::Authority;
use crate::error::Result;
use crate::events::{Event, EventKind};
use crate::http::Answer;
use crate::settings::{backoff_ms, DELIVERIES_PER_PASS_MAX, NOTIFY_ACCOUNTS_PER_PASS_MAX};
use crate::state::{NotifyFlags, ScanCommit, TopUpAttempt};

/// Accounts remembered as changed; beyond this the notifier scans every account once.
const DIRTY_ACCOUNTS_MAX: usize = 100_000;

#[derive(Debug, Default)]
pub struct Dirty {
    accounts: BTreeSet<AccountId>,
    overflowed: bool,
}

/// What a scan of one account decided.
struct Decided {
    flags: NotifyFlags,
    events: Vec<Event>,
    top_up: Option<TopUpAttempt>,
}

impl<L: LedgerStore + ?Sized, R: RegionStore> Authority<L, R> {
    /// Notes that an account's ledger changed; the next notifier pass looks at it.
    pub fn mark_dirty(&self, account: &AccountId) {
        let mut dirty = match self.dirty.lock() {
            Ok(dirty) => dirty,
            Err(poisoned) => poisoned.into_inner(),
        };
        if dirty.accounts.len() >= DIRTY_ACCOUNTS_MAX {
            dirty.overflowed = true;
        } else {
            dirty.accounts.insert(account.clone());
        }
    }

    /// A live stream of events as they enter the outbox (a lagging reader catches up from
    /// the outbox with [`crate::StateStore::events_after`]).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Scans the accounts marked changed (or, after an overflow or at start, every account).
    pub async fn notify_pass(&self) -> Result<usize> {
        let (accounts, everything) = {
            let mut dirty = match self.dirty.lock() {
                Ok(dirty) => dirty,
                Err(poisoned) => poisoned.into_inner(),
            };
            let overflowed = std::mem::take(&mut dirty.overflowed);
            (std::mem::take(&mut dirty.accounts), overflowed)
        };
        if everything {
            return self.scan_every_account().await;
        }
        for account in &accounts {
            self.scan_account(account).await?;
        }
        Ok(accounts.len())
    }

    /// Scans every account of the ledger, a page at a time (at start, after an overflow).
    pub async fn scan_every_account(&self) -> Result<usize> {
        let mut page = PageRequest {
            size: NOTIFY_ACCOUNTS_PER_PASS_MAX.min(PAGE_SIZE_MAX),
            token: None,
        };
        let mut scanned = 0;
        loop {
            let found = self.ledger.list_accounts(page.clone()).await?;
            for snapshot in &found.items {
                self.scan_account(&snapshot.account).await?;
                scanned += 1;
            }
            match found.next_token {
                Some(token) => page.token = Some(token),
                None => return Ok(scanned),
            }
        }
    }

    /// One notifier pass over one account.
    pub async fn scan_account(&self, account: &AccountId) -> Result<()> {
        let now = self.clock.now();
        let (cursor, flags) = self.state.notify_state(account).await?;
        let snapshot = self.ledger.account(account).await?;
        if snapshot.entry_count < cursor {
            warn!(%account, cursor, entries = snapshot.entry_count, "notifier cursor ahead of the ledger");
            return Ok(());
        }
        let mut decided = self
            .decide_balance(account, snapshot.balance, flags, now)
            .await?;
        decided.events.extend(
            self.expiry_events(account, cursor, snapshot.entry_count, now)
                .await?,
        );
        let endpoints = self.endpoint_names();
        let committed = self
            .state
            .commit_scan(&ScanCommit {
                account,
                old_cursor: cursor,
                new_cursor: snapshot.entry_count,
                flags: &decided.flags,
                events: &decided.events,
                top_up: decided.top_up.as_ref(),
                endpoints: &endpoints,
                now,
            })
            .await?;
        if committed {
            for event in decided.events {
                info!(event = %event.event_id, "event");
                let _ = self.events.send(event);
            }
        }
        Ok(())
    }

    async fn decide_balance(
        &self,
        account: &AccountId,
        balance: Credits,
        mut flags: NotifyFlags,
        now: Timestamp,
    ) -> Result<Decided> {
        let settings = self.state.account_settings(account).await?;
        let mut events = Vec::new();
        let low = settings.low_balance.is_some_and(|t| balance < t);
        let checks = [
            (EventKind::BalanceLow, low, flags.low),
            (
                EventKind::BalanceExhausted,
                !balance.is_positive(),
                flags.exhausted,
            ),
            (
                EventKind::BalanceNegative,
                balance.is_negative(),
                flags.negative,
            ),
        ];
        for (kind, now_crossed, was_crossed) in checks {
            if now_crossed && !was_crossed {
                flags.crossings += 1;
                let event = Event::new(kind, account, &flags.crossings.to_string(), now)
                    .with("balance", balance);
                events.push(event);
            }
        }
        (flags.low, flags.exhausted, flags.negative) =
            (low, !balance.is_positive(), balance.is_negative());
        let mut top_up = None;
        if let Some(setting) = &settings.top_up {
            let below = balance < setting.threshold;
            if below && !flags.top_up_below {
                flags.top_ups += 1;
                let (attempt, refused) = self
                    .plan_top_up(account, setting, flags.top_ups, now)
                    .await?;
                top_up = attempt;
                events.extend(refused);
            }
            flags.top_up_below = below;
        }
        Ok(Decided {
            flags,
            events,
            top_up,
        })
    }

    /// `grant.expired` for every expiry entry after the cursor.
    async fn expiry_events(
        &self,
        account: &AccountId,
        cursor: u64,
        through: u64,
        now: Timestamp,
    ) -> Result<Vec<Event>> {
        let mut filter = EntryFilter::account(account.clone());
        filter.kinds = vec![EntryKind::Expire];
        let mut page = PageRequest {
            size: PAGE_SIZE_MAX,
            token: (cursor > 0).then(|| tollgate_ledger::entry_page_token(cursor)),
        };
        let mut events = Vec::new();
        loop {
            let found = self.ledger.entries(&filter, page.clone()).await?;
            for entry in found.items.iter().filter(|e| e.seq <= through) {
                let Some(grant) = &entry.grant_id else {
                    continue;
                };
                let event = Event::new(EventKind::GrantExpired, account, grant.as_str(), now)
                    .with("grant_id", grant)
                    .with("expired", entry.amount)
                    .with("seq", entry.seq);
                events.push(event);
            }
            match found.next_token {
                Some(token) if found.items.last().is_some_and(|e| e.seq < through) => {
                    page.token = Some(token)
                }
                _ => return Ok(events),
            }
        }
    }

    /// Delivers the webhooks that are due: one signed POST each; a 2xx answer delivers it,
    /// anything else is retried with exponential backoff until the attempts run out.
    pub async fn deliver_due(&self) -> Result<usize> {
        let now = self.clock.now();
        let due = self
            .state
            .due_deliveries(now, DELIVERIES_PER_PASS_MAX)
            .await?;
        let mut delivered = 0;
        for delivery in &due {
            let Some(endpoint) = self
                .settings
                .webhooks
                .iter()
                .find(|w| w.name == delivery.endpoint)
            else {
                self.state
                    .delivery_attempted(delivery, "failed", now, "endpoint no longer configured")
                    .await?;
                continue;
            };
            let answer = self
                .http
                .post_signed(
                    &endpoint.url,
                    &delivery.event_id,
                    &endpoint.secret,
                    &delivery.body,
                    now,
                )
                .await;
            let attempts = delivery.attempts.saturating_add(1);
            if !answer.is_success() {
                self.metrics.webhook_failed(&endpoint.name);
            }
            if answer.is_success() {
                self.state
                    .delivery_attempted(delivery, "delivered", now, "")
                    .await?;
                delivered += 1;
            } else if attempts >= self.settings.webhook_attempts_max {
                self.metrics.webhook_given_up(&endpoint.name);
                warn!(event = %delivery.event_id, endpoint = %endpoint.name, answer = %answer.describe(), "webhook given up");
                self.state
                    .delivery_attempted(delivery, "failed", now, &answer.describe())
                    .await?;
            } else {
                let next = retry_at(now, backoff_ms(&self.settings, attempts));
                warn!(event = %delivery.event_id, endpoint = %endpoint.name, answer = %answer.describe(), attempts, "webhook will be retried");
                self.state
                    .delivery_attempted(delivery, "pending", next, &describe(&answer))
                    .await?;
            }
        }
        Ok(delivered)
    }
}

pub(crate) fn retry_at(now: Timestamp, delay_ms: i64) -> Timestamp {
    Timestamp::from_millis(now.millis().saturating_add(delay_ms)).unwrap_or(Timestamp::MAX)
}

fn describe(answer: &Answer) -> String {
    answer.describe()
}
