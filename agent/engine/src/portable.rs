//! The portable engine: one nonce at a time in plain Rust, with the nonce-independent work
//! precomputed. It runs on any CPU and is the reference the SIMD engines are tested against.

use crate::Work;
use crate::sha256::{IV, K, round, small_sigma0, small_sigma1};

/// Calls `candidate` for each nonce in `start..end` (`end` ≤ 2^32) whose last digest word,
/// byte-reversed, does not exceed the target's top limb.
pub(crate) fn scan(work: &Work, start: u64, end: u64, candidate: &mut dyn FnMut(u32, u32)) {
    let top = work.target_top();
    for nonce in start..end {
        let nonce = nonce as u32;
        let word = last_digest_word(work, nonce);
        if word.swap_bytes() <= top {
            candidate(nonce, word);
        }
    }
}

/// The last word of the header's sha256d with `nonce`.
pub(crate) fn last_digest_word(work: &Work, nonce: u32) -> u32 {
    // First hash, second block: rounds 0..3 and words 16, 17 do not read the nonce.
    let mut w = [0u32; 64];
    w[..3].copy_from_slice(&work.tail);
    w[3] = nonce.swap_bytes();
    w[4] = crate::sha256::PAD_BIT;
    w[15] = crate::sha256::HEADER_BITS;
    w[16] = work.w16;
    w[17] = work.w17;
    extend(&mut w, 18);
    let mut s = work.state_after_3;
    for i in 3..64 {
        round(&mut s, w[i].wrapping_add(K[i]));
    }
    let mut block = [0u32; 64];
    for i in 0..8 {
        block[i] = work.midstate[i].wrapping_add(s[i]);
    }
    // Second hash: only the last state word is needed, and it is final once round 60 has
    // produced `e` (it then moves down to `h` untouched).
    block[8] = crate::sha256::PAD_BIT;
    block[15] = crate::sha256::DIGEST_BITS;
    extend(&mut block, 16);
    let mut s = IV;
    for i in 0..61 {
        round(&mut s, block[i].wrapping_add(K[i]));
    }
    s[4].wrapping_add(IV[7])
}

/// Fills message words `from..64` from the ones before.
#[inline(always)]
fn extend(w: &mut [u32; 64], from: usize) {
    for i in from..64 {
        w[i] = small_sigma1(w[i - 2])
            .wrapping_add(w[i - 7])
            .wrapping_add(small_sigma0(w[i - 15]))
            .wrapping_add(w[i - 16]);
    }
}
