//! The x86-64 SHA extensions engine.
//!
//! `sha256rnds2` performs two rounds but its result is needed by the next one a few cycles
//! later, so a single hash leaves the SHA unit idle most of the time. The engine therefore
//! hashes `LANES` independent nonces side by side, each step written once per lane so the
//! CPU always has independent round instructions to issue. On top of that, per header
//! rather than per nonce:
//! - rounds 0 and 1 of the first hash (they precede the nonce, see [`Work`]);
//! - the first hash's rounds 4..16 and the second's rounds 8..16, whose words are padding,
//!   with both halves of each round-constant sum ready (no shuffle per nonce);
//! - the `sha256msg1` results the padding makes constant (three in the first hash, one in
//!   the second);
//!
//! and the second hash stops after round 61, when its last state word is known.
//!
//! The state lives in the two registers the instructions expect: `abef` holds the words
//! F, E, B, A from the lowest lane up, `cdgh` holds H, G, D, C.
#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m128i, _mm_add_epi32, _mm_alignr_epi8, _mm_cvtsi128_si32, _mm_insert_epi32, _mm_set_epi32,
    _mm_sha256msg1_epu32, _mm_sha256msg2_epu32, _mm_sha256rnds2_epu32, _mm_shuffle_epi32,
    _mm_unpackhi_epi64, _mm_unpacklo_epi64,
};

use crate::Work;
use crate::sha256::{DIGEST_BITS, HEADER_BITS, IV, K, PAD_BIT};

/// Independent nonces in flight. The round instruction's latency is about four times its
/// issue interval, but the schedule and the additions share the same execution ports, so
/// three lanes come out fastest on the CPU measured (two leave the SHA unit waiting on
/// latency; four spill registers to the stack). See the README's Performance section.
const LANES: usize = 3;

/// Whether this CPU has the instructions the engine is compiled for.
pub(crate) fn is_available() -> bool {
    std::arch::is_x86_feature_detected!("sha")
        && std::arch::is_x86_feature_detected!("sse2")
        && std::arch::is_x86_feature_detected!("ssse3")
        && std::arch::is_x86_feature_detected!("sse4.1")
}

/// Calls `candidate` for each nonce in `start..end` (`end` ≤ 2^32) whose last digest word,
/// byte-reversed, does not exceed the target's top limb. The caller has checked
/// [`is_available`].
pub(crate) fn scan(work: &Work, start: u64, end: u64, candidate: &mut dyn FnMut(u32, u32)) {
    debug_assert!(is_available());
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: `vex::scan` needs SHA, SSE2, SSSE3, SSE4.1 and AVX: the caller checked the
        // first four with `is_available`, and AVX was detected just above.
        unsafe { vex::scan(work, start, end, candidate) }
    } else {
        // SAFETY: `legacy::scan` needs SHA, SSE2, SSSE3 and SSE4.1, which the caller checked
        // with `is_available` (run-time CPUID detection).
        unsafe { legacy::scan(work, start, end, candidate) }
    }
}

/// Four words as a register, `w[0]` in the lowest lane.
#[inline]
#[target_feature(enable = "sse2")]
fn vector(w: [u32; 4]) -> __m128i {
    _mm_set_epi32(w[3] as i32, w[2] as i32, w[1] as i32, w[0] as i32)
}

/// `state` (A..H) in the `abef`, `cdgh` layout.
#[inline]
#[target_feature(enable = "sse2")]
fn state_registers(s: [u32; 8]) -> (__m128i, __m128i) {
    (
        vector([s[5], s[4], s[1], s[0]]),
        vector([s[7], s[6], s[3], s[2]]),
    )
}

/// K[i..i + 4] as a register.
#[inline]
#[target_feature(enable = "sse2")]
fn k(i: usize) -> __m128i {
    vector([K[i], K[i + 1], K[i + 2], K[i + 3]])
}

/// Four rounds with `wk` = W[i..i + 4] + K[i..i + 4].
#[inline]
#[target_feature(enable = "sha,sse2")]
fn rounds4(abef: &mut __m128i, cdgh: &mut __m128i, wk: __m128i) {
    rounds4_split(abef, cdgh, wk, _mm_shuffle_epi32::<0x0E>(wk));
}

