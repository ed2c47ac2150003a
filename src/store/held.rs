//! What a download in progress holds, kept on disk so that `serve` can offer it while the
//! download runs (swarming). Part of the store layer: file I/O only.
//!
//! `download` and `serve` of one peer are separate processes that share only `served_files`. A
//! download there keeps, beside its hidden temporary file `.<name>.<tag>.part`, a sidecar
//! `.<name>.<tag>.held`:
//!
//! ```text
//! "qnheld01"   8 bytes
//! L            4 bytes, big-endian: the length of what follows
//! manifest     L bytes, postcard (as on the wire, but in pieces if the download is)
//! bits         one per chunk (bit i % 8 of byte i / 8), set once chunk i is verified and written
//! ```
//!
//! The header is written once, to a temporary name that is then renamed, so a reader sees a whole
//! sidecar or none. A bit is written (one byte, in place) only after its chunk's write returned,
//! so another process never sees a bit before the bytes it stands for. Readers still trust
//! nothing: a bit whose bytes never reached the disk (the machine crashed) or were changed since
//! is caught because `serve` checks every chunk against the manifest before it sends it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::model::manifest::{ChunkSet, Manifest};

/// The first bytes of every sidecar.
const MAGIC: &[u8; 8] = b"qnheld01";
/// The extension of a sidecar, in place of the temporary file's `part`.
pub const EXTENSION: &str = "held";
/// Largest manifest a sidecar may hold: 2^16 chunk hashes and a few bytes more.
const MAX_MANIFEST_LEN: u32 = (1 << 21) + 64;

/// The sidecar of the temporary file at `part`.
pub fn path_for(part: &Path) -> PathBuf {
    part.with_extension(EXTENSION)
}

/// The downloader's side: the sidecar it keeps up to date.
#[derive(Debug)]
pub struct HeldWriter {
    file: File,
    path: PathBuf,
    /// Where the bits start.
    bits_at: u64,
    /// The bits as written; a byte is rewritten whole when one of its bits is set.
    bits: Mutex<Vec<u8>>,
}

impl HeldWriter {
    /// Writes the sidecar of the temporary file `part` for `manifest`, with `have` set.
    /// Replaces an earlier sidecar of that name (an interrupted attempt's).
    pub fn create(part: &Path, manifest: &Manifest, have: &ChunkSet) -> io::Result<Self> {
        let path = path_for(part);
        let body = postcard::to_stdvec(manifest).map_err(io::Error::other)?;
        let len = u32::try_from(body.len()).map_err(io::Error::other)?;
        let bits = have.to_bytes();
        let mut bytes = Vec::with_capacity(12 + body.len() + bits.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&body);
        let bits_at = bytes.len() as u64;
        bytes.extend_from_slice(&bits);
        // A fresh name opened exclusively (never through a link planted there), then renamed
        // over the sidecar's name: readers see the old sidecar or the new one, whole.
        let fresh = path.with_extension(format!("{EXTENSION}.new"));
        let _ = fs::remove_file(&fresh);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&fresh)?;
        let written = file
            .write_all(&bytes)
            .and_then(|()| fs::rename(&fresh, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&fresh);
            return Err(e);
        }
        Ok(Self {
            file,
            path,
            bits_at,
            bits: Mutex::new(bits),
        })
    }

    /// Marks chunk `index` as held (its bytes are verified and written).
    pub fn mark(&self, index: u32) -> io::Result<()> {
        // Held for one byte's update and write; a poisoned lock still holds valid bits.
        let mut bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        let k = index as usize / 8;
        let Some(byte) = bits.get_mut(k) else {
            return Ok(());
        };
        *byte |= 1 << (index % 8);
        self.file.write_all_at(&[*byte], self.bits_at + k as u64)
    }

    /// Removes the sidecar (the download is committed or abandoned).
    pub fn remove(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A sidecar as a reader opened it: the file and its identity.
#[derive(Debug)]
pub struct Opened {
    file: File,
    /// Device and inode: a sidecar is written whole once under that identity, so a manifest
    /// read from it stays valid for as long as the identity does.
    pub id: (u64, u64),
    /// When it last changed (seconds, nanoseconds): its newest bit.
    pub changed: (i64, i64),
}

/// Opens the sidecar at `path` without following a link or blocking; `None` if there is none.
pub fn open(path: &Path) -> io::Result<Option<Opened>> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENXIO)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(None);
    }
    Ok(Some(Opened {
        id: (meta.dev(), meta.ino()),
        changed: (meta.mtime(), meta.mtime_nsec()),
        file,
    }))
}

impl Opened {
    /// The manifest, and where the bits start; `None` if this is not a valid sidecar.
    pub fn header(&self) -> io::Result<Option<(Manifest, u64)>> {
        let mut head = [0u8; 12];
        match self.file.read_exact_at(&mut head, 0) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
        if head[..8] != MAGIC[..] || len > MAX_MANIFEST_LEN {
            return Ok(None);
        }
        let mut body = vec![0u8; len as usize];
        match self.file.read_exact_at(&mut body, 12) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let Ok(manifest) = Manifest::from_stored(&body) else {
            return Ok(None);
        };
        Ok(Some((manifest, 12 + u64::from(len))))
    }

    /// The chunks marked, for a manifest of `chunks` chunks whose bits start at `bits_at`;
    /// `None` if the sidecar is cut short.
    pub fn bits(&self, bits_at: u64, chunks: u32) -> io::Result<Option<ChunkSet>> {
        let mut bytes = vec![0u8; (chunks as usize).div_ceil(8)];
        match self.file.read_exact_at(&mut bytes, bits_at) {
            Ok(()) => Ok(ChunkSet::from_bytes(chunks, &bytes)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sidecar_is_read_back_as_written_and_bits_follow_marks() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let manifest = Manifest::from_reader(&data[..], data.len() as u64).unwrap();
        let n = manifest.chunk_count();
        let part = dir.path().join(".x.txt.0123456789abcdef.part");
        let mut have = ChunkSet::none(n);
        have.insert(1);
        let writer = HeldWriter::create(&part, &manifest, &have).unwrap();
        assert_eq!(
            path_for(&part),
            dir.path().join(".x.txt.0123456789abcdef.held")
        );
        let opened = open(&path_for(&part)).unwrap().unwrap();
        let (m, bits_at) = opened.header().unwrap().unwrap();
        assert_eq!(m, manifest);
        assert_eq!(opened.bits(bits_at, n).unwrap().unwrap(), have);
        writer.mark(n - 1).unwrap();
        writer.mark(5).unwrap();
        have.insert(n - 1);
        have.insert(5);
        assert_eq!(opened.bits(bits_at, n).unwrap().unwrap(), have);
        writer.remove();
        assert!(open(&path_for(&part)).unwrap().is_none());
    }

    #[test]
    fn garbage_links_and_cut_sidecars_are_not_sidecars() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".a.held");
        for bytes in [
            &b""[..],
            b"qnheld01",
            b"qnheld01\xff\xff\xff\xff",
            b"nothing here at all",
        ] {
            fs::write(&p, bytes).unwrap();
            assert!(
                open(&p).unwrap().unwrap().header().unwrap().is_none(),
                "{bytes:?}"
            );
        }
        fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &p).unwrap();
        assert!(open(&p).unwrap().is_none());
    }
}
