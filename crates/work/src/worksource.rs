//! Where block headers come from.
//!
//! The builtin source makes synthetic block templates that are mined with real sha256d
//! work: each header has its own merkle root (from a synthetic coinbase carrying an
//! extranonce), the network target is set from the MicroMiner's `networkDifficulty`, and a
//! share that meets it is a found block, which rolls the template to a new chain tip,
//! exactly as a real chain would make all outstanding work stale.

use micromine_proto::work::{BlockHeader, HEADER_PREFIX_LEN, Target, merkle_root, sha256d};
use serde::{Deserialize, Serialize};

use crate::scheduler::HeaderId;

/// One header prefix that devices scan nonces of.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkHeader {
    /// Unique id (never reused).
    pub id: HeaderId,
    /// The MicroMiner it belongs to.
    pub miner: String,
    /// The template (job) it was built from; headers of older jobs are stale.
    pub job: u64,
    /// The 76 bytes before the nonce.
    #[serde(with = "hex_prefix")]
    pub prefix: [u8; HEADER_PREFIX_LEN],
    /// The block target (from the header's `bits`).
    pub network_bits: u32,
    /// What a pool needs to accept shares of this header; `None` for builtin work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamWork>,
}

/// The pool's side of a header built from a Stratum job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpstreamWork {
    /// The pool session (extranonce1) it was built for.
    pub session: u64,
    /// The pool's job id.
    pub job_id: String,
    /// The controller's extranonce2, hex.
    pub extranonce2: String,
    /// The header's time.
    pub ntime: u32,
    /// Rolled version bits, when the pool allows version rolling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_bits: Option<u32>,
    /// The pool difficulty when the header was built.
    pub difficulty: f64,
}

impl WorkHeader {
    /// The network target from the header's compact bits.
    pub fn network_target(&self) -> Target {
        Target::from_compact(self.network_bits).unwrap_or(Target::MAX)
    }
}

mod hex_prefix {
    use super::HEADER_PREFIX_LEN;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        bytes: &[u8; HEADER_PREFIX_LEN],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<[u8; HEADER_PREFIX_LEN], D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(&text)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("header prefix must be 76 bytes of hex"))
    }
}

/// The builtin chain's tip, persisted so a restart continues the same chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainTip {
    /// The current job id.
    pub job: u64,
    /// Height of the block being mined.
    pub height: u64,
    /// Hash of the previous block (internal byte order, hex).
    pub prev_hash: String,
    /// Template time, Unix seconds.
    pub time: u32,
    /// Next extranonce to use in this job.
    pub next_extranonce: u64,
}

/// Synthetic templates for one MicroMiner.
#[derive(Debug, Clone)]
pub struct BuiltinSource {
    miner: String,
    bits: u32,
    tip: ChainTip,
}

impl BuiltinSource {
    /// A source continuing from `tip` (after a restart) or starting a new chain at `job`.
    pub fn new(
        miner: &str,
        network_difficulty: f64,
        tip: Option<ChainTip>,
        job: u64,
        now_unix: u32,
    ) -> BuiltinSource {
        let tip = tip.unwrap_or_else(|| ChainTip {
            job,
            height: 1,
            prev_hash: hex::encode(sha256d(miner.as_bytes())),
            time: now_unix,
            next_extranonce: 0,
        });
        BuiltinSource {
            miner: miner.to_string(),
            bits: bits_for(network_difficulty),
            tip,
        }
    }

    /// The current job id.
    pub fn job(&self) -> u64 {
        self.tip.job
    }

    /// The tip to persist.
    pub fn tip(&self) -> &ChainTip {
        &self.tip
    }

    /// The network target of new headers.
    pub fn network_target(&self) -> Target {
        Target::from_compact(self.bits).unwrap_or(Target::MAX)
    }

    /// Whether a new network difficulty changes the target (and so needs a new job).
    pub fn difficulty_changes(&self, network_difficulty: f64) -> bool {
        bits_for(network_difficulty) != self.bits
    }

