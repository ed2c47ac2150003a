use super::picking::*;
use super::stripes::*;
use super::windows::*;
use super::*;
use std::collections::{BTreeSet, HashSet};

const MIB: u64 = 1 << 20;

/// How a simulated source behaves.
#[derive(Debug, Clone, Default)]
struct Behaviour {
    /// Time from a request to its bytes arriving.
    delay: Duration,
    /// Never answer.
    hang: bool,
    /// Requests answered before the connection is "lost" ...
    lose_after: Option<usize>,
    /// ... until this many requests were made.
    recover_at: Option<usize>,
    /// Chunks sent corrupt.
    corrupt: HashSet<u32>,
    /// Every chunk sent corrupt.
    lie: bool,
}

fn after(ms: u64) -> Behaviour {
    Behaviour {
        delay: Duration::from_millis(ms),
        ..Behaviour::default()
    }
}

/// A download in virtual time: requests finish `delay` after they are asked; verification
/// takes no time. No sockets, no runtime, no files.
struct Sim {
    sched: Scheduler,
    now: Instant,
    start: Instant,
    behaviours: Vec<Behaviour>,
    served: Vec<usize>,
    /// Requests due, by when: (due, request, source, chunk).
    due: BTreeSet<(Instant, RequestId, SourceId, u32)>,
    /// Every request asked: (request, source, chunk, when).
    asked: Vec<(RequestId, SourceId, u32, Instant)>,
    /// Every action that was not an ask.
    log: Vec<(Instant, Action)>,
    /// Most bytes in flight at once.
    peak_bytes: u64,
    corrupt_pending: HashSet<RequestId>,
}

impl Sim {
    fn new(size: u64, chunk_size: u64, opts: Options) -> Self {
        let now = Instant::now();
        Self {
            sched: Scheduler::new(size, chunk_size, &[], opts),
            now,
            start: now,
            behaviours: Vec::new(),
            served: Vec::new(),
            due: BTreeSet::new(),
            asked: Vec::new(),
            log: Vec::new(),
            peak_bytes: 0,
            corrupt_pending: HashSet::new(),
        }
    }

    fn source(&mut self, name: &str, b: Behaviour) -> SourceId {
        self.partial_source(name, b, ChunkSet::all(self.sched.chunk_count()))
    }

    fn partial_source(&mut self, name: &str, b: Behaviour, holds: ChunkSet) -> SourceId {
        let rtt = Some(b.delay);
        self.behaviours.push(b);
        self.served.push(0);
        let id = self.sched.add_source(name, holds, self.now);
        self.sched.handle(self.now, Event::Rtt { source: id, rtt });
        id
    }

    fn poll(&mut self) {
        let actions = self.sched.poll(self.now);
        let bytes: u64 = self.sched.sources.iter().map(|s| s.in_flight_bytes).sum();
        self.peak_bytes = self.peak_bytes.max(bytes);
        for a in actions {
            match a {
                Action::Ask {
                    request,
                    source,
                    chunk,
                    ..
                } => {
                    self.asked.push((request, source, chunk, self.now));
                    let b = &self.behaviours[source];
                    if !b.hang {
                        let due = self.now + b.delay;
                        self.due.insert((due, request, source, chunk));
                    }
                }
                Action::Verify { request } => {
                    let corrupt = self.corrupt_pending.remove(&request);
                    let event = if corrupt {
                        Event::Corrupt { request }
                    } else {
                        Event::Verified { request }
                    };
                    self.sched.handle(self.now, event);
                    // Its consequences are in the next poll, in the same instant.
                    self.poll();
                }
                Action::Cancel { request } => {
                    self.due.retain(|d| d.1 != request);
                    self.log.push((self.now, a));
                }
                other => self.log.push((self.now, other)),
            }
        }
    }

