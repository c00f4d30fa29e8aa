//! Celery's `broker_transport_options`, read as kombu's Redis transport reads them.
//!
//! Every option kombu 5.7's Redis and Sentinel channels take (`Channel.from_transport_options`,
//! `SentinelChannel.from_transport_options`), the ones `kombu.Connection` and
//! `virtual.Transport` read, and Celery's own are known. Those that change which keys, channels
//! or counts exist are honoured; the others are accepted and listed as ignored; any other name
//! is an error naming it.

use std::collections::BTreeMap;
use std::time::Duration;

use celery_scale_core::ConfigError;
use celery_scale_core::transport_option;
use serde_json::Value;

use crate::config::{DEFAULT_PRIORITY_STEPS, DEFAULT_SEP, MAX_PRIORITY_STEP};

/// The prefix of the errors' field names.
pub(crate) const FIELD: &str = "broker_transport_options";

/// kombu's `visibility_timeout` default (1 h).
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(3600);

/// kombu's fanout prefix (`keyprefix_fanout`) before the database is put in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FanoutPrefix {
    /// `fanout_prefix` true (the default): `/{db}.`.
    Default,
    /// `fanout_prefix` false (or an empty string): no prefix (kombu 3.x).
    Off,
    /// A custom prefix, formatted with `{db}` as kombu's `str.format(db=...)` does.
    Custom(String),
}

impl FanoutPrefix {
    /// The prefix for database `db`, as `keyprefix_fanout.format(db=db)`.
    pub fn for_db(&self, db: i64) -> String {
        match self {
            FanoutPrefix::Default => format!("/{db}."),
            FanoutPrefix::Off => String::new(),
            FanoutPrefix::Custom(p) => format_db(p, db).unwrap_or_else(|| p.clone()),
        }
    }
}

/// Python's `str.format(db=db)` on `p`: `{db}` replaced, `{{`/`}}` unescaped; `None` for any
/// other replacement field (a `KeyError` in kombu).
fn format_db(p: &str, db: i64) -> Option<String> {
    let mut out = String::with_capacity(p.len() + 4);
    let mut rest = p;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("{{") {
            out.push('{');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("}}") {
            out.push('}');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("{db}") {
            out.push_str(&db.to_string());
            rest = t;
        } else {
            return None;
        }
    }
    out.push_str(rest);
    Some(out)
}

/// The transport options that matter for counting, resolved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TransportOptions {
    pub global_keyprefix: String,
    pub priority_steps: Vec<u32>,
    pub sep: String,
    pub fanout_prefix: FanoutPrefix,
    pub fanout_patterns: bool,
    pub unacked_key: String,
    pub ack_emulation: bool,
    pub visibility_timeout: Duration,
    pub master_name: Option<String>,
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
    pub sentinel_fanout_compat: bool,
    /// TLS to the Sentinels (`sentinel_kwargs.ssl` on) and their files (`ssl_ca_certs`,
    /// `ssl_certfile`, `ssl_keyfile`).
    pub sentinel_tls: Option<crate::config::TlsConfig>,
    /// Options given that do not change what is counted.
    pub ignored: Vec<String>,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            global_keyprefix: String::new(),
            priority_steps: DEFAULT_PRIORITY_STEPS.to_vec(),
            sep: DEFAULT_SEP.into(),
            fanout_prefix: FanoutPrefix::Default,
            fanout_patterns: true,
            unacked_key: "unacked".into(),
            ack_emulation: true,
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
            master_name: None,
            sentinel_username: None,
            sentinel_password: None,
            sentinel_fanout_compat: false,
            sentinel_tls: None,
            ignored: Vec::new(),
        }
    }
}

/// Options honoured, with what they change (the README table says the same).
pub const HONOURED_OPTIONS: &[&str] = &[
    "global_keyprefix",
    "priority_steps",
    "sep",
    "fanout_prefix",
    "fanout_patterns",
    "unacked_key",
    "ack_emulation",
    "visibility_timeout",
    "master_name",
    "sentinel_kwargs",
    "sentinel_fanout_compat",
];

