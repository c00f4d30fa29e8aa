//! [`AmqpQueueSource`]: Celery's queues on RabbitMQ, read with pipelined passive declares and,
//! optionally, the management API.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use celery_scale_core::celery_events::WorkerFeed;
use celery_scale_core::{Observation, QueueDepth, QueueSource};
use futures::StreamExt as _;
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;

use crate::config::ManagementConfig;
use lapin::{Channel, Connection};
use tokio::time::Instant;

use crate::config::{AmqpSourceConfig, is_internal_queue};
use crate::connect::Brokers;
use crate::error::{AmqpSourceError, amqp_kind, is_unavailable};
use crate::management::{ManagementClient, QueueStats};

/// AMQP heartbeat asked for when the URL does not say (seconds): a dead connection is noticed
/// within about twice this.
const DEFAULT_AMQP_HEARTBEAT: u16 = 10;
/// Up to this many queues the management API is asked one queue at a time (concurrently);
/// above it, one list call with only the needed columns.
const PER_QUEUE_HTTP_MAX: usize = 8;

/// How long a management API derived from the AMQP URL (not configured) is left alone after it
/// failed: it may simply not be there (no plugin, another port), and each try costs a timeout.
const DERIVED_MANAGEMENT_RETRY: Duration = Duration::from_secs(60);

/// How long a replaced connection is given to answer its `connection.close`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Missing queues probed at once (each on a channel of its own).
const MAX_CONCURRENT_PROBES: usize = 16;
/// The shortest time between two probes of one missing queue, whatever the management API says.
const MIN_PROBE_GAP: Duration = Duration::from_secs(5);

/// One queue's passive declare: its ready count and consumers, or its typed error.
type Declared = Result<(u64, u32), AmqpSourceError>;

/// Why a batch of declares failed as a whole.
enum Failure {
    /// The connection is gone (or unusable): reconnect.
    Gone(AmqpSourceError),
    /// Anything else; the connection stays.
    Other(AmqpSourceError),
}

/// The refusal of a passive declare that names the queue (404 missing, 403 forbidden, 405
/// another connection's exclusive queue); the broker closes the channel for each.
fn queue_refusal(e: &lapin::Error) -> Option<AMQPSoftError> {
    match amqp_kind(e) {
        Some(AMQPErrorKind::Soft(
            s @ (AMQPSoftError::NOTFOUND
            | AMQPSoftError::ACCESSREFUSED
            | AMQPSoftError::RESOURCELOCKED),
        )) => Some(s.clone()),
        _ => None,
    }
}

