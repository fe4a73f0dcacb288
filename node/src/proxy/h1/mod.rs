//! keel's own HTTP/1.x: one codec for every HTTP/1 message keel reads or writes, on both sides.
//!
//! - [`scan`]: the strict framing scanner every byte from a client passes first; it refuses
//!   ambiguous messages (request smuggling shapes) before anything parses them.
//! - [`codec`]: body framing both ways (`Content-Length`, chunked with trailers, until close),
//!   the decoder and the body writer that the server and client halves share.
//! - [`server`]: the server half: every request a client sends on an HTTP/1 connection, read,
//!   handed to the request path with its body streaming, and answered.
//! - [`client`]: keel's HTTP/1.1 client, which carries every request to a server (plain or
//!   TLS, any body, upgrades) over one pool of keep-alive connections per server.

pub mod client;
pub mod codec;
pub mod scan;
pub mod server;
