//! The command line: global flags, commands and their flags, with examples in every `--help`.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub const ENDPOINT_DEFAULT: &str = "http://127.0.0.1:50051";

const TOP_HELP: &str = "\
Examples:
  export TOLLGATE_API_KEY=dev-key
  tollgate accounts create acme
  tollgate features define chat --unit message
  tollgate prices publish prices.toml
  tollgate grants issue acme --amount 100 --source promo --grant-id welcome
  tollgate debit acme --feature chat --quantity 3
  tollgate balance acme
  tollgate ledger acme --kind debit --limit 20
  tollgate explain <DEBIT_ID> --account acme
  tollgate --json ledger acme --all

Exit codes:
  0  ok
  1  anything else (server fault, idempotency conflict, call not implemented by the server)
  2  usage error or bad input (the flag or field is named; the server's INVALID_ARGUMENT)
  3  not found (account, grant, debit, schedule)
  4  refused: a typed refusal such as insufficient_credits (nothing moved)
  5  unauthenticated or permission denied (check --api-key and its scope)
  6  unavailable: connection failed, server unavailable, or --timeout passed

Every mutation sends an idempotency key (--idempotency-key, or a generated one that is printed);
run it again with the same key to retry safely. Amounts are decimal strings (\"12.5\").";

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Tollgate's operator and support command line (Admin and Enforcement APIs over gRPC).",
    after_help = TOP_HELP
)]
pub struct Cli {
    /// The authority's gRPC address (Admin API).
    #[arg(long, global = true, env = "TOLLGATE_ENDPOINT", default_value = ENDPOINT_DEFAULT)]
    pub endpoint: String,
    /// The edge's gRPC address (Enforcement API); default: --endpoint.
    #[arg(long, global = true, env = "TOLLGATE_EDGE_ENDPOINT")]
    pub edge_endpoint: Option<String>,
    /// The API key, sent as `authorization: Bearer <key>`.
    #[arg(long, global = true, env = "TOLLGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long to wait for a connection and for each call ("5s", "500ms").
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The CA certificate (PEM) that https:// endpoints' certificates are checked against.
    #[arg(long, global = true, env = "TOLLGATE_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// This client's certificate (PEM), for endpoints that require one (mutual TLS).
    #[arg(long, global = true, env = "TOLLGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "TOLLGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(duration)
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, read and list accounts.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Define and list billable features.
    #[command(subcommand)]
    Features(FeaturesCommand),
    /// Publish and list price book versions.
    #[command(subcommand)]
    Prices(PricesCommand),
    /// Issue, list, void and expire grants.
    #[command(subcommand)]
    Grants(GrantsCommand),
    /// Create, list and cancel recurring grant schedules.
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// An account's balance now, the terms it is made of, and the ledger's sum.
    #[command(
        after_help = "Examples:\n  tollgate balance acme          # the account's balance, its terms, the ledger's sum\n  tollgate balance acme --live   # the account's balance now, as edges answer it\n  tollgate balance acme --feature chat   # what can be spent now on chat"
    )]
    Balance(BalanceArgs),
    /// An account's ledger entries, filtered and paginated.
    #[command(
        after_help = "Examples:\n  tollgate ledger acme\n  tollgate ledger acme --kind debit --kind refund --from 2026-01-01 --until 2026-02-01\n  tollgate ledger acme --limit 50 --page-token <TOKEN>\n  tollgate --json ledger acme --all"
    )]
    Ledger(LedgerArgs),
    /// Usage broken down by time bucket and feature, actor or region.
    #[command(
        after_help = "Examples:\n  tollgate usage acme --by feature\n  tollgate usage acme --bucket hour --by feature --by actor --from 2026-01-01"
    )]
    Usage(UsageArgs),
    /// Revenue: credits sold, consumed, expired (breakage) and refunded, with their cost basis.
    #[command(subcommand)]
    Revenue(RevenueCommand),
    /// Give credits of a debit back (at most what is left refundable).
    #[command(
        after_help = "Examples:\n  tollgate refund acme <DEBIT_ID> --amount 1.5 --memo \"failed generation\"\n\nDEBIT_ID is the ledger's debit id (see `tollgate ledger` or `tollgate explain`), or the\nidempotency key the debit was made with."
    )]
    Refund(RefundArgs),
    /// Add credits (positive) or take them (negative), with a memo for the audit trail.
    #[command(
        after_help = "Examples:\n  tollgate adjust acme --amount 5 --memo \"goodwill after outage\"\n  tollgate adjust acme --amount=-2 --memo \"duplicate grant\""
    )]
    Adjust(AdjustArgs),
    /// Check the ledger: hash chains, the balance equation, grant remainders.
    #[command(after_help = "Examples:\n  tollgate verify\n  tollgate verify --account acme")]
    Verify(VerifyArgs),
    /// Why was I charged? A debit's price, the grants it burned, refunds, actor and time.
    #[command(
        after_help = "Examples:\n  tollgate explain eu-west-1.3f2a… --account acme\n  tollgate explain checkout-42 --account acme   # the idempotency key of the debit\n  tollgate --json explain <DEBIT_ID> --account acme"
    )]
    Explain(ExplainArgs),
    /// Events (balance.low, grant.expired, …).
    #[command(subcommand)]
    Events(EventsCommand),
    /// Parked usage: what a region served that the ledger could not take; list and resolve it.
    #[command(subcommand)]
    Parked(ParkedCommand),
    /// Enforcement: set credits aside for a while (a hold).
    #[command(
        after_help = "Examples:\n  tollgate authorize acme --feature chat --quantity 10 --ttl 10m"
    )]
    Authorize(AuthorizeArgs),
    /// Enforcement: take up to a hold's credits and release the rest.
    #[command(
        after_help = "Examples:\n  tollgate capture acme <HOLD_ID>\n  tollgate capture acme <HOLD_ID> --amount 2.5\n  tollgate capture acme --authorize-key checkout-42   # the hold that authorize placed with that key\n\nName the hold by its id or by --authorize-key, exactly one of the two."
    )]
    Capture(CaptureArgs),
    /// Enforcement: give a hold's credits back.
    #[command(
        after_help = "Examples:\n  tollgate release acme <HOLD_ID>\n  tollgate release acme --authorize-key checkout-42\n\nName the hold by its id or by --authorize-key, exactly one of the two."
    )]
    Release(ReleaseArgs),
    /// Enforcement: price and debit in one step.
    #[command(
        after_help = "Examples:\n  tollgate debit acme --feature chat --quantity 3 --actor alice\n  tollgate debit acme --feature chat --cost 0.25 --idempotency-key retry-safe-1"
    )]
    Debit(DebitArgs),
    /// Enforcement: undo your own debit within the reverse window.
    #[command(after_help = "Examples:\n  tollgate reverse acme <IDEMPOTENCY_KEY_OF_THE_DEBIT>")]
    Reverse(ReverseArgs),
    /// Enforcement: price a request without spending.
    #[command(after_help = "Examples:\n  tollgate quote acme --feature chat --quantity 1000")]
    Quote(QuoteArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  tollgate completions bash > /etc/bash_completion.d/tollgate\n  tollgate completions zsh > \"${fpath[1]}/_tollgate\"\n  tollgate completions fish > ~/.config/fish/completions/tollgate.fish"
    )]
    Completions {
        /// bash, zsh or fish.
        shell: CompletionShell,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// The idempotency key of a mutation.
#[derive(Debug, Args)]
pub struct Mutation {
    /// Idempotency key; default: a generated one (printed, so the call can be retried).
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// One page, or every page.
#[derive(Debug, Args)]
pub struct Page {
    /// Items per page (the server's default when unset).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Continue from this token (printed after a page that has more).
    #[arg(long)]
    pub page_token: Option<String>,
    /// Follow page tokens to the end.
    #[arg(long, conflicts_with = "page_token")]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Create an account.
    #[command(
        after_help = "Examples:\n  tollgate accounts create acme\n  tollgate accounts create acme --overdraft-limit 10 --metadata tier=gold"
    )]
    Create {
        account: String,
        /// Credits the account may go below zero (decimal string).
        #[arg(long)]
        overdraft_limit: Option<String>,
        /// key=value, repeatable.
        #[arg(long)]
        metadata: Vec<String>,
        #[command(flatten)]
        mutation: Mutation,
    },
    /// Show an account and its balance.
    #[command(after_help = "Examples:\n  tollgate accounts get acme")]
    Get { account: String },
    /// List accounts in id order, a page at a time.
    #[command(after_help = "Examples:\n  tollgate accounts list")]
    List {
        #[command(flatten)]
        page: Page,
    },
}

