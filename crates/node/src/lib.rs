//! The Shoal server: the QUIC endpoint and TLS, client sessions, the HTTP admin API,
//! metrics and configuration. It composes the pure rooms (`ring`, `storage`, `proto`,
//! `replication`) and is the only room that knows about quinn.

pub mod cli;
