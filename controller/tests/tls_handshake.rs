//! TLS between agents and the controller, end to end: a real tonic server on 127.0.0.1:0
//! served through `tls::tls_incoming`, and clients built with the agent's own TLS code.
//!
//! The test service is a small `Enrollment` implementation on top of the real `Pki` and
//! `TokenStore`. Called with an empty token it answers with the caller's device name as
//! seen by `tls::peer_device_name`, which is how these tests observe identities.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use micromine_agent::identity::{self, DeviceIdentity, IdentityError};
use micromine_agent::tls::{self as agent_tls, TlsError, TrustAnchor};
use micromine_controller::pki::Pki;
use micromine_controller::tls;
use micromine_controller::tokens::{TokenSpec, TokenStore, now_unix_ms};
use micromine_proto::pb::enrollment_client::EnrollmentClient;
use micromine_proto::pb::enrollment_server::{Enrollment, EnrollmentServer};
use micromine_proto::pb::{EnrollRequest, EnrollResponse};
use micromine_proto::token::BootstrapToken;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

struct TestEnrollment {
    pki: Arc<Pki>,
    tokens: TokenStore,
}

#[tonic::async_trait]
impl Enrollment for TestEnrollment {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let peer = tls::peer_device_name(&request);
        assert!(tls::peer_addr(&request).is_some(), "no peer address");
        let request = request.into_inner();
        if request.token.is_empty() {
            return Ok(Response::new(EnrollResponse {
                device_name: peer.unwrap_or_default(),
                ..EnrollResponse::default()
            }));
        }
        let invalid = || Status::unauthenticated("invalid or expired token");
        let token: BootstrapToken = request.token.parse().map_err(|_| invalid())?;
        self.tokens
            .redeem(&token, self.pki.ca_fingerprint(), now_unix_ms())
            .map_err(|_| invalid())?;
        let issued = self
            .pki
            .sign_device_csr(
                &request.csr_der,
                &request.device_name,
                Duration::from_secs(3600),
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(EnrollResponse {
            certificate_pem: issued.certificate_pem,
            ca_bundle_pem: self.pki.ca_pem().to_string(),
            not_after_unix_ms: issued.not_after_unix_ms,
            device_name: request.device_name,
        }))
    }
}

struct Controller {
    _dir: tempfile::TempDir,
    pki: Arc<Pki>,
    tokens_dir: std::path::PathBuf,
    url: String,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Controller {
    async fn start() -> Controller {
        let dir = tempfile::tempdir().unwrap();
        let pki = Arc::new(Pki::load_or_create(&dir.path().join("pki")).unwrap());
        let tokens_dir = dir.path().join("tokens");
        let tokens = TokenStore::open(&tokens_dir).unwrap();
        let config = Arc::new(
            tls::ServerTls::new(
                &pki.trust_anchors(),
                pki.issue_server_identity(&[]).unwrap(),
                Arc::default(),
            )
            .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let service = EnrollmentServer::new(TestEnrollment {
            pki: pki.clone(),
            tokens,
        });
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tls::tls_incoming(listener, config, 64),
                    async move {
                        let _ = stopped.await;
                    },
                ),
        );
        Controller {
            _dir: dir,
            pki,
            tokens_dir,
            url: format!("https://127.0.0.1:{}", addr.port()),
            addr,
            shutdown: Some(shutdown),
            server,
        }
    }

    fn ca_pem(&self) -> String {
        self.pki.ca_pem().to_string()
    }

    /// A device certificate from this controller's CA, as the agent would hold it.
    fn device(&self, name: &str) -> (String, String) {
        device_from(&self.pki, name)
    }

    fn token(&self, uses: u32) -> BootstrapToken {
        let store = TokenStore::open(&self.tokens_dir).unwrap();
        let spec = TokenSpec {
            uses,
            ..TokenSpec::default()
        };
        store.create(&spec, self.pki.ca_fingerprint()).unwrap().0
    }

    async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            shutdown.send(()).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.server)
            .await
            .expect("server stops on shutdown")
            .unwrap()
            .unwrap();
    }
}

fn device_from(pki: &Pki, name: &str) -> (String, String) {
    let (key_pem, csr) = identity::generate_key_and_csr(name).unwrap();
    let issued = pki
        .sign_device_csr(&csr, name, Duration::from_secs(600))
        .unwrap();
    (issued.certificate_pem, key_pem)
}

