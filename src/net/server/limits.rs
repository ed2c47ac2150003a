//! What one listed peer may take from a serving peer: memory for chunk replies, concurrent uploads,
//! and disk. Bookkeeping only: no sockets, no files.
//!
//! - [`MemoryBudget`]: bytes of chunk data read from disk and not yet handed to QUIC. Each peer has a
//!   share of its own (a peer that never reads its replies stalls only itself) and all peers
//!   together share a larger one, so the server's memory for replies is bounded whatever anyone
//!   asks.
//! - [`UploadSlots`]: uploads in progress, at most a few per peer, and the bytes they announced, so
//!   what all uploads may still write stays below the free disk less a reserve kept for the node's
//!   own downloads.
//! - [`RefusalLog`]: refused handshakes are logged one by one up to a few per interval, then
//!   counted and summarised, so a flood cannot fill the log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::model::manifest::MAX_CHUNK_SIZE;
use crate::model::peers::PeerId;

/// Chunk bytes one peer may have read and not yet taken (64 MiB: one chunk of the largest size).
pub const PEER_REPLY_MEMORY: u32 = MAX_CHUNK_SIZE as u32;
/// Chunk bytes all peers together may have read and not yet taken (256 MiB).
pub const TOTAL_REPLY_MEMORY: u32 = 256 << 20;
/// Uploads one peer may have in progress at once.
pub const UPLOADS_PER_PEER: usize = 4;
/// Connections one peer may have open to a server at once (each CLI command opens one; a peer that
/// crashed may leave a few until they time out).
pub const CONNECTIONS_PER_PEER: usize = 8;
/// Share of the disk (in percent of its size) that uploads leave free for the node's own downloads.
pub const DISK_RESERVE_PERCENT: u64 = 5;

/// Locks a mutex whose data stays consistent even if a holder panicked (every update is one
/// assignment or one map operation).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes of chunk replies held in memory, per peer and in all.
#[derive(Debug)]
pub struct MemoryBudget {
    per_peer: u32,
    total: u32,
    all: Arc<Semaphore>,
    peers: Mutex<HashMap<PeerId, Arc<Semaphore>>>,
}

/// Memory claimed for one reply; given back on drop.
#[derive(Debug)]
pub struct Claim {
    peer: OwnedSemaphorePermit,
    all: OwnedSemaphorePermit,
}

impl Claim {
    /// Gives back all but `len` bytes of the claim (what the reply holds now is less).
    pub fn keep(&mut self, len: usize) {
        for permit in [&mut self.peer, &mut self.all] {
            let extra = permit.num_permits().saturating_sub(len);
            drop(permit.split(extra));
        }
    }
}

impl Default for MemoryBudget {
    fn default() -> Self {
        Self::new(PEER_REPLY_MEMORY, TOTAL_REPLY_MEMORY)
    }
}

impl MemoryBudget {
    /// A budget of `per_peer` bytes for each peer and `all` bytes for all of them.
    pub fn new(per_peer: u32, all: u32) -> Self {
        Self {
            per_peer,
            total: all.max(per_peer),
            all: Arc::new(Semaphore::new(all.max(per_peer) as usize)),
            peers: Mutex::default(),
        }
    }

    /// The budget of `peer`: looked up once per connection, so a chunk claims its memory without
    /// a map lookup. Every connection of one peer shares that peer's share.
    pub fn for_peer(&self, peer: &PeerId) -> PeerBudget {
        let mine = lock(&self.peers)
            .entry(peer.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_peer as usize)))
            .clone();
        PeerBudget {
            per_peer: self.per_peer,
            mine,
            all: self.all.clone(),
        }
    }

    /// Bytes held for all peers now.
    pub fn held(&self) -> usize {
        (self.total as usize).saturating_sub(self.all.available_permits())
    }
}

/// One peer's share of a [`MemoryBudget`], and the common share.
#[derive(Debug)]
pub struct PeerBudget {
    per_peer: u32,
    mine: Arc<Semaphore>,
    all: Arc<Semaphore>,
}

