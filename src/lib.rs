//! mcp-conductor: one MCP server in front of every MCP server you use.
//!
//! The modules follow a request's path, and each layer only looks down:
//! - [`config`]: `servers.toml` read and checked into typed values (knows nothing of MCP);
//! - [`schema`]: JSON Schemas compiled once, kept with the tool or saved workflow they check;
//! - [`wire`]: JSON-RPC lines over pipes, with a tap that may take a message before rmcp parses it;
//! - [`downstream`]: live connections to downstream servers (the only place transports are built);
//! - [`catalog`]: the immutable, namespaced offer built from what the downstreams list;
//! - [`registry`]: the set of downstreams, their state, and the current catalog;
//! - [`router`]: the one path every downstream request takes (with [`retry`], its policy, and
//!   [`breaker`], one circuit per server);
//! - [`relay`] and [`bridge`]: the way back, from downstreams to the client a request came from,
//!   across protocol versions;
//! - [`orchestrate`]: workflows of tool calls, run through the router;
//! - [`server`]: the MCP handler clients talk to, over stdio or [`http`];
//! - [`cli`]: the `conductor` commands, and [`import`], a host's server list as `servers.toml`.

pub mod breaker;
pub mod bridge;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod downstream;
pub mod http;
pub mod import;
pub mod maps;
pub mod orchestrate;
pub mod registry;
pub mod relay;
pub mod retry;
pub mod router;
pub mod schema;
pub mod server;
pub mod wire;
