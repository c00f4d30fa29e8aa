//! A reader of RabbitMQ's management HTTP API (`rabbitmq_management`): queue statistics and
//! the list of a vhost's queues.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celery_scale_core::SecretUrl;
use serde::Deserialize;

use crate::config::{ManagementConfig, parse_management_url};
use crate::error::AmqpSourceError;

/// The figures the management API gives for one queue.
///
/// They are statistics that RabbitMQ refreshes every `collect_statistics_interval` (5 s by
/// default), so they lag the queue by up to that long. A queue created a moment ago may have no
/// statistics yet: its counts are `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueStats {
    /// The queue name.
    pub name: String,
    /// `classic`, `quorum` or `stream`, when the API says.
    pub queue_type: Option<String>,
    /// Whether the queue is exclusive to one connection (Celery's work queues are not).
    pub exclusive: Option<bool>,
    /// `messages_ready`: waiting, not delivered to any consumer.
    pub ready: Option<u64>,
    /// `messages_unacknowledged`: delivered to consumers (Celery workers' prefetched,
    /// ETA/countdown and, with `acks_late`, executing tasks) and not acknowledged.
    pub unacknowledged: Option<u64>,
    /// `consumers`: consumers attached to the queue.
    pub consumers: Option<u32>,
    /// `message_stats.publish_details.rate`: messages published per second.
    pub publish_rate: Option<f64>,
    /// `message_stats.deliver_get_details.rate`: messages delivered (or fetched) per second.
    pub deliver_get_rate: Option<f64>,
    /// `message_stats.ack_details.rate`: messages acknowledged per second.
    pub ack_rate: Option<f64>,
    /// `head_message_timestamp`: the AMQP `timestamp` property of the oldest ready message, when
    /// its publisher set one (Celery does not by default).
    pub head_message_timestamp: Option<SystemTime>,
}

impl QueueStats {
    /// The age of the oldest ready message at `now`, from its AMQP timestamp.
    pub fn head_message_age(&self, now: SystemTime) -> Option<Duration> {
        self.head_message_timestamp
            .map(|t| now.duration_since(t).unwrap_or(Duration::ZERO))
    }
}

#[derive(Deserialize)]
struct RawQueue {
    name: String,
    #[serde(default, rename = "type")]
    queue_type: Option<String>,
    #[serde(default)]
    exclusive: Option<bool>,
    #[serde(default)]
    messages_ready: Option<u64>,
    #[serde(default)]
    messages_unacknowledged: Option<u64>,
    #[serde(default)]
    consumers: Option<u32>,
    #[serde(default)]
    message_stats: Option<RawMessageStats>,
    #[serde(default)]
    head_message_timestamp: Option<f64>,
}

#[derive(Deserialize, Default)]
struct RawMessageStats {
    #[serde(default)]
    publish_details: Option<RawRate>,
    #[serde(default)]
    deliver_get_details: Option<RawRate>,
    #[serde(default)]
    ack_details: Option<RawRate>,
}

#[derive(Deserialize)]
struct RawRate {
    #[serde(default)]
    rate: Option<f64>,
}

impl From<RawQueue> for QueueStats {
    fn from(raw: RawQueue) -> Self {
        let stats = raw.message_stats.unwrap_or_default();
        let rate = |d: Option<RawRate>| d.and_then(|d| d.rate);
        QueueStats {
            name: raw.name,
            queue_type: raw.queue_type,
            exclusive: raw.exclusive,
            ready: raw.messages_ready,
            unacknowledged: raw.messages_unacknowledged,
            consumers: raw.consumers,
            publish_rate: rate(stats.publish_details),
            deliver_get_rate: rate(stats.deliver_get_details),
            ack_rate: rate(stats.ack_details),
            head_message_timestamp: raw
                .head_message_timestamp
                .filter(|t| t.is_finite() && *t > 0.0)
                .map(|t| UNIX_EPOCH + Duration::from_secs_f64(t)),
        }
    }
}

/// The columns the list call asks for (the rest of each queue's object is left out).
const COLUMNS: &str = "name,type,exclusive,messages_ready,messages_unacknowledged,consumers,message_stats,head_message_timestamp";

/// A client of the management API. Credentials are sent as HTTP basic auth and never shown.
#[derive(Clone)]
pub struct ManagementClient {
    http: reqwest::Client,
    /// The base URL without credentials.
    base: url::Url,
    user: String,
    password: Option<String>,
    /// The configured URL, redacted, for errors and logs.
    shown: String,
    timeout: Duration,
}

