//! The `EdgeDevice` resource: one per enrolled agent, cluster-scoped like a Node, created
//! by the controller when the agent first connects. Operators act on a device through its
//! spec (`unschedulable` drains it, `revoked` cuts it off); the controller reports what
//! the device is doing in its status, at a bounded rate.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::microminer::ShareCounts;

/// What an operator may decide about one device.
// Printer columns repeat `type_` and `priority` by design; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "micromine.dev",
    version = "v1alpha1",
    kind = "EdgeDevice",
    status = "EdgeDeviceStatus",
    shortname = "ed",
    category = "micromine",
    doc = "A device enrolled in the micromine fleet, created by the controller when its agent first connects. Its labels come from the agent and its bootstrap token; MicroMiners select devices by them.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the agent is connected and heartbeating."
    ),
    printcolumn(
        name = "Miner",
        type_ = "string",
        json_path = ".status.assignedMiner",
        description = "The MicroMiner (namespace/name) whose work the device holds."
    ),
    printcolumn(
        name = "Hashrate",
        type_ = "number",
        json_path = ".status.hashrate",
        description = "Hash rate proven by accepted shares, H/s."
    ),
    printcolumn(
        name = "Unschedulable",
        type_ = "boolean",
        json_path = ".spec.unschedulable",
        priority = 1
    ),
    printcolumn(
        name = "Temperature",
        type_ = "number",
        json_path = ".status.temperatureC",
        description = "Last reported temperature, degrees Celsius.",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EdgeDeviceSpec {
    /// Hand this device no new work and take back what it holds, like `kubectl cordon`
    /// for a node. Its session stays up.
    #[serde(default)]
    pub unschedulable: bool,
    /// End the device's session within seconds and refuse its certificates from now on;
    /// it cannot renew or enroll again under this name while this is true.
    #[serde(default)]
    pub revoked: bool,
}

/// What the controller knows about a device.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDeviceStatus {
    /// What the agent reported about the machine when it connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<DeviceCapacity>,
    /// `Ready` (connected and heartbeating), `Schedulable` (false while
    /// `spec.unschedulable`), `Throttled` (held back by a local limit),
    /// `Enrolled` (holds a valid certificate), `HashrateMismatch` (its accepted shares
    /// contradict the hash rate it claims), `ForeignShares` (it submitted shares for
    /// work that is not its own); keyed by type.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// When the agent was last heard from (written at most about once a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// The MicroMiner (`namespace/name`) whose work the device holds, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_miner: Option<String>,
    /// Hash rate proven by the device's accepted shares, H/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashrate: Option<f64>,
    /// The device's share counts since it enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<ShareCounts>,
    /// Last reported temperature, degrees Celsius, when the device has a sensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<f64>,
    /// When the device's current client certificate expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<Time>,
    /// Version of the agent software.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

/// The machine behind a device, as its agent reported it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCapacity {
    /// Logical CPU cores.
    pub cores: u32,
    /// CPU architecture, e.g. `x86_64`, `aarch64`.
    pub arch: String,
    /// Physical memory, bytes.
    pub memory_bytes: u64,
    /// What the device measured it can hash at full duty, H/s.
    pub nominal_hashrate: f64,
    /// The hashing engine in use: `avx512`, `sha-ni`, `armv8-sha2`, `neon`, `avx2` or `portable`.
    pub hash_engine: String,
    /// How the agent chose it: `calibrated` (the fastest when timed at its start), `cached`
    /// (timed at an earlier start on the same CPU model and agent version), `configured`
    /// (named by `--engine`) or `simulated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_engine_basis: Option<String>,
    /// What each engine the agent timed reached on one thread, H/s, by engine name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hash_engine_rates: BTreeMap<String, f64>,
}
