//! Validated identifiers. Each is checked once, where it is received, and trusted after.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::IdError;

/// Characters of DESIGN.md's `account_id`, shared by most identifiers.
fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// Idempotency keys come from callers' own systems (UUIDs, hashes, base64), so any printable
/// ASCII except space is accepted.
fn is_key_char(c: char) -> bool {
    c.is_ascii_graphic()
}

/// Actors are often e-mail addresses.
fn is_actor_char(c: char) -> bool {
    is_id_char(c) || matches!(c, '@' | '+')
}

/// Region names are lowercase, like `eu-west-1`.
fn is_region_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

fn check(text: &str, len_max: usize, allowed: fn(char) -> bool) -> Result<(), IdError> {
    if text.is_empty() {
        return Err(IdError::Empty);
    }
    if text.len() > len_max {
        return Err(IdError::TooLong {
            len: text.len(),
            len_max,
        });
    }
    match text.char_indices().find(|(_, c)| !allowed(*c)) {
        Some((index, character)) => Err(IdError::BadCharacter { character, index }),
        None => Ok(()),
    }
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $len_max_name:ident = $len_max:expr, $allowed:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        #[doc = concat!("Longest `", stringify!($name), "`, in bytes.")]
        pub const $len_max_name: usize = $len_max;

        impl $name {
            pub fn new(text: impl Into<String>) -> Result<Self, IdError> {
                let text = text.into();
                check(&text, $len_max_name, $allowed)?;
                Ok($name(text))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(text: String) -> Result<Self, Self::Error> {
                $name::new(text)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(text: &str) -> Result<Self, Self::Error> {
                $name::new(text)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

identifier!(
    /// A customer whose balance is enforced: 1–128 characters of `[A-Za-z0-9._:-]`.
    AccountId, ACCOUNT_ID_LEN_MAX = 128, is_id_char
);
identifier!(
    /// A billable action, such as `ai_message_gen`.
    FeatureKey, FEATURE_KEY_LEN_MAX = 64, is_id_char
);
identifier!(
    /// A block of credits of one account.
    GrantId, GRANT_ID_LEN_MAX = 128, is_id_char
);
identifier!(
    /// One consumption of credits; the ledger's uniqueness key that makes replays harmless.
    DebitId, DEBIT_ID_LEN_MAX = 128, is_id_char
);
identifier!(
    /// An authorization that sets credits aside.
    HoldId, HOLD_ID_LEN_MAX = 128, is_id_char
);
identifier!(
    /// An edge node's lease on an account's credits in one region (cached mode).
    LeaseId, LEASE_ID_LEN_MAX = 128, is_id_char
);
identifier!(
    /// The key a caller attaches to a mutation so that a replay moves nothing.
    IdempotencyKey, IDEMPOTENCY_KEY_LEN_MAX = 128, is_key_char
);
identifier!(
    /// A user inside an account who caused a spend.
    ActorId, ACTOR_ID_LEN_MAX = 128, is_actor_char
);
identifier!(
    /// A deployment region, such as `eu-west-1`.
    RegionId, REGION_ID_LEN_MAX = 64, is_region_char
);
identifier!(
    /// A plan that bundles recurring grants and price overrides.
    PlanId, PLAN_ID_LEN_MAX = 64, is_id_char
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_follow_the_design() {
        assert!(AccountId::new("acme.corp:team-1_a").is_ok());
        assert_eq!(AccountId::new(""), Err(IdError::Empty));
        assert_eq!(
            AccountId::new("a".repeat(129)),
            Err(IdError::TooLong {
                len: 129,
                len_max: 128
            })
        );
        assert!(AccountId::new("a".repeat(128)).is_ok());
        assert_eq!(
            AccountId::new("ab cd"),
            Err(IdError::BadCharacter {
                character: ' ',
                index: 2
            })
        );
        assert_eq!(
            AccountId::new("é"),
            Err(IdError::BadCharacter {
                character: 'é',
                index: 0
            })
        );
    }

    #[test]
    fn other_alphabets() {
        assert!(IdempotencyKey::new("b64+/=key!").is_ok());
        assert!(IdempotencyKey::new("has space").is_err());
        assert!(ActorId::new("ana+ops@example.com").is_ok());
        assert!(RegionId::new("eu-west-1").is_ok());
        assert!(RegionId::new("EU").is_err());
    }
}
