//! The HTTP/1.1 codec (RFC 9112), pure: bytes in, values out.
//!
//! Nothing here touches a socket, a clock or a future. [`decode`] turns request bytes into a
//! request head and body framing, or says it needs more bytes, or names what is wrong;
//! [`encode`] turns a response head and its framing into bytes. The connection loop
//! (`server::conn`) owns the socket and the timers and calls these.

pub mod decode;
pub mod encode;