impl PeerBudget {
    /// Waits until `len` bytes may be held (the peer's own share first, then the common one), and
    /// claims them. `len` above a share is claimed as the whole share.
    pub async fn claim(&self, len: u32) -> Claim {
        let len = len.min(self.per_peer);
        Claim {
            peer: acquire(&self.mine, len).await,
            all: acquire(&self.all, len).await,
        }
    }
}

async fn acquire(sem: &Arc<Semaphore>, n: u32) -> OwnedSemaphorePermit {
    // Invariant: these semaphores are never closed (nothing calls `close`), so acquiring can only
    // wait, never fail; and `n` is at most the semaphore's size, so it is granted eventually.
    sem.clone()
        .acquire_many_owned(n)
        .await
        .expect("reply-memory semaphores are never closed")
}

/// How many of something (connections, uploads) each peer has open.
#[derive(Debug, Default)]
struct PeerCounts(Arc<Mutex<HashMap<PeerId, usize>>>);

/// One counted thing; uncounted on drop.
#[derive(Debug)]
struct Counted {
    counts: Arc<Mutex<HashMap<PeerId, usize>>>,
    peer: PeerId,
}

impl PeerCounts {
    /// Counts one more for `peer` if it has fewer than `max`.
    fn admit(&self, peer: &PeerId, max: usize) -> Option<Counted> {
        let mut counts = lock(&self.0);
        let n = counts.entry(peer.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Counted {
            counts: self.0.clone(),
            peer: peer.clone(),
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(n) = counts.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

/// Observers (`Observe`, `ObservePieces`) one peer may have open at once.
pub const OBSERVERS_PER_PEER: usize = 64;

/// Uploads in progress: how many each peer has, and the bytes each peer's may still write.
///
/// A peer's announced bytes count in full against its own uploads, but against another peer's
/// only up to half of the disk usable for uploads: one peer announcing a huge upload and
/// trickling it cannot lock every other peer out.
#[derive(Debug, Default)]
pub struct UploadSlots {
    counts: PeerCounts,
    announced: Arc<Mutex<HashMap<PeerId, u64>>>,
}

/// Why an upload was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The peer already has its share of uploads in progress.
    #[error("{0} uploads from this peer are already in progress; try again when one ends")]
    TooMany(usize),
    /// The upload would eat into the disk kept free.
    #[error(
        "no space left for an upload of {size} bytes: {free} bytes free, {pending} promised to uploads in progress, {reserve} kept free for downloads"
    )]
    Disk {
        /// The announced size.
        size: u64,
        /// Free bytes now.
        free: u64,
        /// Bytes other uploads may still write.
        pending: u64,
        /// Bytes kept free.
        reserve: u64,
    },
}

/// One admitted upload; frees its slot and its announced bytes on drop.
#[derive(Debug)]
pub struct UploadSlot {
    _counted: Counted,
    announced: Arc<Mutex<HashMap<PeerId, u64>>>,
    peer: PeerId,
    size: u64,
}

impl UploadSlots {
    /// Admits an upload of `size` bytes from `peer` onto a disk with `free` bytes available of
    /// `total`, if the peer has a slot left and the disk keeps its reserve once this peer's
    /// uploads in progress, and the others' up to half of what may be promised, have written all
    /// they announced.
    pub fn admit(
        &self,
        peer: &PeerId,
        size: u64,
        free: u64,
        total: u64,
    ) -> Result<UploadSlot, Refused> {
        let counted = self
            .counts
            .admit(peer, UPLOADS_PER_PEER)
            .ok_or(Refused::TooMany(UPLOADS_PER_PEER))?;
        let reserve = total / 100 * DISK_RESERVE_PERCENT;
        let usable = free.saturating_sub(reserve);
        let mut announced = lock(&self.announced);
        let own = announced.get(peer).copied().unwrap_or(0);
        let others = announced.values().sum::<u64>() - own;
        let pending = own.saturating_add(others.min(usable / 2));
        if pending.saturating_add(size) > usable {
            return Err(Refused::Disk {
                size,
                free,
                pending,
                reserve,
            });
        }
        *announced.entry(peer.clone()).or_default() += size;
        Ok(UploadSlot {
            _counted: counted,
            announced: self.announced.clone(),
            peer: peer.clone(),
            size,
        })
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut announced = lock(&self.announced);
        if let Some(n) = announced.get_mut(&self.peer) {
            *n = n.saturating_sub(self.size);
            if *n == 0 {
                announced.remove(&self.peer);
            }
        }
    }
}

/// Things (connections, observers) each peer has open, at most `MAX` per peer.
#[derive(Debug, Default)]
pub struct PeerSlots<const MAX: usize>(PeerCounts);

/// Open connections per peer.
pub type ConnectionSlots = PeerSlots<CONNECTIONS_PER_PEER>;
/// Open observers of downloads in progress per peer.
pub type ObserverSlots = PeerSlots<OBSERVERS_PER_PEER>;

/// One admitted thing; frees its slot on drop.
#[derive(Debug)]
pub struct PeerSlot {
    _counted: Counted,
}

impl<const MAX: usize> PeerSlots<MAX> {
    /// Admits one more for `peer`, if it has fewer than `MAX`.
    pub fn admit(&self, peer: &PeerId) -> Option<PeerSlot> {
        let _counted = self.0.admit(peer, MAX)?;
        Some(PeerSlot { _counted })
    }
}

/// Refused handshakes: the first few of each interval are logged in full, the rest counted.
#[derive(Debug)]
pub struct RefusalLog {
    per_interval: u32,
    interval: Duration,
    state: Mutex<RefusalState>,
}

#[derive(Debug)]
struct RefusalState {
    window_start: Instant,
    logged: u32,
    unlogged: u32,
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// Log it in full.
    Log,
    /// Count it only.
    Count,
}

impl RefusalLog {
    /// Logs up to `per_interval` refusals in full per `interval`, starting at `now`.
    pub fn new(per_interval: u32, interval: Duration, now: Instant) -> Self {
        Self {
            per_interval,
            interval,
            state: Mutex::new(RefusalState {
                window_start: now,
                logged: 0,
                unlogged: 0,
            }),
        }
    }

