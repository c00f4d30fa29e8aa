//! The RabbitMQ leader lease ([`AmqpLease`]) against a real RabbitMQ: one holder at a time,
//! extension, handover on a closed, dropped or released owner, a silent owner (a proxy that
//! stops forwarding) dropped by the broker no sooner than the period after its last granted
//! request, bounded channels while following, discovery leaving lock queues out, and two
//! core `Leadership` keepers over two leases.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_scale_amqp::{
    AmqpLease, AmqpQueueSource, AmqpSourceConfig, AmqpSourceError, DiscoveryConfig,
    ManagementConfig,
};
use celery_scale_core::QueueSource;
use celery_scale_core::lease::{Leadership, LeaseReply, LeaseStore, Role};
use common::{Mgmt, Proxy, Vhost, amqp_and_mgmt, amqp_user, declare, host_port, poll, unique};
use common::{urlencode, via, with_vhost};
use serde_json::Value;
use tokio::time::{Instant, sleep};

fn config(amqp: &str) -> AmqpSourceConfig {
    AmqpSourceConfig::builder(amqp)
        .queue("celery")
        .no_management()
        .heartbeats(false)
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

fn lease(amqp: &str, name: &str, period: Duration, holder: &str) -> AmqpLease {
    AmqpLease::new(&config(amqp), name, period, holder).unwrap()
}

/// The store's reply, with a lease taken afresh ([`LeaseReply::Taken`]: RabbitMQ cannot tell
/// whether the previous holder gave it up) shown as held: these tests are about who holds it.
async fn reply(lease: &AmqpLease) -> LeaseReply {
    match lease.acquire().await.expect("the lease store answers") {
        LeaseReply::Taken => LeaseReply::Held,
        other => other,
    }
}

/// The lock queue as the management API shows it.
fn lock_queue(mgmt: &Mgmt, vhost: &str, queue: &str) -> Option<Value> {
    let (status, q) = mgmt.call(
        "GET",
        &format!("/api/queues/{}/{}", urlencode(vhost), urlencode(queue)),
        None,
    );
    (status == 200).then_some(q)
}

/// The connections named `name` and the channels open on them, as the management API lists
/// them.
fn connections_and_channels(mgmt: &Mgmt, name: &str) -> (usize, usize) {
    let (_, conns) = mgmt.call(
        "GET",
        "/api/connections?columns=name,client_properties",
        None,
    );
    let ids: Vec<String> = conns
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|c| c["client_properties"]["connection_name"].as_str() == Some(name))
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    let (_, channels) = mgmt.call("GET", "/api/channels?columns=connection_details", None);
    let open = channels
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|c| {
            c["connection_details"]["name"]
                .as_str()
                .is_some_and(|n| ids.iter().any(|id| id == n))
        })
        .count();
    (ids.len(), open)
}

