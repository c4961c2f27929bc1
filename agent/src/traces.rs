//! The agent's traces: a `mine` span for every assignment the controller traced, and an
//! `enroll` span whose context rides the Enroll call's gRPC metadata.
//!
//! A device should not need a collector of its own, so by default finished spans queue up
//! here and the session sends them in-band (`SpanBatch`); the controller passes them on
//! with its own. Root spans are not recorded in that mode: only spans continuing a trace
//! the controller started and sampled, so a fleet traces exactly as much as its controller
//! is told to. A device that does have a collector sets the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` and exports directly, root spans included.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use micromine_proto::pb;
use micromine_proto::span_limits as limits;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SimpleSpanProcessor, SpanData, SpanExporter,
};

/// The span type the agent holds open (an assignment's `mine` span).
pub type SdkSpan = opentelemetry_sdk::trace::Span;

/// Finished spans kept for the next session while none is open; older ones are dropped.
const QUEUE_CAPACITY: usize = 512;

/// Where the agent's spans go. Cheap to clone; clones share the queue.
#[derive(Clone)]
pub struct AgentTelemetry {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    /// `Some` when spans go in-band.
    queue: Option<Arc<SpanQueue>>,
}

impl std::fmt::Debug for AgentTelemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTelemetry")
            .field("in_band", &self.queue.is_some())
            .finish()
    }
}

impl Default for AgentTelemetry {
    fn default() -> Self {
        AgentTelemetry::in_band()
    }
}

impl AgentTelemetry {
    /// Spans continue the controller's sampled traces and go back over the session.
    pub fn in_band() -> AgentTelemetry {
        let queue = Arc::new(SpanQueue::default());
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
            .with_span_processor(SimpleSpanProcessor::new(InBandExporter(queue.clone())))
            .build();
        AgentTelemetry {
            tracer: provider.tracer("micromine-agent"),
            provider,
            queue: Some(queue),
        }
    }

    /// OTLP/gRPC export when the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES`) ask for it, else [`in_band`](Self::in_band). Must run
    /// inside the tokio runtime the exporter will use. A build without the `otlp` feature
    /// (the lean one devices get) says so and stays in-band.
    pub fn from_env() -> AgentTelemetry {
        if !otlp_export_requested() {
            return AgentTelemetry::in_band();
        }
        #[cfg(feature = "otlp")]
        {
            AgentTelemetry::otlp().unwrap_or_else(|e| {
                tracing::error!(error = %e, "OTLP trace export is configured but cannot start; sending spans in-band instead");
                AgentTelemetry::in_band()
            })
        }
        #[cfg(not(feature = "otlp"))]
        {
            tracing::warn!(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set, but this build has no OTLP exporter (cargo feature `otlp`); spans go in-band over the session instead"
            );
            AgentTelemetry::in_band()
        }
    }

    #[cfg(feature = "otlp")]
    fn otlp() -> Result<AgentTelemetry, opentelemetry_otlp::ExporterBuildError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("micromine-agent");
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        Ok(AgentTelemetry {
            tracer: provider.tracer("micromine-agent"),
            provider,
            queue: None,
        })
    }

    /// Whether spans go over the session rather than to a collector.
    pub fn is_in_band(&self) -> bool {
        self.queue.is_some()
    }

    /// Starts the `mine` span of an assignment, continuing the controller's trace. `None`
    /// when the assignment carries no sampled trace context and nothing would record it.
    pub fn start_mining(&self, assignment: &pb::Assignment) -> Option<SdkSpan> {
        let headers: HashMap<&str, &str> = assignment
            .trace_context
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        if !parent.span().span_context().is_valid() && self.is_in_band() {
            return None;
        }
        let span = self
            .tracer
            .span_builder("mine")
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("assignment", assignment.id as i64),
                KeyValue::new("miner", assignment.miner.clone()),
                KeyValue::new(
                    "nonces",
                    assignment.nonce_end.saturating_sub(assignment.nonce_start) as i64,
                ),
                KeyValue::new("share_difficulty", assignment.share_difficulty),
            ])
            .start_with_context(&self.tracer, &parent);
        span.is_recording().then_some(span)
    }

    /// Starts a root span (`enroll`) and returns the W3C headers that carry its context,
    /// for the request's gRPC metadata. In-band mode records no root spans.
    pub fn start_root(&self, name: &'static str) -> (SdkSpan, HashMap<String, String>) {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .start(&self.tracer);
        let context = span.span_context().clone();
        let mut headers = HashMap::new();
        // An unsampled context would make the controller drop its own span for the call
        // (its sampler follows the parent), so only a recorded one is passed on.
        if context.is_valid() && context.is_sampled() {
            TraceContextPropagator::new().inject_context(
                &Context::new().with_remote_span_context(context),
                &mut headers,
            );
        }
        (span, headers)
    }

    /// Takes up to `max` finished spans for the session to send.
    pub fn take_in_band(&self, max: usize) -> Vec<pb::AgentSpan> {
        match &self.queue {
            Some(queue) => {
                let mut spans = queue.lock();
                let n = spans.len().min(max);
                spans.drain(..n).collect()
            }
            None => Vec::new(),
        }
    }

    /// Sends what is buffered to the collector (OTLP mode); call before exiting.
    pub fn shutdown(&self) {
        if self.queue.is_none()
            && let Err(e) = self.provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces");
        }
    }
}

