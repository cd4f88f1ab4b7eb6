//! A ractor_cluster session carried over core NATS: the byte stream ractor_cluster would send
//! over TCP travels as sequenced frames on two subjects, one per direction, so nodes need no
//! open port towards each other.
//!
//! ```text
//!  ractor NodeSession ──► far half ═ duplex ═ near half ──► sender task ──► kiln.tunnel.<s>.<peer side>
//!  ractor NodeSession ◄── far half ═ duplex ═ near half ◄── receiver task ◄── kiln.tunnel.<s>.<my side>
//! ```
//!
//! Core NATS delivers at most once, so the tunnel checks what ractor cannot: every frame has
//! the next sequence number of its direction, and a gap or a duplicate closes the session
//! (ractor_cluster cannot resynchronise a byte stream with a hole in it; the mesh re-dials and
//! ractor re-authenticates and re-syncs its process groups). It also closes on a missed
//! heartbeat (`silence_ms` without any frame), on a close frame, when ractor ends the session,
//! and when this node's NATS connection is not connected.
//!
//! **Flow control.** Every frame carries how many data bytes its sender has handed to its own
//! ractor session (`consumed`). A sender stops reading from ractor once `window_bytes` are sent
//! and not consumed, so a slow peer makes ractor's writes wait instead of growing memory on
//! either side. A receiver that falls behind keeps at most one window of frames buffered.
//!
//! A closed tunnel ends both halves: ractor reads end-of-stream and its session stops.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use futures::StreamExt;
use kiln_core::task::{self, TaskKind};
use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::wire::{self, Frame, FrameKind};

