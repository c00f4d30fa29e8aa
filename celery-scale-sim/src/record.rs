//! Recording a [`Trace`] from a live broker, so a configuration can be tuned on one's own
//! traffic with the simulator (`celery-scale record`, then `celery-scale simulate --trace`).
//!
//! This module is the pure part: it decodes the messages of Celery's event exchange
//! (`celeryev`) and turns them, with the backlog read every few seconds, into arrivals. It does
//! no I/O, so every rule is tested without a broker; the CLI feeds it.
//!
//! Two measurements, chosen by [`EventsMode`]:
//!
//! - **Task events** (workers started with `-E`, or `worker_send_task_events`). What Celery 5.7
//!   puts in them (`celery/worker/strategy.py`, `celery/worker/request.py`,
//!   `celery/app/amqp.py`): `task-received` (when a worker reserves the message: `uuid`, `name`,
//!   `args`, `kwargs`, `retries`, `eta`, ..., and **no queue**), `task-started`,
//!   `task-succeeded` (with `runtime`, the seconds the task ran, measured by the worker),
//!   `task-failed`, `task-retried` (no runtime: the attempt's length is the worker's own
//!   timestamps, started to failed), `task-rejected`, `task-revoked`; and `task-sent`, sent by
//!   the *publisher* only when it sets `task_send_sent_event`, the one event with `queue`,
//!   `exchange` and `routing_key`. Every event has the sender's `hostname` and `timestamp`. With a
//!   prefork pool the worker buffers its task events and publishes them as one JSON list with the
//!   routing key `task.multi` (seen on Redis, Celery 5.7).
//!
//!   A task's duration is `runtime` (or started to succeeded/failed, on the worker's clock). Its
//!   arrival is the `task-sent` time when there is one. Otherwise `task-received` would be the
//!   time a worker *took* the task, late whenever the queue had a backlog, so the recorder puts
//!   the n-th task received at the time the queue's cumulative arrivals (ready messages plus
//!   tasks received so far, read at every observation) first reached n (FIFO), and never later
//!   than its receipt. Its queue is the `task-sent` event's `queue` (or `routing_key`); without
//!   one the binding's first queue.
//! - **Observations** (no task events): the cumulative arrivals at each observation are the
//!   messages waiting (ready plus held, when the source knows the held count) plus the tasks
//!   workers started (the growth of each worker heartbeat's `processed`, which every Celery
//!   worker sends without `-E`; Celery 5.7 counts it in `state.task_accepted`, when a pool
//!   process starts the task, not when the message is prefetched), interpolated between beats
//!   and taken as never decreasing. Without heartbeats (SQS) only the increases of the backlog
//!   count (a lower bound). Every task gets one duration: the heartbeat-measured mean task time
//!   (busy worker-process seconds over tasks started) or a default. **An estimate**, and the
//!   recording says so.
//!
//! Everything decoded is untrusted: numbers are checked (finite, in range), names bounded, the
//! tasks in progress tracked are capped ([`RecorderSettings::max_tracked`], the oldest forgotten
//! first), and so is the number of tasks recorded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use celery_scale_core::celery_events::{EventDecodeError, WorkerEvent, WorkerEventKind};
use celery_scale_core::wildcard_match;
use serde::Deserialize;

use crate::{Arrival, Trace};

/// The longest name (uuid, hostname, queue) accepted in an event, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// The most events accepted in one `task.multi` list (Celery sends at most 24).
pub const MAX_BATCH: usize = 10_000;

/// The longest task run time accepted (`runtime`): 30 days.
pub const MAX_RUNTIME: Duration = Duration::from_secs(30 * 86_400);

/// How far back within one batch an event may be placed from the batch's receipt, by the
/// sender's own timestamps (larger differences are clamped).
const MAX_BATCH_SPREAD: f64 = 60.0;

/// The most worker nodes whose heartbeats are tallied.
const MAX_WORKERS: usize = 10_000;

/// The most distinct queue names kept from events.
const MAX_QUEUES: usize = 1_000;

/// The most heartbeat points kept (over all workers); past it each worker's last point is
/// moved instead of a new one added.
const MAX_BEAT_POINTS: usize = 1_000_000;

/// A heartbeat gap longer than this many `freq` does not count as busy time.
const MAX_BEAT_GAP_FREQS: f64 = 10.0;

/// What kind of task event this is (`type` = `task-<kind>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskEventKind {
    /// `task-sent`: published, by a client with `task_send_sent_event`.
    Sent,
    /// `task-received`: a worker reserved the message (prefetched included).
    Received,
    /// `task-started`: a pool process started running it.
    Started,
    /// `task-succeeded`: it returned; carries `runtime`.
    Succeeded,
    /// `task-failed`: it raised (or could not be run).
    Failed,
    /// `task-retried`: the attempt raised `Retry`; the task is published again.
    Retried,
    /// `task-rejected`: the worker rejected the message.
    Rejected,
    /// `task-revoked`: the task was revoked (or expired) before or while it ran.
    Revoked,
}

/// One decoded Celery task event: only what a trace needs (arguments and results are never
/// kept).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEvent {
    /// The kind of event.
    pub kind: TaskEventKind,
    /// The task's id.
    pub uuid: String,
    /// The sender's node name (the worker's; for `task-sent` the publisher's).
    pub hostname: String,
    /// The sender's clock, seconds since the Unix epoch (finite).
    pub timestamp: f64,
    /// `task-succeeded`'s run time in seconds (finite, 0..=[`MAX_RUNTIME`]).
    pub runtime: Option<f64>,
    /// `task-sent`'s `queue` (or `routing_key`), when it is a name a trace can hold.
    pub queue: Option<String>,
}

/// One message of Celery's event exchange, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum CeleryEvent {
    /// A task event.
    Task(TaskEvent),
    /// A worker event (heartbeat, online, offline).
    Worker(WorkerEvent),
    /// Any other event type (custom events, `worker-*` kinds Celery adds later): ignored.
    Other,
}

#[derive(Deserialize)]
struct RawKind {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct RawTask {
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    timestamp: Option<f64>,
    #[serde(default)]
    runtime: Option<f64>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    routing_key: Option<String>,
}

fn name_too_long(field: &'static str, len: usize) -> EventDecodeError {
    EventDecodeError::OutOfRange {
        field,
        value: len as f64,
        rule: "a name of 1 to 255 bytes",
    }
}

/// Whether `name` can be written as a queue in a trace CSV (no separator, line break or comment
/// mark, no blanks around it) and read back the same.
pub fn is_trace_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.trim() == name
        && !name.starts_with('#')
        && !name.contains([',', '\n', '\r'])
}

