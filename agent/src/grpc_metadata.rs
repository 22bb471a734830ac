//! What konnectivity's gRPC requests carry: text metadata (printable ASCII, as gRPC requires)
//! and the `https://host:port` origin of a server address. Checked when the configuration is
//! read, and used again at every link attempt.

use tonic::metadata::{Ascii, MetadataValue};

/// The `https://host:port` origin of a server address, for the requests' `:authority`.
pub(crate) fn origin(address: &str) -> Result<http::Uri, http::uri::InvalidUri> {
    format!("https://{address}").parse()
}

/// A metadata value that is not printable ASCII, which gRPC requires of text metadata.
#[derive(Debug, thiserror::Error)]
#[error("must be printable ASCII")]
pub(crate) struct NotPrintableAscii;

/// `text` as a text metadata value.
pub(crate) fn ascii_value(text: &str) -> Result<MetadataValue<Ascii>, NotPrintableAscii> {
    if !text.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(NotPrintableAscii);
    }
    MetadataValue::try_from(text).map_err(|_| NotPrintableAscii)
}

/// The `agentid` metadata value.
pub(crate) fn agent_id_value(agent_id: &str) -> Result<MetadataValue<Ascii>, NotPrintableAscii> {
    ascii_value(agent_id)
}
