//! A reader of RabbitMQ's management HTTP API (`rabbitmq_management`): queue statistics and
//! the list of a vhost's queues.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celery_scale_core::SecretUrl;
use serde::Deserialize;

use crate::broker_url::percent_encode;
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
    ///
    /// `None` when there is no timestamp, or when it is more than [`MAX_CLOCK_SKEW`] ahead of
    /// `now` (a publisher clock far ahead, or a timestamp in milliseconds where AMQP says
    /// seconds): an age that cannot be right is unknown, never zero. A timestamp up to
    /// `MAX_CLOCK_SKEW` ahead reads as age zero.
    pub fn head_message_age(&self, now: SystemTime) -> Option<Duration> {
        let t = self.head_message_timestamp?;
        match now.duration_since(t) {
            Ok(age) => Some(age),
            Err(ahead) if ahead.duration() <= MAX_CLOCK_SKEW => Some(Duration::ZERO),
            Err(_) => None,
        }
    }
}

/// How far ahead of our clock a head message timestamp may be and still read as age zero.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// The earliest head message timestamp taken as real (2000-01-01T00:00:00Z, in seconds since
/// the Unix epoch): anything before is a publisher bug (an uninitialised or relative time),
/// not a message waiting for 26+ years.
pub const MIN_HEAD_TIMESTAMP_SECS: u64 = 946_684_800;

/// The largest message count taken as real (2^48): far above what a RabbitMQ queue holds, and
/// low enough that the counts of 65,536 queues add up without overflow.
pub const MAX_COUNT: u64 = 1 << 48;

/// A figure of the management API's answer that was present but unusable, and became `None`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Rejected {
    /// The JSON field, e.g. `head_message_timestamp`.
    pub(crate) field: &'static str,
    /// Why, with the value (a broker's number, never a secret).
    pub(crate) reason: String,
}

/// One queue's object of the management API, every figure kept as raw JSON so that a value of
/// the wrong type or out of range costs that figure only, never the whole answer.
#[derive(Deserialize)]
struct RawQueue {
    name: String,
    #[serde(default, rename = "type")]
    queue_type: Option<serde_json::Value>,
    #[serde(default)]
    exclusive: Option<serde_json::Value>,
    #[serde(default)]
    messages_ready: Option<serde_json::Value>,
    #[serde(default)]
    messages_unacknowledged: Option<serde_json::Value>,
    #[serde(default)]
    consumers: Option<serde_json::Value>,
    #[serde(default)]
    message_stats: Option<serde_json::Value>,
    #[serde(default)]
    head_message_timestamp: Option<serde_json::Value>,
}

/// Collects the figures that could not be used while one queue's object is converted.
struct Checker {
    rejected: Vec<Rejected>,
}

impl Checker {
    fn reject(&mut self, field: &'static str, reason: String) {
        self.rejected.push(Rejected { field, reason });
    }

    /// A count: a JSON integer in `0..=MAX_COUNT`. `null` or absent is `None` silently.
    fn count(&mut self, field: &'static str, v: Option<&serde_json::Value>) -> Option<u64> {
        let v = v.filter(|v| !v.is_null())?;
        match v.as_u64() {
            Some(n) if n <= MAX_COUNT => Some(n),
            Some(n) => {
                self.reject(
                    field,
                    format!("{n} is above {MAX_COUNT}, more than a queue holds"),
                );
                None
            }
            None => {
                self.reject(
                    field,
                    format!("{v} is not a count (a non-negative integer)"),
                );
                None
            }
        }
    }

