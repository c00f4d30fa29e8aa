//! [`AwsSettings`]: the AWS settings every AWS backend shares, the checked [`SdkConfig`] they
//! load, and the cache-TTL rule ([`cache_ttl_for`]).

use std::fmt;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, ConfigLoader, Region, SdkConfig};
use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::provider::error::CredentialsError;
use celery_scale_core::ConfigError;
use serde::{Deserialize, Serialize};

/// The shortest [`AwsSettings::call_timeout`] accepted.
pub const MIN_CALL_TIMEOUT: Duration = Duration::from_millis(100);
/// The longest [`AwsSettings::call_timeout`] accepted.
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest [`AwsSettings::cache_ttl`] accepted.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(60);
/// The most [`AwsSettings::max_attempts`] accepted.
pub const MAX_ATTEMPTS: u32 = 10;
/// How long [`AwsSettings::sdk_config`] waits for the credentials chain to answer. Off AWS the
/// chain's last step, the EC2 instance metadata endpoint, can hang for seconds.
pub const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`AwsSettings::sdk_config`] waits for aws-config to load (the region lookup can
/// also reach the instance metadata endpoint).
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How every AWS backend talks to AWS: region, endpoint, retries, per-call timeout and how
/// long one batched read serves every binding. Serde (unknown fields rejected, durations in
/// humantime form such as `"4s"`) with builder methods; [`AwsSettings::validate`] checks the
/// bounds and names the field.
///
/// Credentials are never part of it: they come from aws-config's default chain (environment,
/// profile, web identity, ECS task role, EC2 instance role).
///
/// | field | default | bounds | meaning |
/// |---|---|---|---|
/// | `region` | none: `AWS_REGION` / profile | a region name | the AWS region |
/// | `endpoint_url` | none: `AWS_ENDPOINT_URL`, else AWS | `http://` or `https://` URL | an endpoint override (moto) |
/// | `max_attempts` | none: `AWS_MAX_ATTEMPTS`, else the SDK's 3 | 1-10 | attempts per call by the SDK's standard retry strategy (1: no retry) |
/// | `call_timeout` | `4s` | 100ms-2m | timeout of each call, the SDK's retries included; keep it below the loop's timeout |
/// | `cache_ttl` | `1s` | 0s-1m | how long one batched read serves every binding; see [`cache_ttl_for`] |
///
/// ```
/// use std::time::Duration;
/// use celery_scale_aws::AwsSettings;
/// let s: AwsSettings = toml::from_str(r#"
///     region = "eu-west-1"
///     call_timeout = "3s"
/// "#).unwrap();
/// assert_eq!(s, AwsSettings::default().region("eu-west-1").call_timeout(Duration::from_secs(3)));
/// s.validate().unwrap();
/// assert_eq!(AwsSettings::default().max_attempts(0).validate().unwrap_err().field, "max_attempts");
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsSettings {
    /// The AWS region; absent: from the environment (`AWS_REGION`, the profile).
    pub region: Option<String>,
    /// An endpoint override such as moto's `http://127.0.0.1:5000`; absent: `AWS_ENDPOINT_URL`
    /// or the service's own `AWS_ENDPOINT_URL_<SERVICE>` if set, else AWS's endpoint. When set
    /// it wins over both.
    pub endpoint_url: Option<String>,
    /// Attempts per call, made by the SDK's standard retry strategy (1: no retry); absent: the
    /// environment's (`AWS_MAX_ATTEMPTS`, the profile), else the SDK's default of 3.
    pub max_attempts: Option<u32>,
    /// Timeout of each call, the SDK's own retries included.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// How long one batched read serves every binding's `capacity()`. Keep it below the
    /// shortest poll interval ([`cache_ttl_for`] enforces it); `0s` still coalesces reads made
    /// at the same moment.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

impl Default for AwsSettings {
    fn default() -> Self {
        AwsSettings {
            region: None,
            endpoint_url: None,
            max_attempts: None,
            call_timeout: Duration::from_secs(4),
            cache_ttl: Duration::from_secs(1),
        }
    }
}

impl fmt::Debug for AwsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsSettings")
            .field("region", &self.region)
            // An endpoint URL may carry userinfo: never show its password.
            .field(
                "endpoint_url",
                &self
                    .endpoint_url
                    .as_deref()
                    .map(celery_scale_core::redact_url),
            )
            .field("max_attempts", &self.max_attempts)
            .field("call_timeout", &self.call_timeout)
            .field("cache_ttl", &self.cache_ttl)
            .finish()
    }
}

