//! Hashing threads working through assigned nonce ranges.
//!
//! Assignments queue up in order; threads take fixed-size chunks of the front assignment
//! from an atomic cursor, so several threads share one range without coordination beyond
//! a `fetch_add`. A chunk is a few milliseconds of work, which bounds how late a
//! cancellation, a lease expiry or a shutdown takes effect.
//!
//! The miner outlives sessions: while the agent is disconnected it keeps scanning what it
//! holds until the leases run out, then idles (it never mines unsupervised past a lease).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use micromine_proto::work::{HEADER_PREFIX_LEN, Target};
use tokio::sync::mpsc;

use crate::engine::{self, EngineKind, Work};

/// Nonces per chunk: about 3 ms on the `sha-ni` engine, 40 ms on the portable one.
pub const CHUNK: u64 = 1 << 16;

/// A nonce range to scan, as received from the controller.
#[derive(Clone, Debug)]
pub struct WorkOrder {
    /// Assignment id.
    pub id: u64,
    /// The 76-byte header prefix.
    pub prefix: [u8; HEADER_PREFIX_LEN],
    /// First nonce.
    pub start: u64,
    /// One past the last nonce (at most 2^32).
    pub end: u64,
    /// Share target.
    pub target: Target,
    /// When the lease runs out on this device's clock.
    pub deadline: Instant,
}

/// Why an assignment stopped being worked on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// Every nonce was scanned.
    Exhausted,
    /// The lease ran out first.
    LeaseExpired,
    /// The controller cancelled it, or the agent released it.
    Cancelled,
}

/// What the hashing threads tell the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MinerEvent {
    /// A nonce meeting the share target.
    Share {
        /// Assignment id.
        assignment_id: u64,
        /// The nonce.
        nonce: u32,
    },
    /// The miner is done with an assignment.
    Finished {
        /// Assignment id.
        assignment_id: u64,
        /// Every nonce below this (from the range start) was scanned.
        scanned_until: u64,
        /// Hashes computed for it.
        hashes: u64,
        /// Why it ended.
        reason: FinishReason,
    },
}

/// Progress of one assignment, as the session reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkProgress {
    /// Assignment id.
    pub id: u64,
    /// Every nonce in `[start, scanned_until)` has been scanned.
    pub scanned_until: u64,
    /// Hashes computed.
    pub hashes: u64,
}

struct ActiveWork {
    order: WorkOrder,
    prepared: Work,
    /// Next chunk start to hand out.
    cursor: AtomicU64,
    /// Set once; whoever sets it reports `Finished`.
    closed: AtomicBool,
    hashes: AtomicU64,
    completion: Mutex<Completion>,
}

/// Tracks which chunks are done so progress is the contiguous scanned prefix.
struct Completion {
    scanned_until: u64,
    /// Finished chunks above the prefix: start -> end.
    pending: BTreeMap<u64, u64>,
}

impl ActiveWork {
    fn new(order: WorkOrder) -> ActiveWork {
        ActiveWork {
            prepared: engine::prepare(&order.prefix, order.target),
            cursor: AtomicU64::new(order.start),
            closed: AtomicBool::new(false),
            hashes: AtomicU64::new(0),
            completion: Mutex::new(Completion {
                scanned_until: order.start,
                pending: BTreeMap::new(),
            }),
            order,
        }
    }

    /// Records a scanned chunk; returns the new contiguous prefix.
    fn complete_chunk(&self, start: u64, end: u64) -> u64 {
        let mut done = lock(&self.completion);
        if start == done.scanned_until {
            done.scanned_until = end;
            while let Some(next_end) = {
                let key = done.scanned_until;
                done.pending.remove(&key)
            } {
                done.scanned_until = next_end;
            }
        } else {
            done.pending.insert(start, end);
        }
        done.scanned_until
    }

    fn scanned_until(&self) -> u64 {
        lock(&self.completion).scanned_until
    }

    fn progress(&self) -> WorkProgress {
        WorkProgress {
            id: self.order.id,
            scanned_until: self.scanned_until(),
            hashes: self.hashes.load(Ordering::Relaxed),
        }
    }
}

/// A poisoned lock only means another hashing thread panicked; the data (ranges and
/// counters) stays consistent because every update is a single assignment.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Shared {
    queue: Mutex<VecDeque<Arc<ActiveWork>>>,
    /// Every assignment not yet finished, including ones whose chunks are all handed out.
    live: Mutex<BTreeMap<u64, Arc<ActiveWork>>>,
    wakeup: Condvar,
    shutdown: AtomicBool,
    /// Set while a local limit forbids hashing; held work keeps its place (and expires on
    /// time).
    paused: AtomicBool,
    /// Duty cycle as f64 bits.
    duty_cycle: AtomicU64,
    hashes_total: AtomicU64,
    /// Time all threads together spent hashing, nanoseconds.
    busy_nanos: AtomicU64,
    events: mpsc::Sender<MinerEvent>,
    engine: EngineKind,
}

