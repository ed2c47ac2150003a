//! What a file is, checked: manifests, chunk arithmetic and BLAKE3 (names are `name`'s).
//!
//! A [`Manifest`] describes a file by its size and the BLAKE3 hash of every chunk. The chunk size is a
//! pure function of the size ([`chunk_size_for`]), so the same bytes give the same manifest on every
//! peer and manifests can be compared. Chunk sizes are powers of two of at least 1 KiB, which lets each
//! chunk's hash be a BLAKE3 *subtree chaining value* (`blake3::hazmat`): merging them gives exactly the
//! plain BLAKE3 hash of the whole file (what `b3sum` prints). A manifest is therefore self-checking:
//! its chunk hashes must merge to its root, which is verified whenever one is decoded from the wire.
//!
//! This module is synchronous and never touches sockets; it may read a file it is handed.

use std::io::{self, Read};

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};
use serde::{Deserialize, Serialize};

pub use crate::model::name::{FileName, FilePath, InvalidName, MAX_NAME_LEN};

/// Smallest chunk, in bytes: one BLAKE3 chunk.
pub const MIN_CHUNK_SIZE: u64 = 1024;
/// Largest chunk used while a file has at most [`MAX_CHUNKS`] of them, in bytes.
///
/// 1 MiB keeps per-request overhead (one stream, one header) below 0.1% while a handful of chunks in
/// flight per peer still fit in memory many times over.
pub const PREFERRED_MAX_CHUNK_SIZE: u64 = 1 << 20;
/// A file is cut into at least this many chunks when that keeps them ≥ [`MIN_CHUNK_SIZE`], so that
/// even a small text file is shared out among several peers.
pub const TARGET_MIN_CHUNKS: u64 = 16;
/// Most chunks in one file; bigger files get bigger chunks. Bounds a manifest to 2 MiB of hashes.
pub const MAX_CHUNKS: u64 = 1 << 16;
/// Largest chunk, in bytes (64 MiB).
pub const MAX_CHUNK_SIZE: u64 = 1 << 26;
/// Largest file qnode handles, in bytes (4 TiB): [`MAX_CHUNKS`] chunks of [`MAX_CHUNK_SIZE`].
pub const MAX_FILE_SIZE: u64 = MAX_CHUNKS * MAX_CHUNK_SIZE;
/// Largest file asked for whole in one request (`ReadFile`): a small file of a folder.
pub const MAX_WHOLE_FILE: u64 = 1 << 20;
/// How many pieces a chunk is cut into where a file has pieces ([`piece_size_for`]).
pub const PIECES_PER_CHUNK: u32 = 4;
/// Smallest piece, in bytes: below it a piece's request costs more than its crossing saves.
pub const MIN_PIECE_SIZE: u64 = 16 * 1024;

/// A 32-byte BLAKE3 hash or chaining value.
pub type Hash32 = [u8; 32];

/// The chunk size of a file of `size` bytes: a power of two, a pure function of the size.
pub fn chunk_size_for(size: u64) -> u64 {
    let small = size
        .div_ceil(TARGET_MIN_CHUNKS)
        .next_power_of_two()
        .clamp(MIN_CHUNK_SIZE, PREFERRED_MAX_CHUNK_SIZE);
    let needed = size.div_ceil(MAX_CHUNKS).next_power_of_two();
    small.max(needed).min(MAX_CHUNK_SIZE)
}

/// How many chunks a file of `size` bytes has (an empty file has one empty chunk).
pub fn chunk_count_for(size: u64) -> u64 {
    size.div_ceil(chunk_size_for(size)).max(1)
}

/// The piece size of a file of `size` bytes, if it has pieces: a [`PIECES_PER_CHUNK`]th of its
/// chunk, when that is at least [`MIN_PIECE_SIZE`], the file has several chunks and its pieces
/// number at most [`MAX_CHUNKS`].
///
/// Pieces are the unit a crowd passes on (swarming): each is checked on its own against a
/// BLAKE3 subtree chaining value, and a chunk's pieces merge to the chunk's hash, so a
/// manifest in pieces ([`Manifest::refine`]) is checked against the file's own manifest.
pub fn piece_size_for(size: u64) -> Option<u64> {
    let piece = chunk_size_for(size) / u64::from(PIECES_PER_CHUNK);
    (piece >= MIN_PIECE_SIZE && chunk_count_for(size) >= 2 && size.div_ceil(piece) <= MAX_CHUNKS)
        .then_some(piece)
}

