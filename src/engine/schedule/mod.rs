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

#[derive(Debug)]
struct SourceState {
    report: SourceReport,
    live: bool,
    holds: ChunkSet,
    rtt: Option<Duration>,
    /// Its requests in flight (arrived ones until verified), in the order asked.
    in_flight: BTreeMap<RequestId, u32>,
    in_flight_bytes: u64,
    failures_in_a_row: u32,
    /// Smoothed delivery rate in bytes per second (0 until measured).
    rate: f64,
    /// Bytes delivered since `sample_start`.
    sample_bytes: u64,
    sample_start: Instant,
    /// When it last delivered a verified chunk (or joined).
    last_delivery: Instant,
    /// When it was last asked for something while it had nothing in flight.
    busy_since: Instant,
    /// When it last gained a chunk, if it is still downloading the file (a partial holder).
    last_gain: Option<Instant>,
    window: usize,
    /// Lost connections since it last delivered a chunk.
    lost: u32,
    /// Not asked for anything until then (its connection was lost).
    resting_until: Option<Instant>,
}

/// Silence after which a source with requests in flight counts as stalled (see `stalled`).
const STALL: Duration = Duration::from_secs(1);

/// A source still downloading counts as one of a crowd while it gained a chunk (or joined) this
/// recently: one that stopped (an interrupted download that is only served) takes no stripe.
const CROWD_ACTIVE: Duration = Duration::from_secs(10);

/// A downloader helping another's stripe out of a seeder has at most this many of its chunks in
/// flight there (see `take_help`) ...
const HELP: usize = 1;

/// ... and never takes one of the first this many its owner will ask for.
const OWNER_AHEAD: usize = 4;

/// The smallest window of a source in a crowd: one chunk coming, one asked behind it. Every
/// source there is serving many downloaders and sends each its chunks in the order asked, so a
/// request queued behind others waits there even once other peers hold that chunk: at the end of
/// a crowd, the owner of the last chunks out of the seeder was asked for 4 each by 7 downloaders
/// (2 s of its link) while the peers it had sent them to stood idle. Left with us, a request goes
/// to whichever holder has room (measured in docs/performance.md).
const LEAN_WINDOW: usize = 2;

/// How long a delivery-rate sample lasts before it updates the smoothed rate.
const RATE_SAMPLE: Duration = Duration::from_millis(200);

impl SourceState {
    fn new(name: &str, holds: ChunkSet, now: Instant) -> Self {
        Self {
            report: SourceReport {
                name: name.to_owned(),
                ..SourceReport::default()
            },
            live: true,
            holds,
            rtt: None,
            in_flight: BTreeMap::new(),
            in_flight_bytes: 0,
            failures_in_a_row: 0,
            rate: 0.0,
            sample_bytes: 0,
            sample_start: now,
            last_delivery: now,
            busy_since: now,
            last_gain: None,
            window: 0,
            lost: 0,
            resting_until: None,
        }
    }

    fn usable(&self, now: Instant) -> bool {
        self.live && self.resting_until.is_none_or(|t| t <= now)
    }

    fn delivered(&mut self, bytes: u64, now: Instant) {
        self.last_delivery = now;
        self.sample_bytes += bytes;
        let dt = now.saturating_duration_since(self.sample_start);
        if dt >= RATE_SAMPLE {
            let inst = self.sample_bytes as f64 / dt.as_secs_f64();
            // Rise at once, decay slowly: too small a window costs throughput, too large a
            // little memory (and the global cap bounds that).
            self.rate = inst.max(0.7 * self.rate + 0.3 * inst);
            self.sample_bytes = 0;
            self.sample_start = now;
        }
    }

    /// Asked for chunks but silent for longer than four chunks' time at its rate (and at least
    /// `STALL`; just `STALL` if it never delivered): whatever it holds is not expected soon.
    /// Silence counts from its last delivery or from when it was given work while idle, if later.
    fn stalled(&self, chunk_size: u64, now: Instant) -> bool {
        let four_chunks = if self.rate > 0.0 {
            4.0 * chunk_size as f64 / self.rate
        } else {
            0.0
        };
        let silent = now.saturating_duration_since(self.last_delivery.max(self.busy_since));
        !self.in_flight.is_empty() && silent > STALL && silent.as_secs_f64() > four_chunks
    }

