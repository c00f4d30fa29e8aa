//! kombu's key layout on Redis, and what we read from the messages stored there.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

/// Where kombu keeps one transport's keys and channels: prefix, priority steps, separator,
/// the unacked hash's name and the fanout (PUB/SUB) channel layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub prefix: String,
    pub steps: Vec<u32>,
    pub sep: String,
    /// `unacked_key` (without the global prefix).
    pub unacked_key: String,
    /// kombu's `keyprefix_fanout` with the database put in (`/{db}.`, `""`, or custom).
    pub fanout: String,
    /// `fanout_patterns`: the routing key is part of the channel.
    pub fanout_patterns: bool,
    /// `sentinel_fanout_compat`: the literal `/{db}.` prefix of kombu < 5.4 too.
    pub legacy_fanout: Option<String>,
}

impl Layout {
    /// The layout with kombu's defaults for database `db`.
    #[cfg(test)]
    pub fn kombu_default(prefix: &str, db: i64) -> Layout {
        Layout {
            prefix: prefix.into(),
            steps: vec![0, 3, 6, 9],
            sep: "\x06\x16".into(),
            unacked_key: "unacked".into(),
            fanout: format!("/{db}."),
            fanout_patterns: true,
            legacy_fanout: None,
        }
    }
}

impl Layout {
    /// The keys of `queue`, one per distinct priority step (kombu's `_q_for_pri`): step 0 is the
    /// bare name, step `p` is `{queue}{sep}{p}`; all with the global prefix.
    pub fn step_keys(&self, queue: &str) -> Vec<String> {
        // The steps are strictly increasing (validated), so the keys are distinct.
        self.steps
            .iter()
            .map(|&p| {
                if p == 0 {
                    format!("{}{queue}", self.prefix)
                } else {
                    format!("{}{queue}{}{p}", self.prefix, self.sep)
                }
            })
            .collect()
    }

    /// The hash of unacknowledged messages.
    pub fn unacked(&self) -> String {
        format!("{}{}", self.prefix, self.unacked_key)
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

    /// The PUB/SUB channels of Celery's worker events, as kombu's `_get_publish_topic` builds
    /// them: global prefix + fanout prefix + exchange `celeryev`, then `/` + routing key
    /// `worker.{heartbeat,online,offline}` when `fanout_patterns` is on (without it every event
    /// of the exchange shares the one channel). With `sentinel_fanout_compat`, the legacy
    /// channels too.
    pub fn worker_event_channels(&self) -> Vec<String> {
        let mut fanouts = vec![self.fanout.as_str()];
        if let Some(legacy) = &self.legacy_fanout
            && *legacy != self.fanout
        {
            fanouts.push(legacy);
        }
        let mut channels = Vec::new();
        for fanout in fanouts {
            if self.fanout_patterns {
                for ev in ["heartbeat", "online", "offline"] {
                    channels.push(format!("{}{fanout}celeryev/worker.{ev}", self.prefix));
                }
            } else {
                channels.push(format!("{}{fanout}celeryev", self.prefix));
            }
        }
        channels
    }
}

impl Layout {
    /// The PUB/SUB channels of every Celery event a recorder reads: the worker events', and
    /// with `task_events` each task event's (`{prefix}{fanout}celeryev/task.received`, ...,
    /// `task.multi`). Without `fanout_patterns` every event shares the one channel already.
    pub fn celery_event_channels(&self, task_events: bool) -> Vec<String> {
        let mut channels = self.worker_event_channels();
        if task_events && self.fanout_patterns {
            let mut fanouts = vec![self.fanout.as_str()];
            if let Some(legacy) = &self.legacy_fanout
                && *legacy != self.fanout
            {
                fanouts.push(legacy);
            }
            for fanout in fanouts {
                for key in crate::events::TASK_EVENT_KEYS {
                    channels.push(format!("{}{fanout}celeryev/{key}", self.prefix));
                }
            }
        }
        channels
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
        // A `null` property (a stamp not set) leaves the header to say it.
        Ok((in_properties.filter(|v| !v.is_null()).or(in_headers), eta))
    }
}

/// The earliest publish time or `eta` taken as a Unix time: 2000-01-01T00:00:00Z. An earlier
/// stamp is not a clock reading (e.g. `time.monotonic()`, or a relative countdown).
pub(crate) const EARLIEST_STAMP: Duration = Duration::from_secs(946_684_800);

/// How far in the future a publish time may be and still read as "just published" (clock skew
/// between the publisher and this host). Further ahead it is not Unix seconds (milliseconds, say).
pub(crate) const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Why the oldest message's time stamp was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {why}")]
pub(crate) struct BadStamp {
    /// Which value: the message, the publish-time field or `eta`.
    pub what: String,
    /// What is wrong with it.
    pub why: String,
}

impl BadStamp {
    fn new(what: impl Into<String>, why: impl Into<String>) -> Self {
        BadStamp {
            what: what.into(),
            why: why.into(),
        }
    }
}

/// How long the oldest message has been waiting: from its publish time (`field`, looked up in
/// the properties then the headers), else from a past `eta` header (how long it has been due).
/// `Ok(None)` when the message says neither (no stamp, `null`, or an `eta` still to come):
/// never a guess. `Err` when a stamp is there but is no time we can use (not a number or ISO
/// 8601, before [`EARLIEST_STAMP`], a publish time more than [`MAX_CLOCK_SKEW`] ahead) or the
/// message is not a JSON object: the caller logs it and takes the age as unknown.
pub(crate) fn message_age(
    raw: &[u8],
    field: Option<&str>,
    now: SystemTime,
) -> Result<Option<Duration>, BadStamp> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let (published, eta) = de
        .deserialize_map(EnvelopeTimes { field })
        .map_err(|e| BadStamp::new("message", format!("not a kombu JSON envelope ({e})")))?;
    age_of(published, eta, field, now)
}

