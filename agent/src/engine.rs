//! SHA-256d nonce scanning engines and their runtime selection.
//!
//! An engine scans a nonce range of one header prefix and reports every nonce whose
//! sha256d meets a target. All engines must return exactly the same nonces; they differ
//! only in speed. Selection happens at run time from CPU features, so one binary serves
//! every device of an architecture; `--engine` overrides it.

use std::fmt;
use std::str::FromStr;

use micromine_proto::work::{HEADER_PREFIX_LEN, Midstate, SHA256_IV, Target, U256};
use sha2::block_api::compress256;

/// One header prefix and target, prepared for fast scanning.
#[derive(Clone, Debug)]
pub struct PreparedWork {
    midstate: Midstate,
    target: Target,
    /// The top 32 bits of the target: almost every hash is rejected on these alone.
    target_top: u32,
}

impl PreparedWork {
    /// Precomputes the midstate of `prefix`.
    pub fn new(prefix: &[u8; HEADER_PREFIX_LEN], target: Target) -> PreparedWork {
        PreparedWork {
            midstate: Midstate::new(prefix),
            target,
            target_top: target.as_u256().top_u32(),
        }
    }

    /// The share target.
    pub fn target(&self) -> Target {
        self.target
    }

    /// The header's midstate.
    pub fn midstate(&self) -> &Midstate {
        &self.midstate
    }
}

/// The engines this build knows. Which of them can run is decided at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// Midstate loop on `sha2`'s compression function, which itself picks SHA-NI (x86-64)
    /// or the ARMv8 SHA-2 instructions when the CPU has them, and portable code otherwise.
    Sha2Midstate,
}

impl EngineKind {
    /// Every engine of this build.
    pub const ALL: [EngineKind; 1] = [EngineKind::Sha2Midstate];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Sha2Midstate => "sha2-midstate",
        }
    }

    /// Whether this CPU can run the engine.
    pub fn is_available(self) -> bool {
        match self {
            EngineKind::Sha2Midstate => true,
        }
    }

    /// The fastest engine this CPU can run.
    pub fn detect() -> EngineKind {
        EngineKind::ALL
            .into_iter()
            .find(|kind| kind.is_available())
            .unwrap_or(EngineKind::Sha2Midstate)
    }

    /// The hardware path underneath, for reports (e.g. "sha-ni").
    pub fn backend(self) -> &'static str {
        match self {
            EngineKind::Sha2Midstate => sha2_backend(),
        }
    }

    /// Scans nonces `start..end` (`end` at most 2^32) and calls `found` for each nonce whose
    /// hash meets the work's target, in increasing order.
    pub fn scan(self, work: &PreparedWork, start: u64, end: u64, found: &mut dyn FnMut(u32)) {
        match self {
            EngineKind::Sha2Midstate => scan_sha2_midstate(work, start, end, found),
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An `--engine` value that names no engine of this build.
#[derive(Debug, thiserror::Error)]
#[error("unknown engine `{0}`; this build has: {names}", names = engine_names())]
pub struct UnknownEngine(String);

fn engine_names() -> String {
    EngineKind::ALL
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for EngineKind {
    type Err = UnknownEngine;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EngineKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownEngine(s.to_string()))
    }
}

/// An engine choice from the command line: `auto` or a named engine that must be available.
pub fn select(requested: Option<&str>) -> Result<EngineKind, EngineSelectError> {
    match requested {
        None | Some("auto") => Ok(EngineKind::detect()),
        Some(name) => {
            let kind: EngineKind = name.parse()?;
            if kind.is_available() {
                Ok(kind)
            } else {
                Err(EngineSelectError::Unavailable(kind))
            }
        }
    }
}

/// Why an `--engine` choice cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum EngineSelectError {
    /// The name is not an engine of this build.
    #[error(transparent)]
    Unknown(#[from] UnknownEngine),
    /// The engine exists but this CPU lacks the instructions it needs.
    #[error("engine `{0}` needs CPU features this machine does not have")]
    Unavailable(EngineKind),
}

fn sha2_backend() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("sha")
            && std::arch::is_x86_feature_detected!("sse4.1")
        {
            return "sha-ni";
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("sha2") {
            return "armv8-sha2";
        }
    }
    "portable"
}

