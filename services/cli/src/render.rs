//! Output: wire messages as JSON values (for `--json`), aligned tables and short lines for
//! people. Enum values print as their short lower-case names (`debit`, `insufficient_credits`).

use serde_json::{json, Map, Value};
use tollgate_proto::pb;

/// Characters of a cell shown in a table before it is cut (hashes, long memos).
const CELL_CHARS_MAX: usize = 64;

/// An instant as RFC 3339 in UTC with milliseconds; empty when unset.
pub fn time(at: &Option<prost_types::Timestamp>) -> String {
    let Some(at) = at else {
        return String::new();
    };
    let nanos = u32::try_from(at.nanos).unwrap_or(0);
    match chrono::DateTime::from_timestamp(at.seconds, nanos) {
        Some(at) => at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => format!("{}s", at.seconds),
    }
}

pub fn time_json(at: &Option<prost_types::Timestamp>) -> Value {
    match at {
        Some(_) => Value::String(time(at)),
        None => Value::Null,
    }
}

/// `ENTRY_KIND_DEBIT` → `debit`.
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

pub fn entry_kind(value: i32) -> String {
    pb::EntryKind::try_from(value)
        .map(|kind| short(kind.as_str_name(), "ENTRY_KIND_"))
        .unwrap_or_else(|_| value.to_string())
}

pub fn grant_source(value: i32) -> String {
    pb::GrantSource::try_from(value)
        .map(|kind| short(kind.as_str_name(), "GRANT_SOURCE_"))
        .unwrap_or_else(|_| value.to_string())
}

pub fn grant_state(value: i32) -> String {
    pb::GrantState::try_from(value)
        .map(|kind| short(kind.as_str_name(), "GRANT_STATE_"))
        .unwrap_or_else(|_| value.to_string())
}

pub fn price_rule(value: i32) -> String {
    pb::PriceRule::try_from(value)
        .map(|kind| short(kind.as_str_name(), "PRICE_RULE_"))
        .unwrap_or_else(|_| value.to_string())
}

pub fn refusal_code(value: i32) -> String {
    pb::RefusalCode::try_from(value)
        .map(|kind| short(kind.as_str_name(), "REFUSAL_CODE_"))
        .unwrap_or_else(|_| value.to_string())
}

pub fn period_unit(value: i32) -> String {
    pb::PeriodUnit::try_from(value)
        .map(|kind| short(kind.as_str_name(), "PERIOD_UNIT_"))
        .unwrap_or_else(|_| value.to_string())
}

pub fn audience(value: i32) -> String {
    pb::Audience::try_from(value)
        .map(|kind| short(kind.as_str_name(), "AUDIENCE_"))
        .unwrap_or_else(|_| value.to_string())
}

pub fn problem_kind(value: i32) -> String {
    pb::ProblemKind::try_from(value)
        .map(|kind| short(kind.as_str_name(), "PROBLEM_KIND_"))
        .unwrap_or_else(|_| value.to_string())
}

/// One line for a refusal: code, message, and the amounts when the server gave them.
pub fn refusal_line(refusal: &pb::Refusal) -> String {
    let mut line = format!("{}: {}", refusal_code(refusal.code), refusal.message);
    if !refusal.cost.is_empty() || !refusal.available.is_empty() {
        line.push_str(&format!(
            " (cost {}, available {}, shortfall {})",
            refusal.cost, refusal.available, refusal.shortfall
        ));
    }
    line
}

pub fn refusal(refusal: &pb::Refusal) -> Value {
    json!({
        "refused": {
            "code": refusal_code(refusal.code),
            "message": refusal.message,
            "cost": refusal.cost,
            "available": refusal.available,
            "shortfall": refusal.shortfall,
        }
    })
}

fn string_map(map: &std::collections::HashMap<String, String>) -> Value {
    let sorted: std::collections::BTreeMap<_, _> = map.iter().collect();
    json!(sorted)
}

pub fn totals(totals: &Option<pb::Totals>) -> Value {
    match totals {
        Some(t) => json!({
            "granted": t.granted,
            "debited": t.debited,
            "refunded": t.refunded,
            "expired": t.expired,
            "voided": t.voided,
            "adjusted": t.adjusted,
        }),
        None => Value::Null,
    }
}

pub fn balance(balance: &pb::Balance) -> Value {
    json!({
        "account_id": balance.account_id,
        "balance": balance.balance,
        "debt": balance.debt,
        "overdraft_limit": balance.overdraft_limit,
        "totals": totals(&balance.totals),
        "entry_count": balance.entry_count,
        "as_of": time_json(&balance.as_of),
    })
}

