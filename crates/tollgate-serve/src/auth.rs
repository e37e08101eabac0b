//! API-key authentication and scopes, as a tower layer in front of a gRPC service.
//!
//! The key travels as `authorization: Bearer <key>`. Only sha256 digests of keys are kept,
//! and a presented key's digest is compared with every known digest in constant time, so
//! neither the stored form nor the comparison's timing gives a key away.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tollgate_proto::{ErrorCode, ServiceError};
use tonic::server::NamedService;
use tower::{Layer, Service};

/// Longest `authorization` header accepted, in bytes.
pub const AUTHORIZATION_LEN_MAX: usize = 512;

/// What a key may do. `Admin` includes `Read`; `Enforce` is for edges' callers only and never
/// reaches an admin call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Enforce,
    Read,
    Admin,
}

impl Scope {
    /// Every scope, in the order configuration lists them.
    pub const ALL: [Scope; 3] = [Scope::Enforce, Scope::Read, Scope::Admin];

    /// The scope's name in configuration (`enforce`, `read`, `admin`).
    pub fn name(self) -> &'static str {
        match self {
            Scope::Enforce => "enforce",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    /// The scope named `name` in configuration, if any.
    pub fn from_name(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.name() == name)
    }

    fn allows(self, needed: Scope) -> bool {
        match needed {
            Scope::Admin => self == Scope::Admin,
            Scope::Read => matches!(self, Scope::Read | Scope::Admin),
            Scope::Enforce => self == Scope::Enforce,
        }
    }
}

/// One `[[api_keys]]` entry of a node's configuration: a name, the key's sha256 in hex (the
/// key itself is never stored), and its scope.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub name: String,
    pub sha256: String,
    pub scope: Scope,
}

/// Most API keys one configuration may hold.
pub const API_KEYS_MAX: usize = 1_000;

impl ApiKeyConfig {
    /// A key given in clear (an environment variable, a test), kept only as its digest.
    pub fn from_clear(name: &str, key: &str, scope: Scope) -> Self {
        let digest = key_digest(key);
        ApiKeyConfig {
            name: name.to_string(),
            sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
            scope,
        }
    }
}

impl KeyRing {
    /// The key ring of a configuration; an error names the entry (`api_keys[3].sha256: …`).
    pub fn from_config(entries: &[ApiKeyConfig]) -> Result<KeyRing, String> {
        key_entries(entries).map(KeyRing::new)
    }
}

/// The keys of a configuration's `[[api_keys]]` entries, for a ring that holds other keys too;
/// an error names the entry (`api_keys[3].sha256: …`).
pub fn key_entries(entries: &[ApiKeyConfig]) -> Result<Vec<KeyEntry>, String> {
    if entries.len() > API_KEYS_MAX {
        return Err(format!(
            "api_keys: {} keys, at most {API_KEYS_MAX}",
            entries.len()
        ));
    }
    let mut keys = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let digest = decode_hex_digest(&entry.sha256)
            .ok_or_else(|| format!("api_keys[{index}].sha256: must be 64 hex digits"))?;
        keys.push(KeyEntry {
            name: entry.name.clone(),
            digest,
            scope: entry.scope,
        });
    }
    Ok(keys)
}

fn decode_hex_digest(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut digest = [0_u8; 32];
    for (index, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(digest)
}

/// The sha256 digest of a key, as stored in configuration (hex).
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

#[derive(Clone, Debug)]
pub struct KeyEntry {
    pub name: String,
    pub digest: [u8; 32],
    pub scope: Scope,
}

/// The known keys.
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: Vec<KeyEntry>,
}

impl KeyRing {
    pub fn new(keys: Vec<KeyEntry>) -> Self {
        KeyRing { keys }
    }

    /// The scope of the key in an `authorization` header value (the last entry's, when one
    /// key is configured with several scopes).
    pub fn scope_of(&self, header: Option<&[u8]>) -> Result<Scope, ServiceError> {
        let scopes = self.scopes_of(header)?;
        scopes
            .last()
            .copied()
            .ok_or_else(|| ServiceError::new(ErrorCode::Unauthenticated, "api key: unknown key"))
    }

    /// Every scope the key in an `authorization` header value was configured with.
    pub fn scopes_of(&self, header: Option<&[u8]>) -> Result<Vec<Scope>, ServiceError> {
        self.identify(header).map(|(_, scopes)| scopes)
    }

