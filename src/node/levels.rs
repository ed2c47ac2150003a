//! What is here and what the peers serve of a folder. Asked level by level (`Folder`,
//! `qnode/3`): each peer's version of it from one question; then, from a peer serving the chosen version, only the folders whose version differs
//! from ours here (a folder identical here costs no more questions), and the files that come back
//! are checked against the version before they are used. A re-run with nothing changed moves a
//! few hundred bytes, not the folder's listing.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use anyhow::bail;
use futures_util::future::join_all;

use super::Node;
use super::download::DownloadRequest;
use crate::model::folder::{self, Entry};
use crate::model::manifest::{FilePath, Hash32, hex};
use crate::model::peers::PeerId;
use crate::net::client::{Client, ClientError};
use crate::store::{Seen, Walked};
use crate::wire::exchange::Level;
use crate::wire::protocol::ErrorKind;

/// What the levels said.
pub(super) struct Found {
    /// The version chosen.
    pub version: Hash32,
    /// Its files, by path.
    pub entries: Vec<Entry>,
    /// The peers serving it.
    pub members: Vec<PeerId>,
    /// Peers that answered but serve another version or none (they may hold some files).
    pub others: Vec<PeerId>,
    /// Peers that take no part, and why.
    pub left_out: Vec<(PeerId, String)>,
    /// The files at the target now, by path (each hashed once, or known from the index).
    pub local: Walked,
}

impl Node {
    /// The folder's version and files, level by level; `None` if a peer cannot answer that way
    /// (the caller lists the trees instead).
    pub(super) async fn ask_levels(
        &self,
        req: &DownloadRequest,
        target: &Path,
    ) -> anyhow::Result<Option<Found>> {
        let name = &req.name;
        let peers: Vec<_> = self.select(&req.peers)?;
        let peers: Vec<_> = peers.into_iter().filter(|e| e.id != self.me).collect();
        if peers.is_empty() {
            bail!("no peer to download {name}/ from");
        }
        let (root, folder) = (self.served_dir(), target.to_owned());
        let local = tokio::task::spawn_blocking(move || crate::store::walk_hashed(&root, &folder));
        let answers = join_all(peers.iter().map(|entry| async move {
            let client = self.client(entry).await?;
            if !client.has_folders() {
                let peer = entry.id.clone();
                return Err(ClientError::NoFolders { peer });
            }
            let level = client.folder_level(name, true).await?;
            Ok((client, level))
        }))
        .await;
        let (mut versions, mut left_out, mut others) = (Vec::new(), Vec::new(), Vec::new());
        for (entry, answer) in peers.into_iter().zip(answers) {
            match answer {
                Ok((client, Some(level))) => versions.push((entry.id, client, level)),
                Ok((_, None)) => {
                    let why = format!("does not serve the folder {name}/");
                    left_out.push((entry.id.clone(), why));
                    others.push(entry.id);
                }
                // A peer of an earlier qnode/3: every tree is listed instead.
                Err(e) if e.remote_kind() == Some(ErrorKind::BadRequest) => return Ok(None),
                Err(e) => left_out.push((entry.id, e.to_string())),
            }
        }
        let local = local.await?;
        // The version most peers serve (the first asked among equals), or the one asked for.
        let mut counts: Vec<(Hash32, usize)> = Vec::new();
        for (_, _, level) in &versions {
            match counts.iter_mut().find(|(v, _)| *v == level.version) {
                Some((_, n)) => *n += 1,
                None => counts.push((level.version, 1)),
            }
        }
        let chosen = match req.blake3 {
            Some(w) => counts.iter().find(|(v, _)| *v == w).map(|(v, _)| *v),
            None => (counts.iter().rev().max_by_key(|(_, n)| *n)).map(|(v, _)| *v),
        };
        let Some(chosen) = chosen else {
            let why: Vec<String> = left_out.iter().map(|(p, w)| format!("{p}: {w}")).collect();
            bail!("no peer serves the folder {name}/ ({})", why.join("; "));
        };
        let mut members = Vec::new();
        for (peer, client, level) in versions {
            if level.version == chosen {
                members.push((peer, client, level));
            } else {
                let why = format!(
                    "serves another version of {name}/ ({})",
                    hex(&level.version)
                );
                left_out.push((peer.clone(), why));
                others.push(peer);
            }
        }
        // From the first member that answers in full and agrees with the version.
        let mut entries = None;
        for (_, client, level) in &members {
            if let Ok(Some(found)) = descend(client, name, level.clone(), &local.entries).await
                && folder::version(&found) == chosen
            {
                entries = Some(found);
                break;
            }
        }
        let Some(entries) = entries else {
            return Ok(None);
        };
        Ok(Some(Found {
            version: chosen,
            entries,
            members: members.into_iter().map(|(p, ..)| p).collect(),
            others,
            left_out,
            local,
        }))
    }
}

