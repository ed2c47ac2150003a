//! Uploads: admission (size, this peer's slots, the disk), the name claimed, and the body received
//! whole or (a replace) as only what our version lacks, then committed.

use std::sync::Arc;

use tokio::io::AsyncRead;

use super::limits::Refused;
use super::{Answering, Failure, Link, READ_TIMEOUT, Server, blocking, gone, store_error};
use crate::model::delta::{Index, SigKind, Step};
use crate::model::manifest::{FilePath, Hash32};
use crate::store::{Check, Committed, Seen, StoreError, Upload};
use crate::wire::exchange::{self, BodyError, respond};
use crate::wire::protocol::{ErrorKind, RemoteError, Response};

/// Uploads are written to disk in parts of this many bytes.
const UPLOAD_WRITE_BUF: usize = 1 << 20;

/// What an upload request asked for.
#[derive(Debug, Clone, Copy)]
pub(super) struct UploadRequest {
    /// Its size.
    pub(super) size: u64,
    /// The BLAKE3 of its content.
    pub(super) blake3: Hash32,
    /// It replaces the version we hold (`Replace`), rather than being new (`Upload`).
    pub(super) replace: bool,
}

impl UploadRequest {
    pub(super) fn new(size: u64, blake3: Hash32, replace: bool) -> Self {
        Self {
            size,
            blake3,
            replace,
        }
    }
}

pub(super) async fn handle_upload(
    send: &mut impl Answering,
    recv: &mut (impl AsyncRead + Unpin + Send),
    server: &Server,
    link: &Link,
    name: &FilePath,
    request: UploadRequest,
) -> Result<String, Failure> {
    let UploadRequest {
        size,
        blake3: expected,
        replace,
    } = request;
    let (peer, kind) = (&link.peer, link.version.sig_kind());
    let body = exchange::Announced {
        size,
        in_blocks: link.version.compresses(),
    };
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
            receive_delta(send, recv, server, name, body, &upload, (old, kind, early)).await?
        }
        None => {
            let (streamed, wire) = receive_whole(send, recv, name, body, &upload).await?;
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
    send: &mut impl Answering,
    recv: &mut (impl AsyncRead + Unpin + Send),
    name: &FilePath,
    body: exchange::Announced,
    upload: &Arc<Upload>,
) -> Result<(Hash32, u64), Failure> {
    let mut hasher = blake3::Hasher::new();
    let received = exchange::receive_upload(
        send,
        recv,
        name,
        body,
        UPLOAD_WRITE_BUF,
        READ_TIMEOUT,
        |offset, piece: Vec<u8>| {
            hasher.update(&piece);
            let upload = upload.clone();
            blocking(move || upload.partial.write_at(offset, &piece))
        },
    )
    .await;
    match received {
        Ok(wire) => Ok((*hasher.finalize().as_bytes(), wire)),
        Err(BodyError::Refused(e) | BodyError::Sink(e)) => Err(e.into()),
        Err(BodyError::Gone(e)) => Err(gone(e)),
    }
}

/// Receives only what our version `old` of `name` lacks, and copies the rest from it. The result
/// is checked by re-reading it (what the requester sent are claims).
async fn receive_delta(
    send: &mut impl Answering,
    recv: &mut (impl AsyncRead + Unpin + Send),
    server: &Server,
    name: &FilePath,
    body: exchange::Announced,
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
        body,
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
