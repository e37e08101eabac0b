//! Commands on the Admin API: accounts, features, prices, grants, schedules, balance,
//! corrections, verification and reports.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};
use tollgate_proto::pb;

use crate::cli::{
    AccountsCommand, AdjustArgs, BalanceArgs, CreateScheduleArgs, FeaturesCommand, GrantsCommand,
    IssueGrantArgs, Mutation, PricesCommand, RefundArgs, RevenueCommand, SchedulesCommand,
    UsageArgs, VerifyArgs,
};
use crate::client::Connection;
use crate::error::CliError;
use crate::output::{pages, Out};
use crate::{explain, parse, render};

/// The idempotency key given, or a generated one.
pub fn key_of(mutation: &Mutation) -> Result<String, CliError> {
    match &mutation.idempotency_key {
        Some(key) if key.is_empty() => {
            Err(CliError::input("--idempotency-key", "must not be empty"))
        }
        Some(key) => Ok(key.clone()),
        None => parse::generated_key(),
    }
}

fn account_text(account: &pb::Account) -> String {
    let balance = account.balance.clone().unwrap_or_default();
    render::fields(&[
        ("account", account.account_id.clone()),
        ("balance", balance.balance),
        ("debt", balance.debt),
        ("overdraft limit", account.overdraft_limit.clone()),
        ("entries", balance.entry_count.to_string()),
        ("created at", render::time(&account.created_at)),
        ("chain head", account.last_hash.clone()),
        (
            "metadata",
            account
                .metadata
                .iter()
                .collect::<BTreeMap<_, _>>()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
        ),
    ])
}

pub async fn accounts(
    conn: &Connection,
    out: &Out,
    command: AccountsCommand,
) -> Result<(), CliError> {
    match command {
        AccountsCommand::Create {
            account,
            overdraft_limit,
            metadata,
            mutation,
        } => {
            let key = key_of(&mutation)?;
            let request = pb::CreateAccountRequest {
                idempotency_key: key.clone(),
                account_id: account,
                overdraft_limit: parse::non_negative_amount(
                    "--overdraft-limit",
                    overdraft_limit.as_deref().unwrap_or(""),
                )?,
                metadata: parse::metadata("--metadata", &metadata)?,
            };
            let mut admin = conn.admin().await?;
            let reply = conn
                .call("CreateAccount", admin.create_account(conn.request(request)))
                .await?;
            let account = reply.account.unwrap_or_default();
            out.print(
                render::with(render::account(&account), "idempotency_key", json!(key)),
                || format!("{}idempotency key  {key}\n", account_text(&account)),
            );
            Ok(())
        }
        AccountsCommand::Get { account } => {
            let mut admin = conn.admin().await?;
            let reply = conn
                .call(
                    "GetAccount",
                    admin.get_account(conn.request(pb::GetAccountRequest {
                        account_id: account,
                    })),
                )
                .await?;
            let account = reply.account.unwrap_or_default();
            out.print(render::account(&account), || account_text(&account));
            Ok(())
        }
        AccountsCommand::List { page } => {
            let admin = conn.admin().await?;
            let (accounts, next) = pages(&page, |page_size, page_token| {
                let mut admin = admin.clone();
                async move {
                    let reply = conn
                        .call(
                            "ListAccounts",
                            admin.list_accounts(conn.request(pb::ListAccountsRequest {
                                page_size,
                                page_token,
                            })),
                        )
                        .await?;
                    Ok((reply.accounts, reply.next_page_token))
                }
            })
            .await?;
            out.list(
                "accounts",
                accounts.iter().map(render::account).collect(),
                &next,
                || {
                    let rows: Vec<Vec<String>> = accounts
                        .iter()
                        .map(|a| {
                            let balance = a.balance.as_ref();
                            vec![
                                a.account_id.clone(),
                                balance.map(|b| b.balance.clone()).unwrap_or_default(),
                                a.overdraft_limit.clone(),
                                a.settings
                                    .as_ref()
                                    .map(|s| s.plan.clone())
                                    .unwrap_or_default(),
                            ]
                        })
                        .collect();
                    render::table(&["account", "balance", "overdraft limit", "plan"], &rows)
                },
            );
            Ok(())
        }
    }
}

