//! Helpers shared by the Redis integration tests: a kombu-shaped fixture, real Celery
//! (publisher and worker), throwaway redis-server processes, and key cleanup.
#![allow(dead_code)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use celery_scale_core::BoxError;
use celery_scale_core::conformance::QueueFixture;
use celery_scale_testing::service as service_url;
use redis::AsyncCommands as _;
use serde_json::json;

pub mod certs;

/// The shared Redis, or `None` (skip) when unset outside CI.
pub fn redis_url() -> Option<String> {
    service_url("CELERY_SCALE_REDIS_URL")
}

/// The shared Redis and the venv Python with Celery, or `None` (skip).
pub fn celery_env() -> Option<(String, String)> {
    Some((redis_url()?, service_url("CELERY_SCALE_PYTHON")?))
}

#[allow(unused_imports)]
pub use celery_scale_testing::{free_port, poll, unique};

/// `redis://host:port` plus `/db`.
pub fn with_db(url: &str, db: u32) -> String {
    format!("{}/{db}", url.trim_end_matches('/'))
}

/// Deletes every key matching the patterns (in database `db`) when dropped, pass or fail.
pub struct Cleanup {
    url: String,
    patterns: Vec<String>,
}

impl Cleanup {
    /// Cleans keys of `url` (which names the database) matching `patterns` (Redis globs).
    pub fn new(url: &str, patterns: &[&str]) -> Self {
        Cleanup {
            url: url.to_string(),
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
        }
    }

    /// Cleans every key starting with `prefix`.
    pub fn prefix(url: &str, prefix: &str) -> Self {
        Cleanup::new(url, &[&format!("{}*", glob_escape(prefix))])
    }
}

pub fn glob_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let esc = matches!(c, '*' | '?' | '[' | ']' | '\\').then_some('\\');
            esc.into_iter().chain(std::iter::once(c))
        })
        .collect()
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        for pattern in &self.patterns {
            let keys: Vec<Vec<u8>> = match redis::cmd("KEYS").arg(pattern).query(&mut conn) {
                Ok(k) => k,
                Err(_) => continue,
            };
            for chunk in keys.chunks(500) {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query(&mut conn);
            }
        }
    }
}

/// Pushes and takes messages exactly as kombu's Redis transport does: `LPUSH` of a JSON
/// envelope to the priority key; a worker `RPOP`s (kombu `BRPOP`s) the keys in priority order and
/// records the message in `unacked` (`HSET tag [message, exchange, routing_key]`) and
/// `unacked_index` (`ZADD time tag`); ack removes both.
pub struct KombuFixture {
    conn: redis::aio::MultiplexedConnection,
    pub prefix: String,
    pub steps: Vec<u32>,
    pub sep: String,
    taken: Mutex<Vec<String>>,
}

impl KombuFixture {
    pub async fn connect(client: &redis::Client, prefix: &str) -> Self {
        KombuFixture {
            conn: client
                .get_multiplexed_async_connection()
                .await
                .expect("fixture connects to Redis"),
            prefix: prefix.to_string(),
            steps: vec![0, 3, 6, 9],
            sep: "\x06\x16".into(),
            taken: Mutex::new(Vec::new()),
        }
    }

    /// kombu's `_q_for_pri`: the key of `priority` in `queue`.
    pub fn key(&self, queue: &str, priority: u32) -> String {
        let step = self
            .steps
            .iter()
            .rev()
            .find(|&&s| s <= priority)
            .copied()
            .unwrap_or(self.steps[self.steps.len() - 1]);
        if step == 0 {
            format!("{}{queue}", self.prefix)
        } else {
            format!("{}{queue}{}{step}", self.prefix, self.sep)
        }
    }

    fn keys(&self, queue: &str) -> Vec<String> {
        let mut keys: Vec<String> = self.steps.iter().map(|&p| self.key(queue, p)).collect();
        keys.dedup();
        keys
    }

