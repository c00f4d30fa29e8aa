//! Leadership per binding, so several copies of the daemon can run the same configuration with
//! exactly one of them acting on each binding.
//!
//! A [`LeaseStore`] is a lock in a store the user already runs and trusts (a Redis key, a
//! RabbitMQ exclusive queue): one call takes the lease when nobody holds it or extends it when
//! this holder does. [`Leadership`] keeps that lease for one binding:
//!
//! - **Renewal** runs in a task of its own every third of the lease's period, whatever the
//!   binding's interval or backoff, and a follower tries again at every tick, so a lease given
//!   up on a clean shutdown is taken within one tick.
//! - **Fencing.** The lease counts as held only until `ttl` minus a tenth after the *send* of the
//!   last request the store granted, measured on this process's monotonic clock (which goes on
//!   counting while the process is paused). The loop asks [`Leadership::may_act`] right before
//!   each call that changes the target, and acts only while at least a quarter of the period
//!   is left; a process paused past its lease (SIGSTOP, a long GC pause of a VM) therefore
//!   finds it gone when it resumes, acts on nothing, and steps down when the store says
//!   another process holds it. AWS's `UpdateService` and `SetDesiredCapacity` take no fencing
//!   token, so a pause that falls between that check and the request reaching AWS is not
//!   covered; the quarter-period margin is what bounds it in practice.
//! - **Terms.** Each time the lease is taken afresh (not extended) the term grows. The loop
//!   starts a new term like a fresh loop: a new policy, which assumes the most, so a new leader
//!   never scales in on its first ticks.
//! - **No two copies act within one period.** The previous holder may start a call until 0.65
//!   of the period after its last granted renewal and each call is cut off at its deadline, so
//!   a lease the store hands over because the previous one *ran out* ([`LeaseReply::Taken`])
//!   lets the new term act only 0.65 of a period after it was granted: a copy's last change of
//!   the target and another copy's first are at least a period apart. A lease given up on a
//!   clean shutdown ([`LeaseReply::Held`]) is acted on at once.
//! - **Losing the store** is a fault like any other: renewals fail, the lease runs out within
//!   one period, and nobody acts until a store grants a lease again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// What a store said to a request to take or extend the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseReply {
    /// This holder has the lease for the store's period, counted from when the request was
    /// sent: it already had it, or took it from a holder that gave it up.
    Held,
    /// This holder took the lease for the store's period because the previous holder's ran
    /// out (or the store cannot tell whether it was given up): the previous holder may have
    /// started a change of the target up to 0.65 of a period before, so the new term waits
    /// that long before it acts.
    Taken,
    /// Another holder has it.
    HeldByOther {
        /// Who, when the store can tell.
        holder: Option<String>,
    },
    /// The store knows this holder's lease is gone (its RabbitMQ connection closed, so the
    /// broker deleted the lock), though it could not ask who holds it now.
    Lost {
        /// Why.
        why: String,
    },
}

/// A lock that at most one holder has at a time, for a period it must extend before it ends.
/// Implemented for Redis (`celery-scale-redis`) and RabbitMQ (`celery-scale-amqp`) and in
/// memory ([`MemoryLeaseStore`]).
#[async_trait]
pub trait LeaseStore: Send + Sync + std::fmt::Debug {
    /// Takes the lease when nobody holds it, or extends it when this holder does: one round
    /// trip. Must be safe to repeat (a retried request of the holder extends its own lease).
    /// An `Err` means the store could not be asked and, as far as this holder knows, its lease
    /// stands until it runs out; a store that knows the lease is gone says
    /// [`LeaseReply::Lost`].
    async fn acquire(&self) -> Result<LeaseReply, Error>;
    /// Gives the lease up when this holder has it (a clean shutdown hands over at once).
    async fn release(&self) -> Result<(), Error>;
    /// How long a granted request keeps the lease, counted from its send.
    fn period(&self) -> Duration;
    /// This holder's name, as other holders see it.
    fn holder(&self) -> &str;
    /// Where the lease lives, for logs (never a credential).
    fn describe(&self) -> String;
}

/// What the loop may do this tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// This process holds the lease in `term`.
    Leader {
        /// The term (grows each time the lease is taken afresh).
        term: u64,
    },
    /// Another process holds the lease.
    Follower {
        /// Who, when the store tells.
        holder: Option<String>,
    },
    /// No lease is held here and the store could not be asked.
    Unknown {
        /// Why.
        error: String,
    },
}

