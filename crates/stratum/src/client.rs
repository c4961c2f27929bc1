//! The connection to the pool: one worker, as a farm proxy is.
//!
//! [`Upstream::spawn`] runs one task per MicroMiner with a `stratum` work source. It
//! connects to the first pool that answers (plain TCP or TLS), negotiates version rolling
//! where the pool offers it (`mining.configure`), subscribes (resuming the previous
//! session when it has one) and authorizes, then passes jobs, difficulty and extranonce
//! changes to the fleet ([`UpstreamSink::event`]) and submits the shares the fleet hands
//! it, reporting each answer ([`UpstreamSink::answers`]).
//!
//! Failures never end the task: a dropped or silent connection is reopened with jittered
//! exponential backoff; a pool that fails twice in a row gives way to the next one in the
//! list; while on a failover pool the primary is probed every `failback` interval, and
//! mining returns to it as soon as it completes a handshake. A malformed message is logged
//! (pool, problem, the start of the line) and skipped.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;

use super::fields::ProtocolError;
use super::job::PoolJob;
use super::message::{self, Incoming, MAX_LINE, RejectReason, Subscription};
use super::passwords::Passwords;
use micromine_resources::microminer::StratumPool;
use micromine_resources::pool_url::PoolUrl;
use micromine_store::ledger::ShareKey;

/// Submissions waiting for the task; beyond this the fleet answers them itself.
pub const SUBMISSION_QUEUE: usize = 4096;
/// The version-rolling mask asked for (BIP 320's general-purpose bits).
const VERSION_ROLLING_MASK: u32 = 0x1fff_e000;
/// Consecutive failures on one pool before the next one is tried.
const FAILURES_BEFORE_FAILOVER: u32 = 2;
/// A session that ends sooner counts as a failure: a pool that accepts connections and
/// drops them at once is as useless as one that refuses them.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// Replaced jobs remembered to answer their late shares locally.
const VOID_JOBS: usize = 256;
/// Consecutive malformed messages after which the connection is reopened.
const MALFORMED_LIMIT: u32 = 50;

/// The number of a pool session: which pool and which extranonce1, because work built
/// for one can be submitted exactly when both are the same, whether the session was
/// resumed after a dropped connection, after a failover, or by the next controller
/// process (the number is stored with the headers built for it).
pub fn session_key(pool: &str, extranonce1: &[u8]) -> u64 {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(pool.as_bytes());
    hasher.update([0]);
    hasher.update(extranonce1);
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// A pool session to ask for again (`mining.subscribe` with its id), e.g. the one the
/// previous controller process had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeHint {
    /// Which pool (0: primary).
    pub pool_index: usize,
    /// The pool's subscription id.
    pub session_id: String,
    /// Its [`session_key`].
    pub session: u64,
}

/// How long each step may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Opening TCP (and TLS).
    pub connect: Duration,
    /// An answer to a handshake request.
    pub response: Duration,
    /// An answer to `mining.submit`.
    pub submit: Duration,
    /// Silence from the pool after which the connection is presumed dead (pools send a
    /// job at least every minute or two).
    pub idle: Duration,
    /// TCP keepalive probes on the socket, so a dead peer is noticed by the kernel too.
    pub keepalive: Duration,
    /// First wait before reconnecting; doubled per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Longest wait before reconnecting.
    pub backoff_max: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            response: Duration::from_secs(10),
            submit: Duration::from_secs(30),
            idle: Duration::from_secs(300),
            keepalive: Duration::from_secs(60),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// What one upstream connects to.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The MicroMiner (`namespace/name`), for logs and the sink.
    pub miner: String,
    /// Its namespace, where password Secrets live.
    pub namespace: String,
    /// The primary pool first, then the failover pools.
    pub pools: Vec<StratumPool>,
    /// How often the primary is probed while on a failover pool.
    pub failback: Duration,
    /// Step timeouts.
    pub timeouts: Timeouts,
    /// A session to resume first.
    pub resume: Option<ResumeHint>,
}

/// A share to submit: what `mining.submit` needs, and whose it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// The share in the ledger.
    pub key: ShareKey,
    /// The device that found it.
    pub device: String,
    /// The pool session its header was built for.
    pub session: u64,
    /// The pool's job id.
    pub job_id: String,
    /// The controller's extranonce2 of its header.
    pub extranonce2: Vec<u8>,
    /// The header's time.
    pub ntime: u32,
    /// The nonce.
    pub nonce: u32,
    /// Rolled version bits, when version rolling is on.
    pub version_bits: Option<u32>,
    /// The pool difficulty it is credited at if accepted.
    pub difficulty: f64,
}

