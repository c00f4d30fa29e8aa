//! What can go wrong reading Celery's queues on Redis, by meaning.

use std::time::Duration;

use celery_scale_core::{ConfigError, Error};
use celery_scale_tls::TlsFileError;
use redis::{ErrorKind, RedisError, ServerErrorKind};

const BACKEND: &str = "redis";

/// An error of the Redis queue source. URLs in it are always redacted.
///
/// Converts into [`celery_scale_core::Error`] with the right
/// [`is_transient`](celery_scale_core::Error::is_transient): unreachable servers, timeouts and a
/// server still loading its data are transient; authentication, wrong key types and
/// configuration are not.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisSourceError {
    /// A configuration field is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The URL does not parse as a Redis URL.
    #[error("url: {url} is not a valid Redis URL")]
    BadUrl {
        /// The URL, redacted.
        url: String,
        /// The client library's reason.
        #[source]
        source: RedisError,
    },
    /// A TLS certificate or key file cannot be read or is not what its field needs: no PEM
    /// certificate (or key) in it, a certificate rustls rejects, or a key that is not the
    /// client certificate's. The error names the field (`tls.ca_file`, ...).
    #[error(transparent)]
    TlsFile(#[from] TlsFileError),
    /// The source was created outside a Tokio runtime.
    #[error("RedisQueueSource::new must be called within a Tokio runtime")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
    /// Nothing listens at the address (the server is down or restarting).
    #[error("connection to {url} refused")]
    ConnectionRefused {
        /// The URL, redacted.
        url: String,
        /// The underlying error.
        #[source]
        source: RedisError,
    },
    /// The server could not be reached or dropped the connection, or is not ready to serve
    /// (still loading its data, a replica without its master).
    #[error("Redis at {url} is unavailable")]
    Unavailable {
        /// The URL, redacted.
        url: String,
        /// The underlying error.
        #[source]
        source: RedisError,
    },
    /// The TLS handshake failed on the certificates: the server's is not trusted (set
    /// `tls.ca_file`), does not name the host, or a client certificate is missing or refused.
    #[error("TLS with Redis at {url} failed")]
    Tls {
        /// The URL, redacted.
        url: String,
        /// The underlying error (its source is rustls' reason).
        #[source]
        source: RedisError,
    },
    /// The server refused the credentials, or the user may not run a command we need.
    #[error("Redis at {url} refused authentication or permission")]
    Auth {
        /// The URL, redacted.
        url: String,
        /// The underlying error.
        #[source]
        source: RedisError,
    },
    /// With Redis Sentinel: the server the Sentinels named answered `ROLE` with something other
    /// than `master` (a failover demoted it). The next observation asks the Sentinels again.
    #[error("Redis at {url} is no longer the master (its role is {role:?}): a Sentinel failover")]
    NotMaster {
        /// The URL, redacted.
        url: String,
        /// The role the server reported.
        role: String,
    },
    /// The observation did not finish within the configured `timeout`.
    #[error("Redis at {url} did not answer within {after:?}")]
    Timeout {
        /// The URL, redacted.
        url: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// A key that Celery uses holds another type (e.g. a string where a queue list should be).
    #[error("key {key:?} holds the wrong type: Celery keeps a {expected} there")]
    WrongType {
        /// The full key, prefix and priority suffix included.
        key: String,
        /// The type kombu uses for that key.
        expected: &'static str,
        /// The server's error.
        #[source]
        source: redis::ServerError,
    },
    /// The server answered a command with something we did not expect.
    #[error("Redis answered {command} on key {key:?} unexpectedly: {detail}")]
    UnexpectedReply {
        /// The command.
        command: &'static str,
        /// The key.
        key: String,
        /// What came back instead.
        detail: String,
    },
    /// Any other error the server or the client library reported.
    #[error("Redis at {url} failed")]
    Redis {
        /// The URL, redacted.
        url: String,
        /// The underlying error.
        #[source]
        source: RedisError,
    },
}

impl RedisSourceError {
    /// Classifies a client library error for `url` (already redacted).
    pub(crate) fn from_redis(url: &str, source: RedisError) -> Self {
        let url = url.to_string();
        if source.is_connection_refusal() {
            return RedisSourceError::ConnectionRefused { url, source };
        }
        if tls_config_error(&source) {
            return RedisSourceError::Tls { url, source };
        }
        let code = source.code().unwrap_or_default();
        if matches!(source.kind(), ErrorKind::AuthenticationFailed)
            || matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM")
        {
            return RedisSourceError::Auth { url, source };
        }
        if source.is_io_error()
            || source.is_connection_dropped()
            || source.is_timeout()
            || matches!(
                source.kind(),
                ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ClusterDown
                )
            )
        {
            return RedisSourceError::Unavailable { url, source };
        }
        RedisSourceError::Redis { url, source }
    }

    /// Whether the same call may succeed later without a change of configuration.
    pub fn is_transient(&self) -> bool {
        match self {
            RedisSourceError::ConnectionRefused { .. }
            | RedisSourceError::Unavailable { .. }
            | RedisSourceError::NotMaster { .. }
            | RedisSourceError::Timeout { .. } => true,
            RedisSourceError::Redis { source, .. } => {
                !matches!(source.kind(), ErrorKind::InvalidClientConfig)
            }
            RedisSourceError::Config(_)
            | RedisSourceError::BadUrl { .. }
            | RedisSourceError::TlsFile(_)
            | RedisSourceError::NoRuntime(_)
            | RedisSourceError::Auth { .. }
            | RedisSourceError::Tls { .. }
            | RedisSourceError::WrongType { .. }
            | RedisSourceError::UnexpectedReply { .. } => false,
        }
    }
}

