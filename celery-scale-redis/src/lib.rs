#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod error;
mod heartbeats;
mod layout;
mod source;

pub use config::{
    DEFAULT_PRIORITY_STEPS, DEFAULT_SEP, DiscoveryConfig, InFlightMode, RedisSourceConfig,
    RedisSourceConfigBuilder, TlsConfig,
};
pub use error::RedisSourceError;
pub use source::RedisQueueSource;