/// W3C headers borrowed from a message, for the propagator to read.
struct Headers<'a>(HashMap<&'a str, &'a str>);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).copied()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().copied().collect()
    }
}

/// Whether the standard variables ask for OTLP trace export (`OTEL_EXPORTER_OTLP_ENDPOINT`
/// or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set and not empty). The controller asks the
/// same question.
pub fn otlp_export_requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|e| !e.is_empty()))
}

#[derive(Default)]
struct SpanQueue(Mutex<VecDeque<pb::AgentSpan>>);

impl SpanQueue {
    fn lock(&self) -> MutexGuard<'_, VecDeque<pb::AgentSpan>> {
        // Only whole spans are pushed and popped; a panic elsewhere cannot leave half of one.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Turns finished spans into their wire form and queues them for the session.
#[derive(Debug)]
struct InBandExporter(Arc<SpanQueue>);

impl std::fmt::Debug for SpanQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanQueue")
            .field("len", &self.lock().len())
            .finish()
    }
}

impl SpanExporter for InBandExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut queue = self.0.lock();
        for span in batch {
            if queue.len() >= QUEUE_CAPACITY {
                queue.pop_front();
            }
            queue.push_back(to_wire(&span));
        }
        Ok(())
    }
}

fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos()
        .try_into()
        .unwrap_or(u64::MAX)
}

fn clip(text: &str, chars: usize) -> String {
    text.chars().take(chars).collect()
}

fn attribute_value(value: &Value) -> pb::AttributeValue {
    use pb::attribute_value::Value as V;
    let value = match value {
        Value::Bool(b) => V::Flag(*b),
        Value::I64(i) => V::Integer(*i),
        Value::F64(f) => V::Number(*f),
        other => V::Text(clip(&other.to_string(), limits::TEXT_CHARS)),
    };
    pb::AttributeValue { value: Some(value) }
}

fn attributes<'a>(
    attributes: impl Iterator<Item = &'a KeyValue>,
) -> BTreeMap<String, pb::AttributeValue> {
    attributes
        .take(limits::ATTRIBUTES)
        .map(|kv| {
            (
                clip(kv.key.as_str(), limits::KEY_CHARS),
                attribute_value(&kv.value),
            )
        })
        .collect()
}

