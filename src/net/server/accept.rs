//! Accepting: the endpoint's accept loop, a task per connection (named by its pinned
//! certificate, refused if it is ours or one too many), a task per request stream, all on one
//! [`TaskTracker`] so shutdown can wait for them; and the QUIC sending half every handler writes
//! to ([`Outgoing`]). The only file of the server that names quinn.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::limits::{CONNECTIONS_PER_PEER, Note};
use super::{Answering, Link, SHUTDOWN_GRACE, STATS_INTERVAL, Server, WRITE_TIMEOUT, answer};
use crate::model::peers::PeerId;
use crate::net::tls;
use crate::wire::codec;
use crate::wire::exchange;
use crate::wire::protocol::{CloseCode, Version};

/// Serves on `endpoint` until `shutdown` resolves, then shuts down gracefully.
pub async fn run(
    endpoint: quinn::Endpoint,
    server: Arc<Server>,
    shutdown: impl Future<Output = ()>,
) {
    let tracker = TaskTracker::new();
    let cancel = server.shutdown.clone();
    tokio::pin!(shutdown);
    let mut stats = tokio::time::interval(STATS_INTERVAL);
    stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = stats.tick() => log_stats(&server),
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let span = info_span!("connection", remote = %incoming.remote_address(), peer = tracing::field::Empty);
                tracker.spawn(
                    handle_connection(incoming, server.clone(), tracker.clone(), cancel.clone())
                        .instrument(span),
                );
            }
        }
    }
    info!("shutting down: finishing in-flight requests");
    log_stats(&server);
    endpoint.set_server_config(None);
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!("some requests did not finish within {SHUTDOWN_GRACE:?}; closing anyway");
    }
    endpoint.close(CloseCode::Shutdown.code().into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    info!("stopped");
}

fn log_stats(server: &Server) {
    let unlogged = server.refusals.take_unlogged();
    if unlogged > 0 {
        info!(
            "{unlogged} more handshakes failed or connections were refused since the last report (not logged one by one)"
        );
    }
    let mut sent: Vec<(PeerId, u64)> = server.take_sent().into_iter().collect();
    sent.sort();
    let secs = STATS_INTERVAL.as_secs_f64();
    for (peer, bytes) in sent {
        info!(
            "sent {peer} {:.1} MiB in the last {secs:.0} s ({:.1} MiB/s)",
            bytes as f64 / 1048576.0,
            bytes as f64 / 1048576.0 / secs
        );
    }
}

async fn handle_connection(
    incoming: quinn::Incoming,
    server: Arc<Server>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // A flood of refused handshakes must not flood the log: a few in full, then a count.
            if server.refusals.note(std::time::Instant::now()) == Note::Log {
                info!("handshake failed: {e}");
            }
            return;
        }
    };
    let mut pins_changed = server.pins.subscribe();
    let Some(peer) = tls::peer_identity(&conn, &server.pins.current()) else {
        // Unreachable in practice: the verifier accepts only pinned certificates.
        warn!("connection without a pinned certificate; closing");
        conn.close(CloseCode::Refused.code().into(), b"unknown peer");
        return;
    };
    if peer == server.me {
        warn!("refusing a connection that presents our own identity ({peer})");
        conn.close(CloseCode::Refused.code().into(), b"that is my own identity");
        return;
    }
    // Each connection may hold a send window of data in QUIC's buffers: a peer gets a few.
    let Some(_slot) = server.connections.admit(&peer) else {
        if server.refusals.note(std::time::Instant::now()) == Note::Log {
            warn!("refusing a connection from {peer}: it already has {CONNECTIONS_PER_PEER} open");
        }
        conn.close(CloseCode::Refused.code().into(), b"too many connections");
        return;
    };
    tracing::Span::current().record("peer", tracing::field::display(&peer));
    let version = tls::version(&conn);
    let packing = match version {
        Version::V2 | Version::V3 => format!("compression {:?}", server.compression).to_lowercase(),
        Version::V1 => "no compression (the peer speaks qnode/1)".into(),
    };
    let route = server.routes.of(conn.remote_address());
    info!(%peer, "connected: {}, {packing}, {route}", tls::alpn_name(version));
    // Known for introductions while it lasts.
    let _present = Present {
        server: server.clone(),
        peer: peer.clone(),
        n: server.present.add(&peer, Arc::new(Reachable(conn.clone()))),
    };
    let link = Arc::new(Link {
        peer: peer.clone(),
        remote: conn.remote_address(),
        local: conn.local_ip(),
        budget: server.budget.for_peer(&peer),
        version,
        wire_sent: {
            let conn = conn.clone();
            Box::new(move || conn.stats().udp_tx.bytes)
        },
        plain_for: AtomicU32::new(0),
        pace: codec::Pace::with_spare(crate::net::machine::cores_to_spare),
    });
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => break,
            s = conn.accept_bi() => s,
            Ok(()) = pins_changed.changed() => {
                // Removed from peer_settings.txt, or its certificate replaced: refused from now on.
                if tls::peer_identity(&conn, &server.pins.current()).as_ref() != Some(&peer) {
                    info!(%peer, "closing its connection: no longer listed with this certificate");
                    conn.close(CloseCode::Refused.code().into(), b"no longer listed");
                    break;
                }
                continue;
            }
        };
        match stream {
            Ok((send, recv)) => {
                let link = link.clone();
                tracker.spawn(handle_stream(send, recv, server.clone(), link).in_current_span());
            }
            Err(
                quinn::ConnectionError::ApplicationClosed(_)
                | quinn::ConnectionError::LocallyClosed
                | quinn::ConnectionError::ConnectionClosed(_),
            ) => {
                debug!(%peer, "disconnected");
                break;
            }
            Err(e) => {
                info!(%peer, "connection ended: {e}");
                break;
            }
        }
    }
}

