//! The fleet CA: one ECDSA P-256 certificate authority per controller that signs the
//! controller's serving certificate and every device's client certificate.
//!
//! A device's identity is the common name of a certificate this CA signed, so the CA key is
//! the root of trust for the whole fleet: it is generated once, kept in `<pki dir>/ca.key`
//! (mode 0600) and never leaves the controller. Devices send a PKCS#10 request; their private
//! keys never reach the controller.
//!
//! # Files
//! - `ca.crt`: the active CA certificate (PEM). Its SHA-256 goes into bootstrap tokens.
//! - `ca.key`: the active CA private key (PKCS#8 PEM, mode 0600); it signs everything.
//! - `ca-next.crt`, `ca-next.key`: a staged successor ([`stage_next_ca`]), trusted and
//!   handed to devices but signing nothing until [`promote_next_ca`].
//! - `ca-previous.crt`: the CA the last promotion replaced, trusted for the device
//!   certificates it signed until [`retire_previous_ca`]; its key is gone.
//!
//! # Rotation
//! Devices verify the controller against the CA bundle they were given, and the controller
//! verifies devices against the same bundle, so a new CA is phased in without touching a
//! device: stage it (everyone renewing from then on learns it), promote it once every
//! device has renewed (new certificates come from it, old ones still work), retire the old
//! one once every device holds a certificate from the new one.

use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use micromine_host::files::{FileError, create_private_dir, sync_parent, write_temp};
use rand::TryRng;
use rand::rngs::SysRng;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use sha2::{Digest, Sha256};

/// Common name of the fleet CA, so operators recognise it in `openssl x509 -text` output.
pub const CA_COMMON_NAME: &str = "micromine fleet CA";
/// Common name of the controller's serving certificate. Clients check SANs, not this.
pub const SERVER_COMMON_NAME: &str = "micromine controller";

const CA_CERT_FILE: &str = "ca.crt";
const CA_KEY_FILE: &str = "ca.key";
const NEXT_CERT_FILE: &str = "ca-next.crt";
const NEXT_KEY_FILE: &str = "ca-next.key";
const PREVIOUS_CERT_FILE: &str = "ca-previous.crt";
/// Ten years: long enough that nobody has to rotate the root of a fleet in its lifetime.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The serving certificate is reissued on every controller start, so it can be short-lived.
const SERVER_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Certificates start a little in the past so devices whose clocks run behind accept them;
/// a certificate was issued this long after its `notBefore`.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Longer device certificates than this are a configuration mistake, not a policy.
const MAX_DEVICE_TTL: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// Everything that can go wrong with the CA and the certificates it issues.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file or directory of the PKI could not be read or written.
    #[error(transparent)]
    Io(#[from] FileError),
    /// A PKI file exists but does not hold what it should.
    #[error("{path} is not a valid {what}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the file should contain.
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// `ca.crt` and `ca.key` exist but are not a pair (e.g. one was replaced by hand).
    #[error("{cert} does not belong to the key in {key}; restore the matching pair or remove both")]
    CaKeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A subject alternative name for the serving certificate is neither an IP nor a DNS name.
    #[error("subject alternative name `{value}` is neither an IP address nor a valid DNS name")]
    InvalidSan {
        /// The rejected value.
        value: String,
    },
    /// A device name that cannot be a certificate common name and an `EdgeDevice` name.
    #[error("device name `{name}` is invalid: {reason}")]
    InvalidDeviceName {
        /// The rejected name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The requested certificate lifetime is zero or implausibly long.
    #[error("certificate ttl {ttl:?} is invalid: {reason}")]
    InvalidTtl {
        /// The rejected ttl.
        ttl: Duration,
        /// Which bound it breaks.
        reason: &'static str,
    },
    /// The certificate signing request is not well-formed DER PKCS#10.
    #[error("certificate signing request ({len} bytes) is malformed: {source}")]
    CsrMalformed {
        /// Size of the request as received.
        len: usize,
        /// What the parser said.
        #[source]
        source: rcgen::Error,
    },
    /// The request's self-signature does not verify, so its sender may not hold the key.
    #[error("certificate signing request ({len} bytes) has an invalid signature")]
    CsrSignature {
        /// Size of the request as received.
        len: usize,
    },
    /// Key generation or certificate signing failed inside rcgen.
    #[error("{what} failed: {source}")]
    Crypto {
        /// The operation, e.g. "signing the server certificate".
        what: &'static str,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// The operating system's random number generator failed.
    #[error("the OS random number generator failed: {0}")]
    Random(String),
    /// A rotation step was asked for out of order.
    #[error("{0}")]
    Rotation(String),
}

/// The fleet CA, loaded from or created in the PKI directory, with the other CAs a
/// rotation in progress trusts.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    active: CaCertificate,
    /// The staged next CA and the previous one, whichever exist, in that order.
    also_trusted: Vec<CaCertificate>,
}

/// Which part a CA plays in the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaRole {
    /// Signs the serving certificate and every new device certificate.
    Active,
    /// Staged: trusted and handed to devices, signs nothing yet.
    Next,
    /// Replaced by the last promotion: trusted for the device certificates it signed.
    Previous,
}

