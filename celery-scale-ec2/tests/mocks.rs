//! Every typed error, answered by aws-smithy-mocks (and, for timeouts and wire-level error
//! envelopes, a scripted local HTTP endpoint), driven through the real control loop: the loop
//! holds, never scales in on a fault, backs off on transient errors and recovers on the next
//! good answer. Also: lifecycle-state counting, clamping, batching and pagination.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_autoscaling::Client;
use aws_sdk_autoscaling::config::retry::RetryConfig;
use aws_sdk_autoscaling::error::ErrorMetadata;
use aws_sdk_autoscaling::operation::describe_auto_scaling_groups::{
    DescribeAutoScalingGroupsError, DescribeAutoScalingGroupsOutput,
};
use aws_sdk_autoscaling::operation::set_desired_capacity::{
    SetDesiredCapacityError, SetDesiredCapacityOutput,
};
use aws_sdk_autoscaling::types::error::{ResourceContentionFault, ScalingActivityInProgressFault};
use aws_sdk_autoscaling::types::{AutoScalingGroup, Instance, LifecycleState};
use aws_smithy_mocks::{Rule, RuleMode, mock, mock_client};
use celery_scale_core::config::{PolicyConfig, PolicyKind};
use celery_scale_core::record::{DecisionRecord, Outcome};
use celery_scale_core::{Binding, CapacityUnit, ErrorKind, LoopSettings, MemoryQueue, Scaler};
use celery_scale_ec2::{
    AutoScalingGroupConfig, AutoScalingGroups, AwsError, AwsSettings, Ec2Error, GroupSnapshot,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const GROUP: &str = "celery-workers";
const INTERVAL: Duration = Duration::from_secs(1);

fn instance(id: &str, state: LifecycleState) -> Instance {
    Instance::builder()
        .instance_id(id)
        .lifecycle_state(state)
        .availability_zone("us-east-1a")
        .health_status("Healthy")
        .protected_from_scale_in(false)
        .build()
}

/// A group with `desired` instances, all `InService`.
fn group(name: &str, min: i32, max: i32, desired: i32) -> AutoScalingGroup {
    let mut g = AutoScalingGroup::builder()
        .auto_scaling_group_name(name)
        .min_size(min)
        .max_size(max)
        .desired_capacity(desired);
    for i in 0..desired {
        g = g.instances(instance(
            &format!("i-{name}-{i}"),
            LifecycleState::InService,
        ));
    }
    g.build()
}

fn describe_ok(min: i32, max: i32, desired: i32) -> DescribeAutoScalingGroupsOutput {
    DescribeAutoScalingGroupsOutput::builder()
        .auto_scaling_groups(group(GROUP, min, max, desired))
        .build()
}

fn generic_describe(code: &str, message: &str) -> DescribeAutoScalingGroupsError {
    DescribeAutoScalingGroupsError::generic(
        ErrorMetadata::builder().code(code).message(message).build(),
    )
}

fn generic_set(code: &str, message: &str) -> SetDesiredCapacityError {
    SetDesiredCapacityError::generic(ErrorMetadata::builder().code(code).message(message).build())
}

/// A handle on a mock client (no SDK retries: one mocked answer per call) that reads fresh
/// every time (cache TTL 0).
fn groups_with(rules: &[&Rule]) -> AutoScalingGroups {
    let client: Client = mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, rules, |c| c
        .retry_config(RetryConfig::disabled()));
    AutoScalingGroups::new(client, AwsSettings::default().cache_ttl(Duration::ZERO)).unwrap()
}

fn settings() -> LoopSettings {
    LoopSettings {
        name: "ec2-mock".into(),
        interval: INTERVAL,
        timeout: Duration::from_secs(3),
        max_staleness: Duration::from_secs(30),
        max_backoff: Duration::from_secs(8),
        dry_run: false,
    }
}

/// One worker per five messages, scale in at once (no stabilization window).
fn policy() -> PolicyConfig {
    PolicyConfig {
        kind: PolicyKind::TargetBacklog,
        messages_per_worker: 5.0,
        min_workers: 0,
        max_workers: 100,
        stabilize_down: Duration::ZERO,
        scale_to_zero_after: Duration::ZERO,
        ..PolicyConfig::default()
    }
}

fn binding(groups: &AutoScalingGroups, queue: &MemoryQueue) -> Binding {
    let scaler = groups
        .scaler(AutoScalingGroupConfig::new(GROUP).workers_per_instance(2))
        .unwrap();
    Binding::new(
        settings(),
        Box::new(queue.clone()),
        Box::new(scaler),
        policy().build().unwrap(),
    )
    .unwrap()
}

fn empty_queue() -> MemoryQueue {
    let q = MemoryQueue::new();
    q.declare("celery");
    q
}

/// A record whose capacity read failed: held, nothing set, the error kind and transience
/// recorded, and the next tick delayed (doubled) only for a transient error.
fn assert_held(r: &DecisionRecord, kind: ErrorKind, transient: bool, what: &str) {
    assert!(
        matches!(r.outcome, Outcome::Held { .. }),
        "{what}: a failed capacity read must hold, got {:?}",
        r.outcome
    );
    let e = r
        .capacity_error
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: capacity_error must be recorded"));
    assert_eq!(e.kind, kind, "{what}: {}", e.message);
    assert_eq!(e.transient, transient, "{what}: {}", e.message);
    assert!(r.decision.is_none(), "{what}: no decision without capacity");
    if transient {
        assert!(r.next_tick_in >= INTERVAL * 2, "{what}: backs off");
    } else {
        assert_eq!(r.next_tick_in, INTERVAL, "{what}: no backoff");
    }
}

