//! Faults and bad input. Expected refusals are not errors: they are [`crate::Refused`].

use tollgate_region::RegionError;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EngineError {
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("idempotency key was used before for a different request")]
    Conflict,
    #[error("regional store unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// Carried only inside the engine: the feature has no price (a refusal for callers).
    #[error("feature {0} has no price")]
    UnknownFeature(tollgate_core::FeatureKey),
}

impl From<RegionError> for EngineError {
    fn from(error: RegionError) -> Self {
        match error {
            RegionError::IdempotencyConflict | RegionError::HoldExists => EngineError::Conflict,
            RegionError::OutOfRange { field, value } => EngineError::InvalidArgument {
                field,
                message: format!("{value} is out of range"),
            },
            RegionError::Redis(message) => EngineError::Unavailable(message),
            other @ (RegionError::PoolFull { .. }
            | RegionError::TooManyEntries { .. }
            | RegionError::Corrupt(_)) => EngineError::Internal(other.to_string()),
        }
    }
}
