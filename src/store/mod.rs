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

mod displaced;
pub mod held;
mod partial;
#[cfg(test)]
mod tests;
mod unix;

pub use displaced::{DISPLACED_DIR, DISPLACED_KEPT, DISPLACED_MAX_BYTES, DISPLACED_MAX_FILES};
pub use partial::{Check, Committed, PartialFile, Seen};
use unix::*;

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
    /// Units of downloads in progress here that failed their check when read.
    damaged: Damaged,
    /// Names whose manifest is being hashed, each with the lock its hashing holds.
    hashing: Mutex<HashMap<FileName, Arc<Mutex<()>>>>,
}

/// What a sidecar's header says, kept so its bits can be read without parsing it again.
#[derive(Debug, Clone)]
struct HeldHeader {
    /// The sidecar's identity (device, inode): a new sidecar under the name is read afresh.
    id: (u64, u64),
    manifest: Arc<Manifest>,
    /// Where its bits start.
    bits_at: u64,
}

/// A cached header and when it was last used.
#[derive(Debug)]
struct CachedHeader {
    header: HeldHeader,
    used: u64,
}

/// Sidecar headers kept in memory, least recently used dropped first.
#[derive(Debug, Default)]
struct HeldCache {
    entries: HashMap<PathBuf, CachedHeader>,
    /// Bytes of the manifests held.
    bytes: usize,
    tick: u64,
}

impl HeldCache {
    fn get(&mut self, sidecar: &Path, id: (u64, u64)) -> Option<(Arc<Manifest>, u64)> {
        self.tick += 1;
        let tick = self.tick;
        let cached = self.entries.get_mut(sidecar)?;
        if cached.header.id != id {
            return None;
        }
        cached.used = tick;
        Some((cached.header.manifest.clone(), cached.header.bits_at))
    }

    fn insert(&mut self, sidecar: PathBuf, header: HeldHeader) {
        self.tick += 1;
        self.bytes += manifest_bytes(&header.manifest);
        let used = self.tick;
        if let Some(old) = self.entries.insert(sidecar, CachedHeader { header, used }) {
            self.bytes -= manifest_bytes(&old.header.manifest);
        }
        while self.entries.len() > HELD_CACHED || self.bytes > HELD_CACHED_BYTES {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(old) = self.entries.remove(&oldest) {
                self.bytes -= manifest_bytes(&old.header.manifest);
            }
        }
    }
}

/// Units of downloads in progress that failed their check when read, by temporary file and
/// unit, with that file's identity then: not read again, and logged once per file version.
#[derive(Debug, Default)]
struct Damaged(Mutex<HashMap<(PathBuf, u32), FileKey>>);

impl Damaged {
    /// Whether `unit` of `part`, as the file `key` is, is known to be damaged.
    fn knows(&self, part: &Path, unit: u32, key: FileKey) -> bool {
        let known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        known.get(&(part.to_owned(), unit)) == Some(&key)
    }

    /// Remembers that `unit` of `part` (the file `key`) is damaged; whether it is the first of
    /// that file version. Past [`DAMAGED_KEPT`] units the memory starts over.
    fn note(&self, part: &Path, unit: u32, key: FileKey) -> bool {
        let mut known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= DAMAGED_KEPT {
            known.clear();
        }
        let first = !known.iter().any(|((p, _), k)| p == part && *k == key);
        known.insert((part.to_owned(), unit), key);
        first
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
            damaged: Damaged::default(),
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
                let header = HeldHeader {
                    id: opened.id,
                    manifest: m.clone(),
                    bits_at: at,
                };
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
        if let Some(i) = (first..last).find(|&i| self.damaged.knows(&part, i as u32, key)) {
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
                // The first damaged unit of a file is logged, the others at debug level.
                if self.damaged.note(&part, i, key) {
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

/// What upload temporary file names carry after the target's name: `.<name>.upload-<pid>-<n>.part`.
const UPLOAD_TAG: &str = "upload-";
