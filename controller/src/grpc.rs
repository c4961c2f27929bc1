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
use micromine_proto::token::BootstrapToken;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::fleet::{Fleet, Outbound};
use crate::pki::{Pki, validate_device_name};
use crate::tls::{peer_addr, peer_device_name};
use crate::tokens::{TokenStore, now_unix_ms};

/// A session must say `Hello` this soon after opening.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// Messages queued to one device before it counts as not keeping up.
const OUTBOUND_CAPACITY: usize = 256;
/// Shares one batch may carry; a bigger batch is refused whole.
pub const MAX_SHARES_PER_BATCH: usize = 4096;

/// `Fleet`: sessions and renewal, over mutual TLS.
#[derive(Clone)]
pub struct FleetService {
    fleet: Arc<Fleet>,
    pki: Arc<Pki>,
    cert_ttl: Duration,
    shutdown: CancellationToken,
}

impl FleetService {
    /// A service over `fleet`; `cert_ttl` is the lifetime of renewed certificates.
    pub fn new(
        fleet: Arc<Fleet>,
        pki: Arc<Pki>,
        cert_ttl: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        FleetService {
            fleet,
            pki,
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
        let csr = request.into_inner().csr_der;
        let issued = self
            .pki
            .sign_device_csr(&csr, &device, self.cert_ttl)
            .map_err(|e| Status::invalid_argument(format!("csr_der: {e}")))?;
        tracing::info!(device = %device, not_after_unix_ms = issued.not_after_unix_ms, "certificate renewed");
        Ok(Response::new(pb::RenewResponse {
            certificate_pem: issued.certificate_pem,
            ca_bundle_pem: self.pki.ca_pem().to_string(),
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
    let session = fleet.connect(&device, &hello, outbound.clone());
    tracing::info!(
        version = %hello.version,
        resumed = hello.resume.as_ref().map_or(0, |r| r.assignments.len()),
        "session open"
    );
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = inbound.message() => message,
        };
        match message {
            Ok(Some(message)) => {
                if !fleet.is_current_session(&device, session) {
                    break;
                }
                if let Err(status) = handle(&fleet, &device, message, &outbound).await {
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
    tokens: Arc<TokenStore>,
    cert_ttl: Duration,
}

impl EnrollmentService {
    /// A service issuing certificates valid for `cert_ttl`.
    pub fn new(
        fleet: Arc<Fleet>,
        pki: Arc<Pki>,
        tokens: Arc<TokenStore>,
        cert_ttl: Duration,
    ) -> Self {
        EnrollmentService {
            fleet,
            pki,
            tokens,
            cert_ttl,
        }
    }
}

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for EnrollmentService {
    async fn enroll(
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
        let tokens = self.tokens.clone();
        let fingerprint = self.pki.ca_fingerprint();
        let redeemed =
            tokio::task::spawn_blocking(move || tokens.redeem(&token, fingerprint, now_unix_ms()))
                .await
                .map_err(|_| Status::internal("token check failed"))?;
        let record = match redeemed {
            Ok(record) => record,
            Err(e) => {
                // The precise reason goes to the operator's log, never to the caller.
                tracing::warn!(device = %req.device_name, peer = %peer, error = %e, "enrollment refused");
                return Err(Status::unauthenticated(
                    "invalid or expired bootstrap token",
                ));
            }
        };
        let issued = self
            .pki
            .sign_device_csr(&req.csr_der, &req.device_name, self.cert_ttl)
            .map_err(|e| Status::invalid_argument(format!("csr_der: {e}")))?;
        let labels: BTreeMap<String, String> = record.labels.clone();
        self.fleet
            .enrolled(&req.device_name, labels)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "recording the enrolled device failed");
                Status::unavailable("the controller's store is unavailable")
            })?;
        tracing::info!(device = %req.device_name, token = %record.id_hex, peer = %peer, "device enrolled");
        Ok(Response::new(pb::EnrollResponse {
            certificate_pem: issued.certificate_pem,
            ca_bundle_pem: self.pki.ca_pem().to_string(),
            not_after_unix_ms: issued.not_after_unix_ms,
            device_name: req.device_name,
        }))
    }
}
