//! The edge's configuration: one TOML file, `TOLLGATE_*` environment overrides, durations in
//! human form, and `validate()` that names the offending key. With no file at all it runs the
//! embedded default: region `local`, the in-memory regional store, 127.0.0.1:50061.
//!
//! ```toml
//! region = "eu-west-1"                  # TOLLGATE_REGION
//! node_id = "edge-eu-1"                 # TOLLGATE_NODE_ID; default: host, process, start time
//! listen = "127.0.0.1:50061"            # TOLLGATE_LISTEN
//! http_listen = "127.0.0.1:9091"        # TOLLGATE_HTTP_LISTEN (/metrics)
//! redis_url = "redis://127.0.0.1:6379/" # TOLLGATE_REDIS_URL; unset: in-memory regional store
//! key_prefix = "tg"                     # TOLLGATE_KEY_PREFIX
//! authority_url = "http://127.0.0.1:50051"  # TOLLGATE_AUTHORITY_URL; unset: no cold path
//! authority_api_key = "…"               # TOLLGATE_AUTHORITY_API_KEY
//!
//! [tls]                                 # TLS on the gRPC listener; unset: plain text
//! cert = "/etc/tollgate/edge.pem"       # certificate chain, PEM
//! key = "/etc/tollgate/edge.key"        # its private key, PEM
//! client_ca = "/etc/tollgate/gw-ca.pem" # optional: callers must present a certificate
//!                                       # signed by this CA (mutual TLS)
//!
//! [authority_tls]                       # for an https:// authority_url
//! ca = "/etc/tollgate/ca.pem"           # the CA the authority's certificate is checked against
//! cert = "/etc/tollgate/edge-client.pem" # the edge's certificate, when the authority asks
//! key = "/etc/tollgate/edge-client.key"
//!
//! [limits]
//! store_timeout = "250ms"               # one call on the regional store
//! request_timeout = "2s"                # one gRPC call
//! in_flight_max = 4096                  # calls in flight; more are shed
//! reverse_window = "5m"
//! unknown_account_ttl = "5s"
//!
//! [cached]
//! flush_interval = "10ms"               # at most 20ms
//! lease_credits = "100"
//! lease_ttl = "60s"
//! lease_idle = "15s"
//! recall_wait = "50ms"
//! lease_safety = "2s"                   # no cached decision this close to the lease's expiry
//! pending_max = 200000                  # unflushed decisions per edge; more go strict
//! pending_account_max = 10000           # the same, per account
//!
//! [[api_keys]]
//! name = "checkout"
//! sha256 = "…64 hex digits…"
//! scope = "enforce"
//! ```
//! `TOLLGATE_ENFORCE_API_KEY` adds one `enforce` key (given in clear, kept hashed).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use tollgate_core::{Credits, RegionId};
use tollgate_edge::server::ServeLimits;
use tollgate_edge::settings::FLUSH_INTERVAL_MS_MAX;
use tollgate_edge::EdgeSettings;
use tollgate_serve::auth::{ApiKeyConfig, KeyRing, Scope};
use tollgate_serve::tls::{ClientTlsFiles, ServerTlsFiles};
use tonic::transport::{ClientTlsConfig, ServerTlsConfig};

pub const LISTEN_DEFAULT: &str = "127.0.0.1:50061";
pub const HTTP_LISTEN_DEFAULT: &str = "127.0.0.1:9091";
pub const REGION_DEFAULT: &str = "local";
pub const KEY_PREFIX_DEFAULT: &str = "tg";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub region: Option<String>,
    pub node_id: Option<String>,
    pub listen: Option<String>,
    pub http_listen: Option<String>,
    pub redis_url: Option<String>,
    pub key_prefix: Option<String>,
    pub authority_url: Option<String>,
    pub authority_api_key: Option<String>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub cached: RawCached,
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    pub tls: Option<ServerTlsFiles>,
    pub authority_tls: Option<ClientTlsFiles>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub store_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub in_flight_max: Option<usize>,
    pub reverse_window: Option<String>,
    pub unknown_account_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCached {
    pub flush_interval: Option<String>,
    pub lease_credits: Option<String>,
    pub lease_ttl: Option<String>,
    pub lease_idle: Option<String>,
    pub recall_wait: Option<String>,
    pub lease_safety: Option<String>,
    pub pending_max: Option<usize>,
    pub pending_account_max: Option<usize>,
}

