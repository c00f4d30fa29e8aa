//! [`AwsError`]: what a failed AWS call means, classified once for every AWS backend, and its
//! one mapping into [`celery_scale_core::Error`].

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::provider::error::CredentialsError;
use aws_runtime::retries::classifiers::{THROTTLING_ERRORS, TRANSIENT_ERRORS};
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use celery_scale_core::BoxError;

/// An error kept as a source, shared (`Arc`) so that one failed batched call can answer every
/// binding that waited for it.
pub type SharedSource = Arc<dyn StdError + Send + Sync + 'static>;

/// Error codes, beyond the SDK's [`TRANSIENT_ERRORS`], of a service-side fault that may pass on
/// its own (AWS's internal errors and unavailability answers). The SDK itself retries these by
/// their HTTP status (5xx); the list is for answers whose code is known but whose status is not.
pub const SERVICE_FAULT_ERRORS: &[&str] = &[
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "InternalFailure",
    "InternalError",
    "InternalServerError",
    "InternalServiceError",
    "ServerException",
];

/// Error codes meaning the credentials may not make the call, or are missing, invalid or
/// expired. The SDK keeps no such list (it does not retry them), so this one is ours: the
/// authorization codes (`AccessDenied*`, EC2's `UnauthorizedOperation`) and the STS/signature
/// codes every AWS API answers for bad credentials.
pub const PERMISSION_ERRORS: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "UnauthorizedException",
    "NotAuthorized",
    "AuthFailure",
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "MissingAuthenticationTokenException",
    "InvalidAccessKeyId",
    "OptInRequired",
];

/// Error codes meaning the request itself is invalid: sending it again unchanged fails again.
pub const REJECTED_ERRORS: &[&str] = &[
    "ValidationError",
    "ValidationException",
    "InvalidParameterException",
    "InvalidParameterValue",
    "InvalidParameterCombination",
    "InvalidParameterValueException",
    "MissingParameter",
    "ClientException",
];

/// One AWS API call, named for errors and logs: the backend (as in core errors and metrics,
/// e.g. `ecs`, `autoscaling`) and the operation (`DescribeServices`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Operation {
    /// The backend name used in [`celery_scale_core::Error`]s and metrics.
    pub backend: &'static str,
    /// The API operation, e.g. `DescribeServices`.
    pub name: &'static str,
}

impl Operation {
    /// The operation `name` of `backend`.
    pub const fn new(backend: &'static str, name: &'static str) -> Self {
        Operation { backend, name }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.backend, self.name)
    }
}