/// How many units a file of `size` bytes has: chunks, or (`in_pieces`) pieces where it has
/// them. At most [`MAX_CHUNKS`], so it fits a u32.
pub fn unit_count(size: u64, in_pieces: bool) -> u32 {
    let unit = match in_pieces {
        true => piece_size_for(size).unwrap_or_else(|| chunk_size_for(size)),
        false => chunk_size_for(size),
    };
    size.div_ceil(unit).max(1) as u32
}

/// Lower-case hex of a hash.
pub fn hex(hash: &Hash32) -> String {
    blake3::Hash::from_bytes(*hash).to_hex().to_string()
}

/// Parses 64 hex digits into a hash.
pub fn parse_hex(s: &str) -> Option<Hash32> {
    blake3::Hash::from_hex(s).ok().map(|h| *h.as_bytes())
}

/// A file's description: size, chunk hashes and the BLAKE3 hash of the whole file.
///
/// Every constructor checks consistency (chunk size and count follow from the size; the chunk hashes
/// merge to `blake3`), so holding a `Manifest` means holding a coherent one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawManifest", into = "RawManifest")]
pub struct Manifest {
    size: u64,
    /// [`chunk_size_for`] the size, or in a manifest in pieces [`piece_size_for`] it.
    chunk_size: u64,
    chunks: Vec<Hash32>,
    blake3: Hash32,
}

/// The wire form of a [`Manifest`], before its checks.
#[derive(Serialize, Deserialize)]
struct RawManifest {
    size: u64,
    chunk_size: u64,
    chunks: Vec<Hash32>,
    blake3: Hash32,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The file is larger than qnode handles.
    #[error("file of {0} bytes is larger than the 4 TiB qnode handles")]
    TooLarge(u64),
    /// Chunk size or count does not follow from the size.
    #[error("chunk layout does not match the file size")]
    Layout,
    /// The chunk hashes do not merge to the claimed file hash.
    #[error("chunk hashes do not add up to the file hash")]
    Root,
}

/// On the wire a manifest is always in chunks; a manifest in pieces is kept only in a
/// download's sidecar, read with [`Manifest::from_stored`].
impl TryFrom<RawManifest> for Manifest {
    type Error = ManifestError;
    fn try_from(raw: RawManifest) -> Result<Self, Self::Error> {
        Self::checked(raw, false)
    }
}

impl From<Manifest> for RawManifest {
    fn from(m: Manifest) -> Self {
        Self {
            size: m.size,
            chunk_size: m.chunk_size,
            chunks: m.chunks,
            blake3: m.blake3,
        }
    }
}

impl Manifest {
    /// `raw`, if it is coherent: in chunks, or (with `pieces`) in pieces.
    fn checked(raw: RawManifest, pieces: bool) -> Result<Self, ManifestError> {
        if raw.size > MAX_FILE_SIZE {
            return Err(ManifestError::TooLarge(raw.size));
        }
        let in_pieces = pieces && piece_size_for(raw.size) == Some(raw.chunk_size);
        if !(in_pieces || raw.chunk_size == chunk_size_for(raw.size))
            || raw.chunks.len() as u64 != raw.size.div_ceil(raw.chunk_size).max(1)
        {
            return Err(ManifestError::Layout);
        }
        if merge_root(&raw.chunks) != raw.blake3 {
            return Err(ManifestError::Root);
        }
        Ok(Self {
            size: raw.size,
            chunk_size: raw.chunk_size,
            chunks: raw.chunks,
            blake3: raw.blake3,
        })
    }

    /// A manifest as a download's sidecar keeps it (postcard): in chunks or in pieces.
    pub fn from_stored(bytes: &[u8]) -> Result<Self, ManifestError> {
        let raw: RawManifest = postcard::from_bytes(bytes).map_err(|_| ManifestError::Layout)?;
        Self::checked(raw, true)
    }