fn out_of(field: &str, value: Duration, min: Duration, max: Duration) -> ConfigError {
    ConfigError::new(
        field,
        format!(
            "{} is outside {}..={}",
            humantime::format_duration(value),
            humantime::format_duration(min),
            humantime::format_duration(max)
        ),
    )
}

impl AwsSettings {
    /// Sets [`AwsSettings::region`].
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Sets [`AwsSettings::endpoint_url`].
    pub fn endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.endpoint_url = Some(url.into());
        self
    }

    /// Sets [`AwsSettings::max_attempts`].
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Sets [`AwsSettings::call_timeout`].
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Sets [`AwsSettings::cache_ttl`].
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// Checks every field against the bounds in the table above; the error names the field
    /// (relative to this struct: prefix it with [`ConfigError::within`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(r) = &self.region {
            let ok = !r.is_empty()
                && r.len() <= 64
                && r.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !ok {
                return Err(ConfigError::new(
                    "region",
                    format!("{r:?} is not a region name such as \"us-east-1\""),
                ));
            }
        }
        if let Some(u) = &self.endpoint_url {
            let shown = celery_scale_core::redact_url(u);
            match url::Url::parse(u) {
                Ok(p) if matches!(p.scheme(), "http" | "https") && p.has_host() => {}
                Ok(_) => {
                    return Err(ConfigError::new(
                        "endpoint_url",
                        format!("{shown:?} must be an http:// or https:// URL with a host"),
                    ));
                }
                Err(e) => {
                    return Err(ConfigError::new(
                        "endpoint_url",
                        format!("{shown:?} is not a URL: {e}"),
                    ));
                }
            }
        }
        if let Some(n) = self.max_attempts
            && !(1..=MAX_ATTEMPTS).contains(&n)
        {
            return Err(ConfigError::new(
                "max_attempts",
                format!("{n} is outside 1..={MAX_ATTEMPTS} (1 means no retry)"),
            ));
        }
        if !(MIN_CALL_TIMEOUT..=MAX_CALL_TIMEOUT).contains(&self.call_timeout) {
            return Err(out_of(
                "call_timeout",
                self.call_timeout,
                MIN_CALL_TIMEOUT,
                MAX_CALL_TIMEOUT,
            ));
        }
        if self.cache_ttl > MAX_CACHE_TTL {
            return Err(out_of(
                "cache_ttl",
                self.cache_ttl,
                Duration::ZERO,
                MAX_CACHE_TTL,
            ));
        }
        Ok(())
    }

    /// These settings with [`AwsSettings::cache_ttl`] replaced by [`cache_ttl_for`] it and
    /// `shortest_interval`.
    pub fn fit_cache_ttl(mut self, shortest_interval: Option<Duration>) -> Self {
        self.cache_ttl = cache_ttl_for(self.cache_ttl, shortest_interval);
        self
    }

    /// The SDK configuration for these settings, checked: aws-config's default chain
    /// ([`BehaviorVersion::latest`]; `AWS_ENDPOINT_URL`, `AWS_REGION`, profiles honoured) with
    /// the settings' region, endpoint and attempts on top.
    ///
    /// Fails at start, with a [`SetupError`] saying what to set, when no region is set
    /// anywhere or when the credentials chain gives no credentials within
    /// [`CREDENTIALS_TIMEOUT`]: a missing setup is a configuration error, not an unreachable
    /// endpoint retried forever.
    pub async fn sdk_config(&self) -> Result<SdkConfig, SetupError> {
        self.sdk_config_from(aws_config::defaults(BehaviorVersion::latest()))
            .await
    }

    /// As [`AwsSettings::sdk_config`], loading from `loader` instead of the default one (for a
    /// caller that configures the chain itself: a profile name, a fixed provider, a test
    /// environment).
    pub async fn sdk_config_from(&self, loader: ConfigLoader) -> Result<SdkConfig, SetupError> {
        self.validate()?;
        // A region of ours spares the chain's region lookup (which may reach the instance
        // metadata endpoint); `apply_to` sets the rest on the loaded config.
        let loader = match &self.region {
            Some(r) => loader.region(Region::new(r.clone())),
            None => loader,
        };
        let sdk = tokio::time::timeout(LOAD_TIMEOUT, loader.load())
            .await
            .map_err(|_| SetupError::LoadTimedOut {
                after: LOAD_TIMEOUT,
            })?;
        let sdk = self.apply_to(&sdk)?;
        check_credentials(&sdk, CREDENTIALS_TIMEOUT).await?;
        Ok(sdk)
    }

    /// `sdk` with these settings' region, endpoint and attempts on top (and the latest
    /// behavior version when it has none, so no client built from it panics). Fails when a
    /// field is invalid or no region is set. Makes no call: the credentials are not checked.
    pub fn apply_to(&self, sdk: &SdkConfig) -> Result<SdkConfig, SetupError> {
        self.validate()?;
        let mut b = sdk.to_builder();
        if sdk.behavior_version().is_none() {
            b = b.behavior_version(BehaviorVersion::latest());
        }
        if let Some(r) = &self.region {
            b = b.region(Region::new(r.clone()));
        }
        if let Some(u) = &self.endpoint_url {
            b = b.endpoint_url(u.clone());
        }
        if let Some(n) = self.max_attempts {
            b = b.retry_config(RetryConfig::standard().with_max_attempts(n));
        }
        let sdk = b.build();
        if sdk.region().is_none() {
            return Err(SetupError::NoRegion);
        }
        Ok(sdk)
    }
}

