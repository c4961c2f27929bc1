use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::backends::FileBackend;
use redb::{BackendError, ConcurrencyMode, Database, DatabaseError, StorageError};

use super::{Store, StoreError};

/// What fails while set. Shared by every backend the store opens, so it also governs
/// the store's own reopen attempts.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// fsync reports failure (after doing nothing, as a dying disk would).
    pub(crate) sync: AtomicBool,
    /// Writes and growth fail with ENOSPC, as on a full disk.
    pub(crate) full: AtomicBool,
}

#[derive(Debug)]
struct Flaky {
    inner: FileBackend,
    faults: Arc<Faults>,
}

fn no_space() -> io::Error {
    io::Error::new(io::ErrorKind::StorageFull, "no space left on device")
}

impl redb::StorageBackend for Flaky {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.faults.full.load(Ordering::SeqCst) && len > self.inner.len()? {
            return Err(no_space());
        }
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.faults.sync.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected fsync failure"));
        }
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.faults.full.load(Ordering::SeqCst) {
            return Err(no_space());
        }
        self.inner.write(offset, data)
    }
    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

/// A store on `path` whose every open (the first and each reopen) goes through a backend
/// failing as `Faults` says.
pub(crate) fn open(path: &Path) -> (Store, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let shared = Arc::clone(&faults);
    let file_path = path.to_path_buf();
    let store = Store::open_with(
        path,
        Box::new(move || {
            let failed = |source: DatabaseError| StoreError::Open {
                path: file_path.clone(),
                source: Box::new(source),
            };
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&file_path)
                .map_err(|e| failed(DatabaseError::Storage(StorageError::Io(e))))?;
            let backend = Flaky {
                inner: FileBackend::new(file).map_err(failed)?,
                faults: Arc::clone(&shared),
            };
            Database::builder()
                .set_concurrency_mode(ConcurrencyMode::ExclusiveWriter)
                .create_with_backend(backend)
                .map_err(failed)
        }),
    )
    .expect("open the store on a flaky backend");
    (store, faults)
}
