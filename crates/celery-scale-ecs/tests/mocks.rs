//! ECS faults through aws-smithy-mocks: each gives its typed error, the loop holds (never scales
//! in) and recovers on the next good answer; and 25 services cost 3 `DescribeServices` calls.

use std::time::Duration;

use aws_sdk_ecs::Client;
use aws_sdk_ecs::config::retry::RetryConfig;
use aws_sdk_ecs::error::ErrorMetadata;
use aws_sdk_ecs::operation::describe_services::{DescribeServicesError, DescribeServicesOutput};
use aws_sdk_ecs::operation::update_service::UpdateServiceOutput;
use aws_sdk_ecs::types::{Failure, Service};
use aws_smithy_mocks::{Rule, RuleMode, mock, mock_client};
use celery_scale_core::config::{PolicyConfig, PolicyKind};
use celery_scale_core::record::Outcome;
use celery_scale_core::{Binding, ErrorKind, LoopSettings, MemoryQueue, Scaler};
use celery_scale_ecs::{EcsServiceConfig, EcsServices, EcsSettings};

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

fn generic(code: &str) -> DescribeServicesError {
    DescribeServicesError::generic(
        ErrorMetadata::builder()
            .code(code)
            .message("mocked")
            .build(),
    )
}

fn services_with(rules: &[&Rule]) -> EcsServices {
    let client: Client = mock_client!(aws_sdk_ecs, RuleMode::MatchAny, rules, |c| c
        .retry_config(RetryConfig::disabled()));
    EcsServices::new(client, EcsSettings::default().cache_ttl(Duration::ZERO)).unwrap()
}

