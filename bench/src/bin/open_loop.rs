//! An open-loop load generator: requests are sent at a fixed total rate over N keep-alive
//! connections whether or not earlier responses have arrived (pipelining when the server
//! lags), and each latency is measured from the request's *scheduled* send time, so a
//! stalled server is charged for every request it delayed (no coordinated omission).
//!
//! `open_loop PORT RATE CONNECTIONS SECONDS` prints one line:
//! `sent=N done=N p50_us=.. p99_us=.. p999_us=.. max_us=..`. One thread, non-blocking
//! sockets, `ppoll` to sleep until the next send or a response.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// The request every connection sends.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

/// Every server here answers `hello`; a response ends with its body.
const END: &[u8] = b"\r\n\r\nhello";

/// One connection and the scheduled send times of its requests still unanswered.
struct Conn {
    stream: TcpStream,
    pending: VecDeque<Instant>,
    /// Bytes of `END` matched at the end of the last read.
    matched: usize,
    /// Requests due but not yet written (the socket was full).
    out: Vec<u8>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: f64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let port = arg(1, 3000.0) as u16;
    let rate = arg(2, 10_000.0);
    let n = arg(3, 64.0) as usize;
    let seconds = arg(4, 5.0);
    let mut conns: Vec<Conn> = (0..n)
        .map(|_| {
            let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            stream.set_nodelay(true).unwrap();
            stream.set_nonblocking(true).unwrap();
            Conn { stream, pending: VecDeque::new(), matched: 0, out: Vec::new() }
        })
        .collect();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(seconds);
    let mut next = start;
    let mut turn = 0;
    let mut sent = 0u64;
    let mut latencies: Vec<u32> = Vec::with_capacity((rate * seconds) as usize + 16);
    let mut buf = vec![0u8; 64 * 1024];
    let mut fds: Vec<libc::pollfd> =
        conns.iter().map(|c| libc::pollfd { fd: c.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    loop {
        let now = Instant::now();
        // Send every request whose time has come, round robin over the connections.
        while next <= now && next < end {
            let c = &mut conns[turn];
            turn = (turn + 1) % n;
            c.pending.push_back(next);
            c.out.extend_from_slice(REQUEST);
            sent += 1;
            next += interval;
        }
        for (c, fd) in conns.iter_mut().zip(&mut fds) {
            while !c.out.is_empty() {
                match c.stream.write(&c.out) {
                    Ok(k) => drop(c.out.drain(..k)),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("write: {e}"),
                }
            }
            fd.events = if c.out.is_empty() { libc::POLLIN } else { libc::POLLIN | libc::POLLOUT };
        }
        let waiting: usize = conns.iter().map(|c| c.pending.len()).sum();
        if next >= end && waiting == 0 {
            break;
        }
        if Instant::now() > end + Duration::from_secs(10) {
            eprintln!("open_loop: {waiting} responses never came");
            break;
        }
        // Sleep until the next send, or until a socket has something.
        let wait = if next < end { next.saturating_duration_since(Instant::now()) } else { Duration::from_millis(10) };
        let ts =
            libc::timespec { tv_sec: wait.as_secs() as libc::time_t, tv_nsec: wait.subsec_nanos() as libc::c_long };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures for the call's duration.
        unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, &ts, std::ptr::null()) };
        let now = Instant::now();
        for (c, fd) in conns.iter_mut().zip(&fds) {
            if fd.revents & libc::POLLIN == 0 {
                continue;
            }
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => panic!("the server closed a connection"),
                    Ok(k) => {
                        for &b in &buf[..k] {
                            c.matched = if b == END[c.matched] {
                                c.matched + 1
                            } else if b == END[0] {
                                1
                            } else {
                                0
                            };
                            if c.matched == END.len() {
                                c.matched = 0;
                                let scheduled = c.pending.pop_front().expect("a response to a request sent");
                                let us = now.saturating_duration_since(scheduled).as_micros();
                                if now >= start {
                                    latencies.push(us.min(u128::from(u32::MAX)) as u32);
                                }
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read: {e}"),
                }
            }
        }
    }
    latencies.sort_unstable();
    let q = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "sent={sent} done={} p50_us={} p99_us={} p999_us={} max_us={}",
        latencies.len(),
        q(0.50),
        q(0.99),
        q(0.999),
        latencies.last().copied().unwrap_or(0)
    );
}