#[derive(Debug, Subcommand)]
pub enum FeaturesCommand {
    /// Define (or redefine) a billable feature.
    #[command(
        after_help = "Examples:\n  tollgate features define chat --unit message --description \"one chat message\""
    )]
    Define {
        feature: String,
        /// The unit quantities are counted in (call, row, token).
        #[arg(long)]
        unit: String,
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        mutation: Mutation,
    },
    /// List features.
    #[command(after_help = "Examples:\n  tollgate features list --all")]
    List {
        #[command(flatten)]
        page: Page,
    },
}

#[derive(Debug, Subcommand)]
pub enum PricesCommand {
    /// Publish a price book version from a TOML or JSON file (by its extension).
    #[command(
        after_help = "Examples:\n  tollgate prices publish prices.toml\n\nThe file (TOML; JSON has the same keys):\n  version = 2\n  effective_from = \"2026-01-01T00:00:00Z\"\n  audience = \"all_accounts\"          # or new_accounts\n  [default_rates]\n  chat = \"0.5\"\n  [region_rates.eu-west-1]\n  chat = \"0.4\"\n  [plan_rates.pro]\n  chat = \"0.3\"\n  [plan_region_rates.\"pro/eu-west-1\"]\n  chat = \"0.25\""
    )]
    Publish {
        file: std::path::PathBuf,
        #[command(flatten)]
        mutation: Mutation,
    },
    /// List price book versions.
    #[command(
        after_help = "Examples:\n  tollgate prices list\n  tollgate --json prices list --all"
    )]
    List {
        #[command(flatten)]
        page: Page,
    },
}

