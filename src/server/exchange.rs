//! One exchange: the request handed to the handler, the response framed and written, what the
//! handler left of the request body drained. Runs under the connection's write deadline
//! (`conn.rs` races it); holds no clock of its own.

use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use futures_lite::future::{poll_fn, poll_once};
use futures_lite::FutureExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};

use super::clock::{Activity, Tick, Tracker};
use super::conn::{date, Context, Next, PeerGone, DRAIN_LIMIT};
use super::stream::{flush, write_all, Continue, Io, Shared, OUT_POOL};
use crate::body::{Body, Incoming};
use crate::error::Error;
use crate::h1::decode::{self, BodyLength, Head};
use crate::h1::encode::{self, Connection, ResponseHead, CONTINUE, CRLF, LAST_CHUNK};
use crate::handler::Handler;
use crate::metrics::{Reject, Shard};
use crate::upgrade::{Accepted, Offer, Serve};

/// Response bytes held back while pipelined requests are waiting, before a flush is forced.
const FLUSH_AT: usize = 64 * 1024;

/// Response bodies up to this size are copied next to the head (one write); larger ones are
/// written from their own memory with a vectored write.
const INLINE_BODY: usize = 16 * 1024;

/// Bytes read per chunk of a streamed response body.
const STREAM_CHUNK: usize = 16 * 1024;

/// What an exchange left behind when it ended, even if cut short.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Whether any of the response head went into the output buffer.
    pub(super) head_written: bool,
    /// The status sent, for metrics.
    pub(super) status: Option<u16>,
    /// Response body bytes written, for the access log.
    pub(super) sent: u64,
    /// Whether the exchange shows in the connections view (to clear it after).
    pub(super) shown: bool,
}

/// Where an exchange records what happens: its connection's metrics shard and tracker.
pub(super) struct Records<'a> {
    /// The metrics shard.
    pub(super) metrics: &'a Shard,
    /// The connections view's slot.
    pub(super) tracker: &'a Tracker,
}

/// Which request an exchange serves, and when it started.
#[derive(Debug, Clone, Copy)]
pub(super) struct Started {
    /// Its number on the connection's read side (`ReadState::start_request`).
    pub(super) request: u64,
    /// When its head was read: its `Date`, deadline and duration count from here.
    pub(super) at: Tick,
}

