//! The node session: who we are, the peer table and pinned certificates, our UDP endpoints and
//! the connections to peers, and the use cases — list, upload, download, serve — each returning a
//! typed outcome. Nothing here prints: `cli` and `shell` render what comes back.
//!
//! A download is `transfer::session`'s, asking peers through this session's connections
//! (`download`).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::future::join_all;
use futures_util::{FutureExt, StreamExt, TryStreamExt};

use crate::model::delta::{SigKind, Tree};
use crate::model::manifest::{FilePath, Hash32, Manifest};
use crate::model::peers::{PeerEntry, PeerId, PeerTable, Root};
use crate::net::client::{Client, ClientError, Redial};
use crate::net::endpoints::Endpoints;
use crate::net::identity::{self, Identity, InitOutcome};
use crate::net::server::{self, Server};
use crate::net::tls;
use crate::store::Store;
use crate::wire::codec;
use crate::wire::protocol::{FileEntry, Incomplete};

/// How long a client command waits for its connection closes to be sent.
pub const CLOSE_GRACE: Duration = Duration::from_millis(15);

/// Reads and checks `peer_settings.txt`; `me` must be listed.
pub fn load_peers(root: &Root, me: &PeerId) -> anyhow::Result<PeerTable> {
    let path = root.settings_path();
    let (bytes, _) = crate::store::read_small_file(&path, crate::model::peers::MAX_SETTINGS_LEN)
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
pub use download::{DownloadEvent, DownloadRequest, Downloaded, Fetched, LeftOut, NotServed};

mod download;
pub mod listed;
mod punch;
use listed::Live;
mod folder;
mod levels;
mod sync;
pub use folder::{FileStatus, FolderDownloaded, FolderFile, FolderProgress};
pub use sync::{FolderStatus, PeerStatus, SyncEvent, SyncOptions, sync};

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
    pub name: FilePath,
    /// Its size.
    pub size: u64,
    /// Each peer's outcome, in the order asked.
    pub results: Vec<(PeerId, Result<UploadStatus, PeerFailure>)>,
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
    /// Whether we relay for peers that cannot punch through to each other.
    pub relay: bool,
    /// Cap on what all relays carry together, in bytes per second.
    pub relay_rate: Option<u64>,
    /// Most relays at once.
    pub max_relayed: usize,
}

/// Serves our files until `shutdown` resolves.
pub async fn serve(
    root: &Root,
    me: &PeerId,
    opts: &ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let live = Live::load(root, me)?;
    serve_with(root, me, opts, Arc::default(), live, shutdown).await
}

