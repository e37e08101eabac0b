//! An account's settings beyond its ledger terms: the low-balance notice, the automatic
//! top-up, the plan its prices resolve with, and how edges decide for it by default.
//!
//! A change is validated as a whole before anything is stored, saved in one write, then
//! published to every region so edges see the new plan and mode.

use tollgate_core::{AccountId, Credits, PlanId};
use tollgate_ledger::LedgerStore;
use tollgate_region::{EnforcementMode, RegionStore};

use crate::authority::Authority;
use crate::error::{AuthorityError, Result};
use crate::http::check_hook_url;
use crate::state::{AccountSettings, TopUpSettings};

/// Bounds of a top-up signing secret, in bytes.
pub const TOP_UP_SECRET_LEN_MIN: usize = 16;
pub const TOP_UP_SECRET_LEN_MAX: usize = 256;

/// What a settings update changes; `None` leaves a setting as it is, `Some(None)` clears it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SettingsChange {
    pub low_balance: Option<Option<Credits>>,
    /// A new top-up whose `secret` is empty keeps the secret already set.
    pub top_up: Option<Option<TopUpSettings>>,
    pub plan: Option<Option<PlanId>>,
    pub mode: Option<EnforcementMode>,
}

impl SettingsChange {
    pub fn is_empty(&self) -> bool {
        *self == SettingsChange::default()
    }

    /// The settings after this change, or the first problem found (nothing is half applied).
    pub fn apply(&self, current: &AccountSettings) -> Result<AccountSettings> {
        let mut next = current.clone();
        if let Some(low) = self.low_balance {
            if low.is_some_and(|low| low.is_negative()) {
                return Err(AuthorityError::invalid(
                    "low_balance",
                    "must not be negative",
                ));
            }
            next.low_balance = low;
        }
        if let Some(top_up) = &self.top_up {
            next.top_up = match top_up {
                None => None,
                Some(top_up) => Some(checked_top_up(top_up, current.top_up.as_ref())?),
            };
        }
        if let Some(plan) = &self.plan {
            next.plan = plan.clone();
        }
        if let Some(mode) = self.mode {
            next.mode = mode;
        }
        Ok(next)
    }
}

fn checked_top_up(
    wanted: &TopUpSettings,
    current: Option<&TopUpSettings>,
) -> Result<TopUpSettings> {
    check_hook_url(&wanted.hook_url)
        .map_err(|why| AuthorityError::invalid("top_up.hook_url", why))?;
    let secret = match (wanted.secret.is_empty(), current) {
        (true, Some(current)) => current.secret.clone(),
        (true, None) => {
            return Err(AuthorityError::invalid(
                "top_up.secret",
                "required when the account has no top-up secret yet",
            ))
        }
        (false, _) => wanted.secret.clone(),
    };
    let len = secret.len();
    if !(TOP_UP_SECRET_LEN_MIN..=TOP_UP_SECRET_LEN_MAX).contains(&len) {
        return Err(AuthorityError::invalid(
            "top_up.secret",
            format!(
                "{len} bytes; between {TOP_UP_SECRET_LEN_MIN} and {TOP_UP_SECRET_LEN_MAX} allowed"
            ),
        ));
    }
    if wanted.threshold.is_negative() {
        return Err(AuthorityError::invalid(
            "top_up.threshold",
            "must not be negative",
        ));
    }
    if !wanted.amount.is_positive() {
        return Err(AuthorityError::invalid("top_up.amount", "must be positive"));
    }
    if wanted.monthly_cap < wanted.amount {
        return Err(AuthorityError::invalid(
            "top_up.monthly_cap",
            format!(
                "{} is under the amount {}",
                wanted.monthly_cap, wanted.amount
            ),
        ));
    }
    Ok(TopUpSettings {
        secret,
        ..wanted.clone()
    })
}

