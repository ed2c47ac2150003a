//! One connection to one peer, and its typed requests.
//!
//! A [`Client`] owns a QUIC connection (pinned mutual TLS, see `tls`) and opens one bidirectional
//! stream per request. Every error names the peer. The peer as a download's source is
//! `net::source`. Scheduling across peers is not done here.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::model::delta::{Sig, SigKind, Tree};
use crate::model::manifest::{FilePath, Hash32, Manifest};
use crate::model::peers::PeerId;
use crate::net::tls::{self, SERVER_NAME};
use crate::wire::codec;
use crate::wire::exchange::{self, ExchangeError, Framing};
pub use crate::wire::exchange::{Change, Offer, Received, UploadStatus};
use crate::wire::protocol::{
    self, CloseCode, ErrorKind, FileEntry, Incomplete, ProtocolError, RemoteError, Version,
};

/// How long connecting (UDP + QUIC + TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A request to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection could be made.
    #[error("cannot reach {peer} at {addr}: {reason}")]
    Unreachable {
        /// Who.
        peer: PeerId,
        /// Where.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A peer listed as `auto` was not found on the local network.
    #[error("cannot find {peer}: {reason}")]
    NotFound {
        /// Who.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// The peer speaks a version without folders, and the name is in one.
    #[error("{peer} is an older qnode, which does not support folders")]
    NoFolders {
        /// Who.
        peer: PeerId,
    },
    /// The peer is not in our table (any more).
    #[error("{peer} is not listed in peer_settings.txt")]
    NotListed {
        /// Who.
        peer: PeerId,
    },
    /// The connection broke or was refused (the message names the peer and says what to check).
    #[error("{}", explain(peer, source))]
    Connection {
        /// Who.
        peer: PeerId,
        /// What happened.
        source: quinn::ConnectionError,
    },
    /// A stream failed or carried bad data.
    #[error("{peer}: {source}")]
    Protocol {
        /// Who.
        peer: PeerId,
        /// What went wrong.
        source: ProtocolError,
    },
    /// The peer answered with an error.
    #[error("{peer}: {source}")]
    Remote {
        /// Who.
        peer: PeerId,
        /// Its answer.
        source: RemoteError,
    },
    /// The peer answered with something that does not fit the request.
    #[error("{peer}: unexpected answer to {request}")]
    Unexpected {
        /// Who.
        peer: PeerId,
        /// Which request.
        request: &'static str,
    },
    /// A local file could not be read.
    #[error("reading {path}: {source}")]
    Local {
        /// Which file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl ClientError {
    /// Whether the connection is unusable from now on.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. }
                | Self::NotFound { .. }
                | Self::NotListed { .. }
                | Self::Connection { .. }
        )
    }

    /// The remote error kind, if the peer answered with one.
    pub fn remote_kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Remote { source, .. } => Some(source.kind),
            _ => None,
        }
    }
}

/// A live connection to one peer.
#[derive(Debug, Clone)]
pub struct Client {
    peer: PeerId,
    conn: quinn::Connection,
    version: Version,
}

