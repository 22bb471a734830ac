//! Certificates of a link: the CA, leaf issuance, and the reuse-or-renew decision.
//!
//! Everything here is pure (the caller passes `now`), so renewal is testable without clocks.
//! Reuse matters: a freshly issued certificate changes the Secret, which changes the pod
//! template checksum and rolls every server and agent.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;

/// Certificates start this long before issuance, to tolerate clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A generated CA lives this many times the leaf validity, so leaves rarely outlive it.
const CA_VALIDITY_FACTOR: u32 = 10;

/// Why a certificate could not be produced or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused to generate a key or sign a certificate.
    #[error("generating certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// PEM text did not hold a parsable X.509 certificate.
    #[error("invalid certificate PEM: {0}")]
    InvalidCertificate(String),
    /// PEM text did not hold a usable private key.
    #[error("invalid private key: {0}")]
    InvalidKey(String),
    /// The private key does not belong to the certificate.
    #[error("private key does not match the certificate")]
    KeyMismatch,
    /// A date computation left the representable range.
    #[error("certificate validity out of range")]
    ValidityOutOfRange,
}

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Clone, PartialEq, Eq)]
pub struct CertPair {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for CertPair {
    /// Keeps private keys out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPair")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"***")
            .finish()
    }
}

/// What the operator needs to know about an existing certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Start of validity (issuance, backdated for clock skew).
    pub not_before: OffsetDateTime,
    /// Expiry.
    pub not_after: OffsetDateTime,
    /// DNS subject alternative names.
    pub dns_names: BTreeSet<String>,
    /// IP subject alternative names.
    pub ips: BTreeSet<IpAddr>,
    /// Whether basicConstraints says CA.
    pub is_ca: bool,
}

impl CertInfo {
    /// When the certificate should be replaced.
    pub fn renew_at(&self, renew_before: Duration) -> OffsetDateTime {
        self.not_after - renew_before
    }

    /// Whether the certificate is still good at `now`, renewal margin included.
    pub fn is_fresh(&self, renew_before: Duration, now: OffsetDateTime) -> bool {
        now < self.renew_at(renew_before)
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// A TLS server certificate with these subject alternative names.
    Server {
        /// Subject common name.
        common_name: String,
        /// DNS SANs.
        dns_names: BTreeSet<String>,
        /// IP SANs.
        ips: BTreeSet<IpAddr>,
    },
    /// A TLS client certificate.
    Client {
        /// Subject common name, the identity the server sees.
        common_name: String,
    },
}

/// Reads serial, validity, SANs and CA flag of the first certificate in `pem`.
pub fn inspect(pem: &str) -> Result<CertInfo, CertError> {
    let (_, pem) =
        parse_x509_pem(pem.as_bytes()).map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
    let mut dns_names = BTreeSet::new();
    let mut ips = BTreeSet::new();
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
    for name in sans.iter().flat_map(|ext| &ext.value.general_names) {
        match name {
            GeneralName::DNSName(dns) => {
                dns_names.insert((*dns).to_owned());
            }
            GeneralName::IPAddress(bytes) => {
                if let Ok(octets) = <[u8; 4]>::try_from(*bytes) {
                    ips.insert(IpAddr::from(octets));
                } else if let Ok(octets) = <[u8; 16]>::try_from(*bytes) {
                    ips.insert(IpAddr::from(octets));
                }
            }
            _ => {}
        }
    }
    Ok(CertInfo {
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        dns_names,
        ips,
        is_ca: cert.is_ca(),
    })
}

/// Checks that `pair` is a certificate with its own private key; returns its details.
pub fn inspect_pair(pair: &CertPair) -> Result<CertInfo, CertError> {
    let info = inspect(&pair.cert_pem)?;
    let key = KeyPair::from_pem(&pair.key_pem).map_err(|e| CertError::InvalidKey(e.to_string()))?;
    let (_, pem) = parse_x509_pem(pair.cert_pem.as_bytes())
        .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        return Err(CertError::KeyMismatch);
    }
    Ok(info)
}

