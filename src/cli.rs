//! The command line: clap types, and one function per command that builds a report and renders it
//! as human lines or exactly one JSON object on stdout.
//!
//! Commands that talk to several peers gather one result per peer and report each; the exit status
//! is decided at the end. Nothing here touches wire bytes or quinn streams, and `served_files` only
//! through `store`.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use futures_util::future::join_all;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::client::{Client, ClientError, PeerSource, Redial, UploadStatus};
use crate::download::{self, DownloadReport, Options};
use crate::identity::{self, Identity, InitOutcome};
use crate::manifest::{FileName, Hash32, Manifest, hex, parse_hex};
use crate::peers::{PeerEntry, PeerId, PeerTable, Root};
use crate::server::{self, DEFAULT_MAX_UPLOAD_SIZE, Server};
use crate::store::{Check, Committed, PartialFile, Store};
use crate::tls::{self, Pins};

/// qnode: share files among a fixed set of peers over QUIC, with pinned mutual TLS and verified,
/// collaborative downloads.
#[derive(Debug, Parser)]
#[command(name = "qnode", version, about, long_about = None)]
pub struct Cli {
    /// Folder holding peer_settings.txt, certs/ and one folder per local peer
    #[arg(
        long,
        env = "QNODE_ROOT",
        default_value = ".",
        global = true,
        value_name = "DIR"
    )]
    pub root: PathBuf,
    /// Who we are: a peer ID listed in peer_settings.txt
    #[arg(long, env = "QNODE_PEER", global = true, value_name = "ID")]
    pub peer: Option<PeerId>,
    /// What to do
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create this peer's served_files folder, key pair and certificate (certs/ID.pem), if missing
    Init,
    /// Serve our files to the other peers until SIGINT or SIGTERM
    Serve(ServeArgs),
    /// List the files served by peers (default: every other peer)
    #[command(visible_alias = "filelist")]
    List(ListArgs),
    /// Upload a file to peers
    Upload(UploadArgs),
    /// Download a file from the peers that serve it, all at once
    Download(DownloadArgs),
    /// Interactive client speaking the original #FILELIST / #UPLOAD / #DOWNLOAD lines
    Shell,
}

/// Options of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Largest upload accepted, in bytes
    #[arg(long, default_value_t = DEFAULT_MAX_UPLOAD_SIZE, value_name = "BYTES")]
    pub max_upload_size: u64,
    /// Listen on this address instead of the one peer_settings.txt gives us (e.g. 0.0.0.0:53234)
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Cap on the file data sent to all peers together, in bytes per second (suffixes K, M, G =
    /// KiB, MiB, GiB; e.g. 20M)
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_upload_rate: Option<u64>,
    /// Congestion controller for what we send
    #[arg(long, value_enum, default_value_t)]
    pub congestion: tls::Congestion,
}

/// Parses `123`, `64K`, `20M`, `1G` (binary multiples) into bytes.
fn parse_rate(s: &str) -> Result<u64, String> {
    let (digits, mult) = match s.trim().char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    match digits.trim().parse::<u64>() {
        Ok(n) if n > 0 => n
            .checked_mul(mult)
            .ok_or_else(|| format!("{s} is too large")),
        _ => Err(format!("{s:?} is not a positive rate such as 500K or 20M")),
    }
}

/// Options of `list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Peers to ask (default: every other peer)
    #[arg(value_name = "PEERS")]
    pub peers: Vec<PeerId>,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

