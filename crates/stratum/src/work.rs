//! The fleet's side of a pool: the current job, the pool session it belongs to, and one
//! header per allocation.
//!
//! Every header gets its own `extranonce2` (and, where the pool allows version rolling,
//! its own version bits before the next `extranonce2`), so every header is a fresh 2^32
//! nonce space that no other device is given. A header belongs to an *epoch*: the fleet's
//! job number. A new epoch starts when the pool says `clean_jobs`, and when the pool
//! session changes (a reconnect the pool did not resume, another pool, a new extranonce1),
//! because then nothing mined on older headers can be submitted any more; shares on
//! headers of an older epoch are stale.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use micromine_proto::work::{HEADER_PREFIX_LEN, Target};
use serde::{Deserialize, Serialize};

use super::client::{ResumeHint, UpstreamEvent};
use super::job::{PoolJob, rolled_version, version_bits};
use micromine_work::scheduler::HeaderId;
use micromine_work::worksource::{UpstreamWork, WorkHeader};

/// The difficulty a pool assumes before its first `mining.set_difficulty`.
const DEFAULT_POOL_DIFFICULTY: f64 = 1.0;
/// Jobs whose allocation counters are remembered (see [`StratumWork::allocated`]).
const REMEMBERED_JOBS: usize = 64;

/// What makes a header unique at the pool besides its extranonce2 and version: the pool,
/// the session's extranonce1 and the job.
type JobKey = (String, Vec<u8>, String);

/// The pool session headers are built for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    number: u64,
    extranonce1: Vec<u8>,
    extranonce2_size: usize,
    version_mask: Option<u32>,
    /// The pool's subscription id, to resume the session with.
    subscription: Option<String>,
}

/// A MicroMiner's pool work as the store keeps it, so the next controller process (after
/// a restart or a leader change) can resume the same pool session: devices keep the work
/// they hold, and its shares can still be submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolSessionRecord {
    /// The pool's URL.
    pub pool: String,
    /// Its place in the MicroMiner's list (0: primary).
    pub pool_index: usize,
    /// The session's number ([`super::client::session_key`]).
    pub session: u64,
    /// The pool's subscription id.
    pub subscription: Option<String>,
    /// Hex.
    pub extranonce1: String,
    /// Bytes of extranonce2.
    pub extranonce2_size: usize,
    /// Version bits that may be rolled.
    pub version_mask: Option<u32>,
    /// The fleet job number headers of this work carry.
    pub epoch: u64,
    /// The pool's share difficulty.
    pub difficulty: f64,
    /// The job headers are built from, as `mining.notify` params.
    pub job: Option<serde_json::Value>,
    /// Headers built per (pool, extranonce1 hex, job id).
    pub allocated: Vec<(String, String, String, u64)>,
}

/// How the work changed after an upstream event, so the fleet knows what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Every earlier header is stale: cancel what devices hold, then hand out new work.
    NewEpoch(&'static str),
    /// New headers come from newer work; what devices hold stays valid.
    NewWork,
    /// The pool difficulty changed: device share targets may need to follow.
    Difficulty,
    /// Nothing that affects devices.
    Nothing,
}

/// The pool connection as status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Connection {
    /// `Connected`, `Connecting` (never connected yet) or `Disconnected`.
    pub state: &'static str,
    /// The pool in use (or last tried).
    pub url: Option<String>,
    /// 0 for the primary pool, then the failover pools in order.
    pub pool_index: usize,
    /// The pool's share difficulty.
    pub difficulty: f64,
    /// Why the last connection ended or failed.
    pub last_error: Option<String>,
    /// The job headers are built from.
    pub job: Option<String>,
}

