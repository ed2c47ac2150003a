//! Folders: a tree of many small text files, fetched whole by `qnode download FOLDER` and by
//! `rsync -rt` (daemon) in the same run, between network namespaces (`tests/util/netns.rs`); then
//! the listing of a 100,000-file tree on loopback.
//!
//! Part 1, per run (the tools take turns, case by case): a fresh copy from one peer (rsync, qnode)
//! and from three peers (qnode); a re-run with nothing changed; one line edited in one file and
//! ten files renamed or moved, brought over by `download --update` and `rsync -rt --delete`.
//! Then, with the servers sending uncompressed (so the links are the limit), a fresh copy from
//! one peer and from three.
//! Printed: bytes on the client's link (both directions) and seconds, median (min–max). The
//! servers' links are limited both ways to the rate; the client's only what it sends, so three
//! servers can fill three links.
//!
//! Part 2: a 100,000-file tree on loopback: the server's first scan, then `list` timed, and the
//! peak RSS of the server and of each command; then the whole tree downloaded as a folder.
//!
//! `cargo bench --bench folders` (part 1: root, `ip`, `tc`, `rsync`; skipped with a note
//! otherwise). Knobs: `QNODE_BENCH_FOLDER_FILES` (default 10000), `QNODE_BENCH_FOLDER_RATE`
//! (default 100mbit), `QNODE_BENCH_RUNS` (default 3), `QNODE_BENCH_BIG_FILES` (part 2, default
//! 100000; 0 skips it), `QNODE_BENCH_BIN` (the qnode binary).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

mod util;
use util::{Root, Spread, Usage, env_u64, measure, median, stop, wait_usage};

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/util/netns.rs"]
mod netns;

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/util/text.rs"]
mod text;

/// Writes a tree of `files` text files of 1–16 KiB under `dir`, in about `files / 100` folders
/// (ten top folders, each with subfolders); returns its size in bytes.
fn make_tree(dir: &Path, files: u64, small: bool) -> anyhow::Result<u64> {
    let folders = (files / 100).max(1);
    let mut total = 0;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for i in 0..files {
        let sub = dir.join(folder_of(i, folders));
        if i < folders {
            std::fs::create_dir_all(&sub)?;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let size = if small {
            64 + (x % 192) as usize
        } else {
            1024 + (x % (15 * 1024 + 1)) as usize
        };
        std::fs::write(
            sub.join(format!("note-{i:06}.txt")),
            text::text(size, i + 1),
        )?;
        total += size as u64;
    }
    Ok(total)
}

/// The folder of file `i` in a tree of `folders` folders.
fn folder_of(i: u64, folders: u64) -> String {
    let f = i % folders;
    format!("part {:02}/topic-{f:04}", f % 10)
}

/// The edits of case (d): one line of one file changed, five files renamed in their folder and
/// five moved to another folder. `undo` puts them back.
fn change(tree: &Path, folders: u64, undo: bool) -> anyhow::Result<()> {
    let edited = tree.join(folder_of(303, folders)).join("note-000303.txt");
    let mut text = std::fs::read(&edited)?;
    let line = b"this line was edited once ";
    if undo {
        text[100..100 + line.len()].copy_from_slice(&text::text(400, 304)[100..100 + line.len()]);
    } else {
        text[100..100 + line.len()].copy_from_slice(line);
    }
    std::fs::write(&edited, text)?;
    for k in 0..10u64 {
        let i = 10 + k * 7;
        let from = tree
            .join(folder_of(i, folders))
            .join(format!("note-{i:06}.txt"));
        let to = if k < 5 {
            from.with_file_name(format!("renamed-{i:06}.txt"))
        } else {
            tree.join(folder_of(i + 1, folders))
                .join(format!("moved-{i:06}.txt"))
        };
        let (a, b) = if undo { (to, from) } else { (from, to) };
        std::fs::rename(&a, &b).with_context(|| format!("moving {}", a.display()))?;
    }
    Ok(())
}

/// The regular files under `dir` (hidden entries skipped), relative, sorted.
fn files_of(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = ignore::WalkBuilder::new(dir)
        .standard_filters(false)
        .hidden(true)
        .build()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_some_and(|t| t.is_file()))
        .filter_map(|e| e.path().strip_prefix(dir).ok().map(Path::to_owned))
        .collect();
    out.sort();
    out
}

