//! The tracing set-up every unwedge binary calls once at start (the agent, the operator, the
//! e2e agent pool): `RUST_LOG` when set, else the binary's own default directives, written as
//! text or as one JSON object per line. Process-wide, so libraries never call it.

use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// `--log-format`: how log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A `--log-format` value that is neither `text` nor `json`.
#[derive(Debug, thiserror::Error)]
#[error("unknown log format {0:?}: use text or json")]
pub struct UnknownLogFormat(String);

impl FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as clap::ValueEnum>::from_str(s, false).map_err(|_| UnknownLogFormat(s.to_string()))
    }
}

/// Installs the global tracing subscriber: the filter from `RUST_LOG` when it parses, else
/// `default_directives` (e.g. `info`, or `info,kube=warn`); lines in `format`. Panics when a
/// global subscriber is already installed (a second call is a bug in the binary).
pub fn init(default_directives: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_directives));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_values_parse_and_others_are_refused() {
        assert_eq!("text".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        let e = "yaml".parse::<LogFormat>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown log format \"yaml\": use text or json"
        );
    }
}
