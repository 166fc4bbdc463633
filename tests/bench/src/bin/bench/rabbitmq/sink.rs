//! The OTLP/HTTP receiver the traced consumer exports to: it reads each request (HTTP/1.1
//! with keep-alive, a body of known length), counts it and answers `200`, in the bench's own
//! process so that the drain child pays only for producing and sending its spans.

use std::sync::{
    atomic::{AtomicU64, Ordering::Relaxed},
    Arc,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};

/// A running receiver; stops when dropped.
pub(super) struct Sink {
    pub(super) url: String,
    /// Export requests received, and their body bytes.
    pub(super) requests: Arc<AtomicU64>,
    pub(super) bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    pub(super) async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (requests, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (r2, b2) = (requests.clone(), bytes.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (requests, bytes) = (r2.clone(), b2.clone());
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut r = BufReader::new(r);
                    let mut line = String::new();
                    loop {
                        let mut len = 0usize;
                        loop {
                            line.clear();
                            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some((k, v)) = line.split_once(':') {
                                if k.eq_ignore_ascii_case("content-length") {
                                    len = v.trim().parse().unwrap_or(0);
                                }
                            }
                        }
                        let mut body = vec![0; len];
                        if r.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        requests.fetch_add(1, Relaxed);
                        bytes.fetch_add(len as u64, Relaxed);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                        if w.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Sink {
            url,
            requests,
            bytes,
            task,
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
