//! The wire: ALPN, size caps, message types and their framing. Nothing else.
//!
//! # Design
//! - ALPN is the version check: a peer speaking no version we speak fails the handshake with "no
//!   application protocol" instead of misreading bytes. We offer [`ALPN_V2`] (`qnode/2`) and
//!   [`ALPN`] (`qnode/1`), newest first, and both ends act on the one agreed ([`Version`]). The
//!   messages are the same in both; `qnode/2` changes how tree signatures are hashed (see
//!   `delta::SigKind`). Changing any encoding below means a new ALPN; the wire-format tests at the
//!   bottom pin every message's bytes.
//! - One QUIC connection per remote peer; one bidirectional stream per request.
//! - Every message is a frame: a 4-byte big-endian length, then a postcard-encoded value. The length
//!   is checked against a per-direction cap *before* anything is allocated ([`MAX_REQUEST_LEN`],
//!   [`MAX_RESPONSE_LEN`]).
//! - Stream lifecycles:
//!   - `List` / `Describe`: request, one response, end.
//!   - `ReadChunk`: request, a [`Response::Chunk`] header, then exactly `len` raw bytes (not
//!     re-encoded), end; or, on `qnode/2`, a [`Response::Zstd`] header and one zstd frame of
//!     `wire` bytes that holds exactly those `len` bytes.
//!   - `Upload`: request, [`Response::Ready`] (or a final answer: `AlreadyPresent` or `Error`), then the
//!     client sends exactly `size` raw bytes and finishes its side, then one final response
//!     (`Stored` or `Error`). On `qnode/2` the bytes (of an upload, and of a replace's leaves)
//!     travel in blocks: a [`BlockHead`] (a 4-byte big-endian plain length, at most
//!     `codec::MAX_BLOCK`, and a 4-byte wire length), then that many bytes: raw if the two lengths
//!     are equal, else a zstd frame.
//! - Errors travel as [`Response::Error`] with a machine-readable [`ErrorKind`], never as a dropped
//!   stream; a request that cannot be decoded (garbage, or a variant from a newer version) is
//!   answered with [`ErrorKind::BadRequest`].
//! - Close codes for connections are in [`CloseCode`].
//!
//! This module does no file or QUIC work: framing is generic over tokio's `AsyncRead`/`AsyncWrite`.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::model::delta::{Sig, SigKind};
use crate::model::manifest::{FilePath, Hash32, Manifest};

/// The first application protocol (and version), negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"qnode/1";
/// The second: `qnode/1`'s messages, with tree signatures hashed by XXH3.
pub const ALPN_V2: &[u8] = b"qnode/2";
/// The third: `qnode/2`'s messages, where a name may be a path into a folder (`FilePath`).
pub const ALPN_V3: &[u8] = b"qnode/3";
/// Every protocol we speak, the preferred first (a TLS server picks the first of its own list
/// that the client offers).
pub const ALPNS: [&[u8]; 3] = [ALPN_V3, ALPN_V2, ALPN];

/// The protocol version a connection agreed on, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    /// `qnode/1`.
    V1,
    /// `qnode/2`.
    V2,
    /// `qnode/3`.
    V3,
}

impl Version {
    /// The version of the ALPN a handshake agreed on (`qnode/1` if none was: rustls refuses a
    /// handshake without a common protocol, so that never happens between qnode peers).
    pub fn of_alpn(alpn: Option<&[u8]>) -> Self {
        match alpn {
            Some(ALPN_V3) => Self::V3,
            Some(ALPN_V2) => Self::V2,
            _ => Self::V1,
        }
    }

    /// How tree signatures are hashed in this version.
    pub fn sig_kind(self) -> SigKind {
        match self {
            Self::V1 => SigKind::Blake3,
            Self::V2 | Self::V3 => SigKind::Xxh3,
        }
    }

    /// Whether bodies may be compressed, and uploads travel in blocks (`qnode/2` on).
    pub fn compresses(self) -> bool {
        self >= Self::V2
    }

    /// Whether names may be paths into folders (`qnode/3` on). An older peer neither sees nor
    /// serves a file in a folder.
    pub fn has_folders(self) -> bool {
        self >= Self::V3
    }
}
/// Largest request frame, in bytes. Requests are small: a name of at most 255 bytes and a few numbers.
pub const MAX_REQUEST_LEN: u32 = 4 * 1024;
/// Largest response header frame, in bytes (a manifest is at most 2 MiB; a listing at most
/// [`MAX_LISTED_FILES`] entries).
pub const MAX_RESPONSE_LEN: u32 = 16 * 1024 * 1024;
/// Most files one `List` answer carries; the rest are left out, and the answer says how many there
/// are ([`Response::FilesCut`]).
pub const MAX_LISTED_FILES: usize = 40_000;

