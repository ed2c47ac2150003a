//! Every request/response exchange, written once: the requester's side and the responder's side
//! of list, describe, read chunk, upload, replace and observe, over any `AsyncRead`/`AsyncWrite` pair (a QUIC stream
//! in `client` and `server`, `tokio::io::duplex` in the tests below). The stream lifecycles are in
//! `protocol`'s documentation; a transform of the bytes (compression, say) has this one place to go.
//!
//! Requesters get [`ExchangeError`]s; who the peer is and what its connection says are added by
//! the caller. Responders get the decoded request from [`read_request`] and answer with the
//! functions named after the answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

use crate::model::delta::{self, Index, Sig, Step, Tree};
use crate::model::manifest::{ChunkSet, FileName, Hash32, Manifest, piece_size_for, unit_count};
use crate::wire::codec;
use crate::wire::protocol::{
    self, Delta, ErrorKind, FileEntry, Incomplete, MAX_LISTED_FILES, MAX_REQUEST_LEN,
    MAX_RESPONSE_LEN, ProtocolError, RemoteError, Request, Response,
};

/// Alignment of chunk buffers, for direct I/O.
const PAGE: usize = 4096;
/// Upload stream buffer, in bytes.
const UPLOAD_BUF: usize = 256 * 1024;

/// A stream that can take owned bytes without copying them (a QUIC send stream hands them to
/// the connection as they are). The default copies, as any `AsyncWrite` does.
pub trait SendBytes: AsyncWrite + Unpin + Send {
    /// Writes all of `bufs`, in order.
    fn send_bytes(
        &mut self,
        bufs: &mut [Bytes],
    ) -> impl Future<Output = std::io::Result<()>> + Send {
        async move {
            for b in bufs.iter() {
                self.write_all(b).await?;
            }
            Ok(())
        }
    }
}

impl SendBytes for tokio::io::DuplexStream {}
impl<T: AsyncWrite + Send> SendBytes for tokio::io::WriteHalf<T> {}

/// What an upload achieved at one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadStatus {
    /// The peer stored the file.
    Stored,
    /// The peer already served an identical file.
    AlreadyPresent,
    /// The peer replaced its other version of the name with ours (keeping its old one hidden).
    Replaced,
}

/// A requester's exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The stream failed or carried bad data.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The peer answered with an error.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The peer answered with something that does not fit the request.
    #[error("unexpected answer to {0}")]
    Unexpected(&'static str),
    /// Our own file could not be read.
    #[error("{0}")]
    Local(std::io::Error),
}

fn broken(why: String) -> ExchangeError {
    ProtocolError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, why)).into()
}

