//! A background consumer of Celery's worker events on the `celeryev` topic exchange.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_scale_core::CancellationToken;
use celery_scale_core::celery_events::{WorkerEvent, WorkerRegistry, WorkerSummary};
use futures::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::wildcard_match;
use crate::error::AmqpSourceError;
use crate::source::Inner;

/// Celery's event exchange (`event_exchange`), a durable topic exchange.
pub(crate) const EVENT_EXCHANGE: &str = "celeryev";
/// The routing keys of worker events: `worker.heartbeat`, `worker.online`, `worker.offline`.
const WORKER_EVENTS: &str = "worker.#";
/// Messages older than this are dropped by the broker from our event queue (a heartbeat is
/// stale after 3 beats, 6 s by default).
const EVENT_TTL_MS: i32 = 10_000;
/// Backoff between attempts to set the consumer up again.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct State {
    registry: WorkerRegistry,
    /// When the current consumer started; `None` while it is down.
    consuming_since: Option<Instant>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    hostnames: Vec<String>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The registry is rebuilt from the next beats; a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn counts(&self, hostname: &str) -> bool {
        self.hostnames.is_empty() || self.hostnames.iter().any(|p| wildcard_match(p, hostname))
    }
}

/// The worker-event consumer: a Tokio task that stops when this is dropped.
#[derive(Debug)]
pub(crate) struct Heartbeats {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    warmup: Duration,
}

impl Heartbeats {
    /// Starts the consumer on `runtime`; it shares `inner`'s connection.
    pub fn start(inner: Arc<Inner>, runtime: &tokio::runtime::Handle) -> Heartbeats {
        let config = inner.config();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                registry: WorkerRegistry::new(config.heartbeat_window),
                consuming_since: None,
            }),
            hostnames: config.worker_hostnames.clone(),
        });
        let warmup = config.heartbeat_warmup;
        let cancel = CancellationToken::new();
        let task = runtime.spawn(run(inner, Arc::clone(&shared), cancel.clone()));
        Heartbeats {
            shared,
            cancel,
            task: Some(task),
            warmup,
        }
    }

    /// The live workers' figures, or `None` while the consumer is down or too recent to have
    /// heard every worker.
    pub fn summary(&self, now: Instant) -> Option<WorkerSummary> {
        let mut state = self.shared.lock();
        let since = state.consuming_since?;
        if now.saturating_duration_since(since) < self.warmup {
            return None;
        }
        Some(state.registry.summary(now))
    }

    /// Whether the consumer is up now.
    pub fn is_consuming(&self) -> bool {
        self.shared.lock().consuming_since.is_some()
    }

    /// Stops the task and waits for it to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn run(inner: Arc<Inner>, shared: Arc<Shared>, cancel: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            outcome = consume(&inner, &shared, &mut backoff) => outcome,
        };
        {
            let mut state = shared.lock();
            if state.consuming_since.take().is_some() {
                // Beats were missed while down: start again from what arrives next.
                state.registry.clear();
            }
        }
        match outcome {
            Ok(()) => tracing::warn!(
                url = %inner.url(),
                "worker-event consumer ended (connection lost); setting it up again"
            ),
            Err(e) => tracing::warn!(
                url = %inner.url(),
                error = %e,
                "worker-event consumer failed; retrying in {backoff:?}"
            ),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Sets up the event queue on a channel of the shared connection (so with the source's TLS
/// settings) and consumes until the connection or the channel goes away.
async fn consume(
    inner: &Inner,
    shared: &Shared,
    backoff: &mut Duration,
) -> Result<(), AmqpSourceError> {
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
    {
        let mut state = shared.lock();
        state.registry.clear();
        state.consuming_since = Some(Instant::now());
    }
    *backoff = MIN_BACKOFF;
    tracing::debug!(url = %inner.url(), "consuming worker events");
    let _channel: Channel = channel;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery
            .map_err(|e| AmqpSourceError::from_operation(inner.url(), "worker events".into(), e))?;
        match WorkerEvent::from_json(&delivery.data) {
            Ok(event) if shared.counts(&event.hostname) => {
                shared.lock().registry.apply(&event, Instant::now());
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(
                routing_key = %delivery.routing_key,
                error = %e,
                "ignoring an undecodable worker event"
            ),
        }
    }
    Ok(())
}
