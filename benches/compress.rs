//! Compression: text crosses slow links compressed, and nothing is slowed where it does not pay.
//!
//! `cargo bench --bench compress` (root, `ip`, `tc`, `rsync` ≥ 3.2 for `--compress-choice`).
//! Release binaries as separate processes; per row the median (min–max) of the runs:
//!
//! - `ns-1src`: one seeder in its own network namespace behind a 200 Mbit/s uplink (`tc tbf`), the
//!   downloader in another: qnode on 1 GiB of text (the vim manuals repeated, see
//!   [`text_corpus`]; `QNODE_BENCH_COMP_TEXT=prose` for generated prose) and on 1 GiB of random
//!   bytes, against `rsync -z --compress-choice=zstd` and plain rsync (daemon in the seeder's
//!   namespace) on the same text. File size ÷ wall time, in MB/s.
//! - `ns-3src`: three such seeders at once, text and random.
//! - `loopback`: both ends on 127.0.0.1, text and random, with the seeder's `--compression auto`
//!   (the default) against `--compression never` (qnode before compression) in the same run.
//!
//! Every row also shows the downloader's and the seeder's CPU seconds per GiB (the seeder's
//! summed over seeders) and their peak RSS.
//!
//! Knobs: `QNODE_BENCH_COMP_MIB` (default 1024), `QNODE_BENCH_COMP_MBIT` (default 200),
//! `QNODE_BENCH_RUNS` (default 1), `QNODE_BENCH_ONLY` (`ns1`, `ns3`, `loopback`, comma-separated),
//! `QNODE_BENCH_BIN`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

mod util;
use util::{Root, env_u64, random_file, stop, vm_hwm_kib, wait_usage};

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/util/netns.rs"]
mod netns;

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/util/text.rs"]
mod text;

/// CPU seconds a running process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    (ticks(11) + ticks(12)) / hz
}

/// One measured transfer.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    mb_s: f64,
    cpu_down: f64,
    cpu_seed: f64,
    rss_down_mib: f64,
    rss_seed_mib: f64,
    /// Bytes the download's replies took on the wire, as it reports them.
    wire: u64,
}

