//! Queue names as kombu's SQS transport makes them, and Celery's broker URL as kombu reads it.

/// The suffix of a FIFO queue's name.
pub const FIFO_SUFFIX: &str = ".fifo";

/// The longest SQS queue name (the `.fifo` suffix included).
pub const MAX_SQS_NAME: usize = 80;

/// kombu's `CHARS_REPLACE_TABLE` applied to `name`: `.` becomes `-`; every other ASCII
/// punctuation character but `-` and `_` becomes `_`; everything else is kept.
fn translate(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '.' => '-',
            '-' | '_' => c,
            c if c.is_ascii_punctuation() => '_',
            c => c,
        })
        .collect()
}

/// The SQS name kombu gives a Celery queue (`Channel.canonical_queue_name`): the
/// `queue_name_prefix` put before the name, then kombu's character table applied to all but a
/// trailing `.fifo`, which is kept (a FIFO queue).
///
/// ```
/// use celery_scale_sqs::sqs_queue_name;
/// assert_eq!(sqs_queue_name("", "celery"), "celery");
/// assert_eq!(sqs_queue_name("prod.", "emails.high"), "prod-emails-high");
/// assert_eq!(sqs_queue_name("app:", "a/b@c"), "app_a_b_c");
/// assert_eq!(sqs_queue_name("app-", "orders.fifo"), "app-orders.fifo");
/// ```
pub fn sqs_queue_name(queue_name_prefix: &str, queue: &str) -> String {
    let full = format!("{queue_name_prefix}{queue}");
    match full.strip_suffix(FIFO_SUFFIX) {
        Some(stem) => format!("{}{FIFO_SUFFIX}", translate(stem)),
        None => translate(&full),
    }
}

/// The prefix to list queues with: `queue_name_prefix` through kombu's character table, so it
/// matches the names kombu creates (kombu itself lists with the untranslated prefix, which
/// finds nothing when the prefix holds a `.` or other punctuation).
pub fn list_prefix(queue_name_prefix: &str) -> String {
    translate(queue_name_prefix)
}

/// Why `name` cannot be an SQS queue name, if it cannot: SQS takes 1 to 80 characters of
/// `A-Z a-z 0-9 - _`, plus the `.fifo` suffix of a FIFO queue.
pub fn invalid_sqs_name(name: &str) -> Option<String> {
    let stem = name.strip_suffix(FIFO_SUFFIX).unwrap_or(name);
    if stem.is_empty() {
        return Some(format!("{name:?} is empty as an SQS name"));
    }
    if name.len() > MAX_SQS_NAME {
        return Some(format!(
            "{name:?} has {} characters; SQS takes at most {MAX_SQS_NAME}",
            name.chars().count()
        ));
    }
    if let Some(c) = stem
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Some(format!(
            "{name:?} holds {c:?}: SQS names take only A-Z, a-z, 0-9, - and _ (kombu's table \
             leaves letters outside ASCII and white space as they are)"
        ));
    }
    None
}

/// The queue's name: the last path segment of its URL (`.../123456789012/name`).
pub fn name_of_url(url: &str) -> &str {
    url.trim_end_matches('/').rsplit('/').next().unwrap_or(url)
}

/// What Celery's `broker_url` for SQS says, read as kombu reads it: `sqs://` (AWS's endpoint,
/// the credentials chain), `sqs://KEY:SECRET@` (static credentials, URL-encoded), or
/// `sqs://[KEY:SECRET@]host[:port]` (an endpoint of its own, `http://` unless `is_secure`).
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// The access key id and secret from the userinfo, percent-decoded.
    pub credentials: Option<(String, String)>,
    /// `host[:port]`, when the URL names one.
    pub host: Option<String>,
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerUrl")
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(id, _)| (id, "***")),
            )
            .field("host", &self.host)
            .finish()
    }
}

