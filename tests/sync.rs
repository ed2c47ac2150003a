//! `sync` with real processes on 127.0.0.1: a folder kept identical between peers.

mod util;

use std::path::Path;
use std::time::Duration;

use util::{Net, Server, TestResult, poll};

/// Starts `sync` of `notes` for `id` (a short rescan: the events are what the tests watch, the
/// rescan a backstop).
fn sync(net: &Net, id: &str) -> anyhow::Result<Server> {
    net.start(id, &["sync", "--folder", "notes", "--rescan", "5"])
}

/// Waits until `id` has taken in (and noted) all of the other peer's index, so that stopping it
/// loses nothing of what it knows.
fn settled(net: &Net, id: &str) -> TestResult {
    poll(Duration::from_secs(10), || {
        let json = net.json(id, &["status", "--json"])?;
        Ok((json["folders"][0]["peers"][0]["in_sync"] == true).then_some(()))
    })
}

/// Waits until `rel` in `id`'s notes holds `want` (`None`: absent).
fn until(net: &Net, id: &str, rel: &str, want: Option<&[u8]>) -> TestResult {
    let at = net.served(id).join("notes").join(rel);
    poll(Duration::from_secs(20), || {
        let now = std::fs::read(&at).ok();
        Ok((now.as_deref() == want).then_some(()))
    })
    .map_err(|e| anyhow::anyhow!("{id}: {rel} never became {want:?}: {e}"))
}

fn write(dir: &Path, rel: &str, data: &str) -> TestResult {
    let at = dir.join(rel);
    std::fs::create_dir_all(at.parent().unwrap())?;
    std::fs::write(at, data)?;
    Ok(())
}

/// The visible files of a folder, relative and sorted, with their bytes.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

/// Creates, edits, moves between folders and deletes made on either peer reach the other; the
/// moved file is copied from what the receiver holds (no file bytes), and what a sync replaces
/// or deletes is kept in the displaced versions.
#[test]
fn creates_edits_moves_and_deletes_travel_both_ways() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let (n1, n2) = (
        net.served("p1").join("notes"),
        net.served("p2").join("notes"),
    );
    write(&n1, "a.txt", "first note\n")?;
    write(&n1, "sub/b.txt", "second note\n")?;
    std::fs::create_dir_all(&n2)?;
    let s1 = sync(&net, "p1")?;
    let s2 = sync(&net, "p2")?;
    until(&net, "p2", "a.txt", Some(b"first note\n"))?;
    until(&net, "p2", "sub/b.txt", Some(b"second note\n"))?;

    write(&n2, "a.txt", "first note, edited on p2\n")?;
    until(&net, "p1", "a.txt", Some(b"first note, edited on p2\n"))?;
    assert!(
        std::fs::read_dir(n1.join(".qnode-displaced"))?.count() > 0,
        "the replaced version is kept"
    );

    std::fs::create_dir_all(n1.join("other"))?;
    std::fs::rename(n1.join("sub/b.txt"), n1.join("other/b2.txt"))?;
    until(&net, "p2", "other/b2.txt", Some(b"second note\n"))?;
    until(&net, "p2", "sub/b.txt", None)?;
    // Said as one move on p2, its old name not as a removal of its own.
    poll(Duration::from_secs(5), || {
        Ok(s2
            .stdout()
            .contains("renamed other/b2.txt from p1")
            .then_some(()))
    })
    .map_err(|e| anyhow::anyhow!("{e}: {}", s2.stdout()))?;
    assert!(s2.stdout().contains("(from sub/b.txt)"), "{}", s2.stdout());
    assert!(
        !s2.stdout().contains("removed sub/b.txt"),
        "{}",
        s2.stdout()
    );

    std::fs::remove_file(n2.join("a.txt"))?;
    until(&net, "p1", "a.txt", None)?;
    assert_eq!(tree(&n1), tree(&n2));
    assert!(tree(&n1).iter().all(|(n, _)| !n.contains("sync-conflict")));
    // p2 took the moved file from its own copy: p1 served no whole file for it.
    let log = s1.log();
    assert!(
        !log.contains("read_file notes/other/b2.txt"),
        "the move moved file bytes: {log}"
    );
    Ok(())
}

