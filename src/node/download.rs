//! The `download` use case: where the file goes and whom to ask, then `transfer::session` over
//! this node's connections (the peers as [`Peers`]).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;

use anyhow::bail;

use super::Node;
use crate::model::delta::{Sig, SigKind};
use crate::model::manifest::{FilePath, Hash32};
use crate::model::peers::PeerId;
use crate::net::client::{Changes, Client, ClientError, Offer};
use crate::net::source::PeerSource;
use crate::transfer::session::{self, Holding, Peers, Plan};

pub use crate::transfer::session::{Fetched, NotServed};

/// Why a peer took no part in a download.
pub type LeftOut = session::LeftOut<ClientError>;
/// What happens during a download, for progress display.
pub type DownloadEvent<'a> = session::DownloadEvent<'a, ClientError>;
/// What a download did.
pub type Downloaded = session::Downloaded<ClientError>;

/// A validated download request: a file, or (`Node::download_folder`) a folder.
#[derive(Debug, Clone)]
pub struct DownloadRequest {
    /// The file.
    pub name: FilePath,
    /// Peers to fetch from (empty: every other peer).
    pub peers: Vec<PeerId>,
    /// Where to write it (a folder means FOLDER/NAME); default our served_files/NAME.
    pub output: Option<PathBuf>,
    /// The version wanted, if given.
    pub blake3: Option<Hash32>,
    /// A fixed request window per peer, if given.
    pub window: Option<usize>,
    /// Bring another version we hold up to date instead of refusing.
    pub update: bool,
}

impl Node {
    /// `download`: fetch one file from every peer that serves it, until done or `interrupt`.
    pub async fn download(
        &self,
        req: &DownloadRequest,
        interrupt: impl Future<Output = ()>,
        on: impl FnMut(DownloadEvent<'_>),
    ) -> anyhow::Result<Downloaded> {
        let plan = self.download_plan(req)?;
        session::download(&Asking::new(self), &plan, interrupt, on).await
    }

    /// Where a download goes, and whom to ask.
    fn download_plan(&self, req: &DownloadRequest) -> anyhow::Result<Plan> {
        let name = req.name.as_str();
        // In a folder: its folders are made first, each a real folder (never a symlink).
        let beneath = |root: PathBuf| -> anyhow::Result<PathBuf> {
            crate::store::make_folders(&root, &req.name)?;
            Ok(root.join(name))
        };
        let target = match &req.output {
            Some(p) if p.is_dir() => beneath(p.clone())?,
            Some(p) => p.clone(),
            None => beneath(self.served_dir())?,
        };
        let peers: Vec<PeerId> = self
            .select(&req.peers)?
            .into_iter()
            .map(|e| e.id)
            .filter(|id| *id != self.me)
            .collect();
        if peers.is_empty() {
            bail!("no peer to download {name} from");
        }
        // In our served_files under its own name (at any depth), or at its top.
        let served = target == self.served_dir().join(name)
            || target.parent() == Some(self.served_dir().as_path());
        Ok(Plan {
            name: req.name.clone(),
            target,
            peers,
            blake3: req.blake3,
            window: req.window,
            update: req.update,
            offer_as: served.then(|| self.me.clone()),
        })
    }
}

/// The node's peers as a download session asks them: over the node's connections, each source
/// reconnecting on its own.
pub(super) struct Asking<'a> {
    pub(super) node: &'a Node,
    /// Peers that serve the file under another name (its content held elsewhere in their
    /// trees), and that name: asked and read under it.
    pub(super) aliases: HashMap<PeerId, FilePath>,
}

impl<'a> Asking<'a> {
    pub(super) fn new(node: &'a Node) -> Self {
        let aliases = HashMap::new();
        Self { node, aliases }
    }

    /// The name `peer` serves the file under.
    fn name_at<'n>(&'n self, peer: &PeerId, name: &'n FilePath) -> &'n FilePath {
        self.aliases.get(peer).unwrap_or(name)
    }
}

/// The connection that answered (and the name it was asked under) and, for a download in
/// progress there, what it gains.
pub(super) struct Lead {
    client: Client,
    name: FilePath,
    changes: Option<Changes>,
}

impl Peers for Asking<'_> {
    type Lead = Lead;
    type Source = PeerSource;
    type Error = ClientError;

    async fn ask(
        &self,
        peer: &PeerId,
        name: &FilePath,
    ) -> Result<Option<(Offer, Lead)>, ClientError> {
        let client = self.node.client(&self.node.entry(peer)?).await?;
        let name = self.name_at(peer, name).clone();
        let answer = client.observe(&name).await?;
        Ok(answer.map(|(offer, changes)| {
            (
                offer,
                Lead {
                    client,
                    name,
                    changes,
                },
            )
        }))
    }

    fn sig_kind(&self, lead: &Lead) -> SigKind {
        lead.client.sig_kind()
    }

    async fn groups(&self, lead: &Lead, _: &FilePath, version: Hash32) -> Option<Vec<Sig>> {
        lead.client.groups(&lead.name, version).await.ok()
    }

    fn source(
        &self,
        peer: &PeerId,
        name: &FilePath,
        lead: Lead,
        holding: Option<Holding>,
    ) -> Result<PeerSource, ClientError> {
        let redial = self.node.redial(&self.node.entry(peer)?)?;
        let source = PeerSource::new(lead.client, self.name_at(peer, name).clone(), redial);
        Ok(match holding {
            Some(h) => source.holding(h.version, h.held, lead.changes, h.regrain),
            None => source,
        })
    }

    async fn close(&self, source: &PeerSource) -> u64 {
        source.close().await;
        source.wire_bytes()
    }
}
