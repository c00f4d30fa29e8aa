//! `amqps://` against a throwaway RabbitMQ node (never the shared one) with a TLS listener and
//! certificates made for the test by a private CA: the conformance suite and worker heartbeats
//! over TLS with `tls.ca_file`; the same listener without that CA (a typed, non-transient error
//! that never shows the password); mutual TLS with a PEM and a PKCS#12 client identity; and the
//! TLS files checked when the source is made, errors naming the field.

mod common;

use std::time::Duration;

use celery_scale_amqp::{
    AmqpQueueSource, AmqpSourceConfig, AmqpSourceError, ManagementClient, ManagementConfig,
    TlsConfig,
};
use celery_scale_core::conformance::{QueueFixture as _, queue_source};
use celery_scale_core::{ErrorKind, QueueSource};
use common::scratch::{SCRATCH_PASSWORD, ScratchBroker, ScratchTls, TestPki};
use common::*;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection};

/// The crate's error under a core error.
fn typed(e: &celery_scale_core::Error) -> &AmqpSourceError {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<AmqpSourceError>())
        .unwrap_or_else(|| panic!("the crate's error is the source of {e:?}"))
}

/// Everything an error shows: its message, its `Debug` and its sources' messages.
fn everything_shown(e: &celery_scale_core::Error) -> String {
    let mut shown = format!("{e}\n{e:?}\n");
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        shown.push_str(&format!("{err}\n"));
        next = err.source();
    }
    shown
}

/// Publishes one `worker-heartbeat` event as a Celery worker does (to the `celeryev` topic
/// exchange, routing key `worker.heartbeat`).
async fn beat(conn: &Connection, hostname: &str, active: u64) {
    let ch = conn.create_channel().await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let body = serde_json::json!({
        "type": "worker-heartbeat", "hostname": hostname, "active": active,
        "processed": 10, "freq": 2.0, "timestamp": now,
    });
    ch.basic_publish(
        "celeryev".into(),
        "worker.heartbeat".into(),
        BasicPublishOptions::default(),
        body.to_string().as_bytes(),
        BasicProperties::default().with_content_type("application/json".into()),
    )
    .await
    .unwrap();
    ch.close(200, "".into()).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_conforms_and_an_untrusted_certificate_is_a_typed_error() {
    let Some(broker) = ScratchBroker::start(Some(ScratchTls {
        require_client_cert: false,
        https_management: true,
    }))
    .await
    else {
        return;
    };
    let pki = broker.pki.as_ref().unwrap();
    let queue = "celery";
    // The fixture publishes and takes on the node's plain port; the source reads over TLS only.
    let fixture = AmqpFixture::new(&broker.amqp_url(), &[queue], None).await;
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(broker.amqps_url())
            .queue(queue)
            .tls(TlsConfig::default().with_ca_file(&pki.ca_file))
            .heartbeat_warmup(Duration::from_millis(200))
            .build()
            .unwrap(),
    )
    .unwrap();
    queue_source(&source, &fixture, queue).await;
    fixture.publish(queue, 7).await.unwrap();
    assert_eq!(source.observe().await.unwrap().ready, 7);
    assert_eq!(source.connections_opened(), 1, "one TLS connection for all");

    // The worker-event consumer shares that TLS connection: a beat published on the plain
    // port reaches it.
    poll(
        "the worker-event consumer over TLS",
        Duration::from_secs(20),
        || async { source.is_consuming_heartbeats().then_some(()) },
    )
    .await;
    let publisher = connect(&broker.amqp_url()).await;
    let obs = poll(
        "a worker heartbeat seen over TLS",
        Duration::from_secs(20),
        || async {
            beat(&publisher, "tls-worker@csa", 3).await;
            let obs = source.observe().await.ok()?;
            (obs.live_workers == Some(1)).then_some(obs)
        },
    )
    .await;
    assert_eq!(obs.executing, Some(3), "{obs:?}");
    assert_eq!(source.connections_opened(), 1);

    // The same listener with the web PKI roots only, or with another CA: the handshake fails on
    // the certificate, typed, not transient, no panic, and the password is not shown.
    let other_ca = TlsConfig::default().with_ca_file(&pki.other_ca_file);
    for tls in [None, Some(other_ca)] {
        let mut config = AmqpSourceConfig::builder(broker.amqps_url())
            .queue(queue)
            .heartbeats(false);
        if let Some(tls) = tls {
            config = config.tls(tls);
        }
        let untrusted = AmqpQueueSource::new(config.build().unwrap()).unwrap();
        let e = untrusted.observe().await.unwrap_err();
        eprintln!("untrusted: {e}");
        assert!(
            matches!(typed(&e), AmqpSourceError::Tls { .. }),
            "{:?}",
            typed(&e)
        );
        assert!(
            !e.is_transient(),
            "an untrusted certificate needs a change: {e}"
        );
        assert_eq!(e.kind(), ErrorKind::Other, "{e}");
        assert!(e.to_string().contains("UnknownIssuer"), "says why: {e}");
        let shown = everything_shown(&e);
        assert!(!shown.contains(SCRATCH_PASSWORD), "{shown}");
        assert!(
            shown.contains("csa:***@127.0.0.1"),
            "the URL, redacted: {shown}"
        );
        assert_eq!(untrusted.connections_opened(), 0);
    }
    // The trusted source is unaffected.
    assert_eq!(source.observe().await.unwrap().ready, 7);

    // The management API over HTTPS, signed by the same private CA. Without the CA the read
    // fails on the certificate (the password not shown); with `management.ca_file`, or with
    // `tls.ca_file` alone (the source hands it on), it reads the queue.
    let untrusted = ManagementClient::new(&ManagementConfig::new(broker.management_url())).unwrap();
    let e = poll(
        "the HTTPS management listener up (refusing the certificate)",
        Duration::from_secs(30),
        || async {
            let e = untrusted.queue("/", queue).await.err()?;
            let chain = everything_shown(&e.into());
            (chain.contains("certificate") || chain.contains("UnknownIssuer")).then_some(chain)
        },
    )
    .await;
    assert!(!e.contains(SCRATCH_PASSWORD), "{e}");
    let trusted = ManagementClient::new(
        &ManagementConfig::new(broker.management_url()).with_ca_file(&pki.ca_file),
    )
    .unwrap();
    let stats = poll(
        "queue statistics over HTTPS",
        Duration::from_secs(30),
        || async { trusted.queue("/", queue).await.ok().flatten()?.ready },
    )
    .await;
    assert!(stats <= 7, "{stats}");
    let inherited = AmqpQueueSource::new(
        AmqpSourceConfig::builder(broker.amqps_url())
            .queue(queue)
            .heartbeats(false)
            .tls(TlsConfig::default().with_ca_file(&pki.ca_file))
            .management(ManagementConfig::new(broker.management_url()))
            .build()
            .unwrap(),
    )
    .unwrap();
    // In flight comes only from the management API (statistics, up to 5 s behind).
    poll(
        "7 ready and 0 in flight with the HTTPS management API",
        Duration::from_secs(30),
        || async {
            let obs = inherited.observe().await.ok()?;
            ((obs.ready, obs.in_flight) == (7, Some(0))).then_some(())
        },
    )
    .await;
}

