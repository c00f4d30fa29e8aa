#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod error;
mod groups;
mod scaler;

pub use config::{AutoScalingGroupConfig, AutoScalingSettings};
pub use error::{BACKEND, Ec2Error, SharedSource};
pub use groups::{AutoScalingGroups, GroupSnapshot, NAMES_PER_CALL};
pub use scaler::AutoScalingGroupScaler;

/// The SDK crate this one is built on, for callers who build their own client.
pub use aws_sdk_autoscaling;
