//! Layers: wrappers that add one behaviour to any [`ScalingPolicy`], in the spirit of tower's
//! `Layer`. Each is a policy itself, so they compose:
//!
//! ```
//! use std::time::Duration;
//! use celery_scale_core::layer::{PolicyExt, StepLimit};
//! use celery_scale_core::policy::TargetBacklog;
//!
//! # fn main() -> Result<(), celery_scale_core::ConfigError> {
//! let policy = TargetBacklog::new(5.0)?
//!     .in_flight_floor(4)?
//!     .activation(1, Duration::from_secs(120))
//!     .stabilize(Duration::ZERO, Duration::from_secs(300))
//!     .max_step_up(StepLimit::new(10, 100, Duration::from_secs(15))?)
//!     .bounded(0, 50)?
//!     .fallback(3, Some(2));
//! # let _ = policy; Ok(()) }
//! ```
//!
//! Layers apply from the innermost out; the [`Decision`](crate::policy::Decision) records each
//! one's effect in order.

mod activation;
mod bounds;
mod fallback;
mod forecast;
mod history;
mod in_flight_floor;
mod max_step;
mod rent_or_buy;
mod schedule;
mod stabilize;

use std::time::Duration;

pub use activation::Activation;
pub use bounds::Bounded;
pub use fallback::Fallback;
pub use forecast::{Forecast, ForecastSettings};
pub use in_flight_floor::InFlightFloor;
pub use max_step::{MaxStep, StepLimit};
pub use rent_or_buy::RentOrBuy;
pub use schedule::{ScheduleWindow, ScheduledFloor};
pub use stabilize::Stabilize;

use crate::{ConfigError, policy::ScalingPolicy};

/// Builder methods that wrap a policy in a layer.
pub trait PolicyExt: ScalingPolicy + Sized {
    /// Keeps the desired count within `min..=max` workers. Fails when `max < min`.
    fn bounded(self, min: u32, max: u32) -> Result<Bounded<Self>, ConfigError> {
        Bounded::new(self, min, max)
    }

    /// Scale from zero only at `activate_at` or more outstanding messages, and to zero only
    /// after the queues have been idle for `idle_for`.
    fn activation(self, activate_at: u64, idle_for: Duration) -> Activation<Self> {
        Activation::new(self, activate_at, idle_for)
    }

    /// HPA-style stabilization windows: scale out to the lowest recommendation of the last
    /// `up` window, scale in to the highest recommendation of the last `down` window.
    fn stabilize(self, up: Duration, down: Duration) -> Stabilize<Self> {
        Stabilize::new(self, up, down)
    }

    /// Limits how fast capacity grows.
    fn max_step_up(self, limit: StepLimit) -> MaxStep<Self> {
        MaxStep::new(self, Some(limit), None)
    }

    /// Limits how fast capacity shrinks.
    fn max_step_down(self, limit: StepLimit) -> MaxStep<Self> {
        MaxStep::new(self, None, Some(limit))
    }

    /// Never fewer workers than the tasks executing, nor than the workers holding in-flight
    /// messages (`held_per_worker` messages each, Celery's prefetch multiplier). Fails when
    /// `held_per_worker` is 0.
    fn in_flight_floor(self, held_per_worker: u32) -> Result<InFlightFloor<Self>, ConfigError> {
        InFlightFloor::new(self, held_per_worker)
    }

    /// Cuts a scale-out to the new workers that the waiting work keeps busy for at least a
    /// start-up each (`startup` when given, else measured from the target); does nothing while
    /// the task time, the start-up or the held count is unknown.
    fn rent_or_buy(self, startup: Option<Duration>) -> RentOrBuy<Self> {
        RentOrBuy::new(self, startup)
    }

    /// At least a window's `min_workers` while the decision's wall-clock time is in one of
    /// `windows` (the highest floor where several hold).
    fn scheduled_floor(self, windows: Vec<ScheduleWindow>) -> ScheduledFloor<Self> {
        ScheduledFloor::new(self, windows)
    }

    /// At least what was asked for at the same time (up to the lead ahead) of each of the last
    /// `cycles` periods: capacity ready for a recurring peak.
    fn forecast(self, settings: ForecastSettings) -> Forecast<Self> {
        Forecast::new(self, settings)
    }

    /// After `after_failures` failed observations in a row: hold (`None`), or raise to at least
    /// `capacity` workers. Never lowers capacity.
    fn fallback(self, after_failures: u32, capacity: Option<u32>) -> Fallback<Self> {
        Fallback::new(self, after_failures, capacity)
    }

    /// Boxes the policy for run-time choice.
    fn boxed(self) -> Box<dyn ScalingPolicy>
    where
        Self: 'static,
    {
        Box::new(self)
    }
}

impl<P: ScalingPolicy + Sized> PolicyExt for P {}

#[cfg(test)]
pub(crate) mod testing {
    //! A scripted policy for layer tests.
    use crate::policy::{Decision, PolicyInput, ScalingPolicy};
    use crate::{Capacity, Observation};
    use tokio::time::Instant;

    /// Answers whatever `next` says.
    #[derive(Debug, Default)]
    pub struct Scripted {
        pub next: u32,
    }

    impl ScalingPolicy for Scripted {
        fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
            if input.observation.is_none() {
                return Decision::hold("scripted", input);
            }
            Decision::new("scripted", input.capacity.desired, self.next, "scripted")
        }
    }

    pub fn input(obs: &Observation, current: u32, now: Instant) -> PolicyInput<'_> {
        PolicyInput {
            observation: Some(obs),
            consecutive_failures: 0,
            capacity: Capacity {
                desired: current,
                running: current,
                pending: 0,
            },
            now,
            wall: std::time::SystemTime::UNIX_EPOCH,
        }
    }
}
