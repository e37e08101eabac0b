//! The audit of Admin changes, as a tower layer outside the auth layer: every Admin call that
//! changes something and succeeds is recorded (the caller's key name, the method, the account,
//! the idempotency key; the sink adds the time) before its reply leaves, and a known key's
//! refused attempt is recorded apart as a refusal. Calls that read, fail or carry no known key
//! record nothing.
//!
//! Which calls change something comes from [`crate::auth::is_admin_mutation`], so a method
//! added to the contract is audited unless it is listed as a read. Where a request carries its
//! account and idempotency key comes from the contract's file descriptor set: the first string
//! field named `account_id` (or `idempotency_key`) in the request message or in a message it
//! holds, so new methods need no code here either.
//!
//! A change whose record cannot be written is answered UNAVAILABLE: it was made, and a retry
//! with the same idempotency key replays it (nothing moves twice) and records it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use prost::Message;
use tonic::server::NamedService;
use tower::{Layer, Service};

use crate::auth::{is_admin_mutation, Caller};
use crate::limits::GRPC_PREFIX_BYTES;

/// What became of an audited call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditOutcome {
    /// The change was made (or replayed by its idempotency key).
    Done,
    /// The key's scope does not allow the call; nothing changed.
    Refused,
}

impl AuditOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Done => "done",
            AuditOutcome::Refused => "refused",
        }
    }
}

/// One audited call. Empty strings stand for what the request did not carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub key_name: String,
    /// The gRPC method's name (`IssueGrant`).
    pub method: String,
    pub account_id: String,
    pub idempotency_key: String,
    pub outcome: AuditOutcome,
}

pub type AuditFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Where audit records go (the authority's append-only audit table).
pub trait AuditSink: Send + Sync + 'static {
    fn record(&self, record: AuditRecord) -> AuditFuture<'_>;
}

/// Where a method's request carries a string: field numbers from the request message down.
type FieldPath = Vec<u32>;

#[derive(Clone, Debug, Default)]
struct MethodFields {
    account_id: Option<FieldPath>,
    idempotency_key: Option<FieldPath>,
}

/// Records Admin changes; see the module documentation.
#[derive(Clone)]
pub struct AuditLayer {
    sink: Arc<dyn AuditSink>,
    /// By full path (`/tollgate.v1.Admin/IssueGrant`).
    fields: Arc<HashMap<String, MethodFields>>,
    message_bytes_max: usize,
}