    /// The configured name of the key in an `authorization` header value (the first entry's,
    /// when one key is configured several times) and every scope it was configured with.
    pub fn identify(&self, header: Option<&[u8]>) -> Result<(Caller, Vec<Scope>), ServiceError> {
        let unauthenticated =
            |why: &str| ServiceError::new(ErrorCode::Unauthenticated, format!("api key: {why}"));
        let header = header.ok_or_else(|| unauthenticated("missing authorization metadata"))?;
        if header.len() > AUTHORIZATION_LEN_MAX {
            return Err(unauthenticated("authorization metadata too long"));
        }
        let key = header
            .strip_prefix(b"Bearer ")
            .filter(|key| !key.is_empty())
            .ok_or_else(|| unauthenticated("expected `Bearer <key>`"))?;
        let digest: [u8; 32] = Sha256::digest(key).into();
        // Look at every key whatever matches, so the time taken says nothing about which.
        let mut found = Vec::new();
        let mut name: Option<&str> = None;
        for entry in &self.keys {
            if bool::from(entry.digest.ct_eq(&digest)) {
                found.push(entry.scope);
                name = name.or(Some(entry.name.as_str()));
            }
        }
        match name {
            Some(name) => Ok((
                Caller {
                    key_name: name.to_owned(),
                },
                found,
            )),
            None => Err(unauthenticated("unknown key")),
        }
    }

    /// Whether the request may call `path` (`/tollgate.v1.Admin/IssueGrant`). A key configured
    /// with several scopes (the embedded node's development key) may call what any allows.
    pub fn check(&self, header: Option<&[u8]>, path: &str) -> Result<(), ServiceError> {
        self.authorize(header, path)
            .map(|_| ())
            .map_err(|(_, error)| error)
    }

    /// [`KeyRing::check`], naming the caller: on success, and on a refusal of a known key
    /// (PERMISSION_DENIED) so the refusal can be logged and recorded against it.
    pub fn authorize(
        &self,
        header: Option<&[u8]>,
        path: &str,
    ) -> Result<Caller, (Option<Caller>, ServiceError)> {
        let (caller, scopes) = self.identify(header).map_err(|error| (None, error))?;
        let needed = required_scope(path);
        if scopes.iter().any(|scope| scope.allows(needed)) {
            Ok(caller)
        } else {
            let error = ServiceError::new(
                ErrorCode::PermissionDenied,
                format!("api key: scope {scopes:?} cannot call {path}, which needs {needed:?}"),
            );
            Err((Some(caller), error))
        }
    }
}

/// Who made a request: the configured name of its API key (never the key). The auth layer
/// puts it in the request's extensions for the service, and in the response's extensions,
/// accepted or refused, for the layers outside it (the audit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub key_name: String,
}

impl KeyRing {
    /// The name and every scope of a key given in clear (a console sign-in), compared in
    /// constant time like [`KeyRing::identify`]; `None` for an unknown key.
    pub fn identify_key(&self, key: &str) -> Option<(String, Vec<Scope>)> {
        let digest = key_digest(key);
        let mut name = None;
        let mut scopes = Vec::new();
        for entry in &self.keys {
            if bool::from(entry.digest.ct_eq(&digest)) {
                name.get_or_insert_with(|| entry.name.clone());
                scopes.push(entry.scope);
            }
        }
        name.map(|name| (name, scopes))
    }
}

/// Admin calls that only read; everything else on Admin needs the `admin` scope (an unknown
/// method defaults to the strictest scope).
pub const ADMIN_READ_METHODS: &[&str] = &[
    "GetAccount",
    "ListAccounts",
    "ListFeatures",
    "ListPriceBookVersions",
    "ListPlans",
    "GetContracts",
    "ListGrants",
    "ListSchedules",
    "ListEntries",
    "GetBalance",
    "Verify",
    "GetUsageBreakdown",
    "GetRevenueReport",
    "RankAccounts",
    "WatchEvents",
    "ListParkedUsage",
];

/// Admin calls that only read but need the `admin` scope: what they show (who changed what)
/// is for administrators. Every other Admin method not in [`ADMIN_READ_METHODS`] is a change.
pub const ADMIN_ONLY_READ_METHODS: &[&str] = &["ListAuditRecords"];

/// Whether `path` is a call that changes the authority's state (every Admin call but the
/// reads), which the audit records.
pub fn is_admin_mutation(path: &str) -> bool {
    match path.strip_prefix("/tollgate.v1.Admin/") {
        Some(method) => {
            !ADMIN_READ_METHODS.contains(&method) && !ADMIN_ONLY_READ_METHODS.contains(&method)
        }
        None => false,
    }
}

/// gRPC services whose every call is an enforcement decision.
const ENFORCE_SERVICES: &[&str] = &[
    "/tollgate.v1.Enforcement/",
    "/envoy.service.ratelimit.v3.RateLimitService/",
];

