//! Scale-in that chooses its victims: the units whose workers execute tasks are protected from
//! scale-in before the desired count drops, and released once idle, so the platform stops idle
//! units first.
//!
//! A compute target that can protect units (ECS task scale-in protection, EC2 Auto Scaling
//! instance protection) offers [`UnitProtection`] through [`Scaler::protection`](crate::Scaler::protection).
//! The loop maps each Celery worker node heard in the heartbeats to a unit by the rule of
//! [`unit_of`], makes a [`ProtectionPlan`] with [`plan`] (pure, so it is property-tested) and
//! applies it. It stops no unit while the worker figures or the broker's held count are unknown,
//! while messages are ready (an idle unit may take one between the decision and its stop), or
//! while a busy worker maps to no unit or a unit has no worker heard. A worker that was idle in
//! a beat no newer than the last time the broker held more messages counts as busy: a solo pool
//! that has just taken a task beats again only when the task ends. What remains is a task
//! published after the decision and taken by a unit the platform is about to stop; a worker that
//! protects itself when a task starts (the recipes in `docs/`) closes that gap too.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::celery_events::WorkerNode;

/// A unit of a compute target (an ECS task, an EC2 instance) as protection sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    /// Its id: the ECS task ID (the last part of the task ARN) or the EC2 instance ID.
    pub id: String,
    /// Other names the host part of its workers' node names may be: private IPv4 addresses
    /// as `ip-10-0-1-23`, private DNS names, container host names.
    pub aliases: Vec<String>,
    /// Whether it is protected from scale-in now.
    pub protected: bool,
    /// When its protection ends on its own (ECS protection expires; EC2's does not: `None`).
    #[serde(with = "humantime_serde", default)]
    pub protected_until: Option<SystemTime>,
    /// Whether the platform is already stopping it (never protected then).
    pub stopping: bool,
}

impl Unit {
    /// An unprotected running unit `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Unit {
            id: id.into(),
            aliases: Vec::new(),
            protected: false,
            protected_until: None,
            stopping: false,
        }
    }
}

/// A compute target that can protect units from scale-in.
#[async_trait]
pub trait UnitProtection: Send + Sync + Debug + 'static {
    /// The target's units that run or are starting, with their protection.
    async fn units(&self) -> Result<Vec<Unit>>;

    /// Protects (`protected = true`) or releases the units `ids`. Protection that expires
    /// lasts the target's configured time from now.
    async fn set_protected(&self, ids: &[String], protected: bool) -> Result<()>;

    /// How long before its protection ends a busy unit's protection is renewed (zero, the
    /// default, for protection that does not expire).
    fn renew_within(&self) -> Duration {
        Duration::ZERO
    }
}

/// The host part of a Celery node name: what follows the last `@` (`celery@ip-10-0-1-23` ->
/// `ip-10-0-1-23`), or the whole name without one.
pub fn host_of(node: &str) -> &str {
    node.rsplit_once('@').map_or(node, |(_, host)| host)
}

/// Whether `name` occurs in `host` as a whole token: at the start or after a character that is
/// not a letter or digit, and at the end or before one.
fn has_token(host: &str, name: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    let boundary = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric());
    host.match_indices(name).any(|(i, _)| {
        boundary(host[..i].chars().next_back()) && boundary(host[i + name.len()..].chars().next())
    })
}

/// The unit a worker node runs on, by this rule: the host part of its node name (see
/// [`host_of`]) holds the unit's id or one of its aliases as a whole token, or its first DNS
/// label is an alias's first label (`ip-10-0-1-23` and `ip-10-0-1-23.ec2.internal`). A node
/// that names no unit, or more than one, maps to none.
///
/// ```
/// use celery_scale_core::protection::{Unit, unit_of};
/// let mut a = Unit::new("3f2a9c0e5b7d4e1f8a6b2c4d6e8f0a1b");
/// a.aliases = vec!["ip-10-0-1-23.ec2.internal".into()];
/// let b = Unit::new("i-0abc1234def567890");
/// let units = [a, b];
/// assert_eq!(unit_of("celery@ip-10-0-1-23", &units).unwrap().id, units[0].id);
/// assert_eq!(unit_of("celery@3f2a9c0e5b7d4e1f8a6b2c4d6e8f0a1b", &units).unwrap().id, units[0].id);
/// assert_eq!(unit_of("emails@i-0abc1234def567890", &units).unwrap().id, units[1].id);
/// assert!(unit_of("celery@ip-10-0-1-2", &units).is_none());
/// ```
pub fn unit_of<'a>(node: &str, units: &'a [Unit]) -> Option<&'a Unit> {
    let host = host_of(node);
    // The first DNS label of a name (`ip-10-0-1-23` of `ip-10-0-1-23.ec2.internal`); none for
    // a dotted address, whose first label (`10`) names no one host.
    let first_label = |s: &str| {
        let label = s.split('.').next().unwrap_or_default();
        (!label.is_empty() && !label.bytes().all(|b| b.is_ascii_digit())).then(|| label.to_string())
    };
    let host_label = first_label(host);
    let mut found = units.iter().filter(|u| {
        has_token(host, &u.id)
            || u.aliases.iter().any(|a| {
                has_token(host, a) || (host_label.is_some() && first_label(a) == host_label)
            })
    });
    let unit = found.next()?;
    found.next().is_none().then_some(unit)
}