/// Fails unless `got` holds exactly the files of `want`, byte for byte.
fn same_tree(got: &Path, want: &Path, what: &str) -> anyhow::Result<()> {
    let (g, w) = (files_of(got), files_of(want));
    if g != w {
        bail!("{what}: {} files, want {}", g.len(), w.len());
    }
    for f in &w {
        if std::fs::read(got.join(f))? != std::fs::read(want.join(f))? {
            bail!("{what}: {} differs", f.display());
        }
    }
    Ok(())
}

/// Servers, stopped however the benchmark ends.
struct Running(Vec<std::process::Child>);

impl Drop for Running {
    fn drop(&mut self) {
        stop(&mut self.0);
    }
}

fn main() -> anyhow::Result<()> {
    let runs = env_u64("QNODE_BENCH_RUNS", 3).max(1) as usize;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root && ["ip", "tc", "rsync"].iter().all(|t| netns::have(t)) {
        network(runs)?;
    } else {
        eprintln!(
            "note: part 1 (against rsync) needs root, ip, tc and rsync (apt-get install rsync)"
        );
    }
    let big = env_u64("QNODE_BENCH_BIG_FILES", 100_000);
    if big > 0 {
        listing(big)?;
    }
    Ok(())
}

/// The rows: case, tool, and the row of the reference it is measured against.
const CASES: [(&str, &str, usize); 10] = [
    ("(a) fresh copy, 1 peer", "rsync -rt", 0),
    ("(a) fresh copy, 1 peer", "rsync -rtz", 0),
    ("(a) fresh copy, 1 peer", "qnode", 0),
    ("(b) fresh copy, 3 peers", "qnode", 0),
    ("(c) nothing changed", "rsync -rt", 4),
    ("(c) nothing changed", "qnode", 4),
    ("(d) 1 line edited, 10 files moved", "rsync -rt --delete", 6),
    ("(d) 1 line edited, 10 files moved", "qnode --update", 6),
    ("(e) fresh copy, 1 peer, uncompressed", "qnode", 0),
    ("(e) fresh copy, 3 peers, uncompressed", "qnode", 8),
];

