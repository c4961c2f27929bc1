//! OpenTelemetry traces end to end: a controller started with the standard `OTEL_*`
//! variables sends its spans over OTLP/gRPC to a receiver the test runs, as it would to a
//! collector; an assignment's trace continues on the agent, whose spans come back in-band
//! (or, for a device with a collector of its own, straight from the agent); the enrollment
//! trace crosses in the Enroll call's gRPC metadata; and spans a device forges are not
//! passed on.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use micromine_e2e::raw::{self, RawSession};
use micromine_e2e::{
    ControllerProcess, create_token, get_text, start_agent, start_agent_with, test_manifest,
    wait_until,
};
use micromine_proto::pb::{self, agent_message::Kind as AgentKind};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;

/// A span as received.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: Vec<(String, String)>,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

impl Receiver {
    fn spans(&self) -> Vec<Received> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn find(&self, service: &str, name: &str) -> Vec<Received> {
        self.spans()
            .into_iter()
            .filter(|s| s.service == service && s.name == name)
            .collect()
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(text)
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| {
                            let value = kv.value.as_ref().and_then(|v| v.value.as_ref());
                            (kv.key.clone(), value.map(text).unwrap_or_default())
                        })
                        .collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn text(value: &AnyValue) -> String {
    match value {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(i) => i.to_string(),
        AnyValue::DoubleValue(d) => d.to_string(),
        AnyValue::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// An OTLP receiver on a loopback port, and the runtime serving it.
struct Collector {
    runtime: tokio::runtime::Runtime,
    receiver: Receiver,
    endpoint: String,
}

impl Collector {
    fn start() -> Collector {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let receiver = Receiver::default();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the OTLP receiver");
        let addr: SocketAddr = listener.local_addr().expect("its address");
        let service = TraceServiceServer::new(receiver.clone());
        runtime.spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
            if let Err(e) = served {
                eprintln!("OTLP receiver stopped: {e}");
            }
        });
        Collector {
            runtime,
            receiver,
            endpoint: format!("http://{addr}"),
        }
    }

    /// The standard variables that point a process at this receiver as `service`.
    fn env<'a>(&'a self, service: &'a str) -> [(&'a str, &'a Path); 3] {
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", Path::new(&self.endpoint)),
            ("OTEL_SERVICE_NAME", Path::new(service)),
            // Export every 200 ms instead of every 5 s, so the test need not wait.
            ("OTEL_BSP_SCHEDULE_DELAY", Path::new("200")),
        ]
    }
}

/// A standalone controller exporting traces as `e2e-controller`; 5-second assignments,
/// so `mine` spans end (and come back) every few seconds.
fn traced_controller(dir: &Path, collector: &Collector) -> ControllerProcess {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(
        manifests.join("traced.yaml"),
        test_manifest("traced", 5, 1e12),
    )
    .expect("manifest");
    ControllerProcess::start_with_env(
        &manifests,
        &dir.join("data"),
        &[],
        &collector.env("e2e-controller"),
    )
}

