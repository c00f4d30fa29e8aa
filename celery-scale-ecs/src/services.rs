//! [`EcsServices`]: one ECS client shared by every service the bindings scale, reading them all
//! with batched `DescribeServices` calls (at most 10 services per call, per cluster).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ecs::Client;
use celery_scale_core::{Capacity, CapacityUnit, ConfigError, Scaler, SetOutcome, WorkersPerUnit};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::EcsError;
use crate::error::ModeledCode;

/// Services per `DescribeServices` call (the API's limit).
pub const SERVICES_PER_CALL: usize = 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Shared settings of an [`EcsServices`] handle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EcsSettings {
    /// How long one batched read serves every binding's `capacity()`; keep it below the poll
    /// interval. Concurrent reads within it cost one set of `DescribeServices` calls.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Timeout of each ECS call (the loop's own timeout applies too).
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
}

impl Default for EcsSettings {
    fn default() -> Self {
        EcsSettings {
            cache_ttl: Duration::from_millis(500),
            operation_timeout: Duration::from_secs(5),
        }
    }
}

impl EcsSettings {
    /// Sets `cache_ttl`.
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// Sets `operation_timeout`.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.operation_timeout.is_zero() {
            return Err(ConfigError::new(
                "operation_timeout",
                "must be greater than 0s",
            ));
        }
        Ok(())
    }
}

/// One ECS service to scale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EcsServiceConfig {
    /// Cluster name or ARN.
    pub cluster: String,
    /// Service name or ARN.
    pub service: String,
    /// Celery worker processes per task (the worker's `--concurrency`).
    #[serde(default, deserialize_with = "workers_per_task")]
    pub workers_per_task: WorkersPerUnit,
}

fn workers_per_task<'de, D: serde::Deserializer<'de>>(d: D) -> Result<WorkersPerUnit, D::Error> {
    let n = u32::deserialize(d)?;
    WorkersPerUnit::new(n)
        .ok_or_else(|| serde::de::Error::custom("workers_per_task: must be at least 1"))
}

impl EcsServiceConfig {
    /// `service` in `cluster`, one worker process per task.
    pub fn new(cluster: impl Into<String>, service: impl Into<String>) -> Self {
        EcsServiceConfig {
            cluster: cluster.into(),
            service: service.into(),
            workers_per_task: WorkersPerUnit::ONE,
        }
    }

    /// Sets the worker processes per task (at least 1).
    pub fn workers_per_task(mut self, n: u32) -> Result<Self, ConfigError> {
        self.workers_per_task = WorkersPerUnit::new(n)
            .ok_or_else(|| ConfigError::new("workers_per_task", "must be at least 1"))?;
        Ok(self)
    }

    /// Checks the fields (names relative to this struct).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cluster.trim().is_empty() {
            return Err(ConfigError::new("cluster", "must not be empty"));
        }
        if self.service.trim().is_empty() {
            return Err(ConfigError::new("service", "must not be empty"));
        }
        Ok(())
    }
}

type Key = (String, String);

/// What one batched read said, per service.
type Snapshot = HashMap<Key, Result<Capacity, EcsError>>;

#[derive(Default)]
struct State {
    registered: Vec<Key>,
    /// When the last batch was read, and what it said per service.
    cache: Option<(Instant, Snapshot)>,
}

struct Inner {
    client: Client,
    settings: EcsSettings,
    state: Mutex<State>,
    /// Serializes batch reads so that concurrent `capacity()` calls share one.
    refresh: tokio::sync::Mutex<()>,
    describes: AtomicU64,
    updates: AtomicU64,
}

/// How many ECS calls an [`EcsServices`] handle has made since it was built (each attempt of the
/// loop counts once; the SDK's own retries are not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EcsCalls {
    /// `DescribeServices` calls.
    pub describe_services: u64,
    /// `UpdateService` calls.
    pub update_service: u64,
}

