//! The aarch64 NEON engine, for ARMv8 cores without the SHA-2 extension (a Raspberry Pi 4's
//! Cortex-A72, Cortex-A53 and A35 SoCs built without the crypto extension): four nonces
//! per 128-bit register, each lane computing the scalar rounds, like the x86 vector
//! engines. NEON is part of every aarch64 target, so the engine always runs there.
//!
//! What NEON offers for SHA-256: a bit select (`bsl`), which is Ch in one instruction and
//! Maj in two; a rotate from a shift and a shift-right-and-insert (`shl` + `sri`); a byte
//! reversal per word (`rev32`). The same constant folding as the x86 vector engines: words
//! and parts of words that do not depend on the nonce are one broadcast constant per
//! header, the first hash starts after round 3 with the nonce added in, and the second hash
//! stops after round 60.
//!
//! Not measured on hardware: no ARM machine was at hand. It is tested against the portable
//! engine and the block vectors by cross-compiling the engine's tests for aarch64 and
//! running them under qemu (`scripts/cross-engine`).
#![allow(unsafe_code)]

use std::arch::aarch64::{
    uint32x4_t, vaddq_u32, vbslq_u32, vcleq_u32, vdupq_n_u32, veorq_u32, vgetq_lane_u32,
    vmaxvq_u32, vreinterpretq_u8_u32, vreinterpretq_u32_u8, vrev32q_u8, vsetq_lane_u32,
    vshlq_n_u32, vshrq_n_u32, vsriq_n_u32,
};

use crate::Work;
use crate::sha256::{self, IV, K, digest_word_varies, header_word_varies};

type V = uint32x4_t;

/// Nonces per register.
const LANES: usize = 4;

/// Always: NEON (Advanced SIMD) is part of every aarch64 CPU.
pub(crate) fn is_available() -> bool {
    true
}

#[inline]
#[target_feature(enable = "neon")]
fn splat(x: u32) -> V {
    vdupq_n_u32(x)
}

#[inline]
#[target_feature(enable = "neon")]
fn add(a: V, b: V) -> V {
    vaddq_u32(a, b)
}

#[inline]
#[target_feature(enable = "neon")]
fn xor(a: V, b: V) -> V {
    veorq_u32(a, b)
}

/// Rotation right by `R`; `L` must be `32 - R`: the left shift, with the right-shifted
/// bits inserted below it.
#[inline]
#[target_feature(enable = "neon")]
fn rotr<const R: i32, const L: i32>(x: V) -> V {
    vsriq_n_u32::<R>(vshlq_n_u32::<L>(x), x)
}

#[inline]
#[target_feature(enable = "neon")]
fn big_sigma0(a: V) -> V {
    xor(xor(rotr::<2, 30>(a), rotr::<13, 19>(a)), rotr::<22, 10>(a))
}

#[inline]
#[target_feature(enable = "neon")]
fn big_sigma1(e: V) -> V {
    xor(xor(rotr::<6, 26>(e), rotr::<11, 21>(e)), rotr::<25, 7>(e))
}

#[inline]
#[target_feature(enable = "neon")]
fn small_sigma0(w: V) -> V {
    xor(
        xor(rotr::<7, 25>(w), rotr::<18, 14>(w)),
        vshrq_n_u32::<3>(w),
    )
}

#[inline]
#[target_feature(enable = "neon")]
fn small_sigma1(w: V) -> V {
    xor(
        xor(rotr::<17, 15>(w), rotr::<19, 13>(w)),
        vshrq_n_u32::<10>(w),
    )
}

/// T1 of a round without its message word: h + Σ1(e) + Ch(e, f, g), Ch being a bit select.
#[inline]
#[target_feature(enable = "neon")]
fn t1_without_word(s: &[V; 8]) -> V {
    let [_, _, _, _, e, f, g, h] = *s;
    add(add(h, big_sigma1(e)), vbslq_u32(e, f, g))
}

