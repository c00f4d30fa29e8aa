use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::policy::{Decision, PolicyInput, ScalingPolicy, kept_workers};

/// Start-up samples kept for the median.
const SAMPLES: usize = 5;

/// Buys a new worker only for work that outlasts its start-up: a scale-out is cut to the
/// workers the waiting work can keep busy for at least one start-up each, beyond what the
/// workers already paid for (running or starting) can do within one start-up. A worker bills
/// its start-up whatever it then does; one started for less work than that costs more than
/// waiting for the workers already there (the rent-or-buy rule).
///
/// With `S` the start-up and `T` the mean task time (one over the throughput per worker
/// process that heartbeats measure), the waiting work is `(ready + held) x T`; the idle workers
/// (kept, less the executing tasks) can do `idle x S` of it within a start-up, while the busy
/// ones keep up with the arrivals that keep them busy. New workers beyond those kept are at most
/// `ceil((waiting work - idle x S) / S)`. The layer only lowers a scale-out, never below the
/// current desired count, and never touches a scale-in.
///
/// **Unknown is never zero.** Without a start-up (configured, or measured from the target: the
/// time from a scale-out to the running count reaching it), without a task time ever measured,
/// or without the held count, it does nothing: the inner policy's scale-out stands. A task time
/// once measured is remembered while no worker runs (so a burst after an idle period is judged
/// on the last tasks seen).
#[derive(Debug, Clone)]
pub struct RentOrBuy<P> {
    inner: P,
    configured_startup: Option<Duration>,
    /// Scale-outs not yet running: (when, the desired count before, the count asked).
    raises: VecDeque<(Instant, u32, u32)>,
    samples: VecDeque<Duration>,
    task_time_s: Option<f64>,
}

impl<P> RentOrBuy<P> {
    /// Wraps `inner`; the start-up is `startup` when given, else measured from the target.
    pub fn new(inner: P, startup: Option<Duration>) -> Self {
        RentOrBuy {
            inner,
            configured_startup: startup.filter(|s| !s.is_zero()),
            raises: VecDeque::new(),
            samples: VecDeque::new(),
            task_time_s: None,
        }
    }

    /// The start-up in use: configured, else the median of the last measured ones.
    pub fn startup(&self) -> Option<Duration> {
        self.configured_startup.or_else(|| {
            let mut s: Vec<Duration> = self.samples.iter().copied().collect();
            s.sort_unstable();
            s.get(s.len() / 2).copied()
        })
    }

    /// Notes how long earlier scale-outs took to run.
    fn measure(&mut self, input: &PolicyInput<'_>) {
        let running = input.capacity.running;
        while let Some(&(at, from, asked)) = self.raises.front() {
            // The outer layers may have cut the count asked (bounds, step limits).
            let level = asked.min(input.capacity.desired);
            if level <= from {
                // Never raised, or scaled in before it ran: no sample.
                self.raises.pop_front();
            } else if running >= level {
                self.raises.pop_front();
                self.samples
                    .push_back(input.now.saturating_duration_since(at));
                if self.samples.len() > SAMPLES {
                    self.samples.pop_front();
                }
            } else {
                break;
            }
        }
    }
}

