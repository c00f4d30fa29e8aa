//! The daemon's configuration file: backend-wide settings and the bindings, each of which picks
//! its queue source and compute target at run time by `kind`.
//!
//! ```toml
//! [aws]                       # optional: shared by every ECS, EC2 and SQS binding
//! region = "eu-west-1"
//!
//! [[bindings]]
//! loop = { name = "emails", interval = "5s" }
//! policy = { max_workers = 40 }
//! source = { kind = "redis", url_env = "BROKER_URL", queues = ["emails"] }
//! scaler = { kind = "ecs", cluster = "prod", service = "email-workers", workers_per_task = 4 }
//!
//! [[bindings]]
//! loop = { name = "reports", interval = "10s" }
//! source = { kind = "sqs", url = "sqs://", queues = ["reports"], queue_name_prefix = "prod-" }
//! scaler = { kind = "ecs", cluster = "prod", service = "report-workers" }
//! ```

use std::path::Path;
use std::time::Duration;

use celery_scale_amqp::AmqpSourceConfig;
use celery_scale_aws::AwsSettings;
use celery_scale_core::ConfigError;
use celery_scale_core::config::{BindingConfig, Config, KindTagged};
use celery_scale_ec2::AutoScalingGroupConfig;
use celery_scale_ecs::EcsServiceConfig;
use celery_scale_redis::RedisSourceConfig;
use celery_scale_sqs::SqsSourceConfig;
use serde::{Deserialize, Serialize};

/// Where a binding reads its backlog.
///
/// Read by its `kind` through [`KindTagged`], so that an error inside the section names its
/// field (`bindings[0].source.timeout`); written with `kind` first.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    /// Celery on Redis.
    Redis(RedisSourceConfig),
    /// Celery on RabbitMQ (or Amazon MQ for RabbitMQ).
    Amqp(AmqpSourceConfig),
    /// Celery on Amazon SQS: its clients take the `[aws]` section's settings, with the broker
    /// URL's endpoint and credentials and the `region` option on top, as kombu reads them.
    Sqs(SqsSourceConfig),
}

/// What a binding scales.
///
/// Read by its `kind` like [`SourceConfig`] (`bindings[0].scaler.workers_per_task`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScalerConfig {
    /// An ECS service.
    Ecs(EcsServiceConfig),
    /// An EC2 Auto Scaling Group.
    Ec2(AutoScalingGroupConfig),
}

// Not `#[derive(Deserialize)]` with `#[serde(tag = "kind")]`: an internally tagged enum buffers
// its section, and an error inside it would name only `bindings[0].source`.
impl<'de> Deserialize<'de> for SourceConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let tagged = KindTagged::deserialize(deserializer)?;
        match tagged.kind() {
            "redis" => tagged.into_variant().map(SourceConfig::Redis),
            "amqp" => tagged.into_variant().map(SourceConfig::Amqp),
            "sqs" => tagged.into_variant().map(SourceConfig::Sqs),
            _ => Err(tagged.unknown_kind(&["redis", "amqp", "sqs"])),
        }
    }
}

impl<'de> Deserialize<'de> for ScalerConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let tagged = KindTagged::deserialize(deserializer)?;
        match tagged.kind() {
            "ecs" => tagged.into_variant().map(ScalerConfig::Ecs),
            "ec2" => tagged.into_variant().map(ScalerConfig::Ec2),
            _ => Err(tagged.unknown_kind(&["ecs", "ec2"])),
        }
    }
}

impl SourceConfig {
    /// What kind of source this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Redis(_) => "redis",
            SourceConfig::Amqp(_) => "amqp",
            SourceConfig::Sqs(_) => "sqs",
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match self {
            SourceConfig::Redis(c) => c.validate(),
            SourceConfig::Amqp(c) => c.validate(),
            SourceConfig::Sqs(c) => c.validate(),
        }
    }
}

impl ScalerConfig {
    /// Checks the target's fields (names the field that is wrong).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        match self {
            ScalerConfig::Ecs(c) => c.validate(),
            ScalerConfig::Ec2(c) => c.validate(),
        }
    }
}

