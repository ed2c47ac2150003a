//! `serve`: answer other peers.
//!
//! Shape: accept loop → a task per connection → a task per request stream, all on one
//! [`TaskTracker`] so shutdown can wait for them. A connection is identified by the pinned
//! certificate its client presented (the TLS verifier already refused unknown ones); one that
//! presents our own identity is refused. Each request is handled from a typed [`Request`] and logged
//! once, naming the peer. Peer input is never trusted: frames are capped before allocation, names
//! are validated while decoding, ranges are checked, reads from a silent peer time out.
//!
//! Shutdown is a future passed in: stop accepting, let in-flight requests finish (bounded), close
//! every connection with [`CloseCode::Shutdown`], then wait for the closes to be delivered.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::model::delta::{Index, SigKind, Step};
use crate::model::manifest::{FileName, Hash32, MAX_CHUNK_SIZE, Manifest, Regrain};
use crate::model::peers::PeerId;
use crate::net::limits::{
    CONNECTIONS_PER_PEER, ConnectionSlots, MemoryBudget, Note, OBSERVERS_PER_PEER, ObserverSlots,
    PeerBudget, RefusalLog, Refused, UploadSlots,
};
use crate::net::shared::{Progress, TreeJobs, Watches};
use crate::net::tls::{self, Pins};
use crate::store::{Check, Committed, Seen, Store, StoreError, Upload};
use crate::wire::codec;
use crate::wire::exchange::{self, BodyError};
use crate::wire::protocol::{
    self, CloseCode, ErrorKind, FileEntry, Incomplete, MAX_GROUPS_PER_REQUEST, RemoteError,
    Request, Response, Version,
};

/// Default cap on one uploaded file, in bytes (64 GiB).
pub const DEFAULT_MAX_UPLOAD_SIZE: u64 = 64 << 30;
/// How long a peer may take to send its request, or the next bytes of an upload.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a write to a peer may make no progress (the peer does not read) before its stream is
/// reset and what it held is freed: the same as a request's.
pub const WRITE_TIMEOUT: Duration = READ_TIMEOUT;
/// How long shutdown waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Uploads are written to disk in parts of this many bytes.
const UPLOAD_WRITE_BUF: usize = 1 << 20;

/// Everything the server needs.
#[derive(Debug)]
pub struct Server {
    /// Who we are.
    pub me: PeerId,
    /// Our `served_files`.
    pub store: Arc<Store>,
    /// Pinned certificates, to name the peer behind each connection.
    pub pins: Pins,
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
        pins: Pins,
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

/// A byte-rate limit shared by every connection: a virtual clock that each send advances by
/// `bytes / rate`, so the long-run rate is exact and a send never waits longer than its own share.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: f64,
    next_free: tokio::sync::Mutex<tokio::time::Instant>,
}

impl RateLimit {
    /// A limit of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            next_free: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits until `bytes` more may be sent.
    ///
    /// Turns are taken in order (tokio's mutex is fair) and a turn's time is taken only when it
    /// comes: a request dropped while it waits (its asker got the chunk elsewhere) costs the
    /// others nothing.
    pub async fn acquire(&self, bytes: u64) {
        let mut next = self.next_free.lock().await;
        let start = (*next).max(tokio::time::Instant::now());
        tokio::time::sleep_until(start).await;
        *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
    }
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

