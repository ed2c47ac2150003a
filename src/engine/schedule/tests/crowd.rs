//! Rarity, order and crowds: which chunk each source is asked for, and when.

use super::*;

/// The chunks each source was asked for first, in order, with one request at a time each.
fn first_asks(opts: Options, holds: &[ChunkSet]) -> Vec<Vec<u32>> {
    let n = holds[0].len();
    let mut sim = Sim::new(u64::from(n) * MIB, MIB, opts);
    let ids: Vec<SourceId> = holds
        .iter()
        .enumerate()
        .map(|(k, h)| sim.partial_source(&format!("s{k}"), after(10), h.clone()))
        .collect();
    sim.run(MINUTE);
    ids.iter().map(|&id| sim.asked_of(id)).collect()
}

#[test]
fn the_rarest_chunks_go_first_and_equally_rare_ones_in_a_seeded_random_order() {
    let n = 64;
    let one = Options {
        fixed_window: Some(1),
        ..Options::default()
    };
    // A seeder holds everything, a peer still downloading holds the first half: the seeder
    // is asked for the second half (only it has those) before anything the peer could give.
    let mut half = ChunkSet::none(n);
    (0..n / 2).for_each(|c| half.insert(c));
    let asks = first_asks(one.clone(), &[ChunkSet::all(n), half.clone()]);
    assert!(asks[0][..8].iter().all(|&c| c >= n / 2), "{:?}", asks[0]);
    assert!(asks[1].iter().all(|&c| c < n / 2));
    // Without a seed, equally rare chunks go in file order; with one, in its own order,
    // the same for the same seed and different for another.
    let all = [ChunkSet::all(n)];
    let plain = first_asks(one.clone(), &all);
    assert_eq!(plain[0], (0..n).collect::<Vec<_>>());
    let seeded = |seed| {
        first_asks(
            Options {
                order_seed: Some(seed),
                ..one.clone()
            },
            &all,
        )
        .remove(0)
    };
    let (a, b) = (seeded(1), seeded(2));
    assert_eq!(a, seeded(1));
    assert_ne!(a, b);
    assert_ne!(a, plain[0]);
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, plain[0], "every chunk once");
}

/// The chunks asked of `source` among `actions`.
fn asked_of(actions: &[Action], source: SourceId) -> Vec<u32> {
    actions
        .iter()
        .filter_map(|a| match *a {
            Action::Ask {
                source: s, chunk, ..
            } if s == source => Some(chunk),
            _ => None,
        })
        .collect()
}

#[test]
fn in_a_crowd_the_seeder_is_asked_for_each_chunk_once_until_the_others_stop() {
    let n = 60;
    let t0 = Instant::now();
    let opts = |me: &str| Options {
        fixed_window: Some(n as usize),
        order_seed: Some(7),
        crowd_name: Some(me.into()),
        ..Options::default()
    };
    // Three downloaders, d1 holding chunk 0, d2 chunk 1, d3 chunk 2, each asking the seeder
    // s0 with the others as sources.
    let crowd = ["d1", "d2", "d3"];
    let mut asked: Vec<Vec<u32>> = Vec::new();
    for (k, me) in crowd.iter().enumerate() {
        let have: Vec<bool> = (0..n).map(|c| c == k as u32).collect();
        let mut sched = Scheduler::new(u64::from(n) << 16, 1 << 16, &have, opts(me));
        sched.add_source("s0", ChunkSet::all(n), t0);
        for (j, other) in crowd.iter().enumerate().filter(|&(j, _)| j != k) {
            let mut h = ChunkSet::none(n);
            h.insert(j as u32);
            sched.add_source(other, h, t0);
        }
        let asks = asked_of(&sched.poll(t0), 0);
        assert!(asks.len() >= n as usize / 6, "{me} has a stripe: {asks:?}");
        // The others gain nothing for a while: they are not downloading any more, and the
        // seeder is asked for the rest.
        let later = t0 + CROWD_ACTIVE + Duration::from_secs(1);
        let rest = asked_of(&sched.poll(later), 0);
        let all: HashSet<u32> = asks.iter().chain(&rest).copied().collect();
        assert!((3..n).all(|c| all.contains(&c)), "{me}: {asks:?} {rest:?}");
        asked.push(asks);
    }
    // Each chunk no one holds was asked of the seeder by exactly one of them, and none that
    // one of them holds.
    let mut each: Vec<u32> = asked.concat();
    each.sort_unstable();
    assert_eq!(each, (3..n).collect::<Vec<_>>());
}