impl AuditLayer {
    /// `service` is the full name of the audited service (`tollgate.v1.Admin`), described in
    /// `descriptor_set` (an encoded `FileDescriptorSet`).
    pub fn new(
        sink: Arc<dyn AuditSink>,
        descriptor_set: &[u8],
        service: &str,
        message_bytes_max: usize,
    ) -> Result<AuditLayer, String> {
        Ok(AuditLayer {
            sink,
            fields: Arc::new(method_fields(descriptor_set, service)?),
            message_bytes_max,
        })
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = Audit<S>;
    fn layer(&self, inner: S) -> Audit<S> {
        Audit {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Audit<S> {
    inner: S,
    layer: AuditLayer,
}

impl<S: NamedService> NamedService for Audit<S> {
    const NAME: &'static str = S::NAME;
}

type Response = http::Response<tonic::body::Body>;

impl<S> Service<http::Request<tonic::body::Body>> for Audit<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let path = request.uri().path().to_owned();
        if !is_admin_mutation(&path) {
            return Box::pin(self.inner.call(request));
        }
        // The clone that was polled ready serves this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(audited(inner, layer, path, request))
    }
}

async fn audited<S>(
    mut inner: S,
    layer: AuditLayer,
    path: String,
    request: http::Request<tonic::body::Body>,
) -> Result<Response, Infallible>
where
    S: Service<http::Request<tonic::body::Body>, Response = Response, Error = Infallible>,
{
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, layer.message_bytes_max + GRPC_PREFIX_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            let max = layer.message_bytes_max;
            return Ok(tonic::Status::resource_exhausted(format!(
                "request message is over the limit of {max} bytes"
            ))
            .into_http());
        }
        Err(error) => return Ok(tonic::Status::from_error(error).into_http()),
    };
    let fields = layer.fields.get(&path).cloned().unwrap_or_default();
    let method = path.rsplit('/').next().unwrap_or_default().to_owned();
    let record = |caller: Caller, outcome| AuditRecord {
        key_name: caller.key_name,
        method: method.clone(),
        account_id: string_field(&body, fields.account_id.as_deref()),
        idempotency_key: string_field(&body, fields.idempotency_key.as_deref()),
        outcome,
    };
    let request = http::Request::from_parts(parts, tonic::body::Body::new(Full::new(body.clone())));
    let response = inner.call(request).await?;
    let Some(caller) = response.extensions().get::<Caller>().cloned() else {
        // No known key: nobody to record it against, and nothing changed.
        return Ok(response);
    };
    if let Some(code) = grpc_status(response.headers()) {
        // A reply without a body: refused or failed before anything changed.
        if code == tonic::Code::PermissionDenied as i32 {
            if let Err(error) = layer
                .sink
                .record(record(caller, AuditOutcome::Refused))
                .await
            {
                tracing::warn!(%error, path, "refusal not recorded in the audit");
            }
        }
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let collected = match body.collect().await {
        Ok(collected) => collected,
        Err(status) => return Ok(status.into_http()),
    };
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    if trailers.as_ref().and_then(grpc_status) == Some(tonic::Code::Ok as i32) {
        if let Err(error) = layer.sink.record(record(caller, AuditOutcome::Done)).await {
            tracing::error!(%error, path, "change made but not recorded in the audit");
            return Ok(tonic::Status::unavailable(
                "the change was made but its audit record could not be written; \
                 retry with the same idempotency key",
            )
            .into_http());
        }
    }
    Ok(http::Response::from_parts(
        parts,
        tonic::body::Body::new(Replay {
            data: Some(data),
            trailers,
        }),
    ))
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse().ok())
}

/// A reply body read whole, given back as it came: its data, then its trailers.
struct Replay {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take().filter(|data| !data.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.as_ref().is_none_or(Bytes::is_empty) && self.trailers.is_none()
    }
}

// ---- Where requests carry their account and idempotency key -----------------------------

const TYPE_MESSAGE: i32 = 11;
const TYPE_STRING: i32 = 9;
const LABEL_REPEATED: i32 = 3;
/// How deep in nested messages a field is looked for.
const FIELD_DEPTH_MAX: usize = 3;

fn method_fields(
    descriptor_set: &[u8],
    service: &str,
) -> Result<HashMap<String, MethodFields>, String> {
    let set = prost_types::FileDescriptorSet::decode(descriptor_set)
        .map_err(|e| format!("descriptor set: {e}"))?;
    let mut messages = HashMap::new();
    for file in &set.file {
        let prefix = format!(".{}", file.package());
        for message in &file.message_type {
            index_messages(&prefix, message, &mut messages);
        }
    }
    let mut methods = HashMap::new();
    for file in &set.file {
        for described in &file.service {
            if format!("{}.{}", file.package(), described.name()) != service {
                continue;
            }
            for method in &described.method {
                let input = method.input_type();
                methods.insert(
                    format!("/{service}/{}", method.name()),
                    MethodFields {
                        account_id: find_field(&messages, input, "account_id", 1),
                        idempotency_key: find_field(&messages, input, "idempotency_key", 1),
                    },
                );
            }
        }
    }
    if methods.is_empty() {
        return Err(format!("descriptor set: no service {service}"));
    }
    Ok(methods)
}

fn index_messages<'a>(
    prefix: &str,
    message: &'a prost_types::DescriptorProto,
    messages: &mut HashMap<String, &'a prost_types::DescriptorProto>,
) {
    let name = format!("{prefix}.{}", message.name());
    for nested in &message.nested_type {
        index_messages(&name, nested, messages);
    }
    messages.insert(name, message);
}