/// The value of an unlabelled-but-for-`labels` series on the controller's `/metrics`.
fn metric(controller: &ControllerProcess, series: &str) -> f64 {
    get_text(controller.http, "/metrics")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn an_assignments_trace_continues_on_the_agent_whose_spans_come_back_in_band() {
    let collector = Collector::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let controller = traced_controller(dir.path(), &collector);
    let token = create_token(&dir.path().join("data"), 1);
    let _agent = start_agent(
        &controller,
        &token,
        "traced-1",
        &dir.path().join("traced-1"),
        "site=e2e",
    );

    // The controller's own spans.
    for name in ["enroll", "assign", "share_batch"] {
        let span = wait_until(
            &format!("a controller `{name}` span"),
            Duration::from_secs(60),
            || collector.receiver.find("e2e-controller", name).pop(),
        );
        if name != "enroll" {
            assert_eq!(span.attribute("device"), Some("traced-1"), "{span:?}");
        }
    }
    let assign = collector
        .receiver
        .find("e2e-controller", "assign")
        .remove(0);
    assert_eq!(assign.attribute("miner"), Some("default/traced"));
    assert!(
        assign.parent_span_id.is_empty(),
        "an assignment's trace starts at `assign`: {assign:?}"
    );

    // The agent has no collector; its `mine` spans reach this one through the controller,
    // as service micromine-agent, each in the trace of the `assign` span it continues.
    let (mine, parent) = wait_until(
        "an agent `mine` span under a controller `assign` span",
        Duration::from_secs(60),
        || {
            let assigns = collector.receiver.find("e2e-controller", "assign");
            collector
                .receiver
                .find("micromine-agent", "mine")
                .into_iter()
                .find_map(|mine| {
                    let parent = assigns.iter().find(|a| a.span_id == mine.parent_span_id)?;
                    Some((mine, parent.clone()))
                })
        },
    );
    assert_eq!(
        mine.trace_id, parent.trace_id,
        "one trace across both services"
    );
    assert_eq!(mine.trace_id.len(), 16);
    assert_eq!(mine.attribute("micromine.device"), Some("traced-1"));
    assert_eq!(mine.attribute("miner"), Some("default/traced"));
    assert_eq!(mine.attribute("assignment"), parent.attribute("assignment"));
    assert!(mine.attribute("outcome").is_some(), "{mine:?}");
    assert!(mine.attribute("hashes").is_some(), "{mine:?}");
    assert!(
        metric(
            &controller,
            r#"micromine_agent_spans_total{outcome="relayed"}"#
        ) >= 1.0,
        "the relay is counted"
    );
}

#[test]
fn an_agent_with_its_own_collector_exports_directly_and_enrollment_is_one_trace() {
    let collector = Collector::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let controller = traced_controller(dir.path(), &collector);
    let token = create_token(&dir.path().join("data"), 1);
    let _agent = start_agent_with(
        &controller,
        &token,
        "traced-2",
        &dir.path().join("traced-2"),
        "site=e2e",
        &[],
        &collector.env("e2e-agent"),
    );

    // Enrollment: the agent's span, and the controller's as its child through the call's
    // gRPC metadata.
    let (agent_enroll, controller_enroll) = wait_until(
        "the agent's and the controller's `enroll` spans",
        Duration::from_secs(60),
        || {
            let agent = collector.receiver.find("e2e-agent", "enroll").pop()?;
            let controller = collector.receiver.find("e2e-controller", "enroll").pop()?;
            Some((agent, controller))
        },
    );
    assert_eq!(controller_enroll.trace_id, agent_enroll.trace_id);
    assert_eq!(controller_enroll.parent_span_id, agent_enroll.span_id);
    assert_eq!(agent_enroll.attribute("device"), Some("traced-2"));

    // Mining: straight from the agent, still in the controller's trace.
    let mine = wait_until(
        "an agent `mine` span exported by the agent itself",
        Duration::from_secs(60),
        || collector.receiver.find("e2e-agent", "mine").pop(),
    );
    let assigns = collector.receiver.find("e2e-controller", "assign");
    let parent = assigns
        .iter()
        .find(|a| a.span_id == mine.parent_span_id)
        .unwrap_or_else(|| panic!("the parent of {mine:?} among {assigns:?}"));
    assert_eq!(mine.trace_id, parent.trace_id);
    assert!(
        collector
            .receiver
            .find("micromine-agent", "mine")
            .is_empty(),
        "nothing went in-band as well"
    );
}

fn span(trace_id: Vec<u8>, parent: Vec<u8>, name: &str) -> pb::AgentSpan {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    pb::AgentSpan {
        trace_id,
        span_id: span_id_for(name),
        parent_span_id: parent,
        name: name.to_string(),
        start_unix_nanos: now - 1_000_000_000,
        end_unix_nanos: now,
        attributes: [(
            "micromine.device".to_string(),
            pb::AttributeValue {
                value: Some(pb::attribute_value::Value::Text("someone-else".into())),
            },
        )]
        .into(),
        events: Vec::new(),
        error: false,
        status_message: String::new(),
    }
}

/// A span id derived from the name, so each test span is distinct and non-zero.
fn span_id_for(name: &str) -> Vec<u8> {
    let mut id = [0x5a_u8; 8];
    for (i, b) in name.bytes().enumerate() {
        id[i % 8] ^= b;
    }
    id.to_vec()
}

fn spans(spans: Vec<pb::AgentSpan>) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(AgentKind::Spans(pb::SpanBatch { spans })),
    }
}

#[test]
fn spans_a_device_forges_are_not_passed_on() {
    let collector = Collector::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let controller = traced_controller(dir.path(), &collector);
    let data = dir.path().join("data");
    collector.runtime.block_on(async {
        let identity = raw::enroll(&controller, &data, "raw-traced").await;
        let mut session = RawSession::open(&controller.url(), &identity, raw::hello(1e6)).await;
        let assignment = session.assignment().await;
        let traceparent = assignment
            .trace_context
            .get("traceparent")
            .unwrap_or_else(|| panic!("a traced controller sends trace context: {assignment:?}"));
        // 00-<trace id>-<parent id>-<flags>
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts.len(), 4, "{traceparent}");
        let trace_id = hex::decode(parts[1]).expect("hex trace id");
        let parent_id = hex::decode(parts[2]).expect("hex span id");

        session
            .tx
            .send(spans(vec![
                span(trace_id.clone(), parent_id.clone(), "genuine"),
                // A trace this controller never started for this device.
                span(vec![0x42; 16], parent_id.clone(), "forged"),
                // Ids of the wrong size.
                span(trace_id[..8].to_vec(), parent_id.clone(), "truncated"),
            ]))
            .await
            .expect("send");
        let genuine = wait_until(
            "the genuine span at the collector",
            Duration::from_secs(30),
            || collector.receiver.find("micromine-agent", "genuine").pop(),
        );
        assert_eq!(
            genuine.attribute("micromine.device"),
            Some("raw-traced"),
            "the certificate's name, not the claimed one"
        );
        assert_eq!(
            metric(
                &controller,
                r#"micromine_agent_spans_total{outcome="unknown_trace"}"#
            ),
            1.0
        );
        assert_eq!(
            metric(
                &controller,
                r#"micromine_agent_spans_total{outcome="malformed"}"#
            ),
            1.0
        );

        // More spans in one batch than the protocol allows ends the session.
        let too_many = (0..65)
            .map(|i| span(trace_id.clone(), parent_id.clone(), &format!("flood-{i}")))
            .collect();
        session.tx.send(spans(too_many)).await.expect("send");
        let status = session.end().await;
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("at most 64 spans"), "{status:?}");
        // Checked and counted before anything was relayed: still the one genuine span.
        assert_eq!(
            metric(
                &controller,
                r#"micromine_agent_spans_total{outcome="relayed"}"#
            ),
            1.0
        );
    });
    let relayed: Vec<String> = collector
        .receiver
        .spans()
        .into_iter()
        .filter(|s| s.service == "micromine-agent")
        .map(|s| s.name)
        .collect();
    assert_eq!(relayed, ["genuine"]);
}
