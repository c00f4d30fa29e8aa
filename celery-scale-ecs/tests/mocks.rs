//! ECS faults through aws-smithy-mocks: each gives its typed `EcsError`, the loop holds (never
//! scales in) and recovers on the next good answer; and 25 services cost 3 `DescribeServices`
//! calls per round of reads, whether the loop ticks them together or on their own tasks.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ecs::Client;
use aws_sdk_ecs::config::retry::RetryConfig;
use aws_sdk_ecs::error::ErrorMetadata;
use aws_sdk_ecs::operation::describe_services::{DescribeServicesError, DescribeServicesOutput};
use aws_sdk_ecs::operation::update_service::{UpdateServiceError, UpdateServiceOutput};
use aws_sdk_ecs::types::error::{AccessDeniedException, ClusterNotFoundException, ServerException};
use aws_sdk_ecs::types::{Failure, Service};
use aws_smithy_mocks::{Rule, RuleMode, mock, mock_client};
use celery_scale_core::config::{PolicyConfig, PolicyKind};
use celery_scale_core::record::{Outcome, RecordLog};
use celery_scale_core::{
    Autoscaler, Binding, CancellationToken, ErrorKind, LoopSettings, MemoryQueue,
};
use celery_scale_ecs::{AwsError, AwsSettings, EcsCalls, EcsError, EcsServiceConfig, EcsServices};

const CLUSTER: &str = "prod";
const SERVICE: &str = "workers";
const INTERVAL: Duration = Duration::from_secs(2);

fn service(name: &str, desired: i32) -> Service {
    Service::builder()
        .service_name(name)
        .status("ACTIVE")
        .desired_count(desired)
        .running_count(desired)
        .pending_count(0)
        .build()
}

fn describe_ok(desired: i32) -> DescribeServicesOutput {
    DescribeServicesOutput::builder()
        .services(service(SERVICE, desired))
        .build()
}

fn missing() -> DescribeServicesOutput {
    DescribeServicesOutput::builder()
        .failures(
            Failure::builder()
                .arn(format!(
                    "arn:aws:ecs:us-east-1:123456789012:service/{CLUSTER}/{SERVICE}"
                ))
                .reason("MISSING")
                .build(),
        )
        .build()
}

fn generic(code: &str) -> DescribeServicesError {
    DescribeServicesError::generic(
        ErrorMetadata::builder()
            .code(code)
            .message("mocked")
            .build(),
    )
}

fn mocked_client(rules: &[&Rule]) -> Client {
    mock_client!(aws_sdk_ecs, RuleMode::MatchAny, rules, |c| c
        .retry_config(RetryConfig::disabled()))
}

fn services_with(rules: &[&Rule]) -> EcsServices {
    EcsServices::new(
        mocked_client(rules),
        AwsSettings::default().cache_ttl(Duration::ZERO),
    )
    .unwrap()
}

fn policy() -> PolicyConfig {
    PolicyConfig {
        kind: PolicyKind::TargetBacklog,
        stabilize_down: Duration::ZERO,
        scale_to_zero_after: Duration::ZERO,
        ..PolicyConfig::default()
    }
}

/// A binding on an empty queue (so any good answer of 3 tasks scales in to 0), and a second
/// handle on the same scaler for typed reads.
fn binding(services: &EcsServices) -> (Binding, celery_scale_ecs::EcsServiceScaler) {
    let scaler = services
        .scaler(EcsServiceConfig::new(CLUSTER, SERVICE))
        .unwrap();
    let queue = MemoryQueue::new();
    queue.declare("celery");
    let b = Binding::new(
        LoopSettings {
            name: "ecs-mock".into(),
            interval: INTERVAL,
            timeout: Duration::from_secs(3),
            max_staleness: Duration::from_secs(30),
            max_backoff: Duration::from_secs(8),
            dry_run: false,
        },
        Box::new(queue),
        Box::new(scaler.clone()),
        policy().build().unwrap(),
    )
    .unwrap();
    (b, scaler)
}

