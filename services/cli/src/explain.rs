//! The ledger read for people: entries with filters and pages, `explain` (why was I charged?),
//! and the event stream.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tollgate_proto::pb;

use crate::cli::{EventsCommand, ExplainArgs, LedgerArgs, Page};
use crate::client::{AdminClient, Connection};
use crate::error::CliError;
use crate::output::{pages, Out};
use crate::{parse, render};

/// Page size used when the CLI walks entries itself (the server's maximum).
const ENTRIES_PAGE_SIZE: u32 = 1000;

fn entry_rows(entries: &[pb::Entry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                render::time(&e.event_time),
                render::entry_kind(e.kind),
                e.amount.clone(),
                e.grant_id.clone(),
                e.debit_id.clone(),
                e.feature.clone(),
                e.actor_id.clone(),
                if e.price_version == 0 {
                    String::new()
                } else {
                    format!("v{} {}", e.price_version, render::price_rule(e.price_rule))
                },
                e.memo.clone(),
            ]
        })
        .collect();
    render::table(
        &[
            "seq",
            "event time",
            "kind",
            "amount",
            "grant",
            "debit",
            "feature",
            "actor",
            "price",
            "memo",
        ],
        &rows,
    )
}

/// Every entry matching `filter`, walking all pages.
async fn all_entries(
    conn: &Connection,
    admin: &AdminClient,
    filter: pb::ListEntriesRequest,
) -> Result<Vec<pb::Entry>, CliError> {
    let page = Page {
        limit: Some(ENTRIES_PAGE_SIZE),
        page_token: None,
        all: true,
    };
    let (entries, _) = pages(&page, |page_size, page_token| {
        let mut admin = admin.clone();
        let request = pb::ListEntriesRequest {
            page_size,
            page_token,
            ..filter.clone()
        };
        async move {
            let reply = conn
                .call("ListEntries", admin.list_entries(conn.request(request)))
                .await?;
            Ok((reply.entries, reply.next_page_token))
        }
    })
    .await?;
    Ok(entries)
}

pub async fn ledger(conn: &Connection, out: &Out, args: LedgerArgs) -> Result<(), CliError> {
    let filter = pb::ListEntriesRequest {
        account_id: args.account,
        kinds: args
            .kind
            .iter()
            .map(|k| parse::entry_kind("--kind", k).map(i32::from))
            .collect::<Result<_, _>>()?,
        grant_id: args.grant.unwrap_or_default(),
        debit_id: args.debit.unwrap_or_default(),
        from: parse::optional_time("--from", &args.from)?,
        until: parse::optional_time("--until", &args.until)?,
        page_size: 0,
        page_token: String::new(),
    };
    let admin = conn.admin().await?;
    let (entries, next) = pages(&args.page, |page_size, page_token| {
        let mut admin = admin.clone();
        let request = pb::ListEntriesRequest {
            page_size,
            page_token,
            ..filter.clone()
        };
        async move {
            let reply = conn
                .call("ListEntries", admin.list_entries(conn.request(request)))
                .await?;
            Ok((reply.entries, reply.next_page_token))
        }
    })
    .await?;
    out.list(
        "entries",
        entries.iter().map(render::entry).collect(),
        &next,
        || entry_rows(&entries),
    );
    Ok(())
}

/// A debit found in the ledger: its id there and every entry that names it.
pub struct FoundDebit {
    pub debit_id: String,
    /// The idempotency key it was found by, when it was found by one.
    pub idempotency_key: Option<String>,
    pub entries: Vec<pb::Entry>,
}