/// Admin `GetBalance`: the account's balance in `balance`, its terms, and the ledger's sum.
pub fn admin_balance(reply: &pb::AdminGetBalanceReply) -> Value {
    let asides = |grants: &[pb::GrantAside]| -> Vec<Value> {
        grants
            .iter()
            .map(|g| json!({"grant_id": g.grant_id, "remaining": g.remaining, "at": time_json(&g.at)}))
            .collect()
    };
    let mut value = balance(&reply.balance.clone().unwrap_or_default());
    for (key, extra) in [
        ("ledger_balance", json!(reply.ledger_balance)),
        ("effective", json!(reply.effective)),
        ("held", json!(reply.held)),
        ("upcoming", json!(asides(&reply.upcoming))),
        ("lapsed", json!(asides(&reply.lapsed))),
        ("holds_unread", json!(reply.holds_unread)),
    ] {
        value = with(value, key, extra);
    }
    value
}

pub fn account(account: &pb::Account) -> Value {
    json!({
        "account_id": account.account_id,
        "overdraft_limit": account.overdraft_limit,
        "balance": account.balance.as_ref().map(balance),
        "metadata": string_map(&account.metadata),
        "created_at": time_json(&account.created_at),
        "last_hash": account.last_hash,
    })
}

pub fn feature(feature: &pb::Feature) -> Value {
    json!({
        "feature": feature.feature,
        "unit": feature.unit,
        "description": feature.description,
    })
}

fn rates(table: &Option<pb::RateTable>) -> Value {
    table
        .as_ref()
        .map(|t| string_map(&t.rates))
        .unwrap_or_else(|| json!({}))
}

fn rate_tables(tables: &std::collections::HashMap<String, pb::RateTable>) -> Value {
    let sorted: std::collections::BTreeMap<_, _> = tables
        .iter()
        .map(|(key, table)| (key.clone(), string_map(&table.rates)))
        .collect();
    json!(sorted)
}

pub fn price_version(version: &pb::PriceBookVersion) -> Value {
    json!({
        "version": version.version,
        "effective_from": time_json(&version.effective_from),
        "audience": audience(version.audience),
        "default_rates": rates(&version.default_rates),
        "region_rates": rate_tables(&version.region_rates),
        "plan_rates": rate_tables(&version.plan_rates),
        "plan_region_rates": rate_tables(&version.plan_region_rates),
    })
}

fn scope(scope: &Option<pb::Scope>) -> Value {
    json!(scope
        .as_ref()
        .map(|s| s.features.clone())
        .unwrap_or_default())
}

pub fn scope_text(scope: &Option<pb::Scope>) -> String {
    match scope {
        Some(s) if !s.features.is_empty() => s.features.join(","),
        _ => "all".into(),
    }
}

fn money(money: &Option<pb::Money>) -> Value {
    match money {
        Some(m) => json!({"amount": m.amount, "currency": m.currency}),
        None => Value::Null,
    }
}

pub fn grant(grant: &pb::Grant) -> Value {
    json!({
        "account_id": grant.account_id,
        "grant_id": grant.grant_id,
        "amount": grant.amount,
        "remaining": grant.remaining,
        "priority": grant.priority,
        "effective_at": time_json(&grant.effective_at),
        "expires_at": time_json(&grant.expires_at),
        "scope": scope(&grant.scope),
        "source": grant_source(grant.source),
        "state": grant_state(grant.state),
        "cost_basis": money(&grant.cost_basis),
        "external_ref": grant.external_ref,
        "metadata": string_map(&grant.metadata),
        "created_at": time_json(&grant.created_at),
    })
}

pub fn rollover_text(rollover: &Option<pb::RolloverPolicy>) -> String {
    use pb::rollover_policy::Policy;
    match rollover.as_ref().and_then(|r| r.policy.as_ref()) {
        None | Some(Policy::None(_)) => "none".into(),
        Some(Policy::Full(_)) => "full".into(),
        Some(Policy::Max(max)) => format!("max:{max}"),
        Some(Policy::Percent(p)) if p.cap.is_empty() => format!("percent:{}", p.percent),
        Some(Policy::Percent(p)) => format!("percent:{}:{}", p.percent, p.cap),
    }
}

pub fn schedule(schedule: &pb::Schedule) -> Value {
    json!({
        "schedule_id": schedule.schedule_id,
        "account_id": schedule.account_id,
        "amount": schedule.amount,
        "period_unit": period_unit(schedule.period_unit),
        "period_count": schedule.period_count,
        "anchor": time_json(&schedule.anchor),
        "source": grant_source(schedule.source),
        "priority": schedule.priority,
        "scope": scope(&schedule.scope),
        "rollover": rollover_text(&schedule.rollover),
        "ends_at": time_json(&schedule.ends_at),
    })
}

pub fn movement(movement: &pb::Movement) -> Value {
    json!({
        "kind": entry_kind(movement.kind),
        "amount": movement.amount,
        "grant_id": movement.grant_id,
    })
}

pub fn receipt(receipt: &pb::Receipt) -> Value {
    json!({
        "account_id": receipt.account_id,
        "movements": receipt.movements.iter().map(movement).collect::<Vec<_>>(),
        "first_seq": receipt.first_seq,
        "last_seq": receipt.last_seq,
        "balance_after": receipt.balance_after,
        "grant_id": receipt.grant_id,
        "recorded_at": time_json(&receipt.recorded_at),
        "replayed": receipt.replayed,
    })
}

