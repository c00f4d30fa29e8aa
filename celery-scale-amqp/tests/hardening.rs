//! Hardening against what the broker sends and how it fails: extreme numbers from the broker,
//! watched queues that do not exist (yet), the first observation after the broker is back, and
//! secrets at trace level.

mod common;

use std::sync::Arc;
use std::time::Duration;

use celery_scale_amqp::{AmqpQueueSource, AmqpSourceConfig, ManagementConfig};
use celery_scale_core::QueueSource as _;
use common::*;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

/// Publishes one message per timestamp to `queue` (declared here), confirmed by the broker.
async fn publish_with_timestamps(amqp: &str, queue: &str, timestamps: &[u64]) {
    let conn = connect(amqp).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for &t in timestamps {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default()
                .with_timestamp(t)
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    conn.close(200, "".into()).await.ok();
}

/// A message whose AMQP `timestamp` is `u64::MAX` (and another at 2^63) at the head of a queue:
/// the management API reports it as `head_message_timestamp`, and the source reads the queue
/// with an unknown age instead of panicking (it used `Duration::from_secs_f64` on it).
#[tokio::test]
async fn a_head_message_timestamp_of_u64_max_is_an_unknown_age_not_a_panic() {
    let Some((amqp, mgmt_url)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let huge = unique("ts-max");
    let half = unique("ts-2p63");
    let _cleanup = QueueCleanup::new(&amqp, &[&huge, &half]);
    publish_with_timestamps(&amqp, &huge, &[u64::MAX]).await;
    publish_with_timestamps(&amqp, &half, &[1 << 63]).await;
    // The API's statistics lag by up to 5 s.
    for q in [&huge, &half] {
        let path = format!("/api/queues/%2F/{q}");
        let raw = poll(
            "the API to report the head message timestamp",
            Duration::from_secs(20),
            || async {
                let (_, raw) = mgmt.call("GET", &path, None);
                (raw["head_message_timestamp"].is_number() && raw["messages_ready"] == 1)
                    .then_some(raw)
            },
        )
        .await;
        eprintln!(
            "RabbitMQ reports head_message_timestamp = {} for {q}",
            raw["head_message_timestamp"]
        );
    }
    for per_queue in [true, false] {
        let mut names = vec![huge.clone(), half.clone()];
        if !per_queue {
            // Above 8 queues the source reads the vhost's list instead (absent ones are
            // missing queues).
            names.extend((0..8).map(|i| format!("{huge}-absent-{i}")));
        }
        let source = AmqpQueueSource::new(
            AmqpSourceConfig::builder(amqp.as_str())
                .queues(names)
                .heartbeats(false)
                .management(ManagementConfig::new(mgmt_url.as_str()))
                .build()
                .unwrap(),
        )
        .unwrap();
        let obs = source.observe().await.expect("no panic, no error");
        assert_eq!(obs.ready, 2, "{obs:?}");
        assert_eq!(obs.oldest_age, None, "no usable timestamp: {obs:?}");
        let stats = source.management_stats().unwrap();
        let of = |q: &str| stats.iter().find(|s| s.name == q).unwrap().clone();
        assert_eq!(of(&huge).head_message_timestamp, None);
        assert_eq!(of(&huge).ready, Some(1), "the other figures are kept");
        assert_eq!(
            of(&half).head_message_age(std::time::SystemTime::now()),
            None
        );
    }
}

/// Threads of this process, from `/proc/self/status`.
fn threads() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a Threads: line")
}

/// The channels RabbitMQ counts on the connection named `name` (the API lags by up to 5 s).
fn broker_channels(mgmt: &Mgmt, name: &str) -> Option<u64> {
    let (_, conns) = mgmt.call(
        "GET",
        "/api/connections?columns=name,client_properties,channels",
        None,
    );
    conns.as_array()?.iter().find_map(|c| {
        (c["client_properties"]["connection_name"].as_str() == Some(name))
            .then(|| c["channels"].as_u64())
            .flatten()
    })
}

/// `n` queue names that no one declares.
fn absent(n: usize) -> Vec<String> {
    let base = unique("absent");
    (0..n).map(|i| format!("{base}-{i}")).collect()
}

/// 50 watched queues that do not exist and one that does: every observation succeeds, reads
/// the missing ones as 0 ready, and after the first one opens no channel (the source used to
/// open one per missing queue per observation, and replace its connection, leaking its thread
/// and memory, every ~2,000 channels). Then the same with rechecks due every second: the
/// channels grow by the rechecks only, and a queue created meanwhile is counted.
#[tokio::test]
async fn fifty_missing_queues_cost_no_channel_per_observation_nor_threads() {
    let Some((amqp, mgmt_url)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let present = unique("present");
    let missing = absent(50);
    let mut all: Vec<&str> = missing.iter().map(String::as_str).collect();
    all.push(&present);
    let _cleanup = QueueCleanup::new(&amqp, &all);
    publish_with_timestamps(&amqp, &present, &[0, 0, 0]).await;
    let name = unique("missing-conn");
    let mut queues = vec![present.clone()];
    queues.extend(missing.iter().cloned());
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(amqp.as_str())
            .queues(queues.clone())
            .heartbeats(false)
            .connection_name(name.as_str())
            .missing_queue_recheck(Duration::from_secs(3600))
            .no_management()
            .build()
            .unwrap(),
    )
    .unwrap();
    let obs = source
        .observe()
        .await
        .expect("missing queues do not fail it");
    assert_eq!(obs.ready, 3);
    assert_eq!(obs.queues.len(), 51, "every queue is in the observation");
    assert_eq!(obs.consumers, Some(0));
    assert_eq!(source.missing_queues().len(), 50);
    // The first declare of each missing queue closed the channel once.
    let first = source.channels_opened();
    assert_eq!(first, 51, "one channel, reopened after each of the 50 404s");
    let threads_before = threads();
    for _ in 0..250 {
        let obs = source.observe().await.unwrap();
        assert_eq!(obs.ready, 3);
    }
    assert_eq!(
        source.channels_opened(),
        first,
        "no channel per observation for a missing queue"
    );
    assert_eq!(source.connections_opened(), 1);
    assert!(
        threads() <= threads_before,
        "{} > {threads_before}",
        threads()
    );
    poll(
        "the broker to count one channel on the source's connection",
        Duration::from_secs(20),
        || async { (broker_channels(&mgmt, &name) == Some(1)).then_some(()) },
    )
    .await;
    drop(source);

    // Rechecks every second: at most one channel per missing queue per second, and a queue
    // created in between is read at its next recheck.
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(amqp.as_str())
            .queues(queues)
            .heartbeats(false)
            .missing_queue_recheck(Duration::from_secs(1))
            .no_management()
            .build()
            .unwrap(),
    )
    .unwrap();
    source.observe().await.unwrap();
    let start = tokio::time::Instant::now();
    let first = source.channels_opened();
    publish_with_timestamps(&amqp, &missing[7], &[0, 0]).await;
    let obs = poll(
        "the created queue to be read",
        Duration::from_secs(5),
        || async { source.observe().await.ok().filter(|o| o.ready == 5) },
    )
    .await;
    assert!(
        obs.queues
            .iter()
            .any(|q| q.queue == missing[7] && q.ready == 2)
    );
    assert_eq!(source.missing_queues().len(), 49);
    for _ in 0..40 {
        source.observe().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rounds = start.elapsed().as_secs() + 1;
    let opened = source.channels_opened() - first;
    assert!(
        opened <= rounds * 50,
        "{opened} channels in {rounds} recheck rounds of 50 queues"
    );
    assert!(opened >= 49, "the missing queues were rechecked: {opened}");
}

/// With the management API, a missing queue that the API does not list is not declared again
/// at all, and one it lists (created since) is read at the next observation.
#[tokio::test]
async fn with_the_management_api_missing_queues_cost_no_channel_and_appear_at_once() {
    let Some((amqp, mgmt_url)) = amqp_and_mgmt() else {
        return;
    };
    for count in [3, 50] {
        // Up to 8 queues the API is read one queue at a time, above that as a list.
        let missing = absent(count);
        let _cleanup = QueueCleanup::new(
            &amqp,
            &missing.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let source = AmqpQueueSource::new(
            AmqpSourceConfig::builder(amqp.as_str())
                .queues(missing.clone())
                .heartbeats(false)
                .management(ManagementConfig::new(mgmt_url.as_str()))
                .missing_queue_recheck(Duration::from_secs(1))
                .build()
                .unwrap(),
        )
        .unwrap();
        let obs = source.observe().await.unwrap();
        assert_eq!((obs.ready, obs.in_flight), (0, Some(0)), "{obs:?}");
        let first = source.channels_opened();
        for _ in 0..30 {
            source.observe().await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            source.channels_opened(),
            first,
            "{count} queues: the API says they are still missing"
        );
        publish_with_timestamps(&amqp, &missing[1], &[0, 0, 0, 0]).await;
        // The API lists it at once (its statistics may lag): the next observation declares
        // it (or uses the API's figures) and reads the live count soon after.
        poll(
            "the created queue to be read",
            Duration::from_secs(10),
            || async { source.observe().await.ok().filter(|o| o.ready == 4) },
        )
        .await;
        assert_eq!(source.missing_queues().len(), count - 1);
    }
}

/// The broker goes away and comes back between two observations: the first observation after
/// it is back reads it (it does not fail on the old connection and cost the loop a backoff);
/// repeated, the replaced connections do not pile up threads.
#[tokio::test]
async fn the_first_observation_after_an_outage_reads_and_replaced_connections_are_freed() {
    let Some(amqp) = amqp_url() else { return };
    let queue = unique("back");
    let _cleanup = QueueCleanup::new(&amqp, &[&queue]);
    publish_with_timestamps(&amqp, &queue, &[0, 0]).await;
    let mut proxy = Proxy::start(&host_port(&amqp)).await;
    let source = Arc::new(
        AmqpQueueSource::new(
            AmqpSourceConfig::builder(via(&amqp, proxy.port))
                .queue(queue.as_str())
                .connect_timeout(Duration::from_secs(2))
                .no_management()
                .build()
                .unwrap(),
        )
        .unwrap(),
    );
    assert_eq!(source.observe().await.unwrap().ready, 2);
    let threads_before = threads();
    for round in 1..=10 {
        proxy.cut();
        if round % 2 == 0 {
            // An observation during the outage fails, transient.
            let e = source.observe().await.unwrap_err();
            assert!(e.is_transient(), "{e}");
        }
        proxy.restore().await;
        let obs = source
            .observe()
            .await
            .unwrap_or_else(|e| panic!("round {round}: the first observation failed: {e}"));
        assert_eq!(obs.ready, 2);
    }
    assert_eq!(source.connections_opened(), 11);
    // The heartbeat consumer follows the source to its newest connection; the old connections'
    // I/O threads end.
    poll(
        "the replaced connections' threads to end",
        Duration::from_secs(20),
        || async { (threads() <= threads_before + 1).then_some(()) },
    )
    .await;
}

/// A real RabbitMQ node stopped and started again between two observations: the first one
/// after it is back reads it, on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_observation_after_a_rabbitmq_restart_reads_it() {
    let Some(mut broker) = scratch::ScratchBroker::start(None).await else {
        return;
    };
    let url = broker.amqp_url();
    publish_with_timestamps(&url, "celery", &[0, 0, 0]).await;
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(url.as_str())
            .queue("celery")
            .connect_timeout(Duration::from_secs(2))
            .no_management()
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(source.observe().await.unwrap().ready, 3);
    broker.restart().await;
    let obs = source
        .observe()
        .await
        .expect("the first observation after the restart");
    assert_eq!(obs.ready, 3, "durable queue, persistent messages");
    assert_eq!(source.connections_opened(), 2);
    // Down, one failed observation, then back: again the first one after reads.
    broker.stop().await;
    assert!(source.observe().await.unwrap_err().is_transient());
    broker.start_again().await;
    assert_eq!(source.observe().await.unwrap().ready, 3);
}

/// The password as lapin's trace output prints it inside the login frame (`LongString` is a
/// `Vec<u8>` shown as decimal bytes), and as text.
fn password_forms(password: &str) -> [String; 2] {
    let bytes: Vec<String> = password.bytes().map(|b| b.to_string()).collect();
    [password.to_string(), bytes.join(", ")]
}

/// The process-wide subscriber of this test binary: lapin logs from its own I/O thread, which a
/// thread-local (`set_default`) subscriber never sees, so only a global one captures what a
/// daemon's subscriber would get. Its filter is reloaded by [`traced`]; `off` otherwise.
fn global_capture() -> &'static (
    Captured,
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
) {
    use tracing_subscriber::layer::SubscriberExt as _;
    static CAPTURE: std::sync::OnceLock<(
        Captured,
        tracing_subscriber::reload::Handle<
            tracing_subscriber::EnvFilter,
            tracing_subscriber::Registry,
        >,
    )> = std::sync::OnceLock::new();
    CAPTURE.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let (filter, handle) =
            tracing_subscriber::reload::Layer::new(tracing_subscriber::EnvFilter::new("off"));
        let subscriber = tracing_subscriber::registry().with(filter).with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        (captured, handle)
    })
}

