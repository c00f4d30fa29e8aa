//! Celery's `broker_url` and `broker_transport_options` pasted verbatim, against real Celery
//! (celery 5.7, kombu's pyamqp transport) and real RabbitMQ: the `pyamqp://` scheme of Celery's
//! getting-started guide, a failover list whose first broker is dead, the `virtual_host`
//! transport option (honoured by Celery and by the source), the management API found at the
//! AMQP URL's host with its credentials, and queue names that must be percent-encoded in every
//! management request.
//!
//! Each test runs in its own throwaway vhost.

mod common;

use std::time::Duration;

use celery_scale_amqp::{AmqpQueueSource, AmqpSourceConfig, DiscoveryConfig};
use celery_scale_core::{Observation, QueueSource};
use common::*;
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use serde_json::{Value, json};

/// Runs the test app's `publish.py` with Celery's `broker_transport_options`; returns the JSON
/// it printed last.
fn publish_with_options(py: &str, broker: &str, options: &Value, args: &[&str]) -> Value {
    let app = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testing/celery");
    let out = std::process::Command::new(py)
        .arg("publish.py")
        .args(args)
        .current_dir(&app)
        .env("PYTHONPATH", &app)
        .env("CELERY_SCALE_TEST_BROKER", broker)
        .env("CELERY_SCALE_TEST_OPTIONS", options.to_string())
        .output()
        .expect("run publish.py");
    assert!(
        out.status.success(),
        "publish.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("publish.py printed {stdout:?}: {e}"))
}

/// `scheme://...` of the shared broker with another scheme.
fn with_scheme(url: &str, scheme: &str) -> String {
    let (_, rest) = url.split_once("://").unwrap();
    format!("{scheme}://{rest}")
}

fn queue_of<'a>(obs: &'a Observation, queue: &str) -> &'a celery_scale_core::QueueDepth {
    obs.queues
        .iter()
        .find(|q| q.queue == queue)
        .unwrap_or_else(|| panic!("{queue} missing from {obs:?}"))
}

/// `pyamqp://` verbatim, no `[management]` section: the producer's tasks are ready, then a
/// worker executes 2 and holds 4 prefetched; the in-flight count comes from the management API
/// found at the AMQP URL's host with its credentials, the executing count from the heartbeats.
#[tokio::test]
async fn pyamqp_producer_and_worker_read_right_with_the_management_api_found_from_the_url() {
    let Some((amqp, mgmt_url, py)) = celery_env() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let vhost = Vhost::create(&mgmt, &amqp_user(&amqp), &unique("pyamqp"));
    let broker = with_scheme(&with_vhost(&amqp, &vhost.name), "pyamqp");
    let queue = "celery";

    let out = publish(
        &py,
        &broker,
        &json!({}),
        &["--queue", queue, "--count", "6", "--seconds", "20"],
    );
    assert_eq!(out["kombu_size"][queue], 6);
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(broker.as_str())
            .queue(queue)
            .heartbeat_warmup(Duration::from_millis(500))
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(source.vhost(), vhost.name);
    assert_eq!(
        source.management_urls(),
        ["http://guest:***@127.0.0.1:15672"]
    );
    poll(
        "the worker-event consumer",
        Duration::from_secs(10),
        || async { source.is_consuming_heartbeats().then_some(()) },
    )
    .await;
    mgmt.wait_counts(&vhost.name, queue, (6, 0)).await;
    let obs = source.observe().await.unwrap();
    assert_eq!((obs.ready, obs.in_flight), (6, Some(0)), "{obs:?}");

    let _worker = Worker::start(&py, &broker, queue, &unique("w"), &[]);
    let busy = poll(
        "2 executing, 4 in flight, 0 ready, 1 live worker",
        Duration::from_secs(40),
        || async {
            let obs = source.observe().await.ok()?;
            (obs.executing == Some(2)
                && obs.in_flight == Some(4)
                && obs.ready == 0
                && obs.live_workers == Some(1))
            .then_some(obs)
        },
    )
    .await;
    assert_eq!(busy.consumers, Some(1), "{busy:?}");
    // Ready plus the larger of in flight and executing (the executing ones were acked).
    assert_eq!(busy.outstanding(), 4);
    source.shutdown().await;
}

