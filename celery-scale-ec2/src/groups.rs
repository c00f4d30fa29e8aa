//! [`AutoScalingGroups`]: one client and one coalesced `DescribeAutoScalingGroups` for every
//! group the bindings scale.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use aws_config::SdkConfig;
use aws_sdk_autoscaling::Client;
use aws_sdk_autoscaling::types::{AutoScalingGroup, LifecycleState};
use celery_scale_aws::{AwsError, AwsSettings, SetupError};
use celery_scale_core::{Capacity, ConfigError};
use tokio::time::Instant;

use crate::error::{DESCRIBE_GROUPS, SET_DESIRED_CAPACITY, SET_INSTANCE_PROTECTION};
use crate::{AutoScalingGroupConfig, AutoScalingGroupScaler, Ec2Error};

/// Group names per `DescribeAutoScalingGroups` call (the API's default limit).
pub const NAMES_PER_CALL: usize = 50;

/// Instance ids per `SetInstanceProtection` call (the API's limit).
pub const INSTANCES_PER_PROTECTION_CALL: usize = 50;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning only means another thread panicked while replacing plain data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One group as `DescribeAutoScalingGroups` described it.
///
/// Instance counts are in capacity units: an instance counts its `WeightedCapacity` (1 when the
/// group has no instance weights).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshot {
    /// The group's name.
    pub name: String,
    /// The group's ARN, when returned.
    pub arn: Option<String>,
    /// `MinSize`.
    pub min_size: u32,
    /// `MaxSize`.
    pub max_size: u32,
    /// `DesiredCapacity`.
    pub desired: u32,
    /// Instances `InService`.
    pub in_service: u32,
    /// Instances `Pending`, `Pending:Wait` or `Pending:Proceed`.
    pub pending: u32,
    /// Instances `Terminating`, `Terminating:Wait`, `Terminating:Proceed` (and `:Retained`):
    /// leaving, counted neither as running nor as pending. With a termination lifecycle hook that
    /// waits for Celery's warm shutdown, these are the instances still finishing their tasks.
    pub terminating: u32,
    /// Instances in any other state (`Standby`, `Detaching`, `EnteringStandby`, `Quarantined`,
    /// root-volume replacement, ...): not serving, counted neither as running nor as pending.
    pub other: u32,
    /// Instances protected from scale-in.
    pub protected_from_scale_in: u32,
    /// The group's instances, in the order Auto Scaling listed them.
    pub instances: Vec<GroupInstance>,
}

/// One instance of a group as `DescribeAutoScalingGroups` listed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInstance {
    /// The EC2 instance id (`i-0abc1234def567890`).
    pub instance_id: String,
    /// Its lifecycle state (`None` when the answer had none).
    pub lifecycle_state: Option<LifecycleState>,
    /// `ProtectedFromScaleIn`.
    pub protected_from_scale_in: bool,
    /// Its `WeightedCapacity` (1 without instance weights).
    pub weight: u32,
}

impl GroupInstance {
    /// Whether Auto Scaling is taking it out of the group: `Terminating*`, `Terminated`,
    /// `Detaching`, `Detached` and the warm pool's `Warmed:Terminating*`, `Warmed:Terminated`.
    /// Protection does nothing for such an instance (and `SetInstanceProtection` refuses it).
    pub fn is_stopping(&self) -> bool {
        matches!(
            self.lifecycle_state,
            Some(
                LifecycleState::Terminating
                    | LifecycleState::TerminatingWait
                    | LifecycleState::TerminatingProceed
                    | LifecycleState::TerminatingRetained
                    | LifecycleState::Terminated
                    | LifecycleState::Detaching
                    | LifecycleState::Detached
                    | LifecycleState::WarmedTerminating
                    | LifecycleState::WarmedTerminatingWait
                    | LifecycleState::WarmedTerminatingProceed
                    | LifecycleState::WarmedTerminatingRetained
                    | LifecycleState::WarmedTerminated
            )
        )
    }
}

