//! Task scale-in protection through aws-smithy-mocks (moto has no `UpdateTaskProtection`): the
//! request bodies (batches of 100 and 10, `expiresInMinutes`, the task IDs), the units read from
//! `DescribeTasks` data (aliases from ENI attachments and containers, the stopping rule), typed
//! errors, and, at the `Binding` level, a busy task protected before `UpdateService` lowers the
//! count, or the scale-in held when protection fails.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_ecs::Client;
use aws_sdk_ecs::config::retry::RetryConfig;
use aws_sdk_ecs::error::ErrorMetadata;
use aws_sdk_ecs::operation::describe_services::DescribeServicesOutput;
use aws_sdk_ecs::operation::describe_tasks::DescribeTasksOutput;
use aws_sdk_ecs::operation::get_task_protection::GetTaskProtectionOutput;
use aws_sdk_ecs::operation::list_tasks::ListTasksOutput;
use aws_sdk_ecs::operation::update_service::UpdateServiceOutput;
use aws_sdk_ecs::operation::update_task_protection::{
    UpdateTaskProtectionError, UpdateTaskProtectionOutput,
};
use aws_sdk_ecs::primitives::DateTime;
use aws_sdk_ecs::types::{
    Attachment, Container, Failure, KeyValuePair, NetworkInterface, ProtectedTask, Service, Task,
};
use aws_smithy_mocks::{MockResponse, Rule, RuleMode, mock, mock_client};
use celery_scale_core::celery_events::WorkerNode;
use celery_scale_core::config::{PolicyConfig, PolicyKind};
use celery_scale_core::protection::{UnitProtection, unit_of};
use celery_scale_core::{Binding, ErrorKind, LoopSettings, MemoryQueue, Scaler};
use celery_scale_ecs::{
    AwsError, AwsSettings, EcsError, EcsServiceConfig, EcsServiceScaler, EcsServices,
    TASKS_PER_DESCRIBE, TASKS_PER_GET_PROTECTION, TASKS_PER_UPDATE_PROTECTION,
};

const CLUSTER: &str = "prod";
const SERVICE: &str = "workers";

fn arn(id: &str) -> String {
    format!("arn:aws:ecs:us-east-1:123456789012:task/{CLUSTER}/{id}")
}

/// Task `i`'s ID: 32 hex digits, as ECS makes them.
fn id(i: usize) -> String {
    format!("{i:032x}")
}

/// An `awsvpc` (Fargate) task as `DescribeTasks` describes it: an ENI attachment with its
/// address and DNS name, a container whose network interface repeats the address, and
/// Fargate's runtime id (`<task id>-<number>`).
fn awsvpc_task(id: &str, ip: &str, desired: &str, last: &str) -> Task {
    let dns = format!("ip-{}.ec2.internal", ip.replace('.', "-"));
    Task::builder()
        .task_arn(arn(id))
        .desired_status(desired)
        .last_status(last)
        .attachments(
            Attachment::builder()
                .id("eni-attachment")
                .r#type("ElasticNetworkInterface")
                .status("ATTACHED")
                .details(kv("subnetId", "subnet-0abc"))
                .details(kv("networkInterfaceId", "eni-0abc"))
                .details(kv("macAddress", "0a:1b:2c:3d:4e:5f"))
                .details(kv("privateDnsName", &dns))
                .details(kv("privateIPv4Address", ip))
                .build(),
        )
        .containers(
            Container::builder()
                .name("worker")
                .runtime_id(format!("{id}-2531612879"))
                .network_interfaces(
                    NetworkInterface::builder()
                        .attachment_id("eni-attachment")
                        .private_ipv4_address(ip)
                        .build(),
                )
                .build(),
        )
        .build()
}

/// A `bridge` task on ECS on EC2: no ENI, the container's host name is its Docker id's first
/// 12 characters.
fn bridge_task(id: &str, docker_id: &str) -> Task {
    Task::builder()
        .task_arn(arn(id))
        .desired_status("RUNNING")
        .last_status("RUNNING")
        .containers(
            Container::builder()
                .name("worker")
                .runtime_id(docker_id)
                .build(),
        )
        .build()
}

fn kv(name: &str, value: &str) -> KeyValuePair {
    KeyValuePair::builder().name(name).value(value).build()
}

