//! Folders: a served tree listed whole, a file in a folder fetched into its folders, what is
//! hidden (dot entries, symlinks, `.qnodeignore`) never listed or served, older peers seeing only
//! the top, and hostile paths refused before any disk access. Real processes, real sockets.

mod util;

use qnode::model::manifest::FilePath;
use qnode::wire::protocol::{self, ErrorKind, Request, Response, encode_frame};
use util::peer::*;
use util::{Net, TestResult};

fn names(json: &serde_json::Value) -> Vec<String> {
    let files = json["peers"][0]["files"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    files
        .iter()
        .map(|f| f["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// p1's tree: nested, wide, an empty file, names with spaces and UTF-8; and what must stay
/// unseen: hidden entries, a symlinked folder and file, what `.qnodeignore` hides.
fn plant_tree(net: &Net) -> anyhow::Result<()> {
    let served = net.served("p1");
    let put = |path: &str, data: &[u8]| -> anyhow::Result<()> {
        let at = served.join(path);
        std::fs::create_dir_all(at.parent().unwrap_or(&served))?;
        std::fs::write(at, data)?;
        Ok(())
    };
    put("top.txt", b"at the top\n")?;
    put("notes/2026/todo.txt", b"buy milk\nwrite tests\n")?;
    put("notes/readme.md", b"# notes\n")?;
    put("notes/empty.txt", b"")?;
    put("with space/\u{fc}n\u{ef}.txt", "ünï\n".as_bytes())?;
    put("notes/.hidden.txt", b"hidden")?;
    put(".git/config", b"hidden folder")?;
    put("build/out.txt", b"ignored folder")?;
    put("notes/debug.log", b"ignored file")?;
    put(".qnodeignore", b"*.log\nbuild/\n")?;
    std::fs::create_dir(served.join("empty"))?;
    let outside = net.root().join("outside");
    std::fs::create_dir(&outside)?;
    std::fs::write(outside.join("secret.txt"), b"not shared")?;
    std::os::unix::fs::symlink(&outside, served.join("linked"))?;
    std::os::unix::fs::symlink(outside.join("secret.txt"), served.join("notes/link.txt"))?;
    Ok(())
}

#[test]
fn a_tree_is_listed_whole_and_a_file_in_a_folder_is_fetched_into_its_folders() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    plant_tree(&net)?;
    let _p1 = net.serve("p1", &[])?;

    let json = net.json("p2", &["list", "p1", "--json"])?;
    assert_eq!(
        names(&json),
        [
            "notes/2026/todo.txt",
            "notes/empty.txt",
            "notes/readme.md",
            "top.txt",
            "with space/\u{fc}n\u{ef}.txt",
        ],
        "{json}"
    );

    net.ok("p2", &["download", "notes/2026/todo.txt", "p1"])?;
    let got = std::fs::read(net.served("p2").join("notes/2026/todo.txt"))?;
    assert_eq!(got, b"buy milk\nwrite tests\n");
    net.ok("p2", &["download", "with space/\u{fc}n\u{ef}.txt", "p1"])?;
    net.ok("p2", &["download", "notes/empty.txt", "p1"])?;
    assert_eq!(
        std::fs::read(net.served("p2").join("notes/empty.txt"))?,
        b""
    );

    // Hidden, ignored and symlinked paths are not served, whatever they hold.
    for hidden in [
        "notes/debug.log",
        "build/out.txt",
        "linked/secret.txt",
        "notes/link.txt",
    ] {
        let out = net.fails("p2", &["download", hidden, "p1"])?;
        assert!(out.stderr().contains("no peer serves"), "{hidden}: {out}");
    }
    for invalid in [
        "notes/.hidden.txt",
        ".git/config",
        "a//b",
        "notes/../top.txt",
        "/top.txt",
    ] {
        let out = net.fails("p2", &["download", invalid, "p1"])?;
        assert!(
            out.stderr().contains("invalid file name"),
            "{invalid}: {out}"
        );
        assert_eq!(out.stderr().lines().count(), 1, "one line: {out}");
    }
    Ok(())
}

#[test]
fn a_symlink_planted_where_a_folder_goes_is_refused_and_nothing_is_written_outside() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    plant_tree(&net)?;
    let _p1 = net.serve("p1", &[])?;
    let elsewhere = net.root().join("elsewhere");
    std::fs::create_dir(&elsewhere)?;
    std::os::unix::fs::symlink(&elsewhere, net.served("p2").join("notes"))?;
    let out = net.fails("p2", &["download", "notes/2026/todo.txt", "p1"])?;
    assert!(out.stderr().contains("not a folder"), "{out}");
    assert_eq!(std::fs::read_dir(&elsewhere)?.count(), 0, "nothing outside");
    Ok(())
}

#[tokio::test]
async fn an_older_peer_sees_and_names_only_the_files_at_the_top() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    plant_tree(&net)?;
    let _p1 = net.serve("p1", &[])?;
    let (_ep, conn) = connect_speaking(&net, "p2", "p1", None, &[protocol::ALPN_V2]).await?;
    let Response::Files(files) = raw(&conn, &encode_frame(&Request::List)?).await? else {
        panic!("no listing");
    };
    let listed: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(listed, ["top.txt"]);
    let describe = Request::Describe {
        name: FilePath::new("notes/readme.md")?,
    };
    match raw(&conn, &encode_frame(&describe)?).await? {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::NotFound);
            assert!(e.message.contains("qnode/3"), "{}", e.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The same peer on qnode/3 sees the whole tree.
    let (_ep, conn) = connect(&net, "p2", "p1").await?;
    let Response::Files(files) = raw(&conn, &encode_frame(&Request::List)?).await? else {
        panic!("no listing");
    };
    assert_eq!(files.len(), 5);
    Ok(())
}

/// Every request that names a file, with a path no rule allows: each is refused as a bad request
/// (it does not even decode) and nothing outside `served_files` is read or written.
#[tokio::test]
async fn hostile_paths_in_every_request_are_refused_before_any_disk_access() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    plant_tree(&net)?;
    let _p1 = net.serve("p1", &["--max-upload-size", "1000"])?;
    let (_ep, conn) = connect(&net, "p2", "p1").await?;
    let deep = vec!["d"; 33].join("/");
    let long = format!("{}/{}", "x".repeat(255), "y".repeat(770));
    let hostile = [
        "../outside/secret.txt",
        "/etc/passwd",
        "notes//readme.md",
        "notes/./readme.md",
        "notes/",
        "a/\u{1b}b",
        deep.as_str(),
        long.as_str(),
    ];
    for path in hostile {
        // A valid request naming "q", its name then replaced by the hostile one (postcard: a
        // LEB128 length, then the bytes).
        let q = FilePath::new("q")?;
        let requests = [
            Request::Describe { name: q.clone() },
            Request::ReadChunk {
                name: q.clone(),
                offset: 0,
                len: 1,
            },
            Request::Observe { name: q.clone() },
            Request::Upload {
                name: q.clone(),
                size: 3,
                blake3: [0; 32],
            },
            Request::ReadFile {
                name: q.clone(),
                blake3: [0; 32],
                size: 3,
            },
            Request::Folder {
                path: q.clone(),
                fresh: true,
            },
        ];
        for request in requests {
            let frame = encode_frame(&request)?;
            let at = frame
                .windows(2)
                .position(|w| w == [1, b'q'])
                .expect("the name is in the frame");
            let mut body = frame[4..at].to_vec();
            let mut len = path.len();
            while len >= 0x80 {
                body.push((len as u8 & 0x7f) | 0x80);
                len >>= 7;
            }
            body.push(len as u8);
            body.extend_from_slice(path.as_bytes());
            body.extend_from_slice(&frame[at + 2..]);
            let mut hostile_frame = (body.len() as u32).to_be_bytes().to_vec();
            hostile_frame.extend_from_slice(&body);
            match raw(&conn, &hostile_frame).await? {
                Response::Error(e) => assert_eq!(e.kind, ErrorKind::BadRequest, "{path:?}"),
                other => panic!("{path:?}: expected a refusal, got {other:?}"),
            }
        }
    }
    // An upload through the symlinked folder is refused; nothing lands outside.
    let upload = Request::Upload {
        name: FilePath::new("linked/evil.txt")?,
        size: 3,
        blake3: *blake3::hash(b"bad").as_bytes(),
    };
    match raw(&conn, &encode_frame(&upload)?).await? {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::Conflict, "{}", e.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let outside: Vec<_> = std::fs::read_dir(net.root().join("outside"))?.collect();
    assert_eq!(outside.len(), 1, "only secret.txt");
    Ok(())
}

/// No silent cap: a tree of 100,000 files (in 100 folders) lists completely, page by page, and
/// sorted by path; an older peer's `List` of the same tree says how many there are.
#[test]
fn a_listing_of_a_hundred_thousand_files_is_complete() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let served = net.served("p1");
    for folder in 0..100 {
        let dir = served.join(format!("f{folder:03}"));
        std::fs::create_dir(&dir)?;
        for file in 0..1000 {
            std::fs::write(
                dir.join(format!("n{file:04}.txt")),
                [b'a' + (file % 26) as u8],
            )?;
        }
    }
    let _p1 = net.serve("p1", &[])?;
    let json = net.json("p2", &["list", "p1", "--json"])?;
    let listed = names(&json);
    assert_eq!(listed.len(), 100_000);
    assert!(listed.windows(2).all(|w| w[0] < w[1]), "sorted by path");
    assert_eq!(listed[0], "f000/n0000.txt");
    assert_eq!(listed[99_999], "f099/n0999.txt");
    Ok(())
}

/// `download FOLDER` from two peers: every file, verified, into its folders; a file whose content
/// we already hold elsewhere is copied, not fetched; a peer serving another version of the folder
/// is left out and named; a re-run has nothing to do.
#[test]
fn a_folder_is_fetched_whole_and_a_moved_file_costs_no_bytes() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3", "p4"])?;
    let tree = [
        ("notes/2026/todo.txt", util::text::prose(40_000, 1)),
        ("notes/readme.md", util::text::prose(3_000, 2)),
        ("notes/empty.txt", Vec::new()),
        ("notes/deep/er/still/x.txt", util::text::prose(70_000, 3)),
    ];
    for peer in ["p1", "p3", "p4"] {
        for (path, data) in &tree {
            let at = net.served(peer).join(path);
            std::fs::create_dir_all(at.parent().unwrap())?;
            std::fs::write(at, data)?;
        }
    }
    // p4 serves another version: one file differs.
    std::fs::write(
        net.served("p4").join("notes/readme.md"),
        b"another readme\n",
    )?;
    // We hold todo.txt's content already, under another name (it was moved there).
    std::fs::create_dir_all(net.served("p2").join("old"))?;
    std::fs::write(net.served("p2").join("old/todo-2025.txt"), &tree[0].1)?;
    let _servers = [
        net.serve("p1", &[])?,
        net.serve("p3", &[])?,
        net.serve("p4", &[])?,
    ];

    let json = net.json("p2", &["download", "notes/", "p1", "p3", "p4", "--json"])?;
    assert_eq!(json["kind"], "folder", "{json}");
    assert_eq!(json["status"], "downloaded", "{json}");
    assert_eq!(json["files"], 4, "{json}");
    for (path, data) in &tree {
        assert_eq!(&std::fs::read(net.served("p2").join(path))?, data, "{path}");
    }
    let entries = json["entries"].as_array().cloned().unwrap_or_default();
    let todo = entries.iter().find(|e| e["name"] == "2026/todo.txt");
    assert_eq!(
        todo.map(|e| e["status"].clone()),
        Some("copied".into()),
        "{json}"
    );
    assert_eq!(json["reused_bytes"], tree[0].1.len() as u64, "{json}");
    // No byte of the moved file was fetched: the peers sent exactly the other files.
    let others: u64 = tree[1..].iter().map(|(_, d)| d.len() as u64).sum();
    let fetched: u64 = (json["peers"].as_object().into_iter().flatten())
        .filter_map(|(_, b)| b.as_u64())
        .sum();
    assert_eq!(fetched, others, "{json}");
    let left: Vec<_> = json["left_out"].as_array().cloned().unwrap_or_default();
    assert_eq!(left.len(), 1, "{json}");
    assert_eq!(left[0]["peer"], "p4", "{json}");
    assert!(
        left[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("another version"),
        "{json}"
    );

    // Again: already here, nothing fetched. And without the trailing slash it is found too.
    let json = net.json("p2", &["download", "notes", "p1", "p3", "--json"])?;
    assert_eq!(json["status"], "already_present", "{json}");
    assert_eq!(json["wire_bytes"], 0, "{json}");
    Ok(())
}

/// A local folder that differs from the peers' version is refused, naming the files and
/// `--update`; with `--update` it becomes the peers' version: a changed file brought up to date
/// (its old version kept), a missing one fetched, one the version lacks displaced (kept, hidden).
#[test]
fn a_folder_update_makes_it_the_peers_version_and_keeps_what_it_replaces() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let old = util::text::prose(60_000, 7);
    let mut new = old.clone();
    new[30_000..30_010].copy_from_slice(b"EDITED!!!\n");
    let put = |peer: &str, path: &str, data: &[u8]| -> anyhow::Result<()> {
        let at = net.served(peer).join(path);
        std::fs::create_dir_all(at.parent().unwrap())?;
        Ok(std::fs::write(at, data)?)
    };
    put("p1", "notes/a.txt", &new)?;
    put("p1", "notes/sub/b.txt", b"only on p1\n")?;
    put("p2", "notes/a.txt", &old)?;
    put("p2", "notes/c.txt", b"only here\n")?;
    let _p1 = net.serve("p1", &[])?;

    let out = net.fails("p2", &["download", "notes/", "p1"])?;
    assert!(out.stderr().contains("notes/a.txt"), "{out}");
    assert!(out.stderr().contains("--update"), "{out}");
    assert_eq!(std::fs::read(net.served("p2").join("notes/a.txt"))?, old);
    assert!(
        !net.served("p2").join("notes/sub").exists(),
        "nothing fetched"
    );

    let json = net.json("p2", &["download", "notes/", "p1", "--update", "--json"])?;
    let folder = net.served("p2").join("notes");
    assert_eq!(std::fs::read(folder.join("a.txt"))?, new);
    assert_eq!(std::fs::read(folder.join("sub/b.txt"))?, b"only on p1\n");
    assert!(!folder.join("c.txt").exists(), "{json}");
    assert_eq!(json["displaced"], serde_json::json!(["c.txt"]), "{json}");
    let entries = json["entries"].as_array().cloned().unwrap_or_default();
    let a = entries.iter().find(|e| e["name"] == "a.txt");
    assert_eq!(
        a.map(|e| e["status"].clone()),
        Some("updated".into()),
        "{json}"
    );
    // Both what was replaced and what was displaced are kept, hidden.
    let kept: Vec<Vec<u8>> = std::fs::read_dir(folder.join(".qnode-displaced"))?
        .map(|e| std::fs::read(e?.path()))
        .collect::<Result<_, _>>()?;
    assert!(kept.contains(&old), "the old a.txt is kept");
    assert!(kept.contains(&b"only here\n".to_vec()), "c.txt is kept");
    Ok(())
}

