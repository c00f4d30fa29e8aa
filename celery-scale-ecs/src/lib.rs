#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod error;
mod services;

pub use error::{BACKEND, EcsError, SharedSource};
pub use services::{
    EcsCalls, EcsServiceConfig, EcsServiceScaler, EcsServices, EcsSettings, SERVICES_PER_CALL,
};

/// The SDK crate this one is built on, for callers who build their own client.
pub use aws_sdk_ecs;
