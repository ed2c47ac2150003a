//! The `download FOLDER` use case: every file under a folder on the peers, from the peers that
//! serve the folder's version (the one most serve, or the one asked for), each file verified and
//! atomic as a single file is; a file whose content we already hold anywhere in `served_files` is
//! copied, not fetched (a rename or a move costs no bytes on the wire).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use futures_util::future::join_all;

use super::Node;
use super::download::{Asking, DownloadRequest};
use super::levels;
use crate::model::folder::{self, Entry};
use crate::model::manifest::{FilePath, Hash32, hex};
use crate::model::peers::PeerId;
use crate::store::{Batch, Seen, Store};
use crate::transfer::session::{self, Fetched, Plan};
use crate::wire::exchange::Received;

/// How one file of a folder download ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileStatus {
    /// Fetched from the peers.
    Downloaded,
    /// Copied from a file with the same content we already held.
    Copied,
    /// Already there.
    AlreadyPresent,
    /// Our other version was brought up to date.
    Updated,
}

/// One file of a downloaded folder.
#[derive(Debug, Clone)]
pub struct FolderFile {
    /// Its path inside the folder, size and BLAKE3.
    pub entry: Entry,
    /// How it ended.
    pub status: FileStatus,
}

/// How far a folder download is: files and bytes there (already, copied or fetched) of all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FolderProgress {
    /// Files of the folder's version.
    pub files: usize,
    /// Of those, files there.
    pub files_done: usize,
    /// Bytes of the folder's version.
    pub bytes: u64,
    /// Of those, bytes there.
    pub bytes_done: u64,
}

impl FolderProgress {
    /// Before anything is fetched: the files `here` are done, the `others` to do.
    fn start(here: &[Entry], others: &[&[Entry]]) -> Self {
        let count = |es: &[Entry]| (es.len(), es.iter().map(|e| e.size).sum::<u64>());
        let (files_done, bytes_done) = count(here);
        let (mut files, mut bytes) = (files_done, bytes_done);
        for (f, b) in others.iter().map(|es| count(es)) {
            files += f;
            bytes += b;
        }
        Self {
            files,
            files_done,
            bytes,
            bytes_done,
        }
    }
}

/// Refuses a folder download without `--update` where files differ here, naming them all.
fn refuse_differing(name: &FilePath, differ: &[Entry]) -> anyhow::Result<()> {
    let differ: Vec<String> = (differ.iter())
        .map(|e| format!("{name}/{}", e.path))
        .collect();
    bail!(
        "{} already exist{} with different content: {}; not overwriting (use --update to make the folder the peers' version, or --output to save elsewhere)",
        differ.len(),
        if differ.len() == 1 { "s" } else { "" },
        differ.join(", ")
    )
}

