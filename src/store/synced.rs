//! The index of a synced folder: every file's version (a deleted one as a tombstone) with the
//! local sequence number of its last change, and how far we have read each other peer's index.
//! A peer that returns asks only for what changed since the sequence it last saw (as
//! Syncthing's index updates do).
//!
//! It lives in `served_files/.qnode-sync/` (outside the folder, so an emptied or unmounted
//! folder does not take it along), written whole to a temporary file, flushed and renamed. The
//! folder itself carries the marker `.qnodefolder`, made when the folder is first synced: a folder
//! found without it (an unmounted disk, a deleted folder) is not scanned at all, so its files'
//! absence never spreads as deletes.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{FileKey, Seen, StoreError};
use crate::model::manifest::{FilePath, Hash32};
use crate::model::peers::PeerId;
use crate::model::vector::{Vector, Version};

/// The marker a synced folder carries.
pub const MARKER: &str = ".qnodefolder";

/// Where the indexes of synced folders live, in `served_files`.
pub const SYNC_DIR: &str = ".qnode-sync";

/// How long a file must have been left alone before a scan takes it (one still being written is
/// taken at a later scan).
pub const SETTLE: Duration = Duration::from_millis(300);

/// Largest text file kept for three-way merges (its content, while a version of it may need it
/// as the ancestor).
pub const MAX_MERGED: u64 = 1 << 20;

/// What the index file begins with (its format's version).
const MAGIC: [u8; 8] = *b"qnsync01";

/// One file as the index knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Known {
    /// Its version (a tombstone once deleted).
    pub version: Version,
    /// The local sequence number of its last change here.
    pub sequence: u64,
    /// The file's identity on disk when it was last looked at or written (none once deleted).
    key: Option<FileKey>,
}

#[derive(Default, Serialize, Deserialize)]
struct OnDisk {
    /// The folder's name (a path in `served_files`; empty for all of it).
    name: String,
    files: BTreeMap<String, Known>,
    sequence: u64,
    seen: BTreeMap<String, u64>,
}

/// What a look at one file found.
enum Looked {
    Same,
    Unsettled,
    Changed,
}

/// What a scan found changed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new file, or a new version of one.
    Changed(String),
    /// A file gone.
    Deleted(String),
}

/// The index of one synced folder.
pub struct SyncIndex {
    /// The folder.
    folder: PathBuf,
    /// The index file.
    file: PathBuf,
    me: PeerId,
    state: OnDisk,
    /// Files found missing, and since when (taken as deleted after [`SETTLE`]).
    missing: std::collections::HashMap<String, SystemTime>,
    /// Files the sync itself is writing or removing (until it records them): a scan leaves
    /// them alone, so our own writes are never taken for edits here.
    writing: std::collections::HashSet<String>,
    /// Each file's path by the sequence number of its last change: a page of changes costs
    /// what it holds, not the whole index.
    order: BTreeMap<u64, String>,
}

impl SyncIndex {
    /// The index of the folder `name` (a path in `root`, `served_files`; empty for all of it),
    /// synced as `me`. The first time, the folder must exist: its marker is made then. After
    /// that a missing folder or marker is an error until it is back.
    pub fn open(root: &Path, name: &str, me: PeerId) -> Result<Self, StoreError> {
        let folder = match name {
            "" => root.to_owned(),
            name => {
                let name = FilePath::new(name).map_err(|e| StoreError::Sync(e.to_string()))?;
                root.join(name.as_str())
            }
        };
        let dir = root.join(SYNC_DIR);
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("making", &dir, e))?;
        let tag = crate::model::manifest::hex(blake3::hash(name.as_bytes()).as_bytes());
        let file = dir.join(format!("{}.index", &tag[..16]));
        let state = match fs::read(&file) {
            Ok(bytes) => decode(&bytes).ok_or_else(|| {
                let file = file.display();
                StoreError::Sync(format!("{file} is damaged (move it away to index anew)"))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !folder.is_dir() {
                    return Err(StoreError::Sync(format!(
                        "{} is not a folder: nothing to sync",
                        folder.display()
                    )));
                }
                let marker = folder.join(MARKER);
                fs::write(&marker, b"qnode sync marker: do not delete\n")
                    .map_err(|e| StoreError::io("making", &marker, e))?;
                OnDisk {
                    name: name.to_owned(),
                    ..OnDisk::default()
                }
            }
            Err(e) => return Err(StoreError::io("reading", &file, e)),
        };
        let order = (state.files.iter())
            .map(|(path, k)| (k.sequence, path.clone()))
            .collect();
        Ok(Self {
            folder,
            file,
            me,
            state,
            missing: Default::default(),
            writing: Default::default(),
            order,
        })
    }

