//! The customer-facing balance widget: `/widget?token=…` shows one account's balance, burn
//! rate, what expires next and what an action will cost. It is authorised by a short-lived
//! token for that one account: `<expiry ms>.<hmac hex>.<account id>`, the HMAC-SHA256 of
//! `tollgate-widget-v1|<account>|<expiry ms>` under the console's secret. Tokens are minted by
//! an `admin` key (`POST /widget/tokens` with `authorization: Bearer <key>`, or the console's
//! account page) and cannot be revoked one by one: keep them short (at most a day).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tollgate_core::{AccountId, FeatureKey, PriceBook, PriceQuery, Quantity, Timestamp};
use tollgate_proto::pb;
use tollgate_serve::auth::Scope;

use super::calls::AdminCalls as _;
use super::html::{self, esc};
use super::{harden, Console, Failure, Framing};

type HmacSha256 = Hmac<Sha256>;

/// Lifetime of a token when none is asked for, and the longest one may ask for, in seconds.
pub const TOKEN_TTL_S_DEFAULT: u64 = 15 * 60;
pub const TOKEN_TTL_S_MAX: u64 = 24 * 60 * 60;
/// Shortest secret accepted for signing tokens, in bytes.
pub const SECRET_BYTES_MIN: usize = 32;
/// Longest token accepted, in bytes (an account id is at most 128).
const TOKEN_LEN_MAX: usize = 256;
const DAY_MS: i64 = 24 * 60 * 60 * 1_000;
/// The window the burn rate is measured over.
const BURN_WINDOW_DAYS: i64 = 7;

pub struct TokenKey {
    secret: Vec<u8>,
}

impl TokenKey {
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut secret = vec![0_u8; SECRET_BYTES_MIN];
        getrandom::fill(&mut secret)?;
        Ok(TokenKey { secret })
    }

    pub fn from_secret(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < SECRET_BYTES_MIN {
            return Err(format!(
                "widget secret: {} bytes, at least {SECRET_BYTES_MIN}",
                secret.len()
            ));
        }
        Ok(TokenKey {
            secret: secret.to_vec(),
        })
    }

    fn mac(&self, account: &str, expires_ms: i64) -> HmacSha256 {
        // HMAC takes a key of any length, so this never fails.
        let mut mac = HmacSha256::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("hmac accepts every key length"));
        mac.update(format!("tollgate-widget-v1|{account}|{expires_ms}").as_bytes());
        mac
    }

    pub fn mint(&self, account: &AccountId, expires_ms: i64) -> String {
        let signature = hex::encode(
            self.mac(account.as_str(), expires_ms)
                .finalize()
                .into_bytes(),
        );
        format!("{expires_ms}.{signature}.{account}")
    }

    /// The account a token is for, if it is well formed, signed by this key and not expired.
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<AccountId, String> {
        if token.len() > TOKEN_LEN_MAX {
            return Err("token: too long".into());
        }
        let mut parts = token.splitn(3, '.');
        let (Some(expires), Some(signature), Some(account)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err("token: malformed".into());
        };
        let expires_ms: i64 = expires
            .parse()
            .map_err(|_| "token: malformed expiry".to_string())?;
        let signature = hex::decode(signature).map_err(|_| "token: malformed signature")?;
        self.mac(account, expires_ms)
            .verify_slice(&signature)
            .map_err(|_| "token: bad signature".to_string())?;
        if expires_ms <= now_ms {
            return Err("token: expired; ask for a new one".into());
        }
        AccountId::new(account).map_err(|e| format!("token: account: {e}"))
    }
}

pub(super) fn routes() -> axum::Router<Arc<Console>> {
    axum::Router::new()
        .route("/widget", get(widget_page))
        .route("/widget.js", get(widget_script))
        .route("/widget/tokens", post(mint_token))
}

impl Console {
    /// A token for `account` valid `ttl_s` seconds (default 15 minutes, at most a day).
    pub fn mint_widget_token(
        &self,
        account: &str,
        ttl_s: Option<u64>,
    ) -> Result<(String, i64), Failure> {
        let bad = |message: String| Failure::Page(StatusCode::BAD_REQUEST, message);
        let account = AccountId::new(account).map_err(|e| bad(format!("account_id: {e}")))?;
        let ttl_s = ttl_s.unwrap_or(TOKEN_TTL_S_DEFAULT);
        if ttl_s == 0 || ttl_s > TOKEN_TTL_S_MAX {
            return Err(bad(format!(
                "ttl_seconds: {ttl_s}, must be 1 to {TOKEN_TTL_S_MAX}"
            )));
        }
        let expires_ms = self.now_ms().saturating_add(ttl_s as i64 * 1_000);
        Ok((self.widget.mint(&account, expires_ms), expires_ms))
    }
}

