//! The download engine: several sources, one verified file.
//!
//! Peers are seen only through [`ChunkSource`], so every hard case (slow, dead, lying, different
//! version) is unit-tested in memory below and again end to end with real processes.
//!
//! How it works:
//! - [`agree`] groups the peers' manifests by file hash and picks one version; peers with another
//!   version are left out, so chunks of two versions are never mixed.
//! - [`run`] is pull scheduling: each live source keeps up to `window` chunk requests in flight and
//!   takes the next pending chunk whenever one finishes, so faster sources do more.
//! - Every chunk is verified against the manifest off the async workers (`spawn_blocking`) and
//!   written at its offset in the [`PartialFile`]. A bad chunk strikes its source and is fetched
//!   again from another; [`Options::max_strikes`] strikes drop the source. A failed request puts the
//!   chunk back at the front of the queue; a source whose connection is gone, or that fails
//!   [`Options::max_failures`] requests in a row, is dropped.
//! - Endgame: once nothing is pending, idle sources duplicate chunks still in flight elsewhere; the
//!   first verified copy wins and the others are cancelled.
//!
//! This module does no printing and names no network types.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::manifest::{Hash32, Manifest};
use crate::store::{PartialFile, StoreError};

/// A failed chunk request.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    /// What happened.
    pub message: String,
    /// Whether the source is unusable from now on (its connection is gone).
    pub fatal: bool,
}

/// Something chunks can be read from: a peer, or an in-memory fake in tests.
pub trait ChunkSource: Send + Sync + 'static {
    /// A name for reports (the peer ID).
    fn name(&self) -> &str;

    /// Reads chunk `index`: `len` bytes at `offset`. The engine verifies what comes back.
    fn read_chunk(
        &self,
        index: u32,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, SourceError>> + Send;

    /// The current round-trip time to the source, if known; it sizes the request window.
    fn rtt(&self) -> Option<Duration> {
        None
    }
}

/// Tuning of [`run`].
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
    /// Smallest adaptive window (also the starting one).
    pub min_window: usize,
    /// Largest adaptive window.
    pub max_window: usize,
    /// The margin of requests queued beyond one round trip, as time at the source's rate.
    pub queue_time: Duration,
    /// Cap on the bytes of all chunks in flight, across sources, not counting the bytes still on
    /// the wire (16 MiB keeps a 1 GiB loopback transfer, where nothing is on the wire for long,
    /// under 64 MiB of RSS at both ends).
    pub max_in_flight_bytes: u64,
    /// Most bytes added to that cap for data on the wire: the sum of each source's rate × RTT.
    /// Measured with 3 sources at 400 Mbit/s and 100 ms (cargo bench, `long`): a 16 MiB cap
    /// alone held them to 75 MB/s; with this (48 MiB) 104 MB/s, downloader peak RSS 32 MB.
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
        }
    }
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

/// What a download did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadReport {
    /// Bytes in the file.
    pub size: u64,
    /// Per source, in the order given.
    pub sources: Vec<SourceReport>,
    /// Wall time of the transfer.
    pub elapsed: Duration,
    /// Verified bytes received but not needed (endgame duplicates).
    pub duplicate_bytes: u64,
    /// Chunks that had to be requested again (after a failure or a corrupt copy).
    pub retried_chunks: u32,
    /// Bytes already present and verified before the transfer (resumed).
    pub resumed_bytes: u64,
}

/// Progress, reported after every verified chunk.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Verified bytes so far.
    pub done: u64,
    /// Bytes in the file.
    pub total: u64,
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Every source failed or was dropped; each with its reason.
    #[error("every peer failed: {}", .0.iter().map(|(n, e)| format!("{n}: {e}")).collect::<Vec<_>>().join("; "))]
    AllSourcesFailed(Vec<(String, String)>),
    /// Writing the file failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A task of the engine itself failed.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The outcome of comparing what several peers describe under one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// The version to download.
    pub manifest: Manifest,
    /// Indexes (into the input) of the peers that serve exactly it.
    pub members: Vec<usize>,
    /// Indexes of peers that serve another version, with its hash.
    pub other_versions: Vec<(usize, Hash32)>,
}

/// Picks the version to download: `wanted` if given, else the one most peers serve (ties go to the
/// version of the earliest peer). `None` when no peer serves a matching version.
pub fn agree(described: &[Option<Manifest>], wanted: Option<Hash32>) -> Option<Agreement> {
    let mut versions: Vec<(Hash32, Vec<usize>)> = Vec::new();
    for (i, m) in described.iter().enumerate() {
        let Some(m) = m else { continue };
        // Same hash and same size (the whole manifest follows from those two).
        match versions
            .iter_mut()
            .find(|(_, members)| described[members[0]].as_ref() == Some(m))
        {
            Some((_, members)) => members.push(i),
            None => versions.push((m.blake3(), vec![i])),
        }
    }
    let (_, members) = match wanted {
        Some(w) => versions.iter().find(|(h, _)| *h == w)?.clone(),
        // `max_by_key` keeps the last maximum; reversing keeps the earliest among equals.
        None => versions.iter().rev().max_by_key(|(_, m)| m.len())?.clone(),
    };
    let manifest = described[members[0]].clone()?;
    let other_versions = described
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            m.as_ref()
                .filter(|m| **m != manifest)
                .map(|m| (i, m.blake3()))
        })
        .collect();
    Some(Agreement {
        manifest,
        members,
        other_versions,
    })
}