/// Options kombu or Celery read that do not change which keys, channels or counts exist.
pub const IGNORED_OPTIONS: &[&str] = &[
    // virtual.Channel
    "body_encoding",
    "deadletter_queue",
    // redis.Channel: restore sweeps, the mutex and the index kombu keeps beside `unacked`
    "unacked_index_key",
    "unacked_mutex_key",
    "unacked_mutex_expire",
    "unacked_restore_limit",
    "unacked_restore_interval",
    "unacked_restore_throttle",
    // redis.Channel: the client's sockets and pool
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "socket_keepalive_options",
    "max_connections",
    "health_check_interval",
    "reauth_check_interval",
    "retry_on_timeout",
    "client_name",
    // consumption order: counts are the same
    "queue_order_strategy",
    // virtual.Transport, kombu.Connection (connection retries), Celery
    "polling_interval",
    "brpop_timeout",
    "max_retries",
    "interval_start",
    "interval_step",
    "interval_max",
    "connect_retries_timeout",
    "confirm_publish",
    // SentinelChannel: redis-py rejects a master seen by fewer other Sentinels; the source
    // takes the master the Sentinels name, and checks it is one (ROLE) on every observation.
    "min_other_sentinels",
];

/// `sentinel_kwargs` keys (redis-py `Redis(**sentinel_kwargs)` for the Sentinels) that do not
/// change what is read.
const IGNORED_SENTINEL_KWARGS: &[&str] = &[
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "socket_keepalive_options",
    "health_check_interval",
    "retry_on_timeout",
    "client_name",
];

fn field(name: &str) -> String {
    format!("{FIELD}.{name}")
}

