//! Listing helpers: a walk's files with manifests from the cache after one `lstat`, and the
//! files of given sizes only.

use std::collections::HashSet;
use std::fs;
use std::sync::Arc;

use super::{FileKey, Store, StoreError};
use crate::model::manifest::{FilePath, Manifest};

impl Store {
    /// The served files of one of `sizes` bytes, with their manifests (only those are hashed).
    pub fn list_sized(
        &self,
        sizes: &HashSet<u64>,
    ) -> Result<Vec<(FilePath, Arc<Manifest>)>, StoreError> {
        let mut out = Vec::new();
        for path in self.walk()? {
            let sized =
                fs::symlink_metadata(self.path_of(&path)).is_ok_and(|m| sizes.contains(&m.len()));
            if !sized {
                continue;
            }
            match self.listed_manifest(&path) {
                Ok(m) => out.push((path, m)),
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The manifest of a file a walk just found: from the cache if the file's metadata (one
    /// `lstat`, no open) is what the cached manifest was made from, else as
    /// [`manifest`](Self::manifest) makes it. A listing of a large tree costs a stat a file.
    pub(super) fn listed_manifest(&self, name: &FilePath) -> Result<Arc<Manifest>, StoreError> {
        if let Ok(meta) = fs::symlink_metadata(self.path_of(name))
            && meta.is_file()
            && let Some(d) = self.lock_cache().get(name)
            && d.key == FileKey::of(&meta)
        {
            return Ok(d.manifest.clone());
        }
        self.manifest(name)
    }

    /// The manifest of `name`, from the cache if the file is unchanged.
    pub fn manifest(&self, name: &FilePath) -> Result<Arc<Manifest>, StoreError> {
        Ok(self.described(name)?.manifest)
    }
}
