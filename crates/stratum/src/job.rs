//! A pool's job (`mining.notify`) and the block headers built from it.
//!
//! The pool sends the coinbase transaction in two halves around the extranonces, the
//! merkle branch of the coinbase, and the header fields. The controller fills in
//! `extranonce1` (the pool's, per connection) and `extranonce2` (its own, per header it
//! hands out), so every allocation has its own coinbase, merkle root and 2^32 nonces;
//! devices only ever see the resulting 76-byte header prefix.
//!
//! Encodings are the ones cgminer established and every pool follows: `prevhash` is the
//! hash in header byte order with each 4-byte word byte-reversed; `version`, `nbits` and
//! `ntime` are big-endian hex of the numbers the header stores little-endian; branch hashes
//! are in header byte order.

use micromine_proto::work::{BlockHeader, merkle_root_from_branch, sha256d};

use super::fields::{ProtocolError, hex_field, u32_field};

/// The longest merkle branch accepted: 2^32 transactions per block is beyond any chain.
const MAX_BRANCH: usize = 32;
/// The largest coinbase accepted (both halves), bytes. A block holds at most 4 MB.
const MAX_COINBASE: usize = 100_000;

/// One job as the pool announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolJob {
    /// The pool's job id, echoed in `mining.submit`.
    pub id: String,
    /// Hash of the previous block, header byte order.
    pub prev_hash: [u8; 32],
    /// Coinbase bytes before the extranonces.
    pub coinb1: Vec<u8>,
    /// Coinbase bytes after the extranonces.
    pub coinb2: Vec<u8>,
    /// The coinbase's merkle branch, bottom up.
    pub branch: Vec<[u8; 32]>,
    /// Block version.
    pub version: u32,
    /// Network target, compact form.
    pub bits: u32,
    /// Block time, Unix seconds.
    pub time: u32,
    /// Whether all earlier jobs are void.
    pub clean: bool,
}

impl PoolJob {
    /// Reads `mining.notify` params: `[job_id, prevhash, coinb1, coinb2, branch, version,
    /// nbits, ntime, clean_jobs]`. Errors name the parameter.
    pub fn from_params(params: &serde_json::Value) -> Result<PoolJob, ProtocolError> {
        let method = "mining.notify";
        let params = params
            .as_array()
            .ok_or_else(|| ProtocolError::new(method, "params", "must be an array"))?;
        if params.len() < 9 {
            return Err(ProtocolError::new(
                method,
                "params",
                format!("must have 9 entries, has {}", params.len()),
            ));
        }
        let id = match &params[0] {
            serde_json::Value::String(s) if !s.is_empty() && s.len() <= 128 => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            other => {
                return Err(ProtocolError::new(
                    method,
                    "params[0] (job_id)",
                    format!("must be a non-empty string of at most 128 characters, got {other}"),
                ));
            }
        };
        let swapped: [u8; 32] = hex_field(method, "params[1] (prevhash)", &params[1], Some(32))?
            .try_into()
            .map_err(|_| ProtocolError::new(method, "params[1] (prevhash)", "must be 32 bytes"))?;
        let mut prev_hash = [0u8; 32];
        for (word, out) in swapped.chunks_exact(4).zip(prev_hash.chunks_exact_mut(4)) {
            out.copy_from_slice(&[word[3], word[2], word[1], word[0]]);
        }
        let coinb1 = hex_field(method, "params[2] (coinb1)", &params[2], None)?;
        let coinb2 = hex_field(method, "params[3] (coinb2)", &params[3], None)?;
        if coinb1.len() + coinb2.len() > MAX_COINBASE {
            return Err(ProtocolError::new(
                method,
                "params[2..3] (coinbase)",
                format!(
                    "{} bytes, more than the {MAX_COINBASE} a coinbase may have",
                    coinb1.len() + coinb2.len()
                ),
            ));
        }
        let entries = params[4].as_array().ok_or_else(|| {
            ProtocolError::new(method, "params[4] (merkle_branch)", "must be an array")
        })?;
        if entries.len() > MAX_BRANCH {
            return Err(ProtocolError::new(
                method,
                "params[4] (merkle_branch)",
                format!("{} entries, at most {MAX_BRANCH}", entries.len()),
            ));
        }
        let mut branch = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let field = format!("params[4][{i}] (merkle_branch)");
            let bytes = hex_field(method, &field, entry, Some(32))?;
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&bytes);
            branch.push(hash);
        }
        let version = u32_field(method, "params[5] (version)", &params[5])?;
        let bits = u32_field(method, "params[6] (nbits)", &params[6])?;
        if micromine_proto::work::Target::from_compact(bits).is_err() {
            return Err(ProtocolError::new(
                method,
                "params[6] (nbits)",
                format!("{bits:08x} is not a valid compact target"),
            ));
        }
        let time = u32_field(method, "params[7] (ntime)", &params[7])?;
        let clean = params[8].as_bool().ok_or_else(|| {
            ProtocolError::new(method, "params[8] (clean_jobs)", "must be true or false")
        })?;
        Ok(PoolJob {
            id,
            prev_hash,
            coinb1,
            coinb2,
            branch,
            version,
            bits,
            time,
            clean,
        })
    }

    /// The job as `mining.notify` params again ([`PoolJob::from_params`] reads them back).
    pub fn to_params(&self) -> serde_json::Value {
        let swapped: Vec<u8> = self
            .prev_hash
            .chunks_exact(4)
            .flat_map(|w| [w[3], w[2], w[1], w[0]])
            .collect();
        let branch: Vec<String> = self.branch.iter().map(hex::encode).collect();
        serde_json::json!([
            self.id,
            hex::encode(swapped),
            hex::encode(&self.coinb1),
            hex::encode(&self.coinb2),
            branch,
            format!("{:08x}", self.version),
            format!("{:08x}", self.bits),
            format!("{:08x}", self.time),
            self.clean,
        ])
    }

    /// The coinbase transaction for one pair of extranonces.
    pub fn coinbase(&self, extranonce1: &[u8], extranonce2: &[u8]) -> Vec<u8> {
        let mut tx = Vec::with_capacity(
            self.coinb1.len() + extranonce1.len() + extranonce2.len() + self.coinb2.len(),
        );
        tx.extend_from_slice(&self.coinb1);
        tx.extend_from_slice(extranonce1);
        tx.extend_from_slice(extranonce2);
        tx.extend_from_slice(&self.coinb2);
        tx
    }

    /// The block's merkle root for one pair of extranonces.
    pub fn merkle_root(&self, extranonce1: &[u8], extranonce2: &[u8]) -> [u8; 32] {
        merkle_root_from_branch(
            sha256d(&self.coinbase(extranonce1, extranonce2)),
            &self.branch,
        )
    }

    /// The block header (nonce 0) for one pair of extranonces and a version (the job's, or
    /// one with rolled bits).
    pub fn header(&self, extranonce1: &[u8], extranonce2: &[u8], version: u32) -> BlockHeader {
        BlockHeader {
            version: version as i32,
            prev_hash: self.prev_hash,
            merkle_root: self.merkle_root(extranonce1, extranonce2),
            time: self.time,
            bits: self.bits,
            nonce: 0,
        }
    }
}

