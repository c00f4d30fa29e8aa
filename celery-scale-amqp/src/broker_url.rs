//! Celery's `broker_url` for RabbitMQ, read as kombu 5 reads it (`kombu/connection.py`,
//! `kombu/utils/url.py`, `kombu/transport/pyamqp.py`): the schemes, the defaults, the query
//! options and the `;`-separated failover list with what each alternate inherits.

use std::fmt;
use std::time::Duration;

use celery_scale_core::{ConfigError, redact_url};
use lapin::uri::{
    AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo, SASLMechanism,
};

/// kombu's defaults (`pyamqp.Transport.default_connection_params`, `Connection.virtual_host`).
const DEFAULT_HOST: &str = "localhost";
const DEFAULT_USER: &str = "guest";
const DEFAULT_PASSWORD: &str = "guest";
const DEFAULT_VHOST: &str = "/";
const DEFAULT_PORT: u16 = 5672;
const DEFAULT_TLS_PORT: u16 = 5671;

/// The longest `connect_timeout` accepted from the URL or the transport options.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(3600);

/// One broker of a (possibly one-entry) failover list, with every default filled in as kombu
/// fills it. `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// The scheme as written (`amqp`, `amqps`, `pyamqp`, `librabbitmq`), lowercased.
    pub(crate) scheme: String,
    pub(crate) tls: bool,
    /// The host name or address (an IPv6 address without brackets).
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    pub(crate) password: String,
    pub(crate) vhost: String,
    /// The AMQP heartbeat asked for (seconds, 0: none); `None`: the source's default.
    pub(crate) heartbeat: Option<u16>,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) login_method: SASLMechanism,
}

impl BrokerAddress {
    /// The scheme as written, lowercased (`pyamqp` and `librabbitmq` read as `amqp`).
    pub fn scheme(&self) -> &str {
        &self.scheme
    }
    /// Whether the connection uses TLS (`amqps://`, or any non-empty `ssl=` query value, as
    /// kombu reads it).
    pub fn tls(&self) -> bool {
        self.tls
    }
    /// The host (`localhost` when the URL has none; an IPv6 address without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }
    /// The port (5672, or 5671 with TLS, when the URL has none).
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The user (`guest` when the URL has none).
    pub fn user(&self) -> &str {
        &self.user
    }
    /// The vhost, decoded (`/` when the URL has none).
    pub fn vhost(&self) -> &str {
        &self.vhost
    }
    /// The AMQP heartbeat the URL or transport options ask for, in whole seconds (0: off).
    pub fn heartbeat(&self) -> Option<u16> {
        self.heartbeat
    }
    /// The connection deadline the URL or transport options ask for.
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.connect_timeout
    }
    /// The SASL mechanism (`PLAIN` unless `login_method` says otherwise).
    pub fn login_method(&self) -> &'static str {
        self.login_method.name()
    }

    /// The password, for the client library only.
    pub(crate) fn password(&self) -> &str {
        &self.password
    }

    /// The host as a URL writes it (IPv6 in brackets).
    pub(crate) fn url_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    /// What lapin connects with.
    pub(crate) fn to_uri(&self, default_heartbeat: u16) -> AMQPUri {
        AMQPUri {
            scheme: if self.tls {
                AMQPScheme::AMQPS
            } else {
                AMQPScheme::AMQP
            },
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo {
                    username: self.user.clone(),
                    password: self.password.clone(),
                },
                host: self.url_host(),
                port: self.port,
            },
            vhost: self.vhost.clone(),
            query: AMQPQueryString {
                heartbeat: Some(self.heartbeat.unwrap_or(default_heartbeat)),
                auth_mechanism: Some(self.login_method),
                ..AMQPQueryString::default()
            },
        }
    }
}

impl fmt::Display for BrokerAddress {
    /// `scheme://user:***@host:port/vhost` (the vhost percent-encoded).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}:***@{}:{}/{}",
            if self.tls { "amqps" } else { "amqp" },
            percent_encode(&self.user),
            self.url_host(),
            self.port,
            percent_encode(&self.vhost)
        )
    }
}

