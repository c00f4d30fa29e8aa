//! Configuration of a [`RedisQueueSource`](crate::RedisQueueSource): serde (TOML, JSON) and a
//! builder, validated with errors that name the field.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use celery_scale_core::config::non_empty_patterns;
use celery_scale_core::{ConfigError, SecretUrl};

use crate::broker::{Broker, BrokerUrl};
use crate::options::TransportOptions;
use serde::{Deserialize, Serialize};

/// kombu's default priority steps (`PRIORITY_STEPS`).
pub const DEFAULT_PRIORITY_STEPS: [u32; 4] = [0, 3, 6, 9];

/// kombu's default separator between a queue name and its priority step (`sep`).
pub const DEFAULT_SEP: &str = "\x06\x16";

/// How in-flight messages (taken by a worker, not yet acknowledged) are counted.
///
/// kombu keeps every taken, unacknowledged message in the hash `unacked` (field = delivery tag,
/// value = `[message, exchange, routing_key]`); prefetched tasks, ETA/countdown tasks held by a
/// worker and (with `acks_late`) executing tasks are there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InFlightMode {
    /// Do not read in-flight messages: [`Observation::in_flight`] is `None`.
    ///
    /// [`Observation::in_flight`]: celery_scale_core::Observation::in_flight
    Off,
    /// The default: `global` while kombu's binding tables (`_kombu.binding.*`, listed at most
    /// every 60 s) name no queue but this source's, `per_queue` as soon as they name another
    /// one (or cannot be read), so two bindings on one database never count each other's held
    /// messages.
    #[default]
    Auto,
    /// `HLEN unacked`, one command in the observation's pipeline: O(1) on the server, a few
    /// bytes on the wire. It counts every queue of the Redis database (and key prefix), so the
    /// per-queue breakdown has no in-flight figure and the total is the whole transport's.
    Global,
    /// `HSCAN unacked` and attribute each message to a queue by its routing key (falling back
    /// to the exchange's `_kombu.binding.*` table). Transfers every unacknowledged message (their
    /// full bodies) on every observation, one page of 1,000 per round trip after the first, which
    /// rides in the observation's pipeline; use it when several bindings share one database.
    PerQueue,
}

/// Optional discovery of queues from kombu's binding tables (`_kombu.binding.<exchange>`):
/// `refresh` says how often to list them again (a `SCAN` of the keyspace and one `SMEMBERS` per
/// exchange, outside the observation's pipeline). Celery's pidbox, reply and event queues are
/// always left out.
pub use celery_scale_core::config::DiscoveryConfig;

/// Certificates for `rediss://` (and for the master of a `sentinel://` URL) beyond the built-in
/// web PKI roots. With `sentinel://` this table is Celery's `broker_use_ssl`: set, it turns TLS
/// to the master on, as kombu does; TLS to the Sentinels themselves is kombu's
/// `sentinel_kwargs` transport option (`ssl`, `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// A PEM file with the certificate authority to trust instead of the web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate, for mutual TLS (needs `client_key_file`).
    pub client_cert_file: Option<PathBuf>,
    /// The PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