/// `upload FOLDER PEERS...`: every file stored under the same relative path on each target
/// (hidden entries left out), one status per file; again, all already there; a different file
/// under one of the names is refused (named, with `--replace`) and the others are stored.
#[test]
fn a_folder_is_uploaded_whole_and_nothing_is_overwritten_without_replace() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3"])?;
    let dir = net.root().join("mine/notes");
    for (path, data) in [
        ("todo.txt", &b"buy milk\n"[..]),
        ("2026/plan.md", b"# plan\n"),
        ("2026/deep/x.txt", b"x\n"),
        (".secret", b"hidden\n"),
    ] {
        let at = dir.join(path);
        std::fs::create_dir_all(at.parent().unwrap())?;
        std::fs::write(at, data)?;
    }
    std::fs::create_dir_all(net.served("p3").join("notes"))?;
    std::fs::write(net.served("p3").join("notes/todo.txt"), b"theirs\n")?;
    let _servers = [net.serve("p1", &[])?, net.serve("p3", &[])?];
    let dir_arg = dir.to_str().unwrap_or_default();

    let out = net.run("p2", &["upload", dir_arg, "p1", "p3", "--json"])?;
    let json = out.json()?;
    assert_eq!(
        (json["kind"].clone(), json["files"].clone()),
        ("folder".into(), 3.into())
    );
    let p1 = &json["results"][0];
    assert_eq!(
        (p1["peer"].clone(), p1["stored"].clone()),
        ("p1".into(), 3.into()),
        "{json}"
    );
    let p3 = &json["results"][1];
    assert_eq!(
        (p3["stored"].clone(), p3["ok"].clone()),
        (2.into(), false.into()),
        "{json}"
    );
    assert_eq!(p3["errors"][0]["name"], "notes/todo.txt", "{json}");
    assert!(out.stderr().contains("--replace"), "{out}");
    assert_eq!(
        std::fs::read(net.served("p3").join("notes/todo.txt"))?,
        b"theirs\n"
    );
    for (path, data) in [
        ("notes/todo.txt", &b"buy milk\n"[..]),
        ("notes/2026/deep/x.txt", b"x\n"),
    ] {
        assert_eq!(std::fs::read(net.served("p1").join(path))?, data, "{path}");
    }
    assert!(!net.served("p1").join("notes/.secret").exists());

    let json = net.json("p2", &["upload", dir_arg, "p1", "--json"])?;
    assert_eq!(json["results"][0]["already_present"], 3, "{json}");
    Ok(())
}

