//! Logs: `RUST_LOG` filters (default `info`); text without ANSI colours unless stderr is a
//! terminal, or JSON lines. Dependencies that print credentials at their most verbose levels are
//! capped whatever `RUST_LOG` says.

use std::io::IsTerminal;

/// How logs are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the tracing subscriber on stderr; `default` filters when `RUST_LOG` is unset.
pub fn init(format: LogFormat, default: &str) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Added after RUST_LOG's, so they win for their targets: lapin logs every frame at trace
    // level, the connection's login frame (with the password in its bytes) included.
    for directive in celery_scale_amqp::LOG_FILTER_DIRECTIVES.split(',') {
        if let Ok(d) = directive.parse() {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
