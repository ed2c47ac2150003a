//! Swarming: one seeder and N downloaders (N = 2, 4, 8), each a host in its own network namespace
//! behind a link limited to the same rate both ways (`tc tbf`, default 100 Mbit/s), one 256 MiB
//! file; every downloader runs `serve` and starts its download at the same moment. Printed per N:
//! the time until the last downloader has the whole file, against the distribution bound
//! max(F/u_s, F/d_min, N·F/(u_s + Σu_i)) and against the same crowd whose downloaders do not serve
//! (qnode before swarming: the seeder sends N copies), the share of bytes that came from other
//! downloaders, and the peak RSS of the processes. Then the seeder at the full rate and the
//! downloaders at half of it up (full down), and a crowd of 4 with one downloader killed half-way.
//!
//! `cargo bench --bench swarm` (root, `ip`, `tc`; prints a note and exits otherwise). Knobs:
//! `QNODE_BENCH_SWARM_MIB` (file size, default 256), `QNODE_BENCH_SWARM_MBIT` (default 100),
//! `QNODE_BENCH_SWARM_N` (default `2,4,8`), `QNODE_BENCH_SWARM_EXTRA=0` (skip the last two),
//! `QNODE_BENCH_SWARM_PLAIN=0` (skip the crowds that do not serve), `QNODE_BENCH_RUNS` (swarm
//! runs per crowd, default 1: the median is shown, with the range),
//! `QNODE_BENCH_SWARM_ALONE=0` (skip the single download that opens the run: for A/B runs of one
//! crowd), `QNODE_BENCH_BIN` (the qnode binary), `QNODE_BENCH_SWARM_TRACE=1` (to stderr, every
//! second: the seeder's upload and each downloader's download as shares of the link rate; then
//! how long the downloaders' links stood idle at the start, until the seeder's last new chunk and
//! after it: where a crowd's time goes).

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

mod util;
use util::{Root, env_u64, random_file, stop, vm_hwm_kib, wait_usage};

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/util/netns.rs"]
mod netns;

/// One run's outcome.
#[derive(Debug, Default, Clone)]
struct Outcome {
    /// Seconds until the last downloader finished (from the moment they all started).
    last: f64,
    /// Bytes the downloaders got from each other, and in all.
    from_peers: u64,
    total: u64,
    /// Peak RSS in KiB: the largest download, the largest downloader's `serve`, the seeder.
    rss_download: u64,
    rss_serve: u64,
    rss_seeder: u64,
}

struct Crowd {
    net: netns::TestNet,
    root: Root,
    size: u64,
    /// Every host's download rate, Mbit/s.
    mbit: u64,
}

/// What each of the first `hosts` hosts has received and sent on its link so far, read once
/// for all of them at the switch's end of their links (what the switch sends host `i` is what
/// host `i` receives).
fn link_bytes(switch: &str, hosts: usize) -> Vec<(u64, u64)> {
    let out = std::process::Command::new("ip")
        .args(["-n", switch, "-s", "-j", "link", "show"])
        .output();
    let json: serde_json::Value = out
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or_default();
    let ports = json.as_array().map(Vec::as_slice).unwrap_or_default();
    (1..=hosts)
        .map(|i| {
            let name = format!("p{i}");
            let port = ports.iter().find(|p| p["ifname"] == name.as_str());
            let get = |dir: &str| {
                port.and_then(|p| p["stats64"][dir]["bytes"].as_u64())
                    .unwrap_or(0)
            };
            (get("tx"), get("rx"))
        })
        .collect()
}

/// The machine's CPU time so far, in ticks: (all, idle).
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let t: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = t.get(3).copied().unwrap_or(0) + t.get(4).copied().unwrap_or(0);
    (t.iter().take(8).sum(), idle)
}

/// How often the trace reads the links.
const TRACE_SAMPLE: Duration = Duration::from_millis(250);

