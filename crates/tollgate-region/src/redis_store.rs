//! The Redis regional store: every mutation is one Lua script, run by SHA (`EVALSHA`), with the
//! script sent again when Redis answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).
//!
//! Every key of an account carries the hash tag `{account_id}`, so an account's scripts touch
//! one cluster slot. The usage stream is one key per region; on Redis Cluster it becomes one
//! stream per shard (see docs/region.md).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Script, ScriptInvocation, Value};
use tollgate_core::{
    AccountId, ActorId, Credits, Draw, FeatureKey, GrantId, HoldId, IdempotencyKey, LeaseId,
    Quantity, Rate, Timestamp,
};

use crate::types::*;
use crate::{debit_fingerprint, parse_scope, price_rule_from, scope_text, RegionStore, Result};

const LIB: &str = include_str!("lua/lib.lua");
/// How long connecting to Redis may take.
pub const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// How long one command may wait for its answer before it fails.
pub const RESPONSE_TIMEOUT_MS: u64 = 2_000;

/// The scripts, each with the shared library in front.
struct Scripts {
    debit: Script,
    authorize: Script,
    capture: Script,
    release: Script,
    lease_take: Script,
    lease_settle: Script,
    lease_return: Script,
    segment_install: Script,
    segment_take_back: Script,
    limits: Script,
    view: Script,
    reverse: Script,
    usage_ack: Script,
    publish: Script,
}

impl Scripts {
    fn load() -> Scripts {
        let with_lib = |body: &str| Script::new(&format!("{LIB}\n{body}"));
        Scripts {
            debit: with_lib(include_str!("lua/debit.lua")),
            authorize: with_lib(include_str!("lua/authorize.lua")),
            capture: with_lib(include_str!("lua/capture.lua")),
            release: with_lib(include_str!("lua/release.lua")),
            lease_take: with_lib(include_str!("lua/lease_take.lua")),
            lease_settle: with_lib(include_str!("lua/lease_settle.lua")),
            lease_return: with_lib(include_str!("lua/lease_return.lua")),
            segment_install: with_lib(include_str!("lua/segment_install.lua")),
            segment_take_back: with_lib(include_str!("lua/segment_take_back.lua")),
            limits: with_lib(include_str!("lua/limits.lua")),
            view: with_lib(include_str!("lua/view.lua")),
            reverse: with_lib(include_str!("lua/reverse.lua")),
            // Works on the stream alone, with its own key layout.
            usage_ack: Script::new(include_str!("lua/usage_ack.lua")),
            publish: Script::new(include_str!("lua/publish.lua")),
        }
    }
}

/// The regional store in Redis 7.
#[derive(Clone)]
pub struct RedisRegionStore {
    client: redis::Client,
    connection: ConnectionManager,
    scripts: Arc<Scripts>,
    prefix: Arc<str>,
    retain_ms: i64,
}

impl From<redis::RedisError> for RegionError {
    fn from(error: redis::RedisError) -> Self {
        RegionError::Redis(error.to_string())
    }
}

impl RedisRegionStore {
    /// Connects to `url`. `prefix` names the region's keys (`tg:eu`), so several regions can
    /// share a server in tests.
    pub async fn connect(url: &str, prefix: &str, retain_ms: i64) -> Result<RedisRegionStore> {
        let client = redis::Client::open(url)?;
        // Reconnects by itself after Redis restarts; while Redis is away calls fail fast (the
        // caller decides what a failure means: strict mode fails closed).
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(200))
            .set_connection_timeout(Some(Duration::from_millis(CONNECT_TIMEOUT_MS)))
            .set_response_timeout(Some(Duration::from_millis(RESPONSE_TIMEOUT_MS)));
        let connection = ConnectionManager::new_with_config(client.clone(), config).await?;
        Ok(RedisRegionStore {
            client,
            connection,
            scripts: Arc::new(Scripts::load()),
            prefix: prefix.into(),
            retain_ms,
        })
    }

    /// A connection to the same server, for tools and benchmarks.
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    pub fn usage_stream_key(&self) -> String {
        format!("{}:usage", self.prefix)
    }

    fn changes_channel(&self) -> String {
        format!("{}:changes", self.prefix)
    }

    fn price_book_keys(&self) -> (String, String) {
        (
            format!("{}:pricebook", self.prefix),
            format!("{}:pricebook:generation", self.prefix),
        )
    }

    fn summary_key(&self, account: &AccountId) -> String {
        format!("{}:{{{account}}}:summary", self.prefix)
    }

    /// The account's move count as its summary was last published
    /// ([`AccountSummary::region_moves`]).
    fn summary_stamp_key(&self, account: &AccountId) -> String {
        format!("{}:{{{account}}}:summary:moves", self.prefix)
    }

    fn idempotency_key(&self, account: &AccountId, key: &str) -> String {
        format!("{}:{{{account}}}:idem:{key}", self.prefix)
    }

    /// The eight keys every account script receives, in lib.lua's order.
    fn keys<'s>(
        &self,
        script: &'s Script,
        account: &AccountId,
        key: Option<&IdempotencyKey>,
    ) -> ScriptInvocation<'s> {
        let base = format!("{}:{{{account}}}", self.prefix);
        let mut invocation = script.prepare_invoke();
        for part in ["seg", "acct", "holds", "holddue", "leases", "leasedue"] {
            invocation.key(format!("{base}:{part}"));
        }
        invocation.key(self.usage_stream_key());
        invocation.key(match key {
            Some(key) => self.idempotency_key(account, key.as_str()),
            None => format!("{base}:idem:-"),
        });
        invocation
    }

    /// Runs an account script with the standard keys, `now`, the retention, then `args`.
    async fn run(
        &self,
        script: &Script,
        account: &AccountId,
        key: Option<&IdempotencyKey>,
        now: Timestamp,
        args: &[String],
    ) -> Result<Vec<String>> {
        let mut invocation = self.keys(script, account, key);
        invocation.arg(now.millis()).arg(self.retain_ms);
        for arg in args {
            invocation.arg(arg);
        }
        let mut connection = self.connection.clone();
        Ok(invocation.invoke_async(&mut connection).await?)
    }
}