/// Capacity-read faults: the loop holds (the empty queue would otherwise scale 3 instances in),
/// and the next good answer scales in as it should.
async fn describe_fault_holds_then_recovers(
    fault: impl Fn() -> DescribeAutoScalingGroupsError + Send + Sync + 'static,
    kind: ErrorKind,
    transient: bool,
    what: &str,
) {
    let describe = mock!(Client::describe_auto_scaling_groups)
        .sequence()
        .error(fault)
        .output(|| describe_ok(0, 10, 3))
        .repeatedly()
        .build();
    let set = mock!(Client::set_desired_capacity)
        .match_requests(|r| r.auto_scaling_group_name() == Some(GROUP))
        .then_output(|| SetDesiredCapacityOutput::builder().build());
    let groups = groups_with(&[&describe, &set]);
    let mut b = binding(&groups, &empty_queue());

    let r = b.tick().await;
    assert_held(&r, kind, transient, what);
    if transient {
        assert_eq!(
            r.next_tick_in,
            INTERVAL * 2,
            "{what}: first backoff doubles"
        );
    }
    assert_eq!(set.num_calls(), 0, "{what}: a fault must never scale in");

    let r = b.tick().await;
    assert!(r.capacity_error.is_none(), "{what}: recovered");
    assert_eq!(
        r.outcome,
        Outcome::Set {
            from: 3,
            to: 0,
            applied: 0,
            note: None
        },
        "{what}: the next good answer scales in"
    );
    assert_eq!(r.next_tick_in, INTERVAL, "{what}: backoff resets");
    assert_eq!(set.num_calls(), 1);
}

#[tokio::test]
async fn throttled_describe_holds_backs_off_and_recovers() {
    describe_fault_holds_then_recovers(
        || generic_describe("Throttling", "Rate exceeded"),
        ErrorKind::Throttled,
        true,
        "Throttling",
    )
    .await;
}

#[tokio::test]
async fn access_denied_holds_without_backoff_and_recovers() {
    describe_fault_holds_then_recovers(
        || {
            generic_describe(
                "AccessDenied",
                "User is not authorized to perform: autoscaling:DescribeAutoScalingGroups",
            )
        },
        ErrorKind::PermissionDenied,
        false,
        "AccessDenied",
    )
    .await;
}

#[tokio::test]
async fn resource_contention_on_describe_is_transient() {
    describe_fault_holds_then_recovers(
        || {
            DescribeAutoScalingGroupsError::ResourceContentionFault(
                ResourceContentionFault::builder()
                    .message("pending update")
                    .build(),
            )
        },
        ErrorKind::Rejected,
        true,
        "ResourceContention",
    )
    .await;
}

#[tokio::test]
async fn validation_error_on_describe_is_permanent() {
    describe_fault_holds_then_recovers(
        || generic_describe("ValidationError", "1 validation error detected"),
        ErrorKind::Rejected,
        false,
        "ValidationError",
    )
    .await;
}

#[tokio::test]
async fn server_error_holds_and_backs_off() {
    let describe = mock!(Client::describe_auto_scaling_groups)
        .sequence()
        .http_status(503, None)
        .output(|| describe_ok(0, 10, 3))
        .repeatedly()
        .build();
    let set = mock!(Client::set_desired_capacity)
        .then_output(|| SetDesiredCapacityOutput::builder().build());
    let groups = groups_with(&[&describe, &set]);
    let mut b = binding(&groups, &empty_queue());
    let r = b.tick().await;
    assert_held(&r, ErrorKind::Other, true, "HTTP 503");
    assert_eq!(set.num_calls(), 0);
    let r = b.tick().await;
    assert!(
        matches!(r.outcome, Outcome::Set { to: 0, .. }),
        "{:?}",
        r.outcome
    );
}

#[tokio::test]
async fn missing_group_holds_and_recovers_once_created() {
    let describe = mock!(Client::describe_auto_scaling_groups)
        .sequence()
        .output(|| DescribeAutoScalingGroupsOutput::builder().build())
        .output(|| describe_ok(0, 10, 3))
        .repeatedly()
        .build();
    let set = mock!(Client::set_desired_capacity)
        .then_output(|| SetDesiredCapacityOutput::builder().build());
    let groups = groups_with(&[&describe, &set]);
    let mut b = binding(&groups, &empty_queue());
    let r = b.tick().await;
    assert_held(&r, ErrorKind::NotFound, false, "missing group");
    assert!(
        r.capacity_error.as_ref().unwrap().message.contains(GROUP),
        "the error names the group"
    );
    assert_eq!(set.num_calls(), 0);
    let r = b.tick().await;
    assert!(
        matches!(r.outcome, Outcome::Set { to: 0, .. }),
        "{:?}",
        r.outcome
    );
}

/// Set faults: the loop wants to scale out (50 messages, 2 workers per instance: 5 instances),
/// the set fails and is recorded; the next tick sets.
async fn set_fault_then_recovers(
    fault: impl Fn() -> SetDesiredCapacityError + Send + Sync + 'static,
    kind: ErrorKind,
    transient: bool,
    what: &str,
) {
    let describe =
        mock!(Client::describe_auto_scaling_groups).then_output(|| describe_ok(1, 10, 1));
    let set = mock!(Client::set_desired_capacity)
        .match_requests(|r| r.desired_capacity() == Some(5) && r.honor_cooldown() == Some(false))
        .sequence()
        .error(fault)
        .output(|| SetDesiredCapacityOutput::builder().build())
        .repeatedly()
        .build();
    let groups = groups_with(&[&describe, &set]);
    let queue = empty_queue();
    queue.publish_n("celery", 50);
    let mut b = binding(&groups, &queue);

    let r = b.tick().await;
    match &r.outcome {
        Outcome::SetFailed { to, error } => {
            assert_eq!(*to, 5, "{what}");
            assert_eq!(error.kind, kind, "{what}: {}", error.message);
            assert_eq!(error.transient, transient, "{what}: {}", error.message);
        }
        other => panic!("{what}: expected SetFailed, got {other:?}"),
    }
    let expected = if transient { INTERVAL * 2 } else { INTERVAL };
    assert_eq!(r.next_tick_in, expected, "{what}: backoff");

    let r = b.tick().await;
    assert_eq!(
        r.outcome,
        Outcome::Set {
            from: 1,
            to: 5,
            applied: 5,
            note: None
        },
        "{what}: recovers on the next good answer"
    );
    assert_eq!(set.num_calls(), 2);
}

