//! What users would run instead, modelled as [`ScalingPolicy`]s so the simulator runs them
//! through the same loop, fleet and bill as ours. Each keeps its own cadence from `now`.

use std::time::Duration;

use tokio::time::Instant;

use celery_scale_core::policy::{Decision, PolicyInput, ScalingPolicy};

mod aws;
mod judoscale;
mod keda;

pub use aws::AwsTargetTracking;
pub use judoscale::Judoscale;
pub use keda::Keda;

/// Whether a cadence of `every` is due at `now`, last run at `last`.
fn due(last: Option<Instant>, every: Duration, now: Instant) -> bool {
    last.is_none_or(|t| now.saturating_duration_since(t) >= every)
}

/// A fixed fleet of `workers` (sized for the trace's peak).
#[derive(Debug, Clone)]
pub struct Fixed(pub u32);

impl ScalingPolicy for Fixed {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        Decision::new(
            "static",
            input.capacity.desired,
            self.0,
            format!("fixed at {}", self.0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_scale_core::{Capacity, Observation};

    /// Decides every second from `start` workers (running at once) for `until_s` seconds, with
    /// `ready(s)` ready messages whose oldest is `age(s)` old; returns (second, new desired) at
    /// every change.
    fn run_from(
        p: &mut dyn ScalingPolicy,
        start: u32,
        ready: impl Fn(u64) -> u64,
        age: impl Fn(u64) -> Option<Duration>,
        until_s: u64,
    ) -> Vec<(u64, u32)> {
        let t0 = Instant::now();
        let mut current = start;
        let mut changes = Vec::new();
        for s in 0..until_s {
            let now = t0 + Duration::from_secs(s);
            let mut obs = Observation::new(ready(s), now);
            obs.oldest_age = age(s);
            let d = p.decide(&PolicyInput {
                observation: Some(&obs),
                consecutive_failures: 0,
                capacity: Capacity {
                    desired: current,
                    running: current,
                    pending: 0,
                },
                now,
                wall: std::time::SystemTime::UNIX_EPOCH,
            });
            if d.desired != current {
                changes.push((s, d.desired));
                current = d.desired;
            }
        }
        changes
    }

    fn run(p: &mut dyn ScalingPolicy, ready: impl Fn(u64) -> u64, until_s: u64) -> Vec<(u64, u32)> {
        run_from(p, 0, ready, |_| None, until_s)
    }

    #[test]
    fn aws_scales_out_no_sooner_than_three_minutes_after_a_step() {
        let mut p = AwsTargetTracking::new(5.0, 1, 100);
        // A step of 100 ready messages at t = 0 that stays.
        let changes = run(&mut p, |_| 100, 600);
        assert_eq!(changes[0], (0, 1), "raised to the minimum of 1");
        let first_out = changes.iter().find(|c| c.1 > 1).unwrap();
        assert_eq!(
            *first_out,
            (120, 20),
            "third 1-minute datapoint at 120 s, proportional 1 x 100 / 5"
        );
        assert_eq!(changes.len(), 2, "on target afterwards: {changes:?}");
    }

    #[test]
    fn aws_allows_a_larger_scale_out_during_the_cooldown() {
        // 100 ready until 150 s, then 1000: at 180 s the alarm still breaches (100, 100, 50 per
        // task) and the proportional capacity (20 x 50 / 5 = 200, capped 100) exceeds the 20
        // that started the cooldown at 120 s: raised within the cooldown.
        let mut p = AwsTargetTracking::new(5.0, 1, 100);
        let changes = run(&mut p, |s| if s < 150 { 100 } else { 1000 }, 400);
        assert_eq!(changes, [(0, 1), (120, 20), (180, 100)]);
        // A slightly larger one adds the difference: 105 / 20 per task -> ceil(21).
        let mut p = AwsTargetTracking::new(5.0, 1, 100);
        let changes = run(&mut p, |s| if s < 150 { 100 } else { 105 }, 400);
        assert_eq!(changes, [(0, 1), (120, 20), (180, 21)]);
    }

    #[test]
    fn aws_high_resolution_scales_out_at_the_third_10_s_datapoint() {
        let mut p = AwsTargetTracking::high_resolution(5.0, 1, 100);
        let changes = run(&mut p, |_| 100, 300);
        assert_eq!(changes[..2], [(0, 1), (20, 20)]);
        // Scale-in: 15 datapoints below 90% of the target (140 s at 10 s), after the 300 s
        // cooldown of the scale-out at 20 s.
        let mut p = AwsTargetTracking::high_resolution(5.0, 1, 100);
        let changes = run(&mut p, |s| if s < 30 { 100 } else { 0 }, 600);
        assert_eq!(changes, [(0, 1), (20, 20), (320, 1)]);
    }

    #[test]
    fn aws_per_running_task_overshoots_while_tasks_start_per_desired_task_does_not() {
        // 100 ready messages that stay; new tasks run 60 s after they are asked for. Per running
        // task the metric stays high while the 20 start, so the next alarms raise to the
        // maximum; per desired task it is on target once 20 are asked for.
        let t0 = Instant::now();
        let mut out = Vec::new();
        for mut p in [
            AwsTargetTracking::high_resolution(5.0, 1, 100),
            AwsTargetTracking::high_resolution(5.0, 1, 100).per_desired_task(),
        ] {
            let mut asked: Vec<(u64, u32)> = vec![(0, 0)];
            let mut peak = 0;
            for s in 0..120u64 {
                let now = t0 + Duration::from_secs(s);
                let desired = asked.last().unwrap().1;
                let running = asked
                    .iter()
                    .rev()
                    .find(|(at, _)| at + 60 <= s)
                    .map_or(0, |a| a.1);
                let obs = Observation::new(100, now);
                let d = p.decide(&PolicyInput {
                    observation: Some(&obs),
                    consecutive_failures: 0,
                    capacity: Capacity {
                        desired,
                        running,
                        pending: desired.saturating_sub(running),
                    },
                    now,
                    wall: std::time::SystemTime::UNIX_EPOCH,
                });
                if d.desired != desired {
                    asked.push((s, d.desired));
                }
                peak = peak.max(d.desired);
            }
            out.push(peak);
        }
        assert_eq!(out, [100, 20]);
    }

    #[test]
    fn keda_scales_in_no_sooner_than_300_s_after_load_ends() {
        let mut p = Keda::new(5.0, 0, 100);
        // 50 ready until just after the poll at 600 s (the last poll that sees load), then none.
        let changes = run(&mut p, |s| if s <= 600 { 50 } else { 0 }, 1500);
        assert_eq!(changes[0], (0, 1), "activation at the first poll");
        let peak = changes.iter().map(|c| c.1).max().unwrap();
        assert_eq!(peak, 10, "50 / 5");
        let first_in = changes.iter().find(|c| c.0 > 600 && c.1 < peak).unwrap();
        assert!(first_in.0 >= 600 + 300, "scale-in at {first_in:?}");
        assert_eq!(changes.last().unwrap().1, 0, "to zero after the cooldown");
    }

    #[test]
    fn keda_doubles_at_every_hpa_sync() {
        // 500 ready from the start, target 5: 100 workers. The previous sync's scale-up event,
        // exactly 15 s old, no longer counts, so each sync may double (or add 4).
        let mut p = Keda::new(5.0, 0, 100);
        let changes = run(&mut p, |_| 500, 200);
        assert_eq!(
            changes,
            [
                (0, 1),
                (15, 5),
                (30, 10),
                (45, 20),
                (60, 40),
                (75, 80),
                (90, 100)
            ]
        );
        // From 5 to 100 in 75 s (the model took 155 s).
    }

    #[test]
    fn keda_uncached_reads_the_scaler_at_every_sync_cached_at_every_poll() {
        // One worker (min 1); 100 ready from 1 s on, after the first poll saw none.
        let load = |s: u64| if s >= 1 { 100 } else { 0 };
        let first_up = |p: &mut Keda| {
            run_from(p, 1, load, |_| None, 120)
                .into_iter()
                .find(|c| c.1 > 1)
                .unwrap()
        };
        assert_eq!(first_up(&mut Keda::new(5.0, 1, 100)), (15, 5), "next sync");
        assert_eq!(
            first_up(&mut Keda::cached(5.0, 1, 100)),
            (30, 5),
            "next poll"
        );
    }

    #[test]
    fn judoscale_adds_one_worker_a_minute_and_removes_one_every_ten_minutes() {
        let mut p = Judoscale::new(Duration::from_secs(10), Duration::from_secs(5), 0, 100);
        // A backlog whose oldest job is 30 s old for 200 s, then an empty queue.
        let ready = |s: u64| if s < 200 { 50 } else { 0 };
        let age = |s: u64| (s < 200).then_some(Duration::from_secs(30));
        let changes = run_from(&mut p, 0, ready, age, 1500);
        assert_eq!(
            changes,
            [(0, 1), (60, 2), (120, 3), (180, 4), (800, 3), (1400, 2)],
            "reports every 10 s; +1 per minute; below the range from 200 s, -1 after 10 minutes and every 10 minutes"
        );
    }

    #[test]
    fn judoscale_holds_when_the_latency_is_unknown() {
        let mut p = Judoscale::new(Duration::from_secs(10), Duration::from_secs(5), 0, 100);
        let changes = run_from(&mut p, 2, |_| 50, |_| None, 1200);
        assert!(changes.is_empty(), "{changes:?}");
    }
}
