//! The decision record: what one tick saw, decided and did. Serializable, logged through
//! `tracing`, counted in `metrics`, and handed to an optional [`DecisionSink`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::{
    Capacity, CapacityUnit, Error, ErrorKind, Observation, WorkersUnknown, policy::Decision,
};

/// An error as recorded: its kind, whether it is transient, and its message (no credentials:
/// backends never put them in messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedError {
    /// The kind.
    pub kind: ErrorKind,
    /// Whether the loop retries it with backoff.
    pub transient: bool,
    /// The error and its sources, joined with `: `.
    pub message: String,
}

impl From<&Error> for RecordedError {
    fn from(e: &Error) -> Self {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            let text = s.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = s.source();
        }
        RecordedError {
            kind: e.kind(),
            transient: e.is_transient(),
            message,
        }
    }
}

/// The observation as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObservedRecord {
    /// Ready messages.
    pub ready: u64,
    /// In-flight messages, when known.
    pub in_flight: Option<u64>,
    /// Executing tasks, when known.
    pub executing: Option<u64>,
    /// Live Celery workers, when known.
    pub live_workers: Option<u32>,
    /// Measured throughput per worker (tasks/s), when known.
    pub throughput_per_worker: Option<f64>,
    /// Age of the oldest ready message, when known.
    #[serde(with = "humantime_serde")]
    pub oldest_age: Option<Duration>,
    /// Consumers, when known.
    pub consumers: Option<u32>,
    /// Why the worker figures are unknown, when the source watches them and cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_unknown: Option<WorkersUnknown>,
    /// How old the observation was when the decision was made.
    #[serde(with = "humantime_serde")]
    pub age: Duration,
    /// Ready messages per queue.
    pub queues: Vec<(String, u64)>,
}

impl ObservedRecord {
    /// Records `obs`, which was `age` old at decision time.
    pub fn new(obs: &Observation, age: Duration) -> Self {
        ObservedRecord {
            ready: obs.ready,
            in_flight: obs.in_flight,
            executing: obs.executing,
            live_workers: obs.live_workers,
            throughput_per_worker: obs.throughput_per_worker,
            oldest_age: obs.oldest_age,
            consumers: obs.consumers,
            workers_unknown: obs.workers_unknown.clone(),
            age,
            queues: obs
                .queues
                .iter()
                .map(|q| (q.queue.clone(), q.ready))
                .collect(),
        }
    }
}

/// The target's capacity as recorded, in its units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityRecord {
    /// The unit.
    pub unit: CapacityUnit,
    /// Worker processes per unit.
    pub workers_per_unit: u32,
    /// Desired, running and pending units.
    #[serde(flatten)]
    pub units: Capacity,
}

/// What the tick did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Outcome {
    /// The desired count already matches: no call was made.
    Unchanged {
        /// Desired units.
        units: u32,
    },
    /// The desired count was set.
    Set {
        /// Desired units before.
        from: u32,
        /// Units asked for.
        to: u32,
        /// Units the target took (differs when it clamped).
        applied: u32,
        /// The target's note on a clamp.
        note: Option<String>,
    },
    /// Dry run: the desired count would have been set.
    WouldSet {
        /// Desired units now.
        from: u32,
        /// Units that would have been asked for.
        to: u32,
    },
    /// Nothing was decided or set; `why` says what was missing.
    Held {
        /// The reason.
        why: String,
    },
    /// Another process leads this binding (or no lease could be held): decided for the
    /// record, nothing set or protected.
    Follower {
        /// Who leads, or why no lease is held.
        why: String,
    },
    /// Setting the desired count failed.
    SetFailed {
        /// Units asked for.
        to: u32,
        /// The failure.
        error: RecordedError,
    },
}

impl Outcome {
    /// A short label (`unchanged`, `set`, `would_set`, `held`, `follower`, `set_failed`) for
    /// metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Unchanged { .. } => "unchanged",
            Outcome::Set { .. } => "set",
            Outcome::WouldSet { .. } => "would_set",
            Outcome::Held { .. } => "held",
            Outcome::Follower { .. } => "follower",
            Outcome::SetFailed { .. } => "set_failed",
        }
    }
}

/// Everything one tick of one binding saw, decided and did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// The binding's name.
    pub binding: String,
    /// Wall-clock time of the tick.
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
    /// The observation, when one succeeded (even if stale).
    pub observation: Option<ObservedRecord>,
    /// Why the observation is not used: it failed, or it is stale.
    pub observation_error: Option<RecordedError>,
    /// Failed or stale observations in a row, including this one.
    pub consecutive_failures: u32,
    /// The target's capacity, when it could be read.
    pub capacity: Option<CapacityRecord>,
    /// Why the capacity could not be read.
    pub capacity_error: Option<RecordedError>,
    /// The policy's decision, in workers, with each stage.
    pub decision: Option<Decision>,
    /// The decision in the target's units.
    pub desired_units: Option<u32>,
    /// What was done.
    pub outcome: Outcome,
    /// What scale-in protection planned and did, when the target protects units and the tick
    /// looked at them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<crate::protection::ProtectionRecord>,
    /// Who leads the binding, when it runs with a lease (several copies of the daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leadership: Option<crate::lease::LeadershipRecord>,
    /// Whether this binding runs dry.
    pub dry_run: bool,
    /// How long the tick took.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// When the next tick is due (longer than the interval while backing off).
    #[serde(with = "humantime_serde")]
    pub next_tick_in: Duration,
}

impl DecisionRecord {
    /// The decision's reason in one sentence, or what held the tick.
    pub fn reason(&self) -> String {
        match (&self.outcome, &self.decision) {
            (Outcome::Held { why } | Outcome::Follower { why }, _) => why.clone(),
            (_, Some(d)) => d.reason().to_string(),
            (_, None) => String::new(),
        }
    }
}

/// Receives every decision record (for an audit log, a UI, a test).
pub trait DecisionSink: Send + Sync + std::fmt::Debug + 'static {
    /// Called once per tick, after the tick.
    fn record(&self, record: &DecisionRecord);
}

/// A sink that keeps every record in memory.
#[derive(Debug, Clone, Default)]
pub struct RecordLog {
    records: Arc<Mutex<Vec<DecisionRecord>>>,
}

impl RecordLog {
    /// An empty log.
    pub fn new() -> Self {
        RecordLog::default()
    }

    /// The records so far.
    pub fn records(&self) -> Vec<DecisionRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl DecisionSink for RecordLog {
    fn record(&self, record: &DecisionRecord) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record.clone());
    }
}
