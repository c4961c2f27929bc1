//! The agent's life: enroll once, measure the device, then hold a session with the
//! controller for as long as it runs, reconnecting with jittered backoff and resuming
//! where it left off.
//!
//! The miner outlives sessions. While disconnected it keeps scanning the ranges it holds
//! until their leases run out (never longer), found shares wait in `pending`, and finished
//! ranges are remembered; on reconnect `Hello.resume` offers the held ranges back, and
//! every unacknowledged share is resubmitted flagged `resubmitted`, so a lost ack never
//! loses or double-counts a share.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use micromine_proto::MAX_MESSAGE_BYTES;
use micromine_proto::pb::{
    self, agent_message::Kind as AgentKind, controller_message::Kind, fleet_client::FleetClient,
};
use micromine_proto::token::BootstrapToken;
use micromine_proto::work::{HEADER_PREFIX_LEN, Target};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::bench;
use crate::calibrate;
use crate::capacity;
use crate::engine::EngineRequest;
use crate::governor::Governor;
use crate::identity::{self, DeviceIdentity, IdentityError};
use crate::miner::{FinishReason, Miner, MinerEvent, WorkOrder};
use crate::sensors::{Readings, SensorPaths, SensorSource, Sensors, SyntheticSensors};
use crate::simulated::SimulatedDevice;
use crate::tls;
use crate::traces::{AgentTelemetry, SdkSpan};
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, Status as SpanStatus};

/// Shares held unacknowledged before the oldest are dropped (a very long outage).
const MAX_PENDING_SHARES: usize = 100_000;
/// Shares are sent in batches at most this old.
const SHARE_FLUSH: Duration = Duration::from_millis(100);
/// A batch is sent as soon as it has this many shares.
const SHARE_BATCH: usize = 256;
/// The controller must answer Hello this soon.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an agent stopped while its link is down may spend on one last session to get
/// its unanswered shares answered (see [`Agent::deliver_before_exit`]).
const LAST_DELIVERY: Duration = Duration::from_secs(10);
/// The state an agent reports while it hands its work back and leaves; the controller gives
/// a device in it no new work.
const STOPPING: &str = "stopping";
/// Resubmitted shares sent at once after a reconnect; the rest are paced.
const RESUBMIT_BURST: usize = 16_384;
/// Pause between paced resubmission batches (256 shares: about 1,700 shares a second).
const RESUBMIT_PACE: Duration = Duration::from_millis(150);
/// After a failed renewal, wait this long before trying again.
const RENEW_RETRY: Duration = Duration::from_secs(60);
/// How often the local limits are checked against fresh readings: a limit takes effect
/// within a second.
const GOVERN_EVERY: Duration = Duration::from_millis(500);
/// A simulated device's synthetic sensors change slowly; thousands of devices in one
/// process each looking twice a second would cost the simulation more than it shows.
const SIMULATED_GOVERN_EVERY: Duration = Duration::from_secs(5);
/// The limits last received, kept in the state directory so they stay in force across a
/// restart while the controller is out of reach.
const LIMITS_FILE: &str = "limits.pb";

/// How to run the agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `https://host:port` of the controller.
    pub controller: String,
    /// Bootstrap token, needed only for the first start.
    pub token: Option<BootstrapToken>,
    /// Device name to enroll as (default: the host name).
    pub name: Option<String>,
    /// Labels to report.
    pub labels: BTreeMap<String, String>,
    /// Where the key, certificate and CA live.
    pub state_dir: PathBuf,
    /// A CA bundle to trust instead of the token's fingerprint.
    pub ca_file: Option<PathBuf>,
    /// Hashing threads.
    pub threads: usize,
    /// Hashing engine: named, or chosen by timing them at start.
    pub engine: EngineRequest,
    /// How long to benchmark at start to learn the nominal hash rate.
    pub bench_duration: Duration,
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Where spans go: in-band over the session unless a collector is configured.
    pub telemetry: AgentTelemetry,
    /// Where temperature, battery and CPU load are read from.
    pub sensors: SensorPaths,
    /// Set for a simulated device (`micromine-agent simulate`): it hashes on the
    /// simulation's shared threads at its own rate, reads synthetic sensors, and may drop
    /// its link now and then.
    pub simulation: Option<SimulatedDevice>,
}

impl AgentConfig {
    /// The local address to connect from: a simulated device's own, else the system's
    /// choice.
    fn local_address(&self) -> Option<std::net::IpAddr> {
        self.simulation.as_ref().and_then(|s| s.local_address)
    }
}

/// Why the agent cannot run at all (as opposed to a session failing, which it survives).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Credentials are missing or unusable.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// `--ca-file` could not be read.
    #[error("reading --ca-file {path}: {source}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The device has no certificate and no token to get one.
    #[error(
        "this device has not enrolled yet (no certificate in {0}) and has no bootstrap token: put one from `micromine-controller token create` in /etc/credstore/micromine-agent.token (the packaged service) or a --token-file"
    )]
    NeedsToken(PathBuf),
}

