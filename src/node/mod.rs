//! The node session: who we are, the peer table and pinned certificates, our UDP endpoints and
//! the connections to peers, and the use cases — list, upload, download, serve — each returning a
//! typed outcome. Nothing here prints: `cli` and `shell` render what comes back.
//!
//! A download starts as soon as it knows which version to fetch: when every peer has answered, or
//! [`DOWNLOAD_GRACE`] after the first answer that serves the file (at once when the wanted
//! version is given). Peers answering later join the running download if they serve that version.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;

use crate::engine::choice;
use crate::model::delta::{Sig, SigKind, Tree};
use crate::model::manifest::{FileName, Hash32, Manifest, Regrain, hex};
use crate::model::peers::{PeerEntry, PeerId, PeerTable, Root};
use crate::net::client::{Changes, Client, ClientError, Offer, PeerSource, Redial};
use crate::net::identity::{self, Identity, InitOutcome};
use crate::net::server::{self, Server};
use crate::net::tls::{self, Pins};
use crate::store::{Check, Committed, PartialFile, Seen, Store, StoreError};
use crate::transfer::download::{self, Options, Progress};
use crate::transfer::update;
use crate::wire::codec;
use crate::wire::protocol::{FileEntry, Incomplete};

/// How long a client command waits for its connection closes to be sent.
pub const CLOSE_GRACE: Duration = Duration::from_millis(15);

/// How long a download waits before asking again the peers that held nothing of the file (they
/// may have started downloading it too); the pause doubles up to [`ASK_AGAIN_MAX`].
pub const ASK_AGAIN: Duration = Duration::from_millis(500);
/// The longest pause between two such askings.
pub const ASK_AGAIN_MAX: Duration = Duration::from_secs(4);

/// How long a download waits for more peers after the first one that serves the file answers.
/// Answers from peers that are up arrive within a round trip or two of each other; a peer that is
/// down would otherwise hold the start for the whole connect timeout.
pub const DOWNLOAD_GRACE: Duration = Duration::from_millis(250);

/// Reads and checks `peer_settings.txt`; `me` must be listed.
pub fn load_peers(root: &Root, me: &PeerId) -> anyhow::Result<PeerTable> {
    let path = root.settings_path();
    let (bytes, _) =
        crate::model::peers::read_small_file(&path, crate::model::peers::MAX_SETTINGS_LEN)
            .with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", path.display()))?;
    let table = PeerTable::parse(&text).with_context(|| format!("in {}", path.display()))?;
    if table.get(me).is_none() {
        bail!(
            "unknown peer ID {me}: it is not listed in {}",
            path.display()
        );
    }
    Ok(table)
}

/// Why one peer's part of a command failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerFailure {
    /// Talking to the peer failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The peer is us.
    #[error("{0} is this peer; the file is already ours to serve")]
    IsMe(PeerId),
    /// Reading our own files failed.
    #[error(transparent)]
    Local(anyhow::Error),
}

impl PeerFailure {
    /// Whether the peer refused because a different file has that name.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Client(c) if c.remote_kind() == Some(crate::wire::protocol::ErrorKind::Conflict))
    }
}

/// What the use cases return, for the command line to render.
pub use crate::net::client::UploadStatus;
pub use crate::transfer::download::DownloadReport;

/// One peer's files.
#[derive(Debug)]
pub struct Listing {
    /// The files, by name (the first `protocol::MAX_LISTED_FILES` if there are more).
    pub files: Vec<FileEntry>,
    /// How many files the peer serves.
    pub total: u64,
    /// Its downloads in progress, not served as whole files.
    pub incomplete: Vec<Incomplete>,
}

/// What an upload did, per peer.
#[derive(Debug)]
pub struct Uploaded {
    /// The name the file was uploaded as.
    pub name: FileName,
    /// Its size.
    pub size: u64,
    /// Each peer's outcome, in the order asked.
    pub results: Vec<(PeerId, Result<UploadStatus, PeerFailure>)>,
}

/// A validated download request.
#[derive(Debug, Clone)]
pub struct DownloadRequest {
    /// The file.
    pub name: FileName,
    /// Peers to fetch from (empty: every other peer).
    pub peers: Vec<PeerId>,
    /// Where to write it (a folder means FOLDER/NAME); default our served_files/NAME.
    pub output: Option<PathBuf>,
    /// The version wanted, if given.
    pub blake3: Option<Hash32>,
    /// A fixed request window per peer, if given.
    pub window: Option<usize>,
    /// Bring another version we hold up to date instead of refusing.
    pub update: bool,
}

/// Why a peer took no part in a download.
#[derive(Debug)]
pub enum LeftOut {
    /// It does not serve the file.
    DoesNotServe(FileName),
    /// It serves another version.
    OtherVersion(FileName, Hash32),
    /// It could not be reached or asked.
    Failed(ClientError),
    /// It had not answered when the download finished.
    TooLate,
    /// It joined a download in pieces but serves only chunks (an older qnode).
    NoPieces,
}

