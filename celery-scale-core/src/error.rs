//! The core error type every backend maps its own errors into.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A boxed error kept as the `source` of a core [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, by meaning, so the control loop can decide what to do next.
///
/// Backends map their own error enums into this one and keep the original as the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend could not be reached (connection refused, reset, DNS, broker restarting).
    #[error("{backend} unavailable: {message}")]
    Unavailable {
        /// The backend, e.g. `redis` or `ecs`.
        backend: &'static str,
        /// What failed, without credentials.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The call did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation that timed out (`observe`, `capacity`, `set_desired`, ...).
        operation: String,
        /// The timeout that elapsed.
        after: Duration,
        /// The backend's own timeout error, when the backend timed out (not the loop).
        #[source]
        source: Option<BoxError>,
    },
    /// The backend asked us to slow down (AWS `ThrottlingException`, `Throttling`).
    #[error("{backend} throttled the request")]
    Throttled {
        /// The backend that throttled.
        backend: &'static str,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// A queue, service, group or cluster that the configuration names does not exist.
    #[error("{backend}: {what} not found")]
    NotFound {
        /// The backend.
        backend: &'static str,
        /// What is missing, e.g. `queue 'celery'` or `service 'workers' in cluster 'prod'`.
        what: String,
        /// The backend's own error.
        #[source]
        source: Option<BoxError>,
    },
    /// Authentication or authorization failed.
    #[error("{backend}: permission denied: {message}")]
    PermissionDenied {
        /// The backend.
        backend: &'static str,
        /// What was refused, without credentials.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend answered with data we cannot interpret (wrong key type, malformed message).
    #[error("{backend}: unexpected data: {message}")]
    InvalidData {
        /// The backend.
        backend: &'static str,
        /// What was wrong, naming the key or field.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend refused the request as invalid (e.g. out of the group's bounds).
    #[error("{backend} rejected the request: {message}")]
    Rejected {
        /// The backend.
        backend: &'static str,
        /// Why, as the backend said.
        message: String,
        /// Whether retrying later may succeed (e.g. a scaling activity in progress).
        transient: bool,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Anything else; the source says what.
    #[error("{backend}: {message}")]
    Other {
        /// The backend.
        backend: &'static str,
        /// A description without credentials.
        message: String,
        /// Whether retrying later may succeed (5xx answers are transient).
        transient: bool,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
}

/// The kind of an [`Error`], used as a metrics label and in decision records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// See [`Error::Unavailable`].
    Unavailable,
    /// See [`Error::Timeout`].
    Timeout,
    /// See [`Error::Throttled`].
    Throttled,
    /// See [`Error::NotFound`].
    NotFound,
    /// See [`Error::PermissionDenied`].
    PermissionDenied,
    /// See [`Error::InvalidData`].
    InvalidData,
    /// See [`Error::Rejected`].
    Rejected,
    /// See [`Error::Config`].
    Config,
    /// The observation arrived but was older than the loop's `max_staleness`: a record-only
    /// kind (no [`Error`] has it), never a reason to scale in.
    Stale,
    /// See [`Error::Other`].
    Other,
}

impl ErrorKind {
    /// The kind as a short static string (the metrics label value).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Throttled => "throttled",
            ErrorKind::NotFound => "not_found",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::InvalidData => "invalid_data",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Config => "config",
            ErrorKind::Stale => "stale",
            ErrorKind::Other => "other",
        }
    }
}

impl Error {
    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Throttled { .. } => ErrorKind::Throttled,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            Error::InvalidData { .. } => ErrorKind::InvalidData,
            Error::Rejected { .. } => ErrorKind::Rejected,
            Error::Config(_) => ErrorKind::Config,
            Error::Other { .. } => ErrorKind::Other,
        }
    }

    /// Whether the same call may succeed later without a change of configuration.
    ///
    /// Transient errors are retried on the next tick with backoff; permanent ones
    /// (missing queue or service, permission denied, bad config) are reported every tick
    /// but not retried faster.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::Timeout { .. } | Error::Throttled { .. } => true,
            Error::Rejected { transient, .. } | Error::Other { transient, .. } => *transient,
            Error::NotFound { .. }
            | Error::PermissionDenied { .. }
            | Error::InvalidData { .. }
            | Error::Config(_) => false,
        }
    }

    /// A shorthand for [`Error::Unavailable`].
    pub fn unavailable(
        backend: &'static str,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Unavailable {
            backend,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A shorthand for [`Error::Timeout`] without an underlying error (a deadline of ours).
    pub fn timeout(operation: impl Into<String>, after: Duration) -> Self {
        Error::Timeout {
            operation: operation.into(),
            after,
            source: None,
        }
    }
}

/// Invalid configuration: names the field path and the rule it breaks.
///
/// ```
/// # use celery_scale_core::ConfigError;
/// let err = ConfigError::new("bindings[0].policy.max_workers", "0 is below min_workers 1");
/// assert_eq!(err.to_string(), "bindings[0].policy.max_workers: 0 is below min_workers 1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct ConfigError {
    /// The field path, e.g. `bindings[0].policy.max_workers`.
    pub field: String,
    /// The rule the value breaks, with the value.
    pub rule: String,
}

impl ConfigError {
    /// A configuration error for `field` breaking `rule`.
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            rule: rule.into(),
        }
    }

    /// The same error with `prefix.` put before the field path.
    pub fn within(mut self, prefix: &str) -> Self {
        if !prefix.is_empty() {
            self.field = format!("{prefix}.{}", self.field);
        }
        self
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_classification() {
        assert!(Error::timeout("observe", Duration::from_secs(1)).is_transient());
        assert!(
            Error::Throttled {
                backend: "ecs",
                source: None
            }
            .is_transient()
        );
        assert!(
            !Error::NotFound {
                backend: "ecs",
                what: "service 'x'".into(),
                source: None,
            }
            .is_transient()
        );
        let e = Error::unavailable("redis", "connection refused", "refused");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn config_error_within_prefixes_path() {
        let e = ConfigError::new("max_workers", "0 is below min_workers 1")
            .within("bindings[0].policy");
        assert_eq!(e.field, "bindings[0].policy.max_workers");
    }
}
