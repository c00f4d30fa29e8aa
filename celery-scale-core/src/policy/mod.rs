//! Scaling policies: pure, synchronous functions from what was observed to how many workers
//! should run, with the reason.
//!
//! A policy speaks in **worker processes** (one Celery task at a time each); the loop converts
//! to the scaler's units with [`WorkersPerUnit`](crate::WorkersPerUnit). Policies never read a
//! clock: the time is part of the [`PolicyInput`], so the simulator and the tests drive them in
//! virtual time. Behaviour that needs memory (stabilization, rate limits, scale to zero) lives in
//! [layers](crate::layer) that wrap a policy.

mod drain_time;
mod target_backlog;

use std::fmt::Debug;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use drain_time::DrainTime;
pub use target_backlog::TargetBacklog;

use crate::{Capacity, Observation};

/// Everything a policy may look at.
#[derive(Debug, Clone, Copy)]
pub struct PolicyInput<'a> {
    /// The fresh observation, or `None` when the observation failed or is stale.
    pub observation: Option<&'a Observation>,
    /// Observations that failed in a row before (and including) this tick; 0 when fresh.
    pub consecutive_failures: u32,
    /// The target's current capacity, in workers.
    pub capacity: Capacity,
    /// The time of the decision.
    pub now: Instant,
    /// The wall-clock time of the decision, for calendar rules such as
    /// [`ScheduledFloor`](crate::layer::ScheduledFloor). The loop reads it from its
    /// [`WallClock`] (the system clock unless set otherwise; the simulator anchors it to its
    /// virtual time, so runs stay deterministic). Policies and layers that are not about the
    /// calendar never read it.
    pub wall: SystemTime,
}

/// Where the loop reads the wall-clock time it hands to policies ([`PolicyInput::wall`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WallClock {
    /// The system clock, at each decision.
    #[default]
    System,
    /// `wall` at the instant `at` of the loop's (Tokio) clock, advancing with that clock: a
    /// paused or simulated clock drives the calendar deterministically.
    Anchored {
        /// The wall-clock time at `at`.
        wall: SystemTime,
        /// The instant of the loop's clock that `wall` corresponds to.
        at: Instant,
    },
}

impl WallClock {
    /// The wall-clock time at the loop's instant `now`.
    pub fn at(&self, now: Instant) -> SystemTime {
        match *self {
            WallClock::System => SystemTime::now(),
            WallClock::Anchored { wall, at } => {
                if now >= at {
                    wall + now.duration_since(at)
                } else {
                    wall - at.duration_since(now)
                }
            }
        }
    }
}

/// One stage of a decision: a policy or a layer, what it made of the value, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The policy or layer, e.g. `target_backlog`, `bounds`, `stabilize`.
    pub stage: String,
    /// The desired worker count this stage received (for the base policy, the current desired).
    pub before: u32,
    /// The desired worker count after this stage.
    pub after: u32,
    /// Why, in words.
    pub note: String,
}

/// A policy's answer: the desired number of worker processes and the stages that led to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Desired worker processes.
    pub desired: u32,
    /// The base policy first, then each layer from the innermost out.
    pub steps: Vec<Step>,
}

impl Decision {
    /// A decision made by a base policy.
    pub fn new(stage: &str, before: u32, desired: u32, note: impl Into<String>) -> Self {
        Decision {
            desired,
            steps: vec![Step {
                stage: stage.to_string(),
                before,
                after: desired,
                note: note.into(),
            }],
        }
    }

    /// Hold at the current desired value because there is no fresh observation.
    pub fn hold(stage: &str, input: &PolicyInput<'_>) -> Self {
        let current = input.capacity.desired;
        Decision::new(
            stage,
            current,
            current,
            format!(
                "hold at {current}: no fresh observation ({} failed in a row)",
                input.consecutive_failures
            ),
        )
    }

