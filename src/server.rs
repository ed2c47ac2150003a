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
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::codec;
use crate::delta::{Index, SigKind, Step};
use crate::exchange::{self, BodyError};
use crate::limits::{
    CONNECTIONS_PER_PEER, ConnectionSlots, MemoryBudget, Note, PeerBudget, RefusalLog, Refused,
    UploadSlots,
};
use crate::manifest::{FileName, Hash32, MAX_CHUNK_SIZE, Regrain};
use crate::peers::PeerId;
use crate::protocol::{
    self, CloseCode, ErrorKind, FileEntry, Incomplete, MAX_GROUPS_PER_REQUEST, RemoteError,
    Request, Response, Version,
};
use crate::store::{Check, Committed, FileKey, Seen, Store, StoreError, Upload};

/// The tree of a file as read, and the file it was read from.
type ReadTree = (FileKey, Arc<crate::delta::Tree>);
use crate::tls::{self, Pins};

/// Default cap on one uploaded file, in bytes (64 GiB).
pub const DEFAULT_MAX_UPLOAD_SIZE: u64 = 64 << 30;
/// How long a peer may take to send its request, or the next piece of an upload.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// How long shutdown waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Uploads are written to disk in pieces of this many bytes.
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
        Self {
            me,
            store,
            pins,
            max_upload_size,
            upload_limit,
            sent: Default::default(),
            budget: MemoryBudget::default(),
            uploads: UploadSlots::default(),
            refusals: RefusalLog::new(REFUSALS_LOGGED, STATS_INTERVAL, std::time::Instant::now()),
            connections: ConnectionSlots::default(),
            shutdown: CancellationToken::new(),
            compression: codec::Mode::default(),
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
        pace: codec::Pace::default(),
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
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    server: Arc<Server>,
    link: Arc<Link>,
) {
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
            let _ = send.reset(0u32.into());
            return;
        }
    };
    let kind = request.kind();
    let outcome = match request {
        Request::List => handle_list(&mut send, &server).await,
        Request::Describe { name } => handle_describe(&mut send, &server, &name).await,
        Request::ReadChunk { name, offset, len } => {
            let piece = Piece::Chunk;
            handle_read(&mut send, &server, &link, &name, (offset, len), piece).await
        }
        Request::ReadRange { name, offset, len } => {
            let piece = Piece::Range;
            handle_read(&mut send, &server, &link, &name, (offset, len), piece).await
        }
        Request::Groups { name, blake3 } => {
            handle_groups(&mut send, &server, &name, (blake3, sig)).await
        }
        Request::Leaves {
            name,
            blake3,
            first,
            count,
        } => handle_leaves(&mut send, &server, &name, (blake3, sig), (first, count)).await,
        Request::Upload { name, size, blake3 } => {
            let up = (size, blake3, false);
            handle_upload(&mut send, &mut recv, &server, &link, &name, up).await
        }
        Request::Replace { name, size, blake3 } => {
            let up = (size, blake3, true);
            handle_upload(&mut send, &mut recv, &server, &link, &name, up).await
        }
        Request::Observe { name } => handle_observe(&mut send, &server, &name, false).await,
        Request::ObservePieces { name } => handle_observe(&mut send, &server, &name, true).await,
        Request::ReadVersion {
            name,
            blake3,
            offset,
            len,
        } => {
            let piece = Piece::Version(blake3);
            handle_read(&mut send, &server, &link, &name, (offset, len), piece).await
        }
        Request::ListAll => handle_list_all(&mut send, &server).await,
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

async fn handle_list(send: &mut quinn::SendStream, server: &Server) -> Result<String, Failure> {
    let store = server.store.clone();
    let files = blocking(move || store.list()).await?;
    let total = files.len();
    let entries: Vec<FileEntry> = files
        .into_iter()
        .map(|(name, m)| FileEntry::new(name, &m))
        .collect();
    let count = exchange::send_listing(send, entries).await;
    if total > count {
        warn!("listing only the first {count} of {total} files");
    }
    Ok(format!("-> {count} files"))
}

async fn handle_list_all(send: &mut quinn::SendStream, server: &Server) -> Result<String, Failure> {
    let store = server.store.clone();
    let (files, held) = blocking(move || Ok((store.list()?, store.held_all()?))).await?;
    let total = files.len();
    let entries: Vec<FileEntry> = files
        .into_iter()
        .map(|(name, m)| FileEntry::new(name, &m))
        .collect();
    let incomplete: Vec<Incomplete> = held
        .into_iter()
        .map(|(name, h)| Incomplete::new(name, &h.manifest, h.bytes()))
        .collect();
    let partial = incomplete.len();
    let count = exchange::send_listing_all(send, entries, incomplete).await;
    if total > count {
        warn!("listing only the first {count} of {total} files");
    }
    Ok(format!("-> {count} files, {partial} downloads in progress"))
}

/// How often an observed download in progress is looked at again for new chunks.
pub const HAVE_POLL: Duration = Duration::from_millis(50);

/// `Observe` (`ObservePieces` with `in_pieces`): our whole file of `name`, or our download of it
/// in progress and then what it gains, until it finishes, stops, the observer goes away or we
/// shut down. Counted in chunks, or in pieces for `ObservePieces` where the file has them,
/// whichever unit our own download is in.
async fn handle_observe(
    send: &mut quinn::SendStream,
    server: &Server,
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
    // The version in chunks, in pieces if we know its pieces' hashes, and for a download in
    // progress what it holds, in the observer's unit.
    let (manifest, pieces, held) = match (whole, held) {
        (Some(whole), _) => (whole.manifest, whole.pieces, None),
        (None, Some(h)) => {
            let pieces = h.manifest.in_pieces().then(|| h.manifest.clone());
            (Arc::new(h.manifest.coarse()), pieces, Some(h))
        }
        (None, None) => {
            return Err(RemoteError::new(
                ErrorKind::NotFound,
                format!("{name} is not served here"),
            )
            .into());
        }
    };
    let known = held.map(|h| Regrain::new(&h.manifest, in_pieces).apply(&h.chunks));
    match in_pieces {
        true => {
            exchange::send_holding_pieces(send, &manifest, pieces.as_deref(), known.as_ref()).await
        }
        false => exchange::send_holding(send, &manifest, known.as_ref()).await,
    }
    .map_err(gone)?;
    let Some(mut known) = known else {
        return Ok(format!("{name} -> whole file{}", unit(in_pieces)));
    };
    let version = manifest.blake3();
    let first = known.count();
    loop {
        tokio::select! {
            () = tokio::time::sleep(HAVE_POLL) => {}
            _ = send.stopped() => return Ok(format!("{name} -> observed from {first} units until the observer left{}", unit(in_pieces))),
            () = server.shutdown.cancelled() => return Err(gone("shutting down")),
        }
        let (store, n) = (server.store.clone(), name.clone());
        let now = blocking(move || {
            Ok(match store.held(&n, &version)? {
                Some(h) => Err(h),
                None => Ok(store.lookup(&n)?.is_some_and(|m| m.blake3() == version)),
            })
        })
        .await?;
        match now {
            Err(h) => {
                // Only gains: a sidecar rewritten with fewer chunks (an attempt resumed) costs
                // the observer failed requests for those, nothing worse. So does one rewritten
                // in the other unit, which the observer is told of in the unit it counts.
                let chunks = Regrain::new(&h.manifest, in_pieces).apply(&h.chunks);
                if chunks.len() != known.len() {
                    continue;
                }
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
            Ok(true) => {
                respond(send, &Response::Complete).await;
                return Ok(format!(
                    "{name} -> observed from {first} units to the whole file{}",
                    unit(in_pieces)
                ));
            }
            Ok(false) => {
                return Err(RemoteError::new(
                    ErrorKind::NotFound,
                    format!("the download of {name} here stopped"),
                )
                .into());
            }
        }
    }
}

/// How an `Observe`'s log line says which request it was.
fn unit(in_pieces: bool) -> &'static str {
    if in_pieces { ", in pieces" } else { "" }
}

async fn handle_describe(
    send: &mut quinn::SendStream,
    server: &Server,
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
    respond(send, &Response::Manifest((*manifest).clone())).await;
    Ok(summary)
}

/// What a read request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// One chunk of the file's layout.
    Chunk,
    /// Any range at most one chunk long.
    Range,
    /// One chunk of this version, from the whole file or a download in progress.
    Version(Hash32),
}

