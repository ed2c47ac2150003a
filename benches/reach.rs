//! Reach: two hosts in network namespaces on a bridge, links at `QNODE_BENCH_REACH_RATE`
//! (default 100 Mbit/s) both ways (`tests/util/netns.rs`; tc here has no netem, so no added
//! delay).
//!
//! 1. Time to the first byte: `download` of a 1 KiB file (which ends with its first chunk) from
//!    a peer listed at its address, and from the same peer listed as `auto` (found by mDNS).
//! 2. A peer added to `peer_settings.txt` while a server runs: seconds from the edit until that
//!    peer's `list` of the server succeeds (polled every 20 ms).
//!
//! Median (min–max) of `QNODE_BENCH_RUNS` (default 5). `cargo bench --bench reach` (root, `ip`,
//! `tc`; skipped with a note otherwise).

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;

mod util;
use util::{Root, env_u64, median, stop};

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/util/netns.rs"]
mod netns;

/// Writes `text` as the table: beside, then renamed into place.
fn table(root: &Root, text: &str) -> anyhow::Result<()> {
    let path = root.path().join("peer_settings.txt");
    std::fs::write(path.with_extension("new"), text)?;
    std::fs::rename(path.with_extension("new"), path)?;
    Ok(())
}

/// Seconds of one `download tiny.txt p2` by p1 in host 1.
fn first_byte(root: &Root, net: &netns::TestNet) -> anyhow::Result<f64> {
    Ok(root
        .download(Some(net.ns(1)), "p1", "tiny.txt", &["p2"])?
        .wall)
}

fn start(root: &Root, net: &netns::TestNet, args: &[&str]) -> anyhow::Result<Child> {
    Ok(root
        .cmd(Some(net.ns(2)), "p2", args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !netns::have("tc") {
        println!("reach benchmark skipped: needs root, ip and tc");
        return Ok(());
    }
    let runs = env_u64("QNODE_BENCH_RUNS", 5).max(1) as usize;
    let rate = std::env::var("QNODE_BENCH_REACH_RATE").unwrap_or_else(|_| "100mbit".into());
    let net = netns::TestNet::new(2)?;
    for i in 1..=2 {
        net.shape(i, &rate, "64kb")?;
        net.shape_in(i, &rate, "64kb")?;
    }
    let listed = format!(
        "p1 {} 47800\np2 {} 47800\np3 {} 47801\n",
        net.ip(1),
        net.ip(2),
        net.ip(1)
    );
    let peers = [
        ("p1", format!("{} 47800", net.ip(1))),
        ("p2", format!("{} 47800", net.ip(2))),
        ("p3", format!("{} 47801", net.ip(1))),
    ];
    let peers: Vec<(&str, String)> = peers.iter().map(|(a, b)| (*a, b.clone())).collect();
    let root = Root::new(&peers)?;
    std::fs::write(root.served("p2").join("tiny.txt"), vec![b'x'; 1024])?;
    println!("qnode reach: 2 hosts on a {rate} bridge; median (min–max) of {runs}");

    // 1. Listed at its address, then as `auto`.
    let mut children = vec![root.serve(Some(net.ns(2)), "p2", &[], ("p1", Some(net.ns(1))))?];
    let mut direct: Vec<f64> = (0..runs)
        .map(|_| first_byte(&root, &net))
        .collect::<anyhow::Result<_>>()?;
    stop(&mut children);
    table(&root, "p1 auto\np2 auto\np3 auto\n")?;
    children.push(start(&root, &net, &["serve"])?);
    std::thread::sleep(Duration::from_secs(1));
    let mut lan: Vec<f64> = (0..runs)
        .map(|_| first_byte(&root, &net))
        .collect::<anyhow::Result<_>>()?;
    stop(&mut children);

    // 2. p3 added while p1 serves.
    let without = listed
        .lines()
        .filter(|l| !l.starts_with("p3"))
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    table(&root, &without)?;
    let mut p1 = root
        .cmd(Some(net.ns(1)), "p1", &["serve"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(1));
    let mut added = Vec::new();
    for _ in 0..runs {
        table(&root, &without)?;
        std::thread::sleep(Duration::from_secs(2));
        table(&root, &listed)?;
        let edited = Instant::now();
        loop {
            let ok = root
                .cmd(Some(net.ns(1)), "p3", &["list", "p1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if ok.success() {
                break;
            }
            if edited.elapsed() > Duration::from_secs(30) {
                bail!("p3 not served 30 s after it was added");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        added.push(edited.elapsed().as_secs_f64());
    }
    let _ = p1.kill();
    let _ = p1.wait();

    let (d, dlo, dhi) = median(&mut direct);
    let (l, llo, lhi) = median(&mut lan);
    let (a, alo, ahi) = median(&mut added);
    println!();
    println!("| what | seconds |");
    println!("|---|---|");
    println!("| first byte, peer listed at its address | {d:.3} ({dlo:.3}–{dhi:.3}) |");
    println!("| first byte, peer listed as `auto` (mDNS) | {l:.3} ({llo:.3}–{lhi:.3}) |");
    println!("| a peer added to the table: served after | {a:.2} ({alo:.2}–{ahi:.2}) |");
    Ok(())
}
