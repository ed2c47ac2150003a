//! What a synced folder does with another peer's version of a file, given ours: pure policy,
//! the same on every peer, so that every peer reaches the same folder.
//!
//! - A version that has seen every change of the other (its vector dominates) replaces it.
//! - Concurrent versions with the same content (or both deleted) are one version: both take the
//!   merged vector.
//! - An edit wins over a concurrent delete.
//! - Two concurrent edits of a text file are merged three-way against their common ancestor,
//!   the two always in the same order, so every peer merges to the same bytes under the same
//!   vector (the merged one: it dominates both).
//! - Otherwise the later modification keeps the name (a tie goes to the larger peer ID) and the
//!   other is kept as `NAME.sync-conflict-YYYYMMDD-HHMMSS-PEER.EXT`, named after its own time
//!   and peer, so every peer names it alike.

use crate::model::vector::{Order, Vector, Version};

/// Which of the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Ours,
    Theirs,
}

/// What to do with their version of a file, given ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: ours has seen theirs.
    Keep,
    /// Ours stays as it is, under this vector (the same content, or ours won over a delete).
    Relabel(Vector),
    /// Theirs replaces ours (its content, or its deletion), under this vector.
    Take(Vector),
    /// Both are text edits of one ancestor: merge `first` and the other in that order, the
    /// result under this vector (if the edits overlap, fall back to [`conflict`]).
    Merge { first: Side, vector: Vector },
    /// Concurrent edits that cannot merge: `winner` keeps the name under `vector`, the other is
    /// kept as the file `copy` (a path beside it).
    Conflict {
        winner: Side,
        vector: Vector,
        copy: String,
    },
}

/// What to do with `theirs`, a version of the file at `path`, given `ours` (`None`: we never had
/// the file). `mergeable`: both are text and their common ancestor is known here.
pub fn decide(path: &str, ours: Option<&Version>, theirs: &Version, mergeable: bool) -> Decision {
    let Some(ours) = ours else {
        return Decision::Take(theirs.vector.clone());
    };
    match ours.vector.compare(&theirs.vector) {
        Order::Equal | Order::Newer => return Decision::Keep,
        Order::Older => return Decision::Take(theirs.vector.clone()),
        Order::Concurrent => {}
    }
    let vector = ours.vector.merged(&theirs.vector);
    if ours.same_content(theirs) {
        return Decision::Relabel(vector);
    }
    match (ours.deleted, theirs.deleted) {
        (true, false) => return Decision::Take(vector),
        (false, true) => return Decision::Relabel(vector),
        _ => {}
    }
    if mergeable {
        let first = if ours.wins_over(theirs) {
            Side::Ours
        } else {
            Side::Theirs
        };
        return Decision::Merge { first, vector };
    }
    conflict(path, ours, theirs)
}

/// Concurrent edits kept apart: the winner keeps the name, the loser goes to its conflict copy.
pub fn conflict(path: &str, ours: &Version, theirs: &Version) -> Decision {
    let vector = ours.vector.merged(&theirs.vector);
    let (winner, loser) = match ours.wins_over(theirs) {
        true => (Side::Ours, theirs),
        false => (Side::Theirs, ours),
    };
    let copy = conflict_name(path, loser.modified, &loser.by);
    Decision::Conflict {
        winner,
        vector,
        copy,
    }
}

/// `NAME.sync-conflict-YYYYMMDD-HHMMSS-PEER.EXT` for the file at `path` (UTC time).
pub fn conflict_name(path: &str, modified: i64, peer: &str) -> String {
    let (folder, file) = match path.rsplit_once('/') {
        Some((f, n)) => (format!("{f}/"), n),
        None => (String::new(), path),
    };
    let (stem, ext) = match file.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s, format!(".{e}")),
        _ => (file, String::new()),
    };
    let t = time::OffsetDateTime::from_unix_timestamp(modified)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let stamp = format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    format!("{folder}{stem}.sync-conflict-{stamp}-{peer}{ext}")
}

/// Whether `bytes` are text that may be merged line by line: UTF-8 without NUL.
pub fn is_text(bytes: &[u8]) -> bool {
    !bytes.contains(&0) && std::str::from_utf8(bytes).is_ok()
}

