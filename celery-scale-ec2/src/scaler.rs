//! [`AutoScalingGroupScaler`]: the [`Scaler`] of one Auto Scaling Group.

use async_trait::async_trait;
use celery_scale_core::protection::{Unit, UnitProtection};
use celery_scale_core::{Capacity, CapacityUnit, Result, Scaler, SetOutcome, WorkersPerUnit};

use crate::{AutoScalingGroupConfig, AutoScalingGroups};

/// The [`Scaler`] of one EC2 Auto Scaling Group: one unit is one instance (or one unit of
/// instance weight) running `workers_per_instance` Celery worker processes.
///
/// - `capacity()`: desired = `DesiredCapacity`; running = instances `InService`; pending =
///   instances `Pending`, `Pending:Wait`, `Pending:Proceed`. Instances `Terminating*` (still
///   finishing tasks behind a lifecycle hook), in `Standby` or detaching count as neither. Read
///   through the shared [`AutoScalingGroups`] round.
/// - `set_desired(n)`: clamps `n` to the group's own `MinSize..=MaxSize` (EC2 Auto Scaling
///   refuses values outside them; moto does not, so the clamp is ours) and says so in
///   [`SetOutcome::note`]; calls `SetDesiredCapacity` (with `HonorCooldown` as configured) only
///   when the clamped value differs from the group's desired capacity.
/// - `protection()`: with [`AutoScalingGroupConfig::protect_busy_units`] on, the
///   [`UnitProtection`] of the group's instances (see below); `None` otherwise.
///
/// As [`UnitProtection`]:
/// - `units()`: the group's instances from the same shared `DescribeAutoScalingGroups` round
///   as `capacity()` (so the plan and the count it lowers from are one view), each a [`Unit`]
///   whose id is the instance id, `protected` = `ProtectedFromScaleIn`, no expiry, and
///   `stopping` for `Terminating*`, `Terminated`, `Detaching`, `Detached` and
///   `Warmed:Terminating*` (a stopping instance reads as unprotected: there is nothing left to
///   protect or release). No aliases: the private addresses would need `ec2:DescribeInstances`,
///   so a worker maps to its instance by the instance id in its node name
///   (`celery@i-0abc1234def567890`).
/// - `set_protected(ids, p)`: `SetInstanceProtection`, at most
///   [`INSTANCES_PER_PROTECTION_CALL`](crate::INSTANCES_PER_PROTECTION_CALL) ids a call; it
///   invalidates the shared round so the next read (the `set_desired` that follows) is fresh.
///
/// Made by [`AutoScalingGroups::scaler`].
#[derive(Debug, Clone)]
pub struct AutoScalingGroupScaler {
    groups: AutoScalingGroups,
    config: AutoScalingGroupConfig,
    per_instance: WorkersPerUnit,
}

impl AutoScalingGroupScaler {
    /// `config` must be valid (checked by [`AutoScalingGroups::scaler`]).
    pub(crate) fn new(groups: AutoScalingGroups, config: AutoScalingGroupConfig) -> Self {
        let per_instance = WorkersPerUnit::new(config.workers_per_instance).unwrap_or_default();
        AutoScalingGroupScaler {
            groups,
            config,
            per_instance,
        }
    }

    /// The group's name.
    pub fn group_name(&self) -> &str {
        &self.config.group_name
    }

    /// The configuration.
    pub fn config(&self) -> &AutoScalingGroupConfig {
        &self.config
    }

    /// The shared handle this scaler reads through.
    pub fn groups(&self) -> &AutoScalingGroups {
        &self.groups
    }
}

#[async_trait]
impl Scaler for AutoScalingGroupScaler {
    fn unit(&self) -> CapacityUnit {
        CapacityUnit::Ec2Instance
    }

    fn workers_per_unit(&self) -> WorkersPerUnit {
        self.per_instance
    }

    async fn capacity(&self) -> Result<Capacity> {
        let snap = self.groups.snapshot(&self.config.group_name).await?;
        Ok(snap.capacity())
    }

    async fn set_desired(&self, units: u32) -> Result<SetOutcome> {
        let group = &self.config.group_name;
        let snap = self.groups.snapshot(group).await?;
        let applied = snap.clamp(units);
        let note = (applied != units).then(|| {
            format!(
                "clamped to {applied}: {units} is outside group '{group}' MinSize..MaxSize {}..{}",
                snap.min_size, snap.max_size
            )
        });
        if let Some(note) = &note {
            tracing::info!(group = %group, requested = units, applied, "{note}");
        }
        if applied != snap.desired {
            self.groups
                .set_desired_capacity(group, applied, self.config.honor_cooldown)
                .await?;
            tracing::info!(
                group = %group,
                from = snap.desired,
                to = applied,
                honor_cooldown = self.config.honor_cooldown,
                "set Auto Scaling group desired capacity"
            );
        }
        Ok(SetOutcome {
            requested: units,
            applied,
            note,
        })
    }

    fn protection(&self) -> Option<&dyn UnitProtection> {
        self.config
            .protect_busy_units
            .then_some(self as &dyn UnitProtection)
    }
}

#[async_trait]
impl UnitProtection for AutoScalingGroupScaler {
    async fn units(&self) -> Result<Vec<Unit>> {
        let snap = self.groups.snapshot(&self.config.group_name).await?;
        Ok(snap
            .instances
            .iter()
            .map(|i| {
                let stopping = i.is_stopping();
                Unit {
                    id: i.instance_id.clone(),
                    aliases: Vec::new(),
                    protected: i.protected_from_scale_in && !stopping,
                    protected_until: None,
                    stopping,
                }
            })
            .collect())
    }

    async fn set_protected(&self, ids: &[String], protected: bool) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let group = &self.config.group_name;
        self.groups
            .set_instance_protection(group, ids, protected)
            .await?;
        tracing::info!(
            group = %group,
            instances = %ids.join(","),
            protected,
            "set instance scale-in protection"
        );
        Ok(())
    }
}