/// One exchange: hand the request to the handler, decide the framing, write the response, and
/// drain what the handler left of the request body. Every await here is under the write
/// deadline, and the whole future is dropped if it passes.
pub(super) async fn respond<I: Io, H: Handler>(
    shared: &Arc<Shared<I>>,
    out: &mut Vec<u8>,
    ctx: &Context<H>,
    records: &Records<'_>,
    head: &mut Head,
    started: Started,
    progress: &mut Progress,
) -> Result<Next, Error> {
    let Started { request, at: now } = started;
    let Head { version, keep_alive, expect_continue, upgrade, .. } = *head;
    let is_head = head.method == Method::HEAD;
    let is_connect = head.method == Method::CONNECT;
    let gone = ctx.settings.watch_peer.then(PeerGone::default);

    // 1. The handler. The body's 100 Continue is written by the body itself, so nothing else
    //    may be waiting in `out` then; otherwise pipelined responses leave as soon as the
    //    handler has to wait.
    if expect_continue {
        flush(&shared.io, out).await?;
    }
    // The target, for the connections view if the handler has to wait (the request takes
    // the head's URI).
    let target = head.uri.path_and_query().cloned();

    // The handler's future ends with this block: it never lives beside the response's writes.
    let (mut parts, mut body) = {
        // The request is built in the call's argument: it is never copied on its way in, and
        // never lives in this future beside the handler's.
        let mut handler = pin!(ctx.handler.call(build_request(shared, ctx, head, request, gone.as_ref())));
        // Polled once here; a response that is ready is split where it is taken (through
        // `poll_once` it was moved twice more).
        match poll_fn(|cx| Poll::Ready(handler.as_mut().poll(cx).map(Response::into_parts))).await {
            Poll::Ready(parts) => parts,
            Poll::Pending => {
                let target = target.as_ref().map_or("", |p| p.as_str());
                records.tracker.show(Some(format!("{} {target}", head.method)));
                progress.shown = true;
                flush(&shared.io, out).await?;
                match &gone {
                    Some(gone) => handler.or(watch_peer(shared, gone)).await,
                    None => handler.await,
                }
                .into_parts()
            }
        }
    };

    // 2. Protocol switches (RFC 9110 §7.8, §9.3.6): only offered ones, only through
    //    `upgrade::OnUpgrade::accept`.
    let serve = parts.extensions.get::<Accepted>().and_then(Accepted::take).filter(|_| upgrade);
    let switching =
        if is_connect { parts.status.is_success() } else { parts.status == StatusCode::SWITCHING_PROTOCOLS };
    match (serve, switching) {
        (Some(serve), true) => return Box::pin(switch(shared, out, records, progress, &parts, serve, now)).await,
        (Some(_), false) => log::warn!(
            "{}: the handler changed the status of an accepted upgrade to {}; the connection stays HTTP/1.1",
            records.tracker.peer_name(),
            parts.status
        ),
        (None, true) if is_connect => {
            // A 2xx to CONNECT would turn the connection into a tunnel (§9.3.6).
            parts.status = StatusCode::METHOD_NOT_ALLOWED;
            parts.headers.clear();
            parts
                .headers
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"));
            parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            body = Body::from("CONNECT is not served here\n");
        }
        (None, true) => {
            log::error!(
                "{}: the handler answered 101 without upgrade::OnUpgrade::accept; answering 500 (no protocol would \
                 run on the connection)",
                records.tracker.peer_name()
            );
            let e = Error::NotUpgradable("a 101 response must come from upgrade::OnUpgrade::accept");
            return Ok(refuse(records.metrics, out, progress, e, now));
        }
        (None, false) => {}
    }

    // 3. Framing (RFC 9112 §6.1-6.3) and persistence (§9.3).
    let status = parts.status;
    let Fields { declared, asks_close, has_date } = framing_fields(&parts.headers);
    let mut close = !keep_alive || asks_close || status.is_informational();
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

    // 4. A streamed body's first bytes are read before the head is written, so a body that
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
    // Whether the request body is done and the next request already here, as step 5 saw it.
    let seen = {
        let mut st = shared.lock();
        // 5. A request body with broken framing leaves the connection unusable: answer 400
        //    whatever the handler said (it saw the error reading the body).
        if let Some(why) = st.error {
            drop(st);
            return Ok(refuse(records.metrics, out, progress, Error::BadRequest(why), now));
        }
        let (body_done, next_here) = st.look_ahead();
        if ctx.close_responses.is_set() && !next_here {
            // Shutting down: this is the last response, unless more requests are already here.
            close = true;
        }
        if !body_done {
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
        (body_done, next_here)
    };
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
            date: (!has_date).then_some(&date),
        },
    );
    progress.head_written = true;
    progress.status = Some(status.as_u16());
    records.tracker.enter(Activity::Writing, now);

    // 6. The body.
    match full {
        Some(bytes) if bytes.len() <= INLINE_BODY => {
            out.extend_from_slice(&bytes);
            progress.sent = bytes.len() as u64;
        }
        Some(bytes) => {
            // Boxed: its state would otherwise make every exchange's future larger.
            Box::pin(write_all(&shared.io, out, &bytes)).await?;
            progress.sent = bytes.len() as u64;
        }
        None if send_body => {
            let framing = match content_length {
                Some(n) => Framing::Length(n),
                None if chunked => Framing::Chunked,
                None => Framing::Close,
            };
            let complete =
                Box::pin(write_stream(&shared.io, out, &mut body, &mut chunk, first, framing, &mut progress.sent))
                    .await?;
            close |= !complete;
        }
        None => {}
    }
    drop(body);

    // 7. Whether the request body is done and the next request already here; if the handler
    //    left some of the body, drain it so the connection can be reused (most requests
    //    have no body, or the handler read it: no future to poll then). A body that was done
    //    at step 5 leaves the read side as step 5 saw it (only a body reads the socket while
    //    a response is written); one that was not may have been read since (a response
    //    streaming it back), so it is looked at again.
    let look = || shared.lock().look_ahead();
    let (mut body_done, mut buffered) = if seen.0 { seen } else { look() };
    if !close && !body_done {
        match drain_body(shared).await {
            Ok(true) => (body_done, buffered) = look(),
            _ => close = true,
        }
    }

    // 8. Flush, unless the next pipelined request is already here and little is waiting.
    if close || !(body_done && buffered) || out.len() >= FLUSH_AT {
        flush(&shared.io, out).await?;
    }
    Ok(match close {
        false if body_done && buffered => Next::Serve,
        false => Next::KeepAlive,
        // The client has nothing more to send: no need to linger.
        true if body_done && !buffered => Next::Close,
        true => Next::Linger,
    })
}