impl fmt::Display for CaRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CaRole::Active => "active",
            CaRole::Next => "next",
            CaRole::Previous => "previous",
        })
    }
}

/// One CA certificate the fleet trusts.
#[derive(Debug, Clone)]
pub struct CaCertificate {
    /// What it is for.
    pub role: CaRole,
    /// The certificate, PEM.
    pub pem: String,
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
    /// When it expires, Unix seconds.
    pub not_after_unix_s: i64,
}

impl CaCertificate {
    /// SHA-256 of the DER, as bootstrap tokens and `ca export` show it.
    pub fn fingerprint(&self) -> [u8; 32] {
        Sha256::digest(self.der.as_ref()).into()
    }
}

/// The key and chain the controller serves TLS with.
pub struct ServerIdentity {
    /// `[leaf, ca]`: the CA travels along so that a device holding only the CA's fingerprint
    /// (from its bootstrap token) can find and pin it.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key, PKCS#8.
    pub key: PrivateKeyDer<'static>,
    /// When the leaf expires (Unix ms), so the controller knows when to reissue it.
    pub not_after_unix_ms: i64,
}

/// A device certificate as handed back to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The signed certificate, PEM.
    pub certificate_pem: String,
    /// When it expires, Unix milliseconds (whole seconds, as certificates store them).
    pub not_after_unix_ms: i64,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("ca_fingerprint", &hex::encode(self.ca_fingerprint()))
            .field("ca_not_after_unix_s", &self.active.not_after_unix_s)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("chain_len", &self.cert_chain.len())
            .field("not_after_unix_ms", &self.not_after_unix_ms)
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Loads `<dir>/ca.crt` + `<dir>/ca.key` (PEM) or creates them: ECDSA P-256, 10 years,
    /// CN "micromine fleet CA", basic constraints CA.
    ///
    /// Two processes may race here (a `token create` next to a starting controller): each
    /// file is published with a hard link, which like `create_new` fails when the file
    /// exists, and the loser loads the winner's file. The key is published first and the
    /// certificate is made from whichever key won, so a crash between the two steps leaves
    /// a key that the next start completes with a certificate.
    pub fn load_or_create(dir: &Path) -> Result<Pki, PkiError> {
        create_private_dir(dir).map_err(FileError::at("creating directory", dir))?;
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        finish_interrupted_promotion(dir)?;

        if !exists(&key_path)? {
            let key = generate_key("generating the CA key")?;
            if publish_new(&key_path, key.serialize_pem().as_bytes(), 0o600)? {
                tracing::info!(path = %key_path.display(), "created the fleet CA key");
            }
        }
        let key = load_key(&key_path)?;

        if !exists(&cert_path)? {
            let cert_pem = self_signed_ca(&key)?;
            if publish_new(&cert_path, cert_pem.as_bytes(), 0o644)? {
                tracing::info!(path = %cert_path.display(), "created the fleet CA certificate");
            }
        }
        let active = load_ca_cert(&cert_path, CaRole::Active, Some((&key, &key_path)))?;
        let mut also_trusted = Vec::new();
        let next_cert = dir.join(NEXT_CERT_FILE);
        let next_key = dir.join(NEXT_KEY_FILE);
        // A staged CA is usable once both halves exist; a lone key is a staging that
        // crashed half way, which `stage_next_ca` completes.
        if exists(&next_cert)? && exists(&next_key)? {
            let key = load_key(&next_key)?;
            also_trusted.push(load_ca_cert(
                &next_cert,
                CaRole::Next,
                Some((&key, &next_key)),
            )?);
        }
        let previous = dir.join(PREVIOUS_CERT_FILE);
        if exists(&previous)? {
            also_trusted.push(load_ca_cert(&previous, CaRole::Previous, None)?);
        }
        Pki::assemble(active, key, &cert_path, also_trusted)
    }

    /// Loads a CA managed elsewhere (e.g. a cert-manager Secret mounted as `tls.crt` and
    /// `tls.key`; the key in PKCS#8 PEM). Nothing is created, and rotating it is the
    /// manager's business: the certificate must be a CA and match the key.
    pub fn load_files(cert_path: &Path, key_path: &Path) -> Result<Pki, PkiError> {
        let key = load_key(key_path)?;
        let active = load_ca_cert(cert_path, CaRole::Active, Some((&key, key_path)))?;
        Pki::assemble(active, key, cert_path, Vec::new())
    }

    /// The active CA with its key (checked to match) becomes the issuer.
    fn assemble(
        active: CaCertificate,
        key: KeyPair,
        cert_path: &Path,
        also_trusted: Vec<CaCertificate>,
    ) -> Result<Pki, PkiError> {
        let issuer = Issuer::from_ca_cert_der(&active.der, key).map_err(|e| PkiError::Corrupt {
            path: cert_path.to_path_buf(),
            what: "CA certificate",
            reason: e.to_string(),
        })?;
        Ok(Pki {
            issuer,
            active,
            also_trusted,
        })
    }

    /// Every CA the fleet trusts, the active one first: the roots for verifying device
    /// certificates.
    pub fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        self.cas().map(|ca| ca.der.clone()).collect()
    }

    /// Every CA the fleet trusts, the active one first.
    pub fn cas(&self) -> impl Iterator<Item = &CaCertificate> {
        std::iter::once(&self.active).chain(&self.also_trusted)
    }

    /// The CA bundle handed to devices at enrollment and renewal (PEM, the active CA
    /// first, so a device can check it against its token's fingerprint). Devices trust
    /// every CA in it, which is what lets a staged CA take over without touching them.
    pub fn bundle_pem(&self) -> String {
        let mut bundle = self.active.pem.clone();
        for ca in &self.also_trusted {
            if !bundle.ends_with('\n') {
                bundle.push('\n');
            }
            bundle.push_str(&ca.pem);
        }
        bundle
    }

    /// The CAs other than the active one that are trusted now.
    pub fn rotation(&self) -> &[CaCertificate] {
        &self.also_trusted
    }

    /// The active CA certificate as PEM.
    pub fn ca_pem(&self) -> &str {
        &self.active.pem
    }

    /// The active CA certificate as DER.
    pub fn ca_der(&self) -> &[u8] {
        self.active.der.as_ref()
    }

    /// SHA-256 of the CA certificate DER (goes into bootstrap tokens, so a device can
    /// authenticate the controller before it reveals the token's secret).
    pub fn ca_fingerprint(&self) -> [u8; 32] {
        Sha256::digest(self.active.der.as_ref()).into()
    }

    /// The controller's serving certificate: signed by the CA, valid 90 days, EKU serverAuth,
    /// SANs = always "localhost", 127.0.0.1, ::1, plus `extra_sans` (each parsed as an IP if
    /// it is one, otherwise a DNS name; invalid names are an error naming the value).
    ///
    /// A fresh key every time: the controller reissues on start and keeps nothing on disk.
    pub fn issue_server_identity(&self, extra_sans: &[String]) -> Result<ServerIdentity, PkiError> {
        let mut sans: Vec<SanType> = Vec::new();
        let defaults = ["localhost", "127.0.0.1", "::1"].map(String::from);
        for value in defaults.iter().chain(extra_sans) {
            let san = parse_san(value)?;
            if !sans.contains(&san) {
                sans.push(san);
            }
        }

        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(SERVER_COMMON_NAME);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        let not_after = self.set_validity(&mut params, SERVER_VALIDITY);

        let key = generate_key("generating the server key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Crypto {
                what: "signing the server certificate",
                source,
            })?;
        Ok(ServerIdentity {
            cert_chain: vec![cert.der().clone(), self.active.der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_after_unix_ms: not_after.saturating_mul(1000),
        })
    }

    /// Signs a device's PKCS#10 CSR (DER).
    ///
    /// The CSR's subject and requested extensions are ignored: the certificate gets
    /// CN=`device_name` (validated with [`validate_device_name`]), EKU clientAuth, validity
    /// from now-5min to now+`ttl` (never past the CA's own expiry). The CSR's signature must
    /// verify, which proves the sender holds the private key it asks us to certify.
    pub fn sign_device_csr(
        &self,
        csr_der: &[u8],
        device_name: &str,
        ttl: Duration,
    ) -> Result<IssuedCert, PkiError> {
        validate_device_name(device_name)?;
        if ttl.is_zero() {
            return Err(PkiError::InvalidTtl {
                ttl,
                reason: "must be positive",
            });
        }
        if ttl > MAX_DEVICE_TTL {
            return Err(PkiError::InvalidTtl {
                ttl,
                reason: "must be at most 5 years",
            });
        }
        let len = csr_der.len();
        let mut csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|source| match source {
                    rcgen::Error::InvalidCertificationRequestSignature => {
                        PkiError::CsrSignature { len }
                    }
                    source => PkiError::CsrMalformed { len, source },
                })?;

        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(device_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        let not_after = self.set_validity(&mut params, ttl);
        csr.params = params;

        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|source| PkiError::Crypto {
                what: "signing the device certificate",
                source,
            })?;
        Ok(IssuedCert {
            certificate_pem: cert.pem(),
            not_after_unix_ms: not_after.saturating_mul(1000),
        })
    }

    /// Sets not-before/not-after on `params` and returns not-after in Unix seconds. A leaf
    /// that outlives its CA would be rejected by every verifier, so it is cut at the CA's end.
    fn set_validity(&self, params: &mut CertificateParams, ttl: Duration) -> i64 {
        let now = now_unix_s();
        let not_before = now.saturating_sub(duration_secs(CLOCK_SKEW));
        let not_after = now
            .saturating_add(duration_secs(ttl))
            .min(self.active.not_after_unix_s);
        set_times(params, not_before, not_after);
        not_after
    }
}

