//! Configuration of an [`SqsQueueSource`](crate::SqsQueueSource): serde (TOML, JSON) and a
//! builder, validated with errors that name the field.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use celery_scale_core::config::non_empty_patterns;
use celery_scale_core::{ConfigError, SecretUrl};
use serde::{Deserialize, Serialize};

use crate::names::{BrokerUrl, FIFO_SUFFIX, invalid_sqs_name, sqs_queue_name};

/// The most queues one source reads (each costs one `GetQueueAttributes` call per observation).
pub const MAX_QUEUES: usize = 10_000;
/// The most calls one source has under way at once.
pub const MAX_CONCURRENCY: usize = 256;
/// The shortest `url_refresh` and `discovery.refresh`.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// The longest `url_refresh` and `discovery.refresh`.
pub const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// A secret from the configuration (a per-queue secret access key): shown as `***`, read inline
/// or from the environment as `{ env = "VARIABLE" }`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(SecretUrl);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretUrl::new(value.into()))
    }

    /// The value, for the SDK only. Never log it.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.env_var() {
            Some(var) => write!(f, "*** (from {var})"),
            None => f.write_str("***"),
        }
    }
}

/// One entry of kombu's `predefined_queues` transport option: the queue's URL and, optionally,
/// credentials and a region of its own. kombu's `backoff_policy` and `backoff_tasks` are
/// accepted (so the option can be pasted as is) and ignored: they change redelivery, not counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredefinedQueue {
    /// The queue's URL (`https://sqs.us-east-1.amazonaws.com/123456789012/name`).
    pub url: String,
    /// An access key id for this queue (kombu's default: the broker URL's).
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Its secret access key.
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// A session token for temporary credentials.
    #[serde(default)]
    pub session_token: Option<Secret>,
    /// A region for this queue (kombu's default: the transport's).
    #[serde(default)]
    pub region: Option<String>,
    /// kombu's retry back-off; ignored here.
    #[serde(default, skip_serializing)]
    pub backoff_policy: Option<serde::de::IgnoredAny>,
    /// kombu's back-off task list; ignored here.
    #[serde(default, skip_serializing)]
    pub backoff_tasks: Option<serde::de::IgnoredAny>,
}

impl PredefinedQueue {
    /// A predefined queue at `url`, with the transport's credentials and region.
    pub fn new(url: impl Into<String>) -> Self {
        PredefinedQueue {
            url: url.into(),
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            region: None,
            backoff_policy: None,
            backoff_tasks: None,
        }
    }
}

/// Discovery of queues by name prefix (`ListQueues`, paginated), every `refresh`. `exclude`
/// names SQS queue names (the prefix included). Celery's pidbox and reply queues
/// (`*-celery-pidbox`) and event monitors' queues (`celeryev-*`) are always left out.
pub use celery_scale_core::config::DiscoveryConfig;

/// Configuration of an [`SqsQueueSource`](crate::SqsQueueSource): Celery's `broker_url` and the
/// `broker_transport_options` kombu's SQS transport reads, pasted as they are, plus how this
/// source reads them.
///
/// ```
/// use celery_scale_sqs::SqsSourceConfig;
/// let config: SqsSourceConfig = toml::from_str(r#"
///     url = "sqs://AKIDEXAMPLE:s3cr3t@"
///     queues = ["celery", "emails.high"]
///     queue_name_prefix = "prod-"
///     region = "eu-west-1"
/// "#).unwrap();
/// config.validate().unwrap();
/// assert_eq!(config.sqs_names(), ["prod-celery", "prod-emails-high"]);
/// assert!(!format!("{config:?}").contains("s3cr3t"));
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsSourceConfig {
    /// Celery's `broker_url`: `sqs://` (AWS's endpoint and credentials chain),
    /// `sqs://KEY:SECRET@` (URL-encoded static credentials) or `sqs://[KEY:SECRET@]host:port`
    /// (an endpoint of its own).
    #[serde(default = "default_url")]
    pub url: SecretUrl,
    /// The Celery queue names to watch, as Celery names them (kombu applies the prefix and the
    /// character table).
    #[serde(default)]
    pub queues: Vec<String>,
    /// kombu's `queue_name_prefix` transport option.
    #[serde(default)]
    pub queue_name_prefix: String,
    /// kombu's `region` transport option; absent: the AWS settings' region, else the
    /// environment's, else `us-east-1` (kombu's default).
    #[serde(default)]
    pub region: Option<String>,
    /// kombu's `is_secure` transport option: `https://` for an endpoint named in the URL
    /// (kombu's default is `http://`).
    #[serde(default)]
    pub is_secure: Option<bool>,
    /// kombu's `predefined_queues` transport option: SQS queue name (prefix and `.fifo`
    /// included, as kombu keys it) to URL and optional credentials. When set, only these
    /// queues exist for kombu: every watched queue must be one of them, and with no `queues`
    /// every one of them is watched.
    #[serde(default)]
    pub predefined_queues: BTreeMap<String, PredefinedQueue>,
    /// List queues by the prefix, in addition to `queues`.
    #[serde(default)]
    pub discovery: Option<DiscoveryConfig>,
    /// Calls under way at once when reading many queues.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// How long a resolved queue URL is reused before `GetQueueUrl` is asked again (a queue
    /// found missing is asked again on the next observation).
    #[serde(default = "default_url_refresh", with = "humantime_serde")]
    pub url_refresh: Duration,
}

