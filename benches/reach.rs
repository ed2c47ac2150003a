//! Reach: hosts in network namespaces on a bridge, links at `QNODE_BENCH_REACH_RATE` (default
//! 100 Mbit/s) both ways, and `QNODE_BENCH_REACH_RTT_MS` (default 20) between any two hosts on
//! the bridge: each host's link holds every frame a quarter of it each way (tc here has no
//! netem: `TestNet::delay` carries the frames through this process, `tests/util/netns.rs`).
//!
//! 1. Time to the first byte: `download` of a 1 KiB file (which ends with its first chunk) from
//!    a peer listed at its address, and from the same peer listed as `auto` (found by mDNS).
//! 2. A peer added to `peer_settings.txt` while a server runs: seconds from the edit until that
//!    peer's `list` of the server succeeds (polled every 20 ms).
//! 3. Across NATs: p4 and p5 each behind a router (nftables masquerade; its own link at the
//!    rate), p1 on the bridge. With ports kept (endpoint-independent mappings) p4 reaches p5
//!    punched; with a random port per destination (symmetric) p1 relays. First byte (a 1 KiB
//!    file) and the throughput of a `QNODE_BENCH_REACH_SIZE` file (default 256 MiB) from p5,
//!    punched and relayed, against the same download by p4 from p1 (listed at its address:
//!    direct); the relay's CPU per GiB carried. The relay's reference: the same download from p6
//!    (host 4, on the bridge), listed at p1's address where p1's kernel forwards to it: the
//!    same links, no relay process.
//!
//! Median (min–max) of `QNODE_BENCH_RUNS` (default 5). `cargo bench --bench reach` (root, `ip`,
//! `tc`; skipped with a note otherwise).

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;

mod util;
use util::{Root, cpu_ticks, env_u64, median, stop};

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
    let one_way = Duration::from_micros(env_u64("QNODE_BENCH_REACH_RTT_MS", 20) * 250);
    let mut net = netns::TestNet::new(2)?;
    for i in 1..=2 {
        net.shape(i, &rate, "64kb")?;
        net.shape_in(i, &rate, "64kb")?;
        net.delay(i, one_way)?;
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
    println!(
        "qnode reach: hosts on a {rate} bridge, {:.0} ms apart (RTT); median (min–max) of {runs}",
        one_way.as_secs_f64() * 4e3
    );

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

    drop(net);
    let size = env_u64("QNODE_BENCH_REACH_SIZE", 256 << 20);
    let punched = across_nats(false, &rate, one_way, runs, size)?;
    let relayed = across_nats(true, &rate, one_way, runs, size)?;

    let (d, dlo, dhi) = median(&mut direct);
    let (l, llo, lhi) = median(&mut lan);
    let (a, alo, ahi) = median(&mut added);
    println!();
    println!("| what | seconds |");
    println!("|---|---|");
    println!("| first byte, peer listed at its address | {d:.3} ({dlo:.3}–{dhi:.3}) |");
    println!("| first byte, peer listed as `auto` (mDNS) | {l:.3} ({llo:.3}–{lhi:.3}) |");
    println!("| a peer added to the table: served after | {a:.2} ({alo:.2}–{ahi:.2}) |");
    println!();
    println!(
        "| across NATs | first byte: direct | reached | {} MiB: direct | reached | ratio | relay CPU·s/GiB |",
        size >> 20
    );
    println!("|---|---|---|---|---|---|---|");
    let (reference, relayed_bulk) = (relayed.forwarded, relayed.bulk_reached);
    for (name, mut f) in [("punched", punched), ("relayed", relayed)] {
        let (fd, _, _) = median(&mut f.first_direct);
        let (fr, _, _) = median(&mut f.first_reached);
        let mb = |s: f64| size as f64 / 1e6 / s;
        println!(
            "| {name} | {fd:.3} s | {fr:.3} s | {:.1} MB/s | {:.1} MB/s | {:.2} | {} |",
            mb(f.bulk_direct),
            mb(f.bulk_reached),
            f.bulk_direct / f.bulk_reached,
            f.relay_cpu_per_gib
                .map_or_else(|| "–".to_owned(), |c| format!("{c:.2}"))
        );
    }
    if let Some(k) = reference {
        println!();
        println!(
            "the same {} MiB forwarded by p1's kernel over the relay's links: {:.1} MB/s (relayed / forwarded: {:.2})",
            size >> 20,
            size as f64 / 1e6 / k,
            k / relayed_bulk
        );
    }
    Ok(())
}

