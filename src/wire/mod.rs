//! The wire: ALPN, caps, messages and framing (`protocol`), compression of bodies (`codec`),
//! and each request/response exchange, both sides, over any `AsyncRead`/`AsyncWrite`
//! (`exchange`). Imports `model` only.

pub mod codec;
pub mod exchange;
pub mod protocol;
