//! Transfer benchmark: `cargo bench --bench transfer` (or `benches/run.sh`, which installs the tools).
//!
//! Runs the real release `qnode` binary as separate processes and prints one table: scenario,
//! qnode MB/s, the reference MB/s, their ratio, downloader CPU·s per GiB and peak RSS of the
//! downloader and the servers (median and min–max over the runs). Scenarios:
//!
//! - `loopback-1src`: one source on 127.0.0.1, disk to disk, verified; reference: an in-repo QUIC
//!   probe (this crate's quinn, TLS and transport settings, but round-robin stream scheduling; 8
//!   concurrent 4 MiB streams from memory),
//!   the ceiling for one connection on this machine, measured in the same run.
//!   Also `sendme` (iroh-blobs, BLAKE3-verified, disk to disk) on the same file, both ends in a
//!   network namespace with only loopback, `--relay disabled`, `send --ticket-type addresses`; its
//!   rows' CPU and RSS columns are sendme's receiver.
//! - `small-list-10k` / `small-1KiB`: `list` of a peer serving 10,000 files (warm cache) and a 1 KiB
//!   download, process start to exit.
//! - `ns-…`: each source in its own network namespace behind a veth link whose uplink is limited
//!   with `tc tbf`; the downloader in another. Reference: N × the single-source figure measured in
//!   the same run (the target is ≥ 0.95 of it); for the 50/100/400 Mbit/s mix, the links' payload
//!   capacity (their raw sum × the share of its raw rate one 200 Mbit/s source delivered alone);
//!   and `aria2c` from as many nginx servers behind the same links when both are installed. Needs root, `ip` and `tc`; skipped with a note otherwise.
//!
//! - `rtt100ms-…`: sources on loopback behind a user-space UDP relay of this file that adds 50 ms
//!   each way and paces the server→client direction to 400 Mbit/s (these machines have no netem).
//!   Reference: the link's raw rate, and for 3 sources 3 × the single-source figure.
//!
//! Environment: `QNODE_BENCH_SIZE` (bytes, default 1 GiB), `QNODE_BENCH_NS_SIZE` (namespace
//! scenarios, default 256 MiB), `QNODE_BENCH_LONG_SIZE` (relay scenarios, default 1 GiB: at
//! 100 ms and 400 Mbit/s, slow start costs about a second whatever the size — measured with a
//! per-100 ms trace of the probe — so a short transfer mostly measures it),
//! `QNODE_BENCH_RUNS` (default 3), `QNODE_BENCH_ONLY` (a comma list of `loopback`, `small`, `long`, `ns`), `QNODE_BENCH_SKIP_NS=1`, `QNODE_BENCH_BIN` (another
//! qnode binary to measure, e.g. a copy of an earlier build).
//! Every namespace and process it starts is removed at the end, also on failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;

mod util;
use util::{Root, Usage, env_u64, random_file, stop, wait_usage};

// The tests' namespaces (one module for both); the bench uses only part of it.
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/util/netns.rs"]
mod netns;

struct Row {
    scenario: String,
    qnode: Vec<f64>,
    reference: Vec<f64>,
    reference_name: String,
    cpu_per_gib: Vec<f64>,
    rss_down_mib: Vec<f64>,
    rss_serve_mib: Vec<f64>,
    unit: &'static str,
}

impl Row {
    fn new(scenario: &str, unit: &'static str) -> Self {
        Self {
            scenario: scenario.into(),
            qnode: vec![],
            reference: vec![],
            reference_name: String::new(),
            cpu_per_gib: vec![],
            rss_down_mib: vec![],
            rss_serve_mib: vec![],
            unit,
        }
    }
}

fn stats(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let med = s[s.len() / 2];
    if s.len() == 1 {
        format!("{med:.1}")
    } else {
        format!("{med:.1} ({:.1}–{:.1})", s[0], s[s.len() - 1])
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| scenario | qnode | reference | ratio | CPU·s/GiB (downloader) | peak RSS MiB downloader | peak RSS MiB servers |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let ratio = if r.reference.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2}", median(&r.qnode) / median(&r.reference).max(1e-9))
        };
        let reference = if r.reference.is_empty() {
            "-".to_string()
        } else {
            format!("{} {}", stats(&r.reference), r.reference_name)
        };
        println!(
            "| {} | {} {} | {} | {} | {} | {} | {} |",
            r.scenario,
            stats(&r.qnode),
            r.unit,
            reference,
            ratio,
            stats(&r.cpu_per_gib),
            stats(&r.rss_down_mib),
            stats(&r.rss_serve_mib)
        );
    }
}

