//! [`AmqpQueueSource`]: Celery's queues on RabbitMQ, read with pipelined passive declares and,
//! optionally, the management API.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use celery_scale_core::celery_events::WorkerFeed;
use celery_scale_core::{Observation, QueueDepth, QueueSource, wildcard_match};
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::time::Instant;

use crate::config::{AmqpSourceConfig, is_internal_queue, parse_amqp_url};
use crate::error::{AmqpSourceError, amqp_kind, is_unavailable};
use crate::management::{ManagementClient, QueueStats};

/// AMQP heartbeat asked for when the URL does not say (seconds): a dead connection is noticed
/// within about twice this.
const DEFAULT_AMQP_HEARTBEAT: u16 = 10;
/// Up to this many queues the management API is asked one queue at a time (concurrently);
/// above it, one list call with only the needed columns.
const PER_QUEUE_HTTP_MAX: usize = 8;

/// The connection and the channel that every passive declare goes through.
struct Link {
    connection: Arc<Connection>,
    channel: Channel,
    /// Set while declares are outstanding; still set if an observation was cancelled (its
    /// timeout fired) mid-way, in which case the channel is replaced before the next use.
    busy: bool,
}

/// The queues being watched: the configured ones, then the discovered ones.
struct QueueSet {
    names: Arc<Vec<String>>,
    /// Names that are only there because discovery found them.
    discovered: HashSet<String>,
    /// When discovery last succeeded.
    refreshed: Option<Instant>,
}

/// What the source shares with its worker-event task.
pub(crate) struct Inner {
    config: AmqpSourceConfig,
    uri: AMQPUri,
    /// The CA and client identity for `amqps://` (empty: the web PKI roots, no identity).
    /// Its `Debug` prints the PKCS#12 password and the key: never derive `Debug` for `Inner`.
    tls: OwnedTLSConfig,
    url: String,
    vhost: String,
    link: tokio::sync::Mutex<Option<Link>>,
    connections: AtomicU64,
    management: Option<ManagementClient>,
    queues: Mutex<QueueSet>,
    discovery_lock: tokio::sync::Mutex<()>,
    last_stats: Mutex<Option<Arc<Vec<QueueStats>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data behind these locks stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    pub(crate) fn config(&self) -> &AmqpSourceConfig {
        &self.config
    }