/// Configuration of a [`RedisQueueSource`](crate::RedisQueueSource).
///
/// ```
/// use celery_scale_redis::{InFlightMode, RedisSourceConfig};
/// let config: RedisSourceConfig = toml::from_str(r#"
///     url = "redis://:secret@cache:6379/2"
///     queues = ["celery", "emails"]
///     in_flight = "per_queue"
///     publish_time_field = "published_at"
///     global_keyprefix = "acme:"
/// "#).unwrap();
/// config.validate().unwrap();
/// assert_eq!(config.priority_steps, [0, 3, 6, 9]);
/// assert_eq!(config.in_flight, InFlightMode::PerQueue);
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSourceConfig {
    /// The broker URL, Celery's `broker_url` verbatim: `redis://[[user]:password@]host[:port][/db]`,
    /// `rediss://...` (or `?ssl_cert_reqs=...`) for TLS, `redis+socket:///path?virtual_host=N`
    /// (or `unix:///path?db=N`) for a socket, `sentinel://host:26379;sentinel://host2:26379` with
    /// `master_name`, and `;`-separated failover lists; see the crate docs.
    pub url: SecretUrl,
    /// Celery's `broker_transport_options` verbatim (alias `transport_options`): every option
    /// that changes keys, channels or counts is honoured, the others are ignored (and logged),
    /// an unknown one is an error. See the crate docs for the table.
    #[serde(
        default,
        alias = "transport_options",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub broker_transport_options: BTreeMap<String, serde_json::Value>,
    /// The Celery queue names to watch (without key prefix or priority suffix).
    #[serde(default)]
    pub queues: Vec<String>,
    /// kombu's `priority_steps` transport option.
    #[serde(default = "default_steps")]
    pub priority_steps: Vec<u32>,
    /// kombu's `sep` transport option.
    #[serde(default = "default_sep")]
    pub sep: String,
    /// kombu's `global_keyprefix` transport option, prepended as is to every key and channel.
    #[serde(default)]
    pub global_keyprefix: String,
    /// How in-flight messages are counted.
    #[serde(default)]
    pub in_flight: InFlightMode,
    /// The message property or header (looked up in that order) that carries the publish time,
    /// as Unix seconds or ISO 8601; see the crate docs for the `before_task_publish` snippet.
    #[serde(default)]
    pub publish_time_field: Option<String>,
    /// Read the oldest message of each non-empty priority key (`LINDEX key -1`, a second
    /// pipeline) for the age of the oldest task. It transfers one message per non-empty key;
    /// turn it off when messages are large and carry no publish time.
    #[serde(default = "yes")]
    pub oldest_age: bool,
    /// List queues from kombu's binding tables, in addition to `queues`.
    #[serde(default)]
    pub discovery: Option<DiscoveryConfig>,
    /// Subscribe to Celery's worker heartbeats for executing tasks, live workers and throughput.
    #[serde(default = "yes")]
    pub heartbeats: bool,
    /// Count only heartbeats of workers whose node name matches one of these (`*` matches any
    /// run of characters, e.g. `"emails@*"`); empty: every worker of this broker.
    #[serde(default)]
    pub worker_hostnames: Vec<String>,
    /// The window over which heartbeats measure throughput.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub heartbeat_window: Duration,
    /// How long the subscription must be up before its worker figures are reported (a worker
    /// beats every 2 s; until one beat of each has arrived the figures would read low).
    #[serde(default = "default_warmup", with = "humantime_serde")]
    pub heartbeat_warmup: Duration,
    /// Deadline of one observation, connecting included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Deadline of one connection attempt.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Certificates for `rediss://` and for a `sentinel://` URL's master (Celery's
    /// `broker_use_ssl`; with `sentinel://` it turns TLS to the master on).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// The URL with every password hidden: core's [`SecretUrl::redacted`] plus the `pass=` query
/// parameter of the redis crate's unix-socket form (`redis+unix:///s.sock?db=1&pass=...`).
pub(crate) fn redact(url: &SecretUrl) -> String {
    let redacted = url.redacted();
    let Some(q) = redacted.find('?') else {
        return redacted;
    };
    let (head, query) = redacted.split_at(q + 1);
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("pass") => format!("{k}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{head}{}", query.join("&"))
}

impl std::fmt::Debug for RedisSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let RedisSourceConfig {
            url,
            broker_transport_options,
            queues,
            priority_steps,
            sep,
            global_keyprefix,
            in_flight,
            publish_time_field,
            oldest_age,
            discovery,
            heartbeats,
            worker_hostnames,
            heartbeat_window,
            heartbeat_warmup,
            timeout,
            connect_timeout,
            tls,
        } = self;
        f.debug_struct("RedisSourceConfig")
            .field("url", &redact(url))
            .field(
                "broker_transport_options",
                &redact_options(broker_transport_options),
            )
            .field("queues", queues)
            .field("priority_steps", priority_steps)
            .field("sep", sep)
            .field("global_keyprefix", global_keyprefix)
            .field("in_flight", in_flight)
            .field("publish_time_field", publish_time_field)
            .field("oldest_age", oldest_age)
            .field("discovery", discovery)
            .field("heartbeats", heartbeats)
            .field("worker_hostnames", worker_hostnames)
            .field("heartbeat_window", heartbeat_window)
            .field("heartbeat_warmup", heartbeat_warmup)
            .field("timeout", timeout)
            .field("connect_timeout", connect_timeout)
            .field("tls", tls)
            .finish()
    }
}

