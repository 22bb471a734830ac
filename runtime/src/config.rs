//! Configuration errors shared by the binaries.

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
}
