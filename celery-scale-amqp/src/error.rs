//! What can go wrong reading Celery's queues on RabbitMQ, by meaning.

use std::time::Duration;

use celery_scale_core::{ConfigError, Error};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

const BACKEND: &str = "rabbitmq";

/// An error of the RabbitMQ queue source. URLs in it are always redacted and the password never
/// appears in it, in its `Debug` output or in its sources.
///
/// Converts into [`celery_scale_core::Error`] with the right
/// [`is_transient`](celery_scale_core::Error::is_transient): an unreachable or restarting
/// broker, a dropped connection, timeouts and 5xx answers of the management API are transient; a
/// refused login, a missing queue or vhost, a refused permission, an untrusted certificate and
/// bad configuration are not.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpSourceError {
    /// A configuration field is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A TLS file of the configuration cannot be read or does not hold what the field needs
    /// (no PEM certificate, a key that is not the certificate's, a wrong PKCS#12 password).
    /// Converts into a core [`Config`](celery_scale_core::Error::Config) error naming the field.
    #[error(transparent)]
    TlsFile(#[from] celery_scale_tls::TlsFileError),
    /// The source was created outside a Tokio runtime.
    #[error("AmqpQueueSource::new must be called within a Tokio runtime")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
    /// The HTTP client of the management API could not be built (TLS setup).
    #[error("cannot build the management API client")]
    HttpClient(#[source] reqwest::Error),
    /// The broker could not be reached, or dropped the connection (down, restarting, network),
    /// or closed it (`CONNECTION_FORCED`: an operator or a node shutting down).
    #[error("RabbitMQ at {url} is unavailable")]
    Unavailable {
        /// The broker URL, redacted.
        url: String,
        /// The client library's error.
        #[source]
        source: Box<lapin::Error>,
    },
    /// The TLS handshake with the broker failed: its certificate is not trusted (set
    /// `tls.ca_file` to the authority that signed it) or does not name the host, a client
    /// certificate is missing or refused, or the port does not speak TLS. Not transient, except
    /// for failures that are not about the configuration (an internal error alert).
    #[error("TLS with RabbitMQ at {url} failed: {reason}")]
    Tls {
        /// The broker URL, redacted.
        url: String,
        /// rustls' reason, e.g. `invalid peer certificate: UnknownIssuer`.
        reason: String,
        /// The client library's error (rustls' error is inside it).
        #[source]
        source: Box<lapin::Error>,
    },
    /// The broker refused the login (wrong user or password, or a user without access to the
    /// vhost).
    #[error("RabbitMQ at {url} refused the login")]
    LoginRefused {
        /// The broker URL, redacted.
        url: String,
        /// The broker's reason (`ACCESS_REFUSED - Login was refused ...`).
        #[source]
        source: Box<lapin::Error>,
    },
    /// The vhost does not exist, or the user may not open it (`NOT_ALLOWED`).
    #[error("RabbitMQ at {url} does not let this user open vhost {vhost:?}")]
    VhostRefused {
        /// The broker URL, redacted.
        url: String,
        /// The vhost.
        vhost: String,
        /// The broker's reason.
        #[source]
        source: Box<lapin::Error>,
    },
    /// A queue that the configuration names does not exist (passive declare answered 404).
    #[error("queue {queue:?} does not exist in vhost {vhost:?}")]
    QueueNotFound {
        /// The queue.
        queue: String,
        /// The vhost.
        vhost: String,
    },
    /// The user may not declare (not even passively) a queue: it needs the `configure`
    /// permission on it (403 `ACCESS_REFUSED`).
    #[error("RabbitMQ refused access to queue {queue:?} in vhost {vhost:?}")]
    QueueAccessRefused {
        /// The queue.
        queue: String,
        /// The vhost.
        vhost: String,
        /// The broker's reason.
        #[source]
        source: Box<lapin::Error>,
    },
    /// The queue is another connection's exclusive queue (405 `RESOURCE_LOCKED`).
    #[error("queue {queue:?} in vhost {vhost:?} is another connection's exclusive queue")]
    QueueLocked {
        /// The queue.
        queue: String,
        /// The vhost.
        vhost: String,
        /// The broker's reason.
        #[source]
        source: Box<lapin::Error>,
    },
    /// The broker answered with an error we did not expect.
    #[error("RabbitMQ at {url} answered {operation} with an error")]
    Protocol {
        /// The broker URL, redacted.
        url: String,
        /// What we asked, e.g. `queue.declare(passive) of "celery"`.
        operation: String,
        /// The client library's error.
        #[source]
        source: Box<lapin::Error>,
    },
    /// The observation (or a connection attempt) did not finish in time.
    #[error("RabbitMQ at {url} did not answer {operation} within {after:?}")]
    Timeout {
        /// The URL (broker or management API), redacted.
        url: String,
        /// What timed out.
        operation: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
    /// The broker lowered the leader lease connection's heartbeat so far that it would drop a
    /// silent holder's connection, and hand the lease to another copy, sooner than the lease's
    /// period (it waits between 2 and 3 heartbeats). Raise the broker's `heartbeat` setting
    /// (default 60 s) to at least half the period, or shorten the period. Not transient.
    #[error(
        "RabbitMQ at {url} lowered the lease connection's heartbeat to {negotiated} s (asked          {asked} s): a silent holder would lose the lease after 2 x {negotiated} s, sooner than          its period of {period:?}"
    )]
    LeaseHeartbeat {
        /// The broker URL, redacted.
        url: String,
        /// The heartbeat asked for (seconds): half the period, rounded up.
        asked: u16,
        /// The heartbeat the connection got (seconds).
        negotiated: u16,
        /// The lease's period.
        period: Duration,
    },
    /// The management API could not be reached or the request failed on the way.
    #[error("RabbitMQ management API at {url} is unavailable")]
    ManagementUnavailable {
        /// The API's base URL, redacted.
        url: String,
        /// The HTTP client's error (its URL is stripped of credentials).
        #[source]
        source: reqwest::Error,
    },
    /// The management API answered with an error status.
    #[error("RabbitMQ management API at {url} answered {status} to GET {path}")]
    ManagementStatus {
        /// The API's base URL, redacted.
        url: String,
        /// The request path, e.g. `/api/queues/%2F/celery`.
        path: String,
        /// The HTTP status.
        status: u16,
    },
    /// The management API answered something that is not what it documents.
    #[error("RabbitMQ management API at {url} answered GET {path} with unexpected data")]
    ManagementData {
        /// The API's base URL, redacted.
        url: String,
        /// The request path.
        path: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

impl AmqpSourceError {
    /// Classifies an error of connecting to `url` (redacted) and vhost `vhost`.
    pub(crate) fn from_connect(url: &str, vhost: &str, source: lapin::Error) -> Self {
        let url = url.to_string();
        if let Some(tls) = celery_scale_tls::rustls_error(&source) {
            return AmqpSourceError::Tls {
                url,
                reason: tls.to_string(),
                source: Box::new(source),
            };
        }
        let kind = amqp_kind(&source).cloned();
        let unavailable = is_unavailable(&source);
        let source = Box::new(source);
        match kind {
            Some(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)) => {
                AmqpSourceError::LoginRefused { url, source }
            }
            Some(AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)) => AmqpSourceError::VhostRefused {
                url,
                vhost: vhost.to_string(),
                source,
            },
            _ if unavailable => AmqpSourceError::Unavailable { url, source },
            _ => AmqpSourceError::Protocol {
                url,
                operation: "connection.open".into(),
                source,
            },
        }
    }

    /// Classifies an error of `operation` on an open connection.
    pub(crate) fn from_operation(url: &str, operation: String, source: lapin::Error) -> Self {
        let url = url.to_string();
        let unavailable = is_unavailable(&source);
        let source = Box::new(source);
        if unavailable {
            AmqpSourceError::Unavailable { url, source }
        } else {
            AmqpSourceError::Protocol {
                url,
                operation,
                source,
            }
        }
    }

    /// Whether the same call may succeed later without a change of configuration.
    pub fn is_transient(&self) -> bool {
        match self {
            AmqpSourceError::Unavailable { .. }
            | AmqpSourceError::Timeout { .. }
            | AmqpSourceError::ManagementUnavailable { .. } => true,
            AmqpSourceError::ManagementStatus { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            AmqpSourceError::Tls { source, .. } => {
                !celery_scale_tls::is_config_problem(source.as_ref())
            }
            AmqpSourceError::Protocol { source, .. } => !matches!(
                amqp_kind(source),
                Some(AMQPErrorKind::Soft(
                    AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED
                )) | Some(AMQPErrorKind::Hard(
                    AMQPHardError::NOTALLOWED
                        | AMQPHardError::NOTIMPLEMENTED
                        | AMQPHardError::SYNTAXERROR
                        | AMQPHardError::COMMANDINVALID
                ))
            ),
            AmqpSourceError::Config(_)
            | AmqpSourceError::TlsFile(_)
            | AmqpSourceError::NoRuntime(_)
            | AmqpSourceError::HttpClient(_)
            | AmqpSourceError::LoginRefused { .. }
            | AmqpSourceError::VhostRefused { .. }
            | AmqpSourceError::QueueNotFound { .. }
            | AmqpSourceError::QueueAccessRefused { .. }
            | AmqpSourceError::QueueLocked { .. }
            | AmqpSourceError::LeaseHeartbeat { .. }
            | AmqpSourceError::ManagementData { .. } => false,
        }
    }
}

/// The AMQP reply code class of a broker error, if it is one.
pub(crate) fn amqp_kind(e: &lapin::Error) -> Option<&AMQPErrorKind> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.kind()),
        _ => None,
    }
}

