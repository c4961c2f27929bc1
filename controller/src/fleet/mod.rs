//! The live fleet: devices, MicroMiners, leases and shares, tied together.
//!
//! [`micromine_fleet::state::FleetState`] is the logic, a synchronous state machine behind one mutex. This
//! module is its async shell: it runs the lookups, hashes shares outside the lock, writes
//! the ledger, and persists every state change. Effects are queued to the store in the
//! same order the state produced them (the store queues a job when `write` is called), and
//! one dispatcher sends the resulting messages in that same order, so a device can never
//! see a `Cancel` before the `Assignment` it cancels.
//!
//! A message waits for durability only when a crash could otherwise make the restarted
//! controller contradict it (a header, an id reservation: see
//! [`micromine_fleet::state::Effects::messages_wait_for_writes`]); a plain assignment leaves while its lease
//! is still being written, so the fsync stays off the path of a device asking for work.
//! Acknowledgements of shares always wait for the ledger.

mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use micromine_proto::pb::{self, RejectReason, ShareStatus};
use micromine_proto::work::{header_with_nonce, sha256d};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::revocation::Revocations;
use micromine_fleet::state::{Effects, FleetState, RecordedShare, Scope, ShareCheck};
use micromine_fleet::status::FleetView;
use micromine_resources::microminer::MinerSet;
use micromine_store::ledger::{
    AcceptedShare, Ledger, LedgerError, Rejection, ShareKey, ShareOutcome, Totals,
};
use micromine_store::store::{Store, StoreError};

/// Messages to one device's session. Errors end the stream with that status.
pub type Outbound = mpsc::Sender<Result<pb::ControllerMessage, tonic::Status>>;

