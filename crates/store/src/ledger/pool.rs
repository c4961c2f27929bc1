//! The pool's verdicts on shares the ledger recorded (pool work only), each counted once.
//!
//! A share a device found on pool work is first recorded and acknowledged like any other
//! (the device is credited for its share target); if it also meets the pool's difficulty
//! it is submitted upstream, and the pool's answer lands here against the same share key,
//! device and MicroMiner: accepted (with the pool difficulty credited) or rejected with
//! the reason. `ledger_pool_verdicts` maps the share key to (accepted, reason), so an
//! answer seen twice counts once; `ledger_pool_totals` maps the same scope keys as the
//! share totals to a small JSON record (pool answers are rare next to shares).
//!
//! A share that goes upstream is marked pending in `ledger_pool_pending` in the same
//! transaction that records it for the device, and the mark goes in the transaction that
//! records the pool's verdict. So every such share ends with exactly one verdict: one the
//! controller never got (it stopped first) is found pending at the next start and settled
//! as `session-lost` ([`Ledger::settle_pending_pool_shares`]), never silently dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{Kind, Ledger, LedgerError, SHARE_KEY_LEN, ShareKey, parse_scope_key, scope_key};
use crate::store::{self, StoreError};

const VERDICTS: TableDefinition<&[u8; SHARE_KEY_LEN], (bool, &str)> =
    TableDefinition::new("ledger_pool_verdicts");
const POOL_TOTALS: TableDefinition<&str, &str> = TableDefinition::new("ledger_pool_totals");
/// Share key → (device, miner, difficulty) of shares awaiting the pool's verdict.
const PENDING: TableDefinition<&[u8; SHARE_KEY_LEN], (&str, &str, f64)> =
    TableDefinition::new("ledger_pool_pending");

/// What a pool said about one recorded share.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolVerdict {
    /// The share (as recorded in the share ledger).
    pub key: ShareKey,
    /// The device that found it.
    pub device: String,
    /// The MicroMiner, `namespace/name`.
    pub miner: String,
    /// Whether the pool accepted it.
    pub accepted: bool,
    /// Why not, as a status label (`stale`, `duplicate`, `low-difficulty`, ...).
    pub reason: Option<&'static str>,
    /// The pool difficulty it counts for when accepted.
    pub difficulty: f64,
}

/// Pool answers of a device, a MicroMiner or the fleet.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Debug)]
#[serde(rename_all = "camelCase")]
pub struct PoolTotals {
    /// Shares the pool accepted.
    pub accepted: u64,
    /// Sum of their pool difficulty.
    pub accepted_difficulty: f64,
    /// Shares the pool did not accept, by reason.
    pub rejected: BTreeMap<String, u64>,
}

impl PoolTotals {
    /// Whether no pool ever answered (builtin work).
    pub fn is_empty(&self) -> bool {
        self.accepted == 0 && self.rejected.is_empty()
    }

    /// Every rejection.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    fn count(&mut self, verdict: &PoolVerdict) {
        if verdict.accepted {
            self.accepted += 1;
            self.accepted_difficulty += verdict.difficulty;
        } else {
            *self
                .rejected
                .entry(verdict.reason.unwrap_or("other").to_string())
                .or_default() += 1;
        }
    }

    fn merge(&mut self, delta: &PoolTotals) {
        self.accepted += delta.accepted;
        self.accepted_difficulty += delta.accepted_difficulty;
        for (reason, count) in &delta.rejected {
            *self.rejected.entry(reason.clone()).or_default() += count;
        }
    }
}

/// The cached pool totals by scope key, with the sequence of the commit that wrote them.
pub(super) type PoolCache = HashMap<String, (u64, PoolTotals)>;

