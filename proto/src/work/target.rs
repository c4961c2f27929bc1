//! Share and block targets, their fractional difficulty, and Bitcoin's compact `nBits`.

use super::U256;

/// Bitcoin's difficulty-1 target, `0x00000000ffff0000…` (display order).
pub const DIFFICULTY_1_TARGET: U256 = U256([0, 0, 0, 0x0000_0000_ffff_0000]);

/// A problem building a [`Target`] from outside input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TargetError {
    /// Difficulty must be a finite number above zero.
    #[error("difficulty {0} is not a finite number above zero")]
    InvalidDifficulty(f64),
    /// The compact form has its sign bit set.
    #[error("compact target {0:#010x} is negative")]
    NegativeCompact(u32),
    /// The compact form encodes a number wider than 256 bits.
    #[error("compact target {0:#010x} overflows 256 bits")]
    OverflowingCompact(u32),
    /// A target is zero: no hash could ever meet it.
    #[error("target is zero")]
    Zero,
}

/// A 256-bit target: a hash meets it when `hash <= target`.
///
/// Difficulty is `DIFFICULTY_1_TARGET / target` as a real number, so difficulties far below
/// 1 (the targets a 50 kH/s device needs) are as representable as large ones.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Target(U256);

impl Target {
    /// The easiest possible target: every hash meets it.
    pub const MAX: Target = Target(U256::MAX);

    /// Wraps a raw integer. Zero is refused because nothing could meet it.
    pub fn from_u256(value: U256) -> Result<Target, TargetError> {
        if value == U256::ZERO {
            return Err(TargetError::Zero);
        }
        Ok(Target(value))
    }

    /// The raw integer.
    pub fn as_u256(self) -> U256 {
        self.0
    }

    /// The target for a difficulty, `floor(DIFFICULTY_1_TARGET / difficulty)`, saturating
    /// at [`Target::MAX`] for difficulties below about 2^-32.
    pub fn from_difficulty(difficulty: f64) -> Result<Target, TargetError> {
        if !difficulty.is_finite() || difficulty <= 0.0 {
            return Err(TargetError::InvalidDifficulty(difficulty));
        }
        // 0xffff * 2^208 is exact in f64, and one division keeps the relative error at the
        // f64 epsilon, which is far below anything vardiff can notice.
        let value = DIFFICULTY_1_TARGET.to_f64() / difficulty;
        let raw = U256::from_f64(value);
        Ok(Target(if raw == U256::ZERO {
            U256([1, 0, 0, 0])
        } else {
            raw
        }))
    }

    /// `DIFFICULTY_1_TARGET / target` as a real number.
    pub fn difficulty(self) -> f64 {
        DIFFICULTY_1_TARGET.to_f64() / self.0.to_f64()
    }

    /// Expected number of hashes to find one hash meeting this target: `2^256 / (target+1)`.
    pub fn expected_hashes(self) -> f64 {
        2f64.powi(256) / (self.0.to_f64() + 1.0)
    }

    /// Decodes Bitcoin's compact `nBits` form.
    pub fn from_compact(bits: u32) -> Result<Target, TargetError> {
        let size = bits >> 24;
        let word = bits & 0x007f_ffff;
        if word != 0 && bits & 0x0080_0000 != 0 {
            return Err(TargetError::NegativeCompact(bits));
        }
        if word != 0 && (size > 34 || (word > 0xff && size > 33) || (word > 0xffff && size > 32)) {
            return Err(TargetError::OverflowingCompact(bits));
        }
        let w = U256([u64::from(word), 0, 0, 0]);
        let value = if size <= 3 {
            w.shifted_right(8 * (3 - size))
        } else {
            w.shifted_left(8 * (size - 3))
        };
        Target::from_u256(value)
    }

    /// Encodes to Bitcoin's compact `nBits` form (lossy: keeps the top 23 bits).
    pub fn to_compact(self) -> u32 {
        let mut size = self.0.bits().div_ceil(8);
        let mut compact = if size <= 3 {
            (self.0.0[0] << (8 * (3 - size))) as u32
        } else {
            self.0.shifted_right(8 * (size - 3)).0[0] as u32
        };
        if compact & 0x0080_0000 != 0 {
            compact >>= 8;
            size += 1;
        }
        compact | (size << 24)
    }

