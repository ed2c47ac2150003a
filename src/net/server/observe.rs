//! Observing: what we hold of a file (whole, or a download in progress and then what it gains,
//! in chunks or in pieces), one watch per download shared by all its observers, and at most
//! [`OBSERVERS_PER_PEER`] open per peer.

use std::sync::Arc;

use tracing::warn;

use super::limits::OBSERVERS_PER_PEER;
use super::shared::Watched;
use super::{Answering, Failure, Link, Server, blocking, gone, manifest_bytes, reply};
use crate::model::manifest::{FilePath, Hash32, Regrain};
use crate::wire::exchange::{self, respond};
use crate::wire::protocol::{ErrorKind, RemoteError, Response};

/// `Observe` (`ObservePieces` with `in_pieces`): our whole file of `name`, or our download of it
/// in progress and then what it gains, until it finishes, stops, the observer goes away or we
/// shut down. Counted in chunks, or in pieces for `ObservePieces` where the file has them,
/// whichever unit our own download is in. Every observer of one download shares one watch of it
/// (`shared::Watches`), and a peer has at most [`OBSERVERS_PER_PEER`] of downloads in progress
/// open.
pub(super) async fn handle_observe(
    send: &mut impl Answering,
    server: &Server,
    link: &Link,
    name: &FilePath,
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
    send: &mut impl Answering,
    server: &Server,
    (name, version, in_pieces): (&FilePath, Hash32, bool),
    mut watch: tokio::sync::watch::Receiver<Watched>,
    mut known: crate::model::manifest::ChunkSet,
) -> Result<String, Failure> {
    let first = known.count();
    loop {
        let now = watch.borrow_and_update().clone();
        match now {
            Watched::Holding(h) => {
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
            Watched::Complete => {
                respond(send, &Response::Complete).await;
                return Ok(format!(
                    "{name} -> observed from {first} units to the whole file{}",
                    unit(in_pieces)
                ));
            }
            Watched::Stopped => {
                return Err(RemoteError::new(
                    ErrorKind::NotFound,
                    format!("the download of {name} here stopped"),
                )
                .into());
            }
            Watched::Failed(e) => {
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
