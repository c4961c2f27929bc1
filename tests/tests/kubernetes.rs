//! Kubernetes mode end to end: the real `micromine-controller run --kubernetes` and
//! `micromine-agent` against the in-memory API server of `micromine_e2e::fake_api`,
//! checked the way a kubectl user would check them (objects, status, conditions,
//! events), plus the controller's own HTTP API where kubectl has no view.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use micromine_controller::kubernetes::rbac;
use micromine_e2e::fake_api::FakeApi;
use micromine_e2e::{
    ControllerProcess, Process, bin, get_json, loopback, number, run_to_end_with_env, start_agent,
    wait_until,
};
use serde_json::{Value, json};

const NAMESPACE: &str = "micromine";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/micromine/leases/micromine-controller";
const CA_CONFIGMAP: &str = "/api/v1/namespaces/micromine/configmaps/micromine-ca";
const SECRETS: &str = "/api/v1/namespaces/micromine/secrets";
const FINALIZER: &str = "micromine.dev/drain";

fn miner_path(namespace: &str, name: &str) -> String {
    format!("/apis/micromine.dev/v1alpha1/namespaces/{namespace}/microminers/{name}")
}

fn device_path(name: &str) -> String {
    format!("/apis/micromine.dev/v1alpha1/edgedevices/{name}")
}

/// The fake API server, kubeconfigs for it (the controller's and an operator's), and a
/// data directory for controllers.
struct Cluster {
    api: FakeApi,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    operator_kubeconfig: PathBuf,
    data: PathBuf,
}

/// The bearer token of the controller's kubeconfig, which marks its requests in the log.
const CONTROLLER: &str = "controller-service-account";