    /// Runs until finished or stuck (or `limit` of virtual time); returns the status.
    fn run(&mut self, limit: Duration) -> RunState {
        loop {
            self.poll();
            let status = self.sched.status(self.now);
            if status != RunState::Running || self.now - self.start > limit {
                return status;
            }
            let next = self.due.first().map(|d| d.0);
            let wake = [next, self.sched.next_deadline()]
                .into_iter()
                .flatten()
                .min();
            let Some(wake) = wake else { return status };
            self.now = self.now.max(wake);
            while let Some(&d) = self.due.first().filter(|d| d.0 <= self.now) {
                self.due.remove(&d);
                self.deliver(d.1, d.2, d.3);
            }
        }
    }

    fn deliver(&mut self, request: RequestId, s: SourceId, chunk: u32) {
        let n = self.served[s];
        self.served[s] += 1;
        let b = &self.behaviours[s];
        if b.lose_after.is_some_and(|f| n >= f) && b.recover_at.is_none_or(|r| n < r) {
            let reason = "connection lost".into();
            let event = Event::Failed {
                request,
                lost: true,
                reason,
            };
            self.sched.handle(self.now, event);
            return;
        }
        if b.lie || b.corrupt.contains(&chunk) {
            self.corrupt_pending.insert(request);
        }
        self.sched.handle(self.now, Event::Arrived { request });
    }

    fn report(&self, s: SourceId) -> SourceReport {
        self.sched.totals().sources[s].clone()
    }

    fn asked_of(&self, s: SourceId) -> Vec<u32> {
        self.asked
            .iter()
            .filter(|a| a.1 == s)
            .map(|a| a.2)
            .collect()
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }
}

const MINUTE: Duration = Duration::from_secs(60);

#[test]
fn a_small_file_is_spread_over_every_source_at_once() {
    let mut sim = Sim::new(3 * MIB, MIB, Options::default());
    for name in ["a", "b", "c"] {
        sim.source(name, after(10));
    }
    sim.poll();
    let mut first: Vec<SourceId> = sim.asked.iter().map(|a| a.1).collect();
    first.sort_unstable();
    assert_eq!(first, [0, 1, 2], "one chunk each: {:?}", sim.asked);
    assert_eq!(sim.run(MINUTE), RunState::Finished);
    assert_eq!(sim.elapsed(), Duration::from_millis(10));
}

#[test]
fn faster_sources_do_more() {
    let opts = Options {
        fixed_window: Some(2),
        ..Options::default()
    };
    let mut sim = Sim::new(64 * MIB, MIB, opts);
    let slow = sim.source("slow", after(40));
    let fast = sim.source("fast", after(1));
    assert_eq!(sim.run(MINUTE), RunState::Finished);
    let (s, f) = (sim.report(slow), sim.report(fast));
    assert_eq!(s.bytes + f.bytes, 64 * MIB);
    assert!(f.bytes > 10 * s.bytes, "{s:?} {f:?}");
}

#[test]
fn a_source_that_dies_is_dropped_and_its_chunks_go_elsewhere() {
    let opts = Options {
        max_reconnects: 0,
        ..Options::default()
    };
    let mut sim = Sim::new(16 * MIB, MIB, opts);
    let dying = sim.source(
        "dying",
        Behaviour {
            lose_after: Some(3),
            ..after(5)
        },
    );
    let ok = sim.source("ok", after(5));
    assert_eq!(sim.run(MINUTE), RunState::Finished);
    let d = sim.report(dying);
    assert_eq!(d.dropped.as_deref(), Some("connection lost"));
    assert_eq!(d.bytes, 3 * MIB);
    assert_eq!(sim.report(ok).bytes, 13 * MIB);
    assert!(
        sim.log
            .iter()
            .any(|(_, a)| matches!(a, Action::Drop { source, .. } if *source == dying))
    );
}

