//! Core benchmarks: the cost of one decision of the fully layered default policy, and the
//! overhead of one tick of 1,000 bindings on the in-memory backends.
//!
//! Run: `cargo bench --bench core`

use std::hint::black_box;
use std::time::Duration;

use celery_scale::config::{FallbackConfig, PolicyConfig, StepLimitConfig};
use celery_scale::policy::{PolicyInput, decide_guarded};
use celery_scale::{
    Autoscaler, Binding, Capacity, LoopSettings, MemoryQueue, MemoryScaler, Observation,
};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tokio::time::Instant;

/// Every layer switched on.
fn fully_layered() -> PolicyConfig {
    PolicyConfig {
        max_workers: 200,
        stabilize_up: Duration::from_secs(15),
        stabilize_down: Duration::from_secs(300),
        max_step_up: Some(StepLimitConfig {
            workers: 10,
            percent: 100,
            period: Duration::from_secs(15),
        }),
        max_step_down: Some(StepLimitConfig {
            workers: 2,
            percent: 10,
            period: Duration::from_secs(60),
        }),
        fallback: Some(FallbackConfig {
            after_failures: 3,
            capacity: Some(2),
        }),
        ..PolicyConfig::default()
    }
}

fn decision_cost(c: &mut Criterion) {
    let mut policy = fully_layered().build().unwrap();
    let start = Instant::now();
    let mut tick = 0u64;
    c.bench_function("decision/fully_layered", |b| {
        b.iter(|| {
            // A moving backlog at 1 s ticks keeps the windows' histories at their steady size.
            tick += 1;
            let now = start + Duration::from_secs(tick);
            let mut obs = Observation::new((tick * 37) % 900, now);
            obs.in_flight = Some((tick * 13) % 40);
            obs.executing = Some((tick * 7) % 30);
            let current = ((tick * 11) % 50) as u32;
            let input = PolicyInput {
                observation: Some(&obs),
                consecutive_failures: 0,
                capacity: Capacity {
                    desired: current,
                    running: current,
                    pending: 0,
                },
                now,
                wall: std::time::SystemTime::UNIX_EPOCH,
            };
            black_box(decide_guarded(policy.as_mut(), black_box(&input)))
        })
    });
}

fn tick_overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let build = || {
        let mut auto = Autoscaler::new();
        for i in 0..1_000u64 {
            let q = MemoryQueue::new();
            q.publish_n("celery", i % 50);
            let settings = LoopSettings {
                name: format!("binding-{i}"),
                ..LoopSettings::default()
            };
            let b = Binding::new(
                settings,
                Box::new(q),
                Box::new(MemoryScaler::new((i % 7) as u32)),
                fully_layered().build().unwrap(),
            )
            .unwrap();
            auto = auto.with_binding(b);
        }
        auto
    };
    c.bench_function("tick/1000_bindings_memory", |b| {
        b.iter_batched(
            build,
            |mut auto| rt.block_on(async { black_box(auto.tick_all().await) }),
            BatchSize::LargeInput,
        )
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).sample_size(20);
    targets = decision_cost, tick_overhead
}
criterion_main!(benches);
