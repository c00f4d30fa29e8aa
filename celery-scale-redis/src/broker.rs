//! Celery's `broker_url` for the Redis transports, read as kombu reads it.
//!
//! kombu (5.7, `kombu/connection.py`, `kombu/utils/url.py`, `kombu/transport/redis.py`):
//! - `a;b;c` is a failover list: `a` first, the next on a connection failure (Celery's
//!   `broker_failover_strategy`, round robin by default).
//! - `redis://` and `rediss://` are parsed with HTTP URL rules (`url_to_parts`): user and
//!   password percent-decoded, host `127.0.0.1` and port `6379` by default, the database is the
//!   path (`/` or none: 0; anything else must be an integer).
//! - A query parameter starting with `ssl_` goes into kombu's `ssl` options and turns TLS on,
//!   even for `redis://`; any other query parameter is a keyword of `kombu.Connection` (most are
//!   a `TypeError` in kombu).
//! - `redis+socket:///path?virtual_host=N` is a unix socket; the database is the `virtual_host`
//!   query parameter (kombu ignores `db=` there).
//! - `sentinel://h1:26379;sentinel://h2:26379` lists Sentinels (port 26379 by default); the
//!   user, password and database of the *first* entry are the master's; the Sentinels' own
//!   password comes from the `sentinel_kwargs` transport option.
//!
//! `unix:///path?db=N&pass=...` and `redis+unix://...` (the redis crate's own socket forms) are
//! accepted too. No error message here shows a password (nor any part of the URL that could hold
//! one).

use std::path::PathBuf;

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

/// kombu's default Redis port.
const REDIS_PORT: u16 = 6379;
/// kombu's default Sentinel port (`SentinelTransport.default_port`).
const SENTINEL_PORT: u16 = 26379;

/// One Redis server of a broker URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub addr: Addr,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Where a [`Node`] listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Addr {
    Tcp { host: String, port: u16 },
    Tls { host: String, port: u16 },
    Unix(PathBuf),
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("addr", &self.addr)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Node {
    /// The redis crate's connection info (TLS certificates are added by the caller).
    pub fn connection_info(&self) -> redis::RedisResult<ConnectionInfo> {
        let addr = match &self.addr {
            Addr::Tcp { host, port } => ConnectionAddr::Tcp(host.clone(), *port),
            Addr::Tls { host, port } => ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: false,
                tls_params: None,
            },
            Addr::Unix(path) => ConnectionAddr::Unix(path.clone()),
        };
        let mut redis = RedisConnectionInfo::default().set_db(self.db);
        if let Some(u) = &self.username {
            redis = redis.set_username(u);
        }
        if let Some(p) = &self.password {
            redis = redis.set_password(p);
        }
        Ok(addr.into_connection_info()?.set_redis_settings(redis))
    }

    /// Host and port (or socket path), for logs.
    pub fn shown(&self) -> String {
        match &self.addr {
            Addr::Tcp { host, port } | Addr::Tls { host, port } => format!("{host}:{port}"),
            Addr::Unix(path) => path.display().to_string(),
        }
    }
}

/// kombu's `ssl_*` query parameters of the URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UrlTls {
    /// `ssl_ca_certs`: the CA file.
    pub ca_certs: Option<PathBuf>,
    /// `ssl_certfile`: the client certificate.
    pub certfile: Option<PathBuf>,
    /// `ssl_keyfile`: the client key.
    pub keyfile: Option<PathBuf>,
    /// `ssl_cert_reqs` as given (`required`, `optional`, `none`, or the `CERT_*` names).
    pub cert_reqs: Option<String>,
    /// `ssl_check_hostname=false`.
    pub no_check_hostname: bool,
}

/// A broker URL as kombu reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Broker {
    /// One Redis server, or a failover list of them (tried in order, as kombu's round robin).
    Direct(Vec<Node>),
    /// Redis Sentinel: the Sentinels, and the master's database and credentials (from the first
    /// entry).
    Sentinel {
        sentinels: Vec<(String, u16)>,
        master: Node,
    },
}

