//! `celery-scale`: the daemon. Every binding of its configuration file picks its queue source
//! (`redis`, `amqp`) and compute target (`ecs`, `ec2`) at run time.
//!
//! - `celery-scale run --config FILE` runs every binding until SIGTERM or SIGINT.
//! - `celery-scale check --config FILE` validates, connects, waits for the worker-event warm-up
//!   and prints what each binding would do and why; it sets nothing, and exits non-zero when a
//!   binding cannot observe its queues or read its capacity.
//! - `celery-scale record --config FILE --duration 10m --out trace.csv` writes a trace of one
//!   binding's live traffic for `simulate`; it reads the broker only.
//!
//! Exit status: 0 after a clean run or check; 1 when a binding failed (a check that could not
//! observe or read capacity, a run in which a binding's task ended abnormally); 2 when the
//! configuration or the start-up is wrong.

mod backends;
mod check;
mod config;
mod leader;
mod logging;
mod record;
mod serve;
mod simulate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use celery_scale_core::{Autoscaler, CancellationToken};
use clap::{Parser, Subcommand};

use crate::backends::Backends;
use crate::config::DaemonConfig;
use crate::serve::Health;

#[derive(Debug, Parser)]
#[command(
    name = "celery-scale",
    version,
    about = "Autoscale Celery workers on ECS services or EC2 Auto Scaling Groups from their Redis or RabbitMQ backlog"
)]
struct Cli {
    /// Log format: text or json. `RUST_LOG` filters (default `info`).
    #[arg(
        long,
        global = true,
        env = "CELERY_SCALE_LOG_FORMAT",
        hide_env_values = true,
        default_value = "text"
    )]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every binding until SIGTERM or SIGINT (finishing the tick in progress).
    Run {
        /// Configuration file (TOML, or JSON when it ends in .json).
        #[arg(long, env = "CELERY_SCALE_CONFIG", hide_env_values = true)]
        config: PathBuf,
        /// Decide and log, never set capacity (on top of each binding's `loop.dry_run`).
        #[arg(long, env = "CELERY_SCALE_DRY_RUN", hide_env_values = true)]
        dry_run: bool,
        /// Serve /metrics (Prometheus), /healthz and /readyz on this address, e.g. 0.0.0.0:9090.
        #[arg(long, env = "CELERY_SCALE_LISTEN", hide_env_values = true)]
        listen: Option<SocketAddr>,
    },
    /// Validate, connect, wait for the worker-event warm-up, and print what each binding would
    /// do and why. Sets nothing.
    Check {
        /// Configuration file (TOML, or JSON when it ends in .json).
        #[arg(long, env = "CELERY_SCALE_CONFIG", hide_env_values = true)]
        config: PathBuf,
        /// How long to wait for every binding's worker-event feed to warm up.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        warmup_timeout: Duration,
        /// Print the decision records as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replay a trace through exactly the configured policies, units and prefetch, in virtual
    /// time; connects to nothing. Prints each binding's cost and queue wait.
    Simulate {
        /// Configuration file (TOML, or JSON when it ends in .json). Sources are not read.
        #[arg(long, env = "CELERY_SCALE_CONFIG", hide_env_values = true)]
        config: PathBuf,
        /// A trace in celery-scale's CSV format (`at_s,count,duration_s,queue`); default: a
        /// built-in burst of 300 ten-second tasks, then a trickle of one-minute tasks.
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Only the binding of this name.
        #[arg(long)]
        binding: Option<String>,
        /// Seed of the simulator's random choices (which unit stops, which worker takes a task).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Time from asking for a unit to its workers taking tasks.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        startup: Duration,
    },
    /// Record one binding's live traffic as a trace for `simulate --trace` (reads the broker
    /// only: no capacity is read or set).
    ///
    /// With task events (Celery workers run with `-E`): each task's duration is its
    /// task-succeeded runtime, its arrival its task-sent time (publishers with
    /// task_send_sent_event) or, from task-received and the backlog read every --every, when
    /// the queue's arrivals reached it. Without them (`--events off`, SQS, or `auto` when no
    /// worker sends any): AN ESTIMATE from successive observations, arrivals from the backlog's
    /// growth plus the tasks workers reserved (heartbeats), one mean duration for every task.
    /// The file's header comments say which mode was used. SIGINT/SIGTERM stops it early and
    /// writes what was recorded.
    Record {
        /// Configuration file (TOML, or JSON when it ends in .json): the binding's source is
        /// read, its scaler never.
        #[arg(long, env = "CELERY_SCALE_CONFIG", hide_env_values = true)]
        config: PathBuf,
        /// The binding to record (required when the file has several).
        #[arg(long)]
        binding: Option<String>,
        /// How long to record, e.g. 10m, 1h.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
        /// The trace file to write (CSV: at_s,count,duration_s,queue).
        #[arg(long)]
        out: PathBuf,
        /// auto: task events when workers send them, else observations; on: task events only;
        /// off: observations only (an estimate).
        #[arg(long, value_enum, default_value = "auto")]
        events: record::EventsArg,
        /// How often the backlog is read.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        every: Duration,
        /// Every task's duration in observations mode when heartbeats measured none.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        default_duration: Duration,
        /// The most tasks in progress tracked at once (the oldest is forgotten past it).
        #[arg(long, default_value_t = 100_000)]
        max_tracked: usize,
    },
}

