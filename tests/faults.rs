//! Faults that must cost time, never data: a server stopped mid-transfer, a full disk.

mod util;

use std::time::Duration;

use util::{Net, Out, TestResult, leftovers, random_bytes, shares};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn sigterm_during_transfers_ends_cleanly_and_the_download_moves_on() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3", "p4"])?;
    let data = random_bytes(4 << 20, 21);
    let mut servers = net.seed(
        &["p1", "p2", "p3"],
        "f.bin",
        &data,
        &["--max-upload-rate", "1M"],
    )?;
    let download = net.spawn("p4", &["download", "f.bin", "--json"])?;
    servers[2].wait_for_log_count("read_chunk f.bin", 2, WAIT)?;
    servers[2].signal(libc::SIGTERM);
    let status = servers[2].wait_exit(Duration::from_secs(15))?;
    assert!(
        status.success(),
        "server exit status {status}:\n{}",
        servers[2].log()
    );
    assert!(servers[2].log().contains("stopped"));

    let out = Out::of(download)?;
    assert!(out.success(), "{out}");
    assert!(std::fs::read(net.served("p4").join("f.bin"))? == data);
    let json = out.json()?;
    assert_eq!(
        shares(&json, &["p1", "p2", "p3"]),
        data.len() as u64,
        "{json}"
    );
    Ok(())
}

#[test]
fn a_full_disk_fails_cleanly_and_the_peer_keeps_serving() -> TestResult {
    if !util::is_root(
        "a_full_disk_fails_cleanly_and_the_peer_keeps_serving",
        "to mount a tmpfs",
    ) {
        return Ok(());
    }
    let net = Net::new(&["p1", "p2"])?;
    let _tmpfs = util::Tmpfs::mount(&net.served("p2"), "1m")?;
    let big = random_bytes(3 << 20, 22);
    net.put("p1", "big.bin", &big)?;
    let _p1 = net.serve("p1", &[])?;

    // A download that does not fit.
    let out = net.fails("p2", &["download", "big.bin", "p1"])?;
    assert!(out.stderr().contains("no space left"), "{out}");
    assert_eq!(out.stderr().lines().count(), 1, "{out}");
    assert_eq!(
        std::fs::read_dir(net.served("p2"))?.count(),
        0,
        "nothing left behind"
    );

    // An upload that does not fit, to a serving peer.
    let _p2 = net.serve("p2", &[])?;
    let out = net.fails("p1", &["upload", "big.bin", "p2", "--json"])?;
    let json = out.json()?;
    assert!(
        json["results"][0]["error"]
            .as_str()
            .unwrap()
            .contains("no space left"),
        "{json}"
    );
    assert!(leftovers(&net.served("p2")).is_empty());
    assert_eq!(std::fs::read_dir(net.served("p2"))?.count(), 0);

    // The peer keeps serving, and what fits still lands.
    net.put("p1", "small.txt", b"fits")?;
    net.ok("p1", &["upload", "small.txt", "p2"])?;
    let json = net.json("p1", &["list", "p2", "--json"])?;
    assert_eq!(json["peers"][0]["files"][0]["name"], "small.txt");
    Ok(())
}

