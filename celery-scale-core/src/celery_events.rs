//! Celery's worker events (`worker-heartbeat`, `worker-online`, `worker-offline`), decoded once
//! for every broker, and a registry of live workers built from them.
//!
//! Every Celery worker sends a heartbeat every `freq` seconds (2 s by default) without any `-E`
//! flag. The heartbeat's `active` is the number of tasks executing now: the only way to see
//! executing tasks on Redis with Celery's default early ack. On Redis the events arrive on the
//! PUB/SUB channel `/{db}.celeryev/worker.heartbeat` wrapped in kombu's JSON envelope
//! ([`decode_kombu_envelope`]); on RabbitMQ they are messages on the `celeryev` topic exchange
//! whose body is the event JSON itself ([`WorkerEvent::from_json`]).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tokio::time::Instant;

use crate::WorkersUnknown;

mod feed;

pub use feed::{FeedSettings, FeedSink, WorkerFeed};

/// What kind of worker event this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEventKind {
    /// `worker-heartbeat`: sent every `freq` seconds.
    Heartbeat,
    /// `worker-online`: the worker started.
    Online,
    /// `worker-offline`: the worker is shutting down. Sent when a warm shutdown **begins**,
    /// while its executing tasks still run (Celery 5 stops the consumer, heartbeat included,
    /// before it waits for the pool).
    Offline,
}

/// One decoded Celery worker event.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerEvent {
    /// The kind of event.
    pub kind: WorkerEventKind,
    /// The worker's node name, e.g. `celery@host-1`.
    pub hostname: String,
    /// Tasks executing now.
    pub active: u64,
    /// Tasks the worker has started so far (Celery's `all_total_count`, counted in
    /// `celery.worker.state.task_accepted` when a pool process takes the task: prefetched tasks
    /// are not in it until they start).
    pub processed: u64,
    /// Seconds between heartbeats: finite, above 0 and at most [`MAX_HEARTBEAT_FREQ`] in every
    /// decoded event.
    pub freq: f64,
    /// The worker's own clock, seconds since the Unix epoch.
    pub timestamp: f64,
}

/// Why an event could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum EventDecodeError {
    /// The bytes are not the expected JSON.
    #[error("worker event is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The envelope's body is not valid base64.
    #[error("worker event body is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// The event is not a worker event (e.g. a task event).
    #[error("not a worker event: type {0:?}")]
    NotWorkerEvent(String),
    /// A number in the event is outside what a Celery worker sends.
    #[error("worker event field {field} = {value} is out of range ({rule})")]
    OutOfRange {
        /// The event field.
        field: &'static str,
        /// The value as received.
        value: f64,
        /// The accepted range.
        rule: &'static str,
    },
}

/// The longest heartbeat interval accepted (`freq`): Celery's default is 2 s; anything above an
/// hour is not a heartbeat.
pub const MAX_HEARTBEAT_FREQ: Duration = Duration::from_secs(3600);

/// The largest `active` or `processed` count accepted: a worker runs a handful of processes
/// (`active`) and no worker has received 10^12 tasks (`processed`).
pub const MAX_TASK_COUNT: u64 = 1_000_000_000_000;

/// Celery's own rule (`celery/events/state.py`, `HEARTBEAT_EXPIRE_WINDOW` = 200): a worker
/// whose last beat is older than `freq x 2` is no longer beating.
const EXPIRE_WINDOW: f64 = 2.0;

/// Added to Celery's window for the event's delivery (the registry times beats by arrival).
const DELIVERY_MARGIN: Duration = Duration::from_secs(1);

/// How long a silent worker counts before it is taken as gone, unless a source says otherwise:
/// kombu's default `visibility_timeout` (1 h), after which Redis gives a dead worker's held
/// messages back.
pub const DEFAULT_SILENT_LIMIT: Duration = Duration::from_secs(3600);

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "type")]
    kind: String,
    hostname: String,
    #[serde(default)]
    active: u64,
    #[serde(default)]
    processed: u64,
    #[serde(default = "default_freq")]
    freq: f64,
    #[serde(default)]
    timestamp: f64,
}

fn default_freq() -> f64 {
    2.0
}

#[derive(Deserialize)]
struct Envelope {
    body: String,
    #[serde(default)]
    properties: EnvelopeProperties,
}

#[derive(Deserialize, Default)]
struct EnvelopeProperties {
    #[serde(default)]
    body_encoding: Option<String>,
}

