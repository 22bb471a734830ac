//! TLS material loading and the rustls configurations of the link and the frontends.
//!
//! - The link (agent ↔ server) is TLS 1.3 only, ALPN [`ALPN_LINK`](crate::ALPN_LINK), and mutual:
//!   the server demands a client certificate signed by the agent CA.
//! - The CONNECT frontend (kube-apiserver → server) accepts TLS 1.2 and 1.3 and also demands a
//!   client certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS material could not be loaded or a configuration built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}: {source}")]
    Pem {
        /// What the file should hold ("certificate", "private key", "CA bundle").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM file holds no certificate.
    #[error("{path} contains no PEM certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate was rejected.
    #[error("invalid CA certificate in {path}: {source}")]
    InvalidCa {
        /// The file.
        path: PathBuf,
        /// Why rustls rejected it.
        #[source]
        source: rustls::Error,
    },
    /// The certificate verifier could not be built.
    #[error("cannot build certificate verifier: {0}")]
    Verifier(String),
    /// rustls rejected the configuration (for example a key that does not match the certificate).
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

impl TlsError {
    /// Whether loading an [`Identity`] failed over its private key rather than its certificate:
    /// an unreadable key, or one rustls rejects (it does not match the certificate, say).
    pub fn concerns_key(&self) -> bool {
        matches!(
            self,
            TlsError::Pem {
                what: "private key",
                ..
            } | TlsError::Config(_)
        )
    }
}

/// A certificate chain and its private key.
pub struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("certs", &self.certs.len())
            .field("key", &"***")
            .finish()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            certs: self.certs.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Loads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let certs = load_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem {
            what: "private key",
            path: key.to_owned(),
            source,
        })?;
        Ok(Identity { certs, key })
    }

    /// Builds an identity from PEM text held in memory.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let memory = || PathBuf::from("<memory>");
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem {
                what: "certificate",
                path: memory(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate { path: memory() });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::Pem {
            what: "private key",
            path: memory(),
            source,
        })?;
        Ok(Identity { certs, key })
    }
}

/// Reads every certificate of a PEM file; at least one must be present.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |source| TlsError::Pem {
        what: "certificate",
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A set of trusted CA certificates.
#[derive(Debug, Clone)]
pub struct TrustAnchors(Arc<RootCertStore>);

impl TrustAnchors {
    /// Loads a PEM CA bundle.
    pub fn from_pem_file(path: &Path) -> Result<Self, TlsError> {
        Self::from_certs(load_certs(path)?, path)
    }

    /// Builds trust anchors from PEM text held in memory.
    pub fn from_pem(pem: &[u8]) -> Result<Self, TlsError> {
        let path = Path::new("<memory>");
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem {
                what: "CA bundle",
                path: path.to_owned(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate {
                path: path.to_owned(),
            });
        }
        Self::from_certs(certs, path)
    }

    fn from_certs(certs: Vec<CertificateDer<'static>>, path: &Path) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|source| TlsError::InvalidCa {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(TrustAnchors(Arc::new(roots)))
    }
}

mod verified;

fn ring_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring_provider())
}

/// The CONNECT frontend's client certificate verifier: webpki's, whose chain signature checks
/// are remembered once they succeeded (see [`verified`]); the handshake signature is checked
/// in full every time.
fn frontend_client_verifier(
    client_ca: &TrustAnchors,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut provider = ring_provider();
    provider.signature_verification_algorithms = rustls::crypto::WebPkiSupportedAlgorithms {
        all: verified::chain_algorithms(),
        mapping: provider.signature_verification_algorithms.mapping,
    };
    WebPkiClientVerifier::builder_with_provider(client_ca.0.clone(), Arc::new(provider))
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))
}

/// Whether agents must present a client certificate during the TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every agent presents a certificate signed by the agent CA.
    Required,
    /// An agent may also come without one and authenticate otherwise (a konnectivity agent's
    /// service-account token); a certificate it presents is still verified.
    Optional,
}

/// Server side of the link: TLS 1.3, client certificates verified against `agent_ca`.
pub fn link_server_config(
    identity: &Identity,
    agent_ca: &TrustAnchors,
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(agent_ca.0.clone(), provider());
    let verifier = match client_auth {
        ClientAuth::Required => verifier,
        ClientAuth::Optional => verifier.allow_unauthenticated(),
    }
    .build()
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.certs.clone(), identity.key.clone_key())?;
    // Native cplink agents ask for cplink/1; upstream konnectivity agents speak gRPC over h2
    // on the same port.
    config.alpn_protocols = vec![crate::ALPN_LINK.to_vec(), crate::ALPN_H2.to_vec()];
    // Tickets would let a resumed session skip client authentication bookkeeping; links are
    // long-lived, so resumption buys nothing.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Agent side of the link: TLS 1.3, verifies the server against `server_ca`, presents `identity`.
