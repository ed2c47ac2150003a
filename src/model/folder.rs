//! A folder's version: the list of its files (path inside the folder, size, BLAKE3), sorted and
//! hashed, so one hash names every name and every byte (as iroh-blobs' collections and
//! BitTorrent v2's file trees do). Peers serving a folder are grouped by it, as peers serving a
//! file are grouped by its BLAKE3.

use crate::model::manifest::{FilePath, Hash32};

/// One file of a folder.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// Its path inside the folder.
    pub path: FilePath,
    /// Its size in bytes.
    pub size: u64,
    /// Its BLAKE3.
    pub blake3: Hash32,
}

/// The files of `folder` among `files` (paths from the top of `served_files`), with paths inside
/// the folder, sorted.
pub fn entries_under(
    folder: &FilePath,
    files: impl IntoIterator<Item = (FilePath, u64, Hash32)>,
) -> Vec<Entry> {
    let prefix = format!("{folder}/");
    let mut entries: Vec<Entry> = files
        .into_iter()
        .filter_map(|(path, size, blake3)| {
            let inner = path.as_str().strip_prefix(&prefix)?;
            let path = FilePath::new(inner).ok()?;
            Some(Entry { path, size, blake3 })
        })
        .collect();
    entries.sort();
    entries
}

/// The folder's version: BLAKE3 over its entries in path order, each as its path's bytes, a 0
/// byte, its size (8 bytes, little-endian) and its BLAKE3. A path holds no 0 byte, so no two
/// lists hash alike by shifting bytes between fields.
pub fn version(entries: &[Entry]) -> Hash32 {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort();
    let mut hasher = blake3::Hasher::new();
    for e in sorted {
        hasher.update(e.path.as_str().as_bytes());
        hasher.update(&[0]);
        hasher.update(&e.size.to_le_bytes());
        hasher.update(&e.blake3);
    }
    *hasher.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> FilePath {
        FilePath::new(s).unwrap()
    }

    #[test]
    fn a_version_names_every_path_size_and_hash_whatever_the_order() {
        let files = vec![
            (p("notes/b.txt"), 2, [2; 32]),
            (p("notes/2026/a.txt"), 1, [1; 32]),
            (p("notesx/c.txt"), 3, [3; 32]),
            (p("top.txt"), 4, [4; 32]),
        ];
        let entries = entries_under(&p("notes"), files);
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["2026/a.txt", "b.txt"]);
        let v = version(&entries);
        let mut reversed = entries.clone();
        reversed.reverse();
        assert_eq!(version(&reversed), v);
        let mut renamed = entries.clone();
        renamed[1].path = p("c.txt");
        let mut resized = entries.clone();
        resized[1].size = 3;
        let mut edited = entries.clone();
        edited[1].blake3 = [9; 32];
        for other in [renamed, resized, edited, entries[..1].to_vec()] {
            assert_ne!(version(&other), v);
        }
    }
}
