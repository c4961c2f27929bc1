//! What the fleet looks like from outside: views for the status API, the quickstart
//! display and (later) the Kubernetes status writer, plus the sliding window that turns
//! accepted share difficulty into an effective hash rate.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use micromine_resources::microminer::{MicroMinerStatus, ShareCounts};
use micromine_store::ledger::Totals;

/// Hashes per difficulty-1 share.
const HASHES_PER_DIFFICULTY: f64 = 4_294_967_296.0;
/// Width of one bucket of the effective-rate window.
const BUCKET_MS: i64 = 5_000;
/// How far back the effective rate looks.
const WINDOW_MS: i64 = 300_000;

/// Accepted difficulty over the last few minutes, in fixed buckets.
#[derive(Debug, Clone, Default)]
pub struct RateWindow {
    buckets: VecDeque<(i64, f64)>,
    first_ms: Option<i64>,
}

impl RateWindow {
    /// Adds an accepted share of `difficulty` at `now_ms`.
    pub fn add(&mut self, now_ms: i64, difficulty: f64) {
        let bucket = now_ms - now_ms.rem_euclid(BUCKET_MS);
        self.first_ms.get_or_insert(now_ms);
        match self.buckets.back_mut() {
            Some((start, sum)) if *start == bucket => *sum += difficulty,
            _ => self.buckets.push_back((bucket, difficulty)),
        }
        self.trim(now_ms);
    }

    /// Marks the start of observation (so a device that finds nothing shows 0, not NaN).
    pub fn observe_from(&mut self, now_ms: i64) {
        self.first_ms.get_or_insert(now_ms);
    }

    /// Hashes per second proven by accepted shares in the window.
    pub fn hashrate(&self, now_ms: i64) -> f64 {
        let Some(first) = self.first_ms else {
            return 0.0;
        };
        let since = now_ms - WINDOW_MS;
        let sum: f64 = self
            .buckets
            .iter()
            .filter(|(start, _)| *start + BUCKET_MS > since)
            .map(|(_, d)| d)
            .sum();
        let span_ms = (now_ms - first.max(since)).max(BUCKET_MS);
        sum * HASHES_PER_DIFFICULTY / (span_ms as f64 / 1000.0)
    }

    fn trim(&mut self, now_ms: i64) {
        while let Some((start, _)) = self.buckets.front() {
            if *start + BUCKET_MS <= now_ms - WINDOW_MS {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }
}

/// Whether an agent's reported state says a local limit holds it back:
/// `throttled:<why>`, `paused:<why>` or `outside-window`.
pub fn is_held_back(state: &str) -> bool {
    state.starts_with("throttled") || state.starts_with("paused") || state == "outside-window"
}

/// Whether such a state means the device hashes nothing at all (new work would only
/// expire): paused, outside its windows, yielding to its own workload, or stopping (handing
/// its work back before it leaves). A hot device still hashes, at half its duty cycle,
/// until it is very hot.
pub fn stops_hashing(state: &str) -> bool {
    state.starts_with("paused")
        || state == "outside-window"
        || state == "throttled:host-load"
        || state == "stopping"
}

/// One device as operators see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceView {
    /// EdgeDevice name (the certificate's common name).
    pub name: String,
    /// Labels the device reported.
    pub labels: BTreeMap<String, String>,
    /// Whether a session is open now.
    pub connected: bool,
    /// `mining`, `idle`, `offline`, `unschedulable`, or what the agent reports (e.g.
    /// `throttled:thermal`).
    pub state: String,
    /// The MicroMiner it works for, `namespace/name`.
    pub miner: Option<String>,
    /// Cordoned by an operator: connected, handed no work.
    pub unschedulable: bool,
    /// Logical cores.
    pub cores: u32,
    /// Physical memory, bytes.
    pub memory_bytes: u64,
    /// Hashing threads.
    pub mining_threads: u32,
    /// CPU architecture.
    pub arch: String,
    /// Hash engine.
    pub hash_engine: String,
    /// How the agent chose it (`calibrated`, `cached`, `configured`, `simulated`).
    pub hash_engine_basis: String,
    /// One thread's hashes per second for each engine the agent timed, by engine name.
    pub hash_engine_rates: BTreeMap<String, f64>,
    /// Agent version.
    pub agent_version: String,
    /// Claimed full-speed hash rate (H/s); used only to size work.
    pub nominal_hashrate: f64,
    /// Rate the agent says it hashed at recently (H/s).
    pub reported_hashrate: f64,
    /// Rate its accepted shares prove (H/s).
    pub effective_hashrate: f64,
    /// Current share difficulty.
    pub share_difficulty: f64,
    /// Leases held.
    pub assignments: usize,
    /// Ledger totals.
    pub shares: Totals,
    /// Messages that broke the protocol (malformed, truncated, oversized, out of order)
    /// since the controller started; each ended its session.
    pub protocol_errors: u64,
    /// Last time the device was heard from, Unix ms.
    pub last_seen_unix_ms: i64,
    /// When its newest certificate expires, Unix ms (0 if never issued by this controller).
    pub certificate_not_after_unix_ms: i64,
    /// Signs of a broken or hostile agent (`HashrateMismatch`, `ForeignShares`).
    pub flags: Vec<DeviceFlag>,
    /// What the device last said about its temperature, battery, power and load.
    pub readings: DeviceReadings,
    /// What pools made of the shares it found that went upstream (pool work only).
    #[serde(skip_serializing_if = "micromine_store::ledger::pool::PoolTotals::is_empty")]
    pub pool: micromine_store::ledger::pool::PoolTotals,
}

/// A device's own readings, as its agent last reported them. Each is absent when the
/// device has no such sensor, or sent a value no sensor could produce.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceReadings {
    /// The hottest thermal zone, °C.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<f32>,
    /// CPU used by everything but the agent, percent of the machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_cpu_percent: Option<f32>,
    /// The emptiest system battery, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub battery_percent: Option<f32>,
    /// Power drawn, watts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_watts: Option<f32>,
    /// Running on battery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_battery: Option<bool>,
    /// Fraction of its mining threads' time it spent hashing lately, as it measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duty_cycle: Option<f32>,
}