impl Ledger {
    /// Records pool verdicts in one store job, once durable. A verdict for a share that
    /// already has one is ignored (the pool was asked twice). Returns how many counted.
    pub async fn record_pool_verdicts(
        &self,
        verdicts: Vec<PoolVerdict>,
    ) -> Result<usize, LedgerError> {
        if let Some(bad) = verdicts
            .iter()
            .find(|v| !(v.difficulty.is_finite() && v.difficulty >= 0.0))
        {
            return Err(LedgerError::InvalidDifficulty {
                device: bad.device.clone(),
                header_id: bad.key.header_id,
                nonce: bad.key.nonce,
                difficulty: bad.difficulty,
            });
        }
        if verdicts.is_empty() {
            return Ok(0);
        }
        let state = std::sync::Arc::clone(&self.state);
        let (sequence, counted, updated) = self
            .store
            .write(move |txn| {
                let sequence = state.sequence.fetch_add(1, Ordering::Relaxed) + 1;
                apply(txn, &verdicts).map(|(counted, updated)| (sequence, counted, updated))
            })
            .await
            .map_err(|source| LedgerError::Store {
                action: "recording pool verdicts",
                source,
            })?;
        let mut cache = self.state.pool_cache();
        for (key, totals) in updated {
            let slot = cache.entry(key).or_default();
            if sequence > slot.0 {
                *slot = (sequence, totals);
            }
        }
        Ok(counted)
    }

    /// Settles every share still pending from before this start as `session-lost`: the
    /// pool session it was built for ended with the previous process. Returns how many.
    pub async fn settle_pending_pool_shares(&self) -> Result<usize, LedgerError> {
        let txn = self.store.read().map_err(|source| LedgerError::Store {
            action: "reading pending pool shares",
            source,
        })?;
        let pending: Vec<PoolVerdict> = match store::open_read_table(&txn, PENDING) {
            Ok(Some(table)) => table
                .iter()
                .and_then(|entries| {
                    entries
                        .map(|entry| {
                            entry.map(|(key, value)| {
                                let (device, miner, difficulty) = value.value();
                                PoolVerdict {
                                    key: ShareKey::from_bytes(key.value()),
                                    device: device.to_owned(),
                                    miner: miner.to_owned(),
                                    accepted: false,
                                    reason: Some("session-lost"),
                                    difficulty,
                                }
                            })
                        })
                        .collect()
                })
                .map_err(|e| LedgerError::Store {
                    action: "reading pending pool shares",
                    source: StoreError::storage("ledger_pool_pending")(e),
                })?,
            Ok(None) => Vec::new(),
            Err(source) => {
                return Err(LedgerError::Store {
                    action: "reading pending pool shares",
                    source,
                });
            }
        };
        drop(txn);
        let settled = pending.len();
        if settled > 0 {
            tracing::warn!(
                shares = settled,
                "shares were still waiting for the pool when the controller stopped; counted as session-lost"
            );
        }
        self.record_pool_verdicts(pending).await?;
        Ok(settled)
    }

    /// Pool answers for one device.
    pub fn device_pool_totals(&self, device: &str) -> PoolTotals {
        self.pool_totals(&scope_key(Kind::Device, device))
    }

    /// Pool answers for one MicroMiner (`namespace/name`).
    pub fn miner_pool_totals(&self, miner: &str) -> PoolTotals {
        self.pool_totals(&scope_key(Kind::Miner, miner))
    }

    /// Pool answers for the whole fleet.
    pub fn fleet_pool_totals(&self) -> PoolTotals {
        self.pool_totals(&scope_key(Kind::Fleet, ""))
    }

    fn pool_totals(&self, key: &str) -> PoolTotals {
        self.state
            .pool_cache()
            .get(key)
            .map(|(_, t)| t.clone())
            .unwrap_or_default()
    }
}