#[test]
fn downloaders_that_see_part_of_the_crowd_start_on_different_chunks() {
    // d1 and d2 start at the same moment and each has found only d3 so far: they do not
    // know of each other, so both take the first stripe of two; still they must not ask
    // the seeder for the same first chunks (in the shared order they asked for the same
    // chunks in the same order).
    let n = 256;
    let t0 = Instant::now();
    let first = |me: &str| {
        let opts = Options {
            fixed_window: Some(4),
            order_seed: Some(7),
            crowd_name: Some(me.into()),
            ..Options::default()
        };
        let mut sched = Scheduler::new(u64::from(n) << 16, 1 << 16, &[], opts);
        sched.add_source("s0", ChunkSet::all(n), t0);
        sched.add_source("d3", ChunkSet::none(n), t0);
        asked_of(&sched.poll(t0), 0)
            .into_iter()
            .collect::<HashSet<u32>>()
    };
    let (a, b) = (first("d1"), first("d2"));
    assert_eq!((a.len(), b.len()), (4, 4));
    assert!(a.intersection(&b).count() <= 1, "{a:?} {b:?}");
}

#[test]
fn a_source_that_gains_chunks_makes_them_less_rare() {
    let n = 8;
    let mut sched = Scheduler::new(u64::from(n) * MIB, MIB, &[], Options::default());
    let t0 = Instant::now();
    sched.add_source("seeder", ChunkSet::all(n), t0);
    let peer = sched.add_source("peer", ChunkSet::none(n), t0);
    // Nothing shared yet: file order.
    assert_eq!(sched.pending.first().map(|s| s.chunk), Some(0));
    let mut low = ChunkSet::none(n);
    (0..6).for_each(|c| low.insert(c));
    sched.handle(
        t0,
        Event::Holds {
            source: peer,
            chunks: low,
        },
    );
    // Chunks 6 and 7 are the only ones held by one source now.
    let order: Vec<u32> = sched.pending.iter().map(|s| s.chunk).collect();
    assert_eq!(order, [6, 7, 0, 1, 2, 3, 4, 5]);
    sched.handle(
        t0,
        Event::Left {
            source: peer,
            reason: "gone".into(),
        },
    );
    let order: Vec<u32> = sched.pending.iter().map(|s| s.chunk).collect();
    assert_eq!(order, (0..n).collect::<Vec<_>>());
}

#[test]
fn a_source_that_leaves_has_its_requests_cancelled_and_asked_elsewhere() {
    let mut sim = Sim::new(8 * MIB, MIB, Options::default());
    let gone = sim.source("gone", after(1000));
    let ok = sim.source("ok", after(10));
    sim.poll();
    let asked = sim.asked_of(gone).len();
    assert!(asked > 0);
    sim.sched.handle(
        sim.now,
        Event::Left {
            source: gone,
            reason: "went away".into(),
        },
    );
    sim.poll();
    let cancels = sim
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::Cancel { .. }))
        .count();
    assert_eq!(cancels, asked);
    assert_eq!(sim.run(MINUTE), RunState::Finished);
    assert_eq!(sim.report(ok).bytes, 8 * MIB);
    assert_eq!(sim.report(gone).dropped.as_deref(), Some("went away"));
}

#[test]
fn when_every_source_fails_the_download_is_stuck_and_each_reason_is_named() {
    let opts = Options {
        reconnect_backoff: Duration::from_millis(1),
        ..Options::default()
    };
    let mut sim = Sim::new(4 * MIB, MIB, opts);
    sim.source(
        "a",
        Behaviour {
            lose_after: Some(0),
            ..after(1)
        },
    );
    sim.source(
        "b",
        Behaviour {
            lie: true,
            ..after(1)
        },
    );
    assert_eq!(sim.run(MINUTE), RunState::Stuck);
    assert_eq!(
        sim.sched.failure_reasons(),
        [
            ("a".to_owned(), "connection lost".to_owned()),
            ("b".to_owned(), "sent 3 corrupt chunks".to_owned())
        ]
    );
}

