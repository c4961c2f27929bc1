//! Choosing the hashing engine by measuring it: at `run` start the agent times every engine
//! this CPU runs, for 200 ms in all, and hashes with the fastest.
//!
//! A fixed order of preference is wrong somewhere: `sha-ni` is the fastest engine on AMD
//! Zen 3, but its round instruction is slow on some Intel cores with AVX-512, where
//! `avx512` or even `avx2` wins. Only a measurement on the device itself says which.
//!
//! The engines are timed on one thread, interleaved in short slices over several rounds,
//! and each keeps its best slice: a frequency ramp, an interrupt or a neighbour's burst
//! then costs one slice of one engine rather than deciding the choice. The result is kept
//! in the state directory, keyed by the CPU model and the agent's version, so a restart
//! does not measure again; a different CPU (a disk moved to another board) or a new agent
//! build measures afresh. `--engine NAME` skips all of this.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use micromine_proto::work::Target;
use serde::{Deserialize, Serialize};

use crate::engine::{self, EngineKind, EngineRequest, Work};
use micromine_host::files::write_file_atomic;

/// Longest the calibration at start may take, all engines together.
pub const BUDGET: Duration = Duration::from_millis(200);

/// Slices per engine: each engine is timed this many times, interleaved with the others.
const ROUNDS: u32 = 4;

/// The cached calibration's file in the state directory.
pub const CACHE_FILE: &str = "engine-calibration.json";

/// How the engine in use was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// Named by `--engine` (or `MICROMINE_ENGINE`).
    Configured,
    /// Measured at this start.
    Calibrated,
    /// Measured at an earlier start on the same CPU model with the same agent version.
    Cached,
}

impl Basis {
    /// The word reported to the controller.
    pub fn name(self) -> &'static str {
        match self {
            Basis::Configured => "configured",
            Basis::Calibrated => "calibrated",
            Basis::Cached => "cached",
        }
    }
}

/// The engine to hash with, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// The engine.
    pub engine: EngineKind,
    /// How it was chosen.
    pub basis: Basis,
    /// Hashes per second on one thread for each engine calibrated, by engine name; empty
    /// when the engine was configured.
    pub rates: BTreeMap<String, f64>,
}

/// A calibration as kept in the state directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Cached {
    /// The CPU it was measured on (`capacity::cpu_identity`: the model name and its
    /// family/model/stepping or ARM part numbers).
    cpu_model: String,
    /// The agent version that measured it: another build may have other engines.
    agent_version: String,
    /// The engine chosen.
    engine: String,
    /// Hashes per second on one thread, by engine name.
    rates: BTreeMap<String, f64>,
}

/// The machine a calibration is for, and where it is kept.
#[derive(Clone, Debug)]
pub struct Context {
    /// The CPU: its model name with its family/model/stepping or ARM part numbers.
    pub cpu_model: String,
    /// The agent's version.
    pub agent_version: String,
    /// The cache file; `None` keeps nothing (`bench`).
    pub cache: Option<PathBuf>,
    /// The engines this CPU runs, in the crate's order (ties go to the earlier one).
    pub available: Vec<EngineKind>,
}

