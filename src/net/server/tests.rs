//! The handlers over an in-memory pipe: a real store in a temporary folder, the requester's side
//! of each exchange from `wire::exchange`, no QUIC.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

use super::*;
use crate::model::delta::{SigKind, Tree};
use crate::model::manifest::{FilePath, MAX_CHUNK_SIZE};
use crate::wire::exchange::{self, ExchangeError, Framing, UploadStatus};
use crate::wire::protocol::{self, Response};

/// The pipe's sending half: never stopped by its reader; a reset just ends it.
impl Answering for WriteHalf<DuplexStream> {
    async fn stopped(&mut self) {
        std::future::pending::<()>().await;
    }

    fn reset(&mut self) {}
}

type Half = (WriteHalf<DuplexStream>, ReadHalf<DuplexStream>);

/// Both ends of one request stream.
fn pipe() -> (Half, Half) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    ((aw, ar), (bw, br))
}

/// A server of `files` in a temporary folder, and one connection's link from peer `p2`.
fn serving(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Server, Link) {
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in files {
        std::fs::write(dir.path().join(name), data).unwrap();
    }
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let me: PeerId = "p1".parse().unwrap();
    let pins = LivePins::new(crate::net::tls::Pins::default());
    let server = Server::new(me, store, pins, 1 << 20, None);
    let peer: PeerId = "p2".parse().unwrap();
    let link = Link {
        remote: "127.0.0.1:1".parse().unwrap(),
        local: None,
        budget: server.budget.for_peer(&peer),
        peer,
        version: Version::V2,
        wire_sent: Box::new(|| 0),
        plain_for: AtomicU32::new(0),
        pace: codec::Pace::default(),
    };
    (dir, server, link)
}

/// Runs one request: `ask` on the requester's side while the server answers the other end.
async fn exchange<T>(
    server: &Server,
    link: &Link,
    ask: impl AsyncFnOnce(&mut WriteHalf<DuplexStream>, &mut ReadHalf<DuplexStream>) -> T,
) -> T {
    let ((mut cw, mut cr), (mut sw, mut sr)) = pipe();
    let answered = answer::handle(&mut sw, &mut sr, server, link);
    let (got, ()) = tokio::join!(ask(&mut cw, &mut cr), answered);
    got
}

fn name(s: &str) -> FilePath {
    FilePath::new(s).unwrap()
}

fn text(lines: usize, edit: usize) -> Vec<u8> {
    let line = |i: usize| match i == edit {
        true => format!("line {i}: edited here\n"),
        false => format!("line {i}: the same text on every peer\n"),
    };
    (0..lines).flat_map(|i| line(i).into_bytes()).collect()
}

/// A file in memory that counts the bytes read from it.
struct Counting {
    inner: Cursor<Vec<u8>>,
    read: usize,
}

impl tokio::io::AsyncRead for Counting {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += buf.filled().len() - before;
        polled
    }
}

impl tokio::io::AsyncSeek for Counting {
    fn start_seek(
        mut self: std::pin::Pin<&mut Self>,
        position: std::io::SeekFrom,
    ) -> std::io::Result<()> {
        std::pin::Pin::new(&mut self.inner).start_seek(position)
    }