#[derive(serde::Deserialize)]
struct MintRequest {
    account_id: String,
    ttl_seconds: Option<u64>,
}

/// `POST /widget/tokens` with an admin key: `{"account_id": "acme", "ttl_seconds": 600}` →
/// `{"token": …, "path": "/widget?token=…", "expires_at_ms": …}`.
async fn mint_token(
    State(console): State<Arc<Console>>,
    headers: http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let json_error = |status: StatusCode, message: String| {
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    };
    let header = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.as_bytes());
    if let Err(error) = console
        .keys
        .check(header, "/tollgate.v1.Admin/MintWidgetToken")
    {
        let status = if error.code == tollgate_proto::ErrorCode::Unauthenticated {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::FORBIDDEN
        };
        return json_error(status, error.message.clone());
    }
    debug_assert_eq!(
        tollgate_serve::auth::required_scope("/tollgate.v1.Admin/MintWidgetToken"),
        Scope::Admin
    );
    let request: MintRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    match console.mint_widget_token(&request.account_id, request.ttl_seconds) {
        Ok((token, expires_ms)) => Json(serde_json::json!({
            "token": token,
            "path": format!("/widget?token={}", html::url(&token)),
            "expires_at_ms": expires_ms,
        }))
        .into_response(),
        Err(Failure::Page(status, message)) => json_error(status, message),
        Err(Failure::SignIn) => json_error(StatusCode::UNAUTHORIZED, "sign in".into()),
    }
}

/// A few lines that put the widget in an iframe where the script tag is:
/// `<script src="https://authority/widget.js" data-token="…"></script>`.
async fn widget_script() -> Response {
    const SCRIPT: &str = "(function(){var s=document.currentScript;if(!s)return;\
var f=document.createElement('iframe');\
f.src=new URL('/widget?token='+encodeURIComponent(s.dataset.token||''),s.src).href;\
f.title='Credit balance';f.style.border='0';f.width=s.dataset.width||'360';\
f.height=s.dataset.height||'420';s.parentNode.insertBefore(f,s.nextSibling);})();\n";
    let mut response = SCRIPT.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    response
}

#[derive(serde::Deserialize)]
struct WidgetQuery {
    #[serde(default)]
    token: String,
    feature: Option<String>,
    quantity: Option<String>,
}