/// The `n`-th version with rolled bits: `n`'s bits spread over the bits set in `mask`
/// (lowest first), the rest of `base` unchanged. `None` when `n` needs more bits than the
/// mask has, so every `n` gives a distinct version.
pub fn rolled_version(base: u32, mask: u32, n: u64) -> Option<u32> {
    if n >> mask.count_ones() != 0 {
        return None;
    }
    let mut bits = 0u32;
    let mut remaining = n;
    for position in 0..32 {
        if mask & (1 << position) != 0 {
            if remaining & 1 != 0 {
                bits |= 1 << position;
            }
            remaining >>= 1;
        }
    }
    Some((base & !mask) | bits)
}

/// The version as `mining.submit`'s sixth parameter carries it: the bits that differ
/// from the job's version, which must lie inside the negotiated mask.
pub fn version_bits(job_version: u32, version: u32) -> u32 {
    job_version ^ version
}

#[cfg(test)]
mod tests {
    use super::*;
    use micromine_proto::work::{hash_display_hex, merkle_branch};
    use serde_json::json;

    /// Block 100000's coinbase: its txid is the block's first, 8c14f0db…6d87.
    const COINBASE_100000: &str = "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff08044c86041b020602ffffffff0100f2052a010000004341041b0e8c2567c12536aa13357b79a073dc4444acb83c4ec7a0e2f99dd7457516c5817242da796924ca4e99947d087fedf9ce467cb9f7c6287078f801df276fdf84ac00000000";