fn validity_window(
    now: OffsetDateTime,
    validity: Duration,
    cap: Option<OffsetDateTime>,
) -> Result<(OffsetDateTime, OffsetDateTime), CertError> {
    let not_before = now
        .checked_sub(time::Duration::try_from(BACKDATE).map_err(|_| CertError::ValidityOutOfRange)?)
        .ok_or(CertError::ValidityOutOfRange)?;
    let not_after = now
        .checked_add(time::Duration::try_from(validity).map_err(|_| CertError::ValidityOutOfRange)?)
        .ok_or(CertError::ValidityOutOfRange)?;
    // A leaf must not outlive its CA: clients would reject it from that moment on anyway.
    let not_after = cap.map_or(not_after, |cap| not_after.min(cap));
    Ok((not_before, not_after))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cplink");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Generates a self-signed CA valid for ten times the leaf `validity`.
pub fn generate_ca(
    common_name: &str,
    validity: Duration,
    now: OffsetDateTime,
) -> Result<CertPair, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) =
        validity_window(now, validity.saturating_mul(CA_VALIDITY_FACTOR), None)?;
    let cert = params.self_signed(&key)?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a leaf certificate for `profile`, signed by `ca`, expiring no later than the CA.
pub fn issue(
    ca: &CertPair,
    profile: &Profile,
    validity: Duration,
    now: OffsetDateTime,
) -> Result<CertPair, CertError> {
    let ca_key =
        KeyPair::from_pem(&ca.key_pem).map_err(|e| CertError::InvalidKey(e.to_string()))?;
    let ca_info = inspect(&ca.cert_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)
        .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    (params.not_before, params.not_after) =
        validity_window(now, validity, Some(ca_info.not_after))?;
    match profile {
        Profile::Server {
            common_name,
            dns_names,
            ips,
        } => {
            params.distinguished_name = name(common_name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            for dns in dns_names {
                params
                    .subject_alt_names
                    .push(SanType::DnsName(dns.clone().try_into()?));
            }
            params
                .subject_alt_names
                .extend(ips.iter().copied().map(SanType::IpAddress));
        }
        Profile::Client { common_name } => {
            params.distinguished_name = name(common_name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Whether an existing CA (generated or provided) can keep signing: parsable, a CA, its key
/// matching, and not within `renew_before` of expiry.
pub fn ca_is_reusable(
    ca: &CertPair,
    renew_before: Duration,
    now: OffsetDateTime,
) -> Result<CertInfo, String> {
    let info = inspect_pair(ca).map_err(|e| e.to_string())?;
    if !info.is_ca {
        return Err("certificate is not a CA (basicConstraints CA:false)".into());
    }
    if !info.is_fresh(renew_before, now) {
        return Err(format!("CA expires at {}", info.not_after));
    }
    Ok(info)
}

/// The generated CA as its Secret stores it.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredCa {
    /// `tls.crt`: the signing CA first, then any other CA every `ca.crt` still trusts; `tls.key`:
    /// the signing CA's key.
    pub pair: CertPair,
    /// The key of the second CA of the bundle while it waits to sign (`next.key`).
    pub next_key: Option<String>,
}

impl std::fmt::Debug for StoredCa {
    /// Keeps private keys out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCa")
            .field("pair", &self.pair)
            .field("next_key", &self.next_key.as_ref().map(|_| "***"))
            .finish()
    }
}

/// A step of a generated CA's life. Each changes every `ca.crt` or the signer, so every leaf
/// is issued again and the pods roll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaStep {
    /// A new CA with nothing to hand over from: the first, or the stored one was unusable (then
    /// peers of the old and the new CA refuse each other until every pod has rolled).
    Generated,
    /// A successor CA is made and added to every `ca.crt`; the current CA still signs.
    TrustingSuccessor,
    /// The successor signs; its predecessor is still trusted.
    SigningWithSuccessor,
    /// The predecessor leaves every `ca.crt`.
    RetiredPredecessor,
}

impl CaStep {
    /// What the step did, for an Event.
    pub fn describe(self) -> &'static str {
        match self {
            CaStep::Generated => "generated a new CA",
            CaStep::TrustingSuccessor => {
                "the CA nears its end: made its successor, now trusted beside it in every ca.crt \
                 (the current CA still signs)"
            }
            CaStep::SigningWithSuccessor => {
                "the successor CA signs every certificate now; its predecessor stays trusted"
            }
            CaStep::RetiredPredecessor => {
                "the predecessor CA left every ca.crt: the CA replacement is complete"
            }
        }
    }
}

/// The generated CA for `now`, and the step taken to reach it, if any.
#[derive(Debug)]
pub struct CaDecision {
    /// What the CA Secret holds from now on.
    pub ca: StoredCa,
    /// The signing CA's details.
    pub info: CertInfo,
    /// What changed, if anything.
    pub step: Option<CaStep>,
    /// When the next step is due.
    pub next_step_at: OffsetDateTime,
}

/// The certificates of a PEM bundle, each as its own PEM text, in order.
fn split_bundle(pem: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(end) = rest[start..].find(END) else {
            break;
        };
        let end = start + end + END.len();
        blocks.push(format!("{}\n", &rest[start..end]));
        rest = &rest[end..];
    }
    blocks
}

