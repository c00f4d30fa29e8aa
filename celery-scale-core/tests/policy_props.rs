//! Properties every configured policy keeps, whatever the inputs.

use std::time::Duration;

use celery_scale_core::config::{PolicyConfig, PolicyKind, StepLimitConfig};
use celery_scale_core::layer::PolicyExt;
use celery_scale_core::policy::{PolicyInput, ScalingPolicy, TargetBacklog, decide_guarded};
use celery_scale_core::{Capacity, Observation, WorkersUnknown};
use proptest::prelude::*;
use tokio::time::Instant;

/// Ready, in flight, executing and measured throughput of one observation.
type Seen = (u64, Option<u64>, Option<u64>, Option<f64>);

/// One tick of input: `None` for a failed observation.
#[derive(Debug, Clone)]
struct Tick {
    gap_s: u64,
    obs: Option<Seen>,
}

fn tick() -> impl Strategy<Value = Tick> {
    (
        1u64..60,
        prop::option::weighted(
            0.85,
            (
                0u64..5_000,
                prop::option::of(0u64..500),
                prop::option::of(0u64..200),
                prop::option::of(0.001f64..20.0),
            ),
        ),
    )
        .prop_map(|(gap_s, obs)| Tick { gap_s, obs })
}

fn policy_config() -> impl Strategy<Value = PolicyConfig> {
    (
        0u32..5,
        1u32..60,
        prop::bool::ANY,
        0u64..600,
        0u64..600,
        prop::option::of((1u32..10, 0u32..200, 1u64..120)),
        prop::bool::ANY,
    )
        .prop_map(
            |(min, span, drain, down_s, zero_s, step, floor)| PolicyConfig {
                kind: if drain {
                    PolicyKind::DrainTime
                } else {
                    PolicyKind::TargetBacklog
                },
                min_workers: min,
                max_workers: min + span,
                stabilize_down: Duration::from_secs(down_s),
                scale_to_zero_after: Duration::from_secs(zero_s),
                max_step_up: step.map(|(w, p, s)| StepLimitConfig {
                    workers: w,
                    percent: p,
                    period: Duration::from_secs(s),
                }),
                in_flight_floor: floor,
                ..PolicyConfig::default()
            },
        )
}