/// Why a fleet operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The store could not make a change durable.
    #[error("fleet store")]
    Store(#[from] StoreError),
    /// The ledger could not record shares.
    #[error("share ledger")]
    Ledger(#[from] LedgerError),
}

type Durable = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

struct Dispatch {
    /// The effects' writes, if any.
    durable: Option<Durable>,
    /// Whether the messages wait for `durable`.
    wait_for_writes: bool,
    messages: Vec<(String, pb::ControllerMessage)>,
    /// When a device asked for the work these messages may carry (its `Hello`, a
    /// finished range), for the assignment latency.
    asked: Option<std::time::Instant>,
}

type SharedMetrics = Arc<Mutex<Option<Arc<crate::metrics::Metrics>>>>;

struct Link {
    session: u64,
    outbound: Outbound,
    /// Cancelled to end the session from the controller's side (revocation).
    cancel: CancellationToken,
}

/// The fleet. Shared by the gRPC services, the HTTP API and the periodic tick.
pub struct Fleet {
    state: Mutex<FleetState>,
    links: Arc<Mutex<HashMap<String, Link>>>,
    store: Store,
    ledger: Ledger,
    dispatch: mpsc::UnboundedSender<Dispatch>,
    revocations: Mutex<Arc<Revocations>>,
    /// Where latencies and outcomes are recorded, once metrics are set up.
    metrics: SharedMetrics,
    /// Pool connections of MicroMiners with a `stratum` work source.
    upstreams: Mutex<upstream::Upstreams>,
    /// Itself, for the pool connections' callbacks (which must not keep it alive).
    me: std::sync::Weak<Fleet>,
}

/// Current wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Fleet operations do not panic while holding these locks; if one did, the state is
    // still the last consistent one, because every mutation is completed before unlock.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A share after re-hashing, before the ledger.
#[derive(Debug)]
pub enum Judged {
    /// Refused, with the reason and the MicroMiner when known.
    Rejected(pb::Share, RejectReason, Option<String>),
    /// Meets its target.
    Accepted {
        /// The share as the device sent it.
        share: pb::Share,
        /// The ledger record.
        record: AcceptedShare,
        /// The header it was found on.
        header: Arc<micromine_work::worksource::WorkHeader>,
        /// Its hash, when it is a block.
        block_hash: Option<[u8; 32]>,
    },
}

impl Fleet {
    /// Restores the fleet from the store and starts its dispatcher. Must be called inside
    /// a tokio runtime.
    pub async fn open(store: Store, ledger: Ledger) -> Result<Arc<Fleet>, FleetError> {
        // Shares still waiting for a pool's verdict belong to pool sessions that ended
        // with the previous process.
        ledger.settle_pending_pool_shares().await?;
        let restored = micromine_fleet::persist::load(&store.read()?)?;
        let unreferenced = restored.unreferenced_headers.clone();
        let cleaned = unreferenced.len();
        let (leases, ended, devices) = (
            restored.leases.len(),
            restored.ended_leases.len(),
            restored.devices.len(),
        );
        let mut state = FleetState::new(restored);
        // Before any share is judged: leases whose window closed while the controller was
        // down must be stale now, as they would have been had it kept running.
        let forgotten = state.forget_ended_leases(now_ms()).persist;
        let expired = forgotten
            .iter()
            .filter(|op| matches!(op, micromine_fleet::persist::PersistOp::ForgetEndedLease(_)))
            .count();
        store
            .write(move |txn| {
                micromine_fleet::persist::forget_headers(txn, &unreferenced)?;
                micromine_fleet::persist::apply(txn, &forgotten)
            })
            .await?;
        tracing::info!(
            leases,
            ended_leases = ended.saturating_sub(expired),
            devices,
            headers_removed = cleaned,
            "fleet state restored"
        );
        let (dispatch, mut queue) = mpsc::unbounded_channel::<Dispatch>();
        let links: Arc<Mutex<HashMap<String, Link>>> = Arc::default();
        let metrics: SharedMetrics = Arc::default();
        let fleet = Arc::new_cyclic(|me| Fleet {
            state: Mutex::new(state),
            links: links.clone(),
            store,
            ledger,
            dispatch,
            revocations: Mutex::new(Arc::default()),
            metrics: metrics.clone(),
            upstreams: Mutex::default(),
            me: me.clone(),
        });
        // Writes whose messages did not wait for them are still awaited, in order, so a
        // failure is heard of.
        let (unawaited, mut writes) = mpsc::unbounded_channel::<Durable>();
        tokio::spawn(async move {
            while let Some(durable) = writes.recv().await {
                if let Err(e) = durable.await {
                    tracing::error!(error = %e, "fleet state could not be persisted after its messages were sent; a crash now would forget those leases");
                }
            }
        });
        tokio::spawn(async move {
            while let Some(item) = queue.recv().await {
                match item.durable {
                    Some(durable) if item.wait_for_writes => {
                        if let Err(e) = durable.await {
                            tracing::error!(error = %e, "fleet state could not be persisted; messages withheld");
                            continue;
                        }
                    }
                    Some(durable) => {
                        let _ = unawaited.send(durable);
                    }
                    None => {}
                }
                // Only requests for work are timed; most dispatches are not one.
                if let Some(asked) = item.asked
                    && item.messages.iter().any(|(_, m)| {
                        matches!(m.kind, Some(pb::controller_message::Kind::Assignment(_)))
                    })
                    && let Some(metrics) = lock(&metrics).as_ref()
                {
                    metrics.assignment_latency(asked.elapsed());
                }
                send_all(&links, item.messages);
            }
        });
        Ok(fleet)
    }

    /// The share ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Queues effects; called with the state lock held so store order is state order.
    fn queue(&self, fx: Effects) {
        self.queue_asked(fx, None);
    }

    /// [`Fleet::queue`] for effects answering a device's request for work made at `asked`.
    fn queue_asked(&self, fx: Effects, asked: Option<std::time::Instant>) {
        if fx.is_empty() {
            return;
        }
        let wait_for_writes = fx.messages_wait_for_writes();
        let durable: Option<Durable> = if fx.persist.is_empty() {
            None
        } else {
            let ops = fx.persist;
            Some(Box::pin(self.store.write(move |txn| {
                micromine_fleet::persist::apply(txn, &ops)
            })))
        };
        // The dispatcher lives as long as the runtime; if it is gone we are shutting down.
        let _ = self.dispatch.send(Dispatch {
            durable,
            wait_for_writes,
            messages: fx.messages,
            asked,
        });
    }

    /// Makes a set of MicroMiners current.
    pub fn apply_miners(&self, miners: &MinerSet) {
        {
            let mut state = lock(&self.state);
            let fx = state.apply_miners(miners, now_ms());
            self.queue(fx);
        }
        // After the state knows the MicroMiners, so the first events find them.
        self.reconcile_upstreams(miners);
    }

    /// Cordons (`true`) or uncordons a device; see `EdgeDevice.spec.unschedulable`.
    pub fn set_unschedulable(&self, device: &str, unschedulable: bool) {
        let mut state = lock(&self.state);
        let fx = state.set_unschedulable(device, unschedulable, now_ms());
        self.queue(fx);
    }

    /// Records latencies and outcomes in `metrics` from now on.
    pub fn set_metrics(&self, metrics: Arc<crate::metrics::Metrics>) {
        *lock(&self.metrics) = Some(metrics);
    }

    /// The metrics in use, if any.
    pub fn metrics(&self) -> Option<Arc<crate::metrics::Metrics>> {
        lock(&self.metrics).clone()
    }

    /// The revocations the status views mark devices with.
    pub fn set_revocations(&self, revocations: Arc<Revocations>) {
        *lock(&self.revocations) = revocations;
    }

    /// Ends a device's session now (it was revoked): the session is told why, its leases
    /// are reclaimed at once (work from a revoked device is not waited for), and whatever
    /// it sends afterwards is not read.
    pub fn cut(&self, device: &str, reason: &str) {
        let mut state = lock(&self.state);
        if let Some(link) = lock(&self.links).remove(device) {
            let _ = link
                .outbound
                .try_send(Err(tonic::Status::permission_denied(reason.to_string())));
            link.cancel.cancel();
            tracing::warn!(device, reason, "session cut");
        }
        let fx = state.cut(device, now_ms());
        self.queue(fx);
    }

    /// Registers a session after its `Hello`; the `Welcome` and first assignments follow
    /// on `outbound`. `cancel` ends the session from this side. Returns the session id.
    pub fn connect(
        &self,
        device: &str,
        hello: &pb::Hello,
        outbound: Outbound,
        cancel: CancellationToken,
    ) -> u64 {
        let asked = std::time::Instant::now();
        let mut state = lock(&self.state);
        let (session, fx) = state.connect(device, hello, now_ms());
        let replaced = lock(&self.links).insert(
            device.to_string(),
            Link {
                session,
                outbound,
                cancel,
            },
        );
        if let Some(old) = replaced {
            // Ending the old stream makes its agent (if it is still alive) reconnect
            // cleanly instead of two sessions fighting over one device.
            let _ = old.outbound.try_send(Err(tonic::Status::aborted(
                "a newer session for this device took over",
            )));
        }
        self.queue_asked(fx, Some(asked));
        session
    }

    /// Whether `device` may enroll now: a name whose certificate is still valid and not
    /// revoked belongs to the device holding it, and a blocked name to nobody. The reason
    /// is for the operator's log and the caller.
    pub fn may_enroll(&self, device: &str) -> Result<(), String> {
        let revocation = lock(&self.revocations).get(device);
        if revocation.is_some_and(|r| r.blocked) {
            return Err(format!("device {device} is revoked"));
        }
        let record = lock(&self.state).device_record(device);
        let Some(record) = record else {
            return Ok(());
        };
        let live = record.certificate_not_after_unix_ms > now_ms();
        let revoked_since =
            revocation.is_some_and(|r| r.revoked_at_unix_ms >= record.certificate_issued_unix_ms);
        if live && !revoked_since {
            return Err(format!(
                "device name {device} is already enrolled (certificate valid until {} Unix ms); revoke it first or choose another name",
                record.certificate_not_after_unix_ms
            ));
        }
        Ok(())
    }

    /// Records a device that just got a certificate (enrollment or renewal), durably,
    /// before the certificate is returned. `labels` are the token's (enrollment only).
    pub async fn certified(
        &self,
        device: &str,
        labels: Option<std::collections::BTreeMap<String, String>>,
        not_after_unix_ms: i64,
    ) -> Result<(), FleetError> {
        let durable = {
            let mut state = lock(&self.state);
            let ops = state
                .certified(device, labels, not_after_unix_ms, now_ms())
                .persist;
            // Queued under the lock, so it lands in state order with everything else.
            self.store
                .write(move |txn| micromine_fleet::persist::apply(txn, &ops))
        };
        durable.await?;
        Ok(())
    }

    /// A session ended.
    pub fn disconnect(&self, device: &str, session: u64) {
        let mut state = lock(&self.state);
        {
            let mut links = lock(&self.links);
            if links.get(device).is_some_and(|l| l.session == session) {
                links.remove(device);
            }
        }
        let fx = state.disconnect(device, session, now_ms());
        self.queue(fx);
    }

    /// Whether `session` is still the device's current session.
    pub fn is_current_session(&self, device: &str, session: u64) -> bool {
        lock(&self.state).is_current_session(device, session)
    }

    /// Counts a protocol violation by `device`.
    pub fn protocol_error(&self, device: &str, problem: &str) {
        tracing::info!(device, problem, "protocol error; session ended");
        lock(&self.state).protocol_error(device, now_ms());
    }

    /// A capacity report.
    pub fn report(&self, device: &str, report: &pb::CapacityReport) {
        lock(&self.state).report(device, report, now_ms());
    }

    /// A progress report.
    pub fn progress(&self, device: &str, progress: &pb::Progress) {
        let asked = progress.finished.then(std::time::Instant::now);
        let mut state = lock(&self.state);
        let fx = state.progress(device, progress, now_ms());
        self.queue_asked(fx, asked);
    }

    /// Periodic work (lease expiry, vardiff, top-ups).
    pub fn tick(&self) {
        let mut state = lock(&self.state);
        let fx = state.tick(now_ms());
        self.queue(fx);
    }

    /// Re-verifies a batch of shares, records the good ones durably, and returns the
    /// results to acknowledge. Nothing is acknowledged as accepted before it is durable.
    // A root span: as a child of the session's span its trace would last as long as the
    // session and reach the collector only when the session ends.
    #[tracing::instrument(name = "share_batch", parent = None, skip_all, fields(device = %device, shares = shares.len()))]
    pub async fn submit_shares(
        &self,
        device: &str,
        shares: &[pb::Share],
    ) -> Result<pb::ShareResults, FleetError> {
        let started = std::time::Instant::now();
        let checks = {
            let mut state = lock(&self.state);
            let checks = state.check_shares(device, shares);
            let foreign = checks
                .iter()
                .filter(|c| matches!(c, ShareCheck::Reject { foreign: true, .. }))
                .count();
            state.foreign_shares(device, foreign as u64, now_ms());
            checks
        };
        let now = now_ms();
        let judged: Vec<Judged> = checks.into_iter().map(|c| judge(device, c, now)).collect();

        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        for j in &judged {
            match j {
                Judged::Accepted { record, .. } => accepted.push(record.clone()),
                Judged::Rejected(_, reason, miner) => rejected.push(Rejection {
                    device: device.to_string(),
                    miner: miner.clone(),
                    reason: *reason,
                }),
            }
        }
        let verified = started.elapsed();
        let outcomes = self.ledger.record(accepted, rejected).await?;
        if let Some(metrics) = self.metrics() {
            metrics.share_batch(verified, started.elapsed() - verified);
        }

        let mut outcomes = outcomes.into_iter();
        let mut results = Vec::with_capacity(judged.len());
        let mut recorded = Vec::new();
        let mut upstream = Vec::new();
        for j in judged {
            match j {
                Judged::Rejected(share, reason, _) => results.push(rejected_result(&share, reason)),
                Judged::Accepted {
                    share,
                    record,
                    header,
                    block_hash,
                } => match outcomes.next().unwrap_or(ShareOutcome::Duplicate) {
                    ShareOutcome::Recorded => {
                        if record.for_pool {
                            upstream.push((record.clone(), header.clone()));
                        }
                        recorded.push(RecordedShare {
                            assignment_id: share.assignment_id,
                            nonce: share.nonce,
                            miner: record.miner.clone(),
                            difficulty: record.difficulty,
                            header,
                            block_hash,
                        });
                        results.push(accepted_result(
                            &share,
                            record.difficulty,
                            block_hash.is_some(),
                        ));
                    }
                    ShareOutcome::AlreadyRecorded => {
                        results.push(accepted_result(
                            &share,
                            record.difficulty,
                            block_hash.is_some(),
                        ));
                    }
                    ShareOutcome::Duplicate => {
                        results.push(rejected_result(&share, RejectReason::Duplicate));
                    }
                },
            }
        }
        if !recorded.is_empty() {
            let mut state = lock(&self.state);
            let fx = state.shares_recorded(device, &recorded, now_ms());
            self.queue(fx);
        }
        for (record, header) in upstream {
            self.submit_upstream(record, &header);
        }
        Ok(pb::ShareResults { results })
    }

    /// Passes on the spans a device sent in-band that belong to traces of its own
    /// assignments (see [`micromine_fleet::span_relay`]); `over_rate` more were dropped unread.
    pub fn relay_spans(&self, device: &str, spans: &[pb::AgentSpan], over_rate: usize) {
        use micromine_fleet::span_relay::{self, Outcome};
        let traces = lock(&self.state).traces(device);
        let now = SystemTime::now();
        let mut counts: HashMap<Outcome, u64> = HashMap::new();
        if over_rate > 0 {
            counts.insert(Outcome::RateLimited, over_rate as u64);
        }
        for span in spans {
            let outcome = match span_relay::admit(span, device, &traces, now) {
                Ok(data) => {
                    if crate::logging::relay_agent_span(data) {
                        Outcome::Relayed
                    } else {
                        Outcome::NoCollector
                    }
                }
                Err(outcome) => outcome,
            };
            *counts.entry(outcome).or_default() += 1;
        }
        for (outcome, count) in &counts {
            if *outcome != Outcome::Relayed {
                tracing::debug!(
                    count,
                    outcome = outcome.as_str(),
                    "dropped spans from the agent"
                );
            }
        }
        if let Some(metrics) = self.metrics() {
            for (outcome, count) in counts {
                metrics.agent_spans(outcome, count);
            }
        }
    }

    /// Everything operators see.
    pub fn view(&self) -> FleetView {
        let ledger = &self.ledger;
        let totals = |scope: Scope<'_>| -> Totals {
            match scope {
                Scope::Device(d) => ledger.device_totals(d),
                Scope::Miner(m) => ledger.miner_totals(m),
            }
        };
        let revocations = lock(&self.revocations).clone();
        let state = lock(&self.state);
        let (mut miners, mut devices) = state.view(now_ms(), &totals);
        for miner in &mut miners {
            if let Some(pool) = miner.status.pool.as_mut() {
                let answers = ledger.miner_pool_totals(&miner.key);
                pool.accepted = answers.accepted;
                pool.rejected = answers.rejected_total();
                pool.rejected_by_reason = answers.rejected;
            }
        }
        for device in &mut devices {
            device.pool = ledger.device_pool_totals(&device.name);
            if revocations.is_blocked(&device.name) {
                device.state = "revoked".into();
            }
        }
        FleetView {
            miners,
            devices,
            totals: ledger.fleet_totals(),
            sessions: state.sessions(),
            assignments: state.lease_count(),
        }
    }

    /// Every live lease (who scans which nonces of which header), by id.
    pub fn leases(&self) -> Vec<micromine_work::scheduler::Lease> {
        lock(&self.state).leases()
    }

    /// Ends every session with a `Drain`, so agents release their work and reconnect to
    /// whoever serves next.
    pub fn drain_all(&self, reason: &str) {
        let links = lock(&self.links);
        for link in links.values() {
            let _ = link.outbound.try_send(Ok(pb::ControllerMessage {
                kind: Some(pb::controller_message::Kind::Drain(pb::Drain {
                    reason: reason.to_string(),
                })),
            }));
        }
    }

    /// Drops share records of headers that can no longer receive shares, keeping totals,
    /// so the ledger's dedup table stays the size of the live work, not of history.
    pub async fn prune_ledger(&self) -> Result<u64, FleetError> {
        let floor = lock(&self.state).oldest_live_header();
        Ok(self.ledger.prune_below(floor).await?)
    }

    /// Waits until everything queued so far is durable (for orderly shutdown and tests).
    pub async fn flush(&self) -> Result<(), FleetError> {
        self.store.write(|_| Ok(())).await?;
        Ok(())
    }
}

