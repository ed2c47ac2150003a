//! The asking side: each request sent and its answer read, checked and typed; an upload's
//! request and (for a replace) the signatures the peer asks for before the bytes it lacks.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt, AsyncWriteExt};

use crate::model::delta::{Sig, Tree};
use crate::model::manifest::{ChunkSet, FilePath, Hash32, Manifest, piece_size_for, unit_count};
use crate::wire::codec;
use crate::wire::protocol::{
    self, Delta, ErrorKind, FileEntry, FolderEntry, Incomplete, MAX_RESPONSE_LEN, Request, Response,
};

use super::*;

/// Sends `req`, finishing our side if `finish`, and reads the first response.
pub(super) async fn ask(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    req: &Request,
    finish: bool,
) -> Result<Response, ExchangeError> {
    protocol::write_msg(send, req).await?;
    if finish {
        // Fails only if the stream was already reset, which the read reports.
        let _ = send.shutdown().await;
    }
    response(recv).await
}

/// Reads one response; an error answer becomes [`ExchangeError::Remote`].
pub(super) async fn response(
    recv: &mut (impl AsyncRead + Unpin),
) -> Result<Response, ExchangeError> {
    match protocol::read_msg(recv, MAX_RESPONSE_LEN).await? {
        Response::Error(e) => Err(e.into()),
        r => Ok(r),
    }
}

/// `List`: the files the peer serves (the first [`MAX_LISTED_FILES`] if there are more), and how
/// many it serves.
pub async fn list(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
) -> Result<(Vec<FileEntry>, u64), ExchangeError> {
    match ask(send, recv, &Request::List, true).await? {
        Response::Files(files) => {
            let n = files.len() as u64;
            Ok((files, n))
        }
        Response::FilesCut { files, total } => Ok((files, total)),
        _ => Err(ExchangeError::Unexpected("list")),
    }
}

/// `Describe`: the manifest of `name`, or `None` if the peer does not serve it.
pub async fn describe(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    name: &FilePath,
) -> Result<Option<Manifest>, ExchangeError> {
    let req = Request::Describe { name: name.clone() };
    match ask(send, recv, &req, true).await {
        Ok(Response::Manifest(m)) => Ok(Some(m)),
        Ok(_) => Err(ExchangeError::Unexpected("describe")),
        Err(ExchangeError::Remote(e)) if e.kind == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// `ReadChunk`: `len` bytes of `name` at `offset`, unverified (the caller checks them).
///
/// `len` is what we asked for, bounded by our own manifest, so the buffer is ours to size. The
/// bytes start on a page boundary inside it, so the store can write them with O_DIRECT (no
/// page-cache copy), and they are appended as the stream hands them over: one copy, and no
/// zeroing of a buffer about to be overwritten.
pub async fn read_chunk(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    name: &FilePath,
    offset: u64,
    len: u32,
) -> Result<Received, ExchangeError> {
    let req = Request::ReadChunk {
        name: name.clone(),
        offset,
        len,
    };
    read_bytes(send, recv, &req, len).await
}

/// `ReadFile`: the whole of version `blake3` of a small file of `size` bytes, unverified.
pub async fn read_file(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    name: &FilePath,
    blake3: Hash32,
    size: u32,
) -> Result<Received, ExchangeError> {
    let req = Request::ReadFile {
        name: name.clone(),
        blake3,
        size,
    };
    read_bytes(send, recv, &req, size).await
}

/// What changed in a synced folder, as [`Response::SyncIndex`] answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPage {
    /// The records, their sequence numbers increasing.
    pub records: Vec<protocol::SyncRecord>,
    /// The answerer's last sequence number.
    pub last: u64,
    /// More records follow (ask again from the last record's sequence).
    pub more: bool,
}

/// `SyncIndex`: what changed in synced folder `folder` after `since`, waiting up to `wait_ms`
/// for a change. An answer that breaks the rules (sequence numbers out of order or outside
/// `since..=last`, too many records, a bad version vector or peer) is refused.
pub async fn sync_index(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    folder: &str,
    since: u64,
    wait_ms: u32,
) -> Result<SyncPage, ExchangeError> {
    let request = Request::SyncIndex {
        folder: folder.to_owned(),
        since,
        wait_ms,
    };
    let Response::SyncIndex {
        records,
        last,
        more,
    } = ask(send, recv, &request, true).await?
    else {
        return Err(ExchangeError::Unexpected("sync index"));
    };
    let ordered = records.windows(2).all(|w| w[0].sequence < w[1].sequence);
    let within = records
        .iter()
        .all(|r| r.sequence > since && r.sequence <= last);
    let valid = records.iter().all(|r| {
        r.version.vector.check().is_ok()
            && r.version.by.parse::<crate::model::peers::PeerId>().is_ok()
            && r.version.vector.get(&r.version.by) > 0
    });
    if records.len() > protocol::SYNC_PAGE || !ordered || !within || !valid {
        return Err(ExchangeError::Unexpected(
            "sync index (impossible sequence numbers or versions)",
        ));
    }
    Ok(SyncPage {
        records,
        last,
        more,
    })
}

/// One level of a folder, as [`Response::Folder`] answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    /// The folder's version.
    pub version: Hash32,
    /// The files directly in it, sorted by name, each one component.
    pub files: Vec<FileEntry>,
    /// The folders directly in it, sorted by name, each one component.
    pub folders: Vec<FolderEntry>,
    /// Too many to answer: list the tree instead.
    pub cut: bool,
}

