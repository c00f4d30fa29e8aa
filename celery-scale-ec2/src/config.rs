//! Configuration: [`AutoScalingSettings`] for the shared client and [`AutoScalingGroupConfig`]
//! for one group. Both are serde structs (unknown fields rejected, durations in humantime form
//! such as `"2s"`) with builder methods, validated at construction.

use std::time::Duration;

use celery_scale_core::ConfigError;
use serde::{Deserialize, Serialize};

/// How the shared [`AutoScalingGroups`](crate::AutoScalingGroups) handle talks to EC2 Auto
/// Scaling.
///
/// Credentials always come from the AWS default chain (environment, profile, web identity,
/// ECS/EC2 roles); they are never part of this configuration.
///
/// ```
/// use std::time::Duration;
/// use celery_scale_ec2::AutoScalingSettings;
/// let s: AutoScalingSettings = toml::from_str(r#"
///     region = "eu-west-1"
///     cache_ttl = "2s"
/// "#).unwrap();
/// assert_eq!(s, AutoScalingSettings::default().region("eu-west-1").cache_ttl(Duration::from_secs(2)));
/// s.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoScalingSettings {
    /// The AWS region; absent: from the environment (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// An endpoint override such as moto's `http://127.0.0.1:5000`; absent: `AWS_ENDPOINT_URL` /
    /// `AWS_ENDPOINT_URL_AUTO_SCALING` if set, else AWS's own endpoint.
    pub endpoint_url: Option<String>,
    /// How long one `DescribeAutoScalingGroups` answer serves every group's `capacity()`.
    /// Keep it below the poll interval; `0s` still coalesces calls made at the same moment.
    /// A `set_desired` invalidates it.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Timeout of each API call (including the SDK's own retries).
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// Attempts per API call, made by the SDK's standard retry strategy (1: no retry).
    pub max_attempts: u32,
}

impl Default for AutoScalingSettings {
    fn default() -> Self {
        AutoScalingSettings {
            region: None,
            endpoint_url: None,
            cache_ttl: Duration::from_secs(1),
            call_timeout: Duration::from_secs(4),
            max_attempts: 3,
        }
    }
}

impl AutoScalingSettings {
    /// Sets [`AutoScalingSettings::region`].
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Sets [`AutoScalingSettings::endpoint_url`].
    pub fn endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.endpoint_url = Some(url.into());
        self
    }

    /// Sets [`AutoScalingSettings::cache_ttl`].
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// Sets [`AutoScalingSettings::call_timeout`].
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Sets [`AutoScalingSettings::max_attempts`].
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Checks every field; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(r) = &self.region
            && (r.trim().is_empty() || r.contains(char::is_whitespace))
        {
            return Err(ConfigError::new(
                "region",
                format!("{r:?} is not a region name such as \"us-east-1\""),
            ));
        }
        if let Some(u) = &self.endpoint_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(ConfigError::new(
                "endpoint_url",
                format!(
                    "{:?} must start with http:// or https://",
                    celery_scale_core::redact_url(u)
                ),
            ));
        }
        if self.call_timeout.is_zero() {
            return Err(ConfigError::new("call_timeout", "must be greater than 0s"));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::new(
                "max_attempts",
                "must be at least 1 (1 means no retry)",
            ));
        }
        Ok(())
    }
}

/// Longest name EC2 Auto Scaling accepts for a group.
const MAX_GROUP_NAME: usize = 255;

fn default_workers_per_instance() -> u32 {
    1
}

/// One Auto Scaling Group of Celery worker instances.
///
/// ```
/// use celery_scale_ec2::AutoScalingGroupConfig;
/// let c: AutoScalingGroupConfig = toml::from_str(r#"
///     group_name = "celery-workers"
///     workers_per_instance = 4
/// "#).unwrap();
/// assert_eq!(c, AutoScalingGroupConfig::new("celery-workers").workers_per_instance(4));
/// assert!(!c.honor_cooldown);
/// assert_eq!(
///     AutoScalingGroupConfig::new("w").workers_per_instance(0).validate().unwrap_err().field,
///     "workers_per_instance"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoScalingGroupConfig {
    /// The group's name (`AutoScalingGroupName`).
    pub group_name: String,
    /// Celery worker processes one instance runs (its `--concurrency`, times the workers
    /// started per instance). Default 1.
    #[serde(default = "default_workers_per_instance")]
    pub workers_per_instance: u32,
    /// Pass `HonorCooldown = true` to `SetDesiredCapacity`, so a set during the group's cooldown
    /// is refused (`ScalingActivityInProgress`, retried later). Default false: the policy's
    /// own stabilization windows do that job.
    #[serde(default)]
    pub honor_cooldown: bool,
}

impl AutoScalingGroupConfig {
    /// The group `group_name`, one worker per instance, cooldown not honoured.
    pub fn new(group_name: impl Into<String>) -> Self {
        AutoScalingGroupConfig {
            group_name: group_name.into(),
            workers_per_instance: 1,
            honor_cooldown: false,
        }
    }

    /// Sets [`AutoScalingGroupConfig::workers_per_instance`].
    pub fn workers_per_instance(mut self, n: u32) -> Self {
        self.workers_per_instance = n;
        self
    }

    /// Sets [`AutoScalingGroupConfig::honor_cooldown`].
    pub fn honor_cooldown(mut self, honor: bool) -> Self {
        self.honor_cooldown = honor;
        self
    }

    /// Checks every field; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.group_name;
        if name.trim().is_empty() {
            return Err(ConfigError::new("group_name", "must not be empty"));
        }
        if name.chars().count() > MAX_GROUP_NAME {
            return Err(ConfigError::new(
                "group_name",
                format!(
                    "is {} characters long; the limit is {MAX_GROUP_NAME}",
                    name.chars().count()
                ),
            ));
        }
        if self.workers_per_instance == 0 {
            return Err(ConfigError::new(
                "workers_per_instance",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_settings_name_the_field() {
        let bad = [
            (AutoScalingSettings::default().region(" "), "region"),
            (
                AutoScalingSettings::default().endpoint_url("127.0.0.1:5000"),
                "endpoint_url",
            ),
            (
                AutoScalingSettings::default().call_timeout(Duration::ZERO),
                "call_timeout",
            ),
            (
                AutoScalingSettings::default().max_attempts(0),
                "max_attempts",
            ),
        ];
        for (s, field) in bad {
            assert_eq!(s.validate().unwrap_err().field, field);
        }
        AutoScalingSettings::default().validate().unwrap();
    }

    #[test]
    fn group_config_rejects_unknown_fields_and_bad_names() {
        let e = toml::from_str::<AutoScalingGroupConfig>("group_name = \"a\"\ngroup = \"b\"")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert_eq!(
            AutoScalingGroupConfig::new("")
                .validate()
                .unwrap_err()
                .field,
            "group_name"
        );
        assert_eq!(
            AutoScalingGroupConfig::new("x".repeat(256))
                .validate()
                .unwrap_err()
                .field,
            "group_name"
        );
        let round: AutoScalingGroupConfig = serde_json::from_str(
            &serde_json::to_string(&AutoScalingGroupConfig::new("g").honor_cooldown(true)).unwrap(),
        )
        .unwrap();
        assert!(round.honor_cooldown);
    }
}