    /// The folder synced.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// Whether the folder is there with its marker (else nothing may be scanned or deleted).
    pub fn marked(&self) -> bool {
        fs::symlink_metadata(self.folder.join(MARKER)).is_ok_and(|m| m.is_file())
    }

    /// Looks at every file of the folder (hashing only those whose identity moved) and records
    /// what changed here since the last scan: new versions bump our counter, files gone become
    /// tombstones. Files changed within [`SETTLE`] of `now` are left for a later scan (the
    /// second value says whether any was). Refused, changing nothing, without the marker.
    pub fn scan(&mut self, now: SystemTime) -> Result<(Vec<Change>, bool), StoreError> {
        self.scan_within(now, None)
    }

    /// Like [`scan`](Self::scan), looking only at the files at or under `paths` (in the folder;
    /// where file-system events said something changed).
    pub fn scan_paths(
        &mut self,
        now: SystemTime,
        paths: &[String],
    ) -> Result<(Vec<Change>, bool), StoreError> {
        self.scan_within(now, Some(paths))
    }

    fn scan_within(
        &mut self,
        now: SystemTime,
        within: Option<&[String]>,
    ) -> Result<(Vec<Change>, bool), StoreError> {
        if !self.marked() {
            return Err(StoreError::Sync(format!(
                "{} has lost its marker {MARKER} (unmounted or deleted?): not syncing it until it is back",
                self.folder.display()
            )));
        }
        let (mut changes, mut unsettled) = (Vec::new(), false);
        let mut present = std::collections::HashSet::new();
        // The content of files new or changed in this scan: a file gone with one of them moved.
        let mut arrived = std::collections::HashSet::new();
        let roots: Vec<PathBuf> = match within {
            None => vec![self.folder.clone()],
            Some(paths) => paths.iter().map(|p| self.folder.join(p)).collect(),
        };
        let walks = roots
            .iter()
            .flat_map(|r| super::walk_tree(r).filter_map(Result::ok));
        for entry in walks {
            if !entry.file_type().is_some_and(|t| t.is_file()) {
                continue;
            }
            let Some(path) = (entry.path().strip_prefix(&self.folder).ok())
                .and_then(|p| p.to_str())
                .and_then(|p| FilePath::new(p).ok())
            else {
                continue;
            };
            let path = path.as_str().to_owned();
            present.insert(path.clone());
            if self.writing.contains(&path) {
                unsettled = true;
                continue;
            }
            match self.look_at(entry.path(), &path, now) {
                Looked::Same => continue,
                Looked::Unsettled => {
                    unsettled = true;
                    continue;
                }
                Looked::Changed => {}
            }
            if let Some(k) = self.state.files.get(&path) {
                arrived.insert(k.version.blake3);
            }
            changes.push(Change::Changed(path));
        }
        // While a file is still being written, files gone wait too: a rename shows as a file
        // gone and one not settled yet, and recorded together (the new name first) the peers
        // copy the content they hold instead of fetching it.
        if unsettled {
            return Ok((changes, unsettled));
        }
        let (gone, waiting) = self.gone(within, &present, &arrived, now);
        if waiting {
            unsettled = true;
        }
        let when = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for path in gone {
            self.missing.remove(&path);
            let empty = *blake3::hash(b"").as_bytes();
            self.change(&path, 0, empty, true, when, None);
            changes.push(Change::Deleted(path));
        }
        Ok((changes, unsettled))
    }

