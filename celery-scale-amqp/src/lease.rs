//! [`AmqpLease`]: the leader lease of a RabbitMQ binding, kept by RabbitMQ itself (an exclusive
//! queue as the lock).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use celery_scale_core::ConfigError;
use celery_scale_core::lease::{LeaseReply, LeaseStore};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};

use crate::config::AmqpSourceConfig;
use crate::connect::Brokers;
use crate::error::{AmqpSourceError, amqp_kind, is_unavailable};

/// The lock queues' names start with this (the queue source's discovery leaves them out).
pub const LOCK_QUEUE_PREFIX: &str = "celery-scale.leader.";

/// The lock queue's argument that names its holder (for operators: the management UI lists
/// it).
pub const HOLDER_ARGUMENT: &str = "x-celery-scale-holder";

/// The longest AMQP queue name.
const MAX_QUEUE_NAME: usize = 255;
/// The shortest period: a heartbeat of one second (RabbitMQ warns that values under 5 s give
/// false positives: the lease is lost more often, never held twice).
const MIN_PERIOD: Duration = Duration::from_secs(1);
/// The longest period (a heartbeat fits lapin's `u16` seconds).
const MAX_PERIOD: Duration = Duration::from_secs(2 * u16::MAX as u64);
/// How long the connection is given to answer its `connection.close`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The lock queue of the lease `name`.
pub(crate) fn lock_queue(name: &str) -> String {
    format!("{LOCK_QUEUE_PREFIX}{name}")
}

/// The heartbeat (whole seconds) that makes RabbitMQ wait at least `period` before it drops
/// a silent connection: `ceil(period / 2)`, at least 1.
fn heartbeat_for(period: Duration) -> u16 {
    let half_ms = period.as_millis().div_ceil(2);
    let secs = half_ms.div_ceil(1000).max(1);
    u16::try_from(secs).unwrap_or(u16::MAX)
}

/// The lease's connection and, while it owns the lock queue, the channel it declared it on.
struct Link {
    connection: Connection,
    owner: Option<Channel>,
    /// Set while a request is outstanding; still set when the request was cancelled midway (the
    /// caller's timeout), in which case nobody knows what the broker did and the link is
    /// dropped before the next use.
    busy: bool,
}

