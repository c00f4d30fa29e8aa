#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod error;
mod protection;
mod services;

pub use error::{BACKEND, EcsError, TaskFailure};
pub use protection::{TASKS_PER_DESCRIBE, TASKS_PER_GET_PROTECTION, TASKS_PER_UPDATE_PROTECTION};
pub use services::{
    DEFAULT_PROTECTION_EXPIRES_IN, EcsCalls, EcsServiceConfig, EcsServiceScaler, EcsServices,
    MAX_PROTECTION_EXPIRES_IN, MAX_WORKERS_PER_TASK, SERVICES_PER_CALL,
};

/// The shared AWS layer this crate is built on: its settings, start-up errors, classified call
/// errors and cache-TTL rule, re-exported so that one dependency is enough.
pub use celery_scale_aws::{
    AwsError, AwsSettings, Operation, SetupError, SharedSource, cache_ttl_for,
};

/// The SDK crate this one is built on, for callers who build their own client.
pub use aws_sdk_ecs;
