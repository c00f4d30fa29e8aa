//! Hardening against what the broker sends and how it fails: extreme numbers from the broker,
//! watched queues that do not exist (yet), the first observation after the broker is back, and
//! secrets at trace level.

mod common;

use celery_scale_amqp::{AmqpQueueSource, AmqpSourceConfig, ManagementConfig};
use celery_scale_core::QueueSource as _;
use common::*;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

/// Publishes one message per timestamp to `queue` (declared here), confirmed by the broker.
async fn publish_with_timestamps(amqp: &str, queue: &str, timestamps: &[u64]) {
    let conn = connect(amqp).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for &t in timestamps {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_timestamp(t),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    conn.close(200, "".into()).await.ok();
}

/// A message whose AMQP `timestamp` is `u64::MAX` (and another at 2^63) at the head of a queue:
/// the management API reports it as `head_message_timestamp`, and the source reads the queue
/// with an unknown age instead of panicking (it used `Duration::from_secs_f64` on it).
#[tokio::test]
async fn a_head_message_timestamp_of_u64_max_is_an_unknown_age_not_a_panic() {
    let Some((amqp, mgmt_url)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let huge = unique("ts-max");
    let half = unique("ts-2p63");
    let _cleanup = QueueCleanup::new(&amqp, &[&huge, &half]);
    publish_with_timestamps(&amqp, &huge, &[u64::MAX]).await;
    publish_with_timestamps(&amqp, &half, &[1 << 63]).await;
    // The API's statistics lag by up to 5 s.
    mgmt.wait_counts("/", &huge, (1, 0)).await;
    mgmt.wait_counts("/", &half, (1, 0)).await;
    let (_, raw) = mgmt.call("GET", &format!("/api/queues/%2F/{huge}"), None);
    eprintln!(
        "RabbitMQ reports head_message_timestamp = {}",
        raw["head_message_timestamp"]
    );
    assert!(
        raw["head_message_timestamp"].is_number(),
        "the broker reports the timestamp: {raw}"
    );
    for per_queue in [true, false] {
        let mut names = vec![huge.clone(), half.clone()];
        if !per_queue {
            // Above 8 queues the source reads the vhost's list instead (absent ones are
            // missing queues).
            names.extend((0..8).map(|i| format!("{huge}-absent-{i}")));
        }
        let source = AmqpQueueSource::new(
            AmqpSourceConfig::builder(amqp.as_str())
                .queues(names)
                .heartbeats(false)
                .management(ManagementConfig::new(mgmt_url.as_str()))
                .build()
                .unwrap(),
        )
        .unwrap();
        let obs = source.observe().await.expect("no panic, no error");
        assert_eq!(obs.ready, 2, "{obs:?}");
        assert_eq!(obs.oldest_age, None, "no usable timestamp: {obs:?}");
        let stats = source.management_stats().unwrap();
        let of = |q: &str| stats.iter().find(|s| s.name == q).unwrap().clone();
        assert_eq!(of(&huge).head_message_timestamp, None);
        assert_eq!(of(&huge).ready, Some(1), "the other figures are kept");
        assert_eq!(
            of(&half).head_message_age(std::time::SystemTime::now()),
            None
        );
    }
}
