//! A download session: one file from every peer that serves it, from the first question to the
//! file under its name.
//!
//! The session asks every peer what it holds under the name and starts as soon as it knows which
//! version to fetch: when every peer has answered, or [`DOWNLOAD_GRACE`] after the first answer
//! that serves the file (at once when the wanted version is given). Peers answering later join
//! the running download if they serve that version, and peers that held nothing are asked again
//! (a crowd starting at once). The choices (version, unit, crowd, order) are `engine::choice`'s;
//! the transfer is `download::run`'s; an update is filled from the old copy by `update::fill`.
//! The partial file lives here from create to commit.
//!
//! Peers are seen only through [`Peers`], so the session runs without QUIC in tests.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;

mod answers;
mod target;

use answers::{Answers, Joining, Served, crowd_hint, in_pieces};
use target::{
    AtTarget, bytes_of, look_at, offer_while_downloading, open_partial, save, transferred,
};

use crate::engine::choice;
use crate::model::delta::{Sig, SigKind};
use crate::model::manifest::{ChunkSet, FilePath, Hash32, Manifest, Regrain, hex};
use crate::model::peers::PeerId;
use crate::store::PartialFile;
use crate::transfer::download::{self, DownloadReport, Options, Progress};
use crate::transfer::update::{self, RangeSource};
use crate::wire::exchange::Offer;

/// How long a download waits for more peers after the first one that serves the file answers.
/// Answers from peers that are up arrive within a round trip or two of each other; a peer that is
/// down would otherwise hold the start for the whole connect timeout.
pub const DOWNLOAD_GRACE: Duration = Duration::from_millis(250);
/// How long a download waits before asking again the peers that held nothing of the file (they
/// may have started downloading it too); the pause doubles up to [`ASK_AGAIN_MAX`].
pub const ASK_AGAIN: Duration = Duration::from_millis(500);
/// The longest pause between two such askings.
pub const ASK_AGAIN_MAX: Duration = Duration::from_secs(4);

/// The peers a session may ask, as it sees them.
pub trait Peers {
    /// What an answer leaves besides its offer (the connection that gave it and, for a download
    /// in progress there, what it gains): made into a source if the peer takes part.
    type Lead;
    /// A peer serving the file to this download.
    type Source: RangeSource;
    /// Why asking a peer failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// What `peer` holds of `name`: nothing, or a version (whole or in part).
    fn ask(
        &self,
        peer: &PeerId,
        name: &FilePath,
    ) -> impl Future<Output = Result<Option<(Offer, Self::Lead)>, Self::Error>>;

    /// How the peer that gave `lead` signs trees.
    fn sig_kind(&self, lead: &Self::Lead) -> SigKind;

    /// The group signatures of `version` of `name`, from the peer that gave `lead`, if it tells.
    fn groups(
        &self,
        lead: &Self::Lead,
        name: &FilePath,
        version: Hash32,
    ) -> impl Future<Output = Option<Vec<Sig>>>;

    /// `peer` as a source of `name`: all of it, or (`holding`) part of a download in progress
    /// there that grows as the lead tells.
    fn source(
        &self,
        peer: &PeerId,
        name: &FilePath,
        lead: Self::Lead,
        holding: Option<Holding>,
    ) -> Result<Self::Source, Self::Error>;

    /// Closes what `source` opened; the bytes of its replies that crossed the wire.
    fn close(&self, source: &Self::Source) -> impl Future<Output = u64>;
}

/// What a peer downloading the file holds of it, counted in the download's unit.
#[derive(Debug)]
pub struct Holding {
    /// The version it downloads.
    pub version: Hash32,
    /// What it held when it answered, in its own unit.
    pub held: ChunkSet,
    /// From its unit to the download's.
    pub regrain: Regrain,
}

