//! A hostile but listed peer, built on the library, against a real `qnode serve` process: requests
//! the CLI never sends. Each gets a clear error or a reset; the server stays up and keeps serving a
//! well-behaved peer.

mod util;

use std::sync::Arc;

use qnode::manifest::FileName;
use qnode::peers::{PeerId, Root};
use qnode::protocol::{self, ErrorKind, MAX_RESPONSE_LEN, Request, Response, encode_frame};
use qnode::{identity, tls};
use util::{Net, TestResult};

/// A QUIC connection from `me` to `peer`, with `me`'s real identity.
async fn connect(
    net: &Net,
    me: &str,
    peer: &str,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let root = Root::new(net.root());
    let me: PeerId = me.parse()?;
    let peer: PeerId = peer.parse()?;
    let id = identity::load(&root, &me)?;
    let config = tls::client_config(&id, &peer, identity::load_cert(&root, &peer)?)?;
    let (endpoint, _) = tls::bind_endpoint("127.0.0.1:0".parse()?, None, None)?;
    let port = net
        .peers
        .iter()
        .find(|(p, _)| *p == peer.to_string())
        .unwrap()
        .1;
    let conn = endpoint
        .connect_with(
            config,
            format!("127.0.0.1:{port}").parse()?,
            tls::SERVER_NAME,
        )?
        .await?;
    Ok((endpoint, conn))
}

/// Sends raw bytes as a request, finishes, and reads one response.
async fn raw(conn: &quinn::Connection, bytes: &[u8]) -> anyhow::Result<Response> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(bytes).await?;
    send.finish()?;
    Ok(protocol::read_msg(&mut recv, MAX_RESPONSE_LEN).await?)
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

