//! What a local user, or a damaged root, can do to qnode: links planted at temporary names, local
//! files that are FIFOs, endless or huge, a private key others can read, absurd settings lines, and
//! closed output streams. Each ends in a clear one-line error or is defused; none hangs or panics.

mod util;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::process::Stdio;
use std::time::Duration;

use util::{Net, TestResult, b3, random_bytes};

fn mkfifo(path: &std::path::Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[test]
fn a_download_never_writes_through_a_symlink_planted_at_its_temp_name() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let data = random_bytes(300_000, 5);
    net.put("p1", "notes.txt", &data)?;
    let _p1 = net.serve("p1", &[])?;
    let outside = tempfile::tempdir()?;
    let victim = outside.path().join("victim.txt");
    std::fs::write(&victim, b"precious")?;
    // The temp name is predictable: .<name>.<first 16 hex of its BLAKE3>.part.
    let temp = format!(".notes.txt.{}.part", &b3(&data)[..16]);
    symlink(&victim, net.served("p2").join(&temp))?;

    net.ok("p2", &["download", "notes.txt", "p1"])?;
    assert_eq!(std::fs::read(&victim)?, b"precious", "the link's target");
    let got = net.served("p2").join("notes.txt");
    assert!(std::fs::symlink_metadata(&got)?.is_file(), "not a link");
    assert_eq!(std::fs::read(&got)?, data);
    assert!(!net.served("p2").join(&temp).exists());
    Ok(())
}

#[test]
fn an_upload_never_writes_through_a_symlink_planted_at_its_temp_name() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let server = net.serve("p1", &[])?;
    let outside = tempfile::tempdir()?;
    let victim = outside.path().join("victim.txt");
    std::fs::write(&victim, b"precious")?;
    // The server's first upload: .<name>.upload-<pid>-0.part.
    let temp = format!(".up.txt.upload-{}-0.part", server.pid());
    symlink(&victim, net.served("p1").join(&temp))?;
    let path = net.put("p2", "up.txt", b"uploaded bytes")?;
    net.ok("p2", &["upload", path.to_str().unwrap(), "p1"])?;
    assert_eq!(std::fs::read(&victim)?, b"precious");
    let got = net.served("p1").join("up.txt");
    assert!(std::fs::symlink_metadata(&got)?.is_file());
    assert_eq!(std::fs::read(&got)?, b"uploaded bytes");
    Ok(())
}

