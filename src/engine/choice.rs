//! A download's choices, made from the peers' answers as plain data: which version (peers are
//! grouped by it, so chunks of two versions are never mixed), who may be downloading the file
//! too (the crowd), whether the download goes in chunks or in pieces, and the order in which
//! equally rare chunks are asked for. No I/O: `transfer::session` gathers the facts and acts on
//! the answers.

use crate::model::manifest::{Hash32, Manifest};

/// What one peer asked answered, as far as the choices go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked<'a> {
    /// The peer's ID.
    pub peer: &'a str,
    /// It serves the version whole.
    pub whole: bool,
    /// It was left out for another reason than holding none of the file (yet): another
    /// version, an error, an older qnode.
    pub left_out: bool,
}

/// Who may be downloading the file too: every peer asked but those holding it whole and those
/// left out for another reason than holding none of it (yet).
pub fn crowd_hint(asked: &[Asked<'_>]) -> Vec<String> {
    asked
        .iter()
        .filter(|a| !a.whole && !a.left_out)
        .map(|a| a.peer.to_owned())
        .collect()
}

/// The facts that decide the unit of a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnitFacts {
    /// Another peer asked may start downloading it (a non-empty [`crowd_hint`]).
    pub crowd_hinted: bool,
    /// A peer serving it holds part of it (is downloading it).
    pub partial_member: bool,
    /// An interrupted attempt of ours left a temporary file to resume.
    pub resumes: bool,
    /// It brings an old copy up to date (whose bytes are matched in chunks).
    pub updating: bool,
    /// Every peer serving the version answered in pieces, and one sent the pieces' hashes.
    pub pieces_known: bool,
}

/// Whether the download goes in pieces (quarter chunks): only if it may be a crowd's (a crowd
/// then passes each piece on as soon as it has it, a quarter of a chunk's time) or resumes an
/// attempt (so none of the pieces it verified is lost), is not an update, and the pieces are
/// known. Seeders alone serve chunks, with a quarter of the requests.
pub fn in_pieces(f: &UnitFacts) -> bool {
    let crowd = f.crowd_hinted || f.partial_member || f.resumes;
    crowd && !f.updating && f.pieces_known
}

/// The seed of the order among equally rare chunks: in a crowd, one that all its downloaders
/// share (from the version; each takes its own stripe of it); alone, our own random one.
pub fn order_seed(in_crowd: bool, version: &Hash32, random: u64) -> u64 {
    match in_crowd {
        true => {
            let mut first = [0u8; 8];
            first.copy_from_slice(&version[..8]);
            u64::from_le_bytes(first)
        }
        false => random,
    }
}

/// The outcome of comparing what several peers describe under one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// The version to download.
    pub manifest: Manifest,
    /// Indexes (into the input) of the peers that serve exactly it.
    pub members: Vec<usize>,
    /// Indexes of peers that serve another version, with its hash.
    pub other_versions: Vec<(usize, Hash32)>,
}

