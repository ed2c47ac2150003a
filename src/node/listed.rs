//! The peers we list, kept live: `peer_settings.txt` and `certs/` are read at start and again
//! whenever they change (looked at every [`LOOK_EVERY`]), so a running `serve` or `sync` takes in
//! a new peer, a new address or a new certificate, and refuses a removed peer, without a restart.
//! A bad edit is said in one line and the last good table stays in force.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::load_peers;
use crate::model::peers::{PeerId, PeerTable, Root};
use crate::net::identity;
use crate::net::tls::{LivePins, Pins};

/// How often `peer_settings.txt` and `certs/` are looked at.
pub const LOOK_EVERY: Duration = Duration::from_secs(1);

/// The table and the certificates of its peers, as read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Listed {
    /// `peer_settings.txt`.
    pub table: PeerTable,
    /// The certificate of each listed peer that has one in `certs/`.
    pub certs: HashMap<PeerId, CertificateDer<'static>>,
}

impl Listed {
    /// Reads the table (`me` must be listed) and each listed peer's certificate; a missing or
    /// bad certificate is said and that peer left unpinned.
    pub fn load(root: &Root, me: &PeerId) -> anyhow::Result<Self> {
        let table = load_peers(root, me)?;
        let mut certs = HashMap::new();
        for entry in table.entries() {
            match identity::load_cert(root, &entry.id) {
                Ok(cert) => {
                    certs.insert(entry.id.clone(), cert);
                }
                // Ours is made by `init` (`serve` runs it first).
                Err(_) if entry.id == *me => {}
                Err(e) => tracing::warn!("{} cannot connect to us: {e}", entry.id),
            }
        }
        Ok(Self { table, certs })
    }

    /// The certificates pinned, by peer.
    pub fn pins(&self) -> Pins {
        let mut pins = Pins::default();
        for (id, cert) in &self.certs {
            pins.insert(id.clone(), cert);
        }
        pins
    }

    /// The peers listed in `self` but not in `new`, or listed there at another address or with
    /// another certificate: their connections must go.
    pub fn changed_in(&self, new: &Self) -> Vec<PeerId> {
        (self.table.entries().iter())
            .filter(|e| {
                new.table.get(&e.id).is_none_or(|n| n.addr != e.addr)
                    || self.certs.get(&e.id) != new.certs.get(&e.id)
            })
            .map(|e| e.id.clone())
            .collect()
    }
}

/// The table and pins a running node keeps in force: the server checks handshakes against the
/// pins, the node dials by the table.
#[derive(Debug, Clone)]
pub struct Live {
    /// The table, replaced on each good change.
    pub listed: watch::Sender<Arc<Listed>>,
    /// The pins the server checks handshakes against.
    pub pins: Arc<LivePins>,
}

impl Live {
    /// Reads the table and certificates now.
    pub fn load(root: &Root, me: &PeerId) -> anyhow::Result<Self> {
        let listed = Listed::load(root, me)?;
        let pins = LivePins::new(listed.pins());
        Ok(Self {
            listed: watch::Sender::new(Arc::new(listed)),
            pins,
        })
    }

    /// Keeps them in step with the files until `stop`.
    pub async fn watch(self, root: Root, me: PeerId, stop: CancellationToken) {
        watch(root, me, self.listed, self.pins, stop).await;
    }
}

/// What the files looked like: each one's (name, size, modification time, inode); any change
/// means read them again.
fn stamp(root: &Root) -> Vec<(String, u64, Option<SystemTime>, u64)> {
    use std::os::unix::fs::MetadataExt;
    let of = |name: String, m: std::fs::Metadata| (name, m.len(), m.modified().ok(), m.ino());
    let mut out: Vec<_> = std::fs::metadata(root.settings_path())
        .map(|m| of(String::new(), m))
        .into_iter()
        .collect();
    let certs = root.settings_path().with_file_name("certs");
    for entry in std::fs::read_dir(certs).into_iter().flatten().flatten() {
        if let Ok(m) = entry.metadata() {
            out.push(of(entry.file_name().to_string_lossy().into_owned(), m));
        }
    }
    out.sort();
    out
}

