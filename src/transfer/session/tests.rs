use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::*;
use crate::transfer::download::{ChunkSource, SourceError};

/// A version in memory.
type Data = Arc<Vec<u8>>;

/// Peers in memory: each answers its next answer when asked (the last one again once it runs
/// out); `None` holds nothing under the name.
#[derive(Default)]
struct Shelf {
    answers: Mutex<HashMap<PeerId, VecDeque<Option<Data>>>>,
    closed: AtomicU64,
    /// Sources serve nothing until a peer has given its last answer after another one.
    gated: bool,
    /// Peers that gave their last answer.
    gave_last: Mutex<std::collections::HashSet<PeerId>>,
    release: tokio::sync::watch::Sender<bool>,
}

impl Shelf {
    fn with(peers: &[(&str, &[Option<&Data>])]) -> Self {
        let answers = peers
            .iter()
            .map(|(p, a)| (id(p), a.iter().map(|d| d.cloned()).collect()))
            .collect();
        Self {
            answers: Mutex::new(answers),
            ..Self::default()
        }
    }
}

/// A peer that holds a whole version, in memory.
struct Mem {
    name: String,
    data: Arc<Vec<u8>>,
    gate: Option<tokio::sync::watch::Receiver<bool>>,
}

impl ChunkSource for Mem {
    fn name(&self) -> &str {
        &self.name
    }

    async fn read_chunk(&self, _: u32, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        if let Some(mut gate) = self.gate.clone() {
            let _ = gate.wait_for(|open| *open).await;
        }
        let (at, end) = (offset as usize, offset as usize + len as usize);
        Ok(Bytes::copy_from_slice(&self.data[at..end]))
    }
}

impl RangeSource for Mem {
    type Error = std::io::Error;

    fn sig_kind(&self) -> SigKind {
        SigKind::default()
    }

    async fn groups(&self, _: Hash32) -> Result<Vec<Sig>, Self::Error> {
        Err(std::io::Error::other("no trees here"))
    }

    async fn leaves(&self, _: Hash32, _: u32, _: u32) -> Result<Vec<Sig>, Self::Error> {
        Err(std::io::Error::other("no trees here"))
    }

    async fn read_range(&self, offset: u64, len: u32) -> Result<Bytes, Self::Error> {
        let (at, end) = (offset as usize, offset as usize + len as usize);
        Ok(Bytes::copy_from_slice(&self.data[at..end]))
    }
}

impl Peers for Shelf {
    type Lead = Arc<Vec<u8>>;
    type Source = Mem;
    type Error = std::io::Error;

    async fn ask(
        &self,
        peer: &PeerId,
        _: &FilePath,
    ) -> Result<Option<(Offer, Self::Lead)>, Self::Error> {
        let mut answers = self.answers.lock().unwrap();
        let Some(queue) = answers.get_mut(peer) else {
            return Err(std::io::Error::other("unreachable"));
        };
        let answer = match queue.len() {
            1 => queue[0].clone(),
            _ => queue.pop_front().flatten(),
        };
        // A peer giving its last answer a second time was asked again: sources may serve.
        let last = queue.len() == 1;
        if last && !self.gave_last.lock().unwrap().insert(peer.clone()) {
            self.release.send_replace(true);
        }
        Ok(answer.map(|data| {
            let manifest = Manifest::from_reader(&data[..], data.len() as u64).unwrap();
            let offer = Offer {
                manifest,
                held: None,
                in_pieces: false,
                pieces: None,
            };
            (offer, data)
        }))
    }

    fn sig_kind(&self, _: &Self::Lead) -> SigKind {
        SigKind::default()
    }

    async fn groups(&self, _: &Self::Lead, _: &FilePath, _: Hash32) -> Option<Vec<Sig>> {
        None
    }

    fn source(
        &self,
        peer: &PeerId,
        _: &FilePath,
        data: Self::Lead,
        holding: Option<Holding>,
    ) -> Result<Mem, Self::Error> {
        assert!(holding.is_none(), "every fake peer holds its version whole");
        let name = peer.to_string();
        let gate = self.gated.then(|| self.release.subscribe());
        Ok(Mem { name, data, gate })
    }

    async fn close(&self, source: &Mem) -> u64 {
        self.closed.fetch_add(1, Ordering::SeqCst);
        source.data.len() as u64
    }
}

fn id(s: &str) -> PeerId {
    s.parse().unwrap()
}

fn data(len: usize, seed: u8) -> Arc<Vec<u8>> {
    Arc::new((0..len).map(|i| (i % 251) as u8 ^ seed).collect())
}