/// Four rounds with the sums for the first two in `low` and for the last two in the low
/// half of `high`: a constant's halves come from memory rather than from a shuffle, which
/// competes with the SHA instructions for the same execution ports.
#[inline]
#[target_feature(enable = "sha,sse2")]
fn rounds4_split(abef: &mut __m128i, cdgh: &mut __m128i, low: __m128i, high: __m128i) {
    // After two rounds the old A, B, E, F are the new C, D, G, H.
    let half = _mm_sha256rnds2_epu32(*cdgh, *abef, low);
    *abef = _mm_sha256rnds2_epu32(*abef, half, high);
    *cdgh = half;
}

/// W[i + 16..i + 20] from W[i..i + 16] given as four registers.
#[inline]
#[target_feature(enable = "sha,sse2,ssse3")]
fn next_words(w0: __m128i, w1: __m128i, w2: __m128i, w3: __m128i) -> __m128i {
    next_words_from_msg1(_mm_sha256msg1_epu32(w0, w1), w2, w3)
}

/// The same, with `sha256msg1(w0, w1)` already known (it is constant where both are).
#[inline]
#[target_feature(enable = "sha,sse2,ssse3")]
fn next_words_from_msg1(msg1: __m128i, w2: __m128i, w3: __m128i) -> __m128i {
    _mm_sha256msg2_epu32(_mm_add_epi32(msg1, _mm_alignr_epi8::<4>(w3, w2)), w3)
}

/// W + K for four constant rounds, in both halves.
#[derive(Clone, Copy)]
struct ConstantRounds {
    low: __m128i,
    high: __m128i,
}

impl ConstantRounds {
    #[inline]
    #[target_feature(enable = "sse2")]
    fn new(words: __m128i, first_round: usize) -> ConstantRounds {
        let wk = _mm_add_epi32(words, k(first_round));
        ConstantRounds {
            low: wk,
            high: _mm_shuffle_epi32::<0x0E>(wk),
        }
    }
}

/// Nonce-independent registers for one header.
struct Constants {
    /// First hash: state after rounds 0 and 1.
    abef2: __m128i,
    cdgh2: __m128i,
    /// First hash: words 0..4 with a zero nonce, and words 4..8 and 12..16 (8..12 are 0).
    w0: __m128i,
    w1: __m128i,
    w3: __m128i,
    /// First hash: rounds 4..16, whose words are padding.
    rounds4: ConstantRounds,
    rounds8: ConstantRounds,
    rounds12: ConstantRounds,
    /// First hash: `sha256msg1` of word groups (1, 2), (2, 3) and (3, 4), constant because
    /// only word 16 of group 4 enters the last; and the `alignr` of groups 3 and 2.
    msg1_12: __m128i,
    msg1_23: __m128i,
    msg1_34: __m128i,
    align_32: __m128i,
    /// The midstate, to finish the first hash.
    mid_abef: __m128i,
    mid_cdgh: __m128i,
    /// Second hash: the initial state, the padding words 8..12 and 12..16 with their
    /// rounds, `sha256msg1` of those two groups and the `alignr` of them.
    iv_abef: __m128i,
    iv_cdgh: __m128i,
    pad2: __m128i,
    len2: __m128i,
    pad_rounds8: ConstantRounds,
    pad_rounds12: ConstantRounds,
    pad_msg1: __m128i,
    pad_align: __m128i,
}

impl Constants {
    #[inline]
    #[target_feature(enable = "sha,sse2,ssse3")]
    fn new(work: &Work) -> Constants {
        let (abef2, cdgh2) = state_registers(work.state_after_2);
        let (mid_abef, mid_cdgh) = state_registers(work.midstate);
        let (iv_abef, iv_cdgh) = state_registers(IV);
        let w1 = vector([PAD_BIT, 0, 0, 0]);
        let w2 = vector([0; 4]);
        let w3 = vector([0, 0, 0, HEADER_BITS]);
        let w4_first = vector([work.w16, 0, 0, 0]);
        let pad2 = vector([PAD_BIT, 0, 0, 0]);
        let len2 = vector([0, 0, 0, DIGEST_BITS]);
        Constants {
            abef2,
            cdgh2,
            w0: vector([work.tail[0], work.tail[1], work.tail[2], 0]),
            w1,
            w3,
            rounds4: ConstantRounds::new(w1, 4),
            rounds8: ConstantRounds::new(w2, 8),
            rounds12: ConstantRounds::new(w3, 12),
            msg1_12: _mm_sha256msg1_epu32(w1, w2),
            msg1_23: _mm_sha256msg1_epu32(w2, w3),
            msg1_34: _mm_sha256msg1_epu32(w3, w4_first),
            align_32: _mm_alignr_epi8::<4>(w3, w2),
            mid_abef,
            mid_cdgh,
            iv_abef,
            iv_cdgh,
            pad2,
            len2,
            pad_rounds8: ConstantRounds::new(pad2, 8),
            pad_rounds12: ConstantRounds::new(len2, 12),
            pad_msg1: _mm_sha256msg1_epu32(pad2, len2),
            pad_align: _mm_alignr_epi8::<4>(len2, pad2),
        }
    }
}

