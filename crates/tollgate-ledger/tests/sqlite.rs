//! The ledger conformance suite on SQLite, each test on its own database file.

mod conformance;

conformance_suite!(conformance::Fixture::sqlite);