/// Asks `sdk`'s credentials provider for credentials once, within `timeout`. The credentials
/// themselves are dropped at once; nothing of them is logged or kept.
async fn check_credentials(sdk: &SdkConfig, timeout: Duration) -> Result<(), SetupError> {
    let Some(provider) = sdk.credentials_provider() else {
        return Err(SetupError::NoCredentials { source: None });
    };
    match tokio::time::timeout(timeout, provider.provide_credentials()).await {
        Err(_) => Err(SetupError::CredentialsTimedOut { after: timeout }),
        Ok(Err(e)) => Err(SetupError::NoCredentials { source: Some(e) }),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Where to put credentials, for the errors below.
const CREDENTIALS_HELP: &str = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and \
     AWS_SESSION_TOKEN for temporary credentials), or AWS_PROFILE with a profile in \
     ~/.aws/credentials, or run with an ECS task role or an EC2 instance role";

/// The AWS setup is missing or invalid: found at start, before any call is made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// A settings field is invalid.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// No region in the settings, the environment or the profile.
    #[error(
        "region: no AWS region is set: set `region` in the AWS settings, or AWS_REGION, or a \
         region in the AWS profile (AWS_PROFILE, ~/.aws/config)"
    )]
    NoRegion,
    /// The credentials chain gave no credentials (or there is no provider at all).
    #[error("credentials: the AWS credentials chain gave no credentials: {CREDENTIALS_HELP}")]
    NoCredentials {
        /// What the chain said, when there is a provider.
        #[source]
        source: Option<CredentialsError>,
    },
    /// The credentials chain did not answer in time (off AWS, typically the instance
    /// metadata lookup).
    #[error(
        "credentials: the AWS credentials chain did not answer within {}: off AWS the instance \
         metadata lookup hangs; set AWS_EC2_METADATA_DISABLED=true and {CREDENTIALS_HELP}",
        humantime::format_duration(*after)
    )]
    CredentialsTimedOut {
        /// How long we waited.
        after: Duration,
    },
    /// aws-config did not load in time.
    #[error(
        "region: the AWS configuration did not load within {}: set `region` in the AWS \
         settings or AWS_REGION (off AWS the instance metadata lookup hangs; \
         AWS_EC2_METADATA_DISABLED=true skips it)",
        humantime::format_duration(*after)
    )]
    LoadTimedOut {
        /// How long we waited.
        after: Duration,
    },
}

