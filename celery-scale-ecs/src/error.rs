//! [`EcsError`]: what can go wrong talking to ECS, by meaning, and its mapping into
//! [`celery_scale_core::Error`].

use std::sync::Arc;

use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ecs::operation::describe_services::DescribeServicesError;
use aws_sdk_ecs::operation::update_service::UpdateServiceError;

/// The backend name used in core errors and metrics.
pub const BACKEND: &str = "ecs";

/// The SDK error kept as a source; shared because one failed `DescribeServices` answers every
/// binding that waited for it.
pub type SharedSource = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong talking to ECS.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum EcsError {
    /// The service (or its cluster) does not exist: `DescribeServices` listed it in `failures`
    /// (reason `MISSING`), or the call answered `ClusterNotFoundException` /
    /// `ServiceNotFoundException`.
    #[error("service '{service}' in cluster '{cluster}' not found ({reason})")]
    NotFound {
        /// The cluster.
        cluster: String,
        /// The service.
        service: String,
        /// What ECS said, e.g. `MISSING`.
        reason: String,
    },
    /// The credentials may not make the call.
    #[error("access denied calling {operation}: {message}")]
    AccessDenied {
        /// The operation.
        operation: &'static str,
        /// What AWS said.
        message: String,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// ECS throttled the call (`ThrottlingException`), after the SDK's own retries.
    #[error("{operation} was throttled")]
    Throttled {
        /// The operation.
        operation: &'static str,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// The call timed out.
    #[error("{operation} timed out")]
    Timeout {
        /// The operation.
        operation: &'static str,
        /// The configured operation timeout.
        after: std::time::Duration,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// The endpoint could not be reached.
    #[error("{operation}: ECS endpoint unreachable")]
    Unreachable {
        /// The operation.
        operation: &'static str,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// ECS rejected the request as invalid (`InvalidParameterException`, ...).
    #[error("{operation} rejected: {code}: {message}")]
    Rejected {
        /// The operation.
        operation: &'static str,
        /// The AWS error code.
        code: String,
        /// What AWS said.
        message: String,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// Anything else; 5xx answers (`ServerException`, `ServiceUnavailable`) are transient.
    #[error("{operation} failed: {message}")]
    Other {
        /// The operation.
        operation: &'static str,
        /// What happened.
        message: String,
        /// Whether retrying later may succeed.
        transient: bool,
        /// The SDK error.
        #[source]
        source: Option<SharedSource>,
    },
}

impl EcsError {
    /// Whether the loop should back off and retry.
    pub fn is_transient(&self) -> bool {
        match self {
            EcsError::Throttled { .. }
            | EcsError::Timeout { .. }
            | EcsError::Unreachable { .. } => true,
            EcsError::Other { transient, .. } => *transient,
            EcsError::NotFound { .. }
            | EcsError::AccessDenied { .. }
            | EcsError::Rejected { .. } => false,
        }
    }

    /// Classifies an SDK error of `operation` by its AWS error code (or, when the code is
    /// absent, by the modeled exception it is), its HTTP status and how the call failed.
    pub(crate) fn from_sdk<E, R>(
        operation: &'static str,
        timeout: std::time::Duration,
        err: SdkError<E, R>,
    ) -> Self
    where
        E: ProvideErrorMetadata + ModeledCode + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let code = err
            .code()
            .or_else(|| err.as_service_error().and_then(ModeledCode::modeled_code))
            .map(str::to_owned);
        let message = match (err.message(), err.as_service_error()) {
            (Some(m), _) => m.to_owned(),
            // A modeled exception keeps its message in its own field; its Display shows it.
            (None, Some(e)) => e.to_string(),
            (None, None) => String::new(),
        };
        let status = match &err {
            SdkError::ServiceError(e) => Some(raw_status(e.raw())),
            SdkError::ResponseError(e) => Some(raw_status(e.raw())),
            _ => None,
        }
        .flatten();
        let is_timeout = matches!(err, SdkError::TimeoutError(_));
        let is_dispatch = matches!(err, SdkError::DispatchFailure(_));
        let source: SharedSource = Arc::new(err);
        if is_timeout {
            return EcsError::Timeout {
                operation,
                after: timeout,
                source,
            };
        }
        if is_dispatch {
            return EcsError::Unreachable { operation, source };
        }
        match code.as_deref() {
            Some(
                "ThrottlingException"
                | "Throttling"
                | "TooManyRequestsException"
                | "RequestLimitExceeded",
            ) => EcsError::Throttled { operation, source },
            Some(
                "AccessDeniedException"
                | "AccessDenied"
                | "UnrecognizedClientException"
                | "InvalidClientTokenId"
                | "ExpiredTokenException"
                | "InvalidSignatureException"
                | "SignatureDoesNotMatch",
            ) => EcsError::AccessDenied {
                operation,
                message,
                source,
            },
            Some(c @ ("InvalidParameterException" | "ClientException" | "ValidationException")) => {
                EcsError::Rejected {
                    operation,
                    code: c.to_owned(),
                    message,
                    source,
                }
            }
            Some("ServerException" | "ServiceUnavailableException" | "InternalFailure") => {
                EcsError::Other {
                    operation,
                    message: code.unwrap_or_default(),
                    transient: true,
                    source: Some(source),
                }
            }
            _ => EcsError::Other {
                operation,
                message: match (&code, status) {
                    (Some(c), _) => format!("{c}: {message}"),
                    (None, Some(s)) => format!("HTTP {s}"),
                    (None, None) => "request failed".to_owned(),
                },
                transient: status.is_some_and(|s| s >= 500),
                source: Some(source),
            },
        }
    }
}

/// The error code of a modeled ECS exception, for errors whose metadata carries no code.
pub(crate) trait ModeledCode {
    fn modeled_code(&self) -> Option<&'static str>;
}

impl ModeledCode for DescribeServicesError {
    fn modeled_code(&self) -> Option<&'static str> {
        Some(match self {
            DescribeServicesError::AccessDeniedException(_) => "AccessDeniedException",
            DescribeServicesError::ClientException(_) => "ClientException",
            DescribeServicesError::ClusterNotFoundException(_) => "ClusterNotFoundException",
            DescribeServicesError::InvalidParameterException(_) => "InvalidParameterException",
            DescribeServicesError::ServerException(_) => "ServerException",
            _ => return None,
        })
    }
}

impl ModeledCode for UpdateServiceError {
    fn modeled_code(&self) -> Option<&'static str> {
        Some(match self {
            UpdateServiceError::AccessDeniedException(_) => "AccessDeniedException",
            UpdateServiceError::ClientException(_) => "ClientException",
            UpdateServiceError::ClusterNotFoundException(_) => "ClusterNotFoundException",
            UpdateServiceError::InvalidParameterException(_) => "InvalidParameterException",
            UpdateServiceError::ServerException(_) => "ServerException",
            UpdateServiceError::ServiceNotActiveException(_) => "ServiceNotActiveException",
            UpdateServiceError::ServiceNotFoundException(_) => "ServiceNotFoundException",
            _ => return None,
        })
    }
}

fn raw_status<R: std::fmt::Debug + 'static>(raw: &R) -> Option<u16> {
    (raw as &dyn std::any::Any)
        .downcast_ref::<aws_smithy_runtime_api::http::Response>()
        .map(|r| r.status().as_u16())
}

impl From<EcsError> for celery_scale_core::Error {
    fn from(e: EcsError) -> Self {
        use celery_scale_core::Error;
        match e {
            EcsError::NotFound {
                ref cluster,
                ref service,
                ..
            } => Error::NotFound {
                backend: BACKEND,
                what: format!("service '{service}' in cluster '{cluster}'"),
                source: Some(Box::new(e)),
            },
            EcsError::AccessDenied { .. } => Error::PermissionDenied {
                backend: BACKEND,
                message: e.to_string(),
                source: Some(Box::new(e)),
            },
            EcsError::Throttled { .. } => Error::Throttled {
                backend: BACKEND,
                source: Some(Box::new(e)),
            },
            EcsError::Timeout {
                operation, after, ..
            } => Error::Timeout {
                operation: format!("{BACKEND} {operation}"),
                after,
                source: Some(Box::new(e)),
            },
            EcsError::Unreachable { .. } => Error::Unavailable {
                backend: BACKEND,
                message: e.to_string(),
                source: Some(Box::new(e)),
            },
            EcsError::Rejected { .. } => Error::Rejected {
                backend: BACKEND,
                message: e.to_string(),
                transient: false,
                source: Some(Box::new(e)),
            },
            EcsError::Other { transient, .. } => Error::Other {
                backend: BACKEND,
                message: e.to_string(),
                transient,
                source: Some(Box::new(e)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_not_found_keeps_this_crates_error_as_source() {
        let core = celery_scale_core::Error::from(EcsError::NotFound {
            cluster: "prod".into(),
            service: "workers".into(),
            reason: "MISSING".into(),
        });
        assert_eq!(core.kind(), celery_scale_core::ErrorKind::NotFound);
        assert!(
            core.to_string().contains("'workers' in cluster 'prod'"),
            "{core}"
        );
        let kept = std::error::Error::source(&core).expect("a source");
        assert!(kept.is::<EcsError>(), "{kept:?}");
        assert!(kept.to_string().contains("MISSING"), "{kept}");
    }
}