fn expect_error(resp: Response, kind: ErrorKind, what: &str) {
    match resp {
        Response::Error(e) => assert_eq!(e.kind, kind, "{what}: {}", e.message),
        other => panic!("{what}: expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_the_server_keeps_serving() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3"])?;
    net.put("p1", "ok.txt", b"fine")?;
    std::fs::write(net.root().join("secret.txt"), b"outside")?;
    let server = net.serve("p1", &["--max-upload-size", "1000000"])?;
    let (_ep, conn) = connect(&net, "p2", "p1").await?;

    // Framing: oversized length prefix, garbage, unknown variant, truncated.
    expect_error(
        raw(&conn, &[0xff, 0xff, 0xff, 0xff]).await?,
        ErrorKind::BadRequest,
        "huge length",
    );
    expect_error(
        raw(&conn, &frame(&[0xde, 0xad, 0xbe, 0xef, 0x99])).await?,
        ErrorKind::BadRequest,
        "garbage",
    );
    expect_error(
        raw(&conn, &frame(&[42])).await?,
        ErrorKind::BadRequest,
        "unknown request tag",
    );
    expect_error(
        raw(&conn, &[0, 0, 0, 9, 1, 5, b'a']).await?,
        ErrorKind::BadRequest,
        "truncated",
    );
    expect_error(
        raw(&conn, &[0, 0]).await?,
        ErrorKind::BadRequest,
        "half a length",
    );

    // Names: traversal, NUL, 1 MB long, absolute, hidden.
    for bad in ["../secret.txt", "a\0b", "/etc/passwd", ".hidden", ".."] {
        let mut payload = vec![1u8, bad.len() as u8];
        payload.extend_from_slice(bad.as_bytes());
        expect_error(
            raw(&conn, &frame(&payload)).await?,
            ErrorKind::BadRequest,
            bad,
        );
    }
    // Describe (tag 1), then a name of 1 MiB: varint 0x100000, then the bytes.
    let mut long = vec![1u8, 0x80, 0x80, 0x40];
    long.extend_from_slice(&vec![b'a'; 1 << 20]);
    expect_error(
        raw(&conn, &frame(&long)).await?,
        ErrorKind::BadRequest,
        "1 MB name",
    );

    // Chunk reads: past the end, overflowing, oversized, of a missing file.
    let ok = FileName::new("ok.txt")?;
    let read = |offset, len| {
        encode_frame(&Request::ReadChunk {
            name: ok.clone(),
            offset,
            len,
        })
        .unwrap()
    };
    expect_error(
        raw(&conn, &read(4, 1)).await?,
        ErrorKind::BadRequest,
        "past the end",
    );
    expect_error(
        raw(&conn, &read(u64::MAX, 2)).await?,
        ErrorKind::BadRequest,
        "offset overflow",
    );
    expect_error(
        raw(&conn, &read(0, u32::MAX)).await?,
        ErrorKind::TooLarge,
        "huge chunk",
    );
    let missing = encode_frame(&Request::Describe {
        name: FileName::new("nope.txt")?,
    })?;
    expect_error(
        raw(&conn, &missing).await?,
        ErrorKind::NotFound,
        "missing file",
    );

    // Uploads: a terabyte claim; more bytes than claimed; fewer bytes than claimed.
    let upload = |name: &str, size| {
        encode_frame(&Request::Upload {
            name: FileName::new(name).unwrap(),
            size,
            blake3: [0; 32],
        })
        .unwrap()
    };
    expect_error(
        raw(&conn, &upload("tb.bin", 1 << 40)).await?,
        ErrorKind::TooLarge,
        "1 TB upload",
    );
    for (name, claimed, sent) in [("more.bin", 10u64, 20usize), ("fewer.bin", 20, 10)] {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&upload(name, claimed)).await?;
        let ready: Response = protocol::read_msg(&mut recv, MAX_RESPONSE_LEN).await?;
        assert_eq!(ready, Response::Ready, "{name}");
        send.write_all(&vec![7u8; sent]).await?;
        send.finish()?;
        let resp: Response = protocol::read_msg(&mut recv, MAX_RESPONSE_LEN).await?;
        expect_error(resp, ErrorKind::Corrupt, name);
        assert!(
            !net.served("p1").join(name).exists(),
            "{name} must not appear"
        );
    }
    // Right size, wrong hash.
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&upload("hash.bin", 5)).await?;
    let _ready: Response = protocol::read_msg(&mut recv, MAX_RESPONSE_LEN).await?;
    send.write_all(b"12345").await?;
    send.finish()?;
    expect_error(
        protocol::read_msg(&mut recv, MAX_RESPONSE_LEN).await?,
        ErrorKind::Corrupt,
        "bad hash",
    );
    assert!(util::leftovers(&net.served("p1")).is_empty());

    // A flood: 2000 streams, far more than the server allows at once (256), all silent. The well-
    // behaved peer p3, on its own connection, is still served meanwhile.
    let conn = Arc::new(conn);
    let mut silent = Vec::new();
    for _ in 0..2000 {
        let c = conn.clone();
        silent.push(tokio::spawn(async move {
            if let Ok((mut send, _recv)) = c.open_bi().await {
                // Opening a stream needs a byte on the wire; then say nothing more.
                let _ = send.write_all(&[0]).await;
                tokio::time::sleep(std::time::Duration::from_secs(3)).await;
            }
        }));
    }
    let good = tokio::task::spawn_blocking({
        let root = net.root().to_owned();
        move || {
            std::process::Command::new(util::qnode_bin())
                .args(["--root"])
                .arg(root)
                .args(["--peer", "p3", "list", "p1", "--json"])
                .env_remove("RUST_LOG")
                .output()
        }
    })
    .await??;
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(String::from_utf8_lossy(&good.stdout).contains("ok.txt"));
    for t in silent {
        t.abort();
    }
    conn.close(0u32.into(), b"bye");

    // Datagrams that never become a handshake: garbage, and a truncated client Initial.
    let port = net.peers.iter().find(|(p, _)| p == "p1").unwrap().1;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
    for i in 0..500u32 {
        let mut junk = util::random_bytes(1200, u64::from(i));
        if i % 2 == 0 {
            junk[0] = 0xc0; // long header, Initial
            junk[1..5].copy_from_slice(&1u32.to_be_bytes()); // QUIC v1
        }
        udp.send_to(&junk, ("127.0.0.1", port))?;
    }

    // Still up, memory bounded, nothing escaped served_files, no panic in its log.
    let rss_kib = util::proc_status_kib(server.pid(), "VmHWM");
    assert!(
        rss_kib < 128 * 1024,
        "server peak RSS {rss_kib} KiB after the hostile run"
    );
    let out = net.ok("p3", &["download", "ok.txt", "p1"])?;
    assert!(out.success());
    assert_eq!(std::fs::read(net.root().join("secret.txt"))?, b"outside");
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_presenting_the_servers_own_identity_is_refused() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    net.put("p1", "ok.txt", b"fine")?;
    let server = net.serve("p1", &[])?;
    // p1's own key, dialling p1 (e.g. a copied root): the server refuses it.
    let (_ep, conn) = connect(&net, "p1", "p1").await?;
    let result = raw(&conn, &encode_frame(&Request::List)?).await;
    assert!(result.is_err(), "must not be served: {result:?}");
    server.wait_for_log("own identity", std::time::Duration::from_secs(10))?;
    Ok(())
}
