//! Engine throughput against the baseline the project measures itself by: a plain midstate
//! loop on `sha2::compress256` (two compressions per nonce, nothing else), single thread,
//! in the same run. Prints figures; asserts nothing about speed.
//!
//! `cargo bench -p micromine-agent --bench engine`

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
    let seconds = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let base = baseline(seconds);
    println!(
        "baseline sha2::compress256 midstate loop, 1 thread: {:.2} MH/s",
        base / 1e6
    );
    for kind in EngineKind::ALL.into_iter().filter(|k| k.is_available()) {
        let one = bench::run(kind, 1, Duration::from_secs_f64(seconds));
        let two = bench::run(kind, 2, Duration::from_secs_f64(seconds));
        println!(
            "{} ({}): 1 thread {:.2} MH/s ({:.2}x baseline), 2 threads {:.2} MH/s ({:.2}x one thread)",
            one.engine,
            one.backend,
            one.hashes_per_second / 1e6,
            one.hashes_per_second / base,
            two.hashes_per_second / 1e6,
            two.hashes_per_second / one.hashes_per_second
        );
    }
}
