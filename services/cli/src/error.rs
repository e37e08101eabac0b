//! What can go wrong, and the exit code each outcome maps to. Scripts rely on these codes; they
//! are listed in `tollgate --help` and in docs/cli.md.

use tollgate_proto::pb;

use crate::render;

/// Everything worked.
pub const EXIT_OK: u8 = 0;
/// Anything not listed below (a server fault, an idempotency conflict, an unimplemented call).
pub const EXIT_OTHER: u8 = 1;
/// Bad command line or bad input (clap's usage errors and the server's INVALID_ARGUMENT).
pub const EXIT_USAGE: u8 = 2;
/// The account, grant, debit or schedule named does not exist.
pub const EXIT_NOT_FOUND: u8 = 3;
/// The server refused the request with a typed outcome (insufficient credits, closed grant…).
pub const EXIT_REFUSED: u8 = 4;
/// The API key is missing, wrong, or lacks the scope the call needs.
pub const EXIT_AUTH: u8 = 5;
/// Nothing answered: connection failed, the server is unavailable, or the timeout passed.
pub const EXIT_UNAVAILABLE: u8 = 6;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad input caught before anything was sent; `field` is the flag or file key.
    #[error("{field}: {problem}")]
    Input { field: String, problem: String },
    /// The server answered with a gRPC error.
    #[error("{}", status_line(.call, .status))]
    Status {
        call: &'static str,
        status: tonic::Status,
    },
    /// The endpoint could not be reached at all.
    #[error("cannot reach {endpoint}: {detail}")]
    Connect { endpoint: String, detail: String },
    /// A typed refusal: nothing moved.
    #[error("refused: {}", render::refusal_line(.0))]
    Refused(Box<pb::Refusal>),
    /// The request was not found on the client side (for example no ledger entry names a debit).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Other(String),
}

impl CliError {
    pub fn input(field: &str, problem: impl std::fmt::Display) -> CliError {
        CliError::Input {
            field: field.to_string(),
            problem: problem.to_string(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Input { .. } => EXIT_USAGE,
            CliError::Status { status, .. } => exit_code_of(status.code()),
            CliError::Connect { .. } => EXIT_UNAVAILABLE,
            CliError::Refused(_) => EXIT_REFUSED,
            CliError::NotFound(_) => EXIT_NOT_FOUND,
            CliError::Other(_) => EXIT_OTHER,
        }
    }
}

/// The one table from gRPC status codes to exit codes.
pub fn exit_code_of(code: tonic::Code) -> u8 {
    use tonic::Code;
    match code {
        Code::Ok => EXIT_OK,
        Code::InvalidArgument | Code::OutOfRange => EXIT_USAGE,
        Code::NotFound => EXIT_NOT_FOUND,
        Code::Unauthenticated | Code::PermissionDenied => EXIT_AUTH,
        Code::Unavailable | Code::DeadlineExceeded => EXIT_UNAVAILABLE,
        _ => EXIT_OTHER,
    }
}

fn status_line(call: &str, status: &tonic::Status) -> String {
    use tonic::Code;
    let message = status.message();
    match status.code() {
        Code::InvalidArgument => format!("invalid argument: {message}"),
        Code::NotFound => format!("not found: {message}"),
        Code::Unauthenticated => format!("unauthenticated (check --api-key): {message}"),
        Code::PermissionDenied => {
            format!("permission denied (the key lacks the scope {call} needs): {message}")
        }
        Code::Unimplemented => format!("{call} is not implemented by this server: {message}"),
        Code::Unavailable => format!("unavailable: {message}"),
        Code::DeadlineExceeded => format!("{call} timed out (see --timeout): {message}"),
        Code::AlreadyExists => format!("already exists: {message}"),
        code => format!("{call} failed ({code:?}): {message}"),
    }
}
