//! Everything that names quinn: TLS and identities (`tls`, `identity`), a connection to one peer
//! (`client`), the peer as a download's source (`source`), the client side's UDP endpoints
//! (`endpoints`), the server (`server`: accepting, answering, uploads, what one peer may take,
//! the work shared among askers), and what the machine has to spare (`machine`).

pub mod client;
pub mod endpoints;
pub mod identity;
pub mod lan;
pub mod machine;
pub mod server;
pub mod source;
pub mod tls;
