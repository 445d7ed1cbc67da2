//! Timeouts enforced by the connection loop, with millisecond configs. Each test checks the
//! deterministic side of the clock (nothing is cut before its deadline) and that the cut
//! happens at all (a missing cut fails on the helpers' 20 s safety net); upper bounds are
//! generous.

#[macro_use]
mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{app, app_server, config, connect, exchange, get, is_closed, read_to_close, Client, Server};

/// A little under each configured timeout: the client starts its clock after `connect`
/// returns, which can be a hair after the server accepted.
fn at_least(timeout: Duration) -> Duration {
    timeout - timeout / 10
}

/// Generous upper bound for "near the timeout" on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Log lines, captured so tests can check what a timeout logs.
static LOG: OnceLock<Mutex<Vec<String>>> = OnceLock::new();

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        if record.level() <= log::Level::Debug {
            LOG.get_or_init(Mutex::default).lock().unwrap().push(format!("{} {}", record.level(), record.args()));
        }
    }
    fn flush(&self) {}
}

fn capture_logs() {
    if log::set_logger(&Capture).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
}

fn logged(needle: &str) -> bool {
    LOG.get_or_init(Mutex::default).lock().unwrap().iter().any(|line| line.contains(needle))
}

in_every_runtime! {
    fn a_connection_that_never_sends_is_closed_silently_at_the_header_timeout() -> io::Result<()> {
        capture_logs();
        let server = app_server(|cfg| cfg.header_read_timeout = Some(ms(200)));
        let mut stream = connect(server.addr);
        let start = Instant::now();
        let text = read_to_close(&mut stream);
        let elapsed = start.elapsed();
        assert_eq!(text, "", "nothing was sent, so nothing is answered");
        assert!(elapsed >= at_least(ms(200)) && elapsed < ms(200) + SLACK, "{elapsed:?}");
        // Logged at debug level with the client's address.
        let peer = stream.local_addr()?.to_string();
        common::eventually("the timeout is logged", || logged(&peer) && logged("header read timeout"));
        Ok(())
    }
}