/// A [`LeaseStore`] on RabbitMQ: one exclusive queue per lease, on a connection of its own.
///
/// **The lock** is an exclusive, auto-delete, non-durable queue,
/// `celery-scale.leader.<name>`, declared on a connection of the lease's own (never the
/// queue source's, so a replaced data connection never drops leadership). RabbitMQ lets one
/// connection own an exclusive queue: another connection's declare, passive or not, is
/// refused with `405 RESOURCE_LOCKED` and the broker closes that channel. The broker deletes the
/// queue when the owning connection closes, or when it finds that connection dead by its
/// heartbeat. The queue carries the holder's name in the argument `x-celery-scale-holder`, for
/// operators (the management UI shows it); it is not read back.
///
/// - **Taking** (`acquire` while not held): a fresh channel on the lease's connection
///   (connecting first when there is none), and an exclusive declare: granted, or
///   [`LeaseReply::HeldByOther`] on `405` (the holder is not told: `holder: None`).
/// - **Extending** (`acquire` while held): a passive declare on the owning channel, one round
///   trip that proves the connection and the queue are still ours. Any failure (an error, a
///   timeout, a request cancelled midway, a connection or channel lapin found closed) drops the
///   connection and with it the lease; the call fails with a typed error, or, when the failure
///   was found before sending (the connection was already closed), the same call connects again
///   and tries to take the lease afresh, so an old holder hears `HeldByOther` as soon as it can.
/// - **Releasing** deletes the queue and closes the connection: another copy takes the lease
///   at its next try.
///
/// # What `period` means, and why the core's fencing is safe
///
/// A holder that stops talking (SIGSTOP, a frozen VM, a cut network) keeps the queue until
/// RabbitMQ gives up on its connection. The lease connection asks for an AMQP heartbeat of
/// `H = ceil(period / 2)` whole seconds (whatever the URL says). RabbitMQ 3.x takes the
/// client's value (`connection.tune-ok`), checks every `H` whether any byte arrived and closes
/// the connection after two checks in a row with none (`rabbit_heartbeat.erl`: "we will time
/// out between 2 and 3 intervals after the last data has been received"). So the queue is
/// deleted, and another holder can take it, **no sooner than `2H >= period` and no later than
/// about `3H` (about 1.5 x period) after the last byte RabbitMQ received from the holder**.
/// The last granted request reached the broker after it was sent, so nobody else gets the
/// lease sooner than `period` after the send of our last granted request, while
/// [`Leadership`](celery_scale_core::lease::Leadership) counts it as held for only
/// `0.9 x period` from that send. `tests/lease.rs` measures the broker's detection through a
/// proxy that stops forwarding.
///
/// A broker (or proxy) that lowers the heartbeat below `period / 2` would break that bound:
/// lapin keeps the lower of the two values, so the lease checks the negotiated heartbeat after
/// each connection and refuses to take the lease
/// ([`AmqpSourceError::LeaseHeartbeat`]) when it is too low. RabbitMQ's default `heartbeat`
/// setting is 60 s, so periods up to 120 s work unchanged.
///
/// Not covered by that bound: a connection **closed by someone else** while its holder is
/// alive (an operator closing it, a node shutting down, a TCP reset on the way). The broker
/// deletes the queue at once and another copy may take it while the old holder's `Leadership`
/// still counts the lease as held. The old holder's next renewal (a third of the period
/// later) finds the connection closed, connects again and hears `HeldByOther`, which ends its
/// lease; if it cannot reach the broker, its lease lasts until its `0.9 x period` runs out.
/// (A connection that *this* process's lapin closes for missed broker heartbeats is safe: lapin
/// waits `2H` without a byte from the broker, so no renewal was granted within the period.)
///
/// # Channels
///
/// A follower asks at every tick and each refused declare costs a channel, which the broker
/// closes. The lease keeps one connection and opens one channel per try; lapin 4 forgets a
/// channel once the broker closed it and hands out channel ids round-robin up to the
/// negotiated `channel_max`, skipping ids in use, so the count of channels and the memory held
/// stay bounded however long a copy follows (`tests/lease.rs` makes 500 refused tries).
///
/// # Example
///
/// ```rust,no_run
/// # use std::{sync::Arc, time::Duration};
/// # use celery_scale_core::lease::{Leadership, LeaseStore};
/// # use celery_scale_amqp::{AmqpLease, AmqpSourceConfig};
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = AmqpSourceConfig::builder("amqp://celery:secret@rabbit//").queue("celery").build()?;
/// let holder = celery_scale_core::lease::holder_name();
/// let lease = AmqpLease::new(&config, "emails", Duration::from_secs(10), &holder)?; // no I/O
/// let leadership = Leadership::new(Arc::new(lease));
/// println!("{:?}", leadership.role(Duration::from_secs(3)).await);
/// # Ok(()) }
/// ```
pub struct AmqpLease {
    queue: String,
    period: Duration,
    holder: String,
    heartbeat: u16,
    connection_name: String,
    /// The deadline of one request (channel, declare or delete) once connected.
    request_timeout: Duration,
    brokers: Brokers,
    link: tokio::sync::Mutex<Option<Link>>,
    connections: AtomicU64,
    channels: AtomicU64,
}

impl fmt::Debug for AmqpLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpLease")
            .field("queue", &self.queue)
            .field("holder", &self.holder)
            .field("period", &self.period)
            .field("heartbeat", &self.heartbeat)
            .field("url", &self.brokers.url())
            .field("vhost", &self.brokers.vhost())
            .finish()
    }
}

