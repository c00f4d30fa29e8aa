//! Configuration of an [`AmqpQueueSource`](crate::AmqpQueueSource): serde (TOML, JSON) and a
//! builder, validated with errors that name the field.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use celery_scale_core::config::non_empty_patterns;
use celery_scale_core::{ConfigError, SecretUrl, wildcard_match};
use serde::{Deserialize, Serialize};

use crate::broker_url::{BrokerAddress, parse_broker_url, percent_encode};
use crate::transport_options::{self, ManagerOptions};

/// The RabbitMQ management API (plugin `rabbitmq_management`, port 15672 by default).
///
/// With it the source reads `messages_unacknowledged` (in flight), the message rates and the
/// head message timestamp of each queue, and can discover queues. Its figures are statistics that
/// RabbitMQ refreshes every `collect_statistics_interval` (5 s by default): they lag.
///
/// **On by default**, at the AMQP URL's host with its credentials: `http://host:15672` for
/// `amqp://`, `https://host:15671` for `amqps://` (one per broker of a failover list; the one of
/// the broker connected to is read), with kombu's `manager_hostname`, `manager_port`,
/// `manager_userid` and `manager_password` transport options taking precedence. Set `url` to
/// read another one, or turn it off with `management = false` (TOML) or
/// [`ManagementConfig::disabled`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagementConfig {
    /// Whether to read the management API at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The API's base URL with the credentials of a user tagged `monitoring` (or `management`),
    /// e.g. `http://celery-scale:secret@rabbit.internal:15672` (`https://` for TLS). A path is
    /// kept as a prefix (e.g. behind a reverse proxy: `https://h/rabbitmq`). Unset: derived from
    /// the AMQP URL (see above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<SecretUrl>,
    /// Deadline of one management read (all its HTTP requests).
    #[serde(default = "default_management_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// A PEM file of CA certificates to trust for an `https://` API signed by a private CA, in
    /// addition to the web PKI roots. Unset: the source's `tls.ca_file`, if any (the broker's
    /// CA usually signs both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl Default for ManagementConfig {
    /// On, at the URL derived from the AMQP URL.
    fn default() -> Self {
        ManagementConfig {
            enabled: true,
            url: None,
            timeout: default_management_timeout(),
            ca_file: None,
        }
    }
}

impl std::fmt::Debug for ManagementConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ManagementConfig {
            enabled,
            url,
            timeout,
            ca_file,
        } = self;
        f.debug_struct("ManagementConfig")
            .field("enabled", enabled)
            .field("url", &url.as_ref().map(SecretUrl::redacted))
            .field("timeout", timeout)
            .field("ca_file", ca_file)
            .finish()
    }
}

impl ManagementConfig {
    /// The management API at `url` with the default timeout.
    pub fn new(url: impl Into<SecretUrl>) -> Self {
        ManagementConfig {
            url: Some(url.into()),
            ..ManagementConfig::default()
        }
    }

