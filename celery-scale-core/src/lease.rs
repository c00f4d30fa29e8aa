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
    /// sent.
    Held,
    /// Another holder has it.
    HeldByOther {
        /// Who, when the store can tell.
        holder: Option<String>,
    },
}

/// A lock that at most one holder has at a time, for a period it must extend before it ends.
/// Implemented for Redis (`celery-scale-redis`) and RabbitMQ (`celery-scale-amqp`) and in
/// memory ([`MemoryLeaseStore`]).
#[async_trait]
pub trait LeaseStore: Send + Sync + std::fmt::Debug {
    /// Takes the lease when nobody holds it, or extends it when this holder does: one round
    /// trip. Must be safe to repeat (a retried request of the holder extends its own lease).
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
    keeper: Mutex<Option<CancellationToken>>,
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
        match reply {
            Ok(LeaseReply::Held) => {
                if !s.held(Instant::now()) {
                    s.term += 1;
                    tracing::info!(holder = store.holder(), lease = %store.describe(), term = s.term, "lease taken: leading");
                }
                s.held_until = Some(sent + Self::validity(store.period()));
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
            Err(e) => {
                if s.error.is_none() {
                    tracing::warn!(holder = store.holder(), lease = %store.describe(), error = %e, "lease store unreachable: acting only while the lease held lasts");
                }
                s.error = Some(e.to_string());
                s.other = None;
            }
        }
    }

    fn start_keeper(&self) {
        let mut keeper = self.keeper.lock().unwrap_or_else(|p| p.into_inner());
        if keeper.is_some() {
            return;
        }
        let cancel = CancellationToken::new();
        *keeper = Some(cancel.clone());
        let store = Arc::clone(&self.store);
        let state = Arc::clone(&self.state);
        tokio::spawn(async move {
            let every = (store.period() / 3).max(Duration::from_millis(10));
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                Self::ask(store.as_ref(), &state, every).await;
            }
        });
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
    /// in that term with at least a quarter of its period left.
    pub fn may_act(&self, term: u64) -> bool {
        let s = Self::lock(&self.state);
        s.term == term
            && s.held_until
                .is_some_and(|t| Instant::now() + self.act_margin() < t)
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

    /// Stops renewing and gives the lease up when held (bounded by `timeout`).
    pub async fn release(&self, timeout: Duration) {
        if let Some(cancel) = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take() {
            cancel.cancel();
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
        if let Some(cancel) = self
            .keeper
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            cancel.cancel();
        }
    }
}

/// A name for this process as a lease holder: host, process id and start time, unique across
/// the copies of a daemon.
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
    format!("{host}:{}:{started}", std::process::id())
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
    reachable: bool,
    grants: u64,
}

impl MemoryLeaseStore {
    /// A new store with one holder, `holder`.
    pub fn new(holder: impl Into<String>, period: Duration) -> Self {
        MemoryLeaseStore {
            shared: Arc::new(Mutex::new(MemoryLease {
                holder: None,
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
        self.lock().holder = Some((holder.to_string(), until));
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
            _ => {
                s.holder = Some((self.holder.clone(), now + self.period));
                s.grants += 1;
                Ok(LeaseReply::Held)
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
