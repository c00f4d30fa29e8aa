//! Celery's `broker_url` and `broker_transport_options` pasted verbatim, against real Celery
//! workers and publishers: each URL form and each honoured option counts what Celery does.
//! Redis databases 1 and 2 of the shared server (with unique key prefixes), or throwaway
//! `redis-server` processes.

mod common;

use std::process::Stdio;
use std::time::Duration;

use celery_scale_core::{Observation, QueueSource};
use celery_scale_redis::{RedisQueueSource, RedisSourceConfig};
use common::*;
use serde_json::{Value, json};

/// A source reading `queues` of `url` with Celery's transport `options`, as pasted.
fn source(url: &str, options: &Value, queues: &[&str], hostnames: &str) -> RedisQueueSource {
    let mut b = RedisSourceConfig::builder(url).queues(queues.iter().copied());
    if let Value::Object(map) = options {
        for (k, v) in map {
            b = b.transport_option(k.clone(), v.clone());
        }
    }
    if !hostnames.is_empty() {
        b = b.worker_hostname(format!("{hostnames}@*"));
    }
    RedisQueueSource::new(b.build().expect("valid config")).expect("source")
}

fn ready_of(obs: &Observation, queue: &str) -> u64 {
    obs.queues
        .iter()
        .find(|q| q.queue == queue)
        .map(|q| q.ready)
        .expect("queue in breakdown")
}

/// Publishes `count` tasks of `seconds` to `queue`, starts one worker (2 processes, prefetch 4)
/// and waits until the source hears it executing 2 tasks; returns that observation.
async fn busy_worker_heard(
    python: &str,
    broker: &str,
    options: &Value,
    src: &RedisQueueSource,
    queue: &str,
    name: &str,
) -> (Observation, CeleryWorker) {
    celery_publish(
        python,
        broker,
        options,
        &["--queue", queue, "--count", "12", "--seconds", "6"],
    )
    .await;
    let worker = CeleryWorker::start(python, broker, options, &json!({}), queue, name);
    let obs = poll(
        &format!("{name}: heartbeats with 2 executing tasks"),
        Duration::from_secs(40),
        || async {
            let obs = src.observe().await.ok()?;
            (obs.executing == Some(2) && obs.live_workers == Some(1)).then_some(obs)
        },
    )
    .await;
    (obs, worker)
}

/// The heartbeat channel follows `fanout_prefix` (false, a custom string with `{db}`) and
/// `fanout_patterns` (false: one channel per exchange; true) exactly as kombu builds it: real
/// workers configured each way are heard, executing their tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_channel_follows_fanout_prefix_and_patterns() {
    let Some((url, python)) = celery_env() else {
        return;
    };
    let broker = with_db(&url, 1);
    for (label, extra) in [
        ("prefix-false", json!({"fanout_prefix": false})),
        ("prefix-custom", json!({"fanout_prefix": "/custom{db}."})),
        ("patterns-false", json!({"fanout_patterns": false})),
        (
            "patterns-true",
            json!({"fanout_patterns": true, "fanout_prefix": true}),
        ),
    ] {
        let prefix = unique(label);
        let _cleanup = Cleanup::prefix(&broker, &prefix);
        let mut options = extra.clone();
        options["global_keyprefix"] = json!(prefix);
        let name = unique(label);
        let src = source(&broker, &options, &["work"], &name);
        // The same binding without the option listens on kombu's default channel: it must not
        // hear these workers (the bug this fixes read 0 executing and 0 workers).
        let unaware = source(
            &broker,
            &json!({"global_keyprefix": prefix}),
            &["work"],
            &name,
        );
        let (obs, worker) =
            busy_worker_heard(&python, &broker, &options, &src, "work", &name).await;
        assert_eq!(obs.live_workers, Some(1), "{label}: {}", worker.log_tail());
        if label != "patterns-true" {
            // It hears no worker: with held messages and no worker heard, core's rule makes the
            // worker figures unknown (never the 0 the old fixed channel gave).
            let other = unaware.observe().await.unwrap();
            assert!(
                other.live_workers != Some(1) && other.executing != Some(2),
                "{label}: the default channel should be silent: {other:?}"
            );
        }
        drop(worker);
    }
}