/// One round with `wk` = W[i] + K[i] in every lane. Maj(a, b, c) is c where a and b
/// differ, and b where they agree.
#[inline]
#[target_feature(enable = "neon")]
fn round(s: &mut [V; 8], wk: V) {
    let [a, b, c, d, e, f, g, _] = *s;
    let t1 = add(t1_without_word(s), wk);
    let maj = vbslq_u32(xor(a, b), c, b);
    let t2 = add(big_sigma0(a), maj);
    *s = [add(t1, t2), a, b, c, add(d, t1), e, f, g];
}

/// A round of which only the new e is needed (the last rounds of the second hash).
#[inline]
#[target_feature(enable = "neon")]
fn round_e_only(s: &mut [V; 8], wk: V) {
    let [a, b, c, d, e, f, g, _] = *s;
    let t1 = add(t1_without_word(s), wk);
    *s = [a, a, b, c, add(d, t1), e, f, g];
}

broadcast_block!("neon");

/// Calls `candidate` for each nonce in `start..end` (`end` ≤ 2^32) whose last digest word,
/// byte-reversed, does not exceed the target's top limb.
pub(crate) fn scan(work: &Work, start: u64, end: u64, candidate: &mut dyn FnMut(u32, u32)) {
    // SAFETY: `scan_lanes` needs only NEON, which every aarch64 CPU has (the aarch64
    // targets enable it unconditionally).
    unsafe { scan_lanes(work, start, end, candidate) }
}

#[target_feature(enable = "neon")]
fn scan_lanes(work: &Work, start: u64, end: u64, candidate: &mut dyn FnMut(u32, u32)) {
    let header = Block::new(&sha256::header_block(work.tail, 0), header_word_varies);
    let digest = Block::new(&sha256::digest_block(&[0; 8]), digest_word_varies);
    // Round 3 as if the nonce word were 0; `hash_lanes` adds the real one.
    let mut after_4 = work.state_after_3;
    sha256::round(&mut after_4, K[3]);
    let after_4: [V; 8] = std::array::from_fn(|i| splat(after_4[i]));
    let midstate: [V; 8] = std::array::from_fn(|i| splat(work.midstate[i]));
    let lane_offsets =
        vsetq_lane_u32::<3>(3, vsetq_lane_u32::<2>(2, vsetq_lane_u32::<1>(1, splat(0))));
    let top = splat(work.target_top());
    let mut first = start;
    while first < end {
        // Past 2^32 the nonces wrap; those lanes are computed and ignored.
        let nonces = add(splat(first as u32), lane_offsets);
        let words = hash_lanes(&header, &digest, &after_4, &midstate, nonces);
        // The hash's top limb is the last digest word byte-reversed; a passing lane is all
        // ones in the comparison.
        let passes = vcleq_u32(byte_swap(words), top);
        if vmaxvq_u32(passes) != 0 {
            let lanes = [
                vgetq_lane_u32::<0>(passes) != 0,
                vgetq_lane_u32::<1>(passes) != 0,
                vgetq_lane_u32::<2>(passes) != 0,
                vgetq_lane_u32::<3>(passes) != 0,
            ];
            let words = [
                vgetq_lane_u32::<0>(words),
                vgetq_lane_u32::<1>(words),
                vgetq_lane_u32::<2>(words),
                vgetq_lane_u32::<3>(words),
            ];
            for (l, (passed, word)) in lanes.into_iter().zip(words).enumerate() {
                if passed && first + (l as u64) < end {
                    candidate((first as u32).wrapping_add(l as u32), word);
                }
            }
        }
        first += LANES as u64;
    }
}

/// Each lane's bytes reversed.
#[inline]
#[target_feature(enable = "neon")]
fn byte_swap(x: V) -> V {
    vreinterpretq_u32_u8(vrev32q_u8(vreinterpretq_u8_u32(x)))
}

hash_lanes!("neon");
