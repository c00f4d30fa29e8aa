//! Leadership on tokio's paused clock: one copy acts per binding, a follower takes over when
//! the leader dies or hands over, a paused leader acts on nothing once its lease ran out, a
//! lost lease store stops everyone, and a new leader starts as a fresh loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use celery_scale_core::config::{PolicyConfig, PolicyKind};
use celery_scale_core::lease::{Leadership, LeaseReply, LeaseStore, MemoryLeaseStore};
use celery_scale_core::record::Outcome;
use celery_scale_core::{
    Binding, Capacity, LoopSettings, MemoryQueue, MemoryScaler, PolicyFactory, Result, Scaler,
    SetOutcome,
};
use tokio::time::Instant;

const PERIOD: Duration = Duration::from_secs(6);

fn settings(name: &str) -> LoopSettings {
    LoopSettings {
        name: name.into(),
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        ..LoopSettings::default()
    }
}

fn policy(stabilize_down: Duration) -> PolicyConfig {
    PolicyConfig {
        kind: PolicyKind::TargetBacklog,
        messages_per_worker: 5.0,
        max_workers: 50,
        stabilize_down,
        scale_to_zero_after: stabilize_down,
        ..PolicyConfig::default()
    }
}

fn factory(p: PolicyConfig) -> PolicyFactory {
    Arc::new(move || p.build())
}

fn leader_binding(
    queue: &MemoryQueue,
    scaler: Box<dyn Scaler>,
    store: impl LeaseStore + 'static,
    p: PolicyConfig,
) -> Binding {
    Binding::new(
        settings("b"),
        Box::new(queue.clone()),
        scaler,
        p.build().unwrap(),
    )
    .unwrap()
    .with_leadership(Leadership::new(Arc::new(store)), factory(p))
}

fn role(b: &celery_scale_core::record::DecisionRecord) -> &str {
    b.leadership
        .as_ref()
        .map(|l| l.role.as_str())
        .unwrap_or("none")
}

