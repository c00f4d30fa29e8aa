//! Shared by the CLI's tests on Amazon SQS (moto): the shared fixtures of
//! `celery_scale_testing::sqs`, blocking (the CLI's tests are).

#![allow(dead_code)]

use celery_scale_testing::sqs::{block_on, client};

#[allow(unused_imports)]
pub use celery_scale_testing::sqs::{Cleanup as Queues, broker_url};

/// Creates the SQS queue `name` if missing; its URL.
pub fn create(moto: &str, name: &str) -> String {
    block_on(celery_scale_testing::sqs::create(&client(moto), name))
}

/// (visible, not visible) of the SQS queue `name`, read straight from SQS.
pub fn counts(moto: &str, name: &str) -> (u64, u64) {
    block_on(celery_scale_testing::sqs::counts(&client(moto), name))
}
