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
    /// Nonces per chunk: [`CHUNK`] for hashing threads, a fraction of a second of the
    /// simulated rate for a paced device.
    chunk: u64,
}

impl Shared {
    fn finish(&self, work: &ActiveWork, reason: FinishReason) {
        if let Some(event) = self.close(work, reason) {
            // The receiver is gone only when the agent is shutting down.
            let _ = self.events.blocking_send(event);
        }
    }

    /// Marks `work` finished; the event to report, unless it already was.
    fn close(&self, work: &ActiveWork, reason: FinishReason) -> Option<MinerEvent> {
        if work.closed.swap(true, Ordering::AcqRel) {
            return None;
        }
        lock(&self.live).remove(&work.order.id);
        Some(MinerEvent::Finished {
            assignment_id: work.order.id,
            scanned_until: work.scanned_until(),
            hashes: work.hashes.load(Ordering::Relaxed),
            reason,
        })
    }

    /// Scans `[start, end)` of `work`, reporting shares, and reports the assignment
    /// finished if this was its last chunk.
    fn scan_chunk(&self, work: &ActiveWork, start: u64, end: u64) {
        let id = work.order.id;
        self.engine.scan(&work.prepared, start, end, &mut |nonce| {
            let _ = self.events.blocking_send(MinerEvent::Share {
                assignment_id: id,
                nonce,
            });
        });
        let hashed = end - start;
        work.hashes.fetch_add(hashed, Ordering::Relaxed);
        self.hashes_total.fetch_add(hashed, Ordering::Relaxed);
        if work.complete_chunk(start, end) >= work.order.end {
            self.finish(work, FinishReason::Exhausted);
        }
    }

    fn add_busy(&self, busy: Duration) {
        self.busy_nanos.fetch_add(
            busy.as_nanos().try_into().unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn duty_cycle(&self) -> f64 {
        f64::from_bits(self.duty_cycle.load(Ordering::Relaxed))
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
            let start = front.cursor.fetch_add(self.chunk, Ordering::AcqRel);
            if start < front.order.end {
                let end = (start + self.chunk).min(front.order.end);
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
    fn shared(engine: EngineKind, chunk: u64) -> (Arc<Shared>, mpsc::Receiver<MinerEvent>) {
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
            chunk: chunk.max(1),
        });
        (shared, receiver)
    }

    /// A simulated device hashing at `hashes_per_second` on `pool`'s threads, shared with
    /// the other devices of the simulation: real hashes, real shares, at the device's pace.
    pub fn start_paced(
        pool: &PacedPool,
        engine: EngineKind,
        hashes_per_second: f64,
    ) -> (Miner, mpsc::Receiver<MinerEvent>) {
        let rate = if hashes_per_second.is_finite() {
            hashes_per_second.max(1.0)
        } else {
            1.0
        };
        // A quarter of a second of the device's hashing per turn, but at least 1,024
        // nonces: a turn costs the pool a few microseconds besides the hashing, which
        // would outweigh the hashing of a very slow device's shorter turns.
        let (shared, receiver) = Miner::shared(engine, (rate / 4.0).ceil().max(1024.0) as u64);
        pool.add(&shared, rate);
        (
            Miner {
                shared,
                threads: Vec::new(),
            },
            receiver,
        )
    }

    /// Starts `threads` hashing threads.
    /// Shares and finished assignments arrive on the returned channel.
    pub fn start(engine: EngineKind, threads: usize) -> (Miner, mpsc::Receiver<MinerEvent>) {
        let (shared, receiver) = Miner::shared(engine, CHUNK);
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
        let Some(event) = work.and_then(|w| self.shared.close(&w, FinishReason::Cancelled)) else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(event)) = self.shared.events.try_send(event) {
            // Blocking on a full event channel must never happen on the caller's (async)
            // thread.
            let events = self.shared.events.clone();
            std::thread::spawn(move || events.blocking_send(event));
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

    /// Number of hashing threads (one for a paced device).
    pub fn threads(&self) -> usize {
        self.threads.len().max(1)
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

/// Hashing threads shared by many simulated devices (`micromine-agent simulate`), each
/// hashing at its own rate: a turn scans a quarter second of one device's nonces, and the
/// device's next turn is due when its rate (and duty cycle) says it would have got there.
/// Shares are real, so the controller verifies them like any other.
pub struct PacedPool {
    inner: Arc<PacedInner>,
    threads: Vec<JoinHandle<()>>,
}

struct PacedInner {
    due: Mutex<std::collections::BinaryHeap<std::cmp::Reverse<Turn>>>,
    wakeup: Condvar,
    shutdown: AtomicBool,
    sequence: AtomicU64,
}

/// One device's next turn on the pool.
struct Turn {
    at: Instant,
    /// Ties broken by insertion order, so equal times keep their fairness.
    sequence: u64,
    device: std::sync::Weak<Shared>,
    rate: f64,
}

impl PartialEq for Turn {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.sequence) == (other.at, other.sequence)
    }
}
impl Eq for Turn {}
impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Turn {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.sequence).cmp(&(other.at, other.sequence))
    }
}

/// How often a device without work (or paused) looks again.
const PACED_IDLE_POLL: Duration = Duration::from_millis(250);
/// A device the pool could not keep up with catches up at most this much at once.
const PACED_MAX_LAG: Duration = Duration::from_secs(1);

impl PacedPool {
    /// A pool of `threads` hashing threads.
    pub fn new(threads: usize) -> PacedPool {
        let inner = Arc::new(PacedInner {
            due: Mutex::new(std::collections::BinaryHeap::new()),
            wakeup: Condvar::new(),
            shutdown: AtomicBool::new(false),
            sequence: AtomicU64::new(0),
        });
        let threads = (0..threads.max(1))
            .filter_map(|i| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("paced-{i}"))
                    .spawn(move || paced_thread(&inner))
                    .map_err(|e| tracing::error!(error = %e, "cannot start hashing thread"))
                    .ok()
            })
            .collect();
        PacedPool { inner, threads }
    }

    fn add(&self, device: &Arc<Shared>, rate: f64) {
        self.inner
            .schedule(Instant::now(), Arc::downgrade(device), rate);
    }
}

