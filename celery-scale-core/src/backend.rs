//! The two I/O traits: [`QueueSource`] observes a backlog, [`Scaler`] reads and sets capacity.

use std::fmt::Debug;

use async_trait::async_trait;

use crate::protection::UnitProtection;
use crate::{Capacity, CapacityUnit, Observation, Result, SetOutcome, WorkersPerUnit};

/// Observes the backlog of one set of Celery queues.
///
/// Implementations do I/O and are chosen at run time (`Box<dyn QueueSource>`). An observation
/// either succeeds with what the broker really says or fails with a typed [`crate::Error`]:
/// never a guess and never zero in place of "unknown".
#[async_trait]
pub trait QueueSource: Send + Sync + Debug + 'static {
    /// Reads the backlog now.
    async fn observe(&self) -> Result<Observation>;

    /// Whether what the source watches in the background (Celery's worker events) has been up
    /// long enough to have heard every worker: before that its observations say the worker
    /// figures are unknown. A one-shot check waits for this before it observes. `true` for a
    /// source with nothing to warm up (the default).
    fn is_warmed_up(&self) -> bool {
        true
    }

    /// Stops what the source runs in the background and closes its connections. The source
    /// may not be observed afterwards. Does nothing by default.
    async fn close(&self) {}
}

/// Reads and sets the capacity of one compute target (an ECS service, an Auto Scaling Group, ...).
#[async_trait]
pub trait Scaler: Send + Sync + Debug + 'static {
    /// What one unit of capacity is.
    fn unit(&self) -> CapacityUnit;

    /// How many Celery worker processes one unit runs.
    fn workers_per_unit(&self) -> WorkersPerUnit;

    /// Reads desired, running and pending capacity, in units.
    async fn capacity(&self) -> Result<Capacity>;

    /// Sets the desired capacity, in units. Setting the value the target already has is harmless.
    async fn set_desired(&self, units: u32) -> Result<SetOutcome>;

    /// The target's scale-in protection, when it has one and it is turned on: the loop then
    /// protects the units whose workers execute tasks before it lowers the desired count, and
    /// releases them once idle. `None` (the default): the platform picks which units stop.
    fn protection(&self) -> Option<&dyn UnitProtection> {
        None
    }
}

#[async_trait]
impl<T: QueueSource + ?Sized> QueueSource for Box<T> {
    async fn observe(&self) -> Result<Observation> {
        (**self).observe().await
    }
    fn is_warmed_up(&self) -> bool {
        (**self).is_warmed_up()
    }
    async fn close(&self) {
        (**self).close().await
    }
}

#[async_trait]
impl<T: QueueSource + ?Sized> QueueSource for std::sync::Arc<T> {
    async fn observe(&self) -> Result<Observation> {
        (**self).observe().await
    }
    fn is_warmed_up(&self) -> bool {
        (**self).is_warmed_up()
    }
    async fn close(&self) {
        (**self).close().await
    }
}

#[async_trait]
impl<T: Scaler + ?Sized> Scaler for Box<T> {
    fn unit(&self) -> CapacityUnit {
        (**self).unit()
    }
    fn workers_per_unit(&self) -> WorkersPerUnit {
        (**self).workers_per_unit()
    }
    async fn capacity(&self) -> Result<Capacity> {
        (**self).capacity().await
    }
    async fn set_desired(&self, units: u32) -> Result<SetOutcome> {
        (**self).set_desired(units).await
    }

    fn protection(&self) -> Option<&dyn UnitProtection> {
        (**self).protection()
    }
}

#[async_trait]
impl<T: Scaler + ?Sized> Scaler for std::sync::Arc<T> {
    fn unit(&self) -> CapacityUnit {
        (**self).unit()
    }
    fn workers_per_unit(&self) -> WorkersPerUnit {
        (**self).workers_per_unit()
    }
    async fn capacity(&self) -> Result<Capacity> {
        (**self).capacity().await
    }
    async fn set_desired(&self, units: u32) -> Result<SetOutcome> {
        (**self).set_desired(units).await
    }

    fn protection(&self) -> Option<&dyn UnitProtection> {
        (**self).protection()
    }
}