#[derive(Debug, Subcommand)]
pub enum ParkedCommand {
    /// List parked usage, oldest first.
    #[command(
        after_help = "Examples:\n  tollgate parked list --state open\n  tollgate parked list --account acme --state resolved\n  tollgate --json parked list --all"
    )]
    List {
        /// Only this account's records.
        #[arg(long)]
        account: Option<String>,
        /// open or resolved; default: both.
        #[arg(long, value_parser = ["open", "resolved"])]
        state: Option<String>,
        #[command(flatten)]
        page: Page,
    },
    /// Charge a parked record to the ledger now, or write it off (nothing charged).
    #[command(
        after_help = "Examples:\n  tollgate parked resolve 12 --charge\n  tollgate parked resolve 13 --write-off --reason \"duplicate of a charged request\"\n\nID is the id `tollgate parked list` prints. --charge debits the record's own draws when the\nledger can still take them, else its cost in burn-down order from the account's grants now,\nwithin the overdraft limit; when it cannot, nothing moves and the reason is printed."
    )]
    Resolve {
        id: String,
        /// Debit it now.
        #[arg(
            long,
            conflicts_with = "write_off",
            required_unless_present = "write_off"
        )]
        charge: bool,
        /// Resolve it without charging (needs --reason).
        #[arg(long)]
        write_off: bool,
        /// Why (required with --write-off).
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        mutation: Mutation,
    },
}

#[derive(Debug, Subcommand)]
pub enum GrantsCommand {
    /// Issue a grant of credits.
    #[command(
        after_help = "Examples:\n  tollgate grants issue acme --amount 100 --source purchase --cost 20 --currency EUR\n  tollgate grants issue acme --amount 50 --source trial --expires-at 2026-02-01 --scope chat"
    )]
    Issue(Box<IssueGrantArgs>),
    /// List an account's grants.
    #[command(after_help = "Examples:\n  tollgate grants list acme --open-only")]
    List {
        account: String,
        /// Only grants that are still open.
        #[arg(long)]
        open_only: bool,
        #[command(flatten)]
        page: Page,
    },
    /// Void a grant: what remains of it is taken away.
    #[command(
        after_help = "Examples:\n  tollgate grants void acme welcome --memo \"issued by mistake\""
    )]
    Void {
        account: String,
        grant: String,
        #[arg(long, default_value = "")]
        memo: String,
        #[command(flatten)]
        mutation: Mutation,
    },
    /// Expire a grant whose expiry has passed.
    #[command(after_help = "Examples:\n  tollgate grants expire acme trial-2026-01")]
    Expire {
        account: String,
        grant: String,
        #[arg(long, default_value = "")]
        memo: String,
        #[command(flatten)]
        mutation: Mutation,
    },
}