/// A MicroMiner's pool work.
#[derive(Debug, Clone)]
pub struct StratumWork {
    miner: String,
    epoch: u64,
    session: Option<Session>,
    template: Option<Arc<PoolJob>>,
    /// Headers built so far per pool, extranonce1 and job. Kept across sessions because a
    /// pool that resumes a session (after a reconnect, or when the controller comes back
    /// from a failover pool) has the same extranonce1 and often the same job: starting
    /// its extranonce2 over would hand devices work already done and submitted.
    allocated: HashMap<JobKey, u64>,
    allocated_order: VecDeque<JobKey>,
    difficulty: f64,
    connected: bool,
    ever_connected: bool,
    pool: Option<String>,
    pool_index: usize,
    last_error: Option<String>,
    exhausted_logged: bool,
}

impl StratumWork {
    /// No pool yet; headers come once a session and a job are there.
    pub fn new(miner: &str, epoch: u64) -> StratumWork {
        StratumWork {
            miner: miner.to_string(),
            epoch,
            session: None,
            template: None,
            allocated: HashMap::new(),
            allocated_order: VecDeque::new(),
            difficulty: DEFAULT_POOL_DIFFICULTY,
            connected: false,
            ever_connected: false,
            pool: None,
            pool_index: 0,
            last_error: None,
            exhausted_logged: false,
        }
    }

    /// The current epoch: headers of other epochs are stale.
    pub fn job(&self) -> u64 {
        self.epoch
    }

    /// The pool's current share difficulty.
    pub fn difficulty(&self) -> f64 {
        self.difficulty
    }

    /// The network difficulty of the current job, when there is one.
    pub fn network_difficulty(&self) -> Option<f64> {
        let job = self.template.as_ref()?;
        Target::from_compact(job.bits).ok().map(Target::difficulty)
    }

    /// The target a share of a header credited at `header_difficulty` must meet to be
    /// submitted: the easier of the header's and the current pool difficulty (pools
    /// accept the difficulty a job was sent with, and a lowered one at once).
    pub fn submit_target(&self, header_difficulty: f64) -> Target {
        Target::from_difficulty(header_difficulty.min(self.difficulty)).unwrap_or(Target::MAX)
    }

    /// What status shows about the connection.
    pub fn status(&self) -> Connection {
        Connection {
            state: if self.connected {
                "Connected"
            } else if self.ever_connected || self.last_error.is_some() {
                "Disconnected"
            } else {
                "Connecting"
            },
            url: self.pool.clone(),
            pool_index: self.pool_index,
            difficulty: self.difficulty,
            last_error: self.last_error.clone(),
            job: self.template.as_ref().map(|j| j.id.clone()),
        }
    }

    /// Applies an upstream event. `new_epoch` hands out a fresh fleet job number.
    pub fn apply(&mut self, event: UpstreamEvent, new_epoch: impl FnOnce() -> u64) -> Change {
        match event {
            UpstreamEvent::Connected {
                session,
                session_id,
                pool,
                pool_index,
                extranonce1,
                extranonce2_size,
                version_mask,
            } => {
                self.connected = true;
                self.ever_connected = true;
                self.pool = Some(pool);
                self.pool_index = pool_index;
                self.last_error = None;
                let resumed = self.session.as_ref().is_some_and(|s| s.number == session);
                self.session = Some(Session {
                    number: session,
                    extranonce1,
                    extranonce2_size,
                    version_mask,
                    subscription: session_id,
                });
                if resumed {
                    return Change::NewWork;
                }
                // The pool sends the job for the new session next.
                self.template = None;
                self.difficulty = DEFAULT_POOL_DIFFICULTY;
                self.epoch = new_epoch();
                Change::NewEpoch("pool session changed")
            }
            UpstreamEvent::Job(job) => {
                let clean = job.clean;
                // Pools send their current job again after a reconnect: nothing changed.
                if self.template.as_ref().is_some_and(|t| {
                    PoolJob {
                        clean,
                        ..(**t).clone()
                    } == job
                }) {
                    return Change::Nothing;
                }
                self.template = Some(Arc::new(job));
                self.exhausted_logged = false;
                if clean {
                    self.epoch = new_epoch();
                    Change::NewEpoch("pool: clean_jobs")
                } else {
                    Change::NewWork
                }
            }
            UpstreamEvent::Difficulty(difficulty) => {
                if difficulty == self.difficulty {
                    return Change::Nothing;
                }
                self.difficulty = difficulty;
                Change::Difficulty
            }
            UpstreamEvent::Extranonce {
                session,
                extranonce1,
                extranonce2_size,
            } => {
                if let Some(current) = self.session.as_mut() {
                    current.number = session;
                    current.extranonce1 = extranonce1;
                    current.extranonce2_size = extranonce2_size;
                }
                self.epoch = new_epoch();
                Change::NewEpoch("pool changed the extranonce")
            }
            UpstreamEvent::VersionMask(mask) => {
                if let Some(current) = self.session.as_mut() {
                    current.version_mask = Some(mask);
                }
                Change::NewWork
            }
            UpstreamEvent::Disconnected { error } => {
                self.connected = false;
                self.last_error = Some(error);
                Change::Nothing
            }
        }
    }

