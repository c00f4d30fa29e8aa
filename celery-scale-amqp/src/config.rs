//! Configuration of an [`AmqpQueueSource`](crate::AmqpQueueSource): serde (TOML, JSON) and a
//! builder, validated with errors that name the field.

use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use celery_scale_core::{ConfigError, SecretUrl, wildcard_match};
use lapin::uri::{AMQPScheme, AMQPUri};
use serde::{Deserialize, Serialize};

/// The RabbitMQ management API (plugin `rabbitmq_management`, port 15672 by default).
///
/// With it the source reads `messages_unacknowledged` (in flight), the message rates and the
/// head message timestamp of each queue, and can discover queues. Its figures are statistics that
/// RabbitMQ refreshes every `collect_statistics_interval` (5 s by default): they lag.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagementConfig {
    /// The API's base URL with the credentials of a user tagged `monitoring` (or `management`),
    /// e.g. `http://celery-scale:secret@rabbit.internal:15672` (`https://` for TLS). A path is
    /// kept as a prefix (e.g. behind a reverse proxy: `https://h/rabbitmq`).
    pub url: SecretUrl,
    /// Deadline of one management read (all its HTTP requests).
    #[serde(default = "default_management_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// A PEM file of CA certificates to trust for an `https://` API signed by a private CA, in
    /// addition to the web PKI roots. Unset: the source's `tls.ca_file`, if any (the broker's
    /// CA usually signs both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for ManagementConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ManagementConfig {
            url,
            timeout,
            ca_file,
        } = self;
        f.debug_struct("ManagementConfig")
            .field("url", &url.redacted())
            .field("timeout", timeout)
            .field("ca_file", ca_file)
            .finish()
    }
}

impl ManagementConfig {
    /// The management API at `url` with the default timeout.
    pub fn new(url: impl Into<SecretUrl>) -> Self {
        ManagementConfig {
            url: url.into(),
            timeout: default_management_timeout(),
            ca_file: None,
        }
    }

    /// The same with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same, trusting the CA certificates of the PEM file at `path` too.
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }
}

/// Queue discovery through the management API (`GET /api/queues/{vhost}`).
///
/// Celery's internal queues are always left out: `*.celery.pidbox`, `*.reply.celery.pidbox`,
/// `celeryev.*`, `*.dq2` and `celery_delayed_*`, and RabbitMQ's server-named `amq.gen-*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// How often to list the vhost's queues again.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// Discovered queue names to leave out; `*` matches any run of characters (e.g. `"tmp-*"`).
    pub exclude: Vec<String>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            refresh: Duration::from_secs(60),
            exclude: Vec::new(),
        }
    }
}