#[test]
fn chunks_already_present_are_not_asked_and_empty_files_finish_at_once() {
    let have: Vec<bool> = (0..8).map(|i| i % 2 == 0).collect();
    let mut sched = Scheduler::new(8 * MIB, MIB, &have, Options::default());
    let now = Instant::now();
    sched.add_source("a", ChunkSet::all(8), now);
    let asked: Vec<u32> = sched
        .poll(now)
        .into_iter()
        .filter_map(|a| match a {
            Action::Ask { chunk, .. } => Some(chunk),
            _ => None,
        })
        .collect();
    assert_eq!(asked, [1, 3, 5, 7]);
    assert_eq!(sched.progress(), (4 * MIB, 8 * MIB));
    // An empty file is one empty chunk.
    let mut empty = Scheduler::new(0, MIB, &[], Options::default());
    empty.add_source("a", ChunkSet::all(1), now);
    assert!(matches!(empty.poll(now)[..], [Action::Ask { len: 0, .. }]));
    assert_eq!(
        Scheduler::new(0, MIB, &[true], Options::default()).status(now),
        RunState::Finished
    );
}

#[test]
fn the_endgame_duplicates_the_chunk_expected_last() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut sched = Scheduler::new(4 * MIB, MIB, &[], Options::default());
    for name in ["fast", "slow", "idle"] {
        sched.add_source(name, ChunkSet::all(4), t0);
    }
    // Source 0 (10 MiB/s) was asked for chunks 2, 1, 0 in that order; source 1 (1 MiB/s)
    // for chunk 3 only; source 2 (idle) looks for a duplicate.
    sched.pending.clear();
    for (c, s, when) in [(2, 0, at(0)), (1, 0, at(1)), (0, 0, at(2)), (3, 1, at(0))] {
        sched.chunks[c as usize].queued = false;
        sched.ask(s, c, when);
    }
    sched.sources[0].rate = 10.0 * MIB as f64;
    sched.sources[1].rate = MIB as f64;
    let now = at(10);
    // The slow source's one chunk (expected in 1 s) before the fast one's last (0.3 s).
    assert_eq!(sched.pick_duplicate(2, now), Some(3));
    sched.chunks[3].fetching = 2;
    assert_eq!(sched.pick_duplicate(2, now), Some(0));
    // A source silent for longer than `STALL` is not expected to deliver: oldest first.
    sched.chunks[3].fetching = 1;
    let later = t0 + STALL * 2;
    assert_eq!(sched.pick_duplicate(2, later), Some(2));
    // Nothing the idle source itself failed.
    sched.chunks[2].failed_by |= bit(2);
    assert_eq!(sched.pick_duplicate(2, later), Some(1));
    // Nor a chunk it does not hold.
    sched.sources[2].holds = ChunkSet::none(4);
    assert_eq!(sched.pick_duplicate(2, later), None);
}

#[test]
fn in_a_crowd_a_peer_just_asked_is_not_duplicated_until_it_goes_silent() {
    // At the start of a crowd no source has delivered yet: a copy asked of one a moment ago
    // is on its way, and a second copy from another would waste both their links.
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let opts = Options {
        crowd_name: Some("d1".into()),
        ..Options::default()
    };
    let mut sched = Scheduler::new(4 * MIB, MIB, &[], opts);
    let mut first = ChunkSet::none(4);
    first.insert(0);
    let d2 = sched.add_source("d2", first.clone(), t0);
    let d3 = sched.add_source("d3", first, t0);
    assert!(sched.in_a_crowd());
    sched.pending.clear();
    sched.chunks[0].queued = false;
    // d2 was idle for a while (so long that, counted from when it joined, it would look
    // silent), then asked for chunk 0.
    let asked = t0 + STALL * 3;
    sched.ask(d2, 0, asked);
    let soon = asked + Duration::from_millis(300);
    assert_eq!(sched.pick_duplicate(d3, soon), None);
    // Silent for longer than `STALL` since it was asked: now d3 may bring a copy.
    assert_eq!(sched.pick_duplicate(d3, asked + STALL * 2), Some(0));
    // Outside a crowd the endgame does not wait for a source that never delivered.
    let mut alone = Scheduler::new(4 * MIB, MIB, &[], Options::default());
    alone.add_source("a", ChunkSet::all(4), t0);
    alone.add_source("b", ChunkSet::all(4), t0);
    alone.pending.clear();
    alone.chunks[0].queued = false;
    alone.ask(0, 0, at(0));
    assert_eq!(alone.pick_duplicate(1, at(300)), Some(0));
}

