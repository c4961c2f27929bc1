//! The controller's durable state: what must survive a crash, and the one way it reaches
//! the disk.
//!
//! Every share a device hears "accepted" for is on disk first, and is counted once however
//! often it arrives (invariant 3). Both rules live here and nowhere else; the
//! fleet above only calls [`ledger::Ledger::record`] and waits for its answer.
//!
//! # Layout
//! - `store`: the embedded transactional store (one redb file), one writer thread, group
//!   commit with one fsync per batch, JSON tables for the controller's other records.
//! - `ledger`: the share ledger on the store: duplicate detection by share key, totals per
//!   device, per miner and for the fleet, pruning by header.
//! - `ledger::pool`: what the upstream pool answered for the shares passed on to it.

pub mod ledger;
pub mod store;
