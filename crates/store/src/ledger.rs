//! The share ledger: every accepted share recorded durably and counted exactly once.
//!
//! The caller (the share verifier) has already re-hashed each share; the ledger decides whether
//! it is new, records it, and keeps running totals per device, per miner and for the fleet.
//! A batch is one [`Store::write`] job, so it is one atomic unit inside a group commit, and
//! [`Ledger::record`] returns only once the batch is durable: an outcome that says "accepted"
//! may be acknowledged to the device straight away.
//!
//! Duplicate semantics, keyed by [`ShareKey`] (header ids are never reused):
//! - key unknown: [`ShareOutcome::Recorded`], counted as accepted;
//! - key known, recorded for the same device, and the device flags the share `resubmitted`
//!   (it sent it before and never saw our answer, e.g. across a controller crash):
//!   [`ShareOutcome::AlreadyRecorded`], acknowledged as accepted, counted nowhere;
//! - key known otherwise: [`ShareOutcome::Duplicate`], counted as a rejection;
//! - header below the prune floor ([`Ledger::prune_below`]): also [`ShareOutcome::Duplicate`].
//!   The records that would tell a replay from a new share are gone, so the share may already
//!   be counted; refusing it is the only answer that can never count a share twice.
//!
//! Tables: `ledger_shares` maps the 12-byte key (header id BE ++ nonce BE, so shares of one
//! header sit together and pruning is a key range) to (device, miner, difficulty, time, block);
//! `ledger_totals` maps `fleet`, `device/<name>` and `miner/<namespace/name>` to a fixed
//! 74-byte little-endian record (no JSON on the hot path); `ledger_meta` holds the prune floor.
//! Totals are also cached in memory, loaded at open and updated after each durable commit.
//! After the store has reopened its database (a full disk, a failed fsync: see
//! [`crate::store`]), the cache is loaded again from the reopened file before any later
//! batch runs: the batch that failed may have reached the disk after all, and totals read
//! from the disk only ever include what an earlier cache did, so they only grow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use micromine_proto::pb::RejectReason;
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::store::{self, Store, StoreError};

pub mod pool;

/// Length of an encoded [`ShareKey`].
pub const SHARE_KEY_LEN: usize = 12;

/// Share records: key → (device, miner, difficulty, time in Unix ms, met the network target).
type ShareRecord = (&'static str, &'static str, f64, i64, bool);
const SHARES: TableDefinition<&[u8; SHARE_KEY_LEN], ShareRecord> =
    TableDefinition::new("ledger_shares");
const TOTALS: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_totals");
const META: TableDefinition<&str, u64> = TableDefinition::new("ledger_meta");
const PRUNE_FLOOR: &str = "prune_floor";

/// Share records removed per store job while pruning, so a large prune never holds up the
/// group commits of live shares for long.
const PRUNE_CHUNK: usize = 8192;

/// Identity of a share: the header it was mined on (header ids are never reused) and the nonce.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct ShareKey {
    /// The header (assignment work) the share was mined on.
    pub header_id: u64,
    /// The nonce that produced it.
    pub nonce: u32,
}

impl ShareKey {
    /// Big-endian header id then nonce: byte order equals numeric order, so one header's
    /// shares are adjacent and "all headers below N" is a key range.
    pub fn to_bytes(self) -> [u8; SHARE_KEY_LEN] {
        let mut bytes = [0u8; SHARE_KEY_LEN];
        bytes[..8].copy_from_slice(&self.header_id.to_be_bytes());
        bytes[8..].copy_from_slice(&self.nonce.to_be_bytes());
        bytes
    }

    /// The inverse of [`ShareKey::to_bytes`].
    pub fn from_bytes(bytes: &[u8; SHARE_KEY_LEN]) -> ShareKey {
        let mut header = [0u8; 8];
        header.copy_from_slice(&bytes[..8]);
        let mut nonce = [0u8; 4];
        nonce.copy_from_slice(&bytes[8..]);
        ShareKey {
            header_id: u64::from_be_bytes(header),
            nonce: u32::from_be_bytes(nonce),
        }
    }
}

/// A share the caller has already re-hashed and found to meet its share target.
#[derive(Clone, Debug, PartialEq)]
pub struct AcceptedShare {
    /// Which share.
    pub key: ShareKey,
    /// The device that submitted it.
    pub device: String,
    /// The `MicroMiner` it was mined for, as `namespace/name`.
    pub miner: String,
    /// The difficulty credited (of the share target, not of the hash).
    pub difficulty: f64,
    /// When the controller received it, Unix milliseconds.
    pub time_unix_ms: i64,
    /// The hash also met the network target.
    pub block: bool,
    /// The device says it sent this share before and never saw the result.
    pub resubmitted: bool,
    /// It also meets a pool's difficulty and goes upstream: a pending pool verdict is
    /// recorded with it, in the same transaction, so a share acknowledged to the device is
    /// never forgotten before the pool has answered (see [`pool`]).
    pub for_pool: bool,
}

/// A share the caller rejected before it reached the ledger; only counted.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// The device that submitted it.
    pub device: String,
    /// The `MicroMiner` it was for, if the caller could tell.
    pub miner: Option<String>,
    /// Why it was rejected; `Unspecified` is refused.
    pub reason: RejectReason,
}

/// What the ledger made of one accepted share.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ShareOutcome {
    /// Newly durable and counted.
    Recorded,
    /// Already recorded for this same device and flagged `resubmitted`: the device lost our
    /// acknowledgement; acknowledge it as accepted again, count nothing.
    AlreadyRecorded,
    /// Already recorded otherwise (another device, or a replay not flagged resubmitted), or
    /// its header is below the prune floor so it may have been: counted as a rejection with
    /// reason `Duplicate`.
    Duplicate,
}

impl ShareOutcome {
    /// Whether the device should be told "accepted".
    pub fn is_accepted(self) -> bool {
        matches!(self, ShareOutcome::Recorded | ShareOutcome::AlreadyRecorded)
    }

    /// The reason to report to the device when the share is not accepted.
    pub fn reject_reason(self) -> Option<RejectReason> {
        match self {
            ShareOutcome::Recorded | ShareOutcome::AlreadyRecorded => None,
            ShareOutcome::Duplicate => Some(RejectReason::Duplicate),
        }
    }
}

/// Rejected shares by reason, so status can tell a misconfigured device (low difficulty) from
/// a slow one (stale) or a hostile one (duplicate, out of range).
#[derive(Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Debug)]
pub struct RejectCounts {
    /// The hash did not meet the share target.
    pub low_difficulty: u64,
    /// The share was already recorded (or replayed).
    pub duplicate: u64,
    /// The share's header was no longer current work.
    pub stale: u64,
    /// The nonce was outside the assigned range.
    pub out_of_range: u64,
    /// No live assignment of this device matched.
    pub unknown_assignment: u64,
}

