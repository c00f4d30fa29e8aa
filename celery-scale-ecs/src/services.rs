//! [`EcsServices`]: one ECS client shared by every service the bindings scale, reading them all
//! with batched `DescribeServices` calls (at most 10 services per call, per cluster).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_ecs::Client;
use celery_scale_aws::{AwsError, AwsSettings, SetupError};
use celery_scale_core::protection::UnitProtection;
use celery_scale_core::{Capacity, CapacityUnit, ConfigError, Scaler, SetOutcome, WorkersPerUnit};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::EcsError;
use crate::error::{DESCRIBE_SERVICES, UPDATE_SERVICE, classify, code_of};

/// Services per `DescribeServices` call (the API's limit).
pub const SERVICES_PER_CALL: usize = 10;

/// The most worker processes one task may say it runs ([`EcsServiceConfig::workers_per_task`]):
/// 1024, already far more Celery pool processes than one task sensibly runs. A larger value is
/// a typo, and would make one unit of capacity stand for that many workers.
pub const MAX_WORKERS_PER_TASK: u32 = 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One ECS service to scale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EcsServiceConfig {
    /// Cluster name or ARN.
    pub cluster: String,
    /// Service name or ARN.
    pub service: String,
    /// Celery worker processes per task (the worker's `--concurrency`): 1 to
    /// [`MAX_WORKERS_PER_TASK`].
    #[serde(default, deserialize_with = "workers_per_task")]
    pub workers_per_task: WorkersPerUnit,
    /// Whether the loop protects the tasks whose workers execute Celery tasks from scale-in
    /// (`UpdateTaskProtection`) before it lowers the desired count, and releases them once idle.
    /// Off by default; needs `ecs:ListTasks`, `ecs:DescribeTasks`, `ecs:GetTaskProtection` and
    /// `ecs:UpdateTaskProtection` (see the README).
    #[serde(default)]
    pub protect_busy_units: bool,
    /// How long a protection lasts unless renewed (`expiresInMinutes`): whole minutes, 1 min to
    /// 2880 min (48 h), as ECS allows. Default 60 min. A busy task's protection is renewed when
    /// less than a third of this is left.
    #[serde(default = "default_protection_expires_in", with = "humantime_serde")]
    pub protection_expires_in: Duration,
}

/// The default of [`EcsServiceConfig::protection_expires_in`]: 60 minutes.
pub const DEFAULT_PROTECTION_EXPIRES_IN: Duration = Duration::from_secs(60 * 60);

/// The longest protection ECS allows: 2880 minutes (48 hours).
pub const MAX_PROTECTION_EXPIRES_IN: Duration = Duration::from_secs(2880 * 60);

fn default_protection_expires_in() -> Duration {
    DEFAULT_PROTECTION_EXPIRES_IN
}

fn workers_per_task<'de, D: serde::Deserializer<'de>>(d: D) -> Result<WorkersPerUnit, D::Error> {
    let n = u32::deserialize(d)?;
    WorkersPerUnit::new(n).ok_or_else(|| serde::de::Error::custom("must be at least 1"))
}

impl EcsServiceConfig {
    /// `service` in `cluster`, one worker process per task.
    pub fn new(cluster: impl Into<String>, service: impl Into<String>) -> Self {
        EcsServiceConfig {
            cluster: cluster.into(),
            service: service.into(),
            workers_per_task: WorkersPerUnit::ONE,
            protect_busy_units: false,
            protection_expires_in: DEFAULT_PROTECTION_EXPIRES_IN,
        }
    }

    /// Turns on scale-in protection of busy tasks, each protection lasting `expires_in` unless
    /// renewed (whole minutes, 1 min to 2880 min).
    pub fn protect_busy_units(mut self, expires_in: Duration) -> Result<Self, ConfigError> {
        self.protect_busy_units = true;
        self.protection_expires_in = expires_in;
        self.validate()?;
        Ok(self)
    }

    /// `protection_expires_in` in whole minutes (what `expiresInMinutes` takes).
    pub fn protection_minutes(&self) -> i32 {
        i32::try_from(self.protection_expires_in.as_secs() / 60).unwrap_or(i32::MAX)
    }

    /// Sets the worker processes per task (1 to [`MAX_WORKERS_PER_TASK`]).
    pub fn workers_per_task(mut self, n: u32) -> Result<Self, ConfigError> {
        self.workers_per_task = WorkersPerUnit::new(n)
            .ok_or_else(|| ConfigError::new("workers_per_task", "must be at least 1"))?;
        self.check_workers_per_task()?;
        Ok(self)
    }

