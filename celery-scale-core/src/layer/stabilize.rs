use std::time::Duration;

use super::history::History;
use crate::policy::{Decision, PolicyInput, ScalingPolicy};

/// The Kubernetes HPA's stabilization windows: scale in only to the *highest* recommendation
/// seen over the last `down` window, scale out only to the *lowest* over the last `up` window.
/// With `up` = 0 scale-out is immediate; with `down` = 300 s this is the HPA's default.
#[derive(Debug, Clone)]
pub struct Stabilize<P> {
    inner: P,
    up: Duration,
    down: Duration,
    history: History,
}

impl<P> Stabilize<P> {
    /// Wraps `inner` with the two windows.
    pub fn new(inner: P, up: Duration, down: Duration) -> Self {
        Stabilize {
            inner,
            up,
            down,
            history: History::default(),
        }
    }
}

impl<P: ScalingPolicy> ScalingPolicy for Stabilize<P> {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let mut d = self.inner.decide(input);
        if input.observation.is_none() {
            return d;
        }
        let now = input.now;
        let recommendation = d.desired;
        let keep = self.up.max(self.down);
        self.history.record(now, recommendation, keep);
        let within = |w: Duration| self.history.within(now, w);
        let up_rec = within(self.up).min().unwrap_or(recommendation);
        let down_rec = within(self.down).max().unwrap_or(recommendation);
        let current = input.capacity.desired;
        let stabilized = current.max(up_rec).min(down_rec);
        let note = if stabilized > recommendation {
            format!(
                "scale-in held at {stabilized}: highest recommendation in the last {:?}",
                self.down
            )
        } else if stabilized < recommendation {
            format!(
                "scale-out held at {stabilized}: lowest recommendation in the last {:?}",
                self.up
            )
        } else {
            "stable".to_string()
        };
        d.push("stabilize", stabilized, note);
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
    async fn scale_in_waits_for_the_window_scale_out_is_immediate() {
        let t0 = Instant::now();
        let obs = Observation::new(0, t0);
        let mut p = Stabilize::new(
            Scripted { next: 10 },
            Duration::ZERO,
            Duration::from_secs(300),
        );
        assert_eq!(p.decide(&input(&obs, 2, t0)).desired, 10, "out at once");
        p.inner.next = 1;
        for s in [10u64, 100, 299, 300] {
            let d = p.decide(&input(&obs, 10, t0 + Duration::from_secs(s)));
            assert_eq!(d.desired, 10, "at {s}s the 10 is still in the window");
        }
        let d = p.decide(&input(&obs, 10, t0 + Duration::from_secs(301)));
        assert_eq!(d.desired, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn up_window_takes_the_lowest() {
        let t0 = Instant::now();
        let obs = Observation::new(0, t0);
        let mut p = Stabilize::new(
            Scripted { next: 3 },
            Duration::from_secs(60),
            Duration::ZERO,
        );
        assert_eq!(p.decide(&input(&obs, 1, t0)).desired, 3);
        p.inner.next = 8;
        let d = p.decide(&input(&obs, 3, t0 + Duration::from_secs(30)));
        assert_eq!(d.desired, 3, "3 is still the lowest in the up window");
        let d = p.decide(&input(&obs, 3, t0 + Duration::from_secs(61)));
        assert_eq!(d.desired, 8);
    }
}
