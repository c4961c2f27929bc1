//! OpenTelemetry traces: the controller, started with the standard `OTEL_*` variables,
//! sends its spans (enrollment, assignments, share batches) over OTLP/gRPC to a receiver
//! the test runs, as it would to a collector.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use micromine_e2e::{
    ControllerProcess, Process, bin, create_token, loopback, start_agent, test_manifest, wait_until,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;

/// A span as received: its service's name, its own name, its attributes as text.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    attributes: Vec<(String, String)>,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

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

/// Serves the OTLP trace service on a loopback port until the runtime is dropped.
fn start_receiver(runtime: &tokio::runtime::Runtime, receiver: Receiver) -> SocketAddr {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the OTLP receiver");
    let addr = listener.local_addr().expect("its address");
    runtime.spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
        if let Err(e) = served {
            eprintln!("OTLP receiver stopped: {e}");
        }
    });
    addr
}

#[test]
fn the_controller_sends_enrollment_assignment_and_share_batch_spans_over_otlp() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let receiver = Receiver::default();
    let otlp = start_receiver(&runtime, receiver.clone());

    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(
        manifests.join("traced.yaml"),
        test_manifest("traced", 5, 1e12),
    )
    .expect("manifest");
    let data = dir.path().join("data");
    let (grpc, http) = (loopback(), loopback());
    let (manifests_arg, data_arg, grpc_arg, http_arg) = (
        manifests.display().to_string(),
        data.display().to_string(),
        grpc.to_string(),
        http.to_string(),
    );
    let endpoint = format!("http://{otlp}");
    let env: [(&str, &std::path::Path); 3] = [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            std::path::Path::new(&endpoint),
        ),
        ("OTEL_SERVICE_NAME", std::path::Path::new("e2e-controller")),
        // Export every 200 ms instead of every 5 s, so the test need not wait.
        ("OTEL_BSP_SCHEDULE_DELAY", std::path::Path::new("200")),
    ];
    let process = Process::start_with_env(
        "controller",
        &bin("micromine-controller"),
        &[
            "run",
            "--manifests",
            &manifests_arg,
            "--data-dir",
            &data_arg,
            "--listen",
            &grpc_arg,
            "--http-listen",
            &http_arg,
        ],
        &env,
    );
    let controller = ControllerProcess {
        process,
        grpc,
        http,
    };
    controller
        .process
        .wait_for_log("controller running", Duration::from_secs(30));
    let token = create_token(&data, 1);
    let _agent = start_agent(
        &controller,
        &token,
        "traced-1",
        &dir.path().join("traced-1"),
        "site=e2e",
    );

    let has = |name: &str| {
        let spans = receiver.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        spans
            .into_iter()
            .find(|s| s.name == name && s.service == "e2e-controller")
    };
    for name in ["enroll", "assign", "share_batch"] {
        let span = wait_until(
            &format!("a `{name}` span at the receiver"),
            Duration::from_secs(60),
            || has(name),
        );
        if name != "enroll" {
            assert!(
                span.attributes
                    .iter()
                    .any(|(k, v)| k == "device" && v == "traced-1"),
                "{span:?}"
            );
        }
    }
    let assign = has("assign").expect("seen above");
    assert!(
        assign
            .attributes
            .iter()
            .any(|(k, v)| k == "miner" && v == "default/traced"),
        "{assign:?}"
    );
}
