use crate::ConfigError;
use crate::policy::{Decision, PolicyInput, ScalingPolicy};

/// One worker per `messages_per_worker` outstanding messages (ready + held by workers), as
/// KEDA's `listLength`/`queueLength` target does, but counting in-flight work too.
///
/// ```
/// # use celery_scale_core::{policy::*, Capacity, Observation};
/// # let now = tokio::time::Instant::now();
/// let mut p = TargetBacklog::new(5.0).unwrap();
/// let obs = Observation::new(12, now);
/// let input = PolicyInput { observation: Some(&obs), consecutive_failures: 0, capacity: Capacity::default(), now, wall: std::time::SystemTime::UNIX_EPOCH };
/// assert_eq!(p.decide(&input).desired, 3); // ceil(12 / 5)
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TargetBacklog {
    messages_per_worker: f64,
}

impl TargetBacklog {
    /// A policy targeting `messages_per_worker` outstanding messages per worker (> 0).
    pub fn new(messages_per_worker: f64) -> Result<Self, ConfigError> {
        if !(messages_per_worker.is_finite() && messages_per_worker > 0.0) {
            return Err(ConfigError::new(
                "messages_per_worker",
                format!("{messages_per_worker} must be a positive number"),
            ));
        }
        Ok(TargetBacklog {
            messages_per_worker,
        })
    }
}

impl ScalingPolicy for TargetBacklog {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let Some(obs) = input.observation else {
            return Decision::hold("target_backlog", input);
        };
        let outstanding = obs.outstanding();
        let desired = (outstanding as f64 / self.messages_per_worker).ceil();
        let desired = desired.min(u32::MAX as f64) as u32;
        Decision::new(
            "target_backlog",
            input.capacity.desired,
            desired,
            format!(
                "{outstanding} outstanding ({} ready) / {} per worker = {desired} workers",
                obs.ready, self.messages_per_worker
            ),
        )
    }
}