impl Client {
    /// Connects to `peer` at `addr` with `config` (which pins its certificate).
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        config: quinn::ClientConfig,
        peer: &PeerId,
        addr: SocketAddr,
    ) -> Result<Self, ClientError> {
        match Self::connect_within(endpoint, config, peer, addr, CONNECT_TIMEOUT).await? {
            Some(client) => Ok(client),
            None => Err(ClientError::Unreachable {
                peer: peer.clone(),
                addr,
                reason: format!(
                    "no answer within {}s (is `qnode --peer {peer} serve` running?)",
                    CONNECT_TIMEOUT.as_secs()
                ),
            }),
        }
    }

    /// [`Client::connect`], giving up after `wait` without an answer (`None`).
    pub async fn connect_within(
        endpoint: &quinn::Endpoint,
        config: quinn::ClientConfig,
        peer: &PeerId,
        addr: SocketAddr,
        wait: Duration,
    ) -> Result<Option<Self>, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            peer: peer.clone(),
            addr,
            reason,
        };
        let connecting = endpoint
            .connect_with(config, addr, SERVER_NAME)
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = match tokio::time::timeout(wait, connecting).await {
            Err(_) => return Ok(None),
            Ok(Err(e)) => return Err(unreachable(explain(peer, &e))),
            Ok(Ok(c)) => c,
        };
        Ok(Some(Self {
            peer: peer.clone(),
            version: tls::version(&conn),
            conn,
        }))
    }

    /// Who this is connected to.
    pub fn peer(&self) -> &PeerId {
        &self.peer
    }

    /// How this peer signs trees (the protocol version the connection agreed on).
    pub fn sig_kind(&self) -> SigKind {
        self.version.sig_kind()
    }

    /// The connection's current round-trip estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// The address the connection goes to.
    pub fn remote(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// Resolves once the connection is closed, by either side or by a timeout.
    pub async fn closed(&self) {
        self.conn.closed().await;
    }

    /// Closes the connection politely (the caller should then `wait_idle` the endpoint).
    pub fn close(&self) {
        self.conn.close(CloseCode::Done.code().into(), b"done");
    }

    /// The files the peer serves (the first `MAX_LISTED_FILES` if there are more), how many it
    /// serves, and its downloads in progress (none from an older peer, which does not list them).
    pub async fn list(&self) -> Result<(Vec<FileEntry>, u64, Vec<Incomplete>), ClientError> {
        if self.version.has_folders() {
            return self.list_pages().await;
        }
        match self
            .on_stream(async |send, recv| exchange::list_all(send, recv).await)
            .await
        {
            Err(e) if e.remote_kind() == Some(ErrorKind::BadRequest) => {
                let (files, total) = self
                    .on_stream(async |send, recv| exchange::list(send, recv).await)
                    .await?;
                Ok((files, total, Vec::new()))
            }
            other => other,
        }
    }

    /// Every file of the peer's tree, page by page (`qnode/3`), and its downloads in progress.
    async fn list_pages(&self) -> Result<(Vec<FileEntry>, u64, Vec<Incomplete>), ClientError> {
        let (mut files, mut incomplete) = (Vec::<FileEntry>::new(), Vec::new());
        loop {
            let after = files.last().map(|f| f.name.clone());
            let page = self
                .on_stream(async |send, recv| exchange::list_page(send, recv, after.as_ref()).await)
                .await?;
            if after.is_none() {
                incomplete = page.incomplete;
            }
            files.extend(page.files);
            if !page.more {
                let total = files.len() as u64;
                return Ok((files, total, incomplete));
            }
        }
    }

    /// The manifest of `name`, or `None` if the peer does not serve it.
    pub async fn describe(&self, name: &FilePath) -> Result<Option<Manifest>, ClientError> {
        self.knows(name)?;
        self.on_stream(async |send, recv| exchange::describe(send, recv, name).await)
            .await
    }

    /// `len` bytes of `name` at `offset`, unverified (the caller checks them).
    pub async fn read_chunk(
        &self,
        name: &FilePath,
        offset: u64,
        len: u32,
    ) -> Result<Received, ClientError> {
        self.on_stream(async |send, recv| exchange::read_chunk(send, recv, name, offset, len).await)
            .await
    }

    /// Chunk of version `blake3` of `name` at `offset`, from the peer's whole file or its
    /// download in progress; unverified.
    pub async fn read_version(
        &self,
        name: &FilePath,
        blake3: Hash32,
        offset: u64,
        len: u32,
    ) -> Result<Received, ClientError> {
        self.on_stream(async |send, recv| {
            exchange::read_version(send, recv, name, blake3, offset, len).await
        })
        .await
    }

    /// The whole of version `blake3` of the small file `name` (`size` bytes), unverified.
    pub async fn read_file(
        &self,
        name: &FilePath,
        blake3: Hash32,
        size: u32,
    ) -> Result<Received, ClientError> {
        self.knows(name)?;
        self.on_stream(async |send, recv| exchange::read_file(send, recv, name, blake3, size).await)
            .await
    }

    /// One level of folder `path` (`None`: nothing under it), `fresh` or from the peer's last
    /// fresh walk.
    pub async fn folder_level(
        &self,
        path: &FilePath,
        fresh: bool,
    ) -> Result<Option<exchange::Level>, ClientError> {
        self.knows(path)?;
        self.on_stream(async |send, recv| exchange::folder_level(send, recv, path, fresh).await)
            .await
    }

    /// Where `peer` is, as this peer (an introducer `peer` keeps a connection to) sees it, once
    /// `peer` was asked to open its NAT toward us.
    pub async fn introduce(&self, peer: &PeerId) -> Result<SocketAddr, ClientError> {
        self.on_stream(async |send, recv| exchange::introduce(send, recv, peer.as_str()).await)
            .await
    }

    /// Where to dial to reach `peer` through this peer's relay (`peer` keeps a connection to
    /// it and was asked to open its NAT toward the relay).
    pub async fn relay(&self, peer: &PeerId) -> Result<SocketAddr, ClientError> {
        self.on_stream(async |send, recv| exchange::relay(send, recv, peer.as_str()).await)
            .await
    }

    /// Answers the requests an introducer sends on this connection (we dialled it and keep
    /// the connection so that it can introduce others to us) until the connection ends: each
    /// `Punch` calls `punch` with the address to send datagrams to.
    pub async fn answer_introductions(&self, punch: impl Fn(SocketAddr)) {
        while let Ok((mut send, mut recv)) = self.conn.accept_bi().await {
            let answer = match exchange::read_request(&mut recv).await {
                Ok(protocol::Request::Punch { peer, addr }) => {
                    tracing::info!(
                        "{} introduces {peer}: opening our NAT toward {addr}",
                        self.peer
                    );
                    punch(addr);
                    protocol::Response::Punched
                }
                _ => protocol::Response::Error(RemoteError::new(
                    ErrorKind::BadRequest,
                    "only introductions are answered here",
                )),
            };
            exchange::respond(&mut send, &answer).await;
        }
    }

    /// What changed in the peer's synced folder `folder` after `since` (waiting up to
    /// `wait_ms` for a change).
    pub async fn sync_index(
        &self,
        folder: &str,
        since: u64,
        wait_ms: u32,
    ) -> Result<exchange::SyncPage, ClientError> {
        self.on_stream(async |send, recv| {
            exchange::sync_index(send, recv, folder, since, wait_ms).await
        })
        .await
    }

    /// What the peer holds of `name`, in pieces where the file has them (`ObservePieces`; an
    /// older peer is asked `Observe`, and one older still `Describe`), and for a download in
    /// progress there, what it gains.
    pub async fn observe(
        &self,
        name: &FilePath,
    ) -> Result<Option<(Offer, Option<Changes>)>, ClientError> {
        self.knows(name)?;
        for in_pieces in [true, false] {
            let (mut send, mut recv) = self.open().await?;
            match exchange::observe(&mut send, &mut recv, name, in_pieces).await {
                Ok(None) => return Ok(None),
                Ok(Some(offer)) => {
                    let changes = offer.held.as_ref().map(|held| Changes {
                        chunks: held.len(),
                        _send: send,
                        recv,
                    });
                    return Ok(Some((offer, changes)));
                }
                Err(ExchangeError::Remote(e)) if e.kind == ErrorKind::BadRequest => {}
                Err(e) => return Err(self.exchange(e)),
            }
        }
        let manifest = self.describe(name).await?;
        Ok(manifest.map(|manifest| {
            let offer = Offer {
                manifest,
                held: None,
                in_pieces: false,
                pieces: None,
            };
            (offer, None)
        }))
    }

    /// `len` bytes of `name` at any `offset` (at most one chunk), unverified.
    pub async fn read_range(
        &self,
        name: &FilePath,
        offset: u64,
        len: u32,
    ) -> Result<Received, ClientError> {
        self.on_stream(async |send, recv| exchange::read_range(send, recv, name, offset, len).await)
            .await
    }

    /// The group signatures of version `blake3` of `name`.
    pub async fn groups(&self, name: &FilePath, blake3: Hash32) -> Result<Vec<Sig>, ClientError> {
        self.on_stream(async |send, recv| exchange::groups(send, recv, name, blake3).await)
            .await
    }

    /// The leaf signatures of groups `first..first + count` of version `blake3` of `name`.
    pub async fn leaves(
        &self,
        name: &FilePath,
        blake3: Hash32,
        first: u32,
        count: u32,
    ) -> Result<Vec<Sig>, ClientError> {
        self.on_stream(async |send, recv| {
            exchange::leaves(send, recv, name, blake3, first, count).await
        })
        .await
    }

    /// Uploads the local file at `path` (`size` bytes hashing to `blake3`) as `name`; with
    /// `replace` (the file's tree), a different file under that name at the peer is replaced,
    /// sending only what the peer lacks.
    pub async fn upload(
        &self,
        name: &FilePath,
        path: &Path,
        (size, blake3): (u64, Hash32),
        replace: Option<impl Future<Output = Result<Arc<Tree>, std::io::Error>>>,
        compression: codec::Mode,
    ) -> Result<UploadStatus, ClientError> {
        let local = |source| ClientError::Local {
            path: path.display().to_string(),
            source,
        };
        self.knows(name)?;
        let mut file = tokio::fs::File::open(path).await.map_err(local)?;
        let (mut send, mut recv) = self.open().await?;
        // A `qnode/2` peer takes the bytes in blocks, compressed as `compression` says.
        let pace = codec::Pace::with_spare(crate::net::machine::cores_to_spare);
        let framing = match self.version {
            Version::V2 | Version::V3 => Framing::Blocks(compression, &pace),
            Version::V1 => Framing::Raw,
        };
        let file = &mut file;
        let body = (size, blake3);
        let sent = exchange::upload(&mut send, &mut recv, name, body, replace, file, framing);
        // What the link takes, measured beside the upload (see `codec::Pace`).
        let measure = async {
            loop {
                pace.on_wire(self.conn.stats().udp_tx.bytes);
                tokio::time::sleep(codec::PACE_SAMPLE).await;
            }
        };
        let sent = tokio::select! {
            sent = sent => sent,
            never = measure => never,
        };
        match sent {
            Ok(status) => Ok(status),
            Err(ExchangeError::Local(e)) => Err(local(e)),
            Err(e) => Err(self.exchange(e)),
        }
    }

    /// Whether the peer speaks a version with folders (`qnode/3`).
    pub fn has_folders(&self) -> bool {
        self.version.has_folders()
    }

    /// Whether the peer can be asked about `name`: one in a folder needs `qnode/3`.
    fn knows(&self, name: &FilePath) -> Result<(), ClientError> {
        if name.is_top_level() || self.version.has_folders() {
            return Ok(());
        }
        Err(ClientError::NoFolders {
            peer: self.peer.clone(),
        })
    }

    /// A new request stream.
    async fn open(&self) -> Result<(quinn::SendStream, quinn::RecvStream), ClientError> {
        self.conn.open_bi().await.map_err(|e| self.connection(e))
    }

    /// Runs one exchange on a new stream; its failure names the peer.
    async fn on_stream<T>(
        &self,
        exchange: impl AsyncFnOnce(
            &mut quinn::SendStream,
            &mut quinn::RecvStream,
        ) -> Result<T, ExchangeError>,
    ) -> Result<T, ClientError> {
        let (mut send, mut recv) = self.open().await?;
        exchange(&mut send, &mut recv)
            .await
            .map_err(|e| self.exchange(e))
    }

    /// Names the peer in a failed exchange.
    fn exchange(&self, e: ExchangeError) -> ClientError {
        let peer = self.peer.clone();
        match e {
            ExchangeError::Protocol(source) => self.protocol(source),
            ExchangeError::Remote(source) => ClientError::Remote { peer, source },
            ExchangeError::Unexpected(request) => ClientError::Unexpected { peer, request },
            ExchangeError::Local(source) => ClientError::Local {
                path: "(local file)".into(),
                source,
            },
        }
    }

    fn connection(&self, source: quinn::ConnectionError) -> ClientError {
        ClientError::Connection {
            peer: self.peer.clone(),
            source,
        }
    }

    fn protocol(&self, source: ProtocolError) -> ClientError {
        // A stream error caused by the connection closing is reported as the connection's error.
        if let Some(reason) = self.conn.close_reason() {
            return self.connection(reason);
        }
        ClientError::Protocol {
            peer: self.peer.clone(),
            source,
        }
    }
}

