//! Picking: the queue of pending chunks in order (retried first, then the rarest, then by
//! stripe and rank), and filling every usable source's window from it under the global cap.

use super::windows::LEAN_WINDOW;
use super::*;

impl Scheduler {
    /// Puts the queue in order again (what `slot` says changed).
    pub(super) fn resort(&mut self) {
        let queued: Vec<u32> = self.pending.iter().map(|s| s.chunk).collect();
        self.pending = queued.into_iter().map(|c| self.slot(c)).collect();
    }

    /// Where chunk `c` stands in the queue: retried chunks first, then the rarest, then our
    /// stripe in our own order, then the next downloader's stripe by the shared rank backwards,
    /// then the one after, and so on (so that the downloaders done with their own stripe help
    /// different ones).
    pub(super) fn slot(&self, c: u32) -> Slot {
        let st = &self.chunks[c as usize];
        let stripe = self.stripe_of(c);
        let rank = match stripe {
            // Ours (and every chunk before we know of a crowd): in our own order, so that
            // downloaders that do not know of each other yet do not start alike.
            0 => self.alone[c as usize],
            _ => u32::MAX - self.rank[c as usize],
        };
        Slot {
            fresh: !st.retried,
            avail: st.avail,
            stripe,
            rank,
            chunk: c,
        }
    }

    pub(super) fn enqueue(&mut self, c: u32) {
        self.chunks[c as usize].queued = true;
        self.pending.insert(self.slot(c));
    }

    /// One more (`gained`) or one fewer live source holds `c`.
    pub(super) fn adjust_avail(&mut self, c: u32, gained: bool) {
        let queued = self.chunks[c as usize].queued;
        if queued {
            self.pending.remove(&self.slot(c));
        }
        let was_rare = self.is_rare(c);
        let st = &mut self.chunks[c as usize];
        st.avail = if gained {
            st.avail + 1
        } else {
            st.avail.saturating_sub(1)
        };
        match (was_rare, self.is_rare(c)) {
            (true, false) => self.count_rare(c, false),
            (false, true) => self.count_rare(c, true),
            _ => {}
        }
        if queued {
            self.pending.insert(self.slot(c));
        }
    }

    /// Chunk `c` is not done and only seeders hold it.
    pub(super) fn is_rare(&self, c: u32) -> bool {
        let st = &self.chunks[c as usize];
        !st.done && st.avail <= self.whole
    }

    /// Counts the seeders and the rare chunks again (a source joined, left, or became whole, or
    /// our stripe moved).
    pub(super) fn recount_whole(&mut self) {
        self.whole = self
            .sources
            .iter()
            .filter(|s| s.live && s.holds.is_full())
            .count() as u32;
        self.rare_in_stripe = vec![0; self.stripe.of as usize];
        for c in 0..self.chunk_count() {
            if self.is_rare(c) {
                self.count_rare(c, true);
            }
        }
    }

    /// Chunk `c` became rare (`more`) or stopped being rare.
    pub(super) fn count_rare(&mut self, c: u32, more: bool) {
        let stripe = self.stripe_of(c) as usize;
        let n = &mut self.rare_in_stripe[stripe];
        *n = if more { *n + 1 } else { n.saturating_sub(1) };
    }

    /// Chunks not done that only seeders hold.
    pub(super) fn rare(&self) -> u32 {
        self.rare_in_stripe.iter().sum()
    }

