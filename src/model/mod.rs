//! Plain data and arithmetic: manifests (chunks, pieces, BLAKE3), delta trees, names, the
//! peer settings. Imports nothing of ours and does no I/O beyond the readers it is handed.

pub mod delta;
pub mod folder;
pub mod manifest;
pub mod name;
pub mod peers;
pub mod vector;
