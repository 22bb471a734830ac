//! The service-account token an agent proves its pod with.
//!
//! kubelet rewrites a projected token file before the token expires, so the file is read again
//! at every link attempt; configuration validation reads it once so that a wrong path fails the
//! start rather than every attempt.

use std::path::{Path, PathBuf};

use cplink_proto::hello::BearerToken;

/// Why the service-account token cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file cannot be read.
    #[error("cannot read the service-account token from {}: {source}", path.display())]
    Read {
        /// The token file.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// The token file is empty.
    #[error("the service-account token file {} is empty", .0.display())]
    Empty(PathBuf),
    /// The token holds characters a header value cannot carry.
    #[error("the service-account token in {} is not printable ASCII", .0.display())]
    Invalid(PathBuf),
}

/// Reads the token file now, as configuration validation does.
pub(crate) fn read_now(path: &Path) -> Result<BearerToken, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Reads the token file at a link attempt, so that a rotated token is used.
pub(crate) async fn read(path: &Path) -> Result<BearerToken, TokenError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
    parse(path, &text)
}

/// The token in a file's text: trimmed, not empty, printable ASCII (tokens are JWTs, and the
/// konnectivity protocol sends them in a header).
fn parse(path: &Path, text: &str) -> Result<BearerToken, TokenError> {
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenError::Empty(path.to_owned()));
    }
    if !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(TokenError::Invalid(path.to_owned()));
    }
    Ok(BearerToken::new(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_trimmed_and_must_be_printable_ascii() {
        let path = Path::new("/token");
        assert_eq!(parse(path, "abc.def\n").unwrap().expose(), "abc.def");
        assert!(matches!(parse(path, " \n"), Err(TokenError::Empty(_))));
        for bad in ["a\u{7f}b", "jeton-é", "two words"] {
            assert!(
                matches!(parse(path, bad), Err(TokenError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_rewritten_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        assert_eq!(read(&path).await.unwrap().expose(), "first");
        std::fs::write(&path, "second\n").unwrap();
        assert_eq!(read(&path).await.unwrap().expose(), "second");
        std::fs::remove_file(&path).unwrap();
        let err = read(&path).await.unwrap_err();
        assert!(err.to_string().contains("token"), "{err}");
    }
}
