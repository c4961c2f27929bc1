//! TLS from the agent to the controller: rustls with the ring provider, and a tonic channel
//! that runs over it.
//!
//! The agent brings its own connector instead of tonic's TLS support so that the one rustls
//! `ClientConfig` built here, with its trust decision, is what every connection uses. There
//! is no plaintext path: a URL that is not `https://` is refused.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// Long enough for a slow cellular link, short enough that a dead controller address is
/// reported while the operator is still watching.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings keep NAT and firewall state alive on idle sessions and detect a vanished
/// controller well before TCP would.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the agent trusts for the controller's certificate.
#[derive(Clone, PartialEq, Eq)]
pub enum TrustAnchor {
    /// A CA bundle (PEM) — from enrollment or `--ca-file`.
    CaPem(String),
    /// Only the SHA-256 fingerprint of the CA certificate, from a bootstrap token. The server
    /// must send its CA in the chain (`[leaf, ca]`); the chain element whose SHA-256 matches
    /// becomes the only trust anchor, and the leaf is verified against it with rustls'
    /// WebPKI verifier, hostname included. No matching element fails the handshake.
    Fingerprint([u8; 32]),
}

impl fmt::Debug for TrustAnchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustAnchor::CaPem(pem) => f
                .debug_tuple("CaPem")
                .field(&format_args!("{} bytes", pem.len()))
                .finish(),
            TrustAnchor::Fingerprint(fp) => f
                .debug_tuple("Fingerprint")
                .field(&hex::encode(fp))
                .finish(),
        }
    }
}

/// Why a TLS configuration or connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM input holds no certificate or cannot be parsed.
    #[error("{what} is not valid PEM: {reason}")]
    Pem {
        /// Which input, e.g. "the CA bundle".
        what: &'static str,
        /// What the parser said.
        reason: String,
    },
    /// A CA certificate was rejected as a trust anchor.
    #[error("the CA bundle holds an unusable certificate: {0}")]
    TrustAnchor(#[source] rustls::Error),
    /// rustls rejected the client certificate and key (e.g. they are not a pair).
    #[error("the client certificate and key cannot be used: {0}")]
    ClientIdentity(#[source] rustls::Error),
    /// rustls rejected the protocol versions (a provider without TLS 1.2/1.3 suites).
    #[error("building the TLS client configuration failed: {0}")]
    Config(#[source] rustls::Error),
    /// The controller URL is not something the agent will connect to.
    #[error("controller URL `{url}` is invalid: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TCP connect, TLS handshake or HTTP/2 setup failed; the source chain says which.
    #[error("could not connect to {url}")]
    Connect {
        /// The controller URL.
        url: String,
        /// The underlying error (tonic's transport error; its sources carry the details).
        #[source]
        source: tonic::transport::Error,
    },
}

/// The agent's rustls `ClientConfig`: ring provider, TLS 1.2 and 1.3, ALPN "h2", trusting
/// `trust` for the controller and presenting `client_identity` (certificate chain PEM, key
/// PEM) when given — `None` only for enrollment, when the device has no certificate yet.
pub fn client_config(
    trust: &TrustAnchor,
    client_identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?;
    let builder = match trust {
        TrustAnchor::CaPem(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in parse_certificates(pem, "the CA bundle")? {
                roots.add(cert).map_err(TlsError::TrustAnchor)?;
            }
            builder.with_root_certificates(roots)
        }
        TrustAnchor::Fingerprint(fingerprint) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(FingerprintVerifier {
                fingerprint: *fingerprint,
                provider,
            })),
    };
    // Without a certificate the only thing to do is enroll; the marker tells the controller
    // so during the handshake, which it otherwise refuses without a client certificate.
    let enrolling = client_identity.is_none();
    let mut config = match client_identity {
        None => builder.with_no_client_auth(),
        Some((chain_pem, key_pem)) => {
            let chain = parse_certificates(chain_pem, "the client certificate")?;
            let key =
                PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Pem {
                    what: "the client private key",
                    reason: e.to_string(),
                })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(TlsError::ClientIdentity)?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    if enrolling {
        config
            .alpn_protocols
            .push(micromine_proto::ENROLL_ALPN.to_vec());
    }
    Ok(Arc::new(config))
}

/// Every certificate in a PEM text; at least one.
pub fn parse_certificates(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            reason: "it contains no certificate".into(),
        });
    }
    Ok(certs)
}

