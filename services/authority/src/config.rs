//! The authority's configuration: one TOML file, `TOLLGATE_*` environment overrides, and
//! `validate()` that names the offending key. With no file at all it runs the embedded default
//! (SQLite under `./tollgate-data`, listening on 127.0.0.1:50051).
//!
//! ```toml
//! listen = "127.0.0.1:50051"            # TOLLGATE_LISTEN
//! database_url = "postgres://…"         # TOLLGATE_DATABASE_URL; default sqlite://tollgate-data/ledger.db
//!
//! state_url = "postgres://…"           # the authority's own tables; default: the ledger's
//!                                       # database (PostgreSQL) or authority.db beside it (SQLite)
//!
//! [[regions]]                           # each region's Redis; with none, only Admin is served
//! name = "eu-west-1"
//! redis_url = "redis://10.0.0.5:6379/"
//! key_prefix = "tg"                     # default "tg"; edges of the region use the same
//!
//! [[webhooks]]                          # signed event deliveries (HMAC-SHA256)
//! name = "billing"
//! url = "http://hooks.internal/tollgate"
//! secret_env = "TOLLGATE_WEBHOOK_SECRET" # the secret is read from this variable, never the file
//!
//! [[api_keys]]
//! name = "ops"
//! sha256 = "…64 hex digits…"           # `tollgate-authority hash-key` prints it
//! scope = "admin"                       # admin | read
//!
//! http_listen = "127.0.0.1:9090"       # HTTP: POST /webhooks/stripe, /console, /widget; default: none
//!
//! [tls]                                 # TLS on the gRPC listener (--tls-cert/--tls-key)
//! cert = "/etc/tollgate/authority.pem"  # certificate chain, PEM
//! key = "/etc/tollgate/authority.key"   # its private key, PEM
//! client_ca = "/etc/tollgate/edges-ca.pem" # optional: clients must present a certificate
//!                                       # signed by this CA (mutual TLS; --tls-client-ca)
//!
//! [payments]
//! stripe_secret_env = "STRIPE_WEBHOOK_SECRET" # the endpoint secret's variable, never the secret
//! stripe_tolerance = "5m"               # how far a signature's timestamp may be from now
//! ```
//! `TOLLGATE_ADMIN_API_KEY` and `TOLLGATE_READ_API_KEY` add one key each (given in clear, kept
//! hashed), for containers and tests.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use tollgate_core::RegionId;

use crate::auth::{ApiKeyConfig, KeyRing, Scope};

/// Most regions one authority serves.
pub const REGIONS_MAX: usize = 64;
pub const KEY_PREFIX_DEFAULT: &str = "tg";

pub const LISTEN_DEFAULT: &str = "127.0.0.1:50051";
pub const DATABASE_URL_DEFAULT: &str = "sqlite://tollgate-data/ledger.db";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub state_url: Option<String>,
    #[serde(default)]
    pub regions: Vec<RawRegion>,
    #[serde(default)]
    pub webhooks: Vec<RawWebhook>,
    pub database_url: Option<String>,
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    pub http_listen: Option<String>,
    pub payments: Option<RawPayments>,
    pub tls: Option<tollgate_serve::tls::ServerTlsFiles>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPayments {
    pub stripe_secret_env: Option<String>,
    pub stripe_tolerance: Option<String>,
}

/// Bounds of `payments.stripe_tolerance`, in seconds.
pub const STRIPE_TOLERANCE_S_MIN: u64 = 1;
pub const STRIPE_TOLERANCE_S_MAX: u64 = 3_600;

/// Stripe webhooks: the endpoint secret (read from the environment) and the tolerance.
#[derive(Clone)]
pub struct StripeConfig {
    pub secret: String,
    pub tolerance_s: u64,
}

impl std::fmt::Debug for StripeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeConfig")
            .field("secret", &"<redacted>")
            .field("tolerance_s", &self.tolerance_s)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegion {
    pub name: String,
    pub redis_url: String,
    pub key_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub name: String,
    pub url: String,
    pub secret_env: String,
}

/// Most webhook endpoints.
pub const WEBHOOKS_MAX: usize = 32;

/// A region the authority reconciles and allocates to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionConfig {
    pub name: RegionId,
    pub redis_url: String,
    pub key_prefix: String,
}

