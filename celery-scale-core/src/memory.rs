//! In-memory backends: a [`MemoryQueue`] that is a [`QueueSource`] and a [`MemoryScaler`] that is a
//! [`Scaler`]. First-class: the simulator, the no-services example and the tests run on them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::celery_events::WorkerNode;
use crate::protection::{Unit, UnitProtection};
use crate::{
    Capacity, CapacityUnit, Error, Observation, QueueDepth, QueueSource, Result, Scaler,
    SetOutcome, WorkersPerUnit, WorkersUnknown,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked mid-update of plain counters.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A message in a [`MemoryQueue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryMessage {
    /// Unique id, in publish order.
    pub id: u64,
    /// The queue it was published to.
    pub queue: String,
    /// When it was published.
    pub published_at: Instant,
}

#[derive(Debug, Default)]
struct QueueState {
    queues: BTreeMap<String, VecDeque<MemoryMessage>>,
    in_flight: HashMap<u64, MemoryMessage>,
    executing: Option<u64>,
    workers_unknown: Option<WorkersUnknown>,
    worker_nodes: Option<Vec<WorkerNode>>,
    next_id: u64,
    down: bool,
}

/// An in-memory broker with Celery's semantics: publish, take (a worker reserves a message,
/// which is then in flight), ack, and requeue (a warm shutdown gives reserved messages back).
///
/// Cheap to clone: clones share the same queues.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use celery_scale_core::{MemoryQueue, QueueSource};
/// let broker = MemoryQueue::new();
/// broker.publish_n("celery", 3);
/// let msg = broker.take("celery").unwrap();
/// let obs = broker.observe().await.unwrap();
/// assert_eq!((obs.ready, obs.in_flight), (2, Some(1)));
/// broker.ack(msg.id);
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryQueue {
    state: Arc<Mutex<QueueState>>,
}

impl MemoryQueue {
    /// An empty broker.
    pub fn new() -> Self {
        MemoryQueue::default()
    }

    /// Declares `queue` so that it is observed (as 0) before anything is published to it.
    pub fn declare(&self, queue: &str) {
        lock(&self.state)
            .queues
            .entry(queue.to_string())
            .or_default();
    }

    /// Publishes one message to `queue` and returns it.
    pub fn publish(&self, queue: &str) -> MemoryMessage {
        let mut s = lock(&self.state);
        s.next_id += 1;
        let msg = MemoryMessage {
            id: s.next_id,
            queue: queue.to_string(),
            published_at: Instant::now(),
        };
        s.queues
            .entry(queue.to_string())
            .or_default()
            .push_back(msg.clone());
        msg
    }

    /// Publishes `n` messages to `queue`.
    pub fn publish_n(&self, queue: &str, n: u64) {
        for _ in 0..n {
            self.publish(queue);
        }
    }

    /// A worker takes the oldest message of `queue`; it is in flight until acked or requeued.
    pub fn take(&self, queue: &str) -> Option<MemoryMessage> {
        let mut s = lock(&self.state);
        let msg = s.queues.get_mut(queue)?.pop_front()?;
        s.in_flight.insert(msg.id, msg.clone());
        Some(msg)
    }

    /// Acknowledges a taken message; returns whether it was in flight.
    pub fn ack(&self, id: u64) -> bool {
        lock(&self.state).in_flight.remove(&id).is_some()
    }

    /// Puts a taken message back at the head of its queue (as kombu restores unacked messages).
    pub fn requeue(&self, id: u64) -> bool {
        let mut s = lock(&self.state);
        match s.in_flight.remove(&id) {
            Some(msg) => {
                s.queues
                    .entry(msg.queue.clone())
                    .or_default()
                    .push_front(msg);
                true
            }
            None => false,
        }
    }

    /// Drops every message of `queue`, ready and in flight.
    pub fn purge(&self, queue: &str) {
        let mut s = lock(&self.state);
        if let Some(q) = s.queues.get_mut(queue) {
            q.clear();
        }
        s.in_flight.retain(|_, m| m.queue != queue);
    }

    /// Sets the executing-task count the observation reports (as worker heartbeats would).
    pub fn set_executing(&self, executing: Option<u64>) {
        let mut s = lock(&self.state);
        s.executing = executing;
        s.worker_nodes = None;
        if executing.is_some() {
            s.workers_unknown = None;
        }
    }

    /// Sets the live worker nodes observations report (as worker heartbeats would): the
    /// executing count is their sum and the live-worker count their number.
    pub fn set_worker_nodes(&self, nodes: Vec<WorkerNode>) {
        let mut s = lock(&self.state);
        s.executing = Some(
            nodes
                .iter()
                .fold(0u64, |a, n| a.saturating_add(n.executing)),
        );
        s.worker_nodes = Some(nodes);
        s.workers_unknown = None;
    }

    /// Makes observations say the worker figures are unknown (as a worker-event feed that is
    /// down, warming up or hearing a silent worker does), or known again with `None`.
    /// Unknown clears the executing count.
    pub fn set_workers_unknown(&self, unknown: Option<WorkersUnknown>) {
        let mut s = lock(&self.state);
        if unknown.is_some() {
            s.executing = None;
            s.worker_nodes = None;
        }
        s.workers_unknown = unknown;
    }

    /// Makes every observation fail with [`Error::Unavailable`] (`true`) or succeed again.
    pub fn set_down(&self, down: bool) {
        lock(&self.state).down = down;
    }

    /// Ready messages in `queue`.
    pub fn ready(&self, queue: &str) -> u64 {
        lock(&self.state)
            .queues
            .get(queue)
            .map_or(0, |q| q.len() as u64)
    }

    /// Ids of the messages of `queue` that are in flight.
    pub fn in_flight_ids(&self, queue: &str) -> Vec<u64> {
        let s = lock(&self.state);
        let mut ids: Vec<u64> = s
            .in_flight
            .values()
            .filter(|m| m.queue == queue)
            .map(|m| m.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Messages in flight over all queues.
    pub fn in_flight(&self) -> u64 {
        lock(&self.state).in_flight.len() as u64
    }
}

#[async_trait]
impl QueueSource for MemoryQueue {
    async fn observe(&self) -> Result<Observation> {
        let s = lock(&self.state);
        if s.down {
            return Err(Error::Unavailable {
                backend: "memory",
                message: "the in-memory broker is marked down".into(),
                source: None,
            });
        }
        let now = Instant::now();
        let mut held: HashMap<&str, u64> = HashMap::new();
        for m in s.in_flight.values() {
            *held.entry(m.queue.as_str()).or_default() += 1;
        }
        let queues = s
            .queues
            .iter()
            .map(|(name, q)| QueueDepth {
                queue: name.clone(),
                ready: q.len() as u64,
                in_flight: Some(held.get(name.as_str()).copied().unwrap_or(0)),
                oldest_age: q
                    .front()
                    .map(|m| now.saturating_duration_since(m.published_at)),
                consumers: None,
            })
            .collect();
        let mut obs = Observation::from_queues(queues, now);
        obs.in_flight = Some(s.in_flight.len() as u64);
        obs.executing = s.executing;
        obs.workers_unknown = s.workers_unknown.clone();
        if let Some(nodes) = &s.worker_nodes {
            obs.live_workers = Some(u32::try_from(nodes.len()).unwrap_or(u32::MAX));
            obs.worker_nodes = nodes.clone();
        }
        Ok(obs)
    }
}

#[derive(Debug)]
struct MemoryUnit {
    id: String,
    started: Instant,
    protected: bool,
}

#[derive(Debug)]
struct ScalerState {
    /// Every unit asked for and not stopped, oldest first.
    units: Vec<MemoryUnit>,
    desired: u32,
    next_id: u64,
    sets: Vec<(Instant, u32)>,
    stopped: Vec<String>,
    down: bool,
    protection: bool,
}

impl ScalerState {
    fn add(&mut self, started: Instant) {
        self.units.push(MemoryUnit {
            id: format!("unit-{}", self.next_id),
            started,
            protected: false,
        });
        self.next_id += 1;
    }

    /// Stops units above the desired count, newest first, protected ones never (as ECS and
    /// Auto Scaling do: a protected unit stays until released).
    fn reconcile(&mut self) {
        while self.units.len() > self.desired as usize {
            let Some(i) = self.units.iter().rposition(|u| !u.protected) else {
                break;
            };
            let unit = self.units.remove(i);
            self.stopped.push(unit.id);
        }
    }
}

/// An in-memory compute target: records every set, and brings new units into service after an
/// optional start-up delay (they are `pending` until then). Scale-in stops the newest units
/// first. With [`MemoryScaler::with_protection`] it also offers [`UnitProtection`]: protected
/// units are never stopped, so a scale-in stops the newest unprotected ones.
///
/// Cheap to clone: clones share the same target.
#[derive(Debug, Clone)]
pub struct MemoryScaler {
    state: Arc<Mutex<ScalerState>>,
    startup: Duration,
    unit: CapacityUnit,
    per_unit: WorkersPerUnit,
}

impl MemoryScaler {
    /// A target of `initial` worker processes that start at once, named `unit-0`, `unit-1`, ...
    pub fn new(initial: u32) -> Self {
        let mut state = ScalerState {
            units: Vec::new(),
            desired: initial,
            next_id: 0,
            sets: Vec::new(),
            stopped: Vec::new(),
            down: false,
            protection: false,
        };
        let long_ago = Instant::now() - Duration::from_secs(3600);
        for _ in 0..initial {
            state.add(long_ago);
        }
        MemoryScaler {
            state: Arc::new(Mutex::new(state)),
            startup: Duration::ZERO,
            unit: CapacityUnit::WorkerProcess,
            per_unit: WorkersPerUnit::ONE,
        }
    }

    /// New units take `delay` to start running.
    pub fn with_startup_delay(mut self, delay: Duration) -> Self {
        self.startup = delay;
        self
    }

    /// Each unit is a `unit` running `per_unit` worker processes.
    pub fn with_unit(mut self, unit: CapacityUnit, per_unit: WorkersPerUnit) -> Self {
        self.unit = unit;
        self.per_unit = per_unit;
        self
    }

    /// Offers scale-in protection ([`Scaler::protection`]).
    pub fn with_protection(self) -> Self {
        lock(&self.state).protection = true;
        self
    }

    /// Every `set_desired` call so far: when, and the value in units.
    pub fn sets(&self) -> Vec<(Instant, u32)> {
        lock(&self.state).sets.clone()
    }

    /// The current desired count, in units.
    pub fn desired(&self) -> u32 {
        lock(&self.state).desired
    }

    /// The ids of the units not stopped, oldest first.
    pub fn unit_ids(&self) -> Vec<String> {
        lock(&self.state)
            .units
            .iter()
            .map(|u| u.id.clone())
            .collect()
    }

    /// The ids of the units stopped so far, in order.
    pub fn stopped(&self) -> Vec<String> {
        lock(&self.state).stopped.clone()
    }

    /// The ids of the protected units.
    pub fn protected(&self) -> Vec<String> {
        let s = lock(&self.state);
        s.units
            .iter()
            .filter(|u| u.protected)
            .map(|u| u.id.clone())
            .collect()
    }

    /// Makes every call fail with [`Error::Unavailable`] (`true`) or succeed again.
    pub fn set_down(&self, down: bool) {
        lock(&self.state).down = down;
    }

    /// Units running at `now` (started at least the start-up delay ago).
    pub fn running_at(&self, now: Instant) -> u32 {
        let s = lock(&self.state);
        s.units
            .iter()
            .filter(|u| now.saturating_duration_since(u.started) >= self.startup)
            .count() as u32
    }

    fn unavailable() -> Error {
        Error::Unavailable {
            backend: "memory",
            message: "the in-memory target is marked down".into(),
            source: None,
        }
    }
}

#[async_trait]
impl Scaler for MemoryScaler {
    fn unit(&self) -> CapacityUnit {
        self.unit
    }

    fn workers_per_unit(&self) -> WorkersPerUnit {
        self.per_unit
    }

    async fn capacity(&self) -> Result<Capacity> {
        if lock(&self.state).down {
            return Err(Self::unavailable());
        }
        let desired = self.desired();
        let running = self.running_at(Instant::now());
        let all = u32::try_from(lock(&self.state).units.len()).unwrap_or(u32::MAX);
        Ok(Capacity {
            desired,
            running,
            pending: all.saturating_sub(running),
        })
    }

    async fn set_desired(&self, units: u32) -> Result<SetOutcome> {
        let mut s = lock(&self.state);
        if s.down {
            return Err(Self::unavailable());
        }
        let now = Instant::now();
        s.sets.push((now, units));
        s.desired = units;
        while s.units.len() < units as usize {
            s.add(now);
        }
        s.reconcile();
        Ok(SetOutcome::applied(units))
    }

    fn protection(&self) -> Option<&dyn UnitProtection> {
        lock(&self.state)
            .protection
            .then_some(self as &dyn UnitProtection)
    }
}

#[async_trait]
impl UnitProtection for MemoryScaler {
    async fn units(&self) -> Result<Vec<Unit>> {
        let s = lock(&self.state);
        if s.down {
            return Err(Self::unavailable());
        }
        Ok(s.units
            .iter()
            .map(|u| Unit {
                protected: u.protected,
                ..Unit::new(u.id.clone())
            })
            .collect())
    }

    async fn set_protected(&self, ids: &[String], protected: bool) -> Result<()> {
        let mut s = lock(&self.state);
        if s.down {
            return Err(Self::unavailable());
        }
        for unit in s.units.iter_mut().filter(|u| ids.contains(&u.id)) {
            unit.protected = protected;
        }
        s.reconcile();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn scaler_startup_delay_and_history() {
        let s = MemoryScaler::new(1).with_startup_delay(Duration::from_secs(60));
        s.set_desired(3).await.unwrap();
        let c = s.capacity().await.unwrap();
        assert_eq!((c.desired, c.running, c.pending), (3, 1, 2));
        tokio::time::advance(Duration::from_secs(61)).await;
        let c = s.capacity().await.unwrap();
        assert_eq!((c.running, c.pending), (3, 0));
        s.set_desired(0).await.unwrap();
        assert_eq!(s.capacity().await.unwrap().desired, 0);
        assert_eq!(s.sets().iter().map(|x| x.1).collect::<Vec<_>>(), vec![3, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_requeue_restores_oldest_first_and_ages() {
        let q = MemoryQueue::new();
        q.publish_n("a", 2);
        tokio::time::advance(Duration::from_secs(5)).await;
        let m = q.take("a").unwrap();
        assert!(q.requeue(m.id));
        let obs = q.observe().await.unwrap();
        assert_eq!(obs.ready, 2);
        assert_eq!(obs.oldest_age, Some(Duration::from_secs(5)));
        assert_eq!(q.take("a").unwrap().id, m.id);
    }
}