    /// No management API: in-flight counts, rates and head timestamps are unknown, and
    /// discovery is not possible.
    pub fn disabled() -> Self {
        ManagementConfig {
            enabled: false,
            ..ManagementConfig::default()
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

/// `management = false` / `true`, or a `[management]` table.
fn management_setting<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<ManagementConfig, D::Error> {
    match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Bool(true) => Ok(ManagementConfig::default()),
        serde_json::Value::Bool(false) => Ok(ManagementConfig::disabled()),
        table => serde_json::from_value(table).map_err(serde::de::Error::custom),
    }
}

/// Queue discovery through the management API (`GET /api/queues/{vhost}`), every `refresh`.
///
/// Celery's internal queues are always left out: `*.celery.pidbox`, `*.reply.celery.pidbox`,
/// `celeryev.*`, `*.dq2` and `celery_delayed_*`, and RabbitMQ's server-named `amq.gen-*`.
pub use celery_scale_core::config::DiscoveryConfig;

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
    fn validate(&self, any_tls: bool) -> Result<(), ConfigError> {
        if !any_tls {
            return Err(ConfigError::new(
                "tls",
                "is set but no broker of the URL uses TLS (amqps://, or ssl in the URL or \
                 the transport options)",
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
    /// The broker URL, Celery's `broker_url` verbatim, read as kombu reads it:
    /// `amqp://`, `pyamqp://`, `librabbitmq://` or `amqps://` (TLS)
    /// `user:password@host[:port]/vhost`, with kombu's defaults (`localhost`, `guest`/`guest`,
    /// port 5672 or 5671 with TLS, vhost `/`: `amqp://host`, `amqp://host/` and
    /// `amqp://host//` all mean vhost `/`; `/prod` is `prod`, `/%2fprod` and `//prod` are
    /// `/prod`), the query options kombu takes (`ssl`, `heartbeat`, `connect_timeout`,
    /// `login_method`, `insist`), and Celery's `;`-separated failover lists
    /// (`amqp://u:p@h1//;amqp://u:p@h2//`): the first broker that answers is used, and the next
    /// one when it fails.
    pub url: SecretUrl,
    /// Celery's `broker_transport_options` verbatim (`broker_transport_options` is accepted as
    /// the key too). Options that change where to connect or what to read are honoured,
    /// kombu's others are accepted and ignored
    /// ([`ignored_transport_options`](Self::ignored_transport_options)), an unknown key is an
    /// error naming it. See the README's table.
    #[serde(
        default,
        alias = "broker_transport_options",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub transport_options: BTreeMap<String, serde_json::Value>,
    /// The Celery queue names to watch.
    #[serde(default)]
    pub queues: Vec<String>,
    /// The management API, for in-flight counts, rates, head timestamps and discovery: on by
    /// default at the AMQP URL's host with its credentials; `management = false` turns it off.
    #[serde(default, deserialize_with = "management_setting")]
    pub management: ManagementConfig,
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
            transport_options,
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
            .field(
                "transport_options",
                &transport_options
                    .iter()
                    .map(|(k, v)| {
                        let shown = if crate::transport_options::is_secret(k) {
                            "\"***\"".to_string()
                        } else {
                            v.to_string()
                        };
                        (k.as_str(), shown)
                    })
                    .collect::<BTreeMap<_, _>>(),
            )
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
            transport_options: BTreeMap::new(),
            queues: Vec::new(),
            management: ManagementConfig::default(),
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

    /// The vhost, as kombu reads it from the URL and the transport options (`/` for no path,
    /// `/`, `//` or `/%2f`).
    pub fn vhost(&self) -> Result<String, ConfigError> {
        Ok(self.resolve()?.brokers[0].vhost().to_string())
    }

    /// The brokers of the URL in the order they are tried (one, or several for a failover
    /// list), with kombu's defaults and the transport options applied.
    pub fn brokers(&self) -> Result<Vec<BrokerAddress>, ConfigError> {
        Ok(self.resolve()?.brokers)
    }

    /// The transport options accepted and ignored (they do not change what exists or is
    /// counted), sorted by key, each with why.
    pub fn ignored_transport_options(&self) -> Result<Vec<(String, &'static str)>, ConfigError> {
        Ok(self.resolve()?.ignored)
    }

    /// The management API base URLs to read, one per broker (the one of the broker connected
    /// to is read), or one when `management.url` is set; empty when it is turned off.
    pub fn management_urls(&self) -> Result<Vec<SecretUrl>, ConfigError> {
        Ok(self.resolve()?.management_urls)
    }

    /// The URL, the transport options and the management settings, resolved and checked.
    pub(crate) fn resolve(&self) -> Result<Resolved, ConfigError> {
        let mut brokers = parse_broker_url(self.url.expose())?;
        let options = transport_options::apply(&self.transport_options, &mut brokers)?;
        let vhosts: HashSet<&str> = brokers.iter().map(BrokerAddress::vhost).collect();
        if vhosts.len() > 1 {
            let mut vhosts: Vec<&str> = vhosts.into_iter().collect();
            vhosts.sort_unstable();
            return Err(ConfigError::new(
                "url",
                format!(
                    "the brokers of the failover list are in different vhosts ({vhosts:?}); \
                     one source watches one vhost"
                ),
            ));
        }
        let management_urls = if !self.management.enabled {
            Vec::new()
        } else if let Some(url) = &self.management.url {
            vec![url.clone()]
        } else {
            derived_management_urls(&brokers, &options.manager)
        };
        Ok(Resolved {
            brokers,
            ignored: options.ignored,
            management_urls,
            management_derived: self.management.enabled && self.management.url.is_none(),
        })
    }

    /// Checks every field, the URLs included; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.url.expose().trim().is_empty() {
            return Err(ConfigError::new("url", "must not be empty"));
        }
        let resolved = self.resolve()?;
        if self.queues.is_empty() && self.discovery.is_none() {
            return Err(ConfigError::new(
                "queues",
                "is empty: name at least one queue or enable discovery",
            ));
        }
        let mut seen = HashSet::with_capacity(self.queues.len());
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
            if !seen.insert(q.as_str()) {
                return Err(ConfigError::new(
                    format!("queues[{i}]"),
                    format!("{q:?} is listed twice"),
                ));
            }
        }
        let m = &self.management;
        if m.enabled {
            if let Some(url) = &m.url {
                parse_management_url(url)?;
            }
            for url in &resolved.management_urls {
                parse_management_url(url)?;
            }
            within("management.timeout", m.timeout, TIMEOUTS)?;
            if m.ca_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(ConfigError::new("management.ca_file", "must not be empty"));
            }
        }
        if let Some(d) = &self.discovery {
            if !m.enabled {
                return Err(ConfigError::new(
                    "discovery",
                    "needs the management API, which is turned off (management = false)",
                ));
            }
            within("discovery.refresh", d.refresh, DISCOVERY_REFRESH)?;
            non_empty_patterns("discovery.exclude", &d.exclude)?;
        }
        non_empty_patterns("worker_hostnames", &self.worker_hostnames)?;
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
            tls.validate(resolved.brokers.iter().any(BrokerAddress::tls))?;
        }
        Ok(())
    }
}