fn network(runs: usize) -> anyhow::Result<()> {
    let files = env_u64("QNODE_BENCH_FOLDER_FILES", 10_000);
    let rate = std::env::var("QNODE_BENCH_FOLDER_RATE").unwrap_or_else(|_| "100mbit".into());
    let net = netns::TestNet::new(4)?;
    for i in 1..=3 {
        net.shape(i, &rate, "64kb")?;
        net.shape_in(i, &rate, "64kb")?;
    }
    net.shape(4, &rate, "64kb")?;
    let ns: Vec<String> = (1..=4).map(|i| net.ns(i).to_owned()).collect();
    let peers: Vec<(&str, String)> = (1..=4)
        .map(|i| {
            (
                ["p1", "p2", "p3", "p4"][i - 1],
                format!("{} 47600", net.ip(i)),
            )
        })
        .collect();
    let root = Root::new(&peers)?;
    let tree = root.served("p1").join("tree");
    let folders = (files / 100).max(1);
    let size = make_tree(&tree, files, false)?;
    for id in ["p2", "p3"] {
        let st = Command::new("cp")
            .arg("-a")
            .arg(&tree)
            .arg(root.served(id))
            .status()?;
        anyhow::ensure!(st.success(), "copying the tree to {id}");
    }
    println!(
        "qnode folders benchmark: {files} text files, {:.1} MB, in {} folders; {rate} links; median of {runs} runs",
        size as f64 / 1e6,
        folders
    );
    let client = ns[3].as_str();
    let mut servers = Running(Vec::new());
    for (i, id) in ["p1", "p2", "p3"].iter().enumerate() {
        servers
            .0
            .push(root.serve(Some(&ns[i]), id, &[], ("p4", Some(client)))?);
    }
    // The servers' first scan, before anything is timed (rsync keeps no index to warm).
    for id in ["p1", "p2", "p3"] {
        let out = root.cmd(Some(client), "p4", &["list", id]).output()?;
        anyhow::ensure!(out.status.success(), "list {id}");
    }
    let conf = root.path().join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "port = 8730\nuse chroot = no\nuid = root\ngid = root\npid file = {d}/rsyncd.pid\n[m]\npath = {s}\nread only = yes\n",
            d = root.path().display(),
            s = root.served("p1").display()
        ),
    )?;
    let rsyncd = Command::new("ip")
        .args(["netns", "exec", &ns[0], "rsync", "--daemon", "--no-detach"])
        .arg(format!("--config={}", conf.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    servers.0.push(rsyncd);
    std::thread::sleep(Duration::from_millis(300));

    let rsync_dest = root.path().join("rsync-dest");
    let qnode_dest = root.served("p4").join("tree");
    let rsync = |extra: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", client, "rsync", "-rt"])
            .args(extra)
            .arg(format!("rsync://{}:8730/m/tree/", net.ip(1)))
            .arg(format!("{}/", rsync_dest.display()));
        c
    };
    let qnode = |args: &[&str]| root.cmd(Some(client), "p4", args);
    // A copy is moved aside, not deleted, until the end: ext4 without a journal (this machine's
    // disk) skips inodes freed in the last minutes when it makes a file, so a tool run right
    // after a deletion of 10,000 files pays for it, whichever tool it is.
    let trash = root.path().join("trash");
    std::fs::create_dir(&trash)?;
    let moved = std::sync::atomic::AtomicUsize::new(0);
    let wipe = |p: &Path| {
        let n = moved.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match std::fs::rename(p, trash.join(n.to_string())) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    };
    let mut rows: Vec<Vec<(u64, f64)>> = vec![Vec::new(); CASES.len()];
    for _ in 0..runs {
        wipe(&rsync_dest)?;
        rows[0].push(measure(client, &mut rsync(&[]))?);
        same_tree(&rsync_dest, &tree, "rsync")?;
        wipe(&rsync_dest)?;
        rows[1].push(measure(client, &mut rsync(&["-z"]))?);
        same_tree(&rsync_dest, &tree, "rsync -z")?;
        wipe(&qnode_dest)?;
        rows[2].push(measure(client, &mut qnode(&["download", "tree", "p1"]))?);
        same_tree(&qnode_dest, &tree, "qnode, 1 peer")?;
        wipe(&qnode_dest)?;
        let mut c = qnode(&["download", "tree", "p1", "p2", "p3"]);
        rows[3].push(measure(client, &mut c)?);
        same_tree(&qnode_dest, &tree, "qnode, 3 peers")?;
        rows[4].push(measure(client, &mut rsync(&[]))?);
        rows[5].push(measure(client, &mut qnode(&["download", "tree", "p1"]))?);
        for id in ["p1", "p2", "p3"] {
            change(&root.served(id).join("tree"), folders, false)?;
        }
        rows[6].push(measure(client, &mut rsync(&["--delete"]))?);
        same_tree(&rsync_dest, &tree, "rsync --delete")?;
        let mut c = qnode(&["download", "tree", "p1", "--update"]);
        rows[7].push(measure(client, &mut c)?);
        same_tree(&qnode_dest, &tree, "qnode --update")?;
        for id in ["p1", "p2", "p3"] {
            change(&root.served(id).join("tree"), folders, true)?;
        }
    }
    // (e) The links as the limit: the servers again, sending the text as it is.
    stop(&mut servers.0);
    for (i, id) in ["p1", "p2", "p3"].iter().enumerate() {
        let plain = ["--compression", "never"];
        (servers.0).push(root.serve(Some(&ns[i]), id, &plain, ("p4", Some(client)))?);
    }
    for _ in 0..runs {
        wipe(&qnode_dest)?;
        rows[8].push(measure(client, &mut qnode(&["download", "tree", "p1"]))?);
        same_tree(&qnode_dest, &tree, "qnode, 1 peer, uncompressed")?;
        wipe(&qnode_dest)?;
        let mut c = qnode(&["download", "tree", "p1", "p2", "p3"]);
        rows[9].push(measure(client, &mut c)?);
        same_tree(&qnode_dest, &tree, "qnode, 3 peers, uncompressed")?;
    }
    println!();
    println!("| case | tool | bytes on the link | seconds | bytes vs ref. | time vs ref. | ref. |");
    println!("|---|---|---|---|---|---|---|");
    let stats: Vec<(Spread, Spread)> = rows
        .iter()
        .map(|r| {
            let mut bytes: Vec<f64> = r.iter().map(|&(b, _)| b as f64).collect();
            let mut secs: Vec<f64> = r.iter().map(|&(_, s)| s).collect();
            (median(&mut bytes), median(&mut secs))
        })
        .collect();
    for ((case, tool, reference), ((b, _, _), (s, smin, smax))) in CASES.iter().zip(&stats) {
        let ((rb, _, _), (rs, _, _)) = stats[*reference];
        let (rcase, rtool, _) = CASES[*reference];
        let rcase = rcase.split(' ').next().unwrap_or(rcase);
        println!(
            "| {case} | {tool} | {:.3} MB | {s:.2} ({smin:.2}–{smax:.2}) | {:.2} | {:.2} | {rcase} {rtool} |",
            b / 1e6,
            b / rb,
            s / rs
        );
    }
    stop(&mut servers.0);
    Ok(())
}