/// Unwraps kombu's Redis envelope (`{"body": <base64>, "properties": {"body_encoding": "base64"}, ...}`)
/// and returns the event JSON inside.
pub fn decode_kombu_envelope(payload: &[u8]) -> Result<Vec<u8>, EventDecodeError> {
    let env: Envelope = serde_json::from_slice(payload)?;
    match env.properties.body_encoding.as_deref() {
        Some("base64") | None => Ok(base64::engine::general_purpose::STANDARD.decode(env.body)?),
        Some(_) => Ok(env.body.into_bytes()),
    }
}

impl WorkerEvent {
    /// Decodes the event JSON (the body of the AMQP message, or the inside of kombu's envelope).
    pub fn from_json(body: &[u8]) -> Result<Self, EventDecodeError> {
        let raw: RawEvent = serde_json::from_slice(body)?;
        let kind = match raw.kind.as_str() {
            "worker-heartbeat" => WorkerEventKind::Heartbeat,
            "worker-online" => WorkerEventKind::Online,
            "worker-offline" => WorkerEventKind::Offline,
            other => return Err(EventDecodeError::NotWorkerEvent(other.to_string())),
        };
        if !(raw.freq.is_finite() && raw.freq > 0.0 && raw.freq <= MAX_HEARTBEAT_FREQ.as_secs_f64())
        {
            return Err(EventDecodeError::OutOfRange {
                field: "freq",
                value: raw.freq,
                rule: "a positive number of seconds, at most 3600",
            });
        }
        for (field, value) in [("active", raw.active), ("processed", raw.processed)] {
            if value > MAX_TASK_COUNT {
                return Err(EventDecodeError::OutOfRange {
                    field,
                    value: value as f64,
                    rule: "a task count of at most 10^12",
                });
            }
        }
        if !raw.timestamp.is_finite() {
            return Err(EventDecodeError::OutOfRange {
                field: "timestamp",
                value: raw.timestamp,
                rule: "a finite number of seconds since the epoch",
            });
        }
        Ok(WorkerEvent {
            kind,
            hostname: raw.hostname,
            active: raw.active,
            processed: raw.processed,
            freq: raw.freq,
            timestamp: raw.timestamp,
        })
    }

    /// Decodes a Redis PUB/SUB payload: kombu's envelope around the event JSON.
    pub fn from_kombu_envelope(payload: &[u8]) -> Result<Self, EventDecodeError> {
        WorkerEvent::from_json(&decode_kombu_envelope(payload)?)
    }
}

/// One live Celery worker node and the tasks it executes, as its last heartbeat said.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerNode {
    /// Its node name (`celery@ip-10-0-1-23`, `worker@3f2a...`).
    pub hostname: String,
    /// Tasks it executes now (`active`).
    pub executing: u64,
    /// When its last heartbeat arrived (the loop's clock); `None` when not known (a node set by
    /// hand, as the in-memory backend's are). A node idle in a beat older than the last time
    /// work could have reached it may have taken some since.
    #[serde(skip)]
    pub last_beat: Option<Instant>,
}

impl WorkerNode {
    /// Node `hostname` executing `executing` tasks, its last beat not known.
    pub fn new(hostname: impl Into<String>, executing: u64) -> Self {
        WorkerNode {
            hostname: hostname.into(),
            executing,
            last_beat: None,
        }
    }
}

/// What the live workers say, summed, and node by node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkerSummary {
    /// Tasks executing now over all live workers.
    pub executing: u64,
    /// Workers whose last heartbeat is recent.
    pub live_workers: u32,
    /// Tasks one busy worker process gets through per second, measured over the registry's
    /// window: the rate at which workers start tasks (`processed`) divided by the mean number of
    /// executing tasks (Little's law); over the window it converges to the completion rate. `None` until there is
    /// history with work executing.
    pub throughput_per_worker: Option<f64>,
    /// Every live node, by name.
    pub nodes: Vec<WorkerNode>,
}

#[derive(Debug)]
struct WorkerState {
    active: u64,
    /// Seconds between beats, as the worker said (validated when decoded).
    freq: f64,
    last_beat: Instant,
    /// (when, processed, active) samples within the window.
    samples: VecDeque<(Instant, u64, u64)>,
}