impl AmqpLease {
    /// The lease `name` of `holder`, kept in the RabbitMQ of `config` (its URL, failover list,
    /// TLS, `connect_timeout` and `timeout`; the lease opens a connection of its own, named
    /// `"{connection_name} lease {name} {holder}"`). A granted request holds the lease for
    /// `period` from its send (see [`AmqpLease`]). Validates `config` and reads its
    /// TLS files, but does not connect: the first [`acquire`](LeaseStore::acquire) does.
    pub fn new(
        config: &AmqpSourceConfig,
        name: &str,
        period: Duration,
        holder: &str,
    ) -> Result<AmqpLease, AmqpSourceError> {
        config.validate()?;
        let queue = lock_queue(name);
        if name.is_empty() {
            return Err(ConfigError::new("lease.name", "must not be empty").into());
        }
        if queue.len() > MAX_QUEUE_NAME {
            return Err(ConfigError::new(
                "lease.name",
                format!(
                    "is {} bytes long; the lock queue {LOCK_QUEUE_PREFIX}<name> may have at most \
                     {MAX_QUEUE_NAME}",
                    name.len()
                ),
            )
            .into());
        }
        if !(MIN_PERIOD..=MAX_PERIOD).contains(&period) {
            return Err(ConfigError::new(
                "lease.period",
                format!("is {period:?}; must be within {MIN_PERIOD:?}..={MAX_PERIOD:?}"),
            )
            .into());
        }
        if holder.is_empty() {
            return Err(ConfigError::new("lease.holder", "must not be empty").into());
        }
        let heartbeat = heartbeat_for(period);
        let resolved = config.resolve()?;
        let brokers = Brokers::new(config, &resolved.brokers, Some(heartbeat), heartbeat)?;
        Ok(AmqpLease {
            queue,
            period,
            holder: holder.to_string(),
            heartbeat,
            connection_name: format!("{} lease {name} {holder}", config.connection_name),
            request_timeout: config.timeout.min(period / 4),
            brokers,
            link: tokio::sync::Mutex::new(None),
            connections: AtomicU64::new(0),
            channels: AtomicU64::new(0),
        })
    }

    /// The lock queue, `celery-scale.leader.<name>`.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The AMQP heartbeat (seconds) the lease connection asks for: `ceil(period / 2)`.
    pub fn heartbeat(&self) -> u16 {
        self.heartbeat
    }

    /// The name of the lease's connection as RabbitMQ shows it (management UI,
    /// `rabbitmqctl list_connections`).
    pub fn connection_name(&self) -> &str {
        &self.connection_name
    }

    /// How many connections the lease has opened so far (one, plus one after each loss).
    pub fn connections_opened(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// How many channels the lease has opened so far (one per try to take it).
    pub fn channels_opened(&self) -> u64 {
        self.channels.load(Ordering::Relaxed)
    }

    /// Drops the link in `slot`, closing its connection without waiting (which deletes the
    /// lock queue if the connection owns it).
    fn discard(&self, slot: &mut Option<Link>) {
        if let Some(old) = slot.take() {
            self.brokers.move_on();
            let close = async move {
                let closing = old
                    .connection
                    .close(200, "celery-scale lease connection replaced".into());
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(close)),
                // Without a runtime, dropping the connection closes it (lapin's auto-close).
                Err(_) => drop(close),
            }
        }
    }

    /// Connects, and checks that the negotiated heartbeat keeps the period's promise.
    async fn connect(&self) -> Result<Link, AmqpSourceError> {
        let connection = self.brokers.connect(&self.connection_name).await?;
        self.connections.fetch_add(1, Ordering::Relaxed);
        let negotiated = connection.configuration().heartbeat();
        if negotiated == 0 || Duration::from_secs(2 * u64::from(negotiated)) < self.period {
            let _ = tokio::time::timeout(
                CLOSE_TIMEOUT,
                connection.close(200, "celery-scale lease: heartbeat too low".into()),
            )
            .await;
            return Err(AmqpSourceError::LeaseHeartbeat {
                url: self.brokers.current_broker().to_string(),
                asked: self.heartbeat,
                negotiated,
                period: self.period,
            });
        }
        tracing::debug!(url = %self.brokers.current_broker(), lease = %self.queue, heartbeat = negotiated, "lease connection open");
        Ok(Link {
            connection,
            owner: None,
            busy: false,
        })
    }

    fn timeout(&self, operation: &'static str) -> AmqpSourceError {
        AmqpSourceError::Timeout {
            url: self.brokers.current_broker().to_string(),
            operation,
            after: self.request_timeout,
        }
    }