fn decode_task(
    kind: TaskEventKind,
    value: serde_json::Value,
) -> Result<TaskEvent, EventDecodeError> {
    let raw: RawTask = serde_json::from_value(value)?;
    let uuid = raw.uuid.unwrap_or_default();
    if uuid.is_empty() || uuid.len() > MAX_NAME_LEN {
        return Err(name_too_long("uuid", uuid.len()));
    }
    let hostname = raw.hostname.unwrap_or_default();
    if hostname.len() > MAX_NAME_LEN {
        return Err(name_too_long("hostname", hostname.len()));
    }
    let timestamp = raw.timestamp.unwrap_or(f64::NAN);
    if !timestamp.is_finite() {
        return Err(EventDecodeError::OutOfRange {
            field: "timestamp",
            value: timestamp,
            rule: "a finite number of seconds since the epoch (required)",
        });
    }
    if let Some(r) = raw.runtime
        && !(r.is_finite() && (0.0..=MAX_RUNTIME.as_secs_f64()).contains(&r))
    {
        return Err(EventDecodeError::OutOfRange {
            field: "runtime",
            value: r,
            rule: "a number of seconds from 0 to 30 days",
        });
    }
    let queue = raw
        .queue
        .filter(|q| is_trace_queue_name(q))
        .or_else(|| raw.routing_key.filter(|q| is_trace_queue_name(q)));
    Ok(TaskEvent {
        kind,
        uuid,
        hostname,
        timestamp,
        runtime: raw.runtime,
        queue,
    })
}

fn decode_one(value: serde_json::Value) -> Result<CeleryEvent, EventDecodeError> {
    let RawKind { kind } = RawKind::deserialize(&value)?;
    let task = match kind.as_str() {
        "task-sent" => TaskEventKind::Sent,
        "task-received" => TaskEventKind::Received,
        "task-started" => TaskEventKind::Started,
        "task-succeeded" => TaskEventKind::Succeeded,
        "task-failed" => TaskEventKind::Failed,
        "task-retried" => TaskEventKind::Retried,
        "task-rejected" => TaskEventKind::Rejected,
        "task-revoked" => TaskEventKind::Revoked,
        "worker-heartbeat" | "worker-online" | "worker-offline" => {
            let bytes = serde_json::to_vec(&value)?;
            return WorkerEvent::from_json(&bytes).map(CeleryEvent::Worker);
        }
        _ => return Ok(CeleryEvent::Other),
    };
    decode_task(task, value).map(CeleryEvent::Task)
}

/// Decodes the body of one message of Celery's event exchange: one event (a JSON object), or
/// the list a worker sends with the routing key `task.multi`. Each event decodes on its own
/// (one bad event of a list does not lose the others); a body that is neither is one error.
/// On Redis unwrap kombu's envelope first
/// ([`decode_kombu_envelope`](celery_scale_core::celery_events::decode_kombu_envelope)).
pub fn decode_celery_events(body: &[u8]) -> Vec<Result<CeleryEvent, EventDecodeError>> {
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return vec![Err(e.into())],
    };
    match value {
        serde_json::Value::Array(items) => {
            if items.len() > MAX_BATCH {
                return vec![Err(EventDecodeError::OutOfRange {
                    field: "task.multi",
                    value: items.len() as f64,
                    rule: "a list of at most 10000 events",
                })];
            }
            items.into_iter().map(decode_one).collect()
        }
        other => vec![decode_one(other)],
    }
}

/// Which measurement a recording uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventsMode {
    /// Task events when workers sent any, otherwise observations.
    #[default]
    Auto,
    /// Task events only (an empty trace when none came).
    On,
    /// Observations only, even when task events come.
    Off,
}

/// How a recorder counts and bounds what it hears.
#[derive(Debug, Clone, PartialEq)]
pub struct RecorderSettings {
    /// The queue of tasks whose queue no event names (the binding's first queue).
    pub default_queue: String,
    /// The binding's queues: a task whose `task-sent` names another queue is left out. Empty:
    /// every queue counts.
    pub queues: Vec<String>,
    /// Patterns (`*` matches any run) of the worker node names that count; empty: every
    /// worker. Applies to worker events and to task events except `task-sent` (whose hostname
    /// is the publisher's).
    pub hostnames: Vec<String>,
    /// The duration of every task in observations mode when heartbeats measured none, and of
    /// tasks still waiting at the end when no task completed.
    pub default_duration: Duration,
    /// The most tasks in progress tracked at once; past it the oldest is forgotten (and
    /// counted).
    pub max_tracked: usize,
    /// The most tasks recorded; past it task events are no longer recorded (and it is said).
    pub max_tasks: usize,
}

impl Default for RecorderSettings {
    fn default() -> Self {
        RecorderSettings {
            default_queue: "celery".into(),
            queues: Vec::new(),
            hostnames: Vec::new(),
            default_duration: Duration::from_secs(10),
            max_tracked: 100_000,
            max_tasks: 5_000_000,
        }
    }
}

/// Where a task's arrival time comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Position {
    /// Its `task-sent` event, at this time.
    Sent(Duration),
    /// The index of its first receipt (see `Recorder::receipts`).
    Receipt(usize),
    /// Received before the recording began: an arrival at 0.
    BeforeStart,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    sent_at: Option<Duration>,
    receipt: Option<usize>,
    /// Worker-clock time of `task-started`.
    started_ts: Option<f64>,
    /// Local time of `task-started`.
    started_at: Option<Duration>,
    queue: Option<u16>,
}

impl Pending {
    fn position(&self) -> Position {
        match (self.sent_at, self.receipt) {
            (Some(at), _) => Position::Sent(at),
            (None, Some(i)) => Position::Receipt(i),
            (None, None) => Position::BeforeStart,
        }
    }
}

#[derive(Debug)]
struct Done {
    position: Position,
    duration: Duration,
    queue: Option<u16>,
}

#[derive(Debug)]
struct WorkerTally {
    processed: u64,
    active: u64,
    freq: f64,
    at: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    ready: u64,
    /// Ready plus held, when the source knew the held count.
    outstanding: Option<u64>,
    /// Tasks received (task events) by then.
    receipts: u64,
}

