//! The controller as a Stratum V1 proxy: one worker towards the pool, many devices behind.
//!
//! # Layout
//! - [`message`]: the line protocol, every field checked.
//! - [`fields`]: the checked reading of params' fields, and the error naming a bad one.
//! - [`job`]: a pool job and the headers built from it (coinbase, merkle root, version
//!   rolling).
//! - [`client`]: the connection to the pool: handshake, submissions, timeouts, keepalive,
//!   reconnection with backoff, failover to the next pool and back.
//! - [`work`]: the fleet's side: which job is current, extranonce2 allocation per header,
//!   and what each header needs for its shares to be submitted.
//! - [`passwords`]: pool passwords from files or Secrets, never from the manifest.
//!
//! Devices never see any of this: they get header-only assignments exactly as with the
//! builtin source, with their own (lower) share targets; only shares that also meet the
//! pool's difficulty go upstream.

pub mod client;
pub mod fields;
pub mod job;
pub mod message;
pub mod passwords;
pub mod work;
