//! What a trace costs at the least: the busy bound (the work alone), and a start-up-aware
//! reference, the cost of a clairvoyant schedule that pays for start-ups.
//!
//! The busy bound ignores start-up: a fleet that launched each worker the instant a task needed
//! it, at no cost, and stopped it the instant the task ended would cost exactly the busy time.
//! No fleet does that when a start-up is billed, and where bursts are short the gap is large.
//!
//! [`startup_bound`] plans, knowing every arrival and duration in advance, a schedule in which
//! every task starts within `max_wait` of its arrival (one task per worker process at a time,
//! as the simulator's world, without prefetch), and returns what it bills:
//!
//! - every worker process pays one `startup` when it is launched (the clairvoyant schedule
//!   launches it `startup` ahead, so that it is ready when its first task may start);
//! - between two tasks a worker either stays (billed idle) or stops and is launched again (one
//!   more start-up), whichever is cheaper: a gap `g` costs `min(g, startup)`;
//! - a worker stops the instant its last task ends.
//!
//! Tasks are taken in arrival order. Each goes to the worker that frees up soonest after the
//! arrival and no later than `arrival + max_wait` (it waits for it: no idle time, no
//! start-up); failing that, to the worker that has been idle the shortest (no wait); failing
//! that, to a new worker. So the schedule keeps every task within the wait and adds a worker
//! only when none can serve it in time.
//!
//! This is a schedule that exists, not a proof of optimality: a cleverer clairvoyant could pack
//! the work tighter, and a policy that lets tasks wait longer than `max_wait` may cost less. It
//! answers "how far is a run from a fleet that knows the future and keeps every wait under a
//! start-up", which is what the report's `xSB` column shows.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::Trace;

/// The busy bound: the sum of task durations, in worker-seconds.
pub fn busy_bound(trace: &Trace) -> f64 {
    trace.busy_time().as_secs_f64()
}

/// Milliseconds, for ordering worker free times exactly.
fn ms(s: f64) -> u64 {
    (s * 1000.0).round().max(0.0) as u64
}

/// The worker-seconds of the clairvoyant schedule described in the module docs: every task
/// starts within `max_wait` of its arrival, every worker pays `startup` once, and an idle gap
/// costs at most a start-up. At least [`busy_bound`] + `startup` for a non-empty trace.
pub fn startup_bound(trace: &Trace, startup: Duration, max_wait: Duration) -> f64 {
    let startup = startup.as_secs_f64();
    let wait = ms(max_wait.as_secs_f64());
    // (free at, in ms; worker index).
    let mut free: BTreeSet<(u64, usize)> = BTreeSet::new();
    let mut workers = 0usize;
    let mut cost = 0.0;
    for a in trace.arrivals() {
        let at = ms(a.at.as_secs_f64());
        let d = a.duration.as_secs_f64();
        for _ in 0..a.count {
            // Soonest to free up after the arrival, within the wait: the task waits for it.
            let busy = if wait == 0 {
                None
            } else {
                free.range((at + 1, 0)..=(at + wait, usize::MAX))
                    .next()
                    .copied()
            };
            // Else the shortest idle one: the task starts at once, the gap is billed.
            let idle = free.range(..(at + 1, 0)).next_back().copied();
            let (start, key) = match (busy, idle) {
                (Some(k), _) => (k.0, k),
                (None, Some(k)) => {
                    let gap = (at - k.0) as f64 / 1000.0;
                    cost += gap.min(startup);
                    (at, k)
                }
                (None, None) => {
                    workers += 1;
                    cost += startup;
                    (at, (0, workers - 1))
                }
            };
            free.remove(&key);
            cost += d;
            free.insert((start + ms(d), key.1));
        }
    }
    cost
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Arrival;

    fn burst(at: u64, count: u32, secs: f64) -> Arrival {
        Arrival {
            at: Duration::from_secs(at),
            count,
            duration: Duration::from_secs_f64(secs),
            queue: "celery".into(),
        }
    }

    const S: Duration = Duration::from_secs(60);

    #[test]
    fn long_tasks_at_once_need_a_worker_each() {
        // 10 tasks of 100 s at t = 0, wait at most 60 s: none can wait for another.
        let t = Trace::new(vec![burst(0, 10, 100.0)]);
        assert_eq!(startup_bound(&t, S, S), 10.0 * (60.0 + 100.0));
        assert_eq!(busy_bound(&t), 1000.0);
    }

    #[test]
    fn short_tasks_at_once_share_workers_within_the_wait() {
        // 10 tasks of 10 s: one worker starts them at 0, 10, ..., 60 s (7 tasks), a second
        // takes the other 3. Two start-ups and the work.
        let t = Trace::new(vec![burst(0, 10, 10.0)]);
        assert_eq!(startup_bound(&t, S, S), 2.0 * 60.0 + 100.0);
        // With no wait allowed, each needs its own worker.
        assert_eq!(startup_bound(&t, S, Duration::ZERO), 10.0 * 70.0);
    }

    #[test]
    fn a_gap_costs_at_most_a_start_up() {
        // One task every 30 s: the worker idles 20 s between tasks (cheaper than a start-up).
        let t = Trace::new((0..4).map(|i| burst(30 * i, 1, 10.0)).collect());
        assert_eq!(
            startup_bound(&t, S, Duration::ZERO),
            60.0 + 40.0 + 3.0 * 20.0
        );
        // One every 10 minutes: each gap is a new start-up.
        let t = Trace::new((0..4).map(|i| burst(600 * i, 1, 10.0)).collect());
        assert_eq!(startup_bound(&t, S, S), 4.0 * 60.0 + 40.0);
    }

    #[test]
    fn never_below_the_busy_bound_plus_one_start_up() {
        for (name, t) in crate::suite::suite(1) {
            let sb = startup_bound(&t, S, S);
            let busy = busy_bound(&t);
            assert!(sb >= busy + 60.0, "{name}: {sb} vs busy {busy}");
        }
    }
}
