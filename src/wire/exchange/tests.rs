use super::answer::*;
use super::ask::*;
use super::body::*;
use super::*;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncRead;

use crate::model::delta::Tree;
use crate::model::manifest::FilePath;
use crate::wire::codec;
use crate::wire::protocol::{
    self, ErrorKind, FileEntry, MAX_LISTED_FILES, RemoteError, Request, Response,
};
use tokio::io::{ReadHalf, WriteHalf};

fn name(s: &str) -> FilePath {
    FilePath::new(s).unwrap()
}

type Half = (
    WriteHalf<tokio::io::DuplexStream>,
    ReadHalf<tokio::io::DuplexStream>,
);

/// Both ends of one stream, over an in-memory pipe.
fn pipe() -> (Half, Half) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    ((aw, ar), (bw, br))
}

#[tokio::test]
async fn list_and_describe_over_a_pipe() {
    let ((mut cw, mut cr), (mut sw, mut sr)) = pipe();
    let entry = FileEntry {
        name: name("a.txt"),
        size: 3,
        blake3: [1; 32],
    };
    let files = vec![entry.clone(); MAX_LISTED_FILES + 2];
    let server = tokio::spawn(async move {
        assert_eq!(read_request(&mut sr).await.unwrap(), Request::List);
        let count = files.len().min(MAX_LISTED_FILES);
        respond(&mut sw, &listing(files)).await;
        count
    });
    let (got, total) = list(&mut cw, &mut cr).await.unwrap();
    assert_eq!(server.await.unwrap(), MAX_LISTED_FILES);
    assert_eq!(
        (got.len(), total),
        (MAX_LISTED_FILES, MAX_LISTED_FILES as u64 + 2)
    );

    let ((mut cw, mut cr), (mut sw, mut sr)) = pipe();
    let server = tokio::spawn(async move {
        let _ = read_request(&mut sr).await.unwrap();
        let err = RemoteError::new(ErrorKind::NotFound, "no such file");
        respond(&mut sw, &Response::Error(err)).await;
    });
    assert_eq!(describe(&mut cw, &mut cr, &name("x")).await.unwrap(), None);
    server.await.unwrap();
}

#[tokio::test]
async fn a_chunk_arrives_whole_and_page_aligned_and_a_short_one_is_an_error() {
    let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    for cut in [false, true] {
        let ((mut cw, mut cr), (mut sw, mut sr)) = pipe();
        let body = data.clone();
        let server = tokio::spawn(async move {
            let req = read_request(&mut sr).await.unwrap();
            assert!(matches!(
                req,
                Request::ReadChunk {
                    offset: 7,
                    len: 300_000,
                    ..
                }
            ));
            if cut {
                let header = protocol::encode_frame(&Response::Chunk { len: 300_000 }).unwrap();
                sw.write_all(&header).await.unwrap();
                sw.write_all(&body[..1000]).await.unwrap();
                sw.shutdown().await.unwrap();
            } else {
                let n = body.len();
                send_chunk(&mut sw, n, Bytes::from(body), false)
                    .await
                    .unwrap();
            }
        });
        let got = read_chunk(&mut cw, &mut cr, &name("a"), 7, 300_000).await;
        server.await.unwrap();
        if cut {
            let err = got.unwrap_err().to_string();
            assert!(err.contains("ended after 1000 of 300000"), "{err}");
        } else {
            let got = got.unwrap().data;
            assert_eq!(got[..], data[..]);
            assert_eq!(got.as_ptr() as usize % PAGE, 0);
        }
    }
}

/// A responder that receives an upload (in blocks if `framed`) into memory and answers
/// `Stored` or the refusal.
async fn receiver(mut sw: impl SendBytes, mut sr: impl AsyncRead + Unpin, framed: bool) -> Vec<u8> {
    let Request::Upload { name, size, .. } = read_request(&mut sr).await.unwrap() else {
        panic!("not an upload");
    };
    let mut got = Vec::new();
    let r = receive_upload(
        &mut sw,
        &mut sr,
        &name,
        Announced {
            size,
            in_blocks: framed,
        },
        64 * 1024,
        Duration::from_secs(5),
        |off, piece: Vec<u8>| {
            assert_eq!(off, got.len() as u64);
            assert!(piece.len() <= 64 * 1024);
            got.extend(piece);
            std::future::ready(Ok::<(), std::io::Error>(()))
        },
    )
    .await;
    match r {
        Ok(_) => respond(&mut sw, &Response::Stored).await,
        Err(BodyError::Refused(e)) => respond(&mut sw, &Response::Error(e)).await,
        Err(e) => panic!("{e}"),
    }
    got
}

