//! A TCP proxy a test controls: cut it off (every connection dropped, the port closed, as a
//! restart does) and bring it back on the same port; stall it (every connection kept open and
//! nothing forwarded, as a paused process or a black-holed network does) and resume; and count
//! the requests of one kind that went through it (a byte pattern in what clients sent, such as
//! an AWS `X-Amz-Target`).

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
    stalled: tokio::sync::watch::Sender<bool>,
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
        let (stalled, _) = tokio::sync::watch::channel(false);
        let mut p = Proxy {
            port,
            upstream: upstream.to_string(),
            watch,
            stalled,
            task: None,
        };
        p.task = Some(tokio::spawn(serve(
            listener,
            p.upstream.clone(),
            p.watch.clone(),
            p.stalled.subscribe(),
        )));
        p
    }

    /// Stops forwarding, both ways, on every connection (new ones are accepted and stalled
    /// too); the sockets stay open and a close is not passed on.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Forwards again (what was held back is delivered).
    pub fn resume(&self) {
        self.stalled.send_replace(false);
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
            self.stalled.subscribe(),
        )));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn serve(
    listener: TcpListener,
    upstream: String,
    watch: Option<Arc<Watch>>,
    stalled: tokio::sync::watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        let upstream = upstream.clone();
        let watch = watch.clone();
        let stalled = stalled.clone();
        conns.spawn(async move {
            let Ok(outbound) = TcpStream::connect(&upstream).await else {
                return;
            };
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::join!(
                pipe(in_read, out_write, stalled.clone(), watch),
                pipe(out_read, in_write, stalled, None)
            );
        });
    }
}

/// Copies `from` to `to` except while stalled, noting each occurrence of the watched pattern
/// (also across reads).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<bool>,
    watch: Option<Arc<Watch>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(watch) = &watch {
            let keep = watch.pattern.len().saturating_sub(1);
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
        }
        // Read while the stall began: held back until it ends.
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if stalled.wait_for(|s| !*s).await.is_ok() {
        let _ = to.shutdown().await;
    }
}
