//! The download scheduler: which source is asked for which chunk, and when. Pure policy.
//!
//! A [`Scheduler`] is a state machine in the shape of quinn-proto: no I/O, no tasks, no clock
//! reads. The driver (`download::run`) tells it what happened with [`Scheduler::handle`] (a request
//! arrived, was verified, was corrupt, failed; a source's RTT or holdings changed) and when
//! ([`Instant`]s are passed in), adds sources as they join ([`Scheduler::add_source`]), and carries
//! out the [`Action`]s [`Scheduler::poll`] returns: ask a source for a chunk, verify or discard what
//! arrived, cancel a request. [`Scheduler::next_deadline`] says when to poll again if nothing
//! happens first. Every hard case is therefore a test below in virtual time.
//!
//! Policy:
//! - Pull scheduling: each usable source keeps up to its window of requests in flight and takes the
//!   next pending chunk it holds whenever one finishes, so faster sources do more. One request per
//!   source per pass, so a small file is spread over every source.
//! - Windows follow each source's delivery rate × (RTT + queue time), as libtorrent sizes its
//!   request queue; the bytes in flight across sources are capped (see [`Options`]).
//! - A corrupt chunk strikes its source and is asked of another; [`Options::max_strikes`] strikes
//!   drop the source. A failed or timed-out request puts the chunk back at the front of the queue;
//!   [`Options::max_failures`] failures in a row drop the source. A lost connection rests the source
//!   (doubling backoff, [`Options::max_reconnects`] times) before it is asked again.
//! - Endgame: once nothing is pending, a source with nothing in flight duplicates the chunk in
//!   flight elsewhere that is expected to arrive last; the first verified copy wins and the other
//!   copies are cancelled.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

pub use crate::model::manifest::ChunkSet;

mod endgame;
mod events;
mod picking;
mod stripes;
mod windows;

use picking::{Slot, order};
use stripes::{Helped, Stripe, seed_of};
use windows::SourceState;

/// A source, as numbered by [`Scheduler::add_source`] (in the order they joined).
pub type SourceId = usize;
/// One chunk request, numbered in the order asked.
pub type RequestId = u64;

/// Tuning of the scheduler.
///
/// Each source's window (chunk requests in flight, counting chunks still being verified and
/// written) follows its measured delivery rate and round-trip time, as libtorrent sizes its request
/// queue: `ceil(rate × (rtt + queue_time) / chunk) + 1`, within `min_window..=max_window`. Since
/// the window bounds the rate it measures, the margin lets it grow by a factor of
/// `(rtt + queue_time) / rtt` per adjustment until the link, not the window, is the limit. All
/// sources together never have more than `max_in_flight_bytes` in flight, plus what their links
/// hold (each source's rate × RTT, together at most `max_on_the_wire_bytes`): memory is bounded by
/// the first, long fat links are kept full by the second.
#[derive(Debug, Clone)]
pub struct Options {
    /// A fixed window for every source, instead of the adaptive one.
    pub fixed_window: Option<usize>,
    /// Smallest adaptive window (also the starting one), but in a crowd (see [`crowd_name`]),
    /// where the window is what the rate needs and at least 2 (or this, if smaller).
    ///
    /// [`crowd_name`]: Options::crowd_name
    pub min_window: usize,
    /// Largest adaptive window.
    pub max_window: usize,
    /// The margin of requests queued beyond one round trip, as time at the source's rate.
    pub queue_time: Duration,
    /// Cap on the bytes of all chunks in flight, across sources, not counting the bytes still on
    /// the wire (16 MiB keeps a 1 GiB loopback transfer, where nothing is on the wire for long,
    /// under 64 MiB of RSS at both ends).
    pub max_in_flight_bytes: u64,
    /// Most bytes added to that cap for data on the wire: the sum of each source's rate × RTT
    /// (without it, the cap alone held fast, distant sources back).
    pub max_on_the_wire_bytes: u64,
    /// Corrupt chunks a source may send before it is dropped.
    pub max_strikes: u32,
    /// Failed requests in a row before a source is dropped.
    pub max_failures: u32,
    /// Times a source whose connection is lost is given a rest and tried again (the source
    /// reconnects on its next request) before it is dropped.
    pub max_reconnects: u32,
    /// The first rest; each further one doubles it.
    pub reconnect_backoff: Duration,
    /// Longest one chunk request may take before it counts as failed.
    pub request_timeout: Duration,
    /// Most copies of one chunk in flight at once during the endgame.
    pub max_copies: u8,
    /// Chunks are asked for rarest first (held by the fewest sources), and among equally rare
    /// ones in a random order drawn from this seed, so that downloaders of one file, each with
    /// its own seed, soon hold different chunks to give each other (BitTorrent's rarest-first).
    /// `None`: in file order.
    pub order_seed: Option<u64>,
    /// Our own name among the sources, if we are one of a crowd downloading the file: the
    /// downloaders (sources still downloading, and we) split the chunks in stripes by their
    /// sorted names (chunk `c` is the stripe of the `c % n`th), and each asks first for its own
    /// stripe among equally rare chunks, in an order of its own, then for the next one's in
    /// the reverse of the rank order, and so on. Without a word exchanged, the seeder is then
    /// asked for each chunk by one downloader, which passes it on, instead of by several at
    /// once. Two downloaders that have not found each other yet (each sees part of the crowd)
    /// may take the same stripe for a moment, but start it in different orders: with the shared
    /// order they asked the seeder for the same first chunks.
    pub crowd_name: Option<String>,
    /// The peers that may be downloading the file too (they hold part of it, or none of it
    /// yet): until we find out who is, we ask first for the stripe we would have if they all
    /// were. A crowd starting at once then asks the seeder for different chunks from the first
    /// request on, instead of each asking for chunks that another's stripe holds (the seeder
    /// sent those twice: about a dozen of 256 at N = 8).
    pub crowd_hint: Vec<String>,
    /// How long a download waits with nothing to ask while sources that are still downloading
    /// may gain what is missing (the driver's rule; the scheduler only reports `Stuck`).
    pub stuck_wait: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            fixed_window: None,
            min_window: 4,
            max_window: 64,
            queue_time: Duration::from_millis(50),
            max_in_flight_bytes: 16 << 20,
            max_on_the_wire_bytes: 48 << 20,
            max_strikes: 3,
            max_failures: 4,
            max_reconnects: 3,
            reconnect_backoff: Duration::from_secs(1),
            request_timeout: Duration::from_secs(60),
            max_copies: 2,
            order_seed: None,
            crowd_name: None,
            crowd_hint: Vec::new(),
            stuck_wait: Duration::from_secs(30),
        }
    }
}

