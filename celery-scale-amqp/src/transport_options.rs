//! Celery's `broker_transport_options` for RabbitMQ, read as kombu's pyamqp transport reads
//! them: `Transport.establish_connection` passes the whole map to py-amqp's `Connection` after
//! the URL's parameters (so a key there wins over the URL), `kombu/utils/amq_manager.py` reads
//! the `manager_*` keys for the management API, and `Connection._extract_failover_opts` reads the
//! retry keys.

use std::collections::BTreeMap;

use celery_scale_core::ConfigError;
use celery_scale_core::transport_option;
use serde_json::Value;

use crate::broker_url::{BrokerAddress, connect_timeout, heartbeat_secs, login_method};

/// The options that change where celery-scale connects or what it reads, and what each does.
pub const HONOURED: &[(&str, &str)] = &[
    (
        "virtual_host",
        "the vhost of every broker of the list (wins over the URL's, as in kombu)",
    ),
    ("userid", "the AMQP user (wins over the URL's)"),
    (
        "password",
        "the AMQP password (wins over the URL's; never shown)",
    ),
    (
        "host",
        "`host[:port]` of every broker of the list (wins over the URL's)",
    ),
    (
        "heartbeat",
        "the AMQP heartbeat in seconds (rounded up; 0: off)",
    ),
    (
        "connect_timeout",
        "the deadline of one connection attempt, in seconds",
    ),
    (
        "login_method",
        "the SASL mechanism: PLAIN, AMQPLAIN or EXTERNAL",
    ),
    (
        "ssl",
        "true/false: TLS on or off (the port stays the URL's or its scheme's default, as in kombu)",
    ),
    (
        "manager_hostname",
        "the management API's host when [management] has no url",
    ),
    (
        "manager_port",
        "the management API's port when [management] has no url",
    ),
    (
        "manager_userid",
        "the management API's user when [management] has no url",
    ),
    (
        "manager_password",
        "the management API's password when [management] has no url (never shown)",
    ),
];

/// The pyamqp options that do not change what exists or is counted: accepted, and ignored.
pub const IGNORED: &[(&str, &str)] = &[
    ("confirm_publish", "publisher confirms: publishing only"),
    (
        "max_retries",
        "kombu's connection retries (celery-scale retries every poll)",
    ),
    ("interval_start", "kombu's connection retry backoff"),
    ("interval_step", "kombu's connection retry backoff"),
    ("interval_max", "kombu's connection retry backoff"),
    (
        "connect_retries_timeout",
        "kombu's total connection retry time",
    ),
    (
        "client_properties",
        "properties the client shows the broker",
    ),
    ("channel_max", "a connection tuning limit"),
    ("frame_max", "a connection tuning limit"),
    ("locale", "the connection's locale"),
    (
        "read_timeout",
        "py-amqp socket timeout (celery-scale has its own `timeout`)",
    ),
    (
        "write_timeout",
        "py-amqp socket timeout (celery-scale has its own `timeout`)",
    ),
    ("socket_settings", "TCP socket options"),
];

/// Options of kombu's other transports (Redis, SQS), which the AMQP transport never reads:
/// Celery settings shared between environments often carry them, so they are accepted and
/// ignored.
const OTHER_TRANSPORTS: &[&str] = &[
    "visibility_timeout",
    "polling_interval",
    "global_keyprefix",
    "priority_steps",
    "sep",
    "fanout_prefix",
    "fanout_patterns",
    "unacked_key",
    "unacked_index_key",
    "unacked_mutex_key",
    "unacked_mutex_expire",
    "unacked_restore_limit",
    "ack_emulation",
    "queue_order_strategy",
    "max_connections",
    "health_check_interval",
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "socket_keepalive_options",
    "retry_on_timeout",
    "client_name",
    "master_name",
    "sentinel_kwargs",
    "min_other_sentinels",
    "region",
    "predefined_queues",
    "queue_name_prefix",
    "wait_time_seconds",
    "is_secure",
];