#[derive(Debug)]
pub struct Config {
    pub settings: EdgeSettings,
    pub listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub redis_url: Option<String>,
    pub key_prefix: String,
    pub authority_url: Option<String>,
    pub authority_api_key: Option<String>,
    pub limits: ServeLimits,
    pub keys: KeyRing,
    /// `None`: the gRPC listener speaks plain text.
    pub tls: Option<ServerTlsConfig>,
    /// Set for an `https://` authority URL.
    pub authority_tls: Option<ClientTlsConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: &str, problem: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        problem: problem.to_string(),
    }
}

impl RawConfig {
    /// Reads `path` (none: the embedded default), then applies `TOLLGATE_*` overrides.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<RawConfig, ConfigError> {
        let mut raw = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.display().to_string(),
                    source,
                })?
            }
            None => RawConfig::default(),
        };
        let overrides: [(&str, &mut Option<String>); 8] = [
            ("TOLLGATE_REGION", &mut raw.region),
            ("TOLLGATE_NODE_ID", &mut raw.node_id),
            ("TOLLGATE_LISTEN", &mut raw.listen),
            ("TOLLGATE_HTTP_LISTEN", &mut raw.http_listen),
            ("TOLLGATE_REDIS_URL", &mut raw.redis_url),
            ("TOLLGATE_KEY_PREFIX", &mut raw.key_prefix),
            ("TOLLGATE_AUTHORITY_URL", &mut raw.authority_url),
            ("TOLLGATE_AUTHORITY_API_KEY", &mut raw.authority_api_key),
        ];
        for (name, slot) in overrides {
            if let Some(value) = env(name) {
                *slot = Some(value);
            }
        }
        if let Some(key) = env("TOLLGATE_ENFORCE_API_KEY") {
            raw.api_keys
                .push(ApiKeyConfig::from_clear("env", &key, Scope::Enforce));
        }
        Ok(raw)
    }

    pub fn validate(self) -> Result<Config, ConfigError> {
        let region = RegionId::new(self.region.as_deref().unwrap_or(REGION_DEFAULT))
            .map_err(|e| invalid("region", e))?;
        let mut settings = EdgeSettings::new(region);
        settings.node_id = self.node_id;
        let address =
            |key: &str, value: Option<&str>, default: &str| -> Result<SocketAddr, ConfigError> {
                value
                    .unwrap_or(default)
                    .parse()
                    .map_err(|e| invalid(key, e))
            };
        let listen = address("listen", self.listen.as_deref(), LISTEN_DEFAULT)?;
        let http_listen = address(
            "http_listen",
            self.http_listen.as_deref(),
            HTTP_LISTEN_DEFAULT,
        )?;
        if let Some(url) = &self.redis_url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(
                    "redis_url",
                    "must start with redis:// or rediss://",
                ));
            }
        }
        let key_prefix = self.key_prefix.unwrap_or_else(|| KEY_PREFIX_DEFAULT.into());
        if key_prefix.is_empty() || key_prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                "key_prefix",
                "must be non-empty, without braces or spaces",
            ));
        }
        if let Some(url) = &self.authority_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    "authority_url",
                    "must start with http:// or https://",
                ));
            }
        }
        let tls = self
            .tls
            .map(|files| files.load("tls"))
            .transpose()
            .map_err(|e| invalid(&e.key, e.problem))?;
        let authority_tls = authority_tls(self.authority_url.as_deref(), self.authority_tls)?;
        let mut limits = ServeLimits::default();
        apply_limits(&self.limits, &mut settings, &mut limits)?;
        apply_cached(&self.cached, &mut settings)?;
        let keys = KeyRing::from_config(&self.api_keys).map_err(|problem| {
            let (key, problem) = problem
                .split_once(": ")
                .unwrap_or(("api_keys", problem.as_str()));
            invalid(key, problem)
        })?;
        Ok(Config {
            settings,
            listen,
            http_listen,
            redis_url: self.redis_url,
            key_prefix,
            authority_url: self.authority_url,
            authority_api_key: self.authority_api_key,
            limits,
            keys,
            tls,
            authority_tls,
        })
    }
}

