//! A Stratum V1 mining pool for end-to-end tests: the upstream the controller's stratum
//! client talks to.
//!
//! It is written from the protocol (line-delimited JSON-RPC, cgminer/ckpool encodings)
//! and shares no code with the controller's client: a misreading of the protocol common
//! to both would otherwise pass every test. Every share is judged as a pool would
//! judge it: the pool rebuilds the coinbase, the merkle root and the header, hashes it and
//! compares the hash with the share and network targets, so an accepted share is a share
//! a real pool would have paid for.
//!
//! The API is synchronous, for the synchronous harness: the pool runs a current-thread
//! tokio runtime on its own thread, and the methods reach its state through a mutex.
//! Everything sent to a connection goes through that connection's queue, filled under the
//! lock, so a client sees messages in the order the pool decided them (a reply before
//! the job its request triggered, a job pushed by [`TestPool::notify`] never overtaken
//! by an older one).
//!
//! Sessions behave as ckpool's: the subscription id is the session id, and subscribing
//! again with it gives back the session's extranonce1 and its jobs.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;

/// Longest line accepted from a client, without its `\n`; longer ones close the
/// connection, as a pool protecting its memory would.
pub const MAX_LINE: usize = 16 * 1024;

/// How far past its job's ntime a share's ntime may roll (seconds).
const NTIME_WINDOW: u32 = 600;

/// The version field of every job: BIP9 top bits, no deployment signalled.
const JOB_VERSION: u32 = 0x2000_0000;

/// The coinbase pays 50 BTC in every job; nothing checks it, but it keeps the
/// transaction well formed.
const COINBASE_VALUE: u64 = 5_000_000_000;

/// How the pool behaves. Start from [`PoolConfig::default`].
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Share difficulty sent to connections (fractions allowed).
    pub difficulty: f64,
    /// Bytes of extranonce2 the miner rolls.
    pub extranonce2_size: usize,
    /// The pool's version-rolling mask; `None` refuses version rolling.
    pub version_rolling_mask: Option<u32>,
    /// The nbits of every job: the network target a share must meet to be a block.
    pub network_bits: u32,
    /// Accepted `(worker, password)` pairs; empty accepts anyone.
    pub workers: Vec<(String, String)>,
    /// Serve TLS (`stratum+ssl`) with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Synthetic transactions besides the coinbase in every job: they set the merkle
    /// branch's length.
    pub transactions: usize,
    /// Send `mining.set_difficulty` and the current job right after the first successful
    /// authorization of a subscribed connection. When false, jobs come only from
    /// [`TestPool::notify`].
    pub send_job_on_authorize: bool,
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            difficulty: 0.001,
            extranonce2_size: 4,
            version_rolling_mask: Some(0x1fff_e000),
            network_bits: 0x1d00_ffff,
            workers: Vec::new(),
            tls: None,
            transactions: 3,
            send_job_on_authorize: true,
        }
    }
}

/// What happened on the pool, in order.
#[derive(Debug, Clone)]
pub enum PoolEvent {
    /// A client connected (before any TLS handshake).
    Connected,
    /// A connection was accepted and closed at once: the pool is not accepting.
    Refused,
    /// The TLS handshake failed (the connection then ends with [`PoolEvent::Disconnected`]).
    HandshakeFailed {
        /// rustls' explanation.
        error: String,
    },
    /// `mining.subscribe` answered.
    Subscribed {
        /// The session (subscription) id.
        session: String,
        /// Whether the client resumed a known session.
        resumed: bool,
        /// The session's extranonce1, hex.
        extranonce1: String,
    },
    /// `mining.configure` answered.
    Configured {
        /// The negotiated version-rolling mask; `None` when not negotiated.
        mask: Option<u32>,
    },
    /// `mining.authorize` answered.
    Authorized {
        /// The worker name.
        worker: String,
        /// Whether it was accepted.
        ok: bool,
    },
    /// `mining.submit` judged.
    Submitted(Submission),
    /// A line that is not a JSON object, or longer than [`MAX_LINE`] (then only its start,
    /// followed by `...`): the connection was closed.
    Malformed {
        /// The offending line.
        line: String,
    },
    /// A connection ended, whichever side closed it.
    Disconnected,
}

/// One `mining.submit` and its verdict.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The worker name as submitted.
    pub worker: String,
    /// The job id as submitted.
    pub job_id: String,
    /// The extranonce1 the share was judged with (the session's current one, hex); empty
    /// when the connection had no session.
    pub extranonce1: String,
    /// As submitted.
    pub extranonce2: String,
    /// As submitted.
    pub ntime: String,
    /// As submitted.
    pub nonce: String,
    /// As submitted, when given.
    pub version_bits: Option<String>,
    /// Accepted or why not.
    pub verdict: Result<SubmitOk, Reject>,
}

/// An accepted share.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmitOk {
    /// The header hash in display (big-endian) order.
    pub hash_hex: String,
    /// The difficulty the share was judged at.
    pub share_difficulty: f64,
    /// The hash also meets the job's network target.
    pub block: bool,
}

/// A rejected share: what the client was told, and a stable slug for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// The JSON-RPC error code (20 other, 21 job not found or stale, 22 duplicate, 23 low
    /// difficulty, 24 unauthorized, 25 not subscribed).
    pub code: i64,
    /// The error message.
    pub message: String,
    /// `not-subscribed`, `unauthorized`, `job-not-found`, `stale`, `bad-extranonce2`,
    /// `bad-ntime`, `bad-nonce`, `bad-version`, `duplicate` or `low-difficulty`.
    pub reason: &'static str,
}

/// The test pool, serving until dropped.
pub struct TestPool {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tls: bool,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestPool {
    /// Starts on a free loopback port.
    pub fn start(config: PoolConfig) -> TestPool {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        TestPool::start_on(any, config).expect("starting the test pool on a loopback port")
    }

