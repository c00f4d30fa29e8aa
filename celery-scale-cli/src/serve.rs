//! The daemon's HTTP listener: Prometheus metrics at `/metrics`, liveness at `/healthz` and
//! readiness at `/readyz`, for ECS container health checks and load balancer target groups.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use celery_scale_core::CancellationToken;
use celery_scale_core::record::{DecisionRecord, DecisionSink};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::time::Instant;

/// How many intervals (plus the call timeout) a binding may go without a fresh observation or
/// capacity read before the daemon is not ready.
const READY_INTERVALS: u32 = 3;

#[derive(Debug)]
struct BindingHealth {
    /// Longest quiet time before the binding counts as not ready.
    allowed: Duration,
    last_observation: Option<Instant>,
    last_capacity: Option<Instant>,
}

/// What each binding last managed to do, fed by every tick (a [`DecisionSink`]).
#[derive(Debug, Default)]
pub struct Health {
    bindings: Mutex<BTreeMap<String, BindingHealth>>,
}

impl Health {
    /// Registers a binding ticking every `interval` with calls bounded by `timeout`.
    pub fn register(&self, name: &str, interval: Duration, timeout: Duration) {
        self.lock().insert(
            name.to_string(),
            BindingHealth {
                allowed: interval * READY_INTERVALS + timeout,
                last_observation: None,
                last_capacity: None,
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BindingHealth>> {
        self.bindings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether every binding had a fresh observation and a capacity read recently enough, and
    /// for each one that did not, why.
    pub fn readiness(&self, now: Instant) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        for (name, b) in self.lock().iter() {
            let recent = |t: Option<Instant>| {
                t.is_some_and(|t| now.saturating_duration_since(t) <= b.allowed)
            };
            if !recent(b.last_observation) {
                problems.push(format!(
                    "{name}: no fresh observation within {}",
                    humantime::format_duration(b.allowed)
                ));
            }
            if !recent(b.last_capacity) {
                problems.push(format!(
                    "{name}: no capacity read within {}",
                    humantime::format_duration(b.allowed)
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

impl DecisionSink for Health {
    fn record(&self, r: &DecisionRecord) {
        let now = Instant::now();
        if let Some(b) = self.lock().get_mut(&r.binding) {
            if r.observation.is_some() && r.observation_error.is_none() {
                b.last_observation = Some(now);
            }
            if r.capacity.is_some() {
                b.last_capacity = Some(now);
            }
        }
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

async fn metrics(State(s): State<AppState>) -> String {
    s.metrics.render()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    match s.health.readiness(Instant::now()) {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", problems.join("\n")),
        ),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `cancel`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

/// Binds `addr` (so a taken port is a start-up error, not a background one).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// Installs the Prometheus recorder and describes every metric the loop records (the `# HELP`
/// lines).
pub fn install_metrics() -> Result<PrometheusHandle, String> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe_metrics();
    Ok(handle)
}

/// The `# HELP` text of every metric, in one place (docs/metrics in the README match it).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "celery_scale_decisions_total",
        "Ticks of a binding, by outcome (unchanged, set, would_set, set_failed, held, follower)"
    );
    describe_histogram!(
        "celery_scale_tick_duration_seconds",
        "Time one tick took: observe and read capacity (concurrently), decide, set"
    );
    describe_gauge!(
        "celery_scale_ready_messages",
        "Messages waiting in the binding's queues (all priorities); NaN when the last observation failed"
    );
    describe_gauge!(
        "celery_scale_in_flight_messages",
        "Messages held by workers, not acknowledged (prefetched, ETA, acks_late executing); NaN when unknown"
    );
    describe_gauge!(
        "celery_scale_executing_tasks",
        "Tasks executing now, from Celery worker heartbeats; NaN when unknown (feed down, warming up, a worker silent)"
    );
    describe_gauge!(
        "celery_scale_live_workers",
        "Celery worker nodes beating now; NaN when unknown"
    );
    describe_gauge!(
        "celery_scale_observation_fresh",
        "1 when the last tick had a fresh observation, 0 when it failed or was stale"
    );
    describe_gauge!(
        "celery_scale_worker_figures_known",
        "1 when the last observation knew the executing tasks, 0 otherwise"
    );
    describe_gauge!(
        "celery_scale_desired_workers",
        "Worker processes the policy asked for at the last tick; NaN when capacity could not be read"
    );
    describe_gauge!(
        "celery_scale_desired_units",
        "Units (ECS tasks, EC2 instances) the policy asked for at the last tick; NaN when capacity could not be read"
    );
    describe_gauge!(
        "celery_scale_running_units",
        "Units the target reported running at the last tick; NaN when capacity could not be read"
    );
    describe_gauge!(
        "celery_scale_leader",
        "With [leader_election]: 1 while this copy holds the binding's lease and acts, 0 while another copy does, NaN while the lease store cannot be asked"
    );
    describe_counter!(
        "celery_scale_errors_total",
        "Errors by stage (observe, capacity, set_desired) and kind"
    );
    describe_counter!(
        "celery_scale_binding_failures_total",
        "Times a binding's task ended abnormally (a panic); it is rebuilt after a backoff"
    );
    describe_counter!(
        "celery_scale_binding_restarts_total",
        "Times a binding was rebuilt after its task ended abnormally"
    );
}
