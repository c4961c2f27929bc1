//! The `MicroMiner` resource (group `micromine.dev`, version `v1alpha1`) and reading it from
//! YAML manifests.
//!
//! The same type is the Kubernetes custom resource and what standalone mode reads from its
//! manifests directory, so both modes accept exactly the same documents. Everything a
//! schema cannot say (ranges, cross-field rules) is checked by [`MicroMiner::validate`],
//! and every error names the file, the document, the field and the problem.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::selector;

/// API group and version of micromine's resources.
pub const API_VERSION: &str = "micromine.dev/v1alpha1";

/// What a fleet operator declares: which devices may mine what, within which limits.
// Printer columns repeat `type_` and `priority` by design; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "micromine.dev",
    version = "v1alpha1",
    kind = "MicroMiner",
    namespaced,
    status = "MicroMinerStatus",
    shortname = "mm",
    category = "micromine",
    doc = "What a fleet operator declares: which EdgeDevices may mine what, within which limits. The controller hands the selected devices non-overlapping work, re-verifies every share and reports the result in the status.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the MicroMiner is being served."
    ),
    printcolumn(
        name = "Devices",
        type_ = "integer",
        json_path = ".status.devices.mining",
        description = "Devices mining for it now."
    ),
    printcolumn(
        name = "Hashrate",
        type_ = "number",
        json_path = ".status.hashrate.effective",
        description = "Hash rate proven by accepted shares, H/s."
    ),
    printcolumn(
        name = "Shares",
        type_ = "integer",
        json_path = ".status.shares.accepted",
        description = "Accepted shares."
    ),
    printcolumn(
        name = "Blocks",
        type_ = "integer",
        json_path = ".status.blocksFound",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MicroMinerSpec {
    /// Which EdgeDevices this MicroMiner may use, by their labels. An empty selector
    /// matches every device.
    pub selector: LabelSelector,
    /// Where block headers come from. Exactly one source must be set.
    pub work_source: WorkSource,
    /// How many shares per minute each device should find, above 0 and at most 600;
    /// vardiff sets per-device share targets to aim at this.
    #[serde(default = "default_shares_per_minute")]
    #[x_kube(validation = Rule::new("double(self) > 0.0 && double(self) <= 600.0").message("must be above 0 and at most 600"))]
    pub shares_per_minute: f64,
    /// Size of each nonce range handed to a device, in seconds of that device's hashing
    /// (1 to 3600).
    #[serde(default = "default_assignment_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub assignment_seconds: u32,
    /// Limits every selected device enforces locally.
    #[serde(default)]
    pub limits: Limits,
    /// Stop handing out work and cancel what devices hold.
    #[serde(default)]
    pub paused: bool,
    /// What energy costs and a block pays: the status then shows power, energy, cost and
    /// expected revenue, and a `Profitable` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub economics: Option<Economics>,
}

/// Prices and power, for cost and revenue. All amounts are in one currency of your
/// choice; the status reports in the same.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Economics {
    /// Price of one kWh of electricity, at least 0.
    #[x_kube(validation = Rule::new("double(self) >= 0.0").message("must be at least 0"))]
    pub energy_price_per_k_wh: f64,
    /// Price of one coin, at least 0.
    #[x_kube(validation = Rule::new("double(self) >= 0.0").message("must be at least 0"))]
    pub coin_price: f64,
    /// Coins one found block pays (subsidy plus typical fees), at least 0.
    #[x_kube(validation = Rule::new("double(self) >= 0.0").message("must be at least 0"))]
    pub block_reward: f64,
    /// Difficulty of the network the blocks are for, above 0. Default: the work source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("double(self) > 0.0").message("must be above 0"))]
    pub network_difficulty: Option<f64>,
    /// Watts a device draws while mining when it does not measure its own power (no
    /// battery or smart supply to ask), at least 0. Default 5.
    #[serde(default = "default_device_watts")]
    #[x_kube(validation = Rule::new("double(self) >= 0.0").message("must be at least 0"))]
    pub default_device_watts: f64,
    /// The same by the device's `class` label, e.g. `{gateway: 8, phone: 3}`; wins over
    /// `defaultDeviceWatts`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub device_watts_by_class: BTreeMap<String, f64>,
    /// Take work back from the devices while `Profitable` is False, and hand it out again
    /// when it turns True (the condition, the `Paused` condition and an Event say so).
    #[serde(default)]
    pub pause_when_unprofitable: bool,
}