    /// Starts on `addr`: a pool restarting on the port a previous one used.
    pub fn start_on(addr: SocketAddr, config: PoolConfig) -> std::io::Result<TestPool> {
        // Bound here rather than on the pool's thread so that a taken port is the caller's
        // error.
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let tls = config.tls.clone().map(TlsAcceptor::from);
        let shared = Arc::new(Shared(Mutex::new(State::new(config))));
        let (shutdown, shutdown_rx) = oneshot::channel();
        let thread = {
            let shared = shared.clone();
            let tls = tls.clone();
            std::thread::Builder::new()
                .name(format!("test-pool-{}", addr.port()))
                .spawn(move || {
                    runtime.block_on(accept_loop(shared, listener, tls, shutdown_rx));
                    // Dropping the runtime here drops every connection task, and with them
                    // the sockets, before `Drop` for `TestPool` returns.
                    drop(runtime);
                })?
        };
        Ok(TestPool {
            shared,
            addr,
            tls: tls.is_some(),
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `stratum+tcp://127.0.0.1:PORT`, or `stratum+ssl://...` with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls {
            "stratum+ssl"
        } else {
            "stratum+tcp"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Makes a new job (new prevhash when `clean_jobs`, ntime now) and sends it to every
    /// subscribed and authorized connection, preceded by `mining.set_difficulty` on a
    /// connection that never received one. A clean job makes every older job stale.
    /// Returns the new job's id.
    pub fn notify(&self, clean_jobs: bool) -> String {
        let mut state = self.shared.lock();
        let id = state.new_job(clean_jobs);
        let ids: Vec<u64> = state.conns.keys().copied().collect();
        for conn in ids {
            if state.is_authorized(conn) {
                state.send_current_job(conn, clean_jobs, false);
            }
        }
        id
    }

    /// Sets the share difficulty for every subscribed connection (and for connections to
    /// come), sending `mining.set_difficulty`. Shares for jobs sent before are judged at
    /// the lower of the two difficulties.
    pub fn set_difficulty(&self, difficulty: f64) {
        let mut state = self.shared.lock();
        state.difficulty = difficulty;
        let ids: Vec<u64> = state.conns.keys().copied().collect();
        for conn in ids {
            state.send_difficulty(conn, difficulty);
        }
    }

    /// Gives every subscribed connection's session a new extranonce1 and sends
    /// `mining.set_extranonce`. From then on the session's shares, whatever their job,
    /// are judged with the new extranonce1; no new job is sent (call
    /// [`TestPool::notify`] for that, as pools do).
    pub fn set_extranonce(&self) {
        let mut state = self.shared.lock();
        let mut renewed = HashSet::new();
        let ids: Vec<u64> = state.conns.keys().copied().collect();
        for conn in ids {
            let Some(session) = state.conns.get(&conn).and_then(|c| c.session.clone()) else {
                continue;
            };
            if renewed.insert(session.clone()) {
                let fresh = state.next_extranonce1();
                if let Some(s) = state.sessions.get_mut(&session) {
                    s.extranonce1 = fresh;
                }
            }
            let Some(extranonce1) = state.sessions.get(&session).map(|s| s.extranonce1) else {
                continue;
            };
            let size = state.config.extranonce2_size;
            state.send(
                conn,
                &notification(
                    "mining.set_extranonce",
                    json!([hex::encode(extranonce1), size]),
                ),
            );
        }
    }

    /// Writes `line` and `\n` to every connection, as is.
    pub fn send_raw(&self, line: &str) {
        let state = self.shared.lock();
        for conn in state.conns.values() {
            // A closed queue is a connection on its way out.
            let _ = conn.out.send(line.to_string());
        }
    }

    /// Sends `client.reconnect` to every connection.
    pub fn reconnect(&self, host: &str, port: u16, wait_seconds: u64) {
        let message = notification("client.reconnect", json!([host, port, wait_seconds]));
        let state = self.shared.lock();
        for conn in state.conns.values() {
            let _ = conn.out.send(message.to_string());
        }
    }

    /// Closes every connection, returning once their sockets are closed. Sessions remain
    /// resumable.
    pub fn drop_connections(&self) {
        let (ack, acks) = std_mpsc::channel();
        let mut expected = 0;
        {
            let mut state = self.shared.lock();
            for conn in state.conns.values_mut() {
                if let Some(close) = conn.close.take()
                    && close.send(ack.clone()).is_ok()
                {
                    expected += 1;
                }
            }
        }
        drop(ack);
        for _ in 0..expected {
            match acks.recv_timeout(Duration::from_secs(5)) {
                Ok(()) => {}
                // The runtime is going away, and the sockets with it.
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the test pool did not close its connections within 5 s")
                }
            }
        }
    }

    /// `false`: accepted connections are closed at once, as by a dead pool whose port
    /// is still taken (existing connections stay; see [`TestPool::drop_connections`]).
    pub fn set_accepting(&self, accept: bool) {
        self.shared.lock().accepting = accept;
    }

    /// Live connections.
    pub fn connections(&self) -> usize {
        self.shared.lock().conns.len()
    }

    /// Everything that happened so far.
    pub fn events(&self) -> Vec<PoolEvent> {
        self.shared.lock().events.clone()
    }

    /// Every `mining.submit` so far, in order.
    pub fn submissions(&self) -> Vec<Submission> {
        self.shared
            .lock()
            .events
            .iter()
            .filter_map(|e| match e {
                PoolEvent::Submitted(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// Accepted shares so far.
    pub fn accepted(&self) -> usize {
        self.submissions()
            .iter()
            .filter(|s| s.verdict.is_ok())
            .count()
    }

    /// Shares rejected so far with `reason` (a [`Reject::reason`] slug).
    pub fn rejected(&self, reason: &str) -> usize {
        self.submissions()
            .iter()
            .filter(|s| matches!(&s.verdict, Err(r) if r.reason == reason))
            .count()
    }

    /// The id of the latest job.
    pub fn current_job(&self) -> String {
        self.shared.lock().current.clone()
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A panic on the pool's thread has already been printed; panicking again in a
            // destructor would only abort.
            let _ = thread.join();
        }
    }
}

struct Shared(Mutex<State>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panicking test thread: every change is
        // made under one lock and none spans a panic point that leaves it half done.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A job as the pool made it.
#[derive(Debug, Clone)]
struct Job {
    id: String,
    /// Creation order, for staleness.
    seq: u64,
    /// Internal byte order.
    prev_hash: [u8; 32],
    coinb1: Vec<u8>,
    coinb2: Vec<u8>,
    /// Internal byte order.
    branch: Vec<[u8; 32]>,
    version: u32,
    nbits: u32,
    ntime: u32,
}

impl Job {
    fn notify_params(&self, clean_jobs: bool) -> Value {
        let branch: Vec<String> = self.branch.iter().map(hex::encode).collect();
        json!([
            self.id,
            hex::encode(swap_words(&self.prev_hash)),
            hex::encode(&self.coinb1),
            hex::encode(&self.coinb2),
            branch,
            format!("{:08x}", self.version),
            format!("{:08x}", self.nbits),
            format!("{:08x}", self.ntime),
            clean_jobs,
        ])
    }
}

struct Conn {
    out: mpsc::UnboundedSender<String>,
    /// Taken by [`TestPool::drop_connections`]; the task acknowledges once its socket is
    /// closed.
    close: Option<oneshot::Sender<std_mpsc::Sender<()>>>,
    session: Option<String>,
    workers: HashSet<String>,
    version_mask: Option<u32>,
    difficulty_sent: bool,
    job_sent: bool,
}

struct Session {
    extranonce1: [u8; 4],
    /// The last difficulty sent to the session.
    difficulty: f64,
    /// Jobs sent to the session, with the difficulty in force when each was sent.
    jobs: HashMap<String, f64>,
}

/// The fields of a `mining.submit`, as text.
struct Share {
    worker: String,
    job_id: String,
    extranonce2: String,
    ntime: String,
    nonce: String,
    version_bits: Option<String>,
}

/// What makes two shares the same share.
#[derive(PartialEq, Eq, Hash)]
struct ShareKey {
    job: String,
    extranonce1: [u8; 4],
    extranonce2: Vec<u8>,
    ntime: u32,
    nonce: u32,
    version: u32,
}

struct State {
    config: PoolConfig,
    difficulty: f64,
    accepting: bool,
    /// Per-pool randomness, so that a restarted pool hands out other session ids,
    /// extranonces and job ids than its predecessor.
    seed: u64,
    next_conn: u64,
    next_session: u32,
    next_extranonce: u32,
    conns: BTreeMap<u64, Conn>,
    sessions: HashMap<String, Session>,
    jobs: HashMap<String, Job>,
    current: String,
    job_seq: u64,
    /// Jobs created before the latest clean one are stale.
    last_clean: u64,
    prev_hash: [u8; 32],
    seen: HashSet<ShareKey>,
    events: Vec<PoolEvent>,
}

type RpcError = (i64, String);

impl State {
    fn new(config: PoolConfig) -> State {
        let seed = std::collections::hash_map::RandomState::new().hash_one(0u8);
        let mut state = State {
            difficulty: config.difficulty,
            config,
            accepting: true,
            seed,
            next_conn: 0,
            next_session: 0,
            next_extranonce: 0,
            conns: BTreeMap::new(),
            sessions: HashMap::new(),
            jobs: HashMap::new(),
            current: String::new(),
            job_seq: 0,
            last_clean: 0,
            prev_hash: [0; 32],
            seen: HashSet::new(),
            events: Vec::new(),
        };
        state.new_job(true);
        state
    }

    fn register(
        &mut self,
        out: mpsc::UnboundedSender<String>,
        close: oneshot::Sender<std_mpsc::Sender<()>>,
    ) -> u64 {
        self.next_conn += 1;
        self.conns.insert(
            self.next_conn,
            Conn {
                out,
                close: Some(close),
                session: None,
                workers: HashSet::new(),
                version_mask: None,
                difficulty_sent: false,
                job_sent: false,
            },
        );
        self.events.push(PoolEvent::Connected);
        self.next_conn
    }

    fn disconnected(&mut self, conn: u64) {
        if self.conns.remove(&conn).is_some() {
            self.events.push(PoolEvent::Disconnected);
        }
    }

    fn send(&self, conn: u64, message: &Value) {
        if let Some(c) = self.conns.get(&conn) {
            // A closed queue is a connection on its way out.
            let _ = c.out.send(message.to_string());
        }
    }

    fn is_authorized(&self, conn: u64) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| c.session.is_some() && !c.workers.is_empty())
    }

    fn next_extranonce1(&mut self) -> [u8; 4] {
        self.next_extranonce += 1;
        // A bijection of the counter: distinct for every session of this pool.
        scramble(((self.seed >> 32) as u32).wrapping_add(self.next_extranonce)).to_be_bytes()
    }

    fn new_session(&mut self) -> String {
        self.next_session += 1;
        let id = format!(
            "{:08x}",
            scramble((self.seed as u32).wrapping_add(self.next_session))
        );
        let extranonce1 = self.next_extranonce1();
        self.sessions.insert(
            id.clone(),
            Session {
                extranonce1,
                difficulty: 1.0,
                jobs: HashMap::new(),
            },
        );
        id
    }

    fn new_job(&mut self, clean: bool) -> String {
        self.job_seq += 1;
        let seq = self.job_seq;
        if clean {
            self.prev_hash = sha256d(&[&self.seed.to_le_bytes()[..], &seq.to_le_bytes()].concat());
            self.last_clean = seq;
        }
        let extranonce_len = 4 + self.config.extranonce2_size;
        let (coinb1, coinb2) = coinbase_parts(seq, self.seed ^ seq, extranonce_len);
        let txids: Vec<[u8; 32]> = (0..self.config.transactions as u64)
            .map(|i| {
                sha256d(
                    &[
                        &self.seed.to_be_bytes()[..],
                        &seq.to_le_bytes(),
                        &i.to_le_bytes(),
                    ]
                    .concat(),
                )
            })
            .collect();
        let id = format!(
            "{:x}",
            scramble(((self.seed >> 16) as u32).wrapping_add(seq as u32))
        );
        let ntime = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or_default();
        let job = Job {
            id: id.clone(),
            seq,
            prev_hash: self.prev_hash,
            coinb1,
            coinb2,
            branch: merkle_branch(&txids),
            version: JOB_VERSION,
            nbits: self.config.network_bits,
            ntime,
        };
        self.jobs.insert(id.clone(), job);
        self.current = id.clone();
        id
    }

    /// Sends `mining.set_difficulty` to a subscribed connection and makes it the
    /// session's difficulty.
    fn send_difficulty(&mut self, conn: u64, difficulty: f64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(session) = c.session.as_ref().and_then(|s| self.sessions.get_mut(s)) else {
            return;
        };
        session.difficulty = difficulty;
        c.difficulty_sent = true;
        self.send(
            conn,
            &notification("mining.set_difficulty", json!([difficulty])),
        );
    }

    /// Sends the current job to a subscribed connection, and first the difficulty when
    /// `with_difficulty` or when the connection never received one.
    fn send_current_job(&mut self, conn: u64, clean_jobs: bool, with_difficulty: bool) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if with_difficulty || !c.difficulty_sent {
            self.send_difficulty(conn, self.difficulty);
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(session) = c.session.as_ref().and_then(|s| self.sessions.get_mut(s)) else {
            return;
        };
        let Some(job) = self.jobs.get(&self.current) else {
            return;
        };
        session.jobs.insert(job.id.clone(), session.difficulty);
        c.job_sent = true;
        let message = notification("mining.notify", job.notify_params(clean_jobs));
        let _ = c.out.send(message.to_string());
    }

    /// Handles one line from a connection; false closes it.
    fn handle_line(&mut self, conn: u64, line: &[u8]) -> bool {
        let lossy = String::from_utf8_lossy(line);
        let text = lossy.trim();
        if text.is_empty() {
            return true;
        }
        // JSON is UTF-8: a line that is not is as malformed as one that does not parse.
        let parsed = std::str::from_utf8(line)
            .ok()
            .and_then(|line| serde_json::from_str::<Value>(line).ok());
        let request = match parsed {
            Some(request @ Value::Object(_)) => request,
            _ => {
                self.events.push(PoolEvent::Malformed {
                    line: text.to_string(),
                });
                return false;
            }
        };
        let id = request.get("id").cloned().unwrap_or(Value::Null);
        let params = request
            .get("params")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let result = match request.get("method").and_then(Value::as_str) {
            Some("mining.subscribe") => self.subscribe(conn, &params),
            Some("mining.configure") => self.configure(conn, &params),
            Some("mining.authorize") => self.authorize(conn, &params),
            Some("mining.submit") => self.submit(conn, &params),
            _ => Err((20, "Unknown method".to_string())),
        };
        let reply = match result {
            Ok(result) => json!({"id": id, "result": result, "error": null}),
            Err((code, message)) => {
                json!({"id": id, "result": null, "error": [code, message, null]})
            }
        };
        self.send(conn, &reply);
        // Subscribe and authorize may come in either order; the first job goes out once
        // both have.
        if self.config.send_job_on_authorize
            && self.is_authorized(conn)
            && self.conns.get(&conn).is_some_and(|c| !c.job_sent)
        {
            self.send_current_job(conn, true, true);
        }
        true
    }

    fn subscribe(&mut self, conn: u64, params: &[Value]) -> Result<Value, RpcError> {
        let (session, resumed) = match params.get(1).and_then(Value::as_str) {
            Some(known) if self.sessions.contains_key(known) => (known.to_string(), true),
            _ => (self.new_session(), false),
        };
        let extranonce1 = self
            .sessions
            .get(&session)
            .map(|s| hex::encode(s.extranonce1))
            .unwrap_or_default();
        if let Some(c) = self.conns.get_mut(&conn)
            && c.session.as_ref() != Some(&session)
        {
            c.session = Some(session.clone());
            c.difficulty_sent = false;
            c.job_sent = false;
        }
        self.events.push(PoolEvent::Subscribed {
            session: session.clone(),
            resumed,
            extranonce1: extranonce1.clone(),
        });
        Ok(json!([
            [
                ["mining.set_difficulty", session],
                ["mining.notify", session]
            ],
            extranonce1,
            self.config.extranonce2_size,
        ]))
    }

    fn configure(&mut self, conn: u64, params: &[Value]) -> Result<Value, RpcError> {
        let extensions: Vec<&str> = params
            .first()
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut result = Map::new();
        let mut negotiated = None;
        for extension in extensions {
            if extension != "version-rolling" {
                // BIP 310: an extension the server does not know is answered false.
                result.insert(extension.to_string(), Value::Bool(false));
                continue;
            }
            let Some(pool_mask) = self.config.version_rolling_mask else {
                result.insert(extension.to_string(), Value::Bool(false));
                continue;
            };
            // A client that names no mask takes whatever the pool allows.
            let requested = params
                .get(1)
                .and_then(|o| o.get("version-rolling.mask"))
                .and_then(Value::as_str)
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .unwrap_or(u32::MAX);
            let mask = pool_mask & requested;
            result.insert(extension.to_string(), Value::Bool(true));
            result.insert(
                "version-rolling.mask".to_string(),
                Value::String(format!("{mask:08x}")),
            );
            negotiated = Some(mask);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.version_mask = negotiated;
        }
        self.events.push(PoolEvent::Configured { mask: negotiated });
        Ok(Value::Object(result))
    }

    fn authorize(&mut self, conn: u64, params: &[Value]) -> Result<Value, RpcError> {
        let worker = text_param(params, 0);
        let password = text_param(params, 1);
        let ok = self.config.workers.is_empty()
            || self
                .config
                .workers
                .iter()
                .any(|(w, p)| *w == worker && *p == password);
        if ok && let Some(c) = self.conns.get_mut(&conn) {
            c.workers.insert(worker.clone());
        }
        self.events.push(PoolEvent::Authorized { worker, ok });
        if ok {
            Ok(Value::Bool(true))
        } else {
            Err((24, "Unauthorized worker".to_string()))
        }
    }

    fn submit(&mut self, conn: u64, params: &[Value]) -> Result<Value, RpcError> {
        let share = Share {
            worker: text_param(params, 0),
            job_id: text_param(params, 1),
            extranonce2: text_param(params, 2),
            ntime: text_param(params, 3),
            nonce: text_param(params, 4),
            version_bits: params.get(5).filter(|v| !v.is_null()).map(value_text),
        };
        let extranonce1 = self
            .conns
            .get(&conn)
            .and_then(|c| c.session.as_ref())
            .and_then(|s| self.sessions.get(s))
            .map(|s| hex::encode(s.extranonce1))
            .unwrap_or_default();
        let verdict = self.judge(conn, &share);
        let reply = match &verdict {
            Ok(_) => Ok(Value::Bool(true)),
            Err(r) => Err((r.code, r.message.clone())),
        };
        self.events.push(PoolEvent::Submitted(Submission {
            worker: share.worker,
            job_id: share.job_id,
            extranonce1,
            extranonce2: share.extranonce2,
            ntime: share.ntime,
            nonce: share.nonce,
            version_bits: share.version_bits,
            verdict,
        }));
        reply
    }

    fn judge(&mut self, conn: u64, share: &Share) -> Result<SubmitOk, Reject> {
        let Some(c) = self.conns.get(&conn) else {
            return Err(reject(25, "Not subscribed", "not-subscribed"));
        };
        let Some(session) = c.session.as_ref().and_then(|s| self.sessions.get(s)) else {
            return Err(reject(25, "Not subscribed", "not-subscribed"));
        };
        if !c.workers.contains(&share.worker) {
            return Err(reject(24, "Unauthorized worker", "unauthorized"));
        }
        let (Some(&sent_difficulty), Some(job)) = (
            session.jobs.get(&share.job_id),
            self.jobs.get(&share.job_id),
        ) else {
            return Err(reject(21, "Job not found", "job-not-found"));
        };
        if job.seq < self.last_clean {
            return Err(reject(21, "Stale", "stale"));
        }
        let extranonce2 = hex::decode(&share.extranonce2)
            .ok()
            .filter(|b| b.len() == self.config.extranonce2_size)
            .ok_or_else(|| reject(20, "Invalid extranonce2 size", "bad-extranonce2"))?;
        let ntime = parse_hex_u32(&share.ntime)
            .filter(|t| *t >= job.ntime && *t - job.ntime <= NTIME_WINDOW)
            .ok_or_else(|| reject(20, "ntime out of range", "bad-ntime"))?;
        let nonce =
            parse_hex_u32(&share.nonce).ok_or_else(|| reject(20, "Invalid nonce", "bad-nonce"))?;
        let version = match &share.version_bits {
            None => job.version,
            Some(bits) => {
                let bad = || reject(20, "Invalid version bits", "bad-version");
                let mask = c.version_mask.ok_or_else(bad)?;
                // ckpool parses the bits leniently (no fixed width); so does this pool.
                let bits = Some(bits.as_str())
                    .filter(|b| {
                        (1..=8).contains(&b.len()) && b.bytes().all(|d| d.is_ascii_hexdigit())
                    })
                    .and_then(|b| u32::from_str_radix(b, 16).ok())
                    .filter(|b| b & !mask == 0)
                    .ok_or_else(bad)?;
                (job.version & !mask) | bits
            }
        };
        let extranonce1 = session.extranonce1;
        let difficulty = sent_difficulty.min(session.difficulty);
        let coinbase = [&job.coinb1[..], &extranonce1, &extranonce2, &job.coinb2].concat();
        let root = merkle_root(sha256d(&coinbase), &job.branch);
        let header = block_header(version, &job.prev_hash, &root, ntime, job.nbits, nonce);
        let hash = sha256d(&header);
        let nbits = job.nbits;
        let key = ShareKey {
            job: share.job_id.clone(),
            extranonce1,
            extranonce2,
            ntime,
            nonce,
            version,
        };
        if !self.seen.insert(key) {
            return Err(reject(22, "Duplicate share", "duplicate"));
        }
        let value = U256::from_le_bytes(&hash);
        if value > target_for_difficulty(difficulty) {
            return Err(reject(23, "Low difficulty share", "low-difficulty"));
        }
        let mut display = hash;
        display.reverse();
        Ok(SubmitOk {
            hash_hex: hex::encode(display),
            share_difficulty: difficulty,
            block: value <= target_from_compact(nbits),
        })
    }
}

fn reject(code: i64, message: &str, reason: &'static str) -> Reject {
    Reject {
        code,
        message: message.to_string(),
        reason,
    }
}

fn notification(method: &str, params: Value) -> Value {
    json!({"id": null, "method": method, "params": params})
}

/// A parameter as text: strings as they are, other JSON as written, missing ones empty.
/// A client sending a number where a string belongs then fails the checks on content
/// rather than getting a different error.
fn text_param(params: &[Value], index: usize) -> String {
    params.get(index).map(value_text).unwrap_or_default()
}

fn value_text(value: &Value) -> String {
    value
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| value.to_string())
}

/// Exactly 8 hex digits, big-endian.
fn parse_hex_u32(text: &str) -> Option<u32> {
    if text.len() == 8 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        u32::from_str_radix(text, 16).ok()
    } else {
        None
    }
}

/// A bijective mix of a u32 (lowbias32), so that counters look like random ids while
/// staying distinct.
fn scramble(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    tls: Option<TlsAcceptor>,
    mut shutdown: oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors and the like: retrying at once would spin.
                    eprintln!("test pool: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let (out, out_rx) = mpsc::unbounded_channel();
        let (close, close_rx) = oneshot::channel();
        let id = {
            let mut state = shared.lock();
            if !state.accepting {
                state.events.push(PoolEvent::Refused);
                continue;
            }
            state.register(out, close)
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            shared.clone(),
            id,
            stream,
            tls.clone(),
            out_rx,
            close_rx,
        ));
    }
}

async fn connection(
    shared: Arc<Shared>,
    id: u64,
    stream: tokio::net::TcpStream,
    tls: Option<TlsAcceptor>,
    out_rx: mpsc::UnboundedReceiver<String>,
    mut close_rx: oneshot::Receiver<std_mpsc::Sender<()>>,
) {
    // The stream lives inside the `serve` future: leaving the select drops it, so the
    // socket is closed before the close is acknowledged.
    let ack = tokio::select! {
        Ok(ack) = &mut close_rx => Some(ack),
        () = serve(&shared, id, stream, tls, out_rx) => None,
    };
    shared.lock().disconnected(id);
    if let Some(ack) = ack {
        let _ = ack.send(());
    }
}

async fn serve(
    shared: &Shared,
    id: u64,
    stream: tokio::net::TcpStream,
    tls: Option<TlsAcceptor>,
    out_rx: mpsc::UnboundedReceiver<String>,
) {
    match tls {
        None => talk(shared, id, stream, out_rx).await,
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(stream) => talk(shared, id, stream, out_rx).await,
            Err(e) => shared.lock().events.push(PoolEvent::HandshakeFailed {
                error: e.to_string(),
            }),
        },
    }
}

/// Reads request lines and writes queued messages until either side closes.
async fn talk<S: AsyncRead + AsyncWrite>(
    shared: &Shared,
    id: u64,
    stream: S,
    mut out_rx: mpsc::UnboundedReceiver<String>,
) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut pending = Vec::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        tokio::select! {
            message = out_rx.recv() => {
                let Some(message) = message else { return };
                if write_line(&mut writer, message).await.is_err() {
                    return;
                }
            }
            read = reader.read(&mut chunk) => {
                let n = match read {
                    Ok(0) | Err(_) => {
                        // A client that half-closed after its requests still gets the
                        // replies.
                        while let Ok(message) = out_rx.try_recv() {
                            if write_line(&mut writer, message).await.is_err() {
                                break;
                            }
                        }
                        return;
                    }
                    Ok(n) => n,
                };
                pending.extend_from_slice(&chunk[..n]);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    if line.len() > MAX_LINE + 1 {
                        too_long(shared, &line);
                        return;
                    }
                    if !shared.lock().handle_line(id, &line) {
                        return;
                    }
                }
                if pending.len() > MAX_LINE {
                    too_long(shared, &pending);
                    return;
                }
            }
        }
    }
}

