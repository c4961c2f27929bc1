//! The NEON engine for 32-bit ARMv7 (Cortex-A7, A8, A9, A15 boards: Raspberry Pi 2, many
//! Allwinner and i.MX SoCs): four nonces per 128-bit register, like the aarch64 `neon`
//! engine, whose name it shares.
//!
//! The armv7 targets are built without NEON (some ARMv7 cores lack it), and on stable Rust
//! neither `#[target_feature(enable = "neon")]` nor the `core::arch::arm` intrinsics are
//! available for 32-bit ARM. So the hashing is one function in A32 assembly
//! (`global_asm!`, with the assembler's `.fpu neon`), called through the C calling
//! convention only once the kernel's hardware capabilities (`AT_HWCAP`, read from
//! `/proc/self/auxv`) have said the CPU has NEON.
//!
//! The arithmetic is the one `lanes.rs` writes for the other vector engines: Rust prepares
//! per header, in a `Context`, the state after round 3 with nonce word 0, the constant
//! part of every schedule word and W + K where the word is constant; the assembly adds the
//! nonce's word, computes only the schedule terms whose source word varies (the choice is
//! made by the assembler, with `.if`, so none of it is decided at run time) and stops the
//! second hash once round 60 has given its last state word. q0–q7 hold the state a..h
//! (the registers rotate one place each round, so there is no move), q8–q15 the next
//! round's input, the current round's h + W + K, the last two message words and
//! temporaries; the message words that later words read live in a 1 KiB buffer on the
//! stack. About 1,250 instructions a nonce, against 6,300 for `portable` on the same
//! target (`scripts/count-instructions`).
//!
//! Not measured on hardware: no ARM machine was at hand. It is tested against the portable
//! engine and the block vectors by cross-compiling the engine's tests for
//! armv7-unknown-linux-gnueabihf and running them under qemu (`scripts/cross-engine`), once
//! with a CPU that has NEON and once with one that has not.
#![allow(unsafe_code)]

use std::mem::offset_of;
use std::sync::OnceLock;

use crate::Work;
use crate::sha256::{self, IV, K, digest_word_varies, header_word_varies};

/// Nonces per register.
const LANES: usize = 4;

/// Groups of four nonces hashed per call of the assembly, whose results Rust then compares
/// against the target: enough to make the call's cost (saving and restoring registers)
/// vanish per nonce, few enough for a small buffer on the stack.
const GROUPS: usize = 64;

/// One 32-bit value in each of the four lanes.
type Splat = [u32; LANES];

/// Everything the assembly reads, prepared once per header. The offsets are the ones the
/// assembly adds to the context's address (checked below at compile time); every vector is
/// 16-byte aligned, which the loads' alignment hints require.
#[repr(C, align(16))]
struct Context {
    /// The first hash's second-block state after rounds 0..=3, round 3 with nonce word 0.
    after_4: [Splat; 8],
    /// The state after the first 64 header bytes.
    midstate: [Splat; 8],
    /// The initial state, for the second hash.
    iv: [Splat; 8],
    /// 0, 1, 2, 3: each lane's offset from the first nonce of a group.
    lane_offsets: Splat,
    /// The round inputs in the order the assembly reads them: the first hash's rounds 4..=63
    /// and then the second hash's rounds 0..=60, each W + K where the word is constant and
    /// K alone where it varies.
    wk: [Splat; WK_ROUNDS],
    /// The constant parts of the varying schedule words, in the order the assembly computes
    /// them: the first hash's words 18..=63, then the second hash's words 16..=60.
    parts: [Splat; PART_WORDS],
}

const WK_ROUNDS: usize = (64 - 4) + 61;
const PART_WORDS: usize = (64 - 18) + (61 - 16);

// The offsets written into the assembly below.
const _: () = {
    assert!(offset_of!(Context, after_4) == 0);
    assert!(offset_of!(Context, midstate) == 128);
    assert!(offset_of!(Context, iv) == 256);
    assert!(offset_of!(Context, lane_offsets) == 384);
    assert!(offset_of!(Context, wk) == 400);
    assert!(offset_of!(Context, parts) == 2336);
};

