//! `tollgate` end to end against a real `tollgate-authority dev` process: the operator's and
//! support's commands, their table and JSON output, pagination, and the exit codes scripts use.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::Duration;

use common::{command, seed, tollgate, wait_for_balance, DevNode, KEY};

/// How many pages the pagination walk may take before the test gives up.
const PAGES_WALKED_MAX: usize = 100;
/// How many times the test polls the event tail for its exit (100 ms apart).
const TAIL_POLLS_MAX: u32 = 300;

#[test]
fn an_operator_issues_credits_and_support_explains_a_debit() {
    let node = DevNode::start();
    seed(&node);

    // Features and prices read back.
    let features = node.tollgate(&["--json", "features", "list"]).ok().json();
    assert_eq!(features["features"][0]["feature"], "chat");
    let prices = node.tollgate(&["prices", "list"]).ok();
    assert!(prices.stdout.contains("default"), "{prices:?}");
    assert!(prices.stdout.contains("0.5"), "{prices:?}");

    // A debit through the Enforcement API, with a key chosen by the caller.
    let debit = node
        .tollgate(&[
            "--json",
            "debit",
            "acme",
            "--feature",
            "chat",
            "--quantity",
            "3",
            "--actor",
            "alice",
            "--idempotency-key",
            "checkout-1",
        ])
        .ok()
        .json();
    assert_eq!(debit["priced"]["cost"], "1.5");
    assert_eq!(debit["idempotency_key"], "checkout-1");
    assert_eq!(debit["draws"][0]["grant_id"], "welcome");

    // A mutation without a key gets a generated one, printed.
    let quote = node
        .tollgate(&["quote", "acme", "--feature", "chat", "--quantity", "2"])
        .ok();
    assert!(quote.stdout.contains("affordable"), "{quote:?}");
    let second = node
        .tollgate(&["debit", "acme", "--feature", "chat", "--quantity", "1"])
        .ok();
    assert!(
        second.stdout.contains("idempotency key  cli-"),
        "{second:?}"
    );

    // The background loop reconciles both debits into the ledger: 10 - 1.5 - 0.5.
    assert_eq!(wait_for_balance(&node, "acme", "8"), "8");
    let table = node.tollgate(&["balance", "acme"]).ok();
    assert!(table.stdout.contains("debited          2"), "{table:?}");

    // The ledger as a table and as JSON, filtered by kind.
    let ledger = node.tollgate(&["ledger", "acme"]).ok();
    let header = ledger.stdout.lines().next().unwrap();
    assert!(header.starts_with("seq  event time"), "{ledger:?}");
    assert_eq!(ledger.stdout.lines().count(), 4, "{ledger:?}");
    let debits = node
        .tollgate(&["--json", "ledger", "acme", "--kind", "debit"])
        .ok()
        .json();
    let debits = debits["entries"].as_array().unwrap().clone();
    assert_eq!(debits.len(), 2);
    assert!(debits.iter().all(|e| e["kind"] == "debit"));

    // Pagination: one entry per page, walking the tokens, gives what --all gives.
    let all = node
        .tollgate(&["--json", "ledger", "acme", "--all"])
        .ok()
        .json();
    let all_seqs: Vec<u64> = all["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(all_seqs, vec![1, 2, 3]);
    let mut walked = Vec::new();
    let mut token = String::new();
    for _ in 0..PAGES_WALKED_MAX {
        let mut args = vec!["--json", "ledger", "acme", "--limit", "1"];
        if !token.is_empty() {
            args.extend(["--page-token", token.as_str()]);
        }
        let page = node.tollgate(&args).ok().json();
        let entries = page["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 1, "{page}");
        walked.push(entries[0]["seq"].as_u64().unwrap());
        token = page["next_page_token"].as_str().unwrap().to_string();
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(walked, all_seqs);
    let first_page = node.tollgate(&["ledger", "acme", "--limit", "1"]).ok();
    assert!(
        first_page.stdout.contains("more: --page-token "),
        "{first_page:?}"
    );

    // Explain the first debit, found by the key it was made with.
    let explained = node
        .tollgate(&["--json", "explain", "checkout-1", "--account", "acme"])
        .ok()
        .json();
    assert_eq!(explained["charged"], "1.5");
    assert_eq!(explained["price_version"], 1);
    assert_eq!(explained["price_rule"], "default");
    assert_eq!(explained["rate"], "0.5");
    // The entry keeps what was asked for and the unit it was counted in.
    assert_eq!(explained["quantity"], "3");
    assert_eq!(explained["unit"], "message");
    assert_eq!(explained["actor_id"], "alice");
    assert_eq!(explained["feature"], "chat");
    assert_eq!(explained["burned"][0]["grant_id"], "welcome");
    assert_eq!(explained["burned"][0]["amount"], "1.5");
    assert_eq!(explained["burned"][0]["grant_source"], "promo");
    let debit_id = explained["debit_id"].as_str().unwrap().to_string();
    let by_id = node
        .tollgate(&["explain", &debit_id, "--account", "acme"])
        .ok();
    assert!(
        by_id
            .stdout
            .contains("3 message × 0.5 credits, price book version 1, rule default"),
        "{by_id:?}"
    );
    assert!(by_id.stdout.contains("alice"), "{by_id:?}");

    // Refund part of it, by the key again; explain shows the refund.
    let refund = node
        .tollgate(&[
            "--json",
            "refund",
            "acme",
            "checkout-1",
            "--amount",
            "0.5",
            "--memo",
            "failed generation",
        ])
        .ok()
        .json();
    assert_eq!(refund["balance_after"], "8.5");
    assert_eq!(refund["movements"][0]["kind"], "refund");
    assert!(refund["idempotency_key"]
        .as_str()
        .unwrap()
        .starts_with("cli-"));
    let explained = node
        .tollgate(&["--json", "explain", &debit_id, "--account", "acme"])
        .ok()
        .json();
    assert_eq!(explained["refunded"], "0.5");

    // The ledger verifies; grants, usage and revenue answer.
    let verified = node.tollgate(&["--json", "verify"]).ok().json();
    assert_eq!(verified["ok"], true);
    assert_eq!(verified["entries_checked"], 4);
    let grants = node
        .tollgate(&["--json", "grants", "list", "acme"])
        .ok()
        .json();
    assert_eq!(grants["grants"][0]["remaining"], "8.5");
    let usage = node
        .tollgate(&["--json", "usage", "acme", "--by", "feature"])
        .ok()
        .json();
    // Usage counts credits net of refunds: 1.5 + 0.5 debited, 0.5 refunded.
    assert_eq!(usage["rows"][0]["credits"], "1.5");
    let revenue = node.tollgate(&["--json", "revenue", "report"]).ok().json();
    assert_eq!(revenue["lines"][0]["credits_sold"], "10");
}

#[test]
fn events_tail_prints_what_happens_and_stops_at_its_limit() {
    let node = DevNode::start();
    seed(&node);
    let mut tail = command()
        .args(["--endpoint", &node.endpoint(), "--api-key", KEY, "--json"])
        .args(["events", "tail", "--account", "acme", "--limit", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The tail says when its stream is open; events from then on reach it. The read ends at
    // that line or when the process exits (end of file).
    let mut stderr = BufReader::new(tail.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.starts_with("watching events"), "{line:?}");

    // Taking every credit away exhausts the balance: one balance.exhausted event.
    node.tollgate(&["adjust", "acme", "--amount=-10", "--memo", "close out"])
        .ok();
    let mut status = None;
    for _ in 0..TAIL_POLLS_MAX {
        status = tail.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if status.is_none() {
        let _ = tail.kill();
        let _ = tail.wait();
        panic!("events tail did not stop after one event");
    }
    assert!(status.unwrap().success());
    let mut stdout = String::new();
    tail.stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let event: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(event["type"], "balance.exhausted");
    assert_eq!(event["account_id"], "acme");
    assert_eq!(event["attributes"]["balance"], "0");
}

#[test]
fn errors_exit_with_the_codes_scripts_rely_on() {
    let node = DevNode::start();
    seed(&node);

    // 2: a bad amount, named, before anything is sent.
    let bad = node.tollgate(&["grants", "issue", "acme", "--amount", "ten"]);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.starts_with("error: --amount: "), "{bad:?}");
    assert_eq!(bad.stderr.lines().count(), 1, "{bad:?}");
    // 2: the server's INVALID_ARGUMENT names its field too.
    let bad_id = node.tollgate(&["accounts", "create", "has space"]);
    assert_eq!(bad_id.code, 2, "{bad_id:?}");
    assert!(bad_id.stderr.contains("account_id"), "{bad_id:?}");
    // 2: clap's usage errors.
    let usage = node.tollgate(&["ledger"]);
    assert_eq!(usage.code, 2, "{usage:?}");

    // 3: an unknown account.
    let missing = node.tollgate(&["balance", "nobody"]);
    assert_eq!(missing.code, 3, "{missing:?}");
    assert!(missing.stderr.contains("not found"), "{missing:?}");
    let missing_debit = node.tollgate(&["explain", "never-made", "--account", "acme"]);
    assert_eq!(missing_debit.code, 3, "{missing_debit:?}");

    // 4: a refused debit, with the refusal's code and amounts; nothing moved.
    let refused = node.tollgate(&["debit", "acme", "--feature", "chat", "--quantity", "1000"]);
    assert_eq!(refused.code, 4, "{refused:?}");
    assert!(
        refused.stderr.contains("insufficient_credits"),
        "{refused:?}"
    );
    assert!(refused.stderr.contains("shortfall 490"), "{refused:?}");
    let refused_json = node.tollgate(&[
        "--json",
        "debit",
        "acme",
        "--feature",
        "chat",
        "--quantity",
        "1000",
    ]);
    assert_eq!(refused_json.code, 4);
    assert_eq!(
        refused_json.json()["refused"]["code"],
        "insufficient_credits"
    );

    // 5: a wrong API key.
    let wrong = tollgate(&node.endpoint(), "not-the-key", &["balance", "acme"]);
    assert_eq!(wrong.code, 5, "{wrong:?}");
    assert!(wrong.stderr.contains("unauthenticated"), "{wrong:?}");

    // Accounts are listed a page at a time (acme was created above).
    let list = node.tollgate(&["accounts", "list", "--all"]);
    assert_eq!(list.code, 0, "{list:?}");
    assert!(list.stdout.contains("acme"), "{list:?}");

    // 6: nothing listening (the node is stopped; its port is closed).
    let endpoint = node.endpoint();
    let port = node.port;
    drop(node);
    assert!(tollgate_testkit::process::wait_port_closed(
        port,
        Duration::from_secs(10)
    ));
    let down = tollgate(&endpoint, KEY, &["balance", "acme"]);
    assert_eq!(down.code, 6, "{down:?}");
    assert!(down.stderr.starts_with("error: cannot reach"), "{down:?}");
}

#[test]
fn help_has_examples_and_exit_codes_and_completions_generate() {
    let help = command().arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    for wanted in [
        "Exit codes:",
        "Examples:",
        "--endpoint",
        "--api-key",
        "--json",
    ] {
        assert!(help.contains(wanted), "{wanted} missing from:\n{help}");
    }
    for sub in [
        vec!["ledger", "--help"],
        vec!["explain", "--help"],
        vec!["grants", "issue", "--help"],
        vec!["events", "tail", "--help"],
        vec!["debit", "--help"],
    ] {
        let output = command().args(&sub).output().unwrap();
        assert!(output.status.success(), "{sub:?}");
        let text = String::from_utf8(output.stdout).unwrap();
        assert!(text.contains("Examples:"), "{sub:?}:\n{text}");
    }
    for (shell, wanted) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef tollgate"),
        ("fish", "complete -c tollgate"),
    ] {
        let output = command().args(["completions", shell]).output().unwrap();
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8(output.stdout).unwrap();
        assert!(script.contains(wanted), "{shell}:\n{script}");
        assert!(script.contains("explain"), "{shell}");
    }
    let unknown_shell = command().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(unknown_shell.status.code(), Some(2));
}

#[test]
fn holds_schedules_and_grant_corrections_through_the_cli() {
    let node = DevNode::start();
    seed(&node);

    // A hold, captured in part: the rest goes back.
    let held = node
        .tollgate(&[
            "--json",
            "authorize",
            "acme",
            "--feature",
            "chat",
            "--quantity",
            "4",
            "--ttl",
            "10m",
            "--idempotency-key",
            "hold-1",
        ])
        .ok()
        .json();
    assert_eq!(held["priced"]["cost"], "2");
    let hold = held["hold_id"].as_str().unwrap().to_string();
    let captured = node
        .tollgate(&[
            "--json",
            "capture",
            "acme",
            &hold,
            "--amount",
            "1.5",
            "--idempotency-key",
            "capture-1",
        ])
        .ok()
        .json();
    assert_eq!(captured["captured"], "1.5");
    assert_eq!(captured["released"], "0.5");
    // Releasing a captured hold is a typed refusal: exit 4.
    let release = node.tollgate(&["release", "acme", &hold]);
    assert_eq!(release.code, 4, "{release:?}");
    assert!(
        release.stderr.contains("hold_already_captured"),
        "{release:?}"
    );

    // The capture reaches the ledger and explains by its key.
    assert_eq!(wait_for_balance(&node, "acme", "8.5"), "8.5");
    let explained = node
        .tollgate(&["--json", "explain", "capture-1", "--account", "acme"])
        .ok()
        .json();
    assert_eq!(explained["charged"], "1.5");
    assert_eq!(explained["price_version"], 1);
    assert_eq!(explained["hold_id"].as_str(), Some(hold.as_str()));

    // A schedule, listed and cancelled.
    node.tollgate(&[
        "schedules",
        "create",
        "acme",
        "--schedule-id",
        "monthly",
        "--amount",
        "100",
        "--period",
        "month",
        "--rollover",
        "max:50",
    ])
    .ok();
    let schedules = node
        .tollgate(&["--json", "schedules", "list", "acme"])
        .ok()
        .json();
    assert_eq!(schedules["schedules"][0]["schedule_id"], "monthly");
    assert_eq!(schedules["schedules"][0]["rollover"], "max:50");
    node.tollgate(&["schedules", "cancel", "acme", "monthly"])
        .ok();

    // A second price book version from a JSON file.
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.json");
    std::fs::write(
        &prices,
        r#"{"version": 2, "effective_from": "2021-01-01", "default_rates": {"chat": "0.25"}}"#,
    )
    .unwrap();
    node.tollgate(&["prices", "publish", prices.to_str().unwrap()])
        .ok();
    let versions = node.tollgate(&["--json", "prices", "list"]).ok().json();
    assert_eq!(versions["versions"].as_array().unwrap().len(), 2);
    // A bad rate in a file names the table and the feature.
    std::fs::write(
        &prices,
        r#"{"version": 3, "effective_from": "2021-01-01", "default_rates": {"chat": "cheap"}}"#,
    )
    .unwrap();
    let bad = node.tollgate(&["prices", "publish", prices.to_str().unwrap()]);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("default_rates.chat"), "{bad:?}");

    // Void what is left of a grant; a second void with a new key is refused (exit 4).
    node.tollgate(&[
        "grants",
        "issue",
        "acme",
        "--amount",
        "5",
        "--grant-id",
        "extra",
    ])
    .ok();
    let voided = node
        .tollgate(&[
            "--json", "grants", "void", "acme", "extra", "--memo", "mistake",
        ])
        .ok()
        .json();
    assert_eq!(voided["movements"][0]["kind"], "void");
    let again = node.tollgate(&["grants", "void", "acme", "extra"]);
    assert_eq!(again.code, 4, "{again:?}");
    let open = node
        .tollgate(&["--json", "grants", "list", "acme", "--open-only"])
        .ok()
        .json();
    assert!(open["grants"]
        .as_array()
        .unwrap()
        .iter()
        .all(|g| g["grant_id"] != "extra"));

    // A replayed mutation with the same key moves nothing and says so.
    let first = node
        .tollgate(&[
            "--json",
            "adjust",
            "acme",
            "--amount",
            "1",
            "--memo",
            "goodwill",
            "--idempotency-key",
            "adj-1",
        ])
        .ok()
        .json();
    let replay = node
        .tollgate(&[
            "--json",
            "adjust",
            "acme",
            "--amount",
            "1",
            "--memo",
            "goodwill",
            "--idempotency-key",
            "adj-1",
        ])
        .ok()
        .json();
    assert_eq!(first["replayed"], false);
    assert_eq!(replay["replayed"], true);
    assert_eq!(replay["balance_after"], first["balance_after"]);

    // Taking more than the account holds and its overdraft allows is refused (exit 4), saying
    // what the balance would be; said explicitly, it goes through.
    let beyond = node.tollgate(&["adjust", "acme", "--amount=-100000", "--memo", "write-off"]);
    assert_eq!(beyond.code, 4, "{beyond:?}");
    assert!(
        beyond.stderr.contains("beyond its overdraft limit"),
        "{beyond:?}"
    );
    let forced = node
        .tollgate(&[
            "--json",
            "adjust",
            "acme",
            "--amount=-100000",
            "--memo",
            "write-off",
            "--beyond-overdraft",
        ])
        .ok()
        .json();
    assert!(
        forced["balance_after"]
            .as_str()
            .is_some_and(|b| b.starts_with('-')),
        "{forced}"
    );
}

/// Authorizes `quantity` chat messages for `acme` under `key`; answers the hold's id.
fn authorize(node: &DevNode, quantity: &str, key: &str) -> String {
    let held = node
        .tollgate(&[
            "--json",
            "authorize",
            "acme",
            "--feature",
            "chat",
            "--quantity",
            quantity,
            "--idempotency-key",
            key,
        ])
        .ok()
        .json();
    held["hold_id"].as_str().unwrap().to_owned()
}

#[test]
fn capture_and_release_name_the_hold_by_its_authorize_key() {
    let node = DevNode::start();
    seed(&node);

    authorize(&node, "4", "hold-a");
    let captured = node
        .tollgate(&[
            "--json",
            "capture",
            "acme",
            "--authorize-key",
            "hold-a",
            "--amount",
            "1.5",
        ])
        .ok()
        .json();
    assert_eq!(captured["captured"], "1.5");
    assert_eq!(captured["released"], "0.5");
    authorize(&node, "2", "hold-b");
    let released = node
        .tollgate(&["--json", "release", "acme", "--authorize-key", "hold-b"])
        .ok()
        .json();
    assert_eq!(released["released"], "1");

    // Exactly one of the hold's id and --authorize-key: both or neither is a usage error that
    // names the flag, and nothing is sent.
    let hold = authorize(&node, "2", "hold-c");
    let both = node.tollgate(&["capture", "acme", &hold, "--authorize-key", "hold-c"]);
    assert_eq!(both.code, 2, "{both:?}");
    assert!(
        both.stderr.contains("error: --authorize-key:") && both.stderr.contains("not both"),
        "{both:?}"
    );
    let neither = node.tollgate(&["release", "acme"]);
    assert_eq!(neither.code, 2, "{neither:?}");
    assert!(
        neither
            .stderr
            .contains("error: --authorize-key: name the hold"),
        "{neither:?}"
    );
    // Nothing was sent: the hold is still there to release, by its id.
    let released = node
        .tollgate(&["--json", "release", "acme", &hold])
        .ok()
        .json();
    assert_eq!(released["released"], "1");
}

#[test]
fn balance_live_is_the_accounts_balance_after_debits_and_reconciliation() {
    let node = DevNode::start();
    seed(&node);
    let hold = authorize(&node, "4", "hold-a");
    node.tollgate(&["capture", "acme", &hold, "--amount", "1.5"])
        .ok();
    // A grant that starts later is in the ledger's sum, not in the account's balance.
    node.tollgate(&[
        "grants",
        "issue",
        "acme",
        "--amount",
        "5",
        "--grant-id",
        "later",
        "--effective-at",
        "2099-01-01",
    ])
    .ok();
    node.tollgate(&["debit", "acme", "--feature", "chat", "--quantity", "3"])
        .ok();
    // Reconciled: 10 + 5 - 1.5 captured - 1.5 debited in the ledger.
    assert_eq!(wait_for_balance(&node, "acme", "12"), "12");

    // --live: the account's balance now (10 - 1.5 - 1.5), what the region can spend, and no
    // ledger totals the edge does not keep.
    let live = node
        .tollgate(&["--json", "balance", "acme", "--live"])
        .ok()
        .json();
    assert_eq!(live["balance"]["balance"], "7", "{live}");
    assert_eq!(live["available"], "7", "{live}");
    assert_eq!(live["held"], "0", "{live}");
    assert!(live["region_available"].is_string(), "{live}");
    assert!(live["balance"].get("entry_count").is_none(), "{live}");
    assert!(live["balance"].get("totals").is_none(), "{live}");
    let table = node.tollgate(&["balance", "acme", "--live"]).ok();
    let balance_line = table
        .stdout
        .lines()
        .find(|line| line.starts_with("balance "))
        .unwrap_or_else(|| panic!("{table:?}"));
    assert!(balance_line.ends_with(" 7"), "{table:?}");
    assert!(!table.stdout.contains("entries"), "{table:?}");
    assert!(table.stdout.contains("this region can spend"), "{table:?}");
    // Without --live, the authority tells the same balance, then the ledger's sum, which
    // counts the grant that starts later, and names that grant with its start.
    let plain = node.tollgate(&["balance", "acme"]).ok();
    assert_eq!(figure(&plain.stdout, "balance"), "7", "{plain:?}");
    assert_eq!(figure(&plain.stdout, "ledger balance"), "12", "{plain:?}");
    assert_eq!(
        figure(&plain.stdout, "upcoming"),
        "later 5 from 2099-01-01T00:00:00.000Z",
        "{plain:?}"
    );
}

/// The value of the first `name  value` line of a `tollgate` table.
fn figure(table: &str, name: &str) -> String {
    table
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            rest.starts_with("  ").then(|| rest.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {name:?} line in {table}"))
}

#[test]
fn plain_balance_is_the_accounts_balance_less_holds_with_tomorrows_grant_named() {
    let node = DevNode::start();
    // `welcome`: 10 credits effective now; `tomorrow`: 5 credits that start in a day.
    seed(&node);
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    node.tollgate(&[
        "grants",
        "issue",
        "acme",
        "--amount",
        "5",
        "--grant-id",
        "tomorrow",
        "--effective-at",
        &tomorrow,
    ])
    .ok();
    let told = node.tollgate(&["--json", "balance", "acme"]).ok().json();
    assert_eq!(told["balance"], "10", "today's grant only: {told}");
    assert_eq!(told["ledger_balance"], "15", "{told}");
    assert_eq!(told["upcoming"][0]["grant_id"], "tomorrow", "{told}");
    assert_eq!(told["upcoming"][0]["at"], tomorrow.as_str(), "{told}");

    // A hold in flight (4 messages at 0.5) sets 2 credits aside: the balance says so at once,
    // the same figure the edge answers; the ledger's sum knows nothing of it.
    authorize(&node, "4", "in-flight");
    let told = node.tollgate(&["--json", "balance", "acme"]).ok().json();
    let live = node
        .tollgate(&["--json", "balance", "acme", "--live"])
        .ok()
        .json();
    assert_eq!(told["balance"], "8", "{told}");
    assert_eq!(told["held"], "2", "{told}");
    assert_eq!(told["ledger_balance"], "15", "{told}");
    assert_eq!(told["holds_unread"], serde_json::json!([]), "{told}");
    assert_eq!(live["balance"]["balance"], told["balance"], "{live}");

    // The table tells the balance first, then its terms and the grant left out.
    let table = node.tollgate(&["balance", "acme"]).ok();
    let names: Vec<&str> = table
        .stdout
        .lines()
        .map(|line| line.split("  ").next().unwrap_or_default())
        .collect();
    assert_eq!(
        names[..3],
        ["account", "balance", "effective now"],
        "{table:?}"
    );
    assert_eq!(figure(&table.stdout, "balance"), "8", "{table:?}");
    assert_eq!(figure(&table.stdout, "held"), "2", "{table:?}");
    assert_eq!(figure(&table.stdout, "ledger balance"), "15", "{table:?}");
    assert_eq!(
        figure(&table.stdout, "upcoming"),
        format!("tomorrow 5 from {tomorrow}"),
        "{table:?}"
    );
}

#[test]
fn a_server_that_never_answers_is_a_timeout_exit_6() {
    // A socket that accepts TCP connections (the kernel's backlog) but never speaks gRPC.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let output = command()
        .args(["--endpoint", &endpoint, "--api-key", KEY, "--timeout", "1s"])
        .args(["balance", "acme"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(6), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    drop(silent);
}