async fn write_line<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut line: String,
) -> std::io::Result<()> {
    line.push('\n');
    writer.write_all(line.as_bytes()).await?;
    // TLS buffers records until flushed.
    writer.flush().await
}

fn too_long(shared: &Shared, line: &[u8]) {
    let start = String::from_utf8_lossy(&line[..line.len().min(64)]);
    shared.lock().events.push(PoolEvent::Malformed {
        line: format!("{start}..."),
    });
}

/// SHA-256 applied twice, as Bitcoin hashes headers and transactions.
fn sha256d(data: &[u8]) -> [u8; 32] {
    Sha256::digest(Sha256::digest(data)).into()
}

/// Reverses the bytes of each 4-byte word: the stratum encoding of the previous block
/// hash, which miners undo.
fn swap_words(hash: &[u8; 32]) -> [u8; 32] {
    let mut out = *hash;
    for word in out.chunks_exact_mut(4) {
        word.reverse();
    }
    out
}

/// Bitcoin's variable-length integer.
fn compact_size(n: usize) -> Vec<u8> {
    match n {
        0..0xfd => vec![n as u8],
        0xfd..=0xffff => [&[0xfd][..], &(n as u16).to_le_bytes()].concat(),
        _ => [&[0xfe][..], &(n as u32).to_le_bytes()].concat(),
    }
}

