//! Unknown is never zero, with real Celery on real RabbitMQ: the shipped default policy (with
//! short scale-in windows) never lowers capacity below the workers that are busy when it
//! cannot see them. Three moments: a loop that starts (or restarts) while workers run long
//! tasks, a worker-event feed whose connection the broker keeps closing, and `-P solo`
//! workers, which send no heartbeat while a task runs.
//!
//! Each test runs in its own throwaway vhost, so the queue and the worker events are its own.
//! Needs CELERY_SCALE_AMQP_URL, CELERY_SCALE_RABBITMQ_MGMT_URL and CELERY_SCALE_PYTHON.

mod common;

use std::time::Duration;

use celery_scale_amqp::{AmqpQueueSource, AmqpSourceConfig, ManagementConfig};
use celery_scale_core::config::PolicyConfig;
use celery_scale_core::record::DecisionRecord;
use celery_scale_core::{Binding, LoopSettings, MemoryScaler, QueueSource};
use common::*;
use serde_json::json;

/// The queue of every test (each in its own vhost).
const QUEUE: &str = "work";

/// The scale-in windows of these tests' policy (30 s by default): shorter than each test's
/// run, so that a fresh loop's window cannot be what holds the busy workers.
const SHORT_WINDOW: Duration = Duration::from_secs(5);