/// What to download, where, and from whom.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The file.
    pub name: FilePath,
    /// Where it goes.
    pub target: PathBuf,
    /// The peers to ask.
    pub peers: Vec<PeerId>,
    /// The version wanted, if given.
    pub blake3: Option<Hash32>,
    /// A fixed request window per peer, if given.
    pub window: Option<usize>,
    /// Bring another version at the target up to date instead of refusing.
    pub update: bool,
    /// Our name, if the target is in our served_files: what verifies is then offered to other
    /// peers as it arrives, and we take our stripe of a crowd.
    pub offer_as: Option<PeerId>,
}

/// Why a peer took no part in a download.
#[derive(Debug)]
pub enum LeftOut<E> {
    /// It does not serve the file.
    DoesNotServe(FilePath),
    /// It serves another version.
    OtherVersion(FilePath, Hash32),
    /// It could not be reached or asked.
    Failed(E),
    /// It had not answered when the download finished.
    TooLate,
    /// It joined a download in pieces but serves only chunks (an older qnode).
    NoPieces,
}

impl<E> LeftOut<E> {
    /// It holds nothing of the file (yet): it may still join.
    pub fn holds_nothing(&self) -> bool {
        matches!(self, Self::DoesNotServe(_))
    }
}

impl<E: std::fmt::Display> std::fmt::Display for LeftOut<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DoesNotServe(name) => write!(f, "does not serve {name}"),
            Self::OtherVersion(name, h) => write!(
                f,
                "serves a different version of {name} (BLAKE3 {})",
                hex(h)
            ),
            Self::Failed(e) => write!(f, "{e}"),
            Self::TooLate => write!(f, "no answer before the download finished"),
            Self::NoPieces => write!(
                f,
                "an older qnode, which cannot serve this download's pieces"
            ),
        }
    }
}

/// No peer serves the file (as a file: it may be a folder there).
#[derive(Debug, thiserror::Error)]
#[error("no peer serves {name}{wanted} ({why})")]
pub struct NotServed {
    /// The name asked for.
    pub name: FilePath,
    /// " with BLAKE3 …" if a version was asked for.
    pub wanted: String,
    /// Each peer's reason.
    pub why: String,
}

/// What happens during a download, for progress display.
#[derive(Debug)]
pub enum DownloadEvent<'a, E> {
    /// A peer takes no part (reported once per peer, as soon as it is known).
    LeftOut(&'a PeerId, &'a LeftOut<E>),
    /// The transfer starts: this many bytes.
    Started(u64),
    /// Verified bytes so far.
    Progress(Progress),
}

/// How a download ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// The file was fetched and stored.
    Downloaded,
    /// An identical file was already there.
    AlreadyPresent,
    /// Our other version was brought up to date and replaced (it is kept hidden).
    Updated,
}

/// What a download did.
#[derive(Debug)]
pub struct Downloaded<E> {
    /// The file.
    pub name: FilePath,
    /// Where it is.
    pub target: PathBuf,
    /// The version fetched.
    pub manifest: Arc<Manifest>,
    /// How it ended.
    pub status: Fetched,
    /// The transfer, if there was one.
    pub report: Option<DownloadReport>,
    /// The peers that took no part, and why.
    pub left_out: Vec<(PeerId, LeftOut<E>)>,
    /// Wall time of the whole command.
    pub elapsed: Duration,
    /// Bytes taken from our old copy (an update).
    pub reused_bytes: u64,
    /// Bytes fetched as ranges before the engine ran (an update), per peer.
    pub range_bytes: HashMap<String, u64>,
    /// Peers whose delta signatures for an update could not be the file's, and why.
    pub update_liars: Vec<(String, String)>,
    /// Bytes of the peers' replies that crossed the wire (less than what they stand for where
    /// they were compressed).
    pub wire_bytes: u64,
}

/// One peer's answer: nothing held, a version with its lead, or a failure.
type Answer<P> = Result<Option<(Offer, <P as Peers>::Lead)>, <P as Peers>::Error>;