/// Celery's `;`-separated failover list with a dead first broker: Celery publishes through the
/// second, the source connects to the second too; when the one in use fails, the source moves
/// on to the next, as kombu's failover does. (Two worker threads: the proxy keeps serving while
/// the test waits for Celery's publisher.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_list_skips_a_dead_broker_and_moves_on_when_the_one_in_use_fails() {
    let Some((amqp, mgmt_url, py)) = celery_env() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let vhost = Vhost::create(&mgmt, &amqp_user(&amqp), &unique("failover"));
    let real = with_vhost(&amqp, &vhost.name);
    // Nothing listens on port 1.
    let dead = real.replace(&host_port(&amqp), "127.0.0.1:1");
    let mut proxy = Proxy::start(&host_port(&amqp)).await;
    let proxied = via(&real, proxy.port);
    let list = format!("{dead};{proxied};{}", with_scheme(&real, "pyamqp"));

    let out = publish(&py, &list, &json!({}), &["--queue", "jobs", "--count", "4"]);
    assert_eq!(out["kombu_size"]["jobs"], 4);

    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(list.as_str())
            .queue("jobs")
            .heartbeats(false)
            .no_management()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(source.config().brokers().unwrap().len(), 3);
    let obs = source.observe().await.unwrap();
    assert_eq!(obs.ready, 4);
    assert!(
        source
            .current_broker()
            .contains(&format!(":{}/", proxy.port)),
        "{}",
        source.current_broker()
    );
    assert_eq!(source.connections_opened(), 1);

    // The broker in use goes away: the next observations move on to the third.
    proxy.cut();
    let obs = poll(
        "an observation through the third broker",
        Duration::from_secs(15),
        || async { source.observe().await.ok() },
    )
    .await;
    assert_eq!(obs.ready, 4);
    assert!(
        source.current_broker().contains(&host_port(&amqp)),
        "{}",
        source.current_broker()
    );
    // A task published through the list now lands where the source reads.
    publish(&py, &list, &json!({}), &["--queue", "jobs", "--count", "1"]);
    let obs = source.observe().await.unwrap();
    assert_eq!(obs.ready, 5);
}

/// `broker_transport_options = {"virtual_host": ..., "confirm_publish": True, ...}` with a URL
/// for vhost `/`: kombu's transport options win over the URL, so Celery publishes into the
/// option's vhost, and the source reads that vhost; the options that do not matter for counting
/// are accepted and listed as ignored.
#[tokio::test]
async fn the_virtual_host_transport_option_moves_celery_and_the_source_alike() {
    let Some((amqp, mgmt_url, py)) = celery_env() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let vhost = Vhost::create(&mgmt, &amqp_user(&amqp), &unique("option-vhost"));
    let broker = with_scheme(&with_vhost(&amqp, "/"), "pyamqp");
    let options = json!({
        "virtual_host": vhost.name,
        "confirm_publish": true,
        "max_retries": 3,
        "interval_start": 0,
    });
    let out = publish_with_options(
        &py,
        &broker,
        &options,
        &["--queue", "celery", "--count", "3"],
    );
    assert_eq!(out["kombu_size"]["celery"], 3);
    let mut config = AmqpSourceConfig::builder(broker.as_str())
        .queue("celery")
        .heartbeats(false);
    for (k, v) in options.as_object().unwrap() {
        config = config.transport_option(k.as_str(), v.clone());
    }
    let config = config.build().unwrap();
    let ignored: Vec<String> = config
        .ignored_transport_options()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        ignored,
        ["confirm_publish", "interval_start", "max_retries"]
    );
    let source = AmqpQueueSource::new(config).unwrap();
    assert_eq!(source.vhost(), vhost.name);
    mgmt.wait_counts(&vhost.name, "celery", (3, 0)).await;
    let obs = source.observe().await.unwrap();
    assert_eq!((obs.ready, obs.in_flight), (3, Some(0)), "{obs:?}");
}

