//! Request size limits for gRPC services, as a tower layer: every message of a request is
//! announced by a 5-byte prefix (compression flag, big-endian length); a message longer than
//! the limit fails the request with RESOURCE_EXHAUSTED as soon as its prefix arrives, before
//! its bytes are buffered, and the service never sees it.
//!
//! Each service's own `max_decoding_message_size` stays set to the same limit as a second
//! line (tonic answers OUT_OF_RANGE there).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use tonic::server::NamedService;
use tower::{Layer, Service};

/// Bytes of a gRPC message prefix: one compression flag, four of length.
pub const GRPC_PREFIX_BYTES: usize = 5;

/// Refuses requests carrying a message larger than `message_bytes_max`.
#[derive(Clone, Copy, Debug)]
pub struct RequestSizeLayer {
    message_bytes_max: usize,
}

impl RequestSizeLayer {
    pub fn new(message_bytes_max: usize) -> Self {
        RequestSizeLayer { message_bytes_max }
    }
}

impl<S> Layer<S> for RequestSizeLayer {
    type Service = RequestSize<S>;
    fn layer(&self, inner: S) -> RequestSize<S> {
        RequestSize {
            inner,
            message_bytes_max: self.message_bytes_max,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RequestSize<S> {
    inner: S,
    message_bytes_max: usize,
}

impl<S> Service<http::Request<tonic::body::Body>> for RequestSize<S>
where
    S: Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let max = self.message_bytes_max;
        let request = request.map(|body| {
            tonic::body::Body::new(MessageLimit {
                inner: body,
                max,
                prefix: [0; GRPC_PREFIX_BYTES],
                prefix_len: 0,
                remaining: 0,
            })
        });
        self.inner.call(request)
    }
}

impl<S: NamedService> NamedService for RequestSize<S> {
    const NAME: &'static str = S::NAME;
}

/// A request body that follows gRPC message boundaries across data frames.
struct MessageLimit {
    inner: tonic::body::Body,
    max: usize,
    prefix: [u8; GRPC_PREFIX_BYTES],
    prefix_len: usize,
    /// Bytes of the current message not seen yet.
    remaining: usize,
}

impl MessageLimit {
    /// Walks `data`; the length of the first message over the limit, if any.
    fn oversized(&mut self, data: &Bytes) -> Option<usize> {
        let mut data = data.clone();
        while data.has_remaining() {
            if self.remaining > 0 {
                let skip = self.remaining.min(data.remaining());
                data.advance(skip);
                self.remaining -= skip;
                continue;
            }
            self.prefix[self.prefix_len] = data.get_u8();
            self.prefix_len += 1;
            if self.prefix_len == GRPC_PREFIX_BYTES {
                self.prefix_len = 0;
                let length = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]) as usize;
                if length > self.max {
                    return Some(length);
                }
                self.remaining = length;
            }
        }
        None
    }
}

impl Body for MessageLimit {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            if let Some(length) = self.oversized(data) {
                let max = self.max;
                return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(format!(
                    "request message of {length} bytes is over the limit of {max} bytes"
                )))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(max: usize) -> MessageLimit {
        MessageLimit {
            inner: tonic::body::Body::empty(),
            max,
            prefix: [0; GRPC_PREFIX_BYTES],
            prefix_len: 0,
            remaining: 0,
        }
    }

    fn message(length: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7, length as usize));
        bytes
    }

    #[test]
    fn messages_are_followed_across_frames() {
        let mut body = limit(10);
        let mut stream = message(10);
        stream.extend(message(3));
        // Cut anywhere, even inside a prefix: no message is over the limit.
        for cut in 0..stream.len() {
            let mut body = limit(10);
            let (a, b) = stream.split_at(cut);
            assert_eq!(body.oversized(&Bytes::copy_from_slice(a)), None);
            assert_eq!(body.oversized(&Bytes::copy_from_slice(b)), None);
        }
        stream.extend(&message(11)[..3]);
        assert_eq!(body.oversized(&Bytes::from(stream)), None);
        assert_eq!(body.oversized(&Bytes::from_static(&[0, 11])), Some(11));
    }
}
