//! Benchmark: burst -> `UpdateService` latency, real Redis and moto, 1 s poll.
//!
//! ```sh
//! eval "$(scripts/services.sh)"
//! cargo run --release --features ecs,redis --example ecs_burst_latency -- 20
//! ```
//!
//! Each round: the service is at 0 and the queue empty; the loop runs with a 1 s interval; an
//! `LPUSH` of 20 messages starts the clock; the clock stops when moto's `DescribeServices`
//! shows a desired count above 0. Prints median, p95 and max over the rounds.
//!
//! Then: 25 services on moto, 25 bindings (each with its own Redis queue, nothing to change)
//! ticked together for 5 rounds, 1 s apart; prints the ECS calls each round made, counted by
//! the shared `EcsServices` handle (target: 3 `DescribeServices`, 0 `UpdateService`).

use std::time::{Duration, Instant};

use celery_scale::config::{PolicyConfig, PolicyKind};
use celery_scale::ecs::aws_sdk_ecs::Client;
use celery_scale::ecs::aws_sdk_ecs::types::ContainerDefinition;
use celery_scale::ecs::{AwsSettings, EcsCalls, EcsServiceConfig, EcsServices};
use celery_scale::record::Outcome;
use celery_scale::redis::{RedisQueueSource, RedisSourceConfig};
use celery_scale::{Autoscaler, Binding, CancellationToken, LoopSettings};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(20), |a| a.parse())?;
    let redis_url = std::env::var("CELERY_SCALE_REDIS_URL")
        .map_err(|_| "set CELERY_SCALE_REDIS_URL (scripts/services.sh)")?;
    let moto = std::env::var("CELERY_SCALE_MOTO_URL")
        .map_err(|_| "set CELERY_SCALE_MOTO_URL (scripts/services.sh)")?;
    let broker = format!("{}/12", redis_url.trim_end_matches('/'));
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&moto)
        .region(aws_config::Region::new("us-east-1"))
        .load()
        .await;
    let ecs = Client::new(&config);
    let cluster = format!("latency-{}", std::process::id());
    ecs.create_cluster().cluster_name(&cluster).send().await?;
    ecs.register_task_definition()
        .family("celery-worker")
        .container_definitions(
            ContainerDefinition::builder()
                .name("worker")
                .image("python:3.12")
                .memory(512)
                .build(),
        )
        .send()
        .await?;
    ecs.create_service()
        .cluster(&cluster)
        .service_name("workers")
        .task_definition("celery-worker")
        .desired_count(0)
        .send()
        .await?;

    let redis = redis::Client::open(broker.as_str())?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let queue = format!("latency-{}", std::process::id());
    let mut latencies = Vec::new();
    for round in 0..rounds {
        redis::cmd("DEL")
            .arg(&queue)
            .query_async::<()>(&mut conn)
            .await?;
        ecs.update_service()
            .cluster(&cluster)
            .service("workers")
            .desired_count(0)
            .send()
            .await?;
        let services = EcsServices::new(ecs.clone(), old_defaults())?;
        let binding = Binding::new(
            LoopSettings {
                name: "latency".into(),
                interval: Duration::from_secs(1),
                ..LoopSettings::default()
            },
            Box::new(RedisQueueSource::new(
                RedisSourceConfig::builder(broker.as_str())
                    .queue(&queue)
                    .heartbeats(false)
                    .build()?,
            )?),
            Box::new(services.scaler(EcsServiceConfig::new(&cluster, "workers"))?),
            PolicyConfig {
                kind: PolicyKind::TargetBacklog,
                max_workers: 50,
                ..PolicyConfig::default()
            }
            .build()?,
        )?;
        let cancel = CancellationToken::new();
        let running = tokio::spawn(binding.run(cancel.clone()));
        // Let the loop settle into its rhythm, then burst at a point of the interval that
        // varies from round to round.
        tokio::time::sleep(Duration::from_millis(1500 + (round as u64 * 137) % 1000)).await;
        let start = Instant::now();
        let mut push = redis::cmd("LPUSH");
        push.arg(&queue);
        for i in 0..20 {
            push.arg(format!("{{\"task\": {i}}}"));
        }
        push.query_async::<()>(&mut conn).await?;
        loop {
            let d = ecs
                .describe_services()
                .cluster(&cluster)
                .services("workers")
                .send()
                .await?
                .services()[0]
                .desired_count();
            if d > 0 {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err("no scale-out within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        latencies.push(start.elapsed());
        cancel.cancel();
        running.await?;
    }
    redis::cmd("DEL")
        .arg(&queue)
        .query_async::<()>(&mut conn)
        .await?;
    let calls = calls_per_round_with_25_services(&ecs, &broker, &cluster).await?;
    latencies.sort();
    let pct = |p: f64| {
        latencies[((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    println!("rounds {}", latencies.len());
    println!(
        "burst -> UpdateService seen by moto: median {:?}, p95 {:?}, max {:?}",
        pct(0.5),
        pct(0.95),
        latencies[latencies.len() - 1]
    );
    for (round, c) in calls.iter().enumerate() {
        println!(
            "25 unchanged services, round {}: {} DescribeServices, {} UpdateService",
            round + 1,
            c.describe_services,
            c.update_service
        );
    }
    Ok(())
}

/// 25 services at 2 tasks, 25 bindings whose queues hold 10 messages (2 workers at 5 messages
/// per worker, one worker per task): nothing changes; returns the ECS calls of each round.
async fn calls_per_round_with_25_services(
    ecs: &Client,
    broker: &str,
    cluster: &str,
) -> Result<Vec<EcsCalls>, Box<dyn std::error::Error>> {
    let services = EcsServices::new(ecs.clone(), old_defaults())?;
    let mut auto = Autoscaler::new();
    let redis = redis::Client::open(broker)?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let mut queues = Vec::new();
    for i in 0..25 {
        let name = format!("steady-{i}");
        ecs.create_service()
            .cluster(cluster)
            .service_name(&name)
            .task_definition("celery-worker")
            .desired_count(2)
            .send()
            .await?;
        let queue = format!("steady-{}-{i}", std::process::id());
        // 10 ready messages at 5 per worker: 2 workers = 2 tasks, what the service has.
        let mut push = redis::cmd("LPUSH");
        push.arg(&queue);
        for m in 0..10 {
            push.arg(format!("{{\"task\": {m}}}"));
        }
        push.query_async::<()>(&mut conn).await?;
        queues.push(queue.clone());
        auto = auto.with_binding(Binding::new(
            LoopSettings {
                name: name.clone(),
                interval: Duration::from_secs(1),
                ..LoopSettings::default()
            },
            Box::new(RedisQueueSource::new(
                RedisSourceConfig::builder(broker)
                    .queue(&queue)
                    .heartbeats(false)
                    .build()?,
            )?),
            Box::new(services.scaler(EcsServiceConfig::new(cluster, &name))?),
            PolicyConfig {
                kind: PolicyKind::TargetBacklog,
                messages_per_worker: 5.0,
                max_workers: 50,
                ..PolicyConfig::default()
            }
            .build()?,
        )?);
    }
    let mut rounds = Vec::new();
    let mut before = services.calls();
    for _ in 0..5 {
        let records = auto.tick_all().await;
        if let Some(r) = records
            .iter()
            .find(|r| !matches!(r.outcome, Outcome::Unchanged { .. }))
        {
            return Err(format!("{}: expected no change, got {:?}", r.binding, r.outcome).into());
        }
        let now = services.calls();
        rounds.push(EcsCalls {
            describe_services: now.describe_services - before.describe_services,
            update_service: now.update_service - before.update_service,
        });
        before = now;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut del = redis::cmd("DEL");
    for q in &queues {
        del.arg(q);
    }
    del.query_async::<()>(&mut conn).await?;
    Ok(rounds)
}

/// The ECS handle's settings this measurement was made with (the old `EcsSettings` defaults:
/// 500 ms cache, 5 s calls), kept so its numbers stay comparable.
fn old_defaults() -> AwsSettings {
    AwsSettings::default()
        .cache_ttl(Duration::from_millis(500))
        .call_timeout(Duration::from_secs(5))
}
