//! Sends N requests one after another on one keep-alive connection, checking each answer.
//! For instruction counts under callgrind, where a load generator's timing does not matter.
//!
//! Usage: requests PORT N

use std::io::{Read, Write};
use std::net::TcpStream;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args[1].parse().unwrap();
    let n: usize = args[2].parse().unwrap();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_nodelay(true).unwrap();
    let mut buf = [0u8; 4096];
    for _ in 0..n {
        stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n").unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"hello") {
            let k = stream.read(&mut buf).unwrap();
            assert!(k > 0, "closed early");
            got.extend_from_slice(&buf[..k]);
        }
    }
}