#[tokio::test]
async fn scaling_activity_in_progress_backs_off_and_recovers() {
    set_fault_then_recovers(
        || {
            SetDesiredCapacityError::ScalingActivityInProgressFault(
                ScalingActivityInProgressFault::builder()
                    .message("Scaling activity is in progress")
                    .build(),
            )
        },
        ErrorKind::Rejected,
        true,
        "ScalingActivityInProgress",
    )
    .await;
}

#[tokio::test]
async fn resource_contention_on_set_backs_off_and_recovers() {
    set_fault_then_recovers(
        || {
            SetDesiredCapacityError::ResourceContentionFault(
                ResourceContentionFault::builder()
                    .message("You already have a pending update")
                    .build(),
            )
        },
        ErrorKind::Rejected,
        true,
        "ResourceContention",
    )
    .await;
}

#[tokio::test]
async fn throttled_set_backs_off_and_recovers() {
    set_fault_then_recovers(
        || generic_set("Throttling", "Rate exceeded"),
        ErrorKind::Throttled,
        true,
        "Throttling on set",
    )
    .await;
}

#[tokio::test]
async fn validation_error_on_set_is_permanent() {
    set_fault_then_recovers(
        || {
            generic_set(
                "ValidationError",
                "New SetDesiredCapacity value 5 is above max value 4",
            )
        },
        ErrorKind::Rejected,
        false,
        "ValidationError on set",
    )
    .await;
}

#[tokio::test]
async fn access_denied_on_set_is_permanent() {
    set_fault_then_recovers(
        || {
            generic_set(
                "AccessDenied",
                "not authorized to perform autoscaling:SetDesiredCapacity",
            )
        },
        ErrorKind::PermissionDenied,
        false,
        "AccessDenied on set",
    )
    .await;
}

#[tokio::test]
async fn typed_errors_are_the_crate_enum() {
    let describe = mock!(Client::describe_auto_scaling_groups)
        .sequence()
        .error(|| generic_describe("Throttling", "Rate exceeded"))
        .error(|| generic_describe("AccessDenied", "no"))
        .output(|| DescribeAutoScalingGroupsOutput::builder().build())
        .build();
    let groups = groups_with(&[&describe]);
    let transient = |e: &Ec2Error| celery_scale_core::Error::from(e.clone()).is_transient();
    let e = groups.snapshot(GROUP).await.unwrap_err();
    assert!(
        matches!(e, Ec2Error::Aws(AwsError::Throttled { ref code, .. }) if code == "Throttling"),
        "{e:?}"
    );
    assert!(transient(&e));
    let e = groups.snapshot(GROUP).await.unwrap_err();
    assert!(
        matches!(e, Ec2Error::Aws(AwsError::PermissionDenied { .. })),
        "{e:?}"
    );
    assert!(!transient(&e));
    let e = groups.snapshot(GROUP).await.unwrap_err();
    assert!(
        matches!(e, Ec2Error::GroupNotFound { ref group } if group == GROUP),
        "{e:?}"
    );
    assert!(!transient(&e));
}

#[tokio::test]
async fn capacity_counts_instances_by_lifecycle_state() {
    use LifecycleState as L;
    let states = [
        L::InService,
        L::InService,
        L::Pending,
        L::PendingWait,
        L::PendingProceed,
        L::Terminating,
        L::TerminatingWait,
        L::Standby,
        L::Detaching,
    ];
    let describe = mock!(Client::describe_auto_scaling_groups).then_output(move || {
        let mut g = AutoScalingGroup::builder()
            .auto_scaling_group_name(GROUP)
            .min_size(0)
            .max_size(10)
            .desired_capacity(5);
        for (i, s) in states.iter().enumerate() {
            g = g.instances(instance(&format!("i-{i}"), s.clone()));
        }
        DescribeAutoScalingGroupsOutput::builder()
            .auto_scaling_groups(g.build())
            .build()
    });
    let groups = groups_with(&[&describe]);
    let scaler = groups
        .scaler(AutoScalingGroupConfig::new(GROUP).workers_per_instance(4))
        .unwrap();
    assert_eq!(scaler.unit(), CapacityUnit::Ec2Instance);
    assert_eq!(scaler.workers_per_unit().get(), 4);
    let c = scaler.capacity().await.unwrap();
    assert_eq!((c.desired, c.running, c.pending), (5, 2, 3));
    let snap = groups.snapshot(GROUP).await.unwrap();
    assert_eq!((snap.terminating, snap.other), (2, 2));
}

#[tokio::test]
async fn weighted_instances_count_their_weight_and_other_capacity_types_are_refused() {
    let describe = mock!(Client::describe_auto_scaling_groups)
        .sequence()
        .output(|| {
            let g = AutoScalingGroup::builder()
                .auto_scaling_group_name(GROUP)
                .min_size(0)
                .max_size(10)
                .desired_capacity(6)
                .instances(
                    Instance::builder()
                        .instance_id("i-big")
                        .lifecycle_state(LifecycleState::InService)
                        .weighted_capacity("4")
                        .build(),
                )
                .instances(
                    Instance::builder()
                        .instance_id("i-small")
                        .lifecycle_state(LifecycleState::Pending)
                        .weighted_capacity("2")
                        .build(),
                )
                .build();
            DescribeAutoScalingGroupsOutput::builder()
                .auto_scaling_groups(g)
                .build()
        })
        .output(|| {
            let g = AutoScalingGroup::builder()
                .auto_scaling_group_name(GROUP)
                .min_size(0)
                .max_size(64)
                .desired_capacity(8)
                .desired_capacity_type("vcpu")
                .build();
            DescribeAutoScalingGroupsOutput::builder()
                .auto_scaling_groups(g)
                .build()
        })
        .build();
    let groups = groups_with(&[&describe]);
    let scaler = groups.scaler(AutoScalingGroupConfig::new(GROUP)).unwrap();
    let c = scaler.capacity().await.unwrap();
    assert_eq!((c.desired, c.running, c.pending), (6, 4, 2));
    let e = scaler.capacity().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("vcpu"), "{e}");
}

