//! Work the server does once for every peer that asks for it, so asking many times costs no more
//! than asking once.
//!
//! - [`Watches`]: one look every [`HAVE_POLL`] at each download in progress that someone observes,
//!   fanned out to all its observers (an idle observer costs nothing; before, each observer
//!   looked on its own).
//! - [`TreeJobs`]: one computation of a file's content-defined tree per (file version, signature
//!   kind) at a time, shared by every asker; at most one per core at once; one that no one waits
//!   for any more stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::model::delta::{SigKind, Tree};
use crate::model::manifest::{FilePath, Hash32};
use crate::store::{FileKey, Held, Store, StoreError};

/// How often an observed download in progress is looked at again for new chunks.
pub const HAVE_POLL: Duration = Duration::from_millis(50);

/// Locks a mutex whose maps stay consistent even if a holder panicked (one map operation each).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a download in progress here is doing, as its observers see it.
#[derive(Debug, Clone)]
pub enum Watched {
    /// Still downloading; holds these chunks (or pieces) now.
    Holding(Arc<Held>),
    /// Finished: the whole file of that version is served under its name.
    Complete,
    /// Stopped, or another version is under the name now.
    Stopped,
    /// Looking at it failed.
    Failed(String),
}

type WatchKey = (FilePath, Hash32);

/// One watch per observed download in progress.
#[derive(Debug)]
pub struct Watches {
    store: Arc<Store>,
    shutdown: CancellationToken,
    open: Mutex<HashMap<WatchKey, watch::Receiver<Watched>>>,
}

impl Watches {
    /// Watches over `store` until `shutdown`.
    pub fn new(store: Arc<Store>, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            store,
            shutdown,
            open: Mutex::default(),
        })
    }

    /// The progress of the download of version `version` of `name`, which holds `now`: a
    /// receiver that changes only when the download gains units, completes or stops.
    pub fn subscribe(
        self: &Arc<Self>,
        name: &FilePath,
        version: Hash32,
        now: Held,
    ) -> watch::Receiver<Watched> {
        let key = (name.clone(), version);
        let mut open = lock(&self.open);
        if let Some(rx) = open.get(&key) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(Watched::Holding(Arc::new(now)));
        open.insert(key.clone(), rx.clone());
        tokio::spawn(self.clone().poll(key, tx));
        rx
    }

    /// Looks at the download every [`HAVE_POLL`] while anyone observes it, and tells them what
    /// changed. The registry's own receiver does not count as an observer.
    async fn poll(self: Arc<Self>, key: WatchKey, tx: watch::Sender<Watched>) {
        let (name, version) = key.clone();
        let end = |last: Option<Watched>| {
            let mut open = lock(&self.open);
            if last.is_none() && tx.receiver_count() > 1 {
                return false;
            }
            open.remove(&key);
            if let Some(p) = last {
                tx.send_replace(p);
            }
            true
        };
        loop {
            tokio::select! {
                () = tokio::time::sleep(HAVE_POLL) => {}
                () = self.shutdown.cancelled() => {
                    end(Some(Watched::Stopped));
                    return;
                }
            }
            if end(None) {
                return;
            }
            let (store, n) = (self.store.clone(), name.clone());
            let now = tokio::task::spawn_blocking(move || -> Result<Watched, StoreError> {
                Ok(match store.held(&n, &version)? {
                    Some(h) => Watched::Holding(Arc::new(h)),
                    None if store.lookup(&n)?.is_some_and(|m| m.blake3() == version) => {
                        Watched::Complete
                    }
                    None => Watched::Stopped,
                })
            })
            .await;
            let now = match now {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => Watched::Failed(e.to_string()),
                Err(e) => Watched::Failed(e.to_string()),
            };
            match now {
                Watched::Holding(h) => {
                    tx.send_if_modified(|last| match last {
                        Watched::Holding(was) if was.chunks == h.chunks => false,
                        _ => {
                            *last = Watched::Holding(h);
                            true
                        }
                    });
                }
                done => {
                    end(Some(done));
                    return;
                }
            }
        }
    }
}

type JobKey = (FilePath, FileKey, SigKind);
/// A computed tree, with the version (BLAKE3) of the file it is the tree of.
type TreeResult = Result<(Hash32, Arc<Tree>), StoreError>;
type Running = Arc<Mutex<HashMap<JobKey, Arc<watch::Sender<Option<TreeResult>>>>>>;