/// Options of `upload`.
#[derive(Debug, Clone, Args)]
pub struct UploadArgs {
    /// A path, or the name of a file in our own served_files
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Peers to upload to
    #[arg(value_name = "PEERS", required = true)]
    pub peers: Vec<PeerId>,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

/// Options of `download`.
#[derive(Debug, Clone, Args)]
pub struct DownloadArgs {
    /// Name of the file to fetch
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Peers to fetch from (default: every other peer); only those serving NAME take part
    #[arg(value_name = "PEERS")]
    pub peers: Vec<PeerId>,
    /// Write here instead of our served_files/NAME (a folder means FOLDER/NAME)
    #[arg(long, short, value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Fetch this version (BLAKE3 hex) when peers disagree; default: the one most peers serve
    #[arg(long, value_name = "HEX")]
    pub blake3: Option<String>,
    /// Chunk requests in flight per peer (default: adaptive, sized to each peer's rate × RTT)
    #[arg(long, value_name = "N")]
    pub window: Option<usize>,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

/// Runs the parsed command line; the exit code reflects per-peer failures.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let me = cli
        .peer
        .clone()
        .context("no peer given: use --peer ID or set QNODE_PEER")?;
    let root = Root::new(cli.root);
    match cli.command {
        Command::Init => init(&root, &me),
        Command::Serve(args) => serve(&root, &me, &args).await,
        Command::Shell => {
            let node = Node::load(&root, &me)?;
            let ok = crate::shell::run(&node).await;
            node.finish().await;
            Ok(exit(ok))
        }
        command => {
            let node = Node::load(&root, &me)?;
            let result = node.execute(command).await;
            node.finish().await;
            result.map(exit)
        }
    }
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn init(root: &Root, me: &PeerId) -> anyhow::Result<ExitCode> {
    let (_, outcome) = identity::init(root, me).with_context(|| format!("initialising {me}"))?;
    let cert = root.cert_path(me);
    match outcome {
        InitOutcome::Created => crate::outln!(
            "{me}: created a key pair ({}) and certificate ({}); copy the certificate to every peer's certs/",
            root.key_path(me).display(),
            cert.display()
        ),
        InitOutcome::Existing => {
            crate::outln!("{me}: already initialised (certificate {})", cert.display())
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn load_peers(root: &Root, me: &PeerId) -> anyhow::Result<PeerTable> {
    let path = root.settings_path();
    let (bytes, _) = crate::peers::read_small_file(&path, crate::peers::MAX_SETTINGS_LEN)
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

async fn serve(root: &Root, me: &PeerId, args: &ServeArgs) -> anyhow::Result<ExitCode> {
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
            "removed {files} upload temporary files left by an earlier run ({})",
            HumanBytes(bytes)
        ),
        Err(e) => tracing::warn!("could not look for stale upload files: {e}"),
    }
    let config = tls::server_config(&identity, pins.clone(), args.congestion)?;
    // peer_settings.txt lists us, checked by load_peers.
    let addr = args
        .listen
        .or(peers.get(me).map(|e| e.addr))
        .context("no address to listen on")?;
    let (endpoint, capped) =
        tls::bind_endpoint(addr, Some(config), Some(tls::reset_key(&identity)))
            .with_context(|| format!("listening on {addr}"))?;
    if let Some(granted) = capped {
        tracing::warn!(
            "the kernel capped the UDP receive buffer at {} (wanted {}); raise net.core.rmem_max for full speed",
            HumanBytes(granted as u64),
            HumanBytes(tls::UDP_BUFFER as u64)
        );
    }
    tracing::info!("{me} serving {} on {addr}", store.dir().display());
    let server = Arc::new(Server::new(
        me.clone(),
        store,
        pins,
        args.max_upload_size,
        args.max_upload_rate.map(server::RateLimit::new),
    ));
    server::run(endpoint, server, shutdown_signal()).await;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How long a client command waits for its connection closes to be sent.
pub const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_millis(15);

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

    /// Runs one client command; `Ok(false)` if some peer failed.
    pub async fn execute(&self, command: Command) -> anyhow::Result<bool> {
        match command {
            Command::List(args) => self.list(&args).await,
            Command::Upload(args) => self.upload(&args).await,
            Command::Download(args) => self.download(&args).await,
            Command::Init | Command::Serve(_) | Command::Shell => {
                bail!("that command is not available here")
            }
        }
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
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|e| format!("{e}"))?;
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

    /// `list`: every named peer's files.
    pub async fn list(&self, args: &ListArgs) -> anyhow::Result<bool> {
        let targets = self.select(&args.peers)?;
        let results = join_all(targets.iter().map(|entry| async move {
            if entry.id == self.me {
                return self
                    .list_own()
                    .await
                    .map(|f| {
                        let n = f.len() as u64;
                        (f, n)
                    })
                    .map_err(|e| e.to_string());
            }
            match self.client(entry).await {
                Ok(c) => c.list().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }))
        .await;
        let mut report = ListReport { peers: Vec::new() };
        for (entry, result) in targets.iter().zip(results) {
            report.peers.push(match result {
                Ok((files, total)) => PeerFiles {
                    peer: entry.id.to_string(),
                    ok: true,
                    total: (total > files.len() as u64).then_some(total),
                    files: Some(
                        files
                            .into_iter()
                            .map(|f| FileOut {
                                name: f.name.to_string(),
                                size: f.size,
                                blake3: hex(&f.blake3),
                            })
                            .collect(),
                    ),
                    error: None,
                },
                Err(e) => PeerFiles {
                    peer: entry.id.to_string(),
                    ok: false,
                    total: None,
                    files: None,
                    error: Some(e),
                },
            });
        }
        let ok = report.peers.iter().all(|p| p.ok);
        for p in report.peers.iter().filter(|p| !p.ok) {
            crate::errln!("qnode: error: {}", p.error.as_deref().unwrap_or_default());
        }
        for p in &report.peers {
            if let (Some(total), Some(files)) = (p.total, &p.files) {
                crate::errln!(
                    "qnode: warning: {} serves {total} files; only the first {} (by name) are listed",
                    p.peer,
                    files.len()
                );
            }
        }
        if args.json {
            print_json(&report)?;
        } else {
            for p in report.peers.iter().filter(|p| p.ok) {
                let files = p.files.as_deref().unwrap_or_default();
                let plural = if files.len() == 1 { "" } else { "s" };
                crate::outln!("{}: {} file{plural}", p.peer, files.len());
                for f in files {
                    crate::outln!(
                        "  {:<32} {:>12}  {}",
                        f.name,
                        HumanBytes(f.size).to_string(),
                        &f.blake3[..16]
                    );
                }
            }
        }
        Ok(ok)
    }

    /// Our own files, read locally (a peer does not connect to itself).
    async fn list_own(&self) -> anyhow::Result<Vec<crate::protocol::FileEntry>> {
        let dir = self.root.served_dir(&self.me);
        let files = tokio::task::spawn_blocking(move || Store::open(dir)?.list()).await??;
        Ok(files
            .into_iter()
            .map(|(name, m)| crate::protocol::FileEntry::new(name, &m))
            .collect())
    }

    /// `upload`: one file to every named peer.
    pub async fn upload(&self, args: &UploadArgs) -> anyhow::Result<bool> {
        let targets = self.select(&args.peers)?;
        let (path, name) = self.resolve_upload(&args.file)?;
        let p = path.clone();
        let (size, hash) = tokio::task::spawn_blocking(move || hash_file(&p))
            .await?
            .with_context(|| format!("reading {}", path.display()))?;
        let results = join_all(targets.iter().map(|entry| {
            let (path, name) = (&path, &name);
            async move {
                if entry.id == self.me {
                    return Err(format!(
                        "{} is this peer; the file is already ours to serve",
                        entry.id
                    ));
                }
                let client = self.client(entry).await.map_err(|e| e.to_string())?;
                client
                    .upload(name, path, size, hash)
                    .await
                    .map_err(|e| e.to_string())
            }
        }))
        .await;
        let mut report = UploadReport {
            name: name.to_string(),
            results: Vec::new(),
        };
        for (entry, result) in targets.iter().zip(results) {
            let (ok, status, error) = match result {
                Ok(UploadStatus::Stored) => (true, Some("stored"), None),
                Ok(UploadStatus::AlreadyPresent) => (true, Some("already_present"), None),
                Err(e) => (false, None, Some(e)),
            };
            report.results.push(UploadResult {
                peer: entry.id.to_string(),
                ok,
                status,
                error,
            });
        }
        for r in report.results.iter().filter(|r| !r.ok) {
            crate::errln!(
                "qnode: error: uploading {name} to {}: {}",
                r.peer,
                r.error.as_deref().unwrap_or_default()
            );
        }
        if args.json {
            print_json(&report)?;
        } else {
            for r in report.results.iter().filter(|r| r.ok) {
                match r.status {
                    Some("stored") => {
                        crate::outln!("{}: stored {name} ({})", r.peer, HumanBytes(size))
                    }
                    _ => crate::outln!("{}: already has {name}", r.peer),
                }
            }
        }
        Ok(report.results.iter().all(|r| r.ok))
    }

    fn resolve_upload(&self, file: &Path) -> anyhow::Result<(PathBuf, FileName)> {
        let served = self.root.served_dir(&self.me);
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

    /// `download`: fetch one file from every peer that serves it.
    pub async fn download(&self, args: &DownloadArgs) -> anyhow::Result<bool> {
        let started = Instant::now();
        let name = FileName::new(args.name.as_str())?;
        let wanted = match &args.blake3 {
            Some(h) => {
                Some(parse_hex(h).with_context(|| format!("--blake3 {h:?} is not 64 hex digits"))?)
            }
            None => None,
        };
        let target = match &args.output {
            Some(p) if p.is_dir() => p.join(name.as_str()),
            Some(p) => p.clone(),
            None => self.root.served_dir(&self.me).join(name.as_str()),
        };
        let candidates: Vec<PeerEntry> = self
            .select(&args.peers)?
            .into_iter()
            .filter(|e| e.id != self.me)
            .collect();
        if candidates.is_empty() {
            bail!("no peer to download {name} from");
        }

        // Ask everyone what they have under that name.
        let name_ref = &name;
        let described = join_all(candidates.iter().map(|entry| async move {
            let client = self.client(entry).await?;
            let manifest = client.describe(name_ref).await?;
            Ok::<_, ClientError>((client, manifest))
        }))
        .await;
        let mut left_out = Vec::new();
        let mut manifests = Vec::new();
        let mut clients = Vec::new();
        for (entry, d) in candidates.iter().zip(described) {
            match d {
                Ok((client, m)) => {
                    if m.is_none() {
                        left_out.push(LeftOut {
                            peer: entry.id.to_string(),
                            reason: format!("does not serve {name}"),
                        });
                    }
                    manifests.push(m);
                    clients.push(Some(client));
                }
                Err(e) => {
                    left_out.push(LeftOut {
                        peer: entry.id.to_string(),
                        reason: e.to_string(),
                    });
                    manifests.push(None);
                    clients.push(None);
                }
            }
        }
        let Some(agreement) = download::agree(&manifests, wanted) else {
            let why: Vec<String> = left_out
                .iter()
                .map(|l| format!("{}: {}", l.peer, l.reason))
                .collect();
            match wanted {
                Some(w) => bail!(
                    "no peer serves {name} with BLAKE3 {} ({})",
                    hex(&w),
                    why.join("; ")
                ),
                None => bail!("no peer serves {name} ({})", why.join("; ")),
            }
        };
        for (i, other) in &agreement.other_versions {
            left_out.push(LeftOut {
                peer: candidates[*i].id.to_string(),
                reason: format!(
                    "serves a different version of {name} (BLAKE3 {})",
                    hex(other)
                ),
            });
        }
        for l in &left_out {
            crate::errln!("qnode: warning: {} left out: {}", l.peer, l.reason);
        }
        let manifest = Arc::new(agreement.manifest);

        // Already there?
        if let Some(existing) = existing_version(&target)? {
            if existing == manifest.blake3() {
                let report = DownloadOut::new(
                    &name,
                    &target,
                    &manifest,
                    started,
                    "already_present",
                    None,
                    left_out,
                );
                return render_download(&report, args.json).map(|()| true);
            }
            bail!(
                "{} already exists with different content; not overwriting it (use --output to save elsewhere)",
                target.display()
            );
        }

        let mut sources: Vec<Arc<PeerSource>> = Vec::new();
        for &i in &agreement.members {
            if let Some(client) = clients[i].clone() {
                let redial = self.redial(&candidates[i])?;
                sources.push(Arc::new(PeerSource::new(client, name.clone(), redial)));
            }
        }
        // The temporary file is named after the version, so an interrupted download of the same
        // version resumes from the chunks it holds (re-verified from disk, never trusted).
        let tag = hex(&manifest.blake3())[..16].to_owned();
        let partial = PartialFile::create(&target, &tag, manifest.size())
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
        let bar = progress_bar(manifest.size());
        let opts = Options {
            fixed_window: args.window,
            ..Options::default()
        };
        let engine = download::run(
            manifest.clone(),
            download::fixed_sources(sources.clone()),
            partial.clone(),
            &have,
            &opts,
            |p| {
                if let Some(bar) = &bar {
                    bar.set_position(p.done);
                }
            },
        );
        let outcome = tokio::select! {
            r = engine => r.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        // Connections made again during the download are not in the session's pool: close them.
        for source in &sources {
            source.close().await;
        }
        let report = match outcome {
            Ok(r) => r,
            Err(e) => {
                // Verified chunks stay in the hidden temporary file for the next attempt.
                partial.keep_for_resume();
                return Err(e.context(format!(
                    "downloading {name}: nothing was written under {}; run the same command again to resume",
                    target.display()
                )));
            }
        };
        let partial = Arc::try_unwrap(partial)
            .map_err(|_| anyhow::anyhow!("internal error: the partial file is still in use"))?;
        let committed = tokio::task::spawn_blocking({
            let expected = manifest.blake3();
            move || partial.commit(expected, Check::Chunks)
        })
        .await?
        .with_context(|| format!("saving {}", target.display()))?;
        let status = match committed {
            Committed::Stored => "downloaded",
            Committed::AlreadyPresent => "already_present",
        };
        for s in &report.sources {
            if s.corrupt > 0 {
                crate::errln!(
                    "qnode: warning: {} sent {} corrupt chunk(s); they were fetched again from other peers",
                    s.name,
                    s.corrupt
                );
            }
            if let Some(why) = &s.dropped {
                crate::errln!(
                    "qnode: warning: {} dropped during the download: {why}",
                    s.name
                );
            }
        }
        let out = DownloadOut::new(
            &name,
            &target,
            &manifest,
            started,
            status,
            Some(&report),
            left_out,
        );
        render_download(&out, args.json)?;
        Ok(true)
    }
}

/// The BLAKE3 of a regular file at `path`, if one is there.
fn existing_version(path: &Path) -> anyhow::Result<Option<Hash32>> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("inspecting {}", path.display())),
        Ok(m) if !m.is_file() => bail!(
            "{} exists and is not a regular file; not overwriting it",
            path.display()
        ),
        Ok(_) => Ok(Some(
            hash_file(path)
                .with_context(|| format!("reading {}", path.display()))?
                .1,
        )),
    }
}

/// Size and BLAKE3 of a file, reading it once.
fn hash_file(path: &Path) -> std::io::Result<(u64, Hash32)> {
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let m = Manifest::from_reader(std::io::BufReader::with_capacity(1 << 20, file), size)?;
    Ok((size, m.blake3()))
}

fn progress_bar(total: u64) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total);
    let style =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    crate::outln!("{}", serde_json::to_string(value)?);
    Ok(())
}

#[derive(Serialize)]
struct ListReport {
    peers: Vec<PeerFiles>,
}

#[derive(Serialize)]
struct PeerFiles {
    peer: String,
    ok: bool,
    /// How many files the peer serves, present only when the listing was cut.
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<Vec<FileOut>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct FileOut {
    name: String,
    size: u64,
    blake3: String,
}

#[derive(Serialize)]
struct UploadReport {
    name: String,
    results: Vec<UploadResult>,
}

#[derive(Serialize)]
struct UploadResult {
    peer: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct LeftOut {
    peer: String,
    reason: String,
}

#[derive(Serialize)]
struct Fault {
    peer: String,
    corrupt_chunks: u32,
    failed_requests: u32,
    reconnects: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped: Option<String>,
}

/// The `download --json` object: the contract's fields first, then extensions.
#[derive(Serialize)]
struct DownloadOut {
    name: String,
    path: String,
    size: u64,
    blake3: String,
    seconds: f64,
    peers: BTreeMap<String, u64>,
    status: &'static str,
    faults: Vec<Fault>,
    left_out: Vec<LeftOut>,
    resumed_bytes: u64,
}

impl DownloadOut {
    fn new(
        name: &FileName,
        target: &Path,
        manifest: &Manifest,
        started: Instant,
        status: &'static str,
        report: Option<&DownloadReport>,
        left_out: Vec<LeftOut>,
    ) -> Self {
        let path = std::path::absolute(target).unwrap_or_else(|_| target.to_owned());
        let sources = report.map(|r| r.sources.as_slice()).unwrap_or_default();
        Self {
            name: name.to_string(),
            path: path.display().to_string(),
            size: manifest.size(),
            blake3: hex(&manifest.blake3()),
            seconds: started.elapsed().as_secs_f64(),
            peers: sources.iter().map(|s| (s.name.clone(), s.bytes)).collect(),
            status,
            faults: sources
                .iter()
                .filter(|s| s.corrupt > 0 || s.failures > 0 || s.dropped.is_some())
                .map(|s| Fault {
                    peer: s.name.clone(),
                    corrupt_chunks: s.corrupt,
                    failed_requests: s.failures,
                    reconnects: s.reconnects,
                    dropped: s.dropped.clone(),
                })
                .collect(),
            left_out,
            resumed_bytes: report.map_or(0, |r| r.resumed_bytes),
        }
    }
}

fn render_download(out: &DownloadOut, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(out);
    }
    if out.status == "already_present" && out.peers.is_empty() {
        crate::outln!(
            "{} is already here ({}, identical); nothing to download",
            out.path,
            HumanBytes(out.size)
        );
        return Ok(());
    }
    let rate = out.size as f64 / out.seconds.max(1e-9);
    crate::outln!(
        "downloaded {} ({}) in {:.2} s, {}/s -> {}",
        out.name,
        HumanBytes(out.size),
        out.seconds,
        HumanBytes(rate as u64),
        out.path
    );
    if out.resumed_bytes > 0 {
        crate::outln!(
            "  {:<12} {:>12}  (verified from an earlier attempt)",
            "resumed",
            HumanBytes(out.resumed_bytes).to_string()
        );
    }
    for (peer, bytes) in &out.peers {
        let share = if out.size == 0 {
            0.0
        } else {
            *bytes as f64 * 100.0 / out.size as f64
        };
        let fault = out.faults.iter().find(|f| &f.peer == peer);
        let note = match fault {
            Some(f) if f.dropped.is_some() => {
                format!("  (dropped: {})", f.dropped.as_deref().unwrap_or_default())
            }
            Some(f) if f.corrupt_chunks > 0 => format!(
                "  ({} corrupt chunks refetched elsewhere)",
                f.corrupt_chunks
            ),
            _ => String::new(),
        };
        crate::outln!(
            "  {peer:<12} {:>12}  {share:5.1}%{note}",
            HumanBytes(*bytes).to_string()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn contract_forms_parse() {
        for line in [
            "qnode --peer p1 serve",
            "qnode --root /tmp --peer p5 download hello_world.txt p1",
            "qnode --peer p5 list",
            "qnode --peer p5 filelist p1 p2 --json",
            "qnode --peer p5 upload notes.txt p1 p2",
            "qnode --peer p5 download x.txt --output /tmp/x --json",
            "qnode --peer p5 shell",
            "qnode --peer p5 init",
        ] {
            let args: Vec<&str> = line.split(' ').collect();
            assert!(Cli::try_parse_from(args).is_ok(), "{line}");
        }
        assert!(Cli::try_parse_from(["qnode", "--peer", "p5", "upload", "x.txt"]).is_err());
        assert_eq!(parse_rate("20M"), Ok(20 << 20));
        assert_eq!(parse_rate("500k"), Ok(500 << 10));
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert!(
            parse_rate("0").is_err()
                && parse_rate("fast").is_err()
                && parse_rate("99999999999G").is_err()
        );
        assert!(Cli::try_parse_from(["qnode", "--peer", "../x", "list"]).is_err());
    }
}
