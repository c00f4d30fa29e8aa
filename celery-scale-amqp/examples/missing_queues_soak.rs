//! A soak run by hand: one source watching many queues that do not exist (and one that does),
//! observed in a tight loop, printing the process's resident memory, its thread count and the
//! connections and channels the source opened, so growth shows.
//!
//! ```sh
//! eval "$(scripts/services.sh)"
//! CARGO_TARGET_DIR=target cargo run --release -p celery-scale-amqp --example missing_queues_soak -- \
//!     --missing 50 --seconds 600 --interval-ms 100 --heartbeats 1
//! ```
//!
//! It reads `CELERY_SCALE_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).

use std::time::Duration;

use celery_scale_amqp::{AmqpQueueSource, AmqpSourceConfig};
use celery_scale_core::QueueSource as _;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

/// `VmRSS` (kB) and `Threads` of this process, from `/proc/self/status`.
fn rss_and_threads() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("Threads:"))
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("CELERY_SCALE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let missing = arg("--missing", 50);
    let seconds = arg("--seconds", 600);
    let interval = Duration::from_millis(arg("--interval-ms", 100));
    let heartbeats = arg("--heartbeats", 1) != 0;
    let tag = format!("soak-{}", std::process::id());
    let present = format!("{tag}-present");
    let admin = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = admin.create_channel().await?;
    channel
        .queue_declare(
            present.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut queues = vec![present.clone()];
    queues.extend((0..missing).map(|i| format!("{tag}-missing-{i}")));
    let source = AmqpQueueSource::new(
        AmqpSourceConfig::builder(url.as_str())
            .queues(queues)
            .heartbeats(heartbeats)
            .connection_name(tag.as_str())
            .build()?,
    )?;
    let start = tokio::time::Instant::now();
    let mut next_report = Duration::ZERO;
    let (mut ok, mut failed) = (0u64, 0u64);
    println!("elapsed_s observations failed rss_kb threads connections channels");
    while start.elapsed() < Duration::from_secs(seconds) {
        match source.observe().await {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
        if start.elapsed() >= next_report {
            let (rss, threads) = rss_and_threads();
            println!(
                "{:>9} {:>12} {:>6} {:>6} {:>7} {:>11} {:>8}",
                start.elapsed().as_secs(),
                ok + failed,
                failed,
                rss,
                threads,
                source.connections_opened(),
                source.channels_opened(),
            );
            next_report += Duration::from_secs(10);
        }
        tokio::time::sleep(interval).await;
    }
    let (rss, threads) = rss_and_threads();
    println!(
        "end: {} observations ({failed} failed), rss {rss} kB, {threads} threads, {} connections, {} channels",
        ok + failed,
        source.connections_opened(),
        source.channels_opened()
    );
    source.shutdown().await;
    channel
        .queue_delete(present.as_str().into(), QueueDeleteOptions::default())
        .await?;
    admin.close(200, "".into()).await?;
    Ok(())
}
