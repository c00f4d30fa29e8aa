//! [`EcsError`]: what can go wrong talking to ECS, by meaning, and its mapping into
//! [`celery_scale_core::Error`]. What a failed call means (throttled, timed out, permission,
//! ...) is classified once, by [`celery_scale_aws::AwsError`]; this enum adds what only ECS
//! says.

use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ecs::operation::describe_services::DescribeServicesError;
use aws_sdk_ecs::operation::describe_tasks::DescribeTasksError;
use aws_sdk_ecs::operation::get_task_protection::GetTaskProtectionError;
use aws_sdk_ecs::operation::list_tasks::ListTasksError;
use aws_sdk_ecs::operation::update_service::UpdateServiceError;
use aws_sdk_ecs::operation::update_task_protection::UpdateTaskProtectionError;
use celery_scale_aws::{AwsError, Operation};

/// The backend name used in core errors and metrics.
pub const BACKEND: &str = "ecs";

/// The `DescribeServices` call.
pub(crate) const DESCRIBE_SERVICES: Operation = Operation::new(BACKEND, "DescribeServices");
/// The `UpdateService` call.
pub(crate) const UPDATE_SERVICE: Operation = Operation::new(BACKEND, "UpdateService");
/// The `ListTasks` call.
pub(crate) const LIST_TASKS: Operation = Operation::new(BACKEND, "ListTasks");
/// The `DescribeTasks` call.
pub(crate) const DESCRIBE_TASKS: Operation = Operation::new(BACKEND, "DescribeTasks");
/// The `GetTaskProtection` call.
pub(crate) const GET_TASK_PROTECTION: Operation = Operation::new(BACKEND, "GetTaskProtection");
/// The `UpdateTaskProtection` call.
pub(crate) const UPDATE_TASK_PROTECTION: Operation =
    Operation::new(BACKEND, "UpdateTaskProtection");

/// One task a protection call could not act on, from the answer's `failures`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    /// The task ID (or what ECS named it by, when that is not a task ARN).
    pub task: String,
    /// ECS's reason, e.g. `TASK_NOT_VALID` or `MISSING`.
    pub reason: String,
    /// ECS's detail, when it gave one.
    pub detail: Option<String>,
}

impl std::fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}", self.task, self.reason)?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        f.write_str(")")
    }
}

fn list(failures: &[TaskFailure]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What went wrong talking to ECS.
///
/// Converts into [`celery_scale_core::Error`] with `From`, keeping itself as the source; the
/// core error's [`is_transient`](celery_scale_core::Error::is_transient) says whether the loop
/// backs off.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum EcsError {
    /// The service (or its cluster) does not exist: `DescribeServices` listed it in `failures`
    /// (reason `MISSING`) or described it as `INACTIVE`, or the call answered
    /// `ClusterNotFoundException` / `ServiceNotFoundException` / `ServiceNotActiveException`.
    #[error("service '{service}' in cluster '{cluster}' not found ({reason})")]
    ServiceNotFound {
        /// The cluster.
        cluster: String,
        /// The service.
        service: String,
        /// What ECS said, e.g. `MISSING`.
        reason: String,
    },
    /// A task protection call (`GetTaskProtection`, `UpdateTaskProtection`) answered, but
    /// listed some tasks in `failures` (a task that stopped meanwhile, one not of a service):
    /// those tasks were not read or changed. The others in the same call were.
    #[error("{operation} failed for {} task(s) in cluster '{cluster}': {}", failures.len(), list(failures))]
    TaskFailures {
        /// The call.
        operation: Operation,
        /// The cluster.
        cluster: String,
        /// The tasks it failed for, and why.
        failures: Vec<TaskFailure>,
    },
    /// The call failed (throttled, timed out, unreachable, permission denied, rejected, ...),
    /// as [`AwsError`] classifies it.
    #[error(transparent)]
    Aws(#[from] AwsError),
}

impl EcsError {
    /// The [`AwsError`], when the call failed rather than the service being missing.
    pub fn as_aws(&self) -> Option<&AwsError> {
        match self {
            EcsError::Aws(e) => Some(e),
            EcsError::ServiceNotFound { .. } | EcsError::TaskFailures { .. } => None,
        }
    }
}

/// The error code of an SDK error: its metadata's, else the modeled exception's name (errors
/// built in code, as mocks build them, carry no metadata code).
pub(crate) fn code_of<E: ProvideErrorMetadata + ModeledCode, R>(
    err: &SdkError<E, R>,
) -> Option<&str> {
    err.code()
        .or_else(|| err.as_service_error().and_then(ModeledCode::modeled_code))
}

/// Classifies an SDK error of `operation` (see [`AwsError::from_sdk_modeled`]).
pub(crate) fn classify<E, R>(operation: Operation, err: SdkError<E, R>) -> EcsError
where
    E: ProvideErrorMetadata + ModeledCode + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let modeled = err.as_service_error().and_then(ModeledCode::modeled_code);
    EcsError::Aws(AwsError::from_sdk_modeled(operation, modeled, err))
}

