//! Faults: a missing queue among present ones (read as 0, the others counted), the broker connection closed by the broker, the
//! broker unreachable then back and a real RabbitMQ restart (the loop holds, then recovers), the
//! management API down, and a wrong password (typed error, password never printed).

mod common;

use std::sync::Arc;
use std::time::Duration;

use celery_scale_amqp::{AmqpQueueSource, AmqpSourceConfig, AmqpSourceError, ManagementConfig};
use celery_scale_core::config::PolicyConfig;
use celery_scale_core::conformance::QueueFixture as _;
use celery_scale_core::record::Outcome;
use celery_scale_core::{Binding, ErrorKind, LoopSettings, MemoryScaler, QueueSource, Scaler};
use common::*;

#[tokio::test]
async fn a_missing_queue_is_named_and_the_others_keep_working() {
    let Some(amqp) = amqp_url() else { return };
    let present = [unique("a"), unique("b"), unique("c")];
    let missing = [unique("missing1"), unique("missing2")];
    let all: Vec<&str> = present.iter().chain(&missing).map(String::as_str).collect();
    let _cleanup = QueueCleanup::new(&amqp, &all);
    let fixture = AmqpFixture::new(&amqp, &present.each_ref().map(String::as_str), None).await;
    for (i, q) in present.iter().enumerate() {
        fixture.publish(q, i as u64 + 1).await.unwrap();
    }
    // Missing queues before, between and after present ones.
    let order = [
        &present[0],
        &missing[0],
        &present[1],
        &missing[1],
        &present[2],
    ];
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(amqp.as_str())
            .queues(order.iter().map(|q| q.as_str()))
            .heartbeats(false)
            .missing_queue_recheck(Duration::from_secs(1))
            .no_management()
            .build()
            .unwrap(),
    )
    .unwrap();

    // A configured queue that does not exist (yet) holds nothing: the observation reads it as
    // 0 ready and counts the others.
    let obs = source.observe().await.unwrap();
    assert_eq!(obs.ready, 1 + 2 + 3);
    assert_eq!(obs.queues.len(), 5);
    for q in &missing {
        let depth = obs.queues.iter().find(|d| &d.queue == q).unwrap();
        assert_eq!((depth.ready, depth.consumers), (0, Some(0)), "{q}");
    }
    let mut names = missing.to_vec();
    names.sort();
    assert_eq!(source.missing_queues(), names);

    let read = source.declare_queues().await.unwrap();
    assert_eq!(read.len(), 5);
    for (i, q) in present.iter().enumerate() {
        let (_, depth) = read.iter().find(|(n, _)| n == q).unwrap();
        let depth = depth.as_ref().expect("a present queue is read");
        assert_eq!(depth.ready, i as u64 + 1, "{q}");
        assert_eq!(depth.consumers, Some(0));
    }
    for q in &missing {
        let (_, r) = read.iter().find(|(n, _)| n == q).unwrap();
        match r {
            Err(AmqpSourceError::QueueNotFound { queue, vhost }) => {
                assert_eq!((queue.as_str(), vhost.as_str()), (q.as_str(), "/"));
            }
            other => panic!("{q}: expected QueueNotFound, got {other:?}"),
        }
    }
    // The channel the broker closed was reopened on the same connection.
    assert_eq!(source.connections_opened(), 1);

    // Once the queues exist, the same source reads them at their next recheck.
    declare(&amqp, &missing.each_ref().map(String::as_str), None).await;
    fixture.publish(&missing[1], 4).await.unwrap();
    let obs = poll(
        "the created queues to be read",
        Duration::from_secs(5),
        || async {
            source
                .observe()
                .await
                .ok()
                .filter(|o| o.ready == 1 + 2 + 3 + 4)
        },
    )
    .await;
    assert_eq!(obs.queues.len(), 5);
    assert!(source.missing_queues().is_empty());
    assert_eq!(source.connections_opened(), 1);
}

fn binding(source: Arc<AmqpQueueSource>, scaler: &MemoryScaler) -> Binding {
    let policy = PolicyConfig {
        stabilize_down: Duration::ZERO,
        ..PolicyConfig::default()
    };
    Binding::new(
        LoopSettings {
            name: "amqp-faults".into(),
            ..LoopSettings::default()
        },
        Box::new(source),
        Box::new(scaler.clone()),
        policy.build().unwrap(),
    )
    .unwrap()
}

