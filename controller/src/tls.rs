//! The controller's TLS listener for tonic, and reading a device's identity off a request.
//!
//! Handshakes run here instead of in tonic's own TLS support so that the controller decides
//! how many may be in flight, how long each may take, and that a failed one never reaches
//! the gRPC server. The crypto provider is always ring, named explicitly, so no other
//! provider can be picked up from the dependency tree's features.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::RwLock;

use micromine_proto::ENROLL_ALPN;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::pki::{ServerIdentity, validate_device_name};
use crate::revocation::Revocations;

/// A handshake that has not finished by then is a slow client or an attack; either way the
/// permit it holds is worth more to the next client.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error that is not about one connection (e.g. EMFILE), so the loop
/// does not spin while the process is out of descriptors.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA certificate could not be used as a trust anchor.
    #[error("the fleet CA certificate cannot be a trust anchor: {0}")]
    TrustAnchor(#[source] rustls::Error),
    /// The client certificate verifier could not be built from the CA.
    #[error("building the client certificate verifier failed: {0}")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
    /// The server certificate, its key, or the protocol versions were rejected by rustls.
    #[error("the server certificate or key was rejected: {0}")]
    ServerCertificate(#[source] rustls::Error),
}

/// The controller's TLS: two rustls configurations chosen per connection from the
/// ClientHello, and a serving certificate that can be swapped while the server runs.
///
/// - A client offering [`ENROLL_ALPN`] gets a handshake without client authentication:
///   it has no certificate yet and can only call `Enrollment.Enroll` (every `Fleet` handler
///   requires a verified certificate, see [`peer_device_name`]).
/// - Every other client must present a certificate issued by the fleet CA, not revoked, or
///   the handshake fails: no session ever starts without one.
///
/// Both use the ring provider, TLS 1.2 and 1.3, ALPN "h2".
pub struct ServerTls {
    fleet: Arc<ServerConfig>,
    enroll: Arc<ServerConfig>,
    certificate: Arc<RotatingCertificate>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field(
                "serving_not_after_unix_ms",
                &self.serving_not_after_unix_ms(),
            )
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Builds both configurations around `identity`, trusting the CAs in `trust_anchors`
    /// (more than one while a CA rotation is under way) for client certificates and
    /// refusing those `revocations` names.
    pub fn new(
        trust_anchors: &[CertificateDer<'static>],
        identity: ServerIdentity,
        revocations: Arc<Revocations>,
    ) -> Result<ServerTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certificate = Arc::new(RotatingCertificate::new(&provider, identity)?);
        let mut roots = RootCertStore::empty();
        for anchor in trust_anchors {
            roots.add(anchor.clone()).map_err(TlsError::TrustAnchor)?;
        }
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(TlsError::Verifier)?;
        let verifier = Arc::new(RevocationCheckingVerifier {
            inner: webpki,
            revocations,
        });
        let builder = || {
            ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(TlsError::ServerCertificate)
        };
        let mut fleet = builder()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(certificate.clone());
        fleet.alpn_protocols = vec![b"h2".to_vec()];
        // A resumed session skips client certificate verification, so a device revoked
        // after its first handshake could come back on a cached session: no resumption.
        fleet.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        fleet.send_tls13_tickets = 0;
        let mut enroll = builder()?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        enroll.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerTls {
            fleet: Arc::new(fleet),
            enroll: Arc::new(enroll),
            certificate,
        })
    }

    /// Serves `identity` from the next handshake on; open connections keep theirs.
    pub fn rotate(&self, identity: ServerIdentity) -> Result<(), TlsError> {
        let provider = rustls::crypto::ring::default_provider();
        self.certificate.replace(&provider, identity)
    }

    /// When the serving certificate in use expires, Unix ms.
    pub fn serving_not_after_unix_ms(&self) -> i64 {
        self.certificate.not_after_unix_ms()
    }

    fn config_for(&self, hello: &rustls::server::ClientHello<'_>) -> Arc<ServerConfig> {
        let enrolling = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ENROLL_ALPN));
        if enrolling {
            self.enroll.clone()
        } else {
            self.fleet.clone()
        }
    }
}

/// The serving certificate, swappable without a restart.
#[derive(Debug)]
struct RotatingCertificate {
    current: RwLock<(Arc<CertifiedKey>, i64)>,
}

impl RotatingCertificate {
    fn new(provider: &CryptoProvider, identity: ServerIdentity) -> Result<Self, TlsError> {
        Ok(RotatingCertificate {
            current: RwLock::new(certified(provider, identity)?),
        })
    }

