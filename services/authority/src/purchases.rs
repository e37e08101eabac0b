//! Purchases on the wire: the Admin `Purchase` and `RefundPurchase` calls (decode, call
//! `tollgate_authority::purchases`, encode) and the HTTP receiver of Stripe's signed webhooks
//! (`POST /webhooks/stripe`), an axum router served on the authority's HTTP address.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tollgate_authority::purchases::{
    self, purchase_grant_id, PurchaseError, PurchaseOrder, PurchaseResult, RefundOrder,
};
use tollgate_authority::stripe::{self, StripeEvent, WEBHOOK_BODY_BYTES_MAX};
use tollgate_authority::Clock;
use tollgate_core::{AccountId, GrantId, Money};
use tollgate_ledger::{LedgerError, LedgerStore, Outcome};
use tollgate_proto::decode;
use tollgate_proto::{pb, ErrorCode, ServiceError};
use tonic::Status;
use tracing::{info, warn};

use crate::encode;

/// The webhook route.
pub const STRIPE_WEBHOOK_PATH: &str = "/webhooks/stripe";
/// The environment variable `dev` reads the Stripe endpoint secret from.
pub const STRIPE_SECRET_ENV_DEV: &str = "TOLLGATE_STRIPE_WEBHOOK_SECRET";

fn purchase_status(error: PurchaseError) -> Status {
    match error {
        PurchaseError::ReferenceConflict { .. } => {
            ServiceError::new(ErrorCode::AlreadyExists, error.to_string()).into()
        }
        PurchaseError::NotAPurchase { .. } | PurchaseError::Terms(_) => {
            ServiceError::new(ErrorCode::InvalidArgument, error.to_string()).into()
        }
        PurchaseError::Arithmetic(_) => {
            tracing::error!(%error, "purchase arithmetic failed");
            ServiceError::new(ErrorCode::Internal, "internal error").into()
        }
        PurchaseError::Ledger(error) => encode::ledger_error(error),
        PurchaseError::Closing(error) => crate::coordination::authority_error(error),
    }
}

fn money_to_pb(money: &Money) -> pb::Money {
    pb::Money {
        amount: money.amount.to_string(),
        currency: money.currency.as_str().to_owned(),
    }
}

/// Validates every field of a `PurchaseRequest`, naming the first bad one.
pub fn purchase_order(request: &pb::PurchaseRequest) -> Result<PurchaseOrder, Status> {
    decode::idempotency_key(&request.idempotency_key)?;
    let account: AccountId = decode::id("account_id", &request.account_id)?;
    let credits = decode::positive_credits("credits", &request.credits)?;
    let money = decode::money("money", request.money.as_ref())?
        .ok_or_else(|| ServiceError::invalid("money", "must be set"))?;
    purchases::check_money("money.amount", &money)
        .map_err(|e| ServiceError::invalid(e.field, e.problem))?;
    purchases::check_payment_reference(&request.payment_reference)
        .map_err(|e| ServiceError::invalid(e.field, e.problem))?;
    let order = PurchaseOrder {
        account,
        credits,
        money,
        payment_reference: request.payment_reference.clone(),
        priority: request.priority,
        expires_at: decode::optional_timestamp("expires_at", request.expires_at.as_ref())?,
        scope: decode::scope("scope", request.scope.as_ref())?,
        metadata: decode::metadata("metadata", &request.metadata)?,
        memo: decode::memo("memo", &request.memo)?,
    };
    order
        .validate()
        .map_err(|e| ServiceError::invalid(e.field, e.problem))?;
    Ok(order)
}

fn split(outcome: Outcome) -> (Option<pb::Receipt>, Option<pb::Refusal>) {
    match encode::mutation(outcome).outcome {
        Some(pb::mutation_reply::Outcome::Done(receipt)) => (Some(receipt), None),
        Some(pb::mutation_reply::Outcome::Refused(refusal)) => (None, Some(refusal)),
        None => (None, None),
    }
}

fn purchase_reply(result: PurchaseResult) -> pb::PurchaseReply {
    let grant = result.grant.as_ref().map(encode::grant);
    let outcome = match split(result.outcome) {
        (Some(receipt), _) => Some(pb::purchase_reply::Outcome::Done(receipt)),
        (None, Some(refusal)) => Some(pb::purchase_reply::Outcome::Refused(refusal)),
        (None, None) => None,
    };
    pb::PurchaseReply { outcome, grant }
}

