//! Test harness: a temporary qnode root with N peers on 127.0.0.1, servers as real child processes.
//!
//! Servers are killed on drop; readiness is the `serving` log line, waited for with a deadline.
//! Every command runs with `RUST_LOG` and the `QNODE_*` variables cleared.

#![allow(dead_code, unreachable_pub)]

pub mod text;

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod netns;
pub mod peer;

pub type TestResult = anyhow::Result<()>;

/// The binary under test: this build's, or `QNODE_TEST_BIN` (to show that a test fails on an older
/// build).
pub fn qnode_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("QNODE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_qnode").into())
    })
}

/// A temporary root with peers listed in its `peer_settings.txt`, all initialised.
pub struct Net {
    pub dir: tempfile::TempDir,
    pub peers: Vec<(String, u16)>,
    /// The network namespace each peer runs in, for peers on a [`netns::TestNet`].
    hosts: std::collections::HashMap<String, String>,
}

impl Net {
    /// A root with peers `ids`, each on a free UDP port of 127.0.0.1, each initialised.
    pub fn new(ids: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut peers = Vec::new();
        let mut settings = String::from("# test network\n");
        // Hold every socket until all ports are chosen, so no two peers get the same one.
        let sockets: Vec<UdpSocket> = ids
            .iter()
            .map(|_| UdpSocket::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        for (id, sock) in ids.iter().zip(&sockets) {
            let port = sock.local_addr()?.port();
            settings.push_str(&format!("{id} 127.0.0.1 {port}\n"));
            peers.push((id.to_string(), port));
        }
        drop(sockets);
        std::fs::write(dir.path().join("peer_settings.txt"), settings)?;
        let net = Self {
            dir,
            peers,
            hosts: Default::default(),
        };
        for id in ids {
            net.ok(id, &["init"])?;
        }
        Ok(net)
    }

    /// A root whose peers `ids` are hosts 1..=n of `tn`, each running in its namespace.
    pub fn on_hosts(ids: &[&str], tn: &netns::TestNet) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut settings = String::new();
        let mut hosts = std::collections::HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            settings.push_str(&format!("{id} {} 47000\n", tn.ip(i + 1)));
            hosts.insert(id.to_string(), tn.ns(i + 1).to_string());
        }
        std::fs::write(dir.path().join("peer_settings.txt"), settings)?;
        let peers = ids.iter().map(|id| (id.to_string(), 47000)).collect();
        let net = Self { dir, peers, hosts };
        for id in ids {
            net.ok(id, &["init"])?;
        }
        Ok(net)
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn served(&self, id: &str) -> PathBuf {
        self.root().join(id).join("served_files")
    }

    /// Writes a file into `id`'s served_files.
    pub fn put(&self, id: &str, name: &str, data: &[u8]) -> anyhow::Result<PathBuf> {
        let path = self.served(id).join(name);
        std::fs::write(&path, data)?;
        Ok(path)
    }

    /// A root of its own for `id`, as on another machine: a copy of the table, `certs/` and
    /// `id`'s folder (identity and served files), at the same addresses.
    pub fn apart(&self, id: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        for part in ["peer_settings.txt", "certs", id] {
            copy_tree(&self.root().join(part), &dir.path().join(part))?;
        }
        Ok(Self {
            dir,
            peers: self.peers.clone(),
            hosts: Default::default(),
        })
    }

    /// The same root, with `id`'s commands run in network namespace `ns`.
    pub fn on_host(mut self, id: &str, ns: &str) -> Self {
        self.hosts.insert(id.to_owned(), ns.to_owned());
        self
    }

    /// Rewrites the table: the peers `ids` at their addresses, then `extra` lines.
    pub fn list_only(&self, ids: &[&str], extra: &str) -> TestResult {
        let mut text: String = (self.peers.iter())
            .filter(|(p, _)| ids.contains(&p.as_str()))
            .map(|(p, port)| format!("{p} 127.0.0.1 {port}\n"))
            .collect();
        text.push_str(extra);
        // Written beside and renamed, as an editor does: never read half-written.
        let path = self.root().join("peer_settings.txt");
        std::fs::write(path.with_extension("new"), text)?;
        std::fs::rename(path.with_extension("new"), path)?;
        Ok(())
    }

