//! Crowd stripes: downloaders of one file that know of each other take a stripe of its chunks
//! each (chunk `c` is ours if `c % of == place`, by sorted name), so that they fetch different
//! chunks out of the seeders and trade the rest; once ours is out, we help the stripe furthest
//! behind.

use super::*;

/// A source still downloading counts as one of a crowd while it gained a chunk (or joined) this
/// recently: one that stopped (an interrupted download that is only served) takes no stripe.
pub(super) const CROWD_ACTIVE: Duration = Duration::from_secs(10);

/// A downloader helping another's stripe out of a seeder has at most this many of its chunks in
/// flight there (see `take_help`) ...
pub(super) const HELP: usize = 1;

/// ... and never takes one of the first this many its owner will ask for.
pub(super) const OWNER_AHEAD: usize = 4;

impl Scheduler {
    /// Puts the stripe we would have in a crowd of us and [`Options::crowd_hint`] first in our
    /// own order, its chunks in the same order among themselves.
    pub(super) fn guess_stripe(&mut self) {
        let Some(me) = &self.opts.crowd_name else {
            return;
        };
        let (_, Stripe { place: j, of: m }) =
            place(me, self.opts.crowd_hint.iter().map(String::as_str));
        if m < 2 {
            return;
        }
        let n = self.chunk_count();
        for c in 0..n {
            if c % m != j {
                self.alone[c as usize] = self.alone[c as usize].saturating_add(n);
            }
        }
        self.resort();
    }

    /// Finds our stripe again: we and the live sources still downloading that gained a chunk
    /// in the last [`CROWD_ACTIVE`] (one that stopped, an interrupted download, takes no
    /// stripe), by name. Re-sorts the queue if it moved.
    pub(super) fn restripe(&mut self, now: Instant) {
        let Some(me) = &self.opts.crowd_name else {
            return;
        };
        let active = self.sources.iter().filter(|s| {
            s.live
                && !s.holds.is_full()
                && s.last_gain
                    .is_some_and(|t| now.saturating_duration_since(t) < CROWD_ACTIVE)
        });
        let (crowd, stripe) = place(me, active.map(|s| s.report.name.as_str()));
        if crowd != self.crowd {
            self.crowd = crowd.into_iter().map(str::to_owned).collect();
        }
        if stripe != self.stripe {
            self.stripe = stripe;
            self.resort();
            self.recount_whole();
        }
    }

    /// How far chunk `c`'s stripe is after ours: 0 is ours, 1 the next downloader's, ...
    pub(super) fn stripe_of(&self, c: u32) -> u32 {
        let Stripe { place: j, of: m } = self.stripe;
        (c % m + m - j) % m
    }

    /// We know of other downloaders of the file.
    pub(super) fn in_a_crowd(&self) -> bool {
        self.opts.crowd_name.is_some() && self.stripe.of > 1
    }

    /// A chunk of another downloader's stripe for seeder `s` to send us, once ours has all come
    /// out of the seeders: of the stripe with the most chunks still held by seeders alone (the
    /// furthest behind), one its owner will ask for late. The seeder's link is what every
    /// downloader waits for, and once some stripes are out it has room; the owner of one behind
    /// gets it slowly (its own link is full of what the others send it), and the crowd would
    /// wait for its last chunks. We take the last in the owner's order of our share of the stripe
    /// (shares are fixed, so that helpers never take the same chunk), never one of the first
    /// [`OWNER_AHEAD`] (in flight at the owner, or soon), and at most [`HELP`] at a time.
    pub(super) fn take_help(&mut self, s: SourceId) -> Option<u32> {
        let Stripe { place: j, of: m } = self.stripe;
        let helping = self.sources[s]
            .in_flight
            .values()
            .filter(|&&c| self.stripe_of(c) != 0)
            .count();
        if self.rare_in_stripe.first() != Some(&0) || helping >= HELP {
            return None;
        }
        let (d, _) = (1..m)
            .map(|d| (d, self.rare_in_stripe[d as usize]))
            .filter(|&(_, n)| n as usize > OWNER_AHEAD)
            .max_by_key(|&(d, n)| (n, std::cmp::Reverse(d)))?;
        let owner = (j + d) % m;
        let name = self.crowd.get(owner as usize)?;
        if self.helped.as_ref().is_none_or(|h| {
            h.owner != *name
                || h.stripe
                    != Stripe {
                        place: owner,
                        of: m,
                    }
        }) {
            let order = order(self.chunk_count(), Some(seed_of(name)));
            let mut stripe: Vec<u32> = (owner..self.chunk_count()).step_by(m as usize).collect();
            stripe.sort_unstable_by_key(|&c| order[c as usize]);
            self.helped = Some(Helped {
                owner: name.clone(),
                stripe: Stripe {
                    place: owner,
                    of: m,
                },
                chunks: stripe,
            });
        }
        let stripe = &self.helped.as_ref()?.chunks;
        // The helpers share the stripe out by place in the owner's order: ours is every
        // (m - 1)th from the (r - 1)th on, so that no two take the same chunk.
        let r = (m - d) as usize;
        let c = stripe
            .iter()
            .enumerate()
            .rev()
            .filter(|&(at, &c)| at % (m as usize - 1) == r - 1 && self.is_rare(c))
            .map(|(_, &c)| c)
            .next()?;
        let soon = stripe
            .iter()
            .filter(|&&x| self.is_rare(x))
            .take(OWNER_AHEAD)
            .any(|&x| x == c);
        let st = &self.chunks[c as usize];
        if soon || !st.queued || st.failed_by & bit(s) != 0 {
            return None;
        }
        let slot = self.slot(c);
        self.pending.remove(&slot);
        self.chunks[c as usize].queued = false;
        Some(c)
    }
}

/// Another downloader's stripe that we help.
#[derive(Debug)]
pub(super) struct Helped {
    /// Its owner.
    pub(super) owner: String,
    /// The stripe.
    pub(super) stripe: Stripe,
    /// Its chunks, in the order its owner asks for them.
    pub(super) chunks: Vec<u32>,
}

/// Our stripe of a crowd's chunks: chunk `c` is ours if `c % of == place`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stripe {
    pub(super) place: u32,
    pub(super) of: u32,
}

/// The crowd of `me` and `others`, sorted by name, and our stripe in it: (our place, of how many).
pub(super) fn place<'a>(
    me: &'a str,
    others: impl Iterator<Item = &'a str>,
) -> (Vec<&'a str>, Stripe) {
    let mut crowd: Vec<&str> = others.chain([me]).collect();
    crowd.sort_unstable();
    crowd.dedup();
    let j = crowd.iter().position(|n| *n == me).unwrap_or(0) as u32;
    let m = crowd.len() as u32;
    (crowd, Stripe { place: j, of: m })
}

/// The seed of the order in which downloader `name` asks for its own stripe.
pub(super) fn seed_of(name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default())
}
