//! [`SqsError`]: what can go wrong reading Celery's queues on SQS, by meaning, and its mapping
//! into [`celery_scale_core::Error`]. What a failed call means (throttled, timed out, permission,
//! ...) is classified once, by [`celery_scale_aws::AwsError`]; this enum adds what only SQS says
//! and the queue each failure is about.

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::operation::get_queue_attributes::GetQueueAttributesError;
use aws_sdk_sqs::operation::get_queue_url::GetQueueUrlError;
use aws_sdk_sqs::operation::list_queues::ListQueuesError;
use celery_scale_aws::{AwsError, Operation};
use celery_scale_core::ConfigError;

/// The backend name used in core errors and metrics.
pub const BACKEND: &str = "sqs";

/// The `GetQueueAttributes` call.
pub(crate) const GET_QUEUE_ATTRIBUTES: Operation = Operation::new(BACKEND, "GetQueueAttributes");
/// The `GetQueueUrl` call.
pub(crate) const GET_QUEUE_URL: Operation = Operation::new(BACKEND, "GetQueueUrl");
/// The `ListQueues` call.
pub(crate) const LIST_QUEUES: Operation = Operation::new(BACKEND, "ListQueues");

/// The codes SQS answers for a queue that does not exist: the modeled `QueueDoesNotExist`
/// (AWS JSON protocol) and the query protocol's code, which SQS still sends in the
/// `x-amzn-query-error` header.
pub const QUEUE_MISSING_CODES: &[&str] = &[
    "QueueDoesNotExist",
    "AWS.SimpleQueueService.NonExistentQueue",
];

/// What went wrong reading Celery's queues on SQS.
///
/// Converts into [`celery_scale_core::Error`] with `From`, keeping itself as the source; the
/// core error's [`is_transient`](celery_scale_core::Error::is_transient) says whether the loop
/// backs off: throttling, timeouts, an unreachable endpoint and 5xx answers are transient; a
/// missing queue, access denied and bad answers are not.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SqsError {
    /// A configuration field is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The queue does not exist (`QueueDoesNotExist` from `GetQueueUrl` or
    /// `GetQueueAttributes`). Celery creates its queues on first publish and when a worker
    /// starts consuming; kombu never would under `predefined_queues`.
    #[error("queue '{queue}' (SQS queue '{sqs_name}') does not exist")]
    QueueNotFound {
        /// The Celery queue name (the SQS name for a discovered queue).
        queue: String,
        /// The SQS queue name.
        sqs_name: String,
        /// The call's classified error.
        #[source]
        source: Option<Box<AwsError>>,
    },
    /// A call about one queue failed (throttled, timed out, unreachable, permission denied,
    /// rejected, ...), as [`AwsError`] classifies it.
    #[error("queue '{queue}': {source}")]
    Queue {
        /// The Celery queue name (the SQS name for a discovered queue).
        queue: String,
        /// The classified error.
        #[source]
        source: Box<AwsError>,
    },
    /// Listing the queues by prefix failed, as [`AwsError`] classifies it.
    #[error("listing queues with prefix '{prefix}': {source}")]
    Discovery {
        /// The prefix listed.
        prefix: String,
        /// The classified error.
        #[source]
        source: Box<AwsError>,
    },
    /// An attribute SQS answered is missing or not a count.
    #[error("queue '{queue}': attribute {attribute} is {}", match value {
        Some(v) => format!("{v:?}, not a count"),
        None => "missing from the answer".to_owned(),
    })]
    InvalidAttribute {
        /// The Celery queue name.
        queue: String,
        /// The attribute, e.g. `ApproximateNumberOfMessages`.
        attribute: &'static str,
        /// What SQS answered, when it answered something (at most 64 characters are kept).
        value: Option<String>,
    },
    /// Discovery found more queues than one source reads.
    #[error("listing queues with prefix '{prefix}' found more than {max} queues")]
    TooManyQueues {
        /// The prefix listed.
        prefix: String,
        /// The bound ([`MAX_QUEUES`](crate::MAX_QUEUES)).
        max: usize,
    },
}

impl SqsError {
    /// The [`AwsError`], when a call failed.
    pub fn as_aws(&self) -> Option<&AwsError> {
        match self {
            SqsError::Queue { source, .. } | SqsError::Discovery { source, .. } => Some(source),
            SqsError::QueueNotFound { source, .. } => source.as_deref(),
            _ => None,
        }
    }

    /// The queue the error is about, when it is about one.
    pub fn queue(&self) -> Option<&str> {
        match self {
            SqsError::QueueNotFound { queue, .. }
            | SqsError::Queue { queue, .. }
            | SqsError::InvalidAttribute { queue, .. } => Some(queue),
            _ => None,
        }
    }
}

/// The name of a modeled SQS exception, for errors whose metadata carries no code (errors
/// built in code, as mocks build them).
pub(crate) trait ModeledCode {
    fn modeled_code(&self) -> Option<&'static str>;
}

macro_rules! modeled {
    ($ty:ident { $($variant:ident),* $(,)? }) => {
        impl ModeledCode for $ty {
            fn modeled_code(&self) -> Option<&'static str> {
                match self {
                    $($ty::$variant(_) => Some(stringify!($variant)),)*
                    _ => None,
                }
            }
        }
    };
}