#[test]
fn in_a_crowd_requests_wait_with_us_not_queued_at_a_busy_peer() {
    // d2 is a busy relay: a short round trip, but each chunk takes it a second. d3 gains the
    // same chunks a moment later. Asked for only what its rate needs (2 at first, not the
    // usual floor of 4), d2 leaves the rest for d3.
    let n = 12;
    let opts = |crowd: bool| Options {
        order_seed: Some(3),
        crowd_name: crowd.then(|| "d1".into()),
        ..Options::default()
    };
    let mut six = ChunkSet::none(n);
    (0..6).for_each(|c| six.insert(c));
    let run = |crowd: bool| {
        let mut sim = Sim::new(u64::from(n) * MIB, MIB, opts(crowd));
        let d2 = sim.partial_source("d2", after(1000), six.clone());
        let rtt = Some(Duration::from_millis(10));
        sim.sched.handle(sim.now, Event::Rtt { source: d2, rtt });
        let d3 = sim.partial_source("d3", after(100), ChunkSet::none(n));
        sim.poll();
        assert_eq!(sim.sched.in_a_crowd(), crowd);
        sim.now += Duration::from_millis(100);
        let chunks = six.clone();
        sim.sched
            .handle(sim.now, Event::Holds { source: d3, chunks });
        sim.run(Duration::from_millis(900));
        (sim.asked_of(d2).len(), sim.asked_of(d3).len())
    };
    assert_eq!(run(true), (2, 4));
    // Alone, a source starts with the usual window (and d3 soon copies what d2 is slow with).
    assert_eq!(run(false).0, 4);
}

/// In a crowd of `crowd` (sorted), `me` has its own stripe (`c % m`) and the others hold
/// theirs, but for `behind`, which holds nothing: what `me` asks the seeder for.
fn helps(crowd: &[&str], me: &str, behind: &str, n: u32) -> Vec<u32> {
    let t0 = Instant::now();
    let m = crowd.len() as u32;
    let stripe = |name: &str| crowd.iter().position(|c| *c == name).unwrap_or(0) as u32;
    let have: Vec<bool> = (0..n)
        .map(|c| c % m == stripe(me) && me != behind)
        .collect();
    let opts = Options {
        fixed_window: Some(2),
        order_seed: Some(7),
        crowd_name: Some(me.into()),
        ..Options::default()
    };
    let mut sched = Scheduler::new(u64::from(n) * MIB, MIB, &have, opts);
    for &other in crowd.iter().filter(|&&o| o != me) {
        let mut h = ChunkSet::none(n);
        if other != behind {
            (0..n)
                .filter(|c| c % m == stripe(other))
                .for_each(|c| h.insert(c));
        }
        sched.add_source(other, h, t0);
    }
    // (Last: the others are asked first, so that the seeder is not asked with nothing in
    // flight, when it may be asked for anything.)
    let seeder = sched.add_source("s0", ChunkSet::all(n), t0);
    assert_eq!(
        sched.stripe,
        Stripe {
            place: stripe(me),
            of: m
        }
    );
    asked_of(&sched.poll(t0), seeder)
}