    /// Resolves when the peer stops the stream (it no longer wants the answer).
    async fn stopped(&mut self) {
        let _ = self.inner.stopped().await;
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
    let Some(peer) = tls::peer_identity(&conn, &server.pins) else {
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
        Version::V2 => format!("compression {:?}", server.compression).to_lowercase(),
        Version::V1 => "no compression (the peer speaks qnode/1)".into(),
    };
    info!(%peer, "connected: {}, {packing}", tls::alpn_name(version));
    let link = Arc::new(Link {
        peer: peer.clone(),
        budget: server.budget.for_peer(&peer),
        version,
        conn: conn.clone(),
        plain_for: AtomicU32::new(0),
        pace: codec::Pace::with_spare(crate::net::machine::cores_to_spare),
    });
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => break,
            s = conn.accept_bi() => s,
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

/// What the requests of one connection share.
struct Link {
    peer: PeerId,
    budget: PeerBudget,
    version: Version,
    conn: quinn::Connection,
    /// Replies still to send plain after one did not shrink (then one is tried again).
    plain_for: AtomicU32,
    /// How fast its replies go, and how much they shrink.
    pace: codec::Pace,
}

/// Replies sent plain after one that did not shrink, before the next try.
const PLAIN_AFTER_MISS: u32 = 15;

impl Link {
    /// The level to try compressing the next reply at, if any: only to a `qnode/2` peer, as
    /// `mode` says (see `codec::Mode::level`), and not for a while after a reply that did not
    /// shrink (random or compressed data). The ranges of an update (`edit`) as
    /// `codec::Mode::edit_level` says.
    fn pack(&self, mode: codec::Mode, edit: bool) -> Option<i32> {
        if self.version != Version::V2 || mode == codec::Mode::Never {
            return None;
        }
        let skip = self.plain_for.load(Ordering::Relaxed);
        if skip > 0 {
            self.plain_for.store(skip - 1, Ordering::Relaxed);
            return None;
        }
        self.pace.on_wire(self.conn.stats().udp_tx.bytes);
        if edit {
            mode.edit_level(&self.pace)
        } else {
            mode.level(&self.pace)
        }
    }
}

async fn handle_stream(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    server: Arc<Server>,
    link: Arc<Link>,
) {
    let mut send = Outgoing::new(send);
    let sig = link.version.sig_kind();
    let request = match tokio::time::timeout(READ_TIMEOUT, exchange::read_request(&mut recv)).await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            info!("bad request: {e}");
            let err = RemoteError::new(
                ErrorKind::BadRequest,
                format!("unsupported or malformed request: {e}"),
            );
            respond(&mut send, &Response::Error(err)).await;
            return;
        }
        Err(_) => {
            info!("no request within {READ_TIMEOUT:?}");
            let _ = send.inner.reset(0u32.into());
            return;
        }
    };
    let kind = request.kind();
    let outcome = match request {
        Request::List => handle_list(&mut send, &server, &link).await,
        Request::Describe { name } => handle_describe(&mut send, &server, &link, &name).await,
        Request::ReadChunk { name, offset, len } => {
            let kind = ReadKind::Chunk;
            handle_read(&mut send, &server, &link, &name, (offset, len), kind).await
        }
        Request::ReadRange { name, offset, len } => {
            let kind = ReadKind::Range;
            handle_read(&mut send, &server, &link, &name, (offset, len), kind).await
        }
        Request::Groups { name, blake3 } => {
            handle_groups(&mut send, &server, &link, &name, (blake3, sig)).await
        }
        Request::Leaves {
            name,
            blake3,
            first,
            count,
        } => {
            let range = (first, count);
            handle_leaves(&mut send, &server, &link, &name, (blake3, sig), range).await
        }
        Request::Upload { name, size, blake3 } => {
            let up = (size, blake3, false);
            handle_upload(&mut send, &mut recv, &server, &link, &name, up).await
        }
        Request::Replace { name, size, blake3 } => {
            let up = (size, blake3, true);
            handle_upload(&mut send, &mut recv, &server, &link, &name, up).await
        }
        Request::Observe { name } => handle_observe(&mut send, &server, &link, &name, false).await,
        Request::ObservePieces { name } => {
            handle_observe(&mut send, &server, &link, &name, true).await
        }
        Request::ReadVersion {
            name,
            blake3,
            offset,
            len,
        } => {
            let kind = ReadKind::Version(blake3);
            handle_read(&mut send, &server, &link, &name, (offset, len), kind).await
        }
        Request::ListAll => handle_list_all(&mut send, &server, &link).await,
    };
    match outcome {
        Ok(summary) => info!("{kind} {summary}"),
        Err(Failure::Refused(err)) => {
            info!("{kind} refused: {}", err.message);
            respond(&mut send, &Response::Error(err)).await;
        }
        // The requester cancelled (e.g. another peer delivered that chunk first) or went away.
        Err(Failure::Gone(why)) => debug!("{kind} abandoned: {why}"),
    }
}

