//! `micromine-controller`: the micromine control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use micromine_controller::kubernetes::{self, run::KubernetesConfig, tokens::SecretTokens};
use micromine_controller::pki::{self, CaRole, Pki};
use micromine_controller::quickstart::{self, QuickstartConfig};
use micromine_controller::revocation::RevocationStore;
use micromine_controller::serve::{self, ControllerConfig};
use micromine_controller::tokens::{TokenSpec, TokenStore, now_unix_ms, parse_duration};
use micromine_resources::crd;

#[derive(Parser)]
#[command(
    name = "micromine-controller",
    version,
    about = "Run a micromine fleet"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once at start-up; boxing the big variant would only make matching clumsier.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// A working local fleet: a controller and N agents on this machine, no cluster.
    Quickstart {
        /// Local devices.
        #[arg(long, default_value_t = 3)]
        devices: usize,
        /// Stop after this many seconds (default: at Ctrl-C).
        #[arg(long, value_name = "SECS")]
        duration: Option<u64>,
        /// Keep the state (ledger, CA, device keys) here instead of a temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Hashing threads per device (default: the cores shared out).
        #[arg(long)]
        threads: Option<usize>,
        /// Where the status API listens.
        #[arg(long, default_value = "127.0.0.1:0")]
        http_listen: SocketAddr,
    },
    /// Run the controller: standalone with `--manifests DIR`, or against a cluster with
    /// `--kubernetes` (in-cluster config, or KUBECONFIG).
    Run {
        /// Read MicroMiners from this directory (standalone mode).
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "kubernetes",
            conflicts_with = "kubernetes"
        )]
        manifests: Option<PathBuf>,
        /// Kubernetes mode: MicroMiners and EdgeDevices from the API server, leader
        /// election among replicas, bootstrap tokens as Secrets.
        #[arg(long)]
        kubernetes: bool,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// CA certificate (PEM) managed elsewhere, e.g. a mounted cert-manager Secret's
        /// tls.crt; replaces the CA directory.
        #[arg(long, requires = "ca_key_file", value_name = "FILE")]
        ca_cert_file: Option<PathBuf>,
        /// The CA's private key (PKCS#8 PEM), e.g. tls.key.
        #[arg(long, requires = "ca_cert_file", value_name = "FILE")]
        ca_key_file: Option<PathBuf>,
        /// Store, tokens and CA live here.
        #[arg(long, default_value = "/var/lib/micromine")]
        data_dir: PathBuf,
        /// gRPC (TLS) address for agents.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// HTTP address for health and status.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_listen: SocketAddr,
        /// CA directory (default: <data-dir>/pki).
        #[arg(long)]
        pki_dir: Option<PathBuf>,
        /// Extra DNS names or IPs for the serving certificate (repeatable).
        #[arg(long = "tls-san", value_name = "NAME")]
        tls_sans: Vec<String>,
        /// Lifetime of device certificates, e.g. 24h.
        #[arg(long, default_value = "24h")]
        device_cert_ttl: String,
        /// Also expose per-device series (hash rate, share difficulty) on /metrics: one
        /// series per device each, so think of the fleet's size first.
        #[arg(long)]
        per_device_metrics: bool,
        /// Once every listener is bound, write the addresses they got to FILE as JSON,
        /// `{"grpc":"127.0.0.1:40123","http":"127.0.0.1:40124"}` (replaced atomically; a
        /// file left from an earlier run is removed at start). With port 0 in --listen or
        /// --http-listen, this is how to learn the port the system picked. Standalone mode
        /// only.
        #[arg(long, value_name = "FILE", conflicts_with = "kubernetes")]
        listen_addresses_file: Option<PathBuf>,
    },
    /// Bootstrap tokens for enrolling devices.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Devices: revoke and let back in (standalone mode).
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Print the MicroMiner and EdgeDevice CustomResourceDefinitions (YAML), for
    /// `kubectl apply --server-side -f -`, or write one file each into a directory.
    Crd {
        /// Write `<name>.yaml` files here (as in charts/micromine/crds/) instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// The fleet CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Cut a device off: its live session ends within seconds, its certificates are refused
    /// at the handshake, and it cannot enroll or renew until unrevoked.
    Revoke {
        /// The device (EdgeDevice) name.
        name: String,
        /// The controller's data directory.
        #[arg(long, default_value = "/var/lib/micromine")]
        data_dir: PathBuf,
    },
    /// Let a revoked device enroll again with a new token; its old certificates stay refused.
    Unrevoke {
        /// The device (EdgeDevice) name.
        name: String,
        /// The controller's data directory.
        #[arg(long, default_value = "/var/lib/micromine")]
        data_dir: PathBuf,
    },
}

