//! SQS faults through aws-smithy-mocks (moto's error answers are not AWS's): throttling and 5xx
//! are transient, access denied and a missing queue permanent and named, a bad count is invalid
//! data never read as 0; discovery follows ListQueues pages.

use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::retry::RetryConfig;
use aws_sdk_sqs::error::ErrorMetadata;
use aws_sdk_sqs::operation::get_queue_attributes::{
    GetQueueAttributesError, GetQueueAttributesOutput,
};
use aws_sdk_sqs::operation::get_queue_url::{GetQueueUrlError, GetQueueUrlOutput};
use aws_sdk_sqs::operation::list_queues::ListQueuesOutput;
use aws_sdk_sqs::types::QueueAttributeName as A;
use aws_sdk_sqs::types::error::{QueueDoesNotExist, RequestThrottled};
use aws_smithy_mocks::{Rule, RuleMode, mock, mock_client};
use celery_scale_core::{ErrorKind, QueueSource};
use celery_scale_sqs::{
    AwsError, AwsSettings, DiscoveryConfig, SqsError, SqsQueueSource, SqsSourceConfig,
};

const URL: &str = "https://sqs.us-east-1.amazonaws.com/123456789012/prod-emails-high";

fn client(rules: &[&Rule]) -> Client {
    mock_client!(aws_sdk_sqs, RuleMode::MatchAny, rules, |c| c
        .retry_config(RetryConfig::disabled()))
}

fn url_ok() -> Rule {
    mock!(Client::get_queue_url).then_output(|| GetQueueUrlOutput::builder().queue_url(URL).build())
}

fn attrs(visible: &str, not_visible: &str) -> GetQueueAttributesOutput {
    GetQueueAttributesOutput::builder()
        .attributes(A::ApproximateNumberOfMessages, visible)
        .attributes(A::ApproximateNumberOfMessagesNotVisible, not_visible)
        .attributes(A::ApproximateNumberOfMessagesDelayed, "0")
        .build()
}

fn source(rules: &[&Rule]) -> SqsQueueSource {
    let config = SqsSourceConfig::builder()
        .queue_name_prefix("prod-")
        .queue("emails.high")
        .build()
        .unwrap();
    SqsQueueSource::new(
        client(rules),
        AwsSettings::default().call_timeout(Duration::from_secs(2)),
        config,
    )
    .unwrap()
}

fn generic(code: &str) -> GetQueueAttributesError {
    GetQueueAttributesError::generic(
        ErrorMetadata::builder()
            .code(code)
            .message("mocked")
            .build(),
    )
}

/// The fault once, then a good answer: the typed error, the core kind and transience, the
/// queue named; then the next observation recovers.
async fn fault_then_recovers(
    fault: Rule,
    typed: fn(&SqsError) -> bool,
    kind: ErrorKind,
    transient: bool,
) {
    let url = url_ok();
    let s = source(&[&url, &fault]);
    let e = s.read().await.expect_err("the fault");
    assert!(typed(&e), "unexpected SqsError: {e:?}");
    assert_eq!(e.queue(), Some("emails.high"), "{e:?}");
    let core = celery_scale_core::Error::from(e);
    assert_eq!(core.kind(), kind, "{core}");
    assert_eq!(core.is_transient(), transient, "{core}");
    // Named in the message or, for throttling (whose core message has none), in the source.
    let chain = format!(
        "{core}: {}",
        std::error::Error::source(&core).map_or(String::new(), |s| s.to_string())
    );
    assert!(chain.contains("emails.high"), "the queue is named: {chain}");
    let obs = s.observe().await.expect("recovers");
    assert_eq!((obs.ready, obs.in_flight), (7, Some(2)));
}

#[tokio::test]
async fn throttling_is_transient() {
    let fault = mock!(Client::get_queue_attributes)
        .sequence()
        .error(|| {
            GetQueueAttributesError::RequestThrottled(
                RequestThrottled::builder().message("slow down").build(),
            )
        })
        .output(|| attrs("7", "2"))
        .repeatedly()
        .build();
    fault_then_recovers(
        fault,
        |e| {
            matches!(e, SqsError::Queue { .. })
                && matches!(e.as_aws(), Some(AwsError::Throttled { .. }))
        },
        ErrorKind::Throttled,
        true,
    )
    .await;
}

#[tokio::test]
async fn a_5xx_is_transient() {
    let fault = mock!(Client::get_queue_attributes)
        .sequence()
        .http_status(503, Some("{}".into()))
        .output(|| attrs("7", "2"))
        .repeatedly()
        .build();
    fault_then_recovers(
        fault,
        |e| {
            matches!(e, SqsError::Queue { .. })
                && matches!(e.as_aws(), Some(AwsError::ServiceFault { .. }))
        },
        ErrorKind::Other,
        true,
    )
    .await;
}

