//! Rendering the folder commands: `download FOLDER` and `upload FOLDER`, as one summary line per
//! folder or peer, or one JSON object.

use std::collections::BTreeMap;
use std::path::Path;

use indicatif::HumanBytes;
use serde::Serialize;

use super::args::UploadArgs;
use super::term::print_json;
use crate::model::manifest::hex;
use crate::node::{self, Node, UploadStatus};

/// `upload FOLDER`: per peer, one line (or one JSON object for all) saying what it stored, and
/// one error line per file it refused.
pub(super) async fn upload(node: &Node, args: &UploadArgs, dir: &Path) -> anyhow::Result<bool> {
    let compression = args.compression.into();
    let (folder, uploaded) = node
        .upload_folder(dir, &args.peers, args.replace, compression)
        .await?;
    let mut results: Vec<FolderUploadResult> = Vec::new();
    for file in &uploaded {
        for (peer, result) in &file.results {
            let peer = peer.to_string();
            let at = match results.iter().position(|r| r.peer == peer) {
                Some(at) => at,
                None => {
                    results.push(FolderUploadResult::new(peer));
                    results.len() - 1
                }
            };
            let r = &mut results[at];
            match result {
                Ok(UploadStatus::Stored) => r.stored += 1,
                Ok(UploadStatus::AlreadyPresent) => r.already_present += 1,
                Ok(UploadStatus::Replaced) => r.replaced += 1,
                Err(e) => {
                    let hint = if e.is_conflict() && !args.replace {
                        " (upload --replace replaces it; its old version is kept)"
                    } else {
                        ""
                    };
                    r.ok = false;
                    r.errors.push(FileError {
                        name: file.name.to_string(),
                        error: format!("{e}{hint}"),
                    });
                }
            }
        }
    }
    for r in &results {
        for e in &r.errors {
            crate::errln!(
                "qnode: error: uploading {} to {}: {}",
                e.name,
                r.peer,
                e.error
            );
        }
    }
    let report = FolderUploadReport {
        name: format!("{folder}/"),
        kind: "folder",
        files: uploaded.len(),
        results,
    };
    if args.json {
        print_json(&report)?;
    } else {
        for r in &report.results {
            crate::outln!(
                "{}: {} of {} files: {} stored, {} already there, {} replaced, {} refused",
                r.peer,
                report.name,
                report.files,
                r.stored,
                r.already_present,
                r.replaced,
                r.errors.len()
            );
        }
    }
    Ok(report.results.iter().all(|r| r.ok))
}

#[derive(Serialize)]
struct FolderUploadReport {
    name: String,
    kind: &'static str,
    files: usize,
    results: Vec<FolderUploadResult>,
}

#[derive(Serialize)]
struct FolderUploadResult {
    peer: String,
    ok: bool,
    stored: usize,
    already_present: usize,
    replaced: usize,
    errors: Vec<FileError>,
}

impl FolderUploadResult {
    fn new(peer: String) -> Self {
        Self {
            peer,
            ok: true,
            stored: 0,
            already_present: 0,
            replaced: 0,
            errors: Vec::new(),
        }
    }
}

#[derive(Serialize)]
struct FileError {
    name: String,
    error: String,
}

/// The bar of a folder download (hidden where stderr is not a terminal).
fn folder_bar(total: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {msg} {bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// `download FOLDER`: one summary line, or one JSON object.
pub(super) async fn download(
    node: &Node,
    req: &node::DownloadRequest,
    json: bool,
) -> anyhow::Result<bool> {
    let interrupted = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    // On a terminal: one bar over the folder's bytes, with its files counted beside it.
    let mut bar: Option<indicatif::ProgressBar> = None;
    let result = node
        .download_folder(req, interrupted, |p| {
            let bar = bar.get_or_insert_with(|| folder_bar(p.bytes));
            bar.set_position(p.bytes_done);
            bar.set_message(format!("{}/{} files", p.files_done, p.files));
        })
        .await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let done = result?;
    for (peer, why) in &done.left_out {
        crate::errln!("qnode: warning: {peer} left out: {why}");
    }
    let status = |s: node::FileStatus| match s {
        node::FileStatus::Downloaded => "downloaded",
        node::FileStatus::Copied => "copied",
        node::FileStatus::AlreadyPresent => "already_present",
        node::FileStatus::Updated => "updated",
    };
    let size: u64 = done.files.iter().map(|f| f.entry.size).sum();
    let out = FolderOut {
        name: format!("{}/", done.name),
        kind: "folder",
        blake3: hex(&done.version),
        status: if done.changed() {
            "downloaded"
        } else {
            "already_present"
        },
        path: done.target.display().to_string(),
        files: done.files.len(),
        size,
        peers: done.peers.clone(),
        displaced: done.displaced.iter().map(ToString::to_string).collect(),
        reused_bytes: done.reused_bytes,
        wire_bytes: done.wire_bytes,
        seconds: done.elapsed.as_secs_f64(),
        entries: done
            .files
            .iter()
            .map(|f| FolderEntryOut {
                name: f.entry.path.to_string(),
                size: f.entry.size,
                blake3: hex(&f.entry.blake3),
                status: status(f.status),
            })
            .collect(),
        left_out: done
            .left_out
            .iter()
            .map(|(p, why)| LeftOutOut {
                peer: p.to_string(),
                reason: why.clone(),
            })
            .collect(),
    };
    if json {
        print_json(&out)?;
        return Ok(true);
    }
    let count = |s| done.files.iter().filter(|f| f.status == s).count();
    crate::outln!(
        "folder {} ({} files, {}) in {:.2} s: {} fetched, {} copied from our own files, {} already here, {} updated, {} displaced -> {}",
        out.name,
        out.files,
        HumanBytes(size),
        out.seconds,
        count(node::FileStatus::Downloaded),
        count(node::FileStatus::Copied),
        count(node::FileStatus::AlreadyPresent),
        count(node::FileStatus::Updated),
        out.displaced.len(),
        out.path
    );
    Ok(true)
}

#[derive(Serialize)]
struct FolderOut {
    name: String,
    kind: &'static str,
    blake3: String,
    status: &'static str,
    path: String,
    files: usize,
    size: u64,
    peers: BTreeMap<String, u64>,
    /// Files the version lacks, moved to the displaced versions (`--update`).
    displaced: Vec<String>,
    reused_bytes: u64,
    wire_bytes: u64,
    seconds: f64,
    entries: Vec<FolderEntryOut>,
    left_out: Vec<LeftOutOut>,
}

#[derive(Serialize)]
struct FolderEntryOut {
    name: String,
    size: u64,
    blake3: String,
    status: &'static str,
}

/// A peer left out of a download, as rendered.
#[derive(Serialize)]
pub(super) struct LeftOutOut {
    pub(super) peer: String,
    pub(super) reason: String,
}
