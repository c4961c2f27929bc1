//! Measuring an engine's hash rate: the figure an agent reports as its nominal hashrate,
//! and what `micromine-agent bench` prints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use micromine_proto::work::Target;
use serde::Serialize;

use crate::engine::{EngineKind, PreparedWork};

/// Nonces per scan call: small enough to stop promptly, large enough that the loop
/// overhead vanishes.
const BENCH_CHUNK: u64 = 1 << 16;

/// The result of one benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Engine name.
    pub engine: String,
    /// The hardware path the engine used.
    pub backend: String,
    /// Hashing threads.
    pub threads: usize,
    /// Measured wall-clock seconds.
    pub seconds: f64,
    /// Total hashes computed.
    pub hashes: u64,
    /// Hashes per second, all threads together.
    pub hashes_per_second: f64,
}

/// Hashes on `threads` threads for about `duration` and reports the rate.
///
/// Each thread scans its own nonces of a fixed header against an impossible target, which
/// is exactly the per-nonce work of mining minus the rare share report.
pub fn run(kind: EngineKind, threads: usize, duration: Duration) -> BenchReport {
    let threads = threads.max(1);
    let prefix: [u8; 76] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    let work = Arc::new(PreparedWork::new(
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
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        // A hashing thread only panics on a bug; the figure is still the hashes counted.
        let _ = handle.join();
    }
    let seconds = started.elapsed().as_secs_f64();
    let hashes = total.load(Ordering::Relaxed);
    BenchReport {
        engine: kind.name().to_string(),
        backend: kind.backend().to_string(),
        threads,
        seconds,
        hashes,
        hashes_per_second: hashes as f64 / seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hashes_on_every_thread() {
        let report = run(EngineKind::detect(), 2, Duration::from_millis(200));
        assert_eq!(report.threads, 2);
        // Every thread finishes at least one chunk before it sees the stop flag.
        assert!(report.hashes >= 2 * BENCH_CHUNK, "{report:?}");
        assert!(report.hashes_per_second > 0.0);
        let json = serde_json::to_value(&report).expect("serialises");
        assert_eq!(json["engine"], "sha2-midstate");
        assert_eq!(json["threads"], 2);
    }
}