/// `Folder`: one level of folder `path` (`None`: the peer serves no file under it).
pub async fn folder_level(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    path: &FilePath,
    fresh: bool,
) -> Result<Option<Level>, ExchangeError> {
    let request = Request::Folder {
        path: path.clone(),
        fresh,
    };
    let (version, files, folders, cut) = match ask(send, recv, &request, true).await {
        Ok(Response::Folder {
            version,
            files,
            folders,
            cut,
        }) => (version, files, folders, cut),
        Ok(_) => return Err(ExchangeError::Unexpected("folder")),
        Err(ExchangeError::Remote(e)) if e.kind == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // Names of one component each, sorted, a name never both a file and a folder.
    let one = |n: &FilePath| n.is_top_level();
    let sorted = files.windows(2).all(|w| w[0].name < w[1].name)
        && folders.windows(2).all(|w| w[0].name < w[1].name);
    let clash = folders
        .iter()
        .any(|d| files.binary_search_by(|f| f.name.cmp(&d.name)).is_ok());
    if !files.iter().all(|f| one(&f.name))
        || !folders.iter().all(|d| one(&d.name))
        || !sorted
        || clash
    {
        return Err(ExchangeError::Unexpected("folder"));
    }
    Ok(Some(Level {
        version,
        files,
        folders,
        cut,
    }))
}

/// `ReadRange`: `len` bytes of `name` at any `offset` (at most one chunk), unverified.
pub async fn read_range(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    name: &FilePath,
    offset: u64,
    len: u32,
) -> Result<Received, ExchangeError> {
    let req = Request::ReadRange {
        name: name.clone(),
        offset,
        len,
    };
    read_bytes(send, recv, &req, len).await
}

/// The bytes a read brought: the plain bytes asked for, and how many crossed the wire for them.
#[derive(Debug, Clone, Default)]
pub struct Received {
    /// The plain bytes (unverified).
    pub data: Bytes,
    /// The bytes of the reply's body on the wire: `data`'s length, or less if it was compressed.
    pub wire: u64,
}

/// Sends `req` and reads the `len` bytes that follow a `Chunk` header raw, or a `Zstd` header as
/// one frame (decompressed off the async workers, into room for exactly `len` bytes).
pub(super) async fn read_bytes(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    req: &Request,
    len: u32,
) -> Result<Received, ExchangeError> {
    let want = len as usize;
    let header = ask(send, recv, req, true).await?;
    // Room for the bytes only once they are coming: a request waiting behind others at its
    // source holds no buffer (with one each, a download's peak RSS grew by a third).
    let mut buf: Vec<u8> = Vec::with_capacity(want + PAGE);
    let start = buf.as_ptr().align_offset(PAGE).min(PAGE);
    buf.resize(start, 0);
    let wire = match header {
        Response::Chunk { len: l } if l == len => {
            read_to(recv, &mut buf, want).await?;
            want
        }
        Response::Zstd { len: l, wire } if l == len && wire < len => {
            let wire = wire as usize;
            let mut frame = Vec::with_capacity(wire);
            read_to(recv, &mut frame, wire).await?;
            let unpacked = tokio::task::spawn_blocking(move || {
                codec::decompress_into(&frame, want, &mut buf).map(|()| buf)
            })
            .await
            .map_err(|e| broken(e.to_string()))?;
            buf = unpacked.map_err(|e| ExchangeError::Protocol(e.into()))?;
            wire
        }
        _ => return Err(ExchangeError::Unexpected(req.kind())),
    };
    Ok(Received {
        data: Bytes::from(buf).slice(start..start + want),
        wire: wire as u64,
    })
}

/// Appends exactly `n` bytes of `recv` to `buf`.
pub(super) async fn read_to(
    recv: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    n: usize,
) -> Result<(), ExchangeError> {
    let end = buf.len() + n;
    let mut body = recv.take(n as u64);
    while buf.len() < end {
        match body.read_buf(buf).await {
            Ok(0) => {
                let got = n - (end - buf.len());
                return Err(broken(format!("stream ended after {got} of {n} bytes")));
            }
            Ok(_) => {}
            Err(e) => return Err(broken(e.to_string())),
        }
    }
    Ok(())
}

/// `ReadVersion`: chunk of version `blake3` of `name` at `offset` (`len` bytes), from the whole
/// file or a download in progress; unverified.
pub async fn read_version(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    name: &FilePath,
    blake3: Hash32,
    offset: u64,
    len: u32,
) -> Result<Received, ExchangeError> {
    let req = Request::ReadVersion {
        name: name.clone(),
        blake3,
        offset,
        len,
    };
    read_bytes(send, recv, &req, len).await
}

/// What a peer holds of a file, as `Observe` or `ObservePieces` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The version.
    pub manifest: Manifest,
    /// The chunks it holds (its pieces, if `in_pieces`), if not the whole file (a download in
    /// progress).
    pub held: Option<ChunkSet>,
    /// Whether `held` and the updates after it count pieces, not chunks.
    pub in_pieces: bool,
    /// The version in pieces, checked against `manifest`, if the peer sent its pieces' hashes.
    pub pieces: Option<Manifest>,
}

