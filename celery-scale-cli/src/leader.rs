//! `[leader_election]`: several copies of the daemon on one configuration, one of them acting
//! on each binding (see `celery_scale_core::lease`).
//!
//! ```toml
//! [leader_election]
//! lease = "15s"                         # renewed every third of it
//! # namespace = "prod-"                 # when two deployments share a broker
//! # redis_url = { env = "LEASE_REDIS" } # one Redis for every binding's lease; required for SQS
//! ```
//!
//! Each binding's lease lives where its broker is: a Redis key for a Redis binding, an
//! exclusive queue for a RabbitMQ binding. SQS has no such lock, so SQS bindings need
//! `redis_url` (a store the team already runs), which then serves every binding.

use std::sync::Arc;
use std::time::Duration;

use celery_scale_amqp::AmqpLease;
use celery_scale_core::lease::LeaseStore;
use celery_scale_core::{ConfigError, Error, SecretUrl};
use celery_scale_redis::{RedisQueueSource, RedisSourceConfig};
use serde::{Deserialize, Serialize};

use crate::config::SourceConfig;

/// Shortest lease period.
pub const MIN_LEASE: Duration = Duration::from_secs(3);
/// Longest lease period.
pub const MAX_LEASE: Duration = Duration::from_secs(600);

/// The `[leader_election]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderElection {
    /// How long a lease lasts from each renewal (3 s to 10 min; default 15 s). A leader that
    /// dies is replaced within about this long; a paused one stops acting before it ends.
    #[serde(with = "humantime_serde", default = "default_lease")]
    pub lease: Duration,
    /// Put before each binding's name in its lease's name, when several deployments with the
    /// same binding names share a broker.
    #[serde(default)]
    pub namespace: String,
    /// A Redis for every binding's lease, instead of each binding's broker; required when a
    /// binding reads SQS.
    #[serde(default)]
    pub redis_url: Option<SecretUrl>,
    /// This copy's name as other copies see it (default: the host and start time). A process
    /// id and a random number are always added, so copies that share this setting never share
    /// a lease.
    #[serde(default)]
    pub holder: Option<String>,
}

fn default_lease() -> Duration {
    Duration::from_secs(15)
}