/// One ECS client for many services: hands out an [`EcsServiceScaler`] per service and reads
/// all of them with `ceil(n / 10)` `DescribeServices` calls per cluster per read, not `n`.
#[derive(Clone)]
pub struct EcsServices {
    inner: Arc<Inner>,
}

impl fmt::Debug for EcsServices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EcsServices")
            .field("services", &lock(&self.inner.state).registered)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

impl EcsServices {
    /// A handle on `client` (build it with [`EcsServices::client_from_env`] or your own config).
    pub fn new(client: Client, settings: EcsSettings) -> Result<Self, ConfigError> {
        settings.validate()?;
        Ok(EcsServices {
            inner: Arc::new(Inner {
                client,
                settings,
                state: Mutex::new(State::default()),
                refresh: tokio::sync::Mutex::new(()),
                describes: AtomicU64::new(0),
                updates: AtomicU64::new(0),
            }),
        })
    }

    /// A client from aws-config's default chain (environment, profile, web identity, ECS task
    /// role, instance metadata); honours `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_ECS`.
    pub async fn client_from_env() -> Client {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        Client::new(&config)
    }

    /// The calls made so far.
    pub fn calls(&self) -> EcsCalls {
        EcsCalls {
            describe_services: self.inner.describes.load(Ordering::Relaxed),
            update_service: self.inner.updates.load(Ordering::Relaxed),
        }
    }

    /// The shared settings.
    pub fn settings(&self) -> &EcsSettings {
        &self.inner.settings
    }

    /// A scaler for one service; the service is read with the others from now on.
    pub fn scaler(&self, config: EcsServiceConfig) -> Result<EcsServiceScaler, ConfigError> {
        config.validate()?;
        let key = (config.cluster.clone(), config.service.clone());
        let mut state = lock(&self.inner.state);
        if !state.registered.contains(&key) {
            state.registered.push(key);
            state.cache = None;
        }
        Ok(EcsServiceScaler {
            services: self.clone(),
            config,
        })
    }

    /// Reads every registered service now, in batches of at most 10 per cluster.
    async fn read_all(&self) -> Snapshot {
        let registered = lock(&self.inner.state).registered.clone();
        let mut by_cluster: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (cluster, service) in registered {
            by_cluster.entry(cluster).or_default().push(service);
        }
        let calls = by_cluster.iter().flat_map(|(cluster, services)| {
            services
                .chunks(SERVICES_PER_CALL)
                .map(move |chunk| self.describe(cluster.clone(), chunk.to_vec()))
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn describe(
        &self,
        cluster: String,
        services: Vec<String>,
    ) -> Vec<(Key, Result<Capacity, EcsError>)> {
        const OP: &str = "DescribeServices";
        let timeout = self.inner.settings.operation_timeout;
        self.inner.describes.fetch_add(1, Ordering::Relaxed);
        let call = self
            .inner
            .client
            .describe_services()
            .cluster(&cluster)
            .set_services(Some(services.clone()))
            .send();
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(e),
            Err(elapsed) => {
                let e = EcsError::Timeout {
                    operation: OP,
                    after: timeout,
                    source: Arc::new(elapsed),
                };
                return services
                    .into_iter()
                    .map(|s| ((cluster.clone(), s), Err(e.clone())))
                    .collect();
            }
        };
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                // A missing cluster fails the whole call; each of its services is missing.
                let cluster_missing = aws_sdk_ecs::error::ProvideErrorMetadata::code(&e)
                    .or_else(|| e.as_service_error().and_then(ModeledCode::modeled_code))
                    == Some("ClusterNotFoundException");
                let shared = (!cluster_missing).then(|| EcsError::from_sdk(OP, timeout, e));
                return services
                    .into_iter()
                    .map(|s| {
                        let err = shared.clone().unwrap_or_else(|| EcsError::NotFound {
                            cluster: cluster.clone(),
                            service: s.clone(),
                            reason: "ClusterNotFoundException".into(),
                        });
                        ((cluster.clone(), s), Err(err))
                    })
                    .collect();
            }
        };
        services
            .into_iter()
            .map(|name| {
                let found = out.services().iter().find(|s| {
                    s.service_name() == Some(name.as_str())
                        || s.service_arn() == Some(name.as_str())
                });
                let result = match found {
                    // An INACTIVE (deleted) service is described but cannot be scaled.
                    Some(s) if s.status() != Some("INACTIVE") => Ok(Capacity {
                        desired: s.desired_count().max(0) as u32,
                        running: s.running_count().max(0) as u32,
                        pending: s.pending_count().max(0) as u32,
                    }),
                    Some(_) => Err(EcsError::NotFound {
                        cluster: cluster.clone(),
                        service: name.clone(),
                        reason: "INACTIVE".into(),
                    }),
                    None => Err(EcsError::NotFound {
                        cluster: cluster.clone(),
                        service: name.clone(),
                        reason: out
                            .failures()
                            .iter()
                            .find(|f| {
                                f.arn()
                                    .is_some_and(|a| a == name || a.ends_with(&format!("/{name}")))
                            })
                            .and_then(|f| f.reason())
                            .unwrap_or("not described")
                            .to_owned(),
                    }),
                };
                ((cluster.clone(), name), result)
            })
            .collect()
    }

