//! What a walk of our own folder hashed, kept on disk (`served_files/.qnode-hashes`) for the
//! next run: a file whose identity (size, mtime, ctime, inode, device) is what it was when hashed
//! is not read again, so a re-run of a folder download with nothing changed costs a stat a file.
//!
//! It is a cache only: a missing, stale or damaged index means more hashing, never a wrong
//! answer. A record is kept only for a file whose ctime was older than the look at it by more
//! than a clock tick ([`SETTLED`]): a later write then always changes the ctime (as git treats
//! "racily clean" entries). Records are read and written as a stream, in no order (of two for one
//! path, the later counts); the file is replaced whole (temporary file, rename), so a crash leaves
//! the old index or the new one.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{FileKey, Seen};
use crate::model::folder::Entry;
use crate::model::manifest::{FilePath, Hash32};

/// The index's name in `served_files` (hidden: never listed or served).
pub const HASHES_FILE: &str = ".qnode-hashes";

/// How much older than the look at it a file's ctime must be for its record to be kept (well
/// above the coarse clock tick file times are taken from).
const SETTLED: Duration = Duration::from_millis(100);

/// What the index file begins with (its format's version).
const MAGIC: [u8; 8] = *b"qnhash01";

/// One file's record.
#[derive(Serialize, Deserialize)]
struct Record {
    /// Its path from the top of `served_files`.
    path: String,
    key: FileKey,
    blake3: Hash32,
}

/// The files of one folder as a walk found them, each hashed or taken from the index.
pub struct Walked {
    /// The regular files under the folder (hidden entries and symlinks skipped), by path inside
    /// it, each with its size and BLAKE3.
    pub entries: Vec<Entry>,
    /// Each entry's identity when it was looked at.
    keys: Vec<FileKey>,
    /// When the walk began.
    began: SystemTime,
    /// Files read and hashed (not known from the index).
    hashed: usize,
    /// `served_files` and the folder's path from its top with a trailing `/` (empty for the
    /// whole of it); `None` for a folder outside `served_files` (no index).
    indexed: Option<(PathBuf, String)>,
}

/// The regular files under `folder` (hidden entries and symlinks skipped, as a served tree is
/// read), each hashed unless the index of `root` (`served_files`) knows it unchanged; many on two
/// threads. Files a killed download staged there are removed.
pub fn walk_hashed(root: &Path, folder: &Path) -> Walked {
    let began = SystemTime::now();
    let indexed = prefix_of(root, folder).map(|p| (root.to_owned(), p));
    let known = match &indexed {
        Some((root, prefix)) => {
            remove_litter(root);
            load(root, prefix)
        }
        None => HashMap::new(),
    };
    // Hidden entries are skipped as a served tree's are; the litter of a killed batch goes.
    let walker = super::tree_walker(folder)
        .hidden(false)
        .filter_entry(|e| {
            let name = e.file_name().to_str().unwrap_or(".");
            if super::unix::stale_staged(name) && e.file_type().is_some_and(|t| t.is_file()) {
                let _ = fs::remove_file(e.path());
            }
            !name.starts_with('.')
        })
        .build();
    let mut paths: Vec<FilePath> = (walker.filter_map(Result::ok))
        .filter(|e| e.file_type().is_some_and(|t| t.is_file()))
        .filter_map(|e| {
            let rel = e.path().strip_prefix(folder).ok()?.to_str()?;
            FilePath::new(rel).ok()
        })
        .collect();
    let hash = |paths: Vec<FilePath>| -> Vec<(Entry, FileKey, bool)> {
        let look = |path: FilePath| {
            let at = folder.join(path.as_str());
            let meta = fs::symlink_metadata(&at).ok()?;
            let key = FileKey::of(&meta);
            if let Some((k, blake3)) = known.get(path.as_str())
                && *k == key
            {
                return Some((
                    Entry {
                        path,
                        size: key.size,
                        blake3: *blake3,
                    },
                    key,
                    false,
                ));
            }
            let seen = Seen::of(&at).ok()??;
            let (key, blake3) = (seen.key, seen.blake3);
            Some((
                Entry {
                    path,
                    size: key.size,
                    blake3,
                },
                key,
                true,
            ))
        };
        paths.into_iter().filter_map(look).collect()
    };
    let mut found = if paths.len() < 64 {
        hash(paths)
    } else {
        let second = paths.split_off(paths.len() / 2);
        let (mut a, b) = std::thread::scope(|s| {
            let b = s.spawn(|| hash(second));
            (hash(paths), b.join())
        });
        // A thread that failed leaves its files unknown here: they are fetched or compared anew.
        a.extend(b.unwrap_or_default());
        a
    };
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let hashed = found.iter().filter(|f| f.2).count();
    let (entries, keys) = found.into_iter().map(|(e, k, _)| (e, k)).unzip();
    Walked {
        entries,
        keys,
        began,
        hashed,
        indexed,
    }
}

impl Walked {
    /// How many files the walk read and hashed (the others the index knew unchanged).
    pub fn hashed(&self) -> usize {
        self.hashed
    }

    /// Where a [`Batch`](super::Batch) notes each file it links, for [`save`](Self::save) to
    /// take in (a file, not memory: a folder may have 100,000 files); `None` without an index.
    pub fn journal(&self) -> Option<PathBuf> {
        let (root, _) = self.indexed.as_ref()?;
        Some(root.join(format!("{HASHES_FILE}.{}.linked", std::process::id())))
    }