    /// Describes the `size` bytes that `reader` yields, reading them once.
    ///
    /// Fails with `UnexpectedEof` if the reader ends early and `InvalidData` if it has more.
    pub fn from_reader(mut reader: impl Read, size: u64) -> io::Result<Self> {
        if size > MAX_FILE_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                ManifestError::TooLarge(size),
            ));
        }
        let chunk_size = chunk_size_for(size);
        let count = chunk_count_for(size);
        let mut buf = vec![0u8; chunk_size.min(HASH_BUF) as usize];
        let chunks = (0..count)
            .map(|index| hash_unit(size, chunk_size, index, &mut buf, |b| reader.read_exact(b)))
            .collect::<io::Result<Vec<_>>>()?;
        if reader.read(&mut [0u8; 1])? != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "file grew while it was being hashed",
            ));
        }
        Ok(Self::of_chunks(size, chunks))
    }

    /// Describes the first `size` bytes of `file` like [`from_reader`](Self::from_reader), with
    /// positional reads (the file's offset is neither used nor moved), two threads each hashing
    /// half of the chunks. It does not notice a file that grows; callers compare its metadata
    /// before and after.
    pub fn of_file(file: &std::fs::File, size: u64) -> io::Result<Self> {
        let chunks = hash_file(file, size, chunk_size_for(size))?;
        Ok(Self::of_chunks(size, chunks))
    }

    /// Like [`of_file`](Self::of_file), and the manifest in pieces too if the file has pieces
    /// ([`piece_size_for`]), from the same one reading.
    pub fn of_file_with_pieces(
        file: &std::fs::File,
        size: u64,
    ) -> io::Result<(Self, Option<Self>)> {
        let Some(piece) = piece_size_for(size) else {
            return Ok((Self::of_file(file, size)?, None));
        };
        let pieces = hash_file(file, size, piece)?;
        let fine = Self {
            size,
            chunk_size: piece,
            blake3: merge(&pieces, true),
            chunks: pieces,
        };
        Ok((fine.coarse(), Some(fine)))
    }

    fn of_chunks(size: u64, chunks: Vec<Hash32>) -> Self {
        let blake3 = merge_root(&chunks);
        Self {
            size,
            chunk_size: chunk_size_for(size),
            chunks,
            blake3,
        }
    }

    /// This manifest in pieces, built from the pieces' hashes `pieces` (as a peer sent them):
    /// `None` unless the file has pieces, this manifest is in chunks, and every chunk's pieces
    /// merge to its hash.
    pub fn refine(&self, pieces: Vec<Hash32>) -> Option<Self> {
        let piece = piece_size_for(self.size)?;
        if self.chunk_size != chunk_size_for(self.size)
            || pieces.len() as u64 != self.size.div_ceil(piece)
        {
            return None;
        }
        let per = PIECES_PER_CHUNK as usize;
        let fits = pieces
            .chunks(per)
            .zip(&self.chunks)
            .all(|(group, chunk)| merge(group, false) == *chunk);
        fits.then_some(Self {
            size: self.size,
            chunk_size: piece,
            chunks: pieces,
            blake3: self.blake3,
        })
    }

    /// This manifest in chunks (itself, unless it is in pieces).
    pub fn coarse(&self) -> Self {
        if !self.in_pieces() {
            return self.clone();
        }
        let chunks = (self.chunks)
            .chunks(PIECES_PER_CHUNK as usize)
            .map(|group| merge(group, false))
            .collect();
        Self::of_chunks(self.size, chunks)
    }

    /// Whether this manifest is in pieces.
    pub fn in_pieces(&self) -> bool {
        self.chunk_size != chunk_size_for(self.size)
    }

    /// The hashes of its chunks (of its pieces, in pieces), in order.
    pub fn hashes(&self) -> &[Hash32] {
        &self.chunks
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The chunk size in bytes (the piece size, in pieces).
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// How many chunks.
    pub fn chunk_count(&self) -> u32 {
        // Fits: at most MAX_CHUNKS (2^16) chunks, checked on construction.
        self.chunks.len() as u32
    }

    /// The plain BLAKE3 hash of the whole file.
    pub fn blake3(&self) -> Hash32 {
        self.blake3
    }

    /// Byte offset of chunk `index`.
    pub fn chunk_offset(&self, index: u32) -> u64 {
        u64::from(index) * self.chunk_size()
    }

    /// Length of chunk `index` in bytes (the last may be short), or `None` past the end.
    pub fn chunk_len(&self, index: u32) -> Option<u64> {
        (index < self.chunk_count()).then(|| unit_len(self.size, self.chunk_size, u64::from(index)))
    }

    /// A check of chunk `index` (or piece, in pieces) fed its bytes in order, a part at a time;
    /// `None` past the end.
    pub fn check_chunk(&self, index: u32) -> Option<ChunkCheck> {
        let expected = *self.chunks.get(index as usize)?;
        Some(ChunkCheck {
            hasher: ChunkHasher::new(self.chunks.len() as u64, u64::from(index), self.chunk_size),
            expected,
            left: self.chunk_len(index)?,
        })
    }

    /// Whether `data` is exactly chunk `index`.
    pub fn verify_chunk(&self, index: u32, data: &[u8]) -> bool {
        self.check_chunk(index).is_some_and(|mut check| {
            check.update(data);
            check.matches()
        })
    }
}

