//! A live feed of worker events: the state and the reconnect loop every broker's heartbeat task
//! shares, so a backend writes only its transport (subscribe or consume, decode, hand over).

use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{WorkerEvent, WorkerRegistry, WorkerSummary, wildcard_match};
use crate::WorkersUnknown;

/// The first wait before a transport is set up again; it doubles after each failed attempt up
/// to [`MAX_BACKOFF`], and is back to this once a transport came up.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// The longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a [`WorkerFeed`] is started with.
#[derive(Debug, Clone)]
pub struct FeedSettings {
    /// The throughput window of the [`WorkerRegistry`].
    pub window: Duration,
    /// How long the transport must have been up before [`WorkerFeed::reading`] answers, so that
    /// every worker has been heard at least once: at least one full heartbeat period (Celery's
    /// default is 2 s) plus a margin.
    pub warmup: Duration,
    /// How long a worker that stopped beating without `worker-offline` counts as silent (its
    /// tasks possibly running, the figures unknown) before it is taken as gone: the time after
    /// which the broker gives a dead worker's held messages back (kombu's Redis
    /// `visibility_timeout`, 1 h by default; RabbitMQ's `consumer_timeout`, 30 min by default).
    /// See [`WorkerRegistry`].
    pub silent_limit: Duration,
    /// Patterns (`*` matches any run of characters, see [`wildcard_match`]) of the hostnames of
    /// the workers that count; empty: every worker counts.
    pub hostnames: Vec<String>,
    /// What the transport is, for logs, e.g. `"worker-event subscription"`.
    pub transport: &'static str,
    /// Where the transport connects, for logs (with any password already hidden).
    pub url: String,
}

#[derive(Debug)]
struct FeedState {
    registry: WorkerRegistry,
    /// When the current transport came up; `None` while it is down.
    up_since: Option<Instant>,
}

#[derive(Debug)]
struct FeedShared {
    state: Mutex<FeedState>,
    hostnames: Vec<String>,
}

impl FeedShared {
    fn lock(&self) -> MutexGuard<'_, FeedState> {
        // A panic while holding this lock cannot leave the registry half-updated in a way that
        // matters (it is rebuilt from the next beats), so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The side of a [`WorkerFeed`] its transport writes to: cheap to clone. A transport run uses
/// it only while it runs (the next run gets a fresh clone after [`FeedSink::up`] forgot the
/// workers heard before); a clone kept past that would feed stale events.
#[derive(Debug, Clone)]
pub struct FeedSink {
    shared: Arc<FeedShared>,
}

impl FeedSink {
    /// Marks the transport as up from now and starts the warm-up. The workers heard before are
    /// kept: one that beats again within the warm-up is current, and one that does not is
    /// silent (its tasks may still run), never forgotten as if it had gone offline.
    pub fn up(&self) {
        self.shared.lock().up_since = Some(Instant::now());
    }

    /// Whether events from `hostname` count (it matches one of the configured patterns, or
    /// there are none).
    pub fn counts(&self, hostname: &str) -> bool {
        self.shared.hostnames.is_empty()
            || self
                .shared
                .hostnames
                .iter()
                .any(|p| wildcard_match(p, hostname))
    }

    /// Records an event received at `now`, unless its worker is filtered out by hostname.
    pub fn apply(&self, event: &WorkerEvent, now: Instant) {
        if self.counts(&event.hostname) {
            self.shared.lock().registry.apply(event, now);
        }
    }

