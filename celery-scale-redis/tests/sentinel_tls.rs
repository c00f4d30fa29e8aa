//! Redis Sentinel with a TLS master signed by a private CA, against real servers: a throwaway
//! `redis-server` speaking TLS only (a test CA made now) and a throwaway Sentinel
//! (`redis-server --sentinel`, `tls-replication yes`) monitoring it over TLS. Celery publishes
//! through the very `sentinel://` settings the source is given, both ways a Celery user turns
//! TLS to the master on: kombu's query form on the first Sentinel URL
//! (`?ssl_cert_reqs=required&ssl_ca_certs=...`) and `broker_use_ssl` (the source's `tls`
//! table); and TLS to the Sentinel as well (kombu's `sentinel_kwargs` with `ssl`). The source
//! reads Celery's count, and its worker-event subscription (which takes its client from the
//! Sentinels too) is up over TLS; a CA that did not sign the master's (or the Sentinel's)
//! certificate is a typed TLS error, never a count.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use celery_scale_core::QueueSource;
use celery_scale_redis::{RedisQueueSource, RedisSourceConfig, RedisSourceError, TlsConfig};
use common::certs::*;
use common::*;
use serde_json::{Value, json};

/// A throwaway Sentinel, killed (and its config file removed) when dropped.
struct Sentinel {
    child: std::process::Child,
    conf: PathBuf,
    /// Its plain port.
    port: u16,
    /// Its TLS port (the test CA's certificate).
    tls_port: u16,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.conf);
    }
}

impl Sentinel {
    /// A Sentinel on a free plain port and a free TLS port monitoring the TLS-only master on
    /// `master_tls_port` as `mymaster`, with the certificates of `dir` (for its TLS port and
    /// its own TLS connections to the master).
    fn start(dir: &Path, master_tls_port: u16) -> Sentinel {
        let (port, tls_port) = (free_port(), free_port());
        let path = |f: &str| dir.join(f).display().to_string();
        let conf = dir.join(format!("{}.conf", unique("sentinel-tls")));
        std::fs::write(
            &conf,
            format!(
                "port {port}\ntls-port {tls_port}\nbind 127.0.0.1\n\
                 tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                 tls-auth-clients no\ntls-replication yes\n\
                 sentinel monitor mymaster 127.0.0.1 {master_tls_port} 1\n\
                 sentinel down-after-milliseconds mymaster 5000\n",
                path("server.crt"),
                path("server.key"),
                path("ca.crt"),
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
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the Sentinel on {port} did not open"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Sentinel {
            child,
            conf,
            port,
            tls_port,
        }
    }

    /// `SENTINEL MASTER mymaster`'s `flags` (`master` once it reaches the master over TLS).
    async fn master_flags(&self) -> Option<String> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let fields: Vec<String> = redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg("mymaster")
            .query_async(&mut conn)
            .await
            .ok()?;
        let i = fields.iter().position(|f| f == "flags")?;
        fields.get(i + 1).cloned()
    }
}

/// `LLEN queue` on the master, read with redis-rs over TLS (not through the source).
async fn raw_len(port: u16, db: u32, ca: &Path, queue: &str) -> u64 {
    let client = redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{port}/{db}"),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(ca).unwrap()),
        },
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("LLEN")
        .arg(queue)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Celery (URL `broker`, transport `options`, extra settings `config`) publishes `count` tasks
/// to `queue`; returns kombu's `_size` of it.
async fn publish(
    python: &str,
    broker: &str,
    options: &Value,
    config: &Value,
    queue: &str,
    count: u64,
) -> u64 {
    let (python, broker, options, config, queue) = (
        python.to_string(),
        broker.to_string(),
        options.clone(),
        config.clone(),
        queue.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        let count = count.to_string();
        let out = celery_scale_testing::publish_script(
            "publish.py",
            &python,
            &broker,
            &options,
            &config,
            &["--queue", &queue, "--count", &count],
        );
        out["kombu_size"][queue.as_str()]
            .as_u64()
            .unwrap_or_else(|| panic!("kombu_size in {out}"))
    })
    .await
    .expect("the publisher thread")
}

