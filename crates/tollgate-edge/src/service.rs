//! `tollgate.v1.Enforcement` over gRPC: decode (every field checked once, errors name it), ask
//! the engine, encode. The `Enforce` stream runs the same calls for gateways that batch, with
//! replies matched by correlation id and possibly out of order.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tollgate_core::{AccountId, Credits, FeatureKey, HoldId, IdempotencyKey, Quantity};
use tollgate_proto::decode;
use tollgate_proto::{pb, ErrorCode, ServiceError};
use tollgate_region::{EnforcementMode, HoldRefusal, RegionStore, ReverseRefusal};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::engine::{
    hold_id_for_key, AuthorizeRequest, DebitRequest, Decision, Engine, Priced, Refused, Spend,
};
use crate::error::EngineError;
use crate::metrics::{Metrics, Rpc};
use tollgate_core::hold::{HOLD_TTL_MS_DEFAULT, HOLD_TTL_MS_MAX, HOLD_TTL_MS_MIN};

/// Requests of one `Enforce` stream being decided at once.
pub const ENFORCE_IN_FLIGHT_MAX: usize = 256;
/// Replies of one `Enforce` stream waiting to be sent.
pub const ENFORCE_REPLIES_BUFFERED_MAX: usize = 1_024;

type Decoded<T> = Result<T, ServiceError>;

pub struct EnforcementService<S: RegionStore> {
    engine: Arc<Engine<S>>,
    metrics: Arc<Metrics>,
}

impl<S: RegionStore> EnforcementService<S> {
    pub fn new(engine: Arc<Engine<S>>, metrics: Arc<Metrics>) -> Self {
        EnforcementService { engine, metrics }
    }
}

fn engine_error(error: EngineError) -> ServiceError {
    match error {
        EngineError::InvalidArgument { field, message } => ServiceError::invalid(field, message),
        EngineError::Conflict => ServiceError::new(
            ErrorCode::IdempotencyConflict,
            "idempotency_key: used before for a different request",
        ),
        EngineError::Unavailable(message) => ServiceError::new(ErrorCode::Unavailable, message),
        EngineError::UnknownFeature(feature) => ServiceError::new(
            ErrorCode::Internal,
            format!("unpriced feature {feature} escaped the engine"),
        ),
        EngineError::Internal(message) => ServiceError::new(ErrorCode::Internal, message),
    }
}

fn usage(usage: Option<&pb::Usage>) -> Decoded<(FeatureKey, Spend)> {
    let usage = usage.ok_or_else(|| ServiceError::invalid("usage", "required"))?;
    let feature = decode::id("usage.feature", &usage.feature)?;
    let spend = match &usage.amount {
        Some(pb::usage::Amount::Quantity(text)) => Spend::Quantity(
            Quantity::parse(text).map_err(|e| ServiceError::invalid("usage.quantity", e))?,
        ),
        Some(pb::usage::Amount::Cost(text)) => {
            Spend::Cost(decode::non_negative_credits("usage.cost", text)?)
        }
        None => return Err(ServiceError::invalid("usage", "set quantity or cost")),
    };
    Ok((feature, spend))
}

fn mode(value: i32) -> Decoded<Option<EnforcementMode>> {
    match pb::EnforcementMode::try_from(value) {
        Ok(pb::EnforcementMode::Unspecified) => Ok(None),
        Ok(pb::EnforcementMode::Strict) => Ok(Some(EnforcementMode::Strict)),
        Ok(pb::EnforcementMode::Cached) => Ok(Some(EnforcementMode::Cached)),
        Err(_) => Err(ServiceError::invalid(
            "mode",
            format!("unknown value {value}"),
        )),
    }
}

