//! The EC2 + RabbitMQ daemon: watches Celery's queues in RabbitMQ and sets EC2 Auto Scaling
//! Groups' desired capacity.
//!
//! ```sh
//! cargo run --features ec2,amqp --example ec2_rabbitmq -- --config examples/ec2_rabbitmq.toml --once
//! ```
//!
//! Credentials and region come from aws-config's default chain; `AWS_ENDPOINT_URL` points it
//! at another endpoint (moto, LocalStack). `--amqp-url` / `CELERY_SCALE_AMQP_URL` overrides
//! every binding's `source.url`. Every group of every binding is read in one shared
//! `DescribeAutoScalingGroups` round per tick.

#[path = "daemon/mod.rs"]
mod daemon;

use std::error::Error;
use std::time::Duration;

use celery_scale::amqp::{AmqpQueueSource, AmqpSourceConfig};
use celery_scale::ec2::{AutoScalingGroupConfig, AutoScalingGroups, AwsSettings};
use celery_scale::{QueueSource, Scaler, SecretUrl};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    about = "Autoscale EC2 Auto Scaling Groups of Celery workers from their RabbitMQ backlog"
)]
struct Args {
    #[command(flatten)]
    daemon: daemon::DaemonArgs,
    /// RabbitMQ broker URL for every binding (overrides `source.url`).
    #[arg(long, env = "CELERY_SCALE_AMQP_URL")]
    amqp_url: Option<SecretUrl>,
    /// How long one DescribeAutoScalingGroups answer serves every group (keep it below the
    /// shortest interval), e.g. `1s`.
    #[arg(long, env = "CELERY_SCALE_ASG_CACHE_TTL", value_parser = humantime::parse_duration, default_value = "1s")]
    asg_cache_ttl: Duration,
    /// Timeout of each Auto Scaling API call, e.g. `4s`.
    #[arg(long, env = "CELERY_SCALE_ASG_CALL_TIMEOUT", value_parser = humantime::parse_duration, default_value = "4s")]
    asg_call_timeout: Duration,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    daemon::init_logging(args.daemon.log_format);
    let mut config = daemon::load_config::<AmqpSourceConfig, AutoScalingGroupConfig>(
        &args.daemon.config,
        |source, scaler| {
            source.validate().map_err(|e| e.within("source"))?;
            scaler.validate().map_err(|e| e.within("scaler"))
        },
    )?;
    if let Some(url) = &args.amqp_url {
        for b in &mut config.bindings {
            b.source.url = url.clone();
        }
    }
    let groups = AutoScalingGroups::from_settings(
        &AwsSettings::default()
            .cache_ttl(args.asg_cache_ttl)
            .call_timeout(args.asg_call_timeout),
    )
    .await?;
    let bindings = daemon::build_bindings(
        &config,
        &args.daemon,
        |source| Ok(Box::new(AmqpQueueSource::new(source.clone())?) as Box<dyn QueueSource>),
        |scaler| Ok(Box::new(groups.scaler(scaler.clone())?) as Box<dyn Scaler>),
    )?;
    daemon::run(&args.daemon, bindings).await
}