/// A binding over `source` on `scaler` (from 0), ticked once: it reads `ready` messages and
/// scales out. Returns the binding and the desired count it set.
async fn scaled_out(
    source: &Arc<AmqpQueueSource>,
    scaler: &MemoryScaler,
    ready: u64,
) -> (Binding, u32) {
    let mut b = binding(Arc::clone(source), scaler);
    let record = b.tick().await;
    assert_eq!(
        record.observation.as_ref().map(|o| o.ready),
        Some(ready),
        "{record:?}"
    );
    let desired = scaler.capacity().await.unwrap().desired;
    assert!(desired > 0, "{ready} ready tasks scale out: {record:?}");
    (b, desired)
}

/// Three ticks while the broker is unreachable: each records a transient fault (unavailable or
/// timed out), holds, and leaves the desired count at `desired`.
async fn holds_through_outage(b: &mut Binding, scaler: &MemoryScaler, desired: u32) {
    for _ in 0..3 {
        let record = b.tick().await;
        let e = record
            .observation_error
            .as_ref()
            .unwrap_or_else(|| panic!("the broker is unreachable: {record:?}"));
        assert!(e.transient, "{e:?}");
        assert!(
            matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Timeout),
            "{e:?}"
        );
        assert!(
            matches!(
                record.outcome,
                Outcome::Held { .. } | Outcome::Unchanged { .. }
            ),
            "{:?}",
            record.outcome
        );
        assert_eq!(
            scaler.capacity().await.unwrap().desired,
            desired,
            "a failed observation never changes capacity: {record:?}"
        );
    }
}