#[derive(Debug, Default)]
struct ChunkState {
    done: bool,
    queued: bool,
    fetching: u8,
    checking: u8,
    /// Sources (by bit, the first 64) that sent this chunk corrupt or failed it.
    failed_by: u64,
    cancel: Option<CancellationToken>,
}

struct SourceState {
    report: SourceReport,
    live: bool,
    /// Chunks asked of it, with when they were asked (they arrive in that order).
    in_flight: HashMap<u32, Instant>,
    failures_in_a_row: u32,
    /// Smoothed delivery rate in bytes per second (0 until measured).
    rate: f64,
    /// Bytes delivered since `sample_start`.
    sample_bytes: u64,
    sample_start: Instant,
    /// When it last delivered a verified chunk (or started).
    last_delivery: Instant,
    window: usize,
    /// Lost connections since it last delivered a chunk.
    lost: u32,
    /// Not asked for anything until then (its connection was lost).
    resting_until: Option<Instant>,
}

/// Silence after which a source with requests in flight counts as stalled (see `stalled`).
const STALL: Duration = Duration::from_secs(1);

/// How long a delivery-rate sample lasts before it updates the smoothed rate.
const RATE_SAMPLE: Duration = Duration::from_millis(200);

impl SourceState {
    fn new(name: &str) -> Self {
        Self {
            report: SourceReport {
                name: name.to_owned(),
                ..SourceReport::default()
            },
            live: true,
            in_flight: HashMap::new(),
            failures_in_a_row: 0,
            rate: 0.0,
            sample_bytes: 0,
            sample_start: Instant::now(),
            last_delivery: Instant::now(),
            window: 0,
            lost: 0,
            resting_until: None,
        }
    }

    fn delivered(&mut self, bytes: u64) {
        self.last_delivery = Instant::now();
        self.sample_bytes += bytes;
        let dt = self.sample_start.elapsed();
        if dt >= RATE_SAMPLE {
            let inst = self.sample_bytes as f64 / dt.as_secs_f64();
            // Rise at once, decay slowly: too small a window costs throughput, too large a
            // little memory (and the global cap bounds that).
            self.rate = inst.max(0.7 * self.rate + 0.3 * inst);
            self.sample_bytes = 0;
            self.sample_start = Instant::now();
        }
    }

    /// Asked for chunks but silent for longer than four chunks' time at its rate (and at least
    /// `STALL`): whatever it holds is not expected soon.
    fn stalled(&self, chunk_size: u64) -> bool {
        let four_chunks = 4.0 * chunk_size as f64 / self.rate.max(1.0);
        let silent = self.last_delivery.elapsed();
        !self.in_flight.is_empty() && silent > STALL && silent.as_secs_f64() > four_chunks
    }

    fn resize(&mut self, opts: &Options, rtt: Option<Duration>, chunk_size: u64) {
        self.window = match opts.fixed_window {
            Some(w) => w.max(1),
            None => {
                let horizon = rtt.unwrap_or_default() + opts.queue_time;
                let want =
                    (self.rate * horizon.as_secs_f64() / chunk_size as f64).ceil() as usize + 1;
                want.clamp(
                    opts.min_window.max(1),
                    opts.max_window.max(opts.min_window.max(1)),
                )
            }
        };
        self.report.max_window = self.report.max_window.max(self.window);
    }
}

type FetchResult = (usize, u32, Result<Bytes, SourceError>);
type CheckResult = (usize, u32, u64, Result<bool, StoreError>);