/// The transport options with every `sentinel_kwargs` value hidden (it holds a password).
fn redact_options(options: &BTreeMap<String, serde_json::Value>) -> BTreeMap<&str, String> {
    options
        .iter()
        .map(|(k, v)| {
            let shown = match (k.as_str(), v) {
                ("sentinel_kwargs", serde_json::Value::Object(m)) => {
                    let keys: Vec<String> = m.keys().map(|k| format!("{k}: ***")).collect();
                    format!("{{{}}}", keys.join(", "))
                }
                ("sentinel_kwargs", _) => "***".into(),
                _ => v.to_string(),
            };
            (k.as_str(), shown)
        })
        .collect()
}

/// What a configuration resolves to: the parsed URL, the transport options (typed fields
/// merged in) and the TLS files (the URL's `ssl_*` merged in).
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub url: BrokerUrl,
    pub transport: TransportOptions,
    pub tls: Option<TlsConfig>,
}

fn default_steps() -> Vec<u32> {
    DEFAULT_PRIORITY_STEPS.to_vec()
}
fn default_sep() -> String {
    DEFAULT_SEP.to_string()
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
    Duration::from_secs(2)
}

impl RedisSourceConfig {
    /// A configuration for `url` with every other field at its default (no queues yet).
    pub fn new(url: impl Into<SecretUrl>) -> Self {
        RedisSourceConfig {
            url: url.into(),
            broker_transport_options: BTreeMap::new(),
            queues: Vec::new(),
            priority_steps: default_steps(),
            sep: default_sep(),
            global_keyprefix: String::new(),
            in_flight: InFlightMode::default(),
            publish_time_field: None,
            oldest_age: true,
            discovery: None,
            heartbeats: true,
            worker_hostnames: Vec::new(),
            heartbeat_window: default_window(),
            heartbeat_warmup: default_warmup(),
            timeout: default_timeout(),
            connect_timeout: default_connect_timeout(),
            tls: None,
        }
    }

    /// A builder for `url`.
    pub fn builder(url: impl Into<SecretUrl>) -> RedisSourceConfigBuilder {
        RedisSourceConfigBuilder {
            config: RedisSourceConfig::new(url),
        }
    }

