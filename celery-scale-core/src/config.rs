//! Configuration: serde structs (TOML and JSON), validated at construction with errors that name
//! the field path and the rule, e.g. `bindings[0].policy.max_workers: 0 is below min_workers 1`.
//! A value of the wrong type or an unknown key names its path the same way, from the root and
//! through the backends' `source` and `scaler` sections, with its line:
//! ``bindings[0].policy.max_workers: invalid value: integer `-1`, expected u32 (line 8)``.
//! Every policy field has bounds that reject nonsense (see [`PolicyConfig`]).
//!
//! ```
//! use celery_scale_core::config::Config;
//! # #[derive(Debug, serde::Deserialize, serde::Serialize)] struct Src { queue: String }
//! # #[derive(Debug, serde::Deserialize, serde::Serialize)] struct Tgt { service: String }
//! let toml = r#"
//! [[bindings]]
//! loop = { name = "emails", interval = "5s" }
//! policy = { kind = "drain_time", target_wait = "30s", max_workers = 20 }
//! source = { queue = "emails" }
//! scaler = { service = "email-workers" }
//! "#;
//! let config: Config<Src, Tgt> = Config::from_toml(toml, |_, _| Ok(())).unwrap();
//! let policy = config.bindings[0].policy.build().unwrap();
//! # let _ = policy;
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::layer::{ForecastSettings, PolicyExt, ScheduleWindow, StepLimit};
use crate::policy::{DrainTime, ScalingPolicy, TargetBacklog};
use crate::{ConfigError, LoopSettings};

/// The base policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// [`DrainTime`]: enough workers to start every waiting task within `target_wait`.
    DrainTime,
    /// [`TargetBacklog`]: one worker per `messages_per_worker` outstanding messages.
    TargetBacklog,
}

/// A rate limit on capacity changes (see [`StepLimit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepLimitConfig {
    /// Workers that may be added/removed per period. At most 100 000 (the bound of
    /// `max_workers`); `workers` and `percent` may not both be 0.
    #[serde(default)]
    pub workers: u32,
    /// Percent of current capacity that may be added/removed per period. At most 10 000
    /// (100 times the current capacity).
    #[serde(default)]
    pub percent: u32,
    /// The period. From 1 s to 24 h.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
}

/// What to do once observations keep failing (see [`crate::layer::Fallback`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// Failed observations in a row before the fallback applies. From 1 to 10 000.
    pub after_failures: u32,
    /// Raise to at least this many workers; absent: hold. Within `min_workers..=max_workers`.
    #[serde(default)]
    pub capacity: Option<u32>,
}

/// A window of the week with a floor of workers (see [`ScheduleWindow`]):
/// `{ days = "mon-fri", from = "08:00", to = "18:00", tz = "UTC", min_workers = 4 }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Days the window starts on: `mon-fri`, `sat,sun`, `mon,wed-fri`, `daily` (the default).
    #[serde(default = "ScheduleConfig::every_day")]
    pub days: String,
    /// Local start, `HH:MM` (24-hour).
    pub from: String,
    /// Local end, `HH:MM` or `24:00`; at or before `from`, the window ends the next day.
    pub to: String,
    /// `UTC` (the default) or an IANA time zone name (`Europe/Paris`, `America/New_York`).
    #[serde(default = "ScheduleConfig::utc")]
    pub tz: String,
    /// Workers kept at least during the window. At most `max_workers`.
    pub min_workers: u32,
}

impl ScheduleConfig {
    fn every_day() -> String {
        "daily".into()
    }
    fn utc() -> String {
        "UTC".into()
    }

    /// The window; errors name the field relative to this entry (`days`, `from`, `to`, `tz`).
    pub fn window(&self) -> Result<ScheduleWindow, ConfigError> {
        ScheduleWindow::parse(&self.days, &self.from, &self.to, &self.tz, self.min_workers)
    }
}

/// Discovery of a broker's queues, shared by the sources that offer it (each says how it lists
/// them and which of Celery's internal queues it always leaves out):
/// `discovery = { refresh = "60s", exclude = ["tmp-*"] }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// How often to list the queues again (default 60 s; each source bounds it).
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// Discovered queue names to leave out; `*` matches any run of characters (e.g. `"tmp-*"`).
    pub exclude: Vec<String>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            refresh: Duration::from_secs(60),
            exclude: Vec::new(),
        }
    }
}

impl DiscoveryConfig {
    /// Whether a discovered queue `name` is left out by an `exclude` pattern.
    pub fn excludes(&self, name: &str) -> bool {
        self.exclude.iter().any(|p| crate::wildcard_match(p, name))
    }
}

/// Checks a list of `*` patterns (queue names, worker hostnames): none may be empty. The error
/// names `field[i]`.
///
/// ```
/// use celery_scale_core::config::non_empty_patterns;
/// assert!(non_empty_patterns("exclude", &["tmp-*".into()]).is_ok());
/// let e = non_empty_patterns("exclude", &["a".into(), "".into()]).unwrap_err();
/// assert_eq!(e.field, "exclude[1]");
/// ```
pub fn non_empty_patterns(field: &str, patterns: &[String]) -> Result<(), ConfigError> {
    match patterns.iter().position(String::is_empty) {
        Some(i) => Err(ConfigError::new(
            format!("{field}[{i}]"),
            "must not be empty (use \"*\" for every name)",
        )),
        None => Ok(()),
    }
}

/// A learned floor for a recurring peak (see [`Forecast`](crate::layer::Forecast)):
/// `forecast = { period = "1d", cycles = 2, lead = "60s" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForecastConfig {
    /// How often the pattern recurs: `1h` (an hourly cron), `1d` (a daily peak), `7d`. From
    /// 1 minute to 7 days.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    /// Past periods that must each have asked for the capacity (the floor is the lowest of
    /// them): 1 replays yesterday, 2 (the default) ignores a one-off. From 1 to 10.
    #[serde(default = "ForecastConfig::two")]
    pub cycles: u32,
    /// How far ahead to prepare: a worker start-up. Absent: `worker_startup`, else 60 s. At
    /// most half the `period`.
    #[serde(default, with = "humantime_serde")]
    pub lead: Option<Duration>,
    /// Bucket width of what is remembered (default 60 s): whole seconds dividing `period`, at
    /// most 20 160 buckets per period; keep it at least the loop's interval (a bucket no tick
    /// fell in is nothing remembered).
    #[serde(default = "ForecastConfig::minute", with = "humantime_serde")]
    pub resolution: Duration,
}

impl ForecastConfig {
    fn two() -> u32 {
        2
    }
    fn minute() -> Duration {
        Duration::from_secs(60)
    }

    /// A forecast of `period` with the defaults (2 cycles, the lead from `worker_startup` or
    /// 60 s, 60 s buckets).
    pub fn every(period: Duration) -> Self {
        ForecastConfig {
            period,
            cycles: Self::two(),
            lead: None,
            resolution: Self::minute(),
        }
    }

    /// The checked settings, with `worker_startup` as the lead when none is given; errors name
    /// the field relative to this struct.
    pub fn settings(
        &self,
        worker_startup: Option<Duration>,
    ) -> Result<ForecastSettings, ConfigError> {
        let lead = self
            .lead
            .or(worker_startup)
            .unwrap_or(Duration::from_secs(60));
        ForecastSettings::new(self.period, self.cycles, lead, self.resolution).map_err(|e| {
            match (e.field.as_str(), self.lead, worker_startup) {
                ("lead", None, Some(_)) => ConfigError::new(
                    "lead",
                    format!("{} (the lead defaults to worker_startup)", e.rule),
                ),
                _ => e,
            }
        })
    }
}