/// How long each step of a generated CA's replacement lasts: one leaf lifetime, which is how
/// long a peer keeps a certificate and `ca.crt` it was given (kube-apiserver, which reads its
/// files only when it starts, must restart before its replaced client certificate expires),
/// plus the renewal margin to spare.
fn replacement_step(validity: Duration, renew_before: Duration) -> Duration {
    validity.saturating_add(renew_before)
}

/// When a generated CA's replacement starts, this long before it expires: its two steps (the
/// successor trusted, then signing) and a renewal margin.
fn replacement_lead(validity: Duration, renew_before: Duration) -> Duration {
    replacement_step(validity, renew_before)
        .saturating_mul(2)
        .saturating_add(renew_before)
}

/// Decides the generated CA at `now`, replacing it without an outage: a CA due for
/// replacement (within two steps, each a leaf lifetime and `renew_before`, and another
/// `renew_before` of its expiry) first makes its successor, trusted beside it in every
/// `ca.crt`; one step later the successor signs; one more and the predecessor leaves the
/// bundle. Every peer trusts both CAs whenever
/// a certificate of either may still be presented. Only a missing or unusable stored CA is
/// replaced at once. Pure: the caller passes `now`.
pub fn generated_ca(
    stored: Option<&StoredCa>,
    common_name: &str,
    validity: Duration,
    renew_before: Duration,
    now: OffsetDateTime,
) -> Result<CaDecision, CertError> {
    let step_length = time::Duration::try_from(replacement_step(validity, renew_before))
        .map_err(|_| CertError::ValidityOutOfRange)?;
    let backdate = time::Duration::try_from(BACKDATE).map_err(|_| CertError::ValidityOutOfRange)?;
    let lead = time::Duration::try_from(replacement_lead(validity, renew_before))
        .map_err(|_| CertError::ValidityOutOfRange)?;
    let decide = |ca: StoredCa, step| -> Result<CaDecision, CertError> {
        let info = inspect_pair(&ca.pair)?;
        let blocks = split_bundle(&ca.pair.cert_pem);
        let margin =
            time::Duration::try_from(renew_before).map_err(|_| CertError::ValidityOutOfRange)?;
        let next_step_at = match (&ca.next_key, blocks.get(1)) {
            // Trusting the successor: it signs one step after it was made, or sooner if the
            // current CA would expire first.
            (Some(_), Some(successor)) => {
                let sign: OffsetDateTime = made_at(successor, backdate)? + step_length;
                sign.min(info.not_after - margin)
            }
            // Signing with the successor: the predecessors go one step later, or once they
            // have expired.
            (None, Some(_)) => {
                let mut expired = info.not_before;
                for other in &blocks[1..] {
                    expired = expired.max(inspect(other)?.not_after);
                }
                let retire: OffsetDateTime = info.not_before + backdate + step_length * 2;
                retire.min(expired)
            }
            _ => info.not_after - lead,
        };
        Ok(CaDecision {
            ca,
            info,
            step,
            next_step_at,
        })
    };
    let fresh = |step| -> Result<CaDecision, CertError> {
        let pair = generate_ca(common_name, validity, now)?;
        decide(
            StoredCa {
                pair,
                next_key: None,
            },
            step,
        )
    };
    let Some(stored) = stored else {
        return fresh(Some(CaStep::Generated));
    };
    let blocks = split_bundle(&stored.pair.cert_pem);
    let usable = ca_is_reusable(&stored.pair, Duration::ZERO, now).is_ok() && !blocks.is_empty();
    if !usable {
        return fresh(Some(CaStep::Generated));
    }
    let current = decide(stored.clone(), None)?;
    if now < current.next_step_at {
        return Ok(current);
    }
    let signer = &blocks[0];
    match (&stored.next_key, blocks.get(1)) {
        (Some(next_key), Some(successor)) => {
            let successor_pair = CertPair {
                cert_pem: successor.clone(),
                key_pem: next_key.clone(),
            };
            if ca_is_reusable(&successor_pair, Duration::ZERO, now).is_err() {
                // A successor that cannot sign is made again.
                return trust_successor(signer, &stored.pair.key_pem, common_name, validity, now)
                    .and_then(|ca| decide(ca, Some(CaStep::TrustingSuccessor)));
            }
            let mut bundle = successor.clone();
            bundle.push_str(signer);
            decide(
                StoredCa {
                    pair: CertPair {
                        cert_pem: bundle,
                        key_pem: next_key.clone(),
                    },
                    next_key: None,
                },
                Some(CaStep::SigningWithSuccessor),
            )
        }
        (_, Some(_)) => decide(
            StoredCa {
                pair: CertPair {
                    cert_pem: signer.clone(),
                    key_pem: stored.pair.key_pem.clone(),
                },
                next_key: None,
            },
            Some(CaStep::RetiredPredecessor),
        ),
        (_, None) => trust_successor(signer, &stored.pair.key_pem, common_name, validity, now)
            .and_then(|ca| decide(ca, Some(CaStep::TrustingSuccessor))),
    }
}

