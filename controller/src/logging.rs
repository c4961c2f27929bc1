//! Logs as text or JSON lines on stderr, with a level filter an operator can change while
//! the controller runs (`PUT /loglevel` on the HTTP listener, from loopback, e.g. through
//! `kubectl port-forward`), so chasing a problem does not need a restart that would make
//! it go away. Spans go out over OTLP when the standard OpenTelemetry variables ask for it.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanProcessor};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();
static TRACES: OnceLock<SdkTracerProvider> = OnceLock::new();
/// Spans agents sent in-band, on their way to the same collector as service
/// `micromine-agent`.
static AGENT_SPANS: OnceLock<BatchSpanProcessor> = OnceLock::new();

/// Installs the process's logger: `RUST_LOG` if set, else `default_filter`; JSON lines
/// when `json`. Call once, first thing.
pub fn init(json: bool, default_filter: &str) {
    install(json, default_filter, None);
}

/// [`init`], and when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, spans go out over OTLP/gRPC too, to a
/// collector, named by `OTEL_SERVICE_NAME` (default `service`) and described by
/// `OTEL_RESOURCE_ATTRIBUTES`. Must run inside the tokio runtime the exporter will use.
/// Returns whether traces are exported; an exporter that cannot be built is reported
/// and logging goes on without it.
pub fn init_with_traces(json: bool, default_filter: &str, service: &str) -> bool {
    if !micromine_agent::traces::otlp_export_requested() {
        install(json, default_filter, None);
        return false;
    }
    match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(exporter) => {
            let mut resource = opentelemetry_sdk::Resource::builder();
            if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
                resource = resource.with_service_name(service.to_string());
            }
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.build())
                .build();
            let tracer = provider.tracer(service.to_string());
            install(json, default_filter, Some(tracer));
            let _ = TRACES.set(provider);
            start_agent_span_relay();
            true
        }
        Err(e) => {
            install(json, default_filter, None);
            tracing::error!(error = %e, "OTLP trace export is configured but cannot start; going on without it");
            false
        }
    }
}

/// A second exporter for agents' spans: the controller's own resource (its service name,
/// `OTEL_RESOURCE_ATTRIBUTES`) describes the controller, not the devices.
fn start_agent_span_relay() {
    match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(exporter) => {
            let mut processor = BatchSpanProcessor::builder(exporter).build();
            processor.set_resource(
                &opentelemetry_sdk::Resource::builder_empty()
                    .with_service_name("micromine-agent")
                    .build(),
            );
            let _ = AGENT_SPANS.set(processor);
        }
        Err(e) => {
            tracing::error!(error = %e, "agents' spans cannot be passed on; dropping them")
        }
    }
}

/// Passes on a span an agent sent (already checked); false when traces are not exported.
pub fn relay_agent_span(span: SpanData) -> bool {
    match AGENT_SPANS.get() {
        Some(processor) => {
            processor.on_end(span);
            true
        }
        None => false,
    }
}

/// Sends the spans still buffered; call before the process exits.
pub fn flush_traces() {
    if let Some(provider) = TRACES.get()
        && let Err(e) = provider.shutdown()
    {
        eprintln!("flushing traces: {e}");
    }
    if let Some(processor) = AGENT_SPANS.get()
        && let Err(e) = processor.shutdown()
    {
        eprintln!("flushing agents' spans: {e}");
    }
}

fn install(json: bool, default_filter: &str, tracer: Option<opentelemetry_sdk::trace::Tracer>) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let format = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed()
    };
    let traces = tracer.map(|t| tracing_opentelemetry::layer().with_tracer(t));
    if tracing_subscriber::registry()
        .with(filter)
        .with(format)
        .with(traces)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

/// The filter in effect, in `RUST_LOG` syntax; `None` before [`init`].
pub fn filter() -> Option<String> {
    FILTER.get()?.with_current(|f| f.to_string()).ok()
}

/// Replaces the filter, e.g. `debug` or `info,micromine_controller::kubernetes=debug`.
/// An error says what is wrong with the directive and changes nothing.
pub fn set_filter(directives: &str) -> Result<String, String> {
    let handle = FILTER
        .get()
        .ok_or_else(|| "logging is not set up in this process".to_string())?;
    let parsed = EnvFilter::builder()
        .parse(directives.trim())
        .map_err(|e| format!("log filter `{}`: {e}", directives.trim()))?;
    let shown = parsed.to_string();
    handle.reload(parsed).map_err(|e| e.to_string())?;
    Ok(shown)
}