use exchange::respond;

fn store_error(e: StoreError) -> RemoteError {
    let kind = match &e {
        StoreError::NotFound(_) | StoreError::NotHeld { .. } => ErrorKind::NotFound,
        StoreError::Conflict(_) | StoreError::Changed(_) => ErrorKind::Conflict,
        StoreError::Busy(_) => ErrorKind::Busy,
        StoreError::OutOfRange { .. } | StoreError::NotAChunk { .. } => ErrorKind::BadRequest,
        StoreError::NoSpace(_) => ErrorKind::NoSpace,
        StoreError::Corrupt { .. } => ErrorKind::Corrupt,
        StoreError::Io { .. } => ErrorKind::Internal,
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
    send: &mut Outgoing,
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

/// Bytes a listing entry takes in an answer.
const ENTRY_BYTES: usize = 64 + 255;

/// The listing entries of `files`.
fn file_entries(files: Vec<(FileName, Arc<Manifest>)>) -> Vec<FileEntry> {
    files
        .into_iter()
        .map(|(name, m)| FileEntry::new(name, &m))
        .collect()
}

/// How many of `total` files a listing holds, said in the log when it is cut.
fn listed(total: usize) -> usize {
    let count = total.min(protocol::MAX_LISTED_FILES);
    if total > count {
        warn!("listing only the first {count} of {total} files");
    }
    count
}

async fn handle_list(send: &mut Outgoing, server: &Server, link: &Link) -> Result<String, Failure> {
    let store = server.store.clone();
    let files = blocking(move || store.list()).await?;
    let total = files.len();
    let estimate = total.min(protocol::MAX_LISTED_FILES) * ENTRY_BYTES;
    let build = || {
        let entries = file_entries(files);
        exchange::listing(entries)
    };
    reply(send, link, estimate, build, false).await?;
    let count = listed(total);
    Ok(format!("-> {count} files"))
}

async fn handle_list_all(
    send: &mut Outgoing,
    server: &Server,
    link: &Link,
) -> Result<String, Failure> {
    let store = server.store.clone();
    let (files, held) = blocking(move || Ok((store.list()?, store.held_all()?))).await?;
    let total = files.len();
    let partial = held.len();
    let estimate = (total + partial).min(2 * protocol::MAX_LISTED_FILES) * ENTRY_BYTES;
    let build = || {
        let entries = file_entries(files);
        let incomplete = held
            .into_iter()
            .map(|(name, h)| Incomplete::new(name, &h.manifest, h.bytes()))
            .collect();
        exchange::listing_all(entries, incomplete)
    };
    reply(send, link, estimate, build, false).await?;
    let count = listed(total);
    Ok(format!("-> {count} files, {partial} downloads in progress"))
}

pub use crate::net::shared::HAVE_POLL;

/// `Observe` (`ObservePieces` with `in_pieces`): our whole file of `name`, or our download of it
/// in progress and then what it gains, until it finishes, stops, the observer goes away or we
/// shut down. Counted in chunks, or in pieces for `ObservePieces` where the file has them,
/// whichever unit our own download is in. Every observer of one download shares one watch of it
/// (`shared::Watches`), and a peer has at most [`OBSERVERS_PER_PEER`] of downloads in progress
/// open.
async fn handle_observe(
    send: &mut Outgoing,
    server: &Server,
    link: &Link,
    name: &FileName,
    in_pieces: bool,
) -> Result<String, Failure> {
    let (store, n) = (server.store.clone(), name.clone());
    let (whole, held) = blocking(move || {
        Ok(match store.lookup_with_pieces(&n)? {
            Some(whole) => (Some(whole), None),
            None => (None, store.held_any(&n)?),
        })
    })
    .await?;
    // The version in chunks (manifests are shared, never copied per observer; only the answer
    // being sent is built from them), in pieces if we know its pieces' hashes, and for a download
    // in progress what it holds, in the observer's unit, and a watch of what it gains.
    let (manifest, pieces, following) = match (whole, held) {
        (Some(whole), _) => (whole.manifest, whole.pieces, None),
        (None, Some(h)) => {
            // Only these stay open: a whole file's answer ends at once.
            let Some(slot) = server.observers.admit(&link.peer) else {
                return Err(RemoteError::new(
                    ErrorKind::Busy,
                    format!(
                        "{OBSERVERS_PER_PEER} observers of downloads in progress from this peer are already open"
                    ),
                )
                .into());
            };
            let m = h.manifest.clone();
            let known = Regrain::new(&m, in_pieces).apply(&h.chunks);
            let watch = server.watches.subscribe(name, m.blake3(), h);
            let pieces = m.in_pieces().then(|| m.clone());
            (Arc::new(m.coarse()), pieces, Some((slot, watch, known)))
        }
        (None, None) => {
            return Err(RemoteError::new(
                ErrorKind::NotFound,
                format!("{name} is not served here"),
            )
            .into());
        }
    };
    let version = manifest.blake3();
    let held = following.as_ref().map(|(_, _, known)| known);
    let estimate = manifest_bytes(&manifest)
        + pieces.as_deref().map_or(0, manifest_bytes)
        + held.map_or(0, |h| h.len() as usize / 8);
    let build = || match in_pieces {
        true => exchange::holding_pieces(&manifest, pieces.as_deref(), held),
        false => exchange::holding(&manifest, held),
    };
    reply(send, link, estimate, build, held.is_some()).await?;
    drop((manifest, pieces));
    let Some((_slot, watch, known)) = following else {
        return Ok(format!("{name} -> whole file{}", unit(in_pieces)));
    };
    follow(send, server, (name, version, in_pieces), watch, known).await
}

/// Tells an observer what our download of version `version` of `name` in progress gains, in its
/// unit, from `known` on, until the download completes or stops, the observer leaves, or we
/// shut down.
async fn follow(
    send: &mut Outgoing,
    server: &Server,
    (name, version, in_pieces): (&FileName, Hash32, bool),
    mut watch: tokio::sync::watch::Receiver<Progress>,
    mut known: crate::model::manifest::ChunkSet,
) -> Result<String, Failure> {
    let first = known.count();
    loop {
        let now = watch.borrow_and_update().clone();
        match now {
            Progress::Holding(h) => {
                // Only gains: a sidecar rewritten with fewer chunks (an attempt resumed) costs
                // the observer failed requests for those, nothing worse. So does one rewritten
                // in the other unit, which the observer is told of in the unit it counts.
                let chunks = Regrain::new(&h.manifest, in_pieces).apply(&h.chunks);
                if h.manifest.blake3() == version && chunks.len() == known.len() {
                    let gained: Vec<u32> = known
                        .changed(&chunks)
                        .into_iter()
                        .filter(|&i| chunks.contains(i))
                        .collect();
                    if !gained.is_empty() {
                        exchange::send_have(send, gained).await.map_err(gone)?;
                        known = chunks;
                    }
                }
            }
            Progress::Complete => {
                respond(send, &Response::Complete).await;
                return Ok(format!(
                    "{name} -> observed from {first} units to the whole file{}",
                    unit(in_pieces)
                ));
            }
            Progress::Stopped => {
                return Err(RemoteError::new(
                    ErrorKind::NotFound,
                    format!("the download of {name} here stopped"),
                )
                .into());
            }
            Progress::Failed(e) => {
                warn!("watching the download of {name}: {e}");
                return Err(RemoteError::new(
                    ErrorKind::Internal,
                    "internal error on the serving peer",
                )
                .into());
            }
        }
        tokio::select! {
            changed = watch.changed() => if changed.is_err() {
                return Err(gone("shutting down"));
            },
            () = send.stopped() => return Ok(format!("{name} -> observed from {first} units until the observer left{}", unit(in_pieces))),
            () = server.shutdown.cancelled() => return Err(gone("shutting down")),
        }
    }
}

/// How an `Observe`'s log line says which request it was.
fn unit(in_pieces: bool) -> &'static str {
    if in_pieces { ", in pieces" } else { "" }
}

async fn handle_describe(
    send: &mut Outgoing,
    server: &Server,
    link: &Link,
    name: &FileName,
) -> Result<String, Failure> {
    let store = server.store.clone();
    let n = name.clone();
    let manifest = blocking(move || store.manifest(&n)).await?;
    let summary = format!(
        "{name} -> {} bytes, {} chunks",
        manifest.size(),
        manifest.chunk_count()
    );
    let build = || Response::Manifest((*manifest).clone());
    reply(send, link, manifest_bytes(&manifest), build, false).await?;
    Ok(summary)
}

/// What a read request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadKind {
    /// One chunk of the file's layout.
    Chunk,
    /// Any range at most one chunk long.
    Range,
    /// One chunk of this version, from the whole file or a download in progress.
    Version(Hash32),
}