// One thread, so that the log capture (set for this thread) sees lapin's tasks too.
#[tokio::test]
async fn mutual_tls_with_a_pem_or_pkcs12_client_identity() {
    let (captured, _guard) = Captured::install();
    let Some(broker) = ScratchBroker::start(Some(ScratchTls {
        require_client_cert: true,
        https_management: false,
    }))
    .await
    else {
        return;
    };
    let pki = broker.pki.as_ref().unwrap();
    let queue = "mtls";
    let fixture = AmqpFixture::new(&broker.amqp_url(), &[queue], None).await;
    fixture.publish(queue, 4).await.unwrap();
    let source = |tls: TlsConfig| {
        AmqpQueueSource::new(
            AmqpSourceConfig::builder(broker.amqps_url())
                .queue(queue)
                .heartbeats(false)
                .tls(tls)
                .build()
                .unwrap(),
        )
        .unwrap()
    };
    let ca = TlsConfig::default().with_ca_file(&pki.ca_file);
    let pem = ca
        .clone()
        .with_client_cert(&pki.client_cert_file, &pki.client_key_file);
    let p12 = ca
        .clone()
        .with_client_pkcs12(&pki.client_p12_file, &pki.client_p12_password);
    for (what, tls) in [("PEM", pem), ("PKCS#12", p12)] {
        let s = source(tls);
        let obs = s
            .observe()
            .await
            .unwrap_or_else(|e| panic!("{what} identity: {e:?}"));
        assert_eq!(obs.ready, 4, "{what}");
        assert!(!format!("{s:?}").contains(&pki.client_p12_password));
    }

    // No client certificate: the broker refuses it with a `certificate_required` alert. With
    // TLS 1.3 it does so after the client has finished its side of the handshake, so the client
    // may already be writing its first AMQP bytes into a socket the broker is closing, and then
    // gets a reset instead of the alert (seen here in 1 to 5 attempts out of 10): a transient
    // `Unavailable`. Each attempt is a new connection; the alert must show up, typed and not
    // transient, and nothing else than these two may.
    let anonymous = source(ca);
    let mut tls_errors = 0;
    for _ in 0..12 {
        let e = anonymous.observe().await.unwrap_err();
        assert!(!everything_shown(&e).contains(SCRATCH_PASSWORD));
        // As the control loop logs a failed observation.
        tracing::warn!(error = %e, "observe failed");
        match typed(&e) {
            AmqpSourceError::Tls { reason, .. } => {
                assert!(reason.contains("CertificateRequired"), "{e}");
                assert!(!e.is_transient(), "{e}");
                tls_errors += 1;
                if tls_errors == 2 {
                    break;
                }
            }
            AmqpSourceError::Unavailable { .. } => assert!(e.is_transient(), "{e}"),
            other => panic!("{other:?}"),
        }
    }
    assert!(tls_errors > 0, "the broker's alert was never seen");
    assert_eq!(anonymous.connections_opened(), 0);

    let logs = captured.text();
    // The capture works (our own line is in it); whatever lapin logged on this thread by now
    // is in it too, and neither may hold a password.
    assert!(
        logs.contains("observe failed") && logs.contains("CertificateRequired"),
        "the failure is logged"
    );
    for secret in [SCRATCH_PASSWORD, pki.client_p12_password.as_str()] {
        assert!(!logs.contains(secret), "a password leaked into the logs");
    }
}