fn median_of(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

struct Rows {
    size: u64,
    lines: Vec<String>,
}

impl Rows {
    fn add(&mut self, what: &str, runs: &[Run], reference: Option<(&str, f64)>) {
        let (m, lo, hi) = median_of(runs.iter().map(|r| r.mb_s).collect());
        let gib = self.size as f64 / (1u64 << 30) as f64;
        let med = |f: fn(&Run) -> f64| median_of(runs.iter().map(f).collect()).0;
        let (reference, ratio) = match reference {
            Some((name, v)) => (format!("{v:.1} {name}"), format!("{:.2}", m / v)),
            None => ("-".into(), "-".into()),
        };
        let wire = med(|r| r.wire as f64) / self.size as f64;
        self.lines.push(format!(
            "| {what} | {m:.1} ({lo:.1}–{hi:.1}) | {reference} | {ratio} | {:.0}% | {:.1} / {:.1} | {:.1} / {:.1} |",
            wire * 100.0,
            med(|r| r.cpu_down) / gib,
            med(|r| r.cpu_seed) / gib,
            med(|r| r.rss_down_mib),
            med(|r| r.rss_seed_mib),
        ));
    }

    fn print(&self) {
        println!(
            "| scenario | MB/s | reference MB/s | ratio | wire/file | CPU·s/GiB down / seeders | peak RSS MiB down / seeder |"
        );
        println!("|---|---|---|---|---|---|---|");
        for l in &self.lines {
            println!("{l}");
        }
    }
}

/// A root whose seeders `p1..` serve `names`, with the downloader `d`.
struct Setup {
    root: Root,
    /// Network namespace of each peer (none on loopback), by index: seeders, then `d`.
    ns: Vec<Option<String>>,
    seeders: usize,
}

impl Setup {
    fn id(&self, i: usize) -> String {
        if i < self.seeders {
            format!("p{}", i + 1)
        } else {
            "d".into()
        }
    }

    /// Starts every seeder with `extra` args (warmed: each has hashed `names`).
    fn serve(&self, extra: &[&str], names: &[&str]) -> anyhow::Result<Vec<Child>> {
        let d = self.seeders;
        let mut children = Vec::new();
        for i in 0..self.seeders {
            children.push(self.root.serve(
                self.ns[i].as_deref(),
                &self.id(i),
                extra,
                (&self.id(d), self.ns[d].as_deref()),
            )?);
            for name in names {
                // Describing a file makes the seeder hash it before anything is timed.
                let out = self
                    .root
                    .cmd(self.ns[d].as_deref(), "d", &["list", &self.id(i)])
                    .output()?;
                if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains(name) {
                    bail!("{} does not list {name}", self.id(i));
                }
            }
        }
        Ok(children)
    }

    /// Downloads `name` from every seeder; returns the run's figures.
    fn download(&self, name: &str, size: u64, seeders: &[Child]) -> anyhow::Result<Run> {
        let d = self.seeders;
        let out = self.root.path().join("out.bin");
        let _ = std::fs::remove_file(&out);
        // SAFETY: sync(2) has no preconditions: the last run's writes are not this one's.
        unsafe { libc::sync() };
        let before: f64 = seeders.iter().map(|c| cpu_secs(c.id())).sum();
        let started = Instant::now();
        let mut child = self
            .root
            .cmd(
                self.ns[d].as_deref(),
                "d",
                &[
                    "download",
                    name,
                    "--json",
                    "--output",
                    &out.display().to_string(),
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take();
        let usage = wait_usage(child, started);
        let mut json = String::new();
        if let Some(mut s) = stdout {
            use std::io::Read;
            s.read_to_string(&mut json)?;
        }
        if !usage.ok {
            bail!("the download of {name} failed: {json}");
        }
        let json: serde_json::Value = serde_json::from_str(json.trim())?;
        let _ = std::fs::remove_file(&out);
        Ok(Run {
            mb_s: size as f64 / 1e6 / usage.wall,
            cpu_down: usage.cpu,
            cpu_seed: seeders.iter().map(|c| cpu_secs(c.id())).sum::<f64>() - before,
            rss_down_mib: usage.max_rss_kib as f64 / 1024.0,
            rss_seed_mib: seeders
                .iter()
                .map(|c| vm_hwm_kib(c.id()))
                .max()
                .unwrap_or(0) as f64
                / 1024.0,
            wire: json["wire_bytes"].as_u64().unwrap_or(0),
        })
    }
}

/// Puts `files` (name, path) into each seeder's served_files, by hard link.
fn place(root: &Root, seeders: usize, files: &[(&str, &Path)]) -> anyhow::Result<()> {
    for i in 0..seeders {
        for (name, path) in files {
            let to = root.served(&format!("p{}", i + 1)).join(name);
            let _ = std::fs::remove_file(&to);
            std::fs::hard_link(path, &to).with_context(|| format!("linking {}", to.display()))?;
        }
    }
    Ok(())
}

/// `rsync` from a daemon in `ns_from` serving `dir`, into `ns_to`; MB/s.
fn rsync_runs(
    net: &netns::TestNet,
    dir: &Path,
    (name, size): (&str, u64),
    z: bool,
    runs: u64,
) -> anyhow::Result<Vec<Run>> {
    let conf = dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "port = 8731\nuse chroot = no\nuid = root\ngid = root\npid file = {d}/rsyncd.pid\n[m]\npath = {d}\nread only = yes\n",
            d = dir.display()
        ),
    )?;
    let mut daemon = vec![
        Command::new("ip")
            .args([
                "netns",
                "exec",
                net.ns(1),
                "rsync",
                "--daemon",
                "--no-detach",
            ])
            .arg(format!("--config={}", conf.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ];
    std::thread::sleep(Duration::from_millis(500));
    let out = dir.join("rsync-out.bin");
    let mut all = Vec::new();
    for _ in 0..runs {
        let _ = std::fs::remove_file(&out);
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", net.ns(2), "rsync"]);
        if z {
            c.args(["-z", "--compress-choice=zstd"]);
        }
        c.arg(format!("rsync://{}:8731/m/{name}", net.ip(1)))
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let usage = wait_usage(c.spawn()?, started);
        if !usage.ok {
            bail!("rsync failed");
        }
        all.push(Run {
            mb_s: size as f64 / 1e6 / usage.wall,
            cpu_down: usage.cpu,
            rss_down_mib: usage.max_rss_kib as f64 / 1024.0,
            wire: size,
            ..Run::default()
        });
    }
    let _ = std::fs::remove_file(&out);
    stop(&mut daemon);
    Ok(all)
}

/// Where the text comes from: English prose that a package ships, the manuals of vim (Debian's
/// `vim-runtime`), repeated to `size` (its 9.5 MB repeat far beyond any compressor's window
/// here); or, if they are missing or `QNODE_BENCH_COMP_TEXT=prose`, generated prose
/// (`tests/util/text.rs::prose`: its 20,000-word vocabulary spread evenly over the whole file is
/// harder on compressors that start afresh every chunk than real text is). Returns its name.
fn text_corpus(path: &Path, size: u64) -> anyhow::Result<String> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir("/usr/share/vim")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("doc"))
        .filter(|d| d.is_dir())
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    docs.sort();
    let mut english = Vec::new();
    for d in &docs {
        english.extend(std::fs::read(d)?);
    }
    let generated = std::env::var("QNODE_BENCH_COMP_TEXT").is_ok_and(|v| v == "prose");
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut left = size;
    let mut seed = 1;
    while left > 0 {
        let piece = if generated || english.len() < 1 << 20 {
            // 64 MiB of fresh prose at a time.
            text::prose(left.min(64 << 20) as usize, seed)
        } else {
            english[..english.len().min(left as usize)].to_vec()
        };
        std::io::Write::write_all(&mut f, &piece)?;
        left -= piece.len() as u64;
        seed += 1;
    }
    f.into_inner()?.sync_all()?;
    Ok(if generated || english.len() < 1 << 20 {
        "generated prose (tests/util/text.rs)".into()
    } else {
        format!(
            "the vim manuals ({} files, {:.1} MB, repeated)",
            docs.len(),
            english.len() as f64 / 1e6
        )
    })
}

fn main() -> anyhow::Result<()> {
    let mib = env_u64("QNODE_BENCH_COMP_MIB", 1024);
    let mbit = env_u64("QNODE_BENCH_COMP_MBIT", 200);
    let runs = env_u64("QNODE_BENCH_RUNS", 1).max(1);
    let only = std::env::var("QNODE_BENCH_ONLY").unwrap_or_else(|_| "ns1,ns3,loopback".into());
    let size = mib << 20;
    let work = tempfile::tempdir()?;
    let text_path: PathBuf = work.path().join("text.txt");
    let random_path: PathBuf = work.path().join("random.bin");
    let corpus = text_corpus(&text_path, size)?;
    random_file(&random_path, size)?;
    let sample = std::fs::read(&text_path).map(|t| t[..t.len().min(16 << 20)].to_vec())?;
    let ratio = |level| -> anyhow::Result<f64> {
        Ok(sample.len() as f64 / zstd::bulk::compress(&sample, level)?.len() as f64)
    };
    println!(
        "qnode compression benchmark: {mib} MiB of {corpus} (zstd -1 shrinks it {:.2}×, -3 {:.2}×, as one stream) and of random bytes, {mbit} Mbit/s links, median (min–max) of {runs}",
        ratio(1)?,
        ratio(3)?
    );
    let files = [
        ("text.txt", text_path.as_path()),
        ("random.bin", random_path.as_path()),
    ];
    let mut rows = Rows {
        size,
        lines: Vec::new(),
    };
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    let ns_ok = root_user && ["ip", "tc"].iter().all(|t| netns::have(t));
    for (key, sources) in [("ns1", 1usize), ("ns3", 3)] {
        if !only.contains(key) {
            continue;
        }
        if !ns_ok {
            eprintln!("note: {key} needs root, ip and tc; skipped");
            continue;
        }
        let net = netns::TestNet::new(sources + 1)?;
        for i in 1..=sources {
            net.shape(i, &format!("{mbit}mbit"), "256kb")?;
        }
        let mut peers: Vec<(String, String)> = (1..=sources)
            .map(|i| (format!("p{i}"), format!("{} 47000", net.ip(i))))
            .collect();
        peers.push(("d".into(), format!("{} 47000", net.ip(sources + 1))));
        let refs: Vec<(&str, String)> =
            peers.iter().map(|(p, a)| (p.as_str(), a.clone())).collect();
        let setup = Setup {
            root: Root::new(&refs)?,
            ns: (1..=sources + 1)
                .map(|i| Some(net.ns(i).to_owned()))
                .collect(),
            seeders: sources,
        };
        place(&setup.root, sources, &files)?;
        let mode = std::env::var("QNODE_BENCH_COMP_MODE").unwrap_or_else(|_| "auto".into());
        let mut seeders = setup.serve(&["--compression", &mode], &["text.txt", "random.bin"])?;
        let measure = |name: &str| -> anyhow::Result<Vec<Run>> {
            (0..runs)
                .map(|_| setup.download(name, size, &seeders))
                .collect()
        };
        let text_runs = measure("text.txt")?;
        let random_runs = measure("random.bin")?;
        stop(&mut seeders);
        let random = median_of(random_runs.iter().map(|r| r.mb_s).collect()).0;
        let label = format!("{key} {mbit}mbit");
        if sources == 1 && netns::have("rsync") {
            let rsync_dir = work.path().join("rsync");
            std::fs::create_dir_all(&rsync_dir)?;
            let _ = std::fs::remove_file(rsync_dir.join("text.txt"));
            std::fs::hard_link(&text_path, rsync_dir.join("text.txt"))?;
            // The downloader's namespace is host 2 here.
            let z = rsync_runs(&net, &rsync_dir, ("text.txt", size), true, runs)?;
            let plain = rsync_runs(&net, &rsync_dir, ("text.txt", size), false, runs)?;
            let zs = median_of(z.iter().map(|r| r.mb_s).collect()).0;
            rows.add(
                &format!("{label} text"),
                &text_runs,
                Some(("rsync -z zstd", zs)),
            );
            rows.add(
                &format!("{label} text"),
                &text_runs,
                Some(("qnode random", random)),
            );
            rows.add(&format!("{label} rsync -z zstd text"), &z, None);
            rows.add(&format!("{label} rsync text"), &plain, None);
        } else {
            rows.add(
                &format!("{label} text"),
                &text_runs,
                Some(("qnode random", random)),
            );
        }
        rows.add(&format!("{label} random"), &random_runs, None);
    }
    if only.contains("loopback") {
        let setup = Setup {
            root: Root::new(&[
                ("p1", "127.0.0.1 47601".into()),
                ("d", "127.0.0.1 47602".into()),
            ])?,
            ns: vec![None, None],
            seeders: 1,
        };
        place(&setup.root, 1, &files)?;
        for name in ["text.txt", "random.bin"] {
            let mut by_mode = Vec::new();
            for mode in ["never", "auto"] {
                let mut seeders = setup.serve(&["--compression", mode], &[name])?;
                let r: Vec<Run> = (0..runs)
                    .map(|_| setup.download(name, size, &seeders))
                    .collect::<anyhow::Result<_>>()?;
                stop(&mut seeders);
                by_mode.push(r);
            }
            let never = median_of(by_mode[0].iter().map(|r| r.mb_s).collect()).0;
            rows.add(
                &format!("loopback {name} (auto)"),
                &by_mode[1],
                Some(("--compression never", never)),
            );
            rows.add(&format!("loopback {name} (never)"), &by_mode[0], None);
        }
    }
    println!();
    rows.print();
    Ok(())
}
