//! The daemon shape shared by the deployable examples (`ecs_redis`, `ec2_rabbitmq`): flags and
//! environment, TOML/JSON configuration, logging, Prometheus metrics, `--once`, `--dry-run` and
//! clean shutdown on SIGTERM/SIGINT. Each example only says how to build its source and scaler.
//!
//! A daemon is, in order:
//!
//! ```text
//! let args = Args::parse();                      // #[command(flatten)] daemon: DaemonArgs
//! daemon::init_logging(args.daemon.log_format);
//! let config = daemon::load_config::<MySource, MyScaler>(&args.daemon.config, validate)?;
//! let bindings = daemon::build_bindings(&config, &args.daemon, make_source, make_scaler)?;
//! daemon::run(&args.daemon, bindings).await
//! ```
#![allow(dead_code)] // each example uses the pieces it needs

use std::error::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use celery_scale::config::{BindingConfig, Config};
use celery_scale::{
    Autoscaler, Binding, CancellationToken, ConfigError, LoopSettings, QueueSource, Scaler,
};
use serde::de::DeserializeOwned;

/// The flags every daemon has; each also reads an environment variable.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// Configuration file (TOML, or JSON when it ends in .json).
    #[arg(long, env = "CELERY_SCALE_CONFIG")]
    pub config: PathBuf,
    /// Decide and log, never set capacity (overrides every binding's `loop.dry_run`).
    #[arg(long, env = "CELERY_SCALE_DRY_RUN")]
    pub dry_run: bool,
    /// Run one tick of every binding, print the decision records as JSON, and exit.
    #[arg(long)]
    pub once: bool,
    /// Serve Prometheus metrics on this address (e.g. 0.0.0.0:9090).
    #[arg(long, env = "CELERY_SCALE_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Log format: text or json.
    #[arg(long, env = "CELERY_SCALE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the tracing subscriber (`RUST_LOG` filters; default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Reads and validates the configuration; `backends` checks the source and scaler sections
/// (field names relative to the binding, e.g. `source.url`).
pub fn load_config<S: DeserializeOwned, T: DeserializeOwned>(
    path: &Path,
    backends: impl Fn(&S, &T) -> Result<(), ConfigError>,
) -> Result<Config<S, T>, Box<dyn Error>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let config = if path.extension().is_some_and(|e| e == "json") {
        Config::from_json(&text, backends)
    } else {
        Config::from_toml(&text, backends)
    }
    .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(config)
}

/// A binding's loop settings with the `--dry-run` override applied.
pub fn settings<S, T>(binding: &BindingConfig<S, T>, args: &DaemonArgs) -> LoopSettings {
    let mut s = binding.settings.clone();
    s.dry_run |= args.dry_run;
    s
}

/// Builds every binding of `config`: its loop settings (with `--dry-run` applied), its policy,
/// and the source and scaler that `source` and `scaler` make from the binding's backend
/// sections. Errors name the binding, e.g. `bindings[1].scaler: ...`.
pub fn build_bindings<S, T>(
    config: &Config<S, T>,
    args: &DaemonArgs,
    mut source: impl FnMut(&S) -> Result<Box<dyn QueueSource>, Box<dyn Error>>,
    mut scaler: impl FnMut(&T) -> Result<Box<dyn Scaler>, Box<dyn Error>>,
) -> Result<Vec<Binding>, Box<dyn Error>> {
    let mut bindings = Vec::with_capacity(config.bindings.len());
    for (i, b) in config.bindings.iter().enumerate() {
        let at = format!("bindings[{i}]");
        let source = source(&b.source).map_err(|e| format!("{at}.source: {e}"))?;
        let scaler = scaler(&b.scaler).map_err(|e| format!("{at}.scaler: {e}"))?;
        let policy = b
            .policy
            .build()
            .map_err(|e| e.within(&format!("{at}.policy")))?;
        bindings.push(
            Binding::new(settings(b, args), source, scaler, policy)
                .map_err(|e| format!("{at}: {e}"))?,
        );
    }
    Ok(bindings)
}

/// Runs the bindings: one tick each with `--once` (records printed as JSON), otherwise until
/// SIGTERM or SIGINT, finishing the tick in progress.
pub async fn run(args: &DaemonArgs, mut bindings: Vec<Binding>) -> Result<(), Box<dyn Error>> {
    if let Some(addr) = args.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()?;
        tracing::info!(%addr, "serving Prometheus metrics");
    }
    if args.once {
        let mut records = Vec::new();
        for b in &mut bindings {
            records.push(b.tick().await);
        }
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down after the current tick");
        on_signal.cancel();
    });
    let mut autoscaler = Autoscaler::new();
    for b in bindings {
        autoscaler = autoscaler.with_binding(b);
    }
    tracing::info!(
        bindings = autoscaler.bindings().len(),
        "celery-scale running"
    );
    autoscaler.run(cancel).await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
