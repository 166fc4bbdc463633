//! The latency instrument of `bench rabbitmq`: a TCP proxy between a consumer and the broker
//! that reads the AMQP frames going through and times each delivery from publish to ack.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Instant,
};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{now_us, POLL, RUN_LIMIT};

/// A TCP proxy in front of the broker that reads the AMQP 0-9-1 frames passing through:
/// from the broker, `basic.deliver` + the body's `t`; from the client, `basic.ack`. Each
/// ack records, for every delivery it covers (`multiple` included), the time from publish
/// to the ack leaving the client.
pub(super) struct AckProxy {
    pub(super) addr: SocketAddr,
    pub(super) state: Arc<ProxyState>,
    pub(super) accept: tokio::task::JoinHandle<()>,
}

pub(super) struct ProxyState {
    /// Publish time (us) of every delivery not yet acked, by (connection, channel), tag.
    pub(super) sent_at: Mutex<HashMap<(u64, u16), BTreeMap<u64, u64>>>,
    pub(super) latency_us: Mutex<Histogram<u64>>,
    pub(super) acked: AtomicU64,
    pub(super) consuming: AtomicU64,
    pub(super) connections: AtomicU64,
}

impl Drop for AckProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl AckProxy {
    pub(super) async fn start(url: &str) -> anyhow::Result<Self> {
        let target = authority(url)?.1;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ProxyState {
            sent_at: Mutex::default(),
            latency_us: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3)?),
            acked: AtomicU64::new(0),
            consuming: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let conn = st.connections.fetch_add(1, Relaxed);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, FrameReader::new(true), conn, st.clone()));
                tokio::spawn(pump(sr, cw, FrameReader::new(false), conn, st.clone()));
            }
        });
        Ok(Self {
            addr,
            state,
            accept,
        })
    }

    /// `url` with the proxy's address in place of the broker's.
    pub(super) fn url(&self, url: &str) -> String {
        let (scheme_user, _, path) = authority(url).expect("checked in start");
        format!("{scheme_user}{}{path}", self.addr)
    }

    pub(super) async fn wait_until(
        &self,
        f: impl Fn(&ProxyState) -> bool,
        what: &str,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + RUN_LIMIT;
        while !f(&self.state) {
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }
}

/// Splits an `amqp://` URL into (`amqp://user:pass@`, `host:port`, `/vhost...`).
fn authority(url: &str) -> anyhow::Result<(String, String, String)> {
    let rest = url
        .strip_prefix("amqp://")
        .context("the latency proxy needs an amqp:// URL (no TLS)")?;
    let (auth, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (user, host) = match auth.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), auth),
    };
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5672")
    };
    Ok((format!("amqp://{user}"), host, path.to_owned()))
}

/// Copies one direction, reading the frames on the way. From the broker, frames are read
/// before they are passed on, so a delivery is known before the client can ack it; from
/// the client, the ack's time is taken when it arrives.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frames: FrameReader,
    conn: u64,
    state: Arc<ProxyState>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    // From the broker, by channel: the delivery whose content is arriving (tag, body
    // size, body so far).
    let mut content: HashMap<u16, (u64, usize, Vec<u8>)> = HashMap::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = now_us();
        let client = frames.client;
        frames.feed(&buf[..n], |kind, channel, payload| {
            if client {
                client_frame(&state, conn, kind, channel, payload, now);
            } else {
                broker_frame(&state, conn, &mut content, kind, channel, payload);
            }
        });
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// AMQP frame types and the methods read here (class 60 is `basic`).
const METHOD: u8 = 1;
const HEADER: u8 = 2;
const BODY: u8 = 3;
const BASIC: u16 = 60;
const CONSUME_OK: u16 = 21;
const DELIVER: u16 = 60;
const ACK: u16 = 80;

fn method_of(payload: &[u8]) -> Option<(u16, u16)> {
    Some((
        u16::from_be_bytes(payload.get(0..2)?.try_into().ok()?),
        u16::from_be_bytes(payload.get(2..4)?.try_into().ok()?),
    ))
}

fn u64_at(payload: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(
        payload.get(at..at + 8)?.try_into().ok()?,
    ))
}