impl WorkerState {
    /// How long after its last beat the worker still counts as beating: Celery's window plus
    /// the delivery margin.
    fn beating_for(&self) -> Duration {
        Duration::try_from_secs_f64(self.freq * EXPIRE_WINDOW)
            .unwrap_or(MAX_HEARTBEAT_FREQ * 2)
            .saturating_add(DELIVERY_MARGIN)
    }
}

/// Live workers by hostname (ordered, so sums are reproducible), fed with [`WorkerEvent`]s, read
/// as a [`WorkerSummary`] while every worker it knows is beating.
///
/// A worker leaves the registry when it sends `worker-offline`. A worker whose beats stop
/// without it is **silent, not gone**: a busy `-P solo` worker, or any task that blocks the
/// worker's event loop, sends no heartbeat while it runs, and its tasks are still executing.
/// While a worker is silent (no beat for Celery's own `freq x 2`, plus a second for delivery)
/// [`WorkerRegistry::reading`] says the figures are unknown, with the tasks last heard as a
/// floor. A worker silent for longer than the silent limit (by default
/// [`DEFAULT_SILENT_LIMIT`], when the broker would have given its held messages back) is taken
/// as gone and forgotten.
#[derive(Debug)]
pub struct WorkerRegistry {
    workers: BTreeMap<String, WorkerState>,
    window: Duration,
    silent_limit: Duration,
}

impl Default for WorkerRegistry {
    fn default() -> Self {
        WorkerRegistry::new(Duration::from_secs(60))
    }
}

impl WorkerRegistry {
    /// A registry that measures throughput over `window`.
    pub fn new(window: Duration) -> Self {
        WorkerRegistry {
            workers: BTreeMap::new(),
            window,
            silent_limit: DEFAULT_SILENT_LIMIT,
        }
    }

    /// The same registry, forgetting silent workers after `limit` instead of
    /// [`DEFAULT_SILENT_LIMIT`].
    pub fn with_silent_limit(mut self, limit: Duration) -> Self {
        self.silent_limit = limit;
        self
    }

    /// Records an event received at `now`.
    pub fn apply(&mut self, event: &WorkerEvent, now: Instant) {
        if event.kind == WorkerEventKind::Offline {
            self.workers.remove(&event.hostname);
            return;
        }
        let state = self
            .workers
            .entry(event.hostname.clone())
            .or_insert_with(|| WorkerState {
                active: 0,
                freq: event.freq,
                last_beat: now,
                samples: VecDeque::new(),
            });
        state.active = event.active;
        state.freq = event.freq;
        state.last_beat = now;
        if event.kind == WorkerEventKind::Heartbeat {
            state
                .samples
                .push_back((now, event.processed, event.active));
            while let Some(&(t, _, _)) = state.samples.front() {
                if now.saturating_duration_since(t) > self.window && state.samples.len() > 2 {
                    state.samples.pop_front();
                } else {
                    break;
                }
            }
        }
    }

    /// Forgets every worker.
    pub fn clear(&mut self) {
        self.workers.clear();
    }

    /// The figures of the workers heard, when every one of them is beating; otherwise why not,
    /// with the tasks they last reported as a floor. Forgets workers silent for longer than the
    /// silent limit.
    pub fn reading(&mut self, now: Instant) -> Result<WorkerSummary, WorkersUnknown> {
        let limit = self.silent_limit;
        self.workers.retain(|hostname, w| {
            let quiet = now.saturating_duration_since(w.last_beat);
            let keep = quiet <= limit.max(w.beating_for());
            if !keep {
                tracing::warn!(
                    worker = %hostname,
                    silent_for = %humantime::format_duration(round_to_s(quiet)),
                    "forgetting a worker silent for longer than the silent limit without worker-offline"
                );
            }
            keep
        });
        let executing = self
            .workers
            .values()
            .fold(0u64, |acc, w| acc.saturating_add(w.active));
        let silent: Vec<String> = self
            .workers
            .iter()
            .filter_map(|(hostname, w)| {
                let quiet = now.saturating_duration_since(w.last_beat);
                (quiet > w.beating_for()).then(|| {
                    format!(
                        "{hostname} ({}, {} executing at its last beat)",
                        humantime::format_duration(round_to_s(quiet)),
                        w.active
                    )
                })
            })
            .collect();
        if !silent.is_empty() {
            return Err(WorkersUnknown {
                why: format!(
                    "{} worker(s) silent without worker-offline: {}; a busy solo pool or a \
                     blocked event loop sends no heartbeat, so they count as running until they \
                     beat, go offline or stay silent for {}",
                    silent.len(),
                    silent.join(", "),
                    humantime::format_duration(limit)
                ),
                executing_at_least: executing,
            });
        }
        let mut completed_per_s = 0.0;
        let mut mean_active = 0.0;
        let mut measured = false;
        for w in self.workers.values() {
            if let (Some(first), Some(last)) = (w.samples.front(), w.samples.back()) {
                let dt = last.0.saturating_duration_since(first.0).as_secs_f64();
                if dt > 0.0 && w.samples.len() >= 2 {
                    measured = true;
                    completed_per_s += last.1.saturating_sub(first.1) as f64 / dt;
                    mean_active +=
                        w.samples.iter().map(|s| s.2 as f64).sum::<f64>() / w.samples.len() as f64;
                }
            }
        }
        let throughput = completed_per_s / mean_active;
        Ok(WorkerSummary {
            executing,
            live_workers: u32::try_from(self.workers.len()).unwrap_or(u32::MAX),
            throughput_per_worker: (measured
                && mean_active > 0.0
                && completed_per_s > 0.0
                && throughput.is_finite())
            .then_some(throughput),
            nodes: self
                .workers
                .iter()
                .map(|(hostname, w)| WorkerNode {
                    hostname: hostname.clone(),
                    executing: w.active,
                    last_beat: Some(w.last_beat),
                })
                .collect(),
        })
    }
}

