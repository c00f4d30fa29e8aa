//! The policy report: deterministic, with exactly the documented JSON keys.

use celery_scale_sim::{Trace, report, suite};

fn traces() -> Vec<(String, Trace)> {
    suite::suite(1)
        .into_iter()
        .filter(|(n, _)| ["spike_50x", "trickle"].contains(n))
        .map(|(n, t)| (n.to_string(), t))
        .collect()
}

fn json(seed: u64) -> String {
    let rows: Vec<_> = report::run(&traces(), seed)
        .unwrap()
        .into_iter()
        .map(|(row, _)| row)
        .collect();
    serde_json::to_string_pretty(&rows).unwrap()
}

#[test]
fn same_seed_same_json_with_exactly_the_documented_keys() {
    let a = json(1);
    assert_eq!(a, json(1), "the same seed gives byte-identical JSON");
    let rows: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_str(&a).unwrap();
    assert_eq!(rows.len(), 2 * report::POLICIES.len());
    let mut keys: Vec<&str> = rows[0].keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "complete",
            "completed",
            "lower_bound_worker_seconds",
            "policy",
            "scaling_actions",
            "startup_bound_worker_seconds",
            "startup_s",
            "tasks",
            "trace",
            "wait_max_s",
            "wait_p50_s",
            "wait_p95_s",
            "wait_p99_s",
            "worker_seconds",
        ]
    );
    for (row, policy) in rows.iter().zip(report::POLICIES.iter().cycle()) {
        assert_eq!(row["policy"], *policy);
        let ws = row["worker_seconds"].as_f64().unwrap();
        let lb = row["lower_bound_worker_seconds"].as_f64().unwrap();
        assert!(ws >= lb, "{row:?}: nobody beats the busy time");
        let sb = row["startup_bound_worker_seconds"].as_f64().unwrap();
        assert!(
            sb >= lb + 60.0,
            "{row:?}: the start-up bound pays a start-up at least"
        );
        assert_eq!(row["startup_s"], 60.0);
        assert_eq!(row["complete"], row["completed"] == row["tasks"]);
    }
}

#[test]
fn static_fleet_is_sized_for_the_peak() {
    // 2 minutes of 50x load: the 5-minute window holding the spike sets the size.
    let spike = &suite::suite(1)[3];
    assert_eq!(spike.0, "spike_50x");
    let peak = report::peak_workers(&spike.1);
    // Spike: 15 tasks/s x 8 s mean for 120 s over a 300 s window ~ 48 workers, plus the base.
    assert!((40..=60).contains(&peak), "{peak}");
}

/// The policy report's bar on the shipped suite (seed 1), computed, not recorded: against KEDA
/// and AWS target tracking (standard) the default policy's worker-seconds and p95 wait are
/// both at most theirs on every trace but `trickle` (which no policy can win:
/// docs/policy-report.md) and `ten_minute_tasks` (where AWS, allowed its larger scale-out
/// during the cooldown, costs 0.06% less at 3.8x our p95 wait); every run completes; the
/// suite sums of worker-seconds and of p95 waits are strictly below every baseline's
/// (high-resolution AWS and Judoscale-like included); and it costs at most 1.5x the busy bound
/// and 1.3x the start-up-aware bound.
#[test]
fn the_default_policy_meets_the_report_bar() {
    let traces: Vec<(String, Trace)> = suite::suite(1)
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    let rows: Vec<_> = report::run(&traces, 1)
        .unwrap()
        .into_iter()
        .map(|(row, _)| row)
        .collect();
    let of = |trace: &str, policy: &str| {
        rows.iter()
            .find(|r| r.trace == trace && r.policy == policy)
            .unwrap()
    };
    let incomplete: Vec<_> = rows.iter().filter(|r| !r.complete).collect();
    assert!(incomplete.is_empty(), "incomplete runs: {incomplete:?}");
    let mut missed = Vec::new();
    for (name, _) in &traces {
        let ours = of(name, "celery-scale");
        if !["keda", "aws-target-tracking"]
            .iter()
            .all(|b| report::dominates(ours, of(name, b)))
        {
            missed.push(name.as_str());
        }
    }
    assert!(
        missed
            .iter()
            .all(|t| ["trickle", "ten_minute_tasks"].contains(t)),
        "not dominated: {missed:?}"
    );
    let sum = |policy: &str, f: fn(&report::ReportRow) -> f64| -> f64 {
        rows.iter().filter(|r| r.policy == policy).map(f).sum()
    };
    let cost = |r: &report::ReportRow| r.worker_seconds;
    let p95 = |r: &report::ReportRow| r.wait_p95_s;
    for b in report::BASELINES {
        assert!(
            sum("celery-scale", cost) < sum(b, cost),
            "suite worker-s vs {b}"
        );
        assert!(
            sum("celery-scale", p95) < sum(b, p95),
            "suite p95 sum vs {b}"
        );
    }
    let bound = |f: fn(&report::ReportRow) -> f64| sum("celery-scale", f);
    let busy = sum("celery-scale", cost) / bound(|r| r.lower_bound_worker_seconds);
    assert!(busy <= 1.5, "{busy:.2}x the busy bound");
    let startup = sum("celery-scale", cost) / bound(|r| r.startup_bound_worker_seconds);
    assert!(startup <= 1.3, "{startup:.2}x the start-up-aware bound");
}

/// A run cut off before its last task is marked and never ranked: it dominates nothing, and
/// nothing dominates it, however little it cost.
#[test]
fn an_incomplete_run_is_never_ranked() {
    // A 10-minute task arrives 1 s before the end of a world that stops 1 s after the last
    // arrival: nobody finishes it.
    let trace = Trace::new(vec![celery_scale_sim::Arrival {
        at: std::time::Duration::from_secs(10),
        count: 1,
        duration: std::time::Duration::from_secs(600),
        queue: "celery".into(),
    }]);
    let world = celery_scale_sim::SimConfig {
        horizon_after_last_arrival: std::time::Duration::from_secs(1),
        ..report::world(1)
    };
    let rows: Vec<_> = report::run_in(&[("cut".into(), trace)], world)
        .unwrap()
        .into_iter()
        .map(|(row, _)| row)
        .collect();
    assert_eq!(rows.len(), report::POLICIES.len());
    for r in &rows {
        assert_eq!((r.tasks, r.completed, r.complete), (1, 0, false), "{r:?}");
        for other in &rows {
            assert!(!report::dominates(r, other), "{r:?} ranked over {other:?}");
        }
    }
    let mut complete = rows[0].clone();
    complete.complete = true;
    complete.completed = 1;
    assert!(
        !report::dominates(&complete, &rows[1]),
        "a complete run does not rank over an incomplete one either"
    );
    assert!(report::dominates(&complete, &complete));
}