/// The parsed URL: where to connect, and its `ssl_*` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BrokerUrl {
    pub broker: Broker,
    /// TLS parameters from the query of the first entry (kombu keeps the first entry's `ssl`).
    pub tls: UrlTls,
    /// Whether TLS is on (a `rediss://` entry or any `ssl_*` parameter).
    pub tls_on: bool,
    /// With Sentinel: TLS to the Sentinels themselves and its files, from the
    /// `sentinel_kwargs` transport option (set when the configuration is resolved).
    pub sentinel_tls: Option<crate::config::TlsConfig>,
    /// Query parameters kombu accepts that do not change what is counted (logged once).
    pub ignored: Vec<String>,
}

impl BrokerUrl {
    /// The database every observation reads (the first entry's).
    pub fn db(&self) -> i64 {
        match &self.broker {
            Broker::Direct(nodes) => nodes.first().map_or(0, |n| n.db),
            Broker::Sentinel { master, .. } => master.db,
        }
    }
}

/// Parses `url` as kombu does. The error is a rule for the `url` field that shows no secret.
pub(crate) fn parse(url: &str) -> Result<BrokerUrl, String> {
    let entries: Vec<&str> = url
        .split(';')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    if entries.is_empty() {
        return Err("is empty".into());
    }
    let many = entries.len() > 1;
    let which = |i: usize| {
        if many {
            format!("entry {} of the failover list", i + 1)
        } else {
            "the URL".to_string()
        }
    };
    let mut nodes = Vec::new();
    let mut sentinels = Vec::new();
    let mut first: Option<(Parsed, String)> = None;
    for (i, entry) in entries.iter().enumerate() {
        let parsed = parse_entry(entry).map_err(|e| format!("{}: {e}", which(i)))?;
        let kind = parsed.kind;
        if let Some((f, _)) = &first
            && (f.kind == Kind::Sentinel) != (kind == Kind::Sentinel)
        {
            return Err(format!(
                "{}: a failover list mixes sentinel:// with redis:// entries (kombu takes the \
                 transport from the first entry; list only Sentinels, or only Redis servers)",
                which(i)
            ));
        }
        match kind {
            Kind::Sentinel => sentinels.push((
                parsed.node.shown_host(),
                match &parsed.node.addr {
                    Addr::Tcp { port, .. } | Addr::Tls { port, .. } => *port,
                    Addr::Unix(_) => SENTINEL_PORT,
                },
            )),
            _ => nodes.push(parsed.node.clone()),
        }
        if first.is_none() {
            first = Some((parsed, which(i)));
        }
    }
    let Some((first, _)) = first else {
        return Err("is empty".into());
    };
    let tls_on = first.tls_on || nodes.iter().any(|n| matches!(n.addr, Addr::Tls { .. }));
    let broker = if first.kind == Kind::Sentinel {
        let mut master = first.node.clone();
        // The master's address comes from the Sentinels.
        master.addr = if first.tls_on {
            Addr::Tls {
                host: String::new(),
                port: 0,
            }
        } else {
            Addr::Tcp {
                host: String::new(),
                port: 0,
            }
        };
        Broker::Sentinel { sentinels, master }
    } else {
        Broker::Direct(nodes)
    };
    Ok(BrokerUrl {
        broker,
        tls: first.tls,
        tls_on,
        sentinel_tls: None,
        ignored: first.ignored,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Redis,
    Sentinel,
    Socket,
}

#[derive(Debug, Clone)]
struct Parsed {
    kind: Kind,
    node: Node,
    tls: UrlTls,
    tls_on: bool,
    ignored: Vec<String>,
}

impl Node {
    fn shown_host(&self) -> String {
        match &self.addr {
            Addr::Tcp { host, .. } | Addr::Tls { host, .. } => host.clone(),
            Addr::Unix(p) => p.display().to_string(),
        }
    }
}

/// The pieces of `scheme://netloc/path?query#fragment`, split as Python's `urlsplit` does
/// (netloc ends at the first `/`, `?` or `#`).
struct Split<'a> {
    netloc: &'a str,
    path: &'a str,
    query: &'a str,
    fragment: &'a str,
}

fn split(rest: &str) -> Split<'_> {
    let (rest, fragment) = rest.split_once('#').unwrap_or((rest, ""));
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (netloc, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    Split {
        netloc,
        path,
        query,
        fragment,
    }
}

/// Python's `unquote`: `%XX` decoded (as UTF-8, invalid sequences replaced), the rest as is.
fn unquote(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Python's `parse_qsl` (no blank values): `+` is a space, pairs without `=` or with an empty
/// value are dropped; the last of a repeated name wins (kombu makes a dict of it).
fn parse_query(query: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in query.split('&') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        if v.is_empty() {
            continue;
        }
        let k = unquote(&k.replace('+', " "));
        let v = unquote(&v.replace('+', " "));
        out.retain(|(name, _)| *name != k);
        out.push((k, v));
    }
    out
}

/// User, password, host and port of a netloc, as `urlsplit` reads them: the credentials are
/// before the last `@`, the password after their first `:`; the port after the host's `:`.
#[allow(clippy::type_complexity)]
fn netloc_parts(
    netloc: &str,
) -> Result<(Option<String>, Option<String>, Option<String>, Option<u16>), String> {
    let (userinfo, hostinfo) = match netloc.rfind('@') {
        Some(i) => (Some(&netloc[..i]), &netloc[i + 1..]),
        None => (None, netloc),
    };
    let (user, password) = match userinfo {
        None => (None, None),
        Some(info) => match info.split_once(':') {
            Some((u, p)) => (Some(u), Some(p)),
            None => (Some(info), None),
        },
    };
    let nonempty = |s: Option<&str>| s.map(unquote).filter(|s| !s.is_empty());
    let (host, port) = if let Some(rest) = hostinfo.strip_prefix('[') {
        let Some((h, after)) = rest.split_once(']') else {
            return Err("has an unclosed [ in its host".into());
        };
        (h, after.strip_prefix(':'))
    } else {
        match hostinfo.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostinfo, None),
        }
    };
    let port = match port.filter(|p| !p.is_empty()) {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|_| p.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    "has a port that is not a number from 0 to 65535 (a password with a raw \
                     `/`, `?`, `#` or `@`? percent-encode it)"
                        .to_string()
                })?,
        ),
    };
    Ok((
        nonempty(user),
        nonempty(password),
        nonempty(Some(host)).map(|h| h.to_lowercase()),
        port,
    ))
}