/// What protection does on one tick.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProtectionPlan {
    /// Units to protect (or whose protection to renew): busy ones, at most the new desired count.
    pub protect: Vec<String>,
    /// Protected units whose every worker is idle: released so the platform may stop them.
    pub release: Vec<String>,
    /// Units with a worker executing tasks.
    pub busy_units: Vec<String>,
    /// Node names of workers executing tasks that map to no unit: each counts as a busy unit
    /// nobody may remove, and since which unit runs it is not known, no unit may be stopped.
    pub unmapped_busy: Vec<String>,
    /// Units (not stopping) with no worker heard: one may be starting, or busy under a name
    /// that maps to nothing, so no unit may be stopped while there is one.
    pub unheard: Vec<String>,
}

impl ProtectionPlan {
    /// How many units must stay: every busy unit, mapped or not.
    pub fn busy_floor(&self) -> u32 {
        u32::try_from(self.busy_units.len() + self.unmapped_busy.len()).unwrap_or(u32::MAX)
    }

    /// Why no unit may be stopped now, if one may not (see [`ProtectionPlan::unmapped_busy`]
    /// and [`ProtectionPlan::unheard`]).
    pub fn blocks_scale_in(&self) -> Option<String> {
        if !self.unmapped_busy.is_empty() {
            return Some(format!(
                "busy worker(s) of no known unit: {}",
                self.unmapped_busy.join(", ")
            ));
        }
        if !self.unheard.is_empty() {
            return Some(format!(
                "unit(s) with no worker heard: {}",
                self.unheard.join(", ")
            ));
        }
        None
    }

    /// Whether the plan changes nothing on the target.
    pub fn is_empty(&self) -> bool {
        self.protect.is_empty() && self.release.is_empty()
    }
}

/// The protection plan for `units` given the live worker `nodes`, when the desired count goes
/// to `desired` units; `lowering` says whether it drops this tick. Busy units are protected
/// before a drop (and renewed when their protection ends within `renew_within` of `now`, drop or
/// not), at most `desired` of them, busiest first; protected units whose workers are all idle
/// are released. A unit with no worker heard is left as it is: it may be starting, or its
/// worker may be busy under a name that maps to nothing.
///
/// A node counts as busy also when it was idle in a beat no newer than `work_offered_at`, the
/// last time work could have reached it (messages ready, or more held than before): it may have
/// taken some since, and a solo pool that did beats again only when the task ends.
pub fn plan(
    units: &[Unit],
    nodes: &[WorkerNode],
    desired: u32,
    lowering: bool,
    now: SystemTime,
    renew_within: Duration,
    work_offered_at: Option<tokio::time::Instant>,
) -> ProtectionPlan {
    let mut executing: Vec<(String, u64)> = Vec::new();
    let mut heard: BTreeSet<&str> = BTreeSet::new();
    let mut out = ProtectionPlan::default();
    for node in nodes {
        match unit_of(&node.hostname, units) {
            Some(unit) => {
                heard.insert(unit.id.as_str());
                let maybe_busy = node.executing == 0
                    && node
                        .last_beat
                        .zip(work_offered_at)
                        .is_some_and(|(beat, offered)| beat <= offered);
                if node.executing > 0 || maybe_busy {
                    // A node that may have taken work counts as one task.
                    let n = node.executing.max(1);
                    match executing.iter_mut().find(|(id, _)| *id == unit.id) {
                        Some((_, busy)) => *busy = busy.saturating_add(n),
                        None => executing.push((unit.id.clone(), n)),
                    }
                }
            }
            None if node.executing > 0 => out.unmapped_busy.push(node.hostname.clone()),
            None => {}
        }
    }
    // Busiest first, then by id, so the cap keeps the same units tick after tick.
    executing.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out.busy_units = executing.iter().map(|(id, _)| id.clone()).collect();
    let expiring = |u: &Unit| {
        u.protected_until
            .is_some_and(|until| until.duration_since(now).unwrap_or_default() <= renew_within)
    };
    let cap = usize::try_from(desired).unwrap_or(usize::MAX);
    let protectable = out
        .busy_units
        .iter()
        .filter_map(|id| units.iter().find(|u| &u.id == id))
        .filter(|u| !u.stopping);
    for unit in protectable.take(cap) {
        if (!unit.protected && lowering) || (unit.protected && expiring(unit)) {
            out.protect.push(unit.id.clone());
        }
    }
    out.unheard = units
        .iter()
        .filter(|u| !u.stopping && !heard.contains(u.id.as_str()))
        .map(|u| u.id.clone())
        .collect();
    let busy: BTreeSet<&str> = out.busy_units.iter().map(String::as_str).collect();
    out.release = units
        .iter()
        .filter(|u| u.protected && heard.contains(u.id.as_str()) && !busy.contains(u.id.as_str()))
        .map(|u| u.id.clone())
        .collect();
    out
}

