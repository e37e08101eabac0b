//! A small HTTP/1.1 client for top-up hooks and webhooks, and the signature both carry.
//!
//! Only `http://` URLs are accepted: the dependency tree has no TLS stack, so production
//! receivers sit behind a TLS-terminating proxy on the authority's side (see docs/authority.md).

use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use tollgate_core::Timestamp;

use crate::settings::HTTP_RESPONSE_BYTES_MAX;

/// Header carrying `t=<unix ms>,v1=<hex hmac-sha256>`.
pub const SIGNATURE_HEADER: &str = "tollgate-signature";
/// Header carrying the event id (webhooks) or the attempt id (top-up hooks).
pub const ID_HEADER: &str = "tollgate-id";

#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

/// What a receiver answered, or why it could not be reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Status(u16),
    Failed(String),
}

impl Answer {
    pub fn is_success(&self) -> bool {
        matches!(self, Answer::Status(code) if (200..300).contains(code))
    }

    pub fn describe(&self) -> String {
        match self {
            Answer::Status(code) => format!("status {code}"),
            Answer::Failed(why) => why.clone(),
        }
    }
}

/// `hex(hmac_sha256(secret, "<t>.<body>"))`: the timestamp is signed with the body, so a
/// receiver can refuse an old message replayed at it.
pub fn signature(secret: &str, at: Timestamp, body: &str) -> String {
    // HMAC accepts keys of any length, so this never fails.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(at.millis().to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The signature header's value.
pub fn signature_header(secret: &str, at: Timestamp, body: &str) -> String {
    format!("t={},v1={}", at.millis(), signature(secret, at, body))
}

/// Whether `url` is one the client can call: `http://`, a host, and nothing it cannot parse.
pub fn check_hook_url(url: &str) -> Result<(), String> {
    if url.len() > HOOK_URL_LEN_MAX {
        return Err(format!("{} bytes, at most {HOOK_URL_LEN_MAX}", url.len()));
    }
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// URLs are supported".to_owned());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host".to_owned());
    }
    Ok(())
}

/// Longest hook or webhook URL accepted.
pub const HOOK_URL_LEN_MAX: usize = 2_048;

impl HttpClient {
    pub fn new(timeout_ms: u64) -> Self {
        HttpClient {
            client: Client::builder(TokioExecutor::new()).build_http(),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    /// POSTs a signed JSON body. Never errors: a failure is an [`Answer::Failed`].
    pub async fn post_signed(
        &self,
        url: &str,
        id: &str,
        secret: &str,
        body: &str,
        at: Timestamp,
    ) -> Answer {
        if let Err(why) = check_hook_url(url) {
            return Answer::Failed(format!("{url}: {why}"));
        }
        let request = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(ID_HEADER, id)
            .header(SIGNATURE_HEADER, signature_header(secret, at, body))
            .body(Full::new(Bytes::from(body.to_owned())));
        let request = match request {
            Ok(request) => request,
            Err(error) => return Answer::Failed(format!("bad request: {error}")),
        };
        let call = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            // Drain (boundedly) so the connection can be reused.
            let _ = Limited::new(response.into_body(), HTTP_RESPONSE_BYTES_MAX)
                .collect()
                .await;
            Ok::<u16, String>(status)
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(status)) => Answer::Status(status),
            Ok(Err(error)) => Answer::Failed(error),
            Err(_) => Answer::Failed(format!("no answer within {:?}", self.timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_covers_time_and_body() {
        let at = Timestamp::from_millis(1_000).unwrap();
        let later = Timestamp::from_millis(1_001).unwrap();
        let a = signature("secret", at, "{}");
        assert_eq!(a.len(), 64);
        assert_ne!(a, signature("secret", later, "{}"));
        assert_ne!(a, signature("secret", at, "{ }"));
        assert_ne!(a, signature("other", at, "{}"));
        assert_eq!(
            signature_header("secret", at, "{}"),
            format!("t=1000,v1={a}")
        );
    }
}