/// What a folder download did.
#[derive(Debug)]
pub struct FolderDownloaded {
    /// The folder.
    pub name: FilePath,
    /// Where it is.
    pub target: PathBuf,
    /// The folder's version.
    pub version: Hash32,
    /// Its files, by path.
    pub files: Vec<FolderFile>,
    /// Peers that took no part, and why.
    pub left_out: Vec<(PeerId, String)>,
    /// Bytes fetched from each peer.
    pub peers: BTreeMap<String, u64>,
    /// Files we held in the folder that its version lacks (`--update`): moved to the displaced
    /// versions, never destroyed.
    pub displaced: Vec<FilePath>,
    /// Bytes copied from files we already held.
    pub reused_bytes: u64,
    /// Bytes of the peers' replies that crossed the wire.
    pub wire_bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl FolderDownloaded {
    /// Counts each file's outcome in.
    fn add(&mut self, files: Vec<(Entry, EntryFetched)>) {
        for (entry, got) in files {
            self.wire_bytes += got.wire_bytes;
            self.reused_bytes += got.reused_bytes;
            for (peer, bytes) in got.peers {
                *self.peers.entry(peer).or_default() += bytes;
            }
            let status = got.status;
            self.files.push(FolderFile { entry, status });
        }
    }

    /// Whether anything was written.
    pub fn changed(&self) -> bool {
        !self.displaced.is_empty()
            || self
                .files
                .iter()
                .any(|f| f.status != FileStatus::AlreadyPresent)
    }
}

/// Files of a folder fetched at once (most are small: round trips, not bytes).
const FILES_IN_FLIGHT: usize = 32;
/// Of those, files fetched as a single file is (in chunks from every peer, resumable).
const SESSIONS_IN_FLIGHT: usize = 8;
/// Files up to this size are fetched whole in one request from one peer, checked against the
/// BLAKE3 the folder's version names, and committed in batches ([`Batch`]).
const SMALL_FILE: u64 = crate::wire::protocol::MAX_WHOLE_FILE;

/// What the files of one folder download share.
struct Fetching<'a> {
    req: &'a DownloadRequest,
    members: &'a [PeerId],
    /// Peers outside the version that hold some of its small files elsewhere.
    holders: &'a Holders,
    /// Peers that answered without serving the version: one may start downloading a large file
    /// of it too (a crowd), and then serves what it has of it.
    others: &'a [PeerId],
    held: &'a HashMap<Hash32, PathBuf>,
    folder: &'a Path,
    /// Told to stop as a whole (interrupted, or one file failed): each file in flight stops and
    /// keeps its partial file for the re-run.
    stop: tokio_util::sync::CancellationToken,
    /// Small files waiting for their batch.
    batch: Arc<Batch>,
    /// Requests in flight to each member, then each holder, to ask the least busy one.
    load: Vec<AtomicUsize>,
    sessions: tokio::sync::Semaphore,
}

/// What fetching one file of a folder did.
struct EntryFetched {
    status: FileStatus,
    wire_bytes: u64,
    reused_bytes: u64,
    /// Bytes fetched from each peer.
    peers: Vec<(String, u64)>,
}

