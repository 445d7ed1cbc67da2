//! Sends N requests one after another on one keep-alive connection, checking each answer.
//! For instruction counts under callgrind, where a load generator's timing does not matter.
//!
//! Usage: requests PORT N [DEPTH]: with DEPTH (default 1), requests go DEPTH to a write
//! (pipelined, as `wrk -s pipeline.lua` sends them) and N counts writes. DEPTH `close`: N
//! connections one after another, each sending one request with `Connection: close` and
//! reading until the server closes (as `wrk -H 'Connection: close'` loads them).

use std::io::{Read, Write};
use std::net::TcpStream;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args[1].parse().unwrap();
    let n: usize = args[2].parse().unwrap();
    let mut buf = [0u8; 4096];
    if args.get(3).map(String::as_str) == Some("close") {
        for _ in 0..n {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            stream.set_nodelay(true).unwrap();
            stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").unwrap();
            let mut got = Vec::new();
            loop {
                let k = stream.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..k]);
            }
            assert!(got.ends_with(b"hello"), "no answer before the close");
        }
        return;
    }
    let depth: usize = args.get(3).map_or(1, |d| d.parse().unwrap());
    let batch = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n".repeat(depth);
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_nodelay(true).unwrap();
    for _ in 0..n {
        stream.write_all(&batch).unwrap();
        let mut got = Vec::new();
        while got.windows(5).filter(|w| w == b"hello").count() < depth {
            let k = stream.read(&mut buf).unwrap();
            assert!(k > 0, "closed early");
            got.extend_from_slice(&buf[..k]);
        }
    }
}
