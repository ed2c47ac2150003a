//! The peers' answers: gathered until the version is known, agreed on, and (while the download
//! runs) taken late or asked again, each peer joining as a source or left out with why.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use tokio::sync::mpsc;

use super::{ASK_AGAIN, ASK_AGAIN_MAX, Answer, DOWNLOAD_GRACE, Holding, LeftOut, Peers};
use crate::engine::choice;
use crate::model::manifest::{FilePath, Hash32, Manifest, Regrain, hex};
use crate::model::peers::PeerId;
use crate::transfer::download::ChunkSource;
use crate::wire::exchange::Offer;

/// The running download's door for peers that answer late or are asked again.
pub(super) struct Joining<'a, P: Peers> {
    pub(super) peers: &'a P,
    pub(super) name: &'a FilePath,
    /// The version fetched.
    pub(super) manifest: &'a Manifest,
    /// The same, in the unit the download counts (chunks or pieces).
    pub(super) download: &'a Manifest,
    /// Sends new sources to the engine; `None` once no one else will join.
    pub(super) join: RefCell<Option<mpsc::UnboundedSender<Arc<P::Source>>>>,
    /// Every source made, to close at the end.
    pub(super) opened: RefCell<Vec<Arc<P::Source>>>,
}

impl<'a, P: Peers> Joining<'a, P> {
    pub(super) fn new(
        peers: &'a P,
        name: &'a FilePath,
        (manifest, download): (&'a Manifest, &'a Manifest),
        join: mpsc::UnboundedSender<Arc<P::Source>>,
    ) -> Self {
        Self {
            peers,
            name,
            manifest,
            download,
            join: RefCell::new(Some(join)),
            opened: RefCell::new(Vec::new()),
        }
    }

    /// The sources that hold the whole file (those that can tell its tree).
    pub(super) fn whole_sources(&self) -> Vec<Arc<P::Source>> {
        let opened = self.opened.borrow();
        opened
            .iter()
            .filter(|s| s.holds().is_none())
            .cloned()
            .collect()
    }