    /// Sizes the window from the rate and RTT, at least `floor` (`min_window`, or less in a crowd).
    fn resize(&mut self, opts: &Options, chunk_size: u64, floor: usize) {
        self.window = match opts.fixed_window {
            Some(w) => w.max(1),
            None => {
                let horizon = self.rtt.unwrap_or_default() + opts.queue_time;
                let want =
                    (self.rate * horizon.as_secs_f64() / chunk_size as f64).ceil() as usize + 1;
                want.clamp(floor.max(1), opts.max_window.max(floor.max(1)))
            }
        };
        self.report.max_window = self.report.max_window.max(self.window);
    }
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
    /// The stripe we last helped (see `take_help`), in the order its owner asks for it: the
    /// owner, the stripe (of how many), its chunks.
    helped: Option<(String, (u32, u32), Vec<u32>)>,
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

    /// Puts the stripe we would have in a crowd of us and [`Options::crowd_hint`] first in our
    /// own order, its chunks in the same order among themselves.
    fn guess_stripe(&mut self) {
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

    /// Puts the queue in order again (what `slot` says changed).
    fn resort(&mut self) {
        let queued: Vec<u32> = self.pending.iter().map(|s| s.chunk).collect();
        self.pending = queued.into_iter().map(|c| self.slot(c)).collect();
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

    /// Finds our stripe again: we and the live sources still downloading that gained a chunk
    /// in the last [`CROWD_ACTIVE`] (one that stopped, an interrupted download, takes no
    /// stripe), by name. Re-sorts the queue if it moved.
    fn restripe(&mut self, now: Instant) {
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
    fn stripe_of(&self, c: u32) -> u32 {
        let Stripe { place: j, of: m } = self.stripe;
        (c % m + m - j) % m
    }

    /// We know of other downloaders of the file.
    fn in_a_crowd(&self) -> bool {
        self.opts.crowd_name.is_some() && self.stripe.of > 1
    }

    /// `holds` if it is a set of this file's chunks, else the empty set.
    fn fit(&self, holds: ChunkSet) -> ChunkSet {
        if holds.len() == self.chunk_count() {
            holds
        } else {
            ChunkSet::none(self.chunk_count())
        }
    }

    /// Where chunk `c` stands in the queue: retried chunks first, then the rarest, then our
    /// stripe in our own order, then the next downloader's stripe by the shared rank backwards,
    /// then the one after, and so on (so that the downloaders done with their own stripe help
    /// different ones).
    fn slot(&self, c: u32) -> Slot {
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

    fn enqueue(&mut self, c: u32) {
        self.chunks[c as usize].queued = true;
        self.pending.insert(self.slot(c));
    }

    /// One more (`gained`) or one fewer live source holds `c`.
    fn adjust_avail(&mut self, c: u32, gained: bool) {
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
    fn is_rare(&self, c: u32) -> bool {
        let st = &self.chunks[c as usize];
        !st.done && st.avail <= self.whole
    }

    /// Counts the seeders and the rare chunks again (a source joined, left, or became whole, or
    /// our stripe moved).
    fn recount_whole(&mut self) {
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
    fn count_rare(&mut self, c: u32, more: bool) {
        let stripe = self.stripe_of(c) as usize;
        let n = &mut self.rare_in_stripe[stripe];
        *n = if more { *n + 1 } else { n.saturating_sub(1) };
    }

    /// Chunks not done that only seeders hold.
    fn rare(&self) -> u32 {
        self.rare_in_stripe.iter().sum()
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

    /// Removes `request` from its source's window and its chunk's counts.
    fn finish_request(&mut self, request: RequestId) -> Option<InFlight> {
        let r = self.requests.remove(&request)?;
        let len = self.chunk_len(r.chunk);
        let src = &mut self.sources[r.source];
        src.in_flight.remove(&request);
        src.in_flight_bytes -= len;
        let st = &mut self.chunks[r.chunk as usize];
        if r.arrived {
            st.checking -= 1;
        } else {
            st.fetching -= 1;
        }
        Some(r)
    }

    /// Puts `c` back at the front of the queue if nothing else will bring it.
    fn requeue(&mut self, c: u32) {
        let st = &mut self.chunks[c as usize];
        if !st.done && !st.queued && st.fetching == 0 && st.checking == 0 {
            st.retried = true;
            self.enqueue(c);
            self.totals.retried_chunks += 1;
        }
    }

    fn arrived(&mut self, request: RequestId) {
        let Some(r) = self.requests.get_mut(&request) else {
            return;
        };
        if r.arrived {
            return;
        }
        let (source, chunk) = (r.source, r.chunk);
        let done = self.chunks[chunk as usize].done;
        if done || !self.sources[source].live {
            // Not needed, or from a source dropped as a liar.
            if done {
                self.totals.duplicate_bytes += self.chunk_len(chunk);
            }
            self.finish_request(request);
            self.requeue(chunk);
            self.actions.push(Action::Discard { request });
            return;
        }
        // The chunk keeps its source's window slot until it is verified and written, so a slow
        // disk slows the requests instead of piling up chunks in memory.
        r.arrived = true;
        let st = &mut self.chunks[chunk as usize];
        st.fetching -= 1;
        st.checking += 1;
        self.actions.push(Action::Verify { request });
    }

    fn verified(&mut self, request: RequestId, now: Instant) {
        let Some(r) = self.finish_request(request) else {
            return;
        };
        let len = self.chunk_len(r.chunk);
        if self.chunks[r.chunk as usize].done {
            self.totals.duplicate_bytes += len;
            return;
        }
        if self.is_rare(r.chunk) {
            self.count_rare(r.chunk, false);
        }
        self.chunks[r.chunk as usize].done = true;
        self.remaining -= 1;
        self.done_bytes += len;
        let src = &mut self.sources[r.source];
        src.report.bytes += len;
        src.report.chunks += 1;
        src.failures_in_a_row = 0;
        src.lost = 0;
        src.delivered(len, now);
        // The other copies are not needed any more.
        let copies: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, o)| o.chunk == r.chunk && !o.arrived)
            .map(|(&id, _)| id)
            .collect();
        for id in copies {
            self.finish_request(id);
            self.actions.push(Action::Cancel { request: id });
        }
    }

    fn corrupt(&mut self, request: RequestId) {
        let Some(r) = self.finish_request(request) else {
            return;
        };
        self.chunks[r.chunk as usize].failed_by |= bit(r.source);
        let src = &mut self.sources[r.source];
        src.report.corrupt += 1;
        if src.live && src.report.corrupt >= self.opts.max_strikes {
            let reason = format!("sent {} corrupt chunks", src.report.corrupt);
            self.drop_source(r.source, reason);
        }
        self.requeue(r.chunk);
    }

    fn failed(&mut self, request: RequestId, lost: bool, reason: String, now: Instant) {
        let Some(r) = self.finish_request(request) else {
            return;
        };
        let (s, c) = (r.source, r.chunk);
        if self.chunks[c as usize].done {
            return;
        }
        let opts = &self.opts;
        let src = &mut self.sources[s];
        src.report.failures += 1;
        src.failures_in_a_row += 1;
        // A lost connection says nothing about the chunk: after reconnecting, the source may take
        // it again. A timeout or an error answer does.
        if !lost {
            self.chunks[c as usize].failed_by |= bit(s);
        }
        let resting = src.resting_until.is_some_and(|t| t > now);
        if src.live && lost && !resting && src.lost < opts.max_reconnects {
            // Rest, then the source reconnects on its next request.
            let rest = opts.reconnect_backoff * 2u32.pow(src.lost.min(16));
            src.lost += 1;
            src.report.reconnects += 1;
            let until = now + rest;
            src.resting_until = Some(until);
            self.actions.push(Action::Rest { source: s, until });
        } else if src.live && !resting && (lost || src.failures_in_a_row >= opts.max_failures) {
            self.drop_source(s, reason);
        }
        self.requeue(c);
    }

    /// Stops asking `s`; its requests not yet arrived are cancelled and their chunks queued again.
    fn drop_source(&mut self, s: SourceId, reason: String) {
        let Some(src) = self.sources.get_mut(s) else {
            return;
        };
        if !src.live {
            return;
        }
        src.live = false;
        src.report.dropped = Some(reason.clone());
        self.actions.push(Action::Drop { source: s, reason });
        let held: Vec<u32> = self.sources[s].holds.iter().collect();
        for c in held {
            self.adjust_avail(c, false);
        }
        self.recount_whole();
        let asked: Vec<RequestId> = self.sources[s].in_flight.keys().copied().collect();
        for id in asked {
            if self.requests.get(&id).is_some_and(|r| !r.arrived)
                && let Some(r) = self.finish_request(id)
            {
                self.actions.push(Action::Cancel { request: id });
                self.requeue(r.chunk);
            }
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

    fn fill(&mut self, now: Instant) {
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
    fn ask(&mut self, s: SourceId, c: u32, now: Instant) -> u64 {
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
    fn take_pending(&mut self, s: SourceId, usable: &[SourceId], rare_only: bool) -> Option<u32> {
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

    /// A chunk of another downloader's stripe for seeder `s` to send us, once ours has all come
    /// out of the seeders: of the stripe with the most chunks still held by seeders alone (the
    /// furthest behind), one its owner will ask for late. The seeder's link is what every
    /// downloader waits for, and once some stripes are out it has room; the owner of one behind
    /// gets it slowly (its own link is full of what the others send it), and the crowd would
    /// wait for its last chunks. We take the last in the owner's order of our share of the stripe
    /// (shares are fixed, so that helpers never take the same chunk), never one of the first
    /// [`OWNER_AHEAD`] (in flight at the owner, or soon), and at most [`HELP`] at a time.
    fn take_help(&mut self, s: SourceId) -> Option<u32> {
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
        if self
            .helped
            .as_ref()
            .is_none_or(|(h, at, _)| h != name || *at != (owner, m))
        {
            let order = order(self.chunk_count(), Some(seed_of(name)));
            let mut stripe: Vec<u32> = (owner..self.chunk_count()).step_by(m as usize).collect();
            stripe.sort_unstable_by_key(|&c| order[c as usize]);
            self.helped = Some((name.clone(), (owner, m), stripe));
        }
        let (_, _, stripe) = self.helped.as_ref()?;
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

    /// An endgame duplicate for source `s`: of the chunks it holds that are in flight elsewhere,
    /// not yet being checked, below the copy limit and not failed by `s` (fewest copies first), the
    /// one expected to arrive last.
    ///
    /// Sources send chunks whole in the order asked, so a chunk waits for those asked of the same
    /// source before it: it is expected after `position × chunk / rate`. A source that has not
    /// delivered for a while (or never) is not expected to deliver at all, so its chunks come
    /// first; among those, the one asked longest ago.
    fn pick_duplicate(&self, s: SourceId, now: Instant) -> Option<u32> {
        // Per chunk in flight: when it is expected, its oldest copy's request (asked first), and
        // whether every copy is at a stalled source.
        let mut eta: HashMap<u32, (f64, RequestId, bool)> = HashMap::new();
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
                    .and_modify(|(e, a, q)| {
                        *e = e.min(secs);
                        *a = (*a).min(id);
                        *q &= stalled;
                    })
                    .or_insert((secs, id, stalled));
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
            .filter(|c| !crowd || eta[c].2)
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
                let (ea, eb) = (eta[&a], eta[&b]);
                self.chunks[a as usize]
                    .fetching
                    .cmp(&self.chunks[b as usize].fetching)
                    .then(eb.0.total_cmp(&ea.0))
                    .then(ea.1.cmp(&eb.1))
            })
    }
}

/// A pending chunk's place in the queue, ordered field by field: chunks not retried after retried
/// ones, then by the live sources holding it (rarest first), how far its stripe is after ours, its
/// rank in that stripe's order, and the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    fresh: bool,
    avail: u32,
    stripe: u32,
    rank: u32,
    chunk: u32,
}

/// Our stripe of a crowd's chunks: chunk `c` is ours if `c % of == place`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stripe {
    place: u32,
    of: u32,
}

/// The crowd of `me` and `others`, sorted by name, and our stripe in it: (our place, of how many).
fn place<'a>(me: &'a str, others: impl Iterator<Item = &'a str>) -> (Vec<&'a str>, Stripe) {
    let mut crowd: Vec<&str> = others.chain([me]).collect();
    crowd.sort_unstable();
    crowd.dedup();
    let j = crowd.iter().position(|n| *n == me).unwrap_or(0) as u32;
    let m = crowd.len() as u32;
    (crowd, Stripe { place: j, of: m })
}

/// The seed of the order in which downloader `name` asks for its own stripe.
fn seed_of(name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default())
}

/// Ranks for `n` chunks: file order, or a random order drawn from `seed`.
fn order(n: u32, seed: Option<u64>) -> Vec<u32> {
    let mut rank: Vec<u32> = (0..n).collect();
    if let Some(seed) = seed {
        fastrand::Rng::with_seed(seed).shuffle(&mut rank);
    }
    rank
}

fn bit(source: SourceId) -> u64 {
    if source < 64 { 1 << source } else { 0 }
}

#[cfg(test)]
mod tests;