/// What an observed download in progress at a peer gains, as the peer tells it.
#[derive(Debug)]
pub struct Changes {
    chunks: u32,
    /// Kept open: dropping it would tell the peer to stop.
    _send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Changes {
    /// The next change; an error when the peer's download stopped or the stream broke.
    pub async fn next(&mut self) -> Result<Change, ExchangeError> {
        exchange::next_change(&mut self.recv, self.chunks).await
    }
}

/// The TLS alert carried in a QUIC crypto error code (0x100-0x1ff), if it is one.
fn tls_alert(code: quinn::TransportErrorCode) -> Option<u8> {
    let c = u64::from(code);
    (0x100..=0x1ff).contains(&c).then_some((c & 0xff) as u8)
}

/// The TLS alert for "no application protocol" (no ALPN in common).
const NO_APPLICATION_PROTOCOL: u8 = 120;

/// Turns a connection failure into a sentence that says what to check.
fn explain(peer: &PeerId, e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as E;
    let version = || {
        format!(
            "{peer} speaks none of {} (another qnode version?)",
            protocol::ALPNS.map(String::from_utf8_lossy).join(", ")
        )
    };
    match e {
        E::TransportError(t) => match tls_alert(t.code) {
            Some(NO_APPLICATION_PROTOCOL) => version(),
            Some(_) => format!(
                "the certificate {peer} presented does not match certs/{peer}.pem (if {peer}'s key was replaced, copy its new certs/{peer}.pem here)"
            ),
            None => format!("connection to {peer} failed: {t}"),
        },
        E::ConnectionClosed(c) => match tls_alert(c.error_code) {
            Some(NO_APPLICATION_PROTOCOL) => version(),
            Some(_) => format!(
                "{peer} refused our certificate (does {peer}'s certs/ folder hold our current certificate, and was {peer} restarted after it was copied?)"
            ),
            None => format!("connection closed by {peer}: {c}"),
        },
        E::ApplicationClosed(c) if c.error_code == CloseCode::Shutdown.code().into() => {
            format!("{peer} is shutting down")
        }
        E::ApplicationClosed(c) => format!(
            "{peer} closed the connection: {}",
            String::from_utf8_lossy(&c.reason)
        ),
        E::TimedOut => format!("{peer} stopped answering"),
        E::Reset => format!("{peer} reset the connection (did it restart?)"),
        other => format!("connection to {peer} lost: {other}"),
    }
}

/// How to connect to a peer again: its endpoint, pinned configuration and address.
#[derive(Debug, Clone)]
pub struct Redial {
    /// The local endpoint.
    pub endpoint: quinn::Endpoint,
    /// The client configuration pinning the peer's certificate.
    pub config: quinn::ClientConfig,
    /// The peer's address.
    pub addr: SocketAddr,
    /// For a peer reached through a relay: the introducer to ask for a new one (the old one
    /// may be gone with its introducer's restart).
    pub via: Option<Via>,
}

/// An introducer that relays to a peer, and how to dial it.
#[derive(Debug, Clone)]
pub struct Via {
    /// Who.
    pub introducer: PeerId,
    /// Where.
    pub addr: SocketAddr,
    /// The client configuration pinning its certificate.
    pub config: quinn::ClientConfig,
}

impl Via {
    /// Where to dial `peer` through a new relay of the introducer's.
    pub async fn relay(
        &self,
        endpoint: &quinn::Endpoint,
        peer: &PeerId,
    ) -> Result<SocketAddr, ClientError> {
        let config = self.config.clone();
        let introducer = Client::connect(endpoint, config, &self.introducer, self.addr).await?;
        let mut waits = RELAY_RETRIES.iter();
        let relay = loop {
            match introducer.relay(peer).await {
                Err(e) if e.remote_kind() == Some(ErrorKind::NotFound) => match waits.next() {
                    Some(wait) => tokio::time::sleep(*wait).await,
                    None => break Err(e),
                },
                other => break other,
            }
        };
        introducer.close();
        relay
    }
}

/// We ask again for a relay mostly because the introducer restarted, and `peer` may need a
/// moment to connect to it again: an answer that it is not there is asked again after these.
const RELAY_RETRIES: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];
