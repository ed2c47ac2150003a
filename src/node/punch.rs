//! Across NATs: a node listed as `auto` keeps a connection from its server's UDP socket to each
//! listed peer with an address (its introducers), and answers their introductions by sending a
//! few datagrams from that socket toward whoever will dial it (opening its NAT to them). A node
//! dialling an `auto` peer asks its introducers for it while it listens for it on the LAN, and
//! dials the address the first one gives; the pinned handshake decides.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Node;
use super::listed::Listed;
use crate::model::peers::{PeerEntry, PeerId};
use crate::net::client::{Client, ClientError, Via};
use crate::net::identity::Identity;
use crate::net::server::introduce::Routes;
use crate::net::tls;

/// When the datagrams opening our NAT go out after the first (sent before we answer the
/// introducer), in case one is lost.
const PUNCHES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_millis(700),
];

/// The longest wait between two attempts to reach an introducer.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Keeps a connection from `endpoint` (our server's) to every listed peer with an address,
/// answering introductions with datagrams from `socket` (the same UDP socket), until `stop`.
/// Peers added to the table are reached too; a removed one's connection is closed.
pub(super) async fn stay_reachable(
    endpoint: quinn::Endpoint,
    socket: Arc<UdpSocket>,
    identity: Arc<Identity>,
    mut listed: watch::Receiver<Arc<Listed>>,
    routes: Arc<Routes>,
    stop: CancellationToken,
) {
    let mut reaching = std::collections::HashSet::<PeerId>::new();
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let now = listed.borrow_and_update().clone();
        for entry in now.table.entries() {
            if entry.id == identity.id || entry.addr.is_none() || !reaching.insert(entry.id.clone())
            {
                continue;
            }
            let keep = Keep {
                endpoint: endpoint.clone(),
                socket: socket.clone(),
                identity: identity.clone(),
                listed: listed.clone(),
                peer: entry.id.clone(),
                routes: routes.clone(),
            };
            tasks.spawn(keep.run(stop.clone()));
        }
        // A peer whose task ended (removed) is reached again if it comes back.
        reaching.retain(|p| now.table.get(p).is_some_and(|e| e.addr.is_some()));
        tokio::select! {
            () = stop.cancelled() => break,
            changed = listed.changed() => if changed.is_err() { break },
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// The connection kept to one introducer.
struct Keep {
    endpoint: quinn::Endpoint,
    socket: Arc<UdpSocket>,
    identity: Arc<Identity>,
    listed: watch::Receiver<Arc<Listed>>,
    peer: PeerId,
    /// Where we expect connections from, and how they reach us (for the server's log).
    routes: Arc<Routes>,
}

impl Keep {
    async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_secs(1);
        while !stop.is_cancelled() {
            // The introducer as the table says now: gone, or moved, or re-keyed.
            let (addr, cert) = {
                let now = self.listed.borrow();
                let addr = now.table.get(&self.peer).and_then(|e| e.addr);
                (addr, now.certs.get(&self.peer).cloned())
            };
            let (Some(addr), Some(cert)) = (addr, cert) else {
                return;
            };
            let cert_now = cert.clone();
            let connected = match tls::client_config(&self.identity, &self.peer, cert) {
                Ok(config) => Client::connect(&self.endpoint, config, &self.peer, addr).await,
                Err(e) => {
                    tracing::warn!("cannot reach {} for introductions: {e}", self.peer);
                    return;
                }
            };
            match connected {
                Ok(client) => {
                    backoff = Duration::from_secs(1);
                    tracing::info!("{} can introduce others to us", self.peer);
                    let opened = |to: SocketAddr| {
                        // Toward the introducer's own address: one of its relays.
                        let how = match to.ip() == addr.ip() {
                            true => format!("relayed by {}", self.peer),
                            false => format!("punched (introduced by {})", self.peer),
                        };
                        self.routes.expect(to, how);
                        punch(&self.socket, to);
                    };
                    tokio::select! {
                        () = stop.cancelled() => client.close(),
                        () = client.answer_introductions(opened) => {}
                        () = self.moved(addr, &cert_now) => {
                            tracing::info!("{} is no longer listed so: its connection for introductions closed", self.peer);
                            client.close();
                        }
                    }
                }
                Err(e) => tracing::debug!("introducer {}: {e}", self.peer),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

impl Keep {
    /// Resolves once the table no longer lists the introducer at `addr` with `cert` (removed,
    /// moved or re-keyed): the connection made to it then goes.
    async fn moved(&self, addr: SocketAddr, cert: &rustls::pki_types::CertificateDer<'static>) {
        let mut listed = self.listed.clone();
        loop {
            {
                let now = listed.borrow_and_update();
                let same = now.table.get(&self.peer).and_then(|e| e.addr) == Some(addr)
                    && now.certs.get(&self.peer) == Some(cert);
                if !same {
                    return;
                }
            }
            if listed.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// Sends datagrams that QUIC ignores (one byte) from `socket` to `to`, spread over [`PUNCHES`]:
/// our NAT then lets `to`'s packets in.
fn punch(socket: &Arc<UdpSocket>, to: SocketAddr) {
    let _ = socket.send_to(&[0], to);
    let again = socket.clone();
    tokio::spawn(async move {
        let mut last = Duration::ZERO;
        for at in PUNCHES {
            tokio::time::sleep(at - last).await;
            last = at;
            let _ = again.send_to(&[0], to);
        }
    });
}

/// How long a punched connection may take before the relay is asked.
const PUNCH_WAIT: Duration = Duration::from_secs(2);

impl Node {
    /// A connection to `entry`, listed as `auto`: where the LAN or an introducer says it is,
    /// punched through; through the introducer's relay if that gets no answer within
    /// [`PUNCH_WAIT`].
    pub(super) async fn reach(&self, entry: &PeerEntry) -> Result<Client, ClientError> {
        let peer = &entry.id;
        let (addr, by) = self.locate(peer).await?;
        let dial = self.redial(entry)?;
        let Some(by) = by else {
            self.note_route(peer, "found on the LAN".into());
            return Client::connect(&dial.endpoint, dial.config, peer, addr).await;
        };
        let punched =
            Client::connect_within(&dial.endpoint, dial.config.clone(), peer, addr, PUNCH_WAIT);
        if let Some(client) = punched.await? {
            self.note_route(peer, format!("punched (introduced by {})", by.id));
            return Ok(client);
        }
        // No answer: a NAT that maps each destination anew. Through the introducer's relay.
        let relay = Box::pin(self.client(&by)).await?.relay(peer).await?;
        self.found_at(peer, relay);
        if let (Some(at), Ok(by_dial)) = (by.addr, self.redial(&by)) {
            let via = Via {
                introducer: by.id.clone(),
                addr: at,
                config: by_dial.config,
            };
            let mut vias = self.vias.lock().unwrap_or_else(|p| p.into_inner());
            vias.insert(peer.clone(), via);
        }
        self.note_route(peer, format!("relayed by {}", by.id));
        tracing::info!("{peer}: no answer punched through; relayed by {}", by.id);
        Client::connect(&dial.endpoint, dial.config, peer, relay).await
    }

    fn note_route(&self, peer: &PeerId, route: String) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.insert(peer.clone(), route);
    }

    fn found_at(&self, peer: &PeerId, addr: SocketAddr) {
        let mut found = self.found.lock().unwrap_or_else(|p| p.into_inner());
        found.insert(peer.clone(), addr);
    }

    /// Where `peer` (listed as `auto`) can be dialled: heard on the LAN, or introduced by a
    /// listed peer it keeps a connection to (named), whichever answers first.
    async fn locate(&self, peer: &PeerId) -> Result<(SocketAddr, Option<PeerEntry>), ClientError> {
        let lan = async { self.find_on_lan(peer).await.map(|a| (a, None)) };
        let introduced = async { self.introduced(peer).await.map(|(a, by)| (a, Some(by))) };
        tokio::pin!(lan, introduced);
        let (first, other) = tokio::select! {
            r = &mut lan => match r {
                Ok(found) => return Ok(found),
                Err(e) => (e, introduced.await),
            },
            r = &mut introduced => match r {
                Ok(found) => return Ok(found),
                Err(e) => (e, lan.await),
            },
        };
        other.map_err(|second| ClientError::NotFound {
            peer: peer.clone(),
            reason: format!("{}; {}", reason(&first), reason(&second)),
        })
    }

    /// `peer`'s address as one of our listed peers with an address (its introducers) sees it,
    /// once `peer` opened its NAT toward us; and that introducer.
    async fn introduced(&self, peer: &PeerId) -> Result<(SocketAddr, PeerEntry), ClientError> {
        let table = self.table();
        let introducers: Vec<_> = (table.entries().iter())
            .filter(|e| e.addr.is_some() && e.id != self.me && e.id != *peer)
            .cloned()
            .collect();
        let asks = introducers.iter().map(|e| {
            Box::pin(async move {
                let client = Box::pin(self.client(e)).await?;
                let addr = client.introduce(peer).await?;
                Ok::<_, ClientError>((addr, e.clone()))
            })
        });
        let not_found = |reason: String| ClientError::NotFound {
            peer: peer.clone(),
            reason,
        };
        if introducers.is_empty() {
            return Err(not_found(
                "no listed peer with an address to introduce us".into(),
            ));
        }
        match futures_util::future::select_ok(asks).await {
            Ok(((addr, by), _)) => {
                tracing::info!("{} introduced {peer} at {addr}", by.id);
                self.found_at(peer, addr);
                Ok((addr, by))
            }
            Err(e) => Err(not_found(format!("no introducer could reach it ({e})"))),
        }
    }
}

/// Why a peer was not found, without its name (the caller's message names it).
fn reason(e: &ClientError) -> String {
    match e {
        ClientError::NotFound { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}