/// kombu's `_prepare_virtual_host`: none or `/` is database 0; a leading `/` is dropped; the
/// rest must be an integer.
fn database(vhost: Option<&str>) -> Result<i64, String> {
    let v = match vhost {
        None => return Ok(0),
        Some(v) if v.is_empty() || v == "/" => return Ok(0),
        Some(v) => v.strip_prefix('/').unwrap_or(v),
    };
    let v = v.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        v.parse::<i64>()
            .map_err(|_| "names a database number that is too large".to_string())
    } else {
        Err(
            "names a database that is not a number (kombu: \"Database is int between 0 and \
             limit - 1\"); write redis://host:port/N"
                .into(),
        )
    }
}

/// Query parameters of `kombu.Connection` that do not change what is counted.
const IGNORED_CONNECTION_PARAMS: &[&str] =
    &["insist", "connect_timeout", "login_method", "heartbeat"];

/// Query parameters of a `redis+socket://` URL (passed to redis-py's socket connection) that do
/// not change what is counted.
const IGNORED_SOCKET_PARAMS: &[&str] = &[
    "socket_timeout",
    "client_name",
    "health_check_interval",
    "retry_on_timeout",
];

/// Names a query parameter only when the URL holds no credentials (a mangled password could
/// otherwise end up in the query).
fn query_name(name: &str, entry: &str) -> String {
    if entry.contains('@') {
        "a query parameter (not shown: the URL has credentials)".into()
    } else {
        format!("the query parameter {name:?}")
    }
}