#[tokio::test]
async fn an_upload_is_received_in_pieces_and_a_long_or_short_body_is_refused() {
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let pace = codec::Pace::default();
    let (always, never) = (codec::Mode::Always, codec::Mode::Never);
    for framing in [
        Framing::Raw,
        Framing::Blocks(always, &pace),
        Framing::Blocks(never, &pace),
    ] {
        let framed = matches!(framing, Framing::Blocks(..));
        let ((mut cw, mut cr), (sw, sr)) = pipe();
        let server = tokio::spawn(receiver(sw, sr, framed));
        let mut file = std::io::Cursor::new(data.clone());
        let sent = upload(
            &mut cw,
            &mut cr,
            &name("u.bin"),
            (1_000_000, [0; 32]),
            None::<std::future::Ready<std::io::Result<Arc<Tree>>>>,
            &mut file,
            framing,
        )
        .await;
        assert_eq!(sent.unwrap(), UploadStatus::Stored);
        assert_eq!(server.await.unwrap(), data);
    }

    // A requester that sends one byte more, or one less, than it announced.
    for (body, needle) in [(1_000_001, "more bytes"), (999_999, "fewer bytes")] {
        let ((mut cw, mut cr), (sw, sr)) = pipe();
        let server = tokio::spawn(receiver(sw, sr, false));
        let req = Request::Upload {
            name: name("u.bin"),
            size: 1_000_000,
            blake3: [0; 32],
        };
        protocol::write_msg(&mut cw, &req).await.unwrap();
        assert_eq!(response(&mut cr).await.unwrap(), Response::Ready);
        // The responder may stop reading once it has seen too much.
        let _ = cw.write_all(&vec![7u8; body]).await;
        let _ = cw.shutdown().await;
        let err = response(&mut cr).await.unwrap_err().to_string();
        assert!(err.contains(needle), "{body}: {err}");
        server.await.unwrap();
    }
}

/// Sends an upload request and, once `Ready`, `body` as it is; returns the final answer.
async fn raw_upload(size: u64, body: Vec<u8>) -> Result<Response, ExchangeError> {
    let ((mut cw, mut cr), (sw, sr)) = pipe();
    let server = tokio::spawn(receiver(sw, sr, true));
    let req = Request::Upload {
        name: name("u.bin"),
        size,
        blake3: [0; 32],
    };
    protocol::write_msg(&mut cw, &req).await.unwrap();
    assert_eq!(response(&mut cr).await.unwrap(), Response::Ready);
    let _ = cw.write_all(&body).await;
    let _ = cw.shutdown().await;
    let answer = response(&mut cr).await;
    server.await.unwrap();
    answer
}

#[tokio::test]
async fn a_block_that_lies_about_its_length_or_bursts_is_refused() {
    let block = |plain: u32, wire: &[u8]| {
        let mut b = plain.to_be_bytes().to_vec();
        b.extend((wire.len() as u32).to_be_bytes());
        b.extend_from_slice(wire);
        b
    };
    // A frame of 64 MiB of zeros announced as a block of 1000 bytes.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
    let cases = [
        block(1000, &bomb),
        block(codec::MAX_BLOCK + 1, b"x"),
        block(3, b"four"),
        block(1000, b"not a frame"),
    ];
    for body in cases {
        let err = raw_upload(1000, body).await.unwrap_err().to_string();
        assert!(err.contains("u.bin:"), "{err}");
    }
    assert_eq!(
        raw_upload(4, block(4, b"four")).await.unwrap(),
        Response::Stored
    );
}