    /// The broker URL, redacted.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    async fn connect(&self) -> Result<Link, AmqpSourceError> {
        let after = self.config.connect_timeout;
        let props = ConnectionProperties::default()
            .with_connection_name(self.config.connection_name.as_str().into());
        let attempt = async {
            let connect_error = |e| AmqpSourceError::from_connect(&self.url, &self.vhost, e);
            let runtime = lapin::runtime::default_runtime().map_err(connect_error)?;
            let connection = Connection::connect_uri_with_config(
                self.uri.clone(),
                props,
                self.tls.clone(),
                runtime,
            )
            .await
            .map_err(connect_error)?;
            let channel = connection.create_channel().await.map_err(|e| {
                AmqpSourceError::from_operation(&self.url, "channel.open".into(), e)
            })?;
            Ok::<_, AmqpSourceError>(Link {
                connection: Arc::new(connection),
                channel,
                busy: false,
            })
        };
        let link = tokio::time::timeout(after, attempt).await.map_err(|_| {
            AmqpSourceError::Timeout {
                url: self.url.clone(),
                operation: "connect",
                after,
            }
        })??;
        let n = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        if n > 1 {
            tracing::info!(url = %self.url, connections = n, "reconnected to RabbitMQ");
        } else {
            tracing::debug!(url = %self.url, "connected to RabbitMQ");
        }
        Ok(link)
    }

    /// Makes sure `slot` holds an open connection and channel; returns the link.
    async fn ensure<'a>(
        &self,
        slot: &'a mut Option<Link>,
    ) -> Result<&'a mut Link, AmqpSourceError> {
        let healthy = slot
            .as_ref()
            .is_some_and(|l| l.connection.status().connected());
        if !healthy {
            if let Some(old) = slot.take() {
                tracing::warn!(url = %self.url, "the RabbitMQ connection is gone; reconnecting");
                drop(old);
            }
            *slot = Some(self.connect().await?);
        }
        let link = slot.as_mut().expect("a link was just stored");
        if link.busy || !link.channel.status().connected() {
            link.channel = link.connection.create_channel().await.map_err(|e| {
                AmqpSourceError::from_operation(&self.url, "channel.open".into(), e)
            })?;
            link.busy = false;
        }
        Ok(link)
    }

    /// The shared connection (connecting if needed), for the worker-event consumer.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>, AmqpSourceError> {
        let mut slot = self.link.lock().await;
        Ok(Arc::clone(&self.ensure(&mut slot).await?.connection))
    }

    /// Passive `queue.declare` of every name on the one channel, all written before any reply is
    /// awaited. A missing (404) or forbidden (403) queue makes the broker close the channel and
    /// fail every declare behind it: that queue gets its typed error, the channel is reopened and
    /// the declares behind it are sent again.
    async fn declare_all(
        &self,
        names: &[String],
    ) -> Result<Vec<Result<(u64, u32), AmqpSourceError>>, AmqpSourceError> {
        let mut slot = self.link.lock().await;
        let link = self.ensure(&mut slot).await?;
        let mut results: Vec<Option<Result<(u64, u32), AmqpSourceError>>> =
            names.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..names.len()).collect();
        link.busy = true;
        while !pending.is_empty() {
            let channel = link.channel.clone();
            let replies = futures::future::join_all(pending.iter().map(|&i| {
                channel.queue_declare(
                    names[i].as_str().into(),
                    QueueDeclareOptions::default().passive(),
                    FieldTable::default(),
                )
            }))
            .await;
            let mut failed = Vec::new();
            for (&i, reply) in pending.iter().zip(replies) {
                match reply {
                    Ok(q) => {
                        results[i] = Some(Ok((u64::from(q.message_count()), q.consumer_count())))
                    }
                    Err(e) => failed.push((i, e)),
                }
            }
            let Some((first, error)) = failed.first() else {
                break;
            };
            let soft = match amqp_kind(error) {
                Some(AMQPErrorKind::Soft(
                    s @ (AMQPSoftError::NOTFOUND
                    | AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::RESOURCELOCKED),
                )) => Some(s.clone()),
                _ => None,
            };
            let Some(soft) = soft else {
                let e = AmqpSourceError::from_operation(
                    &self.url,
                    format!("queue.declare(passive) of {:?}", names[*first]),
                    error.clone(),
                );
                if is_unavailable(error) || !link.connection.status().connected() {
                    *slot = None;
                }
                return Err(e);
            };
            // The broker answers in order, so every declare before the culprit succeeded; its
            // reply text names it too.
            let text = match error.kind() {
                lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
                _ => String::new(),
            };
            let culprit = failed
                .iter()
                .map(|(i, _)| *i)
                .find(|&i| text.contains(&format!("queue '{}'", names[i])))
                .unwrap_or(*first);
            let error = failed
                .iter()
                .find(|(i, _)| *i == culprit)
                .map(|(_, e)| e.clone())
                .unwrap_or_else(|| error.clone());
            results[culprit] = Some(Err(match soft {
                AMQPSoftError::NOTFOUND => AmqpSourceError::QueueNotFound {
                    queue: names[culprit].clone(),
                    vhost: self.vhost.clone(),
                },
                AMQPSoftError::RESOURCELOCKED => AmqpSourceError::QueueLocked {
                    queue: names[culprit].clone(),
                    vhost: self.vhost.clone(),
                    source: Box::new(error),
                },
                _ => AmqpSourceError::QueueAccessRefused {
                    queue: names[culprit].clone(),
                    vhost: self.vhost.clone(),
                    source: Box::new(error),
                },
            }));
            tracing::debug!(queue = %names[culprit], "the broker closed the channel on a passive declare; reopening it");
            link.channel = match link.connection.create_channel().await {
                Ok(channel) => channel,
                Err(e) => {
                    *slot = None;
                    return Err(AmqpSourceError::from_operation(
                        &self.url,
                        "channel.open".into(),
                        e,
                    ));
                }
            };
            pending = failed
                .into_iter()
                .map(|(i, _)| i)
                .filter(|&i| i != culprit)
                .collect();
        }
        link.busy = false;
        Ok(results
            .into_iter()
            .map(|r| r.expect("every queue was declared or given an error"))
            .collect())
    }

    /// The management API's statistics of `names`, by name (absent: the API has none).
    async fn read_management(
        &self,
        client: &ManagementClient,
        names: &[String],
    ) -> Result<HashMap<String, QueueStats>, AmqpSourceError> {
        let after = self
            .config
            .management
            .as_ref()
            .map_or(self.config.timeout, |m| m.timeout);
        let read = async {
            if names.len() <= PER_QUEUE_HTTP_MAX {
                let replies =
                    futures::future::join_all(names.iter().map(|n| client.queue(&self.vhost, n)))
                        .await;
                let mut stats = HashMap::new();
                for reply in replies {
                    if let Some(s) = reply? {
                        stats.insert(s.name.clone(), s);
                    }
                }
                Ok::<_, AmqpSourceError>(stats)
            } else {
                let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
                Ok(client
                    .queues(&self.vhost)
                    .await?
                    .into_iter()
                    .filter(|s| wanted.contains(s.name.as_str()))
                    .map(|s| (s.name.clone(), s))
                    .collect())
            }
        };
        let stats: HashMap<String, QueueStats> =
            tokio::time::timeout(after, read)
                .await
                .map_err(|_| AmqpSourceError::Timeout {
                    url: client.url().to_string(),
                    operation: "the management API read",
                    after,
                })??;
        *lock(&self.last_stats) = Some(Arc::new(
            names.iter().filter_map(|n| stats.get(n).cloned()).collect(),
        ));
        Ok(stats)
    }

    /// The queues to read now, listing the vhost's queues first when discovery is due.
    async fn current_queues(&self) -> Result<Arc<Vec<String>>, AmqpSourceError> {
        let (Some(discovery), Some(client)) = (&self.config.discovery, &self.management) else {
            return Ok(Arc::clone(&lock(&self.queues).names));
        };
        let due = |q: &QueueSet| q.refreshed.is_none_or(|t| t.elapsed() >= discovery.refresh);
        if !due(&lock(&self.queues)) {
            return Ok(Arc::clone(&lock(&self.queues).names));
        }
        let _one_at_a_time = self.discovery_lock.lock().await;
        if !due(&lock(&self.queues)) {
            return Ok(Arc::clone(&lock(&self.queues).names));
        }
        let listed = match client.queues(&self.vhost).await {
            Ok(listed) => listed,
            Err(e) => {
                let mut set = lock(&self.queues);
                if set.refreshed.is_none() && set.names.is_empty() {
                    return Err(e);
                }
                tracing::warn!(error = %e, "queue discovery failed; keeping the last list");
                // Try again at the next refresh, not at every observation.
                set.refreshed = Some(Instant::now());
                return Ok(Arc::clone(&set.names));
            }
        };
        let mut names = self.config.queues.clone();
        let mut discovered = HashSet::new();
        let mut found: Vec<String> = listed
            .into_iter()
            .filter(|s| s.exclusive != Some(true))
            .map(|s| s.name)
            .filter(|n| !n.is_empty() && !is_internal_queue(n))
            .filter(|n| !discovery.exclude.iter().any(|p| wildcard_match(p, n)))
            .filter(|n| !self.config.queues.contains(n))
            .collect();
        found.sort();
        for n in found {
            discovered.insert(n.clone());
            names.push(n);
        }
        let mut set = lock(&self.queues);
        if set.names.as_slice() != names.as_slice() {
            tracing::info!(queues = ?names, "discovered queues");
        }
        *set = QueueSet {
            names: Arc::new(names),
            discovered,
            refreshed: Some(Instant::now()),
        };
        Ok(Arc::clone(&set.names))
    }

    /// Forgets discovered queues that the broker says are gone.
    fn forget(&self, gone: &[String]) {
        let mut set = lock(&self.queues);
        let names: Vec<String> = set
            .names
            .iter()
            .filter(|n| !gone.contains(n))
            .cloned()
            .collect();
        for n in gone {
            set.discovered.remove(n);
        }
        set.names = Arc::new(names);
    }

    fn is_discovered(&self, name: &str) -> bool {
        lock(&self.queues).discovered.contains(name)
    }
}