pub fn link_client_config(
    identity: &Identity,
    server_ca: &TrustAnchors,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(server_ca.0.clone(), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(identity.certs.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![crate::ALPN_LINK.to_vec()];
    Ok(Arc::new(config))
}

/// The TCP CONNECT frontend: TLS 1.2 or 1.3, client certificate signed by `client_ca` required.
pub fn frontend_server_config(
    identity: &Identity,
    client_ca: &TrustAnchors,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(frontend_client_verifier(client_ca)?)
        .with_single_cert(identity.certs.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // kube-apiserver's egress dialer makes a fresh tls.Config for every dial and never resumes
    // a session: every ticket (TLS 1.3) or cached session (TLS 1.2) would be work and memory
    // spent on every connection for nothing. A client that does offer to resume gets a full
    // handshake, its certificate verified again.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// A client configuration for CONNECT frontends, used by tests, benchmarks and tools.
///
/// It handshakes as kube-apiserver's egress dialer does (Go's `crypto/tls` with a fresh
/// `tls.Config` per dial): a full handshake every time, never a resumed session, and
/// AES-128-GCM ahead of AES-256-GCM, Go's order on hardware with AES instructions. What a
/// benchmark measures through it is then what kube-apiserver's dials cost.
pub fn frontend_client_config(
    identity: &Identity,
    server_ca: &TrustAnchors,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut provider = ring_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(server_ca.0.clone())
        .with_client_auth_cert(identity.certs.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named_in_the_error() {
        let err = Identity::from_pem_files(Path::new("/nonexistent/tls.crt"), Path::new("/x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/tls.crt"), "{err}");
        let err = TrustAnchors::from_pem_file(Path::new("/nonexistent/ca.crt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/ca.crt"), "{err}");
    }

    #[test]
    fn a_file_without_certificates_is_rejected() {
        let dir = std::env::temp_dir().join(format!("cplink-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.pem");
        std::fs::write(&path, b"not a pem file\n").unwrap();
        let err = TrustAnchors::from_pem_file(&path).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["other".into()]).unwrap();
        let identity = Identity::from_pem(
            ca.cert.pem().as_bytes(),
            other.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        let anchors = TrustAnchors::from_pem(ca.cert.pem().as_bytes()).unwrap();
        assert!(link_server_config(&identity, &anchors, ClientAuth::Required).is_err());
    }

    /// A CA and a client certificate it issued, valid from 2020 to 2030.
    fn client_chain() -> (TrustAnchors, CertificateDer<'static>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let mut leaf = CertificateParams::new(vec!["kube-apiserver".into()]).unwrap();
        leaf.not_before = rcgen::date_time_ymd(2020, 1, 1);
        leaf.not_after = rcgen::date_time_ymd(2030, 1, 1);
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = leaf
            .signed_by(&KeyPair::generate().unwrap(), &issuer)
            .unwrap();
        let anchors = TrustAnchors::from_pem(ca_cert.pem().as_bytes()).unwrap();
        (anchors, leaf.der().clone())
    }

    fn year(year: u64) -> rustls_pki_types::UnixTime {
        rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            (year - 1970) * 365 * 86_400,
        ))
    }

    #[test]
    fn a_remembered_chain_is_still_refused_once_expired_or_under_another_ca() {
        let (anchors, leaf) = client_chain();
        let verifier = frontend_client_verifier(&anchors).unwrap();
        for _ in 0..2 {
            assert!(verifier.verify_client_cert(&leaf, &[], year(2025)).is_ok());
        }
        // Its CA signature is remembered now; its validity period is still checked.
        let expired = verifier
            .verify_client_cert(&leaf, &[], year(2031))
            .unwrap_err();
        assert!(expired.to_string().contains("expired"), "{expired}");
        let early = verifier.verify_client_cert(&leaf, &[], year(2019));
        assert!(early.is_err());
        // And so is its issuer: a frontend trusting another CA refuses it.
        let (other_anchors, _) = client_chain();
        let other = frontend_client_verifier(&other_anchors).unwrap();
        assert!(other.verify_client_cert(&leaf, &[], year(2025)).is_err());
    }

    #[test]
    fn a_certificate_altered_after_a_remembered_check_is_refused() {
        let (anchors, leaf) = client_chain();
        let verifier = frontend_client_verifier(&anchors).unwrap();
        assert!(verifier.verify_client_cert(&leaf, &[], year(2025)).is_ok());
        // Flip one byte of the signature (the DER ends with it).
        let mut altered = leaf.to_vec();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        let altered = CertificateDer::from(altered);
        assert!(
            verifier
                .verify_client_cert(&altered, &[], year(2025))
                .is_err()
        );
    }

    #[test]
    fn debug_output_hides_the_key() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
        let identity = Identity::from_pem(
            ca.cert.pem().as_bytes(),
            ca.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        let debug = format!("{identity:?}");
        assert!(debug.contains("***") && !debug.contains("PRIVATE"));
    }
}
