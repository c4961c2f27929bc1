//! The ARMv8 SHA-2 engine (the Cryptography Extension of Cortex-A55/A76 and later, Apple
//! and Graviton cores; a Raspberry Pi 4's Cortex-A72 lacks it and runs the `neon` engine).
//!
//! `sha256h`/`sha256h2` perform four rounds but depend on the previous four, so the engine
//! hashes `LANES` nonces side by side, as the x86-64 SHA engine does; with 32 vector
//! registers, four lanes fit without spilling. The first hash's message words 4..16 and the
//! second hash's words 8..16 are constants with their round constants already added.
//!
//! Not measured: no ARMv8 machine was at hand. It is tested (the shared test vectors, random
//! headers against the portable engine, the end of the nonce space) by cross-compiling the
//! engine's tests for aarch64 and running them under qemu: `scripts/cross-engine`.
#![allow(unsafe_code)]

use std::arch::aarch64::{
    uint32x4_t, vaddq_u32, vgetq_lane_u32, vld1q_u32, vsetq_lane_u32, vsha256h2q_u32,
    vsha256hq_u32, vsha256su0q_u32, vsha256su1q_u32,
};

use crate::Work;
use crate::sha256::{DIGEST_BITS, HEADER_BITS, IV, K, PAD_BIT};

/// Independent nonces in flight.
const LANES: usize = 4;

/// Whether this CPU has the instructions the engine is compiled for.
pub(crate) fn is_available() -> bool {
    std::arch::is_aarch64_feature_detected!("sha2")
}

/// Calls `candidate` for each nonce in `start..end` (`end` ≤ 2^32) whose last digest word,
/// byte-reversed, does not exceed the target's top limb. The caller has checked
/// [`is_available`].
pub(crate) fn scan(work: &Work, start: u64, end: u64, candidate: &mut dyn FnMut(u32, u32)) {
    debug_assert!(is_available());
    // SAFETY: `scan_lanes` needs only the SHA-2 extension (NEON is part of every aarch64
    // target), and the caller checked it with `is_available` (run-time detection).
    unsafe { scan_lanes(work, start, end, candidate) }
}

/// Four words as a register, `w[0]` in lane 0.
#[inline]
#[target_feature(enable = "neon")]
fn vector(w: [u32; 4]) -> uint32x4_t {
    // SAFETY: `w` is four initialised u32 values on the stack, exactly what `vld1q_u32`
    // reads; it has no alignment requirement beyond u32's.
    unsafe { vld1q_u32(w.as_ptr()) }
}

/// K[i..i + 4] as a register.
#[inline]
#[target_feature(enable = "neon")]
fn k(i: usize) -> uint32x4_t {
    vector([K[i], K[i + 1], K[i + 2], K[i + 3]])
}

/// Four rounds with `wk` = W[i..i + 4] + K[i..i + 4].
#[inline]
#[target_feature(enable = "neon,sha2")]
fn rounds4(abcd: &mut uint32x4_t, efgh: &mut uint32x4_t, wk: uint32x4_t) {
    let before = *abcd;
    *abcd = vsha256hq_u32(*abcd, *efgh, wk);
    *efgh = vsha256h2q_u32(*efgh, before, wk);
}

/// W[i + 16..i + 20] from W[i..i + 16] given as four registers.
#[inline]
#[target_feature(enable = "neon,sha2")]
fn next_words(w0: uint32x4_t, w1: uint32x4_t, w2: uint32x4_t, w3: uint32x4_t) -> uint32x4_t {
    vsha256su1q_u32(vsha256su0q_u32(w0, w1), w2, w3)
}

/// Rounds `4 * block..4 * block + 4` of every lane for each listed block, computing their
/// message words first; unrolled so that every round constant is a constant.
macro_rules! scheduled_rounds {
    ($w:ident, $abcd:ident, $efgh:ident; $($block:literal)*) => { $(
        for l in 0..LANES {
            let [w0, w1, w2, w3] = $w[l];
            let next = next_words(w0, w1, w2, w3);
            $w[l] = [w1, w2, w3, next];
            rounds4(&mut $abcd[l], &mut $efgh[l], vaddq_u32(next, k(4 * $block)));
        }
    )* };
}

#[target_feature(enable = "neon,sha2")]
fn scan_lanes(work: &Work, start: u64, end: u64, candidate: &mut dyn FnMut(u32, u32)) {
    let m = work.midstate;
    let mid_abcd = vector([m[0], m[1], m[2], m[3]]);
    let mid_efgh = vector([m[4], m[5], m[6], m[7]]);
    let iv_abcd = vector([IV[0], IV[1], IV[2], IV[3]]);
    let iv_efgh = vector([IV[4], IV[5], IV[6], IV[7]]);
    let w0 = vector([work.tail[0], work.tail[1], work.tail[2], 0]);
    let w1 = vector([PAD_BIT, 0, 0, 0]);
    let w2 = vector([0; 4]);
    let w3 = vector([0, 0, 0, HEADER_BITS]);
    let header_wk = [
        vaddq_u32(w1, k(4)),
        vaddq_u32(w2, k(8)),
        vaddq_u32(w3, k(12)),
    ];
    let pad2 = vector([PAD_BIT, 0, 0, 0]);
    let len2 = vector([0, 0, 0, DIGEST_BITS]);
    let digest_wk = [vaddq_u32(pad2, k(8)), vaddq_u32(len2, k(12))];
    let top = work.target_top();
    let mut first = start;
    while first < end {
        // Past 2^32 the nonces wrap; those lanes are computed and ignored.
        let nonces: [u32; LANES] = std::array::from_fn(|l| (first + l as u64) as u32);
        let mut abcd = [mid_abcd; LANES];
        let mut efgh = [mid_efgh; LANES];
        let mut w = [[w0, w1, w2, w3]; LANES];
        for l in 0..LANES {
            w[l][0] = vsetq_lane_u32::<3>(nonces[l].swap_bytes(), w0);
            rounds4(&mut abcd[l], &mut efgh[l], vaddq_u32(w[l][0], k(0)));
        }
        for wk in header_wk {
            for l in 0..LANES {
                rounds4(&mut abcd[l], &mut efgh[l], wk);
            }
        }
        scheduled_rounds!(w, abcd, efgh; 4 5 6 7 8 9 10 11 12 13 14 15);
        // The first digest is the second hash's words 0..8, in the same order.
        for l in 0..LANES {
            let first_half = vaddq_u32(abcd[l], mid_abcd);
            let second_half = vaddq_u32(efgh[l], mid_efgh);
            w[l] = [first_half, second_half, pad2, len2];
            abcd[l] = iv_abcd;
            efgh[l] = iv_efgh;
            rounds4(&mut abcd[l], &mut efgh[l], vaddq_u32(first_half, k(0)));
        }
        for l in 0..LANES {
            rounds4(&mut abcd[l], &mut efgh[l], vaddq_u32(w[l][1], k(4)));
        }
        for wk in digest_wk {
            for l in 0..LANES {
                rounds4(&mut abcd[l], &mut efgh[l], wk);
            }
        }
        scheduled_rounds!(w, abcd, efgh; 4 5 6 7 8 9 10 11 12 13 14 15);
        for l in 0..LANES {
            let word = vgetq_lane_u32::<3>(efgh[l]).wrapping_add(IV[7]);
            if first + (l as u64) < end && word.swap_bytes() <= top {
                candidate(nonces[l], word);
            }
        }
        first += LANES as u64;
    }
}