impl GroupSnapshot {
    /// The capacity as a [`celery_scale_core::Scaler`] reports it: desired, running =
    /// `InService`, pending = `Pending*`.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            desired: self.desired,
            running: self.in_service,
            pending: self.pending,
        }
    }

    /// `units` clamped to `MinSize..=MaxSize`.
    pub fn clamp(&self, units: u32) -> u32 {
        units.clamp(self.min_size, self.max_size.max(self.min_size))
    }

    /// Reads one described group.
    pub fn from_group(g: &AutoScalingGroup) -> Result<Self, Ec2Error> {
        let name = g.auto_scaling_group_name().unwrap_or_default().to_owned();
        let field = |v: Option<i32>, what: &str| -> Result<u32, Ec2Error> {
            v.and_then(|v| u32::try_from(v).ok()).ok_or_else(|| {
                tracing::warn!(group = %name, field = what, value = ?v, "Auto Scaling answered an invalid group field; ignoring the answer");
                Ec2Error::Aws(AwsError::InvalidResponse {
                    operation: DESCRIBE_GROUPS,
                    message: format!("group '{name}' has no valid {what}: {v:?}"),
                    source: None,
                })
            })
        };
        let min_size = field(g.min_size(), "MinSize")?;
        let max_size = field(g.max_size(), "MaxSize")?;
        let desired = field(g.desired_capacity(), "DesiredCapacity")?;
        if let Some(t) = g.desired_capacity_type()
            && t != "units"
        {
            return Err(Ec2Error::UnsupportedGroup {
                group: name,
                capacity_type: t.to_owned(),
            });
        }
        let mut snap = GroupSnapshot {
            name: name.clone(),
            arn: g.auto_scaling_group_arn().map(str::to_owned),
            min_size,
            max_size,
            desired,
            in_service: 0,
            pending: 0,
            terminating: 0,
            other: 0,
            protected_from_scale_in: 0,
            instances: Vec::with_capacity(g.instances().len()),
        };
        for i in g.instances() {
            let weight = match i.weighted_capacity() {
                None => 1,
                Some(w) => w.trim().parse::<u32>().map_err(|_| {
                    Ec2Error::Aws(AwsError::InvalidResponse {
                        operation: DESCRIBE_GROUPS,
                        message: format!(
                            "instance {} of group '{name}' has WeightedCapacity {w:?}, not a whole number",
                            i.instance_id().unwrap_or("?")
                        ),
                        source: None,
                    })
                })?,
            };
            if i.protected_from_scale_in() == Some(true) {
                snap.protected_from_scale_in = snap.protected_from_scale_in.saturating_add(weight);
            }
            let slot = match i.lifecycle_state() {
                Some(LifecycleState::InService) => &mut snap.in_service,
                Some(
                    LifecycleState::Pending
                    | LifecycleState::PendingWait
                    | LifecycleState::PendingProceed,
                ) => &mut snap.pending,
                Some(
                    LifecycleState::Terminating
                    | LifecycleState::TerminatingWait
                    | LifecycleState::TerminatingProceed
                    | LifecycleState::TerminatingRetained,
                ) => &mut snap.terminating,
                _ => &mut snap.other,
            };
            *slot = slot.saturating_add(weight);
            match i.instance_id() {
                Some(id) if !id.is_empty() => snap.instances.push(GroupInstance {
                    instance_id: id.to_owned(),
                    lifecycle_state: i.lifecycle_state().cloned(),
                    protected_from_scale_in: i.protected_from_scale_in() == Some(true),
                    weight,
                }),
                // Counted above; without an id it cannot be protected, and a busy worker on
                // it maps to no instance (a busy unit nobody may remove).
                _ => tracing::warn!(group = %name, "Auto Scaling listed an instance without an id"),
            }
        }
        Ok(snap)
    }
}

/// The last `DescribeAutoScalingGroups` round.
struct Fetched {
    at: Instant,
    /// The names it asked for.
    names: BTreeSet<String>,
    result: Result<HashMap<String, GroupSnapshot>, Ec2Error>,
    /// False once a set made it out of date.
    valid: bool,
}

