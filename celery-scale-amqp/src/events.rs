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
                .map_err(op("channel.open (celery events)"))?;
            // Declared as Celery declares it, so that the consumer can start before the first
            // worker; bound to as it is when declared otherwise (406) or not ours to declare.
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
                    .map_err(op("channel.open (celery events)"))?;
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
                .map_err(op("queue.declare (celery events)"))?;
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
                    .map_err(op("queue.bind celeryev"))?;
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
                .map_err(op("basic.consume (celery events)"))?;
            Ok::<_, AmqpSourceError>((channel, consumer))
        };
        let (channel, consumer) = tokio::time::timeout(connect_timeout, setup)
            .await
            .map_err(|_| AmqpSourceError::Timeout {
                url: inner.url().to_string(),
                operation: "the celery-event consumer setup",
                after: connect_timeout,
            })??;
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
