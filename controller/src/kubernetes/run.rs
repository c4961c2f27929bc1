//! `micromine-controller run --kubernetes`: campaign for the Lease; while standing by,
//! answer health probes and nothing else; once leading, open the ledger, serve agents,
//! point the gRPC Service at this replica, and run the reconcilers. Leadership lost means
//! the process exits (after closing the ledger), so a restarted replica starts clean as a
//! standby rather than carrying a half-stopped leader's state.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::utils::{PredicateConfig, WatchStreamExt};
use kube::runtime::watcher::{self, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::FIELD_MANAGER;
use super::devices::{
    self, DEVICE_REFRESH_WRITES_PER_MINUTE, DevicePublisher, DeviceSpecs, WriteBudget,
};
use super::leader::LeaderElector;
use super::miners::{self, ChangeWatch, Context};
use super::tokens::{self as secret_tokens, SecretTokens};
use crate::fleet::now_ms;
use crate::http;
use crate::periodic::Every;
use crate::revocation::RevocationStore;
use crate::serve::{self, ControllerConfig, StartError, revocations_dir};
use micromine_resources::edgedevice::EdgeDevice;
use micromine_resources::microminer::MicroMiner;

/// How long a new leader keeps trying to open the ledger while the previous leader may
/// still be closing it.
const STORE_OPEN_PATIENCE: Duration = Duration::from_secs(30);
/// How often the fleet is compared with what MicroMiner statuses last said.
const FLEET_WATCH_PERIOD: Duration = Duration::from_secs(2);
/// Retry period for the CA ConfigMap and the EndpointSlice when the API server refuses.
const PUBLISH_RETRY: Duration = Duration::from_secs(5);

/// How to run in Kubernetes mode.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// Listeners, data directory, CA and certificates, as in standalone mode (without a
    /// manifests directory).
    pub controller: ControllerConfig,
    /// Where the Lease, token Secrets, CA ConfigMap and EndpointSlice live.
    pub namespace: String,
    /// The Lease replicas campaign for.
    pub lease_name: String,
    /// This replica's name in the Lease (the pod name).
    pub identity: String,
    /// The gRPC Service (without a selector) the leader points at itself, if any.
    pub grpc_service: Option<String>,
    /// This replica's address for that EndpointSlice (the pod IP).
    pub advertise_address: Option<IpAddr>,
}

/// Why Kubernetes mode stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The HTTP listener could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The leader could not start serving.
    #[error("starting to serve as leader: {0}")]
    Start(#[from] StartError),
    /// Another replica leads now; this process must not touch the ledger again.
    #[error("lost leadership of Lease {0}; exiting so the replica restarts as a standby")]
    LostLeadership(String),
}

/// Runs until `shutdown` (then releases the Lease) or until leadership is lost.
pub async fn run(
    client: kube::Client,
    config: KubernetesConfig,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let (leading_tx, mut leading) = watch::channel(false);
    let elector = LeaderElector::new(
        Api::<Lease>::namespaced(client.clone(), &config.namespace),
        &config.lease_name,
        &config.identity,
    );
    let campaign_stop = CancellationToken::new();
    let campaign = tokio::spawn(elector.run(leading_tx, campaign_stop.clone()));
    tracing::info!(lease = %config.lease_name, namespace = %config.namespace, identity = %config.identity, "campaigning for leadership");

    let result = async {
        let standby = serve_standby(config.controller.http_listen).await?;
        let became_leader = tokio::select! {
            _ = shutdown.cancelled() => false,
            changed = leading.wait_for(|lead| *lead) => changed.is_ok(),
        };
        standby.stop().await;
        if !became_leader {
            return Ok(());
        }
        tracing::info!(identity = %config.identity, "leading: opening the ledger and serving agents");
        lead(client, &config, &mut leading, &shutdown).await
    }
    .await;

    // The ledger is closed by now; only then may a standby take over.
    campaign_stop.cancel();
    let _ = campaign.await;
    result
}

struct Standby {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Standby {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn serve_standby(addr: SocketAddr) -> Result<Standby, RunError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { addr, source })?;
    let stop = CancellationToken::new();
    let until = stop.clone();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, http::standby_router())
            .with_graceful_shutdown(until.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "standby HTTP server stopped");
        }
    });
    Ok(Standby { stop, task })
}