    fn vectors() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../proto/tests/vectors/blocks.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).expect("test vectors"))
            .expect("vectors are JSON")
    }

    fn block_100000(vectors: &serde_json::Value) -> serde_json::Value {
        vectors["blocks"]
            .as_array()
            .expect("blocks")
            .iter()
            .find(|b| b["height"] == 100000)
            .expect("block 100000")
            .clone()
    }

    fn internal(display_hex: &str) -> [u8; 32] {
        let mut bytes: [u8; 32] = hex::decode(display_hex)
            .expect("hex")
            .try_into()
            .expect("32 bytes");
        bytes.reverse();
        bytes
    }

    /// How a pool would announce block 100000's template, with the coinbase's scriptSig
    /// bytes `4c86041b` as extranonce1 and `0206` as extranonce2.
    fn notify_of_block_100000() -> (serde_json::Value, Vec<u8>, Vec<u8>) {
        let v = vectors();
        let block = block_100000(&v);
        let txids: Vec<[u8; 32]> = v["merkle_example"]["txids"]
            .as_array()
            .expect("txids")
            .iter()
            .map(|t| internal(t.as_str().expect("hex")))
            .collect();
        let branch: Vec<String> = merkle_branch(&txids).iter().map(hex::encode).collect();
        let prev = internal(block["prev_hash"].as_str().expect("prev"));
        let swapped: Vec<u8> = prev
            .chunks_exact(4)
            .flat_map(|w| [w[3], w[2], w[1], w[0]])
            .collect();
        let coinbase = COINBASE_100000;
        let (en1, en2) = ("4c86041b", "0206");
        let at = coinbase.find(&format!("{en1}{en2}")).expect("extranonces");
        let coinb1 = &coinbase[..at];
        let coinb2 = &coinbase[at + en1.len() + en2.len()..];
        let params = json!([
            "1a2b",
            hex::encode(swapped),
            coinb1,
            coinb2,
            branch,
            format!("{:08x}", block["version"].as_u64().expect("version")),
            block["bits"],
            format!("{:08x}", block["time"].as_u64().expect("time")),
            true
        ]);
        (
            params,
            hex::decode(en1).expect("hex"),
            hex::decode(en2).expect("hex"),
        )
    }

    #[test]
    fn block_100000_is_rebuilt_from_its_coinbase_and_branch() {
        let v = vectors();
        let block = block_100000(&v);
        let (params, en1, en2) = notify_of_block_100000();
        let job = PoolJob::from_params(&params).expect("a valid notify");
        assert!(job.clean);
        assert_eq!(job.branch.len(), 2);
        assert_eq!(PoolJob::from_params(&job.to_params()), Ok(job.clone()));
        let coinbase = job.coinbase(&en1, &en2);
        assert_eq!(hex::encode(&coinbase), COINBASE_100000);
        assert_eq!(
            hash_display_hex(&sha256d(&coinbase)),
            v["merkle_example"]["txids"][0].as_str().expect("txid")
        );
        assert_eq!(
            hash_display_hex(&job.merkle_root(&en1, &en2)),
            v["merkle_example"]["merkle_root"].as_str().expect("root")
        );
        let mut header = job.header(&en1, &en2, job.version);
        header.nonce = block["nonce"].as_u64().expect("nonce") as u32;
        assert_eq!(
            hex::encode(header.to_bytes()),
            block["header_hex"].as_str().expect("header")
        );
        assert_eq!(
            hash_display_hex(&header.hash()),
            block["hash"].as_str().expect("hash")
        );
        // Another extranonce2 is another merkle root: a fresh nonce space.
        assert_ne!(job.merkle_root(&en1, &[2, 7]), job.merkle_root(&en1, &en2));
    }

    #[test]
    fn malformed_notify_params_name_the_parameter() {
        let (good, _, _) = notify_of_block_100000();
        let cases: Vec<(usize, serde_json::Value, &str)> = vec![
            (0, json!(""), "params[0] (job_id)"),
            (1, json!("abcd"), "params[1] (prevhash)"),
            (1, json!("zz".repeat(32)), "params[1] (prevhash)"),
            (2, json!(17), "params[2] (coinb1)"),
            (3, json!("abc"), "params[3] (coinb2)"),
            (4, json!("ab"), "params[4] (merkle_branch)"),
            (4, json!(["00"]), "params[4][0] (merkle_branch)"),
            (5, json!("2000000"), "params[5] (version)"),
            (6, json!("01800000"), "params[6] (nbits)"),
            (7, json!(-1), "params[7] (ntime)"),
            (8, json!("yes"), "params[8] (clean_jobs)"),
        ];
        for (index, value, field) in cases {
            let mut params = good.clone();
            params[index] = value;
            let err = PoolJob::from_params(&params).expect_err(field);
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().contains("mining.notify"), "{err}");
        }
        let err = PoolJob::from_params(&json!(["a", "b"])).expect_err("short");
        assert!(err.to_string().contains("9 entries"), "{err}");
        let mut huge = good.clone();
        huge[2] = json!("00".repeat(MAX_COINBASE + 1));
        assert!(PoolJob::from_params(&huge).is_err());
        let mut long = good;
        long[4] = json!(vec!["00".repeat(32); MAX_BRANCH + 1]);
        assert!(PoolJob::from_params(&long).is_err());
    }

    #[test]
    fn rolled_versions_stay_inside_the_mask_and_never_repeat() {
        let base = 0x2000_0000;
        let mask = 0x1fff_e000;
        let mut seen = std::collections::HashSet::new();
        for n in 0..5000 {
            let v = rolled_version(base, mask, n).expect("fits");
            assert_eq!(v & !mask, base & !mask);
            assert!(version_bits(base, v) & !mask == 0);
            assert!(seen.insert(v));
        }
        assert_eq!(rolled_version(base, mask, 0), Some(base));
        assert_eq!(rolled_version(base, mask, (1 << 16) - 1), Some(base | mask));
        assert_eq!(rolled_version(base, mask, 1 << 16), None);
        assert_eq!(rolled_version(base, 0, 1), None);
    }
}
