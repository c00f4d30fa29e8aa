//! `celery-scale record`: writes a trace in celery-scale's CSV format from a live broker, to
//! tune a configuration on one's own traffic with `celery-scale simulate --trace`.
//!
//! It reads one binding's source (Redis, RabbitMQ or SQS) and Celery's event exchange, and
//! nothing else: no scaler is built, no capacity is read or set. With task events (workers run
//! with `-E`) arrivals and durations are measured; without them they are estimated from
//! successive observations. The pure part is `celery_scale_sim::record`; this file is the I/O.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use celery_scale_amqp::AmqpQueueSource;
use celery_scale_core::QueueSource;
use celery_scale_redis::RedisQueueSource;
use celery_scale_sim::record::{
    CeleryEvent, EventsMode, Recorder, RecorderSettings, decode_celery_events, is_trace_queue_name,
};
use celery_scale_sqs::SqsQueueSource;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Failure;
use crate::config::{DaemonConfig, SourceConfig};

/// Which measurement `--events` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EventsArg {
    /// Task events when workers send any during the recording, otherwise observations.
    Auto,
    /// Task events only (workers must run with `-E`).
    On,
    /// Observations only (an estimate).
    Off,
}

impl From<EventsArg> for EventsMode {
    fn from(a: EventsArg) -> Self {
        match a {
            EventsArg::Auto => EventsMode::Auto,
            EventsArg::On => EventsMode::On,
            EventsArg::Off => EventsMode::Off,
        }
    }
}

/// What to record besides the configuration.
#[derive(Debug, Clone)]
pub struct RecordArgs<'a> {
    /// Only this binding (required when the file has several).
    pub binding: Option<&'a str>,
    /// How long to record (SIGINT/SIGTERM ends it sooner, keeping what was recorded).
    pub duration: Duration,
    /// The trace file to write.
    pub out: &'a Path,
    /// Task events, observations, or whichever is there.
    pub events: EventsArg,
    /// How often the backlog is read.
    pub every: Duration,
    /// The duration of every task when nothing measured one (observations mode).
    pub default_duration: Duration,
    /// The most tasks in progress tracked at once.
    pub max_tracked: usize,
}

/// The shortest `--every` accepted.
const MIN_EVERY: Duration = Duration::from_millis(100);

/// Wait between attempts to subscribe to the event exchange again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// Messages waiting between the event subscription and the recorder.
const CHANNEL_DEPTH: usize = 10_000;

/// The binding's source, built for reading only.
enum Live {
    Redis(Box<RedisQueueSource>),
    Amqp(AmqpQueueSource),
    Sqs(SqsQueueSource),
}

impl Live {
    fn source(&self) -> &dyn QueueSource {
        match self {
            Live::Redis(s) => s.as_ref(),
            Live::Amqp(s) => s,
            Live::Sqs(s) => s,
        }
    }
}

/// What the event task tells the recorder.
enum Feed {
    /// Subscribed.
    Up,
    /// One message's body, received at that instant.
    Body(Instant, Vec<u8>),
    /// The subscription failed or ended (the reason, with any password already hidden).
    Down(String),
}

