//! Protocol upgrades over raw sockets: the 101 hand-off and CONNECT tunnels, every wrong use,
//! bytes pipelined behind the upgrade request, timeouts once upgraded, and the drain.

#[macro_use]
mod common;

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use servicegroup::http::{header, Method, Request, Response, StatusCode};
use servicegroup::{upgrade, Body, Config, Error, Handler};

use common::{config, eventually, get, is_closed, Client, Server};

/// An upgrade request for `path` offering the made-up protocol `echo`.
fn offer(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").into_bytes()
}

/// Echoes until the peer closes; on the drain, says `going away` and ends.
async fn echo(mut stream: upgrade::Upgraded) {
    let draining = stream.draining();
    let mut draining = std::pin::pin!(draining);
    let mut buf = [0u8; 64 * 1024];
    loop {
        let read = async { Some(stream.read(&mut buf).await) };
        let drain = async {
            draining.as_mut().await;
            None
        };
        match futures_lite::future::or(read, drain).await {
            Some(Ok(n)) if n > 0 => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Some(_) => return,
            None => {
                let _ = stream.write_all(b"going away").await;
                let _ = stream.close().await;
                return;
            }
        }
    }
}

/// The test handler; `opened` counts protocol functions started.
fn handler(opened: Arc<AtomicUsize>) -> impl Handler {
    move |mut req: Request<Body>| {
        let opened = opened.clone();
        async move {
            let path = req.uri().path().to_owned();
            if req.method() == Method::CONNECT {
                if req.uri().authority().is_some_and(|a| a.as_str() == "refused:443") {
                    return Response::new(Body::from("not a tunnel"));
                }
                let offer = upgrade::on(&mut req).expect("a CONNECT is an offer");
                assert!(offer.is_connect());
                return offer.accept(echo);
            }
            match path.as_str() {
                "/echo" | "/read-body-first" => {
                    if path == "/read-body-first" {
                        let body = req.body_mut().bytes().await.unwrap();
                        assert_eq!(body, "abc");
                    }
                    let offer = match upgrade::on(&mut req) {
                        Ok(offer) => offer,
                        Err(e) => return e.to_response(),
                    };
                    assert_eq!(offer.protocol().unwrap(), "echo");
                    let mut response = offer.accept(move |stream| {
                        opened.fetch_add(1, Ordering::SeqCst);
                        echo(stream)
                    });
                    response.headers_mut().insert("x-accepted", "yes".parse().unwrap());
                    response
                }
                "/twice" => {
                    let _first = upgrade::on(&mut req).unwrap();
                    match upgrade::on(&mut req) {
                        Ok(_) => Response::new(Body::from("taken twice")),
                        Err(e) => e.to_response(),
                    }
                }
                "/eager" => upgrade::on(&mut req).unwrap().accept(echo),
                "/manual-101" => {
                    let mut response = Response::new(Body::empty());
                    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    response.headers_mut().insert(header::UPGRADE, "echo".parse().unwrap());
                    response
                }
                "/changed-mind" => {
                    let mut response = upgrade::on(&mut req).unwrap().accept(move |stream| {
                        opened.fetch_add(1, Ordering::SeqCst);
                        echo(stream)
                    });
                    *response.status_mut() = StatusCode::FORBIDDEN;
                    *response.body_mut() = Body::from("no");
                    response
                }
                "/detached" => upgrade::on(&mut req).unwrap().accept(|stream| async move {
                    // The stream moves to a thread of its own: the connection still counts.
                    std::thread::spawn(move || futures_lite::future::block_on(echo(stream)));
                }),
                "/stubborn" => upgrade::on(&mut req).unwrap().accept(|mut stream| async move {
                    // Ignores the drain: only the shutdown deadline ends it.
                    let mut buf = [0u8; 1024];
                    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                }),
                "/panics" => upgrade::on(&mut req).unwrap().accept(|_stream| async move {
                    panic!("the protocol panicked");
                }),
                _ => Response::new(Body::from(format!("plain {path}"))),
            }
        }
    }
}

