//! One connection: the keep-alive loop and every timeout. The only code that holds the socket
//! and the clock; it never looks at header bytes itself (the codec does).
//!
//! A connection alternates three phases, each a race between the work and the connection's
//! one deadline (set per phase, an atomic store; the server's clock thread wakes the
//! connection when it passes, see `clock.rs`):
//!
//! 1. **waiting** for the first byte of a request: idle timeout (for the first request, the
//!    header-read timeout from accept), also raced against the drain signal;
//! 2. **head**: header-read timeout, from the first byte until the head parses;
//! 3. **exchange**: write timeout, covering the body read, the handler and the response write.
//!
//! Expiry drops the phase's future: cancellation is drop. The request body is read through
//! the connection's shared read state ([`Shared`]), so the handler can stream it, and the
//! connection gets the rest back afterwards to drain it (up to [`DRAIN_LIMIT`]) for reuse.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{SocketAddr, TcpStream};
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};

use async_io::Async;
use futures_lite::future::{poll_fn, poll_once};
use futures_lite::FutureExt;
use http::header::{self, HeaderMap};
use http::{Method, Request, StatusCode, Version};

use super::clock::{Activity, Clock, Deadline, Tracker};
use crate::access;
use crate::body::{Body, Incoming, Source};
use crate::error::{decode_status, Error, Phase};
use crate::h1::decode::{self, BodyDecoder, BodyLength, DecodeError, Head, HeadScanner, Limits};
use crate::h1::encode::{self, Connection, ResponseHead, CONTINUE, CRLF, DATE_LEN, LAST_CHUNK};
use crate::handler::Handler;
use crate::metrics::{Metrics, Reject, Shard};
use crate::shutdown::{Latch, Slot};

/// Unread request body drained after a response so the connection can serve another request.
/// Past this the connection closes instead: reading a large upload nobody wants costs more
/// than a new connection (the same bound Go's net/http uses).
pub const DRAIN_LIMIT: u64 = 256 * 1024;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 * 1024;

/// Response bytes held back while pipelined requests are waiting, before a flush is forced.
const FLUSH_AT: usize = 64 * 1024;

/// Response bodies up to this size are copied next to the head (one write); larger ones are
/// written from their own memory with a vectored write.
const INLINE_BODY: usize = 16 * 1024;

/// Bytes read per chunk of a streamed response body.
const STREAM_CHUNK: usize = 16 * 1024;

/// How long a closing connection keeps flushing and then reading (and discarding) before it
/// closes, so the client receives the last response instead of a reset caused by its unread
/// bytes (Go's net/http waits 500 ms for the same reason).
pub(crate) const LINGER: Duration = Duration::from_millis(500);

/// How much longer a request head still being read may take once the drain starts (at most
/// the header-read timeout's remainder): enough for a head already on its way, short enough
/// that one stalled client cannot hold a restart to its deadline. It then gets 408.
pub(crate) const DRAIN_HEAD_GRACE: Duration = Duration::from_secs(1);

/// Bytes a lingering connection reads and discards at most.
const LINGER_BYTES: usize = 256 * 1024;

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
}

impl Io for Async<TcpStream> {
    fn poll_read(&self, cx: &mut TaskContext<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        futures_lite::AsyncRead::poll_read(Pin::new(&mut &*self), cx, buf)
    }

    fn poll_readable(&self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Async::poll_readable(self, cx)
    }

    fn poll_write_vectored(&self, cx: &mut TaskContext<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        futures_lite::AsyncWrite::poll_write_vectored(Pin::new(&mut &*self), cx, bufs)
    }

    fn shutdown_write(&self) {
        let _ = self.get_ref().shutdown(std::net::Shutdown::Write);
    }
}

/// The per-server settings a connection needs, taken from `Config`.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Head limits for the codec.
    pub(crate) limits: Limits,
    /// See `Config::header_read_timeout`.
    pub(crate) header_read_timeout: Option<Duration>,
    /// See `Config::write_timeout`.
    pub(crate) write_timeout: Option<Duration>,
    /// See `Config::idle_timeout`.
    pub(crate) idle_timeout: Option<Duration>,
    /// See `Config::max_body_bytes`.
    pub(crate) max_body_bytes: u64,
    /// How long a closing connection lingers ([`LINGER`]; `None` only in fuzzing, which
    /// must not start real timers).
    pub(crate) linger: Option<Duration>,
    /// Whether a handler that waits can learn that its client went away ([`PeerGone`] in
    /// the request's extensions): the debug server's, whose profiles run for seconds.
    pub(crate) watch_peer: bool,
    /// Whether `/debug/connections` lists these connections (the service's).
    pub(crate) listed: bool,
    /// See `Config::access_log`.
    pub(crate) access_log: bool,
}