    /// The typed error of a failed declare of the lock queue.
    fn declare_error(&self, operation: &str, e: lapin::Error) -> AmqpSourceError {
        match amqp_kind(&e) {
            Some(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)) => {
                AmqpSourceError::QueueAccessRefused {
                    queue: self.queue.clone(),
                    vhost: self.brokers.vhost().to_string(),
                    source: Box::new(e),
                }
            }
            Some(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)) => AmqpSourceError::QueueNotFound {
                queue: self.queue.clone(),
                vhost: self.brokers.vhost().to_string(),
            },
            _ => AmqpSourceError::from_operation(
                self.brokers.current_broker(),
                format!("{operation} of {:?}", self.queue),
                e,
            ),
        }
    }

    /// Takes or extends the lease. Whenever this holder had the lease and the link that owned
    /// the queue failed or was dropped, the reply is [`LeaseReply::Lost`] (the broker deletes
    /// the queue with the connection), unless the lease was taken again in the same call; a
    /// lease taken afresh is [`LeaseReply::Taken`] (the broker cannot tell whether the previous
    /// holder gave it up).
    async fn acquire_inner(&self) -> Result<LeaseReply, AmqpSourceError> {
        let mut lost = None;
        let reply = self.acquire_link(&mut lost).await;
        match (reply, lost) {
            (Err(e), Some(why)) => Ok(LeaseReply::Lost {
                why: format!("{why}: {e}"),
            }),
            (Ok(LeaseReply::HeldByOther { .. }), Some(why)) => Ok(LeaseReply::Lost { why }),
            (reply, _) => reply,
        }
    }

    async fn acquire_link(&self, lost: &mut Option<String>) -> Result<LeaseReply, AmqpSourceError> {
        let mut slot = self.link.lock().await;
        if let Some(link) = slot.as_ref() {
            let broken = link.busy
                || !link.connection.status().connected()
                || link.owner.as_ref().is_some_and(|c| !c.status().connected());
            if broken {
                if link.owner.is_some() {
                    tracing::warn!(url = %self.brokers.current_broker(), lease = %self.queue, "the lease connection failed: the lease is lost; connecting again");
                    *lost = Some("the connection that owned the lock queue failed".into());
                }
                self.discard(&mut slot);
            }
        }
        if let Some(link) = slot.as_mut()
            && let Some(owner) = link.owner.clone()
        {
            link.busy = true;
            let extend = owner.queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            );
            return match tokio::time::timeout(self.request_timeout, extend).await {
                Ok(Ok(_)) => {
                    link.busy = false;
                    Ok(LeaseReply::Held)
                }
                Ok(Err(e)) => {
                    self.discard(&mut slot);
                    *lost = Some("the renewal failed and the owning connection was closed".into());
                    Err(self.declare_error("queue.declare(passive)", e))
                }
                Err(_) => {
                    self.discard(&mut slot);
                    *lost =
                        Some("the renewal timed out and the owning connection was closed".into());
                    Err(self.timeout("lease renewal"))
                }
            };
        }
        let link = match slot.take() {
            Some(link) => slot.insert(link),
            None => slot.insert(self.connect().await?),
        };
        link.busy = true;
        let take = async {
            let channel = link.connection.create_channel().await.map_err(|e| {
                AmqpSourceError::from_operation(
                    self.brokers.current_broker(),
                    "channel.open".into(),
                    e,
                )
            })?;
            self.channels.fetch_add(1, Ordering::Relaxed);
            let mut arguments = FieldTable::default();
            arguments.insert(
                HOLDER_ARGUMENT.into(),
                AMQPValue::LongString(self.holder.as_str().into()),
            );
            let options = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                durable: false,
                ..QueueDeclareOptions::default()
            };
            let declared = channel
                .queue_declare(self.queue.as_str().into(), options, arguments)
                .await;
            Ok::<_, AmqpSourceError>((channel, declared))
        };
        match tokio::time::timeout(self.request_timeout, take).await {
            Err(_) => {
                self.discard(&mut slot);
                Err(self.timeout("lease request"))
            }
            Ok(Err(e)) => {
                self.discard(&mut slot);
                Err(e)
            }
            Ok(Ok((channel, Ok(_)))) => {
                link.owner = Some(channel);
                link.busy = false;
                Ok(LeaseReply::Taken)
            }
            Ok(Ok((_, Err(e)))) => {
                if matches!(
                    amqp_kind(&e),
                    Some(AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED))
                ) {
                    // The broker closed that channel; lapin forgets it (its id is reused).
                    link.busy = false;
                    return Ok(LeaseReply::HeldByOther { holder: None });
                }
                let gone = is_unavailable(&e) || !link.connection.status().connected();
                let error = self.declare_error("queue.declare(exclusive)", e);
                if gone {
                    self.discard(&mut slot);
                } else {
                    link.busy = false;
                }
                Err(error)
            }
        }
    }

    async fn release_inner(&self) -> Result<(), AmqpSourceError> {
        let Some(link) = self.link.lock().await.take() else {
            return Ok(());
        };
        let mut deleted = Ok(());
        if let (Some(owner), false) = (&link.owner, link.busy) {
            let delete =
                owner.queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default());
            deleted = match tokio::time::timeout(self.request_timeout, delete).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(self.declare_error("queue.delete", e)),
                Err(_) => Err(self.timeout("lease release")),
            };
        }
        // Closing the connection deletes the queue too, if the delete did not.
        let closed = tokio::time::timeout(
            CLOSE_TIMEOUT,
            link.connection
                .close(200, "celery-scale lease released".into()),
        )
        .await;
        match (deleted, closed) {
            (Ok(()), _) | (_, Ok(Ok(()))) => Ok(()),
            (Err(e), _) => Err(e),
        }
    }
}

