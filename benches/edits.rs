//! Edits travel: the bytes on the link (both directions) and the time to bring an old copy of a
//! large text file up to date, for `qnode download --update`, `qnode upload --replace` and rsync
//! (daemon, delta transfer on; with and without -z), in the same run, between two network
//! namespaces on a rate-limited link (`tests/util/netns.rs`).
//!
//! `cargo bench --bench edits` (root, `ip`, `tc`, `rsync`; prints a note and exits otherwise).
//! Each measurement is repeated and its median (min–max) printed: the tools take turns, case by
//! case, so each meets the machine in the same state.
//! Knobs: `QNODE_BENCH_EDIT_MIB` (file size, default 100), `QNODE_BENCH_EDIT_RATE` (tc rate,
//! default 20mbit), `QNODE_BENCH_RUNS` (repetitions, default 3), `QNODE_BENCH_BIN` (the qnode
//! binary).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

// The tests' text generator.
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/util/text.rs"]
mod text;
use text::text;

// The tests' namespaces (one module for both); the bench uses only part of it.
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/util/netns.rs"]
mod netns;

mod util;
use util::{Spread, measure, median, qnode};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Peers {
    root: PathBuf,
}

impl Peers {
    fn cmd(&self, ns: &str, id: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, &qnode()])
            .arg("--root")
            .arg(&self.root)
            .args(["--peer", id])
            .args(args)
            .env_remove("RUST_LOG");
        c
    }

    fn served(&self, id: &str) -> PathBuf {
        self.root.join(id).join("served_files")
    }
}

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !["ip", "tc", "rsync"].iter().all(|t| netns::have(t)) {
        eprintln!("note: the edits benchmark needs root, ip, tc and rsync (apt-get install rsync)");
        return Ok(());
    }
    let mib: usize = std::env::var("QNODE_BENCH_EDIT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let rate = std::env::var("QNODE_BENCH_EDIT_RATE").unwrap_or_else(|_| "20mbit".into());
    let runs: usize = std::env::var("QNODE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let size = mib << 20;
    println!("qnode edits benchmark: {mib} MiB text, {rate} link each way, median of {runs} runs");

    let net = netns::TestNet::new(2)?;
    net.shape(1, &rate, "64kb")?;
    net.shape(2, &rate, "64kb")?;
    let (ns1, ns2) = (net.ns(1).to_owned(), net.ns(2).to_owned());
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("peer_settings.txt"),
        format!("p1 {} 47500\np2 {} 47501\n", net.ip(1), net.ip(2)),
    )?;
    let peers = Peers {
        root: dir.path().to_owned(),
    };
    for (ns, id) in [(&ns1, "p1"), (&ns2, "p2")] {
        let st = peers
            .cmd(ns, id, &["init"])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "init {id}");
    }
    let _server = Kill(
        peers
            .cmd(&ns1, "p1", &["serve"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let rsync_dir = dir.path().join("rsync");
    std::fs::create_dir(&rsync_dir)?;
    let conf = dir.path().join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "port = 8730\nuse chroot = no\nuid = root\ngid = root\npid file = {d}/rsyncd.pid\n[m]\npath = {d}\nread only = yes\n",
            d = rsync_dir.display()
        ),
    )?;
    let _rsyncd = Kill(
        Command::new("ip")
            .args(["netns", "exec", &ns1, "rsync", "--daemon", "--no-detach"])
            .arg(format!("--config={}", conf.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    // Both up: p2 can list p1.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !peers
        .cmd(&ns2, "p2", &["list", "p1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success()
    {
        if Instant::now() > deadline {
            bail!("p1 did not come up");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let base = text(size, 1);
    let mut inserted = base.clone();
    let mid = inserted.len() / 2;
    inserted.splice(
        mid..mid,
        b"a new line inserted in the middle of it all\n"
            .iter()
            .copied(),
    );
    let mut scattered = base.clone();
    for k in 1..=100 {
        let at = k * (size / 101);
        let line = b"an edited line here ";
        scattered[at..at + line.len()].copy_from_slice(line);
    }
    let mut appended = base.clone();
    appended.extend(text(1 << 20, 2));
    let cases = [
        ("(a) one line inserted", inserted),
        ("(b) 100 scattered edits", scattered),
        ("(c) 1 MiB appended", appended),
    ];

    println!();
    println!("| case | tool | bytes on the link | seconds | bytes vs rsync | time vs rsync |");
    println!("|---|---|---|---|---|---|");
    const TOOLS: [&str; 4] = [
        "rsync",
        "rsync -z",
        "qnode download --update",
        "qnode upload --replace",
    ];
    for (k, (case, new)) in cases.iter().enumerate() {
        let name = format!("edit{k}.txt");
        // Per tool, (bytes, seconds) of each run.
        let mut rows: Vec<Vec<(u64, f64)>> = vec![Vec::new(); TOOLS.len()];
        for _ in 0..runs {
            // rsync (reference): the old copy at the client, the new one in the daemon's folder.
            let dest = dir.path().join(format!("rsync-dest-{k}.txt"));
            std::fs::write(rsync_dir.join(&name), new)?;
            for (t, z) in [(0, false), (1, true)] {
                std::fs::write(&dest, &base)?;
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns2, "rsync", "-I", "--no-whole-file"]);
                if z {
                    c.arg("-z");
                }
                c.arg(format!("rsync://{}:8730/m/{name}", net.ip(1)))
                    .arg(&dest);
                rows[t].push(measure(&ns2, &mut c)?);
                check(&dest, new, TOOLS[t])?;
            }
            // download --update: p1 serves the new version, p2 holds the old one.
            std::fs::write(peers.served("p1").join(&name), new)?;
            std::fs::write(peers.served("p2").join(&name), &base)?;
            let mut c = peers.cmd(&ns2, "p2", &["download", &name, "p1", "--update"]);
            rows[2].push(measure(&ns2, &mut c)?);
            check(&peers.served("p2").join(&name), new, TOOLS[2])?;
            // upload --replace: p2 holds the new version, p1 the old one.
            let up = format!("up{k}.txt");
            std::fs::write(peers.served("p1").join(&up), &base)?;
            std::fs::write(peers.served("p2").join(&up), new)?;
            let mut c = peers.cmd(&ns2, "p2", &["upload", &up, "p1", "--replace"]);
            rows[3].push(measure(&ns2, &mut c)?);
            check(&peers.served("p1").join(&up), new, TOOLS[3])?;
        }
        let stats: Vec<(Spread, Spread)> = rows
            .iter()
            .map(|r| {
                let mut bytes: Vec<f64> = r.iter().map(|&(b, _)| b as f64).collect();
                let mut secs: Vec<f64> = r.iter().map(|&(_, s)| s).collect();
                (median(&mut bytes), median(&mut secs))
            })
            .collect();
        let (rb, rs) = (stats[0].0.0, stats[0].1.0);
        for (tool, ((b, _, _), (s, smin, smax))) in TOOLS.iter().zip(&stats) {
            println!(
                "| {case} | {tool} | {:.3} MB | {s:.2} ({smin:.2}–{smax:.2}) | {:.2} | {:.2} |",
                b / 1e6,
                b / rb,
                s / rs
            );
        }
    }
    Ok(())
}

fn check(path: &Path, want: &[u8], what: &str) -> anyhow::Result<()> {
    let got = std::fs::read(path).with_context(|| format!("{what}: reading the result"))?;
    if got != want {
        bail!("{what}: the result differs from the new version");
    }
    Ok(())
}
