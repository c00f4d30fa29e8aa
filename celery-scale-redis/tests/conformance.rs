//! The core conformance suite and the layout details, against the shared Redis with a fixture
//! that writes exactly what kombu writes.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celery_scale_core::conformance::{self, QueueFixture as _};
use celery_scale_core::{ErrorKind, QueueSource};
use celery_scale_redis::{
    DiscoveryConfig, InFlightMode, RedisQueueSource, RedisSourceConfig, RedisSourceError,
};
use common::*;
use redis::AsyncCommands as _;

async fn client(url: &str) -> redis::Client {
    redis::Client::open(url).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_in_every_in_flight_mode() {
    let Some(url) = redis_url() else { return };
    for mode in [
        InFlightMode::PerQueue,
        InFlightMode::Off,
        InFlightMode::Global,
    ] {
        let prefix = unique("conf");
        let _cleanup = Cleanup::prefix(&url, &prefix);
        let fixture = KombuFixture::connect(&client(&url).await, &prefix).await;
        let source = RedisQueueSource::new(
            RedisSourceConfig::builder(url.as_str())
                .queues(["celery", "other"])
                .global_keyprefix(&prefix)
                .in_flight(mode)
                .heartbeats(false)
                .build()
                .unwrap(),
        )
        .unwrap();
        // The suite reads the per-queue breakdown: per_queue reports it there; global reports
        // in flight only for the whole transport, and off not at all.
        struct Fixture<'a>(&'a KombuFixture, bool);
        #[async_trait::async_trait]
        impl conformance::QueueFixture for Fixture<'_> {
            async fn purge(&self, q: &str) -> Result<(), celery_scale_core::BoxError> {
                self.0.purge(q).await
            }
            async fn publish(&self, q: &str, n: u64) -> Result<(), celery_scale_core::BoxError> {
                self.0.publish(q, n).await
            }
            async fn take(&self, q: &str, n: u64) -> Result<(), celery_scale_core::BoxError> {
                self.0.take(q, n).await
            }
            async fn ack_all(&self, q: &str) -> Result<(), celery_scale_core::BoxError> {
                self.0.ack_all(q).await
            }
            fn reports_in_flight(&self) -> bool {
                self.1
            }
        }
        let per_queue = mode == InFlightMode::PerQueue;
        conformance::queue_source(&source, &Fixture(&fixture, per_queue), "celery").await;

        // The transport-wide figure: global counts HLEN unacked, off says nothing.
        fixture.publish("celery", 3).await.unwrap();
        fixture.publish("other", 2).await.unwrap();
        fixture.take("celery", 1).await.unwrap();
        fixture.take("other", 2).await.unwrap();
        let obs = source.observe().await.unwrap();
        assert_eq!(obs.ready, 2, "{mode:?}");
        let expected = match mode {
            InFlightMode::Off => None,
            _ => Some(3),
        };
        assert_eq!(obs.in_flight, expected, "{mode:?}");
        if per_queue {
            let by_queue: Vec<_> = obs
                .queues
                .iter()
                .map(|q| (q.queue.as_str(), q.in_flight))
                .collect();
            assert_eq!(by_queue, [("celery", Some(1)), ("other", Some(2))]);
        }
        assert_eq!(obs.executing, None, "heartbeats are off");
        assert_eq!(obs.live_workers, None);
    }
}

