//! The Helm chart in `charts/micromine/`: it lints, every rendered document is a valid
//! Kubernetes object of its kind, the controller and agent get the command lines the
//! binaries expect, the RBAC grants exactly `kubernetes::rbac::RULES`, and bad values are
//! refused by the schema with the field named.
//!
//! Needs helm: `$HELM`, else `<repo>/.tools/bin/helm` (`scripts/tools helm` puts it there;
//! `scripts/test` does that first), else `helm` on the PATH. Only helm runs here, never
//! the controller binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolumeClaim, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use micromine_controller::kubernetes::rbac::{RULES, Scope};
use serde::de::DeserializeOwned;
use serde_json::Value;

const RELEASE: &str = "mm";
const NAMESPACE: &str = "fleet";
/// `<release>-<chart>`, the prefix of every resource.
const FULLNAME: &str = "mm-micromine";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the controller crate sits in the repository")
        .to_path_buf()
}

fn chart() -> PathBuf {
    repo().join("charts/micromine")
}

/// The values file that turns on every non-default path of the chart.
fn ha_values() -> PathBuf {
    chart().join("ci/ha-values.yaml")
}

fn helm() -> PathBuf {
    if let Some(helm) = std::env::var_os("HELM").filter(|h| !h.is_empty()) {
        return PathBuf::from(helm);
    }
    let local = repo().join(".tools/bin/helm");
    if local.is_file() {
        return local;
    }
    let on_path = Command::new("helm")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        on_path,
        "helm not found ($HELM, {}, PATH); install it with `scripts/tools helm`",
        local.display()
    );
    PathBuf::from("helm")
}

fn run_helm(args: &[&str]) -> Output {
    let helm = helm();
    Command::new(&helm)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", helm.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `helm template` for the release, failing the test when helm does.
fn render(extra: &[&str]) -> Rendered {
    let chart = chart();
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().expect("utf-8 path"),
        "--namespace",
        NAMESPACE,
    ];
    args.extend_from_slice(extra);
    let out = run_helm(&args);
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}",
        text(&out.stderr)
    );
    Rendered::parse(&text(&out.stdout))
}

/// The rendered documents, each parsed into its k8s-openapi type.
#[derive(Default)]
struct Rendered {
    deployments: Vec<Deployment>,
    claims: Vec<PersistentVolumeClaim>,
    daemon_sets: Vec<DaemonSet>,
    services: Vec<Service>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    config_maps: Vec<ConfigMap>,
    service_monitors: Vec<Value>,
    prometheus_rules: Vec<Value>,
}

impl Rendered {
    fn parse(yaml: &str) -> Self {
        let documents: Vec<Value> = serde_saphyr::from_multiple(yaml)
            .expect("helm's output is YAML without duplicate keys");
        let mut rendered = Rendered::default();
        for document in documents {
            let kind = document["kind"].as_str().unwrap_or_default().to_owned();
            match kind.as_str() {
                "Deployment" => rendered.deployments.push(typed(&kind, document)),
                "PersistentVolumeClaim" => rendered.claims.push(typed(&kind, document)),
                "DaemonSet" => rendered.daemon_sets.push(typed(&kind, document)),
                "Service" => rendered.services.push(typed(&kind, document)),
                "ServiceAccount" => rendered.service_accounts.push(typed(&kind, document)),
                "ClusterRole" => rendered.cluster_roles.push(typed(&kind, document)),
                "ClusterRoleBinding" => rendered.cluster_role_bindings.push(typed(&kind, document)),
                "Role" => rendered.roles.push(typed(&kind, document)),
                "RoleBinding" => rendered.role_bindings.push(typed(&kind, document)),
                "ConfigMap" => rendered.config_maps.push(typed(&kind, document)),
                "ServiceMonitor" => {
                    assert_eq!(document["apiVersion"], "monitoring.coreos.com/v1");
                    rendered.service_monitors.push(document);
                }
                "PrometheusRule" => {
                    assert_eq!(document["apiVersion"], "monitoring.coreos.com/v1");
                    rendered.prometheus_rules.push(document);
                }
                _ => panic!("unexpected document in the chart: {document}"),
            }
        }
        rendered
    }

    fn controller(&self) -> &Deployment {
        assert_eq!(self.deployments.len(), 1, "one controller Deployment");
        &self.deployments[0]
    }

    /// The ledger's claim, which every replica mounts as volume `data`.
    fn ledger_claim(&self) -> &PersistentVolumeClaim {
        assert_eq!(self.claims.len(), 1, "one PersistentVolumeClaim");
        let claim = &self.claims[0];
        assert_eq!(claim.metadata.name.as_deref(), Some("mm-micromine-data"));
        assert_eq!(claim.metadata.namespace.as_deref(), Some(NAMESPACE));
        assert_eq!(
            claim
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("helm.sh/resource-policy"))
                .map(String::as_str),
            Some("keep"),
            "helm uninstall must not delete the ledger"
        );
        claim
    }

    fn service(&self, name: &str) -> &Service {
        self.services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no Service {name}"))
    }
}