fn scan_sha2_midstate(work: &PreparedWork, start: u64, end: u64, found: &mut dyn FnMut(u32)) {
    let end = end.min(1 << 32);
    let midstate = work.midstate.state();
    let mut first_block = work.midstate.second_block();
    // The second hash's block: 32 digest bytes, then constant padding for a 256-bit message.
    let mut second_block = [0u8; 64];
    second_block[32] = 0x80;
    second_block[56..64].copy_from_slice(&256u64.to_be_bytes());

    for nonce in start..end {
        let nonce = nonce as u32;
        first_block[12..16].copy_from_slice(&nonce.to_le_bytes());
        let mut state = midstate;
        compress256(&mut state, &[first_block]);
        for (i, word) in state.iter().enumerate() {
            second_block[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
        }
        let mut digest = SHA256_IV;
        compress256(&mut digest, &[second_block]);
        // The hash's most significant 32 bits (as a little-endian integer) are the last
        // digest word's bytes reversed.
        let top = digest[7].swap_bytes();
        if top > work.target_top {
            continue;
        }
        if top < work.target_top || meets_target(&digest, work.target) {
            found(nonce);
        }
    }
}

fn meets_target(digest: &[u32; 8], target: Target) -> bool {
    let mut bytes = [0u8; 32];
    for (i, word) in digest.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
    }
    U256::from_le_bytes(bytes) <= target.as_u256()
}

#[cfg(test)]
mod tests {
    use super::*;
    use micromine_proto::work::{header_with_nonce, sha256d};
    use proptest::prelude::*;

    /// The definition: every nonce whose plain sha256d meets the target.
    fn reference_scan(prefix: &[u8; 76], target: Target, start: u64, end: u64) -> Vec<u32> {
        (start..end)
            .map(|n| n as u32)
            .filter(|&n| target.is_met_by(&sha256d(&header_with_nonce(prefix, n))))
            .collect()
    }

    fn scan_all(
        kind: EngineKind,
        prefix: &[u8; 76],
        target: Target,
        start: u64,
        end: u64,
    ) -> Vec<u32> {
        let work = PreparedWork::new(prefix, target);
        let mut out = Vec::new();
        kind.scan(&work, start, end, &mut |n| out.push(n));
        out
    }

    #[test]
    fn engine_names_parse() {
        for kind in EngineKind::ALL {
            assert_eq!(kind.name().parse::<EngineKind>().ok(), Some(kind));
        }
        let err = "avx9".parse::<EngineKind>().expect_err("unknown");
        assert!(err.to_string().contains("sha2-midstate"), "{err}");
        assert!(select(Some("auto")).is_ok());
    }

    #[test]
    fn finds_the_genesis_nonce() {
        let header = hex::decode("0100000000000000000000000000000000000000000000000000000000000000000000003ba3edfd7a7b12b27ac72c3e67768f617fc81bc3888a51323a9fb8aa4b1e5e4a29ab5f49ffff001d1dac2b7c").expect("hex");
        let prefix: [u8; 76] = header[..76].try_into().expect("76");
        let target = Target::from_compact(0x1d00ffff).expect("bits");
        let genesis_nonce: u32 = 2083236893;
        for kind in EngineKind::ALL {
            let found = scan_all(
                kind,
                &prefix,
                target,
                u64::from(genesis_nonce) - 1000,
                u64::from(genesis_nonce) + 1000,
            );
            assert_eq!(found, vec![genesis_nonce], "{kind}");
        }
    }

    #[test]
    fn scans_up_to_the_last_nonce() {
        let prefix = [7u8; 76];
        let target = Target::from_difficulty(1.0 / 64.0).expect("valid");
        let start = (1u64 << 32) - 20_000;
        for kind in EngineKind::ALL {
            assert_eq!(
                scan_all(kind, &prefix, target, start, 1 << 32),
                reference_scan(&prefix, target, start, 1 << 32),
                "{kind}"
            );
            // An end past the nonce space is clamped rather than wrapping to nonce 0.
            assert_eq!(
                scan_all(kind, &prefix, target, start, (1 << 32) + 10),
                scan_all(kind, &prefix, target, start, 1 << 32)
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn engines_agree_with_the_definition(prefix in proptest::collection::vec(any::<u8>(), 76), start in any::<u32>(), difficulty_exp in -12i32..-4) {
            let prefix: [u8; 76] = prefix.try_into().expect("76");
            // Easy targets so that a few thousand nonces contain shares, including ones that
            // tie with the target's top 32 bits.
            let target = Target::from_difficulty(2f64.powi(difficulty_exp)).expect("valid");
            let start = u64::from(start);
            let end = (start + 3000).min(1 << 32);
            let expected = reference_scan(&prefix, target, start, end);
            for kind in EngineKind::ALL {
                prop_assert_eq!(&scan_all(kind, &prefix, target, start, end), &expected);
            }
        }
    }
}
