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
                        let reason = RejectReason::try_from(reason).unwrap_or(RejectReason::Stale);
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
