//! The simulated world: the broker, the fleet of worker nodes, their heartbeats, and the run
//! loop that drives the production [`Binding`] through them in virtual time.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::time::Instant;

use celery_scale_core::celery_events::{WorkerEvent, WorkerEventKind, WorkerRegistry};
use celery_scale_core::policy::{ScalingPolicy, WallClock};
use celery_scale_core::record::Outcome;
use celery_scale_core::{
    Binding, Capacity, CapacityUnit, ConfigError, LoopSettings, MemoryQueue, Observation,
    QueueSource, Result, Scaler, SetOutcome, WorkersPerUnit,
};

use crate::{SimConfig, SimPoint, SimResult, Summary, Trace};

#[derive(Debug)]
struct Unit {
    launched_s: f64,
    ready_s: f64,
    stopping: bool,
    ended_s: Option<f64>,
    /// Per worker process: when its task ends, if busy.
    slots: Vec<Option<f64>>,
    reserved: VecDeque<u64>,
    processed: u64,
    hostname: String,
    /// `worker-offline` was sent: the node sends no more events.
    offline_sent: bool,
}

impl Unit {
    fn busy(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }
}

#[derive(Debug, Default)]
struct Fleet {
    desired: u32,
    units: Vec<Unit>,
    now_s: f64,
}

impl Fleet {
    fn live(&self) -> impl Iterator<Item = &Unit> {
        self.units
            .iter()
            .filter(|u| !u.stopping && u.ended_s.is_none())
    }
}

/// The simulated target, as a [`Scaler`].
#[derive(Debug, Clone)]
struct SimScaler {
    fleet: Arc<Mutex<Fleet>>,
    per_unit: WorkersPerUnit,
}

#[async_trait]
impl Scaler for SimScaler {
    fn unit(&self) -> CapacityUnit {
        if self.per_unit.get() == 1 {
            CapacityUnit::WorkerProcess
        } else {
            CapacityUnit::EcsTask
        }
    }
    fn workers_per_unit(&self) -> WorkersPerUnit {
        self.per_unit
    }
    async fn capacity(&self) -> Result<Capacity> {
        let f = self.fleet.lock().unwrap_or_else(|p| p.into_inner());
        let running = f.live().filter(|u| u.ready_s <= f.now_s).count() as u32;
        let pending = f.live().count() as u32 - running;
        Ok(Capacity {
            desired: f.desired,
            running,
            pending,
        })
    }
    async fn set_desired(&self, units: u32) -> Result<SetOutcome> {
        self.fleet.lock().unwrap_or_else(|p| p.into_inner()).desired = units;
        Ok(SetOutcome::applied(units))
    }
}

/// The broker plus heartbeats, as a [`QueueSource`] (what a Redis source with heartbeats sees).
#[derive(Debug, Clone)]
struct SimSource {
    broker: MemoryQueue,
    registry: Arc<Mutex<WorkerRegistry>>,
}

#[async_trait]
impl QueueSource for SimSource {
    async fn observe(&self) -> Result<Observation> {
        let obs = self.broker.observe().await?;
        let workers = self
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reading(obs.at);
        Ok(obs.with_worker_reading(workers))
    }
}

pub(crate) struct World {
    config: SimConfig,
    trace: Trace,
    queues: Vec<String>,
    broker: MemoryQueue,
    registry: Arc<Mutex<WorkerRegistry>>,
    fleet: Arc<Mutex<Fleet>>,
    rng: StdRng,
    /// Which unit gets the next message (separate from `rng`, so scale-in choices do not
    /// depend on how many messages were dispatched).
    dispatch_rng: StdRng,
    /// Message id -> (arrival second, duration seconds), until the task starts.
    tasks: HashMap<u64, (f64, f64)>,
    /// (arrival second, wait seconds) of each task started.
    waits: Vec<(f64, f64)>,
    completed: u64,
    next_host: u64,
}

impl World {
    pub(crate) fn new(config: SimConfig, trace: Trace) -> Self {
        let broker = MemoryQueue::new();
        let queues = trace.queues();
        for q in &queues {
            broker.declare(q);
        }
        World {
            rng: StdRng::seed_from_u64(config.seed),
            dispatch_rng: StdRng::seed_from_u64(config.seed ^ 0x9e37_79b9_7f4a_7c15),
            queues,
            broker,
            registry: Arc::new(Mutex::new(WorkerRegistry::default())),
            fleet: Arc::new(Mutex::new(Fleet::default())),
            tasks: HashMap::new(),
            waits: Vec::new(),
            completed: 0,
            next_host: 0,
            config,
            trace,
        }
    }