/// Until `done`, prints every second the CPU left idle, the seeder's (host 1) upload and each
/// downloader's download, as shares of the link rate (`rate` bytes/s); then where the
/// downloaders' links stood idle while a `file` of that many bytes went round (see
/// [`idle_summary`]).
fn trace(
    switch: String,
    hosts: usize,
    rate: f64,
    file: u64,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let started = Instant::now();
    let mut samples = vec![(0.0, link_bytes(&switch, hosts))];
    let mut cpu = cpu_ticks();
    let mut printed = 0.0;
    eprintln!(
        "trace: idle CPU; the seeder's upload | each downloader's download, % of the link rate"
    );
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(TRACE_SAMPLE);
        let now = started.elapsed().as_secs_f64();
        samples.push((now, link_bytes(&switch, hosts)));
        if now - printed < 1.0 {
            continue;
        }
        let (all, idle) = cpu_ticks();
        let idle_share = (idle - cpu.1.min(idle)) as f64 / (all - cpu.0.min(all)).max(1) as f64;
        cpu = (all, idle);
        let Some(from) = samples.iter().rposition(|s| s.0 <= printed) else {
            continue;
        };
        let (t0, a) = &samples[from];
        let (t1, b) = &samples[samples.len() - 1];
        let share = |x: u64, y: u64| y.saturating_sub(x) as f64 / rate / (t1 - t0) * 100.0;
        let downs: Vec<String> = (1..hosts)
            .map(|i| format!("{:3.0}", share(a[i].0, b[i].0)))
            .collect();
        eprintln!(
            "{:5.1} s  idle {:3.0}%  {:3.0} | {}",
            now,
            idle_share * 100.0,
            share(a[0].1, b[0].1),
            downs.join(" ")
        );
        printed = now;
    }
    eprintln!("{}", idle_summary(&samples, rate, file));
}

/// Where the downloaders' links stood idle: each must take the whole file through its link, so
/// every second its link is idle adds to its time. Split at the moment the seeder, having sent
/// the `file`'s size, falls under half its rate (its last new chunks are out): before it (mostly
/// the start, while the first chunks reach their first relays) and after it (the last chunks
/// passed on). For the mean downloader (hosts 2..) and the last to finish, from link counters
/// sampled at `(seconds, per host (down, up) bytes)`.
fn idle_summary(samples: &[(f64, Vec<(u64, u64)>)], rate: f64, file: u64) -> String {
    let Some(((first, a), (_, z))) = samples.first().zip(samples.last()) else {
        return String::new();
    };
    let hosts = a.len();
    let moved = |i: usize, from: usize, to: usize, down: bool| {
        let (x, y) = (&samples[from].1[i], &samples[to].1[i]);
        let (x, y) = if down { (x.0, y.0) } else { (x.1, y.1) };
        y.saturating_sub(x) as f64
    };
    // The start of the first interval, once the seeder has sent the file's size, in which it
    // sent under half its rate (what it sends after that are copies for the last ones).
    let busy = (1..samples.len())
        .find(|&k| {
            let dt = samples[k].0 - samples[k - 1].0;
            moved(0, 0, k - 1, false) >= file as f64 && moved(0, k - 1, k, false) < 0.5 * rate * dt
        })
        .map_or(samples.len() - 1, |k| k - 1);
    let seeder_end = samples[busy].0 - first;
    // What a full link carries in practice: the seeder's, from its first bytes to that moment.
    let began = (1..samples.len())
        .find(|&k| moved(0, k - 1, k, false) > 64e3)
        .map_or(0, |k| k - 1);
    let full = moved(0, began, busy, false) / (samples[busy].0 - samples[began].0).max(1e-3);
    let two = samples.iter().position(|s| s.0 - first >= 2.0).unwrap_or(0);
    let each: Vec<Idle> = (1..hosts)
        .map(|i| {
            let last = (1..samples.len())
                .rev()
                .find(|&k| moved(i, k - 1, k, true) > 64e3)
                .unwrap_or(0);
            let end = samples[last].0 - first;
            Idle {
                bytes: z[i].0.saturating_sub(a[i].0) as f64 / full,
                before: (seeder_end - moved(i, 0, busy, true) / full).max(0.0),
                start: (samples[two].0 - first - moved(i, 0, two, true) / full).max(0.0),
                after: if last > busy {
                    (end - seeder_end - moved(i, busy, last, true) / full).max(0.0)
                } else {
                    0.0
                },
                end,
            }
        })
        .collect();
    let mean = |f: fn(&Idle) -> f64| each.iter().map(f).sum::<f64>() / each.len().max(1) as f64;
    let last = each
        .iter()
        .max_by(|x, y| x.end.total_cmp(&y.end))
        .copied()
        .unwrap_or_default();
    format!(
        "trace: the seeder's link carried {:.0}% of the link rate until its last new chunks were \
         out at {seeder_end:.1} s. At that rate a downloader's link (mean; the last to finish) \
         carried {:.1} s ({:.1} s) of bytes, and stood idle {:.1} s ({:.1} s) before that \
         moment, {:.1} s ({:.1} s) of it in the first 2 s, and {:.1} s ({:.1} s) after it",
        full / rate * 100.0,
        mean(|d| d.bytes),
        last.bytes,
        mean(|d| d.before),
        last.before,
        mean(|d| d.start),
        last.start,
        mean(|d| d.after),
        last.after,
    )
}