#[tokio::test]
async fn out_of_bounds_values_are_clamped_recorded_and_never_sent() {
    // The group is at its maximum (3): asking for 7 clamps to 3 and sends nothing.
    let describe = mock!(Client::describe_auto_scaling_groups)
        .sequence()
        .output(|| describe_ok(1, 3, 3))
        .output(|| describe_ok(1, 3, 2))
        .repeatedly()
        .build();
    let set = mock!(Client::set_desired_capacity).then_compute_output(|r| {
        assert!(
            matches!(r.desired_capacity(), Some(1..=3)),
            "a value outside MinSize..MaxSize was sent: {r:?}"
        );
        SetDesiredCapacityOutput::builder().build()
    });
    let groups = groups_with(&[&describe, &set]);
    let scaler = groups.scaler(AutoScalingGroupConfig::new(GROUP)).unwrap();

    let out = scaler.set_desired(7).await.unwrap();
    assert_eq!((out.requested, out.applied), (7, 3));
    let note = out.note.expect("the clamp is recorded");
    assert!(note.contains("1..3") && note.contains(GROUP), "{note}");
    assert_eq!(set.num_calls(), 0, "3 is already desired: nothing is sent");

    // Through the loop: 500 messages want 100 instances; the record shows the clamp.
    let queue = empty_queue();
    queue.publish_n("celery", 500);
    let mut b = Binding::new(
        settings(),
        Box::new(queue),
        Box::new(scaler.clone()),
        policy().build().unwrap(),
    )
    .unwrap();
    let r = b.tick().await;
    match &r.outcome {
        Outcome::Set {
            from: 2,
            to: 100,
            applied: 3,
            note: Some(note),
        } => assert!(note.contains("clamped to 3"), "{note}"),
        other => panic!("expected a clamped set from 2, got {other:?}"),
    }
    assert_eq!(set.num_calls(), 1, "the clamped value 3 was sent once");

    let out = scaler.set_desired(0).await.unwrap();
    assert_eq!(
        (out.requested, out.applied),
        (0, 1),
        "clamped up to MinSize"
    );
    assert_eq!(set.num_calls(), 2);
}

#[tokio::test]
async fn unchanged_desired_is_not_sent() {
    let describe = mock!(Client::describe_auto_scaling_groups).then_output(|| describe_ok(0, 5, 2));
    let set = mock!(Client::set_desired_capacity)
        .then_output(|| SetDesiredCapacityOutput::builder().build());
    let groups = groups_with(&[&describe, &set]);
    let scaler = groups.scaler(AutoScalingGroupConfig::new(GROUP)).unwrap();
    let out = scaler.set_desired(2).await.unwrap();
    assert_eq!((out.applied, out.note), (2, None));
    assert_eq!(set.num_calls(), 0);
    assert_eq!(groups.set_calls(), 0);
}

#[tokio::test]
async fn honor_cooldown_is_passed_when_configured() {
    let describe = mock!(Client::describe_auto_scaling_groups).then_output(|| describe_ok(0, 5, 1));
    let set = mock!(Client::set_desired_capacity)
        .match_requests(|r| r.honor_cooldown() == Some(true) && r.desired_capacity() == Some(2))
        .then_output(|| SetDesiredCapacityOutput::builder().build());
    let groups = groups_with(&[&describe, &set]);
    let scaler = groups
        .scaler(AutoScalingGroupConfig::new(GROUP).honor_cooldown(true))
        .unwrap();
    scaler.set_desired(2).await.unwrap();
    assert_eq!(set.num_calls(), 1);
}

#[tokio::test]
async fn many_groups_are_described_fifty_names_a_call_with_next_token() {
    // Echo the asked names back as groups; the first call of each chunk returns only the
    // first half and a NextToken, so pagination is followed too.
    // (names asked, next token) per call.
    type CallLog = Arc<Mutex<Vec<(usize, Option<String>)>>>;
    let seen: CallLog = Arc::default();
    let log = seen.clone();
    let describe = mock!(Client::describe_auto_scaling_groups).then_compute_output(move |r| {
        let names = r.auto_scaling_group_names();
        log.lock()
            .unwrap()
            .push((names.len(), r.next_token().map(str::to_owned)));
        let half = names.len() / 2;
        let (page, token) = match r.next_token() {
            None => (&names[..half], Some("page-2")),
            Some(_) => (&names[half..], None),
        };
        let mut out = DescribeAutoScalingGroupsOutput::builder();
        for n in page {
            out = out.auto_scaling_groups(group(n, 0, 10, 1));
        }
        if let Some(t) = token {
            out = out.next_token(t);
        }
        out.build()
    });
    // The mock answers without yielding, so concurrent reads do not overlap: a TTL makes the
    // one round serve them all (real overlap is tested against a slow endpoint below).
    let client: Client = mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, &[&describe], |c| c
        .retry_config(RetryConfig::disabled()));
    let groups = AutoScalingGroups::new(
        client,
        AwsSettings::default().cache_ttl(Duration::from_secs(60)),
    )
    .unwrap();
    let names: Vec<String> = (0..120).map(|i| format!("g{i:03}")).collect();
    let scalers: Vec<_> = names
        .iter()
        .map(|n| groups.scaler(AutoScalingGroupConfig::new(n)).unwrap())
        .collect();
    let caps = futures::future::join_all(scalers.iter().map(|s| s.capacity())).await;
    for (n, c) in names.iter().zip(caps) {
        let c = c.unwrap_or_else(|e| panic!("{n}: {e}"));
        assert_eq!((c.desired, c.running), (1, 1), "{n}");
    }
    let seen = seen.lock().unwrap().clone();
    let sizes: Vec<usize> = seen.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        sizes,
        vec![50, 50, 50, 50, 20, 20],
        "3 chunks of at most 50 names, 2 pages each, one round for all 120 concurrent reads"
    );
    assert_eq!(groups.describe_calls(), 6);
}