impl RejectCounts {
    /// All rejections.
    pub fn total(&self) -> u64 {
        self.low_difficulty
            + self.duplicate
            + self.stale
            + self.out_of_range
            + self.unknown_assignment
    }

    fn slot(&mut self, reason: RejectReason) -> Option<&mut u64> {
        match reason {
            RejectReason::Unspecified => None,
            RejectReason::LowDifficulty => Some(&mut self.low_difficulty),
            RejectReason::Duplicate => Some(&mut self.duplicate),
            RejectReason::Stale => Some(&mut self.stale),
            RejectReason::OutOfRange => Some(&mut self.out_of_range),
            RejectReason::UnknownAssignment => Some(&mut self.unknown_assignment),
        }
    }

    fn add(&mut self, other: &RejectCounts) {
        self.low_difficulty += other.low_difficulty;
        self.duplicate += other.duplicate;
        self.stale += other.stale;
        self.out_of_range += other.out_of_range;
        self.unknown_assignment += other.unknown_assignment;
    }
}

/// Running share totals of a device, a miner or the fleet; persisted, so they survive restarts
/// and pruning.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Debug)]
pub struct Totals {
    /// Shares recorded as accepted.
    pub accepted: u64,
    /// Sum of the difficulty of accepted shares: the basis of effective hashrate.
    pub accepted_difficulty: f64,
    /// Accepted shares that also met the network target.
    pub blocks: u64,
    /// Rejected shares by reason.
    pub rejected: RejectCounts,
    /// Receive time of the latest accepted share, Unix milliseconds.
    pub last_share_unix_ms: Option<i64>,
}

const TOTALS_VERSION: u8 = 1;
const TOTALS_LEN: usize = 1 + 8 * 8 + 1 + 8;

impl Totals {
    fn merge(&mut self, delta: &Totals) {
        self.accepted += delta.accepted;
        self.accepted_difficulty += delta.accepted_difficulty;
        self.blocks += delta.blocks;
        self.rejected.add(&delta.rejected);
        self.last_share_unix_ms = self.last_share_unix_ms.max(delta.last_share_unix_ms);
    }

    fn encode(&self) -> [u8; TOTALS_LEN] {
        let mut out = [0u8; TOTALS_LEN];
        out[0] = TOTALS_VERSION;
        let words = [
            self.accepted,
            self.accepted_difficulty.to_bits(),
            self.blocks,
            self.rejected.low_difficulty,
            self.rejected.duplicate,
            self.rejected.stale,
            self.rejected.out_of_range,
            self.rejected.unknown_assignment,
        ];
        for (i, word) in words.iter().enumerate() {
            out[1 + 8 * i..9 + 8 * i].copy_from_slice(&word.to_le_bytes());
        }
        if let Some(last) = self.last_share_unix_ms {
            out[65] = 1;
            out[66..74].copy_from_slice(&last.to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<Totals, String> {
        if bytes.len() != TOTALS_LEN {
            return Err(format!("{} bytes, expected {TOTALS_LEN}", bytes.len()));
        }
        if bytes[0] != TOTALS_VERSION {
            return Err(format!("unknown totals version {}", bytes[0]));
        }
        let word = |i: usize| {
            let mut le = [0u8; 8];
            le.copy_from_slice(&bytes[1 + 8 * i..9 + 8 * i]);
            u64::from_le_bytes(le)
        };
        let last_share_unix_ms = match bytes[65] {
            0 => None,
            1 => {
                let mut le = [0u8; 8];
                le.copy_from_slice(&bytes[66..74]);
                Some(i64::from_le_bytes(le))
            }
            flag => return Err(format!("bad last-share flag {flag}")),
        };
        Ok(Totals {
            accepted: word(0),
            accepted_difficulty: f64::from_bits(word(1)),
            blocks: word(2),
            rejected: RejectCounts {
                low_difficulty: word(3),
                duplicate: word(4),
                stale: word(5),
                out_of_range: word(6),
                unknown_assignment: word(7),
            },
            last_share_unix_ms,
        })
    }
}

/// Why a ledger operation failed. After a failed [`Ledger::record`] the shares must not be
/// acknowledged. Invalid input recorded nothing; a failed group commit leaves the whole batch
/// either recorded or not (a failed fsync cannot say which). Both are safe: the device
/// resubmits, flagged, and gets `AlreadyRecorded` or `Recorded`, never a second count.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store failed; `action` says what the ledger was doing.
    #[error("{action} in the ledger store")]
    Store {
        /// What the ledger was doing.
        action: &'static str,
        /// The store's reason.
        #[source]
        source: StoreError,
    },
    /// A rejection without a reason would be counted nowhere; it is a caller bug.
    #[error("rejection from device {device:?} has no reason (REJECT_REASON_UNSPECIFIED)")]
    UnspecifiedReason {
        /// The device the rejection was for.
        device: String,
    },
    /// A difficulty that is NaN, infinite or negative would poison the totals forever.
    #[error(
        "share {header_id}:{nonce} from device {device:?} has difficulty {difficulty}, \
         not a finite non-negative number"
    )]
    InvalidDifficulty {
        /// The device that submitted the share.
        device: String,
        /// The share's header.
        header_id: u64,
        /// The share's nonce.
        nonce: u32,
        /// The offending value.
        difficulty: f64,
    },
}

/// Which totals a count goes to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Fleet,
    Device,
    Miner,
}

fn scope_key(kind: Kind, name: &str) -> String {
    match kind {
        Kind::Fleet => "fleet".to_owned(),
        Kind::Device => format!("device/{name}"),
        Kind::Miner => format!("miner/{name}"),
    }
}

fn parse_scope_key(key: &str) -> Option<(Kind, &str)> {
    if key == "fleet" {
        Some((Kind::Fleet, ""))
    } else if let Some(name) = key.strip_prefix("device/") {
        Some((Kind::Device, name))
    } else {
        key.strip_prefix("miner/").map(|name| (Kind::Miner, name))
    }
}

/// Totals and the order of the commit that produced them: store jobs run in sequence order,
/// but their callers may be woken in any order, so only a newer sequence may replace a cached
/// value.
#[derive(Clone, Default)]
struct Versioned {
    sequence: u64,
    totals: Totals,
}

#[derive(Default)]
struct Cache {
    fleet: Versioned,
    devices: HashMap<String, Versioned>,
    miners: HashMap<String, Versioned>,
}

struct State {
    cache: Mutex<Cache>,
    /// Pool verdict totals by scope key (see [`pool`]).
    pool: Mutex<pool::PoolCache>,
    /// Numbers record jobs in the order the writer runs them.
    sequence: AtomicU64,
}