    /// The files of `within` (all if `None`) the index knows and the scan did not find
    /// (`present`) that are now taken as deleted, and whether others still wait for that.
    fn gone(
        &mut self,
        within: Option<&[String]>,
        present: &std::collections::HashSet<String>,
        arrived: &std::collections::HashSet<Hash32>,
        now: SystemTime,
    ) -> (Vec<String>, bool) {
        let looked_at = |p: &str| {
            within.is_none_or(|w| {
                w.iter().any(|r| {
                    p == r
                        || p.strip_prefix(r.as_str())
                            .is_some_and(|t| t.starts_with('/'))
                })
            })
        };
        let gone: Vec<String> = (self.state.files.iter())
            .filter(|(p, k)| !k.version.deleted && !present.contains(*p) && looked_at(p))
            .filter(|(p, _)| !self.writing.contains(*p))
            .map(|(p, _)| p.clone())
            .collect();
        // A file is taken as deleted once it has been missing for SETTLE (the other half of a
        // rename may come in a later batch of events), or at once if its content has just
        // arrived under another name: the move is recorded whole, in one page for the peers.
        let now_missing: std::collections::HashSet<&String> = gone.iter().collect();
        self.missing
            .retain(|p, _| now_missing.contains(p) || !looked_at(p));
        let mut waiting = false;
        let gone: Vec<String> = (gone.iter())
            .filter(|p| {
                let since = *self.missing.entry((*p).clone()).or_insert(now);
                let moved =
                    (self.state.files.get(*p)).is_some_and(|k| arrived.contains(&k.version.blake3));
                let long = moved || since + SETTLE <= now;
                waiting |= !long;
                long
            })
            .cloned()
            .collect();
        (gone, waiting)
    }

    /// Looks at the file `at` (the folder's `path`): the same as the index knows it, still being
    /// written, or a new version (recorded).
    fn look_at(&mut self, at: &Path, path: &str, now: SystemTime) -> Looked {
        let Ok(meta) = fs::symlink_metadata(at) else {
            return Looked::Same;
        };
        let key = FileKey::of(&meta);
        let known = self.state.files.get(path);
        if known.is_some_and(|k| k.key == Some(key) && !k.version.deleted) {
            return Looked::Same;
        }
        if !settled(&key, now) {
            return Looked::Unsettled;
        }
        let Ok(Some(seen)) = Seen::of(at) else {
            return Looked::Same;
        };
        let key = seen.key;
        if let Some(k) = self.state.files.get_mut(path)
            && !k.version.deleted
            && k.version.blake3 == seen.blake3
        {
            k.key = Some(key);
            return Looked::Same;
        }
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
        let modified = mtime.map_or(0, |d| d.as_secs() as i64);
        self.change(path, key.size, seen.blake3, false, modified, Some(key));
        if key.size <= MAX_MERGED
            && let Ok((data, _)) = super::read_small_file(at, MAX_MERGED)
        {
            self.keep_object(&seen.blake3, &data);
        }
        Looked::Changed
    }

    /// A change made here: our counter bumped, the next sequence number.
    fn change(
        &mut self,
        path: &str,
        size: u64,
        blake3: Hash32,
        deleted: bool,
        modified: i64,
        key: Option<FileKey>,
    ) {
        let before = self.state.files.get(path).map(|k| &k.version);
        let mut vector = before.map_or_else(Vector::default, |v| v.vector.clone());
        vector.bump(&self.me);
        let parent = before.filter(|v| !v.deleted).map(|v| v.blake3);
        let by = self.me.as_str().to_owned();
        let version = Version {
            size,
            blake3,
            deleted,
            vector,
            modified,
            by,
            parent,
        };
        self.insert(path, version, key);
    }

