//! [`SqsQueueSource`]: reads Celery's SQS queues with `GetQueueAttributes`, many at once.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::QueueAttributeName;
use celery_scale_aws::{AwsError, AwsSettings, SetupError};
use celery_scale_core::{Observation, QueueDepth, QueueSource, WorkersUnknown};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::{DiscoveryConfig, MAX_QUEUES, SqsSourceConfig};
use crate::error::{
    GET_QUEUE_ATTRIBUTES, GET_QUEUE_URL, LIST_QUEUES, SqsError, classify, is_queue_missing,
};
use crate::names::{list_prefix, name_of_url};

/// kombu's region when none is set anywhere (`Channel.default_region`).
pub const KOMBU_DEFAULT_REGION: &str = "us-east-1";

/// Queues `ListQueues` answers per page (the API's most).
const LIST_PAGE: i32 = 1000;

/// The attributes read per queue.
const ATTRIBUTES: [QueueAttributeName; 3] = [
    QueueAttributeName::ApproximateNumberOfMessages,
    QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
    QueueAttributeName::ApproximateNumberOfMessagesDelayed,
];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What SQS says of one queue, as `GetQueueAttributes` answers (approximate counts that lag).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqsQueueCounts {
    /// The Celery queue name (for a discovered or predefined queue: its SQS name without the
    /// prefix).
    pub queue: String,
    /// The SQS queue name.
    pub sqs_name: String,
    /// The queue's URL.
    pub url: String,
    /// `ApproximateNumberOfMessages`: visible messages, ready for a worker.
    pub visible: u64,
    /// `ApproximateNumberOfMessagesNotVisible`: received by a worker and not yet deleted
    /// (prefetched, ETA/countdown tasks held, executing under `acks_late`), until deleted or
    /// their visibility timeout ends.
    pub not_visible: u64,
    /// `ApproximateNumberOfMessagesDelayed`: sent with a delay (`DelaySeconds`) not yet over;
    /// not ready yet, and not in the observation's counts.
    pub delayed: u64,
}

/// One read of every watched queue.
#[derive(Debug, Clone, PartialEq)]
pub struct SqsReading {
    /// Per queue, in the order configured, then discovered.
    pub queues: Vec<SqsQueueCounts>,
    /// When the read began.
    pub at: Instant,
}

impl SqsReading {
    /// Delayed messages over every queue.
    pub fn delayed(&self) -> u64 {
        self.queues
            .iter()
            .fold(0u64, |a, q| a.saturating_add(q.delayed))
    }

    /// The observation this reading means: visible messages are ready, not-visible ones in
    /// flight. SQS carries no worker events, so executing tasks and live workers are unknown
    /// (`None`); while messages are held by workers, the worker figures are marked unknown
    /// ([`WorkersUnknown`]) so that no scale-in stops a worker that may be busy.
    pub fn observation(&self) -> Observation {
        let depths = self
            .queues
            .iter()
            .map(|q| QueueDepth {
                queue: q.queue.clone(),
                ready: q.visible,
                in_flight: Some(q.not_visible),
                oldest_age: None,
                consumers: None,
            })
            .collect();
        let mut obs = Observation::from_queues(depths, self.at);
        let held = obs.in_flight.unwrap_or(0);
        if held > 0 {
            obs.set_workers_unknown(WorkersUnknown::new(format!(
                "{held} message(s) held by workers, and SQS carries no Celery worker events: \
                 any worker may be executing"
            )));
        }
        obs
    }
}

/// How many SQS calls a source has made since it was built (each attempt of ours counts once;
/// the SDK's own retries are not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqsCalls {
    /// `GetQueueAttributes` calls.
    pub get_queue_attributes: u64,
    /// `GetQueueUrl` calls.
    pub get_queue_url: u64,
    /// `ListQueues` calls (pages).
    pub list_queues: u64,
}

/// A queue to read.
#[derive(Debug, Clone)]
struct Target {
    queue: String,
    sqs_name: String,
    url: String,
    /// Discovered rather than configured.
    discovered: bool,
}

#[derive(Default)]
struct State {
    /// Resolved URLs of configured queues, by SQS name.
    urls: HashMap<String, String>,
    urls_at: Option<Instant>,
    /// Discovered queues, and when they were listed.
    discovered: Option<(Instant, Vec<Target>)>,
}

