//! The ECS + Redis daemon: watches Celery's queues in Redis and sets ECS services' desired
//! counts.
//!
//! ```sh
//! cargo run --features ecs,redis --example ecs_redis -- --config examples/ecs_redis.toml --once
//! ```
//!
//! Credentials and region come from aws-config's default chain; `AWS_ENDPOINT_URL` points it
//! at another endpoint (moto, LocalStack). `--redis-url` / `CELERY_SCALE_REDIS_URL` overrides
//! every binding's `source.url`.

#[path = "daemon/mod.rs"]
mod daemon;

use std::error::Error;
use std::time::Duration;

use celery_scale::ecs::{AwsSettings, EcsServiceConfig, EcsServices};
use celery_scale::redis::{RedisQueueSource, RedisSourceConfig};
use celery_scale::{QueueSource, Scaler, SecretUrl};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Autoscale ECS services of Celery workers from their Redis backlog")]
struct Args {
    #[command(flatten)]
    daemon: daemon::DaemonArgs,
    /// Redis broker URL for every binding (overrides `source.url`).
    #[arg(long, env = "CELERY_SCALE_REDIS_URL")]
    redis_url: Option<SecretUrl>,
    /// How long one batched DescribeServices read serves every binding (keep it below the
    /// shortest interval), e.g. `500ms`.
    #[arg(long, env = "CELERY_SCALE_ECS_CACHE_TTL", value_parser = humantime::parse_duration, default_value = "500ms")]
    ecs_cache_ttl: Duration,
    /// Timeout of each ECS call, e.g. `5s`.
    #[arg(long, env = "CELERY_SCALE_ECS_CALL_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    ecs_call_timeout: Duration,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    daemon::init_logging(args.daemon.log_format);
    let mut config = daemon::load_config::<RedisSourceConfig, EcsServiceConfig>(
        &args.daemon.config,
        |source, scaler| {
            source.validate().map_err(|e| e.within("source"))?;
            scaler.validate().map_err(|e| e.within("scaler"))
        },
    )?;
    if let Some(url) = &args.redis_url {
        for b in &mut config.bindings {
            b.source.url = url.clone();
        }
    }
    // A shared read must not outlive a tick: keep its TTL below the shortest interval.
    let shortest = config.bindings.iter().map(|b| b.settings.interval).min();
    let mut cache_ttl = args.ecs_cache_ttl;
    if let Some(shortest) = shortest.filter(|i| cache_ttl >= *i) {
        cache_ttl = shortest / 2;
        tracing::warn!(
            ?shortest,
            ?cache_ttl,
            "--ecs-cache-ttl is not below the shortest interval; using half of it"
        );
    }
    // One ECS client and one shared handle: every service of every binding is read together,
    // ceil(n / 10) DescribeServices calls per cluster per tick.
    let services = EcsServices::from_settings(
        &AwsSettings::default()
            .cache_ttl(cache_ttl)
            .call_timeout(args.ecs_call_timeout),
    )
    .await
    .map_err(|e| format!("--ecs-*: {e}"))?;
    let bindings = daemon::build_bindings(
        &config,
        &args.daemon,
        |source| Ok(Box::new(RedisQueueSource::new(source.clone())?) as Box<dyn QueueSource>),
        |scaler| Ok(Box::new(services.scaler(scaler.clone())?) as Box<dyn Scaler>),
    )?;
    daemon::run(&args.daemon, bindings).await
}
