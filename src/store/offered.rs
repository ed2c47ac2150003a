//! Downloads in progress here, as `serve` offers them to other peers (swarming): their sidecars
//! found and read (headers cached, least recently used dropped first), and their verified units
//! read back and checked before they are sent (a unit that fails is remembered as damaged).

use super::*;

/// Bytes read at a time when a chunk of a download in progress is checked before it is served.
const READ_PART: u64 = 256 * 1024;

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
pub(super) struct CachedHeader {
    header: HeldHeader,
    used: u64,
}

/// Sidecar headers kept in memory, least recently used dropped first.
#[derive(Debug, Default)]
pub(super) struct HeldCache {
    pub(super) entries: HashMap<PathBuf, CachedHeader>,
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
pub(super) struct Damaged(Mutex<HashMap<(PathBuf, u32), FileKey>>);

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
fn held_name(file_name: &str) -> Option<(&str, &str)> {
    let inner = file_name
        .strip_prefix('.')?
        .strip_suffix(&format!(".{}", held::EXTENSION))?;
    let (name, tag) = inner.rsplit_once('.')?;
    let hex_tag = tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit());
    Some((name, tag)).filter(|_| hex_tag)
}

/// The folder of `name` beneath `dir` (opened following no symlink on the way: its files are
/// reached through this descriptor), where a download of it keeps its files, and its path
/// there; `None` if there is no such folder.
fn beside(dir: &Path, name: &FilePath) -> Result<Option<(File, PathBuf)>, StoreError> {
    let folder = name.as_str().rsplit_once('/').map_or("", |(f, _)| f);
    match open_folder_beneath(dir, folder) {
        Ok(f) => Ok(Some((f, dir.join(folder)))),
        Err(e) if e.kind() == io::ErrorKind::NotFound || not_a_folder(&e) || not_regular(&e) => {
            Ok(None)
        }
        Err(e) => Err(StoreError::io("opening", &dir.join(folder), e)),
    }
}

/// The last component of `name`.
fn base_of(name: &FilePath) -> &str {
    name.as_str()
        .rsplit_once('/')
        .map_or(name.as_str(), |(_, b)| b)
}

impl Store {
    /// What the download of version `blake3` of `name` in progress here holds, if there is one.
    pub fn held(&self, name: &FilePath, blake3: &Hash32) -> Result<Option<Held>, StoreError> {
        let Some((folder, at)) = beside(&self.dir, name)? else {
            return Ok(None);
        };
        let file = format!(
            ".{}.{}.{}",
            base_of(name),
            download_tag(blake3),
            held::EXTENSION
        );
        self.held_at(&fd_path(&folder), &at, &file, name)
    }

    /// The download of `name` in progress here (the one changed last, if there are several
    /// versions), if there is one.
    pub fn held_any(&self, name: &FilePath) -> Result<Option<Held>, StoreError> {
        let Some((folder, at)) = beside(&self.dir, name)? else {
            return Ok(None);
        };
        let open_at = fd_path(&folder);
        let entries = fs::read_dir(&open_at).map_err(|e| StoreError::io("listing", &at, e))?;
        let mut found: Option<Held> = None;
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(file) = file_name.to_str() else {
                continue;
            };
            if held_name(file).is_none_or(|(n, _)| n != base_of(name)) {
                continue;
            }
            if let Some(held) = self.held_at(&open_at, &at, file, name)?
                && found.as_ref().is_none_or(|f| f.changed < held.changed)
            {
                found = Some(held);
            }
        }
        Ok(found)
    }

    /// Every download in progress here at the top of `served_files`, by name.
    pub fn held_all(&self) -> Result<Vec<(FilePath, Held)>, StoreError> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| StoreError::io("listing", &self.dir, e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(file) = file_name.to_str() else {
                continue;
            };
            let Some(name) = held_name(file).and_then(|(n, _)| FilePath::new(n).ok()) else {
                continue;
            };
            if let Some(held) = self.held_at(&self.dir, &self.dir, file, &name)? {
                out.push((name, held));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The download a sidecar describes: `None` unless it is a valid sidecar of `name`, named
    /// after its version, beside a temporary file of the right size.
    pub(super) fn held_at(
        &self,
        open_at: &Path,
        folder: &Path,
        file: &str,
        name: &FilePath,
    ) -> Result<Option<Held>, StoreError> {
        // Opened through `open_at` (the folder's descriptor), cached by its path.
        let sidecar = &folder.join(file);
        let io = |e| StoreError::io("reading", sidecar, e);
        let Some(opened) = held::open(&open_at.join(file)).map_err(io)? else {
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
        let named = held_name(file).is_some_and(|(n, t)| n == base_of(name) && t == tag);
        let part = open_at.join(file).with_extension("part");
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
        name: &FilePath,
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
        let Some((folder, at)) = beside(&self.dir, name)? else {
            return Err(not_held(first));
        };
        let part_name = format!(".{}.{}.part", base_of(name), download_tag(blake3));
        // Known damage is remembered by the part's path, not the descriptor's.
        let part = at.join(&part_name);
        let io = |e| StoreError::io("reading", &part, e);
        let file = match open_nofollow(&fd_path(&folder).join(&part_name)) {
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
}