impl Context {
    fn new(work: &Work) -> Context {
        let splat = |x: u32| [x; LANES];
        let header_block = sha256::header_block(work.tail, 0);
        let digest_block = sha256::digest_block(&[0; 8]);
        let header = sha256::constant_parts(&header_block, header_word_varies);
        let digest = sha256::constant_parts(&digest_block, digest_word_varies);
        let wk = |parts: &[u32; 64], varies: fn(usize) -> bool, i: usize| {
            if varies(i) {
                splat(K[i])
            } else {
                splat(parts[i].wrapping_add(K[i]))
            }
        };
        let wks: Vec<Splat> = (4..64)
            .map(|i| wk(&header, header_word_varies, i))
            .chain((0..61).map(|i| wk(&digest, digest_word_varies, i)))
            .collect();
        let parts: Vec<Splat> = (18..64)
            .map(|i| splat(header[i]))
            .chain((16..61).map(|i| splat(digest[i])))
            .collect();
        // Round 3 as if the nonce word were 0; the assembly adds the real one to a and e.
        let mut after_4 = work.state_after_3;
        sha256::round(&mut after_4, K[3]);
        Context {
            after_4: after_4.map(splat),
            midstate: work.midstate.map(splat),
            iv: IV.map(splat),
            lane_offsets: [0, 1, 2, 3],
            wk: wks.try_into().expect("WK_ROUNDS round inputs"),
            parts: parts.try_into().expect("PART_WORDS schedule words"),
        }
    }
}

/// `AT_HWCAP` in the auxiliary vector, and its NEON bit on 32-bit ARM Linux.
const AT_HWCAP: u32 = 16;
const HWCAP_NEON: u32 = 1 << 12;

/// Whether the CPU has NEON, as the kernel says in `AT_HWCAP` (read once). Without
/// `/proc/self/auxv` (no procfs mounted) the answer is no: the portable engine then runs.
pub(crate) fn is_available() -> bool {
    static NEON: OnceLock<bool> = OnceLock::new();
    *NEON.get_or_init(|| {
        std::fs::read("/proc/self/auxv")
            .map(|auxv| hwcap(&auxv).is_some_and(|caps| caps & HWCAP_NEON != 0))
            .unwrap_or(false)
    })
}

/// `AT_HWCAP` from an auxiliary vector: pairs of native (32-bit) words, type then value,
/// ending with type 0.
fn hwcap(auxv: &[u8]) -> Option<u32> {
    auxv.chunks_exact(8)
        .map(|pair| {
            let word = |at: usize| {
                u32::from_ne_bytes([pair[at], pair[at + 1], pair[at + 2], pair[at + 3]])
            };
            (word(0), word(4))
        })
        .take_while(|&(kind, _)| kind != 0)
        .find(|&(kind, _)| kind == AT_HWCAP)
        .map(|(_, value)| value)
}

unsafe extern "C" {
    /// For each of `groups` (at least 1) groups of four nonces from `first` on (wrapping
    /// past 2^32), the last digest word of each nonce's sha256d, four words per group, into
    /// `words`. Needs NEON.
    fn micromine_neon_armv7_hash4(
        context: *const Context,
        first: u32,
        words: *mut u32,
        groups: u32,
    );
}

/// Calls `candidate` for each nonce in `start..end` (`end` ≤ 2^32) whose last digest word,
/// byte-reversed, does not exceed the target's top limb. Without NEON it scans with the
/// portable engine.
pub(crate) fn scan(work: &Work, start: u64, end: u64, candidate: &mut dyn FnMut(u32, u32)) {
    if !is_available() {
        return crate::portable::scan(work, start, end, candidate);
    }
    let context = Context::new(work);
    let top = work.target_top();
    let mut words = [0u32; GROUPS * LANES];
    let mut first = start;
    while first < end {
        let groups = (end - first).div_ceil(LANES as u64).min(GROUPS as u64) as usize;
        // SAFETY: the CPU has NEON (checked above), which is all the function needs beyond
        // the C calling convention it follows; `context` is a valid, 16-byte aligned
        // `Context`; `words` has room for the 4 × `groups` words it writes, and `groups`
        // is at least 1 (`first < end`).
        unsafe {
            micromine_neon_armv7_hash4(&context, first as u32, words.as_mut_ptr(), groups as u32)
        };
        for (offset, &word) in words[..groups * LANES].iter().enumerate() {
            // Past `end`, or past 2^32 where the nonces wrap: computed and ignored.
            let nonce = first + offset as u64;
            if nonce < end && word.swap_bytes() <= top {
                candidate(nonce as u32, word);
            }
        }
        first += (groups * LANES) as u64;
    }
}

