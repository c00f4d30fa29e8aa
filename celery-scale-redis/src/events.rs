//! A subscription to every message of Celery's event exchange (`celeryev`), for tools that
//! read task events (`celery-scale record`), not only the worker heartbeats the source reads.

use std::sync::Arc;
use std::time::Duration;

use celery_scale_core::celery_events::decode_kombu_envelope;
use futures::StreamExt as _;
use redis::aio::{PubSubSink, PubSubStream};

use crate::connect::Connector;
use crate::error::RedisSourceError;

/// How often the subscription pings the server to notice a dead connection.
const PING_EVERY: Duration = Duration::from_secs(5);

/// The routing keys of Celery's task events: one each (`-P solo`, a publisher's `task-sent`)
/// and `task.multi`, the JSON list a worker with an event loop (prefork) publishes its
/// buffered task events as.
pub(crate) const TASK_EVENT_KEYS: [&str; 9] = [
    "task.sent",
    "task.received",
    "task.started",
    "task.succeeded",
    "task.failed",
    "task.retried",
    "task.rejected",
    "task.revoked",
    "task.multi",
];

/// A live subscription to the PUB/SUB channels of Celery's event exchange, made by
/// [`RedisQueueSource::subscribe_celery_events`](crate::RedisQueueSource::subscribe_celery_events).
/// [`next`](CeleryEventSubscription::next) gives the body of each message with kombu's
/// envelope taken off: the event JSON (an object, or a list for `task.multi`), untrusted.
/// It ends (or fails) when the connection does; subscribe again to go on.
pub struct CeleryEventSubscription {
    sink: PubSubSink,
    stream: PubSubStream,
    ping: tokio::time::Interval,
    url: String,
    timeout: Duration,
    undecodable: u64,
}

impl std::fmt::Debug for CeleryEventSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CeleryEventSubscription")
            .field("url", &self.url)
            .field("undecodable", &self.undecodable)
            .finish()
    }
}

impl CeleryEventSubscription {
    /// Subscribes to `channels` on the server `connector` names now.
    pub(crate) async fn subscribe(
        connector: &Arc<Connector>,
        channels: &[String],
        url: &str,
        timeout: Duration,
    ) -> Result<Self, RedisSourceError> {
        let timed_out = |_| RedisSourceError::Timeout {
            url: url.to_string(),
            after: timeout,
        };
        let redis_err = |e| RedisSourceError::from_redis(url, e);
        let client = tokio::time::timeout(timeout, connector.subscriber_client(0))
            .await
            .map_err(timed_out)?
            .map_err(redis_err)?;
        let mut pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
            .await
            .map_err(timed_out)?
            .map_err(redis_err)?;
        tokio::time::timeout(timeout, pubsub.subscribe(channels))
            .await
            .map_err(timed_out)?
            .map_err(redis_err)?;
        let (sink, stream) = pubsub.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        Ok(CeleryEventSubscription {
            sink,
            stream,
            ping,
            url: url.to_string(),
            timeout,
            undecodable: 0,
        })
    }

    /// The next message's event JSON; `None` when the server closed the subscription, an
    /// error when a ping found the connection dead. Messages whose envelope does not decode are
    /// skipped and counted ([`CeleryEventSubscription::undecodable`]).
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, RedisSourceError>> {
        loop {
            tokio::select! {
                msg = self.stream.next() => {
                    let msg = msg?;
                    match decode_kombu_envelope(msg.get_payload_bytes()) {
                        Ok(body) => return Some(Ok(body)),
                        Err(e) => {
                            self.undecodable = self.undecodable.saturating_add(1);
                            tracing::debug!(channel = msg.get_channel_name(), error = %e, "ignoring an undecodable event message");
                        }
                    }
                }
                _ = self.ping.tick() => {
                    let pinged = tokio::time::timeout(self.timeout, self.sink.ping::<redis::Value>()).await;
                    match pinged {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Some(Err(RedisSourceError::from_redis(&self.url, e))),
                        Err(_) => {
                            return Some(Err(RedisSourceError::Timeout {
                                url: self.url.clone(),
                                after: self.timeout,
                            }));
                        }
                    }
                }
            }
        }
    }

    /// Messages skipped so far because kombu's envelope around them did not decode.
    pub fn undecodable(&self) -> u64 {
        self.undecodable
    }
}
