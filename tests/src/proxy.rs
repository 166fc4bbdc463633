//! A TCP proxy in front of a real server (RabbitMQ, PostgreSQL, Redis, moto: it only copies
//! bytes), owned by a test, a drill or the chaos harness: `cut()` drops every live connection
//! and refuses new ones, as a network partition or a server restart would, without root and
//! without touching the server; `restore()` lets connections through again.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{net::TcpListener, task::AbortHandle};

/// The proxy; stopped (every connection dropped) on drop.
pub struct TcpProxy {
    /// The address to give clients instead of the server's.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    refusing: AtomicBool,
    conns: Mutex<Vec<AbortHandle>>,
    accepted: AtomicU64,
    cuts: AtomicU64,
}

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, Vec<AbortHandle>> {
        // A panic while holding it cannot leave the list inconsistent: use it anyway.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TcpProxy {
    /// Starts a proxy to `target` (`host:port`) on a free loopback port.
    pub async fn start(target: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let target = target.to_owned();
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if s.refusing.load(Ordering::SeqCst) {
                    drop(inbound); // refused: closed at once
                    continue;
                }
                s.accepted.fetch_add(1, Ordering::Relaxed);
                let _ = inbound.set_nodelay(true);
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut conns = s.conns();
                // Forget finished connections, so that a long run (the soak) does not grow.
                conns.retain(|c| !c.is_finished());
                conns.push(task.abort_handle());
            }
        });
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// `host:port` of the proxy, for a URL.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// The server "goes down": open connections are dropped, new ones refused until
    /// [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.shared.refusing.store(true, Ordering::SeqCst);
        self.shared.cuts.fetch_add(1, Ordering::Relaxed);
        self.drop_connections();
    }

    /// Drops every open connection (clients see a reset) but keeps accepting new ones.
    pub fn drop_connections(&self) {
        for c in self.shared.conns().drain(..) {
            c.abort();
        }
    }

    /// The server is back.
    pub fn restore(&self) {
        self.shared.refusing.store(false, Ordering::SeqCst);
    }

    /// [`TcpProxy::cut`], then [`TcpProxy::restore`] after `down`.
    pub async fn cut_for(&self, down: Duration) {
        self.cut();
        tokio::time::sleep(down).await;
        self.restore();
    }

    /// Whether new connections are refused now.
    pub fn is_cut(&self) -> bool {
        self.shared.refusing.load(Ordering::SeqCst)
    }

    /// Connections open through the proxy now.
    pub fn live_connections(&self) -> usize {
        let mut conns = self.shared.conns();
        conns.retain(|c| !c.is_finished());
        conns.len()
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Times [`TcpProxy::cut`] was called.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
