//! Celery's event exchange is untrusted input for `record`: any body decodes to events or
//! errors, and no sequence of decoded events, whatever its numbers and names, makes the
//! recorder panic, track more tasks than its cap, or write a trace that does not read back.

use std::time::Duration;

use celery_scale_sim::Trace;
use celery_scale_sim::record::{
    CeleryEvent, EventsMode, Recorder, RecorderSettings, decode_celery_events,
};
use proptest::prelude::*;

/// Numbers a hostile or broken publisher may send, as JSON text.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<f64>().prop_map(|f| format!("{f:e}")),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<u64>().prop_map(|u| u.to_string()),
        (0.0..1e4f64).prop_map(|f| f.to_string()),
        Just("1e308".to_string()),
        Just("-1e308".to_string()),
        Just("18446744073709551616".to_string()),
        Just("0".to_string()),
        Just("-0.0".to_string()),
        Just("5e-324".to_string()),
        Just("\"2\"".to_string()),
        Just("null".to_string()),
        Just("[]".to_string()),
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-c]{1,2}",
        "[a-z@.,#\\n -]{0,12}",
        Just("x".repeat(300)),
        Just(String::new()),
    ]
}

fn event_json() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just("task-sent"),
            Just("task-received"),
            Just("task-started"),
            Just("task-succeeded"),
            Just("task-failed"),
            Just("task-retried"),
            Just("task-rejected"),
            Just("task-revoked"),
            Just("worker-heartbeat"),
            Just("worker-online"),
            Just("worker-offline"),
            Just("custom"),
        ],
        name(),
        name(),
        name(),
        (number(), number(), number(), number(), number()),
    )
        .prop_map(|(kind, uuid, host, queue, (ts, runtime, active, processed, freq))| {
            // Names go through serde_json so that odd characters stay valid JSON.
            let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
            format!(
                r#"{{"type": "{kind}", "uuid": {}, "hostname": {}, "queue": {}, "timestamp": {ts}, "runtime": {runtime}, "active": {active}, "processed": {processed}, "freq": {freq}}}"#,
                q(&uuid),
                q(&host),
                q(&queue)
            )
        })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        event_json().prop_map(String::into_bytes),
        prop::collection::vec(event_json(), 0..30).prop_map(|events| format!(
            "[{}]",
            events.join(",")
        )
        .into_bytes()),
        prop::collection::vec(any::<u8>(), 0..200),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_celery_events(&bytes);
    }

    #[test]
    fn any_event_stream_gives_a_bounded_recorder_and_a_readable_trace(
        bodies in prop::collection::vec((body(), 0u64..100_000, prop::option::of(0u64..1_000_000)), 0..40),
        mode in prop_oneof![Just(EventsMode::Auto), Just(EventsMode::On), Just(EventsMode::Off)],
    ) {
        let settings = RecorderSettings {
            max_tracked: 5,
            max_tasks: 50,
            queues: vec!["a".into(), "b".into()],
            default_queue: "a".into(),
            ..RecorderSettings::default()
        };
        let mut recorder = Recorder::new(settings);
        for (i, (body, ready, held)) in bodies.iter().enumerate() {
            let at = Duration::from_millis(500 * i as u64);
            let mut events: Vec<CeleryEvent> = Vec::new();
            for e in decode_celery_events(body) {
                match e {
                    Ok(e) => events.push(e),
                    Err(_) => recorder.undecodable(),
                }
            }
            recorder.apply(at, &events);
            recorder.observe(at, *ready, held.map(|h| h.saturating_add(*ready)));
            prop_assert!(recorder.stats().completed <= 50);
        }
        let end = Duration::from_millis(500 * bodies.len() as u64);
        let recording = recorder.finish(end, mode);
        let csv = recording.to_csv(&["fuzz".into()]);
        let back = Trace::from_csv(&csv).map_err(|e| TestCaseError::fail(format!("{e}: {csv}")))?;
        prop_assert_eq!(back.tasks(), recording.trace.tasks());
        prop_assert!(back.arrivals().iter().all(|a| a.at <= end));
    }
}
