//! [`RedisQueueSource`]: Celery's queues on Redis, read in one pipeline.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use celery_scale_core::celery_events::{WorkerFeed, WorkerSummary};
use celery_scale_core::{Observation, QueueDepth, QueueSource};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};
use tokio::time::Instant;

use crate::connect::Connector;

use crate::config::{InFlightMode, RedisSourceConfig};
use crate::error::RedisSourceError;
use crate::heartbeats::SubscriberSettings;
use crate::layout::{
    BadStamp, Layout, TAILS_SCRIPT, is_internal_queue, message_age, script_tail_age, unacked_route,
};

/// Entries asked for per `HSCAN` page.
const HSCAN_COUNT: u32 = 1000;
/// The largest list or hash length believed: 2^40 (about 1.1 x 10^12) entries would take
/// terabytes; a larger count is no Redis reply we trust. It also keeps every sum over an
/// observation far from overflowing.
const MAX_COUNT: u64 = 1 << 40;
/// Keys asked for per `SCAN` step of discovery.
const SCAN_COUNT: u32 = 1000;
/// How long `in_flight = "auto"` trusts its last look at kombu's binding tables.
const AUTO_REFRESH: std::time::Duration = std::time::Duration::from_secs(60);
/// Keys per `EVALSHA` of the tails script: each run stays short (a few milliseconds of the
/// server's time), and its reply small.
const SCRIPT_KEYS: usize = 1000;
/// How long the source reads whole tail messages after the server refused the script (no
/// scripting, an ACL without `EVALSHA`), before it tries to load it again.
const SCRIPT_RETRY: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether the tails script is loaded on the server.
enum Script {
    /// Not tried yet (or the server forgot it: `NOSCRIPT`).
    Unknown,
    /// Loaded: its SHA-1, as `SCRIPT LOAD` answered.
    Loaded(String),
    /// Refused at this time: tails are read whole (`LINDEX`) until [`SCRIPT_RETRY`] later.
    Refused(Instant),
}

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
    /// How in-flight messages are read (`Off`, `Global` or `PerQueue`).
    in_flight: InFlightMode,
    /// Whether the pipeline ends with `ROLE` (Sentinel: is this still the master?).
    role: bool,
    /// With tails: the SHA-1 of the loaded tails script, whose `EVALSHA`s (one per
    /// [`SCRIPT_KEYS`] keys) replace the per-key commands; `None`: `LLEN` and `LINDEX -1`.
    script: Option<String>,
    /// The number of `EVALSHA` commands at the start of `pipe` (0 without the script).
    chunks: usize,
    /// `LLEN` (and `LINDEX -1`) per key, or the `EVALSHA`s, then `HLEN` or `HSCAN` of
    /// `unacked`, then `ROLE`. Built once per plan; every observation sends it as it is.
    pipe: redis::Pipeline,
}