/// A source for `url` with transport `options` and optional `tls`, watching `queue`.
fn source(url: &str, options: &Value, queue: &str, tls: Option<TlsConfig>) -> RedisQueueSource {
    let mut b = RedisSourceConfig::builder(url).queue(queue);
    for (k, v) in options.as_object().unwrap() {
        b = b.transport_option(k.clone(), v.clone());
    }
    let mut b = b
        .timeout(Duration::from_secs(3))
        .connect_timeout(Duration::from_secs(1));
    if let Some(tls) = tls {
        b = b.tls(tls);
    }
    RedisQueueSource::new(b.build().expect("Celery's sentinel:// settings verbatim")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_master_over_tls_with_a_private_ca() {
    let Some(python) = celery_scale_testing::service("CELERY_SCALE_PYTHON") else {
        return;
    };
    if !have_redis_server() || !have_openssl() {
        return;
    }
    let dir = temp_dir("sentinel-tls");
    make_certificates(&dir);
    let (_master, tls_port) = tls_server(&dir, &[]);
    let sentinel = Sentinel::start(&dir, tls_port);
    // The Sentinel reaches the TLS-only master (it needs tls-replication and the CA for that).
    poll(
        "the Sentinel sees the TLS master up",
        Duration::from_secs(15),
        || async { (sentinel.master_flags().await.as_deref() == Some("master")).then_some(()) },
    )
    .await;
    let ca = dir.join("ca.crt");
    let ca_shown = ca.display().to_string();
    let sp = sentinel.port;
    let options = json!({"master_name": "mymaster"});

    // kombu's query form on the (first) Sentinel URL: the same string in Celery and the source.
    let first_queue = unique("stls-query");
    let queue = first_queue.clone();
    let url = format!("sentinel://127.0.0.1:{sp}/0?ssl_cert_reqs=required&ssl_ca_certs={ca_shown}");
    let published = publish(&python, &url, &options, &json!({}), &queue, 7).await;
    assert_eq!(published, 7, "kombu's _size after publishing");
    let src = source(&url, &options, &queue, None);
    let obs = src
        .observe()
        .await
        .expect("reads the TLS master through Sentinel");
    assert_eq!(obs.ready, published, "query form: {obs:?}");
    assert_eq!(raw_len(tls_port, 0, &ca, &queue).await, obs.ready);
    assert!(
        format!("{src:?}").contains(&tls_port.to_string()),
        "{src:?}"
    );
    // The worker-event subscriber gets its client from the Sentinels as well: it is up over
    // TLS (the master has no plain port).
    poll(
        "query form: the worker-event subscription over TLS",
        Duration::from_secs(10),
        || async { src.heartbeats_subscribed().then_some(()) },
    )
    .await;
    drop(src);

    // Celery's broker_use_ssl with a plain sentinel:// URL: the source's `tls` table, which
    // turns TLS to the master on as kombu's `ssl` options do. Database 1 this time.
    let queue = unique("stls-use-ssl");
    let url = format!("sentinel://127.0.0.1:{sp}/1");
    let use_ssl =
        json!({"broker_use_ssl": {"ssl_cert_reqs": "required", "ssl_ca_certs": ca_shown}});
    let published = publish(&python, &url, &options, &use_ssl, &queue, 4).await;
    assert_eq!(published, 4, "kombu's _size after publishing");
    let src = source(
        &url,
        &options,
        &queue,
        Some(TlsConfig {
            ca_file: Some(ca.clone()),
            ..TlsConfig::default()
        }),
    );
    let obs = src
        .observe()
        .await
        .expect("reads the TLS master through Sentinel");
    assert_eq!(obs.ready, published, "broker_use_ssl: {obs:?}");
    assert_eq!(raw_len(tls_port, 1, &ca, &queue).await, obs.ready);
    poll(
        "broker_use_ssl: the worker-event subscription over TLS",
        Duration::from_secs(10),
        || async { src.heartbeats_subscribed().then_some(()) },
    )
    .await;
    drop(src);

    // TLS to the Sentinel too (its TLS port): kombu's sentinel_kwargs, redis-py's keywords for
    // the Sentinel connections; the master through the URL's query form.
    let queue = unique("stls-sentinel");
    let url = format!(
        "sentinel://127.0.0.1:{}/2?ssl_cert_reqs=required&ssl_ca_certs={ca_shown}",
        sentinel.tls_port
    );
    let tls_options = json!({"master_name": "mymaster", "sentinel_kwargs": {
        "ssl": true, "ssl_cert_reqs": "required", "ssl_ca_certs": ca_shown}});
    let published = publish(&python, &url, &tls_options, &json!({}), &queue, 5).await;
    assert_eq!(published, 5, "kombu's _size after publishing");
    let src = source(&url, &tls_options, &queue, None);
    let obs = src
        .observe()
        .await
        .expect("reads the TLS master through the TLS Sentinel");
    assert_eq!(obs.ready, published, "sentinel_kwargs ssl: {obs:?}");
    assert_eq!(raw_len(tls_port, 2, &ca, &queue).await, obs.ready);
    poll(
        "sentinel_kwargs ssl: the worker-event subscription over TLS",
        Duration::from_secs(10),
        || async { src.heartbeats_subscribed().then_some(()) },
    )
    .await;
    drop(src);

    // A CA that did not sign the master's (or the Sentinel's) certificate: a typed TLS error (never a panic, never
    // a count of 0: the queue of the first case still holds its 7 messages), and no
    // worker-event subscription.
    let other = temp_dir("sentinel-tls-other");
    make_certificates(&other);
    let wrong_ca = other.join("ca.crt");
    let cases = [
        (
            "query form",
            format!(
                "sentinel://127.0.0.1:{sp}/0?ssl_cert_reqs=required&ssl_ca_certs={}",
                wrong_ca.display()
            ),
            None,
        ),
        (
            "broker_use_ssl",
            format!("sentinel://127.0.0.1:{sp}/0"),
            Some(TlsConfig {
                ca_file: Some(wrong_ca.clone()),
                ..TlsConfig::default()
            }),
        ),
    ];
    let wrong_sentinel_ca = json!({"master_name": "mymaster", "sentinel_kwargs": {
        "ssl": true, "ssl_ca_certs": wrong_ca.display().to_string()}});
    let cases = cases
        .into_iter()
        .map(|(l, u, t)| (l, u, options.clone(), t))
        .chain([(
            "sentinel_kwargs ssl_ca_certs",
            format!(
                "sentinel://127.0.0.1:{}/0?ssl_ca_certs={ca_shown}",
                sentinel.tls_port
            ),
            wrong_sentinel_ca,
            None,
        )]);
    for (label, url, options, tls) in cases {
        let src = source(&url, &options, &first_queue, tls);
        let e = src.observe_redis().await.unwrap_err();
        assert!(matches!(e, RedisSourceError::Tls { .. }), "{label}: {e:?}");
        let e = src.observe().await.unwrap_err();
        assert!(
            !e.is_transient(),
            "{label}: an untrusted certificate needs a configuration change: {e:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!src.heartbeats_subscribed(), "{label}");
        assert!(src.workers().is_none(), "{label}");
    }
    drop(sentinel);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&other);
}
