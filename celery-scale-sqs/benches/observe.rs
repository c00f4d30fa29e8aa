//! One observation of 1,000 SQS queues on moto: bounded concurrency (16 calls under way) against
//! the one-by-one loop (concurrency 1: each `GetQueueAttributes` waits for the one before), in one
//! run. Needs moto (`CELERY_SCALE_MOTO_URL`, set by scripts/services.sh):
//!
//!   CELERY_SCALE_MOTO_URL=http://127.0.0.1:5000 cargo bench -p celery-scale-sqs --bench observe

use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use celery_scale_core::QueueSource;
use celery_scale_sqs::{AwsSettings, DiscoveryConfig, SqsQueueSource, SqsSourceConfig};
use criterion::{Criterion, criterion_group, criterion_main};
use futures::StreamExt;

const QUEUES: usize = 1000;

fn client(moto: &str) -> Client {
    Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(moto)
            .credentials_provider(Credentials::new("testing", "testing", None, None, "bench"))
            .build(),
    )
}

fn bench(c: &mut Criterion) {
    let Ok(moto) = std::env::var("CELERY_SCALE_MOTO_URL") else {
        eprintln!("skipping: CELERY_SCALE_MOTO_URL is not set (scripts/services.sh sets it)");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("bench{}-", std::process::id());
    let sdk = client(&moto);
    rt.block_on(async {
        futures::stream::iter(0..QUEUES)
            .map(|i| {
                let sdk = &sdk;
                let name = format!("{prefix}q{i}");
                async move { sdk.create_queue().queue_name(name).send().await.unwrap() }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
    });
    let host = moto.trim_start_matches("http://").trim_end_matches('/');
    let make = |concurrency: usize| {
        let config = SqsSourceConfig::builder()
            .url(format!("sqs://testing:testing@{host}"))
            .queue_name_prefix(&prefix)
            .discovery(DiscoveryConfig {
                refresh: Duration::from_secs(3600),
                exclude: Vec::new(),
            })
            .concurrency(concurrency)
            .build()
            .unwrap();
        let settings = AwsSettings::default()
            .region("us-east-1")
            .call_timeout(Duration::from_secs(30));
        rt.block_on(async {
            let s = SqsQueueSource::from_settings(&settings, config)
                .await
                .unwrap();
            // Lists the queues once; the timed reads make only GetQueueAttributes calls.
            let obs = s.observe().await.unwrap();
            assert_eq!(obs.queues.len(), QUEUES);
            s
        })
    };
    let bounded = make(16);
    let one_by_one = make(1);
    let mut g = c.benchmark_group("observe_1000_queues");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("concurrency_16", |b| {
        b.to_async(&rt)
            .iter(|| async { bounded.observe().await.unwrap() })
    });
    g.bench_function("one_by_one", |b| {
        b.to_async(&rt)
            .iter(|| async { one_by_one.observe().await.unwrap() })
    });
    g.finish();
    rt.block_on(async {
        let out = sdk
            .list_queues()
            .queue_name_prefix(&prefix)
            .max_results(1000)
            .send()
            .await
            .unwrap();
        futures::stream::iter(out.queue_urls().to_vec())
            .map(|u| {
                let sdk = &sdk;
                async move {
                    let _ = sdk.delete_queue().queue_url(u).send().await;
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
