//! Who the peers are and where a root keeps things.
//!
//! Owns [`PeerId`], the parser for `peer_settings.txt` (one `peer_ID ip_addr server_port` a line, the
//! seed's format) and [`Root`], the paths of a qnode root on disk. It does no network I/O and knows
//! nothing of TLS.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

/// Largest `peer_settings.txt` read, in bytes (100,000 peers take about 3 MB).
pub const MAX_SETTINGS_LEN: u64 = 64 << 20;
/// Longest part of a bad line quoted in an error, in characters.
const QUOTED: usize = 80;

/// `text` cut to [`QUOTED`] characters, marked if cut.
fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTED) {
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
        None => text.to_owned(),
    }
}

/// Longest peer ID accepted, in bytes.
pub const MAX_PEER_ID_LEN: usize = 64;

/// A peer's name: 1–64 ASCII letters, digits, `-`, `_` or `.`, not starting with `.` or `-`.
///
/// It is used as a folder name and a certificate file name, so it is kept to a safe alphabet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(String);

/// Why a peer ID was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid peer ID {0:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
)]
pub struct InvalidPeerId(pub String);

impl PeerId {
    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PeerId {
    type Err = InvalidPeerId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= MAX_PEER_ID_LEN
            && !s.starts_with(['.', '-'])
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidPeerId(s.to_owned()))
        }
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One line of `peer_settings.txt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    /// The peer's ID.
    pub id: PeerId,
    /// Where its `serve` listens (UDP); `None` for a peer listed as `auto`, found on the local
    /// network (mDNS) instead.
    pub addr: Option<SocketAddr>,
}

impl PeerEntry {
    /// Where it is, for a person: its address, or `auto`.
    pub fn place(&self) -> String {
        self.addr.map_or_else(|| AUTO.to_owned(), |a| a.to_string())
    }
}

/// The word that lists a peer without an address: `p3 auto`.
pub const AUTO: &str = "auto";

/// A malformed `peer_settings.txt`, with the 1-based line number at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    /// A line that is not `peer_ID ip_addr server_port`.
    #[error(
        "line {line}: expected `peer_ID ip_addr server_port` or `peer_ID auto`, found {found:?}"
    )]
    Malformed {
        /// The line number.
        line: usize,
        /// The offending text.
        found: String,
    },
    /// A bad peer ID.
    #[error("line {line}: {source}")]
    BadId {
        /// The line number.
        line: usize,
        /// What was wrong with it.
        source: InvalidPeerId,
    },
    /// A bad IP address.
    #[error("line {line}: invalid IP address {found:?}")]
    BadAddress {
        /// The line number.
        line: usize,
        /// The offending text.
        found: String,
    },
    /// A bad port.
    #[error("line {line}: invalid port {found:?} (expected 1-65535)")]
    BadPort {
        /// The line number.
        line: usize,
        /// The offending text.
        found: String,
    },
    /// The same ID twice.
    #[error("line {line}: duplicate peer ID {id} (first defined on line {first})")]
    Duplicate {
        /// The line number of the second definition.
        line: usize,
        /// The first definition's line.
        first: usize,
        /// The repeated ID.
        id: PeerId,
    },
}

/// The static peer list: every peer of the network, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerTable {
    entries: Vec<PeerEntry>,
}

impl PeerTable {
    /// Parses the text of `peer_settings.txt`. Blank lines and `#` comments are ignored.
    pub fn parse(text: &str) -> Result<Self, SettingsError> {
        let mut entries: Vec<PeerEntry> = Vec::new();
        let mut line_of: HashMap<PeerId, usize> = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let (id, addr) = match fields[..] {
                [id, AUTO] => (id, None),
                [id, ip, port] => (id, Some(address(line, ip, port)?)),
                _ => {
                    return Err(SettingsError::Malformed {
                        line,
                        found: quote(content),
                    });
                }
            };
            let id: PeerId = id
                .parse()
                .map_err(|source| SettingsError::BadId { line, source })?;
            if let Some(&first) = line_of.get(&id) {
                return Err(SettingsError::Duplicate { line, first, id });
            }
            line_of.insert(id.clone(), line);
            entries.push(PeerEntry { id, addr });
        }
        Ok(Self { entries })
    }

    /// Every peer, in file order.
    pub fn entries(&self) -> &[PeerEntry] {
        &self.entries
    }

    /// The entry of `id`, if listed.
    pub fn get(&self, id: &PeerId) -> Option<&PeerEntry> {
        self.entries.iter().find(|e| &e.id == id)
    }

    /// Resolves the peers a command named; with none named, every peer except `me`.
    ///
    /// Names are de-duplicated keeping the first; an unknown name is an error naming it.
    pub fn select(&self, me: &PeerId, named: &[PeerId]) -> Result<Vec<PeerEntry>, UnknownPeer> {
        if named.is_empty() {
            return Ok(self
                .entries
                .iter()
                .filter(|e| &e.id != me)
                .cloned()
                .collect());
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for id in named {
            let entry = self.get(id).ok_or_else(|| UnknownPeer(id.clone()))?;
            if seen.insert(id) {
                out.push(entry.clone());
            }
        }
        Ok(out)
    }
}