    fn launch(&mut self, now_s: f64, ready_s: f64) -> Unit {
        self.next_host += 1;
        Unit {
            launched_s: now_s,
            ready_s,
            stopping: false,
            ended_s: None,
            slots: vec![None; self.config.workers_per_unit as usize],
            reserved: VecDeque::new(),
            processed: 0,
            hostname: format!("celery@sim-{}", self.next_host),
            offline_sent: false,
        }
    }

    /// A worker takes the next message, from the queues in priority order.
    fn take(&self) -> Option<u64> {
        self.queues
            .iter()
            .find_map(|q| self.broker.take(q))
            .map(|m| m.id)
    }

    /// Brings the fleet to the desired count: launches units, or stops some (pending first,
    /// then running ones chosen at random).
    fn reconcile(&mut self, fleet: &mut Fleet, now_s: f64) {
        let live = fleet.live().count() as u32;
        if fleet.desired > live {
            for _ in live..fleet.desired {
                let u = self.launch(now_s, now_s + self.config.startup.as_secs_f64());
                fleet.units.push(u);
            }
        } else if fleet.desired < live {
            let mut excess = live - fleet.desired;
            // Pending units are cancelled first: they do no work yet.
            for u in fleet.units.iter_mut().rev() {
                if excess == 0 {
                    break;
                }
                if !u.stopping && u.ended_s.is_none() && u.ready_s > now_s {
                    u.stopping = true;
                    u.ended_s = Some(now_s);
                    // Never started, so never online: no worker-offline either.
                    u.offline_sent = true;
                    excess -= 1;
                }
            }
            while excess > 0 {
                let protection = self.config.scale_in_protection;
                let candidates: Vec<usize> = fleet
                    .units
                    .iter()
                    .enumerate()
                    .filter(|(_, u)| !u.stopping && u.ended_s.is_none())
                    .filter(|(_, u)| !protection || (u.busy() == 0 && u.reserved.is_empty()))
                    .map(|(i, _)| i)
                    .collect();
                let Some(&i) = candidates.get(self.rng.random_range(0..candidates.len().max(1)))
                else {
                    break;
                };
                // Warm shutdown begins: the node takes nothing more and starts none of its
                // reserved messages; they stay held until its running tasks end (`work`).
                fleet.units[i].stopping = true;
                excess -= 1;
            }
        }
    }

    /// One step of the workers: finished tasks complete, free worker processes start their
    /// unit's reserved messages, then the broker's messages go, one at a time, to a random unit
    /// with room (a free process, or fewer reserved than the prefetch limit).
    ///
    /// Random, not first-come: kombu's Redis transport re-issues its `BRPOP` every second
    /// (timeout 1 s) and RabbitMQ hands messages round-robin to consumers with prefetch credit,
    /// so which node gets the next message is neither the oldest node nor the idlest one. A
    /// busy node with prefetch room takes messages as readily as an idle one.
    fn work(&mut self, fleet: &mut Fleet, now_s: f64) {
        let prefetch = (self.config.workers_per_unit * self.config.prefetch_multiplier) as usize;
        for u in fleet.units.iter_mut() {
            if u.ended_s.is_some() || u.ready_s > now_s {
                continue;
            }
            for slot in u.slots.iter_mut() {
                if slot.is_some_and(|end| end <= now_s) {
                    *slot = None;
                    self.completed += 1;
                }
            }
            if u.stopping {
                if u.busy() == 0 {
                    // The warm shutdown ends: the worker closes its channel, and its reserved
                    // messages are ready again (kombu's Redis transport restores them on
                    // channel close, RabbitMQ when the channel goes; measured on real Celery
                    // in the brokers' `warm_shutdown_timing` tests).
                    for id in u.reserved.drain(..).rev() {
                        self.broker.requeue(id);
                    }
                    u.ended_s = Some(now_s);
                }
                continue;
            }
            for si in 0..u.slots.len() {
                if u.slots[si].is_none()
                    && let Some(id) = u.reserved.pop_front()
                {
                    u.slots[si] = Some(self.start(id, now_s));
                }
            }
        }
        let has_room = |u: &Unit| {
            u.ended_s.is_none()
                && !u.stopping
                && u.ready_s <= now_s
                && (u.busy() < u.slots.len() || u.reserved.len() < prefetch)
        };
        let mut open: Vec<usize> = (0..fleet.units.len())
            .filter(|&i| has_room(&fleet.units[i]))
            .collect();
        while !open.is_empty() {
            let Some(id) = self.take() else { break };
            let k = self.dispatch_rng.random_range(0..open.len());
            let u = &mut fleet.units[open[k]];
            u.processed += 1;
            match u.slots.iter().position(Option::is_none) {
                Some(si) => u.slots[si] = Some(self.start(id, now_s)),
                None => u.reserved.push_back(id),
            }
            if !has_room(u) {
                open.swap_remove(k);
            }
        }
    }