/// Bytes hashed at a time.
const HASH_BUF: u64 = 256 * 1024;

/// The hashes of the first `size` bytes of `file` in units of `unit` bytes (chunks or pieces),
/// with positional reads, two threads each hashing half of them.
fn hash_file(file: &std::fs::File, size: u64, unit: u64) -> io::Result<Vec<Hash32>> {
    use std::os::unix::fs::FileExt;
    if size > MAX_FILE_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            ManifestError::TooLarge(size),
        ));
    }
    let count = size.div_ceil(unit).max(1);
    let part = |range: std::ops::Range<u64>| {
        let mut buf = vec![0u8; unit.min(HASH_BUF) as usize];
        range
            .map(|index| {
                let mut at = index * unit;
                hash_unit(size, unit, index, &mut buf, |b| {
                    file.read_exact_at(b, at)?;
                    at += b.len() as u64;
                    Ok(())
                })
            })
            .collect::<io::Result<Vec<_>>>()
            // Exactly as many as there are: a server keeps a manifest per file (a collected
            // Vec starts at room for four).
            .map(|mut v| {
                v.shrink_to_fit();
                v
            })
    };
    // Below a few MiB a second thread costs more than it saves (a folder's notes: most files).
    if size < 4 << 20 {
        return part(0..count);
    }
    let half = count / 2;
    let (first, second) = std::thread::scope(|s| {
        let second = s.spawn(|| part(half..count));
        (part(0..half), second.join())
    });
    let mut hashes = first?;
    hashes.extend(second.map_err(|_| io::Error::other("a hashing thread failed"))??);
    Ok(hashes)
}

/// The manifest entry of unit `index` (chunk or piece, of `unit` bytes) of a file of `size`
/// bytes, its bytes read by `read` into `buf` (at most `buf`'s length at a time, in order).
fn hash_unit(
    size: u64,
    unit: u64,
    index: u64,
    buf: &mut [u8],
    mut read: impl FnMut(&mut [u8]) -> io::Result<()>,
) -> io::Result<Hash32> {
    let mut hasher = ChunkHasher::new(size.div_ceil(unit).max(1), index, unit);
    let mut left = unit_len(size, unit, index);
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        read(&mut buf[..n])?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hasher.finalize())
}

/// The length of unit `index` of `unit` bytes in a file of `size` bytes (the last may be short).
fn unit_len(size: u64, unit: u64, index: u64) -> u64 {
    size.saturating_sub(index * unit).min(unit)
}

/// A check of one chunk against its manifest entry, fed a part at a time
/// ([`Manifest::check_chunk`]).
pub struct ChunkCheck {
    hasher: ChunkHasher,
    expected: Hash32,
    /// Bytes still to come.
    left: u64,
}

impl ChunkCheck {
    /// The next bytes of the chunk.
    pub fn update(&mut self, data: &[u8]) {
        self.left = self.left.wrapping_sub(data.len() as u64);
        self.hasher.update(data);
    }

    /// Whether the bytes fed were exactly the chunk.
    pub fn matches(&self) -> bool {
        self.left == 0 && self.hasher.finalize() == self.expected
    }
}

/// Hashes one chunk the way its manifest entry is made: a subtree chaining value at the chunk's
/// offset, or the root hash when the file has a single chunk.
struct ChunkHasher {
    hasher: blake3::Hasher,
    single: bool,
}