/// The address of line `line`: an IP (IPv6 optionally in brackets) and a port (1-65535).
fn address(line: usize, ip: &str, port: &str) -> Result<SocketAddr, SettingsError> {
    let ip: IpAddr = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| SettingsError::BadAddress {
            line,
            found: quote(ip),
        })?;
    match port.parse() {
        Ok(p) if p != 0 => Ok(SocketAddr::new(ip, p)),
        _ => Err(SettingsError::BadPort {
            line,
            found: quote(port),
        }),
    }
}

/// A peer ID that `peer_settings.txt` does not list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown peer ID {0}: it is not listed in peer_settings.txt")]
pub struct UnknownPeer(pub PeerId);

/// The paths of a qnode root: settings, certificates and one folder per local peer.
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    /// A root at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `peer_settings.txt`.
    pub fn settings_path(&self) -> PathBuf {
        self.dir.join("peer_settings.txt")
    }

    /// `certs/`, the public certificates of every peer.
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// `certs/<id>.pem`, the pinned certificate of `id`.
    pub fn cert_path(&self, id: &PeerId) -> PathBuf {
        self.certs_dir().join(format!("{id}.pem"))
    }

    /// `<id>/`, the local peer's private folder.
    pub fn peer_dir(&self, id: &PeerId) -> PathBuf {
        self.dir.join(id.as_str())
    }

    /// `<id>/served_files/`.
    pub fn served_dir(&self, id: &PeerId) -> PathBuf {
        self.peer_dir(id).join("served_files")
    }

    /// `<id>/identity.key`, the private key (PKCS#8 PEM, mode 0600).
    pub fn key_path(&self, id: &PeerId) -> PathBuf {
        self.peer_dir(id).join("identity.key")
    }

    /// `<id>/identity.pem`, the peer's own certificate (the master copy of `certs/<id>.pem`).
    pub fn own_cert_path(&self, id: &PeerId) -> PathBuf {
        self.peer_dir(id).join("identity.pem")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> PeerId {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_seed_format_with_comments_and_ipv6() {
        let t = PeerTable::parse(
            "# the demo\n\np1 127.0.0.1 53234\n  p2\t127.0.0.1   53235  # trailing\np3 ::1 9000\np4 [::1] 9001\n",
        )
        .unwrap();
        let ids: Vec<_> = t.entries().iter().map(|e| e.id.to_string()).collect();
        assert_eq!(ids, ["p1", "p2", "p3", "p4"]);
        assert_eq!(
            t.entries()[1].addr,
            Some("127.0.0.1:53235".parse().unwrap())
        );
        assert_eq!(t.entries()[2].addr, Some("[::1]:9000".parse().unwrap()));
        assert_eq!(t.entries()[3].addr, Some("[::1]:9001".parse().unwrap()));
        // `auto`: found on the local network.
        let t = PeerTable::parse(
            "p1 127.0.0.1 5
p3 auto # on the LAN
",
        )
        .unwrap();
        assert_eq!(
            (t.entries()[1].id.as_str(), t.entries()[1].addr),
            ("p3", None)
        );
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("p1 127.0.0.1\n", "line 1: expected"),
            ("\np1 1.2.3.4 5 extra\n", "line 2: expected"),
            ("p1 not-an-ip 5\n", "line 1: invalid IP address"),
            ("p1 1.2.3.4 0\n", "line 1: invalid port"),
            ("p1 1.2.3.4 70000\n", "line 1: invalid port"),
            ("../x 1.2.3.4 5\n", "line 1: invalid peer ID"),
            (
                "p1 1.2.3.4 5\n#\np1 1.2.3.4 6\n",
                "line 3: duplicate peer ID p1 (first defined on line 1)",
            ),
        ];
        for (text, want) in cases {
            let err = PeerTable::parse(text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn peer_ids_are_safe_file_names() {
        for ok in ["p1", "peer_2", "a.b-c", "X"] {
            assert!(ok.parse::<PeerId>().is_ok(), "{ok}");
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            ".",
            "..",
            ".p",
            "-p",
            "a/b",
            "a\\b",
            "a b",
            "é",
            long.as_str(),
        ] {
            assert!(bad.parse::<PeerId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn select_defaults_to_everyone_else_and_rejects_unknown() {
        let t = PeerTable::parse("p1 127.0.0.1 1\np2 127.0.0.1 2\np3 127.0.0.1 3\n").unwrap();
        let all: Vec<_> = t
            .select(&id("p2"), &[])
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(all, [id("p1"), id("p3")]);
        let some: Vec<_> = t
            .select(&id("p2"), &[id("p3"), id("p1"), id("p3")])
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(some, [id("p3"), id("p1")]);
        assert_eq!(
            t.select(&id("p2"), &[id("p9")]).unwrap_err(),
            UnknownPeer(id("p9"))
        );
    }
}