fn send_all(links: &Mutex<HashMap<String, Link>>, messages: Vec<(String, pb::ControllerMessage)>) {
    if messages.is_empty() {
        return;
    }
    let mut links = lock(links);
    for (device, message) in messages {
        let Some(link) = links.get(&device) else {
            continue;
        };
        if let Err(e) = link.outbound.try_send(Ok(message)) {
            // A session that does not read its messages is dropped: its agent reconnects
            // and resumes, which is cheaper than buffering without bound.
            tracing::warn!(device = %device, error = %e, "session not keeping up; closing it");
            links.remove(&device);
        }
    }
}

/// Re-hashes one share against what the state said about it. Runs outside every lock.
/// Nothing the device claimed about the share is used: only its assignment id and nonce.
pub fn judge(device: &str, check: ShareCheck, now: i64) -> Judged {
    match check {
        ShareCheck::Reject {
            share,
            reason,
            miner,
            ..
        } => Judged::Rejected(share, reason, miner),
        ShareCheck::Verify {
            share,
            header,
            range,
            target,
            difficulty,
            miner,
            pool_target,
        } => {
            let nonce = u64::from(share.nonce);
            if nonce < range.0 || nonce >= range.1 {
                return Judged::Rejected(share, RejectReason::OutOfRange, Some(miner));
            }
            let hash = sha256d(&header_with_nonce(&header.prefix, share.nonce));
            if !target.is_met_by(&hash) {
                return Judged::Rejected(share, RejectReason::LowDifficulty, Some(miner));
            }
            let block = header.network_target().is_met_by(&hash);
            let record = AcceptedShare {
                key: ShareKey {
                    header_id: header.id,
                    nonce: share.nonce,
                },
                device: device.to_string(),
                miner,
                difficulty,
                time_unix_ms: now,
                block,
                resubmitted: share.resubmitted,
                for_pool: pool_target.is_some_and(|t| t.is_met_by(&hash)),
            };
            Judged::Accepted {
                share,
                record,
                header,
                block_hash: block.then_some(hash),
            }
        }
    }
}