async fn handle_read(
    send: &mut quinn::SendStream,
    server: &Server,
    link: &Link,
    name: &FileName,
    (offset, len): (u64, u32),
    piece: Piece,
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
    let pack = link.pack(server.compression, matches!(piece, Piece::Range));
    let room = if pack.is_some() {
        len + len / 8 * 7
    } else {
        len
    };
    let mut held = link.budget.claim(room).await;
    let store = server.store.clone();
    let n = name.clone();
    let (data, frame) = blocking(move || {
        let data = match piece {
            Piece::Chunk => store.read_chunk(&n, offset, len),
            Piece::Range => store.read_piece(&n, offset, len),
            Piece::Version(blake3) => store.read_version(&n, &blake3, offset, len),
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
    held.keep(body.len());
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

async fn handle_groups(
    send: &mut quinn::SendStream,
    server: &Server,
    name: &FileName,
    (blake3, kind): (Hash32, SigKind),
) -> Result<String, Failure> {
    let store = server.store.clone();
    let n = name.clone();
    let tree = blocking(move || store.tree(&n, blake3, kind)).await?;
    let groups = tree.group_sigs();
    let count = groups.len();
    // Each signature is at most 13 bytes on the wire.
    if count.saturating_mul(13) > protocol::MAX_RESPONSE_LEN as usize {
        return Err(RemoteError::new(
            ErrorKind::TooLarge,
            format!("{name} has too many groups ({count}) for one answer"),
        )
        .into());
    }
    respond(send, &Response::Groups(groups)).await;
    Ok(format!("{name} -> {count} groups"))
}

async fn handle_leaves(
    send: &mut quinn::SendStream,
    server: &Server,
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
    let store = server.store.clone();
    let n = name.clone();
    let tree = blocking(move || store.tree(&n, blake3, kind)).await?;
    let leaves = tree.leaves_of(first as usize, count as usize);
    let n = leaves.len();
    respond(send, &Response::Leaves(leaves)).await;
    Ok(format!("{name} groups {first}+{count} -> {n} leaves"))
}

async fn handle_upload(
    send: &mut quinn::SendStream,
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
    // Replacing: the tree of the version we hold is read now, beside what follows, in case it
    // is needed (`receive_delta`).
    let early = replace.then(|| {
        let (store, n) = (server.store.clone(), name.clone());
        tokio::task::spawn_blocking(move || store.current_tree(&n, kind))
    });
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
            let old = (old, kind, early);
            receive_delta(send, recv, server, name, (size, framed), &upload, old).await?
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

/// Receives a whole upload's bytes into `upload`; returns their BLAKE3.
async fn receive_whole(
    send: &mut quinn::SendStream,
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
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    server: &Server,
    name: &FileName,
    (size, framed): (u64, bool),
    upload: &Arc<Upload>,
    (old, kind, early): (
        Seen,
        SigKind,
        Option<JoinHandle<Result<ReadTree, StoreError>>>,
    ),
) -> Result<(Check, u64, u64), Failure> {
    let store = server.store.clone();
    let n = name.clone();
    let index = async move {
        // The tree read early, if it is of the version seen; else read again, checked.
        if let Some(Ok(Ok((key, tree)))) = match early {
            Some(task) => Some(task.await),
            None => None,
        } && old.is(&key)
        {
            return Ok(Index::of(&tree));
        }
        blocking(move || store.tree(&n, old.blake3, kind).map(|t| Index::of(&t))).await
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
