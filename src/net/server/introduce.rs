//! Introductions: a peer behind a NAT keeps a connection to us (it dialled us: we can reach it
//! on that connection, and see its address as its NAT maps it). When another peer asks to be
//! introduced to it, we ask it to send a few datagrams to the asker's address as we see it
//! (opening its NAT toward the asker), then tell the asker its address: the asker dials it, and
//! the pinned handshake decides. We hand out only addresses we observed, never one a peer
//! claims.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{Answering, Failure, Link, Server};
use crate::model::peers::PeerId;
use crate::wire::exchange::respond;
use crate::wire::protocol::{ErrorKind, RemoteError, Response};

/// How long the introduced peer has to say it opened its NAT.
pub const PUNCH_WAIT: Duration = Duration::from_secs(3);

/// One open connection of a peer, as an introducer needs it.
pub trait Reachable: Send + Sync {
    /// Its address, as its NAT maps it.
    fn remote(&self) -> SocketAddr;
    /// Asks it to send datagrams to `addr`, where `peer` will dial it from.
    fn punch(&self, peer: &PeerId, addr: SocketAddr) -> BoxFuture<'static, Result<(), String>>;
}

/// A peer's open connections, each with the number it is forgotten by.
type Conns = Vec<(u64, Arc<dyn Reachable>)>;

/// The open connections of every peer, by peer.
#[derive(Default)]
pub struct Present {
    next: AtomicU64,
    by_peer: Mutex<HashMap<PeerId, Conns>>,
}

impl std::fmt::Debug for Present {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Present").finish_non_exhaustive()
    }
}

impl Present {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Conns>> {
        self.by_peer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a connection of `peer`; the number to forget it by.
    pub fn add(&self, peer: &PeerId, conn: Arc<dyn Reachable>) -> u64 {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().entry(peer.clone()).or_default().push((n, conn));
        n
    }

    /// Forgets connection `n` of `peer`.
    pub fn remove(&self, peer: &PeerId, n: u64) {
        let mut all = self.lock();
        if let Some(conns) = all.get_mut(peer) {
            conns.retain(|(m, _)| *m != n);
            if conns.is_empty() {
                all.remove(peer);
            }
        }
    }

    /// Asks each open connection of `peer` at once (a peer has a few; only the one it keeps
    /// for introductions answers) to punch toward `to`, where `asker` will dial from; the
    /// address of the first that did, if one did within [`PUNCH_WAIT`].
    pub(super) async fn punch(
        &self,
        peer: &PeerId,
        asker: &PeerId,
        to: SocketAddr,
    ) -> Option<SocketAddr> {
        let conns: Vec<Arc<dyn Reachable>> = (self.lock().get(peer))
            .map(|c| c.iter().map(|(_, r)| r.clone()).collect())
            .unwrap_or_default();
        let asks = conns.into_iter().map(|c| {
            Box::pin(async move {
                match tokio::time::timeout(PUNCH_WAIT, c.punch(asker, to)).await {
                    Ok(Ok(())) => Ok(c.remote()),
                    _ => Err(()),
                }
            })
        });
        let asks: Vec<_> = asks.collect();
        if asks.is_empty() {
            return None;
        }
        futures_util::future::select_ok(asks)
            .await
            .ok()
            .map(|(a, _)| a)
    }
}

/// The addresses we opened our NAT toward (introduced, or a relay), and how a connection from
/// each reaches us: for the log line of the connection when it comes.
#[derive(Debug, Default)]
pub struct Routes(Mutex<HashMap<SocketAddr, (String, std::time::Instant)>>);

/// How long an expected route is remembered.
const EXPECTED_FOR: Duration = Duration::from_secs(60);

impl Routes {
    /// A connection from `from` is expected, reaching us `how`.
    pub fn expect(&self, from: SocketAddr, how: String) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|_, (_, at)| at.elapsed() < EXPECTED_FOR);
        all.insert(from, (how, std::time::Instant::now()));
    }

    /// How a connection from `from` reaches us: as expected, or `direct`.
    pub fn of(&self, from: SocketAddr) -> String {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (all.get(&from)).map_or_else(|| "direct".to_owned(), |(how, _)| how.clone())
    }
}

/// `Introduce`: asks `peer` to punch toward the asker, and answers with the address of its
/// connection that did.
pub(super) async fn handle_introduce(
    send: &mut impl Answering,
    server: &Server,
    link: &Link,
    peer: String,
) -> Result<String, Failure> {
    link.needs_qnode3("introductions")?;
    let bad = |why: String| Failure::from(RemoteError::new(ErrorKind::BadRequest, why));
    let peer: PeerId = peer.parse().map_err(|e| bad(format!("{e}")))?;
    if peer == link.peer || peer == server.me {
        return Err(bad(format!("cannot introduce {} to {peer}", link.peer)));
    }
    let Some(addr) = server.present.punch(&peer, &link.peer, link.remote).await else {
        let why = format!(
            "{peer} keeps no connection to {} that answers introductions",
            server.me
        );
        return Err(RemoteError::new(ErrorKind::NotFound, why).into());
    };
    respond(send, &Response::Introduced { addr }).await;
    Ok(format!(
        "{} to {peer} at {addr} ({} at {})",
        link.peer, link.peer, link.remote
    ))
}