    /// Takes the answers still coming from `asking` while the download runs, and asks the
    /// `absent` peers again now and then, until every peer has answered and joined or is out
    /// (`leave`); then tells the engine that no one else will join.
    pub(super) async fn late<'p>(
        &self,
        asking: &mut (impl futures_util::Stream<Item = (&'p PeerId, Answer<P>)> + Unpin),
        mut absent: Vec<&'p PeerId>,
        answered: &mut Vec<PeerId>,
        leave: impl Fn(&PeerId, LeftOut<P::Error>),
    ) {
        let (mut asked_all, mut pause) = (false, ASK_AGAIN);
        let again = tokio::time::sleep(pause);
        tokio::pin!(again);
        while !(asked_all && absent.is_empty()) {
            tokio::select! {
                next = asking.next(), if !asked_all => {
                    let Some((peer, answer)) = next else {
                        asked_all = true;
                        continue;
                    };
                    answered.push(peer.clone());
                    match self.join_late(peer, answer) {
                        None => {}
                        Some(LeftOut::DoesNotServe(_)) => absent.push(peer),
                        Some(why) => leave(peer, why),
                    }
                }
                // Beside the answers still awaited (a peer that is down takes the whole
                // connect timeout), not after them.
                () = &mut again, if !absent.is_empty() => {
                    let out;
                    (absent, out) = self.ask_again(std::mem::take(&mut absent)).await;
                    out.into_iter().for_each(|(peer, why)| leave(peer, why));
                    pause = (pause * 2).min(ASK_AGAIN_MAX);
                    again.as_mut().reset((Instant::now() + pause).into());
                }
            }
        }
        // No one else will join: the engine stops waiting for more sources.
        self.join.borrow_mut().take();
    }

    /// Makes `member` a source of the download.
    pub(super) fn add(&self, member: Served<P>) -> Result<(), P::Error> {
        let offer = member.offer;
        let holding = offer.held.map(|held| Holding {
            version: offer.manifest.blake3(),
            held,
            regrain: Regrain::between(
                offer.manifest.size(),
                offer.in_pieces,
                self.download.in_pieces(),
            ),
        });
        let source = self
            .peers
            .source(&member.peer, self.name, member.lead, holding)?;
        let source = Arc::new(source);
        self.opened.borrow_mut().push(source.clone());
        if let Some(join) = &*self.join.borrow() {
            let _ = join.send(source);
        }
        Ok(())
    }

    /// A peer that answered after the download started: it joins if it serves the version;
    /// otherwise why it is left out.
    pub(super) fn join_late(&self, peer: &PeerId, answer: Answer<P>) -> Option<LeftOut<P::Error>> {
        let why = match answer {
            Ok(Some((offer, _)))
                if offer.manifest == *self.manifest
                    && self.download.in_pieces()
                    && !offer.in_pieces =>
            {
                LeftOut::NoPieces
            }
            Ok(Some((offer, lead))) if offer.manifest == *self.manifest => {
                let member = Served {
                    peer: peer.clone(),
                    offer,
                    lead,
                };
                match self.add(member) {
                    Ok(()) => return None,
                    Err(e) => LeftOut::Failed(e),
                }
            }
            Ok(Some((offer, _))) => {
                LeftOut::OtherVersion(self.name.clone(), offer.manifest.blake3())
            }
            Ok(None) => LeftOut::DoesNotServe(self.name.clone()),
            Err(e) => LeftOut::Failed(e),
        };
        Some(why)
    }

    /// Asks the `absent` peers (which held nothing of the file) again; those that hold the
    /// version now (they started downloading it too, as a crowd starting at once does) join the
    /// download. Returns those that still hold nothing of it, and those that answered but
    /// cannot take part (another version, or an older qnode in a download in pieces), with why.
    pub(super) async fn ask_again<'p>(
        &self,
        absent: Vec<&'p PeerId>,
    ) -> (Vec<&'p PeerId>, Vec<(&'p PeerId, LeftOut<P::Error>)>) {
        let answers = join_all(
            absent
                .iter()
                .map(|&peer| async move { (peer, self.peers.ask(peer, self.name).await) }),
        )
        .await;
        // Joined, or another version, or unreachable now: not asked again.
        let (mut still, mut out) = (Vec::new(), Vec::new());
        for (peer, answer) in answers {
            match self.join_late(peer, answer) {
                Some(LeftOut::DoesNotServe(_)) => still.push(peer),
                Some(why @ (LeftOut::OtherVersion(..) | LeftOut::NoPieces)) => {
                    out.push((peer, why));
                }
                _ => {}
            }
        }
        (still, out)
    }
}

/// The version in pieces, if every one of `members` serves pieces and one sent their hashes.
pub(super) fn in_pieces<P: Peers>(members: &[Served<P>]) -> Option<Manifest> {
    if !members.iter().all(|m| m.offer.in_pieces) {
        return None;
    }
    members.iter().find_map(|m| m.offer.pieces.clone())
}

/// A peer that holds some version of the file, as it answered.
pub(super) struct Served<P: Peers> {
    pub(super) peer: PeerId,
    pub(super) offer: Offer,
    pub(super) lead: P::Lead,
}

/// The answers to "what do you serve under that name?" so far.
pub(super) struct Answers<P: Peers> {
    pub(super) name: FilePath,
    /// Who answered (or failed to).
    pub(super) answered: Vec<PeerId>,
    /// Peers that hold some version, whole or in part.
    pub(super) served: Vec<Served<P>>,
    pub(super) left_out: Vec<(PeerId, LeftOut<P::Error>)>,
}

impl<P: Peers> Answers<P> {
    pub(super) fn new(name: FilePath) -> Self {
        Self {
            name,
            answered: Vec::new(),
            served: Vec::new(),
            left_out: Vec::new(),
        }
    }

