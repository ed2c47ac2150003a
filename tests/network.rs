//! Faults on a real (virtual) multi-host network: every peer in its own network namespace, with
//! rate-limited uplinks, random packet loss, and links that are cut and restored. Needs root and
//! ip, tc, nft, ethtool; otherwise each test prints SKIPPED and returns.

mod util;

use std::io::Write;
use std::time::Duration;

use util::netns::{self, TestNet};
use util::{Net, Out, TestResult, random_bytes, shares};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn download_survives_a_seeders_link_cut_for_10s_then_restored() -> TestResult {
    if !netns::available("download_survives_a_seeders_link_cut_for_10s_then_restored") {
        return Ok(());
    }
    let tn = TestNet::new(4)?;
    for host in 1..=3 {
        tn.limit(host, "4mbit")?;
    }
    let net = Net::on_hosts(&["s1", "s2", "s3", "d"], &tn)?;
    // 16 MiB at 2 x 0.5 MB/s outlasts the cut, so s3 comes back while the download still runs.
    let data = random_bytes(16 << 20, 31);
    let servers = net.seed(&["s1", "s2", "s3"], "f.bin", &data, &[])?;
    let download = net.spawn("d", &["download", "f.bin", "--json"])?;
    servers[2].wait_for_log_count("read_chunk f.bin", 2, WAIT)?;
    tn.link(3, false)?;
    // The fault itself: s3 is unreachable for 10 s, then back.
    std::thread::sleep(Duration::from_secs(10));
    tn.link(3, true)?;
    let out = Out::of(download)?;
    assert!(out.success(), "{out}");
    assert!(
        std::fs::read(net.served("d").join("f.bin"))? == data,
        "byte-identical"
    );
    let json = out.json()?;
    assert_eq!(
        shares(&json, &["s1", "s2", "s3"]),
        data.len() as u64,
        "{json}"
    );
    assert!(
        json["seconds"].as_f64().unwrap_or(0.0) > 10.0,
        "the link came back while the download still ran: {json}"
    );
    let _ = writeln!(
        std::io::stderr(),
        "link cut for 10 s: done in {:.1} s; shares {}",
        json["seconds"].as_f64().unwrap_or(0.0),
        json["peers"]
    );
    Ok(())
}

#[test]
fn download_completes_with_2pct_loss_on_every_link() -> TestResult {
    if !netns::available("download_completes_with_2pct_loss_on_every_link") {
        return Ok(());
    }
    let tn = TestNet::new(4)?;
    for host in 1..=4 {
        tn.loss(host, 2)?;
    }
    for host in 1..=3 {
        tn.limit(host, "40mbit")?;
    }
    let net = Net::on_hosts(&["s1", "s2", "s3", "d"], &tn)?;
    let data = random_bytes(12 << 20, 32);
    let _servers = net.seed(&["s1", "s2", "s3"], "f.bin", &data, &[])?;
    let json = net.json("d", &["download", "f.bin", "--json"])?;
    assert!(
        std::fs::read(net.served("d").join("f.bin"))? == data,
        "byte-identical"
    );
    let _ = writeln!(
        std::io::stderr(),
        "2% loss on every link, 3 x 40 Mbit/s: {} bytes in {:.2} s",
        json["size"],
        json["seconds"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}
