//! The Unix calls the store is built on: opens that never follow a link or block, exclusive
//! temporary files, linking a file by its descriptor, free disk space, and reading a small
//! local file (settings, keys, certificates) safely.

use super::*;

/// Whether an `open` with `O_NOFOLLOW | O_NONBLOCK` failed because the name is not a regular file:
/// a symlink (`ELOOP`) or a FIFO without a reader (`ENXIO`).
pub(super) fn not_regular(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENXIO))
}

/// Whether an open failed because a folder on the way is not a real folder (`ENOTDIR`: a file,
/// or a symlink opened with `O_DIRECTORY | O_NOFOLLOW`).
pub(super) fn not_a_folder(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOTDIR)
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

/// Opens `rel` (a path of normal components) beneath the folder `root` for reading, following
/// no symlink at any depth and never blocking on a FIFO: each folder on the way is opened with
/// `O_NOFOLLOW | O_DIRECTORY` relative to the one before, so a symlinked folder is never
/// traversed. A symlink anywhere fails with `ELOOP` (or `ENOTDIR` for a folder component).
pub(super) fn open_beneath(root: &Path, rel: &FilePath) -> io::Result<File> {
    let mut folder = open_root(root)?;
    let mut components = rel.components().peekable();
    while let Some(component) = components.next() {
        let name = c_name(component)?;
        if components.peek().is_none() {
            let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
            // SAFETY: `folder` is an open descriptor and `name` a NUL-terminated string.
            let fd = unsafe { libc::openat(fd_of(&folder), name.as_ptr(), flags) };
            return owned(fd);
        }
        folder = open_dir_nofollow(fd_of(&folder), &name)?;
    }
    Err(io::Error::from(io::ErrorKind::NotFound))
}

/// Opens the folder `rel` (components separated by `/`; empty for `root` itself) beneath
/// `root`, following no symlink at any depth.
pub(super) fn open_folder_beneath(root: &Path, rel: &str) -> io::Result<File> {
    let mut folder = open_root(root)?;
    for component in rel.split('/').filter(|c| !c.is_empty()) {
        folder = open_dir_nofollow(fd_of(&folder), &c_name(component)?)?;
    }
    Ok(folder)
}

/// Creates the folders of `rel` (every component, none may be a symlink) beneath `root`, which
/// must exist. A component that exists as anything but a real folder is an error.
pub(super) fn make_folders_beneath(root: &Path, rel: &str) -> io::Result<()> {
    let mut folder = open_root(root)?;
    for component in rel.split('/').filter(|c| !c.is_empty()) {
        let name = c_name(component)?;
        // SAFETY: as above.
        let made = unsafe { libc::mkdirat(fd_of(&folder), name.as_ptr(), 0o755) };
        if made != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        folder = open_dir_nofollow(fd_of(&folder), &name).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR) => io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{component} is not a folder (a symlink or a file?)"),
            ),
            _ => e,
        })?;
    }
    Ok(())
}

/// The root folder itself (`served_files` may be a symlink the user made: it is followed).
fn open_root(root: &Path) -> io::Result<File> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated path.
    owned(unsafe { libc::open(c_path(root)?.as_ptr(), flags) })
}

fn open_dir_nofollow(at: libc::c_int, name: &std::ffi::CStr) -> io::Result<File> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `at` is AT_FDCWD or an open descriptor; `name` is NUL-terminated.
    owned(unsafe { libc::openat(at, name.as_ptr(), flags) })
}

fn fd_of(file: &File) -> libc::c_int {
    std::os::fd::AsRawFd::as_raw_fd(file)
}

/// A descriptor `openat` returned, owned (or its error).
fn owned(fd: libc::c_int) -> io::Result<File> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by no one else.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

fn c_name(component: &str) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(component).map_err(|_| io::Error::other("NUL in a name"))
}

/// Whether process `pid` (not ours) no longer exists: what it left behind is litter.
pub(super) fn process_gone(pid: i32) -> bool {
    if pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    // SAFETY: signal 0 only asks whether the process exists.
    let gone = unsafe { libc::kill(pid, 0) } != 0;
    gone && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Whether `name` is a file a [`Batch`](super::Batch) staged (`.NAME.PID-N.staged`) in a
/// process that is gone (killed before it could commit or remove it): litter, to be removed.
pub(super) fn stale_staged(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".staged"))
    else {
        return false;
    };
    let pid = rest.rsplit('.').next().and_then(|t| t.split('-').next());
    let Some(pid) = pid.and_then(|p| p.parse::<i32>().ok()) else {
        return false;
    };
    process_gone(pid)
}