/// What protection did on a tick, for the decision record.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProtectionRecord {
    /// The plan.
    pub plan: ProtectionPlan,
    /// Whether it was applied (false in a dry run, or when a call failed).
    pub applied: bool,
    /// What failed, if anything (the scale-in is then held).
    pub error: Option<String>,
    /// The kind of what failed.
    pub error_kind: Option<crate::ErrorKind>,
    /// Whether what failed may pass on a retry (the loop then backs off, as for any transient
    /// fault).
    pub transient: bool,
    /// Why nothing was done, when nothing was (`worker figures unknown`, ...).
    pub skipped: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(name: &str, executing: u64) -> WorkerNode {
        WorkerNode::new(name, executing)
    }

    fn protected(id: &str) -> Unit {
        Unit {
            protected: true,
            ..Unit::new(id)
        }
    }

    #[test]
    fn busy_units_are_protected_before_a_drop_and_idle_protected_ones_released() {
        let units = [
            Unit::new("a"),
            protected("b"),
            Unit::new("c"),
            protected("d"),
        ];
        let nodes = [
            node("w@a", 2),
            node("w@b", 0),
            node("w@c", 0),
            node("w@d", 1),
        ];
        let now = SystemTime::now();
        let p = plan(&units, &nodes, 2, true, now, Duration::from_secs(60), None);
        assert_eq!(p.busy_units, ["a", "d"]);
        assert_eq!(p.protect, ["a"], "d is protected already");
        assert_eq!(p.release, ["b"]);
        assert_eq!(p.busy_floor(), 2);
        // Not lowering: nothing new is protected, idle ones are still released.
        let p = plan(&units, &nodes, 4, false, now, Duration::from_secs(60), None);
        assert!(p.protect.is_empty());
        assert_eq!(p.release, ["b"]);
    }

    #[test]
    fn unmapped_busy_workers_count_as_units_and_unheard_units_are_left_alone() {
        let units = [protected("a"), Unit::new("b")];
        let nodes = [node("w@elsewhere", 3), node("w@b", 0)];
        let p = plan(
            &units,
            &nodes,
            1,
            true,
            SystemTime::now(),
            Duration::ZERO,
            None,
        );
        assert_eq!(p.unmapped_busy, ["w@elsewhere"]);
        assert_eq!(p.busy_floor(), 1);
        assert!(
            p.release.is_empty(),
            "no worker of a is heard: it may be busy"
        );
    }

    #[test]
    fn protection_that_ends_soon_is_renewed_and_stopping_units_are_never_protected() {
        let now = SystemTime::now();
        let mut soon = protected("a");
        soon.protected_until = Some(now + Duration::from_secs(30));
        let mut later = protected("b");
        later.protected_until = Some(now + Duration::from_secs(3600));
        let stopping = Unit {
            stopping: true,
            ..Unit::new("c")
        };
        let nodes = [node("w@a", 1), node("w@b", 1), node("w@c", 1)];
        let p = plan(
            &[soon, later, stopping],
            &nodes,
            3,
            false,
            now,
            Duration::from_secs(60),
            None,
        );
        assert_eq!(p.protect, ["a"]);
        let p = plan(
            &[Unit {
                stopping: true,
                ..Unit::new("c")
            }],
            &nodes[2..],
            3,
            true,
            now,
            Duration::ZERO,
            None,
        );
        assert!(p.protect.is_empty());
    }

    #[test]
    fn a_node_idle_since_before_work_was_offered_counts_as_busy() {
        let offered = tokio::time::Instant::now();
        let before = offered - Duration::from_secs(1);
        let after = offered + Duration::from_secs(1);
        let beat = |name: &str, at| WorkerNode {
            last_beat: Some(at),
            ..node(name, 0)
        };
        let units = [Unit::new("a"), Unit::new("b")];
        let nodes = [beat("w@a", before), beat("w@b", after)];
        let p = plan(
            &units,
            &nodes,
            1,
            true,
            SystemTime::now(),
            Duration::ZERO,
            Some(offered),
        );
        assert_eq!(
            p.busy_units,
            ["a"],
            "a may have taken the work; b beat idle since"
        );
        assert_eq!(p.protect, ["a"]);
        // Nothing offered since the loop started: both are idle.
        let p = plan(
            &units,
            &nodes,
            1,
            true,
            SystemTime::now(),
            Duration::ZERO,
            None,
        );
        assert!(p.busy_units.is_empty());
    }

    #[test]
    fn a_dotted_address_names_a_unit_only_whole() {
        let mut a = Unit::new("t1");
        a.aliases = vec!["10.0.1.23".into(), "ip-10-0-1-23".into()];
        let mut b = Unit::new("t2");
        b.aliases = vec!["10.0.1.24".into(), "ip-10-0-1-24".into()];
        let units = [a, b];
        assert_eq!(unit_of("celery@10.0.1.23", &units).unwrap().id, "t1");
        assert_eq!(
            unit_of("celery@10.0.9.9", &units),
            None,
            "the first label 10 is no one's"
        );
        assert_eq!(unit_of("celery@ip-10-0-1-24", &units).unwrap().id, "t2");
    }

    #[test]
    fn unheard_units_and_unmapped_busy_workers_block_the_scale_in() {
        let units = [Unit::new("a"), Unit::new("b")];
        let p = plan(
            &units,
            &[node("w@a", 0)],
            1,
            true,
            SystemTime::now(),
            Duration::ZERO,
            None,
        );
        assert_eq!(p.unheard, ["b"]);
        assert!(p.blocks_scale_in().unwrap().contains("b"));
        let p = plan(
            &units,
            &[node("w@a", 0), node("w@b", 0), node("w@laptop", 2)],
            1,
            true,
            SystemTime::now(),
            Duration::ZERO,
            None,
        );
        assert!(p.unheard.is_empty());
        assert!(p.blocks_scale_in().unwrap().contains("w@laptop"));
    }

    #[test]
    fn a_name_that_matches_two_units_maps_to_none() {
        let mut a = Unit::new("a1");
        a.aliases = vec!["ip-10-0-0-1".into()];
        let mut b = Unit::new("b1");
        b.aliases = vec!["ip-10-0-0-1.ec2.internal".into()];
        assert!(unit_of("w@ip-10-0-0-1", &[a.clone(), b]).is_none());
        assert_eq!(unit_of("w@ip-10-0-0-1", &[a]).unwrap().id, "a1");
        assert!(unit_of("w@x", &[Unit::new("")]).is_none());
    }

    proptest! {
        #[test]
        fn never_protects_more_than_desired_nor_an_idle_or_unknown_unit(
            busy in proptest::collection::vec(0u64..4, 0..12),
            protected_mask in proptest::collection::vec(any::<bool>(), 12),
            desired in 0u32..14,
            lowering: bool,
        ) {
            let units: Vec<Unit> = (0..busy.len())
                .map(|i| Unit { protected: protected_mask[i], ..Unit::new(format!("u{i}")) })
                .collect();
            let nodes: Vec<WorkerNode> = busy
                .iter()
                .enumerate()
                .map(|(i, n)| node(&format!("celery@u{i}"), *n))
                .collect();
            let p = plan(&units, &nodes, desired, lowering, SystemTime::now(), Duration::ZERO, None);
            let busy_count = busy.iter().filter(|n| **n > 0).count();
            prop_assert!(p.protect.len() <= desired as usize);
            prop_assert_eq!(p.busy_floor() as usize, busy_count);
            for id in &p.protect {
                let i: usize = id[1..].parse().unwrap();
                prop_assert!(busy[i] > 0, "protects only busy units");
                prop_assert!(lowering, "protects new units only before a drop");
            }
            for id in &p.release {
                let i: usize = id[1..].parse().unwrap();
                prop_assert!(busy[i] == 0 && protected_mask[i], "releases only idle protected units");
            }
        }
    }
}