/// In a request's extensions when the server watches for the client going away: set once the
/// client has closed its side while the handler runs (its request body fully read), so a
/// long handler can stop early. Like Go's request context, a hint: the response is still
/// written if the handler returns one.
#[derive(Clone, Default)]
pub(crate) struct PeerGone(pub(crate) Latch);

/// Everything a server's connections share.
pub(crate) struct Context<H> {
    /// Serves the requests.
    pub(crate) handler: H,
    /// Limits and timeouts.
    pub(crate) settings: Settings,
    /// Once set, every response says `Connection: close` (shutdown has started).
    pub(crate) close_responses: Latch,
    /// Once set, connections waiting for a request close (the drain has started).
    pub(crate) close_idle: Latch,
    /// Counters for the debug server.
    pub(crate) metrics: Arc<Metrics>,
    /// Sweeps the connections' deadlines.
    pub(crate) clock: Clock,
}

/// Serves one connection from `peer`, running in place `place` of the runtime (its metrics
/// shard), until it closes; holds `done` until then. A panic in the connection loop closes
/// the connection.
///
/// Everything is built before the returned future starts, and the future holds the
/// connection once: an idle connection's task is this future, so every byte in it counts
/// (a future that moves what it captured into a local holds both).
pub(crate) fn serve<I: Io, H: Handler>(
    io: I,
    peer: Option<SocketAddr>,
    ctx: Arc<Context<H>>,
    place: usize,
    done: impl Send + 'static,
) -> impl Future<Output = ()> + Send {
    ctx.metrics.shard(place).accepted();
    let deadline = ctx.clock.deadline(peer, ctx.settings.listed);
    let drain = ctx.close_idle.slot();
    let mut conn = Conn {
        shared: Arc::new(Shared {
            io,
            state: Mutex::new(ReadState {
                buf: ReadBuf::default(),
                body: BodyDecoder::Length(0),
                request: 0,
                expect: Continue::None,
                head_started: false,
                error: None,
                eof: false,
            }),
        }),
        ctx,
        place,
        tracker: deadline.tracker(),
        deadline,
        out: Vec::new(),
        drain,
        head: None,
        now: Instant::now(),
    };
    async move {
        match AssertUnwindSafe(conn.run()).catch_unwind().await {
            Ok(Err(e)) => log::trace!("{}: closed: {e}", conn.peer()),
            Ok(Ok(())) => log::trace!("{}: closed", conn.peer()),
            Err(_) => log::error!("{}: the connection loop panicked; its connection is closed", conn.peer()),
        }
        drop(conn);
        drop(done);
    }
}

/// What the connection does after an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Serve the next request.
    KeepAlive,
    /// Close now: everything is sent and the client has nothing more to send.
    Close,
    /// Flush, stop sending, read and discard briefly, close: the client may still be sending,
    /// and closing on unread bytes would reset the connection before it reads our answer.
    Linger,
}

/// How waiting for a request's first byte ended.
enum Wait {
    /// Bytes (or the end of the stream) are ready to read.
    Readable,
    /// The server is draining: close.
    Drain,
}

/// One connection's loop state.
struct Conn<I: Io, H> {
    /// The stream and the read side, shared with the current request body.
    shared: Arc<Shared<I>>,
    /// The server's shared context.
    ctx: Arc<Context<H>>,
    /// The runtime place it runs in: its metrics shard.
    place: usize,
    /// What the connections view shows of it (and the client's address, for logs).
    tracker: Tracker,
    /// This connection's deadline, swept by the server's clock.
    deadline: Deadline,
    /// Encoded response bytes not yet written; pipelined responses gather here.
    out: Vec<u8>,
    /// Wakes an idle connection when the drain starts; taken once per connection.
    drain: Slot,
    /// The head being served. Kept here, not passed by value, so the futures that serve it
    /// capture a reference and are cheap to move (moving them was 12% of a pipelined
    /// request); boxed, so an idle connection does not carry its 232 bytes.
    head: Option<Box<Head>>,
    /// The last time read from the clock. Reading it costs a few percent of a request, so
    /// phases that start without waiting reuse it.
    now: Instant,
}

impl<I: Io, H: Handler> Conn<I, H> {
    /// This connection's metrics shard.
    fn metrics(&self) -> &Shard {
        self.ctx.metrics.shard(self.place)
    }

    /// The client's address, for logs.
    fn peer(&self) -> String {
        self.tracker.peer().map_or_else(|| "unknown peer".into(), |a| a.to_string())
    }

