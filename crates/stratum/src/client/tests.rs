use std::sync::Mutex;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;

use super::*;
use crate::passwords::FilePasswords;

/// What an upstream reported, for the tests to wait on.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<UpstreamEvent>>,
    answers: Mutex<Vec<PoolAnswer>>,
}

impl UpstreamSink for Recorder {
    fn event(&self, _miner: &str, event: UpstreamEvent) {
        self.events.lock().expect("events").push(event);
    }
    fn answers(&self, _miner: &str, answers: Vec<PoolAnswer>) {
        self.answers.lock().expect("answers").extend(answers);
    }
}

/// Polls `check` until it gives a value; 10 s is a failure, not a wait.
async fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited in vain for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn quick() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        response: Duration::from_secs(2),
        submit: Duration::from_millis(300),
        idle: Duration::from_secs(1),
        keepalive: Duration::from_secs(60),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
    }
}

fn config(ports: &[u16]) -> UpstreamConfig {
    UpstreamConfig {
        miner: "ns/m".into(),
        namespace: "ns".into(),
        pools: ports
            .iter()
            .map(|port| StratumPool {
                url: format!("stratum+tcp://127.0.0.1:{port}"),
                user: "u.w".into(),
                password_secret_ref: None,
                password_file: None,
            })
            .collect(),
        failback: Duration::from_secs(3600),
        timeouts: quick(),
        resume: None,
    }
}

type PoolLines = tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>;

/// Accepts one connection and answers its handshake (authorizing when `authorize`),
/// then sends a difficulty and a job. Returns the lines still to read, the writer,
/// and the subscribe request's params.
async fn handshake(
    listener: &TcpListener,
    authorize: bool,
) -> (PoolLines, tokio::net::tcp::OwnedWriteHalf, Value) {
    let (stream, _) = listener.accept().await.expect("a connection");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut subscribe = Value::Null;
    for _ in 0..3 {
        let line = lines.next_line().await.expect("read").expect("a request");
        let request: Value = serde_json::from_str(&line).expect("JSON");
        let id = request["id"].clone();
        let answer = match request["method"].as_str() {
            Some("mining.configure") => {
                json!({"id": id, "result": {"version-rolling": false}, "error": null})
            }
            Some("mining.subscribe") => {
                subscribe = request["params"].clone();
                json!({"id": id, "result": [[["mining.notify", "sess-1"]], "abcd", 4], "error": null})
            }
            Some("mining.authorize") if authorize => {
                json!({"id": id, "result": true, "error": null})
            }
            Some("mining.authorize") => {
                json!({"id": id, "result": null, "error": [24, "Unauthorized worker", null]})
            }
            other => panic!("unexpected {other:?}"),
        };
        write
            .write_all(format!("{answer}\n").as_bytes())
            .await
            .expect("write");
    }
    let job = json!({"id": null, "method": "mining.notify", "params": ["j1", "00".repeat(32), "01", "02", [], "20000000", "1d00ffff", "5f5e1000", true]});
    write
        .write_all(
            format!("{{\"id\":null,\"method\":\"mining.set_difficulty\",\"params\":[2]}}\n{job}\n")
                .as_bytes(),
        )
        .await
        .expect("write");
    (lines, write, subscribe)
}

fn submission(session: u64, nonce: u32) -> Submission {
    Submission {
        key: ShareKey {
            header_id: 1,
            nonce,
        },
        device: "d".into(),
        session,
        job_id: "j1".into(),
        extranonce2: vec![0, 0, 0, 1],
        ntime: 0x5f5e_1000,
        nonce,
        version_bits: None,
        difficulty: 2.0,
    }
}