    fn check_workers_per_task(&self) -> Result<(), ConfigError> {
        let n = self.workers_per_task.get();
        if n > MAX_WORKERS_PER_TASK {
            return Err(ConfigError::new(
                "workers_per_task",
                format!(
                    "{n} is above the maximum {MAX_WORKERS_PER_TASK} (Celery processes per task)"
                ),
            ));
        }
        Ok(())
    }

    /// Checks the fields (names relative to this struct).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cluster.trim().is_empty() {
            return Err(ConfigError::new("cluster", "must not be empty"));
        }
        if self.service.trim().is_empty() {
            return Err(ConfigError::new("service", "must not be empty"));
        }
        self.check_workers_per_task()?;
        let expires = self.protection_expires_in;
        if expires < Duration::from_secs(60) || expires > MAX_PROTECTION_EXPIRES_IN {
            return Err(ConfigError::new(
                "protection_expires_in",
                "must be from 1m to 2880m (48h), as ECS allows",
            ));
        }
        if !expires.as_secs().is_multiple_of(60) || expires.subsec_nanos() != 0 {
            return Err(ConfigError::new(
                "protection_expires_in",
                "must be a whole number of minutes (ECS's expiresInMinutes)",
            ));
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
    settings: AwsSettings,
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
    /// A handle on `client` (a test's mock client, or one you configured yourself). Only the
    /// settings' `call_timeout` and `cache_ttl` apply; region, endpoint and retries are the
    /// client's.
    pub fn new(client: Client, settings: AwsSettings) -> Result<Self, ConfigError> {
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

    /// A handle whose client is configured from `sdk` (credentials, region, endpoint), with
    /// the settings' region, endpoint and attempts on top ([`AwsSettings::apply_to`]; a set
    /// `endpoint_url` also wins over `AWS_ENDPOINT_URL_ECS`). Makes no call; fails when a
    /// setting is invalid or no region is set.
    pub fn from_sdk_config(sdk: &SdkConfig, settings: AwsSettings) -> Result<Self, SetupError> {
        let sdk = settings.apply_to(sdk)?;
        let mut conf = aws_sdk_ecs::config::Builder::from(&sdk);
        if let Some(url) = &settings.endpoint_url {
            conf = conf.endpoint_url(url.clone());
        }
        Ok(Self::new(Client::from_conf(conf.build()), settings)?)
    }

    /// A handle configured from aws-config's default chain (environment, profile, web
    /// identity, ECS task role, instance metadata; `AWS_ENDPOINT_URL` and
    /// `AWS_ENDPOINT_URL_ECS` honoured) with the settings on top, checked by
    /// [`AwsSettings::sdk_config`]: fails at start, saying what to set, when no region is set
    /// or no credentials are found.
    pub async fn from_settings(settings: &AwsSettings) -> Result<Self, SetupError> {
        let sdk = settings.sdk_config().await?;
        Self::from_sdk_config(&sdk, settings.clone())
    }

    /// The calls made so far.
    pub fn calls(&self) -> EcsCalls {
        EcsCalls {
            describe_services: self.inner.describes.load(Ordering::Relaxed),
            update_service: self.inner.updates.load(Ordering::Relaxed),
        }
    }

    /// The shared settings.
    pub fn settings(&self) -> &AwsSettings {
        &self.inner.settings
    }

    /// The client.
    pub(crate) fn client(&self) -> &Client {
        &self.inner.client
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
        let timeout = self.inner.settings.call_timeout;
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
            Err(_) => {
                let e = EcsError::Aws(AwsError::timed_out(DESCRIBE_SERVICES, timeout));
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
                let cluster_missing = code_of(&e) == Some("ClusterNotFoundException");
                let shared = (!cluster_missing).then(|| classify(DESCRIBE_SERVICES, e));
                return services
                    .into_iter()
                    .map(|s| {
                        let err = shared.clone().unwrap_or_else(|| EcsError::ServiceNotFound {
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
                    Some(s) if s.status() != Some("INACTIVE") => capacity(&cluster, &name, s),
                    Some(_) => Err(EcsError::ServiceNotFound {
                        cluster: cluster.clone(),
                        service: name.clone(),
                        reason: "INACTIVE".into(),
                    }),
                    None => Err(EcsError::ServiceNotFound {
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
            Err(EcsError::ServiceNotFound {
                cluster: key.0.clone(),
                service: key.1.clone(),
                reason: "not registered".into(),
            })
        });
        lock(&self.inner.state).cache = Some((Instant::now(), map));
        result
    }

    async fn update(&self, key: &Key, desired: u32) -> Result<(), EcsError> {
        let timeout = self.inner.settings.call_timeout;
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
            Ok(Err(e)) => match code_of(&e) {
                Some(
                    code @ ("ServiceNotFoundException"
                    | "ServiceNotActiveException"
                    | "ClusterNotFoundException"),
                ) => Err(EcsError::ServiceNotFound {
                    cluster: key.0.clone(),
                    service: key.1.clone(),
                    reason: code.to_owned(),
                }),
                _ => Err(classify(UPDATE_SERVICE, e)),
            },
            Err(_) => Err(EcsError::Aws(AwsError::timed_out(UPDATE_SERVICE, timeout))),
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

/// A described service's counts. ECS never answers a negative count; one that does is a bad
/// answer (logged and reported as [`AwsError::InvalidResponse`]), never read as 0.
fn capacity(
    cluster: &str,
    name: &str,
    s: &aws_sdk_ecs::types::Service,
) -> Result<Capacity, EcsError> {
    let count = |v: i32, what: &str| {
        u32::try_from(v).map_err(|_| {
            tracing::warn!(
                cluster,
                service = name,
                count = what,
                value = v,
                "ECS answered a negative count; ignoring the answer"
            );
            EcsError::Aws(AwsError::InvalidResponse {
                operation: DESCRIBE_SERVICES,
                message: format!("service '{name}' in cluster '{cluster}' has {what} {v}"),
                source: None,
            })
        })
    };
    Ok(Capacity {
        desired: count(s.desired_count(), "desiredCount")?,
        running: count(s.running_count(), "runningCount")?,
        pending: count(s.pending_count(), "pendingCount")?,
    })
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

    /// Task scale-in protection, when `protect_busy_units` is on.
    fn protection(&self) -> Option<&dyn UnitProtection> {
        self.config
            .protect_busy_units
            .then_some(self as &dyn UnitProtection)
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
    fn workers_per_task_is_bounded() {
        let at = |n: u32| {
            toml::from_str::<EcsServiceConfig>(&format!(
                "cluster = \"p\"\nservice = \"w\"\nworkers_per_task = {n}\n"
            ))
            .unwrap()
        };
        at(MAX_WORKERS_PER_TASK).validate().unwrap();
        for n in [MAX_WORKERS_PER_TASK + 1, 4_000_000_000] {
            let e = at(n).validate().unwrap_err();
            assert_eq!(e.field, "workers_per_task", "{e}");
            assert!(e.rule.contains("above the maximum 1024"), "{e}");
            let e = EcsServiceConfig::new("p", "w")
                .workers_per_task(n)
                .unwrap_err();
            assert_eq!(e.field, "workers_per_task", "{e}");
        }
        // Through the configuration parser the zero check names the field once.
        let e = celery_scale_core::config::parse_toml::<EcsServiceConfig>(
            "cluster = \"p\"\nservice = \"w\"\nworkers_per_task = 0\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "workers_per_task", "{e}");
        assert!(e.rule.starts_with("must be at least 1"), "{e}");
    }

    #[test]
    fn protection_is_opt_in_and_its_expiry_is_checked() {
        let d: EcsServiceConfig = toml::from_str("cluster = \"p\"\nservice = \"w\"\n").unwrap();
        assert!(!d.protect_busy_units, "off by default");
        assert_eq!(d.protection_expires_in, Duration::from_secs(3600));
        assert_eq!(d.protection_minutes(), 60);

        let on: EcsServiceConfig = toml::from_str(
            "cluster = \"p\"\nservice = \"w\"\nprotect_busy_units = true\nprotection_expires_in = \"2h\"\n",
        )
        .unwrap();
        assert!(on.protect_busy_units);
        assert_eq!(on.protection_minutes(), 120);
        on.validate().unwrap();
        let back: EcsServiceConfig = toml::from_str(&toml::to_string(&on).unwrap()).unwrap();
        assert_eq!(back, on);
        assert_eq!(
            EcsServiceConfig::new("p", "w")
                .protect_busy_units(Duration::from_secs(2880 * 60))
                .unwrap()
                .protection_minutes(),
            2880
        );

        for bad in ["30s", "0s", "2881m", "49h", "90s"] {
            let c: EcsServiceConfig = toml::from_str(&format!(
                "cluster = \"p\"\nservice = \"w\"\nprotection_expires_in = \"{bad}\"\n"
            ))
            .unwrap();
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, "protection_expires_in", "{bad}: {e}");
            let e = EcsServiceConfig::new("p", "w")
                .protect_busy_units(c.protection_expires_in)
                .unwrap_err();
            assert_eq!(e.field, "protection_expires_in", "{bad}");
        }
        let e = toml::from_str::<EcsServiceConfig>(
            "cluster = \"p\"\nservice = \"w\"\nprotection_expires_in = \"soon\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("protection_expires_in"), "{e}");
    }
}