    /// What the store keeps, once there has been a session.
    pub fn record(&self) -> Option<PoolSessionRecord> {
        let session = self.session.as_ref()?;
        Some(PoolSessionRecord {
            pool: self.pool.clone().unwrap_or_default(),
            pool_index: self.pool_index,
            session: session.number,
            subscription: session.subscription.clone(),
            extranonce1: hex::encode(&session.extranonce1),
            extranonce2_size: session.extranonce2_size,
            version_mask: session.version_mask,
            epoch: self.epoch,
            difficulty: self.difficulty,
            job: self.template.as_ref().map(|job| job.to_params()),
            allocated: self
                .allocated_order
                .iter()
                .filter_map(|key| {
                    let n = self.allocated.get(key)?;
                    Some((key.0.clone(), hex::encode(&key.1), key.2.clone(), *n))
                })
                .collect(),
        })
    }

    /// The work the previous process kept, waiting to be resumed: nothing new is handed
    /// out until the pool connects, and work on its headers stays current if the pool
    /// resumes the session. A record that does not read back gives fresh work.
    pub fn restore(miner: &str, record: &PoolSessionRecord) -> Option<StratumWork> {
        let extranonce1 = hex::decode(&record.extranonce1).ok()?;
        let template = match &record.job {
            Some(params) => Some(Arc::new(PoolJob::from_params(params).ok()?)),
            None => None,
        };
        let mut work = StratumWork::new(miner, record.epoch);
        work.session = Some(Session {
            number: record.session,
            extranonce1,
            extranonce2_size: record.extranonce2_size,
            version_mask: record.version_mask,
            subscription: record.subscription.clone(),
        });
        work.template = template;
        work.difficulty = record.difficulty;
        work.pool = Some(record.pool.clone());
        work.pool_index = record.pool_index;
        work.ever_connected = true;
        work.last_error = Some("controller restarted; resuming the pool session".into());
        for (pool, extranonce1, job, n) in &record.allocated {
            let key: JobKey = (pool.clone(), hex::decode(extranonce1).ok()?, job.clone());
            work.allocated_order.push_back(key.clone());
            work.allocated.insert(key, *n);
        }
        Some(work)
    }

    /// The session to ask the pool to resume, if there is one.
    pub fn resume_hint(&self) -> Option<ResumeHint> {
        let session = self.session.as_ref()?;
        Some(ResumeHint {
            pool_index: self.pool_index,
            session_id: session.subscription.clone()?,
            session: session.number,
        })
    }