/// Finds a debit by the ledger's debit id or, failing that, by the idempotency key it was made
/// with (what the edge answers as `debit_id`; the ledger records it as `key:<key>`).
pub async fn resolve_debit(
    conn: &Connection,
    admin: &mut AdminClient,
    account: &str,
    debit: &str,
) -> Result<FoundDebit, CliError> {
    let by_id = all_entries(
        conn,
        admin,
        pb::ListEntriesRequest {
            account_id: account.to_string(),
            debit_id: debit.to_string(),
            ..Default::default()
        },
    )
    .await;
    match by_id {
        Ok(entries) if !entries.is_empty() => {
            return Ok(FoundDebit {
                debit_id: debit.to_string(),
                idempotency_key: None,
                entries,
            })
        }
        Ok(_) => {}
        // Not a valid debit id: it may still be an idempotency key.
        Err(CliError::Status { status, .. })
            if status.code() == tonic::Code::InvalidArgument
                && status.message().contains("debit_id") => {}
        Err(error) => return Err(error),
    }
    let debits = all_entries(
        conn,
        admin,
        pb::ListEntriesRequest {
            account_id: account.to_string(),
            kinds: vec![pb::EntryKind::Debit.into()],
            ..Default::default()
        },
    )
    .await?;
    let candidates = ledger_ids_of_key(&debits, debit);
    let operation = format!("key:{debit}");
    let found = debits
        .iter()
        .find(|e| candidates.contains(&e.debit_id) || e.operation == operation);
    let Some(found) = found else {
        return Err(CliError::NotFound(format!(
            "not found: no debit {debit:?} in the ledger of account {account:?} (by debit id or \
             idempotency key; a debit made moments ago may not be reconciled yet)"
        )));
    };
    let debit_id = found.debit_id.clone();
    let entries = all_entries(
        conn,
        admin,
        pb::ListEntriesRequest {
            account_id: account.to_string(),
            debit_id: debit_id.clone(),
            ..Default::default()
        },
    )
    .await?;
    Ok(FoundDebit {
        debit_id,
        idempotency_key: Some(debit.to_string()),
        entries,
    })
}

/// The ledger ids a region's decision made under idempotency key `key` would have, for every
/// region that appears among `debits` (the authority derives them; see its reconciler).
fn ledger_ids_of_key(debits: &[pb::Entry], key: &str) -> Vec<String> {
    let Ok(key) = tollgate_core::IdempotencyKey::new(key) else {
        return Vec::new();
    };
    let regions: std::collections::BTreeSet<&str> =
        debits.iter().map(|e| e.region.as_str()).collect();
    regions
        .into_iter()
        .filter_map(|region| tollgate_core::RegionId::new(region).ok())
        .filter_map(|region| tollgate_authority::reconciler::debit_id(&region, &key).ok())
        .map(|id| id.to_string())
        .collect()
}

/// The rate a price version gave `feature` under `rule`, when the version says so without
/// knowing the account's plan or contract (default and region rules).
fn rate_of(
    versions: &[pb::PriceBookVersion],
    version: u64,
    rule: i32,
    region: &str,
    feature: &str,
) -> Option<String> {
    let version = versions.iter().find(|v| v.version == version)?;
    let table = match pb::PriceRule::try_from(rule).ok()? {
        pb::PriceRule::Default => version.default_rates.as_ref()?,
        pb::PriceRule::Region => version.region_rates.get(region)?,
        _ => return None,
    };
    table.rates.get(feature).cloned()
}

pub async fn explain(conn: &Connection, out: &Out, args: ExplainArgs) -> Result<(), CliError> {
    let mut admin = conn.admin().await?;
    let found = resolve_debit(conn, &mut admin, &args.account, &args.debit).await?;
    let debits: Vec<&pb::Entry> = found
        .entries
        .iter()
        .filter(|e| e.kind == i32::from(pb::EntryKind::Debit))
        .collect();
    let Some(first) = debits.first().copied() else {
        return Err(CliError::NotFound(format!(
            "not found: debit {:?} has no debit entry on account {:?}",
            found.debit_id, args.account
        )));
    };
    let others: Vec<&pb::Entry> = found
        .entries
        .iter()
        .filter(|e| e.kind != i32::from(pb::EntryKind::Debit))
        .collect();
    // The price book and the grants, to say what the price rule meant and what was burned.
    let versions = conn
        .call(
            "ListPriceBookVersions",
            admin.list_price_book_versions(conn.request(pb::ListPriceBookVersionsRequest {
                page_size: 0,
                page_token: String::new(),
            })),
        )
        .await
        .map(|reply| reply.versions)
        .unwrap_or_default();
    // The entry's own rate when it has one; entries written before rates were kept (and
    // debits with an explicit cost) have none, and the price book is asked instead.
    let rate = non_empty(&first.rate).or_else(|| {
        rate_of(
            &versions,
            first.price_version,
            first.price_rule,
            &first.region,
            &first.feature,
        )
    });
    let grants = grants_by_id(conn, &admin, &args.account).await?;
    let charged = sum(debits.iter().map(|e| e.amount.as_str()))?;
    let refunded = sum(others
        .iter()
        .filter(|e| e.kind == i32::from(pb::EntryKind::Refund))
        .map(|e| e.amount.as_str()))?;
    let key = match &found.idempotency_key {
        Some(key) => key.clone(),
        None => first
            .operation
            .strip_prefix("key:")
            .unwrap_or("")
            .to_string(),
    };
    let burned: Vec<Value> = debits
        .iter()
        .map(|e| {
            let grant = grants.get(&e.grant_id);
            json!({
                "seq": e.seq,
                "grant_id": e.grant_id,
                "amount": e.amount,
                "overdraft": e.grant_id.is_empty(),
                "grant_source": grant.map(|g| render::grant_source(g.source)),
                "grant_priority": grant.map(|g| g.priority),
                "grant_expires_at": grant.map(|g| render::time(&g.expires_at)),
            })
        })
        .collect();
    let value = json!({
        "account_id": args.account,
        "debit_id": found.debit_id,
        "idempotency_key": key,
        "operation": first.operation,
        "feature": first.feature,
        "actor_id": first.actor_id,
        "region": first.region,
        "event_time": render::time(&first.event_time),
        "recorded_at": render::time(&first.recorded_at),
        "price_version": first.price_version,
        "price_rule": render::price_rule(first.price_rule),
        "quantity": non_empty(&first.quantity),
        "unit": non_empty(&first.unit),
        "rate": rate,
        "charged": charged,
        "refunded": refunded,
        "burned": burned,
        "hold_id": captured_hold(&first.memo),
        "other_entries": others.iter().map(|e| render::entry(e)).collect::<Vec<_>>(),
    });
    out.print(value, || {
        explain_text(
            &args.account,
            &found.debit_id,
            &key,
            first,
            rate.as_deref(),
            &charged,
            &refunded,
            &debits,
            &others,
            &grants,
        )
    });
    Ok(())
}