/// A request, the first frame on a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The files this peer serves.
    List,
    /// The manifest of one file.
    Describe {
        /// Which file.
        name: FilePath,
    },
    /// `len` bytes of a file starting at `offset`; the requester verifies them against its manifest.
    ReadChunk {
        /// Which file.
        name: FilePath,
        /// First byte.
        offset: u64,
        /// How many bytes (at most `manifest::MAX_CHUNK_SIZE`).
        len: u32,
    },
    /// Store a file under `name`; its bytes follow once the server answers [`Response::Ready`].
    Upload {
        /// The name to store it under.
        name: FilePath,
        /// Its exact size in bytes.
        size: u64,
        /// The BLAKE3 hash of its bytes; the server checks it before storing.
        blake3: Hash32,
    },
    /// The group signatures of version `blake3` of a file (see `delta`), answered with
    /// [`Response::Groups`]; a peer serving another version answers `Conflict`.
    Groups {
        /// Which file.
        name: FilePath,
        /// Which version.
        blake3: Hash32,
    },
    /// The leaf signatures of groups `first..first + count` of version `blake3` of a file
    /// (at most [`MAX_GROUPS_PER_REQUEST`]), answered with [`Response::Leaves`].
    Leaves {
        /// Which file.
        name: FilePath,
        /// Which version.
        blake3: Hash32,
        /// First group.
        first: u32,
        /// How many groups.
        count: u32,
    },
    /// `len` bytes at `offset`, anywhere in the file, at most one chunk of its layout long;
    /// answered like `ReadChunk`. The requester verifies the chunks it builds from them.
    ReadRange {
        /// Which file.
        name: FilePath,
        /// First byte.
        offset: u64,
        /// How many bytes.
        len: u32,
    },
    /// Like `Upload`, but a different file already under `name` is replaced (and kept hidden);
    /// the final answer is [`Response::Replaced`] then.
    Replace {
        /// The name to store it under.
        name: FilePath,
        /// Its exact size in bytes.
        size: u64,
        /// The BLAKE3 hash of its bytes.
        blake3: Hash32,
    },
    /// What the peer holds of `name`: its whole file, or else a download of it in progress.
    /// Answered with [`Response::Holding`]; for a download in progress the stream stays open and
    /// carries [`Response::Have`] as it verifies more chunks, then [`Response::Complete`] once
    /// the whole file is under its name (or an error if the download stopped there).
    Observe {
        /// Which file.
        name: FilePath,
    },
    /// One chunk of version `blake3` of `name`, from the whole file or from a download in
    /// progress that holds it verified; answered like `ReadChunk`.
    ReadVersion {
        /// Which file.
        name: FilePath,
        /// Which version.
        blake3: Hash32,
        /// First byte (a chunk's start).
        offset: u64,
        /// How many bytes (the chunk's length).
        len: u32,
    },
    /// Like `List`, and the downloads in progress too: answered with [`Response::Listing`].
    ListAll,
    /// Like `Observe`, in pieces where the file has them (`manifest::piece_size_for`):
    /// answered with [`Response::HoldingPieces`], then `Have` of pieces, then `Complete`.
    ObservePieces {
        /// Which file.
        name: FilePath,
    },
    /// `qnode/3`: the next page of the whole tree, files by path after `after` (from the first if
    /// none), at most [`PAGE_FILES`]; the first page also carries the downloads in progress.
    /// Answered with [`Response::Page`]. No listing is ever cut: the asker pages to the end.
    ListPage {
        /// The last path of the page before, if any.
        after: Option<FilePath>,
    },
    /// `qnode/3`: the whole of a small file (at most [`MAX_WHOLE_FILE`] bytes) in one answer,
    /// if the peer serves version `blake3` of it, `size` bytes long; answered like `ReadChunk`.
    /// The asker checks the bytes against `blake3`. Many small files of a folder cost a request
    /// each, not a manifest and a chunk each.
    ReadFile {
        /// Which file.
        name: FilePath,
        /// Which version.
        blake3: Hash32,
        /// Its size.
        size: u32,
    },
    /// `qnode/3`: one level of folder `path`: its version, the files directly in it and each
    /// folder in it with that folder's version, answered with [`Response::Folder`]. An asker
    /// compares the versions with its own and asks only for the folders that differ. `fresh`:
    /// the tree as it is now (a first question), else as the last fresh one saw it (the
    /// questions after it, so they agree with each other, as pages do).
    Folder {
        /// Which folder.
        path: FilePath,
        /// Walk the tree afresh.
        fresh: bool,
    },
    /// `qnode/3`, between peers running `sync`: the files of synced folder `folder` (empty:
    /// the whole of `served_files`) changed after the asker's last look (`since`, a sequence
    /// number of the answerer's index), answered with [`Response::SyncIndex`]. With nothing new,
    /// the answer waits up to `wait_ms` (at most [`MAX_SYNC_WAIT_MS`]) for a change: one
    /// question in flight per peer tells of each change as it happens.
    SyncIndex {
        /// Which synced folder.
        folder: String,
        /// The last sequence number the asker took in.
        since: u64,
        /// How long to wait for a change when there is none.
        wait_ms: u32,
    },
    /// `qnode/3`: introduce us to `peer`, which keeps a connection to the answerer (behind a
    /// NAT): it is asked to open its NAT toward our address as the answerer sees it (`Punch`),
    /// and we are told its address ([`Response::Introduced`]). The pin decides who answers.
    Introduce {
        /// Whom to reach.
        peer: String,
    },
    /// `qnode/3`: carry our datagrams to and from `peer` (which keeps a connection to the
    /// answerer), where an introduction did not get through: answered with
    /// [`Response::Introduced`] giving the relay's address to dial.
    Relay {
        /// Whom to reach.
        peer: String,
    },
    /// `qnode/3`, from an introducer to a peer that keeps a connection to it: send a few
    /// datagrams to `addr`, where `peer` will dial us from. Answered with `Response::Punched`.
    Punch {
        /// Who will dial.
        peer: String,
        /// From where, as the introducer sees it.
        addr: std::net::SocketAddr,
    },
}

