//! Versions a replace displaced, kept hidden in `.qnode-displaced/` beside the file: a few per
//! name, and a cap in all (files and bytes), oldest removed first.

use super::*;

/// The hidden folder, next to a replaced file, that keeps the versions it replaced (never listed:
/// a name starting with a dot is not a served name).
pub const DISPLACED_DIR: &str = ".qnode-displaced";

/// Displaced versions kept per name; older ones are removed.
pub const DISPLACED_KEPT: usize = 3;

/// Displaced versions kept in one folder, of all names; the oldest are removed first.
pub const DISPLACED_MAX_FILES: usize = 1000;

/// Bytes of displaced versions kept in one folder; the oldest are removed first.
pub const DISPLACED_MAX_BYTES: u64 = 1 << 30;

/// The displaced versions' folder in `dir`, made if need be (mode 0700). A symlink planted there
/// by a local user would send versions (and the pruning) into another folder: only a real
/// folder is used, else nothing is displaced.
pub(super) fn displaced_folder(dir: &Path) -> Result<PathBuf, StoreError> {
    let keep = dir.join(DISPLACED_DIR);
    match fs::create_dir(&keep) {
        Ok(()) => {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(&keep, fs::Permissions::from_mode(0o700));
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(StoreError::io("creating", &keep, e)),
    }
    if !fs::symlink_metadata(&keep).is_ok_and(|m| m.file_type().is_dir()) {
        return Err(StoreError::io(
            "keeping the old version in",
            &keep,
            io::Error::other("not a folder (a symlink?); nothing was replaced"),
        ));
    }
    Ok(keep)
}

/// Moves the file at `path` (whose content hashes to `blake3`) into the displaced versions
/// beside it: linked there first, then unlinked from its name, so it is never lost.
pub fn displace(path: &Path, blake3: &Hash32) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let keep = displaced_folder(dir)?;
    let kept = keep.join(format!("{name}.{}", &hex(blake3)[..16]));
    match fs::hard_link(path, &kept) {
        Ok(()) => {}
        // The same version was displaced before: it is kept already.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(StoreError::io("keeping", path, e)),
    }
    fs::remove_file(path).map_err(|e| StoreError::io("removing", path, e))?;
    prune_displaced(&keep, name);
    Ok(())
}

/// Keeps the newest [`DISPLACED_KEPT`] displaced versions of `name` in `keep`, and in all at
/// most [`DISPLACED_MAX_FILES`] files and [`DISPLACED_MAX_BYTES`] bytes there (oldest removed
/// first, whatever their name).
pub(super) fn prune_displaced(keep: &Path, name: &str) {
    prune_displaced_to(keep, name, (DISPLACED_MAX_FILES, DISPLACED_MAX_BYTES));
}

/// A displaced version found in the folder, ordered by when it was displaced.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Kept {
    /// Its ctime (seconds, nanoseconds): when it was linked here.
    displaced: (i64, i64),
    len: u64,
    path: PathBuf,
    /// A version of the name being pruned.
    ours: bool,
}

/// [`prune_displaced`] with caps of its own in all: (files, bytes).
pub(super) fn prune_displaced_to(keep: &Path, name: &str, (max_files, max_bytes): (usize, u64)) {
    let Ok(entries) = fs::read_dir(keep) else {
        return;
    };
    let prefix = format!("{name}.");
    // By ctime: when each was displaced (linked here). Only regular files (not followed).
    let mut all: Vec<Kept> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.metadata().ok().filter(fs::Metadata::is_file)?;
            let ours = e.file_name().to_str().is_some_and(|n| {
                n.strip_prefix(&prefix)
                    .is_some_and(|rest| rest.len() == 16 && !rest.contains('.'))
            });
            Some(Kept {
                displaced: (m.ctime(), m.ctime_nsec()),
                len: m.len(),
                path: e.path(),
                ours,
            })
        })
        .collect();
    all.sort();
    let mut excess = all
        .iter()
        .filter(|v| v.ours)
        .count()
        .saturating_sub(DISPLACED_KEPT);
    let (mut files, mut bytes) = (all.len(), all.iter().map(|v| v.len).sum::<u64>());
    for Kept {
        len, path, ours, ..
    } in all
    {
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