#[derive(Debug)]
pub struct Config {
    pub webhooks: Vec<tollgate_authority::WebhookEndpoint>,
    pub state_url: String,
    pub regions: Vec<RegionConfig>,
    pub listen: SocketAddr,
    pub database_url: String,
    pub keys: KeyRing,
    /// Where `POST /webhooks/stripe` is served; `None`: no HTTP listener.
    pub http_listen: Option<SocketAddr>,
    /// `None`: the webhook route answers 503.
    pub stripe: Option<StripeConfig>,
    /// `None`: the gRPC listener speaks plain text.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
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
        source: Box<toml::de::Error>,
    },
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

impl RawConfig {
    pub fn load(path: Option<&Path>) -> Result<RawConfig, ConfigError> {
        let Some(path) = path else {
            return Ok(RawConfig::default());
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: shown,
            source: Box::new(source),
        })
    }

    /// Applies overrides (flags and `TOLLGATE_*` variables, already read by the caller).
    pub fn validate(
        self,
        listen: Option<String>,
        database_url: Option<String>,
        clear_keys: &[(&str, String, Scope)],
    ) -> Result<Config, ConfigError> {
        self.validate_with(listen, database_url, clear_keys, &|name| {
            std::env::var(name).ok()
        })
    }

    /// [`RawConfig::validate`], reading webhook secrets through `secret` (tests pass their own).
    pub fn validate_with(
        self,
        listen: Option<String>,
        database_url: Option<String>,
        clear_keys: &[(&str, String, Scope)],
        secret: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let listen_text = listen
            .or(self.listen)
            .unwrap_or_else(|| LISTEN_DEFAULT.into());
        let listen = listen_text
            .parse()
            .map_err(|_| invalid("listen", format!("{listen_text:?} is not an address:port")))?;
        let database_url = database_url
            .or(self.database_url)
            .unwrap_or_else(|| DATABASE_URL_DEFAULT.into());
        if !(database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://")
            || database_url.starts_with("sqlite:"))
        {
            return Err(invalid(
                "database_url",
                "must start with postgres:// or sqlite:",
            ));
        }
        let state_url = match self.state_url {
            Some(url) => url,
            None => default_state_url(&database_url),
        };
        let regions = regions(self.regions)?;
        let webhooks = webhooks(self.webhooks, &secret)?;
        let http_listen = self
            .http_listen
            .map(|text| {
                text.parse()
                    .map_err(|_| invalid("http_listen", format!("{text:?} is not an address:port")))
            })
            .transpose()?;
        let stripe = stripe(self.payments.unwrap_or_default(), &secret)?;
        let tls = self
            .tls
            .map(|files| files.load("tls"))
            .transpose()
            .map_err(|e| invalid(e.key, e.problem))?;
        let mut api_keys = self.api_keys;
        if let Some(index) = api_keys.iter().position(|key| key.scope == Scope::Enforce) {
            return Err(invalid(
                format!("api_keys[{index}].scope"),
                "enforce keys belong to edges, not the authority",
            ));
        }
        for (name, key, scope) in clear_keys {
            if key.is_empty() {
                return Err(invalid(*name, "must not be empty"));
            }
            api_keys.push(ApiKeyConfig::from_clear(name, key, *scope));
        }
        let keys = KeyRing::from_config(&api_keys).map_err(|problem| {
            let (key, problem) = problem
                .split_once(": ")
                .unwrap_or(("api_keys", problem.as_str()));
            invalid(key.to_owned(), problem)
        })?;
        Ok(Config {
            webhooks,
            state_url,
            regions,
            listen,
            database_url,
            keys,
            http_listen,
            stripe,
            tls,
        })
    }
}

/// The authority's own tables live in the ledger's PostgreSQL database, or in `authority.db`
/// beside a SQLite ledger.
fn default_state_url(database_url: &str) -> String {
    match database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
    {
        Some(path) => {
            let state = Path::new(path).with_file_name("authority.db");
            format!("sqlite://{}", state.display())
        }
        None => database_url.to_owned(),
    }
}