    async fn capacity_of(&self, key: &Key) -> Result<Capacity, EcsError> {
        let ttl = self.inner.settings.cache_ttl;
        let fresh = |state: &State| {
            state.cache.as_ref().and_then(|(at, map)| {
                (at.elapsed() < ttl)
                    .then(|| map.get(key).cloned())
                    .flatten()
            })
        };
        if let Some(hit) = fresh(&lock(&self.inner.state)) {
            return hit;
        }
        let _guard = self.inner.refresh.lock().await;
        // Someone else may have read while we waited.
        if let Some(hit) = fresh(&lock(&self.inner.state)) {
            return hit;
        }
        let map = self.read_all().await;
        let result = map.get(key).cloned().unwrap_or_else(|| {
            Err(EcsError::NotFound {
                cluster: key.0.clone(),
                service: key.1.clone(),
                reason: "not registered".into(),
            })
        });
        lock(&self.inner.state).cache = Some((Instant::now(), map));
        result
    }

    async fn update(&self, key: &Key, desired: u32) -> Result<(), EcsError> {
        const OP: &str = "UpdateService";
        let timeout = self.inner.settings.operation_timeout;
        self.inner.updates.fetch_add(1, Ordering::Relaxed);
        let call = self
            .inner
            .client
            .update_service()
            .cluster(&key.0)
            .service(&key.1)
            .desired_count(i32::try_from(desired).unwrap_or(i32::MAX))
            .send();
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                let code = aws_sdk_ecs::error::ProvideErrorMetadata::code(&e)
                    .or_else(|| e.as_service_error().and_then(ModeledCode::modeled_code))
                    .map(str::to_owned);
                match code.as_deref() {
                    Some(
                        "ServiceNotFoundException"
                        | "ServiceNotActiveException"
                        | "ClusterNotFoundException",
                    ) => Err(EcsError::NotFound {
                        cluster: key.0.clone(),
                        service: key.1.clone(),
                        reason: code.unwrap_or_default(),
                    }),
                    _ => Err(EcsError::from_sdk(OP, timeout, e)),
                }
            }
            Err(elapsed) => Err(EcsError::Timeout {
                operation: OP,
                after: timeout,
                source: Arc::new(elapsed),
            }),
        };
        let mut state = lock(&self.inner.state);
        match (&result, state.cache.as_mut()) {
            // The service's desired count is now exactly `desired`: patch the shared read so
            // that other bindings reading within its TTL do not need another round of calls.
            (Ok(()), Some((_, map))) if matches!(map.get(key), Some(Ok(_))) => {
                if let Some(Ok(c)) = map.get_mut(key) {
                    c.desired = desired;
                }
            }
            // Otherwise what the cache says about this service is no longer to be trusted.
            _ => state.cache = None,
        }
        result
    }
}

