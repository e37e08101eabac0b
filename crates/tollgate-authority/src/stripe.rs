//! Stripe's signed webhooks, turned into purchases.
//!
//! Stripe signs each delivery with `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>…]`,
//! where each `v1` is `hex(hmac_sha256(secret, "<t>.<raw body>"))` (several while a secret is
//! being rolled). A delivery is accepted when one `v1` matches — compared in constant time —
//! and `t` is within the tolerance of now (either way, so a replayed old message and a forged
//! future one are both refused).
//!
//! `checkout.session.completed` (and `checkout.session.async_payment_succeeded`) and
//! `invoice.paid` become purchases when their object's metadata carries `tollgate_credits`;
//! the account is `metadata.tollgate_account`, else the session's `client_reference_id`; the
//! payment reference is the object's id, so every delivery of the same payment grants once.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use thiserror::Error;
use tollgate_core::command::{Memo, Metadata};
use tollgate_core::{AccountId, Credits, Currency, Money, Scope};

use crate::purchases::{check_payment_reference, money_from_minor_units, PurchaseOrder};

/// The header Stripe signs with (HTTP header names are case-insensitive).
pub const SIGNATURE_HEADER: &str = "stripe-signature";
/// How far `t` may be from now, in seconds, by default (Stripe's own libraries use 300).
pub const TOLERANCE_S_DEFAULT: u64 = 300;
/// Longest signature header accepted, in bytes.
pub const SIGNATURE_HEADER_LEN_MAX: usize = 4_096;
/// Most `v1` entries looked at in one header.
pub const SIGNATURES_MAX: usize = 16;
/// Largest webhook body accepted, in bytes.
pub const WEBHOOK_BODY_BYTES_MAX: usize = 256 * 1024;

/// Metadata key naming the account to credit.
pub const METADATA_ACCOUNT: &str = "tollgate_account";
/// Metadata key carrying the credits bought (a decimal string).
pub const METADATA_CREDITS: &str = "tollgate_credits";

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("malformed Stripe-Signature header: {0}")]
    Malformed(String),
    #[error("no v1 signature of the Stripe-Signature header matches the body")]
    Mismatch,
    #[error(
        "Stripe-Signature timestamp {timestamp} is {distance_s} s from now, \
         beyond the {tolerance_s} s tolerance"
    )]
    OutsideTolerance {
        timestamp: i64,
        distance_s: u64,
        tolerance_s: u64,
    },
}

fn malformed(problem: impl Into<String>) -> SignatureError {
    SignatureError::Malformed(problem.into())
}

/// `hex(hmac_sha256(secret, "<timestamp>.<body>"))`, the `v1` value Stripe sends.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
}

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("hmac accepts keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Checks a delivery's signature header against its raw body; returns the signed timestamp.
pub fn verify_signature(
    header: &str,
    body: &[u8],
    secret: &str,
    now_s: i64,
    tolerance_s: u64,
) -> Result<i64, SignatureError> {
    if header.len() > SIGNATURE_HEADER_LEN_MAX {
        return Err(malformed(format!(
            "{} bytes, at most {SIGNATURE_HEADER_LEN_MAX}",
            header.len()
        )));
    }
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let (name, value) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| malformed(format!("{part:?} is not name=value")))?;
        match name {
            "t" => {
                if timestamp.is_some() {
                    return Err(malformed("more than one t"));
                }
                let parsed = value
                    .parse::<i64>()
                    .map_err(|_| malformed(format!("t={value:?} is not unix seconds")))?;
                timestamp = Some(parsed);
            }
            "v1" => {
                if signatures.len() == SIGNATURES_MAX {
                    return Err(malformed(format!("more than {SIGNATURES_MAX} v1 entries")));
                }
                // A v1 that is not hex can never match; it is skipped, not fatal, like any
                // other non-matching signature.
                if let Ok(bytes) = hex::decode(value) {
                    signatures.push(bytes);
                }
            }
            // Other schemes (v0 is Stripe's test-mode scheme) are ignored, as Stripe advises.
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or_else(|| malformed("no t"))?;
    if signatures.is_empty() {
        return Err(malformed("no usable v1 signature"));
    }
    let expected = mac(secret, timestamp, body);
    // `verify_slice` compares in constant time.
    if !signatures
        .iter()
        .any(|candidate| expected.clone().verify_slice(candidate).is_ok())
    {
        return Err(SignatureError::Mismatch);
    }
    let distance_s = now_s.abs_diff(timestamp);
    if distance_s > tolerance_s {
        return Err(SignatureError::OutsideTolerance {
            timestamp,
            distance_s,
            tolerance_s,
        });
    }
    Ok(timestamp)
}

/// A webhook body that is not an event Tollgate can read; the message names the field.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct EventError {
    pub field: String,
    pub problem: String,
}