/// `unacked_key` moves the hash of held messages; `ack_emulation: False` means kombu keeps
/// none: in flight is unknown (`None`), never 0, while the worker holds tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_key_and_ack_emulation_false() {
    let Some((url, python)) = celery_env() else {
        return;
    };
    let broker = with_db(&url, 1);

    let prefix = unique("unackedkey");
    let _cleanup = Cleanup::prefix(&broker, &prefix);
    let options = json!({"global_keyprefix": prefix, "unacked_key": "held_messages"});
    let name = unique("held");
    let src = source(&broker, &options, &["work"], &name);
    let (_, worker) = busy_worker_heard(&python, &broker, &options, &src, "work", &name).await;
    // 2 processes x prefetch multiplier 4 taken and unacknowledged, in the renamed hash.
    let obs = poll(
        "8 held in held_messages",
        Duration::from_secs(10),
        || async {
            let obs = src.observe().await.ok()?;
            (obs.in_flight == Some(8)).then_some(obs)
        },
    )
    .await;
    assert_eq!(obs.ready, 12 - 2 - 8, "{}", worker.log_tail());
    let client = redis::Client::open(broker.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let default_hash: u64 = redis::cmd("HLEN")
        .arg(format!("{prefix}unacked"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(default_hash, 0, "kombu used the renamed hash only");
    drop(worker);

    let prefix = unique("noack");
    let _cleanup = Cleanup::prefix(&broker, &prefix);
    let options = json!({"global_keyprefix": prefix, "ack_emulation": false});
    let name = unique("noack");
    let src = source(&broker, &options, &["work"], &name);
    let (obs, worker) = busy_worker_heard(&python, &broker, &options, &src, "work", &name).await;
    assert_eq!(obs.in_flight, None, "{}", worker.log_tail());
    assert_eq!(obs.executing, Some(2));
    assert!(obs.ready < 12, "the worker took tasks: {obs:?}");
    // An explicit in_flight reading of a hash kombu does not keep is refused at load.
    let e = RedisSourceConfig::builder(broker.as_str())
        .queue("work")
        .transport_option("ack_emulation", json!(false))
        .in_flight(celery_scale_redis::InFlightMode::Global)
        .build()
        .unwrap_err();
    assert_eq!(e.field, "in_flight");
}

/// A throwaway `redis-server` on a free port (and a unix socket), killed when dropped.
struct Throwaway {
    child: std::process::Child,
    port: u16,
    socket: std::path::PathBuf,
}

impl Throwaway {
    fn start(extra: &[&str]) -> Throwaway {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let socket = std::env::temp_dir().join(format!("{}.sock", unique("sock")));
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&socket)
            .args(["--unixsocketperm", "700"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Throwaway {
            child,
            port,
            socket,
        }
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// `redis+socket:///path?virtual_host=2`, Celery's socket form: the database is
/// `virtual_host` (queues and the worker's heartbeat channel `/2.celeryev/...`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_socket_url_with_virtual_host() {
    let Some((_, python)) = celery_env() else {
        return;
    };
    let server = Throwaway::start(&[]);
    let broker = format!("redis+socket://{}?virtual_host=2", server.socket.display());
    let options = json!({});
    let name = unique("sockw");
    let src = source(&broker, &options, &["work"], &name);
    let out = celery_publish(
        &python,
        &broker,
        &options,
        &["--queue", "work", "--count", "5"],
    )
    .await;
    let obs = src.observe().await.unwrap();
    assert_eq!(ready_of(&obs, "work"), 5);
    assert_eq!(out["kombu_size"]["work"], json!(5), "kombu's own count");
    // Nothing in database 0: the URL's virtual_host was honoured by both.
    let tcp = redis::Client::open(format!("redis://127.0.0.1:{}/0", server.port)).unwrap();
    let mut conn = tcp.get_multiplexed_async_connection().await.unwrap();
    let in_db0: u64 = redis::cmd("LLEN")
        .arg("work")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(in_db0, 0);
    let (_, worker) = busy_worker_heard(&python, &broker, &options, &src, "work", &name).await;
    drop(worker);
}

/// A `;`-separated failover list whose first server is down: Celery (kombu's round robin)
/// publishes to and works from the second; so does the source, heartbeats included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_list_with_the_first_server_down() {
    let Some((url, python)) = celery_env() else {
        return;
    };
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let live = with_db(&url, 2);
    let broker = format!("redis://127.0.0.1:{dead}/2;{live}");
    let prefix = unique("failover");
    let _cleanup = Cleanup::prefix(&live, &prefix);
    let options = json!({"global_keyprefix": prefix});
    let name = unique("failw");
    let src = source(&broker, &options, &["work"], &name);
    let out = celery_publish(
        &python,
        &broker,
        &options,
        &["--queue", "work", "--count", "4", "--size-of", "work"],
    )
    .await;
    let obs = src.observe().await.expect("the second URL answers");
    assert_eq!(ready_of(&obs, "work"), 4);
    assert_eq!(out["kombu_size"]["work"], json!(4));
    let (_, worker) = busy_worker_heard(&python, &broker, &options, &src, "work", &name).await;
    drop(worker);
}

/// The default in-flight reading (`auto`) when two bindings share a database: each counts
/// only its own queue's held messages; a binding that watches every queue of the database
/// reads the whole hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_in_flight_is_right_when_bindings_share_a_database() {
    let Some((url, python)) = celery_env() else {
        return;
    };
    let broker = with_db(&url, 2);
    let prefix = unique("shared");
    let _cleanup = Cleanup::prefix(&broker, &prefix);
    let options = json!({"global_keyprefix": prefix});
    let name = unique("sharedw");
    let busy = source(&broker, &options, &["busy"], &name);
    let idle = source(&broker, &options, &["idle"], "");
    let both = source(&broker, &options, &["busy", "idle"], "");
    celery_publish(
        &python,
        &broker,
        &options,
        &["--queue", "idle", "--count", "3"],
    )
    .await;
    let (_, worker) = busy_worker_heard(&python, &broker, &options, &busy, "busy", &name).await;
    let obs = poll("8 held for busy", Duration::from_secs(10), || async {
        let obs = busy.observe().await.ok()?;
        (obs.in_flight == Some(8)).then_some(obs)
    })
    .await;
    assert_eq!(obs.queues[0].in_flight, Some(8), "per queue: {obs:?}");
    let other = idle.observe().await.unwrap();
    assert_eq!(
        other.in_flight,
        Some(0),
        "the idle binding holds nothing: {other:?}"
    );
    assert_eq!(other.ready, 3);
    let all = both.observe().await.unwrap();
    assert_eq!(all.in_flight, Some(8), "{all:?}");
    drop(worker);
}

/// Celery settings pasted into TOML: `[broker_transport_options]` (or `transport_options`)
/// taken as a map; unknown options name themselves; ignored ones are listed.
#[test]
fn transport_options_pasted_into_toml() {
    let config: RedisSourceConfig = toml::from_str(
        r#"
        url = "sentinel://:masterpw@s1:26379/3;sentinel://s2:26380"
        queues = ["celery"]
        [broker_transport_options]
        master_name = "mymaster"
        sentinel_kwargs = { password = "sentinelpw" }
        visibility_timeout = 43200
        fanout_prefix = true
        fanout_patterns = true
        queue_order_strategy = "priority"
        socket_timeout = 5
        "#,
    )
    .unwrap();
    config.validate().unwrap();
    assert_eq!(
        config.ignored_options(),
        ["queue_order_strategy", "socket_timeout"]
    );
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("masterpw") && !shown.contains("sentinelpw"),
        "{shown}"
    );
    let alias: RedisSourceConfig = toml::from_str(
        "url = \"redis://h/1\"\nqueues = [\"a\"]\n[transport_options]\nvisiblity_timeout = 10\n",
    )
    .unwrap();
    assert_eq!(
        alias.validate().unwrap_err().field,
        "broker_transport_options.visiblity_timeout"
    );
    let no_master: RedisSourceConfig =
        toml::from_str("url = \"sentinel://s1\"\nqueues = [\"a\"]\n").unwrap();
    assert_eq!(
        no_master.validate().unwrap_err().field,
        "broker_transport_options.master_name"
    );
    // The typed field and the option are one setting.
    let both: RedisSourceConfig = toml::from_str(
        "url = \"redis://h\"\nqueues = [\"a\"]\nsep = \":\"\n[broker_transport_options]\nsep = \"|\"\n",
    )
    .unwrap();
    assert_eq!(both.validate().unwrap_err().field, "sep");
}
