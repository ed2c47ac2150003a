//! Everything that names quinn: TLS and identities, a connection to one peer and the peer as
//! a source (`client`), and the server (`server`) with what one peer may take from it
//! (`limits`) and the work it shares among askers (`shared`).

pub mod client;
pub mod identity;
pub mod limits;
pub mod machine;
pub mod server;
pub mod shared;
pub mod tls;