pub async fn features(
    conn: &Connection,
    out: &Out,
    command: FeaturesCommand,
) -> Result<(), CliError> {
    let mut admin = conn.admin().await?;
    match command {
        FeaturesCommand::Define {
            feature,
            unit,
            description,
            mutation,
        } => {
            let key = key_of(&mutation)?;
            let reply = conn
                .call(
                    "DefineFeature",
                    admin.define_feature(conn.request(pb::DefineFeatureRequest {
                        idempotency_key: key.clone(),
                        feature: Some(pb::Feature {
                            feature,
                            unit,
                            description,
                        }),
                    })),
                )
                .await?;
            let feature = reply.feature.unwrap_or_default();
            out.print(
                render::with(render::feature(&feature), "idempotency_key", json!(key)),
                || {
                    render::fields(&[
                        ("feature", feature.feature.clone()),
                        ("unit", feature.unit.clone()),
                        ("description", feature.description.clone()),
                        ("idempotency key", key.clone()),
                    ])
                },
            );
            Ok(())
        }
        FeaturesCommand::List { page } => {
            let (features, next) = pages(&page, |page_size, page_token| {
                let mut admin = admin.clone();
                async move {
                    let reply = conn
                        .call(
                            "ListFeatures",
                            admin.list_features(conn.request(pb::ListFeaturesRequest {
                                page_size,
                                page_token,
                            })),
                        )
                        .await?;
                    Ok((reply.features, reply.next_page_token))
                }
            })
            .await?;
            out.list(
                "features",
                features.iter().map(render::feature).collect(),
                &next,
                || {
                    let rows: Vec<Vec<String>> = features
                        .iter()
                        .map(|f| vec![f.feature.clone(), f.unit.clone(), f.description.clone()])
                        .collect();
                    render::table(&["feature", "unit", "description"], &rows)
                },
            );
            Ok(())
        }
    }
}

/// A price book version as written in a file (TOML or JSON).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    version: u64,
    effective_from: String,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default)]
    default_rates: BTreeMap<String, String>,
    #[serde(default)]
    region_rates: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    plan_rates: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    plan_region_rates: BTreeMap<String, BTreeMap<String, String>>,
}

fn rate_table(field: &str, rates: &BTreeMap<String, String>) -> Result<pb::RateTable, CliError> {
    for (feature, rate) in rates {
        tollgate_core::Rate::parse(rate).map_err(|e| {
            CliError::input(
                &format!("{field}.{feature}"),
                format!("{rate:?}: {e} (rates are decimal strings such as \"0.5\")"),
            )
        })?;
    }
    Ok(pb::RateTable {
        rates: rates.clone().into_iter().collect(),
    })
}

fn rate_tables(
    field: &str,
    tables: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<std::collections::HashMap<String, pb::RateTable>, CliError> {
    tables
        .iter()
        .map(|(name, rates)| Ok((name.clone(), rate_table(&format!("{field}.{name}"), rates)?)))
        .collect()
}

/// Reads a price book version from `path`: JSON when it ends in `.json`, TOML otherwise.
pub fn price_file(path: &Path) -> Result<pb::PriceBookVersion, CliError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::input(&shown, format!("cannot read: {e}")))?;
    let file: PriceFile = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| CliError::input(&shown, e))?
    } else {
        toml::from_str(&text).map_err(|e| CliError::input(&shown, e.to_string().trim_end()))?
    };
    if file.version == 0 {
        return Err(CliError::input("version", "must be more than zero"));
    }
    let audience = match file.audience.as_deref() {
        None | Some("all_accounts") | Some("all") => pb::Audience::AllAccounts,
        Some("new_accounts") | Some("new") => pb::Audience::NewAccounts,
        Some(other) => {
            return Err(CliError::input(
                "audience",
                format!("{other:?} is not all_accounts or new_accounts"),
            ))
        }
    };
    Ok(pb::PriceBookVersion {
        version: file.version,
        effective_from: Some(parse::time("effective_from", &file.effective_from)?),
        audience: audience.into(),
        default_rates: Some(rate_table("default_rates", &file.default_rates)?),
        region_rates: rate_tables("region_rates", &file.region_rates)?,
        plan_rates: rate_tables("plan_rates", &file.plan_rates)?,
        plan_region_rates: rate_tables("plan_region_rates", &file.plan_region_rates)?,
    })
}