/// Whether a rustls error that needs a change of configuration is somewhere in the chain
/// (unlike a handshake cut short by a restarting server).
pub(crate) fn tls_config_error(e: &RedisError) -> bool {
    celery_scale_tls::is_config_problem(e)
}

impl From<RedisSourceError> for Error {
    fn from(e: RedisSourceError) -> Self {
        let message = e.to_string();
        match e {
            RedisSourceError::Config(c) => Error::Config(c),
            RedisSourceError::TlsFile(file) => {
                Error::Config(ConfigError::new(file.field(), file.problem()))
            }
            RedisSourceError::BadUrl { .. } | RedisSourceError::NoRuntime(_) => Error::Other {
                backend: BACKEND,
                message,
                transient: false,
                source: Some(Box::new(e)),
            },
            RedisSourceError::ConnectionRefused { .. }
            | RedisSourceError::Unavailable { .. }
            | RedisSourceError::NotMaster { .. } => Error::Unavailable {
                backend: BACKEND,
                message,
                source: Some(Box::new(e)),
            },
            RedisSourceError::Tls { .. } => Error::Other {
                backend: BACKEND,
                message,
                transient: false,
                source: Some(Box::new(e)),
            },
            RedisSourceError::Auth { .. } => Error::PermissionDenied {
                backend: BACKEND,
                message,
                source: Some(Box::new(e)),
            },
            RedisSourceError::Timeout { after, .. } => Error::Timeout {
                operation: format!("redis observe ({message})"),
                after,
                source: Some(Box::new(e)),
            },
            RedisSourceError::WrongType { .. } | RedisSourceError::UnexpectedReply { .. } => {
                Error::InvalidData {
                    backend: BACKEND,
                    message,
                    source: Some(Box::new(e)),
                }
            }
            RedisSourceError::Redis { .. } => {
                let transient = e.is_transient();
                Error::Other {
                    backend: BACKEND,
                    message,
                    transient,
                    source: Some(Box::new(e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_scale_core::ErrorKind as CoreKind;

    fn io(kind: std::io::ErrorKind) -> RedisError {
        RedisError::from(std::io::Error::new(kind, "boom"))
    }

    #[test]
    fn classifies_and_maps_with_transience() {
        let url = "redis://:***@h:1/0";
        let refused = RedisSourceError::from_redis(url, io(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(
            refused,
            RedisSourceError::ConnectionRefused { .. }
        ));
        let core: Error = refused.into();
        assert_eq!(core.kind(), CoreKind::Unavailable);
        assert!(core.is_transient());
        assert!(std::error::Error::source(&core).is_some());

        let reset = RedisSourceError::from_redis(url, io(std::io::ErrorKind::ConnectionReset));
        assert!(matches!(reset, RedisSourceError::Unavailable { .. }));
        assert!(Error::from(reset).is_transient());

        let auth = RedisSourceError::from_redis(
            url,
            RedisError::from((
                ErrorKind::AuthenticationFailed,
                "Password authentication failed",
            )),
        );
        assert!(matches!(auth, RedisSourceError::Auth { .. }));
        let core: Error = auth.into();
        assert_eq!(core.kind(), CoreKind::PermissionDenied);
        assert!(!core.is_transient());

        let t: Error = RedisSourceError::Timeout {
            url: url.into(),
            after: Duration::from_secs(5),
        }
        .into();
        assert_eq!(t.kind(), CoreKind::Timeout);
        assert!(t.is_transient());
        assert!(std::error::Error::source(&t).is_some_and(|s| s.is::<RedisSourceError>()));

        let c: Error = RedisSourceError::Config(ConfigError::new("sep", "empty")).into();
        assert_eq!(c.kind(), CoreKind::Config);
        assert!(!c.is_transient());
    }
}
