//! `sync`: the server, plus a folder kept identical with the same folder on other peers that
//! sync it too.
//!
//! - Here: file-system events (debounced) and a periodic rescan find what changed; each change
//!   is recorded in the folder's index ([`SyncIndex`]) under our next sequence number, and the
//!   peers waiting on `SyncIndex` hear of it at once.
//! - From each peer: one `SyncIndex` question in flight, from the last sequence number we took
//!   in of its index; each record is decided by `engine::sync` against ours and applied: a new
//!   version fetched and put in place atomically (the one it replaces kept in the displaced
//!   versions), a delete displaced, a conflict kept as a copy. What we apply is recorded under
//!   our own next sequence number (so peers that have not seen it learn it from us) with the
//!   file's identity as written, so our own writes never look like local edits.
//! - Before a record touches a file, a file changed here since the last scan is scanned first:
//!   our edit is a version too, and is decided against theirs, never overwritten unseen.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Node, ServeOptions};
use crate::engine::sync::{Decision, Side, decide};
use crate::model::manifest::{FilePath, MAX_WHOLE_FILE};
use crate::model::peers::{PeerId, Root};
use crate::model::vector::Version;
use crate::net::client::ClientError;
use crate::net::server::synced::{SyncedFolder, SyncedFolders};
use crate::store::synced::{Change, MAX_MERGED, SETTLE, SyncIndex};
use crate::store::{Check, Committed, PartialFile, Seen, download_tag};
use crate::wire::protocol::{ErrorKind, SyncRecord};

mod puller;
mod status;

use puller::Puller;
pub use status::{FolderStatus, PeerStatus};

/// What `sync` is asked to do.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// The folder, a path in `served_files` (empty: all of it).
    pub folder: String,
    /// The peers to sync with (empty: every other listed peer).
    pub peers: Vec<PeerId>,
    /// How often the whole folder is scanned, whatever the events say.
    pub rescan: Duration,
}

/// One thing `sync` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncEvent {
    /// `changed`, `deleted` (here), `created`, `updated`, `renamed`, `removed` (from a peer),
    /// `merged`, `conflict`, `in_sync`, `paused`, `refused`.
    pub event: &'static str,
    /// The file (or the folder, for `in_sync` and `paused`).
    pub name: String,
    /// The peer it came from (ourselves for changes here).
    pub peer: String,
    /// Bytes of file data that crossed the wire for it.
    pub bytes: u64,
    /// More, for a person (the conflict copy's name, why it paused).
    pub detail: String,
}

/// How long a peer's `SyncIndex` question waits for a change.
const WAIT_MS: u32 = 15_000;
/// Records of one answer applied at once (most are small files: round trips, not bytes).
const APPLIED_AT_ONCE: usize = 32;
/// Files larger than this that we hold another version of are updated through the delta path
/// rather than fetched whole.
const DELTA_FROM: u64 = 64 << 10;
/// Quiet time after file-system events before a scan.
const DEBOUNCE: Duration = Duration::from_millis(100);

type On = Arc<dyn Fn(SyncEvent) + Send + Sync>;

/// `sync`: serves, and keeps `opts.folder` in sync with the peers, until `shutdown`.
pub async fn sync(
    root: &Root,
    me: &PeerId,
    serve: &ServeOptions,
    opts: SyncOptions,
    shutdown: impl Future<Output = ()>,
    on: impl Fn(SyncEvent) + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let on: On = Arc::new(on);
    let served = root.served_dir(me);
    std::fs::create_dir_all(&served).with_context(|| format!("making {}", served.display()))?;
    let index = SyncIndex::open(&served, &opts.folder, me.clone())?;
    let folder = SyncedFolder::new(index);
    let registry = Arc::new(SyncedFolders::default());
    registry.add(&opts.folder, folder.clone());
    let unsettled = scan(&folder, me, &on).await?;
    let stop = CancellationToken::new();
    let live = super::Live::load(root, me)?;
    let node = Arc::new(Node::following(root, me, live.listed.subscribe())?);
    let changes = live.listed.subscribe();
    let mut tasks = tokio::task::JoinSet::new();
    let (root2, me2, serve2, stopped) = (root.clone(), me.clone(), serve.clone(), stop.clone());
    tasks.spawn(async move {
        let done = stopped.cancelled_owned();
        if let Err(e) = super::serve_with(&root2, &me2, &serve2, registry, live, done).await {
            tracing::error!("serving: {e:#}");
        }
    });
    let pullers = Pullers {
        node: node.clone(),
        folder: folder.clone(),
        name: opts.folder.clone(),
        named: opts.peers.clone().into(),
        on: on.clone(),
    };
    let pullers = pullers.run(changes, stop.clone());
    let watching = (opts.rescan, unsettled);
    let here = watch_here(
        folder.clone(),
        me.clone(),
        watching,
        on.clone(),
        stop.clone(),
    );
    let work = async { tokio::join!(pullers, here) };
    let stopping = async {
        shutdown.await;
        stop.cancel();
    };
    tokio::join!(work, stopping);
    while tasks.join_next().await.is_some() {}
    let f = folder.clone();
    tokio::task::spawn_blocking(move || f.lock().save()).await??;
    Ok(())
}

