//! The systems a run can drive: the edge over gRPC (strict or cached), and the baselines written
//! here — a per-request PostgreSQL `UPDATE … WHERE remaining >= $1` on a table of its own, and
//! the regional store's strict Lua debit called directly (no edge, no lease, no gRPC).

use std::sync::Arc;

use anyhow::Context;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tollgate_core::{Credits, Timestamp};
use tollgate_proto::pb;
use tollgate_region::{DebitOutcome, RedisRegionStore, Refusal, RegionStore, RETAIN_MS_DEFAULT};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::load::{Driver, Outcome, Request};

/// The feature every load request spends on.
pub const FEATURE: &str = "lt_call";
/// Accounts seeded concurrently by the baselines.
const SEED_PARALLEL: usize = 64;

/// The idempotency key of sequence number `key_index` of run `run_id`.
pub fn idempotency_key(run_id: &str, key_index: u64) -> String {
    format!("{run_id}.{key_index}")
}

/// The account id of index `account` of run `run_id`.
pub fn account_id(run_id: &str, account: u64) -> String {
    format!("{run_id}-{account}")
}

fn now() -> Timestamp {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Timestamp::from_millis(millis).unwrap_or(Timestamp::EPOCH)
}

pub fn authorized<T>(message: T, api_key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = MetadataValue::try_from(format!("Bearer {api_key}")) {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Whether a failed call may have moved credits anyway (the request may have been applied).
fn may_have_applied(code: tonic::Code) -> bool {
    !matches!(
        code,
        tonic::Code::InvalidArgument
            | tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::NotFound
            | tonic::Code::Unimplemented
            | tonic::Code::ResourceExhausted
    )
}

fn status_outcome(status: &tonic::Status) -> Outcome {
    Outcome::Error {
        code: format!("{:?}", status.code()),
        unknown: may_have_applied(status.code()),
    }
}

/// Connects one channel per endpoint (lazily reconnecting).
pub async fn connect(endpoint: &str) -> anyhow::Result<Channel> {
    Channel::from_shared(endpoint.to_owned())
        .with_context(|| format!("{endpoint} is not a valid endpoint"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {endpoint}"))
}

/// Debits through the edges, in the given mode.
pub struct EdgeDriver {
    /// Per region, per edge.
    channels: Vec<Vec<Channel>>,
    api_key: Arc<str>,
    run_id: Arc<str>,
    mode: pb::EnforcementMode,
}

impl EdgeDriver {
    pub async fn connect(
        regions: &[crate::targets::Region],
        api_key: &str,
        run_id: &str,
        mode: pb::EnforcementMode,
    ) -> anyhow::Result<EdgeDriver> {
        let mut channels = Vec::new();
        for region in regions {
            let mut edges = Vec::new();
            for edge in &region.edges {
                edges.push(connect(edge).await?);
            }
            channels.push(edges);
        }
        Ok(EdgeDriver {
            channels,
            api_key: api_key.into(),
            run_id: run_id.into(),
            mode,
        })
    }
}

fn refusal_code(code: i32) -> String {
    pb::RefusalCode::try_from(code)
        .map(|c| {
            c.as_str_name()
                .trim_start_matches("REFUSAL_CODE_")
                .to_owned()
        })
        .unwrap_or_else(|_| format!("refusal {code}"))
}

impl EdgeDriver {
    /// One call outside a run (the warm-up).
    pub fn call_now(&self, request: Request) -> BoxFuture<'static, Outcome> {
        Driver::call(self, request)
    }
}

impl Driver for EdgeDriver {
    fn call(&self, request: Request) -> BoxFuture<'static, Outcome> {
        let channel = self.channels[request.region][request.edge].clone();
        let message = pb::DebitRequest {
            idempotency_key: idempotency_key(&self.run_id, request.key_index),
            account_id: account_id(&self.run_id, request.account),
            usage: Some(pb::Usage {
                feature: FEATURE.into(),
                amount: Some(pb::usage::Amount::Quantity("1".into())),
            }),
            mode: self.mode as i32,
            ..pb::DebitRequest::default()
        };
        let api_key = Arc::clone(&self.api_key);
        Box::pin(async move {
            let mut client = pb::enforcement_client::EnforcementClient::new(channel);
            match client.debit(authorized(message, &api_key)).await {
                Ok(reply) => match reply.into_inner().outcome {
                    Some(pb::debit_reply::Outcome::Debited(debited)) => {
                        let cost = debited
                            .priced
                            .as_ref()
                            .and_then(|p| Credits::parse(&p.cost).ok());
                        match cost {
                            Some(cost) => Outcome::Allowed {
                                cost_micros: cost.micros(),
                            },
                            None => Outcome::Error {
                                code: "reply without a readable cost".into(),
                                unknown: true,
                            },
                        }
                    }
                    Some(pb::debit_reply::Outcome::Refused(refusal)) => {
                        Outcome::Refused(refusal_code(refusal.code))
                    }
                    None => Outcome::Error {
                        code: "empty reply".into(),
                        unknown: true,
                    },
                },
                Err(status) => status_outcome(&status),
            }
        })
    }
}

/// Baseline: one `UPDATE balances SET remaining = remaining - $1 WHERE account = $2 AND
/// remaining >= $1` per request, on a table of its own, autocommit.
pub struct PostgresDriver {
    pool: sqlx::PgPool,
    cost_micros: i64,
}

impl PostgresDriver {
    /// Creates (or recreates) the baseline's table with `accounts` rows of `grant_micros`.
    pub async fn prepare(
        url: &str,
        table: &str,
        accounts: u64,
        grant_micros: i64,
        cost_micros: i64,
        connections: u32,
    ) -> anyhow::Result<PostgresDriver> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(connections.clamp(1, 128))
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await
            .with_context(|| format!("--postgres-url: connecting to {url}"))?;
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
            .execute(&pool)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE {table} (account TEXT PRIMARY KEY, remaining BIGINT NOT NULL)"
        ))
        .execute(&pool)
        .await?;
        sqlx::query(&format!(
            "INSERT INTO {table} (account, remaining) \
             SELECT 'a' || n, $1 FROM generate_series(0, $2 - 1) AS n"
        ))
        .bind(grant_micros)
        .bind(accounts as i64)
        .execute(&pool)
        .await?;
        sqlx::query(&format!("ANALYZE {table}"))
            .execute(&pool)
            .await?;
        Ok(PostgresDriver { pool, cost_micros })
    }

    /// The baseline's own audit: what left the table equals what was acknowledged, and no row
    /// went below zero.
    pub async fn audit(
        &self,
        table: &str,
        accounts: u64,
        grant_micros: i64,
        acknowledged_micros: i64,
    ) -> anyhow::Result<(bool, String)> {
        let (sum, min): (Option<i64>, Option<i64>) = sqlx::query_as(&format!(
            "SELECT SUM(remaining)::BIGINT, MIN(remaining) FROM {table}"
        ))
        .fetch_one(&self.pool)
        .await?;
        let taken = grant_micros * accounts as i64 - sum.unwrap_or(0);
        let passed = taken == acknowledged_micros && min.unwrap_or(0) >= 0;
        Ok((
            passed,
            format!(
                "table {table}: {taken} micro-credits taken, {acknowledged_micros} acknowledged, lowest row {}",
                min.unwrap_or(0)
            ),
        ))
    }
}