/// Downloads every chunk of `manifest` that `have` does not mark as present from `sources` into
/// `out`, verifying each.
///
/// On success every chunk is in `out` and no task holds it any more, so the caller can unwrap its
/// `Arc` and [`PartialFile::commit`] it. Fails only when no source can supply the missing chunks.
pub async fn run<S: ChunkSource>(
    manifest: Arc<Manifest>,
    sources: Vec<Arc<S>>,
    out: Arc<PartialFile>,
    have: &[bool],
    opts: &Options,
    mut progress: impl FnMut(Progress),
) -> Result<DownloadReport, DownloadError> {
    let started = Instant::now();
    let n = manifest.chunk_count();
    let mut chunks: Vec<ChunkState> = (0..n).map(|_| ChunkState::default()).collect();
    let mut pending: VecDeque<u32> = VecDeque::new();
    let mut remaining = n;
    let mut resumed_bytes = 0u64;
    for (i, c) in chunks.iter_mut().enumerate() {
        if have.get(i).copied().unwrap_or(false) {
            c.done = true;
            remaining -= 1;
            resumed_bytes += manifest.chunk_len(i as u32).unwrap_or(0);
        } else {
            c.queued = true;
            pending.push_back(i as u32);
        }
    }
    let mut outstanding: BTreeSet<u32> = BTreeSet::new();
    let mut srcs: Vec<SourceState> = sources.iter().map(|s| SourceState::new(s.name())).collect();
    let mut done_bytes = resumed_bytes;
    let mut duplicate_bytes = 0u64;
    let mut retried = 0u32;
    let mut fetches: FuturesUnordered<std::pin::Pin<Box<dyn Future<Output = FetchResult> + Send>>> =
        FuturesUnordered::new();
    let mut checks: JoinSet<CheckResult> = JoinSet::new();

    let requeue =
        |c: u32, chunks: &mut Vec<ChunkState>, pending: &mut VecDeque<u32>, retried: &mut u32| {
            let st = &mut chunks[c as usize];
            if !st.done && !st.queued && st.fetching == 0 && st.checking == 0 {
                st.queued = true;
                pending.push_front(c);
                *retried += 1;
            }
        };

    while remaining > 0 {
        // Fill every live source's window: pending chunks first, then endgame duplicates.
        // One request per source per pass, so a small file is spread over every source.
        let now = Instant::now();
        for src in &mut srcs {
            if src.resting_until.is_some_and(|t| t <= now) {
                src.resting_until = None;
            }
        }
        let live: Vec<usize> = (0..srcs.len())
            .filter(|&s| srcs[s].live && srcs[s].resting_until.is_none())
            .collect();
        let next_wake = srcs
            .iter()
            .filter(|s| s.live)
            .filter_map(|s| s.resting_until)
            .min();
        // Each source's window, and what the links hold (rate × RTT) for the global cap.
        let mut on_the_wire = 0.0;
        for &s in &live {
            let rtt = sources[s].rtt();
            srcs[s].resize(opts, rtt, manifest.chunk_size());
            on_the_wire += srcs[s].rate * rtt.unwrap_or_default().as_secs_f64();
        }
        let mut in_flight_bytes: u64 =
            srcs.iter().map(|s| s.in_flight.len() as u64).sum::<u64>() * manifest.chunk_size();
        let cap = opts.max_in_flight_bytes + (on_the_wire as u64).min(opts.max_on_the_wire_bytes);
        let mut open: Vec<usize> = live.clone();
        while !open.is_empty() {
            open.retain(|&s| srcs[s].in_flight.len() < srcs[s].window);
            let mut assigned = Vec::new();
            for &s in &open {
                // The global cap; a source with nothing in flight may always ask for one chunk.
                if in_flight_bytes + manifest.chunk_size() > cap && !srcs[s].in_flight.is_empty() {
                    continue;
                }
                // Endgame: only a source with nothing in flight duplicates, one chunk at a time.
                let Some(c) = take_pending(s, &live, &mut pending, &mut chunks).or_else(|| {
                    srcs[s]
                        .in_flight
                        .is_empty()
                        .then(|| {
                            pick_duplicate(
                                s,
                                &outstanding,
                                &chunks,
                                &srcs,
                                manifest.chunk_size(),
                                opts.max_copies,
                            )
                        })
                        .flatten()
                }) else {
                    continue;
                };
                assigned.push(s);
                let st = &mut chunks[c as usize];
                st.fetching += 1;
                let cancel = st.cancel.get_or_insert_with(CancellationToken::new).clone();
                outstanding.insert(c);
                srcs[s].in_flight.insert(c, Instant::now());
                in_flight_bytes += manifest.chunk_size();
                let source = sources[s].clone();
                let offset = manifest.chunk_offset(c);
                // Chunks are at most MAX_CHUNK_SIZE (64 MiB), so the length fits in u32.
                let len = manifest.chunk_len(c).unwrap_or(0) as u32;
                let timeout = opts.request_timeout;
                fetches.push(Box::pin(async move {
                    let result = tokio::select! {
                        r = tokio::time::timeout(timeout, source.read_chunk(c, offset, len)) => match r {
                            Ok(r) => r,
                            Err(_) => Err(SourceError { message: format!("chunk {c} timed out after {timeout:?}"), fatal: false }),
                        },
                        () = cancel.cancelled() => Err(SourceError { message: "cancelled".into(), fatal: false }),
                    };
                    (s, c, result)
                }));
            }
            open = assigned;
        }
        if fetches.is_empty() && checks.is_empty() {
            if let Some(wake) = next_wake {
                // Only resting sources are left: wait for the first to be tried again.
                tokio::time::sleep_until(wake.into()).await;
                continue;
            }
            let reasons = srcs
                .iter()
                .map(|s| {
                    let why = s
                        .report
                        .dropped
                        .clone()
                        .unwrap_or_else(|| "no usable chunks".into());
                    (s.report.name.clone(), why)
                })
                .collect();
            return Err(DownloadError::AllSourcesFailed(reasons));
        }

        tokio::select! {
            // A resting source may be asked again.
            () = tokio::time::sleep_until(next_wake.unwrap_or(now).into()), if next_wake.is_some() => {}
            Some((s, c, result)) = fetches.next(), if !fetches.is_empty() => {
                let st = &mut chunks[c as usize];
                st.fetching -= 1;
                if st.fetching == 0 {
                    outstanding.remove(&c);
                }
                // A chunk keeps its source's window slot until it is verified and written, so a
                // slow disk slows the requests instead of piling up chunks in memory.
                let keep_slot = result.is_ok() && !st.done && srcs[s].live;
                if !keep_slot {
                    srcs[s].in_flight.remove(&c);
                }
                match result {
                    Ok(data) if st.done => duplicate_bytes += data.len() as u64,
                    Ok(data) if srcs[s].live => {
                        st.checking += 1;
                        let manifest = manifest.clone();
                        let out = out.clone();
                        // Hashing and the write run on the blocking pool: measured against doing
                        // them inline on this task (cargo bench, 1 GiB loopback, interleaved runs),
                        // 580-596 MB/s against 418-486 MB/s.
                        checks.spawn_blocking(move || {
                            let len = data.len() as u64;
                            if !manifest.verify_chunk(c, &data) {
                                return (s, c, len, Ok(false));
                            }
                            (s, c, len, out.write_at(manifest.chunk_offset(c), &data).map(|()| true))
                        });
                    }
                    // Data from a source already dropped as a liar is not used.
                    Ok(_) => requeue(c, &mut chunks, &mut pending, &mut retried),
                    Err(_) if st.done => {}
                    Err(e) => {
                        let src = &mut srcs[s];
                        src.report.failures += 1;
                        src.failures_in_a_row += 1;
                        // A lost connection says nothing about the chunk: after reconnecting, the
                        // source may take it again. A timeout or an error answer does.
                        if !e.fatal {
                            st.failed_by |= bit(s);
                        }
                        let resting = src.resting_until.is_some_and(|t| t > Instant::now());
                        if src.live && e.fatal && !resting && src.lost < opts.max_reconnects {
                            // Connection lost: rest, then the source reconnects on its next request.
                            let rest = opts.reconnect_backoff * 2u32.pow(src.lost.min(16));
                            src.lost += 1;
                            src.report.reconnects += 1;
                            src.resting_until = Some(Instant::now() + rest);
                            tracing::info!(source = %src.report.name, "connection lost; trying again in {rest:?}");
                        } else if src.live
                            && !resting
                            && (e.fatal || src.failures_in_a_row >= opts.max_failures)
                        {
                            src.live = false;
                            src.report.dropped = Some(e.message.clone());
                        }
                        tracing::debug!(source = %src.report.name, chunk = c, "request failed: {e}");
                        requeue(c, &mut chunks, &mut pending, &mut retried);
                    }
                }
            }
            Some(joined) = checks.join_next(), if !checks.is_empty() => {
                let (s, c, len, verdict) = joined.map_err(|e| DownloadError::Internal(e.to_string()))?;
                srcs[s].in_flight.remove(&c);
                let st = &mut chunks[c as usize];
                st.checking -= 1;
                match verdict? {
                    true if !st.done => {
                        st.done = true;
                        if let Some(cancel) = st.cancel.take() {
                            cancel.cancel();
                        }
                        remaining -= 1;
                        done_bytes += len;
                        let src = &mut srcs[s];
                        src.report.bytes += len;
                        src.report.chunks += 1;
                        src.failures_in_a_row = 0;
                        src.lost = 0;
                        src.delivered(len);
                        progress(Progress { done: done_bytes, total: manifest.size() });
                    }
                    true => duplicate_bytes += len,
                    false => {
                        st.failed_by |= bit(s);
                        let src = &mut srcs[s];
                        src.report.corrupt += 1;
                        tracing::warn!(source = %src.report.name, chunk = c, "chunk failed verification");
                        if src.live && src.report.corrupt >= opts.max_strikes {
                            src.live = false;
                            src.report.dropped = Some(format!("sent {} corrupt chunks", src.report.corrupt));
                        }
                        requeue(c, &mut chunks, &mut pending, &mut retried);
                    }
                }
            }
        }
    }

    // Cancel what is still in flight and let every write finish before handing the file back.
    drop(fetches);
    while let Some(joined) = checks.join_next().await {
        joined
            .map_err(|e| DownloadError::Internal(e.to_string()))?
            .3?;
    }
    drop(out);
    let report = DownloadReport {
        size: manifest.size(),
        sources: srcs.into_iter().map(|s| s.report).collect(),
        elapsed: started.elapsed(),
        duplicate_bytes,
        retried_chunks: retried,
        resumed_bytes,
    };
    Ok(report)
}

