//! The control loop: for each binding, observe, decide, and set only when the answer changes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::lease::{Leadership, Role};
use crate::policy::{PolicyInput, ScalingPolicy, WallClock, decide_guarded};
use crate::record::{
    CapacityRecord, DecisionRecord, DecisionSink, ObservedRecord, Outcome, RecordedError,
};
use crate::{ConfigError, Error, QueueSource, Scaler};

/// How one binding's loop runs: its name, interval, timeouts and how old an observation may be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopSettings {
    /// The binding's name (a metrics label and log field).
    pub name: String,
    /// Time between ticks.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Timeout of every observe, read and set call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// An observation older than this at decision time counts as failed.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    /// The longest wait between ticks while transient errors back off.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Decide and record, never set.
    pub dry_run: bool,
}

impl Default for LoopSettings {
    fn default() -> Self {
        LoopSettings {
            name: "default".into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            max_staleness: Duration::from_secs(30),
            max_backoff: Duration::from_secs(60),
            dry_run: false,
        }
    }
}

impl LoopSettings {
    /// The shortest accepted `interval` (a shorter one would spin).
    pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
    /// The shortest accepted `timeout`.
    pub const MIN_TIMEOUT: Duration = Duration::from_millis(10);
    /// The longest accepted `interval`.
    pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
    /// The longest accepted `timeout`.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
    /// The longest accepted `max_staleness` and `max_backoff`.
    pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
    /// The longest accepted binding name, in bytes (it is a metrics label).
    pub const MAX_NAME_LEN: usize = 128;

    /// Checks every field; the error names the field (relative to these settings).
    ///
    /// | field | accepted |
    /// |---|---|
    /// | `name` | not blank, at most 128 bytes |
    /// | `interval` | 100 ms to 1 h |
    /// | `timeout` | 10 ms to 10 min |
    /// | `max_staleness` | at least `interval`, at most 24 h |
    /// | `max_backoff` | at least `interval`, at most 24 h |
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        if self.name.len() > Self::MAX_NAME_LEN {
            return Err(ConfigError::new(
                "name",
                format!(
                    "{} bytes is longer than {}",
                    self.name.len(),
                    Self::MAX_NAME_LEN
                ),
            ));
        }
        for (field, value, max) in [
            ("interval", self.interval, Self::MAX_INTERVAL),
            ("timeout", self.timeout, Self::MAX_TIMEOUT),
            ("max_staleness", self.max_staleness, Self::MAX_WAIT),
            ("max_backoff", self.max_backoff, Self::MAX_WAIT),
        ] {
            if value > max {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{} is above the maximum {}",
                        humantime::format_duration(value),
                        humantime::format_duration(max)
                    ),
                ));
            }
        }
        if self.interval < Self::MIN_INTERVAL {
            return Err(ConfigError::new(
                "interval",
                format!(
                    "{} is below the minimum 100ms",
                    humantime::format_duration(self.interval)
                ),
            ));
        }
        if self.timeout < Self::MIN_TIMEOUT {
            return Err(ConfigError::new(
                "timeout",
                format!(
                    "{} is below the minimum 10ms",
                    humantime::format_duration(self.timeout)
                ),
            ));
        }
        if self.max_staleness < self.interval {
            return Err(ConfigError::new(
                "max_staleness",
                format!(
                    "{} is shorter than interval {}: every observation would be stale",
                    humantime::format_duration(self.max_staleness),
                    humantime::format_duration(self.interval)
                ),
            ));
        }
        if self.max_backoff < self.interval {
            return Err(ConfigError::new(
                "max_backoff",
                format!(
                    "{} is shorter than interval {}",
                    humantime::format_duration(self.max_backoff),
                    humantime::format_duration(self.interval)
                ),
            ));
        }
        Ok(())
    }
}

/// One set of queues driving one compute target.
#[derive(Debug)]
pub struct Binding {
    settings: LoopSettings,
    source: Box<dyn QueueSource>,
    scaler: Box<dyn Scaler>,
    policy: Box<dyn ScalingPolicy>,
    sink: Option<Arc<dyn DecisionSink>>,
    consecutive_failures: u32,
    transient_errors: u32,
    protection: ProtectionState,
    leadership: Option<LeaderState>,
    wall_clock: WallClock,
}

/// Builds a fresh policy for a new term of leadership (one that assumes the most).
pub type PolicyFactory = Arc<dyn Fn() -> Result<Box<dyn ScalingPolicy>, ConfigError> + Send + Sync>;

/// A binding's lease and what it needs to start each term afresh.
struct LeaderState {
    lease: Leadership,
    fresh_policy: PolicyFactory,
    /// The term the policy and protection state were started in.
    term: Option<u64>,
}

impl std::fmt::Debug for LeaderState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderState")
            .field("lease", &self.lease)
            .field("term", &self.term)
            .finish()
    }
}

