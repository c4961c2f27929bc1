//! The gRPC services: `Enrollment` (token + CSR → certificate) and `Fleet` (the session
//! stream and certificate renewal).
//!
//! Every handler treats its input as hostile: identity comes only from the verified client
//! certificate, message sizes are bounded by tonic's decoder, and nothing a device sends
//! can crash a task (malformed streams end that session, nothing else).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use micromine_proto::pb::{self, agent_message::Kind as AgentKind, controller_message::Kind};
use micromine_proto::span_limits;
use micromine_proto::token::BootstrapToken;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::fleet::{Fleet, Outbound};
use crate::pki::{Pki, validate_device_name};
use crate::revocation::Revocations;
use crate::tls::{peer_addr, peer_device_name};
use crate::token_source::{RedeemError, TokenSource};
use crate::tokens::now_unix_ms;

/// A session must say `Hello` this soon after opening.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// Messages queued to one device before it counts as not keeping up.
const OUTBOUND_CAPACITY: usize = 256;
/// Shares one batch may carry; a bigger batch is refused whole.
pub const MAX_SHARES_PER_BATCH: usize = 4096;
/// Messages per second a session may send on average (an honest agent sends a few).
pub const MESSAGES_PER_SECOND: f64 = 250.0;
/// Shares per second a session may submit on average (vardiff aims at well under one; a
/// reconnecting agent resubmitting after an outage needs a burst).
pub const SHARES_PER_SECOND: f64 = 2_000.0;
/// Spans per second one session may send in-band (a `mine` span per assignment is a
/// handful a minute).
pub const SPANS_PER_SECOND: f64 = 20.0;

/// A token bucket: `capacity` at once, refilled at `per_second`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    capacity: f64,
    per_second: f64,
    last: std::time::Instant,
}

impl Bucket {
    fn new(per_second: f64, burst_seconds: f64) -> Bucket {
        let capacity = per_second * burst_seconds;
        Bucket {
            tokens: capacity,
            capacity,
            per_second,
            last: std::time::Instant::now(),
        }
    }

    fn take(&mut self, amount: f64) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.capacity);
        self.last = now;
        if self.tokens >= amount {
            self.tokens -= amount;
            true
        } else {
            false
        }
    }
}

/// Per-session limits, so one device cannot monopolise the controller.
#[derive(Debug)]
struct Limits {
    messages: Bucket,
    shares: Bucket,
    spans: Bucket,
}

impl Limits {
    fn new() -> Limits {
        Limits {
            messages: Bucket::new(MESSAGES_PER_SECOND, 2.0),
            shares: Bucket::new(SHARES_PER_SECOND, 10.0),
            spans: Bucket::new(SPANS_PER_SECOND, 10.0),
        }
    }

    /// How many of `count` spans fit the session's span rate; telemetry over it is
    /// dropped, not held against the session.
    fn spans_allowed(&mut self, count: usize) -> usize {
        (0..count).take_while(|_| self.spans.take(1.0)).count()
    }

    fn admit(&mut self, message: &pb::AgentMessage) -> Result<(), Status> {
        if !self.messages.take(1.0) {
            return Err(Status::resource_exhausted(format!(
                "message rate limit: at most {MESSAGES_PER_SECOND} messages per second"
            )));
        }
        if let Some(AgentKind::Shares(batch)) = &message.kind
            && !self.shares.take(batch.shares.len() as f64)
        {
            return Err(Status::resource_exhausted(format!(
                "share rate limit: at most {SHARES_PER_SECOND} shares per second"
            )));
        }
        Ok(())
    }
}

/// `Fleet`: sessions and renewal, over mutual TLS.
#[derive(Clone)]
pub struct FleetService {
    fleet: Arc<Fleet>,
    pki: Arc<Pki>,
    revocations: Arc<Revocations>,
    cert_ttl: Duration,
    shutdown: CancellationToken,
}

impl FleetService {
    /// A service over `fleet`; `cert_ttl` is the lifetime of renewed certificates.
    pub fn new(
        fleet: Arc<Fleet>,
        pki: Arc<Pki>,
        revocations: Arc<Revocations>,
        cert_ttl: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        FleetService {
            fleet,
            pki,
            revocations,
            cert_ttl,
            shutdown,
        }
    }
}

fn require_device<T>(request: &Request<T>) -> Result<String, Status> {
    peer_device_name(request).ok_or_else(|| {
        Status::unauthenticated(
            "Fleet requires a client certificate issued by this controller's CA",
        )
    })
}