/// sendme (iroh-blobs) on loopback, both ends in a namespace with no route out, relay disabled.
/// Returns MB/s per run of `sendme receive`, or `None` if sendme or root is missing.
fn sendme_runs(file: &Path, size: u64, runs: usize) -> anyhow::Result<Option<Vec<Usage>>> {
    let bin = std::env::var("QNODE_BENCH_SENDME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tools/bin/sendme")
        });
    // SAFETY: geteuid has no preconditions.
    if !bin.exists() || unsafe { libc::geteuid() } != 0 || !netns::have("ip") {
        eprintln!(
            "note: no sendme reference (needs root, ip, and {}; benches/run.sh installs it)",
            bin.display()
        );
        return Ok(None);
    }
    let ns = netns::TestNet::isolated()?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let send = Command::new("ip")
        .args(["netns", "exec", ns.ns(1)])
        .arg(&bin)
        .args(["send"])
        .arg(file)
        .args([
            "--relay",
            "disabled",
            "--ticket-type",
            "addresses",
            "--no-progress",
        ])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut send = KillOnDrop(send);
    // The ticket is printed once the sender has imported (hashed) the file; the rest of its
    // output keeps being drained so the sender never blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(out) = send.0.stdout.take() {
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(t) = line.split_whitespace().find(|w| w.starts_with("blob")) {
                    let _ = tx.send(t.to_string());
                }
            }
        });
    }
    let ticket = rx.recv_timeout(Duration::from_secs(120)).ok();
    let ticket = ticket.ok_or_else(|| anyhow::anyhow!("sendme printed no ticket"))?;
    let mut usages = Vec::new();
    for _ in 0..runs {
        let recv = tempfile::tempdir()?;
        let started = Instant::now();
        let child = Command::new("ip")
            .args(["netns", "exec", ns.ns(1)])
            .arg(&bin)
            .args(["receive", &ticket, "--relay", "disabled", "--no-progress"])
            .current_dir(recv.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let u = wait_usage(child, started);
        let got = std::fs::metadata(recv.path().join(file.file_name().unwrap_or_default()))?.len();
        anyhow::ensure!(u.ok && got == size, "sendme receive failed");
        usages.push(u);
    }
    Ok(Some(usages))
}

/// Kills a child process when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn loopback(size: u64, runs: usize) -> anyhow::Result<Vec<Row>> {
    let root = Root::new(&[
        ("s1", "127.0.0.1 47311".into()),
        ("d", "127.0.0.1 47312".into()),
    ])?;
    random_file(&root.served("s1").join("big.bin"), size)?;
    let mut servers = vec![root.serve(None, "s1", &[], ("d", None))?];
    // Warm the server's manifest cache (hashing the file once), as a long-running server has.
    root.cmd(None, "d", &["list", "s1"]).output()?;
    let mut row = Row::new(&format!("loopback-1src {} MiB", size >> 20), "MB/s");
    row.reference_name = "probe".into();
    let gib = size as f64 / (1u64 << 30) as f64;
    for i in 0..runs {
        let u = root.download(None, "d", "big.bin", &["s1"])?;
        row.qnode.push(size as f64 / 1e6 / u.wall);
        row.cpu_per_gib.push(u.cpu / gib);
        row.rss_down_mib.push(u.max_rss_kib as f64 / 1024.0);
        let probe = probe_mb_s(&root, size)?;
        row.reference.push(probe);
        eprintln!(
            "  run {}: qnode {:.0} MB/s, probe {:.0} MB/s",
            i + 1,
            size as f64 / 1e6 / u.wall,
            probe
        );
    }
    row.rss_serve_mib = stop(&mut servers)
        .into_iter()
        .map(|k| k as f64 / 1024.0)
        .collect();
    let mut rows = vec![row];
    if let Some(usages) = sendme_runs(&root.served("s1").join("big.bin"), size, runs)? {
        let mut sm = Row::new(
            &format!("loopback-1src {} MiB vs sendme", size >> 20),
            "MB/s",
        );
        sm.qnode = rows[0].qnode.clone();
        sm.reference = usages.iter().map(|u| size as f64 / 1e6 / u.wall).collect();
        sm.reference_name = "sendme".into();
        sm.cpu_per_gib = usages
            .iter()
            .map(|u| u.cpu / (size as f64 / (1u64 << 30) as f64))
            .collect();
        sm.rss_down_mib = usages
            .iter()
            .map(|u| u.max_rss_kib as f64 / 1024.0)
            .collect();
        eprintln!("  sendme: {}", stats(&sm.reference));
        rows.push(sm);
    }
    Ok(rows)
}

