//! What the vector engines (`avx2`, `avx512`, `neon`) have in common: the message schedule
//! and rounds written once, for whatever register type and operations the engine module
//! defines. The macros name `add`, `splat`, `small_sigma0`, `small_sigma1`, `round`,
//! `round_e_only`, `byte_swap` and the type `V`, which resolve in the module that invokes
//! them, so each engine keeps its own instructions and target features.

/// Message word `$i` of `$w` from the words before it: the broadcast constant part plus the
/// terms whose source word varies (`$varies` is a const fn, so the branches fold away).
macro_rules! word {
    ($w:ident, $parts:ident, $varies:ident, $i:literal) => {{
        let mut x = $parts[$i];
        if $varies($i - 2) {
            x = add(x, small_sigma1($w[$i - 2]));
        }
        if $varies($i - 7) {
            x = add(x, $w[$i - 7]);
        }
        if $varies($i - 15) {
            x = add(x, small_sigma0($w[$i - 15]));
        }
        if $varies($i - 16) {
            x = add(x, $w[$i - 16]);
        }
        $w[$i] = x;
    }};
}

/// Broadcast constants of one of the two blocks, for an engine whose operations need
/// target feature `$feature`.
macro_rules! broadcast_block {
    ($feature:literal) => {
        /// Broadcast constants of one of the two blocks.
        struct Block {
            /// The constant part of each schedule word.
            parts: [V; 64],
            /// For a constant word, the word plus its round constant; for a varying one,
            /// the round constant alone, ready to add.
            wk: [V; 64],
        }

        impl Block {
            #[inline]
            #[target_feature(enable = $feature)]
            fn new(known: &[u32; 16], varies: fn(usize) -> bool) -> Block {
                let parts = sha256::constant_parts(known, varies);
                Block {
                    parts: std::array::from_fn(|i| splat(parts[i])),
                    wk: std::array::from_fn(|i| {
                        if varies(i) {
                            splat(K[i])
                        } else {
                            splat(parts[i].wrapping_add(K[i]))
                        }
                    }),
                }
            }
        }
    };
}

/// Rounds `$i...` of the state `$s`: each a varying word plus its round constant, or the
/// precomputed sum; with `word`, the word is computed first.
macro_rules! rounds {
    ($s:ident, $w:ident, $wk:ident, $varies:ident; $($i:literal)*) => { $(
        let wk = if $varies($i) { add($w[$i], $wk[$i]) } else { $wk[$i] };
        round(&mut $s, wk);
    )* };
    (word $s:ident, $w:ident, $parts:ident, $wk:ident, $varies:ident; $($i:literal)*) => { $(
        word!($w, $parts, $varies, $i);
        rounds!($s, $w, $wk, $varies; $i);
    )* };
    // Rounds of which only the new e is needed (`round_e_only`).
    (word e_only $s:ident, $w:ident, $parts:ident, $wk:ident, $varies:ident; $($i:literal)*) => { $(
        word!($w, $parts, $varies, $i);
        round_e_only(&mut $s, add($w[$i], $wk[$i]));
    )* };
}

/// `hash_lanes` for an engine whose `round` takes the state and W[i] + K[i] (`avx512`,
/// `neon`), with target feature `$feature`: the last digest word of sha256d for each lane's
/// nonce.
macro_rules! hash_lanes {
    ($feature:literal) => {
        /// The last digest word of sha256d for each lane's nonce.
        #[inline]
        #[target_feature(enable = $feature)]
        fn hash_lanes(
            header: &Block,
            digest: &Block,
            after_4: &[V; 8],
            midstate: &[V; 8],
            nonces: V,
        ) -> V {
            let parts = &header.parts;
            let wk = &header.wk;
            let mut w = [splat(0); 64];
            w[3] = byte_swap(nonces);
            // Round 3 reads the nonce only through W[3], which it adds to the new a and e.
            let mut s = *after_4;
            s[0] = add(s[0], w[3]);
            s[4] = add(s[4], w[3]);
            rounds!(s, w, wk, header_word_varies; 4 5 6 7 8 9 10 11 12 13 14 15 16 17);
            rounds!(word s, w, parts, wk, header_word_varies; 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63);

            let parts = &digest.parts;
            let wk = &digest.wk;
            let mut w = [splat(0); 64];
            for i in 0..8 {
                w[i] = add(midstate[i], s[i]);
            }
            let mut s: [V; 8] = std::array::from_fn(|i| splat(IV[i]));
            rounds!(s, w, wk, digest_word_varies; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
            rounds!(word s, w, parts, wk, digest_word_varies; 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56);
            // The last state word is e after round 60, which rounds 61..63 only move down
            // to h. It reads a only as it was after round 56, so rounds 57..60 skip the
            // new a.
            rounds!(word e_only s, w, parts, wk, digest_word_varies; 57 58 59 60);
            add(s[4], splat(IV[7]))
        }
    };
}