/// A coinbase transaction split around the extranonces, which go in its scriptSig after a
/// BIP 34 height push; `tag` makes every job's coinbase distinct.
fn coinbase_parts(height: u64, tag: u64, extranonce_len: usize) -> (Vec<u8>, Vec<u8>) {
    let mut head = vec![0x03];
    head.extend_from_slice(&height.to_le_bytes()[..3]);
    // A direct push of the extranonces keeps the script parseable when it is short
    // enough for one; the scriptSig of a coinbase is not executed either way.
    if extranonce_len <= 75 {
        head.push(extranonce_len as u8);
    }
    let mut tail = vec![0x08];
    tail.extend_from_slice(&tag.to_le_bytes());
    let script_len = head.len() + extranonce_len + tail.len();

    let mut coinb1 = Vec::new();
    coinb1.extend_from_slice(&1u32.to_le_bytes());
    coinb1.push(1); // one input: the null prevout
    coinb1.extend_from_slice(&[0; 32]);
    coinb1.extend_from_slice(&u32::MAX.to_le_bytes());
    coinb1.extend_from_slice(&compact_size(script_len));
    coinb1.extend_from_slice(&head);

    let mut coinb2 = tail;
    coinb2.extend_from_slice(&u32::MAX.to_le_bytes()); // sequence
    coinb2.push(1); // one output, P2PKH to a fixed key hash
    coinb2.extend_from_slice(&COINBASE_VALUE.to_le_bytes());
    let script = [&[0x76, 0xa9, 0x14][..], &[0x11; 20], &[0x88, 0xac]].concat();
    coinb2.extend_from_slice(&compact_size(script.len()));
    coinb2.extend_from_slice(&script);
    coinb2.extend_from_slice(&0u32.to_le_bytes()); // lock time
    (coinb1, coinb2)
}

