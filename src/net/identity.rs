//! A peer's identity: its private key and self-signed certificate, and the pinned certificates of
//! the others.
//!
//! The key is made once with rcgen (ECDSA P-256), written with mode 0600 inside `<root>/<id>/` and
//! never overwritten: a new key would break every peer's pin. The certificate is published as
//! `certs/<id>.pem`, which is copied to every machine with `peer_settings.txt`. This module builds no
//! TLS configuration.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::model::peers::{PeerId, Root};
use crate::store::read_small_file;

/// The local peer's identity, ready for TLS.
#[derive(Debug)]
pub struct Identity {
    /// Who we are.
    pub id: PeerId,
    /// Our certificate (DER).
    pub cert: CertificateDer<'static>,
    /// Our private key (PKCS#8 DER).
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Largest key or certificate file read, in bytes (ours are under 1 KiB).
pub const MAX_PEM_LEN: u64 = 64 * 1024;

/// Whether `init` made a new identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitOutcome {
    /// A key and certificate were generated.
    Created,
    /// The peer already had them.
    Existing,
}

/// A failure to create or load an identity or a pinned certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// File-system failure.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A PEM file that does not hold what it should.
    #[error("{path} is not a valid PEM {what}")]
    BadPem {
        /// What it should hold.
        what: &'static str,
        /// Where.
        path: PathBuf,
    },
    /// A peer's certificate is not there.
    #[error(
        "no certificate for peer {id}: copy certs/{id}.pem from {id}'s root (made by `qnode --peer {id} init`) to {path}"
    )]
    MissingCert {
        /// Whose.
        id: PeerId,
        /// Where it should be.
        path: PathBuf,
    },
    /// The local peer has not been initialised.
    #[error("peer {id} has no identity yet: run `qnode --peer {id} init` (expected {path})")]
    NotInitialized {
        /// Who.
        id: PeerId,
        /// The missing key.
        path: PathBuf,
    },
    /// `certs/<id>.pem` differs from the local identity's certificate.
    #[error(
        "{published} does not match {id}'s own certificate {own}: if {id}'s key was replaced on purpose, delete {published} and run init again, then copy it to every peer"
    )]
    PublishedMismatch {
        /// Who.
        id: PeerId,
        /// `certs/<id>.pem`.
        published: PathBuf,
        /// `<id>/identity.pem`.
        own: PathBuf,
    },
    /// The private key can be read by others than its owner.
    #[error("{path} is readable by others (mode {mode:03o}); it must be private: chmod 600 {path}")]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Key generation failed.
    #[error("generating a key pair: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> IdentityError + 'a {
    move |source| IdentityError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Creates `<root>/<id>/served_files/` and, if the peer has none, a key pair and certificate;
/// publishes the certificate as `certs/<id>.pem`. Idempotent; never overwrites a key.
pub fn init(root: &Root, id: &PeerId) -> Result<(Identity, InitOutcome), IdentityError> {
    let peer_dir = root.peer_dir(id);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&peer_dir)
        .map_err(io_err("creating", &peer_dir))?;
    let served = root.served_dir(id);
    fs::create_dir_all(&served).map_err(io_err("creating", &served))?;
    let certs = root.certs_dir();
    fs::create_dir_all(&certs).map_err(io_err("creating", &certs))?;

    let key_path = root.key_path(id);
    let own_path = root.own_cert_path(id);
    let outcome = if key_path.exists() {
        InitOutcome::Existing
    } else {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![format!("{id}.qnode")])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("qnode peer {id}"));
        let cert = params.self_signed(&key)?;
        write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&own_path, cert.pem().as_bytes(), 0o644)?;
        InitOutcome::Created
    };
    let identity = load(root, id)?;

    let published = root.cert_path(id);
    match read_small_file(&published, MAX_PEM_LEN) {
        Ok(_) => {
            if load_cert(root, id)? != identity.cert {
                return Err(IdentityError::PublishedMismatch {
                    id: id.clone(),
                    published,
                    own: own_path,
                });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let (pem, _) =
                read_small_file(&own_path, MAX_PEM_LEN).map_err(io_err("reading", &own_path))?;
            write_new(&published, &pem, 0o644)?;
        }
        Err(e) => return Err(io_err("reading", &published)(e)),
    }
    Ok((identity, outcome))
}

/// Loads the local peer's key and certificate (made by [`init`]).
pub fn load(root: &Root, id: &PeerId) -> Result<Identity, IdentityError> {
    let key_path = root.key_path(id);
    let own_path = root.own_cert_path(id);
    let key_pem = match read_small_file(&key_path, MAX_PEM_LEN) {
        Ok((k, meta)) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            // As ssh does: a key others can read is no longer private.
            if mode & 0o077 != 0 {
                return Err(IdentityError::KeyExposed {
                    path: key_path,
                    mode,
                });
            }
            k
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(IdentityError::NotInitialized {
                id: id.clone(),
                path: key_path,
            });
        }
        Err(e) => return Err(io_err("reading", &key_path)(e)),
    };
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| IdentityError::BadPem {
        what: "private key",
        path: key_path.clone(),
    })?;
    let cert = read_cert(&own_path)?;
    Ok(Identity {
        id: id.clone(),
        cert,
        key,
    })
}

/// Loads the pinned certificate of `id` from `certs/<id>.pem`.
pub fn load_cert(root: &Root, id: &PeerId) -> Result<CertificateDer<'static>, IdentityError> {
    let path = root.cert_path(id);
    if !path.exists() {
        return Err(IdentityError::MissingCert {
            id: id.clone(),
            path,
        });
    }
    read_cert(&path)
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, IdentityError> {
    let (pem, _) = read_small_file(path, MAX_PEM_LEN).map_err(io_err("reading", path))?;
    CertificateDer::from_pem_slice(&pem).map_err(|_| IdentityError::BadPem {
        what: "certificate",
        path: path.to_owned(),
    })
}

/// Writes a new file, refusing to replace one, and syncs it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("creating", path))?;
    f.write_all(bytes).map_err(io_err("writing", path))?;
    f.sync_all().map_err(io_err("syncing", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_is_idempotent_private_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let id: PeerId = "p1".parse().unwrap();
        let (first, outcome) = init(&root, &id).unwrap();
        assert_eq!(outcome, InitOutcome::Created);
        let mode = fs::metadata(root.key_path(&id))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(root.served_dir(&id).is_dir());
        assert_eq!(load_cert(&root, &id).unwrap(), first.cert);

        let (second, outcome) = init(&root, &id).unwrap();
        assert_eq!(outcome, InitOutcome::Existing);
        assert_eq!(second.cert, first.cert);

        // A published certificate that is not ours is reported, not replaced.
        let other = root.cert_path(&"p2".parse().unwrap());
        init(&root, &"p2".parse().unwrap()).unwrap();
        fs::copy(&other, root.cert_path(&id)).unwrap();
        let err = init(&root, &id).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn missing_identity_and_certificate_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let id: PeerId = "p7".parse().unwrap();
        let err = load(&root, &id).unwrap_err().to_string();
        assert!(err.contains("qnode --peer p7 init"), "{err}");
        let err = load_cert(&root, &id).unwrap_err().to_string();
        assert!(err.contains("copy certs/p7.pem"), "{err}");
    }
}
