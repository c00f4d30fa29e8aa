//! [`RedisQueueSource`]: Celery's queues on Redis, read in one pipeline.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use celery_scale_core::celery_events::{WorkerFeed, WorkerSummary};
use celery_scale_core::{Observation, QueueDepth, QueueSource, wildcard_match};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionAddr, RedisError, Value};
use tokio::time::Instant;

use crate::config::{InFlightMode, RedisSourceConfig};
use crate::error::RedisSourceError;
use crate::heartbeats::SubscriberSettings;
use crate::layout::{BadStamp, Layout, is_internal_queue, message_age, unacked_route};

/// Entries asked for per `HSCAN` page.
const HSCAN_COUNT: u32 = 1000;
/// The largest list or hash length believed: 2^40 (about 1.1 x 10^12) entries would take
/// terabytes; a larger count is no Redis reply we trust. It also keeps every sum over an
/// observation far from overflowing.
const MAX_COUNT: u64 = 1 << 40;
/// Keys asked for per `SCAN` step of discovery.
const SCAN_COUNT: u32 = 1000;

/// The commands of one observation, built once per set of queues and reused.
struct Plan {
    queues: Vec<String>,
    /// Every priority key of every queue, queue-major.
    keys: Vec<String>,
    /// `keys[ranges[i]]` are the keys of `queues[i]`.
    ranges: Vec<std::ops::Range<usize>>,
    /// Queue index by name, for attributing unacked messages.
    index: HashMap<String, usize>,
    /// Whether each key's `LLEN` is followed by its `LINDEX -1` (oldest message).
    tails: bool,
    /// `LLEN` (and `LINDEX -1`) per key, then `HLEN` or `HSCAN` of `unacked`.
    pipe: redis::Pipeline,
}

impl Plan {
    fn new(queues: Vec<String>, layout: &Layout, in_flight: InFlightMode, tails: bool) -> Plan {
        let mut keys = Vec::new();
        let mut ranges = Vec::with_capacity(queues.len());
        for q in &queues {
            let start = keys.len();
            keys.extend(layout.step_keys(q));
            ranges.push(start..keys.len());
        }
        let mut pipe = redis::Pipeline::with_capacity(keys.len() * (1 + usize::from(tails)) + 1);
        pipe.ignore_errors();
        for key in &keys {
            pipe.cmd("LLEN").arg(key);
            if tails {
                pipe.cmd("LINDEX").arg(key).arg(-1);
            }
        }
        match in_flight {
            InFlightMode::Off => {}
            InFlightMode::Global => {
                pipe.cmd("HLEN").arg(layout.unacked());
            }
            InFlightMode::PerQueue => {
                pipe.cmd("HSCAN")
                    .arg(layout.unacked())
                    .arg(0)
                    .arg("COUNT")
                    .arg(HSCAN_COUNT);
            }
        }
        let index = queues
            .iter()
            .enumerate()
            .map(|(i, q)| (q.clone(), i))
            .collect();
        Plan {
            queues,
            keys,
            ranges,
            index,
            tails,
            pipe,
        }
    }
}

struct Discovered {
    at: Instant,
}

/// The [`QueueSource`] for Celery on Redis.
///
/// One observation is one pipelined round trip over a [`ConnectionManager`] (which reconnects
/// by itself): `LLEN` of every priority key of every queue (kombu's own `_size`), with
/// `oldest_age` each key's oldest message (`LINDEX key -1`) for its age, and `HLEN unacked` (or
/// the first `HSCAN` page) for in-flight messages. With heartbeats on, a background task
/// subscribed to Celery's worker
/// events adds executing tasks, live workers and measured throughput; it stops when the source
/// is dropped (or [`RedisQueueSource::shutdown`] is awaited).
///
/// See the crate documentation for an example.
pub struct RedisQueueSource {
    config: RedisSourceConfig,
    url: String,
    layout: Layout,
    db: i64,
    conn: ConnectionManager,
    /// The plan for the configured queues (without discovery), or the last discovered one.
    plan: Mutex<Arc<Plan>>,
    discovered: tokio::sync::Mutex<Option<Discovered>>,
    heartbeats: Option<WorkerFeed>,
    /// Keys whose oldest message has an unusable time stamp, with the reason last logged: a
    /// warning once per key and reason, not once per observation.
    bad_stamps: Mutex<HashMap<String, String>>,
}