/// `Observe` (or, `in_pieces`, `ObservePieces`): what the peer holds of `name` (`None`:
/// nothing). For a download in progress the stream stays open: [`next_change`] reads what it
/// gains.
pub async fn observe(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    name: &FilePath,
    in_pieces: bool,
) -> Result<Option<Offer>, ExchangeError> {
    let name = name.clone();
    let req = match in_pieces {
        true => Request::ObservePieces { name },
        false => Request::Observe { name },
    };
    let (manifest, held, in_pieces, pieces) = match ask(send, recv, &req, true).await {
        Ok(Response::Holding { manifest, held }) if !in_pieces => (manifest, held, false, None),
        Ok(Response::HoldingPieces {
            manifest,
            pieces,
            held,
        }) if in_pieces => {
            let in_pieces = piece_size_for(manifest.size()).is_some();
            let refined = match pieces.is_empty() {
                true => None,
                // Hashes that do not merge to the manifest's: the peer lies.
                false => {
                    Some((manifest.refine(pieces)).ok_or(ExchangeError::Unexpected("observe"))?)
                }
            };
            (manifest, held, in_pieces, refined)
        }
        Ok(_) => return Err(ExchangeError::Unexpected("observe")),
        Err(ExchangeError::Remote(e)) if e.kind == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let units = unit_count(manifest.size(), in_pieces);
    let held = match held {
        None => None,
        Some(bits) => {
            Some(ChunkSet::from_bytes(units, &bits).ok_or(ExchangeError::Unexpected("observe"))?)
        }
    };
    Ok(Some(Offer {
        manifest,
        held,
        in_pieces,
        pieces,
    }))
}

/// What an observed download in progress did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// It verified these chunks.
    Gained(Vec<u32>),
    /// It finished: the whole file is served.
    Complete,
}

/// The next change of an observed download in progress of a file of `chunks` chunks.
pub async fn next_change(
    recv: &mut (impl AsyncRead + Unpin),
    chunks: u32,
) -> Result<Change, ExchangeError> {
    match response(recv).await? {
        Response::Have(gained) if gained.iter().all(|&i| i < chunks) => Ok(Change::Gained(gained)),
        Response::Complete => Ok(Change::Complete),
        _ => Err(ExchangeError::Unexpected("observe")),
    }
}

