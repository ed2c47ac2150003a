//! Edits travel: `download --update` and `upload --replace` with the real binary, as separate
//! processes on real sockets.

mod util;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use util::text::text;
use util::{Net, TestResult, b3, random_bytes, share};

const WAIT: Duration = Duration::from_secs(30);

/// The versions kept in `dir`'s hidden displaced folder for `name`.
fn displaced(dir: &Path, name: &str) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir.join(".qnode-displaced")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}."))
        })
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect()
}

#[test]
fn an_edit_moves_about_what_changed_and_replaces_the_old_copy_atomically() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let old = text(4 << 20, 1);
    let mut new = old.clone();
    let mid = new.len() / 2;
    new.splice(mid..mid, b"a line inserted in the middle\n".iter().copied());
    net.put("p1", "notes.txt", &new)?;
    let ours = net.put("p2", "notes.txt", &old)?;
    let _p1 = net.serve("p1", &[])?;

    // Without --update: refused as before, and the message names --update.
    let out = net.fails("p2", &["download", "notes.txt", "p1"])?;
    assert!(out.stderr().contains("--update"), "{out}");
    assert_eq!(std::fs::read(&ours)?, old);

    let json = net.json("p2", &["download", "notes.txt", "p1", "--update", "--json"])?;
    assert_eq!(json["status"], "updated", "{json}");
    assert_eq!(std::fs::read(&ours)?, new);
    assert_eq!(json["blake3"], b3(&new));
    let fetched = share(&json, "p1");
    let reused = json["reused_bytes"].as_u64().unwrap_or(0);
    assert!(
        fetched < 64 * 1024,
        "fetched {fetched} of {}: {json}",
        new.len()
    );
    assert!(reused > new.len() as u64 * 9 / 10, "{json}");
    // The displaced version is kept, hidden, and never listed or served.
    assert_eq!(
        displaced(&net.served("p2"), "notes.txt"),
        std::slice::from_ref(&old)
    );
    let listed = net.json("p2", &["list", "p2", "--json"])?;
    assert_eq!(
        listed["peers"][0]["files"].as_array().map(Vec::len),
        Some(1)
    );

    // Again: nothing to do, our file untouched.
    let before = std::fs::metadata(&ours)?;
    let json = net.json("p2", &["download", "notes.txt", "p1", "--update", "--json"])?;
    assert_eq!(json["status"], "already_present", "{json}");
    let after = std::fs::metadata(&ours)?;
    assert_eq!((before.ino(), before.mtime()), (after.ino(), after.mtime()));

    // Human output says what was reused and fetched.
    let mut newer = new.clone();
    newer.extend_from_slice(b"one more line at the end\n");
    net.put("p1", "notes.txt", &newer)?;
    let out = net.ok("p2", &["download", "notes.txt", "p1", "--update"])?;
    assert!(
        out.stdout().contains("updated notes.txt") && out.stdout().contains("reused"),
        "{out}"
    );
    assert_eq!(std::fs::read(&ours)?, newer);
    Ok(())
}

#[test]
fn updates_of_every_shape_are_exact() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3"])?;
    let base = text(3 << 20, 2);
    let mut deleted = base.clone();
    deleted.drain(1_000_000..1_300_000);
    let mut appended = base.clone();
    appended.extend(text(1 << 20, 3));
    let mut scattered = base.clone();
    for k in 1..100 {
        scattered[k * 30_000] = b'#';
    }
    let mut binary = random_bytes(2 << 20, 4);
    let mut binary_new = binary.clone();
    binary_new.splice(700_000..700_100, random_bytes(5000, 5));
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("deleted.txt", base.clone(), deleted),
        ("appended.txt", base.clone(), appended),
        ("scattered.txt", base.clone(), scattered),
        ("emptied.txt", base.clone(), Vec::new()),
        ("grown.txt", Vec::new(), base.clone()),
        ("binary.bin", std::mem::take(&mut binary), binary_new),
    ];
    for (name, old, new) in &cases {
        net.put("p1", name, new)?;
        net.put("p3", name, new)?;
        net.put("p2", name, old)?;
    }
    let _p1 = net.serve("p1", &[])?;
    let _p3 = net.serve("p3", &[])?;
    for (name, old, new) in &cases {
        let json = net.json("p2", &["download", name, "--update", "--json"])?;
        assert_eq!(json["status"], "updated", "{name}: {json}");
        assert_eq!(&std::fs::read(net.served("p2").join(name))?, new, "{name}");
        assert_eq!(
            &displaced(&net.served("p2"), name),
            std::slice::from_ref(old),
            "{name}"
        );
        if *name == "scattered.txt" {
            // Many ranges: both peers served some.
            assert!(share(&json, "p1") > 0 && share(&json, "p3") > 0, "{json}");
            assert!(
                share(&json, "p1") + share(&json, "p3") < new.len() as u64 / 4,
                "{json}"
            );
        }
    }
    Ok(())
}

