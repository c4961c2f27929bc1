//! The fleet's live state as a plain state machine: every operation takes the time as an
//! argument and returns [`Effects`] (records to persist, messages to send) instead of doing
//! I/O, so the async shell in `fleet/mod.rs` decides when things become durable and
//! visible, and the logic stays testable without sockets or disks.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use micromine_proto::pb::{self, RejectReason, controller_message::Kind};
use micromine_proto::work::Target;

use crate::honesty::HonestyWindow;
use crate::persist::{DeviceRecord, EndedLeaseRecord, FleetIds, LeaseRecord, PersistOp, Restored};
use crate::source::Source;
use crate::status::{
    DeviceFlag, DeviceReadings, DeviceView, MinerView, RateWindow, is_held_back, stops_hashing,
};
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
/// overtake a lease's end on the wire, and a reconnecting device resubmits). Ended leases
/// are persisted for as long, so a restart does not shorten it.
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

/// The fleet: devices, MicroMiners, headers and leases.
#[derive(Debug)]
pub struct FleetState {
    miners: BTreeMap<String, MinerRuntime>,
    devices: BTreeMap<String, DeviceRuntime>,
    scheduler: Scheduler,
    headers: HashMap<HeaderId, Arc<WorkHeader>>,
    lease_meta: HashMap<AssignmentId, LeaseMeta>,
    ended: HashMap<AssignmentId, EndedLease>,
    /// `ended` in the order it is forgotten (by end time).
    ended_order: VecDeque<AssignmentId>,
    /// How many ended leases name each header: a stored header is deleted only once no
    /// live or ended lease names it, so a restart can still judge late shares.
    ended_headers: HashMap<HeaderId, usize>,
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
    ///
    /// Ended leases are restored whatever their age: this has no clock. Call
    /// [`FleetState::forget_ended_leases`] with the time before judging shares, or the
    /// first [`FleetState::tick`] forgets those whose window closed while the controller
    /// was down.
    pub fn new(restored: Restored) -> FleetState {
        let mut scheduler = Scheduler::new(restored.ids.next_assignment);
        // Only headers live leases name go back into the scheduler (closed: a restarted
        // controller hands out no nonce of them again). One only ended leases name holds
        // no lease the scheduler would ever end, so it would never be dropped and would
        // hold the ledger's prune floor down for good; the ended leases keep it instead.
        let live: BTreeSet<HeaderId> = restored.leases.iter().map(|l| l.lease.header).collect();
        let all_headers: HashMap<HeaderId, Arc<WorkHeader>> = restored
            .headers
            .into_iter()
            .map(|h| (h.id, Arc::new(h)))
            .collect();
        let mut headers = HashMap::new();
        for (id, header) in &all_headers {
            if live.contains(id) {
                scheduler.add_closed_header(*id);
                headers.insert(*id, header.clone());
            }
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
        let (ended, ended_order, ended_headers) =
            restore_ended(restored.ended_leases, &scheduler, &all_headers);
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
            ended,
            ended_order,
            ended_headers,
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
}

/// The ended leases a restart brings back, oldest first, and how many name each header.
/// One whose header or target did not survive cannot be judged and is dropped; one that is
/// also live stays live only (not expected: a lease's end and its ended record are written
/// in one transaction, and ids are never reused).
fn restore_ended(
    records: Vec<EndedLeaseRecord>,
    scheduler: &Scheduler,
    headers: &HashMap<HeaderId, Arc<WorkHeader>>,
) -> (
    HashMap<AssignmentId, EndedLease>,
    VecDeque<AssignmentId>,
    HashMap<HeaderId, usize>,
) {
    let mut ended = HashMap::new();
    let mut ended_headers: HashMap<HeaderId, usize> = HashMap::new();
    for EndedLeaseRecord {
        record,
        ended_unix_ms,
    } in records
    {
        let id = record.lease.id;
        if scheduler.lease(id).is_some() {
            continue;
        }
        let (Some(target), Some(header)) = (
            Target::from_le_slice(&record.target_le),
            headers.get(&record.lease.header),
        ) else {
            tracing::warn!(
                lease = id,
                "dropping a persisted ended lease without its header or with a bad target"
            );
            continue;
        };
        *ended_headers.entry(header.id).or_default() += 1;
        ended.insert(
            id,
            EndedLease {
                meta: LeaseMeta {
                    target,
                    difficulty: record.difficulty,
                    miner: record.miner,
                },
                header: header.clone(),
                lease: record.lease,
                ended_ms: ended_unix_ms,
            },
        );
    }
    let mut order: Vec<(i64, AssignmentId)> =
        ended.values().map(|e| (e.ended_ms, e.lease.id)).collect();
    order.sort_unstable();
    let order = order.into_iter().map(|(_, id)| id).collect();
    (ended, order, ended_headers)
}

/// Which ledger totals a view asks for.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// One device.
    Device(&'a str),
    /// One MicroMiner.
    Miner(&'a str),
}

mod conditions;
mod energy;
mod leases;
mod miners;
mod sessions;
mod shares;
mod tick;
mod views;

#[cfg(test)]
mod tests;
