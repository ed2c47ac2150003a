//! A peer as a download's source: a [`Client`] serving one file to the download engine
//! ([`ChunkSource`]) and to an update ([`RangeSource`]), connecting again when its connection is
//! lost; for a download in progress at the peer, what it holds as that grows.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::model::delta::{Sig, SigKind};
use crate::model::manifest::{ChunkSet, FilePath, Hash32, Regrain};
use crate::net::client::{Change, Changes, Client, ClientError, Received, Redial};
use crate::transfer::download::{ChunkSource, SourceError};
use crate::transfer::update::RangeSource;

/// A peer serving one file, as the download engine sees it. If its connection is lost, the next
/// request connects again (the engine decides when to ask, with backoff).
#[derive(Debug)]
pub struct PeerSource {
    client: tokio::sync::Mutex<Client>,
    redial: Redial,
    name: FilePath,
    label: String,
    kind: SigKind,
    /// For a download in progress at the peer: the version, and what it holds as it changes.
    partial: Option<Partial>,
    /// Bytes of replies that crossed the wire (compressed or not).
    wire: std::sync::atomic::AtomicU64,
    /// Its connection was made again (the one it was given was lost): that one is its own.
    redialed: std::sync::atomic::AtomicBool,
}

/// A source that holds part of the file: a download in progress at the peer.
#[derive(Debug)]
struct Partial {
    version: Hash32,
    holds: watch::Receiver<ChunkSet>,
    /// Follows the peer's changes; stopped when the source goes.
    follower: tokio::task::AbortHandle,
}

impl Drop for Partial {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl PeerSource {
    /// `client` serving `name`, reconnecting with `redial` when needed.
    pub fn new(client: Client, name: FilePath, redial: Redial) -> Self {
        let label = client.peer().to_string();
        Self {
            kind: client.sig_kind(),
            client: tokio::sync::Mutex::new(client),
            redial,
            name,
            label,
            partial: None,
            wire: Default::default(),
            redialed: Default::default(),
        }
    }

    /// Bytes of this source's replies that crossed the wire so far.
    pub fn wire_bytes(&self) -> u64 {
        self.wire.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts a reply's wire bytes and hands over its plain ones.
    fn count(&self, got: Received) -> Bytes {
        (self.wire).fetch_add(got.wire, std::sync::atomic::Ordering::Relaxed);
        got.data
    }

    /// Makes this a source that holds part of version `version` of the file: `held` now, then
    /// what `changes` says it gains (every chunk once it says it is complete), all counted in
    /// the download's unit by `regrain`.
    pub fn holding(
        mut self,
        version: Hash32,
        held: ChunkSet,
        changes: Option<Changes>,
        regrain: Regrain,
    ) -> Self {
        let (tx, holds) = watch::channel(regrain.apply(&held));
        let follower = tokio::spawn(async move {
            let Some(mut changes) = changes else { return };
            let mut theirs = held;
            loop {
                match changes.next().await {
                    Ok(Change::Gained(chunks)) => {
                        chunks.into_iter().for_each(|i| theirs.insert(i));
                        tx.send_replace(regrain.apply(&theirs));
                    }
                    Ok(Change::Complete) => {
                        let all = ChunkSet::all(theirs.len());
                        tx.send_replace(regrain.apply(&all));
                        return;
                    }
                    // What it holds stays as last known; asking for more fails on its own.
                    Err(_) => return,
                }
            }
        });
        self.partial = Some(Partial {
            version,
            holds,
            follower: follower.abort_handle(),
        });
        self
    }

    /// How this peer signs trees.
    pub fn sig_kind(&self) -> SigKind {
        self.kind
    }

    /// Whether the peer holds the whole file (not a download in progress).
    pub fn is_whole(&self) -> bool {
        self.partial.is_none()
    }

    /// The current connection, made again if the last one was lost.
    async fn client(&self) -> Result<Client, ClientError> {
        let mut current = self.client.lock().await;
        if !current.is_open() {
            let peer = current.peer().clone();
            let addr = match &self.redial.via {
                // Relayed: a new relay (the old one may be gone with its introducer).
                Some(via) => via.relay(&self.redial.endpoint, &peer).await?,
                None => self.redial.addr,
            };
            *current = Client::connect(
                &self.redial.endpoint,
                self.redial.config.clone(),
                &peer,
                addr,
            )
            .await?;
            self.redialed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(current.clone())
    }

    /// The group signatures of version `blake3` of the file.
    pub async fn groups(&self, blake3: Hash32) -> Result<Vec<Sig>, ClientError> {
        self.client().await?.groups(&self.name, blake3).await
    }

    /// The leaf signatures of groups `first..first + count` of version `blake3` of the file.
    pub async fn leaves(
        &self,
        blake3: Hash32,
        first: u32,
        count: u32,
    ) -> Result<Vec<Sig>, ClientError> {
        let client = self.client().await?;
        client.leaves(&self.name, blake3, first, count).await
    }

    /// `len` bytes of the file at `offset` (at most one chunk), unverified.
    pub async fn read_range(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        let client = self.client().await?;
        Ok(self.count(client.read_range(&self.name, offset, len).await?))
    }

    /// Closes the connection it made again, if it did.
    pub async fn close(&self) {
        // The connection it was given is the session's, which may use it for the next file.
        if self.redialed.load(std::sync::atomic::Ordering::Relaxed) {
            self.client.lock().await.close();
        }
    }
}

impl RangeSource for PeerSource {
    type Error = ClientError;

    fn sig_kind(&self) -> SigKind {
        self.kind
    }

    async fn groups(&self, version: Hash32) -> Result<Vec<Sig>, ClientError> {
        Self::groups(self, version).await
    }

    async fn leaves(
        &self,
        version: Hash32,
        first: u32,
        count: u32,
    ) -> Result<Vec<Sig>, ClientError> {
        Self::leaves(self, version, first, count).await
    }

    async fn read_range(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        Self::read_range(self, offset, len).await
    }
}

impl ChunkSource for PeerSource {
    fn name(&self) -> &str {
        &self.label
    }

    async fn read_chunk(&self, _index: u32, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        let fail = |e: ClientError| {
            if e.is_fatal() {
                SourceError::Lost(Box::new(e))
            } else {
                SourceError::Failed(Box::new(e))
            }
        };
        let client = self.client().await.map_err(fail)?;
        let got = match &self.partial {
            Some(p) => {
                client
                    .read_version(&self.name, p.version, offset, len)
                    .await
            }
            None => client.read_chunk(&self.name, offset, len).await,
        };
        got.map(|g| self.count(g)).map_err(fail)
    }

    fn holds(&self) -> Option<watch::Receiver<ChunkSet>> {
        self.partial.as_ref().map(|p| p.holds.clone())
    }

    fn rtt(&self) -> Option<Duration> {
        // Not waiting for a reconnect in progress: the window keeps its last size meanwhile.
        self.client.try_lock().ok().map(|c| c.rtt())
    }
}
