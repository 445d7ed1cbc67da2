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
//! the connection's shared read state (`stream.rs`), so the handler can stream it, and the
//! exchange (`exchange.rs`) drains the rest afterwards (up to [`DRAIN_LIMIT`]) for reuse.

use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use futures_lite::future::poll_fn;
use futures_lite::FutureExt;
use http::StatusCode;

use super::clock::{Activity, Clock, Deadline, Tick, Tracker};
use super::exchange::{respond, Progress, Records, Started};
pub(crate) use super::stream::Io;
use super::stream::{flush, release_out, Continue, ReadBuf, ReadState, Shared};
use crate::access;
use crate::error::{decode_status, Error, Phase};
use crate::h1::decode::{self, BodyDecoder, DecodeError, Head, HeadScanner, Limits};
use crate::h1::encode::{self, DATE_LEN};
use crate::handler::Handler;
use crate::listen::Peer;
use crate::metrics::{Metrics, Reject, Shard};
use crate::shutdown::{Latch, Slot};
use crate::upgrade::{Link, Serve, Tunnel, Upgraded};

/// Unread request body drained after a response so the connection can serve another request.
/// Past this the connection closes instead: reading a large upload nobody wants costs more
/// than a new connection (the same bound Go's net/http uses).
pub const DRAIN_LIMIT: u64 = 256 * 1024;

/// How long a closing connection keeps flushing and then reading (and discarding) before it
/// closes, so the client receives the last response instead of a reset caused by its unread
/// bytes (Go's net/http waits 500 ms for the same reason).
pub(crate) const LINGER: Duration = Duration::from_millis(500);

/// How much longer a request head still being read may take once the drain starts (at most
/// the header-read timeout's remainder): enough for a head already on its way, short enough
/// that one stalled client cannot hold a restart to its deadline. It then gets 408. A new
/// connection that has not sent its first byte yet gets the same grace (Go's net/http leaves
/// new connections 5 s): its client may be sending its first request right now, and closing
/// would answer that request with a reset.
pub(crate) const DRAIN_HEAD_GRACE: Duration = Duration::from_secs(1);

/// Bytes a lingering connection reads and discards at most.
const LINGER_BYTES: usize = 256 * 1024;

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
    /// See `Config::upgraded_idle_timeout`.
    pub(crate) upgraded_idle_timeout: Option<Duration>,
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
    peer: Option<Peer>,
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
        now: Tick::now(),
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
pub(super) enum Next {
    /// The handler accepted an upgrade and its head is written: run the protocol.
    Upgrade(Serve),
    /// Serve the next request, whose first bytes are already buffered (pipelined).
    Serve,
    /// Wait for the next request.
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
    /// The last time read from the clock. Reading it costs a few percent of a request, so
    /// phases that start without waiting reuse it.
    now: Tick,
}

/// A closed connection's write buffer goes back to its thread's pool (its read buffer does
/// too, see `ReadBuf`), so the next connection starts without the allocator.
impl<I: Io, H> Drop for Conn<I, H> {
    fn drop(&mut self) {
        self.out.clear();
        release_out(&mut self.out);
    }
}

impl<I: Io, H: Handler> Conn<I, H> {
    /// This connection's metrics shard.
    fn metrics(&self) -> &Shard {
        self.ctx.metrics.shard(self.place)
    }

    /// The client's address, for logs.
    fn peer(&self) -> String {
        self.tracker.peer_name()
    }

