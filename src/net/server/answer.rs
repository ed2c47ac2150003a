//! Answering: one request read from its stream (within [`READ_TIMEOUT`]), dispatched to its
//! handler, logged once; and the handlers of the requests that read (listings, manifests, chunks
//! and ranges, delta trees). Every answer's memory is claimed from the peer's share before it is
//! built ([`reply`]). Written over [`Answering`] and any reader, so the tests run them over a
//! pipe.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::io::AsyncRead;
use tracing::{debug, info, warn};

use super::uploads::{self, UploadRequest};
use super::{
    Answering, Failure, Link, PLAIN_AFTER_MISS, READ_TIMEOUT, Server, blocking, gone,
    manifest_bytes, observe, reply, store_error,
};
use crate::model::delta::SigKind;
use crate::model::folder;
use crate::model::manifest::{FilePath, Hash32, MAX_CHUNK_SIZE, Manifest};
use crate::wire::codec;
use crate::wire::exchange::{self, respond};
use crate::wire::protocol::{
    self, ErrorKind, FileEntry, FolderEntry, Incomplete, MAX_GROUPS_PER_REQUEST, RemoteError,
    Request, Response,
};

/// Reads one request from `recv`, answers it on `send`, and logs what happened.
pub(super) async fn handle(
    send: &mut impl Answering,
    recv: &mut (impl AsyncRead + Unpin + Send),
    server: &Server,
    link: &Link,
) {
    let request = match tokio::time::timeout(READ_TIMEOUT, exchange::read_request(recv)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            info!("bad request: {e}");
            let err = RemoteError::new(
                ErrorKind::BadRequest,
                format!("unsupported or malformed request: {e}"),
            );
            respond(send, &Response::Error(err)).await;
            return;
        }
        Err(_) => {
            info!("no request within {READ_TIMEOUT:?}");
            send.reset();
            return;
        }
    };
    let kind = request.kind();
    if let Some(err) = beyond_version(&request, link) {
        info!("{kind} refused: {}", err.message);
        respond(send, &Response::Error(err)).await;
        return;
    }
    let outcome = dispatch(request, send, recv, server, link).await;
    match outcome {
        Ok(summary) => info!("{kind} {summary}"),
        Err(Failure::Refused(err)) => {
            info!("{kind} refused: {}", err.message);
            respond(send, &Response::Error(err)).await;
        }
        // The requester cancelled (e.g. another peer delivered that chunk first) or went away.
        Err(Failure::Gone(why)) => debug!("{kind} abandoned: {why}"),
    }
}

/// Runs `request`'s handler: what to log, or why it failed.
async fn dispatch(
    request: Request,
    send: &mut impl Answering,
    recv: &mut (impl AsyncRead + Unpin + Send),
    server: &Server,
    link: &Link,
) -> Result<String, Failure> {
    let sig = link.version.sig_kind();
    match request {
        Request::List => handle_list(send, server, link).await,
        Request::Describe { name } => handle_describe(send, server, link, &name).await,
        Request::ReadChunk { name, offset, len } => {
            let kind = ReadKind::Chunk;
            handle_read(send, server, link, &name, (offset, len), kind).await
        }
        Request::ReadRange { name, offset, len } => {
            let kind = ReadKind::Range;
            handle_read(send, server, link, &name, (offset, len), kind).await
        }
        Request::Groups { name, blake3 } => {
            handle_groups(send, server, link, &name, (blake3, sig)).await
        }
        Request::Leaves {
            name,
            blake3,
            first,
            count,
        } => {
            let range = (first, count);
            handle_leaves(send, server, link, &name, (blake3, sig), range).await
        }
        Request::Upload { name, size, blake3 } => {
            let up = UploadRequest::new(size, blake3, false);
            uploads::handle_upload(send, recv, server, link, &name, up).await
        }
        Request::Replace { name, size, blake3 } => {
            let up = UploadRequest::new(size, blake3, true);
            uploads::handle_upload(send, recv, server, link, &name, up).await
        }
        Request::Observe { name } => {
            observe::handle_observe(send, server, link, &name, false).await
        }
        Request::ObservePieces { name } => {
            observe::handle_observe(send, server, link, &name, true).await
        }
        Request::ReadVersion {
            name,
            blake3,
            offset,
            len,
        } => {
            let kind = ReadKind::Version(blake3);
            handle_read(send, server, link, &name, (offset, len), kind).await
        }
        Request::ListAll => handle_list_all(send, server, link).await,
        Request::ListPage { after } => handle_list_page(send, server, link, after).await,
        Request::Folder { path, fresh } => handle_folder(send, server, link, path, fresh).await,
        Request::ReadFile { name, blake3, size } => {
            let kind = ReadKind::Whole(blake3);
            handle_read(send, server, link, &name, (0, size), kind).await
        }
        Request::SyncIndex {
            folder,
            since,
            wait_ms,
        } => super::synced::handle_sync_index(send, server, link, folder, since, wait_ms).await,
        Request::Introduce { peer } => {
            super::introduce::handle_introduce(send, server, link, peer).await
        }
        Request::Relay { peer } => super::relay::handle_relay(send, server, link, peer).await,
        Request::Punch { .. } => Err(RemoteError::new(
            ErrorKind::BadRequest,
            "punch is asked by an introducer of a peer that dialled it",
        )
        .into()),
    }
}

