//! Replies and events no real Redis or Celery sends, from a fake RESP server this test runs (for
//! the counts) and over the shared Redis's PUB/SUB (for worker events): never a panic, never a
//! wrapped number, and what cannot be trusted is unknown (`None`) or a typed error, not zero.

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celery_scale_core::{ErrorKind, QueueSource};
use celery_scale_redis::{InFlightMode, RedisQueueSource, RedisSourceConfig, RedisSourceError};
use common::*;
use redis::AsyncCommands as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

/// A fake Redis on a free port that answers each command with the raw RESP reply given for its
/// name (`LLEN`, `LINDEX`, `HLEN`, ...), and `+OK` to anything else (the client's `CLIENT
/// SETINFO` at connect). It runs until the test's runtime ends.
async fn fake_redis(replies: HashMap<&'static str, String>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let replies = replies.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut read = BufReader::new(read);
                while let Some(command) = read_command(&mut read).await {
                    let name = command.first().map(|c| c.to_ascii_uppercase());
                    let reply = name
                        .and_then(|n| replies.get(n.as_str()).cloned())
                        .unwrap_or_else(|| "+OK\r\n".into());
                    if write.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// One RESP array of bulk strings (how every client sends commands), or `None` at the end.
async fn read_command<R: tokio::io::AsyncBufRead + Unpin>(read: &mut R) -> Option<Vec<String>> {
    let mut line = String::new();
    read.read_line(&mut line).await.ok().filter(|&n| n > 0)?;
    let n: usize = line.trim().strip_prefix('*')?.parse().ok()?;
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        line.clear();
        read.read_line(&mut line).await.ok()?;
        let len: usize = line.trim().strip_prefix('$')?.parse().ok()?;
        let mut buf = vec![0; len + 2];
        read.read_exact(&mut buf).await.ok()?;
        buf.truncate(len);
        parts.push(String::from_utf8_lossy(&buf).into_owned());
    }
    Some(parts)
}

fn source(port: u16, in_flight: InFlightMode) -> RedisQueueSource {
    RedisQueueSource::new(
        RedisSourceConfig::builder(format!("redis://127.0.0.1:{port}/0"))
            .queue("celery")
            .in_flight(in_flight)
            .publish_time_field("published_at")
            .heartbeats(false)
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
    )
    .unwrap()
}

fn bulk(s: &str) -> String {
    format!("${}\r\n{s}\r\n", s.len())
}

#[tokio::test]
async fn impossible_lengths_are_typed_errors_not_zero_or_wrapped() {
    for (reply, shown) in [
        (":-5\r\n", "-5"),
        (":9223372036854775807\r\n", "9223372036854775807"),
        (":1099511627777\r\n", "1099511627777"),
    ] {
        let port = fake_redis(HashMap::from([
            ("LLEN", reply.to_string()),
            ("LINDEX", "$-1\r\n".into()),
            ("HLEN", ":0\r\n".into()),
        ]))
        .await;
        let source = source(port, InFlightMode::Global);
        let e = source.observe_redis().await.unwrap_err();
        match &e {
            RedisSourceError::UnexpectedReply {
                command,
                key,
                detail,
                ..
            } => {
                assert_eq!(*command, "LLEN");
                assert_eq!(key, "celery");
                assert!(detail.contains(shown), "{detail}");
            }
            other => panic!("{reply:?}: {other:?}"),
        }
        let core: celery_scale_core::Error = e.into();
        assert_eq!(core.kind(), ErrorKind::InvalidData);
        assert!(!core.is_transient());
    }
    // A length as a string, not an integer: the same.
    let port = fake_redis(HashMap::from([("LLEN", bulk("12"))])).await;
    let e = source(port, InFlightMode::Off)
        .observe_redis()
        .await
        .unwrap_err();
    assert!(
        matches!(e, RedisSourceError::UnexpectedReply { .. }),
        "{e:?}"
    );
}

#[tokio::test]
async fn large_lengths_add_up_without_overflow() {
    // 2^40 in each of the four priority keys: believed, and summed exactly.
    let port = fake_redis(HashMap::from([
        ("LLEN", ":1099511627776\r\n".to_string()),
        ("LINDEX", "$-1\r\n".into()),
        ("HLEN", ":1099511627776\r\n".into()),
    ]))
    .await;
    let obs = source(port, InFlightMode::Global)
        .observe_redis()
        .await
        .unwrap();
    assert_eq!(obs.ready, 4 << 40);
    assert_eq!(obs.in_flight, Some(1 << 40));
    assert_eq!(obs.outstanding(), 5 << 40);
}

#[tokio::test]
async fn a_bad_unacked_count_is_unknown_not_zero() {
    for hlen in [":-1\r\n".to_string(), bulk("lots"), "*0\r\n".into()] {
        let port = fake_redis(HashMap::from([
            ("LLEN", ":3\r\n".to_string()),
            ("LINDEX", "$-1\r\n".into()),
            ("HLEN", hlen.clone()),
        ]))
        .await;
        let obs = source(port, InFlightMode::Global)
            .observe_redis()
            .await
            .unwrap();
        assert_eq!(obs.ready, 12, "the queue counts still hold");
        assert_eq!(obs.in_flight, None, "{hlen:?}: unknown, not 0");
    }
}

#[tokio::test]
async fn hostile_tail_messages_leave_the_age_unknown() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for (stamp, age) in [
        ("1e300".to_string(), None),
        ("-1".into(), None),
        ((now * 1000.0).to_string(), None), // milliseconds
        ("\"NaN\"".into(), None),
        ("\"9999-99-99T99:99:99\"".into(), None),
        (
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]".into(),
            None,
        ),
        ((now - 30.0).to_string(), Some(30)),
    ] {
        let message = format!(
            r#"{{"body": "", "headers": {{"eta": null}}, "properties": {{"published_at": {stamp}}}}}"#
        );
        let port = fake_redis(HashMap::from([
            ("LLEN", ":1\r\n".to_string()),
            ("LINDEX", bulk(&message)),
            ("HLEN", ":0\r\n".into()),
        ]))
        .await;
        let obs = source(port, InFlightMode::Global)
            .observe_redis()
            .await
            .unwrap();
        assert_eq!(obs.ready, 4);
        assert_eq!(
            obs.oldest_age.map(|a| (a.as_secs_f64() + 0.5) as u64),
            age,
            "{stamp}"
        );
    }
    // Bytes that are no JSON at all.
    let port = fake_redis(HashMap::from([
        ("LLEN", ":1\r\n".to_string()),
        ("LINDEX", bulk("}{[\u{1}")),
    ]))
    .await;
    let obs = source(port, InFlightMode::Off)
        .observe_redis()
        .await
        .unwrap();
    assert_eq!(obs.oldest_age, None);
}

