//! End to end, EC2 + RabbitMQ: a real Celery producer publishes a burst to real RabbitMQ; the
//! control loop reads it with the RabbitMQ source and sets an Auto Scaling group's desired
//! capacity on moto; a real Celery worker drains the queue; after the scale-in window the group
//! is back at its minimum.
//!
//! Needs CELERY_SCALE_AMQP_URL, CELERY_SCALE_MOTO_URL and CELERY_SCALE_PYTHON (scripts/test.sh).

use std::time::Duration;

mod common;

use celery_scale::config::{PolicyConfig, PolicyKind};
use celery_scale::ec2::aws_sdk_autoscaling::Client;
use celery_scale::ec2::{AutoScalingGroupConfig, AutoScalingGroups, AwsSettings};
use celery_scale::record::Outcome;
use celery_scale::{Binding, LoopSettings, QueueSource};
use celery_scale_testing::service as service_url;
use common::{Worker, python, python_unchecked, tick_until, unique};

const WORKERS_PER_INSTANCE: u32 = 2;

/// Deletes the test's queue and group, also on failure.
struct Cleanup {
    py: String,
    broker: String,
    queue: String,
    moto: String,
    group: String,
    launch_configuration: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = python_unchecked(
            &self.py,
            &self.broker,
            &[
                "-c",
                &format!(
                    "from app import app\nwith app.connection_for_write() as c:\n    c.default_channel.queue_delete({:?})",
                    self.queue
                ),
            ],
        );
        let (moto, group, lc) = (
            self.moto.clone(),
            self.group.clone(),
            self.launch_configuration.clone(),
        );
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async {
                let c = client(&moto);
                let _ = c
                    .delete_auto_scaling_group()
                    .auto_scaling_group_name(group)
                    .force_delete(true)
                    .send()
                    .await;
                let _ = c
                    .delete_launch_configuration()
                    .launch_configuration_name(lc)
                    .send()
                    .await;
            });
        })
        .join();
    }
}

fn sdk_config(moto: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(moto)
        .credentials_provider(
            celery_scale::ec2::aws_sdk_autoscaling::config::SharedCredentialsProvider::new(
                celery_scale::ec2::aws_sdk_autoscaling::config::Credentials::new(
                    "testing", "testing", None, None, "e2e",
                ),
            ),
        )
        .build()
}

fn client(moto: &str) -> Client {
    Client::new(&sdk_config(moto))
}

async fn group_desired(c: &Client, group: &str) -> i32 {
    c.describe_auto_scaling_groups()
        .auto_scaling_group_names(group)
        .send()
        .await
        .expect("describe on moto")
        .auto_scaling_groups()[0]
        .desired_capacity()
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_on_rabbitmq_scales_an_auto_scaling_group_out_and_back_in() {
    let (Some(amqp), Some(moto), Some(py)) = (
        service_url("CELERY_SCALE_AMQP_URL"),
        service_url("CELERY_SCALE_MOTO_URL"),
        service_url("CELERY_SCALE_PYTHON"),
    ) else {
        return;
    };
    let queue = unique("e2e-ec2");
    let group = unique("e2e-ec2-workers");
    let launch_configuration = unique("e2e-ec2-lc");
    let _cleanup = Cleanup {
        py: py.clone(),
        broker: amqp.clone(),
        queue: queue.clone(),
        moto: moto.clone(),
        group: group.clone(),
        launch_configuration: launch_configuration.clone(),
    };

    // The group: 0..=4 instances, none yet.
    let aws = client(&moto);
    aws.create_launch_configuration()
        .launch_configuration_name(&launch_configuration)
        .image_id("ami-12c6146b")
        .instance_type("t3.micro")
        .send()
        .await
        .expect("create launch configuration");
    aws.create_auto_scaling_group()
        .auto_scaling_group_name(&group)
        .launch_configuration_name(&launch_configuration)
        .min_size(0)
        .max_size(4)
        .desired_capacity(0)
        .availability_zones("us-east-1a")
        .send()
        .await
        .expect("create group");

    // A burst of 20 real Celery tasks (0.3 s each) on a fresh queue.
    python(
        &py,
        &amqp,
        &[
            "publish.py",
            "--queue",
            &queue,
            "--count",
            "20",
            "--seconds",
            "0.3",
        ],
    );

    let groups = AutoScalingGroups::from_sdk_config(
        &sdk_config(&moto),
        AwsSettings::default().cache_ttl(Duration::ZERO),
    )
    .unwrap();
    let scaler = groups
        .scaler(AutoScalingGroupConfig::new(&group).workers_per_instance(WORKERS_PER_INSTANCE))
        .unwrap();
    // One worker per 5 messages, to zero 2 s after the queue is idle.
    let policy = PolicyConfig {
        kind: PolicyKind::TargetBacklog,
        messages_per_worker: 5.0,
        min_workers: 0,
        max_workers: 8,
        stabilize_down: Duration::from_secs(2),
        scale_to_zero_after: Duration::from_secs(2),
        ..PolicyConfig::default()
    };
    let mut b = Binding::new(
        LoopSettings {
            name: "e2e-ec2".into(),
            interval: Duration::from_secs(1),
            ..LoopSettings::default()
        },
        rabbitmq_source(&amqp, &queue).await,
        Box::new(scaler),
        policy.build().unwrap(),
    )
    .unwrap();

    // 20 ready -> 4 workers -> 2 instances of 2 workers.
    let up = tick_until(&mut b, Duration::from_secs(15), "scale out", |r| {
        matches!(
            r.outcome,
            Outcome::Set {
                to: 2,
                applied: 2,
                ..
            }
        )
    })
    .await;
    let set = up.last().unwrap();
    assert_eq!(
        set.observation.as_ref().map(|o| o.ready),
        Some(20),
        "{set:?}"
    );
    assert_eq!(
        group_desired(&aws, &group).await,
        2,
        "moto has the new desired capacity"
    );

    // A real worker drains the queue; after the idle window the group returns to its minimum.
    let _worker = Worker::start(&py, &amqp, &queue, &[]);
    let down = tick_until(&mut b, Duration::from_secs(40), "scale in", |r| {
        matches!(r.outcome, Outcome::Set { to: 0, .. })
    })
    .await;
    assert!(
        down.iter().all(|r| r.capacity_error.is_none()),
        "capacity was readable throughout"
    );
    let last = down.last().unwrap();
    assert_eq!(
        last.observation.as_ref().map(|o| o.ready),
        Some(0),
        "{last:?}"
    );
    assert_eq!(group_desired(&aws, &group).await, 0, "back at MinSize");
}

/// The RabbitMQ source on `queue` (passive declares; no heartbeats: the test's own worker
/// drains the queue and the policy needs only the backlog).
async fn rabbitmq_source(amqp: &str, queue: &str) -> Box<dyn QueueSource> {
    let config = celery_scale::amqp::AmqpSourceConfig::builder(amqp)
        .queue(queue)
        .heartbeats(false)
        .build()
        .expect("AMQP source config");
    Box::new(celery_scale::amqp::AmqpQueueSource::new(config).expect("AMQP source"))
}