    fn replace(&self, provider: &CryptoProvider, identity: ServerIdentity) -> Result<(), TlsError> {
        let next = certified(provider, identity)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    fn not_after_unix_ms(&self) -> i64 {
        self.current.read().unwrap_or_else(|p| p.into_inner()).1
    }
}

fn certified(
    provider: &CryptoProvider,
    identity: ServerIdentity,
) -> Result<(Arc<CertifiedKey>, i64), TlsError> {
    let key = provider
        .key_provider
        .load_private_key(identity.key)
        .map_err(TlsError::ServerCertificate)?;
    Ok((
        Arc::new(CertifiedKey::new(identity.cert_chain, key)),
        identity.not_after_unix_ms,
    ))
}

impl ResolvesServerCert for RotatingCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .clone(),
        )
    }
}

/// WebPKI verification against the fleet CA, then the revocation list: a revoked device's
/// certificate fails the handshake like one from a stranger.
#[derive(Debug)]
struct RevocationCheckingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl ClientCertVerifier for RevocationCheckingVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let (name, issued) = certificate_name_and_start(end_entity).ok_or(
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding),
        )?;
        if self.revocations.refuses(&name, issued) {
            tracing::info!(device = %name, "refused a revoked certificate");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// The device name and the issue time of a certificate this controller signed (its
/// `notBefore` is backdated by [`crate::pki::CLOCK_SKEW`]).
fn certificate_name_and_start(der: &[u8]) -> Option<(String, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    let not_before = cert.validity().not_before.timestamp().checked_mul(1000)?;
    Some((cn, not_before + crate::pki::CLOCK_SKEW.as_millis() as i64))
}

/// Turns a `TcpListener` into the incoming stream for
/// `tonic::transport::Server::serve_with_incoming_shutdown`.
///
/// Accepts TCP and runs TLS handshakes concurrently on their own tasks, each with a 10 s
/// timeout and at most `max_handshakes` (at least 1) in flight. When all permits are taken,
/// accepting pauses and new connections wait in the kernel's backlog, so a flood of slow
/// handshakes costs bounded memory and clears within one timeout. Only completed
/// handshakes are yielded; failed or timed-out ones are logged at debug with the peer
/// address and dropped. The stream never yields an `Err` and never ends by itself: tonic
/// 0.14 skips `Err` items, but older tonic versions ended the server on one, and a bad
/// client must never be able to do that. Accept errors (e.g. EMFILE) are logged and retried
/// after a short pause.
///
/// Must be called within a Tokio runtime. Dropping the stream (tonic does so on shutdown)
/// stops the accept loop and closes the listening socket.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    max_handshakes: usize,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
    tls_incoming_with_timeout(listener, tls, max_handshakes, HANDSHAKE_TIMEOUT)
}

fn tls_incoming_with_timeout(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    max_handshakes: usize,
    handshake_timeout: Duration,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
    let max_handshakes = max_handshakes.max(1);
    let (tx, rx) = mpsc::channel(max_handshakes);
    tokio::spawn(accept_loop(
        listener,
        tls,
        Arc::new(Semaphore::new(max_handshakes)),
        handshake_timeout,
        tx,
    ));
    ReceiverStream::new(rx).map(Ok)
}

/// Reads the ClientHello, picks the configuration for it, and completes the handshake.
async fn handshake(tls: &ServerTls, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
    let config = tls.config_for(&start.client_hello());
    start.into_stream(config).await
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    permits: Arc<Semaphore>,
    handshake_timeout: Duration,
    tx: mpsc::Sender<TlsStream<TcpStream>>,
) {
    loop {
        let permit = tokio::select! {
            () = tx.closed() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // Never closed while this loop holds it.
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if is_per_connection_error(&error) => {
                tracing::debug!(%error, "connection failed before it was accepted");
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "accepting connections failed; retrying");
                tokio::select! {
                    () = tx.closed() => return,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        // Session traffic is small messages that want to leave now, not be coalesced.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, %error, "could not disable Nagle's algorithm");
        }
        let tls = tls.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(handshake_timeout, handshake(&tls, tcp)).await;
            drop(permit);
            match outcome {
                Ok(Ok(stream)) => {
                    // The receiver is gone only when the server is shutting down.
                    let _ = tx.send(stream).await;
                }
                Ok(Err(error)) => log_failed_handshake(peer, &error),
                Err(_) => {
                    tracing::debug!(%peer, timeout = ?handshake_timeout, "TLS handshake timed out")
                }
            }
        });
    }
}

fn log_failed_handshake(peer: SocketAddr, error: &io::Error) {
    tracing::debug!(%peer, %error, "TLS handshake failed");
}

