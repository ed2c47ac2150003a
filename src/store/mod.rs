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
//! QUIC, postcard or peers, and takes names only as [`FileName`].

pub mod held;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::model::delta::{SigKind, Tree};
use crate::model::manifest::{
    ChunkSet, FileName, Hash32, Manifest, chunk_size_for, hex, piece_size_for,
};
use held::HeldWriter;

/// A store failure, typed so callers can branch on the cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No regular file of that name is served.
    #[error("{0} is not served here")]
    NotFound(FileName),
    /// A different file already has that name.
    #[error("a different file named {0} already exists")]
    Conflict(String),
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
        name: FileName,
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
        name: FileName,
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
        name: FileName,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// Bytes read at a time when a chunk of a download in progress is checked before it is served.
const READ_PART: u64 = 256 * 1024;

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
    cache: Mutex<HashMap<FileName, Described>>,
    /// Names with an upload in progress, so two uploads of one name never interleave.
    uploads: Arc<Mutex<HashSet<FileName>>>,
    /// Content-defined trees (`delta`) of the last few files asked for, by name and signature
    /// kind (peers of both protocol versions may ask for one file's tree).
    trees: Mutex<TreeCache>,
    /// Manifests of downloads in progress (from their sidecars), by sidecar path, with the
    /// sidecar's identity and where its bits start.
    held: Mutex<HeldCache>,
    /// Units of downloads in progress here that failed their check when read, by temporary
    /// file and unit, with that file's identity then: not read again, and logged once.
    damaged: Mutex<HashMap<(PathBuf, u32), FileKey>>,
    /// Names whose manifest is being hashed, each with the lock its hashing holds.
    hashing: Mutex<HashMap<FileName, Arc<Mutex<()>>>>,
}

/// A sidecar's identity (device, inode), its manifest and where its bits start.
type HeldHeader = ((u64, u64), Arc<Manifest>, u64);

/// Sidecar headers kept in memory, least recently used dropped first.
#[derive(Debug, Default)]
struct HeldCache {
    entries: HashMap<PathBuf, (HeldHeader, u64)>,
    /// Bytes of the manifests held.
    bytes: usize,
    tick: u64,
}

impl HeldCache {
    fn get(&mut self, sidecar: &Path, id: (u64, u64)) -> Option<(Arc<Manifest>, u64)> {
        self.tick += 1;
        let tick = self.tick;
        let (header, used) = self.entries.get_mut(sidecar)?;
        if header.0 != id {
            return None;
        }
        *used = tick;
        Some((header.1.clone(), header.2))
    }

    fn insert(&mut self, sidecar: PathBuf, header: HeldHeader) {
        self.tick += 1;
        self.bytes += manifest_bytes(&header.1);
        if let Some((old, _)) = self.entries.insert(sidecar, (header, self.tick)) {
            self.bytes -= manifest_bytes(&old.1);
        }
        while self.entries.len() > HELD_CACHED || self.bytes > HELD_CACHED_BYTES {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((old, _)) = self.entries.remove(&oldest) {
                self.bytes -= manifest_bytes(&old.1);
            }
        }
    }
}

/// Memory a cached manifest takes, about.
fn manifest_bytes(m: &Manifest) -> usize {
    64 + 32 * m.chunk_count() as usize
}

/// Sidecar headers kept in memory: more than the downloads in progress a node has.
const HELD_CACHED: usize = 1024;
/// Bytes of sidecar manifests kept in memory.
const HELD_CACHED_BYTES: usize = 64 << 20;
/// Damaged units remembered; past that the memory starts over.
const DAMAGED_KEPT: usize = 4096;

/// What a download in progress here holds: its version, and the chunks verified so far.
#[derive(Debug, Clone)]
pub struct Held {
    /// The version being downloaded.
    pub manifest: Arc<Manifest>,
    /// The chunks verified and written.
    pub chunks: ChunkSet,
    /// When its sidecar last changed (seconds, nanoseconds).
    pub changed: (i64, i64),
}

impl Held {
    /// The bytes of the chunks held.
    pub fn bytes(&self) -> u64 {
        self.chunks
            .iter()
            .filter_map(|i| self.manifest.chunk_len(i))
            .sum()
    }
}

/// The tag a download's temporary file and sidecar carry: the first 16 hex digits of its
/// version's BLAKE3 (`.<name>.<tag>.part`, `.<name>.<tag>.held`).
pub fn download_tag(blake3: &Hash32) -> String {
    hex(blake3)[..16].to_owned()
}

/// The name and tag of a sidecar's file name, `.<name>.<tag>.held`.
fn held_name(file_name: &str) -> Option<(FileName, &str)> {
    let inner = file_name
        .strip_prefix('.')?
        .strip_suffix(&format!(".{}", held::EXTENSION))?;
    let (name, tag) = inner.rsplit_once('.')?;
    let hex_tag = tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit());
    Some((FileName::new(name).ok()?, tag)).filter(|_| hex_tag)
}

/// Cached trees by name and signature kind, with the file each was read from.
type TreeCache = HashMap<(FileName, SigKind), (FileKey, Arc<Tree>)>;

