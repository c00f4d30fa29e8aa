//! The `celery-scale` binary end to end, for all four source x target combinations: real
//! Celery publishes a burst to real Redis or RabbitMQ, the daemon (a child process, configured
//! by file) sets an ECS service's or Auto Scaling Group's desired count on moto, a real Celery
//! worker drains the queue, and the daemon scales back in and exits 0 on SIGTERM.
//!
//! Needs the services `scripts/test.sh` starts (Redis, RabbitMQ, moto, the Celery venv).

use std::path::Path;
use std::time::Duration;

use celery_scale_testing::{
    Daemon, MotoTarget, Services, TempDir, Worker, WorkerCommand, publish, python_unchecked,
    unique, wait_for,
};

const BIN: &str = env!("CARGO_BIN_EXE_celery-scale");

/// Workers per ECS task or EC2 instance in these tests.
const PER_UNIT: u32 = 2;

#[derive(Debug, Clone, Copy)]
enum Broker {
    /// Redis, in its own database.
    Redis(u32),
    Amqp,
}

impl Broker {
    fn url(self, s: &Services) -> String {
        match self {
            Broker::Redis(db) => s.redis_db(db),
            Broker::Amqp => s.amqp.clone(),
        }
    }

    fn source_toml(self, s: &Services, queue: &str) -> String {
        let kind = match self {
            Broker::Redis(_) => "redis",
            Broker::Amqp => "amqp",
        };
        // Held messages counted per queue: other tests share the database.
        let in_flight = match self {
            Broker::Redis(_) => "in_flight = \"per_queue\"\n",
            Broker::Amqp => "",
        };
        format!(
            "kind = \"{kind}\"\nurl = \"{}\"\nqueues = [\"{queue}\"]\nworker_hostnames = [\"{queue}@*\"]\n{in_flight}",
            self.url(s)
        )
    }

    /// Deletes the test's queue.
    fn cleanup(self, s: &Services, queue: &str) {
        let code = match self {
            Broker::Redis(_) => format!(
                "import redis, os; redis.Redis.from_url(os.environ['CELERY_SCALE_TEST_BROKER']).delete({queue:?})"
            ),
            Broker::Amqp => format!(
                "from app import app\nwith app.connection_for_write() as c:\n    c.default_channel.queue_delete({queue:?})"
            ),
        };
        let _ = python_unchecked(&s.python, &self.url(s), &["-c", &code], &[]);
    }
}

/// One binding on `queue` scaling `target`: 5 messages per worker, back to 0 three seconds
/// after the queue is idle.
fn config(source: &str, scaler: &str) -> String {
    format!(
        r#"[[bindings]]
loop = {{ name = "e2e", interval = "1s" }}
policy = {{ kind = "target_backlog", messages_per_worker = 5.0, max_workers = 8, stabilize_down = "3s", scale_to_zero_after = "3s" }}

[bindings.source]
{source}
[bindings.scaler]
{scaler}"#
    )
}

fn burst_scales_out_and_back_in(broker: Broker, target: impl Fn(&Services) -> MotoTarget) {
    let Some(s) = Services::get() else { return };
    let queue = unique("cli-e2e");
    let target = target(&s);
    let dir = TempDir::new("cli-e2e");
    let path = dir.join("celery-scale.toml");
    std::fs::write(
        &path,
        config(
            &broker.source_toml(&s, &queue),
            &target.scaler_toml(PER_UNIT),
        ),
    )
    .unwrap();

    // 20 tasks of 0.3 s: 20 / 5 = 4 workers = 2 units of 2.
    publish(&s.python, &broker.url(&s), &queue, 20, 0.3);
    let mut daemon = Daemon::start(
        Path::new(BIN),
        &["run", "--config", path.to_str().unwrap()],
        &s.aws_env(),
        &dir.join("daemon.log"),
    );
    wait_for(
        Duration::from_secs(40),
        "scale out to 2 units",
        || (target.desired() == 2).then_some(()),
        || daemon.tail(20),
    );

    // Real workers, one per unit as on ECS or EC2 (the daemon holds units whose worker it does
    // not hear), drain the queue; three seconds of idle later the target is back at 0.
    let _workers: Vec<Worker> = (1..=2)
        .map(|n| {
            let name = format!("{queue}@w{n}");
            Worker::start(&s.python, &broker.url(&s), &queue, &["-n", &name])
        })
        .collect();
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
    broker.cleanup(&s, &queue);
}

#[test]
fn redis_to_ecs() {
    burst_scales_out_and_back_in(Broker::Redis(12), |s| MotoTarget::ecs(s, "cli-redis-ecs"));
}

