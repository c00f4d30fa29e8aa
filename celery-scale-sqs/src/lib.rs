#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod error;
mod names;
mod source;

pub use config::{
    DiscoveryConfig, MAX_CONCURRENCY, MAX_QUEUES, MAX_REFRESH, MIN_REFRESH, PredefinedQueue,
    Secret, SqsSourceConfig, SqsSourceConfigBuilder,
};
pub use error::{BACKEND, QUEUE_MISSING_CODES, SqsError};
pub use names::{
    BrokerUrl, FIFO_SUFFIX, MAX_SQS_NAME, invalid_sqs_name, list_prefix, sqs_queue_name,
};
pub use source::{KOMBU_DEFAULT_REGION, SqsCalls, SqsQueueCounts, SqsQueueSource, SqsReading};

/// The shared AWS layer this crate is built on: its settings, start-up errors and classified
/// call errors, re-exported so that one dependency is enough.
pub use celery_scale_aws::{AwsError, AwsSettings, Operation, SetupError};

/// The SDK crate this one is built on, for callers who build their own client.
pub use aws_sdk_sqs;
