//! Scale-in protection in the loop, on the in-memory target (which, like ECS and Auto Scaling,
//! never stops a protected unit): the busy unit survives a scale-in that would otherwise stop
//! it, is released once idle, and nothing is protected or lowered on data the loop does not have.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use celery_scale_core::celery_events::WorkerNode;
use celery_scale_core::config::{PolicyConfig, PolicyKind};
use celery_scale_core::protection::{Unit, UnitProtection};
use celery_scale_core::{
    Binding, Capacity, CapacityUnit, Error, LoopSettings, MemoryQueue, MemoryScaler, Result,
    Scaler, SetOutcome, WorkersPerUnit, WorkersUnknown,
};

fn settings() -> LoopSettings {
    LoopSettings {
        name: "protected".into(),
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(2),
        max_staleness: Duration::from_secs(30),
        max_backoff: Duration::from_secs(40),
        dry_run: false,
    }
}

/// Scales in at once, to zero when idle.
fn policy() -> PolicyConfig {
    PolicyConfig {
        kind: PolicyKind::TargetBacklog,
        messages_per_worker: 5.0,
        max_workers: 50,
        stabilize_down: Duration::ZERO,
        scale_to_zero_after: Duration::ZERO,
        ..PolicyConfig::default()
    }
}

fn binding(queue: &MemoryQueue, scaler: impl Scaler) -> Binding {
    Binding::new(
        settings(),
        Box::new(queue.clone()),
        Box::new(scaler),
        policy().build().unwrap(),
    )
    .unwrap()
}