/// SHA-256 of a certificate's DER: the fingerprint bootstrap tokens carry.
pub fn certificate_fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// Trust on a fingerprint, as `kubeadm join --discovery-token-ca-cert-hash` does: the
/// device knows the hash of the CA, not the CA itself, so it picks the CA out of the
/// server's chain by hash and then verifies normally against it.
struct FingerprintVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for FingerprintVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FingerprintVerifier")
            .field("fingerprint", &hex::encode(self.fingerprint))
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(position) = intermediates
            .iter()
            .position(|cert| certificate_fingerprint(cert) == self.fingerprint)
        else {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(intermediates[position].clone().into_owned())?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != position)
            .map(|(_, cert)| cert.clone())
            .collect();
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Where to connect and what name to verify, from an `https://host[:port]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

fn parse_target(url: &str) -> Result<Target, TlsError> {
    let invalid = |reason: &str| TlsError::InvalidUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            return Err(invalid("plaintext http:// is never allowed; use https://"));
        }
        Some(other) => return Err(invalid(&format!("scheme `{other}` is not https"))),
        None => return Err(invalid("it must start with https://")),
    }
    let host = uri.host().ok_or_else(|| invalid("it has no host"))?;
    // IPv6 literals come bracketed in URLs but not in server names or socket addresses.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(invalid("it has no host"));
    }
    let port = uri.port_u16().unwrap_or(443);
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid("it must be just https://host:port, without a path"));
    }
    let server_name = ServerName::try_from(host.to_string())
        .map_err(|_| invalid("the host is neither a DNS name nor an IP address"))?;
    Ok(Target {
        host: host.to_string(),
        port,
        server_name,
    })
}

/// Connects a tonic `Channel` to the controller at `url` (`https://host:port`) over
/// `config`.
///
/// TCP connect and the TLS handshake happen in a custom connector, so the trust decision in
/// `config` is the only one. The TLS server name is the URL's host (a DNS name or an IP
/// literal). Connect timeout 10 s, HTTP/2 keepalive every 20 s with a 10 s timeout, also
/// while idle, TCP_NODELAY. The channel reconnects by itself after a connection drops, with
/// the same connector.
pub async fn connect(url: &str, config: Arc<ClientConfig>) -> Result<Channel, TlsError> {
    connect_from(url, config, None).await
}

