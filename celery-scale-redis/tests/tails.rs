//! The age of each queue's oldest message read by the tails script (`EVALSHA`): only the time
//! stamps cross the wire, whatever the body's size; messages that are no kombu envelope, or
//! carry no usable stamp, leave the age unknown (never 0); a server that forgets the script
//! gets it again, and one that refuses scripts still gives the age (from whole messages).

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use celery_scale_core::Observation;
use celery_scale_redis::{RedisQueueSource, RedisSourceConfig};
use common::*;
use redis::AsyncCommands as _;
use serde_json::json;

/// The tests' own database on the shared Redis (keys under a unique prefix too).
const DB: u32 = 4;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A kombu envelope whose base64 body is `body_bytes` long, with `headers` and `properties`
/// added to Celery's usual ones.
fn envelope(
    body_bytes: usize,
    headers: serde_json::Value,
    properties: serde_json::Value,
) -> String {
    let raw = vec![b'x'; body_bytes / 4 * 3];
    let mut h = json!({"lang": "py", "task": "t.sleep", "id": "1", "eta": null, "retries": 0});
    let mut p = json!({"delivery_info": {"exchange": "", "routing_key": "q"}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": "t"});
    h.as_object_mut()
        .unwrap()
        .extend(headers.as_object().unwrap().clone());
    p.as_object_mut()
        .unwrap()
        .extend(properties.as_object().unwrap().clone());
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(raw),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": h,
        "properties": p,
    })
    .to_string()
}