fn price_rows(version: &pb::PriceBookVersion) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut push = |table: String, rates: &std::collections::HashMap<String, String>| {
        let sorted: BTreeMap<_, _> = rates.iter().collect();
        for (feature, rate) in sorted {
            rows.push(vec![
                version.version.to_string(),
                render::time(&version.effective_from),
                render::audience(version.audience),
                table.clone(),
                feature.clone(),
                rate.clone(),
            ]);
        }
    };
    if let Some(default) = &version.default_rates {
        push("default".into(), &default.rates);
    }
    for (label, tables) in [
        ("region", &version.region_rates),
        ("plan", &version.plan_rates),
        ("plan/region", &version.plan_region_rates),
    ] {
        let sorted: BTreeMap<_, _> = tables.iter().collect();
        for (name, table) in sorted {
            push(format!("{label} {name}"), &table.rates);
        }
    }
    rows
}

const PRICE_HEADERS: [&str; 6] = [
    "version",
    "effective from",
    "audience",
    "table",
    "feature",
    "rate",
];

pub async fn prices(conn: &Connection, out: &Out, command: PricesCommand) -> Result<(), CliError> {
    match command {
        PricesCommand::Publish { file, mutation } => {
            let version = price_file(&file)?;
            let key = key_of(&mutation)?;
            let mut admin = conn.admin().await?;
            let reply = conn
                .call(
                    "PublishPriceBookVersion",
                    admin.publish_price_book_version(conn.request(
                        pb::PublishPriceBookVersionRequest {
                            idempotency_key: key.clone(),
                            version: Some(version),
                        },
                    )),
                )
                .await?;
            let version = reply.version.unwrap_or_default();
            out.print(
                render::with(
                    render::price_version(&version),
                    "idempotency_key",
                    json!(key),
                ),
                || {
                    format!(
                        "{}idempotency key: {key}\n",
                        render::table(&PRICE_HEADERS, &price_rows(&version))
                    )
                },
            );
            Ok(())
        }
        PricesCommand::List { page } => {
            let admin = conn.admin().await?;
            let (versions, next) = pages(&page, |page_size, page_token| {
                let mut admin = admin.clone();
                async move {
                    let reply = conn
                        .call(
                            "ListPriceBookVersions",
                            admin.list_price_book_versions(conn.request(
                                pb::ListPriceBookVersionsRequest {
                                    page_size,
                                    page_token,
                                },
                            )),
                        )
                        .await?;
                    Ok((reply.versions, reply.next_page_token))
                }
            })
            .await?;
            out.list(
                "versions",
                versions.iter().map(render::price_version).collect(),
                &next,
                || {
                    let rows: Vec<Vec<String>> = versions.iter().flat_map(price_rows).collect();
                    render::table(&PRICE_HEADERS, &rows)
                },
            );
            Ok(())
        }
    }
}

fn issue_request(args: IssueGrantArgs, key: &str) -> Result<pb::IssueGrantRequest, CliError> {
    let cost_basis = match (&args.cost, &args.currency) {
        (Some(amount), Some(currency)) => Some(pb::Money {
            amount: parse::money_amount("--cost", amount)?,
            currency: currency.clone(),
        }),
        _ => None,
    };
    Ok(pb::IssueGrantRequest {
        idempotency_key: key.to_string(),
        account_id: args.account,
        grant_id: args.grant_id,
        amount: parse::positive_amount("--amount", &args.amount)?,
        source: parse::source("--source", &args.source)?.into(),
        priority: args.priority,
        effective_at: parse::optional_time("--effective-at", &args.effective_at)?,
        expires_at: parse::optional_time("--expires-at", &args.expires_at)?,
        scope: Some(pb::Scope {
            features: args.scope,
        }),
        cost_basis,
        external_ref: args.external_ref,
        metadata: parse::metadata("--metadata", &args.metadata)?,
        memo: args.memo,
    })
}