/// Whether the error means the connection is gone or unusable (so: reconnect, and transient).
pub(crate) fn is_unavailable(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::IOError(_)
        | lapin::ErrorKind::MissingHeartbeatError
        | lapin::ErrorKind::InvalidConnectionState(_)
        | lapin::ErrorKind::InvalidChannelState(..)
        | lapin::ErrorKind::InvalidChannel(_) => true,
        lapin::ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            AMQPErrorKind::Hard(
                AMQPHardError::CONNECTIONFORCED
                    | AMQPHardError::RESOURCEERROR
                    | AMQPHardError::INTERNALERROR
            )
        ),
        _ => false,
    }
}

impl From<AmqpSourceError> for Error {
    fn from(e: AmqpSourceError) -> Self {
        let message = e.to_string();
        match e {
            AmqpSourceError::Config(c) => Error::Config(c),
            AmqpSourceError::TlsFile(file) => {
                Error::Config(ConfigError::new(file.field(), file.problem()))
            }
            AmqpSourceError::NoRuntime(_)
            | AmqpSourceError::HttpClient(_)
            | AmqpSourceError::QueueLocked { .. }
            | AmqpSourceError::LeaseHeartbeat { .. } => Error::Other {
                backend: BACKEND,
                message,
                transient: false,
                source: Some(Box::new(e)),
            },
            AmqpSourceError::Unavailable { .. } | AmqpSourceError::ManagementUnavailable { .. } => {
                Error::Unavailable {
                    backend: BACKEND,
                    message,
                    source: Some(Box::new(e)),
                }
            }
            AmqpSourceError::LoginRefused { .. }
            | AmqpSourceError::VhostRefused { .. }
            | AmqpSourceError::QueueAccessRefused { .. } => Error::PermissionDenied {
                backend: BACKEND,
                message,
                source: Some(Box::new(e)),
            },
            AmqpSourceError::ManagementStatus { status, .. } if status == 401 || status == 403 => {
                Error::PermissionDenied {
                    backend: BACKEND,
                    message,
                    source: Some(Box::new(e)),
                }
            }
            AmqpSourceError::QueueNotFound {
                ref queue,
                ref vhost,
            } => Error::NotFound {
                backend: BACKEND,
                what: format!("queue {queue:?} in vhost {vhost:?}"),
                source: Some(Box::new(e)),
            },
            AmqpSourceError::Timeout { after, .. } => Error::Timeout {
                operation: message,
                after,
                source: Some(Box::new(e)),
            },
            AmqpSourceError::ManagementData { .. } => Error::InvalidData {
                backend: BACKEND,
                message,
                source: Some(Box::new(e)),
            },
            AmqpSourceError::Protocol { .. }
            | AmqpSourceError::ManagementStatus { .. }
            | AmqpSourceError::Tls { .. } => {
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
    use lapin::protocol::AMQPError;

    fn amqp(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into()
    }

    #[test]
    fn classifies_and_maps_with_transience() {
        let url = "amqp://guest:***@h:5672/%2f";
        let refused = AmqpSourceError::from_connect(
            url,
            "/",
            lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        );
        assert!(matches!(refused, AmqpSourceError::Unavailable { .. }));
        let core: Error = refused.into();
        assert_eq!(core.kind(), CoreKind::Unavailable);
        assert!(core.is_transient());
        assert!(std::error::Error::source(&core).is_some());

        let login = AmqpSourceError::from_connect(
            url,
            "/",
            amqp(
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED - Login was refused",
            ),
        );
        assert!(matches!(login, AmqpSourceError::LoginRefused { .. }));
        let core: Error = login.into();
        assert_eq!(core.kind(), CoreKind::PermissionDenied);
        assert!(!core.is_transient());

        let vhost = AmqpSourceError::from_connect(
            url,
            "prod",
            amqp(
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
                "NOT_ALLOWED - vhost prod not found",
            ),
        );
        assert!(matches!(vhost, AmqpSourceError::VhostRefused { .. }));
        assert!(!Error::from(vhost).is_transient());

        let forced = AmqpSourceError::from_operation(
            url,
            "queue.declare".into(),
            amqp(
                AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
                "CONNECTION_FORCED - broker forced connection closure",
            ),
        );
        assert!(matches!(forced, AmqpSourceError::Unavailable { .. }));
        assert!(Error::from(forced).is_transient());

        let missing: Error = AmqpSourceError::QueueNotFound {
            queue: "emails".into(),
            vhost: "/".into(),
        }
        .into();
        assert_eq!(missing.kind(), CoreKind::NotFound);
        assert!(!missing.is_transient());
        assert!(missing.to_string().contains("emails"), "{missing}");
        let kept = std::error::Error::source(&missing).expect("the crate's error is the source");
        assert!(kept.is::<AmqpSourceError>(), "{kept:?}");

        let t: Error = AmqpSourceError::Timeout {
            url: url.into(),
            operation: "observe",
            after: Duration::from_secs(5),
        }
        .into();
        assert_eq!(t.kind(), CoreKind::Timeout);
        assert!(t.is_transient());
        assert!(std::error::Error::source(&t).is_some_and(|s| s.is::<AmqpSourceError>()));

        let status = |status| AmqpSourceError::ManagementStatus {
            url: "http://guest:***@h:15672".into(),
            path: "/api/queues/%2F/celery".into(),
            status,
        };
        assert!(Error::from(status(503)).is_transient());
        assert_eq!(Error::from(status(401)).kind(), CoreKind::PermissionDenied);
        assert!(!Error::from(status(400)).is_transient());

        let tls = |e: rustls::Error| {
            AmqpSourceError::from_connect(
                "amqps://u:***@h:5671/%2f",
                "/",
                lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            )
        };
        let untrusted = tls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert!(
            matches!(untrusted, AmqpSourceError::Tls { .. }),
            "{untrusted:?}"
        );
        assert!(
            untrusted.to_string().contains("UnknownIssuer"),
            "{untrusted}"
        );
        let core: Error = untrusted.into();
        assert_eq!(core.kind(), CoreKind::Other);
        assert!(!core.is_transient());
        let internal = tls(rustls::Error::AlertReceived(
            rustls::AlertDescription::InternalError,
        ));
        assert!(Error::from(internal).is_transient());

        let file: Error = AmqpSourceError::from(celery_scale_tls::TlsFileError::new(
            "tls.ca_file",
            std::path::Path::new("/etc/ca.pem"),
            "cannot be read",
            Some(std::io::Error::from(std::io::ErrorKind::NotFound).into()),
        ))
        .into();
        match &file {
            Error::Config(c) => {
                assert_eq!(c.field, "tls.ca_file");
                assert!(c.rule.contains("/etc/ca.pem"), "{c}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!file.is_transient());

        let c: Error = AmqpSourceError::Config(ConfigError::new("url", "empty")).into();
        assert_eq!(c.kind(), CoreKind::Config);
        assert!(!c.is_transient());
    }
}
