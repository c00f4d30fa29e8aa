//! [`Ec2Error`]: what can go wrong talking to EC2 Auto Scaling, by meaning, and its mapping into
//! [`celery_scale_core::Error`]. What a failed call means (throttled, timed out, permission,
//! ...) is classified once, by [`celery_scale_aws::AwsError`]; this enum adds what only Auto
//! Scaling says.

use aws_sdk_autoscaling::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_autoscaling::operation::describe_auto_scaling_groups::DescribeAutoScalingGroupsError;
use aws_sdk_autoscaling::operation::set_desired_capacity::SetDesiredCapacityError;
use aws_sdk_autoscaling::operation::set_instance_protection::SetInstanceProtectionError;
use celery_scale_aws::{AwsError, Operation, SharedSource};
use std::sync::Arc;

/// The backend name used in [`celery_scale_core::Error`]s and metrics.
pub const BACKEND: &str = "autoscaling";

/// The `DescribeAutoScalingGroups` call.
pub(crate) const DESCRIBE_GROUPS: Operation = Operation::new(BACKEND, "DescribeAutoScalingGroups");
/// The `SetDesiredCapacity` call.
pub(crate) const SET_DESIRED_CAPACITY: Operation = Operation::new(BACKEND, "SetDesiredCapacity");
/// The `SetInstanceProtection` call.
pub(crate) const SET_INSTANCE_PROTECTION: Operation =
    Operation::new(BACKEND, "SetInstanceProtection");