/// Runs `f` with everything traced in the process captured through an `EnvFilter` of
/// `trace,lapin=trace` (a user's `RUST_LOG`) plus `directives` added after it, as the daemon
/// adds them.
async fn traced<F: std::future::Future<Output = ()>>(directives: &[&str], f: F) -> String {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = ONE_AT_A_TIME.lock().await;
    let (captured, handle) = global_capture();
    let mut filter = tracing_subscriber::EnvFilter::new("trace,lapin=trace");
    for d in directives {
        filter = filter.add_directive(d.parse().expect("a valid directive"));
    }
    captured.0.lock().unwrap().clear();
    handle.reload(filter).unwrap();
    f.await;
    handle
        .reload(tracing_subscriber::EnvFilter::new("off"))
        .unwrap();
    captured.text()
}

/// At TRACE lapin prints every frame it writes, the login (`connection.start-ok`, whose PLAIN
/// response holds the password) included, as bytes. With
/// [`LOG_FILTER_DIRECTIVES`](celery_scale_amqp::LOG_FILTER_DIRECTIVES) added to the filter,
/// neither a refused nor an accepted login puts the password in the output, in any form,
/// whatever the rest of the filter says.
#[tokio::test]
async fn log_filter_directives_keep_the_password_out_of_trace_output() {
    let Some((amqp, mgmt_url)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    // A user of our own with a password no other text contains.
    let user = unique("trace-user");
    let password = format!("Tr4ce-{}-pw", std::process::id());
    let (s, _) = mgmt.call(
        "PUT",
        &format!("/api/users/{}", urlencode(&user)),
        Some(serde_json::json!({"password": password, "tags": ""})),
    );
    assert!(s == 201 || s == 204, "create user: {s}");
    let (s, _) = mgmt.call(
        "PUT",
        &format!("/api/permissions/%2F/{}", urlencode(&user)),
        Some(serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"})),
    );
    assert!(s == 201 || s == 204, "permissions: {s}");
    struct DeleteUser(Mgmt, String);
    impl Drop for DeleteUser {
        fn drop(&mut self) {
            self.0.call(
                "DELETE",
                &format!("/api/users/{}", urlencode(&self.1)),
                None,
            );
        }
    }
    let _user = DeleteUser(mgmt.clone(), user.clone());
    let queue = unique("trace");
    let _cleanup = QueueCleanup::new(&amqp, &[&queue]);
    declare(&amqp, &[&queue], None).await;
    let with = |password: &str| {
        let mut u = url::Url::parse(&amqp).unwrap();
        u.set_username(&user).unwrap();
        u.set_password(Some(password)).unwrap();
        u.to_string()
    };
    let wrong = format!("Wr0ng-{}-pw", std::process::id());
    let queue = queue.as_str();
    let run = |url: String, accepted: bool| async move {
        let source = AmqpQueueSource::new(
            AmqpSourceConfig::builder(url.as_str())
                .queue(queue)
                .no_management()
                .build()
                .unwrap(),
        )
        .unwrap();
        let result = source.observe().await;
        assert_eq!(result.is_ok(), accepted, "{result:?}");
        // Let the worker-event consumer log in (or fail) too.
        tokio::time::sleep(Duration::from_millis(500)).await;
        source.shutdown().await;
    };
    let directives: Vec<&str> = celery_scale_amqp::LOG_FILTER_DIRECTIVES
        .split(',')
        .collect();
    for (secret, accepted) in [(&password, true), (&wrong, false)] {
        // Without the directives lapin prints the login frame: the test would see a leak.
        let unfiltered = traced(&[], run(with(secret), accepted)).await;
        assert!(
            password_forms(secret)
                .iter()
                .any(|form| unfiltered.contains(form.as_str())),
            "lapin's trace output no longer shows the login frame; this test must find another \
             way to prove the directives matter"
        );
        // Which targets print it (for the README and the report), never the password itself.
        let leaking: std::collections::BTreeSet<&str> = unfiltered
            .lines()
            .filter(|l| {
                password_forms(secret)
                    .iter()
                    .any(|f| l.contains(f.as_str()))
            })
            .flat_map(|l| l.split_whitespace())
            .filter_map(|w| w.strip_suffix(':'))
            .filter(|w| w.starts_with("lapin") || w.starts_with("amq_protocol"))
            .collect();
        eprintln!(
            "login accepted: {accepted}; targets printing the password at TRACE: {leaking:?}"
        );
        let filtered = traced(&directives, run(with(secret), accepted)).await;
        assert!(
            filtered.contains("celery_scale"),
            "our own trace output is kept: {filtered}"
        );
        for form in password_forms(secret) {
            assert!(
                !filtered.contains(&form),
                "the password ({form}) leaked at trace level with {directives:?}"
            );
        }
    }
}
