//! Admin `GetBalance` tells the account's balance — its grants effective and unexpired now,
//! less holds in flight in every region, less debt: the figure an edge's `GetBalance`, the
//! console and the widget give — with the terms it is made of, and the ledger's own sum apart.
//! Over real gRPC on the embedded node (SQLite ledger, in-process region).

mod common;

use common::grpc::{
    admin_balance, chat_at_one_credit, create_account, edge_balance, grant, grant_at, hold,
    now_seconds,
};
use common::Node;
use tollgate_proto::pb;

const DAY_S: i64 = 24 * 60 * 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_balance_counts_grants_effective_now_less_holds_in_flight() {
    let node = Node::start().await;
    let mut admin = node.admin();
    let mut edge = node.edge();
    chat_at_one_credit(&mut admin, "").await;
    create_account(&mut admin, "acme").await;
    grant(&mut admin, "acme", "today", "10").await;
    let tomorrow_s = now_seconds() + DAY_S;
    grant_at(&mut admin, "acme", "tomorrow", "5", 0, Some(tomorrow_s)).await;

    // Today's grant only; tomorrow's is named with its start, and only the ledger's sum counts it.
    let told = admin_balance(&mut admin, "acme").await;
    let balance = told.balance.clone().expect("a balance");
    assert_eq!(balance.balance, "10", "{told:?}");
    assert_eq!(told.ledger_balance, "15", "{told:?}");
    assert_eq!(told.effective, "10", "{told:?}");
    assert_eq!(told.held, "0", "{told:?}");
    assert_eq!(balance.debt, "0", "{told:?}");
    assert_eq!(
        told.upcoming,
        [pb::GrantAside {
            grant_id: "tomorrow".into(),
            remaining: "5".into(),
            at: Some(prost_types::Timestamp {
                seconds: tomorrow_s,
                nanos: 0,
            }),
        }],
        "{told:?}"
    );
    assert!(told.lapsed.is_empty(), "{told:?}");
    assert!(told.holds_unread.is_empty(), "{told:?}");

    // A hold in flight lowers it at once, to the figure the edge answers.
    hold(&mut edge, "acme", "hold-1", "3").await;
    let told = admin_balance(&mut admin, "acme").await;
    assert_eq!(told.balance.as_ref().unwrap().balance, "7", "{told:?}");
    assert_eq!(told.held, "3", "{told:?}");
    assert_eq!(
        told.ledger_balance, "15",
        "the ledger knows nothing of the hold"
    );
    let edge_says = edge_balance(&mut edge, "acme").await;
    assert_eq!(
        edge_says.balance.unwrap().balance,
        told.balance.unwrap().balance,
        "Admin and the edge tell one balance"
    );
    node.stop().await;
}