/// `Some(text)` unless `text` is empty (how the wire says "absent").
fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

/// How a debit was priced, in words: `2 image × 3 credits, price book version 2, rule plan`
/// when its entry kept the quantity it was priced for; `rate` is the entry's own, else the one
/// the price book gave (entries written before quantities were kept).
fn price_text(first: &pb::Entry, rate: Option<&str>) -> String {
    let version = first.price_version;
    let rule = render::price_rule(first.price_rule);
    match rate {
        Some(rate) if !first.quantity.is_empty() => {
            let unit = if first.unit.is_empty() {
                "units"
            } else {
                first.unit.as_str()
            };
            format!(
                "{} {unit} × {rate} credits, price book version {version}, rule {rule}",
                first.quantity
            )
        }
        Some(rate) => {
            format!("price book version {version}, rule {rule} ({rate} credits per unit)")
        }
        None if version == 0 => "explicit cost (no price book)".into(),
        None => format!("price book version {version}, rule {rule}"),
    }
}

/// The hold a debit captured, named in its ledger entry's memo; `None` for a direct debit.
fn captured_hold(memo: &str) -> Option<String> {
    tollgate_core::command::captured_hold(memo).map(str::to_owned)
}

#[allow(clippy::too_many_arguments)]
fn explain_text(
    account: &str,
    debit_id: &str,
    key: &str,
    first: &pb::Entry,
    rate: Option<&str>,
    charged: &str,
    refunded: &str,
    debits: &[&pb::Entry],
    others: &[&pb::Entry],
    grants: &BTreeMap<String, pb::Grant>,
) -> String {
    let price = price_text(first, rate);
    let actor = if first.actor_id.is_empty() {
        "(none given)".to_string()
    } else {
        first.actor_id.clone()
    };
    let mut text = render::fields(&[
        ("debit", debit_id.to_string()),
        ("account", account.to_string()),
        ("idempotency key", key.to_string()),
        ("feature", first.feature.clone()),
        ("actor", actor),
        ("region", first.region.clone()),
        ("event time", render::time(&first.event_time)),
        ("recorded at", render::time(&first.recorded_at)),
        ("price", price),
        ("charged", charged.to_string()),
        ("refunded", refunded.to_string()),
        (
            "hold",
            captured_hold(&first.memo).map_or_else(
                || "none (a direct debit)".to_owned(),
                |hold| format!("captured hold {hold} (priced at its authorization)"),
            ),
        ),
    ]);
    let rows: Vec<Vec<String>> = debits
        .iter()
        .map(|e| match grants.get(&e.grant_id) {
            Some(g) => vec![
                e.seq.to_string(),
                e.grant_id.clone(),
                e.amount.clone(),
                render::grant_source(g.source),
                g.priority.to_string(),
                render::time(&g.expires_at),
            ],
            None => vec![
                e.seq.to_string(),
                if e.grant_id.is_empty() {
                    "(overdraft)".into()
                } else {
                    e.grant_id.clone()
                },
                e.amount.clone(),
                String::new(),
                String::new(),
                String::new(),
            ],
        })
        .collect();
    text.push_str("\nburned:\n");
    text.push_str(&render::table(
        &["seq", "grant", "amount", "source", "priority", "expires at"],
        &rows,
    ));
    if !others.is_empty() {
        text.push_str("\nlater entries of this debit:\n");
        let owned: Vec<pb::Entry> = others.iter().map(|e| (*e).clone()).collect();
        text.push_str(&entry_rows(&owned));
    }
    text
}