pub const POSTGRES_TABLE: &str = "loadtest_baseline_balances";

impl Driver for PostgresDriver {
    fn call(&self, request: Request) -> BoxFuture<'static, Outcome> {
        let pool = self.pool.clone();
        let cost = self.cost_micros;
        Box::pin(async move {
            let result = sqlx::query(&format!(
                "UPDATE {POSTGRES_TABLE} SET remaining = remaining - $1 \
                 WHERE account = $2 AND remaining >= $1"
            ))
            .bind(cost)
            .bind(format!("a{}", request.account))
            .execute(&pool)
            .await;
            match result {
                Ok(done) if done.rows_affected() == 1 => Outcome::Allowed { cost_micros: cost },
                Ok(_) => Outcome::Refused("INSUFFICIENT_CREDITS".into()),
                Err(error) => Outcome::Error {
                    code: format!("postgres: {}", error_kind(&error)),
                    unknown: true,
                },
            }
        })
    }
}

fn error_kind(error: &sqlx::Error) -> &'static str {
    match error {
        sqlx::Error::PoolTimedOut => "pool timed out",
        sqlx::Error::Io(_) => "io",
        sqlx::Error::Database(_) => "database",
        _ => "other",
    }
}

/// Baseline: the regional store's strict debit (one Lua call per request) through
/// `RedisRegionStore`, without edges, leases or gRPC.
pub struct RedisLuaDriver {
    /// One store per region of the plan.
    stores: Vec<Arc<RedisRegionStore>>,
    run_id: Arc<str>,
    cost_micros: i64,
}

