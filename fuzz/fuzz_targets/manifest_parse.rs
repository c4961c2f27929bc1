//! Whatever text is dropped in the manifests directory: parsing never panics, and what it
//! accepts is a valid MicroMiner.
#![no_main]

use libfuzzer_sys::fuzz_target;
use micromine_resources::microminer;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(miners) = microminer::parse_str("fuzz.yaml", &text) {
        for miner in miners {
            assert!(miner.validate().is_ok(), "accepted an invalid MicroMiner");
        }
    }
});
