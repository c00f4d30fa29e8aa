//! The core `Scaler` conformance checks and the group-bound rules, against moto's server
//! (`CELERY_SCALE_MOTO_URL`). Every test creates its own launch configuration and groups with
//! unique names, through the Auto Scaling API itself, and deletes them afterwards.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_autoscaling::Client;
use celery_scale_core::config::{PolicyConfig, PolicyKind};
use celery_scale_core::record::Outcome;
use celery_scale_core::{Binding, ErrorKind, LoopSettings, MemoryQueue, Scaler, conformance};
use celery_scale_ec2::{AutoScalingGroupConfig, AutoScalingGroups, AwsSettings};

fn moto_url() -> Option<String> {
    celery_scale_testing::service("CELERY_SCALE_MOTO_URL")
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Static test credentials: moto accepts anything, and the default chain must not wander off
/// to the instance metadata endpoint.
fn sdk_config() -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_autoscaling::config::SharedCredentialsProvider::new(
            aws_sdk_autoscaling::config::Credentials::new("testing", "testing", None, None, "test"),
        ))
        .build()
}

fn handle(url: &str, ttl: Duration) -> AutoScalingGroups {
    AutoScalingGroups::from_sdk_config(
        &sdk_config(),
        AwsSettings::default().endpoint_url(url).cache_ttl(ttl),
    )
    .unwrap()
}

/// Groups created in moto for one test; deleted on drop, even when the test fails.
struct MotoGroups {
    url: String,
    client: Client,
    launch_configuration: String,
    names: Vec<String>,
}

impl MotoGroups {
    async fn new(url: &str, groups: &AutoScalingGroups) -> Self {
        let launch_configuration = unique("celery-lc");
        groups
            .client()
            .create_launch_configuration()
            .launch_configuration_name(&launch_configuration)
            .image_id("ami-12c6146b")
            .instance_type("t3.micro")
            .send()
            .await
            .expect("create launch configuration in moto");
        MotoGroups {
            url: url.to_owned(),
            client: groups.client().clone(),
            launch_configuration,
            names: Vec::new(),
        }
    }

    async fn create(&mut self, prefix: &str, min: i32, max: i32, desired: i32) -> String {
        let name = unique(prefix);
        self.client
            .create_auto_scaling_group()
            .auto_scaling_group_name(&name)
            .launch_configuration_name(&self.launch_configuration)
            .min_size(min)
            .max_size(max)
            .desired_capacity(desired)
            .availability_zones("us-east-1a")
            .send()
            .await
            .expect("create Auto Scaling group in moto");
        self.names.push(name.clone());
        name
    }
}

