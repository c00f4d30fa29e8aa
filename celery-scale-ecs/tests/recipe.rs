//! The worker-side recipe (testing/celery/ecs_protection.py) with a real Celery worker, a stub
//! of the ECS agent's protection endpoint and of the task metadata endpoint v4: once it has
//! released protection, a task whose desired status is STOPPED takes no more work (the worker
//! begins its warm shutdown and the rest stay queued), and one whose desired status is RUNNING
//! goes on working.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_scale_testing::{WorkerCommand, publish_script, service, unique};

/// What the stub has seen: "protect", "release" or "metadata" (a `GET .../task`), in order.
type Seen = Arc<Mutex<Vec<String>>>;

/// A stub answering `PUT /task-protection/v1/state` (the agent) and `GET /meta/task` (the
/// metadata endpoint: `DesiredStatus` is `stopped_after_release` once a release was seen, else
/// RUNNING). Anything else is recorded as unexpected.
async fn stub(stopped_after_release: bool) -> (String, Seen, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let Some((head, body)) = celery_scale_testing::read_http_request(&mut sock).await
                else {
                    return;
                };
                let line = head.lines().next().unwrap_or_default().to_string();
                let answer = if line.starts_with("PUT /task-protection/v1/state ") {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let what = match (&v["ProtectionEnabled"], v["ExpiresInMinutes"].as_u64()) {
                        (serde_json::Value::Bool(true), Some(1..=2880)) => "protect".into(),
                        (serde_json::Value::Bool(false), None) => "release".into(),
                        _ => v.to_string(),
                    };
                    record.lock().unwrap().push(what);
                    "{}".to_string()
                } else if line.starts_with("GET /meta/task ") {
                    let mut seen = record.lock().unwrap();
                    let released = seen.iter().any(|s| s == "release");
                    seen.push("metadata".into());
                    let desired = if released && stopped_after_release {
                        "STOPPED"
                    } else {
                        "RUNNING"
                    };
                    serde_json::json!({
                        "Cluster": "prod",
                        "TaskARN": "arn:aws:ecs:us-east-1:123456789012:task/prod/0123456789abcdef0123456789abcdef",
                        "DesiredStatus": desired,
                        "KnownStatus": "RUNNING",
                    })
                    .to_string()
                } else {
                    record.lock().unwrap().push(format!("unexpected {line}"));
                    "{}".to_string()
                };
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = sock.write_all(response.as_bytes()).await;
            });
        }
    });
    (url, seen, server)
}

/// Runs 3 one-second tasks through a one-process worker with the recipe loaded; returns what
/// the stub saw, whether the worker exited on its own, and how many tasks are still queued.
async fn run(stopped_after_release: bool) -> Option<(Vec<String>, bool, u64)> {
    let redis = service("CELERY_SCALE_REDIS_URL")?;
    let py = service("CELERY_SCALE_PYTHON")?;
    let (url, seen, server) = stub(stopped_after_release).await;
    // Its own keys and channels on the shared database: a unique global_keyprefix.
    let broker = format!("{}/0", redis.trim_end_matches('/'));
    let options = serde_json::json!({ "global_keyprefix": format!("{}:", unique("ecsprot")) });
    let queue = unique("recipe");
    let record = std::env::temp_dir().join(format!("{queue}.json"));
    let mut worker = WorkerCommand::new(&py, &broker)
        .queues(&queue)
        .concurrency(1)
        .prefetch_multiplier(1)
        .transport_options(&options)
        .args(&["-I", "ecs_protection"])
        .env("ECS_AGENT_URI", &url)
        .env("ECS_CONTAINER_METADATA_URI_V4", &format!("{url}/meta"))
        .env("CELERY_SCALE_PROTECTION_FILE", record.to_str().unwrap())
        .spawn();
    let none = serde_json::json!({});
    let publish = |count: &str| {
        publish_script(
            "publish.py",
            &py,
            &broker,
            &options,
            &none,
            &[
                "--queue",
                &queue,
                "--count",
                count,
                "--seconds",
                "1",
                "--size-of",
                &queue,
            ],
        )
    };
    publish("3");
    // Either the worker exits (warm shutdown) or all three tasks end: protect/release thrice.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut exited = false;
    while tokio::time::Instant::now() < deadline {
        exited = worker.has_exited();
        let releases = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| *s == "release")
            .count();
        if exited || releases == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    exited = exited || worker.has_exited();
    let left = publish("0")["kombu_size"][&queue]
        .as_u64()
        .unwrap_or_else(|| panic!("a queue size\n{}", worker.log_tail()));
    let log = worker.log_tail();
    worker.kill();
    server.abort();
    let _ = std::fs::remove_file(record);
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|s| s.starts_with("unexpected")),
        "{seen:?}\n{log}"
    );
    Some((seen, exited, left))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_release_a_stopping_task_takes_no_more_work() {
    let Some((seen, exited, left)) = run(true).await else {
        return;
    };
    assert_eq!(
        seen,
        ["metadata", "protect", "release", "metadata"],
        "the status read before protecting (RUNNING) and after releasing (STOPPED)"
    );
    assert!(exited, "the worker began its warm shutdown and exited");
    assert_eq!(left, 2, "the other two tasks were not taken: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_keeps_working_after_a_release() {
    let Some((seen, exited, left)) = run(false).await else {
        return;
    };
    assert!(!exited, "{seen:?}");
    assert_eq!(left, 0);
    let protects = seen.iter().filter(|s| *s == "protect").count();
    let releases = seen.iter().filter(|s| *s == "release").count();
    assert_eq!((protects, releases), (3, 3), "{seen:?}");
    // The status is read after each release and before each protect.
    assert_eq!(
        seen.iter().filter(|s| *s == "metadata").count(),
        6,
        "{seen:?}"
    );
}
