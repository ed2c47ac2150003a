//! Live sync: `qnode sync` against Syncthing (Debian's package) in the same run, five hosts in
//! network namespaces on a bridge, each link limited to the rate both ways
//! (`tests/util/netns.rs`). Each tool in turn:
//!
//! 1. Initial sync: host 1 holds a folder of `QNODE_BENCH_SYNC_FILES` text files (1–16 KiB, in
//!    about 100 folders) and one 1 MiB text file; the time until all four other hosts hold all
//!    of it, and the bytes on all links.
//! 2. Idle: the CPU each peer's process (with its children) uses over 20 s with the folder in
//!    sync and nothing changing; the busiest peer's figure is printed.
//! 3. One line edited in the 1 MiB file on host 1 (written in place): the time until the first
//!    other host holds the new version, and until all four do (polled every 5 ms), and the
//!    bytes on all links; median of `QNODE_BENCH_RUNS`.
//!
//! Syncthing runs with discovery, relays, NAT and usage reports off and static addresses, once
//! with its default watcher delay (10 s) and once with 1 s. Bytes are the sum over the hosts'
//! links of what each sent (every byte counted once).
//!
//! `cargo bench --bench sync` (root, `ip`, `tc`, `syncthing`; skipped with a note otherwise);
//! `QNODE_BENCH_SYNC_HOSTS=2` for one peer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

mod util;
use util::{Root, cpu_ticks, env_u64, median, stop};

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/util/netns.rs"]
mod netns;

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/util/text.rs"]
mod text;

/// Hosts in the run (`QNODE_BENCH_SYNC_HOSTS`, default 5: host 1 and four peers; 2 gives the
/// figures for one peer).
fn hosts() -> usize {
    env_u64("QNODE_BENCH_SYNC_HOSTS", 5).clamp(2, 16) as usize
}
const BIG: &str = "big.txt";

/// Bytes all hosts have sent on their links.
fn sent_by_all(net: &netns::TestNet) -> anyhow::Result<u64> {
    let mut total = 0;
    for i in 1..=hosts() {
        let out = Command::new("ip")
            .args(["netns", "exec", net.ns(i), "cat"])
            .arg("/sys/class/net/eth0/statistics/tx_bytes")
            .output()?;
        total += String::from_utf8_lossy(&out.stdout).trim().parse::<u64>()?;
    }
    Ok(total)
}

/// The folder: `files` notes in about 100 folders and one 1 MiB text file.
fn make_folder(dir: &Path, files: u64) -> anyhow::Result<u64> {
    let folders = (files / 100).max(1);
    let mut total = 0;
    for i in 0..files {
        let sub = dir.join(format!("d{:02}", i % folders));
        std::fs::create_dir_all(&sub)?;
        let size = 1024 + (i * 7919 % (15 * 1024)) as usize;
        std::fs::write(
            sub.join(format!("note-{i:06}.txt")),
            text::text(size, i + 1),
        )?;
        total += size as u64;
    }
    std::fs::write(dir.join(BIG), text::text(1 << 20, 7))?;
    Ok(total + (1 << 20))
}

/// How many regular files are under `dir` (hidden entries skipped).
fn count(dir: &Path) -> u64 {
    let walk = ignore::WalkBuilder::new(dir)
        .standard_filters(false)
        .hidden(true)
        .build();
    walk.filter_map(Result::ok)
        .filter(|e| e.file_type().is_some_and(|t| t.is_file()))
        .count() as u64
}

/// The big file with line `k` (of its lines) replaced.
fn edited(original: &[u8], k: usize, run: usize) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = original
        .split(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect();
    let i = k % lines.len().saturating_sub(1).max(1);
    lines[i] = format!("this line was edited in run {run}").into_bytes();
    lines.join(&b'\n')
}

/// A tool under test: where each host's folder is, and its processes.
struct Tool {
    name: String,
    folders: Vec<PathBuf>,
    children: Vec<Child>,
    /// Waits until every peer says it is in sync, where the tool can say so.
    settled: Option<Box<dyn Fn() -> anyhow::Result<()>>>,
}

impl Drop for Tool {
    fn drop(&mut self) {
        stop(&mut self.children);
    }
}

/// Waits until every other host's folder holds `files` files and its big file is `big`; the
/// seconds until the first and until the last did.
fn wait_all(tool: &Tool, files: u64, big: &[u8], poll: Duration) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let mut done: Vec<Option<f64>> = vec![None; hosts() - 1];
    while done.iter().any(Option::is_none) {
        for (i, d) in done.iter_mut().enumerate() {
            if d.is_some() {
                continue;
            }
            let dir = &tool.folders[i + 1];
            let same = std::fs::read(dir.join(BIG)).is_ok_and(|b| b == big);
            if same && (files == 0 || count(dir) >= files) {
                *d = Some(started.elapsed().as_secs_f64());
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("{}: not in sync after 10 minutes", tool.name);
        }
        std::thread::sleep(poll);
    }
    let times: Vec<f64> = done.into_iter().flatten().collect();
    let first = times.iter().copied().fold(f64::MAX, f64::min);
    let last = times.iter().copied().fold(0.0, f64::max);
    Ok((first, last))
}