/// `ListAll`: the whole files (the first [`MAX_LISTED_FILES`]), how many there are, and the
/// downloads in progress.
pub async fn list_all(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
) -> Result<(Vec<FileEntry>, u64, Vec<Incomplete>), ExchangeError> {
    match ask(send, recv, &Request::ListAll, true).await? {
        Response::Listing {
            files,
            total,
            incomplete,
        } => Ok((files, total, incomplete)),
        _ => Err(ExchangeError::Unexpected("list")),
    }
}

/// `Groups`: the group signatures of version `blake3` of `name`.
pub async fn groups(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    name: &FilePath,
    blake3: Hash32,
) -> Result<Vec<Sig>, ExchangeError> {
    let req = Request::Groups {
        name: name.clone(),
        blake3,
    };
    match ask(send, recv, &req, true).await? {
        Response::Groups(g) => Ok(g),
        _ => Err(ExchangeError::Unexpected("groups")),
    }
}

/// `Leaves`: the leaf signatures of groups `first..first + count` of version `blake3` of `name`.
pub async fn leaves(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    name: &FilePath,
    blake3: Hash32,
    first: u32,
    count: u32,
) -> Result<Vec<Sig>, ExchangeError> {
    let req = Request::Leaves {
        name: name.clone(),
        blake3,
        first,
        count,
    };
    match ask(send, recv, &req, true).await? {
        Response::Leaves(l) => Ok(l),
        _ => Err(ExchangeError::Unexpected("leaves")),
    }
}

/// `Upload` (or `Replace`, if `replace`): sends `size` bytes read from `file` as `name` (hashing to
/// `blake3`).
///
/// With `replace`, which yields the file's content-defined tree (it may still be computing while
/// the request travels), a peer holding another version asks for only what it lacks (see
/// [`Delta`]).
#[allow(clippy::too_many_arguments)]
pub async fn upload(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    name: &FilePath,
    (size, blake3): (u64, Hash32),
    replace: Option<impl Future<Output = Result<Arc<Tree>, std::io::Error>>>,
    file: &mut (impl AsyncRead + AsyncSeek + Unpin),
    framing: Framing<'_>,
) -> Result<UploadStatus, ExchangeError> {
    let name = name.clone();
    let req = if replace.is_some() {
        Request::Replace { name, size, blake3 }
    } else {
        Request::Upload { name, size, blake3 }
    };
    match (ask(send, recv, &req, false).await?, replace) {
        (Response::Ready, _) => send_body(send, size, file, framing).await?,
        (Response::AlreadyPresent, _) => return Ok(UploadStatus::AlreadyPresent),
        (Response::SendDelta, Some(tree)) => {
            let tree = tree.await.map_err(ExchangeError::Local)?;
            send_delta(send, recv, &tree, file, framing).await?
        }
        _ => return Err(ExchangeError::Unexpected("upload")),
    }
    let _ = send.shutdown().await;
    match response(recv).await? {
        Response::Stored => Ok(UploadStatus::Stored),
        Response::AlreadyPresent => Ok(UploadStatus::AlreadyPresent),
        Response::Replaced => Ok(UploadStatus::Replaced),
        _ => Err(ExchangeError::Unexpected("upload")),
    }
}

/// The requester's side of [`Delta`]: offers `tree`'s groups, then their leaves, then sends the
/// leaves the peer lacks. Leaves the file positioned at its end (nothing more to send).
pub(super) async fn send_delta(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    tree: &Tree,
    file: &mut (impl AsyncRead + AsyncSeek + Unpin),
    framing: Framing<'_>,
) -> Result<(), ExchangeError> {
    let groups = tree.group_sigs();
    protocol::write_msg(send, &Delta::Groups(groups.clone())).await?;
    let missing = lacking(recv, groups.len()).await?;
    let offsets = tree.leaf_offsets();
    let mut leaves = Vec::new();
    let mut at = Vec::new();
    for &g in &missing {
        let (_, first, n) = tree.groups[g as usize];
        for k in first..first + n {
            leaves.push(tree.leaves[k as usize]);
            at.push(offsets[k as usize]);
        }
    }
    protocol::write_msg(send, &Delta::Leaves(leaves.clone())).await?;
    let wanted = lacking(recv, leaves.len()).await?;
    // Leaves go out gathered into pieces of up to UPLOAD_BUF bytes (one block each, framed).
    let mut piece: Vec<u8> = Vec::with_capacity(UPLOAD_BUF);
    for &k in &wanted {
        let (off, len) = (at[k as usize], leaves[k as usize].len as usize);
        file.seek(std::io::SeekFrom::Start(off))
            .await
            .map_err(ExchangeError::Local)?;
        let end = piece.len();
        piece.resize(end + len, 0);
        file.read_exact(&mut piece[end..])
            .await
            .map_err(ExchangeError::Local)?;
        if piece.len() >= UPLOAD_BUF {
            write_block(send, framing, &piece, true).await?;
            piece.clear();
        }
    }
    if !piece.is_empty() {
        write_block(send, framing, &piece, true).await?;
    }
    file.seek(std::io::SeekFrom::End(0))
        .await
        .map_err(ExchangeError::Local)?;
    Ok(())
}