fn apply(
    txn: &WriteTransaction,
    verdicts: &[PoolVerdict],
) -> Result<(usize, Vec<(String, PoolTotals)>), StoreError> {
    let mut deltas: HashMap<String, PoolTotals> = HashMap::new();
    let mut counted = 0;
    {
        let mut table = store::open_table(txn, VERDICTS)?;
        let mut pending = store::open_table(txn, PENDING)?;
        for verdict in verdicts {
            let key = verdict.key.to_bytes();
            pending
                .remove(&key)
                .map_err(StoreError::storage("ledger_pool_pending"))?;
            if table
                .get(&key)
                .map_err(StoreError::storage("ledger_pool_verdicts"))?
                .is_some()
            {
                continue;
            }
            table
                .insert(&key, (verdict.accepted, verdict.reason.unwrap_or("")))
                .map_err(StoreError::storage("ledger_pool_verdicts"))?;
            counted += 1;
            for scope in [
                scope_key(Kind::Fleet, ""),
                scope_key(Kind::Device, &verdict.device),
                scope_key(Kind::Miner, &verdict.miner),
            ] {
                deltas.entry(scope).or_default().count(verdict);
            }
        }
    }
    let mut table = store::open_table(txn, POOL_TOTALS)?;
    let mut updated = Vec::with_capacity(deltas.len());
    for (key, delta) in deltas {
        let mut totals = match table
            .get(key.as_str())
            .map_err(StoreError::storage("ledger_pool_totals"))?
        {
            Some(stored) => decode(&key, stored.value())?,
            None => PoolTotals::default(),
        };
        totals.merge(&delta);
        let text = serde_json::to_string(&totals).map_err(|e| StoreError::Corrupt {
            table: "ledger_pool_totals".to_owned(),
            key: key.clone(),
            reason: e.to_string(),
        })?;
        table
            .insert(key.as_str(), text.as_str())
            .map_err(StoreError::storage("ledger_pool_totals"))?;
        updated.push((key, totals));
    }
    Ok((counted, updated))
}

/// Marks a share recorded for its device as awaiting the pool's verdict; called inside
/// the transaction that records it.
pub(super) fn mark_pending(
    txn: &WriteTransaction,
    share: &super::AcceptedShare,
) -> Result<(), StoreError> {
    let mut table = store::open_table(txn, PENDING)?;
    // The difficulty only counts for an accepted verdict, which a pending share that is
    // settled at start never gets.
    table
        .insert(
            &share.key.to_bytes(),
            (
                share.device.as_str(),
                share.miner.as_str(),
                share.difficulty,
            ),
        )
        .map_err(StoreError::storage("ledger_pool_pending"))?;
    Ok(())
}

fn decode(key: &str, text: &str) -> Result<PoolTotals, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        table: "ledger_pool_totals".to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// The persisted pool totals, for the cache at open and after the store reopened.
pub(super) fn load(txn: &ReadTransaction) -> Result<PoolCache, StoreError> {
    let mut cache = PoolCache::new();
    let Some(table) = store::open_read_table(txn, POOL_TOTALS)? else {
        return Ok(cache);
    };
    for entry in table
        .iter()
        .map_err(StoreError::storage("ledger_pool_totals"))?
    {
        let (key, value) = entry.map_err(StoreError::storage("ledger_pool_totals"))?;
        let key = key.value();
        if parse_scope_key(key).is_none() {
            return Err(StoreError::Corrupt {
                table: "ledger_pool_totals".to_owned(),
                key: key.to_owned(),
                reason: "unknown totals scope".to_owned(),
            });
        }
        cache.insert(key.to_owned(), (0, decode(key, value.value())?));
    }
    Ok(cache)
}