    /// A Celery protocol-2 message as kombu stores it, with an optional publish time header.
    pub fn envelope(queue: &str, priority: u32, published_at: Option<f64>) -> String {
        static TAG: AtomicU64 = AtomicU64::new(0);
        let id = unique("task");
        let body = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&json!([[1.0], {}, {"callbacks": null}])).unwrap());
        json!({
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py", "task": "celery_scale_test.sleep", "id": id, "eta": null,
                "expires": null, "retries": 0, "root_id": id, "parent_id": null,
                "published_at": published_at,
            },
            "properties": {
                "correlation_id": id,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": priority,
                "body_encoding": "base64",
                "delivery_tag": format!("tag-{}-{}", std::process::id(), TAG.fetch_add(1, Ordering::Relaxed)),
            },
        })
        .to_string()
    }

    pub async fn publish_with(
        &self,
        queue: &str,
        priority: u32,
        published_at: Option<f64>,
    ) -> Result<(), BoxError> {
        let mut conn = self.conn.clone();
        let _: () = conn
            .lpush(
                self.key(queue, priority),
                Self::envelope(queue, priority, published_at),
            )
            .await?;
        Ok(())
    }

    /// Every tag taken and not acknowledged.
    pub fn taken(&self) -> Vec<String> {
        self.taken.lock().unwrap().clone()
    }
}

#[async_trait]
impl QueueFixture for KombuFixture {
    async fn purge(&self, queue: &str) -> Result<(), BoxError> {
        let mut conn = self.conn.clone();
        let _: () = conn.del(self.keys(queue)).await?;
        self.ack_all(queue).await
    }

    async fn publish(&self, queue: &str, n: u64) -> Result<(), BoxError> {
        for _ in 0..n {
            self.publish_with(queue, 0, None).await?;
        }
        Ok(())
    }

    async fn take(&self, queue: &str, n: u64) -> Result<(), BoxError> {
        let mut conn = self.conn.clone();
        for _ in 0..n {
            let mut raw: Option<String> = None;
            for key in self.keys(queue) {
                raw = conn.rpop(&key, None).await?;
                if raw.is_some() {
                    break;
                }
            }
            let raw = raw.ok_or("queue is empty")?;
            let msg: serde_json::Value = serde_json::from_str(&raw)?;
            let tag = msg["properties"]["delivery_tag"]
                .as_str()
                .ok_or("message without delivery_tag")?
                .to_string();
            let info = &msg["properties"]["delivery_info"];
            let entry = json!([msg, info["exchange"], info["routing_key"]]).to_string();
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
            let _: () = redis::pipe()
                .zadd(format!("{}unacked_index", self.prefix), &tag, now)
                .hset(format!("{}unacked", self.prefix), &tag, entry)
                .query_async(&mut conn)
                .await?;
            self.taken.lock().unwrap().push(tag);
        }
        Ok(())
    }

    async fn ack_all(&self, _queue: &str) -> Result<(), BoxError> {
        let tags = std::mem::take(&mut *self.taken.lock().unwrap());
        if tags.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let _: () = redis::pipe()
            .zrem(format!("{}unacked_index", self.prefix), &tags)
            .hdel(format!("{}unacked", self.prefix), &tags)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    fn reports_in_flight(&self) -> bool {
        true
    }
}

/// Runs the Celery test app's publisher against `broker` with transport `options` and returns
/// kombu's own ready count per queue it printed.
pub async fn celery_publish(
    python: &str,
    broker: &str,
    options: &serde_json::Value,
    args: &[&str],
) -> serde_json::Value {
    celery_publish_with("publish.py", python, broker, options, args).await
}

/// As [`celery_publish`], with another publisher script (e.g. `redis_publish.py`).
pub async fn celery_publish_with(
    script: &str,
    python: &str,
    broker: &str,
    options: &serde_json::Value,
    args: &[&str],
) -> serde_json::Value {
    let (script, python, broker) = (script.to_string(), python.to_string(), broker.to_string());
    let options = options.clone();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        celery_scale_testing::publish_script(&script, &python, &broker, &options, &json!({}), &args)
    })
    .await
    .expect("the publisher thread")
}