/// Parses `document` as `T` and checks that nothing was dropped on the way: a misspelt or
/// misplaced field would deserialize fine and be silently ignored by the API server too.
fn typed<T: DeserializeOwned + serde::Serialize>(kind: &str, document: Value) -> T {
    let name = document["metadata"]["name"].clone();
    let parsed: T = serde_json::from_value(document.clone())
        .unwrap_or_else(|e| panic!("{kind} {name} does not parse: {e}"));
    let back = serde_json::to_value(&parsed).expect("serializes");
    kept(&document, &back, &format!("{kind} {name}"));
    parsed
}

/// Fails unless everything in `rendered` survived the round trip into `parsed`. The
/// serializer may add, not drop.
fn kept(rendered: &Value, parsed: &Value, path: &str) {
    match (rendered, parsed) {
        (Value::Object(r), Value::Object(p)) => {
            for (key, value) in r {
                let at = format!("{path}.{key}");
                let Some(back) = p.get(key) else {
                    panic!("{at} is not a field of its Kubernetes type (misspelt or misplaced?)");
                };
                kept(value, back, &at);
            }
        }
        (Value::Array(r), Value::Array(p)) if r.len() == p.len() => {
            for (i, (value, back)) in r.iter().zip(p).enumerate() {
                kept(value, back, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(rendered, parsed, "{path} changed in the round trip"),
    }
}

fn container<'a>(containers: &'a [Container], name: &str) -> &'a Container {
    containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// A container's arguments as one line, to look for `--flag value` pairs in.
fn command_line(c: &Container) -> String {
    c.args.as_deref().expect("args").join(" ")
}

fn env_from_field(c: &Container, name: &str) -> String {
    let env = c
        .env
        .as_deref()
        .expect("env")
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no env {name}"));
    env.value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone())
        .unwrap_or_else(|| panic!("env {name} is not from the downward API"))
}

/// The literal value of an environment variable, if the container sets one.
fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .as_deref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .as_deref()
}

/// The controller Deployment's strategy type.
fn strategy(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.clone())
        .expect("an explicit strategy")
}

/// The pod's `data` volume, mounted at /var/lib/micromine by the controller container.
fn data_volume(pod: &PodSpec) -> &k8s_openapi::api::core::v1::Volume {
    let c = container(&pod.containers, "controller");
    assert!(
        c.volume_mounts
            .as_deref()
            .expect("mounts")
            .iter()
            .any(|m| m.name == "data" && m.mount_path == "/var/lib/micromine")
    );
    pod.volumes
        .as_deref()
        .expect("volumes")
        .iter()
        .find(|v| v.name == "data")
        .expect("data volume")
}

fn claim_name(pod: &PodSpec) -> Option<&str> {
    data_volume(pod)
        .persistent_volume_claim
        .as_ref()
        .map(|c| c.claim_name.as_str())
}

fn assert_restricted(c: &Container) {
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
    assert_eq!(sc.run_as_user, Some(65532), "{}", c.name);
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(caps.add, None, "{}", c.name);
    let seccomp = sc.seccomp_profile.as_ref().expect("seccompProfile");
    assert_eq!(seccomp.type_, "RuntimeDefault");
}

