//! The micromine agent: runs on an edge device, reports what the device can do, hashes the
//! work the controller assigns, and keeps the device within its limits, also while
//! disconnected.
//!
//! # Layout
//! - `engine`: SHA-256d nonce scanning engines and their runtime selection.
//! - `calibrate`: choosing the engine by timing each at start, and keeping the choice.
//! - `bench`: measuring an engine's hash rate.
//! - `capacity`: what the device has (cores, architecture, memory).
//! - `miner`: hashing threads working through assigned nonce ranges.
//! - `sensors`: temperature, battery, power draw and host CPU load from sysfs and procfs.
//! - `governor`: the device's limits (windows, battery, host load, heat), enforced locally.
//! - `identity`, `tls`: the device's key and certificate, enrollment, TLS to the controller.
//! - `session`: the long-lived session with the controller, reconnects and resume.
//! - `simulate`: a fleet of virtual devices in one process, for sizing and testing a
//!   controller; `simulated`: what makes one session a simulated device.
//! - `traces`: the agent's spans, sent in-band over the session or to a collector.
//! - `backoff`: jittered exponential backoff.
//! - `config`: what `run` is told (flags over the env file), the token file, and the checks
//!   that refuse a misconfigured device up front.

pub mod backoff;
pub mod bench;
pub mod calibrate;
pub mod capacity;
pub mod config;
pub mod engine;
pub mod governor;
pub mod identity;
pub mod miner;
pub mod sensors;
pub mod session;
pub mod simulate;
pub mod simulated;
pub mod tls;
pub mod traces;