fn default_device_watts() -> f64 {
    5.0
}

fn default_shares_per_minute() -> f64 {
    12.0
}

fn default_assignment_seconds() -> u32 {
    30
}

/// The source of work. Exactly one field is set.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[x_kube(validation = Rule::new("[has(self.builtin), has(self.stratum)].filter(x, x).size() == 1").message("exactly one work source must be set (builtin or stratum)"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkSource {
    /// Synthetic block templates mined with real sha256d work: for demos, tests and
    /// sizing a fleet without a pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinSource>,
    /// A Stratum V1 pool: the controller mines for it as one worker and splits its jobs
    /// across the selected devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stratum: Option<StratumSource>,
}

/// The pool to mine for, and the pools to fail over to.
// The first four fields repeat `StratumPool`'s rather than flattening it: serde cannot deny
// unknown fields around a flattened struct, and a misspelt field must be an error.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StratumSource {
    /// `stratum+tcp://HOST:PORT`, or `stratum+ssl://HOST:PORT` for TLS (the pool's
    /// certificate is checked against the system's CAs, or those in `SSL_CERT_FILE`).
    #[schemars(regex(
        pattern = r"^stratum\+(tcp|ssl)://([^/:@\[\]\s]+|\[[0-9a-fA-F:.]+\]):[0-9]{1,5}$"
    ))]
    pub url: String,
    /// The pool account and worker name, e.g. `account.worker`.
    pub user: String,
    /// Kubernetes mode: the Secret key (in the MicroMiner's namespace) holding the
    /// password. Without a password source the password is `x`, which most pools expect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// Standalone mode: a file holding the password (a relative path is relative to the
    /// manifests directory); trailing line breaks are ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// Pools to use, in order, while this one cannot be reached (at most 8). The
    /// controller goes back to this pool as soon as it answers again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<StratumPool>,
    /// While on a failover pool, how often (seconds, 1 to 3600) the primary pool is
    /// tried again.
    #[serde(default = "default_failback_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub failback_seconds: u32,
}

fn default_failback_seconds() -> u32 {
    60
}

/// A failover pool.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StratumPool {
    /// `stratum+tcp://HOST:PORT` or `stratum+ssl://HOST:PORT`.
    #[schemars(regex(
        pattern = r"^stratum\+(tcp|ssl)://([^/:@\[\]\s]+|\[[0-9a-fA-F:.]+\]):[0-9]{1,5}$"
    ))]
    pub url: String,
    /// The account and worker name at this pool.
    pub user: String,
    /// Kubernetes mode: the Secret key holding this pool's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// Standalone mode: a file holding this pool's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
}

/// A key of a Secret in the MicroMiner's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key in its `data`.
    pub key: String,
}

/// The longest failover list: more pools than this is a configuration mistake.
pub const MAX_FAILOVER_POOLS: usize = 8;

impl StratumSource {
    /// The primary pool followed by the failover pools, in the order they are tried.
    pub fn pools(&self) -> Vec<StratumPool> {
        let primary = StratumPool {
            url: self.url.clone(),
            user: self.user.clone(),
            password_secret_ref: self.password_secret_ref.clone(),
            password_file: self.password_file.clone(),
        };
        std::iter::once(primary)
            .chain(self.failover.iter().cloned())
            .collect()
    }
}

impl StratumPool {
    /// The problems of this pool's settings, as (field under the pool, problem).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if let Err(e) = crate::pool_url::PoolUrl::parse(&self.url) {
            problems.push(("url", e));
        }
        if self.user.trim().is_empty() {
            problems.push(("user", "is required".to_string()));
        } else if self.user.len() > 256 || self.user.chars().any(char::is_control) {
            problems.push((
                "user",
                "must be at most 256 characters without control characters".to_string(),
            ));
        }
        if self.password_secret_ref.is_some() && self.password_file.is_some() {
            problems.push((
                "passwordFile",
                "cannot be set together with passwordSecretRef; choose one".to_string(),
            ));
        }
        if let Some(secret) = &self.password_secret_ref {
            if !is_dns_subdomain(&secret.name) {
                problems.push((
                    "passwordSecretRef.name",
                    format!("`{}` is not a valid Secret name", secret.name),
                ));
            }
            if secret.key.is_empty()
                || secret.key.len() > 253
                || !secret
                    .key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                problems.push((
                    "passwordSecretRef.key",
                    format!(
                        "`{}` is not a valid Secret key (letters, digits, '-', '_', '.')",
                        secret.key
                    ),
                ));
            }
        }
        if self.password_file.as_deref().is_some_and(str::is_empty) {
            problems.push(("passwordFile", "must not be empty".to_string()));
        }
        problems
    }
}