/// Edits of the same line of one file made on both peers while they were apart: one version
/// keeps the name and the other is kept as a conflict copy, the same on both peers.
#[test]
fn concurrent_edits_of_one_line_end_as_a_conflict_copy_on_both_peers() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let (n1, n2) = (
        net.served("p1").join("notes"),
        net.served("p2").join("notes"),
    );
    write(&n1, "a.txt", "one\ntwo\n")?;
    std::fs::create_dir_all(&n2)?;
    let s1 = sync(&net, "p1")?;
    let s2 = sync(&net, "p2")?;
    until(&net, "p2", "a.txt", Some(b"one\ntwo\n"))?;
    settled(&net, "p2")?;
    drop(s2);
    write(&n1, "a.txt", "one, by p1\ntwo\n")?;
    std::thread::sleep(Duration::from_millis(1100));
    write(&n2, "a.txt", "one, by p2\ntwo\n")?;
    let _s2 = sync(&net, "p2")?;
    poll(Duration::from_secs(20), || {
        let (t1, t2) = (tree(&n1), tree(&n2));
        Ok((t1 == t2 && t1.len() == 2).then_some(()))
    })
    .map_err(|e| anyhow::anyhow!("{e}: {:?} / {:?}", tree(&n1), tree(&n2)))?;
    // The later edit (p2's) keeps the name; p1's is the copy.
    let t = tree(&n1);
    assert_eq!(
        t[0],
        (
            "a.sync-conflict-".to_owned() + &t[0].0[16..],
            b"one, by p1\ntwo\n".to_vec()
        )
    );
    assert!(t[0].0.ends_with("-p1.txt"), "{t:?}");
    assert_eq!(t[1], ("a.txt".to_owned(), b"one, by p2\ntwo\n".to_vec()));
    // `status` names the copy kept and finds p2 in sync once nothing is pending.
    poll(Duration::from_secs(10), || {
        let json = net.json("p1", &["status", "--json"])?;
        let f = &json["folders"][0];
        let p2 = &f["peers"][0];
        let done = f["folder"] == "notes"
            && f["conflicts"].as_array().is_some_and(|c| c.len() == 1)
            && p2["peer"] == "p2"
            && p2["in_sync"] == true;
        Ok(done.then_some(()))
    })?;
    drop(s1);
    Ok(())
}

/// A folder whose marker is gone (an unmounted disk, a deleted folder) spreads no delete: the
/// peer keeps its files, and the folder is synced again once the marker is back.
#[test]
fn a_folder_without_its_marker_spreads_no_deletes() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let (n1, n2) = (
        net.served("p1").join("notes"),
        net.served("p2").join("notes"),
    );
    write(&n1, "a.txt", "keep me\n")?;
    std::fs::create_dir_all(&n2)?;
    let s1 = sync(&net, "p1")?;
    let _s2 = sync(&net, "p2")?;
    until(&net, "p2", "a.txt", Some(b"keep me\n"))?;
    let marker = std::fs::read(n1.join(".qnodefolder"))?;
    std::fs::remove_file(n1.join(".qnodefolder"))?;
    std::fs::remove_file(n1.join("a.txt"))?;
    s1.wait_for_log_count("sync_index", 1, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(std::fs::read(n2.join("a.txt"))?, b"keep me\n");
    // The marker back (as after a remount): now the delete is real, and it travels.
    std::fs::write(n1.join(".qnodefolder"), marker)?;
    write(&n1, "b.txt", "a new note\n")?;
    until(&net, "p2", "b.txt", Some(b"a new note\n"))?;
    until(&net, "p2", "a.txt", None)?;
    Ok(())
}