/// Longest a [`Request::SyncIndex`] waits for a change (under QUIC's idle timeout, 30 s).
pub const MAX_SYNC_WAIT_MS: u32 = 20_000;

/// Records per [`Response::SyncIndex`]: a few hundred bytes each (a path and a small vector).
pub const SYNC_PAGE: usize = 1_000;

pub use crate::model::manifest::MAX_WHOLE_FILE;

/// Files per [`Request::ListPage`] answer: at most 10,000 × about 1.1 KB with the longest paths,
/// under [`MAX_RESPONSE_LEN`].
pub const PAGE_FILES: usize = 10_000;

/// Most groups one `Leaves` request may ask for (1024 leaves each at most: under 4 MiB).
pub const MAX_GROUPS_PER_REQUEST: u32 = 256;

impl Request {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::List => "list",
            Self::Describe { .. } => "describe",
            Self::ReadChunk { .. } => "read_chunk",
            Self::Upload { .. } => "upload",
            Self::Groups { .. } => "groups",
            Self::Leaves { .. } => "leaves",
            Self::ReadRange { .. } => "read_range",
            Self::Replace { .. } => "replace",
            Self::Observe { .. } => "observe",
            Self::ReadVersion { .. } => "read_version",
            Self::ListAll => "list_all",
            Self::ListPage { .. } => "list_page",
            Self::ReadFile { .. } => "read_file",
            Self::Folder { .. } => "folder",
            Self::SyncIndex { .. } => "sync_index",
            Self::Introduce { .. } => "introduce",
            Self::Relay { .. } => "relay",
            Self::Punch { .. } => "punch",
            // Logged as `observe`, with "in pieces" in its outcome.
            Self::ObservePieces { .. } => "observe",
        }
    }

    /// The file it names, if it names one.
    pub fn name(&self) -> Option<&FilePath> {
        match self {
            Self::List
            | Self::ListAll
            | Self::SyncIndex { .. }
            | Self::Introduce { .. }
            | Self::Relay { .. }
            | Self::Punch { .. } => None,
            Self::ListPage { after } => after.as_ref(),
            Self::Describe { name }
            | Self::ReadChunk { name, .. }
            | Self::Upload { name, .. }
            | Self::Groups { name, .. }
            | Self::Leaves { name, .. }
            | Self::ReadRange { name, .. }
            | Self::Replace { name, .. }
            | Self::Observe { name }
            | Self::ObservePieces { name }
            | Self::ReadVersion { name, .. }
            | Self::ReadFile { name, .. }
            | Self::Folder { path: name, .. } => Some(name),
        }
    }
}

/// One served file, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its name.
    pub name: FilePath,
    /// Its size in bytes.
    pub size: u64,
    /// The BLAKE3 hash of its bytes.
    pub blake3: Hash32,
}

impl FileEntry {
    /// The listing entry of `name`, described by `manifest`.
    pub fn new(name: FilePath, manifest: &Manifest) -> Self {
        Self {
            name,
            size: manifest.size(),
            blake3: manifest.blake3(),
        }
    }
}

