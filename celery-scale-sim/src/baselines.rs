//! What users would run instead, modelled as [`ScalingPolicy`]s so the simulator runs them
//! through the same loop, fleet and bill as ours. Each keeps its own cadence from `now`.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use celery_scale_core::policy::{Decision, PolicyInput, ScalingPolicy};

/// KEDA's Redis list / RabbitMQ queue-length scaler driving the Kubernetes HPA, with their
/// defaults:
///
/// - KEDA polls the metric every `pollingInterval` = 30 s; the list scaler's metric is the
///   **list length** (ready messages only: `LLEN`, or RabbitMQ's ready count in `QueueLength`
///   mode), not in-flight or executing work (KEDA docs, `redis-lists` and `rabbitmq-queue`).
/// - From zero, KEDA activates the deployment (0 -> 1) as soon as the metric exceeds
///   `activationListLength` = 0; it scales back to zero once the metric has been 0 for
///   `cooldownPeriod` = 300 s.
/// - Between 1 and max the HPA syncs every 15 s (`--horizontal-pod-autoscaler-sync-period`):
///   desired = ceil(metric / target) for an `AverageValue` target, skipped when the ratio is within
///   the 0.1 tolerance; scale-up limited by the default policy (max of +4 pods and +100% per 15 s);
///   scale-down stabilized over 300 s (the highest recommendation of the window wins)
///   (kubernetes `pkg/controller/podautoscaler/horizontal.go`, `replica_calculator.go`).
#[derive(Debug, Clone)]
pub struct Keda {
    target: f64,
    min: u32,
    max: u32,
    metric: Option<u64>,
    last_poll: Option<Instant>,
    last_sync: Option<Instant>,
    last_active: Option<Instant>,
    recommendations: VecDeque<(Instant, u32)>,
    /// (time, replicas) at each sync, for the scale-up rate limit.
    decided: VecDeque<(Instant, u32)>,
}

impl Keda {
    /// Polling interval.
    pub const POLLING: Duration = Duration::from_secs(30);
    /// HPA sync period.
    pub const SYNC: Duration = Duration::from_secs(15);
    /// HPA tolerance.
    pub const TOLERANCE: f64 = 0.1;
    /// HPA scale-down stabilization window.
    pub const STABILIZE_DOWN: Duration = Duration::from_secs(300);
    /// KEDA cooldown before scaling to zero.
    pub const COOLDOWN: Duration = Duration::from_secs(300);

    /// `target` messages per replica (worker), `min..=max` replicas (min 0 allows zero).
    pub fn new(target: f64, min: u32, max: u32) -> Self {
        Keda {
            target: target.max(f64::MIN_POSITIVE),
            min,
            max: max.max(min).max(1),
            metric: None,
            last_poll: None,
            last_sync: None,
            last_active: None,
            recommendations: VecDeque::new(),
            decided: VecDeque::new(),
        }
    }
}

fn due(last: Option<Instant>, every: Duration, now: Instant) -> bool {
    last.is_none_or(|t| now.saturating_duration_since(t) >= every)
}