/// A policy and its layers, as configured. [`PolicyConfig::build`] assembles
/// `base -> in_flight_floor -> rent_or_buy -> activation -> forecast -> stabilize -> schedule
/// -> max_step -> bounds -> fallback`.
///
/// # Bounds
///
/// [`PolicyConfig::validate`] (and [`PolicyConfig::build`]) check every field against these
/// bounds, whichever `kind` and layers are chosen: they are far beyond any real deployment and
/// only reject nonsense (a 10^9-worker fleet, a timeout of centuries, 10^-300 messages per
/// worker). A violation names the field, the value and the bound, e.g.
/// `max_workers: 1000000000 is above the maximum 100000`. Floats must also be finite.
///
/// | field | bounds (inclusive) |
/// |---|---|
/// | `max_workers` | 1 ..= 100 000 |
/// | `min_workers` | 0 ..= `max_workers` |
/// | `messages_per_worker` | 0.01 ..= 1 000 000 |
/// | `throughput_per_worker` (tasks/s) | 0.000001 ..= 1 000 000 |
/// | `target_wait` | 1 s ..= 24 h |
/// | `activation_messages` | 0 ..= 1 000 000 000 (0 acts as 1) |
/// | `scale_to_zero_after`, `stabilize_up`, `stabilize_down` | 0 ..= 24 h |
/// | `held_per_worker` | 1 ..= 10 000 |
/// | `max_step_up` / `max_step_down`: `workers` | 0 ..= 100 000 (not both 0 with `percent`) |
/// | `max_step_up` / `max_step_down`: `percent` | 0 ..= 10 000 |
/// | `max_step_up` / `max_step_down`: `period` | 1 s ..= 24 h |
/// | `fallback.after_failures` | 1 ..= 10 000 |
/// | `fallback.capacity` | `min_workers` ..= `max_workers` |
/// | `worker_startup` | 1 s ..= 24 h |
/// | `schedule[i].min_workers` | 0 ..= `max_workers` |
/// | `forecast.period` | 1 min ..= 7 days, whole seconds |
/// | `forecast.cycles` | 1 ..= 10 |
/// | `forecast.lead` | 0 ..= half the `forecast.period` |
/// | `forecast.resolution` | 1 s ..= `forecast.period`, dividing it, at most 20 160 buckets per period |
///
/// ```
/// use celery_scale_core::config::PolicyConfig;
/// let e = PolicyConfig { max_workers: 1_000_000_000, ..PolicyConfig::default() }
///     .validate()
///     .unwrap_err();
/// assert_eq!(e.to_string(), "max_workers: 1000000000 is above the maximum 100000");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The base policy.
    pub kind: PolicyKind,
    /// `drain_time`: every waiting task should start within this. From 1 s to 24 h.
    #[serde(with = "humantime_serde")]
    pub target_wait: Duration,
    /// `drain_time`: tasks per second one worker completes, used until heartbeats measure it.
    /// Finite, from 0.000001 to 1 000 000.
    pub throughput_per_worker: f64,
    /// `target_backlog`: outstanding messages per worker. Finite, from 0.01 to 1 000 000.
    pub messages_per_worker: f64,
    /// Fewest workers. At most `max_workers`.
    pub min_workers: u32,
    /// Most workers. From 1 to 100 000.
    pub max_workers: u32,
    /// Scale from zero only at this many outstanding messages (0 acts as 1). At most 10^9.
    pub activation_messages: u64,
    /// Scale to zero only after the queues were idle this long. At most 24 h.
    #[serde(with = "humantime_serde")]
    pub scale_to_zero_after: Duration,
    /// Scale out to the lowest recommendation of this window (0: at once). At most 24 h.
    #[serde(with = "humantime_serde")]
    pub stabilize_up: Duration,
    /// Scale in to the highest recommendation of this window. At most 24 h.
    #[serde(with = "humantime_serde")]
    pub stabilize_down: Duration,
    /// Limit on growth per period (bounds on [`StepLimitConfig`]).
    pub max_step_up: Option<StepLimitConfig>,
    /// Limit on shrinking per period (bounds on [`StepLimitConfig`]).
    pub max_step_down: Option<StepLimitConfig>,
    /// Never fewer workers than executing or holding tasks.
    pub in_flight_floor: bool,
    /// Messages a worker holds (Celery's `worker_prefetch_multiplier`), for the in-flight floor.
    /// From 1 to 10 000 (checked even when `in_flight_floor` is off).
    pub held_per_worker: u32,
    /// What to do once observations keep failing.
    pub fallback: Option<FallbackConfig>,
    /// Buy a new worker only for work that outlasts its start-up
    /// ([`RentOrBuy`](crate::layer::RentOrBuy)): cuts a
    /// scale-out to the workers the waiting work (at the task time heartbeats measure) keeps
    /// busy for a start-up each. Does nothing while the task time, start-up or held count is
    /// unknown.
    pub rent_or_buy: bool,
    /// The time from asking for a worker to its taking tasks, for `rent_or_buy`; absent:
    /// measured from the target (scale-out to running). From 1 s to 24 h.
    #[serde(default, with = "humantime_serde")]
    pub worker_startup: Option<Duration>,
    /// Windows of the week with a floor of workers
    /// ([`ScheduledFloor`](crate::layer::ScheduledFloor)).
    pub schedule: Vec<ScheduleConfig>,
    /// A floor learned from the capacity asked at the same time of past periods
    /// ([`Forecast`](crate::layer::Forecast)); absent: none.
    pub forecast: Option<ForecastConfig>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            kind: PolicyKind::TargetBacklog,
            target_wait: Duration::from_secs(30),
            throughput_per_worker: 0.1,
            messages_per_worker: 5.0,
            min_workers: 0,
            max_workers: 10,
            activation_messages: 1,
            scale_to_zero_after: Duration::from_secs(30),
            stabilize_up: Duration::ZERO,
            stabilize_down: Duration::from_secs(30),
            max_step_up: None,
            max_step_down: None,
            in_flight_floor: true,
            held_per_worker: 4,
            fallback: None,
            rent_or_buy: false,
            worker_startup: None,
            schedule: Vec::new(),
            forecast: None,
        }
    }
}

/// Most workers a binding may have (`max_workers`, a step's `workers`).
const MAX_WORKERS: u32 = 100_000;
/// Longest duration of any window, wait or period.
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);
/// Shortest `target_wait` and step-limit `period`.
const MIN_PERIOD: Duration = Duration::from_secs(1);
/// Bounds of `messages_per_worker`.
const MESSAGES_PER_WORKER: (f64, f64) = (0.01, 1e6);
/// Bounds of `throughput_per_worker` (tasks per second).
const THROUGHPUT_PER_WORKER: (f64, f64) = (1e-6, 1e6);
/// Most `activation_messages`.
const MAX_ACTIVATION_MESSAGES: u64 = 1_000_000_000;
/// Bounds of `held_per_worker`.
const HELD_PER_WORKER: (u32, u32) = (1, 10_000);
/// Most step-limit `percent` (100 times the current capacity per period).
const MAX_STEP_PERCENT: u32 = 10_000;
/// Bounds of `fallback.after_failures`.
const FALLBACK_AFTER_FAILURES: (u32, u32) = (1, 10_000);

/// `value` within `min..=max`, or an error naming the field, the value and the bound.
fn int_within<N: PartialOrd + std::fmt::Display>(
    field: &str,
    value: N,
    min: N,
    max: N,
) -> Result<(), ConfigError> {
    if value < min {
        Err(ConfigError::new(
            field,
            format!("{value} is below the minimum {min}"),
        ))
    } else if value > max {
        Err(ConfigError::new(
            field,
            format!("{value} is above the maximum {max}"),
        ))
    } else {
        Ok(())
    }
}