/// The [`Scaler`] for one ECS service: unit = ECS task running `workers_per_task` worker
/// processes; reads desired/running/pending counts; sets `desiredCount` with `UpdateService`.
#[derive(Debug, Clone)]
pub struct EcsServiceScaler {
    services: EcsServices,
    config: EcsServiceConfig,
}

impl EcsServiceScaler {
    /// The service's configuration.
    pub fn config(&self) -> &EcsServiceConfig {
        &self.config
    }

    /// The handle this scaler reads and sets through.
    pub fn services(&self) -> &EcsServices {
        &self.services
    }

    /// Reads the service's desired, running and pending task counts (through the shared,
    /// batched read), with the typed error.
    pub async fn read(&self) -> Result<Capacity, EcsError> {
        self.services.capacity_of(&self.key()).await
    }

    /// Sets the service's desired task count with `UpdateService`, with the typed error. The
    /// control loop calls this only when the count changes.
    pub async fn update(&self, tasks: u32) -> Result<(), EcsError> {
        self.services.update(&self.key(), tasks).await
    }

    fn key(&self) -> Key {
        (self.config.cluster.clone(), self.config.service.clone())
    }
}

#[async_trait]
impl Scaler for EcsServiceScaler {
    fn unit(&self) -> CapacityUnit {
        CapacityUnit::EcsTask
    }

    fn workers_per_unit(&self) -> WorkersPerUnit {
        self.config.workers_per_task
    }

    async fn capacity(&self) -> celery_scale_core::Result<Capacity> {
        Ok(self.read().await?)
    }

    async fn set_desired(&self, units: u32) -> celery_scale_core::Result<SetOutcome> {
        self.update(units).await?;
        Ok(SetOutcome::applied(units))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_rejects_bad_fields() {
        let c: EcsServiceConfig =
            toml::from_str("cluster = \"prod\"\nservice = \"w\"\nworkers_per_task = 4\n").unwrap();
        assert_eq!(
            c,
            EcsServiceConfig::new("prod", "w")
                .workers_per_task(4)
                .unwrap()
        );
        let back: EcsServiceConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let d: EcsServiceConfig = toml::from_str("cluster = \"p\"\nservice = \"w\"\n").unwrap();
        assert_eq!(d.workers_per_task.get(), 1, "defaults to 1");

        let zero = toml::from_str::<EcsServiceConfig>(
            "cluster = \"p\"\nservice = \"w\"\nworkers_per_task = 0\n",
        )
        .unwrap_err();
        assert!(zero.to_string().contains("workers_per_task"), "{zero}");
        let unknown =
            toml::from_str::<EcsServiceConfig>("cluster = \"p\"\nservice = \"w\"\nsize = 1\n")
                .unwrap_err();
        assert!(unknown.to_string().contains("size"), "{unknown}");
        assert_eq!(
            EcsServiceConfig::new("p", " ")
                .validate()
                .unwrap_err()
                .field,
            "service"
        );
        assert_eq!(
            EcsServiceConfig::new("p", "w")
                .workers_per_task(0)
                .unwrap_err()
                .field,
            "workers_per_task"
        );
    }

    #[test]
    fn settings_are_humantime_and_validated() {
        let s: EcsSettings =
            toml::from_str("cache_ttl = \"1s\"\noperation_timeout = \"2s\"\n").unwrap();
        assert_eq!(
            s,
            EcsSettings::default()
                .cache_ttl(Duration::from_secs(1))
                .operation_timeout(Duration::from_secs(2))
        );
        assert_eq!(
            EcsSettings::default()
                .operation_timeout(Duration::ZERO)
                .validate()
                .unwrap_err()
                .field,
            "operation_timeout"
        );
    }
}