/// One downloader's link in [`idle_summary`], in seconds.
#[derive(Debug, Default, Clone, Copy)]
struct Idle {
    /// The bytes it carried, at the rate of a full link.
    bytes: f64,
    /// Idle until the seeder's last new chunks were out ...
    before: f64,
    /// ... of which in the first 2 s.
    start: f64,
    /// Idle after that, until its last bytes.
    after: f64,
    /// When its last bytes came.
    end: f64,
}

impl Crowd {
    fn id(i: usize) -> String {
        format!("p{i}")
    }

    /// Shapes host `i`: `up` and `down` in Mbit/s.
    fn shape(&self, i: usize, up: u64, down: u64) -> anyhow::Result<()> {
        self.net.shape(i, &format!("{up}mbit"), "256kb")?;
        self.net.shape_in(i, &format!("{down}mbit"), "256kb")
    }

    /// Removes downloader `i`'s copy and whatever a download left beside it.
    fn clean(&self, i: usize) -> anyhow::Result<()> {
        let dir = self.root.served(&Self::id(i));
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// `n` downloaders (hosts 2..=n+1) fetch the file at once, serving while they download if
    /// `serving`; if `kill` is given, the last of them is killed (download and server) after that
    /// long and does not count.
    fn run(&self, n: usize, serving: bool, kill: Option<Duration>) -> anyhow::Result<Outcome> {
        let hosts: Vec<usize> = (2..n + 2).collect();
        for &i in &hosts {
            self.clean(i)?;
        }
        // The last run's writes on disk first, so that their writeback does not slow this one.
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        let asker = (Self::id(2), Some(self.net.ns(2).to_owned()));
        let mut seeder = vec![self.root.serve(
            Some(self.net.ns(1)),
            "p1",
            &[],
            (&asker.0, asker.1.as_deref()),
        )?];
        let mut servers = Vec::new();
        if serving {
            for &i in &hosts {
                let asker = if i == 2 { 3 } else { 2 };
                let (id, ask) = (Self::id(asker), self.net.ns(asker).to_owned());
                servers.push(self.root.serve(
                    Some(self.net.ns(i)),
                    &Self::id(i),
                    &[],
                    (&id, Some(&ask)),
                )?);
            }
        }
        // The seeder has hashed the file, as a long-running one has.
        let warm = self
            .root
            .cmd(Some(self.net.ns(2)), "p2", &["list", "p1"])
            .stdout(Stdio::null())
            .status()?;
        if !warm.success() {
            bail!("p2 cannot list p1");
        }
        let traced = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tracer = (env_u64("QNODE_BENCH_SWARM_TRACE", 0) == 1).then(|| {
            let switch = self.net.switch().unwrap_or_default().to_owned();
            let rate = self.mbit as f64 * 1e6 / 8.0;
            let done = traced.clone();
            let file = self.size;
            std::thread::spawn(move || trace(switch, n + 1, rate, file, done))
        });
        let started = Instant::now();
        let downloads: Vec<(usize, Child)> = hosts
            .iter()
            .map(|&i| {
                let child = self
                    .root
                    .cmd(
                        Some(self.net.ns(i)),
                        &Self::id(i),
                        &["download", "big.bin", "--json"],
                    )
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()?;
                Ok((i, child))
            })
            .collect::<anyhow::Result<_>>()?;
        let killed = kill.map(|_| *hosts.last().unwrap_or(&2)).zip(kill);
        let waiters: Vec<_> = downloads
            .into_iter()
            .map(|(i, mut child)| {
                let mut stdout = child.stdout.take();
                std::thread::spawn(move || {
                    let usage = wait_usage(child, started);
                    let mut json = String::new();
                    if let Some(out) = stdout.as_mut() {
                        let _ = out.read_to_string(&mut json);
                    }
                    (i, usage, json)
                })
            })
            .collect();
        if let Some((victim, after)) = killed {
            std::thread::sleep(after);
            let ns = self.net.ns(victim).to_owned();
            let _ = std::process::Command::new("ip")
                .args(["netns", "pids", &ns])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        if let Ok(pid) = pid.parse::<i32>() {
                            // SAFETY: kill(2) has no memory-safety preconditions.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                });
        }
        let mut out = Outcome::default();
        for w in waiters {
            let (i, usage, json) = w.join().map_err(|_| anyhow::anyhow!("a waiter failed"))?;
            if killed.is_some_and(|(v, _)| v == i) {
                continue;
            }
            if !usage.ok {
                bail!("the download of p{i} failed");
            }
            let json: serde_json::Value =
                serde_json::from_str(json.trim()).with_context(|| format!("p{i}'s report"))?;
            for (peer, bytes) in json["peers"].as_object().into_iter().flatten() {
                let bytes = bytes.as_u64().unwrap_or(0);
                out.total += bytes;
                if peer != "p1" {
                    out.from_peers += bytes;
                }
            }
            if std::env::var_os("QNODE_BENCH_LOG").is_some() {
                eprintln!(
                    "p{i}: {:.1} s, {}, faults {}",
                    usage.wall, json["peers"], json["faults"]
                );
            }
            out.last = out.last.max(usage.wall);
            out.rss_download = out.rss_download.max(usage.max_rss_kib);
        }
        traced.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = tracer {
            let _ = t.join();
        }
        out.rss_serve = stop(&mut servers).into_iter().max().unwrap_or(0);
        out.rss_seeder = seeder.first().map_or(0, |c| vm_hwm_kib(c.id()));
        stop(&mut seeder);
        Ok(out)
    }
}

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !["ip", "tc"].iter().all(|t| netns::have(t)) {
        eprintln!("note: the swarm benchmark needs root, ip and tc");
        return Ok(());
    }
    let mib = env_u64("QNODE_BENCH_SWARM_MIB", 256);
    let mbit = env_u64("QNODE_BENCH_SWARM_MBIT", 100);
    let ns: Vec<usize> = std::env::var("QNODE_BENCH_SWARM_N")
        .unwrap_or_else(|_| "2,4,8".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let extra = env_u64("QNODE_BENCH_SWARM_EXTRA", 1) == 1;
    let plain = env_u64("QNODE_BENCH_SWARM_PLAIN", 1) == 1;
    let runs = env_u64("QNODE_BENCH_RUNS", 1).max(1);
    let most = ns
        .iter()
        .copied()
        .max()
        .unwrap_or(2)
        .max(if extra { 4 } else { 0 });
    let size = mib << 20;
    let net = netns::TestNet::new(most + 1)?;
    let peers: Vec<(String, String)> = (1..=most + 1)
        .map(|i| (Crowd::id(i), format!("{} 47000", net.ip(i))))
        .collect();
    let refs: Vec<(&str, String)> = peers.iter().map(|(p, a)| (p.as_str(), a.clone())).collect();
    let root = Root::new(&refs)?;
    random_file(&root.served("p1").join("big.bin"), size)?;
    let crowd = Crowd {
        net,
        root,
        size,
        mbit,
    };
    for i in 1..=most + 1 {
        crowd.shape(i, mbit, mbit)?;
    }
    let file_time = |rate_mbit: u64| crowd.size as f64 / (rate_mbit as f64 * 1e6 / 8.0);
    println!(
        "qnode swarm benchmark: {mib} MiB, {mbit} Mbit/s each way per host; F/u = {:.1} s",
        file_time(mbit)
    );
    let alone = if env_u64("QNODE_BENCH_SWARM_ALONE", 1) == 1 {
        let alone = crowd.run(1, false, None)?;
        println!(
            "one download alone: {:.1} s ({:.2}× F/u)\n",
            alone.last,
            alone.last / file_time(mbit)
        );
        alone.last
    } else {
        file_time(mbit)
    };
    println!(
        "| crowd | last finisher | bound | vs bound | downloaders not serving | vs bound | from other downloaders | peak RSS MiB (download / serve / seeder) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // The median run of `runs` (by the last finisher), and the range of the last finisher.
    let repeat = |n: usize, kill: Option<Duration>| -> anyhow::Result<(Outcome, String)> {
        let mut all: Vec<Outcome> = (0..runs)
            .map(|_| crowd.run(n, true, kill))
            .collect::<anyhow::Result<_>>()?;
        all.sort_by(|a, b| a.last.total_cmp(&b.last));
        let range = match all.len() {
            1 => String::new(),
            k => format!(" ({:.1}–{:.1})", all[0].last, all[k - 1].last),
        };
        Ok((all[all.len() / 2].clone(), range))
    };
    let row = |what: &str,
               (swarm, range): &(Outcome, String),
               bound: f64,
               plain: Option<&Outcome>| {
        let (p, pr) = match plain {
            Some(o) => (format!("{:.1} s", o.last), format!("{:.2}", o.last / bound)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {what} | {:.1} s{range} | {bound:.1} s | {:.2} | {p} | {pr} | {:.0}% | {:.1} / {:.1} / {:.1} |",
            swarm.last,
            swarm.last / bound,
            swarm.from_peers as f64 * 100.0 / swarm.total.max(1) as f64,
            swarm.rss_download as f64 / 1024.0,
            swarm.rss_serve as f64 / 1024.0,
            swarm.rss_seeder as f64 / 1024.0,
        );
    };
    for &n in &ns {
        let swarm = repeat(n, None)?;
        let plain = if plain {
            Some(crowd.run(n, false, None)?)
        } else {
            None
        };
        // Equal links: max(F/u, F/u, N·F/(u + N·u)) = F/u.
        row(&format!("N = {n}"), &swarm, file_time(mbit), plain.as_ref());
    }
    if extra {
        let n = 4;
        for i in 2..=n + 1 {
            crowd.shape(i, mbit / 2, mbit)?;
        }
        let swarm = repeat(n, None)?;
        let (us, ui) = (mbit as f64, mbit as f64 / 2.0);
        let bound = file_time(mbit).max(n as f64 * file_time(1) / (us + n as f64 * ui));
        row(
            &format!("N = {n}, downloaders {} Mbit/s up", mbit / 2),
            &swarm,
            bound,
            None,
        );
        for i in 2..=n + 1 {
            crowd.shape(i, mbit, mbit)?;
        }
        let half = Duration::from_secs_f64(alone / 2.0);
        let swarm = repeat(n, Some(half))?;
        row(
            &format!(
                "N = {n}, one killed at {:.0} s (3 counted)",
                half.as_secs_f64()
            ),
            &swarm,
            file_time(mbit),
            None,
        );
    }
    Ok(())
}