/// A server with the upgrade test handler and `configure` applied to [`config`].
fn server(configure: impl FnOnce(&mut Config)) -> (Server, Arc<AtomicUsize>) {
    let opened = Arc::new(AtomicUsize::new(0));
    let mut cfg = config();
    configure(&mut cfg);
    (Server::start(handler(opened.clone()), cfg), opened)
}

/// Upgrades a new connection at `path`; returns the connection and the bytes after the 101.
fn upgraded(server: &Server, path: &str) -> (Client, Vec<u8>) {
    let mut client = Client::new(server.addr);
    let response = client.request(&offer(path));
    assert_eq!(response.status, 101, "{}", response.head);
    let extra = client.take_buffered();
    (client, extra)
}

/// Reads exactly `n` bytes of the new protocol: those buffered past the 101 first.
fn read_n(client: &mut Client, n: usize) -> Vec<u8> {
    let mut have = client.take_buffered();
    let stream = &mut client.stream;
    let mut buf = [0u8; 64 * 1024];
    while have.len() < n {
        let got = stream.read(&mut buf).expect("read");
        assert!(got > 0, "closed after {} of {n} bytes", have.len());
        have.extend_from_slice(&buf[..got]);
    }
    have
}

in_every_runtime! {
    fn an_accepted_upgrade_answers_101_and_hands_over_the_connection() -> io::Result<()> {
        let (server, opened) = server(|_| {});
        let mut client = Client::new(server.addr);
        let response = client.request(&offer("/echo"));
        assert_eq!(response.status, 101);
        assert_eq!(response.header("upgrade"), Some("echo"));
        assert_eq!(response.header("connection"), Some("upgrade"));
        assert_eq!(response.header("x-accepted"), Some("yes"), "fields added to accept's response are sent");
        assert_eq!(response.header("content-length"), None);
        assert_eq!(response.header("transfer-encoding"), None);
        for message in [&b"hello"[..], &[0u8, 255, 13, 10, 13, 10], &vec![7u8; 300_000]] {
            client.send(message);
            assert_eq!(read_n(&mut client, message.len()), message);
        }
        let mut stream = client.stream;
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        // The client closing ends the protocol and the connection.
        stream.shutdown(std::net::Shutdown::Write)?;
        assert!(is_closed(&mut stream));
        server.stop().map_err(io::Error::other)
    }
}

in_every_runtime! {
    fn bytes_pipelined_behind_the_upgrade_request_reach_the_new_protocol() -> io::Result<()> {
        let (server, _) = server(|_| {});
        let mut client = Client::new(server.addr);
        // One write: the head, then the new protocol's first bytes (an HTTP-looking line too).
        let mut bytes = offer("/echo");
        bytes.extend_from_slice(b"GET /not-http HTTP/1.1\r\n\r\nrest");
        client.send(&bytes);
        let response = client.response();
        assert_eq!(response.status, 101);
        let expected = b"GET /not-http HTTP/1.1\r\n\r\nrest";
        let echoed = read_n(&mut client, expected.len());
        assert_eq!(echoed, expected);
        server.stop().map_err(io::Error::other)
    }
}

in_every_runtime! {
    fn an_upgrade_after_the_request_body_was_read_is_served() -> io::Result<()> {
        let (server, _) = server(|_| {});
        let mut client = Client::new(server.addr);
        let head = "GET /read-body-first HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: echo\r\nContent-Length: 3\r\n\r\nabcafter";
        let response = client.request(head.as_bytes());
        assert_eq!(response.status, 101);
        assert_eq!(read_n(&mut client, 5), b"after");
        server.stop().map_err(io::Error::other)
    }
}

