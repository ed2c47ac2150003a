//! Moving only what changed: a content-defined tree of a file's bytes, and the plan that builds a
//! new version from an old copy plus fetched ranges.
//!
//! Leaves are FastCDC chunks (about 2 KiB: their boundaries follow the content, so an insertion
//! disturbs one or two); a group ends after a leaf whose hash has its low [`GROUP_BITS`] bits zero
//! (about 32 leaves), so group boundaries follow the content too. Each leaf and group has a
//! [`Sig`]: 8 bytes of hash and its length, hashed as the connection's protocol version says
//! ([`SigKind`]). A peer that wants version V asks for V's group signatures (about 11 bytes per
//! 64 KiB), expands only the groups its old copy lacks into leaf signatures, and fetches only the
//! leaves it lacks as byte ranges. A signature match is only a hint: every chunk of the result is
//! still verified against V's manifest, and a chunk that fails (a collision, a lying peer) is
//! fetched whole like any other.

use std::collections::HashMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

/// Smallest, average and largest leaf, in bytes.
pub const LEAF_SIZES: (u32, u32, u32) = (512, 2048, 8192);
/// A group ends after a leaf whose hash has this many low bits zero: 32 leaves on average.
pub const GROUP_BITS: u32 = 5;
/// Most leaves in one group (so a group's leaf list is small and its length fits a u32).
pub const MAX_GROUP_LEAVES: usize = 1024;

/// How leaf and group signatures are hashed; both ends of a connection use the kind of the
/// protocol version they agreed on (`protocol::Version`).
///
/// BLAKE3 is slow on 2 KiB inputs (about 0.9 GB/s here: its SIMD lanes need many 1 KiB chunks at
/// once), which made hashing the leaves 70% of a tree's cost; XXH3 is about 15× faster there. A
/// signature only proposes which old bytes to reuse, and every chunk built from them is verified
/// against the manifest, so a hash without collision resistance costs a peer that forges
/// collisions nothing but its own bandwidth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SigKind {
    /// The first 8 bytes of BLAKE3 (`qnode/1`).
    Blake3,
    /// XXH3-64, little-endian (`qnode/2`).
    #[default]
    Xxh3,
}

impl SigKind {
    /// The 8-byte signature hash of `bytes`.
    pub fn hash(self, bytes: &[u8]) -> [u8; 8] {
        match self {
            Self::Blake3 => {
                let mut out = [0; 8];
                out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..8]);
                out
            }
            Self::Xxh3 => xxhash_rust::xxh3::xxh3_64(bytes).to_le_bytes(),
        }
    }
}

/// Bytes read at a time while cutting a file into leaves.
const CUT_BUF: usize = 4 << 20;

/// A leaf's or a group's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sig {
    /// The [`SigKind`] hash of its bytes (a leaf) or of its leaves' signatures and lengths (a
    /// group).
    pub hash: [u8; 8],
    /// Its length in bytes.
    pub len: u32,
}

/// A file's tree: its leaves in order, and its groups as runs of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    /// Every leaf, in file order.
    pub leaves: Vec<Sig>,
    /// Every group, in file order, with the index of its first leaf and its leaf count.
    pub groups: Vec<(Sig, u32, u32)>,
    /// How its signatures are hashed.
    pub kind: SigKind,
}

/// Reads a file from its own position, so two readers of one descriptor do not share an offset.
struct FileCursor<'a> {
    file: &'a std::fs::File,
    pos: u64,
}

impl Read for FileCursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Tree {
    /// The tree of `file` and its BLAKE3, computed side by side on two threads (each reads the
    /// file itself: page-cache reads are cheap next to chunking and hashing).
    pub fn of_file(file: &std::fs::File, kind: SigKind) -> std::io::Result<(Self, [u8; 32])> {
        std::thread::scope(|s| {
            let hash = s.spawn(|| {
                let mut h = blake3::Hasher::new();
                h.update_reader(std::io::BufReader::with_capacity(
                    1 << 20,
                    FileCursor { file, pos: 0 },
                ))?;
                Ok::<_, std::io::Error>(*h.finalize().as_bytes())
            });
            let tree = Self::of(FileCursor { file, pos: 0 }, kind);
            let hash = hash
                .join()
                .map_err(|_| std::io::Error::other("the hashing thread failed"))??;
            Ok((tree?, hash))
        })
    }