impl State {
    fn cache(&self) -> MutexGuard<'_, Cache> {
        // Nothing panics while the cache is locked; a poisoned lock still holds valid totals.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pool_cache(&self) -> MutexGuard<'_, pool::PoolCache> {
        // As above: nothing panics while it is locked.
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the cached totals with those read from the store after it reopened. Runs on
    /// the writer thread between jobs, so every record job numbered up to `sequence` has run
    /// and its outcome (durable or not) is what the snapshot holds: their late installs, with
    /// sequences up to `sequence`, are then ignored, and later jobs' installs win.
    fn reload(&self, sequence: u64, loaded: Cache, pool: pool::PoolCache) {
        {
            let mut cache = self.cache();
            let fresh = |totals: Versioned| Versioned {
                sequence,
                totals: totals.totals,
            };
            cache.fleet = fresh(loaded.fleet);
            cache.devices = loaded
                .devices
                .into_iter()
                .map(|(name, totals)| (name, fresh(totals)))
                .collect();
            cache.miners = loaded
                .miners
                .into_iter()
                .map(|(name, totals)| (name, fresh(totals)))
                .collect();
        }
        *self.pool_cache() = pool
            .into_iter()
            .map(|(key, (_, totals))| (key, (sequence, totals)))
            .collect();
    }

    fn install(&self, sequence: u64, updated: Vec<(Kind, String, Totals)>) {
        let mut cache = self.cache();
        for (kind, name, totals) in updated {
            let slot = match kind {
                Kind::Fleet => &mut cache.fleet,
                Kind::Device => cache.devices.entry(name).or_default(),
                Kind::Miner => cache.miners.entry(name).or_default(),
            };
            if sequence > slot.sequence {
                *slot = Versioned { sequence, totals };
            }
        }
    }
}

/// The share ledger. Cheap to clone; clones share the store and the cache of totals.
#[derive(Clone)]
pub struct Ledger {
    store: Store,
    state: Arc<State>,
}

/// What one record job produced, handed back once durable.
struct Applied {
    sequence: u64,
    outcomes: Vec<ShareOutcome>,
    totals: Vec<(Kind, String, Totals)>,
}

impl Ledger {
    /// Opens the ledger on `store`, loading the persisted totals into memory so that the
    /// totals getters never touch the disk. Tables are created by the first write.
    ///
    /// The cache is loaded again whenever the store reopens its database (see the module docs).
    pub fn open(store: Store) -> Result<Ledger, LedgerError> {
        let snapshot = store.read().map_err(|source| LedgerError::Store {
            action: "loading share totals",
            source,
        })?;
        let cache = load_cache(&snapshot).map_err(|source| LedgerError::Store {
            action: "loading share totals",
            source,
        })?;
        let pool = pool::load(&snapshot).map_err(|source| LedgerError::Store {
            action: "loading pool verdict totals",
            source,
        })?;
        drop(snapshot);
        let state = Arc::new(State {
            cache: Mutex::new(cache),
            pool: Mutex::new(pool),
            sequence: AtomicU64::new(0),
        });
        // Weak: once every handle on this ledger is gone there is no cache left to reload.
        let reloaded = Arc::downgrade(&state);
        store.on_reopen(move |snapshot| {
            let Some(state) = reloaded.upgrade() else {
                return;
            };
            // Read on the writer thread, between jobs: no record job is running.
            let sequence = state.sequence.load(Ordering::Relaxed);
            match load_cache(snapshot).and_then(|cache| Ok((cache, pool::load(snapshot)?))) {
                Ok((cache, pool)) => {
                    state.reload(sequence, cache, pool);
                    tracing::info!("share totals reloaded from the reopened store");
                }
                Err(e) => tracing::error!(error = %e,
                    "reloading share totals from the reopened store failed; they may read low until each scope's next share"),
            }
        });
        Ok(Ledger { store, state })
    }

    /// Records a batch as ONE store job, so it is atomic and shares the group commit with
    /// other batches, and returns one outcome per accepted share, in order, once durable.
    ///
    /// Duplicates are found against the table and within the batch; totals of every device,
    /// miner and the fleet touched by the batch are updated in the same transaction (one
    /// read-modify-write per key); `rejected` is only counted. On `Err`, acknowledge nothing
    /// (see [`LedgerError`] for why that is enough).
    pub async fn record(
        &self,
        accepted: Vec<AcceptedShare>,
        rejected: Vec<Rejection>,
    ) -> Result<Vec<ShareOutcome>, LedgerError> {
        validate(&accepted, &rejected)?;
        if accepted.is_empty() && rejected.is_empty() {
            return Ok(Vec::new());
        }
        let state = Arc::clone(&self.state);
        let applied = self
            .store
            .write(move |txn| apply_batch(txn, &accepted, &rejected, &state.sequence))
            .await
            .map_err(|source| LedgerError::Store {
                action: "recording a share batch",
                source,
            })?;
        self.state.install(applied.sequence, applied.totals);
        Ok(applied.outcomes)
    }

    /// Durable totals of one device (zero if it never submitted).
    pub fn device_totals(&self, device: &str) -> Totals {
        let cache = self.state.cache();
        cache
            .devices
            .get(device)
            .map(|v| v.totals.clone())
            .unwrap_or_default()
    }

    /// Durable totals of one `MicroMiner` (`namespace/name`).
    pub fn miner_totals(&self, miner: &str) -> Totals {
        let cache = self.state.cache();
        cache
            .miners
            .get(miner)
            .map(|v| v.totals.clone())
            .unwrap_or_default()
    }

    /// Durable totals of the whole fleet.
    pub fn fleet_totals(&self) -> Totals {
        self.state.cache().fleet.totals.clone()
    }

    /// Deletes share records of headers below `header_id`, which the scheduler no longer
    /// accepts work for, keeping every total. Raises the prune floor first, in the same
    /// transaction as the first deletions, so a late share of a pruned header is answered
    /// [`ShareOutcome::Duplicate`] instead of being counted a second time. Works in chunks so that
    /// live share batches keep committing meanwhile. Returns how many records were removed.
    pub async fn prune_below(&self, header_id: u64) -> Result<u64, LedgerError> {
        let mut removed = 0u64;
        loop {
            let chunk = self
                .store
                .write(move |txn| prune_chunk(txn, header_id))
                .await
                .map_err(|source| LedgerError::Store {
                    action: "pruning share records",
                    source,
                })?;
            removed += chunk as u64;
            if chunk < PRUNE_CHUNK {
                return Ok(removed);
            }
        }
    }
}

fn validate(accepted: &[AcceptedShare], rejected: &[Rejection]) -> Result<(), LedgerError> {
    if let Some(bad) = accepted
        .iter()
        .find(|s| !(s.difficulty.is_finite() && s.difficulty >= 0.0))
    {
        return Err(LedgerError::InvalidDifficulty {
            device: bad.device.clone(),
            header_id: bad.key.header_id,
            nonce: bad.key.nonce,
            difficulty: bad.difficulty,
        });
    }
    if let Some(bad) = rejected
        .iter()
        .find(|r| r.reason == RejectReason::Unspecified)
    {
        return Err(LedgerError::UnspecifiedReason {
            device: bad.device.clone(),
        });
    }
    Ok(())
}

