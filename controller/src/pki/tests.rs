#![allow(clippy::unwrap_used)]

use super::*;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

fn csr_for(subject_cn: &str) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(subject_cn);
    let csr = params.serialize_request(&key).unwrap();
    (key, csr.der().to_vec())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[test]
fn a_mounted_ca_loads_as_is_and_a_mismatched_key_is_refused() {
    let made = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let ca = Pki::load_or_create(made.path()).unwrap();
    let stranger = Pki::load_or_create(other.path()).unwrap();
    let (cert, key) = (
        made.path().join(CA_CERT_FILE),
        made.path().join(CA_KEY_FILE),
    );
    let mounted = Pki::load_files(&cert, &key).unwrap();
    assert_eq!(mounted.ca_fingerprint(), ca.ca_fingerprint());
    assert_eq!(mounted.rotation().len(), 0);
    let (_, csr) = csr_for("gw-1");
    let issued = mounted
        .sign_device_csr(&csr, "gw-1", Duration::from_secs(3600))
        .unwrap();
    let der = CertificateDer::from_pem_slice(issued.certificate_pem.as_bytes()).unwrap();
    let (_, device) = x509_parser::parse_x509_certificate(&der).unwrap();
    let (_, authority) = x509_parser::parse_x509_certificate(ca.ca_der()).unwrap();
    assert_eq!(
        device.issuer(),
        authority.subject(),
        "signed by the mounted CA"
    );
    assert!(
        device
            .verify_signature(Some(authority.public_key()))
            .is_ok()
    );

    let wrong_key = other.path().join(CA_KEY_FILE);
    assert!(matches!(
        Pki::load_files(&cert, &wrong_key),
        Err(PkiError::CaKeyMismatch { .. })
    ));
    let missing = made.path().join("tls.crt");
    let error = Pki::load_files(&missing, &key).unwrap_err().to_string();
    assert!(error.contains("tls.crt"), "{error}");
    drop(stranger);
}

#[test]
fn load_or_create_twice_returns_the_same_ca() {
    let dir = tempfile::tempdir().unwrap();
    let first = Pki::load_or_create(dir.path()).unwrap();
    let second = Pki::load_or_create(dir.path()).unwrap();
    assert_eq!(first.ca_der(), second.ca_der());
    assert_eq!(first.ca_fingerprint(), second.ca_fingerprint());
    assert_eq!(
        first.ca_fingerprint().to_vec(),
        Sha256::digest(first.ca_der()).to_vec()
    );
    let (_, ca) = x509_parser::parse_x509_certificate(first.ca_der()).unwrap();
    assert!(ca.is_ca());
    assert_eq!(
        ca.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        CA_COMMON_NAME
    );
    let remaining = ca.validity().not_after.timestamp() - now_unix_s();
    assert!(
        (remaining - duration_secs(CA_VALIDITY)).abs() <= 5,
        "{remaining}"
    );
}

#[test]
fn racing_creators_agree_on_one_ca() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pki");
    let fingerprints: Vec<[u8; 32]> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| Pki::load_or_create(&path).unwrap().ca_fingerprint()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(fingerprints.windows(2).all(|w| w[0] == w[1]));
    let litter: Vec<_> = fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(litter.is_empty(), "temporary files left: {litter:?}");
}

#[test]
fn a_key_without_certificate_is_completed_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let first = Pki::load_or_create(dir.path()).unwrap();
    let key_before = fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
    fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
    let second = Pki::load_or_create(dir.path()).unwrap();
    assert_eq!(fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), key_before);
    assert_ne!(first.ca_der(), second.ca_der());
}

#[test]
fn a_foreign_certificate_next_to_the_key_is_refused() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    Pki::load_or_create(ours.path()).unwrap();
    Pki::load_or_create(theirs.path()).unwrap();
    fs::copy(
        theirs.path().join(CA_CERT_FILE),
        ours.path().join(CA_CERT_FILE),
    )
    .unwrap();
    let err = Pki::load_or_create(ours.path()).unwrap_err();
    assert!(matches!(err, PkiError::CaKeyMismatch { .. }), "{err}");
}

