//! Connecting to RabbitMQ as the configuration says: the URL's failover list (kombu's
//! round-robin order), TLS, the connection name and the AMQP heartbeat. Shared by the queue
//! source and the leader lease, each with connections of its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use crate::broker_url::BrokerAddress;
use crate::config::AmqpSourceConfig;
use crate::error::AmqpSourceError;

/// One broker of the URL's failover list.
struct Broker {
    uri: AMQPUri,
    /// `amqp://user:***@host:port/vhost`.
    shown: String,
    connect_timeout: Duration,
}

/// The brokers of one configuration and how to connect to them. Never `Debug`: the TLS
/// configuration's `Debug` prints the PKCS#12 password and the key, and the URIs hold the
/// password.
pub(crate) struct Brokers {
    /// In the order kombu tries them (never empty).
    list: Vec<Broker>,
    /// The broker in use, or the one to try first at the next connection.
    current: AtomicUsize,
    /// The CA and client identity for `amqps://` (empty: the web PKI roots, no identity).
    tls: OwnedTLSConfig,
    /// The configured URL, redacted.
    url: String,
    /// The vhost (every broker of the list has the same one).
    vhost: String,
}

impl Brokers {
    /// The brokers of `config` (already resolved into `brokers`, not empty), asking for
    /// `heartbeat` seconds when given, else the URL's heartbeat, else `default_heartbeat`.
    /// Reads the `[tls]` files now (an error names the field).
    pub(crate) fn new(
        config: &AmqpSourceConfig,
        brokers: &[BrokerAddress],
        heartbeat: Option<u16>,
        default_heartbeat: u16,
    ) -> Result<Self, AmqpSourceError> {
        let list: Vec<Broker> = brokers
            .iter()
            .map(|b| {
                let mut uri = b.to_uri(default_heartbeat);
                if heartbeat.is_some() {
                    uri.query.heartbeat = heartbeat;
                }
                Broker {
                    uri,
                    shown: b.to_string(),
                    connect_timeout: b.connect_timeout().unwrap_or(config.connect_timeout),
                }
            })
            .collect();
        let vhost = brokers
            .first()
            .map(|b| b.vhost().to_string())
            .ok_or_else(|| celery_scale_core::ConfigError::new("url", "names no broker"))?;
        let tls = config
            .tls
            .as_ref()
            .map(crate::tls::load)
            .transpose()?
            .unwrap_or_default();
        Ok(Brokers {
            list,
            current: AtomicUsize::new(0),
            tls,
            url: config.url.redacted(),
            vhost,
        })
    }

    /// The heartbeat each broker's connection asks for.
    #[cfg(test)]
    pub(crate) fn list_heartbeats(&self) -> Vec<Option<u16>> {
        self.list.iter().map(|b| b.uri.query.heartbeat).collect()
    }

    /// The configured URL, redacted.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The vhost, decoded.
    pub(crate) fn vhost(&self) -> &str {
        &self.vhost
    }

    /// The index of the broker in use (or to try first) in the failover list.
    pub(crate) fn current_index(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.list.len()
    }

    /// The broker in use (or to try first), redacted.
    pub(crate) fn current_broker(&self) -> &str {
        &self.list[self.current_index()].shown
    }

    /// After the connection in use failed: the next connection starts with the next broker
    /// of the list, as kombu's failover moves on.
    pub(crate) fn move_on(&self) {
        if self.list.len() > 1 {
            let next = (self.current_index() + 1) % self.list.len();
            self.current.store(next, Ordering::Relaxed);
        }
    }

    /// Connects, named `name`, to the first broker of the failover list that answers,
    /// starting with the current one (kombu's round-robin failover: the list in order, from
    /// where it is); each attempt is bounded by its broker's connect timeout.
    pub(crate) async fn connect(&self, name: &str) -> Result<Connection, AmqpSourceError> {
        let start = self.current_index();
        let mut last_error = None;
        for k in 0..self.list.len() {
            let i = (start + k) % self.list.len();
            match self.connect_to(&self.list[i], name).await {
                Ok(connection) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(connection);
                }
                Err(e) => {
                    if self.list.len() > 1 {
                        tracing::warn!(url = %self.list[i].shown, error = %e, "cannot connect to this broker of the failover list; trying the next");
                    }
                    last_error = Some(e);
                }
            }
        }
        // The list is never empty, so some attempt failed.
        Err(last_error.unwrap_or_else(|| AmqpSourceError::Timeout {
            url: self.url.clone(),
            operation: "connect",
            after: Duration::ZERO,
        }))
    }

    async fn connect_to(&self, broker: &Broker, name: &str) -> Result<Connection, AmqpSourceError> {
        let after = broker.connect_timeout;
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let attempt = async {
            let connect_error = |e| AmqpSourceError::from_connect(&broker.shown, &self.vhost, e);
            let runtime = lapin::runtime::default_runtime().map_err(connect_error)?;
            Connection::connect_uri_with_config(
                broker.uri.clone(),
                props,
                self.tls.clone(),
                runtime,
            )
            .await
            .map_err(connect_error)
        };
        tokio::time::timeout(after, attempt)
            .await
            .map_err(|_| AmqpSourceError::Timeout {
                url: broker.shown.clone(),
                operation: "connect",
                after,
            })?
    }
}
