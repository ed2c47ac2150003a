//! The download engine: several sources, one verified file.
//!
//! Peers are seen only through [`ChunkSource`]; the policy (who is asked for what, windows, caps,
//! strikes, rests, endgame) is the pure [`Scheduler`] in `schedule`. This module is its driver: it
//! runs the scheduler's [`Action`]s against the sources, verifies every chunk against the manifest
//! off the async workers (`spawn_blocking`) and writes it at its offset in the [`PartialFile`], and
//! turns what happened into [`Event`]s. Sources may join while the download runs (a peer that
//! answered late).
//!
//! This module does no printing and names no network types.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::engine::schedule::{Action, ChunkSet, Event, RequestId, RunState, Scheduler, SourceId};
pub use crate::engine::schedule::{Options, SourceReport};
use crate::model::manifest::Manifest;
use crate::store::{PartialFile, StoreError};

/// A boxed error from a source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failed chunk request.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source's connection is gone; it may come back (the source reconnects on its next
    /// request).
    #[error("{0}")]
    Lost(BoxError),
    /// This request failed; the source may still serve others.
    #[error("{0}")]
    Failed(BoxError),
}

impl SourceError {
    /// Whether the connection is gone, rather than one request failing.
    pub fn is_lost(&self) -> bool {
        matches!(self, Self::Lost(_))
    }
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

    /// What the source holds, if not the whole file, as it changes (a download in progress at
    /// the peer). `None`: every chunk, from the start.
    fn holds(&self) -> Option<watch::Receiver<ChunkSet>> {
        None
    }
}

/// What a download did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadReport {
    /// Bytes in the file.
    pub size: u64,
    /// Per source, in the order they joined.
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

impl DownloadReport {
    /// The report of a transfer of `manifest`'s file that took `elapsed`.
    fn of(manifest: &Manifest, totals: crate::engine::schedule::Totals, elapsed: Duration) -> Self {
        Self {
            size: manifest.size(),
            sources: totals.sources,
            elapsed,
            duplicate_bytes: totals.duplicate_bytes,
            retried_chunks: totals.retried_chunks,
            resumed_bytes: totals.resumed_bytes,
        }
    }
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
    Internal(#[from] tokio::task::JoinError),
}

/// The sources of a download: those known at the start, and any that join later (the sender
/// side of the channel; the download stops waiting for more once every sender is dropped).
pub type Sources<S> = mpsc::UnboundedReceiver<Arc<S>>;

/// A fixed set of sources, none joining later.
pub fn fixed_sources<S>(sources: Vec<Arc<S>>) -> Sources<S> {
    let (tx, rx) = mpsc::unbounded_channel();
    for s in sources {
        // The receiver is alive: it is returned below.
        let _ = tx.send(s);
    }
    rx
}

type Fetch = Pin<Box<dyn Future<Output = (RequestId, Result<Bytes, SourceError>)> + Send>>;
/// A chunk checked against the manifest (and written if good), or why the check failed.
type Verdict = (RequestId, Result<bool, StoreError>);
/// A source's holdings changed (and may change again), or will not change any more.
type HoldsChange =
    Pin<Box<dyn Future<Output = (SourceId, Option<watch::Receiver<ChunkSet>>)> + Send>>;

/// The I/O half of a download: the sources, the requests running against them, the checks.
struct Driver<S> {
    manifest: Arc<Manifest>,
    out: Arc<PartialFile>,
    sources: Vec<Arc<S>>,
    fetches: FuturesUnordered<Fetch>,
    /// Requests running: the chunk asked for, and the token that stops the request.
    running: HashMap<RequestId, (u32, CancellationToken)>,
    /// Bytes arrived, waiting for the scheduler's verdict.
    arrived: HashMap<RequestId, (u32, Bytes)>,
    checks: JoinSet<Verdict>,
    /// Sources whose holdings may still change (downloads in progress at peers).
    changes: FuturesUnordered<HoldsChange>,
}

impl<S: ChunkSource> Driver<S> {
    fn new(manifest: Arc<Manifest>, out: Arc<PartialFile>) -> Self {
        Self {
            manifest,
            out,
            sources: Vec::new(),
            fetches: FuturesUnordered::new(),
            running: HashMap::new(),
            arrived: HashMap::new(),
            checks: JoinSet::new(),
            changes: FuturesUnordered::new(),
        }
    }

