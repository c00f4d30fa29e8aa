//! One observation of 10,000 queues x 4 priority keys with `oldest_age`, one message in each
//! queue (450-byte and 4.4 KB messages), side by side in one run:
//!
//! - `source`: [`RedisQueueSource::observe`] (the tails script: `EVALSHA` per 1,000 keys, then
//!   `HLEN unacked`);
//! - `raw_same_commands`: the physical limit: a plain tokio `TcpStream` writing the very same
//!   commands ([`RedisQueueSource::packed_commands`], encoded once) as one RESP buffer and
//!   reading the replies (only skipped over, never decoded);
//! - `source_whole_tails`: the source on a connection whose ACL refuses scripts, so it reads
//!   each key's oldest message whole (`LLEN` + `LINDEX -1` per key): what the source did before
//!   the script;
//! - `raw_whole_tails`: the raw socket sending those `LLEN` + `LINDEX -1` commands;
//! - `encode_only`: encoding the source's pipeline, which the redis crate does on every send.
//!
//! Needs a real Redis: `CELERY_SCALE_REDIS_URL=redis://127.0.0.1:6379 cargo bench -p
//! celery-scale-redis --bench observe`. Uses database 4 and keys under `csr-bench-{pid}-`
//! (deleted at the end), and a temporary ACL user `csr-bench-{pid}` (deleted at the end).
//! Without the variable the bench says so and does nothing.

use std::time::Duration;

use base64::Engine as _;
use celery_scale_core::QueueSource;
use celery_scale_redis::{InFlightMode, RedisQueueSource, RedisSourceConfig};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redis::Commands as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const QUEUES: usize = 10_000;
const DB: u32 = 4;
/// Message sizes: a small Celery task, and one with a 4.4 KB message.
const SIZES: [usize; 2] = [450, 4400];

/// A kombu envelope of about `size` bytes (the body's base64 makes up the rest), published
/// now (the `published_at` property).
/// Five seconds ago, in Unix seconds.
fn published_at() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        - 5.0
}

fn message(queue: &str, size: usize) -> String {
    let envelope = |body: &str| {
        serde_json::json!({
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": "app.tasks.work", "id": "0b0c7b44-1c1e-4a53-9d2c-3a5f4e6b7c8d",
                        "eta": null, "retries": 0, "root_id": "0b0c7b44", "parent_id": null},
            "properties": {"delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                           "body_encoding": "base64", "delivery_tag": "5d1f0d0e-8c4b",
                           "published_at": published_at()},
        })
        .to_string()
    };
    let overhead = envelope("").len();
    let raw = vec![b'x'; size.saturating_sub(overhead) / 4 * 3];
    envelope(&base64::engine::general_purpose::STANDARD.encode(raw))
}

/// The end of the RESP value starting at `i`, or `None` while it is incomplete.
fn skip(b: &[u8], i: usize) -> Option<usize> {
    let kind = *b.get(i)?;
    let eol = i + b.get(i..)?.windows(2).position(|w| w == b"\r\n")?;
    let next = eol + 2;
    let n = || -> i64 {
        std::str::from_utf8(&b[i + 1..eol])
            .unwrap()
            .parse()
            .unwrap()
    };
    match kind {
        b'+' | b'-' | b':' => Some(next),
        b'$' => match n() {
            len if len < 0 => Some(next),
            len => {
                let end = next + len as usize + 2;
                (end <= b.len()).then_some(end)
            }
        },
        b'*' => {
            let mut p = next;
            for _ in 0..n().max(0) {
                p = skip(b, p)?;
            }
            Some(p)
        }
        other => panic!("not RESP2: {other}"),
    }
}

/// Writes `request` and reads until `replies` complete replies came back; the bytes read.
async fn round_trip(
    stream: &mut TcpStream,
    request: &[u8],
    replies: usize,
    buf: &mut Vec<u8>,
) -> usize {
    buf.clear();
    let (mut read, mut write) = stream.split();
    let writer = async {
        write.write_all(request).await.unwrap();
    };
    let reader = async {
        let (mut done, mut pos) = (0, 0);
        while done < replies {
            if buf.capacity() - buf.len() < 64 * 1024 {
                buf.reserve(buf.len().max(1 << 20));
            }
            let n = read.read_buf(buf).await.unwrap();
            assert!(n > 0, "the server closed the connection");
            while done < replies {
                match skip(buf, pos) {
                    Some(end) => {
                        assert_ne!(
                            buf[pos],
                            b'-',
                            "{}",
                            String::from_utf8_lossy(&buf[pos..end])
                        );
                        pos = end;
                        done += 1;
                    }
                    None => break,
                }
            }
        }
        assert_eq!(pos, buf.len(), "no more than the replies");
    };
    tokio::join!(writer, reader);
    buf.len()
}

/// A raw connection to `addr` with database `db` selected.
async fn raw(addr: &(String, u16), db: u32) -> TcpStream {
    let mut stream = TcpStream::connect((addr.0.as_str(), addr.1)).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let select = redis::cmd("SELECT").arg(db).get_packed_command();
    let mut buf = Vec::new();
    round_trip(&mut stream, &select, 1, &mut buf).await;
    stream
}

/// Deletes the bench's ACL user and keys when dropped, also after a panic.
struct Cleanup {
    url: String,
    user: String,
    pattern: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(mut conn) = redis::Client::open(self.url.as_str()).and_then(|c| c.get_connection())
        else {
            return;
        };
        let _: redis::RedisResult<()> = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&self.user)
            .query(&mut conn);
        let keys: Vec<String> = conn
            .scan_match(&self.pattern)
            .map(|i| i.flatten().collect())
            .unwrap_or_default();
        for chunk in keys.chunks(1000) {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query(&mut conn);
        }
    }
}