/// A response frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `List`.
    Files(Vec<FileEntry>),
    /// Answer to `Describe`.
    Manifest(Manifest),
    /// Answer to `ReadChunk`: exactly `len` raw bytes follow on the stream.
    Chunk {
        /// How many bytes follow.
        len: u32,
    },
    /// `Upload` accepted: send the bytes.
    Ready,
    /// `Upload` done: the file is stored and served.
    Stored,
    /// `Upload` not needed: an identical file is already served under that name.
    AlreadyPresent,
    /// The request failed.
    Error(RemoteError),
    /// Answer to `List` when the peer serves more files than one answer carries: the first
    /// [`MAX_LISTED_FILES`] by name, and how many there are. (Added after `qnode/1` first shipped;
    /// a server sends it only when it must cut a listing, which older servers did silently.)
    FilesCut {
        /// The first files, by name.
        files: Vec<FileEntry>,
        /// How many files the peer serves.
        total: u64,
    },
    /// Answer to `Groups`.
    Groups(Vec<Sig>),
    /// Answer to `Leaves`: the leaves of the groups asked for, in order.
    Leaves(Vec<Sig>),
    /// `Replace` done: the file is stored, and the version it replaced is kept hidden.
    Replaced,
    /// Answer to `Replace` when the peer holds another version: instead of the bytes, the
    /// requester sends [`Delta::Groups`] and the exchange goes on in [`Delta`] frames.
    SendDelta,
    /// Answer to `Observe`: the version the peer holds, and which of its chunks (`None`: all of
    /// them, the whole file; else one bit per chunk, bit `i % 8` of byte `i / 8`).
    Holding {
        /// The version.
        manifest: Manifest,
        /// The chunks held, if not all.
        held: Option<Vec<u8>>,
    },
    /// After `Holding`: chunks the download in progress has verified since, ascending.
    Have(Vec<u32>),
    /// After `Holding`: the download finished; the whole file is served under its name.
    Complete,
    /// Answer to `ListAll`.
    Listing {
        /// The whole files, by name (the first [`MAX_LISTED_FILES`]).
        files: Vec<FileEntry>,
        /// How many whole files the peer serves.
        total: u64,
        /// Downloads in progress (the first [`MAX_LISTED_FILES`]), never served as whole files.
        incomplete: Vec<Incomplete>,
    },
    /// Answer to a read (`ReadChunk`, `ReadRange`, `ReadVersion`), `qnode/2` only: the `len`
    /// bytes asked for follow as one zstd frame of `wire` bytes (less than `len`; see `codec`).
    Zstd {
        /// How many bytes the frame holds.
        len: u32,
        /// How many bytes of frame follow.
        wire: u32,
    },
    /// Answer to `ObservePieces`: like `Holding`, with the bits one per piece if the file has
    /// pieces, and the hashes of its pieces if the peer knows them (else none), which the asker
    /// checks against the manifest (`Manifest::refine`).
    HoldingPieces {
        /// The version, in chunks.
        manifest: Manifest,
        /// The hashes of its pieces, or none.
        pieces: Vec<Hash32>,
        /// The pieces held (chunks, if the file has no pieces), if not all.
        held: Option<Vec<u8>>,
    },
    /// Answer to `ListPage`: files by path, and whether more follow.
    Page {
        /// The files, sorted by path, all after the page's `after`.
        files: Vec<FileEntry>,
        /// Downloads in progress (first page only; at most [`MAX_LISTED_FILES`]).
        incomplete: Vec<Incomplete>,
        /// Another page follows: ask again after the last of `files`.
        more: bool,
    },
    /// Answer to `Folder`: one level of a folder.
    Folder {
        /// The folder's version (`model::folder::version` of every file under it).
        version: Hash32,
        /// The files directly in it, by name (at most [`PAGE_FILES`] of files and folders).
        files: Vec<FileEntry>,
        /// The folders directly in it, by name.
        folders: Vec<FolderEntry>,
        /// More than [`PAGE_FILES`] files and folders are directly in it: the asker lists the
        /// tree instead.
        cut: bool,
    },
    /// Answer to `SyncIndex`: what changed, in the order of the changes.
    SyncIndex {
        /// At most [`SYNC_PAGE`] records, each with a sequence number above the question's
        /// `since` and at most `last`, increasing.
        records: Vec<SyncRecord>,
        /// The answerer's last sequence number (ask again from the last record's if `more`).
        last: u64,
        /// More records follow.
        more: bool,
    },
    /// Answer to `Introduce`: where the peer is, as the introducer sees it (it was asked to
    /// open its NAT toward us).
    Introduced {
        /// Its address.
        addr: std::net::SocketAddr,
    },
    /// Answer to `Punch`: the datagrams are on their way.
    Punched,
}

