//! The Shoal server: the QUIC endpoint and TLS, client sessions, the HTTP admin API,
//! metrics and configuration. It composes the pure rooms (`ring`, `storage`, `proto`,
//! `replication`) and is the only room that knows about quinn.
//!
//! A node is started with [`server::start`] (tests, embedding) or [`server::run`]
//! (the `shoal server` command: runs until SIGTERM).

pub mod cli;
mod cluster;
pub mod config;
mod conn;
mod http;
mod idle_spin;
pub mod metrics;
pub mod peer;
mod peer_codec;
mod push;
mod query_cache;
pub mod server;
mod state;
pub mod tls;

pub use config::Config;
pub use server::{run, start, RunningNode};