fn bit(source: usize) -> u64 {
    if source < 64 { 1 << source } else { 0 }
}

/// The next pending chunk for source `s`: the first one it has not already failed, or, if every
/// live source has failed it, that one anyway (better a retry than a stall).
fn take_pending(
    s: usize,
    live: &[usize],
    pending: &mut VecDeque<u32>,
    chunks: &mut [ChunkState],
) -> Option<u32> {
    let all_live = live.iter().fold(0u64, |acc, &l| acc | bit(l));
    let pos = pending.iter().position(|&c| {
        let failed = chunks[c as usize].failed_by;
        failed & bit(s) == 0 || failed & all_live == all_live
    })?;
    let c = pending.remove(pos)?;
    chunks[c as usize].queued = false;
    Some(c)
}

/// An endgame duplicate for source `s`: of the chunks in flight elsewhere, not yet being checked,
/// below the copy limit and not failed by `s` (fewest copies first), the one expected to arrive
/// last.
///
/// Sources send chunks whole in the order asked, so a chunk waits for those asked of the same
/// source before it: it is expected after `position × chunk / rate`. A source that has not
/// delivered for a while (or never) is not expected to deliver at all, so its chunks come first.
fn pick_duplicate(
    s: usize,
    outstanding: &BTreeSet<u32>,
    chunks: &[ChunkState],
    srcs: &[SourceState],
    chunk_size: u64,
    max_copies: u8,
) -> Option<u32> {
    // Per chunk in flight: when it is expected, and when its oldest copy was asked for.
    let mut eta: HashMap<u32, (f64, Instant)> = HashMap::new();
    for src in srcs {
        let mut queue: Vec<(Instant, u32)> = src
            .in_flight
            .iter()
            .filter(|&(&c, _)| chunks[c as usize].checking == 0)
            .map(|(&c, &at)| (at, c))
            .collect();
        queue.sort_unstable();
        let per_chunk = if src.rate > 0.0 && !src.stalled(chunk_size) {
            chunk_size as f64 / src.rate
        } else {
            f64::INFINITY
        };
        for (k, &(asked, c)) in queue.iter().enumerate() {
            let secs = (k + 1) as f64 * per_chunk;
            eta.entry(c)
                .and_modify(|(e, a)| {
                    *e = e.min(secs);
                    *a = (*a).min(asked);
                })
                .or_insert((secs, asked));
        }
    }
    outstanding
        .iter()
        .copied()
        .filter(|&c| {
            let st = &chunks[c as usize];
            !st.done && st.checking == 0 && st.fetching < max_copies && st.failed_by & bit(s) == 0
        })
        .min_by(|&a, &b| {
            let (ea, eb) = (eta.get(&a), eta.get(&b));
            let expected = |e: Option<&(f64, Instant)>| e.map_or(f64::INFINITY, |e| e.0);
            chunks[a as usize]
                .fetching
                .cmp(&chunks[b as usize].fetching)
                .then(expected(eb).total_cmp(&expected(ea)))
                .then(ea.map(|e| e.1).cmp(&eb.map(|e| e.1)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An in-memory source with switchable faults.
    struct Fake {
        name: String,
        data: Arc<Vec<u8>>,
        /// Requests served before later ones fail fatally ...
        fail_after: Option<usize>,
        /// ... until this many requests were made (then it works again).
        recover_at: Option<usize>,
        /// Chunks it serves corrupted.
        corrupt: HashSet<u32>,
        /// Corrupt every chunk.
        lie_always: bool,
        /// Delay per request.
        delay: Duration,
        /// Never answer.
        hang: bool,
        served: AtomicUsize,
        asked: Mutex<Vec<u32>>,
        /// Requests in progress and their peak, shared by the fakes of one test.
        busy: Arc<(AtomicUsize, AtomicUsize)>,
    }

    impl Fake {
        fn new(name: &str, data: &Arc<Vec<u8>>) -> Self {
            Self {
                name: name.into(),
                data: data.clone(),
                fail_after: None,
                recover_at: None,
                corrupt: HashSet::new(),
                lie_always: false,
                delay: Duration::from_millis(1),
                hang: false,
                served: AtomicUsize::new(0),
                asked: Mutex::default(),
                busy: Arc::default(),
            }
        }
    }

    impl ChunkSource for Fake {
        fn name(&self) -> &str {
            &self.name
        }

        async fn read_chunk(
            &self,
            index: u32,
            offset: u64,
            len: u32,
        ) -> Result<Bytes, SourceError> {
            self.asked.lock().unwrap().push(index);
            let now = self.busy.0.fetch_add(1, Ordering::SeqCst) + 1;
            self.busy.1.fetch_max(now, Ordering::SeqCst);
            let _done = Finally(&self.busy.0);
            if self.hang {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(self.delay).await;
            let n = self.served.fetch_add(1, Ordering::SeqCst);
            if self.fail_after.is_some_and(|f| n >= f) && self.recover_at.is_none_or(|r| n < r) {
                return Err(SourceError {
                    message: "connection lost".into(),
                    fatal: true,
                });
            }
            let mut bytes = self.data[offset as usize..offset as usize + len as usize].to_vec();
            if (self.lie_always || self.corrupt.contains(&index)) && !bytes.is_empty() {
                bytes[0] ^= 0xff;
            }
            Ok(Bytes::from(bytes))
        }

        fn rtt(&self) -> Option<Duration> {
            Some(self.delay)
        }
    }

    /// Decrements a counter when dropped (also when the request future is cancelled).
    struct Finally<'a>(&'a AtomicUsize);

    impl Drop for Finally<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn data(len: usize) -> Arc<Vec<u8>> {
        Arc::new(
            (0..len)
                .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
                .collect(),
        )
    }

    async fn fetch(
        data: &Arc<Vec<u8>>,
        sources: Vec<Fake>,
        opts: Options,
    ) -> (
        Result<DownloadReport, DownloadError>,
        Vec<Arc<Fake>>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let manifest = Arc::new(Manifest::from_reader(&data[..], data.len() as u64).unwrap());
        let target = dir.path().join("out");
        let partial = Arc::new(PartialFile::create(&target, "t", manifest.size()).unwrap());
        let sources: Vec<Arc<Fake>> = sources.into_iter().map(Arc::new).collect();
        let result = run(
            manifest.clone(),
            sources.clone(),
            partial.clone(),
            &[],
            &opts,
            |_| {},
        )
        .await;
        let result = match result {
            Ok(report) => {
                let partial = Arc::try_unwrap(partial).unwrap();
                partial
                    .commit(manifest.blake3(), crate::store::Check::Reread)
                    .unwrap();
                assert_eq!(std::fs::read(&target).unwrap(), **data, "byte-identical");
                Ok(report)
            }
            Err(e) => {
                drop(partial);
                Err(e)
            }
        };
        (result, sources, dir)
    }

    #[tokio::test]
    async fn every_source_contributes_and_the_result_is_identical() {
        let d = data(5 << 20);
        let srcs = vec![Fake::new("a", &d), Fake::new("b", &d), Fake::new("c", &d)];
        let (r, _, _dir) = fetch(&d, srcs, Options::default()).await;
        let r = r.unwrap();
        assert_eq!(
            r.sources.iter().map(|s| s.bytes).sum::<u64>(),
            d.len() as u64
        );
        assert!(r.sources.iter().all(|s| s.bytes > 0), "{r:?}");
    }

    #[tokio::test]
    async fn faster_sources_do_more() {
        let d = data(4 << 20);
        let mut slow = Fake::new("slow", &d);
        slow.delay = Duration::from_millis(40);
        let fast = Fake::new("fast", &d);
        let opts = Options {
            fixed_window: Some(2),
            ..Options::default()
        };
        let (r, _, _dir) = fetch(&d, vec![slow, fast], opts).await;
        let r = r.unwrap();
        assert!(r.sources[1].bytes > 3 * r.sources[0].bytes, "{r:?}");
    }

    #[tokio::test]
    async fn a_source_that_dies_midway_is_dropped_and_its_chunks_reassigned() {
        let d = data(3 << 20);
        let mut dying = Fake::new("dying", &d);
        dying.fail_after = Some(3);
        let srcs = vec![dying, Fake::new("ok", &d)];
        // No second chance: the drop path (retrying is tested below).
        let opts = Options {
            max_reconnects: 0,
            ..Options::default()
        };
        let (r, _, _dir) = fetch(&d, srcs, opts).await;
        let r = r.unwrap();
        assert_eq!(r.sources[0].dropped.as_deref(), Some("connection lost"));
        assert!(
            r.sources[0].failures > 0 && r.sources[0].bytes == 3 * 256 * 1024,
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_source_that_loses_its_connection_is_tried_again_and_used() {
        let d = data(4 << 20);
        // Requests 2..6 fail (its connection is "lost" twice: each retry spends its window of
        // 2), then it works again while the slow source is still busy.
        let mut flaky = Fake::new("flaky", &d);
        flaky.fail_after = Some(2);
        flaky.recover_at = Some(6);
        let mut slow = Fake::new("slow", &d);
        slow.delay = Duration::from_millis(30);
        let opts = Options {
            reconnect_backoff: Duration::from_millis(20),
            fixed_window: Some(2),
            ..Options::default()
        };
        let (r, srcs, _dir) = fetch(&d, vec![flaky, slow], opts).await;
        let r = r.unwrap();
        assert!(r.sources[0].reconnects >= 1, "{r:?}");
        assert!(r.sources[0].dropped.is_none(), "{r:?}");
        let served_after_recovery = srcs[0].served.load(Ordering::SeqCst);
        assert!(
            served_after_recovery > 9,
            "used again after it recovered: {r:?}"
        );
    }

    #[tokio::test]
    async fn corrupt_chunks_are_refetched_elsewhere_and_a_liar_is_dropped() {
        let d = data(2 << 20);
        let mut liar = Fake::new("liar", &d);
        liar.lie_always = true;
        let mut flaky = Fake::new("flaky", &d);
        flaky.corrupt = [0, 5].into();
        let (r, srcs, _dir) = fetch(
            &d,
            vec![liar, flaky, Fake::new("good", &d)],
            Options::default(),
        )
        .await;
        let r = r.unwrap();
        assert_eq!(r.sources[0].bytes, 0);
        assert_eq!(
            r.sources[0].dropped.as_deref(),
            Some("sent 3 corrupt chunks")
        );
        assert!(
            r.sources[1].corrupt <= 2 && r.sources[1].dropped.is_none(),
            "{r:?}"
        );
        // A chunk the flaky source corrupted was not asked of it again.
        let asked = srcs[1].asked.lock().unwrap();
        for c in [0, 5] {
            assert!(asked.iter().filter(|&&x| x == c).count() <= 1, "{asked:?}");
        }
    }

    #[tokio::test]
    async fn a_hanging_source_is_covered_by_the_endgame() {
        let d = data(1 << 20);
        let mut hung = Fake::new("hung", &d);
        hung.hang = true;
        let opts = Options {
            request_timeout: Duration::from_secs(3600),
            ..Options::default()
        };
        let (r, _, _dir) = fetch(&d, vec![hung, Fake::new("ok", &d)], opts).await;
        let r = r.unwrap();
        assert_eq!(r.sources[0].bytes, 0);
        assert_eq!(r.sources[1].bytes, d.len() as u64);
    }

    #[tokio::test]
    async fn when_every_source_fails_the_error_names_each() {
        let d = data(1 << 20);
        let mut a = Fake::new("a", &d);
        a.fail_after = Some(0);
        let mut b = Fake::new("b", &d);
        b.lie_always = true;
        let opts = Options {
            reconnect_backoff: Duration::from_millis(1),
            ..Options::default()
        };
        let (r, _, dir) = fetch(&d, vec![a, b], opts).await;
        let err = r.unwrap_err().to_string();
        assert!(
            err.contains("a: connection lost") && err.contains("b: sent 3 corrupt chunks"),
            "{err}"
        );
        // The partial file is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn the_window_grows_to_cover_a_long_round_trip() {
        let d = data(48 << 20);
        let mut far = Fake::new("far", &d);
        far.delay = Duration::from_millis(100);
        let (r, _, _dir) = fetch(&d, vec![far], Options::default()).await;
        let r = r.unwrap();
        // At the starting window (4 x 1 MiB per 100 ms) the rate would stay near 40 MiB/s; the
        // window must have grown well past it.
        assert!(r.sources[0].max_window > 8, "{r:?}");
    }

    #[tokio::test]
    async fn many_sources_share_the_in_flight_cap() {
        let d = data(16 << 20);
        let busy: Arc<(AtomicUsize, AtomicUsize)> = Arc::default();
        let srcs: Vec<Fake> = (0..8)
            .map(|i| {
                let mut f = Fake::new(&format!("s{i}"), &d);
                f.delay = Duration::from_millis(20);
                f.busy = busy.clone();
                f
            })
            .collect();
        // 4 MiB of 1 MiB chunks, though each source alone would be allowed 8.
        let opts = Options {
            max_in_flight_bytes: 4 << 20,
            max_on_the_wire_bytes: 0,
            fixed_window: Some(8),
            ..Options::default()
        };
        let (r, _, _dir) = fetch(&d, srcs, opts).await;
        r.unwrap();
        let peak = busy.1.load(Ordering::SeqCst);
        // The cap, or one request per source (a source with none in flight may always ask).
        assert!((4..=8).contains(&peak), "peak requests in flight: {peak}");
    }

    #[test]
    fn the_endgame_duplicates_the_chunk_expected_last() {
        const MIB: u64 = 1 << 20;
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Source 0 (10 MiB/s) was asked for chunks 2, 1, 0 in that order; source 1 (1 MiB/s)
        // for chunk 3 only; source 2 (idle) looks for a duplicate.
        let asked = [
            (2u32, 0, at(0)),
            (1, 0, at(1)),
            (0, 0, at(2)),
            (3, 1, at(0)),
        ];
        let mut chunks: Vec<ChunkState> = (0..4).map(|_| ChunkState::default()).collect();
        let mut srcs: Vec<SourceState> = ["fast", "slow", "idle"]
            .into_iter()
            .map(SourceState::new)
            .collect();
        for (c, s, when) in asked {
            chunks[c as usize].fetching = 1;
            srcs[s].in_flight.insert(c, when);
        }
        srcs[0].rate = 10.0 * MIB as f64;
        srcs[1].rate = MIB as f64;
        let outstanding: BTreeSet<u32> = [0, 1, 2, 3].into();
        let pick = |chunks: &[ChunkState], srcs: &[SourceState]| {
            pick_duplicate(2, &outstanding, chunks, srcs, MIB, 2)
        };
        // The slow source's one chunk (expected in 1 s) before the fast one's last (0.3 s).
        assert_eq!(pick(&chunks, &srcs), Some(3));
        chunks[3].fetching = 2;
        assert_eq!(pick(&chunks, &srcs), Some(0));
        // A source silent for longer than `STALL` is not expected to deliver: oldest first.
        chunks[3].fetching = 1;
        srcs[0].last_delivery = Instant::now() - STALL * 2;
        assert_eq!(pick(&chunks, &srcs), Some(2));
        // Nothing the idle source itself failed.
        chunks[2].failed_by |= bit(2);
        assert_eq!(pick(&chunks, &srcs), Some(1));
    }

    #[tokio::test]
    async fn the_cap_grows_by_what_a_long_link_holds() {
        // One source 100 ms away: a 2 MiB cap alone allows 2 chunks in flight, 20 MiB/s. The
        // bytes on its wire (rate × RTT) are added to the cap, up to 6 MiB here.
        let d = data(48 << 20);
        let mut f = Fake::new("far", &d);
        f.delay = Duration::from_millis(100);
        let busy = f.busy.clone();
        let opts = Options {
            max_in_flight_bytes: 2 << 20,
            max_on_the_wire_bytes: 6 << 20,
            fixed_window: Some(16),
            ..Options::default()
        };
        let (r, _, _dir) = fetch(&d, vec![f], opts).await;
        r.unwrap();
        let peak = busy.1.load(Ordering::SeqCst);
        assert!((5..=8).contains(&peak), "peak requests in flight: {peak}");
    }

    #[tokio::test]
    async fn chunks_already_present_are_not_fetched() {
        let d = data(1 << 20);
        let dir = tempfile::tempdir().unwrap();
        let manifest = Arc::new(Manifest::from_reader(&d[..], d.len() as u64).unwrap());
        let partial =
            Arc::new(PartialFile::create(&dir.path().join("out"), "t", manifest.size()).unwrap());
        let have: Vec<bool> = (0..manifest.chunk_count()).map(|i| i % 2 == 0).collect();
        for i in (0..manifest.chunk_count()).filter(|i| i % 2 == 0) {
            let off = manifest.chunk_offset(i);
            let len = manifest.chunk_len(i).unwrap();
            partial
                .write_at(off, &d[off as usize..(off + len) as usize])
                .unwrap();
        }
        let src = Arc::new(Fake::new("a", &d));
        let r = run(
            manifest.clone(),
            vec![src.clone()],
            partial.clone(),
            &have,
            &Options::default(),
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(r.resumed_bytes + r.sources[0].bytes, d.len() as u64);
        assert!(src.asked.lock().unwrap().iter().all(|c| c % 2 == 1));
        let partial = Arc::try_unwrap(partial).unwrap();
        partial
            .commit(manifest.blake3(), crate::store::Check::Reread)
            .unwrap();
    }

    #[tokio::test]
    async fn empty_and_tiny_files_work() {
        for len in [0, 1, 1023, 1025] {
            let d = data(len);
            let (r, _, _dir) = fetch(
                &d,
                vec![Fake::new("a", &d), Fake::new("b", &d)],
                Options::default(),
            )
            .await;
            assert_eq!(r.unwrap().size, len as u64);
        }
    }

    #[test]
    fn agreement_takes_the_majority_or_the_wanted_version() {
        let m = |s: &[u8]| Some(Manifest::from_reader(s, s.len() as u64).unwrap());
        let (a, b) = (m(b"version a"), m(b"version b"));
        let described = vec![b.clone(), a.clone(), None, a.clone()];
        let got = agree(&described, None).unwrap();
        assert_eq!(got.members, [1, 3]);
        assert_eq!(got.other_versions, [(0, b.as_ref().unwrap().blake3())]);
        let got = agree(&described, Some(b.as_ref().unwrap().blake3())).unwrap();
        assert_eq!(got.members, [0]);
        // A tie goes to the earliest peer's version.
        assert_eq!(agree(&[b.clone(), a.clone()], None).unwrap().members, [0]);
        assert!(agree(&[None, None], None).is_none());
        assert!(agree(&described, Some([0; 32])).is_none());
    }
}