/// What went wrong talking to EC2 Auto Scaling.
///
/// Converts into [`celery_scale_core::Error`] with `From`, keeping itself as the source; the
/// core error's [`is_transient`](celery_scale_core::Error::is_transient) says whether the loop
/// backs off (throttling, a scaling activity in progress, resource contention, 5xx answers,
/// timeouts, an unreachable endpoint) or reports the same failure every tick (missing group,
/// permission denied, validation).
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
    /// `SetDesiredCapacity` was refused because a scaling activity is in progress
    /// (`ScalingActivityInProgress`): a transient rejection.
    #[error("a scaling activity is in progress on Auto Scaling group '{group}'")]
    ScalingActivityInProgress {
        /// The group.
        group: String,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// Another update to the same resource is pending (`ResourceContention`): a transient
    /// rejection.
    #[error("{operation}: another update to the resource is pending (resource contention)")]
    ResourceContention {
        /// The call.
        operation: Operation,
        /// The SDK error.
        #[source]
        source: SharedSource,
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
    /// The call failed (throttled, timed out, unreachable, permission denied, validation, a
    /// bad answer, ...), as [`AwsError`] classifies it.
    #[error(transparent)]
    Aws(#[from] AwsError),
}

impl Ec2Error {
    /// The [`AwsError`], when the call failed in a way every AWS service shares.
    pub fn as_aws(&self) -> Option<&AwsError> {
        match self {
            Ec2Error::Aws(e) => Some(e),
            _ => None,
        }
    }

    /// Classifies a `DescribeAutoScalingGroups` failure.
    pub(crate) fn from_describe(err: SdkError<DescribeAutoScalingGroupsError>) -> Self {
        let modeled = match err.as_service_error() {
            Some(DescribeAutoScalingGroupsError::ResourceContentionFault(_)) => {
                Some("ResourceContention")
            }
            Some(DescribeAutoScalingGroupsError::InvalidNextToken(_)) => Some("InvalidNextToken"),
            _ => None,
        };
        match err.code().or(modeled) {
            Some("ResourceContention") => Ec2Error::ResourceContention {
                operation: DESCRIBE_GROUPS,
                source: Arc::new(err),
            },
            Some("InvalidNextToken") => Ec2Error::Aws(AwsError::InvalidResponse {
                operation: DESCRIBE_GROUPS,
                message: "the pagination token was refused".into(),
                source: Some(Arc::new(err)),
            }),
            _ => Ec2Error::Aws(AwsError::from_sdk(DESCRIBE_GROUPS, err)),
        }
    }

    /// Classifies a `SetDesiredCapacity` failure on `group`.
    pub(crate) fn from_set(group: &str, err: SdkError<SetDesiredCapacityError>) -> Self {
        let modeled = match err.as_service_error() {
            Some(SetDesiredCapacityError::ResourceContentionFault(_)) => Some("ResourceContention"),
            Some(SetDesiredCapacityError::ScalingActivityInProgressFault(_)) => {
                Some("ScalingActivityInProgress")
            }
            _ => None,
        };
        match err.code().or(modeled) {
            Some("ResourceContention") => Ec2Error::ResourceContention {
                operation: SET_DESIRED_CAPACITY,
                source: Arc::new(err),
            },
            Some("ScalingActivityInProgress") => Ec2Error::ScalingActivityInProgress {
                group: group.to_owned(),
                source: Arc::new(err),
            },
            _ => Ec2Error::Aws(AwsError::from_sdk(SET_DESIRED_CAPACITY, err)),
        }
    }

    /// Classifies a `SetInstanceProtection` failure. `ResourceContention` is this crate's
    /// transient rejection; `LimitExceeded` and everything else (`ValidationError` for an
    /// instance that is not in the group or not in a state that takes protection, throttling,
    /// permission) is classified by [`AwsError`].
    pub(crate) fn from_protect(err: SdkError<SetInstanceProtectionError>) -> Self {
        let modeled = match err.as_service_error() {
            Some(SetInstanceProtectionError::ResourceContentionFault(_)) => {
                Some("ResourceContention")
            }
            Some(SetInstanceProtectionError::LimitExceededFault(_)) => Some("LimitExceeded"),
            _ => None,
        };
        match err.code().or(modeled) {
            Some("ResourceContention") => Ec2Error::ResourceContention {
                operation: SET_INSTANCE_PROTECTION,
                source: Arc::new(err),
            },
            _ => Ec2Error::Aws(AwsError::from_sdk_modeled(
                SET_INSTANCE_PROTECTION,
                modeled,
                err,
            )),
        }
    }
}

impl From<Ec2Error> for celery_scale_core::Error {
    fn from(e: Ec2Error) -> Self {
        use celery_scale_core::Error;
        match &e {
            Ec2Error::GroupNotFound { group } => Error::NotFound {
                backend: BACKEND,
                what: format!("Auto Scaling group '{group}'"),
                source: Some(Box::new(e.clone())),
            },
            Ec2Error::ScalingActivityInProgress { .. } | Ec2Error::ResourceContention { .. } => {
                Error::Rejected {
                    backend: BACKEND,
                    message: e.to_string(),
                    transient: true,
                    source: Some(Box::new(e.clone())),
                }
            }
            Ec2Error::UnsupportedGroup { .. } => Error::InvalidData {
                backend: BACKEND,
                message: e.to_string(),
                source: Some(Box::new(e.clone())),
            },
            Ec2Error::Aws(aws) => aws.to_core(Box::new(e.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_autoscaling::error::ErrorMetadata;
    use aws_sdk_autoscaling::types::error::ScalingActivityInProgressFault;
    use celery_scale_core::ErrorKind;

    fn response(status: u16) -> aws_sdk_autoscaling::config::http::HttpResponse {
        aws_sdk_autoscaling::config::http::HttpResponse::new(
            status.try_into().unwrap(),
            aws_smithy_types::body::SdkBody::empty(),
        )
    }

    fn service<E>(e: E) -> SdkError<E> {
        SdkError::service_error(e, response(400))
    }

    fn generic(code: &str) -> SdkError<DescribeAutoScalingGroupsError> {
        service(DescribeAutoScalingGroupsError::generic(
            ErrorMetadata::builder().code(code).message("m").build(),
        ))
    }

    #[test]
    fn codes_map_to_meanings() {
        let cases: [(&str, ErrorKind, bool); 6] = [
            ("Throttling", ErrorKind::Throttled, true),
            ("AccessDenied", ErrorKind::PermissionDenied, false),
            ("ValidationError", ErrorKind::Rejected, false),
            ("ResourceContention", ErrorKind::Rejected, true),
            ("InvalidNextToken", ErrorKind::InvalidData, false),
            ("SomethingNew", ErrorKind::Other, false),
        ];
        for (code, kind, transient) in cases {
            let core: celery_scale_core::Error = Ec2Error::from_describe(generic(code)).into();
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
            response(503),
        );
        let e = Ec2Error::from_describe(err);
        assert!(
            matches!(
                e,
                Ec2Error::Aws(AwsError::ServiceFault {
                    status: Some(503),
                    ..
                })
            ),
            "{e:?}"
        );
        assert!(celery_scale_core::Error::from(e).is_transient());
    }

    #[test]
    fn core_errors_keep_this_crates_error_as_source() {
        for e in [
            Ec2Error::GroupNotFound {
                group: "workers".into(),
            },
            Ec2Error::Aws(AwsError::timed_out(
                DESCRIBE_GROUPS,
                std::time::Duration::from_secs(4),
            )),
        ] {
            let core = celery_scale_core::Error::from(e);
            let kept = std::error::Error::source(&core).expect("a source");
            assert!(kept.is::<Ec2Error>(), "{core}: {kept:?}");
        }
    }
}
