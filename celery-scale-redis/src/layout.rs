//! kombu's key layout on Redis, and what we read from the messages stored there.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

/// Where kombu keeps one transport's keys: prefix, priority steps and separator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub prefix: String,
    pub steps: Vec<u32>,
    pub sep: String,
}

impl Layout {
    /// The keys of `queue`, one per distinct priority step (kombu's `_q_for_pri`): step 0 is the
    /// bare name, step `p` is `{queue}{sep}{p}`; all with the global prefix.
    pub fn step_keys(&self, queue: &str) -> Vec<String> {
        let mut keys: Vec<String> = Vec::with_capacity(self.steps.len());
        for &p in &self.steps {
            let key = if p == 0 {
                format!("{}{queue}", self.prefix)
            } else {
                format!("{}{queue}{}{p}", self.prefix, self.sep)
            };
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        keys
    }

    /// The hash of unacknowledged messages.
    pub fn unacked(&self) -> String {
        format!("{}unacked", self.prefix)
    }

    /// The binding table of `exchange`.
    pub fn binding(&self, exchange: &str) -> String {
        format!("{}_kombu.binding.{exchange}", self.prefix)
    }

    /// A `SCAN MATCH` pattern for every binding table (not `_kombu.binding_permanent.*` nor
    /// `_kombu.binding_deadlines`).
    pub fn binding_pattern(&self) -> String {
        format!("{}_kombu.binding.*", glob_escape(&self.prefix))
    }

    /// Splits a binding-table member `routing_key sep pattern sep queue`.
    pub fn split_binding<'a>(&self, member: &'a str) -> Option<(&'a str, &'a str)> {
        let mut parts = member.splitn(3, self.sep.as_str());
        let routing_key = parts.next()?;
        let _pattern = parts.next()?;
        let queue = parts.next()?;
        Some((routing_key, queue))
    }

    /// The PUB/SUB channels of Celery's worker events on database `db`: kombu's fanout prefix
    /// `/{db}.`, exchange `celeryev`, routing key `worker.*`.
    pub fn worker_event_channels(&self, db: i64) -> [String; 3] {
        ["heartbeat", "online", "offline"]
            .map(|ev| format!("{}/{db}.celeryev/worker.{ev}", self.prefix))
    }
}

/// Escapes Redis glob metacharacters.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Whether a discovered queue is one of Celery's own (remote control, replies, event receivers).
pub(crate) fn is_internal_queue(queue: &str) -> bool {
    queue.is_empty()
        || queue.ends_with(".pidbox")
        || queue.starts_with("celeryev.")
        || matches!(queue, "unacked" | "unacked_index" | "unacked_mutex")
        || queue.starts_with("_kombu.")
}

/// A key of the envelope, borrowed from the input when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Picks at most two entries of a JSON object by name, skipping everything else unparsed.
struct Pick<'a> {
    first: Option<&'a str>,
    second: Option<&'a str>,
}

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = (Option<Value>, Option<Value>);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = (Option<Value>, Option<Value>);
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok((None, None))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut first, mut second) = (None, None);
        while let Some(Key(key)) = map.next_key()? {
            if Some(key.as_ref()) == self.first {
                first = Some(map.next_value()?);
            } else if Some(key.as_ref()) == self.second {
                second = Some(map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok((first, second))
    }
}

/// The publish-time field (properties first, then headers) and the `eta` header of a kombu
/// envelope; the body and every other field are skipped without being built.
struct EnvelopeTimes<'a> {
    field: Option<&'a str>,
}

impl<'de> Visitor<'de> for EnvelopeTimes<'_> {
    type Value = (Option<Value>, Option<Value>);
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a kombu message envelope")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut in_properties, mut in_headers, mut eta) = (None, None, None);
        while let Some(Key(key)) = map.next_key()? {
            match key.as_ref() {
                "headers" => {
                    (in_headers, eta) = map.next_value_seed(Pick {
                        first: self.field,
                        second: Some("eta"),
                    })?;
                }
                "properties" if self.field.is_some() => {
                    (in_properties, _) = map.next_value_seed(Pick {
                        first: self.field,
                        second: None,
                    })?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok((in_properties.or(in_headers), eta))
    }
}

/// How long the oldest message has been waiting: from its publish time (`field`, looked up in
/// the properties then the headers), else from a past `eta` header (how long it has been due).
/// `None` when the message says neither; never a guess.
pub(crate) fn message_age(raw: &[u8], field: Option<&str>, now: SystemTime) -> Option<Duration> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let (published, eta) = de.deserialize_map(EnvelopeTimes { field }).ok()?;
    if let Some(published) = published.as_ref().and_then(parse_time) {
        return Some(now.duration_since(published).unwrap_or_default());
    }
    let eta = eta.as_ref().and_then(parse_time)?;
    now.duration_since(eta).ok()
}