impl fmt::Debug for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

/// RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`): the only ones left unencoded.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Encodes every byte but RFC 3986's unreserved characters.
pub(crate) fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// Python's `urllib.parse.unquote` (a `%` without two hex digits stays as it is), except that
/// bytes that are not UTF-8 are refused (Python would put U+FFFD in their place, which no broker
/// knows either).
pub(crate) fn unquote(s: &str) -> Option<String> {
    let decoded = percent_encoding::percent_decode_str(s).decode_utf8().ok()?;
    Some(decoded.into_owned())
}

/// The query options kombu's `Connection` takes from an AMQP URL (anything else makes it raise
/// `TypeError`), as written.
#[derive(Debug, Clone, Default)]
struct Query {
    ssl: Option<String>,
    heartbeat: Option<String>,
    connect_timeout: Option<String>,
    login_method: Option<String>,
}

/// One entry of the list before defaults and inheritance.
#[derive(Debug, Clone, Default)]
struct Entry {
    /// `None` for a bare `host[:port]` alternate.
    scheme: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password: Option<String>,
    vhost: Option<String>,
    query: Query,
}

fn url_error(entry: &str, position: Option<usize>, rule: impl fmt::Display) -> ConfigError {
    let which = match position {
        Some(i) => format!(" (entry {} of the failover list)", i + 1),
        None => String::new(),
    };
    ConfigError::new("url", format!("{}{which}: {rule}", redact_url(entry)))
}

/// Python's `urlsplit` host and port of a `netloc` host part (`host`, `host:port`, `[v6]:port`).
fn host_port(
    hostinfo: &str,
    fail: &dyn Fn(String) -> ConfigError,
) -> Result<(Option<String>, Option<u16>), ConfigError> {
    let (host, port) = if let Some(rest) = hostinfo.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return Err(fail("is not a valid IPv6 URL (no closing \"]\")".into()));
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(fail(format!("[{v6}] is not an IPv6 address")));
        }
        let port = after.split_once(':').map(|(_, p)| p).unwrap_or("");
        (v6.to_string(), port)
    } else {
        if hostinfo.contains(['[', ']']) {
            return Err(fail("is not a valid IPv6 URL".into()));
        }
        match hostinfo.split_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (hostinfo.to_string(), ""),
        }
    };
    let port = if port.is_empty() {
        None
    } else if port.bytes().all(|b| b.is_ascii_digit()) {
        match port.parse::<u32>().ok().and_then(|p| u16::try_from(p).ok()) {
            // Port 0 is no port to kombu (`port or default`).
            Some(0) => None,
            Some(p) => Some(p),
            None => return Err(fail(format!("port {port} is out of range 0-65535"))),
        }
    } else {
        return Err(fail(format!("port {port:?} is not a number")));
    };
    let host = unquote(&host.to_lowercase())
        .ok_or_else(|| fail("the host is not valid percent-encoded UTF-8".into()))?;
    Ok(((!host.is_empty()).then_some(host), port))
}

