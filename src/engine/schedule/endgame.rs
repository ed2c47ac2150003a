//! Endgame: once nothing is pending, a source with nothing in flight duplicates the chunk in
//! flight elsewhere that is expected to arrive last; the first verified copy wins.

use super::*;

impl Scheduler {
    /// An endgame duplicate for source `s`: of the chunks it holds that are in flight elsewhere,
    /// not yet being checked, below the copy limit and not failed by `s` (fewest copies first), the
    /// one expected to arrive last.
    ///
    /// Sources send chunks whole in the order asked, so a chunk waits for those asked of the same
    /// source before it: it is expected after `position × chunk / rate`. A source that has not
    /// delivered for a while (or never) is not expected to deliver at all, so its chunks come
    /// first; among those, the one asked longest ago.
    pub(super) fn pick_duplicate(&self, s: SourceId, now: Instant) -> Option<u32> {
        let mut eta: HashMap<u32, Expected> = HashMap::new();
        for src in &self.sources {
            let stalled = src.stalled(self.chunk_size, now);
            let per_chunk = if src.rate > 0.0 && !stalled {
                self.chunk_size as f64 / src.rate
            } else {
                f64::INFINITY
            };
            let queue = src
                .in_flight
                .iter()
                .filter(|&(id, _)| self.requests.get(id).is_some_and(|r| !r.arrived));
            for (k, (&id, &c)) in queue.enumerate() {
                let secs = (k + 1) as f64 * per_chunk;
                eta.entry(c)
                    .and_modify(|e| {
                        e.secs = e.secs.min(secs);
                        e.oldest = e.oldest.min(id);
                        e.all_stalled &= stalled;
                    })
                    .or_insert(Expected {
                        secs,
                        oldest: id,
                        all_stalled: stalled,
                    });
            }
        }
        let me = &self.sources[s];
        // In a crowd every source is busy serving many: a copy from one that delivers is
        // expected, and a duplicate would take the bandwidth another downloader needs; only
        // copies at sources that went silent are duplicated (not those at sources that have not
        // delivered yet because they were just asked: at the start, that is every source). Once
        // every chunk is out of the seeders, though, a seeder has nothing else to send: it may
        // be asked for a copy as anywhere else.
        let crowd = self.in_a_crowd() && !(me.holds.is_full() && self.rare() == 0);
        eta.keys()
            .copied()
            .filter(|c| !crowd || eta[c].all_stalled)
            .filter(|&c| {
                let st = &self.chunks[c as usize];
                me.holds.contains(c)
                    && !st.done
                    && st.checking == 0
                    && st.fetching < self.opts.max_copies
                    && st.failed_by & bit(s) == 0
                    && !me.in_flight.values().any(|&mine| mine == c)
            })
            .min_by(|&a, &b| {
                let (ea, eb) = (&eta[&a], &eta[&b]);
                self.chunks[a as usize]
                    .fetching
                    .cmp(&self.chunks[b as usize].fetching)
                    .then(eb.secs.total_cmp(&ea.secs))
                    .then(ea.oldest.cmp(&eb.oldest))
            })
    }
}

/// When a chunk in flight is expected, over all its copies.
#[derive(Debug, Clone, Copy)]
pub(super) struct Expected {
    /// Seconds until the first copy is expected.
    secs: f64,
    /// Its oldest copy's request (asked first).
    oldest: RequestId,
    /// Every copy is at a stalled source.
    all_stalled: bool,
}
