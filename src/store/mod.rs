//! `served_files`: what a peer serves and where downloads and uploads land.
//!
//! - Listing keeps regular files with valid names only: symlinks, folders and hidden files (our
//!   temporary `.<name>…part` files among them) are never listed or served.
//! - Manifests are cached, keyed by (size, mtime, ctime, inode, device), so a changed file is noticed
//!   and described afresh; a file that changes while being hashed is hashed again.
//! - Chunk reads open the file afresh, re-check it, and read one chunk of its layout at most
//!   (seek, then read into spare capacity: no zeroing of a buffer about to be filled).
//! - [`PartialFile`] is how anything new appears: a hidden temporary file in the target's own folder
//!   (so the final rename stays on one file system), space reserved up front (a full disk fails at
//!   once, not half-way), positional writes, fsync, hash check, then a link to the final name that
//!   never replaces an existing file. An uncommitted one is removed on drop.
//!
//! All of it is blocking file I/O: async callers run it on `spawn_blocking`. It knows nothing of
//! QUIC, postcard or peers, and takes names only as [`FilePath`].

mod batch;
mod displaced;
mod hashes;
pub mod held;
mod listing;
mod offered;
mod partial;
pub mod synced;
#[cfg(test)]
mod tests;
mod trees;
mod unix;
mod uploads;

pub use batch::Batch;
pub use displaced::{
    DISPLACED_DIR, DISPLACED_KEPT, DISPLACED_MAX_BYTES, DISPLACED_MAX_FILES, displace,
};
pub use hashes::{HASHES_FILE, Walked, walk_hashed};
use offered::{Damaged, HeldCache};
pub use offered::{Held, download_tag};
pub use partial::{Check, Committed, PartialFile, Seen};
use trees::TreeCache;
pub use unix::read_small_file;
use unix::*;
pub use uploads::Upload;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::model::delta::{SigKind, Tree};
use crate::model::manifest::{
    ChunkSet, FilePath, Hash32, MAX_WHOLE_FILE, Manifest, chunk_size_for, hex, piece_size_for,
};
use held::HeldWriter;

/// A store failure, typed so callers can branch on the cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No regular file of that name is served.
    #[error("{0} is not served here")]
    NotFound(FilePath),
    /// A different file already has that name.
    #[error("a different file named {0} already exists")]
    Conflict(String),
    /// A synced folder cannot be synced as it is (missing, unmarked, its index damaged).
    #[error("{0}")]
    Sync(String),
    /// `.qnodeignore` hides the path: not served, not stored.
    #[error("{0} is hidden by .qnodeignore here")]
    Ignored(FilePath),
    /// Another transfer of that name is in progress.
    #[error("another transfer of {0} is in progress")]
    Busy(String),
    /// The file to be replaced changed while its replacement was prepared; neither was lost.
    #[error(
        "{0} changed while its new version was being prepared; nothing was replaced (run the command again)"
    )]
    Changed(String),
    /// A read outside the file.
    #[error("range {offset}+{len} is outside {name} ({size} bytes)")]
    OutOfRange {
        /// The file.
        name: FilePath,
        /// Requested start.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The file's size.
        size: u64,
    },
    /// A read that is not one chunk of the file's layout.
    #[error(
        "range {offset}+{len} of {name} is not one chunk (chunks are {chunk} bytes, at multiples of it)"
    )]
    NotAChunk {
        /// The file.
        name: FilePath,
        /// Requested start.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The file's chunk size.
        chunk: u64,
    },
    /// A chunk this peer does not hold verified (a download in progress lacks it).
    #[error("chunk {chunk} of {name} is not held here")]
    NotHeld {
        /// The file.
        name: FilePath,
        /// The chunk.
        chunk: u64,
    },
    /// The disk is full.
    #[error("no space left on the device for {0}")]
    NoSpace(String),
    /// Written bytes did not hash to what was expected.
    #[error("{name} is corrupt: expected BLAKE3 {expected}, got {actual}")]
    Corrupt {
        /// The file.
        name: String,
        /// The expected hash (hex).
        expected: String,
        /// What the bytes hash to (hex).
        actual: String,
    },
    /// Any other file-system failure.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What we were doing.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl Clone for StoreError {
    /// A copy for each asker of work done once (`shared::TreeJobs`); an OS error keeps its kind
    /// and message.
    fn clone(&self) -> Self {
        match self {
            Self::NotFound(n) => Self::NotFound(n.clone()),
            Self::Conflict(s) => Self::Conflict(s.clone()),
            Self::Sync(s) => Self::Sync(s.clone()),
            Self::Ignored(n) => Self::Ignored(n.clone()),
            Self::Busy(s) => Self::Busy(s.clone()),
            Self::Changed(s) => Self::Changed(s.clone()),
            Self::OutOfRange {
                name,
                offset,
                len,
                size,
            } => Self::OutOfRange {
                name: name.clone(),
                offset: *offset,
                len: *len,
                size: *size,
            },
            Self::NotAChunk {
                name,
                offset,
                len,
                chunk,
            } => Self::NotAChunk {
                name: name.clone(),
                offset: *offset,
                len: *len,
                chunk: *chunk,
            },
            Self::NotHeld { name, chunk } => Self::NotHeld {
                name: name.clone(),
                chunk: *chunk,
            },
            Self::NoSpace(s) => Self::NoSpace(s.clone()),
            Self::Corrupt {
                name,
                expected,
                actual,
            } => Self::Corrupt {
                name: name.clone(),
                expected: expected.clone(),
                actual: actual.clone(),
            },
            Self::Io { what, path, source } => Self::Io {
                what,
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
        }
    }
}

