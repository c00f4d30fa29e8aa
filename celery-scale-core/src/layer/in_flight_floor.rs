use crate::ConfigError;
use crate::policy::{Decision, PolicyInput, ScalingPolicy, kept_workers, unknown_workers_floor};

/// Never fewer workers than the tasks executing now, nor than the workers needed to hold the
/// in-flight (prefetched, ETA) messages at `held_per_worker` each: scaling below that would stop
/// workers that are doing or holding work.
///
/// Executing tasks count up to the workers the target keeps (the larger of its desired and
/// running counts): tasks beyond that run on workers already being stopped (a warm shutdown
/// finishes its tasks; Celery reports the worker offline when it begins, but the event may not
/// be read yet), and raising the count for them would start replacements instead of keeping
/// them. Held messages always count: a worker must be up to hold or restore them.
///
/// While the worker figures are unknown (the feed is down or warming up, a worker is silent)
/// every running worker may be busy: the floor is then at least the running workers, up to the
/// current desired count (the same floor the loop's guard enforces, applied here so that the
/// layers outside, such as stabilization, remember it).
///
/// While the held count is unknown (`in_flight` is `None`: Redis with `in_flight = off`,
/// RabbitMQ without the management API) the floor rests on the executing tasks alone, and the
/// reason says "held count unknown". That loses no work, because of what a held message can be:
/// - a prefetched message waits in a worker only while every pool process of that worker is
///   busy (a free process takes it at once), so its worker runs as many executing tasks as it
///   has processes, and the executing floor keeps those workers;
/// - a countdown/ETA task may be held by an idle worker, which the floor does not keep; but a
///   worker stopped by a scale-in shuts down warm and hands its held messages back to the
///   broker: on Redis kombu's virtual `Channel.close` calls `QoS.restore_unacked_once`
///   (`restore_at_shutdown = True`), which puts every unacknowledged message back in its list
///   (`kombu/transport/virtual/base.py`, `kombu/transport/redis.py`); on RabbitMQ the broker
///   requeues every unacknowledged delivery when the worker's channel closes. Back in the queue
///   they count as ready, and the remaining workers take them (or the backlog scales out).
///
/// What the held count adds when known is the workers needed to keep the messages where they
/// are; [`Activation`](crate::layer::Activation) still never goes to zero on an unknown held
/// count while a consumer is connected.
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
        // While the worker figures are unknown, the tasks last heard count (the loop's guard
        // also keeps every running worker then, see `decide_guarded`).
        let executing = obs.executing_at_least();
        let holding = obs
            .in_flight
            .unwrap_or(0)
            .div_ceil(u64::from(self.held_per_worker));
        let kept = kept_workers(input);
        let known_floor = u32::try_from(executing.min(kept).max(holding)).unwrap_or(u32::MAX);
        if let Some((floor, why)) = unknown_workers_floor(obs, input)
            && d.desired < floor
            && known_floor <= floor
        {
            d.push(
                "in_flight_floor",
                floor,
                format!(
                    "keep {floor}: worker figures unknown ({why}), every running worker may be busy"
                ),
            );
            return d;
        }
        let floor = known_floor;
        if d.desired < floor {
            let held = match obs.in_flight {
                Some(n) => format!("{n} in flight at {} per worker", self.held_per_worker),
                None => "held count unknown (the floor rests on the executing tasks)".to_string(),
            };
            d.push(
                "in_flight_floor",
                floor,
                format!(
                    "keep {floor}: {executing} executing (counted up to the {kept} workers kept), \
                     {held}"
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
        // Held messages still count in full: a worker must be up to hold (or restore) them.
        obs.in_flight = Some(17);
        assert_eq!(p.decide(&input(&obs, 2, now)).desired, 5);
        obs.in_flight = Some(0);
        // Scale-in protection keeps 3 busy workers running at desired 1: all 3 count.
        let protected = PolicyInput {
            capacity: crate::Capacity {
                desired: 1,
                running: 3,
                pending: 0,
            },
            ..input(&obs, 1, now)
        };
        assert_eq!(p.decide(&protected).desired, 3);
        assert!(InFlightFloor::new(Scripted::default(), 0).is_err());
    }

    #[test]
    fn an_unknown_held_count_rests_on_the_executing_tasks_and_says_so() {
        let now = Instant::now();
        let mut obs = Observation::new(0, now);
        obs.executing = Some(3);
        let mut p = InFlightFloor::new(Scripted { next: 0 }, 4).unwrap();
        let d = p.decide(&input(&obs, 9, now));
        assert_eq!(d.desired, 3);
        assert!(d.reason().contains("held count unknown"), "{}", d.reason());
        obs.in_flight = Some(4);
        let d = p.decide(&input(&obs, 9, now));
        assert!(
            d.reason().contains("4 in flight at 4 per worker"),
            "{}",
            d.reason()
        );
    }
}