impl ScalingPolicy for Keda {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let now = input.now;
        let current = input.capacity.desired;
        if let Some(obs) = input.observation
            && due(self.last_poll, Self::POLLING, now)
        {
            self.metric = Some(obs.ready);
            self.last_poll = Some(now);
            if obs.ready > 0 {
                self.last_active = Some(now);
            }
        }
        let Some(metric) = self.metric else {
            return Decision::hold("keda", input);
        };
        let hold = |note: &str| Decision::new("keda", current, current, note.to_string());
        if current == 0 {
            return if metric > 0 {
                Decision::new(
                    "keda",
                    0,
                    1.max(self.min),
                    format!("activate: list length {metric} > 0"),
                )
            } else {
                hold("inactive")
            };
        }
        let idle_for = self
            .last_active
            .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        if self.min == 0 && metric == 0 && idle_for >= Self::COOLDOWN {
            return Decision::new(
                "keda",
                current,
                0,
                "list empty for the cooldown: scale to zero",
            );
        }
        if !due(self.last_sync, Self::SYNC, now) {
            return hold("between HPA syncs");
        }
        self.last_sync = Some(now);
        let ratio = metric as f64 / (self.target * f64::from(current));
        let raw = if (ratio - 1.0).abs() <= Self::TOLERANCE {
            current
        } else {
            ((metric as f64 / self.target).ceil() as u32).max(1)
        };
        let raw = raw.clamp(self.min.max(1), self.max);
        // Scale-down stabilization: the highest recommendation of the window.
        self.recommendations.push_back((now, raw));
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > Self::STABILIZE_DOWN)
        {
            self.recommendations.pop_front();
        }
        let mut desired = raw;
        if raw < current {
            let highest = self
                .recommendations
                .iter()
                .map(|r| r.1)
                .max()
                .unwrap_or(raw);
            desired = highest.min(current);
        }
        // Scale-up limit: max(+4, +100%) over the last 15 s.
        self.decided.push_back((now, current));
        while self
            .decided
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > Self::SYNC)
        {
            self.decided.pop_front();
        }
        if desired > current {
            let base = self.decided.iter().map(|d| d.1).min().unwrap_or(current);
            desired = desired.min((base + 4).max(base * 2));
        }
        Decision::new(
            "keda",
            current,
            desired,
            format!(
                "HPA: list length {metric} / target {} -> {raw}, stabilized {desired}",
                self.target
            ),
        )
    }
}

/// Application Auto Scaling target tracking on a backlog-per-task metric (AWS's documented way
/// to scale queue workers), with its defaults:
///
/// - the metric (ready messages / running tasks) is published as one datapoint per minute;
/// - the scale-out alarm fires after 3 consecutive datapoints above the target, the scale-in
///   alarm after 15 consecutive datapoints below 90% of the target;
/// - capacity goes to ceil(current x metric / target); scale-out and scale-in cooldowns 300 s;
/// - no scale to zero (minimum capacity 1: a backlog-per-task metric is undefined at 0 tasks).
#[derive(Debug, Clone)]
pub struct AwsTargetTracking {
    target: f64,
    min: u32,
    max: u32,
    datapoints: VecDeque<f64>,
    last_datapoint: Option<Instant>,
    last_out: Option<Instant>,
    last_in: Option<Instant>,
}

impl AwsTargetTracking {
    /// Datapoint period.
    pub const PERIOD: Duration = Duration::from_secs(60);
    /// Datapoints above target before scaling out.
    pub const OUT_DATAPOINTS: usize = 3;
    /// Datapoints below 90% of target before scaling in.
    pub const IN_DATAPOINTS: usize = 15;
    /// Cooldown after a scaling activity, per direction.
    pub const COOLDOWN: Duration = Duration::from_secs(300);

    /// `target` backlog per worker, `min..=max` (min raised to 1).
    pub fn new(target: f64, min: u32, max: u32) -> Self {
        AwsTargetTracking {
            target: target.max(f64::MIN_POSITIVE),
            min: min.max(1),
            max: max.max(min).max(1),
            datapoints: VecDeque::new(),
            last_datapoint: None,
            last_out: None,
            last_in: None,
        }
    }
}