/// Trees kept in memory (about 3 bytes of tree per KiB of file).
const TREES_CACHED: usize = 8;

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
            damaged: Mutex::default(),
            hashing: Mutex::default(),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `name` lives (whether or not it exists).
    pub fn path_of(&self, name: &FileName) -> PathBuf {
        self.dir.join(name.as_str())
    }

    /// Every served file with its manifest, sorted by name.
    pub fn list(&self) -> Result<Vec<(FileName, Arc<Manifest>)>, StoreError> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| StoreError::io("listing", &self.dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("listing", &self.dir, e))?;
            let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| FileName::new(n).ok())
            else {
                continue;
            };
            // `DirEntry::file_type` does not follow symlinks: only real regular files qualify.
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            match self.manifest(&name) {
                Ok(m) => out.push((name, m)),
                // Removed or replaced by a non-file since read_dir: not served.
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The manifest of `name`, from the cache if the file is unchanged.
    pub fn manifest(&self, name: &FileName) -> Result<Arc<Manifest>, StoreError> {
        Ok(self.described(name)?.manifest)
    }

    /// The manifest of `name` and, if the file has pieces
    /// ([`piece_size_for`](crate::model::manifest::piece_size_for) its size), its manifest in pieces,
    /// if a regular file of that name exists; both cached, from one look at the file.
    pub fn lookup_with_pieces(&self, name: &FileName) -> Result<Option<Described>, StoreError> {
        match self.described(name) {
            Ok(d) => Ok(Some(d)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn described(&self, name: &FileName) -> Result<Described, StoreError> {
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
    pub fn lookup(&self, name: &FileName) -> Result<Option<Arc<Manifest>>, StoreError> {
        Ok(self.lookup_with_pieces(name)?.map(|d| d.manifest))
    }

    /// Reads `len` bytes of `name` at `offset`.
    pub fn read_range(
        &self,
        name: &FileName,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, StoreError> {
        let (file, key) = self.open_regular(name)?;
        self.read_open(name, file, key, offset, len)
    }

    fn read_open(
        &self,
        name: &FileName,
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

    /// The content-defined tree of version `blake3` of `name`, signed as `kind` says; `Conflict`
    /// if the file is now another version.
    pub fn tree(
        &self,
        name: &FileName,
        blake3: Hash32,
        kind: SigKind,
    ) -> Result<Arc<Tree>, StoreError> {
        let key = self.tree_key(name, blake3)?;
        match self.cached_tree(name, kind)? {
            Ok((_, tree)) => Ok(tree),
            Err(now) if now == key => self.compute_tree(name, key, kind, &|| false),
            Err(_) => Err(StoreError::Busy(format!(
                "{name} (it changed while being read)"
            ))),
        }
    }

    /// The identity of the file under `name` if it is version `blake3`; `Conflict` if it is
    /// another version now.
    pub fn tree_key(&self, name: &FileName, blake3: Hash32) -> Result<FileKey, StoreError> {
        let manifest = self.manifest(name)?;
        if manifest.blake3() != blake3 {
            return Err(StoreError::Conflict(format!(
                "{name} (this peer serves another version now)"
            )));
        }
        Ok(self.open_regular(name)?.1)
    }

    /// The cached tree of the regular file under `name` now, signed as `kind` says, with the
    /// identity of that file; or, if none is cached for it, that identity (to compute one).
    #[allow(clippy::type_complexity)]
    pub fn cached_tree(
        &self,
        name: &FileName,
        kind: SigKind,
    ) -> Result<Result<(FileKey, Arc<Tree>), FileKey>, StoreError> {
        let (_, key) = self.open_regular(name)?;
        Ok(match self.lock_trees().get(&(name.clone(), kind)) {
            Some((k, t)) if *k == key => Ok((key, t.clone())),
            _ => Err(key),
        })
    }

    /// Computes (and caches) the tree of the file under `name`, which must still be the file
    /// `key` names (else `Busy`), signed as `kind` says. `stop` is asked between reads: once it
    /// says true (no one waits for the tree any more) the work ends with `Busy`.
    pub fn compute_tree(
        &self,
        name: &FileName,
        key: FileKey,
        kind: SigKind,
        stop: &dyn Fn() -> bool,
    ) -> Result<Arc<Tree>, StoreError> {
        let changed = || StoreError::Busy(format!("{name} (it changed while being read)"));
        let (file, now) = self.open_regular(name)?;
        if now != key {
            return Err(changed());
        }
        let path = self.path_of(name);
        let reader = Stoppable {
            inner: (&file).take(key.size),
            stop,
        };
        let tree = match Tree::of(reader, kind) {
            Ok(t) => t,
            Err(_) if stop() => {
                return Err(StoreError::Busy(format!(
                    "{name} (its tree was no longer wanted)"
                )));
            }
            Err(e) => return Err(StoreError::io("reading", &path, e)),
        };
        let after = file
            .metadata()
            .map(|m| FileKey::of(&m))
            .map_err(|e| StoreError::io("reading", &path, e))?;
        if after != key {
            return Err(changed());
        }
        let tree = Arc::new(tree);
        let mut trees = self.lock_trees();
        if trees.len() >= TREES_CACHED
            && let Some(evict) = trees.keys().next().cloned()
        {
            trees.remove(&evict);
        }
        trees.insert((name.clone(), kind), (key, tree.clone()));
        Ok(tree)
    }

    /// The content-defined tree of the regular file under `name` now, whatever its version,
    /// with the identity of the file it was read from.
    pub fn current_tree(
        &self,
        name: &FileName,
        kind: SigKind,
    ) -> Result<(FileKey, Arc<Tree>), StoreError> {
        match self.cached_tree(name, kind)? {
            Ok(found) => Ok(found),
            Err(key) => Ok((key, self.compute_tree(name, key, kind, &|| false)?)),
        }
    }

    /// What the download of version `blake3` of `name` in progress here holds, if there is one.
    pub fn held(&self, name: &FileName, blake3: &Hash32) -> Result<Option<Held>, StoreError> {
        let file = format!(".{name}.{}.{}", download_tag(blake3), held::EXTENSION);
        self.held_at(&self.dir.join(file), name)
    }

    /// The download of `name` in progress here (the one changed last, if there are several
    /// versions), if there is one.
    pub fn held_any(&self, name: &FileName) -> Result<Option<Held>, StoreError> {
        Ok(self
            .held_all()?
            .into_iter()
            .filter(|(n, _)| n == name)
            .max_by_key(|(_, held)| held.changed)
            .map(|(_, held)| held))
    }

    /// Every download in progress here, by name.
    pub fn held_all(&self) -> Result<Vec<(FileName, Held)>, StoreError> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| StoreError::io("listing", &self.dir, e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some((name, _)) = file_name.to_str().and_then(held_name) else {
                continue;
            };
            if let Some(held) = self.held_at(&entry.path(), &name)? {
                out.push((name, held));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The download a sidecar describes: `None` unless it is a valid sidecar of `name`, named
    /// after its version, beside a temporary file of the right size.
    fn held_at(&self, sidecar: &Path, name: &FileName) -> Result<Option<Held>, StoreError> {
        let io = |e| StoreError::io("reading", sidecar, e);
        let Some(opened) = held::open(sidecar).map_err(io)? else {
            return Ok(None);
        };
        let cached = self.lock_held().get(sidecar, opened.id);
        let (manifest, bits_at) = match cached {
            Some(c) => c,
            None => {
                let Some((m, at)) = opened.header().map_err(io)? else {
                    return Ok(None);
                };
                let m = Arc::new(m);
                let header = (opened.id, m.clone(), at);
                self.lock_held().insert(sidecar.to_owned(), header);
                (m, at)
            }
        };
        let tag = download_tag(&manifest.blake3());
        let named = held_name(&sidecar.file_name().unwrap_or_default().to_string_lossy())
            .is_some_and(|(n, t)| n == *name && t == tag);
        let part = sidecar.with_extension("part");
        let beside =
            fs::symlink_metadata(&part).is_ok_and(|m| m.is_file() && m.len() == manifest.size());
        if !named || !beside {
            return Ok(None);
        }
        let Some(chunks) = opened.bits(bits_at, manifest.chunk_count()).map_err(io)? else {
            return Ok(None);
        };
        Ok(Some(Held {
            manifest,
            chunks,
            changed: opened.changed,
        }))
    }

    /// One chunk of version `blake3` of `name` (`offset` starts it, `len` is its length): from
    /// the whole file if it is that version, else from a download in progress that holds it
    /// verified, checked against its manifest again before it is returned.
    pub fn read_version(
        &self,
        name: &FileName,
        blake3: &Hash32,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, StoreError> {
        if self.lookup(name)?.is_some_and(|m| m.blake3() == *blake3) {
            return self.read_chunk(name, offset, len);
        }
        let Some(held) = self.held(name, blake3)? else {
            return Err(StoreError::NotFound(name.clone()));
        };
        // A chunk or a piece of the file's layout, whatever unit the download here is in: an
        // asker in pieces may read a piece of a chunk held here, one in chunks a chunk of the
        // pieces held here. At most one chunk long.
        let m = &held.manifest;
        let (unit, size) = (m.chunk_size(), m.size());
        let chunk = chunk_size_for(size);
        let start = piece_size_for(size).unwrap_or(chunk);
        let end = offset.saturating_add(u64::from(len));
        let fits = offset.is_multiple_of(start)
            && end <= size
            && u64::from(len) <= chunk
            && (len > 0 || size == 0);
        if !fits {
            return Err(StoreError::NotAChunk {
                name: name.clone(),
                offset,
                len: u64::from(len),
                chunk: start,
            });
        }
        // The units that hold it must all be held, and are read and checked whole. They fit a
        // u32: they are within the file, checked above.
        let (first, last) = (offset / unit, end.div_ceil(unit).max(offset / unit + 1));
        let not_held = |chunk| StoreError::NotHeld {
            name: name.clone(),
            chunk,
        };
        if let Some(i) = (first..last).find(|&i| !held.chunks.contains(i as u32)) {
            return Err(not_held(i));
        }
        let part = self
            .dir
            .join(format!(".{name}.{}.part", download_tag(blake3)));
        let io = |e| StoreError::io("reading", &part, e);
        let file = match open_nofollow(&part) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound || not_regular(&e) => {
                return Err(not_held(first));
            }
            Err(e) => return Err(io(e)),
        };
        let key = file.metadata().map(|m| FileKey::of(&m)).map_err(io)?;
        let damaged = |i: u32| {
            let damaged = self.damaged.lock().unwrap_or_else(|p| p.into_inner());
            damaged.get(&(part.clone(), i)) == Some(&key)
        };
        if let Some(i) = (first..last).find(|&i| damaged(i as u32)) {
            return Err(not_held(i));
        }
        // Each unit is checked as it is read, a part at a time, and only the bytes asked for
        // are kept: the memory is the request's, whatever the unit.
        let mut out = vec![0u8; len as usize];
        let mut part_buf = vec![0u8; unit.min(READ_PART) as usize];
        for i in first..last {
            let i = i as u32;
            let (start, unit_len) = (m.chunk_offset(i), m.chunk_len(i).unwrap_or(0));
            let Some(mut check) = m.check_chunk(i) else {
                return Err(not_held(u64::from(i)));
            };
            let mut at = start;
            while at < start + unit_len {
                let n = (start + unit_len - at).min(part_buf.len() as u64) as usize;
                let bytes = &mut part_buf[..n];
                file.read_exact_at(bytes, at).map_err(io)?;
                check.update(bytes);
                // The part of these bytes that was asked for.
                let (lo, hi) = (at.max(offset), (at + n as u64).min(end));
                if lo < hi {
                    out[(lo - offset) as usize..(hi - offset) as usize]
                        .copy_from_slice(&bytes[(lo - at) as usize..(hi - at) as usize]);
                }
                at += n as u64;
            }
            if !check.matches() {
                // Remembered for this version of the file, so it is neither read again nor
                // logged again; the first damaged unit of a file is logged, the others counted
                // at debug level.
                let mut damaged = self.damaged.lock().unwrap_or_else(|p| p.into_inner());
                if damaged.len() >= DAMAGED_KEPT {
                    damaged.clear();
                }
                let first_here = !damaged.iter().any(|((p, _), k)| *p == part && *k == key);
                damaged.insert((part.clone(), i), key);
                drop(damaged);
                if first_here {
                    tracing::warn!(
                        "chunk {i} of the download of {name} in progress fails its check; not serving it (further damaged chunks of it are not logged)"
                    );
                } else {
                    tracing::debug!("chunk {i} of the download of {name} fails its check");
                }
                return Err(not_held(u64::from(i)));
            }
        }
        Ok(out)
    }

    /// Reads `len` bytes of `name` at any `offset`, at most one chunk of its layout long (the same
    /// memory bound as [`read_chunk`](Self::read_chunk)).
    pub fn read_piece(
        &self,
        name: &FileName,
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
        name: &FileName,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, StoreError> {
        self.read_bounded(name, offset, len, true)
    }

    /// Reads at most one chunk's length, starting a chunk or piece if `aligned`.
    fn read_bounded(
        &self,
        name: &FileName,
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

    /// Decides an upload of `size` bytes hashing to `blake3` under `name`: `Ok(None)` if an identical
    /// file is already served, else a reserved [`Upload`] to write into.
    pub fn begin_upload(
        &self,
        name: &FileName,
        size: u64,
        blake3: Hash32,
        replace: bool,
    ) -> Result<Option<Upload>, StoreError> {
        let mut replacing = None;
        if let Some(existing) = self.existing(name)? {
            if existing.size() == size && existing.blake3() == blake3 {
                return Ok(None);
            }
            if !replace {
                return Err(StoreError::Conflict(name.to_string()));
            }
            // As it is now (the manifest was hashed for this very file identity); if it changes
            // before the upload ends, nothing is replaced.
            let (_, key) = self.open_regular(name)?;
            let cached = self
                .lock_cache()
                .get(name)
                .map(|d| (d.key, d.manifest.blake3()));
            replacing = match cached {
                Some((k, blake3)) if k == key && blake3 == existing.blake3() => {
                    Some(Seen { key, blake3 })
                }
                _ => Seen::of(&self.path_of(name))?,
            };
        }
        let guard = UploadGuard::claim(&self.uploads, name)?;
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let tag = format!(
            "{UPLOAD_TAG}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let partial = PartialFile::create_sparse(&self.path_of(name), &tag, size)?;
        Ok(Some(Upload {
            partial,
            replacing,
            _guard: guard,
        }))
    }

    /// The manifest of whatever is at `name`: `None` if nothing, a conflict if it is not a file.
    fn existing(&self, name: &FileName) -> Result<Option<Arc<Manifest>>, StoreError> {
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
    fn open_regular(&self, name: &FileName) -> Result<(File, FileKey), StoreError> {
        let path = self.path_of(name);
        let not_found = || StoreError::NotFound(name.clone());
        let file = match open_nofollow(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound || not_regular(&e) => {
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

    /// Removes upload temporary files left by a server that was killed: those no live process
    /// holds locked, and the `.new` links a replace killed between link and rename left.
    /// Downloads' `.part` files stay (they are for resuming). Returns how many
    /// files and bytes were removed.
    pub fn remove_stale_uploads(&self) -> Result<(usize, u64), StoreError> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| StoreError::io("listing", &self.dir, e))?;
        let (mut files, mut bytes) = (0, 0);
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // An upload's temporary file, or the new version of a replace (an upload's or an
            // update's) that a killed process linked but did not rename: its own temporary file
            // still holds every byte, and a live one holds the lock on both.
            let upload = name.ends_with(".part") && name.contains(UPLOAD_TAG);
            if !(name.starts_with('.') && (upload || name.ends_with(".new"))) {
                continue;
            }
            let path = entry.path();
            let Ok(file) = open_nofollow(&path) else {
                // A symlink or a FIFO under our temporary name is not ours: remove the name.
                if fs::remove_file(&path).is_ok() {
                    files += 1;
                }
                continue;
            };
            // A live upload holds its lock; only unlocked ones are stale.
            if file.try_lock().is_ok() {
                let len = file.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
                if fs::remove_file(&path).is_ok() {
                    files += 1;
                    bytes += len;
                }
            }
        }
        Ok((files, bytes))
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

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<FileName, Described>> {
        // A poisoned lock only means another thread panicked mid-insert of a whole entry; the map
        // itself is still consistent.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An upload in progress: its partial file and its claim on the name.
#[derive(Debug)]
pub struct Upload {
    /// Where the bytes go.
    pub partial: PartialFile,
    /// The version it replaces, as seen when the upload began.
    replacing: Option<Seen>,
    _guard: UploadGuard,
}

impl Upload {
    /// The version this upload replaces, as seen when it began.
    pub fn replacing(&self) -> Option<Seen> {
        self.replacing
    }

    /// Checks and stores the uploaded file: under its free name, or in place of the version it
    /// replaces (kept hidden; if that version changed meanwhile, nothing is replaced).
    pub fn commit(self, expected: Hash32, check: Check) -> Result<Committed, StoreError> {
        match self.replacing {
            Some(old) => self.partial.commit_replacing(expected, check, old),
            None => self.partial.commit(expected, check),
        }
    }
}

#[derive(Debug)]
struct UploadGuard {
    set: Arc<Mutex<HashSet<FileName>>>,
    name: FileName,
}

impl UploadGuard {
    fn claim(set: &Arc<Mutex<HashSet<FileName>>>, name: &FileName) -> Result<Self, StoreError> {
        let mut names = set.lock().unwrap_or_else(|p| p.into_inner());
        if !names.insert(name.clone()) {
            return Err(StoreError::Busy(name.to_string()));
        }
        Ok(Self {
            set: set.clone(),
            name: name.clone(),
        })
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        let mut names = self.set.lock().unwrap_or_else(|p| p.into_inner());
        names.remove(&self.name);
    }
}

/// How [`PartialFile::commit`] checks the whole file before it appears.
#[derive(Debug, Clone, Copy)]
pub enum Check {
    /// Read the written file back and hash it.
    Reread,
    /// The caller hashed the bytes as they streamed in; this is what they hashed to.
    Streamed(Hash32),
    /// Every chunk was verified against a [`Manifest`] before it was written, and a manifest's
    /// chunk hashes merge to its file hash (checked when it was built or decoded), so the whole
    /// file is already proven to hash to `expected` without a second pass.
    Chunks,
}

/// What [`PartialFile::commit`] found at the final name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The file now exists under its final name.
    Stored,
    /// An identical file appeared there meanwhile; ours was discarded.
    AlreadyPresent,
    /// The file under its name was replaced; the old version is kept in [`DISPLACED_DIR`].
    Replaced,
}

/// The hidden folder, next to a replaced file, that keeps the versions it replaced (never listed:
/// a name starting with a dot is not a served name).
pub const DISPLACED_DIR: &str = ".qnode-displaced";
/// Displaced versions kept per name; older ones are removed.
pub const DISPLACED_KEPT: usize = 3;
/// Displaced versions kept in one folder, of all names; the oldest are removed first.
pub const DISPLACED_MAX_FILES: usize = 1000;
/// Bytes of displaced versions kept in one folder; the oldest are removed first.
pub const DISPLACED_MAX_BYTES: u64 = 1 << 30;

/// A regular file as it was seen: its identity on disk and its BLAKE3, so a replacement can tell
/// whether it changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    key: FileKey,
    /// Its BLAKE3 hash.
    pub blake3: Hash32,
}

impl Seen {
    /// Whether `key` is the file as it was seen.
    pub fn is(&self, key: &FileKey) -> bool {
        self.key == *key
    }

    /// The identity of the file as it was seen.
    pub fn key(&self) -> FileKey {
        self.key
    }

    /// The regular file at `path` (not following a symlink), or `None` if there is none.
    /// `Conflict` if something else is there.
    pub fn of(path: &Path) -> Result<Option<Self>, StoreError> {
        Ok(Self::read(path, None)?.map(|(seen, _)| seen))
    }

    /// Like [`of`](Self::of), with the file's content-defined tree (signed as `kind` says), from
    /// the same read.
    pub fn with_tree(path: &Path, kind: SigKind) -> Result<Option<(Self, Tree)>, StoreError> {
        Ok(Self::read(path, Some(kind))?.map(|(seen, tree)| (seen, tree.unwrap_or_default())))
    }

    fn read(
        path: &Path,
        tree: Option<SigKind>,
    ) -> Result<Option<(Self, Option<Tree>)>, StoreError> {
        let file = match open_nofollow(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if not_regular(&e) => {
                return Err(StoreError::Conflict(format!(
                    "{} (it is not a regular file)",
                    path.display()
                )));
            }
            Err(e) => return Err(StoreError::io("opening", path, e)),
        };
        let io = |e| StoreError::io("reading", path, e);
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(StoreError::Conflict(format!(
                "{} (it is not a regular file)",
                path.display()
            )));
        }
        let (tree, blake3) = if let Some(kind) = tree {
            let (t, h) = Tree::of_file(&file, kind).map_err(io)?;
            (Some(t), h)
        } else {
            (
                None,
                Manifest::of_file(&file, meta.len()).map_err(io)?.blake3(),
            )
        };
        let after = file.metadata().map_err(io)?;
        let key = FileKey::of(&meta);
        if FileKey::of(&after) != key {
            return Err(StoreError::Changed(path.display().to_string()));
        }
        Ok(Some((Self { key, blake3 }, tree)))
    }
}

/// A file being written: hidden, pre-sized, removed on drop unless committed or kept for resume.
#[derive(Debug)]
pub struct PartialFile {
    file: File,
    /// The same file opened with O_DIRECT, where the file system supports it: page-aligned writes
    /// go through it and skip the page-cache copy.
    direct: Option<File>,
    temp: PathBuf,
    target: PathBuf,
    size: u64,
    resumed: bool,
    /// Set once committed, or when the caller keeps it to resume later.
    keep: AtomicBool,
    /// What it holds, on disk for `serve` to offer, once [`share`](Self::share)d.
    held: std::sync::OnceLock<HeldWriter>,
}

impl PartialFile {
    /// Starts a file of `size` bytes that will become `target`, as `.<target name>.<tag>.part` in
    /// the same folder. Space is reserved now, so a full disk fails here. Fails with `Busy` if
    /// another process is writing the same temporary file. If a temporary file of that name and
    /// size is already there (an interrupted earlier attempt with the same tag), its contents are
    /// kept and [`resumed`](Self::resumed) is true: [`verified_chunks`](Self::verified_chunks) tells
    /// which of them are usable.
    pub fn create(target: &Path, tag: &str, size: u64) -> Result<Self, StoreError> {
        Self::open(target, tag, size, Reserve::Upfront)
    }

    /// Like [`create`](Self::create), but disk space is taken only as bytes are written: for
    /// uploads, whose announced size is a peer's claim, so a peer that announces much and sends
    /// little holds no disk.
    pub fn create_sparse(target: &Path, tag: &str, size: u64) -> Result<Self, StoreError> {
        Self::open(target, tag, size, Reserve::AsWritten)
    }

    /// Whether an interrupted attempt with `tag` left a temporary file for `target` (which
    /// [`create`](Self::create) would resume).
    pub fn left_by_an_attempt(target: &Path, tag: &str) -> bool {
        fs::symlink_metadata(Self::temp_of(target, tag).1).is_ok_and(|m| m.is_file())
    }

    /// The target's file name, and the temporary file's path.
    fn temp_of(target: &Path, tag: &str) -> (String, PathBuf) {
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = dir.join(format!(".{base}.{tag}.part"));
        (base, temp)
    }

    fn open(target: &Path, tag: &str, size: u64, reserve: Reserve) -> Result<Self, StoreError> {
        let (base, temp) = Self::temp_of(target, tag);
        let file = open_temp(&temp)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::Busy(base)),
            Err(fs::TryLockError::Error(e)) => return Err(StoreError::io("locking", &temp, e)),
        }
        let existing = file.metadata().map(|m| m.len()).unwrap_or(0);
        // Opened again through our own descriptor, not the name: the name may have been swapped
        // since, and O_DIRECT must reach the same file.
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(fd_path(&file))
            .ok()
            .filter(|d| same_file(d, &file));
        let mut partial = Self {
            file,
            direct,
            temp,
            target: target.to_owned(),
            size,
            resumed: size > 0 && existing == size,
            keep: AtomicBool::new(false),
            held: std::sync::OnceLock::new(),
        };
        partial.reserve(reserve)?;
        Ok(partial)
    }

    fn reserve(&mut self, reserve: Reserve) -> Result<(), StoreError> {
        let io = |e| StoreError::io("sizing", &self.temp, e);
        if !self.resumed {
            self.file.set_len(0).map_err(io)?;
        }
        if reserve == Reserve::AsWritten {
            return self.file.set_len(self.size).map_err(io);
        }
        if self.size > 0 {
            // posix_fallocate returns the error number itself (it does not set errno).
            let len = i64::try_from(self.size)
                .map_err(|_| StoreError::NoSpace(self.target.display().to_string()))?;
            let rc = unsafe {
                // SAFETY: the fd is owned by `self.file` and open for writing for this whole call.
                libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&self.file), 0, len)
            };
            match rc {
                0 => {}
                libc::ENOSPC | libc::EFBIG => {
                    return Err(StoreError::NoSpace(self.target.display().to_string()));
                }
                // File systems without fallocate: fall back to a sparse file.
                libc::EOPNOTSUPP | libc::EINVAL => self.file.set_len(self.size).map_err(io)?,
                e => return Err(io(io::Error::from_raw_os_error(e))),
            }
        }
        Ok(())
    }

    /// Whether an earlier attempt's temporary file was found and kept.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Offers what this file holds to `serve` while it is written: keeps a sidecar ([`held`])
    /// with `manifest` and the chunks `have` marks (none if it is empty), and from now on every chunk passed to
    /// [`mark_verified`](Self::mark_verified). Does nothing if already shared.
    pub fn share(&self, manifest: &Manifest, have: &[bool]) -> Result<(), StoreError> {
        if self.held.get().is_some() {
            return Ok(());
        }
        let mut held = ChunkSet::none(manifest.chunk_count());
        for (i, _) in have.iter().enumerate().filter(|(_, h)| **h) {
            held.insert(i as u32);
        }
        let writer = HeldWriter::create(&self.temp, manifest, &held)
            .map_err(|e| StoreError::io("writing", &held::path_for(&self.temp), e))?;
        let _ = self.held.set(writer);
        Ok(())
    }

    /// Records that chunk `index` is verified and written, for `serve` to offer (if
    /// [`share`](Self::share)d). A failure only means the chunk is not offered.
    pub fn mark_verified(&self, index: u32) {
        if let Some(held) = self.held.get()
            && let Err(e) = held.mark(index)
        {
            tracing::debug!("not offering chunk {index} of {}: {e}", self.temp.display());
        }
    }

    /// Stops offering it (the sidecar goes; the file may stay).
    fn unshare(&self) {
        if let Some(held) = self.held.get() {
            held.remove();
        }
    }

    /// Keeps the temporary file when this is dropped, so a later attempt can resume from it.
    pub fn keep_for_resume(&self) {
        self.keep.store(true, Ordering::SeqCst);
    }

    /// Which chunks of `manifest` the file already holds, verified by hashing what is on disk.
    /// All false unless [`resumed`](Self::resumed).
    pub fn verified_chunks(&self, manifest: &Manifest) -> Result<Vec<bool>, StoreError> {
        if !self.resumed {
            return Ok(vec![false; manifest.chunk_count() as usize]);
        }
        self.check_chunks(manifest)
    }

    /// Copies `(from, to, len)` ranges of the regular file at `src` (not following a symlink)
    /// into this file; returns the bytes copied.
    pub fn copy_from(&self, src: &Path, ranges: &[(u64, u64, u64)]) -> Result<u64, StoreError> {
        use std::os::fd::AsRawFd;
        let io = |e| StoreError::io("reading", src, e);
        let file = open_nofollow(src).map_err(io)?;
        let mut buf = Vec::new();
        let mut total = 0;
        for &(from, to, len) in ranges {
            if to.checked_add(len).is_none_or(|end| end > self.size) {
                return Err(StoreError::io(
                    "writing",
                    &self.temp,
                    io::Error::new(io::ErrorKind::InvalidInput, "copy past the announced size"),
                ));
            }
            let mut done = 0;
            // In the kernel where it can (no copy through our memory; shared extents on file
            // systems that have them), else through a buffer.
            while done < len {
                let (mut off_in, mut off_out) = ((from + done) as i64, (to + done) as i64);
                let want = (len - done).min(1 << 30) as usize;
                // SAFETY: both descriptors are open for the call; the offsets are ours.
                let n = unsafe {
                    libc::copy_file_range(
                        file.as_raw_fd(),
                        &mut off_in,
                        self.file.as_raw_fd(),
                        &mut off_out,
                        want,
                        0,
                    )
                };
                if n <= 0 {
                    break;
                }
                done += n as u64;
            }
            while done < len {
                let n = (len - done).min(1 << 20) as usize;
                buf.resize(n, 0);
                file.read_exact_at(&mut buf, from + done).map_err(io)?;
                self.write_at(to + done, &buf)?;
                done += n as u64;
            }
            total += len;
        }
        // The copy is on its way to disk while the caller checks it.
        self.start_writeback();
        Ok(total)
    }

    /// Which chunks of the file as written so far match `manifest` (reading every one).
    pub fn check_chunks(&self, manifest: &Manifest) -> Result<Vec<bool>, StoreError> {
        let n = manifest.chunk_count();
        if manifest.size() != self.size {
            return Ok(vec![false; n as usize]);
        }
        let check = |range: std::ops::Range<u32>| -> Result<Vec<bool>, StoreError> {
            let mut buf = Vec::new();
            range
                .map(|i| {
                    // Chunk lengths come from a validated manifest: at most MAX_CHUNK_SIZE.
                    let len = manifest.chunk_len(i).unwrap_or(0) as usize;
                    buf.resize(len, 0);
                    self.file
                        .read_exact_at(&mut buf, manifest.chunk_offset(i))
                        .map_err(|e| StoreError::io("resuming", &self.temp, e))?;
                    Ok(manifest.verify_chunk(i, &buf))
                })
                .collect()
        };
        // Two halves side by side: the chunks are independent.
        let half = n / 2;
        let (first, second) = std::thread::scope(|s| {
            let second = s.spawn(|| check(half..n));
            (check(0..half), second.join())
        });
        let mut out = first?;
        out.extend(second.map_err(|_| {
            StoreError::io(
                "resuming",
                &self.temp,
                io::Error::other("a checking thread failed"),
            )
        })??);
        Ok(out)
    }

    /// Writes `data` at `offset` (positional; safe to call from several threads at once).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(StoreError::io(
                "writing",
                &self.temp,
                io::Error::new(io::ErrorKind::InvalidInput, "write past the announced size"),
            ));
        }
        const PAGE: u64 = 4096;
        let aligned = offset.is_multiple_of(PAGE)
            && (data.len() as u64).is_multiple_of(PAGE)
            && (data.as_ptr() as u64).is_multiple_of(PAGE);
        let file = match &self.direct {
            Some(direct) if aligned => direct,
            _ => &self.file,
        };
        file.write_all_at(data, offset)
            .map_err(|e| StoreError::io("writing", &self.temp, e))
    }

    /// Syncs, checks the whole file against `expected`, and links it to its final name, which is
    /// never replaced: if a file is already there, it must be identical (`AlreadyPresent`) or this is
    /// a `Conflict`.
    pub fn commit(self, expected: Hash32, check: Check) -> Result<Committed, StoreError> {
        let name = self.verify(expected, check)?;
        self.link(expected, name)
    }

    /// Syncs and checks the whole file against `expected`, then puts it under its name in place
    /// of `old` (the file there as it was seen before), atomically: the name holds the old
    /// version until a `rename` makes it the new one. The old version stays, hard-linked into
    /// [`DISPLACED_DIR`] next to it. If the name no longer holds `old`, nothing is replaced
    /// (`Changed`) and this file is kept for a retry.
    pub fn commit_replacing(
        self,
        expected: Hash32,
        check: Check,
        old: Seen,
    ) -> Result<Committed, StoreError> {
        let name = self.verify(expected, check)?;
        let dir = self.target.parent().unwrap_or(Path::new(".")).to_owned();
        let io = |what: &'static str, p: &Path, e| StoreError::io(what, p, e);
        let keep = dir.join(DISPLACED_DIR);
        match fs::create_dir(&keep) {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt;
                let _ = fs::set_permissions(&keep, fs::Permissions::from_mode(0o700));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("creating", &keep, e)),
        }
        // A symlink planted there by a local user would send the old version (and the pruning)
        // into another folder: only a real folder is used.
        if !fs::symlink_metadata(&keep).is_ok_and(|m| m.file_type().is_dir()) {
            self.keep.store(true, Ordering::SeqCst);
            return Err(io(
                "keeping the old version in",
                &keep,
                io::Error::other("not a folder (a symlink?); nothing was replaced"),
            ));
        }
        // Still the version seen at the start (ctime too: a change that kept the mtime)?
        let unchanged = |full: bool| {
            fs::symlink_metadata(&self.target).is_ok_and(|now| {
                let now = FileKey::of(&now);
                now == old.key || (!full && now.same_content(&old.key))
            })
        };
        if !unchanged(true) {
            self.keep.store(true, Ordering::SeqCst);
            return Err(StoreError::Changed(name));
        }
        let kept = keep.join(format!("{name}.{}", &hex(&old.blake3)[..16]));
        let linked = match fs::hard_link(&self.target, &kept) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            // Gone meanwhile: nothing to replace, so nothing to keep.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.link(expected, name),
            Err(e) => return Err(io("keeping the old version of", &self.target, e)),
        };
        // Linking changed its ctime; the name must still be that file.
        if !unchanged(false) {
            if linked {
                let _ = fs::remove_file(&kept);
            }
            self.keep.store(true, Ordering::SeqCst);
            return Err(StoreError::Changed(name));
        }
        let fresh = self.temp.with_extension("new");
        let _ = fs::remove_file(&fresh);
        link_descriptor(&self.file, &self.temp, &fresh).map_err(|e| io("linking", &fresh, e))?;
        if let Err(e) = fs::rename(&fresh, &self.target) {
            let _ = fs::remove_file(&fresh);
            return Err(io("replacing", &self.target, e));
        }
        self.keep.store(true, Ordering::SeqCst);
        self.unshare();
        let _ = fs::remove_file(&self.temp);
        let _ = File::open(&dir).and_then(|d| d.sync_all());
        prune_displaced(&keep, &name);
        Ok(Committed::Replaced)
    }

    /// Starts writing the file's dirty pages to disk without waiting for them, so a later
    /// fsync waits only for what is left (work done meanwhile overlaps the disk's).
    fn start_writeback(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the call. A failure only means the fsync does it all.
        unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    /// Checks and syncs the file; returns its final name.
    fn verify(&self, expected: Hash32, check: Check) -> Result<String, StoreError> {
        self.start_writeback();
        let actual = match check {
            Check::Streamed(h) => h,
            Check::Chunks => expected,
            Check::Reread => Manifest::of_file(&self.file, self.size)
                .map_err(|e| StoreError::io("verifying", &self.temp, e))?
                .blake3(),
        };
        self.file
            .sync_all()
            .map_err(|e| StoreError::io("syncing", &self.temp, e))?;
        let name = self
            .target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if actual != expected {
            return Err(StoreError::Corrupt {
                name,
                expected: hex(&expected),
                actual: hex(&actual),
            });
        }
        Ok(name)
    }

    /// Links the verified file to its name, which is never replaced.
    fn link(self, expected: Hash32, name: String) -> Result<Committed, StoreError> {
        match link_descriptor(&self.file, &self.temp, &self.target) {
            Ok(()) => {
                self.keep.store(true, Ordering::SeqCst);
                // The whole file is under its name now: it is served from there.
                self.unshare();
                let _ = fs::remove_file(&self.temp);
                if let Some(dir) = self.target.parent() {
                    // Make the new name durable; failure here loses nothing already verified.
                    let _ = File::open(dir).and_then(|d| d.sync_all());
                }
                Ok(Committed::Stored)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Ours is not needed either way; a failed commit must not leave it for a resume.
                self.keep.store(false, Ordering::SeqCst);
                let same = open_nofollow(&self.target)
                    .and_then(|f| {
                        if !f.metadata()?.is_file() {
                            return Err(io::Error::other("not a regular file"));
                        }
                        let mut h = blake3::Hasher::new();
                        h.update_reader(f)?;
                        Ok(*h.finalize().as_bytes())
                    })
                    .is_ok_and(|h| h == expected);
                if same {
                    Ok(Committed::AlreadyPresent)
                } else {
                    Err(StoreError::Conflict(name))
                }
            }
            Err(e) => Err(StoreError::io("linking", &self.target, e)),
        }
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        // Kept to resume: its sidecar stays too, and `serve` goes on offering what it holds.
        if !self.keep.load(Ordering::SeqCst) {
            self.unshare();
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Keeps the newest [`DISPLACED_KEPT`] displaced versions of `name` in `keep`, and in all at
/// most [`DISPLACED_MAX_FILES`] files and [`DISPLACED_MAX_BYTES`] bytes there (oldest removed
/// first, whatever their name).
fn prune_displaced(keep: &Path, name: &str) {
    prune_displaced_to(keep, name, (DISPLACED_MAX_FILES, DISPLACED_MAX_BYTES));
}

/// [`prune_displaced`] with caps of its own in all: (files, bytes).
fn prune_displaced_to(keep: &Path, name: &str, (max_files, max_bytes): (usize, u64)) {
    let Ok(entries) = fs::read_dir(keep) else {
        return;
    };
    let prefix = format!("{name}.");
    // By ctime: when each was displaced (linked here). Only regular files (not followed).
    let mut all: Vec<((i64, i64), u64, PathBuf, bool)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.metadata().ok().filter(fs::Metadata::is_file)?;
            let ours = e.file_name().to_str().is_some_and(|n| {
                n.strip_prefix(&prefix)
                    .is_some_and(|rest| rest.len() == 16 && !rest.contains('.'))
            });
            Some(((m.ctime(), m.ctime_nsec()), m.len(), e.path(), ours))
        })
        .collect();
    all.sort();
    let mut excess = all
        .iter()
        .filter(|v| v.3)
        .count()
        .saturating_sub(DISPLACED_KEPT);
    let (mut files, mut bytes) = (all.len(), all.iter().map(|v| v.1).sum::<u64>());
    for (_, len, path, ours) in all {
        let over = files > max_files || bytes > max_bytes;
        let drop_it = over || (ours && excess > 0);
        if !drop_it {
            continue;
        }
        if fs::remove_file(&path).is_ok() {
            files -= 1;
            bytes -= len;
        }
        if ours {
            excess = excess.saturating_sub(1);
        }
    }
}

/// A reader that fails once `stop` says so: a tree computation no one waits for ends.
struct Stoppable<'a, R> {
    inner: R,
    stop: &'a dyn Fn() -> bool,
}

impl<R: Read> Read for Stoppable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if (self.stop)() {
            return Err(io::Error::other("no longer wanted"));
        }
        self.inner.read(buf)
    }
}

/// How a [`PartialFile`] takes its disk space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reserve {
    /// All of it at creation, so a full disk fails at once.
    Upfront,
    /// As bytes are written.
    AsWritten,
}

