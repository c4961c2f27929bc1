//! EdgeDevices: the API server's view of the fleet's devices, and the operator's handle on
//! each one.
//!
//! - An agent's first connection creates its EdgeDevice (server-side apply of the labels
//!   it reported and its token gave it).
//! - Status goes out when something an operator acts on changes (readiness, the miner it
//!   works for, throttling, a hostile-agent flag, the certificate), and otherwise only to
//!   refresh the live figures, at most once a minute per device and within a fleet-wide
//!   [`WriteBudget`]: heartbeats stay in memory, so 10,000 devices do not mean 10,000
//!   writes a minute.
//! - `Ready=False` when a connected agent misses its reports, or disconnects.
//! - `spec.unschedulable` cordons the device, `spec.revoked` revokes it (as
//!   `micromine-controller device revoke` does), deleting it ends its session.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as Note, EventType, Recorder};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::FIELD_MANAGER;
use crate::fleet::{Fleet, now_ms};
use crate::periodic::Every;
use crate::revocation::RevocationStore;
use micromine_fleet::conditions::{self, time_from_unix_ms};
use micromine_fleet::status::DeviceView;
use micromine_resources::edgedevice::{DeviceCapacity, EdgeDevice, EdgeDeviceStatus};
use micromine_resources::microminer::API_VERSION;

/// A device's live figures are refreshed at most this often.
pub const REFRESH_INTERVAL_MS: i64 = 60_000;
/// A connected agent not heard from for this long is not ready (its reports come every
/// 2 s; this allows a few to be lost or late).
pub const HEARTBEAT_GRACE_MS: i64 = 15_000;
/// EdgeDevice status refreshes (writes that only move live figures) per minute, for the
/// whole fleet: with [`MINER_REFRESH_WRITES_PER_MINUTE`], what the controller costs the
/// API server in steady state however large the fleet.
pub const DEVICE_REFRESH_WRITES_PER_MINUTE: u32 = 100;
/// MicroMiner status refreshes per minute. A budget of their own, so ten thousand
/// devices cannot starve the figures operators read first.
pub const MINER_REFRESH_WRITES_PER_MINUTE: u32 = 50;
/// How often the publisher looks at the fleet.
pub const PUBLISH_PERIOD: Duration = Duration::from_secs(5);
/// A deleted device is not re-created for this long, so a session the deletion is
/// cutting does not bring it straight back.
const TOMBSTONE_MS: i64 = 10_000;

/// A token bucket for status refreshes. State changes never wait for it.
#[derive(Debug)]
pub struct WriteBudget {
    per_minute: f64,
    available: f64,
    updated_ms: i64,
}

impl WriteBudget {
    /// A budget of `per_minute` writes, full at `now_ms` (at most a minute's worth is
    /// ever saved up).
    pub fn new(per_minute: u32, now_ms: i64) -> WriteBudget {
        WriteBudget {
            per_minute: f64::from(per_minute),
            available: f64::from(per_minute),
            updated_ms: now_ms,
        }
    }

