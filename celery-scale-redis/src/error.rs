//! What can go wrong reading Celery's queues on Redis, by meaning.

use std::path::PathBuf;
use std::time::Duration;

use celery_scale_core::{ConfigError, Error};
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
    /// A TLS certificate or key file could not be read.
    #[error("{field}: cannot read {path:?}")]
    TlsFile {
        /// The configuration field, e.g. `tls.ca_file`.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A TLS certificate or key file was read but is not what the field needs: no PEM
    /// certificate (or key) in it, a certificate rustls rejects, or a key that is not the
    /// client certificate's.
    #[error("{field}: {path:?} {detail}")]
    TlsContent {
        /// The configuration field, e.g. `tls.client_key_file`.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
        /// The parser's reason, when it gave one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
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
            | RedisSourceError::Timeout { .. } => true,
            RedisSourceError::Redis { source, .. } => {
                !matches!(source.kind(), ErrorKind::InvalidClientConfig)
            }
            RedisSourceError::Config(_)
            | RedisSourceError::BadUrl { .. }
            | RedisSourceError::TlsFile { .. }
            | RedisSourceError::TlsContent { .. }
            | RedisSourceError::NoRuntime(_)
            | RedisSourceError::Auth { .. }
            | RedisSourceError::Tls { .. }
            | RedisSourceError::WrongType { .. }
            | RedisSourceError::UnexpectedReply { .. } => false,
        }
    }
}

/// Whether a rustls certificate error is somewhere in the chain (a configuration problem, unlike
/// a handshake cut short by a restarting server).
pub(crate) fn tls_config_error(e: &RedisError) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        // The client library keeps its cause as an `Arc<dyn Error>`; tokio-rustls wraps rustls'
        // error in an `io::Error`.
        let err: &(dyn std::error::Error + 'static) =
            match err.downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>() {
                Some(arc) => arc.as_ref(),
                None => err,
            };
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::UnsupportedNameType
                    | rustls::Error::InvalidCertRevocationList(_)
                    | rustls::Error::AlertReceived(
                        rustls::AlertDescription::BadCertificate
                            | rustls::AlertDescription::CertificateRequired
                            | rustls::AlertDescription::UnknownCA
                            | rustls::AlertDescription::CertificateUnknown
                    )
            );
        }
        next = err.source();
    }
    false
}

impl From<RedisSourceError> for Error {
    fn from(e: RedisSourceError) -> Self {
        let message = e.to_string();
        match e {
            RedisSourceError::Config(c) => Error::Config(c),
            RedisSourceError::BadUrl { .. }
            | RedisSourceError::TlsFile { .. }
            | RedisSourceError::TlsContent { .. }
            | RedisSourceError::NoRuntime(_) => Error::Other {
                backend: BACKEND,
                message,
                transient: false,
                source: Some(Box::new(e)),
            },
            RedisSourceError::ConnectionRefused { .. } | RedisSourceError::Unavailable { .. } => {
                Error::Unavailable {
                    backend: BACKEND,
                    message,
                    source: Some(Box::new(e)),
                }
            }
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