/// Queue names (and a vhost name) that must be percent-encoded whole in management requests:
/// `a[1]` (which the `url` crate leaves unencoded, and RabbitMQ answers 400), `a b`, `a/b`,
/// `ü`, `50%`, `a?b#c`. Each reads its in-flight count through the per-queue `GET`s, through
/// the list call (more than 8 queues), and by discovery; `management = false` reads none.
#[tokio::test]
async fn queue_names_that_need_encoding_read_through_the_management_api() {
    let Some((amqp, mgmt_url)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let vhost = Vhost::create(&mgmt, &amqp_user(&amqp), &unique("enc [v] ü/x"));
    let broker = with_vhost(&amqp, &vhost.name);
    let names = ["a[1]", "a b", "a/b", "ü", "50%", "a?b#c"];
    declare(&broker, &names, None).await;
    let conn = connect(&broker).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for q in names {
        for _ in 0..3 {
            ch.basic_publish(
                "".into(),
                q.into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        // One taken and held unacknowledged: in flight.
        ch.basic_get(q.into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a message");
    }
    for q in names {
        mgmt.wait_counts(&vhost.name, q, (2, 1)).await;
    }

    // Per-queue GETs (6 queues), the management API found from the AMQP URL.
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(broker.as_str())
            .queues(names)
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    let obs = source.observe().await.unwrap();
    for q in names {
        let d = queue_of(&obs, q);
        assert_eq!((d.ready, d.in_flight), (2, Some(1)), "{q}: {obs:?}");
    }
    assert_eq!((obs.ready, obs.in_flight), (12, Some(6)));

    // The list call (more than 8 queues: three more that do not exist yet).
    let many: Vec<String> = names
        .iter()
        .map(|s| s.to_string())
        .chain(["x[2]", "y z", "w/v"].map(String::from))
        .collect();
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(broker.as_str())
            .queues(many.iter().cloned())
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    let obs = source.observe().await.unwrap();
    assert_eq!((obs.ready, obs.in_flight), (12, Some(6)), "{obs:?}");

    // Discovery lists the vhost (its name encoded too) and finds all six.
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(broker.as_str())
            .discovery(DiscoveryConfig::default())
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    let obs = source.observe().await.unwrap();
    let mut found = source.queues();
    found.sort();
    let mut expected: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(found, expected);
    assert_eq!((obs.ready, obs.in_flight), (12, Some(6)));

    // Turned off: the same queues, no in-flight count.
    let off: AmqpSourceConfig = toml::from_str(&format!(
        "url = {broker:?}\nqueues = {:?}\nheartbeats = false\nmanagement = false\n",
        names
    ))
    .unwrap();
    let source = AmqpQueueSource::new(off).unwrap();
    assert!(source.management_urls().is_empty());
    let obs = source.observe().await.unwrap();
    assert_eq!((obs.ready, obs.in_flight), (12, None));
    drop(conn);
}

/// `amqps://` verbatim with Celery's `broker_use_ssl` (a private CA): Celery publishes over TLS;
/// the source reads over TLS with the same CA in `[tls]`, and finds the management API at the
/// URL's host over `https://`, with the URL's credentials and the port kombu's `manager_port`
/// transport option gives (the node's API is not on 15671).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_producer_reads_right_over_tls_with_the_https_management_api_from_the_url() {
    let Some(py) = celery_env().map(|(_, _, py)| py) else {
        return;
    };
    let Some(broker) = common::scratch::ScratchBroker::start(Some(common::scratch::ScratchTls {
        require_client_cert: false,
        https_management: true,
    }))
    .await
    else {
        return;
    };
    let pki = broker.pki.as_ref().unwrap();
    let amqps = broker.amqps_url();
    let ssl = json!({"broker_use_ssl": {"ca_certs": pki.ca_file, "cert_reqs": 2}});
    let out = publish(&py, &amqps, &ssl, &["--queue", "celery", "--count", "5"]);
    assert_eq!(out["kombu_size"]["celery"], 5);

    let (https_port, _) = broker.management_ports.unwrap();
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(amqps.as_str())
            .queue("celery")
            .heartbeats(false)
            .transport_option("manager_port", json!(https_port))
            .tls(celery_scale_amqp::TlsConfig::default().with_ca_file(&pki.ca_file))
            .build()
            .unwrap(),
    )
    .unwrap();
    let urls = source.management_urls();
    assert_eq!(urls.len(), 1);
    assert!(
        urls[0].starts_with("https://") && urls[0].ends_with(&format!("@127.0.0.1:{https_port}")),
        "{urls:?}"
    );
    let obs = poll(
        "5 ready and the in-flight count from the HTTPS management API",
        Duration::from_secs(20),
        || async {
            let obs = source.observe().await.ok()?;
            (obs.in_flight.is_some()).then_some(obs)
        },
    )
    .await;
    assert_eq!((obs.ready, obs.in_flight), (5, Some(0)), "{obs:?}");
    assert!(source.current_broker().starts_with("amqps://"));
}
