//! The answering side: the request read (capped before decoding), and each answer written:
//! listings, manifests with what is held, chunks (compressed or not), changes of a download in
//! progress.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWriteExt};

use crate::model::manifest::{ChunkSet, Manifest};
use crate::wire::protocol::{
    self, FileEntry, Incomplete, MAX_LISTED_FILES, MAX_REQUEST_LEN, ProtocolError, Request,
    Response,
};

use super::*;

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
