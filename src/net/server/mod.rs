//! `serve`: answer other peers.
//!
//! Shape: accept loop → a task per connection → a task per request stream (`accept`), each
//! request read, answered and logged by `answer` (reads and listings), `observe` or `uploads`,
//! within what `limits` allows one peer, with the work many askers share done once (`shared`). A connection is identified by the pinned
//! certificate its client presented (the TLS verifier already refused unknown ones); one that
//! presents our own identity is refused. Each request is handled from a typed request and logged
//! once, naming the peer. Peer input is never trusted: frames are capped before allocation, names
//! are validated while decoding, ranges are checked, reads from a silent peer time out.
//!
//! Shutdown is a future passed in: stop accepting, let in-flight requests finish (bounded), close
//! every connection with `CloseCode::Shutdown`, then wait for the closes to be delivered.

mod accept;
mod answer;
pub mod introduce;
pub mod limits;
mod observe;
pub mod relay;
pub mod shared;
pub mod synced;
#[cfg(test)]
mod tests;
mod uploads;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::model::manifest::Manifest;
use crate::model::peers::PeerId;
use crate::net::tls::LivePins;
use crate::store::{Store, StoreError};
use crate::wire::codec;
use crate::wire::exchange::{self, SendBytes};
use crate::wire::protocol::{self, ErrorKind, RemoteError, Response, Version};
pub use accept::{Outgoing, run};
use limits::{ConnectionSlots, MemoryBudget, ObserverSlots, PeerBudget, RefusalLog, UploadSlots};
pub use limits::{RateLimit, UPLOADS_PER_PEER};
pub use shared::HAVE_POLL;
use shared::{TreeJobs, Watches};

/// Default cap on one uploaded file, in bytes (64 GiB).
pub const DEFAULT_MAX_UPLOAD_SIZE: u64 = 64 << 30;
/// How long a peer may take to send its request, or the next bytes of an upload.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a write to a peer may make no progress (the peer does not read) before its stream is
/// reset and what it held is freed: the same as a request's.
pub const WRITE_TIMEOUT: Duration = READ_TIMEOUT;
/// How long shutdown waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything the server needs.
#[derive(Debug)]
pub struct Server {
    /// Who we are.
    pub me: PeerId,
    /// Our `served_files`.
    pub store: Arc<Store>,
    /// Pinned certificates in force, to name the peer behind each connection (and close it
    /// once its peer is no longer listed or was re-keyed).
    pub pins: Arc<LivePins>,
    /// Largest upload accepted, in bytes.
    pub max_upload_size: u64,
    /// Paces chunk data sent to all peers together, if set.
    pub upload_limit: Option<RateLimit>,
    /// Chunk bytes sent to each peer since the last report.
    pub sent: std::sync::Mutex<HashMap<PeerId, u64>>,
    /// Memory for chunk replies, per peer and in all.
    pub budget: MemoryBudget,
    /// Uploads in progress, per peer, and the disk they may still take.
    pub uploads: UploadSlots,
    /// Refused handshakes, logged a few at a time.
    pub refusals: RefusalLog,
    /// Open connections per peer.
    pub connections: ConnectionSlots,
    /// Cancelled when the server shuts down: long-lived streams (observers) end then.
    pub shutdown: CancellationToken,
    /// When chunk replies to `qnode/2` peers are compressed.
    pub compression: codec::Mode,
    /// Open observers per peer.
    pub observers: ObserverSlots,
    /// One watch per observed download in progress.
    pub watches: Arc<Watches>,
    /// Tree computations, shared and capped.
    pub trees: Arc<TreeJobs>,
    /// The folders we sync (none unless `sync` runs): `SyncIndex` answers about them.
    pub synced: Arc<synced::SyncedFolders>,
    /// Every peer's open connections, for introductions.
    pub present: introduce::Present,
    /// What relaying we offer, and the relays running.
    pub relays: Arc<relay::Relays>,
    /// How connections we opened our NAT for reach us (`punched`, `relayed`), for the log.
    pub routes: Arc<introduce::Routes>,
}

/// Refused handshakes logged in full per [`STATS_INTERVAL`]; the rest are counted in one line.
pub const REFUSALS_LOGGED: u32 = 5;

/// How often `serve` logs what it sent to each peer (only when it sent something).
pub const STATS_INTERVAL: Duration = Duration::from_secs(10);