/// `serve`, answering `SyncIndex` about the `synced` folders.
pub async fn serve_with(
    root: &Root,
    me: &PeerId,
    opts: &ServeOptions,
    synced: Arc<server::synced::SyncedFolders>,
    live: Live,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let peers = live.listed.borrow().table.clone();
    let (identity, outcome) =
        identity::init(root, me).with_context(|| format!("initialising {me}"))?;
    if outcome == InitOutcome::Created {
        tracing::info!(
            "created a new identity; copy {} to every peer",
            root.cert_path(me).display()
        );
    }
    let store = Arc::new(Store::open(root.served_dir(me))?);
    match store.remove_stale_uploads() {
        Ok((0, _)) => {}
        Ok((files, bytes)) => tracing::info!(
            "removed {files} upload temporary files and unfinished replaces left by an earlier run ({bytes} bytes)"
        ),
        Err(e) => tracing::warn!("could not look for stale upload files: {e}"),
    }
    // Our own certificate may be new (made just now): read again.
    let live = match outcome {
        InitOutcome::Created => Live::load(root, me)?,
        _ => live,
    };
    let pins = live.pins.clone();
    let config = tls::server_config(&identity, pins.clone(), opts.congestion)?;
    // peer_settings.txt lists us (checked by load_peers); listed as `auto`, on any address.
    let addr = (opts.listen)
        .or(peers.get(me).and_then(|e| e.addr))
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let bind =
        |addr| tls::bind_punching(addr, Some(config.clone()), Some(tls::reset_key(&identity)));
    // Listed at an address this host does not have (its router's, behind a NAT): on its port,
    // on any address, reachable through introductions where the router lets nothing in.
    let (bound, behind) = match bind(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable && opts.listen.is_none() => {
            let any = SocketAddr::new(unspecified(addr.ip()), addr.port());
            tracing::info!(
                "{addr} is not an address of this host: listening on {any}, reachable through introductions too"
            );
            (bind(any), true)
        }
        other => (other, false),
    };
    let (endpoint, capped, socket) = bound.with_context(|| format!("listening on {addr}"))?;
    if let Some(granted) = capped {
        tracing::warn!(
            "the kernel capped the UDP receive buffer at {granted} bytes (wanted {}); raise net.core.rmem_max for full speed",
            tls::UDP_BUFFER
        );
    }
    let addr = endpoint.local_addr().unwrap_or(addr);
    tracing::info!("{me} serving {} on {addr}", store.dir().display());
    let _announced = announce(&peers, me, addr.port(), &identity);
    let mut server = Server::new(
        me.clone(),
        store,
        pins,
        opts.max_upload_size,
        opts.max_upload_rate.map(server::RateLimit::new),
    );
    server.compression = opts.compression;
    server.relays = Arc::new(server::relay::Relays::new(
        opts.relay,
        opts.max_relayed,
        opts.relay_rate,
    ));
    server.synced = synced;
    let server = Arc::new(server);
    let stop = tokio_util::sync::CancellationToken::new();
    // Listed as `auto`: we may be behind a NAT, so we keep connections others can be
    // introduced to us through.
    if behind || peers.get(me).is_some_and(|e| e.addr.is_none()) {
        let reachable = punch::stay_reachable(
            endpoint.clone(),
            Arc::new(socket),
            Arc::new(identity),
            live.listed.subscribe(),
            server.routes.clone(),
            stop.clone(),
        );
        tokio::spawn(reachable);
    }
    let watching = tokio::spawn(live.watch(root.clone(), me.clone(), stop.clone()));
    server::run(endpoint, server, shutdown).await;
    stop.cancel();
    let _ = watching.await;
    Ok(())
}

