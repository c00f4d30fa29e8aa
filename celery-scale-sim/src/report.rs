//! The policy report: every trace x policy on one simulated world, as rows with the same keys
//! as `target/policy-report/report.json` (`cargo run --release --example policy_report`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use celery_scale_core::ConfigError;
use celery_scale_core::config::PolicyConfig;
use celery_scale_core::policy::ScalingPolicy;

use crate::baselines::{AwsTargetTracking, Fixed, Judoscale, Keda};
use crate::bounds::{busy_bound, startup_bound};
use crate::{SimConfig, SimResult, Simulator, Trace};

/// The policies compared, in report order.
pub const POLICIES: [&str; 6] = [
    "celery-scale",
    "keda",
    "aws-target-tracking",
    "aws-high-resolution",
    "judoscale",
    "static",
];

/// The autoscalers the default policy is ranked against (the static fleet is a reference).
pub const BASELINES: [&str; 4] = [
    "keda",
    "aws-target-tracking",
    "aws-high-resolution",
    "judoscale",
];

/// Most workers any policy may run (the fewest is 0, or 1 where the policy cannot reach 0).
pub const MAX_WORKERS: u32 = 100;

/// The Judoscale-like baseline's queue-time range: upscale above, downscale below.
pub const JUDOSCALE_RANGE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(5));

/// One trace x policy: exactly the keys of `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportRow {
    /// The trace's name.
    pub trace: String,
    /// One of [`POLICIES`].
    pub policy: String,
    /// The world's billed start-up for this trace, in seconds.
    pub startup_s: f64,
    /// Tasks in the trace.
    pub tasks: u64,
    /// Tasks the run completed before it stopped.
    pub completed: u64,
    /// Whether every task completed; a run that did not is never ranked ([`dominates`]).
    pub complete: bool,
    /// Worker-seconds billed (start-up, idle and warm-shutdown time included).
    pub worker_seconds: f64,
    /// The trace's busy time: the sum of task durations.
    pub lower_bound_worker_seconds: f64,
    /// The start-up-aware bound: a clairvoyant schedule with every wait within one start-up
    /// ([`startup_bound`]).
    pub startup_bound_worker_seconds: f64,
    /// Median wait from arrival to start.
    pub wait_p50_s: f64,
    /// 95th percentile wait.
    pub wait_p95_s: f64,
    /// 99th percentile wait.
    pub wait_p99_s: f64,
    /// Longest wait.
    pub wait_max_s: f64,
    /// Times the policy changed the desired count.
    pub scaling_actions: u32,
}

/// Whether `a` dominates `b`: both completed every task, and `a`'s worker-seconds and p95 wait
/// are both at most `b`'s. A run that did not complete is never ranked: it dominates nothing
/// and nothing dominates it.
pub fn dominates(a: &ReportRow, b: &ReportRow) -> bool {
    a.complete && b.complete && a.worker_seconds <= b.worker_seconds && a.wait_p95_s <= b.wait_p95_s
}

/// A trace of the report and the start-up its world bills.
#[derive(Debug, Clone)]
pub struct Case {
    /// The trace's name.
    pub name: String,
    /// The trace.
    pub trace: Trace,
    /// Time from asking for a unit to its workers taking tasks (billed), for this trace.
    pub startup: Duration,
}

/// Workers a static fleet needs for `trace`: the peak, over 5-minute windows, of the work
/// arriving per second (busy seconds per second), rounded up, within `1..=MAX_WORKERS`.
pub fn peak_workers(trace: &Trace) -> u32 {
    let window = 300.0;
    let arrivals = trace.arrivals();
    let mut best: f64 = 0.0;
    let mut lo = 0;
    let mut sum = 0.0;
    for a in arrivals {
        sum += a.duration.as_secs_f64() * f64::from(a.count);
        while arrivals[lo].at.as_secs_f64() < a.at.as_secs_f64() - window {
            sum -= arrivals[lo].duration.as_secs_f64() * f64::from(arrivals[lo].count);
            lo += 1;
        }
        best = best.max(sum / window);
    }
    (best.ceil() as u32).clamp(1, MAX_WORKERS)
}