in_every_runtime! {
    fn wrong_uses_are_refused_with_a_message() -> io::Result<()> {
        let (server, opened) = server(|_| {});
        // No offer: 400 saying what is missing; the connection stays usable.
        let mut client = Client::new(server.addr);
        let response = client.request(&get("/echo"));
        assert_eq!(response.status, 400);
        assert!(response.text().contains("no `Upgrade` field"), "{}", response.text());
        let response = client.request(b"GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: echo\r\n\r\n");
        assert_eq!(response.status, 400);
        assert!(response.text().contains("does not name `upgrade`"), "{}", response.text());
        // HTTP/1.0 cannot switch protocols (RFC 9110 §7.8).
        let response = Client::new(server.addr).request(b"GET /echo HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n");
        assert_eq!(response.status, 400);
        assert!(response.text().contains("only HTTP/1.1"), "{}", response.text());
        // A second take.
        let response = Client::new(server.addr).request(&offer("/twice"));
        assert_eq!(response.status, 400);
        assert!(response.text().contains("already taken"), "{}", response.text());
        // A 101 built by hand: 500, and the connection closes.
        let mut client = Client::new(server.addr);
        let response = client.request(&offer("/manual-101"));
        assert_eq!(response.status, 500);
        assert!(response.text().contains("upgrade::OnUpgrade::accept"), "{}", response.text());
        assert!(client.is_closed());
        // Accepting with the request body unread: 500, and the connection closes.
        let mut client = Client::new(server.addr);
        let eager = "GET /eager HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: echo\r\nContent-Length: 3\r\n\r\nabc";
        let response = client.request(eager.as_bytes());
        assert_eq!(response.status, 500);
        assert!(response.text().contains("request body"), "{}", response.text());
        assert!(client.is_closed());
        // Accepted, then answered 403: sent as is, no protocol runs, still HTTP/1.1.
        let mut client = Client::new(server.addr);
        let response = client.request(&offer("/changed-mind"));
        assert_eq!((response.status, response.text().as_str()), (403, "no"));
        assert_eq!(response.header("connection"), None);
        assert_eq!(client.request(&get("/after")).text(), "plain /after");
        assert_eq!(opened.load(Ordering::SeqCst), 0, "no protocol function ran");
        server.stop().map_err(io::Error::other)
    }
}

in_every_runtime! {
    fn offers_the_handler_does_not_take_are_served_as_http_1_1() -> io::Result<()> {
        let (server, _) = server(|_| {});
        let mut client = Client::new(server.addr);
        let h2c = b"GET /plain HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
        let response = client.request(h2c);
        assert_eq!((response.status, response.text().as_str()), (200, "plain /plain"));
        assert_eq!(response.header("upgrade"), None);
        assert_eq!(response.header("connection"), None);
        // Still HTTP/1.1 on the same connection.
        assert_eq!(client.request(&get("/next")).text(), "plain /next");
        server.stop().map_err(io::Error::other)
    }
}

in_every_runtime! {
    fn connect_is_405_unless_the_handler_takes_it_as_a_tunnel() -> io::Result<()> {
        let (server, _) = server(|_| {});
        // RFC 9110 §9.3.6: the handler's 2xx without a tunnel would be read as one.
        let mut client = Client::new(server.addr);
        let response = client.request(b"CONNECT refused:443 HTTP/1.1\r\nHost: refused:443\r\n\r\n");
        assert_eq!(response.status, 405);
        assert!(response.header("allow").is_some_and(|allow| !allow.contains("CONNECT")));
        // Taken: 200 with no framing fields, then the tunnel.
        let mut stream = common::connect(server.addr);
        stream.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\ntunnelled")?;
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte)?, 1, "closed within the head: {:?}", String::from_utf8_lossy(&got));
            got.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert!(!head.contains("content-length") && !head.contains("transfer-encoding"), "{head}");
        let mut tunnelled = [0u8; 9];
        stream.read_exact(&mut tunnelled)?;
        assert_eq!(&tunnelled, b"tunnelled");
        server.stop().map_err(io::Error::other)
    }
}

in_every_runtime! {
    fn http_timeouts_stop_applying_once_upgraded() -> io::Result<()> {
        let (server, _) = server(|c| {
            c.header_read_timeout = Some(Duration::from_millis(100));
            c.write_timeout = Some(Duration::from_millis(100));
            c.idle_timeout = Some(Duration::from_millis(100));
        });
        let (mut client, extra) = upgraded(&server, "/echo");
        assert!(extra.is_empty());
        // Four times every HTTP timeout, silent: the protocol owns its liveness now.
        std::thread::sleep(Duration::from_millis(400));
        client.send(b"still here");
        assert_eq!(read_n(&mut client, 10), b"still here");
        server.stop().map_err(io::Error::other)
    }
}

