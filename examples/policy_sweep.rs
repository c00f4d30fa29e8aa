//! `cargo run --release --example policy_sweep`: the experiments behind the analysis in
//! docs/policy-report.md, so its numbers can be rerun.
//!
//! - `variants`: 28 settings of the policy (`drain_time` at a target wait of 30/60/120 s,
//!   `target_backlog` at 2/4/5/8 messages per worker; each with `stabilize_down` =
//!   `scale_to_zero_after` of 0/15/30/60 s) on every trace of the suite and every seed, against
//!   the same KEDA and AWS baselines as the report: on how many traces each dominates both, and
//!   its mean suite cost and p95 sum.
//! - `keda-targets`: with scale-in protection, KEDA at 1, 2, 3 and 5 messages per worker beside
//!   the default policy, on the traces where KEDA is cheaper.
//! - `fixed-fleets`: fixed fleets of 4 to 10 workers, started at t = 0, on `ten_minute_tasks`.

use std::time::Duration;

use celery_scale::config::{PolicyConfig, PolicyKind};
use celery_scale::sim::baselines::{Fixed, Keda};
use celery_scale::sim::{SimConfig, Simulator, Summary, Trace, report, suite};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Experiment {
    Variants,
    KedaTargets,
    FixedFleets,
}

#[derive(Debug, Parser)]
#[command(about = "Rerun the policy experiments of docs/policy-report.md")]
struct Args {
    /// Which experiments (default: all).
    #[arg(long, value_enum)]
    only: Vec<Experiment>,
    /// Seeds of the `variants` sweep (traces and simulator).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    seeds: Vec<u64>,
}

fn trace(seed: u64, name: &str) -> Trace {
    suite::suite(seed)
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| t)
        .expect("a trace of the suite")
}

fn default_policy() -> PolicyConfig {
    PolicyConfig {
        max_workers: report::MAX_WORKERS,
        ..PolicyConfig::default()
    }
}

fn variants() -> Vec<(String, PolicyConfig)> {
    let mut out = Vec::new();
    for window in [0u64, 15, 30, 60] {
        let windowed = PolicyConfig {
            stabilize_down: Duration::from_secs(window),
            scale_to_zero_after: Duration::from_secs(window.max(1)),
            ..default_policy()
        };
        for wait in [30u64, 60, 120] {
            let config = PolicyConfig {
                target_wait: Duration::from_secs(wait),
                ..windowed.clone()
            };
            out.push((format!("drain_time {wait} s, window {window} s"), config));
        }
        for per_worker in [2.0, 4.0, 5.0, 8.0] {
            let config = PolicyConfig {
                kind: PolicyKind::TargetBacklog,
                messages_per_worker: per_worker,
                ..windowed.clone()
            };
            out.push((
                format!("target_backlog {per_worker}, window {window} s"),
                config,
            ));
        }
    }
    out
}

/// Whether `ours` is at most every baseline on both cost and p95 wait.
fn dominates(ours: &Summary, baselines: &[Summary]) -> bool {
    baselines
        .iter()
        .all(|b| ours.worker_seconds <= b.worker_seconds && ours.wait_p95_s <= b.wait_p95_s)
}

fn sweep_variants(seeds: &[u64]) -> Result<(), Box<dyn std::error::Error>> {
    println!("== variants: traces dominated per seed, mean suite worker-s and p95 sum, misses");
    let configs = variants();
    // Per variant: per seed (dominated, worker-s, p95 sum, missed traces).
    let mut rows = vec![Vec::new(); configs.len()];
    for &seed in seeds {
        let sim = Simulator::new(report::world(seed));
        let traces = suite::suite(seed);
        let mut baselines = Vec::new();
        for (_, trace) in &traces {
            let mut b = Vec::new();
            for (name, p) in report::policies(trace)? {
                if name == "keda" || name == "aws-target-tracking" {
                    b.push(sim.run(trace, p)?.summary);
                }
            }
            baselines.push(b);
        }
        for (row, (_, config)) in rows.iter_mut().zip(&configs) {
            let (mut dominated, mut cost, mut p95, mut missed) = (0, 0.0, 0.0, Vec::new());
            for ((name, trace), b) in traces.iter().zip(&baselines) {
                let s = sim.run(trace, config.build()?)?.summary;
                cost += s.worker_seconds;
                p95 += s.wait_p95_s;
                if dominates(&s, b) {
                    dominated += 1;
                } else {
                    missed.push(*name);
                }
            }
            row.push((dominated, cost, p95, missed.join(",")));
        }
    }
    for ((name, _), row) in configs.iter().zip(&rows) {
        let n = row.len() as f64;
        let per_seed: Vec<String> = row.iter().map(|r| r.0.to_string()).collect();
        let misses: Vec<&str> = row.iter().map(|r| r.3.as_str()).collect();
        println!(
            "{name:<32} dominated {:<9} worker-s {:>10.0} p95 sum {:>6.0} s  misses {}",
            per_seed.join("/"),
            row.iter().map(|r| r.1).sum::<f64>() / n,
            row.iter().map(|r| r.2).sum::<f64>() / n,
            misses.join(" | ")
        );
    }
    Ok(())
}

fn keda_targets() -> Result<(), Box<dyn std::error::Error>> {
    println!("== keda-targets (scale-in protection, seed 1): worker-s / p95 wait s");
    let sim = Simulator::new(SimConfig {
        scale_in_protection: true,
        ..report::world(1)
    });
    for name in ["steady", "diurnal", "slow_ramp", "heavy_tailed"] {
        let t = trace(1, name);
        let ours = sim.run(&t, default_policy().build()?)?.summary;
        let mut line = format!(
            "{name:<14} celery-scale {:.0} / {:.0}",
            ours.worker_seconds, ours.wait_p95_s
        );
        for target in [1.0, 2.0, 3.0, 5.0] {
            let keda = Keda::new(target, 0, report::MAX_WORKERS);
            let s = sim.run(&t, Box::new(keda))?.summary;
            line += &format!(
                " | keda@{target} {:.0} / {:.0}",
                s.worker_seconds, s.wait_p95_s
            );
        }
        println!("{line}");
    }
    Ok(())
}

fn fixed_fleets() -> Result<(), Box<dyn std::error::Error>> {
    println!("== fixed-fleets on ten_minute_tasks (seed 1): worker-s / p95 wait s");
    let t = trace(1, "ten_minute_tasks");
    for workers in [4, 5, 6, 7, 8, 10] {
        let sim = Simulator::new(SimConfig {
            initial_units: workers,
            ..report::world(1)
        });
        let s = sim.run(&t, Box::new(Fixed(workers)))?.summary;
        println!(
            "{workers:>2} workers: {:.0} / {:.0}",
            s.worker_seconds, s.wait_p95_s
        );
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let run = |e| args.only.is_empty() || args.only.contains(&e);
    if run(Experiment::FixedFleets) {
        fixed_fleets()?;
    }
    if run(Experiment::KedaTargets) {
        keda_targets()?;
    }
    if run(Experiment::Variants) {
        sweep_variants(&args.seeds)?;
    }
    Ok(())
}