/// Certificates for `amqps://` beyond the built-in web PKI roots: a private certificate authority
/// and, for mutual TLS, a client identity (a PEM certificate and key, or a PKCS#12 file).
///
/// The files are read, and checked, when the source is made
/// ([`AmqpQueueSource::new`](crate::AmqpQueueSource::new)); an error names the field.
/// The worker-event consumer shares the source's connection, so it uses the same settings.
///
/// ```
/// use celery_scale_amqp::{AmqpSourceConfig, TlsConfig};
/// let config: AmqpSourceConfig = toml::from_str(r#"
///     url = "amqps://celery:secret@rabbit.internal:5671/%2f"
///     queues = ["celery"]
///     [tls]
///     ca_file = "/etc/celery-scale/rabbitmq-ca.pem"
///     client_pkcs12_file = "/etc/celery-scale/client.p12"
///     client_pkcs12_password = "p12-secret"
/// "#).unwrap();
/// config.validate().unwrap();
/// let shown = format!("{config:?}");
/// assert!(!shown.contains("p12-secret") && !shown.contains(":secret@"), "{shown}");
/// ```
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// A PEM file with the certificate authority (one or more certificates) that signed the
    /// broker's certificate. lapin trusts it **in addition to** the web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate (its chain may follow it), for mutual TLS; needs
    /// `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// The PEM private key of `client_cert_file` (PKCS#8, PKCS#1 or SEC1; not encrypted).
    pub client_key_file: Option<PathBuf>,
    /// A PKCS#12 file (`.p12`, `.pfx`) with the client certificate and its key, for mutual TLS,
    /// instead of `client_cert_file` and `client_key_file`.
    pub client_pkcs12_file: Option<PathBuf>,
    /// The password of `client_pkcs12_file` (none: the empty password). Never shown by `Debug`.
    pub client_pkcs12_password: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let TlsConfig {
            ca_file,
            client_cert_file,
            client_key_file,
            client_pkcs12_file,
            client_pkcs12_password,
        } = self;
        f.debug_struct("TlsConfig")
            .field("ca_file", ca_file)
            .field("client_cert_file", client_cert_file)
            .field("client_key_file", client_key_file)
            .field("client_pkcs12_file", client_pkcs12_file)
            .field(
                "client_pkcs12_password",
                &client_pkcs12_password.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

impl TlsConfig {
    /// Trusts the certificate authority in the PEM file `ca_file` (in addition to the web PKI
    /// roots).
    pub fn with_ca_file(mut self, ca_file: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(ca_file.into());
        self
    }

    /// Presents the PEM client certificate `cert_file` with its PEM private key `key_file`
    /// (mutual TLS).
    pub fn with_client_cert(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.client_cert_file = Some(cert_file.into());
        self.client_key_file = Some(key_file.into());
        self
    }

    /// Presents the client certificate and key of the PKCS#12 file `file`, decrypted with
    /// `password` (mutual TLS).
    pub fn with_client_pkcs12(
        mut self,
        file: impl Into<PathBuf>,
        password: impl Into<String>,
    ) -> Self {
        self.client_pkcs12_file = Some(file.into());
        self.client_pkcs12_password = Some(password.into());
        self
    }

    /// Checks how the fields combine (the files themselves are read when the source is made).
    fn validate(&self, scheme: &AMQPScheme) -> Result<(), ConfigError> {
        if *scheme != AMQPScheme::AMQPS {
            return Err(ConfigError::new(
                "tls",
                "is set but the URL scheme is \"amqp\", not \"amqps\"",
            ));
        }
        let empty = |p: &Option<PathBuf>| p.as_ref().is_some_and(|p| p.as_os_str().is_empty());
        for (field, path) in [
            ("tls.ca_file", &self.ca_file),
            ("tls.client_cert_file", &self.client_cert_file),
            ("tls.client_key_file", &self.client_key_file),
            ("tls.client_pkcs12_file", &self.client_pkcs12_file),
        ] {
            if empty(path) {
                return Err(ConfigError::new(field, "must not be empty"));
            }
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(ConfigError::new(
                "tls.client_key_file",
                "client_cert_file and client_key_file go together",
            ));
        }
        if self.client_pkcs12_file.is_some() && self.client_cert_file.is_some() {
            return Err(ConfigError::new(
                "tls.client_pkcs12_file",
                "is a second client identity besides client_cert_file: set one of them",
            ));
        }
        if self.client_pkcs12_password.is_some() && self.client_pkcs12_file.is_none() {
            return Err(ConfigError::new(
                "tls.client_pkcs12_password",
                "is set without client_pkcs12_file",
            ));
        }
        Ok(())
    }
}

/// Configuration of an [`AmqpQueueSource`](crate::AmqpQueueSource).
///
/// ```
/// use celery_scale_amqp::AmqpSourceConfig;
/// let config: AmqpSourceConfig = toml::from_str(r#"
///     url = "amqps://celery:secret@rabbit.internal:5671/%2f"
///     queues = ["celery", "emails"]
///     [management]
///     url = "https://monitor:secret2@rabbit.internal:15671"
///     timeout = "2s"
/// "#).unwrap();
/// config.validate().unwrap();
/// assert!(config.heartbeats);
/// let shown = format!("{config:?}");
/// assert!(!shown.contains("secret"), "{shown}");
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSourceConfig {
    /// The broker URL, as Celery's `broker_url`: `amqp://user:password@host[:port]/vhost`,
    /// `amqps://...` for TLS. The vhost is URL-encoded: `/` is `%2f` (an URL without a path means
    /// `/`; a bare trailing `/` means the empty vhost, as in lapin and pika).
    pub url: SecretUrl,
    /// The Celery queue names to watch.
    #[serde(default)]
    pub queues: Vec<String>,
    /// The management API, for in-flight counts, rates, head timestamps and discovery.
    #[serde(default)]
    pub management: Option<ManagementConfig>,
    /// List the vhost's queues through the management API, in addition to `queues`.
    #[serde(default)]
    pub discovery: Option<DiscoveryConfig>,
    /// Consume Celery's worker events for executing tasks, live workers and throughput.
    #[serde(default = "yes")]
    pub heartbeats: bool,
    /// Count only heartbeats of workers whose node name matches one of these (`*` matches any
    /// run of characters, e.g. `"emails@*"`); empty: every worker of this vhost.
    #[serde(default)]
    pub worker_hostnames: Vec<String>,
    /// The window over which heartbeats measure throughput.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub heartbeat_window: Duration,
    /// How long the event consumer must be up before its worker figures are reported (a worker
    /// beats every 2 s; until one beat of each has arrived the figures would read low).
    #[serde(default = "default_warmup", with = "humantime_serde")]
    pub heartbeat_warmup: Duration,
    /// Deadline of one observation, connecting included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Deadline of one connection attempt (TCP, TLS and the AMQP handshake).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The connection name RabbitMQ shows (management UI, `rabbitmqctl list_connections`).
    #[serde(default = "default_connection_name")]
    pub connection_name: String,
    /// Certificates for an `amqps://` URL: a private certificate authority, a client identity.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// How often a watched queue that does not exist is declared again to see whether it does
    /// now (each such declare costs a channel, which the broker closes). Meanwhile it reads as
    /// 0 ready. With the management API, a queue it lists is rechecked at the next observation
    /// instead, and one it does not list is not declared at all.
    #[serde(default = "default_missing_queue_recheck", with = "humantime_serde")]
    pub missing_queue_recheck: Duration,
}

impl std::fmt::Debug for AmqpSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let AmqpSourceConfig {
            url,
            queues,
            management,
            discovery,
            heartbeats,
            worker_hostnames,
            heartbeat_window,
            heartbeat_warmup,
            timeout,
            connect_timeout,
            connection_name,
            tls,
            missing_queue_recheck,
        } = self;
        f.debug_struct("AmqpSourceConfig")
            .field("url", &url.redacted())
            .field("queues", queues)
            .field("management", management)
            .field("discovery", discovery)
            .field("heartbeats", heartbeats)
            .field("worker_hostnames", worker_hostnames)
            .field("heartbeat_window", heartbeat_window)
            .field("heartbeat_warmup", heartbeat_warmup)
            .field("timeout", timeout)
            .field("connect_timeout", connect_timeout)
            .field("connection_name", connection_name)
            .field("tls", tls)
            .field("missing_queue_recheck", missing_queue_recheck)
            .finish()
    }
}