/// The first element of a script's reply, and the rest.
fn split_reply(reply: &[String]) -> Result<(&str, &[String])> {
    reply
        .split_first()
        .map(|(head, rest)| (head.as_str(), rest))
        .ok_or_else(|| RegionError::Corrupt("empty script reply".into()))
}

fn micros(text: &str) -> Result<Credits> {
    text.parse::<i64>()
        .map(Credits::from_micros)
        .map_err(|_| RegionError::Corrupt(format!("amount {text:?}")))
}

fn millis(text: &str) -> Result<Timestamp> {
    let value = text
        .parse::<i64>()
        .map_err(|_| RegionError::Corrupt(format!("time {text:?}")))?;
    Timestamp::from_millis(value).map_err(|e| RegionError::Corrupt(format!("time {text:?}: {e}")))
}

fn parse_draws(text: &str) -> Result<Vec<Draw>> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|part| {
            let (id, amount) = part
                .split_once('=')
                .ok_or_else(|| RegionError::Corrupt(format!("draw {part:?}")))?;
            let grant_id = GrantId::new(id)
                .map_err(|e| RegionError::Corrupt(format!("grant id {id:?}: {e}")))?;
            Ok(Draw {
                grant_id,
                amount: micros(amount)?,
            })
        })
        .collect()
}

fn encode_draws(draws: &[Draw]) -> String {
    draws
        .iter()
        .map(|d| format!("{}={}", d.grant_id, d.amount.micros()))
        .collect::<Vec<_>>()
        .join(",")
}

/// `id/amount/priority/expires_at/effective_at/scope`.
fn parse_segment(text: &str) -> Result<Segment> {
    let fields: Vec<&str> = text.split('/').collect();
    let [id, amount, priority, expires, effective, scope] = fields[..] else {
        return Err(RegionError::Corrupt(format!("segment {text:?}")));
    };
    Ok(Segment {
        grant_id: GrantId::new(id)
            .map_err(|e| RegionError::Corrupt(format!("grant id {id:?}: {e}")))?,
        remaining: micros(amount)?,
        priority: priority
            .parse()
            .map_err(|_| RegionError::Corrupt(format!("priority {priority:?}")))?,
        effective_at: millis(effective)?,
        expires_at: if expires.is_empty() {
            None
        } else {
            Some(millis(expires)?)
        },
        scope: parse_scope(scope)?,
    })
}

fn fields<const N: usize>(text: &str) -> Result<[&str; N]> {
    let parts: Vec<&str> = text.split('|').collect();
    parts
        .try_into()
        .map_err(|_| RegionError::Corrupt(format!("result {text:?}")))
}

fn refusal(status: &str, rest: &[String]) -> Result<Refusal> {
    match (status, rest) {
        ("insufficient", [available, shortfall]) => Ok(Refusal::Insufficient {
            available: micros(available)?,
            shortfall: micros(shortfall)?,
        }),
        ("rate_limited", [feature, retry]) => Ok(Refusal::RateLimited {
            feature: FeatureKey::new(feature.as_str())
                .map_err(|e| RegionError::Corrupt(e.to_string()))?,
            retry_after_ms: retry
                .parse::<i64>()
                .ok()
                .and_then(|ms| u64::try_from(ms).ok()),
        }),
        ("conflict", _) => Err(RegionError::IdempotencyConflict),
        ("hold_exists", _) => Err(RegionError::HoldExists),
        _ => Err(RegionError::Corrupt(format!("reply {status:?} {rest:?}"))),
    }
}