/// The name of a modeled ECS exception, for errors whose metadata carries no code.
pub(crate) trait ModeledCode {
    fn modeled_code(&self) -> Option<&'static str>;
}

/// `impl ModeledCode` for an operation's error enum: each listed variant is named by itself.
macro_rules! modeled_codes {
    ($($error:ident { $($variant:ident),* $(,)? })*) => {$(
        impl ModeledCode for $error {
            fn modeled_code(&self) -> Option<&'static str> {
                match self {
                    $($error::$variant(_) => Some(stringify!($variant)),)*
                    _ => None,
                }
            }
        }
    )*};
}

modeled_codes! {
    DescribeServicesError {
        AccessDeniedException, ClientException, ClusterNotFoundException,
        InvalidParameterException, ServerException,
    }
    UpdateServiceError {
        AccessDeniedException, ClientException, ClusterNotFoundException,
        InvalidParameterException, ServerException, ServiceNotActiveException,
        ServiceNotFoundException,
    }
    ListTasksError {
        AccessDeniedException, ClientException, ClusterNotFoundException,
        InvalidParameterException, ServerException, ServiceNotFoundException,
    }
    DescribeTasksError {
        AccessDeniedException, ClientException, ClusterNotFoundException,
        InvalidParameterException, ServerException,
    }
    GetTaskProtectionError {
        AccessDeniedException, ClientException, ClusterNotFoundException,
        InvalidParameterException, ResourceNotFoundException, ServerException,
        UnsupportedFeatureException,
    }
    UpdateTaskProtectionError {
        AccessDeniedException, ClientException, ClusterNotFoundException,
        InvalidParameterException, ResourceNotFoundException, ServerException,
        UnsupportedFeatureException,
    }
}

impl From<EcsError> for celery_scale_core::Error {
    fn from(e: EcsError) -> Self {
        use celery_scale_core::Error;
        match &e {
            EcsError::ServiceNotFound {
                cluster, service, ..
            } => Error::NotFound {
                backend: BACKEND,
                what: format!("service '{service}' in cluster '{cluster}'"),
                source: Some(Box::new(e.clone())),
            },
            // Retried on the next tick, when the units are read again (a task that stopped is
            // no longer listed); meanwhile the loop holds the scale-in.
            EcsError::TaskFailures { .. } => Error::Rejected {
                backend: BACKEND,
                message: e.to_string(),
                transient: true,
                source: Some(Box::new(e.clone())),
            },
            EcsError::Aws(aws) => aws.to_core(Box::new(e.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_not_found_keeps_this_crates_error_as_source() {
        let core = celery_scale_core::Error::from(EcsError::ServiceNotFound {
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

    #[test]
    fn core_errors_of_calls_keep_this_crates_error_as_source() {
        let core = celery_scale_core::Error::from(EcsError::Aws(AwsError::timed_out(
            DESCRIBE_SERVICES,
            std::time::Duration::from_secs(4),
        )));
        assert_eq!(core.kind(), celery_scale_core::ErrorKind::Timeout);
        assert!(core.is_transient());
        let kept = std::error::Error::source(&core).expect("a source");
        assert!(kept.is::<EcsError>(), "{kept:?}");
        assert!(kept.to_string().contains("ecs DescribeServices"), "{kept}");
    }
}