fn source(broker: &str, mgmt: &str, worker: &str, connection: &str) -> AmqpQueueSource {
    AmqpQueueSource::new(
        AmqpSourceConfig::builder(broker)
            .queue(QUEUE)
            .management(ManagementConfig::new(mgmt))
            .worker_hostname(format!("{worker}*"))
            .connection_name(connection)
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// A fresh binding with the shipped default policy, but 5 s scale-in windows, on `target`.
fn binding(name: &str, source: AmqpQueueSource, target: &MemoryScaler) -> Binding {
    Binding::new(
        LoopSettings {
            name: name.into(),
            interval: Duration::from_secs(1),
            ..LoopSettings::default()
        },
        Box::new(source),
        Box::new(target.clone()),
        PolicyConfig {
            stabilize_down: SHORT_WINDOW,
            scale_to_zero_after: SHORT_WINDOW,
            ..PolicyConfig::default()
        }
        .build()
        .unwrap(),
    )
    .unwrap()
}

/// Ticks `b` for `run`, asserting after every tick that the target keeps at least `floor`;
/// returns the records.
async fn never_below(
    b: &mut Binding,
    target: &MemoryScaler,
    floor: u32,
    run: Duration,
    worker: &celery_scale_testing::Worker,
) -> Vec<DecisionRecord> {
    let end = tokio::time::Instant::now() + run;
    let mut records = Vec::new();
    while tokio::time::Instant::now() < end {
        let r = b.tick().await;
        assert!(
            target.desired() >= floor,
            "scaled in under busy workers to {}: {}\nworker log:\n{}",
            target.desired(),
            serde_json::to_string(&r).unwrap(),
            worker.log_tail()
        );
        records.push(r);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    records
}

/// Two worker nodes (one per unit, as on ECS or EC2), `{name}-a@csa` and `{name}-b@csa`, each
/// with one process and, with `acks_late`, one message at a time, so each runs one task.
fn two_nodes(py: &str, broker: &str, name: &str) -> [celery_scale_testing::Worker; 2] {
    ["a", "b"].map(|n| {
        celery_scale_testing::WorkerCommand::new(py, broker)
            .queues(QUEUE)
            .name(&format!("{name}-{n}@csa"))
            .concurrency(1)
            .prefetch_multiplier(1)
            .config(&json!({"task_acks_late": true}))
            .args(&["--loglevel", "WARNING"])
            .spawn()
    })
}

/// Waits until a separate source sees the workers named `name*` executing `n` tasks with an
/// empty queue.
async fn wait_executing(broker: &str, mgmt: &str, name: &str, n: u64) {
    let watch = source(broker, mgmt, name, &unique("busy-watch"));
    poll(
        "the workers executing their tasks",
        Duration::from_secs(40),
        || async {
            let obs = watch.observe().await.ok()?;
            (obs.ready == 0 && obs.executing == Some(n)).then_some(())
        },
    )
    .await;
    watch.shutdown().await;
}

/// Whether some record's worker figures were unknown for a reason containing `word`.
fn unknown_because(records: &[DecisionRecord], word: &str) -> bool {
    records
        .iter()
        .filter_map(|r| r.observation.as_ref())
        .any(|o| {
            o.workers_unknown
                .as_ref()
                .is_some_and(|u| u.why.contains(word))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_loop_keeps_busy_workers_through_its_warm_up() {
    let Some((amqp, mgmt_url, py)) = celery_env() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let vhost = Vhost::create(&mgmt, &amqp_user(&amqp), &unique("busy-start"));
    let broker = with_vhost(&amqp, &vhost.name);
    declare(&broker, &[QUEUE], None).await;
    let name = unique("busy-start-w");
    let workers = two_nodes(&py, &broker, &name);
    publish(
        &py,
        &broker,
        &json!({}),
        &["--queue", QUEUE, "--count", "2", "--seconds", "40"],
    );
    wait_executing(&broker, &mgmt_url, &name, 2).await;

    // Two units (one worker node each), both busy, the queue empty. A daemon starts (or
    // restarts) now: its first ticks know nothing of the executing tasks.
    let target = MemoryScaler::new(2);
    let mut b = binding(
        "busy-start",
        source(&broker, &mgmt_url, &name, &unique("busy-start-c")),
        &target,
    );
    let records = never_below(&mut b, &target, 2, Duration::from_secs(15), &workers[0]).await;
    let first = records[0].observation.as_ref().unwrap();
    assert!(
        first.workers_unknown.is_some(),
        "the first tick is within the warm-up: {first:?}"
    );
    let last = records.last().unwrap().observation.as_ref().unwrap();
    assert_eq!(last.executing, Some(2), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_event_feed_never_scales_in_under_busy_workers() {
    let Some((amqp, mgmt_url, py)) = celery_env() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let vhost = Vhost::create(&mgmt, &amqp_user(&amqp), &unique("busy-cut"));
    let broker = with_vhost(&amqp, &vhost.name);
    declare(&broker, &[QUEUE], None).await;
    let name = unique("busy-cut-w");
    let workers = two_nodes(&py, &broker, &name);
    publish(
        &py,
        &broker,
        &json!({}),
        &["--queue", QUEUE, "--count", "2", "--seconds", "60"],
    );
    wait_executing(&broker, &mgmt_url, &name, 2).await;
    let connection = unique("busy-cut-c");
    let target = MemoryScaler::new(2);
    let mut b = binding(
        "busy-cut",
        source(&broker, &mgmt_url, &name, &connection),
        &target,
    );
    let before = never_below(&mut b, &target, 2, Duration::from_secs(8), &workers[0]).await;
    assert_eq!(
        before
            .last()
            .unwrap()
            .observation
            .as_ref()
            .unwrap()
            .executing,
        Some(2),
        "heard before the cuts"
    );

    // The broker closes the source's connection (its declares and its worker-event consumer)
    // every 2 s for 16 s; the source reconnects each time and its feed warms up again.
    let mut cut = 0;
    let mut during = Vec::new();
    for _ in 0..8 {
        cut += mgmt.close_connections_named(&connection);
        during.extend(never_below(&mut b, &target, 2, Duration::from_secs(2), &workers[0]).await);
    }
    assert!(cut > 0, "no connection named {connection} was closed");
    assert!(
        during.iter().any(|r| r.observation_error.is_some()
            || r.observation
                .as_ref()
                .is_some_and(|o| o.workers_unknown.is_some())),
        "the cuts left the worker figures unknown at some tick"
    );
    let after = never_below(&mut b, &target, 2, Duration::from_secs(15), &workers[0]).await;
    assert!(
        after.iter().any(|r| r
            .observation
            .as_ref()
            .is_some_and(|o| o.executing == Some(2))),
        "the workers are heard again after the cuts: {}\nworker log:\n{}",
        serde_json::to_string(after.last().unwrap()).unwrap(),
        workers[0].log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_solo_workers_busy_on_long_tasks_are_kept() {
    let Some((amqp, mgmt_url, py)) = celery_env() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let vhost = Vhost::create(&mgmt, &amqp_user(&amqp), &unique("busy-solo"));
    let broker = with_vhost(&amqp, &vhost.name);
    declare(&broker, &[QUEUE], None).await;
    let name = unique("busy-solo-w");
    // Two solo workers, each its own node, one task each: a solo worker sends no heartbeat
    // while its task runs.
    let workers = ["a", "b"].map(|n| {
        celery_scale_testing::WorkerCommand::new(&py, &broker)
            .queues(QUEUE)
            .name(&format!("{name}-{n}@csa"))
            .prefetch_multiplier(1)
            .args(&["-P", "solo", "--loglevel", "WARNING"])
            .spawn()
    });
    // The loop runs and hears both before the tasks arrive.
    let target = MemoryScaler::new(2);
    let mut b = binding(
        "busy-solo",
        source(&broker, &mgmt_url, &name, &unique("busy-solo-c")),
        &target,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let r = b.tick().await;
        if r.observation.as_ref().and_then(|o| o.live_workers) == Some(2) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "both solo workers beating: {}",
            serde_json::to_string(&r).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    publish(
        &py,
        &broker,
        &json!({}),
        &["--queue", QUEUE, "--count", "2", "--seconds", "50"],
    );
    let records = never_below(&mut b, &target, 2, Duration::from_secs(30), &workers[0]).await;
    assert!(
        unknown_because(&records, "silent"),
        "the busy solo workers went silent: {}",
        serde_json::to_string(records.last().unwrap()).unwrap()
    );
    // The daemon restarts while they are silent: a fresh loop never hears them, but their
    // held (unacknowledged) tasks say someone is busy.
    let mut fresh = binding(
        "busy-solo-restarted",
        source(&broker, &mgmt_url, &name, &unique("busy-solo-c")),
        &target,
    );
    let records = never_below(&mut fresh, &target, 2, Duration::from_secs(10), &workers[1]).await;
    assert!(
        unknown_because(&records, "no worker heard"),
        "{}",
        serde_json::to_string(records.last().unwrap()).unwrap()
    );
}