    /// Marks the transport as down; returns whether it was up.
    fn down(&self) -> bool {
        self.shared.lock().up_since.take().is_some()
    }
}

/// A background task that keeps a broker's worker-event transport running (set up again with
/// backoff whenever it ends or fails) and the live workers it heard. Dropping it stops the task.
#[derive(Debug)]
pub struct WorkerFeed {
    sink: FeedSink,
    warmup: Duration,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl WorkerFeed {
    /// Starts the feed on `runtime`. `transport` runs the transport once: it sets it up, calls
    /// [`FeedSink::up`] once it is, then hands every decoded event to [`FeedSink::apply`] until
    /// the transport ends (`Ok`) or fails (`Err`). It is called again after a backoff of 200 ms,
    /// doubling up to 5 s, back to 200 ms once a transport came up. Each run is a task of its
    /// own: one that panics counts as failed (the feed is down, then set up again), never as
    /// still up.
    pub fn start<T, F, E>(
        settings: FeedSettings,
        runtime: &tokio::runtime::Handle,
        transport: T,
    ) -> WorkerFeed
    where
        T: FnMut(FeedSink) -> F + Send + 'static,
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let sink = FeedSink {
            shared: Arc::new(FeedShared {
                state: Mutex::new(FeedState {
                    registry: WorkerRegistry::new(settings.window)
                        .with_silent_limit(settings.silent_limit),
                    up_since: None,
                }),
                hostnames: settings.hostnames.clone(),
            }),
        };
        let warmup = settings.warmup;
        let cancel = CancellationToken::new();
        let task = runtime.spawn(run(settings, sink.clone(), cancel.clone(), transport));
        WorkerFeed {
            sink,
            warmup,
            cancel,
            task: Some(task),
        }
    }

    /// The live workers' figures when they are known: the transport is up, warmed up, and
    /// every worker heard is beating. Otherwise why not, with the executing tasks last heard as
    /// a floor (see [`WorkersUnknown`]).
    pub fn reading(&self, now: Instant) -> Result<WorkerSummary, WorkersUnknown> {
        let mut state = self.sink.shared.lock();
        let why = match state.up_since {
            None => "the worker-event feed is down".to_string(),
            Some(since) if now.saturating_duration_since(since) < self.warmup => {
                let up_for = now.saturating_duration_since(since);
                format!(
                    "the worker-event feed is warming up ({} of {})",
                    humantime::format_duration(Duration::from_millis(
                        u64::try_from(up_for.as_millis()).unwrap_or(u64::MAX)
                    )),
                    humantime::format_duration(self.warmup)
                )
            }
            Some(_) => return state.registry.reading(now),
        };
        // Not ready to answer: the tasks heard so far still count as a floor.
        let executing_at_least = state
            .registry
            .reading(now)
            .map_or_else(|u| u.executing_at_least, |s| s.executing);
        Err(WorkersUnknown {
            why,
            executing_at_least,
        })
    }

    /// The live workers' figures, or `None` whenever [`WorkerFeed::reading`] says they are
    /// unknown.
    pub fn summary(&self, now: Instant) -> Option<WorkerSummary> {
        self.reading(now).ok()
    }

    /// Whether the feed is up and past its warm-up at `now` (its figures may still be unknown
    /// while a worker is silent).
    pub fn is_warm(&self, now: Instant) -> bool {
        self.sink
            .shared
            .lock()
            .up_since
            .is_some_and(|since| now.saturating_duration_since(since) >= self.warmup)
    }

    /// Whether the transport is up now.
    pub fn is_up(&self) -> bool {
        self.sink.shared.lock().up_since.is_some()
    }

    /// Stops the task without waiting for it (for a source closed through a shared reference).
    pub fn stop(&self) {
        self.sink.down();
        self.cancel.cancel();
        if let Some(task) = &self.task {
            task.abort();
        }
    }

