//! Against real Celery (celery 5.7, kombu's pyamqp transport) on real RabbitMQ: the default queue,
//! several named queues, a quorum queue, and a live worker whose prefetched tasks are in flight
//! (management API) and absent from the ready count (passive declare), whose executing tasks the
//! heartbeats report, and whose warm shutdown makes them ready again.
//!
//! Each test runs in its own throwaway vhost, so Celery's default queue `celery` and the
//! worker's events belong to the test alone.

mod common;

use std::time::Duration;

use celery_scale_amqp::{AmqpQueueSource, AmqpSourceConfig, DiscoveryConfig, ManagementConfig};
use celery_scale_core::{Observation, QueueSource};
use common::*;
use serde_json::json;

fn source(url: &str, mgmt: &str, queues: &[&str], heartbeats: bool) -> AmqpQueueSource {
    AmqpQueueSource::new(
        AmqpSourceConfig::builder(url)
            .queues(queues.iter().copied())
            .management(ManagementConfig::new(mgmt))
            .heartbeats(heartbeats)
            .heartbeat_warmup(Duration::from_millis(500))
            .build()
            .unwrap(),
    )
    .unwrap()
}

fn ready_of(obs: &Observation, queue: &str) -> u64 {
    obs.queues
        .iter()
        .find(|q| q.queue == queue)
        .unwrap_or_else(|| panic!("{queue} missing from {obs:?}"))
        .ready
}

#[tokio::test]
async fn default_queue_and_named_queues_read_as_kombu_counts_them() {
    let Some((amqp, mgmt_url, py)) = celery_env() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let vhost = Vhost::create(&mgmt, &amqp_user(&amqp), &unique("celery-q"));
    let broker = with_vhost(&amqp, &vhost.name);

    // Celery's default queue: `celery`, declared by Celery itself on publish.
    let out = publish(&py, &broker, &json!({}), &["--count", "7"]);
    assert_eq!(out["kombu_size"]["celery"], 7);
    // Several named queues.
    for (q, n) in [("emails", "2"), ("reports", "3"), ("thumbnails", "4")] {
        let out = publish(&py, &broker, &json!({}), &["--queue", q, "--count", n]);
        assert_eq!(out["kombu_size"][q].to_string(), n);
    }

    let source = source(
        &broker,
        &mgmt_url,
        &["celery", "emails", "reports", "thumbnails"],
        false,
    );
    let obs = source.observe().await.unwrap();
    assert_eq!(ready_of(&obs, "celery"), 7);
    assert_eq!(ready_of(&obs, "emails"), 2);
    assert_eq!(ready_of(&obs, "reports"), 3);
    assert_eq!(ready_of(&obs, "thumbnails"), 4);
    assert_eq!(obs.ready, 16);
    assert_eq!(obs.consumers, Some(0));
    assert_eq!(source.vhost(), vhost.name);

    // Discovery in the same vhost finds the same four queues.
    let discovering = AmqpQueueSource::new(
        AmqpSourceConfig::builder(broker.as_str())
            .management(ManagementConfig::new(mgmt_url.as_str()))
            .discovery(DiscoveryConfig::default())
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    let found = discovering.observe().await.unwrap();
    assert_eq!(found.ready, 16);
    let mut names = discovering.queues();
    names.sort();
    assert_eq!(names, ["celery", "emails", "reports", "thumbnails"]);
}

#[tokio::test]
async fn a_quorum_queue_counts_ready_and_unacknowledged_the_same_way() {
    let Some((amqp, mgmt_url, py)) = celery_env() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let vhost = Vhost::create(&mgmt, &amqp_user(&amqp), &unique("celery-quorum"));
    let broker = with_vhost(&amqp, &vhost.name);
    let config =
        json!({"task_default_queue_type": "quorum", "task_create_missing_queue_type": "quorum"});
    let out = publish(&py, &broker, &config, &["--queue", "jobs", "--count", "5"]);
    assert_eq!(out["kombu_size"]["jobs"], 5);

    let source = source(&broker, &mgmt_url, &["jobs"], false);
    let obs = source.observe().await.unwrap();
    assert_eq!(obs.ready, 5);
    let stats = source.management_stats().unwrap();
    assert_eq!(stats[0].queue_type.as_deref(), Some("quorum"), "{stats:?}");

    // A consumer takes 2 without acknowledging them: ready at once (AMQP), in flight once
    // the statistics catch up.
    let ch = connect(&broker).await.create_channel().await.unwrap();
    for _ in 0..2 {
        ch.basic_get(
            "jobs".into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .expect("a message");
    }
    assert_eq!(source.observe().await.unwrap().ready, 3, "live");
    mgmt.wait_counts(&vhost.name, "jobs", (3, 2)).await;
    let obs = source.observe().await.unwrap();
    assert_eq!((obs.ready, obs.in_flight), (3, Some(2)));
}

#[tokio::test]
async fn a_live_worker_holds_prefetched_tasks_in_flight_and_gives_them_back_on_warm_shutdown() {
    let Some((amqp, mgmt_url, py)) = celery_env() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let vhost = Vhost::create(&mgmt, &amqp_user(&amqp), &unique("celery-worker"));
    let broker = with_vhost(&amqp, &vhost.name);
    let queue = "work";
    // The source first, so its event consumer hears the worker come online.
    // Declared as Celery declares it (durable, no arguments).
    declare(&broker, &[queue], None).await;
    let source = source(&broker, &mgmt_url, &[queue], true);
    poll(
        "the worker-event consumer",
        Duration::from_secs(10),
        || async { source.is_consuming_heartbeats().then_some(()) },
    )
    .await;

    // 12 tasks of 20 s for a worker with 2 processes and prefetch multiplier 4: 2 execute (acked
    // when they start, Celery's default), 8 are prefetched (unacknowledged), 2 stay ready. The
    // tasks are long so that this state outlasts a slow worker start plus the management API's
    // 5 s statistics lag (with 8 s tasks it could end before both were seen on a loaded machine).
    publish(
        &py,
        &broker,
        &json!({}),
        &["--queue", queue, "--count", "12", "--seconds", "20"],
    );
    let mut worker = Worker::start(&py, &broker, queue, &unique("w"), &[]);
    let busy = poll(
        "2 executing, 8 in flight, 2 ready, 1 live worker",
        Duration::from_secs(40),
        || async {
            let obs = source.observe().await.ok()?;
            (obs.executing == Some(2)
                && obs.in_flight == Some(8)
                && obs.ready == 2
                && obs.live_workers == Some(1))
            .then_some(obs)
        },
    )
    .await;
    assert_eq!(busy.consumers, Some(1), "{busy:?}");
    assert_eq!(busy.outstanding(), 10);
    // The passive declare alone: the prefetched tasks are not in the ready count.
    let declared = source.declare_queues().await.unwrap();
    assert_eq!(declared[0].1.as_ref().unwrap().ready, 2);

    // Warm shutdown: the executing tasks finish, the prefetched ones are given back.
    worker.warm_shutdown(Duration::from_secs(40)).await;
    let idle = poll(
        "10 ready again, nothing in flight, no worker",
        Duration::from_secs(20),
        || async {
            let obs = source.observe().await.ok()?;
            (obs.ready == 10
                && obs.in_flight == Some(0)
                && obs.live_workers == Some(0)
                && obs.executing == Some(0))
            .then_some(obs)
        },
    )
    .await;
    assert_eq!(idle.consumers, Some(0), "{idle:?}");
    source.shutdown().await;
}
