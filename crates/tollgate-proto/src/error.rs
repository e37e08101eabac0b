//! Tollgate's error codes and the one table that maps them to gRPC status codes.
//!
//! Only faults and bad input become gRPC errors; expected refusals travel in replies.

use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A field is malformed or out of range; the message names it.
    InvalidArgument,
    /// An account, grant or debit named by the request does not exist.
    NotFound,
    /// Creating something that exists already.
    AlreadyExists,
    /// An idempotency key reused for a different request.
    IdempotencyConflict,
    /// No API key, or an unknown one.
    Unauthenticated,
    /// A key whose scope does not allow the call.
    PermissionDenied,
    /// A limit of the server was reached (too much in flight).
    ResourceExhausted,
    /// A dependency (database, regional store) is unreachable; retry.
    Unavailable,
    /// The call cannot succeed until someone acts (the message says what); retrying alone
    /// will not do.
    FailedPrecondition,
    /// The call is part of the contract but not served by this node yet.
    Unimplemented,
    /// A bug or inconsistent stored data; never the caller's fault.
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::InvalidArgument,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::IdempotencyConflict,
        ErrorCode::Unauthenticated,
        ErrorCode::PermissionDenied,
        ErrorCode::ResourceExhausted,
        ErrorCode::Unavailable,
        ErrorCode::FailedPrecondition,
        ErrorCode::Unimplemented,
        ErrorCode::Internal,
    ];

    /// The table.
    pub const fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::AlreadyExists | ErrorCode::IdempotencyConflict => tonic::Code::AlreadyExists,
            ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorCode::Unimplemented => tonic::Code::Unimplemented,
            ErrorCode::Internal => tonic::Code::Internal,
        }
    }
}

/// An error on its way to the wire: a code from the table and a lowercase message.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{message}")]
pub struct ServiceError {
    pub code: ErrorCode,
    pub message: String,
}

impl ServiceError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ServiceError {
            code,
            message: message.into(),
        }
    }

    /// Bad input in one field: `"<field>: <problem>"`.
    pub fn invalid(field: &str, problem: impl std::fmt::Display) -> Self {
        ServiceError::new(ErrorCode::InvalidArgument, format!("{field}: {problem}"))
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(error: ServiceError) -> Self {
        tonic::Status::new(error.code.grpc_code(), error.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_and_faults_are_not_blamed_on_callers() {
        for code in ErrorCode::ALL {
            let status = tonic::Status::from(ServiceError::new(code, "x"));
            assert_eq!(status.code(), code.grpc_code());
        }
        assert_eq!(ErrorCode::Internal.grpc_code(), tonic::Code::Internal);
        assert_eq!(
            ErrorCode::IdempotencyConflict.grpc_code(),
            tonic::Code::AlreadyExists
        );
        let invalid = ServiceError::invalid("amount", "7 decimals, at most 6 allowed");
        assert_eq!(invalid.message, "amount: 7 decimals, at most 6 allowed");
    }
}