async fn handle_read(
    send: &mut Outgoing,
    server: &Server,
    link: &Link,
    name: &FileName,
    (offset, len): (u64, u32),
    kind: ReadKind,
) -> Result<String, Failure> {
    if u64::from(len) > MAX_CHUNK_SIZE {
        return Err(RemoteError::new(
            ErrorKind::TooLarge,
            format!("chunk of {len} bytes exceeds the limit of {MAX_CHUNK_SIZE}"),
        )
        .into());
    }
    if let Some(limit) = &server.upload_limit {
        tokio::select! {
            () = limit.acquire(u64::from(len)) => {}
            _ = send.stopped() => return Err(gone("cancelled while waiting for its turn")),
        }
    }
    // Memory for the bytes is claimed before they are read and held until quinn has taken all of
    // them: first from this peer's share (a peer that does not read stalls only itself), then
    // from the share of all peers together. While they are compressed, the frame needs room
    // too (at most 7/8 of them); then only what is sent stays claimed.
    let pack = link.pack(server.compression, matches!(kind, ReadKind::Range));
    let room = if pack.is_some() {
        len + len / 8 * 7
    } else {
        len
    };
    let mut memory = link.budget.claim(room).await;
    let store = server.store.clone();
    let n = name.clone();
    let (data, frame) = blocking(move || {
        let data = match kind {
            ReadKind::Chunk => store.read_chunk(&n, offset, len),
            ReadKind::Range => store.read_piece(&n, offset, len),
            ReadKind::Version(blake3) => store.read_version(&n, &blake3, offset, len),
        }?;
        let frame = pack.and_then(|level| codec::compress(&data, level));
        Ok((data, frame))
    })
    .await?;
    if pack.is_some() && frame.is_none() {
        link.plain_for.store(PLAIN_AFTER_MISS, Ordering::Relaxed);
    }
    let packed = frame.is_some();
    let body = Bytes::from(frame.unwrap_or(data));
    let wire = body.len() as u64;
    memory.keep(body.len());
    exchange::send_chunk(send, len as usize, body, packed)
        .await
        .map_err(gone)?;
    server.count_sent(&link.peer, wire);
    link.pace.sent(u64::from(len), wire);
    Ok(match (packed, pack) {
        (true, Some(level)) => format!("{name} @{offset} +{len} (zstd-{level} {wire})"),
        _ => format!("{name} @{offset} +{len}"),
    })
}

