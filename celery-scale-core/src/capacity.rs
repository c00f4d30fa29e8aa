//! Capacity as a [`Scaler`](crate::Scaler) reports it, and the one conversion between
//! scaler units (ECS tasks, EC2 instances) and Celery worker processes.

use serde::{Deserialize, Serialize};

/// What one unit of a scaler's capacity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CapacityUnit {
    /// One Celery worker process (one task at a time): the unit policies speak in.
    WorkerProcess,
    /// One ECS task, running some number of worker processes.
    EcsTask,
    /// One EC2 instance, running some number of worker processes.
    Ec2Instance,
}

/// A scaler's capacity, in its own units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capacity {
    /// The desired count the target was last set to.
    pub desired: u32,
    /// Units running and serving.
    pub running: u32,
    /// Units starting (ECS `pendingCount`, ASG `Pending*` instances).
    pub pending: u32,
}

/// What a [`Scaler::set_desired`](crate::Scaler::set_desired) call did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetOutcome {
    /// The value asked for, in units.
    pub requested: u32,
    /// The value the target was set to, in units (differs when the target clamps it).
    pub applied: u32,
    /// Why `applied` differs from `requested`, if it does.
    pub note: Option<String>,
}

impl SetOutcome {
    /// The target took the value as asked.
    pub fn applied(units: u32) -> Self {
        SetOutcome {
            requested: units,
            applied: units,
            note: None,
        }
    }
}

/// How many Celery worker processes one scaler unit runs; the only place units and workers
/// are converted.
///
/// A Celery worker started with `--concurrency 4` in each ECS task is 4 workers per task.
///
/// ```
/// # use celery_scale_core::WorkersPerUnit;
/// let per_task = WorkersPerUnit::new(4).unwrap();
/// assert_eq!(per_task.units_for(9), 3); // 9 workers need 3 tasks (rounded up)
/// assert_eq!(per_task.workers_in(3), 12);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct WorkersPerUnit(u32);

impl WorkersPerUnit {
    /// One worker per unit.
    pub const ONE: WorkersPerUnit = WorkersPerUnit(1);

    /// `n` workers per unit; `None` when `n` is 0.
    pub fn new(n: u32) -> Option<Self> {
        (n > 0).then_some(WorkersPerUnit(n))
    }

    /// The number of workers per unit.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Units needed to run `workers` workers (rounded up).
    pub fn units_for(self, workers: u32) -> u32 {
        workers.div_ceil(self.0)
    }

    /// Workers that `units` units run.
    pub fn workers_in(self, units: u32) -> u32 {
        units.saturating_mul(self.0)
    }

    /// A unit capacity expressed in workers.
    pub fn capacity_in_workers(self, c: Capacity) -> Capacity {
        Capacity {
            desired: self.workers_in(c.desired),
            running: self.workers_in(c.running),
            pending: self.workers_in(c.pending),
        }
    }
}

impl TryFrom<u32> for WorkersPerUnit {
    type Error = crate::ConfigError;
    fn try_from(n: u32) -> Result<Self, Self::Error> {
        WorkersPerUnit::new(n)
            .ok_or_else(|| crate::ConfigError::new("workers_per_unit", "must be at least 1"))
    }
}

impl From<WorkersPerUnit> for u32 {
    fn from(w: WorkersPerUnit) -> u32 {
        w.0
    }
}

impl Default for WorkersPerUnit {
    fn default() -> Self {
        WorkersPerUnit::ONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_rounds_up() {
        let w = WorkersPerUnit::new(3).unwrap();
        assert_eq!(w.units_for(0), 0);
        assert_eq!(w.units_for(1), 1);
        assert_eq!(w.units_for(3), 1);
        assert_eq!(w.units_for(4), 2);
        assert!(WorkersPerUnit::new(0).is_none());
        let c = w.capacity_in_workers(Capacity {
            desired: 2,
            running: 1,
            pending: 1,
        });
        assert_eq!((c.desired, c.running, c.pending), (6, 3, 3));
    }
}