async fn lead(
    client: kube::Client,
    config: &KubernetesConfig,
    leading: &mut watch::Receiver<bool>,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let secrets = SecretTokens::new(client.clone(), &config.namespace);
    let controller = start_with_patience(config.controller.clone(), secrets).await?;
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();

    let bundle = controller.pki.bundle_pem();
    let (c, ns) = (client.clone(), config.namespace.clone());
    tasks.push(tokio::spawn(retrying(
        stop.clone(),
        "CA ConfigMap",
        move || {
            let (c, ns, bundle) = (c.clone(), ns.clone(), bundle.clone());
            async move { secret_tokens::publish_ca_bundle(c, &ns, &bundle).await }
        },
    )));
    if let (Some(service), Some(address)) = (&config.grpc_service, config.advertise_address) {
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &config.namespace);
        let slice = endpoint_slice(
            service,
            &config.namespace,
            &config.identity,
            address,
            controller.grpc_addr.port(),
        );
        let name = format!("{service}-leader");
        tasks.push(tokio::spawn(retrying(
            stop.clone(),
            "EndpointSlice",
            move || {
                let (api, slice, name) = (api.clone(), slice.clone(), name.clone());
                async move {
                    api.patch(
                        &name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&slice),
                    )
                    .await
                    .map(|_| ())
                }
            },
        )));
    }

    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: Some(config.identity.clone()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let context = Arc::new(Context::new(
        client.clone(),
        controller.fleet.clone(),
        recorder.clone(),
    ));
    let miners_api: Api<MicroMiner> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    // Our own status writes bump neither the generation nor the finalizers, so they do
    // not come back as work; the periodic requeue picks up what the fleet changes.
    let triggers = watcher(miners_api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(serving_predicate, PredicateConfig::default());
    // A device joining or leaving changes a MicroMiner's status without any change to the
    // object: reconcile it now instead of at its next periodic look.
    let (changed_tx, changed_rx) = futures::channel::mpsc::channel(256);
    tasks.push(tokio::spawn(watch_fleet(
        context.clone(),
        changed_tx,
        stop.clone(),
    )));
    let until = stop.clone();
    tasks.push(tokio::spawn(async move {
        Controller::for_stream(triggers, reader)
            .reconcile_on(changed_rx)
            .graceful_shutdown_on(until.cancelled_owned())
            .run(miners::reconcile, miners::error_policy, context)
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "MicroMiner controller");
                }
            })
            .await;
    }));

    let devices_api: Api<EdgeDevice> = Api::all(client.clone());
    let budget = WriteBudget::new(DEVICE_REFRESH_WRITES_PER_MINUTE, now_ms());
    let publisher = Arc::new(Mutex::new(DevicePublisher::new(Arc::new(Mutex::new(
        budget,
    )))));
    match RevocationStore::open(&revocations_dir(&config.controller.data_dir)) {
        Ok(revocations) => {
            let specs = DeviceSpecs::new(
                controller.fleet.clone(),
                Arc::new(revocations),
                publisher.clone(),
            );
            tasks.push(tokio::spawn(devices::watch(
                devices_api.clone(),
                specs,
                stop.clone(),
            )));
        }
        Err(e) => {
            tracing::error!(error = %e, "EdgeDevice specs cannot be applied: the revocation directory is unusable")
        }
    }
    tasks.push(tokio::spawn(devices::publish(
        devices_api,
        controller.fleet.clone(),
        publisher,
        recorder,
        stop.clone(),
    )));

    let lost = tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = leading.wait_for(|lead| !*lead) => true,
    };
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    controller.stop().await;
    if lost {
        Err(RunError::LostLeadership(config.lease_name.clone()))
    } else {
        Ok(())
    }
}

/// Every [`FLEET_WATCH_PERIOD`], sends the MicroMiners whose status changed in a way
/// operators act on (see [`ChangeWatch`]). The view it looks at becomes the one those
/// reconciles read, so they see the change they were called for.
async fn watch_fleet(
    context: Arc<Context>,
    mut changed: futures::channel::mpsc::Sender<ObjectRef<MicroMiner>>,
    stop: CancellationToken,
) {
    let mut watch = ChangeWatch::default();
    let mut every = Every::new(FLEET_WATCH_PERIOD, stop);
    while every.tick().await {
        let statuses = context.refresh_view(now_ms());
        for key in watch.changed(statuses.iter().map(|(key, status)| (key.as_str(), status))) {
            let Some((namespace, name)) = key.split_once('/') else {
                continue;
            };
            // Full means reconciles are already queued; the periodic look catches up.
            let _ = changed.try_send(ObjectRef::new(name).within(namespace));
        }
    }
}

