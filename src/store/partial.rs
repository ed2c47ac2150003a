//! How anything new appears in `served_files`: a hidden temporary file beside its target,
//! written, synced, checked, then linked (or renamed over an old version it keeps). What a file
//! was when it was seen (`Seen`), to notice a change before replacing it.

use super::displaced::{displaced_folder, prune_displaced};
use super::unix::*;
use super::*;

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

/// A regular file as it was seen: its identity on disk and its BLAKE3, so a replacement can tell
/// whether it changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub(super) key: FileKey,
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
        } else if meta.len() < 4 << 20 {
            // Small: one pass of the plain hasher (many chunks at once in SIMD) beats hashing
            // chunk by chunk, as a manifest does.
            let mut h = blake3::Hasher::new();
            h.update_reader(&file).map_err(io)?;
            (None, *h.finalize().as_bytes())
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
        let keep = match displaced_folder(&dir) {
            Ok(keep) => keep,
            Err(e) => {
                self.keep.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
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

/// How a [`PartialFile`] takes its disk space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reserve {
    /// All of it at creation, so a full disk fails at once.
    Upfront,
    /// As bytes are written.
    AsWritten,
}