/// Settings of the builtin work source.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BuiltinSource {
    /// Difficulty of the synthetic network: a share meeting it is a found block, which
    /// rolls the template. Above 0; fractional values below 1 are allowed.
    #[x_kube(validation = Rule::new("double(self) > 0.0").message("must be a number above 0"))]
    pub network_difficulty: f64,
}

/// Limits a device enforces locally, also while disconnected.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Fraction of the mining threads' time spent hashing, above 0 and at most 1.
    #[serde(default = "default_duty_cycle")]
    #[x_kube(validation = Rule::new("double(self) > 0.0 && double(self) <= 1.0").message("must be above 0 and at most 1"))]
    pub duty_cycle: f64,
    /// Above this temperature (°C, 30 to 110) a device hashes at half its duty cycle;
    /// 10 °C above it, it stops. Either lasts until it is 3 °C below. Devices without a
    /// thermal sensor are not held back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("double(self) >= 30.0 && double(self) <= 110.0").message("must be between 30 and 110"))]
    pub max_temperature_c: Option<f64>,
    /// Below this battery level (percent, 0 to 100) a device stops hashing, until it is
    /// 5 points above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("double(self) >= 0.0 && double(self) <= 100.0").message("must be between 0 and 100"))]
    pub min_battery_percent: Option<f64>,
    /// While the device's own work (everything but the agent) uses more than this share of
    /// its CPU (percent, 1 to 100), it stops hashing within a second; it resumes 10 points
    /// below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("double(self) >= 1.0 && double(self) <= 100.0").message("must be between 1 and 100"))]
    pub max_host_cpu_percent: Option<f64>,
    /// Stop hashing while the device runs on battery (no external supply online).
    #[serde(default)]
    pub pause_on_battery: bool,
    /// When devices may hash, on their own clocks; none: always.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<MiningWindow>,
}

/// A span of time in which mining is allowed. A window that ends before it starts
/// crosses midnight and belongs to the day it starts on.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MiningWindow {
    /// Days the window starts on: Mon, Tue, Wed, Thu, Fri, Sat, Sun, or ranges like
    /// Mon-Fri.
    pub days: Vec<String>,
    /// Start, HH:MM local time.
    pub from: String,
    /// End, HH:MM local time; equal to `from` for the whole day.
    pub to: String,
    /// IANA time zone of `from` and `to`, e.g. Europe/Istanbul. Default UTC.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub time_zone: String,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            duty_cycle: default_duty_cycle(),
            max_temperature_c: None,
            min_battery_percent: None,
            max_host_cpu_percent: None,
            pause_on_battery: false,
            windows: Vec::new(),
        }
    }
}

impl Limits {
    /// The limits as agents receive them.
    pub fn to_wire(&self) -> micromine_proto::pb::Limits {
        micromine_proto::pb::Limits {
            duty_cycle: self.duty_cycle,
            max_temperature_c: self.max_temperature_c.map(|v| v as f32),
            min_battery_percent: self.min_battery_percent.map(|v| v as f32),
            max_host_cpu_percent: self.max_host_cpu_percent.map(|v| v as f32),
            pause_on_battery: self.pause_on_battery,
            windows: self
                .windows
                .iter()
                .map(|w| micromine_proto::pb::MiningWindow {
                    days: w.days.clone(),
                    from: w.from.clone(),
                    to: w.to.clone(),
                    time_zone: w.time_zone.clone(),
                })
                .collect(),
        }
    }
}

fn default_duty_cycle() -> f64 {
    1.0
}