/// Kubernetes mode settings.
#[derive(clap::Args, Clone)]
struct ClusterArgs {
    /// Namespace of the Lease, token Secrets, CA ConfigMap and EndpointSlice (default:
    /// the kubeconfig's or service account's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// The Lease replicas campaign for.
    #[arg(long, default_value = "micromine-controller")]
    lease_name: String,
    /// This replica's identity in the Lease (default: the host name, which is the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// A Service without a selector that the leader points at itself (EndpointSlice
    /// `<name>-leader`), so agents always reach the replica that serves.
    #[arg(long, requires = "advertise_address", value_name = "SERVICE")]
    grpc_service: Option<String>,
    /// This replica's address for that EndpointSlice (the pod IP).
    #[arg(long, value_name = "IP")]
    advertise_address: Option<std::net::IpAddr>,
}

/// A client for the cluster (in-cluster config, or KUBECONFIG) and the namespace to use.
async fn cluster(namespace: Option<String>) -> Result<(kube::Client, String)> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_string());
    Ok((client, namespace))
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("micromine-controller-{}", std::process::id()))
}

/// Where a `ca` command finds the CA.
#[derive(clap::Args)]
struct PkiLocation {
    /// The controller's data directory.
    #[arg(long, default_value = "/var/lib/micromine")]
    data_dir: PathBuf,
    /// CA directory (default: <data-dir>/pki).
    #[arg(long)]
    pki_dir: Option<PathBuf>,
}

impl PkiLocation {
    fn dir(self) -> PathBuf {
        self.pki_dir.unwrap_or_else(|| self.data_dir.join("pki"))
    }
}

#[derive(Subcommand)]
enum CaCommand {
    /// Print the CA bundle (PEM, the active CA first) for `micromine-agent --ca-file`; the
    /// active CA's SHA-256 fingerprint goes to stderr.
    Export(PkiLocation),
    /// Show the CAs the fleet trusts and the next step of a rotation under way.
    Status(PkiLocation),
    /// Rotation step 1: create the next CA. After a controller restart it is trusted and
    /// handed to every device that enrolls or renews.
    Stage(PkiLocation),
    /// Rotation step 2, once every device has renewed (one device certificate lifetime
    /// after the restart that followed `stage`): the next CA signs from the controller's
    /// next start; the old one stays trusted for the certificates it signed.
    Promote(PkiLocation),
    /// Rotation step 3, one device certificate lifetime after the restart that followed
    /// `promote`: stop trusting the old CA.
    Retire(PkiLocation),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// List tokens that can still be used (never their secrets).
    List {
        /// The controller's data directory.
        #[arg(long, default_value = "/var/lib/micromine")]
        data_dir: PathBuf,
        /// List the token Secrets in the cluster instead (your kubeconfig's credentials).
        #[arg(long)]
        kubernetes: bool,
        /// The controller's namespace (with --kubernetes; default: the kubeconfig's).
        #[arg(long, requires = "kubernetes")]
        namespace: Option<String>,
    },
    /// Create a token and print it (once; only its hash is stored).
    Create {
        /// The controller's data directory.
        #[arg(long, default_value = "/var/lib/micromine")]
        data_dir: PathBuf,
        /// CA directory (default: <data-dir>/pki).
        #[arg(long)]
        pki_dir: Option<PathBuf>,
        /// How long the token works, e.g. 15m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// How many devices may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Labels given to devices that enroll with it, e.g. site=plant-3.
        #[arg(long, value_name = "k=v,...")]
        labels: Option<String>,
        /// Store the token as a Secret in the controller's namespace (your kubeconfig's
        /// credentials); the CA fingerprint comes from the ConfigMap the controller
        /// publishes.
        #[arg(long, conflicts_with = "pki_dir")]
        kubernetes: bool,
        /// The controller's namespace (with --kubernetes; default: the kubeconfig's).
        #[arg(long, requires = "kubernetes")]
        namespace: Option<String>,
    },
}

