//! SHA-256d nonce scanning for the micromine agent.
//!
//! An engine scans a range of nonces of one 80-byte block header and reports every nonce
//! whose double SHA-256 meets a target. Every engine returns exactly the same nonces; they
//! differ only in speed:
//!
//! - `sha-ni`: x86-64 SHA extensions, several independent nonces interleaved to hide the
//!   latency of the round instruction;
//! - `armv8-sha2`: the ARMv8 SHA-2 instructions, interleaved the same way;
//! - `neon`: ARM without the SHA-2 instructions, four nonces per 128-bit register: on
//!   aarch64 always, on 32-bit ARMv7 where the CPU has NEON (found at run time);
//! - `avx512`: x86-64 AVX-512F, sixteen nonces per 512-bit register, with its rotates
//!   and three-input logic;
//! - `avx2`: x86-64 without SHA extensions, eight nonces per 256-bit register;
//! - `portable`: plain Rust, on any CPU.
//!
//! All of them skip what does not depend on the nonce (the first 64 header bytes, the
//! padding words of both hashes and, except in `armv8-sha2`, whose instructions work four
//! rounds at a time, the first hash's rounds before the nonce), and all but `armv8-sha2`
//! stop the second hash as soon as its last state word, the hash's most significant 32
//! bits, is known:
//! that word rejects all but one in 2^32 hashes at difficulty 1. Survivors are checked in
//! full by the portable code before they are reported.
//!
//! [`EngineKind::detect`] picks the fastest engine the CPU runs, so one binary serves every
//! device of an architecture. Unsafe code lives only in the SIMD modules, which need it to
//! call functions compiled (on 32-bit ARM, assembled) for CPU features that run-time
//! detection has confirmed.

use std::fmt;
use std::str::FromStr;

// Before the engines that use its macros.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[macro_use]
mod lanes;
#[cfg(target_arch = "aarch64")]
mod armv8;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "arm")]
mod neon_armv7;
mod portable;
mod sha256;
#[cfg(target_arch = "x86_64")]
mod sha_ni;

/// Bytes of a block header before the nonce.
pub const HEADER_PREFIX_LEN: usize = 76;

/// One header prefix and share target, prepared for scanning.
///
/// Everything that does not depend on the nonce is computed here once per assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Work {
    /// State after the first 64 header bytes.
    midstate: [u32; 8],
    /// Header bytes 64..76 (end of the merkle root, time, bits) as big-endian words: the
    /// first three words of the first hash's second block.
    tail: [u32; 3],
    /// The target as little-endian 32-bit limbs; `target[7]` is the most significant.
    target: [u32; 8],
    /// The first hash's second block state after rounds 0 and 1, which precede the nonce.
    state_after_2: [u32; 8],
    /// The same after round 2 as well (round 3 is the first to read the nonce).
    state_after_3: [u32; 8],
    /// Message words 16 and 17 of the first hash's second block: neither reads the nonce.
    w16: u32,
    w17: u32,
}

impl Work {
    /// Prepares `prefix` (the header's first 76 bytes) for scanning against `target`, a
    /// 256-bit number in little-endian bytes (the order hashes are compared in).
    pub fn new(prefix: &[u8; HEADER_PREFIX_LEN], target: &[u8; 32]) -> Work {
        let mut first = [0u8; 64];
        first.copy_from_slice(&prefix[..64]);
        let mut midstate = sha256::IV;
        sha256::compress(&mut midstate, &sha256::block_words(&first));
        let tail = std::array::from_fn(|i| {
            let at = 64 + 4 * i;
            u32::from_be_bytes([prefix[at], prefix[at + 1], prefix[at + 2], prefix[at + 3]])
        });
        let target = std::array::from_fn(|i| {
            u32::from_le_bytes([
                target[4 * i],
                target[4 * i + 1],
                target[4 * i + 2],
                target[4 * i + 3],
            ])
        });
        // Any nonce gives the same words 0..3 and 16..17; 0 stands for all of them.
        let block = sha256::header_block(tail, 0);
        let w = sha256::schedule(&block);
        let mut state_after_2 = midstate;
        for (word, k) in w.iter().zip(sha256::K).take(2) {
            sha256::round(&mut state_after_2, word.wrapping_add(k));
        }
        let mut state_after_3 = state_after_2;
        sha256::round(&mut state_after_3, w[2].wrapping_add(sha256::K[2]));
        Work {
            midstate,
            tail,
            target,
            state_after_2,
            state_after_3,
            w16: w[16],
            w17: w[17],
        }
    }

    /// The header's sha256d with `nonce`, computed the plain way, in the usual byte order.
    pub fn hash(&self, nonce: u32) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (chunk, word) in out.chunks_exact_mut(4).zip(self.digest(nonce)) {
            chunk.copy_from_slice(&word.to_be_bytes());
        }
        out
    }

    /// Whether the header's sha256d with `nonce` meets the target.
    pub fn is_met_by(&self, nonce: u32) -> bool {
        let digest = self.digest(nonce);
        // Read as a little-endian number, the hash's most significant limb is the last
        // digest word with its bytes reversed.
        for i in (0..8).rev() {
            let limb = digest[i].swap_bytes();
            if limb != self.target[i] {
                return limb < self.target[i];
            }
        }
        true
    }

    /// The 32 most significant bits of the target: a hash whose top 32 bits exceed them
    /// misses, one whose top bits are below meets it, a tie needs the full comparison.
    pub(crate) fn target_top(&self) -> u32 {
        self.target[7]
    }

    fn digest(&self, nonce: u32) -> [u32; 8] {
        let mut first = self.midstate;
        sha256::compress(&mut first, &sha256::header_block(self.tail, nonce));
        let mut second = sha256::IV;
        sha256::compress(&mut second, &sha256::digest_block(&first));
        second
    }
}

