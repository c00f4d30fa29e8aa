//! [`Ec2Error`]: what can go wrong talking to EC2 Auto Scaling, by meaning, and its mapping into
//! [`celery_scale_core::Error`].

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_autoscaling::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_autoscaling::operation::describe_auto_scaling_groups::DescribeAutoScalingGroupsError;
use aws_sdk_autoscaling::operation::set_desired_capacity::SetDesiredCapacityError;

/// The backend name used in [`celery_scale_core::Error`]s and metrics.
pub const BACKEND: &str = "autoscaling";

/// An error kept as the source of an [`Ec2Error`]. Shared (`Arc`) so one failed
/// `DescribeAutoScalingGroups` call can be reported to every binding that waited for it.
pub type SharedSource = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong talking to EC2 Auto Scaling.
///
/// [`Ec2Error::is_transient`] says whether the control loop should back off and retry
/// (throttling, a scaling activity in progress, resource contention, 5xx answers, timeouts,
/// unreachable endpoint) or report the same failure every tick (missing group, access denied,
/// validation). Converts into [`celery_scale_core::Error`] with `From`, keeping itself as the
/// source.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Ec2Error {
    /// `DescribeAutoScalingGroups` did not return the group: it does not exist in this account
    /// and region.
    #[error("Auto Scaling group '{group}' not found")]
    GroupNotFound {
        /// The group name from the configuration.
        group: String,
    },
    /// The credentials are not allowed to make the call (`AccessDenied`, expired or invalid
    /// credentials).
    #[error("access denied calling {operation}: {message}")]
    AccessDenied {
        /// The API operation.
        operation: &'static str,
        /// What AWS said.
        message: String,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// Auto Scaling throttled the call (`Throttling`), after the SDK's own retries.
    #[error("{operation} was throttled")]
    Throttling {
        /// The API operation.
        operation: &'static str,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// `SetDesiredCapacity` was refused because a scaling activity is in progress
    /// (`ScalingActivityInProgress`).
    #[error("a scaling activity is in progress on Auto Scaling group '{group}'")]
    ScalingActivityInProgress {
        /// The group.
        group: String,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// Another update to the same resource is pending (`ResourceContention`).
    #[error("{operation}: another update to the resource is pending (resource contention)")]
    ResourceContention {
        /// The API operation.
        operation: &'static str,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// Auto Scaling rejected the request as invalid (`ValidationError`), e.g. a desired
    /// capacity outside the group's bounds.
    #[error("{operation} rejected as invalid: {message}")]
    Validation {
        /// The API operation.
        operation: &'static str,
        /// What AWS said.
        message: String,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// The call did not finish within the timeout: this crate's `call_timeout` (`after` is
    /// set) or the SDK's own connect/operation timeout (`after` is `None`).
    #[error("{operation} timed out{}", after.map(|d| format!(" after {d:?}")).unwrap_or_default())]
    Timeout {
        /// The API operation.
        operation: &'static str,
        /// The timeout that elapsed, when it is this crate's.
        after: Option<Duration>,
    },
    /// Auto Scaling answered with a server error (HTTP 5xx).
    #[error("{operation}: Auto Scaling server error (HTTP {status})")]
    ServerError {
        /// The API operation.
        operation: &'static str,
        /// The HTTP status.
        status: u16,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// The endpoint could not be reached (connection refused, DNS, TLS).
    #[error("{operation}: Auto Scaling endpoint unreachable")]
    Unreachable {
        /// The API operation.
        operation: &'static str,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// The answer could not be interpreted (unparseable response, a group without bounds).
    #[error("{operation}: unexpected answer: {message}")]
    InvalidResponse {
        /// The API operation.
        operation: &'static str,
        /// What was wrong.
        message: String,
        /// The SDK error, when there is one.
        #[source]
        source: Option<SharedSource>,
    },
    /// The group uses a capacity type this scaler does not speak (`vcpu`, `memory-mib`).
    #[error(
        "Auto Scaling group '{group}' measures capacity in '{capacity_type}': only 'units' (instances) is supported"
    )]
    UnsupportedGroup {
        /// The group.
        group: String,
        /// The group's `DesiredCapacityType`.
        capacity_type: String,
    },
    /// Any other refusal (an HTTP 4xx this crate does not know, a request the SDK could not
    /// build): not retried faster.
    #[error("{operation} failed: {message}")]
    Other {
        /// The API operation.
        operation: &'static str,
        /// The error code and message.
        message: String,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
}

impl Ec2Error {
    /// Whether the same call may succeed later without a change of configuration.
    pub fn is_transient(&self) -> bool {
        match self {
            Ec2Error::Throttling { .. }
            | Ec2Error::ScalingActivityInProgress { .. }
            | Ec2Error::ResourceContention { .. }
            | Ec2Error::Timeout { .. }
            | Ec2Error::ServerError { .. }
            | Ec2Error::Unreachable { .. } => true,
            Ec2Error::GroupNotFound { .. }
            | Ec2Error::AccessDenied { .. }
            | Ec2Error::Validation { .. }
            | Ec2Error::InvalidResponse { .. }
            | Ec2Error::UnsupportedGroup { .. }
            | Ec2Error::Other { .. } => false,
        }
    }

    /// Classifies a `DescribeAutoScalingGroups` failure.
    pub(crate) fn from_describe(err: SdkError<DescribeAutoScalingGroupsError>) -> Self {
        const OP: &str = "DescribeAutoScalingGroups";
        let modeled = match &err {
            SdkError::ServiceError(ctx) => match ctx.err() {
                DescribeAutoScalingGroupsError::ResourceContentionFault(_) => {
                    Some(Modeled::ResourceContention)
                }
                DescribeAutoScalingGroupsError::InvalidNextToken(_) => Some(Modeled::InvalidToken),
                _ => None,
            },
            _ => None,
        };
        classify(OP, "", modeled, err)
    }

    /// Classifies a `SetDesiredCapacity` failure on `group`.
    pub(crate) fn from_set(group: &str, err: SdkError<SetDesiredCapacityError>) -> Self {
        const OP: &str = "SetDesiredCapacity";
        let modeled = match &err {
            SdkError::ServiceError(ctx) => match ctx.err() {
                SetDesiredCapacityError::ResourceContentionFault(_) => {
                    Some(Modeled::ResourceContention)
                }
                SetDesiredCapacityError::ScalingActivityInProgressFault(_) => {
                    Some(Modeled::ScalingActivityInProgress)
                }
                _ => None,
            },
            _ => None,
        };
        classify(OP, group, modeled, err)
    }
}

/// Faults the SDK models as typed variants.
enum Modeled {
    ResourceContention,
    ScalingActivityInProgress,
    InvalidToken,
}

/// Maps an SDK error to its meaning: the typed variant first, then the error code, then the
/// HTTP status.
fn classify<E>(
    operation: &'static str,
    group: &str,
    modeled: Option<Modeled>,
    err: SdkError<E>,
) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code = err.code().map(str::to_owned);
    let message = err.message().map(str::to_owned);
    let status = err.raw_response().map(|r| r.status().as_u16());
    let timed_out = match &err {
        SdkError::TimeoutError(_) => true,
        SdkError::DispatchFailure(d) => d.is_timeout(),
        _ => false,
    };
    let dispatch = matches!(err, SdkError::DispatchFailure(_));
    let response_error = matches!(err, SdkError::ResponseError(_));
    let source: SharedSource = Arc::new(err);
    let text = match (&code, &message) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => String::from("no error code"),
    };

    match modeled {
        Some(Modeled::ResourceContention) => {
            return Ec2Error::ResourceContention { operation, source };
        }
        Some(Modeled::ScalingActivityInProgress) => {
            return Ec2Error::ScalingActivityInProgress {
                group: group.to_owned(),
                source,
            };
        }
        Some(Modeled::InvalidToken) => {
            return Ec2Error::InvalidResponse {
                operation,
                message: "the pagination token was refused".into(),
                source: Some(source),
            };
        }
        None => {}
    }
    if timed_out {
        return Ec2Error::Timeout {
            operation,
            after: None,
        };
    }
    if dispatch {
        return Ec2Error::Unreachable { operation, source };
    }
    match code.as_deref() {
        Some("Throttling" | "ThrottlingException" | "RequestLimitExceeded" | "TooManyRequests") => {
            return Ec2Error::Throttling { operation, source };
        }
        Some("ScalingActivityInProgress" | "ScalingActivityInProgressFault") => {
            return Ec2Error::ScalingActivityInProgress {
                group: group.to_owned(),
                source,
            };
        }
        Some("ResourceContention" | "ResourceContentionFault") => {
            return Ec2Error::ResourceContention { operation, source };
        }
        Some(
            "AccessDenied"
            | "AccessDeniedException"
            | "UnauthorizedOperation"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "ExpiredToken"
            | "ExpiredTokenException"
            | "UnrecognizedClientException"
            | "MissingAuthenticationToken",
        ) => {
            return Ec2Error::AccessDenied {
                operation,
                message: text,
                source,
            };
        }
        Some("ValidationError" | "ValidationException") => {
            return Ec2Error::Validation {
                operation,
                message: message.unwrap_or(text),
                source,
            };
        }
        Some("ServiceUnavailable" | "InternalFailure" | "InternalError") => {
            return Ec2Error::ServerError {
                operation,
                status: status.unwrap_or(500),
                source,
            };
        }
        _ => {}
    }
    match status {
        Some(s) if s >= 500 => Ec2Error::ServerError {
            operation,
            status: s,
            source,
        },
        Some(401 | 403) => Ec2Error::AccessDenied {
            operation,
            message: text,
            source,
        },
        Some(429) => Ec2Error::Throttling { operation, source },
        _ if response_error => Ec2Error::InvalidResponse {
            operation,
            message: "the response could not be parsed".into(),
            source: Some(source),
        },
        _ => Ec2Error::Other {
            operation,
            message: text,
            source,
        },
    }
}

impl From<Ec2Error> for celery_scale_core::Error {
    fn from(e: Ec2Error) -> Self {
        use celery_scale_core::Error;
        match e {
            Ec2Error::GroupNotFound { ref group } => Error::NotFound {
                backend: BACKEND,
                what: format!("Auto Scaling group '{group}'"),
                source: Some(Box::new(e)),
            },
            Ec2Error::AccessDenied { ref message, .. } => Error::PermissionDenied {
                backend: BACKEND,
                message: message.clone(),
                source: Some(Box::new(e)),
            },
            Ec2Error::Throttling { .. } => Error::Throttled {
                backend: BACKEND,
                source: Some(Box::new(e)),
            },
            Ec2Error::ScalingActivityInProgress { .. }
            | Ec2Error::ResourceContention { .. }
            | Ec2Error::Validation { .. } => Error::Rejected {
                backend: BACKEND,
                message: e.to_string(),
                transient: e.is_transient(),
                source: Some(Box::new(e)),
            },
            Ec2Error::Timeout { operation, after } => Error::Timeout {
                operation: match after {
                    Some(_) => operation.to_owned(),
                    None => format!("{operation} (SDK connect or operation timeout)"),
                },
                after: after.unwrap_or_default(),
                source: Some(Box::new(e)),
            },
            Ec2Error::Unreachable { .. } => Error::Unavailable {
                backend: BACKEND,
                message: e.to_string(),
                source: Some(Box::new(e)),
            },
            Ec2Error::InvalidResponse { .. } | Ec2Error::UnsupportedGroup { .. } => {
                Error::InvalidData {
                    backend: BACKEND,
                    message: e.to_string(),
                    source: Some(Box::new(e)),
                }
            }
            Ec2Error::ServerError { .. } | Ec2Error::Other { .. } => Error::Other {
                backend: BACKEND,
                message: e.to_string(),
                transient: e.is_transient(),
                source: Some(Box::new(e)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_autoscaling::error::ErrorMetadata;
    use aws_sdk_autoscaling::types::error::ScalingActivityInProgressFault;
    use celery_scale_core::ErrorKind;

    fn service<E>(e: E) -> SdkError<E> {
        SdkError::service_error(e, aws_smithy_runtime_api_response(400))
    }

    fn aws_smithy_runtime_api_response(
        status: u16,
    ) -> aws_sdk_autoscaling::config::http::HttpResponse {
        aws_sdk_autoscaling::config::http::HttpResponse::new(
            status.try_into().unwrap(),
            aws_smithy_types::body::SdkBody::empty(),
        )
    }

    fn generic(code: &str) -> SdkError<DescribeAutoScalingGroupsError> {
        service(DescribeAutoScalingGroupsError::generic(
            ErrorMetadata::builder().code(code).message("m").build(),
        ))
    }

    #[test]
    fn codes_map_to_meanings() {
        let cases: [(&str, ErrorKind, bool); 5] = [
            ("Throttling", ErrorKind::Throttled, true),
            ("AccessDenied", ErrorKind::PermissionDenied, false),
            ("ValidationError", ErrorKind::Rejected, false),
            ("ResourceContention", ErrorKind::Rejected, true),
            ("SomethingNew", ErrorKind::Other, false),
        ];
        for (code, kind, transient) in cases {
            let e = Ec2Error::from_describe(generic(code));
            assert_eq!(e.is_transient(), transient, "{code}: {e}");
            let core: celery_scale_core::Error = e.into();
            assert_eq!(core.kind(), kind, "{code}");
            assert_eq!(core.is_transient(), transient, "{code}");
        }
    }

    #[test]
    fn modeled_scaling_activity_is_transient_rejection() {
        let e = Ec2Error::from_set(
            "workers",
            service(SetDesiredCapacityError::ScalingActivityInProgressFault(
                ScalingActivityInProgressFault::builder()
                    .message("busy")
                    .build(),
            )),
        );
        assert!(
            matches!(e, Ec2Error::ScalingActivityInProgress { ref group, .. } if group == "workers")
        );
        let core: celery_scale_core::Error = e.into();
        assert_eq!(core.kind(), ErrorKind::Rejected);
        assert!(core.is_transient());
        assert!(
            std::error::Error::source(&core).is_some(),
            "the source is kept"
        );
    }

    #[test]
    fn server_errors_are_transient() {
        let err = SdkError::service_error(
            DescribeAutoScalingGroupsError::generic(ErrorMetadata::builder().build()),
            aws_smithy_runtime_api_response(503),
        );
        let e = Ec2Error::from_describe(err);
        assert!(
            matches!(e, Ec2Error::ServerError { status: 503, .. }),
            "{e:?}"
        );
        assert!(e.is_transient());
    }

    #[test]
    fn core_errors_keep_this_crates_error_as_source() {
        for e in [
            Ec2Error::GroupNotFound {
                group: "workers".into(),
            },
            Ec2Error::Timeout {
                operation: "DescribeAutoScalingGroups",
                after: Some(std::time::Duration::from_secs(4)),
            },
        ] {
            let core = celery_scale_core::Error::from(e);
            let kept = std::error::Error::source(&core).expect("a source");
            assert!(kept.is::<Ec2Error>(), "{core}: {kept:?}");
        }
    }
}
