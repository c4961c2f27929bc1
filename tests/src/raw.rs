//! A device speaking the protocol by hand, to play the hostile agent against a real
//! controller: any message in any order, raw bytes where protobuf is expected, other
//! devices' work.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::BufMut;
use micromine_agent::engine::{self, EngineKind, Work};
use micromine_agent::identity::{self, DeviceIdentity};
use micromine_agent::tls;
use micromine_proto::pb::{
    self, agent_message::Kind as AgentKind, controller_message::Kind, fleet_client::FleetClient,
};
use micromine_proto::token::BootstrapToken;
use micromine_proto::work::Target;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::{ControllerProcess, create_token};

/// Enrolls `name` with a fresh one-use token, as an agent would.
pub async fn enroll(
    controller: &ControllerProcess,
    data_dir: &std::path::Path,
    name: &str,
) -> DeviceIdentity {
    let token: BootstrapToken = create_token(data_dir, 1).parse().expect("token parses");
    identity::enroll(
        &controller.url(),
        &token,
        name,
        &BTreeMap::new(),
        None,
        &Default::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("enrolling {name}: {e}"))
}

/// A `Hello` claiming `nominal_hashrate` and the label `site=e2e`.
pub fn hello(nominal_hashrate: f64) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(AgentKind::Hello(pb::Hello {
            capacity: Some(pb::Capacity {
                cores: 1,
                mining_threads: 1,
                arch: "test".into(),
                memory_bytes: 0,
                nominal_hashrate,
                hash_engine: "test".into(),
                ..Default::default()
            }),
            labels: [("site".to_string(), "e2e".to_string())].into(),
            version: "test".into(),
            resume: None,
        })),
    }
}

/// A share.
pub fn share(assignment_id: u64, nonce: u32, resubmitted: bool) -> pb::Share {
    pb::Share {
        assignment_id,
        nonce,
        resubmitted,
    }
}

/// A session opened by hand.
pub struct RawSession {
    /// Messages to the controller.
    pub tx: mpsc::Sender<pb::AgentMessage>,
    inbound: Streaming<pb::ControllerMessage>,
}

impl RawSession {
    /// Opens a session with `identity`'s certificate and sends `first`.
    pub async fn open(url: &str, identity: &DeviceIdentity, first: pb::AgentMessage) -> RawSession {
        let channel = tls::connect(url, identity.client_config().expect("client config"))
            .await
            .expect("connects");
        let mut client = FleetClient::new(channel).max_encoding_message_size(4 * 1024 * 1024);
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.expect("queue first message");
        let inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .expect("session opens")
            .into_inner();
        RawSession { tx, inbound }
    }

    /// The next message, or the status the controller ended the stream with.
    pub async fn next(&mut self) -> Result<Kind, tonic::Status> {
        let message = tokio::time::timeout(Duration::from_secs(15), self.inbound.message())
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("the controller did not answer"))??;
        message
            .and_then(|m| m.kind)
            .ok_or_else(|| tonic::Status::cancelled("stream ended"))
    }

    /// Reads until the stream fails, and returns how.
    pub async fn end(&mut self) -> tonic::Status {
        loop {
            if let Err(status) = self.next().await {
                return status;
            }
        }
    }

    /// Reads until an assignment arrives.
    pub async fn assignment(&mut self) -> pb::Assignment {
        loop {
            if let Kind::Assignment(a) = self.next().await.expect("stream ok") {
                return a;
            }
        }
    }

    /// Submits shares and waits for their results.
    pub async fn submit(&mut self, shares: Vec<pb::Share>) -> Vec<pb::ShareResult> {
        self.tx
            .send(pb::AgentMessage {
                kind: Some(AgentKind::Shares(pb::SubmitShares { shares })),
            })
            .await
            .expect("send");
        loop {
            if let Kind::ShareResults(r) = self.next().await.expect("stream ok") {
                return r.results;
            }
        }
    }
}

/// The reason of a rejected result (panics on an accepted one).
pub fn reason(result: &pb::ShareResult) -> pb::RejectReason {
    assert_eq!(
        result.status,
        pb::ShareStatus::Rejected as i32,
        "{result:?}"
    );
    pb::RejectReason::try_from(result.reason).expect("known reason")
}

/// Whether a result is an acceptance.
pub fn accepted(result: &pb::ShareResult) -> bool {
    result.status == pb::ShareStatus::Accepted as i32
}

/// Finds `wanted` real shares in an assignment, the honest way.
pub fn mine(a: &pb::Assignment, wanted: usize) -> Vec<u32> {
    let work = prepared(a);
    let mut found = Vec::new();
    let mut start = a.nonce_start;
    while found.len() < wanted && start < a.nonce_end {
        let end = (start + 65_536).min(a.nonce_end);
        EngineKind::detect().scan(&work, start, end, &mut |n| found.push(n));
        start = end;
    }
    assert!(
        found.len() >= wanted,
        "assignment too small to find {wanted} shares"
    );
    found.truncate(wanted);
    found
}

/// A nonce in the assignment whose hash misses the target: a forged share.
pub fn forge(a: &pb::Assignment) -> u32 {
    let work = prepared(a);
    (a.nonce_start..a.nonce_end)
        .find(|&n| {
            let mut hit = false;
            EngineKind::detect().scan(&work, n, n + 1, &mut |_| hit = true);
            !hit
        })
        .expect("some nonce misses the target") as u32
}

fn prepared(a: &pb::Assignment) -> Work {
    let prefix: [u8; 76] = a.header_prefix.as_slice().try_into().expect("76 bytes");
    engine::prepare(
        &prefix,
        Target::from_le_slice(&a.share_target).expect("target"),
    )
}

/// Sends raw bytes as gRPC messages on `Fleet.Session`, to deliver protobuf that is not
/// well formed; returns what came back or the status the stream ended with.
pub async fn raw_session(
    url: &str,
    identity: &DeviceIdentity,
    frames: Vec<Vec<u8>>,
) -> Result<Vec<Kind>, tonic::Status> {
    let channel = tls::connect(url, identity.client_config().expect("config"))
        .await
        .expect("connects");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/micromine.v1.Fleet/Session");
    let (tx, rx) = mpsc::channel(frames.len().max(1));
    for frame in frames {
        tx.send(frame).await.expect("queue");
    }
    let mut stream = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
        .await?
        .into_inner();
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Err(_) => return Ok(got),
            Ok(Ok(Some(m))) => got.extend(m.kind),
            Ok(Ok(None)) => return Ok(got),
            Ok(Err(status)) => return Err(status),
        }
    }
}

#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

struct ProtoDecoder;

impl Decoder for ProtoDecoder {
    type Item = pb::ControllerMessage;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut DecodeBuf<'_>,
    ) -> Result<Option<pb::ControllerMessage>, tonic::Status> {
        prost::Message::decode(buf)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = pb::ControllerMessage;
    type Encoder = RawEncoder;
    type Decoder = ProtoDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ProtoDecoder {
        ProtoDecoder
    }
}
