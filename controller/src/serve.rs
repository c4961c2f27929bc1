//! The serving core both modes run: the embedded store under the data directory, the
//! fleet, the fleet CA, bootstrap tokens, the gRPC and HTTP listeners and the periodic
//! tasks. Standalone mode ([`start`]) adds MicroMiners from a manifests directory
//! (`manifests_dir`); the Kubernetes-mode leader ([`start_for_kubernetes`]) runs it without
//! one, with bootstrap tokens and pool passwords from Secrets.
//!
//! Data directory layout: `store.redb` (ledger and fleet state), `pki/` (CA, unless
//! `--pki-dir` says otherwise), `tokens/` (bootstrap tokens), `revocations/` (revoked
//! devices).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use micromine_proto::MAX_MESSAGE_BYTES;
use micromine_proto::pb::{enrollment_server::EnrollmentServer, fleet_server::FleetServer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::grpc::{EnrollmentService, FleetService};
use crate::http::{self, HttpState};
use crate::manifests_dir::{ManifestWatcher, report_manifests};
use crate::metrics::{Metrics, MetricsOptions};
use crate::periodic::Every;
use crate::pki::Pki;
use crate::revocation::{RevocationStore, Revocations};
use crate::tls::{self, ServerTls};
use crate::token_source::TokenSource;
use crate::tokens::TokenStore;
use micromine_fleet::status::ManifestStatus;
use micromine_store::ledger::Ledger;
use micromine_store::store::Store;

/// TLS handshakes in flight at once.
const MAX_HANDSHAKES: usize = 512;
/// HTTP/2 streams one connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 4;
/// How often the serving certificate's expiry is checked.
const SERVING_CERT_CHECK: Duration = Duration::from_secs(3600);
/// The serving certificate is reissued when less than this is left (of its 90 days).
const SERVING_CERT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often settled share records are pruned from the ledger.
const LEDGER_PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// How to run the serving core (standalone mode, or the Kubernetes-mode leader).
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Directory of MicroMiner YAML files; `None` in Kubernetes mode, where the
    /// MicroMiner reconciler hands the fleet its miners.
    pub manifests: Option<PathBuf>,
    /// Directory for the store, tokens and (by default) the CA.
    pub data_dir: PathBuf,
    /// gRPC (TLS) listen address.
    pub listen: SocketAddr,
    /// HTTP (health, status) listen address.
    pub http_listen: SocketAddr,
    /// Where the CA lives, if not `<data_dir>/pki`.
    pub pki_dir: Option<PathBuf>,
    /// A CA managed elsewhere (certificate and key PEM files, e.g. a cert-manager Secret
    /// mounted as `tls.crt` and `tls.key`), used instead of `pki_dir`.
    pub ca_files: Option<(PathBuf, PathBuf)>,
    /// Extra names and addresses for the serving certificate.
    pub tls_sans: Vec<String>,
    /// Lifetime of device certificates.
    pub device_cert_ttl: Duration,
    /// How often the manifests directory is re-read.
    pub manifest_poll: Duration,
    /// Expose per-device series on `/metrics`.
    pub per_device_metrics: bool,
}

impl ControllerConfig {
    /// Defaults for everything but the two directories.
    pub fn new(manifests: PathBuf, data_dir: PathBuf) -> ControllerConfig {
        ControllerConfig {
            manifests: Some(manifests),
            data_dir,
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            pki_dir: None,
            ca_files: None,
            tls_sans: Vec::new(),
            device_cert_ttl: Duration::from_secs(24 * 3600),
            manifest_poll: Duration::from_secs(1),
            per_device_metrics: false,
        }
    }

    /// Kubernetes mode: no manifests directory, the rest as in [`ControllerConfig::new`].
    pub fn for_kubernetes(data_dir: PathBuf) -> ControllerConfig {
        ControllerConfig {
            manifests: None,
            ..ControllerConfig::new(PathBuf::new(), data_dir)
        }
    }

    /// The fleet CA: the mounted files if given, else the CA directory's (made on first
    /// start).
    pub fn load_pki(&self) -> Result<Pki, crate::pki::PkiError> {
        match &self.ca_files {
            Some((cert, key)) => Pki::load_files(cert, key),
            None => Pki::load_or_create(&self.pki_dir()),
        }
    }

    /// The CA directory in effect.
    pub fn pki_dir(&self) -> PathBuf {
        self.pki_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("pki"))
    }
}

/// The token directory under a data directory.
pub fn tokens_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tokens")
}