modeled!(GetQueueAttributesError {
    InvalidAddress,
    InvalidAttributeName,
    InvalidSecurity,
    QueueDoesNotExist,
    RequestThrottled,
    UnsupportedOperation,
});
modeled!(GetQueueUrlError {
    InvalidAddress,
    InvalidSecurity,
    QueueDoesNotExist,
    RequestThrottled,
    UnsupportedOperation,
});
modeled!(ListQueuesError {
    InvalidAddress,
    InvalidSecurity,
    RequestThrottled,
    UnsupportedOperation,
});

/// Whether the SDK error says the queue does not exist.
pub(crate) fn is_queue_missing<E: ProvideErrorMetadata + ModeledCode, R>(
    err: &SdkError<E, R>,
) -> bool {
    let code = err
        .code()
        .or_else(|| err.as_service_error().and_then(ModeledCode::modeled_code));
    code.is_some_and(|c| QUEUE_MISSING_CODES.contains(&c))
}

/// Classifies an SDK error of `operation` (see [`AwsError::from_sdk_modeled`]).
pub(crate) fn classify<E, R>(operation: Operation, err: SdkError<E, R>) -> Box<AwsError>
where
    E: ProvideErrorMetadata + ModeledCode + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let modeled = err.as_service_error().and_then(ModeledCode::modeled_code);
    Box::new(AwsError::from_sdk_modeled(operation, modeled, err))
}

/// `message` with `queue '{queue}': ` in front, so the core error names the queue.
fn naming(queue: &str, message: String) -> String {
    format!("queue '{queue}': {message}")
}

impl From<SqsError> for celery_scale_core::Error {
    fn from(e: SqsError) -> Self {
        use celery_scale_core::Error;
        let message = e.to_string();
        match &e {
            SqsError::Config(c) => Error::Config(c.clone()),
            SqsError::QueueNotFound {
                queue, sqs_name, ..
            } => Error::NotFound {
                backend: BACKEND,
                what: format!("queue '{queue}' (SQS queue '{sqs_name}')"),
                source: Some(Box::new(e.clone())),
            },
            SqsError::Queue { queue, source } => {
                // The one mapping of AWS failures (celery-scale-aws), with the queue named in
                // the messages that carry one.
                let queue = queue.clone();
                match source.to_core(Box::new(e.clone())) {
                    Error::PermissionDenied {
                        backend,
                        message,
                        source,
                    } => Error::PermissionDenied {
                        backend,
                        message: naming(&queue, message),
                        source,
                    },
                    Error::Unavailable {
                        backend,
                        message,
                        source,
                    } => Error::Unavailable {
                        backend,
                        message: naming(&queue, message),
                        source,
                    },
                    Error::Rejected {
                        backend,
                        message,
                        transient,
                        source,
                    } => Error::Rejected {
                        backend,
                        message: naming(&queue, message),
                        transient,
                        source,
                    },
                    Error::InvalidData {
                        backend,
                        message,
                        source,
                    } => Error::InvalidData {
                        backend,
                        message: naming(&queue, message),
                        source,
                    },
                    Error::Other {
                        backend,
                        message,
                        transient,
                        source,
                    } => Error::Other {
                        backend,
                        message: naming(&queue, message),
                        transient,
                        source,
                    },
                    Error::Timeout {
                        operation,
                        after,
                        source,
                    } => Error::Timeout {
                        operation: naming(&queue, operation),
                        after,
                        source,
                    },
                    other => other,
                }
            }
            SqsError::Discovery { source, .. } => source.to_core(Box::new(e.clone())),
            SqsError::InvalidAttribute { .. } | SqsError::TooManyQueues { .. } => {
                Error::InvalidData {
                    backend: BACKEND,
                    message,
                    source: Some(Box::new(e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_scale_core::ErrorKind;

    #[test]
    fn core_errors_name_the_queue_and_keep_this_crates_error() {
        let core = celery_scale_core::Error::from(SqsError::QueueNotFound {
            queue: "emails".into(),
            sqs_name: "prod-emails".into(),
            source: None,
        });
        assert_eq!(core.kind(), ErrorKind::NotFound);
        assert!(!core.is_transient());
        assert!(core.to_string().contains("'emails'"), "{core}");
        assert!(std::error::Error::source(&core).is_some_and(|s| s.is::<SqsError>()));

        let core = celery_scale_core::Error::from(SqsError::Queue {
            queue: "emails".into(),
            source: Box::new(AwsError::timed_out(
                GET_QUEUE_ATTRIBUTES,
                std::time::Duration::from_secs(4),
            )),
        });
        assert_eq!(core.kind(), ErrorKind::Timeout);
        assert!(core.is_transient());
        assert!(core.to_string().contains("'emails'"), "{core}");
        let kept = std::error::Error::source(&core).expect("a source");
        assert!(kept.is::<SqsError>(), "{kept:?}");

        let core = celery_scale_core::Error::from(SqsError::InvalidAttribute {
            queue: "q".into(),
            attribute: "ApproximateNumberOfMessages",
            value: Some("-1".into()),
        });
        assert_eq!(core.kind(), ErrorKind::InvalidData);
        assert!(core.to_string().contains("\"-1\""), "{core}");
    }
}