fn yes() -> bool {
    true
}
fn default_window() -> Duration {
    Duration::from_secs(60)
}
fn default_warmup() -> Duration {
    Duration::from_millis(2500)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_management_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_missing_queue_recheck() -> Duration {
    Duration::from_secs(30)
}
fn default_connection_name() -> String {
    "celery-scale".to_string()
}

/// The longest queue name AMQP 0-9-1 can carry (a short string).
const MAX_QUEUE_NAME: usize = 255;
/// The longest connection name accepted (RabbitMQ shows it in its UI and logs).
const MAX_CONNECTION_NAME: usize = 255;

/// The range `(low, high, whether low itself is allowed)` of a duration field.
type Bounds = (Duration, Duration, bool);
const HOUR: Duration = Duration::from_secs(3600);
/// `timeout`, `connect_timeout`, `management.timeout`: above zero, at most 1 hour.
const TIMEOUTS: Bounds = (Duration::ZERO, HOUR, false);
/// `heartbeat_window`: above zero, at most 1 hour.
const HEARTBEAT_WINDOW: Bounds = (Duration::ZERO, HOUR, false);
/// `heartbeat_warmup`: zero to 10 minutes.
const HEARTBEAT_WARMUP: Bounds = (Duration::ZERO, Duration::from_secs(600), true);
/// `discovery.refresh`: 100 ms to 24 hours.
const DISCOVERY_REFRESH: Bounds = (
    Duration::from_millis(100),
    Duration::from_secs(86_400),
    true,
);
/// `missing_queue_recheck`: 1 second to 1 hour.
const MISSING_QUEUE_RECHECK: Bounds = (Duration::from_secs(1), HOUR, true);

/// Checks that the duration `field` is within `bounds`; the error names the field and the range.
fn within(field: &str, value: Duration, (low, high, low_ok): Bounds) -> Result<(), ConfigError> {
    let show = |d: Duration| humantime::format_duration(d).to_string();
    if value < low || (value == low && !low_ok) {
        let rule = if low.is_zero() {
            "must be above zero".to_string()
        } else {
            format!("is {}; at least {}", show(value), show(low))
        };
        return Err(ConfigError::new(field, rule));
    }
    if value > high {
        return Err(ConfigError::new(
            field,
            format!("is {}; at most {}", show(value), show(high)),
        ));
    }
    Ok(())
}

/// Parses an AMQP URL without ever putting the password in the error.
pub(crate) fn parse_amqp_url(url: &SecretUrl) -> Result<AMQPUri, ConfigError> {
    let raw = url.expose();
    AMQPUri::from_str(raw).map_err(|reason| {
        // The parser quotes its input; put the redacted URL in its place.
        let reason = reason.replace(raw, &url.redacted());
        let reason = if reason.contains(raw) || password_of(raw).is_some_and(|p| reason.contains(p))
        {
            "not a valid URL".to_string()
        } else {
            reason
        };
        ConfigError::new(
            "url",
            format!(
                "{} is not an AMQP URL (amqp://user:password@host:port/vhost): {reason}",
                url.redacted()
            ),
        )
    })
}

/// The password part of `scheme://user:password@host`, when there is one.
fn password_of(raw: &str) -> Option<&str> {
    let rest = &raw[raw.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

/// Parses the management base URL (`http(s)://[user:password@]host[:port][/prefix]`).
pub(crate) fn parse_management_url(url: &SecretUrl) -> Result<url::Url, ConfigError> {
    let bad = |rule: String| ConfigError::new("management.url", rule);
    let parsed = url::Url::parse(url.expose())
        .map_err(|e| bad(format!("{} is not a valid URL: {e}", url.redacted())))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad(format!(
            "{} must be http:// or https:// (the management API, port 15672 by default)",
            url.redacted()
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad(format!("{} has no host", url.redacted())));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad(format!(
            "{} must not have a query or fragment",
            url.redacted()
        )));
    }
    Ok(parsed)
}

impl AmqpSourceConfig {
    /// A configuration for `url` with every other field at its default (no queues yet).
    pub fn new(url: impl Into<SecretUrl>) -> Self {
        AmqpSourceConfig {
            url: url.into(),
            queues: Vec::new(),
            management: None,
            discovery: None,
            heartbeats: true,
            worker_hostnames: Vec::new(),
            heartbeat_window: default_window(),
            heartbeat_warmup: default_warmup(),
            timeout: default_timeout(),
            connect_timeout: default_connect_timeout(),
            connection_name: default_connection_name(),
            tls: None,
            missing_queue_recheck: default_missing_queue_recheck(),
        }
    }

    /// A builder for `url`.
    pub fn builder(url: impl Into<SecretUrl>) -> AmqpSourceConfigBuilder {
        AmqpSourceConfigBuilder {
            config: AmqpSourceConfig::new(url),
        }
    }

    /// The vhost the URL names (`/` for `%2f` or no path).
    pub fn vhost(&self) -> Result<String, ConfigError> {
        Ok(parse_amqp_url(&self.url)?.vhost)
    }

    /// Checks every field, the URLs included; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.url.expose().trim().is_empty() {
            return Err(ConfigError::new("url", "must not be empty"));
        }
        let uri = parse_amqp_url(&self.url)?;
        if self.queues.is_empty() && self.discovery.is_none() {
            return Err(ConfigError::new(
                "queues",
                "is empty: name at least one queue or enable discovery",
            ));
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.is_empty() {
                return Err(ConfigError::new(
                    format!("queues[{i}]"),
                    "must not be empty (the empty name asks the broker for a new queue)",
                ));
            }
            if q.len() > MAX_QUEUE_NAME {
                return Err(ConfigError::new(
                    format!("queues[{i}]"),
                    format!("is {} bytes long; AMQP allows {MAX_QUEUE_NAME}", q.len()),
                ));
            }
            if self.queues[..i].contains(q) {
                return Err(ConfigError::new(
                    format!("queues[{i}]"),
                    format!("{q:?} is listed twice"),
                ));
            }
        }
        if let Some(m) = &self.management {
            parse_management_url(&m.url)?;
            within("management.timeout", m.timeout, TIMEOUTS)?;
            if m.ca_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(ConfigError::new("management.ca_file", "must not be empty"));
            }
        }
        if let Some(d) = &self.discovery {
            if self.management.is_none() {
                return Err(ConfigError::new(
                    "discovery",
                    "needs the management API: set management.url",
                ));
            }
            within("discovery.refresh", d.refresh, DISCOVERY_REFRESH)?;
            for (i, p) in d.exclude.iter().enumerate() {
                if p.is_empty() {
                    return Err(ConfigError::new(
                        format!("discovery.exclude[{i}]"),
                        "must not be empty",
                    ));
                }
            }
        }
        for (i, p) in self.worker_hostnames.iter().enumerate() {
            if p.is_empty() {
                return Err(ConfigError::new(
                    format!("worker_hostnames[{i}]"),
                    "must not be empty (use \"*\" for every worker)",
                ));
            }
        }
        within("heartbeat_window", self.heartbeat_window, HEARTBEAT_WINDOW)?;
        within("heartbeat_warmup", self.heartbeat_warmup, HEARTBEAT_WARMUP)?;
        within("timeout", self.timeout, TIMEOUTS)?;
        within("connect_timeout", self.connect_timeout, TIMEOUTS)?;
        within(
            "missing_queue_recheck",
            self.missing_queue_recheck,
            MISSING_QUEUE_RECHECK,
        )?;
        if self.connection_name.len() > MAX_CONNECTION_NAME {
            return Err(ConfigError::new(
                "connection_name",
                format!(
                    "is {} bytes long; at most {MAX_CONNECTION_NAME}",
                    self.connection_name.len()
                ),
            ));
        }
        if let Some(tls) = &self.tls {
            tls.validate(&uri.scheme)?;
        }
        Ok(())
    }
}

