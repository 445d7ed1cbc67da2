//! The drain never waits on a connection that is not serving a request: keep-alive
//! connections in any state between requests close at once, a half-read head and a new
//! connection yet to send its first byte get a short grace, and a drain with nothing cut is a
//! clean end.

#[macro_use]
mod common;

use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{app, config, connect, eventually, read_to_close, Client, Server};
use servicegroup::Error;

/// Idle, header-read and write timeouts are all 30 s in these tests: a drain that ends within
/// this bound was ended by the drain, not by a timeout.
const PROMPT: Duration = Duration::from_secs(10);

/// The 1 s grace a half-read head gets at the drain, less the clock's granularity.
const GRACE_AT_LEAST: Duration = Duration::from_millis(950);

/// Starts the test app with 30 s timeouts everywhere (and a 30 s shutdown deadline).
fn server() -> (Server, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let (handler, calls) = app();
    (Server::start(handler, config()), calls)
}

/// Shuts `server` down; asserts `run` returned `Ok` within [`PROMPT`].
fn assert_prompt_clean_stop(server: Server) -> io::Result<()> {
    let start = Instant::now();
    server.stop().map_err(io::Error::other)?;
    assert!(start.elapsed() < PROMPT, "the drain took {:?}", start.elapsed());
    Ok(())
}

in_every_runtime! {
    fn a_keep_alive_connection_whose_body_arrived_late_closes_at_the_drain() -> io::Result<()> {
        // The body arrives after the handler started waiting for it, as it does behind a proxy
        // that forwards head and body in separate segments: the socket's readiness seen then
        // must not be mistaken for the next request later.
        for _ in 0..5 {
            let (server, calls) = server();
            let mut client = Client::new(server.addr);
            client.send(b"POST /len HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n");
            eventually("the handler waits for the body", || calls.load(Ordering::SeqCst) == 1);
            std::thread::sleep(Duration::from_millis(20));
            let response = client.request(b"hi");
            assert_eq!((response.status, response.text().as_str()), (200, "2"));
            assert_prompt_clean_stop(server)?;
            assert!(client.is_closed());
        }
        Ok(())
    }
}

