//! `micromine-controller quickstart`: a working local fleet in one command.
//!
//! A standalone controller on loopback with the example MicroMiner, a bootstrap token, and
//! N agents in this process that enroll with it like any device would (own key, own
//! certificate, mutual TLS), then mine real sha256d work. Live progress refreshes in a
//! terminal and is printed as plain lines otherwise; Ctrl-C or `--duration` ends it with a
//! summary.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use micromine_agent::engine::EngineRequest;
use micromine_agent::session::{self, AgentConfig, AgentCounters, AgentError};
use tokio_util::sync::CancellationToken;

use crate::serve::{self, ControllerConfig, StartError};
use crate::tokens::{TokenError, TokenSpec};
use micromine_fleet::status::FleetView;

/// The MicroMiner quickstart applies, from `examples/quickstart.yaml`.
pub const EXAMPLE_MANIFEST: &str = include_str!("../../examples/quickstart.yaml");

/// How to run the quickstart.
#[derive(Debug, Clone)]
pub struct QuickstartConfig {
    /// Local devices to run.
    pub devices: usize,
    /// Stop after this long (otherwise at Ctrl-C).
    pub duration: Option<Duration>,
    /// Keep state here (otherwise a temporary directory, removed at exit).
    pub data_dir: Option<PathBuf>,
    /// Hashing threads per device (otherwise the cores shared out).
    pub threads_per_device: Option<usize>,
    /// Where the controller's HTTP status API listens.
    pub http_listen: SocketAddr,
}

/// Why the quickstart could not run.
#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    /// `--devices` out of range.
    #[error("--devices must be between 1 and 64, got {0}")]
    Devices(usize),
    /// The data directory could not be prepared.
    #[error("preparing the data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The controller did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The token could not be created.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// An agent could not start.
    #[error("device {device}: {source}")]
    Agent {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: AgentError,
    },
}

/// What the quickstart did, for the closing summary.
#[derive(Debug, Clone)]
pub struct Summary {
    /// How long it ran.
    pub elapsed: Duration,
    /// The fleet at the end.
    pub view: FleetView,
    /// Hashes the agents computed.
    pub hashes: u64,
    /// Where the state was kept (None when it was temporary).
    pub data_dir: Option<PathBuf>,
}