fn ttl_ms(seconds: u32) -> Decoded<i64> {
    if seconds == 0 {
        return Ok(HOLD_TTL_MS_DEFAULT);
    }
    let millis = i64::from(seconds) * 1_000;
    if !(HOLD_TTL_MS_MIN..=HOLD_TTL_MS_MAX).contains(&millis) {
        return Err(ServiceError::invalid(
            "ttl_seconds",
            format!("{seconds} is outside 1..={}", HOLD_TTL_MS_MAX / 1_000),
        ));
    }
    Ok(millis)
}

/// The hold a Capture or Release names: by its id, or by the idempotency key of the Authorize
/// that placed it (the id is derived from that key), exactly one of the two.
fn hold(hold_id: &str, authorize_key: &str) -> Decoded<HoldId> {
    match (hold_id.is_empty(), authorize_key.is_empty()) {
        (false, true) => decode::id("hold_id", hold_id),
        (true, false) => {
            let key: IdempotencyKey = decode::id("authorize_key", authorize_key)?;
            hold_id_for_key(&key)
                .map_err(|e| ServiceError::new(ErrorCode::Internal, format!("hold id: {e}")))
        }
        (true, true) => Err(ServiceError::invalid(
            "hold_id",
            "set hold_id or authorize_key",
        )),
        (false, false) => Err(ServiceError::invalid(
            "authorize_key",
            "set hold_id or authorize_key, not both",
        )),
    }
}

fn priced(priced: &Priced) -> pb::PricedCost {
    pb::PricedCost {
        cost: priced.cost.to_string(),
        rate: priced.rate.map(|r| r.to_string()).unwrap_or_default(),
        price_version: priced.version,
        price_rule: decode::price_rule_to_pb(priced.rule) as i32,
    }
}

/// A reply's `balance_after`: empty only when the region could not be read after the decision.
fn balance_text(balance: Option<Credits>) -> String {
    balance.map(|b| b.to_string()).unwrap_or_default()
}

fn refusal(refused: &Refused) -> pb::Refusal {
    use pb::RefusalCode as Code;
    let plain = |code: Code, message: String| pb::Refusal {
        code: code as i32,
        message,
        ..pb::Refusal::default()
    };
    match refused {
        Refused::Insufficient {
            cost,
            available,
            shortfall,
        } => pb::Refusal {
            code: Code::InsufficientCredits as i32,
            message: format!("insufficient credits: costs {cost}, {available} available"),
            cost: cost.to_string(),
            available: available.to_string(),
            shortfall: shortfall.to_string(),
            ..pb::Refusal::default()
        },
        Refused::RateLimited {
            feature,
            retry_after_ms,
        } => plain(
            Code::RateLimited,
            match retry_after_ms {
                Some(ms) => format!("rate limit of {feature}: enough refills in {ms} ms"),
                None => format!(
                    "rate limit of {feature}: the cost is above the bucket's burst and never fits"
                ),
            },
        ),
        Refused::AuthorityUnreachable {
            cost,
            available,
            balance,
        } => pb::Refusal {
            code: Code::AuthorityUnreachable as i32,
            message: format!(
                "this region can pay {available} of {cost} and the authority holding the rest \
                 of the account's credits could not be reached; the account's balance was \
                 {balance} when last known"
            ),
            cost: cost.to_string(),
            available: available.to_string(),
            shortfall: cost.saturating_sub_floor_zero(*available).to_string(),
            balance: balance.to_string(),
        },
        Refused::UnknownFeature(feature) => plain(
            Code::UnknownFeature,
            format!("feature {feature} has no price"),
        ),
        Refused::UnknownAccount(account) => plain(
            Code::UnknownAccount,
            format!("account {account} is not known in this region"),
        ),
        Refused::Hold(hold) => match hold {
            HoldRefusal::UnknownHold => plain(
                Code::UnknownHold,
                "hold not found (never made, or ended and forgotten)".into(),
            ),
            HoldRefusal::AlreadyCaptured => plain(
                Code::HoldAlreadyCaptured,
                "hold was already captured".into(),
            ),
            HoldRefusal::AlreadyReleased => plain(
                Code::HoldAlreadyReleased,
                "hold was already released".into(),
            ),
            HoldRefusal::Expired => plain(Code::HoldExpired, "hold expired".into()),
            HoldRefusal::ExceedsHold { held } => pb::Refusal {
                code: Code::CaptureExceedsHold as i32,
                message: format!("capture exceeds the {held} held"),
                available: held.to_string(),
                ..pb::Refusal::default()
            },
        },
        Refused::Reverse(reverse) => match reverse {
            ReverseRefusal::WindowClosed => plain(
                Code::ReverseWindowClosed,
                "the reverse window has closed".into(),
            ),
            ReverseRefusal::AlreadyReversed => {
                plain(Code::AlreadyReversed, "debit was already reversed".into())
            }
            ReverseRefusal::UnknownDebit => plain(
                Code::UnknownDebit,
                "no debit under that key in this region".into(),
            ),
        },
    }
}

