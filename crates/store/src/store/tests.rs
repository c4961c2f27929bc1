use std::collections::BTreeSet;

use super::*;

const NUMBERS: TableDefinition<&str, u64> = TableDefinition::new("numbers");
const DOCS: JsonTable = TableDefinition::new("docs");

fn put(txn: &WriteTransaction, key: &str, value: u64) -> Result<(), StoreError> {
    open_table(txn, NUMBERS)?
        .insert(key, value)
        .map_err(StoreError::storage("numbers"))?;
    Ok(())
}

fn keys(store: &Store) -> BTreeSet<String> {
    let txn = store.read().expect("read snapshot");
    let Some(table) = open_read_table(&txn, NUMBERS).expect("open numbers") else {
        return BTreeSet::new();
    };
    table
        .iter()
        .expect("iterate numbers")
        .map(|entry| entry.expect("entry").0.value().to_owned())
        .collect()
}

/// Blocks the writer thread inside a job until the returned sender is used or dropped,
/// so that the jobs queued meanwhile are taken as one batch.
fn hold_writer(
    store: &Store,
) -> (
    mpsc::Sender<()>,
    impl Future<Output = Result<(), StoreError>> + use<>,
) {
    let (release, gate) = mpsc::channel::<()>();
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let held = store.write(move |_txn| {
        let _ = started_tx.send(());
        let _ = gate.recv();
        Ok(())
    });
    started_rx.recv().expect("gate job started");
    (release, held)
}

async fn wait_submitted(store: &Store, n: u64) {
    while store.stats().submitted < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_are_all_committed_and_visible_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub/dir/store.redb");
    let store = Store::open(&path).expect("open");
    let mut tasks = Vec::new();
    for task in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..150u64 {
                let key = format!("t{task}-{i}");
                store
                    .write(move |txn| put(txn, &key, i))
                    .await
                    .expect("write");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let stats = store.stats();
    assert_eq!(stats.jobs, 1200);
    assert_eq!(stats.submitted, 1200);
    assert_eq!(stats.failed_jobs, 0);
    assert!(
        stats.commits < stats.jobs,
        "8 concurrent writers should share commits: {stats:?}"
    );
    store.close();

    let store = Store::open(&path).expect("reopen");
    let found = keys(&store);
    assert_eq!(found.len(), 1200);
    assert!(found.contains("t7-149"));
}

#[tokio::test]
async fn queued_jobs_share_one_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("s.redb")).expect("open");
    let (release, held) = hold_writer(&store);
    let writes: Vec<_> = (0..100u64)
        .map(|i| store.write(move |txn| put(txn, &format!("k{i}"), i)))
        .collect();
    wait_submitted(&store, 101).await;
    drop(release);
    held.await.expect("gate job");
    for write in writes {
        write.await.expect("write");
    }
    let stats = store.stats();
    assert_eq!(stats.jobs, 101);
    // One commit for the gate job, one for the 100 jobs queued behind it.
    assert_eq!(stats.commits, 2, "{stats:?}");
    assert_eq!(stats.largest_batch, 100);
    assert_eq!(keys(&store).len(), 100);
}

#[tokio::test]
async fn failing_or_panicking_job_does_not_lose_the_others_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    let store = Store::open(&path).expect("open");
    let (release, held) = hold_writer(&store);
    let a = store.write(|txn| put(txn, "a", 1));
    let b = store.write(|txn| {
        put(txn, "b", 2)?;
        Err::<(), _>(StoreError::Aborted("job b changed its mind".into()))
    });
    let c = store.write(|txn| put(txn, "c", 3).map(|()| "c done"));
    let d = store.write(|txn| -> Result<(), StoreError> {
        put(txn, "d", 4)?;
        panic!("job d blew up");
    });
    let e = store.write(|txn| put(txn, "e", 5));
    wait_submitted(&store, 6).await;
    drop(release);
    held.await.expect("gate job");

    a.await.expect("a committed");
    assert!(matches!(b.await, Err(StoreError::Aborted(_))));
    assert_eq!(c.await.expect("c committed"), "c done");
    match d.await {
        Err(StoreError::JobPanicked(message)) => assert!(message.contains("job d blew up")),
        other => panic!("expected a contained panic, got {other:?}"),
    }
    e.await.expect("e committed after the panic");
    let stats = store.stats();
    assert_eq!(stats.commits, 2, "all five jobs were one batch: {stats:?}");
    assert_eq!(stats.failed_jobs, 2);
    drop(store);

    let store = Store::open(&path).expect("reopen");
    let expected: BTreeSet<String> = ["a", "c", "e"].iter().map(|k| k.to_string()).collect();
    assert_eq!(keys(&store), expected);
}

