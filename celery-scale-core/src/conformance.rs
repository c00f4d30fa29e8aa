//! Checks every [`QueueSource`] and every [`Scaler`] must pass.
//!
//! Each backend's integration tests call these against the real thing (memory here; Redis,
//! RabbitMQ, ECS-on-moto and ASG-on-moto in their crates), so "works like the others" is tested,
//! not assumed. The checks panic with a message that says what was expected, like `assert!`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use celery_scale_core::{conformance, MemoryQueue, MemoryScaler};
//! let broker = MemoryQueue::new();
//! broker.declare("celery");
//! conformance::queue_source(&broker, &broker, "celery").await;
//! conformance::scaler(&MemoryScaler::new(0), 0, 3).await;
//! # }
//! ```

use async_trait::async_trait;
use tokio::time::Instant;

use crate::{BoxError, MemoryQueue, QueueSource, Scaler};

/// Drives a broker the way Celery does, so the checks can set up a known backlog.
#[async_trait]
pub trait QueueFixture: Send + Sync {
    /// Removes every message of `queue` (ready and, where possible, in flight).
    async fn purge(&self, queue: &str) -> Result<(), BoxError>;
    /// Publishes `n` messages to `queue` as a Celery producer would.
    async fn publish(&self, queue: &str, n: u64) -> Result<(), BoxError>;
    /// Takes `n` messages from `queue` as a worker would, leaving them unacknowledged.
    async fn take(&self, queue: &str, n: u64) -> Result<(), BoxError>;
    /// Acknowledges every message taken from `queue`.
    async fn ack_all(&self, queue: &str) -> Result<(), BoxError>;
    /// Whether the source under test reports in-flight messages.
    fn reports_in_flight(&self) -> bool;
}

#[async_trait]
impl QueueFixture for MemoryQueue {
    async fn purge(&self, queue: &str) -> Result<(), BoxError> {
        MemoryQueue::purge(self, queue);
        Ok(())
    }
    async fn publish(&self, queue: &str, n: u64) -> Result<(), BoxError> {
        self.publish_n(queue, n);
        Ok(())
    }
    async fn take(&self, queue: &str, n: u64) -> Result<(), BoxError> {
        for _ in 0..n {
            MemoryQueue::take(self, queue).ok_or("queue is empty")?;
        }
        Ok(())
    }
    async fn ack_all(&self, queue: &str) -> Result<(), BoxError> {
        for id in self.in_flight_ids(queue) {
            self.ack(id);
        }
        Ok(())
    }
    fn reports_in_flight(&self) -> bool {
        true
    }
}

async fn observe_queue(source: &dyn QueueSource, queue: &str, step: &str) -> (u64, Option<u64>) {
    let before = Instant::now();
    let obs = source
        .observe()
        .await
        .unwrap_or_else(|e| panic!("{step}: observe failed: {e}"));
    assert!(
        obs.at >= before - std::time::Duration::from_secs(1),
        "{step}: observation time {:?} is older than the call",
        obs.at
    );
    let depth = obs
        .queues
        .iter()
        .find(|q| q.queue == queue)
        .unwrap_or_else(|| panic!("{step}: the per-queue breakdown has no entry for {queue:?}"));
    assert!(
        obs.ready >= depth.ready,
        "{step}: total ready {} is below queue {queue:?}'s {}",
        obs.ready,
        depth.ready
    );
    (depth.ready, depth.in_flight)
}

