//! Version vectors and file versions: for one file of a synced folder, a counter per peer that changed it (as
//! Syncthing's `Vector`). A version whose vector is greater than or equal to another's, entry by
//! entry, has seen every change the other has; two vectors each ahead somewhere are concurrent
//! edits.

use std::cmp::Ordering;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::manifest::Hash32;
use super::peers::PeerId;

/// Most peers a vector may name (more than a folder is ever synced with; a bound on what a
/// peer may send).
pub const MAX_VECTOR_PEERS: usize = 256;

/// How two versions of a file relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The same version.
    Equal,
    /// This one has seen every change of the other, and more.
    Newer,
    /// The other one has seen every change of this, and more.
    Older,
    /// Each has a change the other lacks.
    Concurrent,
}

/// A counter per peer, sorted by peer ID, no zero counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Vector(Vec<(String, u64)>);

/// Why a vector from the network was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadVector {
    #[error("a version vector names {0} peers (at most {MAX_VECTOR_PEERS})")]
    TooLong(usize),
    #[error("a version vector names an invalid peer ID")]
    BadPeer,
    #[error("a version vector is not sorted by peer, or names one twice")]
    Unsorted,
    #[error("a version vector has a zero or impossible counter")]
    BadCounter,
}

impl Vector {
    /// The counter of `peer` (0 if it never changed the file).
    pub fn get(&self, peer: &str) -> u64 {
        match self.0.binary_search_by(|(p, _)| p.as_str().cmp(peer)) {
            Ok(i) => self.0[i].1,
            Err(_) => 0,
        }
    }

    /// Records a change made by `peer`: its counter goes one past the highest counter in the
    /// vector (so a change always sorts after every change it has seen, on every peer).
    pub fn bump(&mut self, peer: &PeerId) {
        let next = self
            .0
            .iter()
            .map(|(_, c)| *c)
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        match self
            .0
            .binary_search_by(|(p, _)| p.as_str().cmp(peer.as_str()))
        {
            Ok(i) => self.0[i].1 = next,
            Err(i) => self.0.insert(i, (peer.as_str().to_owned(), next)),
        }
    }

    /// Every change either has seen: the larger counter of each peer.
    pub fn merged(&self, other: &Self) -> Self {
        let mut out: Vec<(String, u64)> = Vec::with_capacity(self.0.len().max(other.0.len()));
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => match x.0.cmp(&y.0) {
                    Ordering::Less => a.next().cloned(),
                    Ordering::Greater => b.next().cloned(),
                    Ordering::Equal => {
                        let entry = (x.0.clone(), x.1.max(y.1));
                        a.next();
                        b.next();
                        Some(entry)
                    }
                },
                (Some(_), None) => a.next().cloned(),
                (None, Some(_)) => b.next().cloned(),
                (None, None) => None,
            };
            match next {
                Some(e) => out.push(e),
                None => return Self(out),
            }
        }
    }

    /// How this version relates to `other`.
    pub fn compare(&self, other: &Self) -> Order {
        let (mut ahead, mut behind) = (false, false);
        let peers = self
            .0
            .iter()
            .map(|(p, _)| p)
            .chain(other.0.iter().map(|(p, _)| p));
        for p in peers {
            match self.get(p).cmp(&other.get(p)) {
                Ordering::Greater => ahead = true,
                Ordering::Less => behind = true,
                Ordering::Equal => {}
            }
        }
        match (ahead, behind) {
            (false, false) => Order::Equal,
            (true, false) => Order::Newer,
            (false, true) => Order::Older,
            (true, true) => Order::Concurrent,
        }
    }

    /// Checks a vector decoded from the network: a bounded number of valid, sorted, distinct
    /// peers, each with a counter in 1..=2^62 (room to count on without overflow).
    pub fn check(&self) -> Result<(), BadVector> {
        if self.0.len() > MAX_VECTOR_PEERS {
            return Err(BadVector::TooLong(self.0.len()));
        }
        if self.0.iter().any(|(p, _)| PeerId::from_str(p).is_err()) {
            return Err(BadVector::BadPeer);
        }
        if self.0.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(BadVector::Unsorted);
        }
        if self.0.iter().any(|&(_, c)| c == 0 || c > 1 << 62) {
            return Err(BadVector::BadCounter);
        }
        Ok(())
    }

    /// Its entries, by peer.
    pub fn entries(&self) -> &[(String, u64)] {
        &self.0
    }
}

