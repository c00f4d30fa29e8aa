//! End to end, ECS + Redis: a real Celery producer publishes a burst to real Redis; the control
//! loop reads it with the Redis source and sets an ECS service's desired count on moto; a real
//! Celery worker drains the queue; after the scale-in window the service is back at its minimum.
//!
//! Needs CELERY_SCALE_REDIS_URL, CELERY_SCALE_MOTO_URL and CELERY_SCALE_PYTHON (scripts/test.sh).

mod common;

use std::time::Duration;

use celery_scale::config::{PolicyConfig, PolicyKind};
use celery_scale::ecs::aws_sdk_ecs::Client;
use celery_scale::ecs::aws_sdk_ecs::types::ContainerDefinition;
use celery_scale::ecs::{AwsSettings, EcsServiceConfig, EcsServices};
use celery_scale::record::Outcome;
use celery_scale::redis::{RedisQueueSource, RedisSourceConfig};
use celery_scale::{Binding, LoopSettings};
use celery_scale_testing::service as service_url;
use common::{Worker, python, tick_until, unique};

const DB: u32 = 11;

async fn ecs(moto: &str) -> Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(moto)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(celery_scale::ecs::aws_sdk_ecs::config::Credentials::new(
            "testing", "testing", None, None, "e2e",
        ))
        .load()
        .await;
    Client::new(&config)
}

async fn desired(c: &Client, cluster: &str) -> i32 {
    c.describe_services()
        .cluster(cluster)
        .services("workers")
        .send()
        .await
        .expect("describe on moto")
        .services()[0]
        .desired_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_on_redis_scales_an_ecs_service_out_and_back_in() {
    let (Some(redis), Some(moto), Some(py)) = (
        service_url("CELERY_SCALE_REDIS_URL"),
        service_url("CELERY_SCALE_MOTO_URL"),
        service_url("CELERY_SCALE_PYTHON"),
    ) else {
        return;
    };
    let broker = format!("{}/{DB}", redis.trim_end_matches('/'));
    let queue = unique("e2e-ecs");
    let cluster = unique("e2e-cluster");
    let client = ecs(&moto).await;
    client
        .create_cluster()
        .cluster_name(&cluster)
        .send()
        .await
        .unwrap();
    client
        .register_task_definition()
        .family("celery-worker")
        .container_definitions(
            ContainerDefinition::builder()
                .name("worker")
                .image("python:3.12")
                .memory(512)
                .build(),
        )
        .send()
        .await
        .unwrap();
    client
        .create_service()
        .cluster(&cluster)
        .service_name("workers")
        .task_definition("celery-worker")
        .desired_count(0)
        .send()
        .await
        .unwrap();

    let source = RedisQueueSource::new(
        RedisSourceConfig::builder(broker.as_str())
            .queue(&queue)
            // The service's 4 tasks are moto's: one local worker drains the queue for them, and
            // a daemon that heard one worker for 4 running units would rightly hold them. This
            // test is about the backlog, so it reads no heartbeats.
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    let services = EcsServices::new(
        client.clone(),
        AwsSettings::default().cache_ttl(Duration::ZERO),
    )
    .unwrap();
    let scaler = services
        .scaler(
            EcsServiceConfig::new(&cluster, "workers")
                .workers_per_task(2)
                .unwrap(),
        )
        .unwrap();
    let policy = PolicyConfig {
        kind: PolicyKind::TargetBacklog,
        messages_per_worker: 5.0,
        min_workers: 0,
        max_workers: 20,
        stabilize_down: Duration::from_secs(3),
        scale_to_zero_after: Duration::from_secs(3),
        ..PolicyConfig::default()
    };
    let mut binding = Binding::new(
        LoopSettings {
            name: "e2e-ecs".into(),
            interval: Duration::from_secs(1),
            ..LoopSettings::default()
        },
        Box::new(source),
        Box::new(scaler),
        policy.build().unwrap(),
    )
    .unwrap();

    // A burst of 40 real Celery tasks: 40 / 5 = 8 workers = 4 tasks of 2 workers.
    python(
        &py,
        &broker,
        &[
            "publish.py",
            "--queue",
            &queue,
            "--count",
            "40",
            "--seconds",
            "0.05",
        ],
    );
    tick_until(&mut binding, Duration::from_secs(20), "scale out", |r| {
        matches!(r.outcome, Outcome::Set { to: 4, .. })
    })
    .await;
    assert_eq!(
        desired(&client, &cluster).await,
        4,
        "moto saw the new desired count"
    );

    // A real worker drains the queue; after the window the service returns to 0.
    let _worker = Worker::start(&py, &broker, &queue, &[]);
    tick_until(
        &mut binding,
        Duration::from_secs(60),
        "scale back in",
        |r| matches!(r.outcome, Outcome::Set { to: 0, .. }),
    )
    .await;
    assert_eq!(desired(&client, &cluster).await, 0, "back to the minimum");
    let _ = python(
        &py,
        &broker,
        &[
            "-c",
            &format!("import redis; redis.Redis.from_url({broker:?}).delete({queue:?})"),
        ],
    );
}

/// A stub of the ECS agent: records the JSON body of every
/// `PUT /task-protection/v1/state` and answers 200 (any other request fails the test).
struct StubAgent {
    url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    server: tokio::task::JoinHandle<()>,
}

impl StubAgent {
    async fn start() -> Self {
        use std::sync::{Arc, Mutex};
        use tokio::io::AsyncWriteExt;
        let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let record = Arc::clone(&seen);
        let server = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let Some((head, body)) =
                        celery_scale_testing::read_http_request(&mut sock).await
                    else {
                        return;
                    };
                    let request_line = head.lines().next().unwrap_or_default().to_string();
                    let value = if request_line.starts_with("PUT /task-protection/v1/state ") {
                        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
                    } else {
                        serde_json::json!({ "unexpected request": request_line })
                    };
                    record.lock().unwrap().push(value);
                    let _ = sock
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                        )
                        .await;
                });
            }
        });
        StubAgent { url, seen, server }
    }

    /// Waits (with a deadline) until the agent has seen `want` requests, then checks that no
    /// more arrive for a moment, and returns them as "protect"/"release" (anything else is kept
    /// as its JSON text so that the assertion shows it).
    async fn wait_for(&self, want: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.seen.lock().unwrap().len() < want && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(
                |b| match (&b["ProtectionEnabled"], b["ExpiresInMinutes"].as_u64()) {
                    (serde_json::Value::Bool(true), Some(1..=2880)) => "protect".to_string(),
                    (serde_json::Value::Bool(false), None) => "release".to_string(),
                    _ => b.to_string(),
                },
            )
            .collect()
    }
}