/// The files of folder `name` on `client`, from its top `level`: a folder whose version and
/// file count match ours in `local` is taken from `local`, any other asked about. `None` if a
/// level was too large to answer.
async fn descend(
    client: &Client,
    name: &FilePath,
    top: Level,
    local: &[Entry],
) -> Result<Option<Vec<Entry>>, ClientError> {
    let mut entries = Vec::new();
    let mut queue = VecDeque::from([(String::new(), top)]);
    while let Some((prefix, level)) = queue.pop_front() {
        if level.cut {
            return Ok(None);
        }
        for f in level.files {
            let Ok(path) = FilePath::new(format!("{prefix}{}", f.name)) else {
                return Ok(None);
            };
            let (size, blake3) = (f.size, f.blake3);
            entries.push(Entry { path, size, blake3 });
        }
        for d in level.folders {
            let sub = format!("{prefix}{}/", d.name);
            if folder::version_under(local, &sub) == (d.files, d.version) {
                entries.extend_from_slice(folder::under(local, &sub));
                continue;
            }
            let Ok(path) = FilePath::new(format!("{name}/{}", sub.trim_end_matches('/'))) else {
                return Ok(None);
            };
            match client.folder_level(&path, false).await? {
                Some(level) => queue.push_back((sub, level)),
                // Gone since the first question: the caller lists instead.
                None => return Ok(None),
            }
        }
    }
    entries.sort();
    Ok(Some(entries))
}

/// The entries of the version already at `folder` (as `local` saw it), those missing there, and
/// those that differ (another content, or not a regular file).
pub(super) fn sort_out(
    folder: &Path,
    entries: Vec<Entry>,
    local: &[Entry],
) -> (Vec<Entry>, Vec<Entry>, Vec<Entry>) {
    let here: HashMap<&str, &Entry> = local.iter().map(|e| (e.path.as_str(), e)).collect();
    let (mut same, mut missing, mut differ) = (Vec::new(), Vec::new(), Vec::new());
    for e in entries {
        match here.get(e.path.as_str()) {
            Some(l) if l.size == e.size && l.blake3 == e.blake3 => same.push(e),
            Some(_) => differ.push(e),
            None if folder.join(e.path.as_str()).symlink_metadata().is_err() => missing.push(e),
            None => differ.push(e),
        }
    }
    (same, missing, differ)
}

/// The entries of the folder's version already at `folder`, those missing there, and those that
/// differ (another content, or not a regular file). Many files are looked at (hashed) on two
/// threads.
pub(super) fn look(folder: &Path, mut entries: Vec<Entry>) -> (Vec<Entry>, Vec<Entry>, Vec<Entry>) {
    if entries.len() < 64 {
        return look_at(folder, entries);
    }
    let second = entries.split_off(entries.len() / 2);
    // Had the thread failed, its files would count as differing: fetched, or named.
    let fallback = second.clone();
    let (mut a, b) = std::thread::scope(|s| {
        let b = s.spawn(|| look_at(folder, second));
        (look_at(folder, entries), b.join())
    });
    let b = b.unwrap_or_else(|_| (Vec::new(), Vec::new(), fallback));
    a.0.extend(b.0);
    a.1.extend(b.1);
    a.2.extend(b.2);
    a
}

fn look_at(folder: &Path, entries: Vec<Entry>) -> (Vec<Entry>, Vec<Entry>, Vec<Entry>) {
    let (mut here, mut missing, mut differ) = (Vec::new(), Vec::new(), Vec::new());
    for e in entries {
        let at = folder.join(e.path.as_str());
        match Seen::of(&at) {
            Ok(Some(seen)) if seen.blake3 == e.blake3 => here.push(e),
            Ok(None) => missing.push(e),
            _ => differ.push(e),
        }
    }
    (here, missing, differ)
}

/// Writes the index of hashes for the next run (a cache: a failure costs hashing then).
pub(super) async fn save_hashes(walked: Option<Walked>) {
    let Some(walked) = walked else { return };
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || walked.save()).await {
        tracing::debug!("the index of hashes was not written: {e}");
    }
}