/// The ceiling: one QUIC connection with this crate's TLS and transport settings, 8 concurrent
/// 4 MiB streams of in-memory data, client and server in this process.
fn probe_mb_s(root: &Root, total: u64) -> anyhow::Result<f64> {
    probe_via(root, total, None)
}

/// The probe, optionally through a relay of (`rtt`, `mbit`).
fn probe_via(root: &Root, total: u64, relay: Option<(Duration, f64)>) -> anyhow::Result<f64> {
    use qnode::model::peers;
    use qnode::net::{identity, tls};
    let r = peers::Root::new(root.path());
    let (s1, d): (peers::PeerId, peers::PeerId) = ("s1".parse()?, "d".parse()?);
    let server_id = identity::load(&r, &s1)?;
    let client_id = identity::load(&r, &d)?;
    let mut pins = tls::Pins::default();
    pins.insert(d.clone(), &client_id.cert);
    let mut server_cfg = tls::server_config(
        &server_id,
        tls::LivePins::new(pins),
        tls::Congestion::default(),
    )?;
    // qnode sends each stream whole, in order; for the probe's 8 × 4 MiB pattern round-robin is
    // faster (1 GiB loopback, 3 runs each: 1277 against 976 MB/s), and the ceiling is the best
    // one connection does.
    let mut transport = tls::transport_config();
    transport.send_fairness(true);
    server_cfg.transport_config(Arc::new(transport));
    let client_cfg = tls::client_config(&client_id, &s1, server_id.cert.clone())?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let (server, _) = tls::bind_endpoint("127.0.0.1:0".parse()?, Some(server_cfg), None)?;
        let mut addr = server.local_addr()?;
        // The relay runs its own runtime: start it from a plain thread, and hand it back out of
        // this one to be dropped outside it.
        let relay = match relay {
            Some((rtt, mbit)) => {
                let upstream = addr;
                let r = std::thread::spawn(move || {
                    Relay::start(
                        upstream,
                        rtt / 2,
                        mbit * 1e6 / 8.0,
                        Duration::from_millis(env_u64("QNODE_BENCH_RELAY_QUEUE_MS", 50)),
                    )
                })
                .join()
                .map_err(|_| anyhow::anyhow!("relay thread panicked"))??;
                addr = r.addr;
                Some(r)
            }
            None => None,
        };
        let data = bytes::Bytes::from(vec![0xabu8; 4 << 20]);
        tokio::spawn(async move {
            while let Some(inc) = server.accept().await {
                let data = data.clone();
                tokio::spawn(async move {
                    let Ok(conn) = inc.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let data = data.clone();
                        tokio::spawn(async move {
                            let _ = recv.read_to_end(16).await;
                            let _ = send.write_chunk(data).await;
                            let _ = send.finish();
                        });
                    }
                });
            }
        });
        let (client, _) = tls::bind_endpoint("127.0.0.1:0".parse()?, None, None)?;
        let conn = client
            .connect_with(client_cfg, addr, tls::SERVER_NAME)?
            .await?;
        let streams = total.div_ceil(4 << 20);
        let sem = Arc::new(tokio::sync::Semaphore::new(8));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..streams {
            let permit = sem.clone().acquire_owned().await?;
            let conn = conn.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(b"go").await?;
                send.finish()?;
                let mut n = 0usize;
                while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
                    n += chunk.bytes.len();
                }
                anyhow::Ok(n)
            });
        }
        let mut got = 0usize;
        while let Some(r) = tasks.join_next().await {
            got += r??;
        }
        let secs = started.elapsed().as_secs_f64();
        conn.close(0u32.into(), b"done");
        client.wait_idle().await;
        anyhow::Ok((got as f64 / 1e6 / secs, relay))
    })
    .map(|(mb_s, relay)| {
        drop(relay);
        mb_s
    })
}