/// A configuration's URL, transport options and management settings, resolved.
pub(crate) struct Resolved {
    /// The brokers, in the order they are tried.
    pub(crate) brokers: Vec<BrokerAddress>,
    /// The transport options accepted and ignored.
    pub(crate) ignored: Vec<(String, &'static str)>,
    /// One management base URL per broker (derived), or the configured one; empty when off.
    pub(crate) management_urls: Vec<SecretUrl>,
    /// Whether the management URLs were derived from the broker URL (not configured).
    pub(crate) management_derived: bool,
}

/// The management API of each broker: its host (or `manager_hostname`), `http` and 15672, or
/// `https` and 15671 with TLS (or `manager_port`), and the broker's credentials (or
/// `manager_userid`, `manager_password`), as kombu's `get_manager` picks them.
fn derived_management_urls(brokers: &[BrokerAddress], manager: &ManagerOptions) -> Vec<SecretUrl> {
    brokers
        .iter()
        .map(|b| {
            let (scheme, port) = if b.tls() {
                ("https", 15671)
            } else {
                ("http", 15672)
            };
            let host = match &manager.hostname {
                Some(h) if h.contains(':') && !h.starts_with('[') => format!("[{h}]"),
                Some(h) => h.clone(),
                None => b.url_host(),
            };
            let user = manager.userid.as_deref().unwrap_or(b.user());
            let password = manager.password.as_deref().unwrap_or(b.password());
            SecretUrl::new(format!(
                "{scheme}://{}:{}@{host}:{}",
                percent_encode(user),
                percent_encode(password),
                manager.port.unwrap_or(port)
            ))
        })
        .collect()
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

    /// Sets how the management API is read (on by default, at the AMQP URL's host).
    pub fn management(mut self, management: ManagementConfig) -> Self {
        self.config.management = management;
        self
    }

    /// Turns the management API off.
    pub fn no_management(mut self) -> Self {
        self.config.management = ManagementConfig::disabled();
        self
    }

    /// Sets one of Celery's `broker_transport_options`.
    pub fn transport_option(mut self, key: impl Into<String>, value: serde_json::Value) -> Self {
        self.config.transport_options.insert(key.into(), value);
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

/// Celery's (and RabbitMQ's) internal queues, which discovery leaves out, and the leader
/// lease's lock queues ([`crate::AmqpLease`]).
pub(crate) fn is_internal_queue(name: &str) -> bool {
    const PATTERNS: [&str; 7] = [
        "*.celery.pidbox",
        "*.reply.celery.pidbox",
        "celeryev.*",
        "*.dq2",
        "celery_delayed_*",
        "amq.gen-*",
        "celery-scale.leader.*",
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
            field(b().no_management().discovery(DiscoveryConfig::default())),
            "discovery"
        );
        assert_eq!(
            field(b().transport_option("confirm_publsh", serde_json::json!(true))),
            "transport_options.confirm_publsh"
        );
        assert_eq!(
            field(AmqpSourceConfig::builder("amqp://h/a;amqp://h2/b").queue("a")),
            "url"
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
    fn celery_settings_pasted_into_toml() {
        let c: AmqpSourceConfig = toml::from_str(
            r#"
            url = "pyamqp://celery:pw@rabbit1//;pyamqp://celery:pw@rabbit2//"
            queues = ["celery"]
            [broker_transport_options]
            confirm_publish = true
            max_retries = 3
            interval_start = 0
            visibility_timeout = 3600
            manager_port = 8080
            manager_password = "hunter2"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.vhost().unwrap(), "/");
        let brokers = c.brokers().unwrap();
        assert_eq!(
            brokers.iter().map(|b| b.host()).collect::<Vec<_>>(),
            ["rabbit1", "rabbit2"]
        );
        let ignored: Vec<String> = c
            .ignored_transport_options()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            ignored,
            [
                "confirm_publish",
                "interval_start",
                "max_retries",
                "visibility_timeout"
            ]
        );
        // The management API: one per broker, at its host, with the manager_* options.
        let urls: Vec<String> = c
            .management_urls()
            .unwrap()
            .iter()
            .map(|u| u.expose().to_string())
            .collect();
        assert_eq!(
            urls,
            [
                "http://celery:hunter2@rabbit1:8080",
                "http://celery:hunter2@rabbit2:8080"
            ]
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains(":pw@"),
            "{shown}"
        );
        // Written back and read again, the same.
        let back: AmqpSourceConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn management_defaults_to_the_broker_and_can_be_turned_off() {
        let urls = |toml_text: &str| -> Vec<String> {
            let c: AmqpSourceConfig = toml::from_str(toml_text).unwrap();
            c.validate().unwrap();
            c.management_urls()
                .unwrap()
                .iter()
                .map(|u| u.expose().to_string())
                .collect()
        };
        assert_eq!(
            urls("url = \"amqp://u:p%40ss@rabbit/prod\"\nqueues = [\"a\"]"),
            ["http://u:p%40ss@rabbit:15672"]
        );
        assert_eq!(
            urls("url = \"amqps://rabbit\"\nqueues = [\"a\"]"),
            ["https://guest:guest@rabbit:15671"]
        );
        assert_eq!(
            urls("url = \"amqp://[::1]\"\nqueues = [\"a\"]"),
            ["http://guest:guest@[::1]:15672"]
        );
        assert!(urls("url = \"amqp://h\"\nqueues = [\"a\"]\nmanagement = false").is_empty());
        assert_eq!(
            urls("url = \"amqp://h\"\nqueues = [\"a\"]\nmanagement = true"),
            ["http://guest:guest@h:15672"]
        );
        assert!(
            urls("url = \"amqp://h\"\nqueues = [\"a\"]\n[management]\nenabled = false").is_empty()
        );
        assert_eq!(
            urls("url = \"amqp://h\"\nqueues = [\"a\"]\n[management]\ntimeout = \"1s\""),
            ["http://guest:guest@h:15672"]
        );
        assert_eq!(
            urls("url = \"amqp://h\"\nqueues = [\"a\"]\n[management]\nurl = \"http://m:15672\""),
            ["http://m:15672"]
        );
        let e = toml::from_str::<AmqpSourceConfig>(
            "url = \"amqp://h\"\nqueues = [\"a\"]\n[management]\nurll = \"x\"",
        )
        .unwrap_err();
        assert!(e.to_string().contains("urll"), "{e}");
        let discovery_without = AmqpSourceConfig::builder("amqp://h")
            .no_management()
            .discovery(DiscoveryConfig::default())
            .build()
            .unwrap_err();
        assert_eq!(discovery_without.field, "discovery");
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
            "celery-scale.leader.emails",
            crate::lease::lock_queue("binding-1").as_str(),
        ] {
            assert!(is_internal_queue(internal), "{internal}");
        }
        for user in [
            "celery",
            "emails",
            "celeryev",
            "pidbox",
            "celery-scale.leader",
        ] {
            assert!(!is_internal_queue(user), "{user}");
        }
    }
}