/// A watched queue that the broker said does not exist.
struct MissingQueue {
    /// When it was first found missing.
    since: Instant,
    /// When it was last declared (and found missing).
    probed: Instant,
    /// When to declare it again.
    next_check: Instant,
}

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
    /// The brokers of the URL and how to connect to them (TLS included). Never derive
    /// `Debug` for `Inner`: theirs would print secrets.
    brokers: Brokers,
    url: String,
    vhost: String,
    link: tokio::sync::Mutex<Option<Link>>,
    connections: AtomicU64,
    /// Channels opened on the source's connections (the worker-event consumer's not counted).
    channels: AtomicU64,
    /// Watched queues known to be missing.
    missing: Mutex<HashMap<String, MissingQueue>>,
    /// The management API of each broker (derived), or the configured one; empty when off.
    management: Vec<ManagementClient>,
    /// Whether `management` was derived from the AMQP URL (then a failing one is left alone
    /// for [`DERIVED_MANAGEMENT_RETRY`]).
    management_derived: bool,
    /// Until when a failing derived management API is not read.
    management_paused: Mutex<Option<Instant>>,
    /// Whether the derived management API's failure was logged (once, until it answers).
    management_failing: AtomicBool,
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

    /// Connects to the first broker of the failover list that answers, starting with the
    /// current one (kombu's round-robin failover: the list in order, from where it is), and
    /// opens the declares' channel.
    async fn connect(&self) -> Result<Link, AmqpSourceError> {
        let connection = self.brokers.connect(&self.config.connection_name).await?;
        let n = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        if n > 1 {
            tracing::info!(url = %self.brokers.current_broker(), connections = n, "reconnected to RabbitMQ");
        } else {
            tracing::debug!(url = %self.brokers.current_broker(), "connected to RabbitMQ");
        }
        let channel = self.open_channel(&connection).await?;
        Ok(Link {
            connection: Arc::new(connection),
            channel,
            busy: false,
        })
    }

    /// After the connection in use failed: the next connection starts with the next broker
    /// of the list, as kombu's failover moves on.
    fn move_on(&self) {
        self.brokers.move_on();
    }

    /// The broker in use (or to try first), redacted.
    pub(crate) fn current_broker(&self) -> &str {
        self.brokers.current_broker()
    }

    /// The management API to read now (the current broker's, when derived for each).
    fn management_client(&self) -> Option<&ManagementClient> {
        if self.management.is_empty() {
            return None;
        }
        let paused = *lock(&self.management_paused);
        if self.management_derived && paused.is_some_and(|until| Instant::now() < until) {
            return None;
        }
        let i = self.brokers.current_index() % self.management.len();
        self.management.get(i)
    }

    /// Notes how a read of the management API went: a derived one that fails is logged once
    /// and left alone for [`DERIVED_MANAGEMENT_RETRY`].
    fn management_outcome(&self, client: &ManagementClient, error: Option<&AmqpSourceError>) {
        match error {
            None => {
                if self.management_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(url = %client.url(), "the management API answers again");
                }
            }
            Some(e) if self.management_derived => {
                *lock(&self.management_paused) = Some(Instant::now() + DERIVED_MANAGEMENT_RETRY);
                if !self.management_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        url = %client.url(),
                        error = %e,
                        retry = ?DERIVED_MANAGEMENT_RETRY,
                        "the management API at the broker's host does not answer: in-flight \
                         counts unknown; set management.url, or management = false to stop trying"
                    );
                }
            }
            Some(e) => {
                tracing::warn!(error = %e, "management API read failed; observing without in-flight counts");
            }
        }
    }

    /// Opens a channel on `connection`, counting it.
    async fn open_channel(&self, connection: &Connection) -> Result<Channel, AmqpSourceError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| AmqpSourceError::from_operation(&self.url, "channel.open".into(), e))?;
        self.channels.fetch_add(1, Ordering::Relaxed);
        Ok(channel)
    }

    /// Takes the link out of `slot` and closes its connection in the background, so that its
    /// I/O thread ends and its memory is freed, and the worker-event consumer (which shares it)
    /// notices and moves to the next connection. Dropping a lapin connection that another task
    /// still holds would leave it open.
    fn discard(&self, slot: &mut Option<Link>) {
        if let Some(old) = slot.take() {
            self.close_in_background(old);
            self.move_on();
        }
    }

    /// Closes `old`'s connection without waiting (see [`discard`](Self::discard)).
    fn close_in_background(&self, old: Link) {
        let url = self.url.clone();
        let close = async move {
            let closing = old
                .connection
                .close(200, "celery-scale replaces this connection".into());
            match tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
                Ok(Ok(())) => {
                    tracing::debug!(url = %url, "closed the replaced RabbitMQ connection")
                }
                // Already broken: lapin has ended its I/O loop.
                Ok(Err(e)) => {
                    tracing::debug!(url = %url, error = %e, "the replaced RabbitMQ connection was already closed")
                }
                Err(_) => {
                    tracing::debug!(url = %url, "the replaced RabbitMQ connection did not answer its close in time; dropped")
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(close)),
            // Without a runtime (a source dropped outside one) the drop of `old` does the rest.
            Err(_) => drop(close),
        }
    }

    /// Makes sure `slot` holds an open connection and channel; returns the link, and whether
    /// its connection was made by this call (an error on an older one may be stale: the broker
    /// went away and came back since).
    async fn ensure<'a>(
        &self,
        slot: &'a mut Option<Link>,
    ) -> Result<(&'a mut Link, bool), AmqpSourceError> {
        let mut fresh = false;
        let link = match slot.take() {
            Some(link) if link.connection.status().connected() => slot.insert(link),
            old => {
                if let Some(old) = old {
                    tracing::warn!(url = %self.current_broker(), "the RabbitMQ connection is gone; reconnecting");
                    self.close_in_background(old);
                    self.move_on();
                }
                fresh = true;
                slot.insert(self.connect().await?)
            }
        };
        if link.busy || !link.channel.status().connected() {
            link.channel = self.open_channel(&link.connection).await?;
            link.busy = false;
        }
        Ok((link, fresh))
    }

    /// The shared connection (connecting if needed), for the worker-event consumer.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>, AmqpSourceError> {
        let mut slot = self.link.lock().await;
        let (link, _) = self.ensure(&mut slot).await?;
        Ok(Arc::clone(&link.connection))
    }

    /// Passive `queue.declare` of every name, each with its own outcome (a missing queue is
    /// [`AmqpSourceError::QueueNotFound`]).
    ///
    /// Queues known to exist are declared on the one channel, all written before any reply is
    /// awaited. A queue known to be missing is not declared again until its recheck is due
    /// (every `missing_queue_recheck`, or at once when the management API lists it): a passive
    /// declare of a missing queue makes the broker close the channel, so each one costs a
    /// channel. The due ones are probed concurrently, each on a channel of its own.
    ///
    /// When the connection was made before this call and fails as gone (the broker restarted
    /// since, and lapin had not noticed yet), the declares are sent once more on a new
    /// connection, so the first observation after the broker is back reads it.
    async fn declare_all(&self, names: &[String]) -> Result<Vec<Declared>, AmqpSourceError> {
        let mut slot = self.link.lock().await;
        let (link, fresh) = self.ensure(&mut slot).await?;
        match self.declare_on(link, names).await {
            Err(Failure::Gone(e)) if !fresh => {
                tracing::info!(url = %self.url, error = %e, "the RabbitMQ connection failed; retrying on a new one");
                self.discard(&mut slot);
                let (link, _) = self.ensure(&mut slot).await?;
                match self.declare_on(link, names).await {
                    Ok(declared) => Ok(declared),
                    Err(Failure::Gone(e)) => {
                        self.discard(&mut slot);
                        Err(e)
                    }
                    Err(Failure::Other(e)) => Err(e),
                }
            }
            Err(Failure::Gone(e)) => {
                self.discard(&mut slot);
                Err(e)
            }
            Err(Failure::Other(e)) => Err(e),
            Ok(declared) => Ok(declared),
        }
    }

    async fn declare_on(
        &self,
        link: &mut Link,
        names: &[String],
    ) -> Result<Vec<Declared>, Failure> {
        let now = Instant::now();
        let mut results: Vec<Option<Declared>> = names.iter().map(|_| None).collect();
        let mut regular = Vec::new();
        let mut due = Vec::new();
        {
            let missing = lock(&self.missing);
            for (i, name) in names.iter().enumerate() {
                match missing.get(name) {
                    None => regular.push(i),
                    Some(m) if m.next_check <= now => due.push(i),
                    Some(_) => results[i] = Some(Err(self.not_found(name))),
                }
            }
        }
        link.busy = true;
        self.declare_pipelined(link, names, regular, &mut results)
            .await?;
        link.busy = false;
        self.probe(link, names, &due, &mut results).await?;
        let mut out = Vec::with_capacity(names.len());
        for (name, r) in names.iter().zip(results) {
            // Every index was in one of the three groups.
            out.push(r.unwrap_or_else(|| Err(self.not_found(name))));
        }
        Ok(out)
    }

    fn not_found(&self, name: &str) -> AmqpSourceError {
        AmqpSourceError::QueueNotFound {
            queue: name.to_string(),
            vhost: self.vhost.clone(),
        }
    }

    /// Passive declares of `pending` on the link's channel, all written before any reply is
    /// awaited. A queue that is missing (404) or forbidden (403, 405) makes the broker close
    /// the channel and fail every declare behind it: that queue gets its typed error, the
    /// channel is reopened and the declares behind it are sent again.
    async fn declare_pipelined(
        &self,
        link: &mut Link,
        names: &[String],
        mut pending: Vec<usize>,
        results: &mut [Option<Declared>],
    ) -> Result<(), Failure> {
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
            let Some(soft) = queue_refusal(error) else {
                let gone = is_unavailable(error) || !link.connection.status().connected();
                let e = AmqpSourceError::from_operation(
                    &self.url,
                    format!("queue.declare(passive) of {:?}", names[*first]),
                    error.clone(),
                );
                return Err(if gone {
                    Failure::Gone(e)
                } else {
                    Failure::Other(e)
                });
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
            results[culprit] = Some(Err(self.refusal(&names[culprit], soft, error)));
            tracing::debug!(queue = %names[culprit], "the broker closed the channel on a passive declare; reopening it");
            link.channel = self
                .open_channel(&link.connection)
                .await
                .map_err(Failure::Gone)?;
            pending = failed
                .into_iter()
                .map(|(i, _)| i)
                .filter(|&i| i != culprit)
                .collect();
        }
        Ok(())
    }

    /// The typed error of a queue the broker refused (`soft` from [`queue_refusal`]); a missing
    /// one is remembered as missing.
    fn refusal(&self, name: &str, soft: AMQPSoftError, error: lapin::Error) -> AmqpSourceError {
        match soft {
            AMQPSoftError::NOTFOUND => {
                self.mark_missing(name);
                self.not_found(name)
            }
            AMQPSoftError::RESOURCELOCKED => AmqpSourceError::QueueLocked {
                queue: name.to_string(),
                vhost: self.vhost.clone(),
                source: Box::new(error),
            },
            _ => AmqpSourceError::QueueAccessRefused {
                queue: name.to_string(),
                vhost: self.vhost.clone(),
                source: Box::new(error),
            },
        }
    }

    /// Passive declares of the missing queues whose recheck is due, concurrently, each on a
    /// channel of its own (a 404 closes it; a success means the queue exists now).
    async fn probe(
        &self,
        link: &Link,
        names: &[String],
        due: &[usize],
        results: &mut [Option<Declared>],
    ) -> Result<(), Failure> {
        if due.is_empty() {
            return Ok(());
        }
        let connection = Arc::clone(&link.connection);
        let mut futures = Vec::with_capacity(due.len());
        for &i in due {
            let connection = Arc::clone(&connection);
            let name = names[i].clone();
            futures.push(async move {
                let channel = self.open_channel(&connection).await?;
                let reply = channel
                    .queue_declare(
                        name.as_str().into(),
                        QueueDeclareOptions::default().passive(),
                        FieldTable::default(),
                    )
                    .await;
                if reply.is_ok() {
                    let _ = channel.close(200, "probe done".into()).await;
                }
                Ok::<_, AmqpSourceError>((i, reply))
            });
        }
        let probes: Vec<_> = futures::stream::iter(futures)
            .buffer_unordered(MAX_CONCURRENT_PROBES)
            .collect()
            .await;
        for probe in probes {
            let (i, reply) = probe.map_err(Failure::Gone)?;
            let name = &names[i];
            match reply {
                Ok(q) => {
                    self.mark_present(name);
                    results[i] = Some(Ok((u64::from(q.message_count()), q.consumer_count())));
                }
                Err(e) => match queue_refusal(&e) {
                    Some(AMQPSoftError::NOTFOUND) => {
                        self.mark_missing(name);
                        results[i] = Some(Err(self.not_found(name)));
                    }
                    Some(soft) => results[i] = Some(Err(self.refusal(name, soft, e))),
                    None => {
                        let gone = is_unavailable(&e) || !connection.status().connected();
                        let e = AmqpSourceError::from_operation(
                            &self.url,
                            format!("queue.declare(passive) of {name:?}"),
                            e,
                        );
                        return Err(if gone {
                            Failure::Gone(e)
                        } else {
                            Failure::Other(e)
                        });
                    }
                },
            }
        }
        Ok(())
    }

    /// Records that `name` does not exist (logged once, when it goes missing) and schedules its
    /// next recheck.
    fn mark_missing(&self, name: &str) {
        let now = Instant::now();
        let recheck = self.config.missing_queue_recheck;
        let mut missing = lock(&self.missing);
        match missing.get_mut(name) {
            Some(m) => {
                m.next_check = now + recheck;
                m.probed = now;
            }
            None => {
                if !self.is_discovered(name) {
                    tracing::warn!(
                        queue = name,
                        vhost = %self.vhost,
                        recheck = ?recheck,
                        "a watched queue does not exist (yet); it reads as 0 ready until it appears"
                    );
                }
                missing.insert(
                    name.to_string(),
                    MissingQueue {
                        since: now,
                        probed: now,
                        next_check: now + recheck,
                    },
                );
            }
        }
    }

    /// Records that `name` exists (logged once, when it was missing).
    fn mark_present(&self, name: &str) {
        if let Some(m) = lock(&self.missing).remove(name) {
            tracing::info!(
                queue = name,
                vhost = %self.vhost,
                missing_for = ?m.since.elapsed(),
                "a watched queue that was missing exists now"
            );
        }
    }

    /// What the management API's (successful) read says about the missing queues: one it lists
    /// is rechecked at the next observation; one it does not list stays missing without a
    /// probe (and its channel) until the API lists it or the API stops answering.
    fn learn_from_management(&self, stats: &HashMap<String, QueueStats>) {
        let now = Instant::now();
        let recheck = self.config.missing_queue_recheck;
        for (name, m) in lock(&self.missing).iter_mut() {
            m.next_check = if stats.contains_key(name) {
                // Not sooner than MIN_PROBE_GAP after the last probe, should the API list a
                // queue that the broker still answers 404 for.
                m.next_check.min(now.max(m.probed + MIN_PROBE_GAP))
            } else {
                m.next_check.max(now + recheck)
            };
        }
    }

    /// The management API's statistics of `names`, by name (absent: the API has none).
    async fn read_management(
        &self,
        client: &ManagementClient,
        names: &[String],
    ) -> Result<HashMap<String, QueueStats>, AmqpSourceError> {
        let after = self.config.management.timeout;
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
        // Discovery reads the API even while a failing derived one is paused (at most once
        // per refresh), so that a source with no configured queues reports the failure.
        let client = self
            .management
            .get(self.brokers.current_index() % self.management.len().max(1));
        let (Some(discovery), Some(client)) = (&self.config.discovery, client) else {
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
        let configured: HashSet<&str> = self.config.queues.iter().map(String::as_str).collect();
        let mut discovered = HashSet::new();
        let mut found: Vec<String> = listed
            .into_iter()
            .filter(|s| s.exclusive != Some(true))
            .map(|s| s.name)
            .filter(|n| !n.is_empty() && !is_internal_queue(n))
            .filter(|n| !discovery.excludes(n))
            .filter(|n| !configured.contains(n.as_str()))
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
        drop(set);
        let mut missing = lock(&self.missing);
        for n in gone {
            missing.remove(n);
        }
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
    /// Consumes, on a channel of the source's connection and a queue of its own, Celery's
    /// event exchange `celeryev`: the worker events (`worker.#`), and with `task_events` the
    /// task events that workers run with `-E` send (`task.#`, `task.multi` included, and
    /// `task-sent` from publishers with `task_send_sent_event`). Reads nothing but events.
    pub async fn subscribe_celery_events(
        &self,
        task_events: bool,
    ) -> Result<crate::CeleryEventConsumer, AmqpSourceError> {
        let keys: &[&str] = if task_events {
            &["worker.#", "task.#"]
        } else {
            &["worker.#"]
        };
        crate::CeleryEventConsumer::start(&self.inner, keys).await
    }

    /// Validates `config` and prepares the source, without connecting: the first
    /// [`observe`](QueueSource::observe) connects, so a source made while RabbitMQ is down works
    /// once it is up. Reads and checks the `[tls]` files now (an error names the field). With
    /// heartbeats on, starts the worker-event task (which connects in the background, with the
    /// same TLS settings); must be called within a Tokio runtime.
    pub fn new(config: AmqpSourceConfig) -> Result<Self, AmqpSourceError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(AmqpSourceError::NoRuntime)?;
        let resolved = config.resolve()?;
        for (key, why) in &resolved.ignored {
            tracing::info!(option = %key, why, "ignoring a transport option that does not change what is counted");
        }
        let brokers = Brokers::new(&config, &resolved.brokers, None, DEFAULT_AMQP_HEARTBEAT)?;
        // The management API trusts the broker's CA too unless it names its own.
        let management = resolved
            .management_urls
            .iter()
            .map(|url| {
                let mut m = ManagementConfig {
                    url: Some(url.clone()),
                    ..config.management.clone()
                };
                if m.ca_file.is_none() {
                    m.ca_file = config.tls.as_ref().and_then(|t| t.ca_file.clone());
                }
                ManagementClient::new(&m)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let inner = Arc::new(Inner {
            url: brokers.url().to_string(),
            vhost: brokers.vhost().to_string(),
            brokers,
            link: tokio::sync::Mutex::new(None),
            connections: AtomicU64::new(0),
            channels: AtomicU64::new(0),
            missing: Mutex::new(HashMap::new()),
            management,
            management_derived: resolved.management_derived,
            management_paused: Mutex::new(None),
            management_failing: AtomicBool::new(false),
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

    /// The broker in use (or to be tried first at the next connection), redacted
    /// (`amqp://user:***@host:port/vhost`): with a failover list, the first that answered, and
    /// the next one after it failed.
    pub fn current_broker(&self) -> String {
        self.inner.current_broker().to_string()
    }

    /// The management API base URLs this source reads, redacted (one per broker when derived
    /// from the AMQP URL; the current broker's is read); empty when it is turned off.
    pub fn management_urls(&self) -> Vec<String> {
        self.inner
            .management
            .iter()
            .map(|m| m.url().to_string())
            .collect()
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

    /// How many AMQP channels this source has opened so far for its declares (the
    /// worker-event consumer's not counted): one per connection, one more each time the broker
    /// closes the channel (a queue went missing or is refused), and one per recheck of a missing
    /// queue.
    pub fn channels_opened(&self) -> u64 {
        self.inner.channels.load(Ordering::Relaxed)
    }

    /// The watched queues that the broker said do not exist, read as 0 ready until they do.
    pub fn missing_queues(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.inner.missing).keys().cloned().collect();
        names.sort();
        names
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
    /// consumers, or its typed error (a missing queue does not hide the others). A queue
    /// found missing before is [`AmqpSourceError::QueueNotFound`] without a new declare until
    /// its recheck is due (see [`AmqpSourceConfig::missing_queue_recheck`]).
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
        let client = inner.management_client();
        let management = async {
            match client {
                Some(client) => Some(inner.read_management(client, &names).await),
                None => None,
            }
        };
        let (declared, stats) = tokio::join!(inner.declare_all(&names), management);
        let stats = match stats {
            Some(Ok(stats)) => {
                if let Some(client) = client {
                    inner.management_outcome(client, None);
                }
                inner.learn_from_management(&stats);
                Some(stats)
            }
            Some(Err(e)) => {
                if let Some(client) = client {
                    inner.management_outcome(client, Some(&e));
                }
                None
            }
            None => None,
        };
        let now_wall = SystemTime::now();
        let declared = match declared {
            Ok(declared) => declared,
            Err(e) => {
                let missing: HashSet<String> = lock(&inner.missing)
                    .keys()
                    .filter(|n| !inner.is_discovered(n))
                    .cloned()
                    .collect();
                return fallback(&names, stats.as_ref(), &missing, e, now_wall, at);
            }
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
                Err(AmqpSourceError::QueueNotFound { .. }) if !inner.is_discovered(name) => {
                    // A configured queue that does not exist (yet: Celery declares it at the
                    // first publish or worker start) holds nothing; logged when it goes missing
                    // and when it appears. If the management API lists it already (it appeared
                    // since the declare), its figures are better than 0.
                    queues.push(missing_queue_depth(name, stats.as_ref(), now_wall));
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
        match &self.heartbeats {
            Some(feed) => obs.with_worker_reading(feed.reading(Instant::now())),
            None => obs,
        }
    }
}

/// A configured queue that the broker says does not exist: 0 ready, nothing in flight, no
/// consumers; or, when the management API lists it (it appeared since), the API's figures.
fn missing_queue_depth(
    name: &str,
    stats: Option<&HashMap<String, QueueStats>>,
    now_wall: SystemTime,
) -> QueueDepth {
    match stats.and_then(|s| s.get(name)) {
        Some(
            s @ QueueStats {
                ready: Some(ready), ..
            },
        ) => QueueDepth {
            queue: name.to_string(),
            ready: *ready,
            in_flight: s.unacknowledged,
            oldest_age: s.head_message_age(now_wall),
            consumers: s.consumers,
        },
        _ => QueueDepth {
            queue: name.to_string(),
            ready: 0,
            // Known only when the management API was read: AMQP alone never reads in flight.
            in_flight: stats.map(|_| 0),
            oldest_age: None,
            consumers: Some(0),
        },
    }
}

/// When the AMQP read failed for a transient reason and the management API answered for every
/// queue, its (up to 5 s old) figures are the observation; otherwise the AMQP error stands.
fn fallback(
    names: &[String],
    stats: Option<&HashMap<String, QueueStats>>,
    missing: &HashSet<String>,
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
            if missing.contains(name) {
                // Missing at the last declare and not listed by the API now: still missing.
                queues.push(missing_queue_depth(name, Some(stats), now_wall));
                continue;
            }
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

    /// Whether the worker-event consumer is up and past `heartbeat_warmup` (always, without
    /// heartbeats).
    fn is_warmed_up(&self) -> bool {
        self.heartbeats
            .as_ref()
            .is_none_or(|h| h.is_warm(Instant::now()))
    }

    /// Stops the worker-event consumer and closes the connection.
    async fn close(&self) {
        if let Some(h) = &self.heartbeats {
            h.stop();
        }
        if let Some(link) = self.inner.link.lock().await.take() {
            let _ = link
                .connection
                .close(200, "celery-scale source closed".into())
                .await;
        }
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