/// The handlers, shared by the unary calls and the stream.
struct Calls<S: RegionStore>(Arc<Engine<S>>);

impl<S: RegionStore> Calls<S> {
    async fn debit(&self, request: pb::DebitRequest) -> Decoded<pb::DebitReply> {
        let key: IdempotencyKey = decode::idempotency_key(&request.idempotency_key)?;
        let account = decode::id("account_id", &request.account_id)?;
        let (feature, spend) = usage(request.usage.as_ref())?;
        let actor = decode::optional_id("actor_id", &request.actor_id)?;
        let mode = mode(request.mode)?;
        let event_time = decode::optional_timestamp("event_time", request.event_time.as_ref())?;
        decode::metadata("metadata", &request.metadata)?;
        let debit = DebitRequest {
            account,
            key: key.clone(),
            feature,
            spend,
            actor,
            mode,
            event_time,
        };
        let outcome = match self.0.debit(debit).await.map_err(engine_error)? {
            Decision::Done(done) => pb::debit_reply::Outcome::Debited(pb::Debited {
                debit_id: key.to_string(),
                priced: Some(priced(&done.priced)),
                draws: done
                    .draws
                    .iter()
                    .map(|d| pb::Draw {
                        grant_id: d.grant_id.to_string(),
                        amount: d.amount.to_string(),
                    })
                    .collect(),
                overdraft: done.overdraft.to_string(),
                balance_after: done.balance_after.to_string(),
                replayed: done.replayed,
            }),
            Decision::Refused(refused) => pb::debit_reply::Outcome::Refused(refusal(&refused)),
        };
        Ok(pb::DebitReply {
            outcome: Some(outcome),
        })
    }

    async fn authorize(&self, request: pb::AuthorizeRequest) -> Decoded<pb::AuthorizeReply> {
        let key = decode::idempotency_key(&request.idempotency_key)?;
        let account: AccountId = decode::id("account_id", &request.account_id)?;
        let (feature, spend) = usage(request.usage.as_ref())?;
        let ttl_ms = ttl_ms(request.ttl_seconds)?;
        let actor = decode::optional_id("actor_id", &request.actor_id)?;
        // Holds always live in the regional store; a mode is accepted and has no effect.
        mode(request.mode)?;
        decode::metadata("metadata", &request.metadata)?;
        let authorize = AuthorizeRequest {
            account: account.clone(),
            key,
            feature,
            spend,
            ttl_ms,
            actor,
        };
        let outcome = match self.0.authorize(authorize).await.map_err(engine_error)? {
            Decision::Done(done) => pb::authorize_reply::Outcome::Authorized(pb::Authorized {
                hold_id: done.hold_id.to_string(),
                priced: Some(priced(&done.priced)),
                expires_at: Some(decode::timestamp_to_pb(done.expires_at)),
                balance_after: balance_text(self.0.balance_after(&account).await),
                replayed: done.replayed,
            }),
            Decision::Refused(refused) => pb::authorize_reply::Outcome::Refused(refusal(&refused)),
        };
        Ok(pb::AuthorizeReply {
            outcome: Some(outcome),
        })
    }

