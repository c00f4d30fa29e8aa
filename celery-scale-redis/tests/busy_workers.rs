//! Unknown is never zero, with real Celery on real Redis: the shipped default policy never
//! lowers capacity below the workers that are busy when it cannot see them. Three moments:
//! a loop that starts (or restarts) while workers run long tasks, a Redis outage and a
//! worker-event subscription that keeps being cut, and `-P solo` workers, which send no
//! heartbeat while a task runs.
//!
//! Needs CELERY_SCALE_REDIS_URL and CELERY_SCALE_PYTHON (scripts/test.sh).

mod common;

use std::time::Duration;

use celery_scale_core::config::PolicyConfig;
use celery_scale_core::record::DecisionRecord;
use celery_scale_core::{Binding, LoopSettings, MemoryScaler, QueueSource};
use celery_scale_redis::{InFlightMode, RedisQueueSource, RedisSourceConfig};
use common::{CeleryWorker, RedisServer, celery_env, celery_publish, poll, unique, with_db};
use serde_json::json;

/// This file's database: its tests count held messages per queue, so they can share it.
const DB: u32 = 7;

fn source(broker: &str, queue: &str, worker: &str) -> RedisQueueSource {
    RedisQueueSource::new(
        RedisSourceConfig::builder(broker)
            .queue(queue)
            .in_flight(InFlightMode::PerQueue)
            .worker_hostname(format!("{worker}*"))
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// A fresh binding with the shipped default policy on `target`, but with 5 s scale-in windows
/// (`stabilize_down`, `scale_to_zero_after`; 30 s by default): shorter than each test's run, so
/// that a fresh loop's window cannot be what holds the busy workers, only the rules for them.
fn binding(name: &str, source: RedisQueueSource, target: &MemoryScaler) -> Binding {
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

/// The scale-in windows of these tests' policy.
const SHORT_WINDOW: Duration = Duration::from_secs(5);

/// Ticks `b` for `run`, asserting after every tick that the target keeps at least `floor`;
/// returns the records.
async fn never_below(
    b: &mut Binding,
    target: &MemoryScaler,
    floor: u32,
    run: Duration,
    worker: &CeleryWorker,
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

/// Two worker nodes (one per unit, as on ECS or EC2), named `{name}-a@host` and
/// `{name}-b@host`, each with one process and one message at a time: with `acks_late` the
/// executing task counts against the prefetch, so the first node up cannot reserve the
/// second task while it runs the first (with the early ack it could).
fn two_nodes(py: &str, broker: &str, queue: &str, name: &str) -> [CeleryWorker; 2] {
    let one = ["-c", "1", "--prefetch-multiplier", "1"];
    ["a", "b"].map(|n| {
        CeleryWorker::start_with(
            py,
            broker,
            &json!({}),
            &json!({"task_acks_late": true}),
            queue,
            &format!("{name}-{n}"),
            &one,
        )
    })
}

/// Waits until a separate source sees the workers named `name*` executing `n` tasks with an
/// empty queue.
async fn wait_executing(broker: &str, queue: &str, name: &str, n: u64) {
    let watch = source(broker, queue, name);
    poll(
        "the worker executing its tasks",
        Duration::from_secs(40),
        || async {
            let obs = watch.observe().await.ok()?;
            (obs.ready == 0 && obs.executing == Some(n)).then_some(())
        },
    )
    .await;
    watch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_loop_keeps_busy_workers_through_its_warm_up() {
    let Some((redis, py)) = celery_env() else {
        return;
    };
    let broker = with_db(&redis, DB);
    let queue = unique("busy-start");
    let name = unique("busy-start-w");
    let workers = two_nodes(&py, &broker, &queue, &name);
    let worker = &workers[0];
    celery_publish(
        &py,
        &broker,
        &json!({}),
        &["--queue", &queue, "--count", "2", "--seconds", "40"],
    )
    .await;
    wait_executing(&broker, &queue, &name, 2).await;

    // Two units (one worker node each), both busy, the queue empty. A daemon starts (or restarts)
    // now: its first ticks know nothing of the executing tasks.
    let target = MemoryScaler::new(2);
    let mut b = binding("busy-start", source(&broker, &queue, &name), &target);
    let records = never_below(&mut b, &target, 2, Duration::from_secs(15), worker).await;
    let first = records[0].observation.as_ref().unwrap();
    assert!(
        first.workers_unknown.is_some(),
        "the first tick is within the warm-up: {first:?}"
    );
    let last = records.last().unwrap().observation.as_ref().unwrap();
    assert_eq!(last.executing, Some(2), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_and_a_cut_subscription_never_scale_in_under_busy_workers() {
    let Some((_, py)) = celery_env() else {
        return;
    };
    let mut server = RedisServer::start(0, &[]);
    let broker = format!("redis://127.0.0.1:{}/0", server.port);
    let queue = unique("busy-outage");
    let name = unique("busy-outage-w");
    let workers = two_nodes(&py, &broker, &queue, &name);
    let worker = &workers[0];
    celery_publish(
        &py,
        &broker,
        &json!({}),
        &["--queue", &queue, "--count", "2", "--seconds", "75"],
    )
    .await;
    wait_executing(&broker, &queue, &name, 2).await;
    let target = MemoryScaler::new(2);
    let mut b = binding("busy-outage", source(&broker, &queue, &name), &target);
    never_below(&mut b, &target, 2, Duration::from_secs(8), worker).await;

    // The worker-event subscription is cut every 2 s for 16 s (the worker's own PUB/SUB
    // connections too; it reconnects).
    let killer = redis::Client::open(broker.as_str()).unwrap();
    let mut conn = killer.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..8 {
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .unwrap();
        never_below(&mut b, &target, 2, Duration::from_secs(2), worker).await;
    }

    // Redis goes away for 15 s and comes back empty; the worker's tasks run on.
    server.kill();
    let during = never_below(&mut b, &target, 2, Duration::from_secs(15), worker).await;
    assert!(
        during.iter().any(|r| r.observation_error.is_some()),
        "observations failed while Redis was down"
    );
    server.restart();
    let after = never_below(&mut b, &target, 2, Duration::from_secs(15), worker).await;
    assert!(
        after.iter().any(|r| r
            .observation
            .as_ref()
            .is_some_and(|o| o.executing == Some(2))),
        "the worker is heard again after Redis returned: {}\nworker log:\n{}",
        serde_json::to_string(after.last().unwrap()).unwrap(),
        worker.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_solo_workers_busy_on_long_tasks_are_kept() {
    let Some((redis, py)) = celery_env() else {
        return;
    };
    let broker = with_db(&redis, DB);
    let queue = unique("busy-solo");
    let name = unique("busy-solo-w");
    // Two solo workers, one task each: a solo worker sends no heartbeat while its task runs.
    let solo = ["-P", "solo", "--prefetch-multiplier", "1"];
    let workers = [
        CeleryWorker::start_with(
            &py,
            &broker,
            &json!({}),
            &json!({}),
            &queue,
            &format!("{name}-a"),
            &solo,
        ),
        CeleryWorker::start_with(
            &py,
            &broker,
            &json!({}),
            &json!({}),
            &queue,
            &format!("{name}-b"),
            &solo,
        ),
    ];
    // The loop runs and hears both before the tasks arrive.
    let target = MemoryScaler::new(2);
    let mut b = binding("busy-solo", source(&broker, &queue, &name), &target);
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
    celery_publish(
        &py,
        &broker,
        &json!({}),
        &["--queue", &queue, "--count", "2", "--seconds", "50"],
    )
    .await;
    let records = never_below(&mut b, &target, 2, Duration::from_secs(30), &workers[0]).await;
    let reasons = |records: &[DecisionRecord], word: &str| {
        records
            .iter()
            .filter_map(|r| r.observation.as_ref())
            .any(|o| {
                o.workers_unknown
                    .as_ref()
                    .is_some_and(|u| u.why.contains(word))
            })
    };
    assert!(
        reasons(&records, "silent"),
        "the busy solo workers went silent: {}",
        serde_json::to_string(records.last().unwrap()).unwrap()
    );
    // The daemon restarts while they are silent: a fresh loop never hears them, but their
    // held tasks say someone is busy.
    let mut fresh = binding(
        "busy-solo-restarted",
        source(&broker, &queue, &name),
        &target,
    );
    let records = never_below(&mut fresh, &target, 2, Duration::from_secs(10), &workers[1]).await;
    assert!(
        reasons(&records, "no worker heard"),
        "{}",
        serde_json::to_string(records.last().unwrap()).unwrap()
    );
}