fn accepted_result(share: &pb::Share, difficulty: f64, block: bool) -> pb::ShareResult {
    pb::ShareResult {
        assignment_id: share.assignment_id,
        nonce: share.nonce,
        status: ShareStatus::Accepted as i32,
        reason: RejectReason::Unspecified as i32,
        difficulty,
        block,
    }
}

fn rejected_result(share: &pb::Share, reason: RejectReason) -> pb::ShareResult {
    pb::ShareResult {
        assignment_id: share.assignment_id,
        nonce: share.nonce,
        status: ShareStatus::Rejected as i32,
        reason: reason as i32,
        difficulty: 0.0,
        block: false,
    }
}

impl crate::metrics::FleetViews for Fleet {
    fn view(&self) -> FleetView {
        Fleet::view(self)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::time::Duration;

    type Inbox = mpsc::Receiver<Result<pb::ControllerMessage, tonic::Status>>;

    async fn fleet(dir: &std::path::Path) -> Arc<Fleet> {
        let store = Store::open(&dir.join("store.redb")).unwrap();
        let ledger = Ledger::open(store.clone()).unwrap();
        let fleet = Fleet::open(store, ledger).await.unwrap();
        let miners: MinerSet = micromine_resources::microminer::parse_str(
            "test",
            "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {name: m}\nspec:\n  selector: {}\n  workSource: {builtin: {networkDifficulty: 1.0e9}}\n",
        )
        .unwrap()
        .into_iter()
        .map(|m| (m.key(), m))
        .collect();
        fleet.apply_miners(&miners);
        fleet
    }

    fn join(fleet: &Fleet, device: &str) -> Inbox {
        join_at(fleet, device, 1e6)
    }

    /// A device claiming `hashrate` H/s: its share target follows.
    fn join_at(fleet: &Fleet, device: &str, hashrate: f64) -> Inbox {
        let (outbound, inbox) = mpsc::channel(64);
        let hello = pb::Hello {
            capacity: Some(pb::Capacity {
                nominal_hashrate: hashrate,
                mining_threads: 1,
                ..Default::default()
            }),
            version: "test".into(),
            ..Default::default()
        };
        fleet.connect(device, &hello, outbound, CancellationToken::new());
        inbox
    }

    async fn next_assignment(inbox: &mut Inbox) -> pb::Assignment {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
                .await
                .expect("an assignment within 10 s")
                .expect("the session is open")
                .expect("no error");
            if let Some(pb::controller_message::Kind::Assignment(a)) = message.kind {
                return a;
            }
        }
    }

