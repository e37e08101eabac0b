//! The edge node's configuration and start-up, kept apart from `main` so tests can check them.

pub mod config;