fn observe(c: &mut Criterion) {
    let Ok(url) = std::env::var("CELERY_SCALE_REDIS_URL") else {
        eprintln!("observe bench skipped: CELERY_SCALE_REDIS_URL is not set");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let addr = match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
        other => panic!("the bench needs a TCP Redis URL, not {other:?}"),
    };
    let db_url = format!("redis://{}:{}/{DB}", addr.0, addr.1);
    let mut conn = rt
        .block_on(
            redis::Client::open(db_url.as_str())
                .unwrap()
                .get_multiplexed_async_connection(),
        )
        .expect("connect to CELERY_SCALE_REDIS_URL");
    let pid = std::process::id();
    // A user like the default one, without scripting: the source falls back to whole tails.
    let user = format!("csr-bench-{pid}");
    let password = format!("pw{pid}");
    rt.block_on(async {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg(&[
                "on",
                &format!(">{password}"),
                "~*",
                "&*",
                "+@all",
                "-@scripting",
            ])
            .query_async(&mut conn)
            .await
            .unwrap();
    });
    let _cleanup = Cleanup {
        url: db_url.clone(),
        user: user.clone(),
        pattern: format!("csr-bench-{pid}-*"),
    };
    let no_scripts_url = format!("redis://{user}:{password}@{}:{}/{DB}", addr.0, addr.1);
    let queues: Vec<String> = (0..QUEUES).map(|i| format!("q{i}")).collect();

    let mut group = c.benchmark_group("observe_10k_queues_x4_keys");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(6));
    group.throughput(Throughput::Elements((QUEUES * 4) as u64));
    for size in SIZES {
        let prefix = format!("csr-bench-{pid}-{size}:");
        let body_len = message("q0", size).len();
        // One waiting message in every queue's bare key (its other three step keys are empty).
        rt.block_on(async {
            for chunk in queues.chunks(1000) {
                let mut pipe = redis::pipe();
                for q in chunk {
                    pipe.cmd("LPUSH")
                        .arg(format!("{prefix}{q}"))
                        .arg(message(q, size))
                        .ignore();
                }
                let _: () = pipe.query_async(&mut conn).await.unwrap();
            }
        });
        let config = |url: &str| {
            RedisSourceConfig::builder(url)
                .queues(queues.iter().cloned())
                .global_keyprefix(&prefix)
                .publish_time_field("published_at")
                .in_flight(InFlightMode::Global)
                .heartbeats(false)
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap()
        };
        let source = rt.block_on(async { RedisQueueSource::new(config(&db_url)).unwrap() });
        let obs = rt.block_on(source.observe()).unwrap();
        assert_eq!(obs.ready, QUEUES as u64);
        assert!(obs.oldest_age.is_some(), "ages read");
        let whole = rt.block_on(async { RedisQueueSource::new(config(&no_scripts_url)).unwrap() });
        let obs_whole = rt.block_on(whole.observe()).unwrap();
        assert_eq!(obs_whole.ready, QUEUES as u64);
        // The same publish times: each age, taken back from its observation's instant, names
        // the same moment (the two observations are seconds apart, so the ages differ).
        let published = |o: &celery_scale_core::Observation| -> Vec<Option<tokio::time::Instant>> {
            o.queues
                .iter()
                .map(|q| q.oldest_age.and_then(|a| o.at.checked_sub(a)))
                .collect()
        };
        let (script, whole_tails) = (published(&obs), published(&obs_whole));
        assert_eq!(script.len(), whole_tails.len());
        for (a, b) in script.iter().zip(&whole_tails) {
            match (a, b) {
                (Some(a), Some(b)) => {
                    let apart = a.max(b).saturating_duration_since(*a.min(b));
                    assert!(
                        apart < Duration::from_millis(250),
                        "the script and whole tails read the same ages ({apart:?} apart)"
                    );
                }
                (a, b) => assert_eq!(a.is_some(), b.is_some(), "the same ages known"),
            }
        }
        let (same, same_n) = source.packed_commands();
        let (lindex, lindex_n) = whole.packed_commands();
        assert!(
            same_n == QUEUES * 4 / 1000 + 1 && lindex_n == QUEUES * 8 + 1,
            "{same_n} {lindex_n}"
        );
        let mut stream = rt.block_on(raw(&addr, DB));
        let mut buf = Vec::new();
        let got_same = rt.block_on(round_trip(&mut stream, &same, same_n, &mut buf));
        let got_whole = rt.block_on(round_trip(&mut stream, &lindex, lindex_n, &mut buf));
        eprintln!(
            "{size}-byte messages ({body_len} bytes): script commands {} KB out, {} KB back; \
             whole tails {} KB out, {} KB back",
            same.len() / 1024,
            got_same / 1024,
            lindex.len() / 1024,
            got_whole / 1024
        );

        group.bench_function(BenchmarkId::new("source", size), |b| {
            b.to_async(&rt)
                .iter(|| async { source.observe().await.unwrap() });
        });
        group.bench_function(BenchmarkId::new("raw_same_commands", size), |b| {
            b.iter(|| rt.block_on(round_trip(&mut stream, &same, same_n, &mut buf)));
        });
        group.bench_function(BenchmarkId::new("source_whole_tails", size), |b| {
            b.to_async(&rt)
                .iter(|| async { whole.observe().await.unwrap() });
        });
        group.bench_function(BenchmarkId::new("raw_whole_tails", size), |b| {
            b.iter(|| rt.block_on(round_trip(&mut stream, &lindex, lindex_n, &mut buf)));
        });
        group.bench_function(BenchmarkId::new("encode_only", size), |b| {
            b.iter(|| source.packed_commands());
        });
    }
    group.finish();
}

criterion_group!(benches, observe);
criterion_main!(benches);