pub fn entry(entry: &pb::Entry) -> Value {
    json!({
        "account_id": entry.account_id,
        "seq": entry.seq,
        "kind": entry_kind(entry.kind),
        "amount": entry.amount,
        "grant_id": entry.grant_id,
        "debit_id": entry.debit_id,
        "operation": entry.operation,
        "feature": entry.feature,
        "actor_id": entry.actor_id,
        "region": entry.region,
        "price_version": entry.price_version,
        "price_rule": price_rule(entry.price_rule),
        // What a usage debit was priced with; empty when it was not priced from a quantity.
        "quantity": entry.quantity,
        "unit": entry.unit,
        "rate": entry.rate,
        "memo": entry.memo,
        "event_time": time_json(&entry.event_time),
        "recorded_at": time_json(&entry.recorded_at),
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    })
}

pub fn priced(priced: &Option<pb::PricedCost>) -> Value {
    match priced {
        Some(p) => json!({
            "cost": p.cost,
            "rate": p.rate,
            "price_version": p.price_version,
            "price_rule": price_rule(p.price_rule),
        }),
        None => Value::Null,
    }
}

pub fn draw(draw: &pb::Draw) -> Value {
    json!({"grant_id": draw.grant_id, "amount": draw.amount})
}

pub fn usage_row(row: &pb::UsageRow) -> Value {
    json!({
        "bucket_start": time_json(&row.bucket_start),
        "feature": row.feature,
        "actor_id": row.actor_id,
        "region": row.region,
        "credits": row.credits,
        "debits": row.debits,
    })
}

pub fn revenue_line(line: &pb::RevenueLine) -> Value {
    json!({
        "currency": line.currency,
        "credits_sold": line.credits_sold,
        "money_sold": line.money_sold,
        "credits_consumed": line.credits_consumed,
        "money_consumed": line.money_consumed,
        "credits_expired": line.credits_expired,
        "money_breakage": line.money_breakage,
        "credits_refunded": line.credits_refunded,
        "money_refunded": line.money_refunded,
        "credits_voided": line.credits_voided,
        "money_voided": line.money_voided,
    })
}

pub fn problem(problem: &pb::Problem) -> Value {
    json!({
        "account_id": problem.account_id,
        "seq": problem.seq,
        "grant_id": problem.grant_id,
        "kind": problem_kind(problem.kind),
        "detail": problem.detail,
    })
}

pub fn event(event: &pb::Event) -> Value {
    json!({
        "event_id": event.event_id,
        "type": event.r#type,
        "account_id": event.account_id,
        "occurred_at": time_json(&event.occurred_at),
        "attributes": string_map(&event.attributes),
    })
}

/// Adds `key: value` to a JSON object (the idempotency key next to a result).
pub fn with(mut value: Value, key: &str, extra: Value) -> Value {
    if let Value::Object(map) = &mut value {
        map.insert(key.to_string(), extra);
        return value;
    }
    let mut map = Map::new();
    map.insert("result".into(), value);
    map.insert(key.to_string(), extra);
    Value::Object(map)
}

/// Prints a JSON value on one line per document (pretty when it is a single result).
pub fn print_json(value: &Value) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(error) => eprintln!("error: encoding JSON: {error}"),
    }
}

fn cell(text: &str) -> String {
    let chars = text.chars().count();
    if chars <= CELL_CHARS_MAX {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(CELL_CHARS_MAX - 1).collect();
    cut.push('…');
    cut
}

/// An aligned table: a header row, then one row per item; columns two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| cell(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (index, value) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(index) {
                *width = (*width).max(value.chars().count());
            }
        }
    }
    let line = |values: Vec<&str>| -> String {
        let mut out = String::new();
        for (index, value) in values.iter().enumerate() {
            let width = widths.get(index).copied().unwrap_or(0);
            if index + 1 == values.len() {
                out.push_str(value);
            } else {
                out.push_str(value);
                out.push_str(&" ".repeat(width - value.chars().count() + 2));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// Two columns: name and value, for one item.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(name, _)| name.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (name, value) in pairs {
        out.push_str(&format!("{name:<width$}  {value}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let text = table(
            &["seq", "kind"],
            &[
                vec!["1".into(), "grant".into()],
                vec!["10".into(), "debit".into()],
            ],
        );
        assert_eq!(text, "seq  kind\n1    grant\n10   debit\n");
    }

    #[test]
    fn enums_print_short_names() {
        assert_eq!(entry_kind(pb::EntryKind::Debit as i32), "debit");
        assert_eq!(
            refusal_code(pb::RefusalCode::InsufficientCredits as i32),
            "insufficient_credits"
        );
        assert_eq!(entry_kind(99), "99");
    }

    #[test]
    fn times_are_rfc3339_with_milliseconds() {
        let at = Some(prost_types::Timestamp {
            seconds: 0,
            nanos: 5_000_000,
        });
        assert_eq!(time(&at), "1970-01-01T00:00:00.005Z");
        assert_eq!(time(&None), "");
    }
}
