use crate::ConfigError;
use crate::policy::{Decision, PolicyInput, ScalingPolicy};

/// Never fewer workers than the tasks executing now, nor than the workers needed to hold the
/// in-flight (prefetched, ETA) messages at `held_per_worker` each: scaling below that would stop
/// workers that are doing or holding work.
///
/// The floor is at most the current desired count: when more tasks execute than that, the extra
/// ones run on workers already being stopped (a warm shutdown finishes its tasks), and raising the
/// count again would start replacements instead of keeping them.
#[derive(Debug, Clone)]
pub struct InFlightFloor<P> {
    inner: P,
    held_per_worker: u32,
}

impl<P> InFlightFloor<P> {
    /// Wraps `inner`; `held_per_worker` is Celery's `worker_prefetch_multiplier` (default 4).
    pub fn new(inner: P, held_per_worker: u32) -> Result<Self, ConfigError> {
        if held_per_worker == 0 {
            return Err(ConfigError::new("held_per_worker", "must be at least 1"));
        }
        Ok(InFlightFloor {
            inner,
            held_per_worker,
        })
    }
}

impl<P: ScalingPolicy> ScalingPolicy for InFlightFloor<P> {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let mut d = self.inner.decide(input);
        let Some(obs) = input.observation else {
            return d;
        };
        let executing = obs.executing.unwrap_or(0);
        let holding = obs
            .in_flight
            .unwrap_or(0)
            .div_ceil(u64::from(self.held_per_worker));
        let floor = executing
            .max(holding)
            .min(u64::from(input.capacity.desired)) as u32;
        if d.desired < floor {
            d.push(
                "in_flight_floor",
                floor,
                format!(
                    "keep {floor}: {executing} executing, {} in flight at {} per worker",
                    obs.in_flight.unwrap_or(0),
                    self.held_per_worker
                ),
            );
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

    #[test]
    fn floor_from_executing_and_held() {
        let now = Instant::now();
        let mut obs = Observation::new(0, now);
        obs.executing = Some(3);
        obs.in_flight = Some(17);
        let mut p = InFlightFloor::new(Scripted { next: 0 }, 4).unwrap();
        assert_eq!(
            p.decide(&input(&obs, 9, now)).desired,
            5,
            "ceil(17/4) = 5 > 3"
        );
        obs.in_flight = Some(0);
        assert_eq!(p.decide(&input(&obs, 9, now)).desired, 3);
        // Already scaled in to 2 while 3 execute: the third worker is leaving; keep 2.
        assert_eq!(p.decide(&input(&obs, 2, now)).desired, 2);
        assert!(InFlightFloor::new(Scripted::default(), 0).is_err());
    }
}