/// The request handed to the handler: the head's fields (the method cloned, the rest moved
/// out: the head is left holding empty defaults), and a body reading from the connection
/// for request number `request`.
#[inline(always)]
fn build_request<I: Io, H: Handler>(
    shared: &Arc<Shared<I>>,
    ctx: &Context<H>,
    head: &mut Head,
    request: u64,
    gone: Option<&PeerGone>,
) -> Request<Body> {
    let remaining = match head.body {
        BodyLength::Length(0) => None,
        BodyLength::Length(n) => Some(Some(n)),
        BodyLength::Chunked => Some(None),
    };
    let body = match remaining {
        None => Body::empty(),
        Some(remaining) => {
            Body::incoming(Incoming { source: shared.clone(), request, remaining }, ctx.settings.max_body_bytes)
        }
    };
    // The target and fields are swapped, not assigned (the next head is parsed over the
    // request's empty defaults).
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.version_mut() = head.version;
    head.hand_over(&mut req);
    if let Some(gone) = gone {
        req.extensions_mut().insert(gone.clone());
    }
    if head.upgrade {
        req.extensions_mut().insert(Offer);
    }
    req
}

/// Writes the head of an accepted upgrade (all of it, with any pipelined responses before it)
/// and hands the protocol to the connection; a request body not read to its end gets 500.
async fn switch<I: Io>(
    shared: &Shared<I>,
    out: &mut Vec<u8>,
    records: &Records<'_>,
    progress: &mut Progress,
    parts: &http::response::Parts,
    serve: Serve,
    now: Tick,
) -> Result<Next, Error> {
    if !shared.lock().body.is_done() {
        log::error!(
            "{}: the handler accepted an upgrade before reading the request body to its end; answering 500",
            records.tracker.peer_name()
        );
        let e = Error::NotUpgradable("the handler accepted the upgrade before reading the whole request body");
        return Ok(refuse(records.metrics, out, progress, e, now));
    }
    let connect = parts.status != StatusCode::SWITCHING_PROTOCOLS;
    let date = date(now);
    encode::encode_head(
        out,
        &ResponseHead {
            status: parts.status,
            headers: &parts.headers,
            // §9.3.6: no Content-Length or Transfer-Encoding in a 2xx to CONNECT.
            content_length: None,
            chunked: false,
            connection: if connect { Connection::Default } else { Connection::Upgrade },
            date: (!parts.headers.contains_key(header::DATE)).then_some(&date),
        },
    );
    progress.head_written = true;
    progress.status = Some(parts.status.as_u16());
    flush(&shared.io, out).await?;
    Ok(Next::Upgrade(serve))
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

/// What the handler's fields say about framing and the head: see [`framing_fields`].
struct Fields {
    /// Its `Content-Length`, if it set a valid one (the first such field counts).
    declared: Option<u64>,
    /// Whether a `Connection` field says `close`.
    asks_close: bool,
    /// Whether it set its own `Date`.
    has_date: bool,
}

/// Reads what the handler's fields say about framing and the head, in one pass over them
/// (three hashed lookups cost more), and none when there are no fields.
fn framing_fields(headers: &HeaderMap) -> Fields {
    let mut fields = Fields { declared: None, asks_close: false, has_date: false };
    if headers.is_empty() {
        return fields;
    }
    let mut length_seen = false;
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH && !length_seen {
            length_seen = true;
            fields.declared = value.to_str().ok().and_then(|v| v.trim().parse().ok());
        } else if name == header::CONNECTION {
            fields.asks_close |= decode::lists(value.as_bytes(), b"close");
        } else if name == header::DATE {
            fields.has_date = true;
        }
    }
    fields
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
    // A request body streamed back fails because of its client; any other body, its source.
    let request_body = body.incoming_request().is_some();
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
                let read = match poll_once(read.as_mut()).await {
                    Some(read) => read,
                    None => {
                        flush(io, out).await?;
                        read.await
                    }
                };
                match read {
                    Ok(n) => n,
                    Err(e) => {
                        if !request_body {
                            log::error!("response body failed after its head: {e}; the response is cut short");
                        }
                        // Cut short: what is encoded still goes out (the pipelined responses
                        // before this one, whole; this one's head), then the connection closes.
                        flush(io, out).await?;
                        return Err(e);
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
fn refuse(metrics: &Shard, out: &mut Vec<u8>, progress: &mut Progress, e: Error, now: Tick) -> Next {
    let status = if matches!(e, Error::BadRequest(_)) {
        metrics.rejected(Reject::BadRequest);
        StatusCode::BAD_REQUEST
    } else {
        if !matches!(e, Error::NotUpgradable(_)) {
            log::error!("response body failed before it was sent: {e}; answering 500");
        }
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
