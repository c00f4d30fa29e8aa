//! Fixtures on moto's SQS (feature `sqs`): Celery's broker URL for moto, an SDK client, and
//! queues made, counted and removed per test.

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::QueueAttributeName;

/// Celery's broker URL for moto: `sqs://testing:testing@host:port` (kombu, and the source, make
/// the endpoint `http://host:port` from it).
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

/// Creates the SQS queue `name` if missing (FIFO when it ends in `.fifo`); returns its URL.
pub async fn create(client: &Client, name: &str) -> String {
    let mut call = client.create_queue().queue_name(name);
    if name.ends_with(".fifo") {
        call = call.attributes(QueueAttributeName::FifoQueue, "true");
    }
    call.send()
        .await
        .expect("create a queue on moto")
        .queue_url()
        .expect("a queue URL")
        .to_owned()
}

/// (visible, not visible) of the SQS queue `name`, read straight from SQS.
pub async fn counts(client: &Client, name: &str) -> (u64, u64) {
    let url = client
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .expect("the queue's URL")
        .queue_url()
        .expect("a queue URL")
        .to_owned();
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("the queue's attributes");
    let get = |a: QueueAttributeName| -> u64 {
        out.attributes()
            .and_then(|m| m.get(&a))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{a:?} missing: {out:?}"))
    };
    (
        get(QueueAttributeName::ApproximateNumberOfMessages),
        get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
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

/// Runs `f` to completion on a runtime of its own (for blocking tests and drops).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(f)
}

/// Removes the test's queues (every name starting with `prefix`) when dropped, also when the
/// test fails.
#[derive(Debug)]
pub struct Cleanup {
    /// moto's server.
    pub moto: String,
    /// The test's own prefix.
    pub prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (moto, prefix) = (self.moto.clone(), self.prefix.clone());
        // A thread of its own: a drop may run while a runtime is being torn down.
        let _ = std::thread::spawn(move || block_on(delete_all(&client(&moto), &prefix))).join();
    }
}
