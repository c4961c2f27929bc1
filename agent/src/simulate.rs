//! `micromine-agent simulate`: a whole fleet of virtual devices in one process.
//!
//! Every virtual device is a real agent ([`session::run`]): it enrolls with the token like
//! any device, holds its own mTLS session with its own certificate, resumes after a
//! disconnect, and keeps within its lease and limits. Only three things are simulated:
//! the hashing runs on threads shared by all devices, each device at its own (small)
//! rate, so its shares are real and verified like any other; the sensors are synthetic
//! ([`SyntheticSensors`](crate::sensors::SyntheticSensors)); and with `--churn` links drop
//! now and then without a goodbye, as flaky field links do.
//!
//! The simulation keeps its own tally of what the controller acknowledged, per device, so
//! a test or an operator can hold it against the controller's ledger (`--tally FILE`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use micromine_proto::token::BootstrapToken;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::engine::EngineRequest;
use crate::miner::PacedPool;
use crate::session::{self, AgentConfig, AgentCounters, AgentError, AgentStats};
use crate::simulated::{LatencyRecorder, LatencySummary, SimulatedDevice, device_address};
use crate::traces::AgentTelemetry;

/// How to run a simulation.
#[derive(Debug, Clone)]
pub struct SimulateConfig {
    /// `https://host:port` of the controller.
    pub controller: String,
    /// Bootstrap token with a use for every device not yet enrolled.
    pub token: Option<BootstrapToken>,
    /// How many devices.
    pub devices: usize,
    /// Device names are `{prefix}-00001` and on.
    pub name_prefix: String,
    /// Labels every device reports.
    pub labels: BTreeMap<String, String>,
    /// Where the devices' keys and certificates live, one directory each, so a second run
    /// reuses the enrollments.
    pub state_dir: PathBuf,
    /// A CA bundle to trust instead of the token's fingerprint.
    pub ca_file: Option<PathBuf>,
    /// Each device's hash rate, H/s.
    pub hashrate: f64,
    /// The rate each device claims in `Hello` (default: `hashrate`).
    pub claimed_hashrate: Option<f64>,
    /// Link drops per device per minute.
    pub churn_per_minute: f64,
    /// Hashing threads shared by all devices.
    pub hash_threads: usize,
    /// Devices started per second (enrollment and first session).
    pub ramp_per_second: f64,
    /// Stop after this long (default: until interrupted).
    pub duration: Option<Duration>,
    /// How often a progress line is printed.
    pub report_every: Duration,
    /// First and longest reconnect delay of each device.
    pub backoff: (Duration, Duration),
}

/// One progress line's figures.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SimulationReport {
    /// Seconds since the simulation started.
    pub elapsed_seconds: f64,
    /// Devices started so far.
    pub started: usize,
    /// Sessions open now.
    pub sessions: u64,
    /// Shares acknowledged as accepted, in total.
    pub accepted: u64,
    /// Shares rejected, in total.
    pub rejected: u64,
    /// Shares found and not answered yet, all devices: what devices hold while offline
    /// (and what is on its way).
    pub unanswered: u64,
    /// Accepted shares per second over the interval.
    pub accepted_per_second: f64,
    /// Hashes per second over the interval, all devices.
    pub hashes_per_second: f64,
    /// Links dropped on purpose, in total.
    pub link_drops: u64,
    /// Devices that stopped with an error.
    pub failed: usize,
    /// Time from asking for work to being given it, over the interval.
    pub assignment_latency: LatencySummary,
}

impl std::fmt::Display for SimulationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>6.0}s devices {} sessions {} accepted {} ({:.0}/s) rejected {} unanswered {} hashing {:.2} MH/s link drops {} failed {} assignment latency p50 {:.1} ms p99 {:.1} ms ({} samples)",
            self.elapsed_seconds,
            self.started,
            self.sessions,
            self.accepted,
            self.accepted_per_second,
            self.rejected,
            self.unanswered,
            self.hashes_per_second / 1e6,
            self.link_drops,
            self.failed,
            self.assignment_latency.p50_ms,
            self.assignment_latency.p99_ms,
            self.assignment_latency.count,
        )
    }
}