#[test]
fn a_lost_connection_rests_the_source_with_doubling_backoff_and_it_is_used_again() {
    let opts = Options {
        reconnect_backoff: Duration::from_millis(100),
        fixed_window: Some(1),
        ..Options::default()
    };
    let mut sim = Sim::new(64 * MIB, MIB, opts);
    // Requests 2 and 3 fail ("lost" twice in a row), then it works again.
    let flaky = sim.source(
        "flaky",
        Behaviour {
            lose_after: Some(2),
            recover_at: Some(4),
            ..after(1)
        },
    );
    sim.source("slow", after(50));
    assert_eq!(sim.run(MINUTE), RunState::Finished);
    let rests: Vec<Duration> = sim
        .log
        .iter()
        .filter_map(|(at, a)| match a {
            Action::Rest { source, until } if *source == flaky => Some(*until - *at),
            _ => None,
        })
        .collect();
    assert_eq!(
        rests,
        [Duration::from_millis(100), Duration::from_millis(200)]
    );
    let r = sim.report(flaky);
    assert_eq!((r.reconnects, r.dropped.as_deref()), (2, None), "{r:?}");
    // Nothing was asked of it while it rested, and it did most of the work after.
    assert!(r.bytes > 40 * MIB, "{r:?}");
}

#[test]
fn corrupt_chunks_are_asked_elsewhere_and_a_liar_is_dropped_at_three_strikes() {
    let mut sim = Sim::new(8 * MIB, MIB, Options::default());
    let liar = sim.source(
        "liar",
        Behaviour {
            lie: true,
            ..after(1)
        },
    );
    let flaky = sim.source(
        "flaky",
        Behaviour {
            corrupt: [0, 5].into(),
            ..after(2)
        },
    );
    sim.source("good", after(3));
    assert_eq!(sim.run(MINUTE), RunState::Finished);
    let l = sim.report(liar);
    assert_eq!((l.bytes, l.corrupt), (0, 3));
    assert_eq!(l.dropped.as_deref(), Some("sent 3 corrupt chunks"));
    let f = sim.report(flaky);
    assert!(f.corrupt <= 2 && f.dropped.is_none(), "{f:?}");
    // A chunk the flaky source corrupted is not asked of it again.
    let asked = sim.asked_of(flaky);
    for c in [0, 5] {
        assert!(asked.iter().filter(|&&x| x == c).count() <= 1, "{asked:?}");
    }
    assert!(sim.sched.totals().retried_chunks >= 3);
}

#[test]
fn a_hanging_request_times_out_exactly_and_is_asked_elsewhere() {
    let opts = Options {
        request_timeout: Duration::from_secs(2),
        fixed_window: Some(1),
        ..Options::default()
    };
    let mut sim = Sim::new(2 * MIB, MIB, opts);
    let hung = sim.source(
        "hung",
        Behaviour {
            hang: true,
            ..after(1)
        },
    );
    // Slow enough that its endgame copy of the hung chunk arrives after the timeout.
    let ok = sim.source("ok", after(1500));
    assert_eq!(sim.run(MINUTE), RunState::Finished);
    let cancelled: Vec<Instant> = sim
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::Cancel { .. }))
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(
        cancelled.first(),
        Some(&(sim.start + Duration::from_secs(2)))
    );
    assert!(sim.report(hung).failures >= 1);
    assert_eq!(sim.report(ok).bytes, 2 * MIB);
}

#[test]
fn a_hanging_source_is_covered_by_the_endgame() {
    let opts = Options {
        request_timeout: Duration::from_secs(3600),
        ..Options::default()
    };
    let mut sim = Sim::new(4 * MIB, MIB, opts);
    let hung = sim.source(
        "hung",
        Behaviour {
            hang: true,
            ..after(1)
        },
    );
    let ok = sim.source("ok", after(10));
    assert_eq!(sim.run(MINUTE), RunState::Finished);
    assert_eq!(sim.report(hung).bytes, 0);
    assert_eq!(sim.report(ok).bytes, 4 * MIB);
    assert!(
        sim.elapsed() < Duration::from_secs(1),
        "{:?}",
        sim.elapsed()
    );
}

