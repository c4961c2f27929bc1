//! Scalar SHA-256 pieces shared by every engine: the constants, the compression function,
//! and the per-header precomputation the fast engines start from. Plain safe Rust.

/// The SHA-256 round constants.
pub(crate) const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// The SHA-256 initial state.
pub(crate) const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// Word 4 of the first hash's second block and word 8 of the second hash's block: the
/// padding's leading 1 bit.
pub(crate) const PAD_BIT: u32 = 0x8000_0000;
/// The first hash's message length in bits (80 bytes), its second block's word 15.
pub(crate) const HEADER_BITS: u32 = 640;
/// The second hash's message length in bits (a 32-byte digest), its block's word 15.
pub(crate) const DIGEST_BITS: u32 = 256;

#[inline(always)]
pub(crate) fn big_sigma0(a: u32) -> u32 {
    a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22)
}

#[inline(always)]
pub(crate) fn big_sigma1(e: u32) -> u32 {
    e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25)
}

#[inline(always)]
pub(crate) fn small_sigma0(w: u32) -> u32 {
    w.rotate_right(7) ^ w.rotate_right(18) ^ (w >> 3)
}

#[inline(always)]
pub(crate) fn small_sigma1(w: u32) -> u32 {
    w.rotate_right(17) ^ w.rotate_right(19) ^ (w >> 10)
}

/// One round on `state` with `wk` = W[i] + K[i].
#[inline(always)]
pub(crate) fn round(state: &mut [u32; 8], wk: u32) {
    let [a, b, c, d, e, f, g, h] = *state;
    let t1 = h
        .wrapping_add(big_sigma1(e))
        .wrapping_add((e & f) ^ (!e & g))
        .wrapping_add(wk);
    let t2 = big_sigma0(a).wrapping_add((a & b) ^ (a & c) ^ (b & c));
    *state = [t1.wrapping_add(t2), a, b, c, d.wrapping_add(t1), e, f, g];
}

/// Expands a block's 16 words into the full 64-word schedule.
#[inline(always)]
pub(crate) fn schedule(block: &[u32; 16]) -> [u32; 64] {
    let mut w = [0u32; 64];
    w[..16].copy_from_slice(block);
    for i in 16..64 {
        w[i] = small_sigma1(w[i - 2])
            .wrapping_add(w[i - 7])
            .wrapping_add(small_sigma0(w[i - 15]))
            .wrapping_add(w[i - 16]);
    }
    w
}

/// The compression function: `state` absorbs one 16-word block.
pub(crate) fn compress(state: &mut [u32; 8], block: &[u32; 16]) {
    let w = schedule(block);
    let mut s = *state;
    for i in 0..64 {
        round(&mut s, w[i].wrapping_add(K[i]));
    }
    for (word, add) in state.iter_mut().zip(s) {
        *word = word.wrapping_add(add);
    }
}

/// For a block some of whose message words vary between nonces (`varies`) and the others are
/// `known`, the part of each of the 64 schedule words that does not vary: the word itself
/// where it is constant, else the sum of the constant terms of its recurrence. A SIMD engine
/// then adds only the varying terms per nonce.
// Only the vector engines (x86-64, aarch64 and ARMv7 NEON) split words this way.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")),
    allow(dead_code)
)]
pub(crate) fn constant_parts(known: &[u32; 16], varies: fn(usize) -> bool) -> [u32; 64] {
    let mut constant = [0u32; 64];
    let mut parts = [0u32; 64];
    for i in 0..16 {
        if !varies(i) {
            constant[i] = known[i];
            parts[i] = known[i];
        }
    }
    for i in 16..64 {
        let mut part = 0u32;
        if !varies(i - 2) {
            part = part.wrapping_add(small_sigma1(constant[i - 2]));
        }
        if !varies(i - 7) {
            part = part.wrapping_add(constant[i - 7]);
        }
        if !varies(i - 15) {
            part = part.wrapping_add(small_sigma0(constant[i - 15]));
        }
        if !varies(i - 16) {
            part = part.wrapping_add(constant[i - 16]);
        }
        parts[i] = part;
        if !varies(i) {
            constant[i] = part;
        }
    }
    parts
}

/// Which words of the first hash's second block vary with the nonce: word 3 (the nonce) and
/// every schedule word from 18 on (16 and 17 read only words 0..3 and 9..15 without 3).
// Only the vector engines (x86-64, aarch64 and ARMv7 NEON) split words this way.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")),
    allow(dead_code)
)]
pub(crate) const fn header_word_varies(i: usize) -> bool {
    i == 3 || i >= 18
}

/// Which words of the second hash's block vary: the first digest (0..8) and every schedule
/// word (each reads one of them).
// Only the vector engines (x86-64, aarch64 and ARMv7 NEON) split words this way.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")),
    allow(dead_code)
)]
pub(crate) const fn digest_word_varies(i: usize) -> bool {
    i < 8 || i >= 16
}

/// Big-endian words of a 64-byte block.
pub(crate) fn block_words(bytes: &[u8; 64]) -> [u32; 16] {
    std::array::from_fn(|i| {
        u32::from_be_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ])
    })
}

/// The first hash's second block for a header whose bytes 64..76 are `tail` (as big-endian
/// words) and whose nonce is `nonce`: the nonce's little-endian bytes read as a big-endian
/// word, then the padding for an 80-byte message.
pub(crate) fn header_block(tail: [u32; 3], nonce: u32) -> [u32; 16] {
    let mut block = [0u32; 16];
    block[..3].copy_from_slice(&tail);
    block[3] = nonce.swap_bytes();
    block[4] = PAD_BIT;
    block[15] = HEADER_BITS;
    block
}

/// The second hash's block: the first digest, then the padding for a 32-byte message.
pub(crate) fn digest_block(first: &[u32; 8]) -> [u32; 16] {
    let mut block = [0u32; 16];
    block[..8].copy_from_slice(first);
    block[8] = PAD_BIT;
    block[15] = DIGEST_BITS;
    block
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    /// The constant parts plus the varying terms give the real schedule, for any values of
    /// the varying words.
    #[test]
    fn constant_parts_complete_the_schedule() {
        for (varies, block) in [
            (
                header_word_varies as fn(usize) -> bool,
                header_block([1, 2, 3], 0xdead_beef),
            ),
            (
                digest_word_varies,
                digest_block(&[9, 8, 7, 6, 5, 4, 3, 0xffff_ffff]),
            ),
        ] {
            let w = schedule(&block);
            let parts = constant_parts(&block, varies);
            for i in 0..64 {
                let mut word = parts[i];
                if i < 16 {
                    if varies(i) {
                        word = w[i];
                    }
                } else {
                    let terms = [
                        (i - 2, small_sigma1(w[i - 2])),
                        (i - 7, w[i - 7]),
                        (i - 15, small_sigma0(w[i - 15])),
                        (i - 16, w[i - 16]),
                    ];
                    for (source, term) in terms {
                        if varies(source) {
                            word = word.wrapping_add(term);
                        }
                    }
                }
                assert_eq!(word, w[i], "word {i}");
            }
        }
    }

    #[test]
    fn compress_matches_sha2_on_the_empty_message() {
        let mut block = [0u8; 64];
        block[0] = 0x80;
        let mut state = IV;
        compress(&mut state, &block_words(&block));
        let expected: [u8; 32] = sha2::Sha256::digest(b"").into();
        let got: Vec<u8> = state.iter().flat_map(|w| w.to_be_bytes()).collect();
        assert_eq!(got, expected);
    }
}