#[test]
fn a_corrupt_key_file_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(CA_KEY_FILE), "not a key").unwrap();
    let err = Pki::load_or_create(dir.path()).unwrap_err();
    assert!(err.to_string().contains("ca.key"), "{err}");
}

#[cfg(unix)]
#[test]
fn ca_key_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    Pki::load_or_create(&pki_dir).unwrap();
    let mode = fs::metadata(pki_dir.join(CA_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = fs::metadata(&pki_dir).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);
}

#[test]
fn server_identity_verifies_against_the_ca_with_its_sans() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(dir.path()).unwrap();
    let identity = pki
        .issue_server_identity(&["controller.example.com".into(), "10.1.2.3".into()])
        .unwrap();
    assert_eq!(identity.cert_chain.len(), 2);
    assert_eq!(identity.cert_chain[1].as_ref(), pki.ca_der());

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(pki.ca_der().to_vec()))
        .unwrap();
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
    use rustls::client::danger::ServerCertVerifier;
    for name in [
        "localhost",
        "127.0.0.1",
        "::1",
        "controller.example.com",
        "10.1.2.3",
    ] {
        let server_name = ServerName::try_from(name).unwrap();
        verifier
            .verify_server_cert(
                &identity.cert_chain[0],
                &[],
                &server_name,
                &[],
                UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let wrong = ServerName::try_from("elsewhere.example.com").unwrap();
    assert!(
        verifier
            .verify_server_cert(&identity.cert_chain[0], &[], &wrong, &[], UnixTime::now())
            .is_err()
    );

    let (_, leaf) = x509_parser::parse_x509_certificate(&identity.cert_chain[0]).unwrap();
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    let dns: Vec<_> = sans
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })
        .collect();
    assert_eq!(dns, ["localhost", "controller.example.com"]);
    let remaining = identity.not_after_unix_ms / 1000 - now_unix_s();
    assert!(
        (remaining - duration_secs(SERVER_VALIDITY)).abs() <= 5,
        "{remaining}"
    );
    // The key really is the leaf's key: rustls refuses a mismatched pair.
    rustls::sign::CertifiedKey::from_der(identity.cert_chain, identity.key, &provider()).unwrap();
}

#[test]
fn invalid_extra_sans_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(dir.path()).unwrap();
    for bad in ["bad name", "", "under_score!", "[::1]"] {
        match pki.issue_server_identity(&[bad.to_string()]) {
            Err(PkiError::InvalidSan { value }) => assert_eq!(value, bad),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
}

#[test]
fn device_certificates_carry_the_device_name_not_the_csr_subject() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(dir.path()).unwrap();
    let (key, csr) = csr_for("admin.example.com");
    let issued = pki
        .sign_device_csr(&csr, "gw-0042", Duration::from_secs(3600))
        .unwrap();
    let der = CertificateDer::from_pem_slice(issued.certificate_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let cns: Vec<_> = cert
        .subject()
        .iter_common_name()
        .map(|cn| cn.as_str().unwrap().to_string())
        .collect();
    assert_eq!(cns, ["gw-0042"]);
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert!(!cert.is_ca());
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    assert_eq!(issued.not_after_unix_ms, not_after * 1000);
    assert_eq!(not_after - not_before, 3600 + 300);

    // And a client verifier trusting only the CA accepts it.
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(pki.ca_der().to_vec()))
        .unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .unwrap();
    verifier
        .verify_client_cert(&der, &[], UnixTime::now())
        .unwrap();
}

#[test]
fn serial_numbers_differ_for_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(dir.path()).unwrap();
    let (_, csr) = csr_for("x");
    let serial = |pem: &str| {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        cert.raw_serial().to_vec()
    };
    let a = pki
        .sign_device_csr(&csr, "a", Duration::from_secs(60))
        .unwrap();
    let b = pki
        .sign_device_csr(&csr, "a", Duration::from_secs(60))
        .unwrap();
    assert_ne!(serial(&a.certificate_pem), serial(&b.certificate_pem));
}