/// Why a peer of an older version may not ask `request`: it neither sees nor names a file in a
/// folder.
fn beyond_version(request: &Request, link: &Link) -> Option<RemoteError> {
    let name = request.name()?;
    if name.is_top_level() || link.version.has_folders() {
        return None;
    }
    let why = format!("{name} is in a folder, and folders need qnode/3");
    Some(RemoteError::new(ErrorKind::NotFound, why))
}

/// Bytes a listing entry takes in an answer.
const ENTRY_BYTES: usize = 64 + 255;

/// The listing entries of `files`.
fn file_entries(files: Vec<(FilePath, Arc<Manifest>)>) -> Vec<FileEntry> {
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

async fn handle_list(
    send: &mut impl Answering,
    server: &Server,
    link: &Link,
) -> Result<String, Failure> {
    let store = server.store.clone();
    let mut files = blocking(move || store.list()).await?;
    files.retain(|(name, _)| link.version.has_folders() || name.is_top_level());
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
    send: &mut impl Answering,
    server: &Server,
    link: &Link,
) -> Result<String, Failure> {
    let store = server.store.clone();
    let (mut files, held) = blocking(move || Ok((store.list()?, store.held_all()?))).await?;
    files.retain(|(name, _)| link.version.has_folders() || name.is_top_level());
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

/// One page of the whole tree after `after` (`qnode/3`), with the downloads in progress on the
/// first page.
async fn handle_list_page(
    send: &mut impl Answering,
    server: &Server,
    link: &Link,
    after: Option<FilePath>,
) -> Result<String, Failure> {
    let store = server.store.clone();
    let first = after.is_none();
    let (files, held) = blocking(move || {
        let held = if first { store.held_all()? } else { Vec::new() };
        Ok((store.listing(first)?, held))
    })
    .await?;
    let start = match &after {
        Some(a) => files.partition_point(|(name, _)| name <= a),
        None => 0,
    };
    let end = (start + protocol::PAGE_FILES).min(files.len());
    let more = end < files.len();
    let page: Vec<_> = files[start..end].to_vec();
    drop(files);
    let count = page.len();
    let estimate = (count + held.len().min(protocol::MAX_LISTED_FILES)) * PAGE_ENTRY_BYTES;
    let build = || {
        let incomplete = (held.into_iter().take(protocol::MAX_LISTED_FILES))
            .map(|(name, h)| Incomplete::new(name, &h.manifest, h.bytes()))
            .collect();
        Response::Page {
            files: file_entries(page),
            incomplete,
            more,
        }
    };
    reply(send, link, estimate, build, false).await?;
    Ok(format!(
        "-> {count} files{}",
        if more { ", more" } else { "" }
    ))
}

async fn handle_folder(
    send: &mut impl Answering,
    server: &Server,
    link: &Link,
    path: FilePath,
    fresh: bool,
) -> Result<String, Failure> {
    link.needs_qnode3("folders")?;
    let store = server.store.clone();
    let p = path.clone();
    let level = blocking(move || {
        let listed = store.listing(fresh)?;
        // The files under the folder are next to each other in path order.
        let prefix = format!("{p}/");
        let start = listed.partition_point(|(n, _)| n.as_str() < prefix.as_str());
        let under = || {
            listed[start..]
                .iter()
                .take_while(|(n, _)| n.as_str().starts_with(&prefix))
                .map(|(n, m)| (&n.as_str()[prefix.len()..], m.size(), m.blake3()))
        };
        // Summed straight from the listing: no copy of a large tree's paths per question.
        Ok(under()
            .next()
            .is_some()
            .then(|| folder::level_sorted(under())))
    })
    .await?;
    let Some(level) = level else {
        let why = format!("no file under {path}/");
        return Err(RemoteError::new(ErrorKind::NotFound, why).into());
    };
    let cut = level.files.len() + level.folders.len() > protocol::PAGE_FILES;
    let (count, dirs) = (level.files.len(), level.folders.len());
    let estimate = if cut {
        64
    } else {
        (count + dirs) * PAGE_ENTRY_BYTES
    };
    let build = || {
        let (files, folders) = if cut {
            (Vec::new(), Vec::new())
        } else {
            let files = (level.files.into_iter())
                .map(|e| FileEntry {
                    name: e.path,
                    size: e.size,
                    blake3: e.blake3,
                })
                .collect();
            let folders = (level.folders.into_iter())
                .map(|(name, files, version)| FolderEntry {
                    name,
                    files,
                    version,
                })
                .collect();
            (files, folders)
        };
        Response::Folder {
            version: level.version,
            files,
            folders,
            cut,
        }
    };
    reply(send, link, estimate, build, false).await?;
    Ok(format!("{path}/ -> {count} files, {dirs} folders"))
}

/// Bytes a page's entry takes in an answer, with the longest path.
const PAGE_ENTRY_BYTES: usize = 64 + crate::model::name::MAX_PATH_LEN;

async fn handle_describe(
    send: &mut impl Answering,
    server: &Server,
    link: &Link,
    name: &FilePath,
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
    /// The whole of this version of a small file.
    Whole(Hash32),
}

async fn handle_read(
    send: &mut impl Answering,
    server: &Server,
    link: &Link,
    name: &FilePath,
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
            ReadKind::Range => store.read_range(&n, offset, len),
            ReadKind::Version(blake3) => store.read_version(&n, &blake3, offset, len),
            ReadKind::Whole(blake3) => store.read_whole(&n, &blake3, len),
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
    send: &mut impl Answering,
    server: &Server,
    link: &Link,
    name: &FilePath,
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
    send: &mut impl Answering,
    server: &Server,
    link: &Link,
    name: &FilePath,
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