/// Builds an [`AmqpSourceConfig`]; [`AmqpSourceConfigBuilder::build`] validates it.
///
/// ```
/// use std::time::Duration;
/// use celery_scale_amqp::{AmqpSourceConfig, ManagementConfig};
/// let config = AmqpSourceConfig::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .queues(["celery", "emails"])
///     .management(ManagementConfig::new("http://guest:guest@127.0.0.1:15672"))
///     .timeout(Duration::from_secs(3))
///     .build()
///     .unwrap();
/// assert_eq!(config.vhost().unwrap(), "/");
/// let err = AmqpSourceConfig::builder("amqp://h").build().unwrap_err();
/// assert_eq!(err.field, "queues");
/// ```
#[derive(Debug, Clone)]
pub struct AmqpSourceConfigBuilder {
    config: AmqpSourceConfig,
}

impl AmqpSourceConfigBuilder {
    /// Adds one queue to watch.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.config.queues.push(queue.into());
        self
    }

    /// Adds queues to watch.
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config
            .queues
            .extend(queues.into_iter().map(Into::into));
        self
    }

    /// Reads the management API too.
    pub fn management(mut self, management: ManagementConfig) -> Self {
        self.config.management = Some(management);
        self
    }

    /// Turns on queue discovery (needs [`management`](Self::management)).
    pub fn discovery(mut self, discovery: DiscoveryConfig) -> Self {
        self.config.discovery = Some(discovery);
        self
    }

    /// Turns the worker-event consumer on or off.
    pub fn heartbeats(mut self, on: bool) -> Self {
        self.config.heartbeats = on;
        self
    }

    /// Adds a worker node-name pattern whose heartbeats count.
    pub fn worker_hostname(mut self, pattern: impl Into<String>) -> Self {
        self.config.worker_hostnames.push(pattern.into());
        self
    }

    /// Sets the throughput window of the heartbeat registry.
    pub fn heartbeat_window(mut self, window: Duration) -> Self {
        self.config.heartbeat_window = window;
        self
    }

    /// Sets how long the consumer must be up before worker figures are reported.
    pub fn heartbeat_warmup(mut self, warmup: Duration) -> Self {
        self.config.heartbeat_warmup = warmup;
        self
    }

    /// Sets the deadline of one observation.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// Sets the deadline of one connection attempt.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Sets the connection name RabbitMQ shows.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.config.connection_name = name.into();
        self
    }

    /// Sets how often a missing queue is declared again.
    pub fn missing_queue_recheck(mut self, every: Duration) -> Self {
        self.config.missing_queue_recheck = every;
        self
    }

    /// Sets the certificates for an `amqps://` URL.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.config.tls = Some(tls);
        self
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<AmqpSourceConfig, ConfigError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// Celery's (and RabbitMQ's) internal queues, which discovery leaves out.
pub(crate) fn is_internal_queue(name: &str) -> bool {
    const PATTERNS: [&str; 6] = [
        "*.celery.pidbox",
        "*.reply.celery.pidbox",
        "celeryev.*",
        "*.dq2",
        "celery_delayed_*",
        "amq.gen-*",
    ];
    PATTERNS.iter().any(|p| wildcard_match(p, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_builder_agree() {
        let c: AmqpSourceConfig =
            serde_json::from_str(r#"{"url": "amqp://h", "queues": ["celery"]}"#).unwrap();
        assert!(c.heartbeats);
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert_eq!(
            c,
            AmqpSourceConfig::builder("amqp://h")
                .queue("celery")
                .build()
                .unwrap()
        );
        assert_eq!(c.vhost().unwrap(), "/");
    }

    #[test]
    fn vhosts_from_the_url() {
        let v = |u: &str| {
            AmqpSourceConfig::builder(u)
                .queue("q")
                .build()
                .unwrap()
                .vhost()
                .unwrap()
        };
        assert_eq!(v("amqp://u:p@h:5672/%2f"), "/");
        assert_eq!(v("amqps://u:p@h/prod"), "prod");
        assert_eq!(v("amqp://u:p@h/a%2fb"), "a/b");
    }

    #[test]
    fn rejects_unknown_fields_and_names_bad_ones() {
        let e = serde_json::from_str::<AmqpSourceConfig>(
            r#"{"url": "amqp://h", "queues": ["a"], "exchange": "x"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("exchange"), "{e}");
        let field = |c: AmqpSourceConfigBuilder| c.build().unwrap_err().field;
        let b = || AmqpSourceConfig::builder("amqp://h").queue("a");
        assert_eq!(field(b().queue("a")), "queues[1]");
        assert_eq!(field(b().queue("")), "queues[1]");
        assert_eq!(field(b().queue("x".repeat(256))), "queues[1]");
        assert_eq!(field(b().timeout(Duration::ZERO)), "timeout");
        assert_eq!(
            field(b().connect_timeout(Duration::ZERO)),
            "connect_timeout"
        );
        assert_eq!(
            field(b().heartbeat_window(Duration::ZERO)),
            "heartbeat_window"
        );
        assert_eq!(
            field(b().discovery(DiscoveryConfig::default())),
            "discovery"
        );
        assert_eq!(
            field(b().management(ManagementConfig::new("amqp://u:p@h"))),
            "management.url"
        );
        assert_eq!(
            field(b().management(ManagementConfig::new("http://h").with_timeout(Duration::ZERO))),
            "management.timeout"
        );
        assert_eq!(
            field(AmqpSourceConfig::builder("http://u:p@h").queue("a")),
            "url"
        );
        assert_eq!(field(AmqpSourceConfig::builder(" ").queue("a")), "url");
        let discovered = AmqpSourceConfig::builder("amqp://h")
            .management(ManagementConfig::new("http://h:15672"))
            .discovery(DiscoveryConfig::default())
            .build();
        assert!(discovered.is_ok(), "discovery alone needs no queue names");
    }

    #[test]
    fn absurd_values_are_rejected_naming_the_field_and_the_bound() {
        let b = || AmqpSourceConfig::builder("amqp://h").queue("a");
        let err = |c: AmqpSourceConfigBuilder| c.build().unwrap_err();
        let hour = Duration::from_secs(3600);
        let over = hour + Duration::from_secs(1);
        let e = err(b().timeout(over));
        assert_eq!(e.field, "timeout");
        assert!(e.rule.contains("at most 1h"), "{e}");
        assert!(
            b().timeout(hour).build().is_ok(),
            "the bound itself is allowed"
        );
        assert_eq!(err(b().timeout(Duration::MAX)).field, "timeout");
        assert_eq!(err(b().connect_timeout(over)).field, "connect_timeout");
        assert_eq!(err(b().heartbeat_window(over)).field, "heartbeat_window");
        assert_eq!(
            err(b().heartbeat_warmup(Duration::from_secs(601))).field,
            "heartbeat_warmup"
        );
        assert!(b().heartbeat_warmup(Duration::ZERO).build().is_ok());
        assert_eq!(
            err(b().missing_queue_recheck(Duration::from_millis(999))).field,
            "missing_queue_recheck"
        );
        assert_eq!(
            err(b().missing_queue_recheck(over)).field,
            "missing_queue_recheck"
        );
        assert_eq!(
            err(b().management(ManagementConfig::new("http://h").with_timeout(over))).field,
            "management.timeout"
        );
        let with_discovery = |refresh: Duration| {
            b().management(ManagementConfig::new("http://h"))
                .discovery(DiscoveryConfig {
                    refresh,
                    exclude: Vec::new(),
                })
        };
        assert_eq!(
            err(with_discovery(Duration::from_millis(10))).field,
            "discovery.refresh"
        );
        assert_eq!(
            err(with_discovery(Duration::from_secs(86_401))).field,
            "discovery.refresh"
        );
        assert_eq!(err(b().worker_hostname("")).field, "worker_hostnames[0]");
        assert_eq!(
            err(b().connection_name("n".repeat(256))).field,
            "connection_name"
        );
        // Through TOML, as a daemon's configuration file gives them.
        let e = toml::from_str::<AmqpSourceConfig>(
            "url = \"amqp://h\"\nqueues = [\"a\"]\ntimeout = \"2days\"\n",
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert_eq!(e.to_string(), "timeout: is 2days; at most 1h");
    }

    #[test]
    fn tls_options_are_checked_and_named() {
        let field = |c: AmqpSourceConfigBuilder| c.build().unwrap_err().field;
        let tls = || AmqpSourceConfig::builder("amqps://u:p@h/%2f").queue("a");
        let ca = || TlsConfig::default().with_ca_file("/etc/ca.pem");
        // TLS options need an amqps:// URL.
        assert_eq!(
            field(
                AmqpSourceConfig::builder("amqp://u:p@h/%2f")
                    .queue("a")
                    .tls(ca())
            ),
            "tls"
        );
        assert!(tls().tls(ca()).build().is_ok());
        assert!(tls().tls(TlsConfig::default()).build().is_ok());
        let half = TlsConfig {
            client_cert_file: Some("/etc/client.pem".into()),
            ..ca()
        };
        assert_eq!(field(tls().tls(half)), "tls.client_key_file");
        let both = ca()
            .with_client_cert("/etc/client.pem", "/etc/client.key")
            .with_client_pkcs12("/etc/client.p12", "pw");
        assert_eq!(field(tls().tls(both)), "tls.client_pkcs12_file");
        let password_alone = TlsConfig {
            client_pkcs12_password: Some("pw".into()),
            ..ca()
        };
        assert_eq!(
            field(tls().tls(password_alone)),
            "tls.client_pkcs12_password"
        );
        assert_eq!(
            field(tls().tls(TlsConfig::default().with_ca_file(""))),
            "tls.ca_file"
        );
    }

    #[test]
    fn tls_serializes_and_hides_the_pkcs12_password() {
        let c = AmqpSourceConfig::builder("amqps://u:pw@h/%2f")
            .queue("celery")
            .tls(
                TlsConfig::default()
                    .with_ca_file("/etc/ca.pem")
                    .with_client_pkcs12("/etc/client.p12", "p12-hunter2"),
            )
            .build()
            .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("p12-hunter2"), "{shown}");
        assert!(shown.contains("/etc/client.p12"), "{shown}");
        let toml = toml::to_string(&c).unwrap();
        let back: AmqpSourceConfig = toml::from_str(&toml).unwrap();
        assert_eq!(back, c);
        let e = toml::from_str::<AmqpSourceConfig>(
            "url = \"amqps://h\"\nqueues = [\"a\"]\n[tls]\ncafile = \"x\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("cafile"), "{e}");
    }

    #[test]
    fn bad_urls_never_show_the_password() {
        for url in [
            "amqp://user:hunter2@h:notaport/%2f",
            "http://user:hunter2@h/%2f",
            "amqp://user:hunter2@[::1/x",
        ] {
            let e = AmqpSourceConfig::builder(url)
                .queue("a")
                .build()
                .unwrap_err();
            assert_eq!(e.field, "url");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        let e = AmqpSourceConfig::builder("amqp://h")
            .queue("a")
            .management(ManagementConfig::new("ftp://user:hunter2@h"))
            .build()
            .unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn serializes_round_trip_with_humantime() {
        let c = AmqpSourceConfig::builder("amqp://u:pw@h/%2f")
            .queue("celery")
            .management(ManagementConfig::new("http://u:pw2@h:15672"))
            .discovery(DiscoveryConfig::default())
            .timeout(Duration::from_millis(1500))
            .build()
            .unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""timeout":"1s 500ms""#), "{json}");
        let back: AmqpSourceConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        let shown = format!("{c:?}");
        assert!(!shown.contains("pw"), "{shown}");
    }

    #[test]
    fn internal_queues_and_wildcards() {
        for internal in [
            "celery@host.celery.pidbox",
            "abc.reply.celery.pidbox",
            "celeryev.1234",
            "celery.dq2",
            "celery_delayed_27",
            "amq.gen-abc",
        ] {
            assert!(is_internal_queue(internal), "{internal}");
        }
        for user in ["celery", "emails", "celeryev", "pidbox"] {
            assert!(!is_internal_queue(user), "{user}");
        }
    }
}
