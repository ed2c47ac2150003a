//! qnode: a peer-to-peer file-sharing node over QUIC.
//!
//! Every peer serves its `served_files` folder and asks others, over one QUIC connection per
//! peer with pinned mutual TLS 1.3. Downloads fetch verified chunks from every peer that serves
//! a file at once.
//!
//! Folders by role, top to bottom; each imports only the folders below it:
//! - `main`: logging, runtime, one-line errors, the exit code.
//! - [`app`]: the command line (clap), rendering typed outcomes, the seed's shell.
//! - [`node`]: the session (identity, peer table, pins, endpoints, connections) and the use cases.
//! - [`net`]: everything that names quinn: TLS, identities, the client and its endpoints, the
//!   server (accepting, answering, uploads, limits).
//! - [`transfer`]: the drivers: a download session, the engine's driver, an update; over traits.
//! - [`engine`]: pure download policy: events and `now` in, actions out.
//! - [`store`]: `served_files`: files, manifests, partial files and their sidecars, trees, uploads.
//! - [`wire`]: messages, framing, compression of bodies, each exchange over any stream.
//! - [`model`]: manifests, chunk and piece arithmetic, delta trees, names, the settings parser.
//!
//! Rules:
//! - Only `net` names quinn types.
//! - Only `wire::protocol` turns bytes into messages; only `wire::exchange` sequences them on a
//!   stream.
//! - `engine` does no I/O and reads no clock.
//! - Only `app` and `main` write to stdout, through `app::term` (which never panics on a closed
//!   stream).
//! - `transfer` sees peers only through its traits (`session::Peers`, `download::ChunkSource`,
//!   `update::RangeSource`), which `node` and `net::source::PeerSource` implement.

pub mod app;
pub mod engine;
pub mod model;
pub mod net;
pub mod node;
pub mod store;
pub mod transfer;
pub mod wire;