/// The revocation directory under a data directory.
pub fn revocations_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("revocations")
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The manifests directory is missing.
    #[error("--manifests {0}: not a directory")]
    NoManifests(PathBuf),
    /// The CA could not be loaded or made.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// The token directory could not be opened.
    #[error(transparent)]
    Tokens(#[from] crate::tokens::TokenError),
    /// The revocation directory could not be opened.
    #[error(transparent)]
    Revocations(#[from] crate::revocation::RevocationError),
    /// Metrics could not be set up.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The store could not be opened.
    #[error("store {path}: {source}")]
    Store {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: micromine_store::store::StoreError,
    },
    /// The ledger could not be loaded.
    #[error(transparent)]
    Ledger(#[from] micromine_store::ledger::LedgerError),
    /// The fleet state could not be restored.
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running controller (standalone, or the Kubernetes-mode leader).
pub struct Controller {
    /// Where gRPC listens (resolved, also when port 0 was asked for).
    pub grpc_addr: SocketAddr,
    /// Where HTTP listens.
    pub http_addr: SocketAddr,
    /// The live fleet.
    pub fleet: Arc<Fleet>,
    /// The fleet CA.
    pub pki: Arc<Pki>,
    /// Bootstrap tokens.
    pub tokens: Arc<TokenStore>,
    /// Manifest problems, by file.
    pub manifests: Arc<Mutex<ManifestStatus>>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    store: Store,
}

/// Starts a controller: opens the store, restores the fleet, reads the manifests, and
/// serves gRPC and HTTP until [`Controller::stop`].
pub async fn start(config: ControllerConfig) -> Result<Controller, StartError> {
    start_serving(config, None).await
}

/// Starts the serving half of a Kubernetes-mode controller (the leader's): like
/// [`start`] without a manifests directory, with bootstrap tokens from Secrets. The
/// MicroMiner reconciler hands the fleet its miners.
pub async fn start_for_kubernetes(
    config: ControllerConfig,
    secrets: crate::kubernetes::tokens::SecretTokens,
) -> Result<Controller, StartError> {
    start_serving(config, Some(secrets)).await
}

async fn start_serving(
    config: ControllerConfig,
    secrets: Option<crate::kubernetes::tokens::SecretTokens>,
) -> Result<Controller, StartError> {
    if let Some(dir) = &config.manifests
        && !dir.is_dir()
    {
        return Err(StartError::NoManifests(dir.clone()));
    }
    let pki = Arc::new(config.load_pki()?);
    let tokens = Arc::new(TokenStore::open(&tokens_dir(&config.data_dir))?);
    let pool_secrets = secrets
        .as_ref()
        .map(|s| crate::kubernetes::pool_secrets::SecretPasswords::new(s.client()));
    let token_source = match secrets {
        Some(secrets) => TokenSource::Secrets(Box::new(secrets)),
        None => TokenSource::Files(tokens.clone()),
    };
    let store_path = config.data_dir.join("store.redb");
    let store = Store::open(&store_path).map_err(|source| StartError::Store {
        path: store_path.clone(),
        source,
    })?;
    let ledger = Ledger::open(store.clone())?;
    let fleet = Fleet::open(store.clone(), ledger).await?;
    match (&config.manifests, pool_secrets) {
        (Some(dir), _) => fleet.set_passwords(Arc::new(
            micromine_stratum::passwords::FilePasswords::new(dir.clone()),
        )),
        (None, Some(secrets)) => fleet.set_passwords(Arc::new(secrets)),
        (None, None) => {}
    }
    let metrics = Metrics::new(
        &fleet,
        MetricsOptions {
            per_device: config.per_device_metrics,
        },
        pki.cas().map(|ca| ca.not_after_unix_s).collect(),
    )?;
    fleet.set_metrics(metrics.clone());

    let status = Arc::new(Mutex::new(ManifestStatus::default()));
    let mut watcher = config.manifests.as_deref().map(ManifestWatcher::new);
    if let Some(watcher) = watcher.as_mut() {
        let initial = watcher.scan();
        report_manifests(&initial, &status);
        fleet.apply_miners(&initial.miners);
    }

    let revocation_store = RevocationStore::open(&revocations_dir(&config.data_dir))?;
    let revocations = Arc::new(Revocations::default());
    let (initial_revocations, problems) = revocation_store.load();
    for problem in &problems {
        tracing::error!(%problem, "revocation record unreadable");
    }
    revocations.replace(initial_revocations);
    fleet.set_revocations(revocations.clone());
    let identity = pki.issue_server_identity(&config.tls_sans)?;
    for ca in pki.rotation() {
        tracing::info!(role = %ca.role, fingerprint = %hex::encode(ca.fingerprint()), "CA rotation under way: also trusting this CA");
    }
    let server_tls = Arc::new(ServerTls::new(
        &pki.trust_anchors(),
        identity,
        revocations.clone(),
    )?);
    let grpc_listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.http_listen,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.http_listen,
            source,
        })?;

    let shutdown = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();

    let fleet_service = FleetService::new(
        fleet.clone(),
        pki.clone(),
        revocations.clone(),
        config.device_cert_ttl,
        shutdown.clone(),
    );
    let enrollment_service = EnrollmentService::new(
        fleet.clone(),
        pki.clone(),
        token_source,
        config.device_cert_ttl,
    );
    let incoming = tls::tls_incoming(grpc_listener, server_tls.clone(), MAX_HANDSHAKES);
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            // One session stream and the odd enrollment or renewal per connection: a
            // device has no business opening more.
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(
                FleetServer::new(fleet_service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                EnrollmentServer::new(enrollment_service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    }));

    let state = HttpState {
        fleet: fleet.clone(),
        manifests: status.clone(),
        ready: ready.clone(),
        role: if config.manifests.is_some() {
            "standalone"
        } else {
            "leader"
        },
        metrics: Some(metrics),
        store: store.clone(),
    };
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = http::serve(http_listener, state, stop.cancelled_owned()).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    }));

    let tick_fleet = fleet.clone();
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let mut every = Every::new(Duration::from_secs(1), stop);
        while every.tick().await {
            tick_fleet.tick();
        }
    }));

    let prune_fleet = fleet.clone();
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let mut every = Every::after(LEDGER_PRUNE_INTERVAL, stop);
        while every.tick().await {
            match prune_fleet.prune_ledger().await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "settled share records pruned"),
                Err(e) => tracing::warn!(error = %e, "pruning the ledger failed"),
            }
        }
    }));

    // Revocations: picked up within a second, live sessions of newly revoked devices cut.
    let revoke_fleet = fleet.clone();
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let mut every = Every::new(Duration::from_secs(1), stop);
        let mut reported: Vec<String> = Vec::new();
        while every.tick().await {
            let (found, problems) = revocation_store.load();
            let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
            if messages != reported {
                for problem in &messages {
                    tracing::error!(%problem, "revocation record unreadable");
                }
                reported = messages;
            }
            for device in revocations.replace(found) {
                revoke_fleet.cut(&device, "certificate revoked");
            }
        }
    }));

    // The serving certificate is reissued well before it expires; agents pin the CA, so
    // they accept the new one on their next connection without anyone touching them.
    let stop = shutdown.clone();
    let rotate_pki = pki.clone();
    let rotate_tls = server_tls.clone();
    let sans = config.tls_sans.clone();
    tasks.push(tokio::spawn(async move {
        let mut every = Every::new(SERVING_CERT_CHECK, stop);
        while every.tick().await {
            let left_ms = rotate_tls.serving_not_after_unix_ms() - crate::fleet::now_ms();
            if left_ms > SERVING_CERT_RENEW_BEFORE.as_millis() as i64 {
                continue;
            }
            match rotate_pki.issue_server_identity(&sans).map_err(|e| e.to_string()).and_then(|id| {
                rotate_tls.rotate(id).map_err(|e| e.to_string())
            }) {
                Ok(()) => tracing::info!(not_after_unix_ms = rotate_tls.serving_not_after_unix_ms(), "serving certificate rotated"),
                Err(e) => tracing::error!(error = %e, "rotating the serving certificate failed; will retry"),
            }
        }
    }));

    if let Some(mut watcher) = watcher {
        let watch_fleet = fleet.clone();
        let watch_status = status.clone();
        let stop = shutdown.clone();
        let poll = config.manifest_poll;
        tasks.push(tokio::spawn(async move {
            let mut every = Every::new(poll, stop);
            while every.tick().await {
                // Reading files is blocking I/O; keep it off the async workers.
                let (back, scan) = match tokio::task::spawn_blocking(move || {
                    let scan = watcher.scan();
                    (watcher, scan)
                })
                .await
                {
                    Ok(result) => result,
                    Err(e) => {
                        tracing::error!(error = %e, "manifest scan failed; watching stops");
                        break;
                    }
                };
                watcher = back;
                if scan.changed {
                    report_manifests(&scan, &watch_status);
                    watch_fleet.apply_miners(&scan.miners);
                }
            }
        }));
    }

    ready.store(true, Ordering::Release);
    tracing::info!(grpc = %grpc_addr, http = %http_addr, data_dir = %config.data_dir.display(),
        ca_fingerprint = %hex::encode(pki.ca_fingerprint()), "controller running");
    Ok(Controller {
        grpc_addr,
        http_addr,
        fleet,
        pki,
        tokens,
        manifests: status,
        shutdown,
        tasks,
        store,
    })
}

impl Controller {
    /// Stops serving, tells agents to go, and waits until every acknowledged write is on
    /// disk.
    pub async fn stop(self) {
        self.fleet.drain_all("controller shutting down");
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        if let Err(e) = self.fleet.flush().await {
            tracing::error!(error = %e, "final store flush failed");
        }
        drop(self.fleet);
        // Closing from a blocking thread: it joins the writer thread.
        let store = self.store;
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
    }

    /// Where the listeners are bound, as `run --listen-addresses-file` writes it.
    pub fn listen_addresses(&self) -> ListenAddresses {
        ListenAddresses {
            grpc: self.grpc_addr,
            http: self.http_addr,
        }
    }

    /// The `https://` URL agents on this machine use.
    pub fn grpc_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc_addr.port())
    }
}

/// The addresses a running controller's listeners are bound to (resolved: the port the
/// system picked where port 0 was asked for). Serialized as
/// `{"grpc":"127.0.0.1:40123","http":"127.0.0.1:40124"}` for `--listen-addresses-file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListenAddresses {
    /// The gRPC (TLS) listener agents connect to.
    pub grpc: SocketAddr,
    /// The HTTP listener (health, status, metrics).
    pub http: SocketAddr,
}