/// What the loop remembers of scale-in protection between ticks.
#[derive(Debug)]
struct ProtectionState {
    /// When the units were last looked at.
    last_check: Option<Instant>,
    /// Whether some unit was protected then (so idle ones are looked at again, to release). A
    /// fresh loop assumes so: an earlier process may have left units protected.
    outstanding: bool,
    /// The held count at the last observation.
    last_in_flight: Option<u64>,
    /// The last time work could have reached an idle worker: messages ready, more held than
    /// before, or the held count not known.
    work_offered_at: Option<Instant>,
}

impl Default for ProtectionState {
    fn default() -> Self {
        ProtectionState {
            last_check: None,
            outstanding: true,
            last_in_flight: None,
            work_offered_at: None,
        }
    }
}

impl ProtectionState {
    /// Notes whether work could have reached an idle worker by the time of `obs`.
    fn observe(&mut self, obs: &crate::Observation) {
        let more_held = match (obs.in_flight, self.last_in_flight) {
            (None, _) => true,
            (Some(now), Some(before)) => now > before,
            (Some(_), None) => false,
        };
        if obs.ready > 0 || more_held {
            self.work_offered_at = Some(obs.at);
        }
        self.last_in_flight = obs.in_flight;
    }
}

/// How often protected units are looked at again when no scale-in is due: to release those
/// gone idle and renew busy ones whose protection ends.
const PROTECTION_RECHECK: Duration = Duration::from_secs(30);

impl Binding {
    /// A binding; fails when the settings are invalid.
    pub fn new(
        settings: LoopSettings,
        source: Box<dyn QueueSource>,
        scaler: Box<dyn Scaler>,
        policy: Box<dyn ScalingPolicy>,
    ) -> Result<Self, ConfigError> {
        settings.validate()?;
        Ok(Binding {
            settings,
            source,
            scaler,
            policy,
            sink: None,
            consecutive_failures: 0,
            transient_errors: 0,
            protection: ProtectionState::default(),
            leadership: None,
            wall_clock: WallClock::System,
        })
    }

    /// Reads the wall-clock time handed to the policy ([`PolicyInput::wall`]) from `clock`
    /// instead of the system clock (the simulator anchors it to virtual time).
    pub fn with_wall_clock(mut self, clock: WallClock) -> Self {
        self.wall_clock = clock;
        self
    }

    /// Acts only while this process holds the binding's lease (see [`crate::lease`]): without
    /// it the binding observes, decides and records as a follower, and sets nothing. Each new
    /// term starts with a policy from `fresh_policy` and fresh protection state, as a fresh
    /// loop does, so a new leader never scales in on its first ticks.
    pub fn with_leadership(mut self, lease: Leadership, fresh_policy: PolicyFactory) -> Self {
        self.leadership = Some(LeaderState {
            lease,
            fresh_policy,
            term: None,
        });
        self
    }

    /// Also hands every record to `sink`.
    pub fn with_sink(mut self, sink: Arc<dyn DecisionSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// The binding's settings.
    pub fn settings(&self) -> &LoopSettings {
        &self.settings
    }

    async fn timed<T>(
        &self,
        operation: &str,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(Error::timeout(operation, self.settings.timeout)),
        }
    }