/// Which end of a session this is; frames towards a side go to that side's subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Dialer,
    Acceptor,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Dialer => "dialer",
            Side::Acceptor => "acceptor",
        }
    }
    pub fn other(self) -> Side {
        match self {
            Side::Dialer => Side::Acceptor,
            Side::Acceptor => Side::Dialer,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TunnelSettings {
    pub heartbeat: Duration,
    pub silence: Duration,
    pub window_bytes: u64,
    pub frame_bytes: usize,
}

impl TunnelSettings {
    pub fn from_config(c: &kiln_core::config::ClusterLink) -> Self {
        TunnelSettings {
            heartbeat: Duration::from_millis(c.heartbeat_ms),
            silence: Duration::from_millis(c.silence_ms),
            window_bytes: c.window_bytes,
            frame_bytes: c.frame_bytes as usize,
        }
    }
}

/// One end of a tunnel, handed to ractor_cluster as its session's stream.
pub struct Tunnel {
    far: DuplexStream,
    local: String,
    peer: String,
}

impl ClusterBidiStream for Tunnel {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (r, w) = tokio::io::split(self.far);
        (Box::new(r), Box::new(w))
    }
    fn peer_label(&self) -> Option<String> {
        Some(self.peer.clone())
    }
    fn local_label(&self) -> Option<String> {
        Some(self.local.clone())
    }
}

impl Tunnel {
    /// The session's byte stream itself (for tests that drive a tunnel without ractor).
    pub fn into_stream(self) -> DuplexStream {
        self.far
    }
}

/// Why and whether a tunnel closed; shared by its tasks and the caller. The dialer also opens
/// its tunnel with it, once the acceptor has said it listens. It also knows when the tunnel last
/// carried data either way (heartbeats aside), which is how the mesh finds idle sessions: both
/// ends see the same data, so they agree on it.
#[derive(Clone)]
pub struct Closed {
    token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
    opened: Arc<Notify>,
    started: std::time::Instant,
    /// Milliseconds after `started` of the last data frame sent or received.
    last_data_ms: Arc<AtomicU64>,
}

impl Default for Closed {
    fn default() -> Self {
        Closed {
            token: CancellationToken::new(),
            reason: Arc::default(),
            opened: Arc::default(),
            started: std::time::Instant::now(),
            last_data_ms: Arc::default(),
        }
    }
}

impl Closed {
    /// Lets the sender start. Until then it sends nothing: a frame published before the peer
    /// subscribed would be lost, and the peer would see a gap.
    pub fn open(&self) {
        self.opened.notify_one();
    }
    /// Closes the tunnel (both halves; ractor's session ends and the peer is told).
    pub fn close(&self, reason: impl Into<String>) {
        let mut r = self.reason.lock().expect("lock");
        if r.is_none() {
            *r = Some(reason.into());
        }
        self.token.cancel();
    }
    /// Resolves with the reason once the tunnel is closed.
    pub async fn wait(&self) -> String {
        self.token.cancelled().await;
        self.reason.lock().expect("lock").clone().unwrap_or_default()
    }
    pub fn is_closed(&self) -> bool {
        self.token.is_cancelled()
    }
    fn carried_data(&self) {
        self.last_data_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// How long since the tunnel last carried data (since it started, if never).
    pub fn idle_for(&self) -> Duration {
        self.started.elapsed().saturating_sub(Duration::from_millis(self.last_data_ms.load(Ordering::Relaxed)))
    }
}

/// Starts this side of session `session`: subscribes to this side's subject (and waits until
/// the server has the subscription, so the peer can be told to send) and spawns the pump tasks.
/// The acceptor's side sends at once (the dialer subscribed before asking); the dialer's waits
/// for [`Closed::open`].
pub async fn start(
    client: async_nats::Client,
    names: &kiln_core::nats::Names,
    session: &str,
    side: Side,
    settings: TunnelSettings,
    local: String,
    peer: String,
) -> Result<(Tunnel, Closed), async_nats::SubscribeError> {
    let subject = names.tunnel_frames(session, side.as_str());
    let mut inbound = client.subscribe(subject.clone()).await?;
    let early = subscription_live(&client, subject, &mut inbound, settings.silence).await?;
    let inbound = futures::stream::iter(early).chain(inbound);
    let outbound = names.tunnel_frames(session, side.other().as_str());
    // The duplex buffer is ractor's side of the window: one frame each way.
    let (near, far) = tokio::io::duplex(settings.frame_bytes);
    let (near_read, near_write) = tokio::io::split(near);
    let closed = Closed::default();
    let (peer_consumed_tx, peer_consumed_rx) = watch::channel(0u64);
    let consumed = Arc::new(AtomicU64::new(0));
    let credit_due = Arc::new(Notify::new());
    let label = format!("{local}->{peer}");
    if side == Side::Acceptor {
        closed.open();
    }
    task::spawn(
        TaskKind::TunnelPump,
        "tunnel receiver",
        receiver(
            inbound,
            near_write,
            settings.clone(),
            closed.clone(),
            peer_consumed_tx,
            consumed.clone(),
            credit_due.clone(),
            label.clone(),
        ),
    );
    task::spawn(
        TaskKind::TunnelPump,
        "tunnel sender",
        sender(client, outbound, near_read, settings, closed.clone(), peer_consumed_rx, consumed, credit_due, label),
    );
    Ok((Tunnel { far, local, peer }, closed))
}

/// Returns once the server has `inbound`'s subscription, with any frames that arrived first.
///
/// `Client::subscribe` only queues the SUB on this connection, and `Client::flush` only writes
/// it out: neither waits for the server. The peer publishes on its own connection, so a frame
/// it sends as soon as it is told this side listens can reach the server before the SUB does;
/// core NATS then drops it, and the first frame that does arrive is a gap that closes the
/// session. That is what a loaded machine did to a healthy session (issue 14): the SUB sat in
/// this connection's queue while the peer's first frame went out. (The mesh happens to tell the
/// peer on this same connection, after the SUB, which the server handles in order; a caller
/// that tells it any other way, as the tests do, had no such guarantee.) A probe published to
/// our own subject on the same connection comes back only after the server has handled the SUB
/// (the server handles one connection's commands in order), so after it nothing the peer sends
/// is lost. The probe is an empty message, which no frame encodes to.
async fn subscription_live(
    client: &async_nats::Client,
    subject: String,
    inbound: &mut async_nats::Subscriber,
    limit: Duration,
) -> Result<Vec<async_nats::Message>, async_nats::SubscribeError> {
    use async_nats::{SubscribeError, SubscribeErrorKind};
    let failed = |e: String| SubscribeError::with_source(SubscribeErrorKind::Other, e);
    client.publish(subject, bytes::Bytes::new()).await.map_err(|e| failed(format!("probing the subscription: {e}")))?;
    let mut early = Vec::new();
    let confirmed = tokio::time::timeout(limit, async {
        while let Some(msg) = inbound.next().await {
            if msg.payload.is_empty() {
                return true;
            }
            early.push(msg);
        }
        false
    })
    .await;
    match confirmed {
        Ok(true) => Ok(early),
        Ok(false) => Err(failed("the subscription ended before the server confirmed it".into())),
        Err(_) => Err(failed(format!("the server did not confirm the subscription within {} ms", limit.as_millis()))),
    }
}

#[allow(clippy::too_many_arguments)]
async fn receiver(
    mut inbound: impl futures::Stream<Item = async_nats::Message> + Unpin,
    to_ractor: WriteHalf<DuplexStream>,
    settings: TunnelSettings,
    closed: Closed,
    peer_consumed: watch::Sender<u64>,
    consumed: Arc<AtomicU64>,
    credit_due: Arc<Notify>,
    label: String,
) {
    // Data goes to ractor from its own task, so that a slow ractor never holds up the frames
    // behind it: those carry the credit this side's sender waits for (otherwise two nodes
    // sending to each other could each wait on the other's full buffer). The queue is bounded
    // by the peer's window, which it must respect.
    let (data_tx, data_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let delivery = task::spawn(
        TaskKind::TunnelPump,
        "tunnel delivery",
        deliver(data_rx, to_ractor, settings.window_bytes, closed.clone(), consumed.clone(), credit_due),
    );
    let mut expected = 0u64;
    let mut received = 0u64;
    loop {
        let next = tokio::select! {
            _ = closed.token.cancelled() => break,
            next = tokio::time::timeout(settings.silence, inbound.next()) => next,
        };
        let msg = match next {
            Err(_) => {
                closed.close(format!("missed heartbeat: nothing received for {} ms", settings.silence.as_millis()));
                break;
            }
            Ok(None) => {
                closed.close("subscription ended");
                break;
            }
            Ok(Some(m)) => m,
        };
        let frame: Frame = match wire::decode(&msg.payload) {
            Ok(f) => f,
            Err(e) => {
                closed.close(format!("undecodable frame: {e}"));
                break;
            }
        };
        if frame.seq < expected {
            closed.close(format!("duplicate frame {} (expected {expected})", frame.seq));
            break;
        }
        if frame.seq > expected {
            closed.close(format!("gap: frame {} arrived, {expected} expected", frame.seq));
            break;
        }
        expected += 1;
        peer_consumed.send_if_modified(|c| {
            let newer = frame.consumed > *c;
            *c = (*c).max(frame.consumed);
            newer
        });
        match frame.kind {
            FrameKind::Heartbeat => {}
            FrameKind::Close(reason) => {
                closed.close(format!("closed by peer: {reason}"));
                break;
            }
            FrameKind::Data(bytes) => {
                closed.carried_data();
                received += bytes.len() as u64;
                if received - consumed.load(Ordering::Acquire) > settings.window_bytes {
                    closed.close("the peer sent beyond its window");
                    break;
                }
                if data_tx.send(bytes).is_err() {
                    break;
                }
            }
        }
    }
    drop(data_tx);
    let _ = delivery.await;
    tracing::debug!(tunnel = %label, "tunnel receiver stopped");
}

/// Hands received data to ractor in order, counting what it took (the peer's credit).
async fn deliver(
    mut data: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    mut to_ractor: WriteHalf<DuplexStream>,
    window: u64,
    closed: Closed,
    consumed: Arc<AtomicU64>,
    credit_due: Arc<Notify>,
) {
    let mut advertised = 0u64;
    loop {
        let bytes = tokio::select! {
            _ = closed.token.cancelled() => break,
            next = data.recv() => match next {
                Some(b) => b,
                None => break,
            },
        };
        let write = tokio::select! {
            _ = closed.token.cancelled() => break,
            w = to_ractor.write_all(&bytes) => w,
        };
        if write.is_err() {
            closed.close("ractor session ended");
            break;
        }
        let now = consumed.fetch_add(bytes.len() as u64, Ordering::AcqRel) + bytes.len() as u64;
        // Tell the peer about freed window before it runs dry, not only on heartbeats.
        if now - advertised >= window / 4 {
            advertised = now;
            credit_due.notify_one();
        }
    }
    let _ = to_ractor.shutdown().await;
}

#[allow(clippy::too_many_arguments)]
async fn sender(
    client: async_nats::Client,
    subject: String,
    mut from_ractor: ReadHalf<DuplexStream>,
    settings: TunnelSettings,
    closed: Closed,
    mut peer_consumed: watch::Receiver<u64>,
    consumed: Arc<AtomicU64>,
    credit_due: Arc<Notify>,
    label: String,
) {
    tokio::select! {
        _ = closed.opened.notified() => {}
        _ = closed.token.cancelled() => return,
    }
    let mut seq = 0u64;
    let mut sent = 0u64;
    let mut buf = vec![0u8; settings.frame_bytes];
    let mut ticker = tokio::time::interval(settings.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut send = |kind: FrameKind| {
        let frame = Frame { seq, consumed: consumed.load(Ordering::Acquire), kind };
        seq += 1;
        let client = client.clone();
        let subject = subject.clone();
        async move { client.publish(subject, wire::encode(&frame).into()).await }
    };
    loop {
        let in_flight = sent.saturating_sub(*peer_consumed.borrow());
        let may_send = in_flight + settings.frame_bytes as u64 <= settings.window_bytes;
        tokio::select! {
            _ = closed.token.cancelled() => break,
            read = from_ractor.read(&mut buf), if may_send => match read {
                Ok(0) | Err(_) => {
                    closed.close("ractor session ended");
                    break;
                }
                Ok(n) => {
                    closed.carried_data();
                    sent += n as u64;
                    if send(FrameKind::Data(buf[..n].to_vec())).await.is_err() {
                        closed.close("publish failed");
                        break;
                    }
                    ticker.reset();
                }
            },
            changed = peer_consumed.changed() => if changed.is_err() {
                break;
            },
            _ = credit_due.notified() => {
                if send(FrameKind::Heartbeat).await.is_err() {
                    closed.close("publish failed");
                    break;
                }
                ticker.reset();
            }
            _ = ticker.tick() => {
                if client.connection_state() != State::Connected {
                    closed.close("NATS connection lost");
                    break;
                }
                if send(FrameKind::Heartbeat).await.is_err() {
                    closed.close("publish failed");
                    break;
                }
            }
        }
    }
    let reason = closed.reason.lock().expect("lock").clone().unwrap_or_default();
    // Best effort: the peer learns at once instead of after its silence timeout. Not sent when
    // the peer closed first (it is gone) or the connection is down (it would only queue).
    if !reason.starts_with("closed by peer") && client.connection_state() == State::Connected {
        let _ = send(FrameKind::Close(reason.clone())).await;
        let _ = client.flush().await;
    }
    metrics::counter!(kiln_core::metrics::TUNNEL_CLOSED).increment(1);
    tracing::info!(tunnel = %label, reason = %reason, "tunnel closed");
}
