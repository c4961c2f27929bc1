//! The micromine controller: it turns `MicroMiner` resources into hashing work for a fleet
//! of edge devices, re-verifies every share, and keeps a durable ledger.
//!
//! # Layout
//! - `pki`, `tokens`, `revocation`, `tls`: the fleet CA, bootstrap tokens, revoked
//!   devices, the TLS listener.
//! - `token_source`: where enrollment redeems tokens (files, or Secrets in Kubernetes
//!   mode).
//! - `fleet`: the async shell around the fleet's state machine (`micromine-fleet`): it
//!   owns the store and the ledger, turns effects into writes and messages, and talks to
//!   the pools.
//! - `grpc`: the `Enrollment` and `Fleet` services.
//! - `http`: health, metrics, the log level and the status API.
//! - `metrics`: the Prometheus metrics (share and assignment latencies, the fleet's gauges).
//! - `logging`: logs, and traces over OTLP.
//! - `periodic`: the ticker periodic tasks share.
//! - `kubernetes`: the reconcilers of Kubernetes mode.
//! - `serve`: the serving core both modes start: store, fleet, PKI, tokens, the gRPC and
//!   HTTP listeners and the periodic tasks.
//! - `manifests_dir`: standalone mode's MicroMiners, read from a watched directory.
//! - `quickstart`: a local fleet in one command.

pub mod fleet;
pub mod grpc;
pub mod http;
pub mod kubernetes;
pub mod logging;
pub mod manifests_dir;
pub mod metrics;
pub mod periodic;
pub mod pki;
pub mod quickstart;
pub mod revocation;
pub mod serve;
pub mod tls;
pub mod token_source;
pub mod tokens;