    /// Checks every field against the bounds in the crate docs, and reads and parses the TLS
    /// files (each must hold PEM certificates, or a PEM key that is the client certificate's);
    /// the error names the field. The URL itself is parsed by
    /// [`RedisQueueSource::new`](crate::RedisQueueSource::new).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let resolved = self.check_fields()?;
        if let Some(tls) = &resolved.tls {
            crate::tls::load(tls).map_err(|e| tls_config_error(&e))?;
        }
        if let Some(tls) = &resolved.url.sentinel_tls {
            crate::tls::load_named(tls, crate::tls::SENTINEL_FIELDS)
                .map_err(|e| tls_config_error(&e))?;
        }
        Ok(())
    }

    /// The transport options given that celery-scale accepts and ignores (they do not change
    /// what is counted), and the URL's query parameters of that kind; empty when the
    /// configuration is invalid.
    pub fn ignored_options(&self) -> Vec<String> {
        match self.check_fields() {
            Ok(r) => {
                let mut all = r.transport.ignored;
                all.extend(r.url.ignored.iter().map(|q| format!("url ?{q}")));
                all
            }
            Err(_) => Vec::new(),
        }
    }

    /// Every check of [`validate`](Self::validate) but the TLS files' contents; the resolved
    /// URL, transport options and TLS files.
    pub(crate) fn check_fields(&self) -> Result<Resolved, ConfigError> {
        if self.url.expose().trim().is_empty() {
            return Err(ConfigError::new("url", "must not be empty"));
        }
        let mut url = crate::broker::parse(self.url.expose())
            .map_err(|rule| ConfigError::new("url", rule))?;
        let mut transport = crate::options::resolve(&self.broker_transport_options)?;
        self.merge_typed(&mut transport)?;
        if self.queues.is_empty() && self.discovery.is_none() {
            return Err(ConfigError::new(
                "queues",
                "is empty: name at least one queue or enable discovery",
            ));
        }
        if self.queues.len() > MAX_QUEUES {
            return Err(ConfigError::new(
                "queues",
                format!(
                    "names {} queues, more than {MAX_QUEUES} (one observation reads every priority key of each)",
                    self.queues.len()
                ),
            ));
        }
        let mut seen: HashSet<&str> = HashSet::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if q.is_empty() {
                return Err(ConfigError::new(
                    format!("queues[{i}]"),
                    "must not be empty",
                ));
            }
            if !seen.insert(q.as_str()) {
                return Err(ConfigError::new(
                    format!("queues[{i}]"),
                    format!("{q:?} is listed twice"),
                ));
            }
        }
        let steps_field = if self.broker_transport_options.contains_key("priority_steps") {
            "broker_transport_options.priority_steps"
        } else {
            "priority_steps"
        };
        if transport.priority_steps.is_empty() {
            return Err(ConfigError::new(steps_field, "must not be empty"));
        }
        if !transport.priority_steps.windows(2).all(|w| w[0] < w[1]) {
            return Err(ConfigError::new(
                steps_field,
                format!(
                    "{:?} must be strictly increasing, as kombu bisects them",
                    transport.priority_steps
                ),
            ));
        }
        if let Some(&top) = transport.priority_steps.last()
            && top > MAX_PRIORITY_STEP
        {
            return Err(ConfigError::new(
                steps_field,
                format!("{top} is above {MAX_PRIORITY_STEP}, the highest message priority"),
            ));
        }
        if transport.sep.is_empty() {
            return Err(ConfigError::new(
                "sep",
                "must not be empty (priority keys would collide with queue names)",
            ));
        }
        if let Some(field) = &self.publish_time_field
            && field.is_empty()
        {
            return Err(ConfigError::new("publish_time_field", "must not be empty"));
        }
        if let Some(d) = &self.discovery {
            within(
                "discovery.refresh",
                d.refresh,
                Duration::from_millis(100),
                Duration::from_secs(24 * 3600),
                "discovery scans the keyspace",
            )?;
            non_empty_patterns("discovery.exclude", &d.exclude)?;
        }
        non_empty_patterns("worker_hostnames", &self.worker_hostnames)?;
        within(
            "heartbeat_window",
            self.heartbeat_window,
            Duration::from_secs(1),
            Duration::from_secs(3600),
            "the registry keeps every beat of the window",
        )?;
        within(
            "heartbeat_warmup",
            self.heartbeat_warmup,
            Duration::ZERO,
            Duration::from_secs(600),
            "worker figures are unknown for that long after every reconnect",
        )?;
        within(
            "timeout",
            self.timeout,
            MIN_TIMEOUT,
            MAX_TIMEOUT,
            "the deadline of one observation",
        )?;
        within(
            "connect_timeout",
            self.connect_timeout,
            MIN_TIMEOUT,
            MAX_TIMEOUT,
            "the deadline of one connection attempt",
        )?;
        let tls = self.check_tls(&url)?;
        if tls.is_some() && matches!(url.broker, Broker::Sentinel { .. }) {
            // kombu's SentinelChannel reaches the master over TLS whenever the connection has
            // `ssl` options: `broker_use_ssl` (our `tls`) as well as the URL's `ssl_*`.
            url.tls_on = true;
        }
        if matches!(url.broker, Broker::Sentinel { .. }) {
            url.sentinel_tls = transport.sentinel_tls.clone();
        }
        self.check_broker(&url, &transport)?;
        Ok(Resolved {
            url,
            transport,
            tls,
        })
    }

    /// The typed `priority_steps`, `sep` and `global_keyprefix` fields and their transport
    /// options are one setting: a typed field left at its default takes the option; both set
    /// and different is an error.
    fn merge_typed(&self, t: &mut TransportOptions) -> Result<(), ConfigError> {
        let opts = &self.broker_transport_options;
        let conflict = |name: &str| {
            ConfigError::new(
                name.to_string(),
                format!(
                    "is set both here and in broker_transport_options.{name}, differently: \
                     keep one"
                ),
            )
        };
        if self.priority_steps != DEFAULT_PRIORITY_STEPS {
            if opts.contains_key("priority_steps") && t.priority_steps != self.priority_steps {
                return Err(conflict("priority_steps"));
            }
            t.priority_steps = self.priority_steps.clone();
        }
        if self.sep != DEFAULT_SEP {
            if opts.contains_key("sep") && t.sep != self.sep {
                return Err(conflict("sep"));
            }
            t.sep = self.sep.clone();
        }
        if !self.global_keyprefix.is_empty() {
            if opts.contains_key("global_keyprefix") && t.global_keyprefix != self.global_keyprefix
            {
                return Err(conflict("global_keyprefix"));
            }
            t.global_keyprefix = self.global_keyprefix.clone();
        }
        Ok(())
    }

    /// Sentinel, failover and in-flight rules that involve the URL and the options together.
    fn check_broker(&self, url: &BrokerUrl, t: &TransportOptions) -> Result<(), ConfigError> {
        match &url.broker {
            Broker::Sentinel { .. } => {
                if t.master_name.is_none() {
                    return Err(ConfigError::new(
                        "broker_transport_options.master_name",
                        "is required with a sentinel:// URL (kombu: \"'master_name' transport \
                         option must be specified\")",
                    ));
                }
            }
            Broker::Direct(nodes) => {
                if let Some(n) = nodes.iter().position(|n| n.db != url.db()) {
                    return Err(ConfigError::new(
                        "url",
                        format!(
                            "entry {} of the failover list names database {}, the first {}: \
                             every entry must name the same database",
                            n + 1,
                            nodes[n].db,
                            url.db()
                        ),
                    ));
                }
            }
        }
        if !t.ack_emulation
            && matches!(
                self.in_flight,
                InFlightMode::Global | InFlightMode::PerQueue
            )
        {
            return Err(ConfigError::new(
                "in_flight",
                "reads kombu's unacked hash, which kombu does not keep with \
                 broker_transport_options.ack_emulation = False: in-flight messages are \
                 unknown; remove in_flight (or set it to \"off\")",
            ));
        }
        Ok(())
    }

    /// The TLS files: `tls` merged with the URL's `ssl_ca_certs`, `ssl_certfile` and
    /// `ssl_keyfile` (the same file in both is fine, different files an error).
    fn check_tls(&self, url: &BrokerUrl) -> Result<Option<TlsConfig>, ConfigError> {
        let mut merged = self.tls.clone();
        if url.tls_on {
            let from_url = [
                ("tls.ca_file", "ssl_ca_certs", &url.tls.ca_certs),
                ("tls.client_cert_file", "ssl_certfile", &url.tls.certfile),
                ("tls.client_key_file", "ssl_keyfile", &url.tls.keyfile),
            ];
            if from_url.iter().any(|(_, _, p)| p.is_some()) {
                let m = merged.get_or_insert_with(TlsConfig::default);
                for (field, query, path) in from_url {
                    let Some(path) = path else { continue };
                    let slot = match field {
                        "tls.ca_file" => &mut m.ca_file,
                        "tls.client_cert_file" => &mut m.client_cert_file,
                        _ => &mut m.client_key_file,
                    };
                    match slot {
                        Some(existing) if existing != path => {
                            return Err(ConfigError::new(
                                field,
                                format!("names another file than the URL's {query}: keep one"),
                            ));
                        }
                        _ => *slot = Some(path.clone()),
                    }
                }
            }
        }
        if let Some(tls) = &merged {
            for (field, path) in [
                ("tls.ca_file", &tls.ca_file),
                ("tls.client_cert_file", &tls.client_cert_file),
                ("tls.client_key_file", &tls.client_key_file),
            ] {
                if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                    return Err(ConfigError::new(field, "must not be empty"));
                }
            }
            if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
                return Err(ConfigError::new(
                    "tls.client_key_file",
                    "client_cert_file and client_key_file go together",
                ));
            }
            if !url.tls_on && !matches!(url.broker, Broker::Sentinel { .. }) {
                return Err(ConfigError::new(
                    "tls",
                    "is set but the URL does not use TLS (rediss://, or an ssl_* query parameter; \
                     with sentinel:// it turns TLS to the master on)",
                ));
            }
        }
        Ok(merged)
    }
}