    /// The tree of everything `reader` yields.
    ///
    /// Cut from a buffer of [`CUT_BUF`] bytes at a time: a leaf is final once the buffer holds
    /// the largest leaf's worth of bytes from its start (FastCDC looks no further), and the rest
    /// is carried into the next read. (fastcdc's `StreamCDC` does the same but copies every leaf
    /// into a new `Vec`, a quarter of the time of a tree.)
    pub fn of(mut reader: impl Read, kind: SigKind) -> std::io::Result<Self> {
        let (min, avg, max) = LEAF_SIZES;
        let mut tree = Self {
            kind,
            ..Self::default()
        };
        let mut buf = vec![0u8; CUT_BUF];
        let (mut filled, mut eof, mut first) = (0usize, false, 0usize);
        loop {
            while !eof && filled < buf.len() {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => eof = true,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let mut used = 0;
            for c in fastcdc::v2020::FastCDC::new(&buf[..filled], min, avg, max) {
                if !eof && c.offset + max as usize > filled {
                    break;
                }
                let hash = kind.hash(&buf[c.offset..c.offset + c.length]);
                tree.leaves.push(Sig {
                    hash,
                    len: c.length as u32,
                });
                let ends = u64::from_le_bytes(hash).trailing_zeros() >= GROUP_BITS;
                if ends || tree.leaves.len() - first >= MAX_GROUP_LEAVES {
                    tree.close_group(first);
                    first = tree.leaves.len();
                }
                used = c.offset + c.length;
            }
            if eof {
                break;
            }
            buf.copy_within(used..filled, 0);
            filled -= used;
        }
        if first < tree.leaves.len() {
            tree.close_group(first);
        }
        Ok(tree)
    }

    fn close_group(&mut self, first: usize) {
        let leaves = &self.leaves[first..];
        let mut sigs = Vec::with_capacity(leaves.len() * 12);
        let mut len = 0u32;
        for l in leaves {
            sigs.extend_from_slice(&l.hash);
            sigs.extend_from_slice(&l.len.to_le_bytes());
            len = len.saturating_add(l.len);
        }
        let sig = Sig {
            hash: self.kind.hash(&sigs),
            len,
        };
        self.groups.push((sig, first as u32, leaves.len() as u32));
    }

    /// How many groups the tree has.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// The group signatures, in order.
    pub fn group_sigs(&self) -> Vec<Sig> {
        self.groups.iter().map(|g| g.0).collect()
    }

    /// The offset of every leaf, in order.
    pub fn leaf_offsets(&self) -> Vec<u64> {
        let mut at = 0u64;
        self.leaves
            .iter()
            .map(|l| {
                let here = at;
                at += u64::from(l.len);
                here
            })
            .collect()
    }

    /// The leaf signatures of groups `first..first + count` (fewer past the end).
    pub fn leaves_of(&self, first: usize, count: usize) -> Vec<Sig> {
        let groups = self.groups.get(first..).unwrap_or_default();
        groups
            .iter()
            .take(count)
            .flat_map(|&(_, f, n)| &self.leaves[f as usize..(f + n) as usize])
            .copied()
            .collect()
    }
}

/// Where the pieces of an old copy are, by signature.
#[derive(Debug, Default)]
pub struct Index {
    groups: HashMap<Sig, u64>,
    leaves: HashMap<Sig, u64>,
}

impl Index {
    /// The offsets of `old`'s groups and leaves.
    pub fn of(old: &Tree) -> Self {
        let mut index = Self::default();
        let mut offset = 0u64;
        let mut starts = Vec::with_capacity(old.leaves.len());
        for l in &old.leaves {
            starts.push(offset);
            index.leaves.entry(*l).or_insert(offset);
            offset += u64::from(l.len);
        }
        for &(sig, first, _) in &old.groups {
            if let Some(&at) = starts.get(first as usize) {
                index.groups.entry(sig).or_insert(at);
            }
        }
        index
    }
}

impl Index {
    /// Whether the old copy holds a group with signature `g`.
    pub fn holds_group(&self, g: &Sig) -> bool {
        self.groups.contains_key(g)
    }

    /// Whether the old copy holds a leaf with signature `l`.
    pub fn holds_leaf(&self, l: &Sig) -> bool {
        self.leaves.contains_key(l)
    }
}

/// One step of building the new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Copy `len` bytes of the old copy at `from` to the new file at `to`.
    Copy {
        /// Offset in the old copy.
        from: u64,
        /// Offset in the new file.
        to: u64,
        /// Bytes.
        len: u64,
    },
    /// Fetch `len` bytes of the new version at `at` from a peer.
    Fetch {
        /// Offset in the new file.
        at: u64,
        /// Bytes.
        len: u64,
    },
}