impl Context {
    /// This machine and agent, caching in `state_dir` when given.
    pub fn this_machine(state_dir: Option<&Path>) -> Context {
        Context {
            cpu_model: crate::capacity::cpu_identity(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            cache: state_dir.map(|dir| dir.join(CACHE_FILE)),
            available: EngineKind::available().collect(),
        }
    }
}

/// The engine for `request`: a configured one as it is, else the cached calibration for this
/// CPU model and agent version, else a fresh calibration (by `rate`, normally
/// [`single_thread_rate`]), which is then cached. A cache that cannot be read or written
/// costs a calibration, never the start.
pub fn select(
    request: EngineRequest,
    context: &Context,
    rate: impl FnMut(EngineKind, Duration) -> f64,
) -> Selection {
    if let EngineRequest::Named(engine) = request {
        return Selection {
            engine,
            basis: Basis::Configured,
            rates: BTreeMap::new(),
        };
    }
    if let Some(selection) = context
        .cache
        .as_deref()
        .and_then(|path| cached(path, context))
    {
        return selection;
    }
    let rates = calibrate(&context.available, BUDGET, rate);
    let engine = fastest(&context.available, &rates);
    if let Some(path) = &context.cache {
        let record = Cached {
            cpu_model: context.cpu_model.clone(),
            agent_version: context.agent_version.clone(),
            engine: engine.name().to_string(),
            rates: rates.clone(),
        };
        let written = serde_json::to_vec_pretty(&record)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_file_atomic(path, &bytes, 0o600));
        if let Err(error) = written {
            tracing::warn!(file = %path.display(), %error,
                "could not keep the engine calibration; the next start measures again");
        }
    }
    Selection {
        engine,
        basis: Basis::Calibrated,
        rates,
    }
}

/// The cached calibration at `path` if it was made on this CPU model by this agent version
/// and chose an engine this CPU runs.
fn cached(path: &Path, context: &Context) -> Option<Selection> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "engine calibration unreadable; measuring again");
            return None;
        }
    };
    let record: Cached = match serde_json::from_slice(&bytes) {
        Ok(record) => record,
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "engine calibration is not valid; measuring again");
            return None;
        }
    };
    if record.cpu_model != context.cpu_model || record.agent_version != context.agent_version {
        tracing::info!(cached_cpu = %record.cpu_model, cached_version = %record.agent_version,
            "engine calibration is for another CPU or agent version; measuring again");
        return None;
    }
    let engine: EngineKind = record.engine.parse().ok()?;
    if !context.available.contains(&engine) {
        return None;
    }
    Some(Selection {
        engine,
        basis: Basis::Cached,
        rates: record.rates,
    })
}

/// Times each of `engines` by `rate` in [`ROUNDS`] interleaved slices that add up to
/// `budget`, and keeps each engine's best rate.
pub fn calibrate(
    engines: &[EngineKind],
    budget: Duration,
    mut rate: impl FnMut(EngineKind, Duration) -> f64,
) -> BTreeMap<String, f64> {
    let mut best: BTreeMap<String, f64> = BTreeMap::new();
    if engines.is_empty() {
        return best;
    }
    let slice = budget / (ROUNDS * engines.len() as u32);
    for _ in 0..ROUNDS {
        for &engine in engines {
            let measured = rate(engine, slice);
            let entry = best.entry(engine.name().to_string()).or_insert(0.0);
            if measured.is_finite() && measured > *entry {
                *entry = measured;
            }
        }
    }
    best
}

/// The engine of `engines` with the highest rate; on a tie, the earlier one. Portable when
/// none was measured.
pub fn fastest(engines: &[EngineKind], rates: &BTreeMap<String, f64>) -> EngineKind {
    let mut choice = (EngineKind::Portable, f64::NEG_INFINITY);
    for &engine in engines {
        if let Some(&rate) = rates.get(engine.name())
            && rate > choice.1
        {
            choice = (engine, rate);
        }
    }
    choice.0
}

