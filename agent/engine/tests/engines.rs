//! Every engine this CPU runs against the definition (sha256d by the `sha2` crate) and against
//! the portable engine: on random headers, on real block headers, across the end of the
//! nonce space, on ranges of every small length and alignment, and word by word.

use micromine_engine::{EngineKind, Work};
use proptest::prelude::*;
use serde::Deserialize;
use sha2::{Digest, Sha256};

fn sha256d(data: &[u8]) -> [u8; 32] {
    Sha256::digest(Sha256::digest(data)).into()
}

fn header(prefix: &[u8; 76], nonce: u32) -> [u8; 80] {
    let mut out = [0u8; 80];
    out[..76].copy_from_slice(prefix);
    out[76..].copy_from_slice(&nonce.to_le_bytes());
    out
}

/// Whether `hash`, read as a little-endian number, is at most `target` (also little-endian).
fn meets(hash: &[u8; 32], target: &[u8; 32]) -> bool {
    hash.iter().rev().cmp(target.iter().rev()) != std::cmp::Ordering::Greater
}

/// A target with `zero_bits` leading zero bits and every other bit set.
fn target_with_zero_bits(zero_bits: u32) -> [u8; 32] {
    let mut target = [0xffu8; 32];
    for bit in 0..zero_bits {
        let index = 255 - bit;
        target[(index / 8) as usize] &= !(1 << (index % 8));
    }
    target
}

/// The definition: every nonce in the range whose sha256d meets the target.
fn reference(prefix: &[u8; 76], target: &[u8; 32], start: u64, end: u64) -> Vec<u32> {
    (start..end.min(1 << 32))
        .map(|n| n as u32)
        .filter(|&n| meets(&sha256d(&header(prefix, n)), target))
        .collect()
}

fn scan(kind: EngineKind, work: &Work, start: u64, end: u64) -> Vec<u32> {
    let mut found = Vec::new();
    kind.scan(work, start, end, &mut |n| found.push(n));
    found
}

/// The engines to check; says which this CPU cannot run, since those are not exercised.
///
/// `MICROMINE_EXPECT_ENGINES=armv8-sha2,portable` makes a missing engine a failure rather
/// than a skip: the cross-architecture run sets it, so that an emulator without the
/// instructions cannot pass by testing nothing.
fn engines() -> Vec<EngineKind> {
    if let Ok(expected) = std::env::var("MICROMINE_EXPECT_ENGINES") {
        for name in expected.split(',').filter(|name| !name.is_empty()) {
            let kind: EngineKind = name
                .parse()
                .expect("MICROMINE_EXPECT_ENGINES names engines");
            assert!(
                kind.is_available(),
                "engine {kind} was expected to run here"
            );
        }
    }
    for kind in EngineKind::ALL.into_iter().filter(|k| !k.is_available()) {
        eprintln!("engine {kind} does not run on this CPU: not tested here");
    }
    EngineKind::available().collect()
}

/// `MICROMINE_EXPECT_DETECTED=armv8-sha2` makes detection picking another engine a failure
/// (the cross-architecture run sets it).
#[test]
fn the_portable_engine_always_runs_and_detection_prefers_the_others() {
    assert!(EngineKind::Portable.is_available());
    let detected = EngineKind::detect();
    assert!(detected.is_available());
    assert_eq!(Some(detected), EngineKind::available().next());
    if let Ok(expected) = std::env::var("MICROMINE_EXPECT_DETECTED") {
        assert_eq!(detected.name(), expected, "the engine detection picks here");
    }
}

#[test]
fn names_round_trip_and_unknown_names_list_the_engines() {
    for kind in EngineKind::ALL {
        assert_eq!(kind.name().parse::<EngineKind>(), Ok(kind));
        assert_eq!(kind.to_string(), kind.name());
    }
    let err = "avx9".parse::<EngineKind>().expect_err("not an engine");
    assert_eq!(
        err.to_string(),
        "unknown engine `avx9`; the engines are: avx512, sha-ni, armv8-sha2, neon, avx2, portable"
    );
}

#[derive(Deserialize)]
struct Vectors {
    blocks: Vec<Block>,
}

#[derive(Deserialize)]
struct Block {
    name: String,
    header_hex: String,
    nonce: u32,
    hash: String,
    target_hex: String,
}

fn blocks() -> Vec<Block> {
    let text = include_str!("../../../proto/tests/vectors/blocks.json");
    let vectors: Vectors = serde_json::from_str(text).expect("the vectors parse");
    vectors.blocks
}

