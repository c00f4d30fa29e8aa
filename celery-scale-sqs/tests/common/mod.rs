//! Shared by the SQS tests: moto's address, an SDK client on it (for fixtures), the broker URL
//! Celery and the source both use, and queues made and removed per test.

#![allow(dead_code)]

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use celery_scale_sqs::{AwsSettings, SqsQueueSource, SqsSourceConfig};

pub use celery_scale_testing::unique;

/// moto's server, or `None` to skip (a failure under `CI=true`).
pub fn moto() -> Option<String> {
    celery_scale_testing::service("CELERY_SCALE_MOTO_URL")
}

/// Celery's broker URL for moto: `sqs://testing:testing@host:port` (kombu makes the endpoint
/// `http://host:port` from it).
pub fn broker_url(moto: &str) -> String {
    let host = moto
        .trim_end_matches('/')
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    format!("sqs://testing:testing@{host}")
}

/// An SDK client on moto, for fixtures (create, send, receive, delete).
pub fn client(moto: &str) -> Client {
    let conf = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(moto)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .build();
    Client::from_conf(conf)
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

/// Creates the SQS queue `name` (FIFO when it ends in `.fifo`); returns its URL.
pub async fn create(client: &Client, name: &str) -> String {
    let mut call = client.create_queue().queue_name(name);
    if name.ends_with(".fifo") {
        call = call.attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true");
    }
    call.send()
        .await
        .expect("create queue on moto")
        .queue_url()
        .expect("a queue URL")
        .to_owned()
}

/// Deletes every queue whose name starts with `prefix` (the test's own).
pub async fn delete_all(client: &Client, prefix: &str) {
    let Ok(out) = client.list_queues().queue_name_prefix(prefix).send().await else {
        return;
    };
    for url in out.queue_urls() {
        let _ = client.delete_queue().queue_url(url).send().await;
    }
}

/// Removes the test's queues when dropped (also when the test fails).
pub struct Cleanup {
    pub moto: String,
    pub prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (moto, prefix) = (self.moto.clone(), self.prefix.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(delete_all(&client(&moto), &prefix));
        })
        .join();
    }
}