    /// `version` of `path` under the next sequence number.
    fn insert(&mut self, path: &str, version: Version, key: Option<FileKey>) {
        self.state.sequence += 1;
        let sequence = self.state.sequence;
        let known = Known {
            version,
            sequence,
            key,
        };
        if let Some(old) = self.state.files.insert(path.to_owned(), known) {
            self.order.remove(&old.sequence);
        }
        self.order.insert(sequence, path.to_owned());
    }

    /// Notes that the sync itself writes (or removes) `path` now, until it records it or calls
    /// this with `false`: scans leave it alone meanwhile.
    pub fn writing(&mut self, path: &str, on: bool) {
        match on {
            true => self.writing.insert(path.to_owned()),
            false => self.writing.remove(path),
        };
    }

    /// Whether the sync itself is writing `path` now.
    pub fn is_writing(&self, path: &str) -> bool {
        self.writing.contains(path)
    }

    /// Records `version` of `path` as what is here now (taken from a peer, merged, or
    /// relabelled), found on disk as `at` (`None` once deleted). It gets the next sequence
    /// number, so peers that have not seen it learn it from us too.
    pub fn record(&mut self, path: &str, version: Version, at: Option<&Path>) {
        self.writing.remove(path);
        // An edit here between our write and now must not pass for our write: a file of
        // another size is left without an identity, so the next scan hashes it.
        let key = at
            .and_then(|p| fs::symlink_metadata(p).ok())
            .map(|m| FileKey::of(&m))
            .filter(|k| version.deleted || k.size == version.size);
        self.insert(path, version, key);
    }

    /// Whether the file at `at` (the folder's `path`) is as the index last saw it: the same
    /// identity, or absent where the index knows none or a tombstone.
    pub fn is_current(&self, path: &str, at: &Path) -> bool {
        let now = fs::symlink_metadata(at).ok().map(|m| FileKey::of(&m));
        match (self.state.files.get(path), now) {
            (None, None) => true,
            (Some(k), None) => k.version.deleted,
            (Some(k), Some(now)) => !k.version.deleted && k.key == Some(now),
            (None, Some(_)) => false,
        }
    }

    /// Keeps `data` (whose BLAKE3 must be `blake3`), if it is text of at most [`MAX_MERGED`]
    /// bytes, as a possible ancestor for a three-way merge. Best effort: a merge without its
    /// ancestor becomes a conflict copy, nothing worse.
    pub fn keep_object(&self, blake3: &Hash32, data: &[u8]) {
        let text = !data.contains(&0) && std::str::from_utf8(data).is_ok();
        if data.len() as u64 > MAX_MERGED || !text || blake3::hash(data).as_bytes() != blake3 {
            return;
        }
        let dir = self.file.with_extension("objects");
        let at = dir.join(crate::model::manifest::hex(blake3));
        if at.exists() {
            return;
        }
        let temp = dir.join(format!(".{}.tmp", std::process::id()));
        let kept = fs::create_dir_all(&dir)
            .and_then(|()| fs::write(&temp, data))
            .and_then(|()| fs::rename(&temp, &at));
        if let Err(e) = kept {
            let _ = fs::remove_file(&temp);
            tracing::debug!("not keeping an ancestor for merges: {e}");
        }
    }

    /// The content `blake3` if it was kept for merges (and still hashes to it).
    pub fn object(&self, blake3: &Hash32) -> Option<Vec<u8>> {
        let at = self
            .file
            .with_extension("objects")
            .join(crate::model::manifest::hex(blake3));
        let (data, _) = super::read_small_file(&at, MAX_MERGED).ok()?;
        (blake3::hash(&data).as_bytes() == blake3).then_some(data)
    }

