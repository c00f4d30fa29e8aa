#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod baselines;
pub mod bounds;
pub mod record;
pub mod report;
pub mod suite;
mod trace;
mod world;

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use trace::{Arrival, Trace, TraceError};

use celery_scale_core::policy::ScalingPolicy;
use celery_scale_core::{ConfigError, Result};

use world::World;

/// The simulated world.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// The control loop's interval.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Resolution of the simulation clock.
    #[serde(with = "humantime_serde")]
    pub step: Duration,
    /// Time from asking for a unit to its workers taking tasks (billed).
    #[serde(with = "humantime_serde")]
    pub startup: Duration,
    /// Worker processes per unit (Celery's `--concurrency`).
    pub workers_per_unit: u32,
    /// Celery's `worker_prefetch_multiplier`: each unit holds up to
    /// `workers_per_unit x prefetch_multiplier` reserved messages besides the executing ones.
    pub prefetch_multiplier: u32,
    /// Units running at the start.
    pub initial_units: u32,
    /// Busy units protect themselves from scale-in, as the ECS task scale-in protection and the
    /// EC2 instance protection recipes do (`docs/ecs.md`, `docs/ec2.md`): a scale-in stops idle
    /// units, and a busy unit above the desired count is stopped once it has no task left.
    /// Without it, a scale-in stops units chosen at random, busy or not (warm shutdown).
    pub scale_in_protection: bool,
    /// After the last task completes, keep simulating until the fleet has not changed for this
    /// long (so slow scale-in is billed).
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// Stop regardless this long after the last arrival.
    #[serde(with = "humantime_serde")]
    pub horizon_after_last_arrival: Duration,
    /// Interval of the time series.
    #[serde(with = "humantime_serde")]
    pub sample_every: Duration,
    /// The wall-clock time of the trace's second 0, handed to the policy as
    /// `PolicyInput::wall` (advancing with the virtual clock), for scheduled floors. RFC 3339;
    /// by default Monday 2026-01-05 00:00 UTC, so a trace starts at midnight on a Monday.
    #[serde(with = "humantime_serde")]
    pub wall_start: SystemTime,
}

/// The default [`SimConfig::wall_start`]: Monday 2026-01-05 00:00:00 UTC.
pub const DEFAULT_WALL_START: Duration = Duration::from_secs(1_767_571_200);

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 7,
            interval: Duration::from_secs(5),
            step: Duration::from_millis(250),
            startup: Duration::from_secs(60),
            workers_per_unit: 1,
            prefetch_multiplier: 4,
            initial_units: 0,
            scale_in_protection: false,
            settle: Duration::from_secs(900),
            horizon_after_last_arrival: Duration::from_secs(6 * 3600),
            sample_every: Duration::from_secs(5),
            wall_start: SystemTime::UNIX_EPOCH + DEFAULT_WALL_START,
        }
    }
}

impl SimConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interval.is_zero() {
            return Err(ConfigError::new("interval", "must be greater than 0s"));
        }
        if self.step.is_zero() || self.step > self.interval {
            return Err(ConfigError::new(
                "step",
                "must be greater than 0s and at most the interval",
            ));
        }
        if self.workers_per_unit == 0 {
            return Err(ConfigError::new("workers_per_unit", "must be at least 1"));
        }
        if self.sample_every < self.step {
            return Err(ConfigError::new(
                "sample_every",
                "must be at least the step",
            ));
        }
        Ok(())
    }
}

/// One point of the time series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SimPoint {
    /// Seconds since the start.
    pub t_s: f64,
    /// Ready messages.
    pub ready: u64,
    /// Messages reserved by workers, not yet executing.
    pub in_flight: u64,
    /// Tasks executing.
    pub executing: u64,
    /// Desired worker processes.
    pub desired_workers: u32,
    /// Worker processes taking tasks.
    pub running_workers: u32,
}

/// What a run cost and how long tasks waited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Tasks in the trace.
    pub tasks: u64,
    /// Tasks completed.
    pub completed: u64,
    /// Worker-seconds billed (start-up, idle and stopping time included).
    pub worker_seconds: f64,
    /// Sum of task durations.
    pub busy_seconds: f64,
    /// Wait from arrival to start of execution: median.
    pub wait_p50_s: f64,
    /// 95th percentile.
    pub wait_p95_s: f64,
    /// 99th percentile.
    pub wait_p99_s: f64,
    /// Longest wait (a task never started counts its wait until the end).
    pub wait_max_s: f64,
    /// Times the desired count was set.
    pub scaling_actions: u32,
    /// Units launched, the initial ones included.
    pub launches: u32,
    /// Worker-seconds billed while units were starting (a cancelled start counts until then).
    pub startup_seconds: f64,
    /// Most worker processes running at once.
    pub peak_workers: u32,
    /// Simulated time.
    pub simulated_s: f64,
}

/// The time series and the summary of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimResult {
    /// Samples every `sample_every`.
    pub series: Vec<SimPoint>,
    /// The summary.
    pub summary: Summary,
    /// Each task that started: (arrival, wait), seconds, in the order they started.
    pub task_waits: Vec<(f64, f64)>,
}

/// Runs traces through a policy.
#[derive(Debug, Clone)]
pub struct Simulator {
    config: SimConfig,
}

impl Simulator {
    /// A simulator of `config`'s world.
    pub fn new(config: SimConfig) -> Self {
        Simulator { config }
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Simulates `trace` under `policy`. Runs on a thread of its own with a paused-clock
    /// runtime, so it may be called from anywhere, including inside a Tokio runtime.
    pub fn run(
        &self,
        trace: &Trace,
        policy: Box<dyn ScalingPolicy>,
    ) -> Result<SimResult, ConfigError> {
        self.config.validate()?;
        let config = self.config.clone();
        let trace = trace.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .start_paused(true)
                    .build()
                    .expect("a current-thread runtime builds");
                rt.block_on(World::new(config, trace).run(policy))
            })
            .join()
            .expect("the simulation thread does not panic")
        })
    }
}