fn webhooks(
    raw: Vec<RawWebhook>,
    secret: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<tollgate_authority::WebhookEndpoint>, ConfigError> {
    if raw.len() > WEBHOOKS_MAX {
        return Err(invalid(
            "webhooks",
            format!("{} endpoints, at most {WEBHOOKS_MAX}", raw.len()),
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(index, hook)| {
            if !hook.url.starts_with("http://") {
                return Err(invalid(
                    format!("webhooks[{index}].url"),
                    "must start with http:// (TLS is not built yet)",
                ));
            }
            let value = secret(&hook.secret_env)
                .filter(|value| !value.is_empty())
                .ok_or_else(|| {
                    invalid(
                        format!("webhooks[{index}].secret_env"),
                        format!("{} is not set", hook.secret_env),
                    )
                })?;
            Ok(tollgate_authority::WebhookEndpoint {
                name: hook.name,
                url: hook.url,
                secret: value,
            })
        })
        .collect()
}

fn stripe(
    raw: RawPayments,
    secret: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<StripeConfig>, ConfigError> {
    let tolerance_s = match raw.stripe_tolerance {
        None => tollgate_authority::stripe::TOLERANCE_S_DEFAULT,
        Some(text) => {
            let key = "payments.stripe_tolerance";
            let duration = humantime::parse_duration(&text)
                .map_err(|e| invalid(key, format!("{text:?}: {e}")))?;
            let seconds = duration.as_secs();
            if !(STRIPE_TOLERANCE_S_MIN..=STRIPE_TOLERANCE_S_MAX).contains(&seconds)
                || duration.subsec_nanos() != 0
            {
                return Err(invalid(
                    key,
                    format!(
                        "whole seconds from {STRIPE_TOLERANCE_S_MIN}s to {STRIPE_TOLERANCE_S_MAX}s"
                    ),
                ));
            }
            seconds
        }
    };
    let Some(name) = raw.stripe_secret_env else {
        return Ok(None);
    };
    let value = secret(&name)
        .filter(|value| !value.is_empty())
        .ok_or_else(|| invalid("payments.stripe_secret_env", format!("{name} is not set")))?;
    Ok(Some(StripeConfig {
        secret: value,
        tolerance_s,
    }))
}

fn regions(raw: Vec<RawRegion>) -> Result<Vec<RegionConfig>, ConfigError> {
    if raw.len() > REGIONS_MAX {
        return Err(invalid(
            "regions",
            format!("{} regions, at most {REGIONS_MAX}", raw.len()),
        ));
    }
    let mut regions: Vec<RegionConfig> = Vec::with_capacity(raw.len());
    for (index, region) in raw.into_iter().enumerate() {
        let name = RegionId::new(region.name)
            .map_err(|e| invalid(format!("regions[{index}].name"), e.to_string()))?;
        if regions.iter().any(|known| known.name == name) {
            return Err(invalid(
                format!("regions[{index}].name"),
                format!("{name} is listed twice"),
            ));
        }
        if !(region.redis_url.starts_with("redis://") || region.redis_url.starts_with("rediss://"))
        {
            return Err(invalid(
                format!("regions[{index}].redis_url"),
                "must start with redis:// or rediss://",
            ));
        }
        let key_prefix = region
            .key_prefix
            .unwrap_or_else(|| KEY_PREFIX_DEFAULT.into());
        if key_prefix.is_empty() || key_prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                format!("regions[{index}].key_prefix"),
                "must be non-empty, without braces or spaces",
            ));
        }
        regions.push(RegionConfig {
            name,
            redis_url: region.redis_url,
            key_prefix,
        });
    }
    Ok(regions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors_name_the_key() {
        let config = RawConfig::default().validate(None, None, &[]).unwrap();
        assert_eq!(config.listen.to_string(), LISTEN_DEFAULT);
        assert_eq!(config.database_url, DATABASE_URL_DEFAULT);
        let bad = RawConfig::default().validate(Some("nowhere".into()), None, &[]);
        assert!(bad.unwrap_err().to_string().starts_with("listen: "));
        let raw: RawConfig =
            toml::from_str("[[api_keys]]\nname = \"ops\"\nsha256 = \"abc\"\nscope = \"admin\"\n")
                .unwrap();
        let bad = raw.validate(None, None, &[]).unwrap_err();
        assert_eq!(bad.to_string(), "api_keys[0].sha256: must be 64 hex digits");
    }

    #[test]
    fn regions_and_the_state_store() {
        let raw: RawConfig = toml::from_str(
            "database_url = \"sqlite:///var/lib/tg/ledger.db\"\n[[regions]]\nname = \"eu\"\nredis_url = \"redis://127.0.0.1:6000/\"\n",
        )
        .unwrap();
        let config = raw.validate(None, None, &[]).unwrap();
        assert_eq!(config.state_url, "sqlite:///var/lib/tg/authority.db");
        assert_eq!(config.regions[0].key_prefix, "tg");
        let twice: RawConfig = toml::from_str(
            "[[regions]]\nname = \"eu\"\nredis_url = \"redis://a/\"\n[[regions]]\nname = \"eu\"\nredis_url = \"redis://b/\"\n",
        )
        .unwrap();
        assert_eq!(
            twice.validate(None, None, &[]).unwrap_err().to_string(),
            "regions[1].name: eu is listed twice"
        );
        let bad: RawConfig =
            toml::from_str("[[regions]]\nname = \"EU\"\nredis_url = \"redis://a/\"\n").unwrap();
        assert!(bad
            .validate(None, None, &[])
            .unwrap_err()
            .to_string()
            .starts_with("regions[0].name:"));
    }

    #[test]
    fn payments_read_the_stripe_secret_from_the_environment() {
        let text = "http_listen = \"127.0.0.1:9090\"\n[payments]\nstripe_secret_env = \"STRIPE_SECRET\"\nstripe_tolerance = \"2m\"\n";
        let secret = |name: &str| (name == "STRIPE_SECRET").then(|| "whsec_x".to_owned());
        let raw: RawConfig = toml::from_str(text).unwrap();
        let config = raw.validate_with(None, None, &[], &secret).unwrap();
        assert_eq!(config.http_listen.unwrap().to_string(), "127.0.0.1:9090");
        let stripe = config.stripe.unwrap();
        assert_eq!(
            (stripe.secret.as_str(), stripe.tolerance_s),
            ("whsec_x", 120)
        );
        assert!(!format!("{stripe:?}").contains("whsec_x"));
        let raw: RawConfig = toml::from_str(text).unwrap();
        let missing = raw.validate_with(None, None, &[], &|_| None).unwrap_err();
        assert_eq!(
            missing.to_string(),
            "payments.stripe_secret_env: STRIPE_SECRET is not set"
        );
        let raw: RawConfig = toml::from_str(&text.replace("2m", "2h")).unwrap();
        let long = raw.validate_with(None, None, &[], &secret).unwrap_err();
        assert!(
            long.to_string().starts_with("payments.stripe_tolerance:"),
            "{long}"
        );
        let raw: RawConfig = toml::from_str("http_listen = \"nowhere\"").unwrap();
        let bad = raw.validate_with(None, None, &[], &secret).unwrap_err();
        assert!(bad.to_string().starts_with("http_listen:"), "{bad}");
        let none = RawConfig::default().validate(None, None, &[]).unwrap();
        assert!(none.http_listen.is_none() && none.stripe.is_none());
    }

    #[test]
    fn tls_files_are_read_at_start_and_errors_name_the_key() {
        let pki = tollgate_testkit::tls::TestPki::new("config").unwrap();
        let text = format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            pki.server.cert, pki.server.key, pki.ca
        );
        let raw: RawConfig = toml::from_str(&text).unwrap();
        assert!(raw.validate(None, None, &[]).unwrap().tls.is_some());
        let raw: RawConfig = toml::from_str(&text.replace("ca.pem", "missing.pem")).unwrap();
        let bad = raw.validate(None, None, &[]).unwrap_err().to_string();
        assert!(bad.starts_with("tls.client_ca: "), "{bad}");
        let raw: RawConfig = toml::from_str(&text.replace("server.key", "ca.pem")).unwrap();
        let bad = raw.validate(None, None, &[]).unwrap_err().to_string();
        assert!(
            bad.starts_with("tls.key: ") || bad.starts_with("tls.cert: "),
            "{bad}"
        );
        assert!(RawConfig::default()
            .validate(None, None, &[])
            .unwrap()
            .tls
            .is_none());
    }

    #[test]
    fn webhooks_read_their_secret_from_the_environment() {
        let text = "[[webhooks]]\nname = \"billing\"\nurl = \"http://127.0.0.1:9/h\"\nsecret_env = \"HOOK_SECRET\"\n";
        let secret = |name: &str| (name == "HOOK_SECRET").then(|| "s3cret".to_owned());
        let raw: RawConfig = toml::from_str(text).unwrap();
        let config = raw.validate_with(None, None, &[], &secret).unwrap();
        assert_eq!(
            (
                config.webhooks[0].name.as_str(),
                config.webhooks[0].secret.as_str()
            ),
            ("billing", "s3cret")
        );
        let raw: RawConfig = toml::from_str(text).unwrap();
        let missing = raw.validate_with(None, None, &[], &|_| None).unwrap_err();
        assert_eq!(
            missing.to_string(),
            "webhooks[0].secret_env: HOOK_SECRET is not set"
        );
        let plain: RawConfig = toml::from_str(&text.replace("http://", "https://")).unwrap();
        let refused = plain
            .validate_with(None, None, &[], &secret)
            .unwrap_err()
            .to_string();
        assert!(refused.starts_with("webhooks[0].url:"), "{refused}");
    }
}
