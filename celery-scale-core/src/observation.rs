//! What a [`QueueSource`](crate::QueueSource) sees: the backlog of a set of queues at one instant.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The backlog of one binding's queues, observed at [`Observation::at`].
///
/// Counts are in messages (Celery tasks). Fields a broker cannot tell are `None`, never a guess:
/// Redis without heartbeats cannot see executing tasks; RabbitMQ's passive declare cannot see
/// unacknowledged ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Messages waiting in the queues, not yet taken by any worker (all priorities).
    pub ready: u64,
    /// Messages taken by workers but not acknowledged: prefetched, ETA/countdown tasks held by
    /// workers, and (with `acks_late`) executing tasks. `None` when the source cannot tell.
    pub in_flight: Option<u64>,
    /// Tasks executing right now, from Celery's worker heartbeats (`active`). `None` without them.
    pub executing: Option<u64>,
    /// Celery worker nodes whose heartbeats are current. `None` without heartbeats.
    pub live_workers: Option<u32>,
    /// Measured tasks completed per second per worker process, from heartbeats. `None` when
    /// not measured yet.
    pub throughput_per_worker: Option<f64>,
    /// Age of the oldest ready message, when the message carries its publish time (or a past ETA).
    pub oldest_age: Option<Duration>,
    /// Consumers attached to the queues, when the broker says so.
    pub consumers: Option<u32>,
    /// Set when the source watches Celery's worker events but cannot tell the worker figures
    /// now (the feed is down or warming up, or a worker went silent): `executing`,
    /// `live_workers` and `throughput_per_worker` are then `None`, and no layer may read that
    /// as idle. `None` when the figures are known, or when the source does not watch worker
    /// events at all (turned off by configuration).
    pub workers_unknown: Option<WorkersUnknown>,
    /// The live worker nodes and what each executes, when the worker figures are known (empty
    /// otherwise): what scale-in protection maps to units.
    pub worker_nodes: Vec<crate::celery_events::WorkerNode>,
    /// The same numbers per queue.
    pub queues: Vec<QueueDepth>,
    /// When the observation was taken (the loop's clock).
    pub at: Instant,
}

/// Why the worker figures of an observation are unknown, and the little that is known anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkersUnknown {
    /// Why, in words (e.g. `worker-event feed warming up (1s of 6s)`, `1 worker silent without
    /// worker-offline: celery@a (12s)`).
    pub why: String,
    /// Tasks the workers heard last reported executing, silent ones included: a floor for the
    /// executing count, never the count itself (0 when nothing was heard).
    pub executing_at_least: u64,
}

impl WorkersUnknown {
    /// Unknown for `why`, with nothing known of the executing tasks.
    pub fn new(why: impl Into<String>) -> Self {
        WorkersUnknown {
            why: why.into(),
            executing_at_least: 0,
        }
    }
}

impl Observation {
    /// An observation of `ready` messages at `at`, with nothing else known.
    pub fn new(ready: u64, at: Instant) -> Self {
        Observation {
            ready,
            in_flight: None,
            executing: None,
            live_workers: None,
            throughput_per_worker: None,
            oldest_age: None,
            consumers: None,
            workers_unknown: None,
            worker_nodes: Vec::new(),
            queues: Vec::new(),
            at,
        }
    }

    /// Builds an observation from per-queue depths: sums ready and in-flight (in-flight is known
    /// only if every queue knows it), takes the oldest age and sums consumers where known.
    pub fn from_queues(queues: Vec<QueueDepth>, at: Instant) -> Self {
        let ready = queues
            .iter()
            .fold(0u64, |acc, q| acc.saturating_add(q.ready));
        let in_flight = queues
            .iter()
            .map(|q| q.in_flight)
            .try_fold(0u64, |acc, v| v.map(|v| acc.saturating_add(v)));
        let oldest_age = queues.iter().filter_map(|q| q.oldest_age).max();
        let consumers = queues
            .iter()
            .filter_map(|q| q.consumers)
            .reduce(|a, b| a.saturating_add(b));
        Observation {
            ready,
            in_flight: if queues.is_empty() { None } else { in_flight },
            oldest_age,
            consumers,
            queues,
            ..Observation::new(0, at)
        }
    }

    /// Work the fleet has to do: ready messages plus the larger of in-flight and executing.
    ///
    /// With Celery's default early ack an executing task is in neither the queue nor the unacked
    /// set, and with `acks_late` it is in both `in_flight` and `executing`; taking the larger of
    /// the two never double counts and never misses the executing tasks by more than the
    /// prefetched buffer.
    ///
    /// While the worker figures are unknown the executing tasks count at their known floor
    /// ([`WorkersUnknown::executing_at_least`]).
    ///
    /// While the held count is unknown (`in_flight` is `None`) it adds nothing: the work rests
    /// on the ready and executing tasks. A prefetched message waits only behind busy pool
    /// processes, which the executing count keeps; a countdown/ETA task held by an idle worker
    /// goes back to the broker when that worker shuts down warm (kombu restores Redis's unacked
    /// messages on channel close; RabbitMQ requeues a closed channel's unacknowledged ones).
    /// See [`InFlightFloor`](crate::layer::InFlightFloor); scale to zero still waits for a known
    /// held count ([`Activation`](crate::layer::Activation)).
    pub fn outstanding(&self) -> u64 {
        self.ready
            .saturating_add(self.in_flight.unwrap_or(0).max(self.executing_at_least()))
    }

