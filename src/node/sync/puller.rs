//! One peer's changes to a synced folder, taken in as they happen: each record decided
//! against ours and applied.

use super::*;

/// Takes in one peer's changes to the folder, as they happen.
pub(super) struct Puller {
    pub(super) node: Arc<Node>,
    pub(super) folder: Arc<SyncedFolder>,
    pub(super) name: String,
    pub(super) peer: PeerId,
    /// The peers named to sync with (empty: every listed peer). A large version is fetched
    /// from all of them that hold it or are fetching it too, so a crowd swarms.
    pub(super) named: Arc<[PeerId]>,
    pub(super) on: On,
    /// The page being applied: its deletes, and those that are the old names of files it
    /// moved (said once, as `renamed`).
    pub(super) moves: std::sync::Mutex<Moves>,
}

/// The moves of one page: a new name whose content is copied from a name the page deletes.
#[derive(Debug, Default)]
pub(super) struct Moves {
    deleted: std::collections::HashSet<String>,
    renamed: std::collections::HashSet<String>,
}

impl Puller {
    pub(super) async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        let (mut in_sync, mut refused) = (false, false);
        while !stop.is_cancelled() {
            let pulled = tokio::select! {
                () = stop.cancelled() => return,
                pulled = self.pull_once() => pulled,
            };
            match pulled {
                Ok(caught_up) => {
                    backoff = Duration::from_millis(250);
                    refused = false;
                    if caught_up && !in_sync {
                        self.tell("in_sync", self.name.clone(), 0, String::new());
                    }
                    in_sync = caught_up;
                    continue;
                }
                Err(e) => {
                    in_sync = false;
                    match e.downcast_ref::<Refused>() {
                        // Said once while it lasts; asked again after the backoff.
                        Some(Refused(why)) if !refused => {
                            tracing::warn!("sync with {}: refused: {why}", self.peer);
                            self.tell("refused", self.name.clone(), 0, why.clone());
                            refused = true;
                        }
                        Some(_) => {}
                        None => tracing::debug!("sync with {}: {e:#}", self.peer),
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn moves(&self) -> std::sync::MutexGuard<'_, Moves> {
        self.moves.lock().unwrap_or_else(|p| p.into_inner())
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
        let client = self.node.client(&self.node.entry(&self.peer)?).await?;
        let page = match client.sync_index(&self.name, since, WAIT_MS).await {
            Ok(page) => page,
            Err(e) if e.remote_kind() == Some(ErrorKind::NotFound) => {
                // Not syncing this folder (yet): asked again after the backoff.
                anyhow::bail!("{} does not sync it: {e}", self.peer);
            }
            Err(e) if breaks_the_rules(&e) => return Err(judged(e)),
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
        *self.moves() = Moves {
            deleted: deletes.iter().map(|r| r.path.as_str().to_owned()).collect(),
            renamed: Default::default(),
        };
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
        let client = self.node.client(&self.node.entry(&self.peer)?).await?;
        let size = u32::try_from(theirs.size).unwrap_or(u32::MAX);
        let got = client
            .read_file(&name, theirs.blake3, size)
            .await
            .map_err(judged)?;
        let ok = got.data.len() as u64 == theirs.size
            && blake3::hash(&got.data).as_bytes() == &theirs.blake3;
        if !ok {
            return Err(self.liar(path));
        }
        Ok(got)
    }

    /// The peer sent other content than the version it announced for `path`.
    fn liar(&self, path: &str) -> anyhow::Error {
        Refused(format!("{} sent other content for {path}", self.peer)).into()
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
                // The old name of a move: said with its new name.
                if !self.moves().renamed.contains(path) {
                    self.tell("removed", path.to_owned(), 0, String::new());
                }
                return Ok(());
            }
            let existed = ours.is_some_and(|o| !o.deleted);
            let got = self.fetch(path, here, &version).await?;
            self.record(path, version, Some(here)).await?;
            let moved = got.from.filter(|old| {
                let mut moves = self.moves();
                moves.deleted.contains(old) && moves.renamed.insert(old.clone())
            });
            match moved {
                Some(old) => self.tell("renamed", path.to_owned(), 0, format!("from {old}")),
                None => {
                    let event = if existed { "updated" } else { "created" };
                    self.tell(event, path.to_owned(), got.wire, got.detail);
                }
            }
            Ok(())
        }
        .await;
        if taken.is_err() {
            self.folder.lock().writing(path, false);
        }
        taken
    }

    /// Fetches `version` of `path` from the peer into `here`, atomically, the file there (if
    /// any) kept in the displaced versions.
    async fn fetch(&self, path: &str, here: &Path, version: &Version) -> anyhow::Result<Got> {
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
            // The peer that told us first; the others join as they start on it.
            let crowd = crowd(&self.named, &self.node.table(), self.node.me());
            let others = crowd.into_iter().filter(|p| *p != self.peer);
            let req = crate::node::DownloadRequest {
                name,
                peers: std::iter::once(self.peer.clone()).chain(others).collect(),
                output: Some(here.to_owned()),
                blake3: Some(version.blake3),
                window: None,
                update: true,
            };
            let got = self
                .node
                .download(&req, std::future::pending(), |_| {})
                .await?;
            return Ok(Got {
                wire: got.wire_bytes,
                detail: gave(&got),
                from: None,
            });
        }
        // Content we hold under another name (a rename, a move, a copy) is copied, checked.
        let held = self.folder.lock().holding(&version.blake3);
        if let Some(from) = held.filter(|f| f != here) {
            let (here2, blake3, at) = (here.to_owned(), version.blake3, from.clone());
            let copied =
                tokio::task::spawn_blocking(move || copy_checked(&at, &here2, &blake3)).await?;
            if copied.is_ok_and(|done| done) {
                let folder = self.folder.lock().folder().to_owned();
                let old = from.strip_prefix(&folder).ok();
                return Ok(Got {
                    wire: 0,
                    detail: String::new(),
                    from: old.map(|o| o.to_string_lossy().into_owned()),
                });
            }
        }
        let got = match version.size {
            0 => crate::wire::exchange::Received::default(),
            size => {
                let client = self.node.client(&self.node.entry(&self.peer)?).await?;
                (client.read_file(&name, version.blake3, size as u32).await).map_err(judged)?
            }
        };
        let ok = got.data.len() as u64 == version.size
            && blake3::hash(&got.data).as_bytes() == &version.blake3;
        if !ok {
            return Err(self.liar(path));
        }
        self.folder.lock().keep_object(&version.blake3, &got.data);
        let (here, blake3, wire) = (here.to_owned(), version.blake3, got.wire);
        tokio::task::spawn_blocking(move || put(&here, &got.data, &blake3)).await??;
        Ok(Got {
            wire,
            detail: String::new(),
            from: None,
        })
    }
}

/// Each peer's share of a download's bytes where more than one gave some, as
/// `shares: p1 2097152, p3 1048576`.
fn gave(got: &crate::node::Downloaded) -> String {
    let shares: Vec<String> = got
        .report
        .iter()
        .flat_map(|r| &r.sources)
        .filter(|s| s.bytes > 0)
        .map(|s| format!("{} {}", s.name, s.bytes))
        .collect();
    match shares.len() {
        0 | 1 => String::new(),
        _ => format!("shares: {}", shares.join(", ")),
    }
}
/// What a fetch did: the bytes that crossed the wire, a detail for its event (each peer's share
/// of a large version), and the name in the folder its content was copied from, if it was.
struct Got {
    wire: u64,
    detail: String,
    from: Option<String>,
}

/// A peer's answer that breaks the rules (a bad index, content other than announced): said
/// once, and nothing of it applied.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Whether `e` is an answer no honest peer sends (rather than a link or a peer gone).
fn breaks_the_rules(e: &ClientError) -> bool {
    use crate::wire::protocol::ProtocolError;
    match e {
        ClientError::Unexpected { .. } => true,
        ClientError::Protocol { source, .. } => {
            matches!(
                source,
                ProtocolError::Decode(_) | ProtocolError::TooLarge { .. }
            )
        }
        _ => false,
    }
}

/// `e`, as [`Refused`] if it breaks the rules.
fn judged(e: ClientError) -> anyhow::Error {
    match breaks_the_rules(&e) {
        true => Refused(e.to_string()).into(),
        false => e.into(),
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
