//! Embedding celery-scale: one binding from Celery's queue on RabbitMQ to an EC2 Auto Scaling
//! Group, run until Ctrl-C. The deployable daemon is the `celery-scale` binary (`cargo install
//! celery-scale-cli`); this is the same loop in a program of your own.
//!
//! ```sh
//! CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:5672/%2f ASG_NAME=celery-workers \
//!   cargo run --features ec2,amqp --example ec2_rabbitmq
//! ```
//!
//! Region and credentials come from AWS's default chain (`AWS_ENDPOINT_URL` points it at moto).

use std::time::Duration;

use celery_scale::amqp::{AmqpQueueSource, AmqpSourceConfig};
use celery_scale::config::PolicyConfig;
use celery_scale::ec2::{AutoScalingGroupConfig, AutoScalingGroups, AwsSettings};
use celery_scale::{Autoscaler, Binding, CancellationToken, LoopSettings, SecretUrl};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();

    // Where the backlog is: Celery's default queue (passive declares, worker heartbeats).
    let broker = SecretUrl::from_env("CELERY_BROKER_URL")?;
    let source = AmqpQueueSource::new(AmqpSourceConfig::builder(broker).queue("celery").build()?)?;

    // What to scale: a group whose instances each run `celery worker --concurrency 4`.
    let groups = AutoScalingGroups::from_settings(&AwsSettings::default()).await?;
    let group = std::env::var("ASG_NAME").unwrap_or_else(|_| "celery-workers".into());
    let scaler = groups.scaler(AutoScalingGroupConfig::new(group).workers_per_instance(4))?;

    // The shipped default policy, at most 20 worker processes (5 instances).
    let policy = PolicyConfig {
        max_workers: 20,
        ..PolicyConfig::default()
    }
    .build()?;
    let settings = LoopSettings {
        name: "celery-workers".into(),
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