/// Part 2: a tree of `files` small files on loopback, listed and downloaded whole.
fn listing(files: u64) -> anyhow::Result<()> {
    let peers = [
        ("p1", "127.0.0.1 47650".to_owned()),
        ("p2", "127.0.0.1 47651".to_owned()),
    ];
    let root = Root::new(&peers)?;
    let made = Instant::now();
    let size = make_tree(&root.served("p1").join("big"), files, true)?;
    println!();
    println!(
        "{files}-file tree ({:.1} MB) on loopback, written in {:.1} s",
        size as f64 / 1e6,
        made.elapsed().as_secs_f64()
    );
    let mut server = Running(vec![root.serve(None, "p1", &[], ("p2", None))?]);
    let run = |args: &[&str]| -> anyhow::Result<Usage> {
        let started = Instant::now();
        let child = root
            .cmd(None, "p2", args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let usage = wait_usage(child, started);
        anyhow::ensure!(usage.ok, "{args:?} failed");
        Ok(usage)
    };
    let first = run(&["list", "p1"])?;
    let mut again: Vec<f64> = Vec::new();
    let mut list_rss = first.max_rss_kib;
    for _ in 0..3 {
        let u = run(&["list", "p1"])?;
        again.push(u.wall);
        list_rss = list_rss.max(u.max_rss_kib);
    }
    let (m, lo, hi) = median(&mut again);
    let fetched = run(&["download", "big", "p1"])?;
    same_tree(
        &root.served("p2").join("big"),
        &root.served("p1").join("big"),
        "the big tree",
    )?;
    let server_rss = stop(&mut server.0)[0];
    println!();
    println!("| step | seconds | peak RSS |");
    println!("|---|---|---|");
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "| list, the first (the server scanned when it came up) | {:.2} | {:.1} MiB |",
        first.wall,
        mib(first.max_rss_kib)
    );
    println!(
        "| list, after it | {m:.2} ({lo:.2}–{hi:.2}) | {:.1} MiB |",
        mib(list_rss)
    );
    println!(
        "| download of the whole tree | {:.2} | {:.1} MiB |",
        fetched.wall,
        mib(fetched.max_rss_kib)
    );
    println!("| the server, all along | - | {:.1} MiB |", mib(server_rss));
    Ok(())
}
