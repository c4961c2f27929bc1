//! What makes an agent session a simulated device: its share of the simulation's hashing
//! threads, its rate and link churn, and where its assignment latency is recorded. The
//! session reads this; `simulate` builds fleets of such devices on top of sessions.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use micromine_proto::pb;
use serde::Serialize;

use crate::engine::EngineKind;
use crate::miner::PacedPool;

/// What makes an agent a simulated device (see [`AgentConfig::simulation`]).
#[derive(Clone)]
pub struct SimulatedDevice {
    /// The hashing threads all devices of the simulation share.
    pub pool: Arc<PacedPool>,
    /// The device's hash rate, H/s: what it really hashes, and what it says it hashed.
    pub hashrate: f64,
    /// The full-speed rate it claims in `Hello`, H/s: usually `hashrate`; otherwise a
    /// device that misjudges itself, whose share difficulty the controller has to find
    /// from its shares.
    pub claimed_hashrate: f64,
    /// Link drops per device per minute (0: a steady link).
    pub churn_per_minute: f64,
    /// Where the time from asking for work to being given it is recorded.
    pub latency: Arc<LatencyRecorder>,
    /// The device's own address to connect from (see [`device_address`]).
    pub local_address: Option<IpAddr>,
}

impl std::fmt::Debug for SimulatedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedDevice")
            .field("hashrate", &self.hashrate)
            .field("claimed_hashrate", &self.claimed_hashrate)
            .field("churn_per_minute", &self.churn_per_minute)
            .finish_non_exhaustive()
    }
}

impl SimulatedDevice {
    /// What the device reports in `Hello`: one core hashing at the claimed rate.
    pub fn capacity(&self, engine: EngineKind) -> pb::Capacity {
        pb::Capacity {
            cores: 1,
            mining_threads: 1,
            arch: crate::capacity::arch().to_string(),
            memory_bytes: 512 << 20,
            nominal_hashrate: self.claimed_hashrate,
            hash_engine: format!("{} (simulated)", engine.name()),
            hash_engine_basis: "simulated".to_string(),
            hash_engine_rates: Default::default(),
        }
    }

    /// How long the next session lasts before its link drops, if links drop at all:
    /// exponentially distributed, so drops arrive as a Poisson process per device.
    pub fn next_link_drop(&self) -> Option<Duration> {
        use rand::RngExt as _;
        if !(self.churn_per_minute.is_finite() && self.churn_per_minute > 0.0) {
            return None;
        }
        let uniform: f64 = rand::rng().random_range(f64::EPSILON..1.0);
        let mean_seconds = 60.0 / self.churn_per_minute;
        Some(Duration::from_secs_f64(
            (-uniform.ln() * mean_seconds).min(86_400.0),
        ))
    }
}

/// The address device `index` (from 0) connects from when the controller is on this
/// machine's IPv4 loopback: 127.1.0.1 and on, one each. Every connection to one
/// destination needs its own source port, and a single source address has about 28,000
/// of them, half of which a fleet's enrollments leave in TIME_WAIT; worse, the kernel's
/// search for a free port grows with the connections already open. Real devices each
/// have their own address; so do simulated ones. None for a remote controller (the
/// system picks the address).
pub fn device_address(controller: &str, index: usize) -> Option<IpAddr> {
    let uri: http::Uri = controller.parse().ok()?;
    let host = uri.host()?;
    let loopback = host == "localhost" || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return None;
    }
    // 127.1.0.1 ... 127.254.255.255: room for 16 million devices.
    let n = u32::try_from(index).ok()?.checked_add((1 << 16) + 1)?;
    (n < 255 << 16).then(|| IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | n)))
}

/// Latencies from all devices of a simulation, for percentiles over an interval.
#[derive(Debug, Default)]
pub struct LatencyRecorder {
    micros: Mutex<Vec<u32>>,
}

/// Upper bounds, in milliseconds, of the buckets a [`LatencySummary`] counts latencies in.
pub const LATENCY_BUCKETS_MS: [f64; 13] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// Percentiles of the latencies recorded over an interval.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// How many were recorded.
    pub count: u64,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Largest, milliseconds.
    pub max_ms: f64,
    /// How many fell at or below each of [`LATENCY_BUCKETS_MS`] and above the one before
    /// (those above the last are `count` minus the sum). Percentiles of several intervals
    /// cannot be combined; these counts can, so a benchmark can take the percentiles of
    /// any window of intervals.
    pub buckets: Vec<u64>,
}

impl LatencyRecorder {
    /// Records one latency.
    pub fn record(&self, latency: Duration) {
        let micros = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        self.micros
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(micros);
    }

