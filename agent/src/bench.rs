//! Measuring an engine's hash rate: the figure an agent reports as its nominal hashrate,
//! and what `micromine-agent bench` prints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use micromine_proto::work::Target;
use serde::Serialize;

use crate::calibrate::{self, Basis, Selection};
use crate::engine::{self, EngineKind};
use crate::sensors::Sensors;

/// Nonces per scan call: small enough to stop promptly, large enough that the loop
/// overhead vanishes.
const BENCH_CHUNK: u64 = 1 << 16;

/// The result of one benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Engine name.
    pub engine: String,
    /// Hashing threads.
    pub threads: usize,
    /// Measured wall-clock seconds.
    pub seconds: f64,
    /// Total hashes computed.
    pub hashes: u64,
    /// Hashes per second, all threads together.
    pub hashes_per_second: f64,
    /// The device's power draw halfway through, watts, where it reports one (a battery's
    /// `power_now`); the whole device's, not the hashing threads' alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_watts: Option<f64>,
    /// Hashes per joule of the device's draw: the figure that decides whether mining on it
    /// pays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hashes_per_joule: Option<f64>,
}

/// Hashes on `threads` threads for about `duration` and reports the rate, and with
/// `sensors` the device's power draw halfway through (when the hashing has warmed it up).
///
/// Each thread scans its own nonces of a fixed header against an impossible target, which
/// is exactly the per-nonce work of mining minus the rare share report.
pub fn run(
    kind: EngineKind,
    threads: usize,
    duration: Duration,
    sensors: Option<&mut Sensors>,
) -> BenchReport {
    let threads = threads.max(1);
    let prefix: [u8; 76] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    let work = Arc::new(engine::prepare(
        &prefix,
        Target::from_compact(0x0300_0001).unwrap_or(Target::MAX),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (work, stop, total) = (work.clone(), stop.clone(), total.clone());
            std::thread::spawn(move || {
                // Disjoint nonce bands per thread, wrapping inside the band.
                let band = (1u64 << 32) / threads as u64;
                let base = band * t as u64;
                let mut offset = 0u64;
                let mut sink = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let start = base + offset;
                    kind.scan(&work, start, start + BENCH_CHUNK, &mut |n| sink ^= n);
                    total.fetch_add(BENCH_CHUNK, Ordering::Relaxed);
                    offset = (offset + BENCH_CHUNK) % band.max(BENCH_CHUNK);
                }
                std::hint::black_box(sink);
            })
        })
        .collect();
    std::thread::sleep(duration / 2);
    let power_watts = sensors
        .and_then(|sensors| sensors.read().power_watts)
        .map(f64::from)
        .filter(|watts| *watts > 0.0);
    std::thread::sleep(duration - duration / 2);
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        // A hashing thread only panics on a bug; the figure is still the hashes counted.
        let _ = handle.join();
    }
    let seconds = started.elapsed().as_secs_f64();
    let hashes = total.load(Ordering::Relaxed);
    let hashes_per_second = hashes as f64 / seconds;
    BenchReport {
        engine: kind.name().to_string(),
        threads,
        seconds,
        hashes,
        hashes_per_second,
        power_watts,
        hashes_per_joule: power_watts.map(|watts| hashes_per_second / watts),
    }
}

/// The human-readable report of `micromine-agent bench`: one line per engine, the selected
/// one marked, then how it was chosen, and a warning when another engine measured faster.
pub fn table(selection: &Selection, reports: &[BenchReport]) -> String {
    let selected = selection.engine;
    let mut out = format!(
        "{:<12} {:>7} {:>10} {:>12} {:>11}\n",
        "engine", "threads", "MH/s", "MH/s/thread", "MH/J"
    );
    for report in reports {
        let per_joule = report
            .hashes_per_joule
            .map_or_else(|| "-".to_string(), |h| format!("{:.3}", h / 1e6));
        let mark = if report.engine == selected.name() {
            "  selected"
        } else {
            ""
        };
        out.push_str(&format!(
            "{:<12} {:>7} {:>10.2} {:>12.2} {:>11}{mark}\n",
            report.engine,
            report.threads,
            report.hashes_per_second / 1e6,
            report.hashes_per_second / 1e6 / report.threads as f64,
            per_joule,
        ));
    }
    if reports.iter().all(|r| r.hashes_per_joule.is_none()) {
        out.push_str("MH/J: this device reports no power draw (no battery `power_now`)\n");
    }
    if selection.basis == Basis::Calibrated {
        let timed: Vec<String> = selection
            .rates
            .iter()
            .map(|(engine, rate)| format!("{engine} {:.2}", rate / 1e6))
            .collect();
        out.push_str(&format!(
            "selected by timing each engine on one thread for {} ms in all (MH/s): {}\n",
            calibrate::BUDGET.as_millis(),
            timed.join(", ")
        ));
    }
    let fastest = reports
        .iter()
        .max_by(|a, b| a.hashes_per_second.total_cmp(&b.hashes_per_second));
    if let Some(fastest) = fastest
        && fastest.engine != selected.name()
    {
        out.push_str(&format!(
            "note: `{}` measured faster here than the selected `{selected}`\n",
            fastest.engine
        ));
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hashes_on_every_thread() {
        let report = run(EngineKind::Portable, 2, Duration::from_millis(200), None);
        assert_eq!(report.threads, 2);
        // Every thread finishes at least one chunk before it sees the stop flag.
        assert!(report.hashes >= 2 * BENCH_CHUNK, "{report:?}");
        assert!(report.hashes_per_second > 0.0);
        let json = serde_json::to_value(&report).expect("serialises");
        assert_eq!(json["engine"], "portable");
        assert_eq!(json["threads"], 2);
        // No sensors, no power figure, and no made-up efficiency.
        assert!(json.get("power_watts").is_none(), "{json}");
        assert!(json.get("hashes_per_joule").is_none(), "{json}");
    }

    #[test]
    fn divides_the_rate_by_the_power_the_device_reports() {
        let root = tempfile::tempdir().expect("tempdir");
        let battery = root.path().join("class/power_supply/BAT0");
        std::fs::create_dir_all(&battery).expect("mkdir");
        for (file, value) in [
            ("type", "Battery"),
            ("capacity", "80"),
            ("power_now", "2500000"),
        ] {
            std::fs::write(battery.join(file), value).expect("write");
        }
        let mut sensors = Sensors::new(crate::sensors::SensorPaths {
            sysfs: root.path().to_path_buf(),
            proc: root.path().join("no-proc"),
        });
        let report = run(
            EngineKind::Portable,
            1,
            Duration::from_millis(100),
            Some(&mut sensors),
        );
        assert_eq!(report.power_watts, Some(2.5));
        let per_joule = report.hashes_per_joule.expect("power was reported");
        assert!(
            (per_joule - report.hashes_per_second / 2.5).abs() < 1e-6,
            "{report:?}"
        );
    }
}
