//! The leader lease on real Redis: one holder at a time, extension, hand-over on release,
//! expiry after the period, a key another client overwrote, and two core keepers over it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use celery_scale_core::lease::{Leadership, LeaseReply, LeaseStore, Role};
use celery_scale_redis::{RedisLease, RedisQueueSource, RedisSourceConfig};
use common::{Cleanup, redis_url, unique, with_db};
use redis::AsyncCommands as _;

/// Database 6 is this file's.
const DB: u32 = 6;

fn lease(url: &str, key: &str, holder: &str, period: Duration) -> RedisLease {
    let config = RedisSourceConfig::builder(url)
        .queue("celery")
        .heartbeats(false)
        .build()
        .unwrap();
    RedisQueueSource::new(config)
        .unwrap()
        .lease(key, holder, period)
}

#[tokio::test]
async fn one_holder_at_a_time_extended_released_and_expired() {
    let Some(base) = redis_url() else { return };
    let url = with_db(&base, DB);
    let key = unique("celery-scale-test:leader:");
    let _cleanup = Cleanup::prefix(&url, &key);
    let period = Duration::from_millis(1500);
    let a = lease(&url, &key, "a", period);
    let b = lease(&url, &key, "b", period);

    // A key nobody held: taken, as after a lease that ran out.
    assert_eq!(a.acquire().await.unwrap(), LeaseReply::Taken);
    assert_eq!(
        b.acquire().await.unwrap(),
        LeaseReply::HeldByOther {
            holder: Some("a".into())
        }
    );
    // Extending keeps it past the first period.
    for _ in 0..4 {
        tokio::time::sleep(period / 2).await;
        assert_eq!(a.acquire().await.unwrap(), LeaseReply::Held);
        assert!(matches!(
            b.acquire().await.unwrap(),
            LeaseReply::HeldByOther { .. }
        ));
    }
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = c.pttl(&key).await.unwrap();
    assert!(ttl > 0 && ttl <= 1500, "pttl {ttl}");

    // `b` giving up what it does not hold changes nothing; `a` giving up hands over at once.
    b.release().await.unwrap();
    assert!(matches!(
        b.acquire().await.unwrap(),
        LeaseReply::HeldByOther { .. }
    ));
    // Given up, it is taken as given up (acted on at once).
    a.release().await.unwrap();
    assert_eq!(b.acquire().await.unwrap(), LeaseReply::Held);
    assert_eq!(b.acquire().await.unwrap(), LeaseReply::Held);

    // Not extended, `b`'s lease ends with its period and `a` takes it as run out.
    tokio::time::sleep(period + Duration::from_millis(200)).await;
    assert_eq!(a.acquire().await.unwrap(), LeaseReply::Taken);
    assert!(matches!(
        b.acquire().await.unwrap(),
        LeaseReply::HeldByOther { .. }
    ));

    // Anyone with access may overwrite the key: the holder it names is shown bounded.
    let _: () = c.set(&key, "x".repeat(5000)).await.unwrap();
    match a.acquire().await.unwrap() {
        LeaseReply::HeldByOther { holder: Some(h) } => assert_eq!(h.len(), 200),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_dead_redis_is_an_error_not_a_lease() {
    let port = celery_scale_testing::free_port();
    let l = lease(
        &format!("redis://127.0.0.1:{port}/0"),
        "k",
        "a",
        Duration::from_secs(2),
    );
    let e = l.acquire().await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(l.describe().contains(&port.to_string()));
}

#[tokio::test]
async fn two_keepers_never_lead_at_once() {
    let Some(base) = redis_url() else { return };
    let url = with_db(&base, DB);
    let key = unique("celery-scale-test:leader:");
    let _cleanup = Cleanup::prefix(&url, &key);
    let period = Duration::from_millis(900);
    let a = Leadership::new(Arc::new(lease(&url, &key, "a", period)));
    let b = Leadership::new(Arc::new(lease(&url, &key, "b", period)));
    let timeout = Duration::from_secs(1);
    let mut leaders = Vec::new();
    for _ in 0..12 {
        let (ra, rb) = (a.role(timeout).await, b.role(timeout).await);
        let leading = [&ra, &rb]
            .iter()
            .filter(|r| matches!(r, Role::Leader { .. }))
            .count();
        assert!(leading <= 1, "{ra:?} {rb:?}");
        leaders.push(leading);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(leaders.iter().all(|n| *n == 1), "{leaders:?}");
    // The leader dies without giving the lease up (dropped: its keeper stops, no release);
    // the other leads within two periods.
    let (gone, other) = if matches!(a.role(timeout).await, Role::Leader { .. }) {
        (a, b)
    } else {
        (b, a)
    };
    drop(gone);
    let start = std::time::Instant::now();
    loop {
        if matches!(other.role(timeout).await, Role::Leader { .. }) {
            break;
        }
        assert!(start.elapsed() < period * 2, "no takeover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(start.elapsed() >= period / 3, "took over a live lease");
}
