//! Log output for Treaty's binaries (the `treaty` daemon and CLI, the example services):
//! human-readable text or one JSON object per line, to stderr.
//!
//! Behind the `logging` feature, so that services embedding the SDK with a subscriber of
//! their own do not build this one.
//!
//! Invariants kept here:
//! - Colours (ANSI escapes) only when stderr is a terminal: a log file or a collector
//!   never sees escape codes.
//! - In JSON, every line is one complete object with the event's fields and the spans it
//!   was emitted in (`txn_id`, `branch_id`, `trace_id` come from the spans), so a
//!   collector can join lines of one transaction or one trace without parsing text.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use tracing::Subscriber;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

/// The environment variable that chooses the format when no flag does.
pub const LOG_FORMAT_ENV: &str = "TREATY_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// For people: one line per event, coloured on a terminal.
    #[default]
    Text,
    /// For machines: one JSON object per line.
    Json,
}

impl LogFormat {
    /// The format `TREATY_LOG_FORMAT` names; text when it is unset or empty.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(LOG_FORMAT_ENV) {
            Ok(value) if !value.is_empty() => value
                .parse()
                .map_err(|error| format!("{LOG_FORMAT_ENV}: {error}")),
            _ => Ok(Self::Text),
        }
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!(
                "log format {:?} is neither \"text\" nor \"json\"",
                name.chars().take(16).collect::<String>()
            )),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// The layer that writes events to stderr in `format`; compose it with others (a
/// filter, an exporter) in a `tracing_subscriber::registry()`.
pub fn stderr_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => layer.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => layer
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    }
}

/// The filter in the variable `filter_env` (`RUST_LOG` syntax); `info` when it is unset
/// or empty. A filter that does not parse is an error naming the variable: taken for
/// `info`, a filter meant to quieten a chatty module or to debug one would be ignored
/// without a word.
pub fn env_filter(filter_env: &str) -> Result<EnvFilter, String> {
    let value = match std::env::var(filter_env) {
        Ok(value) => Some(value),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(format!("{filter_env}: is not UTF-8, so not a log filter"));
        }
    };
    filter_from(value.as_deref()).map_err(|error| format!("{filter_env}: {error}"))
}

/// The filter `value` gives (`RUST_LOG` syntax); `info` for none or an empty one.
fn filter_from(value: Option<&str>) -> Result<EnvFilter, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(EnvFilter::new("info")),
        Some(value) => EnvFilter::builder()
            .parse(value)
            .map_err(|error| format!("{value:?} is not a log filter: {error}")),
    }
}

/// Installs the global subscriber: events passing `filter_env` go to stderr in `format`.
/// Does nothing if a subscriber is already installed. A filter that does not parse is
/// an error naming the variable, and installs nothing.
pub fn init(filter_env: &str, format: LogFormat) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = tracing_subscriber::registry()
        .with(env_filter(filter_env)?)
        .with(stderr_layer(format))
        .try_init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_that_does_not_parse_is_an_error_and_none_is_info() {
        for value in [None, Some(""), Some("  ")] {
            let filter = filter_from(value).unwrap();
            assert_eq!(filter.to_string(), "info", "{value:?}");
        }
        assert_eq!(
            filter_from(Some("warn,treaty=debug")).unwrap().to_string(),
            "treaty=debug,warn"
        );
        for bad in ["info,x=bogus", "=info", "treaty[=debug"] {
            let error = filter_from(Some(bad)).unwrap_err();
            assert!(error.contains("is not a log filter"), "{bad}: {error}");
        }
    }

    #[test]
    fn formats_are_named_text_and_json() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("TEXT".parse(), Ok(LogFormat::Text));
        assert!("yaml".parse::<LogFormat>().is_err());
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(format.to_string().parse(), Ok(format));
        }
    }
}
