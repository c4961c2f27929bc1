//! Engine throughput against the baseline the project measures itself by: a plain midstate
//! loop on `sha2::compress256` (two compressions per nonce, nothing else), single thread,
//! in the same run. Prints figures; asserts nothing about speed.
//!
//! `cargo bench -p micromine-agent --bench engine`
//! (`BENCH_SECONDS`, `BENCH_ROUNDS`, `BENCH_ENGINES=sha-ni,avx2` to change what is measured)

use std::hint::black_box;
use std::time::{Duration, Instant};

use micromine_agent::bench;
use micromine_agent::engine::EngineKind;
use micromine_proto::work::{Midstate, SHA256_IV};
use sha2::block_api::compress256;

/// The straightforward loop: what anyone would write first with the sha2 crate.
fn baseline(seconds: f64) -> f64 {
    let prefix: [u8; 76] = std::array::from_fn(|i| i as u8);
    let midstate = Midstate::new(&prefix);
    let mut block = midstate.second_block();
    let mut second = [0u8; 64];
    second[32] = 0x80;
    second[56..64].copy_from_slice(&256u64.to_be_bytes());
    let started = Instant::now();
    let mut hashes = 0u64;
    let mut nonce = 0u32;
    while started.elapsed().as_secs_f64() < seconds {
        for _ in 0..65_536 {
            block[12..16].copy_from_slice(&nonce.to_le_bytes());
            let mut state = midstate.state();
            compress256(&mut state, &[block]);
            for (i, word) in state.iter().enumerate() {
                second[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
            }
            let mut digest = SHA256_IV;
            compress256(&mut digest, &[second]);
            black_box(digest);
            nonce = nonce.wrapping_add(1);
        }
        hashes += 65_536;
    }
    hashes as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let env = |name: &str, default: f64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let seconds = env("BENCH_SECONDS", 2.0);
    let rounds = env("BENCH_ROUNDS", 3.0).max(1.0) as usize;
    // Virtual machines share cores with neighbours: the loops take turns, round after round,
    // and each keeps its best round, so that a noisy moment slows one sample, not one side.
    // BENCH_ENGINES=sha-ni,avx2 measures only those.
    let only = std::env::var("BENCH_ENGINES").unwrap_or_default();
    let engines: Vec<EngineKind> = EngineKind::available()
        .filter(|kind| only.is_empty() || only.split(',').any(|name| name == kind.name()))
        .collect();
    let mut base = 0f64;
    let mut one = vec![0f64; engines.len()];
    let mut two = vec![0f64; engines.len()];
    for _ in 0..rounds {
        base = base.max(baseline(seconds));
        for (i, kind) in engines.iter().enumerate() {
            let duration = Duration::from_secs_f64(seconds);
            one[i] = one[i].max(bench::run(*kind, 1, duration, None).hashes_per_second);
            two[i] = two[i].max(bench::run(*kind, 2, duration, None).hashes_per_second);
        }
    }
    println!(
        "CPU: {}; best of {rounds} rounds of {seconds} s",
        micromine_agent::capacity::cpu_model()
    );
    println!(
        "baseline sha2::compress256 midstate loop, 1 thread: {:.2} MH/s",
        base / 1e6
    );
    for (i, kind) in engines.iter().enumerate() {
        let selected = if *kind == EngineKind::detect() {
            " (selected)"
        } else {
            ""
        };
        println!(
            "{kind}{selected}: 1 thread {:.2} MH/s ({:.2}x baseline), 2 threads {:.2} MH/s ({:.2}x one thread)",
            one[i] / 1e6,
            one[i] / base,
            two[i] / 1e6,
            two[i] / one[i]
        );
    }
}
