//! kombu's key layout on Redis, and what we read from the messages stored there.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
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

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
pub(crate) fn wildcard_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Whether a discovered queue is one of Celery's own (remote control, replies, event receivers).
pub(crate) fn is_internal_queue(queue: &str) -> bool {
    queue.is_empty()
        || queue.ends_with(".pidbox")
        || queue.starts_with("celeryev.")
        || matches!(queue, "unacked" | "unacked_index" | "unacked_mutex")
        || queue.starts_with("_kombu.")
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    headers: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    properties: Option<serde_json::Map<String, Value>>,
}

/// How long the oldest message has been waiting: from its publish time (`field`, looked up in
/// the properties then the headers), else from a past `eta` header (how long it has been due).
/// `None` when the message says neither; never a guess.
pub(crate) fn message_age(raw: &[u8], field: Option<&str>, now: SystemTime) -> Option<Duration> {
    let env: Envelope = serde_json::from_slice(raw).ok()?;
    let lookup = |name: &str| {
        env.properties
            .as_ref()
            .and_then(|p| p.get(name))
            .or_else(|| env.headers.as_ref().and_then(|h| h.get(name)))
            .and_then(parse_time)
    };
    if let Some(published) = field.and_then(lookup) {
        return Some(now.duration_since(published).unwrap_or_default());
    }
    let eta = env.headers.as_ref()?.get("eta").and_then(parse_time)?;
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
    fn wildcards_and_internal_queues() {
        assert!(wildcard_match("emails@*", "emails@host-1"));
        assert!(!wildcard_match("emails@*", "celery@host-1"));
        assert!(wildcard_match("*", "anything"));
        assert!(wildcard_match("a*b*c", "a-x-b-y-c"));
        assert!(!wildcard_match("a*b*c", "a-x-c-y-b"));
        assert!(wildcard_match("exact", "exact"));
        assert!(!wildcard_match("ab*ba", "aba"));
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