    /// Removes the kept contents no version in the index is or was made from.
    pub fn prune_objects(&self) {
        let dir = self.file.with_extension("objects");
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        let wanted: std::collections::HashSet<String> = (self.state.files.values())
            .filter(|k| !k.version.deleted)
            .flat_map(|k| [Some(k.version.blake3), k.version.parent])
            .flatten()
            .map(|b| crate::model::manifest::hex(&b))
            .collect();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !wanted.contains(&name) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// A file of the folder that held content `blake3` when it was last seen (to copy it
    /// rather than fetch it: a rename or move moves no file bytes).
    pub fn holding(&self, blake3: &Hash32) -> Option<PathBuf> {
        let (path, _) = (self.state.files.iter())
            .find(|(_, k)| !k.version.deleted && k.version.blake3 == *blake3)?;
        Some(self.folder.join(path))
    }

    /// The version of `path` here, if the index knows one (a tombstone too).
    pub fn get(&self, path: &str) -> Option<&Version> {
        self.state.files.get(path).map(|k| &k.version)
    }

    /// The first `limit` files changed after sequence `since`, in the order of their changes,
    /// whether more follow, and our last sequence number.
    pub fn since(&self, since: u64, limit: usize) -> (Vec<(String, Version, u64)>, bool, u64) {
        let mut after = self.order.range(since.saturating_add(1)..);
        let out = (after.by_ref().take(limit))
            .filter_map(|(&seq, path)| {
                Some((
                    path.clone(),
                    self.state.files.get(path)?.version.clone(),
                    seq,
                ))
            })
            .collect();
        (out, after.next().is_some(), self.state.sequence)
    }

    /// Our last sequence number.
    pub fn last(&self) -> u64 {
        self.state.sequence
    }

    /// The last sequence number of `peer`'s index we took in.
    pub fn seen(&self, peer: &str) -> u64 {
        self.state.seen.get(peer).copied().unwrap_or(0)
    }

    /// Notes that we took in `peer`'s index up to `sequence`.
    pub fn saw(&mut self, peer: &str, sequence: u64) {
        self.state.seen.insert(peer.to_owned(), sequence);
    }

    /// Writes the index (temporary file, flushed, renamed over the old one).
    pub fn save(&self) -> Result<(), StoreError> {
        let temp = self.file.with_extension("tmp");
        let io = |e| StoreError::io("writing", &temp, e);
        let mut bytes = MAGIC.to_vec();
        bytes.extend(postcard::to_stdvec(&self.state).map_err(|e| io(io::Error::other(e)))?);
        let mut f = File::create(&temp).map_err(io)?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        fs::rename(&temp, &self.file).map_err(|e| StoreError::io("renaming", &temp, e))
    }
}

/// What `status` tells of one synced folder, read from its index.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The folder's name (a path in `served_files`; empty for all of it).
    pub name: String,
    /// Files in it now.
    pub files: usize,
    /// Conflict copies in it now.
    pub conflicts: Vec<String>,
    /// How far we took in each peer's index.
    pub seen: BTreeMap<String, u64>,
    /// Our last sequence number.
    pub sequence: u64,
    /// Whether its marker is there.
    pub marked: bool,
}