#[test]
fn redis_to_ec2() {
    burst_scales_out_and_back_in(Broker::Redis(13), |s| {
        MotoTarget::ec2(s, "cli-redis-ec2", 4)
    });
}

#[test]
fn amqp_to_ecs() {
    burst_scales_out_and_back_in(Broker::Amqp, |s| MotoTarget::ecs(s, "cli-amqp-ecs"));
}

#[test]
fn amqp_to_ec2() {
    burst_scales_out_and_back_in(Broker::Amqp, |s| MotoTarget::ec2(s, "cli-amqp-ec2", 4));
}

#[test]
fn serves_metrics_health_and_readiness() {
    let Some(s) = Services::get() else { return };
    let queue = unique("cli-serve");
    let target = MotoTarget::ecs(&s, "cli-serve");
    let broker = Broker::Redis(9);
    let dir = TempDir::new("cli-serve");
    let path = dir.join("celery-scale.toml");
    std::fs::write(
        &path,
        config(
            &broker.source_toml(&s, &queue),
            &target.scaler_toml(PER_UNIT),
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", celery_scale_testing::free_port());
    let mut daemon = Daemon::start(
        Path::new(BIN),
        &["run", "--config", path.to_str().unwrap(), "--listen", &addr],
        &s.aws_env(),
        &dir.join("daemon.log"),
    );
    let get = |p: &str| celery_scale_testing::http_get(&addr, p);
    wait_for(
        Duration::from_secs(30),
        "/readyz answers 200",
        || get("/readyz").filter(|(code, _)| *code == 200),
        || daemon.tail(20),
    );
    assert_eq!(get("/healthz").map(|(c, _)| c), Some(200));
    let (code, metrics) = get("/metrics").unwrap();
    assert_eq!(code, 200);
    for name in [
        "celery_scale_ready_messages",
        "celery_scale_desired_units",
        "celery_scale_decisions_total",
    ] {
        assert!(
            metrics.contains(&format!("# HELP {name} ")),
            "{name}:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("celery_scale_observation_fresh{binding=\"e2e\"} 1"),
        "{metrics}"
    );
    let status = daemon.stop(Duration::from_secs(20));
    assert!(status.success(), "{status}: {}", daemon.tail(20));
}

/// The policy line of the busy-worker tests: the shipped default with 5 s scale-in windows.
const SHORT_WINDOWS: &str = "policy = { stabilize_down = \"5s\", scale_to_zero_after = \"5s\" }";

/// Windows for `-P solo` workers: a solo worker reads idle from its last beat until it is
/// found silent (two missed heartbeats, 4 s with Celery's default), so the scale-in window must
/// be longer than that (the README says so); still well below the 30 s the test watches.
const SOLO_WINDOWS: &str = "policy = { stabilize_down = \"10s\", scale_to_zero_after = \"10s\" }";

/// Unknown is never zero, in the daemon: it starts while two workers run long tasks (the queue
/// empty, the service at 2). Its first ticks cannot see them (the worker-event warm-up), and a
/// fresh loop remembers nothing: it must not scale in under them.
#[test]
fn a_daemon_started_under_busy_workers_never_scales_them_in() {
    let Some(s) = Services::get() else { return };
    let broker = Broker::Redis(15);
    let queue = unique("cli-busy");
    let target = MotoTarget::ecs_at(&s, "cli-busy", 2);
    // One worker node per ECS task, each heard (so no unit counts as unheard): one process and,
    // with `acks_late`, one message at a time, so each node runs one of the two tasks.
    let _workers = ["a", "b"].map(|n| {
        WorkerCommand::new(&s.python, &broker.url(&s))
            .queues(&queue)
            .name(&format!("{queue}@{n}-%h"))
            .concurrency(1)
            .config(&serde_json::json!({"task_acks_late": true}))
            .spawn()
    });
    publish(&s.python, &broker.url(&s), &queue, 2, 45.0);
    let dir = TempDir::new("cli-busy");
    let path = dir.join("celery-scale.toml");
    // The shipped default policy with 5 s scale-in windows (30 s by default, longer than this
    // test's run): only the rules for busy workers can hold them. One worker process per task.
    std::fs::write(
        &path,
        format!(
            "[[bindings]]\nloop = {{ name = \"busy\", interval = \"1s\" }}\n{SHORT_WINDOWS}\n\n[bindings.source]\n{}\n[bindings.scaler]\n{}",
            broker.source_toml(&s, &queue),
            target.scaler_toml(1)
        ),
    )
    .unwrap();
    // Let the worker take both tasks before the daemon starts.
    std::thread::sleep(Duration::from_secs(4));
    let mut daemon = Daemon::start(
        Path::new(BIN),
        &["run", "--config", path.to_str().unwrap()],
        &s.aws_env(),
        &dir.join("daemon.log"),
    );
    let until = std::time::Instant::now() + Duration::from_secs(25);
    while std::time::Instant::now() < until {
        assert_eq!(
            target.desired(),
            2,
            "scaled in under busy workers:\n{}",
            daemon.tail(10)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = daemon.output();
    assert!(
        log.contains("executing=2"),
        "the daemon heard the busy workers:\n{}",
        daemon.tail(10)
    );
    let status = daemon.stop(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    broker.cleanup(&s, &queue);
}

/// The same for `-P solo` workers, which send no heartbeat while a task runs: heard idle, then
/// silent while busy; the daemon holds them.
#[test]
fn a_daemon_holds_silent_solo_workers_busy_on_long_tasks() {
    let Some(s) = Services::get() else { return };
    let broker = Broker::Redis(10);
    let queue = unique("cli-solo");
    let target = MotoTarget::ecs_at(&s, "cli-solo", 2);
    let solo = ["-P", "solo", "--prefetch-multiplier", "1"];
    // Each its own node name, as one per ECS task would be: both are heard, so what holds them
    // is silent-worker detection, not fewer nodes heard than units.
    let _workers = ["a", "b"].map(|n| {
        WorkerCommand::new(&s.python, &broker.url(&s))
            .queues(&queue)
            .name(&format!("{queue}@{n}-%h"))
            .args(&solo)
            .spawn()
    });
    let dir = TempDir::new("cli-solo");
    let path = dir.join("celery-scale.toml");
    std::fs::write(
        &path,
        format!(
            "[[bindings]]\nloop = {{ name = \"solo\", interval = \"1s\" }}\n{SOLO_WINDOWS}\n\n[bindings.source]\n{}\n[bindings.scaler]\n{}",
            broker.source_toml(&s, &queue),
            target.scaler_toml(1)
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(
        Path::new(BIN),
        &["run", "--config", path.to_str().unwrap()],
        &s.aws_env(),
        &dir.join("daemon.log"),
    );
    // Both heard before the tasks arrive.
    wait_for(
        Duration::from_secs(40),
        "the two solo workers heard",
        || daemon.output().contains("live_workers=2").then_some(()),
        || daemon.tail(10),
    );
    let before_tasks = daemon.output().len();
    publish(&s.python, &broker.url(&s), &queue, 2, 40.0);
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < until {
        assert_eq!(
            target.desired(),
            2,
            "scaled in under busy solo workers:\n{}",
            daemon.tail(10)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = daemon.output();
    let log = log.get(before_tasks..).unwrap_or_default();
    assert!(
        log.contains("silent without worker-offline") && !log.contains("worker node(s) heard"),
        "the busy solo workers were silent (not unheard units), unknown, not idle:\n{}",
        daemon.tail(10)
    );
    let status = daemon.stop(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    broker.cleanup(&s, &queue);
}

/// And through a Redis outage: Redis goes away for 12 s while two workers run long tasks, and
/// comes back empty; the daemon holds through the outage and through the worker-event warm-up
/// after it.
#[test]
fn a_daemon_holds_busy_workers_through_a_redis_outage() {
    let Some(s) = Services::get() else { return };
    let mut redis = celery_scale_testing::RedisServer::start();
    let url = redis.url(0);
    let queue = unique("cli-outage");
    let target = MotoTarget::ecs_at(&s, "cli-outage", 2);
    let _worker = Worker::start(&s.python, &url, &queue, &["-c", "2"]);
    publish(&s.python, &url, &queue, 2, 60.0);
    let dir = TempDir::new("cli-outage");
    let path = dir.join("celery-scale.toml");
    std::fs::write(
        &path,
        format!(
            "[[bindings]]\nloop = {{ name = \"outage\", interval = \"1s\" }}\n\n[bindings.source]\nkind = \"redis\"\nurl = \"{url}\"\nqueues = [\"{queue}\"]\nworker_hostnames = [\"{queue}@*\"]\n\n[bindings.scaler]\n{}",
            target.scaler_toml(1)
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(
        Path::new(BIN),
        &["run", "--config", path.to_str().unwrap()],
        &s.aws_env(),
        &dir.join("daemon.log"),
    );
    let hold = |secs: u64, daemon: &Daemon| {
        let until = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < until {
            assert_eq!(
                target.desired(),
                2,
                "scaled in under busy workers:\n{}",
                daemon.tail(10)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    wait_for(
        Duration::from_secs(30),
        "the busy workers heard",
        || daemon.output().contains("executing=2").then_some(()),
        || daemon.tail(10),
    );
    redis.kill();
    hold(12, &daemon);
    redis.restart();
    hold(15, &daemon);
    let status = daemon.stop(Duration::from_secs(20));
    assert!(status.success(), "{status}");
}