    /// The keep-alive loop.
    async fn run(&mut self) -> Result<(), Error> {
        // The first request's header-read deadline runs from accept, through the wait for its
        // first byte. (Locals held across awaits live in every idle task: keep them few.)
        self.deadline.set(after(self.now, self.ctx.settings.header_read_timeout));
        let mut first = true;
        loop {
            // 1. Wait for the next request's first byte, unless it is already buffered. (The
            //    clock was read when the last exchange ended.)
            if !self.shared.lock().has_next_request() {
                let phase = if first { Phase::HeaderRead } else { Phase::Idle };
                if !first {
                    self.deadline.set(after(self.now, self.ctx.settings.idle_timeout));
                    self.tracker.enter(Activity::Idle, self.now);
                }
                match self.wait_for_request().await {
                    Some(Ok(Wait::Readable)) => {}
                    Some(Ok(Wait::Drain)) => return Ok(()),
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(self.timed_out(phase)),
                }
                if !first {
                    self.now = Instant::now();
                }
            }
            // 2. Read the head: the header-read deadline runs from its first byte (from accept
            //    for the first request, as set above).
            if !first {
                self.deadline.set(after(self.now, self.ctx.settings.header_read_timeout));
            }
            self.tracker.enter(Activity::ReadingHead, self.now);
            first = false;
            match self.read_head().await {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(HeadError::Invalid(e)) => {
                    let status = self.reject(e);
                    self.log_refused(status, None);
                    Box::pin(self.linger()).await;
                    return Ok(());
                }
                Err(HeadError::TimedOut { partial }) => {
                    let e = self.timed_out(Phase::HeaderRead);
                    if partial {
                        self.metrics().response(408);
                        self.log_refused(408, Some(access::End::TimedOut(Phase::HeaderRead)));
                        let message = "the request head took longer than the server's header read timeout";
                        encode::encode_error(
                            &mut self.out,
                            StatusCode::REQUEST_TIMEOUT,
                            message,
                            &date(Instant::now()),
                        );
                        Box::pin(self.linger()).await;
                    }
                    return Err(e);
                }
                Err(HeadError::Io(e)) => return Err(e.into()),
            };
            // 3. The exchange, under the write deadline.
            // Boxed: an idle connection's task then holds none of the exchange's state.
            match Box::pin(self.exchange()).await? {
                Next::KeepAlive => {}
                Next::Close => return Ok(()),
                Next::Linger => {
                    Box::pin(self.linger()).await;
                    return Ok(());
                }
            }
        }
    }

    /// Counts and logs an expired timeout; returns the error that closes the connection.
    fn timed_out(&self, phase: Phase) -> Error {
        self.metrics().timed_out(phase);
        let e = Error::TimedOut(phase);
        log::debug!("{}: {e}", self.peer());
        e
    }

