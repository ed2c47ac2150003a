//! The drivers: the download engine over `ChunkSource`s (`download`) and filling an update
//! from an old copy (`update`). No quinn.

pub mod download;
pub mod update;
