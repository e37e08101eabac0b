//! `tollgate parked list|resolve` end to end against a real `tollgate-authority dev` process:
//! usage the ledger refused (a correction written into the ledger file behind the authority's
//! back took the credits the region was still spending) is listed, charged once a grant pays for it, written off with a reason, replayed,
//! and bad input exits with the codes scripts rely on.

mod common;
#[path = "../../authority/tests/support/ledger_only.rs"]
mod ledger_only;

use std::time::Duration;

use common::{seed, wait_for_balance, DevNode};

/// How many times the test polls for the parked records (100 ms apart).
const PARKED_POLLS_MAX: u32 = 300;

fn open_records(node: &DevNode) -> Vec<serde_json::Value> {
    let mut records = Vec::new();
    for _ in 0..PARKED_POLLS_MAX {
        let run = node
            .tollgate(&[
                "--json",
                "parked",
                "list",
                "--account",
                "acme",
                "--state",
                "open",
            ])
            .ok();
        records = run.json()["parked"].as_array().unwrap().clone();
        if records.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    records
}

#[test]
fn parked_usage_is_listed_charged_and_written_off_through_the_cli() {
    let node = DevNode::start();
    seed(&node);
    let debit = |key: &str, cost: &str| {
        node.tollgate(&[
            "debit",
            "acme",
            "--feature",
            "chat",
            "--cost",
            cost,
            "--idempotency-key",
            key,
        ])
        .ok();
    };
    debit("d1", "1");
    assert_eq!(wait_for_balance(&node, "acme", "9"), "9");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(ledger_only::take_away(
            &node.data(),
            "acme",
            "9",
            "taken-back",
        ));
    debit("d2", "2");
    debit("d3", "1");

    let open = open_records(&node);
    assert_eq!(open.len(), 2, "{open:?}");
    assert_eq!(open[0]["key"], "d2");
    assert_eq!(open[0]["cost"], "2");
    assert_eq!(open[0]["state"], "open");
    assert_eq!(open[1]["key"], "d3");
    let (first, second) = (
        open[0]["id"].as_str().unwrap().to_owned(),
        open[1]["id"].as_str().unwrap().to_owned(),
    );
    let table = node.tollgate(&["parked", "list"]).ok();
    assert!(table.stdout.starts_with("id"), "{table:?}");
    assert!(
        table.stdout.contains("d2") && table.stdout.contains("open"),
        "{table:?}"
    );

    // Nothing pays for it yet: refused, exit 1, the reason on stderr.
    let refused = node.tollgate(&["parked", "resolve", &first, "--charge"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("cannot pay"), "{refused:?}");

    node.tollgate(&[
        "grants",
        "issue",
        "acme",
        "--amount",
        "5",
        "--grant-id",
        "later",
    ])
    .ok();
    let charge = [
        "--json",
        "parked",
        "resolve",
        &first,
        "--charge",
        "--idempotency-key",
        "r1",
    ];
    let charged = node.tollgate(&charge).ok().json();
    assert_eq!(charged["record"]["resolution"], "charged");
    assert_eq!(charged["record"]["charged"], "2");
    assert_eq!(charged["record"]["state"], "resolved");
    assert_eq!(charged["replayed"], false);
    let again = node.tollgate(&charge).ok().json();
    assert_eq!(again["replayed"], true);
    assert_eq!(again["record"], charged["record"]);
    assert_eq!(wait_for_balance(&node, "acme", "3"), "3");

    // A write-off needs a reason (exit 2, the flag named, nothing sent).
    let bare = node.tollgate(&["parked", "resolve", &second, "--write-off"]);
    assert_eq!(bare.code, 2, "{bare:?}");
    assert!(bare.stderr.contains("--reason"), "{bare:?}");
    let written = node
        .tollgate(&[
            "--json",
            "parked",
            "resolve",
            &second,
            "--write-off",
            "--reason",
            "goodwill",
        ])
        .ok()
        .json();
    assert_eq!(written["record"]["resolution"], "written_off");
    assert_eq!(written["record"]["resolution_reason"], "goodwill");
    let resolved = node
        .tollgate(&["--json", "parked", "list", "--state", "resolved"])
        .ok()
        .json();
    assert_eq!(
        resolved["parked"].as_array().unwrap().len(),
        2,
        "{resolved}"
    );
    let table = node
        .tollgate(&["parked", "list", "--state", "resolved"])
        .ok();
    assert!(table.stdout.contains("written_off"), "{table:?}");
    assert_eq!(wait_for_balance(&node, "acme", "3"), "3");

    // Unknown id: exit 3; neither or both actions, or a bad state: exit 2.
    let unknown = node.tollgate(&["parked", "resolve", "999", "--write-off", "--reason", "x"]);
    assert_eq!(unknown.code, 3, "{unknown:?}");
    let neither = node.tollgate(&["parked", "resolve", &first]);
    assert_eq!(neither.code, 2, "{neither:?}");
    let both = node.tollgate(&["parked", "resolve", &first, "--charge", "--write-off"]);
    assert_eq!(both.code, 2, "{both:?}");
    let state = node.tollgate(&["parked", "list", "--state", "closed"]);
    assert_eq!(state.code, 2, "{state:?}");
}
