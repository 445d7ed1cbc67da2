//! The floor: a bare async-io server that answers every request head with canned bytes, with
//! no parsing, no timeouts, no drain and no metrics. Whatever servicegroup or hyper cost
//! beyond it is their own code; what it costs is what async-io and the kernel allow.
//!
//! Each connection reads up to 8 KiB, counts the heads that ended in it (`\r\n\r\n`, also
//! across reads) and answers them all with one write, so pipelined requests cost one write per
//! read. A head asking for `Connection: close` is answered and the connection shut.
//!
//! Environment: `PORT` (default 3000), `THREADS` (default 2): one accept loop, connections
//! placed in turn on `THREADS` threads, each running its own executor (no task moves between
//! threads: servicegroup's own-threads model, without its bookkeeping). With `MODE=shared`,
//! one executor run by `THREADS` threads instead (a wake-up lands on the thread that took the
//! I/O event and idle threads steal): the model of servicegroup on the caller's executor, and
//! close to tokio's.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::Async;

/// One response, as both other servers send it (status, length, date, body).
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: Thu, 03 Dec 2026 12:00:00 GMT\r\n\r\nhello";

/// The same, closing.
const CLOSING: &[u8] =
    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\ndate: Thu, 03 Dec 2026 12:00:00 GMT\r\n\r\nhello";

/// Serves one connection until the client closes or asks to.
async fn serve(mut stream: Async<TcpStream>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8 * 1024];
    let mut out = Vec::with_capacity(16 * RESPONSE.len());
    // How many bytes of "\r\n\r\n" the previous read ended with.
    let mut matched = 0;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let mut close = false;
        for &byte in &buf[..n] {
            matched = match (matched, byte) {
                (0 | 2, b'\r') => matched + 1,
                (1 | 3, b'\n') => matched + 1,
                (_, b'\r') => 1,
                _ => 0,
            };
            if matched == 4 {
                matched = 0;
                out.extend_from_slice(RESPONSE);
            }
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

/// Whether `needle` occurs in `hay`.
fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn main() {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3000);
    let threads: usize = std::env::var("THREADS").ok().and_then(|p| p.parse().ok()).unwrap_or(2);
    let shared = std::env::var("MODE").is_ok_and(|mode| mode == "shared");
    let executors: Vec<Arc<smol::Executor<'static>>> =
        (0..if shared { 1 } else { threads.max(1) }).map(|_| Arc::new(smol::Executor::new())).collect();
    for i in 0..threads.max(1) {
        let run = executors[i % executors.len()].clone();
        std::thread::spawn(move || smol::block_on(run.run(smol::future::pending::<()>())));
    }
    let listener = Async::new(TcpListener::bind(("127.0.0.1", port)).unwrap()).unwrap();
    eprintln!("floor_server listening on 127.0.0.1:{port}");
    smol::block_on(async {
        for turn in 0.. {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.get_ref().set_nodelay(true);
            executors[turn % executors.len()].spawn(serve(stream)).detach();
        }
    });
}