#[tokio::test]
async fn a_batch_runs_together_and_again_one_by_one_only_after_a_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("s.redb")).expect("open");
    let runs = Arc::new(AtomicU64::new(0));
    let counted = |key: &'static str| {
        let runs = Arc::clone(&runs);
        move |txn: &WriteTransaction| {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            put(txn, key, n).map(|()| n)
        }
    };
    let (release, held) = hold_writer(&store);
    let a = store.write(counted("a"));
    let b = store.write(counted("b"));
    wait_submitted(&store, 3).await;
    drop(release);
    held.await.expect("gate job");
    assert_eq!(a.await.expect("a"), 0);
    assert_eq!(b.await.expect("b"), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each ran once, together");

    let (release, held) = hold_writer(&store);
    let c = store.write(counted("c"));
    let bad = store.write(|txn| -> Result<(), StoreError> {
        put(txn, "bad", 0)?;
        Err(StoreError::Aborted("no".into()))
    });
    let d = store.write(counted("d"));
    wait_submitted(&store, 7).await;
    drop(release);
    held.await.expect("gate job");
    // Together c ran as run 2, then the failure sent the batch round again alone:
    // c is run 3 and d (which never ran together) run 4. The answers are the last runs'.
    assert_eq!(c.await.expect("c"), 3);
    assert!(bad.await.is_err());
    assert_eq!(d.await.expect("d"), 4);
    let read = store.read().expect("read");
    let table = read.open_table(NUMBERS).expect("table");
    let value = |key: &str| table.get(key).expect("get").map(|v| v.value());
    assert_eq!(value("c"), Some(3), "only the last run's writes");
    assert_eq!(value("d"), Some(4));
    assert_eq!(value("bad"), None);
}

#[tokio::test]
async fn close_drains_queued_jobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    let store = Store::open(&path).expect("open");
    let (release, held) = hold_writer(&store);
    let writes: Vec<_> = (0..50u64)
        .map(|i| store.write(move |txn| put(txn, &format!("k{i}"), i)))
        .collect();
    let other = store.clone();
    let closer = thread::spawn(move || store.close());
    // close() is now waiting for the held writer; release it and let it drain.
    thread::sleep(Duration::from_millis(20));
    drop(release);
    closer.join().expect("close");
    held.await.expect("gate job");
    for write in writes {
        write
            .await
            .expect("queued write finished before close returned");
    }
    assert!(matches!(
        other.write(|txn| put(txn, "late", 0)).await,
        Err(StoreError::Closed)
    ));
    drop(other);

    let store = Store::open(&path).expect("reopen");
    assert_eq!(keys(&store).len(), 50);
}

#[tokio::test]
async fn dropping_the_last_handle_drains_queued_jobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    let store = Store::open(&path).expect("open");
    let (release, held) = hold_writer(&store);
    let writes: Vec<_> = (0..50u64)
        .map(|i| store.write(move |txn| put(txn, &format!("k{i}"), i)))
        .collect();
    let dropper = thread::spawn(move || drop(store));
    thread::sleep(Duration::from_millis(20));
    drop(release);
    dropper.join().expect("drop");
    held.await.expect("gate job");
    for write in writes {
        write
            .await
            .expect("queued write finished before drop returned");
    }
    // The file is released: reopening in the same process works.
    let store = Store::open(&path).expect("reopen");
    assert_eq!(keys(&store).len(), 50);
}

#[tokio::test]
async fn failed_group_commit_fails_the_whole_batch_and_stops_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    let (store, faults) = flaky::open(&path);
    store
        .write(|txn| put(txn, "before", 1))
        .await
        .expect("durable before the failure");

    let (release, held) = hold_writer(&store);
    let injector = Arc::clone(&faults);
    let a = store.write(move |txn| {
        // The disk dies while this batch is being written.
        injector.sync.store(true, Ordering::SeqCst);
        put(txn, "a", 1)
    });
    let b = store.write(|txn| put(txn, "b", 2));
    wait_submitted(&store, 4).await;
    drop(release);
    held.await.expect("gate job committed before the failure");

    for result in [a.await, b.await] {
        match result {
            Err(StoreError::GroupCommit { jobs: 2, source }) => {
                assert!(matches!(*source, StoreError::Commit(_)), "{source:?}")
            }
            other => panic!("expected the batch's commit error, got {other:?}"),
        }
    }
    // The failed fsync latches redb's storage, so the rollback fails too, and nothing may
    // commit the failed batch's in-memory writes later: while fsync keeps failing, every
    // reopen fails too, and every write is refused.
    assert!(matches!(
        store.write(|txn| put(txn, "after", 3)).await,
        Err(StoreError::Failed { reason }) if reason.contains("injected fsync failure")
    ));
    assert_eq!(store.stats().commits, 2);
    assert_eq!(store.stats().reopens, 0);
    drop(store);

    faults.sync.store(false, Ordering::SeqCst);
    let store = Store::open(&path).expect("reopen recovers the last intact state");
    // The failed fsync may or may not have left the batch on disk, but never half of it,
    // and nothing after the failure.
    let found = keys(&store);
    let with_batch: BTreeSet<String> = ["a", "b", "before"].iter().map(|k| k.to_string()).collect();
    let without_batch: BTreeSet<String> = ["before"].iter().map(|k| k.to_string()).collect();
    assert!(found == with_batch || found == without_batch, "{found:?}");
}