impl<'a> Fetching<'a> {
    fn new(
        req: &'a DownloadRequest,
        (members, holders, others): (&'a [PeerId], &'a Holders, &'a [PeerId]),
        held: &'a HashMap<Hash32, PathBuf>,
        folder: &'a Path,
        batch: Arc<Batch>,
    ) -> Self {
        let load = (members.iter().chain(holders.iter().map(|h| &h.0)))
            .map(|_| AtomicUsize::new(0))
            .collect();
        Self {
            req,
            members,
            holders,
            others,
            held,
            folder,
            stop: Default::default(),
            batch,
            load,
            sessions: tokio::sync::Semaphore::new(SESSIONS_IN_FLIGHT),
        }
    }
}

impl EntryFetched {
    /// A file that was there already.
    fn present() -> Self {
        Self {
            status: FileStatus::AlreadyPresent,
            wire_bytes: 0,
            reused_bytes: 0,
            peers: Vec::new(),
        }
    }
}

/// The versions of the folder the peers serve, and the peers left out.
type Asked = (Vec<(PeerId, Vec<Entry>)>, Vec<(PeerId, String)>, Holders);

/// Each answering peer's files by content (BLAKE3) and one path it serves it under: a peer
/// outside the folder's version may still serve a file of it that it holds elsewhere.
type Holders = Vec<(PeerId, HashMap<Hash32, FilePath>)>;

impl Node {
    /// `download FOLDER`: every file under the folder, until done or `interrupt`; `progress`
    /// hears how far it is once the files there are known, then after each file.
    pub async fn download_folder(
        &self,
        req: &DownloadRequest,
        interrupt: impl Future<Output = ()>,
        mut progress: impl FnMut(FolderProgress),
    ) -> anyhow::Result<FolderDownloaded> {
        let started = Instant::now();
        let name = &req.name;
        let target = match &req.output {
            Some(p) if p.is_dir() => p.join(name.as_str()),
            Some(p) => p.clone(),
            None => self.served_dir().join(name.as_str()),
        };
        // Level by level where every peer can; else every peer's whole tree.
        let (version, members, left_out, mut holders, others, sorted);
        let mut walked = None;
        match self.ask_levels(req, &target).await? {
            Some(found) => {
                let folder = target.clone();
                let (entries, local) = (found.entries, found.local);
                let look = move || (levels::sort_out(&folder, entries, &local.entries), local);
                let local;
                (sorted, local) = tokio::task::spawn_blocking(look).await?;
                walked = Some(local);
                (version, members) = (found.version, found.members);
                (left_out, others) = (found.left_out, found.others);
                holders = Holders::new();
            }
            None => {
                let (serving, mut out, mut all) = self.ask_folder(req).await?;
                let (v, entries, m) = choose_version(name, serving, req.blake3, &mut out)?;
                // The members serve every file under its path already.
                all.retain(|(peer, _)| !m.contains(peer));
                let folder = target.clone();
                sorted =
                    tokio::task::spawn_blocking(move || levels::look(&folder, entries)).await?;
                (version, members, left_out, holders) = (v, m, out, all);
                others = Vec::new();
            }
        }
        let mut done = FolderDownloaded {
            name: name.clone(),
            target,
            version,
            files: Vec::new(),
            left_out,
            peers: BTreeMap::new(),
            displaced: Vec::new(),
            reused_bytes: 0,
            wire_bytes: 0,
            elapsed: Duration::ZERO,
        };
        let (here, missing, differ) = sorted;
        // Without --update, local files that differ from the version are refused before any
        // byte is fetched, all named at once.
        if !req.update && !differ.is_empty() {
            refuse_differing(name, &differ)?;
        }
        let mut now = FolderProgress::start(&here, &[&missing, &differ]);
        progress(now);
        let mut one_more = |size: u64| {
            now.files_done += 1;
            now.bytes_done += size;
            progress(now);
        };
        // Peers outside the version may hold missing files elsewhere: their trees are listed.
        if !missing.is_empty() && !others.is_empty() {
            holders = self.holders(&others).await;
        }
        // Where we hold the content of a missing file already (the files of its size only).
        let held = match missing.is_empty() {
            true => HashMap::new(),
            false => self.held_by_content(missing.iter().map(|e| e.size).collect())?,
        };
        let wanted = missing.into_iter().chain(differ).collect();
        let journal = walked.as_ref().and_then(|w| w.journal());
        let batch = Arc::new(Batch::noting(journal, &self.served_dir()));
        let with = Fetching::new(
            req,
            (&members, &holders, &others),
            &held,
            &done.target,
            batch.clone(),
        );
        let fetched = self.fetch_all(with, wanted, interrupt, &mut one_more).await;
        // What was hashed here and what was written, for the next run (even if this one failed).
        levels::save_hashes(walked).await;
        let mut files = fetched?;
        files.extend(here.into_iter().map(|e| (e, EntryFetched::present())));
        files.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        done.add(files);
        if req.update {
            done.displaced = displace_others(&done.target, &done.files)?;
        }
        done.elapsed = started.elapsed();
        Ok(done)
    }

    /// Every file of `entries` into `target`, several at once; sorted by path.
    async fn fetch_all(
        &self,
        shared: Fetching<'_>,
        entries: Vec<Entry>,
        interrupt: impl Future<Output = ()>,
        done: &mut impl FnMut(u64),
    ) -> anyhow::Result<Vec<(Entry, EntryFetched)>> {
        let name = &shared.req.name;
        let stop = shared.stop.clone();
        let shared = &shared;
        let mut fetching =
            futures_util::stream::iter(entries.into_iter().map(|entry| async move {
                let got = self.fetch_entry(shared, &entry).await;
                (entry, got)
            }))
            .buffer_unordered(FILES_IN_FLIGHT);
        tokio::pin!(interrupt);
        let (mut files, mut failed) = (Vec::new(), None);
        loop {
            let next = tokio::select! {
                next = fetching.next() => next,
                () = &mut interrupt, if !stop.is_cancelled() => {
                    stop.cancel();
                    continue;
                }
            };
            let Some((entry, got)) = next else { break };
            match got {
                Ok(got) => {
                    done(entry.size);
                    files.push((entry, got));
                }
                // Told to stop: its partial file is kept.
                Err(e) if stop.is_cancelled() && interrupted_by(&e) => {}
                Err(e) => {
                    stop.cancel();
                    let e = e.context(format!("downloading {name}/{}", entry.path));
                    failed.get_or_insert(e);
                }
            }
        }
        drop(fetching);
        // What was fetched and checked is kept, whatever stopped the rest.
        let batch = shared.batch.clone();
        let committed = tokio::task::spawn_blocking(move || batch.commit()).await?;
        if let Some(e) = failed {
            return Err(e);
        }
        committed.with_context(|| format!("saving the files of {name}/"))?;
        if stop.is_cancelled() {
            bail!("downloading {name}/: interrupted; run the same command again to resume");
        }
        files.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        Ok(files)
    }