/// `basic.consume-ok`, and `basic.deliver` with its content header and body (whose `t` is
/// kept under the delivery tag).
fn broker_frame(
    state: &ProxyState,
    conn: u64,
    content: &mut HashMap<u16, (u64, usize, Vec<u8>)>,
    kind: u8,
    channel: u16,
    payload: &[u8],
) {
    match kind {
        METHOD => match method_of(payload) {
            Some((BASIC, CONSUME_OK)) => {
                state.consuming.fetch_add(1, Relaxed);
            }
            Some((BASIC, DELIVER)) => {
                // consumer-tag (short string), delivery-tag (u64), ...
                let tag_len = payload.get(4).copied().unwrap_or(0) as usize;
                if let Some(tag) = u64_at(payload, 5 + tag_len) {
                    content.insert(channel, (tag, 0, Vec::new()));
                }
            }
            _ => {}
        },
        HEADER => {
            // class (2), weight (2), body size (8), properties...
            if let (Some(c), Some(size)) = (content.get_mut(&channel), u64_at(payload, 4)) {
                c.1 = size as usize;
            }
        }
        BODY => {
            let Some(c) = content.get_mut(&channel) else {
                return;
            };
            c.2.extend_from_slice(payload);
            if c.2.len() >= c.1 {
                let (tag, _, body) = content.remove(&channel).expect("present");
                if let Some(t) = published_at(&body) {
                    state
                        .sent_at
                        .lock()
                        .expect("proxy lock")
                        .entry((conn, channel))
                        .or_default()
                        .insert(tag, t);
                }
            }
        }
        _ => {}
    }
}

/// `basic.ack`: the latency of every delivery it covers.
fn client_frame(state: &ProxyState, conn: u64, kind: u8, channel: u16, payload: &[u8], now: u64) {
    if kind != METHOD || method_of(payload) != Some((BASIC, ACK)) {
        return;
    }
    let (Some(tag), Some(bits)) = (u64_at(payload, 4), payload.get(12)) else {
        return;
    };
    let multiple = bits & 1 == 1;
    let covered: Vec<u64> = {
        let mut sent = state.sent_at.lock().expect("proxy lock");
        let Some(tags) = sent.get_mut(&(conn, channel)) else {
            return;
        };
        if multiple {
            let rest = tags.split_off(&(tag + 1));
            std::mem::replace(tags, rest).into_values().collect()
        } else {
            tags.remove(&tag).into_iter().collect()
        }
    };
    let mut hist = state.latency_us.lock().expect("proxy lock");
    for t in &covered {
        let _ = hist.record(now.saturating_sub(*t).max(1));
    }
    state.acked.fetch_add(covered.len() as u64, Relaxed);
}

/// The `t` of a bench body.
fn published_at(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let digits = text.strip_prefix(r#"{"t":"#)?;
    let end = digits.find(|c: char| !c.is_ascii_digit())?;
    digits[..end].parse().ok()
}

/// Reassembles frames from a byte stream: type (1), channel (2), size (4), payload,
/// frame end (1). The client side starts with the 8-byte protocol header.
struct FrameReader {
    client: bool,
    header_left: usize,
    buf: Vec<u8>,
}

impl FrameReader {
    fn new(client: bool) -> Self {
        Self {
            client,
            header_left: if client { 8 } else { 0 },
            buf: Vec::new(),
        }
    }

    fn feed(&mut self, data: &[u8], mut on: impl FnMut(u8, u16, &[u8])) {
        let skip = self.header_left.min(data.len());
        self.header_left -= skip;
        self.buf.extend_from_slice(&data[skip..]);
        let mut pos = 0;
        while self.buf.len() - pos >= 7 {
            let kind = self.buf[pos];
            let channel = u16::from_be_bytes([self.buf[pos + 1], self.buf[pos + 2]]);
            let size =
                u32::from_be_bytes(self.buf[pos + 3..pos + 7].try_into().expect("four bytes"));
            let end = pos + 7 + size as usize;
            if self.buf.len() < end + 1 {
                break;
            }
            on(kind, channel, &self.buf[pos + 7..end]);
            pos = end + 1;
        }
        self.buf.drain(..pos);
    }
}