    /// Stops the task and waits for it to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for WorkerFeed {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Aborts the task when dropped (the feed's own task was aborted or returned).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run<T, F, E>(
    settings: FeedSettings,
    sink: FeedSink,
    cancel: CancellationToken,
    mut transport: T,
) where
    T: FnMut(FeedSink) -> F,
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    let FeedSettings {
        transport: what,
        url,
        ..
    } = settings;
    let mut backoff = MIN_BACKOFF;
    loop {
        let mut attempt = AbortOnDrop(tokio::spawn(transport(sink.clone())));
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            outcome = &mut attempt.0 => outcome,
        };
        if sink.down() {
            backoff = MIN_BACKOFF;
        }
        match outcome {
            Ok(Ok(())) => tracing::warn!(url = %url, "{what} ended; setting it up again"),
            Ok(Err(e)) => {
                tracing::warn!(url = %url, error = %e, "{what} failed; retrying in {backoff:?}")
            }
            Err(e) => {
                tracing::error!(url = %url, error = %e, "{what} panicked; retrying in {backoff:?}")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::super::WorkerEventKind;
    use super::*;

    fn beat(host: &str) -> WorkerEvent {
        WorkerEvent {
            kind: WorkerEventKind::Heartbeat,
            hostname: host.into(),
            active: 1,
            processed: 0,
            freq: 2.0,
            timestamp: 0.0,
        }
    }

    fn settings(warmup: Duration, hostnames: &[&str]) -> FeedSettings {
        FeedSettings {
            window: Duration::from_secs(60),
            warmup,
            hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
            silent_limit: Duration::from_secs(3600),
            transport: "test transport",
            url: "test://".into(),
        }
    }

    #[tokio::test]
    async fn filters_hostnames_and_waits_for_the_warmup() {
        let feed = WorkerFeed::start(
            settings(Duration::from_secs(1), &["emails@*"]),
            &tokio::runtime::Handle::current(),
            |sink: FeedSink| async move {
                sink.up();
                sink.apply(&beat("emails@a"), Instant::now());
                sink.apply(&beat("celery@a"), Instant::now());
                std::future::pending::<Result<(), String>>().await
            },
        );
        while !feed.is_up() {
            tokio::task::yield_now().await;
        }
        assert_eq!(feed.summary(Instant::now()), None, "within the warm-up");
        assert!(!feed.is_warm(Instant::now()));
        let unknown = feed.reading(Instant::now()).unwrap_err();
        assert!(unknown.why.contains("warming up"), "{}", unknown.why);
        let later = Instant::now() + Duration::from_secs(1);
        let summary = feed.summary(later);
        assert_eq!(
            summary.map(|s| s.live_workers),
            Some(1),
            "celery@a is filtered out"
        );
        feed.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_workers_across_a_reconnect_and_retries() {
        let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = Arc::clone(&attempts);
        let feed = WorkerFeed::start(
            settings(Duration::ZERO, &[]),
            &tokio::runtime::Handle::current(),
            move |sink: FeedSink| {
                let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if n == 0 {
                        sink.up();
                        sink.apply(&beat("celery@a"), Instant::now());
                        return Err("lost");
                    }
                    sink.up();
                    std::future::pending().await
                }
            },
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(feed.is_up());
        assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 2);
        let summary = feed.summary(Instant::now()).unwrap();
        assert_eq!(summary.live_workers, 1, "heard before the reconnect");
        // It never beats again (its beats may have been lost with the transport): silent, so
        // the figures are unknown, never 0.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let unknown = feed.reading(Instant::now()).unwrap_err();
        assert_eq!(unknown.executing_at_least, 1, "{unknown:?}");
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_transport_that_panics_is_down_then_set_up_again() {
        let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = Arc::clone(&attempts);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
        let feed = WorkerFeed::start(
            settings(Duration::ZERO, &[]),
            &tokio::runtime::Handle::current(),
            move |sink: FeedSink| {
                let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let tx = tx.clone();
                async move {
                    sink.up();
                    sink.apply(&beat("celery@a"), Instant::now());
                    if n == 0 {
                        // Up, with a worker heard: the panic must not leave it looking so.
                        let _ = tx.send(true);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        panic!("a bug in a transport");
                    }
                    std::future::pending::<Result<(), String>>().await
                }
            },
        );
        assert_eq!(rx.recv().await, Some(true));
        // Between the panic and the retry (200 ms later) the feed is down: no figures, but the
        // task heard before still counts as a floor.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!feed.is_up(), "down after the panic");
        assert_eq!(feed.summary(Instant::now()), None);
        let unknown = feed.reading(Instant::now()).unwrap_err();
        assert_eq!(unknown.executing_at_least, 1);
        assert!(unknown.why.contains("down"), "{}", unknown.why);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(feed.is_up(), "set up again");
        assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 2);
        feed.shutdown().await;
    }
}