/// Looks at `peer_settings.txt` and `certs/` every [`LOOK_EVERY`] until `stop`; each good change
/// is sent on `listed` and put in force in `pins`, with one line per peer added, removed,
/// readdressed or re-keyed; a bad one is said once and changes nothing.
pub async fn watch(
    root: Root,
    me: PeerId,
    listed: watch::Sender<Arc<Listed>>,
    pins: Arc<LivePins>,
    stop: CancellationToken,
) {
    let r = root.clone();
    let Ok(mut last) = tokio::task::spawn_blocking(move || stamp(&r)).await else {
        return;
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(LOOK_EVERY) => {}
        }
        let (r, m, before) = (root.clone(), me.clone(), last.clone());
        let Ok(looked) = tokio::task::spawn_blocking(move || {
            let now = stamp(&r);
            let loaded = (now != before).then(|| Listed::load(&r, &m));
            (now, loaded)
        })
        .await
        else {
            return;
        };
        let (now, loaded) = looked;
        last = now;
        let new = match loaded {
            None => continue,
            Some(Ok(new)) => new,
            Some(Err(e)) => {
                tracing::warn!("{e:#}; the last good peer table stays in force");
                continue;
            }
        };
        say_changes(&listed.borrow(), &new);
        pins.replace(new.pins());
        listed.send_replace(Arc::new(new));
    }
}

/// One line per peer added, removed, readdressed or re-keyed.
fn say_changes(old: &Listed, new: &Listed) {
    for e in new.table.entries() {
        match old.table.get(&e.id) {
            None => tracing::info!("{} added at {}", e.id, e.place()),
            Some(o) if o.addr != e.addr => {
                tracing::info!("{} moved from {} to {}", e.id, o.place(), e.place());
            }
            Some(_) if old.certs.get(&e.id) != new.certs.get(&e.id) => {
                tracing::info!("{} has a new certificate", e.id);
            }
            Some(_) => {}
        }
    }
    for e in old.table.entries() {
        if new.table.get(&e.id).is_none() {
            tracing::info!("{} removed: refused from now on", e.id);
        }
    }
}

/// A node heard announcing itself on the local network, and how it stands with our table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Discovered {
    /// The peer ID it claims.
    pub peer: String,
    /// Where it says it listens.
    pub addrs: Vec<String>,
    /// Its certificate's fingerprint, as it announced it.
    pub fingerprint: String,
    /// `listed` (our table lists it and its pinned certificate has this fingerprint), `other
    /// certificate` (listed, but pinned with another: refused), `not listed`, or `us`.
    pub standing: &'static str,
}

impl super::Node {
    /// `discover`: the qnode nodes announcing on the local network, heard for `wait`.
    pub async fn discover(&self, wait: Duration) -> anyhow::Result<Vec<Discovered>> {
        let lan = crate::net::lan::Lan::start(None).map_err(anyhow::Error::msg)?;
        tokio::time::sleep(wait).await;
        let table = self.table();
        Ok((lan.heard().into_iter())
            .map(|a| {
                let pinned = table
                    .get(&a.peer)
                    .and_then(|_| identity::load_cert(&self.root, &a.peer).ok());
                let standing = match pinned {
                    _ if a.peer == self.me => "us",
                    Some(cert) if crate::net::lan::fingerprint(&cert) == a.fingerprint => "listed",
                    Some(_) => "other certificate",
                    None if table.get(&a.peer).is_some() => "other certificate",
                    None => "not listed",
                };
                Discovered {
                    peer: a.peer.to_string(),
                    addrs: a.addrs.iter().map(ToString::to_string).collect(),
                    fingerprint: a.fingerprint,
                    standing,
                }
            })
            .collect())
    }
}