    /// Takes one write if one is available at `now_ms`.
    pub fn try_take(&mut self, now_ms: i64) -> bool {
        let elapsed = (now_ms - self.updated_ms).max(0) as f64;
        self.available =
            (self.available + elapsed * self.per_minute / 60_000.0).min(self.per_minute);
        self.updated_ms = self.updated_ms.max(now_ms);
        if self.available >= 1.0 {
            self.available -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A budget one writer draws from while another task may read it.
pub type SharedBudget = Arc<Mutex<WriteBudget>>;

/// One write to the API server.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceWrite {
    /// Create the EdgeDevice, or bring its labels up to date.
    Labels {
        /// The device.
        name: String,
        /// Its labels.
        labels: BTreeMap<String, String>,
    },
    /// Apply its status.
    Status {
        /// The device.
        name: String,
        /// The whole status (server-side apply owns all of it).
        status: Box<EdgeDeviceStatus>,
    },
}

/// Conditions that call for a Warning event when they turn true.
const WARNING_CONDITIONS: [&str; 2] = ["HashrateMismatch", "ForeignShares"];

#[derive(Debug, Clone)]
struct Published {
    /// Condition (type, status, reason) and the other fields that are written at once.
    significant: String,
    conditions: Vec<Condition>,
    figures: (u64, u64, u64, u64),
    written_ms: i64,
}

/// Decides what EdgeDevice writes the fleet's state calls for. Pure: the caller gives it
/// the fleet's device views and the time, so tests and the write-rate benchmark can run
/// it on a simulated clock.
#[derive(Debug)]
pub struct DevicePublisher {
    /// Devices an EdgeDevice exists for, with the labels it was last given by us
    /// (`None`: it exists, we have not applied labels since we started).
    existing: HashMap<String, Option<BTreeMap<String, String>>>,
    /// When a device's EdgeDevice was seen deleted.
    deleted: HashMap<String, i64>,
    published: HashMap<String, Published>,
    budget: SharedBudget,
}

impl DevicePublisher {
    /// A publisher drawing refreshes from `budget`.
    pub fn new(budget: SharedBudget) -> DevicePublisher {
        DevicePublisher {
            existing: HashMap::new(),
            deleted: HashMap::new(),
            published: HashMap::new(),
            budget,
        }
    }

    /// The watch saw an EdgeDevice (created by anyone, or ours coming back).
    pub fn exists(&mut self, name: &str) {
        self.existing.entry(name.to_string()).or_insert(None);
        self.deleted.remove(name);
    }

    /// The watch saw an EdgeDevice deleted.
    pub fn deleted(&mut self, name: &str, now_ms: i64) {
        self.existing.remove(name);
        self.published.remove(name);
        self.deleted.insert(name.to_string(), now_ms);
    }

    /// A write failed: plan it again next time.
    pub fn failed(&mut self, write: &DeviceWrite) {
        match write {
            DeviceWrite::Labels { name, .. } => {
                if let Some(labels) = self.existing.get_mut(name) {
                    *labels = None;
                }
            }
            DeviceWrite::Status { name, .. } => {
                self.published.remove(name);
            }
        }
    }

    /// The writes `devices` call for at `now_ms`, state changes first, then refreshes of
    /// the stalest devices while the budget lasts.
    pub fn plan(&mut self, devices: &[DeviceView], now_ms: i64) -> Vec<DeviceWrite> {
        self.deleted.retain(|_, at| now_ms - *at < TOMBSTONE_MS);
        let mut writes = Vec::new();
        let mut refresh: Vec<(i64, DeviceWrite, Published)> = Vec::new();
        for device in devices {
            let name = &device.name;
            let exists = self.existing.contains_key(name);
            if !exists && (!device.connected || self.deleted.contains_key(name)) {
                // Only a device that is here now gets an EdgeDevice made for it.
                continue;
            }
            if self.existing.get(name).and_then(Option::as_ref) != Some(&device.labels) {
                writes.push(DeviceWrite::Labels {
                    name: name.clone(),
                    labels: device.labels.clone(),
                });
                self.existing
                    .insert(name.clone(), Some(device.labels.clone()));
            }
            let previous = self.published.get(name);
            let mut conditions = previous.map(|p| p.conditions.clone()).unwrap_or_default();
            set_conditions(&mut conditions, device, now_ms);
            let status = status_of(device, conditions.clone());
            let significant = significant(&status, device);
            let figures = figures(device);
            let next = Published {
                significant,
                conditions,
                figures,
                written_ms: now_ms,
            };
            let write = DeviceWrite::Status {
                name: name.clone(),
                status: Box::new(status),
            };
            match previous {
                Some(p) if p.significant == next.significant => {
                    if p.figures != next.figures && now_ms - p.written_ms >= REFRESH_INTERVAL_MS {
                        refresh.push((p.written_ms, write, next));
                    }
                }
                _ => {
                    self.published.insert(name.clone(), next);
                    writes.push(write);
                }
            }
        }
        refresh.sort_by_key(|(written, _, _)| *written);
        let mut budget = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        for (_, write, next) in refresh {
            if !budget.try_take(now_ms) {
                break;
            }
            if let DeviceWrite::Status { name, .. } = &write {
                self.published.insert(name.clone(), next);
            }
            writes.push(write);
        }
        writes
    }

    /// The conditions last written for `name` (for Warning events on flips).
    fn conditions(&self, name: &str) -> Vec<Condition> {
        self.published
            .get(name)
            .map(|p| p.conditions.clone())
            .unwrap_or_default()
    }
}

fn figures(device: &DeviceView) -> (u64, u64, u64, u64) {
    (
        device.effective_hashrate.round() as u64,
        device.shares.accepted,
        device.shares.rejected.total(),
        (device.last_seen_unix_ms / 1000).max(0) as u64,
    )
}

fn significant(status: &EdgeDeviceStatus, device: &DeviceView) -> String {
    let mut key = String::new();
    for c in &status.conditions {
        key.push_str(&format!("{}={}:{};", c.type_, c.status, c.reason));
    }
    key.push_str(&format!(
        "miner={:?};cert={};version={};engine={};state={}",
        status.assigned_miner,
        device.certificate_not_after_unix_ms,
        device.agent_version,
        device.hash_engine,
        device.state
    ));
    key
}

/// Sets every condition a device's status carries.
fn set_conditions(conditions: &mut Vec<Condition>, device: &DeviceView, now_ms: i64) {
    let silent_ms = now_ms - device.last_seen_unix_ms;
    let (ready, reason, message) = if !device.connected {
        (
            false,
            "Disconnected",
            "the agent has no session".to_string(),
        )
    } else if silent_ms > HEARTBEAT_GRACE_MS {
        (
            false,
            "HeartbeatMissed",
            format!("no report from the agent for {} s", silent_ms / 1000),
        )
    } else {
        (
            true,
            "Heartbeating",
            "the agent reports on time".to_string(),
        )
    };
    conditions::set(conditions, "Ready", ready, reason, &message, None, now_ms);

    // As `kubectl get nodes` shows SchedulingDisabled: a cordon is visible in the status.
    if device.unschedulable {
        conditions::set(
            conditions,
            "Schedulable",
            false,
            "Unschedulable",
            "spec.unschedulable is set: the device is handed no work",
            None,
            now_ms,
        );
    } else {
        conditions::set(
            conditions,
            "Schedulable",
            true,
            "Schedulable",
            "",
            None,
            now_ms,
        );
    }

    let held_back = micromine_fleet::status::is_held_back(&device.state).then(|| {
        device
            .state
            .split_once(':')
            .map_or(device.state.as_str(), |(_, why)| why)
    });
    match held_back {
        Some(why) => {
            conditions::set(
                conditions,
                "Throttled",
                true,
                &reason_word(why, "LocalLimit"),
                &format!("held back by a local limit ({why})"),
                None,
                now_ms,
            );
        }
        None => conditions::set(
            conditions,
            "Throttled",
            false,
            "WithinLimits",
            "",
            None,
            now_ms,
        ),
    }

    let valid = device.certificate_not_after_unix_ms > now_ms;
    let (reason, message) = if valid {
        (
            "CertificateValid",
            format!(
                "client certificate valid until {}",
                time_from_unix_ms(device.certificate_not_after_unix_ms)
                    .map(|t| t.0.to_string())
                    .unwrap_or_default()
            ),
        )
    } else if device.certificate_not_after_unix_ms == 0 {
        (
            "NotIssuedHere",
            "no certificate issued by this controller is on record".to_string(),
        )
    } else {
        (
            "CertificateExpired",
            "the client certificate has expired".to_string(),
        )
    };
    conditions::set(
        conditions, "Enrolled", valid, reason, &message, None, now_ms,
    );

    for kind in WARNING_CONDITIONS {
        match device.flags.iter().find(|f| f.kind == kind) {
            Some(flag) => {
                conditions::set(conditions, kind, true, kind, &flag.message, None, now_ms)
            }
            None => conditions::set(conditions, kind, false, "NotObserved", "", None, now_ms),
        }
    }
}

/// A condition reason must be CamelCase letters: `thermal` becomes `Thermal`.
fn reason_word(text: &str, fallback: &str) -> String {
    let word: String = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut chars = w.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();
    if word.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
        word
    } else {
        fallback.to_string()
    }
}

fn status_of(device: &DeviceView, conditions: Vec<Condition>) -> EdgeDeviceStatus {
    EdgeDeviceStatus {
        capacity: Some(DeviceCapacity {
            cores: device.cores,
            arch: device.arch.clone(),
            memory_bytes: device.memory_bytes,
            nominal_hashrate: device.nominal_hashrate,
            hash_engine: device.hash_engine.clone(),
            hash_engine_basis: Some(device.hash_engine_basis.clone())
                .filter(|basis| !basis.is_empty()),
            hash_engine_rates: device.hash_engine_rates.clone(),
        }),
        conditions,
        last_heartbeat_time: time_from_unix_ms(device.last_seen_unix_ms),
        assigned_miner: device.miner.clone(),
        hashrate: Some(device.effective_hashrate),
        shares: Some(micromine_fleet::status::share_counts(&device.shares)),
        temperature_c: device
            .connected
            .then_some(device.readings.temperature_c)
            .flatten()
            .map(f64::from),
        certificate_not_after: (device.certificate_not_after_unix_ms > 0)
            .then(|| time_from_unix_ms(device.certificate_not_after_unix_ms))
            .flatten(),
        agent_version: (!device.agent_version.is_empty()).then(|| device.agent_version.clone()),
    }
}

/// Sends one write.
pub async fn send(api: &Api<EdgeDevice>, write: &DeviceWrite) -> Result<(), kube::Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match write {
        DeviceWrite::Labels { name, labels } => {
            let patch = json!({
                "apiVersion": API_VERSION,
                "kind": "EdgeDevice",
                "metadata": {"name": name, "labels": labels},
                "spec": {},
            });
            api.patch(name, &params, &Patch::Apply(&patch)).await?;
        }
        DeviceWrite::Status { name, status } => {
            let patch = json!({
                "apiVersion": API_VERSION,
                "kind": "EdgeDevice",
                "status": status,
            });
            api.patch_status(name, &params, &Patch::Apply(&patch))
                .await?;
        }
    }
    Ok(())
}

