//! The 80-byte block header, sha256d, and the SHA-256 midstate that makes scanning nonces
//! cheap.

use sha2::block_api::compress256;
use sha2::{Digest, Sha256};

/// Length of a serialised block header.
pub const HEADER_LEN: usize = 80;
/// The part of the header that is fixed during one assignment: everything but the nonce.
pub const HEADER_PREFIX_LEN: usize = 76;

/// SHA-256 initial state (FIPS 180-4, 5.3.3): where every hash, and so every engine's
/// second compression, starts.
pub const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// A problem with a serialised header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The bytes are not the expected length.
    #[error("header must be {expected} bytes, got {got}")]
    WrongLength {
        /// Required length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
}

/// A Bitcoin block header. Hashes are stored in their internal (little-endian) byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// Block version (with any version-rolling bits).
    pub version: i32,
    /// Hash of the previous block, internal byte order.
    pub prev_hash: [u8; 32],
    /// Merkle root of the block's transactions, internal byte order.
    pub merkle_root: [u8; 32],
    /// Block time, Unix seconds.
    pub time: u32,
    /// The network target in compact form.
    pub bits: u32,
    /// The nonce.
    pub nonce: u32,
}

impl BlockHeader {
    /// The 80 serialised bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..HEADER_PREFIX_LEN].copy_from_slice(&self.prefix());
        out[76..80].copy_from_slice(&self.nonce.to_le_bytes());
        out
    }

    /// The first 76 bytes: the header without its nonce.
    pub fn prefix(&self) -> [u8; HEADER_PREFIX_LEN] {
        let mut out = [0u8; HEADER_PREFIX_LEN];
        out[0..4].copy_from_slice(&self.version.to_le_bytes());
        out[4..36].copy_from_slice(&self.prev_hash);
        out[36..68].copy_from_slice(&self.merkle_root);
        out[68..72].copy_from_slice(&self.time.to_le_bytes());
        out[72..76].copy_from_slice(&self.bits.to_le_bytes());
        out
    }

    /// Parses 80 serialised bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<BlockHeader, HeaderError> {
        if bytes.len() != HEADER_LEN {
            return Err(HeaderError::WrongLength {
                expected: HEADER_LEN,
                got: bytes.len(),
            });
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let mut prev_hash = [0u8; 32];
        prev_hash.copy_from_slice(&bytes[4..36]);
        let mut merkle_root = [0u8; 32];
        merkle_root.copy_from_slice(&bytes[36..68]);
        Ok(BlockHeader {
            version: u32_at(0) as i32,
            prev_hash,
            merkle_root,
            time: u32_at(68),
            bits: u32_at(72),
            nonce: u32_at(76),
        })
    }

    /// sha256d of the serialised header.
    pub fn hash(&self) -> [u8; 32] {
        sha256d(&self.to_bytes())
    }
}

/// SHA-256 applied twice, Bitcoin's hash.
pub fn sha256d(data: &[u8]) -> [u8; 32] {
    let first = Sha256::digest(data);
    Sha256::digest(first).into()
}

/// A hash in display order (byte-reversed hex), as block explorers print it.
pub fn hash_display_hex(hash: &[u8; 32]) -> String {
    let mut reversed = *hash;
    reversed.reverse();
    hex::encode(reversed)
}

/// The full 80-byte header for a 76-byte prefix and a nonce.
pub fn header_with_nonce(prefix: &[u8; HEADER_PREFIX_LEN], nonce: u32) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..HEADER_PREFIX_LEN].copy_from_slice(prefix);
    out[HEADER_PREFIX_LEN..].copy_from_slice(&nonce.to_le_bytes());
    out
}

/// The SHA-256 state after the first 64 header bytes, plus the padded second block.
///
/// The first 64 bytes of a header do not change while the nonce varies, so their
/// compression is done once per assignment. Each nonce then costs two compressions: the
/// second block of the first hash and the single block of the second hash.
#[derive(Clone, Debug)]
pub struct Midstate {
    state: [u32; 8],
    /// Bytes 64..80 of the header plus SHA-256 padding for an 80-byte message.
    second_block: [u8; 64],
}

impl Midstate {
    /// Precomputes the midstate of a header prefix.
    pub fn new(prefix: &[u8; HEADER_PREFIX_LEN]) -> Midstate {
        let mut state = SHA256_IV;
        let mut first = [0u8; 64];
        first.copy_from_slice(&prefix[..64]);
        compress256(&mut state, &[first]);
        let mut second_block = [0u8; 64];
        second_block[..12].copy_from_slice(&prefix[64..76]);
        second_block[16] = 0x80;
        // Message length in bits (80 * 8 = 640), big-endian, in the last 8 bytes.
        second_block[56..64].copy_from_slice(&640u64.to_be_bytes());
        Midstate {
            state,
            second_block,
        }
    }

    /// The state after the constant first block.
    pub fn state(&self) -> [u32; 8] {
        self.state
    }

    /// The padded second block with the nonce bytes zeroed.
    pub fn second_block(&self) -> [u8; 64] {
        self.second_block
    }

    /// sha256d of the header with `nonce`; equal to `sha256d(&header_with_nonce(..))`.
    pub fn hash(&self, nonce: u32) -> [u8; 32] {
        let mut block = self.second_block;
        block[12..16].copy_from_slice(&nonce.to_le_bytes());
        let mut state = self.state;
        compress256(&mut state, &[block]);
        finish_second_hash(&state)
    }
}

/// Runs the second SHA-256 over the 32-byte first digest given as its state words.
pub fn finish_second_hash(first: &[u32; 8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    for (i, word) in first.iter().enumerate() {
        block[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
    }
    block[32] = 0x80;
    // Message length 256 bits.
    block[56..64].copy_from_slice(&256u64.to_be_bytes());
    let mut state = SHA256_IV;
    compress256(&mut state, &[block]);
    let mut out = [0u8; 32];
    for (i, word) in state.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sha256d_of_empty_input() {
        // Well-known: sha256d("") = 5df6e0e2761359d30a8275058e299fcc0381534545f55cf43e41983f5d4c9456
        assert_eq!(
            hex::encode(sha256d(b"")),
            "5df6e0e2761359d30a8275058e299fcc0381534545f55cf43e41983f5d4c9456"
        );
    }

    #[test]
    fn header_rejects_wrong_length() {
        assert_eq!(
            BlockHeader::from_bytes(&[0u8; 79]),
            Err(HeaderError::WrongLength {
                expected: 80,
                got: 79
            })
        );
    }

    proptest! {
        #[test]
        fn midstate_equals_plain_double_hash(prefix in proptest::collection::vec(any::<u8>(), 76), nonce in any::<u32>()) {
            let prefix: [u8; 76] = prefix.try_into().expect("76 bytes");
            let midstate = Midstate::new(&prefix);
            prop_assert_eq!(midstate.hash(nonce), sha256d(&header_with_nonce(&prefix, nonce)));
        }

        #[test]
        fn header_round_trips(bytes in proptest::collection::vec(any::<u8>(), 80)) {
            let header = BlockHeader::from_bytes(&bytes).expect("80 bytes");
            prop_assert_eq!(header.to_bytes().to_vec(), bytes);
        }
    }
}