impl SetupError {
    /// The setting the error is about (`region`, `credentials`, or the invalid field).
    pub fn field(&self) -> &str {
        match self {
            SetupError::Invalid(e) => &e.field,
            SetupError::NoRegion | SetupError::LoadTimedOut { .. } => "region",
            SetupError::NoCredentials { .. } | SetupError::CredentialsTimedOut { .. } => {
                "credentials"
            }
        }
    }
}

impl From<SetupError> for ConfigError {
    /// The [`ConfigError`] naming [`SetupError::field`]; its rule says what to set and, for
    /// credentials, what the chain answered (a `ConfigError` keeps no source).
    fn from(e: SetupError) -> Self {
        match e {
            SetupError::Invalid(c) => c,
            other => {
                let field = other.field().to_owned();
                let mut rule = other.to_string();
                if let Some(rest) = rule.strip_prefix(&format!("{field}: ")) {
                    rule = rest.to_owned();
                }
                if let SetupError::NoCredentials { source: Some(s) } = &other {
                    rule.push_str(&format!(" (the chain said: {s})"));
                }
                ConfigError::new(field, rule)
            }
        }
    }
}

impl From<SetupError> for celery_scale_core::Error {
    fn from(e: SetupError) -> Self {
        celery_scale_core::Error::Config(e.into())
    }
}