#[test]
fn bad_device_names_are_rejected() {
    for bad in [
        "",
        "-gw",
        "gw-",
        "GW",
        "gw_1",
        "gw.1",
        "gw 1",
        "ü",
        &"a".repeat(64),
    ] {
        assert!(
            matches!(validate_device_name(bad), Err(PkiError::InvalidDeviceName { ref name, .. }) if name == bad),
            "{bad:?} was accepted"
        );
    }
    for good in ["a", "0", "gw-0042", "a-b-c", &"a".repeat(63)] {
        validate_device_name(good).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(dir.path()).unwrap();
    let (_, csr) = csr_for("x");
    assert!(matches!(
        pki.sign_device_csr(&csr, "Bad_Name", Duration::from_secs(60)),
        Err(PkiError::InvalidDeviceName { .. })
    ));
}

#[test]
fn broken_csrs_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(dir.path()).unwrap();
    let (_, csr) = csr_for("x");
    let ttl = Duration::from_secs(60);

    let truncated = &csr[..csr.len() / 2];
    assert!(matches!(
        pki.sign_device_csr(truncated, "gw", ttl),
        Err(PkiError::CsrMalformed { .. })
    ));
    assert!(matches!(
        pki.sign_device_csr(&[], "gw", ttl),
        Err(PkiError::CsrMalformed { .. })
    ));

    // Flip a bit in the last byte: the signature's tail.
    let mut bad_signature = csr.clone();
    *bad_signature.last_mut().unwrap() ^= 0x01;
    let err = pki.sign_device_csr(&bad_signature, "gw", ttl).unwrap_err();
    assert!(matches!(err, PkiError::CsrSignature { .. }), "{err}");

    // A CSR whose signed content (the subject) was altered after signing.
    let mut altered = csr.clone();
    let at = altered.windows(1).position(|w| w == b"x").unwrap();
    altered[at] = b'y';
    let err = pki.sign_device_csr(&altered, "gw", ttl).unwrap_err();
    assert!(matches!(err, PkiError::CsrSignature { .. }), "{err}");
}

#[test]
fn device_ttl_must_be_positive_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(dir.path()).unwrap();
    let (_, csr) = csr_for("x");
    assert!(matches!(
        pki.sign_device_csr(&csr, "gw", Duration::ZERO),
        Err(PkiError::InvalidTtl { .. })
    ));
    assert!(matches!(
        pki.sign_device_csr(&csr, "gw", MAX_DEVICE_TTL + Duration::from_secs(1)),
        Err(PkiError::InvalidTtl { .. })
    ));
}

fn roles(pki: &Pki) -> Vec<CaRole> {
    pki.cas().map(|ca| ca.role).collect()
}