#[test]
fn twenty_downloaders_at_once_then_two_hundred_in_a_row_with_flat_seeder_memory() -> TestResult {
    let downloaders: Vec<String> = (1..=20).map(|i| format!("d{i}")).collect();
    let mut ids = vec!["p1", "p2", "p3"];
    ids.extend(downloaders.iter().map(String::as_str));
    let net = Net::new(&ids)?;
    let data = random_bytes(2 << 20, 41);
    let servers = net.seed(&["p1", "p2", "p3"], "f.bin", &data, &[])?;

    let running: Vec<_> = downloaders
        .iter()
        .map(|d| net.spawn(d, &["download", "f.bin", "p1", "p2", "p3"]))
        .collect::<Result<_, _>>()?;
    for spawned in running {
        let out = Out::of(spawned)?;
        assert!(out.success(), "{out}");
    }
    for d in &downloaders {
        assert!(std::fs::read(net.served(d).join("f.bin"))? == data, "{d}");
    }

    let small = random_bytes(64 << 10, 42);
    net.put("p1", "small.bin", &small)?;
    let start = util::proc_status_kib(servers[0].pid(), "VmRSS");
    let out_path = net.root().join("again.bin");
    for i in 0..200 {
        let _ = std::fs::remove_file(&out_path);
        let out = net.run(
            "d1",
            &[
                "download",
                "small.bin",
                "p1",
                "--output",
                out_path.to_str().unwrap(),
            ],
        )?;
        assert!(out.success(), "download {i}: {out}");
    }
    assert!(std::fs::read(&out_path)? == small);
    let end = util::proc_status_kib(servers[0].pid(), "VmRSS");
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "seeder p1 resident memory: {} KiB after 20 concurrent downloads, {} KiB after 200 more",
        start,
        end
    );
    assert!(
        end < start + 16 * 1024,
        "seeder memory grew from {start} KiB to {end} KiB"
    );
    Ok(())
}

/// p1 (slow) and p2 serve a file to p3; once p2 has served two chunks, `stop` takes it down and it
/// is started again, and must be asked for chunks again within `back_within`. Returns the
/// download's JSON, after checking the download succeeded byte for byte.
fn seeder_goes_down_and_comes_back(
    seed: u64,
    stop: impl FnOnce(&mut util::Server) -> TestResult,
    back_within: Duration,
) -> anyhow::Result<serde_json::Value> {
    let net = Net::new(&["p1", "p2", "p3"])?;
    // p1 is slow (256 KiB/s: alone it would need about a minute), so the download is certainly
    // still running when p2 is back, however long its restart and the retry backoff take.
    let data = random_bytes(12 << 20, seed);
    net.put("p1", "f.bin", &data)?;
    net.put("p2", "f.bin", &data)?;
    let _p1 = net.serve("p1", &["--max-upload-rate", "256K"])?;
    let mut p2 = net.serve("p2", &["--max-upload-rate", "1M"])?;
    let download = net.spawn("p3", &["download", "f.bin", "--json"])?;
    p2.wait_for_log_count("read_chunk f.bin", 2, WAIT)?;
    stop(&mut p2)?;
    let again = net.serve("p2", &["--max-upload-rate", "1M"])?;
    again.wait_for_log("read_chunk f.bin", back_within)?;
    let out = Out::of(download)?;
    assert!(out.success(), "{out}");
    assert!(std::fs::read(net.served("p3").join("f.bin"))? == data);
    out.json()
}

#[test]
fn a_seeder_restarted_mid_download_is_reconnected_and_used_again() -> TestResult {
    // A restart: SIGTERM (connections closed with "shutting down"), then serve again.
    let sigterm = |p2: &mut util::Server| {
        p2.signal(libc::SIGTERM);
        assert!(p2.wait_exit(Duration::from_secs(15))?.success());
        Ok(())
    };
    let json = seeder_goes_down_and_comes_back(61, sigterm, WAIT)?;
    let p2 = json["faults"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["peer"] == "p2"))
        .cloned()
        .unwrap_or_default();
    assert!(p2["reconnects"].as_u64().unwrap_or(0) >= 1, "{json}");
    assert!(p2.get("dropped").is_none(), "{json}");
    Ok(())
}

#[test]
fn a_seeder_killed_and_restarted_resets_old_connections_and_is_used_again() -> TestResult {
    // A crash: no goodbye to anyone. The restarted process has the same identity, so the same
    // stateless-reset key: it resets the old connection when the downloader next sends on it (a
    // keep-alive within 5 s), and the downloader reconnects. Without that, the downloader would
    // only notice at the 30 s idle timeout; the bound is half of that.
    let sigkill = |p2: &mut util::Server| {
        p2.kill();
        Ok(())
    };
    seeder_goes_down_and_comes_back(62, sigkill, Duration::from_secs(15))?;
    Ok(())
}