impl PacedInner {
    fn schedule(&self, at: Instant, device: std::sync::Weak<Shared>, rate: f64) {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        lock(&self.due).push(std::cmp::Reverse(Turn {
            at,
            sequence,
            device,
            rate,
        }));
        self.wakeup.notify_one();
    }

    /// The next turn that is due, waiting for it; None at shutdown.
    fn next_turn(&self) -> Option<Turn> {
        let mut due = lock(&self.due);
        loop {
            if self.shutdown.load(Ordering::Acquire) {
                return None;
            }
            let now = Instant::now();
            match due.peek() {
                Some(std::cmp::Reverse(turn)) if turn.at <= now => {
                    return due.pop().map(|std::cmp::Reverse(turn)| turn);
                }
                Some(std::cmp::Reverse(turn)) => {
                    let wait = turn.at - now;
                    due = self
                        .wakeup
                        .wait_timeout(due, wait)
                        .map_or_else(|p| p.into_inner().0, |(guard, _)| guard);
                }
                None => {
                    due = self
                        .wakeup
                        .wait_timeout(due, PACED_IDLE_POLL)
                        .map_or_else(|p| p.into_inner().0, |(guard, _)| guard);
                }
            }
        }
    }
}

fn paced_thread(pool: &PacedInner) {
    lower_priority();
    while let Some(turn) = pool.next_turn() {
        // A device whose miner was dropped or stopped leaves the pool.
        let Some(device) = turn.device.upgrade() else {
            continue;
        };
        if device.shutdown.load(Ordering::Acquire) {
            continue;
        }
        let now = Instant::now();
        if device.paused.load(Ordering::Acquire) {
            device.expire_due();
            pool.schedule(now + PACED_IDLE_POLL, turn.device, turn.rate);
            continue;
        }
        let Some((work, start, end)) = device.next_chunk() else {
            pool.schedule(now + PACED_IDLE_POLL, turn.device, turn.rate);
            continue;
        };
        device.scan_chunk(&work, start, end);
        // Device time, not pool time: this is how long the simulated device hashed.
        let hashing = Duration::from_secs_f64((end - start) as f64 / turn.rate);
        device.add_busy(hashing);
        let pause = hashing.div_f64(device.duty_cycle());
        let next = turn.at.max(now.checked_sub(PACED_MAX_LAG).unwrap_or(now)) + pause;
        pool.schedule(next, turn.device, turn.rate);
    }
}

impl Drop for PacedPool {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::Release);
        self.inner.wakeup.notify_all();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
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
        shared.scan_chunk(&work, start, end);
        let burst = began.elapsed();
        shared.add_busy(burst);
        let duty = shared.duty_cycle();
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
    async fn paced_devices_share_a_pool_hash_honestly_and_no_faster_than_their_rate() {
        let pool = PacedPool::new(1);
        // 40,000 H/s: turns of 10,000 nonces, a quarter second apart.
        let (fast, mut fast_events) = Miner::start_paced(&pool, EngineKind::detect(), 40_000.0);
        let (slow, mut slow_events) = Miner::start_paced(&pool, EngineKind::detect(), 20_000.0);
        let a = order(
            7,
            500,
            500 + 40_000,
            2f64.powi(-22),
            Duration::from_secs(60),
        );
        let b = order(8, 0, 20_000, 2f64.powi(-22), Duration::from_secs(60));
        let started = Instant::now();
        fast.push(a.clone());
        slow.push(b.clone());
        let (fast_shares, fast_done) = collect_until_finished(&mut fast_events, &[7]).await;
        let (slow_shares, slow_done) = collect_until_finished(&mut slow_events, &[8]).await;
        // Four turns of the fast device and four of the slow one (5,000 nonces each): the
        // last starts 0.75 s after the first, so neither can be done sooner.
        assert!(
            started.elapsed() >= Duration::from_millis(750),
            "{:?}",
            started.elapsed()
        );
        for (o, shares, done) in [(&a, fast_shares, fast_done), (&b, slow_shares, slow_done)] {
            let expected: Vec<MinerEvent> = (o.start..o.end)
                .map(|n| n as u32)
                .filter(|&n| {
                    o.target
                        .is_met_by(&sha256d(&header_with_nonce(&o.prefix, n)))
                })
                .map(|nonce| MinerEvent::Share {
                    assignment_id: o.id,
                    nonce,
                })
                .collect();
            assert!(!expected.is_empty());
            assert_eq!(shares, expected, "every share of {}, in order", o.id);
            assert_eq!(
                done,
                vec![MinerEvent::Finished {
                    assignment_id: o.id,
                    scanned_until: o.end,
                    hashes: o.end - o.start,
                    reason: FinishReason::Exhausted,
                }]
            );
        }
        // Busy time is the device's own: hashes over its rate.
        assert_eq!(fast.busy_time(), Duration::from_secs(1));
        assert_eq!(slow.threads(), 1);
        // A dropped device leaves the pool; the other goes on.
        drop(fast);
        let c = order(9, 0, 5_000, 2f64.powi(-22), Duration::from_secs(60));
        slow.push(c);
        let (_, done) = collect_until_finished(&mut slow_events, &[9]).await;
        assert_eq!(done.len(), 1);
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