#[tokio::test]
async fn rejections_unanswered_shares_and_a_silent_pool() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let recorder = Arc::new(Recorder::default());
    let upstream = Upstream::spawn(
        config(&[port]),
        Arc::new(FilePasswords::new(".")),
        Arc::clone(&recorder) as Arc<dyn UpstreamSink>,
    );
    let (mut lines, mut write, subscribe) = handshake(&listener, true).await;
    assert_eq!(
        subscribe.as_array().map(Vec::len),
        Some(1),
        "a first subscribe resumes nothing"
    );
    let session = until("connected", || {
        recorder
            .events
            .lock()
            .expect("events")
            .iter()
            .find_map(|e| match e {
                UpstreamEvent::Connected { session, .. } => Some(*session),
                _ => None,
            })
    })
    .await;
    until("the job", || {
        let events = recorder.events.lock().expect("events");
        (events.contains(&UpstreamEvent::Difficulty(2.0))
            && events
                .iter()
                .any(|e| matches!(e, UpstreamEvent::Job(j) if j.id == "j1")))
        .then_some(())
    })
    .await;

    // The pool refuses one share and never answers the other.
    upstream.submit(submission(session, 7)).expect("queued");
    upstream.submit(submission(session, 8)).expect("queued");
    // And a share of a session that is over is not sent at all.
    upstream
        .submit(submission(session + 1_000, 9))
        .expect("queued");
    let first = lines.next_line().await.expect("read").expect("a submit");
    let submit: Value = serde_json::from_str(&first).expect("JSON");
    assert_eq!(submit["method"], "mining.submit");
    assert_eq!(
        submit["params"],
        json!(["u.w", "j1", "00000001", "5f5e1000", "00000007"])
    );
    let reply =
        json!({"id": submit["id"], "result": null, "error": [23, "Low difficulty share", null]});
    write
        .write_all(format!("{reply}\n").as_bytes())
        .await
        .expect("write");
    let second: Value =
        serde_json::from_str(&lines.next_line().await.expect("read").expect("submit"))
            .expect("JSON");
    assert_eq!(second["params"][4], "00000008");
    let verdicts = until("three verdicts", || {
        let answers = recorder.answers.lock().expect("answers");
        (answers.len() == 3).then(|| {
            let mut v: Vec<(u32, Result<(), RejectReason>)> = answers
                .iter()
                .map(|a| (a.submission.nonce, a.verdict))
                .collect();
            v.sort_by_key(|(n, _)| *n);
            v
        })
    })
    .await;
    assert_eq!(
        verdicts,
        vec![
            (7, Err(RejectReason::LowDifficulty)),
            (8, Err(RejectReason::Timeout)),
            (9, Err(RejectReason::SessionLost)),
        ]
    );

    // The pool replaces its job: a late share of the old one is stale and not sent
    // (this pool answers nothing, so a sent one would end as a timeout).
    let job = json!({"id": null, "method": "mining.notify", "params": ["j2", "11".repeat(32), "01", "02", [], "20000000", "1d00ffff", "5f5e1001", true]});
    write
        .write_all(format!("{job}\n").as_bytes())
        .await
        .expect("write");
    until("the new job", || {
        let events = recorder.events.lock().expect("events");
        events
            .iter()
            .any(|e| matches!(e, UpstreamEvent::Job(j) if j.id == "j2"))
            .then_some(())
    })
    .await;
    upstream.submit(submission(session, 10)).expect("queued");
    let late = until("the late share's verdict", || {
        let answers = recorder.answers.lock().expect("answers");
        answers
            .iter()
            .find(|a| a.submission.nonce == 10)
            .map(|a| a.verdict)
    })
    .await;
    assert_eq!(late, Err(RejectReason::JobReplaced));

    // Silence beyond the idle timeout: the connection is given up and made again,
    // resuming the session.
    let error = until("the idle disconnect", || {
        recorder
            .events
            .lock()
            .expect("events")
            .iter()
            .find_map(|e| match e {
                UpstreamEvent::Disconnected { error } => Some(error.clone()),
                _ => None,
            })
    })
    .await;
    assert!(
        error.contains("no message from the pool for 1 s"),
        "{error}"
    );
    let (_lines, _write, subscribe) = handshake(&listener, true).await;
    assert_eq!(subscribe[1], "sess-1", "the session is resumed");
    drop(upstream);
}

