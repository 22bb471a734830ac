//! Log setup shared by the binaries: `tracing` with text or JSON output.
//!
//! Every binary writes the same JSON: one object per line, the event's fields at the top level
//! next to `timestamp`, `level`, `message` and `target`, the innermost span under `span` and
//! every open span under `spans`. Log pipelines parse all of them alike.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Output format of logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("invalid --log-level {filter:?}: {source}")]
    Filter {
        /// The filter as given.
        filter: String,
        /// The parse error.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was already installed.
    #[error("logging already initialised: {0}")]
    AlreadySet(String),
}

/// Parses a log filter (`info`, `cplink_server=debug,h2=info`, ...).
pub fn parse_filter(filter: &str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::try_new(filter).map_err(|source| TelemetryError::Filter {
        filter: filter.to_owned(),
        source,
    })
}

/// Whether text logs get colours: only on a terminal, and never with `NO_COLOR` set.
/// Container runtimes write stderr to files, where escape codes are noise.
pub fn use_colour() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Installs the global subscriber writing to stderr.
pub fn init(format: LogFormat, filter: &str) -> Result<(), TelemetryError> {
    subscriber(format, parse_filter(filter)?, use_colour(), std::io::stderr)
        .try_init()
        .map_err(|e| TelemetryError::AlreadySet(e.to_string()))
}

/// The subscriber [`init`] installs, writing to `writer`.
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    colour: bool,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .finish(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;

        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    fn log_one_event(format: LogFormat) -> String {
        let captured = Captured::default();
        let filter = parse_filter("info").unwrap();
        let subscriber = subscriber(format, filter, false, captured.clone());
        tracing::subscriber::with_default(subscriber, || {
            let link = tracing::info_span!("link", agent_id = "node-1");
            let _link = link.enter();
            let dial = tracing::info_span!("dial", dest = "10.0.0.5:10250");
            let _dial = dial.enter();
            tracing::info!(elapsed_ms = 12, "dialed");
            tracing::debug!("filtered out");
        });
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn json_logs_are_one_flat_object_per_event_with_the_spans_beside_it() {
        let out = log_one_event(LogFormat::Json);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "one line per event at info: {out}");
        let event: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        let mut keys: Vec<&str> = event
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "elapsed_ms",
                "level",
                "message",
                "span",
                "spans",
                "target",
                "timestamp"
            ],
            "{event}"
        );
        assert_eq!(event["level"], "INFO");
        assert_eq!(event["message"], "dialed");
        assert_eq!(event["elapsed_ms"], 12);
        assert_eq!(event["target"], module_path!());
        assert_eq!(
            event["span"],
            serde_json::json!({"name": "dial", "dest": "10.0.0.5:10250"})
        );
        assert_eq!(
            event["spans"],
            serde_json::json!([
                {"name": "link", "agent_id": "node-1"},
                {"name": "dial", "dest": "10.0.0.5:10250"},
            ])
        );
    }

    #[test]
    fn text_logs_are_plain_lines_naming_the_spans() {
        let out = log_one_event(LogFormat::Text);
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(!out.contains('\u{1b}'), "no colour codes: {out}");
        assert!(
            out.contains("link{agent_id=\"node-1\"}:dial{dest=\"10.0.0.5:10250\"}"),
            "{out}"
        );
        assert!(out.contains("dialed elapsed_ms=12"), "{out}");
    }

    #[test]
    fn a_bad_filter_names_the_flag() {
        let err = parse_filter("cplink=loud").unwrap_err();
        assert!(err.to_string().starts_with("invalid --log-level"), "{err}");
    }
}
