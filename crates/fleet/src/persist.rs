//! What the fleet keeps in the store besides the ledger: id counters, chain tips, headers
//! that live or recently ended leases refer to, the leases themselves, leases that ended
//! within the last ten minutes, and device records. Enough to resume after a crash without
//! ever handing out a nonce twice, forgetting a device, or judging a share differently
//! from how it would have been judged without the crash.

use std::collections::{BTreeMap, HashSet};

use micromine_proto::pb;
use redb::{ReadTransaction, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use micromine_store::store::{JsonTable, StoreError, get_json, list_json, put_json, remove_json};
use micromine_stratum::work::PoolSessionRecord;
use micromine_work::scheduler::{HeaderId, Lease};
use micromine_work::worksource::{ChainTip, WorkHeader};

const META: JsonTable = TableDefinition::new("fleet_meta");
const HEADERS: JsonTable = TableDefinition::new("fleet_headers");
const LEASES: JsonTable = TableDefinition::new("fleet_leases");
const DEVICES: JsonTable = TableDefinition::new("fleet_devices");
/// Leases that ended but whose shares are still judged. A table of its own rather than a
/// mark on `fleet_leases`: a controller that predates it restores none of them as live.
const ENDED_LEASES: JsonTable = TableDefinition::new("fleet_ended_leases");

const IDS_KEY: &str = "ids";
const TIP_PREFIX: &str = "tip/";
const POOL_PREFIX: &str = "pool/";
const ENERGY_KEY: &str = "energy";

/// Id counters; each is the next value to hand out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetIds {
    /// Next header id.
    pub next_header: u64,
    /// Next job id.
    pub next_job: u64,
    /// Where assignment ids continue after a restart: every id below it may have been
    /// handed out. Reserved ahead of use (see `FleetState`), so an assignment can leave
    /// before its lease is durable without its id ever being handed out twice.
    pub next_assignment: u64,
}

impl Default for FleetIds {
    fn default() -> Self {
        FleetIds {
            next_header: 1,
            next_job: 1,
            next_assignment: 1,
        }
    }
}

impl FleetIds {
    /// Takes a header id.
    pub fn take_header(&mut self) -> u64 {
        let id = self.next_header;
        self.next_header += 1;
        id
    }

    /// Takes a job id.
    pub fn take_job(&mut self) -> u64 {
        let id = self.next_job;
        self.next_job += 1;
        id
    }
}

/// A lease with what verification needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Range, device, expiry.
    pub lease: Lease,
    /// Share target, 32 bytes little-endian.
    pub target_le: Vec<u8>,
    /// Share difficulty credited.
    pub difficulty: f64,
    /// The MicroMiner.
    pub miner: String,
}

/// A lease that ended, kept while shares against it are still judged (a device that
/// reconnects after a crash resubmits the shares it was never answered for, and must get
/// the answer it would have got without the crash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndedLeaseRecord {
    /// The lease as it ended, with what verification needs.
    pub record: LeaseRecord,
    /// When it ended, Unix ms: it is forgotten a fixed time later.
    pub ended_unix_ms: i64,
}

/// What a device said about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceCapacity {
    /// Logical cores.
    pub cores: u32,
    /// Hashing threads.
    pub mining_threads: u32,
    /// CPU architecture.
    pub arch: String,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Claimed hash rate at full duty (H/s).
    pub nominal_hashrate: f64,
    /// Hash engine.
    pub hash_engine: String,
    /// How the agent chose it (`calibrated`, `cached`, `configured`, `simulated`).
    pub hash_engine_basis: String,
    /// One thread's hashes per second for each engine the agent timed, by engine name.
    pub hash_engine_rates: BTreeMap<String, f64>,
}

/// Most engine rates kept from one report: more than any agent build has engines.
const MAX_ENGINE_RATES: usize = 16;