fn proc_status(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[tokio::test]
async fn one_of_two_holders_gets_it_and_extends_it() {
    let Some((amqp, mgmt)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt);
    let name = unique("lease-two");
    let period = Duration::from_secs(4);
    let a = lease(&amqp, &name, period, "holder-a");
    let b = lease(&amqp, &name, period, "holder-b");
    // Taken afresh, then extended.
    assert_eq!(a.acquire().await.unwrap(), LeaseReply::Taken);
    assert_eq!(a.acquire().await.unwrap(), LeaseReply::Held);
    assert_eq!(reply(&b).await, LeaseReply::HeldByOther { holder: None });
    for _ in 0..3 {
        sleep(Duration::from_millis(200)).await;
        assert_eq!(reply(&a).await, LeaseReply::Held, "extension");
        assert_eq!(reply(&b).await, LeaseReply::HeldByOther { holder: None });
    }
    // One connection each, whatever the tries; each refused try cost one channel.
    assert_eq!((a.connections_opened(), a.channels_opened()), (1, 1));
    assert_eq!((b.connections_opened(), b.channels_opened()), (1, 4));
    let q = lock_queue(&mgmt, "/", a.queue()).expect("the lock queue exists");
    assert_eq!(q["exclusive"], Value::Bool(true), "{q}");
    assert_eq!(q["durable"], Value::Bool(false), "{q}");
    assert_eq!(q["auto_delete"], Value::Bool(true), "{q}");
    assert_eq!(q["arguments"]["x-celery-scale-holder"], "holder-a", "{q}");
    a.release().await.unwrap();
}

#[tokio::test]
async fn release_hands_over_at_once() {
    let Some((amqp, _)) = amqp_and_mgmt() else {
        return;
    };
    let name = unique("lease-release");
    let period = Duration::from_secs(10);
    let a = lease(&amqp, &name, period, "a");
    let b = lease(&amqp, &name, period, "b");
    // Releasing what was never held does nothing.
    b.release().await.unwrap();
    assert_eq!(reply(&a).await, LeaseReply::Held);
    assert!(matches!(reply(&b).await, LeaseReply::HeldByOther { .. }));
    a.release().await.unwrap();
    let t = Instant::now();
    assert_eq!(
        reply(&b).await,
        LeaseReply::Held,
        "the first try after a release"
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(matches!(reply(&a).await, LeaseReply::HeldByOther { .. }));
    b.release().await.unwrap();
}

#[tokio::test]
async fn a_closed_or_dropped_owner_hands_over_within_the_period() {
    let Some((amqp, mgmt)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt);
    let name = unique("lease-closed");
    let period = Duration::from_secs(4);
    let a = lease(&amqp, &name, period, "a");
    let b = lease(&amqp, &name, period, "b");
    assert_eq!(reply(&a).await, LeaseReply::Held);
    assert!(matches!(reply(&b).await, LeaseReply::HeldByOther { .. }));

    // The broker closes the owner's connection (CONNECTION_FORCED): the queue goes with it.
    mgmt.wait_connections_named(a.connection_name(), 1).await;
    assert_eq!(mgmt.close_connections_named(a.connection_name()), 1);
    let t = Instant::now();
    poll("b to take the lease", period, || async {
        (reply(&b).await == LeaseReply::Held).then_some(())
    })
    .await;
    println!("forced close: taken after {:?}", t.elapsed());
    // The old owner notices, connects again and hears that b has it.
    poll(
        "a to see its connection closed",
        Duration::from_secs(5),
        || async {
            match a.acquire().await {
                Ok(LeaseReply::HeldByOther { .. }) => Some(()),
                Ok(LeaseReply::Held | LeaseReply::Taken) => panic!("a holds a lease that b holds"),
                // First it hears that its own lease is gone.
                Ok(LeaseReply::Lost { .. }) | Err(_) => None,
            }
        },
    )
    .await;
    assert_eq!(a.connections_opened(), 2);

    // Dropping the owner closes its connection.
    drop(b);
    let t = Instant::now();
    poll(
        "a to take the lease after b was dropped",
        period,
        || async { (reply(&a).await == LeaseReply::Held).then_some(()) },
    )
    .await;
    println!("dropped owner: taken after {:?}", t.elapsed());
    a.release().await.unwrap();
}

/// What a silent holder's renewals answered while it was silent.
#[derive(Debug)]
enum Seen {
    Held,
    Other,
    Failed(String),
}

/// Stalls the owner's connection and returns the broker's detection time.
async fn silent_holder(amqp: &str, mgmt: &Mgmt, period: Duration) -> Duration {
    let mut proxy = Proxy::start(&host_port(amqp)).await;
    let name = unique("lease-silent");
    let a = Arc::new(lease(&via(amqp, proxy.port), &name, period, "silent-a"));
    let b = lease(amqp, &name, period, "b");
    let heartbeat = Duration::from_secs(u64::from(a.heartbeat()));
    assert!(2 * heartbeat >= period);

    assert_eq!(reply(&a).await, LeaseReply::Held);
    let mut last_grant = Instant::now();
    for _ in 0..3 {
        sleep(period / 3).await;
        let sent = Instant::now();
        assert_eq!(reply(&a).await, LeaseReply::Held);
        last_grant = sent;
    }
    assert!(matches!(reply(&b).await, LeaseReply::HeldByOther { .. }));

    proxy.stall();
    let stalled_at = Instant::now();
    // The silent holder goes on renewing as the core's keeper does (a third of the period,
    // bounded); none may be granted.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let renewals = tokio::spawn({
        let (a, seen) = (Arc::clone(&a), Arc::clone(&seen));
        async move {
            loop {
                sleep(period / 3).await;
                let r = match tokio::time::timeout(period / 2, a.acquire()).await {
                    Ok(Ok(LeaseReply::Held | LeaseReply::Taken)) => Seen::Held,
                    Ok(Ok(LeaseReply::Lost { why })) => Seen::Failed(why),
                    Ok(Ok(LeaseReply::HeldByOther { .. })) => Seen::Other,
                    Ok(Err(e)) => {
                        let typed = std::error::Error::source(&e)
                            .is_some_and(|s| s.is::<AmqpSourceError>());
                        assert!(typed, "an untyped error: {e:?}");
                        Seen::Failed(e.to_string())
                    }
                    Err(_) => Seen::Failed("the caller's timeout".into()),
                };
                seen.lock().unwrap().push(r);
            }
        }
    });

    let mut last_refused = stalled_at;
    let granted = loop {
        let sent = Instant::now();
        match reply(&b).await {
            LeaseReply::Held | LeaseReply::Taken => break Instant::now(),
            LeaseReply::HeldByOther { .. } | LeaseReply::Lost { .. } => last_refused = sent,
        }
        assert!(
            stalled_at.elapsed() < 3 * heartbeat + Duration::from_secs(5),
            "the broker kept a silent connection's queue for {:?}",
            stalled_at.elapsed()
        );
        sleep(Duration::from_millis(50)).await;
    };
    renewals.abort();
    let detection = granted - stalled_at;
    println!(
        "period {period:?}, heartbeat {heartbeat:?}: lease taken {detection:?} after the stall, \
         {:?} after the silent holder's last granted send; still refused {:?} after that send \
         (RabbitMQ: 2 to 3 heartbeats after the last byte it received)",
        granted - last_grant,
        last_refused - last_grant,
    );
    // A refused declare sent at `last_refused` means the queue still existed after it: the
    // lease was not handed over sooner than the period after the last granted send.
    assert!(
        last_refused - last_grant >= period,
        "the broker refused until only {:?} after the last granted send (period {period:?})",
        last_refused - last_grant
    );
    assert!(
        detection < 3 * heartbeat + Duration::from_secs(1),
        "{detection:?}"
    );
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(!seen.is_empty());
    for s in &seen {
        match s {
            Seen::Held => panic!("a silent holder was granted the lease: {seen:?}"),
            Seen::Other => {}
            Seen::Failed(m) => assert!(!m.contains(":guest@"), "a credential in {m}"),
        }
    }
    println!("the silent holder's renewals while silent: {seen:?}");

    // Back: the old holder connects again and hears that b has it, never Held.
    proxy.resume();
    poll(
        "the old holder to hear that b has the lease",
        Duration::from_secs(15),
        || async {
            match a.acquire().await {
                Ok(LeaseReply::Held | LeaseReply::Taken) => {
                    panic!("the old holder says Held while b holds it")
                }
                Ok(LeaseReply::HeldByOther { .. }) => Some(()),
                Ok(LeaseReply::Lost { .. }) | Err(_) => None,
            }
        },
    )
    .await;
    b.release().await.unwrap();
    assert_eq!(reply(&a).await, LeaseReply::Held);
    let q = lock_queue(mgmt, "/", a.queue()).expect("the lock queue exists");
    assert_eq!(q["arguments"]["x-celery-scale-holder"], "silent-a", "{q}");
    a.release().await.unwrap();
    proxy.cut();
    detection
}