#[test]
fn a_killed_update_leaves_the_old_version_and_the_rerun_finishes() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let old = text(2 << 20, 6);
    let mut new = old.clone();
    new.extend(random_bytes(3 << 20, 7));
    net.put("p1", "big.txt", &new)?;
    let ours = net.put("p2", "big.txt", &old)?;
    let p1 = net.serve("p1", &["--max-upload-rate", "512K"])?;

    let mut child = net
        .cmd("p2", &["download", "big.txt", "p1", "--update"])
        .spawn()?;
    p1.wait_for_log_count("read_", 4, WAIT)?;
    child.kill()?;
    child.wait()?;
    assert_eq!(
        std::fs::read(&ours)?,
        old,
        "exactly the old version under the name"
    );

    let json = net.json("p2", &["download", "big.txt", "p1", "--update", "--json"])?;
    assert_eq!(json["status"], "updated", "{json}");
    assert_eq!(std::fs::read(&ours)?, new);
    // The rerun resumed: it fetched less than everything that differs.
    assert!(share(&json, "p1") < 3 << 20, "{json}");
    Ok(())
}

#[test]
fn a_local_edit_during_an_update_loses_neither_version() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let old = text(1 << 20, 8);
    let mut new = old.clone();
    new.extend(random_bytes(2 << 20, 9));
    net.put("p1", "doc.txt", &new)?;
    let ours = net.put("p2", "doc.txt", &old)?;
    let p1 = net.serve("p1", &["--max-upload-rate", "512K"])?;

    let update = net.spawn("p2", &["download", "doc.txt", "p1", "--update"])?;
    p1.wait_for_log_count("read_", 2, WAIT)?;
    // The user saves an edit meanwhile (as editors do: a new file renamed over the name).
    let edited = text(1 << 20, 10);
    let tmp = net.served("p2").join(".doc.txt.swp");
    std::fs::write(&tmp, &edited)?;
    std::fs::rename(&tmp, &ours)?;
    let out = util::Out::of(update)?;
    assert!(!out.success(), "{out}");
    assert!(out.stderr().contains("changed"), "{out}");
    assert_eq!(std::fs::read(&ours)?, edited, "the user's edit stays");
    assert!(displaced(&net.served("p2"), "doc.txt").is_empty());
    // The peers' version is not lost either: the rerun brings the edited copy up to date.
    let json = net.json("p2", &["download", "doc.txt", "p1", "--update", "--json"])?;
    assert_eq!(std::fs::read(&ours)?, new, "{json}");
    assert_eq!(displaced(&net.served("p2"), "doc.txt"), [edited]);
    Ok(())
}

#[test]
fn a_lying_peer_during_an_update_is_caught_per_chunk() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3"])?;
    let old = text(4 << 20, 11);
    let mut new = old.clone();
    for k in 1..40 {
        new[k * 100_000] = b'%';
    }
    net.put("p1", "f.txt", &new)?;
    net.put("p3", "f.txt", &new)?;
    let ours = net.put("p2", "f.txt", &old)?;
    let _p1 = net.serve("p1", &[])?;
    let p3 = net.serve("p3", &["--max-upload-rate", "256K"])?;
    let update = net.spawn("p2", &["download", "f.txt", "--update", "--json"])?;
    // After p3 told what it holds, its copy changes on disk (same size, other bytes).
    p3.wait_for_log("observe f.txt", WAIT)?;
    std::fs::write(net.served("p3").join("f.txt"), random_bytes(new.len(), 12))?;
    let out = util::Out::of(update)?;
    assert!(out.success(), "{out}");
    assert_eq!(std::fs::read(&ours)?, new, "only verified bytes");
    Ok(())
}

