//! One observation of 1, 100 and 10,000 queues x 4 priority keys: the source's single pipeline
//! against a loop of one round trip per command (the same `LLEN` and `LINDEX -1` per key, and
//! `HLEN unacked`), side by side.
//!
//! Needs a real Redis: `CELERY_SCALE_REDIS_URL=redis://127.0.0.1:6379 cargo bench -p
//! celery-scale-redis --bench observe`. Without it the bench says so and does nothing.

use std::time::Duration;

use celery_scale_core::QueueSource;
use celery_scale_redis::{RedisQueueSource, RedisSourceConfig};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const SIZES: [usize; 3] = [1, 100, 10_000];

fn message(queue: &str) -> String {
    serde_json::json!({
        "body": "W1sxLjBdLCB7fSwgeyJjYWxsYmFja3MiOiBudWxsfV0=",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": "celery_scale_test.sleep", "id": "x", "eta": null, "published_at": 1.7e9},
        "properties": {"delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": "t"},
    })
    .to_string()
}

fn observe(c: &mut Criterion) {
    let Ok(url) = std::env::var("CELERY_SCALE_REDIS_URL") else {
        eprintln!("observe bench skipped: CELERY_SCALE_REDIS_URL is not set");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("csr-bench-{}:", std::process::id());
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = rt
        .block_on(client.get_multiplexed_async_connection())
        .expect("connect to CELERY_SCALE_REDIS_URL");
    let max = *SIZES.iter().max().unwrap();
    let queues: Vec<String> = (0..max).map(|i| format!("q{i}")).collect();
    // One waiting message in every queue's bare key (its other three step keys are empty).
    rt.block_on(async {
        for chunk in queues.chunks(1000) {
            let mut pipe = redis::pipe();
            for q in chunk {
                pipe.cmd("LPUSH")
                    .arg(format!("{prefix}{q}"))
                    .arg(message(q))
                    .ignore();
            }
            let _: () = pipe.query_async(&mut conn).await.unwrap();
        }
    });

    let mut group = c.benchmark_group("observe");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    for &n in &SIZES {
        let config = RedisSourceConfig::builder(url.as_str())
            .queues(queues[..n].iter().cloned())
            .global_keyprefix(&prefix)
            .publish_time_field("published_at")
            .heartbeats(false)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let source = rt.block_on(async { RedisQueueSource::new(config).unwrap() });
        let obs = rt.block_on(source.observe()).unwrap();
        assert_eq!(obs.ready, n as u64);
        group.bench_with_input(BenchmarkId::new("pipelined", n), &n, |b, _| {
            b.to_async(&rt)
                .iter(|| async { source.observe().await.unwrap() });
        });
        // Without the tail messages (oldest_age = false): LLEN per key and HLEN only.
        let lengths_only = rt.block_on(async {
            RedisQueueSource::new(RedisSourceConfig {
                oldest_age: false,
                ..source.config().clone()
            })
            .unwrap()
        });
        group.bench_with_input(BenchmarkId::new("pipelined_without_age", n), &n, |b, _| {
            b.to_async(&rt)
                .iter(|| async { lengths_only.observe().await.unwrap() });
        });

        let keys: Vec<String> = queues[..n]
            .iter()
            .flat_map(|q| {
                let bare = format!("{prefix}{q}");
                [0, 3, 6, 9].map(|p| {
                    if p == 0 {
                        bare.clone()
                    } else {
                        format!("{bare}\x06\x16{p}")
                    }
                })
            })
            .collect();
        if n == max {
            // 80,001 sequential round trips per iteration: a few seconds each.
            group.measurement_time(Duration::from_secs(30));
        }
        group.bench_with_input(BenchmarkId::new("per_key_loop", n), &n, |b, _| {
            b.to_async(&rt).iter(|| {
                let mut conn = conn.clone();
                let keys = &keys;
                let unacked = format!("{prefix}unacked");
                async move {
                    let mut ready = 0u64;
                    let mut tails = 0usize;
                    for key in keys {
                        let len: u64 = redis::cmd("LLEN")
                            .arg(key)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        ready += len;
                        let tail: Option<Vec<u8>> = redis::cmd("LINDEX")
                            .arg(key)
                            .arg(-1)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        tails += tail.map_or(0, |t| t.len());
                    }
                    let in_flight: u64 = redis::cmd("HLEN")
                        .arg(&unacked)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    (ready, tails, in_flight)
                }
            });
        });
    }
    group.finish();

    rt.block_on(async {
        for chunk in queues.chunks(1000) {
            let keys: Vec<String> = chunk.iter().map(|q| format!("{prefix}{q}")).collect();
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    });
}

criterion_group!(benches, observe);
criterion_main!(benches);