pub fn required_scope(path: &str) -> Scope {
    match path.strip_prefix("/tollgate.v1.Admin/") {
        Some(method) if ADMIN_READ_METHODS.contains(&method) => Scope::Read,
        Some(_) => Scope::Admin,
        None if ENFORCE_SERVICES
            .iter()
            .any(|service| path.starts_with(service)) =>
        {
            Scope::Enforce
        }
        None => Scope::Admin,
    }
}

/// Rejects callers without a key whose scope allows the call.
#[derive(Clone)]
pub struct AuthLayer {
    keys: Arc<KeyRing>,
}

impl AuthLayer {
    pub fn new(keys: Arc<KeyRing>) -> Self {
        AuthLayer { keys }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            keys: Arc::clone(&self.keys),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    keys: Arc<KeyRing>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let header = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|value| value.as_bytes());
        match self.keys.authorize(header, request.uri().path()) {
            Ok(caller) => {
                request.extensions_mut().insert(caller.clone());
                let called = self.inner.call(request);
                Box::pin(async move {
                    let mut response = called.await?;
                    response.extensions_mut().insert(caller);
                    Ok(response)
                })
            }
            Err((caller, error)) => {
                let path = request.uri().path();
                match &caller {
                    // A known key beyond its scope: worth an operator's attention.
                    Some(caller) => {
                        tracing::warn!(key = %caller.key_name, path, "api key refused: scope")
                    }
                    None => tracing::debug!(path, reason = %error.message, "api key refused"),
                }
                let mut response = tonic::Status::from(error).into_http();
                if let Some(caller) = caller {
                    response.extensions_mut().insert(caller);
                }
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

impl<S: NamedService> NamedService for Auth<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::new(vec![
            KeyEntry {
                name: "ops".into(),
                digest: key_digest("admin-key"),
                scope: Scope::Admin,
            },
            KeyEntry {
                name: "support".into(),
                digest: key_digest("read-key"),
                scope: Scope::Read,
            },
            KeyEntry {
                name: "gateway".into(),
                digest: key_digest("edge-key"),
                scope: Scope::Enforce,
            },
        ])
    }

    #[test]
    fn a_key_configured_under_several_scopes_may_call_what_any_allows() {
        let digest = key_digest("dev-key");
        let entry = |scope| KeyEntry {
            name: "dev".into(),
            digest,
            scope,
        };
        let ring = KeyRing::new(vec![entry(Scope::Enforce), entry(Scope::Admin)]);
        let header = Some(&b"Bearer dev-key"[..]);
        assert!(ring.check(header, "/tollgate.v1.Enforcement/Debit").is_ok());
        assert!(ring.check(header, "/tollgate.v1.Admin/IssueGrant").is_ok());
        assert!(ring.check(header, "/tollgate.v1.Admin/GetAccount").is_ok());
        let edge_only = KeyRing::new(vec![entry(Scope::Enforce)]);
        assert!(edge_only
            .check(header, "/tollgate.v1.Admin/GetAccount")
            .is_err());
    }

    #[test]
    fn scopes_gate_methods() {
        let ring = ring();
        let issue = "/tollgate.v1.Admin/IssueGrant";
        let read = "/tollgate.v1.Admin/ListEntries";
        let code = |key: Option<&str>, path| {
            ring.check(key.map(str::as_bytes), path)
                .err()
                .map(|e| e.code)
        };
        assert_eq!(code(Some("Bearer admin-key"), issue), None);
        assert_eq!(code(Some("Bearer admin-key"), read), None);
        assert_eq!(code(Some("Bearer read-key"), read), None);
        assert_eq!(
            code(Some("Bearer read-key"), issue),
            Some(ErrorCode::PermissionDenied)
        );
        assert_eq!(
            code(Some("Bearer edge-key"), read),
            Some(ErrorCode::PermissionDenied)
        );
        assert_eq!(code(None, read), Some(ErrorCode::Unauthenticated));
        assert_eq!(
            code(Some("Bearer nope"), read),
            Some(ErrorCode::Unauthenticated)
        );
        assert_eq!(
            code(Some("admin-key"), read),
            Some(ErrorCode::Unauthenticated)
        );
        assert_eq!(
            required_scope("/tollgate.v1.Admin/SomethingNew"),
            Scope::Admin
        );
    }

    #[test]
    fn enforcement_and_gateway_calls_need_the_enforce_scope() {
        for path in [
            "/tollgate.v1.Enforcement/Debit",
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
        ] {
            assert_eq!(required_scope(path), Scope::Enforce, "{path}");
        }
        assert!(
            !Scope::Admin.allows(Scope::Enforce),
            "an admin key is not an enforcement key"
        );
        assert!(
            !Scope::Enforce.allows(Scope::Read),
            "an enforce key never reads admin data"
        );
        assert_eq!(
            required_scope("/unknown.Service/Call"),
            Scope::Admin,
            "unknown calls need the strictest scope"
        );
    }
}
