//! Helpers shared by the end-to-end tests: the shared Celery test app (publisher and worker)
//! and ticking a binding until a condition holds.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use celery_scale::Binding;
use celery_scale::record::DecisionRecord;
use tokio::time::Instant;

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// `testing/celery`: the shared Celery app and publisher.
pub fn celery_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testing/celery")
}

/// Runs a Python script (or `-c` snippet) of the shared Celery app against `broker`, whatever
/// its exit status (for clean-up).
pub fn python_unchecked(py: &str, broker: &str, args: &[&str]) -> std::process::Output {
    Command::new(py)
        .args(args)
        .current_dir(celery_dir())
        .env("PYTHONPATH", celery_dir())
        .env("CELERY_SCALE_TEST_BROKER", broker)
        .output()
        .expect("run the Celery test app's python")
}

/// Runs a Python script (or `-c` snippet) of the shared Celery app against `broker`; it must
/// succeed.
pub fn python(py: &str, broker: &str, args: &[&str]) -> std::process::Output {
    let out = python_unchecked(py, broker, args);
    assert!(
        out.status.success(),
        "python {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A Celery worker process (its own process group), killed with its pool when dropped.
pub struct Worker(Child);

impl Worker {
    /// `celery -A app worker -c 4 --prefetch-multiplier 1 -Q queue`.
    pub fn start(py: &str, broker: &str, queue: &str) -> Self {
        Worker::start_with(py, broker, queue, &[], &[])
    }

    /// As [`Worker::start`], with extra worker arguments and environment variables.
    pub fn start_with(
        py: &str,
        broker: &str,
        queue: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        use std::os::unix::process::CommandExt as _;
        let celery = PathBuf::from(py).with_file_name("celery");
        let child = Command::new(celery)
            .args([
                "-A",
                "app",
                "worker",
                "-c",
                "4",
                "--prefetch-multiplier",
                "1",
            ])
            .args(["-Q", queue, "-n", &format!("{queue}@%h")])
            .args(["--without-mingle", "--without-gossip"])
            .args(args)
            .envs(env.iter().copied())
            .current_dir(celery_dir())
            .env("PYTHONPATH", celery_dir())
            .env("CELERY_SCALE_TEST_BROKER", broker)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start a Celery worker");
        Worker(child)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