#[tokio::test]
async fn per_queue_in_flight_survives_malformed_unacked_entries() {
    // HSCAN: cursor 0 (last page) with one good entry and three bad ones.
    let good = r#"[{"body": ""}, "", "celery"]"#;
    let page = format!(
        "*2\r\n{}*8\r\n{}{}{}{}{}{}{}{}",
        bulk("0"),
        bulk("t1"),
        bulk(good),
        bulk("t2"),
        bulk("[1]"),
        bulk("t3"),
        bulk("not json"),
        bulk("t4"),
        bulk(r#"[{}, 5, ["celery"]]"#),
    );
    let port = fake_redis(HashMap::from([
        ("LLEN", ":0\r\n".to_string()),
        ("LINDEX", "$-1\r\n".into()),
        ("HSCAN", page),
    ]))
    .await;
    let obs = source(port, InFlightMode::PerQueue)
        .observe_redis()
        .await
        .unwrap();
    assert_eq!(obs.queues[0].in_flight, Some(1));
    // A page that is no page: a typed error.
    let port = fake_redis(HashMap::from([
        ("LLEN", ":0\r\n".to_string()),
        ("LINDEX", "$-1\r\n".into()),
        ("HSCAN", ":7\r\n".into()),
    ]))
    .await;
    let e = source(port, InFlightMode::PerQueue)
        .observe_redis()
        .await
        .unwrap_err();
    assert!(
        matches!(e, RedisSourceError::UnexpectedReply { .. }),
        "{e:?}"
    );
}

/// Worker events with numbers no worker sends (an interval of 10^300 s, `active` near 2^64 from
/// two workers): the source neither panics nor wraps; the absurd heartbeat is not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_worker_events_do_not_panic_or_wrap() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("hostile-beats");
    let url5 = with_db(&url, 5);
    let source = RedisQueueSource::new(
        RedisSourceConfig::builder(url5.as_str())
            .queue("celery")
            .global_keyprefix(&prefix)
            .heartbeat_warmup(Duration::from_millis(200))
            .build()
            .unwrap(),
    )
    .unwrap();
    poll("the subscription", Duration::from_secs(5), || async {
        source.heartbeats_subscribed().then_some(())
    })
    .await;
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let channel = format!("{prefix}/5.celeryev/worker.heartbeat");
    let with = |host: &str, field: &str, value: &str| {
        let event = worker_event("worker-heartbeat", host, 1, 1);
        // Rewrite one number inside the base64 body.
        let mut envelope: serde_json::Value = serde_json::from_str(&event).unwrap();
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = b64.decode(envelope["body"].as_str().unwrap()).unwrap();
        let mut body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        body[field] = serde_json::from_str(value).unwrap();
        envelope["body"] = b64.encode(body.to_string()).into();
        envelope.to_string()
    };
    for event in [
        with("huge-freq@a", "freq", "1e300"),
        with("busy@a", "active", "18446744073709551615"),
        with("busy@b", "active", "18446744073709551615"),
        with("neg@a", "active", "-3"),
        "{\"body\": \"!!!\"}".to_string(),
        "not json".to_string(),
    ] {
        let _: () = conn.publish(&channel, event).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let obs = source.observe().await.unwrap();
    // Every event above is out of range or malformed: none is a live worker, and none
    // counts a task (a count above 10^12 is refused, not summed).
    assert!(matches!(obs.live_workers, None | Some(0)), "{obs:?}");
    assert!(matches!(obs.executing, None | Some(0)), "{obs:?}");
    assert_eq!(obs.outstanding(), 0, "{obs:?}");
    source.shutdown().await;
}

/// A URL the client library cannot parse (a raw `#`, `/`, `?` or `@` in the password is common
/// when it is pasted unencoded) is rejected without showing the password anywhere.
#[tokio::test]
async fn unparseable_urls_never_show_the_password() {
    for c in ["#", "/", "?", "@", ";", "%zz", " "] {
        for url in [
            format!("redis://:zqk{c}xwv@cache:6379/1"),
            format!("rediss://user:zqk{c}xwv@cache:notaport/0"),
            format!("redis://user:zqk{c}xwv@[::1/0"),
            format!("redis+unix:///run/r.sock?db=x&pass=zqk{c}xwv"),
        ] {
            let config = RedisSourceConfig::builder(url.as_str())
                .queue("q")
                .heartbeats(false);
            let shown = match config.build() {
                Err(e) => format!("{e} {e:?}"),
                Ok(config) => match RedisQueueSource::new(config) {
                    Ok(source) => format!("{source:?}"),
                    Err(e) => {
                        let mut all = format!("{e} {e:?}");
                        let mut next = std::error::Error::source(&e);
                        while let Some(s) = next {
                            all.push_str(&format!(" {s} {s:?}"));
                            next = s.source();
                        }
                        let core: celery_scale_core::Error = e.into();
                        all.push_str(&format!(" {core} {core:?}"));
                        all
                    }
                },
            };
            for piece in ["zqk", "xwv"] {
                assert!(!shown.contains(piece), "{url}: {shown}");
            }
        }
    }
}
