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

/// The group's instances as (id, protected), in the order moto lists them (the order it picks
/// instances to terminate on a scale-in: the first unprotected ones go).
async fn instances(groups: &AutoScalingGroups, name: &str) -> Vec<(String, bool)> {
    let out = groups
        .client()
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
        .expect("describe the group in moto");
    out.auto_scaling_groups()[0]
        .instances()
        .iter()
        .map(|i| {
            (
                i.instance_id().unwrap().to_owned(),
                i.protected_from_scale_in() == Some(true),
            )
        })
        .collect()
}

/// One Celery worker node per instance, named `celery@<instance id>`, executing `busy[i]`.
fn worker_nodes(ids: &[String], busy: &[u64]) -> Vec<celery_scale_core::celery_events::WorkerNode> {
    ids.iter()
        .zip(busy)
        .map(|(id, n)| celery_scale_core::celery_events::WorkerNode {
            hostname: format!("celery@{id}"),
            executing: *n,
            last_beat: None,
        })
        .collect()
}

/// A binding on an empty queue that scales in at once: the desired count follows the
/// executing tasks.
fn protection_binding(
    queue: &MemoryQueue,
    scaler: celery_scale_ec2::AutoScalingGroupScaler,
) -> Binding {
    let policy = PolicyConfig {
        kind: PolicyKind::TargetBacklog,
        messages_per_worker: 5.0,
        max_workers: 20,
        stabilize_down: Duration::ZERO,
        scale_to_zero_after: Duration::ZERO,
        ..PolicyConfig::default()
    };
    Binding::new(
        LoopSettings {
            name: "protect".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            ..LoopSettings::default()
        },
        Box::new(queue.clone()),
        Box::new(scaler),
        policy.build().unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn the_busy_instance_survives_the_scale_in_and_is_released_once_idle() {
    let Some(url) = moto_url() else { return };
    let groups = handle(&url, Duration::ZERO);
    let mut moto = MotoGroups::new(&url, &groups).await;

    // Without protection: moto, like Auto Scaling, picks the victims itself; the first listed
    // instance, the busy one here, is terminated.
    let name = moto.create("celery-unprotected", 0, 5, 3).await;
    let ids: Vec<String> = instances(&groups, &name)
        .await
        .into_iter()
        .map(|i| i.0)
        .collect();
    assert_eq!(ids.len(), 3);
    let queue = MemoryQueue::new();
    queue.declare("celery");
    queue.set_worker_nodes(worker_nodes(&ids, &[1, 0, 0]));
    let scaler = groups.scaler(AutoScalingGroupConfig::new(&name)).unwrap();
    assert!(scaler.protection().is_none(), "protection is opt-in");
    let r = protection_binding(&queue, scaler).tick().await;
    assert!(
        matches!(r.outcome, Outcome::Set { from: 3, to: 1, .. }),
        "{r:?}"
    );
    let left = instances(&groups, &name).await;
    assert_eq!(left.len(), 1);
    assert_ne!(
        left[0].0, ids[0],
        "without protection the busy instance is terminated"
    );

    // With protection: the busy instance is protected first, the two idle ones go.
    let name = moto.create("celery-protected", 0, 5, 3).await;
    let ids: Vec<String> = instances(&groups, &name)
        .await
        .into_iter()
        .map(|i| i.0)
        .collect();
    let busy = ids[0].clone();
    queue.set_worker_nodes(worker_nodes(&ids, &[1, 0, 0]));
    let scaler = groups
        .scaler(AutoScalingGroupConfig::new(&name).protect_busy_units(true))
        .unwrap();
    let mut b = protection_binding(&queue, scaler.clone());
    let r = b.tick().await;
    let protection = r.protection.clone().unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(protection.plan.protect, [busy.as_str()], "{r:?}");
    assert!(protection.applied, "{r:?}");
    assert!(
        matches!(r.outcome, Outcome::Set { from: 3, to: 1, .. }),
        "{r:?}"
    );
    assert_eq!(
        instances(&groups, &name).await,
        [(busy.clone(), true)],
        "the busy instance survives, protected; the idle ones are terminated"
    );
    assert_eq!(groups.protection_calls(), 1);

    // Its worker goes idle: it is released before the drop to zero, and then terminated.
    queue.set_worker_nodes(worker_nodes(&ids[..1], &[0]));
    let r = b.tick().await;
    let protection = r.protection.clone().unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(protection.plan.release, [busy.as_str()], "{r:?}");
    assert!(protection.plan.protect.is_empty());
    assert!(protection.applied);
    assert!(
        matches!(r.outcome, Outcome::Set { from: 1, to: 0, .. }),
        "{r:?}"
    );
    assert!(
        instances(&groups, &name).await.is_empty(),
        "released, then terminated"
    );
    assert_eq!(scaler.capacity().await.unwrap().desired, 0);
}

#[tokio::test]
async fn protection_is_released_once_idle_while_the_group_stays_at_its_minimum() {
    let Some(url) = moto_url() else { return };
    let groups = handle(&url, Duration::ZERO);
    let mut moto = MotoGroups::new(&url, &groups).await;
    // MinSize 2: the idle drop is clamped, the instances stay, so their protection can be read.
    let name = moto.create("celery-release", 2, 5, 4).await;
    let ids: Vec<String> = instances(&groups, &name)
        .await
        .into_iter()
        .map(|i| i.0)
        .collect();
    let queue = MemoryQueue::new();
    queue.declare("celery");
    // Two busy, on the instances moto would terminate first.
    queue.set_worker_nodes(worker_nodes(&ids, &[1, 1, 0, 0]));
    let scaler = groups
        .scaler(AutoScalingGroupConfig::new(&name).protect_busy_units(true))
        .unwrap();
    let mut b = protection_binding(&queue, scaler.clone());
    let r = b.tick().await;
    assert!(
        matches!(r.outcome, Outcome::Set { from: 4, to: 2, .. }),
        "{r:?}"
    );
    let mut left = instances(&groups, &name).await;
    left.sort();
    let mut want = vec![(ids[0].clone(), true), (ids[1].clone(), true)];
    want.sort();
    assert_eq!(left, want, "both busy instances stay, protected");

    // One goes idle: only it is released; the other stays protected.
    queue.set_worker_nodes(worker_nodes(&ids[..2], &[0, 1]));
    let r = b.tick().await;
    let p = r.protection.clone().unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(p.plan.release, [ids[0].clone()], "{r:?}");
    let got: std::collections::BTreeMap<String, bool> =
        instances(&groups, &name).await.into_iter().collect();
    assert_eq!(got.get(&ids[0]), Some(&false), "released once idle");
    assert_eq!(got.get(&ids[1]), Some(&true), "still busy: still protected");
    assert_eq!(scaler.capacity().await.unwrap().desired, 2, "MinSize holds");

    // The units the scaler reports agree with moto's.
    let units = celery_scale_core::protection::UnitProtection::units(&scaler)
        .await
        .unwrap();
    let read: std::collections::BTreeMap<String, bool> =
        units.into_iter().map(|u| (u.id, u.protected)).collect();
    assert_eq!(read, got);
}

/// A child process killed (with its process group) when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `testing/celery/ec2_protect.py`, the worker-side recipe, with a real Celery worker named
/// after a moto instance: protected while the task runs, released once idle; after the release
/// the instance is terminated by a scale-in, and the recipe stops the worker consuming before it
/// takes new work, then exits.
#[tokio::test]
async fn the_worker_side_recipe_stops_consuming_once_its_released_instance_is_terminating() {
    use celery_scale_testing::{Services, WorkerCommand, celery_dir, publish_script, wait_for};
    let Some(services) = Services::get() else {
        return;
    };
    let groups = handle(&services.moto, Duration::ZERO);
    let mut moto = MotoGroups::new(&services.moto, &groups).await;
    let name = moto.create("celery-recipe", 0, 2, 1).await;
    let id = instances(&groups, &name).await[0].0.clone();
    let node = format!("celery@{id}");

    // Its own keys and channels on Redis: a unique global_keyprefix.
    let broker = services.redis_db(0);
    let prefix = format!("{}:", unique("ec2-recipe"));
    let options = serde_json::json!({ "global_keyprefix": prefix });
    let queue = "recipe";
    let worker = WorkerCommand::new(&services.python, &broker)
        .queues(queue)
        .name(&node)
        .concurrency(1)
        .transport_options(&options)
        .spawn();
    let log = std::env::temp_dir().join(format!("{}.log", unique("ec2-protect")));
    let out = std::fs::File::create(&log).unwrap();
    let mut recipe = Child(
        std::process::Command::new(&services.python)
            .arg("ec2_protect.py")
            .args(["--group", &name, "--node", &node, "--instance-id", &id])
            .args(["--every", "0.5", "--idle-checks", "2"])
            .current_dir(celery_dir())
            .env("PYTHONPATH", celery_dir())
            .env("CELERY_SCALE_TEST_BROKER", &broker)
            .env("CELERY_SCALE_TEST_OPTIONS", options.to_string())
            .envs(services.aws_env())
            .stdout(out)
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start ec2_protect.py"),
    );
    let lines = || std::fs::read_to_string(&log).unwrap_or_default();
    let protected_now = |groups: AutoScalingGroups, name: String| async move {
        instances(&groups, &name).await.first().map(|i| i.1)
    };
    let none = serde_json::json!({});
    let publish = |seconds: &str| {
        publish_script(
            "publish.py",
            &services.python,
            &broker,
            &options,
            &none,
            &["--queue", queue, "--count", "1", "--seconds", seconds],
        )
    };

    // The worker is up, then takes a task.
    wait_for(
        Duration::from_secs(30),
        "the worker is ready",
        || worker.log_tail().contains(" ready.").then_some(()),
        || worker.log_tail(),
    );
    publish("6");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while protected_now(groups.clone(), name.clone()).await != Some(true) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never protected while busy: {}",
            lines()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while protected_now(groups.clone(), name.clone()).await != Some(false) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never released once idle: {}",
            lines()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Released: a scale-in takes the instance; the recipe stops the worker consuming and exits.
    groups
        .client()
        .set_desired_capacity()
        .auto_scaling_group_name(&name)
        .desired_capacity(0)
        .send()
        .await
        .unwrap();
    let status = wait_for(
        Duration::from_secs(20),
        "the recipe exits once the instance is leaving",
        || recipe.0.try_wait().unwrap(),
        lines,
    );
    assert!(status.success(), "{}", lines());
    let last: serde_json::Value = serde_json::from_str(lines().lines().last().unwrap()).unwrap();
    assert_eq!(last["consuming"], false, "{last}");
    assert_eq!(last["queues"], serde_json::json!([queue]), "{last}");

    // New work stays in the queue: the worker no longer takes any.
    publish("0");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let size = celery_scale_testing::python(
        &services.python,
        &broker,
        &[
            "-c",
            &format!(
                "from app import app\nwith app.connection() as c:\n    print(c.default_channel._size('{queue}'))"
            ),
        ],
        &[("CELERY_SCALE_TEST_OPTIONS", options.to_string())],
    );
    assert_eq!(
        size.trim(),
        "1",
        "the task published after the stop was not taken"
    );
    drop(worker);
    celery_scale_testing::python(
        &services.python,
        &broker,
        &[
            "-c",
            &format!(
                "import os, redis\nr = redis.Redis.from_url(os.environ['CELERY_SCALE_TEST_BROKER'])\nfor k in r.scan_iter(match='{prefix}*'):\n    r.delete(k)"
            ),
        ],
        &[],
    );
}
