#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub use celery_scale_core::*;

/// The core crate, whole.
pub use celery_scale_core as core;

/// Celery on Redis (`redis` feature).
#[cfg(feature = "redis")]
pub use celery_scale_redis as redis;

/// Celery on RabbitMQ (`amqp` feature).
#[cfg(feature = "amqp")]
pub use celery_scale_amqp as amqp;

/// Amazon ECS services (`ecs` feature).
#[cfg(feature = "ecs")]
pub use celery_scale_ecs as ecs;

/// EC2 Auto Scaling Groups (`ec2` feature).
#[cfg(feature = "ec2")]
pub use celery_scale_ec2 as ec2;

/// The simulator (`sim` feature).
#[cfg(feature = "sim")]
pub use celery_scale_sim as sim;