    /// The files of each of `peers` by content, from their whole trees (a peer that does
    /// not answer holds nothing).
    async fn holders(&self, peers: &[PeerId]) -> Holders {
        let lists = join_all(peers.iter().map(|peer| async move {
            let client = self.client(&self.entry(peer)?).await?;
            client.list().await.map(|(files, _, _)| files)
        }))
        .await;
        (peers.iter().zip(lists))
            .filter_map(|(peer, files)| {
                let files = files.ok()?;
                let held = files.into_iter().map(|f| (f.blake3, f.name));
                Some((peer.clone(), held.collect()))
            })
            .collect()
    }

    /// Every peer's files under the folder (from its whole listing), or why it is left out.
    async fn ask_folder(&self, req: &DownloadRequest) -> anyhow::Result<Asked> {
        let peers: Vec<_> = self.select(&req.peers)?;
        let peers: Vec<_> = peers.into_iter().filter(|e| e.id != self.me).collect();
        if peers.is_empty() {
            bail!("no peer to download {}/ from", req.name);
        }
        let answers = join_all(peers.iter().map(|entry| async move {
            let client = self.client(entry).await?;
            if !client.has_folders() {
                return Err(crate::net::client::ClientError::NoFolders {
                    peer: entry.id.clone(),
                });
            }
            client.list().await.map(|(files, _, _)| files)
        }))
        .await;
        let (mut serving, mut left_out, mut holders) = (Vec::new(), Vec::new(), Vec::new());
        for (entry, answer) in peers.into_iter().zip(answers) {
            match answer {
                Ok(files) => {
                    let small = (files.iter())
                        .filter(|f| f.size <= SMALL_FILE)
                        .map(|f| (f.blake3, f.name.clone()));
                    holders.push((entry.id.clone(), small.collect()));
                    let files = files.into_iter().map(|f| (f.name, f.size, f.blake3));
                    let entries = folder::entries_under(&req.name, files);
                    if entries.is_empty() {
                        let why = format!("does not serve the folder {}/", req.name);
                        left_out.push((entry.id, why));
                    } else {
                        serving.push((entry.id, entries));
                    }
                }
                Err(e) => left_out.push((entry.id, e.to_string())),
            }
        }
        Ok((serving, left_out, holders))
    }

    /// Where each content we serve of one of `sizes` is, by BLAKE3 (to copy a moved or renamed
    /// file, not fetch it).
    fn held_by_content(&self, sizes: HashSet<u64>) -> anyhow::Result<HashMap<Hash32, PathBuf>> {
        let store = Store::open(self.served_dir())?;
        let listed = store.list_sized(&sizes)?;
        Ok(listed
            .into_iter()
            .map(|(path, m)| (m.blake3(), store.path_of(&path)))
            .collect())
    }