/// `d` rounded to whole seconds, for messages.
fn round_to_s(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters (none included)
/// and every other character only itself: how worker hostnames (`emails@*`) and queue names
/// (`celeryev.*`) are picked or left out.
///
/// ```
/// use celery_scale_core::wildcard_match;
/// assert!(wildcard_match("emails@*", "emails@host-1"));
/// assert!(!wildcard_match("emails@*", "celery@host-1"));
/// ```
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if name.len() < first.len() + last.len() || !name.starts_with(first) || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("emails@*", "emails@host-1"));
        assert!(!wildcard_match("emails@*", "celery@host-1"));
        assert!(wildcard_match("*", "anything"));
        assert!(wildcard_match("a*b*c", "a-x-b-y-c"));
        assert!(!wildcard_match("a*b*c", "a-x-c-y-b"));
        assert!(wildcard_match("exact", "exact"));
        assert!(!wildcard_match("exact", "exactly"));
        assert!(!wildcard_match("ab*ba", "aba"));
        assert!(wildcard_match("*a*b*", "xxaYYb"));
        assert!(!wildcard_match("a*a", "a"));
    }

    fn beat(host: &str, active: u64, processed: u64) -> WorkerEvent {
        WorkerEvent {
            kind: WorkerEventKind::Heartbeat,
            hostname: host.into(),
            active,
            processed,
            freq: 2.0,
            timestamp: 0.0,
        }
    }

    #[test]
    fn decodes_kombu_envelope() {
        let inner = br#"{"hostname": "celery@a", "active": 2, "processed": 7, "freq": 2.0, "timestamp": 1.5, "type": "worker-heartbeat", "loadavg": [0.1, 0.2, 0.3], "pid": 1}"#;
        let body = base64::engine::general_purpose::STANDARD.encode(inner);
        let env = format!(
            r#"{{"body": "{body}", "content-encoding": "utf-8", "content-type": "application/json", "headers": {{"hostname": "celery@a"}}, "properties": {{"delivery_mode": 1, "body_encoding": "base64", "delivery_tag": "x"}}}}"#
        );
        let e = WorkerEvent::from_kombu_envelope(env.as_bytes()).unwrap();
        assert_eq!(e.kind, WorkerEventKind::Heartbeat);
        assert_eq!(e.hostname, "celery@a");
        assert_eq!((e.active, e.processed), (2, 7));
        assert!(matches!(
            WorkerEvent::from_json(br#"{"type": "task-received", "hostname": "x"}"#),
            Err(EventDecodeError::NotWorkerEvent(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn registry_tracks_live_workers_and_throughput() {
        let mut reg = WorkerRegistry::default();
        let t0 = Instant::now();
        reg.apply(&beat("a", 2, 0), t0);
        reg.apply(&beat("b", 1, 0), t0);
        let s = reg.reading(t0).unwrap();
        assert_eq!((s.executing, s.live_workers), (3, 2));
        assert_eq!(s.throughput_per_worker, None);
        // a: 2 busy processes complete 10 tasks in 10 s -> 0.5 tasks/s per busy process.
        reg.apply(&beat("a", 2, 10), t0 + Duration::from_secs(10));
        reg.apply(&beat("b", 1, 0), t0 + Duration::from_secs(10));
        let s = reg.reading(t0 + Duration::from_secs(10)).unwrap();
        let tp = s.throughput_per_worker.unwrap();
        assert!((tp - 1.0 / 3.0).abs() < 1e-9, "{tp}");
        // a goes offline; b keeps beating.
        reg.apply(
            &WorkerEvent {
                kind: WorkerEventKind::Offline,
                ..beat("a", 0, 12)
            },
            t0 + Duration::from_secs(12),
        );
        reg.apply(&beat("b", 1, 0), t0 + Duration::from_secs(12));
        let s = reg.reading(t0 + Duration::from_secs(13)).unwrap();
        assert_eq!((s.executing, s.live_workers), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_stops_beating_is_silent_not_gone() {
        let mut reg = WorkerRegistry::default().with_silent_limit(Duration::from_secs(600));
        let t0 = Instant::now();
        reg.apply(&beat("solo", 1, 0), t0);
        reg.apply(&beat("b", 0, 0), t0);
        // Within Celery's window (2 x freq) plus the delivery margin: still beating.
        reg.apply(&beat("b", 0, 0), t0 + Duration::from_secs(4));
        assert!(reg.reading(t0 + Duration::from_secs(5)).is_ok());
        // solo's event loop is blocked by its task: no beat for 10 s. Unknown, not 0.
        reg.apply(&beat("b", 0, 0), t0 + Duration::from_secs(10));
        let unknown = reg.reading(t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(unknown.executing_at_least, 1, "{unknown:?}");
        assert!(unknown.why.contains("solo"), "{}", unknown.why);
        // It beats again once its task ended: known again.
        reg.apply(&beat("solo", 0, 1), t0 + Duration::from_secs(30));
        reg.apply(&beat("b", 0, 0), t0 + Duration::from_secs(30));
        let s = reg.reading(t0 + Duration::from_secs(30)).unwrap();
        assert_eq!((s.executing, s.live_workers), (0, 2));
        // Silent past the limit (a SIGKILLed worker, a lost host): taken as gone.
        reg.apply(&beat("b", 0, 0), t0 + Duration::from_secs(640));
        let s = reg.reading(t0 + Duration::from_secs(640)).unwrap();
        assert_eq!(s.live_workers, 1);
    }

    #[test]
    fn out_of_range_numbers_are_rejected_not_panicked_on() {
        for freq in ["1e19", "-2", "0", "3601", "1e308"] {
            let json =
                format!(r#"{{"type": "worker-heartbeat", "hostname": "x", "freq": {freq}}}"#);
            assert!(
                matches!(
                    WorkerEvent::from_json(json.as_bytes()),
                    Err(EventDecodeError::OutOfRange { field: "freq", .. })
                ),
                "freq {freq}"
            );
        }
        for bad in [
            r#"{"type": "worker-heartbeat", "hostname": "x", "active": -1}"#,
            r#"{"type": "worker-heartbeat", "hostname": "x", "active": 1e30}"#,
            r#"{"type": "worker-heartbeat", "hostname": "x", "processed": 18446744073709551616}"#,
            r#"{"type": "worker-heartbeat", "hostname": "x", "timestamp": 1e999}"#,
            r#"{"type": "worker-heartbeat", "hostname": 7}"#,
        ] {
            assert!(WorkerEvent::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
        let huge = format!(
            r#"{{"type": "worker-heartbeat", "hostname": "x", "active": {}, "freq": 3600}}"#,
            u64::MAX
        );
        assert!(matches!(
            WorkerEvent::from_json(huge.as_bytes()),
            Err(EventDecodeError::OutOfRange {
                field: "active",
                ..
            })
        ));
        let max = format!(
            r#"{{"type": "worker-heartbeat", "hostname": "x", "active": {MAX_TASK_COUNT}, "freq": 3600}}"#
        );
        let e = WorkerEvent::from_json(max.as_bytes()).unwrap();
        let mut reg = WorkerRegistry::default();
        let now = Instant::now();
        reg.apply(&e, now);
        reg.apply(
            &WorkerEvent {
                hostname: "y".into(),
                ..e.clone()
            },
            now,
        );
        assert_eq!(reg.reading(now).unwrap().executing, 2 * MAX_TASK_COUNT);
    }
}