/// Whether `sigs` (a version's group signatures, in order) could be a real tree's of a file of
/// `size` bytes: they add up to it, none is empty or longer than a group can be, and every one but
/// the last is at least the smallest leaf (FastCDC cuts no shorter until the end). So a peer's
/// groups number at most `size / 512 + 1`, whatever it sends.
pub fn plausible(sigs: &[Sig], size: u64) -> bool {
    let max = (MAX_GROUP_LEAVES as u64) * u64::from(LEAF_SIZES.2);
    let last = sigs.len().saturating_sub(1);
    let sane = sigs.iter().enumerate().all(|(i, g)| {
        let len = u64::from(g.len);
        len > 0 && len <= max && (i == last || len >= u64::from(LEAF_SIZES.0))
    });
    sane && sigs.iter().map(|g| u64::from(g.len)).sum::<u64>() == size
}

/// The leaf signatures of some of a version's groups, kept as one list with a span per group (no
/// allocation per group, nothing sized by all the groups), so expanding costs what was answered.
#[derive(Debug, Default, Clone)]
pub struct Expanded {
    leaves: Vec<Sig>,
    /// (group, first leaf, leaf count), sorted by group for [`Expanded::of`].
    spans: Vec<(u32, u32, u32)>,
    sorted: bool,
}

impl Expanded {
    /// Adds `leaves`, the answer for groups `indices` (in order) of `groups`. Returns `false`,
    /// adding nothing, unless the leaves add up to those groups, one run each, and each is a leaf
    /// a real tree could have (at most the largest leaf; at least the smallest, except the file's
    /// very last).
    pub fn add(&mut self, groups: &[Sig], indices: &[u32], leaves: Vec<Sig>) -> bool {
        let (min, _, max) = LEAF_SIZES;
        let base = self.leaves.len();
        let Ok(base32) = u32::try_from(base) else {
            return false;
        };
        let mut spans = Vec::with_capacity(indices.len());
        let mut k = 0usize;
        for &i in indices {
            let Some(g) = groups.get(i as usize) else {
                return false;
            };
            let (first, mut len) = (k, 0u64);
            while len < u64::from(g.len) {
                let Some(l) = leaves.get(k) else {
                    return false;
                };
                let ends_file =
                    i as usize + 1 == groups.len() && len + u64::from(l.len) == u64::from(g.len);
                if l.len == 0 || l.len > max || (l.len < min && !ends_file) {
                    return false;
                }
                len += u64::from(l.len);
                k += 1;
            }
            if len != u64::from(g.len) {
                return false;
            }
            // At most `MAX_GROUP_LEAVES` leaves per group: the counts fit a u32.
            spans.push((i, base32 + first as u32, (k - first) as u32));
        }
        if k != leaves.len() {
            return false;
        }
        let in_order = match (self.spans.last(), spans.first()) {
            (Some(a), Some(b)) => a.0 < b.0,
            _ => true,
        };
        self.sorted = (self.sorted || self.spans.is_empty()) && in_order;
        self.spans.extend(spans);
        if self.leaves.is_empty() {
            self.leaves = leaves;
        } else {
            self.leaves.extend(leaves);
        }
        true
    }

    /// All the leaves added, in the order added.
    pub fn leaves(&self) -> &[Sig] {
        &self.leaves
    }

    /// The leaves of group `i`, if they were added.
    pub fn of(&mut self, i: u32) -> Option<&[Sig]> {
        if !self.sorted {
            self.spans.sort_unstable();
            self.sorted = true;
        }
        let at = self.spans.binary_search_by_key(&i, |s| s.0).ok()?;
        let (_, first, n) = self.spans[at];
        self.leaves.get(first as usize..(first + n) as usize)
    }
}