fn parse_entry(entry: &str) -> Result<Parsed, String> {
    let Some((scheme, rest)) = entry.split_once("://") else {
        return Err("has no scheme (redis://, rediss://, redis+socket://, sentinel://)".into());
    };
    let scheme_shown = if scheme.len() <= 20
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-')
    {
        format!("{scheme:?}")
    } else {
        "that is not one".into()
    };
    match scheme.to_ascii_lowercase().as_str() {
        "redis" | "rediss" | "sentinel" => {
            let kind = if scheme.eq_ignore_ascii_case("sentinel") {
                Kind::Sentinel
            } else {
                Kind::Redis
            };
            parse_tcp(entry, rest, kind, scheme.eq_ignore_ascii_case("rediss"))
        }
        "redis+socket" => parse_socket(entry, rest),
        "unix" | "redis+unix" => parse_redis_crate_unix(entry),
        _ => Err(format!(
            "has the scheme {scheme_shown}: Celery's Redis transports are redis://, rediss://, \
             redis+socket:// and sentinel://"
        )),
    }
}

fn parse_tcp(entry: &str, rest: &str, kind: Kind, rediss: bool) -> Result<Parsed, String> {
    let s = split(rest);
    if s.fragment == "insecure" {
        return Err(
            "ends in #insecure, which is not supported: give the CA (tls.ca_file or \
                    ssl_ca_certs) instead"
                .into(),
        );
    }
    let (username, password, host, port) = netloc_parts(s.netloc)?;
    // url_to_parts drops one leading `/` of the path and unquotes it.
    let path = s.path.strip_prefix('/').unwrap_or(s.path);
    let path = Some(unquote(path)).filter(|p| !p.is_empty());
    let db = database(path.as_deref())?;
    let mut tls = UrlTls::default();
    let mut tls_on = rediss;
    let mut ignored = Vec::new();
    for (name, value) in parse_query(s.query) {
        match name.as_str() {
            "ssl_cert_reqs" => {
                if !matches!(
                    value.as_str(),
                    "CERT_REQUIRED"
                        | "CERT_OPTIONAL"
                        | "CERT_NONE"
                        | "required"
                        | "optional"
                        | "none"
                ) {
                    return Err("has an ssl_cert_reqs that kombu does not know (required, \
                                optional, none, CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE)"
                        .into());
                }
                tls.cert_reqs = Some(value);
                tls_on = true;
            }
            "ssl_ca_certs" => {
                tls.ca_certs = Some(PathBuf::from(value));
                tls_on = true;
            }
            "ssl_certfile" => {
                tls.certfile = Some(PathBuf::from(value));
                tls_on = true;
            }
            "ssl_keyfile" => {
                tls.keyfile = Some(PathBuf::from(value));
                tls_on = true;
            }
            "ssl_check_hostname" => {
                tls.no_check_hostname = value.to_lowercase() == "false";
                tls_on = true;
            }
            n if n.starts_with("ssl_") => {
                return Err(format!(
                    "has {}, which celery-scale does not support (ssl_ca_certs, ssl_certfile, \
                     ssl_keyfile, ssl_cert_reqs and ssl_check_hostname are)",
                    query_name(n, entry)
                ));
            }
            n if IGNORED_CONNECTION_PARAMS.contains(&n) => ignored.push(n.to_string()),
            n => {
                return Err(format!(
                    "has {}: kombu.Connection takes no such keyword (a TypeError in Celery); \
                     transport options belong in broker_transport_options",
                    query_name(n, entry)
                ));
            }
        }
    }
    let default_port = if kind == Kind::Sentinel {
        SENTINEL_PORT
    } else {
        REDIS_PORT
    };
    let host = host.unwrap_or_else(|| "127.0.0.1".into());
    let port = port.unwrap_or(default_port);
    let addr = if tls_on && kind != Kind::Sentinel {
        Addr::Tls { host, port }
    } else {
        Addr::Tcp { host, port }
    };
    Ok(Parsed {
        kind,
        node: Node {
            addr,
            db,
            username,
            password,
        },
        tls,
        tls_on,
        ignored,
    })
}