    async fn capture(&self, request: pb::CaptureRequest) -> Decoded<pb::CaptureReply> {
        let key = decode::idempotency_key(&request.idempotency_key)?;
        let account: AccountId = decode::id("account_id", &request.account_id)?;
        let hold_id = hold(&request.hold_id, &request.authorize_key)?;
        let amount = if request.amount.is_empty() {
            None
        } else {
            Some(decode::non_negative_credits("amount", &request.amount)?)
        };
        let outcome = match self
            .0
            .capture(account.clone(), key.clone(), hold_id, amount)
            .await
            .map_err(engine_error)?
        {
            Decision::Done(done) => pb::capture_reply::Outcome::Captured(pb::Captured {
                debit_id: key.to_string(),
                captured: done.captured.to_string(),
                released: done.released.to_string(),
                balance_after: balance_text(self.0.balance_after(&account).await),
            }),
            Decision::Refused(refused) => pb::capture_reply::Outcome::Refused(refusal(&refused)),
        };
        Ok(pb::CaptureReply {
            outcome: Some(outcome),
        })
    }

    async fn release(&self, request: pb::ReleaseRequest) -> Decoded<pb::ReleaseReply> {
        let key = decode::idempotency_key(&request.idempotency_key)?;
        let account: AccountId = decode::id("account_id", &request.account_id)?;
        let hold_id = hold(&request.hold_id, &request.authorize_key)?;
        let outcome = match self
            .0
            .release(account.clone(), key, hold_id)
            .await
            .map_err(engine_error)?
        {
            Decision::Done(released) => pb::release_reply::Outcome::Released(pb::Released {
                released: released.to_string(),
                balance_after: balance_text(self.0.balance_after(&account).await),
            }),
            Decision::Refused(refused) => pb::release_reply::Outcome::Refused(refusal(&refused)),
        };
        Ok(pb::ReleaseReply {
            outcome: Some(outcome),
        })
    }

    async fn reverse(&self, request: pb::ReverseRequest) -> Decoded<pb::ReverseReply> {
        let key = decode::idempotency_key(&request.idempotency_key)?;
        let account: AccountId = decode::id("account_id", &request.account_id)?;
        let debit_key: IdempotencyKey = decode::id("debit_id", &request.debit_id)?;
        let outcome = match self
            .0
            .reverse(account.clone(), key, debit_key)
            .await
            .map_err(engine_error)?
        {
            Decision::Done(reversed) => pb::reverse_reply::Outcome::Reversed(pb::Reversed {
                reversed: reversed.to_string(),
                balance_after: balance_text(self.0.balance_after(&account).await),
            }),
            Decision::Refused(refused) => pb::reverse_reply::Outcome::Refused(refusal(&refused)),
        };
        Ok(pb::ReverseReply {
            outcome: Some(outcome),
        })
    }

    async fn get_balance(&self, request: pb::GetBalanceRequest) -> Decoded<pb::GetBalanceReply> {
        let account: AccountId = decode::id("account_id", &request.account_id)?;
        let feature = decode::optional_id("feature", &request.feature)?;
        match self
            .0
            .balance(account.clone(), feature)
            .await
            .map_err(engine_error)?
        {
            Decision::Done(view) => {
                let summary = &view.summary;
                Ok(pb::GetBalanceReply {
                    balance: Some(pb::Balance {
                        account_id: account.to_string(),
                        balance: view.balance.to_string(),
                        debt: Credits::ZERO
                            .saturating_sub_floor_zero(view.balance)
                            .to_string(),
                        overdraft_limit: summary.overdraft_limit.to_string(),
                        totals: None,
                        entry_count: 0,
                        as_of: Some(decode::timestamp_to_pb(summary.published_at)),
                    }),
                    available: view.available.to_string(),
                    held: view.held.to_string(),
                    region_available: view.region_available.to_string(),
                })
            }
            Decision::Refused(_) => Err(ServiceError::new(
                ErrorCode::NotFound,
                format!("account_id: {account} is not known in this region"),
            )),
        }
    }