    /// Runs one tick now: observe, read capacity, decide, set when changed. Never panics on a
    /// backend fault; the record says what happened. Also logs it, updates metrics and calls
    /// the sink.
    pub async fn tick(&mut self) -> DecisionRecord {
        let started = Instant::now();
        let wall = SystemTime::now();
        let role = async {
            match &self.leadership {
                Some(l) => Some(l.lease.role(self.settings.timeout).await),
                None => None,
            }
        };
        let (mut observed, capacity, role) = tokio::join!(
            self.timed("observe", self.source.observe()),
            self.timed("capacity", self.scaler.capacity()),
            role
        );
        let (leading, leadership_record) = self.start_term(role.as_ref());
        if let (Ok(obs), Ok(units)) = (&mut observed, &capacity) {
            mark_unheard_units(obs, units.running);
        }
        let now = Instant::now();
        let mut had_transient = false;

        let (observation, observation_record, observation_error) = match observed {
            Ok(obs) => {
                let age = obs.age(now);
                let record = ObservedRecord::new(&obs, age);
                if age > self.settings.max_staleness {
                    let err = RecordedError {
                        kind: crate::ErrorKind::Stale,
                        transient: true,
                        message: format!(
                            "observation is stale: {} old, limit {}",
                            humantime::format_duration(age),
                            humantime::format_duration(self.settings.max_staleness)
                        ),
                    };
                    (None, Some(record), Some(err))
                } else {
                    (Some(obs), Some(record), None)
                }
            }
            Err(e) => {
                had_transient |= e.is_transient();
                (None, None, Some(RecordedError::from(&e)))
            }
        };
        if observation.is_some() {
            self.consecutive_failures = 0;
        } else {
            self.consecutive_failures += 1;
        }

        let per_unit = self.scaler.workers_per_unit();
        let mut record = DecisionRecord {
            binding: self.settings.name.clone(),
            at: wall,
            observation: observation_record,
            observation_error,
            consecutive_failures: self.consecutive_failures,
            capacity: None,
            capacity_error: None,
            decision: None,
            desired_units: None,
            outcome: Outcome::Held { why: String::new() },
            protection: None,
            leadership: leadership_record,
            dry_run: self.settings.dry_run,
            duration: Duration::ZERO,
            next_tick_in: self.settings.interval,
        };

        match capacity {
            Err(e) => {
                had_transient |= e.is_transient();
                record.outcome = Outcome::Held {
                    why: format!("capacity unknown: {e}"),
                };
                record.capacity_error = Some(RecordedError::from(&e));
            }
            Ok(units) => {
                record.capacity = Some(CapacityRecord {
                    unit: self.scaler.unit(),
                    workers_per_unit: per_unit.get(),
                    units,
                });
                let input = PolicyInput {
                    observation: observation.as_ref(),
                    consecutive_failures: self.consecutive_failures,
                    capacity: per_unit.capacity_in_workers(units),
                    now,
                    wall: self.wall_clock.at(now),
                };
                let decision = decide_guarded(self.policy.as_mut(), &input);
                let mut to = per_unit.units_for(decision.desired);
                let mut gate = match (&self.leadership, leading) {
                    (None, _) => ActGate::Alone {
                        timeout: self.settings.timeout,
                    },
                    (Some(l), Some(term)) => ActGate::Leader {
                        lease: &l.lease,
                        term,
                        timeout: self.settings.timeout,
                        confirmed: None,
                    },
                    (Some(_), None) => ActGate::Follower,
                };
                // A leader about to change the target asks the store once more first: a lease
                // already given to another copy is found out now, not at the next renewal.
                // Protection calls ask (once a tick) when they are about to be made.
                let confirmed = if to != units.desired && !self.settings.dry_run {
                    gate.confirm().await
                } else {
                    gate.may_act()
                };
                if let Some(protection) = self.scaler.protection().filter(|_| confirmed) {
                    let (protected, held_to) = protect_units(
                        protection,
                        &self.settings,
                        &mut self.protection,
                        observation.as_ref(),
                        (units.desired, to),
                        wall,
                        &mut gate,
                    )
                    .await;
                    had_transient |= protected.as_ref().is_some_and(|p| p.transient);
                    record.protection = protected;
                    to = held_to;
                }
                record.desired_units = Some(to);
                record.decision = Some(decision);
                record.outcome = if !(confirmed && gate.may_act()) {
                    let waiting = self
                        .leadership
                        .as_ref()
                        .and_then(|l| l.lease.waiting_until())
                        .map(|t| t.saturating_duration_since(Instant::now()));
                    Outcome::Follower {
                        why: follower_why(record.leadership.as_ref(), waiting, units.desired, to),
                    }
                } else if to == units.desired {
                    Outcome::Unchanged { units: to }
                } else if self.settings.dry_run {
                    Outcome::WouldSet {
                        from: units.desired,
                        to,
                    }
                } else {
                    // The call ends by the lease's deadline (with several copies): a copy
                    // whose lease passed must not still be changing the target.
                    let limit = gate.time_left().unwrap_or(Duration::ZERO);
                    let call = tokio::time::timeout(limit, self.scaler.set_desired(to));
                    match call
                        .await
                        .unwrap_or_else(|_| Err(Error::timeout("set_desired", limit)))
                    {
                        Ok(out) => Outcome::Set {
                            from: units.desired,
                            to,
                            applied: out.applied,
                            note: out.note,
                        },
                        Err(e) => {
                            had_transient |= e.is_transient();
                            Outcome::SetFailed {
                                to,
                                error: RecordedError::from(&e),
                            }
                        }
                    }
                };
            }
        }

        if had_transient {
            self.transient_errors = self.transient_errors.saturating_add(1);
        } else {
            self.transient_errors = 0;
        }
        record.next_tick_in = self.next_delay();
        record.duration = started.elapsed();
        emit(&record);
        if let Some(sink) = &self.sink {
            sink.record(&record);
        }
        record
    }

