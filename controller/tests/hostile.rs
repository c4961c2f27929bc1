//! Hostile devices against a real controller on loopback: forged, replayed, out-of-range
//! and foreign shares, sessions without certificates, malformed, oversized and truncated
//! messages. Every one is rejected with a reason and counted, and none disturbs a
//! well-behaved device.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BufMut;
use micromine_agent::engine::{EngineKind, PreparedWork};
use micromine_agent::identity::{self, DeviceIdentity};
use micromine_agent::tls::{self, TrustAnchor};
use micromine_controller::standalone::{self, Controller, ControllerConfig};
use micromine_controller::tokens::TokenSpec;
use micromine_proto::pb::{
    self, agent_message::Kind as AgentKind, controller_message::Kind, fleet_client::FleetClient,
};
use micromine_proto::work::Target;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

const MANIFEST: &str = "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {name: hostile}\nspec:\n  selector: {matchLabels: {site: test}}\n  workSource: {builtin: {networkDifficulty: 1.0e9}}\n  sharesPerMinute: 60\n  assignmentSeconds: 30\n";

struct Fixture {
    controller: Controller,
    _dir: tempfile::TempDir,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("m.yaml"), MANIFEST).expect("write");
    let mut config = ControllerConfig::new(manifests, dir.path().join("data"));
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let controller = standalone::start(config).await.expect("controller starts");
    Fixture {
        controller,
        _dir: dir,
    }
}

async fn enroll(f: &Fixture, name: &str) -> DeviceIdentity {
    let (token, _) = f
        .controller
        .tokens
        .create(&TokenSpec::default(), f.controller.pki.ca_fingerprint())
        .expect("token");
    identity::enroll(
        &f.controller.grpc_url(),
        &token,
        name,
        &BTreeMap::new(),
        None,
    )
    .await
    .expect("enrolls")
}

/// A device speaking the protocol by hand.
struct RawSession {
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: Streaming<pb::ControllerMessage>,
}

fn hello(nominal_hashrate: f64) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(AgentKind::Hello(pb::Hello {
            capacity: Some(pb::Capacity {
                cores: 1,
                mining_threads: 1,
                arch: "test".into(),
                memory_bytes: 0,
                nominal_hashrate,
                hash_engine: "test".into(),
            }),
            labels: [("site".to_string(), "test".to_string())].into(),
            version: "test".into(),
            resume: None,
        })),
    }
}

async fn client(f: &Fixture, identity: &DeviceIdentity) -> FleetClient<tonic::transport::Channel> {
    let channel = tls::connect(
        &f.controller.grpc_url(),
        identity.client_config().expect("config"),
    )
    .await
    .expect("connects");
    FleetClient::new(channel).max_encoding_message_size(4 * 1024 * 1024)
}

impl RawSession {
    async fn open(f: &Fixture, identity: &DeviceIdentity, first: pb::AgentMessage) -> RawSession {
        let mut client = client(f, identity).await;
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.expect("queue first message");
        let inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .expect("session opens")
            .into_inner();
        RawSession { tx, inbound }
    }

    async fn next(&mut self) -> Result<Kind, tonic::Status> {
        let message = tokio::time::timeout(Duration::from_secs(10), self.inbound.message())
            .await
            .expect("controller answers in time")?;
        Ok(message
            .and_then(|m| m.kind)
            .expect("a message, not the end"))
    }

    /// Reads until an assignment arrives.
    async fn assignment(&mut self) -> pb::Assignment {
        loop {
            if let Kind::Assignment(a) = self.next().await.expect("stream ok") {
                return a;
            }
        }
    }