/// Starts serving, waiting out a previous leader that still holds the ledger open.
async fn start_with_patience(
    config: ControllerConfig,
    secrets: SecretTokens,
) -> Result<serve::Controller, StartError> {
    let deadline = tokio::time::Instant::now() + STORE_OPEN_PATIENCE;
    loop {
        match serve::start_for_kubernetes(config.clone(), secrets.clone()).await {
            Err(StartError::Store { path, source }) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(path = %path.display(), error = %source, "the ledger is not free yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// Runs `write` until it succeeds or `stop`, every [`PUBLISH_RETRY`].
async fn retrying<F, Fut>(stop: CancellationToken, what: &'static str, write: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), kube::Error>>,
{
    loop {
        match write().await {
            Ok(()) => {
                tracing::info!(what, "published");
                return;
            }
            Err(e) => tracing::warn!(what, error = %e, "publishing failed; will retry"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PUBLISH_RETRY) => {}
        }
    }
}

/// What makes a MicroMiner worth a reconcile: a new generation (spec), a finalizer
/// change (ours going on must be followed by the first real reconcile), or deletion.
pub fn serving_predicate(miner: &MicroMiner) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    miner.meta().uid.hash(&mut hasher);
    miner.meta().generation.hash(&mut hasher);
    miner.finalizers().hash(&mut hasher);
    miner.meta().deletion_timestamp.is_some().hash(&mut hasher);
    Some(hasher.finish())
}

/// The EndpointSlice that makes selector-less Service `service` lead to this replica.
pub fn endpoint_slice(
    service: &str,
    namespace: &str,
    pod: &str,
    address: IpAddr,
    port: u16,
) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-leader"),
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "micromine.dev",
            },
        },
        "addressType": if address.is_ipv4() { "IPv4" } else { "IPv6" },
        "endpoints": [{
            "addresses": [address.to_string()],
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace},
        }],
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::kubernetes::testing::{self, expect};
    use ::http::{Method, StatusCode};

    fn miner(generation: i64, finalizers: &[&str], deleting: bool) -> MicroMiner {
        let mut m: MicroMiner = serde_json::from_value(json!({
            "apiVersion": "micromine.dev/v1alpha1",
            "kind": "MicroMiner",
            "metadata": {"name": "a", "namespace": "b", "uid": "u-1", "generation": generation},
            "spec": {"selector": {}, "workSource": {"builtin": {"networkDifficulty": 1.0}}},
        }))
        .unwrap();
        if !finalizers.is_empty() {
            m.metadata.finalizers = Some(finalizers.iter().map(ToString::to_string).collect());
        }
        if deleting {
            m.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
            );
        }
        m
    }

    #[test]
    fn status_writes_do_not_trigger_but_spec_finalizer_and_deletion_do() {
        let base = serving_predicate(&miner(1, &[], false));
        let mut with_status = miner(1, &[], false);
        with_status.status = Some(Default::default());
        with_status.metadata.resource_version = Some("99".into());
        assert_eq!(serving_predicate(&with_status), base);
        assert_ne!(serving_predicate(&miner(2, &[], false)), base);
        assert_ne!(
            serving_predicate(&miner(1, &[super::super::FINALIZER], false)),
            base
        );
        assert_ne!(serving_predicate(&miner(1, &[], true)), base);
    }

    #[tokio::test]
    async fn the_endpoint_slice_is_applied_for_the_selectorless_service() {
        let (client, mut api) = testing::client("micromine");
        let slices: Api<EndpointSlice> = Api::namespaced(client, "micromine");
        let slice = endpoint_slice(
            "micromine",
            "micromine",
            "micromine-7d9-x2",
            "10.1.2.3".parse().unwrap(),
            7443,
        );
        // It must be a valid EndpointSlice, not just JSON.
        let typed: EndpointSlice = serde_json::from_value(slice.clone()).unwrap();
        assert_eq!(typed.address_type, "IPv4");
        let run = tokio::spawn(async move {
            slices
                .patch(
                    "micromine-leader",
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&slice),
                )
                .await
        });
        let seen = expect(
            &mut api,
            Method::PATCH,
            "/apis/discovery.k8s.io/v1/namespaces/micromine/endpointslices/micromine-leader",
        )
        .await;
        assert_eq!(
            seen.body["metadata"]["labels"]["kubernetes.io/service-name"],
            "micromine"
        );
        assert_eq!(seen.body["endpoints"][0]["addresses"][0], "10.1.2.3");
        assert_eq!(seen.body["ports"][0]["name"], "grpc");
        let echo = seen.body.clone();
        seen.answer(StatusCode::OK, &echo);
        run.await.unwrap().unwrap();
        let v6 = endpoint_slice("s", "n", "p", "fd00::1".parse().unwrap(), 1);
        assert_eq!(v6["addressType"], "IPv6");
    }
}
