//! Shared shapes of output: a mutation's receipt or refusal, pages of a list.

use std::future::Future;

use serde_json::{json, Value};
use tollgate_proto::pb;

use crate::cli::Page;
use crate::error::CliError;
use crate::render;

/// Most pages `--all` follows: a bound on the walk, far above any real account's history at the
/// largest page size.
pub const PAGES_MAX: usize = 100_000;

/// Where results go, and in which form.
pub struct Out {
    pub json: bool,
}

impl Out {
    /// Prints a result: `json` with `--json`, otherwise the `human` text.
    pub fn print(&self, json: Value, human: impl FnOnce() -> String) {
        if self.json {
            render::print_json(&json);
        } else {
            print!("{}", human());
        }
    }

    /// A ledger mutation's reply: its receipt, or its refusal as an error (exit 4).
    pub fn mutation(&self, key: &str, reply: pb::MutationReply) -> Result<(), CliError> {
        match reply.outcome {
            Some(pb::mutation_reply::Outcome::Done(receipt)) => {
                let value = render::with(render::receipt(&receipt), "idempotency_key", json!(key));
                self.print(value, || receipt_text(key, &receipt));
                Ok(())
            }
            Some(pb::mutation_reply::Outcome::Refused(refusal)) => self.refused(key, refusal),
            None => Err(CliError::Other(
                "the server's reply carried neither a receipt nor a refusal".into(),
            )),
        }
    }

    /// Prints a refusal (as JSON with `--json`) and turns it into the error that exits 4.
    pub fn refused(&self, key: &str, refusal: pb::Refusal) -> Result<(), CliError> {
        if self.json {
            let value = render::with(render::refusal(&refusal), "idempotency_key", json!(key));
            render::print_json(&value);
        } else if !key.is_empty() {
            println!("idempotency key: {key}");
        }
        Err(CliError::Refused(Box::new(refusal)))
    }

    /// A list: one page or all of them; JSON `{ <name>: [...], next_page_token }`.
    pub fn list(
        &self,
        name: &str,
        items: Vec<Value>,
        next_page_token: &str,
        table: impl FnOnce() -> String,
    ) {
        if self.json {
            render::print_json(&json!({ name: items, "next_page_token": next_page_token }));
            return;
        }
        print!("{}", table());
        if !next_page_token.is_empty() {
            println!("more: --page-token {next_page_token}");
        }
    }
}

fn receipt_text(key: &str, receipt: &pb::Receipt) -> String {
    let mut text = render::fields(&[
        ("account", receipt.account_id.clone()),
        ("grant", receipt.grant_id.clone()),
        ("balance after", receipt.balance_after.clone()),
        (
            "entries",
            if receipt.first_seq == 0 {
                "none".into()
            } else {
                format!("{}..={}", receipt.first_seq, receipt.last_seq)
            },
        ),
        ("recorded at", render::time(&receipt.recorded_at)),
        ("replayed", receipt.replayed.to_string()),
        ("idempotency key", key.to_string()),
    ]);
    if !receipt.movements.is_empty() {
        let rows: Vec<Vec<String>> = receipt
            .movements
            .iter()
            .map(|m| {
                vec![
                    render::entry_kind(m.kind),
                    m.amount.clone(),
                    m.grant_id.clone(),
                ]
            })
            .collect();
        text.push('\n');
        text.push_str(&render::table(&["movement", "amount", "grant"], &rows));
    }
    text
}

/// Fetches one page (from `--page-token`) or, with `--all`, every page; returns the items and
/// the token of the next page (empty after the last).
pub async fn pages<T, F, Fut>(page: &Page, mut fetch: F) -> Result<(Vec<T>, String), CliError>
where
    F: FnMut(u32, String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), CliError>>,
{
    let size = page.limit.unwrap_or(0);
    let mut token = page.page_token.clone().unwrap_or_default();
    let mut items = Vec::new();
    for _ in 0..PAGES_MAX {
        let (mut batch, next) = fetch(size, token).await?;
        items.append(&mut batch);
        if !page.all || next.is_empty() {
            return Ok((items, next));
        }
        token = next;
    }
    Err(CliError::Other(format!(
        "stopped after {PAGES_MAX} pages; use --limit and --page-token to continue"
    )))
}