/// What a failed AWS call means. Made by [`AwsError::from_sdk`] from any
/// [`SdkError`]; every variant keeps the SDK error as its source (a timeout of ours has none).
///
/// It says nothing about transience itself: [`celery_scale_core::Error::is_transient`] on the
/// mapped error decides (throttling, timeouts, an unreachable endpoint and service faults are
/// transient; permission, rejection, bad answers and the rest are not).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AwsError {
    /// The service throttled the call (an SDK throttling code such as `ThrottlingException`,
    /// `Throttling`, `TooManyRequestsException`, `RequestLimitExceeded`, or HTTP 429), after
    /// the SDK's own retries.
    #[error("{operation} was throttled ({code})")]
    Throttled {
        /// The call.
        operation: Operation,
        /// The error code, or `HTTP 429`.
        code: String,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// The call did not finish in time: the caller's own call timeout (`after` is set) or the
    /// SDK's connect or operation timeout (`after` is `None`).
    #[error("{operation} timed out{}", match after {
        Some(d) => format!(" after {}", humantime::format_duration(*d)),
        None => " (the SDK's connect or operation timeout)".to_owned(),
    })]
    Timeout {
        /// The call.
        operation: Operation,
        /// The timeout that elapsed, when it is the caller's.
        after: Option<Duration>,
        /// The SDK error, when the SDK timed out.
        #[source]
        source: Option<SharedSource>,
    },
    /// The endpoint could not be reached (connection refused, DNS, TLS, I/O).
    #[error("{operation}: endpoint unreachable")]
    Unreachable {
        /// The call.
        operation: Operation,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// The service failed in a way that may pass: HTTP 5xx, `ServiceUnavailable`,
    /// `InternalFailure`, `ServerException`, the SDK's transient codes (`RequestTimeout`), or a
    /// credentials provider that could not be reached while refreshing.
    #[error("{operation}: service fault ({reason})")]
    ServiceFault {
        /// The call.
        operation: Operation,
        /// The code and message, or the HTTP status.
        reason: String,
        /// The HTTP status, when there was an answer.
        status: Option<u16>,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// The credentials may not make the call, or are missing, invalid or expired
    /// ([`PERMISSION_ERRORS`], HTTP 401/403).
    #[error("{operation}: permission denied: {message}")]
    PermissionDenied {
        /// The call.
        operation: Operation,
        /// The error code, when there is one.
        code: Option<String>,
        /// The error code and what AWS (or the credentials provider) said.
        message: String,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// The service refused the request as invalid ([`REJECTED_ERRORS`]).
    #[error("{operation} rejected: {code}: {message}")]
    Rejected {
        /// The call.
        operation: Operation,
        /// The error code.
        code: String,
        /// What AWS said.
        message: String,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
    /// The answer could not be read (unparseable response, a refused pagination token).
    #[error("{operation}: unexpected answer: {message}")]
    InvalidResponse {
        /// The call.
        operation: Operation,
        /// What was wrong.
        message: String,
        /// The SDK error, when there is one.
        #[source]
        source: Option<SharedSource>,
    },
    /// Anything else: an unknown 4xx code, a request the SDK could not build. Not retried
    /// faster.
    #[error("{operation} failed: {message}")]
    Other {
        /// The call.
        operation: Operation,
        /// The error code, when there is one.
        code: Option<String>,
        /// The HTTP status, when there was an answer.
        status: Option<u16>,
        /// The code and message, or what failed.
        message: String,
        /// The SDK error.
        #[source]
        source: SharedSource,
    },
}

impl AwsError {
    /// Classifies a failure of `operation` by the error's code
    /// ([`ProvideErrorMetadata::code`]), then how the call failed, then its HTTP status.
    pub fn from_sdk<E, R>(operation: Operation, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        Self::from_sdk_modeled(operation, None, err)
    }

    /// As [`AwsError::from_sdk`], with `modeled_code` (the name of the modeled exception the
    /// error is, e.g. `AccessDeniedException`) used when the error's metadata carries no code.
    /// The SDK's deserializer always sets the code; errors built in code (mocks) may not.
    pub fn from_sdk_modeled<E, R>(
        operation: Operation,
        modeled_code: Option<&str>,
        err: SdkError<E, R>,
    ) -> Self
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        let code = err.code().or(modeled_code).map(str::to_owned);
        let aws_message = match (err.message(), err.as_service_error()) {
            (Some(m), _) => Some(m.to_owned()),
            // A modeled exception keeps its message in its own field; its Display shows it.
            (None, Some(e)) => Some(e.to_string()),
            (None, None) => None,
        };
        let status = status_of(&err);
        let mut timed_out = matches!(err, SdkError::TimeoutError(_));
        let mut unreachable = false;
        let mut user_fault = false;
        if let SdkError::DispatchFailure(d) = &err {
            timed_out = d.is_timeout();
            user_fault = d.is_user();
            unreachable = !timed_out && !user_fault;
        }
        let construction = matches!(err, SdkError::ConstructionFailure(_));
        let response_error = matches!(err, SdkError::ResponseError(_));
        let credentials = construction.then(|| credentials_fault(&err)).flatten();
        let source: SharedSource = Arc::new(err);

        if timed_out {
            return AwsError::Timeout {
                operation,
                after: None,
                source: Some(source),
            };
        }
        if unreachable {
            return AwsError::Unreachable { operation, source };
        }
        if let Some((may_pass, message)) = credentials {
            return if may_pass {
                AwsError::ServiceFault {
                    operation,
                    reason: format!("credentials provider: {message}"),
                    status: None,
                    source,
                }
            } else {
                AwsError::PermissionDenied {
                    operation,
                    code: None,
                    message,
                    source,
                }
            };
        }
        let text = match (&code, &aws_message) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.clone(),
            (None, Some(m)) => m.clone(),
            (None, None) => match status {
                Some(s) => format!("HTTP {s}"),
                None if construction => "the request could not be built".to_owned(),
                None if user_fault => "the request could not be sent".to_owned(),
                None => "no error code".to_owned(),
            },
        };
        if let Some(c) = code.as_deref() {
            if THROTTLING_ERRORS.contains(&c) {
                return AwsError::Throttled {
                    operation,
                    code: c.to_owned(),
                    source,
                };
            }
            if TRANSIENT_ERRORS.contains(&c) || SERVICE_FAULT_ERRORS.contains(&c) {
                return AwsError::ServiceFault {
                    operation,
                    reason: text,
                    status,
                    source,
                };
            }
            if PERMISSION_ERRORS.contains(&c) {
                return AwsError::PermissionDenied {
                    operation,
                    code: code.clone(),
                    message: text,
                    source,
                };
            }
            if REJECTED_ERRORS.contains(&c) {
                return AwsError::Rejected {
                    operation,
                    code: c.to_owned(),
                    message: aws_message.unwrap_or_default(),
                    source,
                };
            }
        }
        match status {
            Some(429) => AwsError::Throttled {
                operation,
                code: code.unwrap_or_else(|| "HTTP 429".to_owned()),
                source,
            },
            Some(s) if s >= 500 => AwsError::ServiceFault {
                operation,
                reason: text,
                status,
                source,
            },
            Some(401 | 403) => AwsError::PermissionDenied {
                operation,
                code,
                message: text,
                source,
            },
            _ if response_error => AwsError::InvalidResponse {
                operation,
                message: "the response could not be parsed".to_owned(),
                source: Some(source),
            },
            _ => AwsError::Other {
                operation,
                code,
                status,
                message: text,
                source,
            },
        }
    }

    /// The caller's own timeout of `after` elapsed before `operation` answered.
    pub fn timed_out(operation: Operation, after: Duration) -> Self {
        AwsError::Timeout {
            operation,
            after: Some(after),
            source: None,
        }
    }

    /// The call that failed.
    pub fn operation(&self) -> Operation {
        match self {
            AwsError::Throttled { operation, .. }
            | AwsError::Timeout { operation, .. }
            | AwsError::Unreachable { operation, .. }
            | AwsError::ServiceFault { operation, .. }
            | AwsError::PermissionDenied { operation, .. }
            | AwsError::Rejected { operation, .. }
            | AwsError::InvalidResponse { operation, .. }
            | AwsError::Other { operation, .. } => *operation,
        }
    }

    /// The core error this failure means, keeping `source` (usually the backend's own error
    /// that wraps this one, so the core error's source chain names the backend's type). This
    /// is the one mapping of AWS failures into core kinds; `From<AwsError>` uses it too.
    pub fn to_core(&self, source: BoxError) -> celery_scale_core::Error {
        use celery_scale_core::Error;
        let backend = self.operation().backend;
        let source = Some(source);
        match self {
            AwsError::Throttled { .. } => Error::Throttled { backend, source },
            AwsError::Timeout {
                operation, after, ..
            } => Error::Timeout {
                operation: match after {
                    Some(_) => operation.to_string(),
                    None => format!("{operation} (the SDK's connect or operation timeout)"),
                },
                after: after.unwrap_or_default(),
                source,
            },
            AwsError::Unreachable { .. } => Error::Unavailable {
                backend,
                message: self.to_string(),
                source,
            },
            AwsError::ServiceFault { .. } => Error::Other {
                backend,
                message: self.to_string(),
                transient: true,
                source,
            },
            AwsError::PermissionDenied { .. } => Error::PermissionDenied {
                backend,
                message: self.to_string(),
                source,
            },
            AwsError::Rejected { .. } => Error::Rejected {
                backend,
                message: self.to_string(),
                transient: false,
                source,
            },
            AwsError::InvalidResponse { .. } => Error::InvalidData {
                backend,
                message: self.to_string(),
                source,
            },
            AwsError::Other { .. } => Error::Other {
                backend,
                message: self.to_string(),
                transient: false,
                source,
            },
        }
    }
}

impl From<AwsError> for celery_scale_core::Error {
    fn from(e: AwsError) -> Self {
        e.to_core(Box::new(e.clone()))
    }
}

/// The HTTP status of the answer, when the raw response is the SDK's HTTP response.
fn status_of<E, R: 'static>(err: &SdkError<E, R>) -> Option<u16> {
    let raw = err.raw_response()?;
    (raw as &dyn std::any::Any)
        .downcast_ref::<aws_smithy_runtime_api::http::Response>()
        .map(|r| r.status().as_u16())
}