/// Resolves `options` (the map as pasted from Celery).
pub(crate) fn resolve(options: &BTreeMap<String, Value>) -> Result<TransportOptions, ConfigError> {
    let mut t = TransportOptions::default();
    for (name, v) in options {
        match name.as_str() {
            "global_keyprefix" => t.global_keyprefix = transport_option::string(&field(name), v)?,
            "sep" => {
                t.sep = transport_option::string(&field(name), v)?;
                if t.sep.is_empty() {
                    return Err(ConfigError::new(
                        field(name),
                        "must not be empty (priority keys would collide with queue names)",
                    ));
                }
            }
            "priority_steps" => {
                let Value::Array(items) = v else {
                    return Err(ConfigError::new(field(name), "must be a list of integers"));
                };
                let mut steps = Vec::with_capacity(items.len());
                for item in items {
                    let step = item
                        .as_u64()
                        .and_then(|s| u32::try_from(s).ok())
                        .filter(|&s| s <= MAX_PRIORITY_STEP)
                        .ok_or_else(|| {
                            ConfigError::new(
                                field(name),
                                format!("{item} is not an integer from 0 to {MAX_PRIORITY_STEP}"),
                            )
                        })?;
                    steps.push(step);
                }
                t.priority_steps = steps;
            }
            "fanout_prefix" => {
                t.fanout_prefix = match v {
                    Value::String(s) if !s.is_empty() => {
                        if format_db(s, 0).is_none() {
                            return Err(ConfigError::new(
                                field(name),
                                "has a {...} field other than {db} (kombu formats it with \
                                 str.format(db=...); write {{ for a brace)",
                            ));
                        }
                        FanoutPrefix::Custom(s.clone())
                    }
                    Value::String(_) => FanoutPrefix::Off,
                    Value::Bool(_) | Value::Number(_) | Value::Null => {
                        if transport_option::truthy(v) {
                            FanoutPrefix::Default
                        } else {
                            FanoutPrefix::Off
                        }
                    }
                    _ => {
                        return Err(ConfigError::new(
                            field(name),
                            "must be true, false or a prefix string such as \"/{db}.\"",
                        ));
                    }
                }
            }
            "fanout_patterns" => t.fanout_patterns = transport_option::boolean(&field(name), v)?,
            "unacked_key" => {
                t.unacked_key = transport_option::string(&field(name), v)?;
                if t.unacked_key.is_empty() {
                    return Err(ConfigError::new(field(name), "must not be empty"));
                }
            }
            "ack_emulation" => t.ack_emulation = transport_option::boolean(&field(name), v)?,
            "visibility_timeout" => {
                let secs = v
                    .as_f64()
                    .filter(|s| s.is_finite() && *s > 0.0 && *s <= 366.0 * 86_400.0)
                    .ok_or_else(|| {
                        ConfigError::new(
                            field(name),
                            "must be a number of seconds, above 0 and at most a year",
                        )
                    })?;
                t.visibility_timeout = Duration::from_secs_f64(secs);
            }
            "master_name" => {
                let m = transport_option::string(&field(name), v)?;
                if m.is_empty() {
                    return Err(ConfigError::new(field(name), "must not be empty"));
                }
                t.master_name = Some(m);
            }
            "sentinel_fanout_compat" => {
                t.sentinel_fanout_compat = transport_option::boolean(&field(name), v)?
            }
            "sentinel_kwargs" => {
                let Value::Object(kwargs) = v else {
                    if v.is_null() {
                        continue;
                    }
                    return Err(ConfigError::new(
                        field(name),
                        "must be a map of redis-py connection keywords (password, username, ...)",
                    ));
                };
                let mut ssl = false;
                let mut files = crate::config::TlsConfig::default();
                let mut ssl_keys = Vec::new();
                for (k, kv) in kwargs {
                    let f = format!("{}.{k}", field(name));
                    let path = |kv: &Value| match kv {
                        Value::String(p) if !p.is_empty() => Ok(Some(p.into())),
                        Value::Null => Ok(None),
                        _ => Err(ConfigError::new(f.clone(), "must be a file path")),
                    };
                    match k.as_str() {
                        // redis-py's `Redis(ssl=True, ssl_ca_certs=..., ...)` for the Sentinels.
                        "ssl" => ssl = transport_option::boolean(&f, kv)?,
                        "ssl_ca_certs" => files.ca_file = path(kv)?,
                        "ssl_certfile" => files.client_cert_file = path(kv)?,
                        "ssl_keyfile" => files.client_key_file = path(kv)?,
                        "ssl_cert_reqs" | "ssl_check_hostname" => {
                            // celery-scale always verifies the certificate and its name.
                            let verifies = match kv {
                                Value::String(r) => {
                                    matches!(r.as_str(), "required" | "CERT_REQUIRED")
                                }
                                Value::Null => true,
                                v => transport_option::truthy(v),
                            };
                            if !verifies {
                                t.ignored.push(format!("sentinel_kwargs.{k}"));
                            }
                        }
                        _ => {}
                    }
                    if matches!(
                        k.as_str(),
                        "ssl"
                            | "ssl_ca_certs"
                            | "ssl_certfile"
                            | "ssl_keyfile"
                            | "ssl_cert_reqs"
                            | "ssl_check_hostname"
                    ) {
                        ssl_keys.push(k.clone());
                        continue;
                    }
                    match k.as_str() {
                        "password" if !kv.is_null() => {
                            t.sentinel_password =
                                Some(transport_option::string(&field(name), kv).map_err(|_| {
                                    ConfigError::new(f.clone(), "must be a string")
                                })?);
                        }
                        "username" if !kv.is_null() => {
                            t.sentinel_username =
                                Some(transport_option::string(&field(name), kv).map_err(|_| {
                                    ConfigError::new(f.clone(), "must be a string")
                                })?);
                        }
                        "password" | "username" => {}
                        k if IGNORED_SENTINEL_KWARGS.contains(&k) => {
                            t.ignored.push(format!("sentinel_kwargs.{k}"));
                        }
                        _ => {
                            return Err(ConfigError::new(
                                f,
                                "is not supported (password, username, the socket_* keywords, \
                                 ssl, ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs \
                                 and ssl_check_hostname are)",
                            ));
                        }
                    }
                }
                if files.client_cert_file.is_some() != files.client_key_file.is_some() {
                    return Err(ConfigError::new(
                        format!("{}.ssl_keyfile", field(name)),
                        "ssl_certfile and ssl_keyfile go together",
                    ));
                }
                if ssl {
                    t.sentinel_tls = Some(files);
                } else {
                    // redis-py reads the ssl_* keywords only with ssl=True.
                    t.ignored.extend(
                        ssl_keys
                            .iter()
                            .map(|k| format!("sentinel_kwargs.{k} (ssl is off)")),
                    );
                }
            }
            n if IGNORED_OPTIONS.contains(&n) => t.ignored.push(n.to_string()),
            n => {
                return Err(ConfigError::new(
                    field(n),
                    format!(
                        "is not a transport option of kombu's Redis transport (known: {}, and \
                         the ignored {})",
                        HONOURED_OPTIONS.join(", "),
                        IGNORED_OPTIONS.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts(v: Value) -> Result<TransportOptions, ConfigError> {
        let map: BTreeMap<String, Value> = serde_json::from_value(v).unwrap();
        resolve(&map)
    }

    #[test]
    fn fanout_prefix_as_kombu() {
        assert_eq!(opts(json!({})).unwrap().fanout_prefix.for_db(3), "/3.");
        assert_eq!(
            opts(json!({"fanout_prefix": true}))
                .unwrap()
                .fanout_prefix
                .for_db(3),
            "/3."
        );
        assert_eq!(
            opts(json!({"fanout_prefix": false}))
                .unwrap()
                .fanout_prefix
                .for_db(3),
            ""
        );
        assert_eq!(
            opts(json!({"fanout_prefix": ""}))
                .unwrap()
                .fanout_prefix
                .for_db(3),
            ""
        );
        let custom = opts(json!({"fanout_prefix": "/x{db}.{{y}}"})).unwrap();
        assert_eq!(custom.fanout_prefix.for_db(7), "/x7.{y}");
        assert_eq!(
            opts(json!({"fanout_prefix": "/acme."}))
                .unwrap()
                .fanout_prefix
                .for_db(7),
            "/acme."
        );
        let e = opts(json!({"fanout_prefix": "/{host}."})).unwrap_err();
        assert_eq!(e.field, "broker_transport_options.fanout_prefix");
    }

    #[test]
    fn honoured_ignored_and_unknown() {
        let t = opts(json!({
            "global_keyprefix": "acme:", "priority_steps": [0, 5], "sep": ":",
            "fanout_patterns": false, "unacked_key": "held", "ack_emulation": false,
            "visibility_timeout": 43200, "master_name": "mymaster",
            "sentinel_kwargs": {"password": "s3", "socket_timeout": 0.5},
            "queue_order_strategy": "priority", "socket_timeout": 5,
        }))
        .unwrap();
        assert_eq!(t.global_keyprefix, "acme:");
        assert_eq!(t.priority_steps, [0, 5]);
        assert!(!t.fanout_patterns && !t.ack_emulation);
        assert_eq!(t.unacked_key, "held");
        assert_eq!(t.visibility_timeout, Duration::from_secs(43200));
        assert_eq!(t.master_name.as_deref(), Some("mymaster"));
        assert_eq!(t.sentinel_password.as_deref(), Some("s3"));
        assert_eq!(
            t.ignored,
            [
                "queue_order_strategy",
                "sentinel_kwargs.socket_timeout",
                "socket_timeout"
            ]
        );
        let e = opts(json!({"visiblity_timeout": 10})).unwrap_err();
        assert_eq!(e.field, "broker_transport_options.visiblity_timeout");
        let e = opts(json!({"sentinel_kwargs": {"ssl_ciphers": "x"}})).unwrap_err();
        assert_eq!(
            e.field,
            "broker_transport_options.sentinel_kwargs.ssl_ciphers"
        );
        let t = opts(json!({"sentinel_kwargs": {"ssl": true, "ssl_ca_certs": "/ca.pem"}})).unwrap();
        let tls = t.sentinel_tls.expect("TLS to the Sentinels");
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        let t = opts(json!({"sentinel_kwargs": {"ssl_ca_certs": "/ca.pem"}})).unwrap();
        assert!(
            t.sentinel_tls.is_none(),
            "redis-py ignores ssl_* without ssl=True"
        );
        assert_eq!(t.ignored, ["sentinel_kwargs.ssl_ca_certs (ssl is off)"]);
        let e =
            opts(json!({"sentinel_kwargs": {"ssl": true, "ssl_certfile": "/c.pem"}})).unwrap_err();
        assert_eq!(
            e.field,
            "broker_transport_options.sentinel_kwargs.ssl_keyfile"
        );
        assert!(opts(json!({"priority_steps": [0, 300]})).is_err());
        assert!(opts(json!({"visibility_timeout": -1})).is_err());
        assert!(opts(json!({"fanout_patterns": "yes"})).is_err());
    }
}
