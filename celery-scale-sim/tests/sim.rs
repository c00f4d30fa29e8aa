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