/// The most queues one source reads (each costs one `LLEN` per priority step per observation).
pub const MAX_QUEUES: usize = 100_000;
/// The highest priority step: AMQP's and kombu's priorities go up to 255.
pub const MAX_PRIORITY_STEP: u32 = 255;
/// The shortest `timeout` and `connect_timeout`.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(10);
/// The longest `timeout`: an observation slower than this is of no use to a control loop.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// `value` of `field` within `min..=max`, or an error naming the field, the value and the bound.
fn within(
    field: &str,
    value: Duration,
    min: Duration,
    max: Duration,
    why: &str,
) -> Result<(), ConfigError> {
    let show = |d: Duration| humantime_serde::re::humantime::format_duration(d).to_string();
    if value < min || (value.is_zero() && !min.is_zero()) {
        return Err(ConfigError::new(
            field,
            format!("{} is below {} ({why})", show(value), show(min)),
        ));
    }
    if value > max {
        return Err(ConfigError::new(
            field,
            format!("{} is above {} ({why})", show(value), show(max)),
        ));
    }
    Ok(())
}

/// A TLS file error as a configuration error naming its field, with every reason in the chain.
fn tls_config_error(e: &celery_scale_tls::TlsFileError) -> ConfigError {
    ConfigError::new(e.field(), e.problem())
}