    /// A `qnode --root R --peer ID ARGS` command with a clean environment.
    pub fn cmd(&self, id: &str, args: &[&str]) -> Command {
        let mut c = match self.hosts.get(id) {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, qnode_bin()]);
                c
            }
            None => Command::new(qnode_bin()),
        };
        c.arg("--root")
            .arg(self.root())
            .arg("--peer")
            .arg(id)
            .args(args);
        c.env_remove("RUST_LOG")
            .env_remove("QNODE_ROOT")
            .env_remove("QNODE_PEER")
            .stdin(Stdio::null());
        c
    }

    /// Runs a command to completion.
    pub fn run(&self, id: &str, args: &[&str]) -> anyhow::Result<Out> {
        let output = self.cmd(id, args).output()?;
        Ok(Out::new(format!("{id} {}", args.join(" ")), output))
    }

    /// Runs a command that must succeed.
    pub fn ok(&self, id: &str, args: &[&str]) -> anyhow::Result<Out> {
        let out = self.run(id, args)?;
        if !out.success() {
            bail!("command failed:\n{out}");
        }
        Ok(out)
    }

    /// Runs a command that must fail; returns its output.
    pub fn fails(&self, id: &str, args: &[&str]) -> anyhow::Result<Out> {
        let out = self.run(id, args)?;
        if out.success() {
            bail!("command should have failed:\n{out}");
        }
        Ok(out)
    }

    /// Runs a command that must succeed and print one JSON object.
    pub fn json(&self, id: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = self.ok(id, args)?;
        out.json()
    }

    /// Waits (up to 60 s) until `id`'s own listing shows its download of `name` in progress
    /// holding at least `bytes` verified.
    pub fn wait_until_held(&self, id: &str, name: &str, bytes: u64) -> anyhow::Result<()> {
        poll(Duration::from_secs(60), || {
            let json = self.json(id, &["list", id, "--json"])?;
            let held = json["peers"][0]["incomplete"]
                .as_array()
                .and_then(|v| v.iter().find(|f| f["name"] == name))
                .and_then(|f| f["held"].as_u64())
                .unwrap_or(0);
            Ok((held >= bytes).then_some(()))
        })
    }

    /// Puts `data` as `name` into each of `ids`' served_files and starts them serving with `extra`.
    pub fn seed(
        &self,
        ids: &[&str],
        name: &str,
        data: &[u8],
        extra: &[&str],
    ) -> anyhow::Result<Vec<Server>> {
        ids.iter()
            .map(|id| {
                self.put(id, name, data)?;
                self.serve(id, extra)
            })
            .collect()
    }

    /// Starts a command in the background with stdout and stderr piped (see [`Out::of`]).
    pub fn spawn(&self, id: &str, args: &[&str]) -> anyhow::Result<(String, Child)> {
        let child = self
            .cmd(id, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok((format!("{id} {}", args.join(" ")), child))
    }

    /// Starts `qnode serve` for `id` with extra args and waits until it listens.
    pub fn serve(&self, id: &str, extra: &[&str]) -> anyhow::Result<Server> {
        let mut args = vec!["serve"];
        args.extend_from_slice(extra);
        self.start(id, &args)
    }

    /// Starts a command that serves (`serve`, `sync`) for `id` and waits until it listens.
    pub fn start(&self, id: &str, args: &[&str]) -> anyhow::Result<Server> {
        let mut cmd = self.cmd(id, args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let stderr = child.stderr.take().context("no stderr")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let server = Server {
            id: id.to_string(),
            child: Some(child),
            log: collect(stderr),
            out: collect(stdout),
        };
        server.wait_for_log(" serving ", Duration::from_secs(30))?;
        Ok(server)
    }
}

/// The lines `from` gives, gathered as they come.
fn collect(from: impl std::io::Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    text
}

/// A running `qnode serve`, killed on drop.
pub struct Server {
    pub id: String,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    out: Arc<Mutex<String>>,
}

impl Server {
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// What it printed on stdout so far (`sync`'s events).
    pub fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Waits until the log contains `needle` at least once.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> TestResult {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// Waits until the log contains `needle` at least `count` times.
    pub fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) -> TestResult {
        poll(timeout, || {
            Ok((self.log().matches(needle).count() >= count).then_some(()))
        })
        .with_context(|| {
            format!(
                "{} never logged {needle:?} x{count}; log:\n{}",
                self.id,
                self.log()
            )
        })
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit (after a signal), with a deadline; returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("already reaped")?;
        let status = poll(timeout, || Ok(child.try_wait()?));
        let status = status.with_context(|| {
            format!(
                "{} did not exit within {timeout:?}; log:\n{}",
                self.id,
                self.log()
            )
        })?;
        self.child = None;
        Ok(status)
    }
}

/// Calls `check` every 20 ms until it returns a value, or fails after `timeout`.
pub fn poll<T>(
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A finished command's output, printable in failure messages.
pub struct Out {
    pub what: String,
    pub output: Output,
}

impl Out {
    fn new(what: String, output: Output) -> Self {
        Self { what, output }
    }

    /// Waits for a command started with [`Net::spawn`].
    pub fn of(spawned: (String, Child)) -> anyhow::Result<Self> {
        Ok(Self::new(spawned.0, spawned.1.wait_with_output()?))
    }

    pub fn success(&self) -> bool {
        self.output.status.success()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(self.stdout().trim())
            .with_context(|| format!("stdout is not one JSON object:\n{self}"))
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "$ qnode {}\nstatus: {}\n--- stdout\n{}--- stderr\n{}",
            self.what,
            self.output.status,
            self.stdout(),
            self.stderr()
        )
    }
}

/// A size field (`VmRSS`, `VmHWM`, …) of a process's /proc status, in KiB (0 if unreadable).
pub fn proc_status_kib(pid: i32, field: &str) -> u64 {
    let prefix = format!("{field}:");
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&prefix))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The hex BLAKE3 of some bytes.
pub fn b3(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// The bytes a download's `--json` report credits to `peer` (0 if none).
pub fn share(json: &serde_json::Value, peer: &str) -> u64 {
    json["peers"][peer].as_u64().unwrap_or(0)
}

/// The bytes a download's `--json` report credits to `peers`, together.
pub fn shares(json: &serde_json::Value, peers: &[&str]) -> u64 {
    peers.iter().map(|p| share(json, p)).sum()
}

/// Hidden temporary files left in a folder.
pub fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".part"))
                .collect()
        })
        .unwrap_or_default()
}

/// A tmpfs mounted over a folder for the length of a test.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> anyhow::Result<Self> {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()?;
        anyhow::ensure!(st.success(), "mount tmpfs on {} failed", dir.display());
        Ok(Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Whether we run as root; if not, says on stderr that `test` is skipped and why.
pub fn is_root(test: &str, why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    // Written to the stderr handle directly: libtest captures only the print macros, and a
    // skipped test must be seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs root {why}");
    false
}

/// Copies a file or a folder (recursively).
pub fn copy_tree(from: &Path, to: &Path) -> TestResult {
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
    } else {
        std::fs::copy(from, to)?;
    }
    Ok(())
}