/// The describe fault comes twice: a typed read sees the `EcsError`; then a loop tick holds
/// (the empty queue would scale 3 tasks in) and records the mapped core error; the next good
/// answer scales in.
async fn fault_holds_then_recovers(
    describe: Rule,
    typed: fn(&EcsError) -> bool,
    kind: ErrorKind,
    transient: bool,
) {
    let update =
        mock!(Client::update_service).then_output(|| UpdateServiceOutput::builder().build());
    let services = services_with(&[&describe, &update]);
    let (mut b, scaler) = binding(&services);

    let e = scaler.read().await.expect_err("the fault");
    assert!(typed(&e), "unexpected EcsError: {e:?}");
    assert_eq!(transient_(&e), transient, "{e}");

    let r = b.tick().await;
    assert!(matches!(r.outcome, Outcome::Held { .. }), "{:?}", r.outcome);
    let recorded = r.capacity_error.expect("recorded");
    assert_eq!(
        (recorded.kind, recorded.transient),
        (kind, transient),
        "{}",
        recorded.message
    );
    assert_eq!(
        r.next_tick_in,
        if transient { INTERVAL * 2 } else { INTERVAL },
        "transient faults back off, permanent ones do not"
    );
    assert_eq!(update.num_calls(), 0, "a fault never scales in");

    let r = b.tick().await;
    assert_eq!(
        r.outcome,
        Outcome::Set {
            from: 3,
            to: 0,
            applied: 0,
            note: None
        },
        "recovers on the next good answer"
    );
    assert_eq!(r.next_tick_in, INTERVAL);
    assert_eq!(update.num_calls(), 1);
    assert_eq!(
        services.calls(),
        EcsCalls {
            describe_services: 3,
            update_service: 1
        }
    );
}

/// Whether the loop backs off on `e`: core's classification of the mapped error, the only one.
fn transient_(e: &EcsError) -> bool {
    celery_scale_core::Error::from(e.clone()).is_transient()
}

fn twice_then_ok(fault: impl Fn() -> DescribeServicesError + Send + Sync + 'static) -> Rule {
    mock!(Client::describe_services)
        .sequence()
        .error(fault)
        .times(2)
        .output(|| describe_ok(3))
        .repeatedly()
        .build()
}

#[tokio::test]
async fn throttling_is_transient() {
    fault_holds_then_recovers(
        twice_then_ok(|| generic("ThrottlingException")),
        |e| {
            matches!(
                e,
                EcsError::Aws(AwsError::Throttled { operation, .. })
                    if operation.name == "DescribeServices"
            )
        },
        ErrorKind::Throttled,
        true,
    )
    .await;
}

#[tokio::test]
async fn server_exceptions_are_transient() {
    fault_holds_then_recovers(
        twice_then_ok(|| {
            DescribeServicesError::ServerException(
                ServerException::builder().message("mocked").build(),
            )
        }),
        |e| matches!(e, EcsError::Aws(AwsError::ServiceFault { .. })),
        ErrorKind::Other,
        true,
    )
    .await;
}

#[tokio::test]
async fn a_raw_503_is_transient() {
    let describe = mock!(Client::describe_services)
        .sequence()
        .http_status(503, Some("{}".into()))
        .times(2)
        .output(|| describe_ok(3))
        .repeatedly()
        .build();
    fault_holds_then_recovers(
        describe,
        |e| matches!(e, EcsError::Aws(AwsError::ServiceFault { .. })),
        ErrorKind::Other,
        true,
    )
    .await;
}

#[tokio::test]
async fn access_denied_is_permanent() {
    fault_holds_then_recovers(
        twice_then_ok(|| {
            DescribeServicesError::AccessDeniedException(
                AccessDeniedException::builder()
                    .message("not authorized to perform: ecs:DescribeServices")
                    .build(),
            )
        }),
        |e| matches!(e, EcsError::Aws(AwsError::PermissionDenied { message, .. }) if message.contains("ecs:DescribeServices")),
        ErrorKind::PermissionDenied,
        false,
    )
    .await;
}