/// Observed state of a MicroMiner.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MicroMinerStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Degraded`, `Paused`, keyed by type.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Devices by state.
    #[serde(default)]
    pub devices: DeviceCounts,
    /// Hash rates in hashes per second.
    #[serde(default)]
    pub hashrate: Hashrate,
    /// Share counts since the MicroMiner was created.
    #[serde(default)]
    pub shares: ShareCounts,
    /// Shares that met the network target.
    #[serde(default)]
    pub blocks_found: u64,
    /// When the last accepted share was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_share_time: Option<Time>,
    /// Power, energy, cost and expected revenue, when `spec.economics` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub economics: Option<EconomicsStatus>,
    /// The pool connection, when the work source is `stratum`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolStatus>,
}

/// The pool connection of a MicroMiner with a `stratum` work source, and what the pool
/// made of the shares submitted to it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// `Connected`, `Connecting` (not connected yet) or `Disconnected`.
    pub state: String,
    /// The pool in use (or last tried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Whether that is a failover pool rather than the primary.
    #[serde(default)]
    pub failover: bool,
    /// The pool's share difficulty: device shares that meet it are submitted.
    pub difficulty: f64,
    /// The pool job devices are working on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Why the last connection ended or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Shares the pool accepted.
    pub accepted: u64,
    /// Shares the pool did not accept (or that could not be submitted).
    pub rejected: u64,
    /// Those by reason: `stale`, `job-not-found`, `duplicate`, `low-difficulty`,
    /// `unauthorized`, `not-subscribed`, `other`, `timeout` (no answer), `session-lost`
    /// (the pool session ended before the share could be submitted), `job-replaced` (the
    /// pool replaced the job first; not sent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rejected_by_reason: BTreeMap<String, u64>,
}

/// What mining costs and is expected to earn, in the currency of `spec.economics`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EconomicsStatus {
    /// Power the working devices draw now, W (measured where a device can, else the
    /// spec's figure for its class).
    pub power_watts: f64,
    /// Energy its devices have drawn while working for it, kWh.
    pub energy_k_wh: f64,
    /// What that energy cost, at the current price.
    pub energy_cost: f64,
    /// Expected revenue of the work accepted so far (accepted share difficulty over the
    /// network difficulty, in blocks, times the block's value).
    pub revenue: f64,
    /// Energy cost per hour at the current power.
    pub cost_per_hour: f64,
    /// Expected revenue per hour at the effective (proven) hash rate.
    pub revenue_per_hour: f64,
}

/// Devices of a MicroMiner by state.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCounts {
    /// Devices whose labels match the selector.
    pub matched: u32,
    /// Connected and holding work.
    pub mining: u32,
    /// Connected but held back by a local limit.
    pub throttled: u32,
    /// Matched but not connected.
    pub offline: u32,
}

/// Hash rates of a MicroMiner.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hashrate {
    /// What connected devices say they can do at their duty cycle (H/s).
    pub nominal: f64,
    /// What accepted shares prove they did (H/s), over the last few minutes.
    pub effective: f64,
}

/// Share counts of a MicroMiner.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShareCounts {
    /// Re-verified and durably recorded.
    pub accepted: u64,
    /// Rejected for any reason other than staleness.
    pub rejected: u64,
    /// Rejected because the work was no longer current.
    pub stale: u64,
}