/// What each device had acknowledged when the simulation stopped.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// Shares found, all devices.
    pub found: u64,
    /// Shares acknowledged as accepted, all devices.
    pub accepted: u64,
    /// Shares rejected, all devices.
    pub rejected: u64,
    /// Shares found but not answered when their device stopped (it waits briefly for the
    /// last answers). The controller may have recorded them: the ledger can exceed
    /// `accepted` by at most this many.
    pub unanswered: u64,
    /// Per device name.
    pub devices: BTreeMap<String, AgentStats>,
    /// Devices that stopped with an error, and why.
    pub failures: BTreeMap<String, String>,
}

struct Device {
    name: String,
    counters: Arc<AgentCounters>,
    task: tokio::task::JoinHandle<Result<AgentStats, AgentError>>,
}

/// Whether a device that could not start should try again: the controller was out of
/// reach, slow, or shedding load. A refused or spent token, or a broken state directory,
/// ends the device, and the tally says why.
fn worth_retrying(error: &AgentError) -> bool {
    use crate::identity::IdentityError;
    use tonic::Code;
    match error {
        AgentError::Identity(
            IdentityError::Tls(crate::tls::TlsError::Connect { .. }) | IdentityError::Timeout(_),
        ) => true,
        AgentError::Identity(IdentityError::Rejected { code, .. }) => matches!(
            code,
            Code::Unavailable
                | Code::ResourceExhausted
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::Unknown
                | Code::Cancelled
        ),
        _ => false,
    }
}

/// Runs one device, starting it again (with backoff) while its start (enrollment) fails
/// for a passing reason, as a supervisor would restart an agent process.
async fn run_device(
    config: AgentConfig,
    counters: Arc<AgentCounters>,
    shutdown: CancellationToken,
) -> Result<AgentStats, AgentError> {
    let mut backoff = crate::backoff::Backoff::new(config.backoff_base, config.backoff_max);
    loop {
        match session::run(config.clone(), counters.clone(), shutdown.clone()).await {
            Err(e) if worth_retrying(&e) && !shutdown.is_cancelled() => {
                tracing::debug!(error = %e, "device could not start; trying again");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(counters.snapshot()),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
            other => return other,
        }
    }
}

/// Runs the simulation until `shutdown` or the configured duration; `report` is called
/// with every progress line. Devices release their work and wait for their last
/// acknowledgements before the tally is taken.
pub async fn run(
    config: SimulateConfig,
    shutdown: CancellationToken,
    mut report: impl FnMut(&SimulationReport),
) -> Tally {
    let pool = Arc::new(PacedPool::new(config.hash_threads));
    let latency = Arc::new(LatencyRecorder::default());
    let engine = EngineRequest::Auto;
    let devices_stop = shutdown.child_token();
    let started_at = Instant::now();
    let deadline = config.duration.map(|d| tokio::time::Instant::now() + d);
    let mut devices: Vec<Device> = Vec::with_capacity(config.devices);
    let ramp = Duration::from_secs_f64(1.0 / config.ramp_per_second.max(0.001));
    let mut next_start = tokio::time::Instant::now();
    let mut every = tokio::time::interval(config.report_every);
    every.tick().await;
    let mut last = (Instant::now(), 0u64, 0u64);
    loop {
        let start_due = devices.len() < config.devices;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = session::sleep_until_armed(deadline) => break,
            _ = tokio::time::sleep_until(next_start), if start_due => {
                let name = format!("{}-{:05}", config.name_prefix, devices.len() + 1);
                let agent = AgentConfig {
                    controller: config.controller.clone(),
                    token: config.token.clone(),
                    name: Some(name.clone()),
                    labels: config.labels.clone(),
                    state_dir: config.state_dir.join(&name),
                    ca_file: config.ca_file.clone(),
                    threads: 1,
                    engine,
                    bench_duration: Duration::ZERO,
                    backoff_base: config.backoff.0,
                    backoff_max: config.backoff.1,
                    telemetry: AgentTelemetry::in_band(),
                    sensors: Default::default(),
                    simulation: Some(SimulatedDevice {
                        pool: pool.clone(),
                        hashrate: config.hashrate,
                        claimed_hashrate: config.claimed_hashrate.unwrap_or(config.hashrate),
                        churn_per_minute: config.churn_per_minute,
                        latency: latency.clone(),
                        local_address: device_address(&config.controller, devices.len()),
                    }),
                };
                let counters = Arc::new(AgentCounters::default());
                let task = tokio::spawn(run_device(agent, counters.clone(), devices_stop.clone()));
                devices.push(Device { name, counters, task });
                next_start += ramp;
            }
            _ = every.tick() => {
                let now = Instant::now();
                let Totals { accepted, rejected, unanswered, hashes, sessions, link_drops } =
                    totals(&devices);
                let seconds = now.duration_since(last.0).as_secs_f64().max(1e-3);
                let line = SimulationReport {
                    elapsed_seconds: started_at.elapsed().as_secs_f64(),
                    started: devices.len(),
                    sessions,
                    accepted,
                    rejected,
                    unanswered,
                    accepted_per_second: accepted.saturating_sub(last.1) as f64 / seconds,
                    hashes_per_second: hashes.saturating_sub(last.2) as f64 / seconds,
                    link_drops,
                    failed: devices.iter().filter(|d| d.task.is_finished()).count(),
                    assignment_latency: latency.take(),
                };
                last = (now, accepted, hashes);
                report(&line);
            }
        }
    }
    devices_stop.cancel();
    let mut tally = Tally::default();
    for device in devices {
        let stats = match device.task.await {
            Ok(Ok(stats)) => stats,
            Ok(Err(e)) => {
                tally.failures.insert(device.name.clone(), e.to_string());
                device.counters.snapshot()
            }
            Err(e) => {
                tally.failures.insert(device.name.clone(), e.to_string());
                device.counters.snapshot()
            }
        };
        tally.found += stats.found;
        tally.accepted += stats.accepted;
        tally.rejected += stats.rejected;
        tally.unanswered += stats.found.saturating_sub(stats.accepted + stats.rejected);
        tally.devices.insert(device.name, stats);
    }
    tally
}