/// Leadership as a decision record shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadershipRecord {
    /// `leader`, `follower` or `unknown`.
    pub role: String,
    /// This process's holder name.
    pub holder: String,
    /// The leader, when known.
    pub leader: Option<String>,
    /// The current term, for a leader.
    pub term: Option<u64>,
    /// Why the store could not be asked, when it could not.
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    /// Until when the lease is ours (monotonic).
    held_until: Option<Instant>,
    /// When the current term may start acting (see [`LeaseReply::Taken`]).
    act_from: Option<Instant>,
    /// When the newest request whose reply was applied was sent: a reply to an older one
    /// arriving late is ignored.
    last_sent: Option<Instant>,
    term: u64,
    /// Who else holds it, from the last reply.
    other: Option<Option<String>>,
    error: Option<String>,
}

impl State {
    fn held(&self, now: Instant) -> bool {
        self.held_until.is_some_and(|t| now < t)
    }
}

/// One binding's lease: kept by a renewal task, asked by the loop. See the [module
/// docs](self).
#[derive(Debug)]
pub struct Leadership {
    store: Arc<dyn LeaseStore>,
    state: Arc<Mutex<State>>,
    keeper: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
}

impl Leadership {
    /// Leadership through `store`. The renewal task starts on first use (within a Tokio
    /// runtime).
    pub fn new(store: Arc<dyn LeaseStore>) -> Self {
        Leadership {
            store,
            state: Arc::new(Mutex::new(State::default())),
            keeper: Mutex::new(None),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn LeaseStore> {
        &self.store
    }

    fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
        state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a granted request counts as holding the lease: the period less a tenth, for
    /// the store's own clock and expiry resolution.
    fn validity(period: Duration) -> Duration {
        period.saturating_sub(period / 10)
    }

    /// The least time left on the lease for [`may_act`](Self::may_act) to say yes.
    fn act_margin(&self) -> Duration {
        self.store.period() / 4
    }

    /// Asks the store once (bounded by `timeout`) and notes the reply.
    async fn ask(store: &dyn LeaseStore, state: &Mutex<State>, timeout: Duration) {
        let sent = Instant::now();
        let reply = match tokio::time::timeout(timeout, store.acquire()).await {
            Ok(r) => r,
            Err(_) => Err(Error::timeout("lease", timeout)),
        };
        let mut s = Self::lock(state);
        if s.last_sent.is_some_and(|last| last > sent) {
            // A newer request's reply was applied already.
            return;
        }
        s.last_sent = Some(sent);
        let period = store.period();
        match reply {
            Ok(reply @ (LeaseReply::Held | LeaseReply::Taken)) => {
                let now = Instant::now();
                if !s.held(now) {
                    s.term += 1;
                    s.act_from = match reply {
                        LeaseReply::Taken => Some(now + Self::previous_horizon(period)),
                        _ => None,
                    };
                    tracing::info!(holder = store.holder(), lease = %store.describe(), term = s.term, after_expiry = matches!(reply, LeaseReply::Taken), "lease taken: leading");
                }
                s.held_until = Some(sent + Self::validity(period));
                s.other = None;
                s.error = None;
            }
            Ok(LeaseReply::HeldByOther { holder }) => {
                if s.held_until.take().is_some() {
                    tracing::warn!(holder = store.holder(), leader = ?holder, lease = %store.describe(), "lease held by another process: following");
                }
                s.other = Some(holder);
                s.error = None;
            }
            Ok(LeaseReply::Lost { why }) => {
                if s.held_until.take().is_some() {
                    tracing::warn!(holder = store.holder(), lease = %store.describe(), why = %why, "lease lost: not acting");
                }
                s.other = None;
                s.error = Some(format!("lease lost: {why}"));
            }
            Err(e) => {
                if s.error.is_none() {
                    tracing::warn!(holder = store.holder(), lease = %store.describe(), error = %e, "lease store unreachable: acting only while the lease held lasts");
                }
                s.error = Some(e.to_string());
                s.other = None;
            }
        }
    }

    /// How long after its last granted renewal a previous holder may still have started a
    /// change of the target: its validity less the act margin.
    fn previous_horizon(period: Duration) -> Duration {
        Self::validity(period).saturating_sub(period / 4)
    }

    fn start_keeper(&self) {
        let mut keeper = self.keeper.lock().unwrap_or_else(|p| p.into_inner());
        if keeper.is_some() {
            return;
        }
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let store = Arc::clone(&self.store);
        let state = Arc::clone(&self.state);
        let task = tokio::spawn(async move {
            let every = (store.period() / 3).max(Duration::from_millis(10));
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = Self::ask(store.as_ref(), &state, every) => {}
                }
            }
        });
        *keeper = Some((token, task));
    }

