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
mod tests;