/// Counters of one agent run, updated live.
#[derive(Debug, Default)]
pub struct AgentCounters {
    /// Shares the miner found (each is acknowledged eventually, or still held).
    pub found: AtomicU64,
    /// Shares acknowledged as accepted.
    pub accepted: AtomicU64,
    /// Shares rejected.
    pub rejected: AtomicU64,
    /// Accepted shares that were blocks.
    pub blocks: AtomicU64,
    /// Sessions that reached `Welcome`.
    pub sessions: AtomicU64,
    /// Hashes computed.
    pub hashes: AtomicU64,
    /// Certificates renewed.
    pub renewals: AtomicU64,
    /// Sessions open now (0 or 1 for one agent; a simulation adds its devices up).
    pub open_sessions: AtomicU64,
    /// Links a simulated device dropped on purpose (`--churn`).
    pub link_drops: AtomicU64,
}

/// A snapshot of [`AgentCounters`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct AgentStats {
    /// Shares the miner found.
    pub found: u64,
    /// Shares acknowledged as accepted.
    pub accepted: u64,
    /// Shares rejected.
    pub rejected: u64,
    /// Accepted shares that were blocks.
    pub blocks: u64,
    /// Sessions that reached `Welcome`.
    pub sessions: u64,
    /// Hashes computed.
    pub hashes: u64,
    /// Certificates renewed.
    pub renewals: u64,
}

impl AgentCounters {
    /// A consistent-enough snapshot.
    pub fn snapshot(&self) -> AgentStats {
        AgentStats {
            found: self.found.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            blocks: self.blocks.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            hashes: self.hashes.load(Ordering::Relaxed),
            renewals: self.renewals.load(Ordering::Relaxed),
        }
    }
}

/// Loads the device's credentials, enrolling first if there are none.
pub async fn ensure_identity(config: &AgentConfig) -> Result<DeviceIdentity, AgentError> {
    if let Some(identity) = DeviceIdentity::load(&config.state_dir)? {
        if let Some(name) = &config.name
            && *name != identity.name
        {
            tracing::warn!(enrolled = %identity.name, requested = %name,
                "this state dir is enrolled under another name; keeping the enrolled one");
        }
        return Ok(identity);
    }
    let name = config
        .name
        .clone()
        .unwrap_or_else(identity::default_device_name);
    let identity = enroll_as(config, &name).await?;
    tracing::info!(device = %identity.name, "enrolled");
    Ok(identity)
}

/// Enrolls again with the configured token, replacing the stored identity.
async fn reenroll(config: &AgentConfig) -> Result<DeviceIdentity, AgentError> {
    let previous = DeviceIdentity::load(&config.state_dir)?;
    let name = previous
        .map(|p| p.name)
        .or_else(|| config.name.clone())
        .unwrap_or_else(identity::default_device_name);
    let fresh = enroll_as(config, &name).await?;
    tracing::info!(device = %fresh.name, "enrolled again after the certificate expired");
    Ok(fresh)
}

/// Enrolls as `name` with the configured token (and `--ca-file`, if given) and saves the
/// identity.
async fn enroll_as(config: &AgentConfig, name: &str) -> Result<DeviceIdentity, AgentError> {
    let token = config
        .token
        .as_ref()
        .ok_or_else(|| AgentError::NeedsToken(config.state_dir.clone()))?;
    let ca_pem = read_ca_file(config)?;
    let (mut span, trace_headers) = config.telemetry.start_root("enroll");
    span.set_attribute(KeyValue::new("device", name.to_string()));
    let request = identity::Enroll {
        controller_url: &config.controller,
        token,
        device_name: name,
        labels: &config.labels,
        ca_pem: ca_pem.as_deref(),
        trace_headers: &trace_headers,
    };
    let enrolled = identity::enroll_from(&request, config.local_address()).await;
    if let Err(e) = &enrolled {
        span.set_status(SpanStatus::error(e.to_string()));
    }
    span.end();
    let identity = enrolled?;
    identity.save(&config.state_dir)?;
    Ok(identity)
}

fn read_ca_file(config: &AgentConfig) -> Result<Option<String>, AgentError> {
    match &config.ca_file {
        Some(path) => {
            std::fs::read_to_string(path)
                .map(Some)
                .map_err(|source| AgentError::CaFile {
                    path: path.clone(),
                    source,
                })
        }
        None => Ok(None),
    }
}

/// What the agent knows about an assignment it holds.
#[derive(Debug, Clone)]
struct Held {
    /// Set when the miner finished it while no session was open.
    finished_offline: Option<u64>,
}