    pub(super) fn fill(&mut self, now: Instant) {
        let usable: Vec<SourceId> = (0..self.sources.len())
            .filter(|&s| self.sources[s].usable(now))
            .collect();
        // Each source's window (in a crowd with a lower floor: see LEAN_WINDOW), and what the
        // links hold (rate × RTT) for the global cap.
        let crowd = self.in_a_crowd();
        let floor = if crowd {
            LEAN_WINDOW.min(self.opts.min_window)
        } else {
            self.opts.min_window
        };
        // Asks do not change which chunks only seeders hold.
        let rare_left = crowd && self.rare() > 0;
        let mut on_the_wire = 0.0;
        for &s in &usable {
            let src = &mut self.sources[s];
            src.resize(&self.opts, self.chunk_size, floor);
            on_the_wire += src.rate * src.rtt.unwrap_or_default().as_secs_f64();
        }
        let mut in_flight_bytes: u64 = self.sources.iter().map(|s| s.in_flight_bytes).sum();
        let cap = self.opts.max_in_flight_bytes
            + (on_the_wire as u64).min(self.opts.max_on_the_wire_bytes);
        let mut open = usable.clone();
        while !open.is_empty() {
            open.retain(|&s| self.sources[s].in_flight.len() < self.sources[s].window);
            let mut assigned = Vec::new();
            for &s in &open {
                // The global cap; a source with nothing in flight may always ask for one chunk.
                let next_len = self
                    .pending
                    .first()
                    .map_or(self.chunk_size, |&Slot { chunk: c, .. }| self.chunk_len(c));
                if in_flight_bytes + next_len > cap && !self.sources[s].in_flight.is_empty() {
                    continue;
                }
                // Endgame: only a source with nothing in flight duplicates, one chunk at a time.
                // In a crowd, while chunks remain that only seeders hold, a seeder is asked for
                // those alone: its bandwidth is what brings new chunks to the crowd, and what
                // others hold comes from them.
                // (Never when nothing at all is in flight: better a duplicate than a stall.)
                let rare_only =
                    rare_left && self.sources[s].holds.is_full() && !self.requests.is_empty();
                let Some(c) = self
                    .take_pending(s, &usable, rare_only)
                    .or_else(|| rare_only.then(|| self.take_help(s)).flatten())
                    .or_else(|| {
                        self.sources[s]
                            .in_flight
                            .is_empty()
                            .then(|| self.pick_duplicate(s, now))
                            .flatten()
                    })
                else {
                    continue;
                };
                assigned.push(s);
                in_flight_bytes += self.ask(s, c, now);
            }
            open = assigned;
        }
    }

    /// Records a request of chunk `c` from source `s`; returns its length.
    pub(super) fn ask(&mut self, s: SourceId, c: u32, now: Instant) -> u64 {
        let request = self.next_request;
        self.next_request += 1;
        let len = self.chunk_len(c);
        self.chunks[c as usize].fetching += 1;
        self.requests.insert(
            request,
            InFlight {
                source: s,
                chunk: c,
                asked: now,
                arrived: false,
            },
        );
        let src = &mut self.sources[s];
        if src.in_flight.is_empty() {
            src.busy_since = now;
        }
        src.in_flight.insert(request, c);
        src.in_flight_bytes += len;
        self.actions.push(Action::Ask {
            request,
            source: s,
            chunk: c,
            offset: u64::from(c) * self.chunk_size,
            // Chunks are at most `manifest::MAX_CHUNK_SIZE` (64 MiB), so the length fits.
            len: u32::try_from(len).unwrap_or(u32::MAX),
        });
        len
    }

    /// The next pending chunk for source `s` (a rare one, if `rare_only`): the first in the
    /// queue's order that it holds and has not already failed, or, if every usable source holding it has failed it, that one
    /// anyway (better a retry than a stall).
    pub(super) fn take_pending(
        &mut self,
        s: SourceId,
        usable: &[SourceId],
        rare_only: bool,
    ) -> Option<u32> {
        let holds = &self.sources[s].holds;
        let slot = *self.pending.iter().find(|&&Slot { chunk: c, .. }| {
            let ours = self.stripe_of(c) == 0;
            if !holds.contains(c) || (rare_only && !(ours && self.is_rare(c))) {
                return false;
            }
            let failed = self.chunks[c as usize].failed_by;
            let holders = usable
                .iter()
                .filter(|&&l| self.sources[l].holds.contains(c))
                .fold(0u64, |acc, &l| acc | bit(l));
            failed & bit(s) == 0 || failed & holders == holders
        })?;
        self.pending.remove(&slot);
        let c = slot.chunk;
        self.chunks[c as usize].queued = false;
        Some(c)
    }
}

/// A pending chunk's place in the queue, ordered field by field: chunks not retried after retried
/// ones, then by the live sources holding it (rarest first), how far its stripe is after ours, its
/// rank in that stripe's order, and the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Slot {
    pub(super) fresh: bool,
    pub(super) avail: u32,
    pub(super) stripe: u32,
    pub(super) rank: u32,
    pub(super) chunk: u32,
}

/// Ranks for `n` chunks: file order, or a random order drawn from `seed`.
pub(super) fn order(n: u32, seed: Option<u64>) -> Vec<u32> {
    let mut rank: Vec<u32> = (0..n).collect();
    if let Some(seed) = seed {
        fastrand::Rng::with_seed(seed).shuffle(&mut rank);
    }
    rank
}