impl From<pb::Capacity> for DeviceCapacity {
    fn from(c: pb::Capacity) -> Self {
        DeviceCapacity {
            cores: c.cores,
            mining_threads: c.mining_threads,
            arch: c.arch.chars().take(32).collect(),
            memory_bytes: c.memory_bytes,
            nominal_hashrate: c.nominal_hashrate,
            hash_engine: c.hash_engine.chars().take(64).collect(),
            hash_engine_basis: c.hash_engine_basis.chars().take(16).collect(),
            // What the controller keeps and writes into EdgeDevice status is bounded: a
            // hostile report could otherwise grow both without limit.
            hash_engine_rates: c
                .hash_engine_rates
                .into_iter()
                .filter(|(name, rate)| {
                    !name.is_empty() && name.len() <= 32 && rate.is_finite() && *rate >= 0.0
                })
                .take(MAX_ENGINE_RATES)
                .collect(),
        }
    }
}

/// A device the controller has seen (an EdgeDevice in Kubernetes terms).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceRecord {
    /// Name (certificate common name).
    pub name: String,
    /// Labels in effect: what it reported, overridden by `token_labels`.
    pub labels: BTreeMap<String, String>,
    /// Labels from the bootstrap token it enrolled with (set by the operator).
    pub token_labels: BTreeMap<String, String>,
    /// Capacity it reported.
    pub capacity: DeviceCapacity,
    /// Agent version.
    pub agent_version: String,
    /// First session, Unix ms.
    pub first_seen_unix_ms: i64,
    /// Last time heard from, Unix ms.
    pub last_seen_unix_ms: i64,
    /// When its newest certificate was issued, Unix ms.
    pub certificate_issued_unix_ms: i64,
    /// When its newest certificate expires, Unix ms.
    pub certificate_not_after_unix_ms: i64,
}

/// One write the fleet wants durable.
#[derive(Debug, Clone)]
pub enum PersistOp {
    /// Id counters.
    Ids(FleetIds),
    /// A MicroMiner's chain tip.
    Tip(String, ChainTip),
    /// A new header.
    Header(WorkHeader),
    /// A header nothing refers to any more.
    DeleteHeader(u64),
    /// A new lease.
    Lease(LeaseRecord),
    /// A lease that ended.
    DeleteLease(u64),
    /// A lease that ended and whose late shares are still judged. Always written in the
    /// same effects as its [`PersistOp::DeleteLease`], so one transaction holds both: a
    /// crash leaves the lease either live or ended, never lost.
    EndedLease(EndedLeaseRecord),
    /// An ended lease whose shares are no longer judged.
    ForgetEndedLease(u64),
    /// A device record.
    Device(DeviceRecord),
    /// Energy drawn per MicroMiner, joules.
    Energy(BTreeMap<String, f64>),
    /// A MicroMiner's pool session, or that it has none any more.
    PoolSession(String, Option<Box<PoolSessionRecord>>),
}

impl PersistOp {
    /// Whether messages produced together with this write may leave before it is durable.
    /// A crash may then forget the write; that is harmless only if the restarted controller
    /// can never contradict what was sent. True of leases and their ends: the headers of
    /// a previous run hand out no nonces again, and assignment ids come from a durable
    /// reservation, so a forgotten lease's range and id are never reused (its device is
    /// told at its next `Welcome` that the lease is gone). False of counters, headers, tips
    /// and pool sessions: forgotten, they would be handed out a second time. An ended
    /// lease's record goes with its deletion (a crash forgets both, and the lease is live
    /// again); forgetting it again is redone at the next start.
    pub fn may_be_forgotten(&self) -> bool {
        match self {
            PersistOp::Ids(_)
            | PersistOp::Tip(..)
            | PersistOp::Header(_)
            | PersistOp::PoolSession(..) => false,
            PersistOp::DeleteHeader(_)
            | PersistOp::Lease(_)
            | PersistOp::DeleteLease(_)
            | PersistOp::EndedLease(_)
            | PersistOp::ForgetEndedLease(_)
            | PersistOp::Device(_)
            | PersistOp::Energy(_) => true,
        }
    }
}

fn id_key(id: u64) -> String {
    // Zero-padded so that key order is numeric order.
    format!("{id:020}")
}

