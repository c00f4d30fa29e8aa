//! The control loop on tokio's paused clock: ticks, timeouts, cancellation, dry run, no
//! redundant sets, fallback, backoff and the rule that a fault never becomes a scale-in.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use celery_scale_core::config::{FallbackConfig, PolicyConfig, PolicyKind};
use celery_scale_core::record::{Outcome, RecordLog};
use celery_scale_core::{
    Binding, CancellationToken, Error, ErrorKind, LoopSettings, MemoryQueue, MemoryScaler,
    Observation, QueueSource, Result, Scaler, WorkersUnknown,
};
use tokio::time::Instant;

fn settings(interval_s: u64) -> LoopSettings {
    LoopSettings {
        name: "test".into(),
        interval: Duration::from_secs(interval_s),
        timeout: Duration::from_secs(2),
        max_staleness: Duration::from_secs(30),
        max_backoff: Duration::from_secs(40),
        dry_run: false,
    }
}

/// Five messages per worker, no stabilization, scale to zero at once.
fn backlog_policy() -> PolicyConfig {
    PolicyConfig {
        kind: PolicyKind::TargetBacklog,
        messages_per_worker: 5.0,
        max_workers: 50,
        stabilize_down: Duration::ZERO,
        scale_to_zero_after: Duration::ZERO,
        ..PolicyConfig::default()
    }
}

fn binding(
    queue: &MemoryQueue,
    scaler: &MemoryScaler,
    s: LoopSettings,
    p: PolicyConfig,
) -> Binding {
    Binding::new(
        s,
        Box::new(queue.clone()),
        Box::new(scaler.clone()),
        p.build().unwrap(),
    )
    .unwrap()
}

/// A source that never answers.
#[derive(Debug)]
struct Hanging;

#[async_trait]
impl QueueSource for Hanging {
    async fn observe(&self) -> Result<Observation> {
        std::future::pending().await
    }
}

/// A source whose observations are `age` old.
#[derive(Debug)]
struct Stale {
    age: Duration,
    ready: u64,
}

#[async_trait]
impl QueueSource for Stale {
    async fn observe(&self) -> Result<Observation> {
        Ok(Observation::new(self.ready, Instant::now() - self.age))
    }
}

/// A scaler that counts calls.
#[derive(Debug, Default)]
struct Counting {
    inner: Option<MemoryScaler>,
    sets: AtomicU32,
}

#[async_trait]
impl Scaler for Counting {
    fn unit(&self) -> celery_scale_core::CapacityUnit {
        celery_scale_core::CapacityUnit::WorkerProcess
    }
    fn workers_per_unit(&self) -> celery_scale_core::WorkersPerUnit {
        celery_scale_core::WorkersPerUnit::ONE
    }
    async fn capacity(&self) -> Result<celery_scale_core::Capacity> {
        self.inner.as_ref().unwrap().capacity().await
    }
    async fn set_desired(&self, units: u32) -> Result<celery_scale_core::SetOutcome> {
        self.sets.fetch_add(1, Ordering::SeqCst);
        self.inner.as_ref().unwrap().set_desired(units).await
    }
}

#[tokio::test(start_paused = true)]
async fn ticks_on_the_interval_and_stops_on_cancel_within_a_tick() {
    let queue = MemoryQueue::new();
    queue.publish_n("celery", 12);
    let scaler = MemoryScaler::new(0);
    let log = RecordLog::new();
    let b =
        binding(&queue, &scaler, settings(5), backlog_policy()).with_sink(Arc::new(log.clone()));
    let cancel = CancellationToken::new();
    let task = tokio::spawn(b.run(cancel.clone()));
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    assert_eq!(log.records().len(), 3, "ticks at 0 s, 5 s and 10 s");
    assert_eq!(scaler.desired(), 3, "ceil(12 / 5)");
    let cancelled_at = Instant::now();
    cancel.cancel();
    task.await.unwrap();
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(5),
        "finished within one tick"
    );
    assert_eq!(log.records().len(), 3, "no tick after cancel");
}