    /// The role for this tick: a process that does not hold the lease asks the store now
    /// (bounded by `timeout`), so a lease given up is taken within one tick; a leader relies on
    /// the renewal task.
    pub async fn role(&self, timeout: Duration) -> Role {
        self.start_keeper();
        if !Self::lock(&self.state).held(Instant::now()) {
            let timeout = timeout.min(self.store.period() / 3);
            Self::ask(self.store.as_ref(), &self.state, timeout).await;
        }
        let s = Self::lock(&self.state);
        if s.held(Instant::now()) {
            Role::Leader { term: s.term }
        } else if let (Some(error), true) = (&s.error, s.other.is_none()) {
            Role::Unknown {
                error: error.clone(),
            }
        } else {
            Role::Follower {
                holder: s.other.clone().flatten(),
            }
        }
    }

    /// Whether a call that changes the target may start now in `term`: the lease is still held
    /// in that term with at least a quarter of its period left, and the term may act already
    /// (see [`LeaseReply::Taken`]).
    pub fn may_act(&self, term: u64) -> bool {
        let now = Instant::now();
        let s = Self::lock(&self.state);
        s.term == term
            && s.act_from.is_none_or(|t| now >= t)
            && s.held_until.is_some_and(|t| now + self.act_margin() < t)
    }

    /// How long a call that changes the target may run in `term`: until the lease's deadline.
    /// `None` when it may not start.
    pub fn time_left(&self, term: u64) -> Option<Duration> {
        if !self.may_act(term) {
            return None;
        }
        let s = Self::lock(&self.state);
        s.held_until
            .map(|t| t.saturating_duration_since(Instant::now()))
    }

    /// When the current term may start acting, if it is still waiting for the previous
    /// holder's lease to pass.
    pub fn waiting_until(&self) -> Option<Instant> {
        Self::lock(&self.state)
            .act_from
            .filter(|t| Instant::now() < *t)
    }

    /// Asks the store once more, now, and says whether a call that changes the target may
    /// start in `term` (see [`may_act`](Self::may_act)). The loop asks this right before it
    /// sets capacity or protection: a lease the store already gave to another copy (a RabbitMQ
    /// connection closed under us, a Redis key lost in a failover) is found out then, not at
    /// the next renewal. Costs one round trip per change of the target.
    pub async fn confirm(&self, term: u64, timeout: Duration) -> bool {
        let timeout = timeout.min(self.store.period() / 3);
        Self::ask(self.store.as_ref(), &self.state, timeout).await;
        self.may_act(term)
    }

    /// The record of `role`.
    pub fn record(&self, role: &Role) -> LeadershipRecord {
        let holder = self.store.holder().to_string();
        match role {
            Role::Leader { term } => LeadershipRecord {
                role: "leader".into(),
                leader: Some(holder.clone()),
                holder,
                term: Some(*term),
                error: None,
            },
            Role::Follower { holder: leader } => LeadershipRecord {
                role: "follower".into(),
                holder,
                leader: leader.clone(),
                term: None,
                error: None,
            },
            Role::Unknown { error } => LeadershipRecord {
                role: "unknown".into(),
                holder,
                leader: None,
                term: None,
                error: Some(error.clone()),
            },
        }
    }

    /// Stops renewing (waiting, bounded by `timeout`, for a renewal in flight) and gives the
    /// lease up when held (bounded by `timeout`).
    pub async fn release(&self, timeout: Duration) {
        let keeper = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((cancel, task)) = keeper {
            cancel.cancel();
            let _ = tokio::time::timeout(timeout, task).await;
        }
        let held = Self::lock(&self.state).held_until.take().is_some();
        if held {
            match tokio::time::timeout(timeout, self.store.release()).await {
                Ok(Ok(())) => {
                    tracing::info!(holder = self.store.holder(), lease = %self.store.describe(), "lease given up")
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.store.describe(), error = %e, "could not give the lease up; it ends with its period")
                }
                Err(_) => {
                    tracing::warn!(lease = %self.store.describe(), "giving the lease up timed out; it ends with its period")
                }
            }
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some((cancel, task)) = self
            .keeper
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            cancel.cancel();
            task.abort();
        }
    }
}