    /// Waits until a byte of the next request is buffered (or the client closed), the
    /// deadline passes (`None`), or the drain starts.
    ///
    /// Readiness is only a hint: async-io reports a socket readable if an event arrived since
    /// the last wait, even when a read already took those bytes (a request body that arrived
    /// after its handler started waiting leaves such a stale event). So a wake-up reads, and
    /// one that finds nothing, or only empty lines (RFC 9112 §2.2), keeps waiting under the
    /// same deadline and the same drain signal: the connection is still between requests.
    async fn wait_for_request(&mut self) -> Option<io::Result<Wait>> {
        debug_assert!(self.out.is_empty(), "waiting with unsent responses");
        // An idle connection holds no buffers.
        self.shared.lock().buf.release();
        release_out(&mut self.out);
        if self.ctx.close_idle.is_set() {
            return Some(Ok(Wait::Drain));
        }
        // One poll function for the three-way race: the smallest state an idle task can hold.
        let Conn { shared, deadline, drain, .. } = self;
        // After a read found nothing, that read's registration is what wakes the task: read
        // again rather than ask for readiness (one call per wake-up, not two).
        let mut read_next = false;
        deadline
            .race_fn(|cx| {
                loop {
                    if !std::mem::take(&mut read_next) {
                        match shared.io.poll_readable(cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => break,
                        }
                    }
                    let mut st = shared.lock();
                    match shared.poll_fill_locked(&mut st, cx) {
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Wait::Readable)),
                        Poll::Ready(Ok(_)) if st.has_next_request() => return Poll::Ready(Ok(Wait::Readable)),
                        // Only empty lines: look again (the next readiness check registers).
                        Poll::Ready(Ok(_)) => st.buf.release(),
                        // A stale readiness: the read registered this task for the next one.
                        Poll::Pending => {
                            st.buf.release();
                            read_next = true;
                            break;
                        }
                    }
                }
                drain.poll(cx).map(|()| Ok(Wait::Drain))
            })
            .await
    }

    /// Reads until a whole head parses, into `self.head`. `Ok(false)`: the client closed (or
    /// the head is incomplete at end of stream) and gets no answer.
    async fn read_head(&mut self) -> Result<bool, HeadError> {
        let limits = self.ctx.settings.limits;
        let mut scanner = HeadScanner::default();
        // Whether the drain has started while this head was being read.
        let mut draining = false;
        loop {
            {
                let mut st = self.shared.lock();
                let skip = decode::leading_empty_lines(st.buf.filled());
                st.buf.consume(skip);
                if skip > 0 {
                    scanner = HeadScanner::default();
                }
                if let Some(n) = scanner.ready(st.buf.filled(), limits.max_head_bytes) {
                    match decode::parse_head(&st.buf.filled()[..n], limits) {
                        Ok(Some((head, len))) => {
                            st.buf.consume(len);
                            self.head = Some(Box::new(head));
                            return Ok(true);
                        }
                        Ok(None) => {}
                        Err(e) => return Err(HeadError::Invalid(e)),
                    }
                }
                if st.eof {
                    return Ok(false);
                }
            }
            // Never wait for input while holding responses the client may be waiting for.
            let Conn { shared, out, deadline, drain, .. } = self;
            let timed_out = || HeadError::TimedOut { partial: !shared.lock().buf.is_empty() };
            if !out.is_empty() {
                match Box::pin(deadline.race(flush(&shared.io, out))).await {
                    Some(Ok(())) => {}
                    Some(Err(e)) => return Err(HeadError::Io(e)),
                    None => return Err(timed_out()),
                }
            }
            // Until the drain starts, wait for bytes; from then on the head has a short grace.
            let read = deadline.race_fn(|cx| match shared.poll_fill(cx) {
                Poll::Ready(filled) => Poll::Ready(Some(filled)),
                Poll::Pending if draining => Poll::Pending,
                Poll::Pending => drain.poll(cx).map(|()| None),
            });
            match read.await {
                Some(Some(Ok(_))) => self.now = Instant::now(),
                Some(Some(Err(e))) => return Err(HeadError::Io(e)),
                Some(None) => {
                    draining = true;
                    deadline.at_most(Instant::now() + DRAIN_HEAD_GRACE);
                }
                None => return Err(timed_out()),
            }
        }
    }

    /// Answers a request the codec refused, and counts it; returns the status.
    fn reject(&mut self, e: DecodeError) -> u16 {
        let status = decode_status(&e);
        log::debug!("{}: refused a request with {status}: {}", self.peer(), e.reason());
        self.metrics().rejected(Reject::from(&e));
        self.metrics().response(status.as_u16());
        encode::encode_error(&mut self.out, status, e.reason(), &date(self.now));
        status.as_u16()
    }

    /// The access-log line of a request refused before its head was parsed.
    fn log_refused(&self, status: u16, end: Option<access::End>) {
        if self.ctx.settings.access_log {
            access::Entry::refused(self.tracker.peer(), self.now).finish(Some(status), 0, end);
        }
    }

    /// Runs one exchange (body, handler, response) under the write deadline, catching panics.
    async fn exchange(&mut self) -> Result<Next, Error> {
        let started = self.now;
        let ctx = &*self.ctx;
        let metrics = ctx.metrics.shard(self.place);
        metrics.request_started();
        self.deadline.set(after(started, ctx.settings.write_timeout));
        self.tracker.enter(Activity::InHandler, started);
        self.tracker.count_request();
        // Built only when the access log is on; written when the exchange ends (with
        // `end=cut` if this future is dropped first).
        let entry = match (&self.head, ctx.settings.access_log) {
            (Some(head), true) => {
                Some(access::Entry::new(self.tracker.peer(), &head.method, &head.uri, head.version, started))
            }
            _ => None,
        };
        let mut progress = Progress::default();
        let Conn { shared, deadline, out, head, tracker, .. } = self;
        let records = Records { metrics, tracker };
        // Boxed: the task of an idle connection stays small, and the wrappers below move a
        // pointer instead of the whole future.
        let work = AssertUnwindSafe(Box::pin(respond(shared, out, ctx, &records, head, started, &mut progress)))
            .catch_unwind();
        let outcome = deadline.race(work).await;
        self.now = Instant::now();
        if progress.shown {
            self.tracker.show(None);
        }
        let end = match &outcome {
            Some(Ok(Ok(_))) => None,
            Some(Ok(Err(_))) => Some(access::End::ClientGone),
            Some(Err(_)) => Some(access::End::Panicked),
            None => Some(access::End::TimedOut(Phase::Write)),
        };
        let result = match outcome {
            Some(Ok(result)) => result,
            Some(Err(panic)) => {
                metrics.panicked();
                let peer = self.peer();
                log::error!("{peer}: handler panicked: {}; answering 500 and closing", panic_message(&panic));
                if !progress.head_written {
                    progress.status = Some(500);
                    let message = "internal server error (the handler panicked)";
                    encode::encode_error(&mut self.out, StatusCode::INTERNAL_SERVER_ERROR, message, &date(self.now));
                }
                Ok(Next::Linger)
            }
            None => {
                let e = self.timed_out(Phase::Write);
                if progress.head_written {
                    // Part of the response may be out: all that is left is to close.
                    metrics.request_finished(progress.status, self.now - started);
                    if let Some(entry) = entry {
                        entry.finish(progress.status, progress.sent, end);
                    }
                    return Err(e);
                }
                progress.status = Some(503);
                let message = "the request took longer than the server's write timeout";
                encode::encode_error(&mut self.out, StatusCode::SERVICE_UNAVAILABLE, message, &date(self.now));
                Ok(Next::Linger)
            }
        };
        metrics.request_finished(progress.status, self.now - started);
        if let Some(entry) = entry {
            entry.finish(progress.status, progress.sent, end);
        }
        result
    }

    /// Flushes what is left, stops sending, and reads (discarding) until the client closes,
    /// the linger time passes or [`LINGER_BYTES`] arrive; then the connection closes.
    async fn linger(&mut self) {
        let now = Instant::now();
        self.deadline.set(after(now, self.ctx.settings.linger));
        self.tracker.enter(Activity::Closing, now);
        let Conn { shared, out, deadline, .. } = self;
        if !matches!(deadline.race(flush(&shared.io, out)).await, Some(Ok(()))) {
            return;
        }
        shared.io.shutdown_write();
        let discard = async {
            let mut total = 0;
            while total < LINGER_BYTES {
                shared.lock().buf.clear();
                match poll_fn(|cx| shared.poll_fill(cx)).await {
                    Ok(n) if n > 0 => total += n,
                    _ => break,
                }
            }
        };
        deadline.race(discard).await;
    }
}

