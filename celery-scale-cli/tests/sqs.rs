//! The `celery-scale` binary on Celery's Amazon SQS broker (moto's SQS and ECS): real Celery
//! (kombu's SQS transport) publishes a burst to a queue with a prefix of the test's own, the
//! daemon (a child process, configured by file) scales an ECS service on moto out, a real
//! Celery worker on SQS drains the queue, and the daemon scales back in once SQS holds nothing,
//! then exits 0 on SIGTERM. And `celery-scale check` on such a configuration.
//!
//! Needs the services `scripts/test.sh` starts (moto, the Celery venv with boto3 and pycurl).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use celery_scale_testing::{
    Daemon, MotoTarget, Services, TempDir, WorkerCommand, publish_script, run, unique, wait_for,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_celery-scale");

/// Workers per ECS task in these tests.
const PER_UNIT: u32 = 2;

/// One test's Celery-on-SQS set-up: its broker URL, its queue-name prefix (its queues are
/// deleted when it is dropped) and the transport options Celery gets.
struct Sqs {
    s: Services,
    broker: String,
    prefix: String,
    _queues: common::Queues,
}

impl Sqs {
    fn new(tag: &str) -> Option<Self> {
        let s = Services::get()?;
        let prefix = format!("{}-", unique(tag));
        Some(Sqs {
            broker: common::broker_url(&s.moto),
            _queues: common::Queues {
                moto: s.moto.clone(),
                prefix: prefix.clone(),
            },
            prefix,
            s,
        })
    }

    /// Celery's `broker_transport_options`: the prefix, moto's region, quick polls.
    fn options(&self) -> Value {
        json!({
            "queue_name_prefix": self.prefix,
            "region": "us-east-1",
            "wait_time_seconds": 1,
            "polling_interval": 0.2,
        })
    }

    /// Publishes `count` tasks sleeping `seconds` on Celery's queue `celery` (the SQS queue
    /// `{prefix}celery`); returns kombu's own count of it.
    fn publish(&self, count: u32, seconds: f64) -> u64 {
        let (count_s, seconds) = (count.to_string(), seconds.to_string());
        let out = publish_script(
            "publish.py",
            &self.s.python,
            &self.broker,
            &self.options(),
            &json!({}),
            &[
                "--queue",
                "celery",
                "--count",
                &count_s,
                "--seconds",
                &seconds,
            ],
        );
        assert_eq!(out["published"], count);
        out["kombu_size"]["celery"].as_u64().expect("kombu's size")
    }

    /// The SQS name of Celery's `celery` queue.
    fn sqs_name(&self) -> String {
        format!("{}celery", self.prefix)
    }

    /// (visible, not visible) of the queue, read straight from SQS.
    fn counts(&self) -> (u64, u64) {
        common::counts(&self.s.moto, &self.sqs_name())
    }

    /// The `[bindings.source]` table: Celery's broker URL and its transport options, pasted.
    fn source_toml(&self) -> String {
        format!(
            "kind = \"sqs\"\nurl = \"{}\"\nqueues = [\"celery\"]\nqueue_name_prefix = \"{}\"\nregion = \"us-east-1\"\n",
            self.broker, self.prefix
        )
    }
}

/// One binding: 5 messages per worker, back to 0 three seconds after SQS holds nothing.
fn config(source: &str, scaler: &str) -> String {
    format!(
        r#"[[bindings]]
loop = {{ name = "sqs-e2e", interval = "1s" }}
policy = {{ kind = "target_backlog", messages_per_worker = 5.0, max_workers = 8, stabilize_down = "3s", scale_to_zero_after = "3s" }}

[bindings.source]
{source}
[bindings.scaler]
{scaler}"#
    )
}