/// The [`QueueSource`] for Celery on RabbitMQ.
///
/// One observation is one batch of passive `queue.declare`s on one channel of one connection,
/// every declare written before any reply is awaited (ready count and consumers, live), and,
/// with the management API configured, its statistics read concurrently (in-flight count, rates,
/// head message timestamp; up to 5 s old). With heartbeats on, a background task consumes
/// Celery's worker events on the same connection for executing tasks, live workers and
/// throughput; it stops when the source is dropped (or [`AmqpQueueSource::shutdown`] is
/// awaited).
///
/// A dropped connection (broker restart, network, a forced close) is noticed at the next
/// observation, which fails with a transient error or reconnects at once when the broker is back.
///
/// See the crate documentation for an example.
pub struct AmqpQueueSource {
    inner: Arc<Inner>,
    heartbeats: Option<WorkerFeed>,
}

impl fmt::Debug for AmqpQueueSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpQueueSource")
            .field("url", &self.inner.url)
            .field("vhost", &self.inner.vhost)
            .field("queues", &self.queues())
            .field("management", &self.inner.management)
            .field("discovery", &self.inner.config.discovery.is_some())
            .field("heartbeats", &self.heartbeats.is_some())
            .finish()
    }
}

impl AmqpQueueSource {
    /// Validates `config` and prepares the source, without connecting: the first
    /// [`observe`](QueueSource::observe) connects, so a source made while RabbitMQ is down works
    /// once it is up. Reads and checks the `[tls]` files now (an error names the field). With
    /// heartbeats on, starts the worker-event task (which connects in the background, with the
    /// same TLS settings); must be called within a Tokio runtime.
    pub fn new(config: AmqpSourceConfig) -> Result<Self, AmqpSourceError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(AmqpSourceError::NoRuntime)?;
        let mut uri = parse_amqp_url(&config.url)?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(DEFAULT_AMQP_HEARTBEAT);
        }
        let tls = config
            .tls
            .as_ref()
            .map(crate::tls::load)
            .transpose()?
            .unwrap_or_default();
        // The management API trusts the broker's CA too unless it names its own.
        let management = config
            .management
            .as_ref()
            .map(|m| {
                let mut m = m.clone();
                if m.ca_file.is_none() {
                    m.ca_file = config.tls.as_ref().and_then(|t| t.ca_file.clone());
                }
                ManagementClient::new(&m)
            })
            .transpose()?;
        let inner = Arc::new(Inner {
            tls,
            url: config.url.redacted(),
            vhost: uri.vhost.clone(),
            uri,
            link: tokio::sync::Mutex::new(None),
            connections: AtomicU64::new(0),
            management,
            queues: Mutex::new(QueueSet {
                names: Arc::new(config.queues.clone()),
                discovered: HashSet::new(),
                refreshed: None,
            }),
            discovery_lock: tokio::sync::Mutex::new(()),
            last_stats: Mutex::new(None),
            config,
        });
        let heartbeats = inner
            .config
            .heartbeats
            .then(|| crate::heartbeats::start(Arc::clone(&inner), &runtime));
        Ok(AmqpQueueSource { inner, heartbeats })
    }

    /// The configuration.
    pub fn config(&self) -> &AmqpSourceConfig {
        &self.inner.config
    }

    /// The vhost, decoded from the URL (`/` for `%2f`).
    pub fn vhost(&self) -> &str {
        &self.inner.vhost
    }

    /// The queues watched now: the configured ones, then those discovery found.
    pub fn queues(&self) -> Vec<String> {
        lock(&self.inner.queues).names.to_vec()
    }

    /// How many AMQP connections this source has opened so far (1 after the first observation;
    /// each reconnection adds one).
    pub fn connections_opened(&self) -> u64 {
        self.inner.connections.load(Ordering::Relaxed)
    }

    /// Whether the worker-event consumer is up now (`false` when heartbeats are off).
    pub fn is_consuming_heartbeats(&self) -> bool {
        self.heartbeats.as_ref().is_some_and(WorkerFeed::is_up)
    }

    /// The management API's statistics of the watched queues from the last successful read
    /// (rates, head message timestamps, queue types), or `None` before one.
    pub fn management_stats(&self) -> Option<Arc<Vec<QueueStats>>> {
        lock(&self.inner.last_stats).clone()
    }

    /// The passive declares alone, with each queue's own outcome: its live ready count and
    /// consumers, or its typed error (a missing queue does not hide the others).
    pub async fn declare_queues(
        &self,
    ) -> Result<Vec<(String, Result<QueueDepth, AmqpSourceError>)>, AmqpSourceError> {
        let names = self.inner.current_queues().await?;
        let results = self.inner.declare_all(&names).await?;
        Ok(names
            .iter()
            .cloned()
            .zip(results)
            .map(|(name, r)| {
                let depth = r.map(|(ready, consumers)| QueueDepth {
                    consumers: Some(consumers),
                    ..QueueDepth::new(name.clone(), ready)
                });
                (name, depth)
            })
            .collect())
    }

    /// Stops the worker-event task and waits for it, then closes the connection.
    pub async fn shutdown(mut self) {
        if let Some(hb) = self.heartbeats.take() {
            hb.shutdown().await;
        }
        if let Some(link) = self.inner.link.lock().await.take() {
            let _ = link
                .connection
                .close(200, "celery-scale source shut down".into())
                .await;
        }
    }

    async fn observe_inner(&self, at: Instant) -> Result<Observation, AmqpSourceError> {
        let inner = &self.inner;
        let names = inner.current_queues().await?;
        let management = async {
            match &inner.management {
                Some(client) => Some(inner.read_management(client, &names).await),
                None => None,
            }
        };
        let (declared, stats) = tokio::join!(inner.declare_all(&names), management);
        let stats = match stats {
            Some(Ok(stats)) => Some(stats),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "management API read failed; observing without in-flight counts");
                None
            }
            None => None,
        };
        let now_wall = SystemTime::now();
        let declared = match declared {
            Ok(declared) => declared,
            Err(e) => return fallback(&names, stats.as_ref(), e, now_wall, at),
        };
        let mut queues = Vec::with_capacity(names.len());
        let mut gone = Vec::new();
        let mut first_error = None;
        for (name, result) in names.iter().zip(declared) {
            match result {
                Ok((ready, consumers)) => {
                    let stat = stats.as_ref().and_then(|s| s.get(name));
                    queues.push(QueueDepth {
                        queue: name.clone(),
                        ready,
                        in_flight: if stats.is_some() {
                            stat.and_then(|s| s.unacknowledged)
                        } else {
                            None
                        },
                        oldest_age: stat.and_then(|s| s.head_message_age(now_wall)),
                        consumers: Some(consumers),
                    });
                }
                Err(e) if inner.is_discovered(name) => {
                    // Deleted since it was listed (404), or another connection's exclusive
                    // queue (405): not a Celery work queue to watch.
                    tracing::debug!(error = %e, "dropping a discovered queue");
                    gone.push(name.clone());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a queue");
                    first_error.get_or_insert(e);
                }
            }
        }
        if !gone.is_empty() {
            tracing::info!(queues = ?gone, "no longer watching these discovered queues");
            inner.forget(&gone);
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok(Observation::from_queues(queues, at))
    }

    fn with_workers(&self, obs: Observation) -> Observation {
        match self
            .heartbeats
            .as_ref()
            .and_then(|hb| hb.summary(Instant::now()))
        {
            Some(summary) => obs.with_workers(&summary),
            None => obs,
        }
    }
}