pub async fn grants(conn: &Connection, out: &Out, command: GrantsCommand) -> Result<(), CliError> {
    match command {
        GrantsCommand::Issue(args) => {
            let key = key_of(&args.mutation)?;
            let request = issue_request(*args, &key)?;
            let mut admin = conn.admin().await?;
            let reply = conn
                .call("IssueGrant", admin.issue_grant(conn.request(request)))
                .await?;
            out.mutation(&key, reply)
        }
        GrantsCommand::Void {
            account,
            grant,
            memo,
            mutation,
        } => {
            let key = key_of(&mutation)?;
            let mut admin = conn.admin().await?;
            let reply = conn
                .call(
                    "VoidGrant",
                    admin.void_grant(conn.request(pb::VoidGrantRequest {
                        idempotency_key: key.clone(),
                        account_id: account,
                        grant_id: grant,
                        memo,
                    })),
                )
                .await?;
            out.mutation(&key, reply)
        }
        GrantsCommand::Expire {
            account,
            grant,
            memo,
            mutation,
        } => {
            let key = key_of(&mutation)?;
            let mut admin = conn.admin().await?;
            let reply = conn
                .call(
                    "ExpireGrant",
                    admin.expire_grant(conn.request(pb::ExpireGrantRequest {
                        idempotency_key: key.clone(),
                        account_id: account,
                        grant_id: grant,
                        memo,
                    })),
                )
                .await?;
            out.mutation(&key, reply)
        }
        GrantsCommand::List {
            account,
            open_only,
            page,
        } => {
            let admin = conn.admin().await?;
            let (grants, next) = pages(&page, |page_size, page_token| {
                let mut admin = admin.clone();
                let account_id = account.clone();
                async move {
                    let reply = conn
                        .call(
                            "ListGrants",
                            admin.list_grants(conn.request(pb::ListGrantsRequest {
                                account_id,
                                open_only,
                                page_size,
                                page_token,
                            })),
                        )
                        .await?;
                    Ok((reply.grants, reply.next_page_token))
                }
            })
            .await?;
            out.list(
                "grants",
                grants.iter().map(render::grant).collect(),
                &next,
                || {
                    let rows: Vec<Vec<String>> = grants
                        .iter()
                        .map(|g| {
                            vec![
                                g.grant_id.clone(),
                                g.amount.clone(),
                                g.remaining.clone(),
                                g.priority.to_string(),
                                render::grant_source(g.source),
                                render::grant_state(g.state),
                                render::time(&g.effective_at),
                                render::time(&g.expires_at),
                                render::scope_text(&g.scope),
                            ]
                        })
                        .collect();
                    render::table(
                        &[
                            "grant",
                            "amount",
                            "remaining",
                            "priority",
                            "source",
                            "state",
                            "effective at",
                            "expires at",
                            "scope",
                        ],
                        &rows,
                    )
                },
            );
            Ok(())
        }
    }
}

fn schedule_request(
    args: CreateScheduleArgs,
    key: &str,
) -> Result<pb::CreateScheduleRequest, CliError> {
    if args.period_count == 0 {
        return Err(CliError::input("--period-count", "must be more than zero"));
    }
    Ok(pb::CreateScheduleRequest {
        idempotency_key: key.to_string(),
        schedule: Some(pb::Schedule {
            schedule_id: args.schedule_id,
            account_id: args.account,
            amount: parse::positive_amount("--amount", &args.amount)?,
            period_unit: parse::period_unit("--period", &args.period)?.into(),
            period_count: args.period_count,
            anchor: Some(match &args.anchor {
                Some(anchor) => parse::time("--anchor", anchor)?,
                None => parse::now(),
            }),
            source: parse::source("--source", &args.source)?.into(),
            priority: args.priority,
            scope: Some(pb::Scope {
                features: args.scope,
            }),
            rollover: Some(parse::rollover("--rollover", &args.rollover)?),
            ends_at: parse::optional_time("--ends-at", &args.ends_at)?,
        }),
    })
}

fn schedule_rows(schedules: &[pb::Schedule]) -> String {
    let rows: Vec<Vec<String>> = schedules
        .iter()
        .map(|s| {
            vec![
                s.schedule_id.clone(),
                s.amount.clone(),
                format!("{} {}", s.period_count, render::period_unit(s.period_unit)),
                render::time(&s.anchor),
                render::grant_source(s.source),
                render::rollover_text(&s.rollover),
                render::scope_text(&s.scope),
                render::time(&s.ends_at),
            ]
        })
        .collect();
    render::table(
        &[
            "schedule", "amount", "every", "anchor", "source", "rollover", "scope", "ends at",
        ],
        &rows,
    )
}