#[test]
fn a_downloader_whose_stripe_is_out_helps_the_one_behind_with_chunks_its_owner_asks_late() {
    let crowd = ["d1", "d2", "d3", "d4"];
    let n = 128;
    // d2's stripe has not come out of the seeder yet; d1, d3 and d4 have theirs.
    let owner_order = order(n, Some(seed_of("d2")));
    let mut stripe: Vec<u32> = (1..n).step_by(4).collect();
    stripe.sort_unstable_by_key(|&c| owner_order[c as usize]);
    let first = &stripe[..OWNER_AHEAD];
    let mut taken = HashSet::new();
    for me in ["d1", "d3", "d4"] {
        let asks = helps(&crowd, me, "d2", n);
        // One chunk at a time, of d2's stripe, not one d2 asks for first.
        assert_eq!(asks.len(), HELP, "{me}: {asks:?}");
        let c = asks[0];
        assert_eq!(c % 4, 1, "{me} helps d2's stripe: {c}");
        assert!(
            !first.contains(&c),
            "{me} took {c}, among d2's first {first:?}"
        );
        // Late in d2's order: in the last quarter.
        let at = stripe.iter().position(|&x| x == c).unwrap_or(0);
        assert!(at >= stripe.len() * 3 / 4, "{me} took d2's {at}th");
        // And no two helpers take the same chunk.
        assert!(taken.insert(c), "{me} took {c} too");
    }
    // The owner itself asks for its own stripe from the start of its order.
    let own = helps(&crowd, "d2", "d2", n);
    assert_eq!(own, stripe[..2].to_vec());
}

#[test]
fn once_every_chunk_is_out_of_the_seeders_a_seeder_may_bring_a_copy() {
    // d1 has chunk 3; d2, still downloading, holds the rest and was just asked for chunk 0.
    let t0 = Instant::now();
    let soon = t0 + Duration::from_millis(300);
    let opts = Options {
        crowd_name: Some("d1".into()),
        ..Options::default()
    };
    let mut sched = Scheduler::new(4 * MIB, MIB, &[false, false, false, true], opts);
    let mut most = ChunkSet::none(4);
    (0..3).for_each(|c| most.insert(c));
    let d2 = sched.add_source("d2", most.clone(), t0);
    let d3 = sched.add_source("d3", most, t0);
    assert!(sched.in_a_crowd());
    sched.pending.clear();
    for c in 0..3 {
        sched.chunks[c as usize].queued = false;
        sched.ask(d2, c, t0);
    }
    // Another downloader is busy serving the crowd: no copy from it.
    assert_eq!(sched.pick_duplicate(d3, soon), None);
    // The seeder joins: chunks held by seeders alone are none, it has nothing else to send,
    // and it brings the copy expected last.
    let s0 = sched.add_source("s0", ChunkSet::all(4), t0);
    assert_eq!(sched.rare(), 0);
    assert_eq!(sched.pick_duplicate(s0, soon), Some(0));
    // While a chunk is still held by seeders alone, it does not.
    sched.chunks[3].done = false;
    sched.recount_whole();
    assert_eq!(sched.pick_duplicate(s0, soon), None);
}

#[test]
fn before_the_crowd_is_found_each_asks_for_the_stripe_the_hint_gives_it() {
    // d1..d4 start at once and know only the seeder: each first asks for the stripe it would
    // have in a crowd of the peers named in the hint, so they ask for different chunks.
    let n = 256;
    let t0 = Instant::now();
    let crowd = ["d1", "d2", "d3", "d4"];
    let mut all = HashSet::new();
    for (k, me) in crowd.iter().enumerate() {
        let opts = Options {
            fixed_window: Some(8),
            order_seed: Some(7),
            crowd_name: Some((*me).into()),
            crowd_hint: crowd.iter().map(|c| c.to_string()).collect(),
            ..Options::default()
        };
        let mut sched = Scheduler::new(u64::from(n) << 16, 1 << 16, &[], opts);
        sched.add_source("s0", ChunkSet::all(n), t0);
        assert!(!sched.in_a_crowd());
        let asks = asked_of(&sched.poll(t0), 0);
        assert_eq!(asks.len(), 8);
        assert!(asks.iter().all(|c| c % 4 == k as u32), "{me}: {asks:?}");
        all.extend(asks);
    }
    assert_eq!(all.len(), 32);
}

#[test]
fn chunk_sets_hold_exactly_their_members() {
    for len in [0, 1, 63, 64, 65, 130] {
        let all = ChunkSet::all(len);
        assert!(
            (0..len).all(|i| all.contains(i)) && !all.contains(len),
            "{len}"
        );
        let mut some = ChunkSet::none(len);
        some.insert(len.saturating_sub(1));
        some.insert(len + 5);
        assert_eq!(
            (0..len + 10).filter(|&i| some.contains(i)).count(),
            usize::from(len > 0)
        );
    }
}
