//! Flag groups several binaries share, for `#[command(flatten)]`.
//!
//! Flag and environment variable names are part of each binary's interface (the operator, the
//! Helm chart and people's manifests pass them), so a group keeps the names the binaries had.

use std::num::NonZeroUsize;
use std::path::PathBuf;

use crate::config::ConfigError;
use crate::telemetry::{self, LogFormat, TelemetryError};

/// `--log-format` and `--log-level`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LogArgs {
    /// Log output format: `text` for people, `json` (one object per line, the event's fields at
    /// the top level) for log pipelines.
    #[arg(long, env = "CPLINK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter in tracing's `EnvFilter` syntax: a level (`info`), or levels per crate
    /// (`cplink_server=debug,info`).
    #[arg(long, env = "CPLINK_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl LogArgs {
    /// Installs the global subscriber these flags describe, writing to stderr.
    pub fn init(&self) -> Result<(), TelemetryError> {
        telemetry::init(self.log_format, &self.log_level)
    }
}

/// `--tls-cert` and `--tls-key`: the certificate this process presents on its TLS connections.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct TlsIdentityArgs {
    /// Certificate chain (PEM) this process presents: a server's to agents and frontend
    /// clients, an agent's client certificate to servers.
    #[arg(long, env = "CPLINK_TLS_CERT")]
    pub tls_cert: PathBuf,

    /// Private key (PEM) of the --tls-cert certificate.
    #[arg(long, env = "CPLINK_TLS_KEY")]
    pub tls_key: PathBuf,
}

impl TlsIdentityArgs {
    /// A failure to load the identity, against `--tls-key` when it concerns the key (unreadable,
    /// or not the certificate's), else against `--tls-cert`.
    pub fn error(concerns_key: bool, err: impl std::fmt::Display) -> ConfigError {
        ConfigError::new(if concerns_key { "tls-key" } else { "tls-cert" }, err)
    }
}

/// Parses a `--worker-threads` value: a count of at least 1. Each binary declares the flag
/// itself, since their defaults differ (a DaemonSet's agent shares its node; a server has its
/// pod's CPUs).
pub fn parse_worker_threads(text: &str) -> Result<NonZeroUsize, String> {
    let count: usize = text
        .parse()
        .map_err(|e| format!("{text:?} is not a thread count: {e}"))?;
    NonZeroUsize::new(count)
        .ok_or_else(|| "must be at least 1: some thread has to run the tasks".to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        log: LogArgs,
        #[command(flatten)]
        tls: TlsIdentityArgs,
    }

    #[test]
    fn the_groups_keep_their_flag_names_and_defaults() {
        let parsed =
            Command::try_parse_from(["cmd", "--tls-cert", "a.crt", "--tls-key", "a.key"]).unwrap();
        assert_eq!(parsed.log.log_format, LogFormat::Text);
        assert_eq!(parsed.log.log_level, "info");
        assert_eq!(parsed.tls.tls_cert, PathBuf::from("a.crt"));
        assert_eq!(parsed.tls.tls_key, PathBuf::from("a.key"));

        let parsed = Command::try_parse_from([
            "cmd",
            "--tls-cert=a.crt",
            "--tls-key=a.key",
            "--log-format=json",
            "--log-level=cplink_agent=debug,info",
        ])
        .unwrap();
        assert_eq!(parsed.log.log_format, LogFormat::Json);
        assert_eq!(parsed.log.log_level, "cplink_agent=debug,info");
        assert!(Command::try_parse_from(["cmd", "--tls-cert=a.crt"]).is_err());
        assert!(
            Command::try_parse_from(["cmd", "--tls-cert=a", "--tls-key=b", "--log-format=xml"])
                .is_err()
        );
    }

    #[test]
    fn help_names_each_flags_environment_variable() {
        let help = <Command as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for name in [
            "CPLINK_LOG_FORMAT",
            "CPLINK_LOG_LEVEL",
            "CPLINK_TLS_CERT",
            "CPLINK_TLS_KEY",
        ] {
            assert!(help.contains(name), "{name} missing: {help}");
        }
    }

    #[test]
    fn a_worker_thread_count_is_a_positive_number() {
        assert_eq!(
            parse_worker_threads("2"),
            Ok(NonZeroUsize::MIN.saturating_add(1))
        );
        assert!(
            parse_worker_threads("0")
                .unwrap_err()
                .contains("at least 1")
        );
        assert!(parse_worker_threads("two").unwrap_err().contains("\"two\""));
        assert!(parse_worker_threads("-1").is_err());
    }

    #[test]
    fn identity_errors_blame_the_key_or_the_certificate() {
        assert_eq!(TlsIdentityArgs::error(true, "no key").flag, "tls-key");
        assert_eq!(TlsIdentityArgs::error(false, "no cert").flag, "tls-cert");
    }
}