fn small(runs: usize) -> anyhow::Result<Vec<Row>> {
    let root = Root::new(&[
        ("s1", "127.0.0.1 47321".into()),
        ("d", "127.0.0.1 47322".into()),
    ])?;
    for i in 0..10_000 {
        std::fs::write(
            root.served("s1").join(format!("file{i:05}.txt")),
            format!("file {i}\n"),
        )?;
    }
    std::fs::write(root.served("s1").join("one_kib.txt"), vec![b'x'; 1024])?;
    let mut servers = vec![root.serve(None, "s1", &[], ("d", None))?];
    let mut list = Row::new("small-list-10k (warm)", "ms");
    let mut one = Row::new("small-1KiB download", "ms");
    for _ in 0..runs {
        let started = Instant::now();
        let child = root
            .cmd(None, "d", &["list", "s1"])
            .stdout(Stdio::null())
            .spawn()?;
        let u = wait_usage(child, started);
        list.qnode.push(u.wall * 1000.0);
        list.rss_down_mib.push(u.max_rss_kib as f64 / 1024.0);
        let u = root.download(None, "d", "one_kib.txt", &["s1"])?;
        one.qnode.push(u.wall * 1000.0);
        one.rss_down_mib.push(u.max_rss_kib as f64 / 1024.0);
    }
    let rss: Vec<f64> = stop(&mut servers)
        .into_iter()
        .map(|k| k as f64 / 1024.0)
        .collect();
    list.rss_serve_mib = rss.clone();
    one.rss_serve_mib = rss;
    Ok(vec![list, one])
}

/// The network namespaces of the tests, shared: sources are hosts 1..=n, the downloader is host
/// n + 1, each source's uplink limited to its rate; with `loss_pct` > 0 every host drops that share
/// of the UDP datagrams it sends (nft), with offloads off so a drop is one packet.
fn star(rates: &[&str], loss_pct: u32) -> anyhow::Result<netns::TestNet> {
    let net = netns::TestNet::new(rates.len() + 1)?;
    for (i, rate) in rates.iter().enumerate() {
        net.shape(i + 1, rate, "256kb")?;
    }
    if loss_pct > 0 {
        for i in 1..=rates.len() + 1 {
            net.loss(i, loss_pct)?;
        }
    }
    Ok(net)
}

fn rate_mbit(rate: &str) -> f64 {
    rate.trim_end_matches("mbit").parse().unwrap_or(0.0)
}