#[test]
fn peers_that_disagree_never_give_a_mixture() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3", "p4"])?;
    let old = text(2 << 20, 13);
    let (mut a, mut b) = (old.clone(), old.clone());
    a[500_000] = b'A';
    b[1_500_000] = b'B';
    net.put("p1", "v.txt", &a)?;
    net.put("p3", "v.txt", &a)?;
    net.put("p4", "v.txt", &b)?;
    let ours = net.put("p2", "v.txt", &old)?;
    let _s: Vec<_> = ["p1", "p3", "p4"]
        .iter()
        .map(|p| net.serve(p, &[]))
        .collect::<Result<_, _>>()?;
    let json = net.json("p2", &["download", "v.txt", "--update", "--json"])?;
    assert_eq!(
        std::fs::read(&ours)?,
        a,
        "the majority version, whole: {json}"
    );
    assert_eq!(share(&json, "p4"), 0);
    // Pinned to the other version: exactly that one.
    let json = net.json(
        "p2",
        &[
            "download",
            "v.txt",
            "--update",
            "--blake3",
            &b3(&b),
            "--json",
        ],
    )?;
    assert_eq!(std::fs::read(&ours)?, b, "{json}");
    Ok(())
}

#[test]
fn upload_replace_swaps_the_peers_version_and_keeps_the_old_one() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let old = text(4 << 20, 14);
    let mut new = old.clone();
    new.splice(2_000_000..2_000_000, b"inserted by p2\n".iter().copied());
    net.put("p1", "shared.txt", &old)?;
    let ours = net.put("p2", "shared.txt", &new)?;
    let p1 = net.serve("p1", &[])?;

    let out = net.fails("p2", &["upload", "shared.txt", "p1"])?;
    assert!(out.stderr().contains("--replace"), "{out}");
    assert_eq!(std::fs::read(net.served("p1").join("shared.txt"))?, old);

    let json = net.json("p2", &["upload", "shared.txt", "p1", "--replace", "--json"])?;
    assert_eq!(json["results"][0]["status"], "replaced", "{json}");
    assert_eq!(std::fs::read(net.served("p1").join("shared.txt"))?, new);
    // Only what p1 lacked crossed: its log says how many bytes it received.
    p1.wait_for_log("-> replaced", WAIT)?;
    let log = p1.log();
    let line = log
        .lines()
        .find(|l| l.contains("-> replaced"))
        .unwrap_or_default();
    let received: u64 = line
        .split(" received)")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(received < 64 * 1024, "{line}");
    assert_eq!(displaced(&net.served("p1"), "shared.txt"), [old]);
    let listed = net.json("p2", &["list", "p1", "--json"])?;
    assert_eq!(
        listed["peers"][0]["files"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(listed["peers"][0]["files"][0]["blake3"], b3(&new));
    // Ours again: already there.
    let json = net.json("p2", &["upload", "shared.txt", "p1", "--replace", "--json"])?;
    assert_eq!(json["results"][0]["status"], "already_present", "{json}");
    assert!(ours.exists());
    Ok(())
}

#[test]
fn replace_works_for_every_shape() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let base = text(1 << 20, 15);
    let mut cut = base.clone();
    cut.drain(100_000..400_000);
    let bin = random_bytes(1 << 20, 16);
    let mut bin_new = bin.clone();
    bin_new[500_000] ^= 1;
    let cases = [
        ("emptied.txt", base.clone(), Vec::new()),
        ("grown.txt", Vec::new(), base.clone()),
        ("cut.txt", base.clone(), cut),
        ("bin.bin", bin, bin_new),
    ];
    for (name, old, new) in &cases {
        net.put("p1", name, old)?;
        net.put("p2", name, new)?;
    }
    let _p1 = net.serve("p1", &[])?;
    for (name, old, new) in &cases {
        let json = net.json("p2", &["upload", name, "p1", "--replace", "--json"])?;
        assert_eq!(json["results"][0]["status"], "replaced", "{name}: {json}");
        assert_eq!(&std::fs::read(net.served("p1").join(name))?, new, "{name}");
        assert_eq!(
            &displaced(&net.served("p1"), name),
            std::slice::from_ref(old),
            "{name}"
        );
    }
    Ok(())
}