/// Checks that `name` can be a device's certificate CN and its `EdgeDevice` object name:
/// DNS-label rules, 1..=63 characters of `[a-z0-9-]`, not starting or ending with '-'.
pub fn validate_device_name(name: &str) -> Result<(), PkiError> {
    match micromine_proto::names::dns_label_problem(name) {
        None => Ok(()),
        Some(reason) => Err(PkiError::InvalidDeviceName {
            name: name.to_string(),
            reason,
        }),
    }
}

/// Stages a new CA in `dir` as `ca-next.*` and returns it. The controller trusts it and
/// hands it to devices from its next start; it signs nothing until [`promote_next_ca`].
/// Fails if one is already staged.
pub fn stage_next_ca(dir: &Path) -> Result<CaCertificate, PkiError> {
    // The active CA must exist first: a fresh directory would otherwise get two new CAs.
    Pki::load_or_create(dir)?;
    let key_path = dir.join(NEXT_KEY_FILE);
    let cert_path = dir.join(NEXT_CERT_FILE);
    if exists(&cert_path)? {
        return Err(PkiError::Rotation(format!(
            "a next CA is already staged ({}); promote it with `ca promote` first",
            cert_path.display()
        )));
    }
    if !exists(&key_path)? {
        let key = generate_key("generating the next CA key")?;
        publish_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    }
    let key = load_key(&key_path)?;
    publish_new(&cert_path, self_signed_ca(&key)?.as_bytes(), 0o644)?;
    load_ca_cert(&cert_path, CaRole::Next, Some((&key, &key_path)))
}