    /// One file of the folder: already there, copied from our own copy of its content, fetched
    /// whole if it is small, or else fetched as a single file is from the peers serving the
    /// folder's version.
    async fn fetch_entry(
        &self,
        with: &Fetching<'_>,
        entry: &Entry,
    ) -> anyhow::Result<EntryFetched> {
        let folder = with.folder;
        let root = folder.parent().unwrap_or(Path::new("."));
        let base = folder.file_name().and_then(|n| n.to_str());
        let inside = FilePath::new(format!("{}/{}", base.unwrap_or_default(), entry.path))?;
        crate::store::make_folders(root, &inside)?;
        let target = folder.join(entry.path.as_str());
        let mut got = EntryFetched::present();
        match Seen::of(&target) {
            Ok(Some(seen)) if seen.blake3 == entry.blake3 => return Ok(got),
            Ok(None) => {
                if let Some(from) = with.held.get(&entry.blake3)
                    && copy_verified(from, &target, &entry.blake3)?
                {
                    (got.status, got.reused_bytes) = (FileStatus::Copied, entry.size);
                    return Ok(got);
                }
                if entry.size <= SMALL_FILE {
                    return self.fetch_small(with, entry, target).await;
                }
            }
            _ => {}
        }
        let req = with.req;
        // Peers outside the version that hold this content elsewhere serve its chunks too.
        let mut asking = Asking::new(self);
        let mut peers = with.members.to_vec();
        for (peer, files) in with.holders {
            if let Some(at) = files.get(&entry.blake3) {
                asking.aliases.insert(peer.clone(), at.clone());
                peers.push(peer.clone());
            }
        }
        let joining = with
            .others
            .iter()
            .filter(|p| !asking.aliases.contains_key(*p));
        peers.extend(joining.cloned());
        let plan = Plan {
            name: FilePath::new(format!("{}/{}", req.name, entry.path))?,
            target,
            peers,
            blake3: Some(entry.blake3),
            window: req.window,
            update: req.update,
            // In our served_files, what verifies is offered to the crowd as it arrives.
            offer_as: (folder == self.served_dir().join(req.name.as_str()))
                .then(|| self.me.clone()),
        };
        let _permit = with.sessions.acquire().await?;
        let fetched = session::download(&asking, &plan, with.stop.cancelled(), |_| {}).await?;
        got.wire_bytes = fetched.wire_bytes;
        got.reused_bytes = fetched.reused_bytes;
        let sources = fetched.report.iter().flat_map(|r| &r.sources);
        got.peers = sources.map(|s| (s.name.clone(), s.bytes)).collect();
        got.status = match fetched.status {
            Fetched::Downloaded => FileStatus::Downloaded,
            Fetched::AlreadyPresent => FileStatus::AlreadyPresent,
            Fetched::Updated => FileStatus::Updated,
        };
        Ok(got)
    }

    /// A small file we lack, whole in one request from the least busy peer that holds it (a
    /// member under its path, or a holder under its own; the next one if that fails or sends
    /// other content), checked against its BLAKE3 and staged for the batch.
    async fn fetch_small(
        &self,
        with: &Fetching<'_>,
        entry: &Entry,
        target: PathBuf,
    ) -> anyhow::Result<EntryFetched> {
        let name = FilePath::new(format!("{}/{}", with.req.name, entry.path))?;
        let members = with.members.iter().map(|p| (p, &name));
        let holders = (with.holders.iter())
            .map(|(p, files)| (p, files.get(&entry.blake3)))
            .map(|(p, at)| at.map(|at| (p, at)));
        let mut order: Vec<(usize, &PeerId, &FilePath)> = (members.map(Some).chain(holders))
            .enumerate()
            .filter_map(|(i, c)| c.map(|(p, at)| (i, p, at)))
            .collect();
        order.sort_by_key(|&(i, ..)| with.load[i].load(Ordering::Relaxed));
        let mut why = Vec::new();
        for (i, peer, name) in order {
            let read = async {
                if entry.size == 0 {
                    return Ok(Received::default());
                }
                let client = self.client(&self.entry(peer)?).await?;
                // A small file's size fits a request's length.
                let size = u32::try_from(entry.size).unwrap_or(u32::MAX);
                client.read_file(name, entry.blake3, size).await
            };
            with.load[i].fetch_add(1, Ordering::Relaxed);
            let got = tokio::select! {
                got = read => got,
                () = with.stop.cancelled() => {
                    with.load[i].fetch_sub(1, Ordering::Relaxed);
                    bail!("interrupted");
                }
            };
            with.load[i].fetch_sub(1, Ordering::Relaxed);
            let got = match got {
                Ok(got) => got,
                Err(e) => {
                    why.push(format!("{peer}: {e}"));
                    continue;
                }
            };
            if got.data.len() as u64 != entry.size
                || blake3::hash(&got.data).as_bytes() != &entry.blake3
            {
                why.push(format!("{peer}: sent other content"));
                continue;
            }
            let (batch, blake3) = (with.batch.clone(), entry.blake3);
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                if batch.stage(&target, &got.data, blake3)? {
                    batch.commit()?;
                }
                Ok(())
            })
            .await??;
            return Ok(EntryFetched {
                status: FileStatus::Downloaded,
                wire_bytes: got.wire,
                reused_bytes: 0,
                peers: vec![(peer.to_string(), entry.size)],
            });
        }
        bail!("no peer sent it ({})", why.join("; "))
    }
}