#[tokio::test]
async fn dead_source_gives_typed_transient_error() {
    let port = free_port();
    let source = RedisQueueSource::new(
        RedisSourceConfig::builder(format!("redis://:hunter2@127.0.0.1:{port}/0"))
            .queue("celery")
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    conformance::dead_queue_source(&source).await;
    let e = source.observe_redis().await.unwrap_err();
    assert!(
        matches!(e, RedisSourceError::ConnectionRefused { .. }),
        "{e:?}"
    );
    let core: celery_scale_core::Error = e.into();
    assert_eq!(core.kind(), ErrorKind::Unavailable);
    assert!(core.is_transient());
    for text in [
        format!("{core}"),
        format!("{core:?}"),
        format!("{source:?}"),
    ] {
        assert!(!text.contains("hunter2"), "password leaked: {text}");
    }
}

#[tokio::test]
async fn bad_url_is_rejected_at_construction() {
    // The URL is read as kombu reads it at validation: a scheme that is no Redis transport
    // of Celery's is a configuration error naming the field.
    let e = RedisSourceConfig::builder("http://:hunter2@host/0")
        .queue("celery")
        .build()
        .unwrap_err();
    assert_eq!(e.field, "url");
    assert!(!format!("{e} {e:?}").contains("hunter2"));
    let mut config = RedisSourceConfig::new("http://:hunter2@host/0");
    config.queues.push("celery".into());
    let e = RedisQueueSource::new(config).unwrap_err();
    assert!(
        matches!(&e, RedisSourceError::Config(c) if c.field == "url"),
        "{e:?}"
    );
    assert!(!format!("{e} {e:?}").contains("hunter2"));
    // A config that skipped the builder is validated again.
    match RedisQueueSource::new(RedisSourceConfig::new("redis://h")).unwrap_err() {
        RedisSourceError::Config(c) => assert_eq!(c.field, "queues"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[tokio::test]
async fn priorities_are_summed_over_every_step_key() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("prio");
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let fixture = KombuFixture::connect(&client(&url).await, &prefix).await;
    for p in 0..=9 {
        fixture.publish_with("celery", p, None).await.unwrap();
    }
    let source = RedisQueueSource::new(
        RedisSourceConfig::builder(url.as_str())
            .queue("celery")
            .global_keyprefix(&prefix)
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    let obs = source.observe().await.unwrap();
    assert_eq!(obs.ready, 10, "0-2 bare, 3-5, 6-8 and 9 in their step keys");
    let mut conn = client(&url)
        .await
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let bare: u64 = conn.llen(format!("{prefix}celery")).await.unwrap();
    assert_eq!(
        bare, 3,
        "LLEN of the bare key alone misses prioritized tasks"
    );
}

#[tokio::test]
async fn wrong_key_type_names_the_key() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("wrongtype");
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let mut conn = client(&url)
        .await
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let bad = format!("{prefix}emails\x06\x163");
    let _: () = conn.set(&bad, "not a list").await.unwrap();
    let source = RedisQueueSource::new(
        RedisSourceConfig::builder(url.as_str())
            .queues(["celery", "emails"])
            .global_keyprefix(&prefix)
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    match source.observe_redis().await.unwrap_err() {
        RedisSourceError::WrongType { key, expected, .. } => {
            assert_eq!(key, bad);
            assert_eq!(expected, "list");
        }
        other => panic!("expected WrongType, got {other:?}"),
    }
    let core = source.observe().await.unwrap_err();
    assert_eq!(core.kind(), ErrorKind::InvalidData);
    assert!(!core.is_transient());
    assert!(core.to_string().contains("emails\\u{6}\\u{16}3"), "{core}");

    // The unacked hash too.
    let _: () = conn.del(&bad).await.unwrap();
    let _: () = conn.set(format!("{prefix}unacked"), "x").await.unwrap();
    match source.observe_redis().await.unwrap_err() {
        RedisSourceError::WrongType { key, expected, .. } => {
            assert_eq!(key, format!("{prefix}unacked"));
            assert_eq!(expected, "hash");
        }
        other => panic!("expected WrongType, got {other:?}"),
    }
}

#[tokio::test]
async fn oldest_age_from_publish_time_header_only() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("age");
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let fixture = KombuFixture::connect(&client(&url).await, &prefix).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // The oldest is at the tail (RPOP end): published first.
    fixture
        .publish_with("celery", 0, Some(now - 30.0))
        .await
        .unwrap();
    fixture
        .publish_with("celery", 0, Some(now - 1.0))
        .await
        .unwrap();
    fixture
        .publish_with("celery", 9, Some(now - 50.0))
        .await
        .unwrap();
    fixture.publish_with("plain", 0, None).await.unwrap();
    let config = RedisSourceConfig::builder(url.as_str())
        .queues(["celery", "plain"])
        .global_keyprefix(&prefix)
        .heartbeats(false);
    let source = RedisQueueSource::new(
        config
            .clone()
            .publish_time_field("published_at")
            .build()
            .unwrap(),
    )
    .unwrap();
    let obs = source.observe().await.unwrap();
    let age = obs.queues[0]
        .oldest_age
        .expect("celery has stamped messages");
    assert!(
        (Duration::from_secs(50)..Duration::from_secs(55)).contains(&age),
        "oldest over every priority key: {age:?}"
    );
    assert_eq!(
        obs.queues[1].oldest_age, None,
        "no stamp: no age, never invented"
    );
    assert_eq!(obs.oldest_age, Some(age));

    let unstamped = RedisQueueSource::new(config.clone().build().unwrap()).unwrap();
    assert_eq!(unstamped.observe().await.unwrap().oldest_age, None);
    let no_tail = RedisQueueSource::new(
        config
            .publish_time_field("published_at")
            .oldest_age(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    let obs = no_tail.observe().await.unwrap();
    assert_eq!((obs.ready, obs.oldest_age), (4, None));
}

#[tokio::test]
async fn per_queue_in_flight_resolves_routing_keys_through_bindings() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("route");
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let mut conn = client(&url)
        .await
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // A task routed by exchange "media" with routing key "media.video" to queue "video", one by
    // default routing to "celery", and one for a queue nobody watches.
    let _: () = conn
        .sadd(
            format!("{prefix}_kombu.binding.media"),
            "media.video\x06\x16\x06\x16video",
        )
        .await
        .unwrap();
    for (tag, ex, rk) in [
        ("t1", "media", "media.video"),
        ("t2", "", "celery"),
        ("t3", "", "elsewhere"),
        ("t4", "media", "media.video"),
    ] {
        let entry = serde_json::json!([{"body": "", "headers": {}}, ex, rk]).to_string();
        let _: () = conn
            .hset(format!("{prefix}unacked"), tag, entry)
            .await
            .unwrap();
    }
    let source = RedisQueueSource::new(
        RedisSourceConfig::builder(url.as_str())
            .queues(["celery", "video"])
            .global_keyprefix(&prefix)
            .in_flight(InFlightMode::PerQueue)
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    let obs = source.observe().await.unwrap();
    let by_queue: Vec<_> = obs
        .queues
        .iter()
        .map(|q| (q.queue.as_str(), q.in_flight))
        .collect();
    assert_eq!(by_queue, [("celery", Some(1)), ("video", Some(2))]);
    assert_eq!(
        obs.in_flight,
        Some(3),
        "the unwatched queue's message is not ours"
    );
}

#[tokio::test]
async fn per_queue_in_flight_pages_through_a_large_unacked_hash() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("bigunacked");
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let mut conn = client(&url)
        .await
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut pipe = redis::pipe();
    for i in 0..2500 {
        let rk = if i % 5 == 0 { "a" } else { "b" };
        pipe.hset(
            format!("{prefix}unacked"),
            format!("tag{i}"),
            serde_json::json!([{}, "", rk]).to_string(),
        )
        .ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let source = RedisQueueSource::new(
        RedisSourceConfig::builder(url.as_str())
            .queues(["a", "b"])
            .global_keyprefix(&prefix)
            .in_flight(InFlightMode::PerQueue)
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    let obs = source.observe().await.unwrap();
    assert_eq!(obs.queues[0].in_flight, Some(500));
    assert_eq!(obs.queues[1].in_flight, Some(2000));
}

#[tokio::test]
async fn discovery_lists_bound_queues_and_skips_celery_internals() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("disc");
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let mut conn = client(&url)
        .await
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let sep = "\x06\x16";
    for (table, member) in [
        ("_kombu.binding.celery", format!("celery{sep}{sep}celery")),
        ("_kombu.binding.emails", format!("emails{sep}{sep}emails")),
        ("_kombu.binding.tmp-1", format!("tmp-1{sep}{sep}tmp-1")),
        (
            "_kombu.binding.celery.pidbox",
            format!("{sep}{sep}w1@host.celery.pidbox"),
        ),
        (
            "_kombu.binding.reply.celery.pidbox",
            format!("abc{sep}{sep}abc.reply.celery.pidbox"),
        ),
        (
            "_kombu.binding.celeryev",
            format!("worker.#{sep}{sep}celeryev.1234"),
        ),
        (
            "_kombu.binding_permanent.celery",
            format!("celery{sep}{sep}permanent-only"),
        ),
    ] {
        let _: () = conn.sadd(format!("{prefix}{table}"), member).await.unwrap();
    }
    let _: () = conn
        .zadd(format!("{prefix}_kombu.binding_deadlines"), "x", 1)
        .await
        .unwrap();
    let fixture = KombuFixture::connect(&client(&url).await, &prefix).await;
    fixture.publish_with("emails", 0, None).await.unwrap();
    fixture.publish_with("emails", 7, None).await.unwrap();
    let source = RedisQueueSource::new(
        RedisSourceConfig::builder(url.as_str())
            .global_keyprefix(&prefix)
            .discovery(DiscoveryConfig {
                refresh: Duration::from_millis(200),
                exclude: vec!["tmp-*".into()],
            })
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        source.discover_queues().await.unwrap(),
        ["celery", "emails", "tmp-1"]
    );
    let obs = source.observe().await.unwrap();
    assert_eq!(source.queues(), ["celery", "emails"]);
    assert_eq!(obs.ready, 2);
    // A queue bound later shows up after the refresh interval.
    let _: () = conn
        .sadd(
            format!("{prefix}_kombu.binding.late"),
            format!("late{sep}{sep}late"),
        )
        .await
        .unwrap();
    fixture.publish_with("late", 0, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let obs = source.observe().await.unwrap();
    assert_eq!(source.queues(), ["celery", "emails", "late"]);
    assert_eq!(obs.ready, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_subscriber_tracks_workers_and_filters_hostnames() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("beats");
    let url3 = with_db(&url, 3);
    let source = RedisQueueSource::new(
        RedisSourceConfig::builder(url3.as_str())
            .queue("celery")
            .global_keyprefix(&prefix)
            .worker_hostname("emails@*")
            .heartbeat_warmup(Duration::from_millis(300))
            .build()
            .unwrap(),
    )
    .unwrap();
    poll("the subscription", Duration::from_secs(5), || async {
        source.heartbeats_subscribed().then_some(())
    })
    .await;
    let obs = source.observe().await.unwrap();
    // Within the warm-up nothing is claimed; after it, no worker means zero, not unknown.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let obs2 = source.observe().await.unwrap();
    assert!(obs.live_workers.is_none() || obs.live_workers == Some(0));
    assert_eq!((obs2.live_workers, obs2.executing), (Some(0), Some(0)));

    let mut conn = client(&url)
        .await
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let channel = format!("{prefix}/3.celeryev/worker.heartbeat");
    let beat =
        |host: &str, active, processed| worker_event("worker-heartbeat", host, active, processed);
    let _: () = conn
        .publish(&channel, beat("emails@a", 2, 10))
        .await
        .unwrap();
    let _: () = conn
        .publish(&channel, beat("emails@b", 1, 3))
        .await
        .unwrap();
    let _: () = conn
        .publish(&channel, beat("celery@c", 4, 40))
        .await
        .unwrap();
    // Another database's channel is not ours.
    let _: () = conn
        .publish(
            format!("{prefix}/0.celeryev/worker.heartbeat"),
            beat("emails@z", 9, 9),
        )
        .await
        .unwrap();
    let obs = poll("two workers", Duration::from_secs(5), || async {
        let obs = source.observe().await.unwrap();
        (obs.live_workers == Some(2)).then_some(obs)
    })
    .await;
    assert_eq!(obs.executing, Some(3), "celery@c does not match emails@*");
    let _: () = conn
        .publish(
            format!("{prefix}/3.celeryev/worker.offline"),
            worker_event("worker-offline", "emails@a", 0, 10),
        )
        .await
        .unwrap();
    let obs = poll(
        "one worker after worker-offline",
        Duration::from_secs(5),
        || async {
            let obs = source.observe().await.unwrap();
            (obs.live_workers == Some(1)).then_some(obs)
        },
    )
    .await;
    assert_eq!(obs.executing, Some(1));
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_is_reported_and_close_stops_the_subscriber() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("warm");
    let source = RedisQueueSource::new(
        RedisSourceConfig::builder(with_db(&url, 3).as_str())
            .queue("celery")
            .global_keyprefix(&prefix)
            .heartbeat_warmup(Duration::from_millis(500))
            .build()
            .unwrap(),
    )
    .unwrap();
    assert!(
        !source.is_warmed_up(),
        "not before the subscription and its warm-up"
    );
    poll("the warm-up", Duration::from_secs(5), || async {
        source.is_warmed_up().then_some(())
    })
    .await;
    assert!(source.heartbeats_subscribed());
    // The server sees the subscriber, then sees it go.
    let conn = client(&url)
        .await
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let channel = format!("{prefix}/3.celeryev/worker.heartbeat");
    let subscribers = |mut conn: redis::aio::MultiplexedConnection, channel: String| async move {
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        n
    };
    assert_eq!(subscribers(conn.clone(), channel.clone()).await, 1);
    source.close().await;
    poll("the subscriber to stop", Duration::from_secs(5), || {
        let (conn, channel) = (conn.clone(), channel.clone());
        async move { (subscribers(conn, channel).await == 0).then_some(()) }
    })
    .await;
    // Without heartbeats there is nothing to warm up.
    let plain = RedisQueueSource::new(
        RedisSourceConfig::builder(with_db(&url, 3).as_str())
            .queue("celery")
            .heartbeats(false)
            .build()
            .unwrap(),
    )
    .unwrap();
    assert!(plain.is_warmed_up());
}