#[tokio::test(start_paused = true)]
async fn a_hung_source_times_out_and_holds() {
    let scaler = MemoryScaler::new(4);
    let mut b = Binding::new(
        settings(5),
        Box::new(Hanging),
        Box::new(scaler.clone()),
        backlog_policy().build().unwrap(),
    )
    .unwrap();
    let r = b.tick().await;
    let err = r.observation_error.expect("the observation timed out");
    assert_eq!(err.kind, ErrorKind::Timeout);
    assert_eq!(r.outcome, Outcome::Unchanged { units: 4 });
    assert!(scaler.sets().is_empty(), "held: no set");
    assert_eq!(
        r.next_tick_in,
        Duration::from_secs(10),
        "a timeout backs off"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stale_observation_never_scales_in() {
    let scaler = MemoryScaler::new(6);
    let mut b = Binding::new(
        settings(5),
        Box::new(Stale {
            age: Duration::from_secs(31),
            ready: 0,
        }),
        Box::new(scaler.clone()),
        backlog_policy().build().unwrap(),
    )
    .unwrap();
    let r = b.tick().await;
    assert!(r.observation_error.unwrap().message.contains("stale"));
    assert_eq!(r.outcome, Outcome::Unchanged { units: 6 });
    let d = r.decision.unwrap();
    assert_eq!(d.desired, 6);
    assert!(scaler.sets().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failed_observation_never_scales_in_and_recovery_resumes() {
    let queue = MemoryQueue::new();
    let scaler = MemoryScaler::new(5);
    let mut b = binding(&queue, &scaler, settings(5), backlog_policy());
    queue.set_down(true);
    for i in 1..=3 {
        let r = b.tick().await;
        assert_eq!(r.consecutive_failures, i);
        assert_eq!(
            r.observation_error.as_ref().unwrap().kind,
            ErrorKind::Unavailable
        );
        assert_eq!(
            r.outcome,
            Outcome::Unchanged { units: 5 },
            "empty queue unknown: hold"
        );
    }
    queue.set_down(false);
    let r = b.tick().await;
    assert_eq!(r.consecutive_failures, 0);
    assert_eq!(
        r.outcome,
        Outcome::Set {
            from: 5,
            to: 0,
            applied: 0,
            note: None
        },
        "with fresh data the empty queue scales in"
    );
}

#[tokio::test(start_paused = true)]
async fn dry_run_decides_but_never_sets() {
    let queue = MemoryQueue::new();
    queue.publish_n("celery", 20);
    let scaler = MemoryScaler::new(1);
    let mut s = settings(5);
    s.dry_run = true;
    let mut b = binding(&queue, &scaler, s, backlog_policy());
    let r = b.tick().await;
    assert_eq!(r.outcome, Outcome::WouldSet { from: 1, to: 4 });
    assert!(r.dry_run);
    assert!(scaler.sets().is_empty());
}

#[tokio::test(start_paused = true)]
async fn unchanged_desired_makes_no_set_call() {
    let queue = MemoryQueue::new();
    queue.publish_n("celery", 10);
    let counting = Arc::new(Counting {
        inner: Some(MemoryScaler::new(0)),
        ..Counting::default()
    });
    let mut b = Binding::new(
        settings(5),
        Box::new(queue.clone()),
        Box::new(counting.clone()),
        backlog_policy().build().unwrap(),
    )
    .unwrap();
    b.tick().await;
    assert_eq!(counting.sets.load(Ordering::SeqCst), 1);
    for _ in 0..5 {
        let r = b.tick().await;
        assert_eq!(r.outcome, Outcome::Unchanged { units: 2 });
    }
    assert_eq!(
        counting.sets.load(Ordering::SeqCst),
        1,
        "no set while nothing changes"
    );
}

#[tokio::test(start_paused = true)]
async fn fallback_raises_capacity_after_n_failures() {
    let queue = MemoryQueue::new();
    let scaler = MemoryScaler::new(1);
    let policy = PolicyConfig {
        fallback: Some(FallbackConfig {
            after_failures: 3,
            capacity: Some(4),
        }),
        ..backlog_policy()
    };
    let mut b = binding(&queue, &scaler, settings(5), policy);
    queue.set_down(true);
    for _ in 0..2 {
        assert_eq!(b.tick().await.outcome, Outcome::Unchanged { units: 1 });
    }
    let r = b.tick().await;
    assert_eq!(
        r.outcome,
        Outcome::Set {
            from: 1,
            to: 4,
            applied: 4,
            note: None
        }
    );
    assert!(r.reason().contains("fallback"), "{}", r.reason());
}

#[tokio::test(start_paused = true)]
async fn transient_errors_back_off_then_reset() {
    let queue = MemoryQueue::new();
    let scaler = MemoryScaler::new(1);
    let mut b = binding(&queue, &scaler, settings(5), backlog_policy());
    scaler.set_down(true);
    let mut seen = Vec::new();
    for _ in 0..5 {
        let r = b.tick().await;
        assert!(r.capacity_error.is_some());
        assert!(matches!(r.outcome, Outcome::Held { .. }));
        seen.push(r.next_tick_in.as_secs());
    }
    assert_eq!(seen, vec![10, 20, 40, 40, 40], "doubling up to max_backoff");
    scaler.set_down(false);
    assert_eq!(b.tick().await.next_tick_in, Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_failed_set_is_recorded_as_a_typed_error() {
    #[derive(Debug)]
    struct Refusing(MemoryScaler);
    #[async_trait]
    impl Scaler for Refusing {
        fn unit(&self) -> celery_scale_core::CapacityUnit {
            self.0.unit()
        }
        fn workers_per_unit(&self) -> celery_scale_core::WorkersPerUnit {
            self.0.workers_per_unit()
        }
        async fn capacity(&self) -> Result<celery_scale_core::Capacity> {
            self.0.capacity().await
        }
        async fn set_desired(&self, _: u32) -> Result<celery_scale_core::SetOutcome> {
            Err(Error::Throttled {
                backend: "test",
                source: None,
            })
        }
    }
    let queue = MemoryQueue::new();
    queue.publish_n("celery", 10);
    let mut b = Binding::new(
        settings(5),
        Box::new(queue.clone()),
        Box::new(Refusing(MemoryScaler::new(0))),
        backlog_policy().build().unwrap(),
    )
    .unwrap();
    let r = b.tick().await;
    match r.outcome {
        Outcome::SetFailed { to, error } => {
            assert_eq!(to, 2);
            assert_eq!(error.kind, ErrorKind::Throttled);
            assert!(error.transient);
        }
        other => panic!("expected SetFailed, got {other:?}"),
    }
    assert_eq!(r.next_tick_in, Duration::from_secs(10));
    // The record serializes (it is what --once prints).
    let json = serde_json::to_value(b.tick().await).unwrap();
    assert_eq!(json["outcome"]["action"], "set_failed");
}

#[tokio::test(start_paused = true)]
async fn units_convert_in_one_place() {
    let queue = MemoryQueue::new();
    queue.publish_n("celery", 23);
    let scaler = MemoryScaler::new(0).with_unit(
        celery_scale_core::CapacityUnit::EcsTask,
        celery_scale_core::WorkersPerUnit::new(2).unwrap(),
    );
    let mut b = binding(&queue, &scaler, settings(5), backlog_policy());
    let r = b.tick().await;
    assert_eq!(r.decision.unwrap().desired, 5, "ceil(23 / 5) workers");
    assert_eq!(r.desired_units, Some(3), "ceil(5 / 2) tasks");
    assert_eq!(scaler.desired(), 3);
}

#[tokio::test(start_paused = true)]
async fn autoscaler_ticks_every_binding() {
    let mut auto = celery_scale_core::Autoscaler::new();
    let mut scalers = Vec::new();
    for i in 0..3u64 {
        let q = MemoryQueue::new();
        q.publish_n("celery", 5 * (i + 1));
        let s = MemoryScaler::new(0);
        let mut st = settings(5);
        st.name = format!("b{i}");
        auto = auto.with_binding(binding(&q, &s, st, backlog_policy()));
        scalers.push(s);
    }
    let records = auto.tick_all().await;
    assert_eq!(
        records
            .iter()
            .map(|r| r.binding.as_str())
            .collect::<Vec<_>>(),
        ["b0", "b1", "b2"]
    );
    assert_eq!(
        scalers.iter().map(|s| s.desired()).collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

/// The shipped default policy (target_backlog 5, 30 s windows, in-flight floor).
fn default_binding(queue: &MemoryQueue, scaler: &MemoryScaler) -> Binding {
    binding(queue, scaler, settings(5), PolicyConfig::default())
}

#[tokio::test(start_paused = true)]
async fn a_fresh_loop_never_scales_in_under_busy_workers_during_the_warm_up() {
    // Two units busy on 8 tasks, an empty queue; the worker-event feed is warming up.
    let queue = MemoryQueue::new();
    let scaler = MemoryScaler::new(2);
    queue.set_workers_unknown(Some(WorkersUnknown::new(
        "the worker-event feed is warming up (0s of 6s)",
    )));
    let mut b = default_binding(&queue, &scaler);
    let r = b.tick().await;
    assert_eq!(
        r.outcome,
        Outcome::Unchanged { units: 2 },
        "{:?}",
        r.decision
    );
    let reason = r.reason();
    assert!(reason.contains("worker figures unknown"), "{reason}");
    // Warmed up: the heartbeats show the 8 tasks. Still 2 (ceil(8 / 5)).
    tokio::time::sleep(Duration::from_secs(5)).await;
    queue.set_executing(Some(8));
    for _ in 0..20 {
        let r = b.tick().await;
        assert_eq!(scaler.desired(), 2, "{:?}", r.decision);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    // The tasks end: only now, after the 30 s windows, it scales in.
    queue.set_executing(Some(0));
    let mut scaled_in_after = None;
    for i in 0..20u64 {
        b.tick().await;
        if scaler.desired() == 0 {
            scaled_in_after = Some(i * 5);
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert!(
        scaled_in_after.is_some_and(|s| s >= 30),
        "{scaled_in_after:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fresh_loop_waits_its_scale_in_window_even_with_known_idle_workers() {
    let queue = MemoryQueue::new();
    queue.set_executing(Some(0));
    let scaler = MemoryScaler::new(4);
    let mut b = default_binding(&queue, &scaler);
    let start = Instant::now();
    loop {
        b.tick().await;
        if scaler.desired() < 4 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert!(
        start.elapsed() > Duration::from_secs(30),
        "the first scale-in came {:?} after start",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_feed_outage_or_a_silent_worker_never_scales_in() {
    let queue = MemoryQueue::new();
    let scaler = MemoryScaler::new(4);
    queue.set_executing(Some(4));
    let mut b = default_binding(&queue, &scaler);
    for _ in 0..10 {
        b.tick().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert_eq!(scaler.desired(), 4);
    // The feed drops for 2 minutes, then a solo worker stays silent for 2 more: 4 held.
    for why in ["the worker-event feed is down", "1 worker(s) silent"] {
        queue.set_workers_unknown(Some(WorkersUnknown {
            why: why.into(),
            executing_at_least: 1,
        }));
        for _ in 0..24 {
            let r = b.tick().await;
            assert_eq!(scaler.desired(), 4, "{why}: {:?}", r.decision);
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
    // A backlog still scales out while the figures are unknown.
    queue.publish_n("celery", 40);
    b.tick().await;
    assert_eq!(
        scaler.desired(),
        9,
        "ceil((40 ready + 1 heard executing) / 5)"
    );
}

/// A source that panics on its first `panics` observations (a bug in a backend).
#[derive(Debug)]
struct Panicking {
    panics: Arc<AtomicU32>,
    inner: MemoryQueue,
}

#[async_trait]
impl QueueSource for Panicking {
    async fn observe(&self) -> Result<Observation> {
        if self
            .panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("a bug in a backend");
        }
        self.inner.observe().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_binding_whose_task_panics_is_rebuilt_and_the_run_reports_it() {
    let queue = MemoryQueue::new();
    queue.publish_n("celery", 10);
    let scaler = MemoryScaler::new(0);
    let panics = Arc::new(AtomicU32::new(2));
    let built = Arc::new(AtomicU32::new(0));
    let factory: celery_scale_core::BindingFactory = {
        let (queue, scaler, panics, built) =
            (queue.clone(), scaler.clone(), panics.clone(), built.clone());
        Arc::new(move || {
            built.fetch_add(1, Ordering::SeqCst);
            Ok(Binding::new(
                settings(5),
                Box::new(Panicking {
                    panics: panics.clone(),
                    inner: queue.clone(),
                }),
                Box::new(scaler.clone()),
                backlog_policy().build().unwrap(),
            )
            .unwrap())
        })
    };
    let auto = celery_scale_core::Autoscaler::new()
        .with_restartable_binding(factory)
        .unwrap();
    let cancel = CancellationToken::new();
    let run = tokio::spawn(auto.run(cancel.clone()));
    // Panics at 0 s and again after the 1 s backoff; the third build runs (after 2 s more).
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(built.load(Ordering::SeqCst), 3);
    assert_eq!(scaler.desired(), 2, "the rebuilt binding scales");
    cancel.cancel();
    let report = run.await.unwrap();
    assert_eq!(report.binding_failures, 2);
    assert!(!report.is_clean());

    // Without a factory the binding is reported lost, and the run still ends.
    let panics = Arc::new(AtomicU32::new(1));
    let b = Binding::new(
        settings(5),
        Box::new(Panicking {
            panics,
            inner: queue.clone(),
        }),
        Box::new(scaler.clone()),
        backlog_policy().build().unwrap(),
    )
    .unwrap();
    let report = celery_scale_core::Autoscaler::new()
        .with_binding(b)
        .run(CancellationToken::new())
        .await;
    assert_eq!(report.bindings_lost, ["test"]);
}

/// Heartbeats heard from fewer worker nodes than units run (a restart while `-P solo` workers
/// are busy: the fresh feed hears the idle ones only, and nothing is held or in the queue).
#[derive(Debug)]
struct HeardFew {
    live: u32,
}

#[async_trait]
impl QueueSource for HeardFew {
    async fn observe(&self) -> Result<Observation> {
        let mut obs = Observation::new(0, Instant::now());
        obs.in_flight = None; // e.g. RabbitMQ without the management API
        obs.executing = Some(0);
        obs.live_workers = Some(self.live);
        Ok(obs)
    }
}

#[tokio::test(start_paused = true)]
async fn units_whose_workers_are_not_heard_are_never_scaled_in() {
    let scaler = MemoryScaler::new(8);
    let mut b = Binding::new(
        settings(5),
        Box::new(HeardFew { live: 4 }),
        Box::new(scaler.clone()),
        PolicyConfig::default().build().unwrap(),
    )
    .unwrap();
    for _ in 0..30 {
        let r = b.tick().await;
        assert_eq!(scaler.desired(), 8, "{:?}", r.decision);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let r = b.tick().await;
    let unknown = r.observation.unwrap().workers_unknown.unwrap();
    assert!(
        unknown.why.contains("8 unit(s) running but 4"),
        "{}",
        unknown.why
    );

    // Every unit's worker heard and idle: scales in after the windows.
    let mut b = Binding::new(
        settings(5),
        Box::new(HeardFew { live: 8 }),
        Box::new(scaler.clone()),
        PolicyConfig::default().build().unwrap(),
    )
    .unwrap();
    for _ in 0..30 {
        b.tick().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert!(scaler.desired() < 8);
}

/// Idle queues and idle heard workers, with the held (in-flight) count as given: `None` is a
/// source that cannot count unacknowledged messages (Redis with `in_flight = off`, RabbitMQ
/// without the management API), with two consumers connected.
#[derive(Debug)]
struct IdleHeld {
    in_flight: Option<u64>,
}

#[async_trait]
impl QueueSource for IdleHeld {
    async fn observe(&self) -> Result<Observation> {
        let mut obs = Observation::new(0, Instant::now());
        obs.in_flight = self.in_flight;
        obs.executing = Some(0);
        obs.live_workers = Some(2);
        obs.consumers = Some(2);
        Ok(obs)
    }
}

/// The shipped default policy (30 s `stabilize_down` and `scale_to_zero_after`) over `IdleHeld`.
fn idle_held_binding(in_flight: Option<u64>, scaler: &MemoryScaler) -> Binding {
    Binding::new(
        settings(5),
        Box::new(IdleHeld { in_flight }),
        Box::new(scaler.clone()),
        PolicyConfig::default().build().unwrap(),
    )
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_unknown_held_count_with_workers_connected_never_scales_to_zero() {
    let scaler = MemoryScaler::new(2);
    let mut b = idle_held_binding(None, &scaler);
    let mut last = None;
    // Ten minutes, twenty times the idle window.
    for _ in 0..120 {
        let r = b.tick().await;
        assert!(scaler.desired() >= 1, "{:?}", r.decision);
        last = Some(r);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert_eq!(scaler.desired(), 1, "scales in, down to one");
    let reason = last.unwrap().reason().to_string();
    assert!(reason.contains("held count unknown"), "{reason}");
}

#[tokio::test(start_paused = true)]
async fn a_known_empty_held_count_scales_to_zero_after_the_idle_window() {
    let scaler = MemoryScaler::new(2);
    let mut b = idle_held_binding(Some(0), &scaler);
    let start = Instant::now();
    let mut zero_after = None;
    for _ in 0..120 {
        b.tick().await;
        if scaler.desired() == 0 {
            zero_after = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let zero_after = zero_after.expect("never reached zero");
    assert!(
        zero_after >= Duration::from_secs(30),
        "zero {zero_after:?} after start, before the 30 s idle window"
    );
}