/// Publishes device status until `stop`: every [`PUBLISH_PERIOD`], the writes the
/// fleet's state calls for, and a Warning event when a device turns out hostile.
pub async fn publish(
    api: Api<EdgeDevice>,
    fleet: Arc<Fleet>,
    publisher: Arc<Mutex<DevicePublisher>>,
    recorder: Recorder,
    stop: CancellationToken,
) {
    let mut every = Every::new(PUBLISH_PERIOD, stop);
    while every.tick().await {
        let devices = fleet.view().devices;
        let now = now_ms();
        let (writes, before): (Vec<DeviceWrite>, HashMap<String, Vec<Condition>>) = {
            let mut publisher = publisher.lock().unwrap_or_else(|p| p.into_inner());
            let before = devices
                .iter()
                .map(|d| (d.name.clone(), publisher.conditions(&d.name)))
                .collect();
            (publisher.plan(&devices, now), before)
        };
        for write in &writes {
            if let Err(e) = send(&api, write).await {
                tracing::warn!(error = %e, write = ?write_kind(write), "writing an EdgeDevice failed; will retry");
                publisher
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .failed(write);
                continue;
            }
            if let DeviceWrite::Status { name, status } = write {
                warn_on_flips(&recorder, name, before.get(name), &status.conditions).await;
            }
        }
    }
}

