//! Configuration: [`AutoScalingGroupConfig`] for one group (a serde struct, unknown fields
//! rejected, with builder methods, validated at construction). The shared handle's settings are
//! [`celery_scale_aws::AwsSettings`].

use celery_scale_core::ConfigError;
use serde::{Deserialize, Serialize};

/// Longest name EC2 Auto Scaling accepts for a group.
const MAX_GROUP_NAME: usize = 255;

/// The most worker processes one instance may say it runs
/// ([`AutoScalingGroupConfig::workers_per_instance`]): 1024, already far more Celery pool
/// processes than one instance sensibly runs. A larger value is a typo, and would make one unit
/// of capacity stand for that many workers.
pub const MAX_WORKERS_PER_INSTANCE: u32 = 1024;

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
/// assert!(!c.protect_busy_units, "scale-in protection is opt-in");
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
    /// started per instance): 1 to [`MAX_WORKERS_PER_INSTANCE`]. Default 1.
    #[serde(default = "default_workers_per_instance")]
    pub workers_per_instance: u32,
    /// Pass `HonorCooldown = true` to `SetDesiredCapacity`, so a set during the group's cooldown
    /// is refused (`ScalingActivityInProgress`, retried later). Default false: the policy's
    /// own stabilization windows do that job.
    #[serde(default)]
    pub honor_cooldown: bool,
    /// Scale-in protection owned by the loop (default false). When true, before it lowers
    /// `DesiredCapacity` the binding sets `ProtectedFromScaleIn` (`SetInstanceProtection`) on
    /// the instances whose Celery workers execute tasks, so Auto Scaling terminates idle
    /// instances first, and releases it once their workers are idle. A worker maps to its
    /// instance by the instance id in its node name (`celery@i-0abc1234def567890`). Needs
    /// `autoscaling:SetInstanceProtection` on the group (see `docs/ec2.md`).
    #[serde(default)]
    pub protect_busy_units: bool,
}

impl AutoScalingGroupConfig {
    /// The group `group_name`, one worker per instance, cooldown not honoured.
    pub fn new(group_name: impl Into<String>) -> Self {
        AutoScalingGroupConfig {
            group_name: group_name.into(),
            workers_per_instance: 1,
            honor_cooldown: false,
            protect_busy_units: false,
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

    /// Sets [`AutoScalingGroupConfig::protect_busy_units`].
    pub fn protect_busy_units(mut self, protect: bool) -> Self {
        self.protect_busy_units = protect;
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
        if self.workers_per_instance > MAX_WORKERS_PER_INSTANCE {
            return Err(ConfigError::new(
                "workers_per_instance",
                format!(
                    "{} is above the maximum {MAX_WORKERS_PER_INSTANCE} (Celery processes per \
                     instance)",
                    self.workers_per_instance
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let on: AutoScalingGroupConfig =
            toml::from_str("group_name = \"a\"\nprotect_busy_units = true").unwrap();
        assert_eq!(
            on,
            AutoScalingGroupConfig::new("a").protect_busy_units(true)
        );
    }

    #[test]
    fn workers_per_instance_is_bounded() {
        let at = |n: u32| AutoScalingGroupConfig::new("g").workers_per_instance(n);
        at(1).validate().unwrap();
        at(MAX_WORKERS_PER_INSTANCE).validate().unwrap();
        for n in [0, MAX_WORKERS_PER_INSTANCE + 1, 4_000_000_000] {
            let e = at(n).validate().unwrap_err();
            assert_eq!(e.field, "workers_per_instance", "{n}: {e}");
        }
        let e = at(4_000_000_000).validate().unwrap_err();
        assert!(e.rule.contains("above the maximum 1024"), "{e}");
    }
}
