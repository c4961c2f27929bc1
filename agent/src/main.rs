//! `micromine-agent`: the device side of micromine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use micromine_agent::engine::{self, EngineKind};
use micromine_agent::sensors::{SensorPaths, Sensors};
use micromine_agent::session::{self, AgentConfig, AgentCounters};
use micromine_agent::telemetry::AgentTelemetry;
use micromine_agent::{bench, capacity};
use micromine_proto::token::BootstrapToken;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "micromine-agent",
    version,
    about = "Mine on an edge device for a micromine fleet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a fleet and mine what the controller assigns.
    Run {
        /// The controller's gRPC address.
        #[arg(long, value_name = "https://HOST:PORT")]
        controller: String,
        /// Bootstrap token from `micromine-controller token create` (first start only).
        #[arg(long, env = "MICROMINE_TOKEN", value_name = "TOKEN")]
        token: Option<String>,
        /// Device name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Labels to report, e.g. `site=plant-3,class=gateway`.
        #[arg(long, value_name = "k=v,...")]
        labels: Option<String>,
        /// Where the device key and certificates live.
        #[arg(long, default_value = "/var/lib/micromine-agent")]
        state_dir: PathBuf,
        /// Trust this CA bundle instead of the fingerprint in the token.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Hashing threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Hashing engine (`auto` picks the fastest this CPU runs).
        #[arg(long, default_value = "auto")]
        engine: String,
        /// Log as JSON lines.
        #[arg(long)]
        log_json: bool,
        /// Where sysfs is mounted (thermal zones, power supplies); a container that
        /// mounts the host's elsewhere points here.
        #[arg(long, default_value = "/sys", value_name = "DIR")]
        sysfs_root: PathBuf,
        /// Where procfs is mounted (CPU load).
        #[arg(long, default_value = "/proc", value_name = "DIR")]
        proc_root: PathBuf,
    },
    /// Measure this device's hash rate with every engine its CPU runs.
    Bench {
        /// How long to measure each engine, in seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Hashing threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// The engine `run` would use (`auto` picks the fastest this CPU runs); measured
        /// first and marked as selected.
        #[arg(long, default_value = "auto")]
        engine: String,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Where sysfs is mounted (for the power draw, to report hashes per joule).
        #[arg(long, default_value = "/sys", value_name = "DIR")]
        sysfs_root: PathBuf,
    },
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench {
            seconds,
            threads,
            engine,
            json,
            sysfs_root,
        } => {
            let selected = engine::select(Some(&engine))?;
            if !(seconds.is_finite() && (0.05..=3600.0).contains(&seconds)) {
                anyhow::bail!("--seconds: {seconds} is not between 0.05 and 3600");
            }
            let threads = threads.unwrap_or_else(|| capacity::cores() as usize);
            let mut sensors = Sensors::new(SensorPaths {
                sysfs: sysfs_root,
                ..SensorPaths::default()
            });
            let order = std::iter::once(selected)
                .chain(EngineKind::available().filter(|kind| *kind != selected));
            let reports: Vec<bench::BenchReport> = order
                .map(|kind| {
                    bench::run(
                        kind,
                        threads,
                        Duration::from_secs_f64(seconds),
                        Some(&mut sensors),
                    )
                })
                .collect();
            if json {
                let out = serde_json::json!({
                    "selected": selected.name(),
                    "cpu": capacity::cpu_model(),
                    "results": reports,
                });
                println!("{out}");
            } else {
                println!("{}", bench::table(selected, &reports));
            }
            Ok(())
        }
        Command::Run {
            controller,
            token,
            name,
            labels,
            state_dir,
            ca_file,
            threads,
            engine,
            log_json,
            sysfs_root,
            proc_root,
        } => {
            init_logging(log_json);
            let token = token
                .map(|t| t.parse::<BootstrapToken>())
                .transpose()
                .context("--token")?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let config = AgentConfig {
                controller,
                token,
                name,
                labels: micromine_agent::cli::parse_labels(labels.as_deref())?,
                state_dir,
                ca_file,
                threads: threads.unwrap_or_else(|| capacity::cores() as usize),
                engine: engine::select(Some(&engine))?,
                bench_duration: Duration::from_secs(1),
                backoff_base: Duration::from_millis(500),
                backoff_max: Duration::from_secs(30),
                // The OTLP exporter, when asked for, needs the runtime.
                telemetry: {
                    let _runtime = runtime.enter();
                    AgentTelemetry::from_env()
                },
                sensors: SensorPaths {
                    sysfs: sysfs_root,
                    proc: proc_root,
                },
            };
            runtime.block_on(async move {
                let shutdown = CancellationToken::new();
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    micromine_agent::cli::wait_for_signal().await;
                    tracing::info!("stopping");
                    signal.cancel();
                });
                let counters = Arc::new(AgentCounters::default());
                let stats = session::run(config, counters, shutdown).await?;
                tracing::info!(
                    accepted = stats.accepted,
                    rejected = stats.rejected,
                    blocks = stats.blocks,
                    "stopped"
                );
                Ok(())
            })
        }
    }
}
