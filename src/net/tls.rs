//! Pinned mutual TLS 1.3 and the QUIC endpoint settings.
//!
//! Trust is a set of pinned certificates (`certs/<id>.pem`), not a CA. rustls' WebPKI verifier
//! refuses a self-signed certificate used as its own trust anchor, so both directions use our own
//! verifiers: the client accepts only the exact certificate pinned for the peer it dials; the server
//! accepts only certificates pinned for some listed peer, and learns the client's ID from which one.
//! Both still verify the TLS 1.3 handshake signature with the crypto provider: the certificate is
//! public, the signature is the proof of holding its key. TLS 1.2 is never offered (QUIC needs 1.3).
//!
//! Also here: the quinn transport configuration (flow-control windows, stream limits, timeouts) and
//! UDP socket creation with enlarged buffers. This module never reads `served_files`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::model::peers::PeerId;
use crate::net::identity::Identity;
use crate::wire::protocol::{ALPNS, Version};

/// The server name every client sends; the verifier ignores it (the pin is the identity).
pub const SERVER_NAME: &str = "qnode.peer";
/// Per-stream receive window, in bytes: a whole chunk (1 MiB by default) plus room, so one chunk
/// needs no flow-control round trip.
pub const STREAM_RECEIVE_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection receive and send windows, in bytes: enough for a full window of chunk requests
/// in flight to one peer at hundreds of MB/s × tens of ms.
pub const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
/// Most concurrent request streams one peer may open to us.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// A connection with no traffic for this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive interval, so an idle but healthy connection outlives [`IDLE_TIMEOUT`].
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Requested UDP socket buffer size, in bytes (the kernel may cap it at `net.core.[rw]mem_max`).
pub const UDP_BUFFER: usize = 8 * 1024 * 1024;

/// The crypto provider: ring, the one quinn's `rustls-ring` feature brings. Chosen explicitly so no
/// process-wide default is needed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The set of pinned certificates, by DER, with the peer each one belongs to.
#[derive(Debug, Default, Clone)]
pub struct Pins {
    by_der: HashMap<Vec<u8>, PeerId>,
}

impl Pins {
    /// Pins `cert` as `id`'s certificate.
    pub fn insert(&mut self, id: PeerId, cert: &CertificateDer<'_>) {
        self.by_der.insert(cert.as_ref().to_vec(), id);
    }

    /// The peer whose pinned certificate is `cert`, if any.
    pub fn peer_of(&self, cert: &CertificateDer<'_>) -> Option<&PeerId> {
        self.by_der.get(cert.as_ref())
    }
}

