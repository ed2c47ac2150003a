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
use futures_util::future::join_all;

use crate::client::PeerSource;
use crate::delta::{Index, Sig, Step, Tree};
use crate::download::ChunkSource;
use crate::manifest::Manifest;
use crate::protocol::MAX_GROUPS_PER_REQUEST;
use crate::store::PartialFile;

/// Range requests in flight at once, over all peers.
const RANGES_IN_FLIGHT: usize = 32;

/// What filling from the old copy did.
#[derive(Debug, Default)]
pub struct Filled {
    /// Bytes copied from our old copy.
    pub reused: u64,
    /// Bytes fetched as ranges, per peer name.
    pub fetched: HashMap<String, u64>,
    /// Which chunks of the temporary file now verify.
    pub have: Vec<bool>,
}

/// Fills `partial` (whose chunks `have` already verify) for `manifest` from the old copy at
/// `old` and from `sources`.
/// `old_tree` is our copy's tree; `groups`, the new version's group signatures if the first
/// source already gave them.
pub async fn fill(
    old: &Path,
    (old_tree, groups): (Tree, Option<Vec<Sig>>),
    manifest: &Arc<Manifest>,
    partial: &Arc<PartialFile>,
    have: Vec<bool>,
    sources: &[Arc<PeerSource>],
) -> anyhow::Result<Filled> {
    let mut filled = Filled {
        have,
        ..Filled::default()
    };
    let Some(steps) = plan(&old_tree, groups, manifest, sources).await else {
        return Ok(filled);
    };
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
/// the new version's tree.
async fn plan(
    old_tree: &Tree,
    groups: Option<Vec<Sig>>,
    manifest: &Manifest,
    sources: &[Arc<PeerSource>],
) -> Option<Vec<Step>> {
    let version = manifest.blake3();
    let mut found = groups.and_then(|g| Some((sources.first()?, g)));
    // Only a peer that signs as our tree is signed can be compared with it.
    let alike = sources
        .iter()
        .skip(1)
        .filter(|s| s.sig_kind() == old_tree.kind);
    for s in alike {
        if found.is_some() {
            break;
        }
        match s.groups(version).await {
            Ok(g) => found = Some((s, g)),
            Err(e) => tracing::info!(source = s.name(), "no tree for the update: {e}"),
        }
    }
    let (source, groups) = found?;
    if groups.iter().map(|g| u64::from(g.len)).sum::<u64>() != manifest.size() {
        tracing::warn!(
            source = source.name(),
            "its tree does not add up to the file; not used"
        );
        return None;
    }
    let index = Index::of(old_tree);
    let leaves = expand(source, version, &groups, &index).await;
    Some(crate::delta::plan(&groups, &leaves, &index))
}

/// The leaf signatures of the groups our copy lacks (`None` for the others, or where asking
/// failed: such a group is fetched whole).
async fn expand(
    source: &PeerSource,
    version: crate::manifest::Hash32,
    groups: &[Sig],
    index: &Index,
) -> Vec<Option<Vec<Sig>>> {
    let lacking: Vec<usize> = (0..groups.len())
        .filter(|&i| !index.holds_group(&groups[i]))
        .collect();
    // Runs of consecutive lacking groups, each one request.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &i in &lacking {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == i && *n < MAX_GROUPS_PER_REQUEST as usize => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    let answers = join_all(runs.iter().map(|&(first, n)| async move {
        (
            first,
            n,
            source.leaves(version, first as u32, n as u32).await,
        )
    }))
    .await;
    let mut out: Vec<Option<Vec<Sig>>> = vec![None; groups.len()];
    for (first, n, answer) in answers {
        let indices: Vec<u32> = (first as u32..(first + n) as u32).collect();
        // A failed request, or leaves that do not add up: those groups are fetched whole.
        let Some(split) = answer
            .ok()
            .and_then(|l| crate::delta::split(groups, &indices, &l))
        else {
            continue;
        };
        for i in indices {
            out[i as usize] = split[i as usize].clone();
        }
    }
    out
}

/// Fetches `(at, len)` ranges of the new version (none crossing a chunk boundary) into
/// `partial`, spread over `sources`. A failed piece is left to the engine (its chunk will
/// not verify). Returns the bytes fetched per peer.
async fn fetch(
    partial: &Arc<PartialFile>,
    ranges: &[(u64, u64)],
    sources: &[Arc<PeerSource>],
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