/// `redis+socket:///path?virtual_host=N`: kombu hands `socket:///path?...` to redis-py's unix
/// socket connection, with the query's keywords; the database is `virtual_host`.
fn parse_socket(entry: &str, rest: &str) -> Result<Parsed, String> {
    let s = split(rest);
    let (username, password, _host, _port) = netloc_parts(s.netloc)?;
    let path = s.path.strip_prefix('/').unwrap_or(s.path);
    let path = unquote(path);
    if path.is_empty() {
        return Err("names no socket path: write redis+socket:///path/to/redis.sock".into());
    }
    let mut db = 0;
    let mut ignored = Vec::new();
    for (name, value) in parse_query(s.query) {
        match name.as_str() {
            "virtual_host" => db = database(Some(&value))?,
            "db" => {
                return Err(
                    "has db=..., which kombu ignores in a redis+socket URL (Celery would \
                            use database 0): write virtual_host=N"
                        .into(),
                );
            }
            n if IGNORED_SOCKET_PARAMS.contains(&n) => ignored.push(n.to_string()),
            n => {
                return Err(format!(
                    "has {}, which kombu passes to redis-py's socket connection and \
                     celery-scale does not support (virtual_host is the database)",
                    query_name(n, entry)
                ));
            }
        }
    }
    Ok(Parsed {
        kind: Kind::Socket,
        node: Node {
            addr: Addr::Unix(PathBuf::from(format!("/{path}"))),
            db,
            username,
            password,
        },
        tls: UrlTls::default(),
        tls_on: false,
        ignored,
    })
}

