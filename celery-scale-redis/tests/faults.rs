//! Faults, authentication, unix sockets and TLS, each against a throwaway `redis-server` this
//! test starts and kills (never the shared one).

mod common;

use std::sync::Arc;
use std::time::Duration;

use celery_scale_core::config::PolicyConfig;
use celery_scale_core::conformance::{self, QueueFixture as _};
use celery_scale_core::record::Outcome;
use celery_scale_core::{Binding, ErrorKind, LoopSettings, MemoryScaler, QueueSource, Scaler};
use celery_scale_redis::{
    InFlightMode, RedisQueueSource, RedisSourceConfig, RedisSourceError, TlsConfig,
};
use common::certs::*;
use common::*;
use redis::AsyncCommands as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_run_gives_typed_errors_and_recovers() {
    if !have_redis_server() {
        return;
    }
    let mut server = RedisServer::start(0, &[]);
    let url = format!("redis://127.0.0.1:{}/0", server.port);
    let source = Arc::new(
        RedisQueueSource::new(
            RedisSourceConfig::builder(url.as_str())
                .queue("celery")
                .heartbeat_warmup(Duration::from_millis(200))
                .timeout(Duration::from_secs(2))
                .connect_timeout(Duration::from_millis(500))
                .build()
                .unwrap(),
        )
        .unwrap(),
    );
    let client = redis::Client::open(url.as_str()).unwrap();
    let fixture = KombuFixture::connect(&client, "").await;
    fixture.publish("celery", 4).await.unwrap();

    let scaler = MemoryScaler::new(2);
    let policy = PolicyConfig {
        stabilize_down: Duration::ZERO,
        ..PolicyConfig::default()
    };
    let mut binding = Binding::new(
        LoopSettings {
            name: "faults".into(),
            ..LoopSettings::default()
        },
        Box::new(Arc::clone(&source)),
        Box::new(scaler.clone()),
        policy.build().unwrap(),
    )
    .unwrap();
    let record = binding.tick().await;
    assert!(record.observation_error.is_none(), "{record:?}");
    assert_eq!(record.observation.as_ref().map(|o| o.ready), Some(4));
    let desired = scaler.capacity().await.unwrap().desired;
    poll(
        "the heartbeat subscription",
        Duration::from_secs(5),
        || async { source.heartbeats_subscribed().then_some(()) },
    )
    .await;

    server.kill();
    let err = source.observe_redis().await.unwrap_err();
    assert!(
        matches!(
            err,
            RedisSourceError::ConnectionRefused { .. } | RedisSourceError::Unavailable { .. }
        ),
        "{err:?}"
    );
    let core = source.observe().await.unwrap_err();
    assert_eq!(core.kind(), ErrorKind::Unavailable, "{core}");
    assert!(core.is_transient());
    // The loop holds: no scale-in from a failed observation.
    let record = binding.tick().await;
    assert!(
        matches!(
            record.outcome,
            Outcome::Held { .. } | Outcome::Unchanged { .. }
        ),
        "{record:?}"
    );
    let recorded = record
        .observation_error
        .as_ref()
        .expect("the failure is recorded");
    assert_eq!(recorded.kind, ErrorKind::Unavailable);
    assert!(recorded.transient);
    assert_eq!(scaler.capacity().await.unwrap().desired, desired);
    poll(
        "the subscriber to notice",
        Duration::from_secs(10),
        || async { (!source.heartbeats_subscribed()).then_some(()) },
    )
    .await;
    assert_eq!(
        source.workers(),
        None,
        "no worker figures while unsubscribed"
    );

    // Redis comes back (empty: no persistence). The same source recovers without a restart,
    // and the subscriber resubscribes.
    server.restart();
    let obs = poll("the source to recover", Duration::from_secs(15), || async {
        source.observe().await.ok()
    })
    .await;
    assert_eq!(obs.ready, 0);
    let record = binding.tick().await;
    assert!(record.observation_error.is_none(), "{record:?}");
    poll(
        "the subscriber to resubscribe",
        Duration::from_secs(15),
        || async { source.heartbeats_subscribed().then_some(()) },
    )
    .await;
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let obs = poll(
        "a heartbeat after resubscribing",
        Duration::from_secs(10),
        || {
            let mut conn = conn.clone();
            let source = Arc::clone(&source);
            async move {
                let _: () = conn
                    .publish(
                        "/0.celeryev/worker.heartbeat",
                        worker_event("worker-heartbeat", "w@h", 1, 1),
                    )
                    .await
                    .unwrap();
                let obs = source.observe().await.ok()?;
                (obs.live_workers == Some(1)).then_some(obs)
            }
        },
    )
    .await;
    assert_eq!(obs.executing, Some(1));
    let _: () = conn.del("celery").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_username_and_unix_socket() {
    if !have_redis_server() {
        return;
    }
    let dir = temp_dir("auth");
    let sock = dir.join("redis.sock");
    let server = RedisServer::start(
        0,
        &[
            "--requirepass".into(),
            "s3cret-pw".into(),
            "--unixsocket".into(),
            sock.display().to_string(),
            "--unixsocketperm".into(),
            "700".into(),
        ],
    );
    let admin =
        redis::Client::open(format!("redis://:s3cret-pw@127.0.0.1:{}/0", server.port)).unwrap();
    let mut conn = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "celery", "on", ">user-pw", "~*", "&*", "+@all"][..])
        .query_async(&mut conn)
        .await
        .unwrap();

    let source = |url: String| {
        RedisQueueSource::new(
            RedisSourceConfig::builder(url)
                .queue("celery")
                .in_flight(InFlightMode::PerQueue)
                .heartbeats(false)
                .build()
                .unwrap(),
        )
        .unwrap()
    };
    // A wrong password: permission denied, not transient, and never shown.
    let wrong = source(format!("redis://:wrong-pw@127.0.0.1:{}/0", server.port));
    let e = wrong.observe_redis().await.unwrap_err();
    assert!(matches!(e, RedisSourceError::Auth { .. }), "{e:?}");
    let core: celery_scale_core::Error = e.into();
    assert_eq!(core.kind(), ErrorKind::PermissionDenied);
    assert!(!core.is_transient());
    let shown = format!("{core} {core:?} {wrong:?}");
    assert!(!shown.contains("wrong-pw"), "{shown}");

    // Username and password, db 2 from the path.
    let fixture_client = redis::Client::open(format!(
        "redis://celery:user-pw@127.0.0.1:{}/2",
        server.port
    ))
    .unwrap();
    let fixture = KombuFixture::connect(&fixture_client, "").await;
    let user = source(format!(
        "redis://celery:user-pw@127.0.0.1:{}/2",
        server.port
    ));
    assert_eq!(user.db(), 2);
    conformance::queue_source(&user, &fixture, "celery").await;
    fixture.publish("celery", 3).await.unwrap();
    assert_eq!(user.observe().await.unwrap().ready, 3);
    assert!(!format!("{user:?}").contains("user-pw"));

    // The unix socket, db 2 and the password as query parameters.
    let unix = source(format!(
        "redis+unix://{}?db=2&pass=s3cret-pw",
        sock.display()
    ));
    assert_eq!(unix.observe().await.unwrap().ready, 3);
    assert!(!format!("{unix:?}").contains("s3cret-pw"), "{unix:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_test_certificate() {
    if !have_redis_server() || !have_openssl() {
        return;
    }
    let dir = temp_dir("tls");
    make_certificates(&dir);
    let (_server, tls_port) = tls_server(&dir, &["--requirepass".into(), "tls-pw".into()]);
    let url = format!("rediss://:tls-pw@127.0.0.1:{tls_port}/1");
    let tls = TlsConfig {
        ca_file: Some(dir.join("ca.crt")),
        ..TlsConfig::default()
    };
    let source = RedisQueueSource::new(
        RedisSourceConfig::builder(url.as_str())
            .queue("celery")
            .in_flight(InFlightMode::PerQueue)
            .tls(tls)
            .heartbeat_warmup(Duration::from_millis(200))
            .build()
            .unwrap(),
    )
    .unwrap();
    let ca = std::fs::read(dir.join("ca.crt")).unwrap();
    let client = redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca),
        },
    )
    .unwrap();
    let fixture = KombuFixture::connect(&client, "").await;
    conformance::queue_source(&source, &fixture, "celery").await;
    // The heartbeat subscriber speaks TLS too.
    poll(
        "the subscription over TLS",
        Duration::from_secs(5),
        || async { source.heartbeats_subscribed().then_some(()) },
    )
    .await;

    // Without our CA the web PKI roots do not trust the test certificate: a typed error.
    let untrusted = RedisQueueSource::new(
        RedisSourceConfig::builder(url.as_str())
            .queue("celery")
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    let e = untrusted.observe_redis().await.unwrap_err();
    assert!(matches!(e, RedisSourceError::Tls { .. }), "{e:?}");
    let e: celery_scale_core::Error = e.into();
    assert!(
        !e.is_transient(),
        "an untrusted certificate needs a configuration change"
    );
    assert!(!format!("{e} {e:?}").contains("tls-pw"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// After an outage the very first observation uses the new connection: it does not fail with
/// the error of a reconnect attempt made while Redis was down. The heartbeat subscriber comes
/// back on its own within its backoff (at most 5 s after Redis does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_observation_after_redis_returns_succeeds() {
    if !have_redis_server() {
        return;
    }
    let mut server = RedisServer::start(0, &[]);
    let url = format!("redis://127.0.0.1:{}/0", server.port);
    let source = RedisQueueSource::new(
        RedisSourceConfig::builder(url.as_str())
            .queue("celery")
            .heartbeat_warmup(Duration::from_millis(200))
            .timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_millis(500))
            .build()
            .unwrap(),
    )
    .unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let fixture = KombuFixture::connect(&client, "").await;
    fixture.publish("celery", 2).await.unwrap();
    assert_eq!(source.observe_redis().await.unwrap().ready, 2);
    poll(
        "the heartbeat subscription",
        Duration::from_secs(5),
        || async { source.heartbeats_subscribed().then_some(()) },
    )
    .await;

    server.kill();
    // Several observations while Redis is down, with time between them for the connection
    // manager's own reconnect attempts to fail and be kept.
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let err = source.observe_redis().await.unwrap_err();
        assert!(
            matches!(
                err,
                RedisSourceError::ConnectionRefused { .. } | RedisSourceError::Unavailable { .. }
            ),
            "{err:?}"
        );
        // A refused connection fails fast, retry included.
        eprintln!(
            "observation during the outage failed in {:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
    }

    server.restart();
    let back = std::time::Instant::now();
    let obs = source
        .observe_redis()
        .await
        .expect("the first observation after Redis is back succeeds");
    assert_eq!(obs.ready, 0, "the restarted server is empty");
    eprintln!(
        "first observation after Redis came back took {:?}",
        back.elapsed()
    );
    assert!(
        back.elapsed() < Duration::from_secs(1),
        "{:?}",
        back.elapsed()
    );
    // The fixture's own connection died with the server: a new one.
    let fixture = KombuFixture::connect(&client, "").await;
    fixture.publish("celery", 1).await.unwrap();
    assert_eq!(source.observe_redis().await.unwrap().ready, 1);
    // The subscriber sets a fresh connection up on each attempt (no stale error to replay); it
    // is back within its longest backoff (5 s) plus one connection.
    poll(
        "the subscriber to resubscribe",
        Duration::from_secs(6),
        || async { source.heartbeats_subscribed().then_some(()) },
    )
    .await;
    eprintln!("resubscribed {:?} after Redis came back", back.elapsed());
}

/// TLS files are read and parsed when the configuration is validated and when the source is
/// made, before any connection: each bad file is an error naming its field.
#[tokio::test]
async fn tls_files_are_checked_before_connecting() {
    if !have_openssl() {
        return;
    }
    let dir = temp_dir("tls-files");
    make_certificates(&dir);
    std::fs::write(dir.join("empty.pem"), "").unwrap();
    std::fs::write(
        dir.join("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("bad-der.pem"),
        "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let p = |f: &str| Some(dir.join(f));
    let cases: Vec<(TlsConfig, &str, &str)> = vec![
        (
            TlsConfig {
                ca_file: p("missing.pem"),
                ..TlsConfig::default()
            },
            "tls.ca_file",
            "cannot be read",
        ),
        (
            TlsConfig {
                ca_file: p("empty.pem"),
                ..TlsConfig::default()
            },
            "tls.ca_file",
            "no PEM certificate",
        ),
        (
            TlsConfig {
                ca_file: p("garbage.pem"),
                ..TlsConfig::default()
            },
            "tls.ca_file",
            "PEM",
        ),
        (
            TlsConfig {
                ca_file: p("bad-der.pem"),
                ..TlsConfig::default()
            },
            "tls.ca_file",
            "cannot be used as a trust anchor",
        ),
        (
            TlsConfig {
                ca_file: p("ca.key"),
                ..TlsConfig::default()
            },
            "tls.ca_file",
            "no PEM certificate",
        ),
        (
            TlsConfig {
                client_cert_file: p("server.crt"),
                client_key_file: p("ca.key"),
                ..TlsConfig::default()
            },
            "tls.client_key_file",
            "is not the key of",
        ),
        (
            TlsConfig {
                client_cert_file: p("server.crt"),
                client_key_file: p("server.crt"),
                ..TlsConfig::default()
            },
            "tls.client_key_file",
            "no PEM private key",
        ),
        (
            TlsConfig {
                client_cert_file: p("server.key"),
                client_key_file: p("server.key"),
                ..TlsConfig::default()
            },
            "tls.client_cert_file",
            "no PEM certificate",
        ),
        (
            TlsConfig {
                client_cert_file: p("server.crt"),
                client_key_file: p("missing.key"),
                ..TlsConfig::default()
            },
            "tls.client_key_file",
            "cannot be read",
        ),
    ];
    for (tls, field, says) in cases {
        let config = RedisSourceConfig::builder("rediss://:hunter2@127.0.0.1:6380/0")
            .queue("celery")
            .heartbeats(false)
            .tls(tls.clone());
        let e = config.clone().build().unwrap_err();
        assert_eq!(e.field, field, "{tls:?}: {e}");
        assert!(e.rule.contains(says), "{tls:?}: {e}");
        assert!(!e.to_string().contains("hunter2"));
        // The source made without validate() first checks the files the same way, typed.
        let mut unvalidated = RedisSourceConfig::new("rediss://:hunter2@127.0.0.1:6380/0");
        unvalidated.queues = vec!["celery".into()];
        unvalidated.heartbeats = false;
        unvalidated.tls = Some(tls.clone());
        let e = RedisQueueSource::new(unvalidated).unwrap_err();
        match &e {
            RedisSourceError::TlsFile(file) => assert_eq!(file.field(), field, "{e:?}"),
            other => panic!("{tls:?}: {other:?}"),
        }
        let core: celery_scale_core::Error = e.into();
        assert!(!core.is_transient());
        assert!(!format!("{core} {core:?}").contains("hunter2"));
    }
    // The good files pass, mutual TLS included.
    let good = TlsConfig {
        ca_file: p("ca.crt"),
        client_cert_file: p("server.crt"),
        client_key_file: p("server.key"),
    };
    let config = RedisSourceConfig::builder("rediss://127.0.0.1:6380/0")
        .queue("celery")
        .heartbeats(false)
        .tls(good)
        .build()
        .unwrap();
    RedisQueueSource::new(config).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