/// What upload temporary file names carry after the target's name: `.<name>.upload-<pid>-<n>.part`.
const UPLOAD_TAG: &str = "upload-";

/// Whether an `open` with `O_NOFOLLOW | O_NONBLOCK` failed because the name is not a regular file:
/// a symlink (`ELOOP`) or a FIFO without a reader (`ENXIO`).
fn not_regular(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENXIO))
}

/// Opens `path` for reading without following a symlink and without blocking on a FIFO.
fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// Opens (or creates) a temporary file at `temp` that is surely a regular file of ours: a symlink,
/// FIFO or other non-regular file planted under that name is removed (the name, never what it
/// points to) and the file created anew, exclusively.
fn open_temp(temp: &Path) -> Result<File, StoreError> {
    let opts = |excl: bool| {
        let mut o = OpenOptions::new();
        o.read(true)
            .write(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
        if excl {
            o.create_new(true);
        } else {
            o.create(true).truncate(false);
        }
        o
    };
    match opts(false).open(temp) {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => return Ok(f),
        // Opened, but a FIFO or a device: planted.
        Ok(_) => {}
        Err(e) if not_regular(&e) => {}
        Err(e) => return Err(StoreError::io("creating", temp, e)),
    }
    tracing::warn!(
        "{} was not a regular file (a symlink or FIFO planted there?); replacing it",
        temp.display()
    );
    fs::remove_file(temp).map_err(|e| StoreError::io("removing a planted", temp, e))?;
    let file = opts(true)
        .open(temp)
        .map_err(|e| StoreError::io("creating", temp, e))?;
    Ok(file)
}

/// `/proc/self/fd/N` of an open file: a name for exactly that file.
fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(file)
    ))
}