/// Bytes of one signature in an answer (postcard: an 8-byte hash and a varint length).
const SIG_BYTES: usize = 13;

async fn handle_groups(
    send: &mut Outgoing,
    server: &Server,
    link: &Link,
    name: &FileName,
    (blake3, kind): (Hash32, SigKind),
) -> Result<String, Failure> {
    let tree = server
        .trees
        .of_version(name, blake3, kind)
        .await
        .map_err(store_error)?;
    let count = tree.group_count();
    if count.saturating_mul(SIG_BYTES) > protocol::MAX_RESPONSE_LEN as usize {
        return Err(RemoteError::new(
            ErrorKind::TooLarge,
            format!("{name} has too many groups ({count}) for one answer"),
        )
        .into());
    }
    let build = || Response::Groups(tree.group_sigs());
    reply(send, link, count * SIG_BYTES, build, false).await?;
    Ok(format!("{name} -> {count} groups"))
}

async fn handle_leaves(
    send: &mut Outgoing,
    server: &Server,
    link: &Link,
    name: &FileName,
    (blake3, kind): (Hash32, SigKind),
    (first, count): (u32, u32),
) -> Result<String, Failure> {
    if count > MAX_GROUPS_PER_REQUEST {
        return Err(RemoteError::new(
            ErrorKind::TooLarge,
            format!("at most {MAX_GROUPS_PER_REQUEST} groups per request"),
        )
        .into());
    }
    let tree = server
        .trees
        .of_version(name, blake3, kind)
        .await
        .map_err(store_error)?;
    let leaves = tree.leaves_of(first as usize, count as usize);
    let n = leaves.len();
    reply(
        send,
        link,
        n * SIG_BYTES,
        || Response::Leaves(leaves),
        false,
    )
    .await?;
    Ok(format!("{name} groups {first}+{count} -> {n} leaves"))
}

