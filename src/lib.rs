//! qnode: a peer-to-peer file-sharing node over QUIC.
//!
//! Every peer serves its `served_files` folder (`server`) and asks others (`client`), over one
//! QUIC connection per peer with pinned mutual TLS 1.3 (`tls`, `identity`). Downloads fetch
//! verified chunks from every peer that serves a file at once (`download`).
//!
//! Dependency rules (arrows point one way):
//! `main → {cli, shell} → {server, client, download} → {protocol, store, tls, limits} → {manifest, peers, identity}`.
//! - Only `server`, `client` and `tls` name quinn types.
//! - Only `protocol` turns bytes into messages.
//! - `download` sees peers only through its `ChunkSource` trait.
//! - Only `cli`, `shell` and `main` write to stdout, through `term` (which never panics on a closed
//!   stream).
//! - `limits` is the server's bookkeeping of what each peer may take (memory, uploads, disk,
//!   connections); it does no I/O.

pub mod args;
pub mod cli;
pub mod client;
pub mod download;
pub mod exchange;
pub mod identity;
pub mod limits;
pub mod manifest;
pub mod node;
pub mod peers;
pub mod protocol;
pub mod schedule;
pub mod server;
pub mod shell;
pub mod store;
pub mod term;
pub mod tls;