    async fn submit(&mut self, shares: Vec<pb::Share>) -> Vec<pb::ShareResult> {
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

fn share(assignment_id: u64, nonce: u32, resubmitted: bool) -> pb::Share {
    pb::Share {
        assignment_id,
        nonce,
        resubmitted,
    }
}

fn reason(result: &pb::ShareResult) -> pb::RejectReason {
    assert_eq!(
        result.status,
        pb::ShareStatus::Rejected as i32,
        "{result:?}"
    );
    pb::RejectReason::try_from(result.reason).expect("known reason")
}

/// Finds real shares in an assignment the honest way.
fn mine(a: &pb::Assignment, wanted: usize) -> Vec<u32> {
    let prefix: [u8; 76] = a.header_prefix.as_slice().try_into().expect("76 bytes");
    let target = Target::from_le_slice(&a.share_target).expect("target");
    let work = PreparedWork::new(&prefix, target);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_judges_every_share_itself() {
    let f = start().await;
    let alice = enroll(&f, "alice").await;
    let mallory = enroll(&f, "mallory").await;
    // A slow claimed hash rate gives an easy share target, so shares are cheap to find.
    let mut a = RawSession::open(&f, &alice, hello(2_000.0)).await;
    let mine_a = a.assignment().await;
    let nonces = mine(&mine_a, 2);

    // A forged share: a nonce whose hash does not meet the target.
    let work = PreparedWork::new(
        &mine_a.header_prefix.as_slice().try_into().expect("76"),
        Target::from_le_slice(&mine_a.share_target).expect("t"),
    );
    let mut bad = None;
    for n in mine_a.nonce_start..mine_a.nonce_end {
        let mut hit = false;
        EngineKind::detect().scan(&work, n, n + 1, &mut |_| hit = true);
        if !hit {
            bad = Some(n as u32);
            break;
        }
    }
    let forged = bad.expect("some nonce misses the target");
    let outside = (mine_a.nonce_end as u32).wrapping_add(7);

    let results = a
        .submit(vec![
            share(mine_a.id, nonces[0], false),
            share(mine_a.id, forged, false),
            share(mine_a.id, outside, false),
            share(u64::MAX, nonces[1], false),
            share(mine_a.id, nonces[0], false),
        ])
        .await;
    assert_eq!(results.len(), 5);
    assert_eq!(
        results[0].status,
        pb::ShareStatus::Accepted as i32,
        "{:?}",
        results[0]
    );
    assert_eq!(results[0].difficulty, mine_a.share_difficulty);
    assert_eq!(reason(&results[1]), pb::RejectReason::LowDifficulty);
    assert_eq!(reason(&results[2]), pb::RejectReason::OutOfRange);
    assert_eq!(reason(&results[3]), pb::RejectReason::UnknownAssignment);
    assert_eq!(reason(&results[4]), pb::RejectReason::Duplicate);

    // A replay flagged as a resubmission of our own lost ack is acknowledged, not recounted.
    let replay = a.submit(vec![share(mine_a.id, nonces[0], true)]).await;
    assert_eq!(replay[0].status, pb::ShareStatus::Accepted as i32);

    // Another device cannot claim alice's work, not even a valid share of it.
    let mut m = RawSession::open(&f, &mallory, hello(2_000.0)).await;
    let _ = m.assignment().await;
    let stolen = m
        .submit(vec![
            share(mine_a.id, nonces[1], false),
            share(mine_a.id, nonces[0], true),
        ])
        .await;
    assert_eq!(reason(&stolen[0]), pb::RejectReason::UnknownAssignment);
    assert_eq!(reason(&stolen[1]), pb::RejectReason::UnknownAssignment);

    // Alice's second share is still hers to submit.
    let second = a.submit(vec![share(mine_a.id, nonces[1], false)]).await;
    assert_eq!(second[0].status, pb::ShareStatus::Accepted as i32);

    let ledger = f.controller.fleet.ledger();
    let alice_totals = ledger.device_totals("alice");
    assert_eq!(alice_totals.accepted, 2);
    assert_eq!(alice_totals.rejected.low_difficulty, 1);
    assert_eq!(alice_totals.rejected.out_of_range, 1);
    assert_eq!(alice_totals.rejected.unknown_assignment, 1);
    assert_eq!(alice_totals.rejected.duplicate, 1);
    assert_eq!(
        ledger.device_totals("mallory").rejected.unknown_assignment,
        2
    );
    assert_eq!(ledger.fleet_totals().accepted, 2);
    f.controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_need_a_certificate_and_must_start_with_hello() {
    let f = start().await;
    // Server-authenticated TLS only: fine for enrollment, not for a session.
    let anonymous = tls::client_config(
        &TrustAnchor::CaPem(f.controller.pki.ca_pem().to_string()),
        None,
    )
    .expect("config");
    let channel = tls::connect(&f.controller.grpc_url(), anonymous)
        .await
        .expect("connects");
    let (_tx, rx) = mpsc::channel::<pb::AgentMessage>(1);
    let refused = FleetClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await;
    assert_eq!(
        refused.expect_err("refused").code(),
        tonic::Code::Unauthenticated
    );

    let device = enroll(&f, "eager").await;
    let mut s = RawSession::open(
        &f,
        &device,
        pb::AgentMessage {
            kind: Some(AgentKind::Shares(pb::SubmitShares {
                shares: vec![share(1, 1, false)],
            })),
        },
    )
    .await;
    let status = s.next().await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("must be Hello"), "{status}");
    let counted = f
        .controller
        .fleet
        .view()
        .devices
        .iter()
        .find(|d| d.name == "eager")
        .map(|d| d.protocol_errors);
    assert_eq!(counted, Some(1));
    f.controller.stop().await;
}

/// Sends raw bytes as a gRPC message, to deliver protobuf that is not well formed.
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

async fn raw_session(
    f: &Fixture,
    identity: &DeviceIdentity,
    frames: Vec<Vec<u8>>,
) -> Result<Vec<Kind>, tonic::Status> {
    let channel = tls::connect(
        &f.controller.grpc_url(),
        identity.client_config().expect("config"),
    )
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_end_only_their_own_session() {
    let f = start().await;
    let honest = enroll(&f, "honest").await;
    let attacker = enroll(&f, "attacker").await;

    // Truncated protobuf: a Hello field whose length prefix promises 100 bytes, giving 3.
    let truncated = raw_session(&f, &attacker, vec![vec![0x0a, 100, 1, 2, 3]]).await;
    let status = truncated.expect_err("a truncated message ends the session with a reason");
    assert!(status.message().contains("buffer underflow"), "{status}");

    // Garbage bytes that are not protobuf at all.
    let garbage = raw_session(&f, &attacker, vec![vec![0xff; 64]]).await;
    let status = garbage.expect_err("garbage ends the session with a reason");
    assert!(status.message().contains("failed to decode"), "{status}");

    // Oversized: a share batch bigger than the message limit.
    let mut big = RawSession::open(&f, &attacker, hello(2_000.0)).await;
    let _ = big.assignment().await;
    let shares: Vec<pb::Share> = (0..40_000).map(|n| share(1, n, false)).collect();
    big.tx
        .send(pb::AgentMessage {
            kind: Some(AgentKind::Shares(pb::SubmitShares { shares })),
        })
        .await
        .expect("queued");
    let err = loop {
        match big.next().await {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    assert!(err.message().contains("too large"), "{err}");

    // Within the size limit but more shares than one batch may hold.
    let mut many = RawSession::open(&f, &attacker, hello(2_000.0)).await;
    let _ = many.assignment().await;
    let shares: Vec<pb::Share> = (0..5_000).map(|n| share(1, n, false)).collect();
    many.tx
        .send(pb::AgentMessage {
            kind: Some(AgentKind::Shares(pb::SubmitShares { shares })),
        })
        .await
        .expect("queued");
    let err = loop {
        match many.next().await {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");

    // Each violation was counted against the device that made it.
    let view = f.controller.fleet.view();
    let count = |name: &str| {
        view.devices
            .iter()
            .find(|d| d.name == name)
            .map_or(0, |d| d.protocol_errors)
    };
    assert_eq!(
        count("attacker"),
        4,
        "truncated, garbage, oversized, too many shares"
    );
    assert_eq!(count("honest"), 0);

    // Through all of that, an honest device gets served normally.
    let mut ok = RawSession::open(&f, &honest, hello(2_000.0)).await;
    let a = ok.assignment().await;
    let nonce = mine(&a, 1)[0];
    let results = ok.submit(vec![share(a.id, nonce, false)]).await;
    assert_eq!(results[0].status, pb::ShareStatus::Accepted as i32);
    f.controller.stop().await;
}
