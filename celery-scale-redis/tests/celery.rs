//! Against real Celery: the venv's `celery` publishes with `apply_async` (printing kombu's own
//! count) and runs workers; the source must read what kombu reads.

mod common;

use std::time::Duration;

use celery_scale_core::{Observation, QueueSource};
use celery_scale_redis::{
    InFlightMode, RedisQueueSource, RedisSourceConfig, RedisSourceConfigBuilder,
};
use common::*;
use serde_json::json;

fn source(config: RedisSourceConfigBuilder) -> RedisQueueSource {
    RedisQueueSource::new(config.build().unwrap()).unwrap()
}

fn kombu(out: &serde_json::Value, queue: &str) -> u64 {
    out["kombu_size"][queue]
        .as_u64()
        .expect("kombu_size in publisher output")
}

fn ready_of(obs: &Observation, queue: &str) -> u64 {
    obs.queues
        .iter()
        .find(|q| q.queue == queue)
        .expect("queue in breakdown")
        .ready
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_queue_matches_kombu() {
    let Some((url, python)) = celery_env() else {
        return;
    };
    let prefix = unique("default");
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let options = json!({"global_keyprefix": prefix});
    // No --queue: the app's default queue, "celery".
    let out = celery_publish(&python, &url, &options, &["--count", "7"]).await;
    let src = source(
        RedisSourceConfig::builder(url.as_str())
            .queue("celery")
            .global_keyprefix(&prefix)
            .heartbeats(false),
    );
    let obs = src.observe().await.unwrap();
    assert_eq!(obs.ready, 7);
    assert_eq!(obs.ready, kombu(&out, "celery"), "kombu's _size");
    assert_eq!(obs.in_flight, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_named_queues_without_prefix_match_kombu() {
    let Some((url, python)) = celery_env() else {
        return;
    };
    let base = unique("named");
    let queues: Vec<String> = (1..=3).map(|i| format!("{base}-q{i}")).collect();
    let _cleanup = Cleanup::new(
        &url,
        &[
            &format!("{}*", glob_escape(&base)),
            &format!("_kombu.binding*.{}*", glob_escape(&base)),
        ],
    );
    let options = json!({});
    for (i, q) in queues.iter().enumerate() {
        celery_publish(
            &python,
            &url,
            &options,
            &["--queue", q, "--count", &(i + 2).to_string()],
        )
        .await;
    }
    let mut args = vec!["--count", "0"];
    for q in &queues {
        args.extend(["--size-of", q.as_str()]);
    }
    let sizes = celery_publish(&python, &url, &options, &args).await;
    let src = source(
        RedisSourceConfig::builder(url.as_str())
            .queues(queues.clone())
            .in_flight(InFlightMode::PerQueue)
            .heartbeats(false),
    );
    let obs = src.observe().await.unwrap();
    for (i, q) in queues.iter().enumerate() {
        assert_eq!(ready_of(&obs, q), i as u64 + 2, "{q}");
        assert_eq!(
            ready_of(&obs, q),
            kombu(&sizes, q),
            "{q} against kombu's _size"
        );
    }
    assert_eq!(obs.ready, 2 + 3 + 4);
    assert_eq!(obs.in_flight, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_with_default_and_custom_steps_and_sep() {
    let Some((url, python)) = celery_env() else {
        return;
    };
    for (steps, sep) in [(vec![0u32, 3, 6, 9], "\x06\x16"), (vec![0, 5], ":")] {
        let prefix = unique("prio");
        let _cleanup = Cleanup::prefix(&url, &prefix);
        let options = json!({"global_keyprefix": prefix, "priority_steps": steps, "sep": sep});
        let mut last = json!(null);
        for p in 0..=9 {
            last = celery_publish(
                &python,
                &url,
                &options,
                &["--queue", "jobs", "--priority", &p.to_string()],
            )
            .await;
        }
        let src = source(
            RedisSourceConfig::builder(url.as_str())
                .queue("jobs")
                .global_keyprefix(&prefix)
                .priority_steps(steps.clone())
                .sep(sep)
                .heartbeats(false),
        );
        let obs = src.observe().await.unwrap();
        assert_eq!(obs.ready, 10, "steps {steps:?}");
        assert_eq!(
            obs.ready,
            kombu(&last, "jobs"),
            "kombu's _size, steps {steps:?}"
        );
        // The tasks really are spread over the step keys (a bare LLEN would miss them).
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let bare: u64 = redis::cmd("LLEN")
            .arg(format!("{prefix}jobs"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(bare < 10, "steps {steps:?}: bare key holds {bare}");
        // A source with kombu's defaults on a custom layout would miss them: the options matter.
        if sep != "\x06\x16" {
            let wrong = source(
                RedisSourceConfig::builder(url.as_str())
                    .queue("jobs")
                    .global_keyprefix(&prefix)
                    .heartbeats(false),
            );
            assert_eq!(wrong.observe().await.unwrap().ready, bare);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_keyprefix_and_non_zero_db() {
    let Some((url, python)) = celery_env() else {
        return;
    };
    let prefix = unique("prefixdb");
    let url5 = with_db(&url, 5);
    let _cleanup = Cleanup::prefix(&url5, &prefix);
    let options = json!({"global_keyprefix": prefix});
    let out = celery_publish(
        &python,
        &url5,
        &options,
        &["--queue", "reports", "--count", "4"],
    )
    .await;
    let src = source(
        RedisSourceConfig::builder(url5.as_str())
            .queue("reports")
            .global_keyprefix(&prefix)
            .heartbeats(false),
    );
    assert_eq!(src.db(), 5);
    let obs = src.observe().await.unwrap();
    assert_eq!(obs.ready, 4);
    assert_eq!(obs.ready, kombu(&out, "reports"));
    // The same queue name without the prefix, or in db 0, is another (empty) queue.
    for (u, p) in [(url5.as_str(), ""), (url.as_str(), prefix.as_str())] {
        let other = source(
            RedisSourceConfig::builder(u)
                .queue("reports")
                .global_keyprefix(p)
                .heartbeats(false),
        );
        assert_eq!(other.observe().await.unwrap().ready, 0, "{u} prefix {p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_time_stamp_gives_the_oldest_age() {
    let Some((url, python)) = celery_env() else {
        return;
    };
    let prefix = unique("stamp");
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let options = json!({"global_keyprefix": prefix});
    celery_publish_with(
        "redis_publish.py",
        &python,
        &url,
        &options,
        &["--queue", "q", "--count", "2"],
    )
    .await;
    let published = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    celery_publish_with(
        "redis_publish.py",
        &python,
        &url,
        &options,
        &["--queue", "q", "--count", "1"],
    )
    .await;
    let src = source(
        RedisSourceConfig::builder(url.as_str())
            .queue("q")
            .global_keyprefix(&prefix)
            .publish_time_field("published_at")
            .heartbeats(false),
    );
    let obs = src.observe().await.unwrap();
    let age = obs.oldest_age.expect("stamped messages have an age");
    assert!(
        age >= Duration::from_millis(1200),
        "the oldest (first) batch: {age:?}"
    );
    assert!(
        age <= published.elapsed() + Duration::from_secs(2),
        "{age:?}"
    );
    // Without the stamp Celery messages carry no publish time: no age.
    let plain = source(
        RedisSourceConfig::builder(url.as_str())
            .queue("q")
            .global_keyprefix(&prefix)
            .heartbeats(false),
    );
    assert_eq!(plain.observe().await.unwrap().oldest_age, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eta_task_is_in_flight_once_a_worker_holds_it() {
    let Some((url, python)) = celery_env() else {
        return;
    };
    let prefix = unique("eta");
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let options = json!({"global_keyprefix": prefix});
    celery_publish(
        &python,
        &url,
        &options,
        &["--queue", "later", "--countdown", "120"],
    )
    .await;
    let global = source(
        RedisSourceConfig::builder(url.as_str())
            .queue("later")
            .global_keyprefix(&prefix)
            .heartbeats(false),
    );
    let per_queue = source(
        RedisSourceConfig::builder(url.as_str())
            .queue("later")
            .global_keyprefix(&prefix)
            .in_flight(InFlightMode::PerQueue)
            .heartbeats(false),
    );
    let obs = global.observe().await.unwrap();
    assert_eq!(
        (obs.ready, obs.in_flight),
        (1, Some(0)),
        "waiting for a worker, it is ready"
    );
    // An ETA in the future says nothing about how long it has waited.
    assert_eq!(obs.oldest_age, None);

    let worker = CeleryWorker::start(
        &python,
        &url,
        &options,
        &json!({}),
        "later",
        &unique("etaw"),
    );
    let obs = poll(
        "the worker to take the ETA task",
        Duration::from_secs(30),
        || async {
            let obs = global.observe().await.unwrap();
            (obs.ready == 0).then_some(obs)
        },
    )
    .await;
    assert_eq!(
        obs.in_flight,
        Some(1),
        "held by the worker until its ETA: in flight\n{}",
        worker.log_tail()
    );
    let obs = per_queue.observe().await.unwrap();
    assert_eq!((obs.ready, obs.queues[0].in_flight), (0, Some(1)));
    drop(worker);
}

/// A live worker with concurrency 2 and prefetch multiplier 4, its heartbeats, and its warm
/// shutdown. Finished tasks are counted from the result backend (same prefix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_worker_prefetch_heartbeats_and_warm_shutdown() {
    let Some((url, python)) = celery_env() else {
        return;
    };
    const PUBLISHED: u64 = 20;
    let prefix = unique("live");
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let options = json!({"global_keyprefix": prefix});
    let config = json!({
        "result_backend": url,
        "result_backend_transport_options": {"global_keyprefix": prefix},
    });
    let name = unique("livew");
    let src = source(
        RedisSourceConfig::builder(url.as_str())
            .queue("work")
            .global_keyprefix(&prefix)
            .worker_hostname(format!("{name}@*")),
    );
    let per_queue = source(
        RedisSourceConfig::builder(url.as_str())
            .queue("work")
            .global_keyprefix(&prefix)
            .in_flight(InFlightMode::PerQueue)
            .heartbeats(false),
    );
    let out = celery_publish(
        &python,
        &url,
        &options,
        &[
            "--queue",
            "work",
            "--count",
            &PUBLISHED.to_string(),
            "--seconds",
            "4",
        ],
    )
    .await;
    assert_eq!(kombu(&out, "work"), PUBLISHED);
    let client = redis::Client::open(url.as_str()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    // Celery's Redis result backend puts "_" after a prefix that does not end in a separator.
    let finished_pattern = format!("{}*celery-task-meta-*", glob_escape(&prefix));
    let finished = move || {
        let mut conn = conn.clone();
        let pattern = finished_pattern.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut conn)
                .await
                .unwrap();
            keys.len() as u64
        }
    };

    let mut worker = CeleryWorker::start(&python, &url, &options, &config, "work", &name);
    // While it runs: the heartbeat sees the two executing tasks and one live worker.
    let obs = poll(
        "heartbeats with 2 executing tasks",
        Duration::from_secs(40),
        || async {
            let obs = src.observe().await.unwrap();
            (obs.executing == Some(2)).then_some(obs)
        },
    )
    .await;
    assert_eq!(obs.live_workers, Some(1), "{}", worker.log_tail());
    // Prefetch: concurrency 2 x multiplier 4 taken and unacknowledged (the two executing tasks
    // were acked when they started, Celery's default early ack).
    let (before, obs, after) = poll(
        "8 prefetched messages in unacked",
        Duration::from_secs(5),
        || async {
            let before = finished().await;
            let obs = src.observe().await.unwrap();
            let after = finished().await;
            (obs.in_flight == Some(8)).then_some((before, obs, after))
        },
    )
    .await;
    let outstanding = obs.ready + obs.in_flight.unwrap() + obs.executing.unwrap();
    assert!(
        (PUBLISHED - after..=PUBLISHED - before).contains(&outstanding),
        "ready {} + in flight {:?} + executing {:?} = {outstanding}, published {PUBLISHED}, finished {before}..{after}",
        obs.ready,
        obs.in_flight,
        obs.executing
    );
    assert_eq!(
        obs.outstanding(),
        obs.ready + 8,
        "in flight covers the executing ones"
    );
    let pq = per_queue.observe().await.unwrap();
    assert_eq!(
        pq.queues[0].in_flight,
        Some(8),
        "per-queue attribution of Celery's unacked"
    );
    // Ours agrees with kombu's own count (the worker may take more between the two reads).
    let ours_before = src.observe().await.unwrap().ready;
    let theirs = kombu_size(&python, &url, &options, "work").await;
    let ours_after = src.observe().await.unwrap().ready;
    assert!(
        (ours_after..=ours_before).contains(&theirs),
        "kombu {theirs}, ours {ours_before}..{ours_after}"
    );

    // Warm shutdown: the executing tasks finish, the prefetched ones go back to the queue.
    worker.terminate();
    assert!(
        worker.wait(Duration::from_secs(20)).await,
        "warm shutdown\n{}",
        worker.log_tail()
    );
    let done = finished().await;
    let obs = src.observe().await.unwrap();
    assert_eq!(
        obs.in_flight,
        Some(0),
        "nothing is held after the worker left\n{}",
        worker.log_tail()
    );
    assert_eq!(
        obs.ready,
        PUBLISHED - done,
        "prefetched messages are ready again ({done} finished)\n{}",
        worker.log_tail()
    );
    assert_eq!(obs.ready, kombu_size(&python, &url, &options, "work").await);
    let obs = poll(
        "no live worker after worker-offline",
        Duration::from_secs(10),
        || async {
            let obs = src.observe().await.unwrap();
            (obs.live_workers == Some(0)).then_some(obs)
        },
    )
    .await;
    assert_eq!(obs.executing, Some(0));
    src.shutdown().await;
}

/// Celery sends `worker-offline` when its warm shutdown **begins**, not when its last task ends
/// (Celery 5 stops the consumer, and its heartbeat, before waiting for the pool): a worker being
/// stopped is gone from the heartbeat count while it finishes its tasks. The policy counts busy
/// workers, and the simulator models warm shutdown, on this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_in_warm_shutdown_is_offline_while_its_tasks_finish() {
    let Some((url, python)) = celery_env() else {
        return;
    };
    let prefix = unique("warm");
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let options = json!({"global_keyprefix": prefix});
    let name = unique("warmw");
    let src = source(
        RedisSourceConfig::builder(url.as_str())
            .queue("work")
            .global_keyprefix(&prefix)
            .worker_hostname(format!("{name}@*")),
    );
    // Two 30-second tasks: one for each of the worker's two processes.
    celery_publish(
        &python,
        &url,
        &options,
        &["--queue", "work", "--count", "2", "--seconds", "30"],
    )
    .await;
    let mut worker = CeleryWorker::start(&python, &url, &options, &json!({}), "work", &name);
    poll(
        "heartbeats with 2 executing tasks",
        Duration::from_secs(40),
        || async {
            let obs = src.observe().await.unwrap();
            (obs.executing == Some(2) && obs.live_workers == Some(1)).then_some(())
        },
    )
    .await;
    worker.terminate();
    let obs = poll(
        "the worker offline while its tasks still run",
        Duration::from_secs(10),
        || async {
            let obs = src.observe().await.unwrap();
            (obs.live_workers == Some(0)).then_some(obs)
        },
    )
    .await;
    assert_eq!(obs.executing, Some(0), "its tasks are no longer counted");
    assert!(
        !worker.wait(Duration::from_millis(100)).await,
        "the warm shutdown is still finishing the 30-second tasks\n{}",
        worker.log_tail()
    );
    assert!(
        worker.wait(Duration::from_secs(45)).await,
        "warm shutdown ends once the tasks finish\n{}",
        worker.log_tail()
    );
    src.shutdown().await;
}
