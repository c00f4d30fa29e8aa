//! `cargo run --release --example policy_report`: every trace x policy on the simulator, side by
//! side: celery-scale's shipped default policy, KEDA (+HPA), AWS target tracking, a static fleet
//! sized for the peak, and the lower bound (busy time alone).
//!
//! Prints a table, writes `target/policy-report/report.json` and one SVG per trace, and writes
//! the generated traces to `traces/` when `--write-traces` is given. `--trace-dir DIR` adds
//! every `*.csv` trace in DIR.

use std::path::PathBuf;

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
    /// Also run every *.csv trace in this directory.
    #[arg(long)]
    trace_dir: Option<PathBuf>,
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
    let colors = [RED, BLUE, GREEN, BLACK];
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut traces: Vec<(String, Trace)> = suite::suite(args.seed)
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    if let Some(dir) = &args.write_traces {
        std::fs::create_dir_all(dir)?;
        for (name, trace) in &traces {
            std::fs::write(dir.join(format!("{name}.csv")), trace.to_csv())?;
        }
    }
    if let Some(dir) = &args.trace_dir {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "csv"))
            .collect();
        files.sort();
        for f in files {
            let name = f
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            traces.push((name, Trace::read(&f)?));
        }
    }
    std::fs::create_dir_all(&args.out)?;
    println!(
        "{:<18} {:<20} {:>12} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "trace", "policy", "worker-s", "xLB", "p50 s", "p95 s", "p99 s", "max s", "actions"
    );
    let world = celery_scale_sim::SimConfig {
        scale_in_protection: args.scale_in_protection,
        ..report::world(args.seed)
    };
    let results = report::run_in(&traces, world)?;
    let mut rows = Vec::new();
    for (name, _) in &traces {
        let runs: Vec<(&str, &SimResult)> = results
            .iter()
            .filter(|(r, _)| &r.trace == name)
            .map(|(r, sim)| (r.policy.as_str(), sim))
            .collect();
        let mut lower_bound = 0.0;
        for (r, _) in results.iter().filter(|(r, _)| &r.trace == name) {
            lower_bound = r.lower_bound_worker_seconds;
            println!(
                "{:<18} {:<20} {:>12.0} {:>7.2} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7}",
                name,
                r.policy,
                r.worker_seconds,
                r.worker_seconds / lower_bound.max(1.0),
                r.wait_p50_s,
                r.wait_p95_s,
                r.wait_p99_s,
                r.wait_max_s,
                r.scaling_actions
            );
            rows.push(r.clone());
        }
        println!("{:<18} {:<20} {:>12.0}", name, "lower-bound", lower_bound);
        svg(&args.out.join(format!("{name}.svg")), name, &runs)?;
    }
    // Suite totals.
    println!();
    let total_lb: f64 = rows
        .iter()
        .filter(|r| r.policy == "celery-scale")
        .map(|r| r.lower_bound_worker_seconds)
        .sum();
    for policy in report::POLICIES {
        let ws: f64 = rows
            .iter()
            .filter(|r| r.policy == policy)
            .map(|r| r.worker_seconds)
            .sum();
        let p95: f64 = rows
            .iter()
            .filter(|r| r.policy == policy)
            .map(|r| r.wait_p95_s)
            .sum();
        println!(
            "suite {policy:<20} worker-s {ws:>10.0} ({:.2}x lower bound)  sum of p95 waits {p95:>8.1} s",
            ws / total_lb
        );
    }
    let json = args.out.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(&rows)?)?;
    println!("\nwrote {} and one SVG per trace", json.display());
    Ok(())
}
