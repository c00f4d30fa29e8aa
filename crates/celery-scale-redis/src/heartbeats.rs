//! A background subscriber to Celery's worker events on Redis PUB/SUB.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_scale_core::CancellationToken;
use celery_scale_core::celery_events::{WorkerEvent, WorkerRegistry, WorkerSummary};
use futures::StreamExt as _;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::RedisSourceError;
use crate::layout::wildcard_match;

/// How often the subscriber pings the server to notice a dead connection.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Backoff between reconnection attempts.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct State {
    registry: WorkerRegistry,
    /// When the current subscription was confirmed; `None` while disconnected.
    subscribed_since: Option<Instant>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    hostnames: Vec<String>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the registry half-updated in a way that
        // matters (it is rebuilt from the next beats), so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn counts(&self, hostname: &str) -> bool {
        self.hostnames.is_empty() || self.hostnames.iter().any(|p| wildcard_match(p, hostname))
    }
}

/// The worker-event subscriber: a Tokio task that stops when this is dropped.
#[derive(Debug)]
pub(crate) struct Heartbeats {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    warmup: Duration,
}

pub(crate) struct SubscriberSettings {
    pub client: redis::Client,
    pub channels: [String; 3],
    pub url: String,
    pub connect_timeout: Duration,
    pub window: Duration,
    pub warmup: Duration,
    pub hostnames: Vec<String>,
}

impl Heartbeats {
    /// Starts the subscriber on the current Tokio runtime.
    pub fn start(settings: SubscriberSettings, runtime: &tokio::runtime::Handle) -> Heartbeats {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                registry: WorkerRegistry::new(settings.window),
                subscribed_since: None,
            }),
            hostnames: settings.hostnames.clone(),
        });
        let warmup = settings.warmup;
        let cancel = CancellationToken::new();
        let task = runtime.spawn(run(settings, Arc::clone(&shared), cancel.clone()));
        Heartbeats {
            shared,
            cancel,
            task: Some(task),
            warmup,
        }
    }

    /// The live workers' figures, or `None` while the subscription is down or too recent to
    /// have heard every worker.
    pub fn summary(&self, now: Instant) -> Option<WorkerSummary> {
        let mut state = self.shared.lock();
        let since = state.subscribed_since?;
        if now.saturating_duration_since(since) < self.warmup {
            return None;
        }
        Some(state.registry.summary(now))
    }

    /// Whether the subscription is up now.
    pub fn is_subscribed(&self) -> bool {
        self.shared.lock().subscribed_since.is_some()
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

async fn run(settings: SubscriberSettings, shared: Arc<Shared>, cancel: CancellationToken) {
    let SubscriberSettings {
        client,
        channels,
        url,
        connect_timeout,
        ..
    } = settings;
    let mut backoff = MIN_BACKOFF;
    loop {
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            outcome = subscribe_and_listen(&client, &channels, &url, connect_timeout, &shared, &mut backoff) => outcome,
        };
        {
            let mut state = shared.lock();
            if state.subscribed_since.take().is_some() {
                // Beats were missed while disconnected: start again from what arrives next.
                state.registry.clear();
            }
        }
        match outcome {
            Ok(()) => tracing::warn!(url = %url, "worker-event subscription ended; resubscribing"),
            Err(e) => {
                tracing::warn!(url = %url, error = %e, "worker-event subscription failed; retrying in {backoff:?}")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn subscribe_and_listen(
    client: &redis::Client,
    channels: &[String; 3],
    url: &str,
    connect_timeout: Duration,
    shared: &Shared,
    backoff: &mut Duration,
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
    tokio::time::timeout(connect_timeout, pubsub.subscribe(channels.as_slice()))
        .await
        .map_err(timeout)?
        .map_err(redis_err)?;
    {
        let mut state = shared.lock();
        state.registry.clear();
        state.subscribed_since = Some(Instant::now());
    }
    *backoff = MIN_BACKOFF;
    tracing::debug!(url = %url, "subscribed to worker events");
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return Ok(()) };
                match WorkerEvent::from_kombu_envelope(msg.get_payload_bytes()) {
                    Ok(event) if shared.counts(&event.hostname) => {
                        shared.lock().registry.apply(&event, Instant::now());
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(channel = msg.get_channel_name(), error = %e, "ignoring an undecodable worker event"),
                }
            }
            _ = ping.tick() => {
                tokio::time::timeout(connect_timeout, sink.ping::<redis::Value>())
                    .await
                    .map_err(timeout)?
                    .map_err(redis_err)?;
            }
        }
    }
}
