//! The policy report: every trace x policy on one simulated world, as rows with the same keys
//! as `target/policy-report/report.json` (`cargo run --release --example policy_report`).

use serde::{Deserialize, Serialize};

use celery_scale_core::ConfigError;
use celery_scale_core::config::PolicyConfig;
use celery_scale_core::policy::ScalingPolicy;

use crate::baselines::{AwsTargetTracking, Fixed, Keda};
use crate::{SimConfig, SimResult, Simulator, Trace};

/// The policies compared, in report order.
pub const POLICIES: [&str; 4] = ["celery-scale", "keda", "aws-target-tracking", "static"];

/// Most workers any policy may run (the fewest is 0, or 1 where the policy cannot reach 0).
pub const MAX_WORKERS: u32 = 100;

/// One trace x policy: exactly the keys of `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportRow {
    /// The trace's name.
    pub trace: String,
    /// One of [`POLICIES`].
    pub policy: String,
    /// Worker-seconds billed (start-up, idle and warm-shutdown time included).
    pub worker_seconds: f64,
    /// The trace's busy time: the sum of task durations.
    pub lower_bound_worker_seconds: f64,
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

/// The four policies for `trace`, named as in [`POLICIES`]: the shipped default policy
/// (`PolicyConfig::default()` with `max_workers` = [`MAX_WORKERS`]), KEDA and AWS target
/// tracking at the default's `messages_per_worker`, and a static fleet of
/// [`peak_workers`]`(trace)`.
pub fn policies(trace: &Trace) -> Result<Vec<NamedPolicy>, ConfigError> {
    let ours = PolicyConfig {
        max_workers: MAX_WORKERS,
        ..PolicyConfig::default()
    };
    let target = ours.messages_per_worker;
    Ok(vec![
        (POLICIES[0], ours.build()?),
        (POLICIES[1], Box::new(Keda::new(target, 0, MAX_WORKERS))),
        (
            POLICIES[2],
            Box::new(AwsTargetTracking::new(target, 1, MAX_WORKERS)),
        ),
        (POLICIES[3], Box::new(Fixed(peak_workers(trace)))),
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
/// policy.
pub fn run_in(
    traces: &[(String, Trace)],
    world: SimConfig,
) -> Result<Vec<(ReportRow, SimResult)>, ConfigError> {
    let sim = Simulator::new(world);
    let mut out = Vec::new();
    for (name, trace) in traces {
        let lower_bound = trace.busy_time().as_secs_f64();
        for (policy, p) in policies(trace)? {
            let r = sim.run(trace, p)?;
            let s = &r.summary;
            out.push((
                ReportRow {
                    trace: name.clone(),
                    policy: policy.to_string(),
                    worker_seconds: s.worker_seconds,
                    lower_bound_worker_seconds: lower_bound,
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