/// A float for an error message: plain when readable, in exponent form when tiny or huge
/// (`1e-300`, not 300 zeros).
fn show_float(v: f64) -> String {
    if v != 0.0 && v.is_finite() && !(1e-4..1e9).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// A finite `value` within `bounds`, or an error naming the field, the value and the bound.
fn float_within(field: &str, value: f64, (min, max): (f64, f64)) -> Result<(), ConfigError> {
    // Written so that NaN fails too.
    if value.is_finite() && value >= min && value <= max {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!(
                "{} is not a finite number between {} and {}",
                show_float(value),
                show_float(min),
                show_float(max)
            ),
        ))
    }
}

/// `value` within `min..=max`, or an error naming the field, the value and the bound.
fn duration_within(
    field: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    let show = humantime::format_duration;
    if value < min {
        Err(ConfigError::new(
            field,
            format!("{} is below the minimum {}", show(value), show(min)),
        ))
    } else if value > max {
        Err(ConfigError::new(
            field,
            format!("{} is above the maximum {}", show(value), show(max)),
        ))
    } else {
        Ok(())
    }
}

impl StepLimitConfig {
    /// Checks the bounds of each field (see the table on [`PolicyConfig`]); the error names the
    /// field relative to this struct.
    fn check_bounds(&self) -> Result<(), ConfigError> {
        int_within("workers", self.workers, 0, MAX_WORKERS)?;
        int_within("percent", self.percent, 0, MAX_STEP_PERCENT)?;
        duration_within("period", self.period, MIN_PERIOD, MAX_DURATION)
    }
}

fn step_limit(c: &StepLimitConfig, field: &str) -> Result<StepLimit, ConfigError> {
    c.check_bounds().map_err(|e| e.within(field))?;
    StepLimit::new(c.workers, c.percent, c.period).map_err(|e| e.within(field))
}

impl PolicyConfig {
    /// Checks every field; the error names the field (relative to this struct).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.build().map(|_| ())
    }

    /// Checks the bounds of the scalar fields (the table above); step limits and the fallback
    /// are checked where they are built.
    fn check_bounds(&self) -> Result<(), ConfigError> {
        int_within("max_workers", self.max_workers, 1, MAX_WORKERS)?;
        float_within(
            "messages_per_worker",
            self.messages_per_worker,
            MESSAGES_PER_WORKER,
        )?;
        float_within(
            "throughput_per_worker",
            self.throughput_per_worker,
            THROUGHPUT_PER_WORKER,
        )?;
        duration_within("target_wait", self.target_wait, MIN_PERIOD, MAX_DURATION)?;
        int_within(
            "activation_messages",
            self.activation_messages,
            0,
            MAX_ACTIVATION_MESSAGES,
        )?;
        for (field, value) in [
            ("scale_to_zero_after", self.scale_to_zero_after),
            ("stabilize_up", self.stabilize_up),
            ("stabilize_down", self.stabilize_down),
        ] {
            duration_within(field, value, Duration::ZERO, MAX_DURATION)?;
        }
        if let Some(startup) = self.worker_startup {
            duration_within("worker_startup", startup, MIN_PERIOD, MAX_DURATION)?;
        }
        let (min, max) = HELD_PER_WORKER;
        int_within("held_per_worker", self.held_per_worker, min, max)
    }

    /// Builds the layered policy; fails on the first invalid field.
    pub fn build(&self) -> Result<Box<dyn ScalingPolicy>, ConfigError> {
        if self.max_workers < self.min_workers {
            return Err(ConfigError::new(
                "max_workers",
                format!(
                    "{} is below min_workers {}",
                    self.max_workers, self.min_workers
                ),
            ));
        }
        if self.max_workers == 0 {
            return Err(ConfigError::new(
                "max_workers",
                "0 would never run a worker; must be at least 1",
            ));
        }
        self.check_bounds()?;
        if let Some(f) = &self.fallback {
            let (min, max) = FALLBACK_AFTER_FAILURES;
            int_within("fallback.after_failures", f.after_failures, min, max)?;
            if let Some(c) = f.capacity
                && !(self.min_workers..=self.max_workers).contains(&c)
            {
                return Err(ConfigError::new(
                    "fallback.capacity",
                    format!(
                        "{c} is outside min_workers..=max_workers ({}..={})",
                        self.min_workers, self.max_workers
                    ),
                ));
            }
        }
        let up = self
            .max_step_up
            .as_ref()
            .map(|c| step_limit(c, "max_step_up"))
            .transpose()?;
        let down = self
            .max_step_down
            .as_ref()
            .map(|c| step_limit(c, "max_step_down"))
            .transpose()?;
        let base: Box<dyn ScalingPolicy> = match self.kind {
            PolicyKind::DrainTime => {
                DrainTime::new(self.target_wait, self.throughput_per_worker)?.boxed()
            }
            PolicyKind::TargetBacklog => TargetBacklog::new(self.messages_per_worker)?.boxed(),
        };
        let mut windows = Vec::with_capacity(self.schedule.len());
        for (i, entry) in self.schedule.iter().enumerate() {
            let at = format!("schedule[{i}]");
            if entry.min_workers > self.max_workers {
                return Err(ConfigError::new(
                    format!("{at}.min_workers"),
                    format!(
                        "{} is above max_workers {}",
                        entry.min_workers, self.max_workers
                    ),
                ));
            }
            windows.push(entry.window().map_err(|e| e.within(&at))?);
        }
        let floored: Box<dyn ScalingPolicy> = if self.in_flight_floor {
            base.in_flight_floor(self.held_per_worker)?.boxed()
        } else {
            base
        };
        let bought: Box<dyn ScalingPolicy> = if self.rent_or_buy {
            floored.rent_or_buy(self.worker_startup).boxed()
        } else {
            floored
        };
        let forecast = self
            .forecast
            .map(|f| f.settings(self.worker_startup))
            .transpose()
            .map_err(|e| e.within("forecast"))?;
        let activated = bought.activation(self.activation_messages, self.scale_to_zero_after);
        let forecasted: Box<dyn ScalingPolicy> = match forecast {
            Some(settings) => activated.forecast(settings).boxed(),
            None => activated.boxed(),
        };
        let stabilized = forecasted.stabilize(self.stabilize_up, self.stabilize_down);
        let scheduled: Box<dyn ScalingPolicy> = if windows.is_empty() {
            stabilized.boxed()
        } else {
            stabilized.scheduled_floor(windows).boxed()
        };
        let policy = crate::layer::MaxStep::new(scheduled, up, down)
            .bounded(self.min_workers, self.max_workers)?;
        Ok(match self.fallback {
            Some(f) => policy.fallback(f.after_failures, f.capacity).boxed(),
            None => policy.boxed(),
        })
    }
}

/// One binding as configured: loop settings, policy, and the backend-specific source and scaler
/// sections (`S`, `T`), which the backend crates define.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig<S, T> {
    /// Name, interval, timeouts, staleness, dry run.
    #[serde(rename = "loop", default)]
    pub settings: LoopSettings,
    /// The policy.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Where the backlog is read.
    pub source: S,
    /// What capacity is set.
    pub scaler: T,
}

/// The whole configuration: a list of bindings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config<S, T> {
    /// The bindings.
    pub bindings: Vec<BindingConfig<S, T>>,
}

/// Validates a binding's backend sections; gets the binding and must return errors whose
/// field is relative to the binding (e.g. `source.url`).
pub type BackendValidator<'a, S, T> = &'a dyn Fn(&S, &T) -> Result<(), ConfigError>;