/// Every code either crate's list used to know (ECS's and Auto Scaling's), through the loop
/// on ECS: the classification is one, so each gives the same kind on both services.
#[tokio::test]
async fn every_classified_code_holds_with_its_kind() {
    use ErrorKind as K;
    let cases: &[(&str, K, bool)] = &[
        ("ThrottlingException", K::Throttled, true),
        ("Throttling", K::Throttled, true),
        ("TooManyRequestsException", K::Throttled, true),
        ("RequestLimitExceeded", K::Throttled, true),
        ("ServiceUnavailable", K::Other, true),
        ("ServiceUnavailableException", K::Other, true),
        ("InternalFailure", K::Other, true),
        ("InternalError", K::Other, true),
        ("AccessDenied", K::PermissionDenied, false),
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
        let describe = mock!(Client::describe_services)
            .sequence()
            .error(move || generic(code))
            .output(|| describe_ok(3))
            .repeatedly()
            .build();
        let update =
            mock!(Client::update_service).then_output(|| UpdateServiceOutput::builder().build());
        let services = services_with(&[&describe, &update]);
        let (mut b, _) = binding(&services);
        let r = b.tick().await;
        assert!(
            matches!(r.outcome, Outcome::Held { .. }),
            "{code}: {:?}",
            r.outcome
        );
        let e = r.capacity_error.expect("recorded");
        assert_eq!(
            (e.kind, e.transient),
            (kind, transient),
            "{code}: {}",
            e.message
        );
        assert_eq!(update.num_calls(), 0, "{code}: a fault never scales in");
        let r = b.tick().await;
        assert!(
            matches!(r.outcome, Outcome::Set { from: 3, to: 0, .. }),
            "{code}: {:?}",
            r.outcome
        );
    }
}

#[tokio::test]
async fn a_missing_service_is_not_found_and_held() {
    let describe = mock!(Client::describe_services)
        .sequence()
        .output(missing)
        .times(2)
        .output(|| describe_ok(3))
        .repeatedly()
        .build();
    fault_holds_then_recovers(
        describe,
        |e| {
            matches!(e, EcsError::ServiceNotFound { cluster, service, reason }
                if cluster == CLUSTER && service == SERVICE && reason == "MISSING")
        },
        ErrorKind::NotFound,
        false,
    )
    .await;
}

#[tokio::test]
async fn a_missing_cluster_is_not_found() {
    fault_holds_then_recovers(
        twice_then_ok(|| {
            DescribeServicesError::ClusterNotFoundException(
                ClusterNotFoundException::builder()
                    .message("Cluster not found.")
                    .build(),
            )
        }),
        |e| matches!(e, EcsError::ServiceNotFound { reason, .. } if reason == "ClusterNotFoundException"),
        ErrorKind::NotFound,
        false,
    )
    .await;
}

#[tokio::test]
async fn a_throttled_update_fails_the_set_and_the_next_tick_retries() {
    let describe = mock!(Client::describe_services).then_output(|| describe_ok(3));
    let update = mock!(Client::update_service)
        .sequence()
        .error(|| {
            UpdateServiceError::generic(
                ErrorMetadata::builder()
                    .code("ThrottlingException")
                    .message("Rate exceeded")
                    .build(),
            )
        })
        .output(|| UpdateServiceOutput::builder().build())
        .build();
    let services = services_with(&[&describe, &update]);
    let (mut b, _) = binding(&services);
    let r = b.tick().await;
    match &r.outcome {
        Outcome::SetFailed { to: 0, error } => {
            assert_eq!((error.kind, error.transient), (ErrorKind::Throttled, true))
        }
        other => panic!("expected SetFailed, got {other:?}"),
    }
    assert_eq!(r.next_tick_in, INTERVAL * 2, "backs off");
    let r = b.tick().await;
    assert!(
        matches!(r.outcome, Outcome::Set { from: 3, to: 0, .. }),
        "{:?}",
        r.outcome
    );
    assert_eq!(update.num_calls(), 2);
}

