//! A minimal unsigned 256-bit integer: just what targets and hashes need.

use std::cmp::Ordering;
use std::fmt;

/// An unsigned 256-bit integer stored as four little-endian 64-bit limbs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct U256(pub [u64; 4]);

impl U256 {
    /// Zero.
    pub const ZERO: U256 = U256([0; 4]);
    /// 2^256 - 1.
    pub const MAX: U256 = U256([u64::MAX; 4]);

    /// Reads 32 bytes as a little-endian integer (how Bitcoin reads a hash).
    pub fn from_le_bytes(bytes: [u8; 32]) -> U256 {
        let mut limbs = [0u64; 4];
        for (i, limb) in limbs.iter_mut().enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            *limb = u64::from_le_bytes(word);
        }
        U256(limbs)
    }

    /// The 32 little-endian bytes of this integer (the wire form of a target).
    pub fn to_le_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, limb) in self.0.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&limb.to_le_bytes());
        }
        out
    }

    /// Reads 32 big-endian bytes (the printed form).
    pub fn from_be_bytes(mut bytes: [u8; 32]) -> U256 {
        bytes.reverse();
        U256::from_le_bytes(bytes)
    }

    /// The 32 big-endian bytes (the printed form).
    pub fn to_be_bytes(self) -> [u8; 32] {
        let mut out = self.to_le_bytes();
        out.reverse();
        out
    }

    /// Parses 64 hex digits in big-endian (display) order.
    pub fn from_be_hex(hex_str: &str) -> Option<U256> {
        let bytes: [u8; 32] = hex::decode(hex_str).ok()?.try_into().ok()?;
        Some(U256::from_be_bytes(bytes))
    }

    /// 64 hex digits in big-endian (display) order.
    pub fn to_be_hex(self) -> String {
        hex::encode(self.to_be_bytes())
    }

    /// Number of significant bits (0 for zero).
    pub fn bits(self) -> u32 {
        for i in (0..4).rev() {
            if self.0[i] != 0 {
                return 64 * i as u32 + (64 - self.0[i].leading_zeros());
            }
        }
        0
    }

    /// Shift left, dropping bits shifted past bit 255.
    pub fn shifted_left(self, shift: u32) -> U256 {
        if shift >= 256 {
            return U256::ZERO;
        }
        let limb_shift = (shift / 64) as usize;
        let bit_shift = shift % 64;
        let mut out = [0u64; 4];
        for i in (limb_shift..4).rev() {
            let src = i - limb_shift;
            out[i] = self.0[src] << bit_shift;
            if bit_shift > 0 && src > 0 {
                out[i] |= self.0[src - 1] >> (64 - bit_shift);
            }
        }
        U256(out)
    }

    /// Logical shift right.
    pub fn shifted_right(self, shift: u32) -> U256 {
        if shift >= 256 {
            return U256::ZERO;
        }
        let limb_shift = (shift / 64) as usize;
        let bit_shift = shift % 64;
        let mut out = [0u64; 4];
        for (i, slot) in out.iter_mut().enumerate().take(4 - limb_shift) {
            let src = i + limb_shift;
            *slot = self.0[src] >> bit_shift;
            if bit_shift > 0 && src + 1 < 4 {
                *slot |= self.0[src + 1] << (64 - bit_shift);
            }
        }
        U256(out)
    }

    /// The nearest `f64` (rounding toward zero below the 53-bit mantissa).
    pub fn to_f64(self) -> f64 {
        let bits = self.bits();
        if bits <= 64 {
            return self.0[0] as f64;
        }
        // Keep the top 64 bits and scale; the dropped bits are far below f64 precision.
        let shift = bits - 64;
        let top = self.shifted_right(shift).0[0] as f64;
        top * 2f64.powi(shift as i32)
    }

    /// `floor(value)` for a finite, non-negative `value`, saturating at [`U256::MAX`].
    pub fn from_f64(value: f64) -> U256 {
        if value.is_nan() || value < 1.0 {
            return U256::ZERO;
        }
        if value >= 2f64.powi(256) {
            return U256::MAX;
        }
        let raw = value.to_bits();
        let exponent = ((raw >> 52) & 0x7ff) as i32 - 1075;
        let mantissa = (raw & ((1u64 << 52) - 1)) | (1u64 << 52);
        let m = U256([mantissa, 0, 0, 0]);
        if exponent >= 0 {
            m.shifted_left(exponent as u32)
        } else {
            m.shifted_right((-exponent) as u32)
        }
    }

    /// The top 32 bits of the 256 (bits 224..256), for a quick first comparison.
    pub fn top_u32(self) -> u32 {
        (self.0[3] >> 32) as u32
    }
}

impl Ord for U256 {
    fn cmp(&self, other: &Self) -> Ordering {
        for i in (0..4).rev() {
            match self.0[i].cmp(&other.0[i]) {
                Ordering::Equal => continue,
                unequal => return unequal,
            }
        }
        Ordering::Equal
    }
}

impl PartialOrd for U256 {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for U256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "U256(0x{})", self.to_be_hex())
    }
}

impl fmt::Display for U256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_be_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_u256() -> impl Strategy<Value = U256> {
        any::<[u64; 4]>().prop_map(U256)
    }

    #[test]
    fn byte_orders_round_trip() {
        let mut le = [0u8; 32];
        le[0] = 1;
        le[31] = 0xab;
        let v = U256::from_le_bytes(le);
        assert_eq!(v.0[0], 1);
        assert_eq!(v.0[3], 0xab << 56);
        assert_eq!(v.to_le_bytes(), le);
        assert_eq!(U256::from_be_hex(&v.to_be_hex()), Some(v));
        assert_eq!(v.bits(), 256);
        assert_eq!(U256::ZERO.bits(), 0);
    }

    #[test]
    fn from_be_hex_rejects_bad_input() {
        assert_eq!(U256::from_be_hex("zz"), None);
        assert_eq!(U256::from_be_hex("00"), None);
    }

    #[test]
    fn f64_conversion_is_exact_for_representable_values() {
        assert_eq!(U256::from_f64(0.5), U256::ZERO);
        assert_eq!(U256::from_f64(1.0), U256([1, 0, 0, 0]));
        assert_eq!(
            U256::from_f64(2f64.powi(200)),
            U256([1, 0, 0, 0]).shifted_left(200)
        );
        assert_eq!(U256::from_f64(f64::INFINITY), U256::MAX);
        assert_eq!(
            U256([1, 0, 0, 0]).shifted_left(200).to_f64(),
            2f64.powi(200)
        );
    }

    proptest! {
        #[test]
        fn shifts_are_inverse_when_no_bits_fall_off(v in arb_u256(), s in 0u32..256) {
            let shifted_back = v.shifted_right(s).shifted_left(s);
            // shr then shl clears exactly the low `s` bits.
            prop_assert!(shifted_back <= v);
            prop_assert_eq!(v.shifted_left(256 - v.bits().max(1)).shifted_right(256 - v.bits().max(1)), v);
        }

        #[test]
        fn ordering_matches_big_endian_bytes(a in arb_u256(), b in arb_u256()) {
            prop_assert_eq!(a.cmp(&b), a.to_be_bytes().cmp(&b.to_be_bytes()));
        }

        #[test]
        fn f64_round_trip_keeps_53_bits(v in arb_u256()) {
            let back = U256::from_f64(v.to_f64());
            let diff = if back > v { back.to_f64() - v.to_f64() } else { v.to_f64() - back.to_f64() };
            prop_assert!(diff <= v.to_f64() * 2f64.powi(-52));
        }
    }
}
