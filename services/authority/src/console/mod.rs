//! The admin console and the customer balance widget, served on the authority's HTTP listener.
//!
//! The console is for people: sign in with an `admin` or `read` API key, find an account, read
//! its balance, grants, ledger and usage, explain a debit, refund and adjust with a reason and
//! a confirmation step, change its plan, edit and publish the price book, read the revenue
//! report. Pages are rendered on the server from the same code the Admin API runs: every read
//! and change goes through [`AdminService`] (or the ledger and lifecycle it wraps), never a
//! second copy of a rule. A `read` key's changes are refused here, on the server.
//!
//! The widget (`/widget`) is a small page for an account's own users, authorised by a
//! short-lived HMAC-signed token for that one account (see [`widget`]).

mod balance;
mod calls;
pub mod chart;
pub mod html;
mod pages;
mod prices;
pub mod session;
pub mod widget;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use tollgate_core::RegionId;
use tollgate_ledger::LedgerStore;
use tollgate_serve::auth::{KeyRing, Scope};

use crate::admin::{AdminService, Clock};
use crate::lifecycle::Lifecycle;
use session::{Access, Session, SessionStore};

/// Console changes remembered for the "Changes" page; older ones are only in the logs.
pub const CHANGES_KEPT_MAX: usize = 1_000;
/// Largest form body accepted, in bytes (a price book version fits easily).
pub const FORM_BYTES_MAX: usize = 512 * 1024;

/// One change made in the console, with the key that made it.
#[derive(Clone, Debug)]
pub struct ChangeRecord {
    pub at_ms: i64,
    pub key_name: String,
    pub action: &'static str,
    pub account: String,
    pub detail: String,
}

pub struct Console {
    admin: AdminService,
    ledger: Arc<dyn LedgerStore>,
    lifecycle: Option<Arc<dyn Lifecycle>>,
    clock: Arc<dyn Clock>,
    keys: Arc<KeyRing>,
    sessions: SessionStore,
    widget: widget::TokenKey,
    regions: Vec<RegionId>,
    changes: Mutex<VecDeque<ChangeRecord>>,
    secure_cookies: bool,
}

impl Console {
    /// `admin` is built like the gRPC service's (same ledger, clock, lifecycle and change
    /// channel); `regions` are the authority's, the first one prices the widget's quotes.
    pub fn new(
        admin: AdminService,
        ledger: Arc<dyn LedgerStore>,
        lifecycle: Option<Arc<dyn Lifecycle>>,
        clock: Arc<dyn Clock>,
        keys: Arc<KeyRing>,
        regions: Vec<RegionId>,
    ) -> Result<Self, getrandom::Error> {
        Ok(Console {
            admin,
            ledger,
            lifecycle,
            clock,
            keys,
            sessions: SessionStore::default(),
            widget: widget::TokenKey::random()?,
            regions,
            changes: Mutex::new(VecDeque::new()),
            secure_cookies: false,
        })
    }

    /// Signs widget tokens with this secret (at least 32 bytes) instead of a random one, so
    /// tokens outlive a restart and several authority processes accept each other's.
    pub fn with_widget_secret(mut self, secret: &[u8]) -> Result<Self, String> {
        self.widget = widget::TokenKey::from_secret(secret)?;
        Ok(self)
    }

    /// Marks the session cookie `Secure` (set when TLS is terminated in front of the node).
    pub fn with_secure_cookies(mut self, secure: bool) -> Self {
        self.secure_cookies = secure;
        self
    }

    /// `/console/…` and `/widget…`, to merge into the HTTP listener's router.
    pub fn router(self: Arc<Self>) -> axum::Router {
        pages::routes()
            .merge(widget::routes())
            .layer(axum::extract::DefaultBodyLimit::max(FORM_BYTES_MAX))
            .with_state(self)
    }

    fn now_ms(&self) -> i64 {
        self.clock.now().millis()
    }

    /// The signed-in session of a request, or a redirect to the sign-in page.
    fn signed_in(&self, headers: &http::HeaderMap) -> Result<(String, Session), Failure> {
        let id = session::session_id(headers).ok_or(Failure::SignIn)?;
        let session = self
            .sessions
            .touch(&id, self.now_ms())
            .ok_or(Failure::SignIn)?;
        if session.key_name.is_none() {
            return Err(Failure::SignIn);
        }
        Ok((id, session))
    }

    /// A signed-in session allowed to change things, after its CSRF token is checked.
    fn may_change(
        &self,
        headers: &http::HeaderMap,
        form: &pages::Form,
    ) -> Result<Session, Failure> {
        let (_, session) = self.signed_in(headers)?;
        check_csrf(&session, form)?;
        if session.access != Some(Access::Change) {
            return Err(Failure::Page(
                StatusCode::FORBIDDEN,
                format!(
                    "refused: key {:?} has the read scope; it may look at everything and change \
                     nothing",
                    session.key_name.as_deref().unwrap_or_default()
                ),
            ));
        }
        Ok(session)
    }