/// The management API settings kombu reads from the transport options (`manager_*`).
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct ManagerOptions {
    pub(crate) hostname: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) userid: Option<String>,
    pub(crate) password: Option<String>,
}

/// What the transport options say, checked.
#[derive(Clone, Default)]
pub(crate) struct Resolved {
    pub(crate) manager: ManagerOptions,
    /// The keys accepted and ignored, sorted, with why.
    pub(crate) ignored: Vec<(String, &'static str)>,
}

fn field(key: &str) -> String {
    format!("transport_options.{key}")
}

/// `host` or `host:port`, with an IPv6 address in brackets.
fn host_and_port(key: &str, s: &str) -> Result<(String, Option<u16>), ConfigError> {
    let bad = |rule: &str| ConfigError::new(field(key), format!("{s:?} {rule}"));
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("has no closing \"]\""))?;
        (v6, after.strip_prefix(':'))
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    let port = port
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("has a bad port"))
        })
        .transpose()?;
    Ok((host.to_string(), port))
}

/// Applies `options` to the brokers of the URL (a key wins over the URL, for every broker of
/// the list, as kombu's `dict(opts, **transport_options)` does) and returns the rest.
pub(crate) fn apply(
    options: &BTreeMap<String, Value>,
    brokers: &mut [BrokerAddress],
) -> Result<Resolved, ConfigError> {
    let mut resolved = Resolved::default();
    for (key, v) in options {
        match key.as_str() {
            "virtual_host" => {
                let vhost = transport_option::string(&field(key), v)?;
                brokers.iter_mut().for_each(|b| b.vhost = vhost.clone());
            }
            "userid" => {
                let user = transport_option::string(&field(key), v)?;
                brokers.iter_mut().for_each(|b| b.user = user.clone());
            }
            "password" => {
                let password = transport_option::string(&field(key), v)?;
                brokers
                    .iter_mut()
                    .for_each(|b| b.password = password.clone());
            }
            "host" => {
                let (host, port) = host_and_port(key, &transport_option::string(&field(key), v)?)?;
                for b in brokers.iter_mut() {
                    b.host = host.clone();
                    if let Some(p) = port {
                        b.port = p;
                    }
                }
            }
            "heartbeat" => {
                let s = heartbeat_secs(transport_option::seconds(&field(key), v)?);
                brokers.iter_mut().for_each(|b| b.heartbeat = Some(s));
            }
            "connect_timeout" => {
                let t = connect_timeout(transport_option::seconds(&field(key), v)?).ok_or_else(
                    || ConfigError::new(field(key), "must be above 0 and at most 3600 seconds"),
                )?;
                brokers.iter_mut().for_each(|b| b.connect_timeout = Some(t));
            }
            "login_method" => {
                let m = login_method(&transport_option::string(&field(key), v)?)
                    .map_err(|r| ConfigError::new(field(key), r))?;
                brokers.iter_mut().for_each(|b| b.login_method = m);
            }
            "ssl" => {
                let on = match v {
                    Value::Bool(on) => *on,
                    Value::Object(_) => {
                        return Err(ConfigError::new(
                            field(key),
                            "TLS settings (ca_certs, certfile, keyfile) go in [tls] here; \
                             use ssl = true or false in the transport options",
                        ));
                    }
                    _ => return Err(ConfigError::new(field(key), "must be true or false")),
                };
                brokers.iter_mut().for_each(|b| b.tls = on);
            }
            "manager_hostname" => {
                resolved.manager.hostname = Some(transport_option::string(&field(key), v)?)
            }
            "manager_userid" => {
                resolved.manager.userid = Some(transport_option::string(&field(key), v)?)
            }
            "manager_password" => {
                resolved.manager.password = Some(transport_option::string(&field(key), v)?)
            }
            "manager_port" => {
                let port = match v {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => s.parse().ok(),
                    _ => None,
                };
                resolved.manager.port = Some(
                    port.and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p != 0)
                        .ok_or_else(|| ConfigError::new(field(key), "must be a port (1-65535)"))?,
                );
            }
            k => {
                if let Some((_, why)) = IGNORED.iter().find(|(name, _)| *name == k) {
                    resolved.ignored.push((key.clone(), why));
                } else if OTHER_TRANSPORTS.contains(&k) {
                    resolved.ignored.push((
                        key.clone(),
                        "an option of kombu's Redis or SQS transport; the AMQP transport does not read it",
                    ));
                } else {
                    return Err(ConfigError::new(
                        field(key),
                        "is not a transport option of kombu's AMQP transport (honoured: \
                         virtual_host, userid, password, host, heartbeat, connect_timeout, \
                         login_method, ssl, manager_*; ignored: confirm_publish, max_retries, \
                         interval_*, ... see the README)",
                    ));
                }
            }
        }
    }
    Ok(resolved)
}