    /// The next header of the current job: a fresh extranonce gives a fresh merkle root,
    /// hence a fresh 2^32 nonce space.
    pub fn next_header(&mut self, id: HeaderId) -> WorkHeader {
        let extranonce = self.tip.next_extranonce;
        self.tip.next_extranonce += 1;
        let mut coinbase = Vec::with_capacity(self.miner.len() + 24);
        coinbase.extend_from_slice(self.miner.as_bytes());
        coinbase.extend_from_slice(&self.tip.height.to_le_bytes());
        coinbase.extend_from_slice(&self.tip.job.to_le_bytes());
        coinbase.extend_from_slice(&extranonce.to_le_bytes());
        let coinbase_txid = sha256d(&coinbase);
        let merkle = merkle_root(&[coinbase_txid]).unwrap_or(coinbase_txid);
        let mut prev_hash = [0u8; 32];
        if let Ok(bytes) = hex::decode(&self.tip.prev_hash)
            && bytes.len() == 32
        {
            prev_hash.copy_from_slice(&bytes);
        }
        let header = BlockHeader {
            version: 0x2000_0000,
            prev_hash,
            merkle_root: merkle,
            time: self.tip.time,
            bits: self.bits,
            nonce: 0,
        };
        WorkHeader {
            id,
            miner: self.miner.clone(),
            job: self.tip.job,
            prefix: header.prefix(),
            network_bits: self.bits,
            upstream: None,
        }
    }

    /// A block was found on `header`: the chain moves on and every older job is stale.
    pub fn block_found(&mut self, block_hash: [u8; 32], new_job: u64, now_unix: u32) {
        self.tip = ChainTip {
            job: new_job,
            height: self.tip.height + 1,
            prev_hash: hex::encode(block_hash),
            time: now_unix.max(self.tip.time + 1),
            next_extranonce: 0,
        };
    }

    /// A new network difficulty: a new job on the same tip.
    pub fn set_difficulty(&mut self, network_difficulty: f64, new_job: u64) {
        self.bits = bits_for(network_difficulty);
        self.tip.job = new_job;
        self.tip.next_extranonce = 0;
    }
}

fn bits_for(network_difficulty: f64) -> u32 {
    Target::from_difficulty(network_difficulty)
        .unwrap_or(Target::MAX)
        .to_compact()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_differ_and_carry_the_network_target() {
        let mut source = BuiltinSource::new("default/a", 0.05, None, 1, 1_700_000_000);
        let h1 = source.next_header(10);
        let h2 = source.next_header(11);
        assert_ne!(h1.prefix, h2.prefix);
        assert_eq!(h1.job, 1);
        let target = h1.network_target();
        assert!((target.difficulty() / 0.05 - 1.0).abs() < 1e-4);
        let header =
            BlockHeader::from_bytes(&micromine_proto::work::header_with_nonce(&h1.prefix, 0))
                .expect("80 bytes");
        assert_eq!(header.bits, h1.network_bits);
        assert_eq!(header.time, 1_700_000_000);
    }

    #[test]
    fn a_found_block_moves_the_tip() {
        let mut source = BuiltinSource::new("default/a", 1.0, None, 1, 100);
        let before = source.next_header(1);
        source.block_found([9u8; 32], 2, 100);
        let after = source.next_header(2);
        assert_eq!(source.tip().height, 2);
        assert_eq!(after.job, 2);
        assert_eq!(&after.prefix[4..36], &[9u8; 32]);
        assert_ne!(before.prefix, after.prefix);
        // Restart: continuing from the persisted tip gives the same next header.
        let mut restarted =
            BuiltinSource::new("default/a", 1.0, Some(source.tip().clone()), 99, 500);
        assert_eq!(
            restarted.next_header(3).prefix,
            source.next_header(3).prefix
        );
    }

    #[test]
    fn serialises_with_hex_prefix() {
        let mut source = BuiltinSource::new("default/a", 1.0, None, 1, 100);
        let h = source.next_header(5);
        let json = serde_json::to_string(&h).expect("serialises");
        assert_eq!(
            serde_json::from_str::<WorkHeader>(&json).expect("parses"),
            h
        );
        assert!(
            serde_json::from_str::<WorkHeader>(&json.replace(&hex::encode(h.prefix), "00"))
                .is_err()
        );
    }
}
