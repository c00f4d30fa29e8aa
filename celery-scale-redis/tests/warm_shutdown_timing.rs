//! When a worker in warm shutdown gives its prefetched messages back, on real Celery on Redis.
//!
//! kombu's Redis transport restores a channel's unacknowledged messages when the channel
//! closes (`virtual.Channel.close` -> `QoS.restore_unacked_once` -> `restore_unacked`, kombu
//! 5.7), and a Celery worker closes it only at the end of its warm shutdown, once the task it
//! runs has finished. The simulator (`celery-scale-sim`) models warm shutdown on this timing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use redis::AsyncCommands as _;
use serde_json::json;

const TASK_S: f64 = 15.0;
const PREFETCHED: u64 = 4;

/// `(LLEN queue, HLEN unacked)` under `prefix`.
async fn counts(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> (u64, u64) {
    let ready: u64 = conn.llen(format!("{prefix}work")).await.unwrap();
    let held: u64 = conn.hlen(format!("{prefix}unacked")).await.unwrap();
    (ready, held)
}

/// A worker `-c 1 --prefetch-multiplier 4` runs a 15 s task and holds 4 more; SIGTERM while the
/// task runs: the 4 stay unacknowledged (not in the list) until the task ends, then are back in
/// the list as the worker exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_messages_come_back_when_the_running_task_ends() {
    let Some((url, python)) = celery_env() else {
        return;
    };
    let prefix = unique("warmtime");
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let options = json!({"global_keyprefix": prefix});
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    celery_publish(
        &python,
        &url,
        &options,
        &[
            "--queue",
            "work",
            "--count",
            &(PREFETCHED + 1).to_string(),
            "--seconds",
            &TASK_S.to_string(),
        ],
    )
    .await;
    assert_eq!(counts(&mut conn, &prefix).await, (PREFETCHED + 1, 0));
    let spawned = Instant::now();
    let mut worker = CeleryWorker::start_with(
        &python,
        &url,
        &options,
        &json!({}),
        "work",
        &unique("warmtimew"),
        &["-c", "1"],
    );
    // One task executing (acked when it started), four prefetched in `unacked`.
    let seen = poll(
        "one executing, four prefetched",
        Duration::from_secs(30),
        || {
            let mut conn = conn.clone();
            let prefix = prefix.clone();
            async move { (counts(&mut conn, &prefix).await == (0, PREFETCHED)).then(Instant::now) }
        },
    )
    .await;
    worker.terminate();
    let sigterm = Instant::now();
    // Poll every 100 ms until the prefetched messages are in the list again.
    let mut mid = None;
    let back = loop {
        let c = counts(&mut conn, &prefix).await;
        if sigterm.elapsed() >= Duration::from_secs(5) && mid.is_none() {
            mid = Some(c);
        }
        if c == (PREFETCHED, 0) {
            break Instant::now();
        }
        assert!(
            sigterm.elapsed() < Duration::from_secs(40),
            "prefetched messages not back 40 s after SIGTERM: {c:?}\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        worker.wait(Duration::from_secs(10)).await,
        "the worker exits\n{}",
        worker.log_tail()
    );
    let exited = Instant::now();
    let since_sigterm = back.duration_since(sigterm).as_secs_f64();
    eprintln!(
        "redis: SIGTERM {:.1} s after the worker was seen busy; prefetched back {since_sigterm:.1} s after SIGTERM, exit seen {:.1} s after that",
        sigterm.duration_since(seen).as_secs_f64(),
        exited.duration_since(back).as_secs_f64()
    );
    assert_eq!(
        mid,
        Some((0, PREFETCHED)),
        "5 s into the warm shutdown the prefetched messages are still held"
    );
    // The running task started after the worker was spawned and before it was seen busy, so it
    // ends within [spawned + 15 s, seen + 15 s]: the messages come back then, not at SIGTERM.
    let task = Duration::from_secs_f64(TASK_S);
    assert!(
        back + Duration::from_millis(500) >= spawned + task,
        "back {:.1} s after the worker started, before its 15 s task could end",
        back.duration_since(spawned).as_secs_f64()
    );
    assert!(
        back <= seen + task + Duration::from_secs(5),
        "back {:.1} s after the worker was seen busy: later than the task's end",
        back.duration_since(seen).as_secs_f64()
    );
}