impl<S, T> Config<S, T> {
    /// Checks every binding; errors name the path, e.g. `bindings[1].policy.max_workers`.
    pub fn validate(&self, backends: BackendValidator<'_, S, T>) -> Result<(), ConfigError> {
        if self.bindings.is_empty() {
            return Err(ConfigError::new(
                "bindings",
                "at least one binding is required",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, b) in self.bindings.iter().enumerate() {
            let at = format!("bindings[{i}]");
            b.settings
                .validate()
                .map_err(|e| e.within(&format!("{at}.loop")))?;
            if !names.insert(b.settings.name.as_str()) {
                return Err(ConfigError::new(
                    format!("{at}.loop.name"),
                    format!("{:?} is used by an earlier binding", b.settings.name),
                ));
            }
            b.policy
                .validate()
                .map_err(|e| e.within(&format!("{at}.policy")))?;
            backends(&b.source, &b.scaler).map_err(|e| e.within(&at))?;
        }
        Ok(())
    }
}

impl<S: serde::de::DeserializeOwned, T: serde::de::DeserializeOwned> Config<S, T> {
    /// Parses TOML and validates.
    ///
    /// A value of the wrong type, or an unknown key, names its path from the root, with the line
    /// after the deserializer's message:
    /// ``bindings[0].policy.max_workers: invalid value: integer `-1`, expected u32 (line 8)``.
    /// A TOML syntax error, which has no path yet, names its line (`line 3: ...`).
    pub fn from_toml(
        text: &str,
        backends: impl Fn(&S, &T) -> Result<(), ConfigError>,
    ) -> Result<Self, ConfigError> {
        let config: Self = toml_parse(text)?;
        config.validate(&backends)?;
        Ok(config)
    }

    /// Parses JSON and validates.
    ///
    /// A value of the wrong type, or an unknown key, names its path from the root, with the line
    /// and column after the deserializer's message: ``bindings[0].policy.max_workers: invalid
    /// value: integer `-1`, expected u32 (line 1 column 42)``.
    pub fn from_json(
        text: &str,
        backends: impl Fn(&S, &T) -> Result<(), ConfigError>,
    ) -> Result<Self, ConfigError> {
        let config: Self = json_parse(text)?;
        config.validate(&backends)?;
        Ok(config)
    }
}

/// The field path of a deserialization error: `bindings[0].policy.max_workers`, or `config` for
/// the root (e.g. a missing top-level key). A trailing segment the tracker could not name (a
/// JSON key that is not a string) is left off, so the path ends at the enclosing table.
///
/// `message` is the deserializer's message; when it comes from a [`KindTagged`] section it
/// carries the path below that section, which is joined here: the field and the message as
/// they are shown.
fn path_field<'m>(path: &serde_path_to_error::Path, message: &'m str) -> (String, &'m str) {
    let (field, message) = match split_nested(message) {
        Some((below, rest)) => (join_path(&path_string(path), below), rest),
        None => (path_string(path), message),
    };
    let field = if field.is_empty() {
        "config".to_string()
    } else {
        field
    };
    (field, message)
}

/// A tracked path as text (`bindings[0].source`), empty at the root.
fn path_string(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut segments: Vec<&Segment> = path.iter().collect();
    while matches!(segments.last(), Some(Segment::Unknown)) {
        segments.pop();
    }
    let mut field = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => field.push_str(&format!("[{index}]")),
            other => {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(&other.to_string());
            }
        }
    }
    field
}

/// `outer` then `inner` (`bindings[0].source` + `queues[1]` = `bindings[0].source.queues[1]`).
fn join_path(outer: &str, inner: &str) -> String {
    if outer.is_empty() {
        inner.to_string()
    } else if inner.is_empty() || inner.starts_with('[') {
        format!("{outer}{inner}")
    } else {
        format!("{outer}.{inner}")
    }
}

/// Marks the path below a [`KindTagged`] section in an error message, so that [`parse_toml`]
/// and [`parse_json`] join it to the path they track: `\u{1f}path\u{1f}message`.
const NESTED: char = '\u{1f}';

/// An error at `path` below the section being deserialized (joined to a path already nested
/// in `message`, when a tagged section sits inside another).
fn nested_error<E: serde::de::Error>(path: &str, message: &str) -> E {
    let (path, message) = match split_nested(message) {
        Some((below, rest)) => (join_path(path, below), rest),
        None => (path.to_string(), message),
    };
    if path.is_empty() {
        E::custom(message)
    } else {
        E::custom(format!("{NESTED}{path}{NESTED}{message}"))
    }
}

/// The path and the message of an error made by [`nested_error`].
fn split_nested(message: &str) -> Option<(&str, &str)> {
    let rest = message.strip_prefix(NESTED)?;
    rest.split_once(NESTED)
}

/// A configuration section that picks its variant by a `kind` field (`source = { kind =
/// "redis", url = ... }`), read so that an error inside the variant still names its whole field
/// path.
///
/// serde's internally tagged enums (`#[serde(tag = "kind")]`) buffer the section and report any
/// error inside it at the section (`bindings[0].scaler: invalid value: integer -1, expected
/// u32`). A backend enum's `Deserialize` reads this instead, matches on [`kind`](Self::kind)
/// and reads the variant's struct with [`into_variant`](Self::into_variant); through
/// [`parse_toml`] and [`parse_json`] (and [`Config::from_toml`], [`Config::from_json`]) errors
/// then name the field (`bindings[0].scaler.workers_per_task: ...`), and an unknown kind names
/// `bindings[0].scaler.kind`.
///
/// ```
/// use celery_scale_core::config::{KindTagged, parse_toml};
/// # #[derive(Debug, serde::Deserialize)] #[serde(deny_unknown_fields)]
/// # struct Ecs { workers_per_task: u32 }
/// #[derive(Debug)]
/// enum Scaler { Ecs(Ecs) }
/// impl<'de> serde::Deserialize<'de> for Scaler {
///     fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
///         let tagged = KindTagged::deserialize(d)?;
///         match tagged.kind() {
///             "ecs" => tagged.into_variant().map(Scaler::Ecs),
///             _ => Err(tagged.unknown_kind(&["ecs"])),
///         }
///     }
/// }
/// #[derive(Debug, serde::Deserialize)]
/// struct File { scaler: Scaler }
/// let e = parse_toml::<File>("scaler = { kind = \"ecs\", workers_per_task = -1 }").unwrap_err();
/// assert_eq!(e.field, "scaler.workers_per_task");
/// let e = parse_toml::<File>("scaler = { kind = \"ec3\" }").unwrap_err();
/// assert_eq!(e.field, "scaler.kind");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct KindTagged {
    kind: String,
    body: serde_json::Map<String, serde_json::Value>,
}

impl KindTagged {
    /// The `kind` field's value.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The section without its `kind`, read as the variant's struct; an error names the field
    /// within the section (joined to the section's path by [`parse_toml`]/[`parse_json`]).
    pub fn into_variant<T: serde::de::DeserializeOwned, E: serde::de::Error>(self) -> Result<T, E> {
        serde_path_to_error::deserialize(serde_json::Value::Object(self.body)).map_err(|e| {
            let path = path_string(e.path());
            nested_error(&path, &e.inner().to_string())
        })
    }

    /// The error for a `kind` that is none of `expected`, at the `kind` field.
    pub fn unknown_kind<E: serde::de::Error>(&self, expected: &'static [&'static str]) -> E {
        let e = <serde_json::Error as serde::de::Error>::unknown_variant(&self.kind, expected);
        nested_error("kind", &e.to_string())
    }
}

impl<'de> Deserialize<'de> for KindTagged {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut body = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
        let kind = body
            .remove("kind")
            .ok_or_else(|| <D::Error as serde::de::Error>::missing_field("kind"))?;
        let kind = String::deserialize(kind).map_err(|e| nested_error("kind", &e.to_string()))?;
        Ok(KindTagged { kind, body })
    }
}

/// The 1-based line of byte offset `at` in `text` (an offset past the end counts as the end).
fn line_of(text: &str, at: usize) -> usize {
    let upto = text.as_bytes().get(..at).unwrap_or(text.as_bytes());
    upto.iter().filter(|&&b| b == b'\n').count() + 1
}

