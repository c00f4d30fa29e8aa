//! Memory of an observe loop at 10,000 queues x 4 priority keys with `oldest_age` (one message
//! of about 4.4 KB in each queue), next to a plain redis-py loop doing the same reads
//! (`observe_rss.py`, run on the same data in the same run): both print their resident set
//! (`VmRSS`) and peak (`VmHWM`) from `/proc/self/status` after the loop.
//!
//! ```text
//! CELERY_SCALE_REDIS_URL=redis://127.0.0.1:6379 CELERY_SCALE_PYTHON=.venv/bin/python \
//!     cargo run --release -p celery-scale-redis --example observe_rss [QUEUES] [ITERATIONS] [SIZE]
//! ```
//!
//! Uses database 4 and keys under `csr-rss-{pid}:` (deleted at the end). Without
//! `CELERY_SCALE_PYTHON` only the Rust loop runs.

use std::time::Duration;

use base64::Engine as _;
use celery_scale_core::QueueSource;
use celery_scale_redis::{InFlightMode, RedisQueueSource, RedisSourceConfig};

/// `VmRSS` and `VmHWM` of this process, in kB.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Five seconds ago, in Unix seconds.
fn published_at() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        - 5.0
}

fn message(queue: &str, size: usize) -> String {
    let raw = vec![b'x'; size.saturating_sub(400) / 4 * 3];
    serde_json::json!({
        "body": base64::engine::general_purpose::STANDARD.encode(raw),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "app.tasks.work", "id": "0b0c7b44", "eta": null, "retries": 0},
        "properties": {"delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": "5d1f", "published_at": published_at()},
    })
    .to_string()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let queues: usize = args.next().map_or(Ok(10_000), |a| a.parse())?;
    let iterations: usize = args.next().map_or(Ok(20), |a| a.parse())?;
    let size: usize = args.next().map_or(Ok(4400), |a| a.parse())?;
    let base = std::env::var("CELERY_SCALE_REDIS_URL")
        .map_err(|_| "set CELERY_SCALE_REDIS_URL (e.g. redis://127.0.0.1:6379)")?;
    let url = format!("{}/4", base.trim_end_matches('/'));
    let prefix = format!("csr-rss-{}:", std::process::id());
    let names: Vec<String> = (0..queues).map(|i| format!("q{i}")).collect();
    let (rss_start, _) = memory();
    {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        for chunk in names.chunks(1000) {
            let mut pipe = redis::pipe();
            for q in chunk {
                pipe.cmd("LPUSH")
                    .arg(format!("{prefix}{q}"))
                    .arg(message(q, size))
                    .ignore();
            }
            let () = pipe.query_async(&mut conn).await?;
        }
    }
    let (rss_setup, _) = memory();
    let source = RedisQueueSource::new(
        RedisSourceConfig::builder(url.as_str())
            .queues(names.iter().cloned())
            .global_keyprefix(&prefix)
            .publish_time_field("published_at")
            .in_flight(InFlightMode::Global)
            .heartbeats(false)
            .timeout(Duration::from_secs(60))
            .build()?,
    )?;
    let mut ready = 0;
    for _ in 0..iterations {
        let obs = source.observe().await?;
        ready = obs.ready;
    }
    let (rss, hwm) = memory();
    println!(
        "rust   VmRSS={rss} VmHWM={hwm} (kB) ready={ready} (VmRSS {rss_start} kB at start, \
         {rss_setup} kB after writing the test messages; {queues} queues, {size}-byte messages, {iterations} observations)"
    );
    match std::env::var("CELERY_SCALE_PYTHON") {
        Ok(python) => {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/observe_rss.py");
            let out = std::process::Command::new(python)
                .args([
                    script,
                    &url,
                    &prefix,
                    &queues.to_string(),
                    &iterations.to_string(),
                ])
                .output()?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Err(_) => println!("python: not run (CELERY_SCALE_PYTHON is not set)"),
    }
    let client = redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    for chunk in names.chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|q| format!("{prefix}{q}")).collect();
        let () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await?;
    }
    Ok(())
}