/// Counts of what a recording heard, for its header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordStats {
    /// Task events applied (from counted workers).
    pub task_events: u64,
    /// Events that could not be decoded.
    pub undecodable: u64,
    /// Tasks completed (succeeded, failed, retried attempt, rejected, revoked) while recording.
    pub completed: u64,
    /// Tasks still running at the end (their duration is what they had run: a lower bound).
    pub running_at_end: u64,
    /// Tasks received but not started at the end (the mean duration of the completed ones).
    pub waiting_at_end: u64,
    /// Tasks first heard of after they were received (before the recording began): put at 0.
    pub before_start: u64,
    /// Tasks whose queue no event named (recorded on the default queue).
    pub queue_assumed: u64,
    /// Tasks left out because their `task-sent` named a queue of another binding.
    pub other_queue: u64,
    /// Tasks in progress forgotten because more than `max_tracked` were in progress.
    pub forgotten: u64,
    /// Task events not recorded because `max_tasks` tasks were recorded already.
    pub over_limit: u64,
    /// Backlog observations taken.
    pub observations: u64,
    /// Heartbeats tallied.
    pub heartbeats: u64,
}

/// How a finished recording measured its trace.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordedMode {
    /// From task events.
    TaskEvents,
    /// Estimated from successive observations.
    Observations {
        /// Whether started tasks came from heartbeats (otherwise backlog increases only).
        started_from_heartbeats: bool,
        /// The heartbeat-measured mean task time, when measured (every task got it).
        measured_duration: Option<Duration>,
        /// The duration every task got.
        duration: Duration,
    },
}

/// A finished recording: the trace, how it was measured, and what to know about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    /// The arrivals.
    pub trace: Trace,
    /// How they were measured.
    pub mode: RecordedMode,
    /// Counts of what was heard.
    pub stats: RecordStats,
    /// Lines for the file's header comment: the mode and its limits.
    pub notes: Vec<String>,
}

impl Recording {
    /// The trace CSV, with `preamble` and the notes as `#` comment lines first (which
    /// [`Trace::from_csv`] skips).
    pub fn to_csv(&self, preamble: &[String]) -> String {
        let mut out = String::new();
        for line in preamble.iter().chain(&self.notes) {
            for l in line.lines() {
                let _ = writeln!(out, "# {l}");
            }
        }
        // Trace::to_csv's format, with times to the millisecond (what the recorder measures).
        out.push_str("at_s,count,duration_s,queue\n");
        for a in self.trace.arrivals() {
            let _ = writeln!(
                out,
                "{},{},{},{}",
                millis(a.at),
                a.count,
                millis(a.duration),
                a.queue
            );
        }
        out
    }
}

/// Turns Celery events and backlog observations into a [`Trace`]: see the module
/// documentation. Times are the caller's clock since the recording began; feed it in time
/// order.
#[derive(Debug)]
pub struct Recorder {
    settings: RecorderSettings,
    pending: HashMap<String, Pending>,
    /// Pending tasks by age (`Pending::seq`), to forget the oldest first.
    order: BTreeMap<u64, String>,
    next_seq: u64,
    /// Local time of every first receipt, in order.
    receipts: Vec<Duration>,
    done: Vec<Done>,
    /// Queue names heard, interned.
    queue_names: Vec<String>,
    workers: BTreeMap<String, WorkerTally>,
    /// Per node name, `(time, tasks it started since first heard)` at each of its beats,
    /// interpolated between beats (a beat reports them up to 2 s late).
    beats: BTreeMap<String, Vec<(Duration, u64)>>,
    beat_points: usize,
    /// Tasks the workers started (heartbeats' `processed` growth).
    started: u64,
    busy_seconds: f64,
    samples: Vec<Sample>,
    /// Node names of the workers that sent task events (bounded).
    task_hosts: BTreeSet<String>,
    /// Node names heard in heartbeats (bounded).
    beat_hosts: BTreeSet<String>,
    worker_task_events: bool,
    stats: RecordStats,
}

impl Recorder {
    /// A recorder with `settings`.
    pub fn new(settings: RecorderSettings) -> Self {
        Recorder {
            settings,
            pending: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            receipts: Vec::new(),
            done: Vec::new(),
            queue_names: Vec::new(),
            workers: BTreeMap::new(),
            beats: BTreeMap::new(),
            beat_points: 0,
            started: 0,
            busy_seconds: 0.0,
            samples: Vec::new(),
            task_hosts: BTreeSet::new(),
            beat_hosts: BTreeSet::new(),
            worker_task_events: false,
            stats: RecordStats::default(),
        }
    }

    /// Counts an event that could not be decoded.
    pub fn undecodable(&mut self) {
        self.stats.undecodable = self.stats.undecodable.saturating_add(1);
    }

    /// Whether a worker sent any task event so far (workers run with `-E`).
    pub fn heard_task_events(&self) -> bool {
        self.worker_task_events
    }

    /// Counts so far.
    pub fn stats(&self) -> &RecordStats {
        &self.stats
    }

    /// Records the backlog read at `at`: `ready` messages over the binding's queues, and
    /// `outstanding` = ready plus held (in flight) when the source knows the held count.
    pub fn observe(&mut self, at: Duration, ready: u64, outstanding: Option<u64>) {
        self.stats.observations = self.stats.observations.saturating_add(1);
        self.samples.push(Sample {
            at,
            ready,
            outstanding,
            receipts: self.receipts.len() as u64,
        });
    }

    fn counts(&self, hostname: &str) -> bool {
        self.settings.hostnames.is_empty()
            || self
                .settings
                .hostnames
                .iter()
                .any(|p| wildcard_match(p, hostname))
    }

    /// Applies the events of one message received at `at`. Events of one message (a
    /// `task.multi` list) are placed before `at` by the differences of their sender's
    /// timestamps (at most a minute), so that buffering does not bunch them.
    pub fn apply(&mut self, at: Duration, events: &[CeleryEvent]) {
        let latest = events
            .iter()
            .filter_map(|e| match e {
                CeleryEvent::Task(t) => Some(t.timestamp),
                _ => None,
            })
            .fold(f64::NEG_INFINITY, f64::max);
        for event in events {
            match event {
                CeleryEvent::Task(t) => {
                    let back = (latest - t.timestamp).clamp(0.0, MAX_BATCH_SPREAD);
                    let when = at.saturating_sub(Duration::from_secs_f64(back));
                    self.task_event(when, t);
                }
                CeleryEvent::Worker(w) => self.worker_event(at, w),
                CeleryEvent::Other => {}
            }
        }
    }

    fn intern_queue(&mut self, queue: &str) -> Option<u16> {
        if let Some(i) = self.queue_names.iter().position(|q| q == queue) {
            return u16::try_from(i).ok();
        }
        if self.queue_names.len() >= MAX_QUEUES {
            return None;
        }
        self.queue_names.push(queue.to_string());
        u16::try_from(self.queue_names.len() - 1).ok()
    }

    fn remove(&mut self, uuid: &str) -> Option<Pending> {
        let p = self.pending.remove(uuid)?;
        self.order.remove(&p.seq);
        Some(p)
    }