/// What the driver reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A source's current round-trip time (it sizes the window).
    Rtt {
        /// Which source.
        source: SourceId,
        /// Its RTT, if known.
        rtt: Option<Duration>,
    },
    /// The set of chunks a source holds changed.
    Holds {
        /// Which source.
        source: SourceId,
        /// What it holds now.
        chunks: ChunkSet,
    },
    /// A source left: it is asked for nothing more.
    Left {
        /// Which source.
        source: SourceId,
        /// Why, for the report.
        reason: String,
    },
    /// The bytes of a request arrived (answered with [`Action::Verify`] or [`Action::Discard`]).
    Arrived {
        /// Which request.
        request: RequestId,
    },
    /// The bytes of a request matched the manifest and are written.
    Verified {
        /// Which request.
        request: RequestId,
    },
    /// The bytes of a request did not match the manifest.
    Corrupt {
        /// Which request.
        request: RequestId,
    },
    /// A request failed.
    Failed {
        /// Which request.
        request: RequestId,
        /// Whether the source's connection is gone (it may come back), rather than this request
        /// alone failing.
        lost: bool,
        /// Why, for the report.
        reason: String,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask `source` for chunk `chunk` (`len` bytes at `offset`).
    Ask {
        /// The request's number, for the events about it.
        request: RequestId,
        /// Whom to ask.
        source: SourceId,
        /// Which chunk.
        chunk: u32,
        /// Its first byte.
        offset: u64,
        /// Its length.
        len: u32,
    },
    /// Verify and write the bytes that arrived for `request`, then report `Verified` or `Corrupt`.
    Verify {
        /// Which request.
        request: RequestId,
    },
    /// Drop the bytes that arrived for `request` (a copy not needed, or from a dropped source).
    Discard {
        /// Which request.
        request: RequestId,
    },
    /// Stop `request`; no event about it is expected any more.
    Cancel {
        /// Which request.
        request: RequestId,
    },
    /// `source` lost its connection: it is not asked until `until`.
    Rest {
        /// Which source.
        source: SourceId,
        /// When it may be asked again.
        until: Instant,
    },
    /// `source` is asked for nothing more.
    Drop {
        /// Which source.
        source: SourceId,
        /// Why.
        reason: String,
    },
}

/// Where a download stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Requests are in flight, or may be made.
    Running,
    /// Every chunk is verified and written (writes of duplicates may still be running).
    Finished,
    /// Nothing is in flight and no source can supply a missing chunk: only a source joining or a
    /// holdings change can help.
    Stuck,
}