impl ScalingPolicy for AwsTargetTracking {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let now = input.now;
        let current = input.capacity.desired;
        if current < self.min {
            return Decision::new(
                "aws_target_tracking",
                current,
                self.min,
                "raise to minimum capacity 1",
            );
        }
        let Some(obs) = input.observation else {
            return Decision::hold("aws_target_tracking", input);
        };
        if !due(self.last_datapoint, Self::PERIOD, now) {
            return Decision::new(
                "aws_target_tracking",
                current,
                current,
                "waiting for the next datapoint",
            );
        }
        self.last_datapoint = Some(now);
        let per_task = obs.ready as f64 / f64::from(input.capacity.running.max(1));
        self.datapoints.push_back(per_task);
        if self.datapoints.len() > Self::IN_DATAPOINTS {
            self.datapoints.pop_front();
        }
        let last = |n: usize| self.datapoints.iter().rev().take(n);
        let proportional = ((f64::from(current.max(1)) * per_task / self.target).ceil() as u32)
            .clamp(self.min, self.max);
        let cooled = |t: Option<Instant>| {
            t.is_none_or(|t| now.saturating_duration_since(t) >= Self::COOLDOWN)
        };
        let mut desired = current;
        let mut note = format!("backlog per task {per_task:.2} vs target {}", self.target);
        if self.datapoints.len() >= Self::OUT_DATAPOINTS
            && last(Self::OUT_DATAPOINTS).all(|d| *d > self.target)
            && proportional > current
            && cooled(self.last_out)
        {
            desired = proportional;
            self.last_out = Some(now);
            note = format!(
                "scale-out alarm (3 datapoints above {}): {desired}",
                self.target
            );
        } else if self.datapoints.len() >= Self::IN_DATAPOINTS
            && last(Self::IN_DATAPOINTS).all(|d| *d < 0.9 * self.target)
            && proportional < current
            && cooled(self.last_in)
            && cooled(self.last_out)
        {
            desired = proportional;
            self.last_in = Some(now);
            note = format!(
                "scale-in alarm (15 datapoints below 90% of {}): {desired}",
                self.target
            );
        }
        Decision::new("aws_target_tracking", current, desired, note)
    }
}

/// A fixed fleet of `workers` (sized for the trace's peak).
#[derive(Debug, Clone)]
pub struct Fixed(pub u32);

impl ScalingPolicy for Fixed {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        Decision::new(
            "static",
            input.capacity.desired,
            self.0,
            format!("fixed at {}", self.0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_scale_core::{Capacity, Observation};

    fn run(p: &mut dyn ScalingPolicy, ready: impl Fn(u64) -> u64, until_s: u64) -> Vec<(u64, u32)> {
        let t0 = Instant::now();
        let mut current = 0u32;
        let mut changes = Vec::new();
        for s in 0..until_s {
            let now = t0 + Duration::from_secs(s);
            let obs = Observation::new(ready(s), now);
            let d = p.decide(&PolicyInput {
                observation: Some(&obs),
                consecutive_failures: 0,
                capacity: Capacity {
                    desired: current,
                    running: current,
                    pending: 0,
                },
                now,
            });
            if d.desired != current {
                changes.push((s, d.desired));
                current = d.desired;
            }
        }
        changes
    }

    #[test]
    fn aws_scales_out_no_sooner_than_three_minutes_after_a_step() {
        let mut p = AwsTargetTracking::new(5.0, 1, 100);
        // A step of 100 ready messages at t = 0 that stays.
        let changes = run(&mut p, |_| 100, 600);
        assert_eq!(changes[0], (0, 1), "raised to the minimum of 1");
        let first_out = changes.iter().find(|c| c.1 > 1).unwrap();
        assert!(
            first_out.0 >= 120,
            "third datapoint at 120 s, got {first_out:?}"
        );
        assert_eq!(first_out.1, 20, "proportional: 1 x 100 / 5");
    }

    #[test]
    fn keda_scales_in_no_sooner_than_300_s_after_load_ends() {
        let mut p = Keda::new(5.0, 0, 100);
        // 50 ready until just after the poll at 600 s (the last poll that sees load), then none.
        let changes = run(&mut p, |s| if s <= 600 { 50 } else { 0 }, 1500);
        assert_eq!(changes[0], (0, 1), "activation at the first poll");
        let peak = changes.iter().map(|c| c.1).max().unwrap();
        assert_eq!(peak, 10, "50 / 5");
        let first_in = changes.iter().find(|c| c.0 > 600 && c.1 < peak).unwrap();
        assert!(first_in.0 >= 600 + 300, "scale-in at {first_in:?}");
        assert_eq!(changes.last().unwrap().1, 0, "to zero after the cooldown");
    }
}
