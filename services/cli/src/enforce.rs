//! Commands on the Enforcement API (the edge), for support to reproduce what a gateway does.

use serde_json::json;
use tollgate_proto::pb;

use crate::admin::key_of;
use crate::cli::{
    AuthorizeArgs, CaptureArgs, DebitArgs, HoldName, QuoteArgs, ReleaseArgs, ReverseArgs,
};
use crate::client::Connection;
use crate::error::CliError;
use crate::output::Out;
use crate::{parse, render};

/// Longest hold the edge accepts (7 days), in seconds.
const HOLD_TTL_S_MAX: u64 = 7 * 24 * 3600;

fn missing_outcome() -> CliError {
    CliError::Other("the edge's reply carried neither a result nor a refusal".into())
}

fn priced_fields(priced: &Option<pb::PricedCost>) -> Vec<(&'static str, String)> {
    let priced = priced.clone().unwrap_or_default();
    vec![
        ("cost", priced.cost),
        ("rate", priced.rate),
        (
            "price",
            if priced.price_version == 0 {
                "explicit cost".into()
            } else {
                format!(
                    "version {}, rule {}",
                    priced.price_version,
                    render::price_rule(priced.price_rule)
                )
            },
        ),
    ]
}

pub async fn authorize(conn: &Connection, out: &Out, args: AuthorizeArgs) -> Result<(), CliError> {
    let key = key_of(&args.mutation)?;
    let ttl_seconds = match args.ttl {
        None => 0,
        Some(ttl) if (1..=HOLD_TTL_S_MAX).contains(&ttl.as_secs()) => {
            u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX)
        }
        Some(_) => return Err(CliError::input("--ttl", "must be 1s to 7 days")),
    };
    let request = pb::AuthorizeRequest {
        idempotency_key: key.clone(),
        account_id: args.account,
        usage: Some(parse::usage(
            &args.usage.feature,
            &args.usage.quantity,
            &args.usage.cost,
        )?),
        ttl_seconds,
        actor_id: args.actor,
        mode: parse::mode("--mode", &args.mode)?.into(),
        metadata: parse::metadata("--metadata", &args.metadata)?,
    };
    let mut edge = conn.edge().await?;
    let reply = conn
        .call("Authorize", edge.authorize(conn.request(request)))
        .await?;
    match reply.outcome.ok_or_else(missing_outcome)? {
        pb::authorize_reply::Outcome::Authorized(held) => {
            let value = json!({
                "hold_id": held.hold_id,
                "priced": render::priced(&held.priced),
                "expires_at": render::time(&held.expires_at),
                "balance_after": held.balance_after,
                "idempotency_key": key,
            });
            out.print(value, || {
                let mut fields = vec![("hold", held.hold_id.clone())];
                fields.extend(priced_fields(&held.priced));
                fields.extend([
                    ("expires at", render::time(&held.expires_at)),
                    ("balance after", held.balance_after.clone()),
                    ("idempotency key", key.clone()),
                ]);
                render::fields(&fields)
            });
            Ok(())
        }
        pb::authorize_reply::Outcome::Refused(refusal) => out.refused(&key, refusal),
    }
}

/// The hold a capture or release names, as the request's `(hold_id, authorize_key)`: exactly
/// one of the hold's id and `--authorize-key`, checked before anything is sent.
pub fn hold_named(name: HoldName) -> Result<(String, String), CliError> {
    let given = |value: Option<String>| value.filter(|v| !v.trim().is_empty());
    match (given(name.hold), given(name.authorize_key)) {
        (Some(hold), None) => Ok((hold, String::new())),
        (None, Some(key)) => Ok((String::new(), key)),
        (Some(_), Some(_)) => Err(CliError::input(
            "--authorize-key",
            "name the hold by its id or by --authorize-key, not both",
        )),
        (None, None) => Err(CliError::input(
            "--authorize-key",
            "name the hold: its id (HOLD) or the idempotency key it was authorized with \
             (--authorize-key KEY)",
        )),
    }
}

pub async fn capture(conn: &Connection, out: &Out, args: CaptureArgs) -> Result<(), CliError> {
    let key = key_of(&args.mutation)?;
    let (hold_id, authorize_key) = hold_named(args.hold)?;
    let amount = match &args.amount {
        Some(amount) => parse::positive_amount("--amount", amount)?,
        None => String::new(),
    };
    let mut edge = conn.edge().await?;
    let reply = conn
        .call(
            "Capture",
            edge.capture(conn.request(pb::CaptureRequest {
                idempotency_key: key.clone(),
                account_id: args.account,
                hold_id,
                amount,
                authorize_key,
            })),
        )
        .await?;
    match reply.outcome.ok_or_else(missing_outcome)? {
        pb::capture_reply::Outcome::Captured(captured) => {
            let value = json!({
                "debit_id": captured.debit_id,
                "captured": captured.captured,
                "released": captured.released,
                "balance_after": captured.balance_after,
                "idempotency_key": key,
            });
            out.print(value, || {
                render::fields(&[
                    ("debit", captured.debit_id.clone()),
                    ("captured", captured.captured.clone()),
                    ("released", captured.released.clone()),
                    ("balance after", captured.balance_after.clone()),
                    ("idempotency key", key.clone()),
                ])
            });
            Ok(())
        }
        pb::capture_reply::Outcome::Refused(refusal) => out.refused(&key, refusal),
    }
}

