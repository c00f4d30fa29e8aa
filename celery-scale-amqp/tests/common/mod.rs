//! Helpers shared by the RabbitMQ integration tests: an AMQP fixture that publishes and takes as
//! Celery does, throwaway vhosts, real Celery (publisher and worker), a TCP proxy that can cut
//! the broker off, the management API, and (in [`scratch`]) throwaway RabbitMQ nodes with test
//! certificates for the restart and TLS tests.
#![allow(dead_code)]

pub mod scratch;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use celery_scale_core::BoxError;
use celery_scale_core::conformance::QueueFixture;
use celery_scale_testing::service as service_url;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};

/// The shared RabbitMQ, or `None` (skip) when unset outside CI.
pub fn amqp_url() -> Option<String> {
    service_url("CELERY_SCALE_AMQP_URL")
}

/// The shared RabbitMQ and its management API, or `None` (skip).
pub fn amqp_and_mgmt() -> Option<(String, String)> {
    Some((amqp_url()?, service_url("CELERY_SCALE_RABBITMQ_MGMT_URL")?))
}

/// RabbitMQ, its management API and the venv Python with Celery, or `None` (skip).
pub fn celery_env() -> Option<(String, String, String)> {
    let (amqp, mgmt) = amqp_and_mgmt()?;
    Some((amqp, mgmt, service_url("CELERY_SCALE_PYTHON")?))
}

pub use celery_scale_testing::{poll, unique};

/// `amqp://user:pw@host:port/` with another vhost (percent-encoded).
pub fn with_vhost(amqp: &str, vhost: &str) -> String {
    let (head, _) = amqp
        .rsplit_once('/')
        .expect("an AMQP URL with a vhost path");
    format!("{head}/{}", urlencode(vhost))
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The management API with the test credentials, through curl (the tests' admin side).
#[derive(Clone, Debug)]
pub struct Mgmt {
    base: String,
    user: String,
}

impl Mgmt {
    pub fn new(url: &str) -> Self {
        let parsed = url::Url::parse(url).expect("management URL");
        let user = format!(
            "{}:{}",
            parsed.username(),
            parsed.password().unwrap_or_default()
        );
        let mut base = parsed.clone();
        base.set_username("").unwrap();
        base.set_password(None).unwrap();
        Mgmt {
            base: base.as_str().trim_end_matches('/').to_string(),
            user,
        }
    }

    /// Runs `curl -X method path [body]`; returns (status, JSON body or Null).
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-u", &self.user, "-X", method, "-w", "\n%{http_code}"])
            .arg(format!("{}{path}", self.base));
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "-d", &b.to_string()]);
        }
        let out = cmd.output().expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (json, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (
            status.trim().parse().unwrap_or(0),
            serde_json::from_str(json).unwrap_or(Value::Null),
        )
    }

    /// `(messages_ready, messages_unacknowledged)` of a queue, once the API has statistics.
    pub fn counts(&self, vhost: &str, queue: &str) -> Option<(u64, u64)> {
        let (status, q) = self.call(
            "GET",
            &format!("/api/queues/{}/{}", urlencode(vhost), urlencode(queue)),
            None,
        );
        if status != 200 {
            return None;
        }
        Some((
            q.get("messages_ready")?.as_u64()?,
            q.get("messages_unacknowledged")?.as_u64()?,
        ))
    }

    /// Waits until the API's (lagging) statistics show `expected` for the queue.
    pub async fn wait_counts(&self, vhost: &str, queue: &str, expected: (u64, u64)) {
        poll(
            &format!("management stats of {queue} to read {expected:?}"),
            Duration::from_secs(20),
            || async { (self.counts(vhost, queue) == Some(expected)).then_some(()) },
        )
        .await
    }

    /// Force-closes every connection with this client-provided name (a real broker-side
    /// close: `CONNECTION_FORCED`). Returns how many were closed.
    pub fn close_connections_named(&self, name: &str) -> usize {
        let (_, conns) = self.call(
            "GET",
            "/api/connections?columns=name,client_properties",
            None,
        );
        let mut closed = 0;
        for c in conns.as_array().cloned().unwrap_or_default() {
            let provided = c["client_properties"]["connection_name"].as_str();
            if provided == Some(name) {
                let id = c["name"].as_str().unwrap();
                let (status, _) = self.call(
                    "DELETE",
                    &format!("/api/connections/{}", urlencode(id)),
                    None,
                );
                assert!(
                    status == 204 || status == 404,
                    "DELETE connection: {status}"
                );
                closed += 1;
            }
        }
        closed
    }

    /// Waits until the API (whose connection list lags by up to 5 s) shows `n` connections
    /// with this client-provided name.
    pub async fn wait_connections_named(&self, name: &str, n: usize) {
        poll(
            &format!("{n} connection(s) named {name}"),
            Duration::from_secs(20),
            || async { (self.connections_named(name) == n).then_some(()) },
        )
        .await
    }

    /// Connections with this client-provided name.
    pub fn connections_named(&self, name: &str) -> usize {
        let (_, conns) = self.call(
            "GET",
            "/api/connections?columns=name,client_properties",
            None,
        );
        conns
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|c| c["client_properties"]["connection_name"].as_str() == Some(name))
                    .count()
            })
            .unwrap_or(0)
    }
}