/// Builds a [`RedisSourceConfig`]; [`RedisSourceConfigBuilder::build`] validates it.
///
/// ```
/// use celery_scale_redis::{InFlightMode, RedisSourceConfig};
/// let config = RedisSourceConfig::builder("redis://127.0.0.1:6379/0")
///     .queues(["celery", "emails"])
///     .priority_steps([0, 5])
///     .in_flight(InFlightMode::Global)
///     .publish_time_field("published_at")
///     .build()
///     .unwrap();
/// assert_eq!(config.queues, ["celery", "emails"]);
/// let err = RedisSourceConfig::builder("redis://h").build().unwrap_err();
/// assert_eq!(err.field, "queues");
/// ```
#[derive(Debug, Clone)]
pub struct RedisSourceConfigBuilder {
    config: RedisSourceConfig,
}

impl RedisSourceConfigBuilder {
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

    /// Sets one of Celery's `broker_transport_options` (as in the Celery app, e.g.
    /// `("fanout_prefix", json!(false))`).
    pub fn transport_option(mut self, name: impl Into<String>, value: serde_json::Value) -> Self {
        self.config
            .broker_transport_options
            .insert(name.into(), value);
        self
    }

    /// Sets kombu's `priority_steps`.
    pub fn priority_steps(mut self, steps: impl IntoIterator<Item = u32>) -> Self {
        self.config.priority_steps = steps.into_iter().collect();
        self
    }

    /// Sets kombu's `sep`.
    pub fn sep(mut self, sep: impl Into<String>) -> Self {
        self.config.sep = sep.into();
        self
    }