/// When the AMQP read failed for a transient reason and the management API answered for every
/// queue, its (up to 5 s old) figures are the observation; otherwise the AMQP error stands.
fn fallback(
    names: &[String],
    stats: Option<&HashMap<String, QueueStats>>,
    error: AmqpSourceError,
    now_wall: SystemTime,
    at: Instant,
) -> Result<Observation, AmqpSourceError> {
    let Some(stats) = stats.filter(|_| error.is_transient()) else {
        return Err(error);
    };
    let mut queues = Vec::with_capacity(names.len());
    for name in names {
        let Some(s) = stats.get(name) else {
            return Err(error);
        };
        let Some(ready) = s.ready else {
            return Err(error);
        };
        queues.push(QueueDepth {
            queue: name.clone(),
            ready,
            in_flight: s.unacknowledged,
            oldest_age: s.head_message_age(now_wall),
            consumers: s.consumers,
        });
    }
    tracing::warn!(error = %error, "AMQP read failed; using the management API's figures (up to 5 s old)");
    Ok(Observation::from_queues(queues, at))
}

#[async_trait]
impl QueueSource for AmqpQueueSource {
    async fn observe(&self) -> celery_scale_core::Result<Observation> {
        let at = Instant::now();
        let after = self.inner.config.timeout;
        let obs = tokio::time::timeout(after, self.observe_inner(at))
            .await
            .map_err(|_| AmqpSourceError::Timeout {
                url: self.inner.url.clone(),
                operation: "observe",
                after,
            })??;
        Ok(self.with_workers(obs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiscoveryConfig, ManagementConfig};

    fn config() -> AmqpSourceConfig {
        AmqpSourceConfig::builder("amqp://user:hunter2@rabbit:5672/prod")
            .queue("celery")
            .management(ManagementConfig::new("http://mon:hunter3@rabbit:15672"))
            .discovery(DiscoveryConfig::default())
            .build()
            .unwrap()
    }

    #[test]
    fn new_needs_a_tokio_runtime() {
        assert!(matches!(
            AmqpQueueSource::new(config()),
            Err(AmqpSourceError::NoRuntime(_))
        ));
    }

    #[tokio::test]
    async fn debug_hides_passwords_and_new_does_no_io() {
        // The host does not resolve: construction must still succeed (no I/O before observe).
        let source = AmqpQueueSource::new(config()).unwrap();
        let shown = format!("{source:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
        assert!(shown.contains("user:***@rabbit"), "{shown}");
        assert_eq!(source.vhost(), "prod");
        assert_eq!(source.queues(), ["celery"]);
        assert_eq!(source.connections_opened(), 0);
        assert!(source.management_stats().is_none());
    }
}
