//! Worker events are untrusted input: anything any broker client publishes on the event
//! channel or exchange must decode to an event or an error, and a decoded event must never
//! make the registry panic, whatever its numbers.

use std::time::Duration;

use base64::Engine as _;
use celery_scale_core::celery_events::{
    MAX_HEARTBEAT_FREQ, WorkerEvent, WorkerRegistry, decode_kombu_envelope,
};
use proptest::prelude::*;
use tokio::time::Instant;

/// Numbers a hostile or broken publisher may send, as JSON text.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<f64>().prop_map(|f| format!("{f:e}")),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<u64>().prop_map(|u| u.to_string()),
        Just("1e19".to_string()),
        Just("1e308".to_string()),
        Just("-1e308".to_string()),
        Just("18446744073709551616".to_string()),
        Just("9223372036854775808".to_string()),
        Just("0".to_string()),
        Just("-0.0".to_string()),
        Just("5e-324".to_string()),
        Just("\"2\"".to_string()),
        Just("null".to_string()),
        Just("[]".to_string()),
    ]
}

fn event_json() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just("worker-heartbeat"),
            Just("worker-online"),
            Just("worker-offline"),
            Just("task-succeeded"),
        ],
        "[a-z@.-]{0,12}",
        number(),
        number(),
        number(),
        number(),
    )
        .prop_map(|(kind, host, active, processed, freq, ts)| {
            format!(
                r#"{{"type": "{kind}", "hostname": "{host}", "active": {active}, "processed": {processed}, "freq": {freq}, "timestamp": {ts}}}"#
            )
        })
}

fn feed(events: &[WorkerEvent]) {
    let mut registry = WorkerRegistry::default();
    let t0 = Instant::now();
    for (i, e) in events.iter().enumerate() {
        let at = t0 + Duration::from_millis(700 * i as u64);
        registry.apply(e, at);
        let _ = registry.reading(at);
    }
    let _ = registry.reading(t0 + Duration::from_secs(100_000));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = WorkerEvent::from_json(&bytes);
        let _ = WorkerEvent::from_kombu_envelope(&bytes);
        let _ = decode_kombu_envelope(&bytes);
    }

    #[test]
    fn extreme_numbers_are_decoded_or_refused_and_never_panic_the_registry(
        bodies in prop::collection::vec(event_json(), 1..20),
        wrap in any::<bool>(),
    ) {
        let mut events = Vec::new();
        for body in &bodies {
            let decoded = if wrap {
                let b64 = base64::engine::general_purpose::STANDARD.encode(body);
                let env = format!(r#"{{"body": "{b64}", "properties": {{"body_encoding": "base64"}}}}"#);
                WorkerEvent::from_kombu_envelope(env.as_bytes())
            } else {
                WorkerEvent::from_json(body.as_bytes())
            };
            if let Ok(e) = decoded {
                prop_assert!(e.freq.is_finite() && e.freq > 0.0 && e.freq <= MAX_HEARTBEAT_FREQ.as_secs_f64(), "{e:?}");
                prop_assert!(e.timestamp.is_finite());
                events.push(e);
            }
        }
        feed(&events);
    }
}