    /// A count that must fit in a `u32` (consumers).
    fn count_u32(&mut self, field: &'static str, v: Option<&serde_json::Value>) -> Option<u32> {
        let n = self.count(field, v)?;
        match u32::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                self.reject(field, format!("{n} is above {}", u32::MAX));
                None
            }
        }
    }

    /// A rate in messages per second: finite and non-negative.
    fn rate(&mut self, field: &'static str, v: Option<&serde_json::Value>) -> Option<f64> {
        let v = v.filter(|v| !v.is_null())?;
        match v.as_f64() {
            Some(r) if r.is_finite() && r >= 0.0 => Some(r),
            _ => {
                self.reject(field, format!("{v} is not a rate (a non-negative number)"));
                None
            }
        }
    }

    /// The AMQP `timestamp` of the head message, in seconds since the Unix epoch (RabbitMQ
    /// gives the property's integer; a fraction is accepted). Anything before
    /// [`MIN_HEAD_TIMESTAMP_SECS`], beyond what `SystemTime` holds, negative or not a number is
    /// rejected. `0`, like `null` or `""` (RabbitMQ's "no timestamp"), is `None` silently.
    fn timestamp(
        &mut self,
        field: &'static str,
        v: Option<&serde_json::Value>,
    ) -> Option<SystemTime> {
        let v = v.filter(|v| !v.is_null() && v.as_str() != Some(""))?;
        if v.as_u64() == Some(0) {
            return None;
        }
        let since_epoch = match (v.as_u64(), v.as_f64()) {
            (Some(secs), _) => Some(Duration::from_secs(secs)),
            // `try_from_secs_f64` refuses negative, NaN, infinite and too large values.
            (None, Some(secs)) => Duration::try_from_secs_f64(secs).ok(),
            (None, None) => None,
        };
        let t = since_epoch
            .filter(|d| d.as_secs() >= MIN_HEAD_TIMESTAMP_SECS)
            .and_then(|d| UNIX_EPOCH.checked_add(d));
        if t.is_none() {
            self.reject(
                field,
                format!(
                    "{v} is not a timestamp in seconds since the Unix epoch from \
                     {MIN_HEAD_TIMESTAMP_SECS} on"
                ),
            );
        }
        t
    }

    fn string(&mut self, field: &'static str, v: Option<serde_json::Value>) -> Option<String> {
        match v? {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Null => None,
            other => {
                self.reject(field, format!("{other} is not a string"));
                None
            }
        }
    }

    fn boolean(&mut self, field: &'static str, v: Option<serde_json::Value>) -> Option<bool> {
        match v? {
            serde_json::Value::Bool(b) => Some(b),
            serde_json::Value::Null => None,
            other => {
                self.reject(field, format!("{other} is not a boolean"));
                None
            }
        }
    }
}

impl RawQueue {
    /// The queue's figures, and those that were present but unusable (now `None`).
    fn into_stats(self) -> (QueueStats, Vec<Rejected>) {
        let mut c = Checker {
            rejected: Vec::new(),
        };
        let stats = self
            .message_stats
            .filter(|v| !v.is_null() && !matches!(v, serde_json::Value::Array(a) if a.is_empty()));
        if let Some(s) = stats.as_ref().filter(|s| !s.is_object()) {
            c.reject("message_stats", format!("{s} is not an object"));
        }
        let rate = |c: &mut Checker, field: &'static str, details: &str| {
            let v = stats
                .as_ref()
                .and_then(|s| s.get(details))
                .and_then(|d| d.get("rate"));
            c.rate(field, v)
        };
        let q = QueueStats {
            queue_type: c.string("type", self.queue_type),
            exclusive: c.boolean("exclusive", self.exclusive),
            ready: c.count("messages_ready", self.messages_ready.as_ref()),
            unacknowledged: c.count(
                "messages_unacknowledged",
                self.messages_unacknowledged.as_ref(),
            ),
            consumers: c.count_u32("consumers", self.consumers.as_ref()),
            publish_rate: rate(
                &mut c,
                "message_stats.publish_details.rate",
                "publish_details",
            ),
            deliver_get_rate: rate(
                &mut c,
                "message_stats.deliver_get_details.rate",
                "deliver_get_details",
            ),
            ack_rate: rate(&mut c, "message_stats.ack_details.rate", "ack_details"),
            head_message_timestamp: c.timestamp(
                "head_message_timestamp",
                self.head_message_timestamp.as_ref(),
            ),
            name: self.name,
        };
        (q, c.rejected)
    }
}

/// Parses one queue's object (`GET /api/queues/{vhost}/{name}`).
fn parse_queue(body: &[u8]) -> Result<(QueueStats, Vec<Rejected>), serde_json::Error> {
    Ok(serde_json::from_slice::<RawQueue>(body)?.into_stats())
}