/// A throwaway vhost (with full permissions for the test user), deleted when dropped.
pub struct Vhost {
    pub name: String,
    mgmt: Mgmt,
}

impl Vhost {
    pub fn create(mgmt: &Mgmt, user: &str, name: &str) -> Self {
        let (s, _) = mgmt.call("PUT", &format!("/api/vhosts/{}", urlencode(name)), None);
        assert!(s == 201 || s == 204, "create vhost {name}: {s}");
        let (s, _) = mgmt.call(
            "PUT",
            &format!("/api/permissions/{}/{}", urlencode(name), urlencode(user)),
            Some(json!({"configure": ".*", "write": ".*", "read": ".*"})),
        );
        assert!(s == 201 || s == 204, "set permissions on {name}: {s}");
        Vhost {
            name: name.to_string(),
            mgmt: mgmt.clone(),
        }
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        self.mgmt.call(
            "DELETE",
            &format!("/api/vhosts/{}", urlencode(&self.name)),
            None,
        );
    }
}

/// The user name of an AMQP URL.
pub fn amqp_user(amqp: &str) -> String {
    url::Url::parse(amqp).unwrap().username().to_string()
}

/// Deletes queues (through the management API) when dropped, pass or fail.
pub struct QueueCleanup {
    mgmt: Option<Mgmt>,
    amqp: String,
    pub queues: Vec<String>,
}

impl QueueCleanup {
    pub fn new(amqp: &str, queues: &[&str]) -> Self {
        QueueCleanup {
            mgmt: service_url("CELERY_SCALE_RABBITMQ_MGMT_URL").map(|m| Mgmt::new(&m)),
            amqp: amqp.to_string(),
            queues: queues.iter().map(|q| q.to_string()).collect(),
        }
    }
}

impl Drop for QueueCleanup {
    fn drop(&mut self) {
        let vhost = vhost_of(&self.amqp);
        if let Some(m) = &self.mgmt {
            for q in &self.queues {
                m.call(
                    "DELETE",
                    &format!("/api/queues/{}/{}", urlencode(&vhost), urlencode(q)),
                    None,
                );
            }
        }
    }
}

/// The vhost an AMQP URL names.
pub fn vhost_of(amqp: &str) -> String {
    amqp.parse::<lapin::uri::AMQPUri>()
        .map(|u| u.vhost)
        .unwrap_or_else(|_| "/".into())
}

