//! Request and response bodies.
//!
//! One type for both directions. A request body streams from the connection as the handler
//! reads it (nothing is buffered ahead); a response body is bytes, or streams from an
//! `AsyncRead` or a `Stream` and is then sent chunked unless its length is known.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use futures_lite::{AsyncRead, Stream};

use crate::error::Error;

/// Where a request body's bytes come from: the connection that received the request.
pub(crate) trait Source: Send + Sync {
    /// Reads body bytes of request number `request` into `buf`; `Ok(0)` at the end of the body.
    /// Fails once that request's exchange is over.
    fn poll_body(&self, cx: &mut Context<'_>, buf: &mut [u8], request: u64) -> Poll<Result<usize, Error>>;
}

/// A request body still on the connection.
pub(crate) struct Incoming {
    /// The connection.
    pub(crate) source: Arc<dyn Source>,
    /// Which request on the connection this body belongs to.
    pub(crate) request: u64,
    /// Bytes left to read, when the request said (Content-Length).
    pub(crate) remaining: Option<u64>,
}

/// The body of a request or a response.
///
/// Build a response body with `From` (`&'static str`, `String`, `Vec<u8>`, [`Bytes`], `()`),
/// [`Body::from_reader`] or [`Body::from_stream`]. Read a request body with [`Body::bytes`],
/// [`Body::text`], or as an [`AsyncRead`] for uploads of any size. A request body can be
/// returned as the response body to stream it back.
pub struct Body {
    /// What the bytes are.
    kind: Kind,
    /// Most bytes [`Body::bytes`] will read.
    limit: u64,
}

/// The representations a body can have.
enum Kind {
    /// No bytes.
    Empty,
    /// All bytes, in memory.
    Full(Bytes),
    /// Bytes from a reader, optionally of known length.
    Reader {
        /// The reader.
        reader: Pin<Box<dyn AsyncRead + Send>>,
        /// Its length, when known.
        len: Option<u64>,
    },
    /// Bytes from a stream of chunks.
    Stream {
        /// The stream.
        stream: Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>,
        /// The unread rest of the last chunk.
        chunk: Bytes,
    },
    /// A request body on the connection.
    Incoming(Incoming),
}

impl Body {
    /// An empty body.
    pub fn empty() -> Body {
        Body { kind: Kind::Empty, limit: u64::MAX }
    }

    /// A body read from `reader`. With `len: Some(n)` the response is sent with
    /// `Content-Length: n` and the reader must yield exactly `n` bytes (the connection closes
    /// otherwise); with `None` it is sent chunked. The first read is tried before the head is
    /// sent: if it fails at once, the client gets a 500 instead. A read error after that (the
    /// head goes out while the reader waits) cuts the response short (no last chunk, or
    /// fewer bytes than declared) and closes the connection. Either is logged at error.
    pub fn from_reader(reader: impl AsyncRead + Send + 'static, len: Option<u64>) -> Body {
        Body { kind: Kind::Reader { reader: Box::pin(reader), len }, limit: u64::MAX }
    }

    /// A body from a stream of chunks, sent chunked; each chunk is flushed as it comes, so this
    /// suits server-sent events and long polls. An error from the stream is answered as a
    /// read error of [`Body::from_reader`] is.
    pub fn from_stream(stream: impl Stream<Item = io::Result<Bytes>> + Send + 'static) -> Body {
        Body { kind: Kind::Stream { stream: Box::pin(stream), chunk: Bytes::new() }, limit: u64::MAX }
    }

    /// A request body streaming from the connection.
    pub(crate) fn incoming(incoming: Incoming, limit: u64) -> Body {
        Body { kind: Kind::Incoming(incoming), limit }
    }

    /// The number of bytes left in the body, when known.
    pub fn len(&self) -> Option<u64> {
        match &self.kind {
            Kind::Empty => Some(0),
            Kind::Full(bytes) => Some(bytes.len() as u64),
            Kind::Reader { len, .. } => *len,
            Kind::Stream { .. } => None,
            Kind::Incoming(incoming) => incoming.remaining,
        }
    }

    /// Whether the body is known to be empty.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// Sets the most bytes [`Body::bytes`] and [`Body::text`] will read. Request bodies start
    /// at `Config::max_body_bytes`; other bodies are unlimited.
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// Reads the whole body into memory, up to the limit.
    ///
    /// Fails with [`Error::BodyTooLarge`] past the limit (answer with [`Error::status`], 413),
    /// [`Error::BadRequest`] if the body's framing is broken (400), or [`Error::Io`] if the
    /// connection fails. A request body over the limit by its `Content-Length` fails before
    /// any byte is read.
    pub async fn bytes(&mut self) -> Result<Bytes, Error> {
        let limit = self.limit;
        if self.len().is_some_and(|len| len > limit) {
            return Err(Error::BodyTooLarge { limit });
        }
        if let Kind::Full(bytes) = &mut self.kind {
            return Ok(std::mem::take(bytes));
        }
        // Read straight into the result; each read asks for at most one byte past the limit.
        let mut out = Vec::new();
        loop {
            let start = out.len();
            let room = (limit - start as u64).saturating_add(1);
            let want = self.len().map_or(8192, |n| n.max(1)).min(64 * 1024).min(room) as usize;
            out.resize(start + want, 0);
            let n = futures_lite::future::poll_fn(|cx| self.poll_read_body(cx, &mut out[start..])).await?;
            out.truncate(start + n);
            if n == 0 {
                return Ok(out.into());
            }
            if out.len() as u64 > limit {
                return Err(Error::BodyTooLarge { limit });
            }
        }
    }

