//! The control loop: for each binding, observe, decide, and set only when the answer changes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::policy::{PolicyInput, ScalingPolicy, decide_guarded};
use crate::record::{
    CapacityRecord, DecisionRecord, DecisionSink, ObservedRecord, Outcome, RecordedError,
};
use crate::{ConfigError, Error, QueueSource, Scaler};

/// How one binding's loop runs: its name, interval, timeouts and how old an observation may be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopSettings {
    /// The binding's name (a metrics label and log field).
    pub name: String,
    /// Time between ticks.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Timeout of every observe, read and set call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// An observation older than this at decision time counts as failed.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    /// The longest wait between ticks while transient errors back off.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Decide and record, never set.
    pub dry_run: bool,
}

impl Default for LoopSettings {
    fn default() -> Self {
        LoopSettings {
            name: "default".into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            max_staleness: Duration::from_secs(30),
            max_backoff: Duration::from_secs(60),
            dry_run: false,
        }
    }
}

impl LoopSettings {
    /// Checks every field; the error names the field (relative to these settings).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        if self.interval.is_zero() {
            return Err(ConfigError::new("interval", "must be greater than 0s"));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be greater than 0s"));
        }
        if self.max_staleness < self.interval {
            return Err(ConfigError::new(
                "max_staleness",
                format!(
                    "{} is shorter than interval {}: every observation would be stale",
                    humantime::format_duration(self.max_staleness),
                    humantime::format_duration(self.interval)
                ),
            ));
        }
        if self.max_backoff < self.interval {
            return Err(ConfigError::new(
                "max_backoff",
                format!(
                    "{} is shorter than interval {}",
                    humantime::format_duration(self.max_backoff),
                    humantime::format_duration(self.interval)
                ),
            ));
        }
        Ok(())
    }
}

/// One set of queues driving one compute target.
#[derive(Debug)]
pub struct Binding {
    settings: LoopSettings,
    source: Box<dyn QueueSource>,
    scaler: Box<dyn Scaler>,
    policy: Box<dyn ScalingPolicy>,
    sink: Option<Arc<dyn DecisionSink>>,
    consecutive_failures: u32,
    transient_errors: u32,
}

impl Binding {
    /// A binding; fails when the settings are invalid.
    pub fn new(
        settings: LoopSettings,
        source: Box<dyn QueueSource>,
        scaler: Box<dyn Scaler>,
        policy: Box<dyn ScalingPolicy>,
    ) -> Result<Self, ConfigError> {
        settings.validate()?;
        Ok(Binding {
            settings,
            source,
            scaler,
            policy,
            sink: None,
            consecutive_failures: 0,
            transient_errors: 0,
        })
    }

    /// Also hands every record to `sink`.
    pub fn with_sink(mut self, sink: Arc<dyn DecisionSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// The binding's settings.
    pub fn settings(&self) -> &LoopSettings {
        &self.settings
    }

    async fn timed<T>(
        &self,
        operation: &str,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(Error::timeout(operation, self.settings.timeout)),
        }
    }

    /// Runs one tick now: observe, read capacity, decide, set when changed. Never panics on a
    /// backend fault; the record says what happened. Also logs it, updates metrics and calls
    /// the sink.
    pub async fn tick(&mut self) -> DecisionRecord {
        let started = Instant::now();
        let wall = SystemTime::now();
        let (observed, capacity) = tokio::join!(
            self.timed("observe", self.source.observe()),
            self.timed("capacity", self.scaler.capacity())
        );
        let now = Instant::now();
        let mut had_transient = false;

        let (observation, observation_record, observation_error) = match observed {
            Ok(obs) => {
                let age = obs.age(now);
                let record = ObservedRecord::new(&obs, age);
                if age > self.settings.max_staleness {
                    let err = RecordedError {
                        kind: crate::ErrorKind::Other,
                        transient: true,
                        message: format!(
                            "observation is stale: {} old, limit {}",
                            humantime::format_duration(age),
                            humantime::format_duration(self.settings.max_staleness)
                        ),
                    };
                    (None, Some(record), Some(err))
                } else {
                    (Some(obs), Some(record), None)
                }
            }
            Err(e) => {
                had_transient |= e.is_transient();
                (None, None, Some(RecordedError::from(&e)))
            }
        };
        if observation.is_some() {
            self.consecutive_failures = 0;
        } else {
            self.consecutive_failures += 1;
        }

        let per_unit = self.scaler.workers_per_unit();
        let mut record = DecisionRecord {
            binding: self.settings.name.clone(),
            at: wall,
            observation: observation_record,
            observation_error,
            consecutive_failures: self.consecutive_failures,
            capacity: None,
            capacity_error: None,
            decision: None,
            desired_units: None,
            outcome: Outcome::Held { why: String::new() },
            dry_run: self.settings.dry_run,
            duration: Duration::ZERO,
            next_tick_in: self.settings.interval,
        };

        match capacity {
            Err(e) => {
                had_transient |= e.is_transient();
                record.outcome = Outcome::Held {
                    why: format!("capacity unknown: {e}"),
                };
                record.capacity_error = Some(RecordedError::from(&e));
            }
            Ok(units) => {
                record.capacity = Some(CapacityRecord {
                    unit: self.scaler.unit(),
                    workers_per_unit: per_unit.get(),
                    units,
                });
                let input = PolicyInput {
                    observation: observation.as_ref(),
                    consecutive_failures: self.consecutive_failures,
                    capacity: per_unit.capacity_in_workers(units),
                    now,
                };
                let decision = decide_guarded(self.policy.as_mut(), &input);
                let to = per_unit.units_for(decision.desired);
                record.desired_units = Some(to);
                record.decision = Some(decision);
                record.outcome = if to == units.desired {
                    Outcome::Unchanged { units: to }
                } else if self.settings.dry_run {
                    Outcome::WouldSet {
                        from: units.desired,
                        to,
                    }
                } else {
                    match self.timed("set_desired", self.scaler.set_desired(to)).await {
                        Ok(out) => Outcome::Set {
                            from: units.desired,
                            to,
                            applied: out.applied,
                            note: out.note,
                        },
                        Err(e) => {
                            had_transient |= e.is_transient();
                            Outcome::SetFailed {
                                to,
                                error: RecordedError::from(&e),
                            }
                        }
                    }
                };
            }
        }

        if had_transient {
            self.transient_errors = self.transient_errors.saturating_add(1);
        } else {
            self.transient_errors = 0;
        }
        record.next_tick_in = self.next_delay();
        record.duration = started.elapsed();
        emit(&record);
        if let Some(sink) = &self.sink {
            sink.record(&record);
        }
        record
    }

