//! Application Auto Scaling target tracking, standard and high-resolution.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use celery_scale_core::policy::{Decision, PolicyInput, ScalingPolicy};

use super::due;

/// Application Auto Scaling target tracking on a backlog-per-task metric (AWS's documented way
/// to scale queue workers), with its defaults:
///
/// - the metric (ready messages / running tasks, AWS's recipe; or / desired count with
///   [`AwsTargetTracking::per_desired_task`]) is one datapoint per period: 60 s
///   ([`AwsTargetTracking::new`]), or 10 s for the high-resolution option
///   ([`AwsTargetTracking::high_resolution`]: AWS documents 10 s as the lowest metric period
///   target tracking supports on a custom metric, and 10, 30 and 60 s as the accepted periods);
/// - the scale-out alarm fires after 3 consecutive datapoints above the target, the scale-in
///   alarm after 15 consecutive datapoints below 90% of the target (AWS documents no other
///   datapoint counts for high resolution; this model keeps 3 and 15 at the shorter period, and
///   no CloudWatch ingestion delay, which is generous to AWS);
/// - capacity goes to ceil(current x metric / target); scale-out and scale-in cooldowns 300 s.
///   During the scale-out cooldown a **larger** scale-out is allowed: "the capacity added by
///   the initiating scale-out activity is calculated as part of the desired capacity for the
///   next scale-out", so a new alarm raises capacity when its proportional capacity exceeds the
///   current one, by the difference. Scale-in waits for both cooldowns;
/// - no scale to zero (minimum capacity 1: a backlog-per-task metric is undefined at 0 tasks).
#[derive(Debug, Clone)]
pub struct AwsTargetTracking {
    name: &'static str,
    target: f64,
    min: u32,
    max: u32,
    period: Duration,
    per_desired_task: bool,
    datapoints: VecDeque<f64>,
    last_datapoint: Option<Instant>,
    last_out: Option<Instant>,
    last_in: Option<Instant>,
}

impl AwsTargetTracking {
    /// Standard datapoint period.
    pub const PERIOD: Duration = Duration::from_secs(60);
    /// High-resolution datapoint period (the lowest target tracking supports).
    pub const HIGH_RESOLUTION_PERIOD: Duration = Duration::from_secs(10);
    /// Datapoints above target before scaling out.
    pub const OUT_DATAPOINTS: usize = 3;
    /// Datapoints below 90% of target before scaling in.
    pub const IN_DATAPOINTS: usize = 15;
    /// Cooldown after a scaling activity, per direction.
    pub const COOLDOWN: Duration = Duration::from_secs(300);

    /// Standard resolution: `target` backlog per worker, `min..=max` (min raised to 1).
    pub fn new(target: f64, min: u32, max: u32) -> Self {
        AwsTargetTracking {
            name: "aws_target_tracking",
            target: target.max(f64::MIN_POSITIVE),
            min: min.max(1),
            max: max.max(min).max(1),
            period: Self::PERIOD,
            per_desired_task: false,
            datapoints: VecDeque::new(),
            last_datapoint: None,
            last_out: None,
            last_in: None,
        }
    }

    /// As [`AwsTargetTracking::new`] on a high-resolution metric (10 s period).
    pub fn high_resolution(target: f64, min: u32, max: u32) -> Self {
        AwsTargetTracking {
            name: "aws_high_resolution",
            period: Self::HIGH_RESOLUTION_PERIOD,
            ..AwsTargetTracking::new(target, min, max)
        }
    }

    /// The metric divided by the desired count instead of the running tasks (a custom metric
    /// a user publishes with the service's desired count): capacity that is starting no longer
    /// reads as missing, so a scale-out is not repeated while tasks start.
    pub fn per_desired_task(self) -> Self {
        AwsTargetTracking {
            per_desired_task: true,
            ..self
        }
    }
}

impl ScalingPolicy for AwsTargetTracking {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let now = input.now;
        let current = input.capacity.desired;
        let name = self.name;
        let Some(obs) = input.observation else {
            return Decision::hold(name, input);
        };
        // The metric is published every period whatever the policy does.
        let fresh = due(self.last_datapoint, self.period, now);
        let tasks = if self.per_desired_task {
            input.capacity.desired
        } else {
            input.capacity.running
        };
        let per_task = obs.ready as f64 / f64::from(tasks.max(1));
        if fresh {
            self.last_datapoint = Some(now);
            self.datapoints.push_back(per_task);
            if self.datapoints.len() > Self::IN_DATAPOINTS {
                self.datapoints.pop_front();
            }
        }
        if current < self.min {
            return Decision::new(name, current, self.min, "raise to minimum capacity 1");
        }
        if !fresh {
            return Decision::new(name, current, current, "waiting for the next datapoint");
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
        {
            // In the cooldown too: a larger scale-out adds the difference.
            let during = !cooled(self.last_out);
            desired = proportional;
            self.last_out = Some(now);
            note = format!(
                "scale-out alarm (3 datapoints above {}): {desired}{}",
                self.target,
                if during {
                    ", larger than the scale-out that started the cooldown"
                } else {
                    ""
                }
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
        Decision::new(name, current, desired, note)
    }
}