/// A peer that was down catches up when it returns, and is sent only what changed since it
/// last looked.
#[test]
fn a_peer_that_was_down_catches_up_with_only_the_changes() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let (n1, n2) = (
        net.served("p1").join("notes"),
        net.served("p2").join("notes"),
    );
    for i in 0..20 {
        write(&n1, &format!("n{i:02}.txt"), &format!("note {i}\n"))?;
    }
    std::fs::create_dir_all(&n2)?;
    let s1 = sync(&net, "p1")?;
    let s2 = sync(&net, "p2")?;
    until(&net, "p2", "n19.txt", Some(b"note 19\n"))?;
    // Stopped once it has taken in (and noted) all of p1's index.
    settled(&net, "p2")?;
    drop(s2);
    for i in 0..3 {
        write(&n1, &format!("n{i:02}.txt"), &format!("note {i}, edited\n"))?;
    }
    std::thread::sleep(Duration::from_millis(1500));
    let _s2 = sync(&net, "p2")?;
    for i in 0..3 {
        until(
            &net,
            "p2",
            &format!("n{i:02}.txt"),
            Some(format!("note {i}, edited\n").as_bytes()),
        )?;
    }
    assert_eq!(tree(&n1), tree(&n2));
    // What p1 answered p2: all 20 once (since 0), then never more than the 3 changes (the
    // first p2 may have been sent them too, just before it stopped).
    let log = s1.log();
    let answers: Vec<(u64, u64)> = (log.lines())
        .filter_map(|l| l.split("sync_index \"notes\" since ").nth(1))
        .filter_map(|rest| {
            let (since, rest) = rest.split_once(": ")?;
            let (n, _) = rest.split_once(" changes")?;
            Some((since.parse().ok()?, n.parse().ok()?))
        })
        .collect();
    let from_zero: u64 = answers.iter().filter(|a| a.0 == 0).map(|a| a.1).sum();
    let later: Vec<u64> = answers.iter().filter(|a| a.0 >= 20).map(|a| a.1).collect();
    assert_eq!(from_zero, 20, "{answers:?}");
    assert!(
        later.iter().all(|&n| n <= 3) && later.contains(&3),
        "{answers:?}"
    );
    Ok(())
}

/// Edits of different lines of one file made on both peers while they were apart are merged
/// three-way against the version both edited: both peers end with one file holding both edits,
/// and no conflict copy.
#[test]
fn concurrent_edits_of_different_lines_merge_alike_on_both_peers() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let (n1, n2) = (
        net.served("p1").join("notes"),
        net.served("p2").join("notes"),
    );
    write(&n1, "a.txt", "one\ntwo\nthree\nfour\n")?;
    std::fs::create_dir_all(&n2)?;
    let _s1 = sync(&net, "p1")?;
    let s2 = sync(&net, "p2")?;
    until(&net, "p2", "a.txt", Some(b"one\ntwo\nthree\nfour\n"))?;
    settled(&net, "p2")?;
    drop(s2);
    write(&n1, "a.txt", "one, by p1\ntwo\nthree\nfour\n")?;
    std::thread::sleep(Duration::from_millis(1100));
    write(&n2, "a.txt", "one\ntwo\nthree\nfour, by p2\n")?;
    let _s2 = sync(&net, "p2")?;
    let merged = b"one, by p1\ntwo\nthree\nfour, by p2\n";
    until(&net, "p1", "a.txt", Some(merged))?;
    until(&net, "p2", "a.txt", Some(merged))?;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(tree(&n1), tree(&n2));
    assert_eq!(tree(&n1).len(), 1, "no conflict copy: {:?}", tree(&n1));
    Ok(())
}

/// A peer killed (SIGKILL) while it takes in a folder loses nothing: every file it holds is a
/// complete version, and once restarted it finishes, identical to the other peer.
#[test]
fn a_peer_killed_mid_sync_holds_only_whole_files_and_finishes_after_a_restart() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let (n1, n2) = (
        net.served("p1").join("notes"),
        net.served("p2").join("notes"),
    );
    for i in 0..20u64 {
        let text = util::text::prose(64 << 10, i);
        write(&n1, &format!("n{i:02}.txt"), std::str::from_utf8(&text)?)?;
    }
    std::fs::create_dir_all(&n2)?;
    // p1 sends slowly: p2 is still taking the folder in when it is killed.
    let args = ["sync", "--folder", "notes", "--max-upload-rate", "256K"];
    let _s1 = net.start("p1", &args)?;
    let mut s2 = sync(&net, "p2")?;
    poll(Duration::from_secs(20), || {
        Ok((tree(&n2).len() >= 3).then_some(()))
    })?;
    s2.signal(libc::SIGKILL);
    s2.kill();
    let want = tree(&n1);
    let held = tree(&n2);
    assert!(
        held.len() < want.len(),
        "killed before the end: {}",
        held.len()
    );
    for file in &held {
        assert!(want.contains(file), "{} is not a whole version", file.0);
    }
    let _s2 = sync(&net, "p2")?;
    poll(Duration::from_secs(30), || {
        Ok((tree(&n2) == want).then_some(()))
    })?;
    Ok(())
}

