//! The floor: a bare async-io server that answers every request head with canned bytes, with
//! no parsing, no timeouts, no drain and no metrics. Whatever servicegroup or hyper cost
//! beyond it is their own code; what it costs is what async-io and the kernel allow.
//!
//! Each connection reads up to 8 KiB, counts the heads that ended in it (`\r\n\r\n`, also
//! across reads) and answers them all with one write, so pipelined requests cost one write per
//! read. A head asking for `Connection: close` is answered and the connection shut.
//!
//! Environment: `PORT` (default 3000), `THREADS` (default 2), `MODE`, `TYPES`: one accept loop, connections
//! placed in turn on `THREADS` threads, each running its own executor (no task moves between
//! threads: servicegroup's own-threads model, without its bookkeeping). With `MODE=shared`,
//! one executor run by `THREADS` threads instead (a wake-up lands on the thread that took the
//! I/O event and idle threads steal): the model of servicegroup on the caller's executor, and
//! close to tokio's.
//!
//! With `TYPES=http`, each head also goes through what any server that hands its handler an
//! `http::Request` must do: httparse parses it, the request is built (method, target, version,
//! a `HeaderMap` whose values share one copy of the head, that copy amortised as servicegroup
//! and hyper amortise theirs), a handler takes it, drops it and returns a `Response`, which is
//! dropped. The answer is still canned bytes: this is the floor of such a server.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use bytes::BytesMut;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::Async;

/// One response, as both other servers send it (status, length, date, body).
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: Thu, 03 Dec 2026 12:00:00 GMT\r\n\r\nhello";

/// The same, closing.
const CLOSING: &[u8] =
    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\ndate: Thu, 03 Dec 2026 12:00:00 GMT\r\n\r\nhello";

/// The handler of `TYPES=http`: takes the request and answers; kept out of line so the
/// request is really built and handed over.
#[inline(never)]
fn handler(request: Request<()>) -> Response<&'static str> {
    std::hint::black_box(&request);
    Response::new("hello")
}

/// `TYPES=http`: parses each whole head at the start of `pending` into an `http::Request`,
/// hands it to [`handler`], and drops the response. Returns how many heads it took (the
/// bytes they used are removed); a malformed head ends the connection.
fn through_http_types(pending: &mut Vec<u8>, store: &mut BytesMut) -> std::io::Result<usize> {
    let mut used = 0;
    let mut heads = 0;
    loop {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut slots);
        let buf = &pending[used..];
        let len = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => break,
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        };
        if store.capacity() < len {
            store.reserve(len.max(1024));
        }
        store.extend_from_slice(&buf[..len]);
        let shared = store.split().freeze();
        let slice = |part: &[u8]| {
            let start = part.as_ptr() as usize - buf.as_ptr() as usize;
            shared.slice(start..start + part.len())
        };
        let mut request = Request::new(());
        *request.method_mut() = Method::from_bytes(parsed.method.unwrap_or("").as_bytes()).map_err(bad)?;
        *request.uri_mut() = Uri::from_maybe_shared(slice(parsed.path.unwrap_or("").as_bytes())).map_err(bad)?;
        *request.version_mut() = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        let headers = request.headers_mut();
        headers.reserve(parsed.headers.len());
        for field in parsed.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(bad)?;
            let value = HeaderValue::from_maybe_shared(slice(field.value)).map_err(bad)?;
            headers.append(name, value);
        }
        drop(std::hint::black_box(handler(request)));
        used += len;
        heads += 1;
    }
    pending.drain(..used);
    Ok(heads)
}

/// The error that ends a connection whose head is malformed.
fn bad<E>(_: E) -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::InvalidData)
}

/// Serves one connection until the client closes or asks to.
async fn serve(mut stream: Async<TcpStream>, types: bool) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8 * 1024];
    let mut out = Vec::with_capacity(16 * RESPONSE.len());
    // How many bytes of "\r\n\r\n" the previous read ended with.
    let mut matched = 0u8;
    // `TYPES=http`: bytes of a head not yet whole, and the copies heads are shared from.
    let (mut pending, mut store) = (Vec::new(), BytesMut::new());
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let mut close = false;
        let heads = if types {
            pending.extend_from_slice(&buf[..n]);
            through_http_types(&mut pending, &mut store)?
        } else {
            count_heads(&buf[..n], &mut matched)
        };
        for _ in 0..heads {
            out.extend_from_slice(RESPONSE);
        }
        if memfind(&buf[..n], b"onnection: close") && out.len() >= RESPONSE.len() {
            // The request asking to close is the last this connection answers.
            close = true;
            out.truncate(out.len() - RESPONSE.len());
            out.extend_from_slice(CLOSING);
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if close {
            let _ = stream.get_ref().shutdown(std::net::Shutdown::Write);
            // Read what is left until the client closes, as a server must before closing.
            while stream.read(&mut buf).await? > 0 {}
            return Ok(());
        }
    }
}

/// How many heads end in `bytes` (`\r\n\r\n`), with `matched` the bytes of that ending the
/// previous read ended with (updated).
fn count_heads(bytes: &[u8], matched: &mut u8) -> usize {
    let mut heads = 0;
    for &byte in bytes {
        *matched = match (*matched, byte) {
            (0 | 2, b'\r') => *matched + 1,
            (1 | 3, b'\n') => *matched + 1,
            (_, b'\r') => 1,
            _ => 0,
        };
        if *matched == 4 {
            *matched = 0;
            heads += 1;
        }
    }
    heads
}

/// Whether `needle` occurs in `hay`.
fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn main() {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3000);
    let threads: usize = std::env::var("THREADS").ok().and_then(|p| p.parse().ok()).unwrap_or(2);
    let shared = std::env::var("MODE").is_ok_and(|mode| mode == "shared");
    let types = std::env::var("TYPES").is_ok_and(|types| types == "http");
    let executors: Vec<Arc<smol::Executor<'static>>> =
        (0..if shared { 1 } else { threads.max(1) }).map(|_| Arc::new(smol::Executor::new())).collect();
    // On one thread, the accept loop shares the connections' executor on the main thread: one
    // thread polls the reactor, so instruction counts under callgrind repeat from run to run.
    let single = threads <= 1;
    for i in 0..threads.max(1) * usize::from(!single) {
        let run = executors[i % executors.len()].clone();
        std::thread::spawn(move || smol::block_on(run.run(smol::future::pending::<()>())));
    }
    let listener = Async::new(TcpListener::bind(("127.0.0.1", port)).unwrap()).unwrap();
    eprintln!("floor_server listening on 127.0.0.1:{port}");
    let accept = async {
        for turn in 0.. {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.get_ref().set_nodelay(true);
            executors[turn % executors.len()].spawn(serve(stream, types)).detach();
        }
    };
    match single {
        true => smol::block_on(executors[0].run(accept)),
        false => smol::block_on(accept),
    }
}