/// Hashes per second `engine` reaches on this thread in about `slice`: a fixed header
/// scanned against an impossible target, in chunks that grow until one takes an eighth of
/// the slice, so that a slow engine on a slow core overshoots the slice by little.
pub fn single_thread_rate(engine: EngineKind, slice: Duration) -> f64 {
    let prefix: [u8; 76] = std::array::from_fn(|i| (i as u8).wrapping_mul(29).wrapping_add(3));
    let work: Work = engine::prepare(
        &prefix,
        Target::from_compact(0x0300_0001).unwrap_or(Target::MAX),
    );
    let mut chunk: u64 = 64;
    let mut hashed: u64 = 0;
    let mut sink = 0u32;
    let started = Instant::now();
    loop {
        let before = Instant::now();
        engine.scan(&work, hashed, hashed + chunk, &mut |nonce| sink ^= nonce);
        hashed += chunk;
        let took = before.elapsed();
        let elapsed = started.elapsed();
        if elapsed >= slice {
            std::hint::black_box(sink);
            return hashed as f64 / elapsed.as_secs_f64();
        }
        if took < slice / 8 && hashed + 2 * chunk < 1 << 32 {
            chunk *= 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(dir: &Path, cpu: &str, available: &[EngineKind]) -> Context {
        Context {
            cpu_model: cpu.to_string(),
            agent_version: "1.2.3".to_string(),
            cache: Some(dir.join(CACHE_FILE)),
            available: available.to_vec(),
        }
    }

    /// Rates as on a CPU whose SHA-NI is slow: avx512 first by the crate's order, but avx2
    /// measures faster than both.
    fn slow_sha_ni(engine: EngineKind, _: Duration) -> f64 {
        match engine {
            EngineKind::Avx512 => 9.0e6,
            EngineKind::ShaNi => 12.0e6,
            EngineKind::Avx2 => 14.0e6,
            _ => 2.0e6,
        }
    }

    const X86: [EngineKind; 4] = [
        EngineKind::Avx512,
        EngineKind::ShaNi,
        EngineKind::Avx2,
        EngineKind::Portable,
    ];

    #[test]
    fn the_measured_fastest_wins_over_the_crates_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let selection = select(
            EngineRequest::Auto,
            &context(dir.path(), "cpu", &X86),
            slow_sha_ni,
        );
        assert_eq!(selection.engine, EngineKind::Avx2);
        assert_eq!(selection.basis, Basis::Calibrated);
        assert_eq!(selection.rates.get("sha-ni"), Some(&12.0e6));
        assert_eq!(selection.rates.len(), 4);
    }

    #[test]
    fn each_engine_keeps_its_best_slice_within_the_budget() {
        let mut spent = Duration::ZERO;
        let mut calls = 0;
        // The first slice of every engine is disturbed (a frequency ramp, an interrupt).
        let rates = calibrate(&X86, BUDGET, |engine, slice| {
            spent += slice;
            calls += 1;
            let rate = slow_sha_ni(engine, slice);
            if calls <= X86.len() {
                rate / 10.0
            } else {
                rate
            }
        });
        assert!(spent <= BUDGET, "{spent:?}");
        assert_eq!(calls, X86.len() * ROUNDS as usize);
        assert_eq!(rates.get("avx2"), Some(&14.0e6));
        assert_eq!(fastest(&X86, &rates), EngineKind::Avx2);
        // A disturbed engine that lost every slice but one still gets its best.
        let mut nth = 0;
        let rates = calibrate(&[EngineKind::Portable], BUDGET, |_, _| {
            nth += 1;
            if nth == 3 { 5.0 } else { f64::NAN }
        });
        assert_eq!(rates.get("portable"), Some(&5.0));
    }

    #[test]
    fn ties_go_to_the_earlier_engine_and_nothing_measured_means_portable() {
        let rates = BTreeMap::from([("sha-ni".to_string(), 1.0), ("avx2".to_string(), 1.0)]);
        assert_eq!(fastest(&X86, &rates), EngineKind::ShaNi);
        assert_eq!(fastest(&X86, &BTreeMap::new()), EngineKind::Portable);
    }

    #[test]
    fn a_cached_calibration_skips_measuring_on_the_same_cpu_and_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let here = context(dir.path(), "AMD EPYC 9B14", &X86);
        let first = select(EngineRequest::Auto, &here, slow_sha_ni);
        let second = select(EngineRequest::Auto, &here, |_, _| {
            panic!("a cached calibration measures nothing")
        });
        assert_eq!(second.engine, EngineKind::Avx2);
        assert_eq!(second.basis, Basis::Cached);
        assert_eq!(second.rates, first.rates);
    }

    #[test]
    fn a_calibration_from_another_cpu_model_or_version_is_ignored_and_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Made on a CPU where sha-ni was the fastest.
        let elsewhere = context(dir.path(), "AMD EPYC 7B13", &X86);
        let old = select(EngineRequest::Auto, &elsewhere, |engine, _| {
            if engine == EngineKind::ShaNi {
                30.0e6
            } else {
                1.0
            }
        });
        assert_eq!(old.engine, EngineKind::ShaNi);

        let here = context(dir.path(), "Intel Xeon 6 model 207", &X86);
        let fresh = select(EngineRequest::Auto, &here, slow_sha_ni);
        assert_eq!(
            (fresh.engine, fresh.basis),
            (EngineKind::Avx2, Basis::Calibrated)
        );
        // The new measurement replaced the old one.
        let again = select(EngineRequest::Auto, &here, |_, _| panic!("cached"));
        assert_eq!(
            (again.engine, again.basis),
            (EngineKind::Avx2, Basis::Cached)
        );

        let upgraded = Context {
            agent_version: "1.2.4".to_string(),
            ..here
        };
        let remeasured = select(EngineRequest::Auto, &upgraded, |engine, _| {
            if engine == EngineKind::Avx512 {
                50.0e6
            } else {
                1.0
            }
        });
        assert_eq!(
            (remeasured.engine, remeasured.basis),
            (EngineKind::Avx512, Basis::Calibrated)
        );
    }

    #[test]
    fn a_damaged_cache_or_one_naming_an_engine_this_cpu_lacks_costs_a_calibration() {
        let dir = tempfile::tempdir().expect("tempdir");
        let here = context(dir.path(), "cpu", &X86);
        let path = dir.path().join(CACHE_FILE);
        for text in [
            "{ not json".to_string(),
            serde_json::json!({"cpu_model": "cpu", "agent_version": "1.2.3",
                "engine": "neon", "rates": {"neon": 1e9}})
            .to_string(),
            serde_json::json!({"cpu_model": "cpu", "agent_version": "1.2.3",
                "engine": "avx9", "rates": {}})
            .to_string(),
        ] {
            std::fs::write(&path, &text).expect("write");
            let selection = select(EngineRequest::Auto, &here, slow_sha_ni);
            assert_eq!(
                (selection.engine, selection.basis),
                (EngineKind::Avx2, Basis::Calibrated),
                "{text}"
            );
        }
    }

    #[test]
    fn a_configured_engine_is_neither_measured_nor_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let here = context(dir.path(), "cpu", &X86);
        let selection = select(EngineRequest::Named(EngineKind::Portable), &here, |_, _| {
            panic!("a configured engine measures nothing")
        });
        assert_eq!(selection.engine, EngineKind::Portable);
        assert_eq!(selection.basis, Basis::Configured);
        assert!(selection.rates.is_empty());
        assert!(!dir.path().join(CACHE_FILE).exists());
    }

    #[test]
    fn an_unwritable_cache_does_not_stop_the_choice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let here = Context {
            cache: Some(dir.path().join("missing-dir").join(CACHE_FILE)),
            ..context(dir.path(), "cpu", &X86)
        };
        let selection = select(EngineRequest::Auto, &here, slow_sha_ni);
        assert_eq!(selection.engine, EngineKind::Avx2);
    }

    #[test]
    fn the_real_measurement_counts_hashes_over_about_the_slice() {
        let slice = Duration::from_millis(20);
        let started = Instant::now();
        let rate = single_thread_rate(EngineKind::Portable, slice);
        let took = started.elapsed();
        assert!(rate > 0.0, "{rate}");
        assert!(took >= slice, "{took:?}");
        // The real selection on this machine picks an engine it runs.
        let selection = select(
            EngineRequest::Auto,
            &Context::this_machine(None),
            single_thread_rate,
        );
        assert!(selection.engine.is_available());
        assert_eq!(selection.rates.len(), EngineKind::available().count());
    }
}