    /// Records a layer's effect and sets the desired value to `after`.
    pub fn push(&mut self, stage: &str, after: u32, note: impl Into<String>) {
        self.steps.push(Step {
            stage: stage.to_string(),
            before: self.desired,
            after,
            note: note.into(),
        });
        self.desired = after;
    }

    /// The reason in one sentence: the note of the last stage that changed the value, or the
    /// base policy's note when no layer did.
    pub fn reason(&self) -> &str {
        self.steps
            .iter()
            .skip(1)
            .rev()
            .find(|s| s.before != s.after)
            .or(self.steps.first())
            .map_or("", |s| s.note.as_str())
    }
}

/// Decides how many worker processes should run.
///
/// Object-safe; `&mut self` because layers remember recent recommendations. Must be
/// deterministic: the same sequence of inputs gives the same sequence of decisions.
pub trait ScalingPolicy: Send + Sync + Debug {
    /// The decision for this input.
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision;
}

impl<P: ScalingPolicy + ?Sized> ScalingPolicy for Box<P> {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        (**self).decide(input)
    }
}

/// Runs `policy` and enforces the rules no policy or layer may break: **a fault never becomes
/// a scale-in, and unknown is never zero**.
///
/// - Without a fresh observation the result is never below the current desired value.
/// - While the source watches worker events but cannot tell the figures
///   ([`Observation::workers_unknown`]: the feed is down or warming up, a worker is silent),
///   every running worker may be executing a task: the result is never below the running
///   workers (nor below the tasks last heard executing, up to the workers the target keeps),
///   unless the target's desired count is already lower. Scale-out on the backlog is untouched.
pub fn decide_guarded(policy: &mut dyn ScalingPolicy, input: &PolicyInput<'_>) -> Decision {
    let mut decision = policy.decide(input);
    let current = input.capacity.desired;
    match input.observation {
        None if decision.desired < current => decision.push(
            "fault_guard",
            current,
            format!("no fresh observation: keep {current}, never scale in on missing data"),
        ),
        Some(obs) => {
            if let Some((floor, why)) = unknown_workers_floor(obs, input)
                && decision.desired < floor
            {
                decision.push(
                    "unknown_workers_guard",
                    floor,
                    format!(
                        "scale-in held at {floor}: worker figures unknown ({why}), so every \
                         running worker may be busy"
                    ),
                );
            }
        }
        None => {}
    }
    decision
}

/// While `obs` says the worker figures are unknown: the fewest workers that may run, with why
/// they are unknown. Every running worker may be executing (and the tasks last heard execute,
/// up to the workers the target keeps), but never more than the target's desired count already
/// is: this floor holds a scale-in, it never raises capacity. `None` when the figures are known
/// or not watched.
pub(crate) fn unknown_workers_floor<'o>(
    obs: &'o Observation,
    input: &PolicyInput<'_>,
) -> Option<(u32, &'o str)> {
    let unknown = obs.workers_unknown.as_ref()?;
    let running = u64::from(input.capacity.running);
    let heard = unknown.executing_at_least.min(kept_workers(input));
    let floor = u32::try_from(running.max(heard))
        .unwrap_or(u32::MAX)
        .min(input.capacity.desired);
    Some((floor, unknown.why.as_str()))
}

/// The workers the target keeps, for counting busy ones: the larger of its desired and running
/// counts. Tasks executing beyond that run on workers being stopped (they finish, then leave;
/// Celery reports them offline when the warm shutdown begins, but the event may not be read
/// yet); workers kept by scale-in protection count as running.
pub(crate) fn kept_workers(input: &PolicyInput<'_>) -> u64 {
    u64::from(input.capacity.desired.max(input.capacity.running))
}

/// The per-worker rate limit used by [`DrainTime`] and by the simulator's default: how many
/// tasks one worker can start within `window` at `throughput` tasks per second (at least one).
pub(crate) fn tasks_per_worker_within(throughput: f64, window_s: f64) -> f64 {
    (throughput * window_s).max(1.0)
}
