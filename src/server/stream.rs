//! A connection's byte stream and its read side: the socket, the bytes read and not yet
//! consumed, and the framing of the current request body. Shared (behind one `Arc`) by the
//! connection loop, the request body a handler reads, and nothing else.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::TcpStream;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context as TaskContext, Poll};

use futures_lite::future::poll_fn;

use crate::body::Source;
use crate::error::Error;
use crate::h1::decode::{self, BodyDecoder, Head};
use crate::h1::encode::CONTINUE;
use crate::runtime::Stream;
use crate::upgrade::Tunnel;

/// Bytes asked of the socket per read.
pub(super) const READ_CHUNK: usize = 8 * 1024;

/// A byte stream the connection runs over: a TCP socket, or an in-memory pipe when fuzzing.
/// All methods take `&self` so the request body and the loop can share one stream.
pub(crate) trait Io: Send + Sync + 'static {
    /// Reads into `buf`; `Ok(0)` at end of stream.
    fn poll_read(&self, cx: &mut TaskContext<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    /// Resolves when a read would not block (data or end of stream), without reading, so an
    /// idle connection holds no buffer.
    fn poll_readable(&self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>>;
    /// Writes from `bufs` in order.
    fn poll_write_vectored(&self, cx: &mut TaskContext<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>>;
    /// Shuts the sending side (FIN), keeping the receiving side open.
    fn shutdown_write(&self);
    /// Shuts both sides: reads see the end, writes fail (cutting an upgraded stream that
    /// lives on elsewhere).
    fn shutdown(&self);
}

/// A socket in a reactor is an [`Io`]: TCP, and Unix streams.
macro_rules! socket_io {
    ($($stream:ty),*) => {$(
        impl Io for Stream<$stream> {
            fn poll_read(&self, cx: &mut TaskContext<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
                match self {
                    Stream::Shared(io) => futures_lite::AsyncRead::poll_read(Pin::new(&mut &*io), cx, buf),
                    #[cfg(target_os = "linux")]
                    Stream::Own(io) => io.poll_read(cx, buf),
                }
            }

            fn poll_readable(&self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
                match self {
                    Stream::Shared(io) => io.poll_readable(cx),
                    #[cfg(target_os = "linux")]
                    Stream::Own(io) => io.poll_readable(cx),
                }
            }

            fn poll_write_vectored(&self, cx: &mut TaskContext<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
                // One buffer (nearly every flush): `send`, which costs the kernel less than
                // `writev` (no iovec to import and check).
                match (self, bufs) {
                    (Stream::Shared(io), [buf]) => futures_lite::AsyncWrite::poll_write(Pin::new(&mut &*io), cx, buf),
                    (Stream::Shared(io), _) => futures_lite::AsyncWrite::poll_write_vectored(Pin::new(&mut &*io), cx, bufs),
                    #[cfg(target_os = "linux")]
                    (Stream::Own(io), [buf]) => io.poll_write(cx, buf),
                    #[cfg(target_os = "linux")]
                    (Stream::Own(io), _) => io.poll_write_vectored(cx, bufs),
                }
            }

            fn shutdown_write(&self) {
                let _ = self.get_ref().shutdown(std::net::Shutdown::Write);
            }

            fn shutdown(&self) {
                let _ = self.get_ref().shutdown(std::net::Shutdown::Both);
            }
        }
    )*};
}
socket_io!(TcpStream, std::os::unix::net::UnixStream);

/// Writes all of `out`, emptying it as bytes leave (so a cancelled flush never resends).
/// (Not an async fn of its own: its future is `write_all`'s, not one wrapping it.)
pub(super) fn flush<'a, I: Io>(io: &'a I, out: &'a mut Vec<u8>) -> impl Future<Output = io::Result<()>> + 'a {
    write_all(io, out, &[])
}

/// Writes `out`, then `tail`, with vectored writes; empties `out`.
pub(super) async fn write_all<I: Io>(io: &I, out: &mut Vec<u8>, tail: &[u8]) -> io::Result<()> {
    let mut tail_written = 0;
    while !out.is_empty() || tail_written < tail.len() {
        let bufs = [IoSlice::new(out), IoSlice::new(&tail[tail_written..])];
        // Only the buffers with bytes left (one, for every flush).
        let bufs = match (out.is_empty(), tail_written == tail.len()) {
            (false, false) => &bufs[..],
            (false, true) => &bufs[..1],
            (true, _) => &bufs[1..],
        };
        let n = poll_fn(|cx| io.poll_write_vectored(cx, bufs)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_out = n.min(out.len());
        out.drain(..from_out);
        tail_written += n - from_out;
    }
    Ok(())
}

/// Whether a `100 Continue` is owed to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Continue {
    /// Nothing was expected, or it has been dealt with.
    None,
    /// The client waits for `100 Continue` before sending the body; nothing sent yet.
    Waiting,
    /// This many bytes of it were written.
    Sending(u8),
    /// It was sent.
    Sent,
}

/// A connection's stream and read side, shared by the loop and the current request body.
pub(super) struct Shared<I> {
    /// The stream.
    pub(super) io: I,
    /// Read state; locked briefly for each read, never across an await.
    pub(super) state: Mutex<ReadState>,
}

/// The read side of a connection.
pub(super) struct ReadState {
    /// Bytes read and not yet consumed.
    pub(super) buf: ReadBuf,
    /// Framing of the current request body.
    pub(super) body: BodyDecoder,
    /// Number of the current request; bodies of other requests may not read.
    pub(super) request: u64,
    /// Whether a `100 Continue` is owed.
    pub(super) expect: Continue,
    /// Whether the response head has been encoded (no `100 Continue` after that).
    pub(super) head_started: bool,
    /// The body's framing broke (why): the connection cannot be reused.
    pub(super) error: Option<&'static str>,
    /// The client closed its sending side.
    pub(super) eof: bool,
}

impl ReadState {
    /// Starts `head`'s request, whose head was just consumed: its body's framing, whether it
    /// waits for `100 Continue`. Returns its number on the connection.
    pub(super) fn start_request(&mut self, head: &Head) -> u64 {
        self.request += 1;
        self.body = BodyDecoder::new(head.body);
        self.expect = if head.expect_continue { Continue::Waiting } else { Continue::None };
        self.head_started = false;
        self.request
    }

    /// Whether the current request's body has been read to its end and, if it has, whether
    /// bytes of the next request are already buffered.
    pub(super) fn look_ahead(&mut self) -> (bool, bool) {
        let done = self.body.is_done();
        (done, done && self.has_next_request())
    }

    /// Whether bytes of another request are buffered, past any empty lines before it (RFC
    /// 9112 §2.2), which this consumes. Only between requests: never inside a body.
    pub(super) fn has_next_request(&mut self) -> bool {
        let skip = decode::leading_empty_lines(self.buf.filled());
        self.buf.consume(skip);
        !self.buf.is_empty()
    }
}

impl<I: Io> Shared<I> {
    /// Locks the read state; a poisoned lock (a panic elsewhere) is still consistent.
    pub(super) fn lock(&self) -> MutexGuard<'_, ReadState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    pub(super) fn poll_fill(&self, cx: &mut TaskContext<'_>) -> Poll<io::Result<usize>> {
        let mut st = self.lock();
        self.poll_fill_locked(&mut st, cx)
    }

    /// [`Shared::poll_fill`] with the lock held.
    pub(super) fn poll_fill_locked(&self, st: &mut ReadState, cx: &mut TaskContext<'_>) -> Poll<io::Result<usize>> {
        if st.eof {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.io.poll_read(cx, st.buf.spare(READ_CHUNK)))?;
        st.buf.filled_by(n);
        st.eof = n == 0;
        Poll::Ready(Ok(n))
    }

    /// Writes what is owed of `100 Continue` before the first body read.
    pub(super) fn poll_continue(&self, st: &mut ReadState, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        loop {
            let sent = match st.expect {
                Continue::Waiting if !st.head_started => 0,
                Continue::Sending(sent) if !st.head_started => usize::from(sent),
                _ => return Poll::Ready(Ok(())),
            };
            let n = ready!(self.io.poll_write_vectored(cx, &[IoSlice::new(&CONTINUE[sent..])]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let sent = sent + n;
            st.expect = match u8::try_from(sent) {
                Ok(sent) if usize::from(sent) < CONTINUE.len() => Continue::Sending(sent),
                _ => Continue::Sent,
            };
        }
    }

    /// Reads body bytes into `out`, or (with `out: None`) discards up to `max` of them.
    /// Returns how many; 0 at the end of the body.
    pub(super) fn poll_decode(
        &self,
        st: &mut ReadState,
        cx: &mut TaskContext<'_>,
        mut out: Option<&mut [u8]>,
        max: u64,
    ) -> Poll<Result<usize, Error>> {
        let max = out.as_ref().map_or(max.min(usize::MAX as u64) as usize, |o| o.len());
        loop {
            if let Some(why) = st.error {
                return Poll::Ready(Err(Error::BadRequest(why)));
            }
            if st.body.is_done() || max == 0 {
                return Poll::Ready(Ok(0));
            }
            if !st.buf.is_empty() {
                match st.body.decode(st.buf.filled(), max) {
                    Err(e) => {
                        st.error = Some(e.reason());
                        continue;
                    }
                    Ok(step) => {
                        let n = step.data.len();
                        if let Some(out) = out.as_mut() {
                            out[..n].copy_from_slice(&st.buf.filled()[step.data]);
                        }
                        st.buf.consume(step.consumed);
                        if n > 0 {
                            return Poll::Ready(Ok(n));
                        }
                        if step.consumed > 0 {
                            continue;
                        }
                    }
                }
            }
            if st.eof {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection before sending the whole request body",
                );
                return Poll::Ready(Err(Error::Io(e)));
            }
            // A Content-Length body with nothing buffered goes straight to the caller.
            if let (Some(out), BodyDecoder::Length(remaining)) = (out.as_mut(), &mut st.body) {
                let want = (*remaining).min(out.len() as u64) as usize;
                let n = ready!(self.io.poll_read(cx, &mut out[..want]))?;
                if n == 0 {
                    st.eof = true;
                    continue;
                }
                *remaining -= n as u64;
                return Poll::Ready(Ok(n));
            }
            ready!(self.poll_fill_locked(st, cx))?;
        }
    }
}

/// After an upgrade: the bytes the client sent behind its request first, then the socket.
impl<I: Io> Tunnel for Shared<I> {
    fn poll_read(&self, cx: &mut TaskContext<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        {
            let mut st = self.lock();
            if !st.buf.is_empty() {
                let n = st.buf.filled().len().min(buf.len());
                buf[..n].copy_from_slice(&st.buf.filled()[..n]);
                st.buf.consume(n);
                st.buf.release();
                return Poll::Ready(Ok(n));
            }
        }
        self.io.poll_read(cx, buf)
    }

    fn poll_write_vectored(&self, cx: &mut TaskContext<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        self.io.poll_write_vectored(cx, bufs)
    }

    fn shutdown_write(&self) {
        self.io.shutdown_write();
    }
}

impl<I: Io> Source for Shared<I> {
    fn poll_body(&self, cx: &mut TaskContext<'_>, buf: &mut [u8], request: u64) -> Poll<Result<usize, Error>> {
        let mut st = self.lock();
        if st.request != request {
            let e = io::Error::other("request body read after its exchange ended");
            return Poll::Ready(Err(Error::Io(e)));
        }
        if !st.body.is_done() && !buf.is_empty() {
            ready!(self.poll_continue(&mut st, cx))?;
        }
        self.poll_decode(&mut st, cx, Some(buf), 0)
    }
}

/// A read buffer: `data[start..end]` holds unconsumed bytes. Reads go into the initialized
/// tail, so no read pays for zeroing; an idle connection gives the memory back.
#[derive(Default)]
pub(super) struct ReadBuf {
    /// Storage; its whole length is initialized.
    data: Vec<u8>,
    /// First unconsumed byte.
    start: usize,
    /// End of the read bytes.
    end: usize,
}

impl ReadBuf {
    /// The unconsumed bytes.
    pub(super) fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Whether nothing is buffered.
    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Marks `n` bytes consumed.
    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Drops everything buffered.
    pub(super) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Room for at least `min` more bytes, moving or growing the storage if needed.
    pub(super) fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.data.is_empty() {
            self.data = POOL.with(|pool| pool.borrow_mut().pop()).unwrap_or_default();
        }
        if self.data.len() - self.end < min {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.data.len() - self.end < min {
                let len = (self.data.len() * 2).max(self.end + min);
                self.data.resize(len, 0);
            }
        }
        &mut self.data[self.end..]
    }

    /// Marks `n` more bytes as read into the spare room.
    pub(super) fn filled_by(&mut self, n: usize) {
        self.end += n;
    }

    /// Gives the storage back (to this thread's pool, if it is the usual size) when nothing
    /// is buffered, so an idle connection holds no buffer.
    pub(super) fn release(&mut self) {
        if self.is_empty() && !self.data.is_empty() {
            let data = std::mem::take(&mut self.data);
            if data.len() == READ_CHUNK {
                // (`try_with`: a connection dropped as its thread exits just frees it.)
                let _ = POOL.try_with(|pool| {
                    let mut pool = pool.borrow_mut();
                    if pool.len() < POOL_BUFFERS {
                        pool.push(data);
                    }
                });
            }
        }
    }
}

/// A closing connection's buffer goes back to the pool too: a new connection then reads into
/// memory already initialized instead of zeroing 8 KiB (a third of a short connection's user
/// space instructions).
impl Drop for ReadBuf {
    fn drop(&mut self) {
        self.clear();
        self.release();
    }
}

/// Read buffers kept per thread for reuse, at most.
const POOL_BUFFERS: usize = 64;

/// Gives an empty write buffer back to this thread's pool (unless it grew large).
pub(super) fn release_out(out: &mut Vec<u8>) {
    if out.capacity() == 0 {
        return;
    }
    let out = std::mem::take(out);
    if out.capacity() <= READ_CHUNK {
        let _ = OUT_POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_BUFFERS {
                pool.push(out);
            }
        });
    }
}

thread_local! {
    /// Read buffers of [`READ_CHUNK`] bytes, free for the next connection that wakes on this
    /// thread: busy connections skip the allocator, idle ones hold nothing.
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Empty write buffers, likewise.
    pub(super) static OUT_POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}
