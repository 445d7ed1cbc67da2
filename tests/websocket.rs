//! The example server's `/ws` against a real, independent WebSocket client: Python's
//! `websockets` package (installed by `.ci/run`). Messages of every kind echo back, and a
//! SIGTERM closes the socket with 1001 "going away" before the server exits 0.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::process::Example;
use common::PATIENCE;

/// The client: echoes, then reports `READY` and waits for the server to close.
const CLIENT: &str = r#"
import os, sys
from websockets.sync.client import connect
from websockets.exceptions import ConnectionClosed

with connect(sys.argv[1], max_size=4 * 2**20, open_timeout=20, close_timeout=20) as ws:
    ws.send("hello, servicegroup")
    assert ws.recv(timeout=20) == "hello, servicegroup"
    ws.send("")
    assert ws.recv(timeout=20) == ""
    ws.send(bytes([0, 1, 2, 255]))
    assert ws.recv(timeout=20) == bytes([0, 1, 2, 255])
    big = os.urandom(2**20)
    ws.send(big)
    assert ws.recv(timeout=20) == big, "the 1 MiB message came back changed"
    ws.ping().wait(timeout=20)
    print("READY", flush=True)
    try:
        message = ws.recv(timeout=20)
        print("UNEXPECTED", repr(message)[:80], flush=True)
    except ConnectionClosed as closed:
        print("CLOSED", closed.rcvd.code, closed.rcvd.reason, flush=True)
"#;

/// Runs the client against a fresh example server with `threads`, SIGTERMs the server once
/// the client has echoed everything; returns what the client printed after `READY`.
fn echo_then_terminate(threads: &str) -> String {
    let mut example = Example::start("", &[("SERVICEGROUP_THREADS", threads)]);
    let url = format!("ws://{}/ws", example.addr);
    let mut client = Command::new("python3")
        .args(["-c", CLIENT, &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    let first = lines.next().map(|l| l.unwrap()).unwrap_or_default();
    assert_eq!(
        first, "READY",
        "the client failed before the drain (see its stderr; `pip install websockets` if it is missing, .ci/run does)"
    );
    example.signal("TERM");
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(client.wait().unwrap().success(), "the client failed: {rest:?}");
    let status = example.wait(PATIENCE);
    assert!(status.success(), "the server exited with {status}:\n{}", example.log());
    assert!(example.log().contains("drained"), "{}", example.log());
    rest.join("\n")
}

#[test]
fn python_websockets_echoes_and_sees_going_away_on_sigterm() {
    for threads in ["2", "0"] {
        let said = echo_then_terminate(threads);
        assert_eq!(said, "CLOSED 1001 server shutting down", "with SERVICEGROUP_THREADS={threads}");
    }
}

#[test]
fn a_plain_get_to_the_websocket_route_is_refused_with_a_reason() {
    let example = Example::start("", &[]);
    let mut client = common::Client::new(example.addr);
    let response = client.request(&common::get("/ws"));
    assert_eq!(response.status, 400);
    assert!(response.text().contains("Sec-WebSocket-Key"), "{}", response.text());
    // A wrong version: 426 naming the one spoken (RFC 6455 §4.4).
    let handshake = b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n";
    let response = client.request(handshake);
    assert_eq!(response.status, 426);
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
    // RFC 6455 §1.3's sample key, and the accept value it must give.
    let handshake = b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let response = client.request(handshake);
    assert_eq!(response.status, 101);
    assert_eq!(response.header("sec-websocket-accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
}