/// The pool's verdict on a submission (or why there was none).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolAnswer {
    /// What was submitted.
    pub submission: Submission,
    /// The pool it was for.
    pub pool: String,
    /// Accepted, or why not.
    pub verdict: Result<(), RejectReason>,
    /// The pool's message, for the log.
    pub message: String,
}

/// What the upstream tells the fleet.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamEvent {
    /// A handshake completed. A new `session` means work built for earlier sessions can
    /// no longer be submitted; a resumed one keeps its number.
    Connected {
        /// The session's [`session_key`].
        session: u64,
        /// The pool's subscription id, to resume the session with later.
        session_id: Option<String>,
        /// The pool's URL.
        pool: String,
        /// 0 for the primary, then the failover pools in order.
        pool_index: usize,
        /// The pool's extranonce1 for this session.
        extranonce1: Vec<u8>,
        /// Bytes of extranonce2 the controller fills in.
        extranonce2_size: usize,
        /// Version bits the controller may roll, if the pool agreed.
        version_mask: Option<u32>,
    },
    /// `mining.notify`.
    Job(PoolJob),
    /// `mining.set_difficulty`.
    Difficulty(f64),
    /// `mining.set_extranonce`: a new session on the same connection.
    Extranonce {
        /// The new session's [`session_key`].
        session: u64,
        /// The new extranonce1.
        extranonce1: Vec<u8>,
        /// The new extranonce2 size.
        extranonce2_size: usize,
    },
    /// `mining.set_version_mask`.
    VersionMask(u32),
    /// The connection ended or could not be made.
    Disconnected {
        /// Why, for status.
        error: String,
    },
}

/// Where the upstream reports to (the fleet, or a test).
pub trait UpstreamSink: Send + Sync + 'static {
    /// Connection and work changes, in the order they happened.
    fn event(&self, miner: &str, event: UpstreamEvent);
    /// Verdicts on submissions.
    fn answers(&self, miner: &str, answers: Vec<PoolAnswer>);
}

/// A running upstream. Dropping it stops the task.
#[derive(Debug)]
pub struct Upstream {
    submissions: mpsc::Sender<Submission>,
    cancel: CancellationToken,
}

impl Upstream {
    /// Starts the task. Must be called inside a tokio runtime.
    pub fn spawn(
        config: UpstreamConfig,
        passwords: Arc<dyn Passwords>,
        sink: Arc<dyn UpstreamSink>,
    ) -> Upstream {
        let (tx, rx) = mpsc::channel(SUBMISSION_QUEUE);
        let cancel = CancellationToken::new();
        let (session, resume) = match &config.resume {
            Some(hint) => (
                hint.session,
                HashMap::from([(hint.pool_index, hint.session_id.clone())]),
            ),
            None => (0, HashMap::new()),
        };
        let task = Task {
            config,
            passwords,
            sink,
            submissions: rx,
            cancel: cancel.clone(),
            tls: None,
            session,
            resume,
            retry: VecDeque::new(),
            jobs: Vec::new(),
            void_jobs: VecDeque::new(),
        };
        tokio::spawn(task.run());
        Upstream {
            submissions: tx,
            cancel,
        }
    }