    /// Whether a sha256d output (as computed, i.e. little-endian integer bytes) meets this.
    pub fn is_met_by(self, hash: &[u8; 32]) -> bool {
        U256::from_le_bytes(*hash) <= self.0
    }

    /// The wire form: 32 little-endian bytes.
    pub fn to_le_bytes(self) -> [u8; 32] {
        self.0.to_le_bytes()
    }

    /// Reads the wire form; `None` when it is not exactly 32 bytes or is zero.
    pub fn from_le_slice(bytes: &[u8]) -> Option<Target> {
        let array: [u8; 32] = bytes.try_into().ok()?;
        Target::from_u256(U256::from_le_bytes(array)).ok()
    }

    /// The harder (numerically smaller) of two targets.
    pub fn harder(self, other: Target) -> Target {
        if self.0 <= other.0 { self } else { other }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn difficulty_one_is_bitcoins() {
        assert_eq!(
            DIFFICULTY_1_TARGET.to_be_hex(),
            "00000000ffff0000000000000000000000000000000000000000000000000000"
        );
        let t = Target::from_difficulty(1.0).expect("valid");
        assert_eq!(t.as_u256(), DIFFICULTY_1_TARGET);
        assert_eq!(t.difficulty(), 1.0);
        assert_eq!(t.to_compact(), 0x1d00ffff);
    }

    #[test]
    fn tiny_difficulties_make_easy_targets() {
        // A 50 kH/s device wanting a share every 5 s needs difficulty ~5.8e-5.
        let t = Target::from_difficulty(5.8e-5).expect("valid");
        assert!(t.as_u256() > DIFFICULTY_1_TARGET);
        assert!((t.difficulty() / 5.8e-5 - 1.0).abs() < 1e-12);
        assert!((t.expected_hashes() / (5.8e-5 * 2f64.powi(32)) - 1.0).abs() < 1e-3);
        assert_eq!(Target::from_difficulty(1e-30).expect("valid"), Target::MAX);
    }

    #[test]
    fn bad_difficulties_are_refused() {
        for d in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Target::from_difficulty(d).is_err(), "{d}");
        }
    }

    #[test]
    fn compact_edge_cases() {
        assert_eq!(Target::from_compact(0x0180_0000), Err(TargetError::Zero));
        assert_eq!(
            Target::from_compact(0x0480_0001),
            Err(TargetError::NegativeCompact(0x0480_0001))
        );
        assert_eq!(
            Target::from_compact(0x2301_0000),
            Err(TargetError::OverflowingCompact(0x2301_0000))
        );
        let small = Target::from_compact(0x0312_3456).expect("valid");
        assert_eq!(small.as_u256(), U256([0x12_3456, 0, 0, 0]));
        assert_eq!(small.to_compact(), 0x0312_3456);
        // A mantissa with its top bit set is moved one byte up, as Bitcoin Core does.
        let t = Target::from_u256(U256([0x80, 0, 0, 0])).expect("nonzero");
        assert_eq!(t.to_compact(), 0x0200_8000);
    }

    #[test]
    fn wire_form_is_checked() {
        assert_eq!(Target::from_le_slice(&[0u8; 31]), None);
        assert_eq!(Target::from_le_slice(&[0u8; 32]), None);
        let t = Target::from_difficulty(3.5).expect("valid");
        assert_eq!(Target::from_le_slice(&t.to_le_bytes()), Some(t));
    }

    proptest! {
        #[test]
        fn difficulty_round_trips(exp in -9.5f64..15.0, mantissa in 1.0f64..10.0) {
            let d = mantissa * 10f64.powf(exp);
            let t = Target::from_difficulty(d).expect("valid");
            prop_assert!((t.difficulty() / d - 1.0).abs() < 1e-12, "d={} got={}", d, t.difficulty());
        }

        #[test]
        fn harder_difficulty_means_smaller_target(a in 1e-9f64..1e12, factor in 1.0001f64..1e3) {
            let easy = Target::from_difficulty(a).expect("valid");
            let hard = Target::from_difficulty(a * factor).expect("valid");
            prop_assert!(hard < easy);
            prop_assert_eq!(easy.harder(hard), hard);
        }

        #[test]
        fn compact_round_trips_on_canonical_values(size in 3u32..=32, word in 0x01_0000u32..0x7f_ffff) {
            let bits = (size << 24) | word;
            let t = Target::from_compact(bits).expect("valid");
            prop_assert_eq!(t.to_compact(), bits);
        }
    }
}