impl fmt::Debug for RedisQueueSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQueueSource")
            .field("url", &self.url)
            .field("db", &self.db)
            .field("queues", &self.current_plan().queues)
            .field("global_keyprefix", &self.layout.prefix)
            .field("in_flight", &self.config.in_flight)
            .field("discovery", &self.config.discovery.is_some())
            .field("heartbeats", &self.heartbeats.is_some())
            .finish()
    }
}

impl RedisQueueSource {
    /// Validates `config` and prepares the connection, without connecting: the first
    /// [`observe`](QueueSource::observe) connects, so a source made while Redis is down works
    /// once it is up. With heartbeats on, starts the subscriber task; must be called within a
    /// Tokio runtime.
    pub fn new(config: RedisSourceConfig) -> Result<Self, RedisSourceError> {
        config.check_fields()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(RedisSourceError::NoRuntime)?;
        let url = crate::config::redact(&config.url);
        let bad_url = |source| RedisSourceError::BadUrl {
            url: url.clone(),
            source,
        };
        let client = match &config.tls {
            Some(tls) => {
                let certificates = crate::tls::load(tls)?;
                install_crypto_provider();
                Client::build_with_tls(config.url.expose(), certificates).map_err(bad_url)?
            }
            None => Client::open(config.url.expose()).map_err(bad_url)?,
        };
        if matches!(
            client.get_connection_info().addr(),
            ConnectionAddr::TcpTls { .. }
        ) {
            install_crypto_provider();
        }
        let db = client.get_connection_info().redis_settings().db();
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|e| RedisSourceError::from_redis(&url, e))?;
        let layout = Layout {
            prefix: config.global_keyprefix.clone(),
            steps: config.priority_steps.clone(),
            sep: config.sep.clone(),
        };
        let plan = Plan::new(
            config.queues.clone(),
            &layout,
            config.in_flight,
            config.oldest_age,
        );
        let heartbeats = config.heartbeats.then(|| {
            crate::heartbeats::start(
                SubscriberSettings {
                    client: client.clone(),
                    channels: layout.worker_event_channels(db),
                    url: url.clone(),
                    connect_timeout: config.connect_timeout,
                    window: config.heartbeat_window,
                    warmup: config.heartbeat_warmup,
                    hostnames: config.worker_hostnames.clone(),
                },
                &runtime,
            )
        });
        tracing::debug!(url = %url, db, queues = config.queues.len(), "redis queue source ready");
        Ok(RedisQueueSource {
            config,
            url,
            layout,
            db,
            conn,
            plan: Mutex::new(Arc::new(plan)),
            discovered: tokio::sync::Mutex::new(None),
            heartbeats,
            bad_stamps: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RedisSourceConfig {
        &self.config
    }

    /// The Redis database number (from the URL).
    pub fn db(&self) -> i64 {
        self.db
    }

    /// The queues the last observation read (configured plus discovered).
    pub fn queues(&self) -> Vec<String> {
        self.current_plan().queues.clone()
    }

    /// The heartbeat subscriber's figures now: `None` when heartbeats are off, the subscription
    /// is down, or it is younger than `heartbeat_warmup`.
    pub fn workers(&self) -> Option<WorkerSummary> {
        self.heartbeats.as_ref()?.summary(Instant::now())
    }

    /// Whether the heartbeat subscription is up (always `false` with heartbeats off).
    pub fn heartbeats_subscribed(&self) -> bool {
        self.heartbeats.as_ref().is_some_and(WorkerFeed::is_up)
    }

    /// Stops the heartbeat subscriber and waits for its task to end. Dropping the source stops
    /// it too, without waiting.
    pub async fn shutdown(mut self) {
        if let Some(h) = self.heartbeats.take() {
            h.shutdown().await;
        }
    }

    fn current_plan(&self) -> Arc<Plan> {
        Arc::clone(&self.plan.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Logs (once per key and reason) that the oldest message of `key` has an unusable time
    /// stamp, or forgets it once the key's oldest message is fine again.
    fn bad_stamp(seen: &mut HashMap<String, String>, key: &str, bad: Option<&BadStamp>) {
        match bad {
            None => {
                if !seen.is_empty() {
                    seen.remove(key);
                }
            }
            Some(bad) => {
                let reason = bad.to_string();
                if seen.get(key) != Some(&reason) {
                    tracing::warn!(key = ?key, reason = %reason, "the age of the oldest message is unknown: its time stamp is ignored");
                    seen.insert(key.to_string(), reason);
                } else {
                    tracing::debug!(key = ?key, reason = %reason, "oldest message's time stamp ignored");
                }
            }
        }
    }

    fn redis_err(&self, e: RedisError) -> RedisSourceError {
        RedisSourceError::from_redis(&self.url, e)
    }

    /// Reads the backlog, with the source's own error type.
    pub async fn observe_redis(&self) -> Result<Observation, RedisSourceError> {
        match tokio::time::timeout(self.config.timeout, self.observe_inner()).await {
            Ok(result) => result,
            Err(_) => Err(RedisSourceError::Timeout {
                url: self.url.clone(),
                after: self.config.timeout,
            }),
        }
    }

    /// Runs `op` on the managed connection. When it fails because the connection is gone
    /// (refused, reset, dropped: an I/O error), runs it once more at once: the
    /// [`ConnectionManager`] answers the first command after an outage with the error of the
    /// reconnect attempt it made while the server was down, and starts a new attempt, which the
    /// second run waits for. Every command we send only reads, so a second run is harmless.
    async fn query<T, F, Fut>(&self, op: F) -> Result<T, RedisSourceError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match op(self.conn.clone()).await {
            Err(e) if connection_lost(&e) => {
                tracing::debug!(url = %self.url, error = %e, "connection lost; trying once more on a new connection");
                op(self.conn.clone()).await.map_err(|e| self.redis_err(e))
            }
            result => result.map_err(|e| self.redis_err(e)),
        }
    }

    async fn observe_inner(&self) -> Result<Observation, RedisSourceError> {
        if self.config.discovery.is_some() {
            self.maybe_discover().await?;
        }
        let plan = self.current_plan();
        let replies: Vec<Value> = self
            .query(|mut conn| {
                let plan = Arc::clone(&plan);
                async move { plan.pipe.query_async(&mut conn).await }
            })
            .await?;
        let at = Instant::now();
        let wall = SystemTime::now();
        if replies.len() != plan.pipe.len() {
            return Err(RedisSourceError::UnexpectedReply {
                command: "pipeline",
                key: String::new(),
                detail: format!("{} replies to {} commands", replies.len(), plan.pipe.len()),
            });
        }
        let per_key = 1 + usize::from(plan.tails);
        let field = self.config.publish_time_field.as_deref();
        let mut depths = Vec::with_capacity(plan.queues.len());
        // Checked here so that no sum over the observation can overflow later.
        let mut total: u64 = 0;
        {
            let mut bad_stamps = self.bad_stamps.lock().unwrap_or_else(|p| p.into_inner());
            for (queue, range) in plan.queues.iter().zip(&plan.ranges) {
                let mut depth = QueueDepth::new(queue.clone(), 0);
                for k in range.clone() {
                    let key = &plan.keys[k];
                    let len = self.count_reply(&replies[k * per_key], "LLEN", key, "list")?;
                    depth.ready = depth.ready.checked_add(len).ok_or_else(|| too_many(key))?;
                    if plan.tails {
                        let age = match &replies[k * per_key + 1] {
                            Value::BulkString(raw) => match message_age(raw, field, wall) {
                                Ok(age) => {
                                    Self::bad_stamp(&mut bad_stamps, key, None);
                                    age
                                }
                                Err(bad) => {
                                    Self::bad_stamp(&mut bad_stamps, key, Some(&bad));
                                    None
                                }
                            },
                            Value::Nil => {
                                Self::bad_stamp(&mut bad_stamps, key, None);
                                None
                            }
                            other => return Err(self.reply_error(other, "LINDEX", key, "list")),
                        };
                        depth.oldest_age = depth.oldest_age.max(age);
                    }
                }
                total = total
                    .checked_add(depth.ready)
                    .ok_or_else(|| too_many(queue))?;
                depths.push(depth);
            }
        }
        let last = &replies[plan.keys.len() * per_key..];
        let unacked = self.layout.unacked();
        let global_in_flight = match self.config.in_flight {
            InFlightMode::Off => None,
            InFlightMode::Global => match self.count_reply(&last[0], "HLEN", &unacked, "hash") {
                Ok(n) => Some(n),
                // A count that is no count: in flight unknown, not zero.
                Err(RedisSourceError::UnexpectedReply { detail, .. }) => {
                    tracing::warn!(key = ?unacked, reply = %detail, "in-flight count unknown: HLEN answered no hash length");
                    None
                }
                Err(e) => return Err(e),
            },
            InFlightMode::PerQueue => {
                let counts = self.per_queue_in_flight(&plan, &last[0]).await?;
                for (depth, n) in depths.iter_mut().zip(counts) {
                    depth.in_flight = Some(n);
                }
                None
            }
        };
        let mut obs = Observation::from_queues(depths, at);
        if global_in_flight.is_some() {
            obs.in_flight = global_in_flight;
        }
        if let Some(feed) = &self.heartbeats {
            obs = obs.with_worker_reading(feed.reading(at));
        }
        Ok(obs)
    }

    /// The error for a reply that is not what `command` returns on a `expected` key.
    fn reply_error(
        &self,
        reply: &Value,
        command: &'static str,
        key: &str,
        expected: &'static str,
    ) -> RedisSourceError {
        match reply {
            Value::ServerError(e) if e.code() == "WRONGTYPE" => RedisSourceError::WrongType {
                key: key.to_string(),
                expected,
                source: e.clone(),
            },
            Value::ServerError(e) => self.redis_err(RedisError::from(e.clone())),
            other => RedisSourceError::UnexpectedReply {
                command,
                key: key.to_string(),
                detail: format!("{other:?}").chars().take(200).collect(),
            },
        }
    }

    /// A length (`LLEN`, `HLEN`): an integer from 0 to [`MAX_COUNT`]; anything else is an
    /// unexpected reply (never read as 0).
    fn count_reply(
        &self,
        reply: &Value,
        command: &'static str,
        key: &str,
        expected: &'static str,
    ) -> Result<u64, RedisSourceError> {
        match reply {
            Value::Int(n) => u64::try_from(*n)
                .ok()
                .filter(|&n| n <= MAX_COUNT)
                .ok_or_else(|| RedisSourceError::UnexpectedReply {
                    command,
                    key: key.to_string(),
                    detail: format!("{n} is not a length (0 to {MAX_COUNT})"),
                }),
            other => Err(self.reply_error(other, command, key, expected)),
        }
    }

    /// Counts `unacked` per watched queue: the first `HSCAN` page came with the pipeline, the
    /// rest follow one page per round trip. Messages routed by a key that is not a watched
    /// queue's name are looked up in their exchange's binding table.
    async fn per_queue_in_flight(
        &self,
        plan: &Plan,
        first: &Value,
    ) -> Result<Vec<u64>, RedisSourceError> {
        let unacked = self.layout.unacked();
        let mut counts = vec![0u64; plan.queues.len()];
        let mut unresolved: HashMap<(String, String), u64> = HashMap::new();
        let mut malformed = 0u64;
        let mut page = first.clone();
        loop {
            let (cursor, entries) = match page {
                Value::Array(mut parts) if parts.len() == 2 => {
                    let entries = parts.pop().unwrap_or(Value::Nil);
                    let cursor = parts.pop().unwrap_or(Value::Nil);
                    let cursor = match cursor {
                        Value::BulkString(c) => String::from_utf8_lossy(&c).into_owned(),
                        Value::SimpleString(c) => c,
                        other => {
                            return Err(RedisSourceError::UnexpectedReply {
                                command: "HSCAN",
                                key: unacked,
                                detail: format!("cursor {other:?}"),
                            });
                        }
                    };
                    (cursor, entries)
                }
                other => return Err(self.reply_error(&other, "HSCAN", &unacked, "hash")),
            };
            let values: Vec<Value> = match entries {
                Value::Array(kv) => kv.into_iter().skip(1).step_by(2).collect(),
                Value::Map(kv) => kv.into_iter().map(|(_, v)| v).collect(),
                _ => Vec::new(),
            };
            for v in values {
                let route = match &v {
                    Value::BulkString(raw) => unacked_route(raw),
                    _ => None,
                };
                match route {
                    Some((_, rk)) if plan.index.contains_key(&rk) => counts[plan.index[&rk]] += 1,
                    Some(route) => *unresolved.entry(route).or_default() += 1,
                    None => malformed += 1,
                }
            }
            if cursor == "0" {
                break;
            }
            let mut next = redis::cmd("HSCAN");
            next.arg(&unacked)
                .arg(&cursor)
                .arg("COUNT")
                .arg(HSCAN_COUNT);
            page = self
                .query(|mut conn| {
                    let next = &next;
                    async move { next.query_async(&mut conn).await }
                })
                .await?;
        }
        if malformed > 0 {
            tracing::warn!(key = ?unacked, malformed, "unacked entries that are not [message, exchange, routing_key]");
        }
        if !unresolved.is_empty() {
            self.resolve_by_bindings(plan, unresolved, &mut counts)
                .await?;
        }
        Ok(counts)
    }

    async fn resolve_by_bindings(
        &self,
        plan: &Plan,
        unresolved: HashMap<(String, String), u64>,
        counts: &mut [u64],
    ) -> Result<(), RedisSourceError> {
        let mut exchanges: Vec<&str> = unresolved
            .keys()
            .map(|(ex, _)| ex.as_str())
            .filter(|ex| !ex.is_empty())
            .collect();
        exchanges.sort_unstable();
        exchanges.dedup();
        if exchanges.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for ex in &exchanges {
            pipe.cmd("SMEMBERS").arg(self.layout.binding(ex));
        }
        let tables: Vec<Value> = self
            .query(|mut conn| {
                let pipe = &pipe;
                async move { pipe.query_async(&mut conn).await }
            })
            .await?;
        for (ex, table) in exchanges.iter().zip(tables) {
            let members = match table {
                Value::Array(m) | Value::Set(m) => m,
                other => {
                    return Err(self.reply_error(
                        &other,
                        "SMEMBERS",
                        &self.layout.binding(ex),
                        "set",
                    ));
                }
            };
            for member in members {
                let Value::BulkString(member) = member else {
                    continue;
                };
                let member = String::from_utf8_lossy(&member);
                let Some((rk, queue)) = self.layout.split_binding(&member) else {
                    continue;
                };
                if let (Some(&i), Some(&n)) = (
                    plan.index.get(queue),
                    unresolved.get(&(ex.to_string(), rk.to_string())),
                ) {
                    counts[i] += n;
                }
            }
        }
        Ok(())
    }

    async fn maybe_discover(&self) -> Result<(), RedisSourceError> {
        let Some(discovery) = &self.config.discovery else {
            return Ok(());
        };
        let mut discovered = self.discovered.lock().await;
        if discovered
            .as_ref()
            .is_some_and(|d| d.at.elapsed() < discovery.refresh)
        {
            return Ok(());
        }
        let found = self.discover().await?;
        let mut queues = self.config.queues.clone();
        for q in found {
            if !queues.contains(&q) && !discovery.exclude.iter().any(|p| wildcard_match(p, &q)) {
                queues.push(q);
            }
        }
        let changed = self.current_plan().queues != queues;
        if changed {
            tracing::info!(queues = ?queues, "redis queue discovery");
            let plan = Arc::new(Plan::new(
                queues,
                &self.layout,
                self.config.in_flight,
                self.config.oldest_age,
            ));
            *self.plan.lock().unwrap_or_else(|p| p.into_inner()) = plan;
        }
        *discovered = Some(Discovered { at: Instant::now() });
        Ok(())
    }

    /// Lists Celery queues from kombu's binding tables, sorted, internal queues left out.
    pub async fn discover_queues(&self) -> Result<Vec<String>, RedisSourceError> {
        match tokio::time::timeout(self.config.timeout, self.discover()).await {
            Ok(result) => result,
            Err(_) => Err(RedisSourceError::Timeout {
                url: self.url.clone(),
                after: self.config.timeout,
            }),
        }
    }

    async fn discover(&self) -> Result<Vec<String>, RedisSourceError> {
        let pattern = self.layout.binding_pattern();
        let mut tables: Vec<Vec<u8>> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, batch): (u64, Vec<Vec<u8>>) = self
                .query(|mut conn| {
                    let scan = &scan;
                    async move { scan.query_async(&mut conn).await }
                })
                .await?;
            tables.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        tables.sort();
        tables.dedup();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for t in &tables {
            pipe.cmd("SMEMBERS").arg(t);
        }
        let replies: Vec<Value> = if tables.is_empty() {
            Vec::new()
        } else {
            self.query(|mut conn| {
                let pipe = &pipe;
                async move { pipe.query_async(&mut conn).await }
            })
            .await?
        };
        let mut queues = Vec::new();
        for (table, reply) in tables.iter().zip(replies) {
            let members = match reply {
                Value::Array(m) | Value::Set(m) => m,
                other => {
                    let table = String::from_utf8_lossy(table);
                    return Err(self.reply_error(&other, "SMEMBERS", &table, "set"));
                }
            };
            for member in members {
                let Value::BulkString(member) = member else {
                    continue;
                };
                let member = String::from_utf8_lossy(&member);
                if let Some((_, queue)) = self.layout.split_binding(&member)
                    && !is_internal_queue(queue)
                {
                    queues.push(queue.to_string());
                }
            }
        }
        queues.sort();
        queues.dedup();
        Ok(queues)
    }
}

/// The error for a sum of lengths that does not fit a `u64` (only a forged reply can do that).
fn too_many(what: &str) -> RedisSourceError {
    RedisSourceError::UnexpectedReply {
        command: "LLEN",
        key: what.to_string(),
        detail: "the lengths add up to more than 2^64".into(),
    }
}

/// Whether `e` says the connection itself failed (an I/O error that is not a certificate
/// problem): the [`ConnectionManager`] then sets a new connection up.
fn connection_lost(e: &RedisError) -> bool {
    e.is_io_error() && !crate::error::tls_config_error(e)
}

fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may install one first; either is fine.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

#[async_trait]
impl QueueSource for RedisQueueSource {
    async fn observe(&self) -> celery_scale_core::Result<Observation> {
        self.observe_redis().await.map_err(Into::into)
    }

    /// With heartbeats on: the subscription is up and past `heartbeat_warmup`.
    fn is_warmed_up(&self) -> bool {
        self.heartbeats
            .as_ref()
            .is_none_or(|h| h.is_warm(Instant::now()))
    }

    /// Stops the heartbeat subscriber (its connection closes with its task).
    async fn close(&self) {
        if let Some(h) = &self.heartbeats {
            h.stop();
        }
    }
}