struct Inner {
    config: SqsSourceConfig,
    settings: AwsSettings,
    client: Client,
    /// Clients of predefined queues with credentials or a region of their own, by SQS name.
    queue_clients: HashMap<String, Client>,
    /// The configured queues: (Celery name, SQS name).
    configured: Vec<(String, String)>,
    state: Mutex<State>,
    /// One resolution (GetQueueUrl, ListQueues) at a time.
    resolving: tokio::sync::Mutex<()>,
    get_attributes: AtomicU64,
    get_url: AtomicU64,
    list: AtomicU64,
}

/// The [`QueueSource`] for Celery on Amazon SQS.
///
/// Reads `ApproximateNumberOfMessages` (ready), `ApproximateNumberOfMessagesNotVisible` (in
/// flight) and `ApproximateNumberOfMessagesDelayed` (reported in [`SqsReading`] only) of each
/// queue with one `GetQueueAttributes` call, at most `concurrency` calls at once. Queue URLs are
/// resolved with `GetQueueUrl` once and again every `url_refresh` (or taken from
/// `predefined_queues`); discovery lists queues by prefix with `ListQueues`.
#[derive(Clone)]
pub struct SqsQueueSource {
    inner: Arc<Inner>,
}

impl fmt::Debug for SqsQueueSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsQueueSource")
            .field("config", &self.inner.config)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

/// The broker URL's (or a predefined queue's) static credentials.
fn static_credentials(id: &str, secret: &str, token: Option<&str>) -> Credentials {
    Credentials::new(
        id,
        secret,
        token.map(str::to_owned),
        None,
        "celery-broker-url",
    )
}

impl SqsQueueSource {
    /// A source reading through `client` (a test's mock client, or one you configured
    /// yourself) for every queue; only the settings' `call_timeout` applies, and the
    /// credentials and regions of `predefined_queues` are not used. Makes no call.
    pub fn new(
        client: Client,
        settings: AwsSettings,
        config: SqsSourceConfig,
    ) -> Result<Self, SqsError> {
        Self::with_clients(client, HashMap::new(), settings, config)
    }

    fn with_clients(
        client: Client,
        queue_clients: HashMap<String, Client>,
        settings: AwsSettings,
        config: SqsSourceConfig,
    ) -> Result<Self, SqsError> {
        config.validate()?;
        settings.validate()?;
        let configured = if config.queues.is_empty() {
            // Every predefined queue, named without the prefix.
            let prefix = list_prefix(&config.queue_name_prefix);
            config
                .predefined_queues
                .keys()
                .map(|name| (strip_prefix(name, &prefix), name.clone()))
                .collect()
        } else {
            config
                .queues
                .iter()
                .cloned()
                .zip(config.sqs_names())
                .collect()
        };
        let mut state = State::default();
        for (name, q) in &config.predefined_queues {
            state.urls.insert(name.clone(), q.url.clone());
        }
        Ok(SqsQueueSource {
            inner: Arc::new(Inner {
                config,
                settings,
                client,
                queue_clients,
                configured,
                state: Mutex::new(state),
                resolving: tokio::sync::Mutex::new(()),
                get_attributes: AtomicU64::new(0),
                get_url: AtomicU64::new(0),
                list: AtomicU64::new(0),
            }),
        })
    }