/// Keeps a reported value only when it is finite and within `range`.
fn plausible(value: Option<f32>, range: std::ops::RangeInclusive<f32>) -> Option<f32> {
    value.filter(|v| v.is_finite() && range.contains(v))
}

impl DeviceReadings {
    /// The readings of a report; implausible values are dropped, not clamped, so a broken
    /// sensor (or a lying agent) cannot pass for a hot or empty device.
    pub fn from_report(report: &micromine_proto::pb::CapacityReport) -> DeviceReadings {
        DeviceReadings {
            temperature_c: plausible(report.temperature_c, -40.0..=150.0),
            host_cpu_percent: plausible(report.host_cpu_percent, 0.0..=100.0),
            battery_percent: plausible(report.battery_percent, 0.0..=100.0),
            power_watts: plausible(report.power_watts, 0.0..=10_000.0),
            on_battery: report.on_battery,
            duty_cycle: plausible(report.duty_cycle, 0.0..=1.0),
        }
    }
}

/// Something about a device an operator should look at.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceFlag {
    /// `HashrateMismatch`: the rate it reports and the rate its shares prove disagree
    /// beyond statistical noise. `ForeignShares`: it submitted shares for other devices'
    /// work.
    #[serde(rename = "type")]
    pub kind: String,
    /// Figures behind the flag.
    pub message: String,
}

/// One MicroMiner as operators see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MinerView {
    /// `namespace/name`.
    pub key: String,
    /// The resource's status block.
    pub status: MicroMinerStatus,
    /// Ledger totals with rejections by reason.
    pub totals: Totals,
    /// Network difficulty of the work source.
    pub network_difficulty: f64,
}

/// The whole fleet.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FleetView {
    /// MicroMiners by key.
    pub miners: Vec<MinerView>,
    /// Devices by name.
    pub devices: Vec<DeviceView>,
    /// Totals over everything.
    pub totals: Totals,
    /// Sessions open now.
    pub sessions: usize,
    /// Live leases.
    pub assignments: usize,
}

/// The counts operators see, from the ledger's totals: stale shares apart from the other
/// rejections.
pub fn share_counts(t: &Totals) -> ShareCounts {
    let stale = t.rejected.stale;
    ShareCounts {
        accepted: t.accepted,
        rejected: t.rejected.total().saturating_sub(stale),
        stale,
    }
}

/// Manifest problems as the status API shows them.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestStatus {
    /// MicroMiners in effect.
    pub miners: usize,
    /// Current problems, one per file, in the words of `ManifestError`.
    pub errors: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_rate_from_accepted_difficulty() {
        let mut w = RateWindow::default();
        assert_eq!(w.hashrate(0), 0.0);
        w.observe_from(0);
        // Difficulty 1 per second for 100 s = 2^32 H/s.
        for s in 0..100 {
            w.add(s * 1000, 1.0);
        }
        let rate = w.hashrate(100_000);
        assert!((rate / HASHES_PER_DIFFICULTY - 1.0).abs() < 0.01, "{rate}");
        // Ten minutes of silence later, the window is empty.
        assert_eq!(w.hashrate(700_000), 0.0);
        w.add(700_000, 1.0);
        assert!(w.buckets.len() == 1);
    }
}
