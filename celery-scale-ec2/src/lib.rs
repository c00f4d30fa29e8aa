#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod error;
mod groups;
mod scaler;

pub use config::{AutoScalingGroupConfig, MAX_WORKERS_PER_INSTANCE};
pub use error::{BACKEND, Ec2Error};
pub use groups::{
    AutoScalingGroups, GroupInstance, GroupSnapshot, INSTANCES_PER_PROTECTION_CALL, NAMES_PER_CALL,
};
pub use scaler::AutoScalingGroupScaler;

/// The shared AWS layer this crate is built on: its settings, start-up errors, classified call
/// errors and cache-TTL rule, re-exported so that one dependency is enough.
pub use celery_scale_aws::{
    AwsError, AwsSettings, Operation, SetupError, SharedSource, cache_ttl_for,
};

/// The SDK crate this one is built on, for callers who build their own client.
pub use aws_sdk_autoscaling;
