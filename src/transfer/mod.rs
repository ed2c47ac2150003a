//! The drivers, over traits so they run without QUIC: a download session from the first
//! question to the file under its name (`session`, over `Peers`), the download engine's driver
//! (`download`, over `ChunkSource`s) and filling an update from an old copy (`update`, over
//! `RangeSource`s). No quinn.

pub mod download;
pub mod session;
pub mod update;