#[test]
fn a_burst_on_sqs_scales_an_ecs_service_out_and_back_in() {
    let Some(q) = Sqs::new("cli-sqs") else { return };
    let target = MotoTarget::ecs(&q.s, "cli-sqs-ecs");
    let dir = TempDir::new("cli-sqs");
    let path = dir.join("celery-scale.toml");
    std::fs::write(
        &path,
        config(&q.source_toml(), &target.scaler_toml(PER_UNIT)),
    )
    .unwrap();

    // 20 tasks of 2 s: 20 / 5 = 4 workers = 2 tasks of 2.
    assert_eq!(q.publish(20, 2.0), 20, "kombu's own count");
    let mut daemon = Daemon::start(
        Path::new(BIN),
        &["run", "--config", path.to_str().unwrap()],
        &q.s.aws_env(),
        &dir.join("daemon.log"),
    );
    wait_for(
        Duration::from_secs(40),
        "scale out to 2 ECS tasks",
        || (target.desired() == 2).then_some(()),
        || daemon.tail(20),
    );

    // One worker (4 processes, acks_late: an executing task stays not-visible, so SQS counts
    // it) drains the queue in about 10 s. While SQS holds any message the worker figures are
    // unknown (SQS carries no worker events) and every running worker may be busy: no
    // scale-in. The desired count is read before the counts: messages are only deleted now, so
    // a message still there after the read was there at the daemon's ticks before it.
    let worker = WorkerCommand::new(&q.s.python, &q.broker)
        .queues("celery")
        .concurrency(4)
        .prefetch_multiplier(1)
        .transport_options(&q.options())
        .config(&json!({"task_acks_late": true}))
        .spawn();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut held_seen = false;
    loop {
        let desired = target.desired();
        let (visible, not_visible) = q.counts();
        if visible + not_visible == 0 {
            break;
        }
        held_seen |= visible == 0 && not_visible > 0;
        assert_eq!(
            desired,
            2,
            "scaled in while SQS held {visible} visible and {not_visible} not-visible \
             message(s):\n{}\n{}",
            daemon.tail(10),
            worker.log_tail()
        );
        assert!(
            Instant::now() < deadline,
            "the worker did not drain the queue: {visible} visible, {not_visible} not \
             visible\n{}",
            worker.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        held_seen,
        "the drain's tail (nothing visible, tasks executing) was seen: {}",
        worker.log_tail()
    );
    wait_for(
        Duration::from_secs(60),
        "scale back in to 0",
        || (target.desired() == 0).then_some(()),
        || daemon.tail(20),
    );
    let status = daemon.stop(Duration::from_secs(20));
    assert!(status.success(), "{status}: {}", daemon.tail(20));
    let log = daemon.output();
    assert!(log.contains("celery-scale decision"), "{log}");
    assert!(
        log.contains("worker figures unknown"),
        "the guard held the scale-in while messages were in flight:\n{}",
        daemon.tail(40)
    );
    drop(worker);
}

#[test]
fn check_on_an_sqs_configuration_says_what_it_would_do_and_sets_nothing() {
    let Some(q) = Sqs::new("cli-sqs-check") else {
        return;
    };
    let target = MotoTarget::ecs(&q.s, "cli-sqs-check");
    let dir = TempDir::new("cli-sqs-check");
    let path = dir.join("celery-scale.toml");
    std::fs::write(
        &path,
        config(&q.source_toml(), &target.scaler_toml(PER_UNIT)),
    )
    .unwrap();
    // 7 tasks: 7 / 5 -> 2 workers = 1 ECS task of 2.
    assert_eq!(q.publish(7, 0.1), 7);
    let (status, out, err) = run(
        Path::new(BIN),
        &["check", "--config", path.to_str().unwrap()],
        &q.s.aws_env(),
    );
    assert!(status.success(), "{status}\n{out}\n{err}");
    assert!(
        out.contains("binding \"sqs-e2e\" (sqs -> ECS service"),
        "{out}"
    );
    assert!(
        out.contains("queues: 7 ready, 0 in flight, unknown executing, unknown live workers"),
        "{out}"
    );
    assert!(out.contains("capacity: desired 0"), "{out}");
    assert!(out.contains("decision: would set 0 -> 1"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
    assert_eq!(target.desired(), 0, "check set nothing");
    assert_eq!(q.counts(), (7, 0), "check took no message");

    // The broker URL's credentials are never shown, and a queue that does not exist is a
    // failed observation naming it (status 1).
    let missing = config(&q.source_toml(), &target.scaler_toml(PER_UNIT))
        .replace("queues = [\"celery\"]", "queues = [\"nowhere\"]");
    std::fs::write(&path, missing).unwrap();
    let (status, out, err) = run(
        Path::new(BIN),
        &["check", "--config", path.to_str().unwrap()],
        &q.s.aws_env(),
    );
    assert_eq!(status.code(), Some(1), "{out}\n{err}");
    assert!(out.contains("observe: FAILED"), "{out}");
    assert!(out.contains(&format!("{}nowhere", q.prefix)), "{out}");
    assert!(!out.contains("testing:testing") && !err.contains("testing:testing"));
}