    /// The percentiles of everything recorded since the previous call, which starts a new
    /// interval.
    pub fn take(&self) -> LatencySummary {
        let mut micros =
            std::mem::take(&mut *self.micros.lock().unwrap_or_else(|p| p.into_inner()));
        summarize(&mut micros)
    }
}

fn summarize(micros: &mut [u32]) -> LatencySummary {
    if micros.is_empty() {
        return LatencySummary::default();
    }
    micros.sort_unstable();
    // Nearest rank: the smallest value at least `q` of the samples do not exceed.
    let rank = |q: f64| {
        let index = ((q * micros.len() as f64).ceil() as usize).clamp(1, micros.len()) - 1;
        f64::from(micros[index]) / 1000.0
    };
    let mut buckets = vec![0; LATENCY_BUCKETS_MS.len()];
    for &latency in micros.iter() {
        let ms = f64::from(latency) / 1000.0;
        if let Some(bucket) = LATENCY_BUCKETS_MS.iter().position(|&le| ms <= le) {
            buckets[bucket] += 1;
        }
    }
    LatencySummary {
        count: micros.len() as u64,
        p50_ms: rank(0.50),
        p99_ms: rank(0.99),
        max_ms: f64::from(micros[micros.len() - 1]) / 1000.0,
        buckets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut micros: Vec<u32> = (1..=100).map(|ms| ms * 1000).rev().collect();
        let summary = summarize(&mut micros);
        assert_eq!(summary.count, 100);
        assert_eq!(summary.p50_ms, 50.0);
        assert_eq!(summary.p99_ms, 99.0);
        assert_eq!(summary.max_ms, 100.0);
        assert_eq!(summarize(&mut []), LatencySummary::default());
        assert_eq!(summarize(&mut [7000]).p99_ms, 7.0);
        // 1..=100 ms: one at or below 1 ms, one in (1, 2], three in (2, 5], ... and
        // none above 100 ms.
        assert_eq!(
            summary.buckets,
            vec![1, 1, 3, 5, 10, 30, 50, 0, 0, 0, 0, 0, 0]
        );
        let beyond = summarize(&mut [500, 10_000_001]);
        assert_eq!(beyond.buckets.iter().sum::<u64>(), 1, "{beyond:?}");
        assert_eq!(beyond.count, 2);
    }

    #[test]
    fn devices_of_a_local_controller_connect_from_their_own_loopback_address() {
        let local = "https://127.0.0.1:7443";
        assert_eq!(
            device_address(local, 0),
            Some(IpAddr::V4(Ipv4Addr::new(127, 1, 0, 1)))
        );
        assert_eq!(
            device_address(local, 9_999),
            Some(IpAddr::V4(Ipv4Addr::new(127, 1, 39, 16)))
        );
        assert_eq!(
            device_address("https://localhost:7443", 65_535),
            Some(IpAddr::V4(Ipv4Addr::new(127, 2, 0, 0)))
        );
        let addresses: std::collections::HashSet<_> =
            (0..100_000).map(|i| device_address(local, i)).collect();
        assert_eq!(addresses.len(), 100_000, "one each");
        assert_eq!(device_address("https://controller.plant-3:7443", 0), None);
        assert_eq!(device_address("https://10.0.0.5:7443", 0), None);
        assert_eq!(device_address("https://[::1]:7443", 0), None);
        assert_eq!(
            device_address(local, (254 << 16) - 2),
            Some(IpAddr::V4(Ipv4Addr::new(127, 254, 255, 255)))
        );
        assert_eq!(
            device_address(local, (254 << 16) - 1),
            None,
            "the addresses ran out"
        );
    }

    #[test]
    fn a_recorder_starts_a_new_interval_when_read() {
        let recorder = LatencyRecorder::default();
        recorder.record(Duration::from_millis(3));
        recorder.record(Duration::from_millis(5));
        assert_eq!(recorder.take().count, 2);
        assert_eq!(recorder.take().count, 0);
    }

    #[test]
    fn link_drops_arrive_at_the_configured_rate() {
        let device = SimulatedDevice {
            pool: Arc::new(PacedPool::new(1)),
            hashrate: 1000.0,
            claimed_hashrate: 1000.0,
            churn_per_minute: 2.0,
            latency: Arc::default(),
            local_address: None,
        };
        let n = 20_000;
        let mean = (0..n)
            .map(|_| device.next_link_drop().expect("churn set").as_secs_f64())
            .sum::<f64>()
            / n as f64;
        // Two a minute: 30 s apart on average (the sample mean of 20,000 draws is within
        // 3 % of it with overwhelming probability).
        assert!((mean - 30.0).abs() < 0.9, "mean {mean}");
        let steady = SimulatedDevice {
            churn_per_minute: 0.0,
            ..device
        };
        assert_eq!(steady.next_link_drop(), None);
    }
}