/// What one source did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceReport {
    /// The source's name.
    pub name: String,
    /// Verified bytes it contributed (first copies only).
    pub bytes: u64,
    /// Verified chunks it contributed.
    pub chunks: u32,
    /// Chunks it sent that failed verification.
    pub corrupt: u32,
    /// Requests that failed (errors and timeouts).
    pub failures: u32,
    /// Why it was dropped, if it was.
    pub dropped: Option<String>,
    /// The largest window it was given.
    pub max_window: usize,
    /// Times it lost its connection and was tried again.
    pub reconnects: u32,
}

/// The totals of a download, for its report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Per source, in the order they joined.
    pub sources: Vec<SourceReport>,
    /// Verified bytes received but not needed (endgame duplicates).
    pub duplicate_bytes: u64,
    /// Chunks that had to be requested again (after a failure or a corrupt copy).
    pub retried_chunks: u32,
    /// Bytes already present before the transfer.
    pub resumed_bytes: u64,
}

#[derive(Debug, Default)]
struct ChunkState {
    done: bool,
    queued: bool,
    /// Asked for again after a failure: it goes before the others.
    retried: bool,
    /// Live sources that hold it.
    avail: u32,
    /// Copies asked for and not yet arrived.
    fetching: u8,
    /// Copies arrived and being verified.
    checking: u8,
    /// Sources (by bit, the first 64) that sent this chunk corrupt or failed it.
    failed_by: u64,
}

#[derive(Debug)]
struct InFlight {
    source: SourceId,
    chunk: u32,
    asked: Instant,
    arrived: bool,
}

/// The scheduling state of one download. See the module documentation.
#[derive(Debug)]
pub struct Scheduler {
    opts: Options,
    size: u64,
    chunk_size: u64,
    chunks: Vec<ChunkState>,
    /// The chunks to ask for, in the order to ask for them (see [`Scheduler::slot`]).
    pending: BTreeSet<Slot>,
    /// Each chunk's place among equally rare ones.
    rank: Vec<u32>,
    /// Our stripe of the chunks: see
    /// [`Options::crowd_name`].
    stripe: Stripe,
    /// Each chunk's place while we know of no crowd: an order of our own (from our name), so
    /// that downloaders that share `rank` but have not found each other yet do not start alike.
    alone: Vec<u32>,
    /// Live sources that hold every chunk (seeders).
    whole: u32,
    /// Chunks not done that only seeders hold, per stripe, by how far it is after ours (see
    /// `stripe_of`): while there are any, a crowd asks seeders for nothing else (see `fill`).
    rare_in_stripe: Vec<u32>,
    /// The crowd's names, sorted: stripe `k` is the `k`th's.
    crowd: Vec<String>,
    /// The stripe we last helped (see `take_help`).
    helped: Option<Helped>,
    remaining: u32,
    sources: Vec<SourceState>,
    requests: HashMap<RequestId, InFlight>,
    next_request: RequestId,
    actions: Vec<Action>,
    done_bytes: u64,
    totals: Totals,
}

impl Scheduler {
    /// A download of `size` bytes in chunks of `chunk_size`; chunk `i` is already present where
    /// `have[i]` is true.
    pub fn new(size: u64, chunk_size: u64, have: &[bool], opts: Options) -> Self {
        let chunk_size = chunk_size.max(1);
        let opts_seed = opts.order_seed;
        let start = match &opts.crowd_name {
            Some(me) => Some(seed_of(me)),
            None => opts_seed,
        };
        // An empty file has one empty chunk, as in `manifest`.
        let n = u32::try_from(size.div_ceil(chunk_size).max(1)).unwrap_or(u32::MAX);
        let mut s = Self {
            opts,
            size,
            chunk_size,
            chunks: (0..n).map(|_| ChunkState::default()).collect(),
            pending: BTreeSet::new(),
            rank: order(n, opts_seed),
            stripe: Stripe { place: 0, of: 1 },
            alone: order(n, start),
            whole: 0,
            rare_in_stripe: vec![0],
            crowd: Vec::new(),
            helped: None,
            remaining: n,
            sources: Vec::new(),
            requests: HashMap::new(),
            next_request: 0,
            actions: Vec::new(),
            done_bytes: 0,
            totals: Totals::default(),
        };
        for i in 0..n {
            if have.get(i as usize).copied().unwrap_or(false) {
                s.chunks[i as usize].done = true;
                s.remaining -= 1;
                s.totals.resumed_bytes += s.chunk_len(i);
            } else {
                s.enqueue(i);
            }
        }
        s.done_bytes = s.totals.resumed_bytes;
        s.recount_whole();
        s.guess_stripe();
        s
    }

    /// The number of chunks.
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// A new source holding `holds`; it is asked on the next [`poll`](Self::poll).
    pub fn add_source(&mut self, name: &str, holds: ChunkSet, now: Instant) -> SourceId {
        let holds = self.fit(holds);
        for c in holds.iter() {
            self.adjust_avail(c, true);
        }
        let downloading = !holds.is_full();
        let mut source = SourceState::new(name, holds, now);
        // One still downloading counts as gaining from the moment it joins.
        source.last_gain = downloading.then_some(now);
        self.sources.push(source);
        self.recount_whole();
        self.restripe(now);
        self.sources.len() - 1
    }