/// The pullers of a folder, one per peer we sync it with: the named peers, or every peer the
/// table in force lists (started and stopped as it changes).
struct Pullers {
    node: Arc<Node>,
    folder: Arc<SyncedFolder>,
    name: String,
    named: Arc<[PeerId]>,
    on: On,
}

impl Pullers {
    /// Runs them (on this task: a download session is not Send) until `stop`.
    async fn run(
        self,
        mut changes: tokio::sync::watch::Receiver<Arc<super::listed::Listed>>,
        stop: CancellationToken,
    ) {
        let mut running: std::collections::HashMap<PeerId, CancellationToken> = Default::default();
        let mut pulling = futures_util::stream::FuturesUnordered::new();
        let mut listed = changes.borrow_and_update().clone();
        loop {
            for peer in crowd(&self.named, &listed.table, self.node.me()) {
                if running.contains_key(&peer) {
                    continue;
                }
                let mine = stop.child_token();
                running.insert(peer.clone(), mine.clone());
                let puller = Puller {
                    node: self.node.clone(),
                    folder: self.folder.clone(),
                    name: self.name.clone(),
                    peer,
                    named: self.named.clone(),
                    on: self.on.clone(),
                    moves: Default::default(),
                };
                pulling.push(puller.run(mine));
            }
            tokio::select! {
                () = stop.cancelled() => break,
                Some(()) = pulling.next() => continue,
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The server is gone: nothing more changes.
                        stop.cancelled().await;
                        break;
                    }
                }
            }
            let new = changes.borrow_and_update().clone();
            self.node.forget(&listed.changed_in(&new)).await;
            let wanted = crowd(&self.named, &new.table, self.node.me());
            running.retain(|peer, token| {
                let keep = wanted.contains(peer);
                if !keep {
                    token.cancel();
                }
                keep
            });
            listed = new;
        }
        while pulling.next().await.is_some() {}
    }
}

/// The peers a folder is synced with: those `named`, or every one `table` lists but us.
fn crowd(named: &[PeerId], table: &crate::model::peers::PeerTable, me: &PeerId) -> Vec<PeerId> {
    let all = || table.entries().iter().map(|e| e.id.clone()).collect();
    let peers: Vec<PeerId> = if named.is_empty() {
        all()
    } else {
        named.to_vec()
    };
    peers.into_iter().filter(|p| p != me).collect()
}

/// Scans the folder, records and announces what changed here; tells the waiting peers.
/// Returns whether a file was still being written (scan again soon).
async fn scan(folder: &Arc<SyncedFolder>, me: &PeerId, on: &On) -> anyhow::Result<bool> {
    scan_some(folder, me, on, None).await
}

/// [`scan`], of the files at or under `paths` only (all of them if `None`).
async fn scan_some(
    folder: &Arc<SyncedFolder>,
    me: &PeerId,
    on: &On,
    paths: Option<Vec<String>>,
) -> anyhow::Result<bool> {
    let f = folder.clone();
    let scanned = tokio::task::spawn_blocking(move || {
        let mut index = f.lock();
        let found = match &paths {
            None => index.scan(SystemTime::now())?,
            Some(paths) => index.scan_paths(SystemTime::now(), paths)?,
        };
        if !found.0.is_empty() {
            index.save()?;
            index.prune_objects();
        }
        anyhow::Ok(found)
    })
    .await?;
    let (changes, unsettled) = scanned?;
    for change in &changes {
        let (event, name) = match change {
            Change::Changed(n) => ("changed", n),
            Change::Deleted(n) => ("deleted", n),
        };
        let (name, peer) = (name.clone(), me.to_string());
        let detail = String::new();
        on(SyncEvent {
            event,
            name,
            peer,
            bytes: 0,
            detail,
        });
    }
    if !changes.is_empty() {
        folder.tell();
    }
    Ok(unsettled)
}