async fn handle_upload(
    send: &mut Outgoing,
    recv: &mut quinn::RecvStream,
    server: &Server,
    link: &Link,
    name: &FileName,
    (size, expected, replace): (u64, Hash32, bool),
) -> Result<String, Failure> {
    let (peer, kind) = (&link.peer, link.version.sig_kind());
    let framed = link.version == Version::V2;
    if size > server.max_upload_size {
        return Err(RemoteError::new(
            ErrorKind::TooLarge,
            format!(
                "{name} is {size} bytes; this peer accepts uploads up to {} bytes",
                server.max_upload_size
            ),
        )
        .into());
    }
    let store = server.store.clone();
    let (free, total) = blocking(move || store.disk_space()).await?;
    // Held until the upload ends: a slot of this peer's few, and the announced bytes counted
    // against the free disk less the reserve kept for our own downloads.
    let _slot = server
        .uploads
        .admit(peer, size, free, total)
        .map_err(|e| match e {
            Refused::TooMany(_) => RemoteError::new(ErrorKind::Busy, e.to_string()),
            Refused::Disk { .. } => RemoteError::new(ErrorKind::NoSpace, e.to_string()),
        })?;
    // Admitted (slot and disk): a replace's tree of the version we hold starts now, beside the
    // claim of the name and the requester's signatures (`receive_delta`). It is shared with any
    // other asker of it, and stops if this request ends first (a refused claim): the guard
    // aborts the task, and a computation no one waits for stops.
    let early = replace.then(|| {
        let (trees, n) = (server.trees.clone(), name.clone());
        Early(tokio::spawn(async move { trees.of(&n, None, kind).await }))
    });
    let store = server.store.clone();
    let n = name.clone();
    let Some(upload) = blocking(move || store.begin_upload(&n, size, expected, replace)).await?
    else {
        respond(send, &Response::AlreadyPresent).await;
        return Ok(format!("{name} -> already present"));
    };
    let upload = Arc::new(upload);
    let (check, received, wire) = match upload.replacing() {
        Some(old) => {
            receive_delta(
                send,
                recv,
                server,
                name,
                (size, framed),
                &upload,
                (old, kind, early),
            )
            .await?
        }
        None => {
            let (streamed, wire) = receive_whole(send, recv, name, (size, framed), &upload).await?;
            (Check::Streamed(streamed), size, wire)
        }
    };
    let upload = Arc::try_unwrap(upload).map_err(|_| gone("upload still shared"))?;
    let committed = blocking(move || upload.commit(expected, check)).await?;
    let (resp, what) = match committed {
        Committed::Stored => (Response::Stored, "stored"),
        Committed::AlreadyPresent => (Response::AlreadyPresent, "already present"),
        Committed::Replaced => (Response::Replaced, "replaced"),
    };
    respond(send, &resp).await;
    Ok(format!(
        "{name} ({size} bytes, {wire} on the wire, {received} received) -> {what}"
    ))
}

