//! The device's key, certificate and enrollment.
//!
//! The private key is generated on the device and never leaves it: enrollment sends a
//! PKCS#10 request and a bootstrap token and gets back a certificate whose common name is
//! the device's name, which is its identity for every later session.
//!
//! # Files (in the state directory, mode 0700)
//! - `device.key`: ECDSA P-256 private key, PKCS#8 PEM, mode 0600.
//! - `device.crt`: the device certificate, PEM.
//! - `ca.crt`: the fleet CA bundle the agent pins, PEM.
//! - `device.json`: `{name, not_after_unix_ms, issued_unix_ms, controller}`.
//!
//! Every file is written atomically; `device.json` goes last, so a directory holding it
//! holds a complete identity unless a later save was interrupted, which `load` detects.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use micromine_proto::MAX_MESSAGE_BYTES;
use micromine_proto::pb::EnrollRequest;
use micromine_proto::pb::enrollment_client::EnrollmentClient;
use micromine_proto::token::BootstrapToken;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore};

use micromine_host::files::{FileError, create_private_dir, write_file_atomic};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, UnixTime};
use serde::{Deserialize, Serialize};

use crate::tls::{self, TlsError, TrustAnchor};

const KEY_FILE: &str = "device.key";
const CERT_FILE: &str = "device.crt";
const CA_FILE: &str = "ca.crt";
const META_FILE: &str = "device.json";
/// Enrollment is one small unary call; a controller that takes longer is not answering.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything that can go wrong with the device's credentials and enrollment.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A credential file or the state directory could not be read or written.
    #[error(transparent)]
    Io(#[from] FileError),
    /// Some credential files exist and others do not: an interrupted save or a hand edit.
    #[error(
        "the device identity in {dir} is incomplete: {missing} is missing; remove the state directory's device files to enroll again"
    )]
    Incomplete {
        /// The state directory.
        dir: PathBuf,
        /// The first missing file.
        missing: PathBuf,
    },
    /// A credential file exists but does not hold what it should.
    #[error("{path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The device name breaks DNS-label rules.
    #[error("device name `{name}` is invalid: {reason}")]
    InvalidDeviceName {
        /// The rejected name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// Key or CSR generation failed.
    #[error("generating the device key and CSR failed: {0}")]
    KeyGeneration(#[source] rcgen::Error),
    /// TLS configuration or connecting to the controller failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The controller answered the enrollment with an error.
    #[error("the controller refused enrollment ({code:?}): {message}")]
    Rejected {
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// The controller did not answer the enrollment in time.
    #[error("the controller did not answer the enrollment within {0:?}")]
    Timeout(Duration),
    /// The controller's answer is unusable or does not match what the device trusts.
    #[error("the controller's enrollment response is invalid: {0}")]
    BadResponse(String),
}

/// The device's credentials in its state dir: `device.key` (PKCS#8 PEM, mode 0600,
/// generated on the device, ECDSA P-256), `device.crt`, `ca.crt`, `device.json`.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The device name: the certificate's CN and the `EdgeDevice` name.
    pub name: String,
    /// The device certificate, PEM.
    pub cert_pem: String,
    /// The device's private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The fleet CA bundle the agent pins for the controller, PEM.
    pub ca_pem: String,
    /// When the certificate expires, Unix ms, so the agent renews in time.
    pub not_after_unix_ms: i64,
    /// When this device received the certificate (its own clock), Unix ms: with
    /// `not_after_unix_ms` the lifetime renewal is planned against.
    pub issued_unix_ms: i64,
    /// The controller URL the device enrolled with (`device.json`'s `controller`), so a
    /// restart without `--controller` knows where to go.
    pub controller: String,
}

impl fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("name", &self.name)
            .field("not_after_unix_ms", &self.not_after_unix_ms)
            .field("controller", &self.controller)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceMeta {
    name: String,
    not_after_unix_ms: i64,
    #[serde(default)]
    issued_unix_ms: i64,
    controller: String,
}

impl DeviceIdentity {
    /// Reads the identity from `state_dir`. `None` if the device never enrolled (none of
    /// the files exist); an error naming the file if some are missing or any is corrupt,
    /// including a key that does not belong to the certificate.
    pub fn load(state_dir: &Path) -> Result<Option<DeviceIdentity>, IdentityError> {
        let paths = [KEY_FILE, CERT_FILE, CA_FILE, META_FILE].map(|f| state_dir.join(f));
        let mut present = Vec::with_capacity(paths.len());
        for path in &paths {
            present.push(path.try_exists().map_err(FileError::at("checking", path))?);
        }
        if present.iter().all(|p| !p) {
            return Ok(None);
        }
        if let Some(missing) = paths.iter().zip(&present).find(|(_, p)| !**p) {
            return Err(IdentityError::Incomplete {
                dir: state_dir.to_path_buf(),
                missing: missing.0.clone(),
            });
        }
        let [key_path, cert_path, ca_path, meta_path] = paths;

        let meta_text = read(&meta_path)?;
        let meta: DeviceMeta =
            serde_json::from_str(&meta_text).map_err(|e| corrupt(&meta_path, e.to_string()))?;
        validate_device_name(&meta.name).map_err(|e| corrupt(&meta_path, e.to_string()))?;
        let key_pem = read(&key_path)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| corrupt(&key_path, e.to_string()))?;
        let cert_pem = read(&cert_path)?;
        let chain = tls::parse_certificates(&cert_pem, "the device certificate")
            .map_err(|e| corrupt(&cert_path, e.to_string()))?;
        let ca_pem = read(&ca_path)?;
        tls::parse_certificates(&ca_pem, "the CA bundle")
            .map_err(|e| corrupt(&ca_path, e.to_string()))?;
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            corrupt(
                &key_path,
                format!("it does not belong to {}: {e}", cert_path.display()),
            )
        })?;
        Ok(Some(DeviceIdentity {
            name: meta.name,
            cert_pem,
            key_pem,
            ca_pem,
            not_after_unix_ms: meta.not_after_unix_ms,
            issued_unix_ms: meta.issued_unix_ms,
            controller: meta.controller,
        }))
    }

    /// Writes the identity to `state_dir` (created with mode 0700), each file atomically,
    /// the key with mode 0600 and `device.json` last.
    pub fn save(&self, state_dir: &Path) -> Result<(), IdentityError> {
        create_private_dir(state_dir).map_err(FileError::at("creating directory", state_dir))?;
        let meta = DeviceMeta {
            name: self.name.clone(),
            not_after_unix_ms: self.not_after_unix_ms,
            issued_unix_ms: self.issued_unix_ms,
            controller: self.controller.clone(),
        };
        let meta_path = state_dir.join(META_FILE);
        let mut meta_json =
            serde_json::to_vec_pretty(&meta).map_err(|e| corrupt(&meta_path, e.to_string()))?;
        meta_json.push(b'\n');
        let files: [(&str, &[u8], u32); 4] = [
            (KEY_FILE, self.key_pem.as_bytes(), 0o600),
            (CERT_FILE, self.cert_pem.as_bytes(), 0o644),
            (CA_FILE, self.ca_pem.as_bytes(), 0o644),
            (META_FILE, &meta_json, 0o644),
        ];
        for (name, contents, mode) in files {
            let path = state_dir.join(name);
            write_file_atomic(&path, contents, mode).map_err(|source| {
                IdentityError::Io(FileError {
                    action: "writing",
                    path,
                    source,
                })
            })?;
        }
        Ok(())
    }

    /// Whether to renew now: less than a third of the certificate's lifetime is left (8 h
    /// of the default 24 h), so there is time to retry through an outage.
    pub fn renewal_due(&self, now_unix_ms: i64) -> bool {
        let lifetime = (self.not_after_unix_ms - self.issued_unix_ms).max(0);
        self.not_after_unix_ms - now_unix_ms < lifetime / 3
    }

    /// Whether the certificate has run out (it can no longer open a session).
    pub fn expired(&self, now_unix_ms: i64) -> bool {
        now_unix_ms >= self.not_after_unix_ms
    }

    /// mTLS to the controller: this certificate and key, trusting only the pinned CA bundle.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, IdentityError> {
        Ok(tls::client_config(
            &TrustAnchor::CaPem(self.ca_pem.clone()),
            Some((&self.cert_pem, &self.key_pem)),
        )?)
    }
}