/// A named policy of the report.
pub type NamedPolicy = (&'static str, Box<dyn ScalingPolicy>);

/// The policies for `trace`, named as in [`POLICIES`]: the shipped default policy
/// (`PolicyConfig::default()` with `max_workers` = [`MAX_WORKERS`]); KEDA (uncached, its
/// default) and AWS target tracking (standard and high-resolution) at the default's
/// `messages_per_worker`; the Judoscale-like latency autoscaler at [`JUDOSCALE_RANGE`]; and a
/// static fleet of [`peak_workers`]`(trace)`.
pub fn policies(trace: &Trace) -> Result<Vec<NamedPolicy>, ConfigError> {
    let ours = PolicyConfig {
        max_workers: MAX_WORKERS,
        ..PolicyConfig::default()
    };
    let target = ours.messages_per_worker;
    let (up, down) = JUDOSCALE_RANGE;
    Ok(vec![
        (POLICIES[0], ours.build()?),
        (POLICIES[1], Box::new(Keda::new(target, 0, MAX_WORKERS))),
        (
            POLICIES[2],
            Box::new(AwsTargetTracking::new(target, 1, MAX_WORKERS)),
        ),
        (
            POLICIES[3],
            Box::new(AwsTargetTracking::high_resolution(target, 1, MAX_WORKERS)),
        ),
        (
            POLICIES[4],
            Box::new(Judoscale::new(up, down, 0, MAX_WORKERS)),
        ),
        (POLICIES[5], Box::new(Fixed(peak_workers(trace)))),
    ])
}

/// The simulated world of the report: [`SimConfig::default`] (60 s billed start-up, one
/// worker process per unit, prefetch multiplier 4, 5 s loop interval) with `seed`.
pub fn world(seed: u64) -> SimConfig {
    SimConfig {
        seed,
        ..SimConfig::default()
    }
}

/// Runs every trace under every policy; returns the rows (trace-major, policies in
/// [`POLICIES`] order) and each run's result. Deterministic for a given `seed`.
pub fn run(
    traces: &[(String, Trace)],
    seed: u64,
) -> Result<Vec<(ReportRow, SimResult)>, ConfigError> {
    run_in(traces, world(seed))
}

/// [`run`] in another world (e.g. [`world`] with `scale_in_protection`), the same for every
/// policy and trace.
pub fn run_in(
    traces: &[(String, Trace)],
    world: SimConfig,
) -> Result<Vec<(ReportRow, SimResult)>, ConfigError> {
    let cases: Vec<Case> = traces
        .iter()
        .map(|(name, trace)| Case {
            name: name.clone(),
            trace: trace.clone(),
            startup: world.startup,
        })
        .collect();
    run_cases(&cases, world)
}

/// As [`run_in`], each trace in `world` with its own start-up ([`Case::startup`]).
pub fn run_cases(
    cases: &[Case],
    world: SimConfig,
) -> Result<Vec<(ReportRow, SimResult)>, ConfigError> {
    let mut out = Vec::new();
    for case in cases {
        let sim = Simulator::new(SimConfig {
            startup: case.startup,
            ..world.clone()
        });
        let lower_bound = busy_bound(&case.trace);
        let startup_bound = startup_bound(&case.trace, case.startup, case.startup);
        for (policy, p) in policies(&case.trace)? {
            let r = sim.run(&case.trace, p)?;
            let s = &r.summary;
            out.push((
                ReportRow {
                    trace: case.name.clone(),
                    policy: policy.to_string(),
                    startup_s: case.startup.as_secs_f64(),
                    tasks: s.tasks,
                    completed: s.completed,
                    complete: s.completed == s.tasks,
                    worker_seconds: s.worker_seconds,
                    lower_bound_worker_seconds: lower_bound,
                    startup_bound_worker_seconds: startup_bound,
                    wait_p50_s: s.wait_p50_s,
                    wait_p95_s: s.wait_p95_s,
                    wait_p99_s: s.wait_p99_s,
                    wait_max_s: s.wait_max_s,
                    scaling_actions: s.scaling_actions,
                },
                r,
            ));
        }
    }
    Ok(out)
}