    /// Notes this tick's role: a term this binding has not acted in yet starts afresh (a new
    /// policy and protection state). Returns the term to act in, if leading, and the record.
    fn start_term(
        &mut self,
        role: Option<&Role>,
    ) -> (Option<u64>, Option<crate::lease::LeadershipRecord>) {
        let (Some(l), Some(role)) = (self.leadership.as_mut(), role) else {
            return (None, None);
        };
        let record = Some(l.lease.record(role));
        let Role::Leader { term } = role else {
            return (None, record);
        };
        if l.term != Some(*term) {
            match (l.fresh_policy)() {
                Ok(policy) => {
                    self.policy = policy;
                    self.protection = ProtectionState::default();
                    l.term = Some(*term);
                    tracing::info!(binding = %self.settings.name, term, "leading this binding: starting as a fresh loop");
                }
                Err(e) => {
                    tracing::error!(binding = %self.settings.name, error = %e, "cannot build a fresh policy for the new term: not acting");
                    return (None, record);
                }
            }
        }
        (Some(*term), record)
    }

    /// The interval, doubled for each tick in a row that met a transient error, up to
    /// `max_backoff`.
    fn next_delay(&self) -> Duration {
        let factor = 1u32 << self.transient_errors.min(16);
        self.settings
            .interval
            .saturating_mul(factor)
            .min(self.settings.max_backoff)
            .max(self.settings.interval)
    }

    /// Ticks every interval (or backoff) until `cancel` fires. The first tick is immediate.
    /// A tick in progress finishes (its calls are bounded by the timeout); no new one starts.
    /// Then the source is closed.
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let delay = self.tick().await.next_tick_in;
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.close().await;
    }

    /// Whether the source has warmed up (see [`QueueSource::is_warmed_up`]).
    pub fn is_warmed_up(&self) -> bool {
        self.source.is_warmed_up()
    }

    /// Waits until the source has warmed up, or `limit` passed; returns whether it did.
    pub async fn wait_warmed_up(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.source.is_warmed_up() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    }

    /// Closes the source (its background tasks and connections), waiting at most the call
    /// timeout (a dead broker must not hold up a shutdown).
    pub async fn close(self) {
        if let Some(l) = &self.leadership {
            l.lease.release(self.settings.timeout).await;
        }
        let _ = tokio::time::timeout(self.settings.timeout, self.source.close()).await;
    }
}

/// Whether a call that changes the target (capacity or protection) may be made in this tick,
/// and for how long.
enum ActGate<'a> {
    /// No leader election: always, for the loop's `timeout`.
    Alone { timeout: Duration },
    /// Leading in `term`: while the lease allows it, after asking the store once this tick.
    Leader {
        lease: &'a Leadership,
        term: u64,
        timeout: Duration,
        /// The store's answer, once asked this tick.
        confirmed: Option<bool>,
    },
    /// Another copy leads: never.
    Follower,
}

impl ActGate<'_> {
    /// Whether a call may start now, without asking the store.
    fn may_act(&self) -> bool {
        match self {
            ActGate::Alone { .. } => true,
            ActGate::Leader { lease, term, .. } => lease.may_act(*term),
            ActGate::Follower => false,
        }
    }

    /// Whether a call may start now, after asking the store once this tick (a second call in
    /// the same tick does not ask again).
    async fn confirm(&mut self) -> bool {
        match self {
            ActGate::Alone { .. } => true,
            ActGate::Follower => false,
            ActGate::Leader {
                lease,
                term,
                timeout,
                confirmed,
            } => {
                if confirmed.is_none() {
                    *confirmed = Some(lease.confirm(*term, *timeout).await);
                }
                *confirmed == Some(true) && lease.may_act(*term)
            }
        }
    }

    /// How long a call may run: the loop's timeout, cut to the lease's deadline; `None` when it
    /// may not start.
    fn time_left(&self) -> Option<Duration> {
        match self {
            ActGate::Alone { timeout } => Some(*timeout),
            ActGate::Leader {
                lease,
                term,
                timeout,
                ..
            } => lease.time_left(*term).map(|t| t.min(*timeout)),
            ActGate::Follower => None,
        }
    }
}