/// What one tool measured.
struct Figures {
    initial: (f64, u64),
    idle_cpu: Vec<f64>,
    edit_first: Vec<f64>,
    edit_all: Vec<f64>,
    edit_bytes: Vec<f64>,
}

fn measure(net: &netns::TestNet, tool: &Tool, files: u64, runs: usize) -> anyhow::Result<Figures> {
    let big = std::fs::read(tool.folders[0].join(BIG))?;
    let before = sent_by_all(net)?;
    let (_, all) = wait_all(tool, files + 1, &big, Duration::from_millis(200))?;
    let initial = (all, sent_by_all(net)? - before);
    // Settle (each qnode peer has taken in every other's index), then idle.
    if let Some(settled) = &tool.settled {
        settled()?;
    }
    std::thread::sleep(Duration::from_secs(5));
    let pids: Vec<u32> = tool.children.iter().map(Child::id).collect();
    let ticks: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    let idle = Duration::from_secs(20);
    std::thread::sleep(idle);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let idle_cpu = (pids.iter().zip(&ticks))
        .map(|(&p, &t)| (cpu_ticks(p) - t) as f64 / hz / idle.as_secs_f64() * 100.0)
        .collect();
    let (mut edit_first, mut edit_all, mut edit_bytes) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let new = edited(&big, 997 * (run + 1), run);
        let before = sent_by_all(net)?;
        std::fs::write(tool.folders[0].join(BIG), &new)?;
        let (first, all) = wait_all(tool, 0, &new, Duration::from_millis(5))?;
        std::thread::sleep(Duration::from_secs(2));
        edit_first.push(first);
        edit_all.push(all);
        edit_bytes.push((sent_by_all(net)? - before) as f64);
    }
    Ok(Figures {
        initial,
        idle_cpu,
        edit_first,
        edit_all,
        edit_bytes,
    })
}

