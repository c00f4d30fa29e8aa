//! Builds each binding's source and scaler from its `kind`, sharing one AWS client per service
//! (so every ECS service of every binding is read in one batched round per tick, and every
//! Auto Scaling Group likewise). Amazon SQS sources are built from the same SDK configuration
//! (region, credentials chain, endpoint), with each source's broker URL on top.

use std::sync::Arc;

use aws_config::SdkConfig;
use celery_scale_amqp::AmqpQueueSource;
use celery_scale_aws::{AwsSettings, cache_ttl_for};
use celery_scale_core::lease::Leadership;
use celery_scale_core::record::DecisionSink;
use celery_scale_core::{
    Binding, BindingFactory, Error, LoopSettings, PolicyFactory, QueueSource, Scaler,
};
use celery_scale_ec2::AutoScalingGroups;
use celery_scale_ecs::EcsServices;
use celery_scale_redis::RedisQueueSource;
use celery_scale_sqs::SqsQueueSource;

use crate::config::{DaemonBinding, DaemonConfig, ScalerConfig, SourceConfig};
use crate::leader::LeaderElection;

/// The shared AWS handles the bindings need (none when no binding uses that service).
#[derive(Debug, Default)]
pub struct Backends {
    ecs: Option<EcsServices>,
    ec2: Option<AutoScalingGroups>,
    /// The SDK configuration and the `[aws]` settings SQS sources are built from.
    sqs: Option<(SdkConfig, AwsSettings)>,
}

impl Backends {
    /// Builds the AWS handles the configuration's bindings use. Fails, saying what is missing,
    /// when the AWS region or credentials cannot be found.
    pub async fn connect(config: &DaemonConfig) -> Result<Self, String> {
        let mut backends = Backends::default();
        let ecs = config.shortest_interval(|s| matches!(s, ScalerConfig::Ecs(_)));
        let ec2 = config.shortest_interval(|s| matches!(s, ScalerConfig::Ec2(_)));
        let sqs = config.uses_sqs();
        if ecs.is_none() && ec2.is_none() && !sqs {
            return Ok(backends);
        }
        // One SDK configuration (region, credentials, endpoint) for every service, checked
        // once at start.
        let sdk = config
            .aws
            .sdk_config()
            .await
            .map_err(|e| format!("aws: {e}"))?;
        let with_ttl = |shortest| {
            let mut settings = config.aws.clone();
            settings.cache_ttl = cache_ttl_for(settings.cache_ttl, shortest);
            settings
        };
        if ecs.is_some() {
            backends.ecs = Some(
                EcsServices::from_sdk_config(&sdk, with_ttl(ecs))
                    .map_err(|e| format!("aws.{e}"))?,
            );
        }
        if ec2.is_some() {
            backends.ec2 = Some(
                AutoScalingGroups::from_sdk_config(&sdk, with_ttl(ec2))
                    .map_err(|e| format!("aws.{e}"))?,
            );
        }
        if sqs {
            backends.sqs = Some((sdk, config.aws.clone()));
        }
        Ok(backends)
    }

    /// A source for `config` (no I/O yet).
    pub fn source(&self, config: &SourceConfig) -> Result<Box<dyn QueueSource>, Error> {
        Ok(match config {
            SourceConfig::Redis(c) => Box::new(RedisQueueSource::new(c.clone())?),
            SourceConfig::Amqp(c) => Box::new(AmqpQueueSource::new(c.clone())?),
            SourceConfig::Sqs(c) => {
                let (sdk, settings) = self.sqs.as_ref().ok_or_else(|| missing("source", "sqs"))?;
                Box::new(SqsQueueSource::from_sdk_config(
                    sdk,
                    settings.clone(),
                    c.clone(),
                )?)
            }
        })
    }

    /// A scaler for `config` on the shared handle.
    pub fn scaler(&self, config: &ScalerConfig) -> Result<Box<dyn Scaler>, Error> {
        Ok(match config {
            ScalerConfig::Ecs(c) => Box::new(
                self.ecs
                    .as_ref()
                    .ok_or_else(|| missing("scaler", "ecs"))?
                    .scaler(c.clone())?,
            ),
            ScalerConfig::Ec2(c) => Box::new(
                self.ec2
                    .as_ref()
                    .ok_or_else(|| missing("scaler", "ec2"))?
                    .scaler(c.clone())?,
            ),
        })
    }
}

fn missing(section: &str, kind: &str) -> Error {
    Error::Config(celery_scale_core::ConfigError::new(
        format!("{section}.kind"),
        format!("no {kind} client was set up"),
    ))
}

/// A factory that builds binding `b` (its loop settings with `dry_run` forced on when asked,
/// its policy, source and scaler), feeding `sink`, if any, with every record. With `leader`
/// (the section and this copy's holder name) the binding acts only while it holds its lease.
pub fn factory(
    backends: Arc<Backends>,
    b: &DaemonBinding,
    dry_run: bool,
    sink: Option<Arc<dyn DecisionSink>>,
    leader: Option<(LeaderElection, String)>,
) -> BindingFactory {
    let b = b.clone();
    Arc::new(move || {
        let settings = LoopSettings {
            dry_run: b.settings.dry_run || dry_run,
            ..b.settings.clone()
        };
        let at = |what: &str| format!("binding {:?} ({what})", settings.name);
        let policy = b
            .policy
            .build()
            .map_err(|e| Error::Config(e.within("policy")))?;
        let source = backends
            .source(&b.source)
            .map_err(|e| context(e, &at("source")))?;
        let scaler = backends
            .scaler(&b.scaler)
            .map_err(|e| context(e, &at("scaler")))?;
        let mut binding = Binding::new(settings.clone(), source, scaler, policy)?;
        // A binding that runs dry takes no lease (it would keep it from a copy that acts).
        if let Some((election, holder)) = leader.as_ref().filter(|_| !settings.dry_run) {
            let store = election
                .store(&settings.name, &b.source, holder)
                .map_err(|e| context(e, &at("leader_election")))?;
            let config = b.policy.clone();
            let fresh: PolicyFactory = Arc::new(move || config.build());
            binding = binding.with_leadership(Leadership::new(store), fresh);
        }
        Ok(match &sink {
            Some(sink) => binding.with_sink(Arc::clone(sink)),
            None => binding,
        })
    })
}

/// `e` with `what` said first, for a start-up message.
fn context(e: Error, what: &str) -> Error {
    Error::Other {
        backend: "celery-scale",
        message: format!("{what}: {e}"),
        transient: e.is_transient(),
        source: Some(Box::new(e)),
    }
}