/// Runs the agent until `shutdown` is cancelled. Only setup failures are errors; the
/// controller being unreachable is waited out.
pub async fn run(
    config: AgentConfig,
    counters: Arc<AgentCounters>,
    shutdown: CancellationToken,
) -> Result<AgentStats, AgentError> {
    let mut identity = ensure_identity(&config).await?;
    let (capacity, (miner, events), sensors) = match &config.simulation {
        Some(simulated) => {
            let engine = config.engine.without_measuring();
            (
                simulated.capacity(engine),
                Miner::start_paced(&simulated.pool, engine, simulated.hashrate),
                SensorSource::Synthetic(SyntheticSensors::new()),
            )
        }
        None => {
            let threads = config.threads.max(1);
            let context = calibrate::Context::this_machine(Some(&config.state_dir));
            // Like the benchmark after it, this blocks the thread: nothing else of this
            // agent runs before it has an engine.
            let selection =
                calibrate::select(config.engine, &context, calibrate::single_thread_rate);
            tracing::info!(engine = %selection.engine, basis = selection.basis.name(),
                rates = ?selection.rates, "hashing engine chosen");
            let measured = bench::run(selection.engine, threads, config.bench_duration, None);
            tracing::info!(engine = %measured.engine, threads,
                hashes_per_second = measured.hashes_per_second, "benchmarked");
            let capacity = pb::Capacity {
                cores: capacity::cores(),
                mining_threads: threads as u32,
                arch: capacity::arch().to_string(),
                memory_bytes: capacity::memory_bytes(),
                nominal_hashrate: measured.hashes_per_second,
                hash_engine: measured.engine.clone(),
                hash_engine_basis: selection.basis.name().to_string(),
                hash_engine_rates: selection.rates.into_iter().collect(),
            };
            (
                capacity,
                Miner::start(selection.engine, threads),
                SensorSource::Device(Sensors::new(config.sensors.clone())),
            )
        }
    };
    let governor = Governor::new(load_limits(&config.state_dir));
    let mut agent = Agent {
        sensors,
        governor,
        held_back: None,
        readings: Readings::default(),
        config,
        capacity,
        miner,
        events,
        held: HashMap::new(),
        pending: BTreeMap::new(),
        counters,
        last_hashes: 0,
        last_busy: Duration::ZERO,
        last_report: Instant::now(),
        next_renewal_attempt: Instant::now(),
        mining_spans: HashMap::new(),
        awaiting_assignment: std::collections::VecDeque::new(),
        report_every: Duration::ZERO,
        released: false,
        last_session: false,
    };
    let mut backoff = Backoff::new(agent.config.backoff_base, agent.config.backoff_max);
    while !shutdown.is_cancelled() {
        if identity.expired(identity::now_unix_ms()) {
            // Offline past the certificate's end (no renewal possible): enroll afresh if a
            // token is at hand, otherwise keep trying, which the operator sees in the log.
            match &agent.config.token {
                Some(_) => match reenroll(&agent.config).await {
                    Ok(fresh) => identity = fresh,
                    Err(e) => {
                        tracing::warn!(error = %e, "certificate expired and re-enrollment failed")
                    }
                },
                None => tracing::warn!("certificate expired; restart with --token to enroll again"),
            }
        }
        match agent.session(&mut identity, &shutdown).await {
            Ok(SessionEnd::Shutdown) => break,
            Ok(SessionEnd::Welcomed) => backoff.reset_within(agent.report_every),
            Ok(SessionEnd::NotWelcomed) => {}
            Err(e) => tracing::warn!(error = %e, "session failed"),
        }
        if shutdown.is_cancelled() {
            break;
        }
        let delay = backoff.next_delay();
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting after a pause"
        );
        agent
            .idle_until(tokio::time::Instant::now() + delay, &shutdown)
            .await;
    }
    if !agent.released && !agent.pending.is_empty() {
        agent.deliver_before_exit(&mut identity).await;
    }
    let stats = agent.counters.snapshot();
    agent.miner.stop();
    agent.config.telemetry.shutdown();
    Ok(stats)
}

enum SessionEnd {
    /// The session got as far as `Welcome` before it ended.
    Welcomed,
    /// It ended before the controller answered.
    NotWelcomed,
    /// The agent is shutting down.
    Shutdown,
}