fn nodes(executing: &[(&str, u64)]) -> Vec<WorkerNode> {
    executing
        .iter()
        .map(|(unit, n)| WorkerNode {
            hostname: format!("celery@{unit}"),
            executing: *n,
            last_beat: None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_busy_unit_survives_the_scale_in_and_goes_once_idle() {
    // Four units; only the newest one's worker executes a task; nothing waits.
    let run = |protect: bool| async move {
        let queue = MemoryQueue::new();
        queue.declare("celery");
        queue.set_worker_nodes(nodes(&[
            ("unit-0", 0),
            ("unit-1", 0),
            ("unit-2", 0),
            ("unit-3", 1),
        ]));
        let target = MemoryScaler::new(4);
        let target = if protect {
            target.with_protection()
        } else {
            target
        };
        let mut b = binding(&queue, target.clone());
        let record = b.tick().await;
        (queue, target, b, record)
    };

    // Without protection the platform picks: the newest unit, the busy one, is stopped.
    let (_, unprotected, _, _) = run(false).await;
    assert_eq!(unprotected.desired(), 1);
    assert_eq!(unprotected.unit_ids(), ["unit-0"]);
    assert!(unprotected.stopped().contains(&"unit-3".to_string()));

    // With protection the loop protects the busy unit first: the idle ones go.
    let (queue, target, mut b, record) = run(true).await;
    assert_eq!(target.desired(), 1);
    assert_eq!(target.unit_ids(), ["unit-3"], "{record:?}");
    assert_eq!(target.protected(), ["unit-3"]);
    let protection = record.protection.expect("a protection record");
    assert_eq!(protection.plan.protect, ["unit-3"]);
    assert!(protection.applied);

    // Its worker goes idle: the unit is released and the fleet goes to zero.
    queue.set_worker_nodes(nodes(&[("unit-3", 0)]));
    tokio::time::advance(Duration::from_secs(5)).await;
    let record = b.tick().await;
    assert_eq!(record.protection.unwrap().plan.release, ["unit-3"]);
    assert_eq!(target.desired(), 0);
    assert!(target.unit_ids().is_empty());
    assert!(target.protected().is_empty());
}

#[tokio::test(start_paused = true)]
async fn each_busy_unit_stays_though_fewer_units_would_hold_the_tasks() {
    // Four workers a unit: two tasks fit in one unit, but they run on two.
    let queue = MemoryQueue::new();
    queue.declare("celery");
    queue.set_worker_nodes(nodes(&[
        ("unit-0", 0),
        ("unit-1", 1),
        ("unit-2", 0),
        ("unit-3", 1),
    ]));
    let per_unit = WorkersPerUnit::new(4).unwrap();
    let target = MemoryScaler::new(4)
        .with_unit(CapacityUnit::EcsTask, per_unit)
        .with_protection();
    let mut b = binding(&queue, target.clone());
    let record = b.tick().await;
    assert_eq!(record.desired_units, Some(2), "{record:?}");
    assert_eq!(target.unit_ids(), ["unit-1", "unit-3"]);
}

#[tokio::test(start_paused = true)]
async fn unknown_workers_and_a_busy_worker_of_no_unit_stop_nothing() {
    let queue = MemoryQueue::new();
    queue.declare("celery");
    let target = MemoryScaler::new(3).with_protection();
    let mut b = binding(&queue, target.clone());
    queue.set_workers_unknown(Some(WorkersUnknown::new("feed warming up")));
    let record = b.tick().await;
    assert_eq!(target.desired(), 3, "no scale-in on unknown workers");
    assert!(target.protected().is_empty());
    assert!(
        record.protection.is_none_or(|p| !p.applied),
        "nothing protected"
    );

    // A worker executing a task whose name maps to no unit, and a unit with no worker heard:
    // which unit runs that task is not known, so none is stopped.
    queue.set_worker_nodes(vec![
        WorkerNode::new("celery@laptop", 1),
        WorkerNode::new("celery@unit-0", 0),
        WorkerNode::new("celery@unit-1", 0),
    ]);
    tokio::time::advance(Duration::from_secs(5)).await;
    let record = b.tick().await;
    let protection = record
        .protection
        .clone()
        .unwrap_or_else(|| panic!("{record:?}"));
    assert_eq!(protection.plan.unmapped_busy, ["celery@laptop"]);
    assert_eq!(target.desired(), 3, "{record:?}");
    assert!(
        protection
            .skipped
            .is_some_and(|why| why.contains("celery@laptop")),
        "{record:?}"
    );
}

/// A memory target whose protection calls fail while `broken` is set.
#[derive(Debug, Clone)]
struct BrokenProtection {
    inner: MemoryScaler,
    broken: Arc<AtomicBool>,
}

#[async_trait]
impl Scaler for BrokenProtection {
    fn unit(&self) -> CapacityUnit {
        self.inner.unit()
    }
    fn workers_per_unit(&self) -> WorkersPerUnit {
        self.inner.workers_per_unit()
    }
    async fn capacity(&self) -> Result<Capacity> {
        self.inner.capacity().await
    }
    async fn set_desired(&self, units: u32) -> Result<SetOutcome> {
        self.inner.set_desired(units).await
    }
    fn protection(&self) -> Option<&dyn UnitProtection> {
        Some(self)
    }
}

#[async_trait]
impl UnitProtection for BrokenProtection {
    async fn units(&self) -> Result<Vec<Unit>> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(Error::Unavailable {
                backend: "test",
                message: "throttled".into(),
                source: None,
            });
        }
        self.inner.units().await
    }
    async fn set_protected(&self, ids: &[String], protected: bool) -> Result<()> {
        self.inner.set_protected(ids, protected).await
    }
}

#[tokio::test(start_paused = true)]
async fn units_that_cannot_be_read_hold_the_scale_in() {
    let queue = MemoryQueue::new();
    queue.declare("celery");
    queue.set_worker_nodes(nodes(&[("unit-0", 0), ("unit-1", 1)]));
    let broken = Arc::new(AtomicBool::new(true));
    let target = BrokenProtection {
        inner: MemoryScaler::new(2).with_protection(),
        broken: broken.clone(),
    };
    let mut b = binding(&queue, target.clone());
    let record = b.tick().await;
    assert_eq!(
        target.inner.desired(),
        2,
        "which unit is busy is not known: hold"
    );
    assert!(
        record
            .protection
            .unwrap()
            .error
            .unwrap()
            .contains("throttled")
    );
    broken.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(5)).await;
    b.tick().await;
    assert_eq!(target.inner.unit_ids(), ["unit-1"]);
}