#[tokio::test]
async fn access_denied_is_permanent_and_names_the_queue() {
    let fault = mock!(Client::get_queue_attributes)
        .sequence()
        .error(|| generic("AccessDenied"))
        .output(|| attrs("7", "2"))
        .repeatedly()
        .build();
    fault_then_recovers(
        fault,
        |e| {
            matches!(e, SqsError::Queue { .. })
                && matches!(e.as_aws(), Some(AwsError::PermissionDenied { .. }))
        },
        ErrorKind::PermissionDenied,
        false,
    )
    .await;
}

#[tokio::test]
async fn a_missing_queue_is_permanent_named_and_resolved_again() {
    let fault = mock!(Client::get_queue_attributes)
        .sequence()
        .error(|| GetQueueAttributesError::QueueDoesNotExist(QueueDoesNotExist::builder().build()))
        .output(|| attrs("7", "2"))
        .repeatedly()
        .build();
    let url = url_ok();
    let s = source(&[&url, &fault]);
    let e = s.read().await.unwrap_err();
    assert!(
        matches!(&e, SqsError::QueueNotFound { sqs_name, .. } if sqs_name == "prod-emails-high"),
        "{e:?}"
    );
    let core = celery_scale_core::Error::from(e);
    assert_eq!(core.kind(), ErrorKind::NotFound);
    assert!(!core.is_transient());
    assert_eq!(s.calls().get_queue_url, 1);
    s.observe().await.unwrap();
    assert_eq!(
        s.calls().get_queue_url,
        2,
        "the missing queue's URL is asked again"
    );
    s.observe().await.unwrap();
    assert_eq!(s.calls().get_queue_url, 2, "then reused");
}

#[tokio::test]
async fn get_queue_url_faults_are_typed_too() {
    let missing = mock!(Client::get_queue_url)
        .then_error(|| GetQueueUrlError::QueueDoesNotExist(QueueDoesNotExist::builder().build()));
    let e = source(&[&missing]).read().await.unwrap_err();
    assert!(matches!(e, SqsError::QueueNotFound { .. }), "{e:?}");
    let throttled = mock!(Client::get_queue_url).then_error(|| {
        GetQueueUrlError::generic(ErrorMetadata::builder().code("ThrottlingException").build())
    });
    let e = celery_scale_core::Error::from(source(&[&throttled]).read().await.unwrap_err());
    assert_eq!(e.kind(), ErrorKind::Throttled);
    assert!(e.is_transient());
}

#[tokio::test]
async fn a_bad_or_missing_count_is_invalid_data_never_zero() {
    for (visible, not_visible) in [("-1", "0"), ("12x", "0"), ("3", "18446744073709551616")] {
        let url = url_ok();
        let bad =
            mock!(Client::get_queue_attributes).then_output(move || attrs(visible, not_visible));
        let e = source(&[&url, &bad]).observe().await.unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidData,
            "{visible}/{not_visible}: {e}"
        );
        assert!(!e.is_transient());
        assert!(e.to_string().contains("emails.high"), "{e}");
    }
    let url = url_ok();
    let partial = mock!(Client::get_queue_attributes).then_output(|| {
        GetQueueAttributesOutput::builder()
            .attributes(A::ApproximateNumberOfMessages, "4")
            .build()
    });
    let e = source(&[&url, &partial]).read().await.unwrap_err();
    assert!(
        matches!(
            e,
            SqsError::InvalidAttribute {
                attribute: "ApproximateNumberOfMessagesNotVisible",
                value: None,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn discovery_follows_every_list_page() {
    let page = |from: usize, to: usize, next: Option<&str>| {
        let mut b = ListQueuesOutput::builder();
        for i in from..to {
            b = b.queue_urls(format!("https://sqs.us-east-1.amazonaws.com/1/prod-q{i}"));
        }
        if let Some(n) = next {
            b = b.next_token(n);
        }
        b.build()
    };
    let first = mock!(Client::list_queues)
        .match_requests(|r| r.next_token().is_none() && r.queue_name_prefix() == Some("prod-"))
        .then_output(move || page(0, 1000, Some("t1")));
    let second = mock!(Client::list_queues)
        .match_requests(|r| r.next_token() == Some("t1"))
        .then_output(move || page(1000, 1500, None));
    let attributes = mock!(Client::get_queue_attributes).then_output(|| attrs("1", "0"));
    let config = SqsSourceConfig::builder()
        .queue_name_prefix("prod.")
        .discovery(DiscoveryConfig::default())
        .concurrency(32)
        .build()
        .unwrap();
    let s = SqsQueueSource::new(
        client(&[&first, &second, &attributes]),
        AwsSettings::default(),
        config,
    )
    .unwrap();
    let obs = s.observe().await.unwrap();
    assert_eq!(obs.queues.len(), 1500);
    assert_eq!(obs.ready, 1500);
    assert_eq!(obs.queues[1499].queue, "q1499", "named without the prefix");
    let calls = s.calls();
    assert_eq!(
        (calls.list_queues, calls.get_queue_attributes),
        (2, 1500),
        "{calls:?}"
    );
}