fn event_error(field: &str, problem: impl Into<String>) -> EventError {
    EventError {
        field: field.to_owned(),
        problem: problem.into(),
    }
}

/// What a verified event asks of Tollgate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StripeEvent {
    /// Grant this purchase (exactly once per object id).
    Purchase {
        event_id: String,
        event_type: String,
        order: Box<PurchaseOrder>,
    },
    /// Nothing to do; the reason is for logs and the reply.
    Ignored {
        event_id: String,
        event_type: String,
        reason: String,
    },
}

/// The kinds of object that pay for credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PaidObject {
    CheckoutSession,
    Invoice,
}

impl PaidObject {
    fn amount_field(self) -> &'static str {
        match self {
            PaidObject::CheckoutSession => "amount_total",
            PaidObject::Invoice => "amount_paid",
        }
    }

    fn name(self) -> &'static str {
        match self {
            PaidObject::CheckoutSession => "checkout.session",
            PaidObject::Invoice => "invoice",
        }
    }
}

/// Reads a verified event body.
pub fn parse_event(body: &[u8]) -> Result<StripeEvent, EventError> {
    let event: Value =
        serde_json::from_slice(body).map_err(|e| event_error("body", format!("not JSON: {e}")))?;
    let event_id = string_field(&event, "id", "id")?.to_owned();
    let event_type = string_field(&event, "type", "type")?.to_owned();
    let ignored = |reason: String| {
        Ok(StripeEvent::Ignored {
            event_id: event_id.clone(),
            event_type: event_type.clone(),
            reason,
        })
    };
    let paid = match event_type.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            PaidObject::CheckoutSession
        }
        "invoice.paid" => PaidObject::Invoice,
        other => return ignored(format!("event type {other} is not handled")),
    };
    let object = event
        .get("data")
        .and_then(|data| data.get("object"))
        .filter(|object| object.is_object())
        .ok_or_else(|| event_error("data.object", "missing"))?;
    if paid == PaidObject::CheckoutSession {
        // Delayed payment methods complete the session unpaid; the purchase is granted by
        // `checkout.session.async_payment_succeeded` once the money has arrived.
        match object.get("payment_status").and_then(Value::as_str) {
            None | Some("paid") | Some("no_payment_required") => {}
            Some(status) => return ignored(format!("checkout session is {status}")),
        }
    }
    let metadata = object.get("metadata").and_then(Value::as_object);
    let Some(credits) = metadata.and_then(|m| m.get(METADATA_CREDITS)) else {
        return ignored(format!(
            "no metadata.{METADATA_CREDITS}: not a Tollgate purchase"
        ));
    };
    let order = purchase_order(paid, object, metadata, credits)?;
    Ok(StripeEvent::Purchase {
        event_id,
        event_type,
        order: Box::new(order),
    })
}

fn purchase_order(
    paid: PaidObject,
    object: &Value,
    metadata: Option<&serde_json::Map<String, Value>>,
    credits: &Value,
) -> Result<PurchaseOrder, EventError> {
    let credits_field = format!("data.object.metadata.{METADATA_CREDITS}");
    let credits = credits
        .as_str()
        .ok_or_else(|| event_error(&credits_field, "not a string"))
        .and_then(|text| {
            Credits::parse_positive(text).map_err(|e| event_error(&credits_field, e.to_string()))
        })?;
    let reference = string_field(object, "id", "data.object.id")?.to_owned();
    check_payment_reference(&reference).map_err(|e| event_error("data.object.id", e.problem))?;
    let account_field = format!("data.object.metadata.{METADATA_ACCOUNT}");
    let (field, account) = match metadata.and_then(|m| m.get(METADATA_ACCOUNT)) {
        Some(account) => (account_field.as_str(), account.as_str()),
        None => (
            "data.object.client_reference_id",
            object.get("client_reference_id").and_then(Value::as_str),
        ),
    };
    let account = account.ok_or_else(|| {
        event_error(
            &account_field,
            "missing (and no client_reference_id to fall back on)",
        )
    })?;
    let account = AccountId::new(account).map_err(|e| event_error(field, e.to_string()))?;
    let amount_field = format!("data.object.{}", paid.amount_field());
    let minor_units = object
        .get(paid.amount_field())
        .and_then(Value::as_i64)
        .filter(|amount| *amount >= 0)
        .ok_or_else(|| event_error(&amount_field, "not an integer of zero or more"))?;
    let currency_text = string_field(object, "currency", "data.object.currency")?;
    let currency = Currency::new(&currency_text.to_ascii_uppercase())
        .ok_or_else(|| event_error("data.object.currency", "not an ISO 4217 code"))?;
    let money: Money = money_from_minor_units(minor_units, currency);
    let labels = [
        ("payment_provider".to_owned(), "stripe".to_owned()),
        ("stripe_object".to_owned(), paid.name().to_owned()),
    ];
    let order = PurchaseOrder {
        account,
        credits,
        money,
        payment_reference: reference.clone(),
        priority: None,
        expires_at: None,
        scope: Scope::All,
        metadata: Metadata::new(labels.into_iter().collect())
            .map_err(|e| event_error("metadata", e.to_string()))?,
        // Derived from the object only (never the event), so every event about the same
        // payment is the same purchase.
        memo: Memo::new(format!("stripe {} {reference}", paid.name()))
            .map_err(|e| event_error("data.object.id", e.to_string()))?,
    };
    order
        .validate()
        .map_err(|e| event_error(&amount_field, e.problem))?;
    Ok(order)
}

