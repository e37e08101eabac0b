//! What Tollgate's fuzz targets share: the contract's field names ([`contract`]), a reference
//! reader of the decimal grammar ([`oracle`]), a fresh edge over the in-memory regional store
//! for each input ([`edge`]), and the valid requests each target's corpus starts from
//! ([`seeds`]). Built only by cargo-fuzz in this directory's own workspace (`fuzz/run`).

pub mod contract;
pub mod edge;
pub mod oracle;
pub mod seeds;

/// The Admin requests that `tollgate-proto` converts, in the order the first byte of an
/// `admin_requests` input picks them.
pub const ADMIN_REQUESTS: [&str; 9] = [
    "CreateAccountRequest",
    "UpdateAccountRequest",
    "IssueGrantRequest",
    "VoidGrantRequest",
    "ExpireGrantRequest",
    "RefundRequest",
    "AdjustRequest",
    "ListEntriesRequest",
    "ListGrantsRequest",
];

/// The Enforcement requests, in the order the first byte of an `enforcement_requests` input
/// picks them.
pub const ENFORCEMENT_REQUESTS: [&str; 7] = [
    "AuthorizeRequest",
    "CaptureRequest",
    "ReleaseRequest",
    "DebitRequest",
    "ReverseRequest",
    "GetBalanceRequest",
    "QuoteRequest",
];