/// Two peers editing the same file every 100 ms for 10 s converge to one identical folder once
/// the edits stop, and each peer's last edit survives (under the name or as a conflict copy).
#[test]
fn an_edit_storm_on_two_peers_converges_and_keeps_both_last_edits() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let (n1, n2) = (
        net.served("p1").join("notes"),
        net.served("p2").join("notes"),
    );
    write(&n1, "a.txt", "start\n")?;
    std::fs::create_dir_all(&n2)?;
    let _s1 = sync(&net, "p1")?;
    let _s2 = sync(&net, "p2")?;
    until(&net, "p2", "a.txt", Some(b"start\n"))?;
    let storm = |dir: std::path::PathBuf, who: &'static str| {
        std::thread::spawn(move || -> anyhow::Result<String> {
            let mut last = String::new();
            for k in 0..100 {
                last = format!("{who} edit {k}\n");
                std::fs::write(dir.join("a.txt"), &last)?;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(last)
        })
    };
    let (a, b) = (storm(n1.clone(), "p1"), storm(n2.clone(), "p2"));
    let lasts = [a.join().unwrap()?, b.join().unwrap()?];
    poll(Duration::from_secs(30), || {
        let (t1, t2) = (tree(&n1), tree(&n2));
        Ok((t1 == t2).then_some(()))
    })
    .map_err(|e| anyhow::anyhow!("{e}: {:?} / {:?}", tree(&n1), tree(&n2)))?;
    std::thread::sleep(Duration::from_secs(1));
    let t = tree(&n1);
    assert_eq!(t, tree(&n2));
    for last in &lasts {
        assert!(
            t.iter().any(|(_, data)| data == last.as_bytes()),
            "{last:?} was lost: {t:?}"
        );
    }
    Ok(())
}

/// An edit of a larger file we hold another version of travels as a delta: the receiver asks
/// for the changed ranges, not the whole file.
#[test]
fn an_edit_of_a_larger_file_travels_as_a_delta() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let (n1, n2) = (
        net.served("p1").join("notes"),
        net.served("p2").join("notes"),
    );
    let text = util::text::prose(512 << 10, 3);
    std::fs::create_dir_all(&n1)?;
    std::fs::write(n1.join("book.txt"), &text)?;
    std::fs::create_dir_all(&n2)?;
    let s1 = sync(&net, "p1")?;
    let _s2 = sync(&net, "p2")?;
    until(&net, "p2", "book.txt", Some(&text))?;
    let mut edited = text.clone();
    edited.splice(1000..1000, b"one new line\n".iter().copied());
    std::fs::write(n1.join("book.txt"), &edited)?;
    until(&net, "p2", "book.txt", Some(&edited))?;
    let log = s1.log();
    let whole = log.matches("read_file notes/book.txt").count();
    assert_eq!(whole, 1, "only the first version was sent whole: {log}");
    assert!(log.contains("read_range notes/book.txt"), "{log}");
    Ok(())
}

