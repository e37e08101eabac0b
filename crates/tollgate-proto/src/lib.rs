//! Tollgate's wire contract: the code generated from `proto/tollgate/v1` (module [`pb`]),
//! validated conversions from wire messages into core types ([`decode`]: every field checked
//! once, the offending field named in `INVALID_ARGUMENT`), and [`error`], the one table that
//! maps Tollgate's error codes to gRPC status codes.
//!
//! It depends on `tollgate-core` and tonic/prost only; never on stores or services.

pub mod decode;
pub mod error;

/// Generated messages and services of package `tollgate.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("tollgate.v1");
}

/// The encoded file descriptor set of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("tollgate_v1_descriptor");

/// The encoded file descriptor set of Envoy's rate-limit service
/// (`envoy.service.ratelimit.v3.RateLimitService`) and every file it imports, for server
/// reflection on the nodes that answer it. Built from `proto/third_party`.
pub const ENVOY_RATE_LIMIT_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("envoy_rate_limit_descriptor");

pub use error::{ErrorCode, ServiceError};