#[tokio::test]
async fn a_pool_that_refuses_the_worker_gives_way_to_the_next() {
    let refusing = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let working = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ports = [
        refusing.local_addr().expect("addr").port(),
        working.local_addr().expect("addr").port(),
    ];
    let recorder = Arc::new(Recorder::default());
    let _upstream = Upstream::spawn(
        config(&ports),
        Arc::new(FilePasswords::new(".")),
        Arc::clone(&recorder) as Arc<dyn UpstreamSink>,
    );
    for _ in 0..FAILURES_BEFORE_FAILOVER {
        let _ = handshake(&refusing, false).await;
    }
    let _connection = handshake(&working, true).await;
    let events = until("connected to the second pool", || {
        let events = recorder.events.lock().expect("events").clone();
        events
            .iter()
            .any(|e| matches!(e, UpstreamEvent::Connected { pool_index: 1, .. }))
            .then_some(events)
    })
    .await;
    let refusals = events
            .iter()
            .filter(|e| matches!(e, UpstreamEvent::Disconnected { error } if error.contains("refused mining.authorize for u.w: Unauthorized worker")))
            .count();
    assert_eq!(refusals, FAILURES_BEFORE_FAILOVER as usize, "{events:?}");
}

#[tokio::test]
async fn shares_queued_when_the_upstream_stops_are_answered_not_dropped() {
    // A pool that takes the connection and never answers the handshake.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let recorder = Arc::new(Recorder::default());
    let upstream = Upstream::spawn(
        config(&[port]),
        Arc::new(FilePasswords::new(".")),
        Arc::clone(&recorder) as Arc<dyn UpstreamSink>,
    );
    let (_silent, _) = listener.accept().await.expect("a connection");
    upstream.submit(submission(1, 5)).expect("queued");
    drop(upstream);
    let answers = until("the abandoned share's verdict", || {
        let answers = recorder.answers.lock().expect("answers");
        (!answers.is_empty()).then(|| answers.clone())
    })
    .await;
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].verdict, Err(RejectReason::SessionLost));
    assert_eq!(answers[0].submission.nonce, 5);
}

#[tokio::test]
async fn a_pool_that_drops_every_session_at_once_gives_way_to_the_next() {
    let flapping = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let working = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ports = [
        flapping.local_addr().expect("addr").port(),
        working.local_addr().expect("addr").port(),
    ];
    let recorder = Arc::new(Recorder::default());
    let _upstream = Upstream::spawn(
        config(&ports),
        Arc::new(FilePasswords::new(".")),
        Arc::clone(&recorder) as Arc<dyn UpstreamSink>,
    );
    // Every connection gets a complete handshake and a job, then is dropped.
    let flapper = tokio::spawn(async move {
        loop {
            drop(handshake(&flapping, true).await);
        }
    });
    let _connection = tokio::time::timeout(Duration::from_secs(10), handshake(&working, true))
        .await
        .expect("failed over to the second pool");
    until("connected to the second pool", || {
        recorder
            .events
            .lock()
            .expect("events")
            .iter()
            .any(|e| matches!(e, UpstreamEvent::Connected { pool_index: 1, .. }))
            .then_some(())
    })
    .await;
    flapper.abort();
}

#[test]
fn backoff_is_jittered_around_the_wait() {
    let waits: Vec<Duration> = (0..200).map(|_| jittered(Duration::from_secs(4))).collect();
    assert!(
        waits
            .iter()
            .all(|w| *w >= Duration::from_secs(3) && *w <= Duration::from_secs(5))
    );
    let distinct: std::collections::HashSet<u128> = waits.iter().map(Duration::as_millis).collect();
    assert!(distinct.len() > 50, "spread over the window, not one value");
}