    /// Writes the index anew for this folder: what the walk saw, then the files the journal says
    /// were linked since that are still as they were (later records win). Nothing is written
    /// when the walk hashed nothing and nothing was linked. Errors are the caller's to ignore:
    /// the index is a cache. Written as a stream: no copy of the records in memory.
    pub fn save(self) -> io::Result<()> {
        let (Some((root, prefix)), Some(journal)) = (&self.indexed, self.journal()) else {
            return Ok(());
        };
        let linked = fs::metadata(&journal).is_ok_and(|m| m.len() > MAGIC.len() as u64);
        if self.hashed == 0 && !linked {
            let _ = fs::remove_file(&journal);
            return Ok(());
        }
        let began = self.began;
        let walked = (self.entries.iter().zip(&self.keys))
            .filter(|(_, key)| settled(key, began))
            .map(|(e, key)| Record {
                path: format!("{prefix}{}", e.path),
                key: *key,
                blake3: e.blake3,
            });
        let now = SystemTime::now();
        let linked = records(&journal).filter(|r| {
            let at = root.join(&r.path);
            let same = fs::symlink_metadata(at).is_ok_and(|m| FileKey::of(&m) == r.key);
            same && settled(&r.key, now) && r.path.starts_with(prefix.as_str())
        });
        let written = write(root, prefix, walked.chain(linked));
        let _ = fs::remove_file(&journal);
        written
    }
}

/// Whether a file of identity `key`, looked at `at`, had been still long enough before.
fn settled(key: &FileKey, at: SystemTime) -> bool {
    let (secs, nanos) = (key.ctime.0.max(0) as u64, key.ctime.1.clamp(0, 999_999_999));
    SystemTime::UNIX_EPOCH + Duration::new(secs, nanos as u32) + SETTLED < at
}

/// Appends records to a journal (made when the first comes).
pub(super) struct Journal {
    path: PathBuf,
    /// The folder the records' paths start from (`served_files`).
    root: PathBuf,
    out: Option<BufWriter<File>>,
}

impl Journal {
    pub(super) fn new(path: PathBuf, root: PathBuf) -> Self {
        Self {
            path,
            root,
            out: None,
        }
    }

    /// Notes that `target` (under the root) was linked as `key`, with content `blake3`.
    pub(super) fn note(&mut self, target: &Path, key: FileKey, blake3: Hash32) -> io::Result<()> {
        let Some(path) = target
            .strip_prefix(&self.root)
            .ok()
            .and_then(|p| p.to_str())
        else {
            return Ok(());
        };
        let out = match &mut self.out {
            Some(out) => out,
            None => {
                let mut out = BufWriter::new(File::create(&self.path)?);
                out.write_all(&MAGIC)?;
                self.out.insert(out)
            }
        };
        let record = Record {
            path: path.to_owned(),
            key,
            blake3,
        };
        postcard::to_io(&record, out)
            .map(|_| ())
            .map_err(io::Error::other)
    }

    pub(super) fn flush(&mut self) -> io::Result<()> {
        self.out.as_mut().map_or(Ok(()), |o| o.flush())
    }
}

/// `folder`'s path from the top of `root` with a trailing `/` ("" for `root` itself), if it is
/// inside it.
fn prefix_of(root: &Path, folder: &Path) -> Option<String> {
    let root = std::path::absolute(root).ok()?;
    let folder = std::path::absolute(folder).ok()?;
    let rel = folder.strip_prefix(&root).ok()?.to_str()?;
    Some(match rel {
        "" => String::new(),
        rel => format!("{rel}/"),
    })
}

/// Removes the journals and temporary indexes of processes that are gone (killed mid-run).
fn remove_litter(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(HASHES_FILE)) else {
            continue;
        };
        let pid = (rest
            .strip_suffix(".linked")
            .or_else(|| rest.strip_suffix(".tmp")))
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|p| p.parse::<i32>().ok());
        if pid.is_some_and(super::unix::process_gone) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The records of the index (or journal) `file` in order, until its end or the first damaged
/// one.
fn records(file: &Path) -> impl Iterator<Item = Record> {
    let mut reader = File::open(file).ok().map(BufReader::new);
    if let Some(r) = reader.as_mut() {
        let mut magic = [0u8; 8];
        if io::Read::read_exact(r, &mut magic).is_err() || magic != MAGIC {
            reader = None;
        }
    }
    let mut scratch = vec![0u8; 4096];
    std::iter::from_fn(move || {
        let r = reader.as_mut()?;
        match postcard::from_io::<Record, _>((r, &mut scratch[..])) {
            Ok((record, _)) => Some(record),
            Err(_) => {
                reader = None;
                None
            }
        }
    })
}

/// The records under `prefix`, by their path inside it (of two for one path, the later).
fn load(root: &Path, prefix: &str) -> HashMap<String, (FileKey, Hash32)> {
    records(&root.join(HASHES_FILE))
        .filter_map(|r| {
            let rel = r.path.strip_prefix(prefix)?.to_owned();
            Some((rel, (r.key, r.blake3)))
        })
        .collect()
}

/// Replaces the records under `prefix` by `fresh`, keeping the others.
fn write(root: &Path, prefix: &str, fresh: impl Iterator<Item = Record>) -> io::Result<()> {
    let temp = root.join(format!("{HASHES_FILE}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut out = BufWriter::new(File::create(&temp)?);
        out.write_all(&MAGIC)?;
        let put = |out: &mut BufWriter<File>, r: &Record| {
            postcard::to_io(r, &mut *out)
                .map(|_| ())
                .map_err(io::Error::other)
        };
        let index = root.join(HASHES_FILE);
        for old in records(&index).filter(|r| !r.path.starts_with(prefix)) {
            put(&mut out, &old)?;
        }
        for r in fresh {
            put(&mut out, &r)?;
        }
        // Not flushed to disk: after a crash a damaged index only means more hashing.
        out.flush()?;
        fs::rename(&temp, root.join(HASHES_FILE))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}