fn string_field<'a>(value: &'a Value, name: &str, field: &str) -> Result<&'a str, EventError> {
    value
        .get(name)
        .and_then(Value::as_str)
        .filter(|text| !text.is_empty())
        .ok_or_else(|| event_error(field, "missing or not a string"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";
    const BODY: &[u8] = br#"{"id":"evt_1","type":"invoice.paid"}"#;
    const NOW: i64 = 1_700_000_000;

    fn header(secret: &str, t: i64) -> String {
        format!("t={t},v1={}", sign(secret, t, BODY))
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently (Python's hmac module).
        assert_eq!(
            sign(SECRET, NOW, BODY),
            "46dc069361a7691082640523fa33fe5d6c8c88d5f5e257cdf8cf11539d166595"
        );
    }

    #[test]
    fn the_right_secret_verifies() {
        let verified = verify_signature(&header(SECRET, NOW), BODY, SECRET, NOW, 300);
        assert_eq!(verified, Ok(NOW));
    }

    #[test]
    fn a_wrong_secret_or_body_does_not() {
        let wrong = verify_signature(&header("whsec_other", NOW), BODY, SECRET, NOW, 300);
        assert_eq!(wrong, Err(SignatureError::Mismatch));
        let tampered = verify_signature(&header(SECRET, NOW), b"{}", SECRET, NOW, 300);
        assert_eq!(tampered, Err(SignatureError::Mismatch));
        // The timestamp is signed too: moving it breaks the signature.
        let moved = format!("t={},v1={}", NOW + 1, sign(SECRET, NOW, BODY));
        assert_eq!(
            verify_signature(&moved, BODY, SECRET, NOW, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn any_of_several_v1_entries_may_match() {
        let several = format!(
            "t={NOW},v1={},v0=abc,v1={} , v1=not-hex",
            sign("whsec_old", NOW, BODY),
            sign(SECRET, NOW, BODY)
        );
        assert_eq!(verify_signature(&several, BODY, SECRET, NOW, 300), Ok(NOW));
        let none = format!(
            "t={NOW},v1={},v1={}",
            sign("whsec_old", NOW, BODY),
            sign("whsec_older", NOW, BODY)
        );
        assert_eq!(
            verify_signature(&none, BODY, SECRET, NOW, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn stale_and_future_timestamps_are_refused() {
        let stale = verify_signature(&header(SECRET, NOW - 301), BODY, SECRET, NOW, 300);
        assert!(matches!(
            stale,
            Err(SignatureError::OutsideTolerance {
                distance_s: 301,
                ..
            })
        ));
        let future = verify_signature(&header(SECRET, NOW + 301), BODY, SECRET, NOW, 300);
        assert!(matches!(
            future,
            Err(SignatureError::OutsideTolerance {
                distance_s: 301,
                ..
            })
        ));
        let edge = verify_signature(&header(SECRET, NOW - 300), BODY, SECRET, NOW, 300);
        assert_eq!(edge, Ok(NOW - 300));
        // The tolerance is the caller's to choose.
        let strict = verify_signature(&header(SECRET, NOW - 10), BODY, SECRET, NOW, 5);
        assert!(strict.is_err());
    }

    #[test]
    fn malformed_headers_are_refused() {
        let v1 = sign(SECRET, NOW, BODY);
        for bad in [
            String::new(),
            "garbage".to_owned(),
            format!("v1={v1}"),
            format!("t=soon,v1={v1}"),
            format!("t={NOW}"),
            format!("t={NOW},v1=zz"),
            format!("t={NOW},t={NOW},v1={v1}"),
            format!("t={NOW},{}", "v1=00,".repeat(SIGNATURES_MAX + 1)),
            "x".repeat(SIGNATURE_HEADER_LEN_MAX + 1),
        ] {
            let refused = verify_signature(&bad, BODY, SECRET, NOW, 300);
            assert!(
                matches!(refused, Err(SignatureError::Malformed(_))),
                "{bad:?}: {refused:?}"
            );
        }
    }

    fn checkout(object: Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "id": "evt_9",
            "type": "checkout.session.completed",
            "data": { "object": object },
        }))
        .unwrap()
    }

    #[test]
    fn a_checkout_session_becomes_a_purchase() {
        let body = checkout(serde_json::json!({
            "id": "cs_test_1",
            "amount_total": 1999,
            "currency": "usd",
            "client_reference_id": "acme",
            "payment_status": "paid",
            "metadata": { "tollgate_credits": "100" },
        }));
        let StripeEvent::Purchase { order, .. } = parse_event(&body).unwrap() else {
            panic!("not a purchase");
        };
        assert_eq!(order.account.as_str(), "acme");
        assert_eq!(order.credits, Credits::from_whole(100).unwrap());
        assert_eq!(order.money.amount.to_string(), "19.99");
        assert_eq!(order.money.currency.as_str(), "USD");
        assert_eq!(order.payment_reference, "cs_test_1");
    }

    #[test]
    fn zero_decimal_currencies_are_not_divided() {
        let body = checkout(serde_json::json!({
            "id": "cs_test_2",
            "amount_total": 1500,
            "currency": "jpy",
            "metadata": { "tollgate_credits": "10", "tollgate_account": "acme" },
        }));
        let StripeEvent::Purchase { order, .. } = parse_event(&body).unwrap() else {
            panic!("not a purchase");
        };
        assert_eq!(order.money.amount.to_string(), "1500");
    }

    #[test]
    fn other_events_and_foreign_sessions_are_ignored() {
        let other = br#"{"id":"evt_2","type":"customer.created","data":{"object":{}}}"#;
        assert!(matches!(
            parse_event(other),
            Ok(StripeEvent::Ignored { .. })
        ));
        let foreign = checkout(serde_json::json!({
            "id": "cs_test_3", "amount_total": 100, "currency": "eur", "metadata": {},
        }));
        assert!(matches!(
            parse_event(&foreign),
            Ok(StripeEvent::Ignored { .. })
        ));
        let unpaid = checkout(serde_json::json!({
            "id": "cs_test_4", "amount_total": 100, "currency": "eur",
            "payment_status": "unpaid",
            "metadata": { "tollgate_credits": "10", "tollgate_account": "acme" },
        }));
        assert!(matches!(
            parse_event(&unpaid),
            Ok(StripeEvent::Ignored { .. })
        ));
    }

    #[test]
    fn malformed_events_name_the_field() {
        let cases = [
            (
                serde_json::json!({"id": "cs_5", "amount_total": 100, "currency": "eur",
                "metadata": {"tollgate_credits": "lots", "tollgate_account": "acme"}}),
                "data.object.metadata.tollgate_credits",
            ),
            (
                serde_json::json!({"id": "cs_5", "amount_total": 100, "currency": "eur",
                "metadata": {"tollgate_credits": "10"}}),
                "data.object.metadata.tollgate_account",
            ),
            (
                serde_json::json!({"id": "cs_5", "amount_total": -1, "currency": "eur",
                "metadata": {"tollgate_credits": "10", "tollgate_account": "acme"}}),
                "data.object.amount_total",
            ),
            (
                serde_json::json!({"id": "cs_5", "amount_total": 100, "currency": "euro",
                "metadata": {"tollgate_credits": "10", "tollgate_account": "acme"}}),
                "data.object.currency",
            ),
            (
                serde_json::json!({"amount_total": 100, "currency": "eur",
                "metadata": {"tollgate_credits": "10", "tollgate_account": "acme"}}),
                "data.object.id",
            ),
            (
                serde_json::json!({"id": "cs_5", "amount_total": 100, "currency": "eur",
                "metadata": {"tollgate_credits": "10", "tollgate_account": "not valid!"}}),
                "data.object.metadata.tollgate_account",
            ),
        ];
        for (object, field) in cases {
            let error = parse_event(&checkout(object)).unwrap_err();
            assert_eq!(error.field, field, "{error}");
        }
        assert_eq!(parse_event(b"not json").unwrap_err().field, "body");
    }
}