#[test]
fn lints_with_default_and_non_default_values() {
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let out = run_helm(&["lint", chart]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let values = ha_values();
    let out = run_helm(&[
        "lint",
        "--strict",
        chart,
        "-f",
        values.to_str().expect("utf-8 path"),
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn default_values_render_a_single_controller_with_its_services() {
    let r = render(&[]);
    let deployment = r.controller();
    assert_eq!(deployment.metadata.name.as_deref(), Some(FULLNAME));
    let spec = deployment.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        strategy(deployment),
        "Recreate",
        "a ReadWriteOnce volume cannot attach to the old and the new pod at once"
    );

    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(FULLNAME));
    let pod_sc = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(pod_sc.fs_group, Some(65532));
    assert_eq!(pod_sc.run_as_non_root, Some(true));

    let c = container(&pod.containers, "controller");
    assert_eq!(
        c.image.as_deref(),
        Some(concat!("micromine-controller:", env!("CARGO_PKG_VERSION"))),
        "the image is named and tagged as scripts/dist names dist/oci/micromine-controller: \
         the tag defaults to appVersion, the workspace version"
    );
    let args = command_line(c);
    let expected = format!(
        "run --kubernetes --data-dir /var/lib/micromine --listen 0.0.0.0:7443 \
         --http-listen 0.0.0.0:8080 --namespace $(POD_NAMESPACE) --lease-name {FULLNAME} \
         --identity $(POD_NAME) --advertise-address $(POD_IP) --grpc-service {FULLNAME} \
         --tls-san {FULLNAME} --tls-san {FULLNAME}.{NAMESPACE} \
         --tls-san {FULLNAME}.{NAMESPACE}.svc --tls-san {FULLNAME}.{NAMESPACE}.svc.cluster.local \
         --device-cert-ttl 24h --log-format text"
    );
    assert_eq!(args, expected);
    assert!(!args.contains("--ca-cert-file"), "{args}");
    assert_eq!(env_from_field(c, "POD_NAMESPACE"), "metadata.namespace");
    assert_eq!(env_from_field(c, "POD_NAME"), "metadata.name");
    assert_eq!(env_from_field(c, "POD_IP"), "status.podIP");
    assert_eq!(
        env_value(c, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        None,
        "no traces unless a collector is named"
    );
    assert_restricted(c);

    let ports: Vec<(Option<&str>, i32)> = c
        .ports
        .as_deref()
        .expect("ports")
        .iter()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
    assert_eq!(ports, [(Some("grpc"), 7443), (Some("http"), 8080)]);
    let probe_path = |probe: Option<&k8s_openapi::api::core::v1::Probe>| {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".into())
        );
        get.path.clone().expect("path")
    };
    assert_eq!(probe_path(c.liveness_probe.as_ref()), "/healthz");
    assert_eq!(probe_path(c.readiness_probe.as_ref()), "/readyz");

    // The ledger is on one claim, kept on uninstall.
    let claim = r.ledger_claim();
    let claim_spec = claim.spec.as_ref().expect("claim spec");
    assert_eq!(
        claim_spec.access_modes.as_deref(),
        Some(&["ReadWriteOnce".to_owned()][..])
    );
    assert_eq!(claim_spec.storage_class_name, None, "the default class");
    let storage = &claim_spec
        .resources
        .as_ref()
        .expect("resources")
        .requests
        .as_ref()
        .expect("requests")["storage"];
    assert_eq!(storage.0, "1Gi");
    assert_eq!(claim_name(pod), claim.metadata.name.as_deref());

    // Agents reach the leader only: the gRPC Service has no selector, the leader publishes
    // its EndpointSlice. Metrics and health come from every replica.
    let grpc = r.service(FULLNAME).spec.as_ref().expect("spec");
    assert_eq!(grpc.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(
        grpc.selector, None,
        "the leader's EndpointSlice routes gRPC"
    );
    let grpc_ports = grpc.ports.as_deref().expect("ports");
    assert_eq!(grpc_ports.len(), 1);
    let grpc_port = &grpc_ports[0];
    assert_eq!(grpc_port.name.as_deref(), Some("grpc"));
    assert_eq!((grpc_port.port, grpc_port.node_port), (7443, None));
    assert_eq!(
        grpc_port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(7443)),
        "without a selector a named targetPort resolves to nothing"
    );
    let http = r.service("mm-micromine-http").spec.as_ref().expect("spec");
    assert_eq!(http.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(http.ports.as_deref().expect("ports")[0].port, 8080);
    assert_eq!(
        http.selector.as_ref(),
        spec.selector.match_labels.as_ref(),
        "the HTTP Service selects every controller pod"
    );
    assert_eq!(
        r.services.len(),
        2,
        "the gRPC and the HTTP Service, nothing else"
    );

    assert_eq!(r.service_accounts.len(), 1);
    assert!(r.daemon_sets.is_empty(), "the agent is off by default");
    assert!(
        r.service_monitors.is_empty(),
        "the ServiceMonitor is off by default"
    );
    let config_maps: Vec<_> = r
        .config_maps
        .iter()
        .filter_map(|c| c.metadata.name.as_deref())
        .collect();
    assert_eq!(
        config_maps,
        ["mm-micromine-dashboard"],
        "the Grafana dashboard only: the controller publishes micromine-ca itself"
    );
    assert!(
        r.prometheus_rules.is_empty(),
        "the PrometheusRule is off by default"
    );
}

#[test]
fn non_default_values_render_ha_ca_load_balancer_monitor_and_agent() {
    let values = ha_values();
    let r = render(&["-f", values.to_str().expect("utf-8 path")]);
    let deployment = r.controller();
    let spec = deployment.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(
        strategy(deployment),
        "RollingUpdate",
        "standbys are Ready, so a rollout goes one pod at a time"
    );
    let pod = spec.template.spec.as_ref().expect("pod spec");
    let c = container(&pod.containers, "controller");
    let args = command_line(c);
    for expected in [
        "run --kubernetes",
        "--data-dir /var/lib/micromine",
        "--lease-name mm-micromine --identity $(POD_NAME)",
        "--advertise-address $(POD_IP) --grpc-service mm-micromine",
        "--tls-san mm-micromine.fleet.svc.cluster.local",
        "--tls-san micromine.example.com --tls-san 203.0.113.7",
        "--device-cert-ttl 12h --per-device-metrics",
        "--ca-cert-file /etc/micromine/ca/tls.crt --ca-key-file /etc/micromine/ca/tls.key",
        "--log-format json",
    ] {
        assert!(args.contains(expected), "{expected:?} not in {args}");
    }
    assert_eq!(env_from_field(c, "POD_IP"), "status.podIP");
    // Traces go to the named collector, a quarter of them, described by namespace and pod.
    for (name, value) in [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://otel-collector.observability:4317",
        ),
        ("OTEL_SERVICE_NAME", "micromine-controller"),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME)",
        ),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
    ] {
        assert_eq!(env_value(c, name), Some(value), "{name}");
    }
    // $(POD_NAME) expands only if POD_NAME is defined earlier in the list.
    let names: Vec<&str> = c
        .env
        .as_deref()
        .expect("env")
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    let position = |n: &str| names.iter().position(|x| *x == n).expect("present");
    assert!(position("POD_NAME") < position("OTEL_RESOURCE_ATTRIBUTES"));
    assert!(position("POD_NAMESPACE") < position("OTEL_RESOURCE_ATTRIBUTES"));

    // Every replica mounts the one ReadWriteMany claim.
    let claim = r.ledger_claim();
    assert_eq!(claim_name(pod), claim.metadata.name.as_deref());
    let claim_spec = claim.spec.as_ref().expect("claim spec");
    assert_eq!(
        claim_spec.access_modes.as_deref(),
        Some(&["ReadWriteMany".to_owned()][..])
    );
    assert_eq!(claim_spec.storage_class_name.as_deref(), Some("efs-sc"));
    let volumes = pod.volumes.as_deref().expect("volumes");
    let ca = volumes.iter().find(|v| v.name == "ca").expect("ca volume");
    let secret = ca.secret.as_ref().expect("the CA comes from a Secret");
    assert_eq!(secret.secret_name.as_deref(), Some("micromine-fleet-ca"));
    let ca_mount = c
        .volume_mounts
        .as_deref()
        .expect("mounts")
        .iter()
        .find(|m| m.name == "ca")
        .expect("ca mount");
    assert_eq!(ca_mount.mount_path, "/etc/micromine/ca");
    assert_eq!(ca_mount.read_only, Some(true));
    assert!(pod.affinity.is_some());

    let grpc = r.service(FULLNAME).spec.as_ref().expect("spec");
    assert_eq!(grpc.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(grpc.selector, None, "only the leader is behind it");
    assert_eq!(
        grpc.ports.as_deref().expect("ports")[0].node_port,
        Some(30443)
    );

    assert_eq!(r.service_monitors.len(), 1);
    let monitor = &r.service_monitors[0];
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "http");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "15s");
    // It selects the HTTP Service, and only that one.
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    let selected: Vec<&str> = r
        .services
        .iter()
        .filter(|s| {
            let labels = s.metadata.labels.as_ref().expect("labels");
            selector
                .iter()
                .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
        })
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    assert_eq!(selected, ["mm-micromine-http"]);

    assert_eq!(r.daemon_sets.len(), 1);
    let ds = &r.daemon_sets[0];
    assert_eq!(ds.metadata.name.as_deref(), Some("mm-micromine-agent"));
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.priority_class_name.as_deref(), Some("micromine-low"));
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|n| n.get("node-role.kubernetes.io/edge"))
            .map(String::as_str),
        Some("")
    );
    assert_eq!(pod.tolerations.as_deref().map(<[_]>::len), Some(1));
    let agent = container(&pod.containers, "agent");
    assert_eq!(
        agent.image.as_deref(),
        Some(concat!("micromine-agent:", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(
        command_line(agent),
        "run --controller https://mm-micromine.fleet.svc:7443 \
         --state-dir /var/lib/micromine-agent --name $(NODE_NAME) \
         --labels class=gateway,site=plant-3 --threads 2 --log-json"
    );
    assert_eq!(env_from_field(agent, "NODE_NAME"), "spec.nodeName");
    let token = agent
        .env
        .as_deref()
        .expect("env")
        .iter()
        .find(|e| e.name == "MICROMINE_TOKEN")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("MICROMINE_TOKEN from a Secret");
    assert_eq!(
        (token.name.as_str(), token.key.as_str()),
        ("micromine-bootstrap", "token")
    );
    assert_restricted(agent);
    let state = pod
        .volumes
        .as_deref()
        .expect("volumes")
        .iter()
        .find(|v| v.name == "state")
        .and_then(|v| v.host_path.as_ref())
        .expect("state dir on a hostPath");
    assert_eq!(state.path, "/var/lib/micromine-agent");
    assert_eq!(state.type_.as_deref(), Some("DirectoryOrCreate"));
    assert!(
        agent
            .volume_mounts
            .as_deref()
            .expect("mounts")
            .iter()
            .any(|m| m.name == "state" && m.mount_path == "/var/lib/micromine-agent")
    );
    // The init container that hands the hostPath to uid 65532 may chown and nothing else.
    let init = container(pod.init_containers.as_deref().expect("init"), "state-dir");
    let caps = init
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(caps.add.as_deref(), Some(&["CHOWN".to_owned()][..]));
}

#[test]
fn without_persistence_the_ledger_is_an_empty_dir() {
    let r = render(&["--set", "persistence.enabled=false"]);
    assert!(r.claims.is_empty(), "no claim without persistence");
    let deployment = r.controller();
    assert_eq!(strategy(deployment), "Recreate");
    let pod = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    let data = data_volume(pod);
    assert!(data.empty_dir.is_some(), "persistence off means emptyDir");
    assert!(data.persistent_volume_claim.is_none());
}

#[test]
fn agent_optional_flags_and_init_container_follow_values() {
    let r = render(&[
        "--set",
        "agent.enabled=true",
        "--set",
        "agent.tokenSecret.name=boot",
        "--set",
        "agent.stateDirInit.enabled=false",
    ]);
    let pod = r.daemon_sets[0]
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    assert!(pod.init_containers.is_none());
    assert_eq!(pod.priority_class_name, None);
    assert_eq!(
        command_line(container(&pod.containers, "agent")),
        "run --controller https://mm-micromine.fleet.svc:7443 \
         --state-dir /var/lib/micromine-agent --name $(NODE_NAME)"
    );
}

type NormalisedRule = (&'static str, String, String, Vec<String>);

fn normalise(scope: &'static str, rules: &[PolicyRule]) -> Vec<NormalisedRule> {
    rules
        .iter()
        .map(|rule| {
            let groups = rule.api_groups.as_deref().unwrap_or_default();
            let resources = rule.resources.as_deref().unwrap_or_default();
            assert!(
                groups.len() == 1 && resources.len() == 1,
                "one apiGroup and one resource per rule: {rule:?}"
            );
            assert!(
                rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
                "{rule:?}"
            );
            let mut verbs = rule.verbs.clone();
            verbs.sort();
            (scope, groups[0].clone(), resources[0].clone(), verbs)
        })
        .collect()
}

#[test]
fn rbac_grants_exactly_what_the_code_uses() {
    let r = render(&[]);
    assert_eq!(r.cluster_roles.len(), 1);
    assert_eq!(r.roles.len(), 1);
    let mut rendered = normalise(
        "cluster",
        r.cluster_roles[0].rules.as_deref().unwrap_or_default(),
    );
    rendered.extend(normalise(
        "namespace",
        r.roles[0].rules.as_deref().unwrap_or_default(),
    ));
    let mut expected: Vec<NormalisedRule> = RULES
        .iter()
        .map(|rule| {
            let scope = match rule.scope {
                Scope::Cluster => "cluster",
                Scope::OwnNamespace => "namespace",
            };
            let verbs = rule.verbs.iter().map(|v| (*v).to_owned()).collect();
            (
                scope,
                rule.api_group.to_owned(),
                rule.resource.to_owned(),
                verbs,
            )
        })
        .collect();
    rendered.sort();
    expected.sort();
    assert_eq!(rendered, expected);
    assert!(
        rendered
            .iter()
            .all(|(_, g, res, verbs)| g != "*" && res != "*" && !verbs.iter().any(|v| v == "*"))
    );
    assert_eq!(
        r.roles[0].metadata.namespace.as_deref(),
        Some(NAMESPACE),
        "the Role is in the release namespace"
    );

    // Both are bound to the controller's ServiceAccount, and only to it.
    let subject = |subjects: Option<&Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        let subjects = subjects.expect("subjects");
        assert_eq!(subjects.len(), 1);
        let s = &subjects[0];
        (s.kind.clone(), s.name.clone(), s.namespace.clone())
    };
    let controller = (
        "ServiceAccount".to_owned(),
        FULLNAME.to_owned(),
        Some(NAMESPACE.to_owned()),
    );
    assert_eq!(r.cluster_role_bindings.len(), 1);
    let crb = &r.cluster_role_bindings[0];
    assert_eq!(subject(crb.subjects.as_ref()), controller);
    assert_eq!(
        (crb.role_ref.kind.as_str(), crb.role_ref.name.as_str()),
        ("ClusterRole", FULLNAME)
    );
    assert_eq!(r.role_bindings.len(), 1);
    let rb = &r.role_bindings[0];
    assert_eq!(subject(rb.subjects.as_ref()), controller);
    assert_eq!(
        (rb.role_ref.kind.as_str(), rb.role_ref.name.as_str()),
        ("Role", FULLNAME)
    );
}

/// Runs `helm template` with `args` and returns helm's complaint, failing when it succeeds.
fn refused(args: &[&str]) -> String {
    let chart = chart();
    let mut all = vec!["template", RELEASE, chart.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    let out = run_helm(&all);
    assert!(!out.status.success(), "helm accepted {args:?}");
    text(&out.stderr)
}

#[test]
fn bad_values_are_refused_with_the_field_named() {
    for (set, field) in [
        ("replicaCount=-1", "/replicaCount"),
        ("replicaCount=4", "/replicaCount"),
        ("logFormat=xml", "/logFormat"),
        ("service.type=ExternalName", "/service/type"),
        ("service.nodePort=80", "/service/nodePort"),
        (
            "persistence.accessModes={ReadWriteSometimes}",
            "/persistence/accessModes/0",
        ),
        (
            "controller.deviceCertTtl=forever",
            "/controller/deviceCertTtl",
        ),
        ("controller.typo=1", "typo"),
        ("agent.threads=0", "/agent/threads"),
        (
            "controller.tracing.otlpEndpoint=otel:4317",
            "/controller/tracing/otlpEndpoint",
        ),
        (
            "controller.tracing.sampleRatio=2",
            "/controller/tracing/sampleRatio",
        ),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        (
            "image.registry=https://registry.example.com",
            "/image/registry",
        ),
        (
            "agent.image.registry=registry.example.com/",
            "/agent/image/registry",
        ),
        ("bogus=1", "bogus"),
    ] {
        let stderr = refused(&["--set", set]);
        assert!(
            stderr.contains(field),
            "--set {set}: the message does not name {field}:\n{stderr}"
        );
    }
}

#[test]
fn inconsistent_values_are_refused_with_a_reason() {
    let stderr = refused(&["--set", "agent.enabled=true"]);
    assert!(
        stderr.contains("agent.tokenSecret.name is required"),
        "{stderr}"
    );
    // HA shares one ledger volume across nodes: the default ReadWriteOnce claim cannot.
    let stderr = refused(&["--set", "replicaCount=2"]);
    assert!(
        stderr.contains("persistence.accessModes") && stderr.contains("ReadWriteMany"),
        "{stderr}"
    );
    // ... nor can standbys without a ledger at all.
    let stderr = refused(&[
        "--set",
        "replicaCount=2",
        "--set",
        "persistence.enabled=false",
    ]);
    assert!(
        stderr.contains("persistence.enabled") && stderr.contains("ReadWriteMany"),
        "{stderr}"
    );
    // ReadWriteMany is enough; the CA is on the shared volume, no Secret needed.
    let r = render(&[
        "--set",
        "replicaCount=3",
        "--set",
        "persistence.accessModes={ReadWriteMany}",
    ]);
    assert_eq!(strategy(r.controller()), "RollingUpdate");
    let pod = r
        .controller()
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref());
    let args = command_line(container(&pod.expect("pod spec").containers, "controller"));
    assert!(!args.contains("--ca-cert-file"), "{args}");
    let stderr = refused(&[
        "--set",
        "serviceAccount.create=false",
        "--set",
        "serviceAccount.name=",
    ]);
    assert!(
        stderr.contains("serviceAccount.name is required"),
        "{stderr}"
    );
}

/// The dashboard as shipped in the chart.
fn dashboard_file() -> String {
    let path = chart().join("dashboards/micromine.json");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The alerting rules as shipped in the chart.
fn rules_file() -> String {
    let path = chart().join("alerts/micromine-rules.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every series the controller exports (`controller/src/telemetry.rs`, `http.rs`), with
/// the histograms' suffixes: a query naming anything else shows nothing, forever.
const METRICS: &[&str] = &[
    "micromine_shares_total",
    "micromine_blocks_found_total",
    "micromine_pool_shares_total",
    "micromine_pool_connected",
    "micromine_pool_difficulty",
    "micromine_hashrate_hashes_per_second",
    "micromine_site_hashrate_hashes_per_second",
    "micromine_devices",
    "micromine_sessions_active",
    "micromine_assignments_active",
    "micromine_share_verification_duration_seconds_bucket",
    "micromine_ledger_commit_duration_seconds_bucket",
    "micromine_assignment_latency_seconds_bucket",
    "micromine_reconciles_total",
    "micromine_reconcile_duration_seconds_bucket",
    "micromine_enrollments_total",
    "micromine_certificate_expiry_timestamp_seconds",
    "micromine_controller_serving",
    "micromine_site_max_temperature_celsius",
    "micromine_site_mean_temperature_celsius",
    "micromine_power_watts",
    "micromine_energy_joules_total",
    "micromine_expected_revenue_total",
    "micromine_energy_cost_per_hour",
    "micromine_expected_revenue_per_hour",
    "micromine_profitable",
    "micromine_agent_spans_total",
    "micromine_device_hashrate_hashes_per_second",
    "micromine_device_share_difficulty",
    "micromine_device_temperature_celsius",
    "micromine_device_host_cpu_ratio",
    "micromine_device_battery_ratio",
    "micromine_device_power_watts",
    "micromine_device_duty_cycle_ratio",
];

/// The `micromine_*` names `expr` uses, each of which must be in [`METRICS`].
fn assert_known_metrics(expr: &str, what: &str) {
    let mut rest = expr;
    while let Some(at) = rest.find("micromine_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            METRICS.contains(&name.as_str()),
            "{what}: {name} is not a series the controller exports: {expr}"
        );
        rest = &rest[at + name.len()..];
    }
}

#[test]
fn dashboard_config_map_carries_the_dashboard_file() {
    let file = dashboard_file();
    let r = render(&[]);
    let config_map = r
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("mm-micromine-dashboard"))
        .expect("the dashboard ConfigMap");
    assert_eq!(config_map.metadata.namespace.as_deref(), Some(NAMESPACE));
    let labels = config_map.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get("grafana_dashboard").map(String::as_str),
        Some("1"),
        "the Grafana sidecar's default label"
    );
    let data = config_map.data.as_ref().expect("data");
    assert_eq!(data.len(), 1);
    assert!(
        data["micromine.json"] == file,
        "the ConfigMap's micromine.json differs from dashboards/micromine.json"
    );

    let r = render(&[
        "--set",
        "grafana.dashboards.label=example.com/dashboard",
        "--set",
        "grafana.dashboards.labelValue=fleet",
        "--set",
        "grafana.dashboards.annotations.grafana_folder=Mining",
    ]);
    let metadata = &r.config_maps[0].metadata;
    let labels = metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get("example.com/dashboard").map(String::as_str),
        Some("fleet")
    );
    assert!(!labels.contains_key("grafana_dashboard"));
    assert_eq!(
        metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("grafana_folder"))
            .map(String::as_str),
        Some("Mining")
    );

    let r = render(&["--set", "grafana.dashboards.enabled=false"]);
    assert!(r.config_maps.is_empty());

    let stderr = refused(&["--set", "grafana.dashboards.labelValue=not valid"]);
    assert!(
        stderr.contains("/grafana/dashboards/labelValue"),
        "{stderr}"
    );
}