impl ChunkHasher {
    fn new(count: u64, index: u64, chunk_size: u64) -> Self {
        let mut hasher = blake3::Hasher::new();
        if count > 1 {
            hasher.set_input_offset(index * chunk_size);
        }
        Self {
            hasher,
            single: count == 1,
        }
    }

    fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    fn finalize(&self) -> Hash32 {
        if self.single {
            *self.hasher.finalize().as_bytes()
        } else {
            self.hasher.finalize_non_root()
        }
    }
}

/// Merges chunk hashes (as made by [`ChunkHasher`]) into the file's BLAKE3 hash.
///
/// BLAKE3's tree is left-balanced: the left subtree holds the largest power-of-two number of
/// 1 KiB leaves that is less than the total. With power-of-two chunks that split falls on a chunk
/// boundary, at the largest power of two of *chunks* below their count, so we recurse on that.
fn merge_root(chunks: &[Hash32]) -> Hash32 {
    if chunks.is_empty() {
        return *blake3::hash(b"").as_bytes();
    }
    merge(chunks, true)
}

/// Merges the chaining values of consecutive subtrees of power-of-two size (all but the last
/// full) into their parent's: the root hash with `root`, else a chaining value. A chunk's
/// pieces merge to the chunk's hash this way, as the chunks merge to the file's.
fn merge(cvs: &[ChainingValue], root: bool) -> Hash32 {
    if cvs.len() == 1 {
        return cvs[0];
    }
    // The largest power of two strictly below the count (count >= 2 here).
    let split = 1usize << (usize::BITS - 1 - (cvs.len() - 1).leading_zeros());
    let left = merge(&cvs[..split], false);
    let right = merge(&cvs[split..], false);
    if root {
        *merge_subtrees_root(&left, &right, Mode::Hash).as_bytes()
    } else {
        merge_subtrees_non_root(&left, &right, Mode::Hash)
    }
}

/// How a set of one file's units (chunks or pieces) is counted in another unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Regrain {
    /// In the same unit.
    Same,
    /// Pieces as chunks, this many: a chunk is held once all its pieces are.
    Coarser(u32),
    /// Chunks as pieces, this many: each piece of a held chunk is held.
    Finer(u32),
}

impl Regrain {
    /// From the units of `manifest` (chunks, or pieces) to chunks, or (`in_pieces`) to pieces
    /// where the file has them.
    pub fn new(manifest: &Manifest, in_pieces: bool) -> Self {
        Self::between(manifest.size(), manifest.in_pieces(), in_pieces)
    }

    /// From a file of `size` bytes in chunks or (`from_pieces`) pieces, to chunks or
    /// (`to_pieces`) pieces where the file has them.
    pub fn between(size: u64, from_pieces: bool, to_pieces: bool) -> Self {
        if piece_size_for(size).is_none() {
            return Self::Same;
        }
        match (from_pieces, to_pieces) {
            (true, false) => Self::Coarser(unit_count(size, false)),
            (false, true) => Self::Finer(unit_count(size, true)),
            _ => Self::Same,
        }
    }

    /// `held` in the other unit.
    pub fn apply(&self, held: &ChunkSet) -> ChunkSet {
        match *self {
            Self::Same => held.clone(),
            Self::Coarser(len) => held.coarser(PIECES_PER_CHUNK, len),
            Self::Finer(len) => held.finer(PIECES_PER_CHUNK, len),
        }
    }
}

/// A set of a file's chunks (which ones a peer holds), as bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSet {
    words: Vec<u64>,
    len: u32,
}

impl ChunkSet {
    /// Every one of `len` chunks.
    pub fn all(len: u32) -> Self {
        let mut words = vec![u64::MAX; (len as usize).div_ceil(64)];
        if let Some(last) = words.last_mut()
            && !len.is_multiple_of(64)
        {
            *last = (1 << (len % 64)) - 1;
        }
        Self { words, len }
    }

    /// None of `len` chunks.
    pub fn none(len: u32) -> Self {
        Self {
            words: vec![0; (len as usize).div_ceil(64)],
            len,
        }
    }

    /// How many chunks the set is of.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether it is a set of no chunks at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds chunk `i` (ignored if out of range).
    pub fn insert(&mut self, i: u32) {
        if i < self.len {
            self.words[i as usize / 64] |= 1 << (i % 64);
        }
    }