in_every_runtime! {
    fn a_partial_head_gets_408_at_the_header_timeout() -> io::Result<()> {
        let server = app_server(|cfg| cfg.header_read_timeout = Some(ms(200)));
        let mut stream = connect(server.addr);
        let start = Instant::now();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")?;
        let text = read_to_close(&mut stream);
        let elapsed = start.elapsed();
        assert!(text.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(elapsed >= at_least(ms(200)) && elapsed < ms(200) + SLACK, "{elapsed:?}");
        Ok(())
    }
}

in_every_runtime! {
    fn a_later_partial_head_gets_408_at_the_header_timeout_not_the_idle_or_write_one() -> io::Result<()> {
        // The idle and write timeouts are far longer: whichever deadline a later head waited
        // under shows in when it is cut.
        let server = app_server(|cfg| {
            cfg.header_read_timeout = Some(ms(200));
            cfg.idle_timeout = Some(ms(5000));
            cfg.write_timeout = Some(ms(5000));
        });
        // After a keep-alive exchange, the next head starts and stalls.
        let mut stream = connect(server.addr);
        stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")?;
        let mut first = Vec::new();
        while !first.ends_with(b"hello") {
            let mut buf = [0u8; 512];
            let n = stream.read(&mut buf)?;
            assert!(n > 0, "closed before the first answer");
            first.extend_from_slice(&buf[..n]);
        }
        stream.write_all(b"GET / HTTP/1.1\r\nHo")?;
        let start = Instant::now();
        let text = read_to_close(&mut stream);
        let elapsed = start.elapsed();
        assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
        assert!(elapsed >= at_least(ms(200)) && elapsed < ms(200) + SLACK, "keep-alive: cut after {elapsed:?}");
        // Pipelined: a whole request and the start of the next in one write.
        let mut stream = connect(server.addr);
        let start = Instant::now();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHo")?;
        let text = read_to_close(&mut stream);
        let elapsed = start.elapsed();
        let (answer, rest) = text.split_once("hello").expect("the whole request was answered");
        assert!(answer.starts_with("HTTP/1.1 200 "), "{text}");
        assert!(rest.starts_with("HTTP/1.1 408 "), "{text}");
        assert!(elapsed >= at_least(ms(200)) && elapsed < ms(200) + SLACK, "pipelined: cut after {elapsed:?}");
        Ok(())
    }
}

in_every_runtime! {
    fn the_header_timeout_of_a_first_request_runs_from_accept() -> io::Result<()> {
        let server = app_server(|cfg| cfg.header_read_timeout = Some(ms(300)));
        let mut stream = connect(server.addr);
        let start = Instant::now();
        // Silent for most of the budget, then a head that never ends.
        std::thread::sleep(ms(200));
        stream.write_all(b"GET / HT")?;
        let text = read_to_close(&mut stream);
        let elapsed = start.elapsed();
        assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
        assert!(elapsed >= at_least(ms(300)) && elapsed < ms(300) + SLACK, "cut {elapsed:?} after connect");
        Ok(())
    }
}

in_every_runtime! {
    fn slowloris_is_cut_while_a_normal_client_is_served_promptly() -> io::Result<()> {
        let (handler, _) = app();
        let mut cfg = config();
        let timeout = ms(400);
        cfg.header_read_timeout = Some(timeout);
        let server = Server::start(handler, cfg);
        let head = format!("GET / HTTP/1.1\r\nHost: t\r\nX-Padding: {}\r\n\r\n", "p".repeat(300));

        // 50 attackers, one byte each every 10 ms: the head would take over 3 s.
        let attackers: Vec<(TcpStream, Instant)> = (0..50)
            .map(|_| {
                let stream = connect(server.addr);
                stream.set_nonblocking(true).unwrap();
                (stream, Instant::now())
            })
            .collect();
        let dribbler = std::thread::spawn(move || {
            let mut answers: Vec<Vec<u8>> = vec![Vec::new(); attackers.len()];
            let mut closed: Vec<Option<Duration>> = vec![None; attackers.len()];
            let begun = Instant::now();
            let mut i = 0;
            while closed.iter().any(Option::is_none) && begun.elapsed() < common::PATIENCE {
                for (k, (stream, connected)) in attackers.iter().enumerate() {
                    if closed[k].is_some() {
                        continue;
                    }
                    if i < head.len() {
                        let _ = (&*stream).write(&head.as_bytes()[i..i + 1]);
                    }
                    let mut buf = [0u8; 512];
                    match (&*stream).read(&mut buf) {
                        Ok(0) => closed[k] = Some(connected.elapsed()),
                        Ok(n) => answers[k].extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => closed[k] = Some(connected.elapsed()),
                    }
                }
                i += 1;
                std::thread::sleep(ms(10));
            }
            (answers, closed)
        });

        // Meanwhile, a normal client on fresh connections.
        let mut worst = Duration::ZERO;
        let mut served = 0;
        while !dribbler.is_finished() {
            let start = Instant::now();
            let text = exchange(server.addr, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
            assert!(text.ends_with("hello"), "{text}");
            worst = worst.max(start.elapsed());
            served += 1;
            std::thread::sleep(ms(20));
        }
        let (answers, closed) = dribbler.join().unwrap();
        for (answer, closed) in answers.iter().zip(&closed) {
            let text = String::from_utf8_lossy(answer);
            assert!(text.starts_with("HTTP/1.1 408 "), "attacker got {text:?}");
            let closed = closed.expect("attacker connection was never closed");
            assert!(closed >= at_least(timeout) && closed < timeout + SLACK, "attacker cut after {closed:?}");
        }
        assert!(served >= 5, "only {served} normal requests ran");
        assert!(worst < ms(1000), "a normal request took {worst:?} during the attack");
        Ok(())
    }
}

in_every_runtime! {
    fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout() -> io::Result<()> {
        let server = app_server(|cfg| {
            cfg.idle_timeout = Some(ms(200));
            cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
        });
        let mut client = Client::new(server.addr);
        assert_eq!(client.request(&get("/")).text(), "hello");
        let start = Instant::now();
        assert!(client.is_closed());
        let elapsed = start.elapsed();
        assert!(elapsed >= at_least(ms(200)) && elapsed < ms(200) + SLACK, "{elapsed:?}");
        // Counted per phase, for the debug server.
        let metrics =
            exchange(server.debug_addr.unwrap(), b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        assert!(metrics.contains("servicegroup_timeouts_total{phase=\"idle\"} 1\n"), "{metrics}");
        assert!(metrics.contains("servicegroup_timeouts_total{phase=\"header_read\"} 0\n"), "{metrics}");
        Ok(())
    }
}

in_every_runtime! {
    fn a_connection_that_keeps_sending_requests_stays_open() -> io::Result<()> {
        let server = app_server(|cfg| {
            cfg.idle_timeout = Some(ms(200));
            cfg.header_read_timeout = Some(ms(200));
        });
        let mut client = Client::new(server.addr);
        let start = Instant::now();
        // Four times the idle timeout in all, never idle for longer than a quarter of it.
        while start.elapsed() < ms(800) {
            assert_eq!(client.request(&get("/")).text(), "hello");
            std::thread::sleep(ms(50));
        }
        Ok(())
    }
}

in_every_runtime! {
    fn a_slow_upload_is_cut_at_the_write_timeout() -> io::Result<()> {
        let server = app_server(|cfg| cfg.write_timeout = Some(ms(300)));
        let mut stream = connect(server.addr);
        let start = Instant::now();
        stream.write_all(b"POST /len HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")?;
        let mut answer = Vec::new();
        stream.set_nonblocking(true)?;
        // Ten bytes every 50 ms: the body would take five seconds.
        loop {
            let _ = stream.write(&[b'u'; 10]);
            let mut buf = [0u8; 1024];
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            assert!(start.elapsed() < common::PATIENCE, "never cut");
            std::thread::sleep(ms(50));
        }
        let elapsed = start.elapsed();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(elapsed >= at_least(ms(300)) && elapsed < ms(300) + SLACK, "{elapsed:?}");
        Ok(())
    }
}

in_every_runtime! {
    fn a_slow_handler_gets_its_client_a_503() -> io::Result<()> {
        let server = app_server(|cfg| cfg.write_timeout = Some(ms(200)));
        let start = Instant::now();
        let text = exchange(server.addr, &get("/sleep?ms=10000"));
        let elapsed = start.elapsed();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(elapsed >= at_least(ms(200)) && elapsed < ms(200) + SLACK, "{elapsed:?}");
        // A fast request on the next connection is fine.
        assert!(exchange(server.addr, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").ends_with("hello"));
        Ok(())
    }
}

in_every_runtime! {
    fn a_client_that_never_reads_is_cut_at_the_write_timeout() -> io::Result<()> {
        let server = app_server(|cfg| {
            cfg.write_timeout = Some(ms(300));
            cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
        });
        let debug = server.debug_addr.unwrap();
        let total = 200_000_000usize;
        let mut stream = connect(server.addr);
        stream.write_all(&get(&format!("/big-stream?bytes={total}")))?;
        // Not reading: the server fills the socket buffers and blocks until its deadline.
        common::eventually("the write timeout is counted", || {
            let metrics = exchange(debug, b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
            metrics.contains("servicegroup_timeouts_total{phase=\"write\"} 1\n")
        });
        let received = read_to_close(&mut stream);
        assert!(received.starts_with("HTTP/1.1 200 OK\r\n"), "the head went out before the cut");
        assert!(received.len() < total, "the whole body was sent: the client was not cut");
        assert!(is_closed(&mut stream));
        Ok(())
    }
}

in_every_runtime! {
    fn switched_off_timeouts_do_not_fire() -> io::Result<()> {
        let (handler, _) = app();
        // Idle and write off; the header timeout short, to show it is not used in their place.
        let mut cfg = config();
        cfg.header_read_timeout = Some(ms(100));
        cfg.idle_timeout = None;
        cfg.write_timeout = None;
        let server = Server::start(handler, cfg);
        let mut client = Client::new(server.addr);
        assert_eq!(client.request(&get("/sleep?ms=400")).text(), "slept 400");
        std::thread::sleep(ms(400));
        assert_eq!(client.request(&get("/")).text(), "hello", "idle connection kept");

        // The header timeout off: a first request may take its time to start.
        let mut cfg = config();
        cfg.header_read_timeout = None;
        cfg.idle_timeout = Some(ms(100));
        let (handler, _) = app();
        let server = Server::start(handler, cfg);
        let mut client = Client::new(server.addr);
        std::thread::sleep(ms(400));
        client.send(b"GET / HTTP/1.1\r\n");
        std::thread::sleep(ms(200));
        assert_eq!(client.request(b"Host: t\r\n\r\n").text(), "hello");
        Ok(())
    }
}

in_every_runtime! {
    fn timeouts_are_set_from_the_environment() -> io::Result<()> {
        // Config::from_env is unit-tested; here the parsed value drives a real connection.
        std::env::set_var("SERVICEGROUP_HEADER_READ_TIMEOUT_MS", "150");
        let parsed = servicegroup::Config::from_env();
        std::env::remove_var("SERVICEGROUP_HEADER_READ_TIMEOUT_MS");
        let mut cfg = config();
        cfg.header_read_timeout = parsed.expect("valid").header_read_timeout;
        let (handler, _) = app();
        let server = Server::start(handler, cfg);
        let mut stream = connect(server.addr);
        let start = Instant::now();
        stream.write_all(b"GET /")?;
        assert!(read_to_close(&mut stream).starts_with("HTTP/1.1 408 "));
        assert!(start.elapsed() >= at_least(ms(150)));
        Ok(())
    }
}