/// A replace's tree computed early (`handle_upload`); aborted when dropped unused.
struct Early(
    tokio::task::JoinHandle<
        Result<(crate::store::FileKey, Arc<crate::model::delta::Tree>), StoreError>,
    >,
);

impl Drop for Early {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Receives a whole upload's bytes into `upload`; returns their BLAKE3.
async fn receive_whole(
    send: &mut Outgoing,
    recv: &mut quinn::RecvStream,
    name: &FileName,
    (size, framed): (u64, bool),
    upload: &Arc<Upload>,
) -> Result<(Hash32, u64), Failure> {
    let mut hasher = blake3::Hasher::new();
    let body = exchange::receive_upload(
        send,
        recv,
        name,
        (size, framed),
        UPLOAD_WRITE_BUF,
        READ_TIMEOUT,
        |offset, piece: Vec<u8>| {
            hasher.update(&piece);
            let upload = upload.clone();
            blocking(move || upload.partial.write_at(offset, &piece))
        },
    )
    .await;
    match body {
        Ok(wire) => Ok((*hasher.finalize().as_bytes(), wire)),
        Err(BodyError::Refused(e) | BodyError::Sink(e)) => Err(e.into()),
        Err(BodyError::Gone(e)) => Err(gone(e)),
    }
}

/// Receives only what our version `old` of `name` lacks, and copies the rest from it. The result
/// is checked by re-reading it (what the requester sent are claims).
async fn receive_delta(
    send: &mut Outgoing,
    recv: &mut quinn::RecvStream,
    server: &Server,
    name: &FileName,
    (size, framed): (u64, bool),
    upload: &Arc<Upload>,
    (old, kind, early): (Seen, SigKind, Option<Early>),
) -> Result<(Check, u64, u64), Failure> {
    // The tree started once the replace was admitted, if it is of the version seen; else the
    // tree of that version (shared with any other asker of it), while the signatures travel.
    let index = async {
        if let Some(mut early) = early
            && let Ok(Ok((key, tree))) = (&mut early.0).await
            && old.is(&key)
        {
            return Ok(Index::of(&tree));
        }
        let found = server.trees.of(name, Some(old.key()), kind).await;
        found.map(|(_, t)| Index::of(&t)).map_err(store_error)
    };
    let path = server.store.path_of(name);
    let copy = async |steps: Vec<Step>| {
        let copies: Vec<(u64, u64, u64)> = steps
            .iter()
            .filter_map(|s| match *s {
                Step::Copy { from, to, len } => Some((from, to, len)),
                Step::Fetch { .. } => None,
            })
            .collect();
        let u = upload.clone();
        blocking(move || u.partial.copy_from(&path, &copies).map(|_| ())).await
    };
    let steps = exchange::receive_delta(
        send,
        recv,
        (size, framed),
        (index, copy),
        READ_TIMEOUT,
        |at, piece| {
            let upload = upload.clone();
            blocking(move || upload.partial.write_at(at, &piece))
        },
    )
    .await;
    let (steps, wire) = match steps {
        Ok(s) => s,
        Err(BodyError::Refused(e) | BodyError::Sink(e)) => return Err(e.into()),
        Err(BodyError::Gone(e)) => return Err(gone(e)),
    };
    let received = steps
        .iter()
        .map(|s| match *s {
            Step::Fetch { len, .. } => len,
            Step::Copy { .. } => 0,
        })
        .sum();
    Ok((Check::Reread, received, wire))
}