    /// The pending entry of `uuid`, made when new (forgetting the oldest when full).
    fn entry(&mut self, uuid: &str) -> &mut Pending {
        if !self.pending.contains_key(uuid) {
            while self.pending.len() >= self.settings.max_tracked.max(1) {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                self.pending.remove(&oldest);
                self.stats.forgotten = self.stats.forgotten.saturating_add(1);
            }
            let seq = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
            self.order.insert(seq, uuid.to_string());
            self.pending.insert(
                uuid.to_string(),
                Pending {
                    seq,
                    sent_at: None,
                    receipt: None,
                    started_ts: None,
                    started_at: None,
                    queue: None,
                },
            );
        }
        self.pending
            .get_mut(uuid)
            .expect("the entry was just made or was there")
    }

    fn task_event(&mut self, at: Duration, t: &TaskEvent) {
        if t.kind != TaskEventKind::Sent {
            if !self.counts(&t.hostname) {
                return;
            }
            self.worker_task_events = true;
            if self.task_hosts.len() < MAX_WORKERS {
                self.task_hosts.insert(t.hostname.clone());
            }
        }
        if self.done.len() >= self.settings.max_tasks {
            self.stats.over_limit = self.stats.over_limit.saturating_add(1);
            return;
        }
        self.stats.task_events = self.stats.task_events.saturating_add(1);
        match t.kind {
            TaskEventKind::Sent => {
                let queue = t.queue.as_deref().and_then(|q| self.intern_queue(q));
                let p = self.entry(&t.uuid);
                p.sent_at.get_or_insert(at);
                if p.queue.is_none() {
                    p.queue = queue;
                }
            }
            TaskEventKind::Received => {
                let next = self.receipts.len();
                let p = self.entry(&t.uuid);
                // A redelivery (a message restored by a warm shutdown) keeps its first receipt.
                let first = p.receipt.is_none();
                if first {
                    p.receipt = Some(next);
                    self.receipts.push(at);
                }
            }
            TaskEventKind::Started => {
                let p = self.entry(&t.uuid);
                p.started_ts = Some(t.timestamp);
                p.started_at = Some(at);
            }
            TaskEventKind::Succeeded
            | TaskEventKind::Failed
            | TaskEventKind::Retried
            | TaskEventKind::Rejected
            | TaskEventKind::Revoked => {
                let p = match self.remove(&t.uuid) {
                    Some(p) => p,
                    None => {
                        // Received (and maybe started) before the recording began.
                        self.stats.before_start = self.stats.before_start.saturating_add(1);
                        Pending {
                            seq: 0,
                            sent_at: None,
                            receipt: None,
                            started_ts: None,
                            started_at: None,
                            queue: None,
                        }
                    }
                };
                let seconds = t
                    .runtime
                    .or_else(|| p.started_ts.map(|s| t.timestamp - s))
                    .filter(|s| s.is_finite())
                    .unwrap_or(0.0)
                    .clamp(0.0, MAX_RUNTIME.as_secs_f64());
                self.stats.completed = self.stats.completed.saturating_add(1);
                self.done.push(Done {
                    position: p.position(),
                    duration: Duration::from_secs_f64(seconds),
                    queue: p.queue,
                });
            }
        }
    }

    fn worker_event(&mut self, at: Duration, w: &WorkerEvent) {
        if !self.counts(&w.hostname) {
            return;
        }
        if w.kind == WorkerEventKind::Heartbeat {
            self.stats.heartbeats = self.stats.heartbeats.saturating_add(1);
            if self.beat_hosts.len() < MAX_WORKERS {
                self.beat_hosts.insert(w.hostname.clone());
            }
        }
        let known = self.workers.contains_key(&w.hostname);
        if !known && self.workers.len() >= MAX_WORKERS {
            return;
        }
        let tally = self
            .workers
            .entry(w.hostname.clone())
            .or_insert(WorkerTally {
                processed: w.processed,
                active: w.active,
                freq: w.freq,
                at,
            });
        let mut grown = 0;
        if known {
            // A node restarted under the same name counts again from 0.
            grown = if w.processed >= tally.processed {
                w.processed - tally.processed
            } else {
                w.processed
            };
            self.started = self.started.saturating_add(grown);
            let gap = at.saturating_sub(tally.at).as_secs_f64();
            if gap <= tally.freq * MAX_BEAT_GAP_FREQS {
                self.busy_seconds += tally.active as f64 * gap;
            }
            tally.processed = w.processed;
            tally.active = w.active;
            tally.freq = w.freq;
            tally.at = at;
        }
        if w.kind == WorkerEventKind::Offline {
            self.workers.remove(&w.hostname);
        }
        let points = self.beats.entry(w.hostname.clone()).or_default();
        let total = points.last().map_or(0, |p| p.1).saturating_add(grown);
        match points.last_mut() {
            Some(last) if self.beat_points >= MAX_BEAT_POINTS => *last = (at, total),
            _ => {
                points.push((at, total));
                self.beat_points += 1;
            }
        }
    }

    /// Tasks the workers started by `at`, each worker's count interpolated between its beats.
    fn started_at(&self, at: Duration) -> u64 {
        self.beats
            .values()
            .map(|points| interpolate(points, at))
            .fold(0u64, u64::saturating_add)
    }

    /// The heartbeat-measured mean task time: busy worker-process seconds (`active` between
    /// beats) over tasks started (the growth of `processed`).
    pub fn measured_duration(&self) -> Option<Duration> {
        if self.started == 0 || self.busy_seconds.is_nan() || self.busy_seconds <= 0.0 {
            return None;
        }
        Duration::try_from_secs_f64(self.busy_seconds / self.started as f64)
            .ok()
            .map(|d| d.min(MAX_RUNTIME))
    }

    /// Ends the recording at `end` and builds the trace with `mode` (see [`EventsMode`]).
    pub fn finish(self, end: Duration, mode: EventsMode) -> Recording {
        let events = match mode {
            EventsMode::On => true,
            EventsMode::Off => false,
            EventsMode::Auto => self.worker_task_events,
        };
        if events {
            self.finish_events(end)
        } else {
            self.finish_observations(mode)
        }
    }

    fn queue_of(&mut self, queue: Option<u16>) -> Option<String> {
        match queue.and_then(|i| self.queue_names.get(usize::from(i))) {
            Some(q) => {
                if self.settings.queues.is_empty() || self.settings.queues.contains(q) {
                    Some(q.clone())
                } else {
                    self.stats.other_queue = self.stats.other_queue.saturating_add(1);
                    None
                }
            }
            None => {
                self.stats.queue_assumed = self.stats.queue_assumed.saturating_add(1);
                Some(self.settings.default_queue.clone())
            }
        }
    }