/// The cold path's TLS: required for an `https://` authority, refused for a plain one.
fn authority_tls(
    url: Option<&str>,
    files: Option<ClientTlsFiles>,
) -> Result<Option<ClientTlsConfig>, ConfigError> {
    let https = url.is_some_and(|url| url.starts_with("https://"));
    match files.filter(|files| !files.is_empty()) {
        Some(files) if https => Ok(Some(
            files
                .load("authority_tls")
                .map_err(|e| invalid(&e.key, e.problem))?,
        )),
        Some(_) => Err(invalid(
            "authority_tls",
            "set, but authority_url is not https://",
        )),
        None if https => Err(invalid(
            "authority_tls.ca",
            "an https:// authority_url needs the CA certificate to trust",
        )),
        None => Ok(None),
    }
}

fn duration_ms(
    key: &str,
    text: &Option<String>,
    min_ms: u64,
    max_ms: u64,
) -> Result<Option<u64>, ConfigError> {
    let Some(text) = text else { return Ok(None) };
    let duration: Duration = humantime::parse_duration(text).map_err(|e| invalid(key, e))?;
    let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if !(min_ms..=max_ms).contains(&ms) {
        return Err(invalid(
            key,
            format!("{text} is outside {min_ms} ms to {max_ms} ms"),
        ));
    }
    Ok(Some(ms))
}