impl std::fmt::Display for LeftOut {
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

/// What happens during a download, for progress display.
#[derive(Debug)]
pub enum DownloadEvent<'a> {
    /// A peer takes no part (reported once per peer, as soon as it is known).
    LeftOut(&'a PeerId, &'a LeftOut),
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
pub struct Downloaded {
    /// The file.
    pub name: FileName,
    /// Where it is.
    pub target: PathBuf,
    /// The version fetched.
    pub manifest: Arc<Manifest>,
    /// How it ended.
    pub status: Fetched,
    /// The transfer, if there was one.
    pub report: Option<DownloadReport>,
    /// The peers that took no part, and why.
    pub left_out: Vec<(PeerId, LeftOut)>,
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

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Largest upload accepted, in bytes.
    pub max_upload_size: u64,
    /// Listen here instead of our address in peer_settings.txt.
    pub listen: Option<SocketAddr>,
    /// Cap on file data sent to all peers together, in bytes per second.
    pub max_upload_rate: Option<u64>,
    /// Congestion controller.
    pub congestion: tls::Congestion,
    /// When file data sent to `qnode/2` peers is compressed.
    pub compression: codec::Mode,
}

/// Serves our files until `shutdown` resolves.
pub async fn serve(
    root: &Root,
    me: &PeerId,
    opts: &ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let peers = load_peers(root, me)?;
    let (identity, outcome) =
        identity::init(root, me).with_context(|| format!("initialising {me}"))?;
    if outcome == InitOutcome::Created {
        tracing::info!(
            "created a new identity; copy {} to every peer",
            root.cert_path(me).display()
        );
    }
    let mut pins = Pins::default();
    for entry in peers.entries() {
        match identity::load_cert(root, &entry.id) {
            Ok(cert) => pins.insert(entry.id.clone(), &cert),
            Err(e) => tracing::warn!("{} cannot connect to us: {e}", entry.id),
        }
    }
    let store = Arc::new(Store::open(root.served_dir(me))?);
    match store.remove_stale_uploads() {
        Ok((0, _)) => {}
        Ok((files, bytes)) => tracing::info!(
            "removed {files} upload temporary files and unfinished replaces left by an earlier run ({bytes} bytes)"
        ),
        Err(e) => tracing::warn!("could not look for stale upload files: {e}"),
    }
    let config = tls::server_config(&identity, pins.clone(), opts.congestion)?;
    // peer_settings.txt lists us, checked by load_peers.
    let addr = opts
        .listen
        .or(peers.get(me).map(|e| e.addr))
        .context("no address to listen on")?;
    let (endpoint, capped) =
        tls::bind_endpoint(addr, Some(config), Some(tls::reset_key(&identity)))
            .with_context(|| format!("listening on {addr}"))?;
    if let Some(granted) = capped {
        tracing::warn!(
            "the kernel capped the UDP receive buffer at {granted} bytes (wanted {}); raise net.core.rmem_max for full speed",
            tls::UDP_BUFFER
        );
    }
    tracing::info!("{me} serving {} on {addr}", store.dir().display());
    let mut server = Server::new(
        me.clone(),
        store,
        pins,
        opts.max_upload_size,
        opts.max_upload_rate.map(server::RateLimit::new),
    );
    server.compression = opts.compression;
    let server = Arc::new(server);
    server::run(endpoint, server, shutdown).await;
    Ok(())
}

/// A client-side session: who we are, the peers, and connections reused across commands.
pub struct Node {
    root: Root,
    me: PeerId,
    peers: PeerTable,
    identity: Identity,
    endpoints: Mutex<HashMap<bool, quinn::Endpoint>>,
    clients: tokio::sync::Mutex<HashMap<PeerId, Client>>,
}

impl Node {
    /// Loads the settings and our identity.
    pub fn load(root: &Root, me: &PeerId) -> anyhow::Result<Self> {
        let peers = load_peers(root, me)?;
        let identity = identity::load(root, me)?;
        Ok(Self {
            root: root.clone(),
            me: me.clone(),
            peers,
            identity,
            endpoints: Mutex::default(),
            clients: tokio::sync::Mutex::default(),
        })
    }

    /// Who we are.
    pub fn me(&self) -> &PeerId {
        &self.me
    }

    /// Our own served_files folder.
    pub fn served_dir(&self) -> PathBuf {
        self.root.served_dir(&self.me)
    }

    /// Closes every connection and gives the closes a moment to leave.
    ///
    /// quinn's `wait_idle` waits out the draining period (3 × PTO, about 80 ms even on loopback,
    /// since PTO includes the 25 ms ACK delay) only to resend the close if it was lost; the close
    /// itself goes out at once. A lost close costs the peer an idle timeout, nothing else, so the
    /// wait is capped at [`CLOSE_GRACE`].
    pub async fn finish(&self) {
        for client in self.clients.lock().await.values() {
            client.close();
        }
        let endpoints: Vec<quinn::Endpoint> = self.lock_endpoints().values().cloned().collect();
        for endpoint in endpoints {
            let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
        }
    }