/// One file's version in a synced folder's index, as [`Response::SyncIndex`] tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// Its path in the folder.
    pub path: FilePath,
    /// Its version (a tombstone once deleted).
    pub version: crate::model::vector::Version,
    /// The answerer's sequence number of this change.
    pub sequence: u64,
}

/// A folder in a folder, as [`Response::Folder`] names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderEntry {
    /// Its name (one component).
    pub name: FilePath,
    /// How many files are under it.
    pub files: u64,
    /// Its version.
    pub version: Hash32,
}

/// A download in progress, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incomplete {
    /// The file's name.
    pub name: FilePath,
    /// The whole file's size in bytes.
    pub size: u64,
    /// The BLAKE3 hash of the whole file.
    pub blake3: Hash32,
    /// Bytes verified so far.
    pub held: u64,
}

impl Incomplete {
    /// The listing entry of a download of `name` in progress: `manifest`'s version, `held`
    /// bytes of it verified.
    pub fn new(name: FilePath, manifest: &Manifest, held: u64) -> Self {
        Self {
            name,
            size: manifest.size(),
            blake3: manifest.blake3(),
            held,
        }
    }
}

/// The frames of a `Replace` that moves only what the peer lacks, after [`Response::SendDelta`]:
/// requester `Groups` (its version's group signatures), peer `Lacking` (group indices it lacks),
/// requester `Leaves` (those groups' leaf signatures, in order), peer `Lacking` (indices into that
/// leaf list it lacks), then the requester sends exactly those leaves' bytes, raw and in order,
/// and finishes; the peer answers `Replaced` or `Error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delta {
    /// Group signatures, in file order.
    Groups(Vec<Sig>),
    /// Indices of what the peer lacks, ascending.
    Lacking(Vec<u32>),
    /// Leaf signatures, in file order.
    Leaves(Vec<Sig>),
}

/// Why a request failed, as sent by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    /// What kind of failure, for callers that branch on it.
    pub kind: ErrorKind,
    /// A human message.
    pub message: String,
}

impl RemoteError {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The machine-readable failure kinds that travel on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Malformed or unsupported request.
    BadRequest,
    /// No such file.
    NotFound,
    /// A different file already has that name.
    Conflict,
    /// Another upload of that name is in progress.
    Busy,
    /// Over a size limit.
    TooLarge,
    /// The uploaded bytes did not match their announced size or hash.
    Corrupt,
    /// The server's disk is full.
    NoSpace,
    /// Something went wrong on the server.
    Internal,
}

/// Application close codes for QUIC connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// The client is done with the connection.
    Done = 0,
    /// The server is shutting down.
    Shutdown = 1,
    /// The peer may not connect (e.g. it presented our own identity).
    Refused = 2,
}

impl CloseCode {
    /// The code as a QUIC varint value.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// A framing or decoding failure.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed.
    #[error("stream failed: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended before a frame started.
    #[error("stream ended before a message")]
    Closed,
    /// A frame longer than allowed.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The announced length.
        len: u32,
        /// The cap.
        max: u32,
    },
    /// Bytes that are not a valid message.
    #[error("malformed message: {0}")]
    Decode(#[from] postcard::Error),
}

/// Reads one frame of at most `max` bytes and decodes it.
pub async fn read_msg<T: DeserializeOwned>(
    reader: &mut (impl AsyncRead + Unpin),
    max: u32,
) -> Result<T, ProtocolError> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ProtocolError::Closed);
        }
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len);
    if len > max {
        return Err(ProtocolError::TooLarge { len, max });
    }
    let mut buf = vec![0u8; len as usize];
    reader.read_exact(&mut buf).await?;
    decode(&buf)
}

/// Decodes one message body (a frame without its length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtocolError> {
    Ok(postcard::from_bytes(body)?)
}

/// Encodes `msg` and writes it as one frame.
pub async fn write_msg<T: Serialize>(
    writer: &mut (impl AsyncWrite + Unpin),
    msg: &T,
) -> Result<(), ProtocolError> {
    writer.write_all(&encode_frame(msg)?).await?;
    Ok(())
}

/// The head of one block of an upload body on `qnode/2`: its plain length and its length on the
/// wire (equal: raw bytes follow; shorter: a zstd frame follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHead {
    /// Bytes the block holds, 1 to `codec::MAX_BLOCK`.
    pub plain: u32,
    /// Bytes that follow the head, at most `plain`.
    pub wire: u32,
}

impl BlockHead {
    /// Bytes of an encoded head.
    pub const LEN: usize = 8;

