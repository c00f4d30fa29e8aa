use std::time::Duration;

use tokio::time::Instant;

use crate::policy::{Decision, PolicyInput, ScalingPolicy};

/// Scale to and from zero deliberately: from zero only when at least `activate_at` messages are
/// outstanding, and to zero only once nothing has been outstanding or executing for `idle_for`
/// (until then at least one worker stays). The idle time counts from the first observation
/// that shows the queues idle with the worker figures known (or not watched): a fresh layer
/// (a start, a restart) waits the whole `idle_for` before it goes to zero.
///
/// Idle also needs the held (in-flight) count known, or no consumer connected: a source that
/// cannot count unacknowledged messages (Redis with `in_flight = off`, RabbitMQ without the
/// management API) cannot tell a worker holding countdown/ETA tasks from an idle one, so with
/// workers connected the fleet keeps one worker rather than stop the last holder (its warm
/// shutdown would hand the held tasks back to the broker, and the loop start a worker again).
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
        // An unknown held count is not zero while a consumer may hold messages.
        let held_known = obs.in_flight.is_some() || obs.consumers == Some(0);
        // Unknown worker figures are never idle: a silent worker may be running a task.
        let idle = outstanding == 0
            && obs.executing_at_least() == 0
            && !obs.workers_are_unknown()
            && held_known;
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
                let note = if held_known {
                    format!("keep one worker until idle for {:?}", self.idle_for)
                } else {
                    let connected = obs.consumers.map_or_else(
                        || "consumers unknown".to_string(),
                        |n| format!("{n} consumer(s) connected"),
                    );
                    format!(
                        "keep one worker: held count unknown ({connected}), a worker may hold \
                         countdown/ETA tasks; scale to zero waits for a known held count"
                    )
                };
                d.push("activation", 1, note);
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
        let mut idle = Observation::new(0, t0);
        idle.in_flight = Some(0);
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

    #[tokio::test(start_paused = true)]
    async fn an_unknown_held_count_is_idle_only_with_no_consumer() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(600);
        let mut unknown = Observation::new(0, t0);
        unknown.executing = Some(0);
        assert_eq!(unknown.in_flight, None);
        for consumers in [None, Some(2)] {
            unknown.consumers = consumers;
            let mut p = Activation::new(Scripted { next: 0 }, 1, Duration::ZERO);
            p.decide(&input(&unknown, 1, t0));
            let d = p.decide(&input(&unknown, 1, later));
            assert_eq!(d.desired, 1, "{consumers:?}: {d:?}");
            assert!(d.reason().contains("held count unknown"), "{}", d.reason());
        }
        // Nobody connected: nobody holds anything.
        unknown.consumers = Some(0);
        let mut p = Activation::new(Scripted { next: 0 }, 1, Duration::ZERO);
        assert_eq!(p.decide(&input(&unknown, 1, t0)).desired, 0);
    }
}