/// Connects to `amqp`.
pub async fn connect(amqp: &str) -> Connection {
    Connection::connect(amqp, ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ")
}

/// Declares durable queues as Celery does (`x-queue-type` when given).
pub async fn declare(amqp: &str, queues: &[&str], queue_type: Option<&str>) {
    let conn = connect(amqp).await;
    let ch = conn.create_channel().await.unwrap();
    for q in queues {
        let mut args = FieldTable::default();
        if let Some(t) = queue_type {
            args.insert("x-queue-type".into(), AMQPValue::LongString(t.into()));
        }
        ch.queue_declare((*q).into(), QueueDeclareOptions::durable(), args)
            .await
            .unwrap_or_else(|e| panic!("declare {q}: {e}"));
    }
    conn.close(200, "".into()).await.ok();
}

/// A Celery protocol-2 task message body for `sleep(0)`.
fn celery_body() -> Vec<u8> {
    serde_json::to_vec(
        &json!([[0.0], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]),
    )
    .unwrap()
}

fn celery_properties(id: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("lang".into(), AMQPValue::LongString("py".into()));
    headers.insert(
        "task".into(),
        AMQPValue::LongString("celery_scale_test.sleep".into()),
    );
    headers.insert("id".into(), AMQPValue::LongString(id.into()));
    headers.insert("root_id".into(), AMQPValue::LongString(id.into()));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_priority(0)
        .with_correlation_id(id.into())
        .with_headers(headers)
}

/// Publishes, takes (without ack) and acknowledges messages as a Celery producer and worker
/// would; with `mgmt` set, waits after each step until the management API's lagging
/// statistics show the new state, so a source reading them sees it.
pub struct AmqpFixture {
    conn: Connection,
    publisher: Channel,
    /// The "worker" channel holding unacknowledged messages.
    worker: tokio::sync::Mutex<Option<Channel>>,
    /// Delivery tags held, and expected (ready, unacked) per queue.
    state: Mutex<std::collections::HashMap<String, (u64, Vec<u64>)>>,
    vhost: String,
    mgmt: Option<Mgmt>,
}

impl AmqpFixture {
    pub async fn new(amqp: &str, queues: &[&str], mgmt: Option<Mgmt>) -> Self {
        declare(amqp, queues, None).await;
        let conn = connect(amqp).await;
        let publisher = conn.create_channel().await.unwrap();
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        AmqpFixture {
            conn,
            publisher,
            worker: tokio::sync::Mutex::new(None),
            state: Mutex::new(Default::default()),
            vhost: vhost_of(amqp),
            mgmt,
        }
    }

    fn expected(&self, queue: &str) -> (u64, u64) {
        let s = self.state.lock().unwrap();
        s.get(queue)
            .map(|(r, tags)| (*r, tags.len() as u64))
            .unwrap_or((0, 0))
    }

    async fn settle(&self, queue: &str) {
        if let Some(m) = &self.mgmt {
            m.wait_counts(&self.vhost, queue, self.expected(queue))
                .await;
        }
    }

    async fn worker_channel(&self) -> Channel {
        let mut w = self.worker.lock().await;
        if w.is_none() {
            *w = Some(self.conn.create_channel().await.unwrap());
        }
        w.clone().unwrap()
    }
}

#[async_trait]
impl QueueFixture for AmqpFixture {
    async fn purge(&self, queue: &str) -> Result<(), BoxError> {
        // Closing the worker channel gives its unacknowledged messages back; then purge.
        if let Some(ch) = self.worker.lock().await.take() {
            ch.close(200, "".into()).await?;
        }
        self.publisher
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await?;
        self.state.lock().unwrap().remove(queue);
        self.settle(queue).await;
        Ok(())
    }

    async fn publish(&self, queue: &str, n: u64) -> Result<(), BoxError> {
        for i in 0..n {
            let id = format!("{queue}-{i}-{}", unique("task"));
            self.publisher
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &celery_body(),
                    celery_properties(&id),
                )
                .await?
                .await?;
        }
        self.state
            .lock()
            .unwrap()
            .entry(queue.into())
            .or_default()
            .0 += n;
        self.settle(queue).await;
        Ok(())
    }

    async fn take(&self, queue: &str, n: u64) -> Result<(), BoxError> {
        let ch = self.worker_channel().await;
        for _ in 0..n {
            let msg = ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await?
                .ok_or("queue is empty")?;
            let mut s = self.state.lock().unwrap();
            let e = s.entry(queue.into()).or_default();
            e.0 -= 1;
            e.1.push(msg.delivery.delivery_tag);
        }
        self.settle(queue).await;
        Ok(())
    }

    async fn ack_all(&self, queue: &str) -> Result<(), BoxError> {
        let ch = self.worker_channel().await;
        let tags = std::mem::take(
            &mut self
                .state
                .lock()
                .unwrap()
                .entry(queue.into())
                .or_default()
                .1,
        );
        for tag in tags {
            ch.basic_ack(tag, BasicAckOptions::default()).await?;
        }
        self.settle(queue).await;
        Ok(())
    }

    fn reports_in_flight(&self) -> bool {
        self.mgmt.is_some()
    }
}