/// An interrupted folder download stops cleanly (one line), keeps the partial files of the files
/// in flight, and a re-run finishes from there: finished files are not fetched again, and the
/// interrupted ones resume.
#[test]
fn an_interrupted_folder_download_resumes() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    // Four files fetched in chunks (over 1 MiB) and twenty small ones fetched whole.
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            (
                format!("notes/part{i}.bin"),
                util::random_bytes(1536 << 10, 60 + i),
            )
        })
        .chain((0..20).map(|i| {
            let name = format!("notes/small/s{i:02}.txt");
            (name, util::random_bytes(4096, 80 + i))
        }))
        .collect();
    for (path, data) in &files {
        let at = net.served("p1").join(path);
        std::fs::create_dir_all(at.parent().unwrap())?;
        std::fs::write(at, data)?;
    }
    let p1 = net.serve("p1", &["--max-upload-rate", "256K"])?;
    let download = net.spawn("p2", &["download", "notes/", "p1"])?;
    p1.wait_for_log_count("read_chunk notes/", 8, std::time::Duration::from_secs(20))?;
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's.
    unsafe {
        libc::kill(download.1.id() as i32, libc::SIGINT);
    }
    let out = util::Out::of(download)?;
    assert!(!out.success(), "{out}");
    assert!(out.stderr().contains("interrupted"), "{out}");
    let folder = net.served("p2").join("notes");
    let partials = std::fs::read_dir(&folder)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .count();
    assert!(partials > 0, "the files in flight keep their partial files");

    let json = net.json("p2", &["download", "notes/", "p1", "--json"])?;
    for (path, data) in &files {
        assert_eq!(&std::fs::read(net.served("p2").join(path))?, data, "{path}");
    }
    let fetched: u64 = (json["peers"].as_object().into_iter().flatten())
        .filter_map(|(_, b)| b.as_u64())
        .sum();
    let all: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    assert!(
        fetched < all,
        "what was fetched before is not fetched again: {json}"
    );
    Ok(())
}