/// The device's clock, Unix ms.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Generates a fresh ECDSA P-256 key pair and a CSR (DER) for `device_name` with rcgen.
/// Returns the key as PKCS#8 PEM. The CSR's subject is the device name, though the
/// controller sets the certificate's name itself.
pub fn generate_key_and_csr(device_name: &str) -> Result<(String, Vec<u8>), IdentityError> {
    validate_device_name(device_name)?;
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IdentityError::KeyGeneration)?;
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, device_name);
    params.distinguished_name = subject;
    let csr = params
        .serialize_request(&key)
        .map_err(IdentityError::KeyGeneration)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Enrolls the device with the controller at `controller_url`.
///
/// Generates a key and CSR, connects with server-only TLS trusting either `ca_pem` (from
/// `--ca-file`) or the token's CA fingerprint, and calls `Enrollment.Enroll`. The returned
/// CA bundle's first certificate must hash to the token's fingerprint (or equal the given
/// CA's first certificate), and the returned certificate must be for our key and chain to
/// that CA as a client certificate. The caller saves the identity. `trace_headers`
/// (W3C `traceparent`, `tracestate`) go into the request's gRPC metadata.
pub async fn enroll(
    controller_url: &str,
    token: &BootstrapToken,
    device_name: &str,
    labels: &BTreeMap<String, String>,
    ca_pem: Option<&str>,
    trace_headers: &HashMap<String, String>,
) -> Result<DeviceIdentity, IdentityError> {
    let request = Enroll {
        controller_url,
        token,
        device_name,
        labels,
        ca_pem,
        trace_headers,
    };
    enroll_from(&request, None).await
}

