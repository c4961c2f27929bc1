//! The embedded transactional store: one redb file, one writer thread, group commit.
//!
//! Every acknowledged share must be on disk before the device hears "accepted", but one fsync
//! per share would cap the controller at a few hundred shares per second. So all writes go
//! through [`Store::write`], which hands a closure to a single writer thread; the writer takes
//! every job already queued (up to [`MAX_BATCH_JOBS`]), runs them, makes them durable with ONE
//! fsync, and only then answers every caller. Readers take MVCC snapshots with [`Store::read`]
//! and never block the writer.
//!
//! # Isolation of jobs inside one group commit
//!
//! A failing job must not take its neighbours' writes down with it. The obvious tool, an
//! ephemeral savepoint before each job inside one transaction, does not exist in redb 4: a
//! savepoint can only be taken while the transaction is still clean, and the first
//! `open_table` makes it dirty (`SavepointError::InvalidSavepoint`). So the writer first
//! runs the whole batch in ONE write transaction with [`Durability::None`], which is what
//! makes a busy store cheap (a redb commit costs far more than a typical job). Only if a
//! job fails (or panics) there is that transaction aborted and the batch run again, every
//! job in its own transaction: the failing job is aborted alone, each job that succeeds is
//! committed to memory only. Jobs are therefore `FnMut` and may run twice; only their last
//! run's writes and result count. Either way, one final empty transaction with
//! [`Durability::Immediate`] then fsyncs the whole batch at once (redb persists earlier
//! non-durable commits with the next durable one). Nothing is answered before that fsync.
//!
//! If the final durable commit fails, every job of the batch gets the error, and the batch is
//! all-or-nothing but its outcome is unknown: a failed fsync may still have left the whole
//! commit on disk, exactly as with any database. Callers must treat such an error as "maybe
//! written" (the ledger does: a device resubmits, flagged, and gets `AlreadyRecorded` or
//! `Recorded`, never a second count). What the store does guarantee is that it never goes on
//! to build on that uncertain state: it rolls the batch back to an ephemeral savepoint taken at
//! the start of the batch (in the first job's transaction, while it is still clean), and if
//! that fails too, as it does after an I/O error (redb latches those), it refuses every further
//! write until the database is reopened; reopening recovers whichever state last reached the
//! disk intact.
//!
//! # A full or failing disk
//!
//! A disk that fills up latches redb the same way, whichever write hits `ENOSPC` first. The
//! store does not wait for an operator to restart the process: once redb has latched an
//! error, the writer reports the store as failed ([`Store::health`], with the reason, e.g.
//! "no space left on device"), refuses every job at once with [`StoreError::Failed`] (so no
//! caller is told "durable" for anything), and reopens the database itself with backoff
//! ([`REOPEN_FIRST_DELAY`] doubling up to [`REOPEN_MAX_DELAY`]). It tries only once the file
//! system takes (and fsyncs) a scratch megabyte beside the database, because redb reopens
//! fine on a disk that is still full and fails again at its first new page; and a reopen
//! counts only once an empty durable commit on the reopened file has succeeded. Because the
//! batch that failed may or may not be on disk, whatever the layers above cache from the
//! store must be read again from the reopened file: [`Store::on_reopen`] runs their reloads
//! on the writer thread, before any later job, so no job can build on (or overtake) the
//! stale cache.
//!
//! A consequence worth knowing: a [`Store::read`] snapshot may include writes of the batch that
//! is being fsynced at that moment (a few milliseconds before their callers are answered).
//! Decisions that must rest on durable state belong inside a [`Store::write`] job, whose result
//! is only delivered once durable.

