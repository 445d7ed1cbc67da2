//! Graceful shutdown started from code: the drain, its deadline, and the drain delay.

#[macro_use]
mod common;

use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, connect, eventually, exchange, get, read_to_close, Client, Server};
use servicegroup::http::{Request, Response};
use servicegroup::{Body, Error, Handler};

/// `/slow?ms=N` counts itself as started, sleeps N ms and answers; anything else says hello.
fn slow_app() -> (impl Handler, Arc<AtomicUsize>) {
    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    let handler = move |req: Request<Body>| {
        let counter = counter.clone();
        async move {
            if req.uri().path() != "/slow" {
                return Response::new(Body::from("hello"));
            }
            counter.fetch_add(1, Ordering::SeqCst);
            let ms: u64 =
                req.uri().query().and_then(|q| q.strip_prefix("ms=")).and_then(|v| v.parse().ok()).unwrap_or(0);
            async_io::Timer::after(Duration::from_millis(ms)).await;
            Response::new(Body::from(format!("done after {ms} ms")))
        }
    };
    (handler, started)
}

fn refused(addr: std::net::SocketAddr) -> bool {
    std::net::TcpStream::connect(addr).is_err()
}

in_every_runtime! {
    fn requests_in_flight_finish_while_new_connections_are_refused() -> io::Result<()> {
        let (handler, started) = slow_app();
        let server = Server::start(handler, config());
        let addr = server.addr;
        let mut stream = connect(addr);
        stream.write_all(&get("/slow?ms=600"))?;
        eventually("the request reached its handler", || started.load(Ordering::SeqCst) == 1);
        let start = Instant::now();
        server.shutdown.start();
        eventually("new connections are refused", || refused(addr));
        let text = read_to_close(&mut stream);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("connection: close\r\n") && text.ends_with("done after 600 ms"), "{text}");
        // The last connection is done: run returns at once, not at the 30 s deadline.
        assert_eq!(server.join().map_err(io::Error::other)?, ());
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        Ok(())
    }
}

in_every_runtime! {
    fn idle_and_silent_connections_are_closed_at_once() -> io::Result<()> {
        let (handler, _) = slow_app();
        let server = Server::start(handler, config());
        let mut idle = Client::new(server.addr);
        assert_eq!(idle.request(&get("/")).text(), "hello");
        let mut silent = connect(server.addr);
        // The silent connection must have been accepted before the drain starts.
        std::thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        server.shutdown.start();
        assert!(idle.is_closed());
        assert_eq!(read_to_close(&mut silent), "");
        server.join().map_err(io::Error::other)?;
        // Idle and header timeouts are 30 s: only the drain can have closed them this soon.
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        Ok(())
    }
}

in_every_runtime! {
    fn pipelined_requests_already_received_are_answered() -> io::Result<()> {
        let (handler, started) = slow_app();
        let server = Server::start(handler, config());
        let mut client = Client::new(server.addr);
        let mut batch = get("/slow?ms=300");
        batch.extend(get("/"));
        batch.extend(get("/slow?ms=10"));
        client.send(&batch);
        eventually("the first request reached its handler", || started.load(Ordering::SeqCst) == 1);
        server.shutdown.start();
        let responses: Vec<_> = (0..3).map(|_| client.response()).collect();
        let bodies: Vec<String> = responses.iter().map(|r| r.text()).collect();
        assert_eq!(bodies, ["done after 300 ms", "hello", "done after 10 ms"]);
        // Only the last says close: a response with close must be the last one.
        let closes: Vec<_> = responses.iter().map(|r| r.header("connection")).collect();
        assert_eq!(closes, [None, None, Some("close")]);
        assert!(client.is_closed());
        server.join().map_err(io::Error::other)?;
        Ok(())
    }
}