/// The age [`message_age`] gives from the envelope's publish time (properties first, then
/// headers) and `eta` header, however they were read.
fn age_of(
    published: Option<Value>,
    eta: Option<Value>,
    field: Option<&str>,
    now: SystemTime,
) -> Result<Option<Duration>, BadStamp> {
    if let (Some(name), Some(value)) = (field, published.as_ref().filter(|v| !v.is_null())) {
        let what = || format!("{name} {}", shown(Some(value)));
        let at = parse_time(value).map_err(|why| BadStamp::new(what(), why))?;
        return match now.duration_since(at) {
            Ok(age) => Ok(Some(age)),
            Err(ahead) if ahead.duration() <= MAX_CLOCK_SKEW => Ok(Some(Duration::ZERO)),
            Err(ahead) => Err(BadStamp::new(
                what(),
                format!(
                    "is {:?} in the future (more than the {MAX_CLOCK_SKEW:?} of clock skew \
                     allowed): not Unix seconds?",
                    ahead.duration()
                ),
            )),
        };
    }
    let Some(eta) = eta.as_ref().filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let what = format!("eta {}", shown(Some(eta)));
    let due = parse_time(eta).map_err(|why| BadStamp::new(what, why))?;
    Ok(now.duration_since(due).ok())
}

/// The Lua script that reads, for each of its keys, the list's length and only the time stamps
/// of its oldest message (`LINDEX key -1`): the message is decoded by Redis's `cjson` without
/// its body (kombu writes the body first; the script skips that string by finding its closing
/// quote, and decodes a whole message written another way), and a few bytes per key come back
/// instead of the message.
///
/// `KEYS`: list keys. `ARGV[1]`: `"1"` when a publish-time field is configured, `ARGV[2]` its
/// name. Per key it returns the `LLEN` reply (or its error), then `false` (no message, or one
/// without a stamp), `"E"` + why (not a kombu JSON envelope), or `{published, eta}`: each
/// `false` (missing or `null`) or a tagged string, `"n"` + a number as `%.17g` (exact for a
/// double), `"s"` + a string, `"b"` + a boolean, `"t"` + a table's JSON (empty past 200 bytes).
/// [`script_tail_age`] reads that the way [`message_age`] reads the message.
pub(crate) const TAILS_SCRIPT: &str = r#"-- celery-scale: list lengths and oldest-message time stamps
local has_field = ARGV[1] == '1'
local field = ARGV[2]
local null = cjson.null
local function tag(v)
  if v == nil or v == null then return false end
  local t = type(v)
  if t == 'number' then return 'n' .. string.format('%.17g', v) end
  if t == 'string' then return 's' .. v end
  if t == 'boolean' then return 'b' .. tostring(v) end
  local ok, s = pcall(cjson.encode, v)
  if ok and #s <= 200 then return 't' .. s end
  return 't'
