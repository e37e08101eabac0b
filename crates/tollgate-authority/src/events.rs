//! Notification events: what happened to an account, with an id receivers deduplicate on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tollgate_core::{AccountId, Timestamp};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventKind {
    BalanceLow,
    BalanceExhausted,
    BalanceNegative,
    GrantExpiring,
    GrantExpired,
    TopupSucceeded,
    TopupFailed,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::BalanceLow,
        EventKind::BalanceExhausted,
        EventKind::BalanceNegative,
        EventKind::GrantExpiring,
        EventKind::GrantExpired,
        EventKind::TopupSucceeded,
        EventKind::TopupFailed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::BalanceLow => "balance.low",
            EventKind::BalanceExhausted => "balance.exhausted",
            EventKind::BalanceNegative => "balance.negative",
            EventKind::GrantExpiring => "grant.expiring",
            EventKind::GrantExpired => "grant.expired",
            EventKind::TopupSucceeded => "topup.succeeded",
            EventKind::TopupFailed => "topup.failed",
        }
    }

    pub fn parse(text: &str) -> Option<EventKind> {
        EventKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// One notification. `event_id` is derived from its cause (`balance.low:acme:3` is the third
/// time acme's balance went low), so producing it twice yields one event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub kind: EventKind,
    pub account: AccountId,
    pub occurred_at: Timestamp,
    pub attributes: BTreeMap<String, String>,
}

impl Event {
    pub fn new(kind: EventKind, account: &AccountId, cause: &str, at: Timestamp) -> Self {
        Event {
            event_id: format!("{}:{account}:{cause}", kind.as_str()),
            kind,
            account: account.clone(),
            occurred_at: at,
            attributes: BTreeMap::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl ToString) -> Self {
        self.attributes.insert(key.to_owned(), value.to_string());
        self
    }

    /// The body a webhook receives: JSON with the id, type, account, time and attributes.
    pub fn webhook_body(&self) -> String {
        let body = serde_json::json!({
            "id": self.event_id,
            "type": self.kind.as_str(),
            "account_id": self.account.as_str(),
            "occurred_at": self.occurred_at.to_string(),
            "attributes": self.attributes,
        });
        body.to_string()
    }
}