fn default_url() -> SecretUrl {
    SecretUrl::new("sqs://")
}
fn default_concurrency() -> usize {
    16
}
fn default_url_refresh() -> Duration {
    Duration::from_secs(300)
}

impl fmt::Debug for SqsSourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let SqsSourceConfig {
            url,
            queues,
            queue_name_prefix,
            region,
            is_secure,
            predefined_queues,
            discovery,
            concurrency,
            url_refresh,
        } = self;
        f.debug_struct("SqsSourceConfig")
            .field("url", url)
            .field("queues", queues)
            .field("queue_name_prefix", queue_name_prefix)
            .field("region", region)
            .field("is_secure", is_secure)
            .field("predefined_queues", predefined_queues)
            .field("discovery", discovery)
            .field("concurrency", concurrency)
            .field("url_refresh", url_refresh)
            .finish()
    }
}

impl Default for SqsSourceConfig {
    fn default() -> Self {
        SqsSourceConfig {
            url: default_url(),
            queues: Vec::new(),
            queue_name_prefix: String::new(),
            region: None,
            is_secure: None,
            predefined_queues: BTreeMap::new(),
            discovery: None,
            concurrency: default_concurrency(),
            url_refresh: default_url_refresh(),
        }
    }
}

fn region_ok(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 64
        && r.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn within(field: &str, value: Duration, min: Duration, max: Duration) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::new(
            field,
            format!(
                "{} is outside {}..={}",
                humantime::format_duration(value),
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}

impl SqsSourceConfig {
    /// A configuration watching `queues` on AWS's endpoint (`sqs://`), defaults elsewhere.
    pub fn new<I, S>(queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        SqsSourceConfig {
            queues: queues.into_iter().map(Into::into).collect(),
            ..SqsSourceConfig::default()
        }
    }

    /// A builder, starting from the defaults (`sqs://`, no queues).
    pub fn builder() -> SqsSourceConfigBuilder {
        SqsSourceConfigBuilder {
            config: SqsSourceConfig::default(),
        }
    }

    /// The SQS name of each queue in `queues`, as kombu makes it.
    pub fn sqs_names(&self) -> Vec<String> {
        self.queues
            .iter()
            .map(|q| sqs_queue_name(&self.queue_name_prefix, q))
            .collect()
    }

    /// The broker URL, parsed.
    pub fn broker_url(&self) -> Result<BrokerUrl, ConfigError> {
        BrokerUrl::parse(self.url.expose())
            .map_err(|rule| ConfigError::new("url", format!("{}: {rule}", self.url.redacted())))
    }

    /// Checks every field; the error names it (relative to this struct).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.broker_url()?;
        if self.queues.is_empty() && self.discovery.is_none() && self.predefined_queues.is_empty() {
            return Err(ConfigError::new(
                "queues",
                "is empty: name at least one queue, set predefined_queues or enable discovery",
            ));
        }
        if self.queues.len() > MAX_QUEUES {
            return Err(ConfigError::new(
                "queues",
                format!("names {} queues, more than {MAX_QUEUES}", self.queues.len()),
            ));
        }
        if let Some(why) = self
            .queue_name_prefix
            .chars()
            .find(|c| c.is_whitespace() || !c.is_ascii())
        {
            return Err(ConfigError::new(
                "queue_name_prefix",
                format!("holds {why:?}, which no SQS name can hold"),
            ));
        }
        let names = self.sqs_names();
        for (i, (q, name)) in self.queues.iter().zip(&names).enumerate() {
            let field = format!("queues[{i}]");
            if q.is_empty() {
                return Err(ConfigError::new(field, "must not be empty"));
            }
            if let Some(why) = invalid_sqs_name(name) {
                return Err(ConfigError::new(
                    field,
                    format!("{q:?} becomes the SQS name {why}"),
                ));
            }
            if let Some(j) = names[..i].iter().position(|n| n == name) {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{q:?} is the same SQS queue {name:?} as queues[{j}] {:?}",
                        self.queues[j]
                    ),
                ));
            }
            if !self.predefined_queues.is_empty() && !self.predefined_queues.contains_key(name) {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{q:?} (SQS name {name:?}) is not in predefined_queues: kombu uses only \
                         the predefined queues when that option is set"
                    ),
                ));
            }
        }
        if let Some(r) = &self.region
            && !region_ok(r)
        {
            return Err(ConfigError::new(
                "region",
                format!("{r:?} is not a region name such as \"us-east-1\""),
            ));
        }
        for (name, q) in &self.predefined_queues {
            let field = |f: &str| format!("predefined_queues.{name}.{f}");
            if let Some(why) = invalid_sqs_name(name) {
                return Err(ConfigError::new(format!("predefined_queues.{name}"), why));
            }
            match url::Url::parse(&q.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
                _ => {
                    return Err(ConfigError::new(
                        field("url"),
                        format!("{:?} is not an http(s):// queue URL", q.url),
                    ));
                }
            }
            // kombu's own check (`_validate_predifined_queues`).
            let fifo_url = q.url.ends_with(FIFO_SUFFIX);
            if fifo_url != name.ends_with(FIFO_SUFFIX) {
                return Err(ConfigError::new(
                    field("url"),
                    if fifo_url {
                        format!("{:?} is a FIFO queue: its name must end with .fifo", q.url)
                    } else {
                        format!(
                            "{:?} is not a FIFO queue but the name ends with .fifo",
                            q.url
                        )
                    },
                ));
            }
            if q.access_key_id.is_some() != q.secret_access_key.is_some() {
                return Err(ConfigError::new(
                    field("secret_access_key"),
                    "access_key_id and secret_access_key go together",
                ));
            }
            if q.session_token.is_some() && q.access_key_id.is_none() {
                return Err(ConfigError::new(
                    field("session_token"),
                    "needs access_key_id and secret_access_key",
                ));
            }
            if let Some(r) = &q.region
                && !region_ok(r)
            {
                return Err(ConfigError::new(
                    field("region"),
                    format!("{r:?} is not a region name such as \"us-east-1\""),
                ));
            }
        }
        if self.predefined_queues.len() > MAX_QUEUES {
            return Err(ConfigError::new(
                "predefined_queues",
                format!("has more than {MAX_QUEUES} queues"),
            ));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(ConfigError::new(
                "concurrency",
                format!("{} is outside 1..={MAX_CONCURRENCY}", self.concurrency),
            ));
        }
        within("url_refresh", self.url_refresh, MIN_REFRESH, MAX_REFRESH)?;
        if let Some(d) = &self.discovery {
            if !self.predefined_queues.is_empty() {
                return Err(ConfigError::new(
                    "discovery",
                    "is set with predefined_queues: kombu uses only the predefined queues",
                ));
            }
            within("discovery.refresh", d.refresh, MIN_REFRESH, MAX_REFRESH)?;
            non_empty_patterns("discovery.exclude", &d.exclude)?;
        }
        Ok(())
    }
}