/// Why reading a head stopped without one.
enum HeadError {
    /// The codec refused it.
    Invalid(DecodeError),
    /// The header-read deadline passed; `partial` if any byte of the request had arrived.
    TimedOut {
        /// Whether to answer 408 (something arrived) or close silently.
        partial: bool,
    },
    /// The socket failed.
    Io(io::Error),
}

/// What an exchange left behind when it ended, even if cut short.
#[derive(Debug, Default)]
struct Progress {
    /// Whether any of the response head went into the output buffer.
    head_written: bool,
    /// The status sent, for metrics.
    status: Option<u16>,
    /// Response body bytes written, for the access log.
    sent: u64,
    /// Whether the exchange shows in the connections view (to clear it after).
    shown: bool,
}

/// Where an exchange records what happens: its connection's metrics shard and tracker.
struct Records<'a> {
    /// The metrics shard.
    metrics: &'a Shard,
    /// The connections view's slot.
    tracker: &'a Tracker,
}

/// One exchange: hand the request to the handler, decide the framing, write the response, and
/// drain what the handler left of the request body. Every await here is under the write
/// deadline, and the whole future is dropped if it passes.
async fn respond<I: Io, H: Handler>(
    shared: &Arc<Shared<I>>,
    out: &mut Vec<u8>,
    ctx: &Context<H>,
    records: &Records<'_>,
    head: &mut Option<Box<Head>>,
    now: Instant,
    progress: &mut Progress,
) -> Result<Next, Error> {
    let Some(head) = head.take() else { return Ok(Next::Close) };
    let Head { method, uri, version, headers, body: length, keep_alive, expect_continue } = *head;
    let request = {
        let mut st = shared.lock();
        st.request += 1;
        st.body = BodyDecoder::new(length);
        st.expect = if expect_continue { Continue::Waiting } else { Continue::None };
        st.head_started = false;
        st.request
    };
    let body = match length {
        BodyLength::Length(0) => Body::empty(),
        BodyLength::Length(n) => Body::incoming(
            Incoming { source: shared.clone(), request, remaining: Some(n) },
            ctx.settings.max_body_bytes,
        ),
        BodyLength::Chunked => {
            Body::incoming(Incoming { source: shared.clone(), request, remaining: None }, ctx.settings.max_body_bytes)
        }
    };
    let is_head = method == Method::HEAD;
    // For the connections view, if the handler has to wait (cheap copies: `Method` is a small
    // enum for the standard methods, `Uri` shares its bytes).
    let what = (method.clone(), uri.clone());
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    let gone = ctx.settings.watch_peer.then(PeerGone::default);
    if let Some(gone) = &gone {
        req.extensions_mut().insert(gone.clone());
    }

    // 1. The handler. The body's 100 Continue is written by the body itself, so nothing else
    //    may be waiting in `out` then; otherwise pipelined responses leave as soon as the
    //    handler has to wait.
    if expect_continue {
        flush(&shared.io, out).await?;
    }
    let mut handler = pin!(ctx.handler.call(req));
    let response = match poll_once(handler.as_mut()).await {
        Some(response) => response,
        None => {
            let (method, uri) = &what;
            let target = uri.path_and_query().map_or("", |p| p.as_str());
            records.tracker.show(Some(format!("{method} {target}")));
            progress.shown = true;
            flush(&shared.io, out).await?;
            match &gone {
                Some(gone) => handler.or(watch_peer(shared, gone)).await,
                None => handler.await,
            }
        }
    };

    // 2. Framing (RFC 9112 §6.1-6.3) and persistence (§9.3).
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let declared = declared_length(&parts.headers);
    let mut close = !keep_alive || asks_close(&parts.headers) || status.is_informational();
    let bodiless = status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let (content_length, chunked, send_body) = if bodiless {
        (declared.filter(|_| status == StatusCode::NOT_MODIFIED), false, false)
    } else if is_head {
        let length = match body.len() {
            Some(n) if n > 0 => Some(n),
            known => declared.or(known),
        };
        (length, false, false)
    } else {
        match body.len().or(declared) {
            Some(n) => (Some(n), false, true),
            None if version == Version::HTTP_11 => (None, true, true),
            None => {
                close = true; // HTTP/1.0: the end of the body is the end of the connection
                (None, false, true)
            }
        }
    };
    let echo = body.incoming_request() == Some(request) && send_body;

    // 3. A streamed body's first bytes are read before the head is written, so a body that
    //    fails at once (a broken request body echoed back, a failing reader) still gets an
    //    error response. If they are not ready yet, the head goes out first.
    let full = if send_body { body.take_full() } else { None };
    let mut chunk = Vec::new();
    let mut first = None;
    if send_body && full.is_none() {
        chunk = vec![0u8; STREAM_CHUNK];
        let want = stream_want(content_length, chunk.len());
        match poll_once(poll_fn(|cx| body.poll_read_body(cx, &mut chunk[..want]))).await {
            Some(Ok(n)) => first = Some(n),
            Some(Err(e)) => return Ok(refuse(records.metrics, out, progress, e, now)),
            None => {}
        }
    }
    {
        let mut st = shared.lock();
        // 4. A request body with broken framing leaves the connection unusable: answer 400
        //    whatever the handler said (it saw the error reading the body).
        if let Some(why) = st.error {
            drop(st);
            return Ok(refuse(records.metrics, out, progress, Error::BadRequest(why), now));
        }
        let pipelined = st.body.is_done() && st.has_next_request();
        if ctx.close_responses.is_set() && !pipelined {
            // Shutting down: this is the last response, unless more requests are already here.
            close = true;
        }
        if !st.body.is_done() {
            match st.expect {
                // Finish a 100 Continue the body started writing.
                Continue::Sending(n) => {
                    out.extend_from_slice(&CONTINUE[usize::from(n)..]);
                    st.expect = Continue::Sent;
                }
                // The client holds its body back and was never asked for it.
                Continue::Waiting => close = true,
                _ => {}
            }
            if !echo && st.body.remaining().is_some_and(|n| n > DRAIN_LIMIT) {
                close = true;
            }
        }
        st.head_started = true;
    }
    let connection = if close {
        Connection::Close
    } else if version == Version::HTTP_10 {
        Connection::KeepAlive
    } else {
        Connection::Default
    };
    if out.capacity() == 0 {
        *out = OUT_POOL.with(|pool| pool.borrow_mut().pop()).unwrap_or_default();
    }
    let date = date(now);
    encode::encode_head(
        out,
        &ResponseHead {
            status,
            headers: &parts.headers,
            content_length,
            chunked,
            connection,
            date: (!parts.headers.contains_key(header::DATE)).then_some(&date),
        },
    );
    progress.head_written = true;
    progress.status = Some(status.as_u16());
    records.tracker.enter(Activity::Writing, now);

    // 5. The body.
    match full {
        Some(bytes) if bytes.len() <= INLINE_BODY => {
            out.extend_from_slice(&bytes);
            progress.sent = bytes.len() as u64;
        }
        Some(bytes) => {
            write_all(&shared.io, out, &bytes).await?;
            progress.sent = bytes.len() as u64;
        }
        None if send_body => {
            let framing = match content_length {
                Some(n) => Framing::Length(n),
                None if chunked => Framing::Chunked,
                None => Framing::Close,
            };
            let complete =
                write_stream(&shared.io, out, &mut body, &mut chunk, first, framing, &mut progress.sent).await?;
            close |= !complete;
        }
        None => {}
    }
    drop(body);

    // 6. Drain what the handler left of the request body, so the connection can be reused.
    if !close && !matches!(drain_body(shared).await, Ok(true)) {
        close = true;
    }

    // 7. Flush, unless the next pipelined request is already here and little is waiting.
    let (body_done, buffered) = {
        let mut st = shared.lock();
        let done = st.body.is_done();
        (done, done && st.has_next_request())
    };
    if close || !(body_done && buffered) || out.len() >= FLUSH_AT {
        flush(&shared.io, out).await?;
    }
    Ok(match close {
        false => Next::KeepAlive,
        // The client has nothing more to send: no need to linger.
        true if body_done && !buffered => Next::Close,
        true => Next::Linger,
    })
}