fn source(url: &str, prefix: &str, queues: &[&str]) -> RedisQueueSource {
    RedisQueueSource::new(
        RedisSourceConfig::builder(url)
            .queues(queues.iter().map(|q| q.to_string()))
            .global_keyprefix(prefix)
            .publish_time_field("published_at")
            .heartbeats(false)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// Each queue's oldest age in whole seconds (rounded), by name.
fn ages(obs: &Observation) -> Vec<(String, Option<u64>)> {
    obs.queues
        .iter()
        .map(|q| {
            (
                q.queue.clone(),
                q.oldest_age.map(|a| (a.as_secs_f64() + 0.5) as u64),
            )
        })
        .collect()
}

#[tokio::test]
async fn large_bodies_give_the_age_from_their_stamps() {
    let Some(url) = redis_url() else { return };
    let url = with_db(&url, DB);
    let prefix = format!("{}:", unique("tails-large"));
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let t = now();
    // A 4.4 KB message published 30 s ago (property), and a 450-byte one 60 s ago (header) in
    // a priority key; an older message before each (the tail is the oldest: RPUSH it).
    let big = envelope(4400, json!({}), json!({"published_at": t - 30.0}));
    assert!(big.len() > 4400, "{}", big.len());
    let small = envelope(450, json!({"published_at": t - 60.0}), json!({}));
    let newer = envelope(450, json!({}), json!({"published_at": t - 1.0}));
    let _: () = conn.lpush(format!("{prefix}big"), &newer).await.unwrap();
    let _: () = conn.rpush(format!("{prefix}big"), &big).await.unwrap();
    let _: () = conn
        .lpush(format!("{prefix}small\x06\x166"), &small)
        .await
        .unwrap();
    let _: () = conn.lpush(format!("{prefix}small"), &newer).await.unwrap();
    let source = source(&url, &prefix, &["big", "small", "empty"]);
    for _ in 0..2 {
        let obs = source.observe_redis().await.unwrap();
        assert_eq!(obs.ready, 4);
        assert_eq!(
            ages(&obs),
            [
                ("big".to_string(), Some(30)),
                ("small".to_string(), Some(60)),
                ("empty".to_string(), None)
            ]
        );
        assert_eq!(
            obs.oldest_age.map(|a| (a.as_secs_f64() + 0.5) as u64),
            Some(60)
        );
    }
}

#[tokio::test]
async fn unusable_messages_leave_the_age_unknown_never_zero() {
    let Some(url) = redis_url() else { return };
    let url = with_db(&url, DB);
    let prefix = format!("{}:", unique("tails-bad"));
    let _cleanup = Cleanup::prefix(&url, &prefix);
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let t = now();
    let good = t - 20.0;
    let cases: Vec<(&str, String, Option<u64>)> = vec![
        ("not-json", "not json at all \u{1}".into(), None),
        ("truncated", envelope(4400, json!({}), json!({"published_at": good}))[..3000].to_string(), None),
        ("no-field", envelope(4400, json!({}), json!({})), None),
        ("null-field", envelope(450, json!({"published_at": null}), json!({"published_at": null})), None),
        ("text-field", envelope(450, json!({"published_at": "yesterday"}), json!({})), None),
        ("millis", envelope(450, json!({}), json!({"published_at": t * 1000.0})), None),
        ("array", json!([1, 2, {"published_at": good}]).to_string(), None),
        ("headers-string", json!({"body": "", "headers": "x", "properties": {"published_at": good}}).to_string(), None),
        ("future-eta", envelope(450, json!({"eta": "2999-01-01T00:00:00+00:00"}), json!({})), None),
        // A stamp inside the body string is body, not a property.
        ("stamp-in-body", json!({"body": format!("\", \"properties\": {{\"published_at\": {good}}}, \"x\": \""), "headers": {}, "properties": {}}).to_string(), None),
        // Escaped quotes and backslashes in the body, then a good stamp.
        ("escaped-body", json!({"body": "a\"b\\\\\"c\\", "headers": {}, "properties": {"published_at": good}}).to_string(), Some(20)),
        // The body not first: the whole message is decoded.
        ("body-last", json!({"headers": {"published_at": good}, "properties": {}, "body": "eA=="}).to_string(), Some(20)),
        ("past-eta", envelope(450, json!({"eta": chrono_like(t - 40.0)}), json!({})), Some(40)),
        ("iso-field", envelope(4400, json!({}), json!({"published_at": chrono_like(t - 50.0)})), Some(50)),
    ];
    let names: Vec<&str> = cases.iter().map(|(q, _, _)| *q).collect();
    for (q, message, _) in &cases {
        let _: () = conn.lpush(format!("{prefix}{q}"), message).await.unwrap();
    }
    let source = source(&url, &prefix, &names);
    let obs = source.observe_redis().await.unwrap();
    assert_eq!(obs.ready, cases.len() as u64, "every message counted");
    let want: Vec<(String, Option<u64>)> = cases
        .iter()
        .map(|(q, _, age)| (q.to_string(), *age))
        .collect();
    assert_eq!(ages(&obs), want);
    assert_eq!(
        obs.oldest_age.map(|a| (a.as_secs_f64() + 0.5) as u64),
        Some(50)
    );
    // Only unusable messages: unknown, not 0.
    let bad: Vec<&str> = names[..10].to_vec();
    let obs = self::source(&url, &prefix, &bad)
        .observe_redis()
        .await
        .unwrap();
    assert_eq!(obs.oldest_age, None);
    assert_eq!(obs.ready, 10);
}

/// An ISO 8601 UTC time with microseconds for Unix seconds `t`, as Celery writes `eta`.
fn chrono_like(t: f64) -> String {
    let secs = t.floor() as i64;
    let micros = ((t - t.floor()) * 1e6) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}+00:00",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[tokio::test]
async fn a_server_that_forgets_the_script_gets_it_again() {
    let server = RedisServer::start(0, &[]);
    let url = server.url(0);
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let t = now();
    let message = envelope(4400, json!({}), json!({"published_at": t - 10.0}));
    let _: () = conn.lpush("q", &message).await.unwrap();
    let source = source(&url, "", &["q"]);
    let obs = source.observe_redis().await.unwrap();
    assert_eq!(ages(&obs), [("q".to_string(), Some(10))]);
    assert_eq!(
        cached_scripts(&mut conn).await,
        1,
        "the source loaded its script"
    );
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let obs = source.observe_redis().await.unwrap();
    assert_eq!(ages(&obs), [("q".to_string(), Some(10))]);
    assert_eq!(obs.ready, 1);
    assert_eq!(cached_scripts(&mut conn).await, 1, "loaded again");
}

/// How many scripts the server holds (`INFO memory`).
async fn cached_scripts(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.trim().strip_prefix("number_of_cached_scripts:"))
        .and_then(|n| n.parse().ok())
        .expect("INFO memory has number_of_cached_scripts")
}

#[tokio::test]
async fn a_server_refusing_scripts_still_gives_the_age() {
    let server = RedisServer::start(0, &[]);
    let url = server.url(0);
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let t = now();
    let _: () = conn
        .lpush(
            "q",
            envelope(450, json!({}), json!({"published_at": t - 15.0})),
        )
        .await
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "-@scripting"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let source = source(&url, "", &["q", "other"]);
    for _ in 0..2 {
        let obs = source.observe_redis().await.unwrap();
        assert_eq!(
            ages(&obs),
            [("q".to_string(), Some(15)), ("other".to_string(), None)]
        );
    }
}
