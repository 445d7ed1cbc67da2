//! Entry points for the fuzzers in `fuzz/` and for replaying their corpora in `cargo test`.
//! Not part of the API: no stability promise.
//!
//! Everything here drives the real code: the codec as the connection uses it, and the whole
//! connection loop over an in-memory pipe with scripted reads and writes.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Wake, Waker};

use http::{Method, Request, Response};

use crate::body::Body;
pub use crate::h1::decode::{
    leading_empty_lines, parse_head, parse_head_into, BodyDecoder, BodyLength, DecodeError, Decoded, Head, HeadScanner,
    Limits,
};
use crate::metrics::Metrics;
use crate::server::conn::{self, Context, Io, Settings};
use crate::shutdown::Latch;

/// Parses a head arriving in pieces, the way the connection does: leading empty lines
/// dropped, parsed only when the scanner says so, every attempt into the same head. Returns
/// the answer once all of `input` has arrived, and the number of bytes consumed (empty lines
/// included).
pub fn head_in_pieces(
    input: &[u8],
    pieces: &[usize],
    limits: Limits,
) -> (Result<Option<(Head, usize)>, DecodeError>, usize) {
    let mut start = 0;
    let mut end = 0;
    let mut scanner = HeadScanner::default();
    let mut sizes = pieces.iter().copied().filter(|&n| n > 0).cycle();
    let mut head = Head::empty();
    loop {
        let step = sizes.next().unwrap_or(input.len().max(1));
        end = (end + step).min(input.len());
        let skip = leading_empty_lines(&input[start..end]);
        start += skip;
        if skip > 0 {
            scanner = HeadScanner::default();
        }
        let buf = &input[start..end];
        if let Some(n) = scanner.ready(buf, limits.max_head_bytes) {
            match parse_head_into(&buf[..n], limits, &mut head) {
                Ok(Some(len)) => return (Ok(Some((head, len))), start + len),
                Ok(None) => {}
                Err(e) => return (Err(e), start),
            }
        }
        if end == input.len() {
            return (Ok(None), start);
        }
    }
}

/// What a connection did with its input.
#[derive(Debug, Default)]
pub struct Exchange {
    /// Requests the handler saw, in order: method and target.
    pub served: Vec<(Method, String)>,
    /// Everything the server wrote.
    pub output: Vec<u8>,
    /// Whether the connection loop finished within the poll budget.
    pub finished: bool,
    /// Polls used.
    pub polls: usize,
}

/// A script for the in-memory pipe.
#[derive(Debug, Clone)]
pub struct Script {
    /// The bytes the client sends, in the pieces each read returns.
    pub reads: Vec<Vec<u8>>,
    /// Every nth read or readiness check returns `Pending` first (0: never).
    pub pending_every: usize,
    /// Most bytes one write accepts (short writes).
    pub write_limit: usize,
    /// Head limits.
    pub limits: Limits,
}

/// Runs the connection loop over `script` with a handler that records each request and
/// streams its body back; at most `max_polls` polls.
pub fn connection(script: Script, max_polls: usize) -> Exchange {
    let served = Arc::new(Mutex::new(Vec::new()));
    let seen = served.clone();
    let handler = move |req: Request<Body>| {
        seen.lock().unwrap().push((req.method().clone(), req.uri().to_string()));
        async move { Response::new(req.into_body()) }
    };
    let ctx = Context {
        handler,
        settings: Settings {
            limits: script.limits,
            header_read_timeout: None,
            write_timeout: None,
            idle_timeout: None,
            upgraded_idle_timeout: None,
            max_body_bytes: u64::MAX,
            linger: None,
            watch_peer: true,
            listed: false,
            access_log: false,
        },
        close_responses: Latch::default(),
        close_idle: Latch::default(),
        metrics: Arc::new(Metrics::default()),
        clock: Default::default(),
    };
    let pipe = Pipe {
        reads: Mutex::new(script.reads.into_iter().filter(|r| !r.is_empty()).collect()),
        pending_every: script.pending_every,
        calls: AtomicUsize::new(0),
        write_limit: script.write_limit.max(1),
        output: Arc::new(Mutex::new(Vec::new())),
        write_closed: AtomicBool::new(false),
    };
    let output = pipe.output.clone();
    let waker = Waker::from(Arc::new(Noop));
    let mut cx = TaskContext::from_waker(&waker);
    let mut future = Box::pin(conn::serve(pipe, None, Arc::new(ctx), 0, ()));
    let mut exchange = Exchange::default();
    while exchange.polls < max_polls {
        exchange.polls += 1;
        if future.as_mut().poll(&mut cx).is_ready() {
            exchange.finished = true;
            break;
        }
    }
    drop(future);
    exchange.served = std::mem::take(&mut *served.lock().unwrap());
    exchange.output = std::mem::take(&mut *output.lock().unwrap());
    exchange
}

/// A waker that does nothing: the driver polls in a loop.
struct Noop;

impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

/// An in-memory connection: scripted reads (then end of stream), short writes.
struct Pipe {
    /// What reads return, in order.
    reads: Mutex<VecDeque<Vec<u8>>>,
    /// See [`Script::pending_every`].
    pending_every: usize,
    /// Read and readiness calls so far.
    calls: AtomicUsize,
    /// See [`Script::write_limit`].
    write_limit: usize,
    /// What the server wrote.
    output: Arc<Mutex<Vec<u8>>>,
    /// The server shut its sending side.
    write_closed: AtomicBool,
}

impl Pipe {
    /// Whether this call returns `Pending` (with a wake-up, as a socket would).
    fn stall(&self, cx: &mut TaskContext<'_>) -> bool {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let stall = self.pending_every > 0 && n.is_multiple_of(self.pending_every);
        if stall {
            cx.waker().wake_by_ref();
        }
        stall
    }
}

impl Io for Pipe {
    fn poll_read(&self, cx: &mut TaskContext<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if self.stall(cx) {
            return Poll::Pending;
        }
        let mut reads = self.reads.lock().unwrap();
        let Some(front) = reads.front_mut() else { return Poll::Ready(Ok(0)) };
        let n = front.len().min(buf.len());
        buf[..n].copy_from_slice(&front[..n]);
        front.drain(..n);
        if front.is_empty() {
            reads.pop_front();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_readable(&self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        if self.stall(cx) {
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_vectored(&self, _cx: &mut TaskContext<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if self.write_closed.load(Ordering::Relaxed) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let mut output = self.output.lock().unwrap();
        let mut budget = self.write_limit;
        let mut written = 0;
        for buf in bufs {
            let n = buf.len().min(budget);
            output.extend_from_slice(&buf[..n]);
            written += n;
            budget -= n;
            if budget == 0 {
                break;
            }
        }
        Poll::Ready(Ok(written))
    }

    fn shutdown_write(&self) {
        self.write_closed.store(true, Ordering::Relaxed);
    }

    fn shutdown(&self) {
        self.write_closed.store(true, Ordering::Relaxed);
        self.reads.lock().unwrap().clear();
    }
}