/// Runs `ticks` through the policy, following its decisions as the target would; returns
/// (current before, observation present, desired) per tick.
fn run(policy: &mut dyn ScalingPolicy, start: u32, ticks: &[Tick]) -> Vec<(u32, bool, u32)> {
    let mut now = Instant::now();
    let mut current = start;
    let mut failures = 0;
    let mut out = Vec::new();
    for t in ticks {
        now += Duration::from_secs(t.gap_s);
        let obs = t.obs.map(|(ready, in_flight, executing, tp)| {
            let mut o = Observation::new(ready, now);
            o.in_flight = in_flight;
            o.executing = executing;
            o.throughput_per_worker = tp;
            o
        });
        failures = if obs.is_some() { 0 } else { failures + 1 };
        let input = PolicyInput {
            observation: obs.as_ref(),
            consecutive_failures: failures,
            capacity: Capacity {
                desired: current,
                running: current,
                pending: 0,
            },
            now,
            wall: std::time::SystemTime::UNIX_EPOCH,
        };
        let d = decide_guarded(policy, &input);
        out.push((current, obs.is_some(), d.desired));
        current = d.desired;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn desired_stays_within_bounds_when_data_is_fresh(cfg in policy_config(), ticks in prop::collection::vec(tick(), 1..80)) {
        let mut p = cfg.build().unwrap();
        for (_, fresh, desired) in run(p.as_mut(), cfg.min_workers, &ticks) {
            if fresh {
                prop_assert!(desired >= cfg.min_workers && desired <= cfg.max_workers,
                    "{desired} outside {}..={}", cfg.min_workers, cfg.max_workers);
            }
        }
    }

    #[test]
    fn desired_within_bounds_from_any_start_within_bounds(cfg in policy_config(), ticks in prop::collection::vec(tick(), 1..80), start_off in 0u32..60) {
        let start = (cfg.min_workers + start_off).min(cfg.max_workers);
        let mut p = cfg.build().unwrap();
        for (_, _, desired) in run(p.as_mut(), start, &ticks) {
            prop_assert!(desired >= cfg.min_workers && desired <= cfg.max_workers);
        }
    }

    #[test]
    fn a_failed_observation_never_lowers_capacity(cfg in policy_config(), ticks in prop::collection::vec(tick(), 1..80)) {
        let mut p = cfg.build().unwrap();
        for (current, fresh, desired) in run(p.as_mut(), cfg.max_workers, &ticks) {
            if !fresh {
                prop_assert!(desired >= current, "scaled in from {current} to {desired} without data");
            }
        }
    }

    #[test]
    fn target_backlog_is_monotone_in_backlog(per in 0.5f64..100.0, a in 0u64..100_000, b in 0u64..100_000, in_flight in prop::option::of(0u64..1000)) {
        let (lo, hi) = (a.min(b), a.max(b));
        let now = Instant::now();
        let mut p = TargetBacklog::new(per).unwrap();
        let decide = |p: &mut TargetBacklog, ready| {
            let mut o = Observation::new(ready, now);
            o.in_flight = in_flight;
            p.decide(&PolicyInput { observation: Some(&o), consecutive_failures: 0, capacity: Capacity::default(), now, wall: std::time::SystemTime::UNIX_EPOCH }).desired
        };
        prop_assert!(decide(&mut p, lo) <= decide(&mut p, hi));
    }

    #[test]
    fn stabilization_never_scales_in_before_its_window(window_s in 1u64..900, high in 1u32..100, steps in prop::collection::vec(1u64..120, 1..30)) {
        let now0 = Instant::now();
        // A recommendation of `high`, then of zero from then on.
        let mut p = TargetBacklog::new(1.0).unwrap().stabilize(Duration::ZERO, Duration::from_secs(window_s));
        let mut current = 0;
        let decide = |p: &mut dyn ScalingPolicy, ready: u64, now: Instant, current: u32| {
            let o = Observation::new(ready, now);
            p.decide(&PolicyInput { observation: Some(&o), consecutive_failures: 0, capacity: Capacity { desired: current, running: current, pending: 0 }, now, wall: std::time::SystemTime::UNIX_EPOCH }).desired
        };
        current = decide(&mut p, u64::from(high), now0, current);
        prop_assert_eq!(current, high);
        let mut t = 0;
        for s in steps {
            t += s;
            let d = decide(&mut p, 0, now0 + Duration::from_secs(t), current);
            if t <= window_s {
                prop_assert_eq!(d, high, "scaled in at {}s, inside the {}s window", t, window_s);
            } else {
                prop_assert_eq!(d, 0);
            }
            current = d;
        }
    }

    #[test]
    fn decisions_are_deterministic(cfg in policy_config(), ticks in prop::collection::vec(tick(), 1..60)) {
        let mut a = cfg.build().unwrap();
        let mut b = cfg.build().unwrap();
        // Same relative inputs from the same start instant give the same answers.
        prop_assert_eq!(run(a.as_mut(), cfg.min_workers, &ticks), run(b.as_mut(), cfg.min_workers, &ticks));
    }

    /// Unknown is never zero: the same busy workers seen through a feed that is sometimes
    /// unknown (down, warming up, a worker silent) never give a lower desired count than when
    /// every tick shows them, except where the known loop scales out further (scale-out on
    /// unknown data rests on the backlog alone).
    #[test]
    fn unknown_worker_figures_never_lower_below_the_known_loop(
        cfg in policy_config(),
        start in 0u32..40,
        ticks in prop::collection::vec((1u64..60, 0u64..400, prop::option::of(0u64..200), 0u64..60, prop::bool::weighted(0.4), 0u64..=100), 1..80),
    ) {
        let start = start.clamp(cfg.min_workers, cfg.max_workers);
        let mut known = cfg.build().unwrap();
        let mut partly = cfg.build().unwrap();
        let mut now = Instant::now();
        let (mut current_known, mut current_partly) = (start, start);
        for (i, &(gap_s, ready, in_flight, executing, unknown, heard_pct)) in ticks.iter().enumerate() {
            now += Duration::from_secs(gap_s);
            let mut seen = Observation::new(ready, now);
            seen.in_flight = in_flight;
            seen.executing = Some(executing);
            seen.live_workers = Some(1);
            let mut blind = seen.clone();
            if unknown {
                blind.executing = None;
                blind.live_workers = None;
                // What was heard before the feed went quiet: some of the tasks, never more.
                blind.workers_unknown = Some(WorkersUnknown {
                    why: "test".into(),
                    executing_at_least: executing * heard_pct / 100,
                });
            }
            fn input(obs: &Observation, current: u32, now: Instant) -> PolicyInput<'_> {
                PolicyInput {
                    observation: Some(obs),
                    consecutive_failures: 0,
                    capacity: Capacity { desired: current, running: current, pending: 0 },
                    now,
                    wall: std::time::SystemTime::UNIX_EPOCH,
                }
            }
            let a = decide_guarded(known.as_mut(), &input(&seen, current_known, now)).desired;
            let b = decide_guarded(partly.as_mut(), &input(&blind, current_partly, now)).desired;
            prop_assert!(
                b >= a.min(current_partly),
                "tick {i}: {b} with unknown ticks, {a} when known (from {current_partly} and {current_known})"
            );
            if unknown {
                prop_assert!(b >= current_partly, "tick {i}: scaled in from {current_partly} to {b} on unknown worker figures");
            }
            current_known = a;
            current_partly = b;
        }
    }
}