/// The signer followed by a new successor CA, whose key waits in `next_key`.
fn trust_successor(
    signer: &str,
    signer_key: &str,
    common_name: &str,
    validity: Duration,
    now: OffsetDateTime,
) -> Result<StoredCa, CertError> {
    let successor = generate_ca(common_name, validity, now)?;
    Ok(StoredCa {
        pair: CertPair {
            cert_pem: format!("{signer}{}", successor.cert_pem),
            key_pem: signer_key.to_owned(),
        },
        next_key: Some(successor.key_pem),
    })
}

/// When a generated certificate was made: its start of validity, less the backdating.
fn made_at(pem: &str, backdate: time::Duration) -> Result<OffsetDateTime, CertError> {
    Ok(inspect(pem)?.not_before + backdate)
}

/// A leaf certificate as stored in a Secret, with the CA bundle stored next to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLeaf {
    /// The certificate and its key.
    pub pair: CertPair,
    /// The `ca.crt` stored with it.
    pub ca_pem: String,
}

/// Returns the stored leaf's details when it can be kept: it parses, its key matches, it was
/// stored with the current CA, it still covers the profile's SANs exactly, and it is not due
/// for renewal. `None` means: issue a new one.
pub fn reusable_leaf(
    stored: Option<&StoredLeaf>,
    ca: &CertPair,
    profile: &Profile,
    renew_before: Duration,
    now: OffsetDateTime,
) -> Option<CertInfo> {
    let stored = stored?;
    if stored.ca_pem != ca.cert_pem {
        return None;
    }
    let info = inspect_pair(&stored.pair).ok()?;
    if !info.is_fresh(renew_before, now) {
        return None;
    }
    if let Profile::Server { dns_names, ips, .. } = profile
        && (&info.dns_names != dns_names || &info.ips != ips)
    {
        return None;
    }
    Some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    const YEAR: Duration = Duration::from_secs(8760 * 3600);
    const MONTH: Duration = Duration::from_secs(720 * 3600);

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("valid timestamp")
    }

    fn server_profile() -> Profile {
        Profile::Server {
            common_name: "link-server".into(),
            dns_names: [
                "link-frontend".to_owned(),
                "link-frontend.ns.svc".to_owned(),
            ]
            .into(),
            ips: ["10.0.0.5".parse().expect("ip")].into(),
        }
    }

    /// A client certificate for `a`, asked to last a year.
    fn client_leaf(ca: &CertPair) -> CertPair {
        let profile = Profile::Client {
            common_name: "a".into(),
        };
        issue(ca, &profile, YEAR, now()).expect("leaf")
    }

    #[test]
    fn a_generated_ca_is_a_ca_and_outlives_its_leaves() {
        let ca = generate_ca("cplink ca", YEAR, now()).expect("ca");
        let info = ca_is_reusable(&ca, MONTH, now()).expect("fresh CA");
        assert!(info.is_ca);
        assert_eq!(info.not_after, now() + YEAR * 10);

        let leaf = issue(&ca, &server_profile(), YEAR, now()).expect("leaf");
        let leaf_info = inspect_pair(&leaf).expect("leaf parses");
        assert!(!leaf_info.is_ca);
        assert_eq!(leaf_info.not_after, now() + YEAR);
    }

    #[test]
    fn a_server_certificate_carries_the_requested_sans() {
        let ca = generate_ca("cplink ca", YEAR, now()).expect("ca");
        let leaf = issue(&ca, &server_profile(), YEAR, now()).expect("leaf");
        let info = inspect(&leaf.cert_pem).expect("parses");
        let Profile::Server { dns_names, ips, .. } = server_profile() else {
            unreachable!()
        };
        assert_eq!(info.dns_names, dns_names);
        assert_eq!(info.ips, ips);
    }

    #[test]
    fn a_leaf_never_outlives_its_ca() {
        let ca = generate_ca("cplink ca", Duration::from_secs(3600), now()).expect("ca");
        let leaf = client_leaf(&ca);
        let ca_info = inspect(&ca.cert_pem).expect("ca parses");
        assert_eq!(
            inspect(&leaf.cert_pem).expect("leaf").not_after,
            ca_info.not_after
        );
    }

    #[test]
    fn a_stored_leaf_is_reused_until_renewal_is_due() {
        let ca = generate_ca("cplink ca", YEAR, now()).expect("ca");
        let profile = server_profile();
        let stored = StoredLeaf {
            pair: issue(&ca, &profile, YEAR, now()).expect("leaf"),
            ca_pem: ca.cert_pem.clone(),
        };
        let before_renewal = now() + (YEAR - MONTH) - Duration::from_secs(1);
        let at_renewal = now() + (YEAR - MONTH);
        assert!(reusable_leaf(Some(&stored), &ca, &profile, MONTH, now()).is_some());
        assert!(reusable_leaf(Some(&stored), &ca, &profile, MONTH, before_renewal).is_some());
        assert!(reusable_leaf(Some(&stored), &ca, &profile, MONTH, at_renewal).is_none());
    }

    #[test]
    fn a_stored_leaf_is_replaced_when_missing_foreign_mismatched_or_garbled() {
        let ca = generate_ca("cplink ca", YEAR, now()).expect("ca");
        let other_ca = generate_ca("other ca", YEAR, now()).expect("ca");
        let profile = server_profile();
        let good = StoredLeaf {
            pair: issue(&ca, &profile, YEAR, now()).expect("leaf"),
            ca_pem: ca.cert_pem.clone(),
        };
        assert!(
            reusable_leaf(None, &ca, &profile, MONTH, now()).is_none(),
            "missing"
        );

        let foreign = StoredLeaf {
            ca_pem: other_ca.cert_pem.clone(),
            ..good.clone()
        };
        assert!(
            reusable_leaf(Some(&foreign), &ca, &profile, MONTH, now()).is_none(),
            "other CA"
        );

        let Profile::Server {
            common_name,
            mut dns_names,
            ips,
        } = profile.clone()
        else {
            unreachable!()
        };
        dns_names.insert("new.example.com".into());
        let wider = Profile::Server {
            common_name,
            dns_names,
            ips,
        };
        assert!(
            reusable_leaf(Some(&good), &ca, &wider, MONTH, now()).is_none(),
            "SANs changed"
        );

        let mut wrong_key = good.clone();
        wrong_key.pair.key_pem = KeyPair::generate().expect("key").serialize_pem();
        assert!(
            reusable_leaf(Some(&wrong_key), &ca, &profile, MONTH, now()).is_none(),
            "key"
        );

        let mut garbled = good.clone();
        garbled.pair.cert_pem =
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into();
        assert!(
            reusable_leaf(Some(&garbled), &ca, &profile, MONTH, now()).is_none(),
            "garbled"
        );
    }

    #[test]
    fn a_ca_near_expiry_or_not_a_ca_is_refused() {
        let ca = generate_ca("cplink ca", YEAR, now()).expect("ca");
        let late = now() + YEAR * 10 - MONTH;
        assert!(ca_is_reusable(&ca, MONTH, late).is_err());

        let leaf = client_leaf(&ca);
        let err = ca_is_reusable(&leaf, MONTH, now()).expect_err("leaf is no CA");
        assert!(err.contains("not a CA"), "{err}");
    }

    /// The issuer's common name of the first certificate in `pem`.
    fn issuer(pem: &str) -> String {
        let (_, pem) = parse_x509_pem(pem.as_bytes()).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        cert.issuer()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .expect("issuer CN")
            .to_owned()
    }

    /// A CA Secret whose `tls.crt` holds the signing CA followed by another: the path to a new
    /// CA without an outage (every `ca.crt` trusts both while leaves move to the new one).
    #[test]
    fn a_ca_bundle_signs_with_its_first_certificate_and_is_trusted_whole() {
        let old = generate_ca("old ca", YEAR, now()).expect("ca");
        let new = generate_ca("new ca", YEAR, now()).expect("ca");
        let signing_old = CertPair {
            cert_pem: format!("{}{}", old.cert_pem, new.cert_pem),
            key_pem: old.key_pem.clone(),
        };
        let info = ca_is_reusable(&signing_old, MONTH, now()).expect("the first CA is checked");
        assert_eq!(info.not_after, now() + YEAR * 10);
        let leaf = issue(&signing_old, &server_profile(), YEAR, now()).expect("leaf");
        assert_eq!(issuer(&leaf.cert_pem), "old ca");

        // The bundle changed, so leaves stored with the old CA alone are reissued.
        let stored = StoredLeaf {
            pair: issue(&old, &server_profile(), YEAR, now()).expect("leaf"),
            ca_pem: old.cert_pem.clone(),
        };
        assert!(
            reusable_leaf(Some(&stored), &signing_old, &server_profile(), MONTH, now()).is_none()
        );

        // Swapped: the new CA signs, the old one is still in the bundle.
        let signing_new = CertPair {
            cert_pem: format!("{}{}", new.cert_pem, old.cert_pem),
            key_pem: new.key_pem.clone(),
        };
        let leaf = issue(&signing_new, &server_profile(), YEAR, now()).expect("leaf");
        assert_eq!(issuer(&leaf.cert_pem), "new ca");
        let mismatched = CertPair {
            cert_pem: signing_new.cert_pem.clone(),
            key_pem: old.key_pem.clone(),
        };
        assert!(
            ca_is_reusable(&mismatched, MONTH, now()).is_err(),
            "the key must be the first certificate's"
        );
    }

    /// The operator's decision for the generated CA `stored` at `at`, with a year's validity
    /// and a month's renewal margin.
    fn decide_at(stored: Option<&StoredCa>, at: OffsetDateTime) -> CaDecision {
        generated_ca(stored, "cplink test", YEAR, MONTH, at).expect("decision")
    }

    /// The certificates of the CA Secret's bundle, in order.
    fn blocks(ca: &StoredCa) -> Vec<String> {
        split_bundle(&ca.pair.cert_pem)
    }

    /// Runs the operator's decision at each of `times` (ascending) from nothing; the CA held
    /// from each time on, with the step taken then.
    fn life(times: &[OffsetDateTime]) -> Vec<(OffsetDateTime, StoredCa, Option<CaStep>)> {
        let mut held: Option<StoredCa> = None;
        let mut states = Vec::new();
        for &at in times {
            let decision = decide_at(held.as_ref(), at);
            held = Some(decision.ca.clone());
            states.push((at, decision.ca, decision.step));
        }
        states
    }

    /// A generated CA is replaced in three steps, each due on its own date, and between any
    /// two states that can meet, each trusts what the other signs: a peer keeps its
    /// certificate and its `ca.crt` for at most one leaf lifetime after it got them.
    #[test]
    fn a_generated_ca_is_replaced_in_steps_that_never_leave_a_peer_untrusted() {
        let first = decide_at(None, now());
        assert_eq!(first.step, Some(CaStep::Generated));
        let a = first.info.clone();
        let step = YEAR + MONTH;
        assert_eq!(first.next_step_at, a.not_after - (step * 2 + MONTH));

        // Nothing changes before the first step is due, however often the operator looks.
        let early = decide_at(Some(&first.ca), first.next_step_at - time::Duration::SECOND);
        assert_eq!((early.step, &early.ca), (None, &first.ca));

        let trusting = decide_at(Some(&first.ca), first.next_step_at);
        assert_eq!(trusting.step, Some(CaStep::TrustingSuccessor));
        assert_eq!(blocks(&trusting.ca).len(), 2);
        assert_eq!(
            blocks(&trusting.ca)[0],
            blocks(&first.ca)[0],
            "the CA still signs"
        );
        assert_eq!(trusting.ca.pair.key_pem, first.ca.pair.key_pem);
        assert!(trusting.ca.next_key.is_some());
        assert_eq!(trusting.next_step_at, first.next_step_at + step);
        let successor = blocks(&trusting.ca)[1].clone();

        let signing = decide_at(Some(&trusting.ca), trusting.next_step_at);
        assert_eq!(signing.step, Some(CaStep::SigningWithSuccessor));
        assert_eq!(
            blocks(&signing.ca),
            [successor.clone(), blocks(&first.ca)[0].clone()]
        );
        assert_eq!(
            Some(&signing.ca.pair.key_pem),
            trusting.ca.next_key.as_ref()
        );
        assert!(signing.ca.next_key.is_none());
        assert!(ca_is_reusable(&signing.ca.pair, MONTH, trusting.next_step_at).is_ok());
        let leaf = issue(
            &signing.ca.pair,
            &server_profile(),
            YEAR,
            trusting.next_step_at,
        )
        .expect("leaf");
        assert_eq!(
            inspect(&leaf.cert_pem).expect("leaf").not_after,
            trusting.next_step_at + YEAR,
            "the successor signs full-length leaves"
        );

        let retired = decide_at(Some(&signing.ca), signing.next_step_at);
        assert_eq!(retired.step, Some(CaStep::RetiredPredecessor));
        assert_eq!(blocks(&retired.ca), [successor]);
        assert_eq!(signing.next_step_at, first.next_step_at + step * 2);
        assert!(
            signing.next_step_at < a.not_after,
            "the predecessor is retired before it expires"
        );
        assert_eq!(
            retired.next_step_at,
            retired.info.not_after - (step * 2 + MONTH),
            "and the successor's own replacement is due in its turn"
        );

        // Every pair of states a peer can hold together: what one signs, the other trusts.
        let mut times: Vec<OffsetDateTime> = (0..=96)
            .map(|month| now() + MONTH * month)
            .chain([
                first.next_step_at,
                trusting.next_step_at,
                signing.next_step_at,
            ])
            .flat_map(|t| [t - time::Duration::SECOND, t, t + time::Duration::SECOND])
            .chain((0..=40).map(|month| first.next_step_at + MONTH * month))
            .filter(|t| *t >= now())
            .collect();
        times.sort();
        times.dedup();
        let states = life(&times);
        let steps: Vec<CaStep> = states.iter().filter_map(|(_, _, step)| *step).collect();
        assert_eq!(
            steps,
            [
                CaStep::Generated,
                CaStep::TrustingSuccessor,
                CaStep::SigningWithSuccessor,
                CaStep::RetiredPredecessor
            ]
        );
        for (i, (got_at, held, _)) in states.iter().enumerate() {
            let signer = &blocks(held)[0];
            let held_until = *got_at + YEAR;
            for (met_at, other, _) in &states[i..] {
                if *met_at >= held_until {
                    break;
                }
                let other_signer = &blocks(other)[0];
                assert!(
                    blocks(other).contains(signer),
                    "a certificate issued at {got_at} is refused at {met_at}"
                );
                assert!(
                    blocks(held).contains(other_signer),
                    "a ca.crt read at {got_at} refuses a certificate issued at {met_at}"
                );
            }
        }
    }

    /// A CA found closer to its end than the steps need (an operator upgraded late) starts its
    /// replacement at once, and its successor signs before the CA expires.
    #[test]
    fn a_ca_found_near_its_end_hands_over_before_it_expires() {
        let made = now() - YEAR * 9;
        let old = decide_at(None, made);
        let trusting = decide_at(Some(&old.ca), now());
        assert_eq!(trusting.step, Some(CaStep::TrustingSuccessor));
        assert_eq!(
            trusting.next_step_at,
            old.info.not_after - MONTH,
            "the successor signs a renewal margin before the CA expires"
        );
    }

    /// A stored CA that cannot sign (garbled, expired, or a successor key that does not match)
    /// is replaced; a bad successor is made again.
    #[test]
    fn an_unusable_generated_ca_or_successor_is_replaced() {
        let first = decide_at(None, now());
        let garbled = StoredCa {
            pair: CertPair {
                cert_pem: "not a certificate".into(),
                key_pem: first.ca.pair.key_pem.clone(),
            },
            next_key: None,
        };
        let fresh = decide_at(Some(&garbled), now());
        assert_eq!(fresh.step, Some(CaStep::Generated));
        let expired = decide_at(
            Some(&first.ca),
            first.info.not_after + time::Duration::SECOND,
        );
        assert_eq!(expired.step, Some(CaStep::Generated));

        let trusting = decide_at(Some(&first.ca), first.next_step_at);
        let wrong_key = StoredCa {
            next_key: Some(first.ca.pair.key_pem.clone()),
            ..trusting.ca.clone()
        };
        let again = decide_at(Some(&wrong_key), trusting.next_step_at);
        assert_eq!(again.step, Some(CaStep::TrustingSuccessor));
        assert_eq!(blocks(&again.ca)[0], blocks(&first.ca)[0]);
        assert_ne!(
            blocks(&again.ca)[1],
            blocks(&trusting.ca)[1],
            "a new successor"
        );
    }

    #[test]
    fn stored_ca_keys_stay_out_of_debug_output() {
        let old = decide_at(None, now() - YEAR * 9);
        let trusting = decide_at(Some(&old.ca), now());
        let debug = format!("{:?}", trusting.ca);
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
    }

    #[test]
    fn private_keys_stay_out_of_debug_output() {
        let ca = generate_ca("cplink ca", YEAR, now()).expect("ca");
        let debug = format!("{ca:?}");
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
        assert!(debug.contains("***"));
    }
}