#[tokio::test]
async fn a_silent_holder_is_dropped_no_sooner_than_the_period() {
    let Some((amqp, mgmt)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt);
    // Heartbeats of 2 s and 4 s (7 s rounds up: 2 x 4 s >= 7 s).
    let (d4, d7) = tokio::join!(
        silent_holder(&amqp, &mgmt, Duration::from_secs(4)),
        silent_holder(&amqp, &mgmt, Duration::from_secs(7)),
    );
    println!("broker detection after the stall: period 4 s: {d4:?}; period 7 s: {d7:?}");
}

#[tokio::test]
async fn refusals_cost_no_growing_channels_connections_or_threads() {
    let Some((amqp, mgmt)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt);
    let name = unique("lease-hygiene");
    let period = Duration::from_secs(10);
    let a = lease(&amqp, &name, period, "a");
    let b = lease(&amqp, &name, period, "b");
    assert_eq!(reply(&a).await, LeaseReply::Held);
    assert!(matches!(reply(&b).await, LeaseReply::HeldByOther { .. }));
    mgmt.wait_connections_named(b.connection_name(), 1).await;
    let threads_before = proc_status("Threads:");
    let rss_before = proc_status("VmRSS:");
    let mut most_channels = 0;
    for i in 1..500 {
        assert_eq!(reply(&b).await, LeaseReply::HeldByOther { holder: None });
        if i % 100 == 0 {
            let (conns, channels) = connections_and_channels(&mgmt, b.connection_name());
            assert_eq!(conns, 1, "after {i} tries");
            most_channels = most_channels.max(channels);
        }
    }
    assert_eq!(b.connections_opened(), 1);
    assert_eq!(b.channels_opened(), 500);
    // Refused channels are closed by the broker and not kept open.
    assert!(most_channels <= 2, "{most_channels} channels open at once");
    poll(
        "the follower's connection to have no channel left",
        Duration::from_secs(10),
        || async { (connections_and_channels(&mgmt, b.connection_name()) == (1, 0)).then_some(()) },
    )
    .await;
    println!(
        "500 refused tries: 1 connection, at most {most_channels} channel(s) open at a sample; \
         threads {threads_before:?} -> {:?}, VmRSS kB {rss_before:?} -> {:?}",
        proc_status("Threads:"),
        proc_status("VmRSS:")
    );
    // The lease still works on that connection.
    a.release().await.unwrap();
    assert_eq!(reply(&b).await, LeaseReply::Held);
    assert_eq!(b.connections_opened(), 1);
    b.release().await.unwrap();
}