/// Builds the plan for the new version's groups: groups the old copy holds are copied; for the
/// others, `leaves` gives each group's leaf signatures (none: unknown, fetch the whole group).
/// Adjacent steps of one kind are merged.
pub fn plan(new_groups: &[Sig], leaves: &mut Expanded, old: &Index) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut push = |step: Step| match (steps.last_mut(), step) {
        (
            Some(Step::Copy { from, to, len }),
            Step::Copy {
                from: f,
                to: t,
                len: l,
            },
        ) if *from + *len == f && *to + *len == t => *len += l,
        (Some(Step::Fetch { at, len }), Step::Fetch { at: a, len: l }) if *at + *len == a => {
            *len += l
        }
        _ => steps.push(step),
    };
    let mut at = 0u64;
    for (i, g) in new_groups.iter().enumerate() {
        let glen = u64::from(g.len);
        if let Some(&from) = old.groups.get(g) {
            push(Step::Copy {
                from,
                to: at,
                len: glen,
            });
        } else if let Some(ls) = u32::try_from(i).ok().and_then(|i| leaves.of(i))
            && ls.iter().map(|l| u64::from(l.len)).sum::<u64>() == glen
        {
            let mut to = at;
            for l in ls {
                let len = u64::from(l.len);
                match old.leaves.get(l) {
                    Some(&from) => push(Step::Copy { from, to, len }),
                    None => push(Step::Fetch { at: to, len }),
                }
                to += len;
            }
        } else {
            push(Step::Fetch { at, len: glen });
        }
        at += glen;
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text-like bytes: words from a small vocabulary, lines of varying length.
    fn text(len: usize, seed: u64) -> Vec<u8> {
        let words = [
            "the", "peer", "sends", "a", "chunk", "of", "verified", "text", "over", "quic", "and",
            "every", "byte", "is", "checked", "before", "it", "lands",
        ];
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
            out.push(if x.is_multiple_of(11) { b'\n' } else { b' ' });
        }
        out.truncate(len);
        out
    }

    #[test]
    fn implausible_signatures_are_refused_and_expanding_costs_what_was_answered() {
        let sig = |len| Sig { hash: [0; 8], len };
        // One-byte groups that add up to the file: no real tree has them.
        assert!(!plausible(&vec![sig(1); 4096], 4096));
        assert!(plausible(&[sig(600), sig(700), sig(3)], 1303));
        assert!(!plausible(&[sig(600), sig(3), sig(700)], 1303));
        assert!(!plausible(&[sig(600), sig(700)], 1301));
        let groups = [sig(1024), sig(1024), sig(515)];
        let mut e = Expanded::default();
        // Empty answers, short leaves in the middle and leaves past the groups are refused.
        assert!(!e.add(&groups, &[0], vec![]));
        assert!(!e.add(&groups, &[0], vec![sig(1); 1024]));
        assert!(!e.add(&groups, &[0], vec![sig(512), sig(512), sig(512)]));
        // Answers out of order are found; the file's last leaf may be short.
        assert!(e.add(&groups, &[2], vec![sig(512), sig(3)]));
        assert!(e.add(&groups, &[0, 1], vec![sig(512), sig(512), sig(1024)]));
        assert_eq!(e.of(1), Some(&[sig(1024)][..]));
        assert_eq!(e.of(2).map(<[Sig]>::len), Some(2));
        assert_eq!(e.leaves().len(), 5);
    }

    /// Builds `new` from `old` by the plan, counting fetched bytes.
    fn rebuild(old: &[u8], new: &[u8]) -> (Vec<u8>, u64) {
        let kind = SigKind::default();
        let (ot, nt) = (Tree::of(old, kind).unwrap(), Tree::of(new, kind).unwrap());
        let index = Index::of(&ot);
        let groups = nt.group_sigs();
        let mut leaves = Expanded::default();
        for i in 0..groups.len() {
            if !index.groups.contains_key(&groups[i]) {
                assert!(leaves.add(&groups, &[i as u32], nt.leaves_of(i, 1)));
            }
        }
        assert!(plausible(&groups, new.len() as u64));
        let mut out = vec![0u8; new.len()];
        let mut fetched = 0;
        for step in plan(&groups, &mut leaves, &index) {
            match step {
                Step::Copy { from, to, len } => out[to as usize..(to + len) as usize]
                    .copy_from_slice(&old[from as usize..(from + len) as usize]),
                Step::Fetch { at, len } => {
                    fetched += len;
                    out[at as usize..(at + len) as usize]
                        .copy_from_slice(&new[at as usize..(at + len) as usize]);
                }
            }
        }
        (out, fetched)
    }

    #[test]
    fn an_insertion_in_the_middle_fetches_about_one_leaf() {
        let old = text(4 << 20, 7);
        let mut new = old.clone();
        let mid = new.len() / 2;
        new.splice(mid..mid, b"one new line in the middle\n".iter().copied());
        let (out, fetched) = rebuild(&old, &new);
        assert_eq!(out, new);
        assert!(fetched < 40_000, "fetched {fetched}");
    }

    #[test]
    fn scattered_edits_appends_deletions_and_empty_files_rebuild_exactly() {
        let old = text(2 << 20, 3);
        let mut edited = old.clone();
        for k in 1..20 {
            edited[k * 100_000] ^= 0x20;
        }
        let mut deleted = old.clone();
        deleted.drain(500_000..700_000);
        let mut appended = old.clone();
        appended.extend(text(300_000, 9));
        for new in [edited, deleted, appended, Vec::new(), text(10, 1)] {
            let (out, fetched) = rebuild(&old, &new);
            assert_eq!(out, new);
            assert!(fetched <= new.len() as u64);
        }
        let (out, fetched) = rebuild(&[], &old);
        assert_eq!((out.len(), fetched), (old.len(), old.len() as u64));
    }

    #[test]
    fn a_files_tree_and_hash_side_by_side_are_its_tree_and_blake3() {
        let data = text(300_000, 4);
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &data).unwrap();
        for kind in [SigKind::Blake3, SigKind::Xxh3] {
            let (tree, hash) = Tree::of_file(&file, kind).unwrap();
            assert_eq!(hash, *blake3::hash(&data).as_bytes());
            assert_eq!(tree, Tree::of(&data[..], kind).unwrap());
        }
    }

    #[test]
    fn group_signatures_are_small() {
        let t = Tree::of(&text(8 << 20, 5)[..], SigKind::default()).unwrap();
        let avg_leaf = (8 << 20) / t.leaves.len();
        let avg_group = (8 << 20) / t.groups.len();
        assert!((1024..4096).contains(&avg_leaf), "{avg_leaf}");
        assert!(avg_group > 32 * 1024, "{avg_group}");
        assert_eq!(t.leaves_of(0, t.groups.len()), t.leaves);
    }

    /// A reader that hands out a few odd-sized bytes at a time.
    struct Dribble<'a>(&'a [u8], usize);

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.1 = self.1 % 7919 + 1;
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn cutting_a_stream_block_by_block_finds_the_cuts_of_the_whole() {
        // Over two buffers' worth, read in odd sizes: every leaf is the one FastCDC finds in the
        // whole slice at once.
        let data = text(2 * CUT_BUF + 12_345, 11);
        let (min, avg, max) = LEAF_SIZES;
        let whole: Vec<u32> = fastcdc::v2020::FastCDC::new(&data, min, avg, max)
            .map(|c| c.length as u32)
            .collect();
        let tree = Tree::of(Dribble(&data, 0), SigKind::Xxh3).unwrap();
        let lens: Vec<u32> = tree.leaves.iter().map(|l| l.len).collect();
        assert_eq!(lens, whole);
        assert_eq!(tree, Tree::of(&data[..], SigKind::Xxh3).unwrap());
        assert_eq!(Tree::of(&[][..], SigKind::Xxh3).unwrap().leaves, vec![]);
    }

    /// The signatures are part of the wire: peers compare them. If these change, the protocol
    /// version must change too.
    #[test]
    fn signatures_are_pinned_for_both_kinds() {
        let data = text(100_000, 2);
        let b = Tree::of(&data[..], SigKind::Blake3).unwrap();
        let x = Tree::of(&data[..], SigKind::Xxh3).unwrap();
        let leaf = &data[..b.leaves[0].len as usize];
        assert_eq!(b.leaves[0].hash, blake3::hash(leaf).as_bytes()[..8]);
        assert_eq!(
            x.leaves[0].hash,
            xxhash_rust::xxh3::xxh3_64(leaf).to_le_bytes()
        );
        // A group's signature hashes its leaves' (hash, little-endian length) pairs.
        let (g, first, n) = x.groups[0];
        let mut pairs = Vec::new();
        for l in &x.leaves[first as usize..(first + n) as usize] {
            pairs.extend_from_slice(&l.hash);
            pairs.extend_from_slice(&l.len.to_le_bytes());
        }
        assert_eq!(g.hash, xxhash_rust::xxh3::xxh3_64(&pairs).to_le_bytes());
        assert_eq!(
            (b.leaves.len(), x.leaves.len(), x.leaves[0].len),
            (PINNED.0, PINNED.0, PINNED.1)
        );
        assert_eq!(x.groups[0].0.hash, PINNED.2);
    }

    /// Leaf count, first leaf length, first group hash of `text(100_000, 2)` under XXH3.
    const PINNED: (usize, u32, [u8; 8]) = (39, 2122, [238, 245, 245, 137, 161, 27, 22, 180]);
}