fn write_kind(write: &DeviceWrite) -> String {
    match write {
        DeviceWrite::Labels { name, .. } => format!("labels of {name}"),
        DeviceWrite::Status { name, .. } => format!("status of {name}"),
    }
}

async fn warn_on_flips(
    recorder: &Recorder,
    name: &str,
    before: Option<&Vec<Condition>>,
    after: &[Condition],
) {
    for kind in WARNING_CONDITIONS {
        let was = before
            .and_then(|b| b.iter().find(|c| c.type_ == kind))
            .is_some_and(|c| c.status == "True");
        let Some(now) = after.iter().find(|c| c.type_ == kind && c.status == "True") else {
            continue;
        };
        if was {
            continue;
        }
        let reference = ObjectReference {
            api_version: Some(API_VERSION.into()),
            kind: Some("EdgeDevice".into()),
            name: Some(name.into()),
            ..ObjectReference::default()
        };
        let note = Note {
            type_: EventType::Warning,
            reason: kind.into(),
            note: Some(now.message.chars().take(1000).collect()),
            action: "VerifyShares".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&note, &reference).await {
            tracing::debug!(error = %e, device = name, "publishing an event failed");
        }
    }
}

/// What the operator asked of the devices, applied to the fleet: cordons, revocations,
/// and sessions ended by deletion.
pub struct DeviceSpecs {
    fleet: Arc<Fleet>,
    revocations: Arc<RevocationStore>,
    publisher: Arc<Mutex<DevicePublisher>>,
    /// Devices cordoned by the API server's word, for undoing what a relist no longer says.
    cordoned: BTreeSet<String>,
    relisted: BTreeSet<String>,
    /// Which devices the revocation store blocks, read once and then kept up to date by
    /// our own writes: a relist of ten thousand EdgeDevices must not read the store ten
    /// thousand times.
    blocked: BTreeSet<String>,
}

