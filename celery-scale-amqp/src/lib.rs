#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod broker_url;
mod config;
mod connect;
mod error;
mod events;
mod heartbeats;
mod lease;
mod management;
mod source;
mod tls;
mod transport_options;

pub use broker_url::BrokerAddress;
pub use config::{
    AmqpSourceConfig, AmqpSourceConfigBuilder, DiscoveryConfig, ManagementConfig, TlsConfig,
};
pub use error::AmqpSourceError;
pub use events::CeleryEventConsumer;
pub use lease::{AmqpLease, HOLDER_ARGUMENT, LOCK_QUEUE_PREFIX};
pub use management::{
    MAX_CLOCK_SKEW, MAX_COUNT, MIN_HEAD_TIMESTAMP_SECS, ManagementClient, QueueStats,
};
pub use source::AmqpQueueSource;
pub use transport_options::{
    HONOURED as HONOURED_TRANSPORT_OPTIONS, IGNORED as IGNORED_TRANSPORT_OPTIONS,
};

/// `tracing` filter directives that keep the AMQP client's own logs below the level at which
/// they print protocol frames, to add to the process's filter **after** the user's `RUST_LOG`
/// (so they win over it, even over `RUST_LOG=trace` or `lapin=trace`).
///
/// At `TRACE` lapin logs every frame it writes (`will write to buffer`), the login
/// (`connection.start-ok`) included, whose PLAIN response holds the user name and the password
/// (printed as decimal bytes). Nothing at `INFO` or above in lapin or amq-protocol prints a
/// frame. The source's own logs (target `celery_scale_amqp`) never hold a password at any level.
///
/// A library cannot choose its user's subscriber, so the daemon (or any program using this
/// crate) adds these:
///
/// ```
/// # use tracing_subscriber::EnvFilter;
/// let mut filter = EnvFilter::new("trace"); // e.g. from RUST_LOG
/// for directive in celery_scale_amqp::LOG_FILTER_DIRECTIVES.split(',') {
///     filter = filter.add_directive(directive.parse().unwrap());
/// }
/// ```
pub const LOG_FILTER_DIRECTIVES: &str = "lapin=info,amq_protocol=info,amq_protocol_tcp=info,amq_protocol_types=info,amq_protocol_uri=info";