/// The cache TTL to use, given the configured one and the shortest poll interval of the
/// bindings that share the handle: `configured` when it is below the interval (or there is no
/// binding), else half the interval, with a warning. A shared read that outlived a tick would
/// serve a tick a reading taken before the previous one.
///
/// ```
/// use std::time::Duration;
/// use celery_scale_aws::cache_ttl_for;
/// let s = Duration::from_secs;
/// assert_eq!(cache_ttl_for(s(1), Some(s(5))), s(1));
/// assert_eq!(cache_ttl_for(s(5), Some(s(5))), Duration::from_millis(2500));
/// assert_eq!(cache_ttl_for(s(9), None), s(9));
/// ```
pub fn cache_ttl_for(configured: Duration, shortest_interval: Option<Duration>) -> Duration {
    match shortest_interval {
        Some(interval) if configured >= interval => {
            let ttl = interval / 2;
            tracing::warn!(
                configured = %humantime::format_duration(configured),
                shortest_interval = %humantime::format_duration(interval),
                using = %humantime::format_duration(ttl),
                "the AWS cache_ttl is not below the shortest binding interval; using half of it"
            );
            ttl
        }
        _ => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_credential_types::Credentials;
    use aws_credential_types::provider::{SharedCredentialsProvider, future};
    use aws_types::os_shim_internal::{Env, Fs};

    #[test]
    fn bounds_name_the_field() {
        let bad = [
            (AwsSettings::default().region(""), "region"),
            (AwsSettings::default().region("US East"), "region"),
            (
                AwsSettings::default().endpoint_url("127.0.0.1:5000"),
                "endpoint_url",
            ),
            (
                AwsSettings::default().endpoint_url("ftp://moto"),
                "endpoint_url",
            ),
            (AwsSettings::default().max_attempts(0), "max_attempts"),
            (AwsSettings::default().max_attempts(11), "max_attempts"),
            (
                AwsSettings::default().call_timeout(Duration::ZERO),
                "call_timeout",
            ),
            (
                AwsSettings::default().call_timeout(Duration::from_secs(121)),
                "call_timeout",
            ),
            (
                AwsSettings::default().cache_ttl(Duration::from_secs(61)),
                "cache_ttl",
            ),
        ];
        for (s, field) in bad {
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        AwsSettings::default().validate().unwrap();
        AwsSettings::default()
            .region("us-gov-west-1")
            .endpoint_url("http://127.0.0.1:5000")
            .max_attempts(1)
            .call_timeout(MIN_CALL_TIMEOUT)
            .cache_ttl(Duration::ZERO)
            .validate()
            .unwrap();
    }

    #[test]
    fn serde_is_humantime_and_strict() {
        let s: AwsSettings = toml::from_str(
            "region = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:5000\"\nmax_attempts = 2\ncall_timeout = \"2s\"\ncache_ttl = \"500ms\"\n",
        )
        .unwrap();
        assert_eq!(
            s,
            AwsSettings::default()
                .region("us-east-1")
                .endpoint_url("http://127.0.0.1:5000")
                .max_attempts(2)
                .call_timeout(Duration::from_secs(2))
                .cache_ttl(Duration::from_millis(500))
        );
        let back: AwsSettings = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        let e = toml::from_str::<AwsSettings>("operation_timeout = \"2s\"").unwrap_err();
        assert!(e.to_string().contains("operation_timeout"), "{e}");
    }

    #[test]
    fn debug_hides_an_endpoint_password() {
        let s = AwsSettings::default().endpoint_url("https://user:hunter2@proxy.example");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("proxy.example"), "{shown}");
    }

    #[test]
    fn the_ttl_rule() {
        let ms = Duration::from_millis;
        assert_eq!(cache_ttl_for(ms(500), Some(ms(2000))), ms(500));
        assert_eq!(cache_ttl_for(ms(2000), Some(ms(2000))), ms(1000));
        assert_eq!(cache_ttl_for(ms(9000), Some(ms(2000))), ms(1000));
        assert_eq!(cache_ttl_for(ms(0), Some(ms(0))), ms(0));
        assert_eq!(
            AwsSettings::default()
                .fit_cache_ttl(Some(ms(1000)))
                .cache_ttl,
            ms(500)
        );
    }

    /// A loader that sees only `vars` and an empty file system: the real default chain, on a
    /// fake host.
    fn fake_host(vars: &[(&str, &str)]) -> ConfigLoader {
        aws_config::defaults(BehaviorVersion::latest())
            .env(Env::from_slice(vars))
            .fs(Fs::from_slice(&[]))
    }

    #[tokio::test]
    async fn no_region_anywhere_is_a_configuration_error() {
        let e = AwsSettings::default()
            .sdk_config_from(fake_host(&[
                ("AWS_ACCESS_KEY_ID", "testing"),
                ("AWS_SECRET_ACCESS_KEY", "testing"),
                ("AWS_EC2_METADATA_DISABLED", "true"),
            ]))
            .await
            .unwrap_err();
        assert!(matches!(e, SetupError::NoRegion), "{e:?}");
        assert!(e.to_string().contains("AWS_REGION"), "{e}");
        let core = celery_scale_core::Error::from(e);
        assert_eq!(core.kind(), celery_scale_core::ErrorKind::Config);
        assert!(!core.is_transient());
    }

    #[tokio::test]
    async fn no_credentials_anywhere_is_a_configuration_error() {
        let e = AwsSettings::default()
            .sdk_config_from(fake_host(&[
                ("AWS_REGION", "us-east-1"),
                ("AWS_EC2_METADATA_DISABLED", "true"),
            ]))
            .await
            .unwrap_err();
        assert!(
            matches!(e, SetupError::NoCredentials { source: Some(_) }),
            "{e:?}"
        );
        assert_eq!(e.field(), "credentials");
        assert!(e.to_string().contains("AWS_ACCESS_KEY_ID"), "{e}");
        let c = ConfigError::from(e);
        assert_eq!(c.field, "credentials");
        assert!(c.rule.contains("the chain said"), "{c}");
    }

    #[tokio::test]
    async fn settings_win_over_the_environment_and_credentials_are_checked() {
        let sdk = AwsSettings::default()
            .region("eu-west-1")
            .endpoint_url("http://127.0.0.1:5000")
            .max_attempts(1)
            .sdk_config_from(fake_host(&[
                ("AWS_REGION", "us-east-1"),
                ("AWS_ENDPOINT_URL", "http://elsewhere:1"),
                ("AWS_ACCESS_KEY_ID", "testing"),
                ("AWS_SECRET_ACCESS_KEY", "testing"),
            ]))
            .await
            .unwrap();
        assert_eq!(sdk.region().map(|r| r.as_ref()), Some("eu-west-1"));
        assert_eq!(sdk.endpoint_url(), Some("http://127.0.0.1:5000"));
        assert_eq!(sdk.retry_config().unwrap().max_attempts(), 1);
        // Without overrides the environment's values stand.
        let sdk = AwsSettings::default()
            .sdk_config_from(fake_host(&[
                ("AWS_REGION", "us-east-1"),
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
                ("AWS_ACCESS_KEY_ID", "testing"),
                ("AWS_SECRET_ACCESS_KEY", "testing"),
            ]))
            .await
            .unwrap();
        assert_eq!(sdk.region().map(|r| r.as_ref()), Some("us-east-1"));
        assert_eq!(sdk.endpoint_url(), Some("http://127.0.0.1:5000"));
    }

    /// The real chain on a host whose instance metadata endpoint accepts connections and never
    /// answers (what off-AWS networks with a black-holed 169.254.169.254 do): bounded.
    #[tokio::test]
    async fn a_hanging_metadata_endpoint_fails_within_the_bound() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let imds = format!("http://{}", listener.local_addr().unwrap());
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let started = std::time::Instant::now();
        let e = AwsSettings::default()
            .sdk_config_from(fake_host(&[
                ("AWS_REGION", "us-east-1"),
                ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds),
            ]))
            .await
            .unwrap_err();
        let took = started.elapsed();
        hold.abort();
        assert!(
            took <= CREDENTIALS_TIMEOUT + Duration::from_millis(500),
            "took {took:?}"
        );
        assert_eq!(e.field(), "credentials", "{e}");
        assert!(
            matches!(
                e,
                SetupError::CredentialsTimedOut { .. } | SetupError::NoCredentials { .. }
            ),
            "{e:?}"
        );
        eprintln!("hanging metadata endpoint: {e} after {took:?}");
    }

    #[derive(Debug)]
    struct Hangs;
    impl ProvideCredentials for Hangs {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            future::ProvideCredentials::new(std::future::pending())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_chain_is_bounded() {
        let sdk = SdkConfig::builder()
            .region(Region::new("us-east-1"))
            .credentials_provider(SharedCredentialsProvider::new(Hangs))
            .build();
        let started = tokio::time::Instant::now();
        let e = check_credentials(&sdk, CREDENTIALS_TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), CREDENTIALS_TIMEOUT);
        assert!(
            matches!(e, SetupError::CredentialsTimedOut { after } if after == CREDENTIALS_TIMEOUT)
        );
        let text = e.to_string();
        assert!(
            text.contains("AWS_EC2_METADATA_DISABLED") && text.contains("5s"),
            "{text}"
        );
        // A provider that answers passes.
        let sdk = SdkConfig::builder()
            .region(Region::new("us-east-1"))
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "AKIDEXAMPLE",
                "secret",
                None,
                None,
                "test",
            )))
            .build();
        check_credentials(&sdk, CREDENTIALS_TIMEOUT).await.unwrap();
        let e = check_credentials(&SdkConfig::builder().build(), CREDENTIALS_TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(e, SetupError::NoCredentials { source: None }));
    }

    #[test]
    fn apply_to_adds_a_behavior_version_and_requires_a_region() {
        let bare = SdkConfig::builder().build();
        assert!(matches!(
            AwsSettings::default().apply_to(&bare),
            Err(SetupError::NoRegion)
        ));
        let sdk = AwsSettings::default()
            .region("us-east-1")
            .apply_to(&bare)
            .unwrap();
        assert!(sdk.behavior_version().is_some());
        assert!(matches!(
            AwsSettings::default().max_attempts(0).apply_to(&bare),
            Err(SetupError::Invalid(ref e)) if e.field == "max_attempts"
        ));
    }
}