/// Applies writes in order inside a store job. Consecutive writes of the same counter or
/// tip are coalesced to the last.
pub fn apply(txn: &WriteTransaction, ops: &[PersistOp]) -> Result<(), StoreError> {
    let mut ids = None;
    let mut energy = None;
    let mut tips: BTreeMap<&str, &ChainTip> = BTreeMap::new();
    let mut pools: BTreeMap<&str, Option<&PoolSessionRecord>> = BTreeMap::new();
    for op in ops {
        match op {
            PersistOp::PoolSession(miner, record) => {
                pools.insert(miner, record.as_deref());
            }
            PersistOp::Energy(joules) => energy = Some(joules),
            PersistOp::Ids(value) => ids = Some(value),
            PersistOp::Tip(miner, tip) => {
                tips.insert(miner, tip);
            }
            PersistOp::Header(header) => put_json(txn, HEADERS, &id_key(header.id), header)?,
            PersistOp::DeleteHeader(id) => {
                remove_json(txn, HEADERS, &id_key(*id))?;
            }
            PersistOp::Lease(record) => put_json(txn, LEASES, &id_key(record.lease.id), record)?,
            PersistOp::DeleteLease(id) => {
                remove_json(txn, LEASES, &id_key(*id))?;
            }
            PersistOp::EndedLease(ended) => {
                put_json(txn, ENDED_LEASES, &id_key(ended.record.lease.id), ended)?
            }
            PersistOp::ForgetEndedLease(id) => {
                remove_json(txn, ENDED_LEASES, &id_key(*id))?;
            }
            PersistOp::Device(record) => put_json(txn, DEVICES, &record.name, record)?,
        }
    }
    if let Some(ids) = ids {
        put_json(txn, META, IDS_KEY, ids)?;
    }
    if let Some(energy) = energy {
        put_json(txn, META, ENERGY_KEY, energy)?;
    }
    for (miner, tip) in tips {
        put_json(txn, META, &format!("{TIP_PREFIX}{miner}"), tip)?;
    }
    for (miner, record) in pools {
        let key = format!("{POOL_PREFIX}{miner}");
        match record {
            Some(record) => put_json(txn, META, &key, record)?,
            None => {
                remove_json(txn, META, &key)?;
            }
        }
    }
    Ok(())
}

/// What was restored from the store at start.
#[derive(Debug, Default)]
pub struct Restored {
    /// Id counters.
    pub ids: FleetIds,
    /// Headers that live or ended leases refer to.
    pub headers: Vec<WorkHeader>,
    /// Leases alive at the last shutdown or crash.
    pub leases: Vec<LeaseRecord>,
    /// Leases that had ended but were still remembered, in no particular order; some may
    /// have left their window while the controller was down.
    pub ended_leases: Vec<EndedLeaseRecord>,
    /// Chain tips of builtin sources.
    pub tips: BTreeMap<String, ChainTip>,
    /// Known devices.
    pub devices: Vec<DeviceRecord>,
    /// Stored headers nothing refers to any more.
    pub unreferenced_headers: Vec<HeaderId>,
    /// Energy drawn for each MicroMiner, joules.
    pub energy_joules: BTreeMap<String, f64>,
    /// Pool sessions of MicroMiners with pool work, to resume.
    pub pool_sessions: BTreeMap<String, PoolSessionRecord>,
}