/// Tree computations in progress, shared by their askers, and the cap on how many run at once.
#[derive(Debug)]
pub struct TreeJobs {
    store: Arc<Store>,
    running: Running,
    slots: Arc<Semaphore>,
}

impl TreeJobs {
    /// At most `at_once` computations over `store` at a time.
    pub fn new(store: Arc<Store>, at_once: usize) -> Self {
        Self {
            store,
            running: Running::default(),
            slots: Arc::new(Semaphore::new(at_once.max(1))),
        }
    }

    /// The tree of version `blake3` of `name` (`Conflict` if the file is another version now).
    /// The version is learnt by the shared computation too, so a flood of askers of a file not
    /// hashed yet hashes it once.
    pub async fn of_version(
        &self,
        name: &FilePath,
        blake3: Hash32,
        kind: SigKind,
    ) -> Result<Arc<Tree>, StoreError> {
        let (store, n) = (self.store.clone(), name.clone());
        let cached = blocking(move || {
            Ok(match store.cached_tree(&n, kind)? {
                Ok((_, tree)) => Ok((store.manifest(&n)?.blake3(), tree)),
                Err(key) => Err(key),
            })
        })
        .await?;
        let (version, tree) = match cached {
            Ok(found) => found,
            Err(key) => self.computed(name, key, kind).await?,
        };
        if version != blake3 {
            return Err(StoreError::Conflict(format!(
                "{name} (this peer serves another version now)"
            )));
        }
        Ok(tree)
    }

    /// The tree of the file under `name` now (`expect`: only if it is still that file), with the
    /// identity of the file it was read from.
    pub async fn of(
        &self,
        name: &FilePath,
        expect: Option<FileKey>,
        kind: SigKind,
    ) -> Result<(FileKey, Arc<Tree>), StoreError> {
        let (store, n) = (self.store.clone(), name.clone());
        let key = match blocking(move || store.cached_tree(&n, kind)).await? {
            Ok(found) if expect.is_none_or(|k| k == found.0) => return Ok(found),
            Ok((key, _)) | Err(key) => key,
        };
        if expect.is_some_and(|k| k != key) {
            return Err(StoreError::Busy(format!(
                "{name} (it changed while being read)"
            )));
        }
        let (_, tree) = self.computed(name, key, kind).await?;
        Ok((key, tree))
    }

    /// The shared computation of the tree of the file `key` under `name`.
    async fn computed(
        &self,
        name: &FilePath,
        key: FileKey,
        kind: SigKind,
    ) -> Result<(Hash32, Arc<Tree>), StoreError> {
        let mut rx = self.join((name.clone(), key, kind));
        let done = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| StoreError::Busy(format!("{name} (its tree was abandoned)")))?;
        match done.as_ref() {
            Some(result) => result.clone(),
            None => Err(StoreError::Busy(format!("{name} (no tree)"))),
        }
    }

    /// A receiver of the computation for `job`, started if none runs. The computation waits
    /// for one of the slots, and gives up (waiting or reading) once no receiver is left.
    fn join(&self, job: JobKey) -> watch::Receiver<Option<TreeResult>> {
        let mut running = lock(&self.running);
        if let Some(tx) = running.get(&job) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        let tx = Arc::new(tx);
        running.insert(job.clone(), tx.clone());
        drop(running);
        let (store, slots, running) =
            (self.store.clone(), self.slots.clone(), self.running.clone());
        tokio::spawn(async move {
            let permit = tokio::select! {
                p = slots.acquire_owned() => p.ok(),
                () = tx.closed() => None,
            };
            let result = match permit {
                Some(permit) if tx.receiver_count() > 0 => {
                    let (t, (name, key, kind)) = (tx.clone(), job.clone());
                    tracing::info!("computing the tree of {name} ({kind:?} signatures)");
                    let r = tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        let version = store.manifest(&name)?.blake3();
                        let stop = || t.receiver_count() == 0;
                        Ok((version, store.compute_tree(&name, key, kind, &stop)?))
                    })
                    .await;
                    r.unwrap_or_else(|e| Err(StoreError::Busy(format!("tree task failed: {e}"))))
                }
                _ => Err(StoreError::Busy("no one waits for this tree".into())),
            };
            lock(&running).remove(&job);
            tx.send_replace(Some(result));
        });
        rx
    }
}

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Busy(format!("task failed: {e}"))))
}
