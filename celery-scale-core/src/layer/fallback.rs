use crate::policy::{Decision, PolicyInput, ScalingPolicy};

/// What to do once observations keep failing (KEDA's `fallback`): after `after_failures`
/// failures in a row, hold (`capacity` = `None`) or raise to at least `capacity` workers so that
/// tasks keep running while the broker cannot be read. It never lowers capacity.
#[derive(Debug, Clone)]
pub struct Fallback<P> {
    inner: P,
    after_failures: u32,
    capacity: Option<u32>,
}

impl<P> Fallback<P> {
    /// Wraps `inner`.
    pub fn new(inner: P, after_failures: u32, capacity: Option<u32>) -> Self {
        Fallback {
            inner,
            after_failures: after_failures.max(1),
            capacity,
        }
    }
}

impl<P: ScalingPolicy> ScalingPolicy for Fallback<P> {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let mut d = self.inner.decide(input);
        if input.observation.is_some() || input.consecutive_failures < self.after_failures {
            return d;
        }
        let current = input.capacity.desired;
        let target = self.capacity.map_or(current, |c| c.max(current));
        let note = match self.capacity {
            Some(c) if c > current => format!(
                "fallback after {} failed observations: raise to {c}",
                input.consecutive_failures
            ),
            _ => format!(
                "fallback after {} failed observations: hold at {current}",
                input.consecutive_failures
            ),
        };
        d.push("fallback", target, note);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Capacity;
    use crate::layer::testing::Scripted;
    use tokio::time::Instant;

    fn failing(failures: u32, current: u32) -> PolicyInput<'static> {
        PolicyInput {
            observation: None,
            consecutive_failures: failures,
            capacity: Capacity {
                desired: current,
                running: current,
                pending: 0,
            },
            now: Instant::now(),
            wall: std::time::SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn raises_after_n_failures_never_lowers() {
        let mut p = Fallback::new(Scripted::default(), 3, Some(4));
        assert_eq!(p.decide(&failing(2, 1)).desired, 1, "not yet");
        assert_eq!(p.decide(&failing(3, 1)).desired, 4);
        assert_eq!(p.decide(&failing(5, 7)).desired, 7, "never lowers");
        let mut hold = Fallback::new(Scripted::default(), 1, None);
        assert_eq!(hold.decide(&failing(1, 2)).desired, 2);
    }
}