async fn widget_page(
    State(console): State<Arc<Console>>,
    Query(query): Query<WidgetQuery>,
) -> Response {
    let now_ms = console.now_ms();
    let body = match console.widget.verify(&query.token, now_ms) {
        Err(message) => Err(Failure::Page(StatusCode::UNAUTHORIZED, message)),
        Ok(account) => widget_body(&console, &account, &query, now_ms).await,
    };
    let (status, body) = match body {
        Ok(body) => (StatusCode::OK, body),
        Err(Failure::Page(status, message)) => (
            status,
            format!("<p class=\"error\" id=\"failure\">{}</p>", esc(&message)),
        ),
        Err(Failure::SignIn) => (StatusCode::UNAUTHORIZED, String::new()),
    };
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Credits</title>\
         <style>body{{font:14px/1.4 system-ui,sans-serif;margin:0;padding:12px;color:#1d2330}}\
         .big{{font-size:2em;font-weight:600}}.muted{{color:#667085}}dt{{color:#667085;margin-top:.5em}}\
         dd{{margin:0}}.error{{color:#9c2b2b}}input,select,button{{font:inherit}}</style></head>\
         <body>{body}</body></html>"
    );
    let mut response = (status, axum::response::Html(page)).into_response();
    harden(response.headers_mut(), Framing::Anyone);
    response
}

async fn widget_body(
    console: &Console,
    account: &AccountId,
    query: &WidgetQuery,
    now_ms: i64,
) -> Result<String, Failure> {
    // The account's balance, told as the console's account page tells it (and as edges do).
    let told = console.account_balance(account).await?;
    let burn = burn_per_day(console, account, now_ms).await;
    let next = next_expiring(console, account, now_ms).await?;
    let mut out = format!(
        "<div class=\"muted\">Credits of <b>{}</b></div><div class=\"big\" id=\"widget-balance\">{}</div>",
        esc(account.as_str()),
        told.balance
    );
    if told.debt.is_positive() {
        let _ = write!(out, "<div class=\"error\">owed: {}</div>", told.debt);
    }
    out.push_str("<dl>");
    if told.held.is_positive() {
        let _ = write!(
            out,
            "<dt>Set aside for actions in progress</dt><dd id=\"widget-held\">{} (not in the balance)</dd>",
            told.held
        );
    }
    if let Some(first) = told.upcoming.first() {
        let _ = write!(
            out,
            "<dt>Starts later</dt><dd id=\"widget-upcoming\">{} credits, starts {} (not in the balance yet)</dd>",
            first.remaining,
            esc(&html::millis(first.at.millis()))
        );
    }
    let _ = write!(
        out,
        "<dt>Burn rate</dt><dd id=\"widget-burn\">{}</dd>",
        esc(&burn)
    );
    let _ = write!(
        out,
        "<dt>Expires next</dt><dd id=\"widget-expiry\">{}</dd>",
        next
    );
    out.push_str("</dl>");
    out.push_str(&quote_section(console, account, query, now_ms).await);
    let _ = write!(
        out,
        "<p class=\"muted\">as of {}</p>",
        esc(&html::millis(now_ms))
    );
    Ok(out)
}

/// Credits burned per day over the last week, from the usage report.
async fn burn_per_day(console: &Console, account: &AccountId, now_ms: i64) -> String {
    let from = now_ms - BURN_WINDOW_DAYS * DAY_MS;
    let request = pb::GetUsageBreakdownRequest {
        account_id: account.to_string(),
        from: Some(tollgate_proto::decode::timestamp_to_pb(
            Timestamp::from_millis(from).unwrap_or(Timestamp::EPOCH),
        )),
        until: Some(tollgate_proto::decode::timestamp_to_pb(
            Timestamp::from_millis(now_ms).unwrap_or(Timestamp::EPOCH),
        )),
        bucket: pb::Bucket::Day.into(),
        group_by: Vec::new(),
    };
    match console.admin.call_usage(request).await {
        Ok(reply) => {
            let mut total = rust_decimal::Decimal::ZERO;
            for row in &reply.rows {
                total += row
                    .credits
                    .parse::<rust_decimal::Decimal>()
                    .unwrap_or_default();
            }
            let per_day = (total / rust_decimal::Decimal::from(BURN_WINDOW_DAYS)).round_dp(2);
            format!("{per_day} credits a day (last {BURN_WINDOW_DAYS} days: {total})")
        }
        Err(status) => format!("not available: {}", status.message()),
    }
}

/// The open grant in the balance (effective now, credits left) that expires soonest, as
/// markup. A grant not effective yet is not in the balance, so its expiry is not news here.
async fn next_expiring(
    console: &Console,
    account: &AccountId,
    now_ms: i64,
) -> Result<String, Failure> {
    let grants = console.admin.call_grants(account.as_str(), true).await?;
    let millis = |at: &prost_types::Timestamp| at.seconds * 1_000 + i64::from(at.nanos) / 1_000_000;
    let next = grants
        .iter()
        .filter(|g| g.remaining != "0")
        .filter(|g| {
            g.effective_at
                .as_ref()
                .is_none_or(|at| millis(at) <= now_ms)
        })
        .filter_map(|g| g.expires_at.map(|at| (at, g)))
        .filter(|(at, _)| millis(at) > now_ms)
        .min_by_key(|(at, _)| (at.seconds, at.nanos));
    Ok(match next {
        Some((at, grant)) => format!(
            "{} credits on {}",
            esc(&grant.remaining),
            esc(&html::time(Some(&at)))
        ),
        None => "nothing expires".into(),
    })
}

/// The quote form, and the cost of what it asks for: the price book resolved for this account
/// (its plan, its contract in force, the first region) exactly as an edge resolves it.
async fn quote_section(
    console: &Console,
    account: &AccountId,
    query: &WidgetQuery,
    now_ms: i64,
) -> String {
    let Some(lifecycle) = &console.lifecycle else {
        return "<p class=\"muted\">Prices are not served by this authority.</p>".into();
    };
    let versions = match lifecycle.price_versions().await {
        Ok(versions) => versions,
        Err(error) => return format!("<p class=\"error\">prices: {}</p>", esc(&error.to_string())),
    };
    let book = PriceBook::new(versions);
    let now = Timestamp::from_millis(now_ms).unwrap_or(Timestamp::EPOCH);
    let snapshot = match console.ledger.account(account).await {
        Ok(snapshot) => snapshot,
        Err(error) => return format!("<p class=\"error\">{}</p>", esc(&error.to_string())),
    };
    let features: BTreeMap<String, ()> = book
        .version_for(snapshot.created_at, now)
        .map(|v| {
            v.default
                .keys()
                .chain(v.plans.values().flat_map(|r| r.keys()))
                .chain(v.regions.values().flat_map(|r| r.keys()))
                .map(|f| (f.to_string(), ()))
                .collect()
        })
        .unwrap_or_default();
    let chosen = query.feature.clone().unwrap_or_default();
    let quantity = query.quantity.clone().unwrap_or_else(|| "1".into());
    let mut out = format!(
        "<form method=\"get\" action=\"/widget\"><input type=\"hidden\" name=\"token\" value=\"{}\">\
         <label>What will it cost? <select name=\"feature\" id=\"widget-feature\">",
        esc(&query.token)
    );
    for feature in features.keys() {
        let _ = write!(
            out,
            "<option{}>{}</option>",
            if *feature == chosen { " selected" } else { "" },
            esc(feature)
        );
    }
    let _ = write!(
        out,
        "</select></label> × <input name=\"quantity\" id=\"widget-quantity\" size=\"6\" value=\"{}\"> \
         <button id=\"widget-quote\">Quote</button></form>",
        esc(&quantity)
    );
    if chosen.is_empty() {
        return out;
    }
    let answer = quote(
        console, lifecycle, &book, &snapshot, &chosen, &quantity, now,
    )
    .await;
    match answer {
        Ok(text) => {
            let _ = write!(out, "<p id=\"widget-cost\">{}</p>", esc(&text));
        }
        Err(text) => {
            let _ = write!(
                out,
                "<p class=\"error\" id=\"widget-cost\">{}</p>",
                esc(&text)
            );
        }
    }
    out
}

async fn quote(
    console: &Console,
    lifecycle: &Arc<dyn crate::lifecycle::Lifecycle>,
    book: &PriceBook,
    snapshot: &tollgate_ledger::AccountSnapshot,
    feature: &str,
    quantity: &str,
    now: Timestamp,
) -> Result<String, String> {
    let feature_key = FeatureKey::new(feature).map_err(|e| format!("feature: {e}"))?;
    let amount = Quantity::parse(quantity).map_err(|e| format!("quantity: {e}"))?;
    let settings = lifecycle
        .account_settings(snapshot.account.clone())
        .await
        .map_err(|e| e.to_string())?;
    let contracts = lifecycle
        .contracts(snapshot.account.clone())
        .await
        .map_err(|e| e.to_string())?;
    let region = console
        .regions
        .first()
        .ok_or_else(|| "no region is configured to price in".to_string())?;
    let resolved = book
        .resolve(&PriceQuery {
            account_created_at: snapshot.created_at,
            plan: settings.plan.as_ref(),
            region,
            feature: &feature_key,
            at: now,
            contract: contracts.iter().find(|c| c.is_active_at(now)),
        })
        .map_err(|e| e.to_string())?;
    let cost = resolved
        .cost(amount)
        .map_err(|e| format!("quantity: {e}"))?;
    Ok(format!(
        "{quantity} × {feature} costs {cost} credits ({} per unit, price book version {}, {} rate)",
        resolved.rate,
        resolved.version,
        html::price_rule(tollgate_proto::decode::price_rule_to_pb(resolved.rule).into())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_one_account_and_expire() {
        let key = TokenKey::from_secret(&[7; 32]).unwrap();
        let account = AccountId::new("acme.eu:1").unwrap();
        let token = key.mint(&account, 1_000);
        assert_eq!(key.verify(&token, 999).unwrap(), account);
        assert!(key.verify(&token, 1_000).unwrap_err().contains("expired"));
        // Another account, another expiry or another key: the signature no longer matches.
        let forged = token.replace("acme.eu:1", "other");
        assert!(key.verify(&forged, 0).unwrap_err().contains("signature"));
        let later = token.replacen("1000", "9000", 1);
        assert!(key.verify(&later, 0).unwrap_err().contains("signature"));
        let other = TokenKey::from_secret(&[8; 32]).unwrap();
        assert!(other.verify(&token, 0).is_err());
        assert!(key.verify("nonsense", 0).is_err());
        assert!(TokenKey::from_secret(&[1; 31]).is_err());
    }
}
