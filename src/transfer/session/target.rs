//! The download at its target: what is there already (the same version, nothing, or another one
//! to update), and the partial file's life from create (or resume) to commit.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};

use super::{Fetched, Peers, Plan};
use crate::model::delta::{Sig, Tree};
use crate::model::manifest::{FilePath, Manifest};
use crate::store::{Check, Committed, PartialFile, Seen, StoreError};
use crate::transfer::download::{self, DownloadReport};

/// Offers the download to other peers as it goes, if it goes into our served_files: the name we
/// take our stripe of a crowd under, or `None`.
pub(super) async fn offer_while_downloading(
    plan: &Plan,
    partial: &Arc<PartialFile>,
    download: &Arc<Manifest>,
    have: &[bool],
) -> anyhow::Result<Option<String>> {
    let Some(me) = &plan.offer_as else {
        return Ok(None);
    };
    let (p, m, h) = (partial.clone(), download.clone(), have.to_vec());
    Ok(
        match tokio::task::spawn_blocking(move || p.share(&m, &h)).await? {
            Ok(()) => Some(me.to_string()),
            Err(e) => {
                let name = &plan.name;
                tracing::warn!("not offering {name} to other peers while it downloads: {e}");
                None
            }
        },
    )
}

/// The temporary file for `manifest`'s version at `target`, and the chunks it already holds.
///
/// It is named after the version, so an interrupted download of the same version resumes from the
/// chunks it holds (re-verified from disk, never trusted).
pub(super) async fn open_partial(
    target: &Path,
    manifest: &Arc<Manifest>,
) -> anyhow::Result<(Arc<PartialFile>, Vec<bool>)> {
    let tag = crate::store::download_tag(&manifest.blake3());
    let partial = PartialFile::create(target, &tag, manifest.size())
        .with_context(|| format!("preparing {}", target.display()))?;
    let partial = Arc::new(partial);
    let have = if partial.resumed() {
        let (p, m) = (partial.clone(), manifest.clone());
        tokio::task::spawn_blocking(move || p.verified_chunks(&m))
            .await?
            .with_context(|| format!("resuming {}", target.display()))?
    } else {
        Vec::new()
    };
    Ok((partial, have))
}

/// The engine's report, or why the transfer failed (`None`: interrupted). A failed transfer's
/// verified chunks stay in the hidden temporary file for the next attempt.
pub(super) fn transferred(
    outcome: Option<Result<DownloadReport, download::DownloadError>>,
    partial: &PartialFile,
    name: &FilePath,
    target: &Path,
) -> anyhow::Result<DownloadReport> {
    let e = match outcome {
        Some(Ok(r)) => return Ok(r),
        Some(Err(e)) => anyhow::Error::from(e),
        None => anyhow::anyhow!("interrupted"),
    };
    partial.keep_for_resume();
    Err(e.context(format!(
        "downloading {name}: nothing was written under {}; run the same command again to resume",
        target.display()
    )))
}

/// Links the finished file to its name (never replacing another file).
/// In place of `old` if given (atomically, keeping it hidden), else under a free name.
pub(super) async fn save(
    partial: Arc<PartialFile>,
    manifest: &Manifest,
    target: &Path,
    old: Option<Seen>,
) -> anyhow::Result<Fetched> {
    let partial = Arc::try_unwrap(partial)
        .map_err(|_| anyhow::anyhow!("internal error: the partial file is still in use"))?;
    let expected = manifest.blake3();
    let committed = tokio::task::spawn_blocking(move || match old {
        Some(old) => partial.commit_replacing(expected, Check::Chunks, old),
        None => partial.commit(expected, Check::Chunks),
    })
    .await?
    .with_context(|| format!("saving {}", target.display()))?;
    Ok(match committed {
        Committed::Stored => Fetched::Downloaded,
        Committed::AlreadyPresent => Fetched::AlreadyPresent,
        Committed::Replaced => Fetched::Updated,
    })
}

/// The bytes of the chunks marked in `have`.
pub(super) fn bytes_of(manifest: &Manifest, have: &[bool]) -> u64 {
    have.iter()
        .enumerate()
        .filter(|(_, h)| **h)
        .map(|(i, _)| manifest.chunk_len(i as u32).unwrap_or(0))
        .sum()
}

/// Our copy, read for an update: its tree and, if the first peer gave them, the new version's
/// group signatures.
pub(super) type Prefetched = (Tree, Option<Vec<Sig>>);

/// What a download finds at its target.
pub(super) enum AtTarget {
    /// Nothing: a plain download.
    Nothing,
    /// The version to fetch.
    Same,
    /// Another version, to update.
    Other(Seen, Option<Prefetched>),
}

/// What is at `target` now; another version is refused unless `update`. For an update, also our
/// copy's tree (from the same read as its hash), while `first` is asked for the new version's
/// group signatures.
pub(super) async fn look_at<P: Peers>(
    peers: &P,
    plan: &Plan,
    first: Option<&P::Lead>,
    manifest: &Manifest,
) -> anyhow::Result<AtTarget> {
    let (target, name) = (&plan.target, &plan.name);
    if !plan.update {
        return match not_overwriting(Seen::of(target), target)? {
            None => Ok(AtTarget::Nothing),
            Some(seen) if seen.blake3 == manifest.blake3() => Ok(AtTarget::Same),
            Some(_) => bail!(
                "{} already exists with different content; not overwriting it (use --update to replace it with the peers' version, or --output to save elsewhere)",
                target.display()
            ),
        };
    }
    let groups = async {
        match first {
            Some(lead) => peers.groups(lead, name, manifest.blake3()).await,
            None => None,
        }
    };
    // Our tree is signed as the peer asked for the new version's groups signs its own.
    let kind = first.map(|l| peers.sig_kind(l)).unwrap_or_default();
    let t = target.to_owned();
    let read = tokio::task::spawn_blocking(move || Seen::with_tree(&t, kind));
    let (read, groups) = tokio::join!(read, groups);
    Ok(match not_overwriting(read?, target)? {
        Some((seen, _)) if seen.blake3 == manifest.blake3() => AtTarget::Same,
        Some((seen, tree)) => AtTarget::Other(seen, Some((tree, groups))),
        None => AtTarget::Nothing,
    })
}

/// What [`Seen`] found at `path`, with a clear message if it is not a regular file.
fn not_overwriting<T>(
    found: Result<Option<T>, StoreError>,
    path: &Path,
) -> anyhow::Result<Option<T>> {
    match found {
        Ok(seen) => Ok(seen),
        Err(StoreError::Conflict(_)) => bail!(
            "{} exists and is not a regular file; not overwriting it",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