    /// The keep-alive loop.
    async fn run(&mut self) -> Result<(), Error> {
        // The first request's header-read deadline runs from accept, through the wait for its
        // first byte. (Locals held across awaits live in every idle task: keep them few.)
        self.deadline.set(self.now.after(self.ctx.settings.header_read_timeout));
        let mut first = true;
        loop {
            // 1. Wait for the next request's first byte: nothing of it is buffered (`busy`
            //    serves what is). (The clock was read when the last exchange ended.)
            let phase = if first { Phase::HeaderRead } else { Phase::Idle };
            if !first {
                self.deadline.set(self.now.after(self.ctx.settings.idle_timeout));
                self.tracker.enter(Activity::Idle, self.now);
            }
            match self.wait_for_request(first).await {
                Some(Ok(Wait::Readable)) => {}
                Some(Ok(Wait::Drain)) => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                None => return Err(self.timed_out(phase)),
            }
            if !first {
                self.now = Tick::now();
            }
            // 2 and 3: the requests that follow without a wait, in one box (one allocation per
            // busy spell, not per request): an idle connection's task then holds none of their
            // state (the head, the exchange, a head's error). Boxed as a block that calls
            // `busy` when first polled: the 1,000-byte future is then built in the box, where
            // `Box::pin(self.busy(first))` built it on the stack and copied all of it in (100
            // instructions a keep-alive request).
            let busy: Pin<Box<dyn Future<Output = Result<Next, Error>> + Send + '_>> = Box::pin({
                let this = &mut *self;
                async move { this.busy(first).await }
            });
            first = false;
            // Likewise the last phase: `Next` (which owns an upgrade's protocol) then never
            // lives in the task beside it (it cost idle tasks 88 bytes).
            let last: Pin<Box<dyn Future<Output = ()> + Send + '_>> = match busy.await? {
                // (`busy` serves what is buffered, so it never returns `Serve`.)
                Next::KeepAlive | Next::Serve => continue,
                Next::Close => return Ok(()),
                Next::Upgrade(serve) => Box::pin(self.upgraded(serve)),
                Next::Linger => Box::pin(self.linger()),
            };
            last.await;
            return Ok(());
        }
    }

    /// Serves requests until one has to wait for bytes of the next (`KeepAlive`: nothing of
    /// it is buffered) or the connection is done: each head under the header-read deadline
    /// while it waits for bytes (from its first byte; for the `first` request, from accept,
    /// as `run` set it), then its exchange under the write deadline, or the answer to a head
    /// that failed. Pipelined requests already buffered are served here in turn.
    ///
    /// The head lives in a box from the thread's pool, not in this future: the future then
    /// fits the allocator's per-thread cache (glibc's tcache takes up to 1,032 bytes), one
    /// box serves every pipelined head, and the box's store for head bytes (`HeadStore`)
    /// serves head after head without the allocator.
    async fn busy(&mut self, mut first: bool) -> Result<Next, Error> {
        let mut slot = HeadSlot::default();
        loop {
            let request = match self.read_head(&mut slot, std::mem::take(&mut first)).await {
                Ok(Some(request)) => request,
                Ok(None) => return Ok(Next::Close),
                Err(e) => return self.head_failed(e).await,
            };
            match self.exchange(slot.head(), request).await? {
                Next::Serve => {}
                next => return Ok(next),
            }
        }
    }

    /// Answers a head that could not be read; the connection then closes. A refused head gets
    /// its error status and the caller lingers; one that timed out part way gets 408 and
    /// lingers here (the result is the timeout, for the close's log line); a timeout before
    /// any byte, or a socket error, closes at once.
    async fn head_failed(&mut self, e: HeadError) -> Result<Next, Error> {
        match e {
            HeadError::Invalid(e) => {
                let status = self.reject(e);
                self.log_refused(status, None);
                Ok(Next::Linger)
            }
            HeadError::TimedOut { partial } => {
                let e = self.timed_out(Phase::HeaderRead);
                if partial {
                    self.metrics().response(408);
                    self.log_refused(408, Some(access::End::TimedOut(Phase::HeaderRead)));
                    let message = "the request head took longer than the server's header read timeout";
                    encode::encode_error(&mut self.out, StatusCode::REQUEST_TIMEOUT, message, &date(Tick::now()));
                    self.linger().await;
                }
                Err(e)
            }
            HeadError::Io(e) => Err(e.into()),
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
    /// deadline passes (`None`), or the drain starts; for the `first` request, the drain
    /// only shortens the deadline to [`DRAIN_HEAD_GRACE`].
    ///
    /// Readiness is only a hint: async-io reports a socket readable if an event arrived since
    /// the last wait, even when a read already took those bytes (a request body that arrived
    /// after its handler started waiting leaves such a stale event). So a wake-up reads, and
    /// one that finds nothing, or only empty lines (RFC 9112 §2.2), keeps waiting under the
    /// same deadline and the same drain signal: the connection is still between requests.
    async fn wait_for_request(&mut self, first: bool) -> Option<io::Result<Wait>> {
        debug_assert!(self.out.is_empty(), "waiting with unsent responses");
        // An idle connection holds no buffers.
        self.shared.lock().buf.release();
        release_out(&mut self.out);
        // Whether the drain has started (and only shortened a first request's deadline).
        let mut draining = false;
        if self.ctx.close_idle.is_set() {
            if !first {
                return Some(Ok(Wait::Drain));
            }
            draining = true;
            self.deadline.at_most(Tick::now() + DRAIN_HEAD_GRACE);
        }
        // One poll function for the three-way race: the smallest state an idle task can hold.
        let Conn { shared, deadline, drain, .. } = self;
        // After a read found nothing, that read's registration is what wakes the task: read
        // again rather than ask for readiness (one call per wake-up, not two).
        let mut read_next = false;
        loop {
            let waited = deadline.race_fn(|cx| {
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
                if draining {
                    return Poll::Pending;
                }
                drain.poll(cx).map(|()| Ok(Wait::Drain))
            });
            match waited.await {
                Some(Ok(Wait::Drain)) if first => {
                    draining = true;
                    deadline.at_most(Tick::now() + DRAIN_HEAD_GRACE);
                }
                other => return other,
            }
        }
    }

    /// Reads until a whole head parses, into `slot`, and starts its request on the read side
    /// (in the same lock): returns its number. `Ok(None)`: the client closed (or the head is
    /// incomplete at end of stream) and gets no answer.
    ///
    /// The header-read deadline (unless this is the connection's `first` head, whose deadline
    /// runs from accept) and the connections view's "reading head" start from the last clock
    /// reading when the head first has to wait for bytes: a head already whole (every
    /// pipelined one) goes straight to its exchange, whose write deadline replaces them.
    async fn read_head(&mut self, slot: &mut HeadSlot, first: bool) -> Result<Option<u64>, HeadError> {
        let limits = self.ctx.settings.limits;
        let mut scanner = HeadScanner::default();
        let mut waited = false;
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
                // A head that is already whole (the usual case, and every pipelined one) parses
                // at the first look, without the scanner; anything else (incomplete, or an
                // error) is left to the scanner, which answers the same whatever the splits.
                let head = slot.head();
                let whole = match scanner.is_fresh() {
                    true => decode::parse_head_into(st.buf.filled(), limits, head).ok().flatten(),
                    false => None,
                };
                let parsed = match whole {
                    Some(len) => Some(Ok(Some(len))),
                    None => scanner
                        .ready(st.buf.filled(), limits.max_head_bytes)
                        .map(|n| decode::parse_head_into(&st.buf.filled()[..n], limits, head)),
                };
                if let Some(parsed) = parsed {
                    match parsed {
                        Ok(Some(len)) => {
                            st.buf.consume(len);
                            return Ok(Some(st.start_request(head)));
                        }
                        Ok(None) => {}
                        Err(e) => return Err(HeadError::Invalid(e)),
                    }
                }
                if st.eof {
                    return Ok(None);
                }
            }
            if !std::mem::replace(&mut waited, true) {
                if !first {
                    self.deadline.set(self.now.after(self.ctx.settings.header_read_timeout));
                }
                self.tracker.enter(Activity::ReadingHead, self.now);
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
                Some(Some(Ok(_))) => self.now = Tick::now(),
                Some(Some(Err(e))) => return Err(HeadError::Io(e)),
                Some(None) => {
                    draining = true;
                    deadline.at_most(Tick::now() + DRAIN_HEAD_GRACE);
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

    /// Runs one exchange (body, handler, response) for `head`, request number `request` on
    /// the read side, under the write deadline, catching panics. (The head is borrowed, not
    /// moved in: the futures that serve it then capture a reference; moving them was 12% of a
    /// pipelined request.)
    async fn exchange(&mut self, head: &mut Head, request: u64) -> Result<Next, Error> {
        let started = self.now;
        let ctx = &*self.ctx;
        let metrics = ctx.metrics.shard(self.place);
        metrics.request_started();
        self.deadline.set(started.after(ctx.settings.write_timeout));
        self.tracker.enter(Activity::InHandler, started);
        self.tracker.count_request();
        // Built only when the access log is on; written when the exchange ends (with
        // `end=cut` if this future is dropped first).
        let entry = match ctx.settings.access_log {
            true => Some(access::Entry::new(self.tracker.peer(), &head.method, &head.uri, head.version, started)),
            false => None,
        };
        let mut progress = Progress::default();
        let Conn { shared, deadline, out, tracker, .. } = self;
        let records = Records { metrics, tracker };
        let outcome = {
            // Pinned where it is made and polled through a reference: no wrapper moves it.
            let which = Started { request, at: started };
            let mut work = pin!(respond(shared, out, ctx, &records, head, which, &mut progress));
            deadline
                .race_fn(|cx| match std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
                    Ok(Poll::Ready(result)) => Poll::Ready(Ok(result)),
                    Ok(Poll::Pending) => Poll::Pending,
                    Err(panic) => Poll::Ready(Err(panic)),
                })
                .await
        };
        self.now = Tick::now();
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
                    metrics.request_finished(progress.status, self.now.since(started));
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
        metrics.request_finished(progress.status, self.now.since(started));
        if let Some(entry) = entry {
            entry.finish(progress.status, progress.sent, end);
        }
        result
    }

    /// Runs an accepted upgrade's protocol on this task until it ends and its stream is
    /// dropped, or the upgraded idle timeout passes with nothing read or written. However it
    /// ends (cut at the shutdown deadline too: this future is dropped), the socket is shut down
    /// so a stream moved elsewhere sees the end.
    async fn upgraded(&mut self, serve: Serve) {
        /// Counts the close and shuts the socket down, on every way out.
        struct Closing<'a, I: Io>(&'a Shared<I>, &'a Shard);
        impl<I: Io> Drop for Closing<'_, I> {
            fn drop(&mut self) {
                self.0.io.shutdown();
                self.1.upgraded_closed();
            }
        }
        let idle = self.ctx.settings.upgraded_idle_timeout;
        let now = Tick::now();
        let peer = self.peer();
        log::debug!("{peer}: upgraded");
        self.deadline.set(now.after(idle));
        self.tracker.enter(Activity::Upgraded, now);
        let Conn { shared, ctx, place, deadline, .. } = self;
        let metrics = ctx.metrics.shard(*place);
        metrics.upgraded();
        let _closing = Closing(shared, metrics);
        let link = Arc::new(Link::new(now, idle.is_some()));
        let stream = Upgraded::new(shared.clone() as Arc<dyn Tunnel>, link.clone(), ctx.close_idle.clone());
        let dropped = link.dropped();
        let who = peer.clone();
        let protocol = async move {
            if AssertUnwindSafe(async move { serve(stream).await }).catch_unwind().await.is_err() {
                log::error!("{peer}: the upgraded protocol panicked; its connection is closed");
            }
            // A stream moved to another task keeps the connection open (and counted).
            dropped.await;
        };
        let mut protocol = pin!(protocol);
        while deadline.race(protocol.as_mut()).await.is_none() {
            // The deadline passed: unless something moved since it was set, the peer is gone.
            let next = link.last_active().after(idle);
            if next.is_some_and(|next| next > Tick::now()) {
                deadline.set(next);
                continue;
            }
            metrics.timed_out(Phase::Upgraded);
            log::debug!("{who}: {}", Error::TimedOut(Phase::Upgraded));
            break;
        }
    }

    /// Flushes what is left, stops sending, and reads (discarding) until the client closes,
    /// the linger time passes or [`LINGER_BYTES`] arrive; then the connection closes.
    async fn linger(&mut self) {
        let now = Tick::now();
        self.deadline.set(now.after(self.ctx.settings.linger));
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

/// The head a busy spell serves, boxed: a box from this thread's pool while the spell lasts,
/// given back (emptied, its store kept) when it ends.
#[derive(Default)]
struct HeadSlot(Option<Box<Head>>);

/// Head boxes kept per thread for reuse, at most.
const POOL_HEADS: usize = 64;

thread_local! {
    /// Empty head boxes, free for the next busy spell on this thread. (Boxes, not heads: a
    /// slot takes one and gives it back without moving the head.)
    #[allow(clippy::vec_box)]
    static HEADS: std::cell::RefCell<Vec<Box<Head>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl HeadSlot {
    /// The head to parse into: the box already held, one from the pool, or a new one.
    fn head(&mut self) -> &mut Head {
        self.0.get_or_insert_with(|| {
            HEADS.try_with(|pool| pool.borrow_mut().pop()).ok().flatten().unwrap_or_else(|| Box::new(Head::empty()))
        })
    }
}

impl Drop for HeadSlot {
    fn drop(&mut self) {
        if let Some(mut slot) = self.0.take() {
            // Emptied now: a pooled box holds no request (only storage for the next head's
            // bytes, see `HeadStore`).
            slot.clear();
            let _ = HEADS.try_with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < POOL_HEADS {
                    pool.push(slot);
                }
            });
        }
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

/// The `Date` value for `now`, formatted at most once a second per thread. The cache is keyed
/// on the monotonic clock the connection already read, so a cached date costs no clock read.
pub(super) fn date(now: Tick) -> [u8; DATE_LEN] {
    thread_local! {
        /// The instant the cached second ends (tick 0 until the first date), and its date.
        static CACHE: (std::cell::Cell<Tick>, std::cell::Cell<[u8; DATE_LEN]>) =
            const { (std::cell::Cell::new(Tick::from_nanos(0)), std::cell::Cell::new([0; DATE_LEN])) };
    }
    CACHE.with(|(until, text)| {
        if now < until.get() {
            return text.get();
        }
        let wall = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let date = encode::encode_date(wall.as_secs());
        until.set(now + Duration::from_nanos(1_000_000_000 - u64::from(wall.subsec_nanos())));
        text.set(date);
        date
    })
}

/// The message of a caught panic.
pub(super) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}
