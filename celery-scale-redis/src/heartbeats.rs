//! The Redis transport of the worker-event feed: a PUB/SUB subscription to Celery's worker
//! events, kept alive by [`WorkerFeed`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use celery_scale_core::celery_events::{FeedSettings, FeedSink, WorkerEvent, WorkerFeed};
use futures::StreamExt as _;
use tokio::time::Instant;

use crate::connect::Connector;
use crate::error::RedisSourceError;

/// How often the subscriber pings the server to notice a dead connection.
const PING_EVERY: Duration = Duration::from_secs(5);

/// Where and how to subscribe.
pub(crate) struct SubscriberSettings {
    /// Where to connect: each attempt asks it for a client (the next URL of a failover list,
    /// the master Sentinel names now).
    pub connector: Arc<Connector>,
    pub channels: Vec<String>,
    pub url: String,
    pub connect_timeout: Duration,
    pub window: Duration,
    pub warmup: Duration,
    pub hostnames: Vec<String>,
    /// kombu's `visibility_timeout`: how long a silent worker's held messages stay away.
    pub silent_limit: Duration,
}

/// Starts the worker-event subscriber on `runtime`; it stops when the feed is dropped.
pub(crate) fn start(settings: SubscriberSettings, runtime: &tokio::runtime::Handle) -> WorkerFeed {
    let SubscriberSettings {
        connector,
        channels,
        url,
        connect_timeout,
        window,
        warmup,
        hostnames,
        silent_limit,
    } = settings;
    let feed = FeedSettings {
        window,
        warmup,
        hostnames,
        // kombu's Redis transport gives a dead worker's held messages back after
        // visibility_timeout (1 h by default).
        silent_limit,
        transport: "worker-event subscription",
        url: url.clone(),
    };
    let attempts = Arc::new(AtomicUsize::new(0));
    WorkerFeed::start(feed, runtime, move |sink| {
        let (connector, channels, url) = (Arc::clone(&connector), channels.clone(), url.clone());
        let attempt = attempts.fetch_add(1, Ordering::Relaxed);
        async move {
            let timeout = |_| RedisSourceError::Timeout {
                url: url.clone(),
                after: connect_timeout,
            };
            let client =
                tokio::time::timeout(connect_timeout, connector.subscriber_client(attempt))
                    .await
                    .map_err(timeout)?
                    .map_err(|e| RedisSourceError::from_redis(&url, e))?;
            subscribe_and_listen(&client, &channels, &url, connect_timeout, &sink).await
        }
    })
}

async fn subscribe_and_listen(
    client: &redis::Client,
    channels: &[String],
    url: &str,
    connect_timeout: Duration,
    sink: &FeedSink,
) -> Result<(), RedisSourceError> {
    let timeout = |_| RedisSourceError::Timeout {
        url: url.to_string(),
        after: connect_timeout,
    };
    let redis_err = |e| RedisSourceError::from_redis(url, e);
    let mut pubsub = tokio::time::timeout(connect_timeout, client.get_async_pubsub())
        .await
        .map_err(timeout)?
        .map_err(redis_err)?;
    tokio::time::timeout(connect_timeout, pubsub.subscribe(channels))
        .await
        .map_err(timeout)?
        .map_err(redis_err)?;
    sink.up();
    tracing::debug!(url = %url, "subscribed to worker events");
    let (mut ping_sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return Ok(()) };
                match WorkerEvent::from_kombu_envelope(msg.get_payload_bytes()) {
                    Ok(event) => sink.apply(&event, Instant::now()),
                    Err(e) => tracing::debug!(channel = msg.get_channel_name(), error = %e, "ignoring an undecodable worker event"),
                }
            }
            _ = ping.tick() => {
                tokio::time::timeout(connect_timeout, ping_sink.ping::<redis::Value>())
                    .await
                    .map_err(timeout)?
                    .map_err(redis_err)?;
            }
        }
    }
}