use std::any::Any;
use std::error::Error as StdError;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, mpsc};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use redb::{
    CommitError, ConcurrencyMode, Database, DatabaseError, Durability, Key, ReadOnlyTable,
    ReadTransaction, ReadableDatabase, ReadableTable, Savepoint, SavepointError,
    SetDurabilityError, StorageError, Table, TableDefinition, TableError, TableHandle,
    TransactionError, Value, WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

/// The most jobs one group commit takes. Bounds the latency a job queued behind a full batch
/// waits, and the memory of one batch, while leaving room for thousands of concurrent callers.
pub const MAX_BATCH_JOBS: usize = 4096;

/// Page cache of the database. The ledger's working set (recent headers' shares and the
/// totals) is small; the rest of the file is cold and need not sit in memory.
const CACHE_BYTES: usize = 256 * 1024 * 1024;

/// How long after a latched failure the writer first tries to reopen the database: long
/// enough that a disk that is still full is not hammered, short enough that a freed disk
/// is noticed at once.
pub const REOPEN_FIRST_DELAY: Duration = Duration::from_millis(250);

/// The longest wait between two reopen attempts: each failure within a minute of the
/// previous one doubles the wait up to this, so space that returns is used within about
/// this much time.
pub const REOPEN_MAX_DELAY: Duration = Duration::from_secs(8);

/// After this long without a failure the next one starts again at [`REOPEN_FIRST_DELAY`].
const FAILURES_FORGOTTEN_AFTER: Duration = Duration::from_secs(60);

/// A table of JSON values keyed by string: the easy way for modules with low write rates
/// (device records, headers, assignments) to keep their state without a schema of their own.
pub type JsonTable = TableDefinition<'static, &'static str, &'static [u8]>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory that should hold the database file could not be created.
    #[error("creating the store directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying I/O failure.
        #[source]
        source: std::io::Error,
    },
    /// redb refused to open or create the database file.
    #[error("opening the store database {path}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// redb's reason.
        #[source]
        source: Box<DatabaseError>,
    },
    /// The OS refused to start the writer thread.
    #[error("starting the store-writer thread")]
    SpawnWriter(#[source] std::io::Error),
    /// A read or write transaction could not be started.
    #[error("beginning a store transaction")]
    Begin(#[source] Box<TransactionError>),
    /// The durability of a transaction could not be set.
    #[error("setting the durability of a store transaction")]
    Durability(#[source] SetDurabilityError),
    /// Committing one job's writes to memory failed; the job's writes are discarded.
    #[error("committing a store job's writes")]
    JobCommit(#[source] CommitError),
    /// The durable commit of a batch failed; its jobs' writes are all on disk or none are.
    #[error("durably committing a group of {jobs} store jobs")]
    GroupCommit {
        /// How many jobs were in the batch.
        jobs: usize,
        /// What failed (shared by every job of the batch).
        #[source]
        source: Arc<StoreError>,
    },
    /// The durable commit itself failed (the inner cause of [`StoreError::GroupCommit`]).
    #[error("fsyncing the group commit")]
    Commit(#[source] CommitError),
    /// Taking or restoring the savepoint that guards a batch failed.
    #[error("taking or restoring the batch savepoint")]
    Savepoint(#[source] SavepointError),
    /// A table could not be opened (wrong types, or storage failure).
    #[error("opening store table {table}")]
    Table {
        /// The table name.
        table: String,
        /// redb's reason.
        #[source]
        source: Box<TableError>,
    },
    /// Reading or writing a table failed in the storage layer.
    #[error("reading or writing store table {table}")]
    Storage {
        /// The table name.
        table: String,
        /// redb's reason.
        #[source]
        source: StorageError,
    },
    /// A JSON value could not be encoded or decoded.
    #[error("encoding or decoding the JSON value {key:?} in store table {table}")]
    Json {
        /// The table name.
        table: String,
        /// The key of the value.
        key: String,
        /// serde_json's reason.
        #[source]
        source: serde_json::Error,
    },
    /// A stored value does not have the layout its reader expects.
    #[error("stored value {key:?} in store table {table} is corrupt: {reason}")]
    Corrupt {
        /// The table name.
        table: String,
        /// The key of the value.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A job gave up for a reason of its own; its writes are discarded.
    #[error("store job aborted")]
    Aborted(#[source] Box<dyn StdError + Send + Sync>),
    /// A job panicked; its writes are discarded and the writer carries on.
    #[error("a store job panicked: {0}")]
    JobPanicked(String),
    /// redb latched a storage failure (a full disk, a failed fsync), so the in-memory state may
    /// hold writes whose callers were told they failed; the store refuses writes (and, once it
    /// has closed the database to reopen it, reads) until it has reopened the database.
    #[error("the store failed ({reason}) and refuses writes until it has reopened the database")]
    Failed {
        /// The original failure, e.g. "no space left on device".
        reason: String,
    },
    /// The writer has stopped ([`Store::close`] or the last handle dropped).
    #[error("the store writer has stopped")]
    Closed,
}

impl StoreError {
    /// Builds the error for a storage failure on `table`, for use with `map_err` inside jobs.
    pub fn storage(table: &str) -> impl FnOnce(StorageError) -> StoreError + '_ {
        move |source| StoreError::Storage {
            table: table.to_owned(),
            source,
        }
    }
}

/// Whether the store is making writes durable, for readiness probes and status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreHealth {
    /// Writes are being made durable.
    Open,
    /// A storage failure was latched: every write is refused until the writer has reopened
    /// the database, which it keeps trying with backoff.
    Failed {
        /// What failed, e.g. "no space left on device".
        reason: String,
    },
}

/// Counters of the writer, for metrics, tests and the benchmark: `jobs / commits` is the
/// group-commit factor, `submitted - jobs` the queue depth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Jobs handed to [`Store::write`] so far.
    pub submitted: u64,
    /// Jobs the writer has finished (successfully or not).
    pub jobs: u64,
    /// Jobs that returned an error or panicked (their writes were discarded).
    pub failed_jobs: u64,
    /// Durable commits (fsyncs) done.
    pub commits: u64,
    /// The most jobs one commit has carried.
    pub largest_batch: u64,
    /// Times the writer reopened the database after a latched failure.
    pub reopens: u64,
    /// Reopen attempts that failed (the disk was still full, fsync still failed).
    pub failed_reopens: u64,
}

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    jobs: AtomicU64,
    failed_jobs: AtomicU64,
    commits: AtomicU64,
    largest_batch: AtomicU64,
    reopens: AtomicU64,
    failed_reopens: AtomicU64,
}

/// Opens (or reopens) the database file: once at start, and again after a latched failure.
type Opener = Box<dyn FnMut() -> Result<Database, StoreError> + Send>;

/// Run on the writer thread with a snapshot of a reopened database, before any later job.
type ReopenHook = Arc<dyn Fn(&ReadTransaction) + Send + Sync>;

/// The open database, shared by readers and the writer; `None` while the writer has closed
/// a failed one and not yet reopened it.
type Slot = Arc<RwLock<Option<Database>>>;

/// A handle on the embedded database. Cheap to clone; all clones share one writer thread.
/// The writer stops, after finishing every queued job, on [`Store::close`] or when the last
/// handle is dropped (which then blocks until the queue is drained and the file is closed).
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

struct Shared {
    db: Slot,
    path: PathBuf,
    sender: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    writer_id: ThreadId,
    counters: Arc<Counters>,
    health: Arc<Mutex<StoreHealth>>,
    hooks: Arc<Mutex<Vec<ReopenHook>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.shared.path)
            .field("stats", &self.stats())
            .finish()
    }
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held; a poisoned lock still holds valid data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_slot(slot: &RwLock<Option<Database>>) -> std::sync::RwLockReadGuard<'_, Option<Database>> {
    // As above: nothing panics while the slot is locked.
    slot.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_slot(
    slot: &RwLock<Option<Database>>,
) -> std::sync::RwLockWriteGuard<'_, Option<Database>> {
    slot.write().unwrap_or_else(PoisonError::into_inner)
}

impl Store {
    /// Opens the database at `path`, creating it (and its directory) on first use, and starts
    /// the single writer thread that owns every write transaction: one writer means no write
    /// contention inside redb and lets every queued job share one fsync.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let file = path.to_path_buf();
        Store::open_with(
            path,
            Box::new(move || {
                if let Some(parent) = file.parent()
                    && !parent.as_os_str().is_empty()
                {
                    std::fs::create_dir_all(parent).map_err(|source| StoreError::CreateDir {
                        path: parent.to_path_buf(),
                        source,
                    })?;
                }
                Database::builder()
                    // Ephemeral savepoints and non-durable commits, which group commit relies
                    // on, are only available while this process is the file's only writer.
                    .set_concurrency_mode(ConcurrencyMode::ExclusiveWriter)
                    .set_cache_size(CACHE_BYTES)
                    .create(&file)
                    .map_err(|source| StoreError::Open {
                        path: file.clone(),
                        source: Box::new(source),
                    })
            }),
        )
    }

    /// Opens the database with `open`, which the writer calls again to reopen it after a
    /// latched failure, and starts the writer thread. Tests open it on failing backends.
    pub(crate) fn open_with(path: &Path, mut open: Opener) -> Result<Store, StoreError> {
        let db: Slot = Arc::new(RwLock::new(Some(open()?)));
        let counters = Arc::new(Counters::default());
        let health = Arc::new(Mutex::new(StoreHealth::Open));
        let hooks: Arc<Mutex<Vec<ReopenHook>>> = Arc::default();
        let (sender, receiver) = mpsc::channel::<Box<dyn Job>>();
        let writer = {
            let writer = Writer {
                db: Arc::clone(&db),
                open,
                path: path.to_path_buf(),
                counters: Arc::clone(&counters),
                health: Arc::clone(&health),
                hooks: Arc::clone(&hooks),
            };
            thread::Builder::new()
                .name("store-writer".to_owned())
                .spawn(move || writer.run(&receiver))
                .map_err(StoreError::SpawnWriter)?
        };
        let writer_id = writer.thread().id();
        tracing::debug!(path = %path.display(), "store opened");
        Ok(Store {
            shared: Arc::new(Shared {
                db,
                path: path.to_path_buf(),
                sender: Mutex::new(Some(sender)),
                writer: Mutex::new(Some(writer)),
                writer_id,
                counters,
                health,
                hooks,
            }),
        })
    }

    /// Runs `f` in a write transaction and resolves once its writes are durable (fsynced), or
    /// with the error that kept them from being so. `f` runs on the writer thread, after the
    /// jobs queued before it, and sees their writes.
    ///
    /// If `f` returns `Err` or panics, its writes are discarded and the other jobs of the same
    /// group commit are unaffected. If the group's fsync fails, every job of the group gets a
    /// [`StoreError::GroupCommit`], and the group's writes are then either all on disk or all
    /// lost: treat that error as "outcome unknown", never as "certainly not written".
    ///
    /// The job may run twice (see the module docs: once with its batch, and alone if a
    /// neighbour failed); only the last run's writes and result count.
    ///
    /// The job is queued when `write` is called, not when the future is first polled, and
    /// dropping the future does not cancel it: it still runs and commits, unanswered.
    pub fn write<R, F>(
        &self,
        f: F,
    ) -> impl Future<Output = Result<R, StoreError>> + Send + 'static + use<R, F>
    where
        F: FnMut(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let queued = self.enqueue(Box::new(TypedJob {
            f,
            result: None,
            reply,
        }));
        async move {
            queued?;
            // The writer drops an unanswered job only if it died; report that as closed.
            answer.await.unwrap_or(Err(StoreError::Closed))
        }
    }

    fn enqueue(&self, job: Box<dyn Job>) -> Result<(), StoreError> {
        let sender = locked(&self.shared.sender);
        let sender = sender.as_ref().ok_or(StoreError::Closed)?;
        sender.send(job).map_err(|_| StoreError::Closed)?;
        self.shared
            .counters
            .submitted
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A consistent snapshot for reading without blocking the writer. It may already include
    /// the writes of the group commit being fsynced at that moment (see the module docs).
    ///
    /// Fails with [`StoreError::Failed`] while the writer has closed a failed database and
    /// not yet reopened it.
    pub fn read(&self) -> Result<ReadTransaction, StoreError> {
        let slot = read_slot(&self.shared.db);
        let Some(db) = slot.as_ref() else {
            return Err(StoreError::Failed {
                reason: match self.health() {
                    StoreHealth::Failed { reason } => reason,
                    StoreHealth::Open => "the database is being reopened".to_owned(),
                },
            });
        };
        db.begin_read().map_err(|e| StoreError::Begin(Box::new(e)))
    }

    /// Whether writes are being made durable, or why not (see the module docs on a full disk).
    pub fn health(&self) -> StoreHealth {
        locked(&self.shared.health).clone()
    }

    /// Runs `reload` with a snapshot of the database each time the writer has reopened it
    /// after a latched failure, on the writer thread, before any job queued later runs. The
    /// batch that failed may or may not have reached the disk, so whatever a caller keeps in
    /// memory from the store (the ledger's totals) must be read again here.
    pub fn on_reopen(&self, reload: impl Fn(&ReadTransaction) + Send + Sync + 'static) {
        locked(&self.shared.hooks).push(Arc::new(reload));
    }

    /// The writer's counters, so tests and the benchmark can see the group-commit factor.
    pub fn stats(&self) -> StoreStats {
        let c = &self.shared.counters;
        StoreStats {
            submitted: c.submitted.load(Ordering::Relaxed),
            jobs: c.jobs.load(Ordering::Relaxed),
            failed_jobs: c.failed_jobs.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            largest_batch: c.largest_batch.load(Ordering::Relaxed),
            reopens: c.reopens.load(Ordering::Relaxed),
            failed_reopens: c.failed_reopens.load(Ordering::Relaxed),
        }
    }

    /// The database file, for logs.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Stops the writer for every handle after it has finished all queued jobs, and waits for
    /// it. Later writes through other handles fail with [`StoreError::Closed`]; the file is
    /// released once the last handle is gone.
    pub fn close(self) {
        self.shared.shut_down();
    }
}

impl Shared {
    fn shut_down(&self) {
        // Dropping the only sender ends the writer's loop once it has drained the queue.
        drop(locked(&self.sender).take());
        if thread::current().id() == self.writer_id {
            // The last handle was dropped by a job on the writer thread itself; it cannot join
            // itself, and it exits on its own once the queue is empty.
            return;
        }
        let writer = locked(&self.writer).take();
        if let Some(writer) = writer
            && writer.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "store writer thread panicked");
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// A job with its result type erased, so jobs of every type share one queue.
trait Job: Send {
    /// Runs the closure in `txn` and keeps its result; returns whether it succeeded. May
    /// run more than once (see [`run_batch`]); only the last result is answered.
    fn run(&mut self, txn: &WriteTransaction) -> bool;
    /// Answers the caller with the kept result, or with `Err(durability)` if its writes
    /// did not become durable.
    fn answer(self: Box<Self>, durability: Result<(), StoreError>);
    /// Answers the caller with `error` without running the closure.
    fn refuse(self: Box<Self>, error: StoreError);
    /// The error the last run returned, if it failed.
    fn failure(&self) -> Option<&StoreError>;
}

struct TypedJob<F, R> {
    f: F,
    result: Option<Result<R, StoreError>>,
    reply: oneshot::Sender<Result<R, StoreError>>,
}

impl<F, R> Job for TypedJob<F, R>
where
    F: FnMut(&WriteTransaction) -> Result<R, StoreError> + Send,
    R: Send + 'static,
{
    fn run(&mut self, txn: &WriteTransaction) -> bool {
        let f = &mut self.f;
        let result = catch_unwind(AssertUnwindSafe(|| f(txn)))
            .unwrap_or_else(|payload| Err(StoreError::JobPanicked(panic_message(&*payload))));
        let succeeded = result.is_ok();
        self.result = Some(result);
        succeeded
    }

    fn answer(self: Box<Self>, durability: Result<(), StoreError>) {
        let result = match durability {
            Ok(()) => self
                .result
                .unwrap_or_else(|| Err(StoreError::Aborted("the job never ran".into()))),
            Err(error) => Err(error),
        };
        // A caller that went away needs no answer.
        let _ = self.reply.send(result);
    }

    fn refuse(self: Box<Self>, error: StoreError) {
        // A caller that went away needs no answer.
        let _ = self.reply.send(Err(error));
    }

    fn failure(&self) -> Option<&StoreError> {
        self.result.as_ref().and_then(|r| r.as_ref().err())
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "panic payload is not a string".to_owned()
    }
}

/// The writer thread's side of the store: the database, how to reopen it, and what it
/// reports.
struct Writer {
    db: Slot,
    open: Opener,
    path: PathBuf,
    counters: Arc<Counters>,
    health: Arc<Mutex<StoreHealth>>,
    hooks: Arc<Mutex<Vec<ReopenHook>>>,
}

/// A latched failure the writer is recovering from.
struct Broken {
    /// What failed, as [`StoreHealth::Failed`] reports it.
    reason: String,
    /// When the next reopen is tried.
    retry_at: Instant,
    /// The wait that led to `retry_at`; the one after a failed attempt is twice as long.
    delay: Duration,
}

impl Writer {
    fn run(mut self, queue: &mpsc::Receiver<Box<dyn Job>>) {
        // Set while redb has latched a failure: from then on the in-memory state may hold
        // writes whose callers were told they failed, and nothing may commit it.
        let mut broken: Option<Broken> = None;
        // The last failure and the wait it got, so that failures in quick succession (a disk
        // that is still full after a reopen) back off further instead of spinning.
        let mut last_failure: Option<(Instant, Duration)> = None;
        let mut batch: Vec<Box<dyn Job>> = Vec::new();
        loop {
            let first = match broken.as_ref() {
                None => match queue.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
                Some(failed) => {
                    match queue
                        .recv_timeout(failed.retry_at.saturating_duration_since(Instant::now()))
                    {
                        Ok(job) => job,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            if let Some(failed) = broken.take() {
                                broken = self.reopen(failed, &mut last_failure);
                            }
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            batch.push(first);
            while batch.len() < MAX_BATCH_JOBS {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let jobs = batch.len();
            // Counted before any answer goes out, so a caller that has its answer sees its job
            // counted.
            self.counters.jobs.fetch_add(jobs as u64, Ordering::Relaxed);
            if let Some(failed) = broken.as_ref() {
                for job in batch.drain(..) {
                    job.refuse(StoreError::Failed {
                        reason: failed.reason.clone(),
                    });
                }
                continue;
            }
            let (failure, answers) = {
                let slot = read_slot(&self.db);
                match slot.as_ref() {
                    Some(db) => run_batch(db, std::mem::take(&mut batch), &self.counters),
                    // Only a broken writer leaves the slot empty, and it refuses jobs above.
                    None => {
                        let reason = "the database is closed".to_owned();
                        let refused = batch
                            .drain(..)
                            .map(|job| {
                                let error = StoreError::Failed {
                                    reason: reason.clone(),
                                };
                                (job, Err(error))
                            })
                            .collect();
                        (Some(reason), refused)
                    }
                }
            };
            if let Some(reason) = failure {
                let delay = match last_failure {
                    Some((at, delay)) if at.elapsed() < FAILURES_FORGOTTEN_AFTER => {
                        (delay * 2).min(REOPEN_MAX_DELAY)
                    }
                    _ => REOPEN_FIRST_DELAY,
                };
                last_failure = Some((Instant::now(), delay));
                tracing::error!(path = %self.path.display(), reason, retry_in_ms = delay.as_millis() as u64,
                    "store failed: every write is refused until the database is reopened");
                self.set_health(StoreHealth::Failed {
                    reason: reason.clone(),
                });
                broken = Some(Broken {
                    reason,
                    retry_at: Instant::now() + delay,
                    delay,
                });
            }
            // Only now, so a caller told of a failure finds the store's health saying so.
            for (job, durability) in answers {
                job.answer(durability);
            }
        }
        tracing::debug!("store writer stopped");
    }

    fn set_health(&self, health: StoreHealth) {
        *locked(&self.health) = health;
    }

    /// Closes the failed database and opens the file again, which recovers whichever state
    /// last reached the disk intact; then lets the layers above reload what they cache.
    /// Returns the failure to wait out again if it did not work.
    fn reopen(
        &mut self,
        failed: Broken,
        last_failure: &mut Option<(Instant, Duration)>,
    ) -> Option<Broken> {
        // It holds the file's lock, so it must be closed before the file can be opened again.
        // A database with a latched failure writes nothing on close: the next open recovers.
        if let Some(old) = write_slot(&self.db).take()
            && let Err(e) = old.close()
        {
            tracing::debug!(error = %e, "closing the failed store database");
        }
        match self.try_open() {
            Ok(db) => {
                let hooks: Vec<ReopenHook> = locked(&self.hooks).clone();
                match db.begin_read() {
                    Ok(snapshot) => {
                        for hook in &hooks {
                            hook(&snapshot);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reading the reopened store failed; cached totals may lag the disk until their next write")
                    }
                }
                *write_slot(&self.db) = Some(db);
                self.counters.reopens.fetch_add(1, Ordering::Relaxed);
                *last_failure = Some((Instant::now(), failed.delay));
                self.set_health(StoreHealth::Open);
                tracing::warn!(path = %self.path.display(), failure = failed.reason, "store reopened; writes resume");
                None
            }
            Err(reason) => {
                self.counters.failed_reopens.fetch_add(1, Ordering::Relaxed);
                let delay = (failed.delay * 2).min(REOPEN_MAX_DELAY);
                tracing::warn!(path = %self.path.display(), reason, retry_in_ms = delay.as_millis() as u64,
                    "reopening the store failed; will retry");
                self.set_health(StoreHealth::Failed {
                    reason: reason.clone(),
                });
                Some(Broken {
                    reason,
                    retry_at: Instant::now() + delay,
                    delay,
                })
            }
        }
    }

    fn try_open(&mut self) -> Result<Database, String> {
        has_room(&self.path)?;
        let db = (self.open)().map_err(|e| describe(&e))?;
        // A file that opens may still refuse to commit (a failing fsync latches again), and
        // only a durable commit shows that writes can be made durable again.
        durable_commit(&db).map_err(|e| describe(&e))?;
        Ok(db)
    }
}

/// How much the store's file system must take before a reopen is tried: a full disk lets
/// redb reopen (its header pages are already allocated) and then fail again at the first
/// write that needs a new page, so without this check the store would flap between open and
/// failed for as long as the disk stays full. A few group commits' worth of pages.
const ROOM_TO_REOPEN: usize = 1024 * 1024;

/// Whether the file system holding `path` has room ([`ROOM_TO_REOPEN`]) and can fsync:
/// writes, syncs and removes a scratch file beside it.
fn has_room(path: &Path) -> Result<(), String> {
    use std::io::Write as _;
    let scratch = path.with_extension("space-probe");
    let probe = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&scratch)?;
        file.write_all(&vec![0u8; ROOM_TO_REOPEN])?;
        file.sync_data()
    };
    let result = probe();
    // Removed whatever happened, so the probe never holds the space it asked about.
    let _ = std::fs::remove_file(&scratch);
    result.map_err(|e| describe_io(&e))
}

/// What the operating system said, briefly: a full disk by its kind, since the text carries
/// "(os error 28)", which says less.
fn describe_io(error: &std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::StorageFull {
        "no space left on device".to_owned()
    } else {
        error.to_string()
    }
}

/// What went wrong while one batch ran, to tell whether redb latched a failure and why.
#[derive(Default)]
struct Failures {
    /// Something failed (a job, a commit, the fsync).
    any: bool,
    /// A failed group commit could not be rolled back.
    unrecovered: bool,
    /// The first storage failure's description, preferring an I/O error's (which says what
    /// happened) to redb's "previous I/O error" (which only says that something did).
    reason: Option<(bool, String)>,
}

impl Failures {
    fn note(&mut self, error: &StoreError) {
        self.any = true;
        let Some(cause) = storage_cause(error) else {
            return;
        };
        let is_io = matches!(cause, StorageError::Io(_));
        if self.reason.as_ref().is_none_or(|(io, _)| is_io && !io) {
            self.reason = Some((is_io, describe(error)));
        }
    }

    fn note_job(&mut self, job: &dyn Job) {
        match job.failure() {
            Some(error) => self.note(error),
            None => self.any = true,
        }
    }

    /// Why the database must be reopened, if it must: a group commit that could not be
    /// rolled back, or a failure redb latched (it then refuses every write transaction).
    fn must_reopen(self, db: &Database) -> Option<String> {
        if !self.any {
            return None;
        }
        let latched = if self.unrecovered {
            None
        } else {
            match db.begin_write() {
                Ok(txn) => {
                    abort(txn);
                    return None;
                }
                Err(e @ TransactionError::Storage(_)) => Some(StoreError::Begin(Box::new(e))),
                Err(_) => return None,
            }
        };
        Some(match (self.reason, latched) {
            (Some((_, reason)), _) => reason,
            (None, Some(error)) => describe(&error),
            (None, None) => "a group commit failed and could not be rolled back".to_owned(),
        })
    }
}

/// The redb storage failure behind `error`, if that is what it is.
fn storage_cause(error: &StoreError) -> Option<&StorageError> {
    match error {
        StoreError::Open { source, .. } => match &**source {
            DatabaseError::Storage(cause) => Some(cause),
            _ => None,
        },
        StoreError::Begin(source) => match &**source {
            TransactionError::Storage(cause) => Some(cause),
            _ => None,
        },
        StoreError::JobCommit(CommitError::Storage(cause))
        | StoreError::Commit(CommitError::Storage(cause))
        | StoreError::Savepoint(SavepointError::Storage(cause))
        | StoreError::Storage { source: cause, .. } => Some(cause),
        StoreError::Table { source, .. } => match &**source {
            TableError::Storage(cause) => Some(cause),
            _ => None,
        },
        StoreError::GroupCommit { source, .. } => storage_cause(source),
        _ => None,
    }
}

/// A short description of what failed, for [`StoreHealth::Failed`] and the logs: what the
/// operating system said if it said anything ("no space left on device"), otherwise the
/// store's own error with its causes.
fn describe(error: &StoreError) -> String {
    let io = match (error, storage_cause(error)) {
        (StoreError::CreateDir { source, .. }, _) => Some(source),
        (_, Some(StorageError::Io(source))) => Some(source),
        (_, Some(StorageError::PreviousIo)) => {
            return "an earlier I/O error (redb refuses every write until reopened)".to_owned();
        }
        (_, Some(cause)) => return cause.to_string(),
        _ => None,
    };
    match io {
        Some(source) => describe_io(source),
        None => {
            let mut text = error.to_string();
            let mut cause = StdError::source(error);
            while let Some(inner) = cause {
                text.push_str(": ");
                text.push_str(&inner.to_string());
                cause = inner.source();
            }
            text
        }
    }
}

/// Jobs with what to answer them: `Ok` for the job's own result (durable, or its own
/// failure), `Err` for an error instead.
type Answers = Vec<(Box<dyn Job>, Result<(), StoreError>)>;

/// Runs one batch and makes it durable (see the module docs). Returns why the database must
/// be reopened, if a failure left redb refusing writes, and the answers, which the caller
/// sends once it has acted on that.
fn run_batch(
    db: &Database,
    jobs: Vec<Box<dyn Job>>,
    counters: &Counters,
) -> (Option<String>, Answers) {
    let mut failures = Failures::default();
    let mut answers: Answers = Vec::with_capacity(jobs.len());
    let (pending, savepoint) = match run_together(db, jobs, &mut failures) {
        Together::Committed(jobs, savepoint) => (jobs, savepoint),
        Together::Failed(jobs) => run_separately(db, jobs, counters, &mut failures, &mut answers),
    };
    if pending.is_empty() {
        drop(savepoint);
        return (failures.must_reopen(db), answers);
    }
    match durable_commit(db) {
        Ok(()) => {
            counters.commits.fetch_add(1, Ordering::Relaxed);
            counters
                .largest_batch
                .fetch_max(pending.len() as u64, Ordering::Relaxed);
            answers.extend(pending.into_iter().map(|job| (job, Ok(()))));
        }
        Err(error) => {
            failures.note(&error);
            tracing::error!(error = %error, reason = describe(&error), jobs = pending.len(), "group commit failed");
            let rolled_back = match savepoint.as_ref() {
                Some(savepoint) => roll_back(db, savepoint),
                None => Err(StoreError::Savepoint(SavepointError::InvalidSavepoint)),
            };
            if let Err(rollback) = rolled_back {
                tracing::error!(error = %rollback, "rolling back the failed group commit failed; the store refuses writes until it has reopened the database");
                failures.unrecovered = true;
            }
            let error = Arc::new(error);
            let jobs = pending.len();
            answers.extend(pending.into_iter().map(|job| {
                let failed = StoreError::GroupCommit {
                    jobs,
                    source: Arc::clone(&error),
                };
                (job, Err(failed))
            }));
        }
    }
    // Savepoints pin the transaction tracker; none may outlive the batch (a reopen closes it).
    drop(savepoint);
    (failures.must_reopen(db), answers)
}

/// The outcome of running a whole batch in one transaction.
enum Together {
    /// Every job succeeded and the transaction is committed (not yet durably), with the
    /// savepoint taken before the first job.
    Committed(Vec<Box<dyn Job>>, Option<Savepoint>),
    /// A job failed or panicked (or the transaction did): nothing was committed.
    Failed(Vec<Box<dyn Job>>),
}

/// The common case, cheaply: every job of the batch in ONE transaction. A redb commit,
/// even a non-durable one, costs far more than a typical job's few table writes, so with
/// thousands of devices submitting shares a transaction per job kept the writer thread
/// busy with commits alone.
fn run_together(db: &Database, mut jobs: Vec<Box<dyn Job>>, failures: &mut Failures) -> Together {
    let mut txn = match db.begin_write() {
        Ok(txn) => txn,
        Err(e) => {
            failures.note(&StoreError::Begin(Box::new(e)));
            return Together::Failed(jobs);
        }
    };
    // Only possible while the transaction is still clean, before a job opens a table.
    let savepoint = match txn.ephemeral_savepoint() {
        Ok(taken) => Some(taken),
        Err(e) => {
            tracing::warn!(error = %e, "no savepoint for this batch; a failed fsync will stop the store");
            None
        }
    };
    if let Err(e) = txn.set_durability(Durability::None) {
        failures.note(&StoreError::Durability(e));
        abort(txn);
        return Together::Failed(jobs);
    }
    for job in &mut jobs {
        if !job.run(&txn) {
            failures.note_job(&**job);
            abort(txn);
            return Together::Failed(jobs);
        }
    }
    match txn.commit() {
        Ok(()) => Together::Committed(jobs, savepoint),
        Err(e) => {
            tracing::warn!(error = %e, "committing a batch failed; committing its jobs one by one");
            failures.note(&StoreError::JobCommit(e));
            Together::Failed(jobs)
        }
    }
}

/// After a job failed in [`run_together`]: every job again, each in its own transaction,
/// so the failing one is aborted alone. Returns the jobs whose writes were committed (not
/// yet durably) and the savepoint taken before the first.
fn run_separately(
    db: &Database,
    jobs: Vec<Box<dyn Job>>,
    counters: &Counters,
    failures: &mut Failures,
    answers: &mut Answers,
) -> (Vec<Box<dyn Job>>, Option<Savepoint>) {
    let mut savepoint: Option<Savepoint> = None;
    let mut pending: Vec<Box<dyn Job>> = Vec::with_capacity(jobs.len());
    for (index, mut job) in jobs.into_iter().enumerate() {
        let mut txn = match db.begin_write() {
            Ok(txn) => txn,
            Err(e) => {
                counters.failed_jobs.fetch_add(1, Ordering::Relaxed);
                let error = StoreError::Begin(Box::new(e));
                failures.note(&error);
                answers.push((job, Err(error)));
                continue;
            }
        };
        if index == 0 {
            // Only possible while this transaction is still clean, before the job opens a table.
            match txn.ephemeral_savepoint() {
                Ok(taken) => savepoint = Some(taken),
                Err(e) => {
                    tracing::warn!(error = %e, "no savepoint for this batch; a failed fsync will stop the store")
                }
            }
        }
        if let Err(e) = txn.set_durability(Durability::None) {
            counters.failed_jobs.fetch_add(1, Ordering::Relaxed);
            abort(txn);
            let error = StoreError::Durability(e);
            failures.note(&error);
            answers.push((job, Err(error)));
            continue;
        }
        if job.run(&txn) {
            match txn.commit() {
                Ok(()) => pending.push(job),
                Err(e) => {
                    counters.failed_jobs.fetch_add(1, Ordering::Relaxed);
                    let error = StoreError::JobCommit(e);
                    failures.note(&error);
                    answers.push((job, Err(error)));
                }
            }
        } else {
            counters.failed_jobs.fetch_add(1, Ordering::Relaxed);
            failures.note_job(&*job);
            abort(txn);
            answers.push((job, Ok(())));
        }
    }
    (pending, savepoint)
}

fn abort(txn: WriteTransaction) {
    if let Err(e) = txn.abort() {
        tracing::warn!(error = %e, "aborting a failed store job's transaction");
    }
}

/// The one fsync of a batch: an empty transaction whose durable commit also persists the
/// batch's non-durable commits.
fn durable_commit(db: &Database) -> Result<(), StoreError> {
    let mut txn = db
        .begin_write()
        .map_err(|e| StoreError::Begin(Box::new(e)))?;
    txn.set_durability(Durability::Immediate)
        .map_err(StoreError::Durability)?;
    txn.commit().map_err(StoreError::Commit)
}

fn roll_back(db: &Database, savepoint: &Savepoint) -> Result<(), StoreError> {
    let mut txn = db
        .begin_write()
        .map_err(|e| StoreError::Begin(Box::new(e)))?;
    txn.set_durability(Durability::Immediate)
        .map_err(StoreError::Durability)?;
    txn.restore_savepoint(savepoint)
        .map_err(StoreError::Savepoint)?;
    txn.commit().map_err(StoreError::Commit)
}

/// Opens `table` for writing inside a job, creating it on first use, with an error that names
/// the table.
pub fn open_table<'txn, K: Key + 'static, V: Value + 'static>(
    txn: &'txn WriteTransaction,
    table: TableDefinition<K, V>,
) -> Result<Table<'txn, K, V>, StoreError> {
    txn.open_table(table).map_err(|source| StoreError::Table {
        table: table.name().to_owned(),
        source: Box::new(source),
    })
}

/// Opens `table` in a read snapshot; `None` if no write has created it yet, so readers of a
/// fresh database see "empty" rather than an error.
pub fn open_read_table<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<Option<ReadOnlyTable<K, V>>, StoreError> {
    match txn.open_table(table) {
        Ok(opened) => Ok(Some(opened)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(source) => Err(StoreError::Table {
            table: table.name().to_owned(),
            source: Box::new(source),
        }),
    }
}

fn decode_json<T: DeserializeOwned>(table: &str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Json {
        table: table.to_owned(),
        key: key.to_owned(),
        source,
    })
}

/// Reads the JSON value at `key` from a snapshot; `None` if absent.
pub fn get_json<T: DeserializeOwned>(
    txn: &ReadTransaction,
    table: JsonTable,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let Some(opened) = open_read_table(txn, table)? else {
        return Ok(None);
    };
    let found = opened.get(key).map_err(StoreError::storage(table.name()))?;
    found
        .map(|value| decode_json(table.name(), key, value.value()))
        .transpose()
}

/// Reads every entry of a JSON table from a snapshot, in key order: how modules reload their
/// state at start-up.
pub fn list_json<T: DeserializeOwned>(
    txn: &ReadTransaction,
    table: JsonTable,
) -> Result<Vec<(String, T)>, StoreError> {
    let Some(opened) = open_read_table(txn, table)? else {
        return Ok(Vec::new());
    };
    let mut entries = Vec::new();
    for entry in opened.iter().map_err(StoreError::storage(table.name()))? {
        let (key, value) = entry.map_err(StoreError::storage(table.name()))?;
        let key = key.value().to_owned();
        let value = decode_json(table.name(), &key, value.value())?;
        entries.push((key, value));
    }
    Ok(entries)
}

/// Reads the JSON value at `key` inside a write job, for read-modify-write; `None` if absent.
pub fn get_json_in_write<T: DeserializeOwned>(
    txn: &WriteTransaction,
    table: JsonTable,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let opened = open_table(txn, table)?;
    let found = opened.get(key).map_err(StoreError::storage(table.name()))?;
    found
        .map(|value| decode_json(table.name(), key, value.value()))
        .transpose()
}

/// Stores `value` as JSON at `key` inside a write job, replacing any previous value.
pub fn put_json<T: Serialize + ?Sized>(
    txn: &WriteTransaction,
    table: JsonTable,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Json {
        table: table.name().to_owned(),
        key: key.to_owned(),
        source,
    })?;
    let mut opened = open_table(txn, table)?;
    opened
        .insert(key, bytes.as_slice())
        .map_err(StoreError::storage(table.name()))?;
    Ok(())
}

/// Removes `key` from a JSON table inside a write job; whether it was there.
pub fn remove_json(
    txn: &WriteTransaction,
    table: JsonTable,
    key: &str,
) -> Result<bool, StoreError> {
    let mut opened = open_table(txn, table)?;
    let removed = opened
        .remove(key)
        .map_err(StoreError::storage(table.name()))?;
    Ok(removed.is_some())
}

#[cfg(test)]
mod tests;

/// A file backend that fails like a full or dying disk when told to, for the store's and the
/// ledger's tests of what a failure does and how the store recovers.
#[cfg(test)]
pub(crate) mod flaky;
