//! KEDA's list-length scaler driving the Kubernetes HPA.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use celery_scale_core::policy::{Decision, PolicyInput, ScalingPolicy};

use super::due;

/// KEDA's Redis list / RabbitMQ queue-length scaler driving the Kubernetes HPA, with their
/// defaults:
///
/// - The metric is the **list length** (ready messages only: `LLEN`, or RabbitMQ's ready count
///   in `QueueLength` mode), not in-flight or executing work (KEDA docs, `redis-lists` and
///   `rabbitmq-queue`).
/// - KEDA's operator polls the scaler every `pollingInterval` = 30 s. From zero it activates
///   the deployment (0 -> 1) at a poll that sees the metric above `activationListLength` = 0;
///   it scales back to zero once the metric has been 0 for `cooldownPeriod` = 300 s.
/// - Between 1 and max the HPA syncs every 15 s (`--horizontal-pod-autoscaler-sync-period`).
///   With KEDA's default `useCachedMetrics: false` each sync queries the scaler afresh
///   ([`Keda::new`]); with `useCachedMetrics: true` it reads the value of the last poll
///   ([`Keda::cached`]).
/// - At each sync: desired = ceil(metric / target) for an `AverageValue` target, skipped when
///   the ratio is within the 0.1 tolerance; scale-down stabilized over 300 s (the highest
///   recommendation newer than now - 300 s wins); scale-up limited by the default policies
///   (the larger of +4 pods and +100% per 15 s) from the replicas at the start of the period:
///   current minus the replicas added by scale-up events **strictly newer** than now - 15 s
///   (kubernetes `pkg/controller/podautoscaler/horizontal.go`: `getReplicasChangePerPeriod`
///   counts `rec.timestamp.After(cutoff)`), so the previous sync's event, exactly 15 s old, no
///   longer counts and the fleet can double at every sync.
#[derive(Debug, Clone)]
pub struct Keda {
    target: f64,
    min: u32,
    max: u32,
    cached: bool,
    /// The metric of the last poll.
    polled: Option<u64>,
    last_poll: Option<Instant>,
    last_sync: Option<Instant>,
    last_active: Option<Instant>,
    recommendations: VecDeque<(Instant, u32)>,
    /// (time, replicas added) of each HPA scale-up.
    scale_ups: VecDeque<(Instant, u32)>,
}

impl Keda {
    /// Polling interval.
    pub const POLLING: Duration = Duration::from_secs(30);
    /// HPA sync period.
    pub const SYNC: Duration = Duration::from_secs(15);
    /// HPA tolerance.
    pub const TOLERANCE: f64 = 0.1;
    /// HPA scale-down stabilization window.
    pub const STABILIZE_DOWN: Duration = Duration::from_secs(300);
    /// Period of the HPA's default scale-up policies.
    pub const SCALE_UP_PERIOD: Duration = Duration::from_secs(15);
    /// KEDA cooldown before scaling to zero.
    pub const COOLDOWN: Duration = Duration::from_secs(300);

    /// KEDA's defaults (`useCachedMetrics: false`): `target` messages per replica (worker),
    /// `min..=max` replicas (min 0 allows zero).
    pub fn new(target: f64, min: u32, max: u32) -> Self {
        Keda {
            target: target.max(f64::MIN_POSITIVE),
            min,
            max: max.max(min).max(1),
            cached: false,
            polled: None,
            last_poll: None,
            last_sync: None,
            last_active: None,
            recommendations: VecDeque::new(),
            scale_ups: VecDeque::new(),
        }
    }

    /// As [`Keda::new`] with `useCachedMetrics: true`: the HPA reads the last poll's value.
    pub fn cached(target: f64, min: u32, max: u32) -> Self {
        Keda {
            cached: true,
            ..Keda::new(target, min, max)
        }
    }

    /// The HPA's replica count for `metric` at `current` replicas.
    fn hpa(&mut self, metric: u64, current: u32, now: Instant) -> (u32, u32) {
        let ratio = metric as f64 / (self.target * f64::from(current));
        let raw = if (ratio - 1.0).abs() <= Self::TOLERANCE {
            current
        } else {
            ((metric as f64 / self.target).ceil() as u32).max(1)
        };
        let raw = raw.clamp(self.min.max(1), self.max);
        // Scale-down stabilization: the highest recommendation newer than the cutoff.
        self.recommendations
            .retain(|(t, _)| now.saturating_duration_since(*t) < Self::STABILIZE_DOWN);
        let highest = self.recommendations.iter().map(|r| r.1).fold(raw, u32::max);
        self.recommendations.push_back((now, raw));
        let mut desired = if raw < current {
            highest.min(current)
        } else {
            raw
        };
        if desired > current {
            self.scale_ups
                .retain(|(t, _)| now.saturating_duration_since(*t) < Self::SCALE_UP_PERIOD);
            let added: u32 = self.scale_ups.iter().map(|e| e.1).sum();
            let start = current.saturating_sub(added);
            let limit = (start + 4).max(start.saturating_mul(2));
            desired = desired.min(limit).max(current);
            if desired > current {
                self.scale_ups.push_back((now, desired - current));
            }
        }
        (raw, desired)
    }
}

impl ScalingPolicy for Keda {
    fn decide(&mut self, input: &PolicyInput<'_>) -> Decision {
        let now = input.now;
        let current = input.capacity.desired;
        let Some(obs) = input.observation else {
            return Decision::hold("keda", input);
        };
        // The HPA syncs on its own 15 s cadence, acting or not (it is idle at 0 replicas).
        let sync = due(self.last_sync, Self::SYNC, now);
        if sync {
            self.last_sync = Some(now);
        }
        if due(self.last_poll, Self::POLLING, now) {
            self.polled = Some(obs.ready);
            self.last_poll = Some(now);
            if obs.ready > 0 {
                self.last_active = Some(now);
            }
        }
        let Some(polled) = self.polled else {
            return Decision::hold("keda", input);
        };
        let hold = |note: &str| Decision::new("keda", current, current, note.to_string());
        if current < self.min {
            return Decision::new("keda", current, self.min, "raise to minReplicaCount");
        }
        if current == 0 {
            return if polled > 0 {
                Decision::new(
                    "keda",
                    0,
                    1,
                    format!("activate: list length {polled} > 0 at the poll"),
                )
            } else {
                hold("inactive")
            };
        }
        let idle_for = self
            .last_active
            .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        if self.min == 0 && polled == 0 && idle_for >= Self::COOLDOWN {
            return Decision::new(
                "keda",
                current,
                0,
                "list empty for the cooldown: scale to zero",
            );
        }
        if !sync {
            return hold("between HPA syncs");
        }
        let metric = if self.cached { polled } else { obs.ready };
        let (raw, desired) = self.hpa(metric, current, now);
        Decision::new(
            "keda",
            current,
            desired,
            format!(
                "HPA: list length {metric} / target {} -> {raw}, limited {desired}",
                self.target
            ),
        )
    }
}