/// The folders synced in `root` (`served_files`), from their indexes (read only).
pub fn synced_folders(root: &Path) -> Vec<Summary> {
    let Ok(entries) = fs::read_dir(root.join(SYNC_DIR)) else {
        return Vec::new();
    };
    let mut out: Vec<Summary> = (entries.flatten())
        .filter(|e| e.path().extension().is_some_and(|x| x == "index"))
        .filter_map(|e| decode(&fs::read(e.path()).ok()?))
        .map(|state| {
            let live = state.files.iter().filter(|(_, k)| !k.version.deleted);
            let conflicts = (live.clone())
                .filter(|(p, _)| p.contains(".sync-conflict-"))
                .map(|(p, _)| p.clone())
                .collect();
            let folder = match state.name.as_str() {
                "" => root.to_owned(),
                name => root.join(name),
            };
            Summary {
                files: live.count(),
                conflicts,
                marked: folder.join(MARKER).is_file(),
                name: state.name,
                seen: state.seen,
                sequence: state.sequence,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Whether a file of identity `key` has been left alone long enough before `now`.
fn settled(key: &FileKey, now: SystemTime) -> bool {
    let changed = |(s, n): (i64, i64)| {
        SystemTime::UNIX_EPOCH + Duration::new(s.max(0) as u64, n.clamp(0, 999_999_999) as u32)
    };
    changed(key.mtime).max(changed(key.ctime)) + SETTLE <= now
}

fn decode(bytes: &[u8]) -> Option<OnDisk> {
    let body = bytes.strip_prefix(&MAGIC[..])?;
    postcard::from_bytes(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synced folder's index: each change here bumps our counter and takes the next sequence
    /// number; a file still being written waits; a file gone becomes a tombstone; the index comes
    /// back as saved; and without its marker the folder is not scanned (its files' absence never
    /// becomes deletes).
    #[test]
    fn a_synced_folders_index_records_changes_and_needs_its_marker() {
        let root = tempfile::tempdir().unwrap();
        let me: PeerId = "p1".parse().unwrap();
        assert!(
            SyncIndex::open(root.path(), "notes", me.clone()).is_err(),
            "no folder yet"
        );
        let notes = root.path().join("notes");
        fs::create_dir(&notes).unwrap();
        fs::write(notes.join("a.txt"), "a").unwrap();
        fs::write(notes.join("b.txt"), "b").unwrap();
        let mut index = SyncIndex::open(root.path(), "notes", me.clone()).unwrap();
        assert!(notes.join(MARKER).is_file());
        let later = || SystemTime::now() + Duration::from_secs(1);
        let (changes, unsettled) = index.scan(later()).unwrap();
        assert_eq!(changes.len(), 2);
        assert!(!unsettled);
        assert_eq!(index.last(), 2);
        assert!(index.scan(later()).unwrap().0.is_empty(), "nothing changed");

        fs::write(notes.join("b.txt"), "b, edited").unwrap();
        assert_eq!(
            index.scan(later()).unwrap().0,
            vec![Change::Changed("b.txt".into())]
        );
        let b = index.get("b.txt").unwrap();
        assert_eq!((b.vector.get("p1"), b.size), (2, 9));
        let (after, _, last) = index.since(2, usize::MAX);
        assert_eq!(
            (after.len(), after[0].0.as_str(), after[0].2, last),
            (1, "b.txt", 3, 3)
        );

        // Still being written: left for a later scan.
        fs::write(notes.join("c.txt"), "c").unwrap();
        let (changes, unsettled) = index.scan(SystemTime::now()).unwrap();
        assert!(changes.is_empty() && unsettled);

        // Gone: a delete once it has been missing a while (the other half of a rename may follow).
        fs::remove_file(notes.join("a.txt")).unwrap();
        let (changes, unsettled) = index.scan(later()).unwrap();
        assert!(!changes.contains(&Change::Deleted("a.txt".into())) && unsettled);
        let (changes, _) = index.scan(later() + Duration::from_secs(1)).unwrap();
        assert!(
            changes.contains(&Change::Deleted("a.txt".into())),
            "{changes:?}"
        );
        assert!(index.get("a.txt").unwrap().deleted);
        index.saw("p2", 17);
        index.save().unwrap();

        let mut again = SyncIndex::open(root.path(), "notes", me).unwrap();
        assert_eq!(
            (again.since(0, usize::MAX).0.len(), again.seen("p2")),
            (3, 17)
        );
        // A page: the oldest changes first, and whether more follow.
        let (page, more, _) = again.since(0, 2);
        let sequences: Vec<u64> = page.iter().map(|(_, _, s)| *s).collect();
        assert_eq!((sequences, more), (vec![3, 4], true));
        assert!(!again.since(3, 2).1);
        // The marker gone: nothing is scanned, no delete recorded.
        fs::remove_file(notes.join(MARKER)).unwrap();
        fs::remove_file(notes.join("b.txt")).unwrap();
        assert!(again.scan(later()).is_err());
        assert!(!again.get("b.txt").unwrap().deleted);
    }
}