impl LeaderElection {
    /// Checks the section against the bindings' sources (names the field).
    pub fn validate<'a>(
        &self,
        sources: impl IntoIterator<Item = (&'a str, &'a SourceConfig)>,
    ) -> Result<(), ConfigError> {
        if !(MIN_LEASE..=MAX_LEASE).contains(&self.lease) {
            return Err(ConfigError::new(
                "leader_election.lease",
                format!(
                    "{} is outside 3s..=10m",
                    humantime::format_duration(self.lease)
                ),
            ));
        }
        if self
            .holder
            .as_deref()
            .is_some_and(|h| h.trim().is_empty() || h.len() > 200)
        {
            return Err(ConfigError::new(
                "leader_election.holder",
                "must be 1 to 200 characters",
            ));
        }
        if self.namespace.len() > 100 {
            return Err(ConfigError::new(
                "leader_election.namespace",
                "must be at most 100 characters",
            ));
        }
        if let Some(url) = &self.redis_url
            && url.expose().contains(';')
        {
            return Err(ConfigError::new(
                "leader_election.redis_url",
                "a failover list of independent servers cannot hold one lease (two copies could each hold it on a different server): name one Redis, or Sentinel",
            ));
        }
        if let Some(url) = &self.redis_url {
            // Checked here, so that `check` and `run` reject it when the configuration loads.
            return self.lease_redis(url).map(|_| ());
        }
        for (name, source) in sources {
            match source {
                SourceConfig::Sqs(_) => {
                    return Err(ConfigError::new(
                        "leader_election.redis_url",
                        format!(
                            "binding {name:?} reads SQS, which holds no lock: name a Redis for the leases"
                        ),
                    ));
                }
                SourceConfig::Redis(c) if c.url.expose().contains(';') => {
                    return Err(ConfigError::new(
                        "leader_election.redis_url",
                        format!(
                            "binding {name:?} reads a Redis failover list, whose servers are independent: two copies could each hold the lease on a different one; name one Redis (or Sentinel) for the leases"
                        ),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The Redis of `redis_url` as a source configuration for the leases (checked: scheme,
    /// options, TLS files); errors name `leader_election.redis_url`.
    fn lease_redis(&self, url: &SecretUrl) -> Result<RedisSourceConfig, ConfigError> {
        RedisSourceConfig::builder(url.clone())
            .queue("celery")
            .heartbeats(false)
            .build()
            .map_err(|e| match e.field.as_str() {
                "url" => ConfigError::new("leader_election.redis_url", e.rule),
                _ => e.within("leader_election.redis_url"),
            })
    }

    /// This copy's holder name: the configured one or the host and start time, with the
    /// process id and a random number.
    pub fn holder_name(&self) -> String {
        match &self.holder {
            Some(h) => format!("{h}:{}", celery_scale_core::lease::holder_suffix()),
            None => celery_scale_core::lease::holder_name(),
        }
    }

    /// The lease of binding `name` reading `source`, held as `holder` (no I/O yet).
    pub fn store(
        &self,
        name: &str,
        source: &SourceConfig,
        holder: &str,
    ) -> Result<Arc<dyn LeaseStore>, Error> {
        let lease_name = format!("{}{name}", self.namespace);
        let redis_lease = |config: RedisSourceConfig| -> Result<Arc<dyn LeaseStore>, Error> {
            let source = RedisQueueSource::new(config)?;
            Ok(Arc::new(source.lease(
                format!("celery-scale:leader:{lease_name}"),
                holder,
                self.lease,
            )))
        };
        match (&self.redis_url, source) {
            (Some(url), _) => redis_lease(self.lease_redis(url).map_err(Error::Config)?),
            (None, SourceConfig::Redis(c)) => redis_lease(RedisSourceConfig {
                heartbeats: false,
                ..c.clone()
            }),
            (None, SourceConfig::Amqp(c)) => Ok(Arc::new(AmqpLease::new(
                c,
                &lease_name,
                self.lease,
                holder,
            )?)),
            (None, SourceConfig::Sqs(_)) => Err(Error::Config(ConfigError::new(
                "leader_election.redis_url",
                "required for SQS bindings",
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::DaemonConfig;

    const BASE: &str = r#"
[leader_election]
lease = "15s"

[[bindings]]
loop = { name = "emails" }
source = { kind = "redis", url = "redis://h:6379/0", queues = ["emails"] }
scaler = { kind = "ecs", cluster = "prod", service = "workers" }
"#;

    fn error(text: &str) -> String {
        DaemonConfig::parse(text, false).unwrap_err().to_string()
    }

    #[tokio::test]
    async fn a_redis_binding_takes_its_lease_on_its_broker() {
        let c = DaemonConfig::parse(BASE, false).unwrap();
        let l = c.leader_election.unwrap();
        assert_eq!(l.lease, std::time::Duration::from_secs(15));
        let store = l.store("emails", &c.bindings[0].source, "me").unwrap();
        assert!(
            store.describe().contains("celery-scale:leader:emails"),
            "{}",
            store.describe()
        );
    }

    #[test]
    fn mistakes_name_the_field() {
        for (from, to, field) in [
            ("lease = \"15s\"", "lease = \"1s\"", "leader_election.lease"),
            (
                "lease = \"15s\"",
                "lease = \"11m\"",
                "leader_election.lease",
            ),
            (
                "lease = \"15s\"",
                "holder = \" \"",
                "leader_election.holder",
            ),
            ("lease = \"15s\"", "lease_period = \"15s\"", "lease_period"),
            (
                "url = \"redis://h:6379/0\"",
                "url = \"redis://a:6379/0;redis://b:6379/0\"",
                "leader_election.redis_url",
            ),
            (
                "lease = \"15s\"",
                "redis_url = \"redis://a:6379/0;redis://b:6379/0\"",
                "leader_election.redis_url",
            ),
            (
                "lease = \"15s\"",
                "redis_url = \"http://lease:6379/0\"",
                "leader_election.redis_url",
            ),
            (
                "lease = \"15s\"",
                "redis_url = \"\"",
                "leader_election.redis_url",
            ),
        ] {
            let e = error(&BASE.replace(from, to));
            assert!(e.contains(field), "{to}: {e}");
        }
        let long = format!("namespace = \"{}\"", "n".repeat(101));
        assert!(
            error(&BASE.replace("lease = \"15s\"", &long)).contains("leader_election.namespace")
        );
    }

    #[tokio::test]
    async fn sqs_bindings_need_a_redis_for_their_leases() {
        let sqs = BASE.replace(
            "source = { kind = \"redis\", url = \"redis://h:6379/0\", queues = [\"emails\"] }",
            "source = { kind = \"sqs\", url = \"sqs://\", queues = [\"emails\"] }",
        );
        let e = error(&sqs);
        assert!(
            e.contains("leader_election.redis_url") && e.contains("SQS"),
            "{e}"
        );
        let with_store = sqs.replace("lease = \"15s\"", "redis_url = \"redis://lease:6379/0\"");
        let c = DaemonConfig::parse(&with_store, false).unwrap();
        let store = c
            .leader_election
            .unwrap()
            .store("emails", &c.bindings[0].source, "me")
            .unwrap();
        assert!(
            store.describe().contains("lease:6379"),
            "{}",
            store.describe()
        );
    }

    #[test]
    fn copies_sharing_a_configured_holder_name_get_their_own() {
        let c = DaemonConfig::parse(&BASE.replace("lease = \"15s\"", "holder = \"web\""), false)
            .unwrap();
        let l = c.leader_election.unwrap();
        let (a, b) = (l.holder_name(), l.holder_name());
        assert!(a.starts_with("web:") && b.starts_with("web:"), "{a} {b}");
        assert_ne!(a, b);
    }
}