/// A connection of a peer, as an introducer asks it to punch.
struct Reachable(quinn::Connection);

impl super::introduce::Reachable for Reachable {
    fn remote(&self) -> std::net::SocketAddr {
        self.0.remote_address()
    }

    fn punch(
        &self,
        peer: &PeerId,
        addr: std::net::SocketAddr,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>> {
        let (conn, peer) = (self.0.clone(), peer.to_string());
        Box::pin(async move {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            (exchange::punch(&mut send, &mut recv, &peer, addr).await).map_err(|e| e.to_string())
        })
    }
}

/// A connection's place among the present ones, given up when it ends.
struct Present {
    server: Arc<Server>,
    peer: PeerId,
    n: u64,
}

impl Drop for Present {
    fn drop(&mut self) {
        self.server.present.remove(&self.peer, self.n);
    }
}

/// One request stream: read, answered and logged by [`answer::handle`].
async fn handle_stream(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    server: Arc<Server>,
    link: Arc<Link>,
) {
    let mut send = Outgoing::new(send);
    answer::handle(&mut send, &mut recv, &server, &link).await;
}

/// The sending half of a request's stream, where every write must make progress within
/// [`WRITE_TIMEOUT`]: a peer that stops reading has the stream reset, which frees what quinn
/// and the reply held for it.
pub struct Outgoing {
    inner: quinn::SendStream,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Reset code of a stream whose reader stalled.
const STALLED: u32 = 1;

impl Outgoing {
    fn new(inner: quinn::SendStream) -> Self {
        Self { inner, stall: None }
    }

    fn timed_out(&mut self) -> std::io::Error {
        let _ = self.inner.reset(STALLED.into());
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer read nothing for {WRITE_TIMEOUT:?}"),
        )
    }
}

impl Answering for Outgoing {
    async fn stopped(&mut self) {
        let _ = self.inner.stopped().await;
    }

    fn reset(&mut self) {
        let _ = self.inner.reset(0u32.into());
    }
}

impl AsyncWrite for Outgoing {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match AsyncWrite::poll_write(Pin::new(&mut this.inner), cx, buf) {
            Poll::Ready(r) => {
                this.stall = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
                if stall.as_mut().poll(cx).is_ready() {
                    this.stall = None;
                    return Poll::Ready(Err(this.timed_out()));
                }
                Poll::Pending
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.inner), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.inner), cx)
    }
}

impl exchange::SendBytes for Outgoing {
    async fn send_bytes(&mut self, bufs: &mut [Bytes]) -> std::io::Result<()> {
        // `write_chunks` says how much it took; each call must take something in time.
        let mut at = 0;
        while at < bufs.len() {
            match tokio::time::timeout(WRITE_TIMEOUT, self.inner.write_chunks(&mut bufs[at..]))
                .await
            {
                Err(_) => return Err(self.timed_out()),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(w)) => at += w.chunks,
            }
            while bufs.get(at).is_some_and(Bytes::is_empty) {
                at += 1;
            }
        }
        Ok(())
    }
}