#[tokio::test(start_paused = true)]
async fn exactly_one_copy_acts_and_a_follower_takes_over_within_two_periods() {
    let queue = MemoryQueue::new();
    let scaler = MemoryScaler::new(0);
    let store = MemoryLeaseStore::new("a", PERIOD);
    let mut a = leader_binding(
        &queue,
        Box::new(scaler.clone()),
        store.clone(),
        policy(Duration::ZERO),
    );
    let mut b = leader_binding(
        &queue,
        Box::new(scaler.clone()),
        store.holder_handle("b"),
        policy(Duration::ZERO),
    );
    queue.publish_n("celery", 20);
    let ra = a.tick().await;
    let rb = b.tick().await;
    assert_eq!((role(&ra), role(&rb)), ("leader", "follower"));
    assert!(
        matches!(ra.outcome, Outcome::Set { to: 4, .. }),
        "{:?}",
        ra.outcome
    );
    assert!(
        matches!(&rb.outcome, Outcome::Follower { why } if why.contains("a leads")),
        "{:?}",
        rb.outcome
    );
    assert_eq!(scaler.sets().len(), 1);

    // Both keep ticking: only the leader ever sets.
    for n in [40, 10, 60] {
        queue.purge("celery");
        queue.publish_n("celery", n);
        let ra = a.tick().await;
        let rb = b.tick().await;
        assert_eq!((role(&ra), role(&rb)), ("leader", "follower"));
        assert!(!matches!(rb.outcome, Outcome::Set { .. }));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(scaler.desired(), 12);

    // The leader dies without giving the lease up (kill -9): its renewals stop.
    drop(a);
    let died = Instant::now();
    queue.publish_n("celery", 40);
    let mut led_at = None;
    let took_over = loop {
        let r = b.tick().await;
        if role(&r) == "leader" {
            led_at.get_or_insert(Instant::now());
            if matches!(r.outcome, Outcome::Set { .. }) {
                break Instant::now();
            }
            // The lease ran out under `a`: the new term waits out `a`'s horizon first.
            assert!(
                matches!(&r.outcome, Outcome::Follower { why } if why.contains("acting in")),
                "{:?}",
                r.outcome
            );
        } else {
            assert!(!matches!(r.outcome, Outcome::Set { .. }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let after = took_over - died;
    assert!(after <= PERIOD * 2, "took over after {after:?}");
    // `a` last set before it died; `b`'s first set comes a lease period after `a`'s last
    // renewal or later.
    let sets = scaler.sets();
    let gap = sets[sets.len() - 1].0 - sets[sets.len() - 2].0;
    assert!(gap >= PERIOD, "sets by two copies {gap:?} apart");
    let waited = took_over - led_at.unwrap();
    assert!(
        waited >= PERIOD.mul_f64(0.6),
        "acted {waited:?} after taking an expired lease"
    );
    assert_eq!(store.current_holder().as_deref(), Some("b"));
}

#[tokio::test(start_paused = true)]
async fn a_clean_close_hands_over_within_one_tick() {
    let queue = MemoryQueue::new();
    let scaler = MemoryScaler::new(0);
    let store = MemoryLeaseStore::new("a", PERIOD);
    let mut a = leader_binding(
        &queue,
        Box::new(scaler.clone()),
        store.clone(),
        policy(Duration::ZERO),
    );
    let mut b = leader_binding(
        &queue,
        Box::new(scaler.clone()),
        store.holder_handle("b"),
        policy(Duration::ZERO),
    );
    assert_eq!(role(&a.tick().await), "leader");
    assert_eq!(role(&b.tick().await), "follower");
    a.close().await;
    assert_eq!(store.current_holder(), None);
    // A lease given up is acted on at once (no horizon to wait out).
    queue.publish_n("celery", 10);
    let r = b.tick().await;
    assert_eq!(role(&r), "leader");
    assert!(
        matches!(r.outcome, Outcome::Set { to: 2, .. }),
        "{:?}",
        r.outcome
    );
}

/// A lease store whose calls hang while `frozen` (a process paused by SIGSTOP sends nothing).
#[derive(Debug)]
struct Freezable {
    inner: MemoryLeaseStore,
    frozen: Arc<AtomicBool>,
}

#[async_trait]
impl LeaseStore for Freezable {
    async fn acquire(&self) -> Result<LeaseReply> {
        while self.frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.inner.acquire().await
    }
    async fn release(&self) -> Result<()> {
        self.inner.release().await
    }
    fn period(&self) -> Duration {
        self.inner.period()
    }
    fn holder(&self) -> &str {
        self.inner.holder()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// A scaler whose capacity read takes `delay` once `slow` is set.
#[derive(Debug)]
struct SlowRead {
    inner: MemoryScaler,
    slow: Arc<AtomicBool>,
    delay: Duration,
}

#[async_trait]
impl Scaler for SlowRead {
    fn unit(&self) -> celery_scale_core::CapacityUnit {
        self.inner.unit()
    }
    fn workers_per_unit(&self) -> celery_scale_core::WorkersPerUnit {
        self.inner.workers_per_unit()
    }
    async fn capacity(&self) -> Result<Capacity> {
        if self.slow.load(Ordering::SeqCst) {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.capacity().await
    }
    async fn set_desired(&self, desired: u32) -> Result<SetOutcome> {
        self.inner.set_desired(desired).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_lease_ran_out_mid_tick_sets_nothing_and_steps_down() {
    let queue = MemoryQueue::new();
    let memory = MemoryScaler::new(0);
    let slow = Arc::new(AtomicBool::new(false));
    let frozen = Arc::new(AtomicBool::new(false));
    let store = MemoryLeaseStore::new("a", PERIOD);
    let mut a = Binding::new(
        LoopSettings {
            timeout: PERIOD * 3,
            ..settings("b")
        },
        Box::new(queue.clone()),
        Box::new(SlowRead {
            inner: memory.clone(),
            slow: Arc::clone(&slow),
            delay: PERIOD * 2,
        }),
        policy(Duration::ZERO).build().unwrap(),
    )
    .unwrap()
    .with_leadership(
        Leadership::new(Arc::new(Freezable {
            inner: store.clone(),
            frozen: Arc::clone(&frozen),
        })),
        factory(policy(Duration::ZERO)),
    );
    let mut b = leader_binding(
        &queue,
        Box::new(memory.clone()),
        store.holder_handle("b"),
        policy(Duration::ZERO),
    );
    assert_eq!(role(&a.tick().await), "leader");

    // `a` is paused inside a tick, after it learnt it leads and before it sets: its renewals
    // stop, and `b` takes the lease once it has run out.
    queue.publish_n("celery", 30);
    slow.store(true, Ordering::SeqCst);
    frozen.store(true, Ordering::SeqCst);
    let paused = tokio::spawn(async move {
        let r = a.tick().await;
        (a, r)
    });
    tokio::time::sleep(PERIOD + Duration::from_secs(1)).await;
    let rb = b.tick().await;
    assert_eq!(role(&rb), "leader", "{:?}", rb.outcome);
    // `b` took a lease that ran out: it acts once `a`'s horizon has passed.
    while memory.desired() != 6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        b.tick().await;
    }
    // `a` resumes and finishes its tick while its store is still cut off (its renewals and
    // its last check before setting get no answer): its own deadline alone stops it.
    let (mut a, ra) = paused.await.unwrap();
    frozen.store(false, Ordering::SeqCst);
    assert!(
        matches!(&ra.outcome, Outcome::Follower { why } if why.contains("ran out")),
        "{:?}",
        ra.outcome
    );
    assert_eq!(memory.sets().len(), 1, "only b set: {:?}", memory.sets());

    // Resumed, `a` asks the store, finds `b` leading, and follows.
    slow.store(false, Ordering::SeqCst);
    let ra = a.tick().await;
    assert_eq!(role(&ra), "follower");
    assert!(!matches!(ra.outcome, Outcome::Set { .. }));
    assert_eq!(memory.sets().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn nobody_acts_while_the_lease_store_is_lost() {
    let queue = MemoryQueue::new();
    let scaler = MemoryScaler::new(0);
    let store = MemoryLeaseStore::new("a", PERIOD);
    let mut a = leader_binding(
        &queue,
        Box::new(scaler.clone()),
        store.clone(),
        policy(Duration::ZERO),
    );
    let mut b = leader_binding(
        &queue,
        Box::new(scaler.clone()),
        store.holder_handle("b"),
        policy(Duration::ZERO),
    );
    assert_eq!(role(&a.tick().await), "leader");
    assert_eq!(role(&b.tick().await), "follower");
    store.set_reachable(false);
    let lost = Instant::now();
    // The leader acts on what its lease has left, then nobody acts.
    let mut last_set = None;
    for n in 1..=20u64 {
        queue.purge("celery");
        queue.publish_n("celery", 5 * n);
        for r in [a.tick().await, b.tick().await] {
            if matches!(r.outcome, Outcome::Set { .. }) {
                assert_eq!(role(&r), "leader");
                last_set = Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let acted_for = last_set.map_or(Duration::ZERO, |t| t - lost);
    assert!(
        acted_for < PERIOD,
        "acted {acted_for:?} after the store was lost"
    );
    let (ra, rb) = (a.tick().await, b.tick().await);
    assert_eq!((role(&ra), role(&rb)), ("unknown", "unknown"));
    assert!(
        matches!(&ra.outcome, Outcome::Follower { why } if why.contains("cannot be asked")),
        "{:?}",
        ra.outcome
    );
    let before = scaler.desired();
    assert!(before < 20, "{before}");

    // The store returns: a leader is elected again and acts (once the lease that ran out
    // under the store's loss is a horizon behind).
    store.set_reachable(true);
    for _ in 0..10 {
        let (ra, rb) = (a.tick().await, b.tick().await);
        let roles = [role(&ra), role(&rb)];
        assert_eq!(
            roles.iter().filter(|r| **r == "leader").count(),
            1,
            "{roles:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(scaler.desired(), 20);
}

#[tokio::test(start_paused = true)]
async fn a_new_leader_starts_as_a_fresh_loop_and_never_scales_in_on_its_first_ticks() {
    let window = Duration::from_secs(30);
    let queue = MemoryQueue::new();
    let scaler = MemoryScaler::new(5);
    let store = MemoryLeaseStore::new("a", PERIOD);
    let mut a = leader_binding(
        &queue,
        Box::new(scaler.clone()),
        store.clone(),
        policy(window),
    );
    let mut b = leader_binding(
        &queue,
        Box::new(scaler.clone()),
        store.holder_handle("b"),
        policy(window),
    );
    // An idle queue for 25 s: the leader waits its window, the follower decides along (its
    // own window fills with recommendations of 0).
    for _ in 0..25 {
        let (ra, rb) = (a.tick().await, b.tick().await);
        assert_eq!((role(&ra), role(&rb)), ("leader", "follower"));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(scaler.desired(), 5);
    // Still idle after the leader died: by the time the follower leads, its own window has
    // long been full of 0s, but a new term starts with a fresh policy, which waits its window
    // again.
    drop(a);
    let died = Instant::now();
    let promoted = loop {
        let r = b.tick().await;
        if role(&r) == "leader" {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(promoted - died >= PERIOD / 2);
    loop {
        b.tick().await;
        if scaler.desired() < 5 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let waited = Instant::now() - promoted;
    assert!(waited >= window, "scaled in {waited:?} after leading");
}

#[tokio::test(start_paused = true)]
async fn a_leader_asks_the_store_before_it_sets_so_a_lease_taken_under_it_stops_it() {
    let queue = MemoryQueue::new();
    let scaler = MemoryScaler::new(0);
    let store = MemoryLeaseStore::new("a", PERIOD);
    let mut a = leader_binding(
        &queue,
        Box::new(scaler.clone()),
        store.clone(),
        policy(Duration::ZERO),
    );
    queue.publish_n("celery", 10);
    assert_eq!(role(&a.tick().await), "leader");
    assert_eq!(scaler.desired(), 2);
    // The store gives the lease to `b` (a RabbitMQ connection closed under `a`): `a` still
    // counts itself leader until its next renewal, but asks before it sets.
    store.hand_to("b");
    queue.publish_n("celery", 30);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = a.tick().await;
    assert!(
        matches!(r.outcome, Outcome::Follower { .. }),
        "{:?}",
        r.outcome
    );
    assert_eq!(scaler.sets().len(), 1, "{:?}", scaler.sets());
    assert_eq!(role(&a.tick().await), "follower");
}

#[tokio::test(start_paused = true)]
async fn with_protection_a_leader_asks_the_store_only_before_a_call_that_changes_the_target() {
    let queue = MemoryQueue::new();
    let scaler = MemoryScaler::new(0).with_protection();
    let store = MemoryLeaseStore::new("a", PERIOD);
    let mut a = leader_binding(
        &queue,
        Box::new(scaler.clone()),
        store.clone(),
        policy(Duration::ZERO),
    );
    for _ in 0..3 {
        a.tick().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(role(&a.tick().await), "leader");
    // Nothing to change for 30 ticks: the keeper's renewals (every third of the 6 s period,
    // about 15) are all the store hears; asking before every tick would add 30.
    let before = store.grants();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = a.tick().await;
        assert!(
            matches!(r.outcome, Outcome::Unchanged { .. }),
            "{:?}",
            r.outcome
        );
    }
    let asked = store.grants() - before;
    assert!((14..=17).contains(&asked), "{asked} grants in 30 ticks");
    // A change is still made (asking first: the test above).
    queue.publish_n("celery", 10);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = a.tick().await;
    assert!(matches!(r.outcome, Outcome::Set { .. }), "{:?}", r.outcome);
    assert_eq!(scaler.desired(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_protection_call_without_a_capacity_change_asks_the_store_first() {
    use celery_scale_core::celery_events::WorkerNode;
    let nodes = |busy: &[&str]| {
        ["unit-0", "unit-1", "unit-2"]
            .iter()
            .map(|u| WorkerNode {
                hostname: format!("celery@{u}"),
                executing: u64::from(busy.contains(u)),
                last_beat: None,
            })
            .collect::<Vec<_>>()
    };
    let queue = MemoryQueue::new();
    queue.declare("celery");
    queue.set_worker_nodes(nodes(&["unit-1", "unit-2"]));
    let scaler = MemoryScaler::new(3).with_protection();
    let store = MemoryLeaseStore::new("a", PERIOD);
    let p = PolicyConfig {
        min_workers: 2,
        ..policy(Duration::ZERO)
    };
    let mut a = leader_binding(&queue, Box::new(scaler.clone()), store.clone(), p);
    // 3 -> 2: the busy units are protected, the idle one stops.
    let r = a.tick().await;
    assert_eq!(role(&r), "leader");
    assert_eq!(scaler.unit_ids(), ["unit-1", "unit-2"], "{r:?}");
    assert_eq!(scaler.protected(), ["unit-1", "unit-2"]);
    // unit-1 goes idle; the count stays at the floor of 2. At the recheck its protection is
    // released: a call with no change of capacity, made by the leader.
    queue.set_worker_nodes(nodes(&["unit-2"]));
    tokio::time::sleep(Duration::from_secs(31)).await;
    let r = a.tick().await;
    assert!(matches!(r.outcome, Outcome::Unchanged { .. }), "{r:?}");
    assert_eq!(scaler.protected(), ["unit-2"], "{r:?}");
    // unit-2 goes idle too, but the store has given the lease to `b` (a connection dropped
    // under `a`): asked before the release, it is found out, and nothing is released.
    queue.set_worker_nodes(nodes(&[]));
    tokio::time::sleep(Duration::from_secs(31)).await;
    store.hand_to("b");
    let r = a.tick().await;
    assert!(matches!(r.outcome, Outcome::Follower { .. }), "{r:?}");
    assert_eq!(scaler.protected(), ["unit-2"]);
}