/// Runs `list` for p2 with a deadline, and returns its one-line error.
fn list_error(net: &Net) -> anyhow::Result<String> {
    let mut child = net
        .cmd("p2", &["list", "p1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let status = util::poll(Duration::from_secs(10), || Ok(child.try_wait()?));
    if status.is_err() {
        let _ = child.kill();
        anyhow::bail!("list hung");
    }
    let out = child.wait_with_output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    Ok(err)
}

#[test]
fn local_files_that_are_fifos_endless_huge_or_exposed_give_one_line_errors() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let cert = net.root().join("certs/p1.pem");
    let saved = std::fs::read(&cert)?;

    // A FIFO in place of a pinned certificate: reading it would wait for a writer forever.
    std::fs::remove_file(&cert)?;
    mkfifo(&cert);
    assert!(list_error(&net)?.contains("not a regular file"));
    // A link to /dev/zero: it never ends.
    std::fs::remove_file(&cert)?;
    symlink("/dev/zero", &cert)?;
    assert!(list_error(&net)?.contains("not a regular file"));
    // 200 MB: not read whole.
    std::fs::remove_file(&cert)?;
    std::fs::File::create(&cert)?.set_len(200 << 20)?;
    assert!(list_error(&net)?.contains("more than the 65536 expected"));
    std::fs::remove_file(&cert)?;
    std::fs::write(&cert, saved)?;

    // A private key others can read is refused, as ssh refuses it.
    let key = net.root().join("p2/identity.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    let err = list_error(&net)?;
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;

    // A folder where the key should be: the reason once (it was "Is a directory (os error 21)"
    // twice).
    std::fs::rename(&key, net.root().join("key.bak"))?;
    std::fs::create_dir(&key)?;
    let err = list_error(&net)?;
    assert_eq!(err.matches("not a regular file").count(), 1, "{err}");
    std::fs::remove_dir(&key)?;
    std::fs::rename(net.root().join("key.bak"), &key)?;
    // And where the settings should be.
    let settings = net.root().join("peer_settings.txt");
    let text = std::fs::read_to_string(&settings)?;
    std::fs::rename(&settings, net.root().join("settings.bak"))?;
    std::fs::create_dir(&settings)?;
    let err = list_error(&net)?;
    assert_eq!(err.matches("not a regular file").count(), 1, "{err}");
    std::fs::remove_dir(&settings)?;

    // A 1 MB line is quoted in part, not whole.
    std::fs::write(&settings, format!("{text}\n{}\n", "x".repeat(1 << 20)))?;
    let err = list_error(&net)?;
    assert!(
        err.contains("line") && err.len() < 500,
        "{} bytes",
        err.len()
    );
    Ok(())
}

#[test]
fn closed_stdout_and_stderr_end_quietly_without_a_panic() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    for i in 0..2000 {
        net.put("p1", &format!("f{i:04}.txt"), b"x")?;
    }
    let _p1 = net.serve("p1", &[])?;
    for args in [
        &["list", "p1"][..],
        &["list", "p1", "--json"],
        &["download", "f0001.txt", "p1"],
    ] {
        // Like `qnode list p1 | head -0`: the reader is gone before anything is written.
        let mut child = net
            .cmd("p2", args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        drop(child.stdout.take());
        let out = child.wait_with_output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_ne!(out.status.code(), Some(101), "{args:?}: {err}");
    }
    // A failing command whose stderr is closed: an error exit, not a panic (101).
    let mut child = net
        .cmd("p2", &["download", "missing.txt", "p1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    drop(child.stderr.take());
    let status = child.wait()?;
    assert_eq!(status.code(), Some(1));
    Ok(())
}

/// Issue 24: a `qnode/3` listing is never cut (it is paged); a `qnode/2` peer's `List` is still
/// cut at the cap and says how many files there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_cut_at_the_cap_says_so() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    let cap = qnode::wire::protocol::MAX_LISTED_FILES;
    for i in 0..cap + 5 {
        std::fs::File::create(net.served("p1").join(format!("f{i:06}.txt")))?;
    }
    let _p1 = net.serve("p1", &[])?;
    let out = net.ok("p2", &["list", "p1", "--json"])?;
    let json = out.json()?;
    assert_eq!(json["peers"][0]["files"].as_array().unwrap().len(), cap + 5);
    assert!(json["peers"][0].get("total").is_none(), "not cut: {json}");
    assert_eq!(out.stderr(), "");
    let (_ep, conn) =
        util::peer::connect_speaking(&net, "p2", "p1", None, &[qnode::wire::protocol::ALPN_V2])
            .await?;
    let list = qnode::wire::protocol::encode_frame(&qnode::wire::protocol::Request::List)?;
    match util::peer::raw(&conn, &list).await? {
        qnode::wire::protocol::Response::FilesCut { files, total } => {
            assert_eq!((files.len(), total), (cap, cap as u64 + 5));
        }
        other => panic!("expected a cut listing, got {other:?}"),
    }
    // Under the cap: no total, no warning.
    let small = Net::new(&["p1", "p2"])?;
    small.put("p1", "a.txt", b"a")?;
    let _s = small.serve("p1", &[])?;
    let out = small.ok("p2", &["list", "p1", "--json"])?;
    assert!(out.json()?["peers"][0].get("total").is_none());
    assert_eq!(out.stderr(), "");
    Ok(())
}