impl Server {
    /// A server for `me` on `store`, with the default memory and upload limits.
    pub fn new(
        me: PeerId,
        store: Arc<Store>,
        pins: Arc<LivePins>,
        max_upload_size: u64,
        upload_limit: Option<RateLimit>,
    ) -> Self {
        let shutdown = CancellationToken::new();
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            me,
            watches: Watches::new(store.clone(), shutdown.clone()),
            trees: Arc::new(TreeJobs::new(store.clone(), cores)),
            store,
            pins,
            max_upload_size,
            upload_limit,
            sent: Default::default(),
            budget: MemoryBudget::default(),
            uploads: UploadSlots::default(),
            refusals: RefusalLog::new(REFUSALS_LOGGED, STATS_INTERVAL, std::time::Instant::now()),
            connections: ConnectionSlots::default(),
            shutdown,
            compression: codec::Mode::default(),
            observers: ObserverSlots::default(),
            synced: Arc::default(),
            present: introduce::Present::default(),
            relays: Arc::default(),
            routes: Arc::default(),
        }
    }

    fn count_sent(&self, peer: &PeerId, bytes: u64) {
        // Held only for one map update; a poisoned lock still holds valid counters.
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        *sent.entry(peer.clone()).or_default() += bytes;
    }

    fn take_sent(&self) -> HashMap<PeerId, u64> {
        std::mem::take(&mut *self.sent.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A request's sending half as the handlers see it: a QUIC stream in `serve` ([`Outgoing`]), a
/// pipe in the tests.
pub trait Answering: SendBytes {
    /// Resolves when the asker stops the stream (it no longer wants the answer).
    fn stopped(&mut self) -> impl Future<Output = ()> + Send;

    /// Abandons the stream without an answer.
    fn reset(&mut self);
}

/// What the requests of one connection share.
struct Link {
    peer: PeerId,
    /// Its address, as its NAT (if any) maps it.
    remote: std::net::SocketAddr,
    /// Our address it reached us at, if known.
    local: Option<std::net::IpAddr>,
    budget: PeerBudget,
    version: Version,
    /// Bytes sent on the connection so far (the link's pace is measured from it).
    wire_sent: Box<dyn Fn() -> u64 + Send + Sync>,
    /// Replies still to send plain after one did not shrink (then one is tried again).
    plain_for: AtomicU32,
    /// How fast its replies go, and how much they shrink.
    pace: codec::Pace,
}

/// Replies sent plain after one that did not shrink, before the next try.
const PLAIN_AFTER_MISS: u32 = 15;

impl Link {
    /// Refuses `what` (a request of `qnode/3`: folders, sync) to a peer of an older version.
    fn needs_qnode3(&self, what: &str) -> Result<(), Failure> {
        if self.version.has_folders() {
            return Ok(());
        }
        let why = format!("{what} need qnode/3");
        Err(RemoteError::new(ErrorKind::BadRequest, why).into())
    }

    /// The level to try compressing the next reply at, if any: only to a `qnode/2` peer, as
    /// `mode` says (see `codec::Mode::level`), and not for a while after a reply that did not
    /// shrink (random or compressed data). The ranges of an update (`edit`) as
    /// `codec::Mode::edit_level` says.
    fn pack(&self, mode: codec::Mode, edit: bool) -> Option<i32> {
        if !self.version.compresses() || mode == codec::Mode::Never {
            return None;
        }
        let skip = self.plain_for.load(Ordering::Relaxed);
        if skip > 0 {
            self.plain_for.store(skip - 1, Ordering::Relaxed);
            return None;
        }
        self.pace.on_wire((self.wire_sent)());
        if edit {
            mode.edit_level(&self.pace)
        } else {
            mode.level(&self.pace)
        }
    }
}

fn store_error(e: StoreError) -> RemoteError {
    let kind = match &e {
        StoreError::NotFound(_) | StoreError::NotHeld { .. } => ErrorKind::NotFound,
        StoreError::Conflict(_) | StoreError::Changed(_) | StoreError::Ignored(_) => {
            ErrorKind::Conflict
        }
        StoreError::Busy(_) => ErrorKind::Busy,
        StoreError::OutOfRange { .. } | StoreError::NotAChunk { .. } => ErrorKind::BadRequest,
        StoreError::NoSpace(_) => ErrorKind::NoSpace,
        StoreError::Corrupt { .. } => ErrorKind::Corrupt,
        // A synced folder's state names local paths.
        StoreError::Io { .. } | StoreError::Sync(_) => ErrorKind::Internal,
    };
    // Internal errors carry local paths; the peer gets the gist, the log gets the detail.
    if kind == ErrorKind::Internal {
        warn!("{e}");
        return RemoteError::new(kind, "internal error on the serving peer");
    }
    RemoteError::new(kind, e.to_string())
}

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, RemoteError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(store_error),
        Err(e) => Err(RemoteError::new(
            ErrorKind::Internal,
            format!("task failed: {e}"),
        )),
    }
}

/// Why a request ended without success.
enum Failure {
    /// Refused, with an answer for the peer.
    Refused(RemoteError),
    /// The stream broke; there is no one to answer.
    Gone(String),
}

impl From<RemoteError> for Failure {
    fn from(e: RemoteError) -> Self {
        Self::Refused(e)
    }
}

fn gone(e: impl std::fmt::Display) -> Failure {
    Failure::Gone(e.to_string())
}

/// Sends one whole answer, or with `more` the first message of a stream of them. Its memory (about
/// `estimate` bytes as built, as much again encoded) is claimed from the peer's share before it is
/// built, and what is encoded stays claimed until quinn has taken it: a peer that does not read
/// holds only its own share, and only until the write deadline.
async fn reply(
    send: &mut impl Answering,
    link: &Link,
    estimate: usize,
    build: impl FnOnce() -> Response,
    more: bool,
) -> Result<(), Failure> {
    let claim = u32::try_from(estimate.saturating_mul(2)).unwrap_or(u32::MAX);
    let mut memory = tokio::select! {
        m = link.budget.claim(claim) => m,
        () = send.stopped() => return Err(gone("cancelled while waiting for memory")),
    };
    let frame = protocol::encode_frame(&build()).map_err(gone)?;
    memory.keep(frame.len());
    exchange::send_frame(send, frame, !more).await.map_err(gone)
}

/// Bytes a manifest takes in an answer.
fn manifest_bytes(m: &Manifest) -> usize {
    64 + 32 * m.chunk_count() as usize
}