impl RedisLuaDriver {
    /// Installs, in each redis-server of `urls` (one per region), one segment of
    /// `grant_micros` for each of `accounts` accounts under `prefix`.
    pub async fn prepare(
        urls: &[String],
        prefix: &str,
        run_id: &str,
        accounts: u64,
        grant_micros: i64,
        cost_micros: i64,
    ) -> anyhow::Result<RedisLuaDriver> {
        let mut stores = Vec::new();
        for url in urls {
            let store = Arc::new(
                RedisRegionStore::connect(url, prefix, RETAIN_MS_DEFAULT)
                    .await
                    .with_context(|| format!("--redis-url: connecting to {url}"))?,
            );
            Self::fund(&store, run_id, accounts, grant_micros).await?;
            stores.push(store);
        }
        Ok(RedisLuaDriver {
            stores,
            run_id: run_id.into(),
            cost_micros,
        })
    }

    async fn fund(
        store: &Arc<RedisRegionStore>,
        run_id: &str,
        accounts: u64,
        grant_micros: i64,
    ) -> anyhow::Result<()> {
        let seeded = futures_util::stream::iter(0..accounts)
            .map(|index| {
                let store = Arc::clone(store);
                let account = account_id(run_id, index);
                async move {
                    let mut spec = tollgate_region::conformance::segment("lt", "1", 50, None);
                    spec.amount = Credits::from_micros(grant_micros);
                    spec.effective_at = Timestamp::EPOCH;
                    let key = tollgate_region::conformance::key(&format!("seed-{account}"));
                    store
                        .install_segment(
                            &tollgate_core::AccountId::new(account)?,
                            &key,
                            &spec,
                            now(),
                        )
                        .await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(SEED_PARALLEL)
            .collect::<Vec<_>>()
            .await;
        for result in seeded {
            result?;
        }
        Ok(())
    }
}

impl Driver for RedisLuaDriver {
    fn call(&self, request: Request) -> BoxFuture<'static, Outcome> {
        let store = Arc::clone(&self.stores[request.region % self.stores.len()]);
        let run_id = Arc::clone(&self.run_id);
        let cost = self.cost_micros;
        Box::pin(async move {
            let Ok(account) = tollgate_core::AccountId::new(account_id(&run_id, request.account))
            else {
                return Outcome::Error {
                    code: "invalid account id".into(),
                    unknown: false,
                };
            };
            let mut command = tollgate_region::conformance::debit_command(
                &account,
                &idempotency_key(&run_id, request.key_index),
                FEATURE,
                "1",
                now(),
            );
            command.cost = Credits::from_micros(cost);
            match store.debit(&command).await {
                Ok(DebitOutcome::Allowed(_)) => Outcome::Allowed { cost_micros: cost },
                Ok(DebitOutcome::Refused(refusal)) => Outcome::Refused(match refusal {
                    Refusal::Insufficient { .. } => "INSUFFICIENT_CREDITS".into(),
                    Refusal::RateLimited { .. } => "RATE_LIMITED".into(),
                }),
                Err(error) => Outcome::Error {
                    code: format!("redis: {error}"),
                    unknown: true,
                },
            }
        })
    }
}
