//! Kubernetes mode: the same fleet as standalone mode, with MicroMiners and EdgeDevices
//! read from and reported to the API server.
//!
//! - `miners`: the MicroMiner reconciler (finalizer, status by server-side apply,
//!   conditions, events, per-object backoff).
//! - `leader`: leader election on a Lease, so one replica of several schedules.

pub mod devices;
pub mod leader;
pub mod miners;
pub mod pool_secrets;
pub mod rbac;
pub mod run;
#[cfg(test)]
pub mod testing;
pub mod tokens;

/// The one field manager every status write uses, so server-side apply attributes the
/// status fields to this controller and nothing else.
pub const FIELD_MANAGER: &str = "micromine-controller";

/// Held on every MicroMiner the controller serves, so deleting one waits until its work
/// has been taken back from the devices.
pub const FINALIZER: &str = "micromine.dev/drain";