/// The source, configured to watch `queue`, reads exactly what `fixture` put there:
/// an empty queue reads 0, `N` published read `N`, taken messages move from ready to in flight
/// (where the source reports in flight) and leave it when acknowledged.
pub async fn queue_source(source: &dyn QueueSource, fixture: &dyn QueueFixture, queue: &str) {
    fixture.purge(queue).await.expect("fixture purge");
    let (ready, in_flight) = observe_queue(source, queue, "empty queue").await;
    assert_eq!(ready, 0, "an empty queue must read 0 ready");
    if fixture.reports_in_flight() {
        assert_eq!(in_flight, Some(0), "an empty queue must read 0 in flight");
    }

    fixture.publish(queue, 5).await.expect("fixture publish");
    let (ready, _) = observe_queue(source, queue, "after publishing 5").await;
    assert_eq!(ready, 5, "after publishing 5 messages");

    fixture.take(queue, 2).await.expect("fixture take");
    let (ready, in_flight) = observe_queue(source, queue, "after taking 2").await;
    assert_eq!(ready, 3, "taken messages are no longer ready");
    if fixture.reports_in_flight() {
        assert_eq!(
            in_flight,
            Some(2),
            "taken, unacknowledged messages are in flight"
        );
    } else {
        assert_eq!(
            in_flight, None,
            "a source that cannot see in-flight messages says None"
        );
    }

    fixture.ack_all(queue).await.expect("fixture ack");
    let (ready, in_flight) = observe_queue(source, queue, "after ack").await;
    assert_eq!(ready, 3, "acknowledging does not change ready");
    if fixture.reports_in_flight() {
        assert_eq!(
            in_flight,
            Some(0),
            "acknowledged messages are no longer in flight"
        );
    }

    // Reading twice without change gives the same answer.
    let again = observe_queue(source, queue, "second read").await;
    assert_eq!(again.0, 3, "observing must not consume messages");
    fixture.purge(queue).await.expect("fixture purge");
}

/// A source whose backend is down (or misconfigured) returns a typed error, does not panic, and
/// does not report an empty queue.
pub async fn dead_queue_source(source: &dyn QueueSource) {
    match source.observe().await {
        Ok(obs) => panic!("a dead backend must fail, not report {} ready", obs.ready),
        Err(e) => {
            // The error renders and has a kind; that is all a caller may rely on.
            let _kind = e.kind();
            assert!(!e.to_string().is_empty(), "the error must say what failed");
        }
    }
}

/// Set/read round trip between two valid desired values `low < high` (in units): the target
/// reports what was set, setting the same value twice is harmless, and the unit conversion is
/// consistent. Leaves the target at `low`.
pub async fn scaler(scaler: &dyn Scaler, low: u32, high: u32) {
    assert!(low < high, "the check needs low < high");
    let per_unit = scaler.workers_per_unit().get();
    assert!(per_unit >= 1, "workers_per_unit must be at least 1");

    let outcome = scaler.set_desired(high).await.expect("set_desired(high)");
    assert_eq!(outcome.requested, high);
    assert_eq!(
        outcome.applied, high,
        "a value within bounds is applied as asked"
    );
    let cap = scaler.capacity().await.expect("capacity after set");
    assert_eq!(
        cap.desired, high,
        "capacity must read back the desired value just set"
    );
    assert!(
        cap.running + cap.pending <= cap.desired.max(cap.running + cap.pending),
        "running and pending are counts of units"
    );

    scaler
        .set_desired(high)
        .await
        .expect("setting the same value twice is harmless");
    assert_eq!(scaler.capacity().await.expect("capacity").desired, high);

    scaler.set_desired(low).await.expect("set_desired(low)");
    assert_eq!(scaler.capacity().await.expect("capacity").desired, low);
}

/// A scaler whose backend is down (or whose target does not exist) returns typed errors from
/// both calls, without panicking.
pub async fn dead_scaler(scaler: &dyn Scaler) {
    let e = scaler
        .capacity()
        .await
        .expect_err("capacity of a dead or missing target must fail");
    assert!(!e.to_string().is_empty());
    let e = scaler
        .set_desired(1)
        .await
        .expect_err("set_desired on a dead or missing target must fail");
    assert!(!e.to_string().is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryScaler;

    #[tokio::test]
    async fn memory_backends_conform() {
        let broker = MemoryQueue::new();
        broker.declare("celery");
        queue_source(&broker, &broker, "celery").await;
        scaler(&MemoryScaler::new(0), 0, 4).await;
    }

    #[tokio::test]
    async fn dead_memory_backends_give_typed_errors() {
        let broker = MemoryQueue::new();
        broker.set_down(true);
        dead_queue_source(&broker).await;
        let s = MemoryScaler::new(1);
        s.set_down(true);
        dead_scaler(&s).await;
    }
}