/// The devices' counters added up, for a progress line.
#[derive(Default)]
struct Totals {
    accepted: u64,
    rejected: u64,
    unanswered: u64,
    hashes: u64,
    sessions: u64,
    link_drops: u64,
}

fn totals(devices: &[Device]) -> Totals {
    devices.iter().fold(Totals::default(), |t, d| {
        let c = &d.counters;
        let (found, accepted, rejected) = (
            c.found.load(Ordering::Relaxed),
            c.accepted.load(Ordering::Relaxed),
            c.rejected.load(Ordering::Relaxed),
        );
        Totals {
            accepted: t.accepted + accepted,
            rejected: t.rejected + rejected,
            unanswered: t.unanswered + found.saturating_sub(accepted + rejected),
            hashes: t.hashes + c.hashes.load(Ordering::Relaxed),
            sessions: t.sessions + c.open_sessions.load(Ordering::Relaxed),
            link_drops: t.link_drops + c.link_drops.load(Ordering::Relaxed),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_passing_troubles_are_retried() {
        use crate::identity::IdentityError;
        let rejected = |code| {
            AgentError::Identity(IdentityError::Rejected {
                code,
                message: String::new(),
            })
        };
        assert!(worth_retrying(&rejected(tonic::Code::Unavailable)));
        assert!(worth_retrying(&rejected(tonic::Code::ResourceExhausted)));
        assert!(worth_retrying(&AgentError::Identity(
            IdentityError::Timeout(Duration::from_secs(10))
        )));
        assert!(!worth_retrying(&rejected(tonic::Code::PermissionDenied)));
        assert!(!worth_retrying(&rejected(tonic::Code::InvalidArgument)));
        assert!(!worth_retrying(&AgentError::NeedsToken(PathBuf::from(
            "/x"
        ))));
    }
}
