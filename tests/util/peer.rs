//! A listed peer built on the library, speaking the wire directly: for the hostile tests and the
//! attacks benchmark.

use std::future::Future;
use std::sync::Arc;

use qnode::model::manifest::FilePath;
use qnode::model::peers::{PeerId, Root};
use qnode::net::{identity, tls};
use qnode::wire::protocol::{self, ErrorKind, MAX_RESPONSE_LEN, Request, Response, encode_frame};

use super::Net;

/// What a fake peer answers one request with, on its stream.
pub type Answer = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// A QUIC connection from `me` to `peer`, with `me`'s real identity.
pub async fn connect(
    net: &Net,
    me: &str,
    peer: &str,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    connect_with(net, me, peer, None).await
}

/// [`connect`] with the client's own transport settings (flow-control windows), if given.
pub async fn connect_with(
    net: &Net,
    me: &str,
    peer: &str,
    transport: Option<quinn::TransportConfig>,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    connect_speaking(net, me, peer, transport, &protocol::ALPNS).await
}

/// [`connect_with`], offering only `protocols`.
pub async fn connect_speaking(
    net: &Net,
    me: &str,
    peer: &str,
    transport: Option<quinn::TransportConfig>,
    protocols: &[&[u8]],
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let root = Root::new(net.root());
    let me: PeerId = me.parse()?;
    let peer: PeerId = peer.parse()?;
    let id = identity::load(&root, &me)?;
    let pinned = identity::load_cert(&root, &peer)?;
    let mut config = tls::client_config_speaking(&id, &peer, pinned, protocols)?;
    if let Some(t) = transport {
        config.transport_config(Arc::new(t));
    }
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
pub async fn raw(conn: &quinn::Connection, bytes: &[u8]) -> anyhow::Result<Response> {
    let (_send, mut recv) = ask(conn, bytes).await?;
    Ok(protocol::read_msg(&mut recv, MAX_RESPONSE_LEN).await?)
}

/// Opens a stream, sends raw bytes as a request and finishes; the caller reads (or doesn't).
pub async fn ask(
    conn: &quinn::Connection,
    bytes: &[u8],
) -> anyhow::Result<(quinn::SendStream, quinn::RecvStream)> {
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(bytes).await?;
    send.finish()?;
    Ok((send, recv))
}

/// Runs listed peer `id` (on its address, with its real identity, trusting `asker`) as a fake
/// that hands each request, with its stream, to `answer`.
/// A fake peer's answer to a request it does not play along with.
pub async fn not_found(send: &mut quinn::SendStream) {
    let no = protocol::RemoteError::new(ErrorKind::NotFound, "no");
    qnode::wire::exchange::respond(send, &Response::Error(no)).await;
}

/// A fake peer's answer to a request an older qnode does not know.
pub async fn unknown(send: &mut quinn::SendStream) {
    let no = protocol::RemoteError::new(ErrorKind::BadRequest, "unsupported request");
    qnode::wire::exchange::respond(send, &Response::Error(no)).await;
}

pub fn fake_peer(
    net: &Net,
    id: &str,
    asker: &str,
    answer: impl Fn(Request, quinn::SendStream) -> Answer + Send + Sync + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let port = net.peers.iter().find(|(p, _)| p == id).unwrap().1;
    fake_peer_at(
        net.root(),
        id,
        asker,
        format!("127.0.0.1:{port}").parse()?,
        answer,
    )
}

/// [`fake_peer`] of the root at `root`, listening at `addr`.
pub fn fake_peer_at(
    root: &std::path::Path,
    id: &str,
    asker: &str,
    addr: std::net::SocketAddr,
    answer: impl Fn(Request, quinn::SendStream) -> Answer + Send + Sync + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let root = Root::new(root);
    let me: PeerId = id.parse()?;
    let asker: PeerId = asker.parse()?;
    let mut pins = tls::Pins::default();
    pins.insert(asker.clone(), &identity::load_cert(&root, &asker)?);
    let config = tls::server_config(
        &identity::load(&root, &me)?,
        tls::LivePins::new(pins),
        tls::Congestion::default(),
    )?;
    let (endpoint, _) = tls::bind_endpoint(addr, Some(config), None)?;
    let answer = Arc::new(answer);
    Ok(tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let answer = answer.clone();
            tokio::spawn(async move {
                while let Ok((send, mut recv)) = conn.accept_bi().await {
                    let answer = answer.clone();
                    tokio::spawn(async move {
                        if let Ok(req) = qnode::wire::exchange::read_request(&mut recv).await {
                            answer(req, send).await;
                        }
                    });
                }
            });
        }
    }))
}

/// A download in progress in `dir`, as `qnode download` leaves one: a sparse temporary file
/// (zeros) of `manifest`'s size and its sidecar, holding the chunks `held` marks.
pub fn partial_in_progress(
    dir: &std::path::Path,
    name: &str,
    manifest: &qnode::model::manifest::Manifest,
    held: &[bool],
) -> anyhow::Result<()> {
    let tag = qnode::store::download_tag(&manifest.blake3());
    let p = qnode::store::PartialFile::create_sparse(&dir.join(name), &tag, manifest.size())?;
    p.share(manifest, held)?;
    p.keep_for_resume();
    Ok(())
}