async fn grants_by_id(
    conn: &Connection,
    admin: &AdminClient,
    account: &str,
) -> Result<BTreeMap<String, pb::Grant>, CliError> {
    let page = Page {
        limit: None,
        page_token: None,
        all: true,
    };
    let (grants, _) = pages(&page, |page_size, page_token| {
        let mut admin = admin.clone();
        let account_id = account.to_string();
        async move {
            let reply = conn
                .call(
                    "ListGrants",
                    admin.list_grants(conn.request(pb::ListGrantsRequest {
                        account_id,
                        open_only: false,
                        page_size,
                        page_token,
                    })),
                )
                .await?;
            Ok((reply.grants, reply.next_page_token))
        }
    })
    .await?;
    Ok(grants
        .into_iter()
        .map(|g| (g.grant_id.clone(), g))
        .collect())
}

/// Exact sum of decimal amounts, printed the way the server prints them.
fn sum<'a>(amounts: impl Iterator<Item = &'a str>) -> Result<String, CliError> {
    let mut total = tollgate_core::Credits::ZERO;
    for amount in amounts {
        let credits = tollgate_core::Credits::parse(amount)
            .map_err(|e| CliError::Other(format!("the server sent amount {amount:?}: {e}")))?;
        total = total
            .checked_add(credits)
            .map_err(|e| CliError::Other(format!("sum of amounts: {e}")))?;
    }
    Ok(total.to_string())
}

pub async fn events(conn: &Connection, out: &Out, command: EventsCommand) -> Result<(), CliError> {
    let EventsCommand::Tail {
        account,
        types,
        after,
        limit,
    } = command;
    if limit == Some(0) {
        return Err(CliError::input("--limit", "must be more than zero"));
    }
    let mut admin = conn.admin().await?;
    // The stream runs until interrupted: only opening it is bounded by --timeout.
    let mut stream = conn
        .call(
            "WatchEvents",
            admin.watch_events(conn.request(pb::WatchEventsRequest {
                account_id: account.unwrap_or_default(),
                types,
                after_event_id: after.unwrap_or_default(),
            })),
        )
        .await?;
    eprintln!("watching events (Ctrl-C to stop)");
    let mut printed = 0u64;
    while limit.is_none_or(|limit| printed < limit) {
        let event = stream.message().await.map_err(|status| CliError::Status {
            call: "WatchEvents",
            status,
        })?;
        let Some(event) = event else {
            return Err(CliError::Status {
                call: "WatchEvents",
                status: tonic::Status::unavailable("the server ended the event stream"),
            });
        };
        if out.json {
            println!("{}", render::event(&event));
        } else {
            let attributes: BTreeMap<_, _> = event.attributes.iter().collect();
            let attributes: Vec<String> =
                attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "{}  {}  {}  {}  {}",
                render::time(&event.occurred_at),
                event.r#type,
                event.account_id,
                event.event_id,
                attributes.join(" ")
            );
        }
        printed += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debit(quantity: &str, unit: &str, rate: &str, version: u64) -> pb::Entry {
        pb::Entry {
            kind: pb::EntryKind::Debit.into(),
            price_version: version,
            price_rule: pb::PriceRule::Plan.into(),
            quantity: quantity.into(),
            unit: unit.into(),
            rate: rate.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_price_line_reads_the_quantity_unit_and_rate_of_the_entry() {
        let entry = debit("2", "image", "3", 2);
        assert_eq!(
            price_text(&entry, non_empty(&entry.rate).as_deref()),
            "2 image × 3 credits, price book version 2, rule plan"
        );
    }

    #[test]
    fn entries_without_a_quantity_fall_back_to_the_price_book() {
        let entry = debit("", "", "", 2);
        assert_eq!(
            price_text(&entry, Some("0.5")),
            "price book version 2, rule plan (0.5 credits per unit)"
        );
        assert_eq!(price_text(&entry, None), "price book version 2, rule plan");
        assert_eq!(
            price_text(&debit("", "", "", 0), None),
            "explicit cost (no price book)"
        );
    }
}
