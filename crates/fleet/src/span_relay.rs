//! Trace context for assignments, and the agents' spans coming back in-band.
//!
//! An `assign` span's W3C context rides in `Assignment.trace_context` (a stream has no
//! per-message gRPC metadata); the agent's `mine` span continues that trace and, unless the
//! device has a collector of its own, comes back in a `SpanBatch`. The controller passes
//! such spans on to its own collector as service `micromine-agent`, but only what it can
//! vouch for: spans of traces it started for that device's assignments, well formed,
//! within the limits both sides share, and labelled with the device name the certificate
//! proves rather than anything the device says about itself.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use micromine_proto::pb;
use micromine_proto::span_limits as limits;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Traced assignments remembered per device: a `mine` span comes back when its range
/// ends, after the lease is gone, so the trace id has to outlive the lease a while.
pub const TRACES_PER_DEVICE: usize = 16;

/// How far an agent's clock may run ahead of the controller's.
const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// The oldest span accepted, and the longest.
const MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The attribute that names the device a relayed span came from.
pub const DEVICE_ATTRIBUTE: &str = "micromine.device";

/// The W3C headers (`traceparent`, `tracestate`) of a tracing span, when it is exported
/// and sampled; empty otherwise, so an untraced controller sends agents nothing to trace.
pub fn trace_context(span: &tracing::Span) -> BTreeMap<String, String> {
    let context = span.context();
    let mut headers = HashMap::new();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() && span_context.is_sampled() {
        TraceContextPropagator::new().inject_context(&context, &mut headers);
    }
    headers.into_iter().collect()
}

/// The trace id in W3C headers, if they carry a valid, sampled context.
pub fn trace_id(headers: &BTreeMap<String, String>) -> Option<[u8; 16]> {
    let headers: HashMap<String, String> = headers.clone().into_iter().collect();
    let context = TraceContextPropagator::new().extract(&headers);
    let span_context = context.span().span_context().clone();
    (span_context.is_valid() && span_context.is_sampled())
        .then(|| span_context.trace_id().to_bytes())
}

/// What became of a relayed span; the `outcome` label of `micromine_agent_spans_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Passed on to the collector.
    Relayed,
    /// Not part of a trace the controller started for this device.
    UnknownTrace,
    /// Broken ids, times, names or sizes.
    Malformed,
    /// Over the session's span rate.
    RateLimited,
    /// Well formed, but this controller's trace export could not start.
    NoCollector,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Relayed => "relayed",
            Outcome::UnknownTrace => "unknown_trace",
            Outcome::Malformed => "malformed",
            Outcome::RateLimited => "rate_limited",
            Outcome::NoCollector => "no_collector",
        }
    }
}

fn nanos(at: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(at)
}

fn well_formed_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= limits::NAME_CHARS
        && !name.chars().any(char::is_control)
}

fn attributes(map: &BTreeMap<String, pb::AttributeValue>) -> Result<Vec<KeyValue>, &'static str> {
    if map.len() > limits::ATTRIBUTES {
        return Err("too many attributes");
    }
    map.iter()
        .map(|(key, value)| {
            if key.is_empty()
                || key.chars().count() > limits::KEY_CHARS
                || key.chars().any(char::is_control)
            {
                return Err("attribute key");
            }
            use pb::attribute_value::Value as V;
            let value = match &value.value {
                Some(V::Text(t)) if t.chars().count() <= limits::TEXT_CHARS => {
                    Value::from(t.clone())
                }
                Some(V::Text(_)) => return Err("attribute value too long"),
                Some(V::Integer(i)) => Value::I64(*i),
                Some(V::Number(n)) if n.is_finite() => Value::F64(*n),
                Some(V::Number(_)) => return Err("attribute value not finite"),
                Some(V::Flag(b)) => Value::Bool(*b),
                None => return Err("attribute without a value"),
            };
            Ok(KeyValue::new(key.clone(), value))
        })
        .collect()
}