in_every_runtime! {
    fn the_deadline_cuts_what_is_left_and_says_how_much() -> io::Result<()> {
        let (handler, started) = slow_app();
        let mut cfg = config();
        cfg.shutdown_timeout = Duration::from_millis(300);
        let server = Server::start(handler, cfg);
        let mut stream = connect(server.addr);
        stream.write_all(&get("/slow?ms=30000"))?;
        eventually("the request reached its handler", || started.load(Ordering::SeqCst) == 1);
        let start = Instant::now();
        server.shutdown.start();
        let result = server.join();
        let elapsed = start.elapsed();
        match result {
            Err(Error::ShutdownTimedOut { connections: 1, members, .. }) if members.is_empty() => {}
            other => panic!("expected one cut connection, got {other:?}"),
        }
        assert!(elapsed >= Duration::from_millis(270) && elapsed < Duration::from_secs(10), "{elapsed:?}");
        // The cut connection is closed without a response.
        assert_eq!(read_to_close(&mut stream), "");
        Ok(())
    }
}

in_every_runtime! {
    fn the_deadline_error_says_how_many_were_cut() {
        let e =
            Error::ShutdownTimedOut { connections: 3, members: vec!["worker".into()], timeout: Duration::from_secs(30) };
        let text = e.to_string();
        assert!(text.contains("cut 3 open connection(s)") && text.contains("worker") && text.contains("30s"), "{text}");
        assert!(e.is_timeout());
    }
}

in_every_runtime! {
    fn the_drain_delay_keeps_serving_with_connection_close_and_readiness_down() -> io::Result<()> {
        let (handler, _) = slow_app();
        let mut cfg = config();
        cfg.drain_delay = Duration::from_millis(800);
        cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
        let server = Server::start(handler, cfg);
        let debug = server.debug_addr.unwrap();
        let ready = || exchange(debug, b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        assert!(ready().starts_with("HTTP/1.1 200 "));
        let mut kept = Client::new(server.addr);
        assert_eq!(kept.request(&get("/")).header("connection"), None);

        let start = Instant::now();
        server.shutdown.start();
        assert!(ready().starts_with("HTTP/1.1 503 "), "readiness reports not-ready from the signal on");
        // Still accepting and serving during the delay; every response is the last on its connection.
        let mut during = 0;
        while start.elapsed() < Duration::from_millis(500) {
            let mut client = Client::new(server.addr);
            let response = client.request(&get("/"));
            assert_eq!((response.text().as_str(), response.header("connection")), ("hello", Some("close")));
            during += 1;
        }
        assert!(during > 0);
        let response = kept.request(&get("/"));
        assert_eq!(response.header("connection"), Some("close"));
        // Then the listener closes.
        eventually("new connections are refused", || refused(server.addr));
        assert!(start.elapsed() >= Duration::from_millis(750), "closed before the delay: {:?}", start.elapsed());
        server.join().map_err(io::Error::other)?;
        Ok(())
    }
}

in_every_runtime! {
    fn the_debug_server_stays_up_until_the_service_has_drained() -> io::Result<()> {
        let (handler, started) = slow_app();
        let mut cfg = config();
        cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
        let server = Server::start(handler, cfg);
        let debug = server.debug_addr.unwrap();
        let mut stream = connect(server.addr);
        stream.write_all(&get("/slow?ms=700"))?;
        eventually("the request reached its handler", || started.load(Ordering::SeqCst) == 1);
        server.shutdown.start();
        eventually("the service listener is closed", || refused(server.addr));
        // The service is draining: the debug server still answers, and shows the drain.
        let metrics = exchange(debug, b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        assert!(metrics.contains("servicegroup_shutting_down 1\n"), "{metrics}");
        assert!(metrics.contains("servicegroup_requests_in_flight 1\n"), "{metrics}");
        assert!(read_to_close(&mut stream).ends_with("done after 700 ms"));
        server.join().map_err(io::Error::other)?;
        assert!(refused(debug), "the debug server closes after the service drained");
        Ok(())
    }
}

in_every_runtime! {
    fn a_shutdown_started_before_run_drains_at_once() -> io::Result<()> {
        let (handler, _) = slow_app();
        let group = servicegroup::Group::new(handler, config()).map_err(io::Error::other)?;
        group.shutdown().start();
        futures_lite::future::block_on(group.run()).map_err(io::Error::other)
    }
}