    fn poll_complete(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<u64>> {
        std::pin::Pin::new(&mut self.inner).poll_complete(cx)
    }
}

fn remote_kind(e: ExchangeError) -> ErrorKind {
    match e {
        ExchangeError::Remote(r) => r.kind,
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
async fn a_listing_names_every_served_file_with_its_size_and_hash() {
    let (_dir, server, link) = serving(&[("a.txt", b"alpha"), ("b.txt", b"bravo!")]);
    let (files, total) = exchange(&server, &link, async |w, r| exchange::list(w, r).await)
        .await
        .unwrap();
    assert_eq!(total, 2);
    let got: Vec<(&str, u64)> = files.iter().map(|f| (f.name.as_str(), f.size)).collect();
    assert_eq!(got, [("a.txt", 5), ("b.txt", 6)]);
    assert_eq!(files[0].blake3, *blake3::hash(b"alpha").as_bytes());
}

#[tokio::test]
async fn a_file_not_served_is_described_as_not_found() {
    let (_dir, server, link) = serving(&[("a.txt", b"alpha")]);
    let n = name("missing.txt");
    let got = exchange(&server, &link, async |w, r| {
        exchange::describe(w, r, &n).await
    })
    .await;
    assert_eq!(got.unwrap(), None);
    let n = name("a.txt");
    let got = exchange(&server, &link, async |w, r| {
        exchange::describe(w, r, &n).await
    })
    .await;
    assert_eq!(got.unwrap().unwrap().size(), 5);
}

#[tokio::test]
async fn a_chunk_is_read_and_one_larger_than_any_chunk_is_refused() {
    let data = text(2_000, usize::MAX);
    let (_dir, server, link) = serving(&[("t.txt", &data)]);
    let n = name("t.txt");
    let got = exchange(&server, &link, async |w, r| {
        exchange::read_chunk(w, r, &n, 0, 1024).await
    })
    .await
    .unwrap();
    assert_eq!(got.data[..], data[..1024]);
    let too_long = u32::try_from(MAX_CHUNK_SIZE + 1).unwrap();
    let got = exchange(&server, &link, async |w, r| {
        exchange::read_chunk(w, r, &n, 0, too_long).await
    })
    .await;
    assert_eq!(remote_kind(got.unwrap_err()), ErrorKind::TooLarge);
    // A range past the end of the file is a bad request, not a short read.
    let past = data.len() as u64;
    let got = exchange(&server, &link, async |w, r| {
        exchange::read_range(w, r, &n, past, 10).await
    })
    .await;
    assert_eq!(remote_kind(got.unwrap_err()), ErrorKind::BadRequest);
}

#[tokio::test]
async fn a_whole_file_is_offered_whole() {
    let (_dir, server, link) = serving(&[("a.txt", b"alpha")]);
    let n = name("a.txt");
    let offer = exchange(&server, &link, async |w, r| {
        exchange::observe(w, r, &n, true).await
    })
    .await
    .unwrap()
    .unwrap();
    assert!(offer.held.is_none());
    assert_eq!(offer.manifest.blake3(), *blake3::hash(b"alpha").as_bytes());
    let n = name("b.txt");
    let nothing = exchange(&server, &link, async |w, r| {
        exchange::observe(w, r, &n, false).await
    })
    .await;
    assert!(nothing.unwrap().is_none());
}

#[tokio::test]
async fn a_malformed_request_is_answered_as_a_bad_request() {
    let (_dir, server, link) = serving(&[]);
    let got = exchange(&server, &link, async |w, r| {
        // A frame of the right length holding no request.
        w.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).await.unwrap();
        w.shutdown().await.unwrap();
        protocol::read_msg::<Response>(r, protocol::MAX_RESPONSE_LEN).await
    })
    .await;
    match got.unwrap() {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::BadRequest),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn an_upload_is_stored_and_another_file_under_its_name_is_refused_without_replace() {
    let (dir, server, link) = serving(&[("old.txt", b"mine")]);
    let pace = codec::Pace::default();
    let upload = async |file: &str, data: &[u8]| {
        let (n, body) = (
            name(file),
            (data.len() as u64, *blake3::hash(data).as_bytes()),
        );
        let mut src = Cursor::new(data.to_vec());
        let framing = Framing::Blocks(codec::Mode::Never, &pace);
        let no_tree = None::<std::future::Ready<std::io::Result<Arc<Tree>>>>;
        exchange(&server, &link, async |w, r| {
            exchange::upload(w, r, &n, body, no_tree, &mut src, framing).await
        })
        .await
    };
    let data = text(3_000, usize::MAX);
    assert_eq!(
        upload("new.txt", &data).await.unwrap(),
        UploadStatus::Stored
    );
    assert_eq!(std::fs::read(dir.path().join("new.txt")).unwrap(), data);
    let refused = upload("old.txt", b"theirs").await.unwrap_err();
    assert_eq!(remote_kind(refused), ErrorKind::Conflict);
    assert_eq!(std::fs::read(dir.path().join("old.txt")).unwrap(), b"mine");
}

#[tokio::test]
async fn a_replace_takes_only_what_our_version_lacks_and_keeps_the_old_one() {
    let (old, new) = (text(20_000, 10), text(20_000, 11));
    let (dir, server, link) = serving(&[("t.txt", &old)]);
    let (n, body) = (
        name("t.txt"),
        (new.len() as u64, *blake3::hash(&new).as_bytes()),
    );
    let tree = Tree::of(&new[..], SigKind::default()).unwrap();
    let tree = Some(std::future::ready(Ok(Arc::new(tree))));
    let mut src = Counting {
        inner: Cursor::new(new.clone()),
        read: 0,
    };
    let pace = codec::Pace::default();
    let framing = Framing::Blocks(codec::Mode::Never, &pace);
    let status = exchange(&server, &link, async |w, r| {
        exchange::upload(w, r, &n, body, tree, &mut src, framing).await
    })
    .await;
    assert_eq!(status.unwrap(), UploadStatus::Replaced);
    assert_eq!(std::fs::read(dir.path().join("t.txt")).unwrap(), new);
    // Only the changed region was read from the requester's file, not the whole file.
    assert!(src.read < new.len() / 4, "{} of {}", src.read, new.len());
    // Our old version is kept, hidden.
    let kept = dir.path().join(crate::store::DISPLACED_DIR);
    let kept: Vec<Vec<u8>> = std::fs::read_dir(kept)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(kept, [old]);
}

#[tokio::test]
async fn a_tree_is_told_in_groups_then_leaves_and_too_many_at_once_are_refused() {
    let data = text(20_000, usize::MAX);
    let (_dir, server, link) = serving(&[("t.txt", &data)]);
    let (n, version) = (name("t.txt"), *blake3::hash(&data).as_bytes());
    let tree = Tree::of(&data[..], Version::V2.sig_kind()).unwrap();
    let groups = exchange(&server, &link, async |w, r| {
        exchange::groups(w, r, &n, version).await
    })
    .await
    .unwrap();
    assert_eq!(groups, tree.group_sigs());
    let count = u32::try_from(tree.group_count().min(3)).unwrap();
    let leaves = exchange(&server, &link, async |w, r| {
        exchange::leaves(w, r, &n, version, 0, count).await
    })
    .await
    .unwrap();
    assert_eq!(leaves, tree.leaves_of(0, count as usize));
    let too_many = protocol::MAX_GROUPS_PER_REQUEST + 1;
    let refused = exchange(&server, &link, async |w, r| {
        exchange::leaves(w, r, &n, version, 0, too_many).await
    })
    .await;
    assert_eq!(remote_kind(refused.unwrap_err()), ErrorKind::TooLarge);
    // Another version than the one served: the name holds something else now.
    let other = exchange(&server, &link, async |w, r| {
        exchange::groups(w, r, &n, [7; 32]).await
    })
    .await;
    assert_eq!(remote_kind(other.unwrap_err()), ErrorKind::Conflict);
}

#[tokio::test]
async fn a_download_in_progress_is_listed_observed_and_read_by_version() {
    let data = text(2_000, usize::MAX);
    let (dir, server, link) = serving(&[]);
    let manifest = Manifest::from_reader(&data[..], data.len() as u64).unwrap();
    let (chunk, version) = (manifest.chunk_size(), manifest.blake3());
    // Two chunks of it verified and written, the others not yet.
    let target = dir.path().join("p.txt");
    let tag = crate::store::download_tag(&version);
    let partial = crate::store::PartialFile::create(&target, &tag, manifest.size()).unwrap();
    partial.write_at(0, &data[..2 * chunk as usize]).unwrap();
    let mut have = vec![false; manifest.chunk_count() as usize];
    (have[0], have[1]) = (true, true);
    partial.share(&manifest, &have).unwrap();

    let (files, _, incomplete) =
        exchange(&server, &link, async |w, r| exchange::list_all(w, r).await)
            .await
            .unwrap();
    assert!(files.is_empty());
    assert_eq!(incomplete.len(), 1);
    assert_eq!(
        (incomplete[0].blake3, incomplete[0].held),
        (version, 2 * chunk)
    );

    let n = name("p.txt");
    let offer = exchange(&server, &link, async |w, r| {
        let offer = exchange::observe(w, r, &n, false).await;
        // The observer stays open while the download runs; shutting down ends it.
        server.shutdown.cancel();
        offer
    })
    .await
    .unwrap()
    .unwrap();
    let held = offer.held.unwrap();
    assert_eq!(held.iter().collect::<Vec<u32>>(), [0, 1]);

    let got = exchange(&server, &link, async |w, r| {
        exchange::read_version(w, r, &n, version, chunk, chunk as u32).await
    })
    .await
    .unwrap();
    assert_eq!(got.data[..], data[chunk as usize..2 * chunk as usize]);
    let not_yet = exchange(&server, &link, async |w, r| {
        exchange::read_version(w, r, &n, version, 2 * chunk, chunk as u32).await
    })
    .await;
    assert_eq!(remote_kind(not_yet.unwrap_err()), ErrorKind::NotFound);
}
