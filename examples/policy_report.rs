//! `cargo run --release --example policy_report`: every trace x policy on the simulator, side by
//! side: celery-scale's shipped default policy, KEDA (+HPA), AWS target tracking (standard and
//! high-resolution), a Judoscale-like latency autoscaler, a static fleet sized for the peak, and
//! two references: the busy bound (busy time alone) and the start-up-aware bound (a clairvoyant
//! schedule that pays start-ups and keeps every wait within one start-up).
//!
//! Prints a table, writes `target/policy-report/report.json` and one SVG per trace, and writes
//! the generated traces to `traces/` when `--write-traces` is given. `--trace-dir DIR` runs
//! every `*.csv` trace in DIR instead of the generated suite.

use std::path::PathBuf;
use std::time::Duration;

use celery_scale_sim::report::{Case, ReportRow};
use celery_scale_sim::{SimResult, Trace, report, suite};
use clap::Parser;
use plotters::prelude::*;

#[derive(Debug, Parser)]
#[command(
    about = "Compare celery-scale's default policy with KEDA, AWS target tracking and a static fleet"
)]
struct Args {
    /// Seed of the generated traces and of the simulator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run every *.csv trace in this directory instead of the generated suite.
    #[arg(long)]
    trace_dir: Option<PathBuf>,
    /// Billed start-up of every trace, in seconds (default: the world's 60 s).
    #[arg(long)]
    startup: Option<f64>,
    /// Each trace of the suite with its own start-up (`suite::varied_startup`: 15 s to 240 s).
    #[arg(long)]
    varied_startups: bool,
    /// The start-up of one trace, `NAME=SECONDS` (repeatable; wins over the others).
    #[arg(long = "startup-of", value_parser = parse_startup)]
    startup_of: Vec<(String, f64)>,
    /// Where the JSON and SVGs go.
    #[arg(long, default_value = "target/policy-report")]
    out: PathBuf,
    /// Write the generated traces as CSV into this directory (e.g. traces/).
    #[arg(long)]
    write_traces: Option<PathBuf>,
    /// Busy workers protect themselves from scale-in (the ECS and EC2 protection recipes), for
    /// every policy; by default a scale-in stops random workers, busy or not.
    #[arg(long)]
    scale_in_protection: bool,
}

fn parse_startup(s: &str) -> Result<(String, f64), String> {
    let (name, secs) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=SECONDS"))?;
    let secs: f64 = secs
        .parse()
        .map_err(|_| format!("{secs:?} is not a number of seconds"))?;
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{secs} s is not within 0..=86400"));
    }
    Ok((name.to_string(), secs))
}