end
local function object(v)
  if v == nil or v == null then return {} end
  if type(v) ~= 'table' or v[1] ~= nil then return nil end
  return v
end
local function decode(raw)
  local _, e = string.find(raw, '^%s*{%s*"body"%s*:%s*"')
  if e then
    local i = e + 1
    while true do
      local q = string.find(raw, '"', i, true)
      if not q then break end
      local b = q - 1
      while b > e and string.byte(raw, b) == 92 do b = b - 1 end
      if (q - 1 - b) % 2 == 0 then
        local _, c = string.find(raw, '^%s*,', q + 1)
        if c then return pcall(cjson.decode, '{' .. string.sub(raw, c + 1)) end
        if string.find(raw, '^%s*}%s*$', q + 1) then return true, {} end
        break
      end
      i = q + 1
    end
  end
  return pcall(cjson.decode, raw)
end
local function stamps(raw)
  local ok, m = decode(raw)
  if not ok then return 'E' .. string.sub(tostring(m), 1, 200) end
  if type(m) ~= 'table' or m[1] ~= nil then return 'Enot a JSON object' end
  local h = object(m['headers'])
  if not h then return 'Eheaders is not an object' end
  local published = nil
  if has_field then
    local p = object(m['properties'])
    if not p then return 'Eproperties is not an object' end
    published = p[field]
    if published == null then published = nil end
    if published == nil then published = h[field] end
  end
  local p, eta = tag(published), tag(h['eta'])
  if not p and not eta then return false end
  return {p, eta}
end
local out = {}
for i, key in ipairs(KEYS) do
  local n = redis.pcall('LLEN', key)
  out[2 * i - 1] = n
  local tail = false
  if type(n) == 'number' and n > 0 then
    local raw = redis.pcall('LINDEX', key, -1)
    if type(raw) == 'string' then
      tail = stamps(raw)
    elseif type(raw) == 'table' and raw.err then
      tail = raw
    end
  end
  out[2 * i] = tail
end
return out
"#;

/// A tail reply of [`TAILS_SCRIPT`] that is none of the forms it returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotAScriptTail(pub String);

/// The age of a key's oldest message from [`TAILS_SCRIPT`]'s tail reply, with the rules of
/// [`message_age`]: `Ok(Ok(None))` for no message or no stamp, `Ok(Err(_))` for a stamp (or a
/// message) that cannot be used, `Err(_)` for a reply the script does not give (a forged
/// server): the caller fails the observation, as for any unexpected reply.
pub(crate) fn script_tail_age(
    reply: &redis::Value,
    field: Option<&str>,
    now: SystemTime,
) -> Result<Result<Option<Duration>, BadStamp>, NotAScriptTail> {
    use redis::Value as R;
    let unexpected = || NotAScriptTail(format!("{reply:?}").chars().take(200).collect());
    match reply {
        R::Nil => Ok(Ok(None)),
        R::BulkString(b) if b.first() == Some(&b'E') => Ok(Err(BadStamp::new(
            "message",
            format!(
                "not a kombu JSON envelope ({})",
                String::from_utf8_lossy(&b[1..])
                    .chars()
                    .take(200)
                    .collect::<String>()
            ),
        ))),
        R::Array(parts) if parts.len() == 2 => {
            let mut values = [None, None];
            for (slot, part) in values.iter_mut().zip(parts) {
                *slot = match part {
                    R::Nil => None,
                    R::BulkString(b) => match tagged_value(b) {
                        Some(Ok(v)) => Some(v),
                        Some(Err(bad)) => return Ok(Err(bad)),
                        None => return Err(unexpected()),
                    },
                    _ => return Err(unexpected()),
                };
            }
            let [published, eta] = values;
            Ok(age_of(published, eta, field, now))
        }
        _ => Err(unexpected()),
    }
}

