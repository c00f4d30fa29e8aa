//! Three copies of the daemon on one configuration, one acting: real Redis (the backlog, and a
//! lease store behind a TCP proxy the test cuts), moto's ECS (each copy's own counting proxy in
//! front of it, so every `UpdateService` is attributed to the copy that sent it).
//!
//! One run goes through kill -9 of the leader mid-burst, SIGSTOP of the next leader past its
//! lease and SIGCONT, a lost lease store, and a clean shutdown.

use std::path::Path;
use std::time::{Duration, Instant};

use celery_scale_testing::{
    Daemon, MotoTarget, Proxy, Services, TempDir, http_get, publish, send_signal, unique,
};

const BIN: &str = env!("CARGO_BIN_EXE_celery-scale");
const LEASE: Duration = Duration::from_secs(3);
const UPDATE_SERVICE: &str = "AmazonEC2ContainerServiceV20141113.UpdateService";

struct Copy {
    daemon: Daemon,
    metrics: String,
    aws: Proxy,
}

impl Copy {
    /// `celery_scale_leader` for the binding: Some(1.0) leading, Some(0.0) following, NaN
    /// unknown, None when it does not answer.
    fn leader(&self) -> Option<f64> {
        let (_, text) = http_get(&self.metrics, "/metrics")?;
        text.lines()
            .find(|l| l.starts_with("celery_scale_leader{binding=\"leased\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn sets(&self) -> Vec<Instant> {
        self.aws.hits()
    }
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool, copies: &[Copy]) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > within {
            let logs: Vec<String> = copies.iter().map(|c| c.daemon.tail(15)).collect();
            panic!("{what}: not within {within:?}\n{}", logs.join("\n-----\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The index of the one copy whose gauge says it leads (others 0), once that holds.
fn sole_leader(copies: &[Copy], alive: &[usize], within: Duration) -> usize {
    let mut found = None;
    wait_until(
        "exactly one copy leads",
        within,
        || {
            let gauges: Vec<Option<f64>> = alive.iter().map(|i| copies[*i].leader()).collect();
            let leaders: Vec<usize> = alive
                .iter()
                .zip(&gauges)
                .filter(|(_, g)| **g == Some(1.0))
                .map(|(i, _)| *i)
                .collect();
            let others_follow = gauges
                .iter()
                .all(|g| matches!(g, Some(v) if *v == 0.0 || *v == 1.0));
            found = leaders.first().copied();
            leaders.len() == 1 && others_follow
        },
        copies,
    );
    found.unwrap()
}

/// Every set, as (time, copy).
fn all_sets(copies: &[Copy]) -> Vec<(Instant, usize)> {
    let mut all: Vec<(Instant, usize)> = copies
        .iter()
        .enumerate()
        .flat_map(|(i, c)| c.sets().into_iter().map(move |t| (t, i)))
        .collect();
    all.sort();
    all
}

/// Three copies of the daemon on the configuration at `path`, each with its own AWS proxy.
fn start_copies(
    s: &Services,
    rt: &tokio::runtime::Runtime,
    path: &Path,
    dir: &TempDir,
) -> Vec<Copy> {
    let moto_hostport = s
        .moto
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut copies = Vec::new();
    for i in 0..3 {
        let aws = rt.block_on(Proxy::watching(&moto_hostport, UPDATE_SERVICE));
        let metrics = format!("127.0.0.1:{}", celery_scale_testing::free_port());
        let mut env = s.aws_env();
        env.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
        env.push(("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", aws.port)));
        env.push(("RUST_LOG", "info".into()));
        let daemon = Daemon::start(
            Path::new(BIN),
            &[
                "run",
                "--config",
                path.to_str().unwrap(),
                "--listen",
                &metrics,
            ],
            &env,
            &dir.join(&format!("daemon-{i}.log")),
        );
        copies.push(Copy {
            daemon,
            metrics,
            aws,
        });
    }
    copies
}

#[test]
fn one_copy_acts_through_kill_stop_store_loss_and_shutdown() {
    let Some(s) = Services::get() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let queue = unique("cli-leader");
    let namespace = unique("cli-leader-");
    let target = MotoTarget::ecs(&s, "cli-leader");
    let redis_hostport = s
        .redis
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let mut store = rt.block_on(Proxy::start(&redis_hostport));
    let dir = TempDir::new("cli-leader");
    let path = dir.join("celery-scale.toml");
    // Held messages counted per queue in database 0 (the queue name is the test's own).
    std::fs::write(
        &path,
        format!(
            r#"[leader_election]
lease = "3s"
namespace = "{namespace}"
redis_url = "redis://127.0.0.1:{store_port}/0"

[[bindings]]
loop = {{ name = "leased", interval = "1s", timeout = "1s" }}
policy = {{ kind = "target_backlog", messages_per_worker = 5.0, max_workers = 40, stabilize_down = "2m", scale_to_zero_after = "2m" }}

[bindings.source]
kind = "redis"
url = "{redis}"
queues = ["{queue}"]
in_flight = "per_queue"
heartbeats = false

[bindings.scaler]
{scaler}"#,
            store_port = store.port,
            redis = s.redis_db(0),
            scaler = target.scaler_toml(1),
        ),
    )
    .unwrap();

    let mut copies = start_copies(&s, &rt, &path, &dir);
    let broker = s.redis_db(0);
    let backlog = |n: u32| publish(&s.python, &broker, &queue, n, 0.0);
    let target = &target;
    let desired_at_least = |n: u64| move || target.desired() >= n;

    // 1. One copy leads; a burst is set by it alone.
    let first = sole_leader(&copies, &[0, 1, 2], Duration::from_secs(30));
    backlog(10);
    wait_until(
        "the leader scales out to 2",
        Duration::from_secs(20),
        desired_at_least(2),
        &copies,
    );
    for (i, c) in copies.iter().enumerate() {
        assert_eq!(
            c.sets().is_empty(),
            i != first,
            "copy {i} sets: {:?}",
            c.sets()
        );
        // Followers are ready too (they observe and read capacity): a deployment rolls.
        let ready = http_get(&c.metrics, "/readyz").map(|(code, _)| code);
        assert_eq!(ready, Some(200), "copy {i}");
    }

    // 2. kill -9 the leader mid-burst: another copy leads within two lease periods and sets.
    backlog(10);
    copies[first].daemon.signal("KILL");
    let killed = Instant::now();
    let alive: Vec<usize> = (0..3).filter(|i| *i != first).collect();
    let second = sole_leader(&copies, &alive, LEASE * 2 + Duration::from_secs(2));
    let took_over = killed.elapsed();
    wait_until(
        "the new leader scales out to 4",
        Duration::from_secs(20),
        desired_at_least(4),
        &copies,
    );
    assert!(!copies[second].sets().is_empty());
    eprintln!("takeover after kill -9: {took_over:?}");

    // 3. SIGSTOP the leader past its lease; the third copy takes over and sets; SIGCONT: the
    //    stopped one sets nothing and follows.
    let third = alive.iter().copied().find(|i| *i != second).unwrap();
    send_signal(copies[second].daemon.pid(), "STOP");
    let stopped_sets = copies[second].sets().len();
    backlog(10);
    wait_until(
        "the third copy leads and sets",
        LEASE * 3 + Duration::from_secs(10),
        || target.desired() >= 6 && !copies[third].sets().is_empty(),
        &copies,
    );
    std::thread::sleep(LEASE);
    send_signal(copies[second].daemon.pid(), "CONT");
    backlog(10);
    wait_until(
        "the third copy scales out to 8",
        Duration::from_secs(20),
        desired_at_least(8),
        &copies,
    );
    std::thread::sleep(LEASE);
    assert_eq!(
        copies[second].sets().len(),
        stopped_sets,
        "the resumed copy set capacity:\n{}",
        copies[second].daemon.tail(20)
    );
    assert_eq!(
        copies[second].leader(),
        Some(0.0),
        "{}",
        copies[second].daemon.tail(20)
    );
    assert_eq!(copies[third].leader(), Some(1.0));

    // 4. Cut the lease store: within one lease period nobody acts, whatever the backlog; acting
    //    resumes once it is back.
    store.cut();
    let cut = Instant::now();
    std::thread::sleep(LEASE);
    backlog(20);
    let held_at = target.desired();
    std::thread::sleep(LEASE * 2);
    let during: Vec<(Instant, usize)> = all_sets(&copies)
        .into_iter()
        .filter(|(t, _)| t.duration_since(cut) > LEASE)
        .collect();
    assert!(during.is_empty(), "sets with no lease store: {during:?}");
    assert_eq!(target.desired(), held_at);
    for i in [second, third] {
        assert_ne!(
            copies[i].leader(),
            Some(1.0),
            "copy {i} leads with no store"
        );
    }
    rt.block_on(store.restore());
    wait_until(
        "acting resumes",
        Duration::from_secs(20),
        desired_at_least(12),
        &copies,
    );

    // 5. Clean shutdown of the leader: the other copy leads within about one tick.
    let leader = sole_leader(&copies, &[second, third], Duration::from_secs(10));
    let other = if leader == second { third } else { second };
    let status = copies[leader].daemon.stop(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    let stopped = Instant::now();
    wait_until(
        "the other copy leads after a clean shutdown",
        Duration::from_secs(3),
        || copies[other].leader() == Some(1.0),
        &copies,
    );
    eprintln!("handover after a clean shutdown: {:?}", stopped.elapsed());

    // Over the whole run, a set by one copy and the next by another are a lease period apart.
    let sets = all_sets(&copies);
    for pair in sets.windows(2) {
        let ((t0, a), (t1, b)) = (pair[0], pair[1]);
        if a != b {
            assert!(
                t1.duration_since(t0) >= LEASE,
                "copies {a} and {b} set {:?} apart: {sets:?}",
                t1.duration_since(t0)
            );
        }
    }
    let status = copies[other].daemon.stop(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    eprintln!(
        "sets per copy: {:?}",
        copies.iter().map(|c| c.sets().len()).collect::<Vec<_>>()
    );
}

/// The same on RabbitMQ, whose lease is an exclusive queue: kill -9 of the leader mid-burst and
/// a clean shutdown hand over; only the leader sets.
#[test]
fn amqp_copies_hand_over_on_kill_and_on_shutdown() {
    let Some(s) = Services::get() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let queue = unique("cli-leader-amqp");
    let namespace = unique("cli-leader-");
    let target = MotoTarget::ecs(&s, "cli-leader-amqp");
    let dir = TempDir::new("cli-leader-amqp");
    let path = dir.join("celery-scale.toml");
    std::fs::write(
        &path,
        format!(
            r#"[leader_election]
lease = "4s"
namespace = "{namespace}"

[[bindings]]
loop = {{ name = "leased", interval = "1s", timeout = "2s" }}
policy = {{ kind = "target_backlog", messages_per_worker = 5.0, max_workers = 40, stabilize_down = "2m", scale_to_zero_after = "2m" }}

[bindings.source]
kind = "amqp"
url = "{amqp}"
queues = ["{queue}"]
heartbeats = false

[bindings.scaler]
{scaler}"#,
            amqp = s.amqp,
            scaler = target.scaler_toml(1),
        ),
    )
    .unwrap();
    let mut copies = start_copies(&s, &rt, &path, &dir);
    let backlog = |n: u32| publish(&s.python, &s.amqp, &queue, n, 0.0);
    let target = &target;
    let desired_at_least = |n: u64| move || target.desired() >= n;

    let first = sole_leader(&copies, &[0, 1, 2], Duration::from_secs(30));
    backlog(10);
    wait_until(
        "the leader scales out to 2",
        Duration::from_secs(30),
        desired_at_least(2),
        &copies,
    );
    copies[first].daemon.signal("KILL");
    let killed = Instant::now();
    backlog(10);
    let alive: Vec<usize> = (0..3).filter(|i| *i != first).collect();
    let second = sole_leader(
        &copies,
        &alive,
        Duration::from_secs(8) * 2 + Duration::from_secs(2),
    );
    eprintln!("amqp takeover after kill -9: {:?}", killed.elapsed());
    wait_until(
        "the new leader scales out to 4",
        Duration::from_secs(30),
        desired_at_least(4),
        &copies,
    );
    let other = alive.iter().copied().find(|i| *i != second).unwrap();
    assert!(
        copies[other].sets().is_empty(),
        "a follower set: {:?}",
        copies[other].sets()
    );
    let status = copies[second].daemon.stop(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    let stopped = Instant::now();
    wait_until(
        "the last copy leads after a clean shutdown",
        Duration::from_secs(4),
        || copies[other].leader() == Some(1.0),
        &copies,
    );
    eprintln!(
        "amqp handover after a clean shutdown: {:?}",
        stopped.elapsed()
    );
    let status = copies[other].daemon.stop(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    let _ = std::process::Command::new(&s.python)
        .current_dir(celery_scale_testing::celery_dir())
        .env("CELERY_SCALE_TEST_BROKER", &s.amqp)
        .args([
            "-c",
            &format!("from app import app\nwith app.connection_for_write() as c:\n    c.default_channel.queue_delete({queue:?})"),
        ])
        .output();
}