/// RabbitMQ closes the source's connection (`DELETE /api/connections/{name}` on the management
/// API: the same `CONNECTION_FORCED` close a node sends its clients when it shuts down). This is
/// used instead of restarting the shared broker, which would break every other test running
/// against it; the outage half of a restart is `the_loop_holds_while_the_broker_is_unreachable`.
#[tokio::test]
async fn reconnects_after_the_broker_closes_the_connection() {
    let Some((amqp, mgmt_url)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let queue = unique("forced");
    let name = unique("conn");
    let _cleanup = QueueCleanup::new(&amqp, &[&queue]);
    let fixture = AmqpFixture::new(&amqp, &[&queue], None).await;
    fixture.publish(&queue, 4).await.unwrap();
    let source = Arc::new(
        AmqpQueueSource::new(
            AmqpSourceConfig::builder(amqp.as_str())
                .queue(queue.as_str())
                .connection_name(name.as_str())
                .no_management()
                .build()
                .unwrap(),
        )
        .unwrap(),
    );
    let scaler = MemoryScaler::new(1);
    let mut b = binding(Arc::clone(&source), &scaler);
    let record = b.tick().await;
    assert_eq!(
        record.observation.as_ref().map(|o| o.ready),
        Some(4),
        "{record:?}"
    );
    poll(
        "the heartbeat consumer",
        Duration::from_secs(10),
        || async { source.is_consuming_heartbeats().then_some(()) },
    )
    .await;
    // One connection for the declares and the worker events.
    mgmt.wait_connections_named(&name, 1).await;

    let closed = mgmt.close_connections_named(&name);
    assert_eq!(closed, 1);
    // The next ticks either fail (transient; the loop holds) or already read again after
    // reconnecting; the scaler is never scaled in from a failure.
    let desired_before = scaler.capacity().await.unwrap().desired;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let obs = loop {
        let record = b.tick().await;
        match (&record.observation_error, record.observation) {
            (None, Some(obs)) => break obs,
            (Some(e), _) => {
                assert!(e.transient, "{e:?}");
                assert!(
                    matches!(
                        record.outcome,
                        Outcome::Held { .. } | Outcome::Unchanged { .. }
                    ),
                    "{:?}",
                    record.outcome
                );
                assert!(scaler.capacity().await.unwrap().desired >= desired_before);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no observation within 15 s of the forced close"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(obs.ready, 4);
    assert_eq!(source.connections_opened(), 2);
    poll(
        "the heartbeat consumer back",
        Duration::from_secs(15),
        || async { source.is_consuming_heartbeats().then_some(()) },
    )
    .await;
    mgmt.wait_connections_named(&name, 1).await;
}

/// The broker goes away (every connection dropped, nothing listening: what clients see during a
/// restart) and comes back on the same address.
#[tokio::test]
async fn the_loop_holds_while_the_broker_is_unreachable_then_recovers() {
    let Some(amqp) = amqp_url() else { return };
    let queue = unique("outage");
    let _cleanup = QueueCleanup::new(&amqp, &[&queue]);
    let fixture = AmqpFixture::new(&amqp, &[&queue], None).await;
    fixture.publish(&queue, 6).await.unwrap();
    let mut proxy = Proxy::start(&host_port(&amqp)).await;
    let source = Arc::new(
        AmqpQueueSource::new(
            AmqpSourceConfig::builder(via(&amqp, proxy.port))
                .queue(queue.as_str())
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(2))
                .no_management()
                .build()
                .unwrap(),
        )
        .unwrap(),
    );
    let scaler = MemoryScaler::new(0);
    let (mut b, desired) = scaled_out(&source, &scaler, 6).await;

    proxy.cut();
    holds_through_outage(&mut b, &scaler, desired).await;

    proxy.restore().await;
    let obs = poll(
        "an observation after the broker is back",
        Duration::from_secs(10),
        || async { source.observe().await.ok() },
    )
    .await;
    assert_eq!(obs.ready, 6);
    assert!(source.connections_opened() >= 2);
    let record = b.tick().await;
    assert!(record.observation_error.is_none(), "{record:?}");
    poll(
        "the heartbeat consumer back",
        Duration::from_secs(15),
        || async { source.is_consuming_heartbeats().then_some(()) },
    )
    .await;
}

/// A real RabbitMQ restart, on a throwaway node (restarting the shared broker would break every
/// other test running against it): the node is stopped with `rabbitmqctl stop` (its clients get
/// `CONNECTION_FORCED`, then nothing listens) and started again on the same ports with the same
/// data. The same source, in the same process, reconnects by itself, and the persistent
/// messages of the durable queues are counted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restarted_mid_run_the_loop_holds_then_recovers() {
    let Some(mut broker) = scratch::ScratchBroker::start(None).await else {
        return;
    };
    let url = broker.amqp_url();
    let (celery, emails) = ("celery", "emails");
    {
        // Durable queues (as Celery declares them) and persistent messages (delivery mode 2),
        // confirmed by the broker.
        let fixture = AmqpFixture::new(&url, &[celery, emails], None).await;
        fixture.publish(celery, 6).await.unwrap();
        fixture.publish(emails, 3).await.unwrap();
    }
    let source = Arc::new(
        AmqpQueueSource::new(
            AmqpSourceConfig::builder(url.as_str())
                .queues([celery, emails])
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5))
                .no_management()
                .build()
                .unwrap(),
        )
        .unwrap(),
    );
    let scaler = MemoryScaler::new(0);
    let (mut b, desired) = scaled_out(&source, &scaler, 9).await;
    poll(
        "the heartbeat consumer",
        Duration::from_secs(15),
        || async { source.is_consuming_heartbeats().then_some(()) },
    )
    .await;

    broker.stop().await;
    holds_through_outage(&mut b, &scaler, desired).await;
    assert!(!source.is_consuming_heartbeats());

    let down_for = broker.start_again().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let obs = loop {
        let record = b.tick().await;
        match (record.observation_error, record.observation) {
            (None, Some(obs)) => break obs,
            (Some(e), _) => assert!(e.transient, "{e:?}"),
            other => panic!("{other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no observation within 20 s of the node's restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(obs.ready, 9, "persistent messages survive: {obs:?}");
    assert_eq!(
        obs.queues,
        [(celery.to_string(), 6), (emails.to_string(), 3)]
    );
    assert_eq!(scaler.capacity().await.unwrap().desired, desired);
    assert!(
        source.connections_opened() >= 2,
        "reconnected: {}",
        source.connections_opened()
    );
    poll(
        "the heartbeat consumer back",
        Duration::from_secs(20),
        || async { source.is_consuming_heartbeats().then_some(()) },
    )
    .await;
    eprintln!(
        "the node was started again in {down_for:?}; starts: {:?}",
        broker.starts
    );
}

/// With both readers configured, each one's failure leaves the other's figures.
#[tokio::test]
async fn management_and_amqp_fall_back_on_each_other() {
    let Some((amqp, mgmt_url)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let queue = unique("fallback");
    let _cleanup = QueueCleanup::new(&amqp, &[&queue]);
    let fixture = AmqpFixture::new(&amqp, &[&queue], Some(mgmt)).await;
    fixture.publish(&queue, 3).await.unwrap();
    fixture.take(&queue, 1).await.unwrap();

    // The management API is unreachable: AMQP figures, in flight unknown.
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(amqp.as_str())
            .queue(queue.as_str())
            .heartbeats(false)
            .management(
                ManagementConfig::new("http://guest:guest@127.0.0.1:1")
                    .with_timeout(Duration::from_millis(500)),
            )
            .build()
            .unwrap(),
    )
    .unwrap();
    let obs = source.observe().await.unwrap();
    assert_eq!((obs.ready, obs.in_flight), (2, None));

    // AMQP is unreachable, the management API answers: its (lagging) figures.
    let mut proxy = Proxy::start(&host_port(&amqp)).await;
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(via(&amqp, proxy.port))
            .queue(queue.as_str())
            .heartbeats(false)
            .connect_timeout(Duration::from_millis(500))
            .management(ManagementConfig::new(mgmt_url.as_str()))
            .build()
            .unwrap(),
    )
    .unwrap();
    let obs = source.observe().await.unwrap();
    assert_eq!((obs.ready, obs.in_flight), (2, Some(1)));
    proxy.cut();
    let obs = source.observe().await.unwrap();
    assert_eq!(
        (obs.ready, obs.in_flight),
        (2, Some(1)),
        "from the management API"
    );
    assert_eq!(obs.consumers, Some(0));
}

#[tokio::test]
async fn a_wrong_password_is_a_typed_error_that_never_shows_it() {
    let Some((amqp, mgmt_url)) = amqp_and_mgmt() else {
        return;
    };
    let (captured, _guard) = Captured::install();

    let secret = "Wr0ng-pa55word-x9";
    // The test URL with its password replaced by a wrong one.
    let mut bad = url::Url::parse(&amqp).unwrap();
    bad.set_password(Some(secret)).unwrap();
    let bad = bad.to_string();
    let mut bad_mgmt = url::Url::parse(&mgmt_url).unwrap();
    bad_mgmt.set_password(Some(secret)).unwrap();
    let config = AmqpSourceConfig::builder(bad.as_str())
        .queue("celery")
        .management(ManagementConfig::new(bad_mgmt.as_str()))
        .build()
        .unwrap();
    let source = AmqpQueueSource::new(config.clone()).unwrap();
    let e = source.observe().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(!e.is_transient());
    // The typed error underneath.
    let typed = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<AmqpSourceError>())
        .expect("the crate's error is the source");
    assert!(
        matches!(typed, AmqpSourceError::LoginRefused { .. }),
        "{typed:?}"
    );

    // Let the heartbeat task try (and fail) too, so its logs are in the capture.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut shown = vec![
        e.to_string(),
        format!("{e:?}"),
        format!("{source:?}"),
        format!("{config:?}"),
    ];
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = next {
        shown.push(err.to_string());
        next = err.source();
    }
    // The management API's 401 on its own.
    let mgmt_only =
        celery_scale_amqp::ManagementClient::new(&ManagementConfig::new(bad_mgmt.as_str()))
            .unwrap();
    let me = mgmt_only.queues("/").await.unwrap_err();
    assert!(
        matches!(me, AmqpSourceError::ManagementStatus { status: 401, .. }),
        "{me:?}"
    );
    shown.push(format!("{me} {me:?}"));
    drop(source);
    let logs = captured.text();
    assert!(
        logs.contains("refused the login") || logs.contains("ACCESS_REFUSED"),
        "the failure is logged: {logs}"
    );
    shown.push(logs);
    for s in &shown {
        assert!(!s.contains(secret), "the password leaked: {s}");
    }
}