#[tokio::test(start_paused = true)]
async fn one_describe_serves_every_group_for_the_ttl_and_a_set_invalidates_it() {
    let describe = mock!(Client::describe_auto_scaling_groups).then_compute_output(|r| {
        let mut out = DescribeAutoScalingGroupsOutput::builder();
        for n in r.auto_scaling_group_names() {
            out = out.auto_scaling_groups(group(n, 0, 10, 1));
        }
        out.build()
    });
    let set = mock!(Client::set_desired_capacity)
        .then_output(|| SetDesiredCapacityOutput::builder().build());
    let client: Client = mock_client!(
        aws_sdk_autoscaling,
        RuleMode::MatchAny,
        &[&describe, &set],
        |c| c.retry_config(RetryConfig::disabled())
    );
    let groups = AutoScalingGroups::new(
        client,
        AwsSettings::default().cache_ttl(Duration::from_secs(2)),
    )
    .unwrap();
    let a = groups.scaler(AutoScalingGroupConfig::new("a")).unwrap();
    let b = groups.scaler(AutoScalingGroupConfig::new("b")).unwrap();
    a.capacity().await.unwrap();
    b.capacity().await.unwrap();
    a.capacity().await.unwrap();
    assert_eq!(describe.num_calls(), 1, "one round serves both groups");
    tokio::time::advance(Duration::from_secs(3)).await;
    b.capacity().await.unwrap();
    assert_eq!(describe.num_calls(), 2, "the answer expires after the TTL");
    a.set_desired(4).await.unwrap();
    assert_eq!(set.num_calls(), 1);
    b.capacity().await.unwrap();
    assert_eq!(
        describe.num_calls(),
        3,
        "a set invalidates the cached answer"
    );
}

#[test]
fn snapshot_rejects_groups_without_bounds() {
    let g = AutoScalingGroup::builder()
        .auto_scaling_group_name("g")
        .desired_capacity(1)
        .build();
    let e = GroupSnapshot::from_group(&g).unwrap_err();
    assert!(e.to_string().contains("MinSize"), "{e}");
}

// ----- a scripted HTTP endpoint, for timeouts and real wire-format answers -----------------

enum Reply {
    /// Accept and never answer.
    Hang,
    /// Answer after a delay.
    After(Duration, u16, String),
}

/// Serves `replies` in order, one per request, then closes.
async fn scripted_endpoint(replies: Vec<Reply>) -> (String, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(Mutex::new(0usize));
    let count = served.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        for reply in replies {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            // Read one request (headers and body) before answering.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = sock.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf);
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())
                                .flatten()
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            *count.lock().unwrap() += 1;
            match reply {
                Reply::Hang => held.push(sock),
                Reply::After(delay, status, body) => {
                    tokio::time::sleep(delay).await;
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(body.as_bytes()).await;
                    let _ = sock.shutdown().await;
                }
            }
        }
        // Keep hung sockets open until the test ends.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(held);
    });
    (url, served)
}

fn describe_xml(names: &[&str], desired: u32) -> String {
    let mut members = String::new();
    for n in names {
        let mut instances = String::new();
        for i in 0..desired {
            instances.push_str(&format!(
                "<member><InstanceId>i-{n}-{i}</InstanceId><AvailabilityZone>us-east-1a</AvailabilityZone>\
                 <LifecycleState>InService</LifecycleState><HealthStatus>Healthy</HealthStatus>\
                 <ProtectedFromScaleIn>false</ProtectedFromScaleIn></member>"
            ));
        }
        members.push_str(&format!(
            "<member><AutoScalingGroupName>{n}</AutoScalingGroupName><MinSize>0</MinSize>\
             <MaxSize>10</MaxSize><DesiredCapacity>{desired}</DesiredCapacity>\
             <Instances>{instances}</Instances></member>"
        ));
    }
    format!(
        "<DescribeAutoScalingGroupsResponse xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\">\
         <DescribeAutoScalingGroupsResult><AutoScalingGroups>{members}</AutoScalingGroups>\
         </DescribeAutoScalingGroupsResult><ResponseMetadata><RequestId>r-1</RequestId>\
         </ResponseMetadata></DescribeAutoScalingGroupsResponse>"
    )
}

const THROTTLING_XML: &str = "<ErrorResponse xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\">\
    <Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error>\
    <RequestId>r-2</RequestId></ErrorResponse>";

async fn endpoint_groups(url: &str, call_timeout: Duration) -> AutoScalingGroups {
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_autoscaling::config::SharedCredentialsProvider::new(
            aws_sdk_autoscaling::config::Credentials::new("testing", "testing", None, None, "test"),
        ))
        .build();
    AutoScalingGroups::from_sdk_config(
        &sdk,
        AwsSettings::default()
            .endpoint_url(url)
            .cache_ttl(Duration::ZERO)
            .call_timeout(call_timeout)
            .max_attempts(1),
    )
    .unwrap()
}