    /// A worker process starts message `id`: Celery acks it (early ack) and the wait ends.
    /// Returns when the task ends.
    fn start(&mut self, id: u64, now_s: f64) -> f64 {
        self.broker.ack(id);
        let (arrived, duration) = self.tasks.remove(&id).unwrap_or((now_s, 0.0));
        self.waits.push((arrived, (now_s - arrived).max(0.0)));
        now_s + duration
    }

    /// Every running node sends a heartbeat; a node that has begun its warm shutdown (or ended)
    /// sends `worker-offline` once and then nothing.
    fn beat(&self, fleet: &mut Fleet, now_s: f64, now: Instant) {
        let mut reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        for u in fleet
            .units
            .iter_mut()
            .filter(|u| u.ready_s <= now_s && !u.offline_sent)
        {
            let leaving = u.stopping || u.ended_s.is_some();
            if leaving {
                u.offline_sent = true;
            }
            reg.apply(
                &WorkerEvent {
                    kind: if leaving {
                        WorkerEventKind::Offline
                    } else {
                        WorkerEventKind::Heartbeat
                    },
                    hostname: u.hostname.clone(),
                    active: u.busy() as u64,
                    processed: u.processed,
                    freq: 2.0,
                    timestamp: now_s,
                },
                now,
            );
        }
    }