    /// A request ended: its bytes arrived (to be checked), or it failed.
    fn fetched(
        &mut self,
        sched: &mut Scheduler,
        request: RequestId,
        result: Result<Bytes, SourceError>,
    ) {
        // A cancelled request has no one waiting for it.
        let Some((chunk, _)) = self.running.remove(&request) else {
            return;
        };
        let now = Instant::now();
        match result {
            Ok(data) => {
                self.arrived.insert(request, (chunk, data));
                sched.handle(now, Event::Arrived { request });
            }
            Err(e) => {
                tracing::debug!(request, "request failed: {e}");
                let (lost, reason) = (e.is_lost(), e.to_string());
                sched.handle(
                    now,
                    Event::Failed {
                        request,
                        lost,
                        reason,
                    },
                );
            }
        }
    }

    fn join(&mut self, sched: &mut Scheduler, source: Arc<S>, now: Instant) {
        let watch = source.holds();
        let holds = match &watch {
            Some(w) => w.borrow().clone(),
            None => ChunkSet::all(sched.chunk_count()),
        };
        let id = sched.add_source(source.name(), holds, now);
        debug_assert_eq!(id, self.sources.len());
        self.sources.push(source);
        if let Some(w) = watch {
            self.watch(id, w);
        }
    }

    /// Waits for what source `id` holds to change again.
    fn watch(&mut self, id: SourceId, mut w: watch::Receiver<ChunkSet>) {
        self.changes.push(Box::pin(async move {
            let open = w.changed().await.is_ok();
            (id, open.then_some(w))
        }));
    }

    /// Carries out the scheduler's actions.
    fn act(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Ask {
                    request,
                    source,
                    chunk,
                    offset,
                    len,
                } => {
                    let cancel = CancellationToken::new();
                    self.running.insert(request, (chunk, cancel.clone()));
                    let src = self.sources[source].clone();
                    self.fetches.push(Box::pin(async move {
                        let result = tokio::select! {
                            r = src.read_chunk(chunk, offset, len) => r,
                            () = cancel.cancelled() => Err(SourceError::Failed("cancelled".into())),
                        };
                        (request, result)
                    }));
                }
                Action::Verify { request } => {
                    let Some((chunk, data)) = self.arrived.remove(&request) else {
                        continue;
                    };
                    let manifest = self.manifest.clone();
                    let out = self.out.clone();
                    // Hashing and the write run on the blocking pool, not inline on this task
                    // (faster; docs/performance.md).
                    self.checks.spawn_blocking(move || {
                        if !manifest.verify_chunk(chunk, &data) {
                            return (request, Ok(false));
                        }
                        let written = out.write_at(manifest.chunk_offset(chunk), &data);
                        if written.is_ok() {
                            // Written and verified: ours to offer to other peers now.
                            out.mark_verified(chunk);
                        }
                        (request, written.map(|()| true))
                    });
                }
                Action::Discard { request } => {
                    self.arrived.remove(&request);
                }
                Action::Cancel { request } => {
                    if let Some((_, cancel)) = self.running.remove(&request) {
                        cancel.cancel();
                    }
                }
                Action::Rest { source, until } => {
                    let rest = until.saturating_duration_since(Instant::now());
                    tracing::info!(
                        source = self.sources[source].name(),
                        "connection lost; trying again in {rest:?}"
                    );
                }
                Action::Drop { source, reason } => {
                    tracing::info!(source = self.sources[source].name(), "dropped: {reason}");
                }
            }
        }
    }
}