/// A stub ECS endpoint: the first `hang` connections are accepted and never answered; later
/// ones get a `DescribeServices` answer with the service at 3 tasks.
async fn stub_endpoint(hang: usize) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut sock, _)) = listener.accept().await {
            if held.len() < hang {
                held.push(sock);
                continue;
            }
            tokio::spawn(async move {
                // Read the request head and body (Content-Length), then answer and close.
                if celery_scale_testing::read_http_request(&mut sock)
                    .await
                    .is_none()
                {
                    return;
                }
                let body = format!(
                    r#"{{"services":[{{"serviceName":"{SERVICE}","status":"ACTIVE","desiredCount":3,"runningCount":3,"pendingCount":0}}],"failures":[]}}"#
                );
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(response.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}"), task)
}

#[tokio::test]
async fn a_hung_endpoint_times_out_holds_and_recovers() {
    let (endpoint, stub) = stub_endpoint(2).await;
    let config = aws_sdk_ecs::Config::builder()
        .behavior_version(aws_sdk_ecs::config::BehaviorVersion::latest())
        .region(aws_sdk_ecs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ecs::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .endpoint_url(endpoint)
        .retry_config(RetryConfig::disabled())
        .build();
    let settings = AwsSettings::default()
        .cache_ttl(Duration::ZERO)
        .call_timeout(Duration::from_millis(300));
    let services = EcsServices::new(Client::from_conf(config), settings).unwrap();
    let (mut b, scaler) = binding(&services);

    let e = scaler.read().await.expect_err("hangs");
    assert!(
        matches!(e, EcsError::Aws(AwsError::Timeout { after: Some(after), .. }) if after == Duration::from_millis(300)),
        "{e:?}"
    );
    assert!(transient_(&e));

    let r = b.tick().await;
    let recorded = r.capacity_error.expect("recorded");
    assert_eq!(
        (recorded.kind, recorded.transient),
        (ErrorKind::Timeout, true),
        "{}",
        recorded.message
    );
    assert!(matches!(r.outcome, Outcome::Held { .. }));

    // The endpoint answers again (the stub answers `UpdateService` with a body the SDK reads
    // as an empty output): the loop recovers and scales the idle service in.
    let r = b.tick().await;
    assert!(
        matches!(r.outcome, Outcome::Set { from: 3, to: 0, .. }),
        "{:?}",
        r.outcome
    );
    stub.abort();
}

fn describe_echo() -> Rule {
    mock!(Client::describe_services).then_compute_output(|req| {
        let mut out = DescribeServicesOutput::builder();
        for name in req.services() {
            out = out.services(service(name, 2));
        }
        out.build()
    })
}

/// 25 bindings whose queues hold 5 messages each: 2 tasks at 2.5 messages per worker, which is
/// what every service already has.
fn twenty_five(
    services: &EcsServices,
    settings: impl Fn(usize) -> LoopSettings,
) -> Vec<(Binding, MemoryQueue)> {
    (0..25)
        .map(|i| {
            let scaler = services
                .scaler(EcsServiceConfig::new(CLUSTER, format!("svc-{i}")))
                .unwrap();
            let q = MemoryQueue::new();
            q.publish_n("celery", 5);
            let b = Binding::new(
                settings(i),
                Box::new(q.clone()),
                Box::new(scaler),
                PolicyConfig {
                    kind: PolicyKind::TargetBacklog,
                    messages_per_worker: 2.5,
                    ..PolicyConfig::default()
                }
                .build()
                .unwrap(),
            )
            .unwrap();
            (b, q)
        })
        .collect()
}

#[tokio::test]
async fn twenty_five_services_cost_three_describes_per_round() {
    let describe = describe_echo();
    let update =
        mock!(Client::update_service).then_output(|| UpdateServiceOutput::builder().build());
    let services = EcsServices::new(
        mocked_client(&[&describe, &update]),
        AwsSettings::default().cache_ttl(Duration::from_millis(100)),
    )
    .unwrap();
    let mut auto = Autoscaler::new();
    let mut queues = Vec::new();
    for (b, q) in twenty_five(&services, |i| LoopSettings {
        name: format!("b{i}"),
        ..LoopSettings::default()
    }) {
        auto = auto.with_binding(b);
        queues.push(q);
    }
    for round in 1..=2u64 {
        let records = auto.tick_all().await;
        assert!(
            records
                .iter()
                .all(|r| r.outcome == Outcome::Unchanged { units: 2 }),
            "{:?}",
            records[0].outcome
        );
        assert_eq!(
            describe.num_calls() as u64,
            3 * round,
            "ceil(25 / 10) DescribeServices per round"
        );
        assert_eq!(update.num_calls(), 0, "nothing changed: no UpdateService");
        // The next round is a new read.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // One queue grows: that service alone is updated, and the round still reads with 3 calls.
    queues[7].publish_n("celery", 20);
    let records = auto.tick_all().await;
    assert!(
        matches!(
            records[7].outcome,
            Outcome::Set {
                from: 2,
                to: 10,
                ..
            }
        ),
        "{:?}",
        records[7].outcome
    );
    assert_eq!(
        services.calls(),
        EcsCalls {
            describe_services: 9,
            update_service: 1
        }
    );
    assert_eq!(
        describe.num_calls(),
        9,
        "the handle counts what the SDK sent"
    );
}

#[tokio::test]
async fn bindings_on_their_own_tasks_share_the_reads_too() {
    let describe = describe_echo();
    let update =
        mock!(Client::update_service).then_output(|| UpdateServiceOutput::builder().build());
    let services = EcsServices::new(
        mocked_client(&[&describe, &update]),
        AwsSettings::default().cache_ttl(Duration::from_millis(100)),
    )
    .unwrap();
    let log = Arc::new(RecordLog::new());
    let interval = Duration::from_millis(300);
    let mut auto = Autoscaler::new();
    for (b, _) in twenty_five(&services, |i| LoopSettings {
        name: format!("b{i}"),
        interval,
        ..LoopSettings::default()
    }) {
        auto = auto.with_binding(b.with_sink(log.clone()));
    }
    // `Autoscaler::run` ticks every binding on its own task: rounds at 0, 300 and 600 ms.
    let cancel = CancellationToken::new();
    let running = tokio::spawn(auto.run(cancel.clone()));
    tokio::time::sleep(interval * 5 / 2).await;
    cancel.cancel();
    running.await.unwrap();
    let records = log.records();
    assert_eq!(records.len() % 25, 0, "whole rounds: {}", records.len());
    let rounds = (records.len() / 25) as u64;
    assert!(rounds >= 2, "{rounds} rounds");
    assert_eq!(
        services.calls(),
        EcsCalls {
            describe_services: 3 * rounds,
            update_service: 0
        }
    );
}

/// A negative count is a bad answer, never read as 0 tasks: the tick holds with `invalid_data`.
#[tokio::test]
async fn a_negative_count_is_invalid_data_not_zero() {
    let describe = mock!(Client::describe_services)
        .sequence()
        .output(|| {
            DescribeServicesOutput::builder()
                .services(
                    Service::builder()
                        .service_name(SERVICE)
                        .status("ACTIVE")
                        .desired_count(3)
                        .running_count(-1)
                        .pending_count(0)
                        .build(),
                )
                .build()
        })
        .output(|| describe_ok(3))
        .repeatedly()
        .build();
    let update =
        mock!(Client::update_service).then_output(|| UpdateServiceOutput::builder().build());
    let services = services_with(&[&describe, &update]);
    let (mut b, _) = binding(&services);
    let r = b.tick().await;
    assert!(matches!(r.outcome, Outcome::Held { .. }), "{:?}", r.outcome);
    let e = r.capacity_error.expect("recorded");
    assert_eq!(
        (e.kind, e.transient),
        (ErrorKind::InvalidData, false),
        "{}",
        e.message
    );
    assert!(e.message.contains("runningCount -1"), "{}", e.message);
    assert_eq!(update.num_calls(), 0);
    let r = b.tick().await;
    assert!(
        matches!(r.outcome, Outcome::Set { from: 3, to: 0, .. }),
        "{:?}",
        r.outcome
    );
}
