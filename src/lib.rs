#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use celery_scale_core::*;

/// The core crate, whole.
pub use celery_scale_core as core;

/// Celery on Redis (`redis` feature).
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use celery_scale_redis as redis;

/// Celery on RabbitMQ (`amqp` feature).
#[cfg(feature = "amqp")]
#[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
pub use celery_scale_amqp as amqp;

/// Celery on Amazon SQS (`sqs` feature).
#[cfg(feature = "sqs")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqs")))]
pub use celery_scale_sqs as sqs;

/// Amazon ECS services (`ecs` feature).
#[cfg(feature = "ecs")]
#[cfg_attr(docsrs, doc(cfg(feature = "ecs")))]
pub use celery_scale_ecs as ecs;

/// EC2 Auto Scaling Groups (`ec2` feature).
#[cfg(feature = "ec2")]
#[cfg_attr(docsrs, doc(cfg(feature = "ec2")))]
pub use celery_scale_ec2 as ec2;

/// The simulator (`sim` feature).
#[cfg(feature = "sim")]
#[cfg_attr(docsrs, doc(cfg(feature = "sim")))]
pub use celery_scale_sim as sim;