    fn lock_endpoints(&self) -> std::sync::MutexGuard<'_, HashMap<bool, quinn::Endpoint>> {
        // Only ever held for a lookup or insert of a whole entry, so never inconsistent.
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn endpoint_for(&self, addr: SocketAddr) -> Result<quinn::Endpoint, String> {
        let mut endpoints = self.lock_endpoints();
        if let Some(e) = endpoints.get(&addr.is_ipv6()) {
            return Ok(e.clone());
        }
        let any: SocketAddr = if addr.is_ipv6() {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
        };
        let (endpoint, capped) = tls::bind_endpoint(any, None, None)
            .map_err(|e| format!("binding a UDP socket: {e}"))?;
        if let Some(granted) = capped {
            tracing::debug!("UDP receive buffer capped at {granted} bytes");
        }
        endpoints.insert(addr.is_ipv6(), endpoint.clone());
        Ok(endpoint)
    }

    /// A connection to `entry`, reused if one is open.
    async fn client(&self, entry: &PeerEntry) -> Result<Client, ClientError> {
        if let Some(c) = self.clients.lock().await.get(&entry.id)
            && c.is_open()
        {
            return Ok(c.clone());
        }
        let dial = self.redial(entry)?;
        let client = Client::connect(&dial.endpoint, dial.config, &entry.id, entry.addr).await?;
        self.clients
            .lock()
            .await
            .insert(entry.id.clone(), client.clone());
        Ok(client)
    }

