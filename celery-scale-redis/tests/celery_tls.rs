//! `rediss://` against real Celery: a throwaway `redis-server` speaking TLS only (a test CA made
//! now), the venv's Celery publishing and running a worker through it, and the source built
//! from the very `broker_url` string the Celery app uses. Both ways a Celery user turns TLS on:
//! kombu's query form (`?ssl_cert_reqs=required&ssl_ca_certs=...`) and `broker_use_ssl` (which
//! the source takes as its `tls` table). Ready, held (unacked) and the worker figures from
//! heartbeats (the PUB/SUB subscription is over TLS too: the server has no plain port) must be
//! what Celery has; a CA that did not sign the server's certificate is a typed TLS error.

mod common;

use std::path::Path;
use std::time::Duration;

use celery_scale_core::{Observation, QueueSource};
use celery_scale_redis::{RedisQueueSource, RedisSourceConfig, RedisSourceError, TlsConfig};
use common::certs::*;
use common::*;
use serde_json::{Value, json};

/// Tasks published per case, each sleeping [`TASK_SECONDS`]; the worker (2 processes,
/// prefetch multiplier 4) executes 2 and holds 8.
const TASKS: u64 = 14;
const TASK_SECONDS: &str = "25";

/// The test app's `publish.py` against `broker` with extra Celery settings `config`; returns
/// kombu's `_size` of `queue` it printed. `count` 0 only reads it.
async fn publish(python: &str, broker: &str, config: &Value, queue: &str, count: u64) -> u64 {
    let (python, broker, config, queue) = (
        python.to_string(),
        broker.to_string(),
        config.clone(),
        queue.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        let count = count.to_string();
        let out = celery_scale_testing::publish_script(
            "publish.py",
            &python,
            &broker,
            &json!({}),
            &config,
            &[
                "--queue",
                &queue,
                "--count",
                &count,
                "--seconds",
                TASK_SECONDS,
            ],
        );
        out["kombu_size"][queue.as_str()]
            .as_u64()
            .unwrap_or_else(|| panic!("kombu_size in {out}"))
    })
    .await
    .expect("the publisher thread")
}

/// `HLEN unacked` and `LLEN queue`, read with redis-rs over TLS (not through the source).
async fn raw_counts(port: u16, db: u32, ca: &Path, queue: &str) -> (u64, u64) {
    let client = redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{port}/{db}"),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(ca).unwrap()),
        },
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (held, ready): (u64, u64) = redis::pipe()
        .hlen("unacked")
        .llen(queue)
        .query_async(&mut conn)
        .await
        .unwrap();
    (held, ready)
}

fn ready_of(obs: &Observation, queue: &str) -> u64 {
    obs.queues
        .iter()
        .find(|q| q.queue == queue)
        .map(|q| q.ready)
        .expect("queue in breakdown")
}