fn plan(dir: &Path, peers: &[&str], blake3: Option<Hash32>) -> Plan {
    let name = FilePath::new("notes.txt").unwrap();
    Plan {
        target: dir.join(name.as_str()),
        name,
        peers: peers.iter().map(|p| id(p)).collect(),
        blake3,
        window: None,
        update: false,
        offer_as: None,
    }
}

fn why(done: &Downloaded<std::io::Error>, peer: &str) -> String {
    let found = done.left_out.iter().find(|(p, _)| *p == id(peer));
    found.map(|(_, why)| why.to_string()).unwrap_or_default()
}

#[tokio::test]
async fn the_version_most_peers_serve_is_fetched_from_them_and_the_others_are_named() {
    let (a, b) = (data(300_000, 1), data(200_000, 2));
    let shelf = Shelf::with(&[
        ("p1", &[Some(&a)]),
        ("p2", &[Some(&b)]),
        ("p3", &[Some(&a)]),
        ("p4", &[None]),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), &["p1", "p2", "p3", "p4", "p5"], None);
    let done = download(&shelf, &plan, std::future::pending(), |_| {})
        .await
        .unwrap();
    assert_eq!(done.status, Fetched::Downloaded);
    assert_eq!(std::fs::read(&plan.target).unwrap(), *a);
    let report = done.report.as_ref().unwrap();
    let mut used: Vec<&str> = report.sources.iter().map(|s| s.name.as_str()).collect();
    used.sort();
    assert_eq!(used, ["p1", "p3"]);
    assert!(why(&done, "p2").starts_with("serves a different version of notes.txt"));
    assert_eq!(why(&done, "p4"), "does not serve notes.txt");
    assert_eq!(why(&done, "p5"), "unreachable");
    // Every source made was closed, and its bytes counted.
    assert_eq!(shelf.closed.load(Ordering::SeqCst), 2);
    assert_eq!(done.wire_bytes, 2 * a.len() as u64);
}

#[tokio::test]
async fn the_wanted_version_is_fetched_even_from_a_minority() {
    let (a, b) = (data(100_000, 1), data(120_000, 2));
    let shelf = Shelf::with(&[
        ("p1", &[Some(&a)]),
        ("p2", &[Some(&a)]),
        ("p3", &[Some(&b)]),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let wanted = Manifest::from_reader(&b[..], b.len() as u64)
        .unwrap()
        .blake3();
    let plan = plan(dir.path(), &["p1", "p2", "p3"], Some(wanted));
    let done = download(&shelf, &plan, std::future::pending(), |_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&plan.target).unwrap(), *b);
    assert_eq!(done.manifest.blake3(), wanted);
}

#[tokio::test]
async fn a_peer_that_held_nothing_and_starts_serving_joins_when_asked_again() {
    let a = data(64_000, 3);
    // p2 holds nothing at first, then the same version (it started downloading it too). p1
    // serves nothing until p2 has been asked again, so the download is still running then.
    let mut shelf = Shelf::with(&[("p1", &[Some(&a)]), ("p2", &[None, Some(&a)])]);
    shelf.gated = true;
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), &["p1", "p2"], None);
    let done = download(&shelf, &plan, std::future::pending(), |_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&plan.target).unwrap(), *a);
    let report = done.report.as_ref().unwrap();
    assert!(report.sources.iter().any(|s| s.name == "p2"), "{report:?}");
    assert!(done.left_out.is_empty(), "{:?}", done.left_out);
}

#[tokio::test]
async fn when_no_peer_serves_the_file_the_error_names_each_reason() {
    let shelf = Shelf::with(&[("p2", &[None])]);
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), &["p1", "p2"], None);
    let err = download(&shelf, &plan, std::future::pending(), |_| {})
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("p1: unreachable"), "{msg}");
    assert!(msg.contains("p2: does not serve notes.txt"), "{msg}");
    assert!(!plan.target.exists());
}

#[tokio::test]
async fn another_file_at_the_target_is_kept_and_the_refusal_says_how_to_update() {
    let a = data(10_000, 4);
    let shelf = Shelf::with(&[("p1", &[Some(&a)])]);
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), &["p1"], None);
    std::fs::write(&plan.target, b"my own notes").unwrap();
    let err = download(&shelf, &plan, std::future::pending(), |_| {})
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("--update"), "{err:#}");
    assert_eq!(std::fs::read(&plan.target).unwrap(), b"my own notes");
}