/// The engines this crate knows. Which of them can run is decided at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// x86-64 AVX-512F, sixteen nonces per register.
    Avx512,
    /// x86-64 SHA extensions, nonces interleaved.
    ShaNi,
    /// ARMv8 SHA-2 instructions, nonces interleaved.
    ArmSha2,
    /// NEON, four nonces per register: aarch64, and 32-bit ARMv7 CPUs that have it.
    Neon,
    /// x86-64 AVX2, eight nonces per register.
    Avx2,
    /// Plain Rust, any CPU.
    Portable,
}

impl EngineKind {
    /// Every engine, fastest first: the order [`EngineKind::detect`] tries them in.
    /// `avx512` comes before `sha-ni`: it was the faster of the two on the one AVX-512 CPU
    /// measured (an AMD Zen 4, 1.10x), and Intel's cores with AVX-512 have slower
    /// `sha256rnds2` than AMD's.
    pub const ALL: [EngineKind; 6] = [
        EngineKind::Avx512,
        EngineKind::ShaNi,
        EngineKind::ArmSha2,
        EngineKind::Neon,
        EngineKind::Avx2,
        EngineKind::Portable,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::ShaNi => "sha-ni",
            EngineKind::ArmSha2 => "armv8-sha2",
            EngineKind::Neon => "neon",
            EngineKind::Avx512 => "avx512",
            EngineKind::Avx2 => "avx2",
            EngineKind::Portable => "portable",
        }
    }

    /// Whether this CPU can run the engine.
    pub fn is_available(self) -> bool {
        match self {
            EngineKind::Portable => true,
            #[cfg(target_arch = "x86_64")]
            EngineKind::ShaNi => sha_ni::is_available(),
            #[cfg(target_arch = "x86_64")]
            EngineKind::Avx512 => avx512::is_available(),
            #[cfg(target_arch = "x86_64")]
            EngineKind::Avx2 => avx2::is_available(),
            #[cfg(target_arch = "aarch64")]
            EngineKind::ArmSha2 => armv8::is_available(),
            #[cfg(target_arch = "aarch64")]
            EngineKind::Neon => neon::is_available(),
            #[cfg(target_arch = "arm")]
            EngineKind::Neon => neon_armv7::is_available(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The engines this CPU can run, fastest first.
    pub fn available() -> impl Iterator<Item = EngineKind> {
        EngineKind::ALL
            .into_iter()
            .filter(|kind| kind.is_available())
    }

    /// The fastest engine this CPU can run.
    pub fn detect() -> EngineKind {
        EngineKind::available()
            .next()
            .unwrap_or(EngineKind::Portable)
    }

    /// Scans nonces `start..end` (an `end` past 2^32 counts as 2^32: the nonce space does
    /// not wrap) and calls `found` with each nonce whose sha256d meets the work's target,
    /// in increasing order.
    ///
    /// An engine this CPU cannot run scans with the portable code instead, with the same
    /// result; [`EngineKind::is_available`] says which will happen.
    pub fn scan(self, work: &Work, start: u64, end: u64, found: &mut dyn FnMut(u32)) {
        // The engines report nonces whose top 32 bits pass; the full comparison is rare
        // enough to do the plain way.
        self.candidates(work, start, end, &mut |nonce, _| {
            if work.is_met_by(nonce) {
                found(nonce);
            }
        });
    }

    /// Each nonce in `start..end` with the last word of its digest, as the engine computes
    /// it, whatever the target: for tests that compare the engines' arithmetic on every
    /// nonce rather than only on the rare shares.
    #[doc(hidden)]
    pub fn last_digest_words(self, work: &Work, start: u64, end: u64) -> Vec<(u32, u32)> {
        let mut open = work.clone();
        open.target = [u32::MAX; 8];
        let mut seen = Vec::new();
        self.candidates(&open, start, end, &mut |nonce, word| {
            seen.push((nonce, word))
        });
        seen
    }

    /// Calls `candidate` with every nonce (and its last digest word) whose top 32 bits do
    /// not exceed the target's, in increasing order.
    fn candidates(self, work: &Work, start: u64, end: u64, candidate: &mut dyn FnMut(u32, u32)) {
        let end = end.min(1 << 32);
        if start >= end {
            return;
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            EngineKind::ShaNi if sha_ni::is_available() => {
                sha_ni::scan(work, start, end, candidate)
            }
            #[cfg(target_arch = "x86_64")]
            EngineKind::Avx512 if avx512::is_available() => {
                avx512::scan(work, start, end, candidate)
            }
            #[cfg(target_arch = "x86_64")]
            EngineKind::Avx2 if avx2::is_available() => avx2::scan(work, start, end, candidate),
            #[cfg(target_arch = "aarch64")]
            EngineKind::ArmSha2 if armv8::is_available() => {
                armv8::scan(work, start, end, candidate)
            }
            #[cfg(target_arch = "aarch64")]
            EngineKind::Neon => neon::scan(work, start, end, candidate),
            #[cfg(target_arch = "arm")]
            EngineKind::Neon if neon_armv7::is_available() => {
                neon_armv7::scan(work, start, end, candidate)
            }
            _ => portable::scan(work, start, end, candidate),
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not an engine of this crate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownEngine(pub String);

impl fmt::Display for UnknownEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = EngineKind::ALL.iter().map(|k| k.name()).collect();
        write!(
            f,
            "unknown engine `{}`; the engines are: {}",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownEngine {}

impl FromStr for EngineKind {
    type Err = UnknownEngine;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EngineKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownEngine(s.to_string()))
    }
}