/// A peer outside the folder's version that holds some of its files under other paths serves
/// them too (checked by content), and is still named as left out of the version.
#[test]
fn a_peer_holding_a_file_elsewhere_serves_it() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3"])?;
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                format!("n{i:02}.txt"),
                util::text::prose(2_000 + i * 10, 90 + i as u64),
            )
        })
        .collect();
    for (name, data) in &files {
        std::fs::create_dir_all(net.served("p1").join("notes"))?;
        std::fs::write(net.served("p1").join("notes").join(name), data)?;
        std::fs::create_dir_all(net.served("p3").join("archive/old"))?;
        std::fs::write(net.served("p3").join("archive/old").join(name), data)?;
    }
    let _servers = [net.serve("p1", &[])?, net.serve("p3", &[])?];
    let json = net.json("p2", &["download", "notes/", "p1", "p3", "--json"])?;
    for (name, data) in &files {
        let got = std::fs::read(net.served("p2").join("notes").join(name))?;
        assert_eq!(&got, data, "{name}");
    }
    let from_p3 = json["peers"]["p3"].as_u64().unwrap_or(0);
    assert!(from_p3 > 0, "p3 served files it holds elsewhere: {json}");
    let left: Vec<_> = json["left_out"].as_array().cloned().unwrap_or_default();
    assert!(
        left.iter().any(|l| l["peer"] == "p3"),
        "p3 does not serve the folder: {json}"
    );
    Ok(())
}

