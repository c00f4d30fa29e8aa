//! Helpers of the end-to-end tests: the shared ones from `celery-scale-testing`, and ticking a
//! binding until a condition holds.
#![allow(dead_code)]

use std::time::Duration;

use celery_scale::Binding;
use celery_scale::record::DecisionRecord;
pub use celery_scale_testing::{Worker, unique};
use tokio::time::Instant;

/// Runs a Python script (or `-c` snippet) of the Celery test app against `broker`; it must
/// succeed. Returns its stdout.
pub fn python(py: &str, broker: &str, args: &[&str]) -> String {
    celery_scale_testing::python(py, broker, args, &[])
}

/// As [`python`], whatever its exit status (for clean-up).
pub fn python_unchecked(py: &str, broker: &str, args: &[&str]) -> std::process::Output {
    celery_scale_testing::python_unchecked(py, broker, args, &[])
}

/// Ticks `b` until `done` holds, or panics with the last records after `within`.
pub async fn tick_until(
    b: &mut Binding,
    within: Duration,
    what: &str,
    mut done: impl FnMut(&DecisionRecord) -> bool,
) -> Vec<DecisionRecord> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let r = b.tick().await;
        let stop = done(&r);
        seen.push(r);
        if stop {
            return seen;
        }
        if Instant::now() > deadline {
            let tail: Vec<String> = seen
                .iter()
                .rev()
                .take(5)
                .map(|r| serde_json::to_string(r).unwrap())
                .collect();
            panic!(
                "{what}: not reached within {within:?}; last records:\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