impl DeviceSpecs {
    /// Applies specs to `fleet`, revocations through `revocations`.
    pub fn new(
        fleet: Arc<Fleet>,
        revocations: Arc<RevocationStore>,
        publisher: Arc<Mutex<DevicePublisher>>,
    ) -> DeviceSpecs {
        let (current, problems) = revocations.load();
        for problem in problems {
            tracing::error!(%problem, "revocation record unreadable");
        }
        let blocked = current
            .into_iter()
            .filter(|(_, r)| r.blocked)
            .map(|(name, _)| name)
            .collect();
        DeviceSpecs {
            fleet,
            revocations,
            publisher,
            cordoned: BTreeSet::new(),
            relisted: BTreeSet::new(),
            blocked,
        }
    }

    /// Handles one watch event.
    pub async fn handle(&mut self, event: Event<EdgeDevice>) {
        match event {
            Event::Init => self.relisted.clear(),
            Event::InitApply(device) => {
                if let Some(name) = device.metadata.name.clone() {
                    self.relisted.insert(name);
                }
                self.apply(&device).await;
            }
            Event::InitDone => {
                // Devices cordoned before the relist and absent from it were deleted
                // while the watch was down.
                let gone: Vec<String> = self.cordoned.difference(&self.relisted).cloned().collect();
                for name in gone {
                    self.cordoned.remove(&name);
                    self.fleet.set_unschedulable(&name, false);
                }
            }
            Event::Apply(device) => self.apply(&device).await,
            Event::Delete(device) => {
                let Some(name) = device.metadata.name.as_deref() else {
                    return;
                };
                self.fleet.cut(name, "EdgeDevice deleted");
                self.cordoned.remove(name);
                self.fleet.set_unschedulable(name, false);
                self.publisher
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .deleted(name, now_ms());
                tracing::info!(device = name, "EdgeDevice deleted; its session was ended");
            }
        }
    }

    async fn apply(&mut self, device: &EdgeDevice) {
        let Some(name) = device.metadata.name.clone() else {
            return;
        };
        self.publisher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .exists(&name);
        let unschedulable = device.spec.unschedulable;
        if unschedulable {
            self.cordoned.insert(name.clone());
        } else {
            self.cordoned.remove(&name);
        }
        self.fleet.set_unschedulable(&name, unschedulable);

        // The revocation store is the one truth the TLS layer reads; the spec drives it.
        let revoked = device.spec.revoked;
        if revoked == self.blocked.contains(&name) {
            return;
        }
        let store = self.revocations.clone();
        let target = name.clone();
        let result = tokio::task::spawn_blocking(move || {
            if revoked {
                store.revoke(&target, now_ms()).map(|_| ())
            } else {
                store.unblock(&target).map(|_| ())
            }
        })
        .await;
        match result {
            Ok(Ok(())) => {
                if revoked {
                    self.blocked.insert(name.clone());
                } else {
                    self.blocked.remove(&name);
                }
                let what = if revoked { "revoked" } else { "let back in" };
                tracing::info!(device = %name, what, "EdgeDevice spec.revoked applied");
            }
            // Left as it was, so the next event for the device tries again.
            Ok(Err(e)) => {
                tracing::error!(device = %name, error = %e, "applying spec.revoked failed")
            }
            Err(e) => tracing::error!(device = %name, error = %e, "applying spec.revoked failed"),
        }
    }
}