impl<P: ScalingPolicy> ScalingPolicy for RentOrBuy<P> {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        self.measure(input);
        let mut d = self.inner.decide(input);
        let current = input.capacity.desired;
        let Some(obs) = input.observation else {
            return d;
        };
        if let Some(t) = obs.throughput_per_worker
            && t.is_finite()
            && t > 0.0
        {
            self.task_time_s = Some(1.0 / t);
        }
        if d.desired > current
            && let (Some(startup), Some(task_s), Some(held)) =
                (self.startup(), self.task_time_s, obs.in_flight)
        {
            let s = startup.as_secs_f64();
            let kept = kept_workers(input);
            let idle = kept.saturating_sub(obs.executing_at_least().min(kept));
            let waiting = obs.ready.saturating_add(held);
            let work = waiting as f64 * task_s;
            let left = (work - idle as f64 * s).max(0.0);
            let new = (left / s).ceil();
            let cap = (kept as f64 + new).min(f64::from(u32::MAX)) as u32;
            let to = d.desired.min(cap.max(current));
            if to < d.desired {
                d.push(
                    "rent_or_buy",
                    to,
                    format!(
                        "{waiting} waiting x {task_s:.1}s = {work:.0}s of work, {idle} idle of \
                         {kept} kept do {:.0}s within a {s:.0}s start-up: {new} new worker(s) \
                         would each work a start-up",
                        idle as f64 * s
                    ),
                );
            }
        }
        if d.desired > current {
            self.raises.push_back((input.now, current, d.desired));
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::testing::{Scripted, input};
    use crate::{Capacity, Observation};

    fn obs(ready: u64, held: u64, executing: u64, task_s: f64, at: Instant) -> Observation {
        let mut o = Observation::new(ready, at);
        o.in_flight = Some(held);
        o.executing = Some(executing);
        o.throughput_per_worker = Some(1.0 / task_s);
        o
    }

    #[test]
    fn short_tasks_buy_only_the_workers_they_keep_busy() {
        let now = Instant::now();
        let mut p = RentOrBuy::new(Scripted { next: 100 }, Some(Duration::from_secs(60)));
        // 1000 one-second tasks, nobody running: 1000 s of work = 17 workers of a start-up each.
        let o = obs(1000, 0, 0, 1.0, now);
        let d = p.decide(&input(&o, 0, now));
        assert_eq!(d.desired, 17, "{}", d.reason());
        // Ten-second tasks: 10 000 s of work, the scale-out stands.
        let o = obs(1000, 0, 0, 10.0, now);
        assert_eq!(p.decide(&input(&o, 0, now)).desired, 100);
        // 10 idle workers do 600 s within a start-up: 400 s left, 7 more.
        let o = obs(1000, 0, 0, 1.0, now);
        assert_eq!(p.decide(&input(&o, 10, now)).desired, 17);
        let o = obs(500, 0, 0, 1.0, now);
        assert_eq!(
            p.decide(&input(&o, 10, now)).desired,
            10,
            "never below the current count"
        );
    }

    #[test]
    fn unknown_task_time_startup_or_held_count_leaves_the_scale_out() {
        let now = Instant::now();
        let mut p = RentOrBuy::new(Scripted { next: 100 }, Some(Duration::from_secs(60)));
        let mut o = obs(1000, 0, 0, 1.0, now);
        o.throughput_per_worker = None;
        assert_eq!(p.decide(&input(&o, 0, now)).desired, 100, "never measured");
        let mut o = obs(1000, 0, 0, 1.0, now);
        o.in_flight = None;
        assert_eq!(p.decide(&input(&o, 0, now)).desired, 100, "held unknown");
        // Measured once, remembered while no worker runs.
        p.decide(&input(&obs(0, 0, 0, 1.0, now), 0, now));
        let mut o = obs(1000, 0, 0, 1.0, now);
        o.throughput_per_worker = None;
        assert_eq!(p.decide(&input(&o, 0, now)).desired, 17);
        // No start-up configured and none measured yet.
        let mut p = RentOrBuy::new(Scripted { next: 100 }, None);
        assert_eq!(p.startup(), None);
        assert_eq!(
            p.decide(&input(&obs(1000, 0, 0, 1.0, now), 0, now)).desired,
            100
        );
    }

    #[test]
    fn the_startup_is_measured_from_scale_out_to_running() {
        let t0 = Instant::now();
        let mut p = RentOrBuy::new(Scripted { next: 100 }, None);
        let o = obs(1000, 0, 0, 1.0, t0);
        assert_eq!(p.decide(&input(&o, 0, t0)).desired, 100);
        let starting = |running, at| PolicyInput {
            capacity: Capacity {
                desired: 100,
                running,
                pending: 100 - running,
            },
            ..input(&o, 100, at)
        };
        p.decide(&starting(0, t0 + Duration::from_secs(30)));
        assert_eq!(p.startup(), None, "not running yet");
        p.decide(&starting(100, t0 + Duration::from_secs(45)));
        assert_eq!(p.startup(), Some(Duration::from_secs(45)));
        // Next burst from zero: judged with the measured 45 s.
        p.inner.next = 100;
        let d = p.decide(&input(
            &obs(900, 0, 0, 1.0, t0),
            0,
            t0 + Duration::from_secs(600),
        ));
        assert_eq!(d.desired, 20, "900 s / 45 s");
    }
}