/// Three peers: two take a folder in from the first and from each other at once, and neither
/// takes its own writes for edits (which would come back to the first as new versions): the
/// first peer's index ends with exactly its own changes.
#[test]
fn peers_taking_a_folder_in_from_each_other_make_no_versions_of_their_own() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3"])?;
    let n1 = net.served("p1").join("notes");
    for i in 0..300 {
        write(
            &n1,
            &format!("d{}/n{i:03}.txt", i % 10),
            &format!("note {i}\n"),
        )?;
    }
    for id in ["p2", "p3"] {
        std::fs::create_dir_all(net.served(id).join("notes"))?;
    }
    let s1 = sync(&net, "p1")?;
    let _s2 = sync(&net, "p2")?;
    let _s3 = sync(&net, "p3")?;
    for id in ["p2", "p3"] {
        poll(Duration::from_secs(30), || {
            Ok((tree(&net.served(id).join("notes")).len() == 300).then_some(()))
        })?;
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(tree(&net.served("p2").join("notes")), tree(&n1));
    assert_eq!(tree(&net.served("p3").join("notes")), tree(&n1));
    let log = s1.log();
    let lasts: Vec<u64> = (log.lines())
        .filter_map(|l| l.split(", last ").nth(1))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .collect();
    assert!(
        !lasts.is_empty() && lasts.iter().all(|&l| l == 300),
        "{lasts:?}"
    );
    Ok(())
}

/// A crowd taking in one new large version swarms: with the first peer's upload held to
/// 512 KiB/s, the two others fetch from each other what they have verified, and each ends with
/// the version whole.
#[test]
fn a_crowd_taking_in_a_new_large_version_swarms() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3"])?;
    for id in ["p1", "p2", "p3"] {
        std::fs::create_dir_all(net.served(id).join("notes"))?;
    }
    let slow = ["sync", "--folder", "notes", "--max-upload-rate", "512K"];
    let _s1 = net.start("p1", &slow)?;
    let s2 = sync(&net, "p2")?;
    let s3 = sync(&net, "p3")?;
    let data = util::random_bytes(3 << 20, 41);
    write_bytes(&net.served("p1").join("notes"), "media/big.bin", &data)?;
    until(&net, "p2", "media/big.bin", Some(&data))?;
    until(&net, "p3", "media/big.bin", Some(&data))?;
    // Each downloader's own server gave the other some of it.
    let (l2, l3) = (s2.log(), s3.log());
    let asked = |log: &str| {
        log.lines()
            .filter(|l| l.contains("notes/media/big.bin") && l.contains("read_"))
            .count()
    };
    assert!(asked(&l2) + asked(&l3) > 0, "p2:\n{l2}\np3:\n{l3}");
    Ok(())
}

fn write_bytes(dir: &Path, rel: &str, data: &[u8]) -> TestResult {
    let at = dir.join(rel);
    std::fs::create_dir_all(at.parent().unwrap())?;
    // Written beside and renamed: the new version appears whole.
    let tmp = dir.join(".writing");
    std::fs::write(&tmp, data)?;
    std::fs::rename(tmp, at)?;
    Ok(())
}

/// The hostile listed peers of `a_hostile_peers_index_and_content_are_refused_and_named`, by
/// what each sends: a version vector out of order, a sequence number beyond its last, a path
/// outside the folder, and content other than the version it announced.
fn hostile_answer(
    liar: &'static str,
    req: qnode::wire::protocol::Request,
    mut send: quinn::SendStream,
) -> util::peer::Answer {
    use qnode::model::vector::{Vector, Version};
    use qnode::wire::protocol::{Request, Response, SyncRecord};
    Box::pin(async move {
        let truth = b"truth";
        let mut vector = Vector::default();
        vector.bump(&liar.parse().unwrap());
        let record = |path: &str, sequence: u64| SyncRecord {
            path: qnode::model::manifest::FilePath::new(path).unwrap(),
            version: Version {
                size: truth.len() as u64,
                blake3: *blake3::hash(truth).as_bytes(),
                deleted: false,
                vector: vector.clone(),
                modified: 0,
                by: liar.into(),
                parent: None,
            },
            sequence,
        };
        match req {
            Request::SyncIndex { since: 0, .. } => {
                let mut records = vec![record(&format!("from-{liar}.txt"), 1)];
                let mut last = 1;
                match liar {
                    "p2" => {
                        let mut v = Vector::default();
                        v.bump(&"p9".parse().unwrap());
                        let mut entries = v.merged(&vector).entries().to_vec();
                        entries.reverse();
                        let bytes = postcard::to_stdvec(&entries).unwrap();
                        records[0].version.vector = postcard::from_bytes(&bytes).unwrap();
                    }
                    "p4" => last = 0,
                    _ => {}
                }
                let answer = Response::SyncIndex {
                    records,
                    last,
                    more: false,
                };
                let mut bytes = postcard::to_stdvec(&answer).unwrap();
                if liar == "p5" {
                    // `from-p5.txt` made `../p5.txt`: outside the folder.
                    let at = bytes.windows(8).position(|w| w == b"from-p5.").unwrap();
                    bytes[at..at + 8].copy_from_slice(b"../p5.tx");
                    bytes.splice(at + 8..at + 11, *b"t");
                    bytes[at - 1] = 9;
                }
                let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
                framed.extend(bytes);
                let _ = qnode::wire::exchange::send_frame(&mut send, framed, true).await;
            }
            Request::ReadFile { .. } => {
                let lie = bytes::Bytes::from_static(b"lies!");
                let _ = qnode::wire::exchange::send_chunk(&mut send, 5, lie, false).await;
            }
            // Nothing more: an honest idle peer's answer to the next question.
            _ => std::future::pending::<()>().await,
        }
    })
}

