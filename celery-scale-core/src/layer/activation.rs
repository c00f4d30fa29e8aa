use std::time::Duration;

use tokio::time::Instant;

use crate::policy::{Decision, PolicyInput, ScalingPolicy};

/// Scale to and from zero deliberately: from zero only when at least `activate_at` messages are
/// outstanding, and to zero only once nothing has been outstanding or executing for `idle_for`
/// (until then at least one worker stays). The idle time counts from the first observation
/// that shows the queues idle with the worker figures known (or not watched): a fresh layer
/// (a start, a restart) waits the whole `idle_for` before it goes to zero.
#[derive(Debug, Clone)]
pub struct Activation<P> {
    inner: P,
    activate_at: u64,
    idle_for: Duration,
    idle_since: Option<Instant>,
}

impl<P> Activation<P> {
    /// Wraps `inner`. `activate_at` of 0 is treated as 1: zero messages never start a worker.
    pub fn new(inner: P, activate_at: u64, idle_for: Duration) -> Self {
        Activation {
            inner,
            activate_at: activate_at.max(1),
            idle_for,
            idle_since: None,
        }
    }
}

impl<P: ScalingPolicy> ScalingPolicy for Activation<P> {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let mut d = self.inner.decide(input);
        let Some(obs) = input.observation else {
            return d;
        };
        let outstanding = obs.outstanding();
        // Unknown worker figures are never idle: a silent worker may be running a task.
        let idle = outstanding == 0 && obs.executing_at_least() == 0 && !obs.workers_are_unknown();
        if idle {
            self.idle_since.get_or_insert(input.now);
        } else {
            self.idle_since = None;
        }
        let current = input.capacity.desired;
        if current == 0 && d.desired > 0 && outstanding < self.activate_at {
            d.push(
                "activation",
                0,
                format!(
                    "stay at zero: {outstanding} outstanding is below activation {}",
                    self.activate_at
                ),
            );
        } else if current > 0 && d.desired == 0 {
            let idle_long_enough = self
                .idle_since
                .is_some_and(|since| input.now.saturating_duration_since(since) >= self.idle_for);
            if !idle_long_enough {
                d.push(
                    "activation",
                    1,
                    format!("keep one worker until idle for {:?}", self.idle_for),
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

    #[tokio::test(start_paused = true)]
    async fn activation_threshold_and_idle_window() {
        let t0 = Instant::now();
        let mut p = Activation::new(Scripted { next: 1 }, 3, Duration::from_secs(60));
        let obs = Observation::new(2, t0);
        assert_eq!(p.decide(&input(&obs, 0, t0)).desired, 0, "2 < activation 3");
        let obs = Observation::new(3, t0);
        assert_eq!(p.decide(&input(&obs, 0, t0)).desired, 1);

        p.inner.next = 0;
        let idle = Observation::new(0, t0);
        assert_eq!(p.decide(&input(&idle, 1, t0)).desired, 1, "idle just began");
        let t1 = t0 + Duration::from_secs(59);
        assert_eq!(p.decide(&input(&idle, 1, t1)).desired, 1);
        let t2 = t0 + Duration::from_secs(60);
        assert_eq!(
            p.decide(&input(&idle, 1, t2)).desired,
            0,
            "idle for the window"
        );

        // Executing work is not idle even with empty queues.
        let mut busy = Observation::new(0, t2);
        busy.executing = Some(1);
        let mut p = Activation::new(Scripted { next: 0 }, 1, Duration::ZERO);
        assert_eq!(p.decide(&input(&busy, 1, t2)).desired, 1);
    }
}
