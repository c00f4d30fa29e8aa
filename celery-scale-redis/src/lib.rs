#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod broker;
mod config;
mod connect;
mod error;
mod events;
mod heartbeats;
mod layout;
mod lease;
mod options;
mod source;
mod tls;

pub use config::{
    DEFAULT_PRIORITY_STEPS, DEFAULT_SEP, DiscoveryConfig, InFlightMode, MAX_PRIORITY_STEP,
    MAX_QUEUES, MAX_TIMEOUT, MIN_TIMEOUT, RedisSourceConfig, RedisSourceConfigBuilder, TlsConfig,
};
pub use error::RedisSourceError;
pub use events::CeleryEventSubscription;
pub use lease::RedisLease;
pub use options::{DEFAULT_VISIBILITY_TIMEOUT, HONOURED_OPTIONS, IGNORED_OPTIONS};
pub use source::RedisQueueSource;