fn binding(services: &EcsServices) -> Binding {
    let scaler = services
        .scaler(EcsServiceConfig::new(CLUSTER, SERVICE))
        .unwrap();
    let queue = MemoryQueue::new();
    queue.declare("celery");
    Binding::new(
        LoopSettings {
            name: "ecs-mock".into(),
            interval: INTERVAL,
            timeout: Duration::from_secs(3),
            max_staleness: Duration::from_secs(30),
            max_backoff: Duration::from_secs(8),
            dry_run: false,
        },
        Box::new(queue),
        Box::new(scaler),
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

/// A describe fault holds (the empty queue would scale 3 tasks in), then the next good answer
/// scales in.
async fn fault_holds_then_recovers(
    fault: impl Fn() -> DescribeServicesError + Send + Sync + 'static,
    kind: ErrorKind,
    transient: bool,
) {
    let describe = mock!(Client::describe_services)
        .sequence()
        .error(fault)
        .output(|| describe_ok(3))
        .repeatedly()
        .build();
    let update =
        mock!(Client::update_service).then_output(|| UpdateServiceOutput::builder().build());
    let services = services_with(&[&describe, &update]);
    let mut b = binding(&services);
    let r = b.tick().await;
    assert!(matches!(r.outcome, Outcome::Held { .. }), "{:?}", r.outcome);
    let e = r.capacity_error.expect("recorded");
    assert_eq!((e.kind, e.transient), (kind, transient), "{}", e.message);
    assert_eq!(
        r.next_tick_in,
        if transient { INTERVAL * 2 } else { INTERVAL }
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
    assert_eq!(update.num_calls(), 1);
}

#[tokio::test]
async fn throttling_is_transient() {
    fault_holds_then_recovers(
        || generic("ThrottlingException"),
        ErrorKind::Throttled,
        true,
    )
    .await;
}

#[tokio::test]
async fn server_errors_are_transient() {
    fault_holds_then_recovers(|| generic("ServerException"), ErrorKind::Other, true).await;
}

#[tokio::test]
async fn access_denied_is_permanent() {
    fault_holds_then_recovers(
        || generic("AccessDeniedException"),
        ErrorKind::PermissionDenied,
        false,
    )
    .await;
}

#[tokio::test]
async fn a_raw_503_is_transient() {
    let describe = mock!(Client::describe_services)
        .sequence()
        .http_response(|| {
            aws_smithy_runtime_api::http::Response::new(
                aws_smithy_runtime_api::http::StatusCode::try_from(503).unwrap(),
                aws_smithy_types::body::SdkBody::from("{}"),
            )
        })
        .output(|| describe_ok(3))
        .build();
    let services = services_with(&[&describe]);
    let scaler = services
        .scaler(EcsServiceConfig::new(CLUSTER, SERVICE))
        .unwrap();
    let e = scaler.capacity().await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(scaler.capacity().await.unwrap().desired, 3);
}

#[tokio::test]
async fn a_missing_service_is_not_found_and_held() {
    let describe = mock!(Client::describe_services).then_output(|| {
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
    });
    let services = services_with(&[&describe]);
    let mut b = binding(&services);
    let r = b.tick().await;
    let e = r.capacity_error.expect("recorded");
    assert_eq!((e.kind, e.transient), (ErrorKind::NotFound, false));
    assert!(
        e.message.contains(SERVICE) && e.message.contains(CLUSTER),
        "{}",
        e.message
    );
    assert_eq!(
        r.next_tick_in, INTERVAL,
        "a missing service does not back off"
    );
}

#[tokio::test]
async fn a_hung_endpoint_times_out_and_holds() {
    // A real TCP endpoint that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let config = aws_sdk_ecs::Config::builder()
        .behavior_version(aws_sdk_ecs::config::BehaviorVersion::latest())
        .region(aws_sdk_ecs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ecs::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .endpoint_url(format!("http://{addr}"))
        .retry_config(RetryConfig::disabled())
        .build();
    let settings = EcsSettings {
        cache_ttl: Duration::ZERO,
        operation_timeout: Duration::from_millis(300),
    };
    let services = EcsServices::new(Client::from_conf(config), settings).unwrap();
    let mut b = binding(&services);
    let r = b.tick().await;
    let e = r.capacity_error.expect("recorded");
    assert_eq!(
        (e.kind, e.transient),
        (ErrorKind::Timeout, true),
        "{}",
        e.message
    );
    assert!(matches!(r.outcome, Outcome::Held { .. }));
    accept.abort();
}

#[tokio::test]
async fn twenty_five_services_cost_three_describes() {
    let describe = mock!(Client::describe_services).then_compute_output(|req| {
        let mut out = DescribeServicesOutput::builder();
        for name in req.services() {
            out = out.services(service(name, 2));
        }
        out.build()
    });
    let update =
        mock!(Client::update_service).then_output(|| UpdateServiceOutput::builder().build());
    let client: Client = mock_client!(aws_sdk_ecs, RuleMode::MatchAny, [&describe, &update], |c| c
        .retry_config(RetryConfig::disabled()));
    let services = EcsServices::new(
        client,
        EcsSettings::default().cache_ttl(Duration::from_secs(60)),
    )
    .unwrap();
    let scalers: Vec<_> = (0..25)
        .map(|i| {
            services
                .scaler(EcsServiceConfig::new(CLUSTER, format!("svc-{i}")))
                .unwrap()
        })
        .collect();
    // One loop round: every binding reads, concurrently; nothing changes, so nothing is set.
    let mut auto = celery_scale_core::Autoscaler::new();
    for (i, s) in scalers.into_iter().enumerate() {
        let q = MemoryQueue::new();
        q.publish_n("celery", 5);
        auto = auto.with_binding(
            Binding::new(
                LoopSettings {
                    name: format!("b{i}"),
                    ..LoopSettings::default()
                },
                Box::new(q),
                Box::new(s),
                PolicyConfig {
                    kind: PolicyKind::TargetBacklog,
                    messages_per_worker: 2.5,
                    ..PolicyConfig::default()
                }
                .build()
                .unwrap(),
            )
            .unwrap(),
        );
    }
    let records = auto.tick_all().await;
    assert!(
        records
            .iter()
            .all(|r| r.outcome == Outcome::Unchanged { units: 2 }),
        "{:?}",
        records[0].outcome
    );
    assert_eq!(
        describe.num_calls(),
        3,
        "ceil(25 / 10) DescribeServices per read"
    );
    assert_eq!(update.num_calls(), 0, "nothing changed: no UpdateService");
}