/// Records the binding's traffic and writes the trace.
pub async fn record(path: &Path, args: RecordArgs<'_>) -> Result<(), Failure> {
    let config = DaemonConfig::load(path).map_err(Failure::Setup)?;
    let binding = match args.binding {
        Some(name) => config
            .bindings
            .iter()
            .find(|b| b.settings.name == name)
            .ok_or_else(|| Failure::Setup(format!("no binding named {name:?}")))?,
        None => match config.bindings.as_slice() {
            [one] => one,
            many => {
                return Err(Failure::Setup(format!(
                    "the configuration has {} bindings: name one with --binding ({})",
                    many.len(),
                    many.iter()
                        .map(|b| format!("{:?}", b.settings.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        },
    };
    if args.duration.is_zero() {
        return Err(Failure::Setup("--duration must be above 0".into()));
    }
    if args.every < MIN_EVERY {
        return Err(Failure::Setup(format!(
            "--every must be at least {}",
            humantime::format_duration(MIN_EVERY)
        )));
    }
    let name = binding.settings.name.clone();
    let (queues, hostnames) = match &binding.source {
        SourceConfig::Redis(c) => (c.queues.clone(), c.worker_hostnames.clone()),
        SourceConfig::Amqp(c) => (c.queues.clone(), c.worker_hostnames.clone()),
        SourceConfig::Sqs(c) => (c.queues.clone(), Vec::new()),
    };
    if let Some(bad) = queues.iter().find(|q| !is_trace_queue_name(q)) {
        return Err(Failure::Setup(format!(
            "binding {name:?}: queue {bad:?} cannot be written in a trace (a comma, a line break, a leading '#' or blanks around it)"
        )));
    }
    let mode: EventsMode = args.events.into();
    let sqs = matches!(binding.source, SourceConfig::Sqs(_));
    if sqs && mode == EventsMode::On {
        return Err(Failure::Setup(
            "SQS carries no Celery events (kombu's SQS transport has no fanout exchange): use --events off or auto".into(),
        ));
    }
    let live = match &binding.source {
        // The source's own heartbeat subscription is not needed: the recorder subscribes to
        // the whole event exchange itself.
        SourceConfig::Redis(c) => Live::Redis(Box::new(
            RedisQueueSource::new(celery_scale_redis::RedisSourceConfig {
                heartbeats: false,
                ..c.clone()
            })
            .map_err(|e| Failure::Setup(format!("binding {name:?} (source): {e}")))?,
        )),
        SourceConfig::Amqp(c) => Live::Amqp(
            AmqpQueueSource::new(celery_scale_amqp::AmqpSourceConfig {
                heartbeats: false,
                ..c.clone()
            })
            .map_err(|e| Failure::Setup(format!("binding {name:?} (source): {e}")))?,
        ),
        SourceConfig::Sqs(c) => {
            let sdk = config
                .aws
                .sdk_config()
                .await
                .map_err(|e| Failure::Setup(format!("aws: {e}")))?;
            Live::Sqs(
                SqsQueueSource::from_sdk_config(&sdk, config.aws.clone(), c.clone())
                    .map_err(|e| Failure::Setup(format!("binding {name:?} (source): {e}")))?,
            )
        }
    };
    let settings = RecorderSettings {
        default_queue: queues.first().cloned().unwrap_or_else(|| "celery".into()),
        queues,
        hostnames,
        default_duration: args.default_duration,
        max_tracked: args.max_tracked.max(1),
        ..RecorderSettings::default()
    };
    let live = Arc::new(live);
    let outcome = run(&live, &name, binding.source.kind(), settings, mode, &args).await;
    live.source().close().await;
    outcome
}

async fn run(
    live: &Arc<Live>,
    name: &str,
    kind: &str,
    settings: RecorderSettings,
    mode: EventsMode,
    args: &RecordArgs<'_>,
) -> Result<(), Failure> {
    let (tx, mut rx) = mpsc::channel(CHANNEL_DEPTH);
    let task_events = mode != EventsMode::Off;
    let feed = match live.as_ref() {
        Live::Sqs(_) => None,
        _ => Some(tokio::spawn(event_feed(Arc::clone(live), task_events, tx))),
    };
    let timeout = live.connect_timeout();
    let mut gaps: Vec<String> = Vec::new();
    let mut subscribed = feed.is_none();
    // Start the clock once the event subscription is up, so that no receipt is missed.
    if feed.is_some() {
        let waited = tokio::time::timeout(timeout, async {
            loop {
                match rx.recv().await {
                    Some(Feed::Up) => return true,
                    Some(Feed::Down(why)) => {
                        tracing::warn!(binding = %name, error = %why, "cannot subscribe to Celery's events yet; retrying");
                    }
                    Some(Feed::Body(..)) => {}
                    None => return false,
                }
            }
        })
        .await;
        subscribed = matches!(waited, Ok(true));
        if !subscribed {
            tracing::warn!(binding = %name, "not subscribed to Celery's events after {}; recording goes on, events come once subscribed", humantime::format_duration(timeout));
            gaps.push("the event subscription was not up when the recording began".into());
        }
    }
    let started_wall = SystemTime::now();
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut recorder = Recorder::new(settings);
    let mut tick = tokio::time::interval(args.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut observed, mut failed) = (0u64, 0u64);
    let mut down_since: Option<Duration> = (!subscribed).then_some(Duration::ZERO);
    let signal = crate::shutdown_signal();
    tokio::pin!(signal);
    tracing::info!(binding = %name, source = kind, duration = %humantime::format_duration(args.duration), "recording");
    let ended = loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break "the duration was reached",
            _ = &mut signal => break "interrupted (SIGINT/SIGTERM)",
            _ = tick.tick() => {
                let result = live.source().observe().await;
                // The reading is as of its answer (the first one also connects).
                let at = Instant::now().saturating_duration_since(start);
                match result {
                    Ok(o) => {
                        observed += 1;
                        tracing::debug!(at_s = at.as_secs_f64(), ready = o.ready, in_flight = ?o.in_flight, task_events = recorder.stats().task_events, "observed");
                        recorder.observe(at, o.ready, o.in_flight.map(|f| f.saturating_add(o.ready)));
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(binding = %name, error = %e, "observation failed; this interval has no backlog reading");
                    }
                }
            }
            msg = rx.recv() => match msg {
                Some(Feed::Body(when, body)) => {
                    let at = when.saturating_duration_since(start);
                    let mut events: Vec<CeleryEvent> = Vec::new();
                    for e in decode_celery_events(&body) {
                        match e {
                            Ok(e) => events.push(e),
                            Err(e) => {
                                tracing::debug!(error = %e, "ignoring an undecodable Celery event");
                                recorder.undecodable();
                            }
                        }
                    }
                    recorder.apply(at, &events);
                }
                Some(Feed::Up) => {
                    if let Some(since) = down_since.take() {
                        let now = Instant::now().saturating_duration_since(start);
                        gaps.push(format!(
                            "event subscription down from {:.1} s to {:.1} s: events of that time are missing",
                            since.as_secs_f64(),
                            now.as_secs_f64()
                        ));
                    }
                }
                Some(Feed::Down(why)) => {
                    tracing::warn!(binding = %name, error = %why, "the event subscription ended; subscribing again");
                    down_since.get_or_insert(Instant::now().saturating_duration_since(start));
                }
                None => {}
            },
        }
    };
    let end = Instant::now().saturating_duration_since(start);
    if let Some(feed) = feed {
        feed.abort();
    }
    if let Some(since) = down_since {
        gaps.push(format!(
            "event subscription down from {:.1} s to the end",
            since.as_secs_f64()
        ));
    }
    let heard_events = recorder.heard_task_events();
    let recording = recorder.finish(end, mode);
    let mut preamble = vec![
        format!(
            "celery-scale record: binding {name:?} ({kind}), from {} for {:.1} s; {ended}",
            humantime::format_rfc3339_seconds(started_wall),
            end.as_secs_f64()
        ),
        format!(
            "events: {}; backlog read every {}: {observed} observation(s), {failed} failed",
            match mode {
                EventsMode::Auto if heard_events => "auto (task events heard: used)",
                EventsMode::Auto => "auto (no task events heard: observations used)",
                EventsMode::On => "on",
                EventsMode::Off => "off",
            },
            humantime::format_duration(args.every)
        ),
    ];
    preamble.extend(gaps);
    let csv = recording.to_csv(&preamble);
    write_atomically(args.out, &csv).map_err(|e| {
        Failure::Setup(format!(
            "cannot write the trace {}: {e}",
            args.out.display()
        ))
    })?;
    let trace = &recording.trace;
    println!(
        "recorded {} tasks ({:.0} busy seconds) over {:.1} s from binding {name:?} to {}",
        trace.tasks(),
        trace.busy_time().as_secs_f64(),
        end.as_secs_f64(),
        args.out.display()
    );
    for note in &recording.notes {
        println!("  {note}");
    }
    if observed == 0 && !heard_events {
        return Err(Failure::Binding(format!(
            "binding {name:?}: no observation succeeded and no task event came: the trace is empty"
        )));
    }
    Ok(())
}

/// Writes `text` to `path` through a temporary file beside it, so that a reader never sees
/// half a trace.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

impl Live {
    fn connect_timeout(&self) -> Duration {
        match self {
            Live::Redis(s) => s.config().connect_timeout,
            Live::Amqp(s) => s.config().connect_timeout,
            Live::Sqs(_) => Duration::ZERO,
        }
    }
}

/// A live subscription to Celery's event exchange.
enum Subscription {
    Redis(celery_scale_redis::CeleryEventSubscription),
    Amqp(Box<celery_scale_amqp::CeleryEventConsumer>),
}

impl Live {
    async fn subscribe(&self, task_events: bool) -> Result<Subscription, String> {
        match self {
            Live::Redis(s) => s
                .subscribe_celery_events(task_events)
                .await
                .map(Subscription::Redis)
                .map_err(|e| e.to_string()),
            Live::Amqp(s) => s
                .subscribe_celery_events(task_events)
                .await
                .map(|c| Subscription::Amqp(Box::new(c)))
                .map_err(|e| e.to_string()),
            Live::Sqs(_) => Err("SQS carries no Celery events".into()),
        }
    }
}

impl Subscription {
    async fn next(&mut self) -> Option<Result<Vec<u8>, String>> {
        match self {
            Subscription::Redis(s) => s.next().await.map(|r| r.map_err(|e| e.to_string())),
            Subscription::Amqp(s) => s.next().await.map(|r| r.map_err(|e| e.to_string())),
        }
    }
}

/// The event subscription, set up again after each failure or end; every message body goes to
/// `tx` with the instant it came. Ends when the recorder stops listening.
async fn event_feed(live: Arc<Live>, task_events: bool, tx: mpsc::Sender<Feed>) {
    loop {
        let down = match live.subscribe(task_events).await {
            Ok(mut sub) => {
                if tx.send(Feed::Up).await.is_err() {
                    return;
                }
                loop {
                    match sub.next().await {
                        Some(Ok(body)) => {
                            if tx.send(Feed::Body(Instant::now(), body)).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(e)) => break e,
                        None => break "the broker ended the subscription".to_string(),
                    }
                }
            }
            Err(e) => e,
        };
        if tx.send(Feed::Down(down)).await.is_err() {
            return;
        }
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}
