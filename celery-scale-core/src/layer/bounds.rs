use crate::ConfigError;
use crate::policy::{Decision, PolicyInput, ScalingPolicy};

/// Keeps the desired count within `min..=max` workers.
#[derive(Debug, Clone)]
pub struct Bounded<P> {
    inner: P,
    min: u32,
    max: u32,
}

impl<P> Bounded<P> {
    /// Wraps `inner`; fails when `max < min`.
    pub fn new(inner: P, min: u32, max: u32) -> Result<Self, ConfigError> {
        if max < min {
            return Err(ConfigError::new(
                "max_workers",
                format!("{max} is below min_workers {min}"),
            ));
        }
        Ok(Bounded { inner, min, max })
    }
}

impl<P: ScalingPolicy> ScalingPolicy for Bounded<P> {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let mut d = self.inner.decide(input);
        let clamped = d.desired.clamp(self.min, self.max);
        let note = if clamped > d.desired {
            format!("raised to min_workers {}", self.min)
        } else if clamped < d.desired {
            format!("capped at max_workers {}", self.max)
        } else {
            format!("within {}..={}", self.min, self.max)
        };
        d.push("bounds", clamped, note);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Observation;
    use crate::layer::testing::{Scripted, input};
    use tokio::time::Instant;

    #[test]
    fn clamps_both_ways() {
        let now = Instant::now();
        let obs = Observation::new(0, now);
        let mut p = Bounded::new(Scripted { next: 0 }, 2, 5).unwrap();
        assert_eq!(p.decide(&input(&obs, 3, now)).desired, 2);
        p.inner.next = 9;
        let d = p.decide(&input(&obs, 3, now));
        assert_eq!(d.desired, 5);
        assert_eq!(d.reason(), "capped at max_workers 5");
        assert!(Bounded::new(Scripted::default(), 3, 1).is_err());
    }
}
