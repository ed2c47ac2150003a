//! qnode: a peer-to-peer file-sharing node over QUIC.
//!
//! Every peer serves its `served_files` folder (`server`) and asks others (`client`), over one
//! QUIC connection per peer with pinned mutual TLS 1.3 (`tls`, `identity`). Downloads fetch
//! verified chunks from every peer that serves a file at once (`download`).
//!
//! Layers, top to bottom; each names only layers below it:
//! - `main`: logging, runtime, one-line errors.
//! - `cli` (validates what `args` parsed, calls `node`, renders human lines or one JSON object) and
//!   `shell` (turns the seed's `#FILELIST`/`#UPLOAD`/`#DOWNLOAD` lines into the same `args`; it is
//!   handed `cli`'s executor, so the two never import each other).
//! - `node`: the session — identity, peer table, pins, endpoints, connections — and the use cases
//!   list, upload, download, serve, with typed outcomes. Prints nothing.
//! - `server` (answers peers), `client` (one connection to one peer), `download` (the driver: runs
//!   the scheduler's actions against `ChunkSource`s, verifies, writes).
//! - `exchange`: each request/response exchange, both sides, over any `AsyncRead`/`AsyncWrite`.
//! - `schedule`: the pure download policy (events in, actions out, time passed in).
//! - `protocol` (messages and framing) with `codec` (compression on the wire), `store` (served_files and temporary files) with `held`
//!   (what a download in progress holds, on disk for `serve` to offer), `tls`
//!   (QUIC/TLS configuration, endpoints, quinn's stream adapter), `limits` (what each peer may take
//!   from a server; no I/O).
//! - `manifest`, `peers`, `identity`, `term`.
//!
//! Rules:
//! - Only `node`, `server`, `client` and `tls` name quinn types.
//! - Only `protocol` turns bytes into messages; only `exchange` sequences them on a stream.
//! - `download` sees peers only through its `ChunkSource` trait; `schedule` does no I/O and reads
//!   no clock.
//! - Only `cli`, `shell` and `main` write to stdout, through `term` (which never panics on a closed
//!   stream).

pub mod args;
pub mod cli;
pub mod client;
pub mod codec;
pub mod delta;
pub mod download;
pub mod exchange;
pub mod held;
pub mod identity;
pub mod limits;
pub mod manifest;
pub mod node;
pub mod peers;
pub mod protocol;
pub mod schedule;
pub mod server;
pub mod shared;
pub mod shell;
pub mod store;
pub mod term;
pub mod tls;
pub mod update;
