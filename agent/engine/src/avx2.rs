//! The x86-64 AVX2 engine, for CPUs without SHA extensions: eight nonces per 256-bit
//! register, each lane computing the scalar rounds, as the fastest CPU miners do.
//!
//! The rounds are unrolled by macro so that every message-word index is a constant: words
//! and parts of words that do not depend on the nonce are known per header and folded into
//! one broadcast constant (see [`sha256::constant_parts`]), the first three rounds of the
//! first hash come precomputed, and the second hash stops after round 60, when its last
//! state word is known.
#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m256i, _mm256_add_epi32, _mm256_and_si256, _mm256_castsi256_ps, _mm256_cmpeq_epi32,
    _mm256_extract_epi32, _mm256_max_epu32, _mm256_movemask_ps, _mm256_or_si256, _mm256_set_epi8,
    _mm256_set_epi32, _mm256_set1_epi32, _mm256_shuffle_epi8, _mm256_slli_epi32, _mm256_srli_epi32,
    _mm256_xor_si256,
};

use crate::Work;
use crate::sha256::{self, IV, K, digest_word_varies, header_word_varies};

type V = __m256i;

/// Nonces per register.
const LANES: usize = 8;

/// Whether this CPU has the instructions the engine is compiled for.
pub(crate) fn is_available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// Calls `candidate` for each nonce in `start..end` (`end` ≤ 2^32) whose last digest word,
/// byte-reversed, does not exceed the target's top limb. The caller has checked
/// [`is_available`].
pub(crate) fn scan(work: &Work, start: u64, end: u64, candidate: &mut dyn FnMut(u32, u32)) {
    debug_assert!(is_available());
    // SAFETY: `scan_lanes` only needs the CPU to support AVX2, and the caller checked
    // exactly that with `is_available` (run-time CPUID detection).
    unsafe { scan_lanes(work, start, end, candidate) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn splat(x: u32) -> V {
    _mm256_set1_epi32(x as i32)
}

#[inline]
#[target_feature(enable = "avx2")]
fn add(a: V, b: V) -> V {
    _mm256_add_epi32(a, b)
}

#[inline]
#[target_feature(enable = "avx2")]
fn xor(a: V, b: V) -> V {
    _mm256_xor_si256(a, b)
}

/// Rotation right by `R`; `L` must be `32 - R` (AVX2 has no rotate instruction).
#[inline]
#[target_feature(enable = "avx2")]
fn rotr<const R: i32, const L: i32>(x: V) -> V {
    _mm256_or_si256(_mm256_srli_epi32::<R>(x), _mm256_slli_epi32::<L>(x))
}

#[inline]
#[target_feature(enable = "avx2")]
fn big_sigma0(a: V) -> V {
    xor(xor(rotr::<2, 30>(a), rotr::<13, 19>(a)), rotr::<22, 10>(a))
}

#[inline]
#[target_feature(enable = "avx2")]
fn big_sigma1(e: V) -> V {
    xor(xor(rotr::<6, 26>(e), rotr::<11, 21>(e)), rotr::<25, 7>(e))
}

#[inline]
#[target_feature(enable = "avx2")]
fn small_sigma0(w: V) -> V {
    xor(
        xor(rotr::<7, 25>(w), rotr::<18, 14>(w)),
        _mm256_srli_epi32::<3>(w),
    )
}

#[inline]
#[target_feature(enable = "avx2")]
fn small_sigma1(w: V) -> V {
    xor(
        xor(rotr::<17, 15>(w), rotr::<19, 13>(w)),
        _mm256_srli_epi32::<10>(w),
    )
}

/// T1 of a round without its message word: h + Σ1(e) + Ch(e, f, g).
#[inline]
#[target_feature(enable = "avx2")]
fn t1_without_word(s: &[V; 8]) -> V {
    let [_, _, _, _, e, f, g, h] = *s;
    let ch = xor(_mm256_and_si256(xor(f, g), e), g);
    add(add(h, big_sigma1(e)), ch)
}

/// One round with `wk` = W[i] + K[i] in every lane. `bc` carries b ^ c from round to round:
/// Maj(a, b, c) = b ^ ((a ^ b) & (b ^ c)), and this round's a ^ b is the next one's b ^ c.
#[inline]
#[target_feature(enable = "avx2")]
fn round(s: &mut [V; 8], bc: &mut V, wk: V) {
    let [a, b, c, d, e, f, g, _] = *s;
    let t1 = add(t1_without_word(s), wk);
    let ab = xor(a, b);
    let maj = xor(b, _mm256_and_si256(ab, *bc));
    *bc = ab;
    let t2 = add(big_sigma0(a), maj);
    *s = [add(t1, t2), a, b, c, add(d, t1), e, f, g];
}

/// A round of which only the new e is needed (the last rounds of the second hash): the new
/// a is left out, and so is the lane of the state that would have held it.
#[inline]
#[target_feature(enable = "avx2")]
fn round_e_only(s: &mut [V; 8], wk: V) {
    let [a, b, c, d, e, f, g, _] = *s;
    let t1 = add(t1_without_word(s), wk);
    *s = [a, a, b, c, add(d, t1), e, f, g];
}

/// Round `$i`: a varying word plus its round constant, or the precomputed sum.
macro_rules! round_at {
    ($s:ident, $bc:ident, $w:ident, $wk:ident, $varies:ident, $i:literal) => {{
        let wk = if $varies($i) {
            add($w[$i], $wk[$i])
        } else {
            $wk[$i]
        };
        round(&mut $s, &mut $bc, wk);
    }};
}

broadcast_block!("avx2");

#[target_feature(enable = "avx2")]
fn scan_lanes(work: &Work, start: u64, end: u64, candidate: &mut dyn FnMut(u32, u32)) {
    let header = Block::new(&sha256::header_block(work.tail, 0), header_word_varies);
    let digest = Block::new(&sha256::digest_block(&[0; 8]), digest_word_varies);
    // Round 3 as if the nonce word were 0; `hash_lanes` adds the real one.
    let mut after_4 = work.state_after_3;
    sha256::round(&mut after_4, K[3]);
    let after_4: [V; 8] = std::array::from_fn(|i| splat(after_4[i]));
    let midstate: [V; 8] = std::array::from_fn(|i| splat(work.midstate[i]));
    let lane_offsets = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    let top = splat(work.target_top());
    let mut first = start;
    while first < end {
        // Past 2^32 the nonces wrap; those lanes are computed and ignored.
        let nonces = add(splat(first as u32), lane_offsets);
        let words = hash_lanes(&header, &digest, &after_4, &midstate, nonces);
        // The hash's top limb is the last digest word byte-reversed; a lane passes when
        // max(limb, top) == top.
        let limbs = byte_swap(words);
        let passes = _mm256_cmpeq_epi32(_mm256_max_epu32(limbs, top), top);
        let mask = _mm256_movemask_ps(_mm256_castsi256_ps(passes));
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

#[inline]
#[target_feature(enable = "avx2")]
fn byte_swap(x: V) -> V {
    let order = _mm256_set_epi8(
        12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11, 4, 5,
        6, 7, 0, 1, 2, 3,
    );
    _mm256_shuffle_epi8(x, order)
}

#[inline]
#[target_feature(enable = "avx2")]
fn lanes(x: V) -> [u32; LANES] {
    [
        _mm256_extract_epi32::<0>(x) as u32,
        _mm256_extract_epi32::<1>(x) as u32,
        _mm256_extract_epi32::<2>(x) as u32,
        _mm256_extract_epi32::<3>(x) as u32,
        _mm256_extract_epi32::<4>(x) as u32,
        _mm256_extract_epi32::<5>(x) as u32,
        _mm256_extract_epi32::<6>(x) as u32,
        _mm256_extract_epi32::<7>(x) as u32,
    ]
}

/// The last digest word of sha256d for each lane's nonce.
#[inline]
#[target_feature(enable = "avx2")]
fn hash_lanes(header: &Block, digest: &Block, after_4: &[V; 8], midstate: &[V; 8], nonces: V) -> V {
    let parts = &header.parts;
    let wk = &header.wk;
    let mut w = [splat(0); 64];
    w[3] = byte_swap(nonces);
    // Round 3 reads the nonce only through W[3], which it adds to the new a and e.
    let mut s = *after_4;
    s[0] = add(s[0], w[3]);
    s[4] = add(s[4], w[3]);
    let mut bc = xor(s[1], s[2]);
    macro_rules! first_round {
        ($($i:literal)*) => { $( round_at!(s, bc, w, wk, header_word_varies, $i); )* };
    }
    macro_rules! first_word_and_round {
        ($($i:literal)*) => { $(
            word!(w, parts, header_word_varies, $i);
            round_at!(s, bc, w, wk, header_word_varies, $i);
        )* };
    }
    first_round!(4 5 6 7 8 9 10 11 12 13 14 15 16 17);
    first_word_and_round!(18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63);

    let parts = &digest.parts;
    let wk = &digest.wk;
    let mut w = [splat(0); 64];
    for i in 0..8 {
        w[i] = add(midstate[i], s[i]);
    }
    let mut s: [V; 8] = std::array::from_fn(|i| splat(IV[i]));
    let mut bc = xor(s[1], s[2]);
    macro_rules! second_round {
        ($($i:literal)*) => { $( round_at!(s, bc, w, wk, digest_word_varies, $i); )* };
    }
    macro_rules! second_word_and_round {
        ($($i:literal)*) => { $(
            word!(w, parts, digest_word_varies, $i);
            round_at!(s, bc, w, wk, digest_word_varies, $i);
        )* };
    }
    second_round!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
    second_word_and_round!(16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56);
    // The last state word is e after round 60, which rounds 61..63 only move down to h. It
    // reads a only as it was after round 56, so rounds 57..60 skip the new a.
    macro_rules! second_word_and_e {
        ($($i:literal)*) => { $(
            word!(w, parts, digest_word_varies, $i);
            round_e_only(&mut s, add(w[$i], wk[$i]));
        )* };
    }
    second_word_and_e!(57 58 59 60);
    add(s[4], splat(IV[7]))
}