/// Downloads `plan.name` from `plan.peers`, until done or `interrupt`; `on` hears what happens.
pub async fn download<P: Peers>(
    peers: &P,
    plan: &Plan,
    interrupt: impl Future<Output = ()>,
    on: impl FnMut(DownloadEvent<'_, P::Error>),
) -> anyhow::Result<Downloaded<P::Error>> {
    let started = Instant::now();
    let (name, target) = (&plan.name, &plan.target);
    let on = RefCell::new(on);
    let report = |peer: &PeerId, why: &LeftOut<P::Error>| {
        (on.borrow_mut())(DownloadEvent::LeftOut(peer, why))
    };

    // Ask everyone what they have under that name; start once the version is known.
    let (mut asking, mut answers) = ask_all(peers, plan).await;
    // When no peer serves the file, the error names each peer's reason instead.
    let (manifest, members) = answers.agree(plan.blake3)?;
    let crowd_hint = crowd_hint(&plan.peers, &members, &answers.left_out);
    // Peers holding nothing of it yet are named at the end, if they never join.
    let known = answers.left_out.iter();
    known
        .filter(|(_, why)| !why.holds_nothing())
        .for_each(|(p, why)| report(p, why));
    let mut done = Downloaded::of(plan, manifest);
    let manifest = done.manifest.clone();

    // Already there, or another version to bring up to date? (Only a peer holding the file
    // whole can tell its tree.)
    let first = members.iter().find(|m| m.offer.held.is_none());
    let first = first.map(|m| &m.lead);
    let (old, prefetched) = match look_at(peers, plan, first, &manifest).await? {
        AtTarget::Same => {
            done.left_out = answers.left_out;
            done.elapsed = started.elapsed();
            return Ok(done);
        }
        AtTarget::Nothing => (None, None),
        AtTarget::Other(seen, prefetched) => (Some(seen), prefetched),
    };

    let download = unit(plan, &manifest, &members, &crowd_hint, old.is_some());
    let (join, sources) = mpsc::unbounded_channel();
    let joining = Joining::new(peers, name, (&manifest, &download), join);
    for member in members {
        joining.add(member)?;
    }
    let (partial, mut have) = open_partial(target, &download).await?;
    let resumed = bytes_of(&download, &have);
    if let Some(prefetched) = prefetched {
        let whole = joining.whole_sources();
        let filled = update::fill(target, prefetched, &manifest, &partial, have, &whole);
        have = done.filled(filled.await?);
    }
    let crowd_name = offer_while_downloading(plan, &partial, &download, &have).await?;
    (on.borrow_mut())(DownloadEvent::Started(manifest.size()));
    let opts = options(plan, &manifest, crowd_name, crowd_hint);
    let engine = download::run(
        download.clone(),
        sources,
        partial.clone(),
        &have,
        &opts,
        |p| (on.borrow_mut())(DownloadEvent::Progress(p)),
    );
    // Peers that answer late join if they hold this version, and so do peers that held nothing
    // of it but start downloading it meanwhile.
    let absent = answers.absent(&plan.peers);
    let late_left_out = RefCell::new(Vec::new());
    let leave = |peer: &PeerId, why: LeftOut<P::Error>| {
        report(peer, &why);
        late_left_out.borrow_mut().push((peer.clone(), why));
    };
    let late = joining.late(&mut asking, absent, &mut answers.answered, leave);
    let outcome = until_engine_ends(engine, late, interrupt).await;
    // Connections made again during the download are not the caller's: close them.
    for source in joining.opened.into_inner() {
        done.wire_bytes += peers.close(&source).await;
    }
    // Peers that held nothing at first but joined later were not left out.
    let joined = joined(&outcome);
    answers.left_out.retain(|(p, _)| !joined.contains(p));
    done.left_out = answers.all_left_out(late_left_out.into_inner(), &plan.peers);
    let last = done.left_out.iter();
    last.filter(|(_, why)| why.holds_nothing())
        .for_each(|(p, why)| report(p, why));
    let mut report = transferred(outcome, &partial, name, target)?;
    // Chunks built from our old copy are reused, not resumed.
    report.resumed_bytes = report.resumed_bytes.min(resumed);
    done.status = save(partial, &download, target, old).await?;
    done.report = Some(report);
    done.elapsed = started.elapsed();
    Ok(done)
}

/// Asks every peer of `plan` what it holds, and takes the answers until the version is known (see
/// [`Answers::gather`]); the answers still coming are the stream returned.
async fn ask_all<'p, P: Peers>(
    peers: &'p P,
    plan: &'p Plan,
) -> (
    impl futures_util::Stream<Item = (&'p PeerId, Answer<P>)> + Unpin + 'p,
    Answers<P>,
) {
    let name = &plan.name;
    let mut asking: FuturesUnordered<_> = plan
        .peers
        .iter()
        .map(|peer| async move { (peer, peers.ask(peer, name).await) })
        .collect();
    let mut answers = Answers::new(name.clone());
    answers
        .gather(&mut asking, plan.peers.len(), plan.blake3)
        .await;
    (asking, answers)
}

/// The engine's options: our window, stripe and order in a crowd.
fn options(
    plan: &Plan,
    manifest: &Manifest,
    crowd_name: Option<String>,
    crowd_hint: Vec<String>,
) -> Options {
    Options {
        fixed_window: plan.window,
        order_seed: Some(choice::order_seed(
            crowd_name.is_some(),
            &manifest.blake3(),
            fastrand::u64(..),
        )),
        crowd_name,
        crowd_hint,
        ..Options::default()
    }
}

/// The peers that took part in a transfer that finished.
fn joined(outcome: &Option<Result<DownloadReport, download::DownloadError>>) -> Vec<PeerId> {
    let Some(Ok(report)) = outcome else {
        return Vec::new();
    };
    let names = report.sources.iter();
    names.filter_map(|s| s.name.parse().ok()).collect()
}

impl<E> Downloaded<E> {
    /// Records what filling an update from the old copy did; the chunks that now verify.
    fn filled(&mut self, filled: update::Filled) -> Vec<bool> {
        (self.reused_bytes, self.range_bytes) = (filled.reused, filled.fetched);
        self.update_liars = filled.liars;
        filled.have
    }

    /// Nothing done yet towards `manifest`'s version.
    fn of(plan: &Plan, manifest: Manifest) -> Self {
        Self {
            name: plan.name.clone(),
            target: plan.target.clone(),
            manifest: Arc::new(manifest),
            status: Fetched::AlreadyPresent,
            report: None,
            left_out: Vec::new(),
            elapsed: Duration::ZERO,
            reused_bytes: 0,
            range_bytes: HashMap::new(),
            update_liars: Vec::new(),
            wire_bytes: 0,
        }
    }
}

/// The version as the download counts it: in chunks or in pieces (`choice::in_pieces`).
fn unit<P: Peers>(
    plan: &Plan,
    manifest: &Arc<Manifest>,
    members: &[Served<P>],
    crowd_hint: &[String],
    updating: bool,
) -> Arc<Manifest> {
    let tag = crate::store::download_tag(&manifest.blake3());
    let pieces = in_pieces(members);
    let facts = choice::UnitFacts {
        crowd_hinted: !crowd_hint.is_empty(),
        partial_member: members.iter().any(|m| m.offer.held.is_some()),
        resumes: PartialFile::left_by_an_attempt(&plan.target, &tag),
        updating,
        pieces_known: pieces.is_some(),
    };
    match pieces {
        Some(p) if choice::in_pieces(&facts) => Arc::new(p),
        _ => manifest.clone(),
    }
}

/// Runs `engine` to its end while `late` runs beside it; `None` if `interrupt` comes first.
async fn until_engine_ends<T>(
    engine: impl Future<Output = T>,
    late: impl Future<Output = ()>,
    interrupt: impl Future<Output = ()>,
) -> Option<T> {
    tokio::pin!(engine, late, interrupt);
    let mut late_done = false;
    loop {
        tokio::select! {
            r = &mut engine => return Some(r),
            () = &mut late, if !late_done => late_done = true,
            () = &mut interrupt => return None,
        }
    }
}

#[cfg(test)]
mod tests;
