//! Where the source's commands go: one Redis server, a failover list of them (kombu's round
//! robin: the next one when the current cannot be reached), or the master Redis Sentinel names.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Client, ConnectionAddr, RedisError, RedisResult, TlsCertificates, TlsMode};

use crate::broker::{Broker, BrokerUrl};

/// One server of a failover list.
pub(crate) struct DirectNode {
    shown: String,
    client: Client,
    manager: ConnectionManager,
}

/// The master of a Sentinel group, looked up again after a connection failure or when it is
/// no longer the master.
pub(crate) struct SentinelConn {
    /// The Sentinels, with the master's database, credentials, TLS mode and certificates.
    sentinel: tokio::sync::Mutex<SentinelClient>,
    master_name: String,
    manager_config: ConnectionManagerConfig,
    current: Mutex<Option<(String, ConnectionManager)>>,
}

/// Where commands go.
pub(crate) enum Connector {
    Direct {
        nodes: Vec<DirectNode>,
        current: AtomicUsize,
    },
    Sentinel(Box<SentinelConn>),
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connector::Direct { nodes, current } => f
                .debug_struct("Direct")
                .field(
                    "nodes",
                    &nodes.iter().map(|n| n.shown.as_str()).collect::<Vec<_>>(),
                )
                .field("current", &current.load(Ordering::Relaxed))
                .finish(),
            Connector::Sentinel(s) => f
                .debug_struct("Sentinel")
                .field("master_name", &s.master_name)
                .finish(),
        }
    }
}

/// Whether `e` says the connection itself failed (an I/O error that is not a certificate
/// problem): the [`ConnectionManager`] then sets a new connection up.
pub(crate) fn connection_lost(e: &RedisError) -> bool {
    (e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal())
        && !crate::error::tls_config_error(e)
}

impl Connector {
    /// Prepares the connections of `url` without connecting.
    pub fn new(
        url: &BrokerUrl,
        certificates: Option<&TlsCertificates>,
        master_name: Option<&str>,
        sentinel_auth: (Option<&str>, Option<&str>),
        manager_config: ConnectionManagerConfig,
    ) -> RedisResult<Connector> {
        match &url.broker {
            Broker::Direct(nodes) => {
                let nodes = nodes
                    .iter()
                    .map(|node| {
                        let info = node.connection_info()?;
                        let client = match certificates {
                            Some(c) if matches!(node.addr, crate::broker::Addr::Tls { .. }) => {
                                Client::build_with_tls(info, c.clone())?
                            }
                            _ => Client::open(info)?,
                        };
                        let manager = ConnectionManager::new_lazy_with_config(
                            client.clone(),
                            manager_config.clone(),
                        )?;
                        Ok(DirectNode {
                            shown: node.shown(),
                            client,
                            manager,
                        })
                    })
                    .collect::<RedisResult<Vec<_>>>()?;
                Ok(Connector::Direct {
                    nodes,
                    current: AtomicUsize::new(0),
                })
            }
            Broker::Sentinel { sentinels, master } => {
                // The builder is the redis crate's only way to give the master's certificates
                // to the Sentinel client: it uses them for its own check of the master's role
                // and puts them in the master client it returns (`Sentinel::build` has none,
                // so a private CA would fail that check with a TLS error).
                // TLS to the Sentinels themselves is kombu's `sentinel_kwargs.ssl`.
                let sentinel_tls = url.sentinel_tls.as_ref();
                let mut builder = SentinelClientBuilder::new(
                    sentinels.iter().map(|(host, port)| match sentinel_tls {
                        Some(_) => ConnectionAddr::TcpTls {
                            host: host.clone(),
                            port: *port,
                            insecure: false,
                            tls_params: None,
                        },
                        None => ConnectionAddr::Tcp(host.clone(), *port),
                    }),
                    master_name.unwrap_or_default(),
                    SentinelServerType::Master,
                )?
                .set_client_to_redis_db(master.db);
                if let Some(tls) = sentinel_tls {
                    celery_scale_tls::install_crypto_provider();
                    builder = builder.set_client_to_sentinel_tls_mode(TlsMode::Secure);
                    if tls.ca_file.is_some() || tls.client_cert_file.is_some() {
                        // Checked by `validate`; read again here, as the master's files are.
                        let certs = crate::tls::load_named(tls, crate::tls::SENTINEL_FIELDS)
                            .map_err(|e| {
                                RedisError::from((
                                    redis::ErrorKind::InvalidClientConfig,
                                    "a Sentinel TLS file",
                                    format!("{}: {}", e.field(), e.problem()),
                                ))
                            })?;
                        builder = builder.set_client_to_sentinel_certificates(certs);
                    }
                }
                if let Some(u) = &master.username {
                    builder = builder.set_client_to_redis_username(u);
                }
                if let Some(p) = &master.password {
                    builder = builder.set_client_to_redis_password(p);
                }
                if let Some(u) = sentinel_auth.0 {
                    builder = builder.set_client_to_sentinel_username(u);
                }
                if let Some(p) = sentinel_auth.1 {
                    builder = builder.set_client_to_sentinel_password(p);
                }
                if url.tls_on {
                    builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
                    if let Some(c) = certificates {
                        builder = builder.set_client_to_redis_certificates(c.clone());
                    }
                }
                let sentinel = builder.build()?;
                Ok(Connector::Sentinel(Box::new(SentinelConn {
                    sentinel: tokio::sync::Mutex::new(sentinel),
                    master_name: master_name.unwrap_or_default().to_string(),
                    manager_config,
                    current: Mutex::new(None),
                })))
            }
        }
    }

