//! Redis Sentinel against real servers: a master, a replica and two Sentinels (Debian's
//! `redis-server --sentinel`), throwaway processes on free ports. Celery publishes through the
//! same `sentinel://` URL and transport options; the source follows a `SENTINEL FAILOVER`
//! during a run, and no observation reads low because of it (a failed read is an error).

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_scale_core::QueueSource;
use celery_scale_redis::{RedisQueueSource, RedisSourceConfig};
use common::{celery_env, celery_publish, poll, unique};
use serde_json::json;

const MASTER_PW: &str = "m4ster-pw";
const SENTINEL_PW: &str = "s3ntinel-pw";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Processes killed (and their files removed) when dropped.
struct Procs(Vec<std::process::Child>, Vec<PathBuf>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        for f in &self.1 {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn wait_port(port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "port {port} did not open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn redis_server(procs: &mut Procs, port: u16, extra: &[String]) {
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        // A replica's full sync writes an RDB file in --dir: keep it out of the source tree.
        .arg("--dir")
        .arg(std::env::temp_dir())
        .args(["--dbfilename", &format!("{}.rdb", unique("sentinel-db"))])
        .args(["--requirepass", MASTER_PW, "--masterauth", MASTER_PW])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    procs.0.push(child);
    wait_port(port);
}

fn sentinel(procs: &mut Procs, port: u16, master: u16) {
    let conf = std::env::temp_dir().join(format!("{}.conf", unique("sentinel")));
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\nrequirepass {SENTINEL_PW}\n\
             sentinel monitor mymaster 127.0.0.1 {master} 1\n\
             sentinel auth-pass mymaster {MASTER_PW}\n\
             sentinel down-after-milliseconds mymaster 2000\n\
             sentinel failover-timeout mymaster 10000\n"
        ),
    )
    .unwrap();
    let child = std::process::Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server --sentinel");
    procs.0.push(child);
    procs.1.push(conf);
    wait_port(port);
}

async fn sentinel_cmd(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://:{SENTINEL_PW}@127.0.0.1:{port}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await
}

/// The master's port as Sentinel `port` reports it.
async fn master_port(port: u16) -> Option<u16> {
    let v = sentinel_cmd(port, &["SENTINEL", "get-master-addr-by-name", "mymaster"])
        .await
        .ok()?;
    let (_, p): (String, String) = redis::from_redis_value(v).ok()?;
    p.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observations_follow_a_sentinel_failover() {
    let Some((_, python)) = celery_env() else {
        return;
    };
    let mut procs = Procs(Vec::new(), Vec::new());
    let (m, r, s1, s2, dead) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    redis_server(&mut procs, m, &[]);
    redis_server(
        &mut procs,
        r,
        &["--replicaof".into(), "127.0.0.1".into(), m.to_string()],
    );
    sentinel(&mut procs, s1, m);
    sentinel(&mut procs, s2, m);
    // The Sentinels know the replica (needed to fail over).
    poll(
        "the Sentinels see the replica",
        Duration::from_secs(30),
        || async {
            let v = sentinel_cmd(s1, &["SENTINEL", "replicas", "mymaster"])
                .await
                .ok()?;
            let replicas: Vec<redis::Value> = redis::from_redis_value(v).ok()?;
            (!replicas.is_empty()).then_some(())
        },
    )
    .await;

    // Celery's settings, verbatim: several Sentinels (the first one down), the master's
    // password and database in the first URL, the Sentinels' password in sentinel_kwargs.
    let broker = format!(
        "sentinel://:{MASTER_PW}@127.0.0.1:{dead}/1;sentinel://127.0.0.1:{s1};sentinel://127.0.0.1:{s2}"
    );
    let options = json!({"master_name": "mymaster", "sentinel_kwargs": {"password": SENTINEL_PW}});
    let mut builder = RedisSourceConfig::builder(broker.as_str())
        .queue("work")
        .heartbeats(false)
        .timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_millis(500));
    for (k, v) in options.as_object().unwrap() {
        builder = builder.transport_option(k.clone(), v.clone());
    }
    let src = Arc::new(RedisQueueSource::new(builder.build().unwrap()).unwrap());
    let shown = format!("{src:?}");
    assert!(
        !shown.contains(MASTER_PW) && !shown.contains(SENTINEL_PW),
        "{shown}"
    );

    let out = celery_publish(
        &python,
        &broker,
        &options,
        &["--queue", "work", "--count", "6", "--size-of", "work"],
    )
    .await;
    assert_eq!(out["kombu_size"]["work"], json!(6));
    let obs = src
        .observe()
        .await
        .expect("reads the master through Sentinel");
    assert_eq!(obs.ready, 6);
    assert!(format!("{src:?}").contains(&m.to_string()), "{src:?}");

    // Observe continuously while Sentinel fails over.
    let seen: Arc<Mutex<Vec<Result<u64, String>>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (src, seen, stop) = (Arc::clone(&src), Arc::clone(&seen), Arc::clone(&stop));
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = src
                    .observe()
                    .await
                    .map(|o| o.ready)
                    .map_err(|e| e.to_string());
                seen.lock().unwrap().push(r);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    sentinel_cmd(s1, &["SENTINEL", "FAILOVER", "mymaster"])
        .await
        .expect("SENTINEL FAILOVER");
    poll("the replica promoted", Duration::from_secs(30), || async {
        (master_port(s1).await == Some(r)).then_some(())
    })
    .await;
    // Celery publishes to the new master; the source reads it there.
    celery_publish(
        &python,
        &broker,
        &options,
        &["--queue", "work", "--count", "3"],
    )
    .await;
    poll(
        "9 ready on the new master",
        Duration::from_secs(30),
        || async {
            let ok = src.observe().await.ok()?;
            (ok.ready == 9 && format!("{src:?}").contains(&r.to_string())).then_some(())
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.await.unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 3, "{seen:?}");
    // Never a low reading: every successful observation saw at least the 6 published before.
    for ready in seen.iter().flatten() {
        assert!(*ready >= 6, "a failover read low: {seen:?}");
    }
    for r in seen.iter().filter_map(|r| r.as_ref().err()) {
        assert!(!r.contains(MASTER_PW) && !r.contains(SENTINEL_PW), "{r}");
    }
}

/// A Sentinel URL without `master_name` is refused at load, as kombu refuses it.
#[test]
fn sentinel_needs_master_name() {
    let e = RedisSourceConfig::builder("sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380")
        .queue("work")
        .build()
        .unwrap_err();
    assert_eq!(e.field, "broker_transport_options.master_name");
}