/// The three-way merge of `first` and `second` (in that order) against `ancestor`, if their
/// edits touch different lines; `None` if they overlap or any is not text.
pub fn merge_text(ancestor: &[u8], first: &[u8], second: &[u8]) -> Option<Vec<u8>> {
    let text = |b| {
        std::str::from_utf8(b)
            .ok()
            .filter(|s: &&str| !s.contains('\0'))
    };
    let (a, f, s) = (text(ancestor)?, text(first)?, text(second)?);
    diffy::merge(a, f, s).ok().map(String::into_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(vector: &[(&str, u64)], content: &str, modified: i64, by: &str) -> Version {
        let mut v = Vector::default();
        for (p, c) in vector {
            for _ in 0..*c {
                v.bump(&p.parse().unwrap());
            }
        }
        Version {
            size: content.len() as u64,
            blake3: *blake3::hash(content.as_bytes()).as_bytes(),
            deleted: false,
            vector: v,
            modified,
            by: by.to_owned(),
            parent: None,
        }
    }

    fn deleted(mut v: Version) -> Version {
        v.deleted = true;
        v.size = 0;
        v
    }

    #[test]
    fn a_dominating_version_replaces_and_a_dominated_one_is_ignored() {
        let old = version(&[("p1", 1)], "a", 10, "p1");
        let mut new = old.clone();
        new.vector.bump(&"p2".parse().unwrap());
        new.blake3 = [7; 32];
        assert_eq!(
            decide("f", Some(&old), &new, true),
            Decision::Take(new.vector.clone())
        );
        assert_eq!(decide("f", Some(&new), &old, true), Decision::Keep);
        assert_eq!(decide("f", Some(&old), &old, true), Decision::Keep);
        assert_eq!(
            decide("f", None, &old, true),
            Decision::Take(old.vector.clone())
        );
    }

    /// Both sides of a concurrent pair decide the same outcome, each from its own point of view.
    #[test]
    fn concurrent_versions_resolve_alike_on_both_sides() {
        let a = version(&[("p1", 1)], "mine", 100, "p1");
        let b = version(&[("p2", 1)], "theirs", 200, "p2");
        let both = a.vector.merged(&b.vector);
        // Text with an ancestor: merged, the later edit first, on both sides.
        assert_eq!(
            decide("n.txt", Some(&a), &b, true),
            Decision::Merge {
                first: Side::Theirs,
                vector: both.clone()
            }
        );
        assert_eq!(
            decide("n.txt", Some(&b), &a, true),
            Decision::Merge {
                first: Side::Ours,
                vector: both.clone()
            }
        );
        // Not mergeable: the later one keeps the name; the copy is named after the other.
        let copy = "d/n.sync-conflict-19700101-000140-p1.txt".to_owned();
        assert_eq!(
            decide("d/n.txt", Some(&a), &b, false),
            Decision::Conflict {
                winner: Side::Theirs,
                vector: both.clone(),
                copy: copy.clone()
            }
        );
        assert_eq!(
            decide("d/n.txt", Some(&b), &a, false),
            Decision::Conflict {
                winner: Side::Ours,
                vector: both.clone(),
                copy
            }
        );
        // A tie in time goes to the larger peer ID.
        let b_same_time = Version {
            modified: 100,
            ..b.clone()
        };
        assert!(matches!(
            decide("n", Some(&a), &b_same_time, false),
            Decision::Conflict {
                winner: Side::Theirs,
                ..
            }
        ));
        // An edit wins over a concurrent delete, whichever side deleted.
        let gone = deleted(b.clone());
        assert_eq!(
            decide("n", Some(&a), &gone, true),
            Decision::Relabel(both.clone())
        );
        assert_eq!(
            decide("n", Some(&gone), &a, true),
            Decision::Take(both.clone())
        );
        // The same content reached twice: one version.
        let same = Version {
            vector: b.vector.clone(),
            by: "p2".into(),
            ..a.clone()
        };
        assert_eq!(decide("n", Some(&a), &same, true), Decision::Relabel(both));
    }

    #[test]
    fn edits_of_different_lines_merge_and_overlapping_ones_do_not() {
        let base = "one\ntwo\nthree\nfour\n";
        let first = "one\ntwo\nthree\nFOUR\n";
        let second = "ONE\ntwo\nthree\nfour\n";
        let merged = merge_text(base.as_bytes(), first.as_bytes(), second.as_bytes());
        assert_eq!(
            merged.as_deref(),
            Some("ONE\ntwo\nthree\nFOUR\n".as_bytes())
        );
        let other = "one\ntwo\nthree\n4\n";
        assert_eq!(
            merge_text(base.as_bytes(), first.as_bytes(), other.as_bytes()),
            None
        );
        assert_eq!(merge_text(b"a\0", b"b", b"c"), None);
        assert!(is_text("héllo\n".as_bytes()) && !is_text(b"\xff\xfe") && !is_text(b"a\0b"));
    }

    #[test]
    fn conflict_copies_keep_the_extension_and_folder() {
        let t = 1_796_563_845; // 2026-12-06 13:30:45 UTC
        assert_eq!(
            conflict_name("a/b/c.md", t, "p2"),
            "a/b/c.sync-conflict-20261206-133045-p2.md"
        );
        assert_eq!(
            conflict_name("README", t, "p2"),
            "README.sync-conflict-20261206-133045-p2"
        );
        assert_eq!(
            conflict_name("x.tar.gz", 0, "p1"),
            "x.tar.sync-conflict-19700101-000000-p1.gz"
        );
    }
}
