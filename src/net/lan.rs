//! Peers on the local network, by mDNS (`mdns-sd`): a node announces its peer ID, port and
//! certificate fingerprint as a `_qnode._udp` service, and learns the others' announcements. An
//! announcement is a hint of where to dial, never trust: a peer is dialled only if its
//! announced fingerprint is that of its pinned certificate, and the handshake against the pin
//! decides.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use rustls::pki_types::CertificateDer;

use crate::model::peers::PeerId;

/// The service qnode nodes announce.
pub const SERVICE: &str = "_qnode._udp.local.";

/// One node's announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// The peer ID it claims.
    pub peer: PeerId,
    /// Where it says it listens.
    pub addrs: Vec<SocketAddr>,
    /// The fingerprint of the certificate it says it holds ([`fingerprint`]).
    pub fingerprint: String,
}

/// The fingerprint of a certificate: the hex BLAKE3 of its DER bytes.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    crate::model::manifest::hex(blake3::hash(cert.as_ref()).as_bytes())
}

/// Our presence on the local network: what we announce (if anything) and what we heard.
pub struct Lan {
    daemon: ServiceDaemon,
    heard: Arc<Mutex<HashMap<String, Announced>>>,
}

impl std::fmt::Debug for Lan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lan").finish_non_exhaustive()
    }
}

impl Lan {
    /// Starts listening for announcements, and announces `us` (peer, port, certificate) if
    /// given.
    pub fn start(us: Option<(&PeerId, u16, &CertificateDer<'_>)>) -> Result<Self, String> {
        let daemon = ServiceDaemon::new().map_err(|e| format!("mDNS: {e}"))?;
        if let Some((peer, port, cert)) = us {
            let fp = fingerprint(cert);
            // Unique on the LAN even where another network also has a `p3`.
            let instance = format!("{peer}-{}", &fp[..12]);
            let host = format!("{instance}.local.");
            let props = [("id", peer.as_str()), ("fp", fp.as_str())];
            let info = ServiceInfo::new(SERVICE, &instance, &host, "", port, &props[..])
                .map_err(|e| format!("mDNS: {e}"))?
                .enable_addr_auto();
            daemon.register(info).map_err(|e| format!("mDNS: {e}"))?;
        }
        let events = daemon.browse(SERVICE).map_err(|e| format!("mDNS: {e}"))?;
        let heard: Arc<Mutex<HashMap<String, Announced>>> = Arc::default();
        let into = heard.clone();
        // Ends when the daemon shuts down (its channel closes).
        std::thread::spawn(move || {
            while let Ok(event) = events.recv() {
                let mut heard = into.lock().unwrap_or_else(|p| p.into_inner());
                match event {
                    ServiceEvent::ServiceResolved(s) => {
                        let id = s.get_property_val_str("id").and_then(|i| i.parse().ok());
                        let fp = s.get_property_val_str("fp").map(str::to_owned);
                        let (Some(peer), Some(fingerprint)) = (id, fp) else {
                            continue;
                        };
                        let mut addrs: Vec<SocketAddr> = (s.get_addresses_v4().into_iter())
                            .map(|ip| SocketAddr::new(IpAddr::V4(ip), s.get_port()))
                            .collect();
                        addrs.sort();
                        let announced = Announced {
                            peer,
                            addrs,
                            fingerprint,
                        };
                        heard.insert(s.get_fullname().to_owned(), announced);
                    }
                    ServiceEvent::ServiceRemoved(_, fullname) => {
                        heard.remove(&fullname);
                    }
                    _ => {}
                }
            }
        });
        Ok(Self { daemon, heard })
    }

    /// Every announcement heard so far, by peer ID.
    pub fn heard(&self) -> Vec<Announced> {
        let heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Announced> = heard.values().cloned().collect();
        all.sort_by(|a, b| (&a.peer, &a.fingerprint).cmp(&(&b.peer, &b.fingerprint)));
        all
    }

    /// Where `peer` holding `cert` announced itself, waiting up to `wait` for it; `Err` says
    /// why not (never heard, or heard only with another certificate).
    pub async fn find(
        &self,
        peer: &PeerId,
        cert: &CertificateDer<'_>,
        wait: Duration,
    ) -> Result<SocketAddr, String> {
        let want = fingerprint(cert);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let heard = self.heard();
            let claims: Vec<&Announced> = heard.iter().filter(|a| a.peer == *peer).collect();
            if let Some(a) = claims.iter().find(|a| a.fingerprint == want)
                && let Some(addr) = a.addrs.first()
            {
                return Ok(*addr);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(match claims.is_empty() {
                    true => format!("no announcement of {peer} heard on the local network"),
                    false => format!(
                        "{peer} was announced on the local network only with another certificate (refused)"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Says goodbye (its announcement withdrawn) and stops the daemon's thread.
        let _ = self.daemon.shutdown();
    }
}
