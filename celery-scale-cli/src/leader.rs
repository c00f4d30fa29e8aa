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
    /// This copy's name as other copies see it (default: host, process id and start time).
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
        if self.redis_url.is_none()
            && let Some((name, _)) = sources
                .into_iter()
                .find(|(_, s)| matches!(s, SourceConfig::Sqs(_)))
        {
            return Err(ConfigError::new(
                "leader_election.redis_url",
                format!(
                    "binding {name:?} reads SQS, which holds no lease: name a Redis for the leases"
                ),
            ));
        }
        Ok(())
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
            (Some(url), _) => redis_lease(
                RedisSourceConfig::builder(url.clone())
                    .queue("celery")
                    .heartbeats(false)
                    .build()
                    .map_err(|e| Error::Config(e.within("leader_election.redis_url")))?,
            ),
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