fn load_cache(txn: &ReadTransaction) -> Result<Cache, StoreError> {
    let mut cache = Cache::default();
    let Some(table) = store::open_read_table(txn, TOTALS)? else {
        return Ok(cache);
    };
    for entry in table.iter().map_err(StoreError::storage("ledger_totals"))? {
        let (key, value) = entry.map_err(StoreError::storage("ledger_totals"))?;
        let key = key.value();
        let corrupt = |reason: String| StoreError::Corrupt {
            table: "ledger_totals".to_owned(),
            key: key.to_owned(),
            reason,
        };
        let totals = Totals::decode(value.value()).map_err(corrupt)?;
        let Some((kind, name)) = parse_scope_key(key) else {
            return Err(corrupt("unknown totals scope".to_owned()));
        };
        let loaded = Versioned {
            sequence: 0,
            totals,
        };
        match kind {
            Kind::Fleet => cache.fleet = loaded,
            Kind::Device => {
                cache.devices.insert(name.to_owned(), loaded);
            }
            Kind::Miner => {
                cache.miners.insert(name.to_owned(), loaded);
            }
        }
    }
    Ok(cache)
}

fn prune_floor(txn: &WriteTransaction) -> Result<u64, StoreError> {
    let meta = store::open_table(txn, META)?;
    let floor = meta
        .get(PRUNE_FLOOR)
        .map_err(StoreError::storage("ledger_meta"))?
        .map(|v| v.value())
        .unwrap_or(0);
    Ok(floor)
}

/// Adds `f`'s change to the fleet's, the device's and the miner's deltas.
fn bump<'a>(
    deltas: &mut HashMap<(Kind, &'a str), Totals>,
    device: &'a str,
    miner: Option<&'a str>,
    f: impl Fn(&mut Totals),
) {
    f(deltas.entry((Kind::Fleet, "")).or_default());
    f(deltas.entry((Kind::Device, device)).or_default());
    if let Some(miner) = miner {
        f(deltas.entry((Kind::Miner, miner)).or_default());
    }
}

fn apply_batch(
    txn: &WriteTransaction,
    accepted: &[AcceptedShare],
    rejected: &[Rejection],
    sequence: &AtomicU64,
) -> Result<Applied, StoreError> {
    let floor = prune_floor(txn)?;
    let mut deltas: HashMap<(Kind, &str), Totals> = HashMap::new();
    let mut outcomes = Vec::with_capacity(accepted.len());
    {
        let mut shares = store::open_table(txn, SHARES)?;
        for share in accepted {
            let outcome = if share.key.header_id < floor {
                ShareOutcome::Duplicate
            } else {
                let key = share.key.to_bytes();
                // The table already holds this batch's earlier inserts, so one lookup finds
                // duplicates both across and within batches.
                let known = shares
                    .get(&key)
                    .map_err(StoreError::storage("ledger_shares"))?
                    .map(|record| record.value().0 == share.device);
                match known {
                    Some(true) if share.resubmitted => ShareOutcome::AlreadyRecorded,
                    Some(_) => ShareOutcome::Duplicate,
                    None => {
                        shares
                            .insert(
                                &key,
                                (
                                    share.device.as_str(),
                                    share.miner.as_str(),
                                    share.difficulty,
                                    share.time_unix_ms,
                                    share.block,
                                ),
                            )
                            .map_err(StoreError::storage("ledger_shares"))?;
                        ShareOutcome::Recorded
                    }
                }
            };
            let (device, miner) = (share.device.as_str(), Some(share.miner.as_str()));
            if outcome == ShareOutcome::Recorded && share.for_pool {
                pool::mark_pending(txn, share)?;
            }
            match outcome {
                ShareOutcome::Recorded => bump(&mut deltas, device, miner, |t| {
                    t.accepted += 1;
                    t.accepted_difficulty += share.difficulty;
                    t.blocks += u64::from(share.block);
                    t.last_share_unix_ms = t.last_share_unix_ms.max(Some(share.time_unix_ms));
                }),
                ShareOutcome::AlreadyRecorded => {}
                ShareOutcome::Duplicate => {
                    bump(&mut deltas, device, miner, |t| t.rejected.duplicate += 1)
                }
            }
            outcomes.push(outcome);
        }
    }
    for rejection in rejected {
        bump(
            &mut deltas,
            &rejection.device,
            rejection.miner.as_deref(),
            |t| {
                if let Some(count) = t.rejected.slot(rejection.reason) {
                    *count += 1;
                }
            },
        );
    }

    let sequence = sequence.fetch_add(1, Ordering::Relaxed) + 1;
    let mut table = store::open_table(txn, TOTALS)?;
    let mut updated = Vec::with_capacity(deltas.len());
    for ((kind, name), delta) in deltas {
        let key = scope_key(kind, name);
        let mut totals = match table
            .get(key.as_str())
            .map_err(StoreError::storage("ledger_totals"))?
        {
            Some(stored) => {
                Totals::decode(stored.value()).map_err(|reason| StoreError::Corrupt {
                    table: "ledger_totals".to_owned(),
                    key: key.clone(),
                    reason,
                })?
            }
            None => Totals::default(),
        };
        totals.merge(&delta);
        table
            .insert(key.as_str(), totals.encode().as_slice())
            .map_err(StoreError::storage("ledger_totals"))?;
        updated.push((kind, name.to_owned(), totals));
    }
    Ok(Applied {
        sequence,
        outcomes,
        totals: updated,
    })
}

