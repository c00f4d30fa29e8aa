//! The benchmark traces: nine kinds of Celery traffic, generated deterministically from a seed
//! (and shipped as CSV files under `traces/`).

use std::time::Duration;

use rand::RngExt as _;
use rand::rngs::StdRng;

use crate::Trace;

/// Task durations drawn uniformly from `lo..hi` seconds, for [`Trace::from_rate`].
pub fn uniform(lo: f64, hi: f64) -> impl FnMut(&mut StdRng) -> Duration {
    move |rng| Duration::from_secs_f64(rng.random_range(lo..hi))
}

/// Pareto(shape, scale) capped at `cap` seconds: a heavy tail of long tasks.
fn pareto(shape: f64, scale: f64, cap: f64) -> impl FnMut(&mut StdRng) -> Duration {
    move |rng| {
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        Duration::from_secs_f64((scale / u.powf(1.0 / shape)).min(cap))
    }
}

const H: u64 = 3600;

/// The suite: (name, trace), every trace from `seed`.
pub fn suite(seed: u64) -> Vec<(&'static str, Trace)> {
    let q = "celery";
    vec![
        (
            "steady",
            Trace::from_rate(Duration::from_secs(H), seed, q, |_| 1.0, uniform(5.0, 15.0)),
        ),
        (
            "diurnal",
            Trace::from_rate(
                Duration::from_secs(24 * H),
                seed + 1,
                q,
                |t| {
                    let day = (t / (24.0 * 3600.0)) * std::f64::consts::TAU;
                    0.05 + 0.95 * (0.5 - 0.5 * day.cos()).powi(2)
                },
                uniform(5.0, 15.0),
            ),
        ),
        (
            "on_off_batches",
            Trace::from_rate(
                Duration::from_secs(3 * H),
                seed + 2,
                q,
                // 5 minutes of 4 tasks/s every 30 minutes.
                |t| if t % 1800.0 < 300.0 { 4.0 } else { 0.0 },
                uniform(10.0, 30.0),
            ),
        ),
        (
            "spike_50x",
            Trace::from_rate(
                Duration::from_secs(H + H / 2),
                seed + 3,
                q,
                |t| {
                    if (1800.0..1920.0).contains(&t) {
                        15.0
                    } else {
                        0.3
                    }
                },
                uniform(4.0, 12.0),
            ),
        ),
        (
            "slow_ramp",
            Trace::from_rate(
                Duration::from_secs(4 * H),
                seed + 4,
                q,
                |t| 3.0 * (1.0 - ((t - 2.0 * 3600.0) / (2.0 * 3600.0)).abs()).max(0.0),
                uniform(5.0, 15.0),
            ),
        ),
        (
            "heavy_tailed",
            Trace::from_rate(
                Duration::from_secs(2 * H),
                seed + 5,
                q,
                |_| 0.5,
                pareto(1.5, 3.0, 900.0),
            ),
        ),
        (
            "ten_minute_tasks",
            Trace::from_rate(
                Duration::from_secs(3 * H),
                seed + 6,
                q,
                |t| if t < 2.0 * 3600.0 { 1.0 / 60.0 } else { 0.0 },
                uniform(540.0, 660.0),
            ),
        ),
        (
            "trickle",
            Trace::from_rate(
                Duration::from_secs(4 * H),
                seed + 7,
                q,
                |_| 1.0 / 240.0,
                uniform(20.0, 40.0),
            ),
        ),
        (
            "priority_mix",
            // Urgent tasks on the first queue (consumed first), bulk work on the second.
            Trace::from_rate(
                Duration::from_secs(2 * H),
                seed + 8,
                "urgent",
                |t| if (t % 900.0) < 60.0 { 3.0 } else { 0.1 },
                uniform(2.0, 6.0),
            )
            .merge(Trace::from_rate(
                Duration::from_secs(2 * H),
                seed + 9,
                "bulk",
                |_| 0.8,
                uniform(10.0, 20.0),
            )),
        ),
    ]
}

/// A start-up per trace of the suite, for the world where start-ups differ by platform: from a
/// warm pool (15-20 s) through Fargate and ECS on running instances (30-90 s) to an EC2 cold
/// boot with a large image (120-240 s). Traces not named here get `default`.
pub fn varied_startup(name: &str, default: Duration) -> Duration {
    let s = match name {
        "steady" => 30,
        "diurnal" => 120,
        "on_off_batches" => 180,
        "spike_50x" => 20,
        "slow_ramp" => 90,
        "heavy_tailed" => 45,
        "ten_minute_tasks" => 240,
        "trickle" => 15,
        "priority_mix" => 60,
        _ => return default,
    };
    Duration::from_secs(s)
}