/// Connects with `config` and asks the server who we are.
async fn whoami(url: &str, config: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let channel = agent_tls::connect(url, config)
        .await
        .map_err(|e| error_chain(&e))?;
    let mut client = EnrollmentClient::new(channel);
    let response = client
        .enroll(EnrollRequest::default())
        .await
        .map_err(|status| format!("{status:?}"))?;
    Ok(response.into_inner().device_name)
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[tokio::test]
async fn a_client_with_a_fleet_certificate_is_seen_with_its_device_name() {
    let controller = Controller::start().await;
    let (cert, key) = controller.device("gw-0042");
    let config = agent_tls::client_config(
        &TrustAnchor::CaPem(controller.ca_pem()),
        Some((&cert, &key)),
    )
    .unwrap();
    assert_eq!(whoami(&controller.url, config).await.unwrap(), "gw-0042");
    controller.stop().await;
}

#[tokio::test]
async fn a_client_without_a_certificate_connects_but_has_no_device_name() {
    let controller = Controller::start().await;
    let config = agent_tls::client_config(&TrustAnchor::CaPem(controller.ca_pem()), None).unwrap();
    assert_eq!(whoami(&controller.url, config).await.unwrap(), "");
    controller.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let controller = Controller::start().await;
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = Pki::load_or_create(other_dir.path()).unwrap();
    let (cert, key) = device_from(&other_ca, "gw-0042");
    let config = agent_tls::client_config(
        &TrustAnchor::CaPem(controller.ca_pem()),
        Some((&cert, &key)),
    )
    .unwrap();
    let err = whoami(&controller.url, config).await.unwrap_err();
    // With TLS 1.3 the client finishes its half of the handshake before the server has
    // judged its certificate, so the refusal arrives as an alert on the first read.
    // (Both CAs are called "micromine fleet CA", so the server finds a name match whose
    // signature does not verify and answers with decrypt_error rather than unknown_ca.)
    assert!(err.contains("received fatal alert"), "{err}");
    controller.stop().await;
}

#[tokio::test]
async fn plaintext_attempts_fail() {
    let controller = Controller::start().await;
    // The agent refuses to even try.
    let config = agent_tls::client_config(&TrustAnchor::CaPem(controller.ca_pem()), None).unwrap();
    let url = format!("http://127.0.0.1:{}", controller.addr.port());
    let err = agent_tls::connect(&url, config).await.unwrap_err();
    assert!(matches!(err, TlsError::InvalidUrl { .. }), "{err}");

    // And a plaintext HTTP/2 client gets nowhere with the server.
    let attempt = async {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await?;
        EnrollmentClient::new(channel)
            .enroll(EnrollRequest::default())
            .await
            .map_err(Into::into)
    };
    let result: Result<_, Box<dyn std::error::Error>> =
        tokio::time::timeout(Duration::from_secs(15), attempt)
            .await
            .unwrap();
    assert!(result.is_err(), "a plaintext call succeeded");
    controller.stop().await;
}

#[tokio::test]
async fn trusting_the_ca_by_fingerprint_works_and_a_wrong_fingerprint_fails() {
    let controller = Controller::start().await;
    let config = agent_tls::client_config(
        &TrustAnchor::Fingerprint(controller.pki.ca_fingerprint()),
        None,
    )
    .unwrap();
    assert_eq!(whoami(&controller.url, config).await.unwrap(), "");

    let mut wrong = controller.pki.ca_fingerprint();
    wrong[0] ^= 0xff;
    let config = agent_tls::client_config(&TrustAnchor::Fingerprint(wrong), None).unwrap();
    let err = whoami(&controller.url, config).await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");

    // A fingerprint plus a client certificate: mTLS as well.
    let (cert, key) = controller.device("gw-fp");
    let config = agent_tls::client_config(
        &TrustAnchor::Fingerprint(controller.pki.ca_fingerprint()),
        Some((&cert, &key)),
    )
    .unwrap();
    assert_eq!(whoami(&controller.url, config).await.unwrap(), "gw-fp");
    controller.stop().await;
}

#[tokio::test]
async fn a_client_trusting_another_ca_refuses_the_server() {
    let controller = Controller::start().await;
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = Pki::load_or_create(other_dir.path()).unwrap();
    let config =
        agent_tls::client_config(&TrustAnchor::CaPem(other_ca.ca_pem().to_string()), None).unwrap();
    let err = whoami(&controller.url, config).await.unwrap_err();
    // Both CAs are called "micromine fleet CA", so webpki finds a name match and then the
    // signature fails to verify.
    assert!(err.contains("invalid peer certificate"), "{err}");
    controller.stop().await;
}

#[tokio::test]
async fn garbage_and_half_open_connections_do_not_stop_the_server() {
    let controller = Controller::start().await;
    let addr = controller.addr;
    let mut half_open = Vec::new();
    for _ in 0..20 {
        // Connected, silent: holds a handshake slot until the handshake timeout.
        half_open.push(TcpStream::connect(addr).await.unwrap());
    }
    for i in 0..20u8 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let garbage: Vec<u8> = match i % 4 {
            0 => b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            1 => b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            // A TLS record header promising a ClientHello that never comes.
            2 => vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01],
            _ => (0..4096u32).map(|n| (n * 7 + u32::from(i)) as u8).collect(),
        };
        // The server may already have hung up on the garbage; that is the point.
        let _ = tcp.write_all(&garbage).await;
        if i % 2 == 0 {
            half_open.push(tcp);
        }
    }
    let (cert, key) = controller.device("gw-after-flood");
    let config = agent_tls::client_config(
        &TrustAnchor::CaPem(controller.ca_pem()),
        Some((&cert, &key)),
    )
    .unwrap();
    let name = tokio::time::timeout(Duration::from_secs(5), whoami(&controller.url, config))
        .await
        .expect("a good client is served promptly after the flood")
        .unwrap();
    assert_eq!(name, "gw-after-flood");
    drop(half_open);
    controller.stop().await;
}