#[derive(Default)]
struct State {
    /// Every group a scaler was made for.
    names: BTreeSet<String>,
    /// Completed rounds.
    generation: u64,
    /// Bumped by every invalidation.
    epoch: u64,
    last: Option<Fetched>,
}

impl State {
    /// The answer for `name` from the last round, if that round asked for it, is valid and
    /// (unless `any_age`) younger than `ttl`.
    fn lookup(
        &self,
        name: &str,
        now: Instant,
        ttl: std::time::Duration,
        any_age: bool,
    ) -> Option<Result<GroupSnapshot, Ec2Error>> {
        let last = self.last.as_ref()?;
        if !last.valid || !last.names.contains(name) {
            return None;
        }
        if !any_age && now.saturating_duration_since(last.at) >= ttl {
            return None;
        }
        Some(match &last.result {
            Ok(groups) => groups
                .get(name)
                .cloned()
                .ok_or_else(|| Ec2Error::GroupNotFound {
                    group: name.to_owned(),
                }),
            Err(e) => Err(e.clone()),
        })
    }
}

struct Inner {
    client: Client,
    settings: AwsSettings,
    state: Mutex<State>,
    /// Held while a round is in flight: callers that arrive meanwhile wait for its answer.
    refresh: tokio::sync::Mutex<()>,
    describe_calls: AtomicU64,
    set_calls: AtomicU64,
    protection_calls: AtomicU64,
}

/// A shared handle on EC2 Auto Scaling that hands out one [`AutoScalingGroupScaler`] per group
/// and reads all of their groups together.
///
/// Every scaler's `capacity()` is served from one `DescribeAutoScalingGroups` round that names
/// every registered group ([`NAMES_PER_CALL`] names per call, following `NextToken`): calls that
/// arrive while a round is in flight wait for it, and a round's answer serves later calls for
/// [`AwsSettings::cache_ttl`]. A `set_desired` invalidates it. Cheap to clone.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use celery_scale_ec2::{AutoScalingGroupConfig, AutoScalingGroups, AwsSettings};
/// let groups = AutoScalingGroups::from_settings(&AwsSettings::default()).await?;
/// let emails = groups.scaler(AutoScalingGroupConfig::new("email-workers").workers_per_instance(4))?;
/// let reports = groups.scaler(AutoScalingGroupConfig::new("report-workers"))?;
/// # let _ = (emails, reports); Ok(()) }
/// ```
#[derive(Clone)]
pub struct AutoScalingGroups {
    inner: Arc<Inner>,
}

impl fmt::Debug for AutoScalingGroups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client (and its credentials provider) is deliberately left out.
        f.debug_struct("AutoScalingGroups")
            .field("settings", &self.inner.settings)
            .field("groups", &lock(&self.inner.state).names)
            .finish_non_exhaustive()
    }
}

impl AutoScalingGroups {
    /// A handle on `client` (built by the caller, e.g. a test's mock client). Only the
    /// `cache_ttl` and `call_timeout` settings apply; region, endpoint and retries are the
    /// client's.
    pub fn new(client: Client, settings: AwsSettings) -> Result<Self, ConfigError> {
        settings.validate()?;
        Ok(AutoScalingGroups {
            inner: Arc::new(Inner {
                client,
                settings,
                state: Mutex::new(State::default()),
                refresh: tokio::sync::Mutex::new(()),
                describe_calls: AtomicU64::new(0),
                set_calls: AtomicU64::new(0),
                protection_calls: AtomicU64::new(0),
            }),
        })
    }

    /// A handle whose client is configured from `sdk` (credentials, region, endpoint), with
    /// the settings' region, endpoint and attempts on top ([`AwsSettings::apply_to`]; a set
    /// `endpoint_url` also wins over `AWS_ENDPOINT_URL_AUTO_SCALING`). Makes no call; fails
    /// when a setting is invalid or no region is set.
    pub fn from_sdk_config(sdk: &SdkConfig, settings: AwsSettings) -> Result<Self, SetupError> {
        let sdk = settings.apply_to(sdk)?;
        let mut conf = aws_sdk_autoscaling::config::Builder::from(&sdk);
        if let Some(url) = &settings.endpoint_url {
            conf = conf.endpoint_url(url.clone());
        }
        Ok(Self::new(Client::from_conf(conf.build()), settings)?)
    }