/// Reads a `Lacking` frame: ascending indices below `below`.
pub(super) async fn lacking(
    recv: &mut (impl AsyncRead + Unpin),
    below: usize,
) -> Result<Vec<u32>, ExchangeError> {
    match protocol::read_msg(recv, MAX_RESPONSE_LEN).await? {
        Delta::Lacking(v)
            if v.windows(2).all(|w| w[0] < w[1])
                && v.last().is_none_or(|&l| (l as usize) < below) =>
        {
            Ok(v)
        }
        _ => Err(ExchangeError::Unexpected("replace")),
    }
}

/// One page of a peer's tree (`ListPage`).
#[derive(Debug)]
pub struct Page {
    /// Files by path, all after the page asked after.
    pub files: Vec<FileEntry>,
    /// Downloads in progress (on the first page).
    pub incomplete: Vec<Incomplete>,
    /// Another page follows.
    pub more: bool,
}

/// `ListPage` (`qnode/3`): the page of the peer's tree after `after`. A page out of order, not
/// after `after`, or empty while saying more follow is an unexpected answer, so an asker paging
/// to the end always ends.
pub async fn list_page(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    after: Option<&FilePath>,
) -> Result<Page, ExchangeError> {
    let request = Request::ListPage {
        after: after.cloned(),
    };
    let Response::Page {
        files,
        incomplete,
        more,
    } = ask(send, recv, &request, true).await?
    else {
        return Err(ExchangeError::Unexpected("list"));
    };
    let ordered = files.windows(2).all(|w| w[0].name < w[1].name);
    let after_last = files
        .first()
        .is_none_or(|f| after.is_none_or(|a| f.name > *a));
    if !ordered || !after_last || (more && files.is_empty()) {
        return Err(ExchangeError::Unexpected("list"));
    }
    Ok(Page {
        files,
        incomplete,
        more,
    })
}

/// `Introduce`: where `peer` is, as the answerer (an introducer it keeps a connection to) sees
/// it, once it was asked to open its NAT toward us.
pub async fn introduce(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    peer: &str,
) -> Result<std::net::SocketAddr, ExchangeError> {
    let peer = peer.to_owned();
    where_to_dial(send, recv, &Request::Introduce { peer }, "introduce").await
}

/// `Relay`: where to dial to reach `peer` through the answerer's relay.
pub async fn relay(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    peer: &str,
) -> Result<std::net::SocketAddr, ExchangeError> {
    let peer = peer.to_owned();
    where_to_dial(send, recv, &Request::Relay { peer }, "relay").await
}

/// Asks `request` (an introduction or a relay) and reads the address it answers with.
async fn where_to_dial(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    request: &Request,
    what: &'static str,
) -> Result<std::net::SocketAddr, ExchangeError> {
    match ask(send, recv, request, true).await? {
        Response::Introduced { addr } => Ok(addr),
        _ => Err(ExchangeError::Unexpected(what)),
    }
}

/// `Punch`: asks a peer keeping a connection to us to send a few datagrams to `addr`, where
/// `peer` will dial it from.
pub async fn punch(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    peer: &str,
    addr: std::net::SocketAddr,
) -> Result<(), ExchangeError> {
    let request = Request::Punch {
        peer: peer.to_owned(),
        addr,
    };
    match ask(send, recv, &request, true).await? {
        Response::Punched => Ok(()),
        _ => Err(ExchangeError::Unexpected("punch")),
    }
}
