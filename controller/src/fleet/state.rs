//! The fleet's live state as a plain state machine: every operation takes the time as an
//! argument and returns [`Effects`] (records to persist, messages to send) instead of doing
//! I/O, so the async shell in `fleet/mod.rs` decides when things become durable and
//! visible, and the logic stays testable without sockets or disks.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use micromine_proto::pb::{self, RejectReason, controller_message::Kind};
use micromine_proto::work::Target;

use super::honesty::HonestyWindow;
use super::persist::{DeviceRecord, FleetIds, LeaseRecord, PersistOp};
use super::status::{
    DeviceFlag, DeviceReadings, DeviceView, MinerView, RateWindow, is_held_back, stops_hashing,
};
use crate::fleet::source::Source;
use micromine_resources::microminer::{
    DeviceCounts, Economics, EconomicsStatus, Hashrate, Limits, MicroMiner, MicroMinerStatus,
    MinerSet, PoolStatus,
};
use micromine_resources::selector;
use micromine_store::ledger::Totals;
use micromine_stratum::client::ResumeHint;
use micromine_stratum::client::UpstreamEvent;
use micromine_stratum::work::{Change, PoolSessionRecord, StratumWork};
use micromine_work::economics;
use micromine_work::scheduler::{AssignmentId, HeaderId, Lease, NONCE_SPACE, Scheduler};
use micromine_work::vardiff::Vardiff;
use micromine_work::worksource::{BuiltinSource, ChainTip, WorkHeader};

/// Leases a connected device holds at once: one to work on, one queued so it never idles
/// while the controller answers.
pub const LEASES_PER_DEVICE: usize = 2;

/// Assignment ids reserved by one durable write. A restart skips what was left of the
/// block, which costs nothing (ids are 64 bits) and keeps the disk off the path of all but
/// one assignment in this many.
pub const ASSIGNMENT_ID_BLOCK: u64 = 1 << 16;

/// Smallest range worth a message.
const MIN_RANGE: u64 = 1 << 16;
/// Shares against a lease that ended are still checked for this long (a batch may
/// overtake a lease's end on the wire, and a reconnecting device resubmits).
const ENDED_LEASE_MEMORY_MS: i64 = 600_000;
/// How often agents report, in a small fleet.
pub const REPORT_INTERVAL_MS: u32 = 2_000;
/// The longest report interval a large fleet is given.
pub const MAX_REPORT_INTERVAL_MS: u32 = 15_000;

/// How often each agent reports in a fleet of `devices`: every 2 s up to 2,000 devices,
/// then a millisecond per device (10 s at 10,000), at most 15 s. A report and a progress
/// message per held lease arrive from every device each interval, so this keeps a large
/// fleet's steady message rate near 1,000 reports a second instead of growing with it;
/// status and hash rate figures are a little less fresh there.
pub fn report_interval_ms(devices: usize) -> u32 {
    u32::try_from(devices)
        .unwrap_or(u32::MAX)
        .clamp(REPORT_INTERVAL_MS, MAX_REPORT_INTERVAL_MS)
}

/// Records to persist and messages to send, produced by one operation.
#[derive(Debug, Default)]
pub struct Effects {
    /// Store writes, applied in order in one transaction.
    pub persist: Vec<PersistOp>,
    /// Messages for devices, sent in order with every other operation's, and not before
    /// the writes they depend on are durable (see [`Effects::messages_wait_for_writes`]).
    pub messages: Vec<(String, pb::ControllerMessage)>,
}

impl Effects {
    fn send(&mut self, device: &str, kind: Kind) {
        self.messages.push((
            device.to_string(),
            pb::ControllerMessage { kind: Some(kind) },
        ));
    }

    /// Appends another operation's effects.
    pub fn extend(&mut self, other: Effects) {
        self.persist.extend(other.persist);
        self.messages.extend(other.messages);
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.persist.is_empty() && self.messages.is_empty()
    }

    /// Whether the messages must wait until the writes are durable. Most need not: a new
    /// lease or a lease's end may be forgotten by a crash without harm
    /// ([`PersistOp::may_be_forgotten`]), which keeps the fsync off the path of nearly
    /// every assignment. New headers and id reservations must be durable first.
    pub fn messages_wait_for_writes(&self) -> bool {
        !self.messages.is_empty() && self.persist.iter().any(|op| !op.may_be_forgotten())
    }
}

/// What the controller keeps about a lease besides its range.
#[derive(Debug, Clone)]
struct LeaseMeta {
    target: Target,
    difficulty: f64,
    miner: String,
}

/// A lease that ended recently, so late shares against it can still be judged.
#[derive(Debug, Clone)]
struct EndedLease {
    lease: Lease,
    meta: LeaseMeta,
    header: Arc<WorkHeader>,
    ended_ms: i64,
}

#[derive(Debug)]
struct MinerRuntime {
    spec: MicroMiner,
    source: Source,
    headers: BTreeSet<HeaderId>,
    current_header: Option<HeaderId>,
    effective: RateWindow,
    conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    /// The last verdict of `spec.economics`, for hysteresis; `None` before the first.
    profitable: Option<bool>,
    /// Work taken back because mining does not pay (`pauseWhenUnprofitable`).
    unprofitable_pause: bool,
}

/// A MicroMiner's devices in terms of power and hash rate.
#[derive(Debug, Clone, Copy, Default)]
struct Economy {
    /// Power of the devices holding its work now, W.
    working_watts: f64,
    /// What its connected, schedulable devices could hash at its duty cycle, H/s.
    capacity_hashrate: f64,
    /// What those devices draw while mining, W.
    capacity_watts: f64,
}

#[derive(Debug)]
struct DeviceRuntime {
    record: DeviceRecord,
    session: Option<u64>,
    miner: Option<String>,
    vardiff: Option<Vardiff>,
    reported_hashrate: f64,
    reported_state: String,
    effective: RateWindow,
    /// Malformed, oversized or out-of-order messages since the controller started.
    protocol_errors: u64,
    /// Claimed against proven hash rate.
    honesty: HonestyWindow,
    /// Shares it submitted for other devices' work.
    foreign_shares: u64,
    /// Trace ids of its latest traced assignments: its in-band spans must belong to one.
    traces: VecDeque<[u8; 16]>,
    /// Its latest sensor readings.
    readings: DeviceReadings,
}

impl DeviceRuntime {
    fn new(record: DeviceRecord) -> DeviceRuntime {
        DeviceRuntime {
            record,
            session: None,
            miner: None,
            vardiff: None,
            reported_hashrate: 0.0,
            reported_state: "offline".into(),
            effective: RateWindow::default(),
            protocol_errors: 0,
            honesty: HonestyWindow::default(),
            foreign_shares: 0,
            traces: VecDeque::new(),
            readings: DeviceReadings::default(),
        }
    }

    fn nominal_hashrate(&self) -> f64 {
        let claimed = self.record.capacity.nominal_hashrate;
        if claimed.is_finite() {
            claimed.clamp(1.0, 1e13)
        } else {
            1.0
        }
    }
}

/// A share after the lookups that need the state, before the hashing that does not.
#[derive(Debug, Clone)]
pub enum ShareCheck {
    /// Rejected without hashing.
    Reject {
        /// The share.
        share: pb::Share,
        /// Why.
        reason: RejectReason,
        /// The MicroMiner it was for, when known.
        miner: Option<String>,
        /// It named another device's work.
        foreign: bool,
    },
    /// To be re-hashed against this work.
    Verify {
        /// The share.
        share: pb::Share,
        /// The header it claims.
        header: Arc<WorkHeader>,
        /// Its lease's range.
        range: (u64, u64),
        /// Its lease's share target.
        target: Target,
        /// Difficulty credited if it meets the target.
        difficulty: f64,
        /// The MicroMiner it is for.
        miner: String,
        /// The pool's target, when the header is pool work: a share meeting it goes
        /// upstream.
        pool_target: Option<Target>,
    },
}

/// A share that was recorded, as the state needs to know about it afterwards.
#[derive(Debug, Clone)]
pub struct RecordedShare {
    /// The lease it was found in.
    pub assignment_id: u64,
    /// Its nonce.
    pub nonce: u32,
    /// The MicroMiner.
    pub miner: String,
    /// Difficulty credited.
    pub difficulty: f64,
    /// The header it was found on.
    pub header: Arc<WorkHeader>,
    /// Its sha256d, when it was a block.
    pub block_hash: Option<[u8; 32]>,
}

/// What was restored from the store at start.
#[derive(Debug, Default)]
pub struct Restored {
    /// Id counters.
    pub ids: FleetIds,
    /// Headers that leases refer to.
    pub headers: Vec<WorkHeader>,
    /// Leases alive at the last shutdown or crash.
    pub leases: Vec<LeaseRecord>,
    /// Chain tips of builtin sources.
    pub tips: BTreeMap<String, ChainTip>,
    /// Known devices.
    pub devices: Vec<DeviceRecord>,
    /// Stored headers nothing refers to any more.
    pub unreferenced_headers: Vec<HeaderId>,
    /// Energy drawn for each MicroMiner, joules.
    pub energy_joules: BTreeMap<String, f64>,
    /// Pool sessions of MicroMiners with pool work, to resume.
    pub pool_sessions: BTreeMap<String, PoolSessionRecord>,
}

/// The fleet: devices, MicroMiners, headers and leases.
#[derive(Debug)]
pub struct FleetState {
    miners: BTreeMap<String, MinerRuntime>,
    devices: BTreeMap<String, DeviceRuntime>,
    scheduler: Scheduler,
    headers: HashMap<HeaderId, Arc<WorkHeader>>,
    lease_meta: HashMap<AssignmentId, LeaseMeta>,
    ended: HashMap<AssignmentId, EndedLease>,
    ended_order: VecDeque<AssignmentId>,
    tips: BTreeMap<String, ChainTip>,
    ids: FleetIds,
    next_session: u64,
    /// Devices an operator cordoned (`EdgeDevice.spec.unschedulable`): connected, given
    /// nothing. Kept apart from the device records because it is the API server's to
    /// say, not the store's, and may name devices this controller has not met yet.
    unschedulable: BTreeSet<String>,
    /// Energy drawn for each MicroMiner with `spec.economics`, joules; kept by key so it
    /// outlives edits of the resource.
    energy_joules: BTreeMap<String, f64>,
    /// When energy was last integrated.
    energy_tick_ms: Option<i64>,
    /// When energy was last written to the store.
    energy_saved_ms: i64,
    /// Pool sessions the previous process left, until their MicroMiners are applied.
    pool_sessions: BTreeMap<String, PoolSessionRecord>,
}

/// Energy totals are written at most this often; a crash loses at most this much.
const ENERGY_SAVE_MS: i64 = 60_000;
/// A gap between ticks longer than this (a stalled process) is not counted as drawn.
const ENERGY_MAX_STEP_MS: i64 = 10_000;

fn now_unix_seconds(now_ms: i64) -> u32 {
    (now_ms / 1000).clamp(0, i64::from(u32::MAX)) as u32
}

/// How much later than the device's lease the controller's runs out. The device counts
/// its lease from when the assignment reached it, so it stops this much before the
/// controller takes the range back, unless the assignment spent longer on the way: the
/// remainder is never mined by two devices at once.
const LINK_SLACK_MS: i64 = 5_000;
/// The longest lease (the wire carries milliseconds in a u32).
const MAX_LEASE_MS: i64 = 86_400_000;

/// The device's lease on a range of `size` nonces at `rate` H/s: room for the queued
/// range to be worked after the current one, three times the range's work. That is
/// `assignmentSeconds` of hashing, or longer when even the smallest range takes a slow
/// device longer (a range that outlasts its lease would be taken back, and its
/// remainder handed out, while the device still mines it). The controller's own lease
/// is [`LINK_SLACK_MS`] longer.
fn device_lease_ms(miner: &MicroMiner, size: u64, rate: f64) -> i64 {
    let planned = f64::from(miner.spec.assignment_seconds) * 1000.0;
    let needed = if rate > 0.0 {
        size as f64 / rate * 1000.0
    } else {
        planned
    };
    ((planned.max(needed) * 3.0) as i64).clamp(1_000, MAX_LEASE_MS - LINK_SLACK_MS)
}

