//! The NATS tunnel that carries ractor_cluster sessions, driven directly (without ractor)
//! against a real nats-server: bytes arrive whole and in order, and every failure the issue
//! names closes the session cleanly: a gap, a duplicate, a missed heartbeat, a close frame.
//! Flow control keeps a slow reader from growing memory.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_actors::tunnel::{self, Side, TunnelSettings};
use kiln_actors::wire::{self, Frame, FrameKind};
use kiln_core::nats::{resources, Names, NatsServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn settings() -> TunnelSettings {
    TunnelSettings {
        heartbeat: Duration::from_millis(100),
        silence: Duration::from_millis(600),
        window_bytes: 64 << 10,
        frame_bytes: 8 << 10,
    }
}

async fn connect(server: &NatsServer) -> async_nats::Client {
    resources::connect(&kiln_core::config::NatsConfig::for_url(&server.url()), "tunnel-test").await.unwrap()
}

/// Both sides of session `s`, each on its own connection, as two nodes would have.
async fn pair(
    server: &NatsServer,
    s: &str,
    settings: TunnelSettings,
) -> (tokio::io::DuplexStream, tunnel::Closed, tokio::io::DuplexStream, tunnel::Closed) {
    let names = Names::new("kiln");
    let (a, a_closed) =
        tunnel::start(connect(server).await, &names, s, Side::Dialer, settings.clone(), "a".into(), "b".into()).await.unwrap();
    let (b, b_closed) = tunnel::start(connect(server).await, &names, s, Side::Acceptor, settings, "b".into(), "a".into()).await.unwrap();
    a_closed.open(); // as the dialer does once the acceptor has answered
    (a.into_stream(), a_closed, b.into_stream(), b_closed)
}

async fn closed_within(closed: &tunnel::Closed, limit: Duration) -> String {
    tokio::time::timeout(limit, closed.wait()).await.expect("the tunnel closes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_cross_whole_and_in_order_both_ways_and_the_session_stays_up() {
    let server = NatsServer::start_temp().unwrap();
    let (a, a_closed, b, b_closed) = pair(&server, "s1", settings()).await;
    // 3 MiB each way: many windows' worth, so credit has to flow back for it to finish.
    let payload: Vec<u8> = (0..3 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let (pa, pb) = (payload.clone(), payload.clone());
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let wa = tokio::spawn(async move { aw.write_all(&pa).await.unwrap() });
    let wb = tokio::spawn(async move { bw.write_all(&pb).await.unwrap() });
    let mut got_b = vec![0u8; payload.len()];
    let mut got_a = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(30), async {
        br.read_exact(&mut got_b).await.unwrap();
        ar.read_exact(&mut got_a).await.unwrap();
    })
    .await
    .expect("transfer finished");
    wa.await.unwrap();
    wb.await.unwrap();
    assert!(got_b == payload && got_a == payload, "bytes arrive intact and in order");
    // Idle for several silence periods: heartbeats keep it open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!a_closed.is_closed() && !b_closed.is_closed());
    // The writer tasks dropped their halves; dropping the dialer's read half ends its stream.
    drop(ar);
    // The dialer's ractor side ending closes the session on both sides, at once.
    assert_eq!(closed_within(&a_closed, Duration::from_secs(2)).await, "ractor session ended");
    assert!(closed_within(&b_closed, Duration::from_secs(2)).await.starts_with("closed by peer"));
    drop(br);
}

/// Publishes a forged frame towards `side` of session `s`.
async fn forge(server: &NatsServer, s: &str, side: Side, frame: Frame) {
    let c = connect(server).await;
    c.publish(Names::new("kiln").tunnel_frames(s, side.as_str()), wire::encode(&frame).into()).await.unwrap();
    c.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_closes_the_session_and_the_reader_sees_the_end() {
    let server = NatsServer::start_temp().unwrap();
    let (_a, a_closed, mut b, b_closed) = pair(&server, "s2", settings()).await;
    // A frame far ahead of the sequence: some frames in between were lost.
    forge(&server, "s2", Side::Acceptor, Frame { seq: 1_000_000, consumed: 0, kind: FrameKind::Heartbeat }).await;
    let reason = closed_within(&b_closed, Duration::from_secs(2)).await;
    assert!(reason.starts_with("gap: frame 1000000 arrived"), "{reason}");
    let mut buf = [0u8; 1];
    assert_eq!(b.read(&mut buf).await.unwrap(), 0, "ractor reads the end of the stream");
    assert!(closed_within(&a_closed, Duration::from_secs(2)).await.starts_with("closed by peer: gap"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_frame_closes_the_session() {
    let server = NatsServer::start_temp().unwrap();
    let (_a, _a_closed, _b, b_closed) = pair(&server, "s3", settings()).await;
    tokio::time::sleep(Duration::from_millis(350)).await; // a few heartbeats went through
    forge(&server, "s3", Side::Acceptor, Frame { seq: 0, consumed: 0, kind: FrameKind::Heartbeat }).await;
    let reason = closed_within(&b_closed, Duration::from_secs(2)).await;
    assert!(reason.starts_with("duplicate frame 0"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_frame_closes_the_session_with_its_reason() {
    let server = NatsServer::start_temp().unwrap();
    let names = Names::new("kiln");
    let (a, a_closed) =
        tunnel::start(connect(&server).await, &names, "s4", Side::Dialer, settings(), "a".into(), "b".into()).await.unwrap();
    forge(&server, "s4", Side::Dialer, Frame { seq: 0, consumed: 0, kind: FrameKind::Close("leaving".into()) }).await;
    assert_eq!(closed_within(&a_closed, Duration::from_secs(2)).await, "closed by peer: leaving");
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_a_missed_heartbeat() {
    let server = NatsServer::start_temp().unwrap();
    let names = Names::new("kiln");
    // Nobody on the other side: no frame ever arrives.
    let started = Instant::now();
    let (_a, a_closed) =
        tunnel::start(connect(&server).await, &names, "s5", Side::Dialer, settings(), "a".into(), "b".into()).await.unwrap();
    a_closed.open();
    let reason = closed_within(&a_closed, Duration::from_secs(3)).await;
    assert!(reason.starts_with("missed heartbeat"), "{reason}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(600) && took < Duration::from_millis(1500), "closed after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_consume_stops_the_sender_at_one_window() {
    let server = NatsServer::start_temp().unwrap();
    let names = Names::new("kiln");
    let s = TunnelSettings { silence: Duration::from_secs(10), ..settings() };
    let (a, a_closed) = tunnel::start(connect(&server).await, &names, "s6", Side::Dialer, s.clone(), "a".into(), "b".into()).await.unwrap();
    a_closed.open();
    // A raw peer that receives frames, counts data bytes, and grants no credit.
    let raw = connect(&server).await;
    let mut frames = raw.subscribe(names.tunnel_frames("s6", "acceptor")).await.unwrap();
    raw.flush().await.unwrap();
    let (mut _ar, mut aw) = tokio::io::split(a.into_stream());
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let w = written.clone();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 4096];
        loop {
            if aw.write_all(&chunk).await.is_err() {
                return;
            }
            w.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let mut received = 0u64;
    let mut last_seq = 0;
    // Listen until the window is used (a loaded machine may take a while), then 500 ms more to
    // catch anything sent beyond it.
    let mut deadline = Instant::now() + Duration::from_secs(10);
    let mut window_used = false;
    while let Ok(Some(msg)) = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), frames.next()).await {
        let f: Frame = wire::decode(&msg.payload).unwrap();
        last_seq = f.seq;
        if let FrameKind::Data(d) = f.kind {
            received += d.len() as u64;
        }
        if !window_used && received >= s.window_bytes - s.frame_bytes as u64 {
            window_used = true;
            deadline = Instant::now() + Duration::from_millis(500);
        }
    }
    let accepted = written.load(std::sync::atomic::Ordering::Relaxed);
    println!("without credit: {received} bytes sent, {accepted} accepted from ractor (window {})", s.window_bytes);
    assert!(received <= s.window_bytes, "the sender kept within the window: {received}");
    assert!(received >= s.window_bytes - s.frame_bytes as u64, "and used it: {received}");
    // What ractor could hand over beyond the window is bounded by the duplex buffer.
    assert!(accepted <= s.window_bytes + 2 * s.frame_bytes as u64 + 4096, "bounded: {accepted}");
    // Granting credit lets the rest flow.
    let c = connect(&server).await;
    let grant = Frame { seq: 0, consumed: received, kind: FrameKind::Heartbeat };
    c.publish(names.tunnel_frames("s6", "dialer"), wire::encode(&grant).into()).await.unwrap();
    c.flush().await.unwrap();
    let mut more = 0u64;
    let deadline = Instant::now() + Duration::from_millis(800);
    while let Ok(Some(msg)) = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), frames.next()).await {
        let f: Frame = wire::decode(&msg.payload).unwrap();
        assert!(f.seq > last_seq);
        if let FrameKind::Data(d) = f.kind {
            more += d.len() as u64;
        }
    }
    assert!(more >= s.window_bytes - s.frame_bytes as u64, "credit released another window: {more}");
    assert!(!a_closed.is_closed(), "{}", a_closed.wait().await);
    writer.abort();
}