/// Makes the staged CA the active one: the old active certificate becomes
/// `ca-previous.crt` (still trusted for the device certificates it signed) and its key is
/// destroyed. Fails if nothing is staged or a previous CA has not been retired yet.
pub fn promote_next_ca(dir: &Path) -> Result<CaCertificate, PkiError> {
    let pki = Pki::load_or_create(dir)?;
    let next = pki
        .also_trusted
        .iter()
        .find(|ca| ca.role == CaRole::Next)
        .cloned()
        .ok_or_else(|| {
            PkiError::Rotation("no next CA is staged; stage one with `ca stage` first".into())
        })?;
    let previous = dir.join(PREVIOUS_CERT_FILE);
    // A copy of the active CA there is this step's own work from a run that stopped early.
    if exists(&previous)? && read_to_string(&previous)? != pki.active.pem {
        return Err(PkiError::Rotation(format!(
            "{} is still trusted; retire it with `ca retire` once every device has renewed, then promote",
            previous.display()
        )));
    }
    publish_new(&previous, pki.active.pem.as_bytes(), 0o644)?;
    // Key first: if we stop between the two renames, `ca-next.crt` without its key and
    // an active key that matches it tells `load_or_create` to finish the job.
    rename(&dir.join(NEXT_KEY_FILE), &dir.join(CA_KEY_FILE))?;
    rename(&dir.join(NEXT_CERT_FILE), &dir.join(CA_CERT_FILE))?;
    Ok(CaCertificate {
        role: CaRole::Active,
        ..next
    })
}