impl FleetState {
    /// A fleet continuing from what the store held.
    pub fn new(restored: Restored) -> FleetState {
        let mut scheduler = Scheduler::new(restored.ids.next_assignment);
        let mut headers = HashMap::new();
        for header in restored.headers {
            scheduler.add_closed_header(header.id);
            headers.insert(header.id, Arc::new(header));
        }
        let mut lease_meta = HashMap::new();
        for record in restored.leases {
            let Some(target) = Target::from_le_slice(&record.target_le) else {
                tracing::warn!(
                    lease = record.lease.id,
                    "dropping persisted lease with a bad target"
                );
                continue;
            };
            let meta = LeaseMeta {
                target,
                difficulty: record.difficulty,
                miner: record.miner.clone(),
            };
            let id = record.lease.id;
            match scheduler.restore(record.lease) {
                Ok(()) => {
                    lease_meta.insert(id, meta);
                }
                Err(e) => tracing::warn!(error = %e, "dropping persisted lease"),
            }
        }
        let devices = restored
            .devices
            .into_iter()
            .map(|record| (record.name.clone(), DeviceRuntime::new(record)))
            .collect();
        let mut ids = restored.ids;
        ids.next_assignment = scheduler.next_id();
        FleetState {
            miners: BTreeMap::new(),
            devices,
            scheduler,
            headers,
            lease_meta,
            ended: HashMap::new(),
            ended_order: VecDeque::new(),
            tips: restored.tips,
            ids,
            next_session: 1,
            unschedulable: BTreeSet::new(),
            energy_joules: restored.energy_joules,
            energy_tick_ms: None,
            energy_saved_ms: 0,
            pool_sessions: restored.pool_sessions,
        }
    }

    // ---------------------------------------------------------------- economics

    /// A MicroMiner's devices in terms of power and hash rate.
    /// Every MicroMiner with `spec.economics` in terms of power and hash rate, in one pass
    /// over the devices (the tick does this every second, so not once per MicroMiner).
    fn economies(&self) -> BTreeMap<String, Economy> {
        let mut economies: BTreeMap<String, Economy> = self
            .miners
            .iter()
            .filter(|(_, m)| m.spec.spec.economics.is_some())
            .map(|(key, _)| (key.clone(), Economy::default()))
            .collect();
        for (name, d) in &self.devices {
            let Some(key) = d.miner.as_deref() else {
                continue;
            };
            if d.session.is_none() {
                continue;
            }
            let (Some(economy), Some(runtime)) = (economies.get_mut(key), self.miners.get(key))
            else {
                continue;
            };
            let Some(economics) = &runtime.spec.spec.economics else {
                continue;
            };
            let watts = economics::device_watts(
                economics,
                d.readings.power_watts,
                d.record.labels.get("class").map(String::as_str),
            );
            if !self.unschedulable.contains(name) {
                economy.capacity_hashrate +=
                    d.nominal_hashrate() * runtime.spec.spec.limits.duty_cycle;
                economy.capacity_watts += watts;
            }
            if !self.scheduler.leases_of(name).is_empty() {
                economy.working_watts += watts;
            }
        }
        economies
    }

    /// Adds the energy the working devices drew since the last tick, judges whether each
    /// MicroMiner pays, and now and then makes the energy totals durable.
    fn account_energy(&mut self, now_ms: i64, fx: &mut Effects) {
        let step_ms = self
            .energy_tick_ms
            .map_or(0, |last| (now_ms - last).clamp(0, ENERGY_MAX_STEP_MS));
        self.energy_tick_ms = Some(now_ms);
        for (key, economy) in self.economies() {
            let Some(runtime) = self.miners.get(&key) else {
                continue;
            };
            let Some(economics) = runtime.spec.spec.economics.clone() else {
                continue;
            };
            let difficulty = economics
                .network_difficulty
                .unwrap_or_else(|| runtime.source.network_difficulty());
            *self.energy_joules.entry(key.clone()).or_default() +=
                economy.working_watts * step_ms as f64 / 1000.0;
            let revenue =
                economics::revenue_per_hour(&economics, economy.capacity_hashrate, difficulty);
            let cost = economics::cost_per_hour(&economics, economy.capacity_watts);
            let Some(runtime) = self.miners.get_mut(&key) else {
                continue;
            };
            let verdict = economics::profitable(runtime.profitable, revenue, cost);
            if runtime.profitable.is_some_and(|before| before != verdict) {
                tracing::info!(miner = %key, profitable = verdict, revenue_per_hour = revenue,
                    cost_per_hour = cost, "profitability changed");
            }
            runtime.profitable = Some(verdict);
            let pause = economics.pause_when_unprofitable && !verdict;
            if pause != runtime.unprofitable_pause {
                runtime.unprofitable_pause = pause;
                if pause {
                    // The tick tops devices up again once it pays (see `top_up`).
                    self.end_miner_leases(&key, "mining does not pay", fx);
                }
            }
        }
        if now_ms - self.energy_saved_ms >= ENERGY_SAVE_MS && !self.energy_joules.is_empty() {
            self.energy_saved_ms = now_ms;
            fx.persist
                .push(PersistOp::Energy(self.energy_joules.clone()));
        }
    }

    // ---------------------------------------------------------------- MicroMiners

    /// Makes the set of MicroMiners current: adds, updates and removes, then re-matches
    /// every device.
    pub fn apply_miners(&mut self, desired: &MinerSet, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        let removed: Vec<String> = self
            .miners
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for key in removed {
            tracing::info!(miner = %key, "MicroMiner removed; cancelling its work");
            self.retire_miner_headers(&key, "MicroMiner removed", &mut fx);
            self.miners.remove(&key);
            fx.persist.push(PersistOp::PoolSession(key.clone(), None));
        }
        for (key, miner) in desired {
            let wants_pool = miner.spec.work_source.stratum.is_some();
            match self.miners.get_mut(key) {
                Some(runtime)
                    if runtime.spec.spec == miner.spec
                        && runtime.spec.metadata == miner.metadata => {}
                Some(runtime) if runtime.source.stratum().is_some() != wants_pool => {
                    runtime.spec = miner.clone();
                    tracing::info!(miner = %key, "MicroMiner changed its kind of work source");
                    // Everything outstanding was built by the old source.
                    self.retire_miner_headers(key, "work source changed", &mut fx);
                    fx.persist.push(PersistOp::PoolSession(key.clone(), None));
                    let source = self.new_source(key, miner, now_ms, &mut fx);
                    if let Some(runtime) = self.miners.get_mut(key) {
                        runtime.source = source;
                        runtime.current_header = None;
                    }
                }
                Some(runtime) => {
                    let old = std::mem::replace(&mut runtime.spec, miner.clone());
                    let difficulty = miner
                        .spec
                        .work_source
                        .builtin
                        .as_ref()
                        .map(|b| b.network_difficulty);
                    let new_job = match (runtime.source.builtin_mut(), difficulty) {
                        (Some(builtin), Some(d)) => builtin.difficulty_changes(d),
                        _ => false,
                    };
                    if new_job {
                        let job = self.ids.take_job();
                        if let Some(runtime) = self.miners.get_mut(key)
                            && let (Some(builtin), Some(d)) =
                                (runtime.source.builtin_mut(), difficulty)
                        {
                            builtin.set_difficulty(d, job);
                            runtime.current_header = None;
                            fx.persist
                                .push(PersistOp::Tip(key.clone(), builtin.tip().clone()));
                        }
                        fx.persist.push(PersistOp::Ids(self.ids.clone()));
                        self.retire_stale_headers(key, "network difficulty changed", &mut fx);
                    }
                    if wants_pool && old.spec.work_source != miner.spec.work_source {
                        // The upstream restarts with the new settings: the old pool
                        // session's work can no longer be submitted anywhere.
                        let epoch = self.ids.take_job();
                        fx.persist.push(PersistOp::Ids(self.ids.clone()));
                        if let Some(runtime) = self.miners.get_mut(key) {
                            runtime.source = Source::Stratum(StratumWork::new(key, epoch));
                            runtime.current_header = None;
                        }
                        fx.persist.push(PersistOp::PoolSession(key.clone(), None));
                        self.retire_miner_headers(key, "pool settings changed", &mut fx);
                    }
                    if miner.spec.paused && !old.spec.paused {
                        self.end_miner_leases(key, "MicroMiner paused", &mut fx);
                    }
                    if miner.spec.limits != old.spec.limits {
                        self.send_limits(key, &mut fx);
                    }
                    tracing::info!(miner = %key, new_job, "MicroMiner updated");
                }
                None => {
                    let source = self.new_source(key, miner, now_ms, &mut fx);
                    let mut effective = RateWindow::default();
                    effective.observe_from(now_ms);
                    self.miners.insert(
                        key.clone(),
                        MinerRuntime {
                            spec: miner.clone(),
                            source,
                            // Leases restored after a restart are on headers of an
                            // earlier process: they are this MicroMiner's too.
                            headers: self
                                .headers
                                .values()
                                .filter(|h| h.miner == *key)
                                .map(|h| h.id)
                                .collect(),
                            current_header: None,
                            effective,
                            conditions: Vec::new(),
                            profitable: None,
                            unprofitable_pause: false,
                        },
                    );
                }
            }
        }
        let names: Vec<String> = self.devices.keys().cloned().collect();
        for name in names {
            self.rematch_device(&name, now_ms, &mut fx);
        }
        fx
    }

    /// The work source a MicroMiner starts with: a builtin chain continues from its
    /// persisted tip; a pool starts with no work until its upstream connects.
    fn new_source(
        &mut self,
        key: &str,
        miner: &MicroMiner,
        now_ms: i64,
        fx: &mut Effects,
    ) -> Source {
        let source = match &miner.spec.work_source.builtin {
            Some(builtin) => {
                let difficulty = builtin.network_difficulty;
                let tip = self.tips.get(key).cloned();
                let job = if tip.is_none() {
                    self.ids.take_job()
                } else {
                    0
                };
                let mut source =
                    BuiltinSource::new(key, difficulty, tip, job, now_unix_seconds(now_ms));
                if source.difficulty_changes(difficulty) {
                    source.set_difficulty(difficulty, self.ids.take_job());
                }
                fx.persist
                    .push(PersistOp::Tip(key.to_string(), source.tip().clone()));
                tracing::info!(miner = %key, network_difficulty = difficulty, "MicroMiner added (builtin work)");
                Source::Builtin(source)
            }
            None => {
                let pools: Vec<String> = miner
                    .spec
                    .work_source
                    .stratum
                    .iter()
                    .flat_map(|s| s.pools())
                    .map(|p| p.url)
                    .collect();
                // The previous process's session, if it was with one of these pools (a
                // redirect by client.reconnect is not resumed: the address is the pool's).
                let restored = self
                    .pool_sessions
                    .remove(key)
                    .filter(|r| pools.get(r.pool_index) == Some(&r.pool))
                    .and_then(|r| StratumWork::restore(key, &r));
                match restored {
                    Some(work) => {
                        tracing::info!(miner = %key, pool = ?pools.first(), "MicroMiner added (pool work); resuming the previous pool session");
                        Source::Stratum(work)
                    }
                    None => {
                        tracing::info!(miner = %key, pool = ?pools.first(), "MicroMiner added (pool work)");
                        fx.persist
                            .push(PersistOp::PoolSession(key.to_string(), None));
                        Source::Stratum(StratumWork::new(key, self.ids.take_job()))
                    }
                }
            }
        };
        fx.persist.push(PersistOp::Ids(self.ids.clone()));
        source
    }

    /// Applies what a MicroMiner's pool connection reported: new jobs, difficulty,
    /// sessions. Stale work is cancelled at once and devices get work from the new job.
    pub fn upstream_event(&mut self, miner: &str, event: UpstreamEvent, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        let Some(runtime) = self.miners.get_mut(miner) else {
            return fx;
        };
        let Some(work) = runtime.source.stratum_mut() else {
            return fx;
        };
        let ids = &mut self.ids;
        let mut took_job = false;
        let disconnected = matches!(event, UpstreamEvent::Disconnected { .. });
        let change = work.apply(event, || {
            took_job = true;
            ids.take_job()
        });
        if !disconnected {
            fx.persist.push(PersistOp::PoolSession(
                miner.to_string(),
                work.record().map(Box::new),
            ));
        }
        if took_job {
            fx.persist.push(PersistOp::Ids(self.ids.clone()));
        }
        match change {
            Change::Nothing => return fx,
            Change::NewEpoch(reason) => {
                if let Some(runtime) = self.miners.get_mut(miner) {
                    runtime.current_header = None;
                }
                self.retire_stale_headers(miner, reason, &mut fx);
            }
            Change::NewWork => {
                if let Some(runtime) = self.miners.get_mut(miner) {
                    runtime.current_header = None;
                }
            }
            Change::Difficulty => {
                if let Some(runtime) = self.miners.get_mut(miner) {
                    runtime.current_header = None;
                }
                for name in self.devices_of(miner) {
                    self.rematch_device(&name, now_ms, &mut fx);
                }
                return fx;
            }
        }
        // Devices without a session are skipped by top_up itself.
        for name in self.devices_of(miner) {
            self.top_up(&name, now_ms, &mut fx);
        }
        fx
    }