/// A suffix that makes a holder name this process's own (process id and a random number), so
/// copies given the same configured name never share a lease.
pub fn holder_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{}-{:08x}", std::process::id(), h.finish() as u32)
}

/// A name for this process as a lease holder: host, process id, start time and a random
/// number, unique across the copies of a daemon.
pub fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000)
        .unwrap_or(0);
    format!("{host}:{started}:{}", holder_suffix())
}

/// A lease store in memory, shared by the [`Leadership`]s of one process (for tests and the
/// simulator): each handle is one holder; [`set_reachable`](Self::set_reachable) cuts the
/// store off for all of them.
#[derive(Debug, Clone)]
pub struct MemoryLeaseStore {
    shared: Arc<Mutex<MemoryLease>>,
    holder: String,
    period: Duration,
}

#[derive(Debug)]
struct MemoryLease {
    holder: Option<(String, Instant)>,
    /// Whether the last holder gave the lease up (rather than letting it run out).
    released: bool,
    reachable: bool,
    grants: u64,
}

impl MemoryLeaseStore {
    /// A new store with one holder, `holder`.
    pub fn new(holder: impl Into<String>, period: Duration) -> Self {
        MemoryLeaseStore {
            shared: Arc::new(Mutex::new(MemoryLease {
                holder: None,
                released: true,
                reachable: true,
                grants: 0,
            })),
            holder: holder.into(),
            period,
        }
    }

    /// Another holder of the same lease.
    pub fn holder_handle(&self, holder: impl Into<String>) -> Self {
        MemoryLeaseStore {
            shared: Arc::clone(&self.shared),
            holder: holder.into(),
            period: self.period,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryLease> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the store reachable or not (every call fails while it is not).
    pub fn set_reachable(&self, reachable: bool) {
        self.lock().reachable = reachable;
    }

    /// Who holds the lease now, if anyone.
    pub fn current_holder(&self) -> Option<String> {
        let s = self.lock();
        s.holder
            .as_ref()
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(h, _)| h.clone())
    }

    /// Gives the lease to `holder` now, whoever held it (as a broker does that drops the
    /// holder's connection while another copy is asking).
    pub fn hand_to(&self, holder: &str) {
        let until = Instant::now() + self.period;
        let mut s = self.lock();
        s.holder = Some((holder.to_string(), until));
        s.released = false;
    }

    /// How many requests were granted.
    pub fn grants(&self) -> u64 {
        self.lock().grants
    }
}

#[async_trait]
impl LeaseStore for MemoryLeaseStore {
    async fn acquire(&self) -> Result<LeaseReply, Error> {
        let now = Instant::now();
        let mut s = self.lock();
        if !s.reachable {
            return Err(Error::Unavailable {
                backend: "memory",
                message: "lease store unreachable".into(),
                source: None,
            });
        }
        match &s.holder {
            Some((h, until)) if *h != self.holder && now < *until => Ok(LeaseReply::HeldByOther {
                holder: Some(h.clone()),
            }),
            current => {
                let reply = match current {
                    Some((h, until)) if *h == self.holder && now < *until => LeaseReply::Held,
                    _ if s.released => LeaseReply::Held,
                    _ => LeaseReply::Taken,
                };
                s.holder = Some((self.holder.clone(), now + self.period));
                s.released = false;
                s.grants += 1;
                Ok(reply)
            }
        }
    }

    async fn release(&self) -> Result<(), Error> {
        let mut s = self.lock();
        if !s.reachable {
            return Err(Error::Unavailable {
                backend: "memory",
                message: "lease store unreachable".into(),
                source: None,
            });
        }
        if s.holder.as_ref().is_some_and(|(h, _)| *h == self.holder) {
            s.holder = None;
            s.released = true;
        }
        Ok(())
    }

    fn period(&self) -> Duration {
        self.period
    }

    fn holder(&self) -> &str {
        &self.holder
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