pub async fn schedules(
    conn: &Connection,
    out: &Out,
    command: SchedulesCommand,
) -> Result<(), CliError> {
    match command {
        SchedulesCommand::Create(args) => {
            let key = key_of(&args.mutation)?;
            let request = schedule_request(*args, &key)?;
            let mut admin = conn.admin().await?;
            let reply = conn
                .call(
                    "CreateSchedule",
                    admin.create_schedule(conn.request(request)),
                )
                .await?;
            let schedule = reply.schedule.unwrap_or_default();
            out.print(
                render::with(render::schedule(&schedule), "idempotency_key", json!(key)),
                || {
                    format!(
                        "{}idempotency key: {key}\n",
                        schedule_rows(std::slice::from_ref(&schedule))
                    )
                },
            );
            Ok(())
        }
        SchedulesCommand::Cancel {
            account,
            schedule,
            mutation,
        } => {
            let key = key_of(&mutation)?;
            let mut admin = conn.admin().await?;
            let reply = conn
                .call(
                    "CancelSchedule",
                    admin.cancel_schedule(conn.request(pb::CancelScheduleRequest {
                        idempotency_key: key.clone(),
                        account_id: account,
                        schedule_id: schedule,
                    })),
                )
                .await?;
            let schedule = reply.schedule.unwrap_or_default();
            out.print(
                render::with(render::schedule(&schedule), "idempotency_key", json!(key)),
                || {
                    format!(
                        "{}idempotency key: {key}\n",
                        schedule_rows(std::slice::from_ref(&schedule))
                    )
                },
            );
            Ok(())
        }
        SchedulesCommand::List { account, page } => {
            let admin = conn.admin().await?;
            let (schedules, next) = pages(&page, |page_size, page_token| {
                let mut admin = admin.clone();
                let account_id = account.clone();
                async move {
                    let reply = conn
                        .call(
                            "ListSchedules",
                            admin.list_schedules(conn.request(pb::ListSchedulesRequest {
                                account_id,
                                page_size,
                                page_token,
                            })),
                        )
                        .await?;
                    Ok((reply.schedules, reply.next_page_token))
                }
            })
            .await?;
            out.list(
                "schedules",
                schedules.iter().map(render::schedule).collect(),
                &next,
                || schedule_rows(&schedules),
            );
            Ok(())
        }
    }
}

/// The account's balance first (its open grants effective and unexpired now, less holds in
/// flight in every region, less debt: the figure edges answer with), then what it is made of and
/// the ledger's own sum and equation terms. The ledger's sum counts every open grant's remainder
/// (effective or not, expired or not yet closed), so grants left out of the balance are named
/// with the instant that explains why.
fn balance_text(reply: &pb::AdminGetBalanceReply) -> String {
    let balance = reply.balance.clone().unwrap_or_default();
    let totals = balance.totals.clone().unwrap_or_default();
    let mut fields = vec![
        ("account", balance.account_id.clone()),
        ("balance", balance.balance.clone()),
        ("effective now", reply.effective.clone()),
        ("held", reply.held.clone()),
        ("debt", balance.debt.clone()),
        ("ledger balance", reply.ledger_balance.clone()),
    ];
    for grant in &reply.upcoming {
        let starts = render::time(&grant.at);
        let text = format!("{} {} from {starts}", grant.grant_id, grant.remaining);
        fields.push(("upcoming", text));
    }
    for grant in &reply.lapsed {
        let expired = render::time(&grant.at);
        let text = format!(
            "{} {} expired {expired}, awaiting the expiry run",
            grant.grant_id, grant.remaining
        );
        fields.push(("lapsed", text));
    }
    for region in &reply.holds_unread {
        fields.push(("holds unread", region.clone()));
    }
    fields.extend([
        ("overdraft limit", balance.overdraft_limit.clone()),
        ("granted", totals.granted),
        ("debited", totals.debited),
        ("refunded", totals.refunded),
        ("expired", totals.expired),
        ("voided", totals.voided),
        ("adjusted", totals.adjusted),
        ("entries", balance.entry_count.to_string()),
        ("as of", render::time(&balance.as_of)),
    ]);
    render::fields(&fields)
}

pub async fn balance(conn: &Connection, out: &Out, args: BalanceArgs) -> Result<(), CliError> {
    if args.live || args.feature.is_some() {
        return live_balance(conn, out, args).await;
    }
    let mut admin = conn.admin().await?;
    let reply = conn
        .call(
            "GetBalance",
            admin.get_balance(conn.request(pb::AdminGetBalanceRequest {
                account_id: args.account,
            })),
        )
        .await?;
    out.print(render::admin_balance(&reply), || balance_text(&reply));
    Ok(())
}