#[tonic::async_trait]
impl pb::fleet_server::Fleet for FleetService {
    type SessionStream = ReceiverStream<Result<pb::ControllerMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let device = require_device(&request)?;
        let peer = peer_addr(&request)
            .map(|a| a.to_string())
            .unwrap_or_default();
        let inbound = request.into_inner();
        let (outbound, receiver) = mpsc::channel(OUTBOUND_CAPACITY);
        let span = tracing::info_span!("session", device = %device, peer = %peer);
        tokio::spawn(
            run_session(
                self.fleet.clone(),
                device,
                inbound,
                outbound,
                self.shutdown.clone(),
            )
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let device = require_device(&request)?;
        if self.revocations.is_blocked(&device) {
            return Err(Status::permission_denied(format!(
                "device {device} is revoked"
            )));
        }
        let csr = request.into_inner().csr_der;
        let issued = self
            .pki
            .sign_device_csr(&csr, &device, self.cert_ttl)
            .map_err(|e| Status::invalid_argument(format!("csr_der: {e}")))?;
        self.fleet
            .certified(&device, None, issued.not_after_unix_ms)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "recording the renewed certificate failed");
                Status::unavailable("the controller's store is unavailable")
            })?;
        tracing::info!(device = %device, not_after_unix_ms = issued.not_after_unix_ms, "certificate renewed");
        Ok(Response::new(pb::RenewResponse {
            certificate_pem: issued.certificate_pem,
            ca_bundle_pem: self.pki.bundle_pem(),
            not_after_unix_ms: issued.not_after_unix_ms,
        }))
    }
}

async fn run_session(
    fleet: Arc<Fleet>,
    device: String,
    mut inbound: Streaming<pb::AgentMessage>,
    outbound: Outbound,
    shutdown: CancellationToken,
) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(pb::AgentMessage {
            kind: Some(AgentKind::Hello(hello)),
        }))) => hello,
        Ok(Ok(Some(_))) => {
            fleet.protocol_error(&device, "first message is not Hello");
            let _ = outbound
                .send(Err(Status::invalid_argument(
                    "the first message of a session must be Hello",
                )))
                .await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(status)) => {
            fleet.protocol_error(&device, status.message());
            let _ = outbound.try_send(Err(status));
            return;
        }
        Err(_) => {
            let _ = outbound
                .send(Err(Status::deadline_exceeded("no Hello within 15 s")))
                .await;
            return;
        }
    };
    // Labels become EdgeDevice labels and are matched by selectors: a device may not
    // describe itself with ones no Kubernetes object could carry.
    if let Some(problem) = micromine_proto::names::labels_problem(&hello.labels) {
        fleet.protocol_error(&device, &format!("Hello.labels: {problem}"));
        let _ = outbound
            .send(Err(Status::invalid_argument(format!(
                "Hello.labels: {problem}"
            ))))
            .await;
        return;
    }
    let cut = CancellationToken::new();
    let session = fleet.connect(&device, &hello, outbound.clone(), cut.clone());
    let mut limits = Limits::new();
    tracing::info!(
        version = %hello.version,
        resumed = hello.resume.as_ref().map_or(0, |r| r.assignments.len()),
        "session open"
    );
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            // Revoked: the fleet already told the device and reclaimed its work.
            _ = cut.cancelled() => return,
            message = inbound.message() => message,
        };
        match message {
            Ok(Some(message)) => {
                if !fleet.is_current_session(&device, session) {
                    break;
                }
                let handled = match limits.admit(&message) {
                    Ok(()) => handle(&fleet, &device, message, &outbound, &mut limits).await,
                    Err(status) => Err(status),
                };
                if let Err(status) = handled {
                    if status.code() == tonic::Code::ResourceExhausted {
                        fleet.protocol_error(&device, status.message());
                    }
                    let _ = outbound.send(Err(status)).await;
                    break;
                }
            }
            Ok(None) => break,
            Err(status) => {
                // Truncated frames, oversized messages and resets all land here. Tell the
                // device why (if it is still listening) and end only this session. A
                // cancelled stream is the device hanging up, not a violation.
                if status.code() == tonic::Code::Cancelled {
                    tracing::info!(error = %status, "session stream ended");
                } else {
                    fleet.protocol_error(&device, status.message());
                }
                let _ = outbound.try_send(Err(status));
                break;
            }
        }
    }
    fleet.disconnect(&device, session);
    tracing::info!("session closed");
}

async fn handle(
    fleet: &Fleet,
    device: &str,
    message: pb::AgentMessage,
    outbound: &Outbound,
    limits: &mut Limits,
) -> Result<(), Status> {
    match message.kind {
        Some(AgentKind::Shares(batch)) => {
            if batch.shares.len() > MAX_SHARES_PER_BATCH {
                return Err(Status::resource_exhausted(format!(
                    "a share batch may hold at most {MAX_SHARES_PER_BATCH} shares, got {}",
                    batch.shares.len()
                )));
            }
            let results = fleet
                .submit_shares(device, &batch.shares)
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "shares could not be recorded");
                    Status::unavailable("the share ledger is unavailable; resubmit later")
                })?;
            outbound
                .send(Ok(pb::ControllerMessage {
                    kind: Some(Kind::ShareResults(results)),
                }))
                .await
                .map_err(|_| Status::cancelled("session closed"))?;
        }
        Some(AgentKind::Spans(batch)) => {
            let count = batch.spans.len();
            if count > span_limits::SPANS_PER_BATCH {
                return Err(Status::resource_exhausted(format!(
                    "a span batch may hold at most {} spans, got {count}",
                    span_limits::SPANS_PER_BATCH
                )));
            }
            let allowed = limits.spans_allowed(count);
            fleet.relay_spans(device, &batch.spans[..allowed], count - allowed);
        }
        Some(AgentKind::Progress(progress)) => fleet.progress(device, &progress),
        Some(AgentKind::Capacity(report)) => fleet.report(device, &report),
        Some(AgentKind::Hello(_)) => {
            tracing::debug!("ignoring a second Hello in one session");
        }
        None => tracing::debug!("ignoring an empty message"),
    }
    Ok(())
}