/// A finished span in the wire form, trimmed to what the controller accepts.
fn to_wire(span: &SpanData) -> pb::AgentSpan {
    let parent = span.parent_span_id;
    let (error, status_message) = match &span.status {
        Status::Error { description } => (true, clip(description, limits::TEXT_CHARS)),
        _ => (false, String::new()),
    };
    pb::AgentSpan {
        trace_id: span.span_context.trace_id().to_bytes().to_vec(),
        span_id: span.span_context.span_id().to_bytes().to_vec(),
        parent_span_id: if parent == opentelemetry::trace::SpanId::INVALID {
            Vec::new()
        } else {
            parent.to_bytes().to_vec()
        },
        name: clip(&span.name, limits::NAME_CHARS),
        start_unix_nanos: unix_nanos(span.start_time),
        end_unix_nanos: unix_nanos(span.end_time),
        attributes: attributes(span.attributes.iter()),
        events: span
            .events
            .iter()
            .take(limits::EVENTS)
            .map(|e| pb::SpanEvent {
                name: clip(&e.name, limits::NAME_CHARS),
                unix_nanos: unix_nanos(e.timestamp),
                attributes: attributes(e.attributes.iter()),
            })
            .collect(),
        error,
        status_message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    fn assignment(trace_context: HashMap<String, String>) -> pb::Assignment {
        let trace_context = trace_context.into_iter().collect();
        pb::Assignment {
            id: 7,
            nonce_start: 100,
            nonce_end: 1100,
            share_difficulty: 0.5,
            miner: "default/a".into(),
            trace_context,
            ..Default::default()
        }
    }

    fn controller_context(sampled: bool) -> (SpanContext, HashMap<String, String>) {
        let context = SpanContext::new(
            TraceId::from_bytes([7; 16]),
            SpanId::from_bytes([9; 8]),
            if sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            true,
            TraceState::default(),
        );
        let mut headers = HashMap::new();
        TraceContextPropagator::new().inject_context(
            &Context::new().with_remote_span_context(context.clone()),
            &mut headers,
        );
        (context, headers)
    }

    #[test]
    fn a_mine_span_continues_the_controllers_trace_and_goes_in_band() {
        let telemetry = AgentTelemetry::in_band();
        let (parent, headers) = controller_context(true);
        assert!(headers.contains_key("traceparent"), "{headers:?}");
        let mut span = telemetry
            .start_mining(&assignment(headers))
            .expect("a sampled parent is recorded");
        span.add_event("share", vec![KeyValue::new("nonce", 42_i64)]);
        span.set_attribute(KeyValue::new("hashes", 1000_i64));
        span.end();

        let sent = telemetry.take_in_band(64);
        assert_eq!(sent.len(), 1);
        let wire = &sent[0];
        assert_eq!(wire.name, "mine");
        assert_eq!(wire.trace_id, parent.trace_id().to_bytes());
        assert_eq!(wire.parent_span_id, parent.span_id().to_bytes());
        assert_eq!(wire.span_id.len(), 8);
        assert!(wire.end_unix_nanos >= wire.start_unix_nanos);
        assert_eq!(
            wire.attributes["assignment"].value,
            Some(pb::attribute_value::Value::Integer(7))
        );
        assert_eq!(
            wire.attributes["miner"].value,
            Some(pb::attribute_value::Value::Text("default/a".into()))
        );
        assert_eq!(wire.events.len(), 1);
        assert_eq!(wire.events[0].name, "share");
        assert!(telemetry.take_in_band(64).is_empty(), "taken once");
    }

    #[test]
    fn in_band_records_nothing_the_controller_did_not_sample() {
        let telemetry = AgentTelemetry::in_band();
        assert!(
            telemetry
                .start_mining(&assignment(HashMap::new()))
                .is_none()
        );
        let (_, unsampled) = controller_context(false);
        assert!(telemetry.start_mining(&assignment(unsampled)).is_none());
        let garbage = HashMap::from([("traceparent".to_string(), "00-zz-yy-01".to_string())]);
        assert!(telemetry.start_mining(&assignment(garbage)).is_none());
        let (mut root, headers) = telemetry.start_root("enroll");
        root.end();
        assert!(headers.is_empty(), "{headers:?}");
        assert!(telemetry.take_in_band(64).is_empty());
    }

    #[test]
    fn wire_spans_are_trimmed_to_the_controllers_limits() {
        let telemetry = AgentTelemetry::in_band();
        let (_, headers) = controller_context(true);
        let mut span = telemetry
            .start_mining(&assignment(headers))
            .expect("sampled");
        for i in 0..100 {
            span.set_attribute(KeyValue::new(
                format!("k{i}{}", "x".repeat(100)),
                "v".repeat(1000),
            ));
            span.add_event("share", vec![]);
        }
        span.set_status(Status::error("e".repeat(1000)));
        span.end();
        let wire = telemetry.take_in_band(64).remove(0);
        assert!(wire.attributes.len() <= limits::ATTRIBUTES);
        assert!(
            wire.attributes
                .keys()
                .all(|k| k.chars().count() <= limits::KEY_CHARS)
        );
        assert!(wire.attributes.values().all(|v| match &v.value {
            Some(pb::attribute_value::Value::Text(t)) => t.chars().count() <= limits::TEXT_CHARS,
            _ => true,
        }));
        assert!(wire.events.len() <= limits::EVENTS);
        assert!(wire.error);
        assert_eq!(wire.status_message.chars().count(), limits::TEXT_CHARS);
    }

    #[test]
    fn the_queue_keeps_the_newest_spans_while_no_session_takes_them() {
        let telemetry = AgentTelemetry::in_band();
        let (_, headers) = controller_context(true);
        for _ in 0..QUEUE_CAPACITY + 10 {
            if let Some(mut span) = telemetry.start_mining(&assignment(headers.clone())) {
                span.end();
            }
        }
        assert_eq!(telemetry.take_in_band(usize::MAX).len(), QUEUE_CAPACITY);
    }
}