    /// A handle configured from aws-config's default chain (environment, profile, web
    /// identity, ECS/EC2 roles; `AWS_ENDPOINT_URL` and `AWS_ENDPOINT_URL_AUTO_SCALING`
    /// honoured) with the settings on top, checked by [`AwsSettings::sdk_config`]: fails at
    /// start, saying what to set, when no region is set or no credentials are found.
    pub async fn from_settings(settings: &AwsSettings) -> Result<Self, SetupError> {
        let sdk = settings.sdk_config().await?;
        Self::from_sdk_config(&sdk, settings.clone())
    }

    /// A scaler for one group; the group joins the shared describe rounds. Fails when the
    /// configuration is invalid (nothing is called yet: a missing group shows on the first
    /// `capacity()`).
    pub fn scaler(
        &self,
        config: AutoScalingGroupConfig,
    ) -> Result<AutoScalingGroupScaler, ConfigError> {
        config.validate()?;
        lock(&self.inner.state)
            .names
            .insert(config.group_name.clone());
        Ok(AutoScalingGroupScaler::new(self.clone(), config))
    }

    /// The settings.
    pub fn settings(&self) -> &AwsSettings {
        &self.inner.settings
    }

    /// The client, for calls this crate does not make.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// `DescribeAutoScalingGroups` calls made so far (one per page).
    pub fn describe_calls(&self) -> u64 {
        self.inner.describe_calls.load(Ordering::Relaxed)
    }

    /// `SetDesiredCapacity` calls made so far.
    pub fn set_calls(&self) -> u64 {
        self.inner.set_calls.load(Ordering::Relaxed)
    }

    /// `SetInstanceProtection` calls made so far (one per batch of
    /// [`INSTANCES_PER_PROTECTION_CALL`] instances).
    pub fn protection_calls(&self) -> u64 {
        self.inner.protection_calls.load(Ordering::Relaxed)
    }

    /// Forgets the last describe round: the next `snapshot` reads fresh.
    pub fn invalidate(&self) {
        let mut s = lock(&self.inner.state);
        s.epoch += 1;
        if let Some(last) = &mut s.last {
            last.valid = false;
        }
    }

    /// The group `name` as last described: from the cache when fresh, else from a new round
    /// (shared with every caller that arrives while it is in flight). `name` joins the rounds if
    /// it was not registered.
    pub async fn snapshot(&self, name: &str) -> Result<GroupSnapshot, Ec2Error> {
        let ttl = self.inner.settings.cache_ttl;
        let seen_generation = {
            let mut s = lock(&self.inner.state);
            if let Some(r) = s.lookup(name, Instant::now(), ttl, false) {
                return r;
            }
            if !s.names.contains(name) {
                s.names.insert(name.to_owned());
            }
            s.generation
        };
        let _round = self.inner.refresh.lock().await;
        let (names, epoch) = {
            let s = lock(&self.inner.state);
            // A round finished while we waited: its answer is the freshest there is.
            if s.generation != seen_generation
                && let Some(r) = s.lookup(name, Instant::now(), ttl, true)
            {
                return r;
            }
            (s.names.clone(), s.epoch)
        };
        let result = self.describe(&names).await;
        let mut s = lock(&self.inner.state);
        s.generation += 1;
        let valid = s.epoch == epoch;
        s.last = Some(Fetched {
            at: Instant::now(),
            names,
            result,
            valid: true,
        });
        let answer = s
            .lookup(name, Instant::now(), ttl, true)
            .unwrap_or_else(|| {
                Err(Ec2Error::GroupNotFound {
                    group: name.to_owned(),
                })
            });
        if let Some(last) = &mut s.last {
            // A set made during the round may not be in its answer.
            last.valid = valid;
        }
        answer
    }