/// Sends `req`, finishing our side if `finish`, and reads the first response.
async fn ask(
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
async fn response(recv: &mut (impl AsyncRead + Unpin)) -> Result<Response, ExchangeError> {
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
    name: &FileName,
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
    name: &FileName,
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

/// `ReadRange`: `len` bytes of `name` at any `offset` (at most one chunk), unverified.
pub async fn read_range(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    name: &FileName,
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
#[derive(Debug, Clone)]
pub struct Received {
    /// The plain bytes (unverified).
    pub data: Bytes,
    /// The bytes of the reply's body on the wire: `data`'s length, or less if it was compressed.
    pub wire: u64,
}

/// Sends `req` and reads the `len` bytes that follow a `Chunk` header raw, or a `Zstd` header as
/// one frame (decompressed off the async workers, into room for exactly `len` bytes).
async fn read_bytes(
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
async fn read_to(
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
    name: &FileName,
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
    name: &FileName,
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
    name: &FileName,
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
    name: &FileName,
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
    name: &FileName,
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
async fn send_delta(
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
async fn lacking(
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

/// How an upload's bytes travel: raw (`qnode/1`), or in blocks (`qnode/2`, see `protocol`), each
/// compressed as the mode says for the pace the upload gets (and if the bytes shrink).
#[derive(Debug, Clone, Copy)]
pub enum Framing<'a> {
    /// Raw bytes.
    Raw,
    /// Blocks.
    Blocks(codec::Mode, &'a codec::Pace),
}

/// Writes `data`, the next bytes of an upload body (of an `edit`'s leaves: compressed as
/// [`codec::Mode::edit_level`] says).
async fn write_block(
    send: &mut impl SendBytes,
    framing: Framing<'_>,
    data: &[u8],
    edit: bool,
) -> Result<(), ExchangeError> {
    let gone = |e: std::io::Error| ExchangeError::Protocol(e.into());
    let Framing::Blocks(mode, pace) = framing else {
        return send.write_all(data).await.map_err(gone);
    };
    for block in data.chunks(codec::MAX_BLOCK as usize) {
        let level = if edit {
            mode.edit_level(pace)
        } else {
            mode.level(pace)
        };
        let packed = match level {
            Some(level) => {
                let b = block.to_vec();
                tokio::task::spawn_blocking(move || codec::compress(&b, level))
                    .await
                    .unwrap_or_default()
            }
            None => None,
        };
        let wire = packed.as_deref().unwrap_or(block);
        let mut head = [0u8; 8];
        // Both fit a u32: a block is at most MAX_BLOCK, a frame no longer than its block.
        head[..4].copy_from_slice(&(block.len() as u32).to_be_bytes());
        head[4..].copy_from_slice(&(wire.len() as u32).to_be_bytes());
        send.write_all(&head).await.map_err(gone)?;
        send.write_all(wire).await.map_err(gone)?;
        pace.sent(block.len() as u64, wire.len() as u64);
    }
    Ok(())
}

/// An upload body as it arrives: raw, or (`qnode/2`) blocks, decoded as they come.
struct BodyIn<'a, R> {
    recv: &'a mut R,
    framed: bool,
    /// The current block's plain bytes, and how many of them were read.
    block: Vec<u8>,
    at: usize,
    /// Bytes read off the stream.
    wire: u64,
}

impl<'a, R: AsyncRead + Unpin> BodyIn<'a, R> {
    fn new(recv: &'a mut R, framed: bool) -> Self {
        Self {
            recv,
            framed,
            block: Vec::new(),
            at: 0,
            wire: 0,
        }
    }

    /// Appends up to `max` bytes of the body to `buf`; 0 at its end.
    async fn read(&mut self, buf: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
        if !self.framed {
            let n = (&mut *self.recv).take(max as u64).read_buf(buf).await?;
            self.wire += n as u64;
            return Ok(n);
        }
        if self.at == self.block.len() && !self.next_block().await? {
            return Ok(0);
        }
        let n = max.min(self.block.len() - self.at);
        buf.extend_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }

    /// Fills `out` from the body.
    async fn read_exact(&mut self, out: &mut [u8]) -> std::io::Result<()> {
        if !self.framed {
            self.recv.read_exact(out).await?;
            self.wire += out.len() as u64;
            return Ok(());
        }
        let mut got = Vec::with_capacity(out.len());
        while got.len() < out.len() {
            let want = out.len() - got.len();
            if self.read(&mut got, want).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        out.copy_from_slice(&got);
        Ok(())
    }

    /// Reads and decodes the next block (off the async workers); false at the body's end.
    async fn next_block(&mut self) -> std::io::Result<bool> {
        let mut head = [0u8; 8];
        let cut = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "a block cut short")
            }
            _ => e,
        };
        let n = self.recv.read(&mut head).await?;
        if n == 0 {
            return Ok(false);
        }
        self.recv.read_exact(&mut head[n..]).await.map_err(cut)?;
        let plain = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let wire = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if plain == 0 || plain > codec::MAX_BLOCK || wire > plain {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a block of {plain} bytes in {wire}"),
            ));
        }
        let mut frame = vec![0u8; wire as usize];
        self.recv.read_exact(&mut frame).await.map_err(cut)?;
        self.wire += 8 + u64::from(wire);
        self.block = tokio::task::spawn_blocking(move || codec::decode_block(plain, &frame))
            .await
            .map_err(std::io::Error::other)??;
        self.at = 0;
        Ok(true)
    }
}

/// Sends `size` bytes of `file`, from where it stands.
async fn send_body(
    send: &mut impl SendBytes,
    size: u64,
    file: &mut (impl AsyncRead + Unpin),
    framing: Framing<'_>,
) -> Result<(), ExchangeError> {
    let mut left = size;
    let mut buf = vec![0u8; UPLOAD_BUF];
    while left > 0 {
        let want = left.min(UPLOAD_BUF as u64) as usize;
        let n = file
            .read(&mut buf[..want])
            .await
            .map_err(ExchangeError::Local)?;
        if n == 0 {
            return Err(ExchangeError::Local(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank while uploading",
            )));
        }
        write_block(send, framing, &buf[..n], false).await?;
        left -= n as u64;
    }
    Ok(())
}

/// The responder's first step: the request (capped at [`MAX_REQUEST_LEN`]).
pub async fn read_request(recv: &mut (impl AsyncRead + Unpin)) -> Result<Request, ProtocolError> {
    protocol::read_msg(recv, MAX_REQUEST_LEN).await
}

/// Sends a final response and finishes the stream. Failures mean the peer went away: nothing to
/// do.
pub async fn respond(send: &mut impl SendBytes, resp: &Response) {
    if protocol::write_msg(send, resp).await.is_ok() {
        let _ = send.shutdown().await;
    }
}

/// Sends one encoded answer (`protocol::encode_frame`), and finishes the stream if `finish`
/// (else more messages follow on it).
pub async fn send_frame(
    send: &mut impl SendBytes,
    frame: Vec<u8>,
    finish: bool,
) -> std::io::Result<()> {
    send.write_all(&frame).await?;
    if finish {
        let _ = send.shutdown().await;
    }
    Ok(())
}

/// The answer to `List` with `files` (sorted by name): all of them, or the first
/// [`MAX_LISTED_FILES`] and how many there are.
pub fn listing(mut files: Vec<FileEntry>) -> Response {
    let total = files.len();
    files.truncate(MAX_LISTED_FILES);
    if total > files.len() {
        let total = total as u64;
        Response::FilesCut { files, total }
    } else {
        Response::Files(files)
    }
}

/// The answer to `ListAll` with `files` and `incomplete` (each sorted by name, each cut at
/// [`MAX_LISTED_FILES`]).
pub fn listing_all(mut files: Vec<FileEntry>, mut incomplete: Vec<Incomplete>) -> Response {
    let total = files.len() as u64;
    files.truncate(MAX_LISTED_FILES);
    incomplete.truncate(MAX_LISTED_FILES);
    Response::Listing {
        files,
        total,
        incomplete,
    }
}

/// The answer to `Observe`: the whole file (`held` is `None`; the stream ends after it), or a
/// download in progress (the stream stays open for [`send_have`], then `Complete`).
pub fn holding(manifest: &Manifest, held: Option<&ChunkSet>) -> Response {
    Response::Holding {
        manifest: manifest.clone(),
        held: held.map(ChunkSet::to_bytes),
    }
}

/// The answer to `ObservePieces`, like [`holding`], with the hashes of the file's pieces if
/// known (`pieces`, in pieces) and `held` counting pieces where the file has them.
pub fn holding_pieces(
    manifest: &Manifest,
    pieces: Option<&Manifest>,
    held: Option<&ChunkSet>,
) -> Response {
    Response::HoldingPieces {
        manifest: manifest.clone(),
        pieces: pieces.map(|p| p.hashes().to_vec()).unwrap_or_default(),
        held: held.map(ChunkSet::to_bytes),
    }
}

/// Answers `Observe` with what we hold: the whole file (`held` is `None`; the stream ends), or
/// a download in progress (the stream stays open for [`send_have`], then `Complete`).
pub async fn send_holding(
    send: &mut impl SendBytes,
    manifest: &Manifest,
    held: Option<&ChunkSet>,
) -> Result<(), ProtocolError> {
    let frame = protocol::encode_frame(&holding(manifest, held))?;
    send_frame(send, frame, held.is_none()).await?;
    Ok(())
}

/// Tells an observer the chunks our download in progress verified since the last message.
pub async fn send_have(send: &mut impl SendBytes, gained: Vec<u32>) -> Result<(), ProtocolError> {
    protocol::write_msg(send, &Response::Have(gained)).await
}

/// Answers a read with `len` bytes whole: `body` is those bytes (a `Chunk` header), or, if
/// `packed`, one zstd frame that holds them (a `Zstd` header); then the end.
pub async fn send_chunk(
    send: &mut impl SendBytes,
    len: usize,
    body: Bytes,
    packed: bool,
) -> Result<(), ProtocolError> {
    let too_large = |_| ProtocolError::TooLarge {
        len: u32::MAX,
        max: u32::MAX,
    };
    let len = u32::try_from(len).map_err(too_large)?;
    let header = match packed {
        true => Response::Zstd {
            len,
            wire: u32::try_from(body.len()).map_err(too_large)?,
        },
        false => Response::Chunk { len },
    };
    let header = protocol::encode_frame(&header)?;
    send.send_bytes(&mut [Bytes::from(header), body]).await?;
    let _ = send.shutdown().await;
    Ok(())
}

/// A failed read of an upload body: bytes that do not decode are the requester's fault (it is
/// told so); anything else means the stream broke.
fn body_error<E>(name: &FileName, e: std::io::Error) -> BodyError<E> {
    match e.kind() {
        std::io::ErrorKind::InvalidData => {
            BodyError::Refused(RemoteError::new(ErrorKind::Corrupt, format!("{name}: {e}")))
        }
        _ => BodyError::Gone(e),
    }
}

/// Why receiving an upload's bytes stopped.
#[derive(Debug, thiserror::Error)]
pub enum BodyError<E> {
    /// The requester sent more or fewer bytes than announced, or went silent.
    #[error(transparent)]
    Refused(RemoteError),
    /// The stream broke.
    #[error("stream failed: {0}")]
    Gone(std::io::Error),
    /// Storing a piece failed.
    #[error(transparent)]
    Sink(E),
}

/// Answers `Upload` with `Ready`, then receives exactly `size` bytes (raw, or in blocks if
/// `framed`), handing them to `sink` in pieces of up to `piece` bytes with their offsets. Each
/// read may take at most `timeout`. Returns the bytes that crossed the wire for them.
pub async fn receive_upload<E, F: Future<Output = Result<(), E>>>(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    name: &FileName,
    (size, framed): (u64, bool),
    piece: usize,
    timeout: Duration,
    mut sink: impl FnMut(u64, Vec<u8>) -> F,
) -> Result<u64, BodyError<E>> {
    protocol::write_msg(send, &Response::Ready)
        .await
        .map_err(|e| BodyError::Gone(std::io::Error::other(e)))?;
    let mut body = BodyIn::new(recv, framed);
    let mut received = 0u64;
    let mut buf: Vec<u8> = Vec::with_capacity(piece);
    loop {
        // Never more than announced: one byte past `size` is read to notice a longer body.
        let room = (piece - buf.len()) as u64;
        let want = room.min(size - received - buf.len() as u64 + 1);
        let n = match tokio::time::timeout(timeout, body.read(&mut buf, want as usize)).await {
            Err(_) => {
                return Err(BodyError::Refused(RemoteError::new(
                    ErrorKind::BadRequest,
                    format!("no upload data for {timeout:?}"),
                )));
            }
            Ok(Err(e)) => return Err(body_error(name, e)),
            Ok(Ok(n)) => n,
        };
        if received + buf.len() as u64 > size {
            return Err(BodyError::Refused(RemoteError::new(
                ErrorKind::Corrupt,
                format!("{name}: more bytes than the announced {size}"),
            )));
        }
        if buf.len() >= piece || (n == 0 && !buf.is_empty()) {
            let len = buf.len() as u64;
            let full = std::mem::replace(&mut buf, Vec::with_capacity(piece));
            sink(received, full).await.map_err(BodyError::Sink)?;
            received += len;
        }
        if n == 0 {
            break;
        }
    }
    if received != size {
        return Err(BodyError::Refused(RemoteError::new(
            ErrorKind::Corrupt,
            format!("{name}: fewer bytes than the announced {size}"),
        )));
    }
    Ok(body.wire)
}

/// The responder's side of a `Replace` when it holds another version (`old`): asks for the
/// requester's signatures, says what it lacks, and hands the lacking leaves' bytes to `sink` at
/// their offsets, while `copy` carries out the plan's `Copy` steps from the old copy. Returns the
/// plan (its `Fetch` steps are what `sink` received) and the bytes of the body on the wire. Each
/// read may take at most `timeout`.
///
/// `old` yields the index of our version; it runs while the requester's signatures travel.
pub async fn receive_delta<E, F: Future<Output = Result<(), E>>>(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    (size, framed): (u64, bool),
    (old, copy): (
        impl Future<Output = Result<Index, E>>,
        impl AsyncFnOnce(Vec<Step>) -> Result<(), E>,
    ),
    timeout: Duration,
    mut sink: impl FnMut(u64, Vec<u8>) -> F,
) -> Result<(Vec<Step>, u64), BodyError<E>> {
    let refused = |why: &str| {
        BodyError::Refused(RemoteError::new(
            ErrorKind::Corrupt,
            format!("replace: {why}"),
        ))
    };
    let gone = |e: ProtocolError| BodyError::Gone(std::io::Error::other(e));
    let silent = || {
        BodyError::Refused(RemoteError::new(
            ErrorKind::BadRequest,
            format!("no upload data for {timeout:?}"),
        ))
    };
    protocol::write_msg(send, &Response::SendDelta)
        .await
        .map_err(gone)?;
    let next = async |recv: &mut _| match tokio::time::timeout(
        timeout,
        protocol::read_msg::<Delta>(recv, MAX_RESPONSE_LEN),
    )
    .await
    {
        Err(_) => Err(silent()),
        Ok(Err(e)) => Err(gone(e)),
        Ok(Ok(m)) => Ok(m),
    };
    let (groups, old) = tokio::join!(next(recv), old);
    let old = &old.map_err(BodyError::Sink)?;
    let Delta::Groups(groups) = groups? else {
        return Err(refused("expected group signatures"));
    };
    if !delta::plausible(&groups, size) {
        return Err(refused(
            "the signatures do not add up to the announced size, or no tree has them",
        ));
    }
    let lacking: Vec<u32> = (0..groups.len() as u32)
        .filter(|&i| !old.holds_group(&groups[i as usize]))
        .collect();
    protocol::write_msg(send, &Delta::Lacking(lacking.clone()))
        .await
        .map_err(gone)?;
    let Delta::Leaves(leaves) = next(recv).await? else {
        return Err(refused("expected leaf signatures"));
    };
    let mut expanded = delta::Expanded::default();
    if !expanded.add(&groups, &lacking, leaves) {
        return Err(refused("the leaf signatures do not add up to their groups"));
    }
    drop(lacking);
    let wanted: Vec<u32> = (0..expanded.leaves().len() as u32)
        .filter(|&k| !old.holds_leaf(&expanded.leaves()[k as usize]))
        .collect();
    protocol::write_msg(send, &Delta::Lacking(wanted))
        .await
        .map_err(gone)?;
    let steps = delta::plan(&groups, &mut expanded, old);
    drop((groups, expanded));
    let mut body = BodyIn::new(recv, framed);
    let fetched = async {
        for step in &steps {
            let Step::Fetch { at, len } = *step else {
                continue;
            };
            let mut done = 0u64;
            while done < len {
                let mut piece = vec![0u8; (len - done).min(UPLOAD_BUF as u64) as usize];
                match tokio::time::timeout(timeout, body.read_exact(&mut piece)).await {
                    Err(_) => return Err(silent()),
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                        return Err(refused(&e.to_string()));
                    }
                    Ok(Err(e)) => return Err(BodyError::Gone(e)),
                    Ok(Ok(())) => {}
                }
                let n = piece.len() as u64;
                sink(at + done, piece).await.map_err(BodyError::Sink)?;
                done += n;
            }
        }
        Ok(())
    };
    // Our old bytes are copied while the requester's travel.
    let (copied, fetched) = tokio::join!(copy(steps.clone()), fetched);
    copied.map_err(BodyError::Sink)?;
    fetched?;
    // Nothing more may follow.
    let mut extra = Vec::new();
    match tokio::time::timeout(timeout, body.read(&mut extra, 1)).await {
        Ok(Ok(0)) => Ok((steps, body.wire)),
        Ok(Ok(_)) => Err(refused("more bytes than asked for")),
        Ok(Err(e)) => Err(BodyError::Gone(e)),
        Err(_) => Err(silent()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{ReadHalf, WriteHalf};

    fn name(s: &str) -> FileName {
        FileName::new(s).unwrap()
    }

    type Half = (
        WriteHalf<tokio::io::DuplexStream>,
        ReadHalf<tokio::io::DuplexStream>,
    );

    /// Both ends of one stream, over an in-memory pipe.
    fn pipe() -> (Half, Half) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        ((aw, ar), (bw, br))
    }

    #[tokio::test]
    async fn list_and_describe_over_a_pipe() {
        let ((mut cw, mut cr), (mut sw, mut sr)) = pipe();
        let entry = FileEntry {
            name: name("a.txt"),
            size: 3,
            blake3: [1; 32],
        };
        let files = vec![entry.clone(); MAX_LISTED_FILES + 2];
        let server = tokio::spawn(async move {
            assert_eq!(read_request(&mut sr).await.unwrap(), Request::List);
            let count = files.len().min(MAX_LISTED_FILES);
            respond(&mut sw, &listing(files)).await;
            count
        });
        let (got, total) = list(&mut cw, &mut cr).await.unwrap();
        assert_eq!(server.await.unwrap(), MAX_LISTED_FILES);
        assert_eq!(
            (got.len(), total),
            (MAX_LISTED_FILES, MAX_LISTED_FILES as u64 + 2)
        );

        let ((mut cw, mut cr), (mut sw, mut sr)) = pipe();
        let server = tokio::spawn(async move {
            let _ = read_request(&mut sr).await.unwrap();
            let err = RemoteError::new(ErrorKind::NotFound, "no such file");
            respond(&mut sw, &Response::Error(err)).await;
        });
        assert_eq!(describe(&mut cw, &mut cr, &name("x")).await.unwrap(), None);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_chunk_arrives_whole_and_page_aligned_and_a_short_one_is_an_error() {
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        for cut in [false, true] {
            let ((mut cw, mut cr), (mut sw, mut sr)) = pipe();
            let body = data.clone();
            let server = tokio::spawn(async move {
                let req = read_request(&mut sr).await.unwrap();
                assert!(matches!(
                    req,
                    Request::ReadChunk {
                        offset: 7,
                        len: 300_000,
                        ..
                    }
                ));
                if cut {
                    let header = protocol::encode_frame(&Response::Chunk { len: 300_000 }).unwrap();
                    sw.write_all(&header).await.unwrap();
                    sw.write_all(&body[..1000]).await.unwrap();
                    sw.shutdown().await.unwrap();
                } else {
                    let n = body.len();
                    send_chunk(&mut sw, n, Bytes::from(body), false)
                        .await
                        .unwrap();
                }
            });
            let got = read_chunk(&mut cw, &mut cr, &name("a"), 7, 300_000).await;
            server.await.unwrap();
            if cut {
                let err = got.unwrap_err().to_string();
                assert!(err.contains("ended after 1000 of 300000"), "{err}");
            } else {
                let got = got.unwrap().data;
                assert_eq!(got[..], data[..]);
                assert_eq!(got.as_ptr() as usize % PAGE, 0);
            }
        }
    }

    /// A responder that receives an upload (in blocks if `framed`) into memory and answers
    /// `Stored` or the refusal.
    async fn receiver(
        mut sw: impl SendBytes,
        mut sr: impl AsyncRead + Unpin,
        framed: bool,
    ) -> Vec<u8> {
        let Request::Upload { name, size, .. } = read_request(&mut sr).await.unwrap() else {
            panic!("not an upload");
        };
        let mut got = Vec::new();
        let r = receive_upload(
            &mut sw,
            &mut sr,
            &name,
            (size, framed),
            64 * 1024,
            Duration::from_secs(5),
            |off, piece: Vec<u8>| {
                assert_eq!(off, got.len() as u64);
                assert!(piece.len() <= 64 * 1024);
                got.extend(piece);
                std::future::ready(Ok::<(), std::io::Error>(()))
            },
        )
        .await;
        match r {
            Ok(_) => respond(&mut sw, &Response::Stored).await,
            Err(BodyError::Refused(e)) => respond(&mut sw, &Response::Error(e)).await,
            Err(e) => panic!("{e}"),
        }
        got
    }

    #[tokio::test]
    async fn an_upload_is_received_in_pieces_and_a_long_or_short_body_is_refused() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let pace = codec::Pace::default();
        let (always, never) = (codec::Mode::Always, codec::Mode::Never);
        for framing in [
            Framing::Raw,
            Framing::Blocks(always, &pace),
            Framing::Blocks(never, &pace),
        ] {
            let framed = matches!(framing, Framing::Blocks(..));
            let ((mut cw, mut cr), (sw, sr)) = pipe();
            let server = tokio::spawn(receiver(sw, sr, framed));
            let mut file = std::io::Cursor::new(data.clone());
            let sent = upload(
                &mut cw,
                &mut cr,
                &name("u.bin"),
                (1_000_000, [0; 32]),
                None::<std::future::Ready<std::io::Result<Arc<Tree>>>>,
                &mut file,
                framing,
            )
            .await;
            assert_eq!(sent.unwrap(), UploadStatus::Stored);
            assert_eq!(server.await.unwrap(), data);
        }

        // A requester that sends one byte more, or one less, than it announced.
        for (body, needle) in [(1_000_001, "more bytes"), (999_999, "fewer bytes")] {
            let ((mut cw, mut cr), (sw, sr)) = pipe();
            let server = tokio::spawn(receiver(sw, sr, false));
            let req = Request::Upload {
                name: name("u.bin"),
                size: 1_000_000,
                blake3: [0; 32],
            };
            protocol::write_msg(&mut cw, &req).await.unwrap();
            assert_eq!(response(&mut cr).await.unwrap(), Response::Ready);
            // The responder may stop reading once it has seen too much.
            let _ = cw.write_all(&vec![7u8; body]).await;
            let _ = cw.shutdown().await;
            let err = response(&mut cr).await.unwrap_err().to_string();
            assert!(err.contains(needle), "{body}: {err}");
            server.await.unwrap();
        }
    }

    /// Sends an upload request and, once `Ready`, `body` as it is; returns the final answer.
    async fn raw_upload(size: u64, body: Vec<u8>) -> Result<Response, ExchangeError> {
        let ((mut cw, mut cr), (sw, sr)) = pipe();
        let server = tokio::spawn(receiver(sw, sr, true));
        let req = Request::Upload {
            name: name("u.bin"),
            size,
            blake3: [0; 32],
        };
        protocol::write_msg(&mut cw, &req).await.unwrap();
        assert_eq!(response(&mut cr).await.unwrap(), Response::Ready);
        let _ = cw.write_all(&body).await;
        let _ = cw.shutdown().await;
        let answer = response(&mut cr).await;
        server.await.unwrap();
        answer
    }

    #[tokio::test]
    async fn a_block_that_lies_about_its_length_or_bursts_is_refused() {
        let block = |plain: u32, wire: &[u8]| {
            let mut b = plain.to_be_bytes().to_vec();
            b.extend((wire.len() as u32).to_be_bytes());
            b.extend_from_slice(wire);
            b
        };
        // A frame of 64 MiB of zeros announced as a block of 1000 bytes.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
        let cases = [
            block(1000, &bomb),
            block(codec::MAX_BLOCK + 1, b"x"),
            block(3, b"four"),
            block(1000, b"not a frame"),
        ];
        for body in cases {
            let err = raw_upload(1000, body).await.unwrap_err().to_string();
            assert!(err.contains("u.bin:"), "{err}");
        }
        assert_eq!(
            raw_upload(4, block(4, b"four")).await.unwrap(),
            Response::Stored
        );
    }

    #[tokio::test]
    async fn a_compressed_reply_is_unpacked_and_a_bomb_is_an_error() {
        let text = b"the peer sends text over quic and every byte is checked\n".repeat(20_000);
        let frame = codec::compress(&text, 3).unwrap();
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
        for (body, ok) in [(frame, true), (bomb, false)] {
            let ((mut cw, mut cr), (mut sw, mut sr)) = pipe();
            let len = text.len();
            let server = tokio::spawn(async move {
                let _ = read_request(&mut sr).await.unwrap();
                let _ = send_chunk(&mut sw, len, Bytes::from(body), true).await;
            });
            let got = read_chunk(&mut cw, &mut cr, &name("t"), 0, len as u32).await;
            server.await.unwrap();
            match got {
                Ok(r) if ok => {
                    assert_eq!(r.data[..], text[..]);
                    assert!(r.wire < len as u64 / 10, "{}", r.wire);
                    assert_eq!(r.data.as_ptr() as usize % PAGE, 0);
                }
                Err(e) if !ok => assert!(e.to_string().contains("frame"), "{e}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
