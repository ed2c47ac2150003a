//! `download --update`: fills a new version's temporary file from our old copy wherever the bytes
//! match, and from the peers (byte ranges) where they don't, before the download engine runs.
//!
//! The plan comes from `delta`: the new version's group signatures from one peer, the leaf
//! signatures of the groups our copy lacks, our own copy's tree computed here. Nothing is trusted:
//! afterwards every chunk of the temporary file is verified against the manifest, and the engine
//! fetches whole whatever does not verify (a signature collision, a lying peer, a failed range).
//! A peer that does not speak the delta requests (an older qnode) only means no reuse.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;

use bytes::Bytes;

use crate::model::delta::{Expanded, Index, Sig, SigKind, Step, Tree};
use crate::model::manifest::{Hash32, Manifest};
use crate::store::PartialFile;
use crate::transfer::download::ChunkSource;
use crate::wire::protocol::MAX_GROUPS_PER_REQUEST;

/// A peer that tells a version's tree and serves byte ranges of it, for an update (the peer as a
/// source in `net::client` is one).
pub trait RangeSource: ChunkSource {
    /// Why a request failed.
    type Error: std::fmt::Display + Send;

    /// How the peer signs trees (as the protocol version it speaks says).
    fn sig_kind(&self) -> SigKind;

    /// The group signatures of `version`.
    fn groups(&self, version: Hash32)
    -> impl Future<Output = Result<Vec<Sig>, Self::Error>> + Send;

    /// The leaf signatures of groups `first..first + count` of `version`.
    fn leaves(
        &self,
        version: Hash32,
        first: u32,
        count: u32,
    ) -> impl Future<Output = Result<Vec<Sig>, Self::Error>> + Send;