/// Rounds `4 * block..4 * block + 4` of every lane for each listed block, computing their
/// message words first; unrolled so that every round constant is a constant and every
/// message register a register.
macro_rules! scheduled_rounds {
    ($w:ident, $abef:ident, $cdgh:ident; $($block:literal)*) => { $(
        for l in 0..LANES {
            let [w0, w1, w2, w3] = $w[l];
            let next = next_words(w0, w1, w2, w3);
            $w[l] = [w1, w2, w3, next];
            rounds4(&mut $abef[l], &mut $cdgh[l], _mm_add_epi32(next, k(4 * $block)));
        }
    )* };
}

/// The scanning loop and the hashing of one batch of lanes, compiled for a set of CPU
/// features. Everything they call is inlined, so the whole loop is encoded for those
/// features.
macro_rules! scan_with_features {
    ($(#[$doc:meta])* $module:ident, $features:literal) => {
        $(#[$doc])*
        mod $module {
        use super::*;

        #[target_feature(enable = $features)]
        pub(super) fn scan(work: &Work, start: u64, end: u64, candidate: &mut dyn FnMut(u32, u32)) {
            let c = Constants::new(work);
            let top = work.target_top();
            let mut first = start;
            while first < end {
                // Past 2^32 the nonces wrap; those lanes are computed and ignored.
                let nonces: [u32; LANES] = std::array::from_fn(|l| (first + l as u64) as u32);
                let words = hash_lanes(&c, nonces);
                for l in 0..LANES {
                    if first + (l as u64) < end && words[l].swap_bytes() <= top {
                        candidate(nonces[l], words[l]);
                    }
                }
                first += LANES as u64;
            }
        }

        /// The last digest word of sha256d for each nonce.
        ///
        /// Each lane's message schedule is computed just before the rounds that read it, so that
        /// the CPU overlaps one lane's schedule with the other lanes' rounds. (Computing all
        /// schedules first needs fewer registers but serialises each lane's schedule: measured
        /// slower.)
        #[inline]
        #[target_feature(enable = $features)]
        fn hash_lanes(c: &Constants, nonces: [u32; LANES]) -> [u32; LANES] {
            let mut abef = [c.abef2; LANES];
            let mut cdgh = [c.cdgh2; LANES];
            // Each lane's last sixteen message words, in groups of four.
            let mut w = [[c.w0; 4]; LANES];
            for l in 0..LANES {
                let w0 = _mm_insert_epi32::<3>(c.w0, nonces[l].swap_bytes() as i32);
                // Rounds 2 and 3: the upper half of W[0..4] + K[0..4].
                let wk = _mm_shuffle_epi32::<0x0E>(_mm_add_epi32(w0, k(0)));
                let next = _mm_sha256rnds2_epu32(cdgh[l], abef[l], wk);
                cdgh[l] = abef[l];
                abef[l] = next;
                w[l][0] = w0;
            }
            for rounds in [c.rounds4, c.rounds8, c.rounds12] {
                for l in 0..LANES {
                    rounds4_split(&mut abef[l], &mut cdgh[l], rounds.low, rounds.high);
                }
            }
            // Words 16..32: the padding words make several `sha256msg1` results constant.
            for l in 0..LANES {
                let w4 = _mm_sha256msg2_epu32(
                    _mm_add_epi32(_mm_sha256msg1_epu32(w[l][0], c.w1), c.align_32),
                    c.w3,
                );
                rounds4(&mut abef[l], &mut cdgh[l], _mm_add_epi32(w4, k(16)));
                w[l][1] = w4;
            }
            for l in 0..LANES {
                let w5 = next_words_from_msg1(c.msg1_12, c.w3, w[l][1]);
                rounds4(&mut abef[l], &mut cdgh[l], _mm_add_epi32(w5, k(20)));
                w[l][2] = w5;
            }
            for l in 0..LANES {
                let w6 = next_words_from_msg1(c.msg1_23, w[l][1], w[l][2]);
                rounds4(&mut abef[l], &mut cdgh[l], _mm_add_epi32(w6, k(24)));
                w[l][3] = w6;
            }
            for l in 0..LANES {
                let w7 = next_words_from_msg1(c.msg1_34, w[l][2], w[l][3]);
                rounds4(&mut abef[l], &mut cdgh[l], _mm_add_epi32(w7, k(28)));
                w[l] = [w[l][1], w[l][2], w[l][3], w7];
            }
            scheduled_rounds!(w, abef, cdgh; 8 9 10 11 12 13 14 15);
            // The first digest, rearranged into the second hash's words 0..4 (A, B, C, D) and
            // 4..8 (E, F, G, H).
            for l in 0..LANES {
                let a = _mm_add_epi32(abef[l], c.mid_abef);
                let b = _mm_add_epi32(cdgh[l], c.mid_cdgh);
                let w0 = _mm_shuffle_epi32::<0xB1>(_mm_unpackhi_epi64(a, b));
                let w1 = _mm_shuffle_epi32::<0xB1>(_mm_unpacklo_epi64(a, b));
                abef[l] = c.iv_abef;
                cdgh[l] = c.iv_cdgh;
                rounds4(&mut abef[l], &mut cdgh[l], _mm_add_epi32(w0, k(0)));
                w[l][0] = w0;
                w[l][1] = w1;
            }
            for l in 0..LANES {
                rounds4(&mut abef[l], &mut cdgh[l], _mm_add_epi32(w[l][1], k(4)));
            }
            for rounds in [c.pad_rounds8, c.pad_rounds12] {
                for l in 0..LANES {
                    rounds4_split(&mut abef[l], &mut cdgh[l], rounds.low, rounds.high);
                }
            }
            for l in 0..LANES {
                let w4 = _mm_sha256msg2_epu32(
                    _mm_add_epi32(_mm_sha256msg1_epu32(w[l][0], w[l][1]), c.pad_align),
                    c.len2,
                );
                rounds4(&mut abef[l], &mut cdgh[l], _mm_add_epi32(w4, k(16)));
                w[l][2] = w4;
            }
            for l in 0..LANES {
                let w5 = next_words(w[l][1], c.pad2, c.len2, w[l][2]);
                rounds4(&mut abef[l], &mut cdgh[l], _mm_add_epi32(w5, k(20)));
                w[l][3] = w5;
            }
            for l in 0..LANES {
                let w6 = next_words_from_msg1(c.pad_msg1, w[l][2], w[l][3]);
                rounds4(&mut abef[l], &mut cdgh[l], _mm_add_epi32(w6, k(24)));
                w[l] = [c.len2, w[l][2], w[l][3], w6];
            }
            scheduled_rounds!(w, abef, cdgh; 7 8 9 10 11 12 13 14);
            // Rounds 60 and 61: afterwards F (the lowest lane of the new ABEF) holds the value that
            // rounds 62 and 63 would only move down to H.
            let mut out = [0u32; LANES];
            for l in 0..LANES {
                let [w0, w1, w2, w3] = w[l];
                let next = next_words(w0, w1, w2, w3);
                let last = _mm_sha256rnds2_epu32(cdgh[l], abef[l], _mm_add_epi32(next, k(60)));
                out[l] = (_mm_cvtsi128_si32(last) as u32).wrapping_add(IV[7]);
            }
            out
        }
        }
    };
}

scan_with_features!(
    /// The engine with AVX's three-operand encoding for everything but the SHA instructions
    /// themselves (which have no such form): it saves the register copies the two-operand
    /// SSE forms need; measured 10 to 40 % faster.
    vex,
    "sha,sse2,ssse3,sse4.1,avx"
);

scan_with_features!(
    /// The same for CPUs with SHA extensions but no AVX (Goldmont and Tremont Atoms and
    /// Celerons, common in gateways).
    legacy,
    "sha,sse2,ssse3,sse4.1"
);
