#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod error;
mod services;

pub use error::{BACKEND, EcsError};
pub use services::{EcsCalls, EcsServiceConfig, EcsServiceScaler, EcsServices, SERVICES_PER_CALL};

/// The shared AWS layer this crate is built on: its settings, start-up errors, classified call
/// errors and cache-TTL rule, re-exported so that one dependency is enough.
pub use celery_scale_aws::{
    AwsError, AwsSettings, Operation, SetupError, SharedSource, cache_ttl_for,
};

/// The SDK crate this one is built on, for callers who build their own client.
pub use aws_sdk_ecs;
