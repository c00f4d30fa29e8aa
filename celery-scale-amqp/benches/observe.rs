//! One observation of 1, 100 and 1,000 queues against the RabbitMQ at `CELERY_SCALE_AMQP_URL`:
//! `AmqpQueueSource::observe` (passive declares pipelined on one channel) side by side with the
//! same passive declares sent one after another (each awaiting its reply), and the source with
//! the management API (`CELERY_SCALE_RABBITMQ_MGMT_URL`) read as well.
//!
//! ```sh
//! eval "$(scripts/services.sh)"
//! cargo bench -p celery-scale-amqp --bench observe
//! ```

use std::time::Duration;

use celery_scale_amqp::{AmqpQueueSource, AmqpSourceConfig, ManagementConfig};
use celery_scale_core::QueueSource;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

const SIZES: [usize; 3] = [1, 100, 1000];

async fn setup(amqp: &str, prefix: &str, n: usize) -> (Connection, Channel, Vec<String>) {
    let conn = Connection::connect(amqp, ConnectionProperties::default())
        .await
        .expect("connect to CELERY_SCALE_AMQP_URL");
    let ch = conn.create_channel().await.unwrap();
    // Confirms: every message is in its queue before the counts are compared.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{n}-{i}")).collect();
    // The broker deletes them 10 minutes after last use, should the bench be interrupted.
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    for (i, q) in names.iter().enumerate() {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            args.clone(),
        )
        .await
        .unwrap();
        // A few messages in every tenth queue, so counts are not all zero.
        if i % 10 == 0 {
            for _ in 0..3 {
                ch.basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            }
        }
    }
    (conn, ch, names)
}

async fn sequential(ch: &Channel, names: &[String]) -> u64 {
    let mut ready = 0;
    for q in names {
        let queue = ch
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        ready += u64::from(queue.message_count());
    }
    ready
}

fn observe(c: &mut Criterion) {
    let Ok(amqp) = std::env::var("CELERY_SCALE_AMQP_URL") else {
        eprintln!("skipping: CELERY_SCALE_AMQP_URL is not set (eval \"$(scripts/services.sh)\")");
        return;
    };
    let mgmt = std::env::var("CELERY_SCALE_RABBITMQ_MGMT_URL").ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("csa-bench-{}", std::process::id());
    let mut group = c.benchmark_group("observe");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(4));
    for n in SIZES {
        let (conn, ch, names) = rt.block_on(setup(&amqp, &prefix, n));
        let _guard = rt.enter();
        let pipelined = AmqpQueueSource::new(
            AmqpSourceConfig::builder(amqp.as_str())
                .queues(names.iter().cloned())
                .heartbeats(false)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        )
        .unwrap();
        let expected = rt.block_on(sequential(&ch, &names));
        assert_eq!(rt.block_on(pipelined.observe()).unwrap().ready, expected);

        group.bench_with_input(BenchmarkId::new("pipelined_source", n), &n, |b, _| {
            b.to_async(&rt)
                .iter(|| async { pipelined.observe().await.unwrap().ready })
        });
        group.bench_with_input(BenchmarkId::new("sequential_declares", n), &n, |b, _| {
            b.to_async(&rt).iter(|| sequential(&ch, &names))
        });
        if let Some(mgmt) = &mgmt {
            let with_mgmt = AmqpQueueSource::new(
                AmqpSourceConfig::builder(amqp.as_str())
                    .queues(names.iter().cloned())
                    .heartbeats(false)
                    .management(
                        ManagementConfig::new(mgmt.as_str()).with_timeout(Duration::from_secs(20)),
                    )
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap(),
            )
            .unwrap();
            group.bench_with_input(BenchmarkId::new("source_with_management", n), &n, |b, _| {
                b.to_async(&rt)
                    .iter(|| async { with_mgmt.observe().await.unwrap().ready })
            });
        }
        rt.block_on(async {
            for q in &names {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = conn.close(200, "".into()).await;
        });
    }
    group.finish();
}

criterion_group!(benches, observe);
criterion_main!(benches);
