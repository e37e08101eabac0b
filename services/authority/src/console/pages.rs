//! The console's pages and forms. Reads and changes go through the Admin service (see
//! [`super::calls`]); lists the Admin API has no call for (accounts, low balances, grants
//! expiring soon) read the ledger directly.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rust_decimal::Decimal;
use tollgate_core::{AccountId, Credits, RegionId, Timestamp};
use tollgate_ledger::PageRequest;
use tollgate_proto::decode::timestamp_to_pb;
use tollgate_proto::pb;
use tollgate_proto::pb::admin_server::Admin as _;
use tonic::Request;

use super::balance::{self, AccountBalance};
use super::calls::AdminCalls as _;
use super::chart::{self, Usage};
use super::html::{self, csrf_field, esc, hidden, table, url, Cell, Viewer};
use super::session::{self, random_hex, Access, Session};
use super::{check_csrf, prices, respond, Console, Failure};

/// A posted form: field name → value.
pub type Form = BTreeMap<String, String>;

/// Accounts one list scans at most (search, low balances).
pub const ACCOUNTS_SCAN_MAX: usize = 10_000;
/// Rows one list shows at most.
pub const LIST_ROWS_MAX: usize = 100;
/// Entries the timeline shows at most (the newest).
pub const TIMELINE_ROWS_MAX: usize = 200;
/// "Expiring soon" means within this many days.
pub const EXPIRING_SOON_DAYS: i64 = 7;
/// Below this balance an account is listed as low unless the page asks for another threshold.
pub const LOW_BALANCE_DEFAULT: &str = "10";
/// Longest reason accepted on a refund or adjustment, in bytes (the memo holds 512 with the key
/// name added).
pub const REASON_BYTES_MAX: usize = 400;
/// Parked usage records the console lists at most, per state.
pub const PARKED_LISTED_MAX: u32 = 200;
const HOUR_MS: i64 = 60 * 60 * 1_000;
const DAY_MS: i64 = 24 * HOUR_MS;

pub(super) fn routes() -> axum::Router<Arc<Console>> {
    axum::Router::new()
        .route("/console", get(home))
        .route("/console/", get(home))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/accounts", get(find_accounts))
        .route("/console/accounts/{account}", get(account_page))
        .route(
            "/console/accounts/{account}/debits/{debit}",
            get(debit_page),
        )
        .route("/console/accounts/{account}/grants", post(issue_grant))
        .route("/console/accounts/{account}/refund", post(refund))
        .route("/console/accounts/{account}/adjust", post(adjust))
        .route("/console/accounts/{account}/plan", post(change_plan))
        .route(
            "/console/accounts/{account}/widget-token",
            post(widget_token),
        )
        .route("/console/prices", get(prices_page).post(prices_post))
        .route("/console/revenue", get(revenue_page))
        .route("/console/changes", get(changes_page))
        .route("/console/parked", get(parked_page))
        .route("/console/parked/{id}/resolve", post(resolve_parked))
}

type Page = Result<Response, Failure>;

fn viewer(session: &Session) -> Viewer<'_> {
    Viewer {
        key_name: session.key_name.as_deref().unwrap_or_default(),
        can_change: session.access == Some(Access::Change),
        csrf: &session.csrf,
    }
}

fn render(session: &Session, title: &str, body: &str) -> Response {
    respond(html::page(title, Some(&viewer(session)), body))
}

fn bad(message: impl Into<String>) -> Failure {
    Failure::Page(StatusCode::BAD_REQUEST, message.into())
}

/// A required form field, trimmed; an error names it.
fn field<'a>(form: &'a Form, name: &str) -> Result<&'a str, Failure> {
    match form.get(name).map(|v| v.trim()) {
        Some(value) if !value.is_empty() => Ok(value),
        _ => Err(bad(format!("{name}: required"))),
    }
}

fn optional<'a>(form: &'a Form, name: &str) -> Option<&'a str> {
    form.get(name)
        .map(|v| v.trim())
        .filter(|value| !value.is_empty())
}

/// A fresh idempotency key for one rendered form: resubmitting it moves nothing twice.
fn operation_key() -> Result<String, Failure> {
    random_hex(12)
        .map(|hex| format!("console-{hex}"))
        .map_err(|e| {
            Failure::Page(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("randomness: {e}"),
            )
        })
}

fn now_pb(console: &Console) -> prost_types::Timestamp {
    timestamp_to_pb(console.clock.now())
}

fn pb_at(millis: i64) -> prost_types::Timestamp {
    timestamp_to_pb(Timestamp::from_millis(millis).unwrap_or(Timestamp::EPOCH))
}

