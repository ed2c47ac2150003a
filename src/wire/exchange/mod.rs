//! Every request/response exchange, written once over any `AsyncRead`/`AsyncWrite` pair (a QUIC
//! stream in `client` and `server`, `tokio::io::duplex` in the tests): the asking side (`ask`),
//! the answering side (`answer`) and upload bodies (`body`). The stream lifecycles are in
//! `protocol`'s documentation; a transform of the bytes (compression, say) has this one place to go.
//!
//! Requesters get [`ExchangeError`]s; who the peer is and what its connection says are added by
//! the caller. Responders get the decoded request from [`read_request`] and answer with the
//! functions named after the answer.

mod answer;
mod ask;
mod body;
#[cfg(test)]
mod tests;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

pub use answer::*;
pub use ask::*;
pub use body::*;

use crate::wire::protocol::{ProtocolError, RemoteError};

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