    /// `holds` if it is a set of this file's chunks, else the empty set.
    fn fit(&self, holds: ChunkSet) -> ChunkSet {
        if holds.len() == self.chunk_count() {
            holds
        } else {
            ChunkSet::none(self.chunk_count())
        }
    }

    /// Verified bytes so far (resumed ones included) and the file's size.
    pub fn progress(&self) -> (u64, u64) {
        (self.done_bytes, self.size)
    }

    /// Where the download stands.
    pub fn status(&self, now: Instant) -> RunState {
        if self.remaining == 0 {
            return RunState::Finished;
        }
        let resting = self.sources.iter().any(|s| s.live && !s.usable(now));
        if !self.requests.is_empty() || resting || !self.actions.is_empty() {
            return RunState::Running;
        }
        let supplied = self.pending.iter().any(|&Slot { chunk: c, .. }| {
            self.sources
                .iter()
                .any(|s| s.usable(now) && s.holds.contains(c))
        });
        if supplied {
            RunState::Running
        } else {
            RunState::Stuck
        }
    }

    /// Each source's reason for being no use: why it was dropped, else that it held nothing needed.
    pub fn failure_reasons(&self) -> Vec<(String, String)> {
        self.sources
            .iter()
            .map(|s| {
                let why = s
                    .report
                    .dropped
                    .clone()
                    .unwrap_or_else(|| "no usable chunks".into());
                (s.report.name.clone(), why)
            })
            .collect()
    }

    /// What happened, per source and in total.
    pub fn totals(&self) -> Totals {
        Totals {
            sources: self.sources.iter().map(|s| s.report.clone()).collect(),
            ..self.totals.clone()
        }
    }

    /// When to [`poll`](Self::poll) again if no event comes first: a resting source may be asked,
    /// or a request times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        let rest = self
            .sources
            .iter()
            .filter(|s| s.live)
            .filter_map(|s| s.resting_until);
        let timeouts = self
            .requests
            .values()
            .filter(|r| !r.arrived)
            .map(|r| r.asked + self.opts.request_timeout);
        rest.chain(timeouts).min()
    }

    fn chunk_len(&self, c: u32) -> u64 {
        let offset = u64::from(c) * self.chunk_size;
        self.chunk_size.min(self.size.saturating_sub(offset))
    }

    /// Takes in one event.
    pub fn handle(&mut self, now: Instant, event: Event) {
        match event {
            Event::Rtt { source, rtt } => {
                if let Some(s) = self.sources.get_mut(source) {
                    s.rtt = rtt;
                }
            }
            Event::Holds { source, chunks } => {
                let chunks = self.fit(chunks);
                let Some(s) = self.sources.get_mut(source) else {
                    return;
                };
                let old = std::mem::replace(&mut s.holds, chunks);
                if s.live {
                    let was_whole = old.is_full();
                    for c in old.changed(&self.sources[source].holds) {
                        let gained = self.sources[source].holds.contains(c);
                        if gained {
                            self.sources[source].last_gain = Some(now);
                        }
                        self.adjust_avail(c, gained);
                    }
                    if was_whole != self.sources[source].holds.is_full() {
                        self.recount_whole();
                    }
                    self.restripe(now);
                }
            }
            Event::Left { source, reason } => self.drop_source(source, reason),
            Event::Arrived { request } => self.arrived(request),
            Event::Verified { request } => self.verified(request, now),
            Event::Corrupt { request } => self.corrupt(request),
            Event::Failed {
                request,
                lost,
                reason,
            } => self.failed(request, lost, reason, now),
        }
    }

    /// Times out overdue requests and fills every usable source's window; returns what to do.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let overdue: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| !r.arrived && now >= r.asked + self.opts.request_timeout)
            .map(|(&id, _)| id)
            .collect();
        for id in overdue {
            let c = self.requests[&id].chunk;
            self.actions.push(Action::Cancel { request: id });
            let timeout = self.opts.request_timeout;
            self.failed(
                id,
                false,
                format!("chunk {c} timed out after {timeout:?}"),
                now,
            );
        }
        for src in &mut self.sources {
            if src.resting_until.is_some_and(|t| t <= now) {
                src.resting_until = None;
            }
        }
        self.restripe(now);
        if self.remaining > 0 {
            self.fill(now);
        }
        std::mem::take(&mut self.actions)
    }
}

fn bit(source: SourceId) -> u64 {
    if source < 64 { 1 << source } else { 0 }
}

#[cfg(test)]
mod tests;