/// Parses one entry (`scheme://...` or a bare `host[:port]`) as kombu's `url_to_parts` does.
fn parse_entry(raw: &str, position: Option<usize>) -> Result<Entry, ConfigError> {
    let fail = |rule: String| url_error(raw, position, rule);
    let Some(sep) = raw.find("://") else {
        // A bare alternate: kombu's `switch` takes it as the hostname.
        if raw.contains(['/', '?', '#', '@']) {
            return Err(fail(
                "is not a URL (scheme://...) nor a host[:port] failover alternate".into(),
            ));
        }
        let (host, port) = host_port(raw, &fail)?;
        return Ok(Entry {
            host,
            port,
            ..Entry::default()
        });
    };
    let scheme = raw[..sep].to_ascii_lowercase();
    match scheme.as_str() {
        "amqp" | "amqps" | "pyamqp" | "librabbitmq" => {}
        "redis" | "rediss" | "sentinel" | "redis+socket" | "unix" => {
            return Err(fail(format!(
                "is a Redis URL ({scheme}://): use a Redis source (kind = \"redis\")"
            )));
        }
        _ => {
            return Err(fail(format!(
                "scheme {scheme:?} is not one of kombu's RabbitMQ transports: \
                 amqp, amqps, pyamqp, librabbitmq"
            )));
        }
    }
    let rest = &raw[sep + 3..];
    let (rest, _fragment) = rest.split_once('#').unwrap_or((rest, ""));
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (netloc, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let mut entry = Entry {
        scheme: Some(scheme),
        ..Entry::default()
    };
    let hostinfo = match netloc.rsplit_once('@') {
        Some((userinfo, hostinfo)) => {
            let decode = |s: &str, what: &str| {
                unquote(s)
                    .ok_or_else(|| fail(format!("the {what} is not valid percent-encoded UTF-8")))
            };
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            entry.user = Some(decode(user, "user")?).filter(|u| !u.is_empty());
            entry.password = password
                .map(|p| decode(p, "password"))
                .transpose()?
                .filter(|p| !p.is_empty());
            hostinfo
        }
        None => netloc,
    };
    (entry.host, entry.port) = host_port(hostinfo, &fail)?;
    let path = path.strip_prefix('/').unwrap_or(path);
    entry.vhost = Some(
        unquote(path).ok_or_else(|| fail("the vhost is not valid percent-encoded UTF-8".into()))?,
    )
    .filter(|v| !v.is_empty());
    // `parse_qsl`: `&`-separated, `+` is a space, pairs without `=` or with an empty value are
    // dropped, the last of a repeated key wins.
    for pair in query.split('&') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        let decode = |s: &str| {
            unquote(&s.replace('+', " "))
                .ok_or_else(|| fail("the query is not valid percent-encoded UTF-8".into()))
        };
        let (k, v) = (decode(k)?, decode(v)?);
        if v.is_empty() {
            continue;
        }
        let slot = match k.as_str() {
            "ssl" => &mut entry.query.ssl,
            "heartbeat" => &mut entry.query.heartbeat,
            "connect_timeout" => &mut entry.query.connect_timeout,
            "login_method" => &mut entry.query.login_method,
            // Deprecated and unused by py-amqp.
            "insist" => continue,
            k if k.starts_with("ssl_") => {
                return Err(fail(format!(
                    "query option {k:?}: kombu passes ssl_* options to py-amqp, which refuses \
                     them (TypeError at connect); give certificates in [tls] (Celery: \
                     broker_use_ssl)"
                )));
            }
            "hostname" | "port" | "userid" | "password" | "virtual_host" | "transport" => {
                return Err(fail(format!(
                    "query option {k:?} repeats a part of the URL (kombu raises TypeError)"
                )));
            }
            other => {
                return Err(fail(format!(
                    "unknown query option {other:?} (kombu's AMQP URLs take ssl, heartbeat, \
                     connect_timeout, login_method and insist)"
                )));
            }
        };
        *slot = Some(v);
    }
    Ok(entry)
}

/// Seconds as kombu takes them (`float(...)`), checked.
fn seconds(
    value: &str,
    what: &str,
    fail: &dyn Fn(String) -> ConfigError,
) -> Result<f64, ConfigError> {
    match value.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(s),
        _ => Err(fail(format!(
            "{what}={value:?} is not a number of seconds (0 or more)"
        ))),
    }
}

/// A heartbeat in seconds as lapin takes it: whole seconds, rounded up (0: off).
pub(crate) fn heartbeat_secs(s: f64) -> u16 {
    let up = s.ceil();
    if up >= f64::from(u16::MAX) {
        u16::MAX
    } else {
        // In 0..u16::MAX and whole.
        up as u16
    }
}