fn hold_refusal(status: &str, rest: &[String]) -> Result<HoldRefusal> {
    match (status, rest) {
        ("unknown_hold", _) => Ok(HoldRefusal::UnknownHold),
        ("captured", _) => Ok(HoldRefusal::AlreadyCaptured),
        ("released", _) => Ok(HoldRefusal::AlreadyReleased),
        ("expired", _) => Ok(HoldRefusal::Expired),
        ("exceeds", [held]) => Ok(HoldRefusal::ExceedsHold {
            held: micros(held)?,
        }),
        ("conflict", _) => Err(RegionError::IdempotencyConflict),
        _ => Err(RegionError::Corrupt(format!("reply {status:?} {rest:?}"))),
    }
}

/// The stored result of an `ok`/`replay` reply, and whether it is a replay.
fn result_of<'r>(status: &str, rest: &'r [String]) -> Option<(&'r str, bool)> {
    match (status, rest) {
        ("ok", [result]) => Some((result.as_str(), false)),
        ("replay", [result]) => Some((result.as_str(), true)),
        _ => None,
    }
}

fn optional(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

fn actor_text(actor: &Option<ActorId>) -> String {
    actor.as_ref().map(ToString::to_string).unwrap_or_default()
}

impl RegionStore for RedisRegionStore {
    fn retain_ms(&self) -> i64 {
        self.retain_ms
    }

    async fn install_segment(
        &self,
        account: &AccountId,
        key: &IdempotencyKey,
        segment: &SegmentSpec,
        now: Timestamp,
    ) -> Result<SegmentInstalled> {
        check_amount("amount", segment.amount)?;
        let args = [
            crate::install_fingerprint(segment),
            segment.grant_id.to_string(),
            segment.amount.micros().to_string(),
            segment.priority.to_string(),
            segment
                .expires_at
                .map(|t| t.millis().to_string())
                .unwrap_or_default(),
            segment.effective_at.millis().to_string(),
            scope_text(&segment.scope),
            REGION_MICROS_MAX.to_string(),
        ];
        let reply = self
            .run(
                &self.scripts.segment_install,
                account,
                Some(key),
                now,
                &args,
            )
            .await?;
        let (status, rest) = split_reply(&reply)?;
        if let Some((result, replayed)) = result_of(status, rest) {
            let [remaining, pool] = fields(result)?;
            return Ok(SegmentInstalled {
                remaining: micros(remaining)?,
                pool: micros(pool)?,
                replayed,
            });
        }
        match (status, rest) {
            ("pool_full", [pool]) => Err(RegionError::PoolFull {
                pool: micros(pool)?,
            }),
            ("conflict", _) => Err(RegionError::IdempotencyConflict),
            _ => Err(RegionError::Corrupt(format!("reply {reply:?}"))),
        }
    }

    async fn take_back(
        &self,
        account: &AccountId,
        key: &IdempotencyKey,
        grant_id: &GrantId,
        amount: Credits,
        reconciled: Option<u64>,
        now: Timestamp,
    ) -> Result<TakenBack> {
        check_amount("amount", amount)?;
        let args = [
            crate::take_back_fingerprint(grant_id, amount, reconciled),
            grant_id.to_string(),
            amount.micros().to_string(),
            reconciled.map(|n| n.to_string()).unwrap_or_default(),
        ];
        let reply = self
            .run(
                &self.scripts.segment_take_back,
                account,
                Some(key),
                now,
                &args,
            )
            .await?;
        let (status, rest) = split_reply(&reply)?;
        let (result, replayed) = result_of(status, rest).ok_or(RegionError::IdempotencyConflict)?;
        let [taken, remaining, pool, unreconciled] = fields(result)?;
        Ok(TakenBack {
            taken: micros(taken)?,
            remaining: micros(remaining)?,
            pool: micros(pool)?,
            unreconciled: count(unreconciled)?,
            replayed,
        })
    }

    async fn set_overdraft_limit(
        &self,
        account: &AccountId,
        limit: Credits,
        now: Timestamp,
    ) -> Result<()> {
        check_amount("overdraft_limit", limit)?;
        let args = [limit.micros().to_string(), String::new(), String::new()];
        self.run(&self.scripts.limits, account, None, now, &args)
            .await
            .map(drop)
    }

    async fn set_rate_limit(
        &self,
        account: &AccountId,
        feature: &FeatureKey,
        limit: Option<RateLimit>,
        now: Timestamp,
    ) -> Result<()> {
        let encoded = match &limit {
            Some(limit) => {
                crate::check_rate_limit(limit)?;
                format!(
                    "{}|{}|{}",
                    limit.amount.micros(),
                    limit.period.millis(),
                    limit.burst.micros()
                )
            }
            None => String::new(),
        };
        let args = [String::new(), feature.to_string(), encoded];
        self.run(&self.scripts.limits, account, None, now, &args)
            .await
            .map(drop)
    }

    async fn debit(&self, command: &DebitCommand) -> Result<DebitOutcome> {
        check_amount("cost", command.cost)?;
        let args = [
            debit_fingerprint(&command.feature, command.cost, &command.price),
            command.account.to_string(),
            command.key.to_string(),
            command.feature.to_string(),
            command.cost.micros().to_string(),
            actor_text(&command.actor),
            command.price.version.to_string(),
            command.price.rule.as_str().to_string(),
            if command.forced { "1" } else { "0" }.to_string(),
            quantity_text(&command.price),
            rate_text(&command.price),
        ];
        let reply = self
            .run(
                &self.scripts.debit,
                &command.account,
                Some(&command.key),
                command.now,
                &args,
            )
            .await?;
        let (status, rest) = split_reply(&reply)?;
        // A decision made now says the account's move count after its result.
        let (rest, moves) = match (status, rest) {
            ("ok", [result, moves]) => (std::slice::from_ref(result), Some(count(moves)?)),
            _ => (rest, None),
        };
        match result_of(status, rest) {
            Some((result, replayed)) => {
                // Results stored before the overdraft room was part of them have five fields;
                // a decision settled from a lease adds its lease id as a seventh; the price the
                // decision was made at follows in five more (none in a result stored before).
                let parts: Vec<&str> = result.split('|').collect();
                let ((draws, overdraft, pool, usage_id, at, room), price) = match parts[..] {
                    [d, o, p, u, a, r, _, _, version, rule, quantity, rate] => (
                        (d, o, p, u, a, r),
                        Some(parse_price(version, rule, quantity, rate)?),
                    ),
                    [d, o, p, u, a, r] | [d, o, p, u, a, r, _] => ((d, o, p, u, a, r), None),
                    [d, o, p, u, a] => ((d, o, p, u, a, "0"), None),
                    _ => return Err(RegionError::Corrupt(format!("result {result:?}"))),
                };
                Ok(DebitOutcome::Allowed(Allowed {
                    draws: parse_draws(draws)?,
                    overdraft: micros(overdraft)?,
                    pool: micros(pool)?,
                    overdraft_room: micros(room)?,
                    usage_id: UsageId(usage_id.to_string()),
                    at: millis(at)?,
                    replayed,
                    price,
                    moves,
                }))
            }
            None => refusal(status, rest).map(DebitOutcome::Refused),
        }
    }

    async fn authorize(&self, command: &AuthorizeCommand) -> Result<AuthorizeOutcome> {
        check_amount("cost", command.cost)?;
        let args = [
            crate::authorize_fingerprint(command),
            command.hold_id.to_string(),
            command.feature.to_string(),
            command.cost.micros().to_string(),
            command.expires_at.millis().to_string(),
            actor_text(&command.actor),
            command.price.version.to_string(),
            command.price.rule.as_str().to_string(),
            quantity_text(&command.price),
            rate_text(&command.price),
        ];
        let reply = self
            .run(
                &self.scripts.authorize,
                &command.account,
                Some(&command.key),
                command.now,
                &args,
            )
            .await?;
        let (status, rest) = split_reply(&reply)?;
        match result_of(status, rest) {
            Some((result, replayed)) => {
                let [draws, overdraft, expires_at] = fields(result)?;
                Ok(AuthorizeOutcome::Held(HoldPlaced {
                    draws: parse_draws(draws)?,
                    overdraft: micros(overdraft)?,
                    expires_at: millis(expires_at)?,
                    replayed,
                }))
            }
            None => refusal(status, rest).map(AuthorizeOutcome::Refused),
        }
    }

    async fn capture(&self, command: &CaptureCommand) -> Result<CaptureOutcome> {
        if let Some(amount) = command.amount {
            check_amount("amount", amount)?;
        }
        let amount = command
            .amount
            .map(|a| a.micros().to_string())
            .unwrap_or_default();
        let args = [
            crate::capture_fingerprint(command),
            command.account.to_string(),
            command.key.to_string(),
            command.hold_id.to_string(),
            amount,
        ];
        let reply = self
            .run(
                &self.scripts.capture,
                &command.account,
                Some(&command.key),
                command.now,
                &args,
            )
            .await?;
        let (status, rest) = split_reply(&reply)?;
        match result_of(status, rest) {
            Some((result, replayed)) => {
                let [draws, overdraft, released, usage_id] = fields(result)?;
                Ok(CaptureOutcome::Captured(Captured {
                    draws: parse_draws(draws)?,
                    overdraft: micros(overdraft)?,
                    released: micros(released)?,
                    usage_id: UsageId(usage_id.to_string()),
                    replayed,
                }))
            }
            None => hold_refusal(status, rest).map(CaptureOutcome::Refused),
        }
    }

    async fn release(&self, command: &ReleaseCommand) -> Result<ReleaseOutcome> {
        let args = [
            crate::release_fingerprint(&command.hold_id),
            command.hold_id.to_string(),
        ];
        let reply = self
            .run(
                &self.scripts.release,
                &command.account,
                Some(&command.key),
                command.now,
                &args,
            )
            .await?;
        let (status, rest) = split_reply(&reply)?;
        match result_of(status, rest) {
            Some((amount, replayed)) => Ok(ReleaseOutcome::Released {
                amount: micros(amount)?,
                replayed,
            }),
            None => hold_refusal(status, rest).map(ReleaseOutcome::Refused),
        }
    }

    async fn reverse(&self, command: &ReverseCommand) -> Result<ReverseOutcome> {
        let args = [
            crate::reverse_fingerprint(&command.debit_key),
            command.account.to_string(),
            command.debit_key.to_string(),
            command.window_ms.to_string(),
            self.idempotency_key(&command.account, command.debit_key.as_str()),
        ];
        let reply = self
            .run(
                &self.scripts.reverse,
                &command.account,
                Some(&command.key),
                command.now,
                &args,
            )
            .await?;
        let (status, rest) = split_reply(&reply)?;
        if let Some((result, replayed)) = result_of(status, rest) {
            let [amount, usage_id] = fields(result)?;
            return Ok(ReverseOutcome::Reversed {
                amount: micros(amount)?,
                usage_id: UsageId(usage_id.to_string()),
                replayed,
            });
        }
        match status {
            "unknown_debit" => Ok(ReverseOutcome::Refused(ReverseRefusal::UnknownDebit)),
            "window_closed" => Ok(ReverseOutcome::Refused(ReverseRefusal::WindowClosed)),
            "already_reversed" => Ok(ReverseOutcome::Refused(ReverseRefusal::AlreadyReversed)),
            "conflict" => Err(RegionError::IdempotencyConflict),
            _ => Err(RegionError::Corrupt(format!("reply {reply:?}"))),
        }
    }

    async fn take_lease(&self, request: &LeaseRequest) -> Result<Lease> {
        check_amount("amount", request.amount)?;
        let args = [
            crate::lease_fingerprint(request),
            request.lease_id.to_string(),
            request.amount.micros().to_string(),
            request.expires_at.millis().to_string(),
        ];
        let reply = self
            .run(
                &self.scripts.lease_take,
                &request.account,
                Some(&request.key),
                request.now,
                &args,
            )
            .await?;
        let (status, rest) = split_reply(&reply)?;
        let (result, replayed) = result_of(status, rest).ok_or(RegionError::IdempotencyConflict)?;
        let [granted, overdraft, expires_at, slices] = fields(result)?;
        let slices = if slices.is_empty() {
            Vec::new()
        } else {
            slices
                .split(';')
                .map(parse_segment)
                .collect::<Result<_>>()?
        };
        Ok(Lease {
            granted: micros(granted)?,
            overdraft: micros(overdraft)?,
            expires_at: millis(expires_at)?,
            slices,
            replayed,
        })
    }

    async fn settle_lease(&self, settlement: &LeaseSettlement) -> Result<SettleOutcome> {
        if settlement.entries.len() > LEASE_SETTLE_ENTRIES_MAX {
            return Err(RegionError::TooManyEntries {
                count: settlement.entries.len(),
            });
        }
        let mut args = vec![
            settlement.account.to_string(),
            settlement.lease_id.to_string(),
            settlement.expires_at.millis().to_string(),
            self.idempotency_key(&settlement.account, ""),
        ];
        for entry in &settlement.entries {
            let cost = entry.cost();
            check_amount("cost", cost)?;
            args.extend([
                entry.key.to_string(),
                debit_fingerprint(&entry.feature, cost, &entry.price),
                entry.feature.to_string(),
                entry.at.millis().to_string(),
                cost.micros().to_string(),
                encode_draws(&entry.draws),
                entry.overdraft.micros().to_string(),
                actor_text(&entry.actor),
                entry.price.version.to_string(),
                entry.price.rule.as_str().to_string(),
                quantity_text(&entry.price),
                rate_text(&entry.price),
            ]);
        }
        let reply = self
            .run(
                &self.scripts.lease_settle,
                &settlement.account,
                None,
                settlement.now,
                &args,
            )
            .await?;
        if reply.first().map(String::as_str) == Some("no_lease") {
            return Ok(SettleOutcome::NoLease);
        }
        let statuses = reply
            .iter()
            .map(|status| match status.split_once(':') {
                Some(("ok", id)) => Ok(SettleStatus::Recorded(UsageId(id.to_string()))),
                // A usage id never holds a colon; the derived key may.
                Some(("rekeyed", rest)) => match rest.split_once(':') {
                    Some((id, key)) => Ok(SettleStatus::Rekeyed {
                        usage_id: UsageId(id.to_string()),
                        key: IdempotencyKey::new(key).map_err(|e| {
                            RegionError::Corrupt(format!("derived key {key:?}: {e}"))
                        })?,
                    }),
                    None => Err(RegionError::Corrupt(format!("settle status {status:?}"))),
                },
                Some(("rejected", why)) => Ok(SettleStatus::Rejected(why.to_string())),
                None if status == "duplicate" => Ok(SettleStatus::Duplicate),
                _ => Err(RegionError::Corrupt(format!("settle status {status:?}"))),
            })
            .collect::<Result<_>>()?;
        Ok(SettleOutcome::Settled(statuses))
    }

    async fn return_lease(
        &self,
        account: &AccountId,
        lease_id: &LeaseId,
        now: Timestamp,
    ) -> Result<Credits> {
        let reply = self
            .run(
                &self.scripts.lease_return,
                account,
                None,
                now,
                &[lease_id.to_string()],
            )
            .await?;
        match split_reply(&reply)? {
            ("ok", [returned]) => micros(returned),
            _ => Err(RegionError::Corrupt(format!("reply {reply:?}"))),
        }
    }

    async fn view(&self, account: &AccountId, now: Timestamp) -> Result<AccountView> {
        let reply = self
            .run(&self.scripts.view, account, None, now, &[])
            .await?;
        let [od_limit, od_used, held, pending, leased, leases, usage_seq, held_grants, moves, segments @ ..] =
            &reply[..]
        else {
            return Err(RegionError::Corrupt(format!("view {reply:?}")));
        };
        let mut segments = segments
            .iter()
            .map(|s| parse_segment(s))
            .collect::<Result<Vec<_>>>()?;
        segments.sort_by(|a, b| a.grant_id.cmp(&b.grant_id));
        Ok(AccountView {
            segments,
            overdraft_limit: micros(od_limit)?,
            overdraft_used: micros(od_used)?,
            held: micros(held)?,
            holds_pending: count(pending)?,
            held_grants: held_grants
                .split(',')
                .filter(|id| !id.is_empty())
                .map(|id| {
                    tollgate_core::GrantId::new(id)
                        .map_err(|e| RegionError::Corrupt(format!("held grant {id:?}: {e}")))
                })
                .collect::<Result<Vec<_>>>()?,
            leased: micros(leased)?,
            leases: count(leases)?,
            usage_seq: count(usage_seq)?,
            moves: count(moves)?,
        })
    }

    async fn create_usage_group(&self, group: &str) -> Result<()> {
        let mut connection = self.connection.clone();
        let created: redis::RedisResult<()> = connection
            .xgroup_create_mkstream(self.usage_stream_key(), group, "0")
            .await;
        match created {
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            other => Ok(other?),
        }
    }

    async fn read_usage(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
    ) -> Result<Vec<UsageRecord>> {
        Ok(self.read_usage_to_end(group, consumer, max).await?.records)
    }

    async fn read_usage_to_end(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
    ) -> Result<UsageRead> {
        let max = max.clamp(1, USAGE_READ_MAX);
        let mut connection = self.connection.clone();
        let options = StreamReadOptions::default()
            .group(group, consumer)
            .count(max);
        let key = self.usage_stream_key();
        // First what this consumer was given and never acknowledged, then new records.
        for start in ["0", ">"] {
            let reply: Option<StreamReadReply> = connection
                .xread_options(&[&key], &[start], &options)
                .await?;
            let ids = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids);
            let records = ids
                .filter(|entry| !entry.map.is_empty())
                .map(|entry| parse_record(entry.id, &entry.map))
                .collect::<Result<Vec<_>>>()?;
            if !records.is_empty() {
                // New records short of the count: none was left beyond them.
                let at_end = start == ">" && records.len() < max;
                return Ok(UsageRead { records, at_end });
            }
        }
        Ok(UsageRead {
            records: Vec::new(),
            at_end: true,
        })
    }

    async fn ack_usage(&self, group: &str, ids: &[UsageId]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.scripts.usage_ack.prepare_invoke();
        invocation.key(self.usage_stream_key()).arg(group);
        for id in ids {
            invocation.arg(&id.0);
        }
        let mut connection = self.connection.clone();
        Ok(invocation.invoke_async(&mut connection).await?)
    }

    async fn usage_backlog(&self) -> Result<Option<UsageBacklog>> {
        let key = self.usage_stream_key();
        let mut connection = self.connection.clone();
        // Both answers from one round trip; acknowledged records are deleted (usage_ack.lua),
        // so the length is what waits for the authority.
        let (records, oldest): (u64, redis::streams::StreamRangeReply) = redis::pipe()
            .xlen(&key)
            .xrange_count(&key, "-", "+", 1)
            .query_async(&mut connection)
            .await?;
        let oldest_appended_ms = match oldest.ids.first() {
            Some(entry) => Some(crate::usage_id_millis(&entry.id).ok_or_else(|| {
                RegionError::Corrupt(format!("usage record id {} has no time", entry.id))
            })?),
            None => None,
        };
        Ok(Some(UsageBacklog {
            records,
            oldest_appended_ms,
        }))
    }

    async fn publish_price_book(&self, book: &tollgate_core::PriceBook) -> Result<u64> {
        let document = to_document(book)?;
        let (key, generation_key) = self.price_book_keys();
        let mut invocation = self.scripts.publish.prepare_invoke();
        invocation
            .key(key)
            .key(generation_key)
            .arg(document)
            .arg(self.changes_channel())
            .arg("pricebook");
        let mut connection = self.connection.clone();
        Ok(invocation.invoke_async(&mut connection).await?)
    }

    async fn price_book_generation(&self) -> Result<u64> {
        let (_, generation_key) = self.price_book_keys();
        let mut connection = self.connection.clone();
        let generation: Option<u64> = connection.get(generation_key).await?;
        Ok(generation.unwrap_or(0))
    }

    async fn load_price_book(&self) -> Result<Option<PublishedPriceBook>> {
        let (key, generation_key) = self.price_book_keys();
        let mut connection = self.connection.clone();
        let (generation, document): (Option<u64>, Option<String>) = redis::pipe()
            .get(generation_key)
            .get(key)
            .query_async(&mut connection)
            .await?;
        match (generation, document) {
            (Some(generation), Some(document)) => Ok(Some(PublishedPriceBook {
                generation,
                book: from_document(&document)?,
            })),
            _ => Ok(None),
        }
    }

    async fn publish_account(&self, summary: &AccountSummary) -> Result<()> {
        let document = to_document(summary)?;
        let mut invocation = self.scripts.publish.prepare_invoke();
        invocation
            .key(self.summary_key(&summary.account))
            .key("")
            .key(format!("{}:{{{}}}:acct", self.prefix, summary.account))
            .key(self.summary_stamp_key(&summary.account))
            .arg(document)
            .arg(self.changes_channel())
            .arg(format!("account:{}", summary.account));
        let mut connection = self.connection.clone();
        let _: u64 = invocation.invoke_async(&mut connection).await?;
        Ok(())
    }

    async fn account_summary(&self, account: &AccountId) -> Result<Option<AccountSummary>> {
        let mut connection = self.connection.clone();
        let (document, stamp): (Option<String>, Option<String>) = redis::cmd("MGET")
            .arg(self.summary_key(account))
            .arg(self.summary_stamp_key(account))
            .query_async(&mut connection)
            .await?;
        let Some(document) = document else {
            return Ok(None);
        };
        let mut summary: AccountSummary = from_document(&document)?;
        summary.region_moves = stamp.as_deref().map(count).transpose()?.unwrap_or(0);
        Ok(Some(summary))
    }

    async fn recall_leases(&self, account: &AccountId) -> Result<()> {
        let mut connection = self.connection.clone();
        let _: u64 = connection
            .publish(self.changes_channel(), format!("recall:{account}"))
            .await?;
        Ok(())
    }

    async fn watch_changes(&self) -> Result<tokio::sync::mpsc::Receiver<Change>> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(self.changes_channel()).await?;
        let (sender, receiver) = tokio::sync::mpsc::channel(crate::CHANGE_CHANNEL_CAPACITY);
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let Ok(text) = message.get_payload::<String>() else {
                    continue;
                };
                let account = |id: &str| AccountId::new(id).ok();
                let change = if let Some(id) = text.strip_prefix("account:") {
                    let Some(account) = account(id) else { continue };
                    Change::Account(account)
                } else if let Some(id) = text.strip_prefix("recall:") {
                    let Some(account) = account(id) else { continue };
                    Change::Recall(account)
                } else {
                    Change::PriceBook
                };
                if sender.is_closed() {
                    break;
                }
                // A full channel loses the notice; readers poll as well.
                let _ = sender.try_send(change);
            }
        });
        Ok(receiver)
    }
}