    /// What a key given at sign-in may do: `admin` changes, `read` looks; `enforce` alone is
    /// refused (it never reaches admin data).
    fn access_of(&self, key: &str) -> Option<(String, Access)> {
        let (name, scopes) = self.keys.identify_key(key)?;
        if scopes.contains(&Scope::Admin) {
            Some((name, Access::Change))
        } else if scopes.contains(&Scope::Read) {
            Some((name, Access::Read))
        } else {
            None
        }
    }

    /// Records a change with the key that made it: logged, and kept for the Changes page.
    /// Records a change: in the authority's audit table (method `console:<action>`) when the
    /// authority runs, in the log, and in the recent list the Changes page shows.
    async fn record(&self, key_name: &str, action: &'static str, account: &str, detail: String) {
        if let Some(lifecycle) = &self.lifecycle {
            let entry = tollgate_authority::state::AuditEntry {
                key_name: key_name.to_owned(),
                method: format!("console:{action}"),
                account_id: account.to_owned(),
                idempotency_key: String::new(),
                outcome: "done".to_owned(),
            };
            if let Err(error) = lifecycle.record_change(entry).await {
                tracing::warn!(%error, key = key_name, action, "the audit table missed a console change");
            }
        }
        tracing::info!(
            target: "tollgate::console::changes",
            key = key_name,
            action,
            account,
            detail = detail.as_str(),
            "console change"
        );
        let mut changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        if changes.len() >= CHANGES_KEPT_MAX {
            changes.pop_front();
        }
        changes.push_back(ChangeRecord {
            at_ms: self.now_ms(),
            key_name: key_name.to_owned(),
            action,
            account: account.to_owned(),
            detail,
        });
    }

    fn recent_changes(&self) -> Vec<ChangeRecord> {
        let changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        changes.iter().rev().cloned().collect()
    }
}

fn check_csrf(session: &Session, form: &pages::Form) -> Result<(), Failure> {
    let presented = form.get("csrf").map(String::as_str).unwrap_or_default();
    if session.csrf_matches(presented) {
        Ok(())
    } else {
        Err(Failure::Page(
            StatusCode::FORBIDDEN,
            "csrf: the form's token does not match this session; reload the page and try again"
                .into(),
        ))
    }
}

/// Why a console request did not produce its page.
#[derive(Debug)]
pub enum Failure {
    /// Not signed in (or the session expired): go to the sign-in page.
    SignIn,
    /// A page saying what went wrong, with its status.
    Page(StatusCode, String),
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        let code = match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::AlreadyExists | tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            tonic::Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure::Page(code, status.message().to_owned())
    }
}

impl From<tollgate_ledger::LedgerError> for Failure {
    fn from(error: tollgate_ledger::LedgerError) -> Self {
        Failure::from(crate::encode::ledger_error(error))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        match self {
            Failure::SignIn => Redirect::to("/console/login").into_response(),
            Failure::Page(status, message) => {
                let body = format!(
                    "<h1>{}</h1><p class=\"error\" id=\"failure\">{}</p>\
                     <p><a href=\"javascript:history.back()\">Back</a> · <a href=\"/console\">Home</a></p>",
                    html::esc(status.canonical_reason().unwrap_or("Error")),
                    html::esc(&message)
                );
                let mut response =
                    (status, html_page(html::page("Error", None, &body))).into_response();
                harden(response.headers_mut(), Framing::Deny);
                response
            }
        }
    }
}

/// Whether other sites may put the page in a frame.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Deny,
    /// The widget is made to be embedded.
    Anyone,
}

fn html_page(body: String) -> axum::response::Html<String> {
    axum::response::Html(body)
}

/// Headers every console and widget page carries: nothing cached, no script at all, forms
/// post only here, no referrer (widget URLs carry a token), framing as the page needs.
fn harden(headers: &mut http::HeaderMap, framing: Framing) {
    let ancestors = match framing {
        Framing::Deny => "'none'",
        Framing::Anyone => "*",
    };
    let policy = format!(
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; \
         form-action 'self'; base-uri 'none'; frame-ancestors {ancestors}"
    );
    if let Ok(value) = HeaderValue::from_str(&policy) {
        headers.insert(header::CONTENT_SECURITY_POLICY, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if framing == Framing::Deny {
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
}

/// A console page with its headers.
fn respond(body: String) -> Response {
    let mut response = html_page(body).into_response();
    harden(response.headers_mut(), Framing::Deny);
    response
}