    /// The devices a MicroMiner's selector holds now.
    fn devices_of(&self, miner: &str) -> Vec<String> {
        self.devices
            .iter()
            .filter(|(_, d)| d.miner.as_deref() == Some(miner))
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn matching_miner(&self, labels: &BTreeMap<String, String>) -> Option<String> {
        // Several MicroMiners may select a device; the first by namespace/name wins so
        // the choice is stable across restarts.
        self.miners
            .iter()
            .find(|(_, m)| selector::matches(&m.spec.spec.selector, labels))
            .map(|(k, _)| k.clone())
    }

    fn rematch_device(&mut self, name: &str, now_ms: i64, fx: &mut Effects) {
        let Some(device) = self.devices.get(name) else {
            return;
        };
        let wanted = self.matching_miner(&device.record.labels);
        if wanted != device.miner {
            if let Some(old) = &device.miner {
                tracing::info!(device = name, from = %old, to = ?wanted, "device changes MicroMiner");
            }
            // After a restart the device's MicroMiner is not known until now, and the
            // leases restored for that same MicroMiner are still good: only leases for
            // another one go.
            let foreign: Vec<AssignmentId> = self
                .scheduler
                .leases_of(name)
                .into_iter()
                .filter(|id| self.lease_meta.get(id).map(|m| m.miner.as_str()) != wanted.as_deref())
                .collect();
            self.end_leases_of(name, foreign, "device moved to another MicroMiner", fx);
            if let Some(device) = self.devices.get_mut(name) {
                device.miner = wanted.clone();
                device.vardiff = None;
            }
        }
        if let (Some(key), Some(device)) = (wanted.as_ref(), self.devices.get_mut(name))
            && let Some(miner) = self.miners.get(key)
        {
            let spm = miner.spec.spec.shares_per_minute;
            let max = miner.source.share_cap();
            let nominal = device.nominal_hashrate() * miner.spec.spec.limits.duty_cycle;
            match device.vardiff.as_mut() {
                Some(v) => v.set_goal(spm, max, now_ms),
                None => device.vardiff = Some(Vardiff::new(nominal, spm, max, now_ms)),
            }
        }
        self.top_up(name, now_ms, fx);
    }

    fn send_limits(&self, miner: &str, fx: &mut Effects) {
        let Some(runtime) = self.miners.get(miner) else {
            return;
        };
        let limits = runtime.spec.spec.limits.to_wire();
        for (name, device) in &self.devices {
            if device.session.is_some() && device.miner.as_deref() == Some(miner) {
                fx.send(
                    name,
                    Kind::SetLimits(pb::SetLimits {
                        limits: Some(limits.clone()),
                    }),
                );
            }
        }
    }

    /// Cordons or uncordons a device: a cordoned one keeps its session and is handed
    /// nothing; what it holds is taken back at once.
    pub fn set_unschedulable(&mut self, name: &str, unschedulable: bool, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        if unschedulable {
            if self.unschedulable.insert(name.to_string()) {
                tracing::info!(
                    device = name,
                    "device unschedulable; its work is taken back"
                );
                self.end_device_leases(name, "device marked unschedulable", &mut fx);
            }
        } else if self.unschedulable.remove(name) {
            tracing::info!(device = name, "device schedulable again");
            self.top_up(name, now_ms, &mut fx);
        }
        fx
    }

    // ---------------------------------------------------------------- sessions

    /// A device opened a session. Returns the session id and the effects, the first
    /// message of which is the `Welcome`.
    pub fn connect(&mut self, name: &str, hello: &pb::Hello, now_ms: i64) -> (u64, Effects) {
        let mut fx = Effects::default();
        let session = self.next_session;
        self.next_session += 1;
        let capacity = hello.capacity.clone().unwrap_or_default();
        let device = self.device_entry(name, now_ms);
        let mut labels: BTreeMap<String, String> = hello.labels.clone().into_iter().collect();
        // Labels the operator attached to the bootstrap token outrank the device's own.
        labels.extend(device.record.token_labels.clone());
        if device.session.is_some() {
            tracing::info!(device = name, "new session replaces the previous one");
        }
        let labels_changed = device.record.labels != labels;
        device.session = Some(session);
        device.record.labels = labels;
        device.record.capacity = capacity.clone().into();
        device.record.agent_version = hello.version.clone();
        device.record.last_seen_unix_ms = now_ms;
        device.reported_state = "idle".into();
        device.effective.observe_from(now_ms);
        if labels_changed {
            device.miner = None;
            device.vardiff = None;
        }
        fx.persist.push(PersistOp::Device(device.record.clone()));

        // Keep what the device still holds and we still honour; drop the rest.
        let mut kept = Vec::new();
        let owned: BTreeSet<AssignmentId> = self.scheduler.leases_of(name).into_iter().collect();
        for resumed in hello.resume.iter().flat_map(|r| &r.assignments) {
            if owned.contains(&resumed.assignment_id) {
                self.scheduler
                    .progress(resumed.assignment_id, resumed.scanned_until);
                kept.push(resumed.assignment_id);
            }
        }
        // Leases the device no longer knows about (it restarted) are reclaimed now.
        for id in owned {
            if !kept.contains(&id) {
                self.end_lease(id, now_ms, &mut fx);
            }
        }
        let limits = self
            .devices
            .get(name)
            .and_then(|d| d.miner.as_ref())
            .and_then(|m| self.miners.get(m))
            .map_or_else(
                || Limits::default().to_wire(),
                |m| m.spec.spec.limits.to_wire(),
            );
        fx.send(
            name,
            Kind::Welcome(pb::Welcome {
                device_name: name.to_string(),
                resumed_assignment_ids: kept,
                report_interval_ms: report_interval_ms(self.devices.len()),
                limits: Some(limits),
            }),
        );
        self.rematch_device(name, now_ms, &mut fx);
        (session, fx)
    }

    fn device_entry(&mut self, name: &str, now_ms: i64) -> &mut DeviceRuntime {
        self.devices.entry(name.to_string()).or_insert_with(|| {
            DeviceRuntime::new(DeviceRecord {
                name: name.to_string(),
                first_seen_unix_ms: now_ms,
                ..DeviceRecord::default()
            })
        })
    }

    /// Counts a message from `name` that broke the protocol (its session is ended).
    pub fn protocol_error(&mut self, name: &str, now_ms: i64) {
        self.device_entry(name, now_ms).protocol_errors += 1;
    }

    /// The stored record of a device.
    pub fn device_record(&self, name: &str) -> Option<DeviceRecord> {
        self.devices.get(name).map(|d| d.record.clone())
    }

    /// A device got a certificate: at enrollment (with the token's labels) or renewal.
    pub fn certified(
        &mut self,
        name: &str,
        labels: Option<BTreeMap<String, String>>,
        not_after_unix_ms: i64,
        now_ms: i64,
    ) -> Effects {
        let device = self.device_entry(name, now_ms);
        if let Some(labels) = labels {
            device.record.token_labels = labels;
        }
        device.record.certificate_issued_unix_ms = now_ms;
        device.record.certificate_not_after_unix_ms = not_after_unix_ms;
        device.record.last_seen_unix_ms = now_ms;
        Effects {
            persist: vec![PersistOp::Device(device.record.clone())],
            messages: Vec::new(),
        }
    }

    /// Counts shares `name` submitted for work that belongs to other devices.
    pub fn foreign_shares(&mut self, name: &str, count: u64, now_ms: i64) {
        if count > 0 {
            let device = self.device_entry(name, now_ms);
            if device.foreign_shares == 0 {
                tracing::warn!(
                    device = name,
                    "device submitted shares for another device's work"
                );
            }
            device.foreign_shares += count;
        }
    }

    /// A revoked device: its session is over and its leases go back now.
    pub fn cut(&mut self, name: &str, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        for lease in self.scheduler.release_device(name) {
            self.lease_meta.remove(&lease.id);
            fx.persist.push(PersistOp::DeleteLease(lease.id));
        }
        if let Some(device) = self.devices.get_mut(name) {
            device.session = None;
            device.honesty.pause();
            device.reported_state = "offline".into();
            device.record.last_seen_unix_ms = now_ms;
            fx.persist.push(PersistOp::Device(device.record.clone()));
        }
        fx
    }

    /// A session ended. Its leases stay until they expire: the agent keeps scanning them
    /// while disconnected and may resume them.
    pub fn disconnect(&mut self, name: &str, session: u64, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        if let Some(device) = self.devices.get_mut(name)
            && device.session == Some(session)
        {
            device.session = None;
            device.honesty.pause();
            device.reported_state = "offline".into();
            device.record.last_seen_unix_ms = now_ms;
            fx.persist.push(PersistOp::Device(device.record.clone()));
        }
        fx
    }

    /// Whether `session` is the device's current session.
    pub fn is_current_session(&self, name: &str, session: u64) -> bool {
        self.devices.get(name).and_then(|d| d.session) == Some(session)
    }

    /// A `CapacityReport` from a device.
    pub fn report(&mut self, name: &str, report: &pb::CapacityReport, now_ms: i64) {
        if let Some(device) = self.devices.get_mut(name) {
            device.reported_hashrate = if report.hashrate.is_finite() {
                report.hashrate.max(0.0)
            } else {
                0.0
            };
            device.reported_state = report.state.chars().take(64).collect();
            device.readings = DeviceReadings::from_report(report);
            device.record.last_seen_unix_ms = now_ms;
            device.honesty.report(device.reported_hashrate, now_ms);
        }
    }

    /// A `Progress` from a device.
    pub fn progress(&mut self, name: &str, progress: &pb::Progress, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        let owned = self
            .scheduler
            .lease(progress.assignment_id)
            .is_some_and(|l| l.device == name);
        if !owned {
            return fx;
        }
        self.scheduler
            .progress(progress.assignment_id, progress.scanned_until);
        if let Some(device) = self.devices.get_mut(name) {
            device.record.last_seen_unix_ms = now_ms;
        }
        if progress.finished {
            self.end_lease(progress.assignment_id, now_ms, &mut fx);
            self.top_up(name, now_ms, &mut fx);
        }
        fx
    }

    // ---------------------------------------------------------------- leases

    /// Ends a lease (reclaiming its unscanned remainder) and remembers it for late shares.
    fn end_lease(&mut self, id: AssignmentId, now_ms: i64, fx: &mut Effects) {
        if let Some(lease) = self.scheduler.end_lease(id) {
            fx.persist.push(PersistOp::DeleteLease(id));
            self.remember_ended(lease, now_ms);
        }
    }

    fn remember_ended(&mut self, lease: Lease, now_ms: i64) {
        let Some(meta) = self.lease_meta.remove(&lease.id) else {
            return;
        };
        if let Some(header) = self.headers.get(&lease.header).cloned() {
            self.ended_order.push_back(lease.id);
            self.ended.insert(
                lease.id,
                EndedLease {
                    lease,
                    meta,
                    header,
                    ended_ms: now_ms,
                },
            );
        }
    }

    fn end_device_leases(&mut self, name: &str, reason: &str, fx: &mut Effects) {
        let ids = self.scheduler.leases_of(name);
        self.end_leases_of(name, ids, reason, fx);
    }

    /// Ends leases `ids` of device `name` and tells it, if it is connected.
    fn end_leases_of(
        &mut self,
        name: &str,
        ids: Vec<AssignmentId>,
        reason: &str,
        fx: &mut Effects,
    ) {
        if ids.is_empty() {
            return;
        }
        for id in &ids {
            self.scheduler.end_lease(*id);
            self.lease_meta.remove(id);
            fx.persist.push(PersistOp::DeleteLease(*id));
        }
        if self.devices.get(name).is_some_and(|d| d.session.is_some()) {
            fx.send(
                name,
                Kind::Cancel(pb::Cancel {
                    assignment_ids: ids,
                    reason: reason.to_string(),
                }),
            );
        }
    }

    fn end_miner_leases(&mut self, miner: &str, reason: &str, fx: &mut Effects) {
        for name in self.devices_of(miner) {
            self.end_device_leases(&name, reason, fx);
        }
    }

    /// Retires every header of `miner` from a job other than its current one.
    fn retire_stale_headers(&mut self, miner: &str, reason: &str, fx: &mut Effects) {
        let Some(runtime) = self.miners.get(miner) else {
            return;
        };
        let job = runtime.source.job();
        let stale: Vec<HeaderId> = runtime
            .headers
            .iter()
            .copied()
            .filter(|h| self.headers.get(h).is_none_or(|w| w.job != job))
            .collect();
        self.retire_headers(miner, &stale, reason, fx);
    }

    fn retire_miner_headers(&mut self, miner: &str, reason: &str, fx: &mut Effects) {
        let all: Vec<HeaderId> = self
            .miners
            .get(miner)
            .map(|m| m.headers.iter().copied().collect())
            .unwrap_or_default();
        self.retire_headers(miner, &all, reason, fx);
    }

    fn retire_headers(
        &mut self,
        miner: &str,
        headers: &[HeaderId],
        reason: &str,
        fx: &mut Effects,
    ) {
        let mut cancelled: BTreeMap<String, Vec<AssignmentId>> = BTreeMap::new();
        for &header in headers {
            for lease in self.scheduler.retire_header(header) {
                self.lease_meta.remove(&lease.id);
                fx.persist.push(PersistOp::DeleteLease(lease.id));
                cancelled.entry(lease.device).or_default().push(lease.id);
            }
            if let Some(runtime) = self.miners.get_mut(miner) {
                runtime.headers.remove(&header);
                if runtime.current_header == Some(header) {
                    runtime.current_header = None;
                }
            }
        }
        self.forget_dropped_headers(fx);
        for (device, ids) in cancelled {
            if self
                .devices
                .get(&device)
                .is_some_and(|d| d.session.is_some())
            {
                fx.send(
                    &device,
                    Kind::Cancel(pb::Cancel {
                        assignment_ids: ids,
                        reason: reason.to_string(),
                    }),
                );
            }
        }
    }

    fn forget_dropped_headers(&mut self, fx: &mut Effects) {
        for header in self.scheduler.take_dropped_headers() {
            // Ended leases may still point at it for late shares; they hold the Arc.
            if let Some(work) = self.headers.remove(&header)
                && let Some(runtime) = self.miners.get_mut(&work.miner)
            {
                runtime.headers.remove(&header);
                if runtime.current_header == Some(header) {
                    runtime.current_header = None;
                }
            }
            fx.persist.push(PersistOp::DeleteHeader(header));
        }
    }

    /// Gives a connected device leases until it holds [`LEASES_PER_DEVICE`].
    fn top_up(&mut self, name: &str, now_ms: i64, fx: &mut Effects) {
        // Checked first: every tick calls this for every connected device, nearly all of
        // which hold their leases already.
        if self.scheduler.lease_count(name) >= LEASES_PER_DEVICE {
            return;
        }
        let Some(device) = self.devices.get(name) else {
            return;
        };
        // A device a local limit stops (battery, window, its own workload) gets nothing
        // until it reports it can hash again; the tick after that report tops it up.
        if device.session.is_none()
            || self.unschedulable.contains(name)
            || stops_hashing(&device.reported_state)
        {
            return;
        }
        let Some(key) = device.miner.clone() else {
            return;
        };
        let Some(miner) = self.miners.get(&key) else {
            return;
        };
        if miner.spec.spec.paused || miner.unprofitable_pause {
            return;
        }
        let spec = miner.spec.spec.clone();
        let nominal = device.nominal_hashrate();
        let rate = nominal * spec.limits.duty_cycle;
        let size =
            ((rate * f64::from(spec.assignment_seconds)) as u64).clamp(MIN_RANGE, NONCE_SPACE);
        let (difficulty, target) = match &device.vardiff {
            Some(v) => (v.difficulty(), v.target()),
            None => return,
        };
        let device_lease = device_lease_ms(&miner.spec, size, rate);
        // Each pass either leases a range or opens a fresh header (which always has room),
        // so a few passes suffice; the bound only guards against a logic error spinning.
        for _ in 0..4 * LEASES_PER_DEVICE {
            if self.scheduler.lease_count(name) >= LEASES_PER_DEVICE {
                break;
            }
            let header = match self.miners.get(&key).and_then(|m| m.current_header) {
                Some(h) => h,
                None => match self.new_header(&key, fx) {
                    Some(h) => h,
                    // The source has no work now (a pool between jobs or connections).
                    None => return,
                },
            };
            let expires = now_ms + device_lease + LINK_SLACK_MS;
            let Some(lease) = self.scheduler.assign(name, header, size, expires) else {
                if let Some(runtime) = self.miners.get_mut(&key) {
                    runtime.current_header = None;
                }
                continue;
            };
            // One trace per assignment (a root, not a child of the long-lived session):
            // with OTLP export on, it shows which device got which range of which
            // MicroMiner's work, and the agent's `mine` span continues it.
            let assign = tracing::info_span!(
                parent: None,
                "assign",
                device = name,
                miner = %key,
                assignment = lease.id,
                nonces = lease.end - lease.start,
                difficulty,
            );
            let _entered = assign.enter();
            let trace_context = crate::span_relay::trace_context(&assign);
            if let Some(trace) = crate::span_relay::trace_id(&trace_context)
                && let Some(device) = self.devices.get_mut(name)
            {
                if device.traces.len() >= crate::span_relay::TRACES_PER_DEVICE {
                    device.traces.pop_front();
                }
                device.traces.push_back(trace);
            }
            let Some(work) = self.headers.get(&header).cloned() else {
                // Cannot happen: headers are registered before they are assigned from.
                self.scheduler.end_lease(lease.id);
                return;
            };
            let meta = LeaseMeta {
                target,
                difficulty,
                miner: key.clone(),
            };
            if lease.id >= self.ids.next_assignment {
                // Reserve a block of ids durably: only the assignment that crosses into a
                // new block waits for the disk, and a restart continues above the block.
                self.ids.next_assignment = lease.id + ASSIGNMENT_ID_BLOCK;
                fx.persist.push(PersistOp::Ids(self.ids.clone()));
            }
            fx.persist.push(PersistOp::Lease(LeaseRecord {
                lease: lease.clone(),
                target_le: target.to_le_bytes().to_vec(),
                difficulty,
                miner: key.clone(),
            }));
            fx.send(
                name,
                Kind::Assignment(pb::Assignment {
                    id: lease.id,
                    header_prefix: work.prefix.to_vec(),
                    nonce_start: lease.start,
                    nonce_end: lease.end,
                    share_target: target.to_le_bytes().to_vec(),
                    share_difficulty: difficulty,
                    lease_ms: device_lease as u32,
                    expires_at_unix_ms: expires,
                    miner: key.clone(),
                    limits: Some(spec.limits.to_wire()),
                    trace_context,
                }),
            );
            self.lease_meta.insert(lease.id, meta);
        }
    }

    fn new_header(&mut self, miner: &str, fx: &mut Effects) -> Option<HeaderId> {
        let runtime = self.miners.get_mut(miner)?;
        let id = self.ids.next_header;
        let work = runtime.source.next_header(id)?;
        self.ids.take_header();
        runtime.headers.insert(id);
        runtime.current_header = Some(id);
        fx.persist.push(PersistOp::Header(work.clone()));
        match &runtime.source {
            Source::Builtin(builtin) => fx
                .persist
                .push(PersistOp::Tip(miner.to_string(), builtin.tip().clone())),
            // Its allocation counters moved: a resumed session must not repeat them.
            Source::Stratum(work) => fx.persist.push(PersistOp::PoolSession(
                miner.to_string(),
                work.record().map(Box::new),
            )),
        }
        fx.persist.push(PersistOp::Ids(self.ids.clone()));
        self.scheduler.add_header(id);
        self.headers.insert(id, Arc::new(work));
        Some(id)
    }

    /// Trace ids of a device's latest traced assignments.
    pub fn traces(&self, name: &str) -> Vec<[u8; 16]> {
        self.devices
            .get(name)
            .map(|d| d.traces.iter().copied().collect())
            .unwrap_or_default()
    }

    // ---------------------------------------------------------------- shares

    /// Looks up what each share claims. Hashing happens afterwards, outside any lock.
    pub fn check_shares(&self, name: &str, shares: &[pb::Share]) -> Vec<ShareCheck> {
        shares
            .iter()
            .map(|share| self.check_share(name, share))
            .collect()
    }

    fn check_share(&self, name: &str, share: &pb::Share) -> ShareCheck {
        let reject = |reason, miner: Option<&str>| ShareCheck::Reject {
            share: *share,
            reason,
            miner: miner.map(str::to_string),
            foreign: false,
        };
        // Work another device holds (or held): this device is acting for someone else.
        let foreign = ShareCheck::Reject {
            share: *share,
            reason: RejectReason::UnknownAssignment,
            miner: None,
            foreign: true,
        };
        let (lease, meta, header) = match self.scheduler.lease(share.assignment_id) {
            Some(lease) => {
                if lease.device != name {
                    return foreign;
                }
                let (Some(meta), Some(header)) = (
                    self.lease_meta.get(&share.assignment_id),
                    self.headers.get(&lease.header),
                ) else {
                    return reject(RejectReason::Stale, None);
                };
                (lease.clone(), meta.clone(), header.clone())
            }
            None => match self.ended.get(&share.assignment_id) {
                Some(ended) if ended.lease.device == name => (
                    ended.lease.clone(),
                    ended.meta.clone(),
                    ended.header.clone(),
                ),
                Some(_) => return foreign,
                None if share.assignment_id < self.scheduler.next_id() => {
                    // Issued once, long gone: a device catching up after a long outage.
                    return reject(RejectReason::Stale, None);
                }
                None => return reject(RejectReason::UnknownAssignment, None),
            },
        };
        let source = self.miners.get(&meta.miner).map(|m| &m.source);
        if source.map(Source::job) != Some(header.job) {
            return reject(RejectReason::Stale, Some(&meta.miner));
        }
        let pool_target = match (source.and_then(Source::stratum), &header.upstream) {
            (Some(work), Some(upstream)) => Some(work.submit_target(upstream.difficulty)),
            _ => None,
        };
        ShareCheck::Verify {
            share: *share,
            header,
            range: (lease.start, lease.end),
            target: meta.target,
            difficulty: meta.difficulty,
            miner: meta.miner,
            pool_target,
        }
    }

    /// Bookkeeping after shares were durably recorded: vardiff, rates, found blocks.
    pub fn shares_recorded(
        &mut self,
        name: &str,
        recorded: &[RecordedShare],
        now_ms: i64,
    ) -> Effects {
        let mut fx = Effects::default();
        let mut blocks: Vec<(String, [u8; 32], u64)> = Vec::new();
        for share in recorded {
            // A share proves its range scanned up to its nonce even before the device's
            // next progress report says so (shares go out within 100 ms, reports every
            // few seconds). Were the lease to end now (the device crashed or restarted),
            // its remainder starts after the share, so the device given it never finds
            // the same share again and has it refused as a duplicate. Nonces below it not
            // yet scanned are given up: lost work, never work done twice.
            self.scheduler
                .progress(share.assignment_id, u64::from(share.nonce) + 1);
            if let Some(device) = self.devices.get_mut(name) {
                device.effective.add(now_ms, share.difficulty);
                device.honesty.share(share.difficulty);
                if let Some(v) = device.vardiff.as_mut() {
                    v.record_share(share.difficulty);
                }
                device.record.last_seen_unix_ms = now_ms;
            }
            if let Some(miner) = self.miners.get_mut(&share.miner) {
                miner.effective.add(now_ms, share.difficulty);
            }
            if let Some(hash) = share.block_hash {
                blocks.push((share.miner.clone(), hash, share.header.job));
            }
        }
        for (miner, hash, job) in blocks {
            let Some(runtime) = self.miners.get(&miner) else {
                continue;
            };
            if runtime.source.stratum().is_some() {
                // The pool builds on it and says so with its next (clean) job.
                tracing::info!(miner = %miner, device = name,
                    hash = %micromine_proto::work::hash_display_hex(&hash), "block found for the pool");
                continue;
            }
            if runtime.source.job() != job {
                // A second block on the same job in the same batch: the chain already moved.
                continue;
            }
            let new_job = self.ids.take_job();
            if let Some(runtime) = self.miners.get_mut(&miner)
                && let Some(builtin) = runtime.source.builtin_mut()
            {
                builtin.block_found(hash, new_job, now_unix_seconds(now_ms));
                tracing::info!(miner = %miner, device = name, height = builtin.tip().height - 1,
                    hash = %micromine_proto::work::hash_display_hex(&hash), "block found");
                fx.persist
                    .push(PersistOp::Tip(miner.clone(), builtin.tip().clone()));
                runtime.current_header = None;
            }
            fx.persist.push(PersistOp::Ids(self.ids.clone()));
            self.retire_stale_headers(&miner, "block found: new chain tip", &mut fx);
            for device in self.devices_of(&miner) {
                self.top_up(&device, now_ms, &mut fx);
            }
        }
        fx
    }

    // ---------------------------------------------------------------- time

    /// Periodic work: expire leases, retarget vardiff, forget old ended leases, and make
    /// sure every connected device has work.
    pub fn tick(&mut self, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        self.account_energy(now_ms, &mut fx);
        for lease in self.scheduler.expire(now_ms) {
            tracing::debug!(device = %lease.device, lease = lease.id, scanned = lease.scanned_until - lease.start,
                len = lease.len(), "lease expired; remainder reclaimed");
            fx.persist.push(PersistOp::DeleteLease(lease.id));
            self.remember_ended(lease, now_ms);
        }
        self.forget_dropped_headers(&mut fx);
        while let Some(id) = self.ended_order.front().copied() {
            match self.ended.get(&id) {
                Some(e) if e.ended_ms + ENDED_LEASE_MEMORY_MS > now_ms => break,
                _ => {
                    self.ended.remove(&id);
                    self.ended_order.pop_front();
                }
            }
        }
        for device in self.devices.values_mut() {
            if let Some(v) = device.vardiff.as_mut() {
                let flagged_before = device.honesty.mismatch().is_some();
                if let Some(mismatch) = device.honesty.judge(v.difficulty(), now_ms)
                    && !flagged_before
                {
                    tracing::warn!(device = %device.record.name, "{}", mismatch.describe());
                }
                if let Some(new) = v.retarget(now_ms) {
                    tracing::debug!(device = %device.record.name, difficulty = new, "vardiff retarget");
                }
            }
        }
        let names: Vec<String> = self
            .devices
            .iter()
            .filter(|(n, d)| {
                d.session.is_some() && self.scheduler.lease_count(n) < LEASES_PER_DEVICE
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.top_up(&name, now_ms, &mut fx);
        }
        fx
    }

    // ---------------------------------------------------------------- views

    /// Everything operators see, with ledger totals looked up through `totals`.
    pub fn view(
        &mut self,
        now_ms: i64,
        totals: &dyn Fn(Scope<'_>) -> Totals,
    ) -> (Vec<MinerView>, Vec<DeviceView>) {
        let devices: Vec<DeviceView> = self
            .devices
            .values()
            .map(|d| {
                let connected = d.session.is_some();
                let leases = self.scheduler.leases_of(&d.record.name).len();
                let unschedulable = self.unschedulable.contains(&d.record.name);
                let state = if !connected {
                    "offline".to_string()
                } else if unschedulable {
                    "unschedulable".to_string()
                } else if is_held_back(&d.reported_state) {
                    d.reported_state.clone()
                } else if leases > 0 {
                    "mining".to_string()
                } else {
                    "idle".to_string()
                };
                DeviceView {
                    name: d.record.name.clone(),
                    labels: d.record.labels.clone(),
                    connected,
                    state,
                    miner: d.miner.clone(),
                    unschedulable,
                    cores: d.record.capacity.cores,
                    memory_bytes: d.record.capacity.memory_bytes,
                    mining_threads: d.record.capacity.mining_threads,
                    arch: d.record.capacity.arch.clone(),
                    hash_engine: d.record.capacity.hash_engine.clone(),
                    hash_engine_basis: d.record.capacity.hash_engine_basis.clone(),
                    hash_engine_rates: d.record.capacity.hash_engine_rates.clone(),
                    agent_version: d.record.agent_version.clone(),
                    nominal_hashrate: d.record.capacity.nominal_hashrate,
                    reported_hashrate: if connected { d.reported_hashrate } else { 0.0 },
                    effective_hashrate: d.effective.hashrate(now_ms),
                    share_difficulty: d.vardiff.as_ref().map_or(0.0, Vardiff::difficulty),
                    assignments: leases,
                    shares: totals(Scope::Device(&d.record.name)),
                    protocol_errors: d.protocol_errors,
                    certificate_not_after_unix_ms: d.record.certificate_not_after_unix_ms,
                    flags: device_flags(d),
                    last_seen_unix_ms: d.record.last_seen_unix_ms,
                    readings: d.readings,
                    // From the ledger, filled in by the caller.
                    pool: Default::default(),
                }
            })
            .collect();
        let economies = self.economies();
        let mut miners = Vec::new();
        for (key, runtime) in self.miners.iter_mut() {
            let mut counts = DeviceCounts::default();
            let mut nominal = 0.0;
            for d in devices
                .iter()
                .filter(|d| d.miner.as_deref() == Some(key.as_str()))
            {
                counts.matched += 1;
                match d.state.as_str() {
                    "offline" => counts.offline += 1,
                    "mining" => {
                        counts.mining += 1;
                        nominal += d.nominal_hashrate * runtime.spec.spec.limits.duty_cycle;
                    }
                    s if is_held_back(s) => counts.throttled += 1,
                    _ => {}
                }
            }
            let t = totals(Scope::Miner(key));
            let effective = runtime.effective.hashrate(now_ms);
            let network_difficulty = runtime.source.network_difficulty();
            let economics_status = match (runtime.spec.spec.economics.clone(), economies.get(key)) {
                (Some(ref economics), Some(economy)) => {
                    let difficulty = economics.network_difficulty.unwrap_or(network_difficulty);
                    let joules = self.energy_joules.get(key).copied().unwrap_or(0.0);
                    set_profitable(runtime, economics, economy, difficulty, now_ms);
                    let energy_k_wh = joules / 3.6e6;
                    Some(EconomicsStatus {
                        power_watts: economy.working_watts,
                        energy_k_wh,
                        energy_cost: economics::energy_cost(economics, energy_k_wh),
                        revenue: economics::earned(economics, t.accepted_difficulty, difficulty),
                        cost_per_hour: economics::cost_per_hour(economics, economy.working_watts),
                        revenue_per_hour: economics::revenue_per_hour(
                            economics, effective, difficulty,
                        ),
                    })
                }
                _ => {
                    runtime.conditions.retain(|c| c.type_ != "Profitable");
                    None
                }
            };
            let status = MicroMinerStatus {
                observed_generation: runtime.spec.metadata.generation,
                conditions: super::conditions::update(
                    &mut runtime.conditions,
                    if runtime.spec.spec.paused {
                        Some(super::conditions::SPEC_PAUSED)
                    } else if runtime.unprofitable_pause {
                        Some((
                            "Unprofitable",
                            "spec.economics.pauseWhenUnprofitable: energy costs more than the work is expected to earn",
                        ))
                    } else {
                        None
                    },
                    &counts,
                    runtime.spec.metadata.generation,
                    now_ms,
                ),
                hashrate: Hashrate { nominal, effective },
                shares: crate::fleet::status::share_counts(&t),
                blocks_found: t.blocks,
                last_share_time: t
                    .last_share_unix_ms
                    .and_then(super::conditions::time_from_unix_ms),
                devices: counts,
                economics: economics_status,
                pool: None,
            };
            let mut status = status;
            if let Some(work) = runtime.source.stratum() {
                let connection = work.status();
                let connected = connection.state == "Connected";
                let message = match (&connection.url, &connection.last_error) {
                    (Some(url), _) if connected => format!("mining for {url}"),
                    (_, Some(error)) => error.clone(),
                    _ => "connecting to the pool".to_string(),
                };
                super::conditions::set(
                    &mut runtime.conditions,
                    "PoolConnected",
                    connected,
                    if connected {
                        "Connected"
                    } else {
                        "PoolUnreachable"
                    },
                    &message,
                    runtime.spec.metadata.generation,
                    now_ms,
                );
                status.conditions = runtime.conditions.clone();
                status.pool = Some(PoolStatus {
                    state: connection.state.to_string(),
                    url: connection.url,
                    failover: connection.pool_index > 0,
                    difficulty: connection.difficulty,
                    job: connection.job,
                    last_error: connection.last_error,
                    // From the ledger, filled in by the caller.
                    accepted: 0,
                    rejected: 0,
                    rejected_by_reason: BTreeMap::new(),
                });
            } else {
                runtime.conditions.retain(|c| c.type_ != "PoolConnected");
            }
            miners.push(MinerView {
                key: key.clone(),
                status,
                network_difficulty,
                totals: t,
            });
        }
        (miners, devices)
    }

    /// The oldest header a share could still be accepted for: every share record below it
    /// is settled history that no submission can touch again.
    pub fn oldest_live_header(&self) -> HeaderId {
        self.headers
            .keys()
            .copied()
            .chain(self.ended.values().map(|e| e.header.id))
            .min()
            .unwrap_or(self.ids.next_header)
    }

    /// The pool session a MicroMiner's upstream should ask to resume.
    pub fn resume_hint(&self, miner: &str) -> Option<ResumeHint> {
        self.miners.get(miner)?.source.stratum()?.resume_hint()
    }

    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        self.devices
            .values()
            .filter(|d| d.session.is_some())
            .count()
    }

    /// Live leases.
    pub fn lease_count(&self) -> usize {
        self.scheduler.leases().count()
    }

    /// Every live lease, by id.
    pub fn leases(&self) -> Vec<Lease> {
        let mut leases: Vec<Lease> = self.scheduler.leases().cloned().collect();
        leases.sort_by_key(|l| l.id);
        leases
    }
}

/// Sets the `Profitable` condition from what the MicroMiner's schedulable devices could
/// earn at its duty cycle against what they would draw, as last judged by the tick (the
/// first view before any tick judges it itself).
fn set_profitable(
    runtime: &mut MinerRuntime,
    economics: &Economics,
    economy: &Economy,
    network_difficulty: f64,
    now_ms: i64,
) {
    let revenue =
        economics::revenue_per_hour(economics, economy.capacity_hashrate, network_difficulty);
    let cost = economics::cost_per_hour(economics, economy.capacity_watts);
    let verdict = *runtime
        .profitable
        .get_or_insert_with(|| economics::profitable(None, revenue, cost));
    let (reason, message) = if economy.capacity_watts == 0.0 && economy.capacity_hashrate == 0.0 {
        (
            "NoDevices",
            "no connected, schedulable device to judge by".to_string(),
        )
    } else {
        (
            if verdict {
                "RevenueCoversEnergy"
            } else {
                "EnergyCostsMore"
            },
            format!(
                "at {:.3} MH/s and {:.1} W: expected revenue {:.6}/h, energy cost {:.6}/h",
                economy.capacity_hashrate / 1e6,
                economy.capacity_watts,
                revenue,
                cost
            ),
        )
    };
    super::conditions::set(
        &mut runtime.conditions,
        "Profitable",
        verdict,
        reason,
        &message,
        runtime.spec.metadata.generation,
        now_ms,
    );
}

fn device_flags(d: &DeviceRuntime) -> Vec<DeviceFlag> {
    let mut flags = Vec::new();
    if let Some(mismatch) = d.honesty.mismatch() {
        flags.push(DeviceFlag {
            kind: "HashrateMismatch".into(),
            message: mismatch.describe(),
        });
    }
    if d.foreign_shares > 0 {
        flags.push(DeviceFlag {
            kind: "ForeignShares".into(),
            message: format!(
                "submitted {} share(s) for work assigned to other devices",
                d.foreign_shares
            ),
        });
    }
    flags
}

/// Which ledger totals a view asks for.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// One device.
    Device(&'a str),
    /// One MicroMiner.
    Miner(&'a str),
}

#[cfg(test)]
mod tests {
    use super::*;
    use micromine_proto::work::{header_with_nonce, sha256d};

    const NOW: i64 = 1_700_000_000_000;

    fn miner(name: &str, site: &str, difficulty: f64, paused: bool) -> MicroMiner {
        let text = format!(
            "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {{name: {name}}}\nspec:\n  selector: {{matchLabels: {{site: {site}}}}}\n  workSource: {{builtin: {{networkDifficulty: {difficulty}}}}}\n  sharesPerMinute: 60\n  assignmentSeconds: 10\n  paused: {paused}\n"
        );
        micromine_resources::microminer::parse_str("test.yaml", &text)
            .expect("valid")
            .remove(0)
    }

    fn set(miners: &[MicroMiner]) -> MinerSet {
        miners.iter().map(|m| (m.key(), m.clone())).collect()
    }

    fn hello(site: &str, resume: Vec<pb::ResumedAssignment>) -> pb::Hello {
        pb::Hello {
            capacity: Some(pb::Capacity {
                nominal_hashrate: 1e6,
                mining_threads: 1,
                ..Default::default()
            }),
            labels: [("site".to_string(), site.to_string())].into(),
            version: "test".into(),
            resume: Some(pb::Resume {
                assignments: resume,
            }),
        }
    }

    fn assignments(fx: &Effects, device: &str) -> Vec<pb::Assignment> {
        fx.messages
            .iter()
            .filter(|(d, _)| d == device)
            .filter_map(|(_, m)| match &m.kind {
                Some(Kind::Assignment(a)) => Some(a.clone()),
                _ => None,
            })
            .collect()
    }

    fn cancels(fx: &Effects, device: &str) -> Vec<u64> {
        fx.messages
            .iter()
            .filter(|(d, _)| d == device)
            .filter_map(|(_, m)| match &m.kind {
                Some(Kind::Cancel(c)) => Some(c.assignment_ids.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn pool_job(id: &str, clean: bool) -> micromine_stratum::job::PoolJob {
        micromine_stratum::job::PoolJob {
            id: id.into(),
            prev_hash: [3; 32],
            coinb1: vec![1, 2],
            coinb2: vec![3],
            branch: Vec::new(),
            version: 0x2000_0000,
            bits: 0x1d00_ffff,
            time: 1_700_000_000,
            clean,
        }
    }

    #[test]
    fn a_lease_outlasts_its_range_even_on_a_slow_device() {
        let spec = miner("a", "x", 1e12, false);
        let planned = i64::from(spec.spec.assignment_seconds) * 1000;
        // A fast device: its range is assignmentSeconds of work.
        assert_eq!(
            device_lease_ms(&spec, planned as u64 * 1000, 1e6),
            3 * planned
        );
        // A 2 kH/s device with the smallest range (65,536 nonces, 32.8 s of work).
        assert_eq!(device_lease_ms(&spec, MIN_RANGE, 2_000.0), 98_304);
        // No rate known: the plan; an absurdly slow one: a day at most.
        assert_eq!(device_lease_ms(&spec, MIN_RANGE, 0.0), 3 * planned);
        assert_eq!(
            device_lease_ms(&spec, NONCE_SPACE, 1e-9),
            MAX_LEASE_MS - LINK_SLACK_MS
        );
    }

    #[test]
    fn large_fleets_report_less_often_within_bounds() {
        assert_eq!(report_interval_ms(0), 2_000);
        assert_eq!(report_interval_ms(1_500), 2_000);
        assert_eq!(report_interval_ms(10_000), 10_000);
        assert_eq!(report_interval_ms(1_000_000), 15_000);
        assert_eq!(report_interval_ms(usize::MAX), 15_000);
    }

    #[test]
    fn pool_jobs_drive_the_work_and_clean_jobs_make_older_work_stale() {
        let text = "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {site: x}}\n  workSource: {stratum: {url: 'stratum+tcp://pool:3333', user: a.b}}\n  sharesPerMinute: 60\n  assignmentSeconds: 10\n";
        let miner = micromine_resources::microminer::parse_str("p.yaml", text)
            .expect("valid")
            .remove(0);
        let key = miner.key();
        let mut s = FleetState::new(Restored::default());
        s.apply_miners(&set(&[miner]), NOW);
        let (_, fx) = s.connect("d", &hello("x", vec![]), NOW);
        assert!(
            assignments(&fx, "d").is_empty(),
            "no work before the pool has a job"
        );
        let connected = UpstreamEvent::Connected {
            session: 7,
            session_id: None,
            pool: "stratum+tcp://pool:3333".into(),
            pool_index: 0,
            extranonce1: vec![0xab],
            extranonce2_size: 4,
            version_mask: None,
        };
        assert!(assignments(&s.upstream_event(&key, connected, NOW), "d").is_empty());
        let fx = s.upstream_event(&key, UpstreamEvent::Difficulty(1e-6), NOW);
        assert!(assignments(&fx, "d").is_empty());
        let fx = s.upstream_event(&key, UpstreamEvent::Job(pool_job("j1", true)), NOW + 1);
        let first = assignments(&fx, "d");
        assert_eq!(first.len(), LEASES_PER_DEVICE);
        let share = |a: &pb::Assignment| pb::Share {
            assignment_id: a.id,
            nonce: a.nonce_start as u32,
            ..Default::default()
        };
        match &s.check_shares("d", &[share(&first[0])])[0] {
            ShareCheck::Verify {
                pool_target: Some(target),
                header,
                ..
            } => {
                assert_eq!(*target, Target::from_difficulty(1e-6).expect("target"));
                assert_eq!(header.upstream.as_ref().expect("pool work").job_id, "j1");
            }
            other => panic!("{other:?}"),
        }
        // A job that does not clean keeps the devices' work; one that cleans takes it back
        // and hands out the new job at once.
        let fx = s.upstream_event(&key, UpstreamEvent::Job(pool_job("j2", false)), NOW + 2);
        assert!(cancels(&fx, "d").is_empty());
        let fx = s.upstream_event(&key, UpstreamEvent::Job(pool_job("j3", true)), NOW + 3);
        let mut cancelled = cancels(&fx, "d");
        cancelled.sort_unstable();
        let mut held: Vec<u64> = first.iter().map(|a| a.id).collect();
        held.sort_unstable();
        assert_eq!(cancelled, held);
        let fresh = assignments(&fx, "d");
        assert_eq!(fresh.len(), LEASES_PER_DEVICE);
        // A share of the cancelled work, arriving late, is stale.
        match &s.check_shares("d", &[share(&first[1])])[0] {
            ShareCheck::Reject { reason, .. } => assert_eq!(*reason, RejectReason::Stale),
            other => panic!("{other:?}"),
        }
        // While the pool is away devices keep what they hold, and get nothing new.
        s.upstream_event(
            &key,
            UpstreamEvent::Disconnected {
                error: "gone".into(),
            },
            NOW + 4,
        );
        let fx = s.tick(NOW + 5);
        assert!(cancels(&fx, "d").is_empty() && assignments(&fx, "d").is_empty());
        assert!(matches!(
            &s.check_shares("d", &[share(&fresh[0])])[0],
            ShareCheck::Verify { .. }
        ));
        let (miners, _) = s.view(NOW + 5, &|_| Totals::default());
        let pool = miners[0].status.pool.clone().expect("pool status");
        assert_eq!(
            (pool.state.as_str(), pool.last_error.as_deref()),
            ("Disconnected", Some("gone"))
        );
        let condition = miners[0]
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "PoolConnected")
            .expect("condition");
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "PoolUnreachable")
        );
    }

    #[test]
    fn after_a_restart_a_device_keeps_the_leases_it_resumes() {
        let m = miner("a", "x", 1e12, false);
        let mut s = FleetState::new(Restored::default());
        let mut ops = s.apply_miners(&set(std::slice::from_ref(&m)), NOW).persist;
        let (_, fx) = s.connect("d", &hello("x", vec![]), NOW);
        let held = assignments(&fx, "d");
        assert_eq!(held.len(), LEASES_PER_DEVICE);
        ops.extend(fx.persist);
        let mut s = FleetState::new(restored_from(ops));
        let fx = s.apply_miners(&set(&[m]), NOW + 1_000);
        assert!(cancels(&fx, "d").is_empty());
        let (_, fx) = s.connect("d", &hello("x", resuming(&held)), NOW + 2_000);
        let kept = welcome_kept(&fx).expect("a welcome");
        assert_eq!(kept, held.iter().map(|a| a.id).collect::<Vec<_>>());
        assert!(cancels(&fx, "d").is_empty());
        assert!(assignments(&fx, "d").is_empty(), "it holds enough already");
    }

    #[test]
    fn assignments_sent_before_their_writes_are_never_reused_after_a_crash() {
        let m = miner("a", "x", 1e12, false);
        let mut s = FleetState::new(Restored::default());
        let mut durable = s.apply_miners(&set(std::slice::from_ref(&m)), NOW).persist;
        let (_, fx) = s.connect("d", &hello("x", vec![]), NOW);
        // The first assignments open a header and reserve ids: they wait for the disk.
        assert!(fx.messages_wait_for_writes());
        durable.extend(fx.persist);
        // The next come from that header and those ids: they leave at once, and the
        // crash forgets their writes.
        let (_, fx) = s.connect("e", &hello("x", vec![]), NOW + 100);
        let forgotten = assignments(&fx, "e");
        assert_eq!(forgotten.len(), LEASES_PER_DEVICE);
        assert!(!fx.messages_wait_for_writes(), "{:?}", fx.persist);

        let mut s = FleetState::new(restored_from(durable));
        s.apply_miners(&set(&[m]), NOW + 1_000);
        let (_, fx) = s.connect("e", &hello("x", resuming(&forgotten)), NOW + 2_000);
        assert_eq!(
            welcome_kept(&fx),
            Some(vec![]),
            "the device is told to drop them"
        );
        let (_, more) = s.connect("f", &hello("x", vec![]), NOW + 3_000);
        let fresh: Vec<pb::Assignment> = [assignments(&fx, "e"), assignments(&more, "f")].concat();
        assert_eq!(fresh.len(), 2 * LEASES_PER_DEVICE);
        for new in &fresh {
            for old in &forgotten {
                assert!(new.id > old.id, "id {} handed out again", old.id);
                assert!(
                    new.header_prefix != old.header_prefix
                        || new.nonce_end <= old.nonce_start
                        || old.nonce_end <= new.nonce_start,
                    "nonces of assignment {} handed out again in {}",
                    old.id,
                    new.id
                );
            }
        }
    }

    /// A `Hello`'s resume list for `held`, each scanned a little.
    fn resuming(held: &[pb::Assignment]) -> Vec<pb::ResumedAssignment> {
        held.iter()
            .map(|a| pb::ResumedAssignment {
                assignment_id: a.id,
                scanned_until: a.nonce_start + 10,
            })
            .collect()
    }

    /// The assignment ids a `Welcome` among `fx` says the device keeps.
    fn welcome_kept(fx: &Effects) -> Option<Vec<u64>> {
        fx.messages.iter().find_map(|(_, m)| match &m.kind {
            Some(Kind::Welcome(w)) => Some(w.resumed_assignment_ids.clone()),
            _ => None,
        })
    }

    /// What the store gives the next process after `ops` were made durable.
    fn restored_from(ops: Vec<PersistOp>) -> Restored {
        let mut restored = Restored::default();
        for op in ops {
            match op {
                PersistOp::Ids(ids) => restored.ids = ids,
                PersistOp::Tip(key, tip) => {
                    restored.tips.insert(key, tip);
                }
                PersistOp::Header(header) => restored.headers.push(header),
                PersistOp::Lease(lease) => restored.leases.push(lease),
                PersistOp::DeleteLease(id) => restored.leases.retain(|l| l.lease.id != id),
                PersistOp::Device(device) => {
                    restored.devices.retain(|d| d.name != device.name);
                    restored.devices.push(device);
                }
                PersistOp::PoolSession(key, record) => match record {
                    Some(record) => {
                        restored.pool_sessions.insert(key, *record);
                    }
                    None => {
                        restored.pool_sessions.remove(&key);
                    }
                },
                _ => {}
            }
        }
        restored
    }

    #[test]
    fn after_a_restart_pool_work_stays_if_the_pool_resumes_the_session_and_goes_if_not() {
        let text = "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {site: x}}\n  workSource: {stratum: {url: 'stratum+tcp://pool:3333', user: a.b}}\n  sharesPerMinute: 60\n  assignmentSeconds: 10\n";
        let miner = micromine_resources::microminer::parse_str("p.yaml", text)
            .expect("valid")
            .remove(0);
        let key = miner.key();
        let connected = |session: u64| UpstreamEvent::Connected {
            session,
            session_id: Some("sub".into()),
            pool: "stratum+tcp://pool:3333".into(),
            pool_index: 0,
            extranonce1: vec![1],
            extranonce2_size: 4,
            version_mask: None,
        };
        let mut s = FleetState::new(Restored::default());
        let mut ops = s
            .apply_miners(&set(std::slice::from_ref(&miner)), NOW)
            .persist;
        ops.extend(s.connect("d", &hello("x", vec![]), NOW).1.persist);
        ops.extend(s.upstream_event(&key, connected(7), NOW).persist);
        let fx = s.upstream_event(&key, UpstreamEvent::Job(pool_job("j", true)), NOW);
        let held = assignments(&fx, "d");
        assert_eq!(held.len(), LEASES_PER_DEVICE);
        ops.extend(fx.persist);
        let resume: Vec<pb::ResumedAssignment> = held
            .iter()
            .map(|a| pb::ResumedAssignment {
                assignment_id: a.id,
                scanned_until: a.nonce_start,
            })
            .collect();
        for (session, voided) in [(7, false), (8, true)] {
            let mut s = FleetState::new(restored_from(ops.clone()));
            s.apply_miners(&set(std::slice::from_ref(&miner)), NOW + 1_000);
            assert_eq!(
                s.resume_hint(&key).map(|h| (h.session, h.session_id)),
                Some((7, "sub".into()))
            );
            let (_, fx) = s.connect("d", &hello("x", resume.clone()), NOW + 2_000);
            assert!(
                assignments(&fx, "d").is_empty(),
                "no new work before the pool is back"
            );
            let fx = s.upstream_event(&key, connected(session), NOW + 3_000);
            let mut cancelled = cancels(&fx, "d");
            cancelled.sort_unstable();
            if voided {
                assert_eq!(
                    cancelled,
                    held.iter().map(|a| a.id).collect::<Vec<_>>(),
                    "a new session voids the old work"
                );
            } else {
                assert!(cancelled.is_empty(), "the resumed session keeps it");
                let share = pb::Share {
                    assignment_id: held[0].id,
                    nonce: held[0].nonce_start as u32,
                    ..Default::default()
                };
                assert!(matches!(
                    &s.check_shares("d", &[share])[0],
                    ShareCheck::Verify {
                        pool_target: Some(_),
                        ..
                    }
                ));
            }
        }
    }

    #[test]
    fn a_connecting_device_is_welcomed_and_given_two_persisted_leases() {
        let mut s = FleetState::new(Restored::default());
        s.apply_miners(&set(&[miner("a", "x", 1.0, false)]), NOW);
        let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
        assert!(
            matches!(fx.messages[0].1.kind, Some(Kind::Welcome(_))),
            "Welcome comes first"
        );
        let given = assignments(&fx, "d1");
        assert_eq!(given.len(), LEASES_PER_DEVICE);
        // 1 MH/s for 10 s.
        assert_eq!(given[0].nonce_end - given[0].nonce_start, 10_000_000);
        let persisted = fx
            .persist
            .iter()
            .filter(|op| matches!(op, PersistOp::Lease(_)))
            .count();
        assert_eq!(persisted, 2);
        assert!(
            fx.persist
                .iter()
                .any(|op| matches!(op, PersistOp::Header(_)))
        );

        // Finishing one brings a new one; nothing is cancelled.
        let fx = s.progress(
            "d1",
            &pb::Progress {
                assignment_id: given[0].id,
                scanned_until: given[0].nonce_end,
                hashes: 0,
                finished: true,
            },
            NOW + 1000,
        );
        assert_eq!(assignments(&fx, "d1").len(), 1);
        assert!(cancels(&fx, "d1").is_empty());
    }

    #[test]
    fn devices_without_a_matching_miner_or_with_a_paused_one_get_nothing() {
        let mut s = FleetState::new(Restored::default());
        s.apply_miners(&set(&[miner("a", "x", 1.0, false)]), NOW);
        let (_, fx) = s.connect("stranger", &hello("elsewhere", vec![]), NOW);
        assert!(assignments(&fx, "stranger").is_empty());
        let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
        let held: Vec<u64> = assignments(&fx, "d1").iter().map(|a| a.id).collect();
        let fx = s.apply_miners(&set(&[miner("a", "x", 1.0, true)]), NOW + 1);
        assert_eq!(
            cancels(&fx, "d1"),
            held,
            "pausing cancels what devices hold"
        );
        assert!(
            s.tick(NOW + 2).messages.is_empty(),
            "and hands out nothing while paused"
        );
        let fx = s.apply_miners(&set(&[miner("a", "x", 1.0, false)]), NOW + 3);
        assert_eq!(assignments(&fx, "d1").len(), 2, "unpausing resumes");
        // Deleting the MicroMiner cancels too.
        let fx = s.apply_miners(&MinerSet::new(), NOW + 4);
        assert_eq!(cancels(&fx, "d1").len(), 2);
    }

    /// A MicroMiner on site x with economics: 1 MH/s devices at 5 W (unless measured),
    /// a network of difficulty 1 and a block worth `block_value` at 0.12 per kWh.
    fn paying_miner(block_value: f64) -> MicroMiner {
        let text = format!(
            "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {{name: a}}\nspec:\n  selector: {{matchLabels: {{site: x}}}}\n  workSource: {{builtin: {{networkDifficulty: 1e12}}}}\n  economics:\n    energyPricePerKWh: 0.12\n    coinPrice: {block_value}\n    blockReward: 1\n    networkDifficulty: 1\n    deviceWattsByClass: {{gateway: 8}}\n"
        );
        micromine_resources::microminer::parse_str("test.yaml", &text)
            .expect("valid")
            .remove(0)
    }

    fn condition(s: &mut FleetState, now: i64, type_: &str) -> (String, String) {
        let (miners, _) = s.view(now, &|_| Totals::default());
        let c = miners[0]
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("a {type_} condition"))
            .clone();
        (c.status, c.reason)
    }

    #[test]
    fn an_unprofitable_miner_with_pause_when_unprofitable_takes_its_work_back() {
        let paying = |value: f64| {
            let mut m = paying_miner(value);
            if let Some(e) = m.spec.economics.as_mut() {
                e.pause_when_unprofitable = true;
            }
            m
        };
        let mut s = FleetState::new(Restored::default());
        s.apply_miners(&set(&[paying(1.0)]), NOW);
        let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
        let held: Vec<u64> = assignments(&fx, "d1").iter().map(|a| a.id).collect();
        assert!(s.tick(NOW).messages.is_empty());

        s.apply_miners(&set(&[paying(0.0001)]), NOW + 1000);
        let fx = s.tick(NOW + 1000);
        assert_eq!(cancels(&fx, "d1"), held, "its work is taken back");
        assert!(
            assignments(&s.tick(NOW + 2000), "d1").is_empty(),
            "and none handed out"
        );
        assert_eq!(
            condition(&mut s, NOW + 2000, "Paused"),
            ("True".into(), "Unprofitable".into())
        );
        assert_eq!(condition(&mut s, NOW + 2000, "Ready").1, "Unprofitable");
        assert_eq!(condition(&mut s, NOW + 2000, "Profitable").0, "False");

        s.apply_miners(&set(&[paying(1.0)]), NOW + 3000);
        assert_eq!(
            assignments(&s.tick(NOW + 3000), "d1").len(),
            LEASES_PER_DEVICE,
            "it pays again: work resumes"
        );
        assert_eq!(
            condition(&mut s, NOW + 3000, "Paused"),
            ("False".into(), "Running".into())
        );
    }

    fn profitable_condition(s: &mut FleetState, now: i64) -> (String, String, String) {
        let (miners, _) = s.view(now, &|_| Totals::default());
        let c = miners[0]
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Profitable")
            .expect("a Profitable condition")
            .clone();
        (c.status, c.reason, c.message)
    }

    #[test]
    fn economics_account_energy_and_judge_profitability_with_a_margin() {
        // 1 MH/s on difficulty 1: 3600e6 / 2^32 = 0.8381903 blocks an hour.
        // 5 W at 0.12 per kWh cost 0.0006 an hour, so a block must be worth more than
        // 0.0006 / 0.8381903 = 0.000715828 for the device to pay.
        let mut s = FleetState::new(Restored::default());
        s.apply_miners(&set(&[paying_miner(1.0)]), NOW);
        let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
        assert_eq!(assignments(&fx, "d1").len(), LEASES_PER_DEVICE);
        s.tick(NOW);
        let (status, reason, message) = profitable_condition(&mut s, NOW);
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("True", "RevenueCoversEnergy")
        );
        assert!(message.contains("5.0 W"), "{message}");

        // Two seconds of 5 W while holding work: 10 J.
        s.tick(NOW + 1000);
        s.tick(NOW + 2000);
        let (miners, _) = s.view(NOW + 2000, &|_| Totals::default());
        let economics = miners[0]
            .status
            .economics
            .clone()
            .expect("economics status");
        assert_eq!(economics.power_watts, 5.0);
        assert!(
            (economics.energy_k_wh - 10.0 / 3.6e6).abs() < 1e-15,
            "{economics:?}"
        );
        assert!((economics.cost_per_hour - 0.0006).abs() < 1e-12);
        // A long stall is not counted as drawn power.
        s.tick(NOW + 3_600_000);
        let (miners, _) = s.view(NOW + 3_600_000, &|_| Totals::default());
        let stalled = miners[0]
            .status
            .economics
            .clone()
            .expect("economics status");
        assert!(
            stalled.energy_k_wh * 3.6e6 <= 10.0 + 5.0 * 10.0 + 1e-9,
            "{stalled:?}"
        );

        // The coin falls: energy costs more than the work is worth.
        let t = NOW + 3_601_000;
        s.apply_miners(&set(&[paying_miner(0.0007)]), t);
        s.tick(t);
        assert_eq!(profitable_condition(&mut s, t).1, "EnergyCostsMore");
        // Just above break-even is not enough to turn back on (margin 5 %)...
        s.apply_miners(&set(&[paying_miner(0.00073)]), t + 1000);
        s.tick(t + 1000);
        assert_eq!(profitable_condition(&mut s, t + 1000).0, "False");
        // ...clearly above is.
        s.apply_miners(&set(&[paying_miner(0.00076)]), t + 2000);
        s.tick(t + 2000);
        assert_eq!(profitable_condition(&mut s, t + 2000).0, "True");
    }

    #[test]
    fn energy_totals_are_persisted_and_restored() {
        let mut s = FleetState::new(Restored::default());
        s.apply_miners(&set(&[paying_miner(1.0)]), NOW);
        s.connect("d1", &hello("x", vec![]), NOW);
        let saved = |fx: &Effects| {
            fx.persist.iter().find_map(|op| match op {
                PersistOp::Energy(joules) => Some(joules.clone()),
                _ => None,
            })
        };
        assert!(saved(&s.tick(NOW)).is_some(), "the first tick saves");
        let mut last = None;
        for step in 1..=70 {
            if let Some(joules) = saved(&s.tick(NOW + step * 1000)) {
                last = Some((step, joules));
            }
        }
        let (step, joules) = last.expect("saved again within a minute");
        assert_eq!(step, 60);
        assert_eq!(joules["default/a"], 5.0 * 60.0);
        let mut restored = FleetState::new(Restored {
            energy_joules: joules,
            ..Restored::default()
        });
        restored.apply_miners(&set(&[paying_miner(1.0)]), NOW);
        let (miners, _) = restored.view(NOW, &|_| Totals::default());
        let economics = miners[0].status.economics.clone().expect("economics");
        assert!((economics.energy_k_wh * 3.6e6 - 300.0).abs() < 1e-9);
    }

    #[test]
    fn a_device_its_limits_stop_gets_no_new_work_until_it_can_hash() {
        let mut s = FleetState::new(Restored::default());
        s.apply_miners(&set(&[miner("a", "x", 1.0, false)]), NOW);
        let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
        let held = assignments(&fx, "d1");
        let report = |state: &str| pb::CapacityReport {
            hashrate: 0.0,
            state: state.into(),
            ..Default::default()
        };
        s.report("d1", &report("paused:battery"), NOW + 1);
        // Its leases run out; nothing replaces them while it is paused.
        let later = NOW + 10 * 60_000;
        for id in held.iter().map(|a| a.id) {
            s.progress(
                "d1",
                &pb::Progress {
                    assignment_id: id,
                    scanned_until: 0,
                    hashes: 0,
                    finished: true,
                },
                later,
            );
        }
        assert!(assignments(&s.tick(later), "d1").is_empty());
        let (miners, devices) = s.view(later, &|_| Totals::default());
        assert_eq!(devices[0].state, "paused:battery");
        assert_eq!(miners[0].status.devices.throttled, 1);
        // A thermal throttle still hashes (at half speed): it keeps getting work.
        s.report("d1", &report("throttled:thermal"), later + 1);
        assert_eq!(
            assignments(&s.tick(later + 2), "d1").len(),
            LEASES_PER_DEVICE
        );
        s.report("d1", &report("outside-window"), later + 3);
        let (_, devices) = s.view(later + 3, &|_| Totals::default());
        assert_eq!(devices[0].state, "outside-window");
    }

    #[test]
    fn a_stopping_device_hands_its_ranges_back_and_gets_none_in_their_place() {
        let mut s = FleetState::new(Restored::default());
        s.apply_miners(&set(&[miner("a", "x", 1.0, false)]), NOW);
        let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
        let held = assignments(&fx, "d1");
        assert_eq!(held.len(), LEASES_PER_DEVICE);
        s.report(
            "d1",
            &pb::CapacityReport {
                state: "stopping".into(),
                ..Default::default()
            },
            NOW + 1,
        );
        for id in held.iter().map(|a| a.id) {
            let fx = s.progress(
                "d1",
                &pb::Progress {
                    assignment_id: id,
                    scanned_until: 0,
                    hashes: 0,
                    finished: true,
                },
                NOW + 2,
            );
            assert!(assignments(&fx, "d1").is_empty(), "no range in its place");
        }
        assert!(assignments(&s.tick(NOW + 3), "d1").is_empty());
        assert_eq!(
            s.scheduler.lease_count("d1"),
            0,
            "nothing left leased to it"
        );
    }

    #[test]
    fn a_found_block_makes_older_work_stale() {
        let mut s = FleetState::new(Restored::default());
        // Difficulty so low that every hash meets the network target.
        s.apply_miners(&set(&[miner("a", "x", 1e-12, false)]), NOW);
        let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
        let given = assignments(&fx, "d1");
        let first = &given[0];
        let share = pb::Share {
            assignment_id: first.id,
            nonce: first.nonce_start as u32,
            resubmitted: false,
        };
        let ShareCheck::Verify { header, .. } =
            s.check_shares("d1", std::slice::from_ref(&share)).remove(0)
        else {
            panic!("a live lease's share is verified")
        };
        let hash = sha256d(&header_with_nonce(&header.prefix, share.nonce));
        assert!(header.network_target().is_met_by(&hash));
        let fx = s.shares_recorded(
            "d1",
            &[RecordedShare {
                assignment_id: share.assignment_id,
                nonce: share.nonce,
                miner: "default/a".into(),
                difficulty: 1e-9,
                header: header.clone(),
                block_hash: Some(hash),
            }],
            NOW + 10,
        );
        let cancelled = cancels(&fx, "d1");
        assert_eq!(
            cancelled.len(),
            2,
            "every lease on the old tip is cancelled"
        );
        let fresh = assignments(&fx, "d1");
        assert_eq!(fresh.len(), 2);
        assert_ne!(fresh[0].header_prefix, first.header_prefix);
        // The new header builds on the block just found.
        assert_eq!(&fresh[0].header_prefix[4..36], &hash[..]);
        match s.check_shares("d1", &[share]).remove(0) {
            ShareCheck::Reject { reason, .. } => assert_eq!(reason, RejectReason::Stale),
            other => panic!("expected stale, got {other:?}"),
        }
    }

    #[test]
    fn a_reconnecting_device_keeps_what_it_resumes_and_loses_the_rest() {
        let mut s = FleetState::new(Restored::default());
        s.apply_miners(&set(&[miner("a", "x", 1.0, false)]), NOW);
        let (first_session, fx) = s.connect("d1", &hello("x", vec![]), NOW);
        let given = assignments(&fx, "d1");
        s.disconnect("d1", first_session, NOW + 1);
        assert!(
            s.tick(NOW + 2).messages.is_empty(),
            "a disconnected device keeps its leases quietly"
        );
        let resume = vec![pb::ResumedAssignment {
            assignment_id: given[0].id,
            scanned_until: given[0].nonce_start + 5,
        }];
        let (_, fx) = s.connect("d1", &hello("x", resume), NOW + 3);
        let Some(Kind::Welcome(welcome)) = &fx.messages[0].1.kind else {
            panic!("welcome first")
        };
        assert_eq!(welcome.resumed_assignment_ids, vec![given[0].id]);
        let lease = |id: u64| s.leases().into_iter().find(|l| l.id == id);
        assert!(
            lease(given[1].id).is_none(),
            "the forgotten lease was reclaimed"
        );
        assert_eq!(
            lease(given[0].id).map(|l| l.scanned_until),
            Some(given[0].nonce_start + 5)
        );
        // It is topped up to two again, starting with the reclaimed range.
        let topped = assignments(&fx, "d1");
        assert_eq!(topped.len(), 1);
        assert_eq!(topped[0].nonce_start, given[1].nonce_start);
    }

    #[test]
    fn an_unschedulable_device_gives_its_work_back_and_gets_none_until_uncordoned() {
        let mut s = FleetState::new(Restored::default());
        s.apply_miners(&set(&[miner("a", "north", 1.0, false)]), NOW);
        // Cordoned before it ever connected: the API server may say so first.
        s.set_unschedulable("d2", true, NOW);
        let (_, fx) = s.connect("d2", &hello("north", vec![]), NOW);
        assert!(assignments(&fx, "d2").is_empty());

        let (_, fx) = s.connect("d1", &hello("north", vec![]), NOW);
        let given: Vec<u64> = assignments(&fx, "d1").iter().map(|a| a.id).collect();
        assert_eq!(given.len(), LEASES_PER_DEVICE);

        let fx = s.set_unschedulable("d1", true, NOW + 1);
        let mut cancelled = cancels(&fx, "d1");
        cancelled.sort_unstable();
        assert_eq!(cancelled, given);
        assert!(s.leases().is_empty());
        assert!(
            s.tick(NOW + 2).messages.is_empty(),
            "nothing handed out on tick"
        );
        let (_, devices) = s.view(NOW + 2, &|_| Totals::default());
        let d1 = devices
            .iter()
            .find(|d| d.name == "d1")
            .expect("d1 in the view");
        assert_eq!(
            (d1.state.as_str(), d1.unschedulable),
            ("unschedulable", true)
        );
        assert!(
            s.set_unschedulable("d1", true, NOW + 3).is_empty(),
            "idempotent"
        );

        let fx = s.set_unschedulable("d1", false, NOW + 4);
        assert_eq!(assignments(&fx, "d1").len(), LEASES_PER_DEVICE);
    }

    #[test]
    fn relabelling_moves_a_device_between_miners() {
        let mut s = FleetState::new(Restored::default());
        s.apply_miners(
            &set(&[
                miner("a", "north", 1.0, false),
                miner("b", "south", 1.0, false),
            ]),
            NOW,
        );
        let (_, fx) = s.connect("d1", &hello("north", vec![]), NOW);
        assert!(
            assignments(&fx, "d1")
                .iter()
                .all(|a| a.miner == "default/a")
        );
        let (_, fx) = s.connect("d1", &hello("south", vec![]), NOW + 1);
        assert!(
            assignments(&fx, "d1")
                .iter()
                .all(|a| a.miner == "default/b")
        );
        let shares_of_old: Vec<Lease> = s
            .leases()
            .into_iter()
            .filter(|l| l.device == "d1")
            .collect();
        assert_eq!(shares_of_old.len(), 2);
    }

    #[test]
    fn leases_expire_and_their_remainder_goes_to_the_next_device() {
        let mut s = FleetState::new(Restored::default());
        s.apply_miners(&set(&[miner("a", "x", 1e12, false)]), NOW);
        let (session, fx) = s.connect("d1", &hello("x", vec![]), NOW);
        let given = assignments(&fx, "d1");
        s.progress(
            "d1",
            &pb::Progress {
                assignment_id: given[0].id,
                scanned_until: given[0].nonce_start + 1000,
                hashes: 1000,
                finished: false,
            },
            NOW + 1,
        );
        s.disconnect("d1", session, NOW + 2);
        let (_, fx) = s.connect("d2", &hello("x", vec![]), NOW + 3);
        // While d1's leases live, d2 gets fresh nonces only.
        for a in assignments(&fx, "d2") {
            assert!(a.nonce_start >= given[1].nonce_end);
        }
        let fx = s.tick(NOW + i64::from(given[0].lease_ms) + LINK_SLACK_MS + 10);
        let deletes = fx
            .persist
            .iter()
            .filter(|op| matches!(op, PersistOp::DeleteLease(_)))
            .count();
        assert_eq!(
            deletes, 4,
            "d1's two leases and d2's two (same lease time) expired"
        );
        // d2 is topped up from the reclaimed ranges first: d1's first range from where d1
        // had got to.
        let next = assignments(&fx, "d2");
        assert_eq!(next.len(), 2);
        assert_eq!(next[0].nonce_start, given[0].nonce_start + 1000);
        assert_eq!(next[0].header_prefix, given[0].header_prefix);
    }

    #[test]
    fn a_recorded_share_moves_the_reclaimed_remainder_past_it() {
        let mut s = FleetState::new(Restored::default());
        s.apply_miners(&set(&[miner("a", "x", 1e12, false)]), NOW);
        let (session, fx) = s.connect("d1", &hello("x", vec![]), NOW);
        let given = assignments(&fx, "d1");
        let start = given[0].nonce_start;
        // Reported: 1,000 nonces. A share at 5,000 arrives before the next report.
        s.progress(
            "d1",
            &pb::Progress {
                assignment_id: given[0].id,
                scanned_until: start + 1000,
                hashes: 1000,
                finished: false,
            },
            NOW + 1,
        );
        let share = pb::Share {
            assignment_id: given[0].id,
            nonce: (start + 5000) as u32,
            resubmitted: false,
        };
        let ShareCheck::Verify { header, .. } =
            s.check_shares("d1", std::slice::from_ref(&share)).remove(0)
        else {
            panic!("a live lease's share is checked")
        };
        s.shares_recorded(
            "d1",
            &[RecordedShare {
                assignment_id: share.assignment_id,
                nonce: share.nonce,
                miner: "default/a".into(),
                difficulty: 1e-9,
                header,
                block_hash: None,
            }],
            NOW + 2,
        );
        // The device vanishes; whoever gets the remainder starts after the share.
        s.disconnect("d1", session, NOW + 3);
        s.connect("d2", &hello("x", vec![]), NOW + 4);
        let fx = s.tick(NOW + i64::from(given[0].lease_ms) + LINK_SLACK_MS + 10);
        let next = assignments(&fx, "d2");
        assert_eq!(next[0].header_prefix, given[0].header_prefix);
        assert_eq!(next[0].nonce_start, start + 5001);
    }

    #[test]
    fn the_prune_floor_keeps_every_header_a_share_may_still_name() {
        let mut s = FleetState::new(Restored::default());
        assert_eq!(
            s.oldest_live_header(),
            1,
            "nothing issued: everything below the next id"
        );
        s.apply_miners(&set(&[miner("a", "x", 1e-12, false)]), NOW);
        let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
        let first = assignments(&fx, "d1").remove(0);
        let ShareCheck::Verify { header, .. } = s
            .check_shares(
                "d1",
                &[pb::Share {
                    assignment_id: first.id,
                    nonce: first.nonce_start as u32,
                    resubmitted: false,
                }],
            )
            .remove(0)
        else {
            panic!("verified")
        };
        assert_eq!(s.oldest_live_header(), header.id);
        // A block retires the header; it stays the floor only while an ended lease names it.
        let hash = sha256d(&header_with_nonce(&header.prefix, first.nonce_start as u32));
        s.shares_recorded(
            "d1",
            &[RecordedShare {
                assignment_id: first.id,
                nonce: first.nonce_start as u32,
                miner: "default/a".into(),
                difficulty: 1.0,
                header: header.clone(),
                block_hash: Some(hash),
            }],
            NOW,
        );
        assert!(
            s.oldest_live_header() > header.id,
            "retired with its leases cancelled, not ended"
        );
    }
}
