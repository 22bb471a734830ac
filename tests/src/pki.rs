//! Test certificates: a CA and leaf certificates issued by it, written to a private directory.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server.
    Server,
    /// TLS client.
    Client,
}

/// A certificate and key on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// A certificate authority writing its files into a directory.
pub struct Pki {
    dir: PathBuf,
    name: String,
    issuer: Issuer<'static, KeyPair>,
    ca_file: PathBuf,
}

impl Pki {
    /// Creates a CA named `name`, storing everything under `dir`.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let ca_file = dir.join(format!("{name}-ca.crt"));
        std::fs::write(&ca_file, cert.pem())?;
        Ok(Pki {
            dir: dir.to_owned(),
            name: name.to_owned(),
            issuer: Issuer::new(params, key),
            ca_file,
        })
    }

    /// The CA certificate file.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The CA certificate as PEM.
    pub fn ca_pem(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(&self.ca_file)?)
    }

    /// Issues a leaf certificate for `names` (DNS names or IP literals).
    pub fn issue(&self, subject: &str, names: &[&str], usage: Usage) -> anyhow::Result<CertFiles> {
        self.issue_in_group(subject, None, names, usage)
    }

    /// Issues a leaf certificate whose subject also names an organization: the group a
    /// Kubernetes API server sees the client in (`system:masters`, for instance).
    pub fn issue_in_group(
        &self,
        subject: &str,
        group: Option<&str>,
        names: &[&str],
        usage: Usage,
    ) -> anyhow::Result<CertFiles> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, subject);
        if let Some(group) = group {
            dn.push(DnType::OrganizationName, group);
        }
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName((*n).try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{}-{subject}.crt", self.name)),
            key: self.dir.join(format!("{}-{subject}.key", self.name)),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}
