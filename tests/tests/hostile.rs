//! Hostile devices against the real controller binary: forged, replayed, out-of-range and
//! foreign shares, sessions that break the protocol, malformed, oversized and truncated
//! messages, floods. Every one is rejected with a reason and counted where an operator
//! sees it (the status API), and none disturbs a well-behaved device.

use micromine_e2e::raw::{
    RawSession, accepted, enroll, forge, hello, mine, raw_session, reason, share,
};
use micromine_e2e::{Fixture, number};
use micromine_proto::pb::{self, agent_message::Kind as AgentKind};

/// Builtin work nobody will find a block in, so no header rolls under the tests' feet.
const MANIFEST: &str = "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {name: hostile}\nspec:\n  selector: {matchLabels: {site: e2e}}\n  workSource: {builtin: {networkDifficulty: 1.0e9}}\n  sharesPerMinute: 60\n  assignmentSeconds: 30\n";

/// A slow claimed hash rate gives an easy share target, so shares are cheap to find.
const SLOW: f64 = 2_000.0;

fn totals(f: &Fixture, device: &str) -> serde_json::Value {
    f.device(device)["shares"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_judges_every_share_itself() {
    let f = Fixture::start(MANIFEST, &[]);
    let url = f.controller.url();
    let alice = enroll(&f.controller, &f.data, "alice").await;
    let mallory = enroll(&f.controller, &f.data, "mallory").await;
    let mut a = RawSession::open(&url, &alice, hello(SLOW)).await;
    let work = a.assignment().await;
    let nonces = mine(&work, 2);
    let outside = (work.nonce_end as u32).wrapping_add(7);

    let results = a
        .submit(vec![
            share(work.id, nonces[0], false),
            share(work.id, forge(&work), false),
            share(work.id, outside, false),
            share(u64::MAX, nonces[1], false),
            share(work.id, nonces[0], false),
        ])
        .await;
    assert_eq!(results.len(), 5);
    assert!(accepted(&results[0]), "{:?}", results[0]);
    assert_eq!(results[0].difficulty, work.share_difficulty);
    assert_eq!(reason(&results[1]), pb::RejectReason::LowDifficulty);
    assert_eq!(reason(&results[2]), pb::RejectReason::OutOfRange);
    assert_eq!(reason(&results[3]), pb::RejectReason::UnknownAssignment);
    assert_eq!(reason(&results[4]), pb::RejectReason::Duplicate);

    // Another device cannot claim alice's work, not even a valid share of it, and doing
    // so flags it.
    let mut m = RawSession::open(&url, &mallory, hello(SLOW)).await;
    let _ = m.assignment().await;
    let stolen = m
        .submit(vec![
            share(work.id, nonces[1], false),
            share(work.id, nonces[0], true),
        ])
        .await;
    assert_eq!(reason(&stolen[0]), pb::RejectReason::UnknownAssignment);
    assert_eq!(reason(&stolen[1]), pb::RejectReason::UnknownAssignment);
    // Alice's second share is still hers to submit.
    let second = a.submit(vec![share(work.id, nonces[1], false)]).await;
    assert!(accepted(&second[0]));

    let alice_totals = totals(&f, "alice");
    assert_eq!(number(&alice_totals, "/accepted"), 2);
    for (reason, count) in [
        ("low_difficulty", 1),
        ("out_of_range", 1),
        ("unknown_assignment", 1),
        ("duplicate", 1),
    ] {
        assert_eq!(
            number(&alice_totals, &format!("/rejected/{reason}")),
            count,
            "{reason}: {alice_totals}"
        );
    }
    assert_eq!(
        number(&totals(&f, "mallory"), "/rejected/unknown_assignment"),
        2
    );
    let flags = f.device("mallory")["flags"].clone();
    assert_eq!(flags[0]["type"], "ForeignShares", "{flags}");
    assert!(
        flags[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("2 share(s)")),
        "{flags}"
    );
    // A share for an id nobody holds is a mistake, not an impersonation.
    assert_eq!(f.device("alice")["flags"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_accepted_shares_changes_no_total() {
    let f = Fixture::start(MANIFEST, &[]);
    let device = enroll(&f.controller, &f.data, "replayer").await;
    let mut s = RawSession::open(&f.controller.url(), &device, hello(SLOW)).await;
    let work = s.assignment().await;
    let batch: Vec<pb::Share> = mine(&work, 5)
        .into_iter()
        .map(|n| share(work.id, n, false))
        .collect();
    assert!(s.submit(batch.clone()).await.iter().all(accepted));
    let before = f.controller.status().expect("status")["totals"].clone();
    assert_eq!(number(&before, "/accepted"), 5);

    // A plain replay: every share refused as a duplicate; the accepted totals do not move.
    let replayed = s.submit(batch.clone()).await;
    assert!(
        replayed
            .iter()
            .all(|r| reason(r) == pb::RejectReason::Duplicate)
    );
    let after = f.controller.status().expect("status")["totals"].clone();
    for field in ["/accepted", "/accepted_difficulty", "/blocks"] {
        assert_eq!(after.pointer(field), before.pointer(field), "{field}");
    }
    assert_eq!(number(&after, "/rejected/duplicate"), 5);

    // A replay flagged as resubmission (the device lost our acknowledgements) is
    // acknowledged, and changes nothing at all.
    let resubmitted: Vec<pb::Share> = batch
        .iter()
        .map(|s| share(s.assignment_id, s.nonce, true))
        .collect();
    assert!(s.submit(resubmitted).await.iter().all(accepted));
    let last = f.controller.status().expect("status")["totals"].clone();
    assert_eq!(last, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_no_kubernetes_object_could_carry_end_the_session() {
    let f = Fixture::start(MANIFEST, &[]);
    let device = enroll(&f.controller, &f.data, "mislabelled").await;
    let mut first = hello(SLOW);
    if let Some(AgentKind::Hello(h)) = first.kind.as_mut() {
        h.labels.insert("site".into(), "plant 3; DROP".into());
    }
    let mut s = RawSession::open(&f.controller.url(), &device, first).await;
    let status = s.end().await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert!(
        status
            .message()
            .contains("Hello.labels: `site=plant 3; DROP`"),
        "{status}"
    );
    assert_eq!(number(&f.device("mislabelled"), "/protocolErrors"), 1);
    assert!(f.controller.assignments().is_empty(), "no work for it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_must_start_with_hello() {
    let f = Fixture::start(MANIFEST, &[]);
    let device = enroll(&f.controller, &f.data, "eager").await;
    let first = pb::AgentMessage {
        kind: Some(AgentKind::Shares(pb::SubmitShares {
            shares: vec![share(1, 1, false)],
        })),
    };
    let mut s = RawSession::open(&f.controller.url(), &device, first).await;
    let status = s.end().await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert!(status.message().contains("must be Hello"), "{status}");
    assert_eq!(number(&f.device("eager"), "/protocolErrors"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_end_only_their_own_session() {
    let f = Fixture::start(MANIFEST, &[]);
    let url = f.controller.url();
    let honest = enroll(&f.controller, &f.data, "honest").await;
    let attacker = enroll(&f.controller, &f.data, "attacker").await;

    // Truncated protobuf: a Hello field whose length prefix promises 100 bytes, giving 3.
    let status = raw_session(&url, &attacker, vec![vec![0x0a, 100, 1, 2, 3]])
        .await
        .expect_err("a truncated message ends the session with a reason");
    assert!(status.message().contains("buffer underflow"), "{status}");

    // Garbage that is not protobuf at all.
    let status = raw_session(&url, &attacker, vec![vec![0xff; 64]])
        .await
        .expect_err("garbage ends the session with a reason");
    assert!(status.message().contains("failed to decode"), "{status}");

    // Oversized: a share batch bigger than the message limit.
    let mut big = RawSession::open(&url, &attacker, hello(SLOW)).await;
    let _ = big.assignment().await;
    let shares: Vec<pb::Share> = (0..40_000).map(|n| share(1, n, false)).collect();
    big.tx
        .send(pb::AgentMessage {
            kind: Some(AgentKind::Shares(pb::SubmitShares { shares })),
        })
        .await
        .expect("queued");
    let status = big.end().await;
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");
    assert!(status.message().contains("too large"), "{status}");

    // Within the size limit but more shares than one batch may hold.
    let mut many = RawSession::open(&url, &attacker, hello(SLOW)).await;
    let _ = many.assignment().await;
    let shares: Vec<pb::Share> = (0..5_000).map(|n| share(1, n, false)).collect();
    many.tx
        .send(pb::AgentMessage {
            kind: Some(AgentKind::Shares(pb::SubmitShares { shares })),
        })
        .await
        .expect("queued");
    let status = many.end().await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");

    // Each violation was counted against the device that made it.
    assert_eq!(number(&f.device("attacker"), "/protocolErrors"), 4);
    assert_eq!(number(&f.device("honest"), "/protocolErrors"), 0);

    // Through all of that, an honest device gets served normally.
    let mut ok = RawSession::open(&url, &honest, hello(SLOW)).await;
    let work = ok.assignment().await;
    let results = ok
        .submit(vec![share(work.id, mine(&work, 1)[0], false)])
        .await;
    assert!(accepted(&results[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_flooding_its_session_is_cut_off() {
    let f = Fixture::start(MANIFEST, &[]);
    let noisy = enroll(&f.controller, &f.data, "noisy").await;
    let mut s = RawSession::open(&f.controller.url(), &noisy, hello(SLOW)).await;
    let _ = s.assignment().await;
    let progress = pb::AgentMessage {
        kind: Some(AgentKind::Progress(pb::Progress {
            assignment_id: 1,
            scanned_until: 0,
            hashes: 0,
            finished: false,
        })),
    };
    let flood = {
        let tx = s.tx.clone();
        tokio::spawn(async move {
            for _ in 0..5_000 {
                if tx.send(progress.clone()).await.is_err() {
                    break;
                }
            }
        })
    };
    let status = s.end().await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("message rate limit"), "{status}");
    flood.abort();
    assert_eq!(number(&f.device("noisy"), "/protocolErrors"), 1);
}
