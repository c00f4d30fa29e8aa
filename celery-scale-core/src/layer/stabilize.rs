use std::time::Duration;

use tokio::time::Instant;

use super::history::History;
use crate::policy::{Decision, PolicyInput, ScalingPolicy};

/// The Kubernetes HPA's stabilization windows: scale in only to the *highest* recommendation
/// seen over the last `down` window, scale out only to the *lowest* over the last `up` window.
/// With `up` = 0 scale-out is immediate; with `down` = 300 s this is the HPA's default.
///
/// A fresh layer remembers nothing, so it assumes the most: its first decision counts as if the
/// target's desired count then had been recommended throughout the `down` window, and the
/// first scale-in comes no sooner than `down` after it (a start, a restart or a rebuilt binding
/// never scales in on its first ticks). Likewise a tick whose worker figures are unknown counts
/// in the window as a recommendation of at least the desired count it had.
#[derive(Debug, Clone)]
pub struct Stabilize<P> {
    inner: P,
    up: Duration,
    down: Duration,
    history: History,
    /// The desired count at the first decision, and when: it counts in the `down` window as
    /// a recommendation made at that time.
    started_at: Option<(Instant, u32)>,
}

impl<P> Stabilize<P> {
    /// Wraps `inner` with the two windows.
    pub fn new(inner: P, up: Duration, down: Duration) -> Self {
        Stabilize {
            inner,
            up,
            down,
            history: History::default(),
            started_at: None,
        }
    }
}

impl<P: ScalingPolicy> ScalingPolicy for Stabilize<P> {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let mut d = self.inner.decide(input);
        let now = input.now;
        let (started, at_start) = *self.started_at.get_or_insert((now, input.capacity.desired));
        let Some(obs) = input.observation else {
            return d;
        };
        let recommendation = d.desired;
        let keep = self.up.max(self.down);
        // A tick whose worker figures are unknown recommends at least what the target has: the
        // window must not forget busy workers it could not see.
        let remembered = if obs.workers_are_unknown() {
            recommendation.max(input.capacity.desired)
        } else {
            recommendation
        };
        self.history.record(now, remembered, keep);
        let within = |w: Duration| self.history.within(now, w);
        let up_rec = within(self.up).min().unwrap_or(recommendation);
        let fresh = !self.down.is_zero() && now.saturating_duration_since(started) <= self.down;
        let down_rec = within(self.down)
            .chain(fresh.then_some(at_start))
            .max()
            .unwrap_or(recommendation);
        let current = input.capacity.desired;
        let stabilized = current.max(up_rec).min(down_rec);
        let note = if stabilized > recommendation && fresh && down_rec == at_start {
            format!(
                "scale-in held at {stabilized}: a fresh loop counts the desired {at_start} at its \
                 start as recommended for the last {:?}",
                self.down
            )
        } else if stabilized > recommendation {
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
        // (Started at 2, below what it asks for: the start changes nothing here.)
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

    #[tokio::test(start_paused = true)]
    async fn a_fresh_layer_waits_the_whole_down_window_before_scaling_in() {
        let t0 = Instant::now();
        let obs = Observation::new(0, t0);
        let mut p = Stabilize::new(
            Scripted { next: 1 },
            Duration::ZERO,
            Duration::from_secs(30),
        );
        // Starts with the target at 8 and a recommendation of 1: held at 8 for 30 s.
        let d = p.decide(&input(&obs, 8, t0));
        assert_eq!(d.desired, 8);
        assert!(d.reason().contains("fresh loop"), "{}", d.reason());
        assert_eq!(
            p.decide(&input(&obs, 8, t0 + Duration::from_secs(30)))
                .desired,
            8
        );
        assert_eq!(
            p.decide(&input(&obs, 8, t0 + Duration::from_secs(31)))
                .desired,
            1
        );
        // A failed first tick starts the window too (and holds).
        let mut p = Stabilize::new(
            Scripted { next: 1 },
            Duration::ZERO,
            Duration::from_secs(30),
        );
        let failed = crate::policy::PolicyInput {
            observation: None,
            ..input(&obs, 8, t0)
        };
        assert_eq!(p.decide(&failed).desired, 8);
        assert_eq!(
            p.decide(&input(&obs, 8, t0 + Duration::from_secs(10)))
                .desired,
            8
        );
        assert_eq!(
            p.decide(&input(&obs, 8, t0 + Duration::from_secs(31)))
                .desired,
            1
        );
    }
}
