//! Relaying: where two peers behind NATs cannot punch through (a NAT that maps each destination
//! to a new port), their introducer carries their QUIC datagrams. Each relay is two UDP sockets
//! of ours: the asker dials one, the other peer opens its NAT toward the other (it punches, as
//! for an introduction), and each datagram from one side's address goes out of the other
//! socket to the other side's. We see only ciphertext; their pinned handshake is end to end.
//! Within limits: at most `max` relays at once, all of them together paced to `rate`, and a
//! relay idle for [`RELAY_IDLE`] ends.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::limits::RateLimit;
use super::{Answering, Failure, Link, Server};
use crate::model::peers::PeerId;
use crate::wire::exchange::respond;
use crate::wire::protocol::{ErrorKind, RemoteError, Response};

/// A relay with no datagram either way for this long ends (QUIC's keep-alives, every few
/// seconds, keep a live one going).
pub const RELAY_IDLE: Duration = Duration::from_secs(30);

/// Largest UDP datagram carried.
const MAX_DATAGRAM: usize = 65_535;

/// What relaying we offer.
#[derive(Debug)]
pub struct Relays {
    /// Whether we relay at all.
    pub enabled: bool,
    /// At most this many at once.
    pub max: usize,
    /// All of them together paced to this, if set.
    pub rate: Option<Arc<RateLimit>>,
    running: std::sync::Mutex<Running>,
}

/// The relays running: how many, and each asker's, oldest first (each by its number and what
/// stops it).
#[derive(Debug, Default)]
struct Running {
    next: u64,
    count: usize,
    by_asker:
        std::collections::HashMap<PeerId, std::collections::VecDeque<(u64, CancellationToken)>>,
}

/// Relays one peer may have running at once: a new one ends its oldest (a command run again
/// while its last run's relay idles out), so one peer never takes more places than this.
pub const RELAYS_PER_PEER: usize = 2;

impl Default for Relays {
    fn default() -> Self {
        Self::new(true, DEFAULT_MAX_RELAYED, None)
    }
}

/// Relays at once unless `--max-relayed` says otherwise.
pub const DEFAULT_MAX_RELAYED: usize = 16;

