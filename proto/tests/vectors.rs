//! The work math against real Bitcoin blocks (`tests/vectors/blocks.json`, copied from the
//! project's verified vectors).

use micromine_proto::work::{
    BlockHeader, DIFFICULTY_1_TARGET, Midstate, Target, U256, hash_display_hex, merkle_root,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    difficulty_1_target_hex: String,
    blocks: Vec<Block>,
    merkle_example: MerkleExample,
}

#[derive(Deserialize)]
struct Block {
    name: String,
    version: i32,
    prev_hash: String,
    merkle_root: String,
    time: u32,
    bits: String,
    nonce: u32,
    header_hex: String,
    hash: String,
    target_hex: String,
    difficulty: f64,
}

#[derive(Deserialize)]
struct MerkleExample {
    txids: Vec<String>,
    merkle_root: String,
}

fn vectors() -> Vectors {
    let text = include_str!("vectors/blocks.json");
    serde_json::from_str(text).expect("vectors parse")
}

fn internal_order(display_hex: &str) -> [u8; 32] {
    let mut bytes: [u8; 32] = hex::decode(display_hex)
        .expect("hex")
        .try_into()
        .expect("32 bytes");
    bytes.reverse();
    bytes
}

#[test]
fn difficulty_one_target_matches_vectors() {
    let v = vectors();
    assert_eq!(DIFFICULTY_1_TARGET.to_be_hex(), v.difficulty_1_target_hex);
}

#[test]
fn headers_serialise_and_hash_like_bitcoin() {
    for block in vectors().blocks {
        let header = BlockHeader {
            version: block.version,
            prev_hash: internal_order(&block.prev_hash),
            merkle_root: internal_order(&block.merkle_root),
            time: block.time,
            bits: u32::from_str_radix(&block.bits, 16).expect("bits hex"),
            nonce: block.nonce,
        };
        let bytes = header.to_bytes();
        assert_eq!(hex::encode(bytes), block.header_hex, "{}", block.name);
        assert_eq!(
            BlockHeader::from_bytes(&bytes).expect("80 bytes"),
            header,
            "{}",
            block.name
        );

        let hash = header.hash();
        assert_eq!(hash_display_hex(&hash), block.hash, "{}", block.name);

        let prefix: [u8; 76] = bytes[..76].try_into().expect("76 bytes");
        assert_eq!(
            Midstate::new(&prefix).hash(block.nonce),
            hash,
            "{}",
            block.name
        );

        let target = Target::from_compact(header.bits).expect("valid bits");
        assert_eq!(
            target.as_u256().to_be_hex(),
            block.target_hex,
            "{}",
            block.name
        );
        assert_eq!(target.to_compact(), header.bits, "{}", block.name);
        assert!(
            target.is_met_by(&hash),
            "{} must meet its own target",
            block.name
        );
        assert!(
            (target.difficulty() / block.difficulty - 1.0).abs() < 1e-12,
            "{}: {} vs {}",
            block.name,
            target.difficulty(),
            block.difficulty
        );

        // One nonce off, the header no longer meets the network target.
        let other = Midstate::new(&prefix).hash(block.nonce.wrapping_add(1));
        assert!(!target.is_met_by(&other), "{}", block.name);
        assert!(U256::from_le_bytes(other) > target.as_u256());
    }
}

#[test]
fn merkle_root_of_block_100000() {
    let v = vectors().merkle_example;
    let txids: Vec<[u8; 32]> = v.txids.iter().map(|t| internal_order(t)).collect();
    let root = merkle_root(&txids).expect("non-empty");
    assert_eq!(hash_display_hex(&root), v.merkle_root);
}