    /// Blocks the store's writer until the returned sender is used or dropped: every
    /// write queued meanwhile waits.
    fn hold_the_writer(fleet: &Fleet) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        drop(fleet.store.write(move |_| {
            let _ = held.recv();
            Ok(())
        }));
        release
    }

    #[tokio::test]
    async fn an_assignment_leaves_before_its_lease_is_written_but_never_before_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = fleet(dir.path()).await;

        // The first assignments open a header: they wait for it, however long the disk
        // takes (here, until the writer is let go).
        let release = hold_the_writer(&fleet);
        let mut first_inbox = join(&fleet, "d");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let _ = release.send(());
        });
        let first = next_assignment(&mut first_inbox).await;
        let stored = micromine_fleet::persist::load(&fleet.store.read().unwrap()).unwrap();
        assert!(
            stored
                .headers
                .iter()
                .any(|h| h.prefix.as_slice() == first.header_prefix.as_slice()),
            "the assignment left before its header was written"
        );

        // The next come from that header and reserved ids: they leave while the writer
        // still holds their leases back.
        let release = hold_the_writer(&fleet);
        let mut next_inbox = join(&fleet, "e");
        let early = next_assignment(&mut next_inbox).await;
        assert_eq!(early.header_prefix, first.header_prefix);
        let stored = micromine_fleet::persist::load(&fleet.store.read().unwrap()).unwrap();
        assert!(!stored.leases.iter().any(|l| l.lease.id == early.id));
        release.send(()).unwrap();
        fleet.flush().await.unwrap();
        let stored = micromine_fleet::persist::load(&fleet.store.read().unwrap()).unwrap();
        assert!(stored.leases.iter().any(|l| l.lease.id == early.id));
    }

    /// Issue 21's debt, through the real ledger and store: a share is counted durably, its
    /// lease ends, and the controller dies before the device hears the answer. The device
    /// resubmits it to the restarted controller, which must answer accepted (the ledger
    /// knows it: `AlreadyRecorded`) and count it once, not `stale` for want of the lease.
    #[tokio::test]
    async fn a_share_whose_answer_a_crash_lost_is_accepted_after_the_restart_though_its_lease_ended()
     {
        let dir = tempfile::tempdir().unwrap();
        let crashed = fleet(dir.path()).await;
        // A slow device: a share every few thousand hashes, quick to find here.
        let mut inbox = join_at(&crashed, "d", 1e3);
        let lease = next_assignment(&mut inbox).await;
        let target = micromine_proto::work::Target::from_le_slice(&lease.share_target).unwrap();
        let header = {
            let state = lock(&crashed.state);
            match state.check_shares(
                "d",
                &[pb::Share {
                    assignment_id: lease.id,
                    nonce: lease.nonce_start as u32,
                    resubmitted: false,
                }],
            )[0]
            .clone()
            {
                ShareCheck::Verify { header, .. } => header,
                other => panic!("{other:?}"),
            }
        };
        let nonce = (lease.nonce_start..lease.nonce_end)
            .map(|n| n as u32)
            .find(|n| target.is_met_by(&sha256d(&header_with_nonce(&header.prefix, *n))))
            .expect("a share in the range");
        let share = pb::Share {
            assignment_id: lease.id,
            nonce,
            resubmitted: false,
        };
        let first = crashed.submit_shares("d", &[share]).await.unwrap();
        assert_eq!(first.results[0].status(), ShareStatus::Accepted);
        // The device finishes the range; the lease's end is durable; then the crash.
        crashed.progress(
            "d",
            &pb::Progress {
                assignment_id: lease.id,
                scanned_until: lease.nonce_end,
                hashes: lease.nonce_end - lease.nonce_start,
                finished: true,
            },
        );
        crashed.flush().await.unwrap();
        assert!(
            lock(&crashed.state)
                .leases()
                .iter()
                .all(|l| l.id != lease.id)
        );
        drop(inbox);
        drop(crashed);

        let fleet = fleet(dir.path()).await;
        let _inbox = join_at(&fleet, "d", 1e3);
        let again = fleet
            .submit_shares(
                "d",
                &[pb::Share {
                    resubmitted: true,
                    ..share
                }],
            )
            .await
            .unwrap();
        assert_eq!(
            (again.results[0].status(), again.results[0].reason()),
            (ShareStatus::Accepted, RejectReason::Unspecified),
            "answered as before the crash"
        );
        assert_eq!(
            fleet.ledger().device_totals("d").accepted,
            1,
            "counted once"
        );
    }
}