    /// Takes answers until every peer answered, or the wanted version is offered, or
    /// [`DOWNLOAD_GRACE`] has passed since the first peer offered a version.
    pub(super) async fn gather<'p>(
        &mut self,
        asking: &mut (impl futures_util::Stream<Item = (&'p PeerId, Answer<P>)> + Unpin),
        peers: usize,
        wanted: Option<Hash32>,
    ) {
        let grace = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(grace);
        let mut grace_set = false;
        while self.answered.len() < peers {
            tokio::select! {
                Some((peer, answer)) = asking.next() => {
                    self.take(peer, answer);
                    if let Some(w) = wanted {
                        if self.served.iter().any(|s| s.offer.manifest.blake3() == w) {
                            return;
                        }
                    } else if !self.served.is_empty() && !grace_set {
                        grace.as_mut().reset((Instant::now() + DOWNLOAD_GRACE).into());
                        grace_set = true;
                    }
                }
                () = &mut grace, if grace_set => return,
            }
        }
    }

    /// Those of `asked` that hold nothing of the file (yet).
    pub(super) fn absent<'p>(&self, asked: &'p [PeerId]) -> Vec<&'p PeerId> {
        let nothing = self.left_out.iter().filter(|(_, why)| why.holds_nothing());
        nothing
            .filter_map(|(p, _)| asked.iter().find(|e| *e == p))
            .collect()
    }

    /// Everyone left out: those known before the transfer, those that answered during it
    /// (`late`, whose reason replaces an earlier one: a peer that held nothing may answer later
    /// with another version, or as an older qnode), and those that never answered.
    pub(super) fn all_left_out(
        self,
        late: Vec<(PeerId, LeftOut<P::Error>)>,
        asked: &[PeerId],
    ) -> Vec<(PeerId, LeftOut<P::Error>)> {
        let mut all = self.left_out;
        all.retain(|(p, _)| !late.iter().any(|(q, _)| q == p));
        all.extend(late);
        let silent = asked.iter().filter(|e| !self.answered.contains(e));
        all.extend(silent.map(|e| (e.clone(), LeftOut::TooLate)));
        all
    }

    pub(super) fn take(&mut self, peer: &PeerId, answer: Answer<P>) {
        self.answered.push(peer.clone());
        let peer = peer.clone();
        match answer {
            Ok(Some((offer, lead))) => self.served.push(Served { peer, offer, lead }),
            Ok(None) => (self.left_out).push((peer, LeftOut::DoesNotServe(self.name.clone()))),
            Err(e) => self.left_out.push((peer, LeftOut::Failed(e))),
        }
    }

    /// The version to fetch and the peers serving it; the others are left out.
    pub(super) fn agree(
        &mut self,
        wanted: Option<Hash32>,
    ) -> anyhow::Result<(Manifest, Vec<Served<P>>)> {
        let described: Vec<Option<Manifest>> = self
            .served
            .iter()
            .map(|s| Some(s.offer.manifest.clone()))
            .collect();
        let whole: Vec<bool> = self.served.iter().map(|s| s.offer.held.is_none()).collect();
        let Some(agreement) = choice::agree(&described, &whole, wanted) else {
            let why: Vec<String> = self
                .left_out
                .iter()
                .map(|(p, l)| format!("{p}: {l}"))
                .collect();
            let wanted = wanted.map(|w| format!(" with BLAKE3 {}", hex(&w)));
            return Err(super::NotServed {
                name: self.name.clone(),
                wanted: wanted.unwrap_or_default(),
                why: why.join("; "),
            }
            .into());
        };
        for &(i, other) in &agreement.other_versions {
            let why = LeftOut::OtherVersion(self.name.clone(), other);
            self.left_out.push((self.served[i].peer.clone(), why));
        }
        let members = std::mem::take(&mut self.served)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| agreement.members.contains(i))
            .map(|(_, s)| s)
            .collect();
        Ok((agreement.manifest, members))
    }
}

/// Who may be downloading the file too (`choice::crowd_hint`).
pub(super) fn crowd_hint<P: Peers>(
    asked: &[PeerId],
    members: &[Served<P>],
    left_out: &[(PeerId, LeftOut<P::Error>)],
) -> Vec<String> {
    let ids: Vec<String> = asked.iter().map(|c| c.to_string()).collect();
    let asked: Vec<choice::Asked<'_>> = asked
        .iter()
        .zip(&ids)
        .map(|(c, peer)| choice::Asked {
            peer,
            whole: members
                .iter()
                .any(|m| m.peer == *c && m.offer.held.is_none()),
            left_out: left_out
                .iter()
                .any(|(p, why)| p == c && !matches!(why, LeftOut::DoesNotServe(_))),
        })
        .collect();
    choice::crowd_hint(&asked)
}