#[tokio::test]
async fn tls_files_are_checked_when_the_source_is_made() {
    let dir = std::env::temp_dir().join(unique("tls-files"));
    let pki = TestPki::make(&dir);
    // Nothing listens at this address: construction does no I/O, so only the files are read.
    let url = "amqps://user:hunter2@127.0.0.1:1/%2f";
    let make = |tls: TlsConfig| {
        AmqpQueueSource::new(
            AmqpSourceConfig::builder(url)
                .queue("q")
                .heartbeats(false)
                .tls(tls)
                .build()
                .unwrap(),
        )
    };
    let field = |tls: TlsConfig| {
        let e: celery_scale_core::Error = make(tls).unwrap_err().into();
        let shown = everything_shown(&e);
        assert!(
            !shown.contains("hunter2") && !shown.contains(&pki.client_p12_password),
            "{shown}"
        );
        match e {
            celery_scale_core::Error::Config(c) => c.field,
            other => panic!("a configuration error, not {other:?}"),
        }
    };
    let ca = || TlsConfig::default().with_ca_file(&pki.ca_file);
    assert_eq!(
        field(TlsConfig::default().with_ca_file(dir.join("missing.pem"))),
        "tls.ca_file"
    );
    // The management API's own CA file is checked the same way, naming its field.
    for bad in [dir.join("missing.pem"), pki.client_key_file.clone()] {
        let e = ManagementClient::new(
            &ManagementConfig::new("https://mon:hunter2@127.0.0.1:1").with_ca_file(bad),
        )
        .unwrap_err();
        assert!(
            matches!(&e, AmqpSourceError::TlsFile(file) if file.field() == "management.ca_file"),
            "{e:?}"
        );
        assert!(!format!("{e}{e:?}").contains("hunter2"), "{e:?}");
    }
    // A key where the CA should be: no certificate in it.
    assert_eq!(
        field(TlsConfig::default().with_ca_file(&pki.client_key_file)),
        "tls.ca_file"
    );
    assert_eq!(
        field(ca().with_client_cert(&pki.client_cert_file, &pki.server_key_file)),
        "tls.client_key_file",
        "another certificate's key"
    );
    assert_eq!(
        field(ca().with_client_cert(dir.join("missing.pem"), &pki.client_key_file)),
        "tls.client_cert_file"
    );
    assert_eq!(
        field(ca().with_client_pkcs12(&pki.client_p12_file, "wrong-p12-password")),
        "tls.client_pkcs12_password"
    );
    assert_eq!(
        field(ca().with_client_pkcs12(&pki.ca_file, &pki.client_p12_password)),
        "tls.client_pkcs12_file",
        "a PEM file is not PKCS#12"
    );
    for good in [
        ca(),
        ca().with_client_cert(&pki.client_cert_file, &pki.client_key_file),
        ca().with_client_pkcs12(&pki.client_p12_file, &pki.client_p12_password),
    ] {
        make(good).expect("readable files that fit together");
    }
    // TLS options with a plain amqp:// URL.
    let e = AmqpSourceConfig::builder("amqp://user:hunter2@127.0.0.1/%2f")
        .queue("q")
        .tls(ca())
        .build()
        .unwrap_err();
    assert_eq!(e.field, "tls");
    let _ = std::fs::remove_dir_all(&dir);
}