fn ca_command(command: CaCommand) -> Result<()> {
    const RESTART: &str = "restart the controller for it to take effect";
    match command {
        CaCommand::Export(location) => {
            let pki = Pki::load_or_create(&location.dir())?;
            print!("{}", pki.bundle_pem());
            eprintln!("sha256 fingerprint: {}", hex::encode(pki.ca_fingerprint()));
        }
        CaCommand::Status(location) => {
            let pki = Pki::load_or_create(&location.dir())?;
            for ca in pki.cas() {
                let expires = jiff::Timestamp::from_second(ca.not_after_unix_s)
                    .map(|t| t.to_string())
                    .unwrap_or_else(|_| ca.not_after_unix_s.to_string());
                println!(
                    "{:<9} {}  expires {expires}",
                    ca.role.to_string(),
                    hex::encode(ca.fingerprint())
                );
            }
            let roles: Vec<CaRole> = pki.rotation().iter().map(|ca| ca.role).collect();
            let next = if roles.contains(&CaRole::Next) && roles.contains(&CaRole::Previous) {
                "retire the previous CA once every device has renewed since the last promotion (`ca retire`), then promote"
            } else if roles.contains(&CaRole::Next) {
                "promote (`ca promote`) once every device has renewed since the restart that followed `ca stage`"
            } else if roles.contains(&CaRole::Previous) {
                "retire (`ca retire`) once every device has renewed since the restart that followed `ca promote`"
            } else {
                "no rotation under way; `ca stage` starts one"
            };
            println!("next step: {next}");
        }
        CaCommand::Stage(location) => {
            let next = pki::stage_next_ca(&location.dir())?;
            println!(
                "staged the next CA {}; {RESTART}, then wait one device certificate lifetime so every device renews and learns it",
                hex::encode(next.fingerprint())
            );
        }
        CaCommand::Promote(location) => {
            let active = pki::promote_next_ca(&location.dir())?;
            println!(
                "CA {} is now active; {RESTART}. Bootstrap tokens made before this name the old CA: create new ones",
                hex::encode(active.fingerprint())
            );
        }
        CaCommand::Retire(location) => {
            let retired = pki::retire_previous_ca(&location.dir())?;
            println!(
                "CA {} is no longer trusted; {RESTART}",
                hex::encode(retired.fingerprint())
            );
        }
    }
    Ok(())
}

/// Removes a listen-addresses file left by an earlier run (none is fine).
fn remove_stale(path: &std::path::Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("--listen-addresses-file {}", path.display())),
    }
}

/// Writes where the running controller's listeners are bound, whole or not at all, so a
/// reader never sees half a document.
fn write_listen_addresses(path: &std::path::Path, controller: &serve::Controller) -> Result<()> {
    let json = serde_json::to_vec(&controller.listen_addresses())?;
    micromine_host::files::write_file_atomic(path, &json, 0o644)
        .with_context(|| format!("--listen-addresses-file {}", path.display()))?;
    tracing::info!(file = %path.display(), "listen addresses written");
    Ok(())
}