    /// A source whose clients are configured from `sdk` with, on top, as kombu reads them: the
    /// config's `region` (else the settings', else `sdk`'s, else kombu's `us-east-1`), the
    /// broker URL's endpoint (else the settings' `endpoint_url`, which also wins over
    /// `AWS_ENDPOINT_URL_SQS`) and static credentials (else `sdk`'s chain); each predefined
    /// queue with credentials or a region of its own gets its own client. Makes no call.
    pub fn from_sdk_config(
        sdk: &SdkConfig,
        settings: AwsSettings,
        config: SqsSourceConfig,
    ) -> Result<Self, SetupError> {
        config.validate()?;
        let broker = config.broker_url()?;
        let mut settings = settings;
        if let Some(r) = &config.region {
            settings.region = Some(r.clone());
        }
        if settings.region.is_none() && sdk.region().is_none() {
            settings.region = Some(KOMBU_DEFAULT_REGION.to_owned());
        }
        if let Some(endpoint) = broker.endpoint(config.is_secure) {
            settings.endpoint_url = Some(endpoint);
        }
        let sdk = settings.apply_to(sdk)?;
        let url_credentials = broker
            .credentials
            .as_ref()
            .map(|(id, secret)| static_credentials(id, secret, None));
        let build = |credentials: Option<Credentials>, region: Option<&str>| {
            let mut b = aws_sdk_sqs::config::Builder::from(&sdk);
            if let Some(url) = &settings.endpoint_url {
                b = b.endpoint_url(url.clone());
            }
            if let Some(c) = credentials {
                b = b.credentials_provider(c);
            }
            if let Some(r) = region {
                b = b.region(Region::new(r.to_owned()));
            }
            Client::from_conf(b.build())
        };
        let client = build(url_credentials.clone(), None);
        let mut queue_clients = HashMap::new();
        for (name, q) in &config.predefined_queues {
            if q.access_key_id.is_none() && q.region.is_none() {
                continue;
            }
            let credentials = match (&q.access_key_id, &q.secret_access_key) {
                (Some(id), Some(secret)) => Some(static_credentials(
                    id,
                    secret.expose(),
                    q.session_token.as_ref().map(|t| t.expose()),
                )),
                _ => url_credentials.clone(),
            };
            queue_clients.insert(name.clone(), build(credentials, q.region.as_deref()));
        }
        Self::with_clients(client, queue_clients, settings, config).map_err(|e| match e {
            SqsError::Config(c) => SetupError::Invalid(c),
            other => SetupError::Invalid(celery_scale_core::ConfigError::new(
                "sqs",
                other.to_string(),
            )),
        })
    }

    /// A source configured from aws-config's default chain with the settings and the config
    /// on top (see [`SqsSourceConfig`] and [`SqsQueueSource::from_sdk_config`]), checked at
    /// start by [`AwsSettings::sdk_config_from`]: fails, saying what to set, when no
    /// credentials are found (the broker URL's, if it has some, count).
    pub async fn from_settings(
        settings: &AwsSettings,
        config: SqsSourceConfig,
    ) -> Result<Self, SetupError> {
        let broker = config.broker_url()?;
        let mut settings = settings.clone();
        if let Some(r) = &config.region {
            settings.region = Some(r.clone());
        }
        let loader = || {
            let loader = aws_config::defaults(BehaviorVersion::latest());
            match &broker.credentials {
                Some((id, secret)) => {
                    loader.credentials_provider(static_credentials(id, secret, None))
                }
                None => loader,
            }
        };
        let sdk = match settings.sdk_config_from(loader()).await {
            Err(SetupError::NoRegion) => {
                settings.region = Some(KOMBU_DEFAULT_REGION.to_owned());
                settings.sdk_config_from(loader()).await?
            }
            other => other?,
        };
        Self::from_sdk_config(&sdk, settings, config)
    }