impl StoreError {
    fn io(what: &'static str, path: &Path, source: io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.kind() == io::ErrorKind::StorageFull
        {
            return Self::NoSpace(path.display().to_string());
        }
        Self::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

/// What identifies one version of a file on disk (size, mtime, ctime, inode, device), for the
/// caches and to notice a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FileKey {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    dev: u64,
}

impl FileKey {
    /// The same file with the same size and mtime (its ctime may differ: a new link).
    fn same_content(&self, other: &Self) -> bool {
        (self.ino, self.dev, self.size, self.mtime)
            == (other.ino, other.dev, other.size, other.mtime)
    }

    fn of(m: &fs::Metadata) -> Self {
        Self {
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        }
    }
}

/// A walk of the tree under `dir` as a served tree is read: hidden entries skipped, symlinks
/// never followed, no deeper than a path may go.
pub fn walk_tree(dir: &Path) -> ignore::Walk {
    tree_walker(dir).build()
}

fn tree_walker(dir: &Path) -> ignore::WalkBuilder {
    let mut walker = ignore::WalkBuilder::new(dir);
    walker
        .standard_filters(false)
        .hidden(true)
        .follow_links(false)
        .max_depth(Some(crate::model::name::MAX_PATH_DEPTH));
    walker
}

/// Whether `rules` hide `path` or a folder it is in.
fn hides(rules: &ignore::gitignore::Gitignore, path: &FilePath) -> bool {
    rules
        .matched_path_or_any_parents(path.as_str(), false)
        .is_ignore()
}

/// A listing: every served file with its manifest, sorted by path.
pub type Listed = Arc<Vec<(FilePath, Arc<Manifest>)>>;

/// How long a listing serves the pages after its first.
pub const LISTING_KEPT: std::time::Duration = std::time::Duration::from_secs(30);

/// The file in `served_files` whose patterns (gitignore syntax) hide paths from listing, serving
/// and uploading.
pub const IGNORE_FILE: &str = ".qnodeignore";

/// Creates the folders `path` is in beneath `root` (`served_files`, or a download's output
/// folder), each a real folder: a symlink or a file on the way is refused, never followed.
pub fn make_folders(root: &Path, path: &FilePath) -> Result<(), StoreError> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    make_folders_beneath(root, parent).map_err(|e| match e.kind() {
        io::ErrorKind::NotADirectory => StoreError::Conflict(format!("{parent} (not a folder)")),
        _ => StoreError::io("creating the folders of", &root.join(path.as_str()), e),
    })
}

/// A served file's manifests, as last hashed.
#[derive(Debug, Clone)]
pub struct Described {
    /// The file as it was hashed.
    key: FileKey,
    /// Its manifest.
    pub manifest: Arc<Manifest>,
    /// In pieces, if the file has them.
    pub pieces: Option<Arc<Manifest>>,
}