/// A time typed in a form: RFC 3339, `YYYY-MM-DDTHH:MM` (a datetime-local input) or
/// `YYYY-MM-DD`, read as UTC.
fn parse_time(name: &str, text: &str) -> Result<prost_types::Timestamp, Failure> {
    let at = Timestamp::parse_rfc3339(text).ok().or_else(|| {
        let naive = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M")
            .or_else(|_| chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S"))
            .ok()
            .or_else(|| {
                chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                    .ok()
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
            })?;
        Timestamp::from_datetime(naive.and_utc()).ok()
    });
    at.map(timestamp_to_pb).ok_or_else(|| {
        bad(format!(
            "{name}: {text:?} is not a time like 2026-01-31, 2026-01-31T12:00 or 2026-01-31T12:00:00Z"
        ))
    })
}

/// The memo of a change made in the console: the reason and the key that made it.
fn memo(reason: &str, session: &Session) -> String {
    format!(
        "{reason} [console, key {}]",
        session.key_name.as_deref().unwrap_or_default()
    )
}

fn key_name(session: &Session) -> &str {
    session.key_name.as_deref().unwrap_or_default()
}

// ---- Sign-in -------------------------------------------------------------------------------

async fn login_page(State(console): State<Arc<Console>>, headers: http::HeaderMap) -> Page {
    if console.signed_in(&headers).is_ok() {
        return Ok(axum::response::Redirect::to("/console").into_response());
    }
    login_form(&console, StatusCode::OK, None)
}

/// The sign-in form, in a new session that holds only its CSRF token.
fn login_form(console: &Console, status: StatusCode, error: Option<&str>) -> Page {
    let (id, session) = console
        .sessions
        .start(None, console.now_ms())
        .map_err(|e| {
            Failure::Page(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("randomness: {e}"),
            )
        })?;
    let error = error
        .map(|e| format!("<p class=\"error\" id=\"failure\">{}</p>", esc(e)))
        .unwrap_or_default();
    let body = format!(
        "<h1>Sign in</h1>{error}<form class=\"box\" method=\"post\" action=\"/console/login\">{}\
         <label>API key (admin or read scope)<br><input type=\"password\" name=\"key\" id=\"key\" \
         size=\"60\" autocomplete=\"off\" required></label><button id=\"sign-in\">Sign in</button></form>\
         <p class=\"muted\">A read key sees everything and changes nothing.</p>",
        csrf_field(&session.csrf)
    );
    let mut response = respond(html::page("Sign in", None, &body));
    *response.status_mut() = status;
    set_cookie(&mut response, &session::cookie(&id, console.secure_cookies));
    Ok(response)
}

fn set_cookie(response: &mut Response, cookie: &str) {
    if let Ok(value) = http::HeaderValue::from_str(cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
}

async fn login(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    axum::Form(form): axum::Form<Form>,
) -> Page {
    let now = console.now_ms();
    let pending = session::session_id(&headers)
        .and_then(|id| console.sessions.touch(&id, now).map(|s| (id, s)));
    let Some((old_id, pending)) = pending else {
        return login_form(
            &console,
            StatusCode::FORBIDDEN,
            Some("csrf: the sign-in form expired; try again"),
        );
    };
    check_csrf(&pending, &form)?;
    let key = form.get("key").map(|k| k.trim()).unwrap_or_default();
    let Some(access) = console.access_of(key) else {
        return login_form(
            &console,
            StatusCode::UNAUTHORIZED,
            Some("key: unknown, or without the admin or read scope"),
        );
    };
    // A new id at sign-in, so an id planted before it is worth nothing after.
    console.sessions.end(&old_id);
    let (id, _) = console.sessions.start(Some(access), now).map_err(|e| {
        Failure::Page(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("randomness: {e}"),
        )
    })?;
    let mut response = axum::response::Redirect::to("/console").into_response();
    set_cookie(&mut response, &session::cookie(&id, console.secure_cookies));
    Ok(response)
}

async fn logout(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    axum::Form(form): axum::Form<Form>,
) -> Page {
    let (id, session) = console.signed_in(&headers)?;
    check_csrf(&session, &form)?;
    console.sessions.end(&id);
    let mut response = axum::response::Redirect::to("/console/login").into_response();
    set_cookie(&mut response, &session::clear_cookie());
    Ok(response)
}

// ---- Home, search, lists --------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct HomeQuery {
    below: Option<String>,
}

async fn home(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    Query(query): Query<HomeQuery>,
) -> Page {
    let (_, session) = console.signed_in(&headers)?;
    let below_text = query
        .below
        .filter(|b| !b.trim().is_empty())
        .unwrap_or_else(|| LOW_BALANCE_DEFAULT.into());
    let below: Decimal = below_text
        .trim()
        .parse()
        .map_err(|_| bad(format!("below: {below_text:?} is not a number of credits")))?;
    let accounts = scan_accounts(&console).await?;
    let low = low_balances(&console, &accounts, below).await?;
    let low_rows: Vec<Vec<Cell>> = low
        .iter()
        .map(|(account, told)| {
            vec![
                account_link(account.as_str()),
                Cell::Num(told.balance.to_string()),
                Cell::Num(told.debt.to_string()),
            ]
        })
        .collect();
    let now = console.clock.now();
    let soon_ms = now.millis() + EXPIRING_SOON_DAYS * DAY_MS;
    let soon = Timestamp::from_millis(soon_ms).unwrap_or(Timestamp::MAX);
    let listed = console
        .ledger
        .grants_expiring(soon, LIST_ROWS_MAX as u32)
        .await?;
    let body = format!(
        "<h1>Accounts</h1>{search}\
         <h2>Low balance (under {below})</h2>\
         <form method=\"get\" action=\"/console\">Threshold <input name=\"below\" size=\"8\" value=\"{below_attr}\"> <button>Show</button></form>{low}\
         <p class=\"muted\">The balance is the account's: grants effective and unexpired now, \
         less holds in flight, less debt. Accounts are chosen by their ledger (holds are read for \
         the accounts listed).</p>{expiry}\
         <p class=\"muted\">{scanned} accounts scanned{more}.</p>",
        search = search_form(""),
        below = esc(&below_text),
        below_attr = esc(&below_text),
        low = table(&["account", "balance", "debt"], &low_rows, "low-balance"),
        expiry = expiry_sections(&listed, now),
        scanned = accounts.len(),
        more = if accounts.len() >= ACCOUNTS_SCAN_MAX {
            " (the first ones by id; more exist)"
        } else {
            ""
        },
    );
    Ok(render(&session, "Accounts", &body))
}

/// The home page's two lists of grants by expiry: those expiring within
/// [`EXPIRING_SOON_DAYS`], and apart those already past their expiry that the expiry run has
/// not closed yet (never called "expiring": their credits are in no balance already).
fn expiry_sections(listed: &[tollgate_ledger::GrantRecord], now: Timestamp) -> String {
    let (expiring, lapsed) = split_expiring(listed, now);
    let at = |at: Option<Timestamp>| {
        at.map(|at| html::millis(at.millis()))
            .unwrap_or_else(|| "never".into())
    };
    let expiring_rows: Vec<Vec<Cell>> = expiring
        .iter()
        .map(|g| {
            let note = if now < g.grant.effective_at {
                format!("starts {}", html::millis(g.grant.effective_at.millis()))
            } else {
                String::new()
            };
            vec![
                account_link(g.account.as_str()),
                Cell::Text(g.grant.id.to_string()),
                Cell::Num(g.grant.remaining.to_string()),
                Cell::Text(at(g.grant.expires_at)),
                Cell::Text(note),
            ]
        })
        .collect();
    let lapsed_rows: Vec<Vec<Cell>> = lapsed
        .iter()
        .map(|g| {
            vec![
                account_link(g.account.as_str()),
                Cell::Text(g.grant.id.to_string()),
                Cell::Num(g.grant.remaining.to_string()),
                Cell::Text(format!(
                    "expired {}, awaiting the expiry run",
                    at(g.grant.expires_at)
                )),
            ]
        })
        .collect();
    format!(
        "<h2>Credits expiring within {EXPIRING_SOON_DAYS} days</h2>{expiring}\
         <h2>Past expiry, awaiting the expiry run</h2>\
         <p class=\"muted\">Grants whose expiry has passed and that the lifecycle has not expired \
         yet: expiry is final once every region has reconciled past it. They are in no balance.\
         </p>{lapsed}{more}",
        expiring = table(
            &["account", "grant", "remaining", "expires at", "note"],
            &expiring_rows,
            "expiring-soon"
        ),
        lapsed = table(
            &["account", "grant", "remaining", "expired"],
            &lapsed_rows,
            "expired-awaiting"
        ),
        more = if listed.len() >= LIST_ROWS_MAX {
            format!(
                "<p class=\"muted\">The first {LIST_ROWS_MAX} grants by expiry; more exist.</p>"
            )
        } else {
            String::new()
        },
    )
}

/// Grants the ledger lists as expiring by a date, split at `now`: those still to expire, and
/// those already past their expiry that the expiry run has not closed yet.
fn split_expiring(
    listed: &[tollgate_ledger::GrantRecord],
    now: Timestamp,
) -> (
    Vec<&tollgate_ledger::GrantRecord>,
    Vec<&tollgate_ledger::GrantRecord>,
) {
    listed
        .iter()
        .partition(|g| g.grant.expires_at.is_none_or(|at| now < at))
}

/// Accounts whose balance is under `below`, lowest first, at most [`LIST_ROWS_MAX`]: chosen
/// by the ledger's part of the balance (one grants read per account scanned), then less the
/// holds in flight of the accounts listed (holds only lower a balance, so they stay listed).
async fn low_balances(
    console: &Console,
    accounts: &[tollgate_ledger::AccountSnapshot],
    below: Decimal,
) -> Result<Vec<(AccountId, AccountBalance)>, Failure> {
    let mut low = Vec::new();
    for snapshot in accounts {
        let told = console
            .ledger_balance(&snapshot.account, snapshot.debt)
            .await?;
        if told.balance.to_decimal() < below {
            low.push((snapshot.account.clone(), told));
        }
    }
    low.sort_by_key(|(account, told)| (told.balance, account.clone()));
    low.truncate(LIST_ROWS_MAX);
    let mut listed = Vec::with_capacity(low.len());
    for (account, told) in low {
        let (held, unread) = balance::held_in(&console.region_views(&account).await);
        listed.push((account, told.less_holds(held, unread)));
    }
    listed.sort_by_key(|(account, told)| (told.balance, account.clone()));
    Ok(listed)
}

fn decimal(text: &str) -> Decimal {
    text.parse().unwrap_or_default()
}

fn account_link(account: &str) -> Cell {
    Cell::Html(format!(
        "<a href=\"/console/accounts/{}\">{}</a>",
        url(account),
        esc(account)
    ))
}

fn search_form(query: &str) -> String {
    format!(
        "<form class=\"box\" method=\"get\" action=\"/console/accounts\"><label>Find an account \
         <input name=\"q\" id=\"find\" value=\"{}\" placeholder=\"account id or part of it\"></label>\
         <button id=\"find-button\">Find</button></form>",
        esc(query)
    )
}

async fn scan_accounts(
    console: &Console,
) -> Result<Vec<tollgate_ledger::AccountSnapshot>, Failure> {
    let mut accounts = Vec::new();
    let mut token = None;
    while accounts.len() < ACCOUNTS_SCAN_MAX {
        let page = console
            .ledger
            .list_accounts(PageRequest {
                size: super::calls::PAGE_SIZE,
                token,
            })
            .await?;
        accounts.extend(page.items);
        match page.next_token {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    accounts.truncate(ACCOUNTS_SCAN_MAX);
    Ok(accounts)
}

#[derive(serde::Deserialize)]
struct FindQuery {
    #[serde(default)]
    q: String,
}

async fn find_accounts(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    Query(query): Query<FindQuery>,
) -> Page {
    let (_, session) = console.signed_in(&headers)?;
    let wanted = query.q.trim();
    let accounts = scan_accounts(&console).await?;
    if accounts.iter().any(|a| a.account.as_str() == wanted) {
        return Ok(
            axum::response::Redirect::to(&format!("/console/accounts/{}", url(wanted)))
                .into_response(),
        );
    }
    let lowered = wanted.to_lowercase();
    let mut rows: Vec<Vec<Cell>> = Vec::new();
    for found in accounts
        .iter()
        .filter(|a| a.account.as_str().to_lowercase().contains(&lowered))
        .take(LIST_ROWS_MAX)
    {
        let told = console.account_balance(&found.account).await?;
        rows.push(vec![
            account_link(found.account.as_str()),
            Cell::Num(told.balance.to_string()),
            Cell::Text(html::millis(found.created_at.millis())),
        ]);
    }
    let body = format!(
        "<h1>Accounts matching “{}”</h1>{}{}",
        esc(wanted),
        search_form(wanted),
        table(&["account", "balance", "created"], &rows, "accounts")
    );
    Ok(render(&session, "Find", &body))
}

// ---- One account ----------------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct AccountQuery {
    window: Option<String>,
}

/// A chart window: its length and bucket.
fn window(name: Option<&str>) -> Result<(&'static str, i64, pb::Bucket, i64), Failure> {
    match name.unwrap_or("24h") {
        "24h" => Ok(("24h", DAY_MS, pb::Bucket::Hour, HOUR_MS)),
        "7d" => Ok(("7d", 7 * DAY_MS, pb::Bucket::Hour, HOUR_MS)),
        "30d" => Ok(("30d", 30 * DAY_MS, pb::Bucket::Day, DAY_MS)),
        other => Err(bad(format!("window: {other:?} is not 24h, 7d or 30d"))),
    }
}

async fn account_page(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    Path(account): Path<String>,
    Query(query): Query<AccountQuery>,
) -> Page {
    let (_, session) = console.signed_in(&headers)?;
    let (window_name, window_ms, bucket, bucket_ms) = window(query.window.as_deref())?;
    let details = console.admin.call_account(&account).await?;
    let ledger = details.balance.clone().unwrap_or_default();
    let grants = console.admin.call_grants(&account, false).await?;
    let id = account_id(&account)?;
    let debt = Credits::parse(&ledger.debt)
        .map_err(|e| bad(format!("debt: {:?} from the ledger: {e}", ledger.debt)))?;
    let views = console.region_views(&id).await;
    let (held, unread) = balance::held_in(&views);
    let told = console
        .ledger_balance(&id, debt)
        .await?
        .less_holds(held, unread);
    let now_ms = console.now_ms();
    let from_ms = now_ms - window_ms;
    let mut body = String::new();
    let plan = details
        .settings
        .as_ref()
        .map(|s| s.plan.clone())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "none".into());
    let _ = write!(
        body,
        "<h1 id=\"account-id\">{}</h1><div class=\"cards\">\
         <div class=\"card\">Balance<b id=\"balance\">{}</b></div>\
         <div class=\"card\">Set aside by holds in flight<b id=\"held\">{}</b></div>\
         <div class=\"card\">Debt<b id=\"debt\">{}</b></div>\
         <div class=\"card\">Overdraft limit<b>{}</b></div>\
         <div class=\"card\">Plan<b id=\"plan\">{}</b></div>\
         <div class=\"card\">Ledger entries<b>{}</b></div></div>",
        esc(&account),
        told.balance,
        told.held,
        told.debt,
        esc(&ledger.overdraft_limit),
        esc(&plan),
        ledger.entry_count,
    );
    body.push_str(&balance_terms(&told));
    body.push_str(&totals_table(&ledger));
    body.push_str(&scope_table(&told));
    body.push_str(&region_table(&views, console.clock.now()));
    body.push_str("<h2>Grants</h2>");
    body.push_str(&grants_table(&grants, &told));
    body.push_str(
        &usage_section(
            &console,
            &account,
            window_name,
            from_ms,
            now_ms,
            bucket,
            bucket_ms,
        )
        .await,
    );
    body.push_str(&timeline(&console, &account, from_ms, window_name).await?);
    if session.access == Some(Access::Change) {
        body.push_str(&change_forms(&console, &account, &session).await?);
    } else {
        body.push_str(
            "<p class=\"muted\" id=\"read-only\">Signed in with a read key: grants, refunds, \
             adjustments, plan changes and widget tokens need an admin key.</p>",
        );
    }
    Ok(render(&session, &account, &body))
}

fn account_id(account: &str) -> Result<AccountId, Failure> {
    AccountId::new(account).map_err(|e| bad(format!("account_id: {e}")))
}

/// What the balance is made of, and what it leaves out and why.
fn balance_terms(told: &AccountBalance) -> String {
    let mut out = format!(
        "<p class=\"muted\" id=\"balance-terms\">The account's balance: its grants effective and \
         unexpired now ({}), less credits set aside by holds in flight ({}), less debt ({}). \
         It is the figure edges answer with (GetBalance, balance after, the gateway's header); \
         spends an edge made that the authority has not reconciled yet are not in it.",
        told.effective, told.held, told.debt
    );
    if !told.upcoming.is_empty() {
        let _ = write!(
            out,
            " Not counted: {} credits of grants not effective yet (the first starts {}).",
            told.upcoming_total(),
            esc(&html::millis(told.upcoming[0].at.millis()))
        );
    }
    if !told.lapsed.is_empty() {
        let _ = write!(
            out,
            " Not counted: {} credits of grants past their expiry, awaiting the expiry run.",
            told.lapsed_total()
        );
    }
    for unread in &told.holds_unread {
        let _ = write!(
            out,
            " Holds not read in region {} (not subtracted).",
            esc(unread)
        );
    }
    out.push_str("</p>");
    out
}

fn totals_table(balance: &pb::Balance) -> String {
    let totals = balance.totals.clone().unwrap_or_default();
    let rows = vec![vec![
        Cell::Num(totals.granted),
        Cell::Num(totals.debited),
        Cell::Num(totals.refunded),
        Cell::Num(totals.expired),
        Cell::Num(totals.voided),
        Cell::Num(totals.adjusted),
    ]];
    format!(
        "<h2>Totals</h2>{}",
        table(
            &["granted", "debited", "refunded", "expired", "voided", "adjusted"],
            &rows,
            "totals"
        )
    )
}

/// What each region holds of the account now, read from the regional stores: slices of the
/// balance handed out so edges decide without leaving their region (never a second balance
/// nor what the account can spend), credits set aside by holds in flight, credits out on edge
/// leases, and its overdraft room.
fn region_table(
    views: &[(RegionId, Result<tollgate_region::AccountView, String>)],
    now: Timestamp,
) -> String {
    let intro = "<h2>Held by each region</h2><p class=\"muted\">Slices of the balance above that \
         the authority handed to regions so edges decide without leaving them. They are part of \
         the balance, not in addition to it, and not a limit on it: a spend a region cannot pay \
         makes its edge ask the authority for the rest. A captured hold appears in the ledger as \
         a debit once reconciled.</p>";
    if views.is_empty() {
        return format!("{intro}<p class=\"muted\">No region runs with this authority.</p>");
    }
    let rows: Vec<Vec<Cell>> = views
        .iter()
        .map(|(region, view)| match view {
            Ok(view) => {
                let (active, inactive) = view.segments.iter().fold(
                    (Credits::ZERO, Credits::ZERO),
                    |(active, inactive), s| {
                        let add =
                            |sum: Credits| sum.checked_add(s.remaining).unwrap_or(Credits::MAX);
                        if s.is_active_at(now) {
                            (add(active), inactive)
                        } else {
                            (active, add(inactive))
                        }
                    },
                );
                let room = view
                    .overdraft_limit
                    .saturating_sub_floor_zero(view.overdraft_used);
                let pool = if inactive.is_positive() {
                    format!("{active} (and {inactive} of grants not effective now, not counted)")
                } else {
                    active.to_string()
                };
                vec![
                    Cell::Text(format!("held by region {region}")),
                    Cell::Num(pool),
                    Cell::Num(format!("{} ({})", view.leased, view.leases)),
                    Cell::Num(format!("{} ({})", view.held, view.holds_pending)),
                    Cell::Num(room.to_string()),
                ]
            }
            Err(why) => vec![
                Cell::Text(format!("held by region {region}")),
                Cell::Text(format!("unavailable: {why}")),
                Cell::Text(String::new()),
                Cell::Text(String::new()),
                Cell::Text(String::new()),
            ],
        })
        .collect();
    format!(
        "{intro}{}",
        table(
            &[
                "region",
                "in the region's pool",
                "out on edge leases (leases)",
                "set aside by holds in flight (holds)",
                "overdraft room",
            ],
            &rows,
            "regions",
        )
    )
}

/// The effective credits per scope (grants effective and unexpired now).
fn scope_table(told: &AccountBalance) -> String {
    let rows: Vec<Vec<Cell>> = told
        .per_scope
        .iter()
        .map(|(scope, credits)| vec![Cell::Text(scope.clone()), Cell::Num(credits.to_string())])
        .collect();
    format!(
        "<h2>Effective credits per scope</h2><p class=\"muted\">Grants effective and unexpired \
         now, before holds and debt.</p>{}",
        table(&["features", "credits"], &rows, "per-scope")
    )
}

fn grants_table(grants: &[pb::Grant], told: &AccountBalance) -> String {
    let mut sorted: Vec<&pb::Grant> = grants.iter().collect();
    // Open grants first, in the order they burn: priority, then expiry (none last).
    sorted.sort_by_key(|g| {
        (
            g.state != i32::from(pb::GrantState::Open),
            g.priority,
            g.expires_at.map(|t| t.seconds).unwrap_or(i64::MAX),
            g.grant_id.clone(),
        )
    });
    let rows: Vec<Vec<Cell>> = sorted
        .iter()
        .map(|g| {
            vec![
                Cell::Text(g.grant_id.clone()),
                Cell::Text(html::grant_source(g.source)),
                Cell::Num(g.amount.clone()),
                Cell::Num(g.remaining.clone()),
                Cell::Num(g.priority.to_string()),
                Cell::Text(html::time(g.effective_at.as_ref())),
                Cell::Text(html::time(g.expires_at.as_ref())),
                Cell::Text(html::scope(g.scope.as_ref())),
                Cell::Text(grant_standing(g, told)),
            ]
        })
        .collect();
    table(
        &[
            "grant",
            "source",
            "amount",
            "remaining",
            "priority",
            "effective",
            "expires",
            "scope",
            "state",
        ],
        &rows,
        "grants",
    )
}

/// A grant's state as support reads it: an open grant the balance leaves out says why.
fn grant_standing(grant: &pb::Grant, told: &AccountBalance) -> String {
    let find = |list: &[balance::GrantAside]| {
        list.iter()
            .find(|aside| aside.grant.as_str() == grant.grant_id)
            .map(|aside| html::millis(aside.at.millis()))
    };
    if grant.state != i32::from(pb::GrantState::Open) {
        return html::grant_state(grant.state);
    }
    if let Some(starts) = find(&told.upcoming) {
        return format!("open, starts {starts} (not in the balance yet)");
    }
    if let Some(expired) = find(&told.lapsed) {
        return format!("expired {expired}, awaiting the expiry run (not in the balance)");
    }
    html::grant_state(grant.state)
}

async fn usage_section(
    console: &Console,
    account: &str,
    window_name: &str,
    from_ms: i64,
    now_ms: i64,
    bucket: pb::Bucket,
    bucket_ms: i64,
) -> String {
    let mut out = String::from("<h2>Usage</h2><p>");
    for name in ["24h", "7d", "30d"] {
        if name == window_name {
            let _ = write!(out, "<b>{name}</b> ");
        } else {
            let _ = write!(
                out,
                "<a href=\"/console/accounts/{}?window={name}\">{name}</a> ",
                url(account)
            );
        }
    }
    out.push_str("</p>");
    let first = from_ms.div_euclid(bucket_ms) * bucket_ms;
    let buckets: Vec<i64> = (0..)
        .map(|i| first + i * bucket_ms)
        .take_while(|b| *b < now_ms)
        .take(chart::BUCKETS_MAX)
        .collect();
    out.push_str("<div class=\"grid\">");
    for (dimension, id, title) in [
        (
            pb::UsageDimension::Feature,
            "chart-feature",
            "Credits per feature",
        ),
        (
            pb::UsageDimension::Actor,
            "chart-actor",
            "Credits per actor",
        ),
    ] {
        let request = pb::GetUsageBreakdownRequest {
            account_id: account.to_owned(),
            from: Some(pb_at(first)),
            until: Some(pb_at(now_ms)),
            bucket: bucket.into(),
            group_by: vec![dimension.into()],
        };
        match console.admin.call_usage(request).await {
            Ok(reply) => {
                let mut usage = Usage::default();
                for row in &reply.rows {
                    let name = match dimension {
                        pb::UsageDimension::Actor if row.actor_id.is_empty() => "(no actor)",
                        pb::UsageDimension::Actor => row.actor_id.as_str(),
                        _ => row.feature.as_str(),
                    };
                    let at = row.bucket_start.map(|t| t.seconds * 1_000).unwrap_or(0);
                    usage.add(name, at, row.credits.parse::<f64>().unwrap_or(0.0));
                }
                out.push_str(&chart::stacked_bars(id, title, &buckets, &usage));
            }
            Err(status) => {
                let _ = write!(
                    out,
                    "<p class=\"muted\">{}: {}</p>",
                    esc(title),
                    esc(status.message())
                );
            }
        }
    }
    out.push_str("</div>");
    out
}

async fn timeline(
    console: &Console,
    account: &str,
    from_ms: i64,
    window_name: &str,
) -> Result<String, Failure> {
    let (entries, truncated) = console
        .admin
        .call_entries(pb::ListEntriesRequest {
            account_id: account.to_owned(),
            from: Some(pb_at(from_ms)),
            ..Default::default()
        })
        .await?;
    let rows: Vec<Vec<Cell>> = entries
        .iter()
        .rev()
        .take(TIMELINE_ROWS_MAX)
        .map(|e| {
            let explain = if e.debit_id.is_empty() {
                Cell::Text(String::new())
            } else {
                Cell::Html(format!(
                    "<a class=\"explain\" href=\"/console/accounts/{}/debits/{}\">explain</a>",
                    url(account),
                    url(&e.debit_id)
                ))
            };
            vec![
                Cell::Num(e.seq.to_string()),
                Cell::Text(html::time(e.event_time.as_ref())),
                Cell::Text(html::entry_kind(e.kind)),
                Cell::Num(e.amount.clone()),
                Cell::Text(e.grant_id.clone()),
                Cell::Text(e.feature.clone()),
                Cell::Text(e.actor_id.clone()),
                Cell::Text(e.memo.clone()),
                explain,
            ]
        })
        .collect();
    Ok(format!(
        "<h2>Ledger ({window_name}, newest first)</h2>{}{}",
        table(
            &[
                "seq",
                "event time",
                "kind",
                "amount",
                "grant",
                "feature",
                "actor",
                "memo",
                ""
            ],
            &rows,
            "ledger"
        ),
        if truncated || entries.len() > TIMELINE_ROWS_MAX {
            "<p class=\"muted\">Only the newest entries are shown; pick a shorter window or use \
             `tollgate ledger` for all of them.</p>"
        } else {
            ""
        }
    ))
}

async fn change_forms(
    console: &Console,
    account: &str,
    session: &Session,
) -> Result<String, Failure> {
    let csrf = csrf_field(&session.csrf);
    let base = format!("/console/accounts/{}", url(account));
    let mut out = String::from("<h2>Changes</h2><div class=\"grid\">");
    let _ = write!(
        out,
        "<form class=\"box\" id=\"grant-form\" method=\"post\" action=\"{base}/grants\">{csrf}{op}\
         <b>Issue a grant</b>\
         <label>Amount <input name=\"amount\" id=\"grant-amount\" required size=\"10\"></label>\
         <label>Source <select name=\"source\" id=\"grant-source\"><option>promo</option>\
         <option>purchase</option><option>subscription</option><option>trial</option>\
         <option>top_up</option></select></label>\
         <label>Grant id (empty: generated) <input name=\"grant_id\" size=\"24\"></label>\
         <label>Priority (empty: the source's) <input name=\"priority\" size=\"4\"></label>\
         <label>Expires at (UTC, empty: never) <input name=\"expires_at\" type=\"datetime-local\"></label>\
         <label>Only for features (comma-separated, empty: all) <input name=\"features\" size=\"24\"></label>\
         <label>Note <input name=\"note\" size=\"30\"></label>\
         <button id=\"grant-submit\">Issue grant</button></form>",
        op = hidden("op", &operation_key()?),
    );
    let _ = write!(
        out,
        "<form class=\"box\" id=\"adjust-form\" method=\"post\" action=\"{base}/adjust\">{csrf}{op}\
         <b>Adjust the balance</b>\
         <label>Amount (negative takes credits away) <input name=\"amount\" id=\"adjust-amount\" required size=\"10\"></label>\
         <label>Reason (required) <input name=\"reason\" id=\"adjust-reason\" required size=\"40\" maxlength=\"{REASON_BYTES_MAX}\"></label>\
         <label><input type=\"checkbox\" name=\"beyond_overdraft\" value=\"yes\" id=\"adjust-beyond\"> May go beyond the overdraft limit</label>\
         <button id=\"adjust-submit\">Review adjustment</button></form>",
        op = hidden("op", &operation_key()?),
    );
    let plans = console.admin.call_plans().await;
    let mut options = String::from("<option value=\"\">(no plan)</option>");
    if let Ok(plans) = &plans {
        for plan in plans {
            let _ = write!(
                options,
                "<option value=\"{}\">{} (tier {})</option>",
                esc(&plan.plan_id),
                esc(&plan.plan_id),
                plan.tier
            );
        }
    }
    let _ = write!(
        out,
        "<form class=\"box\" id=\"plan-form\" method=\"post\" action=\"{base}/plan\">{csrf}{op}\
         <b>Change plan</b><label>Plan <select name=\"plan_id\" id=\"plan-id\">{options}</select></label>\
         <label>Proration <select name=\"proration\"><option value=\"next_period\">from the next period</option>\
         <option value=\"prorated_now\">prorated now</option></select></label>\
         <label>Reinstate credits expired within (hours, upgrades only) <input name=\"reinstate_hours\" size=\"4\" value=\"0\"></label>\
         <button id=\"plan-submit\">Change plan</button>{note}</form>",
        op = hidden("op", &operation_key()?),
        note = match &plans {
            Ok(_) => String::new(),
            Err(status) => format!("<p class=\"muted\">plans: {}</p>", esc(status.message())),
        },
    );
    let _ = write!(
        out,
        "<form class=\"box\" id=\"widget-form\" method=\"post\" action=\"{base}/widget-token\">{csrf}\
         <b>Customer balance widget</b>\
         <label>Link valid for (minutes, at most 1440) <input name=\"ttl_minutes\" size=\"5\" value=\"15\"></label>\
         <button id=\"widget-submit\">Create widget link</button></form></div>"
    );
    Ok(out)
}

// ---- One debit -------------------------------------------------------------------------------

async fn debit_page(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    Path((account, debit)): Path<(String, String)>,
) -> Page {
    let (_, session) = console.signed_in(&headers)?;
    let (entries, _) = console
        .admin
        .call_entries(pb::ListEntriesRequest {
            account_id: account.clone(),
            debit_id: debit.clone(),
            ..Default::default()
        })
        .await?;
    let debits: Vec<&pb::Entry> = entries
        .iter()
        .filter(|e| e.kind == i32::from(pb::EntryKind::Debit))
        .collect();
    let Some(first) = debits.first().copied() else {
        return Err(Failure::Page(
            StatusCode::NOT_FOUND,
            format!("debit_id: no debit {debit:?} in the ledger of account {account:?}"),
        ));
    };
    let charged: Decimal = debits.iter().map(|e| decimal(&e.amount)).sum();
    let refunded: Decimal = entries
        .iter()
        .filter(|e| e.kind == i32::from(pb::EntryKind::Refund))
        .map(|e| decimal(&e.amount))
        .sum();
    let grants: BTreeMap<String, pb::Grant> = console
        .admin
        .call_grants(&account, false)
        .await?
        .into_iter()
        .map(|g| (g.grant_id.clone(), g))
        .collect();
    let versions = console
        .admin
        .call_price_versions()
        .await
        .unwrap_or_default();
    let price = debit_price(first, &versions);
    let mut body = format!(
        "<h1>Debit {}</h1><p><a href=\"/console/accounts/{}\">← {}</a></p>",
        esc(&debit),
        url(&account),
        esc(&account)
    );
    let facts = [
        ("feature", first.feature.clone()),
        (
            "actor",
            if first.actor_id.is_empty() {
                "(none given)".into()
            } else {
                first.actor_id.clone()
            },
        ),
        ("region", first.region.clone()),
        ("event time", html::time(first.event_time.as_ref())),
        ("recorded at", html::time(first.recorded_at.as_ref())),
        ("operation", first.operation.clone()),
        ("price", price),
        ("charged", charged.normalize().to_string()),
        ("refunded", refunded.normalize().to_string()),
        (
            "hold",
            match tollgate_core::command::captured_hold(&first.memo) {
                Some(hold) => format!(
                    "captured hold {hold} (priced when it was authorized; the event time is the \
                     authorization's)"
                ),
                None => "none: a direct debit, not the capture of a hold".into(),
            },
        ),
    ];
    body.push_str("<table id=\"explanation\">");
    for (name, value) in facts {
        let _ = write!(
            body,
            "<tr><th>{}</th><td>{}</td></tr>",
            esc(name),
            esc(&value)
        );
    }
    body.push_str("</table><h2>Grants burned</h2>");
    let rows: Vec<Vec<Cell>> = debits
        .iter()
        .map(|e| {
            let grant = grants.get(&e.grant_id);
            vec![
                Cell::Num(e.seq.to_string()),
                Cell::Text(if e.grant_id.is_empty() {
                    "(overdraft)".into()
                } else {
                    e.grant_id.clone()
                }),
                Cell::Num(e.amount.clone()),
                Cell::Text(
                    grant
                        .map(|g| html::grant_source(g.source))
                        .unwrap_or_default(),
                ),
                Cell::Num(grant.map(|g| g.priority.to_string()).unwrap_or_default()),
                Cell::Text(
                    grant
                        .map(|g| html::time(g.expires_at.as_ref()))
                        .unwrap_or_default(),
                ),
            ]
        })
        .collect();
    body.push_str(&table(
        &["seq", "grant", "amount", "source", "priority", "expires"],
        &rows,
        "burned",
    ));
    let later: Vec<Vec<Cell>> = entries
        .iter()
        .filter(|e| e.kind != i32::from(pb::EntryKind::Debit))
        .map(|e| {
            vec![
                Cell::Num(e.seq.to_string()),
                Cell::Text(html::entry_kind(e.kind)),
                Cell::Num(e.amount.clone()),
                Cell::Text(e.grant_id.clone()),
                Cell::Text(e.memo.clone()),
            ]
        })
        .collect();
    body.push_str("<h2>Later entries of this debit</h2>");
    body.push_str(&table(
        &["seq", "kind", "amount", "grant", "memo"],
        &later,
        "debit-later",
    ));
    let refundable = (charged - refunded).normalize();
    if session.access == Some(Access::Change) && refundable > Decimal::ZERO {
        let _ = write!(
            body,
            "<form class=\"box\" id=\"refund-form\" method=\"post\" action=\"/console/accounts/{}/refund\">{}{}{}\
             <b>Refund</b><label>Amount (at most {}) <input name=\"amount\" id=\"refund-amount\" value=\"{}\" size=\"10\" required></label>\
             <label>Reason (required) <input name=\"reason\" id=\"refund-reason\" size=\"40\" maxlength=\"{REASON_BYTES_MAX}\" required></label>\
             <button id=\"refund-submit\">Review refund</button></form>",
            url(&account),
            csrf_field(&session.csrf),
            hidden("op", &operation_key()?),
            hidden("debit_id", &debit),
            esc(&refundable.to_string()),
            esc(&refundable.to_string()),
        );
    }
    Ok(render(&session, "Debit", &body))
}

/// How a debit was priced, in words. Its entry's own quantity, unit and rate when it kept them
/// ("2 image × 3 credits"); for entries written before they were kept, the rate the price book
/// gives, when the version alone says it.
fn debit_price(first: &pb::Entry, versions: &[pb::PriceBookVersion]) -> String {
    let version = first.price_version;
    let rule = html::price_rule(first.price_rule);
    if !first.quantity.is_empty() && !first.rate.is_empty() {
        let unit = if first.unit.is_empty() {
            "units"
        } else {
            first.unit.as_str()
        };
        return format!(
            "{} {unit} × {} credits, price book version {version}, {rule} rate",
            first.quantity, first.rate
        );
    }
    let rate = (!first.rate.is_empty())
        .then(|| first.rate.clone())
        .or_else(|| rate_of(versions, first));
    match (version, rate) {
        (0, _) => "an explicit cost (no price book)".to_owned(),
        (version, Some(rate)) => {
            format!("price book version {version}, {rule} rate: {rate} credits per unit")
        }
        (version, None) => format!(
            "price book version {version}, {rule} rate (the account's plan or contract set it)"
        ),
    }
}

/// The rate a version gave the debit's feature under its rule, when the version alone says it
/// (default and region rules; plan and contract rates depend on the account).
fn rate_of(versions: &[pb::PriceBookVersion], debit: &pb::Entry) -> Option<String> {
    let version = versions.iter().find(|v| v.version == debit.price_version)?;
    let table = match pb::PriceRule::try_from(debit.price_rule).ok()? {
        pb::PriceRule::Default => version.default_rates.as_ref()?,
        pb::PriceRule::Region => version.region_rates.get(&debit.region)?,
        _ => return None,
    };
    table.rates.get(&debit.feature).cloned()
}

// ---- Changes to one account --------------------------------------------------------------

/// The account's balance right after a change, as its page shows it; why not, when it cannot
/// be told.
async fn balance_now(console: &Console, account: &str) -> String {
    let told = match AccountId::new(account) {
        Ok(id) => console.account_balance(&id).await,
        Err(e) => Err(bad(format!("account_id: {e}"))),
    };
    match told {
        Ok(told) => told.balance.to_string(),
        Err(Failure::Page(_, why)) => format!("unavailable ({why})"),
        Err(Failure::SignIn) => "unavailable".into(),
    }
}

/// A ledger mutation's outcome as a page: the receipt and the account's balance after it, or
/// why nothing moved. The receipt's own `balance_after` is the ledger's sum of every open
/// grant (effective or not) less debt, so the page shows the account's balance instead.
async fn outcome_page(
    console: &Console,
    session: &Session,
    account: &str,
    what: &str,
    reply: pb::MutationReply,
) -> Response {
    let mut body = String::new();
    match reply.outcome {
        Some(pb::mutation_reply::Outcome::Done(receipt)) => {
            let _ = write!(
                body,
                "<h1>{}</h1><p class=\"notice\" id=\"outcome\">{} done{}. Balance now <b id=\"balance-after\">{}</b>.</p>",
                esc(what),
                esc(what),
                if receipt.replayed {
                    " before (this form was already sent; nothing moved again)"
                } else {
                    ""
                },
                esc(&balance_now(console, account).await)
            );
            let rows: Vec<Vec<Cell>> = receipt
                .movements
                .iter()
                .map(|m| {
                    vec![
                        Cell::Text(html::entry_kind(m.kind)),
                        Cell::Num(m.amount.clone()),
                        Cell::Text(m.grant_id.clone()),
                    ]
                })
                .collect();
            body.push_str(&table(&["kind", "amount", "grant"], &rows, "movements"));
        }
        Some(pb::mutation_reply::Outcome::Refused(refusal)) => {
            let _ = write!(
                body,
                "<h1>{}</h1><p class=\"error\" id=\"outcome\">Refused ({}): {}. Nothing moved.</p>",
                esc(what),
                esc(&html::refusal_code(refusal.code)),
                esc(&refusal.message)
            );
        }
        None => body.push_str("<p class=\"error\" id=\"outcome\">no outcome in the reply</p>"),
    }
    let _ = write!(
        body,
        "<p><a id=\"back-to-account\" href=\"/console/accounts/{}\">Back to {}</a></p>",
        url(account),
        esc(account)
    );
    render(session, what, &body)
}

fn refused_or_done(reply: &pb::MutationReply) -> &'static str {
    match reply.outcome {
        Some(pb::mutation_reply::Outcome::Done(_)) => "done",
        _ => "refused",
    }
}

