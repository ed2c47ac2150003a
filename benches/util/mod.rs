//! What the benchmarks share: the binary under test, a temporary root of peers, children's
//! resource use, test files.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;

/// The qnode binary under test: this build's, or `QNODE_BENCH_BIN` (to compare two builds).
pub fn qnode() -> String {
    std::env::var("QNODE_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_qnode").into())
}

pub fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How often `wait_usage` reads a child's peak RSS. Every 2 ms, the reads of 8 downloaders took
/// 8% of this 2-core machine (perf, the swarm benchmark at N = 8) from the processes measured.
const HWM_SAMPLE: Duration = Duration::from_millis(25);

/// Resources a finished child used.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub wall: f64,
    pub cpu: f64,
    pub max_rss_kib: u64,
    pub ok: bool,
}

/// Waits for `child` with wait4 to get its CPU time, sampling its peak RSS from /proc meanwhile.
///
/// `ru_maxrss` is not used for RSS: Linux carries the parent's high-water mark into a forked child
/// and across exec, so it would report this benchmark's own size. `VmHWM` belongs to the child's
/// own address space and only grows, so the last sample before exit is its peak (short of what a
/// process gains in its last [`HWM_SAMPLE`]).
pub fn wait_usage(child: Child, started: Instant) -> Usage {
    let pid = child.id();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(vm_hwm_kib(pid));
                std::thread::sleep(HWM_SAMPLE);
            }
            peak
        })
    };
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child, which std has not reaped.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut ru) };
    std::mem::forget(child);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Usage {
        wall: started.elapsed().as_secs_f64(),
        cpu: secs(ru.ru_utime) + secs(ru.ru_stime),
        max_rss_kib: peak,
        ok: rc == pid as libc::pid_t && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
    }
}

/// Peak RSS of a running process, from /proc.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// A root with peers at the given addresses, all initialised.
pub struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    pub fn new(peers: &[(&str, String)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let settings: String = peers
            .iter()
            .map(|(id, addr)| format!("{id} {addr}\n"))
            .collect();
        std::fs::write(dir.path().join("peer_settings.txt"), settings)?;
        let root = Self { dir };
        for (id, _) in peers {
            let out = root.cmd(None, id, &["init"]).output()?;
            if !out.status.success() {
                bail!("init {id}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(root)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn served(&self, id: &str) -> PathBuf {
        self.path().join(id).join("served_files")
    }

    /// `qnode --root R --peer ID args`, inside network namespace `ns` if given.
    pub fn cmd(&self, ns: Option<&str>, id: &str, args: &[&str]) -> Command {
        let mut c = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, &qnode()]);
                c
            }
            None => Command::new(qnode()),
        };
        c.arg("--root")
            .arg(self.path())
            .args(["--peer", id])
            .args(args);
        c.env_remove("RUST_LOG").stdin(Stdio::null());
        c
    }

    /// Starts `serve` and waits until another peer can list it.
    pub fn serve(
        &self,
        ns: Option<&str>,
        id: &str,
        extra: &[&str],
        asker: (&str, Option<&str>),
    ) -> anyhow::Result<Child> {
        let mut args = vec!["serve"];
        args.extend_from_slice(extra);
        // QNODE_BENCH_LOG=DIR keeps each server's log as DIR/<id>.log, for a closer look.
        let log = match std::env::var_os("QNODE_BENCH_LOG") {
            Some(dir) => Stdio::from(std::fs::File::create(
                Path::new(&dir).join(format!("{id}.log")),
            )?),
            None => Stdio::null(),
        };
        let child = self
            .cmd(ns, id, &args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self
                .cmd(asker.1, asker.0, &["list", id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if ok.success() {
                return Ok(child);
            }
            if Instant::now() > deadline {
                bail!("{id} did not come up");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Downloads `name` as `id` into a fresh output path; returns usage (and checks success).
    pub fn download(
        &self,
        ns: Option<&str>,
        id: &str,
        name: &str,
        peers: &[&str],
    ) -> anyhow::Result<Usage> {
        let out = self.path().join(format!("{id}-out.bin"));
        let _ = std::fs::remove_file(&out);
        let mut args = vec!["download", name];
        args.extend_from_slice(peers);
        args.extend_from_slice(&["--output", out.to_str().unwrap_or_default()]);
        // Extra download flags for experiments, e.g. QNODE_BENCH_DL_ARGS="--window 32".
        let extra = std::env::var("QNODE_BENCH_DL_ARGS").unwrap_or_default();
        args.extend(extra.split_whitespace());
        let started = Instant::now();
        let errors = self.path().join(format!("{id}-download.err"));
        let child = self
            .cmd(ns, id, &args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&errors)?)
            .spawn()?;
        let usage = wait_usage(child, started);
        let _ = std::fs::remove_file(&out);
        if !usage.ok {
            let said = std::fs::read_to_string(&errors).unwrap_or_default();
            bail!("download of {name} by {id} failed: {}", said.trim());
        }
        Ok(usage)
    }
}

pub fn stop(children: &mut Vec<Child>) -> Vec<u64> {
    let rss = children.iter().map(|c| vm_hwm_kib(c.id())).collect();
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    children.clear();
    rss
}

pub fn random_file(path: &Path, size: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    // On disk before anything is timed: otherwise the kernel writes the fresh file back while
    // the transfer runs, competing with the downloader's own writes (8 sources at 200 Mbit/s
    // measured 159 MB/s that way, against 188 MB/s from a settled file).
    f.into_inner()?.sync_all()?;
    Ok(())
}

/// Bytes host `ns` has sent and received on its link.
pub fn link_bytes(ns: &str) -> anyhow::Result<u64> {
    let mut total = 0;
    for dir in ["rx_bytes", "tx_bytes"] {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "cat"])
            .arg(format!("/sys/class/net/eth0/statistics/{dir}"))
            .output()?;
        total += String::from_utf8_lossy(&out.stdout).trim().parse::<u64>()?;
    }
    Ok(total)
}

/// Runs `cmd`, returning (bytes on `ns`'s link, seconds); fails if it fails.
pub fn measure(ns: &str, cmd: &mut Command) -> anyhow::Result<(u64, f64)> {
    let before = link_bytes(ns)?;
    let started = Instant::now();
    let out = cmd.stdin(Stdio::null()).output()?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((link_bytes(ns)? - before, secs))
}

/// A median, minimum and maximum.
pub type Spread = (f64, f64, f64);

pub fn median(v: &mut [f64]) -> Spread {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// CPU time (user + system, clock ticks) of process `pid` and its children so far (Syncthing
/// runs its work in a child of a monitor process).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let at = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let below: u64 = (children.split_whitespace())
        .filter_map(|c| c.parse::<u32>().ok())
        .map(cpu_ticks)
        .sum();
    at(11) + at(12) + below
}
