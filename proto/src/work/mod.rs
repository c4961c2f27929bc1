//! Proof-of-work math shared by controller and agent.
//!
//! Conventions follow Bitcoin: the header is 80 bytes with the nonce in the last four
//! (little-endian); a hash is the sha256d of the header, read as a little-endian 256-bit
//! integer; it "meets" a target when it is less than or equal to it. Hashes and targets
//! are *printed* big-endian, as block explorers do.

mod header;
mod merkle;
mod target;
mod u256;

pub use header::{
    BlockHeader, HEADER_LEN, HEADER_PREFIX_LEN, HeaderError, Midstate, SHA256_IV,
    finish_second_hash, hash_display_hex, header_with_nonce, sha256d,
};
pub use merkle::{merkle_branch, merkle_root, merkle_root_from_branch};
pub use target::{DIFFICULTY_1_TARGET, Target, TargetError};
pub use u256::U256;
