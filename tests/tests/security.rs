//! Joining, staying and being thrown out, against the real binaries: bootstrap tokens,
//! certificates refused at the handshake, revocation, renewal, CA rotation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use micromine_agent::identity::DeviceIdentity;
use micromine_agent::tls;
use micromine_e2e::raw::{enroll, hello};
use micromine_e2e::{
    Fixture, Process, bin, create_token, number, run_to_end, start_agent, test_manifest, wait_until,
};
use micromine_proto::pb::{self, fleet_client::FleetClient};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_stream::wrappers::ReceiverStream;

fn manifest() -> String {
    test_manifest("e2e", 5, 1e12)
}

fn uses_left(f: &Fixture, token: &str) -> Option<u64> {
    let id = token.split('.').nth(1)?;
    let listing = run_to_end(
        &bin("micromine-controller"),
        &["token", "list", "--data-dir", &f.data.display().to_string()],
    );
    listing
        .lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
}

/// Runs an agent that is expected to fail at enrollment; returns its stderr.
fn refused_enrollment(f: &Fixture, token: &str, name: &str) -> String {
    let mut agent = start_agent(
        &f.controller,
        token,
        name,
        &f.dir.path().join(name),
        "site=e2e",
    );
    let status = agent.wait(Duration::from_secs(30));
    assert!(!status.success(), "{name} enrolled with a bad token");
    agent.log()
}

#[test]
fn enrollment_spends_a_token_use_and_bad_tokens_are_refused() {
    let f = Fixture::start(&manifest(), &[]);
    let token = create_token(&f.data, 2);
    assert_eq!(uses_left(&f, &token), Some(2));
    let _first = f.mining_agent(&token, "first");
    assert_eq!(uses_left(&f, &token), Some(1), "one use spent");
    let _second = f.mining_agent(&token, "second");
    assert_eq!(uses_left(&f, &token), None, "used up and gone");

    // Used up.
    let log = refused_enrollment(&f, &token, "third");
    assert!(log.contains("invalid or expired bootstrap token"), "{log}");

    // Made up: right CA fingerprint (so the controller is reached), invented id and secret.
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    parts[1] = "0123456789abcdef".into();
    parts[2] = "00112233445566778899aabbccddeeff".into();
    let log = refused_enrollment(&f, &parts.join("."), "fourth");
    assert!(log.contains("invalid or expired bootstrap token"), "{log}");

    // Expired.
    let short = run_to_end(
        &bin("micromine-controller"),
        &[
            "token",
            "create",
            "--data-dir",
            &f.data.display().to_string(),
            "--ttl",
            "1s",
        ],
    );
    let created = Instant::now();
    wait_until("the short token to expire", Duration::from_secs(5), || {
        (created.elapsed() > Duration::from_millis(1500)).then_some(())
    });
    let log = refused_enrollment(&f, short.trim(), "fifth");
    assert!(log.contains("invalid or expired bootstrap token"), "{log}");

    // A token naming another CA: the agent will not even send it to this controller.
    let mut foreign: Vec<String> = token.split('.').map(String::from).collect();
    foreign[3] = "ab".repeat(32);
    let log = refused_enrollment(&f, &foreign.join("."), "sixth");
    assert!(
        log.to_lowercase().contains("certificate") || log.contains("fingerprint"),
        "{log}"
    );
    assert!(
        f.controller
            .process
            .log()
            .matches("enrollment refused")
            .count()
            >= 3,
        "the controller says why it refused: {}",
        f.controller.process.log()
    );
}

/// A client configuration trusting the controller's CA, with `identity` (or none) and
/// only the `h2` protocol, i.e. not declaring itself as enrolling.
fn fleet_client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    client_config_with_alpn(ca_pem, identity, &[b"h2"])
}

/// A client configuration trusting the controller's CA, with `identity` (or none),
/// offering the protocols `alpn`.
fn client_config_with_alpn(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA parses")).expect("CA usable");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")],
                rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
            )
            .expect("identity"),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Opens a session; `Ok` if the controller answered with `Welcome`.