impl Shared {
    fn finish(&self, work: &ActiveWork, reason: FinishReason) {
        if work.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        lock(&self.live).remove(&work.order.id);
        let event = MinerEvent::Finished {
            assignment_id: work.order.id,
            scanned_until: work.scanned_until(),
            hashes: work.hashes.load(Ordering::Relaxed),
            reason,
        };
        // The receiver is gone only when the agent is shutting down.
        let _ = self.events.blocking_send(event);
    }

    /// Finishes queued work whose lease ran out; for while hashing is paused, when no
    /// chunk is taken to notice it.
    fn expire_due(&self) {
        let now = Instant::now();
        let expired: Vec<Arc<ActiveWork>> = {
            let mut queue = lock(&self.queue);
            let (gone, kept): (VecDeque<_>, VecDeque<_>) =
                queue.drain(..).partition(|w| now >= w.order.deadline);
            *queue = kept;
            gone.into_iter().collect()
        };
        for work in expired {
            self.finish(&work, FinishReason::LeaseExpired);
        }
    }

    /// The next chunk to scan, or None when there is nothing to do.
    fn next_chunk(&self) -> Option<(Arc<ActiveWork>, u64, u64)> {
        let mut queue = lock(&self.queue);
        loop {
            let front = queue.front()?.clone();
            if front.closed.load(Ordering::Acquire) {
                queue.pop_front();
                continue;
            }
            if Instant::now() >= front.order.deadline {
                queue.pop_front();
                drop(queue);
                self.finish(&front, FinishReason::LeaseExpired);
                queue = lock(&self.queue);
                continue;
            }
            let start = front.cursor.fetch_add(CHUNK, Ordering::AcqRel);
            if start < front.order.end {
                let end = (start + CHUNK).min(front.order.end);
                return Some((front, start, end));
            }
            // All chunks handed out; whoever completes the last one reports it.
            queue.pop_front();
        }
    }
}

/// The hashing threads and their queue of work.
pub struct Miner {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Miner {
    /// Starts `threads` hashing threads.
    /// Shares and finished assignments arrive on the returned channel.
    pub fn start(engine: EngineKind, threads: usize) -> (Miner, mpsc::Receiver<MinerEvent>) {
        let (events, receiver) = mpsc::channel(4096);
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            live: Mutex::new(BTreeMap::new()),
            wakeup: Condvar::new(),
            shutdown: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            duty_cycle: AtomicU64::new(1.0f64.to_bits()),
            hashes_total: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
            events,
            engine,
        });
        let threads = (0..threads.max(1))
            .filter_map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("hash-{i}"))
                    .spawn(move || hashing_thread(&shared))
                    .map_err(|e| tracing::error!(error = %e, "cannot start hashing thread"))
                    .ok()
            })
            .collect();
        (Miner { shared, threads }, receiver)
    }

    /// Queues an assignment behind the ones already held.
    pub fn push(&self, order: WorkOrder) {
        let work = Arc::new(ActiveWork::new(order));
        lock(&self.shared.live).insert(work.order.id, work.clone());
        lock(&self.shared.queue).push_back(work);
        self.shared.wakeup.notify_all();
    }

    /// Stops work on an assignment; a `Finished { reason: Cancelled }` event follows unless
    /// it had already finished.
    pub fn cancel(&self, assignment_id: u64) {
        let work = lock(&self.shared.live).get(&assignment_id).cloned();
        if let Some(work) = work {
            let shared = self.shared.clone();
            // `finish` may block on a full event channel; never do that on the caller's
            // (async) thread.
            std::thread::spawn(move || shared.finish(&work, FinishReason::Cancelled));
        }
    }

    /// Progress of every assignment still held.
    pub fn progress(&self) -> Vec<WorkProgress> {
        lock(&self.shared.live)
            .values()
            .map(|w| w.progress())
            .collect()
    }

    /// Ids of the assignments still held.
    pub fn held(&self) -> Vec<u64> {
        lock(&self.shared.live).keys().copied().collect()
    }

    /// Sets the fraction of time the threads hash, clamped to (0, 1].
    pub fn set_duty_cycle(&self, duty: f64) {
        let duty = if duty.is_finite() {
            duty.clamp(0.01, 1.0)
        } else {
            1.0
        };
        self.shared
            .duty_cycle
            .store(duty.to_bits(), Ordering::Relaxed);
    }

    /// Stops (`true`) or resumes hashing without giving up held work: a local limit
    /// (heat, battery, host load, a window) holds the device back.
    pub fn set_paused(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::Release);
        self.shared.wakeup.notify_all();
    }

    /// Time the hashing threads together have spent hashing since start.
    pub fn busy_time(&self) -> Duration {
        Duration::from_nanos(self.shared.busy_nanos.load(Ordering::Relaxed))
    }

    /// Number of hashing threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Total hashes computed since start.
    pub fn hashes_total(&self) -> u64 {
        self.shared.hashes_total.load(Ordering::Relaxed)
    }

    /// Stops the threads after their current chunk and waits for them.
    pub fn stop(mut self) {
        self.shutdown_threads();
    }

    fn shutdown_threads(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.wakeup.notify_all();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for Miner {
    fn drop(&mut self) {
        self.shutdown_threads();
    }
}

/// Hashing is the lowest-value work on a device: its threads run at the lowest priority
/// the OS offers an unprivileged process (nice 19 on Linux), so the device's own work
/// always goes first.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let thread = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(thread), 19) {
            tracing::warn!(error = %e, "cannot lower the hashing thread's priority");
        }
    }
}