/// One namespace run: sources behind `rates`, each serving the same file.
fn ns_run(rates: &[&str], loss_pct: u32, size: u64) -> anyhow::Result<(Usage, Vec<u64>)> {
    let net = star(rates, loss_pct)?;
    let d = rates.len() + 1;
    let mut peers: Vec<(String, String)> = (1..=rates.len())
        .map(|i| (format!("s{i}"), format!("{} 47400", net.ip(i))))
        .collect();
    peers.push(("d".into(), format!("{} 47401", net.ip(d))));
    let refs: Vec<(&str, String)> = peers.iter().map(|(a, b)| (a.as_str(), b.clone())).collect();
    let root = Root::new(&refs)?;
    let file = root.path().join("payload.bin");
    random_file(&file, size)?;
    // Every link first: a new link changes the file's ctime, which tells a server that already
    // hashed it that the file changed (it hashes it again, inside the timed download).
    for i in 1..=rates.len() {
        let served = root.served(&format!("s{i}")).join("big.bin");
        std::fs::hard_link(&file, &served)
            .or_else(|_| std::fs::copy(&file, &served).map(|_| ()))?;
    }
    let mut servers = Vec::new();
    for i in 1..=rates.len() {
        let id = format!("s{i}");
        servers.push(root.serve(Some(net.ns(i)), &id, &[], ("d", Some(net.ns(d))))?);
        root.cmd(Some(net.ns(d)), "d", &["list", &id]).output()?;
    }
    let ids: Vec<String> = (1..=rates.len()).map(|i| format!("s{i}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let usage = root.download(Some(net.ns(d)), "d", "big.bin", &id_refs);
    let rss = stop(&mut servers);
    Ok((usage?, rss))
}

/// An nginx master, stopped on drop with SIGTERM (fast shutdown: it stops its workers, which a
/// SIGKILL of the master would orphan).
struct NginxGuard(Child);

impl Drop for NginxGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

fn aria2_run(rates: &[&str], size: u64) -> anyhow::Result<f64> {
    let net = star(rates, 0)?;
    let d = rates.len() + 1;
    let dir = tempfile::tempdir()?;
    random_file(&dir.path().join("big.bin"), size)?;
    let mut nginx = Vec::new();
    for i in 1..=rates.len() {
        let conf = dir.path().join(format!("nginx{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "daemon off; pid {d}/nginx{i}.pid; error_log /dev/null; events {{}}\n\
                 http {{ access_log off; sendfile on; server {{ listen {ip}:8080; root {d}; }} \
                 client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d}; }}\n",
                d = dir.path().display(),
                ip = net.ip(i)
            ),
        )?;
        // `ip netns exec` execs nginx, so the child's pid is nginx's master. Nothing of ours is
        // inherited (a worker holding our stdout would outlive the run).
        nginx.push(NginxGuard(
            Command::new("ip")
                .args(["netns", "exec", net.ns(i), "nginx", "-c"])
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ));
    }
    std::thread::sleep(Duration::from_millis(500));
    let urls: Vec<String> = (1..=rates.len())
        .map(|i| format!("http://{}:8080/big.bin", net.ip(i)))
        .collect();
    let out = dir.path().join("out");
    std::fs::create_dir(&out)?;
    let started = Instant::now();
    let st = Command::new("ip")
        .args([
            "netns",
            "exec",
            net.ns(d),
            "aria2c",
            "-q",
            "--allow-overwrite=true",
            "-x1",
        ])
        .arg(format!("-s{}", rates.len()))
        .arg("-d")
        .arg(&out)
        .args(&urls)
        .status()?;
    let secs = started.elapsed().as_secs_f64();
    drop(nginx);
    if !st.success() {
        bail!("aria2c failed");
    }
    Ok(size as f64 / 1e6 / secs)
}

/// A user-space UDP relay standing in for a long link (these machines have no netem): datagrams
/// from the one client go to `upstream` and back, each after `delay`, the server→client direction
/// paced to `rate` bytes/s with a queue of `queue` of delay beyond which it drops (like tbf).
///
/// It moves datagrams in batches with quinn-udp (GRO on receive, GSO on send, as quinn does), so
/// one relay costs a few syscalls per ~64 KiB instead of two per datagram: with one datagram per
/// syscall, three relays at 400 Mbit/s took more CPU than the transfers they carried.
struct Relay {
    addr: std::net::SocketAddr,
    _rt: tokio::runtime::Runtime,
}

/// A received batch: `stride`-byte datagrams back to back (the last may be shorter).
struct Batch {
    at: tokio::time::Instant,
    data: Vec<u8>,
    stride: usize,
}

/// One end of the relay: a tokio socket with quinn-udp's batched I/O state.
struct RelaySocket {
    io: tokio::net::UdpSocket,
    state: quinn_udp::UdpSocketState,
}

impl RelaySocket {
    fn bind() -> anyhow::Result<Self> {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
        sock.set_nonblocking(true)?;
        let state = quinn_udp::UdpSocketState::new((&sock).into())?;
        // Large buffers: a relay that drops on its own socket would look like a lossy link.
        state.set_recv_buffer_size((&sock).into(), 8 << 20)?;
        state.set_send_buffer_size((&sock).into(), 8 << 20)?;
        Ok(Self {
            io: tokio::net::UdpSocket::from_std(sock)?,
            state,
        })
    }

    /// Receives one or more batches; calls `each(from, bytes, stride)` for each.
    async fn recv(
        &self,
        bufs: &mut [Vec<u8>],
        mut each: impl FnMut(std::net::SocketAddr, &[u8], usize),
    ) -> std::io::Result<()> {
        let mut meta = vec![quinn_udp::RecvMeta::default(); bufs.len()];
        let n = {
            let mut slices: Vec<std::io::IoSliceMut<'_>> = bufs
                .iter_mut()
                .map(|b| std::io::IoSliceMut::new(b))
                .collect();
            self.io
                .async_io(tokio::io::Interest::READABLE, || {
                    self.state.recv((&self.io).into(), &mut slices, &mut meta)
                })
                .await?
        };
        for (m, b) in meta.iter().zip(bufs.iter()).take(n) {
            each(m.addr, &b[..m.len], m.stride.max(1));
        }
        Ok(())
    }

    /// Sends `data` (`stride`-byte datagrams back to back) to `to`, as few GSO sends as allowed.
    async fn send(&self, to: std::net::SocketAddr, data: &[u8], stride: usize) {
        let per_send = stride * self.state.max_gso_segments().max(1);
        for part in data.chunks(per_send) {
            let transmit = quinn_udp::Transmit {
                destination: to,
                ecn: None,
                contents: part,
                segment_size: (part.len() > stride).then_some(stride),
                src_ip: None,
            };
            let _ = self
                .io
                .async_io(tokio::io::Interest::WRITABLE, || {
                    self.state.send((&self.io).into(), &transmit)
                })
                .await;
        }
    }
}

impl Relay {
    fn start(
        upstream: std::net::SocketAddr,
        delay: Duration,
        rate: f64,
        queue: Duration,
    ) -> anyhow::Result<Self> {
        use tokio::sync::mpsc::unbounded_channel;
        use tokio::time::{Instant, sleep_until};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let addr = rt.block_on(async {
            let front = Arc::new(RelaySocket::bind()?);
            let back = Arc::new(RelaySocket::bind()?);
            let addr = front.io.local_addr()?;
            let client: Arc<std::sync::Mutex<Option<std::net::SocketAddr>>> = Arc::default();
            let buffers = || vec![vec![0u8; 65536]; 8];
            // client -> server: delay only.
            let (to_server, mut rx_s) = unbounded_channel::<Batch>();
            {
                let (front, client) = (front.clone(), client.clone());
                tokio::spawn(async move {
                    let mut bufs = buffers();
                    loop {
                        let got = front
                            .recv(&mut bufs, |from, data, stride| {
                                *client.lock().unwrap() = Some(from);
                                let at = Instant::now() + delay;
                                let data = data.to_vec();
                                let _ = to_server.send(Batch { at, data, stride });
                            })
                            .await;
                        if got.is_err() {
                            break;
                        }
                    }
                });
            }
            {
                let back = back.clone();
                tokio::spawn(async move {
                    while let Some(b) = rx_s.recv().await {
                        sleep_until(b.at).await;
                        back.send(upstream, &b.data, b.stride).await;
                    }
                });
            }
            // server -> client: paced to `rate`, then delayed; tail drop past `queue`, datagram
            // by datagram (the datagrams of one batch arrived together).
            let (to_client, mut rx_c) = unbounded_channel::<Batch>();
            {
                let back = back.clone();
                tokio::spawn(async move {
                    let mut bufs = buffers();
                    let mut next_free = Instant::now();
                    loop {
                        let got = back
                            .recv(&mut bufs, |_, data, stride| {
                                let now = Instant::now();
                                let mut kept = Vec::with_capacity(data.len());
                                for d in data.chunks(stride) {
                                    let start = next_free.max(now);
                                    if start - now > queue {
                                        break; // queue full: this and the rest are dropped
                                    }
                                    next_free =
                                        start + Duration::from_secs_f64(d.len() as f64 / rate);
                                    kept.extend_from_slice(d);
                                }
                                if !kept.is_empty() {
                                    let at = next_free + delay;
                                    let _ = to_client.send(Batch {
                                        at,
                                        data: kept,
                                        stride,
                                    });
                                }
                            })
                            .await;
                        if got.is_err() {
                            break;
                        }
                    }
                });
            }
            tokio::spawn(async move {
                while let Some(b) = rx_c.recv().await {
                    sleep_until(b.at).await;
                    let to = *client.lock().unwrap();
                    if let Some(to) = to {
                        front.send(to, &b.data, b.stride).await;
                    }
                }
            });
            anyhow::Ok(addr)
        })?;
        Ok(Self { addr, _rt: rt })
    }
}

/// Sources behind relays with `rtt` and a `mbit` cap each, on loopback.
fn rtt_run(sources: usize, rtt: Duration, mbit: f64, size: u64) -> anyhow::Result<Usage> {
    let ports: Vec<u16> = (0..sources).map(|i| 47700 + i as u16).collect();
    // The servers listen on their real ports; the downloader's settings point at the relays.
    let mut relays = Vec::new();
    for p in &ports {
        let upstream = format!("127.0.0.1:{p}").parse()?;
        let queue = Duration::from_millis(env_u64("QNODE_BENCH_RELAY_QUEUE_MS", 50));
        relays.push(Relay::start(upstream, rtt / 2, mbit * 1e6 / 8.0, queue)?);
    }
    let mut peers: Vec<(String, String)> = relays
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                format!("s{}", i + 1),
                format!("127.0.0.1 {}", r.addr.port()),
            )
        })
        .collect();
    peers.push(("d".into(), "127.0.0.1 47799".into()));
    let refs: Vec<(&str, String)> = peers.iter().map(|(a, b)| (a.as_str(), b.clone())).collect();
    let root = Root::new(&refs)?;
    let file = root.path().join("payload.bin");
    random_file(&file, size)?;
    // Every link before any server hashes the file (see `ns_run`).
    for i in 1..=sources {
        std::fs::hard_link(&file, root.served(&format!("s{i}")).join("big.bin"))?;
    }
    let mut servers = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let id = format!("s{}", i + 1);
        let listen = format!("127.0.0.1:{p}");
        let cc = std::env::var("QNODE_BENCH_CC").unwrap_or_else(|_| "cubic".into());
        servers.push(root.serve(
            None,
            &id,
            &["--listen", &listen, "--congestion", &cc],
            ("d", None),
        )?);
        root.cmd(None, "d", &["list", &id]).output()?;
    }
    let ids: Vec<String> = (1..=sources).map(|i| format!("s{i}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let usage = root.download(None, "d", "big.bin", &id_refs);
    stop(&mut servers);
    usage
}

fn long_links(size: u64, runs: usize) -> anyhow::Result<Vec<Row>> {
    let rtt = Duration::from_millis(env_u64("QNODE_BENCH_RTT_MS", 100));
    let mbit = env_u64("QNODE_BENCH_MBIT", 400) as f64;
    let mut rows = Vec::new();
    let mut single = Vec::new();
    for sources in [1usize, 3] {
        let name = format!(
            "rtt{}ms-{sources}src {mbit}mbit {} MiB",
            rtt.as_millis(),
            size >> 20
        );
        let mut row = Row::new(&name, "MB/s");
        let gib = size as f64 / (1u64 << 30) as f64;
        for _ in 0..runs {
            let u = rtt_run(sources, rtt, mbit, size)?;
            row.qnode.push(size as f64 / 1e6 / u.wall);
            row.cpu_per_gib.push(u.cpu / gib);
            row.rss_down_mib.push(u.max_rss_kib as f64 / 1024.0);
        }
        eprintln!("  {}: qnode {}", row.scenario, stats(&row.qnode));
        if sources == 1 {
            single = row.qnode.clone();
            // Reference: the probe through the same relay (the ceiling for one QUIC connection
            // there); the link's raw rate is mbit / 8 MB/s.
            let root = Root::new(&[("s1", "127.0.0.1 1".into()), ("d", "127.0.0.1 2".into())])?;
            for _ in 0..runs {
                row.reference
                    .push(probe_via(&root, size, Some((rtt, mbit)))?);
            }
            row.reference_name = format!("probe (raw link {:.0})", mbit / 8.0);
        } else {
            row.reference = single.iter().map(|s| s * sources as f64).collect();
            row.reference_name = format!("({sources}× 1src)");
        }
        rows.push(row);
    }
    Ok(rows)
}

fn namespaces(size: u64, runs: usize) -> anyhow::Result<Vec<Row>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !netns::have("ip") || !netns::have("tc") {
        eprintln!(
            "SKIPPED ns-* scenarios: they need root, ip and tc (benches/run.sh installs them)"
        );
        return Ok(vec![]);
    }
    let with_aria = netns::have("aria2c") && netns::have("nginx");
    if !with_aria {
        eprintln!(
            "note: aria2c or nginx missing; ns-* rows have no aria2c reference (benches/run.sh installs them)"
        );
    }
    let mut rows = Vec::new();
    // (name, per-source uplink rates, loss %, reference: the row it is compared with)
    enum Reference {
        None,
        TimesSingle,
        PayloadSum,
        Row(&'static str),
    }
    let profiles: Vec<(&str, Vec<&str>, u32, Reference)> = vec![
        ("ns-1src 200mbit", vec!["200mbit"], 0, Reference::None),
        (
            "ns-2src 200mbit",
            vec!["200mbit"; 2],
            0,
            Reference::TimesSingle,
        ),
        (
            "ns-4src 200mbit",
            vec!["200mbit"; 4],
            0,
            Reference::TimesSingle,
        ),
        (
            "ns-8src 200mbit",
            vec!["200mbit"; 8],
            0,
            Reference::TimesSingle,
        ),
        (
            "ns-3src 50/100/400mbit",
            vec!["50mbit", "100mbit", "400mbit"],
            0,
            Reference::PayloadSum,
        ),
        (
            "ns-3src 200mbit",
            vec!["200mbit"; 3],
            0,
            Reference::TimesSingle,
        ),
        (
            "ns-3src 200mbit 2% loss",
            vec!["200mbit"; 3],
            2,
            Reference::Row("ns-3src 200mbit"),
        ),
    ];
    let mut measured: Vec<(&str, Vec<f64>)> = Vec::new();
    // QNODE_BENCH_NS_PROFILES: run only the profiles whose name contains one of these words.
    let filter = std::env::var("QNODE_BENCH_NS_PROFILES").unwrap_or_default();
    for (name, rates, loss, reference) in profiles {
        if !filter.is_empty() && !filter.split(',').any(|f| name.contains(f)) {
            continue;
        }
        let mut row = Row::new(&format!("{name} {} MiB", size >> 20), "MB/s");
        let gib = size as f64 / (1u64 << 30) as f64;
        let mut aria = Vec::new();
        for _ in 0..runs {
            let (u, rss) = ns_run(&rates, loss, size)?;
            row.qnode.push(size as f64 / 1e6 / u.wall);
            row.cpu_per_gib.push(u.cpu / gib);
            row.rss_down_mib.push(u.max_rss_kib as f64 / 1024.0);
            row.rss_serve_mib
                .extend(rss.into_iter().map(|k| k as f64 / 1024.0));
            if with_aria && loss == 0 {
                aria.push(aria2_run(&rates, size)?);
            }
        }
        eprintln!("  {}: qnode {}", row.scenario, stats(&row.qnode));
        let single = measured
            .iter()
            .find(|(n, _)| *n == "ns-1src 200mbit")
            .map(|(_, v)| v.clone());
        match reference {
            Reference::None => {}
            Reference::TimesSingle => {
                row.reference = single
                    .unwrap_or_default()
                    .iter()
                    .map(|s| s * rates.len() as f64)
                    .collect();
                row.reference_name = format!("({}× 1src)", rates.len());
            }
            Reference::PayloadSum => {
                // The links' payload capacity: their raw rates (MB/s) times the share of a link's
                // raw rate that one source delivered alone as file bytes in this run (headers,
                // handshake and slow start included; ~0.95).
                let raw: f64 = rates.iter().map(|r| rate_mbit(r)).sum::<f64>() / 8.0;
                let share = median(&single.unwrap_or_default()) / (rate_mbit("200mbit") / 8.0);
                if share > 0.0 {
                    row.reference = vec![raw * share];
                    row.reference_name = format!("(payload: raw {raw:.1} × 1src share {share:.3})");
                }
            }
            Reference::Row(other) => {
                row.reference = measured
                    .iter()
                    .find(|(n, _)| *n == other)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                row.reference_name = "(no loss)".into();
            }
        }
        measured.push((name, row.qnode.clone()));
        let aria_row = (!aria.is_empty()).then(|| {
            let mut extra = Row::new(&format!("{} vs aria2c", row.scenario), row.unit);
            extra.qnode = row.qnode.clone();
            extra.reference = aria;
            extra.reference_name = "aria2c".into();
            extra
        });
        rows.push(row);
        rows.extend(aria_row);
    }
    Ok(rows)
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let size = env_u64("QNODE_BENCH_SIZE", 1 << 30);
    let ns_size = env_u64("QNODE_BENCH_NS_SIZE", 256 << 20);
    let runs = env_u64("QNODE_BENCH_RUNS", 3) as usize;
    eprintln!(
        "qnode transfer benchmark: {runs} runs each; {} MiB loopback, {} MiB namespaces",
        size >> 20,
        ns_size >> 20
    );
    let only = std::env::var("QNODE_BENCH_ONLY").unwrap_or_default();
    let want = |group: &str| only.is_empty() || only.split(',').any(|g| g == group);
    let mut rows = Vec::new();
    if want("loopback") {
        eprintln!("loopback, one source…");
        rows.extend(loopback(size, runs)?);
    }
    if want("small") {
        eprintln!("small things…");
        rows.extend(small(runs)?);
    }
    if want("long") {
        eprintln!("long links (100 ms RTT relays)…");
        rows.extend(long_links(env_u64("QNODE_BENCH_LONG_SIZE", 1 << 30), runs)?);
    }
    if want("ns") && std::env::var("QNODE_BENCH_SKIP_NS").is_err() {
        eprintln!("namespaces…");
        rows.extend(namespaces(ns_size, runs)?);
    }
    print_table(&rows);
    Ok(())
}
