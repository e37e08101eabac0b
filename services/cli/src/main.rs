//! `tollgate`: the operator and support command line. It talks gRPC to the authority's Admin API
//! and the edge's Enforcement API; it owns no state and no rule. Output is a table for people or
//! JSON for scripts (`--json`); exit codes are stable (see `error.rs` and `tollgate --help`).

mod admin;
mod cli;
mod client;
mod enforce;
mod error;
mod explain;
mod output;
mod parked;
mod parse;
mod render;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use cli::{Cli, Command, CompletionShell};
use client::Connection;
use error::CliError;
use output::Out;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            // clap answers 0 for --help and --version, 2 for usage errors.
            return ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(error::EXIT_USAGE));
        }
    };
    if let Command::Completions { shell } = &cli.command {
        print_completions(*shell);
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(error::EXIT_OTHER);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

fn print_completions(shell: CompletionShell) {
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "tollgate",
        &mut std::io::stdout(),
    );
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let conn = Connection::new(
        &cli.endpoint,
        cli.edge_endpoint.as_deref(),
        cli.api_key.as_deref(),
        cli.timeout,
    )?
    .with_tls(
        cli.tls_ca.as_deref(),
        cli.tls_cert.as_deref().zip(cli.tls_key.as_deref()),
    )?;
    let out = Out { json: cli.json };
    match cli.command {
        Command::Accounts(command) => admin::accounts(&conn, &out, command).await,
        Command::Features(command) => admin::features(&conn, &out, command).await,
        Command::Prices(command) => admin::prices(&conn, &out, command).await,
        Command::Grants(command) => admin::grants(&conn, &out, command).await,
        Command::Schedules(command) => admin::schedules(&conn, &out, command).await,
        Command::Balance(args) => admin::balance(&conn, &out, args).await,
        Command::Ledger(args) => explain::ledger(&conn, &out, args).await,
        Command::Usage(args) => admin::usage(&conn, &out, args).await,
        Command::Revenue(command) => admin::revenue(&conn, &out, command).await,
        Command::Refund(args) => admin::refund(&conn, &out, args).await,
        Command::Adjust(args) => admin::adjust(&conn, &out, args).await,
        Command::Verify(args) => admin::verify(&conn, &out, args).await,
        Command::Explain(args) => explain::explain(&conn, &out, args).await,
        Command::Events(command) => explain::events(&conn, &out, command).await,
        Command::Parked(command) => parked::parked(&conn, &out, command).await,
        Command::Authorize(args) => enforce::authorize(&conn, &out, args).await,
        Command::Capture(args) => enforce::capture(&conn, &out, args).await,
        Command::Release(args) => enforce::release(&conn, &out, args).await,
        Command::Debit(args) => enforce::debit(&conn, &out, args).await,
        Command::Reverse(args) => enforce::reverse(&conn, &out, args).await,
        Command::Quote(args) => enforce::quote(&conn, &out, args).await,
        Command::Completions { .. } => Ok(()),
    }
}