/// Parses a list of queue objects (`GET /api/queues/{vhost}`).
fn parse_queues(body: &[u8]) -> Result<Vec<(QueueStats, Vec<Rejected>)>, serde_json::Error> {
    Ok(serde_json::from_slice::<Vec<RawQueue>>(body)?
        .into_iter()
        .map(RawQueue::into_stats)
        .collect())
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
    /// (queue, field) pairs whose unusable value was logged and has not been usable since.
    reported: Arc<Mutex<HashSet<(String, &'static str)>>>,
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
    ///
    /// `config.url` must be set (the source derives it from the AMQP URL when it is not).
    pub fn new(config: &ManagementConfig) -> Result<Self, AmqpSourceError> {
        let url = config.url.as_ref().ok_or_else(|| {
            AmqpSourceError::Config(celery_scale_core::ConfigError::new(
                "management.url",
                "is not set (the source derives it from the AMQP URL; a client needs it)",
            ))
        })?;
        let mut base = parse_management_url(url)?;
        let decode = |s: &str| {
            crate::broker_url::unquote(s).ok_or_else(|| {
                AmqpSourceError::Config(celery_scale_core::ConfigError::new(
                    "management.url",
                    format!(
                        "{}: the user or password is not valid percent-encoded UTF-8",
                        url.redacted()
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
                celery_scale_tls::TlsFileError::new(
                    FIELD,
                    path,
                    "is not a PEM bundle the HTTP client takes",
                    Some(Box::new(e)),
                )
            })?;
            http = http.tls_certs_merge(certs);
        }
        let http = http.build().map_err(AmqpSourceError::HttpClient)?;
        Ok(ManagementClient {
            http,
            base,
            user,
            password,
            shown: SecretUrl::redacted(url),
            timeout: config.timeout,
            reported: Arc::default(),
        })
    }

    /// The API's base URL, redacted.
    pub fn url(&self) -> &str {
        &self.shown
    }

    /// The URL of `segments` under the base URL, each segment percent-encoded whole: every
    /// byte but RFC 3986's unreserved characters, so `/` is `%2F` (vhost `/`), and `[`, `]`,
    /// space, `%`, `#`, `?` and non-ASCII names reach RabbitMQ as the name they are (the `url`
    /// crate's path encoding leaves `[` and `]` alone, which RabbitMQ answers with 400).
    fn endpoint(&self, segments: &[&str]) -> url::Url {
        let mut url = self.base.clone();
        let mut path = url.path().trim_end_matches('/').to_string();
        for segment in segments {
            path.push('/');
            path.push_str(&percent_encode(segment));
        }
        // Only unreserved characters, `%XX` and `/` are left: `set_path` keeps them as they are.
        url.set_path(&path);
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

    fn data_error(&self, path: String, source: serde_json::Error) -> AmqpSourceError {
        AmqpSourceError::ManagementData {
            url: self.shown.clone(),
            path,
            source,
        }
    }

    /// Logs each unusable figure of `queue` once when it turns bad, and once when it is usable
    /// again, instead of at every read.
    fn note_rejected(&self, queue: &str, rejected: &[Rejected]) {
        let mut reported = self
            .reported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for r in rejected {
            if reported.insert((queue.to_string(), r.field)) {
                tracing::warn!(
                    queue,
                    field = r.field,
                    reason = %r.reason,
                    "ignoring a figure of the management API (read as unknown)"
                );
            }
        }
        reported.retain(|(q, field)| {
            if q != queue || rejected.iter().any(|r| r.field == *field) {
                return true;
            }
            tracing::info!(queue, field, "the management API's figure is usable again");
            false
        });
    }

    /// `GET /api/queues/{vhost}/{name}`: one queue's statistics, `None` when it does not exist.
    pub async fn queue(
        &self,
        vhost: &str,
        name: &str,
    ) -> Result<Option<QueueStats>, AmqpSourceError> {
        let url = self.endpoint(&["api", "queues", vhost, name]);
        match self.get(url).await? {
            Some(body) => {
                let (stats, rejected) =
                    parse_queue(&body.body).map_err(|e| self.data_error(body.path, e))?;
                self.note_rejected(&stats.name, &rejected);
                Ok(Some(stats))
            }
            None => Ok(None),
        }
    }

    /// `GET /api/queues/{vhost}`: every queue of the vhost with its statistics.
    pub async fn queues(&self, vhost: &str) -> Result<Vec<QueueStats>, AmqpSourceError> {
        let mut url = self.endpoint(&["api", "queues", vhost]);
        url.query_pairs_mut().append_pair("columns", COLUMNS);
        match self.get(url).await? {
            Some(body) => Ok(parse_queues(&body.body)
                .map_err(|e| self.data_error(body.path, e))?
                .into_iter()
                .map(|(stats, rejected)| {
                    self.note_rejected(&stats.name, &rejected);
                    stats
                })
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn parses_the_documented_shape() {
        let body = br#"{"name": "celery", "type": "quorum", "messages_ready": 3,
            "messages_unacknowledged": 8, "consumers": 1, "head_message_timestamp": 1700000000,
            "message_stats": {"publish_details": {"rate": 1.5}, "deliver_get_details": {"rate": 0.5},
            "ack_details": {"rate": 0.25}, "publish": 10}}"#;
        let (q, rejected) = parse_queue(body).unwrap();
        assert_eq!(rejected, []);
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
        let (q, _) = parse_queue(br#"{"name": "new", "head_message_timestamp": null}"#).unwrap();
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
        for (name, encoded) in [
            ("a[1]", "a%5B1%5D"),
            ("ü", "%C3%BC"),
            ("50%", "50%25"),
            ("a?b#c", "a%3Fb%23c"),
            ("x.y-z_~", "x.y-z_~"),
        ] {
            let url = c.endpoint(&["api", "queues", "v h", name]);
            assert_eq!(
                url.as_str(),
                format!("http://rabbit:15672/prefix/api/queues/v%20h/{encoded}")
            );
        }
        let bare = ManagementClient::new(&ManagementConfig::new("http://h:15672")).unwrap();
        assert_eq!(
            bare.endpoint(&["api", "queues", "/"]).as_str(),
            "http://h:15672/api/queues/%2F"
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("p%40ss") && !shown.contains("p@ss"),
            "{shown}"
        );
    }
    fn one(json: serde_json::Value) -> (QueueStats, Vec<&'static str>) {
        let (q, rejected) = parse_queue(json.to_string().as_bytes()).unwrap();
        (q, rejected.iter().map(|r| r.field).collect())
    }

    #[test]
    fn extreme_timestamps_are_unknown_never_a_panic() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for bad in [
            json!(u64::MAX),
            json!(1u64 << 63),
            json!(18_446_744_073_709_551_616.0_f64),
            json!(1e300),
            json!(-1),
            json!(-1e300),
            json!(i64::MIN),
            json!(-0.5),
            json!(12),
            json!("1700000000"),
            json!(true),
            json!([1]),
            json!({"t": 1}),
        ] {
            let (q, rejected) = one(json!({"name": "q", "head_message_timestamp": bad}));
            assert_eq!(q.head_message_timestamp, None, "{bad}");
            assert_eq!(q.head_message_age(now), None, "{bad}");
            assert_eq!(rejected, ["head_message_timestamp"], "{bad}");
        }
        // No timestamp at all is silent.
        for none in [json!(null), json!(""), json!(0)] {
            let (q, rejected) = one(json!({"name": "q", "head_message_timestamp": none}));
            assert_eq!(
                (q.head_message_timestamp, rejected.len()),
                (None, 0),
                "{none}"
            );
        }
        // Fractions are fine; a timestamp in milliseconds is far ahead: unknown age.
        let (q, _) = one(json!({"name": "q", "head_message_timestamp": 1_799_999_990.5}));
        assert_eq!(q.head_message_age(now), Some(Duration::from_millis(9_500)));
        let (q, rejected) =
            one(json!({"name": "q", "head_message_timestamp": 1_799_999_990_000_u64}));
        assert!(q.head_message_timestamp.is_some() && rejected.is_empty());
        assert_eq!(
            q.head_message_age(now),
            None,
            "milliseconds read as seconds"
        );
        // A little clock skew reads as a fresh message.
        let (q, _) = one(json!({"name": "q", "head_message_timestamp": 1_800_000_060}));
        assert_eq!(q.head_message_age(now), Some(Duration::ZERO));
    }

    #[test]
    fn extreme_counts_and_rates_are_unknown_and_cost_only_their_field() {
        let (q, rejected) = one(json!({
            "name": "q",
            "messages_ready": -1,
            "messages_unacknowledged": 1e20,
            "consumers": u64::from(u32::MAX) + 1,
            "message_stats": {
                "publish_details": {"rate": -3.0},
                "deliver_get_details": {"rate": "fast"},
                "ack_details": {"rate": 2.5},
            },
            "type": 7,
            "exclusive": "no",
        }));
        assert_eq!((q.ready, q.unacknowledged, q.consumers), (None, None, None));
        assert_eq!((q.publish_rate, q.deliver_get_rate), (None, None));
        assert_eq!(q.ack_rate, Some(2.5), "the good figure is kept");
        assert_eq!((q.queue_type, q.exclusive), (None, None));
        assert_eq!(rejected.len(), 7, "{rejected:?}");
        // The largest values allowed are kept; above them, unknown.
        let (q, rejected) = one(json!({
            "name": "q", "messages_ready": MAX_COUNT, "consumers": u32::MAX,
            "message_stats": [],
        }));
        assert_eq!((q.ready, q.consumers), (Some(MAX_COUNT), Some(u32::MAX)));
        assert!(rejected.is_empty(), "{rejected:?}");
        let (q, rejected) = one(json!({"name": "q", "messages_ready": u64::MAX}));
        assert_eq!((q.ready, rejected), (None, vec!["messages_ready"]));
        let (_, rejected) = one(json!({"name": "q", "message_stats": 3}));
        assert_eq!(rejected, ["message_stats"]);
    }

    #[test]
    fn a_bad_figure_is_logged_once_while_it_stays_bad() {
        let c = ManagementClient::new(&ManagementConfig::new("http://h:15672")).unwrap();
        let bad = [Rejected {
            field: "head_message_timestamp",
            reason: "x".into(),
        }];
        c.note_rejected("q", &bad);
        c.note_rejected("q", &bad);
        c.note_rejected("other", &[]);
        assert_eq!(c.reported.lock().unwrap().len(), 1);
        c.note_rejected("q", &[]);
        assert!(c.reported.lock().unwrap().is_empty(), "usable again");
    }

    /// Any JSON value (including huge, negative and fractional numbers).
    fn any_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from), // NaN and infinities become null
            prop_oneof![
                Just(0.0),
                Just(-0.0),
                Just(1e308),
                Just(-1e308),
                Just(9.3e18),
                Just(1.8446744073709552e19)
            ]
            .prop_map(serde_json::Value::from),
            ".{0,8}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::hash_map("[a-z_]{1,6}|rate", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    const FIELDS: [&str; 7] = [
        "type",
        "exclusive",
        "messages_ready",
        "messages_unacknowledged",
        "consumers",
        "message_stats",
        "head_message_timestamp",
    ];

    proptest! {
        #[test]
        fn any_queue_object_parses_without_panicking(
            values in prop::collection::vec(prop::option::of(any_json()), FIELDS.len()),
            rates in prop::collection::vec(any_json(), 3),
            now_secs in any::<u32>(),
        ) {
            let mut obj = serde_json::Map::new();
            obj.insert("name".into(), json!("q"));
            for (field, v) in FIELDS.iter().zip(values) {
                if let Some(v) = v {
                    obj.insert((*field).into(), v);
                }
            }
            if rates.iter().any(|r| r.is_number()) {
                obj.insert("message_stats".into(), json!({
                    "publish_details": {"rate": rates[0]},
                    "deliver_get_details": {"rate": rates[1]},
                    "ack_details": {"rate": rates[2]},
                }));
            }
            let body = serde_json::Value::Object(obj).to_string();
            let (q, rejected) = parse_queue(body.as_bytes()).unwrap();
            let list = format!("[{body},{body}]");
            prop_assert_eq!(parse_queues(list.as_bytes()).unwrap().len(), 2);
            // Every figure kept is in its range; the age never panics.
            for n in [q.ready, q.unacknowledged].into_iter().flatten() {
                prop_assert!(n <= MAX_COUNT);
            }
            for r in [q.publish_rate, q.deliver_get_rate, q.ack_rate].into_iter().flatten() {
                prop_assert!(r.is_finite() && r >= 0.0);
            }
            if let Some(t) = q.head_message_timestamp {
                prop_assert!(t >= UNIX_EPOCH + Duration::from_secs(MIN_HEAD_TIMESTAMP_SECS));
            }
            let _ = q.head_message_age(UNIX_EPOCH + Duration::from_secs(u64::from(now_secs)));
            let _ = q.head_message_age(SystemTime::now());
            prop_assert!(rejected.len() <= FIELDS.len() + 3);
        }

        #[test]
        fn arbitrary_bytes_are_an_error_or_stats_never_a_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_queue(&body);
            let _ = parse_queues(&body);
        }
    }
}
