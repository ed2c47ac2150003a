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
        add(&mut hasher, e.path.as_str(), e.size, &e.blake3);
    }
    *hasher.finalize().as_bytes()
}

/// One level of a folder: its version, the files directly in it, and the folders directly in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    /// The folder's version.
    pub version: Hash32,
    /// The files directly in it (paths of one component).
    pub files: Vec<Entry>,
    /// The folders directly in it: name, how many files are under it, its version.
    pub folders: Vec<(FilePath, u64, Hash32)>,
}

/// The level of the folder whose files (paths inside it) are `entries`, sorted by path.
pub fn level(entries: &[Entry]) -> Level {
    level_sorted(entries.iter().map(|e| (e.path.as_str(), e.size, e.blake3)))
}

/// [`level`] in one pass over (path inside the folder, size, BLAKE3), sorted by path, without
/// a copy of them: only the files directly in the folder are kept.
pub fn level_sorted<'a>(files: impl IntoIterator<Item = (&'a str, u64, Hash32)>) -> Level {
    let mut all = blake3::Hasher::new();
    let mut out = Level {
        version: [0; 32],
        files: Vec::new(),
        folders: Vec::new(),
    };
    // The folder being summed: its name, files so far, hasher. Its files are next to each
    // other in path order.
    let mut open: Option<(&str, u64, blake3::Hasher)> = None;
    let close = |open: &mut Option<(&str, u64, blake3::Hasher)>, out: &mut Level| {
        if let Some((name, count, hasher)) = open.take()
            && let Ok(name) = FilePath::new(name)
        {
            out.folders
                .push((name, count, *hasher.finalize().as_bytes()));
        }
    };
    for (path, size, blake3) in files {
        add(&mut all, path, size, &blake3);
        match path.split_once('/') {
            None => {
                close(&mut open, &mut out);
                if let Ok(path) = FilePath::new(path) {
                    out.files.push(Entry { path, size, blake3 });
                }
            }
            Some((first, rest)) => {
                if open.as_ref().is_none_or(|(name, ..)| *name != first) {
                    close(&mut open, &mut out);
                    open = Some((first, 0, blake3::Hasher::new()));
                }
                if let Some((_, count, hasher)) = open.as_mut() {
                    add(hasher, rest, size, &blake3);
                    *count += 1;
                }
            }
        }
    }
    close(&mut open, &mut out);
    out.version = *all.finalize().as_bytes();
    out
}

/// The entries under folder `prefix` (ending in `/`) among `entries` (sorted by path): how many,
/// and the version of that folder (their paths taken inside it).
pub fn version_under(entries: &[Entry], prefix: &str) -> (u64, Hash32) {
    let start = entries.partition_point(|e| e.path.as_str() < prefix);
    let mut hasher = blake3::Hasher::new();
    let mut count = 0;
    for e in entries[start..]
        .iter()
        .take_while(|e| e.path.as_str().starts_with(prefix))
    {
        add(
            &mut hasher,
            &e.path.as_str()[prefix.len()..],
            e.size,
            &e.blake3,
        );
        count += 1;
    }
    (count, *hasher.finalize().as_bytes())
}

/// The entries under folder `prefix` (ending in `/`) among `entries` (sorted by path).
pub fn under<'a>(entries: &'a [Entry], prefix: &str) -> &'a [Entry] {
    let start = entries.partition_point(|e| e.path.as_str() < prefix);
    let count = entries[start..]
        .iter()
        .take_while(|e| e.path.as_str().starts_with(prefix))
        .count();
    &entries[start..start + count]
}

/// One entry's bytes in a version.
fn add(hasher: &mut blake3::Hasher, path: &str, size: u64, blake3: &Hash32) {
    hasher.update(path.as_bytes());
    hasher.update(&[0]);
    hasher.update(&size.to_le_bytes());
    hasher.update(blake3);
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

    #[test]
    fn a_level_names_its_files_and_each_folder_with_that_folders_version() {
        let files = vec![
            (p("n/a.txt"), 1, [1; 32]),
            (p("n/b/c.txt"), 2, [2; 32]),
            (p("n/b/d/e.txt"), 3, [3; 32]),
            (p("n/b.txt"), 4, [4; 32]),
            (p("n/z/f.txt"), 5, [5; 32]),
        ];
        let entries = entries_under(&p("n"), files.clone());
        let level = level(&entries);
        assert_eq!(level.version, version(&entries));
        let names: Vec<&str> = level.files.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, ["a.txt", "b.txt"]);
        let b = entries_under(&p("n/b"), files.clone());
        let z = entries_under(&p("n/z"), files);
        assert_eq!(
            level.folders,
            [(p("b"), 2, version(&b)), (p("z"), 1, version(&z))]
        );
        assert_eq!(version_under(&entries, "b/"), (2, version(&b)));
        assert_eq!(under(&entries, "z/").len(), 1);
    }
}