/// The any-address of `ip`'s family.
fn unspecified(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// Announces us on the local network (mDNS) where the table lists a peer as `auto` (us or
/// another): only those who asked for it send multicast.
fn announce(
    peers: &PeerTable,
    me: &PeerId,
    port: u16,
    identity: &Identity,
) -> Option<crate::net::lan::Lan> {
    if peers.entries().iter().all(|e| e.addr.is_some()) {
        return None;
    }
    match crate::net::lan::Lan::start(Some((me, port, &identity.cert))) {
        Ok(lan) => {
            tracing::info!("announcing {me} on the local network (port {port})");
            Some(lan)
        }
        Err(e) => {
            tracing::warn!("cannot announce on the local network: {e}");
            None
        }
    }
}

/// A client-side session: who we are, the peers, and connections reused across commands.
pub struct Node {
    root: Root,
    me: PeerId,
    /// The table in force (kept live by `serve` and `sync`).
    peers: tokio::sync::watch::Receiver<Arc<listed::Listed>>,
    identity: Identity,
    endpoints: Endpoints,
    clients: tokio::sync::Mutex<HashMap<PeerId, Client>>,
    /// Announcements on the local network, heard once a peer listed as `auto` is dialled.
    lan: tokio::sync::OnceCell<Result<Arc<crate::net::lan::Lan>, String>>,
    /// Where and how each peer reached other than at its listed address was reached.
    reached: std::sync::Mutex<HashMap<PeerId, punch::Reached>>,
}

/// How long dialling a peer listed as `auto` waits to hear its announcement.
pub const LAN_WAIT: Duration = Duration::from_secs(3);

impl Node {
    /// Loads the settings and our identity.
    pub fn load(root: &Root, me: &PeerId) -> anyhow::Result<Self> {
        let table = load_peers(root, me)?;
        let listed = listed::Listed {
            table,
            certs: HashMap::new(),
        };
        let (_, peers) = tokio::sync::watch::channel(Arc::new(listed));
        Self::following(root, me, peers)
    }

    /// Loads our identity, dialling by the table `peers` holds at each moment.
    pub fn following(
        root: &Root,
        me: &PeerId,
        peers: tokio::sync::watch::Receiver<Arc<listed::Listed>>,
    ) -> anyhow::Result<Self> {
        let identity = identity::load(root, me)?;
        Ok(Self {
            root: root.clone(),
            me: me.clone(),
            peers,
            identity,
            endpoints: Endpoints::default(),
            clients: tokio::sync::Mutex::default(),
            lan: tokio::sync::OnceCell::new(),
            reached: std::sync::Mutex::default(),
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

    /// Closes every connection and gives the closes a moment to leave (at most [`CLOSE_GRACE`]:
    /// see `Endpoints::wait_idle`).
    pub async fn finish(&self) {
        for client in self.clients.lock().await.values() {
            client.close();
        }
        self.endpoints.wait_idle(CLOSE_GRACE).await;
    }

    /// The table in force.
    pub fn table(&self) -> PeerTable {
        self.peers.borrow().table.clone()
    }

    /// Closes our connections to `peers` (removed, readdressed or re-keyed): the next request
    /// dials again by the table in force.
    pub async fn forget(&self, peers: &[PeerId]) {
        let mut clients = self.clients.lock().await;
        for peer in peers {
            if let Some(c) = clients.remove(peer) {
                c.close();
            }
            self.forget_route(peer);
        }
    }

    /// A connection to `entry`, reused if one is open. A peer that does not answer at its listed
    /// address may be behind a NAT: it is looked for around it (see [`Node::dial`]).
    async fn client(&self, entry: &PeerEntry) -> Result<Client, ClientError> {
        self.client_by(entry, true).await
    }

    /// A connection to `entry` at its listed address only (an introducer: never looked for
    /// through the others, which could ask it in turn).
    async fn client_direct(&self, entry: &PeerEntry) -> Result<Client, ClientError> {
        self.client_by(entry, false).await
    }

    async fn client_by(&self, entry: &PeerEntry, around: bool) -> Result<Client, ClientError> {
        let expected = self.reached_at(&entry.id).or(entry.addr);
        if let Some(c) = self.clients.lock().await.get(&entry.id)
            && c.is_open()
            && expected.is_none_or(|a| c.remote() == a)
        {
            return Ok(c.clone());
        }
        let client = match entry.addr {
            Some(addr) if around => self.dial(entry, addr).await?,
            Some(addr) => self.connect_at(entry, addr).await?,
            None => self.reach(entry).await?,
        };
        self.clients
            .lock()
            .await
            .insert(entry.id.clone(), client.clone());
        Ok(client)
    }

    /// How we reach a peer not reached at its listed address: `found on the LAN`, `punched
    /// (introduced by p1)`, `relayed by p1`.
    pub fn route(&self, peer: &PeerId) -> Option<String> {
        let reached = self.reached.lock().unwrap_or_else(|p| p.into_inner());
        reached.get(peer).map(|r| r.route.clone())
    }

    /// Where `peer` (listed as `auto`) announced itself on the local network with its pinned
    /// certificate (waiting up to [`LAN_WAIT`] to hear it), noted for redialling.
    pub(super) async fn find_on_lan(&self, peer: &PeerId) -> Result<SocketAddr, ClientError> {
        let not_found = |reason: String| ClientError::NotFound {
            peer: peer.clone(),
            reason,
        };
        let lan = self
            .lan
            .get_or_init(|| async { crate::net::lan::Lan::start(None).map(Arc::new) })
            .await
            .as_ref()
            .map_err(|e| not_found(e.clone()))?;
        let cert = identity::load_cert(&self.root, peer).map_err(|e| not_found(e.to_string()))?;
        let addr = lan.find(peer, &cert, LAN_WAIT).await.map_err(not_found)?;
        Ok(addr)
    }

    /// What connecting to `entry` needs: our endpoint and a configuration pinning its certificate,
    /// at the address it was last reached at (its listed one unless reached around it).
    fn redial(&self, entry: &PeerEntry) -> Result<Redial, ClientError> {
        let reached = {
            let reached = self.reached.lock().unwrap_or_else(|p| p.into_inner());
            reached.get(&entry.id).cloned()
        };
        let addr = (reached.as_ref().map(|r| r.addr).or(entry.addr)).ok_or_else(|| {
            ClientError::NotFound {
                peer: entry.id.clone(),
                reason: "not heard on the local network yet".into(),
            }
        })?;
        let mut dial = self.redial_at(entry, addr)?;
        dial.via = reached.and_then(|r| r.via);
        Ok(dial)
    }

    /// A new connection to `entry` at `addr`.
    async fn connect_at(&self, entry: &PeerEntry, addr: SocketAddr) -> Result<Client, ClientError> {
        let dial = self.redial_at(entry, addr)?;
        Client::connect(&dial.endpoint, dial.config, &entry.id, addr).await
    }

    /// What connecting to `entry` at `addr` needs.
    fn redial_at(&self, entry: &PeerEntry, addr: SocketAddr) -> Result<Redial, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            peer: entry.id.clone(),
            addr,
            reason,
        };
        let pinned =
            identity::load_cert(&self.root, &entry.id).map_err(|e| unreachable(e.to_string()))?;
        let config = tls::client_config(&self.identity, &entry.id, pinned)
            .map_err(|e| unreachable(e.to_string()))?;
        let endpoint = self.endpoints.for_addr(addr).map_err(unreachable)?;
        Ok(Redial {
            endpoint,
            config,
            addr,
            via: None,
        })
    }

    /// `peer`'s entry in our table.
    fn entry(&self, peer: &PeerId) -> Result<PeerEntry, ClientError> {
        let not_listed = || ClientError::NotListed { peer: peer.clone() };
        self.peers
            .borrow()
            .table
            .get(peer)
            .cloned()
            .ok_or_else(not_listed)
    }

    fn select(&self, named: &[PeerId]) -> anyhow::Result<Vec<PeerEntry>> {
        Ok(self.peers.borrow().table.select(&self.me, named)?)
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
        self.upload_as(path, name, &targets, replace, compression)
            .await
    }

    /// `upload FOLDER`: every file under the folder (hidden entries and symlinks left out), each
    /// stored by every named peer under the folder's name and its path inside it.
    pub async fn upload_folder(
        &self,
        dir: &Path,
        peers: &[PeerId],
        replace: bool,
        compression: codec::Mode,
    ) -> anyhow::Result<(FilePath, Vec<Uploaded>)> {
        let targets = self.select(peers)?;
        let base = dir.canonicalize().ok();
        let base = base
            .as_deref()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str());
        let folder = FilePath::new(
            base.with_context(|| format!("{} has no usable folder name", dir.display()))?,
        )?;
        let walker = crate::store::walk_tree(dir);
        let mut files = Vec::new();
        for entry in walker {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            if !entry.file_type().is_some_and(|t| t.is_file()) {
                continue;
            }
            let rel = entry.path().strip_prefix(dir).ok().and_then(|r| r.to_str());
            let name = rel
                .and_then(|r| FilePath::new(format!("{folder}/{r}")).ok())
                .with_context(|| format!("{} has no usable path", entry.path().display()))?;
            files.push((entry.path().to_owned(), name));
        }
        files.sort_by(|a, b| a.1.cmp(&b.1));
        if files.is_empty() {
            bail!("{} holds no file to upload", dir.display());
        }
        // A few files at once (small files are round trips), under what a server admits from one
        // peer at a time (a slot freed just as its answer arrives may not be free yet), in order.
        let in_flight = server::UPLOADS_PER_PEER.saturating_sub(1).max(1);
        let targets = &targets;
        let uploaded: Vec<Uploaded> = futures_util::stream::iter(files)
            .map(|(path, name)| self.upload_as(path, name, targets, replace, compression))
            .buffered(in_flight)
            .try_collect()
            .await?;
        Ok((folder, uploaded))
    }

    /// One file at `path` to every peer of `targets`, as `name`.
    async fn upload_as(
        &self,
        path: PathBuf,
        name: FilePath,
        targets: &[PeerEntry],
        replace: bool,
        compression: codec::Mode,
    ) -> anyhow::Result<Uploaded> {
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
            results: targets.iter().map(|e| e.id.clone()).zip(results).collect(),
        })
    }

    fn resolve_upload(&self, file: &Path) -> anyhow::Result<(PathBuf, FilePath)> {
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
        Ok((path.clone(), FilePath::new(base)?))
    }
}

/// Size and BLAKE3 of a file, reading it once.
fn hash_file(path: &Path) -> std::io::Result<(u64, Hash32)> {
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    Ok((size, Manifest::of_file(&file, size)?.blake3()))
}
