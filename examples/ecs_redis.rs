//! Embedding celery-scale: one binding from Celery's queue on Redis to an ECS service, run until
//! Ctrl-C. The deployable daemon is the `celery-scale` binary (`cargo install
//! celery-scale-cli`); this is the same loop in a program of your own.
//!
//! ```sh
//! CELERY_BROKER_URL=redis://127.0.0.1:6379/0 ECS_CLUSTER=celery ECS_SERVICE=workers \
//!   cargo run --features ecs,redis --example ecs_redis
//! ```
//!
//! Region and credentials come from AWS's default chain (`AWS_ENDPOINT_URL` points it at moto).

use std::time::Duration;

use celery_scale::config::PolicyConfig;
use celery_scale::ecs::{AwsSettings, EcsServiceConfig, EcsServices};
use celery_scale::redis::{RedisQueueSource, RedisSourceConfig};
use celery_scale::{Autoscaler, Binding, CancellationToken, LoopSettings, SecretUrl};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());

    // Where the backlog is: Celery's default queue on the broker Celery uses.
    let broker = SecretUrl::from_env("CELERY_BROKER_URL")?;
    let source =
        RedisQueueSource::new(RedisSourceConfig::builder(broker).queue("celery").build()?)?;

    // What to scale: an ECS service whose tasks each run `celery worker --concurrency 4`.
    let aws = AwsSettings::default();
    let services = EcsServices::from_settings(&aws).await?;
    let service =
        EcsServiceConfig::new(env("ECS_CLUSTER", "celery"), env("ECS_SERVICE", "workers"))
            .workers_per_task(4)?;
    let scaler = services.scaler(service)?;

    // The shipped default policy (5 outstanding tasks per worker, 30 s windows), at most 40.
    let policy = PolicyConfig {
        max_workers: 40,
        ..PolicyConfig::default()
    }
    .build()?;
    let settings = LoopSettings {
        name: "default-queue".into(),
        interval: Duration::from_secs(5),
        ..LoopSettings::default()
    };
    let binding = Binding::new(settings, Box::new(source), Box::new(scaler), policy)?;

    let cancel = CancellationToken::new();
    let on_ctrl_c = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_ctrl_c.cancel();
    });
    let report = Autoscaler::new().with_binding(binding).run(cancel).await;
    if !report.is_clean() {
        return Err(format!("the binding failed: {report:?}").into());
    }
    Ok(())
}