    /// Describes `names`, [`NAMES_PER_CALL`] per call, following `NextToken`.
    async fn describe(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<HashMap<String, GroupSnapshot>, Ec2Error> {
        let timeout = self.inner.settings.call_timeout;
        let all: Vec<String> = names.iter().cloned().collect();
        let mut groups = HashMap::with_capacity(all.len());
        for chunk in all.chunks(NAMES_PER_CALL) {
            let mut token: Option<String> = None;
            loop {
                self.inner.describe_calls.fetch_add(1, Ordering::Relaxed);
                let call = self
                    .inner
                    .client
                    .describe_auto_scaling_groups()
                    .set_auto_scaling_group_names(Some(chunk.to_vec()))
                    .max_records(NAMES_PER_CALL as i32)
                    .set_next_token(token.take())
                    .send();
                let out = match tokio::time::timeout(timeout, call).await {
                    Err(_) => {
                        return Err(Ec2Error::Aws(AwsError::timed_out(DESCRIBE_GROUPS, timeout)));
                    }
                    Ok(Err(e)) => return Err(Ec2Error::from_describe(e)),
                    Ok(Ok(out)) => out,
                };
                for g in out.auto_scaling_groups() {
                    let snap = GroupSnapshot::from_group(g)?;
                    groups.insert(snap.name.clone(), snap);
                }
                match out.next_token() {
                    Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                    _ => break,
                }
            }
        }
        tracing::debug!(
            asked = names.len(),
            found = groups.len(),
            "described Auto Scaling groups"
        );
        Ok(groups)
    }

    /// Calls `SetDesiredCapacity` and invalidates the cached round.
    pub(crate) async fn set_desired_capacity(
        &self,
        group: &str,
        desired: u32,
        honor_cooldown: bool,
    ) -> Result<(), Ec2Error> {
        let timeout = self.inner.settings.call_timeout;
        // Callers clamp to MaxSize first, which the API gave as an i32.
        let desired = i32::try_from(desired).unwrap_or(i32::MAX);
        self.inner.set_calls.fetch_add(1, Ordering::Relaxed);
        let call = self
            .inner
            .client
            .set_desired_capacity()
            .auto_scaling_group_name(group)
            .desired_capacity(desired)
            .honor_cooldown(honor_cooldown)
            .send();
        let result = tokio::time::timeout(timeout, call).await;
        // Whatever happened, the group may have changed: read it fresh next time.
        self.invalidate();
        match result {
            Err(_) => Err(Ec2Error::Aws(AwsError::timed_out(
                SET_DESIRED_CAPACITY,
                timeout,
            ))),
            Ok(Err(e)) => Err(Ec2Error::from_set(group, e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Calls `SetInstanceProtection` on `ids` of `group`, [`INSTANCES_PER_PROTECTION_CALL`]
    /// ids a call, stopping at the first failure (the batches before it stay applied), and
    /// invalidates the cached round: the next read sees the new protection.
    pub(crate) async fn set_instance_protection(
        &self,
        group: &str,
        ids: &[String],
        protected: bool,
    ) -> Result<(), Ec2Error> {
        let timeout = self.inner.settings.call_timeout;
        let mut result = Ok(());
        for chunk in ids.chunks(INSTANCES_PER_PROTECTION_CALL) {
            self.inner.protection_calls.fetch_add(1, Ordering::Relaxed);
            let call = self
                .inner
                .client
                .set_instance_protection()
                .auto_scaling_group_name(group)
                .set_instance_ids(Some(chunk.to_vec()))
                .protected_from_scale_in(protected)
                .send();
            result = match tokio::time::timeout(timeout, call).await {
                Err(_) => Err(Ec2Error::Aws(AwsError::timed_out(
                    SET_INSTANCE_PROTECTION,
                    timeout,
                ))),
                Ok(Err(e)) => Err(Ec2Error::from_protect(e)),
                Ok(Ok(_)) => Ok(()),
            };
            if result.is_err() {
                break;
            }
        }
        // Whatever happened, some protection may have changed: read it fresh next time.
        self.invalidate();
        result
    }
}