/// The manifest of `size` zero bytes.
pub fn zeros_manifest(size: u64) -> anyhow::Result<qnode::model::manifest::Manifest> {
    use std::io::Read;
    Ok(qnode::model::manifest::Manifest::from_reader(
        std::io::repeat(0).take(size),
        size,
    )?)
}

/// CPU seconds (user and system) `pid` has used.
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |x| x.1);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name, the state is field 3: utime and stime (14 and 15) are at 11 and 12.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / hz
}

pub fn observe_pieces(name: &str) -> Vec<u8> {
    encode_frame(&Request::ObservePieces {
        name: FilePath::new(name).unwrap(),
    })
    .unwrap()
}

/// Flow-control windows of 1 KiB: a peer that takes almost nothing of what it is sent.
pub fn stingy() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(1024u32.into());
    t.receive_window(8192u32.into());
    t
}

/// `Groups` of `name` at `version`.
pub fn groups_request(name: &str, version: [u8; 32]) -> Vec<u8> {
    encode_frame(&Request::Groups {
        name: FilePath::new(name).unwrap(),
        blake3: version,
    })
    .unwrap()
}

/// The most threads `pid` had while `work` ran, sampled every 20 ms.
pub async fn peak_threads<T>(pid: i32, work: impl Future<Output = T>) -> (T, u64) {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(super::proc_status_kib(pid, "Threads"));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        peak
    });
    let out = work.await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    (out, sampler.await.unwrap_or(0))
}

/// Runs listed peer `id` (trusting `asker`) as a peer that holds `data` whole and serves its
/// bytes honestly, but whose tree is `groups` (signatures that add up to the file and lead
/// nowhere) and whose every `Leaves` answer is empty. Returns its task and how many `Leaves`
/// requests it got.
pub fn update_liar(
    net: &Net,
    (id, asker): (&str, &str),
    data: bytes::Bytes,
    groups: Vec<qnode::model::delta::Sig>,
) -> anyhow::Result<(
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicUsize>,
)> {
    let manifest = qnode::model::manifest::Manifest::from_reader(&data[..], data.len() as u64)?;
    let groups = Arc::new(groups);
    let leaves = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let asked = leaves.clone();
    let task = fake_peer(net, id, asker, move |req, mut send| {
        let (manifest, data) = (manifest.clone(), data.clone());
        let (groups, asked) = (groups.clone(), asked.clone());
        Box::pin(async move {
            match req {
                Request::Observe { .. } => {
                    let _ = qnode::wire::exchange::send_holding(&mut send, &manifest, None).await;
                }
                Request::ObservePieces { .. } => unknown(&mut send).await,
                Request::Groups { .. } => {
                    let lie = Response::Groups(groups.to_vec());
                    qnode::wire::exchange::respond(&mut send, &lie).await;
                }
                Request::Leaves { .. } => {
                    asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    qnode::wire::exchange::respond(&mut send, &Response::Leaves(vec![])).await;
                }
                Request::ReadChunk { offset, len, .. }
                | Request::ReadRange { offset, len, .. }
                | Request::ReadVersion { offset, len, .. } => {
                    let (at, len) = (offset as usize, len as usize);
                    let body = data.slice(at..(at + len).min(data.len()));
                    let _ = qnode::wire::exchange::send_chunk(&mut send, len, body, false).await;
                }
                _ => not_found(&mut send).await,
            }
        })
    })?;
    Ok((task, leaves))
}

/// Opens a `Replace` of `name` announcing `size` bytes, and checks that the server asks for the
/// signatures (it was admitted); the caller sends them, or doesn't.
pub async fn start_replace(
    conn: &quinn::Connection,
    name: &str,
    size: u64,
) -> anyhow::Result<(quinn::SendStream, quinn::RecvStream)> {
    let replace = encode_frame(&Request::Replace {
        name: FilePath::new(name)?,
        size,
        blake3: [1; 32],
    })?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&replace).await?;
    let first: Response = protocol::read_msg(&mut recv, MAX_RESPONSE_LEN).await?;
    anyhow::ensure!(first == Response::SendDelta, "replace of {name}: {first:?}");
    Ok((send, recv))
}

/// A net of 33 peers where p1 serves, with a download in progress of 1 GiB (zeros, every other
/// chunk held) for the 32 others (`ids[1..]`) to observe.
pub fn observed_partial() -> anyhow::Result<(Net, Vec<&'static str>, super::Server)> {
    const IDS: [&str; 33] = [
        "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9", "p10", "p11", "p12", "p13", "p14",
        "p15", "p16", "p17", "p18", "p19", "p20", "p21", "p22", "p23", "p24", "p25", "p26", "p27",
        "p28", "p29", "p30", "p31", "p32", "p33",
    ];
    let net = Net::new(&IDS)?;
    let manifest = zeros_manifest(1 << 30)?;
    let half: Vec<bool> = (0..manifest.chunk_count()).map(|i| i % 2 == 0).collect();
    partial_in_progress(&net.served("p1"), "big.bin", &manifest, &half)?;
    let server = net.serve("p1", &[])?;
    Ok((net, IDS.to_vec(), server))
}