/// Builds an [`SqsSourceConfig`]; [`SqsSourceConfigBuilder::build`] validates it.
///
/// ```
/// use celery_scale_sqs::SqsSourceConfig;
/// let config = SqsSourceConfig::builder()
///     .url("sqs://127.0.0.1:5000")
///     .queues(["celery", "orders.fifo"])
///     .queue_name_prefix("dev-")
///     .concurrency(8)
///     .build()
///     .unwrap();
/// assert_eq!(config.sqs_names(), ["dev-celery", "dev-orders.fifo"]);
/// assert_eq!(SqsSourceConfig::builder().build().unwrap_err().field, "queues");
/// ```
#[derive(Debug, Clone)]
pub struct SqsSourceConfigBuilder {
    config: SqsSourceConfig,
}

impl SqsSourceConfigBuilder {
    /// Sets Celery's `broker_url`.
    pub fn url(mut self, url: impl Into<SecretUrl>) -> Self {
        self.config.url = url.into();
        self
    }

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

    /// Sets kombu's `queue_name_prefix`.
    pub fn queue_name_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.queue_name_prefix = prefix.into();
        self
    }

    /// Sets kombu's `region`.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.config.region = Some(region.into());
        self
    }

    /// Sets kombu's `is_secure`.
    pub fn is_secure(mut self, secure: bool) -> Self {
        self.config.is_secure = Some(secure);
        self
    }

    /// Adds one of kombu's `predefined_queues` (keyed by its SQS name).
    pub fn predefined_queue(mut self, name: impl Into<String>, queue: PredefinedQueue) -> Self {
        self.config.predefined_queues.insert(name.into(), queue);
        self
    }

    /// Turns on discovery by prefix.
    pub fn discovery(mut self, discovery: DiscoveryConfig) -> Self {
        self.config.discovery = Some(discovery);
        self
    }

    /// Sets the calls under way at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// Sets how long a resolved queue URL is reused.
    pub fn url_refresh(mut self, refresh: Duration) -> Self {
        self.config.url_refresh = refresh;
        self
    }

    /// The configuration, validated.
    pub fn build(self) -> Result<SqsSourceConfig, ConfigError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(toml_text: &str) -> String {
        let c: SqsSourceConfig = toml::from_str(toml_text).unwrap();
        c.validate().unwrap_err().field
    }

    #[test]
    fn bad_fields_are_named() {
        assert_eq!(field("queues = []"), "queues");
        assert_eq!(field("url = \"redis://h\"\nqueues = [\"a\"]"), "url");
        assert_eq!(field("queues = [\"a\", \"\"]"), "queues[1]");
        assert_eq!(field("queues = [\"a.b\", \"a-b\"]"), "queues[1]");
        assert_eq!(field("queues = [\"caf\u{e9}\"]"), "queues[0]");
        assert_eq!(field("queues = [\"a\"]\nregion = \"EU\""), "region");
        assert_eq!(field("queues = [\"a\"]\nconcurrency = 0"), "concurrency");
        assert_eq!(
            field("queues = [\"a\"]\nurl_refresh = \"0s\""),
            "url_refresh"
        );
        assert_eq!(
            field("queue_name_prefix = \"a b\"\nqueues = [\"a\"]"),
            "queue_name_prefix"
        );
        assert_eq!(
            field("discovery = { exclude = [\"\"] }"),
            "discovery.exclude[0]"
        );
        assert_eq!(
            field("queues = [\"b\"]\n[predefined_queues.a]\nurl = \"http://h/1/a\""),
            "queues[0]"
        );
        assert_eq!(
            field("[predefined_queues.a]\nurl = \"http://h/1/a.fifo\""),
            "predefined_queues.a.url"
        );
        assert_eq!(
            field("[predefined_queues.a]\nurl = \"h/1/a\""),
            "predefined_queues.a.url"
        );
        assert_eq!(
            field("[predefined_queues.a]\nurl = \"http://h/1/a\"\naccess_key_id = \"k\""),
            "predefined_queues.a.secret_access_key"
        );
        let unknown = toml::from_str::<SqsSourceConfig>("queues = [\"a\"]\nsize = 1").unwrap_err();
        assert!(unknown.to_string().contains("size"), "{unknown}");
    }

    #[test]
    fn kombu_options_paste_and_secrets_stay_hidden() {
        let c: SqsSourceConfig = toml::from_str(
            r#"
            url = "sqs://AKID:topsecret@"
            [predefined_queues."prod-celery"]
            url = "https://sqs.us-east-1.amazonaws.com/123456789012/prod-celery"
            access_key_id = "AKQ"
            secret_access_key = "alsosecret"
            backoff_policy = { 1 = 10, 2 = 20 }
            backoff_tasks = ["svc.tasks.t1"]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(!shown.contains("alsosecret"), "{shown}");
        assert!(shown.contains("AKQ"), "{shown}");
        assert_eq!(
            c.predefined_queues["prod-celery"]
                .secret_access_key
                .as_ref()
                .map(Secret::expose),
            Some("alsosecret")
        );
    }
}