/// Picks the version to download: `wanted` if given, else the one most peers hold whole, then the
/// one most peers hold at all (ties go to the version of the earliest peer). `whole[i]` says
/// whether peer `i` holds its version whole (not a download in progress); missing entries count
/// as whole. `None` when no peer serves a matching version.
pub fn agree(
    described: &[Option<Manifest>],
    whole: &[bool],
    wanted: Option<Hash32>,
) -> Option<Agreement> {
    let mut versions: Vec<(Hash32, Vec<usize>)> = Vec::new();
    for (i, m) in described.iter().enumerate() {
        let Some(m) = m else { continue };
        // Same hash and same size (the whole manifest follows from those two).
        match versions
            .iter_mut()
            .find(|(_, members)| described[members[0]].as_ref() == Some(m))
        {
            Some((_, members)) => members.push(i),
            None => versions.push((m.blake3(), vec![i])),
        }
    }
    let (_, members) = match wanted {
        Some(w) => versions.iter().find(|(h, _)| *h == w)?.clone(),
        // `max_by_key` keeps the last maximum; reversing keeps the earliest among equals.
        None => versions
            .iter()
            .rev()
            .max_by_key(|(_, m)| {
                let wholes = m.iter().filter(|&&i| whole.get(i).copied().unwrap_or(true));
                (wholes.count(), m.len())
            })?
            .clone(),
    };
    let manifest = described[members[0]].clone()?;
    let other_versions = described
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            m.as_ref()
                .filter(|m| **m != manifest)
                .map(|m| (i, m.blake3()))
        })
        .collect();
    Some(Agreement {
        manifest,
        members,
        other_versions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crowd_is_everyone_asked_who_neither_holds_it_whole_nor_was_left_out_otherwise() {
        let asked = [
            Asked {
                peer: "p1",
                whole: true,
                left_out: false,
            },
            Asked {
                peer: "p2",
                whole: false,
                left_out: false,
            },
            Asked {
                peer: "p3",
                whole: false,
                left_out: true,
            },
            Asked {
                peer: "p4",
                whole: false,
                left_out: false,
            },
        ];
        assert_eq!(crowd_hint(&asked), ["p2", "p4"]);
        assert!(crowd_hint(&asked[..1]).is_empty());
    }

    #[test]
    fn pieces_only_for_a_crowd_or_a_resume_never_for_an_update_and_only_when_known() {
        let known = UnitFacts {
            pieces_known: true,
            ..UnitFacts::default()
        };
        // Seeders alone: chunks.
        assert!(!in_pieces(&known));
        for crowd in [
            UnitFacts {
                crowd_hinted: true,
                ..known
            },
            UnitFacts {
                partial_member: true,
                ..known
            },
            UnitFacts {
                resumes: true,
                ..known
            },
        ] {
            assert!(in_pieces(&crowd), "{crowd:?}");
            assert!(
                !in_pieces(&UnitFacts {
                    updating: true,
                    ..crowd
                }),
                "{crowd:?}"
            );
            assert!(
                !in_pieces(&UnitFacts {
                    pieces_known: false,
                    ..crowd
                }),
                "{crowd:?}"
            );
        }
    }

    #[test]
    fn a_crowd_shares_its_order_and_one_alone_keeps_its_own() {
        let mut v = [0u8; 32];
        v[..8].copy_from_slice(&7u64.to_le_bytes());
        assert_eq!(order_seed(true, &v, 99), 7);
        assert_eq!(order_seed(false, &v, 99), 99);
    }

    #[test]
    fn agreement_takes_the_majority_or_the_wanted_version() {
        let m = |s: &[u8]| Some(Manifest::from_reader(s, s.len() as u64).unwrap());
        let (a, b) = (m(b"version a"), m(b"version b"));
        let described = vec![b.clone(), a.clone(), None, a.clone()];
        let got = agree(&described, &[], None).unwrap();
        assert_eq!(got.members, [1, 3]);
        assert_eq!(got.other_versions, [(0, b.as_ref().unwrap().blake3())]);
        let got = agree(&described, &[], Some(b.as_ref().unwrap().blake3())).unwrap();
        assert_eq!(got.members, [0]);
        // A tie goes to the earliest peer's version.
        assert_eq!(
            agree(&[b.clone(), a.clone()], &[], None).unwrap().members,
            [0]
        );
        assert!(agree(&[None, None], &[], None).is_none());
        assert!(agree(&described, &[], Some([0; 32])).is_none());
        // A version held whole by one peer goes before one that two peers are still downloading.
        let partly = [a.clone(), a.clone(), b.clone()];
        assert_eq!(
            agree(&partly, &[false, false, true], None).unwrap().members,
            [2]
        );
        assert_eq!(
            agree(&partly, &[true, false, true], None).unwrap().members,
            [0, 1]
        );
    }
}