/// The edge's answer: the account's balance now (its grants effective and unexpired, less
/// holds and debt, the figure every reply and gateway header carries), what it can spend, what
/// holds set aside and what the edge's region can spend without asking. The edge keeps no
/// ledger totals, so none are printed.
async fn live_balance(conn: &Connection, out: &Out, args: BalanceArgs) -> Result<(), CliError> {
    let feature = args.feature.unwrap_or_default();
    let mut edge = conn.edge().await?;
    let reply = conn
        .call(
            "GetBalance",
            edge.get_balance(conn.request(pb::GetBalanceRequest {
                account_id: args.account,
                feature: feature.clone(),
            })),
        )
        .await?;
    let balance = reply.balance.clone().unwrap_or_default();
    let value = json!({
        "balance": {
            "account_id": balance.account_id,
            "balance": balance.balance,
            "debt": balance.debt,
            "overdraft_limit": balance.overdraft_limit,
            "as_of": render::time_json(&balance.as_of),
        },
        "feature": feature,
        "available": reply.available,
        "held": reply.held,
        "region_available": reply.region_available,
    });
    out.print(value, || {
        let available = if feature.is_empty() {
            "available".to_owned()
        } else {
            format!("available for {feature}")
        };
        render::fields(&[
            ("account", balance.account_id.clone()),
            ("balance", balance.balance.clone()),
            ("debt", balance.debt.clone()),
            ("overdraft limit", balance.overdraft_limit.clone()),
            (available.as_str(), reply.available.clone()),
            ("set aside by holds", reply.held.clone()),
            ("this region can spend", reply.region_available.clone()),
        ])
    });
    Ok(())
}

pub async fn refund(conn: &Connection, out: &Out, args: RefundArgs) -> Result<(), CliError> {
    let key = key_of(&args.mutation)?;
    let amount = parse::positive_amount("--amount", &args.amount)?;
    let expires_at =
        parse::optional_time("--refund-grant-expires-at", &args.refund_grant_expires_at)?;
    let mut admin = conn.admin().await?;
    let debit = explain::resolve_debit(conn, &mut admin, &args.account, &args.debit).await?;
    let reply = conn
        .call(
            "Refund",
            admin.refund(conn.request(pb::RefundRequest {
                idempotency_key: key.clone(),
                account_id: args.account,
                debit_id: debit.debit_id,
                amount,
                refund_grant_id: args.refund_grant_id,
                refund_grant_expires_at: expires_at,
                memo: args.memo,
            })),
        )
        .await?;
    out.mutation(&key, reply)
}

pub async fn adjust(conn: &Connection, out: &Out, args: AdjustArgs) -> Result<(), CliError> {
    let key = key_of(&args.mutation)?;
    let amount = parse::nonzero_amount("--amount", &args.amount)?;
    if args.memo.trim().is_empty() {
        return Err(CliError::input(
            "--memo",
            "must say why (it is the audit trail)",
        ));
    }
    let mut admin = conn.admin().await?;
    let reply = conn
        .call(
            "Adjust",
            admin.adjust(conn.request(pb::AdjustRequest {
                idempotency_key: key.clone(),
                account_id: args.account,
                amount,
                grant_id: args.grant_id,
                memo: args.memo,
                beyond_overdraft: args.beyond_overdraft,
            })),
        )
        .await?;
    out.mutation(&key, reply)
}

pub async fn verify(conn: &Connection, out: &Out, args: VerifyArgs) -> Result<(), CliError> {
    let mut admin = conn.admin().await?;
    let reply = conn
        .call(
            "Verify",
            admin.verify(conn.request(pb::VerifyRequest {
                account_id: args.account.unwrap_or_default(),
            })),
        )
        .await?;
    let value = json!({
        "ok": reply.ok,
        "accounts_checked": reply.accounts_checked,
        "entries_checked": reply.entries_checked,
        "problems": reply.problems.iter().map(render::problem).collect::<Vec<_>>(),
        "truncated": reply.truncated,
    });
    out.print(value, || {
        let mut text = render::fields(&[
            ("ok", reply.ok.to_string()),
            ("accounts checked", reply.accounts_checked.to_string()),
            ("entries checked", reply.entries_checked.to_string()),
        ]);
        if !reply.problems.is_empty() {
            let rows: Vec<Vec<String>> = reply
                .problems
                .iter()
                .map(|p| {
                    vec![
                        p.account_id.clone(),
                        p.seq.to_string(),
                        p.grant_id.clone(),
                        render::problem_kind(p.kind),
                        p.detail.clone(),
                    ]
                })
                .collect();
            text.push('\n');
            text.push_str(&render::table(
                &["account", "seq", "grant", "problem", "detail"],
                &rows,
            ));
            if reply.truncated {
                text.push_str("(more problems were found than listed)\n");
            }
        }
        text
    });
    if reply.ok {
        Ok(())
    } else {
        Err(CliError::Other(format!(
            "verify found {} problem(s) in the ledger",
            reply.problems.len()
        )))
    }
}