#[async_trait]
impl LeaseStore for AmqpLease {
    async fn acquire(&self) -> celery_scale_core::Result<LeaseReply> {
        Ok(self.acquire_inner().await?)
    }

    async fn release(&self) -> celery_scale_core::Result<()> {
        Ok(self.release_inner().await?)
    }

    fn period(&self) -> Duration {
        self.period
    }

    fn holder(&self) -> &str {
        &self.holder
    }

    fn describe(&self) -> String {
        format!(
            "RabbitMQ queue {:?} in vhost {:?} at {}",
            self.queue,
            self.brokers.vhost(),
            self.brokers.current_broker()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AmqpSourceConfig {
        AmqpSourceConfig::builder("amqp://user:hunter2@rabbit:5672/prod?heartbeat=60")
            .queue("celery")
            .build()
            .unwrap()
    }

    #[test]
    fn heartbeat_is_half_the_period_rounded_up() {
        for (period_ms, heartbeat) in [
            (1_000, 1),
            (1_500, 1),
            (2_000, 1),
            (2_001, 2),
            (3_000, 2),
            (4_000, 2),
            (7_000, 4),
            (10_000, 5),
            (120_000, 60),
        ] {
            let h = heartbeat_for(Duration::from_millis(period_ms));
            assert_eq!(h, heartbeat, "{period_ms} ms");
            assert!(
                Duration::from_secs(2 * u64::from(h)) >= Duration::from_millis(period_ms),
                "{period_ms} ms"
            );
        }
        assert_eq!(heartbeat_for(MAX_PERIOD), u16::MAX);
    }

    #[test]
    fn new_does_no_io_and_hides_the_password() {
        // The host does not resolve: construction must still succeed; no runtime needed.
        let lease = AmqpLease::new(&config(), "emails", Duration::from_secs(10), "a").unwrap();
        assert_eq!(lease.queue(), "celery-scale.leader.emails");
        assert_eq!(lease.heartbeat(), 5);
        assert_eq!(lease.period(), Duration::from_secs(10));
        assert_eq!(lease.holder(), "a");
        assert_eq!(lease.connections_opened(), 0);
        assert_eq!(lease.connection_name(), "celery-scale lease emails a");
        for shown in [format!("{lease:?}"), lease.describe()] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("user:***@rabbit"), "{shown}");
        }
        // The URL's heartbeat is replaced by the period's.
        assert!(
            lease
                .brokers
                .list_heartbeats()
                .iter()
                .all(|h| *h == Some(5))
        );
    }

    #[test]
    fn new_checks_name_period_and_holder() {
        let c = config();
        let field = |r: Result<AmqpLease, AmqpSourceError>| match r {
            Err(AmqpSourceError::Config(e)) => e.field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(AmqpLease::new(&c, "", Duration::from_secs(10), "a")),
            "lease.name"
        );
        assert_eq!(
            field(AmqpLease::new(
                &c,
                &"x".repeat(236),
                Duration::from_secs(10),
                "a"
            )),
            "lease.name"
        );
        assert!(AmqpLease::new(&c, &"x".repeat(235), Duration::from_secs(10), "a").is_ok());
        assert_eq!(
            field(AmqpLease::new(&c, "e", Duration::from_millis(500), "a")),
            "lease.period"
        );
        assert_eq!(
            field(AmqpLease::new(
                &c,
                "e",
                MAX_PERIOD + Duration::from_secs(1),
                "a"
            )),
            "lease.period"
        );
        assert_eq!(
            field(AmqpLease::new(&c, "e", Duration::from_secs(10), "")),
            "lease.holder"
        );
    }
}