/// Runs the quickstart until `shutdown` is cancelled or the duration is over.
pub async fn run(
    config: QuickstartConfig,
    shutdown: CancellationToken,
) -> Result<Summary, QuickstartError> {
    if !(1..=64).contains(&config.devices) {
        return Err(QuickstartError::Devices(config.devices));
    }
    let temp = match &config.data_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("micromine-quickstart-")
                .tempdir()
                .map_err(|source| QuickstartError::DataDir {
                    path: std::env::temp_dir(),
                    source,
                })?,
        ),
    };
    let data_dir = config
        .data_dir
        .clone()
        .or_else(|| temp.as_ref().map(|t| t.path().to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("micromine-quickstart"));
    let manifests = data_dir.join("manifests");
    let prepare = || -> std::io::Result<()> {
        std::fs::create_dir_all(&manifests)?;
        let example = manifests.join("quickstart.yaml");
        if !example.exists() {
            std::fs::write(&example, EXAMPLE_MANIFEST)?;
        }
        Ok(())
    };
    prepare().map_err(|source| QuickstartError::DataDir {
        path: data_dir.clone(),
        source,
    })?;

    let mut controller_config = ControllerConfig::new(manifests.clone(), data_dir.clone());
    controller_config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    controller_config.http_listen = config.http_listen;
    let controller = serve::start(controller_config).await?;
    let spec = TokenSpec {
        ttl: Duration::from_secs(3600),
        uses: config.devices as u32,
        labels: BTreeMap::new(),
    };
    let (token, _) = controller
        .tokens
        .create(&spec, controller.pki.ca_fingerprint())?;

    let threads = config
        .threads_per_device
        .unwrap_or_else(|| (micromine_agent::capacity::cores() as usize / config.devices).max(1));
    println!(
        "micromine quickstart: controller on {} (status: http://{}/api/v1/status), {} devices x {} threads, state in {}",
        controller.grpc_url(),
        controller.http_addr,
        config.devices,
        threads,
        data_dir.display()
    );
    println!(
        "manifests: {} (edit them while this runs; Ctrl-C stops)",
        manifests.display()
    );

    let agents_stop = CancellationToken::new();
    let mut agents = Vec::new();
    let mut counters = Vec::new();
    for i in 1..=config.devices {
        let name = format!("qs-device-{i}");
        let labels = BTreeMap::from([
            ("site".to_string(), "quickstart".to_string()),
            ("class".to_string(), "laptop".to_string()),
        ]);
        let agent_config = AgentConfig {
            controller: controller.grpc_url(),
            token: Some(token.clone()),
            name: Some(name.clone()),
            labels,
            state_dir: data_dir.join("agents").join(&name),
            ca_file: None,
            threads,
            engine: EngineRequest::Auto,
            bench_duration: Duration::from_millis(500),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            telemetry: Default::default(),
            sensors: Default::default(),
            simulation: None,
        };
        let agent_counters = Arc::new(AgentCounters::default());
        counters.push(agent_counters.clone());
        let stop = agents_stop.clone();
        agents.push((
            name,
            tokio::spawn(session::run(agent_config, agent_counters, stop)),
        ));
    }

    let started = Instant::now();
    let mut display = Display::new();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let deadline = config.duration.map(|d| tokio::time::Instant::now() + d);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            _ = every.tick() => {
                // An agent that failed to start ends the run with its reason.
                for (name, handle) in &agents {
                    if handle.is_finished() {
                        agents_stop.cancel();
                        tracing::error!(device = %name, "agent stopped early");
                    }
                }
                if agents_stop.is_cancelled() {
                    break;
                }
                display.show(&controller.fleet.view(), started.elapsed());
            }
        }
    }
    display.finish();
    println!("stopping: agents hand back their work, the ledger is flushed...");
    agents_stop.cancel();
    let mut failure = None;
    for (name, handle) in agents {
        match handle.await {
            Ok(Ok(_)) => {}
            Ok(Err(source)) => {
                failure.get_or_insert(QuickstartError::Agent {
                    device: name,
                    source,
                });
            }
            Err(e) => tracing::error!(device = %name, error = %e, "agent task failed"),
        }
    }
    let view = controller.fleet.view();
    controller.stop().await;
    if let Some(failure) = failure {
        return Err(failure);
    }
    let hashes = counters.iter().map(|c| c.snapshot().hashes).sum();
    drop(temp);
    Ok(Summary {
        elapsed: started.elapsed(),
        view,
        hashes,
        data_dir: config.data_dir,
    })
}

/// Hash rate with a unit, e.g. `12.3 MH/s`.
pub fn human_rate(hashes_per_second: f64) -> String {
    let units = ["H/s", "kH/s", "MH/s", "GH/s", "TH/s"];
    // An empty float sum is -0.0; show it as 0.
    let mut value = if hashes_per_second > 0.0 {
        hashes_per_second
    } else {
        0.0
    };
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.2} {}", units[unit])
}

/// The progress table: one line per device, then one per MicroMiner.
pub fn progress_lines(view: &FleetView, elapsed: Duration) -> Vec<String> {
    let mut lines = vec![
        format!(
            "micromine quickstart  {:>4}s  sessions {}  assignments {}",
            elapsed.as_secs(),
            view.sessions,
            view.assignments
        ),
        format!(
            "{:<14} {:<9} {:>12} {:>12} {:>11} {:>9} {:>9}",
            "DEVICE", "STATE", "HASHRATE", "EFFECTIVE", "SHARE DIFF", "ACCEPTED", "REJECTED"
        ),
    ];
    for d in &view.devices {
        lines.push(format!(
            "{:<14} {:<9} {:>12} {:>12} {:>11.3e} {:>9} {:>9}",
            d.name,
            d.state,
            human_rate(d.reported_hashrate),
            human_rate(d.effective_hashrate),
            d.share_difficulty,
            d.shares.accepted,
            d.shares.rejected.total()
        ));
    }
    for m in &view.miners {
        lines.push(format!(
            "MicroMiner {}: {} mining, effective {}, shares {} accepted / {} rejected / {} stale, blocks {}",
            m.key,
            m.status.devices.mining,
            human_rate(m.status.hashrate.effective),
            m.status.shares.accepted,
            m.status.shares.rejected,
            m.status.shares.stale,
            m.status.blocks_found
        ));
        if let Some(e) = &m.status.economics {
            lines.push(format!(
                "  {:.1} W: energy {:.6}/h, expected revenue {:.6}/h ({})",
                e.power_watts,
                e.cost_per_hour,
                e.revenue_per_hour,
                profitable_word(m)
            ));
        }
    }
    lines
}

