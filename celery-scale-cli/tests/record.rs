//! `celery-scale record` against real Redis and a real Celery worker run with `-E`: a burst of
//! tasks of known durations is recorded twice at once, from task events and from observations
//! only; both recordings stop on SIGINT, say their mode in the header, and replay with
//! `celery-scale simulate --trace`.

use std::path::Path;
use std::time::{Duration, Instant};

use celery_scale_sim::Trace;
use celery_scale_testing::{Daemon, TempDir, WorkerCommand, publish, run, service, unique};

const BIN: &str = env!("CARGO_BIN_EXE_celery-scale");

/// A one-binding configuration reading `queue` on `redis`, counting only `queue@*` workers
/// (other tests' workers share database 0). The ECS scaler is never built by `record`.
fn config(dir: &TempDir, redis: &str, queue: &str) -> String {
    let path = dir.join("record.toml");
    std::fs::write(
        &path,
        format!(
            r#"[[bindings]]
loop = {{ name = "burst", interval = "5s" }}
policy = {{ max_workers = 4 }}
source = {{ kind = "redis", url = "{redis}", queues = ["{queue}"], worker_hostnames = ["{queue}@*"] }}
scaler = {{ kind = "ecs", cluster = "no-such-cluster", service = "no-such-service", workers_per_task = 2 }}
"#
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// Whether the worker's log has Celery's `{queue}@host ready.` line.
fn worker_ready(log: &str, queue: &str) -> bool {
    log.lines()
        .any(|l| l.contains(&format!("{queue}@")) && l.trim_end().ends_with(" ready."))
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn records_a_real_burst_from_task_events_and_from_observations() {
    let (Some(redis), Some(py)) = (
        service("CELERY_SCALE_REDIS_URL"),
        service("CELERY_SCALE_PYTHON"),
    ) else {
        return;
    };
    let broker = format!("{}/0", redis.trim_end_matches('/'));
    let queue = unique("record");
    let dir = TempDir::new("cli-record");
    let cfg = config(&dir, &broker, &queue);
    let (events_out, obs_out) = (dir.join("events.csv"), dir.join("observed.csv"));
    let recorder = |out: &Path, events: &str, log: &str| {
        Daemon::start(
            Path::new(BIN),
            &[
                "record",
                "--config",
                &cfg,
                "--duration",
                "5m",
                "--out",
                out.to_str().unwrap(),
                "--events",
                events,
                "--every",
                "500ms",
            ],
            &[],
            &dir.join(log),
        )
    };
    let mut with_events = recorder(&events_out, "on", "events.log");
    let mut observing = recorder(&obs_out, "off", "observed.log");
    for r in [&with_events, &observing] {
        wait_until(
            "the recorder subscribed and started",
            Duration::from_secs(15),
            || r.output().contains("recording"),
        );
    }
    // Two worker processes, one message prefetched each: most of the burst waits in the list,
    // so task-received comes long after the publish for the later tasks.
    let worker = WorkerCommand::new(&py, &broker)
        .queues(&queue)
        .concurrency(2)
        .prefetch_multiplier(1)
        .args(&["-E"])
        .spawn();
    wait_until("the worker is ready", Duration::from_secs(30), || {
        worker_ready(&worker.log_tail(), &queue)
    });
    // A heartbeat (every 2 s) before the burst, so the observing recorder knows the worker.
    std::thread::sleep(Duration::from_millis(2500));
    publish(&py, &broker, &queue, 6, 2.0);
    publish(&py, &broker, &queue, 4, 0.5);
    // 14 s of work on 2 processes: drained after ~7 s; then a heartbeat more.
    std::thread::sleep(Duration::from_secs(10));
    for r in [&with_events, &observing] {
        r.signal("INT");
    }
    let (s1, s2) = (
        with_events.wait(Duration::from_secs(10)),
        observing.wait(Duration::from_secs(10)),
    );
    assert!(s1.success(), "{}", with_events.tail(20));
    assert!(s2.success(), "{}", observing.tail(20));
    drop(worker);

    // From task events: every task, its measured duration, the binding's queue, and arrivals
    // at the burst (not spread over the 7 s the workers took to receive them).
    let text = std::fs::read_to_string(&events_out).unwrap();
    assert!(
        text.starts_with("# celery-scale record: binding \"burst\" (redis)"),
        "{text}"
    );
    assert!(text.contains("interrupted (SIGINT/SIGTERM)"), "{text}");
    assert!(text.contains("# mode: task events"), "{text}");
    assert!(!text.contains(&redis), "no broker URL in the file: {text}");
    let trace = Trace::from_csv(&text).unwrap();
    assert_eq!(trace.tasks(), 10, "{text}");
    let mut durations: Vec<f64> = Vec::new();
    for a in trace.arrivals() {
        assert_eq!(a.queue, queue);
        for _ in 0..a.count {
            durations.push(a.duration.as_secs_f64());
        }
    }
    durations.sort_by(f64::total_cmp);
    for (i, d) in durations.iter().enumerate() {
        let expected = if i < 4 { 0.5 } else { 2.0 };
        assert!(
            (expected..expected + 0.3).contains(d),
            "task {i}: {d} s, expected {expected} s:\n{text}"
        );
    }
    let first = trace.arrivals().first().unwrap().at;
    let spread = trace.end() - first;
    assert!(
        spread <= Duration::from_millis(1500),
        "the burst's arrivals spread over {spread:?} (receipts spread over ~6 s):\n{text}"
    );
    assert!(
        first >= Duration::from_secs(2),
        "arrived after the start: {text}"
    );

    // From observations only: an estimate, said so; the count within tolerance and one
    // heartbeat-measured duration near the mean (1.4 s).
    let obs_text = std::fs::read_to_string(&obs_out).unwrap();
    assert!(
        obs_text.contains("# mode: observations: AN ESTIMATE"),
        "{obs_text}"
    );
    assert!(obs_text.contains("heartbeat-measured mean"), "{obs_text}");
    let estimated = Trace::from_csv(&obs_text).unwrap();
    assert!(
        (9..=11).contains(&estimated.tasks()),
        "{} tasks estimated:\n{obs_text}",
        estimated.tasks()
    );
    let mean = estimated.arrivals()[0].duration.as_secs_f64();
    assert!((0.9..2.2).contains(&mean), "mean {mean}:\n{obs_text}");
    let estimated_spread = estimated.end() - estimated.arrivals()[0].at;
    assert!(estimated_spread <= Duration::from_secs(4), "{obs_text}");

    println!("{text}\n{obs_text}");

    // Both replay through the binding's policy.
    for (out, tasks) in [(&events_out, 10), (&obs_out, estimated.tasks())] {
        let (status, stdout, stderr) = run(
            Path::new(BIN),
            &[
                "simulate",
                "--config",
                &cfg,
                "--trace",
                out.to_str().unwrap(),
            ],
            &[],
        );
        assert!(status.success(), "{stderr}");
        assert!(
            stdout.starts_with(&format!("trace: {tasks} tasks")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("completed {tasks} of {tasks} tasks")),
            "{stdout}"
        );
    }
}

#[test]
fn records_task_events_from_rabbitmq() {
    let (Some(amqp), Some(py)) = (
        service("CELERY_SCALE_AMQP_URL"),
        service("CELERY_SCALE_PYTHON"),
    ) else {
        return;
    };
    let queue = unique("record-amqp");
    let dir = TempDir::new("cli-record-amqp");
    let cfg = dir.join("amqp.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[[bindings]]
loop = {{ name = "amqp-burst" }}
source = {{ kind = "amqp", url = "{amqp}", queues = ["{queue}"], worker_hostnames = ["{queue}@*"] }}
scaler = {{ kind = "ecs", cluster = "c", service = "s" }}
"#
        ),
    )
    .unwrap();
    // The worker declares the queue first: the source reads a queue it found missing again
    // only after a while.
    let worker = WorkerCommand::new(&py, &amqp)
        .queues(&queue)
        .concurrency(2)
        .args(&["-E"])
        .spawn();
    wait_until("the worker is ready", Duration::from_secs(30), || {
        worker_ready(&worker.log_tail(), &queue)
    });
    let out = dir.join("amqp.csv");
    let mut recorder = Daemon::start(
        Path::new(BIN),
        &[
            "record",
            "--config",
            cfg.to_str().unwrap(),
            "--duration",
            "5m",
            "--out",
            out.to_str().unwrap(),
            "--every",
            "500ms",
        ],
        &[],
        &dir.join("amqp.log"),
    );
    wait_until(
        "the recorder subscribed and started",
        Duration::from_secs(15),
        || recorder.output().contains("recording"),
    );
    std::thread::sleep(Duration::from_millis(1000));
    publish(&py, &amqp, &queue, 6, 1.0);
    std::thread::sleep(Duration::from_secs(6));
    recorder.signal("INT");
    assert!(
        recorder.wait(Duration::from_secs(10)).success(),
        "{}",
        recorder.tail(20)
    );
    drop(worker);
    let text = std::fs::read_to_string(&out).unwrap();
    println!("{text}");
    assert!(
        text.contains("(amqp)") && text.contains("auto (task events heard: used)"),
        "{text}"
    );
    assert!(!text.contains(&amqp), "{text}");
    let trace = Trace::from_csv(&text).unwrap();
    assert_eq!(trace.tasks(), 6, "{text}");
    for a in trace.arrivals() {
        assert_eq!(a.queue, queue);
        assert!((1.0..1.3).contains(&a.duration.as_secs_f64()), "{text}");
    }
    // Four are received at once (two running, two prefetched), the last two a second later
    // and the last receipts about three seconds after the publish: placed by the backlog, all
    // six arrive well within that (within two --every readings plus the management API's lag
    // on a loaded machine: CI saw 0.9 s).
    assert!(
        trace.end() - trace.arrivals()[0].at <= Duration::from_millis(1500),
        "{text}"
    );
}

#[test]
fn mistakes_are_refused_before_anything_is_read() {
    let dir = TempDir::new("cli-record-mistakes");
    let two = dir.join("two.toml");
    std::fs::write(
        &two,
        r#"[[bindings]]
loop = { name = "a" }
source = { kind = "redis", url = "redis://:s3cret@127.0.0.1:1/0", queues = ["a"] }
scaler = { kind = "ecs", cluster = "c", service = "a" }

[[bindings]]
loop = { name = "b" }
source = { kind = "sqs", url = "sqs://", queues = ["b"] }
scaler = { kind = "ecs", cluster = "c", service = "b" }
"#,
    )
    .unwrap();
    let out = dir.join("t.csv");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "record",
            "--config",
            two.to_str().unwrap(),
            "--duration",
            "1s",
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    for (extra, said) in [
        (&[][..], "name one with --binding (\"a\", \"b\")"),
        (&["--binding", "c"][..], "no binding named \"c\""),
        (
            &["--binding", "b", "--events", "on"][..],
            "SQS carries no Celery events",
        ),
    ] {
        let a = args(extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let (status, stdout, stderr) = run(Path::new(BIN), &a, &[]);
        assert_eq!(status.code(), Some(2), "{extra:?}: {stdout}{stderr}");
        assert!(stderr.contains(said), "{extra:?}: {stderr}");
        assert!(!stderr.contains("s3cret") && !stdout.contains("s3cret"));
        assert!(!out.exists(), "nothing written");
    }
}
