//! The folders this peer syncs, as its server answers `SyncIndex` about them: each one's index
//! (shared with the sync loop that keeps it) and a watch of its last sequence number, so a
//! question about a folder with nothing new waits for its next change instead of being asked
//! again and again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::{Answering, Failure, Link, Server, blocking};
use crate::store::synced::SyncIndex;
use crate::wire::exchange::respond;
use crate::wire::protocol::{
    ErrorKind, MAX_SYNC_WAIT_MS, RemoteError, Response, SYNC_PAGE, SyncRecord,
};

/// One synced folder: its index and its last sequence number as it moves.
pub struct SyncedFolder {
    /// The index, kept by the sync loop.
    pub index: Mutex<SyncIndex>,
    /// The index's last sequence number, told after each change is saved.
    pub changed: watch::Sender<u64>,
}

impl SyncedFolder {
    pub fn new(index: SyncIndex) -> Arc<Self> {
        let (changed, _) = watch::channel(index.last());
        Arc::new(Self {
            index: Mutex::new(index),
            changed,
        })
    }

    /// The index, locked (a poisoned lock still holds a whole index: each change is one insert).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, SyncIndex> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the waiting questions that the index moved on.
    pub fn tell(&self) {
        let last = self.lock().last();
        self.changed.send_replace(last);
    }
}

/// The synced folders, by name (a path in `served_files`; empty for all of it).
#[derive(Default)]
pub struct SyncedFolders(Mutex<HashMap<String, Arc<SyncedFolder>>>);

impl std::fmt::Debug for SyncedFolders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncedFolders")
    }
}

impl SyncedFolders {
    pub fn add(&self, name: &str, folder: Arc<SyncedFolder>) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.insert(name.to_owned(), folder);
    }

    fn get(&self, name: &str) -> Option<Arc<SyncedFolder>> {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.get(name).cloned()
    }
}

/// `SyncIndex`: what changed in a synced folder after `since`, at most a page, waiting up to
/// `wait_ms` for a change when there is none.
pub(super) async fn handle_sync_index(
    send: &mut impl Answering,
    server: &Server,
    link: &Link,
    name: String,
    since: u64,
    wait_ms: u32,
) -> Result<String, Failure> {
    link.needs_qnode3("sync requests")?;
    let Some(folder) = server.synced.get(&name) else {
        let why = format!("the folder {name:?} is not synced here");
        return Err(RemoteError::new(ErrorKind::NotFound, why).into());
    };
    let mut changed = folder.changed.subscribe();
    let wait = Duration::from_millis(u64::from(wait_ms.min(MAX_SYNC_WAIT_MS)));
    tokio::select! {
        _ = tokio::time::timeout(wait, changed.wait_for(|last| *last > since)) => {}
        () = server.shutdown.cancelled() => {}
        () = send.stopped() => return Err(Failure::Gone("stopped while waiting".into())),
    }
    let f = folder.clone();
    let (records, last, more) = blocking(move || {
        let index = f.lock();
        let (changes, more, last) = index.since(since, SYNC_PAGE);
        let records: Vec<SyncRecord> = (changes.into_iter())
            .filter_map(|(path, version, sequence)| {
                let path = crate::model::manifest::FilePath::new(path).ok()?;
                Some(SyncRecord {
                    path,
                    version,
                    sequence,
                })
            })
            .collect();
        Ok((records, last, more))
    })
    .await?;
    let n = records.len();
    respond(
        send,
        &Response::SyncIndex {
            records,
            last,
            more,
        },
    )
    .await;
    Ok(format!(
        "{name:?} since {since}: {n} changes, last {last} ({})",
        link.peer
    ))
}