/// One TLS form end to end: Celery (URL `celery_url`, settings `celery_config`) publishes
/// [`TASKS`] to `queue` on database `db`, `src` reads them; a real worker starts and `src` must
/// read exactly what it executes and holds, and hear it over TLS.
#[allow(clippy::too_many_arguments)]
async fn celery_over_tls(
    label: &str,
    python: &str,
    celery_url: &str,
    celery_config: &Value,
    src: &RedisQueueSource,
    (port, db, ca): (u16, u32, &Path),
    queue: &str,
    name: &str,
) {
    let published = publish(python, celery_url, celery_config, queue, TASKS).await;
    assert_eq!(published, TASKS, "{label}: kombu's _size after publishing");
    let obs = src.observe().await.unwrap();
    assert_eq!(obs.ready, TASKS, "{label}: {obs:?}");
    assert_eq!(ready_of(&obs, queue), TASKS, "{label}");
    assert_eq!(obs.in_flight, Some(0), "{label}: nothing is held yet");

    // The heartbeat subscription is up over TLS (the server listens with TLS only).
    poll(
        &format!("{label}: the worker-event subscription over TLS"),
        Duration::from_secs(10),
        || async { src.heartbeats_subscribed().then_some(()) },
    )
    .await;

    let worker = CeleryWorker::start(python, celery_url, &json!({}), celery_config, queue, name);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let obs = loop {
        let obs = src.observe().await;
        if let Ok(obs) = &obs
            && obs.executing == Some(2)
            && obs.live_workers == Some(1)
            && obs.in_flight == Some(8)
        {
            break obs.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{label}: no observation with 2 executing, 8 held and 1 worker: last {obs:?}\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // 2 executing (acked when taken: in neither list nor hash), 2 x 4 prefetched in `unacked`.
    assert_eq!(obs.ready, TASKS - 2 - 8, "{label}: {obs:?}");
    assert_eq!(ready_of(&obs, queue), TASKS - 2 - 8, "{label}");
    let node = obs
        .worker_nodes
        .iter()
        .find(|n| n.hostname.starts_with(&format!("{name}@")))
        .unwrap_or_else(|| panic!("{label}: {name}@... among {:?}", obs.worker_nodes));
    assert_eq!(node.executing, 2, "{label}");
    // What Redis and kombu hold now, read without the source (the tasks last 25 s: nothing
    // moves in between).
    let (held, listed) = raw_counts(port, db, ca, queue).await;
    assert_eq!(
        (held, listed),
        (8, obs.ready),
        "{label}: HLEN unacked, LLEN {queue}"
    );
    let kombu = publish(python, celery_url, celery_config, queue, 0).await;
    assert_eq!(
        kombu, obs.ready,
        "{label}: kombu's _size with the worker busy"
    );
    assert!(
        !worker.log_tail().contains("CERTIFICATE_VERIFY_FAILED"),
        "{label}: {}",
        worker.log_tail()
    );
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_url_and_broker_use_ssl_count_what_celery_has() {
    let Some(python) = celery_scale_testing::service("CELERY_SCALE_PYTHON") else {
        return;
    };
    if !have_redis_server() || !have_openssl() {
        return;
    }
    let dir = temp_dir("celery-tls");
    make_certificates(&dir);
    let (_server, port) = tls_server(&dir, &[]);
    let ca = dir.join("ca.crt");
    let ca_shown = ca.display().to_string();

    // kombu's query form, the same string in the Celery app and the source.
    let url = format!("rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca_shown}");
    let name = unique("tls-query");
    let src = RedisQueueSource::new(
        RedisSourceConfig::builder(url.as_str())
            .queue("work")
            .worker_hostname(format!("{name}@*"))
            .build()
            .expect("the Celery URL verbatim"),
    )
    .unwrap();
    celery_over_tls(
        "query form",
        &python,
        &url,
        &json!({}),
        &src,
        (port, 0, &ca),
        "work",
        &name,
    )
    .await;

    // `broker_use_ssl` with a bare rediss:// URL (host name this time, checked against the
    // certificate's DNS name): the source's `tls.ca_file` is that dict's `ssl_ca_certs`.
    let url = format!("rediss://localhost:{port}/1");
    let use_ssl =
        json!({"broker_use_ssl": {"ssl_cert_reqs": "required", "ssl_ca_certs": ca_shown}});
    let name = unique("tls-use-ssl");
    let src = RedisQueueSource::new(
        RedisSourceConfig::builder(url.as_str())
            .queue("work")
            .worker_hostname(format!("{name}@*"))
            .tls(TlsConfig {
                ca_file: Some(ca.clone()),
                ..TlsConfig::default()
            })
            .build()
            .expect("the Celery URL verbatim, broker_use_ssl as tls"),
    )
    .unwrap();
    celery_over_tls(
        "broker_use_ssl",
        &python,
        &url,
        &use_ssl,
        &src,
        (port, 1, &ca),
        "work",
        &name,
    )
    .await;

    // A CA that did not sign the server's certificate: Celery refuses to connect, and so does
    // the source, with a typed TLS error (never a panic, never a count of 0: database 0 still
    // holds the messages of the first case).
    let other = temp_dir("celery-tls-other");
    make_certificates(&other);
    let wrong_ca = other.join("ca.crt").display().to_string();
    let wrong =
        format!("rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={wrong_ca}");
    let out = tokio::task::spawn_blocking({
        let (python, wrong) = (python.clone(), wrong.clone());
        move || {
            celery_scale_testing::python_unchecked(
                &python,
                &wrong,
                &["publish.py", "--queue", "work", "--count", "1"],
                &[],
            )
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("CERTIFICATE_VERIFY_FAILED"),
        "Celery with the wrong CA: {stderr}"
    );
    let cases = [
        (
            "query form",
            RedisSourceConfig::builder(wrong.as_str()).queue("work"),
        ),
        (
            "broker_use_ssl",
            RedisSourceConfig::builder(format!("rediss://localhost:{port}/1"))
                .queue("work")
                .tls(TlsConfig {
                    ca_file: Some(other.join("ca.crt")),
                    ..TlsConfig::default()
                }),
        ),
    ];
    for (label, config) in cases {
        let src = RedisQueueSource::new(config.build().unwrap()).unwrap();
        let e = src.observe_redis().await.unwrap_err();
        assert!(matches!(e, RedisSourceError::Tls { .. }), "{label}: {e:?}");
        let e = src.observe().await.unwrap_err();
        assert!(
            !e.is_transient(),
            "{label}: an untrusted certificate needs a configuration change: {e:?}"
        );
        // The subscriber fails the same handshake: no worker figures, no subscription.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!src.heartbeats_subscribed(), "{label}");
        assert!(src.workers().is_none(), "{label}");
    }
    // The right CA still reads the first case's messages on database 0 (the worker is gone;
    // what it held stays in `unacked` until a live worker restores it).
    let (held, listed) = raw_counts(port, 0, &ca, "work").await;
    assert!(held + listed > 0, "database 0 is not empty");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&other);
}