fn hashing_thread(shared: &Shared) {
    lower_priority();
    while !shared.shutdown.load(Ordering::Acquire) {
        if shared.paused.load(Ordering::Acquire) {
            shared.expire_due();
            let queue = lock(&shared.queue);
            if shared.paused.load(Ordering::Acquire) && !shared.shutdown.load(Ordering::Acquire) {
                let _ = shared
                    .wakeup
                    .wait_timeout(queue, Duration::from_millis(200));
            }
            continue;
        }
        let Some((work, start, end)) = shared.next_chunk() else {
            let queue = lock(&shared.queue);
            if queue.is_empty() && !shared.shutdown.load(Ordering::Acquire) {
                // Also wakes now and then to notice lease expiry of queued work.
                let _ = shared
                    .wakeup
                    .wait_timeout(queue, Duration::from_millis(200));
            }
            continue;
        };
        let began = Instant::now();
        let id = work.order.id;
        shared
            .engine
            .scan(&work.prepared, start, end, &mut |nonce| {
                let _ = shared.events.blocking_send(MinerEvent::Share {
                    assignment_id: id,
                    nonce,
                });
            });
        let hashed = end - start;
        work.hashes.fetch_add(hashed, Ordering::Relaxed);
        shared.hashes_total.fetch_add(hashed, Ordering::Relaxed);
        if work.complete_chunk(start, end) >= work.order.end {
            shared.finish(&work, FinishReason::Exhausted);
        }
        let burst = began.elapsed();
        shared.busy_nanos.fetch_add(
            burst.as_nanos().try_into().unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let duty = f64::from_bits(shared.duty_cycle.load(Ordering::Relaxed));
        if duty < 1.0 {
            // Sleep in proportion to the burst so the average matches the duty cycle.
            std::thread::sleep(Duration::from_secs_f64(
                burst.as_secs_f64() * (1.0 - duty) / duty,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use micromine_proto::work::{header_with_nonce, sha256d};

    fn order(id: u64, start: u64, end: u64, difficulty: f64, lease: Duration) -> WorkOrder {
        WorkOrder {
            id,
            prefix: [id as u8; 76],
            start,
            end,
            target: Target::from_difficulty(difficulty).expect("valid"),
            deadline: Instant::now() + lease,
        }
    }

    async fn collect_until_finished(
        rx: &mut mpsc::Receiver<MinerEvent>,
        ids: &[u64],
    ) -> (Vec<MinerEvent>, Vec<MinerEvent>) {
        let mut shares = Vec::new();
        let mut finished = Vec::new();
        while finished.len() < ids.len() {
            let event = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("miner makes progress")
                .expect("channel open");
            match event {
                MinerEvent::Share { .. } => shares.push(event),
                MinerEvent::Finished { .. } => finished.push(event),
            }
        }
        (shares, finished)
    }

    #[tokio::test]
    async fn scans_whole_ranges_on_several_threads_and_finds_every_share() {
        let (miner, mut rx) = Miner::start(EngineKind::detect(), 2);
        let a = order(
            1,
            1000,
            1000 + 5 * CHUNK + 123,
            2f64.powi(-20),
            Duration::from_secs(60),
        );
        let b = order(2, 0, 3 * CHUNK, 2f64.powi(-20), Duration::from_secs(60));
        miner.push(a.clone());
        miner.push(b.clone());
        let (shares, finished) = collect_until_finished(&mut rx, &[1, 2]).await;
        for o in [&a, &b] {
            let expected: Vec<u32> = (o.start..o.end)
                .map(|n| n as u32)
                .filter(|&n| {
                    o.target
                        .is_met_by(&sha256d(&header_with_nonce(&o.prefix, n)))
                })
                .collect();
            let mut got: Vec<u32> = shares
                .iter()
                .filter_map(|e| match e {
                    MinerEvent::Share {
                        assignment_id,
                        nonce,
                    } if *assignment_id == o.id => Some(*nonce),
                    _ => None,
                })
                .collect();
            got.sort_unstable();
            assert!(!expected.is_empty());
            assert_eq!(got, expected, "assignment {}", o.id);
            assert!(finished.contains(&MinerEvent::Finished {
                assignment_id: o.id,
                scanned_until: o.end,
                hashes: o.end - o.start,
                reason: FinishReason::Exhausted,
            }));
        }
        assert_eq!(miner.hashes_total(), (a.end - a.start) + (b.end - b.start));
        assert!(miner.held().is_empty());
        miner.stop();
    }

    #[tokio::test]
    async fn paused_miners_hash_nothing_but_still_let_leases_expire() {
        let (miner, mut rx) = Miner::start(EngineKind::detect(), 1);
        miner.push(order(3, 0, 1 << 32, 1e9, Duration::from_secs(600)));
        while miner.hashes_total() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        miner.set_paused(true);
        // The chunk in hand finishes; after that the count stands still.
        let mut settled = miner.hashes_total();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = miner.hashes_total();
            if now == settled {
                break;
            }
            settled = now;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(miner.hashes_total(), settled, "no hashing while paused");
        // Held work is not forgotten, and work whose lease ends while paused is finished.
        assert_eq!(miner.held(), vec![3]);
        miner.push(order(4, 0, 1 << 32, 1e9, Duration::from_millis(100)));
        let (_, finished) = collect_until_finished(&mut rx, &[4]).await;
        assert!(matches!(
            finished[0],
            MinerEvent::Finished {
                assignment_id: 4,
                reason: FinishReason::LeaseExpired,
                hashes: 0,
                ..
            }
        ));
        miner.set_paused(false);
        tokio::time::timeout(Duration::from_secs(30), async {
            while miner.hashes_total() == settled {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("hashing resumes");
        miner.stop();
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn hashing_threads_run_at_the_lowest_priority() {
        let nice = std::thread::spawn(|| {
            lower_priority();
            rustix::process::getpriority_process(Some(rustix::thread::gettid()))
        })
        .join()
        .expect("thread")
        .expect("getpriority");
        assert_eq!(nice, 19);
    }

    #[tokio::test]
    async fn cancelled_and_expired_work_stops() {
        let (miner, mut rx) = Miner::start(EngineKind::detect(), 1);
        // A range far too large to finish, cancelled.
        miner.push(order(7, 0, 1 << 32, 1e9, Duration::from_secs(600)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        miner.cancel(7);
        // A range whose lease is already over.
        miner.push(order(8, 0, 1 << 32, 1e9, Duration::from_millis(0)));
        let (_, finished) = collect_until_finished(&mut rx, &[7, 8]).await;
        let reasons: Vec<(u64, FinishReason)> = finished
            .iter()
            .filter_map(|e| match e {
                MinerEvent::Finished {
                    assignment_id,
                    reason,
                    scanned_until,
                    ..
                } => {
                    assert!(*scanned_until < 1 << 32);
                    Some((*assignment_id, *reason))
                }
                MinerEvent::Share { .. } => None,
            })
            .collect();
        assert!(
            reasons.contains(&(7, FinishReason::Cancelled)),
            "{reasons:?}"
        );
        assert!(
            reasons.contains(&(8, FinishReason::LeaseExpired)),
            "{reasons:?}"
        );
        miner.stop();
    }

    #[test]
    fn progress_is_the_contiguous_prefix() {
        let work = ActiveWork::new(order(1, 100, 100 + 4 * CHUNK, 1.0, Duration::from_secs(1)));
        assert_eq!(work.complete_chunk(100 + CHUNK, 100 + 2 * CHUNK), 100);
        assert_eq!(work.complete_chunk(100 + 3 * CHUNK, 100 + 4 * CHUNK), 100);
        assert_eq!(work.complete_chunk(100, 100 + CHUNK), 100 + 2 * CHUNK);
        assert_eq!(
            work.complete_chunk(100 + 2 * CHUNK, 100 + 3 * CHUNK),
            100 + 4 * CHUNK
        );
    }
}