    /// What connecting to `entry` needs: our endpoint and a configuration pinning its certificate.
    fn redial(&self, entry: &PeerEntry) -> Result<Redial, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            peer: entry.id.clone(),
            addr: entry.addr,
            reason,
        };
        let pinned =
            identity::load_cert(&self.root, &entry.id).map_err(|e| unreachable(e.to_string()))?;
        let config = tls::client_config(&self.identity, &entry.id, pinned)
            .map_err(|e| unreachable(e.to_string()))?;
        let endpoint = self.endpoint_for(entry.addr).map_err(unreachable)?;
        Ok(Redial {
            endpoint,
            config,
            addr: entry.addr,
        })
    }

    fn select(&self, named: &[PeerId]) -> anyhow::Result<Vec<PeerEntry>> {
        Ok(self.peers.select(&self.me, named)?)
    }

    /// `list`: every named peer's files (default: every other peer), in the order named.
    pub async fn list(
        &self,
        peers: &[PeerId],
    ) -> anyhow::Result<Vec<(PeerId, Result<Listing, PeerFailure>)>> {
        let targets = self.select(peers)?;
        let results = join_all(targets.iter().map(|entry| async move {
            if entry.id == self.me {
                return self.list_own().await.map_err(PeerFailure::Local);
            }
            let (files, total, incomplete) = self.client(entry).await?.list().await?;
            Ok(Listing {
                files,
                total,
                incomplete,
            })
        }))
        .await;
        Ok(targets.into_iter().map(|e| e.id).zip(results).collect())
    }

    /// Our own files and downloads in progress, read locally (a peer does not connect to
    /// itself).
    async fn list_own(&self) -> anyhow::Result<Listing> {
        let dir = self.served_dir();
        let (files, held) = tokio::task::spawn_blocking(move || {
            let store = Store::open(dir)?;
            anyhow::Ok((store.list()?, store.held_all()?))
        })
        .await??;
        Ok(Listing {
            total: files.len() as u64,
            files: files
                .into_iter()
                .map(|(name, m)| FileEntry::new(name, &m))
                .collect(),
            incomplete: held
                .into_iter()
                .map(|(name, h)| Incomplete::new(name, &h.manifest, h.bytes()))
                .collect(),
        })
    }

    /// `upload`: one file (a path, or a name in our served_files) to every named peer, its bytes
    /// compressed for `qnode/2` peers as `compression` says.
    pub async fn upload(
        &self,
        file: &Path,
        peers: &[PeerId],
        replace: bool,
        compression: codec::Mode,
    ) -> anyhow::Result<Uploaded> {
        let targets = self.select(peers)?;
        let (path, name) = self.resolve_upload(file)?;
        let p = path.clone();
        let hashed = tokio::task::spawn_blocking(move || hash_file(&p));
        // To replace, also the file's tree, computed beside the hash and still running while the
        // request travels: a peer holding another version asks only for what it lacks. It is
        // signed as `qnode/2` peers sign; one for a `qnode/1` peer is computed if one needs it.
        let tree_of = |kind| {
            let p = path.clone();
            let task = tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(&p)?;
                Tree::of(file, kind).map(Arc::new)
            });
            async move {
                match task.await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
            .boxed()
            .shared()
        };
        let current = replace.then(|| tree_of(SigKind::default()));
        let older = std::sync::OnceLock::new();
        let (size, hash) = hashed
            .await?
            .with_context(|| format!("reading {}", path.display()))?;
        let results = join_all(targets.iter().map(|entry| {
            let (path, name, current, older) = (&path, &name, &current, &older);
            async move {
                if entry.id == self.me {
                    return Err(PeerFailure::IsMe(entry.id.clone()));
                }
                let client = self.client(entry).await?;
                let kind = client.sig_kind();
                let tree = current.as_ref().map(|t| match kind {
                    k if k == SigKind::default() => t.clone(),
                    k => older.get_or_init(|| tree_of(k)).clone(),
                });
                let tree = tree.map(|t| async move { t.await.map_err(std::io::Error::other) });
                Ok(client
                    .upload(name, path, (size, hash), tree, compression)
                    .await?)
            }
        }))
        .await;
        Ok(Uploaded {
            name,
            size,
            results: targets.into_iter().map(|e| e.id).zip(results).collect(),
        })
    }

    fn resolve_upload(&self, file: &Path) -> anyhow::Result<(PathBuf, FileName)> {
        let served = self.served_dir();
        let path = if file.exists() {
            file.to_owned()
        } else if file.components().count() == 1 && served.join(file).exists() {
            served.join(file)
        } else {
            bail!(
                "no such file: {} (neither a path nor a file in {})",
                file.display(),
                served.display()
            );
        };
        let meta =
            std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        let base = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} has no usable file name", path.display()))?;
        Ok((path.clone(), FileName::new(base)?))
    }

    /// `download`: fetch one file from every peer that serves it, until done or `interrupt`.
    pub async fn download(
        &self,
        req: &DownloadRequest,
        interrupt: impl Future<Output = ()>,
        on: impl FnMut(DownloadEvent<'_>),
    ) -> anyhow::Result<Downloaded> {
        let started = Instant::now();
        let name = &req.name;
        let (target, candidates) = self.download_plan(req)?;
        let on = RefCell::new(on);
        let report =
            |peer: &PeerId, why: &LeftOut| (on.borrow_mut())(DownloadEvent::LeftOut(peer, why));

        // Ask everyone what they have under that name; start once the version is known.
        let mut asking: FuturesUnordered<_> = candidates
            .iter()
            .map(|entry| async move {
                let answer = match self.client(entry).await {
                    Ok(client) => client.observe(name).await.map(|o| (client, o)),
                    Err(e) => Err(e),
                };
                (entry, answer)
            })
            .collect();
        let mut answers = Answers::new(name.clone());
        answers
            .gather(&mut asking, candidates.len(), req.blake3)
            .await;
        // When no peer serves the file, the error names each peer's reason instead.
        let (manifest, members) = answers.agree(req.blake3)?;
        // Who may be downloading it too (`choice::crowd_hint`).
        let ids: Vec<String> = candidates.iter().map(|c| c.id.to_string()).collect();
        let asked: Vec<choice::Asked<'_>> = candidates
            .iter()
            .zip(&ids)
            .map(|(c, peer)| choice::Asked {
                peer,
                whole: members
                    .iter()
                    .any(|m| m.entry.id == c.id && m.offer.held.is_none()),
                left_out: answers
                    .left_out
                    .iter()
                    .any(|(p, why)| *p == c.id && !matches!(why, LeftOut::DoesNotServe(_))),
            })
            .collect();
        let crowd_hint = choice::crowd_hint(&asked);
        // Peers holding nothing of it yet are named at the end, if they never join.
        answers
            .left_out
            .iter()
            .filter(|(_, why)| !matches!(why, LeftOut::DoesNotServe(_)))
            .for_each(|(p, why)| report(p, why));
        let mut done = Downloaded {
            name: name.clone(),
            target,
            manifest: Arc::new(manifest),
            status: Fetched::AlreadyPresent,
            report: None,
            left_out: Vec::new(),
            elapsed: Duration::ZERO,
            reused_bytes: 0,
            range_bytes: HashMap::new(),
            update_liars: Vec::new(),
            wire_bytes: 0,
        };
        let manifest = done.manifest.clone();
        let target = done.target.clone();

        // Already there, or another version to bring up to date? (Only a peer holding the
        // file whole can tell its tree.)
        let first = members
            .iter()
            .find(|m| m.offer.held.is_none())
            .map(|m| m.client.clone());
        let (old, prefetched) = match look_at(&target, req.update, first, name, &manifest).await? {
            AtTarget::Same => {
                done.left_out = answers.left_out;
                done.elapsed = started.elapsed();
                return Ok(done);
            }
            AtTarget::Nothing => (None, None),
            AtTarget::Other(seen, prefetched) => (Some(seen), prefetched),
        };

        // In chunks or in pieces (`choice::in_pieces`).
        let tag = crate::store::download_tag(&manifest.blake3());
        let pieces = in_pieces(&members);
        let facts = choice::UnitFacts {
            crowd_hinted: !crowd_hint.is_empty(),
            partial_member: members.iter().any(|m| m.offer.held.is_some()),
            resumes: PartialFile::left_by_an_attempt(&target, &tag),
            updating: old.is_some(),
            pieces_known: pieces.is_some(),
        };
        let download = match pieces {
            Some(p) if choice::in_pieces(&facts) => Arc::new(p),
            _ => manifest.clone(),
        };
        let (join, sources) = mpsc::unbounded_channel();
        let opened = RefCell::new(Vec::new());
        for member in members {
            let source = Arc::new(self.source(name, member, &download)?);
            opened.borrow_mut().push(source.clone());
            let _ = join.send(source);
        }
        let (partial, mut have) = open_partial(&target, &download).await?;
        let resumed = bytes_of(&download, &have);
        if let Some(prefetched) = prefetched {
            let peers: Vec<_> = opened
                .borrow()
                .iter()
                .filter(|s| s.is_whole())
                .cloned()
                .collect();
            let filled = update::fill(&target, prefetched, &manifest, &partial, have, &peers);
            let filled = filled.await?;
            (done.reused_bytes, done.range_bytes, have) =
                (filled.reused, filled.fetched, filled.have);
            done.update_liars = filled.liars;
        }
        // Into our served_files: what it verifies is offered to other peers as it goes, and we
        // take our stripe of a crowd (see `Options::crowd_name`).
        let mut crowd_name = None;
        if target.parent() == Some(self.served_dir().as_path()) {
            let (p, m, h) = (partial.clone(), download.clone(), have.clone());
            match tokio::task::spawn_blocking(move || p.share(&m, &h)).await? {
                Ok(()) => crowd_name = Some(self.me.to_string()),
                Err(e) => {
                    tracing::warn!("not offering {name} to other peers while it downloads: {e}")
                }
            }
        }
        (on.borrow_mut())(DownloadEvent::Started(manifest.size()));
        let opts = Options {
            fixed_window: req.window,
            order_seed: Some(choice::order_seed(
                crowd_name.is_some(),
                &manifest.blake3(),
                fastrand::u64(..),
            )),
            crowd_name,
            crowd_hint,
            ..Options::default()
        };
        let engine = download::run(
            download.clone(),
            sources,
            partial.clone(),
            &have,
            &opts,
            |p| (on.borrow_mut())(DownloadEvent::Progress(p)),
        );
        // Peers that answer late join if they hold this version, and so do peers that held
        // nothing of it but start downloading it meanwhile.
        let late_left_out = RefCell::new(Vec::new());
        let absent: Vec<&PeerEntry> = answers
            .left_out
            .iter()
            .filter(|(_, why)| matches!(why, LeftOut::DoesNotServe(_)))
            .filter_map(|(p, _)| candidates.iter().find(|e| e.id == *p))
            .collect();
        let late = async {
            let (mut absent, mut asked_all, mut pause) = (absent, false, ASK_AGAIN);
            let again = tokio::time::sleep(pause);
            tokio::pin!(again);
            while !(asked_all && absent.is_empty()) {
                tokio::select! {
                    next = asking.next(), if !asked_all => {
                        let Some((entry, answer)) = next else {
                            asked_all = true;
                            continue;
                        };
                        answers.answered.push(entry.id.clone());
                        let late = (name, &*manifest, &*download);
                        match self.join_late(entry, answer, late, &join, &opened) {
                            None => {}
                            Some(LeftOut::DoesNotServe(_)) => absent.push(entry),
                            Some(why) => {
                                report(&entry.id, &why);
                                late_left_out.borrow_mut().push((entry.id.clone(), why));
                            }
                        }
                    }
                    // Beside the answers still awaited (a peer that is down takes the whole
                    // connect timeout), not after them.
                    () = &mut again, if !absent.is_empty() => {
                        let asked = std::mem::take(&mut absent);
                        let late = (name, &*manifest, &*download);
                        let out;
                        (absent, out) = self.ask_again(asked, late, &join, &opened).await;
                        for (peer, why) in out {
                            report(&peer, &why);
                            late_left_out.borrow_mut().push((peer, why));
                        }
                        pause = (pause * 2).min(ASK_AGAIN_MAX);
                        again.as_mut().reset((Instant::now() + pause).into());
                    }
                }
            }
            // No one else will join: the engine stops waiting for more sources.
            drop(join);
        };
        let outcome = until_engine_ends(engine, late, interrupt).await;
        // Connections made again during the download are not in the session's pool: close them.
        for source in opened.into_inner() {
            done.wire_bytes += source.wire_bytes();
            source.close().await;
        }
        // Peers that held nothing at first but joined later were not left out.
        let joined: Vec<PeerId> = outcome
            .as_ref()
            .and_then(|o| o.as_ref().ok())
            .map(|r| {
                r.sources
                    .iter()
                    .filter_map(|s| s.name.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        answers.left_out.retain(|(p, _)| !joined.contains(p));
        done.left_out = answers.all_left_out(late_left_out.into_inner(), &candidates);
        for (p, why) in &done.left_out {
            if matches!(why, LeftOut::DoesNotServe(_)) {
                report(p, why);
            }
        }
        let mut report = transferred(outcome, &partial, name, &target)?;
        // Chunks built from our old copy are reused, not resumed.
        report.resumed_bytes = report.resumed_bytes.min(resumed);
        done.status = save(partial, &download, &target, old).await?;
        done.report = Some(report);
        done.elapsed = started.elapsed();
        Ok(done)
    }
}

impl Node {
    /// Where a download goes, and whom to ask.
    fn download_plan(&self, req: &DownloadRequest) -> anyhow::Result<(PathBuf, Vec<PeerEntry>)> {
        let name = req.name.as_str();
        let target = match &req.output {
            Some(p) if p.is_dir() => p.join(name),
            Some(p) => p.clone(),
            None => self.served_dir().join(name),
        };
        let candidates: Vec<PeerEntry> = self
            .select(&req.peers)?
            .into_iter()
            .filter(|e| e.id != self.me)
            .collect();
        if candidates.is_empty() {
            bail!("no peer to download {name} from");
        }
        Ok((target, candidates))
    }

    /// A peer that answered after the download started: it joins if it serves `manifest`'s
    /// version; otherwise why it is left out.
    fn join_late(
        &self,
        entry: &PeerEntry,
        answer: Answer,
        (name, manifest, download): (&FileName, &Manifest, &Manifest),
        join: &mpsc::UnboundedSender<Arc<PeerSource>>,
        opened: &RefCell<Vec<Arc<PeerSource>>>,
    ) -> Option<LeftOut> {
        let why = match answer {
            Ok((_, Some((offer, _))))
                if offer.manifest == *manifest && download.in_pieces() && !offer.in_pieces =>
            {
                LeftOut::NoPieces
            }
            Ok((client, Some((offer, changes)))) if offer.manifest == *manifest => {
                let member = Served {
                    entry,
                    client,
                    offer,
                    changes,
                };
                match self.source(name, member, download) {
                    Ok(source) => {
                        let source = Arc::new(source);
                        opened.borrow_mut().push(source.clone());
                        let _ = join.send(source);
                        return None;
                    }
                    Err(e) => LeftOut::Failed(e),
                }
            }
            Ok((_, Some((offer, _)))) => {
                LeftOut::OtherVersion(name.clone(), offer.manifest.blake3())
            }
            Ok((_, None)) => LeftOut::DoesNotServe(name.clone()),
            Err(e) => LeftOut::Failed(e),
        };
        Some(why)
    }

    /// Asks the `absent` peers (which held nothing of the file) again; those that hold
    /// `manifest`'s version now (they started downloading it too, as a crowd starting at once
    /// does) join the download. Returns those that still hold nothing of it, and those that
    /// answered but cannot take part (another version, or an older qnode in a download in
    /// pieces), with why.
    async fn ask_again<'a>(
        &self,
        absent: Vec<&'a PeerEntry>,
        late: (&FileName, &Manifest, &Manifest),
        join: &mpsc::UnboundedSender<Arc<PeerSource>>,
        opened: &RefCell<Vec<Arc<PeerSource>>>,
    ) -> (Vec<&'a PeerEntry>, Vec<(PeerId, LeftOut)>) {
        let name = late.0;
        let answers = join_all(absent.iter().map(|&entry| async move {
            let answer = match self.client(entry).await {
                Ok(client) => client.observe(name).await.map(|o| (client, o)),
                Err(e) => Err(e),
            };
            (entry, answer)
        }))
        .await;
        // Joined, or another version, or unreachable now: not asked again.
        let (mut still, mut out) = (Vec::new(), Vec::new());
        for (entry, answer) in answers {
            match self.join_late(entry, answer, late, join, opened) {
                Some(LeftOut::DoesNotServe(_)) => still.push(entry),
                Some(why @ (LeftOut::OtherVersion(..) | LeftOut::NoPieces)) => {
                    out.push((entry.id.clone(), why));
                }
                _ => {}
            }
        }
        (still, out)
    }

    /// A download source for a peer that holds the version: all of it, or (a download in
    /// progress there) what it holds as that changes.
    fn source(
        &self,
        name: &FileName,
        member: Served<'_>,
        download: &Manifest,
    ) -> Result<PeerSource, ClientError> {
        let source = PeerSource::new(member.client, name.clone(), self.redial(member.entry)?);
        let offer = member.offer;
        let version = offer.manifest.blake3();
        Ok(match offer.held {
            Some(held) => {
                let regrain =
                    Regrain::between(offer.manifest.size(), offer.in_pieces, download.in_pieces());
                source.holding(version, held, member.changes, regrain)
            }
            None => source,
        })
    }
}

/// The version in pieces, if every one of `members` serves pieces and one sent their hashes.
fn in_pieces(members: &[Served<'_>]) -> Option<Manifest> {
    if !members.iter().all(|m| m.offer.in_pieces) {
        return None;
    }
    members.iter().find_map(|m| m.offer.pieces.clone())
}

/// A peer that holds some version of the file, as it answered.
struct Served<'a> {
    entry: &'a PeerEntry,
    client: Client,
    offer: Offer,
    /// What it gains, for a download in progress there.
    changes: Option<Changes>,
}

/// The answers to "what do you serve under that name?" so far.
struct Answers<'a> {
    name: FileName,
    /// Who answered (or failed to).
    answered: Vec<PeerId>,
    /// Peers that hold some version, whole or in part.
    served: Vec<Served<'a>>,
    left_out: Vec<(PeerId, LeftOut)>,
}

type Answer = Result<(Client, Option<(Offer, Option<Changes>)>), ClientError>;

impl<'a> Answers<'a> {
    fn new(name: FileName) -> Self {
        Self {
            name,
            answered: Vec::new(),
            served: Vec::new(),
            left_out: Vec::new(),
        }
    }

    /// Takes answers until every peer answered, or the wanted version is offered, or
    /// [`DOWNLOAD_GRACE`] has passed since the first peer offered a version.
    async fn gather(
        &mut self,
        asking: &mut (impl futures_util::Stream<Item = (&'a PeerEntry, Answer)> + Unpin),
        peers: usize,
        wanted: Option<Hash32>,
    ) {
        let grace = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(grace);
        let mut grace_set = false;
        while self.answered.len() < peers {
            tokio::select! {
                Some((entry, answer)) = asking.next() => {
                    self.take(entry, answer);
                    if let Some(w) = wanted {
                        if self.served.iter().any(|s| s.offer.manifest.blake3() == w) {
                            return;
                        }
                    } else if !self.served.is_empty() && !grace_set {
                        grace.as_mut().reset((Instant::now() + DOWNLOAD_GRACE).into());
                        grace_set = true;
                    }
                }
                () = &mut grace, if grace_set => return,
            }
        }
    }

    /// Everyone left out: those known before the transfer, those that answered during it
    /// (`late`, whose reason replaces an earlier one: a peer that held nothing may answer later
    /// with another version, or as an older qnode), and those that never answered.
    fn all_left_out(
        self,
        late: Vec<(PeerId, LeftOut)>,
        candidates: &[PeerEntry],
    ) -> Vec<(PeerId, LeftOut)> {
        let mut all = self.left_out;
        all.retain(|(p, _)| !late.iter().any(|(q, _)| q == p));
        all.extend(late);
        let silent = candidates.iter().filter(|e| !self.answered.contains(&e.id));
        all.extend(silent.map(|e| (e.id.clone(), LeftOut::TooLate)));
        all
    }

    fn take(&mut self, entry: &'a PeerEntry, answer: Answer) {
        self.answered.push(entry.id.clone());
        match answer {
            Ok((client, Some((offer, changes)))) => self.served.push(Served {
                entry,
                client,
                offer,
                changes,
            }),
            Ok((_, None)) => self
                .left_out
                .push((entry.id.clone(), LeftOut::DoesNotServe(self.name.clone()))),
            Err(e) => self.left_out.push((entry.id.clone(), LeftOut::Failed(e))),
        }
    }

    /// The version to fetch and the peers serving it; the others are left out.
    fn agree(&mut self, wanted: Option<Hash32>) -> anyhow::Result<(Manifest, Vec<Served<'a>>)> {
        let described: Vec<Option<Manifest>> = self
            .served
            .iter()
            .map(|s| Some(s.offer.manifest.clone()))
            .collect();
        let whole: Vec<bool> = self.served.iter().map(|s| s.offer.held.is_none()).collect();
        let Some(agreement) = download::agree(&described, &whole, wanted) else {
            let why: Vec<String> = self
                .left_out
                .iter()
                .map(|(p, l)| format!("{p}: {l}"))
                .collect();
            let (name, why) = (&self.name, why.join("; "));
            match wanted {
                Some(w) => bail!("no peer serves {name} with BLAKE3 {} ({why})", hex(&w)),
                None => bail!("no peer serves {name} ({why})"),
            }
        };
        for &(i, other) in &agreement.other_versions {
            let why = LeftOut::OtherVersion(self.name.clone(), other);
            self.left_out.push((self.served[i].entry.id.clone(), why));
        }
        let members = std::mem::take(&mut self.served)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| agreement.members.contains(i))
            .map(|(_, s)| s)
            .collect();
        Ok((agreement.manifest, members))
    }
}

/// The temporary file for `manifest`'s version at `target`, and the chunks it already holds.
///
/// It is named after the version, so an interrupted download of the same version resumes from the
/// chunks it holds (re-verified from disk, never trusted).
async fn open_partial(
    target: &Path,
    manifest: &Arc<Manifest>,
) -> anyhow::Result<(Arc<PartialFile>, Vec<bool>)> {
    let tag = crate::store::download_tag(&manifest.blake3());
    let partial = PartialFile::create(target, &tag, manifest.size())
        .with_context(|| format!("preparing {}", target.display()))?;
    let partial = Arc::new(partial);
    let have = if partial.resumed() {
        let (p, m) = (partial.clone(), manifest.clone());
        tokio::task::spawn_blocking(move || p.verified_chunks(&m))
            .await?
            .with_context(|| format!("resuming {}", target.display()))?
    } else {
        Vec::new()
    };
    Ok((partial, have))
}

/// The engine's report, or why the transfer failed (`None`: interrupted). A failed transfer's
/// verified chunks stay in the hidden temporary file for the next attempt.
fn transferred(
    outcome: Option<Result<DownloadReport, download::DownloadError>>,
    partial: &PartialFile,
    name: &FileName,
    target: &Path,
) -> anyhow::Result<DownloadReport> {
    let e = match outcome {
        Some(Ok(r)) => return Ok(r),
        Some(Err(e)) => anyhow::Error::from(e),
        None => anyhow::anyhow!("interrupted"),
    };
    partial.keep_for_resume();
    Err(e.context(format!(
        "downloading {name}: nothing was written under {}; run the same command again to resume",
        target.display()
    )))
}

/// Links the finished file to its name (never replacing another file).
/// In place of `old` if given (atomically, keeping it hidden), else under a free name.
async fn save(
    partial: Arc<PartialFile>,
    manifest: &Manifest,
    target: &Path,
    old: Option<Seen>,
) -> anyhow::Result<Fetched> {
    let partial = Arc::try_unwrap(partial)
        .map_err(|_| anyhow::anyhow!("internal error: the partial file is still in use"))?;
    let expected = manifest.blake3();
    let committed = tokio::task::spawn_blocking(move || match old {
        Some(old) => partial.commit_replacing(expected, Check::Chunks, old),
        None => partial.commit(expected, Check::Chunks),
    })
    .await?
    .with_context(|| format!("saving {}", target.display()))?;
    Ok(match committed {
        Committed::Stored => Fetched::Downloaded,
        Committed::AlreadyPresent => Fetched::AlreadyPresent,
        Committed::Replaced => Fetched::Updated,
    })
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

/// The bytes of the chunks marked in `have`.
fn bytes_of(manifest: &Manifest, have: &[bool]) -> u64 {
    have.iter()
        .enumerate()
        .filter(|(_, h)| **h)
        .map(|(i, _)| manifest.chunk_len(i as u32).unwrap_or(0))
        .sum()
}

/// What a download finds at its target.
enum AtTarget {
    /// Nothing: a plain download.
    Nothing,
    /// The version to fetch.
    Same,
    /// Another version, to update (with its tree and, if the first peer gave them, the new
    /// version's group signatures).
    Other(Seen, Option<(Tree, Option<Vec<Sig>>)>),
}

/// What is at `target` now; another version is refused unless `update`. For an update, also our
/// copy's tree (from the same read as its hash), while `first` is asked for the new version's
/// group signatures.
async fn look_at(
    target: &Path,
    update: bool,
    first: Option<Client>,
    name: &FileName,
    manifest: &Manifest,
) -> anyhow::Result<AtTarget> {
    if !update {
        return match not_overwriting(Seen::of(target), target)? {
            None => Ok(AtTarget::Nothing),
            Some(seen) if seen.blake3 == manifest.blake3() => Ok(AtTarget::Same),
            Some(_) => bail!(
                "{} already exists with different content; not overwriting it (use --update to replace it with the peers' version, or --output to save elsewhere)",
                target.display()
            ),
        };
    }
    let groups = async {
        match &first {
            Some(c) => c.groups(name, manifest.blake3()).await.ok(),
            None => None,
        }
    };
    // Our tree is signed as the peer asked for the new version's groups signs its own.
    let kind = first.as_ref().map(Client::sig_kind).unwrap_or_default();
    let t = target.to_owned();
    let read = tokio::task::spawn_blocking(move || Seen::with_tree(&t, kind));
    let (read, groups) = tokio::join!(read, groups);
    Ok(match not_overwriting(read?, target)? {
        Some((seen, _)) if seen.blake3 == manifest.blake3() => AtTarget::Same,
        Some((seen, tree)) => AtTarget::Other(seen, Some((tree, groups))),
        None => AtTarget::Nothing,
    })
}

/// What [`Seen`] found at `path`, with a clear message if it is not a regular file.
fn not_overwriting<T>(
    found: Result<Option<T>, StoreError>,
    path: &Path,
) -> anyhow::Result<Option<T>> {
    match found {
        Ok(seen) => Ok(seen),
        Err(StoreError::Conflict(_)) => bail!(
            "{} exists and is not a regular file; not overwriting it",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Size and BLAKE3 of a file, reading it once.
fn hash_file(path: &Path) -> std::io::Result<(u64, Hash32)> {
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    Ok((size, Manifest::of_file(&file, size)?.blake3()))
}
