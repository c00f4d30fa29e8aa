//! Real Celery (kombu's SQS transport, boto3 + pycurl) on moto's SQS: the source reads what
//! Celery puts there, with kombu's own names and options.

mod common;

use std::time::Duration;

use celery_scale_core::QueueSource;
use celery_scale_sqs::{PredefinedQueue, SqsReading, SqsSourceConfig};
use celery_scale_testing::{WorkerCommand, poll, publish_script, service};
use common::{Cleanup, broker_url, client, create, moto, source, unique};
use serde_json::{Value, json};

struct Env {
    moto: String,
    python: String,
    broker: String,
    prefix: String,
    _cleanup: Cleanup,
}

fn env(tag: &str) -> Option<Env> {
    let moto = moto()?;
    let python = service("CELERY_SCALE_PYTHON")?;
    let prefix = format!("{}-", unique(tag));
    Some(Env {
        broker: broker_url(&moto),
        _cleanup: Cleanup {
            moto: moto.clone(),
            prefix: prefix.clone(),
        },
        moto,
        python,
        prefix,
    })
}

impl Env {
    /// Celery's `broker_transport_options` for this test: its prefix, moto's region, quick polls.
    fn options(&self) -> Value {
        json!({
            "queue_name_prefix": self.prefix,
            "region": "us-east-1",
            "wait_time_seconds": 1,
            "polling_interval": 0.2,
        })
    }

    /// Publishes with Celery's `apply_async`; returns kombu's own count of the queue.
    fn publish(&self, options: &Value, queue: &str, count: u32, extra: &[&str]) -> u64 {
        let count_s = count.to_string();
        let mut args = vec!["--queue", queue, "--count", &count_s];
        args.extend_from_slice(extra);
        let out = publish_script(
            "publish.py",
            &self.python,
            &self.broker,
            options,
            &json!({}),
            &args,
        );
        assert_eq!(out["published"], count);
        out["kombu_size"][queue].as_u64().expect("kombu's size")
    }

    fn config(&self) -> celery_scale_sqs::SqsSourceConfigBuilder {
        SqsSourceConfig::builder()
            .url(self.broker.clone())
            .queue_name_prefix(&self.prefix)
            .region("us-east-1")
    }
}

fn counts(r: &SqsReading, queue: &str) -> (u64, u64, u64) {
    let q = r
        .queues
        .iter()
        .find(|q| q.queue == queue)
        .unwrap_or_else(|| panic!("no {queue} in {r:?}"));
    (q.visible, q.not_visible, q.delayed)
}

#[tokio::test]
async fn default_named_and_fifo_queues_read_as_kombu_names_and_counts_them() {
    let Some(e) = env("sqsceln") else { return };
    let opts = e.options();
    let sizes = [
        e.publish(&opts, "celery", 3, &[]),
        e.publish(&opts, "emails.high", 2, &[]),
        e.publish(&opts, "orders.fifo", 4, &[]),
    ];
    assert_eq!(sizes, [3, 2, 4], "kombu's own counts");
    let source = source(
        e.config()
            .queues(["celery", "emails.high", "orders.fifo"])
            .build()
            .unwrap(),
    )
    .await;
    let reading = source.read().await.unwrap();
    let names: Vec<&str> = reading.queues.iter().map(|q| q.sqs_name.as_str()).collect();
    let p = &e.prefix;
    assert_eq!(
        names,
        [
            format!("{p}celery"),
            format!("{p}emails-high"),
            format!("{p}orders.fifo")
        ],
        "kombu's names"
    );
    assert_eq!(counts(&reading, "celery"), (3, 0, 0));
    assert_eq!(counts(&reading, "emails.high"), (2, 0, 0));
    assert_eq!(counts(&reading, "orders.fifo"), (4, 0, 0));
    let obs = source.observe().await.unwrap();
    assert_eq!(obs.ready, 9);
    assert_eq!(obs.in_flight, Some(0));
    assert_eq!(obs.executing, None);
}

#[tokio::test]
async fn predefined_queues_are_read_at_their_urls_with_their_credentials() {
    let Some(e) = env("sqscelp") else { return };
    let sdk = client(&e.moto);
    let name = format!("{}jobs", e.prefix);
    let url = create(&sdk, &name).await;
    let mut opts = e.options();
    opts["predefined_queues"] = json!({
        name.clone(): { "url": url, "access_key_id": "testing", "secret_access_key": "testing" }
    });
    assert_eq!(e.publish(&opts, "jobs", 5, &[]), 5);

    // Pasted as Celery has it (TOML here), no queues: every predefined queue is watched.
    let mut q = PredefinedQueue::new(url.clone());
    q.access_key_id = Some("testing".into());
    q.secret_access_key = Some(celery_scale_sqs::Secret::new("testing"));
    let config = e.config().predefined_queue(&name, q).build().unwrap();
    let source = source(config).await;
    let reading = source.read().await.unwrap();
    assert_eq!(counts(&reading, "jobs"), (5, 0, 0));
    assert_eq!(reading.queues[0].url, url);
    assert_eq!(
        source.calls().get_queue_url,
        0,
        "predefined URLs need no GetQueueUrl"
    );
    // A queue kombu would not use under predefined_queues is refused at construction.
    let err = e
        .config()
        .predefined_queue(&name, PredefinedQueue::new(url))
        .queue("other")
        .build()
        .unwrap_err();
    assert_eq!(err.field, "queues[0]");
}

#[tokio::test]
async fn a_live_worker_holds_prefetched_and_countdown_tasks_in_flight() {
    let Some(e) = env("sqscelw") else { return };
    let opts = e.options();
    // Countdown tasks are sent at once (not SQS-delayed): ready until a worker takes them.
    assert_eq!(e.publish(&opts, "celery", 2, &["--countdown", "120"]), 2);
    let source = source(e.config().queue("celery").build().unwrap()).await;
    let reading = source.read().await.unwrap();
    assert_eq!(
        counts(&reading, "celery"),
        (2, 0, 0),
        "countdown tasks wait ready"
    );

    // 6 tasks of 30 s; one worker process, prefetch 4, acks_late: 1 executing + 3 prefetched
    // stay not visible, alongside the 2 countdown tasks the worker holds.
    assert_eq!(e.publish(&opts, "celery", 6, &["--seconds", "30"]), 8);
    let worker = WorkerCommand::new(&e.python, &e.broker)
        .queues("celery")
        .concurrency(1)
        .prefetch_multiplier(4)
        .transport_options(&opts)
        .config(&json!({"task_acks_late": true}))
        .spawn();
    let held = poll(
        "the worker to hold its messages",
        Duration::from_secs(60),
        || {
            let source = &source;
            async move {
                let r = source.read().await.ok()?;
                let c = counts(&r, "celery");
                (c.1 >= 6).then_some(c)
            }
        },
    )
    .await;
    // Celery raises the prefetch limit by one for each ETA task it holds, so the worker holds
    // 4 (1 executing + 3 prefetched) + the 2 countdown tasks; the last 2 stay visible. Nothing
    // is delayed in SQS's sense.
    eprintln!("held by the worker: (visible, not visible, delayed) = {held:?}");
    assert_eq!(held, (2, 6, 0), "{}", worker.log_tail());
    let obs = source.observe().await.unwrap();
    assert_eq!(obs.in_flight, Some(held.1));
    assert!(
        obs.workers_are_unknown(),
        "held messages and no worker events: the worker figures are unknown: {obs:?}"
    );
    assert_eq!(obs.executing, None);
    assert_eq!(obs.live_workers, None);
    drop(worker);
}
