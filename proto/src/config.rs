//! Configuration errors shared by the binaries.

use crate::tls::TlsError;

/// A configuration error, naming the flag at fault.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct ConfigError {
    /// The flag, without dashes.
    pub flag: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// An error against `flag`.
    pub fn new(flag: &'static str, message: impl std::fmt::Display) -> Self {
        ConfigError {
            flag,
            message: message.to_string(),
        }
    }

    /// A TLS loading error, attributed to the certificate or the key flag.
    pub fn tls(err: TlsError, cert_flag: &'static str, key_flag: &'static str) -> Self {
        let flag = match err {
            TlsError::Pem {
                what: "private key",
                ..
            }
            | TlsError::Config(_) => key_flag,
            _ => cert_flag,
        };
        ConfigError::new(flag, err)
    }
}
