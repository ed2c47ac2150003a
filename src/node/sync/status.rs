//! `status`: each synced folder and each peer's standing with it.

use super::*;

/// One synced folder as `status` sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FolderStatus {
    /// The folder (a path in `served_files`; empty for all of it).
    pub folder: String,
    /// Files in it.
    pub files: usize,
    /// Whether its marker is there (without it, nothing is synced).
    pub marked: bool,
    /// The conflict copies kept in it.
    pub conflicts: Vec<String>,
    /// Each other peer.
    pub peers: Vec<PeerStatus>,
}

/// Where one peer stands with a synced folder.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub peer: String,
    /// Nothing of its changes is waiting to be taken in.
    pub in_sync: bool,
    /// Its changes we have not taken in yet (at least this many if `more`).
    pub pending: u64,
    pub more: bool,
    /// Why it could not be asked, if it could not.
    pub error: Option<String>,
}

impl Node {
    /// `status`: every folder synced here (from its index) and, for each other peer, how many
    /// of its changes we have not taken in yet (asked without waiting).
    pub async fn sync_status(&self) -> Vec<FolderStatus> {
        let served = self.served_dir();
        let folders =
            tokio::task::spawn_blocking(move || crate::store::synced::synced_folders(&served))
                .await
                .unwrap_or_default();
        let others: Vec<PeerId> = (self.table().entries().iter())
            .map(|e| e.id.clone())
            .filter(|p| *p != self.me)
            .collect();
        let mut out = Vec::new();
        for f in folders {
            let asked = futures_util::future::join_all(others.iter().map(|peer| async {
                let since = f.seen.get(peer.as_str()).copied().unwrap_or(0);
                let client = self.client(&self.entry(peer)?).await?;
                client.sync_index(&f.name, since, 0).await
            }))
            .await;
            let peers = (others.iter().zip(asked))
                .map(|(peer, a)| match a {
                    Ok(page) => PeerStatus {
                        peer: peer.to_string(),
                        in_sync: page.records.is_empty(),
                        pending: page.records.len() as u64,
                        more: page.more,
                        error: None,
                    },
                    Err(e) => PeerStatus {
                        peer: peer.to_string(),
                        in_sync: false,
                        pending: 0,
                        more: false,
                        error: Some(e.to_string()),
                    },
                })
                .collect();
            out.push(FolderStatus {
                folder: f.name,
                files: f.files,
                marked: f.marked,
                conflicts: f.conflicts,
                peers,
            });
        }
        out
    }
}