#[tokio::test]
async fn discovery_leaves_lock_queues_out() {
    let Some((amqp, mgmt_url)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt_url);
    let vhost = Vhost::create(&mgmt, &amqp_user(&amqp), &unique("lease-discovery"));
    let url = with_vhost(&amqp, &vhost.name);
    declare(&url, &["celery"], None).await;
    let held = lease(&url, "emails", Duration::from_secs(10), "a");
    assert_eq!(reply(&held).await, LeaseReply::Held);
    let config = AmqpSourceConfig::builder(url.as_str())
        .management(ManagementConfig::new(mgmt_url.as_str()))
        .discovery(DiscoveryConfig::default())
        .heartbeats(false)
        .build()
        .unwrap();
    let source = AmqpQueueSource::new(config).unwrap();
    poll(
        "the management API to list the lock queue",
        Duration::from_secs(10),
        || async { lock_queue(&mgmt, &vhost.name, held.queue()).map(|_| ()) },
    )
    .await;
    let obs = source.observe().await.unwrap();
    assert_eq!(source.queues(), ["celery"]);
    assert_eq!(obs.queues.len(), 1, "{obs:?}");
    held.release().await.unwrap();
    source.close().await;
}

/// Samples the keepers' roles every `every` for `span`; fails if two lead at once. Returns
/// each sample's time (from the start) and leader.
async fn sample(
    keepers: &[(&str, &Leadership)],
    span: Duration,
    every: Duration,
) -> Vec<(Duration, Option<String>)> {
    let start = Instant::now();
    let mut leaders = Vec::new();
    while start.elapsed() < span {
        let at = start.elapsed();
        let roles =
            futures::future::join_all(keepers.iter().map(|(_, k)| k.role(Duration::from_secs(1))))
                .await;
        let leading: Vec<&str> = keepers
            .iter()
            .zip(&roles)
            .filter(|(_, r)| matches!(r, Role::Leader { .. }))
            .map(|((n, _), _)| *n)
            .collect();
        assert!(leading.len() <= 1, "two leaders at once: {roles:?}");
        leaders.push((at, leading.first().map(|n| n.to_string())));
        sleep(every).await;
    }
    leaders
}