/// Deletes `queues` now (AMQP), ignoring missing ones.
pub async fn delete_queues(amqp: &str, queues: &[&str]) {
    let conn = connect(amqp).await;
    for q in queues {
        let ch = conn.create_channel().await.unwrap();
        let _ = ch
            .queue_delete((*q).into(), QueueDeleteOptions::default())
            .await;
    }
    conn.close(200, "".into()).await.ok();
}

/// Runs the shared publisher (`publish.py`) against `broker` with extra Celery settings
/// `config`; returns its JSON.
pub fn publish(py: &str, broker: &str, config: &Value, args: &[&str]) -> Value {
    celery_scale_testing::publish_script("publish.py", py, broker, &json!({}), config, args)
}

/// A real Celery worker (`-c 2 --prefetch-multiplier 4`) named `{name}@csa`: the shared
/// [`celery_scale_testing::Worker`] with this crate's defaults.
pub struct Worker(pub celery_scale_testing::Worker);

impl Worker {
    /// Starts one consuming `queues`, plus `extra` arguments (later ones win).
    pub fn start(py: &str, broker: &str, queues: &str, name: &str, extra: &[&str]) -> Self {
        let worker = celery_scale_testing::WorkerCommand::new(py, broker)
            .concurrency(2)
            .prefetch_multiplier(4)
            .queues(queues)
            .name(&format!("{name}@csa"))
            .args(&["--loglevel", "WARNING"])
            .args(extra)
            .spawn();
        Worker(worker)
    }

    /// Warm shutdown: SIGTERM to the main process; waits up to `deadline` for it to exit.
    pub async fn warm_shutdown(&mut self, deadline: Duration) {
        self.0.terminate();
        assert!(
            self.0.exited_within(deadline).await,
            "the worker did not exit within {deadline:?} of SIGTERM\n{}",
            self.0.log_tail()
        );
    }
}

impl std::ops::Deref for Worker {
    type Target = celery_scale_testing::Worker;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// A TCP proxy in front of RabbitMQ that the test can cut off, stall, and bring back.
#[allow(unused_imports)]
pub use celery_scale_testing::Proxy;

/// `host:port` of an AMQP URL.
pub fn host_port(amqp: &str) -> String {
    let u = url::Url::parse(amqp).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(5672))
}

/// The AMQP URL with its host and port replaced by the proxy's.
pub fn via(amqp: &str, port: u16) -> String {
    amqp.replace(&host_port(amqp), &format!("127.0.0.1:{port}"))
}

/// Collects everything tracing writes (install it with a subscriber's `with_writer`), from
/// every crate, lapin included.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Captures everything traced on this thread, at every level, until the guard drops.
    pub fn install() -> (Captured, tracing::subscriber::DefaultGuard) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    /// What was captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