fn same_file(a: &File, b: &File) -> bool {
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => same_inode(&a, &b),
        _ => false,
    }
}

fn same_inode(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    a.ino() == b.ino() && a.dev() == b.dev()
}

/// `path` as a C string, for the few calls std does not wrap.
fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("NUL in a path"))
}

/// Gives the file open as `file` (whose name is `temp`) the new name `target`, which must not
/// exist. Linked through the descriptor, so what appears is the file we wrote and verified even if
/// `temp` was swapped for a symlink meanwhile; where /proc is missing, by name after checking that
/// the name is still our file.
fn link_descriptor(file: &File, temp: &Path, target: &Path) -> io::Result<()> {
    let (src, dst) = (c_path(&fd_path(file))?, c_path(target)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            src.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::AlreadyExists {
        return Err(err);
    }
    // No /proc: link by name, if the name is still a regular file and the one we hold.
    let by_name = fs::symlink_metadata(temp)?;
    let ours = file.metadata()?;
    if !by_name.is_file() || !same_inode(&by_name, &ours) {
        return Err(io::Error::other(format!(
            "{} was replaced while it was written",
            temp.display()
        )));
    }
    fs::hard_link(temp, target)
}

fn disk_space(dir: &Path) -> io::Result<(u64, u64)> {
    let c = c_path(dir)?;
    // SAFETY: an all-zero statvfs is a valid value to be overwritten; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable statvfs and `c` a valid path for the whole call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * unit, st.f_blocks as u64 * unit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn name(s: &str) -> FileName {
        FileName::new(s).unwrap()
    }

    fn not_found<T>(r: Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::NotFound(_)))
    }

    /// A download in progress in chunks serves pieces of the chunks it holds, and one in
    /// pieces serves chunks of the pieces it holds; each checks the whole units it reads, so a
    /// damaged byte costs the chunk it is in (or, in pieces, only its piece).
    #[test]
    fn a_download_in_either_unit_serves_chunks_and_pieces_of_what_it_holds() {
        use crate::model::manifest::piece_size_for;
        let data: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("src"), &data).unwrap();
        let file = File::open(src.path().join("src")).unwrap();
        let (m, fine) = Manifest::of_file_with_pieces(&file, data.len() as u64).unwrap();
        let fine = fine.unwrap();
        let (cs, ps) = (m.chunk_size(), fine.chunk_size());
        assert_eq!((cs, piece_size_for(m.size())), (64 << 10, Some(16 << 10)));
        let x = name("x.bin");
        for (unit, manifest) in [("chunks", &m), ("pieces", &fine)] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let b3 = m.blake3();
            let target = dir.path().join("x.bin");
            let partial = PartialFile::create(&target, &download_tag(&b3), m.size()).unwrap();
            partial.share(manifest, &[]).unwrap();
            // Chunk 1 written and marked, in the download's unit.
            partial
                .write_at(cs, &data[cs as usize..2 * cs as usize])
                .unwrap();
            let per = (cs / manifest.chunk_size()) as u32;
            (per..2 * per).for_each(|i| partial.mark_verified(i));
            let read = |offset: u64, len: u64| store.read_version(&x, &b3, offset, len as u32);
            let bytes = |offset: u64, len: u64| &data[offset as usize..(offset + len) as usize];
            assert_eq!(read(cs, cs).unwrap(), bytes(cs, cs), "{unit}: the chunk");
            assert_eq!(
                read(cs + ps, ps).unwrap(),
                bytes(cs + ps, ps),
                "{unit}: a piece"
            );
            assert!(
                matches!(read(2 * cs, ps), Err(StoreError::NotHeld { .. })),
                "{unit}: a piece not held"
            );
            assert!(
                matches!(read(cs + ps / 2, ps), Err(StoreError::NotAChunk { .. })),
                "{unit}: not a piece's start"
            );
            assert!(
                matches!(read(cs, 2 * cs), Err(StoreError::NotAChunk { .. })),
                "{unit}: longer than a chunk"
            );
            // A byte of its second piece damaged on disk.
            let mut bad = bytes(cs + ps, ps).to_vec();
            bad[7] ^= 0xff;
            partial.write_at(cs + ps, &bad).unwrap();
            assert!(matches!(read(cs + ps, ps), Err(StoreError::NotHeld { .. })));
            let first_piece = read(cs, ps);
            match unit {
                "chunks" => assert!(matches!(first_piece, Err(StoreError::NotHeld { .. }))),
                _ => assert_eq!(first_piece.unwrap(), bytes(cs, ps)),
            }
        }
    }

    #[test]
    fn eighty_downloads_in_progress_stay_in_the_header_cache() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut partials = Vec::new();
        for i in 0..80u32 {
            let data = i.to_le_bytes().repeat(20_000);
            let m = Manifest::from_reader(&data[..], data.len() as u64).unwrap();
            let target = dir.path().join(format!("f{i}.bin"));
            let p = PartialFile::create_sparse(&target, &download_tag(&m.blake3()), m.size());
            let p = p.unwrap();
            p.share(&m, &[]).unwrap();
            partials.push(p);
        }
        assert_eq!(store.held_all().unwrap().len(), 80);
        // Every header read once is kept: listing again reads none (the cache held 64 and was
        // cleared when full, so each listing of more than 64 read every header again).
        assert_eq!(store.lock_held().entries.len(), 80);
        assert_eq!(store.held_all().unwrap().len(), 80);
        assert_eq!(store.lock_held().entries.len(), 80);
    }

    #[test]
    fn displaced_versions_are_capped_in_all_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let keep = dir.path().join(DISPLACED_DIR);
        fs::create_dir(&keep).unwrap();
        // 20 names with 2 versions each is under the per-name cap, over a cap of 30 in all.
        for v in 0..2 {
            for n in 0..20 {
                fs::write(keep.join(format!("n{n}.txt.{v:016x}")), b"x").unwrap();
                // Past the file system's timestamp tick (a few ms), so no two share a ctime.
                std::thread::sleep(std::time::Duration::from_millis(12));
            }
        }
        prune_displaced_to(&keep, "n0.txt", (30, u64::MAX));
        let left: Vec<String> = fs::read_dir(&keep)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 30);
        // The ten oldest went: the first versions of n0..n9.
        for n in 0..10 {
            assert!(!left.contains(&format!("n{n}.txt.{:016x}", 0)), "{left:?}");
        }
        // Bytes too: a cap of 5 bytes leaves 5 files of one byte.
        prune_displaced_to(&keep, "n0.txt", (usize::MAX, 5));
        assert_eq!(fs::read_dir(&keep).unwrap().count(), 5);
    }

    #[test]
    fn a_shared_download_offers_only_verified_chunks_and_stops_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let store = Store::open(d).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let m = Manifest::from_reader(&data[..], data.len() as u64).unwrap();
        let b3 = m.blake3();
        let target = d.join("x.bin");
        let partial = PartialFile::create(&target, &download_tag(&b3), m.size()).unwrap();
        let (x, cs) = (name("x.bin"), m.chunk_size());
        // Not shared yet: nothing is offered.
        assert!(store.held(&x, &b3).unwrap().is_none());
        partial.share(&m, &[]).unwrap();
        let held = store.held(&x, &b3).unwrap().unwrap();
        assert_eq!((held.chunks.count(), held.bytes()), (0, 0));
        // Chunk 1 written and marked; chunk 2 written but not marked.
        for i in [1u32, 2] {
            let off = m.chunk_offset(i);
            let len = m.chunk_len(i).unwrap();
            partial
                .write_at(off, &data[off as usize..(off + len) as usize])
                .unwrap();
        }
        partial.mark_verified(1);
        let listed = store.held_all().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].0.as_str(), listed[0].1.bytes()), ("x.bin", cs));
        assert_eq!(
            store
                .held_any(&x)
                .unwrap()
                .unwrap()
                .chunks
                .iter()
                .collect::<Vec<_>>(),
            [1]
        );
        let got = store.read_version(&x, &b3, cs, cs as u32).unwrap();
        assert_eq!(got, data[cs as usize..2 * cs as usize]);
        assert!(matches!(
            store.read_version(&x, &b3, 2 * cs, cs as u32),
            Err(StoreError::NotHeld { chunk: 2, .. })
        ));
        assert!(matches!(
            store.read_version(&x, &b3, 1, cs as u32),
            Err(StoreError::NotAChunk { .. })
        ));
        // Its bytes changed on disk since: refused, not served.
        partial.write_at(cs, b"garbage").unwrap();
        assert!(matches!(
            store.read_version(&x, &b3, cs, cs as u32),
            Err(StoreError::NotHeld { .. })
        ));
        assert!(store.list().unwrap().is_empty(), "never listed whole");
        // Committed: served whole, the sidecar gone.
        partial.write_at(0, &data).unwrap();
        partial.commit(b3, Check::Reread).unwrap();
        assert!(store.held_all().unwrap().is_empty());
        let got = store.read_version(&x, &b3, 2 * cs, cs as u32).unwrap();
        assert_eq!(got, data[2 * cs as usize..3 * cs as usize]);
        assert_eq!(fs::read_dir(d).unwrap().count(), 1, "{:?}", leftovers(d));
    }

    fn leftovers(d: &Path) -> Vec<String> {
        fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn lists_only_regular_files_with_valid_names() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("b.txt"), b"bee").unwrap();
        fs::write(d.join("a.txt"), b"a").unwrap();
        fs::write(d.join(".hidden"), b"x").unwrap();
        fs::write(d.join(".a.txt.1234.part"), b"x").unwrap();
        fs::create_dir(d.join("sub")).unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        symlink(outside.path(), d.join("link.txt")).unwrap();
        let store = Store::open(d).unwrap();
        let listed: Vec<_> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|(n, m)| (n.to_string(), m.size()))
            .collect();
        assert_eq!(listed, [("a.txt".to_string(), 1), ("b.txt".to_string(), 3)]);
        assert!(not_found(store.manifest(&name("link.txt"))));
        assert!(not_found(store.read_range(&name("link.txt"), 0, 1)));
    }

    #[test]
    fn a_changed_file_gets_a_new_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(dir.path().join("f"), b"one").unwrap();
        let first = store.manifest(&name("f")).unwrap();
        assert_eq!(first.blake3(), *blake3::hash(b"one").as_bytes());
        fs::write(dir.path().join("f"), b"two").unwrap();
        assert_eq!(
            store.manifest(&name("f")).unwrap().blake3(),
            *blake3::hash(b"two").as_bytes()
        );
    }

    #[test]
    fn ranges_outside_the_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), b"0123456789").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.read_range(&name("f"), 2, 3).unwrap(), b"234");
        assert!(matches!(
            store.read_range(&name("f"), 8, 3),
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            store.read_range(&name("f"), u64::MAX, 3),
            Err(StoreError::OutOfRange { .. })
        ));
    }

    #[test]
    fn partial_files_appear_only_when_verified_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.txt");
        let data = b"hello partial world";
        let hash = *blake3::hash(data).as_bytes();

        // Dropped without commit: nothing remains.
        let p = PartialFile::create(&target, "t", data.len() as u64).unwrap();
        p.write_at(0, data).unwrap();
        drop(p);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

        // Wrong bytes: refused, nothing appears.
        let p = PartialFile::create(&target, "t", data.len() as u64).unwrap();
        p.write_at(0, b"hello partial w0rld").unwrap();
        assert!(matches!(
            p.commit(hash, Check::Reread),
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

        // Right bytes, written out of order: stored.
        let p = PartialFile::create(&target, "t", data.len() as u64).unwrap();
        assert!(matches!(
            PartialFile::create(&target, "t", 1),
            Err(StoreError::Busy(_))
        ));
        p.write_at(6, &data[6..]).unwrap();
        p.write_at(0, &data[..6]).unwrap();
        assert!(p.write_at(10, &data[..]).is_err(), "past the end");
        assert_eq!(p.commit(hash, Check::Reread).unwrap(), Committed::Stored);
        assert_eq!(fs::read(&target).unwrap(), data);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        // Same again: already present. Different: conflict, and the original is untouched.
        let p = PartialFile::create(&target, "u", data.len() as u64).unwrap();
        p.write_at(0, data).unwrap();
        assert_eq!(
            p.commit(hash, Check::Reread).unwrap(),
            Committed::AlreadyPresent
        );
        let other = b"something else entirely";
        let p = PartialFile::create(&target, "v", other.len() as u64).unwrap();
        p.write_at(0, other).unwrap();
        assert!(matches!(
            p.commit(*blake3::hash(other).as_bytes(), Check::Reread),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(fs::read(&target).unwrap(), data);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn aligned_direct_writes_and_buffered_writes_make_one_correct_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("mixed");
        let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 253) as u8).collect();
        let p = PartialFile::create(&target, "t", data.len() as u64).unwrap();
        // A page-aligned copy of the first two pages (direct path where supported) ...
        let mut buf = vec![0u8; 2 * 4096 + 4096];
        let start = buf.as_ptr().align_offset(4096);
        buf[start..start + 8192].copy_from_slice(&data[..8192]);
        p.write_at(0, &buf[start..start + 8192]).unwrap();
        // ... and an unaligned tail (buffered path).
        p.write_at(8192, &data[8192..]).unwrap();
        let hash = *blake3::hash(&data).as_bytes();
        assert_eq!(p.commit(hash, Check::Reread).unwrap(), Committed::Stored);
        assert_eq!(fs::read(&target).unwrap(), data);
    }

    #[test]
    fn a_kept_partial_file_resumes_with_its_verified_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("big");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let m = Manifest::from_reader(&data[..], data.len() as u64).unwrap();
        let p = PartialFile::create(&target, "t", m.size()).unwrap();
        assert!(!p.resumed());
        for i in [0u32, 2, 3] {
            let off = m.chunk_offset(i) as usize;
            p.write_at(
                off as u64,
                &data[off..off + m.chunk_len(i).unwrap() as usize],
            )
            .unwrap();
        }
        p.keep_for_resume();
        drop(p);
        let p = PartialFile::create(&target, "t", m.size()).unwrap();
        assert!(p.resumed());
        let have = p.verified_chunks(&m).unwrap();
        let want: Vec<bool> = (0..m.chunk_count())
            .map(|i| [0, 2, 3].contains(&i))
            .collect();
        assert_eq!(have, want);
        drop(p);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "not kept this time"
        );
    }

    #[test]
    fn uploads_follow_the_conflict_rules() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("have.txt"), b"same").unwrap();
        let store = Store::open(dir.path()).unwrap();
        let same = *blake3::hash(b"same").as_bytes();
        assert!(
            store
                .begin_upload(&name("have.txt"), 4, same, false)
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            store.begin_upload(&name("have.txt"), 4, [0; 32], false),
            Err(StoreError::Conflict(_))
        ));
        let first = store
            .begin_upload(&name("new.txt"), 4, same, false)
            .unwrap()
            .unwrap();
        assert!(matches!(
            store.begin_upload(&name("new.txt"), 4, same, false),
            Err(StoreError::Busy(_))
        ));
        drop(first);
        assert!(
            store
                .begin_upload(&name("new.txt"), 4, same, false)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn chunk_reads_must_be_one_chunk_of_the_layout() {
        let dir = tempfile::tempdir().unwrap();
        // 40 KiB: 16 chunks would be 2.5 KiB, so chunks are 2 KiB (a power of two).
        let data: Vec<u8> = (0..40 * 1024u32).map(|i| (i % 251) as u8).collect();
        fs::write(dir.path().join("f"), &data).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let chunk = chunk_size_for(data.len() as u64);
        let c = chunk as u32;
        assert_eq!(
            store.read_chunk(&name("f"), chunk, c).unwrap(),
            &data[chunk as usize..2 * chunk as usize]
        );
        for (offset, len) in [(1, 10), (0, c + 1), (0, 64 << 20), (chunk / 2, c / 2)] {
            assert!(
                matches!(
                    store.read_chunk(&name("f"), offset, len),
                    Err(StoreError::NotAChunk { .. })
                ),
                "{offset}+{len}"
            );
        }
    }

    #[test]
    fn a_symlink_planted_at_a_temp_name_is_replaced_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let target = dir.path().join("out.txt");
        symlink(&victim, dir.path().join(".out.txt.t.part")).unwrap();
        // A link to a missing path must not create that path either.
        let missing = outside.path().join("created");
        symlink(&missing, dir.path().join(".out.txt.u.part")).unwrap();
        let data = b"new bytes";
        for tag in ["t", "u"] {
            let p = PartialFile::create(&target, tag, data.len() as u64).unwrap();
            p.write_at(0, data).unwrap();
            if tag == "t" {
                let hash = *blake3::hash(data).as_bytes();
                assert_eq!(p.commit(hash, Check::Reread).unwrap(), Committed::Stored);
            }
        }
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(!missing.exists());
        assert!(fs::symlink_metadata(&target).unwrap().is_file());
        assert_eq!(fs::read(&target).unwrap(), data);
    }

    #[test]
    fn a_fifo_in_place_of_a_served_file_is_not_found_and_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.txt");
        let c = c_path(&fifo).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let store = Store::open(dir.path()).unwrap();
        // Without O_NONBLOCK this open would wait for a writer forever.
        assert!(not_found(store.open_regular(&name("pipe.txt"))));
        assert!(not_found(store.read_chunk(&name("pipe.txt"), 0, 1)));
    }

    #[test]
    fn uploads_take_disk_as_bytes_arrive_and_stale_ones_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let size = 1 << 30;
        let up = store
            .begin_upload(&name("big.txt"), size, [0; 32], false)
            .unwrap()
            .unwrap();
        up.partial.write_at(0, b"x").unwrap();
        let temp = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().contains("upload-"))
            .unwrap()
            .path();
        let blocks = fs::metadata(&temp).unwrap().blocks() * 512;
        assert!(
            blocks < 1 << 20,
            "{blocks} bytes allocated for 1 byte written"
        );
        // While the upload is alive its file is locked, so it is not stale.
        assert_eq!(store.remove_stale_uploads().unwrap().0, 0);
        // A dead server's upload (kept as if killed), and a download's .part, which stays.
        up.partial.keep_for_resume();
        drop(up);
        fs::write(
            dir.path().join(".dl.txt.0123456789abcdef.part"),
            b"resume me",
        )
        .unwrap();
        assert_eq!(store.remove_stale_uploads().unwrap().0, 1);
        assert!(!temp.exists());
        assert!(dir.path().join(".dl.txt.0123456789abcdef.part").exists());
    }
}
