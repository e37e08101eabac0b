//! Auto top-up: when an account's balance falls under its threshold, the authority calls the
//! account's hook (a signed POST, the attempt id in a header so the hook can make it idempotent),
//! retries with backoff, and on success issues a `top_up` grant idempotent per attempt. At most
//! one attempt per crossing of the threshold, and at most `monthly_cap` credits per calendar
//! month (UTC). The outcome is announced as `topup.succeeded` or `topup.failed`.

use chrono::Datelike;
use tollgate_core::command::{GrantTerms, IssueGrant, Memo, Metadata};
use tollgate_core::{AccountId, GrantId, GrantSource, Scope, Timestamp};
use tollgate_ledger::{LedgerStore, RefusalCode};
use tollgate_region::RegionStore;
use tracing::{info, warn};

use crate::authority::Authority;
use crate::error::{AuthorityError, Result};
use crate::events::{Event, EventKind};
use crate::notifier::retry_at;
use crate::reconciler::derived_key;
use crate::settings::{backoff_ms, DELIVERIES_PER_PASS_MAX};
use crate::state::{TopUpAttempt, TopUpSettings};

fn month_of(at: Timestamp) -> String {
    let date = at.to_datetime();
    format!("{:04}-{:02}", date.year(), date.month())
}

impl<L: LedgerStore + ?Sized, R: RegionStore> Authority<L, R> {
    /// The attempt for the `number`th crossing, or — past the monthly cap — a `topup.failed`
    /// event instead.
    pub(crate) async fn plan_top_up(
        &self,
        account: &AccountId,
        settings: &TopUpSettings,
        number: u64,
        now: Timestamp,
    ) -> Result<(Option<TopUpAttempt>, Option<Event>)> {
        let month = month_of(now);
        let attempt_id = format!("{account}:{number}");
        let used = self.state.topped_up_in_month(account, &month).await?;
        let after = used
            .checked_add(settings.amount)
            .map_err(AuthorityError::corrupt)?;
        if after > settings.monthly_cap {
            let event = Event::new(EventKind::TopupFailed, account, &attempt_id, now)
                .with("reason", "monthly cap reached")
                .with("amount", settings.amount)
                .with("topped_up_this_month", used);
            return Ok((None, Some(event)));
        }
        let attempt = TopUpAttempt {
            attempt_id,
            account: account.clone(),
            month,
            amount: settings.amount,
            state: "pending".to_owned(),
            tries: 0,
            last_error: String::new(),
        };
        Ok((Some(attempt), None))
    }

    /// Calls the hooks of the attempts that are due.
    pub async fn run_top_ups(&self) -> Result<usize> {
        let now = self.clock.now();
        let due = self.state.due_topups(now, DELIVERIES_PER_PASS_MAX).await?;
        let mut done = 0;
        for attempt in due {
            if self.try_top_up(attempt, now).await? {
                done += 1;
            }
        }
        Ok(done)
    }

    async fn try_top_up(&self, mut attempt: TopUpAttempt, now: Timestamp) -> Result<bool> {
        let settings = self.state.account_settings(&attempt.account).await?;
        let Some(hook) = settings.top_up else {
            attempt.state = "failed".to_owned();
            attempt.last_error = "top-up no longer configured".to_owned();
            let event = self.top_up_event(EventKind::TopupFailed, &attempt, now);
            self.finish_top_up(&attempt, now, event).await?;
            return Ok(false);
        };
        attempt.tries = attempt.tries.saturating_add(1);
        let body = serde_json::json!({
            "attempt_id": attempt.attempt_id,
            "account_id": attempt.account.as_str(),
            "amount": attempt.amount.to_string(),
        })
        .to_string();
        let answer = self
            .http
            .post_signed(
                &hook.hook_url,
                &attempt.attempt_id,
                &hook.secret,
                &body,
                now,
            )
            .await;
        if answer.is_success() {
            self.issue_top_up(&attempt, now).await?;
            attempt.state = "succeeded".to_owned();
            attempt.last_error.clear();
            info!(account = %attempt.account, attempt = %attempt.attempt_id, "top-up succeeded");
            let event = self.top_up_event(EventKind::TopupSucceeded, &attempt, now);
            self.finish_top_up(&attempt, now, event).await?;
            self.mark_dirty(&attempt.account);
            self.rebalance(&attempt.account).await?;
            return Ok(true);
        }
        attempt.last_error = answer.describe();
        if attempt.tries >= self.settings.topup_tries_max {
            attempt.state = "failed".to_owned();
            warn!(account = %attempt.account, attempt = %attempt.attempt_id, error = %attempt.last_error, "top-up failed");
            let event = self.top_up_event(EventKind::TopupFailed, &attempt, now);
            self.finish_top_up(&attempt, now, event).await?;
        } else {
            warn!(account = %attempt.account, attempt = %attempt.attempt_id, error = %attempt.last_error, tries = attempt.tries, "top-up hook failed; will retry");
            let next = retry_at(now, backoff_ms(&self.settings, attempt.tries));
            self.state.topup_tried(&attempt, next, None, now).await?;
        }
        Ok(false)
    }

    fn top_up_event(&self, kind: EventKind, attempt: &TopUpAttempt, now: Timestamp) -> Event {
        let event = Event::new(kind, &attempt.account, &attempt.attempt_id, now)
            .with("attempt_id", &attempt.attempt_id)
            .with("amount", attempt.amount)
            .with("tries", attempt.tries);
        if attempt.last_error.is_empty() {
            event
        } else {
            event.with("reason", &attempt.last_error)
        }
    }

    async fn finish_top_up(
        &self,
        attempt: &TopUpAttempt,
        now: Timestamp,
        event: Event,
    ) -> Result<()> {
        let endpoints = self.endpoint_names();
        self.state
            .topup_tried(attempt, now, Some((&event, &endpoints)), now)
            .await?;
        let _ = self.events.send(event);
        Ok(())
    }

    /// The `top_up` grant, idempotent per attempt: a retry after a crash finds the first one.
    async fn issue_top_up(&self, attempt: &TopUpAttempt, now: Timestamp) -> Result<()> {
        let number = attempt
            .attempt_id
            .rsplit(':')
            .next()
            .unwrap_or(attempt.attempt_id.as_str());
        let id = GrantId::new(format!("topup.{number}"))
            .map_err(|e| AuthorityError::invalid("attempt_id", e))?;
        let command = IssueGrant {
            key: derived_key("topup", &[attempt.attempt_id.as_str()])?,
            account: attempt.account.clone(),
            terms: GrantTerms {
                id,
                amount: attempt.amount,
                source: GrantSource::TopUp,
                priority: None,
                effective_at: None,
                expires_at: None,
                scope: Scope::All,
                cost_basis: None,
                external_ref: Some(attempt.attempt_id.clone()),
            },
            metadata: Metadata::default(),
            memo: Memo::new("automatic top-up").map_err(|e| AuthorityError::invalid("memo", e))?,
        };
        match self.ledger.issue_grant(command, now).await? {
            Ok(_) => Ok(()),
            Err(refusal) if refusal.code == RefusalCode::DuplicateGrant => Ok(()),
            Err(refusal) => Err(AuthorityError::invalid("top_up", refusal.message)),
        }
    }
}