// The assembly. Registers: r0 the context, r1 the group's first nonce, r2 where the words
// go, r3 the groups left; r4 reads the round inputs (`wk`) and r5 the constant parts, each
// in order; r6 and r7 read message words i-16 (with i-15) and i-7 from the stack buffer,
// r8 the second hash's words 0..7, and r9 writes word i, each following the word being
// computed, so that most loads and stores post-increment and need no address arithmetic;
// r10 holds 16, r11 the caller's stack pointer. The assembler tracks where each of r6..r9
// points (`.Lmm_at_rN`, a word index) and emits an `add` only where the next access is
// elsewhere. q0..q7 hold the state, q8 the next round's W + K, q15 the current round's
// h + W + K, q13 and q14 the last two message words computed (word i-2 is read from
// there), q9..q12 are temporaries.
//
// Macros and symbols are prefixed `mm_`/`.Lmm_`, and the macros are purged at the end, so
// that this block cannot meet another crate's assembly in an LTO build.
core::arch::global_asm!(
    r#"
    .syntax unified
    .arm
    .fpu neon
    .text

    @ \out = whether word \j of the block varies with the nonce: block 1 is the first
    @ hash's second block (sha256::header_word_varies), block 2 the second hash's
    @ (sha256::digest_word_varies).
    .macro mm_varies out, block, j
    .if \block == 1
    .set \out, ((\j) == 3) || ((\j) >= 18)
    .else
    .set \out, ((\j) < 8) || ((\j) >= 16)
    .endif
    .endm

    @ \t = (\x ror \r1) ^ (\x ror \r2) ^ (\x ror \r3), or with \shr (\x >> \r3) last;
    @ \u is clobbered. A rotation is a shift right and a shift left inserted above it.
    .macro mm_sigma t, u, x, r1, r2, r3, shr
    vshr.u32 \t, \x, #\r1
    vshr.u32 \u, \x, #\r2
    vsli.32 \t, \x, #(32-\r1)
    vsli.32 \u, \x, #(32-\r2)
    veor \t, \t, \u
    vshr.u32 \u, \x, #\r3
    .if \shr == 0
    vsli.32 \u, \x, #(32-\r3)
    .endif
    veor \t, \t, \u
    .endm

    @ Points \p at message word \j of the stack buffer, unless it does already.
    .macro mm_point p, j
    .if .Lmm_at_\p != (\j)
    add \p, sp, #((\j)*16)
    .endif
    .endm

    @ \q = message word \j, through pointer \p.
    .macro mm_load q, j, p
    mm_point \p, \j
    vld1.32 {{\q}}, [\p :128]!
    .set .Lmm_at_\p, (\j)+1
    .endm

    @ q11 = message word \j, q12 = word \j+1, through pointer \p, which moves on one word.
    .macro mm_load2 j, p
    mm_point \p, \j
    vld1.32 {{d22-d25}}, [\p :128], r10
    .set .Lmm_at_\p, (\j)+1
    .endm

    @ Message word \j = \q, through pointer \p.
    .macro mm_store q, j, p
    mm_point \p, \j
    vst1.32 {{\q}}, [\p :128]!
    .set .Lmm_at_\p, (\j)+1
    .endm

    @ \w = message word \i (16 or later) of \block, whose last round is \last: its
    @ constant part plus the terms whose source word varies. \w holds word \i-2 until
    @ then (q13 the even words, q14 the odd ones); the words that words \i+7 and later
    @ read go to the buffer too.
    .macro mm_word block, i, last, w
    vld1.32 {{q9}}, [r5 :128]!
    mm_varies .Lmm_v16, \block, (\i)-16
    mm_varies .Lmm_v15, \block, (\i)-15
    mm_varies .Lmm_v7, \block, (\i)-7
    mm_varies .Lmm_v2, \block, (\i)-2
    .if .Lmm_v16 && .Lmm_v15
    mm_load2 (\i)-16, r6
    vadd.i32 q9, q9, q11
    mm_sigma q10, q11, q12, 7, 18, 3, 1
    vadd.i32 q9, q9, q10
    .elseif .Lmm_v16
    mm_load q11, (\i)-16, r6
    vadd.i32 q9, q9, q11
    .elseif .Lmm_v15
    mm_load q12, (\i)-15, r6
    mm_sigma q10, q11, q12, 7, 18, 3, 1
    vadd.i32 q9, q9, q10
    .endif
    .if .Lmm_v7
    mm_load q11, (\i)-7, r7
    vadd.i32 q9, q9, q11
    .endif
    .if .Lmm_v2
    mm_sigma q10, q11, \w, 17, 19, 10, 1
    vadd.i32 \w, q9, q10
    .else
    vmov \w, q9
    .endif
    .if (\i)+7 <= (\last)
    mm_store \w, \i, r9
    .endif
    .endm

    @ q8 = W + K of round \i of \block: the round constant plus the word where it varies
    @ (below 16 read from the buffer, from 16 on computed), else the precomputed sum.
    .macro mm_input block, i, last
    vld1.32 {{q8}}, [r4 :128]!
    mm_varies .Lmm_vi, \block, \i
    .if .Lmm_vi
    .if (\i) < 16
    mm_load q9, \i, r8
    vadd.i32 q8, q8, q9
    .elseif ((\i)&1) == 0
    mm_word \block, \i, \last, q13
    vadd.i32 q8, q8, q13
    .else
    mm_word \block, \i, \last, q14
    vadd.i32 q8, q8, q14
    .endif
    .endif
    .endm

    @ The same for two values at once, interleaved for an in-order core: \t from \x,
    @ \t2 from \x2, both rotations only.
    .macro mm_sigma2 t, u, x, r1, r2, r3, t2, u2, x2, s1, s2, s3
    vshr.u32 \t, \x, #\r1
    vshr.u32 \t2, \x2, #\s1
    vshr.u32 \u, \x, #\r2
    vshr.u32 \u2, \x2, #\s2
    vsli.32 \t, \x, #(32-\r1)
    vsli.32 \t2, \x2, #(32-\s1)
    vsli.32 \u, \x, #(32-\r2)
    vsli.32 \u2, \x2, #(32-\s2)
    veor \t, \t, \u
    veor \t2, \t2, \u2
    vshr.u32 \u, \x, #\r3
    vshr.u32 \u2, \x2, #\s3
    vsli.32 \u, \x, #(32-\r3)
    vsli.32 \u2, \x2, #(32-\s3)
    veor \t, \t, \u
    veor \t2, \t2, \u2
    .endm

    @ Round \i of \block on the state \a..\h, with q15 = h + W + K: h becomes T1 and
    @ then the new a, d the new e. With \e_only, only the new e (the second hash's rounds
    @ 57..60). Σ1(e) and Σ0(a), Ch and Maj are computed side by side, as they are
    @ independent. Ch(e, f, g) is f where e is set, g elsewhere: a `vbit` into g, whose
    @ only later use, as the next round's h, is folded first into the next q15 (which
    @ saves Ch a copy); the last round keeps g, which the first hash's result needs.
    @ Maj(a, b, c) is c where a and b differ, b where they agree.
    .macro mm_round a, b, c, d, e, f, g, h, block, i, last, e_only
    .if (\i) < (\last)
    mm_input \block, (\i)+1, \last
    .endif
    .if \e_only
    mm_sigma q9, q10, \e, 6, 11, 25, 0
    .else
    mm_sigma2 q9, q10, \e, 6, 11, 25, q11, q12, \a, 2, 13, 22
    veor q10, \a, \b
    vbsl q10, \c, \b
    .endif
    vadd.i32 \h, q15, q9
    .if (\i) < (\last)
    vadd.i32 q15, \g, q8
    vbit \g, \f, \e
    vadd.i32 \h, \h, \g
    .else
    vmov q9, \e
    vbsl q9, \f, \g
    vadd.i32 \h, \h, q9
    .endif
    vadd.i32 \d, \d, \h
    .if \e_only == 0
    vadd.i32 q11, q11, q10
    vadd.i32 \h, \h, q11
    .endif
    .endm

    @ The round with the state in the registers it has after \r rounds of this hash.
    .macro mm_rotated r, block, i, last, e_only
    .if ((\r)&7) == 0
    mm_round q0, q1, q2, q3, q4, q5, q6, q7, \block, \i, \last, \e_only
    .elseif ((\r)&7) == 1
    mm_round q7, q0, q1, q2, q3, q4, q5, q6, \block, \i, \last, \e_only
    .elseif ((\r)&7) == 2
    mm_round q6, q7, q0, q1, q2, q3, q4, q5, \block, \i, \last, \e_only
    .elseif ((\r)&7) == 3
    mm_round q5, q6, q7, q0, q1, q2, q3, q4, \block, \i, \last, \e_only
    .elseif ((\r)&7) == 4
    mm_round q4, q5, q6, q7, q0, q1, q2, q3, \block, \i, \last, \e_only
    .elseif ((\r)&7) == 5
    mm_round q3, q4, q5, q6, q7, q0, q1, q2, \block, \i, \last, \e_only
    .elseif ((\r)&7) == 6
    mm_round q2, q3, q4, q5, q6, q7, q0, q1, \block, \i, \last, \e_only
    .else
    mm_round q1, q2, q3, q4, q5, q6, q7, q0, \block, \i, \last, \e_only
    .endif
    .endm

    .globl micromine_neon_armv7_hash4
    .hidden micromine_neon_armv7_hash4
    .type micromine_neon_armv7_hash4, %function
    .p2align 4