/// `Enrollment`: a bootstrap token and a CSR buy a client certificate.
#[derive(Clone)]
pub struct EnrollmentService {
    fleet: Arc<Fleet>,
    pki: Arc<Pki>,
    tokens: TokenSource,
    cert_ttl: Duration,
}

impl EnrollmentService {
    /// A service issuing certificates valid for `cert_ttl`.
    pub fn new(fleet: Arc<Fleet>, pki: Arc<Pki>, tokens: TokenSource, cert_ttl: Duration) -> Self {
        EnrollmentService {
            fleet,
            pki,
            tokens,
            cert_ttl,
        }
    }
}

impl EnrollmentService {
    fn count_enrollment(&self, outcome: &'static str) {
        if let Some(metrics) = self.fleet.metrics() {
            metrics.enrollment(outcome);
        }
    }
}

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        // The agent's trace context arrives in the metadata; it must become the span's
        // parent before the span is first entered.
        let span = tracing::info_span!("enroll");
        adopt_parent(&span, request.metadata());
        self.enroll_traced(request).instrument(span).await
    }
}

impl EnrollmentService {
    async fn enroll_traced(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let peer = peer_addr(&request)
            .map(|a| a.to_string())
            .unwrap_or_default();
        let req = request.into_inner();
        let token: BootstrapToken = req
            .token
            .parse()
            .map_err(|e| Status::invalid_argument(format!("token: {e}")))?;
        validate_device_name(&req.device_name)
            .map_err(|e| Status::invalid_argument(format!("device_name: {e}")))?;
        if let Some(problem) = micromine_proto::names::labels_problem(&req.labels) {
            return Err(Status::invalid_argument(format!("labels: {problem}")));
        }
        // Checked before the token is spent, so a refused name does not cost a use.
        if let Err(reason) = self.fleet.may_enroll(&req.device_name) {
            self.count_enrollment("name-taken");
            tracing::warn!(device = %req.device_name, peer = %peer, reason, "enrollment refused");
            return Err(Status::already_exists(reason));
        }
        let redeemed = self
            .tokens
            .redeem(&token, self.pki.ca_fingerprint(), now_unix_ms())
            .await;
        let record = match redeemed {
            Ok(record) => record,
            Err(RedeemError::Refused(reason)) => {
                self.count_enrollment("refused");
                // The precise reason goes to the operator's log, never to the caller.
                tracing::warn!(device = %req.device_name, peer = %peer, reason, "enrollment refused");
                return Err(Status::unauthenticated(
                    "invalid or expired bootstrap token",
                ));
            }
            Err(RedeemError::Unavailable(reason)) => {
                self.count_enrollment("unavailable");
                tracing::error!(device = %req.device_name, peer = %peer, reason, "bootstrap tokens unavailable");
                return Err(Status::unavailable(
                    "the controller cannot check tokens right now; try again",
                ));
            }
        };
        let issued = self
            .pki
            .sign_device_csr(&req.csr_der, &req.device_name, self.cert_ttl)
            .map_err(|e| Status::invalid_argument(format!("csr_der: {e}")))?;
        let labels: BTreeMap<String, String> = record.labels.clone();
        self.fleet
            .certified(&req.device_name, Some(labels), issued.not_after_unix_ms)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "recording the enrolled device failed");
                Status::unavailable("the controller's store is unavailable")
            })?;
        self.count_enrollment("enrolled");
        tracing::info!(device = %req.device_name, token = %record.id_hex, peer = %peer, "device enrolled");
        Ok(Response::new(pb::EnrollResponse {
            certificate_pem: issued.certificate_pem,
            ca_bundle_pem: self.pki.bundle_pem(),
            not_after_unix_ms: issued.not_after_unix_ms,
            device_name: req.device_name,
        }))
    }
}
/// Makes `span` a child of the context in a request's gRPC metadata, if it carries one.
fn adopt_parent(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let headers: std::collections::HashMap<String, String> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|key| {
            let value = metadata.get(key)?.to_str().ok()?;
            Some((key.to_string(), value.to_string()))
        })
        .collect();
    if headers.is_empty() {
        return;
    }
    use opentelemetry::propagation::TextMapPropagator as _;
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&headers);
    if parent.span().span_context().is_valid() {
        // Fails only when the span has already started its trace; it then keeps its own.
        let _ = span.set_parent(parent);
    }
}