/// Whether a file's download ended because it was told to stop (its partial file is kept).
fn interrupted_by(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.to_string() == "interrupted")
}

/// Groups the peers by the version of the folder they serve and picks one: `wanted`, else the
/// one most peers serve (the first asked among equals). The others are added to `left_out`.
fn choose_version(
    name: &FilePath,
    serving: Vec<(PeerId, Vec<Entry>)>,
    wanted: Option<Hash32>,
    left_out: &mut Vec<(PeerId, String)>,
) -> anyhow::Result<(Hash32, Vec<Entry>, Vec<PeerId>)> {
    let mut versions: Vec<(Hash32, Vec<Entry>, Vec<PeerId>)> = Vec::new();
    for (peer, entries) in serving {
        let v = folder::version(&entries);
        match versions.iter_mut().find(|(w, ..)| *w == v) {
            Some((.., peers)) => peers.push(peer),
            None => versions.push((v, entries, vec![peer])),
        }
    }
    let chosen = match wanted {
        Some(w) => versions.iter().position(|(v, ..)| *v == w),
        None => (0..versions.len())
            .rev()
            .max_by_key(|&i| versions[i].2.len()),
    };
    let Some(chosen) = chosen else {
        let why: Vec<String> = left_out.iter().map(|(p, w)| format!("{p}: {w}")).collect();
        bail!("no peer serves the folder {name}/ ({})", why.join("; "));
    };
    let chosen = versions.swap_remove(chosen);
    for (other, _, peers) in versions {
        let why = format!("serves another version of {name}/ ({})", hex(&other));
        left_out.extend(peers.into_iter().map(|p| (p, why.clone())));
    }
    Ok(chosen)
}

/// Moves the files under `folder` that `files` (the version) lacks into the displaced versions
/// beside each; their paths inside the folder. Hidden entries and symlinks are left alone.
fn displace_others(folder: &Path, files: &[FolderFile]) -> anyhow::Result<Vec<FilePath>> {
    let wanted: HashSet<&str> = files.iter().map(|f| f.entry.path.as_str()).collect();
    let walker = crate::store::walk_tree(folder);
    let mut displaced = Vec::new();
    for entry in walker.filter_map(Result::ok) {
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let Some(path) = (entry.path().strip_prefix(folder).ok())
            .and_then(|r| r.to_str())
            .and_then(|r| FilePath::new(r).ok())
        else {
            continue;
        };
        if wanted.contains(path.as_str()) {
            continue;
        }
        let Some(seen) = Seen::of(entry.path())? else {
            continue;
        };
        crate::store::displace(entry.path(), &seen.blake3)?;
        displaced.push(path);
    }
    displaced.sort();
    Ok(displaced)
}

/// Copies `from` to `to` if its content still hashes to `blake3`: into a hidden temporary file
/// beside `to`, checked, then linked under the name (never over a file that appeared meanwhile).
/// False if the content changed (the caller fetches it instead).
fn copy_verified(from: &Path, to: &Path, blake3: &Hash32) -> anyhow::Result<bool> {
    let dir = to.parent().unwrap_or(Path::new("."));
    let base = to.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temp = dir.join(format!(".{base}.copy-{}.part", std::process::id()));
    let result = (|| -> anyhow::Result<bool> {
        std::fs::copy(from, &temp).with_context(|| format!("copying {}", from.display()))?;
        let mut hasher = blake3::Hasher::new();
        let mut file = std::fs::File::open(&temp)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        if hasher.finalize().as_bytes() != blake3 {
            return Ok(false);
        }
        file.sync_all()?;
        match std::fs::hard_link(&temp, to) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e).with_context(|| format!("saving {}", to.display())),
        }
    })();
    let _ = std::fs::remove_file(&temp);
    result
}