/// The path to the first string field named `name`: in the message itself, else in the
/// (non-repeated) messages it holds, breadth first.
fn find_field(
    messages: &HashMap<String, &prost_types::DescriptorProto>,
    message: &str,
    name: &str,
    depth: usize,
) -> Option<FieldPath> {
    let described = messages.get(message)?;
    let singular = |field: &&prost_types::FieldDescriptorProto| field.label != Some(LABEL_REPEATED);
    if let Some(field) = described
        .field
        .iter()
        .filter(singular)
        .find(|field| field.name() == name && field.r#type == Some(TYPE_STRING))
    {
        return Some(vec![u32::try_from(field.number()).ok()?]);
    }
    if depth >= FIELD_DEPTH_MAX {
        return None;
    }
    described
        .field
        .iter()
        .filter(singular)
        .filter(|field| field.r#type == Some(TYPE_MESSAGE))
        .find_map(|field| {
            let mut path = vec![u32::try_from(field.number()).ok()?];
            path.extend(find_field(messages, field.type_name(), name, depth + 1)?);
            Some(path)
        })
}

/// The string at `path` in a request body (one uncompressed gRPC message); empty when the
/// request does not carry it or cannot be read (the service then refuses it anyway).
fn string_field(body: &Bytes, path: Option<&[u32]>) -> String {
    let Some(path) = path else {
        return String::new();
    };
    if body.len() < GRPC_PREFIX_BYTES || body[0] != 0 {
        return String::new();
    }
    let mut message = body.slice(GRPC_PREFIX_BYTES..);
    for (depth, number) in path.iter().enumerate() {
        match last_length_delimited(&mut message, *number) {
            Some(inner) if depth + 1 == path.len() => {
                return String::from_utf8(inner.to_vec()).unwrap_or_default();
            }
            Some(inner) => message = inner,
            None => return String::new(),
        }
    }
    String::new()
}

/// The last occurrence of length-delimited field `number` in a message (protobuf keeps the
/// last value of a repeated singular field), or `None` if absent or malformed.
fn last_length_delimited(message: &mut Bytes, number: u32) -> Option<Bytes> {
    let mut found = None;
    while message.has_remaining() {
        let key = varint(message)?;
        let field = u32::try_from(key >> 3).ok()?;
        match key & 7 {
            0 => {
                varint(message)?;
            }
            1 => skip(message, 8)?,
            5 => skip(message, 4)?,
            2 => {
                let length = usize::try_from(varint(message)?).ok()?;
                if length > message.remaining() {
                    return None;
                }
                let value = message.split_to(length);
                if field == number {
                    found = Some(value);
                }
            }
            _ => return None,
        }
    }
    found
}

fn varint(buffer: &mut Bytes) -> Option<u64> {
    let mut value = 0_u64;
    for shift in (0..64).step_by(7) {
        if !buffer.has_remaining() {
            return None;
        }
        let byte = buffer.get_u8();
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn skip(buffer: &mut Bytes, bytes: usize) -> Option<()> {
    (buffer.remaining() >= bytes).then(|| buffer.advance(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_proto::pb;

    fn framed(message: &impl Message) -> Bytes {
        let encoded = message.encode_to_vec();
        let mut body = vec![0];
        body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        body.extend(encoded);
        Bytes::from(body)
    }

    #[test]
    fn every_admin_change_names_where_its_idempotency_key_is() {
        let fields =
            method_fields(tollgate_proto::FILE_DESCRIPTOR_SET, "tollgate.v1.Admin").unwrap();
        for (path, found) in &fields {
            if is_admin_mutation(path) {
                assert!(
                    found.idempotency_key.is_some(),
                    "{path} has no idempotency key"
                );
            }
        }
        let grant = fields.get("/tollgate.v1.Admin/IssueGrant").unwrap();
        let body = framed(&pb::IssueGrantRequest {
            idempotency_key: "g-1".into(),
            account_id: "acme".into(),
            ..Default::default()
        });
        assert_eq!(string_field(&body, grant.account_id.as_deref()), "acme");
        assert_eq!(string_field(&body, grant.idempotency_key.as_deref()), "g-1");
        assert_eq!(
            string_field(&body.slice(..7), grant.account_id.as_deref()),
            ""
        );
        assert!(method_fields(tollgate_proto::FILE_DESCRIPTOR_SET, "no.Such").is_err());
    }
}
