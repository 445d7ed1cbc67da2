//! Opens N keep-alive connections, sends one request on each and reads its response, prints
//! `ready N` and then holds them all open until stdin closes.
//!
//! Usage: idle_clients PORT N

use std::io::{Read, Write};
use std::net::TcpStream;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args[1].parse().unwrap();
    let n: usize = args[2].parse().unwrap();
    let mut streams = Vec::with_capacity(n);
    let mut served = 0;
    for _ in 0..n {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n").unwrap();
        let mut buf = [0u8; 512];
        let mut got = Vec::new();
        while !got.ends_with(b"hello") {
            let k = stream.read(&mut buf).unwrap();
            assert!(k > 0, "closed early");
            got.extend_from_slice(&buf[..k]);
        }
        served += usize::from(got.starts_with(b"HTTP/1.1 200"));
        streams.push(stream);
    }
    println!("ready {served}");
    std::io::stdout().flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(streams);
}