fn bucket(text: &Option<String>) -> Result<pb::Bucket, CliError> {
    Ok(match text.as_deref() {
        None => pb::Bucket::Unspecified,
        Some("hour") => pb::Bucket::Hour,
        Some("day") => pb::Bucket::Day,
        Some("month") => pb::Bucket::Month,
        Some(other) => {
            return Err(CliError::input(
                "--bucket",
                format!("{other:?} is not hour, day or month"),
            ))
        }
    })
}

fn dimension(text: &str) -> Result<pb::UsageDimension, CliError> {
    Ok(match text {
        "feature" => pb::UsageDimension::Feature,
        "actor" => pb::UsageDimension::Actor,
        "region" => pb::UsageDimension::Region,
        other => {
            return Err(CliError::input(
                "--by",
                format!("{other:?} is not feature, actor or region"),
            ))
        }
    })
}

pub async fn usage(conn: &Connection, out: &Out, args: UsageArgs) -> Result<(), CliError> {
    let request = pb::GetUsageBreakdownRequest {
        account_id: args.account,
        from: parse::optional_time("--from", &args.from)?,
        until: parse::optional_time("--until", &args.until)?,
        bucket: bucket(&args.bucket)?.into(),
        group_by: args
            .by
            .iter()
            .map(|d| dimension(d).map(i32::from))
            .collect::<Result<_, _>>()?,
    };
    let mut admin = conn.admin().await?;
    let reply = conn
        .call(
            "GetUsageBreakdown",
            admin.get_usage_breakdown(conn.request(request)),
        )
        .await?;
    let value = json!({ "rows": reply.rows.iter().map(render::usage_row).collect::<Vec<_>>() });
    out.print(value, || {
        let rows: Vec<Vec<String>> = reply
            .rows
            .iter()
            .map(|r| {
                vec![
                    render::time(&r.bucket_start),
                    r.feature.clone(),
                    r.actor_id.clone(),
                    r.region.clone(),
                    r.credits.clone(),
                    r.debits.to_string(),
                ]
            })
            .collect();
        render::table(
            &["bucket", "feature", "actor", "region", "credits", "debits"],
            &rows,
        )
    });
    Ok(())
}

pub async fn revenue(
    conn: &Connection,
    out: &Out,
    command: RevenueCommand,
) -> Result<(), CliError> {
    let RevenueCommand::Report {
        from,
        until,
        account,
    } = command;
    let request = pb::GetRevenueReportRequest {
        from: parse::optional_time("--from", &from)?,
        until: parse::optional_time("--until", &until)?,
        account_id: account.unwrap_or_default(),
    };
    let mut admin = conn.admin().await?;
    let reply = conn
        .call(
            "GetRevenueReport",
            admin.get_revenue_report(conn.request(request)),
        )
        .await?;
    let value: Value =
        json!({ "lines": reply.lines.iter().map(render::revenue_line).collect::<Vec<_>>() });
    out.print(value, || {
        let rows: Vec<Vec<String>> = reply
            .lines
            .iter()
            .map(|l| {
                vec![
                    if l.currency.is_empty() {
                        "-".into()
                    } else {
                        l.currency.clone()
                    },
                    l.credits_sold.clone(),
                    l.money_sold.clone(),
                    l.credits_consumed.clone(),
                    l.money_consumed.clone(),
                    l.credits_expired.clone(),
                    l.money_breakage.clone(),
                    l.credits_refunded.clone(),
                    l.money_refunded.clone(),
                    l.credits_voided.clone(),
                    l.money_voided.clone(),
                ]
            })
            .collect();
        render::table(
            &[
                "currency",
                "credits sold",
                "money sold",
                "credits consumed",
                "money consumed",
                "credits expired",
                "breakage",
                "credits refunded",
                "money refunded",
                "credits voided",
                "money voided",
            ],
            &rows,
        )
    });
    Ok(())
}