/// Sets `gone` if the client closes its side while the handler runs; never resolves. Reads
/// only once the request body is done (the body belongs to the handler until then), and stops
/// at the first byte of a pipelined request: a client still sending is still there.
async fn watch_peer<I: Io, T>(shared: &Shared<I>, gone: &PeerGone) -> T {
    let mut watching = true;
    poll_fn(|cx| {
        if watching {
            let mut st = shared.lock();
            if st.body.is_done() {
                match shared.poll_fill_locked(&mut st, cx) {
                    // The end of the stream, or a reset.
                    Poll::Ready(Ok(0) | Err(_)) => {
                        gone.0.set();
                        watching = false;
                    }
                    Poll::Ready(Ok(_)) => watching = false,
                    Poll::Pending => {}
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// The handler's `Content-Length`, if it set a valid one.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Whether the handler's `Connection` field says `close`.
fn asks_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close")))
}

/// Streams `body` after the head in `out`: chunked, or exactly `length` bytes. Returns false
/// if the body did not match its declared length (the connection must close).
async fn write_stream<I: Io>(
    io: &I,
    out: &mut Vec<u8>,
    body: &mut Body,
    chunk: &mut [u8],
    mut first: Option<usize>,
    framing: Framing,
    sent: &mut u64,
) -> Result<bool, Error> {
    let chunked = framing == Framing::Chunked;
    let mut left = match framing {
        Framing::Length(n) => Some(n),
        _ => None,
    };
    loop {
        let n = match first.take() {
            Some(n) => n,
            None => {
                let want = stream_want(left, chunk.len());
                // Never wait for the body while holding the head (or a 100 Continue) back.
                let mut read = pin!(poll_fn(|cx| body.poll_read_body(cx, &mut chunk[..want])));
                match poll_once(read.as_mut()).await {
                    Some(n) => n?,
                    None => {
                        flush(io, out).await?;
                        read.await?
                    }
                }
            }
        };
        if n == 0 {
            break;
        }
        *sent += n as u64;
        if let Some(left) = &mut left {
            if n as u64 > *left {
                log::error!("response body is longer than its Content-Length; closing the connection");
                flush(io, out).await?;
                return Ok(false);
            }
            *left -= n as u64;
            write_all(io, out, &chunk[..n]).await?;
        } else if chunked {
            encode::encode_chunk_size(out, n);
            out.extend_from_slice(&chunk[..n]);
            out.extend_from_slice(CRLF);
            flush(io, out).await?;
        } else {
            write_all(io, out, &chunk[..n]).await?;
        }
    }
    if chunked {
        out.extend_from_slice(LAST_CHUNK);
    }
    if left.is_some_and(|left| left > 0) {
        log::error!("response body is shorter than its Content-Length; closing the connection");
        return Ok(false);
    }
    Ok(true)
}

/// How a streamed response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Exactly this many bytes (`Content-Length`).
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// By closing the connection (HTTP/1.0 without a length).
    Close,
}

/// How much of a streamed body to ask for next: a chunk, or less if fewer bytes are left
/// (asking one past a declared length finds bodies that are too long).
fn stream_want(left: Option<u64>, chunk: usize) -> usize {
    left.map_or(chunk, |left| left.min(chunk as u64) as usize).max(1)
}

/// Answers with an error instead of the handler's response: 400 for a broken request body,
/// 500 for any other failure before the response started. The connection then closes.
fn refuse(metrics: &Shard, out: &mut Vec<u8>, progress: &mut Progress, e: Error, now: Instant) -> Next {
    let status = if matches!(e, Error::BadRequest(_)) {
        metrics.rejected(Reject::BadRequest);
        StatusCode::BAD_REQUEST
    } else {
        log::error!("response body failed before it was sent: {e}; answering 500");
        StatusCode::INTERNAL_SERVER_ERROR
    };
    progress.head_written = true;
    progress.status = Some(status.as_u16());
    encode::encode_error(out, status, &e.to_string(), &date(now));
    Next::Linger
}

/// Reads and discards the rest of the request body, up to [`DRAIN_LIMIT`] bytes. Returns
/// whether the body ended (the connection can be reused).
async fn drain_body<I: Io>(shared: &Shared<I>) -> Result<bool, Error> {
    let mut budget = DRAIN_LIMIT;
    loop {
        let drained = poll_fn(|cx| {
            let mut st = shared.lock();
            shared.poll_decode(&mut st, cx, None, budget)
        })
        .await?;
        if drained == 0 {
            return Ok(true);
        }
        budget = budget.saturating_sub(drained as u64);
        if budget == 0 {
            return Ok(shared.lock().body.is_done());
        }
    }
}

/// Writes all of `out`, emptying it as bytes leave (so a cancelled flush never resends).
async fn flush<I: Io>(io: &I, out: &mut Vec<u8>) -> io::Result<()> {
    write_all(io, out, &[]).await
}

/// Writes `out`, then `tail`, with vectored writes; empties `out`.
async fn write_all<I: Io>(io: &I, out: &mut Vec<u8>, tail: &[u8]) -> io::Result<()> {
    let mut tail_written = 0;
    while !out.is_empty() || tail_written < tail.len() {
        let bufs = [IoSlice::new(out), IoSlice::new(&tail[tail_written..])];
        let n = poll_fn(|cx| io.poll_write_vectored(cx, &bufs)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_out = n.min(out.len());
        out.drain(..from_out);
        tail_written += n - from_out;
    }
    Ok(())
}

/// `start + timeout`, or no deadline.
fn after(start: Instant, timeout: Option<Duration>) -> Option<Instant> {
    timeout.and_then(|t| start.checked_add(t))
}

/// The `Date` value for `now`, formatted at most once a second per thread. The cache is keyed
/// on the monotonic clock the connection already read, so a cached date costs no clock read.
fn date(now: Instant) -> [u8; DATE_LEN] {
    thread_local! {
        /// The formatted date, and the instant its second ends.
        static CACHE: std::cell::Cell<Option<(Instant, [u8; DATE_LEN])>> = const { std::cell::Cell::new(None) };
    }
    CACHE.with(|cache| match cache.get() {
        Some((until, text)) if now < until => text,
        _ => {
            let wall = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
            let text = encode::encode_date(wall.as_secs());
            let until = now + Duration::from_nanos(1_000_000_000 - u64::from(wall.subsec_nanos()));
            cache.set(Some((until, text)));
            text
        }
    })
}

/// The message of a caught panic.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Whether a `100 Continue` is owed to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Continue {
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
struct Shared<I> {
    /// The stream.
    io: I,
    /// Read state; locked briefly for each read, never across an await.
    state: Mutex<ReadState>,
}

/// The read side of a connection.
struct ReadState {
    /// Bytes read and not yet consumed.
    buf: ReadBuf,
    /// Framing of the current request body.
    body: BodyDecoder,
    /// Number of the current request; bodies of other requests may not read.
    request: u64,
    /// Whether a `100 Continue` is owed.
    expect: Continue,
    /// Whether the response head has been encoded (no `100 Continue` after that).
    head_started: bool,
    /// The body's framing broke (why): the connection cannot be reused.
    error: Option<&'static str>,
    /// The client closed its sending side.
    eof: bool,
}

impl ReadState {
    /// Whether bytes of another request are buffered, past any empty lines before it (RFC
    /// 9112 §2.2), which this consumes. Only between requests: never inside a body.
    fn has_next_request(&mut self) -> bool {
        let skip = decode::leading_empty_lines(self.buf.filled());
        self.buf.consume(skip);
        !self.buf.is_empty()
    }
}

impl<I: Io> Shared<I> {
    /// Locks the read state; a poisoned lock (a panic elsewhere) is still consistent.
    fn lock(&self) -> MutexGuard<'_, ReadState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    fn poll_fill(&self, cx: &mut TaskContext<'_>) -> Poll<io::Result<usize>> {
        let mut st = self.lock();
        self.poll_fill_locked(&mut st, cx)
    }

    /// [`Shared::poll_fill`] with the lock held.
    fn poll_fill_locked(&self, st: &mut ReadState, cx: &mut TaskContext<'_>) -> Poll<io::Result<usize>> {
        if st.eof {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.io.poll_read(cx, st.buf.spare(READ_CHUNK)))?;
        st.buf.filled_by(n);
        st.eof = n == 0;
        Poll::Ready(Ok(n))
    }

    /// Writes what is owed of `100 Continue` before the first body read.
    fn poll_continue(&self, st: &mut ReadState, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
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
    fn poll_decode(
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
struct ReadBuf {
    /// Storage; its whole length is initialized.
    data: Vec<u8>,
    /// First unconsumed byte.
    start: usize,
    /// End of the read bytes.
    end: usize,
}

impl ReadBuf {
    /// The unconsumed bytes.
    fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Whether nothing is buffered.
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Marks `n` bytes consumed.
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Drops everything buffered.
    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Room for at least `min` more bytes, moving or growing the storage if needed.
    fn spare(&mut self, min: usize) -> &mut [u8] {
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
    fn filled_by(&mut self, n: usize) {
        self.end += n;
    }

    /// Gives the storage back (to this thread's pool, if it is the usual size) when nothing
    /// is buffered, so an idle connection holds no buffer.
    fn release(&mut self) {
        if self.is_empty() && !self.data.is_empty() {
            let data = std::mem::take(&mut self.data);
            if data.len() == READ_CHUNK {
                POOL.with(|pool| {
                    let mut pool = pool.borrow_mut();
                    if pool.len() < POOL_BUFFERS {
                        pool.push(data);
                    }
                });
            }
        }
    }
}

/// Read buffers kept per thread for reuse, at most.
const POOL_BUFFERS: usize = 64;

/// Gives an empty write buffer back to this thread's pool (unless it grew large).
fn release_out(out: &mut Vec<u8>) {
    if out.capacity() == 0 {
        return;
    }
    let out = std::mem::take(out);
    if out.capacity() <= READ_CHUNK {
        OUT_POOL.with(|pool| {
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
    static OUT_POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}
