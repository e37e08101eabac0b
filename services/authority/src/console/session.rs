//! Console sessions: a random id in an HTTP-only, SameSite=Strict cookie, the rest on the
//! server (the key's name and scope, a CSRF token, an expiry). Keys themselves are never kept.

use std::collections::HashMap;
use std::sync::Mutex;

use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const COOKIE: &str = "tollgate_console";
/// A session ends after this long without a request.
pub const SESSION_IDLE_MS: i64 = 30 * 60 * 1_000;
/// A session ends this long after sign-in whatever its use.
pub const SESSION_LIFETIME_MS: i64 = 12 * 60 * 60 * 1_000;
/// Sessions kept at most (signed in or only holding a sign-in form's CSRF token); past it the
/// one closest to expiry is dropped.
pub const SESSIONS_MAX: usize = 10_000;
/// Random bytes in a session id and in a CSRF token.
const TOKEN_BYTES: usize = 32;

/// What a signed-in key may do in the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Everything: an `admin` key.
    Change,
    /// Look only: a `read` key. Every change is refused on the server.
    Read,
}

#[derive(Clone, Debug)]
pub struct Session {
    /// The API key's configured name; `None` before sign-in.
    pub key_name: Option<String>,
    pub access: Option<Access>,
    pub csrf: String,
    idle_until_ms: i64,
    ends_at_ms: i64,
}

#[derive(Default)]
pub struct SessionStore {
    sessions: Mutex<HashMap<String, Session>>,
}

/// Fresh random hex, from the operating system.
pub fn random_hex(bytes: usize) -> Result<String, getrandom::Error> {
    let mut buffer = vec![0_u8; bytes];
    getrandom::fill(&mut buffer)?;
    Ok(hex::encode(buffer))
}

impl SessionStore {
    /// Starts a session (signed in when `key` is given) and returns its id.
    pub fn start(
        &self,
        key: Option<(String, Access)>,
        now_ms: i64,
    ) -> Result<(String, Session), getrandom::Error> {
        let id = random_hex(TOKEN_BYTES)?;
        let (key_name, access) = match key {
            Some((name, access)) => (Some(name), Some(access)),
            None => (None, None),
        };
        let session = Session {
            key_name,
            access,
            csrf: random_hex(TOKEN_BYTES)?,
            idle_until_ms: now_ms.saturating_add(SESSION_IDLE_MS),
            ends_at_ms: now_ms.saturating_add(SESSION_LIFETIME_MS),
        };
        let mut sessions = self.lock();
        if sessions.len() >= SESSIONS_MAX {
            sessions.retain(|_, s| s.live_at(now_ms));
        }
        if sessions.len() >= SESSIONS_MAX {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.idle_until_ms)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(id.clone(), session.clone());
        Ok((id, session))
    }

    /// The live session under `id`, its idle expiry pushed back; an expired one is removed.
    pub fn touch(&self, id: &str, now_ms: i64) -> Option<Session> {
        let mut sessions = self.lock();
        let session = sessions.get_mut(id)?;
        if !session.live_at(now_ms) {
            sessions.remove(id);
            return None;
        }
        session.idle_until_ms = now_ms
            .saturating_add(SESSION_IDLE_MS)
            .min(session.ends_at_ms);
        Some(session.clone())
    }

    pub fn end(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the lock leaves the map consistent (every change is one call).
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Session {
    fn live_at(&self, now_ms: i64) -> bool {
        now_ms < self.idle_until_ms && now_ms < self.ends_at_ms
    }

    /// Whether `presented` is this session's CSRF token, compared in constant time.
    pub fn csrf_matches(&self, presented: &str) -> bool {
        !presented.is_empty() && bool::from(self.csrf.as_bytes().ct_eq(presented.as_bytes()))
    }
}

/// The session id in a `Cookie` header.
pub fn session_id(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|value| {
            value.len() == TOKEN_BYTES * 2 && value.bytes().all(|b| b.is_ascii_hexdigit())
        })
}

/// The `Set-Cookie` value for a session: HTTP-only (no script reads it), SameSite=Strict (no
/// other site's page sends it), scoped to the console's paths.
pub fn cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_LIFETIME_MS / 1_000,
        if secure { "; Secure" } else { "" }
    )
}

pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_when_idle_and_at_their_end() {
        let store = SessionStore::default();
        let (id, session) = store
            .start(Some(("ops".into(), Access::Change)), 0)
            .unwrap();
        assert!(session.csrf_matches(&session.csrf.clone()));
        assert!(!session.csrf_matches("nope"));
        assert!(!session.csrf_matches(""));
        assert!(store.touch(&id, SESSION_IDLE_MS - 1).is_some());
        // Each request pushes the idle expiry back, never past the session's end.
        let mut now = 0;
        while now + SESSION_IDLE_MS / 2 < SESSION_LIFETIME_MS {
            now += SESSION_IDLE_MS / 2;
            assert!(store.touch(&id, now).is_some(), "alive at {now}");
        }
        assert!(store.touch(&id, SESSION_LIFETIME_MS).is_none());
        assert!(store.touch(&id, 0).is_none(), "an expired session is gone");
        let (idle, _) = store.start(None, 0).unwrap();
        assert!(store.touch(&idle, SESSION_IDLE_MS).is_none());
    }

    #[test]
    fn the_cookie_is_http_only_and_strict_and_only_well_formed_ids_are_read() {
        let value = cookie(&"ab".repeat(32), false);
        assert!(value.contains("HttpOnly") && value.contains("SameSite=Strict"));
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            format!("a=b; {COOKIE}={}", "ab".repeat(32))
                .parse()
                .unwrap(),
        );
        assert_eq!(session_id(&headers), Some("ab".repeat(32)));
        headers.insert(
            http::header::COOKIE,
            format!("{COOKIE}=<script>").parse().unwrap(),
        );
        assert_eq!(session_id(&headers), None);
    }
}