#[derive(Debug, Args)]
pub struct IssueGrantArgs {
    pub account: String,
    /// Credits (decimal string, more than zero).
    #[arg(long)]
    pub amount: String,
    /// purchase, subscription, promo, trial or top-up.
    #[arg(long, default_value = "purchase")]
    pub source: String,
    /// Grant id; default: derived by the server.
    #[arg(long, default_value = "")]
    pub grant_id: String,
    /// Burn priority (0 burns first); default: the source's.
    #[arg(long)]
    pub priority: Option<u32>,
    /// When it becomes spendable; default: now.
    #[arg(long)]
    pub effective_at: Option<String>,
    /// When it expires; default: never.
    #[arg(long)]
    pub expires_at: Option<String>,
    /// Features it pays for, repeatable; default: all.
    #[arg(long)]
    pub scope: Vec<String>,
    /// Money paid for it (its cost basis), with --currency.
    #[arg(long, requires = "currency")]
    pub cost: Option<String>,
    /// ISO 4217 currency of --cost (EUR).
    #[arg(long, requires = "cost")]
    pub currency: Option<String>,
    #[arg(long, default_value = "")]
    pub external_ref: String,
    /// key=value, repeatable.
    #[arg(long)]
    pub metadata: Vec<String>,
    #[arg(long, default_value = "")]
    pub memo: String,
    #[command(flatten)]
    pub mutation: Mutation,
}

#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// Create a schedule that issues a grant every period.
    #[command(
        after_help = "Examples:\n  tollgate schedules create acme --schedule-id monthly --amount 1000 --period month --anchor 2026-01-31 --rollover max:500"
    )]
    Create(Box<CreateScheduleArgs>),
    /// List an account's schedules.
    #[command(after_help = "Examples:\n  tollgate schedules list acme")]
    List {
        account: String,
        #[command(flatten)]
        page: Page,
    },
    /// Cancel a schedule (grants already issued stay).
    #[command(after_help = "Examples:\n  tollgate schedules cancel acme monthly")]
    Cancel {
        account: String,
        schedule: String,
        #[command(flatten)]
        mutation: Mutation,
    },
}

#[derive(Debug, Args)]
pub struct CreateScheduleArgs {
    pub account: String,
    #[arg(long)]
    pub schedule_id: String,
    /// Credits per period.
    #[arg(long)]
    pub amount: String,
    /// day, week, month or year.
    #[arg(long)]
    pub period: String,
    /// Periods between grants.
    #[arg(long, default_value_t = 1)]
    pub period_count: u32,
    /// Start of the first period; default: now.
    #[arg(long)]
    pub anchor: Option<String>,
    /// subscription, purchase, promo, trial or top-up.
    #[arg(long, default_value = "subscription")]
    pub source: String,
    #[arg(long)]
    pub priority: Option<u32>,
    /// Features its grants pay for, repeatable; default: all.
    #[arg(long)]
    pub scope: Vec<String>,
    /// none, full, max:CAP, percent:P or percent:P:CAP.
    #[arg(long, default_value = "none")]
    pub rollover: String,
    /// When the schedule stops; default: never.
    #[arg(long)]
    pub ends_at: Option<String>,
    #[command(flatten)]
    pub mutation: Mutation,
}

#[derive(Debug, Args)]
pub struct BalanceArgs {
    pub account: String,
    /// Ask the edge what can be spent now on this feature (implies --live).
    #[arg(long)]
    pub feature: Option<String>,
    /// Ask the edge for the account's balance now (effective grants less holds and debt), what
    /// it can spend and what this region holds, rather than the authority.
    #[arg(long)]
    pub live: bool,
}