impl fmt::Debug for ManagementClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagementClient")
            .field("url", &self.shown)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ManagementClient {
    /// A client for the API that `config` names (validated here too).
    pub fn new(config: &ManagementConfig) -> Result<Self, AmqpSourceError> {
        let mut base = parse_management_url(&config.url)?;
        let decode = |s: &str| {
            percent_decode(s).ok_or_else(|| {
                AmqpSourceError::Config(celery_scale_core::ConfigError::new(
                    "management.url",
                    format!(
                        "{}: the user or password is not valid percent-encoded UTF-8",
                        config.url.redacted()
                    ),
                ))
            })
        };
        let user = decode(base.username())?;
        let password = base.password().map(decode).transpose()?;
        // The credentials travel as a header; the URL that errors may show has none.
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let mut http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent(concat!("celery-scale-amqp/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &config.ca_file {
            const FIELD: &str = "management.ca_file";
            let pem = crate::tls::read_ca_file(FIELD, path)?;
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
                AmqpSourceError::TlsFile {
                    field: FIELD,
                    path: path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                }
            })?;
            http = http.tls_certs_merge(certs);
        }
        let http = http.build().map_err(AmqpSourceError::HttpClient)?;
        Ok(ManagementClient {
            http,
            base,
            user,
            password,
            shown: SecretUrl::redacted(&config.url),
            timeout: config.timeout,
        })
    }

    /// The API's base URL, redacted.
    pub fn url(&self) -> &str {
        &self.shown
    }

    fn endpoint(&self, segments: &[&str]) -> url::Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            // Each segment is percent-encoded, `/` included: vhost `/` is `%2F`.
            path.extend(segments);
        }
        url
    }

    async fn get(&self, url: url::Url) -> Result<Option<Body>, AmqpSourceError> {
        let path = url.path().to_string();
        let mut req = self.http.get(url);
        if !self.user.is_empty() || self.password.is_some() {
            req = req.basic_auth(&self.user, self.password.as_deref());
        }
        let resp = req
            .send()
            .await
            .map_err(|source| self.transport_error(source))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(AmqpSourceError::ManagementStatus {
                url: self.shown.clone(),
                path,
                status: status.as_u16(),
            });
        }
        let body = resp
            .bytes()
            .await
            .map_err(|source| self.transport_error(source))?;
        Ok(Some(Body {
            path,
            body: body.to_vec(),
        }))
    }

    fn transport_error(&self, source: reqwest::Error) -> AmqpSourceError {
        if source.is_timeout() {
            AmqpSourceError::Timeout {
                url: self.shown.clone(),
                operation: "a management API request",
                after: self.timeout,
            }
        } else {
            AmqpSourceError::ManagementUnavailable {
                url: self.shown.clone(),
                source,
            }
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, body: Body) -> Result<T, AmqpSourceError> {
        serde_json::from_slice(&body.body).map_err(|source| AmqpSourceError::ManagementData {
            url: self.shown.clone(),
            path: body.path,
            source,
        })
    }

    /// `GET /api/queues/{vhost}/{name}`: one queue's statistics, `None` when it does not exist.
    pub async fn queue(
        &self,
        vhost: &str,
        name: &str,
    ) -> Result<Option<QueueStats>, AmqpSourceError> {
        let url = self.endpoint(&["api", "queues", vhost, name]);
        match self.get(url).await? {
            Some(body) => Ok(Some(self.parse::<RawQueue>(body)?.into())),
            None => Ok(None),
        }
    }

    /// `GET /api/queues/{vhost}`: every queue of the vhost with its statistics.
    pub async fn queues(&self, vhost: &str) -> Result<Vec<QueueStats>, AmqpSourceError> {
        let mut url = self.endpoint(&["api", "queues", vhost]);
        url.query_pairs_mut().append_pair("columns", COLUMNS);
        match self.get(url).await? {
            Some(body) => Ok(self
                .parse::<Vec<RawQueue>>(body)?
                .into_iter()
                .map(QueueStats::from)
                .collect()),
            // The vhost does not exist.
            None => Err(AmqpSourceError::ManagementStatus {
                url: self.shown.clone(),
                path: self.endpoint(&["api", "queues", vhost]).path().to_string(),
                status: 404,
            }),
        }
    }
}

/// A response body and the path it answered.
struct Body {
    path: String,
    body: Vec<u8>,
}

/// Decodes `%XX` escapes (the URL crate leaves userinfo encoded).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_shape() {
        let body = br#"{"name": "celery", "type": "quorum", "messages_ready": 3,
            "messages_unacknowledged": 8, "consumers": 1, "head_message_timestamp": 1700000000,
            "message_stats": {"publish_details": {"rate": 1.5}, "deliver_get_details": {"rate": 0.5},
            "ack_details": {"rate": 0.25}, "publish": 10}}"#;
        let q: QueueStats = serde_json::from_slice::<RawQueue>(body).unwrap().into();
        assert_eq!(q.queue_type.as_deref(), Some("quorum"));
        assert_eq!(
            (q.ready, q.unacknowledged, q.consumers),
            (Some(3), Some(8), Some(1))
        );
        assert_eq!(
            (q.publish_rate, q.deliver_get_rate, q.ack_rate),
            (Some(1.5), Some(0.5), Some(0.25))
        );
        let age = q
            .head_message_age(UNIX_EPOCH + Duration::from_secs(1_700_000_010))
            .unwrap();
        assert_eq!(age, Duration::from_secs(10));

        // A fresh queue without statistics yet, and a null head timestamp.
        let q: QueueStats = serde_json::from_slice::<RawQueue>(
            br#"{"name": "new", "head_message_timestamp": null}"#,
        )
        .unwrap()
        .into();
        assert_eq!(
            (q.ready, q.unacknowledged, q.head_message_timestamp),
            (None, None, None)
        );
    }

    #[test]
    fn endpoints_encode_vhost_and_names_and_hide_credentials() {
        let c = ManagementClient::new(&ManagementConfig::new(
            "http://mon:p%40ss@rabbit:15672/prefix/",
        ))
        .unwrap();
        assert_eq!(c.user, "mon");
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        let url = c.endpoint(&["api", "queues", "/", "a/b c"]);
        assert_eq!(
            url.as_str(),
            "http://rabbit:15672/prefix/api/queues/%2F/a%2Fb%20c"
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("p%40ss") && !shown.contains("p@ss"),
            "{shown}"
        );
    }
}