/// The redis crate's socket forms (`unix:///path?db=N&pass=...&user=...`).
fn parse_redis_crate_unix(entry: &str) -> Result<Parsed, String> {
    let info = entry.into_connection_info().map_err(|_| {
        "is not a valid unix socket URL (unix:///path/redis.sock?db=N; kombu's own form is \
         redis+socket:///path?virtual_host=N)"
            .to_string()
    })?;
    let ConnectionAddr::Unix(path) = info.addr().clone() else {
        return Err("is not a unix socket URL".into());
    };
    let r = info.redis_settings();
    Ok(Parsed {
        kind: Kind::Socket,
        node: Node {
            addr: Addr::Unix(path),
            db: r.db(),
            username: r.username().map(str::to_string),
            password: r.password().map(str::to_string),
        },
        tls: UrlTls::default(),
        tls_on: false,
        ignored: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(url: &str) -> Vec<Node> {
        match parse(url).unwrap().broker {
            Broker::Direct(n) => n,
            other => panic!("{other:?}"),
        }
    }

    fn tcp(host: &str, port: u16) -> Addr {
        Addr::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn tcp_forms_as_kombu() {
        // Each expectation is what kombu 5.7's Channel._connparams gives (checked in the venv).
        let n = &direct("redis://")[0];
        assert_eq!((n.addr.clone(), n.db), (tcp("127.0.0.1", 6379), 0));
        let n = &direct("redis://:pw@H:6380/2")[0];
        assert_eq!(n.addr, tcp("h", 6380));
        assert_eq!(
            (n.db, n.password.as_deref(), n.username.as_deref()),
            (2, Some("pw"), None)
        );
        let n = &direct("redis://u:p%40w@h/3")[0];
        assert_eq!(
            (n.username.as_deref(), n.password.as_deref(), n.db),
            (Some("u"), Some("p@w"), 3)
        );
        assert_eq!(direct("redis://h/")[0].db, 0);
        assert_eq!(direct("redis://h//4")[0].db, 4);
        assert!(parse("redis://h/x").unwrap_err().contains("not a number"));
        assert!(parse("redis://h:abc/0").unwrap_err().contains("port"));
        assert!(
            parse("redis://h/0?foo=bar")
                .unwrap_err()
                .contains("\"foo\"")
        );
        assert!(
            parse("redis://h/0?socket_timeout=3")
                .unwrap_err()
                .contains("TypeError")
        );
        let u = parse("redis://h/0?heartbeat=10&connect_timeout=2").unwrap();
        assert_eq!(u.ignored, ["heartbeat", "connect_timeout"]);
        // Empty values are dropped, as parse_qsl does.
        assert!(!parse("redis://h/0?ssl_cert_reqs=").unwrap().tls_on);
    }

    #[test]
    fn tls_from_scheme_or_ssl_parameters() {
        let u = parse("rediss://h:6380/1?ssl_cert_reqs=CERT_REQUIRED").unwrap();
        assert!(u.tls_on);
        assert_eq!(u.tls.cert_reqs.as_deref(), Some("CERT_REQUIRED"));
        assert!(matches!(
            &direct("rediss://h")[0].addr,
            Addr::Tls { port: 6379, .. }
        ));
        // kombu turns TLS on for any ssl_* parameter, even on redis://.
        let u = parse("redis://h/0?ssl_cert_reqs=none").unwrap();
        assert!(u.tls_on);
        assert!(matches!(
            &direct("redis://h/0?ssl_cert_reqs=none")[0].addr,
            Addr::Tls { .. }
        ));
        let u = parse("rediss://h/0?ssl_ca_certs=/x.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_check_hostname=False").unwrap();
        assert_eq!(u.tls.ca_certs, Some(PathBuf::from("/x.pem")));
        assert_eq!(u.tls.certfile, Some(PathBuf::from("/c.pem")));
        assert_eq!(u.tls.keyfile, Some(PathBuf::from("/k.pem")));
        assert!(u.tls.no_check_hostname);
        assert!(parse("rediss://h/0?ssl_cert_reqs=maybe").is_err());
        assert!(
            parse("rediss://h/0?ssl_ciphers=x")
                .unwrap_err()
                .contains("ssl_ciphers")
        );
        assert!(
            parse("rediss://h/0#insecure")
                .unwrap_err()
                .contains("insecure")
        );
    }

    #[test]
    fn socket_forms() {
        let n = &direct("redis+socket:///tmp/r.sock?virtual_host=3")[0];
        assert_eq!(
            (n.addr.clone(), n.db),
            (Addr::Unix("/tmp/r.sock".into()), 3)
        );
        assert_eq!(direct("redis+socket:///tmp/r.sock")[0].db, 0);
        let n = &direct("redis+socket://:pw@/tmp/r.sock?virtual_host=3")[0];
        assert_eq!(n.password.as_deref(), Some("pw"));
        assert!(
            parse("redis+socket:///tmp/r.sock?db=3")
                .unwrap_err()
                .contains("virtual_host")
        );
        let n = &direct("unix:///tmp/r.sock?db=2&pass=x")[0];
        assert_eq!((n.db, n.password.as_deref()), (2, Some("x")));
        let n = &direct("redis+unix:///tmp/r.sock?db=5")[0];
        assert_eq!(n.db, 5);
    }

    #[test]
    fn failover_lists_and_sentinels() {
        let nodes = direct("redis://h/1;redis://h2:6380/1");
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].addr, tcp("h2", 6380));
        assert_eq!(direct("redis://h/1;")[0].db, 1);
        let u = parse("sentinel://:pw@s1:26379/4;sentinel://s2:26380;sentinel://s3").unwrap();
        let Broker::Sentinel { sentinels, master } = u.broker else {
            panic!()
        };
        assert_eq!(
            sentinels,
            [
                ("s1".into(), 26379),
                ("s2".into(), 26380),
                ("s3".into(), 26379)
            ]
        );
        assert_eq!((master.db, master.password.as_deref()), (4, Some("pw")));
        assert!(
            parse("sentinel://s1;redis://h")
                .unwrap_err()
                .contains("mixes")
        );
        assert!(parse("amqp://h").unwrap_err().contains("\"amqp\""));
        assert!(parse(" ; ").is_err());
    }

    #[test]
    fn errors_show_no_password() {
        for url in [
            "redis://:zqk/xwv@h:6379/1",
            "redis://:zqk?xwv@h:6379/1",
            "redis://:zqk#xwv@h:6379/1",
            "redis://:zqk;redis://xwv@h:6379/1",
            "redis://u:zqk@h:xwv/1",
            "redis://u:zqk@h/xwv",
            "redis+socket://:zqk@/s?xwv=1",
            "redis://:zqk@h/0?xwv=1",
        ] {
            if let Err(e) = parse(url) {
                assert!(!e.contains("zqk") && !e.contains("xwv"), "{url}: {e}");
            }
        }
    }
}