#[tokio::test(start_paused = true)]
async fn a_worker_idle_in_a_beat_older_than_new_held_work_counts_as_busy() {
    // Both workers busy: no scale-in, and nothing held yet.
    let queue = MemoryQueue::new();
    queue.declare("celery");
    queue.set_worker_nodes(nodes(&[("unit-0", 1), ("unit-1", 1)]));
    let target = MemoryScaler::new(2).with_protection();
    let mut b = binding(&queue, target.clone());
    b.tick().await;
    let last_beats = tokio::time::Instant::now();
    tokio::time::advance(Duration::from_secs(1)).await;
    // Their tasks end and both beat idle; then a message is taken by one of them (a solo pool
    // beats again only when the task ends): the broker holds one more than before.
    let beat = |hostname: &str, at| WorkerNode {
        last_beat: Some(at),
        ..WorkerNode::new(hostname, 0)
    };
    queue.set_worker_nodes(vec![
        beat("celery@unit-0", last_beats),
        beat("celery@unit-1", last_beats),
    ]);
    queue.publish("celery");
    let taken = queue.take("celery").unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    let record = b.tick().await;
    assert_eq!(
        target.desired(),
        2,
        "either may be the busy one: {record:?}"
    );
    // Both beat idle since, and the task is acknowledged: the idle units go.
    queue.ack(taken.id);
    tokio::time::advance(Duration::from_secs(1)).await;
    let now = tokio::time::Instant::now();
    queue.set_worker_nodes(vec![beat("celery@unit-0", now), beat("celery@unit-1", now)]);
    tokio::time::advance(Duration::from_secs(5)).await;
    let record = b.tick().await;
    assert_eq!(target.desired(), 0, "{record:?}");
}

#[tokio::test(start_paused = true)]
async fn a_ready_message_holds_the_scale_in_of_idle_units() {
    // Four idle units and one ready message: the policy wants one worker, but whichever idle
    // unit takes the message before it stops would lose it.
    let queue = MemoryQueue::new();
    queue.declare("celery");
    queue.publish("celery");
    queue.set_worker_nodes(nodes(&[
        ("unit-0", 0),
        ("unit-1", 0),
        ("unit-2", 0),
        ("unit-3", 0),
    ]));
    let target = MemoryScaler::new(4).with_protection();
    let mut b = binding(&queue, target.clone());
    let record = b.tick().await;
    assert_eq!(target.desired(), 4, "{record:?}");
    let why = record
        .protection
        .and_then(|p| p.skipped)
        .unwrap_or_default();
    assert!(why.contains("1 message(s) ready"), "{why}");
}

#[tokio::test(start_paused = true)]
async fn a_transient_protection_fault_backs_off_like_any_other() {
    let queue = MemoryQueue::new();
    queue.declare("celery");
    queue.set_worker_nodes(nodes(&[("unit-0", 0), ("unit-1", 1)]));
    let target = BrokenProtection {
        inner: MemoryScaler::new(2).with_protection(),
        broken: Arc::new(AtomicBool::new(true)),
    };
    let mut b = binding(&queue, target.clone());
    let first = b.tick().await;
    let p = first.protection.clone().unwrap();
    assert!(p.transient, "{p:?}");
    assert_eq!(
        p.error_kind,
        Some(celery_scale_core::ErrorKind::Unavailable)
    );
    assert_eq!(first.next_tick_in, settings().interval * 2, "backs off");
    let second = b.tick().await;
    assert_eq!(second.next_tick_in, settings().interval * 4, "and more");
}