/// Scale-in protection for one tick (see [`crate::protection`]): looks at the units before the
/// desired count drops from `current` to `to` (and every [`PROTECTION_RECHECK`] while some are
/// protected), protects the busy ones and releases the idle ones. Returns what it did and the
/// count to set: never below the busy units (up to `current`), and `current` when the units or
/// their protection cannot be read or set, since which units are busy is then not known.
/// `gate` says whether a protection call may be made (with several copies it asks the lease
/// store before the first call of the tick) and how long it may run.
async fn protect_units(
    protection: &dyn crate::protection::UnitProtection,
    settings: &LoopSettings,
    state: &mut ProtectionState,
    observation: Option<&crate::Observation>,
    (current, to): (u32, u32),
    wall: SystemTime,
    gate: &mut ActGate<'_>,
) -> (Option<crate::protection::ProtectionRecord>, u32) {
    use crate::protection::{ProtectionRecord, plan};
    let now = Instant::now();
    let lowering = to < current;
    if let Some(obs) = observation {
        state.observe(obs);
    }
    // Often enough to renew protection that expires before it does.
    let renew = protection.renew_within();
    let every = if renew.is_zero() {
        PROTECTION_RECHECK
    } else {
        PROTECTION_RECHECK.min(renew / 2)
    };
    let recheck = state.outstanding
        && state
            .last_check
            .is_none_or(|t| now.saturating_duration_since(t) >= every);
    if !lowering && !recheck {
        return (None, to);
    }
    let skipped = |why: &str| ProtectionRecord {
        skipped: Some(why.to_string()),
        ..ProtectionRecord::default()
    };
    let Some(obs) = observation else {
        return (Some(skipped("no observation")), to);
    };
    let held = if lowering { current } else { to };
    if obs.workers_are_unknown() || obs.executing.is_none() {
        // Which units are busy is not known (the worker-event feed is off, down or warming up,
        // or a worker is silent): no unit is stopped.
        return (Some(skipped("scale-in held: worker figures unknown")), held);
    }
    if lowering && obs.in_flight.is_none() {
        return (
            Some(skipped(
                "scale-in held: the broker's held-message count is unknown, so work a worker \
                 took since its last beat cannot be seen",
            )),
            current,
        );
    }
    // A ready message may be taken by any idle unit between this decision and its stop.
    if lowering && obs.ready > 0 {
        let why = format!(
            "scale-in held: {} message(s) ready, which an idle unit may take before it stops",
            obs.ready
        );
        return (Some(skipped(&why)), current);
    }
    let timeout = settings.timeout;
    let units = match tokio::time::timeout(timeout, protection.units()).await {
        Ok(Ok(units)) => units,
        Ok(Err(e)) => return (Some(failed("cannot read the units to protect", &e)), held),
        Err(_) => {
            let e = Error::timeout("protection units", timeout);
            return (Some(failed("cannot read the units to protect", &e)), held);
        }
    };
    let nodes = &obs.worker_nodes;
    let offered = state.work_offered_at;
    // Every busy unit stays (up to the current count), then at most that many are protected.
    let first = plan(&units, nodes, current, lowering, wall, renew, offered);
    if lowering && let Some(why) = first.blocks_scale_in() {
        let record = ProtectionRecord {
            plan: first,
            skipped: Some(format!("scale-in held: {why}")),
            ..ProtectionRecord::default()
        };
        return (Some(record), current);
    }
    let to = if lowering {
        to.max(first.busy_floor().min(current))
    } else {
        to
    };
    let plan = plan(&units, nodes, to, lowering, wall, renew, offered);
    state.last_check = Some(now);
    state.outstanding = units
        .iter()
        .any(|u| u.protected && !plan.release.contains(&u.id))
        || !plan.protect.is_empty();
    let mut record = ProtectionRecord {
        plan,
        ..ProtectionRecord::default()
    };
    if settings.dry_run || record.plan.is_empty() {
        return (Some(record), to);
    }
    let calls = [
        (record.plan.protect.clone(), true),
        (record.plan.release.clone(), false),
    ];
    for (ids, protect) in calls {
        if ids.is_empty() {
            continue;
        }
        let verb = if protect { "protect" } else { "release" };
        // Each call that changes the target checks the lease (with several copies: the store
        // is asked before the tick's first call) and ends by its deadline.
        let limit = if gate.confirm().await {
            gate.time_left()
        } else {
            None
        };
        let Some(timeout) = limit else {
            record.error = Some(format!(
                "the lease ran out before {verb}ing {}",
                ids.join(", ")
            ));
            record.transient = true;
            return (Some(record), held);
        };
        let error =
            match tokio::time::timeout(timeout, protection.set_protected(&ids, protect)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(Error::timeout(verb, timeout)),
            };
        if let Some(e) = error {
            let failure = failed(&format!("cannot {verb} {}", ids.join(", ")), &e);
            record.error = failure.error;
            record.error_kind = failure.error_kind;
            record.transient = failure.transient;
            // A busy unit may be unprotected: no scale-in this tick.
            let to = if protect { held } else { to };
            return (Some(record), to);
        }
    }
    record.applied = true;
    (Some(record), to)
}

/// A protection record for a call that failed with `e`.
fn failed(what: &str, e: &Error) -> crate::protection::ProtectionRecord {
    crate::protection::ProtectionRecord {
        error: Some(format!("{what}: {}", RecordedError::from(e).message)),
        error_kind: Some(e.kind()),
        transient: e.is_transient(),
        ..crate::protection::ProtectionRecord::default()
    }
}