/// Listed peers answering the sync index with a vector out of order, a sequence number beyond
/// their last, a path outside the folder, or content other than announced: each is refused and
/// named once, nothing of theirs lands, and the honest peer's change still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peers_index_and_content_are_refused_and_named() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3", "p4", "p5", "p6"])?;
    let liars = ["p2", "p4", "p5", "p6"];
    let _fakes: Vec<_> = (liars.iter())
        .map(|&liar| {
            util::peer::fake_peer(&net, liar, "p1", move |req, send| {
                hostile_answer(liar, req, send)
            })
        })
        .collect::<anyhow::Result<_>>()?;
    for id in ["p1", "p3"] {
        std::fs::create_dir_all(net.served(id).join("notes"))?;
    }
    let s1 = tokio::task::block_in_place(|| sync(&net, "p1"))?;
    let _s3 = tokio::task::block_in_place(|| sync(&net, "p3"))?;
    write(&net.served("p3").join("notes"), "honest.txt", "fine")?;
    tokio::task::block_in_place(|| until(&net, "p1", "honest.txt", Some(b"fine")))?;
    for liar in liars {
        let said = format!("sync with {liar}: refused");
        tokio::task::block_in_place(|| s1.wait_for_log(&said, Duration::from_secs(20)))?;
    }
    // Named once each, however often asked again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = s1.log();
    for liar in liars {
        let said = format!("sync with {liar}: refused");
        assert_eq!(log.matches(&said).count(), 1, "{log}");
    }
    assert!(
        log.contains("p6 sent other content for from-p6.txt"),
        "{log}"
    );
    assert_eq!(
        tree(&net.served("p1").join("notes")),
        vec![("honest.txt".to_owned(), b"fine".to_vec())]
    );
    assert!(!net.served("p1").join("p5.txt").exists());
    Ok(())
}

/// An edit wins over a concurrent delete: p1 deletes a note while p2, stopped, edits it; once
/// p2 is back both hold p2's edit.
#[test]
fn an_edit_wins_over_a_concurrent_delete_on_both_peers() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let (n1, n2) = (
        net.served("p1").join("notes"),
        net.served("p2").join("notes"),
    );
    write(&n1, "a.txt", "first\n")?;
    std::fs::create_dir_all(&n2)?;
    let _s1 = sync(&net, "p1")?;
    let s2 = sync(&net, "p2")?;
    until(&net, "p2", "a.txt", Some(b"first\n"))?;
    settled(&net, "p2")?;
    drop(s2);
    std::fs::remove_file(n1.join("a.txt"))?;
    write(&n2, "a.txt", "first\nedited while apart\n")?;
    // p1 has recorded its delete (the file has been missing long enough) before p2 returns.
    std::thread::sleep(Duration::from_millis(1500));
    let _s2 = sync(&net, "p2")?;
    let edited = b"first\nedited while apart\n";
    until(&net, "p1", "a.txt", Some(edited))?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(tree(&n1), tree(&n2));
    assert_eq!(tree(&n1), vec![("a.txt".to_owned(), edited.to_vec())]);
    Ok(())
}