impl Plan {
    fn new(
        queues: Vec<String>,
        layout: &Layout,
        in_flight: InFlightMode,
        tails: bool,
        role: bool,
        script: Option<(&str, Option<&str>)>,
    ) -> Plan {
        let mut keys = Vec::new();
        let mut ranges = Vec::with_capacity(queues.len());
        for q in &queues {
            let start = keys.len();
            keys.extend(layout.step_keys(q));
            ranges.push(start..keys.len());
        }
        let script = script.filter(|_| tails);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut chunks = 0;
        match script {
            Some((sha, field)) => {
                for chunk in keys.chunks(SCRIPT_KEYS) {
                    pipe.cmd("EVALSHA")
                        .arg(sha)
                        .arg(chunk.len())
                        .arg(chunk)
                        .arg(if field.is_some() { "1" } else { "0" })
                        .arg(field.unwrap_or(""));
                    chunks += 1;
                }
            }
            None => {
                for key in &keys {
                    pipe.cmd("LLEN").arg(key);
                    if tails {
                        pipe.cmd("LINDEX").arg(key).arg(-1);
                    }
                }
            }
        }
        match in_flight {
            InFlightMode::Off | InFlightMode::Auto => {}
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
        if role {
            pipe.cmd("ROLE");
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
            in_flight,
            role,
            script: script.map(|(sha, _)| sha.to_string()),
            chunks,
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
    conn: Arc<Connector>,
    /// `in_flight`, or `off` when kombu keeps no `unacked` hash (`ack_emulation` false).
    in_flight: InFlightMode,
    /// With `in_flight = "auto"`: when the binding tables were last read, and whether they
    /// named only this source's queues.
    exclusive: tokio::sync::Mutex<Option<(Instant, bool)>>,
    /// The plan for the configured queues (without discovery), or the last discovered one.
    plan: Mutex<Arc<Plan>>,
    /// The tails script's state on the server (with `oldest_age`).
    script: tokio::sync::Mutex<Script>,
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
            .field("in_flight", &self.in_flight)
            .field("server", &self.conn.current())
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
        let resolved = config.check_fields()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(RedisSourceError::NoRuntime)?;
        let url = crate::config::redact(&config.url);
        let t = &resolved.transport;
        let certificates = match &resolved.tls {
            Some(tls) => Some(crate::tls::load(tls)?),
            None => None,
        };
        if resolved.url.tls_on {
            celery_scale_tls::install_crypto_provider();
            if resolved.url.tls.no_check_hostname
                || resolved
                    .url
                    .tls
                    .cert_reqs
                    .as_deref()
                    .is_some_and(|r| !r.eq_ignore_ascii_case("required") && r != "CERT_REQUIRED")
            {
                tracing::warn!(url = %url, "the URL asks kombu not to verify the server certificate (ssl_cert_reqs / ssl_check_hostname); celery-scale always verifies it: set tls.ca_file (or ssl_ca_certs) to the server's CA");
            }
        }
        let db = resolved.url.db();
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1);
        let conn = Connector::new(
            &resolved.url,
            certificates.as_ref(),
            t.master_name.as_deref(),
            (
                t.sentinel_username.as_deref(),
                t.sentinel_password.as_deref(),
            ),
            manager_config,
        )
        .map_err(|source| RedisSourceError::BadUrl {
            url: url.clone(),
            source,
        })?;
        let conn = Arc::new(conn);
        let layout = Layout {
            prefix: t.global_keyprefix.clone(),
            steps: t.priority_steps.clone(),
            sep: t.sep.clone(),
            unacked_key: t.unacked_key.clone(),
            fanout: t.fanout_prefix.for_db(db),
            fanout_patterns: t.fanout_patterns,
            legacy_fanout: (t.sentinel_fanout_compat
                && matches!(resolved.url.broker, crate::broker::Broker::Sentinel { .. })
                && t.fanout_prefix == crate::options::FanoutPrefix::Default)
                .then(|| "/{db}.".to_string()),
        };
        let in_flight = if t.ack_emulation {
            config.in_flight
        } else {
            InFlightMode::Off
        };
        let ignored = config.ignored_options();
        if !ignored.is_empty() {
            tracing::info!(options = ?ignored, "broker transport options accepted and ignored: they do not change what is counted");
        }
        let first_mode = match in_flight {
            // Until the binding tables are read: per queue (right whoever shares the database).
            InFlightMode::Auto => InFlightMode::PerQueue,
            other => other,
        };
        let plan = Plan::new(
            config.queues.clone(),
            &layout,
            first_mode,
            config.oldest_age,
            conn.checks_role(),
            None,
        );
        let heartbeats = config.heartbeats.then(|| {
            crate::heartbeats::start(
                SubscriberSettings {
                    connector: Arc::clone(&conn),
                    channels: layout.worker_event_channels(),
                    url: url.clone(),
                    connect_timeout: config.connect_timeout,
                    window: config.heartbeat_window,
                    warmup: config.heartbeat_warmup,
                    hostnames: config.worker_hostnames.clone(),
                    silent_limit: t.visibility_timeout,
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
            in_flight,
            exclusive: tokio::sync::Mutex::new(None),
            plan: Mutex::new(Arc::new(plan)),
            script: tokio::sync::Mutex::new(Script::Unknown),
            discovered: tokio::sync::Mutex::new(None),
            heartbeats,
            bad_stamps: Mutex::new(HashMap::new()),
        })
    }

    /// A leader lease on `key` of the database this source reads, for `holder`, lasting
    /// `period` from each renewal (see [`RedisLease`](crate::RedisLease)). It shares the
    /// source's connection and outlives the source.
    pub fn lease(
        &self,
        key: impl Into<String>,
        holder: impl Into<String>,
        period: Duration,
    ) -> crate::RedisLease {
        crate::RedisLease::new(
            Arc::clone(&self.conn),
            self.url.clone(),
            key.into(),
            holder.into(),
            period,
        )
    }

    /// Subscribes, on a connection of its own, to Celery's event exchange as this source's
    /// workers publish it (the database's fanout prefix, `global_keyprefix`,
    /// `fanout_patterns`): the worker events, and with `task_events` the task events that
    /// workers run with `-E` send (and `task-sent`, from publishers with
    /// `task_send_sent_event`). Independent of the source's own heartbeat subscription; reads
    /// nothing but events.
    pub async fn subscribe_celery_events(
        &self,
        task_events: bool,
    ) -> Result<crate::CeleryEventSubscription, RedisSourceError> {
        crate::CeleryEventSubscription::subscribe(
            &self.conn,
            &self.layout.celery_event_channels(task_events),
            &self.url,
            self.config.connect_timeout,
        )
        .await
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

    /// The commands of the last observation's pipeline (one `LLEN` and `LINDEX -1` per key,
    /// or the tails script's `EVALSHA`s, then the in-flight read and `ROLE`) as the RESP bytes
    /// sent, and how many replies they get: for a raw client to send the same commands (the
    /// crate's bench compares against one), or to look at what is sent.
    pub fn packed_commands(&self) -> (Vec<u8>, usize) {
        let plan = self.current_plan();
        (plan.pipe.get_packed_pipeline(), plan.pipe.len())
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
        self.conn.run(op).await.map_err(|e| self.redis_err(e))
    }

    /// The in-flight reading of this observation: `in_flight`, with `auto` resolved from
    /// kombu's binding tables (re-read at most every [`AUTO_REFRESH`]).
    async fn in_flight_now(&self) -> InFlightMode {
        if self.in_flight != InFlightMode::Auto {
            return self.in_flight;
        }
        let mut exclusive = self.exclusive.lock().await;
        if let Some((at, only_ours)) = *exclusive
            && at.elapsed() < AUTO_REFRESH
        {
            return if only_ours {
                InFlightMode::Global
            } else {
                InFlightMode::PerQueue
            };
        }
        let plan = self.current_plan();
        let only_ours = match self.discover().await {
            Ok(found) => {
                let others: Vec<&String> = found
                    .iter()
                    .filter(|q| !plan.index.contains_key(q.as_str()))
                    .take(5)
                    .collect();
                if !others.is_empty() {
                    tracing::debug!(other_queues = ?others, "in_flight auto: the database holds other queues; counting held messages per queue");
                }
                // No binding table at all: nothing says whose held messages these are.
                others.is_empty() && !found.is_empty()
            }
            Err(e) => {
                tracing::warn!(error = %e, "in_flight auto: kombu's binding tables unreadable; counting held messages per queue");
                false
            }
        };
        if exclusive.is_some_and(|(_, was)| was != only_ours) {
            tracing::info!(
                mode = if only_ours { "global" } else { "per_queue" },
                "in_flight auto: reading mode changed"
            );
        }
        *exclusive = Some((Instant::now(), only_ours));
        if only_ours {
            InFlightMode::Global
        } else {
            InFlightMode::PerQueue
        }
    }

    /// The current plan, rebuilt when it reads in-flight messages another way than `mode`, or
    /// the tails with another script (`None`: without).
    fn plan_for(&self, mode: InFlightMode, script: Option<&str>) -> Arc<Plan> {
        let mut slot = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        let script = script.filter(|_| self.config.oldest_age);
        if slot.in_flight != mode || slot.script.as_deref() != script {
            *slot = Arc::new(Plan::new(
                slot.queues.clone(),
                &self.layout,
                mode,
                self.config.oldest_age,
                self.conn.checks_role(),
                script.map(|sha| (sha, self.config.publish_time_field.as_deref())),
            ));
        }
        Arc::clone(&slot)
    }

    /// The SHA-1 of the tails script when the server has it (loaded now when not yet tried, or
    /// after `forget`: the server answered `NOSCRIPT`); `None` when the source reads whole
    /// tails: `oldest_age` off, or the server refused the script (no scripting, an ACL) within
    /// the last [`SCRIPT_RETRY`]. Only a connection failure is an error.
    async fn script_sha(&self, forget: bool) -> Result<Option<String>, RedisSourceError> {
        if !self.config.oldest_age {
            return Ok(None);
        }
        let mut state = self.script.lock().await;
        if forget {
            *state = Script::Unknown;
        }
        match &*state {
            Script::Loaded(sha) => return Ok(Some(sha.clone())),
            Script::Refused(at) if at.elapsed() < SCRIPT_RETRY => return Ok(None),
            Script::Refused(_) | Script::Unknown => {}
        }
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(TAILS_SCRIPT);
        let reply: redis::RedisResult<Value> = self
            .conn
            .run(|mut conn| {
                let load = &load;
                async move { load.query_async(&mut conn).await }
            })
            .await;
        let refused = match reply {
            Ok(Value::BulkString(sha))
                if sha.len() == 40 && sha.iter().all(u8::is_ascii_hexdigit) =>
            {
                let sha = String::from_utf8_lossy(&sha).into_owned();
                tracing::debug!(sha = %sha, "tails script loaded");
                *state = Script::Loaded(sha.clone());
                return Ok(Some(sha));
            }
            Ok(other) => format!("SCRIPT LOAD answered {other:?}")
                .chars()
                .take(200)
                .collect::<String>(),
            Err(e) if crate::connect::connection_lost(&e) || e.is_timeout() => {
                return Err(self.redis_err(e));
            }
            Err(e) => e.to_string(),
        };
        if !matches!(*state, Script::Refused(_)) {
            tracing::warn!(url = %self.url, reason = %refused, "the server refused the tails script: each key's oldest message is read whole (LINDEX) to find its age");
        }
        *state = Script::Refused(Instant::now());
        Ok(None)
    }

    async fn observe_inner(&self) -> Result<Observation, RedisSourceError> {
        if self.config.discovery.is_some() {
            self.maybe_discover().await?;
        }
        let mode = self.in_flight_now().await;
        let mut forget = false;
        let (plan, replies) = loop {
            let sha = self.script_sha(forget).await?;
            let plan = self.plan_for(mode, sha.as_deref());
            let replies: Vec<Value> = self
                .query(|mut conn| {
                    let plan = Arc::clone(&plan);
                    async move { plan.pipe.query_async(&mut conn).await }
                })
                .await?;
            if replies.len() != plan.pipe.len() {
                return Err(RedisSourceError::UnexpectedReply {
                    command: "pipeline",
                    key: String::new(),
                    detail: format!("{} replies to {} commands", replies.len(), plan.pipe.len()),
                });
            }
            let noscript = replies[..plan.chunks]
                .iter()
                .any(|r| matches!(r, Value::ServerError(e) if e.code() == "NOSCRIPT"));
            if noscript && !forget {
                // A restart, SCRIPT FLUSH or failover: load it again, then read once more.
                tracing::debug!("the server forgot the tails script (NOSCRIPT): loading it again");
                forget = true;
                continue;
            }
            let replies = self.flatten_script_replies(&plan, replies)?;
            break (plan, replies);
        };
        let at = Instant::now();
        let wall = SystemTime::now();
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
                    if plan.tails && plan.script.is_some() {
                        let tail = &replies[k * per_key + 1];
                        let age = match script_tail_age(tail, field, wall) {
                            Ok(Ok(age)) => {
                                Self::bad_stamp(&mut bad_stamps, key, None);
                                age
                            }
                            Ok(Err(bad)) => {
                                Self::bad_stamp(&mut bad_stamps, key, Some(&bad));
                                None
                            }
                            Err(_) if matches!(tail, Value::ServerError(_)) => {
                                return Err(self.reply_error(tail, "LINDEX", key, "list"));
                            }
                            Err(not) => {
                                return Err(RedisSourceError::UnexpectedReply {
                                    command: "EVALSHA",
                                    key: key.clone(),
                                    detail: not.0,
                                });
                            }
                        };
                        depth.oldest_age = depth.oldest_age.max(age);
                    } else if plan.tails {
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
        let mut last = &replies[plan.keys.len() * per_key..];
        if plan.role {
            self.check_role(last.last())?;
            last = &last[..last.len().saturating_sub(1)];
        }
        let unacked = self.layout.unacked();
        let global_in_flight = match plan.in_flight {
            InFlightMode::Off | InFlightMode::Auto => None,
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

    /// The replies of the tails script's `EVALSHA`s spread out into two per key (the `LLEN`
    /// reply, the tail), followed by the rest of the pipeline's replies; the replies as they
    /// are without the script.
    fn flatten_script_replies(
        &self,
        plan: &Plan,
        mut replies: Vec<Value>,
    ) -> Result<Vec<Value>, RedisSourceError> {
        if plan.chunks == 0 {
            return Ok(replies);
        }
        let rest = replies.split_off(plan.chunks);
        let mut flat = Vec::with_capacity(plan.keys.len() * 2 + rest.len());
        for (chunk, keys) in replies.into_iter().zip(plan.keys.chunks(SCRIPT_KEYS)) {
            match chunk {
                Value::Array(parts) if parts.len() == keys.len() * 2 => flat.extend(parts),
                Value::Array(parts) => {
                    return Err(RedisSourceError::UnexpectedReply {
                        command: "EVALSHA",
                        key: keys[0].clone(),
                        detail: format!("{} replies for {} keys", parts.len(), keys.len()),
                    });
                }
                other => return Err(self.reply_error(&other, "EVALSHA", &keys[0], "list")),
            }
        }
        flat.extend(rest);
        Ok(flat)
    }

    /// With Sentinel: the server answered `ROLE` with `master`; otherwise (a failover demoted
    /// it) the observation fails (unknown, never 0) and the next one asks the Sentinels again.
    fn check_role(&self, reply: Option<&Value>) -> Result<(), RedisSourceError> {
        let role = match reply {
            Some(Value::Array(parts)) => match parts.first() {
                Some(Value::BulkString(r)) => String::from_utf8_lossy(r).into_owned(),
                Some(Value::SimpleString(r)) => r.clone(),
                other => format!("{other:?}"),
            },
            other => format!("{other:?}"),
        };
        if role == "master" {
            return Ok(());
        }
        self.conn.forget_master();
        let role: String = role.chars().take(40).collect();
        tracing::warn!(url = %self.url, server = ?self.conn.current(), role = %role, "the server is no longer the master (Sentinel failover?): observation failed, asking the Sentinels again");
        Err(RedisSourceError::NotMaster {
            url: self.url.clone(),
            role,
        })
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
        let mut known: HashSet<String> = queues.iter().cloned().collect();
        for q in found {
            if !known.contains(&q) && !discovery.excludes(&q) {
                known.insert(q.clone());
                queues.push(q);
            }
        }
        let changed = self.current_plan().queues != queues;
        if changed {
            tracing::info!(queues = ?queues, "redis queue discovery");
            let current = self.current_plan();
            let plan = Arc::new(Plan::new(
                queues,
                &self.layout,
                current.in_flight,
                self.config.oldest_age,
                self.conn.checks_role(),
                current
                    .script
                    .as_deref()
                    .map(|sha| (sha, self.config.publish_time_field.as_deref())),
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