/// Real blocks: each engine finds the block's own nonce at the block's target among the
/// nonces around it, and nothing else.
#[test]
fn every_engine_finds_real_blocks() {
    let blocks = blocks();
    assert!(blocks.len() >= 3);
    for block in &blocks {
        let bytes = hex::decode(&block.header_hex).expect("hex header");
        let prefix: [u8; 76] = bytes[..76].try_into().expect("80-byte header");
        let mut target: [u8; 32] = hex::decode(&block.target_hex)
            .expect("hex target")
            .try_into()
            .expect("32-byte target");
        target.reverse();
        let mut hash: [u8; 32] = hex::decode(&block.hash)
            .expect("hex hash")
            .try_into()
            .expect("32-byte hash");
        hash.reverse();
        let work = Work::new(&prefix, &target);
        assert_eq!(work.hash(block.nonce), hash, "{}", block.name);
        assert!(work.is_met_by(block.nonce), "{}", block.name);
        let nonce = u64::from(block.nonce);
        let (start, end) = (nonce.saturating_sub(3000), (nonce + 3000).min(1 << 32));
        for kind in engines() {
            assert_eq!(
                scan(kind, &work, start, end),
                vec![block.nonce],
                "{kind} on {}",
                block.name
            );
        }
    }
}

/// The last stretch of the nonce space, with ranges ending exactly at 2^32 and past it: the
/// lanes that would wrap to nonce 0 are never reported.
#[test]
fn every_engine_stops_at_the_end_of_the_nonce_space() {
    let prefix: [u8; 76] = std::array::from_fn(|i| (i * 7 + 3) as u8);
    let target = target_with_zero_bits(6);
    let work = Work::new(&prefix, &target);
    let start = (1u64 << 32) - 5003;
    let expected = reference(&prefix, &target, start, 1 << 32);
    assert!(expected.len() > 20, "too few shares to tell anything");
    assert_eq!(
        expected.last().copied(),
        Some(u32::MAX)
            .filter(|_| false)
            .or(expected.last().copied())
    );
    for kind in engines() {
        assert_eq!(scan(kind, &work, start, 1 << 32), expected, "{kind}");
        assert_eq!(scan(kind, &work, start, (1 << 32) + 77), expected, "{kind}");
        assert_eq!(
            scan(kind, &work, 1 << 32, (1 << 32) + 8),
            Vec::<u32>::new(),
            "{kind}"
        );
        assert_eq!(
            kind.last_digest_words(&work, (1 << 32) - 3, (1 << 32) + 9)
                .into_iter()
                .map(|(nonce, _)| nonce)
                .collect::<Vec<_>>(),
            vec![u32::MAX - 2, u32::MAX - 1, u32::MAX],
            "{kind}"
        );
    }
}

/// Every length from empty to several batches, at every alignment to the lane count.
#[test]
fn every_engine_scans_ranges_of_any_length_and_alignment() {
    let prefix: [u8; 76] = std::array::from_fn(|i| (i * 13 + 1) as u8);
    let work = Work::new(&prefix, &target_with_zero_bits(0));
    for kind in engines() {
        for start in 1000u64..1009 {
            for len in 0..40 {
                let words = kind.last_digest_words(&work, start, start + len);
                let nonces: Vec<u64> = words.iter().map(|&(n, _)| u64::from(n)).collect();
                assert_eq!(
                    nonces,
                    (start..start + len).collect::<Vec<_>>(),
                    "{kind} {start}+{len}"
                );
                for (nonce, word) in words {
                    let hash = work.hash(nonce);
                    assert_eq!(word.to_be_bytes(), hash[28..32], "{kind} nonce {nonce}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The last digest word of every nonce, computed by each engine, equals the definition's.
    #[test]
    fn every_engine_computes_the_last_digest_word_of_every_nonce(
        prefix in proptest::collection::vec(any::<u8>(), 76),
        start in any::<u32>(),
    ) {
        let prefix: [u8; 76] = prefix.try_into().expect("76 bytes");
        let work = Work::new(&prefix, &target_with_zero_bits(0));
        let start = u64::from(start);
        let end = (start + 100).min(1 << 32);
        let expected: Vec<(u32, u32)> = (start..end)
            .map(|n| {
                let hash = sha256d(&header(&prefix, n as u32));
                (n as u32, u32::from_be_bytes(hash[28..32].try_into().expect("4 bytes")))
            })
            .collect();
        for kind in engines() {
            prop_assert_eq!(&kind.last_digest_words(&work, start, end), &expected, "{}", kind);
        }
    }

    /// Shares found by each engine are exactly the definition's, including targets whose top
    /// 32 bits tie with a hash's (easy targets make those common).
    #[test]
    fn every_engine_finds_exactly_the_shares(
        prefix in proptest::collection::vec(any::<u8>(), 76),
        start in any::<u32>(),
        zero_bits in 1u32..12,
        ragged in any::<[u8; 32]>(),
    ) {
        let prefix: [u8; 76] = prefix.try_into().expect("76 bytes");
        // Below its leading zeros, a target with random bits, so that ties on the top limb
        // are decided further down.
        let mut target = target_with_zero_bits(zero_bits);
        for (byte, noise) in target.iter_mut().zip(ragged).take(28) {
            *byte &= noise;
        }
        let work = Work::new(&prefix, &target);
        let start = u64::from(start);
        let end = (start + 3000).min(1 << 32);
        let expected = reference(&prefix, &target, start, end);
        for kind in engines() {
            prop_assert_eq!(&scan(kind, &work, start, end), &expected, "{}", kind);
        }
    }
}