/// A credentials failure behind a request that could not be built (identity resolution runs
/// before the request is sent): whether it may pass (the provider timed out or failed to
/// answer) and what it said. `None` when no credentials error is in the chain.
fn credentials_fault(err: &(dyn StdError + 'static)) -> Option<(bool, String)> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            let may_pass = matches!(
                c,
                CredentialsError::ProviderTimedOut(_) | CredentialsError::ProviderError(_)
            );
            return Some((may_pass, format!("credentials: {c}")));
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_runtime_api::client::result::ConnectorError;
    use aws_smithy_runtime_api::http::{Response, StatusCode};
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;
    use celery_scale_core::ErrorKind;

    const OP: Operation = Operation::new("test", "DoThing");

    /// A service error as the SDK deserializer makes it: code in the metadata.
    #[derive(Debug)]
    struct Modeled(ErrorMetadata);
    impl fmt::Display for Modeled {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "modeled")
        }
    }
    impl StdError for Modeled {}
    impl ProvideErrorMetadata for Modeled {
        fn meta(&self) -> &ErrorMetadata {
            &self.0
        }
    }

    fn response(status: u16) -> Response {
        Response::new(StatusCode::try_from(status).unwrap(), SdkBody::empty())
    }

    fn coded(code: &str, status: u16) -> SdkError<Modeled, Response> {
        SdkError::service_error(
            Modeled(ErrorMetadata::builder().code(code).message("said").build()),
            response(status),
        )
    }

    fn uncoded(status: u16) -> SdkError<Modeled, Response> {
        SdkError::service_error(Modeled(ErrorMetadata::builder().build()), response(status))
    }

    fn kind_of(e: AwsError) -> (ErrorKind, bool) {
        let core = celery_scale_core::Error::from(e);
        (core.kind(), core.is_transient())
    }

    #[test]
    fn every_code_maps_to_its_meaning_and_core_kind() {
        use ErrorKind as K;
        let cases: &[(&str, K, bool)] = &[
            // The codes that used to be in only one crate's list are all here.
            ("ThrottlingException", K::Throttled, true),
            ("Throttling", K::Throttled, true),
            ("TooManyRequestsException", K::Throttled, true),
            ("RequestLimitExceeded", K::Throttled, true),
            ("RequestTimeout", K::Other, true),
            ("ServiceUnavailable", K::Other, true),
            ("ServerException", K::Other, true),
            ("InternalFailure", K::Other, true),
            ("AccessDenied", K::PermissionDenied, false),
            ("AccessDeniedException", K::PermissionDenied, false),
            ("UnauthorizedOperation", K::PermissionDenied, false),
            ("ExpiredToken", K::PermissionDenied, false),
            ("ExpiredTokenException", K::PermissionDenied, false),
            ("InvalidClientTokenId", K::PermissionDenied, false),
            ("UnrecognizedClientException", K::PermissionDenied, false),
            ("SignatureDoesNotMatch", K::PermissionDenied, false),
            ("ValidationError", K::Rejected, false),
            ("InvalidParameterException", K::Rejected, false),
            ("ClientException", K::Rejected, false),
            ("SomethingNew", K::Other, false),
        ];
        for (code, kind, transient) in cases {
            let e = AwsError::from_sdk(OP, coded(code, 400));
            assert_eq!(e.operation(), OP);
            assert!(e.to_string().starts_with("test DoThing"), "{e}");
            assert_eq!(kind_of(e), (*kind, *transient), "{code}");
        }
    }

    #[test]
    fn the_sdk_lists_are_used_not_copied() {
        for code in THROTTLING_ERRORS {
            assert!(
                matches!(
                    AwsError::from_sdk(OP, coded(code, 400)),
                    AwsError::Throttled { .. }
                ),
                "{code}"
            );
        }
        for code in TRANSIENT_ERRORS {
            assert!(
                matches!(
                    AwsError::from_sdk(OP, coded(code, 400)),
                    AwsError::ServiceFault { .. }
                ),
                "{code}"
            );
        }
    }

    #[test]
    fn without_a_code_the_status_decides() {
        assert!(matches!(
            AwsError::from_sdk(OP, uncoded(503)),
            AwsError::ServiceFault {
                status: Some(503),
                ..
            }
        ));
        assert!(matches!(
            AwsError::from_sdk(OP, uncoded(429)),
            AwsError::Throttled { ref code, .. } if code == "HTTP 429"
        ));
        assert!(matches!(
            AwsError::from_sdk(OP, uncoded(403)),
            AwsError::PermissionDenied { .. }
        ));
        let e = AwsError::from_sdk(OP, uncoded(404));
        assert!(
            matches!(
                e,
                AwsError::Other {
                    status: Some(404),
                    code: None,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(kind_of(e), (ErrorKind::Other, false));
    }

    #[test]
    fn a_modeled_code_is_used_only_when_the_metadata_has_none() {
        let e = AwsError::from_sdk_modeled(OP, Some("AccessDeniedException"), uncoded(400));
        assert!(matches!(e, AwsError::PermissionDenied { .. }), "{e:?}");
        let e =
            AwsError::from_sdk_modeled(OP, Some("AccessDeniedException"), coded("Throttling", 400));
        assert!(matches!(e, AwsError::Throttled { .. }), "{e:?}");
    }

    #[test]
    fn how_the_call_failed_decides_before_codes() {
        let timeout: SdkError<Modeled, Response> = SdkError::timeout_error("slow");
        assert_eq!(
            kind_of(AwsError::from_sdk(OP, timeout)),
            (ErrorKind::Timeout, true)
        );
        let refused: SdkError<Modeled, Response> =
            SdkError::dispatch_failure(ConnectorError::io("connection refused".into()));
        assert_eq!(
            kind_of(AwsError::from_sdk(OP, refused)),
            (ErrorKind::Unavailable, true)
        );
        let connect_timeout: SdkError<Modeled, Response> =
            SdkError::dispatch_failure(ConnectorError::timeout("connect".into()));
        assert!(matches!(
            AwsError::from_sdk(OP, connect_timeout),
            AwsError::Timeout { after: None, .. }
        ));
        let garbled: SdkError<Modeled, Response> =
            SdkError::response_error("bad xml", response(200));
        assert_eq!(
            kind_of(AwsError::from_sdk(OP, garbled)),
            (ErrorKind::InvalidData, false)
        );
        let unbuildable: SdkError<Modeled, Response> =
            SdkError::construction_failure("missing field");
        assert_eq!(
            kind_of(AwsError::from_sdk(OP, unbuildable)),
            (ErrorKind::Other, false)
        );
        let ours = AwsError::timed_out(OP, Duration::from_secs(4));
        assert_eq!(ours.to_string(), "test DoThing timed out after 4s");
        let core = celery_scale_core::Error::from(ours);
        assert!(
            matches!(core, celery_scale_core::Error::Timeout { after, .. } if after == Duration::from_secs(4))
        );
    }

    #[test]
    fn credentials_failures_before_sending_are_classified() {
        let missing: SdkError<Modeled, Response> =
            SdkError::construction_failure(CredentialsError::not_loaded("no provider had any"));
        let e = AwsError::from_sdk(OP, missing);
        assert!(matches!(e, AwsError::PermissionDenied { .. }), "{e:?}");
        assert_eq!(kind_of(e), (ErrorKind::PermissionDenied, false));
        let refresh: SdkError<Modeled, Response> = SdkError::construction_failure(
            CredentialsError::provider_timed_out(Duration::from_secs(5)),
        );
        assert_eq!(
            kind_of(AwsError::from_sdk(OP, refresh)),
            (ErrorKind::Other, true),
            "a provider that did not answer may answer later"
        );
    }

    #[test]
    fn the_core_error_keeps_the_sdk_error_in_its_chain() {
        let core = celery_scale_core::Error::from(AwsError::from_sdk(OP, coded("Throttling", 400)));
        let kept = StdError::source(&core).expect("the AwsError");
        assert!(kept.is::<AwsError>(), "{kept:?}");
        // The shared (`Arc`) SDK error shows as itself, and its own source follows it.
        let sdk = kept.source().expect("the SdkError");
        assert_eq!(sdk.to_string(), "service error");
        let service = sdk.source().expect("the service error");
        assert!(service.is::<Modeled>(), "{service:?}");
    }
}