    /// Whether every observation checks that it reads the master (`ROLE`): with Sentinel.
    pub fn checks_role(&self) -> bool {
        matches!(self, Connector::Sentinel(_))
    }

    /// Forgets the current master (it said it is not the master any more): the next command
    /// asks the Sentinels again.
    pub fn forget_master(&self) {
        if let Connector::Sentinel(s) = self {
            *s.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// The server the last command went to (host:port), for logs and errors.
    pub fn current(&self) -> Option<String> {
        match self {
            Connector::Direct { nodes, current } => nodes
                .get(current.load(Ordering::Relaxed))
                .map(|n| n.shown.clone()),
            Connector::Sentinel(s) => s
                .current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|(a, _)| a.clone()),
        }
    }

    /// Runs `op` where commands go now. A command that fails because the connection is gone is
    /// sent once more at once (the [`ConnectionManager`] answers the first command after an
    /// outage with the error of the reconnect attempt it made while the server was down), then
    /// to the next server of a failover list, or to the master the Sentinels name now. Every
    /// command the source sends only reads, so a second run is harmless.
    pub async fn run<T, F, Fut>(&self, op: F) -> RedisResult<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>>,
    {
        match self {
            Connector::Direct { nodes, current } => {
                let start = current.load(Ordering::Relaxed);
                let mut last = None;
                for i in 0..nodes.len() {
                    let idx = (start + i) % nodes.len();
                    let node = &nodes[idx];
                    let mut result = op(node.manager.clone()).await;
                    if matches!(&result, Err(e) if connection_lost(e)) {
                        tracing::debug!(server = %node.shown, "connection lost; trying once more on a new connection");
                        result = op(node.manager.clone()).await;
                    }
                    match result {
                        Err(e) if connection_lost(&e) && nodes.len() > 1 => {
                            tracing::warn!(server = %node.shown, error = %e, "broker unreachable; trying the next URL of the failover list");
                            last = Some(e);
                        }
                        other => {
                            if idx != start && other.is_ok() {
                                tracing::info!(server = %node.shown, "failed over to this broker URL");
                                current.store(idx, Ordering::Relaxed);
                            }
                            return other;
                        }
                    }
                }
                Err(last.unwrap_or_else(|| {
                    RedisError::from((redis::ErrorKind::Io, "no broker URL to try"))
                }))
            }
            Connector::Sentinel(s) => {
                let manager = s.manager(false).await?;
                match op(manager).await {
                    Err(e) if connection_lost(&e) => {
                        tracing::debug!(error = %e, "master connection lost; asking the Sentinels again");
                        let manager = s.manager(true).await?;
                        op(manager).await
                    }
                    other => other,
                }
            }
        }
    }

    /// A client for the worker-event subscription's `attempt`-th try: the current server of a
    /// failover list first, then the next ones; with Sentinel, the master named now.
    pub async fn subscriber_client(&self, attempt: usize) -> RedisResult<Client> {
        match self {
            Connector::Direct { nodes, current } => {
                let idx = (current.load(Ordering::Relaxed) + attempt) % nodes.len().max(1);
                nodes
                    .get(idx)
                    .map(|n| n.client.clone())
                    .ok_or_else(|| RedisError::from((redis::ErrorKind::Io, "no broker URL")))
            }
            Connector::Sentinel(s) => s.master_client().await.map(|(_, c)| c),
        }
    }
}

impl SentinelConn {
    /// The master the Sentinels name now (checked with `ROLE`), as a client that carries the
    /// master's database, credentials and, with TLS, the configured certificates: the source's
    /// commands and the worker-event subscriber both connect through it.
    async fn master_client(&self) -> RedisResult<(String, Client)> {
        let mut sentinel = self.sentinel.lock().await;
        let client = sentinel.async_get_client().await?;
        let shown = client.get_connection_info().addr().to_string();
        Ok((shown, client))
    }

    async fn manager(&self, fresh: bool) -> RedisResult<ConnectionManager> {
        if !fresh
            && let Some((_, m)) = self
                .current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
        {
            return Ok(m.clone());
        }
        let (shown, client) = self.master_client().await?;
        let manager = ConnectionManager::new_lazy_with_config(client, self.manager_config.clone())?;
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_none_or(|(a, _)| *a != shown) {
            tracing::info!(master = %shown, name = %self.master_name, "Redis Sentinel master");
        }
        *current = Some((shown, manager.clone()));
        Ok(manager)
    }
}