/// `Purchase`: returns the reply and the account whose credits changed. `no_expiry`: a
/// contract in force says the account's grants never expire, so the order's expiry is dropped.
pub async fn purchase(
    ledger: &dyn LedgerStore,
    now: tollgate_core::Timestamp,
    request: pb::PurchaseRequest,
    no_expiry: bool,
) -> Result<(pb::PurchaseReply, AccountId), Status> {
    let mut order = purchase_order(&request)?;
    if no_expiry {
        order.expires_at = None;
    }
    let result = purchases::purchase(ledger, &order, now)
        .await
        .map_err(purchase_status)?;
    Ok((purchase_reply(result), order.account))
}

/// Validates every field of a `RefundPurchaseRequest`.
pub fn refund_order(request: &pb::RefundPurchaseRequest) -> Result<RefundOrder, Status> {
    let key = decode::id("idempotency_key", &request.idempotency_key)?;
    let account = decode::id("account_id", &request.account_id)?;
    let grant: GrantId = match (
        request.payment_reference.is_empty(),
        request.grant_id.is_empty(),
    ) {
        (false, true) => {
            purchases::check_payment_reference(&request.payment_reference)
                .map_err(|e| ServiceError::invalid(e.field, e.problem))?;
            purchase_grant_id(&request.payment_reference)
        }
        (true, false) => decode::id("grant_id", &request.grant_id)?,
        (true, true) => {
            return Err(ServiceError::invalid(
                "payment_reference",
                "set it or grant_id to name the purchase",
            )
            .into())
        }
        (false, false) => {
            return Err(ServiceError::invalid(
                "grant_id",
                "set payment_reference or grant_id, not both",
            )
            .into())
        }
    };
    Ok(RefundOrder {
        key,
        account,
        grant,
        memo: decode::memo("memo", &request.memo)?,
    })
}

/// `RefundPurchase`: returns the reply and the account whose credits changed.
pub async fn refund_purchase(
    ledger: &dyn LedgerStore,
    closer: &dyn tollgate_authority::GrantCloser,
    now: tollgate_core::Timestamp,
    request: pb::RefundPurchaseRequest,
) -> Result<(pb::RefundPurchaseReply, AccountId), Status> {
    let order = refund_order(&request)?;
    let account = order.account.clone();
    let result = purchases::refund_purchase(ledger, closer, order, now)
        .await
        .map_err(purchase_status)?;
    let outcome = match split(result.outcome) {
        (Some(receipt), _) => Some(pb::refund_purchase_reply::Outcome::Done(receipt)),
        (None, Some(refusal)) => Some(pb::refund_purchase_reply::Outcome::Refused(refusal)),
        (None, None) => None,
    };
    let reply = pb::RefundPurchaseReply {
        outcome,
        grant_id: result.grant.to_string(),
        credits_voided: result.credits_voided.to_string(),
        money_due: result.money_due.as_ref().map(money_to_pb),
    };
    Ok((reply, account))
}

/// What the Stripe webhook receiver needs: the ledger, a clock, the endpoint secret (without
/// one every delivery is answered 503), the tolerance, and where to say an account changed.
#[derive(Clone)]
pub struct StripeWebhook {
    ledger: Arc<dyn LedgerStore>,
    clock: Arc<dyn Clock>,
    secret: Option<Arc<str>>,
    tolerance_s: u64,
    changes: Option<mpsc::Sender<AccountId>>,
}

impl StripeWebhook {
    pub fn new(
        ledger: Arc<dyn LedgerStore>,
        clock: Arc<dyn Clock>,
        secret: Option<String>,
        tolerance_s: u64,
    ) -> Self {
        StripeWebhook {
            ledger,
            clock,
            secret: secret.filter(|s| !s.is_empty()).map(Arc::from),
            tolerance_s,
            changes: None,
        }
    }

    /// Tells the authority which accounts a purchase credited, so it allocates to regions.
    pub fn with_changes(mut self, changes: mpsc::Sender<AccountId>) -> Self {
        self.changes = Some(changes);
        self
    }

    /// `POST /webhooks/stripe`, with the body limit.
    pub fn router(self) -> axum::Router {
        axum::Router::new()
            .route(STRIPE_WEBHOOK_PATH, axum::routing::post(receive))
            // Refuse bodies larger than any real event before reading them whole.
            .layer(DefaultBodyLimit::max(WEBHOOK_BODY_BYTES_MAX))
            .with_state(self)
    }
}

