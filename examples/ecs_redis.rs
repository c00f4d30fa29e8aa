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

use celery_scale::ecs::{EcsServiceConfig, EcsServices, EcsSettings};
use celery_scale::redis::{RedisQueueSource, RedisSourceConfig};
use celery_scale::{Binding, SecretUrl};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Autoscale ECS services of Celery workers from their Redis backlog")]
struct Args {
    #[command(flatten)]
    daemon: daemon::DaemonArgs,
    /// Redis broker URL for every binding (overrides `source.url`).
    #[arg(long, env = "CELERY_SCALE_REDIS_URL")]
    redis_url: Option<SecretUrl>,
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
    let services = EcsServices::new(EcsServices::client_from_env().await, EcsSettings::default())?;
    let mut bindings = Vec::new();
    for (i, b) in config.bindings.iter().enumerate() {
        let at = format!("bindings[{i}]");
        let source =
            RedisQueueSource::new(b.source.clone()).map_err(|e| format!("{at}.source: {e}"))?;
        let scaler = services
            .scaler(b.scaler.clone())
            .map_err(|e| e.within(&format!("{at}.scaler")))?;
        let policy = b
            .policy
            .build()
            .map_err(|e| e.within(&format!("{at}.policy")))?;
        bindings.push(Binding::new(
            daemon::settings(b, &args.daemon),
            Box::new(source),
            Box::new(scaler),
            policy,
        )?);
    }
    daemon::run(&args.daemon, bindings).await
}
