//! Broker URLs that never show their password.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Returns `url` with its password (and any `password=` or `pass=` query parameter, the latter
/// being the redis crate's form for unix sockets) replaced by `***`.
///
/// Works on anything that looks like `scheme://user:password@host/...`, parseable or not, so
/// an invalid URL in an error message does not leak either.
///
/// ```
/// # use celery_scale_core::redact_url;
/// assert_eq!(redact_url("redis://:s3cret@cache:6379/2"), "redis://:***@cache:6379/2");
/// assert_eq!(redact_url("amqps://user:pw@mq/%2f"), "amqps://user:***@mq/%2f");
/// assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
/// ```
pub fn redact_url(url: &str) -> String {
    let mut out = match url.find("://") {
        Some(scheme_end) => {
            let rest = &url[scheme_end + 3..];
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let authority = &rest[..authority_end];
            match authority.rfind('@') {
                Some(at) => {
                    let userinfo = &authority[..at];
                    let user = match userinfo.find(':') {
                        Some(colon) => format!("{}:***", &userinfo[..colon]),
                        None if userinfo.is_empty() => String::new(),
                        // A bare userinfo is a password for Redis (`redis://secret@host`).
                        None => "***".to_string(),
                    };
                    format!("{}{}@{}", &url[..scheme_end + 3], user, &rest[at + 1..])
                }
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    };
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let redacted: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _))
                    if k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("pass") =>
                {
                    format!("{k}=***")
                }
                _ => pair.to_string(),
            })
            .collect();
        out = format!("{head}{}", redacted.join("&"));
    }
    out
}

/// A URL that may hold credentials: `Debug` and `Display` show it redacted; [`SecretUrl::expose`]
/// gives the real one to the client library that needs it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The URL with its password, for the client library only. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl From<&str> for SecretUrl {
    fn from(s: &str) -> Self {
        SecretUrl::new(s)
    }
}

impl From<String> for SecretUrl {
    fn from(s: String) -> Self {
        SecretUrl::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_every_form() {
        assert_eq!(redact_url("redis://secret@h:1/0"), "redis://***@h:1/0");
        assert_eq!(
            redact_url("rediss://default:p%40ss@h:1"),
            "rediss://default:***@h:1"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@localhost:5672/%2f"),
            "amqp://guest:***@localhost:5672/%2f"
        );
        assert_eq!(
            redact_url("redis://h/0?password=x&db=1"),
            "redis://h/0?password=***&db=1"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_url("redis+unix:///tmp/r.sock?db=2"),
            "redis+unix:///tmp/r.sock?db=2"
        );
    }

    #[test]
    fn secret_url_debug_and_display_hide_password() {
        let u = SecretUrl::new("amqp://user:hunter2@mq/%2f");
        assert!(!format!("{u:?}").contains("hunter2"));
        assert!(!format!("{u}").contains("hunter2"));
        assert!(u.expose().contains("hunter2"));
    }
}