/// kombu's `_size` of `queue` now (publishes nothing).
pub async fn kombu_size(
    python: &str,
    broker: &str,
    options: &serde_json::Value,
    queue: &str,
) -> u64 {
    let out = celery_publish(
        python,
        broker,
        options,
        &["--count", "0", "--queue", queue, "--size-of", queue],
    )
    .await;
    out["kombu_size"][queue].as_u64().expect("kombu_size")
}

/// A real Celery worker (prefork, `-c 2 --prefetch-multiplier 4`) named `{name}@%h`: the shared
/// [`celery_scale_testing::Worker`] with this crate's defaults.
pub struct CeleryWorker(pub celery_scale_testing::Worker);

impl CeleryWorker {
    /// `celery -A app worker -c 2 --prefetch-multiplier 4 -Q queues -n name@%h`, with transport
    /// `options` and extra Celery settings `config`.
    pub fn start(
        python: &str,
        broker: &str,
        options: &serde_json::Value,
        config: &serde_json::Value,
        queues: &str,
        name: &str,
    ) -> Self {
        Self::start_with(python, broker, options, config, queues, name, &[])
    }

    /// As [`CeleryWorker::start`], with extra worker arguments (later ones win, e.g.
    /// `-P solo --prefetch-multiplier 1`).
    pub fn start_with(
        python: &str,
        broker: &str,
        options: &serde_json::Value,
        config: &serde_json::Value,
        queues: &str,
        name: &str,
        extra: &[&str],
    ) -> Self {
        let worker = celery_scale_testing::WorkerCommand::new(python, broker)
            .concurrency(2)
            .prefetch_multiplier(4)
            .queues(queues)
            .name(&format!("{name}@%h"))
            .transport_options(options)
            .config(config)
            .args(extra)
            .spawn();
        CeleryWorker(worker)
    }

    /// Waits up to `deadline` for the main process to exit; whether it did.
    pub async fn wait(&mut self, deadline: Duration) -> bool {
        self.0.exited_within(deadline).await
    }
}

impl std::ops::Deref for CeleryWorker {
    type Target = celery_scale_testing::Worker;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// Throwaway servers need only the redis-server binary; in CI a missing binary fails the test.
pub fn have_redis_server() -> bool {
    let ok = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "redis-server is not installed and CI=true");
        eprintln!("skipping: redis-server is not installed");
    }
    ok
}

/// A throwaway `redis-server`: the shared [`celery_scale_testing::RedisServer`].
pub struct RedisServer(pub celery_scale_testing::RedisServer);

impl RedisServer {
    /// Starts one on a free port (`port` must be 0) with extra `redis-server` arguments.
    pub fn start(port: u16, extra: &[String]) -> Self {
        assert_eq!(port, 0, "the shared RedisServer picks its own free port");
        RedisServer(celery_scale_testing::RedisServer::start_with(extra))
    }
}

impl std::ops::Deref for RedisServer {
    type Target = celery_scale_testing::RedisServer;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for RedisServer {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// A `worker-heartbeat` (or online/offline) event as Celery publishes it on Redis PUB/SUB.
pub fn worker_event(kind: &str, hostname: &str, active: u64, processed: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let inner = json!({
        "hostname": hostname, "utcoffset": 0, "pid": 1, "clock": 1, "freq": 2.0,
        "active": active, "processed": processed, "loadavg": [0.0, 0.0, 0.0],
        "sw_ident": "py-celery", "sw_ver": "5.7.0", "sw_sys": "Linux",
        "timestamp": now, "type": kind,
    });
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(inner.to_string()),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"hostname": hostname},
        "properties": {"delivery_mode": 1, "delivery_info": {"exchange": "celeryev", "routing_key": "worker.heartbeat"}, "priority": 0, "body_encoding": "base64", "delivery_tag": unique("ev")},
    })
    .to_string()
}