/// Checks a span a device sent and turns it into one the exporter takes. `traces` are the
/// trace ids of the device's recent traced assignments; `device` is its proven name.
pub fn admit(
    span: &pb::AgentSpan,
    device: &str,
    traces: &[[u8; 16]],
    now: SystemTime,
) -> Result<SpanData, Outcome> {
    let trace_id: [u8; 16] = span
        .trace_id
        .as_slice()
        .try_into()
        .map_err(|_| Outcome::Malformed)?;
    let span_id: [u8; 8] = span
        .span_id
        .as_slice()
        .try_into()
        .map_err(|_| Outcome::Malformed)?;
    let parent = match span.parent_span_id.len() {
        0 => SpanId::INVALID,
        8 => {
            let parent = SpanId::from_bytes(
                span.parent_span_id
                    .as_slice()
                    .try_into()
                    .map_err(|_| Outcome::Malformed)?,
            );
            if parent == SpanId::INVALID {
                return Err(Outcome::Malformed);
            }
            parent
        }
        _ => return Err(Outcome::Malformed),
    };
    let context = SpanContext::new(
        TraceId::from_bytes(trace_id),
        SpanId::from_bytes(span_id),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    );
    if !context.is_valid() {
        return Err(Outcome::Malformed);
    }
    if !traces.contains(&trace_id) {
        return Err(Outcome::UnknownTrace);
    }
    let (start, end) = (nanos(span.start_unix_nanos), nanos(span.end_unix_nanos));
    let plausible = start <= end
        && end <= now + CLOCK_SKEW
        && now
            .checked_sub(MAX_AGE)
            .is_none_or(|oldest| start >= oldest);
    if !plausible || !well_formed_name(&span.name) {
        return Err(Outcome::Malformed);
    }
    if span.events.len() > limits::EVENTS
        || span.status_message.chars().count() > limits::TEXT_CHARS
    {
        return Err(Outcome::Malformed);
    }
    let mut attributes = attributes(&span.attributes).map_err(|_| Outcome::Malformed)?;
    attributes.retain(|kv| kv.key.as_str() != DEVICE_ATTRIBUTE);
    attributes.push(KeyValue::new(DEVICE_ATTRIBUTE, device.to_string()));
    let events = span
        .events
        .iter()
        .map(|event| {
            let at = nanos(event.unix_nanos);
            if !well_formed_name(&event.name) || at < start || at > end {
                return Err(Outcome::Malformed);
            }
            let attributes = self::attributes(&event.attributes).map_err(|_| Outcome::Malformed)?;
            Ok(Event::new(event.name.clone(), at, attributes, 0))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SpanData {
        span_context: context,
        parent_span_id: parent,
        // The usual parent is the controller's `assign` span, in another process.
        parent_span_is_remote: parent != SpanId::INVALID,
        span_kind: SpanKind::Internal,
        name: Cow::Owned(span.name.clone()),
        start_time: start,
        end_time: end,
        attributes,
        dropped_attributes_count: 0,
        events: {
            let mut all = SpanEvents::default();
            all.events = events;
            all
        },
        links: SpanLinks::default(),
        status: if span.error {
            Status::error(span.status_message.clone())
        } else {
            Status::Unset
        },
        instrumentation_scope: InstrumentationScope::builder("micromine-agent").build(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: [u8; 16] = [7; 16];

    fn text(t: &str) -> pb::AttributeValue {
        pb::AttributeValue {
            value: Some(pb::attribute_value::Value::Text(t.into())),
        }
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn at(seconds_before_now: u64) -> u64 {
        (now() - Duration::from_secs(seconds_before_now))
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }

    fn span() -> pb::AgentSpan {
        pb::AgentSpan {
            trace_id: TRACE.to_vec(),
            span_id: vec![1; 8],
            parent_span_id: vec![2; 8],
            name: "mine".into(),
            start_unix_nanos: at(10),
            end_unix_nanos: at(5),
            attributes: BTreeMap::from([
                ("assignment".to_string(), text("9")),
                (
                    "count".to_string(),
                    pb::AttributeValue {
                        value: Some(pb::attribute_value::Value::Integer(3)),
                    },
                ),
            ]),
            events: vec![pb::SpanEvent {
                name: "share".into(),
                unix_nanos: at(7),
                attributes: BTreeMap::new(),
            }],
            error: false,
            status_message: String::new(),
        }
    }

    fn admitted(span: &pb::AgentSpan) -> Result<SpanData, Outcome> {
        admit(span, "gw-1", &[[1; 16], TRACE], now())
    }

    #[test]
    fn a_span_of_a_traced_assignment_is_relayed_under_the_proven_device_name() {
        let mut claimed = span();
        claimed
            .attributes
            .insert(DEVICE_ATTRIBUTE.to_string(), text("somebody-else"));
        let data = admitted(&claimed).expect("well formed");
        assert_eq!(data.span_context.trace_id(), TraceId::from_bytes(TRACE));
        assert_eq!(data.parent_span_id, SpanId::from_bytes([2; 8]));
        assert_eq!(data.name, "mine");
        let devices: Vec<_> = data
            .attributes
            .iter()
            .filter(|kv| kv.key.as_str() == DEVICE_ATTRIBUTE)
            .map(|kv| kv.value.to_string())
            .collect();
        assert_eq!(devices, ["gw-1"]);
        assert!(
            data.attributes
                .iter()
                .any(|kv| kv.key.as_str() == "count" && kv.value == Value::I64(3))
        );
        assert_eq!(data.events.len(), 1);
    }

    #[test]
    fn a_span_of_a_trace_the_controller_did_not_start_is_dropped() {
        let mut forged = span();
        forged.trace_id = vec![8; 16];
        assert_eq!(admitted(&forged).err(), Some(Outcome::UnknownTrace));
        assert_eq!(
            admit(&span(), "gw-1", &[], now()).err(),
            Some(Outcome::UnknownTrace)
        );
    }

    /// Spoils one thing about a span.
    type Breakage = fn(&mut pb::AgentSpan);

    #[test]
    fn malformed_spans_are_dropped() {
        let cases: Vec<(&str, Breakage)> = vec![
            ("short trace id", |s| s.trace_id.truncate(15)),
            ("short span id", |s| s.span_id.truncate(7)),
            ("zero span id", |s| s.span_id = vec![0; 8]),
            ("odd parent", |s| s.parent_span_id = vec![1; 3]),
            ("zero parent", |s| s.parent_span_id = vec![0; 8]),
            ("empty name", |s| s.name.clear()),
            ("long name", |s| s.name = "x".repeat(65)),
            ("control in name", |s| s.name = "mi\nne".into()),
            ("ends before it starts", |s| s.end_unix_nanos = at(20)),
            ("from the future", |s| {
                s.end_unix_nanos = at(0) + 3_600_000_000_000
            }),
            ("too old", |s| s.start_unix_nanos = at(2 * 24 * 3600)),
            ("too many attributes", |s| {
                for i in 0..40 {
                    s.attributes.insert(format!("k{i}"), text("v"));
                }
            }),
            ("long value", |s| {
                s.attributes.insert("k".into(), text(&"v".repeat(300)));
            }),
            ("valueless attribute", |s| {
                s.attributes
                    .insert("k".into(), pb::AttributeValue { value: None });
            }),
            ("NaN", |s| {
                s.attributes.insert(
                    "k".into(),
                    pb::AttributeValue {
                        value: Some(pb::attribute_value::Value::Number(f64::NAN)),
                    },
                );
            }),
            ("event outside the span", |s| {
                s.events[0].unix_nanos = at(60)
            }),
            ("too many events", |s| {
                let event = s.events[0].clone();
                s.events = vec![event; 33];
            }),
            ("long status", |s| s.status_message = "e".repeat(300)),
        ];
        for (what, break_it) in cases {
            let mut broken = span();
            break_it(&mut broken);
            assert_eq!(admitted(&broken).err(), Some(Outcome::Malformed), "{what}");
        }
    }

    #[test]
    fn trace_context_round_trips_through_the_headers() {
        let context = SpanContext::new(
            TraceId::from_bytes(TRACE),
            SpanId::from_bytes([3; 8]),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let mut headers = HashMap::new();
        TraceContextPropagator::new().inject_context(
            &opentelemetry::Context::new().with_remote_span_context(context),
            &mut headers,
        );
        let headers: BTreeMap<String, String> = headers.into_iter().collect();
        assert_eq!(trace_id(&headers), Some(TRACE));
        assert_eq!(trace_id(&BTreeMap::new()), None);
        let unsampled = BTreeMap::from([(
            "traceparent".to_string(),
            format!("00-{}-{}-00", "07".repeat(16), "03".repeat(8)),
        )]);
        assert_eq!(trace_id(&unsampled), None);
    }

    #[test]
    fn an_untraced_span_yields_no_headers() {
        // No OpenTelemetry layer is installed in unit tests: nothing is sampled.
        let span = tracing::info_span!("assign");
        assert!(trace_context(&span).is_empty());
    }
}