/// Stops trusting the CA the last promotion replaced: device certificates it signed are
/// refused from the controller's next start. Returns it; fails if there is none.
pub fn retire_previous_ca(dir: &Path) -> Result<CaCertificate, PkiError> {
    let path = dir.join(PREVIOUS_CERT_FILE);
    if !exists(&path)? {
        return Err(PkiError::Rotation(
            "there is no previous CA to retire".into(),
        ));
    }
    let retired = load_ca_cert(&path, CaRole::Previous, None)?;
    fs::remove_file(&path).map_err(FileError::at("removing", &path))?;
    sync_parent(&path);
    Ok(retired)
}

/// Completes a promotion that stopped between moving the next key and the next
/// certificate into place.
fn finish_interrupted_promotion(dir: &Path) -> Result<(), PkiError> {
    let next_cert = dir.join(NEXT_CERT_FILE);
    let active_key = dir.join(CA_KEY_FILE);
    if !exists(&next_cert)? || exists(&dir.join(NEXT_KEY_FILE))? || !exists(&active_key)? {
        return Ok(());
    }
    let key = load_key(&active_key)?;
    if load_ca_cert(&next_cert, CaRole::Next, Some((&key, &active_key))).is_ok() {
        tracing::warn!(dir = %dir.display(), "finishing a CA promotion that was interrupted");
        rename(&next_cert, &dir.join(CA_CERT_FILE))?;
    }
    Ok(())
}