    async fn quote(&self, request: pb::QuoteRequest) -> Decoded<pb::QuoteReply> {
        let account: AccountId = decode::id("account_id", &request.account_id)?;
        let (feature, spend) = usage(request.usage.as_ref())?;
        match self
            .0
            .quote(account.clone(), feature.clone(), spend)
            .await
            .map_err(engine_error)?
        {
            Decision::Done(quote) => Ok(pb::QuoteReply {
                priced: Some(priced(&quote.priced)),
                affordable: quote.affordable,
                available: quote.available.to_string(),
            }),
            Decision::Refused(Refused::UnknownFeature(_)) => Err(ServiceError::new(
                ErrorCode::NotFound,
                format!("usage.feature: {feature} has no price"),
            )),
            Decision::Refused(_) => Err(ServiceError::new(
                ErrorCode::NotFound,
                format!("account_id: {account} is not known in this region"),
            )),
        }
    }

    /// One request of an `Enforce` stream; bad input is a per-request error, not the stream's end.
    async fn enforce_one(&self, request: pb::EnforceRequest) -> pb::EnforceReply {
        use pb::enforce_reply::Reply;
        use pb::enforce_request::Request as Req;
        let reply = match request.request {
            Some(Req::Debit(debit)) => self.debit(debit).await.map(Reply::Debit),
            Some(Req::Authorize(authorize)) => {
                self.authorize(authorize).await.map(Reply::Authorize)
            }
            Some(Req::Capture(capture)) => self.capture(capture).await.map(Reply::Capture),
            Some(Req::Release(release)) => self.release(release).await.map(Reply::Release),
            None => Err(ServiceError::invalid("request", "required")),
        };
        let reply = reply.unwrap_or_else(|error| {
            Reply::Error(pb::StreamError {
                code: error.code.grpc_code() as i32,
                message: error.message,
            })
        });
        pb::EnforceReply {
            correlation_id: request.correlation_id,
            reply: Some(reply),
        }
    }
}

impl<S: RegionStore> EnforcementService<S> {
    fn calls(&self) -> Calls<S> {
        Calls(Arc::clone(&self.engine))
    }

    fn observe<T>(
        &self,
        rpc: Rpc,
        started: Instant,
        result: &Decoded<T>,
        refused: impl Fn(&T) -> bool,
    ) {
        let outcome = match result {
            Ok(reply) if refused(reply) => "refused",
            Ok(_) => "allowed",
            Err(error) if error.code == ErrorCode::InvalidArgument => "invalid",
            Err(_) => "error",
        };
        self.metrics.decided(rpc, outcome, started.elapsed());
    }
}

macro_rules! unary {
    ($self:ident, $request:ident, $method:ident, $rpc:expr, $refused:expr) => {{
        let started = Instant::now();
        let span = tracing::info_span!("tollgate.enforcement", rpc = $rpc.as_str());
        let result = $self
            .calls()
            .$method($request.into_inner())
            .instrument(span)
            .await;
        $self.observe($rpc, started, &result, $refused);
        result.map(Response::new).map_err(Status::from)
    }};
}