    /// The head as it travels: both lengths, 4 bytes big-endian each.
    pub fn encode(self) -> [u8; Self::LEN] {
        let mut head = [0u8; Self::LEN];
        head[..4].copy_from_slice(&self.plain.to_be_bytes());
        head[4..].copy_from_slice(&self.wire.to_be_bytes());
        head
    }

    /// A head read off the wire, checked: an empty block, one over `codec::MAX_BLOCK` or one
    /// longer on the wire than plain is invalid data.
    pub fn decode(head: [u8; Self::LEN]) -> std::io::Result<Self> {
        let plain = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let wire = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if plain == 0 || plain > crate::wire::codec::MAX_BLOCK || wire > plain {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a block of {plain} bytes in {wire}"),
            ));
        }
        Ok(Self { plain, wire })
    }
}

/// Encodes `msg` as one frame (length prefix included), for callers that batch writes.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut buf = postcard::to_extend(msg, vec![0u8; 4])?;
    // A frame we build is far below 4 GiB: our own messages are bounded by the caps above.
    let len = u32::try_from(buf.len() - 4).map_err(|_| ProtocolError::TooLarge {
        len: u32::MAX,
        max: MAX_RESPONSE_LEN,
    })?;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> FilePath {
        FilePath::new(s).unwrap()
    }

    fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
        encode_frame(msg).unwrap()
    }

    /// The exact bytes of every message kind. If one of these changes, the wire changed: bump ALPN.
    #[test]
    fn request_wire_format_is_pinned() {
        assert_eq!(frame(&Request::List), [0, 0, 0, 1, 0]);
        assert_eq!(
            frame(&Request::Describe {
                name: name("a.txt")
            }),
            [0, 0, 0, 7, 1, 5, b'a', b'.', b't', b'x', b't']
        );
        assert_eq!(
            frame(&Request::ReadChunk {
                name: name("a"),
                offset: 300,
                len: 1024
            }),
            [0, 0, 0, 7, 2, 1, b'a', 0xac, 0x02, 0x80, 0x08]
        );
        let mut upload = vec![0, 0, 0, 36, 3, 1, b'a', 5];
        upload.extend([7u8; 32]);
        assert_eq!(
            frame(&Request::Upload {
                name: name("a"),
                size: 5,
                blake3: [7; 32]
            }),
            upload
        );
    }

    #[test]
    fn response_wire_format_is_pinned() {
        let mut files = vec![0, 0, 0, 39, 0, 1, 3, b'x', b'.', b'y', 13];
        files.extend([9u8; 32]);
        assert_eq!(
            frame(&Response::Files(vec![FileEntry {
                name: name("x.y"),
                size: 13,
                blake3: [9; 32]
            }])),
            files
        );
        let m = Manifest::from_reader(&b"hi"[..], 2).unwrap();
        let mut manifest = vec![0, 0, 0, 69, 1, 2, 0x80, 0x08, 1];
        manifest.extend(blake3::hash(b"hi").as_bytes());
        manifest.extend(blake3::hash(b"hi").as_bytes());
        assert_eq!(frame(&Response::Manifest(m)), manifest);
        assert_eq!(frame(&Response::Chunk { len: 1 }), [0, 0, 0, 2, 2, 1]);
        assert_eq!(frame(&Response::Ready), [0, 0, 0, 1, 3]);
        assert_eq!(frame(&Response::Stored), [0, 0, 0, 1, 4]);
        assert_eq!(frame(&Response::AlreadyPresent), [0, 0, 0, 1, 5]);
        assert_eq!(
            frame(&Response::Error(RemoteError::new(
                ErrorKind::Conflict,
                "no"
            ))),
            [0, 0, 0, 5, 6, 2, 2, b'n', b'o']
        );
        let mut cut = vec![0, 0, 0, 42, 7, 1, 3, b'x', b'.', b'y', 13];
        cut.extend([9u8; 32]);
        cut.extend([0xc0, 0x84, 0x3d]); // 1,000,000 as a varint
        assert_eq!(
            frame(&Response::FilesCut {
                files: vec![FileEntry {
                    name: name("x.y"),
                    size: 13,
                    blake3: [9; 32]
                }],
                total: 1_000_000
            }),
            cut
        );
    }

    #[test]
    fn delta_messages_are_pinned() {
        let mut groups = vec![0, 0, 0, 35, 4, 1, b'a'];
        groups.extend([7u8; 32]);
        assert_eq!(
            frame(&Request::Groups {
                name: name("a"),
                blake3: [7; 32]
            }),
            groups
        );
        let mut leaves = vec![0, 0, 0, 37, 5, 1, b'a'];
        leaves.extend([7u8; 32]);
        leaves.extend([2, 3]);
        assert_eq!(
            frame(&Request::Leaves {
                name: name("a"),
                blake3: [7; 32],
                first: 2,
                count: 3
            }),
            leaves
        );
        assert_eq!(
            frame(&Request::ReadRange {
                name: name("a"),
                offset: 300,
                len: 5
            }),
            [0, 0, 0, 6, 6, 1, b'a', 0xac, 0x02, 5]
        );
        let mut replace = vec![0, 0, 0, 36, 7, 1, b'a', 5];
        replace.extend([7u8; 32]);
        assert_eq!(
            frame(&Request::Replace {
                name: name("a"),
                size: 5,
                blake3: [7; 32]
            }),
            replace
        );
        let sig = Sig {
            hash: [1; 8],
            len: 300,
        };
        let mut g = vec![0, 0, 0, 12, 8, 1];
        g.extend([1u8; 8]);
        g.extend([0xac, 0x02]);
        assert_eq!(frame(&Response::Groups(vec![sig])), g);
        g[4] = 9;
        assert_eq!(frame(&Response::Leaves(vec![sig])), g);
        assert_eq!(frame(&Response::Replaced), [0, 0, 0, 1, 10]);
        assert_eq!(frame(&Response::SendDelta), [0, 0, 0, 1, 11]);
        assert_eq!(
            frame(&Delta::Lacking(vec![1, 300])),
            [0, 0, 0, 5, 1, 2, 1, 0xac, 0x02]
        );
    }

    #[test]
    fn versions_follow_the_agreed_protocol() {
        assert_eq!(
            ALPNS,
            [
                b"qnode/3".as_slice(),
                b"qnode/2".as_slice(),
                b"qnode/1".as_slice()
            ]
        );
        assert_eq!(Version::of_alpn(Some(b"qnode/3")), Version::V3);
        assert_eq!(Version::V3.sig_kind(), SigKind::Xxh3);
        assert!(Version::V3.has_folders() && !Version::V2.has_folders());
        assert_eq!(Version::of_alpn(Some(b"qnode/2")), Version::V2);
        assert_eq!(Version::of_alpn(Some(b"qnode/1")), Version::V1);
        assert_eq!(Version::V1.sig_kind(), SigKind::Blake3);
        assert_eq!(Version::V2.sig_kind(), SigKind::Xxh3);
    }

    #[test]
    fn swarm_messages_are_pinned() {
        assert_eq!(
            frame(&Request::Observe { name: name("a") }),
            [0, 0, 0, 3, 8, 1, b'a']
        );
        let mut read = vec![0, 0, 0, 39, 9, 1, b'a'];
        read.extend([7u8; 32]);
        read.extend([0x80, 0x08, 0x80, 0x08]);
        assert_eq!(
            frame(&Request::ReadVersion {
                name: name("a"),
                blake3: [7; 32],
                offset: 1024,
                len: 1024
            }),
            read
        );
        assert_eq!(frame(&Request::ListAll), [0, 0, 0, 1, 10]);
        assert_eq!(
            frame(&Request::ListPage { after: None }),
            [0, 0, 0, 2, 12, 0]
        );
        let after = Some(FilePath::new("a/b").unwrap());
        assert_eq!(
            frame(&Request::ListPage { after }),
            [0, 0, 0, 6, 12, 1, 3, b'a', b'/', b'b']
        );
        assert_eq!(
            frame(&Request::Folder {
                path: name("a"),
                fresh: true
            }),
            [0, 0, 0, 4, 14, 1, b'a', 1]
        );
        let level = Response::Folder {
            version: [5; 32],
            files: vec![FileEntry {
                name: name("f"),
                size: 2,
                blake3: [6; 32],
            }],
            folders: vec![FolderEntry {
                name: name("d"),
                files: 3,
                version: [7; 32],
            }],
            cut: false,
        };
        let mut want = vec![0, 0, 0, 106, 19];
        want.extend([5; 32]);
        want.extend([1, 1, b'f', 2]);
        want.extend([6; 32]);
        want.extend([1, 1, b'd', 3]);
        want.extend([7; 32]);
        want.push(0);
        assert_eq!(frame(&level), want);
        let mut whole = vec![0, 0, 0, 37, 13, 1, b'a'];
        whole.extend([7; 32]);
        whole.extend([0x80, 0x08]);
        assert_eq!(
            frame(&Request::ReadFile {
                name: name("a"),
                blake3: [7; 32],
                size: 1024
            }),
            whole
        );
        assert_eq!(
            frame(&Request::SyncIndex {
                folder: "n".into(),
                since: 300,
                wait_ms: 1000
            }),
            [0, 0, 0, 7, 15, 1, b'n', 0xac, 0x02, 0xe8, 0x07]
        );
        let mut vector = crate::model::vector::Vector::default();
        vector.bump(&"p1".parse().unwrap());
        let synced = Response::SyncIndex {
            records: vec![SyncRecord {
                path: name("f"),
                version: crate::model::vector::Version {
                    size: 2,
                    blake3: [6; 32],
                    deleted: false,
                    vector,
                    modified: 3,
                    by: "p1".into(),
                    parent: None,
                },
                sequence: 4,
            }],
            last: 5,
            more: false,
        };
        let mut want = vec![0, 0, 0, 51, 20, 1, 1, b'f', 2];
        want.extend([6; 32]);
        want.extend([0, 1, 2, b'p', b'1', 1, 6, 2, b'p', b'1', 0, 4, 5, 0]);
        assert_eq!(frame(&synced), want);
        let page = Response::Page {
            files: Vec::new(),
            incomplete: Vec::new(),
            more: true,
        };
        assert_eq!(frame(&page), [0, 0, 0, 4, 18, 0, 0, 1]);
        let m = Manifest::from_reader(&b"hi"[..], 2).unwrap();
        let mut holding = vec![0, 0, 0, 70, 12, 2, 0x80, 0x08, 1];
        holding.extend(blake3::hash(b"hi").as_bytes());
        holding.extend(blake3::hash(b"hi").as_bytes());
        holding.push(0);
        assert_eq!(
            frame(&Response::Holding {
                manifest: m.clone(),
                held: None
            }),
            holding
        );
        holding[3] = 72;
        *holding.last_mut().unwrap() = 1;
        holding.extend([1, 0b101]);
        assert_eq!(
            frame(&Response::Holding {
                manifest: m,
                held: Some(vec![0b101])
            }),
            holding
        );
        assert_eq!(
            frame(&Response::Have(vec![3, 300])),
            [0, 0, 0, 5, 13, 2, 3, 0xac, 0x02]
        );
        assert_eq!(frame(&Response::Complete), [0, 0, 0, 1, 14]);
        let mut listing = vec![0, 0, 0, 40, 15, 0, 0, 1, 1, b'a', 9];
        listing.extend([2u8; 32]);
        listing.push(4);
        assert_eq!(
            frame(&Response::Listing {
                files: vec![],
                total: 0,
                incomplete: vec![Incomplete {
                    name: name("a"),
                    size: 9,
                    blake3: [2; 32],
                    held: 4
                }]
            }),
            listing
        );
    }

    #[test]
    fn the_compressed_chunk_header_is_pinned() {
        assert_eq!(
            frame(&Response::Zstd {
                len: 1024,
                wire: 300
            }),
            [0, 0, 0, 5, 16, 0x80, 0x08, 0xac, 0x02]
        );
    }

    #[tokio::test]
    async fn frames_round_trip_over_a_pipe() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let req = Request::Describe {
            name: name("lorem_ipsum.txt"),
        };
        let sent = req.clone();
        let writer = tokio::spawn(async move { write_msg(&mut a, &sent).await });
        let got: Request = read_msg(&mut b, MAX_REQUEST_LEN).await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(got, req);
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_reading() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 0];
        let err = read_msg::<Request>(&mut &bytes[..], MAX_REQUEST_LEN)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProtocolError::TooLarge { len: u32::MAX, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn garbage_unknown_tags_bad_names_and_truncation_are_errors() {
        let cases: [&[u8]; 6] = [
            &[],                                   // nothing at all
            &[0, 0, 0, 1, 9],                      // unknown request variant (a newer version)
            &[0, 0, 0, 5, 1, 3, b'.', b'.', b'/'], // truncated frame
            &[0, 0, 0, 5, 1, 3, b'.', b'.', b'x'], // invalid name (leading dot)
            &[0, 0, 0, 4, 1, 2, b'a', 0],          // control character in a name
            &[0, 0, 0, 3, 1, 9, b'a'],             // string longer than its frame
        ];
        for bytes in cases {
            assert!(
                read_msg::<Request>(&mut &bytes[..], MAX_REQUEST_LEN)
                    .await
                    .is_err(),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn a_block_head_is_pinned_and_checked() {
        let head = BlockHead {
            plain: 1000,
            wire: 300,
        };
        assert_eq!(head.encode(), [0, 0, 3, 0xe8, 0, 0, 1, 0x2c]);
        assert_eq!(BlockHead::decode(head.encode()).unwrap(), head);
        for (plain, wire) in [(0, 0), (crate::wire::codec::MAX_BLOCK + 1, 1), (3, 4)] {
            let bad = BlockHead { plain, wire }.encode();
            let err = BlockHead::decode(bad).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        }
    }
}