fn ip_of(i: usize) -> String {
    format!("10.0.{}.{}", i / 200, i % 200 + 10)
}

/// `ListTasks` over `n` tasks, 100 a page with tokens `page-1`, `page-2`, ...; records each
/// request's (cluster, serviceName, maxResults, nextToken).
fn list_tasks(n: usize, seen: Arc<Mutex<Vec<String>>>) -> Rule {
    mock!(Client::list_tasks).then_compute_output(move |req| {
        seen.lock().unwrap().push(format!(
            "{:?} {:?} {:?} {:?}",
            req.cluster(),
            req.service_name(),
            req.max_results(),
            req.next_token()
        ));
        let page: usize = req
            .next_token()
            .and_then(|t| t.strip_prefix("page-"))
            .map_or(0, |p| p.parse().unwrap());
        let from = page * 100;
        let to = n.min(from + 100);
        let mut out = ListTasksOutput::builder();
        for i in from..to {
            out = out.task_arns(arn(&id(i)));
        }
        if to < n {
            out = out.next_token(format!("page-{}", page + 1));
        }
        out.build()
    })
}

/// `DescribeTasks` of the requested tasks as `awsvpc` tasks (`task` says how each is); records
/// each request's size.
fn describe_tasks(
    task: impl Fn(usize, &str) -> Task + Send + Sync + 'static,
    sizes: Arc<Mutex<Vec<usize>>>,
) -> Rule {
    mock!(Client::describe_tasks).then_compute_output(move |req| {
        assert_eq!(req.cluster(), Some(CLUSTER));
        sizes.lock().unwrap().push(req.tasks().len());
        let mut out = DescribeTasksOutput::builder();
        for a in req.tasks() {
            let id = a.rsplit('/').next().unwrap();
            let i = usize::from_str_radix(id, 16).unwrap();
            out = out.tasks(task(i, id));
        }
        out.build()
    })
}

/// `GetTaskProtection`: `protected(i)` gives a task's expiry when it is protected; records
/// each request's size.
fn get_protection(
    protected: impl Fn(usize) -> Option<i64> + Send + Sync + 'static,
    sizes: Arc<Mutex<Vec<usize>>>,
) -> Rule {
    mock!(Client::get_task_protection).then_compute_output(move |req| {
        assert_eq!(req.cluster(), Some(CLUSTER));
        sizes.lock().unwrap().push(req.tasks().len());
        let mut out = GetTaskProtectionOutput::builder();
        for id in req.tasks() {
            assert!(!id.contains('/'), "asked by task ID: {id}");
            let i = usize::from_str_radix(id, 16).unwrap();
            let mut p = ProtectedTask::builder()
                .task_arn(arn(id))
                .protection_enabled(false);
            if let Some(at) = protected(i) {
                p = p
                    .protection_enabled(true)
                    .expiration_date(DateTime::from_secs(at));
            }
            out = out.protected_tasks(p.build());
        }
        out.build()
    })
}

fn client(rules: &[&Rule]) -> Client {
    mock_client!(aws_sdk_ecs, RuleMode::MatchAny, rules, |c| c
        .retry_config(RetryConfig::disabled()))
}

fn scaler(rules: &[&Rule], minutes: u64) -> EcsServiceScaler {
    let services = EcsServices::new(
        client(rules),
        AwsSettings::default().cache_ttl(Duration::ZERO),
    )
    .unwrap();
    services
        .scaler(
            EcsServiceConfig::new(CLUSTER, SERVICE)
                .protect_busy_units(Duration::from_secs(minutes * 60))
                .unwrap(),
        )
        .unwrap()
}

fn log() -> Arc<Mutex<Vec<String>>> {
    Arc::default()
}

