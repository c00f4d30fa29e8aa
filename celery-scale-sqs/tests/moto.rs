//! The source on moto's SQS: core's conformance checks, discovery by prefix, delayed messages,
//! a missing queue and an unreachable endpoint.

mod common;

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use celery_scale_core::conformance::{self, QueueFixture};
use celery_scale_core::{BoxError, ErrorKind, QueueSource};
use celery_scale_sqs::{DiscoveryConfig, SqsError, SqsQueueSource, SqsSourceConfig};
use common::{Cleanup, broker_url, client, create, moto, source, unique};
use tokio::sync::Mutex;

/// Drives one moto queue as Celery would: send, receive without deleting (a worker holding
/// the message), delete.
struct Fixture {
    client: Client,
    url: String,
    received: Mutex<Vec<String>>,
}

#[async_trait]
impl QueueFixture for Fixture {
    /// Deletes the held messages, then receives and deletes the rest (SQS's PurgeQueue may be
    /// called only once a minute per queue).
    async fn purge(&self, queue: &str) -> Result<(), BoxError> {
        self.ack_all(queue).await?;
        loop {
            let out = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .visibility_timeout(300)
                .send()
                .await?;
            if out.messages().is_empty() {
                return Ok(());
            }
            for m in out.messages() {
                self.client
                    .delete_message()
                    .queue_url(&self.url)
                    .receipt_handle(m.receipt_handle().ok_or("no receipt handle")?)
                    .send()
                    .await?;
            }
        }
    }
    async fn publish(&self, _queue: &str, n: u64) -> Result<(), BoxError> {
        for i in 0..n {
            self.client
                .send_message()
                .queue_url(&self.url)
                .message_body(format!("m{i}"))
                .send()
                .await?;
        }
        Ok(())
    }
    async fn take(&self, _queue: &str, n: u64) -> Result<(), BoxError> {
        let mut taken = self.received.lock().await;
        let want = usize::try_from(n)?;
        let mut got = 0;
        while got < want {
            let out = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(i32::try_from(want - got)?)
                .visibility_timeout(300)
                .send()
                .await?;
            for m in out.messages() {
                taken.push(m.receipt_handle().ok_or("no receipt handle")?.to_owned());
                got += 1;
            }
            if out.messages().is_empty() {
                return Err("the queue is empty".into());
            }
        }
        Ok(())
    }
    async fn ack_all(&self, _queue: &str) -> Result<(), BoxError> {
        for handle in self.received.lock().await.drain(..) {
            self.client
                .delete_message()
                .queue_url(&self.url)
                .receipt_handle(handle)
                .send()
                .await?;
        }
        Ok(())
    }
    fn reports_in_flight(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn conforms_on_moto() {
    let Some(moto) = moto() else { return };
    let prefix = format!("{}-", unique("sqsconf"));
    let _cleanup = Cleanup {
        moto: moto.clone(),
        prefix: prefix.clone(),
    };
    let sdk = client(&moto);
    // A Celery queue name with a dot: kombu's table makes it `{prefix}work-high`.
    let url = create(&sdk, &format!("{prefix}work-high")).await;
    let config = SqsSourceConfig::builder()
        .url(broker_url(&moto))
        .queue_name_prefix(&prefix)
        .queue("work.high")
        .build()
        .unwrap();
    let source = source(config).await;
    let fixture = Fixture {
        client: sdk,
        url,
        received: Mutex::new(Vec::new()),
    };
    conformance::queue_source(&source, &fixture, "work.high").await;
    let calls = source.calls();
    assert_eq!(
        calls.get_queue_url, 1,
        "the URL is resolved once: {calls:?}"
    );
    assert!(calls.get_queue_attributes >= 5, "{calls:?}");
}

#[tokio::test]
async fn delayed_messages_are_reported_apart_and_not_ready() {
    let Some(moto) = moto() else { return };
    let prefix = format!("{}-", unique("sqsdelay"));
    let _cleanup = Cleanup {
        moto: moto.clone(),
        prefix: prefix.clone(),
    };
    let sdk = client(&moto);
    let url = create(&sdk, &format!("{prefix}celery")).await;
    for delay in [0, 120, 120] {
        sdk.send_message()
            .queue_url(&url)
            .message_body("x")
            .delay_seconds(delay)
            .send()
            .await
            .unwrap();
    }
    let source = source(
        SqsSourceConfig::builder()
            .url(broker_url(&moto))
            .queue_name_prefix(&prefix)
            .queue("celery")
            .build()
            .unwrap(),
    )
    .await;
    let reading = source.read().await.unwrap();
    assert_eq!(reading.queues.len(), 1);
    let q = &reading.queues[0];
    assert_eq!((q.visible, q.not_visible, q.delayed), (1, 0, 2), "{q:?}");
    assert_eq!(q.sqs_name, format!("{prefix}celery"));
    let obs = source.observe().await.unwrap();
    assert_eq!(obs.ready, 1, "delayed messages are not ready");
    assert_eq!(obs.in_flight, Some(0));
    assert_eq!(
        obs.executing, None,
        "SQS cannot see executing tasks: unknown, not 0"
    );
}

#[tokio::test]
async fn discovery_lists_by_prefix_and_leaves_celerys_own_queues_out() {
    let Some(moto) = moto() else { return };
    let prefix = format!("{}-", unique("sqsdisc"));
    let _cleanup = Cleanup {
        moto: moto.clone(),
        prefix: prefix.clone(),
    };
    let sdk = client(&moto);
    for name in [
        "celery",
        "emails-high",
        "orders.fifo",
        "w1-celery-pidbox",
        "abc-reply-celery-pidbox",
        "celeryev-1234",
        "tmp-1",
    ] {
        create(&sdk, &format!("{prefix}{name}")).await;
    }
    // Another prefix's queue is not listed.
    let other = format!("{}-", unique("sqsother"));
    let _other = Cleanup {
        moto: moto.clone(),
        prefix: other.clone(),
    };
    create(&sdk, &format!("{other}celery")).await;
    let url = create(&sdk, &format!("{prefix}late")).await;
    sdk.send_message()
        .queue_url(&url)
        .message_body("x")
        .send()
        .await
        .unwrap();

    let config = SqsSourceConfig::builder()
        .url(broker_url(&moto))
        .queue_name_prefix(&prefix)
        .queue("celery")
        .discovery(DiscoveryConfig {
            refresh: Duration::from_secs(60),
            exclude: vec![format!("{prefix}tmp-*")],
        })
        .build()
        .unwrap();
    let source = source(config).await;
    let obs = source.observe().await.unwrap();
    let mut names: Vec<&str> = obs.queues.iter().map(|q| q.queue.as_str()).collect();
    assert_eq!(names[0], "celery", "configured queues come first");
    names.sort_unstable();
    assert_eq!(names, ["celery", "emails-high", "late", "orders.fifo"]);
    assert_eq!(obs.ready, 1);
    let calls = source.calls();
    assert_eq!(calls.list_queues, 1, "{calls:?}");
    // Within the refresh the list is reused.
    source.observe().await.unwrap();
    assert_eq!(source.calls().list_queues, 1);
    source.refresh();
    source.observe().await.unwrap();
    assert_eq!(source.calls().list_queues, 2);
}

#[tokio::test]
async fn a_missing_queue_is_a_permanent_error_naming_it_and_is_resolved_again() {
    let Some(moto) = moto() else { return };
    let prefix = format!("{}-", unique("sqsmiss"));
    let _cleanup = Cleanup {
        moto: moto.clone(),
        prefix: prefix.clone(),
    };
    let source = source(
        SqsSourceConfig::builder()
            .url(broker_url(&moto))
            .queue_name_prefix(&prefix)
            .queue("emails.low")
            .build()
            .unwrap(),
    )
    .await;
    let e = source.read().await.unwrap_err();
    assert!(
        matches!(&e, SqsError::QueueNotFound { queue, sqs_name, .. }
            if queue == "emails.low" && *sqs_name == format!("{prefix}emails-low")),
        "{e:?}"
    );
    let core = celery_scale_core::Error::from(e);
    assert_eq!(core.kind(), ErrorKind::NotFound);
    assert!(!core.is_transient());
    assert!(core.to_string().contains("emails.low"), "{core}");

    // Created later (Celery's first publish): the next observation finds it.
    let sdk = client(&moto);
    let url = create(&sdk, &format!("{prefix}emails-low")).await;
    let obs = source.observe().await.unwrap();
    assert_eq!(obs.ready, 0);
    // Deleted under the source: the cached URL answers QueueDoesNotExist, named.
    sdk.delete_queue().queue_url(&url).send().await.unwrap();
    let e = source.observe().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("emails.low"), "{e}");
    let before = source.calls().get_queue_url;
    let _ = source.observe().await;
    assert_eq!(
        source.calls().get_queue_url,
        before + 1,
        "a queue found missing is resolved again"
    );
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_typed_transient_error() {
    let Some(_moto) = moto() else { return };
    // Nothing listens on this port.
    let port = celery_scale_testing::free_port();
    let config = SqsSourceConfig::builder()
        .url(format!("sqs://testing:testing@127.0.0.1:{port}"))
        .queue("celery")
        .build()
        .unwrap();
    let source = SqsQueueSource::from_settings(
        &common::settings()
            .max_attempts(1)
            .call_timeout(Duration::from_secs(2)),
        config,
    )
    .await
    .unwrap();
    conformance::dead_queue_source(&source).await;
    let e = source.observe().await.unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    assert!(
        matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
        "{e:?}"
    );
    assert!(!e.to_string().contains("testing@"), "{e}");
}