/// A large file (fetched in chunks, not whole) that a peer outside the folder's version holds
/// under another path: that peer serves chunks of it too.
#[test]
fn a_peer_holding_a_large_file_elsewhere_serves_its_chunks() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3"])?;
    let data = util::text::prose(3 << 20, 7);
    std::fs::create_dir_all(net.served("p1").join("big"))?;
    std::fs::create_dir_all(net.served("p3").join("stash"))?;
    net.put("p1", "big/book.txt", &data)?;
    net.put("p3", "stash/copy of book.txt", &data)?;
    // p1 sends slowly: p3, unlimited, has time to serve its share.
    let _servers = [
        net.serve(
            "p1",
            &["--max-upload-rate", "512K", "--compression", "never"],
        )?,
        net.serve("p3", &["--compression", "never"])?,
    ];
    let json = net.json("p2", &["download", "big/", "p1", "p3", "--json"])?;
    assert_eq!(std::fs::read(net.served("p2").join("big/book.txt"))?, data);
    let from_p3 = json["peers"]["p3"].as_u64().unwrap_or(0);
    assert!(
        from_p3 > 0,
        "p3 served chunks of the file it holds elsewhere: {json}"
    );
    Ok(())
}

/// A folder with more files directly in it than one `Folder` answer carries (10,000) is still
/// fetched whole: the level comes back cut and the client lists the peers' trees instead.
#[test]
fn a_level_too_large_for_one_answer_is_fetched_from_the_listing() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let dir = net.served("p1").join("flat");
    std::fs::create_dir_all(&dir)?;
    let count = 10_001;
    let content = |i: usize| match i % 1000 {
        0 => format!("note {i}\n"),
        _ => String::new(),
    };
    for i in 0..count {
        std::fs::write(dir.join(format!("e{i:05}.txt")), content(i))?;
    }
    let _server = net.serve("p1", &[])?;
    let json = net.json("p2", &["download", "flat/", "p1", "--json"])?;
    assert_eq!(json["files"], count, "{}", json["status"]);
    let got = net.served("p2").join("flat");
    assert_eq!(std::fs::read_dir(&got)?.count(), count);
    for i in (0..count).step_by(1000) {
        let name = format!("e{i:05}.txt");
        assert_eq!(
            std::fs::read_to_string(got.join(&name))?,
            content(i),
            "{name}"
        );
    }
    Ok(())
}
