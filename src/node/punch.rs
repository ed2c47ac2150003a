//! Across NATs: a node listed as `auto`, or at an address that is not its host's (its router's),
//! keeps a connection from its server's UDP socket to each listed peer with an address (its
//! introducers), and answers their introductions by sending a few datagrams from that socket
//! toward whoever will dial it (opening its NAT to them). A node dialling an `auto` peer asks
//! its introducers for it while it listens for it on the LAN, and dials the address the first
//! one gives; the pinned handshake decides. A peer listed at an address that does not answer
//! there is asked of its introducers too.

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

/// How long a peer listed at an address may take to answer there before its introducers are
/// asked for it too (it may be behind a NAT that lets nothing in unasked).
const DIRECT_WAIT: Duration = Duration::from_secs(1);

/// Where and how a peer was reached other than at its listed address.
#[derive(Debug, Clone)]
pub(super) struct Reached {
    pub(super) addr: SocketAddr,
    /// `found on the LAN`, `punched (introduced by p1)`, `relayed by p1`.
    pub(super) route: String,
    /// For a relayed peer: the introducer to ask for a new relay.
    pub(super) via: Option<Via>,
}

impl Node {
    /// A connection to `entry`, listed as `auto`: where the LAN or an introducer says it is.
    pub(super) async fn reach(&self, entry: &PeerEntry) -> Result<Client, ClientError> {
        let (addr, by) = self.locate(&entry.id).await?;
        match by {
            Some(by) => self.through(entry, addr, &by).await,
            None => {
                let client = self.connect_at(entry, addr).await?;
                self.note(&entry.id, addr, "found on the LAN".into(), None);
                Ok(client)
            }
        }
    }

    /// A connection to `entry` at its listed `addr`. With no answer there within
    /// [`DIRECT_WAIT`], its introducers are asked for it while the dial goes on; the first to
    /// give an address ends the dial, and the peer is reached through that introduction. Where
    /// no introducer has it, the dial's own outcome stands.
    pub(super) async fn dial(
        &self,
        entry: &PeerEntry,
        addr: SocketAddr,
    ) -> Result<Client, ClientError> {
        let direct = self.connect_at(entry, addr);
        tokio::pin!(direct);
        let answered = tokio::select! {
            r = &mut direct => Some(r),
            () = tokio::time::sleep(DIRECT_WAIT) => None,
        };
        let outcome = match answered {
            Some(r) => r,
            None => tokio::select! {
                r = &mut direct => r,
                introduced = self.introduced(&entry.id) => match introduced {
                    Ok((at, by)) => return self.through(entry, at, &by).await,
                    Err(e) => {
                        tracing::debug!("{}: {e}", entry.id);
                        direct.await
                    }
                },
            },
        };
        if outcome.is_ok() {
            self.forget_route(&entry.id);
        }
        outcome
    }

    /// A connection to `entry` at `addr`, where `by` introduced it, punched through; through
    /// `by`'s relay if that gets no answer within [`PUNCH_WAIT`].
    async fn through(
        &self,
        entry: &PeerEntry,
        addr: SocketAddr,
        by: &PeerEntry,
    ) -> Result<Client, ClientError> {
        let peer = &entry.id;
        let dial = self.redial_at(entry, addr)?;
        let punched =
            Client::connect_within(&dial.endpoint, dial.config.clone(), peer, addr, PUNCH_WAIT);
        if let Some(client) = punched.await? {
            self.note(
                peer,
                addr,
                format!("punched (introduced by {})", by.id),
                None,
            );
            return Ok(client);
        }
        // No answer: a NAT that maps each destination anew. Through the introducer's relay.
        let introducer = Box::pin(self.client_direct(by)).await?;
        let relay = introducer.relay(peer).await?;
        let via = (by.addr.and_then(|at| self.redial_at(by, at).ok())).map(|d| Via {
            introducer: by.id.clone(),
            addr: d.addr,
            config: d.config,
        });
        self.note(peer, relay, format!("relayed by {}", by.id), via);
        tracing::info!("{peer}: no answer punched through; relayed by {}", by.id);
        let client = self.connect_at(entry, relay).await?;
        tokio::spawn(follow(introducer, client.clone()));
        Ok(client)
    }

    fn note(&self, peer: &PeerId, addr: SocketAddr, route: String, via: Option<Via>) {
        let mut reached = self.reached.lock().unwrap_or_else(|p| p.into_inner());
        reached.insert(peer.clone(), Reached { addr, route, via });
    }

    /// Where `peer` was last reached other than at its listed address.
    pub(super) fn reached_at(&self, peer: &PeerId) -> Option<SocketAddr> {
        let reached = self.reached.lock().unwrap_or_else(|p| p.into_inner());
        reached.get(peer).map(|r| r.addr)
    }

    /// `peer` is dialled at its listed address again.
    pub(super) fn forget_route(&self, peer: &PeerId) {
        let mut reached = self.reached.lock().unwrap_or_else(|p| p.into_inner());
        reached.remove(peer);
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
                let client = Box::pin(self.client_direct(e)).await?;
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
                Ok((addr, by))
            }
            Err(e) => Err(not_found(format!("no introducer could reach it ({e})"))),
        }
    }
}

/// Closes `relayed` when the connection to its relay's `introducer` closes: the relay went
/// with it (a restart, say), and QUIC would otherwise notice only at its idle timeout. The
/// next request dials again through a new relay (`Redial::via`).
async fn follow(introducer: Client, relayed: Client) {
    tokio::select! {
        () = introducer.closed() => {
            if relayed.is_open() {
                tracing::info!(
                    "{}: the connection to {} closed, and its relay with it: relayed again at the next request",
                    relayed.peer(),
                    introducer.peer()
                );
                relayed.close();
            }
        }
        () = relayed.closed() => {}
    }
}

/// Why a peer was not found, without its name (the caller's message names it).
fn reason(e: &ClientError) -> String {
    match e {
        ClientError::NotFound { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}