    /// Notes one refusal at `now`.
    pub fn note(&self, now: Instant) -> Note {
        let mut st = lock(&self.state);
        if now.duration_since(st.window_start) >= self.interval {
            st.window_start = now;
            st.logged = 0;
        }
        if st.logged < self.per_interval {
            st.logged += 1;
            Note::Log
        } else {
            st.unlogged += 1;
            Note::Count
        }
    }

    /// How many refusals were counted but not logged since the last call; 0 if none.
    pub fn take_unlogged(&self) -> u32 {
        std::mem::take(&mut lock(&self.state).unlogged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> PeerId {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn one_peer_cannot_hold_more_than_its_share_and_others_still_get_memory() {
        let budget = MemoryBudget::new(4, 6);
        let (p1, p2) = (budget.for_peer(&peer("p1")), budget.for_peer(&peer("p2")));
        let a1 = p1.claim(3).await;
        // p1 has 1 byte of its share left: a 2-byte claim waits, on this or another connection.
        let blocked = tokio::time::timeout(Duration::from_millis(20), p1.claim(2));
        assert!(blocked.await.is_err(), "p1 is over its share");
        let again = budget.for_peer(&peer("p1"));
        let blocked = tokio::time::timeout(Duration::from_millis(20), again.claim(2));
        assert!(
            blocked.await.is_err(),
            "p1's other connection shares its share"
        );
        // p2 is served from the common budget meanwhile.
        let b = tokio::time::timeout(Duration::from_millis(20), p2.claim(3))
            .await
            .expect("p2 gets memory while p1 waits");
        assert_eq!(budget.held(), 6);
        drop(a1);
        drop(b);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_compressed_reply_keeps_only_what_it_sends() {
        // A reply claims its plain bytes and room for a frame (7/8 more); once compressed, only
        // the frame stays claimed, from the peer's share and from the common budget alike.
        let budget = MemoryBudget::new(16, 32);
        let p1 = budget.for_peer(&peer("p1"));
        let mut held = p1.claim(15).await;
        assert_eq!(budget.held(), 15);
        held.keep(4);
        assert_eq!(budget.held(), 4);
        // The freed share is p1's again at once.
        let more = tokio::time::timeout(Duration::from_millis(20), p1.claim(12))
            .await
            .expect("the share given back is usable");
        assert_eq!(budget.held(), 16);
        // Keeping more than was claimed changes nothing.
        held.keep(100);
        assert_eq!(budget.held(), 16);
        drop((held, more));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn uploads_are_capped_per_peer_and_by_the_disk_reserve() {
        let slots = UploadSlots::default();
        let total = 1000;
        // 5% of 1000 is kept free: 950 of 1000 free bytes may be promised.
        let held: Vec<_> = (0..UPLOADS_PER_PEER)
            .map(|_| slots.admit(&peer("p1"), 100, 1000, total).unwrap())
            .collect();
        assert_eq!(
            slots.admit(&peer("p1"), 1, 1000, total).unwrap_err(),
            Refused::TooMany(UPLOADS_PER_PEER)
        );
        // 400 promised: another peer may have 550 more, not 551.
        assert!(matches!(
            slots.admit(&peer("p2"), 551, 1000, total),
            Err(Refused::Disk { pending: 400, .. })
        ));
        let ok = slots.admit(&peer("p2"), 550, 1000, total).unwrap();
        drop(held);
        drop(ok);
        assert!(slots.admit(&peer("p1"), 950, 1000, total).is_ok());
    }

    #[test]
    fn one_peers_huge_announcement_does_not_lock_out_the_others() {
        let slots = UploadSlots::default();
        // 950 of 1000 may be promised; p1 announces all of it and trickles.
        let hog = slots.admit(&peer("p1"), 950, 1000, 1000).unwrap();
        // p1 gets no more; every other peer still has half of what may be promised.
        assert!(matches!(
            slots.admit(&peer("p1"), 1, 1000, 1000),
            Err(Refused::Disk { pending: 950, .. })
        ));
        assert!(slots.admit(&peer("p2"), 475, 1000, 1000).is_ok());
        assert!(slots.admit(&peer("p3"), 476, 1000, 1000).is_err());
        drop(hog);
        assert!(slots.admit(&peer("p3"), 476, 1000, 1000).is_ok());
    }

    #[test]
    fn a_peer_gets_a_bounded_number_of_connections() {
        let slots = ConnectionSlots::default();
        let held: Vec<_> = (0..CONNECTIONS_PER_PEER)
            .map(|_| slots.admit(&peer("p1")).unwrap())
            .collect();
        assert!(slots.admit(&peer("p1")).is_none());
        assert!(slots.admit(&peer("p2")).is_some());
        drop(held);
        assert!(slots.admit(&peer("p1")).is_some());
    }

    #[test]
    fn refusals_past_the_first_few_are_counted_not_logged() {
        let t0 = Instant::now();
        let log = RefusalLog::new(3, Duration::from_secs(10), t0);
        let notes: Vec<_> = (0..10).map(|_| log.note(t0)).collect();
        assert_eq!(notes.iter().filter(|n| **n == Note::Log).count(), 3);
        assert_eq!(log.take_unlogged(), 7);
        assert_eq!(log.take_unlogged(), 0);
        // Taking the count does not open a new window: still counted only.
        assert_eq!(log.note(t0 + Duration::from_secs(9)), Note::Count);
        // A new interval logs again.
        assert_eq!(log.note(t0 + Duration::from_secs(11)), Note::Log);
    }
}

/// A byte-rate limit shared by every connection: a virtual clock that each send advances by
/// `bytes / rate`, so the long-run rate is exact and a send never waits longer than its own share.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: f64,
    next_free: tokio::sync::Mutex<tokio::time::Instant>,
}

impl RateLimit {
    /// A limit of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            next_free: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits until `bytes` more may be sent.
    ///
    /// Turns are taken in order (tokio's mutex is fair) and a turn's time is taken only when it
    /// comes: a request dropped while it waits (its asker got the chunk elsewhere) costs the
    /// others nothing.
    pub async fn acquire(&self, bytes: u64) {
        let mut next = self.next_free.lock().await;
        let start = (*next).max(tokio::time::Instant::now());
        tokio::time::sleep_until(start).await;
        *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
    }
}