#[test]
fn the_window_grows_to_cover_a_long_round_trip() {
    let mut sim = Sim::new(64 * MIB, MIB, Options::default());
    let far = sim.source("far", after(100));
    assert_eq!(sim.run(MINUTE), RunState::Finished);
    // At the starting window (4 chunks per 100 ms) the transfer would take 1.6 s.
    assert!(sim.report(far).max_window > 8, "{:?}", sim.report(far));
    assert!(
        sim.elapsed() < Duration::from_millis(1200),
        "{:?}",
        sim.elapsed()
    );
}

#[test]
fn many_sources_share_the_in_flight_cap() {
    let opts = Options {
        max_in_flight_bytes: 4 * MIB,
        max_on_the_wire_bytes: 0,
        fixed_window: Some(8),
        ..Options::default()
    };
    let mut sim = Sim::new(32 * MIB, MIB, opts);
    for i in 0..3 {
        sim.source(&format!("s{i}"), after(20));
    }
    assert_eq!(sim.run(MINUTE), RunState::Finished);
    // The cap, or one more chunk for each source with none in flight (it may always ask).
    assert!(
        (4 * MIB..=7 * MIB).contains(&sim.peak_bytes),
        "{}",
        sim.peak_bytes
    );
}

#[test]
fn the_cap_grows_by_what_a_long_link_holds() {
    let opts = Options {
        max_in_flight_bytes: 2 * MIB,
        max_on_the_wire_bytes: 6 * MIB,
        fixed_window: Some(16),
        ..Options::default()
    };
    let mut sim = Sim::new(64 * MIB, MIB, opts);
    sim.source("far", after(100));
    assert_eq!(sim.run(MINUTE), RunState::Finished);
    assert_eq!(sim.peak_bytes, 8 * MIB, "2 MiB plus 6 MiB on the wire");
}

#[test]
fn budgets_count_a_chunks_real_length() {
    // One full chunk and a 1-byte last one: both fit a cap of one chunk plus one byte.
    let opts = Options {
        max_in_flight_bytes: MIB + 1,
        max_on_the_wire_bytes: 0,
        fixed_window: Some(4),
        ..Options::default()
    };
    let mut sim = Sim::new(MIB + 1, MIB, opts);
    sim.source("a", after(10));
    sim.poll();
    assert_eq!(sim.asked_of(0), [0, 1]);
    assert_eq!(sim.run(MINUTE), RunState::Finished);
}

#[test]
fn a_source_joining_late_is_used() {
    let mut sim = Sim::new(32 * MIB, MIB, Options::default());
    sim.source("slow", after(100));
    sim.poll();
    sim.now += Duration::from_millis(50);
    let late = sim.source("late", after(1));
    assert_eq!(sim.run(MINUTE), RunState::Finished);
    assert!(sim.report(late).bytes > 16 * MIB, "{:?}", sim.report(late));
}

#[test]
fn partial_holders_are_asked_only_for_what_they_hold_and_a_holdings_change_unsticks() {
    let n = 8;
    let mut evens = ChunkSet::none(n);
    for c in (0..n).step_by(2) {
        evens.insert(c);
    }
    let mut sim = Sim::new(u64::from(n) * MIB, MIB, Options::default());
    let half = sim.partial_source("half", after(1), evens);
    assert_eq!(sim.run(MINUTE), RunState::Stuck);
    assert!(sim.asked_of(half).iter().all(|c| c % 2 == 0));
    assert_eq!(sim.sched.progress().0, 4 * MIB);
    assert_eq!(
        sim.sched.failure_reasons(),
        [("half".to_owned(), "no usable chunks".to_owned())]
    );
    // It verified the odd chunks meanwhile (a peer still downloading).
    sim.sched.handle(
        sim.now,
        Event::Holds {
            source: half,
            chunks: ChunkSet::all(n),
        },
    );
    assert_eq!(sim.run(MINUTE), RunState::Finished);
    assert_eq!(sim.report(half).bytes, u64::from(n) * MIB);
}

mod crowd;