in_every_runtime! {
    fn an_upgraded_connection_idle_past_its_timeout_is_closed() -> io::Result<()> {
        let (server, _) = server(|c| c.upgraded_idle_timeout = Some(Duration::from_millis(300)));
        let (mut client, _) = upgraded(&server, "/echo");
        // Activity keeps it open well past the timeout (30 ms gaps, a tenth of it).
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(900) {
            client.send(b".");
            assert_eq!(read_n(&mut client, 1), b".");
            std::thread::sleep(Duration::from_millis(30));
        }
        // Silence closes it.
        let silent = Instant::now();
        assert!(is_closed(&mut client.stream));
        assert!(silent.elapsed() >= Duration::from_millis(250), "closed after {:?}", silent.elapsed());
        server.stop().map_err(io::Error::other)
    }
}

in_every_runtime! {
    fn the_drain_tells_upgraded_streams_and_waits_for_them() -> io::Result<()> {
        let (server, _) = server(|_| {});
        let (mut first, _) = upgraded(&server, "/echo");
        let (mut detached, _) = upgraded(&server, "/detached");
        detached.send(b"ping");
        assert_eq!(read_n(&mut detached, 4), b"ping");
        let start = Instant::now();
        let stopped = std::thread::spawn(move || server.stop());
        // Each is told, says goodbye, and closes; run then returns Ok, nothing cut.
        let mut bye = String::new();
        first.stream.read_to_string(&mut bye)?;
        assert_eq!(bye, "going away");
        let mut bye = String::new();
        detached.stream.read_to_string(&mut bye)?;
        assert_eq!(bye, "going away");
        stopped.join().unwrap().map_err(io::Error::other)?;
        assert!(start.elapsed() < Duration::from_secs(10), "the drain took {:?}", start.elapsed());
        Ok(())
    }
}

in_every_runtime! {
    fn an_upgraded_stream_that_ignores_the_drain_is_cut_at_the_deadline() -> io::Result<()> {
        let (server, _) = server(|c| c.shutdown_timeout = Duration::from_millis(200));
        let (mut client, _) = upgraded(&server, "/stubborn");
        let (mut plain, _) = upgraded(&server, "/echo");
        let result = server.stop();
        match result {
            Err(Error::ShutdownTimedOut { connections, .. }) => assert_eq!(connections, 1, "only the stubborn one"),
            other => panic!("expected ShutdownTimedOut, got {other:?}"),
        }
        assert!(is_closed(&mut client.stream));
        let mut bye = String::new();
        plain.stream.read_to_string(&mut bye)?;
        assert_eq!(bye, "going away");
        Ok(())
    }
}

in_every_runtime! {
    fn a_protocol_that_panics_closes_only_its_connection() -> io::Result<()> {
        let (server, _) = server(|_| {});
        let (mut client, _) = upgraded(&server, "/panics");
        assert!(is_closed(&mut client.stream));
        assert_eq!(Client::new(server.addr).request(&get("/ok")).text(), "plain /ok");
        server.stop().map_err(io::Error::other)
    }
}

in_every_runtime! {
    fn metrics_and_the_connections_view_count_upgraded_connections() -> io::Result<()> {
        let (server, _) = server(|c| c.debug_addr = Some("127.0.0.1:0".parse().unwrap()));
        let debug = server.debug_addr.unwrap();
        let metric = |name: &str| -> String {
            let text = Client::new(debug).request(&get("/metrics")).text();
            let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in\n{text}"));
            line.rsplit(' ').next().unwrap().to_owned()
        };
        let (mut a, _) = upgraded(&server, "/echo");
        let (_b, _) = upgraded(&server, "/echo");
        eventually("two upgraded open", || metric("servicegroup_upgraded_connections_open ") == "2");
        assert_eq!(metric("servicegroup_upgraded_connections_total "), "2");
        let view = Client::new(debug).request(&get("/debug/connections?format=json")).text();
        assert!(view.contains("upgraded"), "{view}");
        a.stream.shutdown(std::net::Shutdown::Write)?;
        assert!(is_closed(&mut a.stream));
        eventually("one upgraded open", || metric("servicegroup_upgraded_connections_open ") == "1");
        assert_eq!(metric("servicegroup_upgraded_connections_total "), "2");
        server.stop().map_err(io::Error::other)
    }
}
