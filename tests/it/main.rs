//! conductor's integration tests: one binary, one module per area.
//!
//! - `config`: config loading and every kind of config error (snapshots);
//! - `catalog`: naming, filtering, clashes and resource routing, on built catalogs;
//! - `serve`: `conductor serve` as a real child process, driven by an rmcp client over stdio,
//!   with fixture downstreams over stdio and Streamable HTTP;
//! - `cli`: the `tools`, `call` and `check` commands (snapshots);
//! - `http`: `conductor serve --http`: Streamable HTTP clients, health, and refused misuse;
//! - `orchestrate`: workflow validation (snapshots) and runs across fixture servers;
//! - `supervise`: injected faults (crashes, crash loops, hangs, garbage, huge messages,
//!   stubborn children, conductor killed), replicas, fallbacks, lazy start, per-session
//!   children, hot reload, and a soak test;
//! - `peers`: third-party parts: the Python SDK client, the npm reference servers, and the
//!   bundled `servers.toml` (installed by `scripts/install-peers`).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail loudly by design"
)]

mod catalog;
mod cli;
mod config;
mod http;
mod orchestrate;
mod peers;
mod serve;
mod supervise;
mod support;