#[test]
fn prometheus_rule_renders_only_when_enabled_and_carries_the_rules_file() {
    assert!(render(&[]).prometheus_rules.is_empty());
    let values = ha_values();
    assert!(
        render(&["-f", values.to_str().expect("utf-8 path")])
            .prometheus_rules
            .is_empty(),
        "a ServiceMonitor alone does not bring the rules"
    );

    let r = render(&[
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "prometheusRule.labels.release=prometheus",
    ]);
    assert_eq!(r.prometheus_rules.len(), 1);
    let rule = &r.prometheus_rules[0];
    assert_eq!(rule["metadata"]["name"], FULLNAME);
    assert_eq!(rule["metadata"]["namespace"], NAMESPACE);
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(
        rule["spec"].as_object().map(|s| s.len()),
        Some(1),
        "spec holds groups only"
    );
    let file: Value = serde_saphyr::from_str(&rules_file()).expect("the rules file is YAML");
    assert_eq!(
        rule["spec"]["groups"], file["groups"],
        "the PrometheusRule's groups differ from alerts/micromine-rules.yaml"
    );
}

#[test]
fn dashboard_is_well_formed() {
    let dashboard: Value = serde_json::from_str(&dashboard_file()).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "micromine-fleet");
    assert_eq!(dashboard["title"], "micromine fleet");
    assert!(dashboard["schemaVersion"].as_u64() >= Some(36));
    assert!(
        dashboard.get("__inputs").is_none(),
        "__inputs makes the sidecar's dashboard ask for a data source that never comes"
    );

    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    let datasource = variable("datasource");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    for (name, query) in [
        (
            "namespace",
            "label_values(micromine_hashrate_hashes_per_second, miner_namespace)",
        ),
        (
            "miner",
            r#"label_values(micromine_hashrate_hashes_per_second{miner_namespace=~"$namespace"}, miner)"#,
        ),
        ("site", "label_values(micromine_devices, site)"),
    ] {
        let v = variable(name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["definition"], query, "{name}");
        assert_eq!(v["query"]["query"], query, "{name}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{name}");
        assert_eq!(
            (&v["multi"], &v["includeAll"]),
            (&Value::Bool(true), &Value::Bool(true))
        );
        // Not Grafana's default (an alternation of the values it knows): devices matching
        // no MicroMiner or without a site have empty labels, which only `.*` matches.
        assert_eq!(v["allValue"], ".*", "{name}");
    }
    let defined: Vec<&str> = variables
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();

    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 20, "{} panels", panels.len());
    let mut ids = std::collections::BTreeSet::new();
    for panel in panels {
        let id = panel["id"].as_u64().expect("every panel has a numeric id");
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(ids.insert(id), "panel id {id} ({title}) is not unique");
        let grid = &panel["gridPos"];
        let [h, w, x, _] = ["h", "w", "x", "y"].map(|k| {
            grid[k]
                .as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        });
        assert!(h > 0 && w > 0 && x + w <= 24, "{title}: gridPos {grid}");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        assert!(
            panel["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .is_some_and(|u| !u.is_empty()),
            "{title}: no unit"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no queries");
        let mut ref_ids = std::collections::BTreeSet::new();
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{title}: a target without expr");
            assert!(
                ref_ids.insert(target["refId"].as_str().expect("refId")),
                "{title}"
            );
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            assert_known_metrics(expr, title);
            assert_balanced(expr, title);
            // Every variable is one of ours or Grafana's own.
            for (at, _) in expr.match_indices('$') {
                let name: String = expr[at + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    defined.contains(&name.as_str())
                        || ["__rate_interval", "__range", "__interval"].contains(&name.as_str()),
                    "{title}: unknown variable ${name} in {expr}"
                );
            }
            assert!(
                !expr.contains("[5m]") && !expr.contains("[1m]"),
                "{title}: use $__rate_interval, not a fixed window: {expr}"
            );
        }
    }
}