async fn try_session(url: &str, config: Arc<rustls::ClientConfig>) -> Result<(), tonic::Status> {
    let channel = tls::connect(url, config).await.map_err(|e| {
        // The handshake's verdict is at the end of the source chain.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text = format!("{text}: {cause}");
            source = cause.source();
        }
        tonic::Status::unavailable(text)
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(hello(1e6)).await.expect("queued");
    let mut inbound = FleetClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    match inbound.message().await? {
        Some(pb::ControllerMessage {
            kind: Some(pb::controller_message::Kind::Welcome(_)),
        }) => Ok(()),
        other => Err(tonic::Status::internal(format!("unexpected {other:?}"))),
    }
}

/// A refusal during the TLS handshake, as opposed to one by a gRPC handler.
fn refused_at_handshake(result: Result<(), tonic::Status>) {
    let status = result.expect_err("refused");
    assert_ne!(
        status.code(),
        tonic::Code::Unauthenticated,
        "refused by a handler, not the handshake: {status}"
    );
    let text = format!("{status:?}").to_lowercase();
    assert!(
        text.contains("alert") || text.contains("certificate") || text.contains("transport"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_are_missing_foreign_or_expired_are_refused_at_the_handshake() {
    let f = Fixture::start(&manifest(), &["--device-cert-ttl", "3s"]);
    let url = f.controller.url();
    let ca_pem = run_to_end(
        &bin("micromine-controller"),
        &["ca", "export", "--data-dir", &f.data.display().to_string()],
    );
    assert!(
        ca_pem.starts_with("-----BEGIN CERTIFICATE-----"),
        "{ca_pem}"
    );

    // No certificate (and not enrolling).
    refused_at_handshake(try_session(&url, fleet_client_config(&ca_pem, None)).await);

    // A certificate from another CA.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other_ca = micromine_controller::pki::Pki::load_or_create(other_dir.path()).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr");
    let stranger = other_ca
        .sign_device_csr(csr.der(), "stranger", Duration::from_secs(600))
        .expect("signed");
    let config = fleet_client_config(
        &ca_pem,
        Some((&stranger.certificate_pem, &key.serialize_pem())),
    );
    refused_at_handshake(try_session(&url, config).await);

    // Expired: a real certificate from this controller, three seconds long.
    let device: DeviceIdentity = enroll(&f.controller, &f.data, "brief").await;
    try_session(&url, device.client_config().expect("config"))
        .await
        .expect("works while valid");
    let deadline = device.not_after_unix_ms;
    wait_until("the certificate to expire", Duration::from_secs(10), || {
        (micromine_agent::identity::now_unix_ms() > deadline + 1000).then_some(())
    });
    refused_at_handshake(try_session(&url, device.client_config().expect("config")).await);

    // The controller says why each one failed.
    let log = f.controller.process.log();
    for reason in [
        "peer sent no certificates",
        "BadSignature",
        "certificate expired",
    ] {
        assert!(
            log.contains(reason),
            "no {reason:?} in the controller's log:\n{log}"
        );
    }
}

/// `Fleet.Renew` with a fresh CSR; the new certificate on success.
async fn try_renew(url: &str, config: Arc<rustls::ClientConfig>) -> Result<String, tonic::Status> {
    let channel = tls::connect(url, config)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (_key, csr_der) =
        micromine_agent::identity::generate_key_and_csr("gw-alpn").expect("a CSR");
    let renewed = FleetClient::new(channel)
        .renew(pb::RenewRequest { csr_der })
        .await?
        .into_inner();
    Ok(renewed.certificate_pem)
}

/// A client offering the enrollment ALPN gets a handshake without client authentication,
/// so it can enroll before it has a certificate. That must not be a way around the
/// certificate for `Fleet`: such a connection carries no client identity, even when the
/// client holds a valid certificate, and `Session` and `Renew` refuse it. The same calls
/// with the same certificate over the fleet ALPN go through, so the refusal is the
/// ALPN's doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_for_enrollment_is_refused_on_session_and_renew() {
    let f = Fixture::start(&manifest(), &[]);
    let url = f.controller.url();
    let device: DeviceIdentity = enroll(&f.controller, &f.data, "gw-alpn").await;
    let identity = Some((device.cert_pem.as_str(), device.key_pem.as_str()));
    let enrolling = client_config_with_alpn(
        &device.ca_pem,
        identity,
        &[b"h2", micromine_proto::ENROLL_ALPN],
    );
    let fleet = client_config_with_alpn(&device.ca_pem, identity, &[b"h2"]);

    let session = try_session(&url, enrolling.clone())
        .await
        .expect_err("a session over the enrollment ALPN");
    assert_eq!(session.code(), tonic::Code::Unauthenticated, "{session:?}");
    assert!(
        session.message().contains("client certificate"),
        "{session:?}"
    );
    let renew = try_renew(&url, enrolling)
        .await
        .expect_err("a renewal over the enrollment ALPN");
    assert_eq!(renew.code(), tonic::Code::Unauthenticated, "{renew:?}");

    try_session(&url, fleet.clone())
        .await
        .expect("the same certificate opens a session over the fleet ALPN");
    let renewed = try_renew(&url, fleet).await.expect("and renews over it");
    assert!(
        renewed.starts_with("-----BEGIN CERTIFICATE-----"),
        "{renewed}"
    );
}

#[test]
fn a_revoked_device_is_cut_off_within_five_seconds() {
    let f = Fixture::start(&manifest(), &[]);
    let token = create_token(&f.data, 1);
    let mut agent = f.mining_agent(&token, "rogue");

    let revoked_at = Instant::now();
    let out = run_to_end(
        &bin("micromine-controller"),
        &[
            "device",
            "revoke",
            "rogue",
            "--data-dir",
            &f.data.display().to_string(),
        ],
    );
    assert!(out.contains("revoked"), "{out}");
    wait_until("the session to be cut", Duration::from_secs(10), || {
        let status = f.controller.status()?;
        let device = status["devices"]
            .as_array()?
            .iter()
            .find(|d| d["name"] == "rogue")?
            .clone();
        (status["sessions"] == 0 && device["state"] == "revoked" && device["assignments"] == 0)
            .then_some(())
    });
    let took = revoked_at.elapsed();
    assert!(took < Duration::from_secs(5), "cut off after {took:?}");
    agent.wait_for_log("certificate revoked", Duration::from_secs(5));
    // Its reconnection attempts die in the handshake.
    f.controller
        .process
        .wait_for_log("refused a revoked certificate", Duration::from_secs(30));
    agent.kill();

    // While revoked, the name cannot be enrolled again, not even with a fresh token.
    let again = create_token(&f.data, 1);
    let mut retry = start_agent(
        &f.controller,
        &again,
        "rogue",
        &f.dir.path().join("rogue-2"),
        "site=e2e",
    );
    assert!(!retry.wait(Duration::from_secs(30)).success());
    assert!(retry.log().contains("rogue is revoked"), "{}", retry.log());

    // Unrevoked, it may enroll afresh; the old certificate stays refused.
    run_to_end(
        &bin("micromine-controller"),
        &[
            "device",
            "unrevoke",
            "rogue",
            "--data-dir",
            &f.data.display().to_string(),
        ],
    );
    // The controller picks the change up from disk within a second.
    wait_until(
        "the controller to see the unrevoke",
        Duration::from_secs(10),
        || (f.controller.device("rogue")?["state"] != "revoked").then_some(()),
    );
    let fresh = create_token(&f.data, 1);
    let _back = start_agent(
        &f.controller,
        &fresh,
        "rogue",
        &f.dir.path().join("rogue-3"),
        "site=e2e",
    );
    wait_until(
        "rogue to mine again with a new certificate",
        Duration::from_secs(30),
        || (f.controller.device("rogue")?["state"] == "mining").then_some(()),
    );
    let mut old = Process::start(
        "old rogue",
        &bin("micromine-agent"),
        &[
            "run",
            "--controller",
            &f.controller.url(),
            "--state-dir",
            &f.dir.path().join("rogue").display().to_string(),
            "--threads",
            "1",
        ],
    );
    let refusals = f
        .controller
        .process
        .log()
        .matches("refused a revoked certificate")
        .count();
    wait_until(
        "the old certificate to be refused again",
        Duration::from_secs(30),
        || {
            (f.controller
                .process
                .log()
                .matches("refused a revoked certificate")
                .count()
                > refusals)
                .then_some(())
        },
    );
    old.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_close_to_expiry_is_renewed_with_the_session_kept() {
    let f = Fixture::start(&manifest(), &["--device-cert-ttl", "15s"]);
    let token = create_token(&f.data, 1);
    let agent = start_agent(
        &f.controller,
        &token,
        "keeper",
        &f.dir.path().join("keeper"),
        "site=e2e",
    );
    let first = wait_until("keeper to mine", Duration::from_secs(30), || {
        let device = f.controller.device("keeper")?;
        (device["state"] == "mining")
            .then(|| device["certificateNotAfterUnixMs"].as_i64().unwrap_or(0))
    });
    // Two renewals: the second proves the first certificate was replaced in use.
    wait_until("two renewals", Duration::from_secs(40), || {
        (agent.log().matches("certificate renewed").count() >= 2).then_some(())
    });
    let device = f.device("keeper");
    assert!(
        device["certificateNotAfterUnixMs"].as_i64().unwrap_or(0) > first + 5_000,
        "{device}"
    );
    // Past the first certificate's end, the same session is still mining.
    let now = micromine_agent::identity::now_unix_ms();
    assert!(now > first, "the first certificate has expired by now");
    let accepted = device["shares"]["accepted"].as_u64().unwrap_or(0);
    wait_until(
        "more shares on the same session",
        Duration::from_secs(30),
        || {
            let device = f.controller.device("keeper")?;
            (device["shares"]["accepted"].as_u64()? > accepted).then_some(())
        },
    );
    assert_eq!(f.controller.status().expect("status")["sessions"], 1);
    let opened = f.controller.process.log().matches("session open").count();
    assert_eq!(
        opened,
        1,
        "the session was never dropped: {}",
        f.controller.process.log()
    );
    // The renewed identity is on disk for the next start.
    let stored = DeviceIdentity::load(&f.dir.path().join("keeper"))
        .expect("readable")
        .expect("present");
    assert!(stored.not_after_unix_ms > first);
}

/// Runs `micromine-controller ca <step>` on the fixture's data directory.
fn ca(f: &Fixture, step: &str) -> String {
    run_to_end(
        &bin("micromine-controller"),
        &["ca", step, "--data-dir", &f.data.display().to_string()],
    )
}

fn stored_identity(dir: &std::path::Path) -> DeviceIdentity {
    DeviceIdentity::load(dir)
        .expect("readable")
        .expect("present")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_is_rotated_in_three_steps_without_touching_the_agent() {
    // A device certificate from the original CA that outlives the test, to show which CA
    // the controller trusts at each step; then short certificates, so the agent renews
    // (and learns what changed) within seconds.
    let mut f = Fixture::start(&manifest(), &["--device-cert-ttl", "10m"]);
    let probe = enroll(&f.controller, &f.data, "probe").await;
    const TTL: [&str; 2] = ["--device-cert-ttl", "10s"];
    f.restart(&TTL);
    let token = create_token(&f.data, 1);
    let state = f.dir.path().join("rover");
    let agent = f.mining_agent(&token, "rover");
    let old_ca = ca(&f, "export");
    let probe_with =
        |trust: &str| fleet_client_config(trust, Some((&probe.cert_pem, &probe.key_pem)));
    try_session(&f.controller.url(), probe_with(&old_ca))
        .await
        .expect("the probe is accepted");

    // 1. Stage: after the restart the agent reconnects, and on renewal learns both CAs.
    assert!(ca(&f, "stage").contains("staged the next CA"));
    f.restart(&TTL);
    let bundle = wait_until(
        "the agent to learn the next CA",
        Duration::from_secs(30),
        || {
            let stored = stored_identity(&state);
            (stored.ca_pem.matches("BEGIN CERTIFICATE").count() == 2).then_some(stored.ca_pem)
        },
    );
    assert!(bundle.starts_with(&old_ca), "the active CA comes first");
    try_session(&f.controller.url(), probe_with(&old_ca))
        .await
        .expect("still served by the old CA");

    // 2. Promote: the controller serves a certificate from the new CA, which only a client
    // holding the bundle accepts, and still accepts certificates the old CA signed.
    assert!(ca(&f, "promote").contains("is now active"));
    f.restart(&TTL);
    refused_at_handshake(try_session(&f.controller.url(), probe_with(&old_ca)).await);
    try_session(&f.controller.url(), probe_with(&bundle))
        .await
        .expect("a certificate from the previous CA is still accepted");
    let renewals = agent.log().matches("certificate renewed").count();
    wait_until(
        "the agent to get a certificate from the new CA",
        Duration::from_secs(30),
        || (agent.log().matches("certificate renewed").count() > renewals).then_some(()),
    );

    // 3. Retire: the old CA's certificates are refused; the agent, renewed, carries on.
    assert!(ca(&f, "retire").contains("no longer trusted"));
    f.restart(&TTL);
    refused_at_handshake(try_session(&f.controller.url(), probe_with(&bundle)).await);
    let accepted = number(&f.device("rover"), "/shares/accepted");
    wait_until(
        "rover mining under the new CA",
        Duration::from_secs(30),
        || {
            let device = f.controller.device("rover")?;
            (device["state"] == "mining" && number(&device, "/shares/accepted") > accepted)
                .then_some(())
        },
    );
    let status = ca(&f, "status");
    assert_eq!(
        status.lines().filter(|l| l.starts_with("active")).count(),
        1,
        "{status}"
    );
    assert!(status.contains("no rotation under way"), "{status}");
}
