//! `cargo run --example simulate`: a burst of Celery tasks handled by the default policy, in a
//! simulation that needs no services. Prints a terminal chart of backlog and workers over time
//! and a summary, and writes an SVG chart (default `target/simulate/simulate.svg`).
//!
//! Replay your own traffic with `--trace FILE` (CSV `at_s,count,duration_s[,queue]`).

use std::path::PathBuf;
use std::time::Duration;

use celery_scale::config::{PolicyConfig, PolicyKind};
use celery_scale_sim::{Arrival, SimConfig, SimPoint, SimResult, Simulator, Trace};
use clap::Parser;
use plotters::prelude::*;

#[derive(Debug, Parser)]
#[command(about = "Simulate a burst of Celery tasks under celery-scale's default policy")]
struct Args {
    /// A trace file (CSV `at_s,count,duration_s[,queue]`); default: a built-in burst.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Base policy: target_backlog or drain_time [default: the kind of `PolicyConfig::default()`].
    #[arg(long)]
    policy: Option<String>,
    /// Fewest workers.
    #[arg(long)]
    min_workers: Option<u32>,
    /// Most workers.
    #[arg(long)]
    max_workers: Option<u32>,
    /// drain_time: every waiting task should start within this.
    #[arg(long, value_parser = humantime::parse_duration)]
    target_wait: Option<Duration>,
    /// target_backlog: outstanding messages per worker.
    #[arg(long)]
    messages_per_worker: Option<f64>,
    /// Scale in to the highest recommendation of this window.
    #[arg(long, value_parser = humantime::parse_duration)]
    stabilize_down: Option<Duration>,
    /// Worker start-up time (billed).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    startup: Duration,
    /// Busy workers protect themselves from scale-in (the ECS and EC2 protection recipes);
    /// by default a scale-in stops random workers, busy or not.
    #[arg(long)]
    scale_in_protection: bool,
    /// Random seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "target/simulate/simulate.svg")]
    out: PathBuf,
}

/// A quiet minute, a burst of 600 ten-second tasks with a steady trickle, then quiet again.
fn burst(seed: u64) -> Trace {
    let mut arrivals = Vec::new();
    // Deterministic variety without a dependency: durations cycle through 5..15 s.
    let duration = |i: u64| Duration::from_secs(5 + (i * 7 + seed) % 11);
    for i in 0..120u64 {
        arrivals.push(Arrival {
            at: Duration::from_secs(i * 10),
            count: 1,
            duration: duration(i),
            queue: "celery".into(),
        });
    }
    for i in 0..60u64 {
        arrivals.push(Arrival {
            at: Duration::from_secs(120 + i),
            count: 10,
            duration: duration(i),
            queue: "celery".into(),
        });
    }
    Trace::new(arrivals)
}

fn policy(args: &Args) -> Result<PolicyConfig, String> {
    let mut p = PolicyConfig {
        max_workers: 50,
        ..PolicyConfig::default()
    };
    if let Some(kind) = &args.policy {
        p.kind = match kind.as_str() {
            "drain_time" => PolicyKind::DrainTime,
            "target_backlog" => PolicyKind::TargetBacklog,
            other => {
                return Err(format!(
                    "--policy {other:?}: expected target_backlog or drain_time"
                ));
            }
        };
    }
    if let Some(v) = args.min_workers {
        p.min_workers = v;
    }
    if let Some(v) = args.max_workers {
        p.max_workers = v;
    }
    if let Some(v) = args.target_wait {
        p.target_wait = v;
    }
    if let Some(v) = args.messages_per_worker {
        p.messages_per_worker = v;
    }
    if let Some(v) = args.stabilize_down {
        p.stabilize_down = v;
    }
    Ok(p)
}