/// Drops verdicts of shares below `end` (pruned with their share records); totals stay.
pub(super) fn prune(txn: &WriteTransaction, end: &[u8; SHARE_KEY_LEN]) -> Result<(), StoreError> {
    let mut table = store::open_table(txn, VERDICTS)?;
    let doomed = table
        .range::<&[u8; SHARE_KEY_LEN]>(..end)
        .map_err(StoreError::storage("ledger_pool_verdicts"))?
        .map(|entry| entry.map(|(key, _)| *key.value()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::storage("ledger_pool_verdicts"))?;
    for key in &doomed {
        table
            .remove(key)
            .map_err(StoreError::storage("ledger_pool_verdicts"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn verdict(
        nonce: u32,
        device: &str,
        accepted: bool,
        reason: Option<&'static str>,
    ) -> PoolVerdict {
        PoolVerdict {
            key: ShareKey {
                header_id: 7,
                nonce,
            },
            device: device.into(),
            miner: "ns/m".into(),
            accepted,
            reason,
            difficulty: 0.5,
        }
    }

    fn pool_share(nonce: u32) -> super::super::AcceptedShare {
        super::super::AcceptedShare {
            key: ShareKey {
                header_id: 9,
                nonce,
            },
            device: "a".into(),
            miner: "ns/m".into(),
            difficulty: 0.25,
            time_unix_ms: 1,
            block: false,
            resubmitted: false,
            for_pool: true,
        }
    }

    #[tokio::test]
    async fn a_share_the_pool_never_answered_is_settled_at_the_next_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("store.redb");
        {
            let ledger = Ledger::open(Store::open(&path).expect("store")).expect("ledger");
            let mut builtin = pool_share(3);
            builtin.for_pool = false;
            ledger
                .record(vec![pool_share(1), pool_share(2), builtin], Vec::new())
                .await
                .expect("recorded");
            // The pool answered one before the controller stopped.
            ledger
                .record_pool_verdicts(vec![PoolVerdict {
                    key: pool_share(1).key,
                    device: "a".into(),
                    miner: "ns/m".into(),
                    accepted: true,
                    reason: None,
                    difficulty: 0.5,
                }])
                .await
                .expect("verdict");
        }
        let ledger = Ledger::open(Store::open(&path).expect("store")).expect("ledger");
        assert_eq!(
            ledger.settle_pending_pool_shares().await.expect("settled"),
            1
        );
        let totals = ledger.device_pool_totals("a");
        assert_eq!(totals.accepted, 1);
        assert_eq!(totals.rejected.get("session-lost"), Some(&1));
        assert_eq!(
            totals.rejected_total(),
            1,
            "the builtin share was never pending"
        );
        // Settled once: a second start finds nothing.
        assert_eq!(
            ledger.settle_pending_pool_shares().await.expect("settled"),
            0
        );
    }

    #[tokio::test]
    async fn verdicts_count_once_per_share_survive_a_restart_and_pruning() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("store.redb");
        {
            let ledger = Ledger::open(Store::open(&path).expect("store")).expect("ledger");
            let counted = ledger
                .record_pool_verdicts(vec![
                    verdict(1, "a", true, None),
                    verdict(2, "a", false, Some("stale")),
                    verdict(3, "b", false, Some("duplicate")),
                    // The same share answered twice (a resubmission after a reconnect).
                    verdict(1, "a", false, Some("duplicate")),
                ])
                .await
                .expect("recorded");
            assert_eq!(counted, 3);
            assert_eq!(
                ledger
                    .record_pool_verdicts(vec![verdict(3, "b", true, None)])
                    .await
                    .expect("recorded"),
                0
            );
            let a = ledger.device_pool_totals("a");
            assert_eq!(
                (a.accepted, a.accepted_difficulty, a.rejected_total()),
                (1, 0.5, 1)
            );
            assert_eq!(
                ledger.device_pool_totals("b").rejected.get("duplicate"),
                Some(&1)
            );
            let m = ledger.miner_pool_totals("ns/m");
            assert_eq!((m.accepted, m.rejected_total()), (1, 2));
            assert_eq!(ledger.fleet_pool_totals(), m);
            assert!(
                ledger
                    .record_pool_verdicts(vec![PoolVerdict {
                        difficulty: f64::NAN,
                        ..verdict(9, "a", true, None)
                    }])
                    .await
                    .is_err()
            );
            ledger.prune_below(8).await.expect("pruned");
            // Pruned: the verdict record is gone, the totals stay.
            assert_eq!(ledger.miner_pool_totals("ns/m"), m);
        }
        let ledger = Ledger::open(Store::open(&path).expect("store")).expect("ledger");
        let m = ledger.miner_pool_totals("ns/m");
        assert_eq!((m.accepted, m.rejected_total()), (1, 2));
        assert_eq!(m.rejected.get("stale"), Some(&1));
    }
}