/// Errors that concern one connection that died in the backlog, not the listener.
fn is_per_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// The device a request acts for: the CN of the verified client certificate. `None` when
/// the peer sent no certificate (enrollment), or the request did not come through
/// [`tls_incoming`]. rustls has already verified the chain against the fleet CA during the
/// handshake, so the CN can be trusted; it is still checked against the device-name rules
/// so nothing odd reaches object names or logs.
pub fn peer_device_name<T>(request: &tonic::Request<T>) -> Option<String> {
    let certs = request.extensions().get::<PeerInfo>()?.peer_certs()?;
    let name = certificate_common_name(certs.first()?)?;
    validate_device_name(&name).ok()?;
    Some(name)
}

/// The remote address of a request that came through [`tls_incoming`]. Use this rather
/// than `Request::remote_addr`, which in tonic 0.14 looks only for plain-TCP connection info
/// unless tonic's own TLS features are on (they are not: this crate brings its own rustls).
pub fn peer_addr<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<PeerInfo>()?
        .get_ref()
        .remote_addr()
}

/// What tonic stores in each request's extensions for a connection from [`tls_incoming`]:
/// `TlsConnectInfo<TcpConnectInfo>`. tonic re-exports that type only with its own TLS
/// features, which would also make its channel refuse `https://` URIs with a custom
/// connector, so it is named through the `Connected` impl instead.
type PeerInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