/// What [`enroll`] needs.
#[derive(Debug, Clone, Copy)]
pub struct Enroll<'a> {
    /// `https://host:port` of the controller.
    pub controller_url: &'a str,
    /// The bootstrap token.
    pub token: &'a BootstrapToken,
    /// The name to enroll under.
    pub device_name: &'a str,
    /// Labels to report.
    pub labels: &'a BTreeMap<String, String>,
    /// The CA to trust instead of the token's fingerprint.
    pub ca_pem: Option<&'a str>,
    /// W3C trace context for the request's metadata.
    pub trace_headers: &'a HashMap<String, String>,
}

/// [`enroll`], connecting from the local address `local` when given (see
/// [`tls::connect_from`]).
pub async fn enroll_from(
    request: &Enroll<'_>,
    local: Option<std::net::IpAddr>,
) -> Result<DeviceIdentity, IdentityError> {
    let Enroll {
        controller_url,
        token,
        device_name,
        labels,
        ca_pem,
        trace_headers,
    } = *request;
    let (key_pem, csr_der) = generate_key_and_csr(device_name)?;
    let trust = match ca_pem {
        Some(pem) => TrustAnchor::CaPem(pem.to_string()),
        None => TrustAnchor::Fingerprint(token.ca_fingerprint),
    };
    let config = tls::client_config(&trust, None)?;
    let channel = tls::connect_from(controller_url, config, local).await?;
    let mut client = EnrollmentClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut request = tonic::Request::new(EnrollRequest {
        token: token.to_string(),
        device_name: device_name.to_string(),
        csr_der,
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    });
    // W3C trace context, so the controller's `enroll` span joins the agent's trace.
    for (key, value) in trace_headers {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            request.metadata_mut().insert(key, value);
        }
    }
    let response = tokio::time::timeout(ENROLL_TIMEOUT, client.enroll(request))
        .await
        .map_err(|_| IdentityError::Timeout(ENROLL_TIMEOUT))?
        .map_err(|status| IdentityError::Rejected {
            code: status.code(),
            message: status.message().to_string(),
        })?
        .into_inner();

    let bad = IdentityError::BadResponse;
    let bundle = tls::parse_certificates(&response.ca_bundle_pem, "the returned CA bundle")
        .map_err(|e| bad(e.to_string()))?;
    let returned_ca = &bundle[0];
    let pinned = match &trust {
        TrustAnchor::Fingerprint(fingerprint) => {
            tls::certificate_fingerprint(returned_ca) == *fingerprint
        }
        TrustAnchor::CaPem(pem) => {
            let given = tls::parse_certificates(pem, "the CA file")?;
            given[0] == *returned_ca
        }
    };
    if !pinned {
        return Err(bad(
            "the returned CA is not the one the token or CA file names".into(),
        ));
    }

    let chain = tls::parse_certificates(&response.certificate_pem, "the returned certificate")
        .map_err(|e| bad(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| bad(format!("our own key does not parse: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider)
        .map_err(|e| bad(format!("the certificate is not for our key: {e}")))?;
    let mut roots = RootCertStore::empty();
    roots
        .add(returned_ca.clone())
        .map_err(|e| bad(format!("the returned CA is unusable: {e}")))?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| bad(e.to_string()))?
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map_err(|e| {
            bad(format!(
                "the certificate is not a client certificate of the CA: {e}"
            ))
        })?;

    let name = if response.device_name.is_empty() {
        device_name.to_string()
    } else {
        validate_device_name(&response.device_name).map_err(|e| bad(e.to_string()))?;
        response.device_name
    };
    Ok(DeviceIdentity {
        name,
        cert_pem: response.certificate_pem,
        key_pem,
        ca_pem: response.ca_bundle_pem,
        not_after_unix_ms: response.not_after_unix_ms,
        issued_unix_ms: now_unix_ms(),
        controller: controller_url.to_string(),
    })
}

/// The name a device enrolls under when `--name` is not given: the host name (from
/// `/proc/sys/kernel/hostname` or `$HOSTNAME`), its first label, lower-cased and mapped
/// into DNS-label rules; "device" if nothing usable remains.
pub fn default_device_name() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    device_name_from_host(&host)
}

fn device_name_from_host(host: &str) -> String {
    let short = host.trim().split('.').next().unwrap_or_default();
    let mut name = String::with_capacity(short.len());
    for c in short.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        // Runs of replaced characters become one dash, not a row of them.
        if !(c == '-' && name.ends_with('-')) {
            name.push(c);
        }
    }
    let mut name = name.trim_matches('-').to_string();
    name.truncate(micromine_proto::names::MAX_DEVICE_NAME_LEN);
    let name = name.trim_end_matches('-');
    if name.is_empty() {
        "device".to_string()
    } else {
        name.to_string()
    }
}

