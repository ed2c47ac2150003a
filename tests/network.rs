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

/// Three hosts syncing a folder; p3's link is cut for 8 s while p1 and p3 each make a change
/// and both edit different lines of one note. p2 gets p1's change during the cut; once the link
/// is back every host ends with both changes and the note merged, identical everywhere.
#[test]
fn a_synced_folder_converges_after_a_peers_link_is_cut_and_restored() -> TestResult {
    if !netns::available("a_synced_folder_converges_after_a_peers_link_is_cut_and_restored") {
        return Ok(());
    }
    let tn = TestNet::new(3)?;
    let ids = ["p1", "p2", "p3"];
    let net = Net::on_hosts(&ids, &tn)?;
    let note: String = (0..20).map(|i| format!("line {i}\n")).collect();
    let notes = |id: &str| net.served(id).join("notes");
    for id in ids {
        std::fs::create_dir_all(notes(id))?;
        std::fs::write(notes(id).join("shared.txt"), &note)?;
    }
    let args = ["sync", "--folder", "notes", "--rescan", "5"];
    let _syncs: Vec<_> = (ids.iter())
        .map(|id| net.start(id, &args))
        .collect::<anyhow::Result<_>>()?;
    let holds = |id: &str, rel: &str, want: &[u8]| -> TestResult {
        let at = notes(id).join(rel);
        util::poll(WAIT, || {
            Ok((std::fs::read(&at).ok().as_deref() == Some(want)).then_some(()))
        })
        .map_err(|e| anyhow::anyhow!("{id}: {rel} never held {want:?}: {e}"))
    };
    // Everyone indexed the same note first (identical content: one version, no conflict).
    std::thread::sleep(Duration::from_secs(2));
    tn.link(3, false)?;
    std::fs::write(notes("p1").join("from-p1.txt"), "one")?;
    std::fs::write(notes("p3").join("from-p3.txt"), "three")?;
    let edit = |from: &str, to: &str| note.replacen(from, to, 1);
    std::fs::write(
        notes("p1").join("shared.txt"),
        edit("line 2\n", "line 2, p1\n"),
    )?;
    std::fs::write(
        notes("p3").join("shared.txt"),
        edit("line 17\n", "line 17, p3\n"),
    )?;
    holds("p2", "from-p1.txt", b"one")?;
    std::thread::sleep(Duration::from_secs(8));
    tn.link(3, true)?;
    let merged = edit("line 2\n", "line 2, p1\n").replacen("line 17\n", "line 17, p3\n", 1);
    for id in ids {
        holds(id, "from-p1.txt", b"one")?;
        holds(id, "from-p3.txt", b"three")?;
        holds(id, "shared.txt", merged.as_bytes())?;
    }
    let files = |id: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(notes(id))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    };
    for id in ids {
        assert_eq!(
            files(id),
            ["from-p1.txt", "from-p3.txt", "shared.txt"],
            "{id}"
        );
    }
    Ok(())
}
