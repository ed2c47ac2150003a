//! Swarming with real processes on 127.0.0.1: peers still downloading a file serve the chunks
//! they have verified. The seeder is held to `--max-upload-rate`, so that it is the bottleneck
//! and what the downloaders give each other is large and certain.

mod util;

use util::{Net, Out, TestResult, b3, random_bytes, share};

/// The bytes `json` (a `download --json` object) got from each of `peers`.
fn from(json: &serde_json::Value, peers: &[&str]) -> Vec<u64> {
    peers.iter().map(|p| share(json, p)).collect()
}

/// Four peers download one file from a seeder held to 1 MiB/s, all starting at once, each
/// serving while it downloads. Every copy is identical, every downloader got bytes from the
/// others, and the seeder sent far fewer than four copies: without swarming it sends four
/// (16 s at its rate); here about one.
#[test]
fn a_crowd_serves_itself_and_the_seeder_sends_about_one_copy() -> TestResult {
    let crowd = ["p2", "p3", "p4", "p5"];
    let net = Net::new(&["p1", "p2", "p3", "p4", "p5"])?;
    let data = random_bytes(4 << 20, 21);
    let _seeder = net.seed(&["p1"], "f.bin", &data, &["--max-upload-rate", "1M"])?;
    let _servers: Vec<_> = crowd
        .iter()
        .map(|p| net.serve(p, &[]))
        .collect::<Result<_, _>>()?;
    let downloads: Vec<_> = crowd
        .iter()
        .map(|p| net.spawn(p, &["download", "f.bin", "--json"]))
        .collect::<Result<_, _>>()?;
    let mut from_seeder = 0;
    for (p, d) in crowd.iter().zip(downloads) {
        let out = Out::of(d)?;
        assert!(out.success(), "{out}");
        assert_eq!(b3(&std::fs::read(net.served(p).join("f.bin"))?), b3(&data));
        let json = out.json()?;
        let others: Vec<&str> = crowd.iter().copied().filter(|o| o != p).collect();
        let given: u64 = from(&json, &others).iter().sum();
        assert!(
            given > 0,
            "{p} got nothing from the other downloaders: {json}"
        );
        assert_eq!(given + share(&json, "p1"), data.len() as u64, "{json}");
        from_seeder += share(&json, "p1");
        // Nobody was left out: the others joined once they had begun.
        assert_eq!(json["left_out"], serde_json::json!([]), "{json}");
    }
    assert!(
        from_seeder < 2 * data.len() as u64,
        "the seeder sent {from_seeder} bytes, {:.1} copies",
        from_seeder as f64 / data.len() as f64
    );
    // They passed on pieces (a quarter of a 256 KiB chunk), each as soon as it had it.
    for (p, server) in crowd.iter().zip(&_servers) {
        let log = server.log();
        assert!(
            log.contains("in pieces")
                && log.contains("read_version f.bin @")
                && log.contains(" +65536"),
            "{p} did not serve pieces: {log}"
        );
    }
    Ok(())
}

/// A downloader whose download and server are both killed half-way: the others finish with
/// identical copies, and its own download, run again, resumes from what it had verified.
#[test]
fn a_downloader_killed_midway_costs_the_others_nothing_and_resumes() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3", "p4"])?;
    let data = random_bytes(3 << 20, 22);
    let _seeder = net.seed(&["p1"], "f.bin", &data, &["--max-upload-rate", "1M"])?;
    let mut servers: Vec<_> = ["p2", "p3", "p4"]
        .iter()
        .map(|p| net.serve(p, &[]))
        .collect::<Result<_, _>>()?;
    let downloads: Vec<_> = ["p2", "p3", "p4"]
        .iter()
        .map(|p| net.spawn(p, &["download", "f.bin", "--json"]))
        .collect::<Result<_, _>>()?;
    let mut downloads = downloads.into_iter();
    let (p2, mut p3, p4) = (
        downloads.next().unwrap(),
        downloads.next().unwrap(),
        downloads.next().unwrap(),
    );
    net.wait_until_held("p3", "f.bin", 512 << 10)?;
    p3.1.kill()?;
    p3.1.wait()?;
    servers[1].kill();
    for (p, d) in [("p2", p2), ("p4", p4)] {
        let out = Out::of(d)?;
        assert!(out.success(), "{out}");
        assert_eq!(b3(&std::fs::read(net.served(p).join("f.bin"))?), b3(&data));
    }
    assert!(!net.served("p3").join("f.bin").exists());
    let json = net.json("p3", &["download", "f.bin", "--json"])?;
    assert!(
        json["resumed_bytes"].as_u64().unwrap() >= 512 << 10,
        "{json}"
    );
    assert_eq!(
        b3(&std::fs::read(net.served("p3").join("f.bin"))?),
        b3(&data)
    );
    Ok(())
}