    /// Reads the whole body as UTF-8 text, up to the limit; see [`Body::bytes`].
    pub async fn text(&mut self) -> Result<String, Error> {
        let bytes = self.bytes().await?;
        String::from_utf8(bytes.into()).map_err(|_| Error::BadRequest("body is not valid UTF-8"))
    }

    /// The request this body belongs to, if it is a request body still on its connection.
    pub(crate) fn incoming_request(&self) -> Option<u64> {
        match &self.kind {
            Kind::Incoming(incoming) => Some(incoming.request),
            _ => None,
        }
    }

    /// The whole body when it is already in memory (sent without copying through a reader).
    pub(crate) fn take_full(&mut self) -> Option<Bytes> {
        match &mut self.kind {
            Kind::Empty => Some(Bytes::new()),
            Kind::Full(bytes) => Some(std::mem::take(bytes)),
            _ => None,
        }
    }

    /// Reads into `buf`, keeping this crate's error (so a 400 stays a 400).
    pub(crate) fn poll_read_body(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<Result<usize, Error>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match &mut self.kind {
            Kind::Empty => Poll::Ready(Ok(0)),
            Kind::Full(bytes) => {
                let n = bytes.len().min(buf.len());
                buf[..n].copy_from_slice(&bytes[..n]);
                bytes.advance(n);
                Poll::Ready(Ok(n))
            }
            Kind::Reader { reader, len } => {
                let n = std::task::ready!(reader.as_mut().poll_read(cx, buf))?;
                if let Some(len) = len {
                    *len = len.saturating_sub(n as u64);
                }
                Poll::Ready(Ok(n))
            }
            Kind::Stream { stream, chunk } => {
                while chunk.is_empty() {
                    match std::task::ready!(stream.as_mut().poll_next(cx)) {
                        Some(next) => *chunk = next?,
                        None => return Poll::Ready(Ok(0)),
                    }
                }
                let n = chunk.len().min(buf.len());
                buf[..n].copy_from_slice(&chunk[..n]);
                chunk.advance(n);
                Poll::Ready(Ok(n))
            }
            Kind::Incoming(incoming) => {
                let n = std::task::ready!(incoming.source.poll_body(cx, buf, incoming.request))?;
                if let Some(remaining) = &mut incoming.remaining {
                    *remaining = remaining.saturating_sub(n as u64);
                }
                Poll::Ready(Ok(n))
            }
        }
    }
}

impl AsyncRead for Body {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_read_body(cx, buf).map_err(io::Error::from)
    }
}

impl Default for Body {
    fn default() -> Self {
        Body::empty()
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Empty => "empty",
            Kind::Full(_) => "bytes",
            Kind::Reader { .. } => "reader",
            Kind::Stream { .. } => "stream",
            Kind::Incoming(_) => "incoming",
        };
        f.debug_struct("Body").field("kind", &kind).field("len", &self.len()).finish()
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Self {
        Body { kind: Kind::Full(bytes), limit: u64::MAX }
    }
}

impl From<Vec<u8>> for Body {
    fn from(bytes: Vec<u8>) -> Self {
        Body::from(Bytes::from(bytes))
    }
}

impl From<String> for Body {
    fn from(text: String) -> Self {
        Body::from(Bytes::from(text))
    }
}

impl From<&'static str> for Body {
    fn from(text: &'static str) -> Self {
        Body::from(Bytes::from_static(text.as_bytes()))
    }
}

impl From<&'static [u8]> for Body {
    fn from(bytes: &'static [u8]) -> Self {
        Body::from(Bytes::from_static(bytes))
    }
}

impl From<()> for Body {
    fn from((): ()) -> Self {
        Body::empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    #[test]
    fn lengths() {
        assert_eq!(Body::empty().len(), Some(0));
        assert!(Body::from(()).is_empty());
        assert_eq!(Body::from("hello").len(), Some(5));
        assert_eq!(Body::from(String::from("hé")).len(), Some(3));
        assert_eq!(Body::from_reader(&b"abc"[..], Some(3)).len(), Some(3));
        assert_eq!(Body::from_reader(&b"abc"[..], None).len(), None);
        assert_eq!(Body::from_stream(futures_lite::stream::empty()).len(), None);
    }

    #[test]
    fn whole_reads_respect_the_limit() {
        block_on(async {
            let mut body = Body::from_reader(&b"0123456789"[..], None);
            body.set_limit(10);
            assert_eq!(body.bytes().await.unwrap(), "0123456789");
            let mut body = Body::from_reader(&b"0123456789"[..], None);
            body.set_limit(9);
            assert!(body.bytes().await.unwrap_err().is_body_too_large());
            let mut body = Body::from("0123456789");
            body.set_limit(9);
            assert_eq!(body.bytes().await.unwrap_err().status(), 413);
        });
    }

    #[test]
    fn streams_read_chunk_by_chunk() {
        block_on(async {
            let chunks = vec![Ok(Bytes::from("ab")), Ok(Bytes::new()), Ok(Bytes::from("cde"))];
            let mut body = Body::from_stream(futures_lite::stream::iter(chunks));
            assert_eq!(body.text().await.unwrap(), "abcde");
            let chunks = vec![Ok(Bytes::from("ab")), Err(io::Error::other("boom"))];
            let mut body = Body::from_stream(futures_lite::stream::iter(chunks));
            assert!(matches!(body.bytes().await, Err(Error::Io(_))));
        });
    }

    #[test]
    fn text_must_be_utf8() {
        block_on(async {
            let mut body = Body::from(vec![0xff, 0xfe]);
            assert_eq!(body.text().await.unwrap_err().status(), 400);
        });
    }
}