/// Watches EdgeDevices until `stop`, handing every event to `specs`.
pub async fn watch(api: Api<EdgeDevice>, mut specs: DeviceSpecs, stop: CancellationToken) {
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            event = events.next() => event,
        };
        match event {
            Some(Ok(event)) => specs.handle(event).await,
            Some(Err(e)) => tracing::warn!(error = %e, "watching EdgeDevices failed; retrying"),
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::kubernetes::testing::{self, expect};
    use http::{Method, StatusCode};
    use micromine_fleet::status::{DeviceFlag, DeviceReadings};
    use micromine_store::ledger::Totals;

    const T0: i64 = 1_800_000_000_000;

    fn device(name: &str, connected: bool, now_ms: i64) -> DeviceView {
        DeviceView {
            name: name.into(),
            labels: BTreeMap::from([("site".into(), "plant-3".into())]),
            connected,
            state: if connected { "mining" } else { "offline" }.into(),
            miner: Some("plant/night-shift".into()),
            unschedulable: false,
            cores: 4,
            memory_bytes: 1 << 30,
            mining_threads: 3,
            arch: "aarch64".into(),
            hash_engine: "armv8-sha2".into(),
            hash_engine_basis: "calibrated".into(),
            hash_engine_rates: [
                ("armv8-sha2".to_string(), 1.1e6),
                ("neon".to_string(), 0.3e6),
            ]
            .into(),
            agent_version: "0.1.0".into(),
            nominal_hashrate: 2.0e6,
            reported_hashrate: 1.9e6,
            effective_hashrate: 1.8e6,
            share_difficulty: 1.0,
            assignments: 2,
            shares: Totals::default(),
            protocol_errors: 0,
            last_seen_unix_ms: now_ms,
            certificate_not_after_unix_ms: now_ms + 86_400_000,
            flags: Vec::new(),
            readings: DeviceReadings {
                temperature_c: Some(48.5),
                ..Default::default()
            },
            pool: Default::default(),
        }
    }

    fn publisher(per_minute: u32) -> DevicePublisher {
        DevicePublisher::new(Arc::new(Mutex::new(WriteBudget::new(per_minute, T0))))
    }

    fn statuses(writes: &[DeviceWrite]) -> Vec<(&str, &EdgeDeviceStatus)> {
        writes
            .iter()
            .filter_map(|w| match w {
                DeviceWrite::Status { name, status } => Some((name.as_str(), status.as_ref())),
                DeviceWrite::Labels { .. } => None,
            })
            .collect()
    }

    fn condition<'a>(status: &'a EdgeDeviceStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn the_budget_refills_at_its_rate_and_saves_up_at_most_a_minute() {
        let mut budget = WriteBudget::new(60, T0);
        let taken = (0..100).filter(|_| budget.try_take(T0)).count();
        assert_eq!(taken, 60);
        assert!(!budget.try_take(T0 + 999));
        assert!(budget.try_take(T0 + 1_000));
        assert!(!budget.try_take(T0 + 1_000));
        // An hour idle saves up one minute's worth, not sixty.
        let later = T0 + 3_600_000;
        assert_eq!((0..100).filter(|_| budget.try_take(later)).count(), 60);
    }

    #[test]
    fn a_connecting_device_is_created_then_written_only_on_changes_and_refreshes() {
        let mut p = publisher(1000);
        let mut d = device("gw-1", true, T0);
        let first = p.plan(std::slice::from_ref(&d), T0);
        assert_eq!(
            first[0],
            DeviceWrite::Labels {
                name: "gw-1".into(),
                labels: d.labels.clone()
            }
        );
        let (_, status) = statuses(&first)[0];
        assert_eq!(condition(status, "Ready").status, "True");
        assert_eq!(condition(status, "Enrolled").status, "True");
        assert_eq!(condition(status, "HashrateMismatch").status, "False");
        assert_eq!(status.assigned_miner.as_deref(), Some("plant/night-shift"));
        assert_eq!(status.capacity.as_ref().unwrap().memory_bytes, 1 << 30);

        assert_eq!(status.temperature_c, Some(48.5));

        // Heartbeats and moving figures within the minute: nothing.
        for step in 1..12 {
            let now = T0 + step * 5_000;
            d.last_seen_unix_ms = now;
            d.effective_hashrate += 1000.0;
            d.readings.temperature_c = Some(50.0 + step as f32);
            assert!(
                p.plan(std::slice::from_ref(&d), now).is_empty(),
                "at +{step}×5 s"
            );
        }
        // A minute after the last write, the figures are refreshed.
        let now = T0 + 60_000;
        d.last_seen_unix_ms = now;
        let refresh = p.plan(std::slice::from_ref(&d), now);
        assert_eq!(statuses(&refresh).len(), 1);
        assert_eq!(statuses(&refresh)[0].1.hashrate, Some(d.effective_hashrate));
        assert_eq!(statuses(&refresh)[0].1.temperature_c, Some(61.0));

        // A state change goes out at once.
        d.state = "throttled:thermal".into();
        let throttled = p.plan(std::slice::from_ref(&d), now + 1_000);
        let (_, status) = statuses(&throttled)[0];
        let c = condition(status, "Throttled");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Thermal"));
        assert_eq!(condition(status, "Schedulable").status, "True");

        for (state, reason) in [
            ("paused:battery", "Battery"),
            ("throttled:host-load", "HostLoad"),
            ("outside-window", "OutsideWindow"),
        ] {
            d.state = state.into();
            let held = p.plan(std::slice::from_ref(&d), now + 1_500);
            let c = condition(statuses(&held)[0].1, "Throttled");
            assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", reason));
        }

        d.unschedulable = true;
        d.state = "unschedulable".into();
        let cordoned = p.plan(std::slice::from_ref(&d), now + 2_000);
        let c = condition(statuses(&cordoned)[0].1, "Schedulable");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Unschedulable")
        );
    }

    #[test]
    fn missed_heartbeats_and_disconnection_make_a_device_not_ready() {
        let mut p = publisher(1000);
        let d = device("gw-1", true, T0);
        p.plan(std::slice::from_ref(&d), T0);
        assert!(
            p.plan(std::slice::from_ref(&d), T0 + HEARTBEAT_GRACE_MS)
                .is_empty()
        );
        let silent = p.plan(std::slice::from_ref(&d), T0 + HEARTBEAT_GRACE_MS + 5_000);
        let ready = condition(statuses(&silent)[0].1, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "HeartbeatMissed")
        );
        assert!(ready.message.contains("20 s"), "{}", ready.message);

        let gone = device("gw-1", false, T0);
        let writes = p.plan(&[gone], T0 + 30_000);
        let ready = condition(statuses(&writes)[0].1, "Ready");
        assert_eq!(ready.reason, "Disconnected");
    }

    #[test]
    fn offline_and_just_deleted_devices_are_not_created() {
        let mut p = publisher(1000);
        assert!(p.plan(&[device("old", false, T0)], T0).is_empty());
        p.exists("gw-1");
        p.deleted("gw-1", T0);
        let d = device("gw-1", true, T0);
        assert!(p.plan(std::slice::from_ref(&d), T0 + 1_000).is_empty());
        // Once the deletion has cut the old session, a reconnecting agent registers again.
        assert!(!p.plan(&[d], T0 + TOMBSTONE_MS).is_empty());
    }

    #[test]
    fn relabelled_devices_get_their_labels_applied_and_failed_writes_are_planned_again() {
        let mut p = publisher(1000);
        let mut d = device("gw-1", true, T0);
        p.plan(std::slice::from_ref(&d), T0);
        d.labels.insert("class".into(), "gateway".into());
        let writes = p.plan(std::slice::from_ref(&d), T0 + 1);
        assert!(matches!(&writes[..], [DeviceWrite::Labels { labels, .. }] if labels.len() == 2));
        p.failed(&writes[0]);
        assert_eq!(p.plan(std::slice::from_ref(&d), T0 + 2), writes);

        let status = statuses(&p.plan(std::slice::from_ref(&d), T0 + 3)).len();
        assert_eq!(status, 0);
        let write = DeviceWrite::Status {
            name: "gw-1".into(),
            status: Box::default(),
        };
        p.failed(&write);
        assert_eq!(statuses(&p.plan(&[d], T0 + 4)).len(), 1);
    }

    #[test]
    fn refreshes_stop_at_the_budget_and_the_stalest_go_first() {
        let mut p = publisher(3);
        let mut fleet: Vec<DeviceView> = (0..10)
            .map(|i| device(&format!("d{i}"), true, T0))
            .collect();
        // Created at different times, so their staleness differs.
        for (i, d) in fleet.iter().enumerate() {
            p.plan(std::slice::from_ref(d), T0 + i as i64);
        }
        for d in &mut fleet {
            d.effective_hashrate *= 2.0;
            d.last_seen_unix_ms = T0 + 140_000;
        }
        // The budget saved up 3 at T0 and spent none on creation.
        let writes = p.plan(&fleet, T0 + 120_000);
        let names: Vec<&str> = statuses(&writes).iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["d0", "d1", "d2"]);
        let next = p.plan(&fleet, T0 + 120_000 + 20_000);
        let names: Vec<&str> = statuses(&next).iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["d3"], "one write refilled in 20 s at 3/min");
    }

    #[test]
    fn hostile_flags_become_conditions() {
        let mut p = publisher(1000);
        let mut d = device("gw-1", true, T0);
        p.plan(std::slice::from_ref(&d), T0);
        d.flags.push(DeviceFlag {
            kind: "ForeignShares".into(),
            message: "3 shares for other devices' work".into(),
        });
        let writes = p.plan(&[d], T0 + 1);
        let c = condition(statuses(&writes)[0].1, "ForeignShares");
        assert_eq!(
            (c.status.as_str(), c.message.as_str()),
            ("True", "3 shares for other devices' work")
        );
    }

    #[tokio::test]
    async fn writes_are_server_side_applies_of_the_object_and_its_status() {
        let (client, mut api) = testing::client("default");
        let devices: Api<EdgeDevice> = Api::all(client);
        let mut p = publisher(1000);
        let writes = p.plan(&[device("gw-1", true, T0)], T0);
        let sender = tokio::spawn(async move {
            for write in &writes {
                send(&devices, write).await?;
            }
            Ok::<_, kube::Error>(())
        });
        let path = "/apis/micromine.dev/v1alpha1/edgedevices/gw-1";
        let create = expect(&mut api, Method::PATCH, path).await;
        assert_eq!(create.content_type, "application/apply-patch+yaml");
        assert!(create.query.contains("fieldManager=micromine-controller"));
        assert_eq!(create.body["metadata"]["labels"]["site"], "plant-3");
        assert_eq!(create.body["spec"], json!({}), "the spec is the operator's");
        let echo = create.body.clone();
        create.answer(StatusCode::CREATED, &echo);
        let status = expect(&mut api, Method::PATCH, &format!("{path}/status")).await;
        assert_eq!(status.body["status"]["assignedMiner"], "plant/night-shift");
        assert_eq!(status.body["status"]["capacity"]["arch"], "aarch64");
        // The engine choice and what it was chosen from, as the agent reported them.
        assert_eq!(
            status.body["status"]["capacity"]["hashEngineBasis"],
            "calibrated"
        );
        assert_eq!(
            status.body["status"]["capacity"]["hashEngineRates"],
            json!({"armv8-sha2": 1.1e6, "neon": 0.3e6})
        );
        assert!(status.body.get("spec").is_none());
        let mut echo = status.body.clone();
        echo["metadata"] = json!({"name": "gw-1"});
        echo["spec"] = json!({});
        status.answer(StatusCode::OK, &echo);
        sender.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn specs_cordon_and_revoke_through_the_fleet_and_the_revocation_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = micromine_store::store::Store::open(&dir.path().join("store.redb")).unwrap();
        let ledger = micromine_store::ledger::Ledger::open(store.clone()).unwrap();
        let fleet = Fleet::open(store, ledger).await.unwrap();
        let revocations = Arc::new(RevocationStore::open(&dir.path().join("revocations")).unwrap());
        let p = Arc::new(Mutex::new(publisher(1000)));
        let mut specs = DeviceSpecs::new(fleet.clone(), revocations.clone(), p.clone());
        let object = |unschedulable: bool, revoked: bool| {
            let mut d = EdgeDevice::new(
                "gw-1",
                micromine_resources::edgedevice::EdgeDeviceSpec {
                    unschedulable,
                    revoked,
                },
            );
            d.metadata.resource_version = Some("1".into());
            d
        };
        let blocked = || revocations.load().0.get("gw-1").is_some_and(|r| r.blocked);

        specs.handle(Event::Init).await;
        specs.handle(Event::InitApply(object(true, false))).await;
        specs.handle(Event::InitDone).await;
        assert!(p.lock().unwrap().existing.contains_key("gw-1"));
        assert!(specs.cordoned.contains("gw-1"));
        assert!(!blocked());

        specs.handle(Event::Apply(object(false, true))).await;
        assert!(specs.cordoned.is_empty());
        assert!(blocked());
        let revoked_at = revocations.load().0["gw-1"].revoked_at_unix_ms;
        // Seeing the same spec again (a relist) does not move the revocation time.
        specs.handle(Event::Apply(object(false, true))).await;
        assert_eq!(revocations.load().0["gw-1"].revoked_at_unix_ms, revoked_at);

        specs.handle(Event::Apply(object(false, false))).await;
        assert!(!blocked());

        // Cordoned, then deleted while the watch was down: the relist uncordons it.
        specs.handle(Event::Apply(object(true, false))).await;
        specs.handle(Event::Init).await;
        specs.handle(Event::InitDone).await;
        assert!(specs.cordoned.is_empty());

        specs.handle(Event::Apply(object(false, false))).await;
        specs.handle(Event::Delete(object(false, false))).await;
        assert!(!p.lock().unwrap().existing.contains_key("gw-1"));
    }
}