/// Each running unit runs a Celery worker node: when fewer nodes are heard than units run, the
/// ones not heard may be busy and silent (a `-P solo` pool or a task blocking the event loop
/// sends no heartbeat; a fresh feed never hears such a worker), or still starting. The worker
/// figures are then unknown, with the executing tasks heard as a floor.
fn mark_unheard_units(obs: &mut crate::Observation, running_units: u32) {
    let Some(live) = obs.live_workers else {
        return;
    };
    if obs.workers_unknown.is_some() || live >= running_units {
        return;
    }
    // Known here (the live count is), so the tasks heard are a true floor.
    let heard = obs.executing.unwrap_or(0);
    obs.set_workers_unknown(crate::WorkersUnknown {
        why: format!(
            "{running_units} unit(s) running but {live} worker node(s) heard: a busy solo pool, \
             a blocked event loop or a worker still starting sends no heartbeat"
        ),
        executing_at_least: heard,
    });
}

/// Why a follower set nothing this tick.
fn follower_why(
    leadership: Option<&crate::lease::LeadershipRecord>,
    waiting: Option<Duration>,
    from: u32,
    to: u32,
) -> String {
    let would = if from == to {
        format!("would keep {to}")
    } else {
        format!("would set {from} -> {to}")
    };
    match leadership {
        Some(l) if l.role == "follower" => format!(
            "following: {} leads; {would}",
            l.leader.as_deref().unwrap_or("another process")
        ),
        Some(l) if l.role == "unknown" => format!(
            "no lease held, the lease store cannot be asked ({}); {would}",
            l.error.as_deref().unwrap_or("unknown error")
        ),
        _ => match waiting {
            Some(w) => format!(
                "leading a new term, acting in {}: the previous holder's lease ran out and it may \
                 have changed the target until then; {would}",
                humantime::format_duration(Duration::from_millis(
                    u64::try_from(w.as_millis()).unwrap_or(u64::MAX)
                ))
            ),
            None => format!("the lease ran out before acting; {would}"),
        },
    }
}

/// Logs a record through `tracing` and updates `metrics`.
fn emit(r: &DecisionRecord) {
    let binding = r.binding.clone();
    let ready = r.observation.as_ref().map(|o| o.ready);
    let in_flight = r.observation.as_ref().and_then(|o| o.in_flight);
    let desired_workers = r.decision.as_ref().map(|d| d.desired);
    let executing = r.observation.as_ref().and_then(|o| o.executing);
    let live_workers = r.observation.as_ref().and_then(|o| o.live_workers);
    let running_units = r.capacity.as_ref().map(|c| c.units.running);
    let workers_unknown = r
        .observation
        .as_ref()
        .and_then(|o| o.workers_unknown.as_ref())
        .map(|u| u.why.as_str());
    let reason = r.reason();
    let outcome = r.outcome.label();
    if r.observation_error.is_some() || r.capacity_error.is_some() || outcome == "set_failed" {
        tracing::warn!(
            binding = %binding, outcome, ready, in_flight, executing, live_workers,
            running_units, desired_workers, desired_units = r.desired_units,
            observation_error = r.observation_error.as_ref().map(|e| e.message.as_str()),
            capacity_error = r.capacity_error.as_ref().map(|e| e.message.as_str()),
            consecutive_failures = r.consecutive_failures,
            reason = %reason,
            "celery-scale decision"
        );
    } else {
        tracing::info!(
            binding = %binding, outcome, ready, in_flight, executing, live_workers,
            running_units, desired_workers, desired_units = r.desired_units,
            workers_unknown, dry_run = r.dry_run, reason = %reason,
            "celery-scale decision"
        );
    }
    let labels = [("binding", binding.clone())];
    metrics::counter!("celery_scale_decisions_total", "binding" => binding.clone(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!("celery_scale_tick_duration_seconds", &labels)
        .record(r.duration.as_secs_f64());
    // A figure we do not have this tick is NaN (Prometheus's "no value"), never the last value
    // seen: a frozen gauge reads as a fact.
    let known = |v: Option<f64>| v.unwrap_or(f64::NAN);
    // A stale observation is recorded but is not data we have now.
    let obs = r
        .observation
        .as_ref()
        .filter(|_| r.observation_error.is_none());
    let ready = obs.map(|o| o.ready);
    let in_flight = obs.and_then(|o| o.in_flight);
    let units = r.capacity.as_ref().map(|c| c.units);
    metrics::gauge!("celery_scale_ready_messages", &labels).set(known(ready.map(|v| v as f64)));
    metrics::gauge!("celery_scale_in_flight_messages", &labels)
        .set(known(in_flight.map(|v| v as f64)));
    metrics::gauge!("celery_scale_executing_tasks", &labels)
        .set(known(obs.and_then(|o| o.executing).map(|v| v as f64)));
    metrics::gauge!("celery_scale_live_workers", &labels)
        .set(known(obs.and_then(|o| o.live_workers).map(f64::from)));
    metrics::gauge!("celery_scale_observation_fresh", &labels).set(
        if r.observation.is_some() && r.observation_error.is_none() {
            1.0
        } else {
            0.0
        },
    );
    metrics::gauge!("celery_scale_worker_figures_known", &labels).set(
        if obs.is_some_and(|o| o.executing.is_some()) {
            1.0
        } else {
            0.0
        },
    );
    metrics::gauge!("celery_scale_desired_workers", &labels)
        .set(known(desired_workers.map(f64::from)));
    metrics::gauge!("celery_scale_desired_units", &labels)
        .set(known(r.desired_units.map(f64::from)));
    metrics::gauge!("celery_scale_running_units", &labels)
        .set(known(units.map(|u| f64::from(u.running))));
    if let Some(l) = &r.leadership {
        // 1 leading, 0 following, NaN when the lease store cannot be asked.
        let leading = match l.role.as_str() {
            "leader" => 1.0,
            "follower" => 0.0,
            _ => f64::NAN,
        };
        metrics::gauge!("celery_scale_leader", &labels).set(leading);
    }
    for (stage, err) in [
        ("observe", &r.observation_error),
        ("capacity", &r.capacity_error),
    ] {
        if let Some(e) = err {
            metrics::counter!("celery_scale_errors_total", "binding" => binding.clone(), "stage" => stage, "kind" => e.kind.as_str())
                .increment(1);
        }
    }
    if let Outcome::SetFailed { error, .. } = &r.outcome {
        metrics::counter!("celery_scale_errors_total", "binding" => binding.clone(), "stage" => "set_desired", "kind" => error.kind.as_str())
            .increment(1);
    }
}

/// Builds a binding: called once at start and again, after a backoff, whenever the binding's
/// task ends abnormally (a panic in a backend), so the binding comes back with fresh
/// connections and a fresh policy (which assumes the most: no scale-in on its first ticks).
pub type BindingFactory = Arc<dyn Fn() -> Result<Binding, Error> + Send + Sync>;

/// How an [`Autoscaler::run`] went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Times a binding's task ended abnormally (each was restarted when it had a factory).
    pub binding_failures: u32,
    /// Bindings that ended abnormally and could not be restarted (no factory, or the factory
    /// failed until cancellation), by name.
    pub bindings_lost: Vec<String>,
}

impl RunReport {
    /// Whether every binding ran without failing.
    pub fn is_clean(&self) -> bool {
        self.binding_failures == 0 && self.bindings_lost.is_empty()
    }
}

struct Slot {
    name: String,
    first: Option<Binding>,
    factory: Option<BindingFactory>,
    max_backoff: Duration,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("name", &self.name)
            .field("binding", &self.first)
            .field("restartable", &self.factory.is_some())
            .finish()
    }
}