/// Whether the transport option `key`'s value is a secret (hidden by `Debug`).
pub(crate) fn is_secret(key: &str) -> bool {
    matches!(key, "password" | "manager_password")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker_url::parse_broker_url;
    use serde_json::json;

    fn options(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn honoured_options_win_over_the_url_for_every_broker() {
        let mut brokers = parse_broker_url("amqp://u:p@h1/v;amqp://h2:5673").unwrap();
        let r = apply(
            &options(json!({
                "virtual_host": "prod", "userid": "celery", "password": "pw",
                "heartbeat": 2.5, "connect_timeout": "4", "login_method": "AMQPLAIN",
                "ssl": true, "manager_port": 8080, "manager_hostname": "mon",
                "confirm_publish": true, "max_retries": 3, "visibility_timeout": 3600,
            })),
            &mut brokers,
        )
        .unwrap();
        for b in &brokers {
            assert_eq!(
                (b.vhost(), b.user(), b.password()),
                ("prod", "celery", "pw")
            );
            assert_eq!(b.heartbeat(), Some(3));
            assert_eq!(b.connect_timeout(), Some(std::time::Duration::from_secs(4)));
            assert_eq!(b.login_method(), "AMQPLAIN");
            assert!(b.tls());
        }
        // The port is not moved by `ssl` (kombu picks it from the URL's scheme).
        assert_eq!((brokers[0].port(), brokers[1].port()), (5672, 5673));
        assert_eq!(r.manager.port, Some(8080));
        assert_eq!(r.manager.hostname.as_deref(), Some("mon"));
        let ignored: Vec<&str> = r.ignored.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            ignored,
            ["confirm_publish", "max_retries", "visibility_timeout"]
        );

        let mut brokers = parse_broker_url("amqp://h1").unwrap();
        apply(&options(json!({"host": "[::1]:5680"})), &mut brokers).unwrap();
        assert_eq!((brokers[0].host(), brokers[0].port()), ("::1", 5680));
    }

    #[test]
    fn unknown_and_bad_options_name_the_key() {
        let err = |v: Value| {
            let mut brokers = parse_broker_url("amqp://h").unwrap();
            apply(&options(v), &mut brokers)
                .map(|_| ())
                .unwrap_err()
                .field
        };
        assert_eq!(
            err(json!({"confirm_publsh": true})),
            "transport_options.confirm_publsh"
        );
        assert_eq!(
            err(json!({"heartbeat": "often"})),
            "transport_options.heartbeat"
        );
        assert_eq!(err(json!({"heartbeat": -1})), "transport_options.heartbeat");
        assert_eq!(
            err(json!({"virtual_host": 3})),
            "transport_options.virtual_host"
        );
        assert_eq!(
            err(json!({"ssl": {"ca_certs": "x"}})),
            "transport_options.ssl"
        );
        assert_eq!(
            err(json!({"manager_port": 70000})),
            "transport_options.manager_port"
        );
        assert_eq!(
            err(json!({"login_method": "GSSAPI"})),
            "transport_options.login_method"
        );
        assert_eq!(err(json!({"host": ":5672"})), "transport_options.host");
        assert_eq!(
            err(json!({"connect_timeout": 0})),
            "transport_options.connect_timeout"
        );
    }
}