/// Why the process ends, and with which status.
pub(crate) enum Failure {
    /// The configuration or the start-up is wrong (status 2).
    Setup(String),
    /// A binding failed (status 1); already logged or printed.
    Binding(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A simulation's thousands of virtual ticks are its output's noise: warnings only.
    let default_filter = match cli.command {
        Command::Simulate { .. } => "warn",
        _ => "info",
    };
    logging::init(cli.log_format, default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("celery-scale: cannot start the Tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Run {
                config,
                dry_run,
                listen,
            } => run(&config, dry_run, listen).await,
            Command::Check {
                config,
                warmup_timeout,
                json,
            } => check::check(&config, warmup_timeout, json).await,
            Command::Simulate {
                config,
                trace,
                binding,
                seed,
                startup,
            } => simulate::simulate(
                &config,
                simulate::SimulateArgs {
                    trace: trace.as_deref(),
                    binding: binding.as_deref(),
                    seed,
                    startup,
                },
            ),
            Command::Record {
                config,
                binding,
                duration,
                out,
                events,
                every,
                default_duration,
                max_tracked,
            } => {
                record::record(
                    &config,
                    record::RecordArgs {
                        binding: binding.as_deref(),
                        duration,
                        out: &out,
                        events,
                        every,
                        default_duration,
                        max_tracked,
                    },
                )
                .await
            }
        }
    });
    // Background tasks (worker-event feeds) end with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Setup(e)) => {
            eprintln!("celery-scale: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Binding(e)) => {
            eprintln!("celery-scale: {e}");
            ExitCode::from(1)
        }
    }
}

/// Loads the configuration and builds the shared AWS handles.
pub(crate) async fn load(path: &std::path::Path) -> Result<(DaemonConfig, Arc<Backends>), Failure> {
    let config = DaemonConfig::load(path).map_err(Failure::Setup)?;
    let backends = Backends::connect(&config).await.map_err(Failure::Setup)?;
    Ok((config, Arc::new(backends)))
}

async fn run(
    path: &std::path::Path,
    dry_run: bool,
    listen: Option<SocketAddr>,
) -> Result<(), Failure> {
    let (config, backends) = load(path).await?;
    let cancel = CancellationToken::new();
    let health = Arc::new(Health::default());
    let server = match listen {
        Some(addr) => {
            let listener = serve::bind(addr).await.map_err(Failure::Setup)?;
            let metrics = serve::install_metrics().map_err(Failure::Setup)?;
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            Some(tokio::spawn(serve::serve(
                listener,
                metrics,
                Arc::clone(&health),
                cancel.clone(),
            )))
        }
        None => None,
    };
    // A dry run never takes a lease: it would keep the lease from a copy that acts.
    let leader = match (&config.leader_election, dry_run) {
        (Some(_), true) => {
            tracing::info!("dry run: no lease is taken (leader_election ignored)");
            None
        }
        (Some(l), false) => {
            let holder = l.holder_name();
            tracing::info!(%holder, lease = %humantime::format_duration(l.lease), "leader election on: acting on a binding only while holding its lease");
            Some((l.clone(), holder))
        }
        (None, _) => None,
    };
    let mut autoscaler = Autoscaler::new();
    for b in &config.bindings {
        health.register(&b.settings.name, b.settings.interval, b.settings.timeout);
        let factory = backends::factory(
            Arc::clone(&backends),
            b,
            dry_run,
            Some(Arc::clone(&health) as _),
            leader.clone(),
        );
        autoscaler = autoscaler
            .with_restartable_binding(factory)
            .map_err(|e| Failure::Setup(e.to_string()))?;
    }
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down after the current tick");
        on_signal.cancel();
    });
    tracing::info!(bindings = autoscaler.len(), dry_run, "celery-scale running");
    let report = autoscaler.run(cancel.clone()).await;
    cancel.cancel();
    if let Some(server) = server {
        let _ = server.await;
    }
    if report.is_clean() {
        Ok(())
    } else {
        Err(Failure::Binding(format!(
            "{} binding failure(s) during the run{}",
            report.binding_failures,
            if report.bindings_lost.is_empty() {
                String::new()
            } else {
                format!("; lost: {}", report.bindings_lost.join(", "))
            }
        )))
    }
}

async fn shutdown_signal() {
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