/// A peer's `served_files` folder.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// Manifests by name. A std `Mutex`: it is held only for a map lookup or insert, never across
    /// hashing or an `.await`.
    cache: Mutex<HashMap<FilePath, Described>>,
    /// Names with an upload in progress, so two uploads of one name never interleave.
    uploads: Arc<Mutex<HashSet<FilePath>>>,
    /// Content-defined trees (`delta`) of the last few files asked for, by name and signature
    /// kind (peers of both protocol versions may ask for one file's tree).
    trees: Mutex<TreeCache>,
    /// Manifests of downloads in progress (from their sidecars), by sidecar path, with the
    /// sidecar's identity and where its bits start.
    held: Mutex<HeldCache>,
    /// Units of downloads in progress here that failed their check when read.
    damaged: Damaged,
    /// The last listing and when it was made, for the pages after a listing's first.
    listing: Mutex<Option<(std::time::Instant, Listed)>>,
    /// The `.qnodeignore` matcher, with the identity of the file it was read from.
    ignore: Mutex<Option<(FileKey, Arc<ignore::gitignore::Gitignore>)>>,
    /// Names whose manifest is being hashed, each with the lock its hashing holds.
    hashing: Mutex<HashMap<FilePath, Arc<Mutex<()>>>>,
}

impl Store {
    /// Opens the store at `dir`, which must be a folder.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        let meta = fs::metadata(&dir).map_err(|e| StoreError::io("opening", &dir, e))?;
        if !meta.is_dir() {
            return Err(StoreError::io(
                "opening",
                &dir,
                io::Error::new(io::ErrorKind::NotADirectory, "not a folder"),
            ));
        }
        Ok(Self {
            dir,
            cache: Mutex::default(),
            uploads: Arc::default(),
            trees: Mutex::default(),
            held: Mutex::default(),
            damaged: Damaged::default(),
            listing: Mutex::default(),
            ignore: Mutex::default(),
            hashing: Mutex::default(),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `name` lives (whether or not it exists).
    pub fn path_of(&self, name: &FilePath) -> PathBuf {
        self.dir.join(name.as_str())
    }

    /// Every served file with its manifest, sorted by path: the whole tree, hidden entries and
    /// symlinks skipped at every depth (a symlinked folder is never entered), and what
    /// `.qnodeignore` hides left out.
    pub fn list(&self) -> Result<Vec<(FilePath, Arc<Manifest>)>, StoreError> {
        let paths = self.walk()?;
        // Room for every file at once: growing the cache as it fills holds two tables at once.
        {
            let mut cache = self.lock_cache();
            let more = paths.len().saturating_sub(cache.len());
            cache.reserve(more);
        }
        let mut out = Vec::with_capacity(paths.len());
        for path in paths {
            match self.listed_manifest(&path) {
                Ok(m) => out.push((path, m)),
                // Removed or replaced by a non-file since the walk: not served.
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// [`list`](Self::list) made now (`fresh`, a listing's first page), or the one made last
    /// if it is younger than [`LISTING_KEPT`] (the pages after the first: one walk per listing,
    /// and its pages agree with each other).
    pub fn listing(&self, fresh: bool) -> Result<Listed, StoreError> {
        let now = std::time::Instant::now();
        if !fresh {
            let last = self.listing.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, listed)) = last.as_ref()
                && now.saturating_duration_since(*at) < LISTING_KEPT
            {
                return Ok(listed.clone());
            }
        }
        // The last listing goes first: a large tree's two listings are not held at once.
        *self.listing.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let listed = Arc::new(self.list()?);
        *self.listing.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, listed.clone()));
        Ok(listed)
    }

    /// The paths of the regular files in the tree, as [`list`](Self::list) serves them.
    fn walk(&self) -> Result<Vec<FilePath>, StoreError> {
        let walker = walk_tree(&self.dir);
        let mut paths = Vec::new();
        let ignore = self.ignore_rules();
        for entry in walker {
            let entry = entry.map_err(|e| {
                let e = e
                    .into_io_error()
                    .unwrap_or_else(|| io::Error::other("walk failed"));
                StoreError::io("listing", &self.dir, e)
            })?;
            // Not followed: a symlink is a symlink here, never a file or a folder.
            if !entry.file_type().is_some_and(|t| t.is_file()) {
                continue;
            }
            let Ok(rel) = entry.path().strip_prefix(&self.dir) else {
                continue;
            };
            let Some(path) = rel.to_str().and_then(|r| FilePath::new(r).ok()) else {
                continue;
            };
            if !ignore.as_ref().is_some_and(|rules| hides(rules, &path)) {
                paths.push(path);
            }
        }
        Ok(paths)
    }

    /// Whether `served_files/.qnodeignore` (gitignore syntax) hides `path`. The file is read
    /// again when it changes.
    pub fn ignored(&self, path: &FilePath) -> bool {
        self.ignore_rules().is_some_and(|rules| hides(&rules, path))
    }

    /// The rules of `.qnodeignore` as the file is now, if there is one.
    fn ignore_rules(&self) -> Option<Arc<ignore::gitignore::Gitignore>> {
        let file = self.dir.join(IGNORE_FILE);
        let meta = fs::symlink_metadata(&file).ok()?;
        let key = FileKey::of(&meta);
        let mut cached = self.ignore.lock().unwrap_or_else(|p| p.into_inner());
        if cached.as_ref().is_none_or(|(k, _)| *k != key) {
            let mut builder = ignore::gitignore::GitignoreBuilder::new(&self.dir);
            if meta.is_file()
                && let Some(e) = builder.add(&file)
            {
                tracing::warn!("{}: {e}", file.display());
            }
            let matcher = builder.build().unwrap_or_else(|e| {
                tracing::warn!("{}: {e}", file.display());
                ignore::gitignore::Gitignore::empty()
            });
            *cached = Some((key, Arc::new(matcher)));
        }
        cached.as_ref().map(|(_, m)| m.clone())
    }

    /// The manifest of `name` and, if the file has pieces
    /// ([`piece_size_for`](crate::model::manifest::piece_size_for) its size), its manifest in pieces,
    /// if a regular file of that name exists; both cached, from one look at the file.
    pub fn lookup_with_pieces(&self, name: &FilePath) -> Result<Option<Described>, StoreError> {
        match self.described(name) {
            Ok(d) => Ok(Some(d)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn described(&self, name: &FilePath) -> Result<Described, StoreError> {
        let path = self.path_of(name);
        for _attempt in 0..3 {
            let (file, key) = self.open_regular(name)?;
            if let Some(d) = self.lock_cache().get(name)
                && d.key == key
            {
                return Ok(d.clone());
            }
            // One hashing of a name at a time: the others wait for it and find it cached,
            // instead of each reading the whole file.
            let gate = self
                .hashing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(name.clone())
                .or_default()
                .clone();
            let turn = gate.lock().unwrap_or_else(|p| p.into_inner());
            let done = || {
                let mut hashing = self.hashing.lock().unwrap_or_else(|p| p.into_inner());
                // Ours and the map's: no one else waits.
                if Arc::strong_count(&gate) == 2 {
                    hashing.remove(name);
                }
            };
            if let Some(d) = self.lock_cache().get(name)
                && d.key == key
            {
                drop(turn);
                done();
                return Ok(d.clone());
            }
            let manifest = Manifest::of_file_with_pieces(&file, key.size);
            drop(turn);
            done();
            let after = file
                .metadata()
                .map(|m| FileKey::of(&m))
                .map_err(|e| StoreError::io("reading", &path, e))?;
            match manifest {
                Ok((m, pieces)) if after == key => {
                    let d = Described {
                        key,
                        manifest: Arc::new(m),
                        pieces: pieces.map(Arc::new),
                    };
                    self.lock_cache().insert(name.clone(), d.clone());
                    return Ok(d);
                }
                // Changed while we read it (or it was too large or short): look again.
                Ok(_) => continue,
                Err(e) if after != key => {
                    tracing::debug!(%name, "file changed while hashing: {e}");
                    continue;
                }
                Err(e) => return Err(StoreError::io("hashing", &path, e)),
            }
        }
        Err(StoreError::Busy(format!("{name} (it keeps changing)")))
    }

    /// The manifest of `name` if a regular file of that name exists.
    pub fn lookup(&self, name: &FilePath) -> Result<Option<Arc<Manifest>>, StoreError> {
        Ok(self.lookup_with_pieces(name)?.map(|d| d.manifest))
    }

    fn read_open(
        &self,
        name: &FilePath,
        file: File,
        key: FileKey,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, StoreError> {
        let len64 = u64::from(len);
        if offset.checked_add(len64).is_none_or(|end| end > key.size) {
            return Err(StoreError::OutOfRange {
                name: name.clone(),
                offset,
                len: len64,
                size: key.size,
            });
        }
        // The file handle is ours alone (opened for this read), so seeking it is free of races;
        // `read_to_end` fills spare capacity without zeroing it first.
        let io = |e| StoreError::io("reading", &self.path_of(name), e);
        let mut file = file;
        io::Seek::seek(&mut file, io::SeekFrom::Start(offset)).map_err(io)?;
        let mut buf = Vec::with_capacity(len as usize);
        file.take(len64).read_to_end(&mut buf).map_err(io)?;
        if buf.len() != len as usize {
            // Shrunk since we looked at its size.
            return Err(io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while reading",
            )));
        }
        Ok(buf)
    }

    /// Reads `len` bytes of `name` at any `offset`, at most one chunk of its layout long (the same
    /// memory bound as [`read_chunk`](Self::read_chunk)).
    pub fn read_range(
        &self,
        name: &FilePath,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, StoreError> {
        self.read_bounded(name, offset, len, false)
    }

    /// Reads one chunk of `name`: `offset` must start a chunk of the file's layout
    /// ([`chunk_size_for`] its size), or a piece where it has pieces (a download in pieces asks
    /// for pieces), and `len` be at most one chunk, so a request can never make the server hold
    /// more than one chunk of memory, whatever length it asks for.
    pub fn read_chunk(
        &self,
        name: &FilePath,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, StoreError> {
        self.read_bounded(name, offset, len, true)
    }

    /// Reads the whole of `name` if it is version `blake3`, `len` bytes long, and small: at most
    /// [`MAX_WHOLE_FILE`] (so, like a chunk, a request never makes the server hold more).
    pub fn read_whole(
        &self,
        name: &FilePath,
        blake3: &Hash32,
        len: u32,
    ) -> Result<Vec<u8>, StoreError> {
        let (file, key) = self.open_regular(name)?;
        if u64::from(len) > MAX_WHOLE_FILE || key.size != u64::from(len) {
            return Err(StoreError::NotAChunk {
                name: name.clone(),
                offset: 0,
                len: u64::from(len),
                chunk: key.size.min(MAX_WHOLE_FILE),
            });
        }
        if self.lookup(name)?.is_none_or(|m| m.blake3() != *blake3) {
            return Err(StoreError::NotFound(name.clone()));
        }
        self.read_open(name, file, key, 0, len)
    }

    /// Reads at most one chunk's length, starting a chunk or piece if `aligned`.
    fn read_bounded(
        &self,
        name: &FilePath,
        offset: u64,
        len: u32,
        aligned: bool,
    ) -> Result<Vec<u8>, StoreError> {
        let (file, key) = self.open_regular(name)?;
        let chunk = chunk_size_for(key.size);
        let start = piece_size_for(key.size).unwrap_or(chunk);
        if (aligned && !offset.is_multiple_of(start)) || u64::from(len) > chunk {
            return Err(StoreError::NotAChunk {
                name: name.clone(),
                offset,
                len: u64::from(len),
                chunk,
            });
        }
        self.read_open(name, file, key, offset, len)
    }

    /// The manifest of whatever is at `name`: `None` if nothing, a conflict if it is not a file.
    fn existing(&self, name: &FilePath) -> Result<Option<Arc<Manifest>>, StoreError> {
        let path = self.path_of(name);
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("inspecting", &path, e)),
            Ok(m) if !m.is_file() => Err(StoreError::Conflict(name.to_string())),
            Ok(_) => self.lookup(name),
        }
    }

    /// Opens `name` if it is a regular file (not a symlink), returning it with its identity.
    ///
    /// Opened without following a link and without blocking (a FIFO put in its place would block
    /// `open` forever), then checked with `fstat`: what was opened is what is read.
    fn open_regular(&self, name: &FilePath) -> Result<(File, FileKey), StoreError> {
        let path = self.path_of(name);
        let not_found = || StoreError::NotFound(name.clone());
        if self.ignored(name) {
            return Err(not_found());
        }
        let file = match open_beneath(&self.dir, name) {
            Ok(f) => f,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound || not_regular(&e) || not_a_folder(&e) =>
            {
                return Err(not_found());
            }
            Err(e) => return Err(StoreError::io("opening", &path, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| StoreError::io("inspecting", &path, e))?;
        if !meta.is_file() {
            return Err(not_found());
        }
        Ok((file, FileKey::of(&meta)))
    }

    /// Free and total bytes of the file system holding the store, as an unprivileged user sees it.
    pub fn disk_space(&self) -> Result<(u64, u64), StoreError> {
        disk_space(&self.dir).map_err(|e| StoreError::io("measuring free space on", &self.dir, e))
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HeldCache> {
        // Held for one lookup or insert of a whole entry.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_trees(&self) -> std::sync::MutexGuard<'_, TreeCache> {
        // Held for one lookup or insert of a whole entry, never while hashing.
        self.trees.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<FilePath, Described>> {
        // A poisoned lock only means another thread panicked mid-insert of a whole entry; the map
        // itself is still consistent.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}