/// Many bindings, each ticking on its own interval on a task of its own.
#[derive(Debug, Default)]
pub struct Autoscaler {
    slots: Vec<Slot>,
}

impl Autoscaler {
    /// An autoscaler with no bindings.
    pub fn new() -> Self {
        Autoscaler::default()
    }

    /// Adds a binding that is not restarted if its task ends abnormally (the run reports it).
    pub fn with_binding(mut self, binding: Binding) -> Self {
        self.slots.push(Slot {
            name: binding.settings.name.clone(),
            max_backoff: binding.settings.max_backoff,
            first: Some(binding),
            factory: None,
        });
        self
    }

    /// Adds a binding built by `factory` now, and rebuilt by it (after a backoff that doubles
    /// from 1 s up to the binding's `max_backoff`) whenever its task ends abnormally.
    pub fn with_restartable_binding(mut self, factory: BindingFactory) -> Result<Self, Error> {
        let binding = factory()?;
        self.slots.push(Slot {
            name: binding.settings.name.clone(),
            max_backoff: binding.settings.max_backoff,
            first: Some(binding),
            factory: Some(factory),
        });
        Ok(self)
    }

    /// The bindings not yet running.
    pub fn bindings(&self) -> impl Iterator<Item = &Binding> {
        self.slots.iter().filter_map(|s| s.first.as_ref())
    }

    /// How many bindings there are.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no bindings.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// One tick of every binding, concurrently; the records in binding order.
    pub async fn tick_all(&mut self) -> Vec<DecisionRecord> {
        let ticks = self
            .slots
            .iter_mut()
            .filter_map(|s| s.first.as_mut())
            .map(|b| b.tick());
        futures::future::join_all(ticks).await
    }

    /// Runs every binding on its own task until `cancel` fires, then waits for them to finish
    /// their current tick. A binding whose task ends abnormally is logged, counted
    /// (`celery_scale_binding_failures_total`) and rebuilt by its factory after a backoff; the
    /// report says how many failures there were, so a daemon never exits as if all went well.
    pub async fn run(self, cancel: CancellationToken) -> RunReport {
        let mut tasks = JoinSet::new();
        for slot in self.slots {
            tasks.spawn(supervise(slot, cancel.clone()));
        }
        let mut report = RunReport::default();
        while let Some(res) = tasks.join_next().await {
            match res {
                Ok((failures, lost)) => {
                    report.binding_failures += failures;
                    report.bindings_lost.extend(lost);
                }
                Err(e) => {
                    tracing::error!(error = %e, "a binding's supervisor ended abnormally");
                    report.binding_failures += 1;
                }
            }
        }
        report
    }
}