#[tokio::test]
async fn a_compressed_reply_is_unpacked_and_a_bomb_is_an_error() {
    let text = b"the peer sends text over quic and every byte is checked\n".repeat(20_000);
    let frame = codec::compress(&text, 3).unwrap();
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
    for (body, ok) in [(frame, true), (bomb, false)] {
        let ((mut cw, mut cr), (mut sw, mut sr)) = pipe();
        let len = text.len();
        let server = tokio::spawn(async move {
            let _ = read_request(&mut sr).await.unwrap();
            let _ = send_chunk(&mut sw, len, Bytes::from(body), true).await;
        });
        let got = read_chunk(&mut cw, &mut cr, &name("t"), 0, len as u32).await;
        server.await.unwrap();
        match got {
            Ok(r) if ok => {
                assert_eq!(r.data[..], text[..]);
                assert!(r.wire < len as u64 / 10, "{}", r.wire);
                assert_eq!(r.data.as_ptr() as usize % PAGE, 0);
            }
            Err(e) if !ok => assert!(e.to_string().contains("frame"), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}

/// A sync index answer from a hostile peer is refused when its sequence numbers are out of
/// order or outside what was asked, or a version names a bad vector or peer; a path outside the
/// folder cannot even be decoded.
#[tokio::test]
async fn sync_index_answers_that_break_the_rules_are_refused() {
    use crate::model::vector::{Vector, Version};
    use protocol::SyncRecord;
    let mut vector = Vector::default();
    vector.bump(&"p2".parse().unwrap());
    let record = |path: &str, sequence: u64| SyncRecord {
        path: name(path),
        version: Version {
            size: 1,
            blake3: [1; 32],
            deleted: false,
            vector: vector.clone(),
            modified: 0,
            by: "p2".into(),
            parent: None,
        },
        sequence,
    };
    let answer = |records: Vec<SyncRecord>, last: u64| Response::SyncIndex {
        records,
        last,
        more: false,
    };
    let mut bad_peer = record("a", 6);
    bad_peer.version.by = "../p2".into();
    let mut not_by_its_peer = record("a", 6);
    not_by_its_peer.version.by = "p3".into();
    let mut bad_vector = record("a", 6);
    let mut entries = Vector::default();
    entries.bump(&"p9".parse().unwrap());
    bad_vector.version.vector = entries.merged(&vector);
    bad_vector.version.vector = reversed(&bad_vector.version.vector);
    let cases = [
        (
            "fine",
            answer(vec![record("a", 6), record("b", 7)], 9),
            true,
        ),
        (
            "out of order",
            answer(vec![record("a", 7), record("b", 6)], 9),
            false,
        ),
        ("at or below since", answer(vec![record("a", 5)], 9), false),
        ("beyond last", answer(vec![record("a", 10)], 9), false),
        ("bad peer", answer(vec![bad_peer], 9), false),
        (
            "made by a peer not in its vector",
            answer(vec![not_by_its_peer], 9),
            false,
        ),
        ("unsorted vector", answer(vec![bad_vector], 9), false),
    ];
    for (what, response, ok) in cases {
        let ((mut cw, mut cr), (mut sw, mut sr)) = pipe();
        let server = tokio::spawn(async move {
            let _ = read_request(&mut sr).await.unwrap();
            respond(&mut sw, &response).await;
        });
        let got = sync_index(&mut cw, &mut cr, "notes", 5, 0).await;
        server.await.unwrap();
        assert_eq!(got.is_ok(), ok, "{what}: {got:?}");
    }
    // `..` in a path is refused while the answer is decoded.
    let mut raw = vec![20u8, 1, 4];
    raw.extend(b"../a");
    assert!(postcard::from_bytes::<Response>(&raw).is_err());
}

/// The same entries in the reverse order (a vector only a hostile peer would send).
fn reversed(v: &crate::model::vector::Vector) -> crate::model::vector::Vector {
    let mut entries: Vec<(String, u64)> = v.entries().to_vec();
    entries.reverse();
    let bytes = postcard::to_stdvec(&entries).unwrap();
    postcard::from_bytes(&bytes).unwrap()
}
