//! The region conformance suite, run against the in-memory store and a real redis-server.

use tollgate_region::conformance as suite;
use tollgate_region::{MemoryRegionStore, RedisRegionStore, RETAIN_MS_DEFAULT};
use tollgate_testkit::RedisServer;

/// A redis-server of the test's own, and a store on it. Each test owns its server, so the server
/// is stopped when the test ends (a server shared through a static would never be dropped).
async fn redis_store(test: &str) -> (RedisServer, RedisRegionStore) {
    let server = RedisServer::start().expect("start redis-server for the conformance suite");
    let store = RedisRegionStore::connect(&server.url(), &format!("tg:{test}"), RETAIN_MS_DEFAULT)
        .await
        .expect("connect to the test redis-server");
    (server, store)
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $check() {
                    suite::$check(&MemoryRegionStore::default()).await;
                }
            )*
        }
        mod redis {
            use super::*;
            $(
                #[tokio::test]
                async fn $check() {
                    let (_server, store) = redis_store(stringify!($check)).await;
                    suite::$check(&store).await;
                }
            )*
        }
    };
}

conformance!(
    segments_install_top_up_and_take_back,
    spent_segments_leave_and_come_back_with_their_terms,
    debit_draws_in_burn_down_order,
    debit_at_the_expiry_boundary,
    debit_honours_the_overdraft_limit,
    forced_debits_are_recorded_beyond_the_room,
    replays_are_charged_once,
    a_quantity_retried_at_another_price_is_the_same_request,
    authorize_replays_return_the_first_hold,
    holds_capture_partially,
    expired_holds_give_credits_back,
    hold_refusals_are_typed,
    leases_take_settle_and_return,
    a_settlement_sent_again_after_a_lost_reply_is_recorded_once,
    a_reused_key_with_another_request_is_charged_under_a_derived_key,
    the_same_request_decided_again_is_a_duplicate,
    expired_leases_give_credits_back,
    rate_limits_refuse_and_refill,
    usage_stream_delivers_until_acknowledged,
    reads_say_when_they_reach_the_streams_end,
    out_of_range_amounts_are_refused,
    reversals_give_a_debit_back,
    take_back_waits_until_usage_is_reconciled,
    publications_reach_readers_with_a_notice,
    moves_are_counted_and_stamped_on_summaries,
);

/// Redis answers exactly as the in-memory reference over seeded random operation sequences.
#[tokio::test]
async fn redis_gives_the_same_answers_as_memory() {
    let (_server, store) = redis_store("agreement").await;
    suite::same_answers_as_the_reference(&store, 0..40).await;
}

/// After `SCRIPT FLUSH` Redis answers NOSCRIPT to EVALSHA; the store sends the script again.
#[tokio::test]
async fn scripts_are_reloaded_after_noscript() {
    let (_server, store) = redis_store("noscript").await;
    let a = suite::account("acct-noscript");
    suite::install(&store, &a, suite::segment("g", "5", 50, None)).await;
    let mut connection = store.connection();
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut connection)
        .await
        .expect("script flush");
    let outcome = tollgate_region::RegionStore::debit(
        &store,
        &suite::debit_command(&a, "after-flush", "gen", "1", suite::at(1)),
    )
    .await
    .expect("debit after SCRIPT FLUSH");
    assert!(matches!(outcome, tollgate_region::DebitOutcome::Allowed(_)));
}
