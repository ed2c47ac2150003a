//! Uploads: the name claimed (one upload per name at a time), the partial file they write, and
//! leftovers of interrupted uploads removed at start.

use super::*;

impl Store {
    /// Decides an upload of `size` bytes hashing to `blake3` under `name`: `Ok(None)` if an identical
    /// file is already served, else a reserved [`Upload`] to write into.
    pub fn begin_upload(
        &self,
        name: &FilePath,
        size: u64,
        blake3: Hash32,
        replace: bool,
    ) -> Result<Option<Upload>, StoreError> {
        if self.ignored(name) {
            return Err(StoreError::Ignored(name.clone()));
        }
        // Its folders first, each a real folder (never through a symlink).
        if let Some(parent) = name.parent() {
            make_folders_beneath(&self.dir, parent).map_err(|e| match e.kind() {
                io::ErrorKind::NotADirectory => StoreError::Conflict(name.to_string()),
                _ => StoreError::io("creating the folders of", &self.path_of(name), e),
            })?;
        }
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
    set: Arc<Mutex<HashSet<FilePath>>>,
    name: FilePath,
}

impl UploadGuard {
    fn claim(set: &Arc<Mutex<HashSet<FilePath>>>, name: &FilePath) -> Result<Self, StoreError> {
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

/// What upload temporary file names carry after the target's name: `.<name>.upload-<pid>-<n>.part`.
const UPLOAD_TAG: &str = "upload-";