micromine_neon_armv7_hash4:
    push {{r4-r11, lr}}
    vpush {{d8-d15}}
    mov r11, sp
    sub r12, sp, #1024
    bic r12, r12, #15
    mov sp, r12
    mov r10, #16
    cmp r3, #0
    beq 2f
1:
    .set .Lmm_at_r6, -1
    .set .Lmm_at_r7, -1
    .set .Lmm_at_r8, -1
    .set .Lmm_at_r9, -1
    add r4, r0, #400
    add r5, r0, #2336

    @ First hash, second block. W3 is the nonce's bytes read big-endian; round 3 added
    @ it to a and e only.
    add r12, r0, #384
    vld1.32 {{q9}}, [r12 :128]
    vdup.32 q8, r1
    vadd.i32 q8, q8, q9
    vrev32.8 q8, q8
    @ The vldmia loads are of splats only, whose lanes are equal in either byte order.
    vldmia r0, {{d0-d15}}
    vadd.i32 q0, q0, q8
    vadd.i32 q4, q4, q8
    mm_store q8, 3, r9
    mm_input 1, 4, 63
    vadd.i32 q15, q7, q8
    .set .Lmm_i, 4
    .rept 60
    mm_rotated (.Lmm_i-4), 1, .Lmm_i, 63, 0
    .set .Lmm_i, .Lmm_i+1
    .endr

    @ Second hash: words 0..7 are the midstate plus the state, which after 60 rounds
    @ has a in q4, b in q5, and so on round to h in q3.
    add r12, r0, #128
    vldmia r12, {{d16-d31}}
    vadd.i32 q8, q8, q4
    vadd.i32 q9, q9, q5
    vadd.i32 q10, q10, q6
    vadd.i32 q11, q11, q7
    vadd.i32 q12, q12, q0
    vadd.i32 q13, q13, q1
    vadd.i32 q14, q14, q2
    vadd.i32 q15, q15, q3
    @ (vst1.32 rather than one vstmia: it stores lane by lane whatever the byte order.)
    mov r12, sp
    vst1.32 {{d16-d19}}, [r12 :128]!
    vst1.32 {{d20-d23}}, [r12 :128]!
    vst1.32 {{d24-d27}}, [r12 :128]!
    vst1.32 {{d28-d31}}, [r12 :128]
    add r12, r0, #256
    vldmia r12, {{d0-d15}}
    mm_input 2, 0, 60
    vadd.i32 q15, q7, q8
    .set .Lmm_i, 0
    .rept 57
    mm_rotated .Lmm_i, 2, .Lmm_i, 60, 0
    .set .Lmm_i, .Lmm_i+1
    .endr
    .rept 4
    mm_rotated .Lmm_i, 2, .Lmm_i, 60, 1
    .set .Lmm_i, .Lmm_i+1
    .endr

    @ After 61 rounds e is in q7: the last digest word is e + IV[7].
    add r12, r0, #368
    vld1.32 {{q8}}, [r12 :128]
    vadd.i32 q7, q7, q8
    vst1.32 {{q7}}, [r2]!
    add r1, r1, #4
    subs r3, r3, #1
    bne 1b
2:
    mov sp, r11
    vpop {{d8-d15}}
    pop {{r4-r11, pc}}
    .size micromine_neon_armv7_hash4, .-micromine_neon_armv7_hash4

    .purgem mm_varies
    .purgem mm_sigma
    .purgem mm_sigma2
    .purgem mm_point
    .purgem mm_load
    .purgem mm_load2
    .purgem mm_store
    .purgem mm_word
    .purgem mm_input
    .purgem mm_round
    .purgem mm_rotated
"#
);
