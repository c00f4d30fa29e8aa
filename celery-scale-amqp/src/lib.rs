#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod error;
mod heartbeats;
mod management;
mod source;
mod tls;

pub use config::{
    AmqpSourceConfig, AmqpSourceConfigBuilder, DiscoveryConfig, ManagementConfig, TlsConfig,
};
pub use error::AmqpSourceError;
pub use management::{ManagementClient, QueueStats};
pub use source::AmqpQueueSource;