/// The first common name in a certificate's subject, if it parses.
pub fn certificate_common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// When a certificate expires, Unix milliseconds, if it parses. Shown as the
/// `EdgeDevice`'s `certificateNotAfter` and used to decide when to renew.
pub fn certificate_not_after_unix_ms(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.validity().not_after.timestamp().checked_mul(1000)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::pki::Pki;
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn setup() -> (tempfile::TempDir, Pki, Arc<ServerTls>) {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path()).unwrap();
        let tls = ServerTls::new(
            &pki.trust_anchors(),
            pki.issue_server_identity(&[]).unwrap(),
            Arc::default(),
        )
        .unwrap();
        (dir, pki, Arc::new(tls))
    }

    fn client_config(pki: &Pki) -> Arc<rustls::ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(pki.ca_der().to_vec()))
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut config = config;
        config.alpn_protocols = vec![b"h2".to_vec(), ENROLL_ALPN.to_vec()];
        Arc::new(config)
    }

    async fn handshake(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> io::Result<()> {
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"ping").await?;
        tls.flush().await
    }

    #[test]
    fn certificate_helpers_read_cn_and_expiry() {
        let (_dir, pki, _) = setup();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let issued = pki
            .sign_device_csr(csr.der(), "gw-7", Duration::from_secs(600))
            .unwrap();
        let der = CertificateDer::from_pem_slice(issued.certificate_pem.as_bytes()).unwrap();
        assert_eq!(certificate_common_name(&der).as_deref(), Some("gw-7"));
        assert_eq!(
            certificate_not_after_unix_ms(&der),
            Some(issued.not_after_unix_ms)
        );
        assert_eq!(certificate_common_name(b"garbage"), None);
        assert_eq!(certificate_not_after_unix_ms(&[]), None);
    }

    #[test]
    fn peer_device_name_is_none_without_tls_info() {
        assert_eq!(peer_device_name(&tonic::Request::new(())), None);
    }

    #[tokio::test]
    async fn stalled_handshakes_time_out_and_free_their_permits() {
        let (_dir, pki, config) = setup();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(tls_incoming_with_timeout(
            listener,
            config,
            2,
            Duration::from_millis(300),
        ));
        // Two silent clients take both permits.
        let _idle_a = TcpStream::connect(addr).await.unwrap();
        let _idle_b = TcpStream::connect(addr).await.unwrap();
        let client = tokio::spawn(handshake(addr, client_config(&pki)));
        let mut stream = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .expect("a good client got through once the stalled ones timed out")
            .unwrap()
            .unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        client.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn garbage_never_reaches_the_stream() {
        let (_dir, pki, config) = setup();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(tls_incoming(listener, config, 4));
        for _ in 0..10 {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
        }
        handshake(addr, client_config(&pki)).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .unwrap()
            .unwrap();
        assert!(first.is_ok());
    }

    #[tokio::test]
    async fn dropping_the_stream_closes_the_listener() {
        let (_dir, _pki, config) = setup();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tls_incoming(listener, config, 4);
        drop(incoming);
        let refused = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if TcpStream::connect(addr).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            refused.is_ok(),
            "listener still accepting after the stream was dropped"
        );
    }

    fn client_with(
        pki: &Pki,
        identity: Option<(&str, &str)>,
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(pki.ca_der().to_vec()))
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    fn device_cert(pki: &Pki, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let issued = pki
            .sign_device_csr(csr.der(), name, Duration::from_secs(600))
            .unwrap();
        (issued.certificate_pem, key.serialize_pem())
    }

    /// Connects, pushes a byte through (TLS 1.3 reports a refused client certificate only
    /// once the server answers), and returns the server's leaf certificate.
    async fn talk(
        addr: SocketAddr,
        incoming: &mut (impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Unpin),
        config: Arc<rustls::ClientConfig>,
    ) -> io::Result<Vec<u8>> {
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        tls.write_all(b"p").await?;
        tls.flush().await?;
        let mut server = match tokio::time::timeout(Duration::from_secs(2), incoming.next()).await {
            Ok(Some(Ok(stream))) => stream,
            _ => {
                return Err(io::Error::other(
                    "server side never completed the handshake",
                ));
            }
        };
        let mut byte = [0u8; 1];
        server.read_exact(&mut byte).await?;
        server.write_all(b"q").await?;
        server.flush().await?;
        tls.read_exact(&mut byte).await?;
        Ok(leaf)
    }

    #[tokio::test]
    async fn only_enrolling_clients_may_come_without_a_certificate() {
        let (_dir, pki, tls) = setup();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(tls_incoming(listener, tls, 4));
        let h2: &[u8] = b"h2";
        let anonymous = client_with(&pki, None, &[h2]);
        assert!(
            talk(addr, &mut incoming, anonymous).await.is_err(),
            "no certificate, no marker: refused"
        );
        let enrolling = client_with(&pki, None, &[h2, ENROLL_ALPN]);
        talk(addr, &mut incoming, enrolling).await.unwrap();
        let (cert, key) = device_cert(&pki, "gw-1");
        let device = client_with(&pki, Some((&cert, &key)), &[h2]);
        talk(addr, &mut incoming, device).await.unwrap();
    }

    #[tokio::test]
    async fn revoked_certificates_fail_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path()).unwrap();
        let revocations = Arc::new(Revocations::default());
        let tls = Arc::new(
            ServerTls::new(
                &pki.trust_anchors(),
                pki.issue_server_identity(&[]).unwrap(),
                revocations.clone(),
            )
            .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(tls_incoming(listener, tls, 4));
        let (cert, key) = device_cert(&pki, "gw-1");
        let h2: &[u8] = b"h2";
        // One client config for both connections: a cached session must not let a revoked
        // device skip the certificate check.
        let device = client_with(&pki, Some((&cert, &key)), &[h2]);
        talk(addr, &mut incoming, device.clone()).await.unwrap();
        let now = crate::tokens::now_unix_ms();
        revocations.replace(
            [(
                "gw-1".to_string(),
                crate::revocation::Revocation {
                    revoked_at_unix_ms: now,
                    blocked: false,
                },
            )]
            .into(),
        );
        assert!(talk(addr, &mut incoming, device).await.is_err());
        // Other devices, and a certificate issued after the revocation, are fine.
        let (other, other_key) = device_cert(&pki, "gw-2");
        talk(
            addr,
            &mut incoming,
            client_with(&pki, Some((&other, &other_key)), &[h2]),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (fresh, fresh_key) = device_cert(&pki, "gw-1");
        talk(
            addr,
            &mut incoming,
            client_with(&pki, Some((&fresh, &fresh_key)), &[h2]),
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn the_serving_certificate_rotates_without_a_restart() {
        let (_dir, pki, tls) = setup();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(tls_incoming(listener, tls.clone(), 4));
        let h2: &[u8] = b"h2";
        // Fresh client configs: a resumed session would not show the server's certificate.
        let before = talk(
            addr,
            &mut incoming,
            client_with(&pki, None, &[h2, ENROLL_ALPN]),
        )
        .await
        .unwrap();
        tls.rotate(
            pki.issue_server_identity(&["controller.example".to_string()])
                .unwrap(),
        )
        .unwrap();
        let after = talk(
            addr,
            &mut incoming,
            client_with(&pki, None, &[h2, ENROLL_ALPN]),
        )
        .await
        .unwrap();
        assert_ne!(before, after, "new connections see the new certificate");
        let (_, parsed) = x509_parser::parse_x509_certificate(&after).unwrap();
        let sans = format!(
            "{:?}",
            parsed.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(sans.contains("controller.example"), "{sans}");
    }
}