/// Reads everything back at start. Headers no live or ended lease refers to are listed
/// apart, for [`forget_headers`].
pub fn load(txn: &ReadTransaction) -> Result<Restored, StoreError> {
    let ids: FleetIds = get_json(txn, META, IDS_KEY)?.unwrap_or_default();
    let energy_joules: BTreeMap<String, f64> = get_json(txn, META, ENERGY_KEY)?.unwrap_or_default();
    let mut tips = BTreeMap::new();
    let mut pool_sessions = BTreeMap::new();
    for (key, value) in list_json::<serde_json::Value>(txn, META)? {
        if let Some(miner) = key.strip_prefix(POOL_PREFIX) {
            // One that does not read back only costs a new pool session.
            match serde_json::from_value::<PoolSessionRecord>(value) {
                Ok(record) => {
                    pool_sessions.insert(miner.to_string(), record);
                }
                Err(e) => {
                    tracing::warn!(miner, error = %e, "stored pool session unreadable; starting a new one")
                }
            }
            continue;
        }
        let tip = value;
        if let Some(miner) = key.strip_prefix(TIP_PREFIX) {
            let tip: ChainTip = serde_json::from_value(tip).map_err(|source| StoreError::Json {
                table: "fleet_meta".to_string(),
                key: key.clone(),
                source,
            })?;
            tips.insert(miner.to_string(), tip);
        }
    }
    let leases: Vec<LeaseRecord> = list_json(txn, LEASES)?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let ended_leases: Vec<EndedLeaseRecord> = list_json(txn, ENDED_LEASES)?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let all_headers: Vec<WorkHeader> = list_json::<WorkHeader>(txn, HEADERS)?
        .into_iter()
        .map(|(_, h)| h)
        .collect();
    let devices = list_json(txn, DEVICES)?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    // Counters must stay ahead of anything stored, even if a counter write was lost.
    let mut ids = ids;
    for header in &all_headers {
        ids.next_header = ids.next_header.max(header.id + 1);
    }
    // A set, not a scan per header: ten thousand devices leave tens of thousands of
    // ended leases.
    let referenced: HashSet<HeaderId> = leases
        .iter()
        .chain(ended_leases.iter().map(|e| &e.record))
        .map(|l| l.lease.header)
        .collect();
    let (headers, unreferenced): (Vec<WorkHeader>, Vec<WorkHeader>) = all_headers
        .into_iter()
        .partition(|h| referenced.contains(&h.id));
    for lease in leases.iter().chain(ended_leases.iter().map(|e| &e.record)) {
        ids.next_assignment = ids.next_assignment.max(lease.lease.id + 1);
    }
    for tip in tips.values() {
        ids.next_job = ids.next_job.max(tip.job + 1);
    }
    for record in pool_sessions.values() {
        ids.next_job = ids.next_job.max(record.epoch + 1);
    }
    Ok(Restored {
        ids,
        headers,
        leases,
        ended_leases,
        tips,
        devices,
        unreferenced_headers: unreferenced.into_iter().map(|h| h.id).collect(),
        energy_joules,
        pool_sessions,
    })
}

/// Deletes stored headers that no stored lease refers to.
pub fn forget_headers(txn: &WriteTransaction, ids: &[u64]) -> Result<(), StoreError> {
    for id in ids {
        remove_json(txn, HEADERS, &id_key(*id))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent's capacity report is kept only within bounds: it ends up in the store and
    /// in EdgeDevice status, so a hostile or broken agent must not be able to grow either.
    #[test]
    fn a_hostile_capacity_report_is_kept_within_bounds() {
        let mut rates: BTreeMap<String, f64> = (0..1000)
            .map(|i| (format!("engine-{i:04}"), i as f64))
            .collect();
        rates.insert("nan".into(), f64::NAN);
        rates.insert("infinite".into(), f64::INFINITY);
        rates.insert("negative".into(), -1.0);
        rates.insert(String::new(), 1.0);
        rates.insert("x".repeat(33), 1.0);
        let kept = DeviceCapacity::from(pb::Capacity {
            arch: "a".repeat(100),
            hash_engine: "e".repeat(100),
            hash_engine_basis: "b".repeat(100),
            hash_engine_rates: rates,
            ..Default::default()
        });
        assert_eq!(kept.arch.len(), 32);
        assert_eq!(kept.hash_engine.len(), 64);
        assert_eq!(kept.hash_engine_basis.len(), 16);
        assert_eq!(kept.hash_engine_rates.len(), MAX_ENGINE_RATES);
        for (name, rate) in &kept.hash_engine_rates {
            assert!(name.starts_with("engine-"), "{name}");
            assert!(rate.is_finite() && *rate >= 0.0, "{name}: {rate}");
        }

        let honest = DeviceCapacity::from(pb::Capacity {
            hash_engine: "avx2".into(),
            hash_engine_basis: "calibrated".into(),
            hash_engine_rates: [("avx2".to_string(), 14e6), ("sha-ni".to_string(), 12e6)].into(),
            ..Default::default()
        });
        assert_eq!(honest.hash_engine_basis, "calibrated");
        assert_eq!(honest.hash_engine_rates.len(), 2);
        assert_eq!(honest.hash_engine_rates.get("avx2"), Some(&14e6));
    }
}