/// An interrupted download whose temporary file is then damaged on disk: its peer lists it as
/// incomplete (never as a file), offers what it verified, and refuses the damaged chunk instead
/// of sending it; a downloader gets the file whole and exact, the damaged chunk from the seeder.
#[test]
fn a_damaged_partial_is_listed_as_incomplete_and_serves_nothing_bad() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3"])?;
    let data = random_bytes(2 << 20, 23);
    let chunk = 128 << 10; // 2 MiB has 16 chunks of 128 KiB
    let mut seeder = net.seed(&["p1"], "f.bin", &data, &["--max-upload-rate", "256K"])?;
    let (_, mut first) = net.spawn("p2", &["download", "f.bin", "p1"])?;
    net.wait_until_held("p2", "f.bin", 3 * chunk)?;
    first.kill()?;
    first.wait()?;

    // Its own listing of itself (it is not serving yet) shows the download in progress.
    let json = net.json("p2", &["list", "p2", "--json"])?;
    let peer = &json["peers"][0];
    assert_eq!(peer["files"], serde_json::json!([]), "{json}");
    let incomplete = &peer["incomplete"][0];
    assert_eq!(incomplete["name"], "f.bin", "{json}");
    assert_eq!(incomplete["blake3"], b3(&data), "{json}");
    let held = incomplete["held"].as_u64().unwrap();
    assert!(held >= 3 * chunk && held < data.len() as u64, "{json}");

    // Damage the second chunk it holds, on disk (its download from one seeder was in chunks).
    let part = std::fs::read_dir(net.served("p2"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "part"))
        .expect("a temporary file");
    let mut bytes = std::fs::read(&part)?;
    let whole = |c: &usize| {
        bytes[c * chunk as usize..(c + 1) * chunk as usize]
            == data[c * chunk as usize..(c + 1) * chunk as usize]
    };
    let second = (0..16).filter(whole).nth(1).expect("two chunks held");
    bytes[second * chunk as usize] ^= 0xff;
    std::fs::write(&part, &bytes)?;

    let p2 = net.serve("p2", &[])?;
    // The seeder is slow, so p3 asks p2 for everything p2 claims.
    seeder[0].kill();
    let _seeder = net.serve("p1", &["--max-upload-rate", "512K"])?;
    let json = net.json("p3", &["download", "f.bin", "--json"])?;
    assert_eq!(
        b3(&std::fs::read(net.served("p3").join("f.bin"))?),
        b3(&data)
    );
    assert!(
        share(&json, "p2") >= chunk,
        "p2 gave its good chunk: {json}"
    );
    let faults = json["faults"].as_array().unwrap();
    assert!(
        faults.iter().all(|f| f["corrupt_chunks"] == 0),
        "no corrupt chunk ever left p2: {json}"
    );
    assert!(
        p2.log().contains("fails its check; not serving it"),
        "{}",
        p2.log()
    );
    Ok(())
}

/// A peer still downloading version 2 of a name and a peer serving version 1 whole: a
/// download takes the whole version, never a mixture; asked for version 2 by its hash, it gets
/// exactly that, from the partial holder and a seeder of version 2.
#[test]
fn two_versions_in_a_crowd_never_mix() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3", "p4"])?;
    let v1 = random_bytes(1 << 20, 24);
    let v2 = random_bytes(1 << 20, 25);
    let _p1 = net.seed(&["p1"], "f.bin", &v1, &[])?;
    let mut p3 = net.seed(&["p3"], "f.bin", &v2, &["--max-upload-rate", "256K"])?;
    let (_, mut partial) = net.spawn("p2", &["download", "f.bin", "p3"])?;
    net.wait_until_held("p2", "f.bin", 256 << 10)?;
    partial.kill()?;
    partial.wait()?;
    // Only p1 holds a version whole now.
    p3[0].kill();
    let _p2 = net.serve("p2", &[])?;

    let json = net.json("p4", &["download", "f.bin", "--json"])?;
    assert_eq!(b3(&std::fs::read(net.served("p4").join("f.bin"))?), b3(&v1));
    assert_eq!(from(&json, &["p2", "p3"]), [0, 0], "{json}");
    let left = json["left_out"].to_string();
    assert!(
        left.contains("p2") && left.contains("different version"),
        "{json}"
    );

    std::fs::remove_file(net.served("p4").join("f.bin"))?;
    let _p3 = net.serve("p3", &["--max-upload-rate", "512K"])?;
    let out = net.ok("p4", &["download", "f.bin", "--blake3", &b3(&v2), "--json"])?;
    let json = out.json()?;
    assert_eq!(b3(&std::fs::read(net.served("p4").join("f.bin"))?), b3(&v2));
    assert!(
        share(&json, "p2") > 0,
        "the partial holder gave its part: {json}"
    );
    Ok(())
}

/// A crowd downloading a folder: its large file is swarmed as a single file is. Three peers
/// fetch `big/` from a seeder held to 1 MiB/s, each serving what it has verified of the file
/// to the others while it downloads.
#[test]
fn a_crowd_downloading_a_folder_swarms_its_large_files() -> TestResult {
    let crowd = ["p2", "p3", "p4"];
    let net = Net::new(&["p1", "p2", "p3", "p4"])?;
    let data = random_bytes(3 << 20, 33);
    std::fs::create_dir_all(net.served("p1").join("big"))?;
    net.put("p1", "big/f.bin", &data)?;
    let _seeder = net.serve("p1", &["--max-upload-rate", "1M"])?;
    let _servers: Vec<_> = crowd
        .iter()
        .map(|p| net.serve(p, &[]))
        .collect::<Result<_, _>>()?;
    let downloads: Vec<_> = crowd
        .iter()
        .map(|p| net.spawn(p, &["download", "big/", "--json"]))
        .collect::<Result<_, _>>()?;
    let mut from_seeder = 0;
    for (p, d) in crowd.iter().zip(downloads) {
        let out = Out::of(d)?;
        assert!(out.success(), "{out}");
        assert_eq!(
            b3(&std::fs::read(net.served(p).join("big/f.bin"))?),
            b3(&data)
        );
        let json = out.json()?;
        let others: Vec<&str> = crowd.iter().copied().filter(|o| o != p).collect();
        let given: u64 = from(&json, &others).iter().sum();
        assert!(
            given > 0,
            "{p} got nothing from the other downloaders: {json}"
        );
        from_seeder += share(&json, "p1");
    }
    assert!(
        from_seeder < 2 * data.len() as u64,
        "the seeder sent {from_seeder} bytes, {:.1} copies",
        from_seeder as f64 / data.len() as f64
    );
    Ok(())
}
