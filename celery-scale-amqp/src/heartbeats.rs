//! The AMQP transport of the worker-event feed: a consumer of Celery's worker events on the
//! `celeryev` topic exchange, kept alive by [`WorkerFeed`].

use std::sync::Arc;

use celery_scale_core::celery_events::{FeedSettings, FeedSink, WorkerEvent, WorkerFeed};
use futures::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
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
    let connect_timeout = inner.config().connect_timeout;
    let setup = async {
        let connection = inner.connection().await?;
        let op = |what: &str| {
            let what = what.to_string();
            move |e| AmqpSourceError::from_operation(inner.url(), what, e)
        };
        let mut channel = connection
            .create_channel()
            .await
            .map_err(op("channel.open (worker events)"))?;
        // Declare Celery's event exchange as Celery does, so the consumer can start before the
        // first worker does. If someone declared it otherwise (406) or the user may not
        // configure it (403), bind to it as it is.
        if let Err(e) = channel
            .exchange_declare(
                EVENT_EXCHANGE.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
        {
            tracing::debug!(error = %e, "cannot declare the celeryev exchange; binding to it as it is");
            channel = connection
                .create_channel()
                .await
                .map_err(op("channel.open (worker events)"))?;
        }
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(EVENT_TTL_MS));
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions::exclusive().auto_delete(),
                args,
            )
            .await
            .map_err(op("queue.declare (worker events)"))?;
        channel
            .queue_bind(
                queue.name().clone(),
                EVENT_EXCHANGE.into(),
                WORKER_EVENTS.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(op("queue.bind celeryev worker.#"))?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(op("basic.consume (worker events)"))?;
        Ok::<_, AmqpSourceError>((channel, consumer))
    };
    let (channel, mut consumer) = tokio::time::timeout(connect_timeout, setup)
        .await
        .map_err(|_| AmqpSourceError::Timeout {
            url: inner.url().to_string(),
            operation: "the worker-event consumer setup",
            after: connect_timeout,
        })??;
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
