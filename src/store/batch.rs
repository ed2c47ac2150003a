//! Small files committed in batches. Each is written whole and already verified to a hidden
//! temporary file beside its name; then, for many files at once, one flush of the file system
//! (`syncfs`) before any of them is linked under its name and one after. Each file still appears
//! only complete, never replaces a file, and stays once it is there; a flush per file would cost
//! more than the file (for thousands of notes, most of the time).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::hashes::Journal;
use super::unix::{link_descriptor, open_temp};
use super::{Committed, FileKey, Seen, StoreError};
use crate::model::manifest::Hash32;

/// Files staged before a batch is committed (each holds a descriptor until then).
const BATCH_FILES: usize = 128;
/// Bytes staged before a batch is committed.
const BATCH_BYTES: u64 = 32 << 20;

/// A verified file waiting for its batch.
struct Staged {
    file: File,
    temp: PathBuf,
    target: PathBuf,
    blake3: Hash32,
}

/// Files waiting to be committed together.
#[derive(Default)]
pub struct Batch {
    staged: Mutex<(Vec<Staged>, u64)>,
    count: AtomicU64,
    /// Where each file linked under its name is noted (its path, identity right after, BLAKE3),
    /// for the index of hashes.
    journal: Option<Mutex<Journal>>,
}

impl Batch {
    /// Writes `data` (whose BLAKE3 the caller checked is `blake3`) to a temporary file beside
    /// `target`, to appear under that name at the next [`commit`](Self::commit). True when the
    /// batch is full and should be committed now.
    pub fn stage(&self, target: &Path, data: &[u8], blake3: Hash32) -> Result<bool, StoreError> {
        let dir = target.parent().unwrap_or(Path::new("."));
        let base = target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("file");
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(".{base}.{}-{n}.staged", std::process::id()));
        let mut file = open_temp(&temp)?;
        let written = file.set_len(0).and_then(|()| file.write_all(data));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(StoreError::io("writing", &temp, e));
        }
        let staged = Staged {
            file,
            temp,
            target: target.to_owned(),
            blake3,
        };
        let mut guard = self.staged.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.push(staged);
        guard.1 += data.len() as u64;
        Ok(guard.0.len() >= BATCH_FILES || guard.1 >= BATCH_BYTES)
    }

    /// Makes every staged file durable, then puts each under its name and makes the names
    /// durable. Each file's outcome, by target; an error stops at the first file that failed
    /// (the ones after it are removed, to be fetched again).
    pub fn commit(&self) -> Result<Vec<(PathBuf, Committed)>, StoreError> {
        let staged = {
            let mut guard = self.staged.lock().unwrap_or_else(|e| e.into_inner());
            guard.1 = 0;
            std::mem::take(&mut guard.0)
        };
        let Some(first) = staged.first() else {
            return Ok(Vec::new());
        };
        flush(&first.file, &first.temp)?;
        let mut done = Vec::with_capacity(staged.len());
        let mut failed = None;
        let mut journal = self
            .journal
            .as_ref()
            .map(|j| j.lock().unwrap_or_else(|e| e.into_inner()));
        for s in staged {
            let outcome = failed.is_none().then(|| link(&s));
            let _ = std::fs::remove_file(&s.temp);
            match outcome {
                Some(Ok(c)) => {
                    // Its identity once the temporary name is gone (that changes its ctime).
                    if let (Committed::Stored, Ok(m), Some(j)) =
                        (c, s.file.metadata(), &mut journal)
                    {
                        // A note lost costs a hashing at the next run, nothing more.
                        let _ = j.note(&s.target, FileKey::of(&m), s.blake3);
                    }
                    done.push((s.target.clone(), c));
                }
                Some(Err(e)) => failed = Some(e),
                None => {}
            }
        }
        if let Some(j) = &mut journal {
            let _ = j.flush();
        }
        drop(journal);
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some((target, _)) = done.first() {
            let dir = target.parent().unwrap_or(Path::new("."));
            let d = File::open(dir).map_err(|e| StoreError::io("opening", dir, e))?;
            flush(&d, dir)?;
        }
        Ok(done)
    }
}

impl Batch {
    /// A batch that notes each file it links in `journal` (see [`Walked::journal`]), paths
    /// from `root`.
    ///
    /// [`Walked::journal`]: super::Walked::journal
    pub fn noting(journal: Option<PathBuf>, root: &Path) -> Self {
        let journal = journal.map(|j| Mutex::new(Journal::new(j, root.to_owned())));
        Self {
            staged: Mutex::default(),
            count: AtomicU64::default(),
            journal,
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Never committed: their temporary files go.
        let staged = self.staged.get_mut().unwrap_or_else(|e| e.into_inner());
        for s in staged.0.drain(..) {
            let _ = std::fs::remove_file(&s.temp);
        }
    }
}

/// Flushes the whole file system `file` is on.
fn flush(file: &File, path: &Path) -> Result<(), StoreError> {
    // SAFETY: the descriptor is open for the call.
    if unsafe { libc::syncfs(file.as_raw_fd()) } != 0 {
        let e = io::Error::last_os_error();
        return Err(StoreError::io("flushing the file system of", path, e));
    }
    Ok(())
}

/// Links a staged file under its name, which is never replaced: if a file is there, it must be
/// identical (`AlreadyPresent`) or this is a `Conflict`.
fn link(s: &Staged) -> Result<Committed, StoreError> {
    match link_descriptor(&s.file, &s.temp, &s.target) {
        Ok(()) => Ok(Committed::Stored),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match Seen::of(&s.target) {
            Ok(Some(seen)) if seen.blake3 == s.blake3 => Ok(Committed::AlreadyPresent),
            _ => Err(StoreError::Conflict(s.target.display().to_string())),
        },
        Err(e) => Err(StoreError::io("linking", &s.target, e)),
    }
}