    fn finish_events(mut self, end: Duration) -> Recording {
        let completed: Vec<Duration> = self.done.iter().map(|d| d.duration).collect();
        let mean = if completed.is_empty() {
            self.settings.default_duration
        } else {
            completed.iter().sum::<Duration>() / u32::try_from(completed.len()).unwrap_or(u32::MAX)
        };
        let mut pending: Vec<Pending> = std::mem::take(&mut self.pending).into_values().collect();
        pending.sort_by_key(|p| p.seq);
        for p in pending {
            if self.done.len() >= self.settings.max_tasks {
                break;
            }
            let duration = match p.started_at {
                Some(s) => {
                    self.stats.running_at_end = self.stats.running_at_end.saturating_add(1);
                    end.saturating_sub(s)
                }
                None => {
                    if p.sent_at.is_none() && p.receipt.is_none() {
                        continue;
                    }
                    self.stats.waiting_at_end = self.stats.waiting_at_end.saturating_add(1);
                    mean
                }
            };
            self.done.push(Done {
                position: p.position(),
                duration,
                queue: p.queue,
            });
        }
        let fifo = self.fifo_curve();
        let done = std::mem::take(&mut self.done);
        let mut arrivals = Vec::with_capacity(done.len());
        for d in done {
            let Some(queue) = self.queue_of(d.queue) else {
                continue;
            };
            let at = match d.position {
                Position::Sent(at) => at,
                Position::BeforeStart => Duration::ZERO,
                Position::Receipt(i) => {
                    let received = self.receipts.get(i).copied().unwrap_or(end);
                    fifo_arrival(&fifo, i as u64 + 1).map_or(received, |a| a.min(received))
                }
            };
            arrivals.push(Arrival {
                at: round_ms(at),
                count: 1,
                duration: round_ms(d.duration),
                queue,
            });
        }
        let trace = Trace::new(coalesce(arrivals));
        let s = &self.stats;
        let mut notes = vec![
            "mode: task events (Celery workers run with -E)".to_string(),
            "duration: task-succeeded's runtime, else task-started to task-failed/retried on the worker's clock".to_string(),
            if self.samples.is_empty() {
                "arrival: task-sent when the publisher sends it (task_send_sent_event), else task-received (no backlog was observed: late where the queue had a backlog)".to_string()
            } else {
                "arrival: task-sent when the publisher sends it (task_send_sent_event), else when the queue's cumulative arrivals (ready + received) reached the task (FIFO), at most its task-received".to_string()
            },
            format!(
                "tasks: {} completed, {} still running at the end (duration so far: a lower bound), {} waiting at the end (mean duration {:.3} s), {} received before the start (put at 0)",
                s.completed,
                s.running_at_end,
                s.waiting_at_end,
                mean.as_secs_f64(),
                s.before_start
            ),
        ];
        if s.queue_assumed > 0 {
            notes.push(format!(
                "queue: task-received names no queue; {} task(s) without task-sent recorded on {:?}",
                s.queue_assumed, self.settings.default_queue
            ));
        }
        if s.other_queue > 0 {
            notes.push(format!(
                "{} task(s) of other queues left out",
                s.other_queue
            ));
        }
        let silent: Vec<&String> = self.beat_hosts.difference(&self.task_hosts).collect();
        if !silent.is_empty() {
            notes.push(format!(
                "warning: {} worker(s) sent heartbeats but no task events (not run with -E?): their tasks are missing: {}",
                silent.len(),
                silent.iter().take(10).map(|h| h.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        if !self.worker_task_events {
            notes.push("warning: no worker sent a task event: run the workers with -E (or worker_send_task_events = True)".into());
        }
        self.limit_notes(&mut notes);
        Recording {
            trace,
            mode: RecordedMode::TaskEvents,
            stats: self.stats,
            notes,
        }
    }

    fn limit_notes(&self, notes: &mut Vec<String>) {
        let s = &self.stats;
        if s.forgotten > 0 {
            notes.push(format!(
                "warning: {} task(s) in progress forgotten (more than {} tracked at once)",
                s.forgotten, self.settings.max_tracked
            ));
        }
        if s.over_limit > 0 {
            notes.push(format!(
                "warning: recording stopped at {} tasks; {} later event(s) not recorded",
                self.settings.max_tasks, s.over_limit
            ));
        }
        if s.undecodable > 0 {
            notes.push(format!("{} undecodable event(s) ignored", s.undecodable));
        }
    }

    /// `(time, cumulative arrivals)` at every observation: ready + received, never decreasing.
    fn fifo_curve(&self) -> Vec<(Duration, u64)> {
        let mut curve = Vec::with_capacity(self.samples.len());
        let mut high = 0u64;
        for s in &self.samples {
            high = high.max(s.ready.saturating_add(s.receipts));
            curve.push((s.at, high));
        }
        curve
    }

    fn finish_observations(self, mode: EventsMode) -> Recording {
        let heartbeats = self.stats.heartbeats > 0;
        let measured = self.measured_duration();
        let duration = measured.unwrap_or(self.settings.default_duration);
        let use_outstanding = self.samples.iter().all(|s| s.outstanding.is_some());
        let mut arrivals = Vec::new();
        let mut push = |at: Duration, n: u64| {
            let mut n = n;
            while n > 0 {
                let count = u32::try_from(n).unwrap_or(u32::MAX);
                arrivals.push(Arrival {
                    at: round_ms(at),
                    count,
                    duration: round_ms(duration),
                    queue: self.settings.default_queue.clone(),
                });
                n -= u64::from(count);
            }
        };
        let level_of = |s: &Sample| {
            let waiting = if use_outstanding {
                s.outstanding.unwrap_or(s.ready)
            } else {
                s.ready
            };
            if heartbeats {
                waiting.saturating_add(self.started_at(s.at))
            } else {
                waiting
            }
        };
        // With heartbeats the level is the cumulative arrivals: taken as never decreasing,
        // and never above the last reading (the interpolated beats may run ahead of it).
        let last_level = self.samples.last().map_or(0, level_of);
        let mut previous: Option<(u64, u64)> = None;
        for s in &self.samples {
            let level = if heartbeats {
                level_of(s).min(last_level)
            } else {
                level_of(s)
            };
            match previous {
                None => {
                    // The backlog found at the start arrives at 0.
                    push(Duration::ZERO, level);
                    previous = Some((level, level));
                }
                Some((last, high)) => {
                    if heartbeats {
                        // Cumulative arrivals: never decreasing (heartbeats lag the backlog).
                        if level > high {
                            push(s.at, level - high);
                            previous = Some((level, level));
                        }
                    } else {
                        if level > last {
                            push(s.at, level - last);
                        }
                        previous = Some((level, high));
                    }
                }
            }
        }
        let trace = Trace::new(arrivals);
        let mut notes = vec![
            "mode: observations: AN ESTIMATE (no task events were used)".to_string(),
            if heartbeats {
                format!(
                    "arrivals: per observation, the growth of {} plus the tasks workers started (the heartbeats' processed, interpolated between beats), taken as never decreasing; heartbeats lag by up to their period (2 s); with acks_late, executing tasks count twice until they end",
                    if use_outstanding {
                        "ready + held messages"
                    } else {
                        "ready messages (held count unknown: prefetched tasks are missed until they start)"
                    }
                )
            } else if use_outstanding {
                "arrivals: increases of ready + held messages between observations (no heartbeats: tasks taken between two observations are missed, a lower bound)".to_string()
            } else {
                "arrivals: increases of ready messages between observations (no heartbeats: tasks taken between two observations are missed, a lower bound)".to_string()
            },
            match measured {
                Some(d) => format!(
                    "duration: {:.3} s for every task, the heartbeat-measured mean (busy worker-process seconds over tasks started)",
                    d.as_secs_f64()
                ),
                None => format!(
                    "duration: {:.3} s for every task, the default (nothing measured it)",
                    duration.as_secs_f64()
                ),
            },
            format!(
                "queue: every task on {:?}; {} observation(s), {} heartbeat(s)",
                self.settings.default_queue, self.stats.observations, self.stats.heartbeats
            ),
        ];
        if mode == EventsMode::Auto {
            notes.push("no worker sent task events; run the workers with -E for measured arrivals and durations".into());
        }
        self.limit_notes(&mut notes);
        Recording {
            trace,
            mode: RecordedMode::Observations {
                started_from_heartbeats: heartbeats,
                measured_duration: measured,
                duration,
            },
            stats: self.stats,
            notes,
        }
    }
}

/// The value of the step series `points` at `at`, linear between points, flat outside them.
fn interpolate(points: &[(Duration, u64)], at: Duration) -> u64 {
    let k = points.partition_point(|&(t, _)| t <= at);
    match (k.checked_sub(1).and_then(|i| points.get(i)), points.get(k)) {
        (None, Some(&(_, first))) => first,
        (Some(&(_, v)), None) => v,
        (Some(&(t0, v0)), Some(&(t1, v1))) => {
            let span = t1.saturating_sub(t0).as_secs_f64();
            if span <= 0.0 || v1 <= v0 {
                return v0;
            }
            let f = (at.saturating_sub(t0).as_secs_f64() / span).clamp(0.0, 1.0);
            v0.saturating_add(((v1 - v0) as f64 * f).round() as u64)
        }
        (None, None) => 0,
    }
}

/// The time the `n`-th task (1-based) arrived by the FIFO curve, interpolated between
/// observations; `None` past the curve's end.
fn fifo_arrival(curve: &[(Duration, u64)], n: u64) -> Option<Duration> {
    let (_, first) = *curve.first()?;
    if n <= first {
        return Some(Duration::ZERO);
    }
    let k = curve.partition_point(|&(_, a)| a < n);
    let &(t1, a1) = curve.get(k)?;
    let (t0, a0) = curve[k - 1];
    let fraction = (n - a0) as f64 / (a1 - a0) as f64;
    Some(t0 + (t1.saturating_sub(t0)).mul_f64(fraction.clamp(0.0, 1.0)))
}

/// `d` in seconds with three decimals (`d` is a whole number of milliseconds).
fn millis(d: Duration) -> String {
    let ms = d.as_millis();
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

fn round_ms(d: Duration) -> Duration {
    let ms = d.as_nanos().saturating_add(500_000) / 1_000_000;
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// Merges arrivals of the same time, duration and queue into one row.
fn coalesce(mut arrivals: Vec<Arrival>) -> Vec<Arrival> {
    arrivals.sort_by(|a, b| (a.at, a.duration, &a.queue).cmp(&(b.at, b.duration, &b.queue)));
    let mut out: Vec<Arrival> = Vec::with_capacity(arrivals.len());
    for a in arrivals {
        match out.last_mut() {
            Some(last)
                if last.at == a.at
                    && last.duration == a.duration
                    && last.queue == a.queue
                    && last.count < u32::MAX =>
            {
                last.count += 1;
            }
            _ => out.push(a),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: f64) -> Duration {
        Duration::from_secs_f64(x)
    }

    fn task(kind: TaskEventKind, uuid: &str, ts: f64) -> CeleryEvent {
        CeleryEvent::Task(TaskEvent {
            kind,
            uuid: uuid.into(),
            hostname: "w@a".into(),
            timestamp: ts,
            runtime: None,
            queue: None,
        })
    }

    fn succeeded(uuid: &str, ts: f64, runtime: f64) -> CeleryEvent {
        CeleryEvent::Task(TaskEvent {
            kind: TaskEventKind::Succeeded,
            uuid: uuid.into(),
            hostname: "w@a".into(),
            timestamp: ts,
            runtime: Some(runtime),
            queue: None,
        })
    }

    fn beat(host: &str, kind: WorkerEventKind, active: u64, processed: u64) -> CeleryEvent {
        CeleryEvent::Worker(WorkerEvent {
            kind,
            hostname: host.into(),
            active,
            processed,
            freq: 2.0,
            timestamp: 0.0,
        })
    }

    #[test]
    fn decodes_what_celery_5_7_sends() {
        // As seen on Redis (prefork pool): a task.multi list, then single events.
        let multi = br#"[{"hostname": "q@vm", "utcoffset": 0.0, "pid": 1, "clock": 3, "uuid": "u1", "name": "t.sleep", "args": "(1.0,)", "kwargs": "{}", "root_id": "u1", "parent_id": null, "retries": 0, "eta": null, "expires": null, "timestamp": 1796148576.84, "type": "task-received"},
            {"hostname": "q@vm", "uuid": "u1", "result": "1.0", "runtime": 1.0004, "timestamp": 1796148577.85, "type": "task-succeeded"},
            {"hostname": "q@vm", "uuid": "u1", "runtime": "x", "timestamp": 1, "type": "task-succeeded"}]"#;
        let events = decode_celery_events(multi);
        assert_eq!(events.len(), 3);
        let CeleryEvent::Task(r) = events[0].as_ref().unwrap() else {
            panic!("{events:?}")
        };
        assert_eq!(
            (r.kind, r.uuid.as_str(), r.queue.as_deref()),
            (TaskEventKind::Received, "u1", None)
        );
        let CeleryEvent::Task(ok) = events[1].as_ref().unwrap() else {
            panic!()
        };
        assert_eq!(ok.runtime, Some(1.0004));
        assert!(
            events[2].is_err(),
            "a bad runtime is that event's error only"
        );
        let sent = br#"{"type": "task-sent", "uuid": "u2", "hostname": "gen0@pub", "timestamp": 5.5, "queue": "emails", "exchange": "", "routing_key": "emails"}"#;
        let CeleryEvent::Task(t) = decode_celery_events(sent).remove(0).unwrap() else {
            panic!()
        };
        assert_eq!(
            (t.kind, t.queue.as_deref()),
            (TaskEventKind::Sent, Some("emails"))
        );
        let beat = br#"{"hostname": "q@vm", "freq": 2.0, "active": 1, "processed": 4, "timestamp": 1.0, "type": "worker-heartbeat"}"#;
        assert!(matches!(
            decode_celery_events(beat).remove(0).unwrap(),
            CeleryEvent::Worker(WorkerEvent { processed: 4, .. })
        ));
        assert_eq!(
            decode_celery_events(br#"{"type": "custom-thing"}"#)
                .remove(0)
                .unwrap(),
            CeleryEvent::Other
        );
        for bad in [
            &br#"{"type": "task-received", "timestamp": 1}"#[..],
            br#"{"type": "task-received", "uuid": "", "timestamp": 1}"#,
            br#"{"type": "task-received", "uuid": "u"}"#,
            br#"{"type": "task-succeeded", "uuid": "u", "timestamp": 1, "runtime": -1}"#,
            br#"{"type": "task-succeeded", "uuid": "u", "timestamp": 1, "runtime": 1e300}"#,
            br#"{"type": "task-succeeded", "uuid": "u", "timestamp": 1e999}"#,
            br#"{"uuid": "u"}"#,
            br#"7"#,
            br#"not json"#,
        ] {
            assert!(
                decode_celery_events(bad).iter().all(|r| r.is_err()),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(
            r#"{{"type": "task-received", "uuid": "{}", "timestamp": 1}}"#,
            "u".repeat(256)
        );
        assert!(decode_celery_events(long.as_bytes())[0].is_err());
        // A queue name a CSV cannot hold is unknown, not an error.
        let comma = br#"{"type": "task-sent", "uuid": "u", "timestamp": 1, "queue": "a,b", "routing_key": "a\nb"}"#;
        let CeleryEvent::Task(t) = decode_celery_events(comma).remove(0).unwrap() else {
            panic!()
        };
        assert_eq!(t.queue, None);
    }

    #[test]
    fn arrivals_follow_the_backlog_and_durations_the_runtime() {
        // 6 tasks published at once; one worker process reserves one at a time and runs each
        // for 2 s. Without the backlog, task-received would spread the arrivals over 12 s.
        let mut r = Recorder::new(RecorderSettings::default());
        r.observe(s(0.0), 0, None);
        for i in 0..6u32 {
            let t0 = 1.0 + 2.0 * f64::from(i);
            let id = format!("t{i}");
            r.apply(s(t0), &[task(TaskEventKind::Received, &id, 100.0 + t0)]);
            if i == 0 {
                r.observe(s(1.5), 5, None);
            }
            r.apply(s(t0), &[task(TaskEventKind::Started, &id, 100.0 + t0)]);
            r.apply(s(t0 + 2.0), &[succeeded(&id, 102.0 + t0, 2.0)]);
            r.observe(s(t0 + 2.0), 4u64.saturating_sub(u64::from(i)), None);
        }
        let rec = r.finish(s(14.0), EventsMode::Auto);
        assert_eq!(rec.mode, RecordedMode::TaskEvents);
        assert_eq!(rec.trace.tasks(), 6);
        assert_eq!(rec.trace.busy_time(), s(12.0));
        for a in rec.trace.arrivals() {
            assert!(
                a.at <= s(1.5),
                "{a:?}: all arrived between the first two observations"
            );
            assert_eq!(a.queue, "celery");
        }
        assert_eq!(rec.stats.queue_assumed, 6);
        let csv = rec.to_csv(&["celery-scale record".into()]);
        assert!(
            csv.starts_with("# celery-scale record\n# mode: task events"),
            "{csv}"
        );
        assert_eq!(Trace::from_csv(&csv).unwrap(), rec.trace);
    }

    #[test]
    fn sent_events_give_time_and_queue_and_batches_are_spread() {
        let settings = RecorderSettings {
            default_queue: "a".into(),
            queues: vec!["a".into(), "b".into()],
            ..RecorderSettings::default()
        };
        let mut r = Recorder::new(settings);
        let sent = |uuid: &str, queue: &str| {
            CeleryEvent::Task(TaskEvent {
                kind: TaskEventKind::Sent,
                uuid: uuid.into(),
                hostname: "publisher".into(),
                timestamp: 0.0,
                runtime: None,
                queue: Some(queue.into()),
            })
        };
        r.apply(s(1.0), &[sent("x", "b"), sent("y", "other")]);
        // One task.multi list received at 10 s: its events are placed by their timestamps.
        r.apply(
            s(10.0),
            &[
                task(TaskEventKind::Received, "x", 50.0),
                task(TaskEventKind::Received, "y", 50.0),
                task(TaskEventKind::Received, "z", 55.0),
                task(TaskEventKind::Started, "z", 55.0),
                task(TaskEventKind::Failed, "z", 58.0),
                succeeded("x", 58.0, 0.5),
                succeeded("y", 58.0, 0.5),
            ],
        );
        let rec = r.finish(s(20.0), EventsMode::On);
        let rows: Vec<(Duration, Duration, &str)> = rec
            .trace
            .arrivals()
            .iter()
            .map(|a| (a.at, a.duration, a.queue.as_str()))
            .collect();
        // x: sent at 1 s on b; z: received at 10 - 3 = 7 s (no backlog seen), failed after 3 s
        // on the worker's clock, on the default queue; y: another binding's queue, left out.
        assert_eq!(rows, vec![(s(1.0), s(0.5), "b"), (s(7.0), s(3.0), "a")]);
        assert_eq!(rec.stats.other_queue, 1);
    }

    #[test]
    fn tasks_in_progress_are_bounded_and_the_end_is_honest() {
        let settings = RecorderSettings {
            max_tracked: 3,
            default_duration: s(4.0),
            ..RecorderSettings::default()
        };
        let mut r = Recorder::new(settings);
        for i in 0..10 {
            r.apply(
                s(1.0),
                &[task(TaskEventKind::Received, &format!("t{i}"), 1.0)],
            );
        }
        assert_eq!(r.pending.len(), 3);
        assert_eq!(r.order.len(), 3);
        assert_eq!(r.stats().forgotten, 7);
        r.apply(s(2.0), &[task(TaskEventKind::Started, "t9", 2.0)]);
        // A task received before the recording began ends: an arrival at 0.
        r.apply(s(3.0), &[succeeded("old", 3.0, 1.5)]);
        let rec = r.finish(s(6.0), EventsMode::Auto);
        assert_eq!(rec.stats.running_at_end, 1);
        assert_eq!(rec.stats.waiting_at_end, 2);
        assert_eq!(rec.stats.before_start, 1);
        let mut rows: Vec<(Duration, u32, Duration)> = rec
            .trace
            .arrivals()
            .iter()
            .map(|a| (a.at, a.count, a.duration))
            .collect();
        rows.sort();
        // Waiting tasks get the completed tasks' mean (1.5 s); the running one what it ran.
        assert_eq!(
            rows,
            vec![
                (s(0.0), 1, s(1.5)),
                (s(1.0), 1, s(4.0)),
                (s(1.0), 2, s(1.5))
            ]
        );
        assert!(
            rec.notes
                .iter()
                .any(|n| n.contains("7 task(s) in progress forgotten"))
        );
    }

    #[test]
    fn observations_estimate_from_heartbeats_or_backlog_increases() {
        // Heartbeats: 5 ready at the start; 10 more arrive; the worker reserves 15 in total.
        let mut r = Recorder::new(RecorderSettings::default());
        r.apply(s(0.0), &[beat("w@a", WorkerEventKind::Heartbeat, 0, 100)]);
        r.observe(s(0.5), 5, None);
        r.apply(s(2.0), &[beat("w@a", WorkerEventKind::Heartbeat, 2, 105)]);
        r.observe(s(2.5), 10, None); // 10 new arrived, 5 started
        r.apply(s(4.0), &[beat("w@a", WorkerEventKind::Heartbeat, 2, 110)]);
        r.observe(s(4.5), 5, None);
        r.apply(s(6.0), &[beat("w@a", WorkerEventKind::Heartbeat, 2, 115)]);
        r.observe(s(6.5), 0, None);
        assert!(!r.heard_task_events());
        let rec = r.finish(s(7.0), EventsMode::Auto);
        assert_eq!(rec.trace.tasks(), 15);
        // Busy 2 processes x 4 s (+ 0 x 2 s) over 15 tasks.
        let RecordedMode::Observations {
            started_from_heartbeats,
            measured_duration,
            ..
        } = rec.mode
        else {
            panic!("{:?}", rec.mode)
        };
        assert!(started_from_heartbeats);
        let d = measured_duration.unwrap().as_secs_f64();
        assert!((d - 8.0 / 15.0).abs() < 1e-9, "{d}");
        assert!(rec.notes[0].contains("ESTIMATE"));
        // Without heartbeats (SQS): increases of ready + held only, the default duration.
        let mut r = Recorder::new(RecorderSettings::default());
        for (t, ready, held) in [(0.0, 2, 1), (1.0, 5, 1), (2.0, 3, 2), (3.0, 6, 2)] {
            r.observe(s(t), ready, Some(ready + held));
        }
        let rec = r.finish(s(4.0), EventsMode::Off);
        assert_eq!(rec.trace.tasks(), 3 + 3 + 3);
        assert!(rec.trace.arrivals().iter().all(|a| a.duration == s(10.0)));
    }

    #[test]
    fn a_worker_restart_and_offline_are_counted_once() {
        let mut r = Recorder::new(RecorderSettings {
            hostnames: vec!["w@*".into()],
            ..RecorderSettings::default()
        });
        r.observe(s(0.0), 0, None);
        r.apply(s(0.0), &[beat("w@a", WorkerEventKind::Online, 0, 0)]);
        r.apply(s(2.0), &[beat("w@a", WorkerEventKind::Heartbeat, 1, 3)]);
        r.apply(
            s(2.0),
            &[beat("other@b", WorkerEventKind::Heartbeat, 1, 1000)],
        );
        r.apply(s(3.0), &[beat("w@a", WorkerEventKind::Offline, 0, 4)]);
        r.apply(s(5.0), &[beat("w@a", WorkerEventKind::Online, 0, 0)]);
        r.apply(s(7.0), &[beat("w@a", WorkerEventKind::Heartbeat, 0, 2)]);
        r.observe(s(8.0), 0, None);
        let rec = r.finish(s(8.0), EventsMode::Off);
        assert_eq!(rec.trace.tasks(), 6);
    }

    #[test]
    fn reservations_are_interpolated_between_beats() {
        let points = [(s(2.0), 0), (s(4.0), 4), (s(6.0), 4)];
        assert_eq!(interpolate(&points, s(1.0)), 0);
        assert_eq!(interpolate(&points, s(3.0)), 2);
        assert_eq!(interpolate(&points, s(4.0)), 4);
        assert_eq!(interpolate(&points, s(9.0)), 4);
        assert_eq!(interpolate(&[], s(9.0)), 0);
        // A worker that reserves steadily: the late beat's count is spread back over the
        // interval, so the arrivals are not put at the next beat.
        let mut r = Recorder::new(RecorderSettings::default());
        r.apply(s(0.0), &[beat("w@a", WorkerEventKind::Heartbeat, 0, 0)]);
        r.observe(s(0.0), 0, None);
        // 10 tasks published at 0.5 s; 2 started at once, then 1 every second.
        for (t, ready) in [(1.0, 8), (2.0, 7), (3.0, 6), (4.0, 5)] {
            r.observe(s(t), ready, None);
        }
        r.apply(s(4.0), &[beat("w@a", WorkerEventKind::Heartbeat, 2, 5)]);
        let rec = r.finish(s(4.0), EventsMode::Off);
        assert_eq!(rec.trace.tasks(), 10);
        assert!(rec.trace.end() <= s(2.0), "{:?}", rec.trace);
    }

    #[test]
    fn fifo_curve_interpolates() {
        let curve = [(s(0.0), 2), (s(1.0), 2), (s(2.0), 12)];
        assert_eq!(fifo_arrival(&curve, 1), Some(s(0.0)));
        assert_eq!(fifo_arrival(&curve, 3), Some(s(1.1)));
        assert_eq!(fifo_arrival(&curve, 12), Some(s(2.0)));
        assert_eq!(fifo_arrival(&curve, 13), None);
        assert_eq!(fifo_arrival(&[], 1), None);
        assert_eq!(round_ms(s(1.0004)), s(1.0));
        assert_eq!(round_ms(s(1.0006)), s(1.001));
        assert_eq!(millis(Duration::from_millis(4137)), "4.137");
        assert_eq!(millis(Duration::from_millis(7)), "0.007");
    }
}