/// [`connect`] from the local address `local` (port chosen by the system) when given: a
/// simulated fleet on one machine gives each device its own loopback address, as real
/// devices have their own, so no one address runs short of ports.
pub async fn connect_from(
    url: &str,
    config: Arc<ClientConfig>,
    local: Option<std::net::IpAddr>,
) -> Result<Channel, TlsError> {
    let target = parse_target(url)?;
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|source| TlsError::Connect {
            url: url.to_string(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let connector = TlsConnector::from(config);
    let connect = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let target = target.clone();
        async move {
            let tcp = match local {
                None => TcpStream::connect((target.host.as_str(), target.port)).await?,
                Some(local) => connect_tcp_from(&target, local).await?,
            };
            // The endpoint's nodelay setting applies only to tonic's own connector.
            tcp.set_nodelay(true)?;
            let tls = connector.connect(target.server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(connect)
        .await
        .map_err(|source| TlsError::Connect {
            url: url.to_string(),
            source,
        })
}

/// TCP to `target` from `local`: the first of the target's addresses in `local`'s family.
async fn connect_tcp_from(target: &Target, local: std::net::IpAddr) -> std::io::Result<TcpStream> {
    let remote = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await?
        .find(|a| a.is_ipv4() == local.is_ipv4())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                format!("{} has no address of {local}'s family", target.host),
            )
        })?;
    let socket = if local.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(std::net::SocketAddr::new(local, 0))?;
    socket.connect(remote).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn urls_must_be_https_with_a_host() {
        let t = parse_target("https://controller.example.com:7443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("controller.example.com", 7443));
        assert!(matches!(t.server_name, ServerName::DnsName(_)));

        let t = parse_target("https://[::1]:7443/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 7443));
        assert!(matches!(t.server_name, ServerName::IpAddress(_)));

        let t = parse_target("https://10.0.0.5").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("10.0.0.5", 443));

        for (bad, needle) in [
            ("http://127.0.0.1:7443", "plaintext"),
            ("ftp://x:1", "not https"),
            ("127.0.0.1:7443", "https://"),
            ("https://x:1/api", "path"),
            ("https://", ""),
            ("not a url", ""),
        ] {
            let err = parse_target(bad).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(bad), "{text}");
            assert!(text.contains(needle), "{bad}: {text}");
        }
    }

    #[tokio::test]
    async fn connect_refuses_plaintext_before_touching_the_network() {
        let config = client_config(&TrustAnchor::Fingerprint([0; 32]), None).unwrap();
        let err = connect("http://127.0.0.1:1", config).await.unwrap_err();
        assert!(matches!(err, TlsError::InvalidUrl { .. }), "{err}");
    }

    #[test]
    fn bad_pem_is_reported_with_what_it_was() {
        let err = client_config(&TrustAnchor::CaPem("nothing here".into()), None).unwrap_err();
        assert!(err.to_string().contains("CA bundle"), "{err}");
        let err = client_config(
            &TrustAnchor::Fingerprint([0; 32]),
            Some(("no cert", "no key")),
        )
        .unwrap_err();
        assert!(err.to_string().contains("client certificate"), "{err}");
    }

    #[test]
    fn trust_anchor_debug_hides_nothing_secret_but_stays_short() {
        let fp = TrustAnchor::Fingerprint([0xab; 32]);
        assert!(format!("{fp:?}").contains("abab"));
        let pem = TrustAnchor::CaPem("x".repeat(1000));
        assert!(format!("{pem:?}").len() < 100);
    }

    struct Ca {
        cert: CertificateDer<'static>,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    fn ca(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap().der().clone();
        Ca {
            cert,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn leaf(ca: &Ca, san: &str) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![san.to_string()]).unwrap();
        params.signed_by(&key, &ca.issuer).unwrap().der().clone()
    }

    fn verify(
        fingerprint: [u8; 32],
        chain: &[CertificateDer<'static>],
        name: &str,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verifier = FingerprintVerifier {
            fingerprint,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        };
        verifier.verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from(name.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
    }

    #[test]
    fn the_fingerprint_verifier_pins_the_ca_and_checks_the_name() {
        let fleet = ca("fleet");
        let pinned = certificate_fingerprint(&fleet.cert);
        let good = leaf(&fleet, "controller.example.com");
        verify(
            pinned,
            &[good.clone(), fleet.cert.clone()],
            "controller.example.com",
        )
        .unwrap();

        // The name is still checked.
        let err = verify(
            pinned,
            &[good.clone(), fleet.cert.clone()],
            "other.example.com",
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
            ),
            "{err:?}"
        );

        // Without the CA in the chain there is nothing to pin.
        let err = verify(pinned, &[good], "controller.example.com").unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );

        // An impostor who sends our CA along with its own leaf gets nowhere.
        let impostor = ca("impostor");
        let forged = leaf(&impostor, "controller.example.com");
        let chain = [forged.clone(), impostor.cert.clone(), fleet.cert.clone()];
        assert!(verify(pinned, &chain, "controller.example.com").is_err());
        // And a leaf that is itself the pinned certificate is no substitute for a chain.
        assert!(
            verify(
                pinned,
                std::slice::from_ref(&fleet.cert),
                "controller.example.com"
            )
            .is_err()
        );
    }

    #[test]
    fn client_config_speaks_h2_and_marks_enrollment() {
        let config = client_config(&TrustAnchor::Fingerprint([0; 32]), None).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), micromine_proto::ENROLL_ALPN.to_vec()]
        );
    }
}