/// A time as Unix seconds (number or numeric string) or ISO 8601 (naive means UTC).
fn parse_time(v: &Value) -> Option<SystemTime> {
    let secs = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(secs) => secs,
            Err(_) => return parse_iso(s.trim()),
        },
        _ => return None,
    };
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(secs).ok()?)
}

fn parse_iso(s: &str) -> Option<SystemTime> {
    let utc = match chrono::DateTime::parse_from_rfc3339(s) {
        Ok(t) => t.with_timezone(&chrono::Utc),
        Err(_) => chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
            .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
            .ok()?
            .and_utc(),
    };
    let nanos = utc.timestamp_nanos_opt()?;
    UNIX_EPOCH.checked_add(Duration::from_nanos(u64::try_from(nanos).ok()?))
}

/// The exchange and routing key of an `unacked` entry (`[message, exchange, routing_key]`).
pub(crate) fn unacked_route(raw: &[u8]) -> Option<(String, String)> {
    let (_, exchange, routing_key): (serde::de::IgnoredAny, String, String) =
        serde_json::from_slice(raw).ok()?;
    Some((exchange, routing_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(prefix: &str) -> Layout {
        Layout {
            prefix: prefix.into(),
            steps: vec![0, 3, 6, 9],
            sep: "\x06\x16".into(),
        }
    }

    #[test]
    fn keys_follow_kombu() {
        assert_eq!(
            layout("").step_keys("celery"),
            [
                "celery",
                "celery\x06\x163",
                "celery\x06\x166",
                "celery\x06\x169"
            ]
        );
        assert_eq!(layout("acme:").unacked(), "acme:unacked");
        assert_eq!(
            layout("acme:").binding("celery"),
            "acme:_kombu.binding.celery"
        );
        assert_eq!(
            layout("a*[b]:").binding_pattern(),
            "a\\*\\[b\\]:_kombu.binding.*"
        );
        assert_eq!(
            layout("acme:").worker_event_channels(12)[0],
            "acme:/12.celeryev/worker.heartbeat"
        );
        let custom = Layout {
            prefix: String::new(),
            steps: vec![1, 5],
            sep: ":".into(),
        };
        assert_eq!(custom.step_keys("q"), ["q:1", "q:5"]);
        assert_eq!(
            layout("").split_binding("celery\x06\x16\x06\x16celery"),
            Some(("celery", "celery"))
        );
    }

    #[test]
    fn internal_queues() {
        assert!(is_internal_queue("celery@h.celery.pidbox"));
        assert!(is_internal_queue("0f3c.reply.celery.pidbox"));
        assert!(is_internal_queue("celeryev.1234"));
        assert!(!is_internal_queue("celery"));
    }

    #[test]
    fn ages_from_publish_time_or_past_eta_only() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let msg = |headers: &str, props: &str| {
            format!(r#"{{"body": "e30=", "headers": {{{headers}}}, "properties": {{{props}}}}}"#)
        };
        let m = msg(r#""eta": null"#, r#""published_at": 1799999990.5"#);
        assert_eq!(
            message_age(m.as_bytes(), Some("published_at"), now),
            Some(Duration::from_millis(9500))
        );
        let m = msg(r#""published_at": "2027-01-15T08:00:00+00:00""#, "");
        let published = parse_iso("2027-01-15T08:00:00Z").unwrap();
        assert_eq!(
            message_age(
                m.as_bytes(),
                Some("published_at"),
                published + Duration::from_secs(10)
            ),
            Some(Duration::from_secs(10))
        );
        // A past eta gives how long the task has been due; a future one, nothing.
        let m = msg(r#""eta": "2027-01-15T08:00:00.250000+00:00""#, "");
        let eta = parse_iso("2027-01-15T08:00:00.250000+00:00").unwrap();
        assert_eq!(
            message_age(m.as_bytes(), None, eta + Duration::from_secs(3)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            message_age(m.as_bytes(), None, eta - Duration::from_secs(3)),
            None
        );
        // The property wins over a header of the same name; escaped keys still match.
        let m = msg(
            r#""published_at": 1799999000"#,
            r#""published_\u0061t": 1799999990"#,
        );
        assert_eq!(
            message_age(m.as_bytes(), Some("published_at"), now),
            Some(Duration::from_secs(10))
        );
        // Nothing to go on: no age.
        assert_eq!(
            message_age(msg("", "").as_bytes(), Some("published_at"), now),
            None
        );
        assert_eq!(message_age(b"not json", None, now), None);
        // A publish time in the future (clock skew) reads zero, not negative.
        let m = msg("", r#""published_at": 1800000100"#);
        assert_eq!(
            message_age(m.as_bytes(), Some("published_at"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_iso("2027-01-15T08:00:00"),
            parse_iso("2027-01-15T08:00:00Z")
        );
    }

    #[test]
    fn reads_unacked_routes() {
        assert_eq!(
            unacked_route(br#"[{"body": "x", "headers": {}}, "", "emails"]"#),
            Some((String::new(), "emails".into()))
        );
        assert_eq!(unacked_route(b"[1]"), None);
    }
}