fn prune_chunk(txn: &WriteTransaction, header_id: u64) -> Result<usize, StoreError> {
    {
        let mut meta = store::open_table(txn, META)?;
        let floor = meta
            .get(PRUNE_FLOOR)
            .map_err(StoreError::storage("ledger_meta"))?
            .map(|v| v.value())
            .unwrap_or(0);
        if header_id > floor {
            meta.insert(PRUNE_FLOOR, header_id)
                .map_err(StoreError::storage("ledger_meta"))?;
        }
    }
    let end = ShareKey {
        header_id,
        nonce: 0,
    }
    .to_bytes();
    pool::prune(txn, &end)?;
    let mut shares = store::open_table(txn, SHARES)?;
    let doomed = shares
        .range::<&[u8; SHARE_KEY_LEN]>(..&end)
        .map_err(StoreError::storage("ledger_shares"))?
        .take(PRUNE_CHUNK)
        .map(|entry| entry.map(|(key, _)| *key.value()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::storage("ledger_shares"))?;
    for key in &doomed {
        shares
            .remove(key)
            .map_err(StoreError::storage("ledger_shares"))?;
    }
    Ok(doomed.len())
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::io::{BufRead, BufReader, Write};
    use std::path::Path;
    use std::process::{Command, Stdio};

    use proptest::prelude::*;

    use super::*;

    const MINER: &str = "default/m";

    fn share(header_id: u64, nonce: u32, device: &str, resubmitted: bool) -> AcceptedShare {
        AcceptedShare {
            key: ShareKey { header_id, nonce },
            device: device.to_owned(),
            miner: MINER.to_owned(),
            difficulty: 2.0,
            time_unix_ms: 1_000 + i64::from(nonce),
            block: false,
            resubmitted,
            for_pool: false,
        }
    }

    fn open(path: &Path) -> Ledger {
        Ledger::open(Store::open(path).expect("open store")).expect("open ledger")
    }

    /// Every share record on disk, as key → device.
    fn records(ledger: &Ledger) -> HashMap<ShareKey, String> {
        let txn = ledger.store.read().expect("read");
        let Some(table) = store::open_read_table(&txn, SHARES).expect("open shares") else {
            return HashMap::new();
        };
        table
            .iter()
            .expect("iterate shares")
            .map(|entry| {
                let (key, value) = entry.expect("entry");
                (
                    ShareKey::from_bytes(key.value()),
                    value.value().0.to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn share_key_bytes_sort_like_numbers() {
        let keys = [
            ShareKey {
                header_id: 1,
                nonce: u32::MAX,
            },
            ShareKey {
                header_id: 2,
                nonce: 0,
            },
            ShareKey {
                header_id: 2,
                nonce: 1,
            },
            ShareKey {
                header_id: 256,
                nonce: 0,
            },
        ];
        for pair in keys.windows(2) {
            assert!(pair[0].to_bytes() < pair[1].to_bytes());
        }
        for key in keys {
            assert_eq!(ShareKey::from_bytes(&key.to_bytes()), key);
        }
    }

    #[test]
    fn totals_encoding_round_trips_and_refuses_garbage() {
        let totals = Totals {
            accepted: 7,
            accepted_difficulty: 0.125,
            blocks: 1,
            rejected: RejectCounts {
                low_difficulty: 1,
                duplicate: 2,
                stale: 3,
                out_of_range: 4,
                unknown_assignment: 5,
            },
            last_share_unix_ms: Some(-5),
        };
        assert_eq!(Totals::decode(&totals.encode()), Ok(totals));
        assert_eq!(
            Totals::decode(&Totals::default().encode()),
            Ok(Totals::default())
        );
        assert!(Totals::decode(&[1, 2, 3]).is_err());
        let mut bad = Totals::default().encode();
        bad[0] = 9;
        assert!(Totals::decode(&bad).is_err());
    }

    #[tokio::test]
    async fn after_the_store_reopens_totals_come_from_disk_and_an_uncertain_batch_counts_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.redb");
        let (store, faults) = store::flaky::open(&path);
        let ledger = Ledger::open(store.clone()).expect("open ledger");
        let outcomes = ledger
            .record(vec![share(1, 1, "d", false)], Vec::new())
            .await
            .expect("durable before the failure");
        assert_eq!(outcomes, [ShareOutcome::Recorded]);

        // fsync fails for the next batch: the device hears nothing, yet the batch reached the
        // file (the OS has it), as after a failed fsync it may.
        faults.sync.store(true, Ordering::SeqCst);
        let uncertain = vec![share(1, 2, "d", false), share(1, 3, "d", false)];
        assert!(
            ledger.record(uncertain.clone(), Vec::new()).await.is_err(),
            "a batch whose fsync failed is never acknowledged"
        );
        assert_eq!(
            ledger.fleet_totals().accepted,
            1,
            "nothing counted that was not durable"
        );
        faults.sync.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while store.health() != store::StoreHealth::Open {
            assert!(
                std::time::Instant::now() < deadline,
                "the store never reopened"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }

        // The reopened file holds the uncertain batch, and the totals say so before any other
        // share arrives (a scope that never writes again would otherwise read low forever).
        assert_eq!(ledger.fleet_totals().accepted, 3);
        assert_eq!(ledger.device_totals("d").accepted, 3);
        assert_eq!(ledger.miner_totals(MINER).accepted, 3);
        // The device resubmits what it never heard back about: acknowledged, counted nowhere.
        let resubmitted: Vec<AcceptedShare> = uncertain
            .into_iter()
            .map(|s| AcceptedShare {
                resubmitted: true,
                ..s
            })
            .collect();
        assert_eq!(
            ledger
                .record(resubmitted, Vec::new())
                .await
                .expect("recorded after the reopen"),
            [ShareOutcome::AlreadyRecorded, ShareOutcome::AlreadyRecorded]
        );
        assert_eq!(
            ledger
                .record(vec![share(1, 4, "d", false)], Vec::new())
                .await
                .expect("recorded after the reopen"),
            [ShareOutcome::Recorded]
        );
        let cached = ledger.device_totals("d");
        assert_eq!(cached.accepted, 4);
        assert_eq!(cached.rejected.total(), 0);
        drop(ledger);
        drop(store);

        let reopened = open(&path);
        assert_eq!(
            reopened.device_totals("d"),
            cached,
            "the cache was the disk"
        );
        assert_eq!(reopened.fleet_totals().accepted, 4);
    }

    #[tokio::test]
    async fn accepted_share_is_counted_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = open(&dir.path().join("l.redb"));
        let mut block = share(1, 10, "gw-1", false);
        block.block = true;
        let outcomes = ledger
            .record(vec![share(1, 9, "gw-1", false), block], vec![])
            .await
            .expect("record");
        assert_eq!(outcomes, [ShareOutcome::Recorded, ShareOutcome::Recorded]);
        let expected = Totals {
            accepted: 2,
            accepted_difficulty: 4.0,
            blocks: 1,
            rejected: RejectCounts::default(),
            last_share_unix_ms: Some(1_010),
        };
        assert_eq!(ledger.device_totals("gw-1"), expected);
        assert_eq!(ledger.miner_totals(MINER), expected);
        assert_eq!(ledger.fleet_totals(), expected);
        assert_eq!(ledger.device_totals("gw-2"), Totals::default());
        assert_eq!(records(&ledger).len(), 2);
    }

    #[tokio::test]
    async fn replay_is_duplicate_and_counted_as_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = open(&dir.path().join("l.redb"));
        ledger
            .record(vec![share(1, 1, "gw-1", false)], vec![])
            .await
            .expect("first");
        // Same device without the resubmitted flag, and another device even with it.
        let outcomes = ledger
            .record(
                vec![share(1, 1, "gw-1", false), share(1, 1, "gw-2", true)],
                vec![],
            )
            .await
            .expect("replays");
        assert_eq!(outcomes, [ShareOutcome::Duplicate, ShareOutcome::Duplicate]);
        assert!(!outcomes[0].is_accepted());
        assert_eq!(outcomes[0].reject_reason(), Some(RejectReason::Duplicate));
        let fleet = ledger.fleet_totals();
        assert_eq!(fleet.accepted, 1);
        assert_eq!(fleet.rejected.duplicate, 2);
        assert_eq!(ledger.device_totals("gw-1").rejected.duplicate, 1);
        assert_eq!(ledger.device_totals("gw-2").rejected.duplicate, 1);
        assert_eq!(ledger.device_totals("gw-2").accepted, 0);
        assert_eq!(
            records(&ledger)[&ShareKey {
                header_id: 1,
                nonce: 1
            }],
            "gw-1"
        );
    }

    #[tokio::test]
    async fn resubmitted_share_from_same_device_is_already_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = open(&dir.path().join("l.redb"));
        ledger
            .record(vec![share(1, 1, "gw-1", false)], vec![])
            .await
            .expect("first");
        let before = ledger.fleet_totals();
        let outcomes = ledger
            .record(
                vec![share(1, 1, "gw-1", true), share(1, 2, "gw-1", true)],
                vec![],
            )
            .await
            .expect("resubmit");
        // The known one is acknowledged without counting; the unknown one (lost before it was
        // durable) is recorded now.
        assert_eq!(
            outcomes,
            [ShareOutcome::AlreadyRecorded, ShareOutcome::Recorded]
        );
        assert!(outcomes[0].is_accepted());
        assert_eq!(ledger.fleet_totals().accepted, before.accepted + 1);
        assert_eq!(ledger.fleet_totals().rejected, RejectCounts::default());
    }

    #[tokio::test]
    async fn duplicates_inside_one_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = open(&dir.path().join("l.redb"));
        let outcomes = ledger
            .record(
                vec![
                    share(5, 1, "gw-1", false),
                    share(5, 1, "gw-1", false),
                    share(5, 1, "gw-2", false),
                    share(5, 1, "gw-1", true),
                    share(5, 2, "gw-2", false),
                ],
                vec![],
            )
            .await
            .expect("record");
        assert_eq!(
            outcomes,
            [
                ShareOutcome::Recorded,
                ShareOutcome::Duplicate,
                ShareOutcome::Duplicate,
                ShareOutcome::AlreadyRecorded,
                ShareOutcome::Recorded,
            ]
        );
        let fleet = ledger.fleet_totals();
        assert_eq!(fleet.accepted, 2);
        assert_eq!(fleet.rejected.duplicate, 2);
        assert_eq!(records(&ledger).len(), 2);
    }

    #[tokio::test]
    async fn rejections_are_counted_per_reason_and_scope() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = open(&dir.path().join("l.redb"));
        let rejection = |device: &str, miner: Option<&str>, reason| Rejection {
            device: device.to_owned(),
            miner: miner.map(str::to_owned),
            reason,
        };
        ledger
            .record(
                vec![],
                vec![
                    rejection("gw-1", Some(MINER), RejectReason::LowDifficulty),
                    rejection("gw-1", Some(MINER), RejectReason::Stale),
                    rejection("gw-1", None, RejectReason::UnknownAssignment),
                    rejection("gw-2", Some("other/m"), RejectReason::OutOfRange),
                ],
            )
            .await
            .expect("record");
        let fleet = ledger.fleet_totals();
        assert_eq!(
            fleet.rejected,
            RejectCounts {
                low_difficulty: 1,
                duplicate: 0,
                stale: 1,
                out_of_range: 1,
                unknown_assignment: 1
            }
        );
        assert_eq!(fleet.accepted, 0);
        assert_eq!(ledger.device_totals("gw-1").rejected.total(), 3);
        assert_eq!(ledger.miner_totals(MINER).rejected.total(), 2);
        assert_eq!(ledger.miner_totals("other/m").rejected.out_of_range, 1);
    }

    #[tokio::test]
    async fn invalid_input_is_refused_and_records_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = open(&dir.path().join("l.redb"));
        let mut nan = share(1, 2, "gw-1", false);
        nan.difficulty = f64::NAN;
        let refused = ledger
            .record(vec![share(1, 1, "gw-1", false), nan], vec![])
            .await;
        assert!(matches!(
            refused,
            Err(LedgerError::InvalidDifficulty { nonce: 2, .. })
        ));
        let unspecified = Rejection {
            device: "gw-1".to_owned(),
            miner: None,
            reason: RejectReason::Unspecified,
        };
        let refused = ledger
            .record(vec![share(1, 1, "gw-1", false)], vec![unspecified])
            .await;
        assert!(matches!(
            refused,
            Err(LedgerError::UnspecifiedReason { .. })
        ));
        assert_eq!(ledger.fleet_totals(), Totals::default());
        assert!(records(&ledger).is_empty());
    }

    #[tokio::test]
    async fn totals_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.redb");
        let ledger = open(&path);
        let mut half = share(2, 3, "gw-2", false);
        half.difficulty = 0.5;
        half.miner = "other/m".to_owned();
        ledger
            .record(
                vec![share(1, 1, "gw-1", false), half, share(1, 1, "gw-2", false)],
                vec![Rejection {
                    device: "gw-1".to_owned(),
                    miner: Some(MINER.to_owned()),
                    reason: RejectReason::Stale,
                }],
            )
            .await
            .expect("record");
        let before = (
            ledger.fleet_totals(),
            ledger.device_totals("gw-1"),
            ledger.device_totals("gw-2"),
            ledger.miner_totals(MINER),
            ledger.miner_totals("other/m"),
        );
        drop(ledger);
        let ledger = open(&path);
        let after = (
            ledger.fleet_totals(),
            ledger.device_totals("gw-1"),
            ledger.device_totals("gw-2"),
            ledger.miner_totals(MINER),
            ledger.miner_totals("other/m"),
        );
        assert_eq!(before, after);
        assert_eq!(after.0.accepted, 2);
        assert_eq!(after.0.accepted_difficulty, 2.5);
        assert_eq!(after.0.rejected.duplicate, 1);
        assert_eq!(after.0.rejected.stale, 1);
        // And the records survive too: replays are still duplicates.
        let outcomes = ledger
            .record(vec![share(1, 1, "gw-3", false)], vec![])
            .await
            .expect("replay");
        assert_eq!(outcomes, [ShareOutcome::Duplicate]);
    }

    #[tokio::test]
    async fn prune_keeps_totals_and_refuses_pruned_headers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.redb");
        let ledger = open(&path);
        let batch: Vec<_> = (0..3u64)
            .flat_map(|h| (0..4u32).map(move |n| share(h, n, "gw-1", false)))
            .collect();
        ledger.record(batch, vec![]).await.expect("record");
        let before = ledger.fleet_totals();
        assert_eq!(before.accepted, 12);

        assert_eq!(ledger.prune_below(2).await.expect("prune"), 8);
        assert_eq!(
            ledger.prune_below(1).await.expect("lower prune is a no-op"),
            0
        );
        assert_eq!(ledger.fleet_totals(), before);
        let left: HashSet<u64> = records(&ledger).keys().map(|k| k.header_id).collect();
        assert_eq!(left, HashSet::from([2]));

        // A late resubmission of a pruned share must not be counted a second time.
        let outcomes = ledger
            .record(
                vec![share(1, 0, "gw-1", true), share(2, 0, "gw-1", true)],
                vec![],
            )
            .await
            .expect("late");
        assert_eq!(
            outcomes,
            [ShareOutcome::Duplicate, ShareOutcome::AlreadyRecorded]
        );
        assert_eq!(ledger.fleet_totals().accepted, 12);
        assert_eq!(ledger.fleet_totals().rejected.duplicate, 1);

        drop(ledger);
        let ledger = open(&path);
        assert_eq!(ledger.fleet_totals().accepted, 12);
        let outcomes = ledger
            .record(vec![share(0, 9, "gw-1", false)], vec![])
            .await
            .expect("after reopen");
        assert_eq!(
            outcomes,
            [ShareOutcome::Duplicate],
            "the prune floor is persisted"
        );
    }

    #[tokio::test]
    async fn prune_works_in_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = open(&dir.path().join("l.redb"));
        let total = PRUNE_CHUNK as u32 * 2 + 17;
        for start in (0..total).step_by(4096) {
            let batch = (start..(start + 4096).min(total))
                .map(|n| share(1, n, "gw-1", false))
                .collect();
            ledger.record(batch, vec![]).await.expect("record");
        }
        let commits_before = ledger.store.stats().commits;
        assert_eq!(
            ledger.prune_below(2).await.expect("prune"),
            u64::from(total)
        );
        assert_eq!(ledger.store.stats().commits - commits_before, 3);
        assert!(records(&ledger).is_empty());
        assert_eq!(ledger.fleet_totals().accepted, u64::from(total));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_batches_keep_cache_equal_to_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.redb");
        let ledger = open(&path);
        let mut tasks = Vec::new();
        for task in 0..16u32 {
            let ledger = ledger.clone();
            tasks.push(tokio::spawn(async move {
                for round in 0..20u32 {
                    // All tasks share one device and miner, and overlap on purpose.
                    let batch = (0..8u32)
                        .map(|i| share(u64::from(round), task * 4 + i, "gw-shared", false))
                        .collect();
                    ledger.record(batch, vec![]).await.expect("record");
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        let cached = (ledger.fleet_totals(), ledger.device_totals("gw-shared"));
        assert_eq!(cached.0.accepted as usize, records(&ledger).len());
        assert_eq!(cached.0.accepted + cached.0.rejected.duplicate, 16 * 20 * 8);
        assert!(ledger.store.stats().commits < ledger.store.stats().jobs);
        drop(ledger);
        let reopened = open(&path);
        assert_eq!(
            (reopened.fleet_totals(), reopened.device_totals("gw-shared")),
            cached
        );
    }

    // ---- property: random batches with crash points never double count ----------------------

    #[derive(Clone, Debug)]
    enum Step {
        /// (header, nonce, device, resubmitted, difficulty exponent), (device, reason)
        Batch(Vec<(u64, u32, usize, bool, i32)>, Vec<(usize, i32)>),
        /// Drop the ledger and store, reopen from the same file.
        Crash,
        Prune(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        let accepted = prop::collection::vec(
            (0u64..4, 0u32..5, 0usize..3, any::<bool>(), -1i32..2),
            0..10,
        );
        let rejected = prop::collection::vec((0usize..3, 1i32..=5), 0..3);
        prop_oneof![
            6 => (accepted, rejected).prop_map(|(a, r)| Step::Batch(a, r)),
            2 => Just(Step::Crash),
            1 => (0u64..3).prop_map(Step::Prune),
        ]
    }

    const DEVICES: [&str; 3] = ["gw-a", "gw-b", "gw-c"];
    const MINERS: [&str; 2] = ["ns/m0", "ns/m1"];

    /// The reference semantics, applied share by share.
    #[derive(Default)]
    struct Model {
        records: HashMap<ShareKey, usize>,
        ever_recorded: HashSet<ShareKey>,
        floor: u64,
        devices: HashMap<String, Totals>,
        miners: HashMap<String, Totals>,
        fleet: Totals,
    }

    impl Model {
        fn count(&mut self, device: usize, miner: Option<usize>, f: impl Fn(&mut Totals)) {
            f(&mut self.fleet);
            f(self.devices.entry(DEVICES[device].to_owned()).or_default());
            if let Some(miner) = miner {
                f(self.miners.entry(MINERS[miner].to_owned()).or_default());
            }
        }
    }

    fn run_steps(path: &Path, steps: &[Step]) -> Result<(), TestCaseError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut model = Model::default();
        let mut ledger = open(path);
        for step in steps {
            match step {
                Step::Crash => {
                    drop(ledger);
                    ledger = open(path);
                }
                Step::Prune(header) => {
                    runtime
                        .block_on(ledger.prune_below(*header))
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    model.floor = model.floor.max(*header);
                    let floor = model.floor;
                    model.records.retain(|key, _| key.header_id >= floor);
                }
                Step::Batch(accepted, rejected) => {
                    let mut expected = Vec::new();
                    let shares: Vec<AcceptedShare> = accepted
                        .iter()
                        .map(|&(header_id, nonce, device, resubmitted, exp)| {
                            let key = ShareKey { header_id, nonce };
                            let miner = (header_id as usize + device) % 2;
                            let difficulty = 2f64.powi(exp);
                            let outcome = if header_id < model.floor {
                                ShareOutcome::Duplicate
                            } else {
                                match model.records.get(&key) {
                                    Some(&owner) if owner == device && resubmitted => {
                                        ShareOutcome::AlreadyRecorded
                                    }
                                    Some(_) => ShareOutcome::Duplicate,
                                    None => ShareOutcome::Recorded,
                                }
                            };
                            match outcome {
                                ShareOutcome::Recorded => {
                                    model.records.insert(key, device);
                                    prop_assert!(
                                        model.ever_recorded.insert(key),
                                        "{key:?} recorded twice by the model"
                                    );
                                    model.count(device, Some(miner), |t| {
                                        t.accepted += 1;
                                        t.accepted_difficulty += difficulty;
                                        t.last_share_unix_ms =
                                            t.last_share_unix_ms.max(Some(i64::from(nonce)));
                                    });
                                }
                                ShareOutcome::AlreadyRecorded => {}
                                ShareOutcome::Duplicate => {
                                    model.count(device, Some(miner), |t| t.rejected.duplicate += 1)
                                }
                            }
                            expected.push(outcome);
                            Ok(AcceptedShare {
                                key,
                                device: DEVICES[device].to_owned(),
                                miner: MINERS[miner].to_owned(),
                                difficulty,
                                time_unix_ms: i64::from(nonce),
                                block: false,
                                resubmitted,
                                for_pool: false,
                            })
                        })
                        .collect::<Result<_, TestCaseError>>()?;
                    let rejections: Vec<Rejection> = rejected
                        .iter()
                        .map(|&(device, reason)| {
                            let reason =
                                RejectReason::try_from(reason).unwrap_or(RejectReason::Stale);
                            let miner = (device % 2 == 0).then_some(device % 2);
                            model.count(device, miner, |t| {
                                if let Some(slot) = t.rejected.slot(reason) {
                                    *slot += 1;
                                }
                            });
                            Rejection {
                                device: DEVICES[device].to_owned(),
                                miner: miner.map(|m| MINERS[m].to_owned()),
                                reason,
                            }
                        })
                        .collect();
                    let outcomes = runtime
                        .block_on(ledger.record(shares, rejections))
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(outcomes, expected);
                }
            }
            check(&ledger, &model)?;
        }
        drop(ledger);
        check(&open(path), &model)
    }

    fn check(ledger: &Ledger, model: &Model) -> Result<(), TestCaseError> {
        let fleet = ledger.fleet_totals();
        prop_assert_eq!(&fleet, &model.fleet);
        prop_assert_eq!(fleet.accepted as usize, model.ever_recorded.len());
        let mut accepted = 0;
        let mut difficulty = 0.0;
        let mut rejected = RejectCounts::default();
        for device in DEVICES {
            let totals = ledger.device_totals(device);
            prop_assert_eq!(
                &totals,
                &model.devices.get(device).cloned().unwrap_or_default()
            );
            accepted += totals.accepted;
            difficulty += totals.accepted_difficulty;
            rejected.add(&totals.rejected);
        }
        prop_assert_eq!(accepted, fleet.accepted);
        prop_assert_eq!(difficulty, fleet.accepted_difficulty);
        prop_assert_eq!(rejected, fleet.rejected);
        let mut miner_accepted = 0;
        for miner in MINERS {
            let totals = ledger.miner_totals(miner);
            prop_assert_eq!(
                &totals,
                &model.miners.get(miner).cloned().unwrap_or_default()
            );
            miner_accepted += totals.accepted;
        }
        prop_assert_eq!(miner_accepted, fleet.accepted);
        let on_disk = records(ledger);
        let expected: HashMap<ShareKey, String> = model
            .records
            .iter()
            .map(|(k, d)| (*k, DEVICES[*d].to_owned()))
            .collect();
        prop_assert_eq!(on_disk, expected);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn random_batches_with_crashes_never_double_count(steps in prop::collection::vec(step(), 1..24)) {
            let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
            run_steps(&dir.path().join("l.redb"), &steps)?;
        }
    }

    // ---- crash safety: SIGKILL a child process mid-stream ----------------------------------

    const CRASH_DIR_ENV: &str = "MICROMINE_LEDGER_CRASH_DIR";
    const CRASH_TEST: &str = "ledger::tests::sigkill_mid_stream_loses_no_acknowledged_share";

    /// The child half of `sigkill_mid_stream_loses_no_acknowledged_share` (the same test
    /// re-run with `CRASH_DIR_ENV` set): records batches from several tasks and prints every
    /// acknowledged share, until it is killed.
    fn crash_child_records_until_killed(dir: String) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let ledger = open(&Path::new(&dir).join("ledger.redb"));
            let mut tasks = Vec::new();
            for task in 0..8u64 {
                let ledger = ledger.clone();
                tasks.push(tokio::spawn(async move {
                    let device = format!("gw-{task}");
                    // Bounded, so a child nobody kills still ends.
                    for round in 0..5_000u32 {
                        let header_id = task * 1_000_000 + u64::from(round / 16);
                        let mut batch: Vec<AcceptedShare> = (0..8u32)
                            .map(|i| share(header_id, (round % 16) * 8 + i, &device, false))
                            .collect();
                        if round % 5 == 4 {
                            // A replay of the previous round's first share.
                            batch.push(share(
                                task * 1_000_000 + u64::from((round - 1) / 16),
                                ((round - 1) % 16) * 8,
                                &device,
                                false,
                            ));
                        }
                        let outcomes = ledger.record(batch.clone(), vec![]).await.expect("record");
                        let mut out = std::io::stdout().lock();
                        for (share, outcome) in batch.iter().zip(outcomes) {
                            if outcome.is_accepted() {
                                writeln!(
                                    out,
                                    "ACK {} {} {}",
                                    share.key.header_id, share.key.nonce, share.device
                                )
                                .expect("stdout");
                            }
                        }
                        out.flush().expect("flush");
                    }
                }));
            }
            for task in tasks {
                task.await.expect("task");
            }
        });
    }

    #[test]
    fn sigkill_mid_stream_loses_no_acknowledged_share() {
        if let Ok(dir) = std::env::var(CRASH_DIR_ENV) {
            crash_child_records_until_killed(dir);
            return;
        }
        const KILL_AFTER: usize = 4_000;
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = std::env::current_exe().expect("test binary");
        let mut child = Command::new(exe)
            .args([CRASH_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CRASH_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut acked: Vec<(ShareKey, String)> = Vec::new();
        let mut killed = false;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read child stdout");
            let mut fields = line.split(' ');
            let (Some("ACK"), Some(header), Some(nonce), Some(device), None) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                continue;
            };
            let (Ok(header_id), Ok(nonce)) = (header.parse(), nonce.parse()) else {
                // The last line may be cut short by the kill: not a complete acknowledgement.
                continue;
            };
            acked.push((ShareKey { header_id, nonce }, device.to_owned()));
            if !killed && acked.len() >= KILL_AFTER {
                child.kill().expect("SIGKILL the child");
                killed = true;
            }
        }
        let status = child.wait().expect("wait for child");
        assert!(
            killed,
            "the child finished before it could be killed: {status}"
        );
        assert!(
            !status.success(),
            "the child must die by SIGKILL, not finish: {status}"
        );

        let ledger = open(&dir.path().join("ledger.redb"));
        let on_disk = records(&ledger);
        for (key, device) in &acked {
            assert_eq!(
                on_disk.get(key),
                Some(device),
                "acknowledged share {key:?} lost"
            );
        }
        let fleet = ledger.fleet_totals();
        assert_eq!(
            fleet.accepted as usize,
            on_disk.len(),
            "totals must equal present records"
        );
        let per_device: u64 = (0..8)
            .map(|t| ledger.device_totals(&format!("gw-{t}")).accepted)
            .sum();
        assert_eq!(per_device, fleet.accepted);

        // The devices learn nothing from the crash and resubmit what they had sent: every
        // acknowledged share is acknowledged again and nothing is counted twice.
        let resubmitted: Vec<AcceptedShare> = acked
            .iter()
            .map(|(key, device)| share(key.header_id, key.nonce, device, true))
            .collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let outcomes = runtime
            .block_on(ledger.record(resubmitted, vec![]))
            .expect("resubmit");
        assert!(outcomes.iter().all(|o| *o == ShareOutcome::AlreadyRecorded));
        assert_eq!(ledger.fleet_totals(), fleet);
    }
}