    /// The interval, doubled for each tick in a row that met a transient error, up to
    /// `max_backoff`.
    fn next_delay(&self) -> Duration {
        let factor = 1u32 << self.transient_errors.min(16);
        self.settings
            .interval
            .saturating_mul(factor)
            .min(self.settings.max_backoff)
            .max(self.settings.interval)
    }

    /// Ticks every interval (or backoff) until `cancel` fires. The first tick is immediate.
    /// A tick in progress finishes (its calls are bounded by the timeout); no new one starts.
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let delay = self.tick().await.next_tick_in;
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Logs a record through `tracing` and updates `metrics`.
fn emit(r: &DecisionRecord) {
    let binding = r.binding.clone();
    let ready = r.observation.as_ref().map(|o| o.ready);
    let in_flight = r.observation.as_ref().and_then(|o| o.in_flight);
    let desired_workers = r.decision.as_ref().map(|d| d.desired);
    let reason = r.reason();
    let outcome = r.outcome.label();
    if r.observation_error.is_some() || r.capacity_error.is_some() || outcome == "set_failed" {
        tracing::warn!(
            binding = %binding, outcome, ready, in_flight, desired_workers,
            desired_units = r.desired_units,
            observation_error = r.observation_error.as_ref().map(|e| e.message.as_str()),
            capacity_error = r.capacity_error.as_ref().map(|e| e.message.as_str()),
            consecutive_failures = r.consecutive_failures,
            reason = %reason,
            "celery-scale decision"
        );
    } else {
        tracing::info!(
            binding = %binding, outcome, ready, in_flight, desired_workers,
            desired_units = r.desired_units, dry_run = r.dry_run, reason = %reason,
            "celery-scale decision"
        );
    }
    let labels = [("binding", binding.clone())];
    metrics::counter!("celery_scale_decisions_total", "binding" => binding.clone(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!("celery_scale_tick_duration_seconds", &labels)
        .record(r.duration.as_secs_f64());
    if let Some(ready) = ready {
        metrics::gauge!("celery_scale_ready_messages", &labels).set(ready as f64);
    }
    if let Some(in_flight) = in_flight {
        metrics::gauge!("celery_scale_in_flight_messages", &labels).set(in_flight as f64);
    }
    if let Some(executing) = r.observation.as_ref().and_then(|o| o.executing) {
        metrics::gauge!("celery_scale_executing_tasks", &labels).set(executing as f64);
    }
    if let Some(d) = desired_workers {
        metrics::gauge!("celery_scale_desired_workers", &labels).set(f64::from(d));
    }
    if let Some(u) = r.desired_units {
        metrics::gauge!("celery_scale_desired_units", &labels).set(f64::from(u));
    }
    for (stage, err) in [
        ("observe", &r.observation_error),
        ("capacity", &r.capacity_error),
    ] {
        if let Some(e) = err {
            metrics::counter!("celery_scale_errors_total", "binding" => binding.clone(), "stage" => stage, "kind" => e.kind.as_str())
                .increment(1);
        }
    }
    if let Outcome::SetFailed { error, .. } = &r.outcome {
        metrics::counter!("celery_scale_errors_total", "binding" => binding.clone(), "stage" => "set_desired", "kind" => error.kind.as_str())
            .increment(1);
    }
}

/// Many bindings, each ticking on its own interval.
#[derive(Debug, Default)]
pub struct Autoscaler {
    bindings: Vec<Binding>,
}

impl Autoscaler {
    /// An autoscaler with no bindings.
    pub fn new() -> Self {
        Autoscaler::default()
    }

    /// Adds a binding.
    pub fn with_binding(mut self, binding: Binding) -> Self {
        self.bindings.push(binding);
        self
    }

    /// The bindings.
    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// One tick of every binding, concurrently; the records in binding order.
    pub async fn tick_all(&mut self) -> Vec<DecisionRecord> {
        let ticks = self.bindings.iter_mut().map(|b| b.tick());
        futures::future::join_all(ticks).await
    }

    /// Runs every binding on its own task until `cancel` fires, then waits for them to finish
    /// their current tick.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tasks = JoinSet::new();
        for binding in self.bindings {
            tasks.spawn(binding.run(cancel.clone()));
        }
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res {
                tracing::error!(error = %e, "a binding's task ended abnormally");
            }
        }
    }
}