    /// The calls made so far.
    pub fn calls(&self) -> SqsCalls {
        SqsCalls {
            get_queue_attributes: self.inner.get_attributes.load(Ordering::Relaxed),
            get_queue_url: self.inner.get_url.load(Ordering::Relaxed),
            list_queues: self.inner.list.load(Ordering::Relaxed),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SqsSourceConfig {
        &self.inner.config
    }

    /// Forgets every resolved URL and discovered queue: the next read resolves and lists
    /// again.
    pub fn refresh(&self) {
        let mut state = lock(&self.inner.state);
        state.urls_at = None;
        state.discovered = None;
    }

    fn client_for(&self, sqs_name: &str) -> &Client {
        self.inner
            .queue_clients
            .get(sqs_name)
            .unwrap_or(&self.inner.client)
    }

    /// Reads every watched queue now, with the typed error. A failure of any queue fails the
    /// read: a partial sum would read low.
    pub async fn read(&self) -> Result<SqsReading, SqsError> {
        let at = Instant::now();
        let targets = self.targets().await?;
        let mut results: Vec<(usize, Result<SqsQueueCounts, SqsError>)> =
            futures::stream::iter(targets.into_iter().enumerate())
                .map(|(i, t)| async move { (i, self.counts(t).await) })
                .buffer_unordered(self.inner.config.concurrency)
                .collect()
                .await;
        results.sort_by_key(|(i, _)| *i);
        let queues = results
            .into_iter()
            .map(|(_, r)| r)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SqsReading { queues, at })
    }

    /// The queues to read: configured ones with their URLs (resolved when unknown or older
    /// than `url_refresh`), then discovered ones (listed again every `discovery.refresh`).
    async fn targets(&self) -> Result<Vec<Target>, SqsError> {
        let _one = self.inner.resolving.lock().await;
        let now = Instant::now();
        let refresh = self.inner.config.url_refresh;
        let predefined = &self.inner.config.predefined_queues;
        let missing: Vec<(String, String)> = {
            let mut state = lock(&self.inner.state);
            if state
                .urls_at
                .is_none_or(|t| now.duration_since(t) >= refresh)
            {
                state.urls.retain(|name, _| predefined.contains_key(name));
                state.urls_at = Some(now);
            }
            self.inner
                .configured
                .iter()
                .filter(|(_, sqs)| !state.urls.contains_key(sqs))
                .cloned()
                .collect()
        };
        let resolved: Vec<Result<(String, String), SqsError>> = futures::stream::iter(missing)
            .map(|(queue, sqs_name)| async move {
                let url = self.resolve(&queue, &sqs_name).await?;
                Ok((sqs_name, url))
            })
            .buffer_unordered(self.inner.config.concurrency)
            .collect()
            .await;
        let mut first_error = None;
        {
            let mut state = lock(&self.inner.state);
            for r in resolved {
                match r {
                    Ok((name, url)) => {
                        state.urls.insert(name, url);
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let discovered = self.discovered(now).await?;
        let state = lock(&self.inner.state);
        let mut targets: Vec<Target> = self
            .inner
            .configured
            .iter()
            .filter_map(|(queue, sqs_name)| {
                state.urls.get(sqs_name).map(|url| Target {
                    queue: queue.clone(),
                    sqs_name: sqs_name.clone(),
                    url: url.clone(),
                    discovered: false,
                })
            })
            .collect();
        let known: HashSet<&str> = self
            .inner
            .configured
            .iter()
            .map(|(_, s)| s.as_str())
            .collect();
        targets.extend(
            discovered
                .into_iter()
                .filter(|t| !known.contains(t.sqs_name.as_str())),
        );
        Ok(targets)
    }

    /// `GetQueueUrl` of one configured queue.
    async fn resolve(&self, queue: &str, sqs_name: &str) -> Result<String, SqsError> {
        let timeout = self.inner.settings.call_timeout;
        self.inner.get_url.fetch_add(1, Ordering::Relaxed);
        let call = self
            .client_for(sqs_name)
            .get_queue_url()
            .queue_name(sqs_name)
            .send();
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(SqsError::Queue {
                queue: queue.to_owned(),
                source: Box::new(AwsError::timed_out(GET_QUEUE_URL, timeout)),
            }),
            Ok(Ok(out)) => match out.queue_url() {
                Some(url) if !url.is_empty() => Ok(url.to_owned()),
                _ => Err(SqsError::Queue {
                    queue: queue.to_owned(),
                    source: Box::new(AwsError::InvalidResponse {
                        operation: GET_QUEUE_URL,
                        message: format!("no QueueUrl for '{sqs_name}'"),
                        source: None,
                    }),
                }),
            },
            Ok(Err(e)) if is_queue_missing(&e) => Err(SqsError::QueueNotFound {
                queue: queue.to_owned(),
                sqs_name: sqs_name.to_owned(),
                source: Some(classify(GET_QUEUE_URL, e)),
            }),
            Ok(Err(e)) => Err(SqsError::Queue {
                queue: queue.to_owned(),
                source: classify(GET_QUEUE_URL, e),
            }),
        }
    }

    /// The discovered queues, listed again when older than `discovery.refresh`.
    async fn discovered(&self, now: Instant) -> Result<Vec<Target>, SqsError> {
        let Some(discovery) = &self.inner.config.discovery else {
            return Ok(Vec::new());
        };
        if let Some((at, list)) = &lock(&self.inner.state).discovered
            && now.duration_since(*at) < discovery.refresh
        {
            return Ok(list.clone());
        }
        let prefix = list_prefix(&self.inner.config.queue_name_prefix);
        let urls = self.list_queues(&prefix).await?;
        let list: Vec<Target> = urls
            .into_iter()
            .filter_map(|url| {
                let sqs_name = name_of_url(&url).to_owned();
                if !sqs_name.starts_with(&prefix) || excluded(&sqs_name, &prefix, discovery) {
                    return None;
                }
                Some(Target {
                    queue: strip_prefix(&sqs_name, &prefix),
                    sqs_name,
                    url,
                    discovered: true,
                })
            })
            .collect();
        lock(&self.inner.state).discovered = Some((now, list.clone()));
        Ok(list)
    }

    /// Every queue URL `ListQueues` answers for `prefix`, page by page.
    async fn list_queues(&self, prefix: &str) -> Result<Vec<String>, SqsError> {
        let timeout = self.inner.settings.call_timeout;
        let mut urls = Vec::new();
        let mut token: Option<String> = None;
        loop {
            self.inner.list.fetch_add(1, Ordering::Relaxed);
            let mut call = self.inner.client.list_queues().max_results(LIST_PAGE);
            if !prefix.is_empty() {
                call = call.queue_name_prefix(prefix);
            }
            if let Some(t) = token.take() {
                call = call.next_token(t);
            }
            let out = match tokio::time::timeout(timeout, call.send()).await {
                Err(_) => {
                    return Err(SqsError::Discovery {
                        prefix: prefix.to_owned(),
                        source: Box::new(AwsError::timed_out(LIST_QUEUES, timeout)),
                    });
                }
                Ok(Err(e)) => {
                    return Err(SqsError::Discovery {
                        prefix: prefix.to_owned(),
                        source: classify(LIST_QUEUES, e),
                    });
                }
                Ok(Ok(out)) => out,
            };
            urls.extend(out.queue_urls().iter().cloned());
            if urls.len() > MAX_QUEUES {
                return Err(SqsError::TooManyQueues {
                    prefix: prefix.to_owned(),
                    max: MAX_QUEUES,
                });
            }
            match out.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => return Ok(urls),
            }
        }
    }

    /// `GetQueueAttributes` of one queue. A missing queue forgets its URL (or the discovered
    /// list) so that the next read resolves it again.
    async fn counts(&self, t: Target) -> Result<SqsQueueCounts, SqsError> {
        let timeout = self.inner.settings.call_timeout;
        self.inner.get_attributes.fetch_add(1, Ordering::Relaxed);
        let call = self
            .client_for(&t.sqs_name)
            .get_queue_attributes()
            .queue_url(&t.url)
            .set_attribute_names(Some(ATTRIBUTES.to_vec()))
            .send();
        let out = match tokio::time::timeout(timeout, call).await {
            Err(_) => {
                return Err(SqsError::Queue {
                    queue: t.queue,
                    source: Box::new(AwsError::timed_out(GET_QUEUE_ATTRIBUTES, timeout)),
                });
            }
            Ok(Err(e)) if is_queue_missing(&e) => {
                let mut state = lock(&self.inner.state);
                if t.discovered {
                    state.discovered = None;
                } else if !self
                    .inner
                    .config
                    .predefined_queues
                    .contains_key(&t.sqs_name)
                {
                    state.urls.remove(&t.sqs_name);
                }
                return Err(SqsError::QueueNotFound {
                    queue: t.queue,
                    sqs_name: t.sqs_name,
                    source: Some(classify(GET_QUEUE_ATTRIBUTES, e)),
                });
            }
            Ok(Err(e)) => {
                return Err(SqsError::Queue {
                    queue: t.queue,
                    source: classify(GET_QUEUE_ATTRIBUTES, e),
                });
            }
            Ok(Ok(out)) => out,
        };
        let attributes = out.attributes();
        let count = |name: QueueAttributeName| -> Result<u64, SqsError> {
            let attribute = attribute_name(&name);
            let value = attributes.and_then(|a| a.get(&name));
            match value.map(|v| v.trim().parse::<u64>()) {
                Some(Ok(n)) => Ok(n),
                Some(Err(_)) => {
                    let shown: String = value.map_or("", String::as_str).chars().take(64).collect();
                    tracing::warn!(queue = %t.queue, attribute, value = %shown, "SQS answered a count that is not one");
                    Err(SqsError::InvalidAttribute {
                        queue: t.queue.clone(),
                        attribute,
                        value: Some(shown),
                    })
                }
                None => Err(SqsError::InvalidAttribute {
                    queue: t.queue.clone(),
                    attribute,
                    value: None,
                }),
            }
        };
        let visible = count(QueueAttributeName::ApproximateNumberOfMessages)?;
        let not_visible = count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)?;
        let delayed = count(QueueAttributeName::ApproximateNumberOfMessagesDelayed)?;
        Ok(SqsQueueCounts {
            queue: t.queue,
            sqs_name: t.sqs_name,
            url: t.url,
            visible,
            not_visible,
            delayed,
        })
    }
}

fn attribute_name(name: &QueueAttributeName) -> &'static str {
    match name {
        QueueAttributeName::ApproximateNumberOfMessages => "ApproximateNumberOfMessages",
        QueueAttributeName::ApproximateNumberOfMessagesNotVisible => {
            "ApproximateNumberOfMessagesNotVisible"
        }
        QueueAttributeName::ApproximateNumberOfMessagesDelayed => {
            "ApproximateNumberOfMessagesDelayed"
        }
        _ => "attribute",
    }
}

/// `name` without `prefix` (the whole name when that would leave nothing).
fn strip_prefix(name: &str, prefix: &str) -> String {
    match name.strip_prefix(prefix) {
        Some(rest) if !rest.is_empty() => rest.to_owned(),
        _ => name.to_owned(),
    }
}

/// Celery's own queues that discovery leaves out: pidbox and reply queues of remote control
/// (`*.celery.pidbox`, `*.reply.celery.pidbox`, which kombu's table turns into
/// `*-celery-pidbox`) and event monitors' queues (`celeryev.*`, `celeryev-*` in SQS), plus the
/// configured patterns (matched against the SQS name).
fn excluded(sqs_name: &str, prefix: &str, discovery: &DiscoveryConfig) -> bool {
    let bare = sqs_name.strip_prefix(prefix).unwrap_or(sqs_name);
    bare.ends_with("-celery-pidbox")
        || bare.starts_with("celeryev-")
        || discovery.excludes(sqs_name)
}

#[async_trait]
impl QueueSource for SqsQueueSource {
    async fn observe(&self) -> celery_scale_core::Result<Observation> {
        let reading = self.read().await?;
        let obs = reading.observation();
        tracing::debug!(
            queues = reading.queues.len(),
            ready = obs.ready,
            in_flight = ?obs.in_flight,
            delayed = reading.delayed(),
            "sqs observation"
        );
        Ok(obs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celery_queues_are_left_out_of_discovery() {
        let none = DiscoveryConfig::default();
        assert!(excluded("p-w1-celery-pidbox", "p-", &none));
        assert!(excluded("p-abc-reply-celery-pidbox", "p-", &none));
        assert!(excluded("p-celeryev-123", "p-", &none));
        assert!(!excluded("p-celery", "p-", &none));
        let tmp = DiscoveryConfig {
            exclude: vec!["p-tmp-*".to_owned()],
            ..DiscoveryConfig::default()
        };
        assert!(excluded("p-tmp-1", "p-", &tmp));
        assert_eq!(strip_prefix("p-celery", "p-"), "celery");
        assert_eq!(strip_prefix("p-", "p-"), "p-");
    }

    #[test]
    fn held_messages_make_the_worker_figures_unknown() {
        let at = Instant::now();
        let q = |visible, not_visible| SqsQueueCounts {
            queue: "celery".into(),
            sqs_name: "celery".into(),
            url: "http://h/1/celery".into(),
            visible,
            not_visible,
            delayed: 3,
        };
        let obs = SqsReading {
            queues: vec![q(5, 2)],
            at,
        }
        .observation();
        assert_eq!(obs.ready, 5);
        assert_eq!(obs.in_flight, Some(2));
        assert_eq!(obs.executing, None);
        assert_eq!(obs.live_workers, None);
        assert!(obs.workers_are_unknown(), "{obs:?}");
        let idle = SqsReading {
            queues: vec![q(0, 0)],
            at,
        };
        assert_eq!(idle.delayed(), 3);
        let obs = idle.observation();
        assert_eq!((obs.ready, obs.in_flight), (0, Some(0)));
        assert!(!obs.workers_are_unknown());
        assert_eq!(
            obs.executing, None,
            "never 0: SQS cannot see executing tasks"
        );
    }
}
