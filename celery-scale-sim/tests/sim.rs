//! The simulator: deterministic, serves a burst, returns to the floor, replays trace files.

use std::time::Duration;

use celery_scale_core::config::PolicyConfig;
use celery_scale_sim::{Arrival, SimConfig, Simulator, Trace};

fn burst() -> Trace {
    let mut arrivals = vec![Arrival {
        at: Duration::from_secs(60),
        count: 300,
        duration: Duration::from_secs(4),
        queue: "celery".into(),
    }];
    // A trickle on a second, lower-priority queue.
    for i in 0..20 {
        arrivals.push(Arrival {
            at: Duration::from_secs(30 * i),
            count: 1,
            duration: Duration::from_secs(2),
            queue: "low".into(),
        });
    }
    Trace::new(arrivals)
}

fn run(seed: u64) -> celery_scale_sim::SimResult {
    let config = SimConfig {
        seed,
        ..SimConfig::default()
    };
    Simulator::new(config)
        .run(&burst(), PolicyConfig::default().build().unwrap())
        .unwrap()
}

#[test]
fn same_seed_same_result() {
    assert_eq!(run(3), run(3));
}

#[test]
fn a_burst_is_served_and_capacity_returns_to_min() {
    let r = run(1);
    let s = &r.summary;
    assert_eq!(s.completed, s.tasks, "every task ran");
    assert_eq!(s.tasks, 320);
    assert!(
        s.peak_workers >= 5,
        "scaled out for the burst: peak {}",
        s.peak_workers
    );
    let last = r.series.last().unwrap();
    assert_eq!(
        (last.desired_workers, last.running_workers),
        (0, 0),
        "back to min_workers 0 when idle"
    );
    // Everything that was billed includes at least the busy time and each start-up.
    assert!(s.worker_seconds >= s.busy_seconds + s.startup_seconds);
    assert!(
        s.launches * SimConfig::default().workers_per_unit >= s.peak_workers,
        "one launch per worker at least"
    );
    assert!(
        s.startup_seconds > 0.0 && s.startup_seconds <= 60.0 * f64::from(s.launches),
        "each launch bills at most its 60 s start-up: {} s for {} launches",
        s.startup_seconds,
        s.launches
    );
    assert!(s.wait_max_s >= s.wait_p95_s && s.wait_p95_s >= s.wait_p50_s);
    assert!(s.scaling_actions >= 2, "at least out and back in");
}

#[test]
fn more_capacity_waits_less() {
    // Starting with a warm fleet of 40 and a floor of 40, nothing waits for start-up.
    let warm = Simulator::new(SimConfig {
        initial_units: 40,
        ..SimConfig::default()
    })
    .run(
        &burst(),
        PolicyConfig {
            min_workers: 40,
            max_workers: 40,
            ..PolicyConfig::default()
        }
        .build()
        .unwrap(),
    )
    .unwrap();
    let cold = run(1);
    assert!(warm.summary.wait_p95_s < cold.summary.wait_p95_s);
    assert!(warm.summary.worker_seconds > cold.summary.worker_seconds);
}

#[test]
fn trace_files_replay() {
    let dir = std::env::temp_dir().join(format!("celery-scale-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("burst.csv");
    std::fs::write(&path, burst().to_csv()).unwrap();
    let back = Trace::read(&path).unwrap();
    assert_eq!(back, burst());
    std::fs::remove_dir_all(&dir).unwrap();
    let err = Trace::read(&dir.join("missing.csv")).unwrap_err();
    assert!(err.to_string().contains("missing.csv"));
}

#[test]
fn invalid_config_is_named() {
    let e = Simulator::new(SimConfig {
        workers_per_unit: 0,
        ..SimConfig::default()
    })
    .run(&burst(), PolicyConfig::default().build().unwrap())
    .unwrap_err();
    assert_eq!(e.field, "workers_per_unit");
}

#[test]
fn shipped_traces_are_what_the_generator_makes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../traces");
    let suite = celery_scale_sim::suite::suite(1);
    assert!(suite.len() >= 9);
    for (name, trace) in suite {
        let shipped = Trace::read(&dir.join(format!("{name}.csv"))).unwrap();
        assert_eq!(shipped.tasks(), trace.tasks(), "{name}");
        assert_eq!(
            shipped.to_csv(),
            trace.to_csv(),
            "{name}: regenerate with policy_report --write-traces traces"
        );
    }
    // Generation is deterministic.
    assert_eq!(
        celery_scale_sim::suite::suite(5)[0].1,
        celery_scale_sim::suite::suite(5)[0].1
    );
}

/// An hourly burst (200 tasks of 30 s at half past each hour, three hours): with a forecast of
/// period 1 h, the workers asked for in the first hour's burst are running when the next ones
/// arrive; without it, nothing runs until the burst is seen.
#[test]
fn a_forecast_has_workers_running_when_an_hourly_burst_recurs() {
    use celery_scale_core::config::ForecastConfig;
    let trace = Trace::new(
        (0..3)
            .map(|h| Arrival {
                at: Duration::from_secs(h * 3600 + 1800),
                count: 200,
                duration: Duration::from_secs(30),
                queue: "celery".into(),
            })
            .collect(),
    );
    let sim = Simulator::new(SimConfig::default());
    let policy = |forecast| PolicyConfig {
        max_workers: 100,
        forecast,
        ..PolicyConfig::default()
    };
    let with = sim
        .run(
            &trace,
            policy(Some(ForecastConfig {
                cycles: 1,
                ..ForecastConfig::every(Duration::from_secs(3600))
            }))
            .build()
            .unwrap(),
        )
        .unwrap();
    let without = sim.run(&trace, policy(None).build().unwrap()).unwrap();
    let running_at = |r: &celery_scale_sim::SimResult, t: f64| {
        r.series
            .iter()
            .rfind(|p| p.t_s <= t)
            .map(|p| p.running_workers)
            .unwrap()
    };
    for hour in 0..3 {
        let burst = (hour * 3600 + 1800) as f64;
        // Asked for a start-up (the 60 s lead) before the burst, running as it arrives.
        assert_eq!(running_at(&without, burst + 5.0), 0, "hour {hour}");
        let running = running_at(&with, burst + 5.0);
        if hour == 0 {
            assert_eq!(running, 0, "nothing learned before the first burst");
        } else {
            assert!(
                running >= 40,
                "hour {hour}: {running} running as the burst arrives"
            );
        }
        // Between bursts the floor is gone: back to zero.
        assert_eq!(running_at(&with, burst + 1500.0), 0, "hour {hour}");
    }
    assert_eq!(running_at(&with, 1799.0), 0, "nothing learned yet");
    assert_eq!(with.summary.completed, with.summary.tasks);
    // The first hour's waits are the same with and without; the median falls in the others.
    assert!(
        with.summary.wait_p50_s + 20.0 < without.summary.wait_p50_s,
        "{} vs {}",
        with.summary.wait_p50_s,
        without.summary.wait_p50_s
    );
}