/// Parses TOML into any configuration type, with errors that name the field path from the root
/// (`bindings[0].policy.max_workers: ...`), as [`Config::from_toml`] does; for programs whose
/// file holds more than the bindings. Validates nothing.
pub fn parse_toml<C: serde::de::DeserializeOwned>(text: &str) -> Result<C, ConfigError> {
    toml_parse(text)
}

/// Parses JSON like [`parse_toml`] parses TOML.
pub fn parse_json<C: serde::de::DeserializeOwned>(text: &str) -> Result<C, ConfigError> {
    json_parse(text)
}

fn toml_parse<C: serde::de::DeserializeOwned>(text: &str) -> Result<C, ConfigError> {
    let line = |e: &toml::de::Error| e.span().map(|s| line_of(text, s.start));
    // A syntax error comes before any value is deserialized: it has a line but no path.
    let document = toml::Deserializer::parse(text).map_err(|e| {
        let field = line(&e).map_or_else(|| "config".to_string(), |l| format!("line {l}"));
        ConfigError::new(field, e.message().to_string())
    })?;
    serde_path_to_error::deserialize(document).map_err(|e| {
        let inner = e.inner();
        let (field, message) = path_field(e.path(), inner.message());
        let rule = match line(inner) {
            Some(l) => format!("{message} (line {l})"),
            None => message.to_string(),
        };
        ConfigError::new(field, rule)
    })
}

fn json_parse<C: serde::de::DeserializeOwned>(text: &str) -> Result<C, ConfigError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let describe = |e: &serde_json::Error| {
        // serde_json's Display ends with " at line L column C"; keep the message and say where.
        let message = e.to_string();
        let message = match message.rfind(" at line ") {
            Some(at) => message[..at].to_string(),
            None => message,
        };
        if e.line() == 0 {
            message
        } else {
            format!("{message} (line {} column {})", e.line(), e.column())
        }
    };
    let config = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let described = describe(e.inner());
        let (field, rule) = path_field(e.path(), &described);
        ConfigError::new(field, rule)
    })?;
    // Trailing characters after the document (serde_json::from_str checks the same).
    de.end()
        .map_err(|e| ConfigError::new("config", describe(&e)))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Src {
        queue: String,
    }
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tgt {
        service: String,
    }

    fn no_backend_rules(_: &Src, _: &Tgt) -> Result<(), ConfigError> {
        Ok(())
    }

    const GOOD: &str = r#"
[[bindings]]
loop = { name = "emails", interval = "2s", dry_run = true }
source = { queue = "emails" }
scaler = { service = "email-workers" }