/// Parentheses, brackets and braces pair up outside strings: the cheapest PromQL check
/// without a Prometheus (the end-to-end tests evaluate every query against one).
fn assert_balanced(expr: &str, what: &str) {
    let mut open = Vec::new();
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '[' | '{' => open.push(c),
            ')' | ']' | '}' => {
                let expected = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                assert_eq!(
                    open.pop(),
                    Some(expected),
                    "{what}: unbalanced {c} in {expr}"
                );
            }
            _ => {}
        }
    }
    assert!(
        open.is_empty() && quote.is_none(),
        "{what}: unclosed in {expr}"
    );
}

#[test]
fn alert_rules_are_well_formed() {
    let file: Value = serde_saphyr::from_str(&rules_file()).expect("the rules file is YAML");
    let mut alerts = Vec::new();
    for group in file["groups"].as_array().expect("groups") {
        let group_name = group["name"].as_str().expect("every group has a name");
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("alerting rules only");
            let what = format!("{group_name}/{name}");
            let expr = rule["expr"].as_str().expect("expr");
            assert!(!expr.trim().is_empty(), "{what}");
            assert_known_metrics(expr, &what);
            assert_balanced(expr, &what);
            assert!(!expr.contains('$'), "{what}: no Grafana variables in rules");
            let severity = rule["labels"]["severity"].as_str().expect("severity");
            assert!(
                ["warning", "critical"].contains(&severity),
                "{what}: {severity}"
            );
            let for_ = rule["for"].as_str().expect("for: a duration");
            assert!(
                for_.ends_with('m') || for_.ends_with('h'),
                "{what}: for {for_}"
            );
            for annotation in ["summary", "description"] {
                let text = rule["annotations"][annotation]
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: no {annotation}"));
                assert!(text.len() > 20, "{what}: {annotation} says too little");
                assert_eq!(
                    text.matches("{{").count(),
                    text.matches("}}").count(),
                    "{what}: {annotation} has an unclosed template"
                );
            }
            alerts.push((name.to_owned(), severity.to_owned()));
        }
    }
    alerts.sort();
    alerts.dedup();
    let expected = [
        ("MicromineAssignmentLatencyHigh", "warning"),
        ("MicromineCertificateExpiringSoon", "warning"),
        ("MicromineControllerDown", "critical"),
        ("MicromineDeviceOverheating", "warning"),
        ("MicromineDevicesOffline", "critical"),
        ("MicromineDevicesOffline", "warning"),
        ("MicromineEffectiveHashrateGap", "warning"),
        ("MicromineNoAcceptedShares", "warning"),
        ("MicrominePoolDisconnected", "critical"),
        ("MicrominePoolRejectingShares", "warning"),
        ("MicromineReconcileErrors", "warning"),
        ("MicromineRejectedShareRatioHigh", "warning"),
        ("MicromineUnprofitable", "warning"),
    ]
    .map(|(a, s)| (a.to_owned(), s.to_owned()));
    assert_eq!(alerts, expected);
}