    /// The next header, or `None` while there is no connection or job, or when the job's
    /// extranonce2 space is used up (until the pool's next job).
    pub fn next_header(&mut self, id: HeaderId) -> Option<WorkHeader> {
        if !self.connected {
            return None;
        }
        let session = self.session.as_ref()?;
        let job = self.template.as_ref()?;
        let key: JobKey = (
            self.pool.clone().unwrap_or_default(),
            session.extranonce1.clone(),
            job.id.clone(),
        );
        let n = self.allocated.get(&key).copied().unwrap_or(0);
        let mask = session.version_mask.unwrap_or(0);
        let roll_bits = mask.count_ones();
        let rolls = n & ((1u64 << roll_bits) - 1);
        let counter = n >> roll_bits;
        let size = session.extranonce2_size;
        if size < 8 && counter >> (8 * size) != 0 {
            if !self.exhausted_logged {
                self.exhausted_logged = true;
                tracing::warn!(miner = %self.miner, job = %job.id, extranonce2_size = size,
                    "every extranonce2 of this job is handed out; waiting for the pool's next job");
            }
            return None;
        }
        let version = rolled_version(job.version, mask, rolls)?;
        let extranonce2: Vec<u8> = counter
            .to_le_bytes()
            .into_iter()
            .chain(std::iter::repeat(0))
            .take(size)
            .collect();
        let header = job.header(&session.extranonce1, &extranonce2, version);
        if !self.allocated.contains_key(&key) {
            if self.allocated_order.len() >= REMEMBERED_JOBS
                && let Some(oldest) = self.allocated_order.pop_front()
            {
                self.allocated.remove(&oldest);
            }
            self.allocated_order.push_back(key.clone());
        }
        *self.allocated.entry(key).or_default() += 1;
        let prefix: [u8; HEADER_PREFIX_LEN] = header.prefix();
        Some(WorkHeader {
            id,
            miner: self.miner.clone(),
            job: self.epoch,
            prefix,
            network_bits: job.bits,
            upstream: Some(UpstreamWork {
                session: session.number,
                job_id: job.id.clone(),
                extranonce2: hex::encode(&extranonce2),
                ntime: job.time,
                version_bits: session
                    .version_mask
                    .map(|_| version_bits(job.version, version)),
                difficulty: self.difficulty,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use micromine_proto::work::{BlockHeader, header_with_nonce};

    fn job(id: &str, clean: bool) -> PoolJob {
        PoolJob {
            id: id.into(),
            prev_hash: [7; 32],
            coinb1: vec![1, 2, 3],
            coinb2: vec![4, 5],
            branch: vec![[9; 32]],
            version: 0x2000_0000,
            bits: 0x1d00_ffff,
            time: 1_700_000_000,
            clean,
        }
    }

    fn connected(session: u64, size: usize, mask: Option<u32>) -> UpstreamEvent {
        UpstreamEvent::Connected {
            session,
            session_id: Some(format!("sub-{session}")),
            pool: "stratum+tcp://pool:3333".into(),
            pool_index: 0,
            extranonce1: vec![0xaa, 0xbb],
            extranonce2_size: size,
            version_mask: mask,
        }
    }

    fn epochs() -> impl FnMut() -> u64 {
        let mut next = 100;
        move || {
            next += 1;
            next
        }
    }

    #[test]
    fn headers_come_only_with_a_session_and_a_job_and_never_repeat() {
        let mut next_epoch = epochs();
        let mut work = StratumWork::new("ns/a", 1);
        assert_eq!(work.status().state, "Connecting");
        assert!(work.next_header(1).is_none());
        assert_eq!(
            work.apply(connected(1, 2, None), &mut next_epoch),
            Change::NewEpoch("pool session changed")
        );
        assert!(work.next_header(1).is_none(), "no job yet");
        assert_eq!(
            work.apply(UpstreamEvent::Job(job("j1", true)), &mut next_epoch),
            Change::NewEpoch("pool: clean_jobs")
        );
        let mut prefixes = std::collections::HashSet::new();
        for id in 0..(1u64 << 16) {
            let header = work
                .next_header(id)
                .expect("room for 2^16 extranonce2 values");
            assert!(prefixes.insert(header.prefix));
            let upstream = header.upstream.expect("pool work");
            assert_eq!(upstream.extranonce2.len(), 4);
            assert_eq!(upstream.version_bits, None);
        }
        assert!(
            work.next_header(99).is_none(),
            "a 2-byte extranonce2 is used up"
        );
        // The pool's next job opens a new space without making the old work stale.
        let epoch = work.job();
        assert_eq!(
            work.apply(UpstreamEvent::Job(job("j2", false)), &mut next_epoch),
            Change::NewWork
        );
        assert_eq!(work.job(), epoch);
        assert_eq!(
            work.next_header(1)
                .expect("new job")
                .upstream
                .expect("pool")
                .job_id,
            "j2"
        );
        assert_eq!(work.status().state, "Connected");
        work.apply(
            UpstreamEvent::Disconnected {
                error: "gone".into(),
            },
            &mut next_epoch,
        );
        assert!(work.next_header(2).is_none());
        assert_eq!(work.status().state, "Disconnected");
        assert_eq!(work.status().last_error.as_deref(), Some("gone"));
    }

    #[test]
    fn work_already_handed_out_is_never_handed_out_again() {
        let mut next_epoch = epochs();
        let mut work = StratumWork::new("ns/a", 1);
        work.apply(connected(1, 4, None), &mut next_epoch);
        work.apply(UpstreamEvent::Job(job("j", true)), &mut next_epoch);
        let mut seen = std::collections::HashSet::new();
        for id in 0..10 {
            assert!(seen.insert(work.next_header(id).expect("header").prefix));
        }
        // A resumed session, and the pool sends its current job again (clean, as on
        // every authorize): nothing changes.
        work.apply(
            UpstreamEvent::Disconnected {
                error: "blip".into(),
            },
            &mut next_epoch,
        );
        work.apply(connected(1, 4, None), &mut next_epoch);
        let epoch = work.job();
        assert_eq!(
            work.apply(UpstreamEvent::Job(job("j", true)), &mut next_epoch),
            Change::Nothing
        );
        assert_eq!(work.job(), epoch);
        for id in 10..20 {
            assert!(seen.insert(work.next_header(id).expect("header").prefix));
        }
        // Away to another session and back to one with the same extranonce1 (a pool that
        // resumed it after a failover): the job's counter carries on.
        work.apply(connected(2, 4, None), &mut next_epoch);
        work.apply(UpstreamEvent::Job(job("j", true)), &mut next_epoch);
        for id in 20..30 {
            assert!(seen.insert(work.next_header(id).expect("header").prefix));
        }
    }

    #[test]
    fn a_stored_session_restores_and_resumes_where_it_stopped() {
        let mut next_epoch = epochs();
        let mut work = StratumWork::new("ns/a", 1);
        assert_eq!(work.record(), None, "nothing to keep before a session");
        work.apply(connected(5, 4, Some(0x6000)), &mut next_epoch);
        work.apply(UpstreamEvent::Job(job("j", true)), &mut next_epoch);
        work.apply(UpstreamEvent::Difficulty(3.0), &mut next_epoch);
        for id in 0..5 {
            work.next_header(id).expect("header");
        }
        let record = work.record().expect("a session");
        let json = serde_json::to_string(&record).expect("serialises");
        let back: PoolSessionRecord = serde_json::from_str(&json).expect("parses");
        let mut restored = StratumWork::restore("ns/a", &back).expect("restores");
        assert_eq!(restored.job(), work.job());
        assert_eq!(restored.difficulty(), 3.0);
        assert_eq!(restored.status().state, "Disconnected");
        assert!(
            restored.next_header(9).is_none(),
            "nothing new before the pool answers"
        );
        assert_eq!(
            restored.resume_hint(),
            Some(ResumeHint {
                pool_index: 0,
                session_id: "sub-5".into(),
                session: 5
            })
        );
        // The pool resumes the session: the same work, continuing where it stopped.
        assert_eq!(
            restored.apply(connected(5, 4, Some(0x6000)), &mut next_epoch),
            Change::NewWork
        );
        assert_eq!(restored.job(), work.job());
        assert_eq!(
            restored.next_header(6).map(|h| h.prefix),
            work.next_header(6).map(|h| h.prefix)
        );
        // A record that does not read back is refused, not half-restored.
        let mut broken = back;
        broken.extranonce1 = "zz".into();
        assert!(StratumWork::restore("ns/a", &broken).is_none());
    }

    #[test]
    fn version_rolling_multiplies_each_extranonce2() {
        let mut next_epoch = epochs();
        let mut work = StratumWork::new("ns/a", 1);
        work.apply(connected(1, 1, Some(0x0000_6000)), &mut next_epoch);
        work.apply(UpstreamEvent::Job(job("j", true)), &mut next_epoch);
        let headers: Vec<WorkHeader> = (0..4 * 256)
            .map(|id| work.next_header(id).expect("room"))
            .collect();
        assert!(work.next_header(0).is_none());
        let unique: std::collections::HashSet<_> = headers.iter().map(|h| h.prefix).collect();
        assert_eq!(unique.len(), 4 * 256);
        for h in &headers {
            let upstream = h.upstream.as_ref().expect("pool");
            let bits = upstream.version_bits.expect("rolled");
            assert_eq!(bits & !0x6000, 0);
            let parsed = BlockHeader::from_bytes(&header_with_nonce(&h.prefix, 0)).expect("header");
            assert_eq!(parsed.version as u32, 0x2000_0000 ^ bits);
        }
    }

    #[test]
    fn sessions_difficulty_and_extranonce_changes() {
        let mut next_epoch = epochs();
        let mut work = StratumWork::new("ns/a", 1);
        work.apply(connected(1, 4, None), &mut next_epoch);
        work.apply(UpstreamEvent::Job(job("j", true)), &mut next_epoch);
        let before = work.next_header(1).expect("header");
        // A resumed session keeps the epoch and the job.
        work.apply(
            UpstreamEvent::Disconnected {
                error: "blip".into(),
            },
            &mut next_epoch,
        );
        assert_eq!(
            work.apply(connected(1, 4, None), &mut next_epoch),
            Change::NewWork
        );
        assert_eq!(work.job(), before.job);
        assert!(work.next_header(2).is_some());
        // A new session does not.
        assert_eq!(
            work.apply(connected(2, 4, None), &mut next_epoch),
            Change::NewEpoch("pool session changed")
        );
        assert_ne!(work.job(), before.job);
        assert!(
            work.next_header(3).is_none(),
            "waits for the new session's job"
        );
        work.apply(UpstreamEvent::Job(job("k", false)), &mut next_epoch);
        assert_eq!(
            work.next_header(3)
                .expect("header")
                .upstream
                .expect("pool")
                .session,
            2
        );
        // Difficulty: new headers carry it; submission uses the easier of the two.
        assert_eq!(
            work.apply(UpstreamEvent::Difficulty(4.0), &mut next_epoch),
            Change::Difficulty
        );
        assert_eq!(
            work.apply(UpstreamEvent::Difficulty(4.0), &mut next_epoch),
            Change::Nothing
        );
        assert_eq!(
            work.next_header(4)
                .expect("header")
                .upstream
                .expect("pool")
                .difficulty,
            4.0
        );
        assert_eq!(
            work.submit_target(1.0),
            Target::from_difficulty(1.0).expect("target")
        );
        assert_eq!(
            work.submit_target(8.0),
            Target::from_difficulty(4.0).expect("target")
        );
        let epoch = work.job();
        assert_eq!(
            work.apply(
                UpstreamEvent::Extranonce {
                    session: 3,
                    extranonce1: vec![1],
                    extranonce2_size: 4
                },
                &mut next_epoch
            ),
            Change::NewEpoch("pool changed the extranonce")
        );
        assert_ne!(work.job(), epoch);
        assert_eq!(
            work.next_header(5)
                .expect("same job, new extranonce1")
                .upstream
                .expect("pool")
                .session,
            3
        );
    }
}