    /// Whether chunk `i` is in the set.
    pub fn contains(&self, i: u32) -> bool {
        i < self.len && self.words[i as usize / 64] & (1 << (i % 64)) != 0
    }

    /// How many chunks are in the set.
    pub fn count(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    /// Whether every chunk is in the set.
    pub fn is_full(&self) -> bool {
        self.count() == self.len
    }

    /// The chunks in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(k, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let bit = w.trailing_zeros();
                    w &= w - 1;
                    k as u32 * 64 + bit
                })
            })
        })
    }

    /// The chunks in exactly one of `self` and `other` (sets of one length), ascending.
    pub fn changed(&self, other: &Self) -> Vec<u32> {
        let mut out = Vec::new();
        for (k, (a, b)) in self.words.iter().zip(&other.words).enumerate() {
            let mut w = a ^ b;
            while w != 0 {
                out.push(k as u32 * 64 + w.trailing_zeros());
                w &= w - 1;
            }
        }
        out
    }

    /// This set in units `factor` times smaller, `len` of them: the parts of every unit in it
    /// (a set of chunks as a set of pieces).
    pub fn finer(&self, factor: u32, len: u32) -> Self {
        let mut out = Self::none(len);
        for i in self.iter() {
            let first = i.saturating_mul(factor);
            (first..first.saturating_add(factor).min(len)).for_each(|p| out.insert(p));
        }
        out
    }

    /// This set in units `factor` times larger, `len` of them: those whose every part is in it
    /// (a set of pieces as a set of chunks).
    pub fn coarser(&self, factor: u32, len: u32) -> Self {
        let mut out = Self::none(len);
        for unit in 0..len {
            let first = unit.saturating_mul(factor);
            let parts = first..first.saturating_add(factor).min(self.len);
            if !parts.is_empty() && parts.clone().all(|p| self.contains(p)) {
                out.insert(unit);
            }
        }
        out
    }

    /// Bit `i % 8` of byte `i / 8` for chunk `i`: how sets travel and sit on disk.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate((self.len as usize).div_ceil(8));
        out
    }

    /// A set of `len` chunks from [`to_bytes`](Self::to_bytes)'s form; `None` unless `bytes` is
    /// exactly that long and marks no chunk past `len`.
    pub fn from_bytes(len: u32, bytes: &[u8]) -> Option<Self> {
        if bytes.len() != (len as usize).div_ceil(8) {
            return None;
        }
        let mut words = vec![0u64; (len as usize).div_ceil(64)];
        for (k, b) in bytes.iter().enumerate() {
            words[k / 8] |= u64::from(*b) << (8 * (k % 8));
        }
        let set = Self { words, len };
        (set.count() as usize == set.iter().take_while(|&i| i < len).count()).then_some(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Sizes at every boundary that matters: empty, one byte, around 1 KiB, around a chunk, around
    /// the chunk-size switch points, and several MiB.
    const SIZES: &[usize] = &[
        0,
        1,
        1023,
        1024,
        1025,
        2048,
        4095,
        16 * 1024 - 1,
        16 * 1024,
        16 * 1024 + 1,
        17 * 1024,
        100_000,
        1 << 20,
        (1 << 20) + 1,
        16 << 20,
        (16 << 20) + 1,
        (5 << 20) + 12345,
    ];

    #[test]
    fn file_hash_is_plain_blake3_at_every_boundary() {
        for &len in SIZES {
            let d = data(len);
            let m = Manifest::from_reader(&d[..], len as u64).unwrap();
            assert_eq!(m.blake3(), *blake3::hash(&d).as_bytes(), "size {len}");
            for i in 0..m.chunk_count() {
                let off = m.chunk_offset(i) as usize;
                let l = m.chunk_len(i).unwrap() as usize;
                assert!(m.verify_chunk(i, &d[off..off + l]), "size {len} chunk {i}");
            }
            let total: u64 = (0..m.chunk_count()).map(|i| m.chunk_len(i).unwrap()).sum();
            assert_eq!(total, len as u64);
        }
    }

    fn temp_file(d: &[u8]) -> std::fs::File {
        use std::io::{Seek, Write};
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(d).unwrap();
        f.rewind().unwrap();
        f
    }

    #[test]
    fn pieces_merge_to_their_chunks_and_refine_only_with_the_right_hashes() {
        let sizes = [
            (5 << 20) + 12345,
            4 << 20,
            (1 << 20) + 1,
            100_000,
            16 * 1024,
        ];
        for len in sizes {
            let d = data(len);
            let (coarse, fine) = Manifest::of_file_with_pieces(&temp_file(&d), len as u64).unwrap();
            assert_eq!(coarse, Manifest::from_reader(&d[..], len as u64).unwrap());
            let Some(fine) = fine else {
                assert_eq!(piece_size_for(len as u64), None, "size {len}");
                continue;
            };
            assert!(fine.in_pieces() && !coarse.in_pieces());
            assert_eq!(
                fine.chunk_size() * u64::from(PIECES_PER_CHUNK),
                coarse.chunk_size()
            );
            assert_eq!(fine.blake3(), *blake3::hash(&d).as_bytes());
            assert_eq!(fine.coarse(), coarse, "size {len}");
            for i in 0..fine.chunk_count() {
                let off = fine.chunk_offset(i) as usize;
                let l = fine.chunk_len(i).unwrap() as usize;
                assert!(
                    fine.verify_chunk(i, &d[off..off + l]),
                    "size {len} piece {i}"
                );
                assert!(!fine.verify_chunk(i, &d[off..off + l - 1]));
            }
            assert_eq!(coarse.refine(fine.hashes().to_vec()), Some(fine.clone()));
            // A piece's hash changed, two swapped, one missing: refused.
            let mut lying = fine.hashes().to_vec();
            lying[1][0] ^= 1;
            assert_eq!(coarse.refine(lying), None, "size {len}");
            let mut swapped = fine.hashes().to_vec();
            swapped.swap(0, 1);
            assert_eq!(coarse.refine(swapped), None);
            let short = fine.hashes()[1..].to_vec();
            assert_eq!(coarse.refine(short), None);
            assert_eq!(fine.refine(fine.hashes().to_vec()), None);
            // Pieces are kept in a sidecar, never taken from the wire as a manifest.
            let bytes = postcard::to_stdvec(&fine).unwrap();
            assert_eq!(Manifest::from_stored(&bytes), Ok(fine.clone()));
            assert!(postcard::from_bytes::<Manifest>(&bytes).is_err());
        }
        assert_eq!(piece_size_for(256 << 20), Some(256 << 10));
        assert_eq!(piece_size_for(MAX_FILE_SIZE), None);
    }

    #[test]
    fn chunk_sets_change_grain_both_ways() {
        let mut chunks = ChunkSet::none(5);
        chunks.insert(1);
        chunks.insert(4);
        let pieces = chunks.finer(4, 18);
        let want: Vec<u32> = vec![4, 5, 6, 7, 16, 17];
        assert_eq!(pieces.iter().collect::<Vec<_>>(), want);
        assert_eq!(pieces.coarser(4, 5), chunks);
        let mut some = pieces.clone();
        some.insert(8);
        some.insert(9);
        some.insert(10);
        assert_eq!(
            some.coarser(4, 5),
            chunks,
            "a chunk lacking one piece is not held"
        );
        some.insert(11);
        assert_eq!(some.coarser(4, 5).iter().collect::<Vec<_>>(), vec![1, 2, 4]);
    }

    #[test]
    fn chunk_sets_travel_as_bytes_and_refuse_bits_past_their_end() {
        for len in [0u32, 1, 7, 8, 9, 63, 64, 65, 1000] {
            let mut set = ChunkSet::none(len);
            for i in (0..len).step_by(3) {
                set.insert(i);
            }
            let bytes = set.to_bytes();
            assert_eq!(bytes.len(), (len as usize).div_ceil(8));
            assert_eq!(
                ChunkSet::from_bytes(len, &bytes),
                Some(set.clone()),
                "{len}"
            );
            assert_eq!(
                set.iter().collect::<Vec<_>>(),
                (0..len).step_by(3).collect::<Vec<_>>()
            );
            assert_eq!(set.count(), len.div_ceil(3));
            assert!(ChunkSet::all(len).is_full());
            assert_eq!(
                ChunkSet::none(len).changed(&set),
                set.iter().collect::<Vec<_>>()
            );
        }
        assert_eq!(ChunkSet::from_bytes(9, &[0xff]), None, "too short");
        assert_eq!(
            ChunkSet::from_bytes(9, &[0xff, 0x02]),
            None,
            "a bit past the end"
        );
    }

    #[test]
    fn a_file_hashed_on_two_threads_has_the_same_manifest() {
        for &len in SIZES {
            let d = data(len);
            let mut file = tempfile::tempfile().unwrap();
            io::Write::write_all(&mut file, &d).unwrap();
            let m = Manifest::of_file(&file, len as u64).unwrap();
            assert_eq!(
                m,
                Manifest::from_reader(&d[..], len as u64).unwrap(),
                "{len}"
            );
        }
        let short = tempfile::tempfile().unwrap();
        assert!(Manifest::of_file(&short, 10).is_err());
    }

    #[test]
    fn chunk_sizes_are_powers_of_two_and_bounded() {
        for size in [
            0u64,
            1,
            4096,
            16 << 10,
            1 << 30,
            64 << 30,
            1 << 40,
            MAX_FILE_SIZE,
        ] {
            let cs = chunk_size_for(size);
            assert!(cs.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs));
            assert!(chunk_count_for(size) <= MAX_CHUNKS, "{size}");
        }
        assert_eq!(chunk_size_for(4096), 1024);
        assert_eq!(chunk_size_for(1 << 30), 1 << 20);
        assert_eq!(chunk_count_for(0), 1);
    }

    #[test]
    fn wrong_chunks_are_refused() {
        let d = data(50_000);
        let m = Manifest::from_reader(&d[..], d.len() as u64).unwrap();
        let cs = m.chunk_size() as usize;
        let mut bad = d[..cs].to_vec();
        bad[10] ^= 1;
        assert!(!m.verify_chunk(0, &bad));
        assert!(!m.verify_chunk(0, &d[..cs - 1]), "short chunk");
        assert!(!m.verify_chunk(1, &d[..cs]), "right bytes, wrong place");
        assert!(!m.verify_chunk(m.chunk_count(), &[]), "past the end");
    }

    #[test]
    fn decoding_checks_consistency() {
        let d = data(40_000);
        let m = Manifest::from_reader(&d[..], d.len() as u64).unwrap();
        let bytes = postcard::to_stdvec(&m).unwrap();
        assert_eq!(postcard::from_bytes::<Manifest>(&bytes).unwrap(), m);

        let mut raw = RawManifest::from(m.clone());
        raw.chunks[3][0] ^= 1;
        assert_eq!(Manifest::try_from(raw).unwrap_err(), ManifestError::Root);
        // A size that keeps the layout decodes, but then no chunk data fits the last hash.
        let mut raw = RawManifest::from(m.clone());
        raw.size += 1;
        let lying = Manifest::try_from(raw).unwrap();
        let last = m.chunk_count() - 1;
        let off = m.chunk_offset(last) as usize;
        assert!(!lying.verify_chunk(last, &d[off..]));
        let mut padded = d[off..].to_vec();
        padded.push(0);
        assert!(!lying.verify_chunk(last, &padded));
        let mut raw = RawManifest::from(m.clone());
        raw.size *= 2;
        assert_eq!(Manifest::try_from(raw).unwrap_err(), ManifestError::Layout);
        let mut raw = RawManifest::from(m);
        raw.chunk_size *= 2;
        assert_eq!(Manifest::try_from(raw).unwrap_err(), ManifestError::Layout);
    }

    #[test]
    fn reader_must_match_the_size() {
        let d = data(3000);
        assert_eq!(
            Manifest::from_reader(&d[..], 3001).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(
            Manifest::from_reader(&d[..], 2999).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn names_are_single_safe_components() {
        for ok in [
            "hello_world.txt",
            "a",
            "lorem ipsum.txt",
            "ünïcode.txt",
            "a..b",
            &"x".repeat(255),
        ] {
            assert!(FileName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "../etc/passwd",
            "a/b",
            "a\\b",
            "/abs",
            "nul\0",
            "tab\t",
            "new\nline",
            "esc\u{1b}",
            &"x".repeat(256),
        ] {
            assert!(FileName::new(bad).is_err(), "{bad:?}");
        }
        // The same rules apply when a name arrives on the wire.
        let wire = postcard::to_stdvec(&"../x".to_string()).unwrap();
        assert!(postcard::from_bytes::<FileName>(&wire).is_err());
    }
}