fn to_document<T: serde::Serialize>(value: &T) -> Result<String> {
    let document =
        serde_json::to_string(value).map_err(|e| RegionError::Corrupt(format!("encode: {e}")))?;
    if document.len() > crate::PUBLISHED_BYTES_MAX {
        return Err(RegionError::Corrupt(format!(
            "document of {} bytes is over the limit",
            document.len()
        )));
    }
    Ok(document)
}

fn from_document<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| RegionError::Corrupt(format!("published document: {e}")))
}

fn parse_record(id: String, map: &HashMap<String, Value>) -> Result<UsageRecord> {
    let field = |name: &str| -> Result<String> {
        let value = map
            .get(name)
            .ok_or_else(|| RegionError::Corrupt(format!("usage record {id} lacks {name}")))?;
        redis::from_redis_value_ref::<String>(value)
            .map_err(|e| RegionError::Corrupt(format!("usage record {id} {name}: {e}")))
    };
    // Fields a record written before they existed lacks.
    let absent_empty = |name: &str| -> Result<String> {
        if map.contains_key(name) {
            field(name)
        } else {
            Ok(String::new())
        }
    };
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        RegionError::Corrupt(format!("usage record {id} {what}: {e}"))
    };
    let kind = match field("kind")?.as_str() {
        "debit" => UsageKind::Debit,
        "capture" => UsageKind::Capture,
        "reverse" => UsageKind::Reverse,
        other => {
            return Err(RegionError::Corrupt(format!(
                "usage record {id} kind {other:?}"
            )))
        }
    };
    let actor = field("actor")?;
    let hold = field("hold")?;
    let lease = field("lease")?;
    Ok(UsageRecord {
        kind,
        account: AccountId::new(field("account")?).map_err(|e| corrupt("account", &e))?,
        key: IdempotencyKey::new(field("key")?).map_err(|e| corrupt("key", &e))?,
        feature: FeatureKey::new(field("feature")?).map_err(|e| corrupt("feature", &e))?,
        at: millis(&field("at")?)?,
        cost: micros(&field("cost")?)?,
        draws: parse_draws(&field("draws")?)?,
        overdraft: micros(&field("overdraft")?)?,
        pool: micros(&field("pool")?)?,
        overdraft_room: micros(&field("od_room")?)?,
        actor: optional(&actor)
            .map(ActorId::new)
            .transpose()
            .map_err(|e| corrupt("actor", &e))?,
        price: parse_price(
            &field("price_version")?,
            &field("price_rule")?,
            &absent_empty("quantity")?,
            &absent_empty("rate")?,
        )
        .map_err(|e| corrupt("price", &e))?,
        hold_id: optional(&hold)
            .map(HoldId::new)
            .transpose()
            .map_err(|e| corrupt("hold", &e))?,
        lease_id: optional(&lease)
            .map(LeaseId::new)
            .transpose()
            .map_err(|e| corrupt("lease", &e))?,
        seq: match map.get("seq") {
            Some(_) => count(&field("seq")?)?,
            None => 0,
        },
        id: UsageId(id),
    })
}

/// The price fields of a record or a stored result: a quantity and a rate are empty for an
/// explicit cost (and absent from a record written before they were kept).
fn parse_price(version: &str, rule: &str, quantity: &str, rate: &str) -> Result<PriceTag> {
    let corrupt = |what: &str, text: &str| RegionError::Corrupt(format!("{what} {text:?}"));
    Ok(PriceTag {
        version: version
            .parse()
            .map_err(|_| corrupt("price_version", version))?,
        rule: price_rule_from(rule)?,
        quantity: optional(quantity)
            .map(Quantity::parse)
            .transpose()
            .map_err(|_| corrupt("quantity", quantity))?,
        rate: optional(rate)
            .map(Rate::parse)
            .transpose()
            .map_err(|_| corrupt("rate", rate))?,
    })
}

fn quantity_text(price: &PriceTag) -> String {
    price.quantity.map(|q| q.to_string()).unwrap_or_default()
}

fn rate_text(price: &PriceTag) -> String {
    price.rate.map(|r| r.to_string()).unwrap_or_default()
}

fn count(text: &str) -> Result<u64> {
    text.parse::<u64>()
        .map_err(|_| RegionError::Corrupt(format!("count {text:?}")))
}
