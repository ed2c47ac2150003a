//! Upload bodies: sent raw (`qnode/1`) or in blocks, each compressed as the pace allows
//! (`qnode/2`); received exactly as announced, whole or (a replace) as only the leaves the
//! responder lacks, decoded as they come.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::model::delta::{self, Index, Step};
use crate::model::manifest::FilePath;
use crate::wire::codec;
use crate::wire::protocol::{
    self, BlockHead, Delta, ErrorKind, MAX_RESPONSE_LEN, ProtocolError, RemoteError, Response,
};

use super::*;

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
pub(super) async fn write_block(
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
        // Both fit a u32: a block is at most MAX_BLOCK, a frame no longer than its block.
        let head = BlockHead {
            plain: block.len() as u32,
            wire: wire.len() as u32,
        };
        send.write_all(&head.encode()).await.map_err(gone)?;
        send.write_all(wire).await.map_err(gone)?;
        pace.sent(block.len() as u64, wire.len() as u64);
    }
    Ok(())
}

/// What an upload body will be, as its request announced and the protocol version says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    /// Its bytes.
    pub size: u64,
    /// In blocks (`qnode/2`), not raw.
    pub in_blocks: bool,
}

/// An upload body as it arrives: raw, or (`qnode/2`) blocks, decoded as they come.
pub(super) struct BodyIn<'a, R> {
    recv: &'a mut R,
    in_blocks: bool,
    /// The current block's plain bytes, and how many of them were read.
    block: Vec<u8>,
    at: usize,
    /// Bytes read off the stream.
    wire: u64,
}

impl<'a, R: AsyncRead + Unpin> BodyIn<'a, R> {
    fn new(recv: &'a mut R, in_blocks: bool) -> Self {
        Self {
            recv,
            in_blocks,
            block: Vec::new(),
            at: 0,
            wire: 0,
        }
    }

    /// Appends up to `max` bytes of the body to `buf`; 0 at its end.
    async fn read(&mut self, buf: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
        if !self.in_blocks {
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
        if !self.in_blocks {
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
        let mut head = [0u8; BlockHead::LEN];
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
        let BlockHead { plain, wire } = BlockHead::decode(head)?;
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
pub(super) async fn send_body(
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

/// A failed read of an upload body: bytes that do not decode are the requester's fault (it is
/// told so); anything else means the stream broke.
pub(super) fn body_error<E>(name: &FilePath, e: std::io::Error) -> BodyError<E> {
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

/// Answers `Upload` with `Ready`, then receives exactly `size` bytes (raw, or in blocks as
/// announced), handing them to `sink` in pieces of up to `piece` bytes with their offsets. Each
/// read may take at most `timeout`. Returns the bytes that crossed the wire for them.
pub async fn receive_upload<E, F: Future<Output = Result<(), E>>>(
    send: &mut impl SendBytes,
    recv: &mut (impl AsyncRead + Unpin),
    name: &FilePath,
    Announced { size, in_blocks }: Announced,
    piece: usize,
    timeout: Duration,
    mut sink: impl FnMut(u64, Vec<u8>) -> F,
) -> Result<u64, BodyError<E>> {
    protocol::write_msg(send, &Response::Ready)
        .await
        .map_err(|e| BodyError::Gone(std::io::Error::other(e)))?;
    let mut body = BodyIn::new(recv, in_blocks);
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
    Announced { size, in_blocks }: Announced,
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
    let mut body = BodyIn::new(recv, in_blocks);
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