/// The controller's device-name rules, checked here too so a bad `--name` fails before any
/// network traffic: 1..=63 characters of `[a-z0-9-]`, not starting or ending with '-'.
pub fn validate_device_name(name: &str) -> Result<(), IdentityError> {
    match micromine_proto::names::dns_label_problem(name) {
        None => Ok(()),
        Some(reason) => Err(IdentityError::InvalidDeviceName {
            name: name.to_string(),
            reason,
        }),
    }
}

fn corrupt(path: &Path, reason: String) -> IdentityError {
    IdentityError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

fn read(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| {
        IdentityError::Io(FileError {
            action: "reading",
            path: path.to_path_buf(),
            source,
        })
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A CA and a device certificate made with rcgen directly, so these tests do not need
    /// the controller.
    fn identity(name: &str) -> DeviceIdentity {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let (key_pem, csr_der) = generate_key_and_csr(name).unwrap();
        let csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der.into()).unwrap();
        let cert = csr.signed_by(&issuer).unwrap();
        DeviceIdentity {
            name: name.to_string(),
            cert_pem: cert.pem(),
            key_pem,
            ca_pem: ca_cert.pem(),
            not_after_unix_ms: 1_900_000_000_000,
            issued_unix_ms: 1_800_000_000_000,
            controller: "https://127.0.0.1:7443".into(),
        }
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert_eq!(DeviceIdentity::load(&state).unwrap(), None);
        let id = identity("gw-1");
        id.save(&state).unwrap();
        assert_eq!(DeviceIdentity::load(&state).unwrap(), Some(id.clone()));
        // Saving over an existing identity replaces it.
        let newer = identity("gw-1");
        newer.save(&state).unwrap();
        assert_eq!(DeviceIdentity::load(&state).unwrap(), Some(newer.clone()));
        newer.client_config().unwrap();
        let litter: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(litter.is_empty(), "{litter:?}");
    }

    #[cfg(unix)]
    #[test]
    fn the_key_file_and_state_dir_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        identity("gw-1").save(&state).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&state), 0o700);
    }

    #[test]
    fn corrupt_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for (file, junk) in [
            (META_FILE, "{\"name\": 5}"),
            (KEY_FILE, "not a key"),
            (CERT_FILE, "not a cert"),
            (CA_FILE, ""),
        ] {
            let state = dir.path().join(file);
            identity("gw-1").save(&state).unwrap();
            fs::write(state.join(file), junk).unwrap();
            let err = DeviceIdentity::load(&state).unwrap_err();
            assert!(
                matches!(err, IdentityError::Corrupt { .. }),
                "{file}: {err}"
            );
            assert!(err.to_string().contains(file), "{file}: {err}");
        }
    }

    #[test]
    fn a_key_from_another_identity_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        identity("gw-1").save(dir.path()).unwrap();
        fs::write(dir.path().join(KEY_FILE), identity("gw-1").key_pem).unwrap();
        let err = DeviceIdentity::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains(KEY_FILE), "{err}");
    }

    #[test]
    fn a_partial_identity_is_an_error_naming_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        identity("gw-1").save(dir.path()).unwrap();
        fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let err = DeviceIdentity::load(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Incomplete { .. }), "{err}");
        assert!(err.to_string().contains(CERT_FILE), "{err}");
    }

    #[test]
    fn debug_output_hides_the_key() {
        let id = identity("gw-1");
        let text = format!("{id:?}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        assert!(text.contains("gw-1"));
    }

    #[test]
    fn generated_csrs_verify_and_keys_are_pkcs8_p256() {
        let (key_pem, csr_der) = generate_key_and_csr("gw-9").unwrap();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let key = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
        let parsed = rcgen::CertificateSigningRequestParams::from_der(&csr_der.into()).unwrap();
        assert_eq!(parsed.public_key.algorithm(), &PKCS_ECDSA_P256_SHA256);
        assert!(matches!(
            generate_key_and_csr("Not Valid"),
            Err(IdentityError::InvalidDeviceName { .. })
        ));
    }

    #[test]
    fn host_names_become_device_names() {
        for (host, name) in [
            ("gw-0042\n", "gw-0042"),
            ("GW-0042.plant3.local", "gw-0042"),
            ("my_box  1", "my-box-1"),
            ("--edge--", "edge"),
            ("", "device"),
            ("___", "device"),
            ("ÄÖÜ", "device"),
        ] {
            assert_eq!(device_name_from_host(host), name, "{host:?}");
            validate_device_name(&device_name_from_host(host)).unwrap();
        }
        let long = format!("{}-{}", "a".repeat(62), "b".repeat(10));
        let name = device_name_from_host(&long);
        assert_eq!(name, "a".repeat(62));
        validate_device_name(&default_device_name()).unwrap();
    }
}