/// Every code either crate's list used to know (ECS's and Auto Scaling's), through the loop
/// on Auto Scaling: the classification is one, so each gives the same kind on both services.
#[tokio::test]
async fn every_classified_code_holds_with_its_kind() {
    use ErrorKind as K;
    let cases: &[(&str, K, bool)] = &[
        ("Throttling", K::Throttled, true),
        ("ThrottlingException", K::Throttled, true),
        ("TooManyRequestsException", K::Throttled, true),
        ("RequestLimitExceeded", K::Throttled, true),
        ("ServiceUnavailable", K::Other, true),
        ("ServiceUnavailableException", K::Other, true),
        ("ServerException", K::Other, true),
        ("InternalFailure", K::Other, true),
        ("InternalError", K::Other, true),
        ("AccessDenied", K::PermissionDenied, false),
        ("AccessDeniedException", K::PermissionDenied, false),
        ("UnauthorizedOperation", K::PermissionDenied, false),
        ("ExpiredToken", K::PermissionDenied, false),
        ("ExpiredTokenException", K::PermissionDenied, false),
        ("InvalidClientTokenId", K::PermissionDenied, false),
        ("UnrecognizedClientException", K::PermissionDenied, false),
        ("InvalidSignatureException", K::PermissionDenied, false),
        ("SignatureDoesNotMatch", K::PermissionDenied, false),
        ("MissingAuthenticationToken", K::PermissionDenied, false),
        ("ValidationError", K::Rejected, false),
        ("ValidationException", K::Rejected, false),
        ("InvalidParameterException", K::Rejected, false),
        ("ClientException", K::Rejected, false),
    ];
    for &(code, kind, transient) in cases {
        describe_fault_holds_then_recovers(
            move || generic_describe(code, "mocked"),
            kind,
            transient,
            code,
        )
        .await;
    }
}

#[tokio::test]
async fn a_call_that_never_answers_times_out_holds_and_recovers() {
    let (url, served) = scripted_endpoint(vec![
        Reply::Hang,
        Reply::After(Duration::ZERO, 400, THROTTLING_XML.to_string()),
        Reply::After(Duration::ZERO, 200, describe_xml(&[GROUP], 2)),
    ])
    .await;
    let groups = endpoint_groups(&url, Duration::from_millis(300)).await;
    let queue = empty_queue();
    queue.publish_n("celery", 40); // 8 workers = 4 instances
    let mut b = Binding::new(
        LoopSettings {
            dry_run: true,
            ..settings()
        },
        Box::new(queue),
        Box::new(
            groups
                .scaler(AutoScalingGroupConfig::new(GROUP).workers_per_instance(2))
                .unwrap(),
        ),
        policy().build().unwrap(),
    )
    .unwrap();

    let r = b.tick().await;
    assert_held(&r, ErrorKind::Timeout, true, "hung endpoint");
    assert!(
        r.capacity_error
            .as_ref()
            .unwrap()
            .message
            .contains("DescribeAutoScalingGroups"),
        "{:?}",
        r.capacity_error
    );

    let r = b.tick().await;
    assert_held(&r, ErrorKind::Throttled, true, "Throttling on the wire");
    assert_eq!(
        r.next_tick_in,
        INTERVAL * 4,
        "the second transient error in a row doubles again"
    );

    let r = b.tick().await;
    assert!(r.capacity_error.is_none(), "{:?}", r.capacity_error);
    assert_eq!(r.outcome, Outcome::WouldSet { from: 2, to: 4 });
    assert_eq!(r.next_tick_in, INTERVAL);
    assert_eq!(*served.lock().unwrap(), 3);
}

#[tokio::test]
async fn concurrent_reads_of_many_bindings_share_one_call() {
    let (url, served) = scripted_endpoint(vec![Reply::After(
        Duration::from_millis(200),
        200,
        describe_xml(&["a", "b", "c"], 1),
    )])
    .await;
    let groups = endpoint_groups(&url, Duration::from_secs(3)).await;
    let scalers: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| groups.scaler(AutoScalingGroupConfig::new(*n)).unwrap())
        .collect();
    let caps = futures::future::join_all(scalers.iter().map(|s| s.capacity())).await;
    for c in caps {
        assert_eq!(c.unwrap().desired, 1);
    }
    assert_eq!(
        groups.describe_calls(),
        1,
        "cache TTL 0, yet one call for three reads"
    );
    assert_eq!(*served.lock().unwrap(), 1);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_transient_unavailable_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let groups = endpoint_groups(&format!("http://127.0.0.1:{port}"), Duration::from_secs(3)).await;
    let scaler = groups.scaler(AutoScalingGroupConfig::new(GROUP)).unwrap();
    celery_scale_core::conformance::dead_scaler(&scaler).await;
    let e = scaler.capacity().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_transient());
}

// --- Scale-in protection (SetInstanceProtection) ---

use aws_sdk_autoscaling::operation::set_instance_protection::{
    SetInstanceProtectionError, SetInstanceProtectionOutput,
};
use celery_scale_core::celery_events::WorkerNode;

fn instance_id(i: usize) -> String {
    format!("i-{i:017x}")
}

/// A group of `n` instances `InService`, none protected, desired `n`.
fn describe_instances(n: usize) -> DescribeAutoScalingGroupsOutput {
    let mut g = AutoScalingGroup::builder()
        .auto_scaling_group_name(GROUP)
        .min_size(0)
        .max_size(500)
        .desired_capacity(n as i32);
    for i in 0..n {
        g = g.instances(instance(&instance_id(i), LifecycleState::InService));
    }
    DescribeAutoScalingGroupsOutput::builder()
        .auto_scaling_groups(g.build())
        .build()
}

/// One worker node per instance, `celery@<instance id>`, the first `busy` executing a task.
fn queue_with_nodes(n: usize, busy: usize) -> MemoryQueue {
    let q = empty_queue();
    q.set_worker_nodes(
        (0..n)
            .map(|i| WorkerNode {
                hostname: format!("celery@{}", instance_id(i)),
                executing: u64::from(i < busy),
                last_beat: None,
            })
            .collect(),
    );
    q
}

fn protected_binding(groups: &AutoScalingGroups, queue: &MemoryQueue) -> Binding {
    let scaler = groups
        .scaler(AutoScalingGroupConfig::new(GROUP).protect_busy_units(true))
        .unwrap();
    Binding::new(
        settings(),
        Box::new(queue.clone()),
        Box::new(scaler),
        policy().build().unwrap(),
    )
    .unwrap()
}

