//! The attacks of hardening II against a real `qnode serve`, with the figures each is judged by:
//! the server's peak memory, its CPU, and what a well-behaved peer gets meanwhile.
//!
//! `cargo bench --bench attacks` runs this build's binary; `QNODE_BENCH_BIN=path` another (for
//! A/B against an older build). `QNODE_BENCH_ONLY` picks a comma list of `stalled`, `groups`,
//! `idle`, `update`, `lockout` (the last needs root, for a tmpfs). Each prints one line.

use std::time::{Duration, Instant};

use qnode::model::manifest::FilePath;
use qnode::wire::protocol::{self, MAX_RESPONSE_LEN, Request, Response, encode_frame};

// The tests' harness and hostile peer.
#[path = "../tests/util/mod.rs"]
mod util;
use util::Net;
use util::peer::*;

/// One case of the benchmark, run on its own.
type BoxCase = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>>>>;
type Case = (&'static str, fn() -> BoxCase);

fn wanted(case: &str) -> bool {
    std::env::var("QNODE_BENCH_ONLY").map_or(true, |only| only.split(',').any(|c| c == case))
}

/// Runs `qnode --peer id args` to its end, off the async workers: (success, seconds).
async fn timed(net: &Net, id: &str, args: &[&str]) -> anyhow::Result<(bool, f64)> {
    let mut cmd = net.cmd(id, args);
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    Ok((out.status.success(), started.elapsed().as_secs_f64()))
}

/// 8 connections (a peer's limit) × 256 `ObservePieces` of a 1 GiB file, never read.
async fn stalled() -> anyhow::Result<()> {
    let net = Net::new(&["p1", "p2", "p3"])?;
    std::fs::File::create(net.served("p1").join("big.bin"))?.set_len(1 << 30)?;
    net.put("p1", "ok.txt", b"fine")?;
    let server = net.serve("p1", &[])?;
    let (mut held, mut conns, mut refused) = (Vec::new(), Vec::new(), 0);
    for _ in 0..8 {
        // An overwhelmed server may not even take the connection.
        let Ok((ep, conn)) = connect_with(&net, "p2", "p1", Some(stingy())).await else {
            refused += 1;
            continue;
        };
        for _ in 0..256 {
            match ask(&conn, &observe_pieces("big.bin")).await {
                Ok(stream) => held.push(stream),
                Err(_) => break,
            }
        }
        conns.push((conn, ep));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (listed, secs) = timed(&net, "p3", &["list", "p1"]).await?;
    let rss = util::proc_status_kib(server.pid(), "VmHWM") / 1024;
    println!(
        "stalled  8 x 256 unread ObservePieces, 1 GiB ({} sent, {refused} connections refused or timed out): server peak RSS {rss} MiB; a good peer's list {} in {secs:.2} s",
        held.len(),
        if listed { "answered" } else { "FAILED" }
    );
    drop((held, conns));
    Ok(())
}

/// A flood of `Groups` over both protocol versions on a 1 GiB file, and a good 200 MiB
/// download before and during it.
async fn groups() -> anyhow::Result<()> {
    let net = Net::new(&["p1", "p2", "p3"])?;
    std::fs::File::create(net.served("p1").join("big.bin"))?.set_len(1 << 30)?;
    net.put("p1", "good.bin", &util::random_bytes(200 << 20, 7))?;
    let server = net.serve("p1", &[])?;
    let fetch = ["download", "good.bin", "p1"];
    let (ok, alone) = timed(&net, "p3", &fetch).await?;
    anyhow::ensure!(ok, "the unloaded download failed");
    std::fs::remove_file(net.served("p3").join("good.bin"))?;
    let version = zeros_manifest(1 << 30)?.blake3();
    let (_e2, v2) = connect(&net, "p2", "p1").await?;
    let (_e1, v1) = connect_speaking(&net, "p2", "p1", None, &[protocol::ALPN]).await?;
    let before = cpu_seconds(server.pid());
    let mut flood = Vec::new();
    for i in 0..256 {
        let conn = if i % 2 == 0 { v2.clone() } else { v1.clone() };
        let frame = groups_request("big.bin", version);
        flood.push(tokio::spawn(async move { raw(&conn, &frame).await }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fetched, threads) = peak_threads(server.pid(), timed(&net, "p3", &fetch)).await;
    let (ok, loaded) = fetched?;
    for f in flood {
        let _ = f.await;
    }
    let cpu = cpu_seconds(server.pid()) - before;
    println!(
        "groups   256 Groups of 1 GiB over qnode/1 and qnode/2: a good 200 MiB download {} in {loaded:.2} s against {alone:.2} s unloaded ({:.1}x); server {threads} threads at most, {cpu:.1} CPU s",
        if ok { "done" } else { "FAILED" },
        loaded / alone
    );
    Ok(())
}

/// 2,048 observers (32 peers × 64) of a 1 GiB download in progress, reading their first
/// answer, then idle: the server's CPU while nothing happens.
async fn idle() -> anyhow::Result<()> {
    let (net, ids, server) = observed_partial()?;
    let (mut observers, mut conns, mut open) = (Vec::new(), Vec::new(), 0);
    for id in &ids[1..] {
        let (ep, conn) = connect(&net, id, "p1").await?;
        for _ in 0..64 {
            let (send, mut recv) = ask(&conn, &observe_pieces("big.bin")).await?;
            if let Ok(Response::HoldingPieces { held: Some(_), .. }) =
                protocol::read_msg(&mut recv, MAX_RESPONSE_LEN).await
            {
                open += 1;
            }
            observers.push((send, recv));
        }
        conns.push((conn, ep));
    }
    let rss = util::proc_status_kib(server.pid(), "VmHWM") / 1024;
    let before = cpu_seconds(server.pid());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cores = (cpu_seconds(server.pid()) - before) / 5.0;
    println!(
        "idle     {open} observers of a 1 GiB download in progress, idle: server {cores:.3} cores, peak RSS {rss} MiB"
    );
    drop((observers, conns));
    Ok(())
}

/// `download --update` of a 64 MiB text file with one line changed: from an honest peer, and
/// from a peer whose tree is 1.29 M signatures that add up to the file and whose leaves are
/// empty (it serves the file's bytes honestly).
async fn update() -> anyhow::Result<()> {
    let net = Net::new(&["p1", "p2", "p3", "p4"])?;
    let new = util::text::text(64 << 20, 9);
    let mut old = new.clone();
    old[30_000_000..30_000_010].copy_from_slice(b"OLD  LINE\n");
    net.put("p1", "f.txt", &new)?;
    let _honest = net.serve("p1", &[])?;
    net.put("p2", "f.txt", &old)?;
    let (ok, honest) = timed(&net, "p2", &["download", "f.txt", "p1", "--update"]).await?;
    anyhow::ensure!(ok, "the honest update failed");
    net.put("p3", "f.txt", &old)?;
    // Lengths that add up to the file: 1 byte each but the last.
    let (count, size) = (1_290_000u32, new.len() as u64);
    let sig = |len| qnode::model::delta::Sig { hash: [3; 8], len };
    let mut lie = vec![sig(1); count as usize - 1];
    lie.push(sig((size - u64::from(count) + 1) as u32));
    let (liar, leaves) = update_liar(&net, ("p4", "p3"), bytes::Bytes::from(new), lie)?;
    let args = ["download", "f.txt", "p4", "--update", "--json"];
    let mut cmd = net.cmd("p3", &args);
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    let lying = started.elapsed().as_secs_f64();
    liar.abort();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let named = json["faults"].as_array().is_some_and(|f| {
        f.iter()
            .any(|f| f["peer"] == "p4" && f["dropped"].is_string())
    });
    println!(
        "update   64 MiB, one line changed: {lying:.2} s from a liar ({} Leaves asked, liar {}) against {honest:.2} s honest ({:.1}x)",
        leaves.load(std::sync::atomic::Ordering::Relaxed),
        if named { "named" } else { "NOT named" },
        lying / honest
    );
    Ok(())
}

/// One peer announces all the disk that may be promised and trickles; another uploads 6 bytes.
async fn lockout() -> anyhow::Result<()> {
    if !util::is_root("lockout", "to mount a tmpfs") {
        return Ok(());
    }
    let net = Net::new(&["p1", "p2", "p3"])?;
    let _tmpfs = util::Tmpfs::mount(&net.served("p1"), "64m")?;
    let _server = net.serve("p1", &[])?;
    let (_ep, conn) = connect(&net, "p2", "p1").await?;
    let path = std::ffi::CString::new(net.served("p1").as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs only writes the struct it is given; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    anyhow::ensure!(unsafe { libc::statvfs(path.as_ptr(), &mut st) } == 0);
    let usable = st.f_bavail * st.f_frsize - st.f_blocks * st.f_frsize / 100 * 5;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hog = encode_frame(&Request::Upload {
        name: FilePath::new("hog.bin")?,
        size: usable,
        blake3: [0; 32],
    })?;
    send.write_all(&hog).await?;
    let ready: Response = protocol::read_msg(&mut recv, MAX_RESPONSE_LEN).await?;
    anyhow::ensure!(
        ready == Response::Ready,
        "the hog was not admitted: {ready:?}"
    );
    send.write_all(b"x").await?;
    net.put("p3", "small.txt", b"six b\n")?;
    let (stored, _) = timed(&net, "p3", &["upload", "small.txt", "p1"]).await?;
    println!(
        "lockout  p2 announces {} MiB of a 64 MiB disk and trickles: p3's 6-byte upload {}",
        usable >> 20,
        if stored { "stored" } else { "REFUSED" }
    );
    drop((send, recv));
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if let Ok(bin) = std::env::var("QNODE_BENCH_BIN") {
        // SAFETY: set before any thread of ours reads the environment.
        unsafe { std::env::set_var("QNODE_TEST_BIN", bin) };
    }
    println!("binary: {}", util::qnode_bin());
    // Each case on its own: one that an older build cannot withstand is reported, and the
    // others still run.
    let cases: [Case; 5] = [
        ("stalled", || Box::pin(stalled())),
        ("groups", || Box::pin(groups())),
        ("idle", || Box::pin(idle())),
        ("update", || Box::pin(update())),
        ("lockout", || Box::pin(lockout())),
    ];
    for (case, run) in cases.into_iter().filter(|(c, _)| wanted(c)) {
        if let Err(e) = run().await {
            println!("{case:<8} failed: {e:#}");
        }
    }
    Ok(())
}