in_every_runtime! {
    fn stray_empty_lines_after_a_request_leave_the_connection_idle() -> io::Result<()> {
        // RFC 9112 §2.2: empty lines before a request line are ignored; a connection holding
        // only those is between requests.
        for stray in ["\r\n", "\n", "\r\n\r\n"] {
            let (server, _) = server();
            let mut client = Client::new(server.addr);
            let request = format!("POST /len HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi{stray}");
            let response = client.request(request.as_bytes());
            assert_eq!(response.status, 200, "{stray:?}");
            assert_eq!(response.header("connection"), None, "not closing yet: {stray:?}");
            assert_prompt_clean_stop(server)?;
            assert!(client.is_closed(), "{stray:?}");
        }
        // And they are still skipped before a real request.
        let (server, _) = server();
        let mut client = Client::new(server.addr);
        assert_eq!(client.request(b"\r\n\nGET / HTTP/1.1\r\nHost: t\r\n\r\n").text(), "hello");
        client.send(b"\r\n");
        assert_eq!(client.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").text(), "hello");
        Ok(())
    }
}

in_every_runtime! {
    fn a_request_pipelined_behind_stray_empty_lines_is_served_before_the_drain_closes() -> io::Result<()> {
        let (server, _) = server();
        let mut client = Client::new(server.addr);
        let response = client.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n\r\n");
        assert_eq!(response.text(), "hello");
        server.shutdown.start();
        // Sent after the drain started: the connection is closed, or (if the bytes won the race)
        // the request is answered with close. Either way the drain ends promptly.
        let _ = client.stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
        let rest = read_to_close(&mut client.stream);
        assert!(rest.is_empty() || rest.contains("connection: close\r\n"), "{rest}");
        assert_prompt_clean_stop(server)
    }
}

in_every_runtime! {
    fn a_half_read_head_gets_one_second_at_the_drain_then_408() -> io::Result<()> {
        let (server, calls) = server();
        let mut stalled = connect(server.addr);
        stalled.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")?;
        // The partial head must have been read before the drain starts.
        let mut probe = Client::new(server.addr);
        assert_eq!(probe.request(&common::get("/")).text(), "hello");
        std::thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        server.shutdown.start();
        let text = read_to_close(&mut stalled);
        let waited = start.elapsed();
        assert!(text.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{text}");
        assert!(waited >= GRACE_AT_LEAST && waited < PROMPT, "{waited:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "only the probe reached the handler");
        server.join().map_err(io::Error::other)?;
        assert!(start.elapsed() < PROMPT);
        Ok(())
    }
}

in_every_runtime! {
    fn a_new_connections_first_request_sent_just_after_the_drain_starts_is_served_not_reset() -> io::Result<()> {
        let (server, _) = server();
        // Connections are accepted in order: once the probe is answered, `fresh` was accepted.
        let mut fresh = Client::new(server.addr);
        let mut probe = Client::new(server.addr);
        assert_eq!(probe.request(&common::get("/")).text(), "hello");
        server.shutdown.start();
        // The drain has started once it closed the probe, idle between requests.
        assert!(probe.is_closed());
        let response = fresh.request(&common::get("/"));
        assert_eq!((response.status, response.header("connection")), (200, Some("close")));
        assert!(fresh.is_closed());
        assert_prompt_clean_stop(server)
    }
}

in_every_runtime! {
    fn a_new_connection_that_stays_silent_closes_after_the_grace() -> io::Result<()> {
        let (server, calls) = server();
        let mut silent = connect(server.addr);
        let mut probe = Client::new(server.addr);
        assert_eq!(probe.request(&common::get("/")).text(), "hello");
        let start = Instant::now();
        server.shutdown.start();
        let text = read_to_close(&mut silent);
        let waited = start.elapsed();
        assert_eq!(text, "", "nothing was asked, nothing is answered");
        assert!(waited >= GRACE_AT_LEAST && waited < PROMPT, "{waited:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        server.join().map_err(io::Error::other)?;
        Ok(())
    }
}

in_every_runtime! {
    fn a_head_completed_within_the_grace_is_served_with_close() -> io::Result<()> {
        let (server, _) = server();
        let mut client = Client::new(server.addr);
        client.send(b"GET / HTTP/1.1\r\n");
        std::thread::sleep(Duration::from_millis(50));
        server.shutdown.start();
        std::thread::sleep(Duration::from_millis(100));
        let response = client.request(b"Host: t\r\n\r\n");
        assert_eq!((response.status, response.header("connection")), (200, Some("close")));
        assert!(client.is_closed());
        assert_prompt_clean_stop(server)
    }
}

in_every_runtime! {
    fn a_zero_shutdown_timeout_cuts_at_once_and_is_clean_when_nothing_is_open() -> io::Result<()> {
        // Nothing open: a clean stop, however short the deadline (the debug server too).
        for _ in 0..5 {
            let (handler, _) = app();
            let mut cfg = config();
            cfg.shutdown_timeout = Duration::ZERO;
            cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
            let server = Server::start(handler, cfg);
            server.stop().map_err(io::Error::other)?;
        }
        // A request in flight: cut at once, and reported.
        let (handler, calls) = app();
        let mut cfg = config();
        cfg.shutdown_timeout = Duration::ZERO;
        let server = Server::start(handler, cfg);
        let mut busy = connect(server.addr);
        busy.write_all(&common::get("/sleep?ms=20000"))?;
        eventually("the request reached its handler", || calls.load(Ordering::SeqCst) == 1);
        let start = Instant::now();
        match server.stop() {
            Err(Error::ShutdownTimedOut { connections: 1, .. }) => {}
            other => panic!("expected one cut connection, got {other:?}"),
        }
        assert!(start.elapsed() < PROMPT, "{:?}", start.elapsed());
        assert_eq!(read_to_close(&mut busy), "");
        Ok(())
    }
}
