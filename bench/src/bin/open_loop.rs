//! An open-loop load generator: requests are sent at a fixed total rate over N keep-alive
//! connections whether or not earlier responses have arrived (pipelining when the server
//! lags), and each latency is measured from the request's *scheduled* send time, so a
//! stalled server is charged for every request it delayed (no coordinated omission).
//!
//! `open_loop PORT RATE CONNECTIONS SECONDS` prints one line:
//! `sent=N done=N p50_us=.. p99_us=.. p999_us=.. max_us=..`. One thread, non-blocking
//! sockets, `ppoll` to sleep until the next send or a response.
//!
//! Diagnostics: `CLOSED=1` makes it a closed loop instead (each connection sends its next
//! request as soon as its last response arrives; RATE is ignored; latency from each send),
//! and `SPLIT=K` also prints, to stderr, the percentiles of each group of connections
//! `i % K` (a server that places connections on its K threads in turn puts group k on
//! thread k): whether a tail belongs to one thread's connections or to all.

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
    /// Its latencies, in µs, with `SPLIT` set.
    latencies: Vec<u32>,
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
            Conn { stream, pending: VecDeque::new(), matched: 0, out: Vec::new(), latencies: Vec::new() }
        })
        .collect();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(seconds);
    let closed = std::env::var("CLOSED").is_ok_and(|v| v == "1");
    let split: usize = std::env::var("SPLIT").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    // A closed loop sends each connection's first request at the start, the others on answers.
    let mut next = if closed { end } else { start };
    let mut turn = 0;
    let mut sent = 0u64;
    if closed {
        std::thread::sleep(start.saturating_duration_since(Instant::now()));
        for c in &mut conns {
            c.pending.push_back(Instant::now());
            c.out.extend_from_slice(REQUEST);
            sent += 1;
        }
    }
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
                                    let us = us.min(u128::from(u32::MAX)) as u32;
                                    latencies.push(us);
                                    if split > 0 {
                                        c.latencies.push(us);
                                    }
                                }
                                if closed && now < end {
                                    c.pending.push_back(now);
                                    c.out.extend_from_slice(REQUEST);
                                    sent += 1;
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
    for group in 0..split {
        let mut of: Vec<u32> = conns
            .iter()
            .enumerate()
            .filter(|(i, _)| i % split == group)
            .flat_map(|(_, c)| c.latencies.clone())
            .collect();
        of.sort_unstable();
        let (p50, p90, p99, p999) = (q(&of, 0.5), q(&of, 0.9), q(&of, 0.99), q(&of, 0.999));
        eprintln!("group {group}: done={} p50_us={p50} p90_us={p90} p99_us={p99} p999_us={p999}", of.len());
    }
    latencies.sort_unstable();
    let q = |p: f64| q(&latencies, p);
    println!(
        "sent={sent} done={} p50_us={} p99_us={} p999_us={} max_us={}",
        latencies.len(),
        q(0.50),
        q(0.99),
        q(0.999),
        latencies.last().copied().unwrap_or(0)
    );
}

/// The `p` quantile of sorted latencies (0 if none).
fn q(sorted: &[u32], p: f64) -> u32 {
    sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or(0)
}
