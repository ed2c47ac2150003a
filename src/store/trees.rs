//! The content-defined trees (`model::delta`) of served files, for updates: the last few kept
//! in memory by name and signature kind, each with the file it was read from; a computation no
//! one waits for any more stops between reads.

use super::*;

/// Cached trees by name and signature kind, with the file each was read from.
pub(super) type TreeCache = HashMap<(FilePath, SigKind), (FileKey, Arc<Tree>)>;

/// Trees kept in memory (about 3 bytes of tree per KiB of file).
const TREES_CACHED: usize = 8;

impl Store {
    /// The cached tree of the regular file under `name` now, signed as `kind` says, with the
    /// identity of that file; or, if none is cached for it, that identity (to compute one).
    #[allow(clippy::type_complexity)]
    pub fn cached_tree(
        &self,
        name: &FilePath,
        kind: SigKind,
    ) -> Result<Result<(FileKey, Arc<Tree>), FileKey>, StoreError> {
        let (_, key) = self.open_regular(name)?;
        Ok(match self.lock_trees().get(&(name.clone(), kind)) {
            Some((k, t)) if *k == key => Ok((key, t.clone())),
            _ => Err(key),
        })
    }

    /// Computes (and caches) the tree of the file under `name`, which must still be the file
    /// `key` names (else `Busy`), signed as `kind` says. `stop` is asked between reads: once it
    /// says true (no one waits for the tree any more) the work ends with `Busy`.
    pub fn compute_tree(
        &self,
        name: &FilePath,
        key: FileKey,
        kind: SigKind,
        stop: &dyn Fn() -> bool,
    ) -> Result<Arc<Tree>, StoreError> {
        let changed = || StoreError::Busy(format!("{name} (it changed while being read)"));
        let (file, now) = self.open_regular(name)?;
        if now != key {
            return Err(changed());
        }
        let path = self.path_of(name);
        let reader = Stoppable {
            inner: (&file).take(key.size),
            stop,
        };
        let tree = match Tree::of(reader, kind) {
            Ok(t) => t,
            Err(_) if stop() => {
                return Err(StoreError::Busy(format!(
                    "{name} (its tree was no longer wanted)"
                )));
            }
            Err(e) => return Err(StoreError::io("reading", &path, e)),
        };
        let after = file
            .metadata()
            .map(|m| FileKey::of(&m))
            .map_err(|e| StoreError::io("reading", &path, e))?;
        if after != key {
            return Err(changed());
        }
        let tree = Arc::new(tree);
        let mut trees = self.lock_trees();
        if trees.len() >= TREES_CACHED
            && let Some(evict) = trees.keys().next().cloned()
        {
            trees.remove(&evict);
        }
        trees.insert((name.clone(), kind), (key, tree.clone()));
        Ok(tree)
    }
}

/// A reader that fails once `stop` says so: a tree computation no one waits for ends.
struct Stoppable<'a, R> {
    inner: R,
    stop: &'a dyn Fn() -> bool,
}

impl<R: Read> Read for Stoppable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if (self.stop)() {
            return Err(io::Error::other("no longer wanted"));
        }
        self.inner.read(buf)
    }
}