#[tokio::test]
async fn enroll_end_to_end_then_connect_with_the_saved_identity() {
    let controller = Controller::start().await;
    let token = controller.token(1);
    let labels = BTreeMap::from([("site".to_string(), "plant-3".to_string())]);
    let enrolled = identity::enroll(
        &controller.url,
        &token,
        "gw-e2e",
        &labels,
        None,
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(enrolled.name, "gw-e2e");
    assert_eq!(enrolled.ca_pem, controller.ca_pem());
    assert_eq!(enrolled.controller, controller.url);
    assert_eq!(
        tls::certificate_not_after_unix_ms(
            &agent_tls::parse_certificates(&enrolled.cert_pem, "cert").unwrap()[0]
        ),
        Some(enrolled.not_after_unix_ms)
    );

    let state = tempfile::tempdir().unwrap();
    enrolled.save(state.path()).unwrap();
    let loaded = DeviceIdentity::load(state.path()).unwrap().unwrap();
    assert_eq!(loaded, enrolled);
    let name = whoami(&controller.url, loaded.client_config().unwrap())
        .await
        .unwrap();
    assert_eq!(name, "gw-e2e");

    // The single-use token is spent.
    let err = identity::enroll(
        &controller.url,
        &token,
        "gw-e2e-2",
        &labels,
        None,
        &Default::default(),
    )
    .await
    .unwrap_err();
    match err {
        IdentityError::Rejected { code, message } => {
            assert_eq!(code, tonic::Code::Unauthenticated);
            assert_eq!(message, "invalid or expired token");
        }
        other => panic!("{other}"),
    }
    controller.stop().await;
}

#[tokio::test]
async fn enroll_with_a_ca_file_checks_the_returned_bundle() {
    let controller = Controller::start().await;
    let token = controller.token(1);
    let ca = controller.ca_pem();
    let enrolled = identity::enroll(
        &controller.url,
        &token,
        "gw-ca-file",
        &BTreeMap::new(),
        Some(&ca),
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(enrolled.name, "gw-ca-file");
    controller.stop().await;
}

#[tokio::test]
async fn a_token_for_another_ca_never_reaches_the_server() {
    let controller = Controller::start().await;
    let mut token = controller.token(1);
    let genuine = token.clone();
    token.ca_fingerprint[31] ^= 1;
    let err = identity::enroll(
        &controller.url,
        &token,
        "gw-x",
        &BTreeMap::new(),
        None,
        &Default::default(),
    )
    .await
    .unwrap_err();
    // Refused by the device's own TLS check, before the secret was sent...
    assert!(matches!(err, IdentityError::Tls(_)), "{err}");
    assert!(
        error_chain(&err).contains("UnknownIssuer"),
        "{}",
        error_chain(&err)
    );
    // ...so the genuine token still has its use.
    identity::enroll(
        &controller.url,
        &genuine,
        "gw-x",
        &BTreeMap::new(),
        None,
        &Default::default(),
    )
    .await
    .unwrap();
    controller.stop().await;
}

#[tokio::test]
async fn an_invalid_device_name_fails_before_connecting() {
    let token = BootstrapToken {
        id: [1; 8],
        secret: [2; 16],
        ca_fingerprint: [3; 32],
    };
    // Port 1 on loopback: nothing listens, so reaching the network would fail differently.
    let err = identity::enroll(
        "https://127.0.0.1:1",
        &token,
        "Bad Name",
        &BTreeMap::new(),
        None,
        &Default::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, IdentityError::InvalidDeviceName { .. }),
        "{err}"
    );
}