#[derive(Debug, Args)]
pub struct LedgerArgs {
    pub account: String,
    /// grant, debit, refund, expire, rollover, void, adjust or settle; repeatable.
    #[arg(long)]
    pub kind: Vec<String>,
    /// Only entries of this grant.
    #[arg(long)]
    pub grant: Option<String>,
    /// Only entries of this debit.
    #[arg(long)]
    pub debit: Option<String>,
    /// Event time from (inclusive).
    #[arg(long)]
    pub from: Option<String>,
    /// Event time until (exclusive).
    #[arg(long)]
    pub until: Option<String>,
    #[command(flatten)]
    pub page: Page,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    pub account: String,
    #[arg(long)]
    pub from: Option<String>,
    #[arg(long)]
    pub until: Option<String>,
    /// hour, day or month; default: the server's.
    #[arg(long)]
    pub bucket: Option<String>,
    /// feature, actor or region; repeatable.
    #[arg(long)]
    pub by: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum RevenueCommand {
    /// Revenue report over a time window, for one account or all.
    #[command(
        after_help = "Examples:\n  tollgate revenue report --from 2026-01-01 --until 2026-02-01\n  tollgate --json revenue report --account acme"
    )]
    Report {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        account: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct RefundArgs {
    pub account: String,
    /// The ledger's debit id, or the idempotency key the debit was made with.
    pub debit: String,
    /// Credits to give back (decimal string).
    #[arg(long)]
    pub amount: String,
    /// Id of the refund grant, if part cannot go back to its grants; default: derived.
    #[arg(long, default_value = "")]
    pub refund_grant_id: String,
    /// Expiry of that refund grant; default: never.
    #[arg(long)]
    pub refund_grant_expires_at: Option<String>,
    #[arg(long, default_value = "")]
    pub memo: String,
    #[command(flatten)]
    pub mutation: Mutation,
}

#[derive(Debug, Args)]
pub struct AdjustArgs {
    pub account: String,
    /// Signed credits, never zero (use --amount=-2 for a negative one).
    #[arg(long, allow_hyphen_values = true)]
    pub amount: String,
    /// Why (required, for the audit trail).
    #[arg(long)]
    pub memo: String,
    /// Id of the adjustment grant when positive; default: derived.
    #[arg(long, default_value = "")]
    pub grant_id: String,
    /// Let a negative adjustment leave debt beyond the account's overdraft limit (refused
    /// otherwise, saying what the balance would be).
    #[arg(long)]
    pub beyond_overdraft: bool,
    #[command(flatten)]
    pub mutation: Mutation,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// One account; default: every account.
    #[arg(long)]
    pub account: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The ledger's debit id, or the idempotency key the debit was made with.
    pub debit: String,
    /// The account the debit belongs to.
    #[arg(long)]
    pub account: String,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print events as they happen, until interrupted or --limit events were printed.
    #[command(
        after_help = "Examples:\n  tollgate events tail\n  tollgate events tail --account acme --type balance.low --type balance.exhausted\n  tollgate --json events tail --limit 10   # one JSON object per line"
    )]
    Tail {
        #[arg(long)]
        account: Option<String>,
        /// Event type, repeatable (balance.low, balance.exhausted, grant.expired, …).
        #[arg(long = "type")]
        types: Vec<String>,
        /// Resume after this event id.
        #[arg(long)]
        after: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        limit: Option<u64>,
    },
}

/// Usage priced by the price book (--feature and --quantity) or an explicit --cost.
#[derive(Debug, Args)]
pub struct UsageInput {
    #[arg(long)]
    pub feature: String,
    /// Quantity in the feature's unit (decimal string); default 1.
    #[arg(long)]
    pub quantity: Option<String>,
    /// Credits, bypassing the price book.
    #[arg(long)]
    pub cost: Option<String>,
}

#[derive(Debug, Args)]
pub struct AuthorizeArgs {
    pub account: String,
    #[command(flatten)]
    pub usage: UsageInput,
    /// How long the hold lasts ("15m"); default: the server's (15 minutes).
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    #[arg(long, default_value = "")]
    pub actor: String,
    /// strict or cached; default: the account's.
    #[arg(long)]
    pub mode: Option<String>,
    /// key=value, repeatable.
    #[arg(long)]
    pub metadata: Vec<String>,
    #[command(flatten)]
    pub mutation: Mutation,
}

/// A hold, named by its id or by the idempotency key of the Authorize that placed it.
#[derive(Debug, Args)]
pub struct HoldName {
    /// The hold's id, as authorize printed it; or give --authorize-key instead.
    pub hold: Option<String>,
    /// The idempotency key the hold was authorized with, instead of its id.
    #[arg(long, value_name = "KEY")]
    pub authorize_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct CaptureArgs {
    pub account: String,
    #[command(flatten)]
    pub hold: HoldName,
    /// At most the held amount; default: all of it.
    #[arg(long)]
    pub amount: Option<String>,
    #[command(flatten)]
    pub mutation: Mutation,
}

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    pub account: String,
    #[command(flatten)]
    pub hold: HoldName,
    #[command(flatten)]
    pub mutation: Mutation,
}

#[derive(Debug, Args)]
pub struct DebitArgs {
    pub account: String,
    #[command(flatten)]
    pub usage: UsageInput,
    #[arg(long, default_value = "")]
    pub actor: String,
    /// strict or cached; default: the account's.
    #[arg(long)]
    pub mode: Option<String>,
    /// When the usage happened; default: now.
    #[arg(long)]
    pub event_time: Option<String>,
    /// key=value, repeatable.
    #[arg(long)]
    pub metadata: Vec<String>,
    #[command(flatten)]
    pub mutation: Mutation,
}

#[derive(Debug, Args)]
pub struct ReverseArgs {
    pub account: String,
    /// The debit's id as the edge returned it (its idempotency key).
    pub debit: String,
    #[command(flatten)]
    pub mutation: Mutation,
}

#[derive(Debug, Args)]
pub struct QuoteArgs {
    pub account: String,
    #[command(flatten)]
    pub usage: UsageInput,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