/// What one NAT topology measured.
struct Across {
    first_direct: Vec<f64>,
    first_reached: Vec<f64>,
    bulk_direct: f64,
    bulk_reached: f64,
    relay_cpu_per_gib: Option<f64>,
    /// Seconds of the same download forwarded by p1's kernel instead of relayed.
    forwarded: Option<f64>,
}

/// p1 on the bridge, p4 and p5 behind routers (`symmetric`: a random port per destination);
/// every link at `rate`, each link to the bridge holding frames `one_way`.
fn across_nats(
    symmetric: bool,
    rate: &str,
    one_way: Duration,
    runs: usize,
    size: u64,
) -> anyhow::Result<Across> {
    let mut net = netns::TestNet::new(4)?;
    let behind4 = net.behind_nat(2, symmetric)?;
    let behind5 = net.behind_nat(3, symmetric)?;
    for i in 1..=4 {
        net.shape(i, rate, "64kb")?;
        net.shape_in(i, rate, "64kb")?;
        net.delay(i, one_way)?;
    }
    let peers = [
        ("p1", format!("{} 47900", net.ip(1))),
        ("p4", "127.0.0.1 1".to_owned()),
        ("p5", "127.0.0.1 2".to_owned()),
        ("p6", "127.0.0.1 3".to_owned()),
    ];
    let peers: Vec<(&str, String)> = peers.iter().map(|(a, b)| (*a, b.clone())).collect();
    let root = Root::new(&peers)?;
    // p6 (host 4, on the bridge) is listed at p1's address, where p1's kernel forwards to it.
    table(
        &root,
        &format!(
            "p1 {ip1} 47900\np4 auto\np5 auto\np6 {ip1} {FORWARDED}\n",
            ip1 = net.ip(1)
        ),
    )?;
    for id in ["p1", "p5", "p6"] {
        std::fs::write(root.served(id).join("tiny.txt"), vec![b'x'; 1024])?;
        util::random_file(&root.served(id).join("big.bin"), size)?;
    }
    let mut children = vec![root.serve(Some(net.ns(1)), "p1", &[], ("p4", Some(&behind4)))?];
    children.push(
        root.cmd(Some(&behind5), "p5", &["serve"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    // p5 has dialled p1 (its introducer) once p1 can introduce p4 to it.
    std::thread::sleep(Duration::from_secs(3));
    let from = |peer: &str, name: &str| -> anyhow::Result<f64> {
        Ok(root.download(Some(&behind4), "p4", name, &[peer])?.wall)
    };
    let first_direct = (0..runs)
        .map(|_| from("p1", "tiny.txt"))
        .collect::<anyhow::Result<_>>()?;
    let first_reached = (0..runs)
        .map(|_| from("p5", "tiny.txt"))
        .collect::<anyhow::Result<_>>()?;
    let bulk_direct = from("p1", "big.bin")?;
    let relay = children[0].id();
    let before = cpu_ticks(relay);
    let bulk_reached = from("p5", "big.bin")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = (cpu_ticks(relay) - before) as f64 / hz;
    let forwarded = match symmetric {
        true => {
            // The relay's reference: the same links a relayed datagram crosses, no relay.
            net.forward_udp(1, FORWARDED, 4)?;
            children.push(root.serve(Some(net.ns(4)), "p6", &[], ("p4", Some(&behind4)))?);
            Some(from("p6", "big.bin")?)
        }
        false => None,
    };
    stop(&mut children);
    Ok(Across {
        first_direct,
        first_reached,
        bulk_direct,
        bulk_reached,
        relay_cpu_per_gib: symmetric.then(|| cpu / (size as f64 / f64::from(1u32 << 30))),
        forwarded,
    })
}

/// The port on p1 where its kernel forwards to p6.
const FORWARDED: u16 = 47950;
