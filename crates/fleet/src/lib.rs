//! The fleet as a state machine: every operation takes the time as an argument and returns
//! effects (records to persist, messages to send) instead of doing I/O. The controller's
//! async shell (`micromine_controller::fleet`) decides when those become durable and
//! visible; the logic here is testable without sockets, disks or clocks.
//!
//! # Layout
//! - `state`: [`state::FleetState`], by concern: `miners` (applying MicroMiners, work
//!   sources, pool events), `sessions`, `leases` (expiry, reclaiming, top-ups), `shares`
//!   (checks before the ledger), `energy`, `conditions` (set in the tick and on events),
//!   `tick`, `views` (pure reads).
//! - `persist`: the records the state writes to the store, and what a restart reads back.
//! - `source`: a MicroMiner's work source at run time (builtin or a pool's jobs).
//! - `conditions`: Kubernetes-style conditions (`lastTransitionTime` moves only on a flip).
//! - `honesty`: whether a device's claimed hash rate matches the shares it proves.
//! - `status`: the views operators see, and the effective-hash-rate window.
//! - `span_relay`: trace context handed out with assignments; agents' in-band spans,
//!   checked and passed on.

pub mod conditions;
mod honesty;
pub mod persist;
pub mod source;
pub mod span_relay;
pub mod state;
pub mod status;