/// One tagged value of [`TAILS_SCRIPT`] as the JSON value it was decoded from; `None` for an
/// unknown tag, `Err` for what serde_json would not have read (a number out of range, a string
/// that is not UTF-8): the message, not the stamp, is then unusable, as with [`message_age`].
fn tagged_value(b: &[u8]) -> Option<Result<Value, BadStamp>> {
    let (tag, rest) = b.split_first()?;
    let not_json = |why: &str| {
        Err(BadStamp::new(
            "message",
            format!("not a kombu JSON envelope ({why})"),
        ))
    };
    Some(match tag {
        b'n' => match std::str::from_utf8(rest)
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .and_then(serde_json::Number::from_f64)
        {
            Some(n) => Ok(Value::Number(n)),
            None => not_json("number out of range"),
        },
        b's' => match std::str::from_utf8(rest) {
            Ok(s) => Ok(Value::String(s.to_string())),
            Err(_) => not_json("a string that is not UTF-8"),
        },
        b'b' => Ok(Value::Bool(rest == b"true")),
        // A table (array or object): shown in the log when it is short.
        b't' => Ok(serde_json::from_slice(rest).unwrap_or(Value::Array(Vec::new()))),
        _ => return None,
    })
}

/// A JSON value for a log line, cut to 80 characters.
fn shown(v: Option<&Value>) -> String {
    let s = v.map(Value::to_string).unwrap_or_default();
    match s.char_indices().nth(80) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}

/// A time as Unix seconds (number or numeric string) or ISO 8601 (naive means UTC), not before
/// [`EARLIEST_STAMP`]; why not otherwise.
fn parse_time(v: &Value) -> Result<SystemTime, String> {
    let secs = match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| "is not a number of seconds".to_string())?,
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(secs) => secs,
            Err(_) => return parse_iso(s.trim()),
        },
        _ => return Err("is neither Unix seconds nor an ISO 8601 string".into()),
    };
    if !secs.is_finite() {
        return Err("is not a finite number of seconds".into());
    }
    if secs < EARLIEST_STAMP.as_secs_f64() {
        return Err("is before 2000-01-01: not a Unix time in seconds".into());
    }
    let since_epoch =
        Duration::try_from_secs_f64(secs).map_err(|_| "is too far in the future".to_string())?;
    UNIX_EPOCH
        .checked_add(since_epoch)
        .ok_or_else(|| "is too far in the future".into())
}