impl Drop for StubAgent {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn delete_queue(py: &str, broker: &str, queue: &str) {
    let _ = python(
        py,
        broker,
        &[
            "-c",
            &format!("import redis; redis.Redis.from_url({broker:?}).delete({queue:?})"),
        ],
    );
}

/// The scale-in protection recipe (testing/celery/ecs_protection.py, documented in
/// docs/ecs.md): a real Celery worker (4 prefork processes) with the recipe loaded and
/// ECS_AGENT_URI pointing at a local stub of the ECS agent asks for protection once when its
/// first task starts and releases it once when the last one ends, and again for the next burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protection_recipe_protects_while_busy_and_releases_when_idle() {
    let (Some(redis), Some(py)) = (
        service_url("CELERY_SCALE_REDIS_URL"),
        service_url("CELERY_SCALE_PYTHON"),
    ) else {
        return;
    };
    let agent = StubAgent::start().await;
    let broker = format!("{}/{DB}", redis.trim_end_matches('/'));
    let queue = unique("e2e-protect");
    let record = std::env::temp_dir().join(format!("{queue}.json"));
    let _worker = Worker::start_with_env(
        &py,
        &broker,
        &queue,
        &["-I", "ecs_protection"],
        &[
            ("ECS_AGENT_URI", agent.url.as_str()),
            ("CELERY_SCALE_PROTECTION_FILE", record.to_str().unwrap()),
        ],
    );
    let burst = |count: &str| {
        python(
            &py,
            &broker,
            &[
                "publish.py",
                "--queue",
                &queue,
                "--count",
                count,
                "--seconds",
                "1",
            ],
        )
    };
    // Three tasks run at once on the worker's processes: one protect, one release.
    burst("3");
    assert_eq!(agent.wait_for(2).await, ["protect", "release"]);
    // The next burst protects again.
    burst("2");
    assert_eq!(
        agent.wait_for(4).await,
        ["protect", "release", "protect", "release"]
    );
    delete_queue(&py, &broker, &queue);
    let _ = std::fs::remove_file(record);
}

/// A worker process SIGKILLed in the middle of a task (as the OOM killer does) never sends
/// `task_postrun`; the recipe drops its entry the next time the record is touched, so the
/// worker does not stay protected for good: the next task protects and, when it ends, releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protection_recipe_forgets_a_process_killed_mid_task() {
    let (Some(redis), Some(py)) = (
        service_url("CELERY_SCALE_REDIS_URL"),
        service_url("CELERY_SCALE_PYTHON"),
    ) else {
        return;
    };
    let agent = StubAgent::start().await;
    let broker = format!("{}/{DB}", redis.trim_end_matches('/'));
    let queue = unique("e2e-protect-kill");
    let record = std::env::temp_dir().join(format!("{queue}.json"));
    let _worker = Worker::start_with_env(
        &py,
        &broker,
        &queue,
        &["-I", "ecs_protection"],
        &[
            ("ECS_AGENT_URI", agent.url.as_str()),
            ("CELERY_SCALE_PROTECTION_FILE", record.to_str().unwrap()),
        ],
    );
    let publish = |seconds: &str| {
        python(
            &py,
            &broker,
            &[
                "publish.py",
                "--queue",
                &queue,
                "--count",
                "1",
                "--seconds",
                seconds,
            ],
        )
    };
    publish("30");
    assert_eq!(agent.wait_for(1).await, ["protect"]);
    // The recipe's record names the process running the task: kill it.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    let pids: Vec<u64> = state["active"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|p| p.as_u64())
        .collect();
    assert_eq!(pids.len(), 1, "{state}");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pids[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(agent.wait_for(1).await, ["protect"], "nothing released it");
    // The next task finds the dead process's entry, drops it, protects and releases.
    publish("0.2");
    assert_eq!(agent.wait_for(3).await, ["protect", "protect", "release"]);
    delete_queue(&py, &broker, &queue);
    let _ = std::fs::remove_file(record);
}
