//! The loop's metrics, read through `metrics-util`'s debugging recorder: a figure the loop does
//! not have this tick is NaN (never the last value seen), and a binding whose task fails is
//! counted, its gauges marked unknown while it is rebuilt, then counted as restarted.
//!
//! Each test has a recorder of its own, local to its thread (see `with_recorder`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use celery_scale_core::config::PolicyConfig;
use celery_scale_core::{
    Binding, CancellationToken, LoopSettings, MemoryQueue, MemoryScaler, Observation, QueueSource,
    Result, WorkersUnknown,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// Runs `test` on a paused current-thread runtime with a debugging recorder of its own (local
/// to this thread, where every task of that runtime runs), so tests do not see each other's
/// metrics.
fn with_recorder(test: impl AsyncFnOnce(&Snapshotter)) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || rt.block_on(test(&snapshotter)));
}

/// The metrics of one binding at one moment. Taking it resets the recorder's values (counters
/// count from 0 again, gauges read 0 until set), so each phase of a test takes one.
struct Readings(Vec<(String, DebugValue)>);

impl Readings {
    fn take(s: &Snapshotter, binding: &str) -> Self {
        Readings(
            s.snapshot()
                .into_vec()
                .into_iter()
                .filter(|(key, _, _, _)| {
                    key.key()
                        .labels()
                        .any(|l| l.key() == "binding" && l.value() == binding)
                })
                .map(|(key, _, _, v)| (key.key().name().to_string(), v))
                .collect(),
        )
    }

    fn gauge(&self, name: &str) -> f64 {
        match self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v) {
            Some(DebugValue::Gauge(v)) => v.into_inner(),
            other => panic!("{name} is not a gauge: {other:?}"),
        }
    }

    /// The counter's increments since the last reading (summed over its other labels).
    fn counter(&self, name: &str) -> u64 {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| match v {
                DebugValue::Counter(c) => *c,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    }
}

/// The figure gauges every tick sets.
const FIGURES: [&str; 4] = [
    "celery_scale_ready_messages",
    "celery_scale_in_flight_messages",
    "celery_scale_executing_tasks",
    "celery_scale_live_workers",
];

fn settings(name: &str) -> LoopSettings {
    LoopSettings {
        name: name.into(),
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(2),
        ..LoopSettings::default()
    }
}

fn binding(name: &str, source: Box<dyn QueueSource>, scaler: &MemoryScaler) -> Binding {
    Binding::new(
        settings(name),
        source,
        Box::new(scaler.clone()),
        PolicyConfig::default().build().unwrap(),
    )
    .unwrap()
}

#[test]
fn figures_the_loop_does_not_have_are_nan_not_the_last_value() {
    const B: &str = "metrics-unknown";
    with_recorder(async |metrics| {
        let queue = MemoryQueue::new();
        queue.publish_n("celery", 10);
        queue.set_executing(Some(2));
        let scaler = MemoryScaler::new(1);
        let mut b = binding(B, Box::new(queue.clone()), &scaler);

        b.tick().await;
        let m = Readings::take(metrics, B);
        assert_eq!(m.gauge("celery_scale_ready_messages"), 10.0);
        assert_eq!(m.gauge("celery_scale_executing_tasks"), 2.0);
        assert_eq!(m.gauge("celery_scale_observation_fresh"), 1.0);
        assert_eq!(m.gauge("celery_scale_worker_figures_known"), 1.0);
        assert_eq!(m.counter("celery_scale_decisions_total"), 1);

        // The worker figures become unknown (a feed outage): executing is NaN, ready known.
        queue.set_workers_unknown(Some(WorkersUnknown::new("the worker-event feed is down")));
        b.tick().await;
        let m = Readings::take(metrics, B);
        assert!(m.gauge("celery_scale_executing_tasks").is_nan());
        assert!(m.gauge("celery_scale_live_workers").is_nan());
        assert_eq!(m.gauge("celery_scale_worker_figures_known"), 0.0);
        assert_eq!(m.gauge("celery_scale_ready_messages"), 10.0);

        // The observation fails: every figure is NaN, the observation not fresh, the error
        // counted.
        queue.set_workers_unknown(None);
        queue.set_down(true);
        let r = b.tick().await;
        assert!(r.observation_error.is_some(), "{r:?}");
        let m = Readings::take(metrics, B);
        for name in FIGURES {
            assert!(m.gauge(name).is_nan(), "{name} = {}", m.gauge(name));
        }
        assert_eq!(m.gauge("celery_scale_observation_fresh"), 0.0);
        assert_eq!(m.gauge("celery_scale_worker_figures_known"), 0.0);
        assert_eq!(m.counter("celery_scale_errors_total"), 1);

        // Back: the figures are values again.
        queue.set_down(false);
        b.tick().await;
        let m = Readings::take(metrics, B);
        assert_eq!(m.gauge("celery_scale_ready_messages"), 10.0);
        assert_eq!(m.gauge("celery_scale_observation_fresh"), 1.0);
    });
}