[bindings.policy]
kind = "target_backlog"
messages_per_worker = 10
min_workers = 1
max_workers = 30
stabilize_down = "5m"
max_step_up = { workers = 5, percent = 100, period = "15s" }
fallback = { after_failures = 3, capacity = 2 }
"#;

    #[test]
    fn toml_and_json_round_trip() {
        let c: Config<Src, Tgt> = Config::from_toml(GOOD, no_backend_rules).unwrap();
        assert_eq!(c.bindings[0].settings.interval, Duration::from_secs(2));
        assert_eq!(
            c.bindings[0].policy.stabilize_down,
            Duration::from_secs(300)
        );
        assert!(c.bindings[0].settings.dry_run);
        let json = serde_json::to_string(&c).unwrap();
        let back: Config<Src, Tgt> = Config::from_json(&json, no_backend_rules).unwrap();
        assert_eq!(back, c);
        let toml_text = toml::to_string(&c).unwrap();
        let back: Config<Src, Tgt> = Config::from_toml(&toml_text, no_backend_rules).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn schedule_and_rent_or_buy_parse_and_errors_name_the_field() {
        let with = |policy: &str| {
            format!(
                "[[bindings]]\nsource = {{ queue = \"q\" }}\nscaler = {{ service = \"s\" }}\n\
                 [bindings.policy]\nmax_workers = 20\n{policy}\n"
            )
        };
        let text = with(
            "rent_or_buy = true\nworker_startup = \"45s\"\nschedule = [\n  \
             { days = \"mon-fri\", from = \"08:00\", to = \"18:00\", tz = \"Europe/Paris\", min_workers = 4 },\n  \
             { from = \"22:00\", to = \"02:00\", min_workers = 2 },\n]",
        );
        let c: Config<Src, Tgt> = Config::from_toml(&text, no_backend_rules).unwrap();
        let p = &c.bindings[0].policy;
        assert_eq!(p.forecast, None);
        assert!(p.rent_or_buy);
        assert_eq!(p.worker_startup, Some(Duration::from_secs(45)));
        assert_eq!(p.schedule.len(), 2);
        assert_eq!(
            (p.schedule[1].days.as_str(), p.schedule[1].tz.as_str()),
            ("daily", "UTC")
        );
        p.build().unwrap();
        let back: Config<Src, Tgt> =
            Config::from_toml(&toml::to_string(&c).unwrap(), no_backend_rules).unwrap();
        assert_eq!(back, c);
        // A forecast with the defaults: two cycles, the lead from worker_startup, 60 s buckets.
        let text = with("worker_startup = \"45s\"\nforecast = { period = \"1d\" }");
        let c: Config<Src, Tgt> = Config::from_toml(&text, no_backend_rules).unwrap();
        let f = c.bindings[0].policy.forecast.unwrap();
        assert_eq!(f, ForecastConfig::every(Duration::from_secs(86_400)));
        assert_eq!(
            f.settings(Some(Duration::from_secs(45))).unwrap(),
            ForecastSettings::new(
                Duration::from_secs(86_400),
                2,
                Duration::from_secs(45),
                Duration::from_secs(60)
            )
            .unwrap()
        );
        let back: Config<Src, Tgt> =
            Config::from_toml(&toml::to_string(&c).unwrap(), no_backend_rules).unwrap();
        assert_eq!(back, c);
        let error = |policy: &str| {
            Config::<Src, Tgt>::from_toml(&with(policy), no_backend_rules).unwrap_err()
        };
        for (policy, field) in [
            (
                "schedule = [{ days = \"mon-fry\", from = \"08:00\", to = \"18:00\", min_workers = 1 }]",
                "bindings[0].policy.schedule[0].days",
            ),
            (
                "schedule = [{ from = \"08:00\", to = \"18:00\", min_workers = 1 }, { from = \"8\", to = \"18:00\", min_workers = 1 }]",
                "bindings[0].policy.schedule[1].from",
            ),
            (
                "schedule = [{ from = \"08:00\", to = \"25:00\", min_workers = 1 }]",
                "bindings[0].policy.schedule[0].to",
            ),
            (
                "schedule = [{ from = \"08:00\", to = \"18:00\", tz = \"Paris\", min_workers = 1 }]",
                "bindings[0].policy.schedule[0].tz",
            ),
            (
                "schedule = [{ from = \"08:00\", to = \"18:00\", min_workers = 21 }]",
                "bindings[0].policy.schedule[0].min_workers",
            ),
            (
                "schedule = [{ from = \"08:00\", min_workers = 1 }]",
                "bindings[0].policy.schedule[0]",
            ),
            (
                "schedule = [{ from = \"08:00\", to = \"09:00\", min_workers = 1, days_of_week = \"mon\" }]",
                "bindings[0].policy.schedule[0].days_of_week",
            ),
            (
                "forecast = { period = \"30s\" }",
                "bindings[0].policy.forecast.period",
            ),
            (
                "forecast = { period = \"1d\", cycles = 0 }",
                "bindings[0].policy.forecast.cycles",
            ),
            (
                "forecast = { period = \"1h\", resolution = \"7s\" }",
                "bindings[0].policy.forecast.resolution",
            ),
            (
                "forecast = { period = \"1h\", lead = \"31m\" }",
                "bindings[0].policy.forecast.lead",
            ),
            (
                "forecast = { period = \"1h\", every = \"1h\" }",
                "bindings[0].policy.forecast.every",
            ),
            (
                "worker_startup = \"0s\"",
                "bindings[0].policy.worker_startup",
            ),
            (
                "worker_startup = \"2days\"",
                "bindings[0].policy.worker_startup",
            ),
        ] {
            let e = error(policy);
            assert_eq!(e.field, field, "{policy}: {e}");
        }
        let e = error("schedule = [{ from = \"08:00\", to = \"18:00\", min_workers = 21 }]");
        assert_eq!(
            e.to_string(),
            "bindings[0].policy.schedule[0].min_workers: 21 is above max_workers 20"
        );
        // A lead taken from worker_startup says where it came from.
        let e = error("worker_startup = \"40m\"\nforecast = { period = \"1h\" }");
        assert_eq!(e.field, "bindings[0].policy.forecast.lead", "{e}");
        assert!(e.rule.contains("worker_startup"), "{e}");
    }

    fn error_for(edit: impl Fn(&mut Config<Src, Tgt>)) -> ConfigError {
        let mut c: Config<Src, Tgt> = Config::from_toml(GOOD, no_backend_rules).unwrap();
        edit(&mut c);
        c.validate(&no_backend_rules).unwrap_err()
    }

    type Edit = Box<dyn Fn(&mut Config<Src, Tgt>)>;

    #[test]
    fn each_invalid_field_is_named() {
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|c| c.bindings[0].policy.max_workers = 0),
                "bindings[0].policy.max_workers",
            ),
            (
                Box::new(|c| c.bindings[0].policy.messages_per_worker = -1.0),
                "bindings[0].policy.messages_per_worker",
            ),
            (
                Box::new(|c| {
                    c.bindings[0].policy.kind = PolicyKind::DrainTime;
                    c.bindings[0].policy.target_wait = Duration::ZERO;
                }),
                "bindings[0].policy.target_wait",
            ),
            (
                Box::new(|c| {
                    c.bindings[0].policy.kind = PolicyKind::DrainTime;
                    c.bindings[0].policy.throughput_per_worker = 0.0;
                }),
                "bindings[0].policy.throughput_per_worker",
            ),
            (
                Box::new(|c| c.bindings[0].policy.held_per_worker = 0),
                "bindings[0].policy.held_per_worker",
            ),
            (
                Box::new(|c| {
                    c.bindings[0].policy.max_step_up = Some(StepLimitConfig {
                        workers: 0,
                        percent: 0,
                        period: Duration::from_secs(1),
                    })
                }),
                "bindings[0].policy.max_step_up.workers",
            ),
            (
                Box::new(|c| {
                    c.bindings[0].policy.max_step_down = Some(StepLimitConfig {
                        workers: 1,
                        percent: 0,
                        period: Duration::ZERO,
                    })
                }),
                "bindings[0].policy.max_step_down.period",
            ),
            (
                Box::new(|c| {
                    c.bindings[0].policy.fallback = Some(FallbackConfig {
                        after_failures: 0,
                        capacity: None,
                    })
                }),
                "bindings[0].policy.fallback.after_failures",
            ),
            (
                Box::new(|c| {
                    c.bindings[0].policy.fallback = Some(FallbackConfig {
                        after_failures: 1,
                        capacity: Some(99),
                    })
                }),
                "bindings[0].policy.fallback.capacity",
            ),
            (
                Box::new(|c| c.bindings[0].settings.interval = Duration::ZERO),
                "bindings[0].loop.interval",
            ),
            (
                Box::new(|c| c.bindings[0].settings.timeout = Duration::ZERO),
                "bindings[0].loop.timeout",
            ),
            (
                Box::new(|c| c.bindings[0].settings.max_staleness = Duration::from_millis(1)),
                "bindings[0].loop.max_staleness",
            ),
            (
                Box::new(|c| c.bindings[0].settings.max_backoff = Duration::from_millis(1)),
                "bindings[0].loop.max_backoff",
            ),
            (
                Box::new(|c| c.bindings[0].settings.name = " ".into()),
                "bindings[0].loop.name",
            ),
            (
                Box::new(|c| {
                    let b = c.bindings[0].clone();
                    c.bindings.push(b);
                }),
                "bindings[1].loop.name",
            ),
            (Box::new(|c| c.bindings.clear()), "bindings"),
        ];
        for (edit, field) in cases {
            let e = error_for(edit);
            assert_eq!(e.field, field, "{e}");
        }
        let e = error_for(|c| {
            c.bindings[0].policy.min_workers = 1;
            c.bindings[0].policy.max_workers = 0;
        });
        assert_eq!(
            e.to_string(),
            "bindings[0].policy.max_workers: 0 is below min_workers 1"
        );
    }

    fn toml_error(text: &str) -> ConfigError {
        Config::<Src, Tgt>::from_toml(text, no_backend_rules).unwrap_err()
    }

    fn json_error(text: &str) -> ConfigError {
        Config::<Src, Tgt>::from_json(text, no_backend_rules).unwrap_err()
    }

    /// GOOD as pretty JSON: one key per line, so a replaced line is easy to find.
    fn good_json() -> String {
        let c: Config<Src, Tgt> = Config::from_toml(GOOD, no_backend_rules).unwrap();
        serde_json::to_string_pretty(&c).unwrap()
    }

    #[test]
    fn toml_type_errors_name_the_path_and_line() {
        // (edit of GOOD, field path, words the rule must hold, line)
        let cases = [
            (
                GOOD.replace("max_workers = 30", "max_workers = -1"),
                "bindings[0].policy.max_workers",
                vec!["-1", "u32"],
                11,
            ),
            (
                GOOD.replace("capacity = 2 }", "capacity = 2.5 }"),
                "bindings[0].policy.fallback.capacity",
                vec!["2.5", "u32"],
                14,
            ),
            (
                GOOD.replace("\"15s\"", "\"15 parsecs\""),
                "bindings[0].policy.max_step_up.period",
                vec!["15 parsecs", "duration"],
                13,
            ),
            (
                GOOD.replace("kind = \"target_backlog\"", "kind = \"fastest\""),
                "bindings[0].policy.kind",
                vec!["fastest", "drain_time"],
                8,
            ),
            (
                GOOD.replace("dry_run = true", "dry_run = \"yes\""),
                "bindings[0].loop.dry_run",
                vec!["yes", "bool"],
                3,
            ),
            // The backend sections (generic S and T) get paths too.
            (
                GOOD.replace("queue = \"emails\"", "queue = 3"),
                "bindings[0].source.queue",
                vec!["3", "string"],
                4,
            ),
            (
                format!("{GOOD}\n[[bindings]]\nsource = {{ queue = \"a\" }}\n")
                    + "scaler = { service = 1 }\n",
                "bindings[1].scaler.service",
                vec!["1", "string"],
                18,
            ),
            (
                GOOD.replace("source = { queue = \"emails\" }\n", ""),
                "bindings[0]",
                vec!["missing field `source`"],
                2,
            ),
            (
                "bindings = 3".to_string(),
                "bindings",
                vec!["3", "sequence"],
                1,
            ),
        ];
        for (text, field, words, line) in cases {
            let e = toml_error(&text);
            assert_eq!(e.field, field, "{e}");
            for w in words {
                assert!(e.rule.contains(w), "{e} lacks {w:?}");
            }
            assert!(e.rule.ends_with(&format!("(line {line})")), "{e}");
        }
        let e = toml_error(&GOOD.replace("max_workers = 30", "max_workers = -1"));
        assert_eq!(
            e.to_string(),
            "bindings[0].policy.max_workers: invalid value: integer `-1`, expected u32 (line 11)"
        );
    }

    #[test]
    fn toml_unknown_keys_name_their_path() {
        let cases = [
            (
                GOOD.replace("max_workers = 30", "max_worker = 30"),
                "bindings[0].policy.max_worker",
            ),
            (
                GOOD.replace("interval = \"2s\"", "interval = \"2s\", intervl = 3"),
                "bindings[0].loop.intervl",
            ),
            (
                GOOD.replace("period = \"15s\" }", "period = \"15s\", burst = 2 }"),
                "bindings[0].policy.max_step_up.burst",
            ),
            (
                GOOD.replace(
                    "scaler = { service = \"email-workers\" }",
                    "scaler = { service = \"x\", region = \"eu\" }",
                ),
                "bindings[0].scaler.region",
            ),
            (format!("extra = 1\n{GOOD}"), "extra"),
        ];
        for (text, field) in cases {
            let e = toml_error(&text);
            assert_eq!(e.field, field, "{e}");
            assert!(e.rule.starts_with("unknown field"), "{e}");
            assert!(e.rule.contains("(line "), "{e}");
        }
    }

    #[test]
    fn toml_syntax_errors_name_the_line() {
        let e = toml_error(&GOOD.replace("min_workers = 1", "min_workers = = 1"));
        assert_eq!(e.field, "line 10", "{e}");
        let e = toml_error("");
        assert_eq!(e.field, "config", "{e}");
        assert!(e.rule.contains("missing field `bindings`"), "{e}");
    }

    #[test]
    fn json_errors_name_the_path_and_position() {
        let json = good_json();
        let cases = [
            (
                json.replace("\"max_workers\": 30", "\"max_workers\": -1"),
                "bindings[0].policy.max_workers",
                "invalid value: integer `-1`, expected u32",
            ),
            (
                json.replace("\"max_workers\": 30", "\"max_worker\": 30"),
                "bindings[0].policy.max_worker",
                "unknown field `max_worker`",
            ),
            (
                json.replace("\"queue\": \"emails\"", "\"queue\": true"),
                "bindings[0].source.queue",
                "invalid type: boolean `true`, expected a string",
            ),
            // A syntax error inside a table names the table.
            (
                json.replace("\"max_workers\": 30", "\"max_workers\": 30,"),
                "bindings[0].policy",
                "key must be a string",
            ),
            (format!("{json} x"), "config", "trailing characters"),
            ("{}".to_string(), "config", "missing field `bindings`"),
        ];
        for (text, field, rule) in cases {
            let e = json_error(&text);
            assert_eq!(e.field, field, "{e}");
            assert!(e.rule.starts_with(rule), "{e}");
            assert!(e.rule.contains("(line "), "{e}");
            assert!(!e.rule.contains(" at line "), "position said twice: {e}");
        }
        let line = json
            .lines()
            .position(|l| l.contains("\"max_workers\""))
            .unwrap()
            + 1;
        let e = json_error(&json.replace("\"max_workers\": 30", "\"max_workers\": -1"));
        assert!(e.rule.contains(&format!("(line {line} column ")), "{e}");
    }

    #[test]
    fn bounds_name_field_value_and_bound() {
        let day = Duration::from_secs(86_400);
        let step = |workers, percent, period| {
            Some(StepLimitConfig {
                workers,
                percent,
                period,
            })
        };
        let cases: Vec<(Edit, &str, &str)> = vec![
            (
                Box::new(|c| c.bindings[0].policy.max_workers = 1_000_000_000),
                "bindings[0].policy.max_workers",
                "1000000000 is above the maximum 100000",
            ),
            (
                Box::new(|c| c.bindings[0].policy.min_workers = 31),
                "bindings[0].policy.max_workers",
                "30 is below min_workers 31",
            ),
            (
                Box::new(|c| c.bindings[0].policy.messages_per_worker = 1e-300),
                "bindings[0].policy.messages_per_worker",
                "1e-300 is not a finite number between 0.01 and 1000000",
            ),
            (
                Box::new(|c| c.bindings[0].policy.messages_per_worker = 1e7),
                "bindings[0].policy.messages_per_worker",
                "10000000 is not a finite number between 0.01 and 1000000",
            ),
            (
                Box::new(|c| c.bindings[0].policy.messages_per_worker = f64::NAN),
                "bindings[0].policy.messages_per_worker",
                "NaN is not a finite number",
            ),
            (
                Box::new(|c| c.bindings[0].policy.throughput_per_worker = f64::INFINITY),
                "bindings[0].policy.throughput_per_worker",
                "inf is not a finite number between 1e-6 and 1000000",
            ),
            (
                Box::new(|c| c.bindings[0].policy.throughput_per_worker = 1e-9),
                "bindings[0].policy.throughput_per_worker",
                "1e-9 is not a finite number between 1e-6 and 1000000",
            ),
            (
                Box::new(|c| {
                    c.bindings[0].policy.target_wait = Duration::from_secs(3_000_000 * 86_400)
                }),
                "bindings[0].policy.target_wait",
                "is above the maximum 1day",
            ),
            (
                Box::new(|c| c.bindings[0].policy.target_wait = Duration::from_millis(500)),
                "bindings[0].policy.target_wait",
                "500ms is below the minimum 1s",
            ),
            (
                Box::new(|c| c.bindings[0].policy.activation_messages = 1_000_000_001),
                "bindings[0].policy.activation_messages",
                "1000000001 is above the maximum 1000000000",
            ),
            (
                Box::new(move |c| c.bindings[0].policy.scale_to_zero_after = day * 2),
                "bindings[0].policy.scale_to_zero_after",
                "2days is above the maximum 1day",
            ),
            (
                Box::new(move |c| c.bindings[0].policy.stabilize_up = day + Duration::from_secs(1)),
                "bindings[0].policy.stabilize_up",
                "1day 1s is above the maximum 1day",
            ),
            (
                Box::new(move |c| c.bindings[0].policy.stabilize_down = Duration::MAX),
                "bindings[0].policy.stabilize_down",
                "is above the maximum 1day",
            ),
            (
                Box::new(|c| c.bindings[0].policy.held_per_worker = 10_001),
                "bindings[0].policy.held_per_worker",
                "10001 is above the maximum 10000",
            ),
            (
                Box::new(|c| {
                    c.bindings[0].policy.in_flight_floor = false;
                    c.bindings[0].policy.held_per_worker = 0;
                }),
                "bindings[0].policy.held_per_worker",
                "0 is below the minimum 1",
            ),
            (
                Box::new(move |c| c.bindings[0].policy.max_step_up = step(100_001, 0, day)),
                "bindings[0].policy.max_step_up.workers",
                "100001 is above the maximum 100000",
            ),
            (
                Box::new(move |c| c.bindings[0].policy.max_step_down = step(1, 10_001, day)),
                "bindings[0].policy.max_step_down.percent",
                "10001 is above the maximum 10000",
            ),
            (
                Box::new(move |c| c.bindings[0].policy.max_step_up = step(1, 0, day * 7)),
                "bindings[0].policy.max_step_up.period",
                "7days is above the maximum 1day",
            ),
            (
                Box::new(move |c| {
                    c.bindings[0].policy.max_step_down = step(1, 0, Duration::from_millis(10))
                }),
                "bindings[0].policy.max_step_down.period",
                "10ms is below the minimum 1s",
            ),
            (
                Box::new(|c| {
                    c.bindings[0].policy.fallback = Some(FallbackConfig {
                        after_failures: 10_001,
                        capacity: None,
                    })
                }),
                "bindings[0].policy.fallback.after_failures",
                "10001 is above the maximum 10000",
            ),
        ];
        for (edit, field, rule) in cases {
            let e = error_for(edit);
            assert_eq!(e.field, field, "{e}");
            assert!(e.rule.contains(rule), "{e} lacks {rule:?}");
        }
    }

    #[test]
    fn values_at_the_bounds_are_accepted() {
        let day = Duration::from_secs(86_400);
        let at_max = PolicyConfig {
            kind: PolicyKind::DrainTime,
            target_wait: day,
            throughput_per_worker: 1e6,
            messages_per_worker: 1e6,
            min_workers: 100_000,
            max_workers: 100_000,
            activation_messages: 1_000_000_000,
            scale_to_zero_after: day,
            stabilize_up: day,
            stabilize_down: day,
            max_step_up: Some(StepLimitConfig {
                workers: 100_000,
                percent: 10_000,
                period: day,
            }),
            max_step_down: Some(StepLimitConfig {
                workers: 0,
                percent: 10_000,
                period: day,
            }),
            in_flight_floor: true,
            held_per_worker: 10_000,
            fallback: Some(FallbackConfig {
                after_failures: 10_000,
                capacity: Some(100_000),
            }),
            rent_or_buy: true,
            worker_startup: Some(day),
            schedule: vec![ScheduleConfig {
                days: "sun-sat".into(),
                from: "23:59".into(),
                to: "24:00".into(),
                tz: "UTC".into(),
                min_workers: 100_000,
            }],
            forecast: Some(ForecastConfig {
                period: Duration::from_secs(7 * 86_400),
                cycles: 10,
                lead: Some(Duration::from_secs(7 * 86_400 / 2)),
                resolution: Duration::from_secs(30),
            }),
        };
        at_max.validate().unwrap();
        let at_min = PolicyConfig {
            kind: PolicyKind::TargetBacklog,
            target_wait: Duration::from_secs(1),
            throughput_per_worker: 1e-6,
            messages_per_worker: 0.01,
            min_workers: 0,
            max_workers: 1,
            activation_messages: 0,
            scale_to_zero_after: Duration::ZERO,
            stabilize_up: Duration::ZERO,
            stabilize_down: Duration::ZERO,
            max_step_up: Some(StepLimitConfig {
                workers: 1,
                percent: 0,
                period: Duration::from_secs(1),
            }),
            max_step_down: None,
            in_flight_floor: true,
            held_per_worker: 1,
            fallback: Some(FallbackConfig {
                after_failures: 1,
                capacity: None,
            }),
            rent_or_buy: true,
            worker_startup: Some(Duration::from_secs(1)),
            schedule: vec![ScheduleConfig {
                days: "mon".into(),
                from: "00:00".into(),
                to: "00:01".into(),
                tz: "UTC".into(),
                min_workers: 0,
            }],
            forecast: Some(ForecastConfig {
                period: Duration::from_secs(60),
                cycles: 1,
                lead: Some(Duration::ZERO),
                resolution: Duration::from_secs(1),
            }),
        };
        at_min.validate().unwrap();
        PolicyConfig::default().validate().unwrap();
    }

    #[test]
    fn toml_nan_and_huge_durations_are_rejected_by_bounds() {
        let e = toml_error(&GOOD.replace("messages_per_worker = 10", "messages_per_worker = nan"));
        assert_eq!(e.field, "bindings[0].policy.messages_per_worker", "{e}");
        assert!(e.rule.starts_with("NaN is not a finite number"), "{e}");
        let e = toml_error(&GOOD.replace(
            "stabilize_down = \"5m\"",
            "stabilize_down = \"300000000000y\"",
        ));
        assert_eq!(e.field, "bindings[0].policy.stabilize_down", "{e}");
        assert!(e.rule.ends_with("is above the maximum 1day"), "{e}");
    }

    #[test]
    fn backend_errors_are_prefixed_and_unknown_fields_rejected() {
        let e = Config::<Src, Tgt>::from_toml(GOOD, |s: &Src, _: &Tgt| {
            if s.queue == "emails" {
                Err(ConfigError::new("source.queue", "reserved"))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(e.field, "bindings[0].source.queue");
        let typo = GOOD.replace("max_workers = 30", "max_worker = 30");
        let e = Config::<Src, Tgt>::from_toml(&typo, no_backend_rules).unwrap_err();
        assert_eq!(e.field, "bindings[0].policy.max_worker", "{e}");
        assert!(e.rule.starts_with("unknown field `max_worker`"), "{e}");
    }

    /// A backend enum read through [`KindTagged`], with a tagged section inside a variant.
    #[derive(Debug, PartialEq)]
    enum Backend {
        Queue(QueueSection),
        Nested(NestedSection),
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct QueueSection {
        queues: Vec<String>,
        #[serde(default, with = "humantime_serde")]
        timeout: Option<Duration>,
        workers_per_task: Option<u32>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NestedSection {
        inner: Box<Backend>,
    }

    impl<'de> Deserialize<'de> for Backend {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let tagged = KindTagged::deserialize(d)?;
            match tagged.kind() {
                "queue" => tagged.into_variant().map(Backend::Queue),
                "nested" => tagged.into_variant().map(Backend::Nested),
                _ => Err(tagged.unknown_kind(&["queue", "nested"])),
            }
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Slot {
        name: String,
        source: Backend,
    }

    #[derive(Debug, Deserialize)]
    struct Sections {
        bindings: Vec<Slot>,
    }

    #[test]
    fn errors_inside_kind_tagged_sections_name_the_whole_path() {
        let toml = |section: &str| {
            parse_toml::<Sections>(&format!(
                "[[bindings]]\nname = \"a\"\nsource = {{ kind = \"queue\", queues = [] }}\n\n\
                 [[bindings]]\nname = \"b\"\nsource = {{ {section} }}\n"
            ))
        };
        let ok = toml(r#"kind = "queue", queues = ["a"], timeout = "5s""#).unwrap();
        assert_eq!(ok.bindings[1].name, "b");
        assert_eq!(
            ok.bindings[1].source,
            Backend::Queue(QueueSection {
                queues: vec!["a".into()],
                timeout: Some(Duration::from_secs(5)),
                workers_per_task: None,
            })
        );
        // (section, field, words the rule must hold)
        let cases = [
            (
                r#"kind = "queue", queues = [], workers_per_task = -1"#,
                "bindings[1].source.workers_per_task",
                "integer `-1`, expected u32 (line 7)",
            ),
            (
                r#"kind = "queue", queues = [], timeout = -5"#,
                "bindings[1].source.timeout",
                "-5",
            ),
            (
                r#"kind = "queue", queues = ["a", 3]"#,
                "bindings[1].source.queues[1]",
                "expected a string",
            ),
            (
                r#"kind = "queue", queues = [], queue = 1"#,
                "bindings[1].source.queue",
                "unknown field `queue`",
            ),
            (
                r#"kind = "queue""#,
                "bindings[1].source",
                "missing field `queues`",
            ),
            (
                r#"kind = "quue""#,
                "bindings[1].source.kind",
                "unknown variant `quue`, expected `queue` or `nested`",
            ),
            ("kind = 3", "bindings[1].source.kind", "expected a string"),
            ("queues = []", "bindings[1].source", "missing field `kind`"),
            (
                r#"kind = "nested", inner = { kind = "queue", queues = [], workers_per_task = 1.5 }"#,
                "bindings[1].source.inner.workers_per_task",
                "1.5",
            ),
            (
                r#"kind = "nested", inner = { kind = "nope" }"#,
                "bindings[1].source.inner.kind",
                "nope",
            ),
        ];
        for (section, field, rule) in cases {
            let e = toml(section).unwrap_err();
            assert_eq!(e.field, field, "{section}: {e}");
            assert!(e.rule.contains(rule), "{section}: {e}");
            assert!(!e.rule.contains(NESTED), "{e:?}");
        }
        let e = parse_json::<Sections>(
            r#"{"bindings": [{"name": "a", "source": {"queues": ["a"], "kind": "queue", "workers_per_task": -1}}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "bindings[0].source.workers_per_task", "{e}");
        assert!(e.rule.contains("expected u32 (line 1 column"), "{e}");
        let e =
            parse_json::<Sections>(r#"{"bindings": [{"name": "a", "source": {"kind": "sqs"}}]}"#)
                .unwrap_err();
        assert_eq!(e.field, "bindings[0].source.kind", "{e}");
    }
}