/// One binding of the daemon.
pub type DaemonBinding = BindingConfig<SourceConfig, ScalerConfig>;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// AWS settings shared by every ECS, EC2 and SQS binding: region, endpoint, retries, call
    /// timeout and the cache TTL of the one batched read per service per tick (the scalers';
    /// an SQS source reads its queues afresh every tick).
    #[serde(default)]
    pub aws: AwsSettings,
    /// Several copies, one acting per binding (optional: without it this copy acts alone).
    #[serde(default)]
    pub leader_election: Option<crate::leader::LeaderElection>,
    /// The bindings.
    pub bindings: Vec<DaemonBinding>,
}

impl DaemonConfig {
    /// Reads, parses (TOML, or JSON when the name ends in `.json`) and validates `path`.
    /// Errors name the file and the field path.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the configuration {}: {e}", path.display()))?;
        let json = path.extension().is_some_and(|e| e == "json");
        Self::parse(&text, json).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and validates a configuration text.
    pub fn parse(text: &str, json: bool) -> Result<Self, ConfigError> {
        let config: DaemonConfig = if json {
            celery_scale_core::config::parse_json(text)?
        } else {
            celery_scale_core::config::parse_toml(text)?
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every section; errors name the path (`bindings[1].source.url`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.aws.validate().map_err(|e| e.within("aws"))?;
        if let Some(l) = &self.leader_election {
            l.validate(
                self.bindings
                    .iter()
                    .map(|b| (b.settings.name.as_str(), &b.source)),
            )?;
        }
        let bindings = Config {
            bindings: self.bindings.clone(),
        };
        bindings.validate(&|source: &SourceConfig, scaler: &ScalerConfig| {
            source.validate().map_err(|e| e.within("source"))?;
            scaler.validate().map_err(|e| e.within("scaler"))
        })
    }

    /// Whether any binding reads Amazon SQS.
    pub fn uses_sqs(&self) -> bool {
        self.bindings
            .iter()
            .any(|b| matches!(b.source, SourceConfig::Sqs(_)))
    }

    /// The shortest interval of the bindings that use `uses`.
    pub fn shortest_interval(&self, uses: impl Fn(&ScalerConfig) -> bool) -> Option<Duration> {
        self.bindings
            .iter()
            .filter(|b| uses(&b.scaler))
            .map(|b| b.settings.interval)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SQS: &str = r#"
[[bindings]]
loop = { name = "reports" }
source = { kind = "sqs", url = "sqs://AKIDEXAMPLE:s3cr3t%2Fkey@", queues = ["reports.high"], queue_name_prefix = "prod-" }
scaler = { kind = "ecs", cluster = "prod", service = "report-workers" }
"#;

    #[test]
    fn an_sqs_source_is_read_with_kombus_names_and_its_secret_hidden() {
        let config = DaemonConfig::parse(SQS, false).unwrap();
        let source = &config.bindings[0].source;
        assert_eq!(source.kind(), "sqs");
        let SourceConfig::Sqs(c) = source else {
            panic!("not sqs: {source:?}")
        };
        assert_eq!(c.sqs_names(), ["prod-reports-high"]);
        assert!(config.uses_sqs());
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn sqs_mistakes_name_the_field() {
        for (from, to, field) in [
            (
                "queues = [\"reports.high\"]",
                "queues = []",
                "bindings[0].source.queues",
            ),
            (
                "queue_name_prefix = \"prod-\"",
                "queue_prefix = \"prod-\"",
                "queue_prefix",
            ),
            (
                "url = \"sqs://AKIDEXAMPLE:s3cr3t%2Fkey@\"",
                "url = \"redis://h\"",
                "source.url",
            ),
        ] {
            let text = SQS.replace(from, to);
            let e = DaemonConfig::parse(&text, false).unwrap_err();
            assert!(e.to_string().contains(field), "{to}: {e}");
        }
    }
}
