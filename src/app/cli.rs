//! The command line: validates what clap parsed, calls the node session (`node`), and renders
//! what comes back as human lines or exactly one JSON object on stdout.
//!
//! Commands that talk to several peers report each peer's result; the exit status is decided at
//! the end. Nothing here touches the network, wire bytes or `served_files`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde::Serialize;

use super::folders::LeftOutOut;
use super::term::print_json;

pub use crate::app::args::{Cli, Command, DownloadArgs, ListArgs, ServeArgs, UploadArgs};
use crate::model::manifest::{FilePath, Manifest, hex, parse_hex};
use crate::model::peers::{PeerId, Root};
use crate::net::identity::{self, InitOutcome};
use crate::node::{
    self, DownloadEvent, DownloadReport, DownloadRequest, Fetched, Node, ServeOptions, UploadStatus,
};

/// Runs the parsed command line; the exit code reflects per-peer failures.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let me = cli
        .peer
        .clone()
        .context("no peer given: use --peer ID or set QNODE_PEER")?;
    let root = Root::new(cli.root);
    match cli.command {
        Command::Init => init(&root, &me),
        Command::Serve(args) => {
            node::serve(&root, &me, &serve_options(&args), shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync(args) => {
            let folder = args.folder.unwrap_or_default();
            let folder = folder.trim_end_matches('/').to_owned();
            if !folder.is_empty() {
                FilePath::new(folder.as_str())?;
            }
            let opts = node::SyncOptions {
                folder,
                peers: args.peers,
                rescan: std::time::Duration::from_secs(args.rescan.max(1)),
            };
            let json = args.json;
            let serve = serve_options(&args.serve);
            let on = move |e: node::SyncEvent| crate::app::sync::print_sync_event(&e, json);
            node::sync(&root, &me, &serve, opts, shutdown_signal(), on).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Shell => {
            let node = Node::load(&root, &me)?;
            let ok = crate::app::shell::run(async |command| execute(&node, command).await).await;
            node.finish().await;
            Ok(exit(ok))
        }
        command => {
            let node = Node::load(&root, &me)?;
            let result = execute(&node, command).await;
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

/// Runs one client command with `node` and renders it; `Ok(false)` if some peer failed.
pub async fn execute(node: &Node, command: Command) -> anyhow::Result<bool> {
    match command {
        Command::List(args) => list(node, &args).await,
        Command::Upload(args) => upload(node, &args).await,
        Command::Download(args) => download(node, &args).await,
        Command::Status(args) => super::sync::status(node, args.json).await,
        Command::Discover(args) => super::reach::discover(node, args.wait, args.json).await,
        Command::Init | Command::Serve(_) | Command::Shell | Command::Sync(_) => {
            anyhow::bail!("that command is not available here")
        }
    }
}

/// `list`: every named peer's files.
async fn list(node: &Node, args: &ListArgs) -> anyhow::Result<bool> {
    let listed = node.list(&args.peers).await?;
    let mut report = ListReport { peers: Vec::new() };
    for (peer, result) in listed {
        report.peers.push(match result {
            Ok(l) => PeerFiles {
                peer: peer.to_string(),
                ok: true,
                total: (l.total > l.files.len() as u64).then_some(l.total),
                files: Some(
                    l.files
                        .into_iter()
                        .map(|f| FileOut {
                            name: f.name.to_string(),
                            size: f.size,
                            blake3: hex(&f.blake3),
                        })
                        .collect(),
                ),
                incomplete: l
                    .incomplete
                    .into_iter()
                    .map(|f| IncompleteOut {
                        name: f.name.to_string(),
                        size: f.size,
                        blake3: hex(&f.blake3),
                        held: f.held,
                    })
                    .collect(),
                error: None,
                route: node.route(&peer),
            },
            Err(e) => PeerFiles {
                peer: peer.to_string(),
                ok: false,
                total: None,
                files: None,
                incomplete: Vec::new(),
                error: Some(e.to_string()),
                route: None,
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
            let partial = match p.incomplete.len() {
                0 => String::new(),
                n => format!(" ({n} incomplete)"),
            };
            let route = p
                .route
                .as_ref()
                .map_or_else(String::new, |r| format!(", {r}"));
            crate::outln!("{}: {} file{plural}{partial}{route}", p.peer, files.len());
            for f in files {
                crate::outln!(
                    "  {:<32} {:>12}  {}",
                    f.name,
                    HumanBytes(f.size).to_string(),
                    &f.blake3[..16]
                );
            }
            for f in &p.incomplete {
                let pct = f.held as f64 * 100.0 / f.size.max(1) as f64;
                crate::outln!(
                    "  {:<32} {:>12}  {}  incomplete: {pct:.0}% held",
                    f.name,
                    HumanBytes(f.size).to_string(),
                    &f.blake3[..16]
                );
            }
        }
    }
    Ok(ok)
}

/// `upload`: one file to every named peer.
async fn upload(node: &Node, args: &UploadArgs) -> anyhow::Result<bool> {
    // A folder (a path, or one in our served_files): every file under it.
    let in_served = node.served_dir().join(&args.file);
    let folder = match () {
        () if args.file.is_dir() => Some(args.file.clone()),
        () if !args.file.exists() && in_served.is_dir() => Some(in_served),
        () => None,
    };
    if let Some(dir) = folder {
        return super::folders::upload(node, args, &dir).await;
    }
    let uploaded = node
        .upload(
            &args.file,
            &args.peers,
            args.replace,
            args.compression.into(),
        )
        .await?;
    let name = &uploaded.name;
    let mut report = UploadReport {
        name: name.to_string(),
        results: Vec::new(),
    };
    for (peer, result) in uploaded.results {
        let (status, error) = match result {
            Ok(UploadStatus::Stored) => (Some(UploadOut::Stored), None),
            Ok(UploadStatus::AlreadyPresent) => (Some(UploadOut::AlreadyPresent), None),
            Ok(UploadStatus::Replaced) => (Some(UploadOut::Replaced), None),
            Err(e) if e.is_conflict() && !args.replace => (
                None,
                Some(format!(
                    "{e} (upload --replace replaces it; its old version is kept)"
                )),
            ),
            Err(e) => (None, Some(e.to_string())),
        };
        report.results.push(UploadResult {
            peer: peer.to_string(),
            ok: status.is_some(),
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
        for r in &report.results {
            match r.status {
                Some(UploadOut::Stored) => {
                    crate::outln!("{}: stored {name} ({})", r.peer, HumanBytes(uploaded.size))
                }
                Some(UploadOut::AlreadyPresent) => crate::outln!("{}: already has {name}", r.peer),
                Some(UploadOut::Replaced) => crate::outln!(
                    "{}: replaced its {name} with ours ({}); its old version is kept hidden",
                    r.peer,
                    HumanBytes(uploaded.size)
                ),
                None => {}
            }
        }
    }
    Ok(report.results.iter().all(|r| r.ok))
}

/// `download`: fetch one file from every peer that serves it.
async fn download(node: &Node, args: &DownloadArgs) -> anyhow::Result<bool> {
    let blake3 = match &args.blake3 {
        Some(h) => {
            Some(parse_hex(h).with_context(|| format!("--blake3 {h:?} is not 64 hex digits"))?)
        }
        None => None,
    };
    // A trailing `/` says the name is a folder; without it, a name no peer serves as a file is
    // tried as a folder.
    let folder = args.name.ends_with('/');
    let name = FilePath::new(args.name.trim_end_matches('/'))?;
    // The same request names a file or, failing that, a folder.
    let req = DownloadRequest {
        name,
        peers: args.peers.clone(),
        output: args.output.clone(),
        blake3,
        window: args.window,
        update: args.update,
    };
    if folder {
        return super::folders::download(node, &req, args.json).await;
    }
    let mut bar: Option<ProgressBar> = None;
    let interrupted = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let result = node
        .download(&req, interrupted, |event| match event {
            DownloadEvent::LeftOut(peer, why) => {
                let line = format!("qnode: warning: {peer} left out: {why}");
                match &bar {
                    Some(b) => b.suspend(|| crate::errln!("{line}")),
                    None => crate::errln!("{line}"),
                }
            }
            DownloadEvent::Started(size) => bar = progress_bar(size),
            DownloadEvent::Progress(p) => {
                if let Some(b) = &bar {
                    b.set_position(p.done);
                }
            }
        })
        .await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let done = match result {
        Err(e) if e.downcast_ref::<node::NotServed>().is_some() => {
            // Not a file anywhere: a folder, if some peer has one under that name.
            return match super::folders::download(node, &req, args.json).await {
                Err(f) if f.to_string().starts_with("no peer serves the folder") => Err(e),
                other => other,
            };
        }
        other => other?,
    };
    report_download(node, &done, args.json)
}

/// A file download's warnings (corrupt chunks, dropped peers), then its line or JSON object.
fn report_download(node: &Node, done: &node::Downloaded, json: bool) -> anyhow::Result<bool> {
    if let Some(report) = &done.report {
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
    }
    let left_out = done
        .left_out
        .iter()
        .map(|(p, why)| LeftOutOut {
            peer: p.to_string(),
            reason: why.to_string(),
        })
        .collect();
    let out = DownloadOut::new(
        &done.name,
        &done.target,
        &done.manifest,
        done.elapsed.as_secs_f64(),
        done.status.into(),
        done.report.as_ref(),
        left_out,
    );
    let mut out = out;
    for peer in out.peers.keys().cloned().collect::<Vec<_>>() {
        if let Some(route) = peer.parse().ok().and_then(|p| node.route(&p)) {
            out.routes.insert(peer, route);
        }
    }
    out.reused_bytes = done.reused_bytes;
    out.wire_bytes = done.wire_bytes;
    for (peer, bytes) in &done.range_bytes {
        *out.peers.entry(peer.clone()).or_default() += bytes;
    }
    for (peer, why) in &done.update_liars {
        match out.faults.iter_mut().find(|f| &f.peer == peer) {
            Some(f) => {
                f.dropped.get_or_insert_with(|| why.clone());
            }
            None => out.faults.push(Fault {
                peer: peer.clone(),
                corrupt_chunks: 0,
                failed_requests: 0,
                reconnects: 0,
                dropped: Some(why.clone()),
            }),
        }
    }
    render_download(&out, json)?;
    Ok(true)
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
    /// Downloads in progress at the peer (never whole files), present only if there are any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    incomplete: Vec<IncompleteOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// How a peer not dialled at its listed address was reached (as in `download --json`'s
    /// `routes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<String>,
}

#[derive(Serialize)]
struct IncompleteOut {
    name: String,
    size: u64,
    blake3: String,
    /// Bytes verified so far.
    held: u64,
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

/// An upload's `status` in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum UploadOut {
    Stored,
    AlreadyPresent,
    Replaced,
}

#[derive(Serialize)]
struct UploadResult {
    peer: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<UploadOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
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

/// A download's `status` in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    Downloaded,
    AlreadyPresent,
    Updated,
}

impl From<Fetched> for Status {
    fn from(f: Fetched) -> Self {
        match f {
            Fetched::Downloaded => Self::Downloaded,
            Fetched::AlreadyPresent => Self::AlreadyPresent,
            Fetched::Updated => Self::Updated,
        }
    }
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
    status: Status,
    faults: Vec<Fault>,
    left_out: Vec<LeftOutOut>,
    resumed_bytes: u64,
    /// Bytes taken from our old copy (`--update`).
    reused_bytes: u64,
    /// Bytes of the peers' replies that crossed the wire (fewer than they stand for where they
    /// were compressed).
    wire_bytes: u64,
    /// How each peer not dialled at its listed address was reached (`found on the LAN`,
    /// `punched (introduced by p1)`, `relayed by p1`); the others were dialled directly.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    routes: BTreeMap<String, String>,
}

impl DownloadOut {
    fn new(
        name: &FilePath,
        target: &Path,
        manifest: &Manifest,
        seconds: f64,
        status: Status,
        report: Option<&DownloadReport>,
        left_out: Vec<LeftOutOut>,
    ) -> Self {
        let path = std::path::absolute(target).unwrap_or_else(|_| target.to_owned());
        let sources = report.map(|r| r.sources.as_slice()).unwrap_or_default();
        Self {
            name: name.to_string(),
            path: path.display().to_string(),
            size: manifest.size(),
            blake3: hex(&manifest.blake3()),
            seconds,
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
            reused_bytes: 0,
            wire_bytes: 0,
            routes: BTreeMap::new(),
        }
    }
}

fn render_download(out: &DownloadOut, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(out);
    }
    if out.status == Status::AlreadyPresent && out.peers.is_empty() {
        crate::outln!(
            "{} is already here ({}, identical); nothing to download",
            out.path,
            HumanBytes(out.size)
        );
        return Ok(());
    }
    let rate = out.size as f64 / out.seconds.max(1e-9);
    if out.status == Status::Updated {
        let fetched: u64 = out.peers.values().sum();
        crate::outln!(
            "updated {} ({}) in {:.2} s: reused {} from our old copy, fetched {} -> {}",
            out.name,
            HumanBytes(out.size),
            out.seconds,
            HumanBytes(out.reused_bytes),
            HumanBytes(fetched),
            out.path
        );
    } else {
        crate::outln!(
            "downloaded {} ({}) in {:.2} s, {}/s -> {}",
            out.name,
            HumanBytes(out.size),
            out.seconds,
            HumanBytes(rate as u64),
            out.path
        );
    }
    let fetched: u64 = out.peers.values().sum();
    if fetched > 0 {
        crate::outln!(
            "  {:<12} {:>12}  ({:.0}% of the {} fetched)",
            "on the wire",
            HumanBytes(out.wire_bytes).to_string(),
            out.wire_bytes as f64 * 100.0 / fetched as f64,
            HumanBytes(fetched)
        );
    }
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

/// The server's options from the command line.
fn serve_options(args: &ServeArgs) -> ServeOptions {
    ServeOptions {
        max_upload_size: args.max_upload_size,
        listen: args.listen,
        max_upload_rate: args.max_upload_rate,
        congestion: args.congestion.into(),
        compression: args.compression.into(),
        relay: !args.no_relay,
        relay_rate: args.relay_rate,
        max_relayed: args.max_relayed,
    }
}
