//! A TCP proxy a test controls: cut it off (every connection dropped, the port closed, as a
//! restart or a lost network does), bring it back on the same port, and count the requests of
//! one kind that went through it (a byte pattern in what clients sent, such as an AWS
//! `X-Amz-Target`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::poll;

/// A TCP proxy in front of `upstream` (`host:port`).
pub struct Proxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    upstream: String,
    watch: Option<Arc<Watch>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct Watch {
    pattern: Vec<u8>,
    hits: Mutex<Vec<Instant>>,
}

impl Proxy {
    /// A proxy in front of `upstream`, listening on a free port.
    pub async fn start(upstream: &str) -> Self {
        Self::start_with(upstream, None).await
    }

    /// A proxy that also notes when a client sent `pattern` (see [`hits`](Self::hits)).
    pub async fn watching(upstream: &str, pattern: &str) -> Self {
        let watch = Arc::new(Watch {
            pattern: pattern.as_bytes().to_vec(),
            hits: Mutex::new(Vec::new()),
        });
        Self::start_with(upstream, Some(watch)).await
    }

    async fn start_with(upstream: &str, watch: Option<Arc<Watch>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy port");
        let port = listener.local_addr().expect("the proxy's address").port();
        let mut p = Proxy {
            port,
            upstream: upstream.to_string(),
            watch,
            task: None,
        };
        p.task = Some(tokio::spawn(serve(
            listener,
            p.upstream.clone(),
            p.watch.clone(),
        )));
        p
    }

    /// When clients sent the watched pattern, in order.
    pub fn hits(&self) -> Vec<Instant> {
        self.watch
            .as_ref()
            .map(|w| w.hits.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Drops every proxied connection and stops listening.
    pub fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn restore(&mut self) {
        let port = self.port;
        let listener = poll(
            "the proxy port to be free",
            Duration::from_secs(5),
            || async { TcpListener::bind(("127.0.0.1", port)).await.ok() },
        )
        .await;
        self.task = Some(tokio::spawn(serve(
            listener,
            self.upstream.clone(),
            self.watch.clone(),
        )));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn serve(listener: TcpListener, upstream: String, watch: Option<Arc<Watch>>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        let upstream = upstream.clone();
        let watch = watch.clone();
        conns.spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                return;
            };
            match watch {
                None => {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                Some(watch) => {
                    let (mut from_client, mut to_client) = inbound.split();
                    let (mut from_server, mut to_server) = outbound.split();
                    let up = forward_watching(&mut from_client, &mut to_server, &watch);
                    let down = tokio::io::copy(&mut from_server, &mut to_client);
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                }
            }
        });
    }
}

/// Copies `from` to `to`, noting each occurrence of the watched pattern (also across reads).
async fn forward_watching(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    watch: &Watch,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    let keep = watch.pattern.len().saturating_sub(1);
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let mut window = std::mem::take(&mut tail);
        window.extend_from_slice(&buf[..n]);
        let found = window
            .windows(watch.pattern.len().max(1))
            .filter(|w| *w == watch.pattern.as_slice())
            .count();
        if found > 0 {
            let now = Instant::now();
            watch
                .hits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(std::iter::repeat_n(now, found));
        }
        tail = window[window.len().saturating_sub(keep)..].to_vec();
        to.write_all(&buf[..n]).await?;
    }
}