impl Relays {
    /// Relaying as `serve` was asked.
    pub fn new(enabled: bool, max: usize, rate: Option<u64>) -> Self {
        Self {
            enabled,
            max,
            rate: rate.map(|r| Arc::new(RateLimit::new(r))),
            running: Default::default(),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more relay asked by `asker` (ending its oldest if it has
    /// [`RELAYS_PER_PEER`]), stopped by `stop` or the place's `stop`; why not if all are taken.
    fn admit(self: &Arc<Self>, asker: &PeerId, stop: &CancellationToken) -> Result<Slot, String> {
        let mut running = self.running();
        let running = &mut *running;
        let mine = running.by_asker.entry(asker.clone()).or_default();
        if mine.len() >= RELAYS_PER_PEER
            && let Some((_, oldest)) = mine.pop_front()
        {
            oldest.cancel();
            running.count -= 1;
        }
        if running.count >= self.max {
            return Err(format!("relays {} peers already", self.max));
        }
        let (n, token) = (running.next, stop.child_token());
        running.next += 1;
        running.count += 1;
        mine.push_back((n, token.clone()));
        Ok(Slot {
            relays: self.clone(),
            asker: asker.clone(),
            n,
            stop: token,
        })
    }
}

/// One relay's place, given back when it ends (unless a newer one of its asker's took it).
#[derive(Debug)]
struct Slot {
    relays: Arc<Relays>,
    asker: PeerId,
    n: u64,
    stop: CancellationToken,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut running = self.relays.running();
        let running = &mut *running;
        if let Some(mine) = running.by_asker.get_mut(&self.asker) {
            let before = mine.len();
            mine.retain(|(n, _)| *n != self.n);
            running.count -= before - mine.len();
            if mine.is_empty() {
                running.by_asker.remove(&self.asker);
            }
        }
    }
}

/// `Relay`: two sockets for the asker and `peer`; `peer` is asked to punch toward its one, and
/// the asker is told where to dial.
pub(super) async fn handle_relay(
    send: &mut impl Answering,
    server: &Server,
    link: &Link,
    peer: String,
) -> Result<String, Failure> {
    link.needs_qnode3("relays")?;
    let refuse = |kind, why: String| Failure::from(RemoteError::new(kind, why));
    if !server.relays.enabled {
        return Err(refuse(
            ErrorKind::NotFound,
            format!("{} relays nothing", server.me),
        ));
    }
    let peer: PeerId = (peer.parse()).map_err(|e| refuse(ErrorKind::BadRequest, format!("{e}")))?;
    if peer == link.peer || peer == server.me {
        let why = format!("cannot relay {} to {peer}", link.peer);
        return Err(refuse(ErrorKind::BadRequest, why));
    }
    let slot = (server.relays.admit(&link.peer, &server.shutdown))
        .map_err(|why| refuse(ErrorKind::Busy, format!("{}: {why}", server.me)))?;
    let ip = link.local.ok_or_else(|| {
        refuse(
            ErrorKind::Internal,
            "our address on this link is unknown".into(),
        )
    })?;
    // Buffers as large as an endpoint's: a relay that drops on its own socket when it is
    // scheduled late looks like a lossy link to both sides.
    let bind = |ip: IpAddr| async move {
        let (socket, _) = crate::net::tls::udp_socket(SocketAddr::new(ip, 0))?;
        socket.set_nonblocking(true)?;
        UdpSocket::from_std(socket.into())
    };
    let io = |e: std::io::Error| refuse(ErrorKind::Internal, format!("relay socket: {e}"));
    let (ours, theirs) = (bind(ip).await.map_err(io)?, bind(ip).await.map_err(io)?);
    let (at_ours, at_theirs) = (
        ours.local_addr().map_err(io)?,
        theirs.local_addr().map_err(io)?,
    );
    // The other peer opens its NAT toward its socket; its datagram tells us its address.
    if server
        .present
        .punch(&peer, &link.peer, at_theirs)
        .await
        .is_none()
    {
        let why = format!("{peer} keeps no connection to {} that answers", server.me);
        return Err(refuse(ErrorKind::NotFound, why));
    }
    let relay = Relay {
        ours,
        theirs,
        rate: server.relays.rate.clone(),
        stop: slot.stop.clone(),
    };
    let between = format!("{} and {peer}", link.peer);
    tokio::spawn(async move {
        let _slot = slot;
        let carried = relay.run().await;
        tracing::info!("relay between {between} ended after {carried} bytes");
    });
    respond(send, &Response::Introduced { addr: at_ours }).await;
    Ok(format!(
        "{} to {peer} through {at_ours} and {at_theirs}",
        link.peer
    ))
}

/// The two sockets of one relay.
struct Relay {
    /// The asker's: it dials this one.
    ours: UdpSocket,
    /// The other peer's: it opened its NAT toward this one.
    theirs: UdpSocket,
    rate: Option<Arc<RateLimit>>,
    stop: CancellationToken,
}

impl Relay {
    /// Carries datagrams both ways until idle or shutdown; the bytes carried.
    async fn run(self) -> u64 {
        // Each side's address is the one its first datagram came from; nothing else is carried.
        let (mut asker, mut other): (Option<SocketAddr>, Option<SocketAddr>) = (None, None);
        let (mut a, mut b) = (vec![0u8; MAX_DATAGRAM], vec![0u8; MAX_DATAGRAM]);
        let mut carried = 0u64;
        // One timer for the whole relay, pushed back at most every second (not one per datagram).
        let idle = tokio::time::sleep(RELAY_IDLE);
        tokio::pin!(idle);
        let mut pushed = tokio::time::Instant::now();
        let stop = self.stop.clone().cancelled_owned();
        tokio::pin!(stop);
        loop {
            let got = tokio::select! {
                () = &mut stop => return carried,
                () = &mut idle => return carried,
                r = self.ours.recv_from(&mut a) => r.map(|(n, from)| (true, n, from)),
                r = self.theirs.recv_from(&mut b) => r.map(|(n, from)| (false, n, from)),
            };
            let Ok((from_asker, n, from)) = got else {
                continue;
            };
            let now = tokio::time::Instant::now();
            if now.duration_since(pushed) >= Duration::from_secs(1) {
                idle.as_mut().reset(now + RELAY_IDLE);
                pushed = now;
            }
            let (me, to, out, data) = match from_asker {
                true => (&mut asker, other, &self.theirs, &a[..n]),
                false => (&mut other, asker, &self.ours, &b[..n]),
            };
            if *me.get_or_insert(from) != from {
                continue;
            }
            let Some(to) = to else { continue };
            if let Some(rate) = &self.rate {
                rate.acquire(n as u64).await;
            }
            if out.send_to(data, to).await.is_ok() {
                carried += n as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn socket() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    /// One asker has at most [`RELAYS_PER_PEER`] relays (a new one ends its oldest), all of
    /// them at most `max`; a place given back is free again.
    #[test]
    fn relays_are_capped_per_asker_and_in_all() {
        let relays = Arc::new(Relays::new(true, 3, None));
        let stop = CancellationToken::new();
        let (p2, p3): (PeerId, PeerId) = ("p2".parse().unwrap(), "p3".parse().unwrap());
        let a = relays.admit(&p2, &stop).unwrap();
        let _b = relays.admit(&p2, &stop).unwrap();
        let c = relays.admit(&p2, &stop).unwrap();
        assert!(a.stop.is_cancelled(), "p2's oldest relay ends");
        drop(a);
        let _d = relays.admit(&p3, &stop).unwrap();
        assert!(
            relays
                .admit(&p3, &stop)
                .unwrap_err()
                .contains("relays 3 peers")
        );
        drop(c);
        assert!(relays.admit(&p3, &stop).is_ok());
    }

    /// A relay carries only between the two addresses it learned (a stranger's datagrams go
    /// nowhere), and a side that floods it is held to its rate.
    #[tokio::test]
    async fn a_relay_carries_only_its_two_sides_and_holds_a_flood_to_its_rate() {
        let (ours, theirs) = (socket().await, socket().await);
        let (at_ours, at_theirs) = (ours.local_addr().unwrap(), theirs.local_addr().unwrap());
        let stop = CancellationToken::new();
        let relay = Relay {
            ours,
            theirs,
            rate: Some(Arc::new(RateLimit::new(64 << 10))),
            stop: stop.clone(),
        };
        let running = tokio::spawn(relay.run());
        let (asker, target, stranger) = (socket().await, socket().await, socket().await);
        // The target punches first; then the asker's first datagram makes it the asker.
        target.send_to(&[0], at_theirs).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        asker.send_to(b"hello", at_ours).await.unwrap();
        let mut buf = vec![0u8; 2048];
        let (n, from) = target.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"hello"[..], at_theirs));
        // The way back.
        target.send_to(b"back", at_theirs).await.unwrap();
        let (n, _) = asker.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"back");
        // A stranger is not carried.
        stranger.send_to(b"junk", at_ours).await.unwrap();
        let heard = tokio::time::timeout(Duration::from_millis(300), target.recv_from(&mut buf));
        assert!(heard.await.is_err(), "a stranger's datagram was carried");
        // A flood of 1 MB: within one second, at most about a second's worth gets through.
        let flood = vec![7u8; 1000];
        for _ in 0..1000 {
            let _ = asker.send_to(&flood, at_ours).await;
        }
        let mut got = 0usize;
        let second = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Ok((n, _))) = tokio::time::timeout_at(second, target.recv_from(&mut buf)).await
        {
            got += n;
        }
        assert!(
            got <= 80_000,
            "{got} bytes carried in one second at 64 KiB/s"
        );
        stop.cancel();
        assert!(running.await.unwrap() >= 5 + 4 + got as u64);
    }
}
