//! The AMQP transport of the worker-event feed: a consumer of Celery's worker events on the
//! `celeryev` topic exchange, kept alive by [`WorkerFeed`].

use std::sync::Arc;

use celery_scale_core::celery_events::{FeedSettings, FeedSink, WorkerEvent, WorkerFeed};
use futures::StreamExt as _;
use lapin::Channel;
use tokio::time::Instant;

use crate::error::AmqpSourceError;
use crate::source::Inner;

/// Celery's event exchange (`event_exchange`), a durable topic exchange.
pub(crate) const EVENT_EXCHANGE: &str = "celeryev";
/// The routing keys of worker events: `worker.heartbeat`, `worker.online`, `worker.offline`.
const WORKER_EVENTS: &str = "worker.#";
/// Messages older than this are dropped by the broker from our event queue (a heartbeat is
/// stale after 3 beats, 6 s by default).
const EVENT_TTL_MS: i32 = 10_000;

/// Starts the worker-event consumer on `runtime`; it shares `inner`'s connection and stops when
/// the feed is dropped.
pub(crate) fn start(inner: Arc<Inner>, runtime: &tokio::runtime::Handle) -> WorkerFeed {
    let config = inner.config();
    let settings = FeedSettings {
        window: config.heartbeat_window,
        warmup: config.heartbeat_warmup,
        hostnames: config.worker_hostnames.clone(),
        // RabbitMQ gives a silent consumer's unacknowledged messages back after its
        // consumer_timeout (30 min by default).
        silent_limit: std::time::Duration::from_secs(30 * 60),
        transport: "worker-event consumer",
        url: inner.url().to_string(),
    };
    WorkerFeed::start(settings, runtime, move |sink| {
        let inner = Arc::clone(&inner);
        async move { consume(&inner, &sink).await }
    })
}

/// Sets up the event queue on a channel of the shared connection (so with the source's TLS
/// settings) and consumes until the connection or the channel goes away.
async fn consume(inner: &Inner, sink: &FeedSink) -> Result<(), AmqpSourceError> {
    let (channel, mut consumer) = crate::events::consume_event_exchange(
        inner,
        &[WORKER_EVENTS],
        EVENT_TTL_MS,
        ("worker events", "the worker-event consumer setup"),
    )
    .await?;
    sink.up();
    tracing::debug!(url = %inner.url(), "consuming worker events");
    let _channel: Channel = channel;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery
            .map_err(|e| AmqpSourceError::from_operation(inner.url(), "worker events".into(), e))?;
        match WorkerEvent::from_json(&delivery.data) {
            Ok(event) => sink.apply(&event, Instant::now()),
            Err(e) => tracing::debug!(
                routing_key = %delivery.routing_key,
                error = %e,
                "ignoring an undecodable worker event"
            ),
        }
    }
    Ok(())
}