fn signed(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn apply_limits(
    raw: &RawLimits,
    settings: &mut EdgeSettings,
    limits: &mut ServeLimits,
) -> Result<(), ConfigError> {
    if let Some(ms) = duration_ms("limits.store_timeout", &raw.store_timeout, 1, 60_000)? {
        settings.store_timeout_ms = ms;
    }
    if let Some(ms) = duration_ms("limits.request_timeout", &raw.request_timeout, 1, 600_000)? {
        limits.request_timeout_ms = ms;
    }
    if let Some(max) = raw.in_flight_max {
        if !(1..=1_000_000).contains(&max) {
            return Err(invalid("limits.in_flight_max", "must be 1..=1000000"));
        }
        limits.in_flight_max = max;
    }
    if let Some(ms) = duration_ms(
        "limits.reverse_window",
        &raw.reverse_window,
        0,
        24 * 3_600_000,
    )? {
        settings.reverse_window_ms = signed(ms);
    }
    if let Some(ms) = duration_ms(
        "limits.unknown_account_ttl",
        &raw.unknown_account_ttl,
        0,
        3_600_000,
    )? {
        settings.unknown_account_ttl_ms = signed(ms);
    }
    Ok(())
}

fn apply_cached(raw: &RawCached, settings: &mut EdgeSettings) -> Result<(), ConfigError> {
    if let Some(ms) = duration_ms(
        "cached.flush_interval",
        &raw.flush_interval,
        1,
        FLUSH_INTERVAL_MS_MAX,
    )? {
        settings.flush_interval_ms = ms;
    }
    if let Some(text) = &raw.lease_credits {
        settings.lease_credits =
            Credits::parse_positive(text).map_err(|e| invalid("cached.lease_credits", e))?;
    }
    if let Some(ms) = duration_ms("cached.lease_ttl", &raw.lease_ttl, 1_000, 3_600_000)? {
        settings.lease_ttl_ms = signed(ms);
    }
    if let Some(ms) = duration_ms("cached.lease_idle", &raw.lease_idle, 1_000, 3_600_000)? {
        settings.lease_idle_ms = signed(ms);
    }
    if let Some(ms) = duration_ms("cached.recall_wait", &raw.recall_wait, 0, 1_000)? {
        settings.recall_wait_ms = ms;
    }
    if let Some(ms) = duration_ms("cached.lease_safety", &raw.lease_safety, 0, 1_800_000)? {
        settings.lease_safety_ms = signed(ms);
    }
    if let Some(max) = raw.pending_max {
        if !(1..=1_000_000).contains(&max) {
            return Err(invalid("cached.pending_max", "must be 1..=1000000"));
        }
        settings.pending_entries_max = max;
    }
    if let Some(max) = raw.pending_account_max {
        if !(1..=1_000_000).contains(&max) {
            return Err(invalid("cached.pending_account_max", "must be 1..=1000000"));
        }
        settings.pending_entries_account_max = max;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, text).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RawConfig::load(Some(&path), |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })?
        .validate()
    }

    #[test]
    fn no_file_is_the_embedded_default() {
        let config = RawConfig::load(None, |_| None).unwrap().validate().unwrap();
        assert_eq!(config.settings.region.as_str(), "local");
        assert_eq!(config.listen.to_string(), LISTEN_DEFAULT);
        assert!(config.redis_url.is_none());
    }

    #[test]
    fn a_full_file_with_overrides() {
        let config = load(
            r#"
            region = "eu-west-1"
            redis_url = "redis://127.0.0.1:7000/"
            [limits]
            store_timeout = "100ms"
            in_flight_max = 64
            [cached]
            flush_interval = "5ms"
            lease_credits = "250.5"
            lease_safety = "3s"
            pending_max = 5000
            pending_account_max = 50
            "#,
            &[
                ("TOLLGATE_LISTEN", "127.0.0.1:7001"),
                ("TOLLGATE_ENFORCE_API_KEY", "k"),
            ],
        )
        .unwrap();
        assert_eq!(
            (
                config.settings.store_timeout_ms,
                config.settings.flush_interval_ms
            ),
            (100, 5)
        );
        assert_eq!(
            config.settings.lease_credits,
            Credits::parse("250.5").unwrap()
        );
        assert_eq!(config.limits.in_flight_max, 64);
        assert_eq!(
            (
                config.settings.lease_safety_ms,
                config.settings.pending_entries_max,
                config.settings.pending_entries_account_max
            ),
            (3_000, 5_000, 50)
        );
        assert_eq!(config.listen.port(), 7001);
        assert!(config.keys.scope_of(Some(b"Bearer k")).is_ok());
    }

    #[test]
    fn errors_name_the_key() {
        let problem = |text: &str| load(text, &[]).unwrap_err().to_string();
        assert!(
            problem("[cached]\nflush_interval = \"50ms\"").starts_with("cached.flush_interval:")
        );
        assert!(problem("region = \"EU WEST\"").starts_with("region:"));
        assert!(problem("listen = \"nowhere\"").starts_with("listen:"));
        assert!(problem("redis_url = \"http://x\"").starts_with("redis_url:"));
        assert!(problem("[limits]\nstore_timeout = \"soon\"").starts_with("limits.store_timeout:"));
        assert!(
            problem("[[api_keys]]\nname = \"a\"\nsha256 = \"00\"\nscope = \"enforce\"")
                .starts_with("api_keys[0].sha256:")
        );
        assert!(problem("colour = \"blue\"").contains("unknown field"));
        assert!(problem("authority_url = \"https://a:1\"").starts_with("authority_tls.ca:"));
        assert!(
            problem("authority_url = \"http://a:1\"\n[authority_tls]\nca = \"x.pem\"")
                .starts_with("authority_tls:")
        );
        assert!(
            problem("[tls]\ncert = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\"")
                .starts_with("tls.cert:")
        );
    }

    #[test]
    fn tls_for_the_listener_and_the_cold_path() {
        let pki = tollgate_testkit::tls::TestPki::new("edge-config").unwrap();
        let client = pki.client("edge").unwrap();
        let text = format!(
            "authority_url = \"https://localhost:50051\"\n\
             [tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
             [authority_tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            pki.server.cert, pki.server.key, pki.ca, pki.ca, client.cert, client.key
        );
        let config = load(&text, &[]).unwrap();
        assert!(config.tls.is_some() && config.authority_tls.is_some());
    }
}