#[tokio::test]
async fn a_full_disk_fails_writes_until_space_returns_then_the_store_reopens_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    let (store, faults) = flaky::open(&path);
    let reloads = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&reloads);
    store.on_reopen(move |snapshot| {
        // The hook sees the reopened file: what was durable before the failure is there.
        let table = snapshot
            .open_table(NUMBERS)
            .expect("numbers in the reopened file");
        assert!(table.get("before").expect("get").is_some());
        seen.fetch_add(1, Ordering::SeqCst);
    });
    store
        .write(|txn| put(txn, "before", 1))
        .await
        .expect("durable before the disk fills");
    assert_eq!(store.health(), StoreHealth::Open);

    faults.full.store(true, Ordering::SeqCst);
    // Enough data that the commit has to write pages, which a full disk refuses.
    let failed = store
        .write(|txn| {
            for i in 0..2000u64 {
                put(txn, &format!("full-{i}"), i)?;
            }
            Ok(())
        })
        .await;
    assert!(failed.is_err(), "a write to a full disk is never durable");
    let full = StoreHealth::Failed {
        reason: "no space left on device".to_owned(),
    };
    assert_eq!(store.health(), full);
    // Refused at once, and still after reopen attempts: the disk is still full.
    let refused = || async {
        match store.write(|txn| put(txn, "refused", 2)).await {
            Err(StoreError::Failed { reason }) => assert_eq!(reason, "no space left on device"),
            other => panic!("expected a refusal while the disk is full, got {other:?}"),
        }
    };
    refused().await;
    wait_for(|| store.stats().failed_reopens >= 2).await;
    assert_eq!(store.health(), full, "no reopen succeeds on a full disk");
    assert_eq!(store.stats().reopens, 0);
    assert_eq!(reloads.load(Ordering::SeqCst), 0);
    refused().await;

    faults.full.store(false, Ordering::SeqCst);
    wait_for(|| store.health() == StoreHealth::Open).await;
    assert_eq!(store.stats().reopens, 1);
    assert_eq!(
        reloads.load(Ordering::SeqCst),
        1,
        "reloaded before writes resumed"
    );
    store
        .write(|txn| put(txn, "after", 3))
        .await
        .expect("durable once space has returned");
    let found = keys(&store);
    assert!(
        found.contains("before") && found.contains("after"),
        "{found:?}"
    );
    assert!(!found.contains("refused"), "a refused job never ran");
    // The failed batch is all there or not at all.
    let batch = found.iter().filter(|k| k.starts_with("full-")).count();
    assert!(batch == 0 || batch == 2000, "{batch} of the failed batch");
    drop(store);

    let store = Store::open(&path).expect("reopen from disk");
    assert_eq!(keys(&store), found, "what was visible was durable");
}

/// Polls `done` every few milliseconds until it holds; panics after 20 s.
async fn wait_for(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "condition not met within 20 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn json_helpers_round_trip() {
    #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Doc {
        name: String,
        cores: u32,
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("s.redb")).expect("open");
    let txn = store.read().expect("read");
    assert_eq!(get_json::<Doc>(&txn, DOCS, "gw-1").expect("get"), None);
    assert!(list_json::<Doc>(&txn, DOCS).expect("list").is_empty());
    drop(txn);

    store
        .write(|txn| {
            put_json(
                txn,
                DOCS,
                "gw-1",
                &Doc {
                    name: "gw-1".into(),
                    cores: 4,
                },
            )?;
            put_json(
                txn,
                DOCS,
                "gw-2",
                &Doc {
                    name: "gw-2".into(),
                    cores: 2,
                },
            )?;
            let mut doc: Doc = get_json_in_write(txn, DOCS, "gw-2")?
                .ok_or_else(|| StoreError::Aborted("gw-2 missing".into()))?;
            doc.cores += 6;
            put_json(txn, DOCS, "gw-2", &doc)
        })
        .await
        .expect("write");
    let txn = store.read().expect("read");
    assert_eq!(
        get_json::<Doc>(&txn, DOCS, "gw-2").expect("get"),
        Some(Doc {
            name: "gw-2".into(),
            cores: 8
        })
    );
    let names: Vec<String> = list_json::<Doc>(&txn, DOCS)
        .expect("list")
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(names, ["gw-1", "gw-2"]);
    drop(txn);

    assert!(
        store
            .write(|txn| remove_json(txn, DOCS, "gw-1"))
            .await
            .expect("remove")
    );
    store
        .write(|txn| {
            put(txn, "not-json", 1).and_then(|()| {
                open_table(txn, DOCS)?
                    .insert("broken", b"{not json".as_slice())
                    .map_err(StoreError::storage("docs"))?;
                Ok(())
            })
        })
        .await
        .expect("write broken");
    let txn = store.read().expect("read");
    assert_eq!(get_json::<Doc>(&txn, DOCS, "gw-1").expect("get"), None);
    assert!(matches!(
        get_json::<Doc>(&txn, DOCS, "broken"),
        Err(StoreError::Json { ref key, .. }) if key == "broken"
    ));
}
