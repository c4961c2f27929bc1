//! Scans a number of nonces with one engine and says how many met the target, so that an
//! emulator can count the instructions an engine executes per nonce
//! (`scripts/count-instructions`).
//!
//! `cargo run --release -p micromine-engine --example scan -- ENGINE NONCES`

use micromine_engine::{EngineKind, Work};

fn main() -> Result<(), String> {
    let usage = "usage: scan ENGINE NONCES";
    let mut args = std::env::args().skip(1);
    let engine: EngineKind = args
        .next()
        .ok_or(usage)?
        .parse()
        .map_err(|e| format!("ENGINE: {e}"))?;
    let nonces: u64 = args
        .next()
        .ok_or(usage)?
        .parse()
        .map_err(|e| format!("NONCES: {e}"))?;
    if !engine.is_available() {
        return Err(format!("engine {engine} does not run on this CPU"));
    }
    let prefix: [u8; 76] = std::array::from_fn(|i| (i * 7) as u8);
    // Only a hash of zero meets it: every nonce is hashed, none is reported.
    let work = Work::new(&prefix, &[0; 32]);
    let mut found = 0u64;
    engine.scan(&work, 0, nonces, &mut |_| found += 1);
    println!("{engine}: {nonces} nonces scanned, {found} met the target");
    Ok(())
}