impl BrokerUrl {
    /// Parses `url`; the error says what is wrong without showing the URL's secret.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("sqs://")
            .ok_or_else(|| "must start with sqs:// (Celery's broker_url for SQS)".to_owned())?;
        let (userinfo, hostpart) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let credentials = match userinfo {
            None | Some("") => None,
            Some(u) => {
                let (id, secret) = u.split_once(':').ok_or_else(|| {
                    "the userinfo must be ACCESS_KEY_ID:SECRET_ACCESS_KEY".to_owned()
                })?;
                let id = percent_decode(id).ok_or("the access key id is not valid UTF-8")?;
                let secret =
                    percent_decode(secret).ok_or("the secret access key is not valid UTF-8")?;
                if id.is_empty() || secret.is_empty() {
                    return Err("the access key id and secret must both be set".to_owned());
                }
                Some((id, secret))
            }
        };
        let host = hostpart.split(['/', '?', '#']).next().unwrap_or_default();
        let host = if host.is_empty() {
            None
        } else {
            if host.chars().any(|c| c.is_whitespace()) {
                return Err(format!("the host {host:?} holds white space"));
            }
            Some(host.to_owned())
        };
        Ok(BrokerUrl { credentials, host })
    }

    /// The endpoint kombu derives from the host: `https://host[:port]` when `is_secure` is
    /// true, else `http://host[:port]`.
    pub fn endpoint(&self, is_secure: Option<bool>) -> Option<String> {
        let scheme = if is_secure == Some(true) {
            "https"
        } else {
            "http"
        };
        self.host.as_ref().map(|h| format!("{scheme}://{h}"))
    }
}

/// `%XX` sequences decoded (a bad escape is kept as is); `None` when the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let decoded = percent_encoding::percent_decode_str(s).decode_utf8().ok()?;
    Some(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kombu_table() {
        // Every ASCII punctuation character but - _ . becomes _, . becomes -: the expected
        // value is what kombu 5.7's `str.translate(CHARS_REPLACE_TABLE)` printed.
        assert_eq!(
            sqs_queue_name("", "a!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~z"),
            "a____________--__________________z"
        );
        assert_eq!(sqs_queue_name("", "x.fifo"), "x.fifo");
        assert_eq!(sqs_queue_name("p.", "x.y.fifo"), "p-x-y.fifo");
        assert_eq!(sqs_queue_name("", "fifo"), "fifo");
        // Not ASCII punctuation: kept (and then refused by SQS's rule).
        assert_eq!(sqs_queue_name("", "é q"), "é q");
        assert!(invalid_sqs_name("é q").is_some());
        assert!(invalid_sqs_name("ok-name_1").is_none());
        assert!(invalid_sqs_name("ok.fifo").is_none());
        assert!(invalid_sqs_name(".fifo").is_some());
        assert!(invalid_sqs_name(&"a".repeat(81)).is_some());
        assert!(invalid_sqs_name(&"a".repeat(80)).is_none());
        assert_eq!(list_prefix("prod.app:"), "prod-app_");
    }

    #[test]
    fn broker_urls() {
        let u = BrokerUrl::parse("sqs://").unwrap();
        assert_eq!(u.credentials, None);
        assert_eq!(u.host, None);
        assert_eq!(u.endpoint(None), None);

        let u = BrokerUrl::parse("sqs://AKID:se%2Fcr%2Bet@").unwrap();
        assert_eq!(u.credentials, Some(("AKID".into(), "se/cr+et".into())));
        assert_eq!(u.host, None);
        assert!(!format!("{u:?}").contains("se/cr"), "{u:?}");

        let u = BrokerUrl::parse("sqs://k:s@127.0.0.1:5000").unwrap();
        assert_eq!(u.endpoint(None).as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(
            u.endpoint(Some(true)).as_deref(),
            Some("https://127.0.0.1:5000")
        );
        let u = BrokerUrl::parse("sqs://localhost:4566/").unwrap();
        assert_eq!(u.credentials, None);
        assert_eq!(u.host.as_deref(), Some("localhost:4566"));

        assert!(BrokerUrl::parse("redis://h").is_err());
        let e = BrokerUrl::parse("sqs://onlykey@").unwrap_err();
        assert!(e.contains("ACCESS_KEY_ID"), "{e}");
        assert!(BrokerUrl::parse("sqs://:s@").is_err());
        assert_eq!(percent_decode("%zz%4"), Some("%zz%4".into()));
        assert_eq!(name_of_url("http://h/123/q-1"), "q-1");
    }
}