fn init_logging(format: LogFormat, default_level: &str) {
    micromine_controller::logging::init(matches!(format, LogFormat::Json), default_level);
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Each device connection needs a descriptor; see the function.
    micromine_host::cli::raise_open_files_limit();
    match cli.command {
        Command::Quickstart {
            devices,
            duration,
            data_dir,
            threads,
            http_listen,
        } => {
            // The live table is the interface here; logs only for problems.
            init_logging(cli.log_format, "warn");
            let config = QuickstartConfig {
                devices,
                duration: duration.map(Duration::from_secs),
                data_dir,
                threads_per_device: threads,
                http_listen,
            };
            let summary = runtime()?.block_on(async move {
                let shutdown = micromine_host::cli::cancel_on_signal(None);
                quickstart::run(config, shutdown).await
            })?;
            for line in quickstart::summary_lines(&summary) {
                println!("{line}");
            }
            Ok(())
        }
        Command::Run {
            manifests,
            kubernetes,
            cluster: cluster_args,
            ca_cert_file,
            ca_key_file,
            data_dir,
            listen,
            http_listen,
            pki_dir,
            tls_sans,
            device_cert_ttl,
            per_device_metrics,
            listen_addresses_file,
        } => {
            let rt = runtime()?;
            {
                // The OTLP exporter's gRPC client belongs to this runtime.
                let _inside = rt.enter();
                micromine_controller::logging::init_with_traces(
                    matches!(cli.log_format, LogFormat::Json),
                    "info",
                    "micromine-controller",
                );
            }
            let mut config = match manifests {
                Some(dir) => ControllerConfig::new(dir, data_dir),
                None => ControllerConfig::for_kubernetes(data_dir),
            };
            config.listen = listen;
            config.http_listen = http_listen;
            config.pki_dir = pki_dir;
            config.ca_files = ca_cert_file.zip(ca_key_file);
            config.tls_sans = tls_sans;
            config.device_cert_ttl =
                parse_duration(&device_cert_ttl).context("--device-cert-ttl")?;
            config.per_device_metrics = per_device_metrics;
            let result = rt.block_on(async move {
                if !kubernetes {
                    // A reader waiting for the file must never take the last run's
                    // addresses for this one's.
                    if let Some(path) = &listen_addresses_file {
                        remove_stale(path)?;
                    }
                    let controller = serve::start(config).await?;
                    if let Some(path) = &listen_addresses_file
                        && let Err(e) = write_listen_addresses(path, &controller)
                    {
                        controller.stop().await;
                        return Err(e);
                    }
                    micromine_host::cli::wait_for_signal().await;
                    tracing::info!("shutting down");
                    controller.stop().await;
                    return anyhow::Ok(());
                }
                let (client, namespace) = cluster(cluster_args.namespace).await?;
                let settings = KubernetesConfig {
                    controller: config,
                    namespace,
                    lease_name: cluster_args.lease_name,
                    identity: cluster_args.identity.unwrap_or_else(host_name),
                    grpc_service: cluster_args.grpc_service,
                    advertise_address: cluster_args.advertise_address,
                };
                let shutdown = micromine_host::cli::cancel_on_signal(Some("shutting down"));
                kubernetes::run::run(client, settings, shutdown).await?;
                Ok(())
            });
            {
                let _inside = rt.enter();
                micromine_controller::logging::flush_traces();
            }
            result
        }
        Command::Token {
            command:
                TokenCommand::List {
                    data_dir,
                    kubernetes,
                    namespace,
                },
        } => {
            init_logging(cli.log_format, "warn");
            let tokens = if kubernetes {
                runtime()?.block_on(async move {
                    let (client, namespace) = cluster(namespace).await?;
                    anyhow::Ok(SecretTokens::new(client, &namespace).list().await?)
                })?
            } else {
                TokenStore::open(&serve::tokens_dir(&data_dir))?.list()?
            };
            println!(
                "{:<18} {:>5} {:>15} LABELS",
                "ID", "USES", "EXPIRES(UNIX S)"
            );
            for token in tokens {
                let labels: Vec<String> = token
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!(
                    "{:<18} {:>5} {:>15} {}",
                    token.id_hex,
                    token.uses_remaining,
                    token.expires_unix_ms / 1000,
                    labels.join(",")
                );
            }
            Ok(())
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    data_dir,
                    pki_dir,
                    ttl,
                    uses,
                    labels,
                    kubernetes,
                    namespace,
                },
        } => {
            init_logging(cli.log_format, "warn");
            let spec = TokenSpec {
                ttl: parse_duration(&ttl).context("--ttl")?,
                uses,
                labels: micromine_host::cli::parse_labels(labels.as_deref())?,
            };
            let (token, record) = if kubernetes {
                runtime()?.block_on(async move {
                    let (client, namespace) = cluster(namespace).await?;
                    let fingerprint =
                        kubernetes::tokens::published_ca_fingerprint(client.clone(), &namespace)
                            .await?;
                    let created = SecretTokens::new(client, &namespace)
                        .create(&spec, fingerprint)
                        .await?;
                    anyhow::Ok(created)
                })?
            } else {
                let pki = Pki::load_or_create(&pki_dir.unwrap_or_else(|| data_dir.join("pki")))?;
                let store = TokenStore::open(&serve::tokens_dir(&data_dir))?;
                store.create(&spec, pki.ca_fingerprint())?
            };
            println!("{token}");
            eprintln!(
                "token {} allows {} enrollment(s) until {} (Unix ms); it is shown only once",
                record.id_hex, record.uses_remaining, record.expires_unix_ms
            );
            Ok(())
        }
        Command::Device { command } => {
            init_logging(cli.log_format, "warn");
            match command {
                DeviceCommand::Revoke { name, data_dir } => {
                    let store = RevocationStore::open(&serve::revocations_dir(&data_dir))?;
                    let revocation = store.revoke(&name, now_unix_ms())?;
                    println!(
                        "device {name} revoked at {} (Unix ms): a running controller cuts its session within seconds",
                        revocation.revoked_at_unix_ms
                    );
                }
                DeviceCommand::Unrevoke { name, data_dir } => {
                    let store = RevocationStore::open(&serve::revocations_dir(&data_dir))?;
                    match store.unblock(&name)? {
                        Some(_) => println!(
                            "device {name} may enroll again with a new token once a running controller has read this (within a second); its revoked certificates stay refused"
                        ),
                        None => anyhow::bail!("device {name} is not revoked"),
                    }
                }
            }
            Ok(())
        }
        Command::Crd { out_dir } => {
            init_logging(cli.log_format, "warn");
            match out_dir {
                None => print!("{}", crd::to_yaml_stream()?),
                Some(dir) => {
                    for path in crd::write_files(&dir)? {
                        eprintln!("wrote {}", path.display());
                    }
                }
            }
            Ok(())
        }
        Command::Ca { command } => {
            init_logging(cli.log_format, "warn");
            ca_command(command)
        }
    }
}