impl<L: LedgerStore + ?Sized, R: RegionStore> Authority<L, R> {
    /// Applies a settings change to an account the ledger knows, then tells every region
    /// (plan and mode travel in the account summary edges read).
    pub async fn update_settings(
        &self,
        account: &AccountId,
        change: &SettingsChange,
    ) -> Result<AccountSettings> {
        // The account must exist; an unknown one is NotFound through the ledger's error.
        self.ledger.account(account).await?;
        let next = {
            let lock = self.account_lock(account);
            let _held = lock.lock().await;
            let current = self.state.account_settings(account).await?;
            let next = change.apply(&current)?;
            if next != current {
                self.state.set_account_settings(account, &next).await?;
            }
            next
        };
        self.publish_summary_everywhere(account).await?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credits(text: &str) -> Credits {
        Credits::parse(text).unwrap()
    }

    fn top_up(secret: &str) -> TopUpSettings {
        TopUpSettings {
            hook_url: "http://127.0.0.1:9/top-up".to_owned(),
            secret: secret.to_owned(),
            threshold: credits("10"),
            amount: credits("50"),
            monthly_cap: credits("200"),
        }
    }

    #[test]
    fn unset_fields_stay_and_cleared_fields_go() {
        let current = AccountSettings {
            low_balance: Some(credits("5")),
            top_up: Some(top_up("0123456789abcdef")),
            plan: Some(PlanId::new("pro").unwrap()),
            mode: EnforcementMode::Cached,
        };
        assert_eq!(SettingsChange::default().apply(&current).unwrap(), current);
        let change = SettingsChange {
            low_balance: Some(None),
            plan: Some(None),
            ..SettingsChange::default()
        };
        let next = change.apply(&current).unwrap();
        assert_eq!(next.low_balance, None);
        assert_eq!(next.plan, None);
        assert_eq!(next.top_up, current.top_up);
        assert_eq!(next.mode, EnforcementMode::Cached);
    }

    #[test]
    fn an_empty_secret_keeps_the_one_set_and_is_refused_without_one() {
        let current = AccountSettings {
            top_up: Some(top_up("0123456789abcdef")),
            ..AccountSettings::default()
        };
        let mut wanted = top_up("");
        wanted.amount = credits("60");
        let change = SettingsChange {
            top_up: Some(Some(wanted)),
            ..SettingsChange::default()
        };
        let next = change.apply(&current).unwrap().top_up.unwrap();
        assert_eq!(next.secret, "0123456789abcdef");
        assert_eq!(next.amount, credits("60"));
        let refused = change.apply(&AccountSettings::default()).unwrap_err();
        assert!(
            refused.to_string().starts_with("top_up.secret"),
            "{refused}"
        );
    }

    #[test]
    fn bad_top_ups_name_their_field() {
        type Spoil = Box<dyn Fn(&mut TopUpSettings)>;
        let cases: Vec<(&str, Spoil)> = vec![
            (
                "top_up.hook_url",
                Box::new(|t| t.hook_url = "ftp://x/".into()),
            ),
            ("top_up.secret", Box::new(|t| t.secret = "short".into())),
            (
                "top_up.threshold",
                Box::new(|t| t.threshold = credits("-1")),
            ),
            ("top_up.amount", Box::new(|t| t.amount = Credits::ZERO)),
            (
                "top_up.monthly_cap",
                Box::new(|t| t.monthly_cap = credits("49")),
            ),
        ];
        for (field, spoil) in cases {
            let mut wanted = top_up("0123456789abcdef");
            spoil(&mut wanted);
            let change = SettingsChange {
                top_up: Some(Some(wanted)),
                ..SettingsChange::default()
            };
            let error = change.apply(&AccountSettings::default()).unwrap_err();
            assert!(
                matches!(&error, AuthorityError::InvalidArgument { field: f, .. } if *f == field),
                "{field}: {error}"
            );
        }
        let negative = SettingsChange {
            low_balance: Some(Some(credits("-0.5"))),
            ..SettingsChange::default()
        };
        assert!(negative.apply(&AccountSettings::default()).is_err());
    }
}