/// The pins in force: replaced whole when `peer_settings.txt` or `certs/` change, so a running
/// server takes a new peer in, and refuses a removed or re-keyed one, without a restart.
#[derive(Debug)]
pub struct LivePins {
    now: std::sync::RwLock<Arc<Pins>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl LivePins {
    /// `pins`, in force until replaced.
    pub fn new(pins: Pins) -> Arc<Self> {
        Arc::new(Self {
            now: std::sync::RwLock::new(Arc::new(pins)),
            changed: tokio::sync::watch::Sender::new(0),
        })
    }

    /// The pins in force now.
    pub fn current(&self) -> Arc<Pins> {
        self.now.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `pins` in force; those watching hear of it.
    pub fn replace(&self, pins: Pins) {
        *self.now.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(pins);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// A TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration (e.g. an unusable key).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the rustls configuration.
    #[error("QUIC TLS configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The congestion controller a sender uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default.
    #[default]
    Cubic,
    /// BBR (experimental in quinn; it was slower serving a crowd in the swarm benchmark, see
    /// docs/performance.md).
    Bbr,
    /// NewReno (RFC 9002).
    Newreno,
}

/// The server side of QUIC for `identity`, accepting only clients whose certificate is pinned
/// (by the pins in force at each handshake), sending with congestion controller `cc`.
pub fn server_config(
    identity: &Identity,
    pins: Arc<LivePins>,
    cc: Congestion,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedClients {
        pins,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    tls.alpn_protocols = ALPNS.iter().map(|p| p.to_vec()).collect();
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    let mut transport = transport_config();
    match cc {
        Congestion::Cubic => {}
        Congestion::Bbr => {
            transport
                .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Congestion::Newreno => {
            transport.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            ));
        }
    }
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The client side of QUIC for dialling `peer`, whose certificate must be exactly `pinned`.
pub fn client_config(
    identity: &Identity,
    peer: &PeerId,
    pinned: CertificateDer<'static>,
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_speaking(identity, peer, pinned, &ALPNS)
}

/// [`client_config`], offering only `protocols` (as an older qnode does).
pub fn client_config_speaking(
    identity: &Identity,
    peer: &PeerId,
    pinned: CertificateDer<'static>,
    protocols: &[&[u8]],
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedServer {
        peer: peer.clone(),
        pinned,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    tls.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Flow control sized for bulk transfer of many 1 MiB chunks at once (quinn's defaults suit about
/// 100 Mbit/s at 100 ms and a single stream moves at most one stream window per round trip).
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(STREAM_RECEIVE_WINDOW.into())
        .receive_window(CONNECTION_WINDOW.into())
        .send_window(CONNECTION_WINDOW.into())
        .max_concurrent_bidi_streams(MAX_CONCURRENT_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        // Chunks go out whole, in the order they were asked for, instead of all at once
        // interleaved: each arrives sooner, and the downloader holds fewer half-filled buffers.
        .send_fairness(false)
        .keep_alive_interval(Some(KEEP_ALIVE));
    // 30 s fits in a QUIC varint of milliseconds, so this conversion cannot fail.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t
}

/// The stateless-reset key of a serving peer, derived from its private key.
///
/// With a key that survives restarts, a peer that crashed and came back answers packets of its
/// old connections with a valid stateless reset (RFC 9000 §10.3), so clients learn at once that
/// those connections are gone (and reconnect) instead of waiting for the idle timeout.
pub fn reset_key(identity: &Identity) -> [u8; 32] {
    blake3::derive_key("qnode stateless reset key v1", identity.key.secret_der())
}

/// Binds a UDP socket at `addr` with enlarged buffers and makes a quinn endpoint of it, with
/// `reset_key` for stateless resets (a random one if `None`).
///
/// Returns the endpoint and, if the kernel capped the receive buffer, the size it granted.
pub fn bind_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    reset_key: Option<[u8; 32]>,
) -> std::io::Result<(quinn::Endpoint, Option<usize>)> {
    let (endpoint, capped, _) = bind_punching(addr, server, reset_key)?;
    Ok((endpoint, capped))
}

/// A UDP socket bound to `addr` with buffers of [`UDP_BUFFER`] where the kernel grants them
/// (else the size it granted, second); dual-stack where `addr` is IPv6.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<(socket2::Socket, Option<usize>)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    // Best effort: a capped buffer only costs throughput, and we report it.
    socket.set_recv_buffer_size(UDP_BUFFER).ok();
    socket.set_send_buffer_size(UDP_BUFFER).ok();
    socket.bind(&addr.into())?;
    // Linux reports twice the usable size it granted.
    let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
    Ok((socket, (granted < UDP_BUFFER).then_some(granted)))
}

/// [`bind_endpoint`], and a handle on the same UDP socket to send datagrams from that quinn
/// ignores: they open a NAT toward a peer about to dial us (hole punching).
pub fn bind_punching(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    reset_key: Option<[u8; 32]>,
) -> std::io::Result<(quinn::Endpoint, Option<usize>, std::net::UdpSocket)> {
    let (socket, capped) = udp_socket(addr)?;
    let config = match reset_key {
        Some(key) => {
            let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
            let mut config = quinn::EndpointConfig::new(Arc::new(hmac));
            // Connection IDs are checked with a keyed hash before a reset is even considered:
            // that key must survive restarts too.
            let derived = blake3::derive_key("qnode connection id key v1", &key);
            let mut cid_key = [0u8; 8];
            cid_key.copy_from_slice(&derived[..8]);
            let cid_key = u64::from_le_bytes(cid_key);
            config.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
            config
        }
        None => quinn::EndpointConfig::default(),
    };
    let punching: std::net::UdpSocket = socket.try_clone()?.into();
    let endpoint =
        quinn::Endpoint::new(config, server, socket.into(), Arc::new(quinn::TokioRuntime))?;
    Ok((endpoint, capped, punching))
}

/// The pinned peer a connection's client presented, if the handshake gave one.
pub fn peer_identity(conn: &quinn::Connection, pins: &Pins) -> Option<PeerId> {
    pins.peer_of(&presented(conn)?).cloned()
}

/// The certificate the other side of `conn` presented.
pub fn presented(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().cloned()
}

/// The application protocol name of `version`, for logs.
pub fn alpn_name(version: Version) -> &'static str {
    match version {
        Version::V1 => "qnode/1",
        Version::V2 => "qnode/2",
        Version::V3 => "qnode/3",
    }
}

/// The protocol version `conn`'s handshake agreed on.
pub fn version(conn: &quinn::Connection) -> Version {
    let data = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok());
    Version::of_alpn(data.as_ref().and_then(|d| d.protocol.as_deref()))
}

fn mismatch(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        PinError(msg),
    ))))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PinError(String);

/// Both verifiers: only TLS 1.3 is offered, so a TLS 1.2 signature is never accepted.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

/// Accepts exactly one certificate: the one pinned for the peer being dialled.
#[derive(Debug)]
struct PinnedServer {
    peer: PeerId,
    pinned: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if intermediates.is_empty() && end_entity.as_ref() == self.pinned.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(mismatch(format!(
                "certificate presented by {} does not match certs/{}.pem",
                self.peer, self.peer
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Accepts any certificate pinned for a listed peer, and nothing else.
#[derive(Debug)]
struct PinnedClients {
    pins: Arc<LivePins>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if intermediates.is_empty() && self.pins.current().peer_of(end_entity).is_some() {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(mismatch(
                "client certificate is not pinned for any listed peer".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Chunk bytes go to quinn as they are, not copied into its buffers.
impl crate::wire::exchange::SendBytes for quinn::SendStream {
    async fn send_bytes(&mut self, bufs: &mut [bytes::Bytes]) -> std::io::Result<()> {
        // `write_all_chunks`, not `write_chunks`: the latter writes only what flow control allows
        // at that moment and says how much, and the rest would be lost.
        self.write_all_chunks(bufs).await.map_err(Into::into)
    }
}