fn source_of(text: &str) -> Result<pb::GrantSource, Failure> {
    match text {
        "purchase" => Ok(pb::GrantSource::Purchase),
        "subscription" => Ok(pb::GrantSource::Subscription),
        "promo" => Ok(pb::GrantSource::Promo),
        "trial" => Ok(pb::GrantSource::Trial),
        "top_up" => Ok(pb::GrantSource::TopUp),
        other => Err(bad(format!(
            "source: {other:?} is not purchase, subscription, promo, trial or top_up"
        ))),
    }
}

async fn issue_grant(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    Path(account): Path<String>,
    axum::Form(form): axum::Form<Form>,
) -> Page {
    let session = console.may_change(&headers, &form)?;
    let op = field(&form, "op")?;
    let amount = field(&form, "amount")?;
    let source = source_of(field(&form, "source")?)?;
    let grant_id = match optional(&form, "grant_id") {
        Some(id) => id.to_owned(),
        None => format!(
            "{}-{}",
            source_of_name(source),
            op.trim_start_matches("console-")
        ),
    };
    let priority = optional(&form, "priority")
        .map(|p| {
            p.parse::<u32>()
                .map_err(|_| bad(format!("priority: {p:?} is not a whole number")))
        })
        .transpose()?;
    let expires_at = optional(&form, "expires_at")
        .map(|t| parse_time("expires_at", t))
        .transpose()?;
    let features: Vec<String> = optional(&form, "features")
        .map(|f| {
            f.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let note = optional(&form, "note").unwrap_or("issued in the console");
    let request = pb::IssueGrantRequest {
        idempotency_key: op.to_owned(),
        account_id: account.clone(),
        grant_id: grant_id.clone(),
        amount: amount.to_owned(),
        source: source.into(),
        priority,
        effective_at: None,
        expires_at,
        scope: Some(pb::Scope { features }),
        cost_basis: None,
        external_ref: String::new(),
        metadata: [(
            "changed_by".to_owned(),
            format!("console:{}", key_name(&session)),
        )]
        .into(),
        memo: memo(note, &session),
    };
    let reply = console
        .admin
        .issue_grant(Request::new(request))
        .await?
        .into_inner();
    console
        .record(
            key_name(&session),
            "issue grant",
            &account,
            format!(
                "{grant_id}: {amount} ({}) {}",
                source_of_name(source),
                refused_or_done(&reply)
            ),
        )
        .await;
    Ok(outcome_page(&console, &session, &account, "Grant", reply).await)
}

fn source_of_name(source: pb::GrantSource) -> String {
    html::grant_source(source.into())
}

/// The confirmation page of a refund or an adjustment: what will happen, and a button that
/// sends the same form again with `confirm=yes`.
fn confirm_page(
    session: &Session,
    action: &str,
    title: &str,
    summary: &str,
    form: &Form,
    fields: &[&str],
    back: &str,
) -> Response {
    let mut hidden_fields = csrf_field(&session.csrf);
    for name in fields {
        if let Some(value) = form.get(*name) {
            hidden_fields.push_str(&hidden(name, value));
        }
    }
    let body = format!(
        "<h1>{}</h1><p class=\"notice\" id=\"confirm-summary\">{}</p>\
         <form method=\"post\" action=\"{}\">{hidden_fields}{}<button class=\"danger\" id=\"confirm\">Confirm</button>\
         <a class=\"button\" href=\"{}\">Cancel</a></form>",
        esc(title),
        esc(summary),
        esc(action),
        hidden("confirm", "yes"),
        esc(back),
    );
    render(session, title, &body)
}

/// What an adjustment of `amount` leaves the ledger's balance at, as a sentence for its
/// confirmation page (empty when the account or the amount cannot be read: the adjustment
/// itself then says what is wrong), and whether that is beyond the overdraft limit.
async fn balance_after_adjusting(
    console: &Console,
    account: &str,
    amount: &str,
    beyond: bool,
) -> String {
    let (Ok(id), Ok(delta)) = (AccountId::new(account.to_owned()), Credits::parse(amount)) else {
        return String::new();
    };
    let Ok(snapshot) = console.ledger.account(&id).await else {
        return String::new();
    };
    let Ok(after) = snapshot.balance.checked_add(delta) else {
        return String::new();
    };
    let limit = snapshot.overdraft_limit;
    let mut text = format!(
        " The ledger's balance is {}; it will be {after} (overdraft limit {limit}).",
        snapshot.balance
    );
    if after.micros() < -limit.micros() {
        let over = Credits::from_micros(-limit.micros() - after.micros());
        text.push_str(&if beyond {
            format!(" That is {over} beyond the overdraft limit, as you allowed.")
        } else {
            format!(
                " That is {over} beyond the overdraft limit: it will be refused unless \
                 \"May go beyond the overdraft limit\" is ticked."
            )
        });
    }
    text
}

fn reason(form: &Form) -> Result<&str, Failure> {
    let reason = field(form, "reason")?;
    if reason.len() > REASON_BYTES_MAX {
        return Err(bad(format!(
            "reason: {} bytes, at most {REASON_BYTES_MAX}",
            reason.len()
        )));
    }
    Ok(reason)
}

async fn refund(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    Path(account): Path<String>,
    axum::Form(form): axum::Form<Form>,
) -> Page {
    let session = console.may_change(&headers, &form)?;
    let op = field(&form, "op")?;
    let debit = field(&form, "debit_id")?;
    let amount = field(&form, "amount")?;
    let why = reason(&form)?;
    if optional(&form, "confirm") != Some("yes") {
        return Ok(confirm_page(
            &session,
            &format!("/console/accounts/{}/refund", url(&account)),
            "Confirm the refund",
            &format!(
                "Refund {amount} credits of debit {debit} to account {account}. Reason: {why}"
            ),
            &form,
            &["op", "debit_id", "amount", "reason"],
            &format!("/console/accounts/{}/debits/{}", url(&account), url(debit)),
        ));
    }
    let request = pb::RefundRequest {
        idempotency_key: op.to_owned(),
        account_id: account.clone(),
        debit_id: debit.to_owned(),
        amount: amount.to_owned(),
        refund_grant_id: String::new(),
        refund_grant_expires_at: None,
        memo: memo(why, &session),
    };
    let reply = console
        .admin
        .refund(Request::new(request))
        .await?
        .into_inner();
    console
        .record(
            key_name(&session),
            "refund",
            &account,
            format!(
                "{amount} of debit {debit} ({why}) {}",
                refused_or_done(&reply)
            ),
        )
        .await;
    Ok(outcome_page(&console, &session, &account, "Refund", reply).await)
}

async fn adjust(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    Path(account): Path<String>,
    axum::Form(form): axum::Form<Form>,
) -> Page {
    let session = console.may_change(&headers, &form)?;
    let op = field(&form, "op")?;
    let amount = field(&form, "amount")?;
    let why = reason(&form)?;
    if optional(&form, "confirm") != Some("yes") {
        let mut what = if amount.starts_with('-') {
            format!("Take {} credits from", amount.trim_start_matches('-'))
        } else {
            format!("Add {amount} credits to")
        };
        let beyond = optional(&form, "beyond_overdraft") == Some("yes");
        if beyond {
            what.insert_str(0, "Beyond the overdraft limit if need be: ");
        }
        let after = balance_after_adjusting(&console, &account, amount, beyond).await;
        return Ok(confirm_page(
            &session,
            &format!("/console/accounts/{}/adjust", url(&account)),
            "Confirm the adjustment",
            &format!("{what} account {account}. Reason: {why}.{after}"),
            &form,
            &["op", "amount", "reason", "beyond_overdraft"],
            &format!("/console/accounts/{}", url(&account)),
        ));
    }
    let request = pb::AdjustRequest {
        idempotency_key: op.to_owned(),
        account_id: account.clone(),
        amount: amount.to_owned(),
        grant_id: String::new(),
        memo: memo(why, &session),
        beyond_overdraft: optional(&form, "beyond_overdraft") == Some("yes"),
    };
    let reply = console
        .admin
        .adjust(Request::new(request))
        .await?
        .into_inner();
    console
        .record(
            key_name(&session),
            "adjust",
            &account,
            format!("{amount} ({why}) {}", refused_or_done(&reply)),
        )
        .await;
    Ok(outcome_page(&console, &session, &account, "Adjustment", reply).await)
}

async fn change_plan(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    Path(account): Path<String>,
    axum::Form(form): axum::Form<Form>,
) -> Page {
    let session = console.may_change(&headers, &form)?;
    let op = field(&form, "op")?;
    let plan = optional(&form, "plan_id").unwrap_or_default();
    let proration = match optional(&form, "proration").unwrap_or("next_period") {
        "next_period" => pb::Proration::NextPeriod,
        "prorated_now" => pb::Proration::ProratedNow,
        other => {
            return Err(bad(format!(
                "proration: {other:?} is not next_period or prorated_now"
            )))
        }
    };
    let hours = optional(&form, "reinstate_hours").unwrap_or("0");
    let hours: u64 = hours
        .parse()
        .map_err(|_| bad(format!("reinstate_hours: {hours:?} is not a whole number")))?;
    let reply = console
        .admin
        .change_plan(Request::new(pb::ChangePlanRequest {
            idempotency_key: op.to_owned(),
            account_id: account.clone(),
            plan_id: plan.to_owned(),
            proration: proration.into(),
            reinstate_grace_seconds: hours.saturating_mul(3_600),
        }))
        .await?
        .into_inner();
    console
        .record(
            key_name(&session),
            "change plan",
            &account,
            format!(
                "from {:?} to {plan:?} ({})",
                reply.previous_plan_id,
                proration.as_str_name()
            ),
        )
        .await;
    let granted: Vec<Vec<Cell>> = reply
        .granted
        .iter()
        .map(|g| vec![Cell::Text(g.grant_id.clone()), Cell::Num(g.amount.clone())])
        .collect();
    let body = format!(
        "<h1>Plan changed</h1><p class=\"notice\" id=\"outcome\">Account {} moved from “{}” to “{}”{}; \
         the new plan's periods start {}.</p>{}<p><a id=\"back-to-account\" href=\"/console/accounts/{}\">Back to {}</a></p>",
        esc(&account),
        esc(&reply.previous_plan_id),
        esc(plan),
        if reply.upgrade { " (an upgrade)" } else { "" },
        esc(&html::time(reply.starts_at.as_ref())),
        table(&["granted now", "amount"], &granted, "granted"),
        url(&account),
        esc(&account),
    );
    Ok(render(&session, "Plan changed", &body))
}

async fn widget_token(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    Path(account): Path<String>,
    axum::Form(form): axum::Form<Form>,
) -> Page {
    let session = console.may_change(&headers, &form)?;
    let minutes = optional(&form, "ttl_minutes").unwrap_or("15");
    let minutes: u64 = minutes
        .parse()
        .map_err(|_| bad(format!("ttl_minutes: {minutes:?} is not a whole number")))?;
    // The account must exist: a link to nothing helps no one.
    console.admin.call_account(&account).await?;
    let (token, expires_ms) =
        console.mint_widget_token(&account, Some(minutes.saturating_mul(60)))?;
    console
        .record(
            key_name(&session),
            "widget token",
            &account,
            format!("valid until {}", html::millis(expires_ms)),
        )
        .await;
    let path = format!("/widget?token={}", url(&token));
    let body = format!(
        "<h1>Widget link for {}</h1><p class=\"notice\">Valid until {}. Anyone with the link sees \
         this account's balance; share it only with the account's own users.</p>\
         <p><a id=\"widget-link\" href=\"{}\">Open the widget</a></p>\
         <label>Embed it<textarea rows=\"3\" readonly>{}</textarea></label>\
         <p><a href=\"/console/accounts/{}\">Back to {}</a></p>",
        esc(&account),
        esc(&html::millis(expires_ms)),
        esc(&path),
        esc(&format!(
            "<script src=\"/widget.js\" data-token=\"{token}\"></script>"
        )),
        url(&account),
        esc(&account),
    );
    Ok(render(&session, "Widget link", &body))
}

// ---- Price book ------------------------------------------------------------------------------

async fn prices_page(State(console): State<Arc<Console>>, headers: http::HeaderMap) -> Page {
    let (_, session) = console.signed_in(&headers)?;
    prices_view(&console, &session, None, &[], None).await
}

/// The price book page: features, the versions, and the editor with `text` (or a new version
/// after the latest), every problem of the last attempt, or what was published.
async fn prices_view(
    console: &Console,
    session: &Session,
    text: Option<&str>,
    problems: &[(String, String)],
    notice: Option<String>,
) -> Page {
    let versions = console.admin.call_price_versions().await?;
    let features = console.admin.call_features().await?;
    let mut body = String::from("<h1>Price book</h1>");
    if let Some(notice) = notice {
        let _ = write!(
            body,
            "<p class=\"notice\" id=\"price-notice\">{}</p>",
            esc(&notice)
        );
    }
    if !problems.is_empty() {
        let _ = write!(
            body,
            "<div class=\"error\"><b>Nothing was published: {} problem{}</b><ul id=\"price-problems\">",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        for (field, problem) in problems {
            let _ = write!(
                body,
                "<li><code>{}</code>: {}</li>",
                esc(field),
                esc(problem)
            );
        }
        body.push_str("</ul></div>");
    }
    let latest = versions.iter().max_by_key(|v| v.version);
    let draft = match (text, latest) {
        (Some(text), _) => text.to_owned(),
        (None, Some(latest)) => {
            let now = chrono::DateTime::from_timestamp_millis(console.now_ms())
                .map(|at| at.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_default();
            prices::to_text(latest, Some(latest.version + 1), Some(&now))
        }
        (None, None) => {
            let mut draft =
                String::from("version = 1\neffective_from = \"2020-01-01T00:00:00Z\"\naudience = \"all_accounts\"\n\n[default_rates]\n");
            for feature in &features {
                let _ = writeln!(draft, "{} = \"1\"", feature.feature);
            }
            draft
        }
    };
    let can_publish = session.access == Some(Access::Change);
    let _ = write!(
        body,
        "<form class=\"box\" method=\"post\" action=\"/console/prices\" id=\"price-form\">{}{}\
         <label>New version (TOML, or JSON starting with {{)<textarea name=\"text\" id=\"price-text\" rows=\"16\">{}</textarea></label>\
         <button name=\"action\" value=\"check\" id=\"price-check\">Check</button> {}</form>",
        csrf_field(&session.csrf),
        hidden("op", &operation_key()?),
        esc(&draft),
        if can_publish {
            "<button name=\"action\" value=\"publish\" class=\"danger\" id=\"price-publish\">Publish</button>"
        } else {
            "<span class=\"muted\">publishing needs an admin key</span>"
        },
    );
    let feature_rows: Vec<Vec<Cell>> = features
        .iter()
        .map(|f| {
            vec![
                Cell::Text(f.feature.clone()),
                Cell::Text(f.unit.clone()),
                Cell::Text(f.description.clone()),
            ]
        })
        .collect();
    body.push_str("<h2>Features</h2>");
    body.push_str(&table(
        &["feature", "unit", "description"],
        &feature_rows,
        "features",
    ));
    body.push_str("<h2>Versions, newest first</h2>");
    let mut sorted: Vec<&pb::PriceBookVersion> = versions.iter().collect();
    sorted.sort_by_key(|v| std::cmp::Reverse(v.version));
    if sorted.is_empty() {
        body.push_str("<p class=\"muted\" id=\"no-versions\">No version published yet.</p>");
    }
    for version in sorted {
        let _ = write!(
            body,
            "<h3 id=\"version-{}\">Version {}</h3><pre>{}</pre>",
            version.version,
            version.version,
            esc(&prices::to_text(version, None, None))
        );
    }
    Ok(render(session, "Price book", &body))
}

async fn prices_post(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    axum::Form(form): axum::Form<Form>,
) -> Page {
    let publish = match form.get("action").map(String::as_str) {
        Some("publish") => true,
        Some("check") => false,
        other => return Err(bad(format!("action: {other:?} is not check or publish"))),
    };
    let session = if publish {
        console.may_change(&headers, &form)?
    } else {
        let (_, session) = console.signed_in(&headers)?;
        check_csrf(&session, &form)?;
        session
    };
    let text = form.get("text").map(String::as_str).unwrap_or_default();
    let version = match prices::parse(text) {
        Ok(version) => version,
        Err(problems) => {
            return with_status(
                prices_view(&console, &session, Some(text), &problems, None).await,
                StatusCode::BAD_REQUEST,
            )
        }
    };
    // The same checks PublishPriceBookVersion runs, collected so each shows on its own line.
    let number = version.version;
    let (decoded, mut problems) = crate::lifecycle::price_version_parts(Some(version.clone()));
    if let (Some(decoded), Some(lifecycle)) = (decoded, &console.lifecycle) {
        problems.extend(
            lifecycle
                .price_version_problems(decoded)
                .await
                .map_err(crate::coordination::authority_error)?,
        );
    }
    if !problems.is_empty() {
        return with_status(
            prices_view(&console, &session, Some(text), &problems, None).await,
            StatusCode::BAD_REQUEST,
        );
    }
    if !publish {
        let notice = format!("Version {number} has no problem; nothing was published yet.");
        return prices_view(&console, &session, Some(text), &[], Some(notice)).await;
    }
    let op = field(&form, "op")?;
    let published = console
        .admin
        .publish_price_book_version(Request::new(pb::PublishPriceBookVersionRequest {
            idempotency_key: op.to_owned(),
            version: Some(version),
        }))
        .await;
    match published {
        Ok(_) => {
            console
                .record(
                    key_name(&session),
                    "publish price book",
                    "",
                    format!("version {number}"),
                )
                .await;
            prices_view(
                &console,
                &session,
                None,
                &[],
                Some(format!("Published version {number}.")),
            )
            .await
        }
        Err(status) => {
            let problems: Vec<(String, String)> = status
                .message()
                .split("; ")
                .map(|p| match p.split_once(": ") {
                    Some((field, problem)) => (field.to_owned(), problem.to_owned()),
                    None => ("version".to_owned(), p.to_owned()),
                })
                .collect();
            with_status(
                prices_view(&console, &session, Some(text), &problems, None).await,
                StatusCode::from(Failure::from(status)),
            )
        }
    }
}

impl From<Failure> for StatusCode {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::SignIn => StatusCode::UNAUTHORIZED,
            Failure::Page(status, _) => status,
        }
    }
}

fn with_status(page: Page, status: StatusCode) -> Page {
    let mut response = page?;
    *response.status_mut() = status;
    Ok(response)
}

// ---- Revenue and changes ----------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct RevenueQuery {
    from: Option<String>,
    until: Option<String>,
    account: Option<String>,
}

async fn revenue_page(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    Query(query): Query<RevenueQuery>,
) -> Page {
    let (_, session) = console.signed_in(&headers)?;
    let now = console.clock.now().to_datetime();
    let month_start = now.format("%Y-%m-01").to_string();
    let from_text = query
        .from
        .filter(|f| !f.trim().is_empty())
        .unwrap_or(month_start);
    let from = parse_time("from", from_text.trim())?;
    let until_text = query.until.filter(|u| !u.trim().is_empty());
    let until = match &until_text {
        Some(text) => parse_time("until", text.trim())?,
        None => now_pb(&console),
    };
    let account = query.account.unwrap_or_default();
    let reply = console
        .admin
        .get_revenue_report(Request::new(pb::GetRevenueReportRequest {
            from: Some(from),
            until: Some(until),
            account_id: account.trim().to_owned(),
        }))
        .await?
        .into_inner();
    let rows: Vec<Vec<Cell>> = reply
        .lines
        .iter()
        .map(|l| {
            vec![
                Cell::Text(if l.currency.is_empty() {
                    "(no cost basis)".into()
                } else {
                    l.currency.clone()
                }),
                Cell::Num(l.credits_sold.clone()),
                Cell::Num(l.money_sold.clone()),
                Cell::Num(l.credits_consumed.clone()),
                Cell::Num(l.money_consumed.clone()),
                Cell::Num(l.credits_expired.clone()),
                Cell::Num(l.money_breakage.clone()),
                Cell::Num(l.credits_refunded.clone()),
                Cell::Num(l.money_refunded.clone()),
                Cell::Num(l.credits_voided.clone()),
                Cell::Num(l.money_voided.clone()),
            ]
        })
        .collect();
    let body = format!(
        "<h1>Revenue</h1><form class=\"box\" method=\"get\" action=\"/console/revenue\">\
         <label>From (UTC) <input name=\"from\" value=\"{}\"></label>\
         <label>Until (UTC, empty: now) <input name=\"until\" value=\"{}\"></label>\
         <label>Account (empty: all) <input name=\"account\" value=\"{}\"></label><button>Show</button></form>\
         <p>From {} until {}.</p>{}",
        esc(&from_text),
        esc(until_text.as_deref().unwrap_or_default()),
        esc(&account),
        esc(&html::time(Some(&from))),
        esc(&html::time(Some(&until))),
        table(
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
            "revenue"
        )
    );
    Ok(render(&session, "Revenue", &body))
}

async fn changes_page(State(console): State<Arc<Console>>, headers: http::HeaderMap) -> Page {
    let (_, session) = console.signed_in(&headers)?;
    let rows: Vec<Vec<Cell>> = console
        .recent_changes()
        .into_iter()
        .map(|c| {
            vec![
                Cell::Text(html::millis(c.at_ms)),
                Cell::Text(c.key_name),
                Cell::Text(c.action.to_owned()),
                if c.account.is_empty() {
                    Cell::Text(String::new())
                } else {
                    account_link(&c.account)
                },
                Cell::Text(c.detail),
            ]
        })
        .collect();
    let body =
        format!(
        "<h1>Changes made in the console</h1><p class=\"muted\">Since this node started, newest \
         first, at most {}. Ledger changes also carry the key's name in their memo (and grants in \
         their <code>changed_by</code> metadata); every change is logged with target \
         <code>tollgate::console::changes</code>.</p>{}",
        super::CHANGES_KEPT_MAX,
        table(&["at", "key", "action", "account", "detail"], &rows, "changes")
    );
    Ok(render(&session, "Changes", &body))
}

#[derive(serde::Deserialize)]
struct ParkedQuery {
    state: Option<String>,
}

/// Usage the ledger could not take: open records, each with a form to charge it or write it
/// off (through the confirm page), or the resolved ones with who did what and why.
async fn parked_page(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    Query(query): Query<ParkedQuery>,
) -> Page {
    let (_, session) = console.signed_in(&headers)?;
    let resolved = query.state.as_deref() == Some("resolved");
    let state = if resolved {
        pb::ParkedState::Resolved
    } else {
        pb::ParkedState::Open
    };
    let reply = console
        .admin
        .list_parked_usage(Request::new(pb::ListParkedUsageRequest {
            state: state.into(),
            page_size: PARKED_LISTED_MAX,
            ..pb::ListParkedUsageRequest::default()
        }))
        .await?
        .into_inner();
    let mut rows = Vec::with_capacity(reply.records.len());
    for record in &reply.records {
        let mut row = vec![
            Cell::Text(record.id.clone()),
            account_link(&record.account_id),
            Cell::Text(record.region.clone()),
            Cell::Text(record.key.clone()),
            Cell::Text(record.feature.clone()),
            Cell::Num(record.cost.clone()),
            Cell::Text(record.reason.clone()),
            Cell::Text(html::time(record.parked_at.as_ref())),
        ];
        if resolved {
            row.push(Cell::Text(format!(
                "{} by {} ({})",
                record.resolution, record.resolved_by, record.resolution_reason
            )));
        } else {
            let action = format!("/console/parked/{}/resolve", url(&record.id));
            let csrf = csrf_field(&session.csrf);
            let id = esc(&record.id);
            row.push(Cell::Html(format!(
                "<form method=\"post\" action=\"{action}\">{csrf}{}{}<button id=\"charge-{id}\">Charge</button></form>\
                 <form method=\"post\" action=\"{action}\">{csrf}{}{}\
                 <input name=\"reason\" id=\"reason-{id}\" required placeholder=\"why\" size=\"16\" maxlength=\"{REASON_BYTES_MAX}\">\
                 <button id=\"write-off-{id}\">Write off</button></form>",
                hidden("op", &operation_key()?),
                hidden("action", "charge"),
                hidden("op", &operation_key()?),
                hidden("action", "write_off"),
            )));
        }
        rows.push(row);
    }
    let body = format!(
        "<h1>Parked usage</h1><p class=\"muted\">Usage a region served that the ledger could not \
         take: charge it (planned again against the account's grants if its own draws no longer \
         apply) or write it off with a reason. <a href=\"/console/parked\">Open</a> · \
         <a href=\"/console/parked?state=resolved\">Resolved</a> (at most {PARKED_LISTED_MAX}).</p>{}",
        table(
            &[
                "id",
                "account",
                "region",
                "key",
                "feature",
                "credits",
                "reason",
                "parked at",
                if resolved { "resolution" } else { "resolve" },
            ],
            &rows,
            "parked"
        )
    );
    Ok(render(&session, "Parked usage", &body))
}

async fn resolve_parked(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    Path(id): Path<String>,
    axum::Form(form): axum::Form<Form>,
) -> Page {
    let session = console.may_change(&headers, &form)?;
    let op = field(&form, "op")?;
    let (action, what) = match field(&form, "action")? {
        "charge" => (pb::ParkedAction::Charge, "Charge"),
        "write_off" => (pb::ParkedAction::WriteOff, "Write off"),
        other => {
            return Err(bad(format!(
                "action: {other:?} is neither charge nor write_off"
            )))
        }
    };
    let why = match action {
        pb::ParkedAction::WriteOff => reason(&form)?,
        _ => optional(&form, "reason").unwrap_or_default(),
    };
    if optional(&form, "confirm") != Some("yes") {
        return Ok(confirm_page(
            &session,
            &format!("/console/parked/{}/resolve", url(&id)),
            "Confirm the parked usage",
            &format!("{what} parked usage {id}. Reason: {why}"),
            &form,
            &["op", "action", "reason"],
            "/console/parked",
        ));
    }
    // The resolution names the key signed in, as a call over gRPC names the caller's key.
    let mut request = Request::new(pb::ResolveParkedUsageRequest {
        idempotency_key: op.to_owned(),
        id: id.clone(),
        action: action.into(),
        reason: memo(why, &session),
    });
    request
        .extensions_mut()
        .insert(tollgate_serve::auth::Caller {
            key_name: key_name(&session).to_owned(),
        });
    let reply = console
        .admin
        .resolve_parked_usage(request)
        .await?
        .into_inner();
    let record = reply.record.unwrap_or_default();
    console
        .record(
            key_name(&session),
            "resolve parked usage",
            &record.account_id,
            format!("{id}: {} ({why})", record.resolution),
        )
        .await;
    let body = format!(
        "<h1>Parked usage {}</h1><p class=\"notice\" id=\"outcome\">{} of {} credits on account \
         {}{}.</p><p><a href=\"/console/parked\">Back to parked usage</a></p>",
        esc(&id),
        esc(&record.resolution),
        esc(&record.cost),
        esc(&record.account_id),
        if reply.replayed {
            " (this form was already sent; nothing moved again)"
        } else {
            ""
        }
    );
    Ok(render(&session, "Parked usage", &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_debit_reads_its_price_from_its_entry_else_from_the_price_book() {
        let entry = |quantity: &str, unit: &str, rate: &str, version| pb::Entry {
            kind: pb::EntryKind::Debit.into(),
            feature: "image".into(),
            price_version: version,
            price_rule: pb::PriceRule::Default.into(),
            quantity: quantity.into(),
            unit: unit.into(),
            rate: rate.into(),
            ..Default::default()
        };
        let versions = [pb::PriceBookVersion {
            version: 2,
            default_rates: Some(pb::RateTable {
                rates: [("image".to_owned(), "0.5".to_owned())].into(),
            }),
            ..Default::default()
        }];
        assert_eq!(
            debit_price(&entry("2", "image", "3", 2), &versions),
            "2 image × 3 credits, price book version 2, default rate"
        );
        assert_eq!(
            debit_price(&entry("", "", "", 2), &versions),
            "price book version 2, default rate: 0.5 credits per unit"
        );
        assert_eq!(
            debit_price(&entry("", "", "", 0), &versions),
            "an explicit cost (no price book)"
        );
    }

    fn record(id: &str, effective_ms: i64, expires_ms: i64) -> tollgate_ledger::GrantRecord {
        let at = |ms| Timestamp::from_millis(ms).unwrap();
        let grant = tollgate_core::Grant::new(
            tollgate_core::GrantId::new(id).unwrap(),
            Credits::from_whole(5).unwrap(),
            tollgate_core::GrantSource::Promo,
            at(effective_ms),
        )
        .with_expiry(at(expires_ms));
        tollgate_ledger::GrantRecord {
            account: AccountId::new("acme").unwrap(),
            grant,
            metadata: Default::default(),
            created_at: at(0),
        }
    }

    #[test]
    fn a_grant_past_its_expiry_is_listed_apart_never_as_expiring() {
        let now = Timestamp::from_millis(10 * DAY_MS).unwrap();
        let listed = [
            record("gone", 0, 10 * DAY_MS - HOUR_MS),
            record("at-now", 0, 10 * DAY_MS),
            record("soon", 0, 12 * DAY_MS),
            record("later", 11 * DAY_MS, 13 * DAY_MS),
        ];
        let html = expiry_sections(&listed, now);
        let (expiring, lapsed) = html.split_once("id=\"expired-awaiting\"").unwrap();
        assert!(expiring.contains(">soon<") && expiring.contains(">later<"));
        assert!(
            expiring.contains("starts 1970-01-12 00:00 UTC"),
            "{expiring}"
        );
        assert!(!expiring.contains(">gone<") && !expiring.contains(">at-now<"));
        assert!(
            lapsed.contains(">gone<") && lapsed.contains(">at-now<"),
            "{lapsed}"
        );
        assert!(
            lapsed.contains("expired 1970-01-10 23:00 UTC, awaiting the expiry run"),
            "{lapsed}"
        );
    }
}