/// Whether a client verifier built from `pki`'s trust anchors accepts `cert_pem`.
fn trusts(pki: &Pki, cert_pem: &str) -> bool {
    let mut roots = RootCertStore::empty();
    for anchor in pki.trust_anchors() {
        roots.add(anchor).unwrap();
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .unwrap();
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    verifier
        .verify_client_cert(&der, &[], UnixTime::now())
        .is_ok()
}

fn device_cert(pki: &Pki) -> String {
    let (_, csr) = csr_for("gw");
    pki.sign_device_csr(&csr, "gw", Duration::from_secs(3600))
        .unwrap()
        .certificate_pem
}

#[test]
fn a_rotation_trusts_old_and_new_at_every_step_a_device_needs() {
    let dir = tempfile::tempdir().unwrap();
    let original = Pki::load_or_create(dir.path()).unwrap();
    let from_original = device_cert(&original);
    assert_eq!(roles(&original), [CaRole::Active]);

    let staged = stage_next_ca(dir.path()).unwrap();
    let pki = Pki::load_or_create(dir.path()).unwrap();
    assert_eq!(roles(&pki), [CaRole::Active, CaRole::Next]);
    // Still signing with the original; the bundle leads with it and carries the next.
    assert_eq!(pki.ca_fingerprint(), original.ca_fingerprint());
    assert!(trusts(&original, &device_cert(&pki)));
    assert!(pki.bundle_pem().starts_with(original.ca_pem()));
    assert!(pki.bundle_pem().ends_with(&staged.pem));
    assert!(matches!(
        stage_next_ca(dir.path()),
        Err(PkiError::Rotation(m)) if m.contains("already staged")
    ));

    let promoted = promote_next_ca(dir.path()).unwrap();
    assert_eq!(promoted.fingerprint(), staged.fingerprint());
    let pki = Pki::load_or_create(dir.path()).unwrap();
    assert_eq!(roles(&pki), [CaRole::Active, CaRole::Previous]);
    assert_eq!(pki.ca_fingerprint(), staged.fingerprint());
    let from_new = device_cert(&pki);
    assert!(!trusts(&original, &from_new), "signed by the new CA");
    assert!(trusts(&pki, &from_new));
    assert!(
        trusts(&pki, &from_original),
        "the previous CA's devices still get in"
    );
    let server = pki.issue_server_identity(&[]).unwrap();
    assert_eq!(server.cert_chain[1].as_ref(), staged.der.as_ref());

    // A second rotation cannot begin to promote before the first is retired.
    stage_next_ca(dir.path()).unwrap();
    assert!(matches!(
        promote_next_ca(dir.path()),
        Err(PkiError::Rotation(m)) if m.contains("ca retire")
    ));

    let retired = retire_previous_ca(dir.path()).unwrap();
    assert_eq!(retired.fingerprint(), original.ca_fingerprint());
    let pki = Pki::load_or_create(dir.path()).unwrap();
    assert_eq!(roles(&pki), [CaRole::Active, CaRole::Next]);
    assert!(!trusts(&pki, &from_original));
    assert!(trusts(&pki, &from_new));
    assert!(matches!(
        retire_previous_ca(dir.path()),
        Err(PkiError::Rotation(_))
    ));
}

#[test]
fn promoting_with_nothing_staged_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let before = Pki::load_or_create(dir.path()).unwrap();
    assert!(matches!(
        promote_next_ca(dir.path()),
        Err(PkiError::Rotation(m)) if m.contains("ca stage")
    ));
    let after = Pki::load_or_create(dir.path()).unwrap();
    assert_eq!(after.ca_fingerprint(), before.ca_fingerprint());
    assert_eq!(roles(&after), [CaRole::Active]);
}

#[test]
fn a_promotion_interrupted_between_key_and_certificate_is_finished() {
    let dir = tempfile::tempdir().unwrap();
    Pki::load_or_create(dir.path()).unwrap();
    let staged = stage_next_ca(dir.path()).unwrap();
    // The state a crash after the key's rename leaves behind.
    fs::copy(
        dir.path().join(CA_CERT_FILE),
        dir.path().join(PREVIOUS_CERT_FILE),
    )
    .unwrap();
    fs::rename(dir.path().join(NEXT_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();

    let pki = Pki::load_or_create(dir.path()).unwrap();
    assert_eq!(pki.ca_fingerprint(), staged.fingerprint());
    assert_eq!(roles(&pki), [CaRole::Active, CaRole::Previous]);
    assert!(!dir.path().join(NEXT_CERT_FILE).exists());
}

#[test]
fn a_promotion_that_stopped_after_copying_the_old_ca_can_be_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let original = Pki::load_or_create(dir.path()).unwrap();
    let staged = stage_next_ca(dir.path()).unwrap();
    fs::copy(
        dir.path().join(CA_CERT_FILE),
        dir.path().join(PREVIOUS_CERT_FILE),
    )
    .unwrap();

    promote_next_ca(dir.path()).unwrap();
    let pki = Pki::load_or_create(dir.path()).unwrap();
    assert_eq!(pki.ca_fingerprint(), staged.fingerprint());
    let previous = pki.rotation();
    assert_eq!(previous.len(), 1);
    assert_eq!(previous[0].fingerprint(), original.ca_fingerprint());
}

#[test]
fn a_staging_interrupted_after_the_key_is_completed() {
    let dir = tempfile::tempdir().unwrap();
    Pki::load_or_create(dir.path()).unwrap();
    let key = generate_key("test").unwrap();
    fs::write(dir.path().join(NEXT_KEY_FILE), key.serialize_pem()).unwrap();
    // Not trusted while half made...
    assert_eq!(
        roles(&Pki::load_or_create(dir.path()).unwrap()),
        [CaRole::Active]
    );
    // ...and staging again finishes it with the key already there.
    let staged = stage_next_ca(dir.path()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&staged.der).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
}