/// Downloads every chunk of `manifest` that `have` does not mark as present into `out`, from the
/// `sources` (more may join while it runs), verifying each.
///
/// On success every chunk is in `out` and no task holds it any more, so the caller can unwrap its
/// `Arc` and [`PartialFile::commit`] it. Fails only when no source can supply the missing chunks
/// and no more sources can join.
pub async fn run<S: ChunkSource>(
    manifest: Arc<Manifest>,
    mut sources: Sources<S>,
    out: Arc<PartialFile>,
    have: &[bool],
    opts: &Options,
    mut progress: impl FnMut(Progress),
) -> Result<DownloadReport, DownloadError> {
    let started = Instant::now();
    let mut sched = Scheduler::new(manifest.size(), manifest.chunk_size(), have, opts.clone());
    let mut io = Driver::new(manifest.clone(), out);
    // Since when nothing could be asked, if so.
    let mut stuck_since: Option<Instant> = None;
    let mut joining = true;
    loop {
        let now = Instant::now();
        // Sources already waiting join before the first requests, so they are all used at once.
        while joining {
            match sources.try_recv() {
                Ok(s) => io.join(&mut sched, s, now),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => joining = false,
            }
        }
        for (source, s) in io.sources.iter().enumerate() {
            sched.handle(
                now,
                Event::Rtt {
                    source,
                    rtt: s.rtt(),
                },
            );
        }
        let actions = sched.poll(now);
        io.act(actions);
        match sched.status(now) {
            RunState::Finished => break,
            // No one can give what is missing, and no one may join or gain it any more; or
            // no one joined or gained any of it for a while.
            RunState::Stuck
                if (!joining && io.changes.is_empty())
                    || stuck_since.is_some_and(|t| now >= t + opts.stuck_wait) =>
            {
                return Err(DownloadError::AllSourcesFailed(sched.failure_reasons()));
            }
            RunState::Stuck => {
                stuck_since.get_or_insert(now);
            }
            RunState::Running => stuck_since = None,
        }
        let deadline = sched
            .next_deadline()
            .into_iter()
            .chain(stuck_since.map(|t| t + opts.stuck_wait))
            .min();
        tokio::select! {
            Some((source, watch)) = io.changes.next(), if !io.changes.is_empty() => {
                if let Some(w) = watch {
                    let chunks = w.borrow().clone();
                    sched.handle(Instant::now(), Event::Holds { source, chunks });
                    io.watch(source, w);
                }
            }
            () = tokio::time::sleep_until(deadline.unwrap_or(now).into()), if deadline.is_some() => {}
            joined = sources.recv(), if joining => match joined {
                Some(s) => io.join(&mut sched, s, Instant::now()),
                None => joining = false,
            },
            Some((request, result)) = io.fetches.next(), if !io.fetches.is_empty() => {
                io.fetched(&mut sched, request, result);
            }
            Some(joined) = io.checks.join_next(), if !io.checks.is_empty() => {
                let (request, verdict) = joined?;
                if verdict? {
                    sched.handle(Instant::now(), Event::Verified { request });
                    let (done, total) = sched.progress();
                    progress(Progress { done, total });
                } else {
                    tracing::warn!(request, "chunk failed verification");
                    sched.handle(Instant::now(), Event::Corrupt { request });
                }
            }
        }
    }

    // Cancel what is still in flight and let every write finish before handing the file back.
    drop(sources);
    drop(io.fetches);
    while let Some(joined) = io.checks.join_next().await {
        joined?.1?;
    }
    drop(io.out);
    Ok(DownloadReport::of(
        &manifest,
        sched.totals(),
        started.elapsed(),
    ))
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
                return Err(SourceError::Lost("connection lost".into()));
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
            fixed_sources(sources.clone()),
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
            fixed_sources(vec![src.clone()]),
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
}
