//! `micromine-agent`: the device side of micromine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use micromine_agent::config::{self, ConfigError};
use micromine_agent::engine::{self, EngineKind};
use micromine_agent::sensors::{SensorPaths, Sensors};
use micromine_agent::session::{self, AgentConfig, AgentCounters};
use micromine_agent::traces::AgentTelemetry;
use micromine_agent::{bench, calibrate, capacity, simulate};
use micromine_proto::token::BootstrapToken;

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
    ///
    /// Flags override the env file (`--env-file`); the bootstrap token comes from
    /// `--token-file`, `MICROMINE_TOKEN_FILE`, or the systemd credential
    /// `micromine-agent.token` (`LoadCredential=`), so that it is never on a command line.
    Run {
        #[command(flatten)]
        settings: config::RunArgs,
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
    /// Run a fleet of virtual devices against a controller, to size it or test it: each
    /// device enrolls and holds its own mTLS session, hashes for real at a simulated rate,
    /// reports synthetic telemetry, and may drop its link now and then.
    Simulate {
        /// The controller's gRPC address.
        #[arg(long, value_name = "https://HOST:PORT")]
        controller: String,
        /// Bootstrap token with a use for every device (first run only; later runs reuse
        /// the enrollments in --state-dir).
        #[arg(long, env = "MICROMINE_TOKEN", value_name = "TOKEN")]
        token: Option<String>,
        /// How many devices.
        #[arg(long)]
        devices: usize,
        /// Labels every device reports, e.g. `site=sim`.
        #[arg(long, value_name = "k=v,...")]
        labels: Option<String>,
        /// Where the devices' keys and certificates live (a directory per device).
        #[arg(long, default_value = "micromine-sim")]
        state_dir: PathBuf,
        /// Trust this CA bundle instead of the fingerprint in the token.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Each device's hash rate, H/s: what it really hashes and reports having hashed.
        #[arg(long, default_value_t = 1000.0, value_name = "H/s")]
        hashrate: f64,
        /// The full-speed rate each device claims when it connects (default: --hashrate).
        /// The controller sizes work by it and starts each device's share difficulty from
        /// it; a claim off the mark shows how vardiff finds the real rate from the shares.
        #[arg(long, value_name = "H/s")]
        claimed_hashrate: Option<f64>,
        /// Link drops per device per minute (0.1: each device loses its link about every
        /// ten minutes, and reconnects with backoff).
        #[arg(long, default_value_t = 0.0, value_name = "RATE")]
        churn: f64,
        /// Device names are PREFIX-00001 and on.
        #[arg(long, default_value = "sim")]
        name_prefix: String,
        /// Hashing threads shared by all devices.
        #[arg(long, default_value_t = 1)]
        hash_threads: usize,
        /// Devices started per second.
        #[arg(long, default_value_t = 500.0, value_name = "N")]
        ramp: f64,
        /// Stop after this many seconds (default: at Ctrl-C or SIGTERM).
        #[arg(long, value_name = "SECS")]
        duration: Option<f64>,
        /// Seconds between progress lines.
        #[arg(long, default_value_t = 5.0, value_name = "SECS")]
        report_every: f64,
        /// Print progress lines as JSON.
        #[arg(long)]
        json: bool,
        /// At the end, write what each device had acknowledged (JSON) to this file.
        #[arg(long, value_name = "FILE")]
        tally: Option<PathBuf>,
        /// Longest reconnect delay, seconds (the first is a tenth of a second; delays
        /// double with full jitter up to this).
        #[arg(long, default_value_t = 30.0, value_name = "SECS")]
        backoff_max: f64,
    },
    /// Measure this device's hash rate with every engine its CPU runs.
    Bench {
        /// How long to measure each engine, in seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Hashing threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// The engine `run` would use (`auto` times every engine this CPU runs, as `run`
        /// does at its first start, and picks the fastest); measured first and marked as
        /// selected.
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

/// Logging to stderr; `RUST_LOG` overrides `default_filter`.
fn init_logging(json: bool, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            // A device that cannot work as configured should not be restarted in a loop
            // (the packaged unit has RestartPreventExitStatus=78); anything else may pass.
            let misconfigured = e.chain().any(|cause| {
                cause.is::<ConfigError>()
                    || matches!(
                        cause.downcast_ref::<session::AgentError>(),
                        Some(session::AgentError::NeedsToken(_))
                    )
            });
            ExitCode::from(if misconfigured {
                config::EXIT_CONFIG
            } else {
                1
            })
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    // Each device connection needs a descriptor; see the function.
    micromine_host::cli::raise_open_files_limit();
    match cli.command {
        Command::Bench {
            seconds,
            threads,
            engine,
            json,
            sysfs_root,
        } => {
            let request = engine::select(Some(&engine))?;
            if !(seconds.is_finite() && (0.05..=3600.0).contains(&seconds)) {
                anyhow::bail!("--seconds: {seconds} is not between 0.05 and 3600");
            }
            // The same choice `run` makes at start, without its cache: the table then shows
            // whether the calibration picked what the longer measurement finds fastest.
            let selection = calibrate::select(
                request,
                &calibrate::Context::this_machine(None),
                calibrate::single_thread_rate,
            );
            let selected = selection.engine;
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
                    "basis": selection.basis.name(),
                    "calibration": selection.rates,
                    "cpu": capacity::cpu_model(),
                    "results": reports,
                });
                println!("{out}");
            } else {
                println!("{}", bench::table(&selection, &reports));
            }
            Ok(())
        }
        Command::Simulate {
            controller,
            token,
            devices,
            labels,
            state_dir,
            ca_file,
            hashrate,
            claimed_hashrate,
            churn,
            name_prefix,
            hash_threads,
            ramp,
            duration,
            report_every,
            json,
            tally,
            backoff_max,
        } => {
            // Thousands of devices each logging their sessions would drown the progress.
            init_logging(false, "warn,micromine_agent::simulate=info");
            let token = token
                .map(|t| t.parse::<BootstrapToken>())
                .transpose()
                .context("--token")?;
            let positive = |flag: &str, value: f64| {
                if value.is_finite() && value > 0.0 {
                    Ok(value)
                } else {
                    Err(anyhow::anyhow!(
                        "{flag}: {value} must be a number above zero"
                    ))
                }
            };
            if devices == 0 {
                anyhow::bail!("--devices: must be at least 1");
            }
            if !(churn.is_finite() && churn >= 0.0) {
                anyhow::bail!(
                    "--churn: {churn} must be zero or more link drops per device per minute"
                );
            }
            micromine_agent::identity::validate_device_name(&format!("{name_prefix}-00001"))
                .context("--name-prefix")?;
            let config = simulate::SimulateConfig {
                controller,
                token,
                devices,
                name_prefix,
                labels: micromine_host::cli::parse_labels(labels.as_deref())?,
                state_dir,
                ca_file,
                hashrate: positive("--hashrate", hashrate)?,
                claimed_hashrate: claimed_hashrate
                    .map(|c| positive("--claimed-hashrate", c))
                    .transpose()?,
                churn_per_minute: churn,
                hash_threads: hash_threads.max(1),
                ramp_per_second: positive("--ramp", ramp)?,
                duration: duration
                    .map(|d| positive("--duration", d).map(Duration::from_secs_f64))
                    .transpose()?,
                report_every: Duration::from_secs_f64(positive("--report-every", report_every)?),
                backoff: (
                    Duration::from_millis(100),
                    Duration::from_secs_f64(positive("--backoff-max", backoff_max)?.max(0.1)),
                ),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let shutdown = micromine_host::cli::cancel_on_signal(Some(
                    "stopping: devices hand back their work",
                ));
                let result = simulate::run(config, shutdown, |line| {
                    if json {
                        println!("{}", serde_json::to_string(line).unwrap_or_default());
                    } else {
                        println!("{line}");
                    }
                })
                .await;
                println!(
                    "simulation stopped: {} devices, {} shares accepted, {} rejected, {} failed",
                    result.devices.len(),
                    result.accepted,
                    result.rejected,
                    result.failures.len()
                );
                for (device, why) in result.failures.iter().take(5) {
                    eprintln!("{device}: {why}");
                }
                if let Some(path) = tally {
                    let text = serde_json::to_string_pretty(&result)?;
                    std::fs::write(&path, text)
                        .with_context(|| format!("--tally: writing {}", path.display()))?;
                }
                if !result.failures.is_empty() && result.failures.len() == result.devices.len() {
                    anyhow::bail!("every device failed");
                }
                Ok(())
            })
        }
        Command::Run {
            settings,
            log_json,
            sysfs_root,
            proc_root,
        } => {
            let credentials_dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
            let settings = config::resolve(settings, credentials_dir.as_deref())?;
            init_logging(log_json, settings.log_filter.as_deref().unwrap_or("info"));
            match &settings.token_source {
                config::TokenSource::File(path) => {
                    tracing::info!(file = %path.display(), "bootstrap token read")
                }
                config::TokenSource::MissingFile(path) => tracing::info!(
                    file = %path.display(),
                    "no token file; this device has enrolled and needs none"
                ),
                config::TokenSource::Given | config::TokenSource::None => {}
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let config = AgentConfig {
                controller: settings.controller,
                token: settings.token,
                name: settings.name,
                labels: settings.labels,
                state_dir: settings.state_dir,
                ca_file: settings.ca_file,
                threads: settings
                    .threads
                    .unwrap_or_else(|| capacity::cores() as usize),
                engine: settings.engine,
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
                simulation: None,
            };
            runtime.block_on(async move {
                let shutdown = micromine_host::cli::cancel_on_signal(Some("stopping"));
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