    /// Queues a share for the pool; gives it back when the queue is full (the pool has
    /// been unreachable for long).
    #[allow(clippy::result_large_err)]
    pub fn submit(&self, submission: Submission) -> Result<(), Submission> {
        self.submissions.try_send(submission).map_err(|e| match e {
            mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s) => s,
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection after its handshake.
struct Connection {
    lines: FramedRead<ReadHalf<Box<dyn Io>>, LinesCodec>,
    writer: WriteHalf<Box<dyn Io>>,
    next_id: u64,
    pool_index: usize,
    url: PoolUrl,
    subscription: Subscription,
    version_mask: Option<u32>,
    /// Notifications that arrived during the handshake, in order.
    early: Vec<Incoming>,
}

type Handshake = Pin<Box<dyn Future<Output = Result<Connection, LinkError>> + Send>>;

/// Why a link to a pool could not be opened or broke: its text is what the log and the
/// MicroMiner's `status.pool.lastError` show, naming the pool and what it did or did not
/// do.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The MicroMiner lists no pool at this index.
    #[error("no pool configured")]
    NoPool,
    /// The pool's address does not parse.
    #[error("{0}")]
    Url(String),
    /// The pool's password could not be looked up.
    #[error("{0}")]
    Password(String),
    /// Neither the system nor `SSL_CERT_FILE` offers a CA to check a `stratum+ssl` pool.
    #[error("no CA certificates to check stratum+ssl pools with (set SSL_CERT_FILE): {0}")]
    NoCaCertificates(String),
    /// rustls refused the client configuration.
    #[error("TLS setup: {0}")]
    TlsSetup(rustls::Error),
    /// The TCP connection failed.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The pool.
        url: PoolUrl,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// Connecting (TCP and TLS) took longer than the connect timeout.
    #[error("connecting to {url}: no answer within {} s", timeout.as_secs())]
    ConnectTimeout {
        /// The pool.
        url: PoolUrl,
        /// The timeout.
        timeout: Duration,
    },
    /// The host cannot be a TLS server name.
    #[error("{url}: not a valid TLS server name ({reason})")]
    ServerName {
        /// The pool.
        url: PoolUrl,
        /// Why not.
        reason: String,
    },
    /// The TLS handshake failed (certificate, protocol).
    #[error("TLS with {url}: {source}")]
    Tls {
        /// The pool.
        url: PoolUrl,
        /// rustls's reason, as an I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A message could not be written.
    #[error("writing to the pool: {0}")]
    Write(#[source] std::io::Error),
    /// A message was not taken within the response timeout.
    #[error("the pool did not take a message within {} s", .0.as_secs())]
    WriteTimeout(Duration),
    /// The handshake's requests were not all answered in time.
    #[error("{url}: no answer to {waiting} within {} s", timeout.as_secs())]
    NoAnswer {
        /// The pool.
        url: PoolUrl,
        /// The requests still unanswered.
        waiting: String,
        /// The response timeout.
        timeout: Duration,
    },
    /// The pool hung up during the handshake.
    #[error("{url} closed the connection during the handshake")]
    Closed {
        /// The pool.
        url: PoolUrl,
    },
    /// A line could not be read (too long, I/O).
    #[error("{url}: {source}")]
    Read {
        /// The pool.
        url: PoolUrl,
        /// Why.
        #[source]
        source: LinesCodecError,
    },
    /// The pool answered `mining.subscribe` with an error.
    #[error("{url} refused mining.subscribe: {message} ({code})")]
    SubscribeRefused {
        /// The pool.
        url: PoolUrl,
        /// The pool's message.
        message: String,
        /// The pool's error code.
        code: i64,
    },
    /// An answer of the handshake broke the protocol.
    #[error("{url}: {source}")]
    Protocol {
        /// The pool.
        url: PoolUrl,
        /// What was wrong.
        #[source]
        source: ProtocolError,
    },
    /// The handshake ended without a subscription (the loop waits for one; kept so no
    /// path can go on without it).
    #[error("{url}: no subscription")]
    NoSubscription {
        /// The pool.
        url: PoolUrl,
    },
    /// The pool refused the worker's credentials.
    #[error("{url} refused mining.authorize for {user}: {why}")]
    AuthorizeRefused {
        /// The pool.
        url: PoolUrl,
        /// The worker name.
        user: String,
        /// The pool's reason, or what it answered.
        why: String,
    },
}

/// Why a session ended.
enum SessionEnd {
    Cancelled,
    Lost(String),
    Reconnect { url: PoolUrl, wait: Duration },
    Failback(Connection),
}

struct Task {
    config: UpstreamConfig,
    passwords: Arc<dyn Passwords>,
    sink: Arc<dyn UpstreamSink>,
    submissions: mpsc::Receiver<Submission>,
    cancel: CancellationToken,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The current session number.
    session: u64,
    /// Session ids to resume, by pool index.
    resume: HashMap<usize, String>,
    /// Submissions sent on a connection that died before answering.
    retry: VecDeque<Submission>,
    /// Jobs of this session since its last `clean_jobs`.
    jobs: Vec<String>,
    /// Jobs a `clean_jobs` replaced: shares of them are stale, and sending them would
    /// only add to the pool's count of bad shares (which some pools ban for).
    void_jobs: VecDeque<String>,
}

impl Task {
    async fn run(mut self) {
        self.serve().await;
        self.abandon();
    }

    /// What is still queued when the upstream stops (its MicroMiner changed or went) can
    /// never be submitted: each gets that verdict, so none is left waiting.
    fn abandon(&mut self) {
        let mut left: Vec<Submission> = self.retry.drain(..).collect();
        while let Ok(submission) = self.submissions.try_recv() {
            left.push(submission);
        }
        if left.is_empty() {
            return;
        }
        let answers = left
            .into_iter()
            .map(|submission| PoolAnswer {
                submission,
                pool: String::new(),
                verdict: Err(RejectReason::SessionLost),
                message: "the pool connection was stopped (its MicroMiner changed or was removed)"
                    .to_string(),
            })
            .collect();
        self.sink.answers(&self.config.miner, answers);
    }

    /// Connects, serves and reconnects until cancelled.
    async fn serve(&mut self) {
        let mut pool_index = 0usize;
        let mut failures = 0u32;
        let mut backoff = self.config.timeouts.backoff_initial;
        let mut redirect: Option<PoolUrl> = None;
        let mut ready: Option<Connection> = None;
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let connection = match ready.take() {
                Some(c) => Ok(c),
                None => {
                    let attempt = self.connect(pool_index, redirect.take());
                    tokio::select! {
                        () = self.cancel.cancelled() => return,
                        result = attempt => result,
                    }
                }
            };
            match connection {
                Ok(connection) => {
                    pool_index = connection.pool_index;
                    let pool = connection.url.to_string();
                    let started = Instant::now();
                    let end = self.session(connection).await;
                    if started.elapsed() >= HEALTHY_SESSION {
                        failures = 0;
                        backoff = self.config.timeouts.backoff_initial;
                    }
                    match end {
                        SessionEnd::Cancelled => return,
                        SessionEnd::Lost(error) => {
                            tracing::warn!(miner = %self.config.miner, pool, error, "pool connection lost; reconnecting");
                            self.sink.event(
                                &self.config.miner,
                                UpstreamEvent::Disconnected {
                                    error: error.to_string(),
                                },
                            );
                            if started.elapsed() < HEALTHY_SESSION {
                                failures += 1;
                                self.fail_over_after(&mut failures, &mut pool_index);
                            }
                        }
                        SessionEnd::Reconnect { url, wait } => {
                            // The pool's own request, not a failure.
                            failures = 0;
                            backoff = self.config.timeouts.backoff_initial;
                            tracing::info!(miner = %self.config.miner, pool, to = %url, wait_seconds = wait.as_secs(), "pool asked to reconnect");
                            self.sink.event(
                                &self.config.miner,
                                UpstreamEvent::Disconnected {
                                    error: format!("pool asked to reconnect to {url}"),
                                },
                            );
                            redirect = Some(url);
                            tokio::select! {
                                () = self.cancel.cancelled() => return,
                                () = tokio::time::sleep(wait) => {}
                            }
                            continue;
                        }
                        SessionEnd::Failback(primary) => {
                            tracing::info!(miner = %self.config.miner, from = pool, to = %primary.url, "primary pool answers again; going back to it");
                            failures = 0;
                            backoff = self.config.timeouts.backoff_initial;
                            ready = Some(primary);
                            continue;
                        }
                    }
                }
                Err(error) => {
                    let pool = self.pool_url(pool_index);
                    failures += 1;
                    tracing::warn!(miner = %self.config.miner, pool, %error, retry_in_ms = backoff.as_millis() as u64, "cannot connect to the pool");
                    self.sink.event(
                        &self.config.miner,
                        UpstreamEvent::Disconnected {
                            error: error.to_string(),
                        },
                    );
                    self.fail_over_after(&mut failures, &mut pool_index);
                }
            }
            let wait = jittered(backoff);
            backoff = (backoff * 2).min(self.config.timeouts.backoff_max);
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Moves on to the next pool once the current one has failed often enough.
    fn fail_over_after(&self, failures: &mut u32, pool_index: &mut usize) {
        if *failures < FAILURES_BEFORE_FAILOVER || self.config.pools.len() < 2 {
            return;
        }
        let from = self.pool_url(*pool_index);
        *failures = 0;
        *pool_index = (*pool_index + 1) % self.config.pools.len();
        tracing::warn!(miner = %self.config.miner, from, to = self.pool_url(*pool_index), "failing over to the next pool");
    }

    fn pool_url(&self, index: usize) -> String {
        self.config
            .pools
            .get(index)
            .map(|p| p.url.clone())
            .unwrap_or_default()
    }

    /// Opens and handshakes pool `index` (at `redirect` when the pool asked for another
    /// address).
    fn connect(&mut self, index: usize, redirect: Option<PoolUrl>) -> Handshake {
        let pool = self.config.pools.get(index).cloned();
        let passwords = Arc::clone(&self.passwords);
        let namespace = self.config.namespace.clone();
        let timeouts = self.config.timeouts;
        let resume = self.resume.get(&index).cloned();
        let tls = match self.tls_config() {
            Ok(tls) => tls,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        Box::pin(async move {
            let pool = pool.ok_or(LinkError::NoPool)?;
            let url = match redirect {
                Some(url) => url,
                None => PoolUrl::parse(&pool.url).map_err(LinkError::Url)?,
            };
            let password = passwords
                .password(&namespace, &pool)
                .await
                .map_err(LinkError::Password)?;
            let io = open(&url, &timeouts, tls).await?;
            handshake(io, index, url, &pool.user, &password, resume, &timeouts).await
        })
    }

    fn tls_config(&mut self) -> Result<Arc<rustls::ClientConfig>, LinkError> {
        if let Some(config) = &self.tls {
            return Ok(Arc::clone(config));
        }
        let config = Arc::new(tls_client_config()?);
        self.tls = Some(Arc::clone(&config));
        Ok(config)
    }

    async fn session(&mut self, mut connection: Connection) -> SessionEnd {
        let pool = connection.url.to_string();
        let index = connection.pool_index;
        let extranonce1 = connection.subscription.extranonce1.clone();
        let session = session_key(&pool, &extranonce1);
        let resumed = session == self.session;
        self.session = session;
        if !resumed {
            // Another session's job ids mean nothing here.
            self.jobs.clear();
            self.void_jobs.clear();
        }
        match &connection.subscription.session_id {
            Some(id) => {
                self.resume.insert(index, id.clone());
            }
            None => {
                self.resume.remove(&index);
            }
        }
        tracing::info!(
            miner = %self.config.miner,
            pool,
            extranonce1 = hex::encode(&extranonce1),
            extranonce2_size = connection.subscription.extranonce2_size,
            version_rolling = connection.version_mask.map(|m| format!("{m:08x}")),
            resumed,
            "connected to the pool"
        );
        self.sink.event(
            &self.config.miner,
            UpstreamEvent::Connected {
                session: self.session,
                session_id: connection.subscription.session_id.clone(),
                pool: pool.clone(),
                pool_index: index,
                extranonce1,
                extranonce2_size: connection.subscription.extranonce2_size,
                version_mask: connection.version_mask,
            },
        );
        let mut pending: HashMap<u64, (Submission, Instant)> = HashMap::new();
        let mut malformed = 0u32;
        for incoming in std::mem::take(&mut connection.early) {
            if let Some(end) = self.handle(&mut connection, incoming, &mut pending).await {
                return self.end(end, pending);
            }
        }
        // Shares whose connection died before the pool answered: submitted again on a
        // resumed session (the pool dedups), lost otherwise.
        let retry: Vec<Submission> = self.retry.drain(..).collect();
        for submission in retry {
            if let Err(e) = self.submit(&mut connection, submission, &mut pending).await {
                return self.end(SessionEnd::Lost(e.to_string()), pending);
            }
        }
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        let mut failback = tokio::time::interval_at(
            tokio::time::Instant::now() + self.config.failback,
            self.config.failback,
        );
        // The primary is probed on the side, so this connection keeps serving meanwhile.
        let (probe_done, mut probe_result) = mpsc::channel::<Result<Connection, LinkError>>(1);
        let mut probing = false;
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return self.end(SessionEnd::Cancelled, pending),
                line = connection.lines.next() => {
                    last_heard = Instant::now();
                    let line = match line {
                        None => return self.end(SessionEnd::Lost("the pool closed the connection".into()), pending),
                        Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                            return self.end(SessionEnd::Lost(format!("the pool sent a line longer than {MAX_LINE} bytes")), pending);
                        }
                        Some(Err(LinesCodecError::Io(e))) => {
                            return self.end(SessionEnd::Lost(format!("reading from the pool: {e}")), pending);
                        }
                        Some(Ok(line)) => line,
                    };
                    if line.trim().is_empty() {
                        continue;
                    }
                    match message::parse_line(&line) {
                        Ok(incoming) => {
                            malformed = 0;
                            if let Some(end) = self.handle(&mut connection, incoming, &mut pending).await {
                                return self.end(end, pending);
                            }
                        }
                        Err(error) => {
                            malformed += 1;
                            let start: String = line.chars().take(120).collect();
                            tracing::warn!(miner = %self.config.miner, pool, error = %error, line = start, "pool sent a malformed message; ignored");
                            if malformed >= MALFORMED_LIMIT {
                                return self.end(SessionEnd::Lost(format!("{MALFORMED_LIMIT} malformed messages in a row; last: {error}")), pending);
                            }
                        }
                    }
                }
                submission = self.submissions.recv() => {
                    let Some(submission) = submission else {
                        return self.end(SessionEnd::Cancelled, pending);
                    };
                    if let Err(e) = self.submit(&mut connection, submission, &mut pending).await {
                        return self.end(SessionEnd::Lost(e.to_string()), pending);
                    }
                }
                _ = sweep.tick() => {
                    let now = Instant::now();
                    if now.duration_since(last_heard) > self.config.timeouts.idle {
                        return self.end(SessionEnd::Lost(format!("no message from the pool for {} s", self.config.timeouts.idle.as_secs())), pending);
                    }
                    let late: Vec<u64> = pending
                        .iter()
                        .filter(|(_, (_, sent))| now.duration_since(*sent) > self.config.timeouts.submit)
                        .map(|(id, _)| *id)
                        .collect();
                    let answers: Vec<PoolAnswer> = late
                        .into_iter()
                        .filter_map(|id| pending.remove(&id))
                        .map(|(submission, _)| PoolAnswer {
                            submission,
                            pool: pool.clone(),
                            verdict: Err(RejectReason::Timeout),
                            message: format!("no answer within {} s", self.config.timeouts.submit.as_secs()),
                        })
                        .collect();
                    if !answers.is_empty() {
                        self.sink.answers(&self.config.miner, answers);
                    }
                }
                _ = failback.tick(), if index != 0 && !probing => {
                    probing = true;
                    let attempt = self.connect(0, None);
                    let done = probe_done.clone();
                    tokio::spawn(async move {
                        // The session may have ended meanwhile; then nobody wants it.
                        let _ = done.send(attempt.await).await;
                    });
                }
                Some(result) = probe_result.recv() => {
                    probing = false;
                    match result {
                        Ok(primary) if pending.is_empty() => return self.end(SessionEnd::Failback(primary), pending),
                        // Answers are still due here; the next probe switches.
                        Ok(_) => {}
                        Err(error) => tracing::debug!(miner = %self.config.miner, %error, "primary pool still unreachable"),
                    }
                }
            }
        }
    }

    /// Ends a session: what the pool never answered is kept for a resumed session.
    fn end(&mut self, end: SessionEnd, pending: HashMap<u64, (Submission, Instant)>) -> SessionEnd {
        let mut unanswered: Vec<(u64, Submission)> =
            pending.into_iter().map(|(id, (s, _))| (id, s)).collect();
        unanswered.sort_by_key(|(id, _)| *id);
        self.retry.extend(unanswered.into_iter().map(|(_, s)| s));
        end
    }

    async fn submit(
        &mut self,
        connection: &mut Connection,
        submission: Submission,
        pending: &mut HashMap<u64, (Submission, Instant)>,
    ) -> Result<(), LinkError> {
        if submission.session != self.session {
            self.sink.answers(
                &self.config.miner,
                vec![PoolAnswer {
                    submission,
                    pool: connection.url.to_string(),
                    verdict: Err(RejectReason::SessionLost),
                    message: "its pool session ended before it could be submitted".into(),
                }],
            );
            return Ok(());
        }
        if self.void_jobs.contains(&submission.job_id) {
            self.sink.answers(
                &self.config.miner,
                vec![PoolAnswer {
                    submission,
                    pool: connection.url.to_string(),
                    verdict: Err(RejectReason::JobReplaced),
                    message:
                        "the pool replaced its job (clean_jobs) before the share could be submitted"
                            .into(),
                }],
            );
            return Ok(());
        }
        let pool = self
            .config
            .pools
            .get(connection.pool_index)
            .map(|p| p.user.clone())
            .unwrap_or_default();
        let mut params = vec![
            json!(pool),
            json!(submission.job_id),
            json!(hex::encode(&submission.extranonce2)),
            json!(format!("{:08x}", submission.ntime)),
            json!(format!("{:08x}", submission.nonce)),
        ];
        if let Some(bits) = submission.version_bits {
            params.push(json!(format!("{bits:08x}")));
        }
        let id = connection.next_id;
        connection.next_id += 1;
        write_line(
            &mut connection.writer,
            &message::request(id, "mining.submit", Value::Array(params)),
            self.config.timeouts.response,
        )
        .await?;
        pending.insert(id, (submission, Instant::now()));
        Ok(())
    }

    /// Handles one message; `Some` ends the session.
    async fn handle(
        &mut self,
        connection: &mut Connection,
        incoming: Incoming,
        pending: &mut HashMap<u64, (Submission, Instant)>,
    ) -> Option<SessionEnd> {
        let miner = self.config.miner.clone();
        match incoming {
            Incoming::Response { id, result, error } => {
                let Some((submission, _)) = pending.remove(&id) else {
                    tracing::debug!(miner, id, "answer to no pending request; ignored");
                    return None;
                };
                let (verdict, message) = match (&result, error) {
                    (Value::Bool(true), None) => (Ok(()), String::new()),
                    (_, Some(error)) => (Err(error.reason()), error.message),
                    (_, None) => (
                        Err(RejectReason::Other),
                        format!("the pool answered {result}"),
                    ),
                };
                if let Err(reason) = verdict {
                    tracing::info!(miner, device = %submission.device, reason = reason.as_str(), message, "pool rejected a share");
                }
                self.sink.answers(
                    &miner,
                    vec![PoolAnswer {
                        submission,
                        pool: connection.url.to_string(),
                        verdict,
                        message,
                    }],
                );
            }
            Incoming::Notify(job) => {
                tracing::debug!(miner, job = %job.id, clean = job.clean, "pool job");
                if job.clean {
                    for old in self.jobs.drain(..).filter(|id| *id != job.id) {
                        if self.void_jobs.len() >= VOID_JOBS {
                            self.void_jobs.pop_front();
                        }
                        self.void_jobs.push_back(old);
                    }
                }
                if !self.jobs.contains(&job.id) && self.jobs.len() < VOID_JOBS {
                    self.jobs.push(job.id.clone());
                }
                self.sink.event(&miner, UpstreamEvent::Job(job));
            }
            Incoming::SetDifficulty(difficulty) => {
                tracing::info!(miner, difficulty, "pool difficulty");
                self.sink
                    .event(&miner, UpstreamEvent::Difficulty(difficulty));
            }
            Incoming::SetExtranonce {
                extranonce1,
                extranonce2_size,
            } => {
                self.session = session_key(&connection.url.to_string(), &extranonce1);
                tracing::info!(
                    miner,
                    extranonce1 = hex::encode(&extranonce1),
                    extranonce2_size,
                    "pool changed the extranonce"
                );
                self.sink.event(
                    &miner,
                    UpstreamEvent::Extranonce {
                        session: self.session,
                        extranonce1,
                        extranonce2_size,
                    },
                );
            }
            Incoming::SetVersionMask(mask) => {
                if connection.version_mask.is_some() {
                    connection.version_mask = Some(mask);
                    self.sink.event(&miner, UpstreamEvent::VersionMask(mask));
                }
            }
            Incoming::Reconnect {
                host,
                port,
                wait_seconds,
            } => {
                let url = PoolUrl {
                    tls: connection.url.tls,
                    host: host.unwrap_or_else(|| connection.url.host.clone()),
                    port: port.unwrap_or(connection.url.port),
                };
                return Some(SessionEnd::Reconnect {
                    url,
                    wait: Duration::from_secs(wait_seconds.min(600)),
                });
            }
            Incoming::GetVersion(id) => {
                let line = message::response(
                    &id,
                    json!(concat!("micromine/", env!("CARGO_PKG_VERSION"))),
                    Value::Null,
                );
                if let Err(e) =
                    write_line(&mut connection.writer, &line, self.config.timeouts.response).await
                {
                    return Some(SessionEnd::Lost(e.to_string()));
                }
            }
            Incoming::ShowMessage(text) => {
                tracing::info!(miner, pool = %connection.url, message = text, "message from the pool");
            }
            Incoming::Unknown { method, id } => {
                tracing::debug!(miner, method, "pool sent an unknown method; ignored");
                if let Some(id) = id {
                    let line = message::response(
                        &id,
                        Value::Null,
                        json!([20, "unsupported method", null]),
                    );
                    if let Err(e) =
                        write_line(&mut connection.writer, &line, self.config.timeouts.response)
                            .await
                    {
                        return Some(SessionEnd::Lost(e.to_string()));
                    }
                }
            }
        }
        None
    }
}

fn jittered(wait: Duration) -> Duration {
    use rand::TryRng;
    // ±25 %, so a fleet of controllers (or upstreams) restarted together does not
    // reconnect in lockstep.
    let random = rand::rngs::SysRng.try_next_u32().unwrap_or(u32::MAX / 2);
    let factor = 0.75 + 0.5 * f64::from(random) / f64::from(u32::MAX);
    wait.mul_f64(factor)
}

/// The TLS client configuration: the system's CAs (or `SSL_CERT_FILE`), ring only.
fn tls_client_config() -> Result<rustls::ClientConfig, LinkError> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        // A malformed system certificate is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(LinkError::NoCaCertificates(errors.join("; ")));
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(LinkError::TlsSetup)
}

async fn open(
    url: &PoolUrl,
    timeouts: &Timeouts,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Box<dyn Io>, LinkError> {
    let connect = async {
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|source| LinkError::Connect {
                url: url.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(timeouts.keepalive)
            .with_interval(timeouts.keepalive / 4);
        if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
            tracing::debug!(error = %e, "TCP keepalive not available");
        }
        if !url.tls {
            return Ok(Box::new(tcp) as Box<dyn Io>);
        }
        let name = match url.host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => {
                ServerName::try_from(url.host.clone()).map_err(|e| LinkError::ServerName {
                    url: url.clone(),
                    reason: e.to_string(),
                })?
            }
        };
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|source| LinkError::Tls {
                url: url.clone(),
                source,
            })?;
        Ok(Box::new(stream) as Box<dyn Io>)
    };
    tokio::time::timeout(timeouts.connect, connect)
        .await
        .map_err(|_| LinkError::ConnectTimeout {
            url: url.clone(),
            timeout: timeouts.connect,
        })?
}

async fn write_line(
    writer: &mut WriteHalf<Box<dyn Io>>,
    line: &str,
    timeout: Duration,
) -> Result<(), LinkError> {
    let write = async {
        writer.write_all(line.as_bytes()).await?;
        writer.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(LinkError::Write(e)),
        Err(_) => Err(LinkError::WriteTimeout(timeout)),
    }
}

/// `mining.configure`, `mining.subscribe` and `mining.authorize`, sent together and
/// answered in any order; notifications in between are kept for the session.
async fn handshake(
    io: Box<dyn Io>,
    pool_index: usize,
    url: PoolUrl,
    user: &str,
    password: &str,
    resume: Option<String>,
    timeouts: &Timeouts,
) -> Result<Connection, LinkError> {
    let (reader, mut writer) = tokio::io::split(io);
    let mut lines = FramedRead::new(reader, LinesCodec::new_with_max_length(MAX_LINE));
    const CONFIGURE: u64 = 1;
    const SUBSCRIBE: u64 = 2;
    const AUTHORIZE: u64 = 3;
    let agent = concat!("micromine/", env!("CARGO_PKG_VERSION"));
    let subscribe = match &resume {
        Some(session) => json!([agent, session]),
        None => json!([agent]),
    };
    let requests = [
        message::request(
            CONFIGURE,
            "mining.configure",
            json!([["version-rolling"], {"version-rolling.mask": format!("{VERSION_ROLLING_MASK:08x}"), "version-rolling.min-bit-count": 2}]),
        ),
        message::request(SUBSCRIBE, "mining.subscribe", subscribe),
        message::request(AUTHORIZE, "mining.authorize", json!([user, password])),
    ];
    write_line(&mut writer, &requests.concat(), timeouts.response).await?;
    let mut version_mask = None;
    let mut configured = false;
    let mut subscription = None;
    let mut authorized = false;
    let mut early = Vec::new();
    let deadline = tokio::time::Instant::now() + timeouts.response;
    while !(configured && subscription.is_some() && authorized) {
        let line = match tokio::time::timeout_at(deadline, lines.next()).await {
            Err(_) => {
                let waiting = [
                    (!configured).then_some("mining.configure"),
                    subscription.is_none().then_some("mining.subscribe"),
                    (!authorized).then_some("mining.authorize"),
                ];
                let waiting: Vec<&str> = waiting.into_iter().flatten().collect();
                return Err(LinkError::NoAnswer {
                    url,
                    waiting: waiting.join(", "),
                    timeout: timeouts.response,
                });
            }
            Ok(None) => return Err(LinkError::Closed { url }),
            Ok(Some(Err(source))) => return Err(LinkError::Read { url, source }),
            Ok(Some(Ok(line))) => line,
        };
        if line.trim().is_empty() {
            continue;
        }
        match message::parse_line(&line) {
            Ok(Incoming::Response {
                id: CONFIGURE,
                result,
                ..
            }) => {
                // Pools without BIP 310 answer with an error: no version rolling.
                configured = true;
                version_mask = message::version_rolling_mask(&result)
                    .map(|mask| mask & VERSION_ROLLING_MASK)
                    .filter(|mask| *mask != 0);
            }
            Ok(Incoming::Response {
                id: SUBSCRIBE,
                result,
                error,
            }) => {
                if let Some(error) = error {
                    return Err(LinkError::SubscribeRefused {
                        url,
                        message: error.message,
                        code: error.code,
                    });
                }
                subscription = Some(Subscription::from_result(&result).map_err(|source| {
                    LinkError::Protocol {
                        url: url.clone(),
                        source,
                    }
                })?);
            }
            Ok(Incoming::Response {
                id: AUTHORIZE,
                result,
                error,
            }) => {
                if result != Value::Bool(true) {
                    let why = error.map_or_else(|| format!("answered {result}"), |e| e.message);
                    return Err(LinkError::AuthorizeRefused {
                        url,
                        user: user.to_string(),
                        why,
                    });
                }
                authorized = true;
            }
            Ok(Incoming::Response { id, .. }) => {
                tracing::debug!(pool = %url, id, "answer to no handshake request; ignored");
            }
            Ok(incoming) => early.push(incoming),
            Err(error) => {
                let start: String = line.chars().take(120).collect();
                tracing::warn!(pool = %url, error = %error, line = start, "pool sent a malformed message; ignored");
            }
        }
    }
    let subscription = subscription.ok_or(LinkError::NoSubscription { url: url.clone() })?;
    // mining.set_version_mask may arrive before the configure answer; the answer wins.
    Ok(Connection {
        lines,
        writer,
        next_id: AUTHORIZE + 1,
        pool_index,
        url,
        subscription,
        version_mask,
        early,
    })
}

#[cfg(test)]
mod tests;