#[tonic::async_trait]
impl<S: RegionStore> pb::enforcement_server::Enforcement for EnforcementService<S> {
    async fn authorize(
        &self,
        request: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeReply>, Status> {
        unary!(
            self,
            request,
            authorize,
            Rpc::Authorize,
            |r: &pb::AuthorizeReply| matches!(
                r.outcome,
                Some(pb::authorize_reply::Outcome::Refused(_))
            )
        )
    }

    async fn capture(
        &self,
        request: Request<pb::CaptureRequest>,
    ) -> Result<Response<pb::CaptureReply>, Status> {
        unary!(
            self,
            request,
            capture,
            Rpc::Capture,
            |r: &pb::CaptureReply| matches!(
                r.outcome,
                Some(pb::capture_reply::Outcome::Refused(_))
            )
        )
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseReply>, Status> {
        unary!(
            self,
            request,
            release,
            Rpc::Release,
            |r: &pb::ReleaseReply| matches!(
                r.outcome,
                Some(pb::release_reply::Outcome::Refused(_))
            )
        )
    }

    async fn debit(
        &self,
        request: Request<pb::DebitRequest>,
    ) -> Result<Response<pb::DebitReply>, Status> {
        unary!(
            self,
            request,
            debit,
            Rpc::Debit,
            |r: &pb::DebitReply| matches!(r.outcome, Some(pb::debit_reply::Outcome::Refused(_)))
        )
    }

    async fn reverse(
        &self,
        request: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::ReverseReply>, Status> {
        unary!(
            self,
            request,
            reverse,
            Rpc::Reverse,
            |r: &pb::ReverseReply| matches!(
                r.outcome,
                Some(pb::reverse_reply::Outcome::Refused(_))
            )
        )
    }

    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceReply>, Status> {
        unary!(
            self,
            request,
            get_balance,
            Rpc::GetBalance,
            |_: &pb::GetBalanceReply| false
        )
    }

    async fn quote(
        &self,
        request: Request<pb::QuoteRequest>,
    ) -> Result<Response<pb::QuoteReply>, Status> {
        unary!(self, request, quote, Rpc::Quote, |r: &pb::QuoteReply| !r
            .affordable)
    }

    type EnforceStream = Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::EnforceReply, Status>> + Send + 'static>,
    >;

    async fn enforce(
        &self,
        request: Request<Streaming<pb::EnforceRequest>>,
    ) -> Result<Response<Self::EnforceStream>, Status> {
        let mut inbound = request.into_inner();
        let calls = Arc::new(self.calls());
        let metrics = Arc::clone(&self.metrics);
        let (replies, outbound) = tokio::sync::mpsc::channel(ENFORCE_REPLIES_BUFFERED_MAX);
        tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            let mut open = true;
            while open || !in_flight.is_empty() {
                tokio::select! {
                    message = inbound.message(), if open && in_flight.len() < ENFORCE_IN_FLIGHT_MAX => match message {
                        Ok(Some(request)) => {
                            let calls = Arc::clone(&calls);
                            let started = Instant::now();
                            in_flight.push(async move { (calls.enforce_one(request).await, started) });
                        }
                        Ok(None) => open = false,
                        Err(status) => {
                            let _ = replies.send(Err(status)).await;
                            return;
                        }
                    },
                    Some((reply, started)) = in_flight.next(), if !in_flight.is_empty() => {
                        metrics.decided(Rpc::Enforce, stream_outcome(&reply), started.elapsed());
                        if replies.send(Ok(reply)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }
}

fn stream_outcome(reply: &pb::EnforceReply) -> &'static str {
    use pb::enforce_reply::Reply;
    match &reply.reply {
        Some(Reply::Error(error)) if error.code == tonic::Code::InvalidArgument as i32 => "invalid",
        Some(Reply::Error(_)) | None => "error",
        Some(Reply::Debit(pb::DebitReply {
            outcome: Some(pb::debit_reply::Outcome::Refused(_)),
        }))
        | Some(Reply::Authorize(pb::AuthorizeReply {
            outcome: Some(pb::authorize_reply::Outcome::Refused(_)),
        }))
        | Some(Reply::Capture(pb::CaptureReply {
            outcome: Some(pb::capture_reply::Outcome::Refused(_)),
        }))
        | Some(Reply::Release(pb::ReleaseReply {
            outcome: Some(pb::release_reply::Outcome::Refused(_)),
        })) => "refused",
        Some(_) => "allowed",
    }
}