    /// `len` bytes at `offset` (at most one chunk), unverified.
    fn read_range(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, Self::Error>> + Send;
}

/// Range requests in flight at once, over all peers.
const RANGES_IN_FLIGHT: usize = 32;
/// `Leaves` requests in flight at once to the peer that gave the tree.
const LEAVES_IN_FLIGHT: usize = 8;

/// What filling from the old copy did.
#[derive(Debug, Default)]
pub struct Filled {
    /// Bytes copied from our old copy.
    pub reused: u64,
    /// Bytes fetched as ranges, per peer name.
    pub fetched: HashMap<String, u64>,
    /// Which chunks of the temporary file now verify.
    pub have: Vec<bool>,
    /// Peers whose signatures could not be a real tree's (they add up to nothing usable), and
    /// why: left out of the update's ranges.
    pub liars: Vec<(String, String)>,
}

/// Fills `partial` (whose chunks `have` already verify) for `manifest` from the old copy at
/// `old` and from `sources`.
/// `old_tree` is our copy's tree; `groups`, the new version's group signatures if the first
/// source already gave them.
pub async fn fill<S: RangeSource>(
    old: &Path,
    (old_tree, groups): (Tree, Option<Vec<Sig>>),
    manifest: &Arc<Manifest>,
    partial: &Arc<PartialFile>,
    have: Vec<bool>,
    sources: &[Arc<S>],
) -> anyhow::Result<Filled> {
    let mut filled = Filled {
        have,
        ..Filled::default()
    };
    let Some(steps) = plan(&old_tree, groups, manifest, sources, &mut filled.liars).await else {
        return Ok(filled);
    };
    let honest: Vec<Arc<S>> = sources
        .iter()
        .filter(|s| !filled.liars.iter().any(|(n, _)| n == s.name()))
        .cloned()
        .collect();
    let sources = &honest[..];
    // Steps are cut at chunk boundaries; those inside chunks that already verify (an
    // interrupted update resumed) are done.
    let chunk = manifest.chunk_size();
    let needed = |at: u64| {
        !filled
            .have
            .get((at / chunk) as usize)
            .copied()
            .unwrap_or(false)
    };
    let mut copies = Vec::new();
    let mut fetches = Vec::new();
    for step in steps {
        let (to, len, from) = match step {
            Step::Copy { from, to, len } => (to, len, Some(from)),
            Step::Fetch { at, len } => (at, len, None),
        };
        let mut off = to;
        while off < to + len {
            let end = (to + len).min((off / chunk + 1) * chunk);
            if needed(off) {
                match from {
                    Some(f) => copies.push((f + (off - to), off, end - off)),
                    None => fetches.push((off, end - off)),
                }
            }
            off = end;
        }
    }
    // Copying from our copy and fetching from the peers, side by side.
    let (old_path, p) = (old.to_owned(), partial.clone());
    let copied = tokio::task::spawn_blocking(move || p.copy_from(&old_path, &copies));
    let (copied, fetched) = tokio::join!(copied, fetch(partial, &fetches, sources));
    filled.reused = copied??;
    filled.fetched = fetched;
    let (p, m) = (partial.clone(), manifest.clone());
    filled.have = tokio::task::spawn_blocking(move || p.check_chunks(&m)).await??;
    Ok(filled)
}

/// The steps that build `manifest`'s version from the old copy, or `None` if no peer tells us
/// the new version's tree. A peer whose signatures no real tree could have (they do not add up
/// to the file, or are shorter than any leaf) is put in `liars` and the next one is asked.
async fn plan<S: RangeSource>(
    old_tree: &Tree,
    groups: Option<Vec<Sig>>,
    manifest: &Manifest,
    sources: &[Arc<S>],
    liars: &mut Vec<(String, String)>,
) -> Option<Vec<Step>> {
    let version = manifest.blake3();
    let index = Index::of(old_tree);
    let mut given = groups.and_then(|g| Some((sources.first()?, g)));
    // Only a peer that signs as our tree is signed can be compared with it.
    let mut alike = sources
        .iter()
        .skip(1)
        .filter(|s| s.sig_kind() == old_tree.kind);
    loop {
        let (source, groups) = match given.take() {
            Some(found) => found,
            None => {
                let s = alike.next()?;
                match s.groups(version).await {
                    Ok(g) => (s, g),
                    Err(e) => {
                        tracing::info!(source = s.name(), "no tree for the update: {e}");
                        continue;
                    }
                }
            }
        };
        if !crate::model::delta::plausible(&groups, manifest.size()) {
            let why = "its delta signatures could not be the file's (not used)";
            tracing::warn!(source = source.name(), "{why}");
            liars.push((source.name().to_owned(), why.into()));
            continue;
        }
        let Some(mut leaves) = expand(&**source, version, &groups, &index).await else {
            let why = "its leaf signatures did not add up to its groups (not used)";
            tracing::warn!(source = source.name(), "{why}");
            liars.push((source.name().to_owned(), why.into()));
            continue;
        };
        return Some(crate::model::delta::plan(&groups, &mut leaves, &index));
    }
}

/// The leaf signatures of the groups our copy lacks (none for a group where asking failed: it is
/// fetched whole), asked in runs of up to [`MAX_GROUPS_PER_REQUEST`], a few runs at a time.
/// `None` if an answer does not add up to its groups (the peer lies).
async fn expand<S: RangeSource>(
    source: &S,
    version: Hash32,
    groups: &[Sig],
    index: &Index,
) -> Option<Expanded> {
    // Runs of consecutive lacking groups, each one request.
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for i in (0..groups.len() as u32).filter(|&i| !index.holds_group(&groups[i as usize])) {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == i && *n < MAX_GROUPS_PER_REQUEST => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    let mut answers = futures_util::stream::iter(runs)
        .map(|(first, n)| async move { (first, n, source.leaves(version, first, n).await) })
        .buffer_unordered(LEAVES_IN_FLIGHT);
    let mut out = Expanded::default();
    while let Some((first, n, answer)) = answers.next().await {
        // A failed request: those groups are fetched whole.
        let Ok(leaves) = answer else { continue };
        let indices: Vec<u32> = (first..first + n).collect();
        if !out.add(groups, &indices, leaves) {
            return None;
        }
    }
    Some(out)
}

/// Fetches `(at, len)` ranges of the new version (none crossing a chunk boundary) into
/// `partial`, spread over `sources`. A failed piece is left to the engine (its chunk will
/// not verify). Returns the bytes fetched per peer.
async fn fetch<S: RangeSource>(
    partial: &Arc<PartialFile>,
    ranges: &[(u64, u64)],
    sources: &[Arc<S>],
) -> HashMap<String, u64> {
    let mut fetched: HashMap<String, u64> = HashMap::new();
    if sources.is_empty() {
        return fetched;
    }
    let mut results = futures_util::stream::iter(ranges.iter().copied().enumerate())
        .map(|(k, (off, len))| {
            let source = sources[k % sources.len()].clone();
            async move {
                // At most one chunk (`fill` cuts at chunk boundaries), so it fits a u32.
                let got = source.read_range(off, len as u32).await;
                (source, off, got)
            }
        })
        .buffer_unordered(RANGES_IN_FLIGHT);
    while let Some((source, off, got)) = results.next().await {
        let Ok(bytes) = got else { continue };
        let p = partial.clone();
        let n = bytes.len() as u64;
        let written = tokio::task::spawn_blocking(move || p.write_at(off, &bytes)).await;
        if matches!(written, Ok(Ok(()))) {
            *fetched.entry(source.name().to_owned()).or_default() += n;
        }
    }
    fetched
}