    /// The executing tasks: the count when known, else the floor known while the worker figures
    /// are unknown, else 0 (the source does not watch worker events).
    pub fn executing_at_least(&self) -> u64 {
        self.executing.unwrap_or_else(|| {
            self.workers_unknown
                .as_ref()
                .map_or(0, |u| u.executing_at_least)
        })
    }

    /// Whether the source watches worker events but cannot tell the figures now: no scale-in
    /// may then rest on the executing count.
    pub fn workers_are_unknown(&self) -> bool {
        self.workers_unknown.is_some()
    }

    /// How old the observation is at `now`.
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.at)
    }

    /// Adds worker-heartbeat figures (see [`crate::celery_events::WorkerRegistry`]).
    pub fn with_workers(mut self, workers: &crate::celery_events::WorkerSummary) -> Self {
        self.executing = Some(workers.executing);
        self.live_workers = Some(workers.live_workers);
        self.throughput_per_worker = workers.throughput_per_worker;
        self.worker_nodes = workers.nodes.clone();
        self.workers_unknown = None;
        self
    }

    /// Adds what a worker-event feed says now (see
    /// [`WorkerFeed::reading`](crate::celery_events::WorkerFeed::reading)): the figures when
    /// known, else why they are not (and the figures stay `None`). Call it after `in_flight` is
    /// set: held messages with no worker heard also make the figures unknown.
    pub fn with_worker_reading(
        mut self,
        reading: Result<crate::celery_events::WorkerSummary, WorkersUnknown>,
    ) -> Self {
        // Messages are held but no worker is heard: whoever holds them is silent (a busy solo
        // pool, a blocked event loop, a worker a fresh feed has not heard yet), so the figures
        // are unknown, not zero.
        let reading = match reading {
            Ok(summary) if summary.live_workers == 0 && self.in_flight.is_some_and(|n| n > 0) => {
                Err(WorkersUnknown::new(format!(
                    "{} message(s) held by workers but no worker heard: a busy solo pool or a \
                     blocked event loop sends no heartbeat",
                    self.in_flight.unwrap_or(0)
                )))
            }
            other => other,
        };
        match reading {
            Ok(summary) => self.with_workers(&summary),
            Err(unknown) => {
                self.set_workers_unknown(unknown);
                self
            }
        }
    }

    /// Makes the worker figures unknown for `unknown`'s reason: `executing`, `live_workers` and
    /// `throughput_per_worker` become `None`.
    pub fn set_workers_unknown(&mut self, unknown: WorkersUnknown) {
        self.executing = None;
        self.live_workers = None;
        self.throughput_per_worker = None;
        self.worker_nodes.clear();
        self.workers_unknown = Some(unknown);
    }
}

/// The depth of one queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueDepth {
    /// The Celery queue name (without any key prefix or priority suffix).
    pub queue: String,
    /// Ready messages over all priorities.
    pub ready: u64,
    /// Messages held by workers, when known.
    pub in_flight: Option<u64>,
    /// Age of the oldest ready message, when known.
    #[serde(default, with = "humantime_serde")]
    pub oldest_age: Option<Duration>,
    /// Consumers, when known.
    pub consumers: Option<u32>,
}

impl QueueDepth {
    /// A queue with `ready` messages and nothing else known.
    pub fn new(queue: impl Into<String>, ready: u64) -> Self {
        QueueDepth {
            queue: queue.into(),
            ready,
            in_flight: None,
            oldest_age: None,
            consumers: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_queues_sums_and_keeps_unknowns_unknown() {
        let now = Instant::now();
        let mut a = QueueDepth::new("a", 3);
        a.in_flight = Some(2);
        a.oldest_age = Some(Duration::from_secs(5));
        let b = QueueDepth::new("b", 4);
        let obs = Observation::from_queues(vec![a.clone(), b], now);
        assert_eq!(obs.ready, 7);
        assert_eq!(obs.in_flight, None, "b does not know its in-flight count");
        assert_eq!(obs.oldest_age, Some(Duration::from_secs(5)));

        let mut b = QueueDepth::new("b", 4);
        b.in_flight = Some(1);
        let obs = Observation::from_queues(vec![a, b], now);
        assert_eq!(obs.in_flight, Some(3));
        assert_eq!(obs.outstanding(), 10);
    }

    #[test]
    fn held_messages_with_no_worker_heard_are_unknown_not_zero() {
        let idle = crate::celery_events::WorkerSummary::default();
        let mut obs = Observation::new(0, Instant::now());
        obs.in_flight = Some(8);
        let obs = obs.with_worker_reading(Ok(idle.clone()));
        assert_eq!(obs.executing, None);
        assert!(obs.workers_are_unknown(), "{obs:?}");
        // Nothing held and nobody heard: known idle.
        let mut obs = Observation::new(0, Instant::now());
        obs.in_flight = Some(0);
        let obs = obs.with_worker_reading(Ok(idle));
        assert_eq!(obs.executing, Some(0));
    }

    #[test]
    fn outstanding_takes_larger_of_in_flight_and_executing() {
        let mut obs = Observation::new(5, Instant::now());
        obs.in_flight = Some(8);
        obs.executing = Some(2);
        assert_eq!(obs.outstanding(), 13);
        obs.in_flight = Some(0);
        assert_eq!(obs.outstanding(), 7);
    }
}