/// What a release or a reversal gave back (`label`: "released", "reversed"), the balance after
/// it and the idempotency key, as JSON or fields.
fn print_returned(out: &Out, label: &str, amount: &str, balance_after: &str, key: &str) {
    let value = json!({
        label: amount,
        "balance_after": balance_after,
        "idempotency_key": key,
    });
    out.print(value, || {
        render::fields(&[
            (label, amount.to_owned()),
            ("balance after", balance_after.to_owned()),
            ("idempotency key", key.to_owned()),
        ])
    });
}

pub async fn release(conn: &Connection, out: &Out, args: ReleaseArgs) -> Result<(), CliError> {
    let key = key_of(&args.mutation)?;
    let (hold_id, authorize_key) = hold_named(args.hold)?;
    let mut edge = conn.edge().await?;
    let reply = conn
        .call(
            "Release",
            edge.release(conn.request(pb::ReleaseRequest {
                idempotency_key: key.clone(),
                account_id: args.account,
                hold_id,
                authorize_key,
            })),
        )
        .await?;
    match reply.outcome.ok_or_else(missing_outcome)? {
        pb::release_reply::Outcome::Released(released) => {
            print_returned(
                out,
                "released",
                &released.released,
                &released.balance_after,
                &key,
            );
            Ok(())
        }
        pb::release_reply::Outcome::Refused(refusal) => out.refused(&key, refusal),
    }
}

pub async fn debit(conn: &Connection, out: &Out, args: DebitArgs) -> Result<(), CliError> {
    let key = key_of(&args.mutation)?;
    let request = pb::DebitRequest {
        idempotency_key: key.clone(),
        account_id: args.account,
        usage: Some(parse::usage(
            &args.usage.feature,
            &args.usage.quantity,
            &args.usage.cost,
        )?),
        actor_id: args.actor,
        mode: parse::mode("--mode", &args.mode)?.into(),
        event_time: parse::optional_time("--event-time", &args.event_time)?,
        metadata: parse::metadata("--metadata", &args.metadata)?,
    };
    let mut edge = conn.edge().await?;
    let reply = conn
        .call("Debit", edge.debit(conn.request(request)))
        .await?;
    match reply.outcome.ok_or_else(missing_outcome)? {
        pb::debit_reply::Outcome::Debited(debited) => {
            let value = json!({
                "debit_id": debited.debit_id,
                "priced": render::priced(&debited.priced),
                "draws": debited.draws.iter().map(render::draw).collect::<Vec<_>>(),
                "overdraft": debited.overdraft,
                "balance_after": debited.balance_after,
                "replayed": debited.replayed,
                "idempotency_key": key,
            });
            out.print(value, || {
                let mut fields = vec![("debit", debited.debit_id.clone())];
                fields.extend(priced_fields(&debited.priced));
                let draws: Vec<String> = debited
                    .draws
                    .iter()
                    .map(|d| format!("{} from {}", d.amount, d.grant_id))
                    .collect();
                fields.extend([
                    ("burned", draws.join(", ")),
                    ("overdraft", debited.overdraft.clone()),
                    ("balance after", debited.balance_after.clone()),
                    ("replayed", debited.replayed.to_string()),
                    ("idempotency key", key.clone()),
                ]);
                render::fields(&fields)
            });
            Ok(())
        }
        pb::debit_reply::Outcome::Refused(refusal) => out.refused(&key, refusal),
    }
}

pub async fn reverse(conn: &Connection, out: &Out, args: ReverseArgs) -> Result<(), CliError> {
    let key = key_of(&args.mutation)?;
    let mut edge = conn.edge().await?;
    let reply = conn
        .call(
            "Reverse",
            edge.reverse(conn.request(pb::ReverseRequest {
                idempotency_key: key.clone(),
                account_id: args.account,
                debit_id: args.debit,
            })),
        )
        .await?;
    match reply.outcome.ok_or_else(missing_outcome)? {
        pb::reverse_reply::Outcome::Reversed(reversed) => {
            print_returned(
                out,
                "reversed",
                &reversed.reversed,
                &reversed.balance_after,
                &key,
            );
            Ok(())
        }
        pb::reverse_reply::Outcome::Refused(refusal) => out.refused(&key, refusal),
    }
}

pub async fn quote(conn: &Connection, out: &Out, args: QuoteArgs) -> Result<(), CliError> {
    let usage = parse::usage(&args.usage.feature, &args.usage.quantity, &args.usage.cost)?;
    let mut edge = conn.edge().await?;
    let reply = conn
        .call(
            "Quote",
            edge.quote(conn.request(pb::QuoteRequest {
                account_id: args.account,
                usage: Some(usage),
            })),
        )
        .await?;
    let value = json!({
        "priced": render::priced(&reply.priced),
        "affordable": reply.affordable,
        "available": reply.available,
    });
    out.print(value, || {
        let mut fields = priced_fields(&reply.priced);
        fields.extend([
            ("affordable", reply.affordable.to_string()),
            ("available", reply.available.clone()),
        ]);
        render::fields(&fields)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(hold: Option<&str>, key: Option<&str>) -> Result<(String, String), String> {
        hold_named(HoldName {
            hold: hold.map(str::to_owned),
            authorize_key: key.map(str::to_owned),
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_hold_is_named_by_its_id_or_its_authorize_key_never_both() {
        assert_eq!(named(Some("h1"), None), Ok(("h1".into(), String::new())));
        assert_eq!(named(None, Some("k1")), Ok((String::new(), "k1".into())));
        let both = named(Some("h1"), Some("k1")).unwrap_err();
        assert!(
            both.starts_with("--authorize-key:") && both.contains("not both"),
            "{both}"
        );
        let neither = named(None, None).unwrap_err();
        assert!(neither.starts_with("--authorize-key:"), "{neither}");
        assert!(
            named(None, Some(" ")).is_err(),
            "an empty key names nothing"
        );
    }
}
