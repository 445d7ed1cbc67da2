//! The example server's routes, run as a child process the way a user runs it.

mod common;

use std::io::{self, Write};

use common::process::Example;
use common::Client;

#[test]
fn the_example_server_serves_its_routes() -> io::Result<()> {
    let example = Example::start("", &[("SERVICEGROUP_DEBUG_ADDR", "off")]);
    let mut client = Client::new(example.addr);
    let table: [(&[u8], u16, &str); 4] = [
        (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", 200, "hello"),
        (b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n", 200, "pong"),
        (b"GET /work?ms=10 HTTP/1.1\r\nHost: t\r\n\r\n", 200, "worked for 10 ms\n"),
        (b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n", 404, "not found\n"),
    ];
    for (request, status, body) in table {
        let response = client.request(request);
        assert_eq!((response.status, response.text().as_str()), (status, body));
    }
    client.send(b"HEAD /ping HTTP/1.1\r\nHost: t\r\n\r\n");
    let head = client.head_response();
    assert_eq!((head.status, head.header("content-length")), (200, Some("4")));
    for (request, allow) in [
        (&b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"[..], "GET, HEAD"),
        (b"DELETE /work HTTP/1.1\r\nHost: t\r\n\r\n", "GET, HEAD"),
        (b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n", "POST"),
    ] {
        let response = client.request(request);
        assert_eq!((response.status, response.header("allow")), (405, Some(allow)));
    }
    assert_eq!(client.request(b"GET /work?ms=x HTTP/1.1\r\nHost: t\r\n\r\n").status, 400);

    // POST /echo streams any size back, chunked uploads included.
    let body: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let mut request = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for chunk in body.chunks(65_536) {
        request.extend(format!("{:x}\r\n", chunk.len()).bytes());
        request.extend(chunk);
        request.extend(b"\r\n");
    }
    request.extend(b"0\r\n\r\n");
    let mut writer = client.stream.try_clone()?;
    let sending = std::thread::spawn(move || writer.write_all(&request));
    let response = client.response();
    sending.join().unwrap()?;
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert!(response.body == body, "echo differs");
    Ok(())
}