/// `profitable`, `unprofitable`, or `not judged yet`, from the Profitable condition.
fn profitable_word(m: &micromine_fleet::status::MinerView) -> &'static str {
    match m
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Profitable")
        .map(|c| c.status.as_str())
    {
        Some("True") => "profitable",
        Some("False") => "unprofitable",
        _ => "not judged yet",
    }
}

/// One line per MicroMiner with economics: what its energy cost against what its accepted
/// work is expected to earn.
fn economics_lines(view: &FleetView) -> Vec<String> {
    view.miners
        .iter()
        .filter_map(|m| {
            let e = m.status.economics.as_ref()?;
            Some(format!(
                "MicroMiner {}: energy {:.3} Wh costing {:.6}, expected revenue {:.6}: {}",
                m.key,
                e.energy_k_wh * 1000.0,
                e.energy_cost,
                e.revenue,
                profitable_word(m)
            ))
        })
        .collect()
}

/// The closing summary.
pub fn summary_lines(summary: &Summary) -> Vec<String> {
    let secs = summary.elapsed.as_secs_f64().max(1e-3);
    let t = &summary.view.totals;
    let mut lines = vec![
        format!(
            "ran {:.1}s with {} devices",
            secs,
            summary.view.devices.len()
        ),
        format!(
            "hashed {:.3e} nonces ({} average); accepted shares prove {}",
            summary.hashes as f64,
            human_rate(summary.hashes as f64 / secs),
            human_rate(t.accepted_difficulty * 4_294_967_296.0 / secs)
        ),
        format!(
            "shares: {} accepted, {} rejected (low difficulty {}, duplicate {}, stale {}, out of range {}, unknown assignment {})",
            t.accepted,
            t.rejected.total(),
            t.rejected.low_difficulty,
            t.rejected.duplicate,
            t.rejected.stale,
            t.rejected.out_of_range,
            t.rejected.unknown_assignment
        ),
        format!("blocks found: {}", t.blocks),
    ];
    lines.extend(economics_lines(&summary.view));
    match &summary.data_dir {
        Some(dir) => lines.push(format!(
            "ledger kept in {} (run again to continue it)",
            dir.join("store.redb").display()
        )),
        None => lines.push("state was temporary; pass --data-dir to keep the ledger".to_string()),
    }
    lines
}

/// Live progress: redrawn in place on a terminal, plain lines every few seconds otherwise.
struct Display {
    terminal: bool,
    drawn: usize,
    last_plain: Option<Instant>,
}

impl Display {
    fn new() -> Display {
        Display {
            terminal: std::io::stdout().is_terminal(),
            drawn: 0,
            last_plain: None,
        }
    }

    fn show(&mut self, view: &FleetView, elapsed: Duration) {
        let lines = progress_lines(view, elapsed);
        let mut out = std::io::stdout().lock();
        if self.terminal {
            // Move up over the previous frame and clear to the end of the screen.
            if self.drawn > 0 {
                let _ = write!(out, "\x1b[{}A", self.drawn);
            }
            let _ = write!(out, "\x1b[J");
            for line in &lines {
                let _ = writeln!(out, "{line}");
            }
            self.drawn = lines.len();
        } else if self
            .last_plain
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            self.last_plain = Some(Instant::now());
            for line in lines.iter().skip(2) {
                let _ = writeln!(out, "[{:>4}s] {line}", elapsed.as_secs());
            }
        }
        let _ = out.flush();
    }

    fn finish(&mut self) {
        self.drawn = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_have_units() {
        assert_eq!(human_rate(0.0), "0.00 H/s");
        assert_eq!(human_rate(12_345_678.0), "12.35 MH/s");
        assert_eq!(human_rate(2.5e15), "2500.00 TH/s");
    }

    #[test]
    fn the_example_manifest_is_valid() {
        let miners = micromine_resources::microminer::parse_str(
            "examples/quickstart.yaml",
            EXAMPLE_MANIFEST,
        )
        .expect("valid");
        assert_eq!(miners.len(), 1);
        assert_eq!(miners[0].key(), "default/quickstart");
        let plant = micromine_resources::microminer::parse_str(
            "examples/plant-3.yaml",
            include_str!("../../examples/plant-3.yaml"),
        )
        .expect("valid");
        assert_eq!(plant[0].key(), "default/plant-3");
    }
}
