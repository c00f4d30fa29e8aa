use std::time::Duration;

use crate::ConfigError;
use crate::policy::{Decision, PolicyInput, ScalingPolicy, kept_workers, tasks_per_worker_within};

/// Enough workers that every waiting task starts within `target_wait`: the workers busy now,
/// plus `waiting / max(1, throughput x target_wait)` more, where waiting means ready messages
/// (messages prefetched by a busy worker cannot move to a new one).
///
/// Throughput (tasks per second one worker process completes) is taken from the observation
/// when the source measured it (Celery worker heartbeats), and from the configured value
/// otherwise. Busy workers are the executing tasks from heartbeats, at most the workers the
/// target keeps (the larger of its desired and running counts). Celery reports a worker offline
/// when its warm shutdown begins, so the tasks it is finishing leave the count at once; the cap
/// covers the seconds before that event is read and a worker stopped without one, whose tasks
/// would otherwise ask for their own replacements. Workers kept by scale-in protection still
/// count as running, so their tasks count. Without heartbeats every outstanding message (ready
/// and in flight) counts as waiting, which errs towards more capacity.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainTime {
    target_wait: Duration,
    throughput_per_worker: f64,
    use_measured: bool,
}

impl DrainTime {
    /// Drain within `target_wait` (> 0) at a configured `throughput_per_worker` (tasks/s, > 0),
    /// preferring a measured throughput when the observation has one.
    pub fn new(target_wait: Duration, throughput_per_worker: f64) -> Result<Self, ConfigError> {
        if target_wait.is_zero() {
            return Err(ConfigError::new("target_wait", "must be greater than 0s"));
        }
        if !(throughput_per_worker.is_finite() && throughput_per_worker > 0.0) {
            return Err(ConfigError::new(
                "throughput_per_worker",
                format!("{throughput_per_worker} must be a positive number of tasks per second"),
            ));
        }
        Ok(DrainTime {
            target_wait,
            throughput_per_worker,
            use_measured: true,
        })
    }

    /// Ignore measured throughput and always use the configured one.
    pub fn configured_throughput_only(mut self) -> Self {
        self.use_measured = false;
        self
    }
}

impl ScalingPolicy for DrainTime {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let Some(obs) = input.observation else {
            return Decision::hold("drain_time", input);
        };
        let (throughput, source) = match obs.throughput_per_worker {
            Some(t) if self.use_measured && t.is_finite() && t > 0.0 => (t, "measured"),
            _ => (self.throughput_per_worker, "configured"),
        };
        // With heartbeats, the executing tasks are the busy workers and only ready messages can
        // use new workers: messages a busy worker has prefetched wait for that worker whatever
        // the fleet size (and keep it alive through the in-flight floor). Without heartbeats the
        // busy workers are unknown, so every outstanding message counts as waiting.
        let (busy, waiting) = match obs.executing {
            Some(executing) => (executing.min(kept_workers(input)), obs.ready),
            None => (0, obs.outstanding()),
        };
        let per_worker = tasks_per_worker_within(throughput, self.target_wait.as_secs_f64());
        let extra = (waiting as f64 / per_worker).ceil();
        let desired = (busy as f64 + extra).min(u32::MAX as f64) as u32;
        Decision::new(
            "drain_time",
            input.capacity.desired,
            desired,
            format!(
                "{busy} busy + {waiting} waiting / {per_worker:.2} tasks per worker within {:?} \
                 ({source} throughput {throughput:.3}/s) = {desired} workers",
                self.target_wait
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Capacity, Observation};
    use tokio::time::Instant;

    fn decide_at(p: &mut DrainTime, obs: &Observation, current: u32) -> u32 {
        p.decide(&PolicyInput {
            observation: Some(obs),
            consecutive_failures: 0,
            capacity: Capacity {
                desired: current,
                running: current,
                pending: 0,
            },
            now: obs.at,
            wall: std::time::SystemTime::UNIX_EPOCH,
        })
        .desired
    }

    fn decide(p: &mut DrainTime, obs: &Observation) -> u32 {
        decide_at(p, obs, 100)
    }

    #[test]
    fn tasks_of_workers_being_stopped_do_not_ask_for_replacements() {
        let now = Instant::now();
        let mut p = DrainTime::new(Duration::from_secs(30), 1.0 / 600.0).unwrap();
        let mut obs = Observation::new(0, now);
        // Scaled in from 10 to 9: the stopped worker finishes its task, so 10 still execute.
        obs.executing = Some(10);
        assert_eq!(decide_at(&mut p, &obs, 9), 9, "not back to 10");
        // Waiting tasks still add workers on top of the busy ones we keep.
        obs.ready = 2;
        assert_eq!(decide_at(&mut p, &obs, 9), 11);
        // With desired at 10 or more, every executing task counts.
        assert_eq!(decide_at(&mut p, &obs, 12), 12);
        // Scale-in protection keeps 10 busy workers running at a desired count of 5: their
        // tasks count, so the 2 waiting tasks get workers of their own.
        let protected = p.decide(&PolicyInput {
            observation: Some(&obs),
            consecutive_failures: 0,
            capacity: Capacity {
                desired: 5,
                running: 10,
                pending: 0,
            },
            now: obs.at,
            wall: std::time::SystemTime::UNIX_EPOCH,
        });
        assert_eq!(protected.desired, 12);
    }

    #[test]
    fn short_tasks_share_workers_long_tasks_do_not() {
        let now = Instant::now();
        let mut p = DrainTime::new(Duration::from_secs(30), 1.0).unwrap();
        let mut obs = Observation::new(300, now);
        obs.executing = Some(4);
        // 300 waiting / 30 per worker + 4 busy.
        assert_eq!(decide(&mut p, &obs), 14);
        // Prefetched messages held by the busy workers do not call for new workers.
        let mut held = obs.clone();
        held.in_flight = Some(16);
        assert_eq!(decide(&mut p, &held), 14);
        // Without heartbeats every outstanding message counts as waiting.
        held.executing = None;
        assert_eq!(decide(&mut p, &held), 11, "(300 + 16) / 30 rounded up");
        // 10-minute tasks: nobody frees up within 30 s, one worker per waiting task.
        let mut p = DrainTime::new(Duration::from_secs(30), 1.0 / 600.0).unwrap();
        assert_eq!(decide(&mut p, &obs), 304);
    }

    #[test]
    fn measured_throughput_wins_unless_disabled() {
        let now = Instant::now();
        let mut obs = Observation::new(60, now);
        obs.throughput_per_worker = Some(2.0);
        let mut p = DrainTime::new(Duration::from_secs(30), 0.5).unwrap();
        assert_eq!(decide(&mut p, &obs), 1);
        let mut p = p.configured_throughput_only();
        assert_eq!(decide(&mut p, &obs), 4);
    }

    #[test]
    fn rejects_bad_parameters_naming_the_field() {
        assert_eq!(
            DrainTime::new(Duration::ZERO, 1.0).unwrap_err().field,
            "target_wait"
        );
        assert_eq!(
            DrainTime::new(Duration::from_secs(1), f64::NAN)
                .unwrap_err()
                .field,
            "throughput_per_worker"
        );
    }
}