/// A text chart: one row per value band, one column per time bucket.
fn text_chart(title: &str, series: &[SimPoint], value: impl Fn(&SimPoint) -> f64, mark: char) {
    const WIDTH: usize = 90;
    const HEIGHT: usize = 10;
    let buckets: Vec<f64> = (0..WIDTH)
        .map(|c| {
            let lo = c * series.len() / WIDTH;
            let hi = ((c + 1) * series.len() / WIDTH)
                .max(lo + 1)
                .min(series.len());
            series[lo..hi].iter().map(&value).fold(0.0, f64::max)
        })
        .collect();
    let max = buckets.iter().copied().fold(0.0, f64::max).max(1.0);
    println!("{title} (max {max:.0})");
    for row in (1..=HEIGHT).rev() {
        let threshold = max * (row as f64 - 0.5) / HEIGHT as f64;
        let line: String = buckets
            .iter()
            .map(|v| if *v >= threshold { mark } else { ' ' })
            .collect();
        println!("{:>6.0} |{line}", max * row as f64 / HEIGHT as f64);
    }
    let end = series.last().map_or(0.0, |p| p.t_s);
    println!("       +{}", "-".repeat(WIDTH));
    println!(
        "        0 s{:>width$}",
        format!("{end:.0} s"),
        width = WIDTH - 3
    );
}

fn svg(path: &PathBuf, r: &SimResult) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let end = r.series.last().map_or(1.0, |p| p.t_s).max(1.0);
    let max_ready = r.series.iter().map(|p| p.ready as f64).fold(1.0, f64::max);
    let max_workers = r
        .series
        .iter()
        .map(|p| f64::from(p.desired_workers.max(p.running_workers)))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "celery-scale simulation: backlog and workers",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..end, 0.0..max_ready * 1.05)?
        .set_secondary_coord(0.0..end, 0.0..max_workers * 1.1);
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ready messages")
        .draw()?;
    chart.configure_secondary_axes().y_desc("workers").draw()?;
    chart
        .draw_series(LineSeries::new(
            r.series.iter().map(|p| (p.t_s, p.ready as f64)),
            &BLUE,
        ))?
        .label("ready messages")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    chart
        .draw_secondary_series(LineSeries::new(
            r.series
                .iter()
                .map(|p| (p.t_s, f64::from(p.desired_workers))),
            &RED,
        ))?
        .label("desired workers")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    chart
        .draw_secondary_series(LineSeries::new(
            r.series
                .iter()
                .map(|p| (p.t_s, f64::from(p.running_workers))),
            &GREEN,
        ))?
        .label("running workers")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let trace = match &args.trace {
        Some(path) => Trace::read(path)?,
        None => burst(args.seed),
    };
    let policy_config = policy(&args)?;
    let sim = Simulator::new(SimConfig {
        seed: args.seed,
        startup: args.startup,
        scale_in_protection: args.scale_in_protection,
        settle: Duration::from_secs(300),
        ..SimConfig::default()
    });
    let result = sim.run(&trace, policy_config.build()?)?;

    text_chart("ready messages", &result.series, |p| p.ready as f64, '*');
    println!();
    text_chart(
        "running workers",
        &result.series,
        |p| f64::from(p.running_workers),
        '#',
    );
    println!();
    let s = &result.summary;
    let target = match policy_config.kind {
        PolicyKind::TargetBacklog => {
            format!("{} messages per worker", policy_config.messages_per_worker)
        }
        PolicyKind::DrainTime => format!("target wait {:?}", policy_config.target_wait),
    };
    println!(
        "policy            {:?} (min {}, max {}, {target}, scale-in window {:?})",
        policy_config.kind,
        policy_config.min_workers,
        policy_config.max_workers,
        policy_config.stabilize_down
    );
    println!("tasks             {} ({} completed)", s.tasks, s.completed);
    println!(
        "worker-seconds    {:.0} (busy {:.0}, ratio {:.2})",
        s.worker_seconds,
        s.busy_seconds,
        s.worker_seconds / s.busy_seconds.max(1.0)
    );
    println!(
        "wait p50/p95/p99  {:.1} s / {:.1} s / {:.1} s (max {:.1} s)",
        s.wait_p50_s, s.wait_p95_s, s.wait_p99_s, s.wait_max_s
    );
    println!("peak workers      {}", s.peak_workers);
    println!("scaling actions   {}", s.scaling_actions);
    println!(
        "launches          {} ({:.0} worker-s starting, {:.0} idle or stopping)",
        s.launches,
        s.startup_seconds,
        s.worker_seconds - s.busy_seconds - s.startup_seconds
    );
    println!("simulated         {:.0} s", s.simulated_s);
    svg(&args.out, &result)?;
    println!("chart             {}", args.out.display());
    Ok(())
}