fn generic_protect(code: &str, message: &str) -> SetInstanceProtectionError {
    SetInstanceProtectionError::generic(
        ErrorMetadata::builder().code(code).message(message).build(),
    )
}

/// A failed `SetInstanceProtection` before a scale-in: the busy instance may be chosen, so
/// the loop holds the desired count (nothing is set) and records why; with `recovers`, the
/// next tick protects and scales in.
async fn protect_fault_holds_the_scale_in(
    fault: impl Fn() -> SetInstanceProtectionError + Send + Sync + 'static,
    recovers: bool,
    what: &str,
    says: &str,
) {
    let describe =
        mock!(Client::describe_auto_scaling_groups).then_output(|| describe_instances(3));
    let protect = mock!(Client::set_instance_protection)
        .match_requests(|r| {
            r.auto_scaling_group_name() == Some(GROUP)
                && r.instance_ids() == [instance_id(0)]
                && r.protected_from_scale_in() == Some(true)
        })
        .sequence()
        .error(fault);
    let protect = if recovers {
        protect
            .output(|| SetInstanceProtectionOutput::builder().build())
            .repeatedly()
            .build()
    } else {
        protect.repeatedly().build()
    };
    let set = mock!(Client::set_desired_capacity)
        .match_requests(|r| r.desired_capacity() == Some(1))
        .then_output(|| SetDesiredCapacityOutput::builder().build());
    let groups = groups_with(&[&describe, &protect, &set]);
    // Three instances, the first busy: the policy wants one.
    let mut b = protected_binding(&groups, &queue_with_nodes(3, 1));

    let r = b.tick().await;
    assert_eq!(
        r.decision.as_ref().map(|d| d.desired),
        Some(1),
        "{what}: {r:?}"
    );
    assert_eq!(
        r.outcome,
        Outcome::Unchanged { units: 3 },
        "{what}: held at 3"
    );
    assert_eq!(r.desired_units, Some(3), "{what}");
    let p = r
        .protection
        .clone()
        .unwrap_or_else(|| panic!("{what}: {r:?}"));
    assert_eq!(p.plan.protect, [instance_id(0)], "{what}");
    assert!(!p.applied, "{what}");
    let error = p
        .error
        .unwrap_or_else(|| panic!("{what}: the error is recorded"));
    assert!(error.contains(says), "{what}: {error}");
    assert_eq!(set.num_calls(), 0, "{what}: desired unchanged");
    assert_eq!(protect.num_calls(), 1);

    let r = b.tick().await;
    if recovers {
        assert!(
            r.protection.as_ref().is_some_and(|p| p.applied),
            "{what}: {r:?}"
        );
        assert!(
            matches!(r.outcome, Outcome::Set { from: 3, to: 1, .. }),
            "{what}: protected, then scaled in: {r:?}"
        );
        assert_eq!(set.num_calls(), 1);
    } else {
        assert_eq!(
            r.outcome,
            Outcome::Unchanged { units: 3 },
            "{what}: held again"
        );
        assert_eq!(set.num_calls(), 0, "{what}: never scales in unprotected");
    }
    assert_eq!(protect.num_calls(), 2);
}

#[tokio::test]
async fn throttled_set_instance_protection_holds_the_scale_in_then_recovers() {
    protect_fault_holds_the_scale_in(
        || generic_protect("Throttling", "Rate exceeded"),
        true,
        "Throttling",
        "throttled",
    )
    .await;
}

#[tokio::test]
async fn refused_set_instance_protection_holds_the_scale_in_every_tick() {
    protect_fault_holds_the_scale_in(
        || {
            generic_protect(
                "ValidationError",
                "The instance i-00000000000000000 is not part of Auto Scaling group celery-workers.",
            )
        },
        false,
        "ValidationError",
        "not part of Auto Scaling group",
    )
    .await;
}

#[tokio::test]
async fn set_instance_protection_errors_are_classified() {
    use aws_sdk_autoscaling::types::error::LimitExceededFault;
    let cases: [(SetInstanceProtectionError, ErrorKind, bool); 5] = [
        (
            generic_protect("Throttling", "Rate exceeded"),
            ErrorKind::Throttled,
            true,
        ),
        (
            generic_protect("ValidationError", "not in group"),
            ErrorKind::Rejected,
            false,
        ),
        (
            generic_protect("AccessDenied", "not authorized"),
            ErrorKind::PermissionDenied,
            false,
        ),
        (
            SetInstanceProtectionError::ResourceContentionFault(
                ResourceContentionFault::builder()
                    .message("pending update")
                    .build(),
            ),
            ErrorKind::Rejected,
            true,
        ),
        (
            SetInstanceProtectionError::LimitExceededFault(
                LimitExceededFault::builder().message("limit").build(),
            ),
            ErrorKind::Other,
            false,
        ),
    ];
    for (fault, kind, transient) in cases {
        let label = format!("{fault:?}");
        let fault = Arc::new(Mutex::new(Some(fault)));
        let describe =
            mock!(Client::describe_auto_scaling_groups).then_output(|| describe_instances(2));
        let protect = mock!(Client::set_instance_protection)
            .then_error(move || fault.lock().unwrap().take().expect("called once"));
        let groups = groups_with(&[&describe, &protect]);
        let scaler = groups
            .scaler(AutoScalingGroupConfig::new(GROUP).protect_busy_units(true))
            .unwrap();
        let e = scaler
            .protection()
            .unwrap()
            .set_protected(&[instance_id(0)], true)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), kind, "{label}: {e}");
        assert_eq!(e.is_transient(), transient, "{label}: {e}");
        let kept = std::error::Error::source(&e).expect("a source");
        assert!(kept.is::<Ec2Error>(), "{label}: {kept:?}");
    }
}

