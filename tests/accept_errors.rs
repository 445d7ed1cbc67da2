//! Accept errors never end the server: run the example with few file descriptors, exhaust
//! them, and watch it back off, then recover.

mod common;

use std::io;

use common::process::Example;
use common::{connect, eventually, exchange};

#[test]
fn running_out_of_file_descriptors_backs_off_and_recovers() -> io::Result<()> {
    let example = Example::start("ulimit -n 32 &&", &[("SERVICEGROUP_DEBUG_ADDR", "off")]);
    // Far more connections than the server has descriptors for; they sit idle.
    let idle: Vec<_> = (0..60).map(|_| connect(example.addr)).collect();
    eventually("accept fails and backs off", || {
        let log = example.log();
        log.contains("accept failed") && log.contains("retrying in 5ms") && log.contains("retrying in 10ms")
    });
    drop(idle);
    // Once descriptors are free again, service resumes.
    eventually("a request is served again", || {
        let text = exchange(example.addr, b"GET /ping HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        text.ends_with("pong")
    });
    Ok(())
}