/// The stratum merkle branch for a block whose first transaction is the coinbase and the
/// rest are `txids` (internal byte order): the siblings on the coinbase's path to the
/// root.
fn merkle_branch(txids: &[[u8; 32]]) -> Vec<[u8; 32]> {
    let mut branch = Vec::new();
    // `level[0]` stands for the hash that contains the coinbase, which the miner's
    // extranonce2 decides; only its siblings are known.
    let mut level = vec![[0u8; 32]];
    level.extend_from_slice(txids);
    while level.len() > 1 {
        if level.len() % 2 == 1 {
            let last = level[level.len() - 1];
            level.push(last);
        }
        branch.push(level[1]);
        let mut next = vec![[0u8; 32]];
        for pair in level[2..].chunks_exact(2) {
            next.push(sha256d(&[pair[0], pair[1]].concat()));
        }
        level = next;
    }
    branch
}

/// Folds the coinbase's txid up the branch.
fn merkle_root(coinbase_txid: [u8; 32], branch: &[[u8; 32]]) -> [u8; 32] {
    branch.iter().fold(coinbase_txid, |root, sibling| {
        sha256d(&[root, *sibling].concat())
    })
}

/// The 80-byte header; hashes in internal order, integers little-endian.
fn block_header(
    version: u32,
    prev_hash: &[u8; 32],
    merkle_root: &[u8; 32],
    ntime: u32,
    nbits: u32,
    nonce: u32,
) -> [u8; 80] {
    let mut header = [0u8; 80];
    header[0..4].copy_from_slice(&version.to_le_bytes());
    header[4..36].copy_from_slice(prev_hash);
    header[36..68].copy_from_slice(merkle_root);
    header[68..72].copy_from_slice(&ntime.to_le_bytes());
    header[72..76].copy_from_slice(&nbits.to_le_bytes());
    header[76..80].copy_from_slice(&nonce.to_le_bytes());
    header
}

/// An unsigned integer of `N` 64-bit limbs, least significant first: just what targets
/// need (shifts, division by a small number, comparison).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Uint<const N: usize>([u64; N]);

type U256 = Uint<4>;

/// Wide enough for the difficulty-1 target shifted left by any amount that can still
/// divide down below 2^256.
type U512 = Uint<8>;

impl<const N: usize> Uint<N> {
    const ZERO: Uint<N> = Uint([0; N]);
    const MAX: Uint<N> = Uint([u64::MAX; N]);

    fn from_u64(n: u64) -> Uint<N> {
        let mut limbs = [0; N];
        limbs[0] = n;
        Uint(limbs)
    }

    /// Shifted left by `bits`; bits shifted out are lost.
    fn shl(&self, bits: u32) -> Uint<N> {
        let mut out = [0; N];
        let (limbs, rem) = ((bits / 64) as usize, bits % 64);
        for i in (limbs..N).rev() {
            let mut v = self.0[i - limbs] << rem;
            if rem > 0 && i > limbs {
                v |= self.0[i - limbs - 1] >> (64 - rem);
            }
            out[i] = v;
        }
        Uint(out)
    }

    fn shr(&self, bits: u32) -> Uint<N> {
        let mut out = [0; N];
        let (limbs, rem) = ((bits / 64) as usize, bits % 64);
        for (i, slot) in out.iter_mut().enumerate().take(N.saturating_sub(limbs)) {
            let mut v = self.0[i + limbs] >> rem;
            if rem > 0 && i + limbs + 1 < N {
                v |= self.0[i + limbs + 1] << (64 - rem);
            }
            *slot = v;
        }
        Uint(out)
    }

    /// Floor division by a non-zero `divisor`.
    fn div_u64(&self, divisor: u64) -> Uint<N> {
        let mut out = [0; N];
        let mut rem: u128 = 0;
        for i in (0..N).rev() {
            let cur = (rem << 64) | u128::from(self.0[i]);
            out[i] = (cur / u128::from(divisor)) as u64;
            rem = cur % u128::from(divisor);
        }
        Uint(out)
    }
}

impl<const N: usize> Ord for Uint<N> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.iter().rev().cmp(other.0.iter().rev())
    }
}

impl<const N: usize> PartialOrd for Uint<N> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl U256 {
    /// A hash in internal byte order read as the number Bitcoin compares with targets.
    fn from_le_bytes(bytes: &[u8; 32]) -> U256 {
        let mut limbs = [0; 4];
        for (limb, chunk) in limbs.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            *limb = u64::from_le_bytes(word);
        }
        Uint(limbs)
    }

    #[cfg(test)]
    fn to_be_bytes(self) -> [u8; 32] {
        let mut out = [0; 32];
        for (chunk, limb) in out.chunks_exact_mut(8).zip(self.0.iter().rev()) {
            chunk.copy_from_slice(&limb.to_be_bytes());
        }
        out
    }
}

impl U512 {
    /// The low 256 bits, or the largest U256 when the value does not fit.
    fn clamp_to_u256(&self) -> U256 {
        if self.0[4..].iter().any(|l| *l != 0) {
            return U256::MAX;
        }
        let mut limbs = [0; 4];
        limbs.copy_from_slice(&self.0[..4]);
        Uint(limbs)
    }
}

/// The difficulty-1 target, 0xffff * 2^208.
fn difficulty_one() -> U512 {
    U512::from_u64(0xffff).shl(208)
}

/// `floor(diff1 / difficulty)`, computed exactly from the f64's mantissa and exponent,
/// clamped to 2^256 - 1. A difficulty of zero or less accepts every hash.
fn target_for_difficulty(difficulty: f64) -> U256 {
    if difficulty.is_nan() || difficulty <= 0.0 {
        return U256::MAX;
    }
    if difficulty.is_infinite() {
        return U256::ZERO;
    }
    let bits = difficulty.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1 << 52) - 1);
    // difficulty = mantissa * 2^power exactly.
    let (mut mantissa, mut power) = if exponent == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1 << 52), exponent - 1075)
    };
    let zeros = mantissa.trailing_zeros();
    mantissa >>= zeros;
    power += zeros as i32;
    if power >= 0 {
        // floor(floor(a / m) / 2^p) = floor(a / (m * 2^p)).
        let quotient = difficulty_one().div_u64(mantissa);
        if power >= 512 {
            return U256::ZERO;
        }
        quotient.shr(power as u32).clamp_to_u256()
    } else {
        let shift = power.unsigned_abs();
        // diff1 < 2^224 and mantissa < 2^53: past a shift of 85 the quotient is at least
        // 2^256.
        if shift > 256 {
            return U256::MAX;
        }
        difficulty_one()
            .shl(shift)
            .div_u64(mantissa)
            .clamp_to_u256()
    }
}