/// A session error: it ends the session, not the agent.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connecting: {0}")]
    Connect(#[from] tls::TlsError),
    #[error("credentials: {0}")]
    Identity(#[from] IdentityError),
    #[error("controller said: {0}")]
    Status(#[from] tonic::Status),
    #[error("no Welcome within {0:?}")]
    NoWelcome(Duration),
    #[error("the session's send queue closed")]
    Closed,
}

struct Agent {
    config: AgentConfig,
    capacity: pb::Capacity,
    miner: Miner,
    events: mpsc::Receiver<MinerEvent>,
    held: HashMap<u64, Held>,
    /// Shares sent (or to send) and not yet acknowledged: (assignment, nonce) -> sent once.
    pending: BTreeMap<(u64, u32), bool>,
    counters: Arc<AgentCounters>,
    last_hashes: u64,
    last_busy: Duration,
    last_report: Instant,
    next_renewal_attempt: Instant,
    /// Open `mine` spans of traced assignments.
    mining_spans: HashMap<u64, SdkSpan>,
    sensors: SensorSource,
    governor: Governor,
    /// When this device asked for work (Hello, a finished range) and has not been given
    /// the assignment that answers it yet; timed only in a simulation.
    awaiting_assignment: std::collections::VecDeque<Instant>,
    /// How often the controller asked for reports in the last session; it grows with
    /// the fleet, and so does the window a lost session's reconnect is spread over.
    report_every: Duration,
    /// Why the governor holds hashing back now, if it does.
    held_back: Option<&'static str>,
    /// The latest sensor readings (the governor's, also reported).
    readings: Readings,
    /// Set once an open session has handed the work back ([`Agent::release`]).
    released: bool,
    /// The session being opened is the last one: hand everything back at once.
    last_session: bool,
}

/// The limits saved by an earlier run, or none (hash freely until told otherwise).
fn load_limits(state_dir: &std::path::Path) -> pb::Limits {
    use prost::Message as _;
    std::fs::read(state_dir.join(LIMITS_FILE))
        .ok()
        .and_then(|bytes| pb::Limits::decode(bytes.as_slice()).ok())
        .unwrap_or(pb::Limits {
            duty_cycle: 1.0,
            ..Default::default()
        })
}

/// Keeps `limits` for [`load_limits`] after a restart.
fn save_limits(state_dir: &std::path::Path, limits: &pb::Limits) -> std::io::Result<()> {
    use prost::Message as _;
    micromine_host::files::write_file_atomic(
        &state_dir.join(LIMITS_FILE),
        &limits.encode_to_vec(),
        0o600,
    )
}

fn message(kind: AgentKind) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}

impl Agent {
    /// Between sessions: keep taking the miner's events so no share is lost, and keep
    /// enforcing the limits.
    async fn idle_until(&mut self, deadline: tokio::time::Instant, shutdown: &CancellationToken) {
        let mut govern = tokio::time::interval(self.govern_every());
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => return,
                Some(event) = self.events.recv() => self.note_offline(event),
                _ = govern.tick() => self.govern(),
            }
        }
    }

    fn govern_every(&self) -> Duration {
        if self.config.simulation.is_some() {
            SIMULATED_GOVERN_EVERY
        } else {
            GOVERN_EVERY
        }
    }

    /// Reads the sensors and holds hashing back as the limits say.
    fn govern(&mut self) {
        let load = match self.held_back {
            None if !self.held.is_empty() => {
                self.governor.limits().duty_cycle.clamp(0.0, 1.0) as f32
            }
            _ => 0.0,
        };
        self.readings = self.sensors.read(load);
        let decision = self.governor.decide(&self.readings, jiff::Timestamp::now());
        if decision.held_back != self.held_back {
            match decision.held_back {
                Some(reason) => {
                    tracing::info!(reason, readings = ?self.readings, "hashing held back")
                }
                None => tracing::info!(after = ?self.held_back, "hashing resumes"),
            }
            self.held_back = decision.held_back;
        }
        if decision.duty_cycle > 0.0 {
            self.miner.set_duty_cycle(decision.duty_cycle);
            self.miner.set_paused(false);
        } else {
            self.miner.set_paused(true);
        }
    }

    /// New limits from the controller: in force at once, and saved for a restart.
    fn apply_limits(&mut self, limits: pb::Limits) {
        if limits == *self.governor.limits() {
            return;
        }
        if let Err(e) = save_limits(&self.config.state_dir, &limits) {
            tracing::warn!(error = %e, dir = %self.config.state_dir.display(), "cannot save the limits");
        }
        self.governor.set_limits(limits);
        self.govern();
    }

    fn note_offline(&mut self, event: MinerEvent) {
        match event {
            MinerEvent::Share {
                assignment_id,
                nonce,
            } => self.remember_share(assignment_id, nonce),
            MinerEvent::Finished {
                assignment_id,
                scanned_until,
                hashes,
                reason,
            } => {
                self.end_mining_span(assignment_id, scanned_until, hashes, reason);
                if reason == FinishReason::Cancelled {
                    self.held.remove(&assignment_id);
                } else if let Some(held) = self.held.get_mut(&assignment_id) {
                    held.finished_offline = Some(scanned_until);
                }
            }
        }
    }

    fn remember_share(&mut self, assignment_id: u64, nonce: u32) {
        self.counters.found.fetch_add(1, Ordering::Relaxed);
        if let Some(span) = self.mining_spans.get_mut(&assignment_id) {
            span.add_event("share", vec![KeyValue::new("nonce", i64::from(nonce))]);
        }
        if self.pending.len() >= MAX_PENDING_SHARES
            && let Some(oldest) = self.pending.keys().next().copied()
        {
            self.pending.remove(&oldest);
        }
        self.pending.entry((assignment_id, nonce)).or_insert(false);
    }

    fn hello(&self) -> pb::Hello {
        let mut resume: Vec<pb::ResumedAssignment> = self
            .miner
            .progress()
            .into_iter()
            .map(|p| pb::ResumedAssignment {
                assignment_id: p.id,
                scanned_until: p.scanned_until,
            })
            .collect();
        for (id, held) in &self.held {
            if let Some(scanned_until) = held.finished_offline {
                resume.push(pb::ResumedAssignment {
                    assignment_id: *id,
                    scanned_until,
                });
            }
        }
        pb::Hello {
            capacity: Some(self.capacity.clone()),
            labels: self.config.labels.clone().into_iter().collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            resume: Some(pb::Resume {
                assignments: resume,
            }),
        }
    }

    async fn session(
        &mut self,
        identity: &mut DeviceIdentity,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, SessionError> {
        let channel = tokio::select! {
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            channel = tls::connect_from(
                &self.config.controller,
                identity.client_config()?,
                self.config.local_address(),
            ) => channel?,
        };
        let mut client = FleetClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        if let Err(e) = self.renew_if_due(&mut client, identity).await {
            tracing::warn!(error = %e, "certificate renewal failed; will retry");
        }
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(256);
        self.awaiting_assignment.clear();
        let hello_sent = Instant::now();
        tx.send(message(AgentKind::Hello(self.hello())))
            .await
            .map_err(|_| SessionError::Closed)?;
        let mut inbound = tokio::select! {
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            response = client.session(ReceiverStream::new(rx)) => response?.into_inner(),
        };
        let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()).await {
            Err(_) => return Err(SessionError::NoWelcome(WELCOME_TIMEOUT)),
            Ok(Err(status)) => return Err(status.into()),
            Ok(Ok(None)) => return Ok(SessionEnd::NotWelcomed),
            Ok(Ok(Some(pb::ControllerMessage {
                kind: Some(Kind::Welcome(w)),
            }))) => w,
            Ok(Ok(Some(_))) => {
                return Err(
                    tonic::Status::internal("the controller did not start with Welcome").into(),
                );
            }
        };
        self.counters.sessions.fetch_add(1, Ordering::Relaxed);
        let _open = OpenSession::new(&self.counters);
        tracing::info!(device = %welcome.device_name, resumed = welcome.resumed_assignment_ids.len(), "session open");
        self.apply_welcome(&welcome, &tx).await?;
        if self.last_session {
            self.release(tx, &mut Vec::new(), &mut inbound).await;
            return Ok(SessionEnd::Shutdown);
        }
        if welcome.resumed_assignment_ids.is_empty() {
            self.awaiting_assignment.push_back(hello_sent);
        }
        // A simulated flaky link: the connection vanishes without a goodbye.
        let link_drop = self
            .config
            .simulation
            .as_ref()
            .and_then(SimulatedDevice::next_link_drop);
        let link_drop = async move {
            match link_drop {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(link_drop);

        let report_every =
            Duration::from_millis(u64::from(welcome.report_interval_ms.clamp(200, 60_000)));
        self.report_every = report_every;
        let mut report = tokio::time::interval(report_every);
        let mut govern = tokio::time::interval(self.govern_every());
        // Armed by the first share of a batch, so an idle agent does not wake ten times a
        // second for nothing.
        let mut flush_at: Option<tokio::time::Instant> = None;
        let mut batch: Vec<pb::Share> = Vec::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.release(tx, &mut batch, &mut inbound).await;
                    return Ok(SessionEnd::Shutdown);
                }
                _ = &mut link_drop => {
                    tracing::debug!("simulated link drop");
                    self.counters.link_drops.fetch_add(1, Ordering::Relaxed);
                    return Ok(SessionEnd::Welcomed);
                }
                incoming = inbound.message() => match incoming {
                    Ok(Some(msg)) => self.handle(msg),
                    Ok(None) => {
                        tracing::info!("controller closed the session");
                        return Ok(SessionEnd::Welcomed);
                    }
                    Err(status) => {
                        tracing::info!(error = %status, "session ended");
                        return Ok(SessionEnd::Welcomed);
                    }
                },
                Some(event) = self.events.recv() => match event {
                    MinerEvent::Share { assignment_id, nonce } => {
                        self.remember_share(assignment_id, nonce);
                        self.pending.insert((assignment_id, nonce), true);
                        batch.push(pb::Share { assignment_id, nonce, resubmitted: false });
                        flush_at.get_or_insert_with(|| tokio::time::Instant::now() + SHARE_FLUSH);
                        if batch.len() >= SHARE_BATCH {
                            send_batch(&tx, &mut batch).await?;
                        }
                    }
                    MinerEvent::Finished { assignment_id, scanned_until, hashes, reason } => {
                        self.end_mining_span(assignment_id, scanned_until, hashes, reason);
                        // Shares of this range go out before the range is reported done.
                        send_batch(&tx, &mut batch).await?;
                        self.held.remove(&assignment_id);
                        if reason != FinishReason::Cancelled {
                            tx.send(message(AgentKind::Progress(pb::Progress {
                                assignment_id, scanned_until, hashes, finished: true,
                            }))).await.map_err(|_| SessionError::Closed)?;
                            self.awaiting_assignment.push_back(Instant::now());
                        }
                    }
                },
                _ = sleep_until_armed(flush_at) => {
                    flush_at = None;
                    send_batch(&tx, &mut batch).await?;
                }
                _ = govern.tick() => self.govern(),
                _ = report.tick() => {
                    self.send_reports(&tx).await?;
                    self.send_spans(&tx).await?;
                    // Renewal rides on the open channel; the session itself goes on.
                    if let Err(e) = self.renew_if_due(&mut client, identity).await {
                        tracing::warn!(error = %e, "certificate renewal failed; will retry");
                    }
                }
            }
        }
    }

    /// After `Welcome`: drop what the controller no longer honours, report ranges that
    /// finished while offline, and resubmit every unacknowledged share.
    async fn apply_welcome(
        &mut self,
        welcome: &pb::Welcome,
        tx: &mpsc::Sender<pb::AgentMessage>,
    ) -> Result<(), SessionError> {
        if let Some(limits) = &welcome.limits {
            self.apply_limits(limits.clone());
        }
        let kept: std::collections::HashSet<u64> =
            welcome.resumed_assignment_ids.iter().copied().collect();
        for id in self.miner.held() {
            if !kept.contains(&id) {
                self.miner.cancel(id);
                self.held.remove(&id);
            }
        }
        let finished: Vec<(u64, u64)> = self
            .held
            .iter()
            .filter_map(|(id, h)| h.finished_offline.map(|s| (*id, s)))
            .collect();
        for (id, scanned_until) in finished {
            self.held.remove(&id);
            if kept.contains(&id) {
                tx.send(message(AgentKind::Progress(pb::Progress {
                    assignment_id: id,
                    scanned_until,
                    hashes: 0,
                    finished: true,
                })))
                .await
                .map_err(|_| SessionError::Closed)?;
            }
        }
        let resubmit: Vec<pb::Share> = self
            .pending
            .iter_mut()
            .map(|((assignment_id, nonce), sent)| {
                let resubmitted = *sent;
                *sent = true;
                pb::Share {
                    assignment_id: *assignment_id,
                    nonce: *nonce,
                    resubmitted,
                }
            })
            .collect();
        for (i, chunk) in resubmit.chunks(SHARE_BATCH).enumerate() {
            // The controller allows a burst of resubmissions, then about 2,000 shares a
            // second; stay under that so a long outage's backlog does not get the session
            // cut for flooding.
            if i * SHARE_BATCH >= RESUBMIT_BURST {
                tokio::time::sleep(RESUBMIT_PACE).await;
            }
            tx.send(message(AgentKind::Shares(pb::SubmitShares {
                shares: chunk.to_vec(),
            })))
            .await
            .map_err(|_| SessionError::Closed)?;
        }
        Ok(())
    }

    fn handle(&mut self, msg: pb::ControllerMessage) {
        match msg.kind {
            Some(Kind::Assignment(a)) => match work_order(&a) {
                Ok(order) => {
                    if let (Some(asked), Some(simulated)) = (
                        self.awaiting_assignment.pop_front(),
                        &self.config.simulation,
                    ) {
                        simulated.latency.record(asked.elapsed());
                    }
                    tracing::debug!(
                        id = a.id,
                        start = a.nonce_start,
                        end = a.nonce_end,
                        difficulty = a.share_difficulty,
                        "assignment"
                    );
                    if let Some(limits) = &a.limits {
                        self.apply_limits(limits.clone());
                    }
                    self.held.insert(
                        a.id,
                        Held {
                            finished_offline: None,
                        },
                    );
                    if let Some(span) = self.config.telemetry.start_mining(&a) {
                        self.mining_spans.insert(a.id, span);
                    }
                    self.miner.push(order);
                }
                Err(problem) => {
                    tracing::warn!(id = a.id, problem, "ignoring a malformed assignment")
                }
            },
            Some(Kind::Cancel(cancel)) => {
                tracing::debug!(ids = ?cancel.assignment_ids, reason = %cancel.reason, "cancelled");
                for id in cancel.assignment_ids {
                    self.miner.cancel(id);
                    self.held.remove(&id);
                }
            }
            Some(Kind::SetLimits(set)) => {
                if let Some(limits) = set.limits {
                    self.apply_limits(limits);
                }
            }
            Some(Kind::ShareResults(results)) => {
                for r in results.results {
                    self.pending.remove(&(r.assignment_id, r.nonce));
                    if r.status == pb::ShareStatus::Accepted as i32 {
                        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                        if r.block {
                            self.counters.blocks.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(
                                assignment = r.assignment_id,
                                nonce = r.nonce,
                                "block found"
                            );
                        }
                    } else {
                        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                        let reason = pb::RejectReason::try_from(r.reason)
                            .map_or("unknown", |reason| reason.as_str_name());
                        tracing::debug!(
                            assignment = r.assignment_id,
                            nonce = r.nonce,
                            reason,
                            "share rejected"
                        );
                    }
                }
            }
            Some(Kind::Drain(drain)) => {
                tracing::info!(reason = %drain.reason, "controller is draining; will reconnect");
            }
            Some(Kind::Welcome(_)) | None => {}
        }
    }

    async fn send_reports(
        &mut self,
        tx: &mpsc::Sender<pb::AgentMessage>,
    ) -> Result<(), SessionError> {
        for p in self.miner.progress() {
            tx.send(message(AgentKind::Progress(pb::Progress {
                assignment_id: p.id,
                scanned_until: p.scanned_until,
                hashes: p.hashes,
                finished: false,
            })))
            .await
            .map_err(|_| SessionError::Closed)?;
        }
        let total = self.miner.hashes_total();
        self.counters.hashes.store(total, Ordering::Relaxed);
        let elapsed = self.last_report.elapsed().as_secs_f64().max(1e-3);
        let hashrate = (total - self.last_hashes) as f64 / elapsed;
        self.last_hashes = total;
        let busy = self.miner.busy_time();
        let duty_cycle = measured_duty(
            busy.saturating_sub(self.last_busy),
            self.last_report.elapsed(),
            self.miner.threads(),
        );
        self.last_busy = busy;
        self.last_report = Instant::now();
        let state = match self.held_back {
            Some(reason) => reason,
            None if self.held.is_empty() => "idle",
            None => "mining",
        };
        let readings = self.readings;
        tx.send(message(AgentKind::Capacity(pb::CapacityReport {
            hashrate,
            state: state.to_string(),
            temperature_c: readings.temperature_c,
            host_cpu_percent: readings.host_cpu_percent,
            battery_percent: readings.battery_percent,
            power_watts: readings.power_watts,
            on_battery: readings.on_battery,
            duty_cycle: Some(duty_cycle),
        })))
        .await
        .map_err(|_| SessionError::Closed)
    }

    /// Closes an assignment's `mine` span with what became of the range.
    fn end_mining_span(
        &mut self,
        assignment_id: u64,
        scanned_until: u64,
        hashes: u64,
        reason: FinishReason,
    ) {
        if let Some(mut span) = self.mining_spans.remove(&assignment_id) {
            let outcome = match reason {
                FinishReason::Exhausted => "exhausted",
                FinishReason::LeaseExpired => "lease_expired",
                FinishReason::Cancelled => "cancelled",
            };
            span.set_attributes([
                KeyValue::new("outcome", outcome),
                KeyValue::new("hashes", hashes as i64),
                KeyValue::new("scanned_until", scanned_until as i64),
            ]);
            span.end();
        }
    }

    /// Sends the spans that finished since the last call (in-band mode only).
    async fn send_spans(&self, tx: &mpsc::Sender<pb::AgentMessage>) -> Result<(), SessionError> {
        loop {
            let spans = self
                .config
                .telemetry
                .take_in_band(micromine_proto::span_limits::SPANS_PER_BATCH);
            if spans.is_empty() {
                return Ok(());
            }
            tx.send(message(AgentKind::Spans(pb::SpanBatch { spans })))
                .await
                .map_err(|_| SessionError::Closed)?;
        }
    }

    /// Stopped while the link was down (between sessions) with shares still unanswered:
    /// one last session, bounded by [`LAST_DELIVERY`], delivers them, hands the work
    /// back and waits briefly for the answers, so an orderly stop does not leave the
    /// device's own count short of the controller's because of when the link dropped.
    async fn deliver_before_exit(&mut self, identity: &mut DeviceIdentity) {
        self.last_session = true;
        let unanswered = self.pending.len();
        // The stop already happened; this session must not see it and give up at once.
        let carry_on = CancellationToken::new();
        match tokio::time::timeout(LAST_DELIVERY, self.session(identity, &carry_on)).await {
            Ok(Ok(SessionEnd::Shutdown)) => {
                tracing::info!(
                    unanswered,
                    still = self.pending.len(),
                    "last shares delivered before the stop"
                );
            }
            Ok(Ok(SessionEnd::Welcomed | SessionEnd::NotWelcomed)) => {
                tracing::warn!(
                    unanswered,
                    "the controller ended the last session before the shares were delivered"
                );
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, unanswered, "the last shares could not be delivered before the stop");
            }
            Err(_) => {
                tracing::warn!(
                    unanswered,
                    timeout_s = LAST_DELIVERY.as_secs(),
                    "no controller answered the last shares before the stop"
                );
            }
        }
    }

    /// Orderly exit: stop hashing, send what was found, hand every range back, wait
    /// briefly for the last acknowledgements, then end the session and wait for the
    /// controller to close it.
    async fn release(
        &mut self,
        tx: mpsc::Sender<pb::AgentMessage>,
        batch: &mut Vec<pb::Share>,
        inbound: &mut tonic::Streaming<pb::ControllerMessage>,
    ) {
        self.released = true;
        // Said first, so that the ranges handed back below are not answered with new work
        // that would sit leased to a device that is gone until the lease runs out.
        self.held_back = Some(STOPPING);
        if self.send_reports(&tx).await.is_err() {
            return;
        }
        let progress = self.miner.progress();
        for p in &progress {
            self.miner.cancel(p.id);
        }
        // Shares found up to the cancellation are still worth sending, and where each
        // range really stopped is only known once the miner says so: a chunk being scanned
        // at the cancellation still finishes, and its shares go out.
        let mut stopped_at: HashMap<u64, u64> = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            match event {
                MinerEvent::Share {
                    assignment_id,
                    nonce,
                } => {
                    self.remember_share(assignment_id, nonce);
                    self.pending.insert((assignment_id, nonce), true);
                    batch.push(pb::Share {
                        assignment_id,
                        nonce,
                        resubmitted: false,
                    });
                }
                MinerEvent::Finished {
                    assignment_id,
                    scanned_until,
                    hashes,
                    reason,
                } => {
                    stopped_at.insert(assignment_id, scanned_until);
                    self.end_mining_span(assignment_id, scanned_until, hashes, reason);
                }
            }
        }
        if send_batch(&tx, batch).await.is_err() {
            return;
        }
        for p in self.miner.progress().into_iter().chain(progress) {
            let scanned_until = stopped_at
                .get(&p.id)
                .map_or(p.scanned_until, |s| (*s).max(p.scanned_until));
            let _ = tx
                .send(message(AgentKind::Progress(pb::Progress {
                    assignment_id: p.id,
                    scanned_until,
                    hashes: p.hashes,
                    finished: true,
                })))
                .await;
        }
        let _ = self.send_spans(&tx).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while !self.pending.is_empty() {
            match tokio::time::timeout_at(deadline, inbound.message()).await {
                Ok(Ok(Some(msg))) => self.handle(msg),
                _ => break,
            }
        }
        // Until the controller has read the end of the stream, what was sent above may
        // still sit in this process's buffers, and exiting would lose it (the ranges
        // would stay leased to a device that is gone). The controller closes its side once
        // it has handled everything before the end.
        drop(tx);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Ok(Some(msg))) = tokio::time::timeout_at(deadline, inbound.message()).await {
            self.handle(msg);
        }
        self.counters
            .hashes
            .store(self.miner.hashes_total(), Ordering::Relaxed);
    }

    async fn renew_if_due(
        &mut self,
        client: &mut FleetClient<tonic::transport::Channel>,
        identity: &mut DeviceIdentity,
    ) -> Result<(), SessionError> {
        if !identity.renewal_due(identity::now_unix_ms())
            || self.next_renewal_attempt > Instant::now()
        {
            return Ok(());
        }
        self.next_renewal_attempt = Instant::now() + RENEW_RETRY;
        let (key_pem, csr_der) = identity::generate_key_and_csr(&identity.name)?;
        let response =
            tokio::time::timeout(WELCOME_TIMEOUT, client.renew(pb::RenewRequest { csr_der }))
                .await
                .map_err(|_| tonic::Status::deadline_exceeded("renewal timed out"))??
                .into_inner();
        let mut renewed = identity.clone();
        renewed.cert_pem = response.certificate_pem;
        renewed.key_pem = key_pem;
        renewed.ca_pem = response.ca_bundle_pem;
        renewed.not_after_unix_ms = response.not_after_unix_ms;
        renewed.issued_unix_ms = identity::now_unix_ms();
        // What we save is what the next connection uses: a bundle or certificate that
        // does not load would lock the device out, so it must load before it replaces
        // the identity that works.
        renewed.client_config()?;
        renewed.save(&self.config.state_dir)?;
        tracing::info!(
            not_after_unix_ms = renewed.not_after_unix_ms,
            "certificate renewed"
        );
        *identity = renewed;
        self.next_renewal_attempt = Instant::now();
        self.counters.renewals.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Counts a session as open for as long as it lives.
struct OpenSession(Arc<AgentCounters>);

impl OpenSession {
    fn new(counters: &Arc<AgentCounters>) -> OpenSession {
        counters.open_sessions.fetch_add(1, Ordering::Relaxed);
        OpenSession(counters.clone())
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0.open_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The fraction of `threads` threads' time over `wall` that `busy` hashing amounts to.
fn measured_duty(busy: Duration, wall: Duration, threads: usize) -> f32 {
    let available = wall.as_secs_f64() * threads.max(1) as f64;
    if available <= 0.0 {
        return 0.0;
    }
    (busy.as_secs_f64() / available).clamp(0.0, 1.0) as f32
}

/// Sleeps until `deadline`, or forever without one.
pub(crate) async fn sleep_until_armed(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn send_batch(
    tx: &mpsc::Sender<pb::AgentMessage>,
    batch: &mut Vec<pb::Share>,
) -> Result<(), SessionError> {
    if batch.is_empty() {
        return Ok(());
    }
    let shares = std::mem::take(batch);
    tx.send(message(AgentKind::Shares(pb::SubmitShares { shares })))
        .await
        .map_err(|_| SessionError::Closed)
}

/// Checks an assignment from the wire and turns it into work for the miner.
pub fn work_order(a: &pb::Assignment) -> Result<WorkOrder, &'static str> {
    let prefix: [u8; HEADER_PREFIX_LEN] = a
        .header_prefix
        .as_slice()
        .try_into()
        .map_err(|_| "header_prefix must be 76 bytes")?;
    if a.nonce_start >= a.nonce_end || a.nonce_end > 1 << 32 {
        return Err("nonce range must be non-empty and within 2^32");
    }
    let target =
        Target::from_le_slice(&a.share_target).ok_or("share_target must be 32 non-zero bytes")?;
    if a.lease_ms == 0 {
        return Err("lease_ms must be above zero");
    }
    Ok(WorkOrder {
        id: a.id,
        prefix,
        start: a.nonce_start,
        end: a.nonce_end,
        target,
        deadline: Instant::now() + Duration::from_millis(u64::from(a.lease_ms)),
    })
}

#[cfg(test)]
mod tests;
