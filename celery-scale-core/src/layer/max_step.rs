use std::time::Duration;

use super::history::History;
use crate::ConfigError;
use crate::policy::{Decision, PolicyInput, ScalingPolicy};

/// How much capacity may change per `period`: the larger of `workers` and `percent` % of the
/// capacity at the start of the period (the HPA's `Pods` and `Percent` policies, `selectPolicy: Max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimit {
    workers: u32,
    percent: u32,
    period: Duration,
}

impl StepLimit {
    /// A limit of `max(workers, percent% of current)` per `period`. At least one of `workers`
    /// and `percent` must be non-zero, and `period` must be non-zero.
    pub fn new(workers: u32, percent: u32, period: Duration) -> Result<Self, ConfigError> {
        if workers == 0 && percent == 0 {
            return Err(ConfigError::new(
                "workers",
                "workers and percent are both 0: capacity could never change",
            ));
        }
        if period.is_zero() {
            return Err(ConfigError::new("period", "must be greater than 0s"));
        }
        Ok(StepLimit {
            workers,
            percent,
            period,
        })
    }

    fn allowed(&self, base: u32) -> u32 {
        let pct = (u64::from(base) * u64::from(self.percent)).div_ceil(100);
        self.workers.max(pct.min(u64::from(u32::MAX)) as u32)
    }
}

/// Limits the change of the desired count per period, per direction.
#[derive(Debug, Clone)]
pub struct MaxStep<P> {
    inner: P,
    up: Option<StepLimit>,
    down: Option<StepLimit>,
    /// (when, current desired) as seen on each decision.
    history: History,
}

impl<P> MaxStep<P> {
    /// Wraps `inner` with optional limits for each direction.
    pub fn new(inner: P, up: Option<StepLimit>, down: Option<StepLimit>) -> Self {
        MaxStep {
            inner,
            up,
            down,
            history: History::default(),
        }
    }

    /// Adds (or replaces) the scale-out limit.
    pub fn max_step_up(mut self, limit: StepLimit) -> Self {
        self.up = Some(limit);
        self
    }

    /// Adds (or replaces) the scale-in limit.
    pub fn max_step_down(mut self, limit: StepLimit) -> Self {
        self.down = Some(limit);
        self
    }
}

impl<P: ScalingPolicy> ScalingPolicy for MaxStep<P> {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let mut d = self.inner.decide(input);
        let now = input.now;
        let current = input.capacity.desired;
        let keep = self
            .up
            .map_or(Duration::ZERO, |l| l.period)
            .max(self.down.map_or(Duration::ZERO, |l| l.period));
        self.history.record(now, current, keep);
        let in_period = |p: Duration| self.history.within(now, p);
        if let Some(limit) = self.up
            && d.desired > current
        {
            let base = in_period(limit.period).min().unwrap_or(current);
            let cap = base.saturating_add(limit.allowed(base)).max(current);
            if d.desired > cap {
                d.push(
                    "max_step_up",
                    cap,
                    format!(
                        "scale-out limited to {cap}: +{} per {:?} from {base}",
                        limit.allowed(base),
                        limit.period
                    ),
                );
            }
        }
        if let Some(limit) = self.down
            && d.desired < current
        {
            let base = in_period(limit.period).max().unwrap_or(current);
            let floor = base.saturating_sub(limit.allowed(base)).min(current);
            if d.desired < floor {
                d.push(
                    "max_step_down",
                    floor,
                    format!(
                        "scale-in limited to {floor}: -{} per {:?} from {base}",
                        limit.allowed(base),
                        limit.period
                    ),
                );
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Observation;
    use crate::layer::testing::{Scripted, input};
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn limits_growth_per_period() {
        let t0 = Instant::now();
        let obs = Observation::new(0, t0);
        let limit = StepLimit::new(4, 100, Duration::from_secs(60)).unwrap();
        let mut p = MaxStep::new(Scripted { next: 100 }, Some(limit), None);
        // From 2: max(4, 100% of 2) = +4.
        assert_eq!(p.decide(&input(&obs, 2, t0)).desired, 6);
        // Within the same period the base is still 2.
        assert_eq!(
            p.decide(&input(&obs, 6, t0 + Duration::from_secs(30)))
                .desired,
            6
        );
        // A period later the base is 6: +6.
        assert_eq!(
            p.decide(&input(&obs, 6, t0 + Duration::from_secs(91)))
                .desired,
            12
        );
    }

    #[tokio::test(start_paused = true)]
    async fn limits_shrink_per_period() {
        let t0 = Instant::now();
        let obs = Observation::new(0, t0);
        let limit = StepLimit::new(1, 50, Duration::from_secs(60)).unwrap();
        let mut p = MaxStep::new(Scripted { next: 0 }, None, Some(limit));
        assert_eq!(p.decide(&input(&obs, 10, t0)).desired, 5);
        assert_eq!(
            p.decide(&input(&obs, 5, t0 + Duration::from_secs(10)))
                .desired,
            5
        );
        assert!(StepLimit::new(0, 0, Duration::from_secs(1)).is_err());
    }
}