/// The target encoded by compact `nbits`: mantissa * 256^(exponent - 3). Negative
/// encodings are a target nothing meets; overflowing ones clamp.
fn target_from_compact(nbits: u32) -> U256 {
    let exponent = nbits >> 24;
    let mantissa = u64::from(nbits & 0x007f_ffff);
    if nbits & 0x0080_0000 != 0 || mantissa == 0 {
        return U256::ZERO;
    }
    if exponent <= 3 {
        return U256::from_u64(mantissa >> (8 * (3 - exponent)));
    }
    let shift = 8 * (exponent - 3);
    if shift >= 256 {
        return U256::MAX;
    }
    U512::from_u64(mantissa).shl(shift).clamp_to_u256()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;

    const TIMEOUT: Duration = Duration::from_secs(5);
    /// 0xffff * 2^224: a hash meets it when its top 16 bits are clear.
    const EASY: f64 = 1.0 / 65536.0;

    fn display_to_internal(display: &str) -> [u8; 32] {
        let mut bytes: [u8; 32] = hex::decode(display)
            .expect("hex")
            .try_into()
            .expect("32 bytes");
        bytes.reverse();
        bytes
    }

    #[test]
    fn reproduces_block_100000() {
        let header_hex = "0100000050120119172a610421a6c3011dd330d9df07b63616c2cc1f1cd00200000000006657a9252aacd5c0b2940996ecff952228c3067cc38d4885efb5a4ac4247e9f337221b4d4c86041b0f2b5710";
        let coinbase = hex::decode("01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff08044c86041b020602ffffffff0100f2052a010000004341041b0e8c2567c12536aa13357b79a073dc4444acb83c4ec7a0e2f99dd7457516c5817242da796924ca4e99947d087fedf9ce467cb9f7c6287078f801df276fdf84ac00000000").expect("hex");
        let coinbase_txid = sha256d(&coinbase);
        assert_eq!(
            coinbase_txid,
            display_to_internal("8c14f0db3df150123e6f3dbbf30f8b955a8249b62ac1d1ff16284aefa3d06d87")
        );
        let others = [
            "fff2525b8931402dd09222c50775608f75787bd2b87e56995a7bdd30f79702c4",
            "6359f0868171b1d194cbee1af2f16ea598ae8fad666d9b012c8ed2b79a236ec4",
            "e9a66845e05d5abc0ad04ec80f774a7e585c6e8db975962d069a522137b80c1d",
        ]
        .map(display_to_internal);
        let branch = merkle_branch(&others);
        assert_eq!(branch.len(), 2);
        assert_eq!(branch[0], others[0]);
        let root = merkle_root(coinbase_txid, &branch);
        assert_eq!(
            root,
            display_to_internal("f3e94742aca4b5ef85488dc37c06c3282295ffec960994b2c0d5ac2a25a95766")
        );

        let expected = hex::decode(header_hex).expect("hex");
        let word = |at: usize| u32::from_le_bytes(expected[at..at + 4].try_into().expect("4"));
        let prev: [u8; 32] = expected[4..36].try_into().expect("32");
        let header = block_header(word(0), &prev, &root, word(68), word(72), word(76));
        assert_eq!(header[..], expected[..]);
        assert_eq!(word(72), 0x1b04_864c);

        let hash = sha256d(&header);
        let mut display = hash;
        display.reverse();
        assert_eq!(
            hex::encode(display),
            "000000000003ba27aa200b1cecaad478d2b00432346c3f1f3986da1afd33e506"
        );
        let value = U256::from_le_bytes(&hash);
        let network = target_from_compact(0x1b04_864c);
        assert_eq!(
            hex::encode(network.to_be_bytes()),
            "000000000004864c000000000000000000000000000000000000000000000000"
        );
        assert!(value <= network);
        // Block 100000's difficulty is 14484.16: the hash meets 14484 but not 14485 *
        // 2^20.
        assert!(value <= target_for_difficulty(14484.0));
        assert!(value > target_for_difficulty(14485.0 * 1048576.0));

        // The stratum prevhash encoding swaps each word; miners swap it back.
        let encoded = swap_words(&prev);
        assert_eq!(hex::encode(&encoded[..8]), "1901125004612a17");
        assert_eq!(swap_words(&encoded), prev);
    }

    #[test]
    fn targets() {
        let hex_of = |t: U256| hex::encode(t.to_be_bytes());
        assert_eq!(
            hex_of(target_for_difficulty(1.0)),
            "00000000ffff0000000000000000000000000000000000000000000000000000"
        );
        assert_eq!(
            hex_of(target_for_difficulty(1.0)),
            hex_of(target_from_compact(0x1d00_ffff))
        );
        assert_eq!(
            hex_of(target_for_difficulty(EASY)),
            "0000ffff00000000000000000000000000000000000000000000000000000000"
        );
        assert_eq!(
            hex_of(target_for_difficulty(2.0)),
            "000000007fff8000000000000000000000000000000000000000000000000000"
        );
        // 0xffff * 2^208 / 3 = 0x5555 * 2^208.
        assert_eq!(
            hex_of(target_for_difficulty(3.0)),
            "0000000055550000000000000000000000000000000000000000000000000000"
        );
        // 0.001 is not a binary fraction: 1000.0000000000000208... times diff1, floored.
        assert_eq!(
            &hex_of(target_for_difficulty(0.001))[..16],
            "000003e7fc17ffff"
        );
        assert_eq!(target_for_difficulty(1e-30), U256::MAX);
        assert_eq!(target_for_difficulty(0.0), U256::MAX);
        assert_eq!(target_for_difficulty(f64::INFINITY), U256::ZERO);
        assert_eq!(target_for_difficulty(1e80), U256::ZERO);
        assert!(target_for_difficulty(1.0) > target_for_difficulty(1.000001));
        assert_eq!(
            hex_of(target_from_compact(0x207f_ffff)),
            "7fffff0000000000000000000000000000000000000000000000000000000000"
        );
        assert_eq!(target_from_compact(0x0300_1234), U256::from_u64(0x1234));
        assert_eq!(target_from_compact(0x0200_1234), U256::from_u64(0x12));
        assert_eq!(target_from_compact(0x0480_0001), U256::ZERO);
    }

    /// A hand-written stratum client: blocking, every read bounded by [`TIMEOUT`].
    struct Client<S: Read + Write> {
        stream: BufReader<S>,
        next_id: u64,
        /// Notifications read while waiting for a reply.
        backlog: VecDeque<Value>,
    }

    fn connect(pool: &TestPool) -> Client<TcpStream> {
        let stream = TcpStream::connect(pool.addr()).expect("connecting to the pool");
        stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("setting a read timeout");
        Client::new(stream)
    }

    impl<S: Read + Write> Client<S> {
        fn new(stream: S) -> Client<S> {
            Client {
                stream: BufReader::new(stream),
                next_id: 0,
                backlog: VecDeque::new(),
            }
        }

        fn write_line(&mut self, line: &str) {
            let stream = self.stream.get_mut();
            stream
                .write_all(format!("{line}\n").as_bytes())
                .expect("writing to the pool");
            stream.flush().expect("flushing");
        }

        /// The next message, or `None` when the pool closed the connection.
        fn read(&mut self) -> Option<Value> {
            let mut line = String::new();
            match self.stream.read_line(&mut line) {
                Ok(0) => None,
                Ok(_) => Some(serde_json::from_str(&line).expect("the pool sends JSON")),
                // A reset is the pool closing too.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
                Err(e) => panic!("reading from the pool: {e}"),
            }
        }

        /// Sends a request and returns its reply (`result`, `error`).
        fn request(&mut self, method: &str, params: Value) -> (Value, Value) {
            self.next_id += 1;
            let id = self.next_id;
            let request = json!({"id": id, "method": method, "params": params});
            self.write_line(&request.to_string());
            loop {
                let message = self.read().expect("a reply before the pool closed");
                if message["id"] == json!(id) {
                    return (message["result"].clone(), message["error"].clone());
                }
                assert!(message["id"].is_null(), "unexpected reply {message}");
                self.backlog.push_back(message);
            }
        }

        /// The next notification, which must be `method`; its params.
        fn expect(&mut self, method: &str) -> Value {
            let message = match self.backlog.pop_front() {
                Some(message) => message,
                None => self.read().expect("a notification before the pool closed"),
            };
            assert_eq!(message["method"], method, "got {message}");
            message["params"].clone()
        }

        /// Subscribes (resuming `session` when given): (session, extranonce1).
        fn subscribe(&mut self, session: Option<&str>) -> (String, String) {
            let params = match session {
                Some(s) => json!(["e2e/1.0", s]),
                None => json!(["e2e/1.0"]),
            };
            let (result, error) = self.request("mining.subscribe", params);
            assert!(error.is_null(), "subscribe failed: {error}");
            let session = result[0][1][1].as_str().expect("session id").to_string();
            assert_eq!(result[0][0][1], json!(session));
            assert_eq!(result[0][0][0], "mining.set_difficulty");
            assert_eq!(result[0][1][0], "mining.notify");
            assert_eq!(result[2], 4);
            let extranonce1 = result[1].as_str().expect("extranonce1").to_string();
            (session, extranonce1)
        }

        /// Authorizes and reads the difficulty and first job the pool then sends.
        fn authorize(&mut self, worker: &str) -> (f64, Work) {
            let (result, error) = self.request("mining.authorize", json!([worker, "x"]));
            assert_eq!(result, true, "authorize failed: {error}");
            let difficulty = self.expect("mining.set_difficulty")[0]
                .as_f64()
                .expect("a difficulty");
            let work = Work::from_notify(&self.expect("mining.notify"));
            assert!(work.clean);
            (difficulty, work)
        }

        fn submit(&mut self, params: Value) -> (Value, Value) {
            self.request("mining.submit", params)
        }
    }

    /// A job as a miner decodes it from `mining.notify`.
    #[derive(Debug, Clone)]
    struct Work {
        job_id: String,
        prev_hash: Vec<u8>,
        coinb1: Vec<u8>,
        coinb2: Vec<u8>,
        branch: Vec<Vec<u8>>,
        version: u32,
        nbits: u32,
        ntime: u32,
        clean: bool,
    }

    impl Work {
        fn from_notify(params: &Value) -> Work {
            let text = |i: usize| params[i].as_str().expect("a string").to_string();
            let bytes = |i: usize| hex::decode(text(i)).expect("hex");
            let number = |i: usize| u32::from_str_radix(&text(i), 16).expect("hex u32");
            // Undo the per-word byte swap of the prevhash.
            let prev_hash = bytes(1)
                .chunks(4)
                .flat_map(|w| w.iter().rev().copied().collect::<Vec<u8>>())
                .collect();
            Work {
                job_id: text(0),
                prev_hash,
                coinb1: bytes(2),
                coinb2: bytes(3),
                branch: params[4]
                    .as_array()
                    .expect("a branch")
                    .iter()
                    .map(|h| hex::decode(h.as_str().expect("hex")).expect("hex"))
                    .collect(),
                version: number(5),
                nbits: number(6),
                ntime: number(7),
                clean: params[8].as_bool().expect("clean_jobs"),
            }
        }

        /// The first nonce whose header hash does (or, with `meets` false, surely does
        /// not) meet difficulty [`EASY`].
        fn mine(&self, extranonce1: &str, extranonce2: &str, version: u32, meets: bool) -> u32 {
            let double = |data: &[u8]| -> Vec<u8> { Sha256::digest(Sha256::digest(data)).to_vec() };
            let mut coinbase = self.coinb1.clone();
            coinbase.extend(hex::decode(extranonce1).expect("hex"));
            coinbase.extend(hex::decode(extranonce2).expect("hex"));
            coinbase.extend(&self.coinb2);
            let mut root = double(&coinbase);
            for sibling in &self.branch {
                root.extend(sibling);
                root = double(&root);
            }
            let mut header = Vec::with_capacity(80);
            header.extend(version.to_le_bytes());
            header.extend(&self.prev_hash);
            header.extend(&root);
            header.extend(self.ntime.to_le_bytes());
            header.extend(self.nbits.to_le_bytes());
            header.extend([0; 4]);
            for nonce in 0..u32::MAX {
                header[76..].copy_from_slice(&nonce.to_le_bytes());
                let hash = double(&header);
                // Top 16 bits clear, and not the rare 0x0000ffff... above the target.
                let easy = hash[31] == 0 && hash[30] == 0 && hash[29] != 0xff;
                let hard = hash[31] != 0;
                if (meets && easy) || (!meets && hard) {
                    return nonce;
                }
            }
            panic!("no nonce found");
        }
    }

    fn easy_pool() -> TestPool {
        TestPool::start(PoolConfig {
            difficulty: EASY,
            ..PoolConfig::default()
        })
    }

    fn code(error: &Value) -> i64 {
        error[0].as_i64().expect("an error code")
    }

    #[test]
    fn shares_are_judged() {
        let pool = easy_pool();
        let mut client = connect(&pool);
        let (_, extranonce1) = client.subscribe(None);
        let (difficulty, work) = client.authorize("alice.rig1");
        assert_eq!(difficulty, EASY);
        assert_eq!(work.job_id, pool.current_job());
        assert_eq!(work.branch.len(), 2, "3 transactions and the coinbase");
        assert_eq!(work.version, JOB_VERSION);
        assert_eq!(work.nbits, 0x1d00_ffff);

        let nonce = work.mine(&extranonce1, "00000001", work.version, true);
        let share = |nonce: u32| {
            json!([
                "alice.rig1",
                work.job_id,
                "00000001",
                format!("{:08x}", work.ntime),
                format!("{nonce:08x}")
            ])
        };
        // A difficulty raised after the job was sent does not apply to it.
        pool.set_difficulty(1.0);
        assert_eq!(client.expect("mining.set_difficulty"), json!([1.0]));
        let (result, error) = client.submit(share(nonce));
        assert_eq!((result, error), (json!(true), Value::Null));
        let accepted = pool.submissions().remove(0);
        assert_eq!(accepted.extranonce1, extranonce1);
        let ok = accepted.verdict.expect("accepted");
        assert_eq!(ok.share_difficulty, EASY);
        assert!(ok.hash_hex.starts_with("0000"), "{}", ok.hash_hex);
        assert!(!ok.block);

        let (result, error) = client.submit(share(nonce));
        assert_eq!((result, code(&error)), (Value::Null, 22));
        let low = work.mine(&extranonce1, "00000001", work.version, false);
        let (_, error) = client.submit(share(low));
        assert_eq!(error, json!([23, "Low difficulty share", null]));

        let early = json!([
            "alice.rig1",
            work.job_id,
            "00000001",
            format!("{:08x}", work.ntime - 1),
            "00000000"
        ]);
        assert_eq!(code(&client.submit(early).1), 20);
        assert_eq!(
            code(
                &client
                    .submit(json!([
                        "alice.rig1",
                        work.job_id,
                        "00000001",
                        format!("{:08x}", work.ntime),
                        "123"
                    ]))
                    .1
            ),
            20
        );
        assert_eq!(
            code(
                &client
                    .submit(json!([
                        "alice.rig1",
                        work.job_id,
                        "000001",
                        format!("{:08x}", work.ntime),
                        "00000000"
                    ]))
                    .1
            ),
            20
        );
        assert_eq!(
            code(
                &client
                    .submit(json!([
                        "alice.rig1",
                        "nope",
                        "00000001",
                        format!("{:08x}", work.ntime),
                        "00000000"
                    ]))
                    .1
            ),
            21
        );
        assert_eq!(
            code(
                &client
                    .submit(json!([
                        "bob",
                        work.job_id,
                        "00000001",
                        format!("{:08x}", work.ntime),
                        "00000000"
                    ]))
                    .1
            ),
            24
        );

        let next = pool.notify(true);
        let params = client.expect("mining.notify");
        assert_eq!(params[0], json!(next));
        let fresh = Work::from_notify(&params);
        assert!(fresh.clean);
        assert_ne!(fresh.prev_hash, work.prev_hash);
        let (_, error) = client.submit(share(nonce + 1));
        assert_eq!(error, json!([21, "Stale", null]));

        assert_eq!(pool.accepted(), 1);
        for reason in [
            "duplicate",
            "low-difficulty",
            "bad-ntime",
            "bad-nonce",
            "bad-extranonce2",
            "job-not-found",
            "unauthorized",
            "stale",
        ] {
            assert_eq!(pool.rejected(reason), 1, "{reason}");
        }
        assert_eq!(pool.connections(), 1);
    }

    #[test]
    fn sessions_resume_with_their_extranonce_and_jobs() {
        let pool = easy_pool();
        let mut first = connect(&pool);
        let (session, extranonce1) = first.subscribe(None);
        let (_, old) = first.authorize("w");
        // A job that does not clean keeps the old one valid.
        pool.notify(false);
        assert!(!Work::from_notify(&first.expect("mining.notify")).clean);
        pool.drop_connections();
        assert!(first.read().is_none(), "the pool closed the connection");
        assert_eq!(pool.connections(), 0);

        let mut second = connect(&pool);
        assert_eq!(
            second.subscribe(Some(&session)),
            (session.clone(), extranonce1.clone())
        );
        let (_, current) = second.authorize("w");
        assert_ne!(current.job_id, old.job_id);
        let nonce = old.mine(&extranonce1, "0000abcd", old.version, true);
        let share = json!([
            "w",
            old.job_id,
            "0000abcd",
            format!("{:08x}", old.ntime),
            format!("{nonce:08x}")
        ]);
        assert_eq!(second.submit(share.clone()).0, true);

        // Another session never saw that job, and has its own extranonce1.
        let mut other = connect(&pool);
        let (other_session, other_extranonce1) = other.subscribe(Some("unknown"));
        assert_ne!(other_session, session);
        assert_ne!(other_extranonce1, extranonce1);
        other.authorize("w");
        assert_eq!(other.submit(share).1, json!([21, "Job not found", null]));

        let subscribed: Vec<bool> = pool
            .events()
            .iter()
            .filter_map(|e| match e {
                PoolEvent::Subscribed { resumed, .. } => Some(*resumed),
                _ => None,
            })
            .collect();
        assert_eq!(subscribed, [false, true, false]);

        // A new extranonce1 is what the session resumes with from then on.
        pool.set_extranonce();
        let params = other.expect("mining.set_extranonce");
        assert_ne!(params[0], json!(other_extranonce1));
        assert_eq!(params[1], 4);
        drop(other);
        let mut again = connect(&pool);
        assert_eq!(
            again.subscribe(Some(&other_session)).1,
            params[0].as_str().expect("hex")
        );
    }

    #[test]
    fn version_rolling() {
        let pool = easy_pool();
        let mut client = connect(&pool);
        let (result, error) = client.request(
            "mining.configure",
            json!([["version-rolling", "minimum-difficulty"], {"version-rolling.mask": "ffffffff", "version-rolling.min-bit-count": 2}]),
        );
        assert!(error.is_null());
        assert_eq!(
            result,
            json!({"version-rolling": true, "version-rolling.mask": "1fffe000", "minimum-difficulty": false})
        );
        let (_, extranonce1) = client.subscribe(None);
        let (_, work) = client.authorize("w");
        let ntime = format!("{:08x}", work.ntime);

        let (_, error) = client.submit(json!([
            "w",
            work.job_id,
            "00000000",
            ntime,
            "00000000",
            "00001000"
        ]));
        assert_eq!(error, json!([20, "Invalid version bits", null]));
        let bits = 0x0000_6000;
        let nonce = work.mine(&extranonce1, "00000000", work.version | bits, true);
        let (result, _) = client.submit(json!([
            "w",
            work.job_id,
            "00000000",
            ntime,
            format!("{nonce:08x}"),
            format!("{bits:08x}")
        ]));
        assert_eq!(result, true);
        // Without the rolled bits it is another header.
        let (_, error) = client.submit(json!([
            "w",
            work.job_id,
            "00000000",
            ntime,
            format!("{nonce:08x}")
        ]));
        assert_ne!(code(&error), 22);

        // A narrower requested mask is intersected; a pool without one refuses rolling.
        let (result, _) = connect(&pool).request(
            "mining.configure",
            json!([["version-rolling"], {"version-rolling.mask": "ffff0000"}]),
        );
        assert_eq!(result["version-rolling.mask"], "1fff0000");
        let strict = TestPool::start(PoolConfig {
            version_rolling_mask: None,
            ..PoolConfig::default()
        });
        let mut client = connect(&strict);
        let (result, _) = client.request(
            "mining.configure",
            json!([["version-rolling"], {"version-rolling.mask": "1fffe000"}]),
        );
        assert_eq!(result, json!({"version-rolling": false}));
        client.subscribe(None);
        let (_, work) = client.authorize("w");
        let (_, error) = client.submit(json!([
            "w",
            work.job_id,
            "00000000",
            format!("{:08x}", work.ntime),
            "00000000",
            "00002000"
        ]));
        assert_eq!(code(&error), 20);
        assert_eq!(strict.rejected("bad-version"), 1);
    }

    #[test]
    fn blocks_are_flagged() {
        // Regtest's nbits: any share at difficulty EASY is also a block.
        let pool = TestPool::start(PoolConfig {
            difficulty: EASY,
            network_bits: 0x207f_ffff,
            transactions: 0,
            ..PoolConfig::default()
        });
        let mut client = connect(&pool);
        let (_, extranonce1) = client.subscribe(None);
        let (_, work) = client.authorize("w");
        assert!(
            work.branch.is_empty(),
            "the coinbase alone is the merkle root"
        );
        // The latest ntime the pool allows.
        let mut rolled = work.clone();
        rolled.ntime += 600;
        let nonce = rolled.mine(&extranonce1, "ffffffff", work.version, true);
        let share = json!([
            "w",
            work.job_id,
            "ffffffff",
            format!("{:08x}", rolled.ntime),
            format!("{nonce:08x}")
        ]);
        assert_eq!(client.submit(share).0, true);
        let ok = pool.submissions()[0].verdict.clone().expect("accepted");
        assert!(ok.block);
    }

    #[test]
    fn authorization_and_subscription_are_required() {
        let pool = TestPool::start(PoolConfig {
            workers: vec![("alice.rig1".into(), "secret".into())],
            ..PoolConfig::default()
        });
        let mut client = connect(&pool);
        let (_, error) = client.submit(json!([
            "alice.rig1",
            "1",
            "00000000",
            "00000000",
            "00000000"
        ]));
        assert_eq!(error, json!([25, "Not subscribed", null]));
        client.subscribe(None);
        let (result, error) = client.request("mining.authorize", json!(["alice.rig1", "wrong"]));
        assert!(result.is_null());
        assert_eq!(error, json!([24, "Unauthorized worker", null]));
        let (_, error) = client.submit(json!([
            "alice.rig1",
            pool.current_job(),
            "00000000",
            "00000000",
            "00000000"
        ]));
        assert_eq!(code(&error), 24);
        let (result, _) = client.request("mining.authorize", json!(["alice.rig1", "secret"]));
        assert_eq!(result, true);
        client.expect("mining.set_difficulty");
        client.expect("mining.notify");
        let (result, error) = client.request("mining.suggest_difficulty", json!([1]));
        assert!(result.is_null());
        assert_eq!(error, json!([20, "Unknown method", null]));
        assert_eq!(pool.rejected("not-subscribed"), 1);
        assert_eq!(pool.rejected("unauthorized"), 1);
    }

    #[test]
    fn hostile_clients_are_disconnected() {
        let pool = TestPool::start(PoolConfig::default());
        let mut client = connect(&pool);
        client.write_line("{not json");
        assert!(client.read().is_none());
        let mut client = connect(&pool);
        client.write_line(&"x".repeat(MAX_LINE + 10));
        assert!(client.read().is_none());
        let mut client = connect(&pool);
        let stream = client.stream.get_mut();
        stream
            .write_all(b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"\xff\"]}\n")
            .expect("writing to the pool");
        assert!(client.read().is_none());
        let malformed = pool
            .events()
            .iter()
            .filter(|e| matches!(e, PoolEvent::Malformed { .. }))
            .count();
        assert_eq!(malformed, 3);
    }

    #[test]
    fn pool_side_controls() {
        let pool = TestPool::start(PoolConfig {
            send_job_on_authorize: false,
            ..PoolConfig::default()
        });
        let mut client = connect(&pool);
        client.subscribe(None);
        let (result, _) = client.request("mining.authorize", json!(["w", "x"]));
        assert_eq!(result, true);
        let job = pool.notify(false);
        assert_eq!(client.expect("mining.set_difficulty"), json!([0.001]));
        assert_eq!(client.expect("mining.notify")[0], json!(job));

        pool.send_raw("{\"id\":null,\"method\":\"mining.whatever\",\"params\":[]}");
        assert_eq!(client.expect("mining.whatever"), json!([]));
        pool.reconnect("127.0.0.1", 3333, 5);
        assert_eq!(
            client.expect("client.reconnect"),
            json!(["127.0.0.1", 3333, 5])
        );

        pool.set_accepting(false);
        let mut refused = connect(&pool);
        assert!(refused.read().is_none());
        pool.set_accepting(true);

        let addr = pool.addr();
        drop(pool);
        assert!(
            client.read().is_none(),
            "dropping the pool closes its connections"
        );
        let pool = TestPool::start_on(addr, PoolConfig::default()).expect("rebinding the port");
        let mut client = connect(&pool);
        client.subscribe(None);
        assert_eq!(pool.connections(), 1);
    }

    #[test]
    fn tls() {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("a self-signed certificate");
        let cert = certified.cert.der().clone();
        let key =
            rustls_pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server TLS configuration");
        let pool = TestPool::start(PoolConfig {
            tls: Some(Arc::new(server)),
            ..PoolConfig::default()
        });
        assert!(pool.url().starts_with("stratum+ssl://127.0.0.1:"));

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("trusting the certificate");
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("a server name");
        let connection =
            rustls::ClientConnection::new(Arc::new(config), name).expect("a TLS client");
        let tcp = TcpStream::connect(pool.addr()).expect("connecting to the pool");
        tcp.set_read_timeout(Some(TIMEOUT))
            .expect("setting a read timeout");
        let mut client = Client::new(rustls::StreamOwned::new(connection, tcp));
        let (_, extranonce1) = client.subscribe(None);
        let (difficulty, work) = client.authorize("w");
        assert_eq!(difficulty, 0.001);
        // Surely above the target: the hash's top byte is not zero.
        let nonce = work.mine(&extranonce1, "00000000", work.version, false);
        let (_, error) = client.submit(json!([
            "w",
            work.job_id,
            "00000000",
            format!("{:08x}", work.ntime),
            format!("{nonce:08x}")
        ]));
        assert_eq!(code(&error), 23);
    }
}
