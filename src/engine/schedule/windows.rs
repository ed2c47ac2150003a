//! Each source's window: how many requests it keeps in flight, from its delivery rate and round
//! trip (as libtorrent sizes its request queue), and when its silence counts as a stall.

use super::*;

#[derive(Debug)]
pub(super) struct SourceState {
    pub(super) report: SourceReport,
    pub(super) live: bool,
    pub(super) holds: ChunkSet,
    pub(super) rtt: Option<Duration>,
    /// Its requests in flight (arrived ones until verified), in the order asked.
    pub(super) in_flight: BTreeMap<RequestId, u32>,
    pub(super) in_flight_bytes: u64,
    pub(super) failures_in_a_row: u32,
    /// Smoothed delivery rate in bytes per second (0 until measured).
    pub(super) rate: f64,
    /// Bytes delivered since `sample_start`.
    pub(super) sample_bytes: u64,
    pub(super) sample_start: Instant,
    /// When it last delivered a verified chunk (or joined).
    pub(super) last_delivery: Instant,
    /// When it was last asked for something while it had nothing in flight.
    pub(super) busy_since: Instant,
    /// When it last gained a chunk, if it is still downloading the file (a partial holder).
    pub(super) last_gain: Option<Instant>,
    pub(super) window: usize,
    /// Lost connections since it last delivered a chunk.
    pub(super) lost: u32,
    /// Not asked for anything until then (its connection was lost).
    pub(super) resting_until: Option<Instant>,
}

/// Silence after which a source with requests in flight counts as stalled (see `stalled`).
pub(super) const STALL: Duration = Duration::from_secs(1);

/// The smallest window of a source in a crowd: one chunk coming, one asked behind it. Every
/// source there is serving many downloaders and sends each its chunks in the order asked, so a
/// request queued behind others waits there even once other peers hold that chunk: at the end of
/// a crowd, the owner of the last chunks out of the seeder was asked for 4 each by 7 downloaders
/// (2 s of its link) while the peers it had sent them to stood idle. Left with us, a request goes
/// to whichever holder has room (measured in docs/performance.md).
pub(super) const LEAN_WINDOW: usize = 2;

/// How long a delivery-rate sample lasts before it updates the smoothed rate.
pub(super) const RATE_SAMPLE: Duration = Duration::from_millis(200);

impl SourceState {
    pub(super) fn new(name: &str, holds: ChunkSet, now: Instant) -> Self {
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

    pub(super) fn usable(&self, now: Instant) -> bool {
        self.live && self.resting_until.is_none_or(|t| t <= now)
    }

    pub(super) fn delivered(&mut self, bytes: u64, now: Instant) {
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
    pub(super) fn stalled(&self, chunk_size: u64, now: Instant) -> bool {
        let four_chunks = if self.rate > 0.0 {
            4.0 * chunk_size as f64 / self.rate
        } else {
            0.0
        };
        let silent = now.saturating_duration_since(self.last_delivery.max(self.busy_since));
        !self.in_flight.is_empty() && silent > STALL && silent.as_secs_f64() > four_chunks
    }

    /// Sizes the window from the rate and RTT, at least `floor` (`min_window`, or less in a crowd).
    pub(super) fn resize(&mut self, opts: &Options, chunk_size: u64, floor: usize) {
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