/// One version of a file of a synced folder, as its index says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Its size in bytes (0 once deleted).
    pub size: u64,
    /// Its BLAKE3 (of no bytes once deleted).
    pub blake3: Hash32,
    /// Deleted: a tombstone.
    pub deleted: bool,
    /// Its version vector.
    pub vector: Vector,
    /// Its modification time, seconds since 1970.
    pub modified: i64,
    /// The peer that made it.
    pub by: String,
    /// The content it was made from (the version before it where it was made), if any: two
    /// concurrent edits of the same parent merge against it.
    pub parent: Option<Hash32>,
}

impl Version {
    /// Whether the two hold the same thing (the same bytes, or both nothing).
    pub fn same_content(&self, other: &Self) -> bool {
        (self.deleted && other.deleted)
            || (!self.deleted && !other.deleted && self.blake3 == other.blake3)
    }

    /// Whether this one keeps the name against `other` in a conflict: the later modification,
    /// on a tie the larger peer ID.
    pub fn wins_over(&self, other: &Self) -> bool {
        (self.modified, &self.by) > (other.modified, &other.by)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(entries: &[(&str, u64)]) -> Vector {
        Vector(entries.iter().map(|(p, c)| ((*p).to_owned(), *c)).collect())
    }

    fn peer(s: &str) -> PeerId {
        s.parse().unwrap()
    }

    #[test]
    fn vectors_order_as_their_changes() {
        let a = v(&[("p1", 1)]);
        let mut b = a.clone();
        b.bump(&peer("p2"));
        assert_eq!(b, v(&[("p1", 1), ("p2", 2)]));
        assert_eq!(a.compare(&a), Order::Equal);
        assert_eq!(b.compare(&a), Order::Newer);
        assert_eq!(a.compare(&b), Order::Older);
        let mut c = a.clone();
        c.bump(&peer("p3"));
        assert_eq!(b.compare(&c), Order::Concurrent);
        assert_eq!(c.compare(&b), Order::Concurrent);
        let m = b.merged(&c);
        assert_eq!(m, v(&[("p1", 1), ("p2", 2), ("p3", 2)]));
        assert_eq!(m.compare(&b), Order::Newer);
        assert_eq!(m.compare(&c), Order::Newer);
        // The empty vector (a file never changed) is older than any change.
        assert_eq!(Vector::default().compare(&a), Order::Older);
    }

    #[test]
    fn vectors_from_the_network_are_checked() {
        assert_eq!(v(&[("p1", 1), ("p2", 5)]).check(), Ok(()));
        assert_eq!(v(&[("p2", 1), ("p1", 5)]).check(), Err(BadVector::Unsorted));
        assert_eq!(v(&[("p1", 1), ("p1", 5)]).check(), Err(BadVector::Unsorted));
        assert_eq!(v(&[("p1", 0)]).check(), Err(BadVector::BadCounter));
        assert_eq!(v(&[("p1", u64::MAX)]).check(), Err(BadVector::BadCounter));
        assert_eq!(v(&[("../x", 1)]).check(), Err(BadVector::BadPeer));
        let long: Vec<(String, u64)> = (0..=MAX_VECTOR_PEERS)
            .map(|i| (format!("p{i:04}"), 1))
            .collect();
        assert_eq!(
            Vector(long).check(),
            Err(BadVector::TooLong(MAX_VECTOR_PEERS + 1))
        );
    }
}