fn svg(
    path: &PathBuf,
    name: &str,
    runs: &[(&str, &SimResult)],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1100, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(350);
    let end = runs
        .iter()
        .flat_map(|r| r.1.series.last())
        .map(|p| p.t_s)
        .fold(1.0, f64::max);
    let max_ready = runs
        .iter()
        .flat_map(|r| &r.1.series)
        .map(|p| p.ready as f64)
        .fold(1.0, f64::max);
    let max_workers = runs
        .iter()
        .flat_map(|r| &r.1.series)
        .map(|p| f64::from(p.running_workers))
        .fold(1.0, f64::max);
    let colors = [RED, BLUE, GREEN, CYAN, MAGENTA, BLACK];
    for (area, title, max, value) in [
        (
            &top,
            "ready messages",
            max_ready,
            Box::new(|p: &celery_scale_sim::SimPoint| p.ready as f64)
                as Box<dyn Fn(&celery_scale_sim::SimPoint) -> f64>,
        ),
        (
            &bottom,
            "running workers",
            max_workers,
            Box::new(|p: &celery_scale_sim::SimPoint| f64::from(p.running_workers)),
        ),
    ] {
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{name}: {title}"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..end, 0.0..max * 1.05)?;
        chart.configure_mesh().x_desc("seconds").draw()?;
        for ((policy, run), color) in runs.iter().zip(colors) {
            chart
                .draw_series(LineSeries::new(
                    run.series.iter().map(|p| (p.t_s, value(p))),
                    color,
                ))?
                .label(*policy)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// `xLB`-style ratio, or `-` when the bound is 0.
fn ratio(value: f64, bound: f64) -> String {
    if bound > 0.0 {
        format!("{:.2}", value / bound)
    } else {
        "-".into()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let generated: Vec<(String, Trace)> = suite::suite(args.seed)
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    if let Some(dir) = &args.write_traces {
        std::fs::create_dir_all(dir)?;
        for (name, trace) in &generated {
            std::fs::write(dir.join(format!("{name}.csv")), trace.to_csv())?;
        }
    }
    // The given traces only, or the generated suite.
    let traces = match &args.trace_dir {
        None => generated,
        Some(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "csv"))
                .collect();
            files.sort();
            let mut traces = Vec::new();
            for f in files {
                let name = f
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                traces.push((name, Trace::read(&f)?));
            }
            if traces.is_empty() {
                return Err(format!("no *.csv trace in {}", dir.display()).into());
            }
            traces
        }
    };
    std::fs::create_dir_all(&args.out)?;
    let world = celery_scale_sim::SimConfig {
        scale_in_protection: args.scale_in_protection,
        ..report::world(args.seed)
    };
    let base = args.startup.map_or(world.startup, Duration::from_secs_f64);
    let cases: Vec<Case> = traces
        .into_iter()
        .map(|(name, trace)| {
            let mut startup = if args.varied_startups {
                suite::varied_startup(&name, base)
            } else {
                base
            };
            if let Some((_, s)) = args.startup_of.iter().rev().find(|(n, _)| *n == name) {
                startup = Duration::from_secs_f64(*s);
            }
            Case {
                name,
                trace,
                startup,
            }
        })
        .collect();
    println!(
        "{:<18} {:<20} {:>7} {:>13} {:>12} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "trace",
        "policy",
        "startup",
        "done/tasks",
        "worker-s",
        "xLB",
        "xSB",
        "p50 s",
        "p95 s",
        "p99 s",
        "max s",
        "actions"
    );
    let results = report::run_cases(&cases, world)?;
    let rows: Vec<ReportRow> = results.iter().map(|(r, _)| r.clone()).collect();
    for case in &cases {
        let name = &case.name;
        let runs: Vec<(&str, &SimResult)> = results
            .iter()
            .filter(|(r, _)| &r.trace == name)
            .map(|(r, sim)| (r.policy.as_str(), sim))
            .collect();
        let mut bounds = (0.0, 0.0);
        for r in rows.iter().filter(|r| &r.trace == name) {
            bounds = (r.lower_bound_worker_seconds, r.startup_bound_worker_seconds);
            println!(
                "{:<18} {:<20} {:>6.0}s {:>12}{} {:>12.0} {:>6} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7}",
                name,
                r.policy,
                r.startup_s,
                format!("{}/{}", r.completed, r.tasks),
                if r.complete { " " } else { "!" },
                r.worker_seconds,
                ratio(r.worker_seconds, r.lower_bound_worker_seconds),
                ratio(r.worker_seconds, r.startup_bound_worker_seconds),
                r.wait_p50_s,
                r.wait_p95_s,
                r.wait_p99_s,
                r.wait_max_s,
                r.scaling_actions
            );
        }
        let ours = rows
            .iter()
            .find(|r| &r.trace == name && r.policy == report::POLICIES[0]);
        let beaten: Vec<&str> = report::BASELINES
            .iter()
            .copied()
            .filter(|b| {
                let theirs = rows.iter().find(|r| &r.trace == name && r.policy == *b);
                matches!((ours, theirs), (Some(o), Some(t)) if report::dominates(o, t))
            })
            .collect();
        println!(
            "{:<18} {:<20} busy bound {:.0}, start-up bound {:.0}; celery-scale dominates {}/{}: {}",
            name,
            "bounds",
            bounds.0,
            bounds.1,
            beaten.len(),
            report::BASELINES.len(),
            if beaten.is_empty() {
                "none".to_string()
            } else {
                beaten.join(", ")
            }
        );
        svg(&args.out.join(format!("{name}.svg")), name, &runs)?;
    }
    // Suite totals over the traces above (and only those).
    println!();
    let incomplete: Vec<String> = rows
        .iter()
        .filter(|r| !r.complete)
        .map(|r| format!("{} / {} ({}/{})", r.trace, r.policy, r.completed, r.tasks))
        .collect();
    if !incomplete.is_empty() {
        println!(
            "! incomplete runs (not ranked; their cost and waits are cut off): {}",
            incomplete.join(", ")
        );
    }
    let ours_rows = || rows.iter().filter(|r| r.policy == report::POLICIES[0]);
    let total_lb: f64 = ours_rows().map(|r| r.lower_bound_worker_seconds).sum();
    let total_sb: f64 = ours_rows().map(|r| r.startup_bound_worker_seconds).sum();
    println!(
        "suite of {} traces: busy bound {total_lb:.0} worker-s, start-up bound {total_sb:.0} worker-s",
        cases.len()
    );
    for policy in report::POLICIES {
        let of = || rows.iter().filter(|r| r.policy == policy);
        let ws: f64 = of().map(|r| r.worker_seconds).sum();
        let p95: f64 = of().map(|r| r.wait_p95_s).sum();
        let done = of().filter(|r| r.complete).count();
        println!(
            "suite {policy:<20} worker-s {ws:>10.0} ({}x busy, {}x start-up bound)  sum of p95 waits {p95:>8.1} s  complete {done}/{}",
            ratio(ws, total_lb),
            ratio(ws, total_sb),
            cases.len()
        );
    }
    let json = args.out.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(&rows)?)?;
    println!("\nwrote {} and one SVG per trace", json.display());
    Ok(())
}