/// `qnode sync` on every host, host 1 holding the folder.
fn start_qnode(net: &netns::TestNet, root: &Root, files: u64) -> anyhow::Result<Tool> {
    let ids: Vec<String> = (1..=hosts()).map(|i| format!("p{i}")).collect();
    let folders: Vec<PathBuf> = ids.iter().map(|id| root.served(id).join("notes")).collect();
    make_folder(&folders[0], files)?;
    for f in &folders[1..] {
        std::fs::create_dir_all(f)?;
    }
    let mut children = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let child = root
            .cmd(Some(net.ns(i + 1)), id, &["sync", "--folder", "notes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        children.push(child);
    }
    // `status` on every host: in sync with every other peer.
    let hosts: Vec<(String, String)> = (1..=hosts())
        .map(|i| (net.ns(i).to_owned(), ids[i - 1].clone()))
        .collect();
    let (qnode, root_dir) = (util::qnode(), root.path().to_owned());
    let settled = move || -> anyhow::Result<()> {
        let started = Instant::now();
        for (ns, id) in &hosts {
            loop {
                let out = Command::new("ip")
                    .args(["netns", "exec", ns, &qnode, "--root"])
                    .arg(&root_dir)
                    .args(["--peer", id, "status", "--json"])
                    .output()?;
                let json: serde_json::Value =
                    serde_json::from_slice(&out.stdout).unwrap_or_default();
                let peers = json["folders"][0]["peers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !peers.is_empty() && peers.iter().all(|p| p["in_sync"] == true) {
                    break;
                }
                if started.elapsed() > Duration::from_secs(300) {
                    bail!("{id} never said it was in sync");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        Ok(())
    };
    Ok(Tool {
        name: "qnode sync".into(),
        folders,
        children,
        settled: Some(Box::new(settled)),
    })
}

/// Syncthing on every host (its own home each), host 1 holding the folder; `delay` its watcher
/// delay in seconds.
fn start_syncthing(
    net: &netns::TestNet,
    dir: &Path,
    files: u64,
    delay: u32,
) -> anyhow::Result<Tool> {
    let mut ids = Vec::new();
    for i in 1..=hosts() {
        let home = dir.join(format!("h{i}"));
        let out = Command::new("syncthing")
            .args(["generate", "--no-default-folder", "--skip-port-probing"])
            .arg(format!("--home={}", home.display()))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let id = text
            .lines()
            .find_map(|l| l.split("Device ID: ").nth(1))
            .context("syncthing generate printed no device ID")?
            .trim()
            .to_owned();
        ids.push(id);
    }
    let folders: Vec<PathBuf> = (1..=hosts())
        .map(|i| dir.join(format!("data{i}")))
        .collect();
    make_folder(&folders[0], files)?;
    for f in &folders {
        std::fs::create_dir_all(f.join(".stfolder"))?;
    }
    let devices: String = (1..=hosts())
        .map(|i| {
            format!(
                "<device id=\"{}\" name=\"h{i}\" compression=\"metadata\"><address>tcp://{}:22000</address></device>\n",
                ids[i - 1],
                net.ip(i)
            )
        })
        .collect();
    let mut children = Vec::new();
    for i in 1..=hosts() {
        let members: String = ids
            .iter()
            .map(|d| format!("<device id=\"{d}\"></device>"))
            .collect();
        let config = format!(
            r#"<configuration version="36">
<folder id="notes" label="notes" path="{path}" type="sendreceive" rescanIntervalS="3600" fsWatcherEnabled="true" fsWatcherDelayS="{delay}">
{members}
</folder>
{devices}<gui enabled="false" tls="false"><address>127.0.0.1:8384</address></gui>
<options>
<listenAddress>tcp://0.0.0.0:22000</listenAddress>
<globalAnnounceEnabled>false</globalAnnounceEnabled>
<localAnnounceEnabled>false</localAnnounceEnabled>
<relaysEnabled>false</relaysEnabled>
<natEnabled>false</natEnabled>
<urAccepted>-1</urAccepted>
<startBrowser>false</startBrowser>
<crashReportingEnabled>false</crashReportingEnabled>
<autoUpgradeIntervalH>0</autoUpgradeIntervalH>
<setLowPriority>false</setLowPriority>
</options>
</configuration>
"#,
            path = folders[i - 1].display()
        );
        let home = dir.join(format!("h{i}"));
        std::fs::write(home.join("config.xml"), config)?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                net.ns(i),
                "syncthing",
                "serve",
                "--no-browser",
                "--no-restart",
                "--no-upgrade",
            ])
            .arg(format!("--home={}", home.display()))
            .env("STNOUPGRADE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        children.push(child);
    }
    let name = format!("Syncthing (watcher delay {delay} s)");
    Ok(Tool {
        name,
        folders,
        children,
        settled: None,
    })
}

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !netns::have("tc") || !netns::have("syncthing") {
        println!("sync benchmark skipped: needs root, ip, tc and syncthing");
        return Ok(());
    }
    let runs = env_u64("QNODE_BENCH_RUNS", 3).max(1) as usize;
    let files = env_u64("QNODE_BENCH_SYNC_FILES", 10_000);
    let rate = std::env::var("QNODE_BENCH_SYNC_RATE").unwrap_or_else(|_| "100mbit".into());
    let net = netns::TestNet::new(hosts())?;
    for i in 1..=hosts() {
        net.shape(i, &rate, "64kb")?;
        net.shape_in(i, &rate, "64kb")?;
    }
    println!(
        "qnode sync against Syncthing: {files} text files and one 1 MiB file, {} hosts on a {rate} bridge; edits: median of {runs} runs",
        hosts()
    );
    let mut rows = Vec::new();
    {
        let peers: Vec<(String, String)> = (1..=hosts())
            .map(|i| (format!("p{i}"), format!("{} 47700", net.ip(i))))
            .collect();
        let peers: Vec<(&str, String)> =
            peers.iter().map(|(a, b)| (a.as_str(), b.clone())).collect();
        let root = Root::new(&peers)?;
        let tool = start_qnode(&net, &root, files)?;
        rows.push((tool.name.clone(), measure(&net, &tool, files, runs)?));
    }
    for delay in [10, 1] {
        let dir = tempfile::tempdir()?;
        let tool = start_syncthing(&net, dir.path(), files, delay)?;
        rows.push((tool.name.clone(), measure(&net, &tool, files, runs)?));
    }
    println!();
    println!(
        "| tool | initial sync to {n} peers | its bytes | idle CPU per process | 1 line edited: 1st peer | all {n} peers | bytes |",
        n = hosts() - 1
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, f) in &mut rows {
        let cpu = f.idle_cpu.iter().copied().fold(0.0, f64::max);
        let (first, lo1, hi1) = median(&mut f.edit_first);
        let (all, lo4, hi4) = median(&mut f.edit_all);
        let (bytes, _, _) = median(&mut f.edit_bytes);
        println!(
            "| {name} | {:.1} s | {:.1} MB | ≤ {cpu:.2}% | {first:.2} s ({lo1:.2}–{hi1:.2}) | {all:.2} s ({lo4:.2}–{hi4:.2}) | {:.0} KB |",
            f.initial.0,
            f.initial.1 as f64 / 1e6,
            bytes / 1e3
        );
    }
    Ok(())
}