fn answer(status: StatusCode, fields: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        fields.to_string(),
    )
        .into_response()
}

fn refused(status: StatusCode, message: impl std::fmt::Display) -> Response {
    answer(
        status,
        serde_json::json!({"status": "refused", "error": message.to_string()}),
    )
}

async fn receive(State(hook): State<StripeWebhook>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(secret) = hook.secret.as_deref() else {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "stripe webhooks are not configured on this node (no endpoint secret)",
        );
    };
    let Some(signature) = headers
        .get(stripe::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
    else {
        return refused(StatusCode::BAD_REQUEST, "no Stripe-Signature header");
    };
    let now = hook.clock.now();
    let now_s = now.millis().div_euclid(1_000);
    if let Err(error) = stripe::verify_signature(signature, &body, secret, now_s, hook.tolerance_s)
    {
        warn!(%error, "stripe webhook refused");
        return refused(StatusCode::BAD_REQUEST, error);
    }
    let event = match stripe::parse_event(&body) {
        Ok(event) => event,
        Err(error) => {
            warn!(%error, "stripe webhook malformed");
            return refused(StatusCode::BAD_REQUEST, error);
        }
    };
    let (event_id, event_type, order) = match event {
        StripeEvent::Ignored {
            event_id,
            event_type,
            reason,
        } => {
            info!(event_id, event_type, reason, "stripe event ignored");
            return answer(
                StatusCode::OK,
                serde_json::json!({"status": "ignored", "reason": reason}),
            );
        }
        StripeEvent::Purchase {
            event_id,
            event_type,
            order,
        } => (event_id, event_type, order),
    };
    match purchases::purchase(hook.ledger.as_ref(), &order, now).await {
        Ok(PurchaseResult {
            outcome: Ok(receipt),
            ..
        }) => {
            if let Some(changes) = &hook.changes {
                // A full channel drops the notice; the next full notifier scan catches up.
                let _ = changes.try_send(order.account.clone());
            }
            info!(
                event_id,
                event_type,
                account = %order.account,
                reference = order.payment_reference,
                replayed = receipt.replayed,
                "stripe purchase granted"
            );
            let grant = receipt.grant_id.map(|g| g.to_string()).unwrap_or_default();
            answer(
                StatusCode::OK,
                serde_json::json!({
                    "status": "granted",
                    "grant_id": grant,
                    "replayed": receipt.replayed,
                }),
            )
        }
        Ok(PurchaseResult {
            outcome: Err(refusal),
            ..
        }) => {
            warn!(event_id, %refusal, "stripe purchase refused by the ledger");
            refused(StatusCode::UNPROCESSABLE_ENTITY, refusal)
        }
        Err(error) => webhook_error(&event_id, error),
    }
}

/// 4xx for what a retry cannot fix, 5xx only when the ledger failed (the provider retries).
fn webhook_error(event_id: &str, error: PurchaseError) -> Response {
    let status = match &error {
        PurchaseError::ReferenceConflict { .. } => StatusCode::CONFLICT,
        PurchaseError::Terms(_) | PurchaseError::NotAPurchase { .. } => StatusCode::BAD_REQUEST,
        PurchaseError::Ledger(LedgerError::UnknownAccount(_)) => StatusCode::UNPROCESSABLE_ENTITY,
        PurchaseError::Ledger(LedgerError::InvalidArgument { .. }) => StatusCode::BAD_REQUEST,
        // The webhook only purchases; a refund's closing never reaches here.
        PurchaseError::Closing(_) => StatusCode::SERVICE_UNAVAILABLE,
        PurchaseError::Ledger(_) | PurchaseError::Arithmetic(_) => {
            tracing::error!(event_id, %error, "stripe purchase failed");
            let status = encode::ledger_error_ref(match &error {
                PurchaseError::Ledger(ledger) => ledger,
                _ => return refused(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
            });
            return if status.code() == tonic::Code::Unavailable {
                refused(StatusCode::SERVICE_UNAVAILABLE, "ledger unavailable, retry")
            } else {
                refused(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            };
        }
    };
    warn!(event_id, %error, "stripe purchase refused");
    refused(status, error)
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