/// Reads a CA certificate and checks it is one (and, given a key, that it is that key's).
fn load_ca_cert(
    path: &Path,
    role: CaRole,
    key: Option<(&KeyPair, &Path)>,
) -> Result<CaCertificate, PkiError> {
    let pem = read_to_string(path)?;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Corrupt {
        path: path.to_path_buf(),
        what: "PEM certificate",
        reason: e.to_string(),
    })?;
    let corrupt = |reason: String| PkiError::Corrupt {
        path: path.to_path_buf(),
        what: "CA certificate",
        reason,
    };
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| corrupt(e.to_string()))?;
    if let Some((key, key_path)) = key
        && parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw()
    {
        return Err(PkiError::CaKeyMismatch {
            cert: path.to_path_buf(),
            key: key_path.to_path_buf(),
        });
    }
    if !parsed.is_ca() {
        return Err(corrupt("basic constraints do not mark it as a CA".into()));
    }
    let not_after_unix_s = parsed.validity().not_after.timestamp();
    if not_after_unix_s <= now_unix_s() {
        tracing::warn!(path = %path.display(), %role, "a fleet CA certificate has expired; certificates it signed no longer verify");
    }
    Ok(CaCertificate {
        role,
        pem,
        der: der.into_owned(),
        not_after_unix_s,
    })
}

fn rename(from: &Path, to: &Path) -> Result<(), PkiError> {
    fs::rename(from, to).map_err(FileError::at("renaming", from))?;
    sync_parent(to);
    Ok(())
}

fn parse_san(value: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let invalid = || PkiError::InvalidSan {
        value: value.to_string(),
    };
    // The same check rustls applies to server names, so a SAN we issue is one a client can
    // ask for.
    rustls_pki_types::DnsName::try_from(value).map_err(|_| invalid())?;
    Ok(SanType::DnsName(value.try_into().map_err(|_| invalid())?))
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn self_signed_ca(key: &KeyPair) -> Result<String, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(CA_COMMON_NAME);
    // Path length 0: this CA signs leaves only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    let now = now_unix_s();
    set_times(
        &mut params,
        now.saturating_sub(duration_secs(CLOCK_SKEW)),
        now.saturating_add(duration_secs(CA_VALIDITY)),
    );
    let cert = params.self_signed(key).map_err(|source| PkiError::Crypto {
        what: "self-signing the CA certificate",
        source,
    })?;
    Ok(cert.pem())
}

fn generate_key(what: &'static str) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|source| PkiError::Crypto { what, source })
}

fn load_key(path: &Path) -> Result<KeyPair, PkiError> {
    let pem = read_to_string(path)?;
    KeyPair::from_pem(&pem).map_err(|e| PkiError::Corrupt {
        path: path.to_path_buf(),
        what: "PEM private key",
        reason: e.to_string(),
    })
}

/// RFC 5280 wants serials unique per CA; rcgen's default derives them from the public key,
/// which repeats when a device renews with the same key.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| PkiError::Random(e.to_string()))?;
    // Keep it positive and free of a leading zero octet in DER.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Sets the validity window. rcgen speaks `time::OffsetDateTime`, which this crate does not
/// depend on; the values are built from rcgen's own epoch constructor instead.
fn set_times(params: &mut CertificateParams, not_before_unix_s: i64, not_after_unix_s: i64) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let since_epoch = |s: i64| Duration::from_secs(u64::try_from(s).unwrap_or(0));
    params.not_before = epoch + since_epoch(not_before_unix_s);
    params.not_after = epoch + since_epoch(not_after_unix_s);
}

fn duration_secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn now_unix_s() -> i64 {
    duration_secs(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(|source| {
        PkiError::Io(FileError {
            action: "checking",
            path: path.to_path_buf(),
            source,
        })
    })
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| {
        PkiError::Io(FileError {
            action: "reading",
            path: path.to_path_buf(),
            source,
        })
    })
}

/// Writes `contents` to `path` only if `path` does not exist yet, all or nothing: the data
/// goes to a private temporary file first and is then hard-linked into place, which fails
/// (like `create_new`) if another process got there first. Returns whether we won.
fn publish_new(path: &Path, contents: &[u8], mode: u32) -> Result<bool, PkiError> {
    let io_err = |action, source| {
        PkiError::Io(FileError {
            action,
            path: path.to_path_buf(),
            source,
        })
    };
    let tmp = write_temp(path, contents, mode).map_err(|e| io_err("writing", e))?;
    let linked = fs::hard_link(&tmp, path);
    // The temporary name is ours alone; failing to remove it only leaves litter.
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_parent(path);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_err("publishing", e)),
    }
}

#[cfg(test)]
mod tests;