/// A connect timeout in seconds, checked (above zero, at most an hour).
pub(crate) fn connect_timeout(s: f64) -> Option<Duration> {
    let d = Duration::try_from_secs_f64(s).ok()?;
    (!d.is_zero() && d <= MAX_CONNECT_TIMEOUT).then_some(d)
}

/// py-amqp's `login_method`s that lapin speaks.
pub(crate) fn login_method(name: &str) -> Result<SASLMechanism, String> {
    match name {
        "PLAIN" => Ok(SASLMechanism::Plain),
        "AMQPLAIN" => Ok(SASLMechanism::AMQPlain),
        "EXTERNAL" => Ok(SASLMechanism::External),
        "GSSAPI" => Err("GSSAPI (Kerberos) is not supported by celery-scale".into()),
        other => Err(format!(
            "{other:?} is not a login method py-amqp knows (PLAIN, AMQPLAIN, EXTERNAL, GSSAPI)"
        )),
    }
}

/// Whether kombu turns TLS on for an `ssl` query value: any non-empty text (the value is
/// never parsed as a boolean, so `ssl=false` turns it on too).
fn ssl_on(value: Option<&String>) -> bool {
    value.is_some_and(|v| !v.is_empty())
}

/// Parses Celery's `broker_url` (a single URL or a `;`-separated failover list) into the
/// brokers kombu would try, in order, with kombu's defaults and what each alternate inherits:
///
/// - an alternate URL has its own scheme, host, user and password (`guest` when it names
///   none); its vhost and port are those of the entry before it when it names none, and its
///   query options those of the first URL when it has none of its own;
/// - a bare `host[:port]` alternate takes everything else from the first URL.
pub(crate) fn parse_broker_url(raw: &str) -> Result<Vec<BrokerAddress>, ConfigError> {
    if raw.trim().is_empty() {
        return Err(ConfigError::new("url", "must not be empty"));
    }
    let parts: Vec<&str> = raw.split(';').collect();
    let list = parts.len() > 1;
    let mut entries = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let part = part.trim();
        let position = list.then_some(i);
        if part.is_empty() {
            return Err(url_error(raw, position, "is empty"));
        }
        entries.push((part, parse_entry(part, position)?));
    }
    let (_, first) = &entries[0];
    let first = first.clone();
    let mut out: Vec<BrokerAddress> = Vec::with_capacity(entries.len());
    for (i, (part, e)) in entries.iter().enumerate() {
        let fail = |rule: String| url_error(part, list.then_some(i), rule);
        let bare = e.scheme.is_none();
        let scheme = e
            .scheme
            .clone()
            .or_else(|| first.scheme.clone())
            .unwrap_or_else(|| "amqp".into());
        let q =
            |own: &Option<String>, first: &Option<String>| own.clone().or_else(|| first.clone());
        let ssl = q(&e.query.ssl, &first.query.ssl);
        let tls = scheme == "amqps" || ssl_on(ssl.as_ref());
        if tls && scheme == "librabbitmq" {
            return Err(fail(
                "librabbitmq does not support TLS (kombu raises NotImplementedError); use amqps://"
                    .into(),
            ));
        }
        let (user, password, vhost, port) = if bare {
            (
                first.user.clone(),
                first.password.clone(),
                first.vhost.clone(),
                e.port.or(first.port),
            )
        } else {
            (e.user.clone(), e.password.clone(), e.vhost.clone(), e.port)
        };
        let prev = out.last();
        let port = port.or(prev.map(|p| p.port)).unwrap_or(if tls {
            DEFAULT_TLS_PORT
        } else {
            DEFAULT_PORT
        });
        let vhost = vhost
            .or(prev.map(|p| p.vhost.clone()))
            .unwrap_or_else(|| DEFAULT_VHOST.into());
        let heartbeat = q(&e.query.heartbeat, &first.query.heartbeat)
            .map(|v| seconds(&v, "heartbeat", &fail).map(heartbeat_secs))
            .transpose()?;
        let connect_timeout = q(&e.query.connect_timeout, &first.query.connect_timeout)
            .map(|v| {
                let s = seconds(&v, "connect_timeout", &fail)?;
                self::connect_timeout(s).ok_or_else(|| {
                    fail(format!(
                        "connect_timeout={v:?} must be above 0 and at most 3600 seconds"
                    ))
                })
            })
            .transpose()?;
        let login_method = q(&e.query.login_method, &first.query.login_method)
            .map(|m| login_method(&m).map_err(|r| fail(format!("login_method: {r}"))))
            .transpose()?
            .unwrap_or(SASLMechanism::Plain);
        out.push(BrokerAddress {
            scheme,
            tls,
            host: e.host.clone().unwrap_or_else(|| DEFAULT_HOST.into()),
            port,
            user: user.unwrap_or_else(|| DEFAULT_USER.into()),
            password: password.unwrap_or_else(|| DEFAULT_PASSWORD.into()),
            vhost,
            heartbeat,
            connect_timeout,
            login_method,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(url: &str) -> BrokerAddress {
        let mut list = parse_broker_url(url).unwrap();
        assert_eq!(list.len(), 1, "{url}");
        list.remove(0)
    }

    fn parts(b: &BrokerAddress) -> (&str, u16, &str, &str, &str, bool) {
        (&b.host, b.port, &b.user, &b.password, &b.vhost, b.tls)
    }

    #[test]
    fn defaults_as_kombu_fills_them() {
        assert_eq!(
            parts(&one("amqp://")),
            ("localhost", 5672, "guest", "guest", "/", false)
        );
        assert_eq!(
            parts(&one("amqps://h")),
            ("h", 5671, "guest", "guest", "/", true)
        );
        assert_eq!(parts(&one("amqp://bob@h")).2, "bob");
        assert_eq!(parts(&one("amqp://bob@h")).3, "guest");
        assert_eq!(parts(&one("amqp://:pw@h")).2, "guest");
        assert_eq!(parts(&one("amqp://:pw@h")).3, "pw");
        assert_eq!(one("amqp://h:0/").port, 5672);
        assert_eq!(
            parts(&one("pyamqp://u:p@H:1234/v")),
            ("h", 1234, "u", "p", "v", false)
        );
        assert_eq!(one("librabbitmq://h").scheme, "librabbitmq");
        assert_eq!(one("AMQP://h").scheme, "amqp");
        assert_eq!(one("amqp://us%40er:p%3Aw@h").user, "us@er");
        assert_eq!(one("amqp://us%40er:p%3Aw@h").password, "p:w");
        assert_eq!(one("amqp://[::1]:5673/").host, "::1");
        assert_eq!(one("amqp://[::1]:5673/").to_uri(10).authority.host, "[::1]");
    }

    #[test]
    fn vhosts_as_kombu_reads_the_path() {
        for (url, vhost) in [
            ("amqp://host", "/"),
            ("amqp://host/", "/"),
            ("amqp://host//", "/"),
            ("amqp://host/%2f", "/"),
            ("amqp://host/%2F", "/"),
            ("amqp://host//foo", "/foo"),
            ("amqp://host/a/b", "a/b"),
            ("amqp://host/prod?heartbeat=5", "prod"),
            ("amqp://host?heartbeat=5", "/"),
            ("amqp://host/v%C3%BC", "vü"),
        ] {
            assert_eq!(one(url).vhost, vhost, "{url}");
        }
    }

    #[test]
    fn query_options_as_kombu_takes_them() {
        let b = one("amqp://h?heartbeat=30&connect_timeout=2.5&login_method=AMQPLAIN&insist=1");
        assert_eq!(b.heartbeat, Some(30));
        assert_eq!(b.connect_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(b.login_method, SASLMechanism::AMQPlain);
        assert_eq!(one("amqp://h?heartbeat=0.5").heartbeat, Some(1));
        assert_eq!(one("amqp://h?heartbeat=0").heartbeat, Some(0));
        // Any non-empty ssl value turns TLS on (and the TLS port), as in kombu; blank is dropped.
        assert_eq!(
            (
                one("amqp://h?ssl=false").tls,
                one("amqp://h?ssl=false").port
            ),
            (true, 5671)
        );
        assert!(!one("amqp://h?ssl=").tls);
        assert!(one("amqp://h?ssl=1").tls);
        let err = |u: &str| parse_broker_url(u).unwrap_err().to_string();
        assert!(
            err("amqp://h?foo=1").contains("\"foo\""),
            "{}",
            err("amqp://h?foo=1")
        );
        assert!(err("amqp://h?virtual_host=x").contains("virtual_host"));
        assert!(err("amqp://h?ssl_cert_reqs=required").contains("ssl_cert_reqs"));
        assert!(err("amqp://h?heartbeat=abc").contains("heartbeat"));
        assert!(err("amqp://h?login_method=GSSAPI").contains("GSSAPI"));
        assert!(err("amqp://h?connect_timeout=0").contains("connect_timeout"));
        assert!(err("librabbitmq://h?ssl=1").contains("librabbitmq"));
        assert!(err("redis://h").contains("Redis"));
        assert!(err("http://h").contains("\"http\""));
        assert!(err("amqp://h:99999").contains("out of range"));
        assert!(err("amqp://h:x").contains("not a number"));
        assert!(err("amqp://[::1/").contains("IPv6"));
    }

    #[test]
    fn failover_lists_inherit_as_kombu_switch_does() {
        let list = parse_broker_url("amqp://u:p@h1:5673/v?heartbeat=7;amqp://h2").unwrap();
        assert_eq!(parts(&list[1]), ("h2", 5673, "guest", "guest", "v", false));
        assert_eq!(list[1].heartbeat, Some(7));
        let list = parse_broker_url("amqp://u:p@h1/v;h2").unwrap();
        assert_eq!(parts(&list[1]), ("h2", 5672, "u", "p", "v", false));
        let list = parse_broker_url("amqps://u:p@h1/v;amqp://h2:1/w").unwrap();
        assert_eq!(parts(&list[0]), ("h1", 5671, "u", "p", "v", true));
        assert_eq!(parts(&list[1]), ("h2", 1, "guest", "guest", "w", false));
        let list = parse_broker_url("amqp://u:p@h1:5673/v;h2:5690").unwrap();
        assert_eq!(parts(&list[1]), ("h2", 5690, "u", "p", "v", false));
        let list = parse_broker_url("amqp://h1;pyamqp://x:y@h2//").unwrap();
        assert_eq!(parts(&list[1]), ("h2", 5672, "x", "y", "/", false));
        let e = parse_broker_url("amqp://u:hunter2@h1;;amqp://h2").unwrap_err();
        assert!(e.to_string().contains("entry 2"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn errors_and_display_never_show_the_password() {
        for url in [
            "amqp://u:hunter2@h:x/",
            "amqp://u:hunter2@h?foo=1",
            "amqp://u:hunter2@h1;amqp://u:hunter2@h2?bad=1",
            "ftp://u:hunter2@h",
        ] {
            let e = parse_broker_url(url).unwrap_err();
            assert_eq!(e.field, "url");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        let b = one("amqp://u:hunter2@h/v");
        assert_eq!(b.to_string(), "amqp://u:***@h:5672/v");
        assert!(!format!("{b:?}").contains("hunter2"));
    }

    #[test]
    fn percent_encoding_leaves_only_unreserved_characters() {
        assert_eq!(percent_encode("a[1] b/c%ü"), "a%5B1%5D%20b%2Fc%25%C3%BC");
        assert_eq!(percent_encode("/"), "%2F");
        assert_eq!(unquote("%zz%41").as_deref(), Some("%zzA"));
    }
}
