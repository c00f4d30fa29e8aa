//! A Judoscale-like autoscaler on job queue latency.

use std::time::Duration;

use tokio::time::Instant;

use celery_scale_core::policy::{Decision, PolicyInput, ScalingPolicy};

use super::due;

/// An autoscaler in the manner of Judoscale's worker autoscaling, on **queue latency** (the
/// age of the oldest waiting job, Judoscale's "job queue time"), with its documented defaults:
///
/// - the adapter reports, and the autoscaler decides, every 10 s;
/// - upscale when the latency is above the range's upper threshold, by one worker
///   ("upscale jumps" default 1), then at most once per "upscale frequency" (Judoscale's
///   tuning guide advises at least a start-up, about a minute on ECS; this model uses 60 s);
/// - downscale by one when the latency has stayed below the lower threshold for the
///   "downscale delay" (default 10 minutes), which also separates later downscales;
/// - `min..=max` workers (min 0 scales workers to zero; a job waiting with no worker has a
///   growing latency, which upscales).
///
/// The queue-time range is the user's choice, not a documented default: [`Judoscale::new`]
/// takes it, and the report uses 10 s / 5 s. A waiting job with no latency known (no publish
/// time) holds.
#[derive(Debug, Clone)]
pub struct Judoscale {
    upscale_above: Duration,
    downscale_below: Duration,
    min: u32,
    max: u32,
    latency: Option<Duration>,
    last_report: Option<Instant>,
    last_up: Option<Instant>,
    last_down: Option<Instant>,
    below_since: Option<Instant>,
}

impl Judoscale {
    /// Reporting and decision interval.
    pub const REPORT: Duration = Duration::from_secs(10);
    /// Workers added per upscale.
    pub const JUMP: u32 = 1;
    /// Least time between upscales.
    pub const UPSCALE_EVERY: Duration = Duration::from_secs(60);
    /// Time below the range before the first downscale, and between downscales.
    pub const DOWNSCALE_DELAY: Duration = Duration::from_secs(600);

    /// Upscale while the oldest job waited longer than `upscale_above`; downscale once it has
    /// stayed below `downscale_below` for the delay; `min..=max` workers.
    pub fn new(upscale_above: Duration, downscale_below: Duration, min: u32, max: u32) -> Self {
        Judoscale {
            upscale_above,
            downscale_below: downscale_below.min(upscale_above),
            min,
            max: max.max(min).max(1),
            latency: None,
            last_report: None,
            last_up: None,
            last_down: None,
            below_since: None,
        }
    }
}

impl ScalingPolicy for Judoscale {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let now = input.now;
        let current = input.capacity.desired;
        let hold = |note: String| Decision::new("judoscale", current, current, note);
        let Some(obs) = input.observation else {
            return Decision::hold("judoscale", input);
        };
        if current < self.min {
            return Decision::new("judoscale", current, self.min, "raise to the minimum");
        }
        if !due(self.last_report, Self::REPORT, now) {
            return hold("between reports".into());
        }
        self.last_report = Some(now);
        self.latency = match (obs.ready, obs.oldest_age) {
            (0, _) => Some(Duration::ZERO),
            (_, age) => age,
        };
        let Some(latency) = self.latency else {
            return hold("latency unknown: no publish time".into());
        };
        if latency < self.downscale_below {
            self.below_since.get_or_insert(now);
        } else {
            self.below_since = None;
        }
        let since = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t));
        if latency > self.upscale_above && current < self.max {
            if since(self.last_up).is_some_and(|d| d < Self::UPSCALE_EVERY) {
                return hold(format!("latency {latency:?}: upscaled less than 60 s ago"));
            }
            self.last_up = Some(now);
            let desired = (current + Self::JUMP).min(self.max);
            return Decision::new(
                "judoscale",
                current,
                desired,
                format!("latency {latency:?} above {:?}: +1", self.upscale_above),
            );
        }
        let settled = since(self.below_since).is_some_and(|d| d >= Self::DOWNSCALE_DELAY);
        let spaced = since(self.last_down).is_none_or(|d| d >= Self::DOWNSCALE_DELAY);
        if settled && spaced && current > self.min {
            self.last_down = Some(now);
            return Decision::new(
                "judoscale",
                current,
                current - 1,
                format!(
                    "latency below {:?} for the 10 min delay: -1",
                    self.downscale_below
                ),
            );
        }
        hold(format!("latency {latency:?} within range"))
    }
}
