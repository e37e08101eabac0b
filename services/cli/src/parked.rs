//! `tollgate parked list|resolve`: parked usage over Admin `ListParkedUsage` and
//! `ResolveParkedUsage`.

use serde_json::{json, Value};
use tollgate_proto::pb;

use crate::admin::key_of;
use crate::cli::ParkedCommand;
use crate::client::Connection;
use crate::error::CliError;
use crate::output::{pages, Out};
use crate::render;

pub async fn parked(conn: &Connection, out: &Out, command: ParkedCommand) -> Result<(), CliError> {
    match command {
        ParkedCommand::List {
            account,
            state,
            page,
        } => {
            let state = match state.as_deref() {
                None => pb::ParkedState::Unspecified,
                Some("open") => pb::ParkedState::Open,
                Some("resolved") => pb::ParkedState::Resolved,
                Some(_) => return Err(CliError::input("--state", "open or resolved")),
            };
            let account_id = account.unwrap_or_default();
            let admin = conn.admin().await?;
            let (records, next) = pages(&page, |page_size, page_token| {
                let mut admin = admin.clone();
                let account_id = account_id.clone();
                async move {
                    let reply = conn
                        .call(
                            "ListParkedUsage",
                            admin.list_parked_usage(conn.request(pb::ListParkedUsageRequest {
                                account_id,
                                state: state.into(),
                                page_size,
                                page_token,
                            })),
                        )
                        .await?;
                    Ok((reply.records, reply.next_page_token))
                }
            })
            .await?;
            out.list(
                "parked",
                records.iter().map(record_json).collect(),
                &next,
                || table(&records),
            );
            Ok(())
        }
        ParkedCommand::Resolve {
            id,
            charge,
            write_off,
            reason,
            mutation,
        } => {
            let key = key_of(&mutation)?;
            let action = match (charge, write_off) {
                (true, false) => pb::ParkedAction::Charge,
                (false, true) => pb::ParkedAction::WriteOff,
                _ => {
                    return Err(CliError::input(
                        "--charge",
                        "exactly one of --charge and --write-off",
                    ))
                }
            };
            if write_off && reason.trim().is_empty() {
                return Err(CliError::input("--reason", "required with --write-off"));
            }
            let mut admin = conn.admin().await?;
            let reply = conn
                .call(
                    "ResolveParkedUsage",
                    admin.resolve_parked_usage(conn.request(pb::ResolveParkedUsageRequest {
                        idempotency_key: key.clone(),
                        id,
                        action: action.into(),
                        reason,
                    })),
                )
                .await?;
            let record = reply.record.unwrap_or_default();
            let value = json!({
                "idempotency_key": key,
                "replayed": reply.replayed,
                "record": record_json(&record),
            });
            out.print(value, || {
                render::fields(&[
                    ("id", record.id.clone()),
                    ("account", record.account_id.clone()),
                    ("resolution", record.resolution.clone()),
                    ("charged", record.charged.clone()),
                    ("debit", record.debit_id.clone()),
                    ("reason", record.resolution_reason.clone()),
                    ("resolved by", record.resolved_by.clone()),
                    ("resolved at", render::time(&record.resolved_at)),
                    ("replayed", reply.replayed.to_string()),
                    ("idempotency key", key.clone()),
                ])
            });
            Ok(())
        }
    }
}

fn state_name(state: i32) -> &'static str {
    match pb::ParkedState::try_from(state) {
        Ok(pb::ParkedState::Open) => "open",
        Ok(pb::ParkedState::Resolved) => "resolved",
        _ => "unspecified",
    }
}

fn record_json(record: &pb::ParkedUsage) -> Value {
    json!({
        "id": record.id,
        "region": record.region,
        "usage_id": record.usage_id,
        "account_id": record.account_id,
        "key": record.key,
        "kind": record.kind,
        "reason": record.reason,
        "feature": record.feature,
        "cost": record.cost,
        "draws": record.draws.iter().map(|d| json!({"grant_id": d.grant_id, "amount": d.amount})).collect::<Vec<_>>(),
        "overdraft": record.overdraft,
        "event_time": render::time_json(&record.event_time),
        "price_version": record.price_version,
        // What it was priced with; empty when the caller named the cost.
        "quantity": record.quantity,
        "rate": record.rate,
        "actor": record.actor,
        "hold_id": record.hold_id,
        "parked_at": render::time_json(&record.parked_at),
        "state": state_name(record.state),
        "resolution": record.resolution,
        "resolved_by": record.resolved_by,
        "resolution_reason": record.resolution_reason,
        "resolved_at": render::time_json(&record.resolved_at),
        "debit_id": record.debit_id,
        "charged": record.charged,
        "description": record.description,
    })
}

fn table(records: &[pb::ParkedUsage]) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.account_id.clone(),
                r.region.clone(),
                r.key.clone(),
                r.feature.clone(),
                r.cost.clone(),
                render::time(&r.event_time),
                state_name(r.state).to_owned(),
                r.resolution.clone(),
                r.reason.clone(),
            ]
        })
        .collect();
    render::table(
        &[
            "id",
            "account",
            "region",
            "key",
            "feature",
            "cost",
            "event time",
            "state",
            "resolution",
            "reason",
        ],
        &rows,
    )
}