#[tokio::test]
async fn two_leaderships_over_two_leases_one_leads_at_a_time() {
    let Some((amqp, _)) = amqp_and_mgmt() else {
        return;
    };
    let name = unique("lease-keepers");
    let period = Duration::from_secs(3);
    let tick = Duration::from_millis(100);
    let proxy_a = Proxy::start(&host_port(&amqp)).await;
    let proxy_b = Proxy::start(&host_port(&amqp)).await;
    let a = Leadership::new(Arc::new(lease(
        &via(&amqp, proxy_a.port),
        &name,
        period,
        "a",
    )));
    let b = Leadership::new(Arc::new(lease(
        &via(&amqp, proxy_b.port),
        &name,
        period,
        "b",
    )));
    let both = [("a", &a), ("b", &b)];

    // Steady state: one leader throughout, the same one.
    let leaders = sample(&both, 2 * period, tick).await;
    let first = leaders[0].1.clone().expect("a leader at the first tick");
    assert!(
        leaders
            .iter()
            .all(|(_, l)| l.as_deref() == Some(first.as_str())),
        "{leaders:?}"
    );

    // The leader goes silent: the other takes over, never while the silent one still leads.
    let (silent, other, proxy) = if first == "a" {
        (&a, &b, &proxy_a)
    } else {
        (&b, &a, &proxy_b)
    };
    proxy.stall();
    let leaders = sample(&both, 3 * period, tick).await;
    let old_until = leaders
        .iter()
        .filter(|(_, l)| l.as_deref() == Some(first.as_str()))
        .map(|(at, _)| *at)
        .max();
    let taken = leaders
        .iter()
        .find(|(_, l)| l.is_some() && l.as_deref() != Some(first.as_str()))
        .map(|(at, _)| *at)
        .expect("the other copy took over");
    println!(
        "silent leader (period {period:?}): it counted itself leader until {old_until:?} after \
         the stall, the other leads from {taken:?}"
    );
    // The silent one's lease runs out (0.9 x period after its last grant) before the broker
    // drops its connection (2 heartbeats >= period after its last byte).
    assert!(old_until.is_none_or(|t| t < period), "{old_until:?}");
    assert!(taken >= period, "{taken:?}");
    proxy.resume();

    // The silent one comes back as a follower; the new leader keeps leading.
    let leaders = sample(&both, 2 * period, tick).await;
    assert!(
        leaders
            .iter()
            .all(|(_, l)| l.is_some() && l.as_deref() != Some(first.as_str())),
        "{leaders:?}"
    );
    assert!(matches!(silent.role(tick).await, Role::Follower { .. }));

    // A clean shutdown of the leader hands over within a tick or two.
    other.release(Duration::from_secs(1)).await;
    let t = Instant::now();
    poll(
        "the old leader to lead again",
        Duration::from_secs(2),
        || async {
            matches!(
                silent.role(Duration::from_secs(1)).await,
                Role::Leader { .. }
            )
            .then_some(())
        },
    )
    .await;
    println!("handover after a release: {:?}", t.elapsed());
    silent.release(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_forced_close_overlaps_leaders_by_at_most_a_renewal() {
    let Some((amqp, mgmt)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt);
    let name = unique("lease-forced");
    let period = Duration::from_secs(3);
    let la = Arc::new(lease(&amqp, &name, period, "a"));
    let a = Leadership::new(la.clone());
    assert!(matches!(
        a.role(Duration::from_secs(1)).await,
        Role::Leader { .. }
    ));
    let b = Leadership::new(Arc::new(lease(&amqp, &name, period, "b")));
    assert!(matches!(
        b.role(Duration::from_secs(1)).await,
        Role::Follower { .. }
    ));
    mgmt.wait_connections_named(la.connection_name(), 1).await;
    assert_eq!(mgmt.close_connections_named(la.connection_name()), 1);
    let closed = Instant::now();
    // Both may count themselves leaders until a's next renewal finds its connection closed.
    let mut overlap_until = None;
    let mut b_leads = None;
    while closed.elapsed() < 2 * period {
        let (ra, rb) = tokio::join!(
            a.role(Duration::from_secs(1)),
            b.role(Duration::from_secs(1))
        );
        let (la, lb) = (
            matches!(ra, Role::Leader { .. }),
            matches!(rb, Role::Leader { .. }),
        );
        if lb {
            b_leads.get_or_insert(closed.elapsed());
        }
        if la && lb {
            overlap_until = Some(closed.elapsed());
        }
        sleep(Duration::from_millis(50)).await;
    }
    let b_leads = b_leads.expect("b took the lease");
    let overlap = overlap_until.map(|u| u.saturating_sub(b_leads));
    println!("forced close: b leads after {b_leads:?}, both counted as leaders for {overlap:?}");
    assert!(
        overlap.is_none_or(|o| o <= period / 3 + Duration::from_millis(500)),
        "{overlap:?}"
    );
    assert!(!matches!(
        a.role(Duration::from_secs(1)).await,
        Role::Leader { .. }
    ));
    b.release(Duration::from_secs(1)).await;
    a.release(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_user_without_configure_permission_gets_a_typed_refusal() {
    let Some((amqp, mgmt)) = amqp_and_mgmt() else {
        return;
    };
    let mgmt = Mgmt::new(&mgmt);
    let user = unique("lease-user");
    let password = "lease-s3cret";
    let (s, _) = mgmt.call(
        "PUT",
        &format!("/api/users/{}", urlencode(&user)),
        Some(serde_json::json!({"password": password, "tags": ""})),
    );
    assert!(s == 201 || s == 204, "create user: {s}");
    let (s, _) = mgmt.call(
        "PUT",
        &format!("/api/permissions/%2F/{}", urlencode(&user)),
        Some(serde_json::json!({"configure": "^$", "write": ".*", "read": ".*"})),
    );
    assert!(s == 201 || s == 204, "set permissions: {s}");
    let mut url = url::Url::parse(&amqp).unwrap();
    url.set_username(&user).unwrap();
    url.set_password(Some(password)).unwrap();
    let l = lease(
        url.as_str(),
        &unique("lease-perm"),
        Duration::from_secs(4),
        "a",
    );
    let e = l.acquire().await.unwrap_err();
    mgmt.call("DELETE", &format!("/api/users/{}", urlencode(&user)), None);
    assert_eq!(
        e.kind(),
        celery_scale_core::ErrorKind::PermissionDenied,
        "{e:?}"
    );
    assert!(!e.is_transient());
    assert!(
        std::error::Error::source(&e).is_some_and(|s| s.is::<AmqpSourceError>()),
        "{e:?}"
    );
    let shown = format!("{e} {e:?}");
    assert!(!shown.contains(password), "{shown}");
}
