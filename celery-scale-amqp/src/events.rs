//! A consumer of every message of Celery's event exchange (`celeryev`), for tools that read
//! task events (`celery-scale record`), not only the worker heartbeats the source reads.

use futures::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer, ExchangeKind};

use crate::error::AmqpSourceError;
use crate::heartbeats::EVENT_EXCHANGE;
use crate::source::Inner;

/// Messages older than this are dropped by the broker from the recorder's queue.
const EVENT_TTL_MS: i32 = 60_000;

/// A live consumer of Celery's event exchange on an exclusive, auto-delete queue of its own,
/// made by [`AmqpQueueSource::subscribe_celery_events`](crate::AmqpQueueSource::subscribe_celery_events).
/// [`next`](CeleryEventConsumer::next) gives each message's body: the event JSON (an object,
/// or a list for `task.multi`), untrusted. It ends (or fails) when the channel or the
/// connection does; subscribe again to go on.
pub struct CeleryEventConsumer {
    _channel: Channel,
    consumer: Consumer,
    url: String,
}

impl std::fmt::Debug for CeleryEventConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CeleryEventConsumer")
            .field("url", &self.url)
            .finish()
    }
}

impl CeleryEventConsumer {
    /// Binds a queue of its own to `celeryev` with `keys` and consumes it, on a channel of the
    /// source's connection.
    pub(crate) async fn start(inner: &Inner, keys: &[&str]) -> Result<Self, AmqpSourceError> {
        let (channel, consumer) = consume_event_exchange(
            inner,
            keys,
            EVENT_TTL_MS,
            ("celery events", "the celery-event consumer setup"),
        )
        .await?;
        Ok(CeleryEventConsumer {
            _channel: channel,
            consumer,
            url: inner.url().to_string(),
        })
    }

    /// The next message's body; `None` when the consumer was cancelled, an error when the
    /// channel or the connection failed.
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, AmqpSourceError>> {
        let delivery = self.consumer.next().await?;
        Some(
            delivery
                .map(|d| d.data)
                .map_err(|e| AmqpSourceError::from_operation(&self.url, "celery events".into(), e)),
        )
    }
}

/// Consumes Celery's event exchange `celeryev` with `keys`, on a channel of the source's
/// connection (so with its TLS settings) and an exclusive, auto-delete queue of its own whose
/// messages live `ttl_ms`; the whole set-up bounded by the connect timeout. `what` names the
/// consumer in errors: (operation, timeout operation).
pub(crate) async fn consume_event_exchange(
    inner: &Inner,
    keys: &[&str],
    ttl_ms: i32,
    (what, setup_what): (&str, &'static str),
) -> Result<(Channel, Consumer), AmqpSourceError> {
    let connect_timeout = inner.config().connect_timeout;
    let setup = async {
        let connection = inner.connection().await?;
        let op = |step: &str| {
            let step = format!("{step} ({what})");
            move |e| AmqpSourceError::from_operation(inner.url(), step, e)
        };
        let mut channel = connection
            .create_channel()
            .await
            .map_err(op("channel.open"))?;
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
                .map_err(op("channel.open"))?;
        }
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(ttl_ms));
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions::exclusive().auto_delete(),
                args,
            )
            .await
            .map_err(op("queue.declare"))?;
        for key in keys {
            channel
                .queue_bind(
                    queue.name().clone(),
                    EVENT_EXCHANGE.into(),
                    (*key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(op(&format!("queue.bind celeryev {key}")))?;
        }
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
            .map_err(op("basic.consume"))?;
        Ok::<_, AmqpSourceError>((channel, consumer))
    };
    tokio::time::timeout(connect_timeout, setup)
        .await
        .map_err(|_| AmqpSourceError::Timeout {
            url: inner.url().to_string(),
            operation: setup_what,
            after: connect_timeout,
        })?
}
