//! The core conformance suite against real RabbitMQ, with and without the management API, plus
//! discovery and the dead-source checks.

mod common;

use std::time::Duration;

use celery_scale_amqp::{AmqpQueueSource, AmqpSourceConfig, DiscoveryConfig, ManagementConfig};
use celery_scale_core::QueueSource;
use celery_scale_core::conformance::{dead_queue_source, queue_source};
use common::*;

#[tokio::test]
async fn amqp_only_source_conforms() {
    let Some(amqp) = amqp_url() else { return };
    let queue = unique("conf");
    let _cleanup = QueueCleanup::new(&amqp, &[&queue]);
    let fixture = AmqpFixture::new(&amqp, &[&queue], None).await;
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(amqp.as_str())
            .queue(queue.as_str())
            .heartbeats(false)
            .no_management()
            .build()
            .unwrap(),
    )
    .unwrap();
    queue_source(&source, &fixture, &queue).await;

    // A passive declare sees ready messages and consumers, never unacknowledged ones.
    let obs = source.observe().await.unwrap();
    assert_eq!(obs.in_flight, None);
    assert_eq!(obs.consumers, Some(0));
    assert_eq!(
        source.connections_opened(),
        1,
        "one connection for every read"
    );
}

#[tokio::test]
async fn source_with_management_api_conforms_and_reports_in_flight() {
    let Some((amqp, mgmt_url)) = amqp_and_mgmt() else {
        return;
    };
    let queue = unique("conf-mgmt");
    let _cleanup = QueueCleanup::new(&amqp, &[&queue]);
    let mgmt = Mgmt::new(&mgmt_url);
    // The fixture waits after each step until the API's statistics (refreshed every 5 s) show
    // it, so the in-flight figure the source reads is the one the step produced.
    let fixture = AmqpFixture::new(&amqp, &[&queue], Some(mgmt)).await;
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(amqp.as_str())
            .queue(queue.as_str())
            .heartbeats(false)
            .management(ManagementConfig::new(mgmt_url.as_str()))
            .build()
            .unwrap(),
    )
    .unwrap();
    queue_source(&source, &fixture, &queue).await;
    let stats = source.management_stats().expect("the API was read");
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].name, queue);
    assert_eq!(stats[0].queue_type.as_deref(), Some("classic"));
}

#[tokio::test]
async fn dead_and_misconfigured_sources_give_typed_errors() {
    let Some(amqp) = amqp_url() else { return };
    // Nothing listens on port 1.
    let down = AmqpQueueSource::new(
        AmqpSourceConfig::builder("amqp://guest:guest@127.0.0.1:1/%2f")
            .queue("celery")
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    dead_queue_source(&down).await;
    let e = down.observe().await.unwrap_err();
    assert_eq!(e.kind(), celery_scale_core::ErrorKind::Unavailable, "{e}");
    assert!(e.is_transient());

    // A vhost that does not exist.
    let novhost = AmqpQueueSource::new(
        AmqpSourceConfig::builder(with_vhost(&amqp, &unique("no-vhost")))
            .queue("celery")
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    dead_queue_source(&novhost).await;
    let e = novhost.observe().await.unwrap_err();
    assert_eq!(
        e.kind(),
        celery_scale_core::ErrorKind::PermissionDenied,
        "{e}"
    );
    assert!(!e.is_transient());

    // amqps:// to a plain AMQP port: the TLS handshake fails, typed, without a panic.
    let tls = AmqpQueueSource::new(
        AmqpSourceConfig::builder(amqp.replacen("amqp://", "amqps://", 1))
            .queue("celery")
            .heartbeats(false)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
    )
    .unwrap();
    dead_queue_source(&tls).await;
}

#[tokio::test]
async fn discovery_lists_work_queues_and_ignores_celery_internals() {
    let Some((amqp, mgmt_url)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let vhost = Vhost::create(&mgmt, &amqp_user(&amqp), &unique("disc"));
    let url = with_vhost(&amqp, &vhost.name);
    let work = ["celery", "emails", "reports-tmp"];
    let internal = [
        "celery@host.celery.pidbox",
        "8a6f.reply.celery.pidbox",
        "celeryev.5b1c",
        "celery.dq2",
        "celery_delayed_3",
    ];
    declare(&url, &work, None).await;
    declare(&url, &["quorum-q"], Some("quorum")).await;
    declare(&url, &internal, None).await;
    let fixture = AmqpFixture::new(&url, &[], None).await;
    use celery_scale_core::conformance::QueueFixture as _;
    fixture.publish("emails", 3).await.unwrap();
    fixture.publish("quorum-q", 2).await.unwrap();

    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(url.as_str())
            .heartbeats(false)
            .management(ManagementConfig::new(mgmt_url.as_str()))
            .discovery(DiscoveryConfig {
                refresh: Duration::from_millis(200),
                exclude: vec!["*-tmp".into()],
            })
            .build()
            .unwrap(),
    )
    .unwrap();
    let obs = source.observe().await.unwrap();
    let mut names: Vec<&str> = obs.queues.iter().map(|q| q.queue.as_str()).collect();
    names.sort();
    assert_eq!(names, ["celery", "emails", "quorum-q"]);
    assert_eq!(obs.ready, 5, "{obs:?}");

    // A discovered queue that is deleted is dropped, not an error.
    delete_queues(&url, &["emails"]).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let obs = source.observe().await.unwrap();
    let names: Vec<&str> = obs.queues.iter().map(|q| q.queue.as_str()).collect();
    assert!(!names.contains(&"emails"), "{names:?}");
    assert_eq!(obs.ready, 2);
}