impl MicroMiner {
    /// `namespace/name`, the key the ledger and the scheduler use.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or("default"),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// Checks everything the schema cannot express. Each problem names its field.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, text: String| {
            problems.push(FieldError {
                field: field.to_string(),
                problem: text,
            })
        };
        match self.metadata.name.as_deref() {
            None | Some("") => problem("metadata.name", "is required".into()),
            Some(name) if !is_dns_subdomain(name) => problem(
                "metadata.name",
                format!(
                    "`{name}` must be lower-case letters, digits, '-' and '.', at most 253 characters"
                ),
            ),
            Some(_) => {}
        }
        if let Some(namespace) = self.metadata.namespace.as_deref()
            && !is_dns_label(namespace)
        {
            problem(
                "metadata.namespace",
                format!(
                    "`{namespace}` must be a DNS label (lower-case letters, digits, '-', at most 63)"
                ),
            );
        }
        let spec = &self.spec;
        if let Err(e) = selector::validate(&spec.selector) {
            problem(&format!("spec.selector.{}", e.field), e.problem);
        }
        match (&spec.work_source.builtin, &spec.work_source.stratum) {
            (None, None) | (Some(_), Some(_)) => problem(
                "spec.workSource",
                "exactly one work source must be set (builtin or stratum)".into(),
            ),
            (Some(builtin), None) => {
                if !(builtin.network_difficulty.is_finite() && builtin.network_difficulty > 0.0) {
                    problem(
                        "spec.workSource.builtin.networkDifficulty",
                        format!(
                            "must be a number above 0, got {}",
                            builtin.network_difficulty
                        ),
                    );
                }
            }
            (None, Some(stratum)) => {
                if stratum.failover.len() > MAX_FAILOVER_POOLS {
                    problem(
                        "spec.workSource.stratum.failover",
                        format!(
                            "lists {} pools, at most {MAX_FAILOVER_POOLS}",
                            stratum.failover.len()
                        ),
                    );
                }
                if !(1..=3600).contains(&stratum.failback_seconds) {
                    problem(
                        "spec.workSource.stratum.failbackSeconds",
                        format!(
                            "must be between 1 and 3600, got {}",
                            stratum.failback_seconds
                        ),
                    );
                }
                for (i, pool) in stratum.pools().iter().enumerate() {
                    let prefix = match i {
                        0 => "spec.workSource.stratum".to_string(),
                        n => format!("spec.workSource.stratum.failover[{}]", n - 1),
                    };
                    for (field, text) in pool.problems() {
                        problem(&format!("{prefix}.{field}"), text);
                    }
                }
            }
        }
        if !(spec.shares_per_minute.is_finite()
            && spec.shares_per_minute > 0.0
            && spec.shares_per_minute <= 600.0)
        {
            problem(
                "spec.sharesPerMinute",
                format!(
                    "must be above 0 and at most 600, got {}",
                    spec.shares_per_minute
                ),
            );
        }
        if !(1..=3600).contains(&spec.assignment_seconds) {
            problem(
                "spec.assignmentSeconds",
                format!(
                    "must be between 1 and 3600, got {}",
                    spec.assignment_seconds
                ),
            );
        }
        let duty = spec.limits.duty_cycle;
        if !(duty.is_finite() && duty > 0.0 && duty <= 1.0) {
            problem(
                "spec.limits.dutyCycle",
                format!("must be above 0 and at most 1, got {duty}"),
            );
        }
        let limits = &spec.limits;
        for (field, value, range) in [
            ("maxTemperatureC", limits.max_temperature_c, 30.0..=110.0),
            ("minBatteryPercent", limits.min_battery_percent, 0.0..=100.0),
            (
                "maxHostCpuPercent",
                limits.max_host_cpu_percent,
                1.0..=100.0,
            ),
        ] {
            if let Some(value) = value
                && !range.contains(&value)
            {
                problem(
                    &format!("spec.limits.{field}"),
                    format!(
                        "must be between {} and {}, got {value}",
                        range.start(),
                        range.end()
                    ),
                );
            }
        }
        for (i, w) in limits.windows.iter().enumerate() {
            if let Err(e) =
                micromine_proto::window::Window::parse(&w.days, &w.from, &w.to, &w.time_zone)
            {
                problem(&format!("spec.limits.windows[{i}].{}", e.field), e.problem);
            }
        }
        if let Some(economics) = &spec.economics {
            let mut at_least_zero = |field: &str, value: f64| {
                if !(value.is_finite() && value >= 0.0) {
                    problem(
                        &format!("spec.economics.{field}"),
                        format!("must be a number of at least 0, got {value}"),
                    );
                }
            };
            at_least_zero("energyPricePerKWh", economics.energy_price_per_k_wh);
            at_least_zero("coinPrice", economics.coin_price);
            at_least_zero("blockReward", economics.block_reward);
            at_least_zero("defaultDeviceWatts", economics.default_device_watts);
            for (class, watts) in &economics.device_watts_by_class {
                at_least_zero(&format!("deviceWattsByClass.{class}"), *watts);
            }
            if let Some(d) = economics.network_difficulty
                && !(d.is_finite() && d > 0.0)
            {
                problem(
                    "spec.economics.networkDifficulty",
                    format!("must be a number above 0, got {d}"),
                );
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.limits.dutyCycle`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

/// A manifest file that could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("{file}: cannot read: {reason}")]
    Unreadable {
        /// The file.
        file: String,
        /// The I/O error.
        reason: String,
    },
    /// The text is not YAML.
    #[error("{file}: not valid YAML: {reason}")]
    Syntax {
        /// The file.
        file: String,
        /// The parser's message, with line and column.
        reason: String,
    },
    /// A document is YAML but not an acceptable MicroMiner.
    #[error("{file}: document {document}{name}: {field}: {problem}", name = name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default())]
    Invalid {
        /// The file.
        file: String,
        /// 1-based index of the YAML document in the file.
        document: usize,
        /// `namespace/name` when it could be read.
        name: Option<String>,
        /// Path of the offending field.
        field: String,
        /// What is wrong.
        problem: String,
    },
}

/// Reads every MicroMiner in a YAML file (documents separated by `---`; empty documents
/// are skipped). The first problem found in a file rejects the whole file, so a
/// half-valid edit never takes partial effect.
pub fn parse_file(path: &Path) -> Result<Vec<MicroMiner>, ManifestError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ManifestError::Unreadable {
        file: file.clone(),
        reason: e.to_string(),
    })?;
    parse_str(&file, &text)
}

/// [`parse_file`] on text already in memory; `file` names it in errors.
pub fn parse_str(file: &str, text: &str) -> Result<Vec<MicroMiner>, ManifestError> {
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ManifestError::Syntax {
            file: file.to_string(),
            reason: e.to_string(),
        })?;
    let mut miners = Vec::new();
    for (index, document) in documents.into_iter().enumerate() {
        if document.is_null() {
            continue;
        }
        miners.push(parse_document(file, index + 1, document)?);
    }
    Ok(miners)
}

fn parse_document(
    file: &str,
    document: usize,
    value: serde_json::Value,
) -> Result<MicroMiner, ManifestError> {
    let name = value
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .map(|name| {
            let namespace = value
                .pointer("/metadata/namespace")
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            format!("{namespace}/{name}")
        });
    let invalid = |field: &str, problem: String| ManifestError::Invalid {
        file: file.to_string(),
        document,
        name: name.clone(),
        field: field.to_string(),
        problem,
    };
    let Some(object) = value.as_object() else {
        return Err(invalid(
            "(document)",
            "must be a mapping with apiVersion, kind, metadata and spec".into(),
        ));
    };
    match object.get("apiVersion").and_then(|v| v.as_str()) {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(invalid(
                "apiVersion",
                format!("`{other}` is not {API_VERSION}"),
            ));
        }
        None => {
            return Err(invalid(
                "apiVersion",
                format!("is required ({API_VERSION})"),
            ));
        }
    }
    match object.get("kind").and_then(|v| v.as_str()) {
        Some("MicroMiner") => {}
        Some(other) => {
            return Err(invalid(
                "kind",
                format!("`{other}` is not read from manifests (expected MicroMiner)"),
            ));
        }
        None => return Err(invalid("kind", "is required (MicroMiner)".into())),
    }
    for key in object.keys() {
        if !matches!(
            key.as_str(),
            "apiVersion" | "kind" | "metadata" | "spec" | "status"
        ) {
            return Err(invalid(key, "unknown top-level field".into()));
        }
    }
    if !object.contains_key("spec") {
        return Err(invalid("spec", "is required".into()));
    }
    let mut miner: MicroMiner = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        invalid(
            if path == "." { "(document)" } else { &path },
            e.inner().to_string(),
        )
    })?;
    // Status is the controller's to write; a manifest may carry a stale copy.
    miner.status = None;
    if miner.metadata.namespace.is_none() {
        miner.metadata.namespace = Some("default".into());
    }
    if let Err(problems) = miner.validate() {
        let first = &problems[0];
        let extra = if problems.len() > 1 {
            format!(" (and {} more problems)", problems.len() - 1)
        } else {
            String::new()
        };
        return Err(invalid(&first.field, format!("{}{extra}", first.problem)));
    }
    Ok(miner)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// MicroMiners by key, as read from a set of files.
pub type MinerSet = BTreeMap<String, MicroMiner>;

#[cfg(test)]
mod tests;