#[tokio::test]
async fn units_are_read_in_batches_with_their_aliases_protection_and_stopping() {
    let n = 230;
    let pages = log();
    let describes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let gets: Arc<Mutex<Vec<usize>>> = Arc::default();
    let list = list_tasks(n, pages.clone());
    let describe = describe_tasks(
        |i, id| match i {
            // Desired STOPPED (ECS scales it in), though still running.
            3 => awsvpc_task(id, &ip_of(i), "STOPPED", "RUNNING"),
            // Each of the stop sequence's last statuses.
            4 => awsvpc_task(id, &ip_of(i), "RUNNING", "DEACTIVATING"),
            5 => awsvpc_task(id, &ip_of(i), "RUNNING", "STOPPING"),
            6 => awsvpc_task(id, &ip_of(i), "RUNNING", "DEPROVISIONING"),
            // Starting: not stopping.
            7 => awsvpc_task(id, &ip_of(i), "RUNNING", "PROVISIONING"),
            8 => bridge_task(
                id,
                "4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a",
            ),
            _ => awsvpc_task(id, &ip_of(i), "RUNNING", "RUNNING"),
        },
        describes.clone(),
    );
    let in_an_hour = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 3600;
    let get = get_protection(move |i| (i % 50 == 1).then_some(in_an_hour), gets.clone());
    let scaler = scaler(&[&list, &describe, &get], 60);
    let units = scaler.units().await.unwrap();

    // ListTasks: every page, by cluster and service, 100 a page.
    assert_eq!(
        *pages.lock().unwrap(),
        [
            r#"Some("prod") Some("workers") Some(100) None"#,
            r#"Some("prod") Some("workers") Some(100) Some("page-1")"#,
            r#"Some("prod") Some("workers") Some(100) Some("page-2")"#,
        ]
    );
    // DescribeTasks and GetTaskProtection: at most 100 tasks a call.
    let mut d = describes.lock().unwrap().clone();
    d.sort();
    assert_eq!(d, [30, 100, 100]);
    let mut g = gets.lock().unwrap().clone();
    g.sort();
    assert_eq!(g, [30, 100, 100]);
    assert_eq!(TASKS_PER_DESCRIBE, 100);
    assert_eq!(TASKS_PER_GET_PROTECTION, 100);

    assert_eq!(units.len(), n);
    let ids: Vec<&str> = units.iter().map(|u| u.id.as_str()).collect();
    assert_eq!(
        ids,
        (0..n).map(id).collect::<Vec<_>>(),
        "task IDs, in order"
    );

    // An awsvpc task: its address raw and as ip-a-b-c-d, its DNS name, its runtime id's head.
    let u0 = &units[0];
    assert_eq!(
        u0.aliases,
        [
            "10.0.0.10",
            "ip-10-0-0-10",
            "ip-10-0-0-10.ec2.internal",
            &id(0)[..12]
        ]
    );
    assert!(!u0.protected && u0.protected_until.is_none());
    // A bridge-mode task: the Docker host name.
    assert_eq!(units[8].aliases, ["4f3a2b1c0d9e"]);

    let stopping: Vec<usize> = (0..n).filter(|&i| units[i].stopping).collect();
    assert_eq!(stopping, [3, 4, 5, 6]);

    let protected: Vec<usize> = (0..n).filter(|&i| units[i].protected).collect();
    assert_eq!(protected, [1, 51, 101, 151, 201]);
    let until = units[51].protected_until.expect("an expiry");
    let left = until.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(3500) && left <= Duration::from_secs(3600),
        "{left:?}"
    );

    // Celery's default node names find their units: Fargate's host name (with or without its
    // domain), the address, the container id.
    assert_eq!(unit_of("celery@ip-10-0-0-12", &units).unwrap().id, id(2));
    assert_eq!(
        unit_of("celery@ip-10-0-1-15.ec2.internal", &units)
            .unwrap()
            .id,
        id(205)
    );
    assert_eq!(unit_of("celery@4f3a2b1c0d9e", &units).unwrap().id, id(8));
    assert_eq!(
        unit_of(&format!("celery@{}", id(9)), &units).unwrap().id,
        id(9)
    );
    assert!(unit_of("celery@ip-10-9-9-9", &units).is_none());
}