    pub(crate) async fn run(
        mut self,
        policy: Box<dyn ScalingPolicy>,
    ) -> Result<SimResult, ConfigError> {
        let step = self.config.step.as_secs_f64();
        let per_unit = WorkersPerUnit::new(self.config.workers_per_unit)
            .ok_or_else(|| ConfigError::new("workers_per_unit", "must be at least 1"))?;
        {
            let fleet = Arc::clone(&self.fleet);
            let mut f = fleet.lock().unwrap_or_else(|p| p.into_inner());
            f.desired = self.config.initial_units;
            for _ in 0..self.config.initial_units {
                let u = self.launch(-self.config.startup.as_secs_f64(), 0.0);
                f.units.push(u);
            }
        }
        let settings = LoopSettings {
            name: "sim".into(),
            interval: self.config.interval,
            timeout: Duration::from_secs(1),
            max_staleness: self.config.interval.max(Duration::from_secs(30)),
            max_backoff: self.config.interval.max(Duration::from_secs(60)),
            dry_run: false,
        };
        let source = SimSource {
            broker: self.broker.clone(),
            registry: Arc::clone(&self.registry),
        };
        let scaler = SimScaler {
            fleet: Arc::clone(&self.fleet),
            per_unit,
        };
        let start = Instant::now();
        let mut binding = Binding::new(settings, Box::new(source), Box::new(scaler), policy)?
            .with_wall_clock(WallClock::Anchored {
                wall: self.config.wall_start,
                at: start,
            });

        let arrivals = self.trace.arrivals().to_vec();
        let total = self.trace.tasks();
        let last_arrival = self.trace.end().as_secs_f64();
        let horizon = last_arrival + self.config.horizon_after_last_arrival.as_secs_f64();
        let interval_steps = (self.config.interval.as_secs_f64() / step).round().max(1.0) as u64;
        let beat_steps = (2.0 / step).round().max(1.0) as u64;
        let sample_steps = (self.config.sample_every.as_secs_f64() / step)
            .round()
            .max(1.0) as u64;
        let mut next_arrival = 0;
        let mut series = Vec::new();
        let mut actions = 0;
        let mut peak = 0u32;
        let mut last_change_s = 0.0f64;
        let mut last_live = u32::MAX;
        let mut n: u64 = 0;
        loop {
            let now_s = n as f64 * step;
            let now = start + Duration::from_secs_f64(now_s);
            while next_arrival < arrivals.len() && arrivals[next_arrival].at.as_secs_f64() <= now_s
            {
                let a = &arrivals[next_arrival];
                for _ in 0..a.count {
                    let m = self.broker.publish(&a.queue);
                    self.tasks
                        .insert(m.id, (a.at.as_secs_f64(), a.duration.as_secs_f64()));
                }
                next_arrival += 1;
            }
            let fleet = Arc::clone(&self.fleet);
            {
                let mut f = fleet.lock().unwrap_or_else(|p| p.into_inner());
                f.now_s = now_s;
                self.work(&mut f, now_s);
                if n.is_multiple_of(beat_steps) {
                    self.beat(&mut f, now_s, now);
                }
            }
            if n.is_multiple_of(interval_steps) {
                let record = binding.tick().await;
                if matches!(record.outcome, Outcome::Set { .. }) {
                    actions += 1;
                }
            }
            {
                let mut f = fleet.lock().unwrap_or_else(|p| p.into_inner());
                self.reconcile(&mut f, now_s);
                let live = f.live().count() as u32;
                if live != last_live {
                    last_live = live;
                    last_change_s = now_s;
                }
                let running = f.live().filter(|u| u.ready_s <= now_s).count() as u32;
                peak = peak.max(running * per_unit.get());
                if n.is_multiple_of(sample_steps) {
                    let executing = f
                        .units
                        .iter()
                        .filter(|u| u.ended_s.is_none())
                        .map(|u| u.busy() as u64)
                        .sum();
                    let reserved: u64 = f.units.iter().map(|u| u.reserved.len() as u64).sum();
                    series.push(SimPoint {
                        t_s: now_s,
                        ready: self.queues.iter().map(|q| self.broker.ready(q)).sum(),
                        in_flight: reserved,
                        executing,
                        desired_workers: per_unit.workers_in(f.desired),
                        running_workers: per_unit.workers_in(running),
                    });
                }
            }
            let done = next_arrival == arrivals.len() && self.completed == total;
            if (done && now_s - last_change_s >= self.config.settle.as_secs_f64())
                || now_s >= horizon
            {
                break;
            }
            tokio::time::advance(self.config.step).await;
            n += 1;
        }
        let end_s = n as f64 * step;
        let f = self.fleet.lock().unwrap_or_else(|p| p.into_inner());
        let worker_seconds = f
            .units
            .iter()
            .map(|u| (u.ended_s.unwrap_or(end_s) - u.launched_s.max(0.0)).max(0.0))
            .sum::<f64>()
            * f64::from(per_unit.get());
        let startup_seconds = f
            .units
            .iter()
            .map(|u| (u.ready_s.min(u.ended_s.unwrap_or(end_s)) - u.launched_s.max(0.0)).max(0.0))
            .sum::<f64>()
            * f64::from(per_unit.get());
        // Tasks that never started waited until the end.
        let mut waits: Vec<f64> = self.waits.iter().map(|&(_, w)| w).collect();
        waits.extend(self.tasks.values().map(|(arrived, _)| end_s - arrived));
        waits.sort_by(f64::total_cmp);
        let pct = |p: f64| -> f64 {
            if waits.is_empty() {
                return 0.0;
            }
            let rank = ((p / 100.0) * waits.len() as f64).ceil().max(1.0) as usize;
            waits[rank.min(waits.len()) - 1]
        };
        Ok(SimResult {
            task_waits: self.waits.clone(),
            series,
            summary: Summary {
                tasks: total,
                completed: self.completed,
                worker_seconds,
                busy_seconds: self.trace.busy_time().as_secs_f64(),
                wait_p50_s: pct(50.0),
                wait_p95_s: pct(95.0),
                wait_p99_s: pct(99.0),
                wait_max_s: waits.last().copied().unwrap_or(0.0),
                scaling_actions: actions,
                launches: f.units.len() as u32,
                startup_seconds,
                peak_workers: peak,
                simulated_s: end_s,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two running units, one executing a task and one idle, and a desired count of 1.
    fn world_with_one_busy_unit(protection: bool, seed: u64) -> (World, Fleet) {
        let config = SimConfig {
            seed,
            scale_in_protection: protection,
            ..SimConfig::default()
        };
        let mut world = World::new(config, Trace::new(Vec::new()));
        let mut busy = world.launch(0.0, 0.0);
        busy.slots[0] = Some(600.0);
        let idle = world.launch(0.0, 0.0);
        let fleet = Fleet {
            desired: 1,
            units: vec![busy, idle],
            now_s: 10.0,
        };
        (world, fleet)
    }

    #[test]
    fn protection_stops_the_idle_unit_and_random_scale_in_may_stop_the_busy_one() {
        for seed in 0..20 {
            let (mut world, mut fleet) = world_with_one_busy_unit(true, seed);
            world.reconcile(&mut fleet, 10.0);
            assert!(!fleet.units[0].stopping, "the busy unit is protected");
            assert!(fleet.units[1].stopping, "the idle unit is stopped");
        }
        let busy_stopped = (0..20)
            .filter(|&seed| {
                let (mut world, mut fleet) = world_with_one_busy_unit(false, seed);
                world.reconcile(&mut fleet, 10.0);
                fleet.units[0].stopping
            })
            .count();
        assert!(
            (1..20).contains(&busy_stopped),
            "without protection the victim is random: busy one stopped {busy_stopped} of 20 times"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_in_warm_shutdown_is_offline_while_it_finishes_its_task() {
        let (world, mut fleet) = world_with_one_busy_unit(false, 1);
        let now = Instant::now();
        world.beat(&mut fleet, 10.0, now);
        let summary = world.registry.lock().unwrap().reading(now).unwrap();
        assert_eq!((summary.live_workers, summary.executing), (2, 1));
        // The busy node begins its warm shutdown: Celery sends worker-offline at once, while
        // its task still runs, and nothing after.
        fleet.units[0].stopping = true;
        world.beat(&mut fleet, 12.0, now);
        assert!(fleet.units[0].offline_sent);
        assert_eq!(fleet.units[0].busy(), 1, "still executing");
        let summary = world.registry.lock().unwrap().reading(now).unwrap();
        assert_eq!((summary.live_workers, summary.executing), (1, 0));
        world.beat(&mut fleet, 14.0, now);
        let summary = world.registry.lock().unwrap().reading(now).unwrap();
        assert_eq!(
            summary.live_workers, 1,
            "no heartbeat after the offline event"
        );
    }

    #[test]
    fn a_stopping_node_holds_its_reserved_messages_until_its_task_ends() {
        let (mut world, mut fleet) = world_with_one_busy_unit(false, 1);
        // The busy unit holds two prefetched messages, taken from the broker.
        world.queues = vec!["celery".into()];
        for _ in 0..2 {
            let m = world.broker.publish("celery");
            world.tasks.insert(m.id, (0.0, 5.0));
        }
        for _ in 0..2 {
            let id = world.take().unwrap();
            fleet.units[0].reserved.push_back(id);
        }
        fleet.units[0].stopping = true;
        fleet.units[1].ended_s = Some(10.0);
        let ready = |w: &World| w.broker.ready("celery");
        world.work(&mut fleet, 10.0);
        assert_eq!(ready(&world), 0, "held while the task runs");
        assert_eq!(fleet.units[0].reserved.len(), 2);
        world.work(&mut fleet, 599.75);
        assert_eq!(
            ready(&world),
            0,
            "still held just before the task ends at 600 s"
        );
        assert_eq!(fleet.units[0].ended_s, None, "the warm shutdown goes on");
        world.work(&mut fleet, 600.0);
        assert_eq!(ready(&world), 2, "back in the queue when the task ends");
        assert_eq!(fleet.units[0].ended_s, Some(600.0), "billed until then");
        assert!(fleet.units[0].reserved.is_empty());
    }

    #[test]
    fn a_protected_unit_above_the_desired_count_stops_once_idle() {
        let (mut world, mut fleet) = world_with_one_busy_unit(true, 1);
        fleet.desired = 0;
        world.reconcile(&mut fleet, 10.0);
        assert!(!fleet.units[0].stopping, "still executing: kept");
        // Its task ends; the next reconcile stops it.
        fleet.units[0].slots[0] = None;
        world.reconcile(&mut fleet, 700.0);
        assert!(fleet.units[0].stopping);
    }
}
