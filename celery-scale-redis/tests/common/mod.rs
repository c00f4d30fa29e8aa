//! Helpers shared by the Redis integration tests: a kombu-shaped fixture, real Celery
//! (publisher and worker), throwaway redis-server processes, and key cleanup.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use celery_scale_core::BoxError;
use celery_scale_core::conformance::{QueueFixture, service_url};
use redis::AsyncCommands as _;
use serde_json::json;

/// The shared Redis, or `None` (skip) when unset outside CI.
pub fn redis_url() -> Option<String> {
    service_url("CELERY_SCALE_REDIS_URL")
}

/// The shared Redis and the venv Python with Celery, or `None` (skip).
pub fn celery_env() -> Option<(String, String)> {
    Some((redis_url()?, service_url("CELERY_SCALE_PYTHON")?))
}

/// A name no other test (in this or another process) uses.
pub fn unique(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "csr-{name}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `redis://host:port` plus `/db`.
pub fn with_db(url: &str, db: u32) -> String {
    format!("{}/{db}", url.trim_end_matches('/'))
}

/// Polls `f` every 100 ms until it returns `Some`, or panics after `deadline` saying `what`.
pub async fn poll<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// Where the shared Celery test app lives.
pub fn celery_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testing/celery")
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
    let out = tokio::process::Command::new(python)
        .arg(script)
        .args(args)
        .current_dir(celery_dir())
        .env("PYTHONPATH", celery_dir())
        .env("CELERY_SCALE_TEST_BROKER", broker)
        .env("CELERY_SCALE_TEST_OPTIONS", options.to_string())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run the Celery publisher");
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{script} printed {stdout:?}: {e}"))
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

/// A real Celery worker (prefork) in its own process group, killed with the group when dropped.
pub struct CeleryWorker {
    child: Option<tokio::process::Child>,
    pub pid: i32,
    pub hostname: String,
    pub log: PathBuf,
}

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
        let celery = PathBuf::from(python).with_file_name("celery");
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).expect("worker log file");
        let child = tokio::process::Command::new(celery)
            .args([
                "-A",
                "app",
                "worker",
                "-c",
                "2",
                "--prefetch-multiplier",
                "4",
            ])
            .args(["--without-mingle", "--without-gossip", "-l", "INFO"])
            .args(["-Q", queues, "-n", &format!("{name}@%h")])
            .args(extra)
            .current_dir(celery_dir())
            .env("PYTHONPATH", celery_dir())
            .env("CELERY_SCALE_TEST_BROKER", broker)
            .env("CELERY_SCALE_TEST_OPTIONS", options.to_string())
            .env("CELERY_SCALE_TEST_CONFIG", config.to_string())
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .expect("start a Celery worker");
        let pid = child.id().expect("worker pid") as i32;
        CeleryWorker {
            child: Some(child),
            pid,
            hostname: name.to_string(),
            log,
        }
    }

    /// The worker's log so far, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Sends SIGTERM (Celery's warm shutdown) to the main process.
    pub fn terminate(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
    }

    /// Waits for the main process to exit.
    pub async fn wait(&mut self, deadline: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        matches!(
            tokio::time::timeout(deadline, child.wait()).await,
            Ok(Ok(_))
        )
    }
}

impl Drop for CeleryWorker {
    fn drop(&mut self) {
        // The whole group: the main process and its prefork children.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.pid)])
            .stderr(Stdio::null())
            .status();
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.try_wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; good enough for a throwaway server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway `redis-server` (no persistence), killed when dropped.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    args: Vec<String>,
}

impl RedisServer {
    /// Starts `redis-server --port <port> --save '' --appendonly no <extra>` and waits until it
    /// answers. `port` 0 picks a free one. With `tls_port` the plain port is 0 (TLS only).
    pub fn start(port: u16, extra: &[String]) -> Self {
        let port = if port == 0 { free_port() } else { port };
        let mut args = vec![
            "--bind".to_string(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--daemonize".into(),
            "no".into(),
        ];
        let tls = extra.iter().any(|a| a == "--tls-port");
        if !tls {
            args.extend(["--port".into(), port.to_string()]);
        }
        args.extend(extra.iter().cloned());
        let mut server = RedisServer {
            child: None,
            port,
            args,
        };
        server.restart();
        server
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again with the same arguments and waits until it listens.
    pub fn restart(&mut self) {
        self.kill();
        let child = std::process::Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services.sh installs it)");
        self.child = Some(child);
        let listen_port = self
            .args
            .iter()
            .position(|a| a == "--tls-port")
            .map(|i| self.args[i + 1].parse().unwrap())
            .unwrap_or(self.port);
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", listen_port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "throwaway redis-server did not listen on {listen_port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
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