/// Scans on file-system events (debounced) and every `rescan` (soon at first if a file was
/// still being written), until `stop`.
async fn watch_here(
    folder: Arc<SyncedFolder>,
    me: PeerId,
    (rescan, soon): (Duration, bool),
    on: On,
    stop: CancellationToken,
) {
    let dir = folder.lock().folder().to_owned();
    let (_watcher, mut rx) = watch_events(&dir);
    let mut paused = false;
    let mut events_on = true;
    // Paths to look at again soon (still being written); `None` inside: all.
    let mut again: Option<Option<Vec<String>>> = soon.then_some(None);
    loop {
        let wait = if again.is_some() { SETTLE } else { rescan };
        let mut look: Option<Vec<String>> = Some(Vec::new());
        tokio::select! {
            () = stop.cancelled() => return,
            got = rx.recv(), if events_on => match got {
                Some(got) => add_paths(&mut look, &dir, got),
                // The watcher is gone: rescans only.
                None => {
                    events_on = false;
                    continue;
                }
            },
            () = tokio::time::sleep(wait) => {
                look = again.take().unwrap_or(None);
            }
        }
        while let Ok(got) = rx.try_recv() {
            add_paths(&mut look, &dir, got);
        }
        if let (Some(look), Some(Some(more))) = (&mut look, &again) {
            look.extend(more.iter().cloned());
        }
        if look.as_ref().is_some_and(Vec::is_empty) {
            continue;
        }
        let looked = look.clone();
        match scan_some(&folder, &me, &on, look).await {
            Ok(unsettled) => {
                again = unsettled.then_some(looked);
                if paused {
                    paused = false;
                    let name = dir.display().to_string();
                    let detail = "its marker is back: syncing again".to_owned();
                    on(SyncEvent {
                        event: "in_sync",
                        name,
                        peer: me.to_string(),
                        bytes: 0,
                        detail,
                    });
                }
            }
            Err(e) => {
                if !paused {
                    paused = true;
                    let name = dir.display().to_string();
                    on(SyncEvent {
                        event: "paused",
                        name,
                        peer: me.to_string(),
                        bytes: 0,
                        detail: format!("{e:#}"),
                    });
                }
            }
        }
    }
}

/// Watches `dir`: each batch of events comes as the paths it names (`None`: something was
/// missed, scan all). No watcher (no inotify) leaves the rescans to find every change.
#[allow(clippy::type_complexity)]
fn watch_events(
    dir: &Path,
) -> (
    Option<Box<dyn std::any::Any + Send>>,
    tokio::sync::mpsc::UnboundedReceiver<Option<Vec<PathBuf>>>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // Each batch of events as the paths they name (`None`: something was missed, scan all).
    let watcher = notify_debouncer_full::new_debouncer(DEBOUNCE, None, move |got| {
        let paths: Option<Vec<PathBuf>> = match got {
            Ok(events) => {
                let events: Vec<notify_debouncer_full::DebouncedEvent> = events;
                let rescan = events.iter().any(|e| e.need_rescan());
                // Opens and reads change nothing (and our own scans and the server open files:
                // taken for changes, they would keep scanning forever).
                let changes = events.into_iter().filter(|e| !e.event.kind.is_access());
                let paths = changes.flat_map(|e| e.event.paths);
                (!rescan).then(|| paths.collect())
            }
            Err(_) => None,
        };
        let _ = tx.send(paths);
    });
    // Without events (no inotify), the rescan still finds every change.
    let watcher = match watcher {
        Ok(mut w) => match w.watch(dir, notify::RecursiveMode::Recursive) {
            Ok(()) => Some(Box::new(w) as Box<dyn std::any::Any + Send>),
            Err(e) => {
                tracing::warn!(
                    "not watching {} for changes: {e}; rescanning only",
                    dir.display()
                );
                None
            }
        },
        Err(e) => {
            tracing::warn!("no file-system events: {e}; rescanning only");
            None
        }
    };
    (watcher, rx)
}

/// Adds what a batch of events names to `look` (paths inside the folder that a served tree
/// shows: hidden entries, such as our temporary files, left out); `None` (something was
/// missed) makes it a scan of everything.
fn add_paths(look: &mut Option<Vec<String>>, dir: &Path, got: Option<Vec<PathBuf>>) {
    let (Some(paths), Some(list)) = (got, look.as_mut()) else {
        *look = None;
        return;
    };
    for p in paths {
        let Some(rel) = p.strip_prefix(dir).ok().and_then(|r| r.to_str()) else {
            continue;
        };
        if rel.is_empty() {
            *look = None;
            return;
        }
        if FilePath::new(rel).is_ok() && !list.iter().any(|l| l == rel) {
            list.push(rel.to_owned());
        }
    }
}