/// A source that panics on its `panic_at`-th observation (counted across rebuilds).
#[derive(Debug)]
struct PanicsOnce {
    observed: Arc<AtomicU32>,
    panic_at: u32,
    inner: MemoryQueue,
}

#[async_trait]
impl QueueSource for PanicsOnce {
    async fn observe(&self) -> Result<Observation> {
        if self.observed.fetch_add(1, Ordering::SeqCst) + 1 == self.panic_at {
            panic!("a bug in a backend");
        }
        self.inner.observe().await
    }
}

#[test]
fn a_failed_binding_is_counted_marked_unknown_while_rebuilt_and_counted_restarted() {
    const B: &str = "metrics-panics";
    with_recorder(async |metrics| {
        let queue = MemoryQueue::new();
        queue.publish_n("celery", 10);
        queue.set_executing(Some(1));
        let scaler = MemoryScaler::new(1);
        let observed = Arc::new(AtomicU32::new(0));
        let factory: celery_scale_core::BindingFactory = {
            let (queue, scaler, observed) = (queue.clone(), scaler.clone(), observed.clone());
            Arc::new(move || {
                Ok(binding(
                    B,
                    Box::new(PanicsOnce {
                        observed: observed.clone(),
                        panic_at: 2,
                        inner: queue.clone(),
                    }),
                    &scaler,
                ))
            })
        };
        let auto = celery_scale_core::Autoscaler::new()
            .with_restartable_binding(factory)
            .unwrap();
        let cancel = CancellationToken::new();
        let run = tokio::spawn(auto.run(cancel.clone()));

        // 0 s: a good tick. 5 s: the second observation panics; the rebuild waits 1 s.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let m = Readings::take(metrics, B);
        assert_eq!(m.gauge("celery_scale_ready_messages"), 10.0);
        assert_eq!(m.gauge("celery_scale_observation_fresh"), 1.0);
        assert_eq!(m.counter("celery_scale_binding_failures_total"), 0);
        // 5.5 s: within the backoff. (The last tick's values were read, and so reset, above:
        // what is read now was set after the failure.)
        tokio::time::sleep(Duration::from_millis(3000)).await;
        assert_eq!(observed.load(Ordering::SeqCst), 2);
        let m = Readings::take(metrics, B);
        assert_eq!(m.counter("celery_scale_binding_failures_total"), 1);
        assert_eq!(m.counter("celery_scale_binding_restarts_total"), 0);
        for name in FIGURES.into_iter().chain([
            "celery_scale_desired_workers",
            "celery_scale_desired_units",
            "celery_scale_running_units",
        ]) {
            assert!(
                m.gauge(name).is_nan(),
                "{name} = {} while the binding is down",
                m.gauge(name)
            );
        }
        assert_eq!(m.gauge("celery_scale_observation_fresh"), 0.0);
        assert_eq!(m.gauge("celery_scale_worker_figures_known"), 0.0);

        // 6.5 s: rebuilt at 6 s, and its first tick reports again.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let m = Readings::take(metrics, B);
        assert_eq!(m.counter("celery_scale_binding_restarts_total"), 1);
        assert_eq!(m.counter("celery_scale_binding_failures_total"), 0);
        assert_eq!(m.gauge("celery_scale_ready_messages"), 10.0);
        assert_eq!(m.gauge("celery_scale_observation_fresh"), 1.0);
        cancel.cancel();
        let report = run.await.unwrap();
        assert_eq!(report.binding_failures, 1);
    });
}