impl Drop for MotoGroups {
    fn drop(&mut self) {
        // A fresh client on a fresh runtime: the test's runtime may be shutting down.
        let url = self.url.clone();
        let names = std::mem::take(&mut self.names);
        let lc = self.launch_configuration.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async {
                let groups = handle(&url, Duration::ZERO);
                let c = groups.client();
                for n in names {
                    let _ = c
                        .delete_auto_scaling_group()
                        .auto_scaling_group_name(n)
                        .force_delete(true)
                        .send()
                        .await;
                }
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

#[tokio::test]
async fn asg_on_moto_passes_the_scaler_conformance_checks() {
    let Some(url) = moto_url() else { return };
    let groups = handle(&url, Duration::ZERO);
    let mut moto = MotoGroups::new(&url, &groups).await;
    let name = moto.create("celery-conf", 0, 5, 1).await;
    let scaler = groups
        .scaler(AutoScalingGroupConfig::new(&name).workers_per_instance(3))
        .unwrap();
    conformance::scaler(&scaler, 1, 4).await;

    // moto launches instances at once: they read as running, none pending.
    scaler.set_desired(2).await.unwrap();
    let c = scaler.capacity().await.unwrap();
    assert_eq!((c.desired, c.running, c.pending), (2, 2, 0));
    assert_eq!(scaler.workers_per_unit().get(), 3);
}

#[tokio::test]
async fn a_missing_group_is_a_dead_scaler() {
    let Some(url) = moto_url() else { return };
    let groups = handle(&url, Duration::ZERO);
    let scaler = groups
        .scaler(AutoScalingGroupConfig::new(unique("celery-missing")))
        .unwrap();
    conformance::dead_scaler(&scaler).await;
    let e = scaler.capacity().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(!e.is_transient());
    assert_eq!(
        groups.set_calls(),
        0,
        "nothing is set on a group that does not exist"
    );
}

#[tokio::test]
async fn values_outside_the_group_bounds_are_clamped_recorded_and_never_sent() {
    let Some(url) = moto_url() else { return };
    let groups = handle(&url, Duration::ZERO);
    let mut moto = MotoGroups::new(&url, &groups).await;
    let name = moto.create("celery-bounds", 1, 3, 2).await;
    let scaler = groups.scaler(AutoScalingGroupConfig::new(&name)).unwrap();

    // moto itself would accept 7 (it does not enforce MaxSize): the clamp is ours.
    let out = scaler.set_desired(7).await.unwrap();
    assert_eq!((out.requested, out.applied), (7, 3));
    assert!(
        out.note.as_deref().is_some_and(|n| n.contains("1..3")),
        "{out:?}"
    );
    assert_eq!(scaler.capacity().await.unwrap().desired, 3);
    let sent = groups.set_calls();

    // Already at MaxSize: asking for more sends nothing.
    let out = scaler.set_desired(9).await.unwrap();
    assert_eq!(out.applied, 3);
    assert!(out.note.is_some());
    assert_eq!(
        groups.set_calls(),
        sent,
        "a clamped value equal to desired is not sent"
    );

    let out = scaler.set_desired(0).await.unwrap();
    assert_eq!(
        (out.requested, out.applied),
        (0, 1),
        "clamped up to MinSize"
    );
    assert_eq!(scaler.capacity().await.unwrap().desired, 1);

    // Through the loop: the decision record carries the clamp.
    let queue = MemoryQueue::new();
    queue.publish_n("celery", 100);
    let policy = PolicyConfig {
        kind: PolicyKind::TargetBacklog,
        messages_per_worker: 10.0,
        max_workers: 20,
        ..PolicyConfig::default()
    };
    let mut b = Binding::new(
        LoopSettings {
            name: "bounds".into(),
            ..LoopSettings::default()
        },
        Box::new(queue),
        Box::new(scaler.clone()),
        policy.build().unwrap(),
    )
    .unwrap();
    let r = b.tick().await;
    match &r.outcome {
        Outcome::Set {
            from: 1,
            to: 10,
            applied: 3,
            note: Some(note),
        } => assert!(note.contains(&name), "{note}"),
        other => panic!("expected a set clamped to 3, got {other:?}"),
    }
    assert_eq!(scaler.capacity().await.unwrap().desired, 3);
}

#[tokio::test]
async fn fifty_five_groups_are_read_in_two_calls() {
    let Some(url) = moto_url() else { return };
    let groups = handle(&url, Duration::ZERO);
    let mut moto = MotoGroups::new(&url, &groups).await;
    let mut names = Vec::new();
    for i in 0..55 {
        names.push(moto.create("celery-many", 0, 4, i % 2).await);
    }
    let scalers: Vec<_> = names
        .iter()
        .map(|n| groups.scaler(AutoScalingGroupConfig::new(n)).unwrap())
        .collect();
    let before = groups.describe_calls();
    let caps = futures::future::join_all(scalers.iter().map(|s| s.capacity())).await;
    for (i, c) in caps.into_iter().enumerate() {
        let c = c.unwrap_or_else(|e| panic!("{}: {e}", names[i]));
        assert_eq!(c.desired, (i % 2) as u32, "{}", names[i]);
        assert_eq!(c.running, c.desired);
    }
    assert_eq!(
        groups.describe_calls() - before,
        2,
        "55 concurrent reads: one round of two calls (50 + 5 names)"
    );
}