    /// Sets kombu's `global_keyprefix`.
    pub fn global_keyprefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.global_keyprefix = prefix.into();
        self
    }

    /// Sets how in-flight messages are counted.
    pub fn in_flight(mut self, mode: InFlightMode) -> Self {
        self.config.in_flight = mode;
        self
    }

    /// Sets the property or header that carries the publish time.
    pub fn publish_time_field(mut self, field: impl Into<String>) -> Self {
        self.config.publish_time_field = Some(field.into());
        self
    }

    /// Turns reading the oldest message of each key on or off.
    pub fn oldest_age(mut self, on: bool) -> Self {
        self.config.oldest_age = on;
        self
    }

    /// Turns on queue discovery.
    pub fn discovery(mut self, discovery: DiscoveryConfig) -> Self {
        self.config.discovery = Some(discovery);
        self
    }

    /// Turns the heartbeat subscriber on or off.
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

    /// Sets how long the subscription must be up before worker figures are reported.
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

    /// Sets the certificates for `rediss://` (or for a `sentinel://` URL's master).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.config.tls = Some(tls);
        self
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<RedisSourceConfig, ConfigError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_kombus() {
        let c: RedisSourceConfig =
            serde_json::from_str(r#"{"url": "redis://h", "queues": ["celery"]}"#).unwrap();
        assert_eq!(c.priority_steps, vec![0, 3, 6, 9]);
        assert_eq!(c.sep, "\u{6}\u{16}");
        assert_eq!(c.in_flight, InFlightMode::Auto);
        assert!(c.heartbeats && c.oldest_age);
        assert_eq!(
            c,
            RedisSourceConfig::builder("redis://h")
                .queue("celery")
                .build()
                .unwrap()
        );
        c.validate().unwrap();
    }

    #[test]
    fn rejects_unknown_fields_and_names_bad_ones() {
        let e = serde_json::from_str::<RedisSourceConfig>(
            r#"{"url": "redis://h", "queues": ["a"], "prefix": "x"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("prefix"), "{e}");
        let field = |c: RedisSourceConfigBuilder| c.build().unwrap_err().field;
        let b = || RedisSourceConfig::builder("redis://h").queue("a");
        assert_eq!(field(b().priority_steps([0, 6, 3])), "priority_steps");
        assert_eq!(field(b().priority_steps([])), "priority_steps");
        assert_eq!(field(b().sep("")), "sep");
        assert_eq!(field(b().queue("a")), "queues[1]");
        assert_eq!(field(b().queue("")), "queues[1]");
        assert_eq!(field(b().timeout(Duration::ZERO)), "timeout");
        assert_eq!(field(b().tls(TlsConfig::default())), "tls");
        assert_eq!(
            field(
                RedisSourceConfig::builder("rediss://h")
                    .queue("a")
                    .tls(TlsConfig {
                        client_cert_file: Some("c.pem".into()),
                        ..TlsConfig::default()
                    })
            ),
            "tls.client_key_file"
        );
        assert_eq!(field(RedisSourceConfig::builder(" ").queue("a")), "url");
        let discovered = RedisSourceConfig::builder("redis://h")
            .discovery(DiscoveryConfig::default())
            .build();
        assert!(discovered.is_ok(), "discovery alone needs no queue names");
    }

    #[test]
    fn serializes_round_trip_with_humantime() {
        let c = RedisSourceConfig::builder("redis://:pw@h/3")
            .queue("celery")
            .in_flight(InFlightMode::PerQueue)
            .discovery(DiscoveryConfig::default())
            .timeout(Duration::from_millis(1500))
            .build()
            .unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""timeout":"1s 500ms""#), "{json}");
        assert!(json.contains(r#""in_flight":"per_queue""#), "{json}");
        let back: RedisSourceConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        assert!(!format!("{c:?}").contains("pw"));
    }

    #[test]
    fn absurd_values_are_rejected_naming_the_field() {
        let field = |c: RedisSourceConfigBuilder| c.build().unwrap_err().field;
        let b = || RedisSourceConfig::builder("redis://h").queue("a");
        let year = Duration::from_secs(365 * 86_400);
        assert_eq!(field(b().timeout(year)), "timeout");
        assert_eq!(field(b().timeout(Duration::from_millis(1))), "timeout");
        assert_eq!(field(b().connect_timeout(year)), "connect_timeout");
        assert_eq!(
            field(b().connect_timeout(Duration::ZERO)),
            "connect_timeout"
        );
        assert_eq!(
            field(b().heartbeat_window(Duration::ZERO)),
            "heartbeat_window"
        );
        assert_eq!(field(b().heartbeat_window(year)), "heartbeat_window");
        assert_eq!(field(b().heartbeat_warmup(year)), "heartbeat_warmup");
        let discovery = |refresh| DiscoveryConfig {
            refresh,
            exclude: Vec::new(),
        };
        assert_eq!(
            field(b().discovery(discovery(Duration::ZERO))),
            "discovery.refresh"
        );
        assert_eq!(field(b().discovery(discovery(year))), "discovery.refresh");
        assert_eq!(
            field(b().discovery(DiscoveryConfig {
                exclude: vec!["tmp-*".into(), String::new()],
                ..DiscoveryConfig::default()
            })),
            "discovery.exclude[1]"
        );
        assert_eq!(field(b().worker_hostname("")), "worker_hostnames[0]");
        assert_eq!(field(b().priority_steps([0, 3, 256])), "priority_steps");
        assert_eq!(field(b().priority_steps([0, u32::MAX])), "priority_steps");
        let many = RedisSourceConfig::builder("redis://h")
            .queues((0..=MAX_QUEUES).map(|i| format!("q{i}")));
        assert_eq!(field(many), "queues");
        let e = b().timeout(year).build().unwrap_err();
        assert!(e.rule.contains("is above 5m"), "{e}");
        // From TOML too, with the bound in the message.
        let c: RedisSourceConfig =
            toml::from_str("url = \"redis://h\"\nqueues = [\"a\"]\ntimeout = \"30years\"").unwrap();
        assert_eq!(c.validate().unwrap_err().field, "timeout");
        // The bounds themselves are accepted.
        let ok = b()
            .timeout(MAX_TIMEOUT)
            .connect_timeout(MIN_TIMEOUT)
            .heartbeat_window(Duration::from_secs(3600))
            .heartbeat_warmup(Duration::ZERO)
            .priority_steps([0, MAX_PRIORITY_STEP])
            .discovery(discovery(Duration::from_secs(1)))
            .build();
        assert!(ok.is_ok(), "{ok:?}");
        let e = RedisSourceConfig::builder("rediss://h")
            .queue("a")
            .tls(TlsConfig {
                ca_file: Some("".into()),
                ..TlsConfig::default()
            })
            .build()
            .unwrap_err();
        assert_eq!(e.field, "tls.ca_file");
    }

    #[test]
    fn passwords_with_url_metacharacters_never_show() {
        // Percent-encoded, as a URL should carry them, and raw, as users paste them.
        let mut passwords: Vec<String> = ["#", "/", "?", "@", ";", "%23", "%2F", "%3F", "%40"]
            .iter()
            .map(|c| format!("zqk{c}xwv"))
            .collect();
        passwords.push("zqk@xwv#jjy/uuo?ppl".into());
        passwords.push("zqk;redis://xwv".into());
        for password in &passwords {
            for url in [
                format!("redis://:{password}@cache:6379/1"),
                format!("rediss://user:{password}@cache:6380/0"),
                format!("redis://user:{password}@cache"),
                format!("redis+unix:///run/redis.sock?db=2&pass={password}"),
            ] {
                let c = RedisSourceConfig::builder(url.as_str()).queue("q");
                let shown = match c.build() {
                    Ok(c) => format!("{c:?} {}", redact(&c.url)),
                    Err(e) => format!("{e} {e:?}"),
                };
                // No piece of the password either side of a metacharacter.
                for piece in ["zqk", "xwv", "jjy", "uuo", "ppl"] {
                    assert!(!shown.contains(piece), "{url}: {shown}");
                }
            }
        }
    }

    #[test]
    fn debug_hides_every_password_form() {
        for url in [
            "redis://:hunter2@h:6379/1",
            "rediss://user:hunter2@h",
            "redis+unix:///run/redis.sock?db=2&pass=hunter2",
            "unix:///run/redis.sock?pass=hunter2&user=u",
        ] {
            let c = RedisSourceConfig::builder(url).queue("q").build().unwrap();
            let shown = format!("{c:?}");
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(!redact(&c.url).contains("hunter2"));
        }
    }
}
