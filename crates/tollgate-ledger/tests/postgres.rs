//! The ledger conformance suite on PostgreSQL, each test on its own ephemeral server.

mod conformance;

conformance_suite!(conformance::Fixture::postgres);
