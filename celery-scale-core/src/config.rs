//! Configuration: serde structs (TOML and JSON), validated at construction with errors that name
//! the field path and the rule, e.g. `bindings[0].policy.max_workers: 0 is below min_workers 1`.
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

use crate::layer::{PolicyExt, StepLimit};
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
    /// Workers that may be added/removed per period.
    #[serde(default)]
    pub workers: u32,
    /// Percent of current capacity that may be added/removed per period.
    #[serde(default)]
    pub percent: u32,
    /// The period.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
}

/// What to do once observations keep failing (see [`crate::layer::Fallback`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// Failed observations in a row before the fallback applies.
    pub after_failures: u32,
    /// Raise to at least this many workers; absent: hold.
    #[serde(default)]
    pub capacity: Option<u32>,
}

/// A policy and its layers, as configured. [`PolicyConfig::build`] assembles
/// `base -> in_flight_floor -> activation -> stabilize -> max_step -> bounds -> fallback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The base policy.
    pub kind: PolicyKind,
    /// `drain_time`: every waiting task should start within this.
    #[serde(with = "humantime_serde")]
    pub target_wait: Duration,
    /// `drain_time`: tasks per second one worker completes, used until heartbeats measure it.
    pub throughput_per_worker: f64,
    /// `target_backlog`: outstanding messages per worker.
    pub messages_per_worker: f64,
    /// Fewest workers.
    pub min_workers: u32,
    /// Most workers.
    pub max_workers: u32,
    /// Scale from zero only at this many outstanding messages.
    pub activation_messages: u64,
    /// Scale to zero only after the queues were idle this long.
    #[serde(with = "humantime_serde")]
    pub scale_to_zero_after: Duration,
    /// Scale out to the lowest recommendation of this window (0: at once).
    #[serde(with = "humantime_serde")]
    pub stabilize_up: Duration,
    /// Scale in to the highest recommendation of this window.
    #[serde(with = "humantime_serde")]
    pub stabilize_down: Duration,
    /// Limit on growth per period.
    pub max_step_up: Option<StepLimitConfig>,
    /// Limit on shrinking per period.
    pub max_step_down: Option<StepLimitConfig>,
    /// Never fewer workers than executing or holding tasks.
    pub in_flight_floor: bool,
    /// Messages a worker holds (Celery's `worker_prefetch_multiplier`), for the in-flight floor.
    pub held_per_worker: u32,
    /// What to do once observations keep failing.
    pub fallback: Option<FallbackConfig>,
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
        }
    }
}

fn step_limit(c: &StepLimitConfig, field: &str) -> Result<StepLimit, ConfigError> {
    StepLimit::new(c.workers, c.percent, c.period).map_err(|e| e.within(field))
}

impl PolicyConfig {
    /// Checks every field; the error names the field (relative to this struct).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.build().map(|_| ())
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
        if let Some(f) = &self.fallback {
            if f.after_failures == 0 {
                return Err(ConfigError::new(
                    "fallback.after_failures",
                    "must be at least 1",
                ));
            }
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
        let floored: Box<dyn ScalingPolicy> = if self.in_flight_floor {
            base.in_flight_floor(self.held_per_worker)?.boxed()
        } else {
            base
        };
        let policy = crate::layer::MaxStep::new(
            floored
                .activation(self.activation_messages, self.scale_to_zero_after)
                .stabilize(self.stabilize_up, self.stabilize_down),
            up,
            down,
        )
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
    pub fn from_toml(
        text: &str,
        backends: impl Fn(&S, &T) -> Result<(), ConfigError>,
    ) -> Result<Self, ConfigError> {
        let config: Self = toml_parse(text)?;
        config.validate(&backends)?;
        Ok(config)
    }

    /// Parses JSON and validates.
    pub fn from_json(
        text: &str,
        backends: impl Fn(&S, &T) -> Result<(), ConfigError>,
    ) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(text).map_err(|e| {
            ConfigError::new(
                format!("line {} column {}", e.line(), e.column()),
                e.to_string(),
            )
        })?;
        config.validate(&backends)?;
        Ok(config)
    }
}

fn toml_parse<C: serde::de::DeserializeOwned>(text: &str) -> Result<C, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let field = e
            .span()
            .map(|s| {
                let line = text[..s.start.min(text.len())].lines().count().max(1);
                format!("line {line}")
            })
            .unwrap_or_else(|| "config".to_string());
        ConfigError::new(field, e.message().to_string())
    })
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
        assert!(e.rule.contains("max_worker"), "{e}");
    }
}