#[tokio::test]
async fn more_than_fifty_busy_instances_are_protected_fifty_a_call() {
    // 120 instances, 110 busy, nothing waiting: the policy wants 110; each busy one is
    // protected before the drop, in batches of at most 50.
    let batches: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let seen = batches.clone();
    let describe =
        mock!(Client::describe_auto_scaling_groups).then_output(|| describe_instances(120));
    let protect = mock!(Client::set_instance_protection)
        .match_requests(move |r| {
            seen.lock().unwrap().push(r.instance_ids().to_vec());
            r.protected_from_scale_in() == Some(true)
        })
        .then_output(|| SetInstanceProtectionOutput::builder().build());
    let set = mock!(Client::set_desired_capacity)
        .match_requests(|r| r.desired_capacity() == Some(110))
        .then_output(|| SetDesiredCapacityOutput::builder().build());
    let groups = groups_with(&[&describe, &protect, &set]);
    let mut b = protected_binding(&groups, &queue_with_nodes(120, 110));
    let r = b.tick().await;
    assert!(
        matches!(
            r.outcome,
            Outcome::Set {
                from: 120,
                to: 110,
                ..
            }
        ),
        "{r:?}"
    );
    assert!(
        r.protection
            .as_ref()
            .is_some_and(|p| p.applied && p.plan.protect.len() == 110)
    );
    assert_eq!(protect.num_calls(), 3, "110 ids: 50 + 50 + 10");
    assert_eq!(groups.protection_calls(), 3);
    let batches = batches.lock().unwrap().clone();
    assert_eq!(
        batches.iter().map(Vec::len).collect::<Vec<_>>(),
        [50, 50, 10]
    );
    let mut sent: Vec<String> = batches.into_iter().flatten().collect();
    sent.sort();
    let mut busy: Vec<String> = (0..110).map(instance_id).collect();
    busy.sort();
    assert_eq!(sent, busy, "every busy instance once, no idle one");
    assert_eq!(set.num_calls(), 1);
}

#[tokio::test]
async fn units_are_the_instances_with_protection_and_stopping_states() {
    use LifecycleState as L;
    let describe = mock!(Client::describe_auto_scaling_groups).then_output(|| {
        let mut g = AutoScalingGroup::builder()
            .auto_scaling_group_name(GROUP)
            .min_size(0)
            .max_size(10)
            .desired_capacity(3);
        let states = [
            (L::InService, true),
            (L::InService, false),
            (L::Pending, false),
            (L::TerminatingWait, true),
            (L::Detaching, false),
            (L::Standby, false),
            (L::WarmedTerminatingProceed, false),
        ];
        for (i, (s, protected)) in states.into_iter().enumerate() {
            g = g.instances(
                Instance::builder()
                    .instance_id(instance_id(i))
                    .lifecycle_state(s)
                    .protected_from_scale_in(protected)
                    .build(),
            );
        }
        // An instance without an id is counted but cannot be a unit.
        g = g.instances(Instance::builder().lifecycle_state(L::InService).build());
        DescribeAutoScalingGroupsOutput::builder()
            .auto_scaling_groups(g.build())
            .build()
    });
    let groups = groups_with(&[&describe]);
    let off = groups.scaler(AutoScalingGroupConfig::new(GROUP)).unwrap();
    assert!(off.protection().is_none(), "off unless configured");
    let scaler = groups
        .scaler(AutoScalingGroupConfig::new(GROUP).protect_busy_units(true))
        .unwrap();
    let units = scaler.protection().unwrap().units().await.unwrap();
    let got: Vec<(String, bool, bool)> = units
        .iter()
        .map(|u| (u.id.clone(), u.protected, u.stopping))
        .collect();
    let want: Vec<(String, bool, bool)> = [
        (0, true, false),
        (1, false, false),
        (2, false, false),
        (3, false, true), // protected, but terminating: nothing to protect or release
        (4, false, true),
        (5, false, false),
        (6, false, true),
    ]
    .into_iter()
    .map(|(i, p, s)| (instance_id(i), p, s))
    .collect();
    assert_eq!(got, want);
    assert!(
        units
            .iter()
            .all(|u| u.aliases.is_empty() && u.protected_until.is_none())
    );
    assert_eq!(
        scaler.capacity().await.unwrap().running,
        3,
        "the id-less one still counts"
    );
    assert_eq!(
        celery_scale_core::protection::unit_of("celery@i-00000000000000001", &units)
            .map(|u| u.id.as_str()),
        Some(instance_id(1).as_str())
    );
}

#[tokio::test(start_paused = true)]
async fn a_protection_change_invalidates_the_shared_round() {
    let describe =
        mock!(Client::describe_auto_scaling_groups).then_output(|| describe_instances(2));
    let protect = mock!(Client::set_instance_protection)
        .then_output(|| SetInstanceProtectionOutput::builder().build());
    let client: Client = mock_client!(
        aws_sdk_autoscaling,
        RuleMode::MatchAny,
        [&describe, &protect],
        |c| c.retry_config(RetryConfig::disabled())
    );
    let groups = AutoScalingGroups::new(
        client,
        AwsSettings::default().cache_ttl(Duration::from_secs(5)),
    )
    .unwrap();
    let scaler = groups
        .scaler(AutoScalingGroupConfig::new(GROUP).protect_busy_units(true))
        .unwrap();
    scaler.capacity().await.unwrap();
    let p = scaler.protection().unwrap();
    p.units().await.unwrap();
    assert_eq!(
        describe.num_calls(),
        1,
        "units() share the round capacity() read"
    );
    p.set_protected(&[], true).await.unwrap();
    assert_eq!(protect.num_calls(), 0, "nothing to protect: no call");
    p.set_protected(&[instance_id(1)], true).await.unwrap();
    p.units().await.unwrap();
    assert_eq!(describe.num_calls(), 2, "a protection change is read fresh");
}
