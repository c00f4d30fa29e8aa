//! When a worker in warm shutdown gives its prefetched messages back, on real Celery on
//! RabbitMQ: unacknowledged messages return to the queue when the consumer's channel closes,
//! which a Celery worker does at the end of its warm shutdown, once its running task has
//! finished. The simulator (`celery-scale-sim`) models warm shutdown on this timing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const TASK_S: f64 = 15.0;
const PREFETCHED: u64 = 4;

/// A worker `-c 1 --prefetch-multiplier 4` runs a 15 s task and holds 4 more unacknowledged;
/// SIGTERM while the task runs: the ready count (passive declare, live) stays 0 until the task
/// ends, then the 4 are ready again.
#[tokio::test]
async fn prefetched_messages_come_back_when_the_running_task_ends() {
    let Some((amqp, mgmt_url, py)) = celery_env() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let vhost = Vhost::create(&mgmt, &amqp_user(&amqp), &unique("celery-warmtime"));
    let broker = with_vhost(&amqp, &vhost.name);
    let queue = "work";
    publish(
        &py,
        &broker,
        &json!({}),
        &[
            "--queue",
            queue,
            "--count",
            &(PREFETCHED + 1).to_string(),
            "--seconds",
            &TASK_S.to_string(),
        ],
    );
    let source = celery_scale_amqp::AmqpQueueSource::new(
        celery_scale_amqp::AmqpSourceConfig::builder(broker.as_str())
            .queues([queue])
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    let ready = || async {
        let declared = source.declare_queues().await.unwrap();
        declared[0].1.as_ref().expect("the queue exists").ready
    };
    assert_eq!(ready().await, PREFETCHED + 1);
    let spawned = Instant::now();
    let mut worker = Worker::start(&py, &broker, queue, &unique("w"), &["-c", "1"]);
    // All five taken: one executing (acked when it started), four unacknowledged.
    let seen = poll("all five taken", Duration::from_secs(30), || async {
        (ready().await == 0).then(Instant::now)
    })
    .await;
    mgmt.wait_counts(&vhost.name, queue, (0, PREFETCHED)).await;
    assert!(
        seen.elapsed() < Duration::from_secs(TASK_S as u64 / 2),
        "the statistics lag left too little of the task to test the shutdown"
    );
    worker.0.terminate();
    let sigterm = Instant::now();
    let mut mid = None;
    let back = loop {
        let r = ready().await;
        if sigterm.elapsed() >= Duration::from_secs(3) && mid.is_none() {
            mid = Some(r);
        }
        if r == PREFETCHED {
            break Instant::now();
        }
        assert!(
            sigterm.elapsed() < Duration::from_secs(40),
            "prefetched messages not ready 40 s after SIGTERM: {r} ready\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        worker.0.exited_within(Duration::from_secs(10)).await,
        "the worker exits\n{}",
        worker.log_tail()
    );
    let exited = Instant::now();
    eprintln!(
        "rabbitmq: SIGTERM {:.1} s after all were taken; prefetched ready {:.1} s after SIGTERM, exit seen {:.1} s after that",
        sigterm.duration_since(seen).as_secs_f64(),
        back.duration_since(sigterm).as_secs_f64(),
        exited.duration_since(back).as_secs_f64()
    );
    assert_eq!(
        mid,
        Some(0),
        "3 s into the warm shutdown the prefetched messages are still held"
    );
    let task = Duration::from_secs_f64(TASK_S);
    assert!(
        back + Duration::from_millis(500) >= spawned + task,
        "ready {:.1} s after the worker started, before its 15 s task could end",
        back.duration_since(spawned).as_secs_f64()
    );
    assert!(
        back <= seen + task + Duration::from_secs(5),
        "ready {:.1} s after all were taken: later than the task's end",
        back.duration_since(seen).as_secs_f64()
    );
}