fn parse_iso(s: &str) -> Result<SystemTime, String> {
    let utc = match chrono::DateTime::parse_from_rfc3339(s) {
        Ok(t) => t.with_timezone(&chrono::Utc),
        Err(_) => chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
            .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
            .map_err(|_| "is neither Unix seconds nor an ISO 8601 time".to_string())?
            .and_utc(),
    };
    // Nanoseconds since the epoch fit an i64 from 1677 to 2262; both bounds are outside what a
    // clock says now.
    let nanos = utc
        .timestamp_nanos_opt()
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| "is outside the years 1970 to 2262".to_string())?;
    let at = UNIX_EPOCH + Duration::from_nanos(nanos);
    if at < UNIX_EPOCH + EARLIEST_STAMP {
        return Err("is before 2000-01-01".into());
    }
    Ok(at)
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
        Layout::kombu_default(prefix, 12)
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
            layout("acme:").worker_event_channels()[0],
            "acme:/12.celeryev/worker.heartbeat"
        );
        let flat = Layout {
            fanout: String::new(),
            fanout_patterns: false,
            ..layout("")
        };
        assert_eq!(flat.worker_event_channels(), ["celeryev"]);
        assert_eq!(flat.celery_event_channels(true), ["celeryev"]);
        let all = layout("acme:").celery_event_channels(true);
        assert_eq!(all.len(), 12);
        assert!(
            all.contains(&"acme:/12.celeryev/task.multi".to_string()),
            "{all:?}"
        );
        assert!(
            all.contains(&"acme:/12.celeryev/task.received".to_string()),
            "{all:?}"
        );
        assert_eq!(layout("acme:").celery_event_channels(false).len(), 3);
        let compat = Layout {
            legacy_fanout: Some("/{db}.".into()),
            ..layout("")
        };
        assert_eq!(
            compat.worker_event_channels(),
            [
                "/12.celeryev/worker.heartbeat",
                "/12.celeryev/worker.online",
                "/12.celeryev/worker.offline",
                "/{db}.celeryev/worker.heartbeat",
                "/{db}.celeryev/worker.online",
                "/{db}.celeryev/worker.offline"
            ]
        );
        let custom = Layout {
            steps: vec![1, 5],
            sep: ":".into(),
            ..layout("")
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

    fn msg(headers: &str, props: &str) -> String {
        format!(r#"{{"body": "e30=", "headers": {{{headers}}}, "properties": {{{props}}}}}"#)
    }

    const NOW: Duration = Duration::from_secs(1_800_000_000);

    #[test]
    fn ages_from_publish_time_or_past_eta_only() {
        let now = UNIX_EPOCH + NOW;
        let m = msg(r#""eta": null"#, r#""published_at": 1799999990.5"#);
        assert_eq!(
            message_age(m.as_bytes(), Some("published_at"), now),
            Ok(Some(Duration::from_millis(9500)))
        );
        let m = msg(r#""published_at": "2027-01-15T08:00:00+00:00""#, "");
        let published = parse_iso("2027-01-15T08:00:00Z").unwrap();
        assert_eq!(
            message_age(
                m.as_bytes(),
                Some("published_at"),
                published + Duration::from_secs(10)
            ),
            Ok(Some(Duration::from_secs(10)))
        );
        // A past eta gives how long the task has been due; a future one, nothing.
        let m = msg(r#""eta": "2027-01-15T08:00:00.250000+00:00""#, "");
        let eta = parse_iso("2027-01-15T08:00:00.250000+00:00").unwrap();
        assert_eq!(
            message_age(m.as_bytes(), None, eta + Duration::from_secs(3)),
            Ok(Some(Duration::from_secs(3)))
        );
        assert_eq!(
            message_age(m.as_bytes(), None, eta - Duration::from_secs(3)),
            Ok(None)
        );
        // The property wins over a header of the same name; escaped keys still match.
        let m = msg(
            r#""published_at": 1799999000"#,
            r#""published_\u0061t": 1799999990"#,
        );
        assert_eq!(
            message_age(m.as_bytes(), Some("published_at"), now),
            Ok(Some(Duration::from_secs(10)))
        );
        // A null property leaves the header to say it.
        let m = msg(r#""published_at": 1799999000"#, r#""published_at": null"#);
        assert_eq!(
            message_age(m.as_bytes(), Some("published_at"), now),
            Ok(Some(Duration::from_secs(1000)))
        );
        // Nothing to go on: no age.
        assert_eq!(
            message_age(msg("", "").as_bytes(), Some("published_at"), now),
            Ok(None)
        );
        let m = msg(r#""published_at": null, "eta": null"#, "");
        assert_eq!(
            message_age(m.as_bytes(), Some("published_at"), now),
            Ok(None)
        );
        // A publish time a little in the future (clock skew) reads zero, not negative.
        let m = msg("", r#""published_at": 1800000100"#);
        assert_eq!(
            message_age(m.as_bytes(), Some("published_at"), now),
            Ok(Some(Duration::ZERO))
        );
        assert_eq!(
            parse_iso("2027-01-15T08:00:00"),
            parse_iso("2027-01-15T08:00:00Z")
        );
    }

    #[test]
    fn bad_stamps_are_unknown_with_a_reason() {
        let now = UNIX_EPOCH + NOW;
        let age =
            |headers: &str| message_age(msg(headers, "").as_bytes(), Some("published_at"), now);
        let why = |headers: &str| age(headers).unwrap_err().to_string();
        // Milliseconds, not seconds: years ahead, not "just published".
        assert!(why(r#""published_at": 1800000000000"#).contains("in the future"));
        // Far beyond what a Duration or a SystemTime holds.
        assert!(
            why(r#""published_at": 1e300"#).contains("future"),
            "{}",
            why(r#""published_at": 1e300"#)
        );
        assert!(why(r#""published_at": "1e400""#).contains("finite"));
        assert!(why(r#""published_at": "NaN""#).contains("finite"));
        assert!(why(r#""published_at": "-inf""#).contains("finite"));
        // time.monotonic() or a countdown: not a Unix time.
        assert!(why(r#""published_at": 12345.6"#).contains("2000"));
        assert!(why(r#""published_at": -5"#).contains("2000"));
        assert!(why(r#""published_at": "1969-12-31T23:59:59Z""#).contains("1970"));
        assert!(why(r#""published_at": "1999-12-31T23:59:59Z""#).contains("2000"));
        assert!(why(r#""published_at": "9999-12-31T23:59:59Z""#).contains("2262"));
        assert!(why(r#""published_at": "yesterday""#).contains("ISO 8601"));
        assert!(why(r#""published_at": true"#).contains("neither"));
        assert!(why(r#""published_at": [1799999990]"#).contains("neither"));
        assert!(why(r#""published_at": 18446744073709551616"#).contains("future"));
        // The same rules for eta, except that a future eta is normal (not due yet).
        let eta = |v: &str| message_age(msg(&format!(r#""eta": {v}"#), "").as_bytes(), None, now);
        assert_eq!(eta(r#""2100-01-01T00:00:00Z""#), Ok(None));
        assert!(eta(r#""soon""#).unwrap_err().to_string().starts_with("eta"));
        assert!(eta("12").is_err());
        // Not a kombu envelope at all.
        assert!(message_age(b"not json", None, now).is_err());
        assert!(message_age(b"[1, 2]", Some("published_at"), now).is_err());
        assert!(message_age(b"", None, now).is_err());
        // The reason shows the value, cut short.
        let long = format!(r#""published_at": "{}""#, "x".repeat(10_000));
        assert!(why(&long).len() < 200, "{}", why(&long));
    }

    #[test]
    fn deep_nesting_is_no_stack_overflow() {
        let now = UNIX_EPOCH + NOW;
        for depth in [200, 100_000] {
            let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            // The stamp is built as a value: serde_json's recursion limit (128) stops it.
            let m = msg(&format!(r#""published_at": {deep}"#), "");
            assert!(message_age(m.as_bytes(), Some("published_at"), now).is_err());
            // A field we skip is skipped without recursion, however deep.
            let m = msg(
                &format!(r#""other": {deep}"#),
                r#""published_at": 1799999999"#,
            );
            assert_eq!(
                message_age(m.as_bytes(), Some("published_at"), now),
                Ok(Some(Duration::from_secs(1)))
            );
            assert_eq!(unacked_route(deep.as_bytes()), None);
        }
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// A stamp in any form a publisher might write, and some no publisher should.
        pub(super) fn stamp() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<f64>().prop_map(|f| serde_json::to_string(&f).unwrap()),
                any::<f64>().prop_map(|f| format!("\"{f}\"")),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                (-1e20f64..1e20).prop_map(|f| format!("{f:e}")),
                prop_oneof![
                    Just("1e400"),
                    Just("-1e400"),
                    Just("\"inf\""),
                    Just("\"NaN\""),
                    Just("null"),
                    Just("{}"),
                    Just("[]"),
                    Just("\"\"")
                ]
                .prop_map(String::from),
                // ISO 8601 shaped, years and fields out of range included.
                (
                    -300_000i32..300_000,
                    0u32..14,
                    0u32..33,
                    0u32..25,
                    0u32..61,
                    0u32..62,
                    0u64..2_000_000_000,
                    prop_oneof![
                        Just(""),
                        Just("Z"),
                        Just("+00:00"),
                        Just("-23:59"),
                        Just("+99:99")
                    ]
                )
                    .prop_map(|(y, mo, d, h, mi, s, frac, tz)| format!(
                        "\"{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{frac}{tz}\""
                    )),
                any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..512), field in proptest::option::of("[a-z_]{1,12}")) {
                let now = UNIX_EPOCH + NOW;
                let _ = message_age(&raw, field.as_deref(), now);
                let _ = unacked_route(&raw);
            }

            #[test]
            fn json_shaped_bytes_never_panic(raw in r#"[\[\]{}":,0-9a-z_. eE+-]{0,200}"#) {
                let now = UNIX_EPOCH + NOW;
                let _ = message_age(raw.as_bytes(), Some("published_at"), now);
                let m = msg(&raw, &raw);
                let _ = message_age(m.as_bytes(), Some("published_at"), now);
                let _ = unacked_route(raw.as_bytes());
            }

            /// Whatever the stamp, an age comes out only for a time between 2000 and a little
            /// ahead of now, and is then exactly how long ago that was.
            #[test]
            fn an_age_only_from_a_plausible_stamp(published in stamp(), eta in stamp(), now_secs in 946_684_800u64..4_000_000_000) {
                let now = UNIX_EPOCH + Duration::from_secs(now_secs);
                let m = msg(&format!(r#""published_at": {published}, "eta": {eta}"#), "");
                let oldest = now.duration_since(UNIX_EPOCH + EARLIEST_STAMP).unwrap();
                if let Ok(Some(age)) = message_age(m.as_bytes(), Some("published_at"), now) {
                    prop_assert!(age <= oldest, "{age:?} from {published} / {eta}");
                }
                // Without the field only a past eta gives an age.
                if let Ok(Some(age)) = message_age(m.as_bytes(), None, now) {
                    prop_assert!(age <= oldest);
                    let due = parse_time(&serde_json::from_str(&eta).unwrap()).unwrap();
                    prop_assert_eq!(now.duration_since(due).unwrap(), age);
                }
            }

            /// A valid stamp in seconds reads back as its age, to the microsecond.
            #[test]
            fn a_valid_stamp_reads_back(ago_us in 0u64..(20 * 365 * 86_400 * 1_000_000), now_secs in 1_700_000_000u64..2_000_000_000, iso in any::<bool>()) {
                let now = UNIX_EPOCH + Duration::from_secs(now_secs);
                let at = now - Duration::from_micros(ago_us);
                let stamp = if iso {
                    let t: chrono::DateTime<chrono::Utc> = at.into();
                    format!("\"{}\"", t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                } else {
                    serde_json::to_string(&at.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()).unwrap()
                };
                let m = msg("", &format!(r#""published_at": {stamp}"#));
                let age = message_age(m.as_bytes(), Some("published_at"), now).unwrap().unwrap();
                let err = age.abs_diff(Duration::from_micros(ago_us));
                prop_assert!(err <= Duration::from_micros(1), "{stamp}: {age:?} vs {ago_us} us");
            }
        }
    }

    /// The tails script on a real Redis reads every message as [`message_age`] does: the same
    /// age (to a microsecond: two float parsers), or unknown for both. Stamps from the fuzz
    /// strategy and hand-picked hostile ones, in properties, headers and `eta`, with and
    /// without a configured field.
    #[test]
    fn the_script_reads_stamps_as_message_age_does() {
        use proptest::strategy::{Strategy, ValueTree};
        let Some(url) = celery_scale_testing::service("CELERY_SCALE_REDIS_URL") else {
            return;
        };
        let url = format!("{}/4", url.trim_end_matches('/'));
        let mut conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let mut stamps: Vec<String> = [
            "1799999990.5",
            "1799999990.123456789",
            "\"1799999990.25\"",
            "1800000100",
            "1800000000000",
            "1e300",
            "1e400",
            "-1e400",
            "12345.6",
            "-5",
            "18446744073709551616",
            "\"2027-01-15T08:00:00.250000+00:00\"",
            "\"2027-01-15 08:00:00\"",
            "\"9999-99-99\"",
            "\"NaN\"",
            "\"inf\"",
            "\" 1799999000 \"",
            "true",
            "false",
            "null",
            "[1799999990]",
            "{\"a\": 1}",
            "[]",
            "{}",
            "\"\"",
            "\"\\u00e9t\\u00e9\"",
            "0.0",
            "1.7976931348623157e308",
        ]
        .map(String::from)
        .to_vec();
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        for _ in 0..150 {
            stamps.push(fuzz::stamp().new_tree(&mut runner).unwrap().current());
        }
        let mut messages = Vec::new();
        for (i, st) in stamps.iter().enumerate() {
            let other = &stamps[(i * 7 + 3) % stamps.len()];
            messages.push(msg(&format!(r#""published_at": {st}"#), ""));
            messages.push(msg("", &format!(r#""published_at": {st}"#)));
            messages.push(msg(
                &format!(r#""eta": {st}"#),
                &format!(r#""published_at": {other}"#),
            ));
            messages.push(msg(
                &format!(r#""eta": {st}, "published_at": {other}"#),
                r#""published_at": null"#,
            ));
        }
        for m in [
            "not json",
            "",
            "[1, 2]",
            "{}",
            r#"{"body": "x"}"#,
            r#"{"body": "x", "headers": 5}"#,
            r#"{"body": "x", "headers": {}, "properties": "p"}"#,
            r#"{"body": 5, "headers": {"eta": "2001-01-01T00:00:00"}}"#,
            r#"{"body": "a\"b\\", "headers": {"published_at": 1799999999}}"#,
            r#"{"body": "a\\", "headers": {"published_at": 1799999999}}"#,
            r#"{"headers": {"published_at": 1799999999}, "body": "x"}"#,
            r#"  { "body" : "x" , "headers": {"published_at": 1799999999} }  "#,
            r#"{"body": "x", "headers": {"published_at": 1799999999}"#,
        ] {
            messages.push(m.to_string());
        }
        let prefix = format!("csr-layout-{}:", std::process::id());
        let keys: Vec<String> = (0..messages.len())
            .map(|i| format!("{prefix}{i}"))
            .collect();
        let mut pipe = redis::pipe();
        for (k, m) in keys.iter().zip(&messages) {
            pipe.cmd("DEL")
                .arg(k)
                .ignore()
                .cmd("LPUSH")
                .arg(k)
                .arg(m)
                .ignore();
        }
        let () = pipe.query(&mut conn).unwrap();
        let now = UNIX_EPOCH + NOW;
        let same = |a: &Result<Option<Duration>, BadStamp>,
                    b: &Result<Option<Duration>, BadStamp>| match (a, b) {
            (Ok(Some(x)), Ok(Some(y))) => x.abs_diff(*y) <= Duration::from_micros(1),
            (Ok(None), Ok(None)) | (Err(_), Err(_)) => true,
            _ => false,
        };
        let mut checked = 0;
        for field in [Some("published_at"), None] {
            for (chunk, msgs) in keys.chunks(200).zip(messages.chunks(200)) {
                let reply: redis::Value = redis::cmd("EVAL")
                    .arg(TAILS_SCRIPT)
                    .arg(chunk.len())
                    .arg(chunk)
                    .arg(if field.is_some() { "1" } else { "0" })
                    .arg(field.unwrap_or(""))
                    .query(&mut conn)
                    .unwrap();
                let redis::Value::Array(parts) = reply else {
                    panic!("{reply:?}")
                };
                assert_eq!(parts.len(), chunk.len() * 2);
                for (m, pair) in msgs.iter().zip(parts.chunks(2)) {
                    assert_eq!(pair[0], redis::Value::Int(1));
                    let script = script_tail_age(&pair[1], field, now).unwrap();
                    let serde = message_age(m.as_bytes(), field, now);
                    assert!(
                        same(&script, &serde),
                        "{m} ({field:?}): script {script:?}, serde {serde:?}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, messages.len() * 2);
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).unwrap();
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