/// While a binding's task is down (rebuilding after a failure, or lost), nothing it last
/// reported is data we have: every figure gauge of the binding is set to NaN and
/// `celery_scale_observation_fresh` / `celery_scale_worker_figures_known` to 0 (a frozen gauge
/// reads as a fact). Its next tick, once rebuilt, sets them again.
fn mark_binding_down(binding: &str) {
    let labels = [("binding", binding.to_string())];
    for gauge in [
        "celery_scale_ready_messages",
        "celery_scale_in_flight_messages",
        "celery_scale_executing_tasks",
        "celery_scale_live_workers",
        "celery_scale_desired_workers",
        "celery_scale_desired_units",
        "celery_scale_running_units",
    ] {
        metrics::gauge!(gauge, &labels).set(f64::NAN);
    }
    // Whether this copy leads is unknown too (for a binding without leader election the
    // series then exists, NaN, which reads as "not known").
    metrics::gauge!("celery_scale_leader", &labels).set(f64::NAN);
    for gauge in [
        "celery_scale_observation_fresh",
        "celery_scale_worker_figures_known",
    ] {
        metrics::gauge!(gauge, &labels).set(0.0);
    }
}

/// Runs one binding until `cancel`, rebuilding it after each abnormal end; returns the failures
/// and, when it could not be brought back, the binding's name.
async fn supervise(mut slot: Slot, cancel: CancellationToken) -> (u32, Option<String>) {
    const FIRST_BACKOFF: Duration = Duration::from_secs(1);
    let mut failures = 0u32;
    let mut backoff = FIRST_BACKOFF;
    let mut next = slot.first.take();
    loop {
        let Some(binding) = next.take() else {
            return (failures, Some(slot.name));
        };
        if cancel.is_cancelled() {
            return (failures, None);
        }
        let started = Instant::now();
        let outcome = tokio::spawn(binding.run(cancel.clone())).await;
        let Err(e) = outcome else {
            return (failures, None); // cancelled: a clean end
        };
        failures += 1;
        metrics::counter!("celery_scale_binding_failures_total", "binding" => slot.name.clone())
            .increment(1);
        mark_binding_down(&slot.name);
        let Some(factory) = slot.factory.clone() else {
            tracing::error!(binding = %slot.name, error = %e, "a binding's task ended abnormally and cannot be rebuilt");
            return (failures, Some(slot.name));
        };
        // A binding that ran a while before failing starts its backoff afresh.
        if started.elapsed() > slot.max_backoff.saturating_mul(2) {
            backoff = FIRST_BACKOFF;
        }
        loop {
            tracing::error!(binding = %slot.name, error = %e, retry_in = ?backoff, "a binding's task ended abnormally; rebuilding it");
            tokio::select! {
                // Cancelled before it could be brought back: it ended lost.
                _ = cancel.cancelled() => return (failures, Some(slot.name)),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(slot.max_backoff.max(FIRST_BACKOFF));
            let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory()))
                .unwrap_or_else(|_| {
                    Err(Error::Other {
                        backend: "celery-scale",
                        message: "building the binding panicked".into(),
                        transient: true,
                        source: None,
                    })
                });
            match built {
                Ok(b) => {
                    metrics::counter!("celery_scale_binding_restarts_total", "binding" => slot.name.clone())
                        .increment(1);
                    next = Some(b);
                    break;
                }
                Err(build) => {
                    tracing::error!(binding = %slot.name, error = %build, "rebuilding a binding failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_loop_settings_are_rejected_naming_the_field() {
        const YEARS: Duration = Duration::from_secs(3_000_000_000);
        type Edit = Box<dyn Fn(&mut LoopSettings)>;
        let cases: [(&str, Edit); 7] = [
            (
                "interval",
                Box::new(|s| s.interval = Duration::from_nanos(1)),
            ),
            ("timeout", Box::new(|s| s.timeout = Duration::from_nanos(1))),
            ("interval", Box::new(|s| s.interval = YEARS)),
            ("timeout", Box::new(|s| s.timeout = YEARS)),
            ("max_staleness", Box::new(|s| s.max_staleness = YEARS)),
            ("max_backoff", Box::new(|s| s.max_backoff = YEARS)),
            ("name", Box::new(|s| s.name = "x".repeat(129))),
        ];
        for (field, edit) in cases {
            let mut s = LoopSettings::default();
            edit(&mut s);
            assert_eq!(s.validate().unwrap_err().field, field);
        }
        assert!(LoopSettings::default().validate().is_ok());
    }
}
