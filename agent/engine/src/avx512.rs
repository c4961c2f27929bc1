//! The x86-64 AVX-512 engine: sixteen nonces per 512-bit register, each lane computing the
//! scalar rounds, like [`avx2`](crate::avx2) but with what AVX-512F adds: a rotate
//! instruction (`vprord`), so a Σ costs three rotates instead of six shifts and three ORs,
//! and three-input logic (`vpternlogd`), which computes Ch, Maj and the XOR of three terms
//! in one instruction each. Comparisons give a mask register directly.
//!
//! The same constant folding as the AVX2 engine: words and parts of words that do not
//! depend on the nonce are one broadcast constant per header, the first hash starts after
//! round 3 with the nonce added in, and the second hash stops after round 60. Only
//! AVX-512F is used (no byte shuffle, which would need AVX-512BW): byte order is turned
//! with two rotates and a bit select.
#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m512i, _mm512_add_epi32, _mm512_cmple_epu32_mask, _mm512_rol_epi32, _mm512_ror_epi32,
    _mm512_set_epi32, _mm512_set1_epi32, _mm512_srli_epi32, _mm512_ternarylogic_epi32,
};

use crate::Work;
use crate::sha256::{self, IV, K, digest_word_varies, header_word_varies};

type V = __m512i;

/// Nonces per register.
const LANES: usize = 16;

/// `vpternlogd` truth tables, for inputs (a, b, c) in that order.
/// a ^ b ^ c.
const XOR3: i32 = 0x96;
/// a ? b : c, which is Ch(a, b, c), and a bit select.
const SELECT: i32 = 0xca;
/// Majority of a, b, c: Maj(a, b, c).
const MAJORITY: i32 = 0xe8;

/// Whether this CPU has the instructions the engine is compiled for (and the operating
/// system saves the 512-bit registers, which the detection also checks).
pub(crate) fn is_available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Calls `candidate` for each nonce in `start..end` (`end` ≤ 2^32) whose last digest word,
/// byte-reversed, does not exceed the target's top limb. The caller has checked
/// [`is_available`].
pub(crate) fn scan(work: &Work, start: u64, end: u64, candidate: &mut dyn FnMut(u32, u32)) {
    debug_assert!(is_available());
    // SAFETY: `scan_lanes` only needs the CPU to support AVX-512F, and the caller checked
    // exactly that with `is_available` (run-time CPUID and XCR0 detection).
    unsafe { scan_lanes(work, start, end, candidate) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn splat(x: u32) -> V {
    _mm512_set1_epi32(x as i32)
}

#[inline]
#[target_feature(enable = "avx512f")]
fn add(a: V, b: V) -> V {
    _mm512_add_epi32(a, b)
}

#[inline]
#[target_feature(enable = "avx512f")]
fn xor3(a: V, b: V, c: V) -> V {
    _mm512_ternarylogic_epi32::<XOR3>(a, b, c)
}

#[inline]
#[target_feature(enable = "avx512f")]
fn big_sigma0(a: V) -> V {
    xor3(
        _mm512_ror_epi32::<2>(a),
        _mm512_ror_epi32::<13>(a),
        _mm512_ror_epi32::<22>(a),
    )
}

#[inline]
#[target_feature(enable = "avx512f")]
fn big_sigma1(e: V) -> V {
    xor3(
        _mm512_ror_epi32::<6>(e),
        _mm512_ror_epi32::<11>(e),
        _mm512_ror_epi32::<25>(e),
    )
}

#[inline]
#[target_feature(enable = "avx512f")]
fn small_sigma0(w: V) -> V {
    xor3(
        _mm512_ror_epi32::<7>(w),
        _mm512_ror_epi32::<18>(w),
        _mm512_srli_epi32::<3>(w),
    )
}

#[inline]
#[target_feature(enable = "avx512f")]
fn small_sigma1(w: V) -> V {
    xor3(
        _mm512_ror_epi32::<17>(w),
        _mm512_ror_epi32::<19>(w),
        _mm512_srli_epi32::<10>(w),
    )
}

/// T1 of a round without its message word: h + Σ1(e) + Ch(e, f, g).
#[inline]
#[target_feature(enable = "avx512f")]
fn t1_without_word(s: &[V; 8]) -> V {
    let [_, _, _, _, e, f, g, h] = *s;
    let ch = _mm512_ternarylogic_epi32::<SELECT>(e, f, g);
    add(add(h, big_sigma1(e)), ch)
}

/// One round with `wk` = W[i] + K[i] in every lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn round(s: &mut [V; 8], wk: V) {
    let [a, b, c, d, e, f, g, _] = *s;
    let t1 = add(t1_without_word(s), wk);
    let maj = _mm512_ternarylogic_epi32::<MAJORITY>(a, b, c);
    let t2 = add(big_sigma0(a), maj);
    *s = [add(t1, t2), a, b, c, add(d, t1), e, f, g];
}

/// A round of which only the new e is needed (the last rounds of the second hash).
#[inline]
#[target_feature(enable = "avx512f")]
fn round_e_only(s: &mut [V; 8], wk: V) {
    let [a, b, c, d, e, f, g, _] = *s;
    let t1 = add(t1_without_word(s), wk);
    *s = [a, a, b, c, add(d, t1), e, f, g];
}

broadcast_block!("avx512f");

#[target_feature(enable = "avx512f")]
fn scan_lanes(work: &Work, start: u64, end: u64, candidate: &mut dyn FnMut(u32, u32)) {
    let header = Block::new(&sha256::header_block(work.tail, 0), header_word_varies);
    let digest = Block::new(&sha256::digest_block(&[0; 8]), digest_word_varies);
    // Round 3 as if the nonce word were 0; `hash_lanes` adds the real one.
    let mut after_4 = work.state_after_3;
    sha256::round(&mut after_4, K[3]);
    let after_4: [V; 8] = std::array::from_fn(|i| splat(after_4[i]));
    let midstate: [V; 8] = std::array::from_fn(|i| splat(work.midstate[i]));
    let lane_offsets = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    let top = splat(work.target_top());
    let mut first = start;
    while first < end {
        // Past 2^32 the nonces wrap; those lanes are computed and ignored.
        let nonces = add(splat(first as u32), lane_offsets);
        let words = hash_lanes(&header, &digest, &after_4, &midstate, nonces);
        // The hash's top limb is the last digest word byte-reversed.
        let mask = _mm512_cmple_epu32_mask(byte_swap(words), top);
        if mask != 0 {
            let words = lanes(words);
            for (l, word) in words.into_iter().enumerate() {
                if mask & (1 << l) != 0 && first + (l as u64) < end {
                    candidate((first as u32).wrapping_add(l as u32), word);
                }
            }
        }
        first += LANES as u64;
    }
}

/// Each lane's bytes reversed: bytes 1 and 3 come from a rotation right by 8, bytes 0 and
/// 2 from a rotation left by 8.
#[inline]
#[target_feature(enable = "avx512f")]
fn byte_swap(x: V) -> V {
    _mm512_ternarylogic_epi32::<SELECT>(
        splat(0xff00_ff00),
        _mm512_ror_epi32::<8>(x),
        _mm512_rol_epi32::<8>(x),
    )
}

#[inline]
#[target_feature(enable = "avx512f")]
fn lanes(x: V) -> [u32; LANES] {
    // SAFETY: `__m512i` is 64 bytes of plain integer data with no invalid bit patterns, and
    // so is `[u32; 16]`; the sizes are equal (checked by `transmute` at compile time).
    unsafe { std::mem::transmute::<V, [u32; LANES]>(x) }
}

hash_lanes!("avx512f");