#[tokio::test]
async fn an_unanswered_task_is_an_error_unless_it_is_stopping() {
    let describe = describe_tasks(
        |i, id| {
            let desired = if i == 1 { "STOPPED" } else { "RUNNING" };
            awsvpc_task(id, &ip_of(i), desired, "RUNNING")
        },
        Arc::default(),
    );
    // GetTaskProtection fails for tasks 1 (stopping: left as unprotected) and 2 (running: its
    // protection is unknown, so the units are not known).
    let get = mock!(Client::get_task_protection).then_compute_output(|req| {
        let mut out = GetTaskProtectionOutput::builder();
        for id in req.tasks() {
            if id == &self::id(1) || id == &self::id(2) {
                out = out.failures(Failure::builder().arn(arn(id)).reason("MISSING").build());
            } else {
                out = out.protected_tasks(
                    ProtectedTask::builder()
                        .task_arn(arn(id))
                        .protection_enabled(false)
                        .build(),
                );
            }
        }
        out.build()
    });
    let scaler = scaler(&[&list_tasks(3, log()), &describe, &get], 60);
    let e = scaler.tasks().await.unwrap_err();
    match &e {
        EcsError::TaskFailures {
            operation,
            cluster,
            failures,
        } => {
            assert_eq!(operation.name, "GetTaskProtection");
            assert_eq!(cluster, CLUSTER);
            assert_eq!(failures.len(), 1, "{failures:?}");
            assert_eq!(
                (failures[0].task.as_str(), failures[0].reason.as_str()),
                (id(2).as_str(), "MISSING")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains(&id(2)), "{e}");
    let core = celery_scale_core::Error::from(e);
    assert!(core.is_transient(), "retried on the next tick");
}

fn update_protection(seen: Arc<Mutex<Vec<String>>>) -> Rule {
    mock!(Client::update_task_protection).then_compute_output(move |req| {
        assert_eq!(req.cluster(), Some(CLUSTER));
        seen.lock().unwrap().push(format!(
            "UpdateTaskProtection {:?} {:?} {:?}",
            req.tasks(),
            req.protection_enabled(),
            req.expires_in_minutes()
        ));
        let mut out = UpdateTaskProtectionOutput::builder();
        for id in req.tasks() {
            out = out.protected_tasks(
                ProtectedTask::builder()
                    .task_arn(arn(id))
                    .protection_enabled(req.protection_enabled().unwrap_or(false))
                    .build(),
            );
        }
        out.build()
    })
}

#[tokio::test]
async fn protection_is_set_ten_tasks_a_call_with_expires_in_minutes() {
    let seen = log();
    let update = update_protection(seen.clone());
    let scaler = scaler(&[&update], 90);
    let ids: Vec<String> = (0..23).map(id).collect();
    scaler.set_protected(&ids, true).await.unwrap();
    let mut calls = seen.lock().unwrap().clone();
    calls.sort();
    let batch = |r: std::ops::Range<usize>, on: &str| {
        format!(
            "UpdateTaskProtection {:?} Some({on}) {}",
            r.map(id).collect::<Vec<_>>(),
            if on == "true" { "Some(90)" } else { "None" }
        )
    };
    let mut want = vec![
        batch(0..10, "true"),
        batch(10..20, "true"),
        batch(20..23, "true"),
    ];
    want.sort();
    assert_eq!(calls, want);
    assert_eq!(TASKS_PER_UPDATE_PROTECTION, 10);

    // Releasing sends no expiry.
    seen.lock().unwrap().clear();
    scaler.set_protected(&ids[..3], false).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [batch(0..3, "false")]);
    assert_eq!(update.num_calls(), 4);
}

#[tokio::test]
async fn tasks_ecs_could_not_protect_are_reported() {
    // Task 11 stopped meanwhile: ECS lists it in `failures`, the others are protected.
    let update = mock!(Client::update_task_protection).then_compute_output(|req| {
        let mut out = UpdateTaskProtectionOutput::builder();
        for t in req.tasks() {
            if t == &id(11) {
                out = out.failures(
                    Failure::builder()
                        .arn(arn(t))
                        .reason("TASK_NOT_VALID")
                        .detail("The task is not in a RUNNING state")
                        .build(),
                );
            }
        }
        out.build()
    });
    let scaler = scaler(&[&update], 60);
    let ids: Vec<String> = (0..15).map(id).collect();
    let e = scaler.protect(&ids, true).await.unwrap_err();
    assert_eq!(update.num_calls(), 2, "every batch was sent");
    match &e {
        EcsError::TaskFailures {
            operation,
            failures,
            ..
        } => {
            assert_eq!(operation.name, "UpdateTaskProtection");
            assert_eq!(failures.len(), 1);
            assert_eq!(failures[0].task, id(11));
            assert_eq!(failures[0].reason, "TASK_NOT_VALID");
        }
        other => panic!("{other:?}"),
    }
    let text = e.to_string();
    assert!(
        text.contains(&id(11)) && text.contains("TASK_NOT_VALID") && text.contains("RUNNING state"),
        "{text}"
    );
    let core = celery_scale_core::Error::from(e);
    assert_eq!(core.kind(), ErrorKind::Rejected);
    assert!(core.is_transient());
}

fn throttled() -> UpdateTaskProtectionError {
    UpdateTaskProtectionError::generic(
        ErrorMetadata::builder()
            .code("ThrottlingException")
            .message("Rate exceeded")
            .build(),
    )
}

#[tokio::test]
async fn a_throttled_update_is_a_typed_transient_error() {
    let update = mock!(Client::update_task_protection).then_error(throttled);
    let scaler = scaler(&[&update], 60);
    let e = scaler.protect(&[id(1)], true).await.unwrap_err();
    assert!(
        matches!(&e, EcsError::Aws(AwsError::Throttled { operation, code, .. })
            if operation.name == "UpdateTaskProtection" && code == "ThrottlingException"),
        "{e:?}"
    );
    let core = celery_scale_core::Error::from(e);
    assert_eq!(core.kind(), ErrorKind::Throttled);
    assert!(core.is_transient());
    // Through the trait, the same core error.
    let e = scaler.set_protected(&[id(1)], true).await.unwrap_err();
    assert_eq!((e.kind(), e.is_transient()), (ErrorKind::Throttled, true));
}

#[test]
fn protection_is_offered_only_when_opted_in() {
    let services = EcsServices::new(client(&[]), AwsSettings::default()).unwrap();
    let off = services
        .scaler(EcsServiceConfig::new(CLUSTER, SERVICE))
        .unwrap();
    assert!(off.protection().is_none());
    let on = services
        .scaler(
            EcsServiceConfig::new(CLUSTER, "other")
                .protect_busy_units(Duration::from_secs(3600))
                .unwrap(),
        )
        .unwrap();
    let p = on.protection().expect("opted in");
    assert_eq!(p.renew_within(), Duration::from_secs(20 * 60), "a third");
}

// ---- the loop on ECS ----

/// Three running tasks at 10.0.0.10, .11, .12 (IDs 0, 1, 2), none protected; the service's
/// desired count 3. `update` answers `UpdateTaskProtection`; every `UpdateTaskProtection` and
/// `UpdateService` goes into `calls`, in order.
struct Ecs {
    rules: Vec<Rule>,
    update_service: Rule,
}

fn ecs(calls: Arc<Mutex<Vec<String>>>, update: Rule) -> Ecs {
    let describe_services = mock!(Client::describe_services).then_output(|| {
        DescribeServicesOutput::builder()
            .services(
                Service::builder()
                    .service_name(SERVICE)
                    .status("ACTIVE")
                    .desired_count(3)
                    .running_count(3)
                    .pending_count(0)
                    .build(),
            )
            .build()
    });
    let seen = calls.clone();
    let update_service = mock!(Client::update_service).then_compute_output(move |req| {
        seen.lock()
            .unwrap()
            .push(format!("UpdateService {:?}", req.desired_count()));
        UpdateServiceOutput::builder().build()
    });
    Ecs {
        rules: vec![
            describe_services,
            list_tasks(3, log()),
            describe_tasks(
                |i, id| awsvpc_task(id, &ip_of(i), "RUNNING", "RUNNING"),
                Arc::default(),
            ),
            get_protection(|_| None, Arc::default()),
            update,
            update_service.clone(),
        ],
        update_service,
    }
}

/// A binding on an empty queue whose workers, by Celery's default node names, are
/// `celery@ip-10-0-0-10` (executing one task) and two idle ones: the policy scales in to the
/// one busy task.
fn binding(ecs: &Ecs) -> Binding {
    let rules: Vec<&Rule> = ecs.rules.iter().collect();
    let queue = MemoryQueue::new();
    queue.declare("celery");
    queue.set_worker_nodes(vec![
        WorkerNode {
            hostname: "celery@ip-10-0-0-10".into(),
            executing: 1,
            last_beat: None,
        },
        WorkerNode {
            hostname: "celery@ip-10-0-0-11".into(),
            executing: 0,
            last_beat: None,
        },
        WorkerNode {
            hostname: "celery@ip-10-0-0-12.ec2.internal".into(),
            executing: 0,
            last_beat: None,
        },
    ]);
    Binding::new(
        LoopSettings {
            name: "ecs-protect".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(3),
            max_staleness: Duration::from_secs(30),
            max_backoff: Duration::from_secs(8),
            dry_run: false,
        },
        Box::new(queue),
        Box::new(scaler(&rules, 60)),
        PolicyConfig {
            kind: PolicyKind::TargetBacklog,
            stabilize_down: Duration::ZERO,
            scale_to_zero_after: Duration::ZERO,
            ..PolicyConfig::default()
        }
        .build()
        .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn the_busy_task_is_protected_before_update_service_lowers_the_count() {
    let calls = log();
    let ecs = ecs(calls.clone(), update_protection(calls.clone()));
    let mut b = binding(&ecs);
    let r = b.tick().await;
    assert_eq!(
        *calls.lock().unwrap(),
        [
            format!("UpdateTaskProtection {:?} Some(true) Some(60)", [id(0)]),
            "UpdateService Some(1)".to_string(),
        ],
        "{r:?}"
    );
    let p = r.protection.expect("a protection record");
    assert!(p.applied && p.error.is_none(), "{p:?}");
    assert_eq!(p.plan.protect, [id(0)]);
    assert_eq!(p.plan.busy_units, [id(0)]);
    assert_eq!(r.desired_units, Some(1));
}

#[tokio::test]
async fn a_failed_protection_holds_the_scale_in() {
    // Throttled once, then ECS protects.
    let calls = log();
    let seen = calls.clone();
    let answers = Arc::new(Mutex::new(0));
    let update = mock!(Client::update_task_protection).then_compute_response(move |req| {
        seen.lock().unwrap().push(format!(
            "UpdateTaskProtection {:?} {:?} {:?}",
            req.tasks(),
            req.protection_enabled(),
            req.expires_in_minutes()
        ));
        let mut n = answers.lock().unwrap();
        *n += 1;
        if *n == 1 {
            MockResponse::Error(throttled())
        } else {
            MockResponse::Output(UpdateTaskProtectionOutput::builder().build())
        }
    });
    let ecs = ecs(calls.clone(), update);
    let mut b = binding(&ecs);
    let r = b.tick().await;
    let p = r.protection.clone().expect("a protection record");
    assert!(!p.applied);
    let error = p.error.expect("the failure is recorded");
    // Core's message for a throttled call: "cannot protect <task ID>: ecs throttled the request".
    assert!(
        error.contains(&id(0)) && error.contains("throttled"),
        "{error}"
    );
    assert_eq!(ecs.update_service.num_calls(), 0, "no scale-in: {r:?}");
    assert_eq!(
        *calls.lock().unwrap(),
        [format!(
            "UpdateTaskProtection {:?} Some(true) Some(60)",
            [id(0)]
        )]
    );

    // Next tick ECS answers: protect first, then lower.
    calls.lock().unwrap().clear();
    let r = b.tick().await;
    assert_eq!(
        *calls.lock().unwrap(),
        [
            format!("UpdateTaskProtection {:?} Some(true) Some(60)", [id(0)]),
            "UpdateService Some(1)".to_string(),
        ],
        "{r:?}"
    );
}

#[tokio::test]
async fn a_task_ecs_could_not_protect_holds_the_scale_in() {
    let update = mock!(Client::update_task_protection).then_compute_output(|req| {
        let mut out = UpdateTaskProtectionOutput::builder();
        for t in req.tasks() {
            out = out.failures(
                Failure::builder()
                    .arn(arn(t))
                    .reason("TASK_NOT_VALID")
                    .build(),
            );
        }
        out.build()
    });
    let ecs = ecs(log(), update);
    let mut b = binding(&ecs);
    let r = b.tick().await;
    let error = r
        .protection
        .clone()
        .and_then(|p| p.error)
        .unwrap_or_else(|| panic!("{r:?}"));
    assert!(
        error.contains(&id(0)) && error.contains("TASK_NOT_VALID"),
        "{error}"
    );
    assert_eq!(ecs.update_service.num_calls(), 0, "no scale-in: {r:?}");
}
