//! Shared by the SQS tests: moto's address, the AWS settings and a source on moto; the SQS
//! fixtures (client, broker URL, queues made and removed) are `celery_scale_testing::sqs`'s.

#![allow(dead_code)]

use celery_scale_sqs::{AwsSettings, SqsQueueSource, SqsSourceConfig};

#[allow(unused_imports)]
pub use celery_scale_testing::sqs::{Cleanup, broker_url, client, create, delete_all};
pub use celery_scale_testing::unique;

/// moto's server, or `None` to skip (a failure under `CI=true`).
pub fn moto() -> Option<String> {
    celery_scale_testing::service("CELERY_SCALE_MOTO_URL")
}

/// The AWS settings of the tests (region only: the broker URL names moto).
pub fn settings() -> AwsSettings {
    AwsSettings::default().region("us-east-1")
}

/// A source on moto for `config` (whose `url` is the broker URL).
pub async fn source(config: SqsSourceConfig) -> SqsQueueSource {
    SqsQueueSource::from_settings(&settings(), config)
        .await
        .expect("a source on moto")
}