impl Cluster {
    fn start() -> Cluster {
        let api = FakeApi::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, NAMESPACE, CONTROLLER);
        let operator_kubeconfig = dir.path().join("operator-kubeconfig");
        api.write_kubeconfig(&operator_kubeconfig, NAMESPACE, "operator");
        let data = dir.path().join("data");
        Cluster {
            api,
            dir,
            kubeconfig,
            operator_kubeconfig,
            data,
        }
    }

    /// The controller's environment: its kubeconfig, standing in for the service account.
    fn env(&self) -> [(&'static str, &Path); 1] {
        [("KUBECONFIG", self.kubeconfig.as_path())]
    }

    /// Every request the controller made is one the chart's RBAC grants
    /// (`rbac::RULES`, which the chart test holds the chart to).
    fn assert_controller_stayed_within_rbac(&self) {
        let requests: Vec<_> = self
            .api
            .requests()
            .into_iter()
            .filter(|r| r.bearer == CONTROLLER)
            .collect();
        assert!(!requests.is_empty(), "the controller made requests");
        let refused: Vec<String> = requests
            .iter()
            .filter_map(|r| rbac::permits(&r.method, &r.path, &r.query).err())
            .collect();
        assert!(refused.is_empty(), "{refused:#?}");
    }

    /// Starts a replica named `identity` on fresh ports, sharing the data directory (the
    /// ledger volume) with every other replica; does not wait for anything.
    fn replica(&self, identity: &str) -> ControllerProcess {
        let (grpc, http) = (loopback(), loopback());
        let (data, grpc_arg, http_arg) = (
            self.data.display().to_string(),
            grpc.to_string(),
            http.to_string(),
        );
        let args = [
            "run",
            "--kubernetes",
            "--namespace",
            NAMESPACE,
            "--identity",
            identity,
            "--data-dir",
            &data,
            "--listen",
            &grpc_arg,
            "--http-listen",
            &http_arg,
            "--tls-san",
            "127.0.0.1",
        ];
        let process =
            Process::start_with_env(identity, &bin("micromine-controller"), &args, &self.env());
        ControllerProcess::adopt(process, grpc, http)
    }

    /// Starts a replica and waits until it leads, serves, and has published its CA.
    fn leader(&self, identity: &str) -> ControllerProcess {
        let controller = self.replica(identity);
        wait_until(
            &format!("the Lease to name {identity}"),
            Duration::from_secs(20),
            || (self.holder().as_deref() == Some(identity)).then_some(()),
        );
        wait_until(
            &format!("{identity}'s /readyz to say leader"),
            Duration::from_secs(20),
            || (role(&controller).as_deref() == Some("leader")).then_some(()),
        );
        wait_until("ConfigMap micromine-ca", Duration::from_secs(20), || {
            self.api.get(CA_CONFIGMAP)
        });
        controller
    }

    fn holder(&self) -> Option<String> {
        self.api.get(LEASE)?["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_string)
    }

    /// `micromine-controller token create --kubernetes`, as an operator with a kubeconfig.
    fn token(&self, labels: &str) -> String {
        run_to_end_with_env(
            &bin("micromine-controller"),
            &[
                "token",
                "create",
                "--kubernetes",
                "--namespace",
                NAMESPACE,
                "--labels",
                labels,
            ],
            &[("KUBECONFIG", self.operator_kubeconfig.as_path())],
        )
        .trim()
        .to_string()
    }

    fn token_secrets(&self) -> Vec<Value> {
        self.api
            .list(SECRETS)
            .into_iter()
            .filter(|s| {
                s["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("micromine-token-"))
            })
            .collect()
    }

    /// `kubectl apply` of a MicroMiner for devices with `site=e2e`: builtin work that
    /// never finds a block, shares every half second.
    fn apply_miner(&self, namespace: &str, name: &str, selector: Value) -> Value {
        self.api.apply(
            &miner_path(namespace, name),
            json!({
                "apiVersion": "micromine.dev/v1alpha1",
                "kind": "MicroMiner",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "selector": selector,
                    "workSource": {"builtin": {"networkDifficulty": 1e12}},
                    "sharesPerMinute": 120,
                    "assignmentSeconds": 10,
                },
            }),
        )
    }

    fn miner(&self, namespace: &str, name: &str) -> Option<Value> {
        self.api.get(&miner_path(namespace, name))
    }

    /// Enrolls an agent named `name` with a fresh token (`site=e2e`) at `controller`.
    fn agent(&self, controller: &ControllerProcess, name: &str) -> Process {
        let token = self.token("site=e2e");
        start_agent(
            controller,
            &token,
            name,
            &self.dir.path().join(name),
            "site=e2e",
        )
    }
}

fn site_e2e() -> Value {
    json!({"matchLabels": {"site": "e2e"}})
}

/// The `role` in a replica's `/readyz`.
fn role(controller: &ControllerProcess) -> Option<String> {
    get_json(controller.http, "/readyz")?["role"]
        .as_str()
        .map(str::to_string)
}

/// Condition `type_` of an object's status.
fn condition(object: &Value, type_: &str) -> Option<Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

fn condition_is(object: &Value, type_: &str, status: &str) -> bool {
    condition(object, type_).is_some_and(|c| c["status"] == status)
}

fn device_assignments(controller: &ControllerProcess, device: &str) -> usize {
    controller
        .assignments()
        .iter()
        .filter(|a| a["device"] == device)
        .count()
}

fn port_open(addr: std::net::SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

#[test]
fn a_fleet_managed_with_kubectl_shaped_objects() {
    let cluster = Cluster::start();
    let controller = cluster.leader("replica-a");
    cluster.apply_miner("plant", "fleet", site_e2e());

    let token = cluster.token("site=e2e");
    assert_eq!(
        cluster.token_secrets().len(),
        1,
        "token create stored one Secret"
    );
    let _agent = start_agent(
        &controller,
        &token,
        "edge-1",
        &cluster.dir.path().join("edge-1"),
        "site=e2e",
    );

    // What `kubectl get microminers -A` shows once the device mines: the finalizer, the
    // generation served, Ready with a mining device and accepted shares (each of these
    // changes is written as soon as the fleet sees it, within a few seconds).
    let miner = wait_until(
        "MicroMiner plant/fleet to be Ready with a mining device and accepted shares",
        Duration::from_secs(55),
        || {
            let miner = cluster.miner("plant", "fleet")?;
            (condition_is(&miner, "Ready", "True")
                && number(&miner, "/status/devices/mining") >= 1
                && number(&miner, "/status/shares/accepted") > 0)
                .then_some(miner)
        },
    );
    assert_eq!(
        miner["metadata"]["finalizers"],
        json!([FINALIZER]),
        "{miner}"
    );
    assert_eq!(
        miner["status"]["observedGeneration"], miner["metadata"]["generation"],
        "{miner}"
    );

    // `kubectl get edgedevices`: made by the controller, with the token's label.
    let device = wait_until(
        "EdgeDevice edge-1 to be Ready and assigned to plant/fleet",
        Duration::from_secs(20),
        || {
            let device = cluster.api.get(&device_path("edge-1"))?;
            (condition_is(&device, "Ready", "True")
                && device["status"]["assignedMiner"] == "plant/fleet")
                .then_some(device)
        },
    );
    assert_eq!(device["metadata"]["labels"]["site"], "e2e", "{device}");

    // The token had one use: its Secret is gone, deleted with a precondition on the
    // version read, so two enrollments could not both have used it.
    assert!(
        cluster.token_secrets().is_empty(),
        "{:?}",
        cluster.token_secrets()
    );
    let requests = cluster.api.requests();
    let deletes: Vec<_> = requests
        .iter()
        .filter(|r| r.method == "DELETE" && r.path.starts_with(&format!("{SECRETS}/")))
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert!(
        deletes[0].body.contains("resourceVersion"),
        "{:?}",
        deletes[0]
    );

    // Status goes through the status subresource by server-side apply, never by PUT.
    let miner_writes: Vec<_> = requests
        .iter()
        .filter(|r| r.is_write() && r.path.starts_with(&miner_path("plant", "fleet")))
        .collect();
    assert!(
        miner_writes.iter().all(|r| r.method == "PATCH"),
        "{miner_writes:?}"
    );
    assert!(
        miner_writes.iter().any(|r| r.path.ends_with("/status")
            && r.content_type.starts_with("application/apply-patch+yaml")
            && r.query.contains("fieldManager=micromine-controller")),
        "{miner_writes:?}"
    );
    // The fake API server answered everything the controller asked the way it expects:
    // no failed election round, watch, publication or write was worth a warning.
    let log = controller.process.log();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(complaints.is_empty(), "{complaints:#?}");
    cluster.assert_controller_stayed_within_rbac();
}

#[test]
fn cordon_uncordon_delete_and_revoke() {
    let cluster = Cluster::start();
    let controller = cluster.leader("replica-a");
    cluster.apply_miner("plant", "fleet", site_e2e());
    let mut agent = cluster.agent(&controller, "edge-1");
    wait_until(
        "EdgeDevice edge-1 to work for plant/fleet",
        Duration::from_secs(30),
        || {
            let device = cluster.api.get(&device_path("edge-1"))?;
            (device["status"]["assignedMiner"] == "plant/fleet"
                && device_assignments(&controller, "edge-1") > 0)
                .then_some(())
        },
    );

    // kubectl patch edgedevice edge-1 -p '{"spec":{"unschedulable":true}}'
    let seen = cluster.api.requests().len();
    cluster.api.apply(
        &device_path("edge-1"),
        json!({"spec": {"unschedulable": true}}),
    );
    wait_until(
        "the cordoned device to lose its work",
        Duration::from_secs(15),
        || {
            (device_assignments(&controller, "edge-1") == 0
                && controller.device("edge-1")?["state"] == "unschedulable")
                .then_some(())
        },
    );
    // The change of state is written at once, not left to the next refresh. (The
    // EdgeDevice status has no field that says "cordoned": `spec.unschedulable` is
    // what kubectl shows.)
    let status_path = format!("{}/status", device_path("edge-1"));
    wait_until(
        "EdgeDevice edge-1's status to be written after the cordon",
        Duration::from_secs(15),
        || {
            cluster.api.requests()[seen..]
                .iter()
                .any(|r| r.method == "PATCH" && r.path == status_path)
                .then_some(())
        },
    );
    cluster.api.apply(
        &device_path("edge-1"),
        json!({"spec": {"unschedulable": false}}),
    );
    wait_until(
        "the uncordoned device to get work again",
        Duration::from_secs(20),
        || {
            (device_assignments(&controller, "edge-1") > 0
                && controller.device("edge-1")?["state"] == "mining")
                .then_some(())
        },
    );

    // kubectl delete microminer fleet: drained, then the finalizer lets it go.
    wait_until(
        "the finalizer on plant/fleet",
        Duration::from_secs(10),
        || {
            cluster.miner("plant", "fleet")?["metadata"]["finalizers"]
                .as_array()?
                .iter()
                .any(|f| f == FINALIZER)
                .then_some(())
        },
    );
    assert!(cluster.api.delete(&miner_path("plant", "fleet")));
    wait_until(
        "MicroMiner plant/fleet to be gone",
        Duration::from_secs(15),
        || cluster.miner("plant", "fleet").is_none().then_some(()),
    );
    wait_until(
        "the drained device to hold no work",
        Duration::from_secs(10),
        || (device_assignments(&controller, "edge-1") == 0).then_some(()),
    );
    let drained = cluster
        .api
        .list("/apis/events.k8s.io/v1/namespaces/plant/events")
        .into_iter()
        .any(|e| e["reason"] == "Drained" && e["regarding"]["name"] == "fleet");
    assert!(drained, "a Drained event for plant/fleet");

    // kubectl patch edgedevice edge-1 -p '{"spec":{"revoked":true}}'
    let revoked_at = Instant::now();
    cluster
        .api
        .apply(&device_path("edge-1"), json!({"spec": {"revoked": true}}));
    wait_until(
        "EdgeDevice edge-1 to be Ready=False after the revocation",
        Duration::from_secs(15),
        || {
            let device = cluster.api.get(&device_path("edge-1"))?;
            condition_is(&device, "Ready", "False").then_some(())
        },
    );
    let took = revoked_at.elapsed();
    assert!(took < Duration::from_secs(12), "not ready after {took:?}");
    agent.wait_for_log("certificate revoked", Duration::from_secs(10));
    controller
        .process
        .wait_for_log("refused a revoked certificate", Duration::from_secs(30));
    agent.kill();
    cluster.assert_controller_stayed_within_rbac();
}

#[test]
fn a_standby_takes_over_when_the_leader_stops() {
    let cluster = Cluster::start();
    let mut first = cluster.leader("replica-a");
    let second = cluster.replica("replica-b");
    wait_until(
        "replica-b's /readyz to say standby",
        Duration::from_secs(20),
        || (role(&second).as_deref() == Some("standby")).then_some(()),
    );
    assert_eq!(cluster.holder().as_deref(), Some("replica-a"));
    assert!(
        !port_open(second.grpc),
        "a standby does not serve agents (nor open the ledger)"
    );
    assert!(port_open(first.grpc), "the leader serves agents");

    cluster.apply_miner("plant", "fleet", site_e2e());
    wait_until(
        "replica-a to write the status of plant/fleet",
        Duration::from_secs(15),
        || {
            cluster.miner("plant", "fleet")?["status"]["observedGeneration"]
                .as_i64()
                .map(|_| ())
        },
    );
    // Still one leader after the leader renewed and the standby looked again.
    let renewed = cluster.api.get(LEASE).expect("the Lease")["spec"]["renewTime"].clone();
    wait_until(
        "replica-a to renew its Lease",
        Duration::from_secs(10),
        || {
            let lease = cluster.api.get(LEASE)?;
            (lease["spec"]["renewTime"] != renewed).then_some(())
        },
    );
    assert_eq!(cluster.holder().as_deref(), Some("replica-a"));
    assert_eq!(role(&second).as_deref(), Some("standby"));

    let stopped_at = Instant::now();
    let seen = cluster.api.requests().len();
    let status = first.process.signal("TERM", Duration::from_secs(30));
    assert!(status.success(), "replica-a stopped cleanly: {status}");
    wait_until(
        "the Lease to name replica-b",
        Duration::from_secs(20),
        || (cluster.holder().as_deref() == Some("replica-b")).then_some(()),
    );
    wait_until(
        "replica-b's /readyz to say leader",
        Duration::from_secs(20),
        || (role(&second).as_deref() == Some("leader")).then_some(()),
    );
    let took = stopped_at.elapsed();
    assert!(took < Duration::from_secs(20), "took over after {took:?}");
    assert!(port_open(second.grpc), "the new leader serves agents");

    // The new leader reconciles. The status replica-a wrote is still accurate, so it is
    // not rewritten (no write storm on takeover); a spec change must be served and
    // reported by replica-b.
    let mut changed = cluster.miner("plant", "fleet").expect("plant/fleet");
    changed["spec"]["sharesPerMinute"] = json!(60);
    let changed = cluster.api.apply(
        &miner_path("plant", "fleet"),
        json!({"spec": changed["spec"]}),
    );
    assert_eq!(changed["metadata"]["generation"], 2);
    let status_path = format!("{}/status", miner_path("plant", "fleet"));
    wait_until(
        "replica-b to report generation 2 of plant/fleet",
        Duration::from_secs(20),
        || {
            let miner = cluster.miner("plant", "fleet")?;
            let written = cluster.api.requests()[seen..]
                .iter()
                .any(|r| r.method == "PATCH" && r.path == status_path);
            (written && miner["status"]["observedGeneration"] == 2).then_some(())
        },
    );
    let lease = cluster.api.get(LEASE).expect("the Lease");
    assert!(
        number(&lease, "/spec/leaseTransitions") >= 1,
        "a takeover is a transition: {lease}"
    );
    cluster.assert_controller_stayed_within_rbac();
}

#[test]
fn a_malformed_micro_miner_is_reported_and_the_valid_one_served() {
    let cluster = Cluster::start();
    let controller = cluster.leader("replica-a");
    // The CRD schema cannot say that `In` needs values; the fake API server, like a real
    // one, lets it through.
    cluster.apply_miner(
        "plant",
        "broken",
        json!({"matchExpressions": [{"key": "site", "operator": "In", "values": []}]}),
    );
    cluster.apply_miner("plant", "good", site_e2e());
    let _agent = cluster.agent(&controller, "edge-1");

    let broken = wait_until(
        "plant/broken to be Ready=False for an invalid spec",
        Duration::from_secs(20),
        || {
            let miner = cluster.miner("plant", "broken")?;
            let ready = condition(&miner, "Ready")?;
            (ready["status"] == "False" && ready["reason"] == "InvalidSpec").then_some(miner)
        },
    );
    let ready = condition(&broken, "Ready").expect("Ready");
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.selector.matchExpressions[0].values")),
        "{ready}"
    );
    assert_eq!(
        broken["status"]["observedGeneration"], broken["metadata"]["generation"],
        "{broken}"
    );
    let warning = wait_until(
        "a Warning event about plant/broken",
        Duration::from_secs(10),
        || {
            cluster
                .api
                .list("/apis/events.k8s.io/v1/namespaces/plant/events")
                .into_iter()
                .find(|e| {
                    e["type"] == "Warning"
                        && e["reason"] == "InvalidSpec"
                        && e["regarding"]["name"] == "broken"
                })
        },
    );
    assert!(
        warning["note"]
            .as_str()
            .is_some_and(|n| n.contains("matchExpressions[0].values")),
        "{warning}"
    );

    // The valid one is served all the same.
    wait_until(
        "edge-1 to work for plant/good",
        Duration::from_secs(30),
        || {
            let device = cluster.api.get(&device_path("edge-1"))?;
            (device["status"]["assignedMiner"] == "plant/good"
                && device_assignments(&controller, "edge-1") > 0)
                .then_some(())
        },
    );
    let good = cluster.miner("plant", "good").expect("plant/good");
    assert!(
        condition(&good, "Ready").is_some_and(|c| c["reason"] != "InvalidSpec"),
        "{good}"
    );

    // Fixed with kubectl apply: the new generation is served.
    cluster.apply_miner(
        "plant",
        "broken",
        json!({"matchExpressions": [{"key": "site", "operator": "In", "values": ["elsewhere"]}]}),
    );
    wait_until(
        "plant/broken's new generation to be served",
        Duration::from_secs(20),
        || {
            let miner = cluster.miner("plant", "broken")?;
            (miner["status"]["observedGeneration"] == 2
                && condition(&miner, "Ready")?["reason"] != "InvalidSpec")
                .then_some(())
        },
    );
    assert_eq!(
        role(&controller).as_deref(),
        Some("leader"),
        "the controller kept running and leading"
    );
    cluster.assert_controller_stayed_within_rbac();
}

#[test]
fn a_pool_password_comes_from_a_secret_and_the_pool_status_reaches_the_micro_miner() {
    use micromine_e2e::stratum_pool::{PoolConfig, TestPool};
    // The pool only takes the password kept in the Secret.
    let pool = TestPool::start(PoolConfig {
        difficulty: 0.001,
        workers: vec![("plant.gateways".into(), "from-a-secret".into())],
        ..PoolConfig::default()
    });
    let cluster = Cluster::start();
    cluster.api.apply(
        "/api/v1/namespaces/plant/secrets/pool-credentials",
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "pool-credentials", "namespace": "plant"},
            // "from-a-secret\n": the line break is not part of the password.
            "data": {"password": "ZnJvbS1hLXNlY3JldAo="},
        }),
    );
    cluster.api.apply(
        &miner_path("plant", "pool"),
        json!({
            "apiVersion": "micromine.dev/v1alpha1",
            "kind": "MicroMiner",
            "metadata": {"name": "pool", "namespace": "plant"},
            "spec": {
                "selector": site_e2e(),
                "workSource": {"stratum": {
                    "url": pool.url(),
                    "user": "plant.gateways",
                    "passwordSecretRef": {"name": "pool-credentials", "key": "password"},
                }},
                "sharesPerMinute": 60,
                "assignmentSeconds": 10,
            },
        }),
    );
    let leader = cluster.leader("a");
    let mut agent = cluster.agent(&leader, "gw-pool");
    wait_until("shares at the pool", Duration::from_secs(60), || {
        (pool.accepted() >= 2).then_some(())
    });
    let miner = wait_until(
        "the pool's status on the MicroMiner",
        Duration::from_secs(60),
        || {
            let miner = cluster.miner("plant", "pool")?;
            (miner["status"]["pool"]["state"] == "Connected"
                && number(&miner, "/status/pool/accepted") > 0)
                .then_some(miner)
        },
    );
    assert!(condition_is(&miner, "PoolConnected", "True"), "{miner}");
    assert_eq!(miner["status"]["pool"]["url"], pool.url());
    assert_eq!(miner["status"]["pool"]["difficulty"], 0.001);
    // The Event is published after the status write that carries the news.
    wait_until("a PoolConnected Event", Duration::from_secs(10), || {
        cluster
            .api
            .list("/apis/events.k8s.io/v1/namespaces/plant/events")
            .iter()
            .any(|e| {
                e["reason"] == "PoolConnected" && e["note"] == format!("mining for {}", pool.url())
            })
            .then_some(())
    });
    cluster.assert_controller_stayed_within_rbac();
    agent.kill();
}
