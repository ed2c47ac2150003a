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
    /// `changed`, `deleted` (here), `created`, `updated`, `removed` (from a peer), `conflict`,
    /// `in_sync`, `paused`, `refused`.
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
    let node = Arc::new(Node::load(root, me)?);
    let peers: Vec<PeerId> = match opts.peers.is_empty() {
        true => node.peers.entries().iter().map(|e| e.id.clone()).collect(),
        false => opts.peers.clone(),
    };
    let peers: Vec<PeerId> = peers.into_iter().filter(|p| p != me).collect();
    let mut tasks = tokio::task::JoinSet::new();
    let (root2, me2, serve2, stopped) = (root.clone(), me.clone(), serve.clone(), stop.clone());
    tasks.spawn(async move {
        let done = stopped.cancelled_owned();
        if let Err(e) = super::serve_with(&root2, &me2, &serve2, registry, done).await {
            tracing::error!("serving: {e:#}");
        }
    });
    // The pullers run on this task (a download session is not Send), each until `stop`.
    let pullers = peers.into_iter().map(|peer| {
        let puller = Puller {
            node: node.clone(),
            folder: folder.clone(),
            name: opts.folder.clone(),
            peer,
            on: on.clone(),
        };
        puller.run(stop.clone())
    });
    let watching = (opts.rescan, unsettled);
    let here = watch_here(
        folder.clone(),
        me.clone(),
        watching,
        on.clone(),
        stop.clone(),
    );
    let work = async { tokio::join!(futures_util::future::join_all(pullers), here) };
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
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let dir = folder.lock().folder().to_owned();
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
    let _watcher = match watcher {
        Ok(mut w) => match w.watch(&dir, notify::RecursiveMode::Recursive) {
            Ok(()) => Some(w),
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

/// Takes in one peer's changes to the folder, as they happen.
struct Puller {
    node: Arc<Node>,
    folder: Arc<SyncedFolder>,
    name: String,
    peer: PeerId,
    on: On,
}

impl Puller {
    async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        let mut in_sync = false;
        while !stop.is_cancelled() {
            let pulled = tokio::select! {
                () = stop.cancelled() => return,
                pulled = self.pull_once() => pulled,
            };
            match pulled {
                Ok(caught_up) => {
                    backoff = Duration::from_millis(250);
                    if caught_up && !in_sync {
                        self.tell("in_sync", self.name.clone(), 0, String::new());
                    }
                    in_sync = caught_up;
                    continue;
                }
                Err(e) => {
                    in_sync = false;
                    tracing::debug!("sync with {}: {e:#}", self.peer);
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn tell(&self, event: &'static str, name: String, bytes: u64, detail: String) {
        let peer = self.peer.to_string();
        (self.on)(SyncEvent {
            event,
            name,
            peer,
            bytes,
            detail,
        });
    }

    /// One question and what its answer brings. True when the peer had nothing more.
    async fn pull_once(&self) -> anyhow::Result<bool> {
        let since = self.folder.lock().seen(self.peer.as_str());
        let client = self.node.client(self.node.entry(&self.peer)?).await?;
        let page = match client.sync_index(&self.name, since, WAIT_MS).await {
            Ok(page) => page,
            Err(e) if e.remote_kind() == Some(ErrorKind::NotFound) => {
                // Not syncing this folder (yet): asked again after the backoff.
                anyhow::bail!("{} does not sync it: {e}", self.peer);
            }
            Err(e @ ClientError::Unexpected { .. }) => {
                self.tell("refused", self.name.clone(), 0, e.to_string());
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        if page.last < since {
            // Its index began anew: take all of it in again.
            self.folder.lock().saw(self.peer.as_str(), 0);
            return Ok(false);
        }
        let caught_up = page.records.is_empty() && !page.more;
        let Some(last) = page.records.last().map(|r| r.sequence) else {
            return Ok(caught_up);
        };
        // New versions many at once (paths in a page are distinct), then deletes: a move's new
        // name is copied from the old one before the old one goes.
        let (edits, deletes): (Vec<_>, Vec<_>) =
            page.records.into_iter().partition(|r| !r.version.deleted);
        let applied: Vec<anyhow::Result<()>> = futures_util::stream::iter(edits)
            .map(|r| self.apply(r))
            .buffer_unordered(APPLIED_AT_ONCE)
            .collect()
            .await;
        applied.into_iter().collect::<anyhow::Result<()>>()?;
        for record in deletes {
            self.apply(record).await?;
        }
        // Noted once per page: after a crash the page is asked again, and what was applied
        // already is found the same.
        let (f, peer) = (self.folder.clone(), self.peer.to_string());
        tokio::task::spawn_blocking(move || {
            let mut index = f.lock();
            index.saw(&peer, last);
            index.save()
        })
        .await??;
        self.folder.tell();
        Ok(caught_up)
    }

    /// Decides one record of the peer's against ours and applies it.
    async fn apply(&self, record: SyncRecord) -> anyhow::Result<()> {
        let path = record.path.as_str().to_owned();
        let here = self.folder.lock().folder().join(&path);
        // Another peer's record of the same file being applied: decided once it is done.
        let waited = Instant::now();
        while self.folder.lock().is_writing(&path) && waited.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A change here not scanned yet is scanned first: it is a version too.
        let ours = self.current(&path, &here).await?;
        let theirs = record.version;
        let mergeable = self.mergeable(ours.as_ref(), &theirs);
        match decide(&path, ours.as_ref(), &theirs, mergeable) {
            Decision::Keep => {}
            Decision::Relabel(vector) => {
                if let Some(mut ours) = ours {
                    ours.vector = vector;
                    self.record(&path, ours, Some(&here)).await?;
                }
            }
            Decision::Take(vector) => {
                let version = Version { vector, ..theirs };
                self.take(&path, &here, ours.as_ref(), version).await?;
            }
            // Merging is not built yet: concurrent text edits are kept apart as conflicts.
            Decision::Merge { first, vector } => {
                let Some(ours) = ours else { return Ok(()) };
                let both = (&ours, &theirs);
                if !self.merge(&path, &here, both, first, vector).await? {
                    self.keep_apart(&path, &here, ours, theirs).await?;
                }
            }
            Decision::Conflict { .. } => {
                let Some(ours) = ours else { return Ok(()) };
                self.keep_apart(&path, &here, ours, theirs).await?;
            }
        }
        Ok(())
    }

    /// Whether concurrent `ours` and `theirs` may merge: both text edits of one version whose
    /// content we kept.
    fn mergeable(&self, ours: Option<&Version>, theirs: &Version) -> bool {
        let Some(ours) = ours else { return false };
        let edits = !ours.deleted && !theirs.deleted;
        let small = ours.size <= MAX_MERGED && theirs.size <= MAX_MERGED;
        let same_parent = ours.parent.is_some() && ours.parent == theirs.parent;
        edits
            && small
            && same_parent
            && ours
                .parent
                .is_some_and(|p| self.folder.lock().object(&p).is_some())
    }

    /// Merges our version and theirs (both edits of one parent) three-way, `first` first, and
    /// puts the result under the name with `vector`, made by `first`'s peer: every peer merging
    /// the two gets the same bytes and version. False if the edits overlap (or a part is
    /// missing): the caller keeps them apart instead.
    async fn merge(
        &self,
        path: &str,
        here: &Path,
        (ours, theirs): (&Version, &Version),
        first: Side,
        vector: crate::model::vector::Vector,
    ) -> anyhow::Result<bool> {
        let Some(parent) = ours.parent else {
            return Ok(false);
        };
        let Some(ancestor) = self.folder.lock().object(&parent) else {
            return Ok(false);
        };
        let Ok((mine, _)) = crate::store::read_small_file(here, MAX_MERGED) else {
            return Ok(false);
        };
        if blake3::hash(&mine).as_bytes() != &ours.blake3 {
            // Changed again meanwhile: decided at the next look.
            anyhow::bail!("{path} changed while being merged");
        }
        let got = self.read_theirs(path, theirs).await?;
        let (a, b, by) = match first {
            Side::Ours => (&mine[..], &got.data[..], &ours.by),
            Side::Theirs => (&got.data[..], &mine[..], &theirs.by),
        };
        let Some(merged) = crate::engine::sync::merge_text(&ancestor, a, b) else {
            return Ok(false);
        };
        let blake3 = *blake3::hash(&merged).as_bytes();
        let version = Version {
            size: merged.len() as u64,
            blake3,
            deleted: false,
            vector,
            modified: ours.modified.max(theirs.modified),
            by: by.clone(),
            parent: Some(parent),
        };
        let to = here.to_owned();
        let data = merged.clone();
        self.folder.lock().writing(path, true);
        let written = tokio::task::spawn_blocking(move || put(&to, &data, &blake3)).await;
        if !matches!(written, Ok(Ok(()))) {
            self.folder.lock().writing(path, false);
        }
        written??;
        self.folder.lock().keep_object(&blake3, &merged);
        self.record(path, version, Some(here)).await?;
        self.tell("merged", path.to_owned(), got.wire, String::new());
        Ok(true)
    }

    /// The whole of their version of `path` (at most [`MAX_WHOLE_FILE`] bytes), checked.
    async fn read_theirs(
        &self,
        path: &str,
        theirs: &Version,
    ) -> anyhow::Result<crate::wire::exchange::Received> {
        let name = self.name_of(path)?;
        let client = self.node.client(self.node.entry(&self.peer)?).await?;
        let size = u32::try_from(theirs.size).unwrap_or(u32::MAX);
        let got = client.read_file(&name, theirs.blake3, size).await?;
        let ok = got.data.len() as u64 == theirs.size
            && blake3::hash(&got.data).as_bytes() == &theirs.blake3;
        anyhow::ensure!(ok, "{} sent other content for {path}", self.peer);
        Ok(got)
    }

    /// The name the peer serves the folder's `path` under.
    fn name_of(&self, path: &str) -> anyhow::Result<FilePath> {
        Ok(match self.name.as_str() {
            "" => FilePath::new(path)?,
            folder => FilePath::new(format!("{folder}/{path}"))?,
        })
    }

    /// Concurrent edits that cannot merge: the winner keeps the name, the other is kept as a
    /// conflict copy (named alike on every peer).
    async fn keep_apart(
        &self,
        path: &str,
        here: &Path,
        ours: Version,
        theirs: Version,
    ) -> anyhow::Result<()> {
        let Decision::Conflict {
            winner,
            vector,
            copy,
        } = crate::engine::sync::conflict(path, &ours, &theirs)
        else {
            return Ok(());
        };
        let copy_at = self.folder.lock().folder().join(&copy);
        match winner {
            Side::Theirs => {
                // Ours goes to the copy (a link: the same bytes), theirs takes the name.
                self.folder.lock().writing(&copy, true);
                if let Err(e) = std::fs::hard_link(here, &copy_at) {
                    self.folder.lock().writing(&copy, false);
                    return Err(e).with_context(|| format!("keeping {copy}"));
                }
                self.record(&copy, ours.clone(), Some(&copy_at)).await?;
                let version = Version { vector, ..theirs };
                self.take(path, here, Some(&ours), version).await?;
            }
            Side::Ours => {
                self.take(&copy, &copy_at, None, theirs.clone()).await?;
                let version = Version { vector, ..ours };
                self.record(path, version, Some(here)).await?;
            }
        }
        self.tell("conflict", path.to_owned(), 0, copy);
        Ok(())
    }

    /// Our version of `path` now: from the index, after a scan if the file changed since.
    async fn current(&self, path: &str, here: &Path) -> anyhow::Result<Option<Version>> {
        let stale = {
            let index = self.folder.lock();
            !index.is_current(path, here)
        };
        if stale {
            let me = self.node.me().clone();
            scan(&self.folder, &me, &self.on).await?;
            // Still being written here: decided once it settles (the record is asked again).
            anyhow::ensure!(
                self.folder.lock().is_current(path, here),
                "{path} is being written here"
            );
        }
        Ok(self.folder.lock().get(path).cloned())
    }

    async fn record(&self, path: &str, version: Version, at: Option<&Path>) -> anyhow::Result<()> {
        let (f, path, at) = (self.folder.clone(), path.to_owned(), at.map(Path::to_owned));
        tokio::task::spawn_blocking(move || f.lock().record(&path, version, at.as_deref())).await?;
        Ok(())
    }

    /// Puts `version` of `path` in place at `here` (fetched from the peer, or displaced if it
    /// is a delete), replacing `ours` if we hold it, and records it.
    async fn take(
        &self,
        path: &str,
        here: &Path,
        ours: Option<&Version>,
        version: Version,
    ) -> anyhow::Result<()> {
        // Marked as ours until recorded: a scan meanwhile must not take it for an edit here.
        self.folder.lock().writing(path, true);
        let taken = async {
            if version.deleted {
                if let Some(ours) = ours.filter(|o| !o.deleted)
                    && let Ok(Some(seen)) = Seen::of(here)
                    && seen.blake3 == ours.blake3
                {
                    crate::store::displace(here, &seen.blake3)?;
                }
                self.record(path, version, None).await?;
                self.tell("removed", path.to_owned(), 0, String::new());
                return Ok(());
            }
            let existed = ours.is_some_and(|o| !o.deleted);
            let bytes = self.fetch(path, here, &version).await?;
            self.record(path, version, Some(here)).await?;
            let event = if existed { "updated" } else { "created" };
            self.tell(event, path.to_owned(), bytes, String::new());
            Ok(())
        }
        .await;
        if taken.is_err() {
            self.folder.lock().writing(path, false);
        }
        taken
    }

    /// Fetches `version` of `path` from the peer into `here`, atomically, the file there (if
    /// any) kept in the displaced versions. The bytes that crossed the wire.
    async fn fetch(&self, path: &str, here: &Path, version: &Version) -> anyhow::Result<u64> {
        let name = self.name_of(path)?;
        let served = self.node.served_dir();
        let inside = FilePath::new(
            here.strip_prefix(&served)
                .unwrap_or(here)
                .to_string_lossy()
                .as_ref(),
        )?;
        crate::store::make_folders(&served, &inside)?;
        // Another version of a larger file here: brought up to date through the delta path
        // (only what changed crosses), as a file too large to fetch whole is.
        let older =
            std::fs::symlink_metadata(here).is_ok_and(|m| m.is_file() && m.len() > DELTA_FROM);
        if version.size > MAX_WHOLE_FILE || (older && version.size > DELTA_FROM) {
            let req = super::DownloadRequest {
                name,
                peers: vec![self.peer.clone()],
                output: Some(here.to_owned()),
                blake3: Some(version.blake3),
                window: None,
                update: true,
            };
            let got = self
                .node
                .download(&req, std::future::pending(), |_| {})
                .await?;
            return Ok(got.wire_bytes);
        }
        // Content we hold under another name (a rename, a move, a copy) is copied, checked.
        let held = self.folder.lock().holding(&version.blake3);
        if let Some(from) = held.filter(|f| f != here) {
            let (here2, blake3) = (here.to_owned(), version.blake3);
            let copied =
                tokio::task::spawn_blocking(move || copy_checked(&from, &here2, &blake3)).await?;
            if copied.is_ok_and(|done| done) {
                return Ok(0);
            }
        }
        let got = match version.size {
            0 => crate::wire::exchange::Received::default(),
            size => {
                let client = self.node.client(self.node.entry(&self.peer)?).await?;
                client.read_file(&name, version.blake3, size as u32).await?
            }
        };
        let ok = got.data.len() as u64 == version.size
            && blake3::hash(&got.data).as_bytes() == &version.blake3;
        anyhow::ensure!(ok, "{} sent other content for {path}", self.peer);
        self.folder.lock().keep_object(&version.blake3, &got.data);
        let (here, blake3, wire) = (here.to_owned(), version.blake3, got.wire);
        tokio::task::spawn_blocking(move || put(&here, &got.data, &blake3)).await??;
        Ok(wire)
    }
}

/// Copies `from` to `to` (new, or replacing another version there, which is displaced) if
/// `from` still holds `blake3`; false if it no longer does.
fn copy_checked(
    from: &Path,
    to: &Path,
    blake3: &crate::model::manifest::Hash32,
) -> anyhow::Result<bool> {
    let Ok((data, _)) = crate::store::read_small_file(from, MAX_WHOLE_FILE) else {
        return Ok(false);
    };
    if blake3::hash(&data).as_bytes() != blake3 {
        return Ok(false);
    }
    put(to, &data, blake3)?;
    Ok(true)
}

/// Puts `data` (whose BLAKE3 is `blake3`) at `to` atomically: a new file, or in place of another
/// version there (kept in the displaced versions; nothing is replaced if it changed meanwhile).
fn put(to: &Path, data: &[u8], blake3: &crate::model::manifest::Hash32) -> anyhow::Result<()> {
    let partial = PartialFile::create(to, &download_tag(blake3), data.len() as u64)?;
    partial.write_at(0, data)?;
    // Hashed as written (in memory), not read back.
    let written = Check::Streamed(*blake3::hash(data).as_bytes());
    let _: Committed = match Seen::of(to)? {
        Some(old) if old.blake3 == *blake3 => return Ok(()),
        Some(old) => partial.commit_replacing(*blake3, written, old)?,
        None => partial.commit(*blake3, written)?,
    };
    Ok(())
}

/// One synced folder as `status` sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FolderStatus {
    /// The folder (a path in `served_files`; empty for all of it).
    pub folder: String,
    /// Files in it.
    pub files: usize,
    /// Whether its marker is there (without it, nothing is synced).
    pub marked: bool,
    /// The conflict copies kept in it.
    pub conflicts: Vec<String>,
    /// Each other peer.
    pub peers: Vec<PeerStatus>,
}

/// Where one peer stands with a synced folder.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub peer: String,
    /// Nothing of its changes is waiting to be taken in.
    pub in_sync: bool,
    /// Its changes we have not taken in yet (at least this many if `more`).
    pub pending: u64,
    pub more: bool,
    /// Why it could not be asked, if it could not.
    pub error: Option<String>,
}

impl Node {
    /// `status`: every folder synced here (from its index) and, for each other peer, how many
    /// of its changes we have not taken in yet (asked without waiting).
    pub async fn sync_status(&self) -> Vec<FolderStatus> {
        let served = self.served_dir();
        let folders =
            tokio::task::spawn_blocking(move || crate::store::synced::synced_folders(&served))
                .await
                .unwrap_or_default();
        let others: Vec<PeerId> = (self.peers.entries().iter())
            .map(|e| e.id.clone())
            .filter(|p| *p != self.me)
            .collect();
        let mut out = Vec::new();
        for f in folders {
            let asked = futures_util::future::join_all(others.iter().map(|peer| async {
                let since = f.seen.get(peer.as_str()).copied().unwrap_or(0);
                let client = self.client(self.entry(peer)?).await?;
                client.sync_index(&f.name, since, 0).await
            }))
            .await;
            let peers = (others.iter().zip(asked))
                .map(|(peer, a)| match a {
                    Ok(page) => PeerStatus {
                        peer: peer.to_string(),
                        in_sync: page.records.is_empty(),
                        pending: page.records.len() as u64,
                        more: page.more,
                        error: None,
                    },
                    Err(e) => PeerStatus {
                        peer: peer.to_string(),
                        in_sync: false,
                        pending: 0,
                        more: false,
                        error: Some(e.to_string()),
                    },
                })
                .collect();
            out.push(FolderStatus {
                folder: f.name,
                files: f.files,
                marked: f.marked,
                conflicts: f.conflicts,
                peers,
            });
        }
        out
    }
}
