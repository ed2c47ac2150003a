//! The Unix calls the store is built on: opens that never follow a link or block, exclusive
//! temporary files, linking a file by its descriptor, free disk space, and reading a small
//! local file (settings, keys, certificates) safely.

use super::*;

/// Whether an `open` with `O_NOFOLLOW | O_NONBLOCK` failed because the name is not a regular file:
/// a symlink (`ELOOP`) or a FIFO without a reader (`ENXIO`).
pub(super) fn not_regular(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENXIO))
}

/// Opens `path` for reading without following a symlink and without blocking on a FIFO.
pub(super) fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// Opens (or creates) a temporary file at `temp` that is surely a regular file of ours: a symlink,
/// FIFO or other non-regular file planted under that name is removed (the name, never what it
/// points to) and the file created anew, exclusively.
pub(super) fn open_temp(temp: &Path) -> Result<File, StoreError> {
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
pub(super) fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(file)
    ))
}

pub(super) fn same_file(a: &File, b: &File) -> bool {
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => same_inode(&a, &b),
        _ => false,
    }
}

pub(super) fn same_inode(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    a.ino() == b.ino() && a.dev() == b.dev()
}

/// `path` as a C string, for the few calls std does not wrap.
pub(super) fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("NUL in a path"))
}

/// Gives the file open as `file` (whose name is `temp`) the new name `target`, which must not
/// exist. Linked through the descriptor, so what appears is the file we wrote and verified even if
/// `temp` was swapped for a symlink meanwhile; where /proc is missing, by name after checking that
/// the name is still our file.
pub(super) fn link_descriptor(file: &File, temp: &Path, target: &Path) -> io::Result<()> {
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

pub(super) fn disk_space(dir: &Path) -> io::Result<(u64, u64)> {
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

/// Reads a small local file (settings, a key, a certificate) whole: it must be a regular file (a
/// FIFO would block and `/dev/zero` never end) of at most `max` bytes. Symlinks are followed; what
/// they lead to is checked. Returns the bytes and the file's metadata.
pub fn read_small_file(path: &Path, max: u64) -> io::Result<(Vec<u8>, fs::Metadata)> {
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} bytes, more than the {max} expected", meta.len()),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Capped again in case it grows while we read.
    file.take(max).read_to_end(&mut bytes)?;
    Ok((bytes, meta))
}