/// The images of a controller Deployment and an agent DaemonSet rendered with `extra`.
fn images(extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "--set",
        "agent.enabled=true",
        "--set",
        "agent.tokenSecret.name=fleet-token",
    ];
    args.extend_from_slice(extra);
    let r = render(&args);
    let pod = |spec: Option<&PodSpec>| spec.expect("pod spec").containers.clone();
    let controller = pod(r
        .controller()
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref()));
    let agent = pod(r.daemon_sets[0]
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref()));
    (
        container(&controller, "controller")
            .image
            .clone()
            .expect("controller image"),
        container(&agent, "agent")
            .image
            .clone()
            .expect("agent image"),
    )
}

#[test]
fn images_come_from_the_registry_dist_oci_was_pushed_to() {
    let v = env!("CARGO_PKG_VERSION");
    assert_eq!(
        images(&[]),
        (
            format!("micromine-controller:{v}"),
            format!("micromine-agent:{v}")
        ),
        "no registry: the names scripts/dist gives the layouts"
    );
    assert_eq!(
        images(&["--set", "image.registry=registry.example.com:5000/fleet"]),
        (
            format!("registry.example.com:5000/fleet/micromine-controller:{v}"),
            format!("registry.example.com:5000/fleet/micromine-agent:{v}")
        ),
        "one registry for both"
    );
    assert_eq!(
        images(&[
            "--set",
            "image.registry=registry.example.com",
            "--set",
            "agent.image.registry=edge-mirror.plant-3.example",
            "--set",
            "agent.image.tag=0.1.0-rc1",
        ]),
        (
            format!("registry.example.com/micromine-controller:{v}"),
            "edge-mirror.plant-3.example/micromine-agent:0.1.0-rc1".to_string()
        ),
        "the agent's own registry and tag win"
    );
}
