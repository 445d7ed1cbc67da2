//! Real signals to the example server, run as a child process.

mod common;

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::process::Example;
use common::{eventually, read_to_close};

/// `SERVICEGROUP_THREADS` for the example: its own threads (the default), or none.
const THREADS: [&str; 2] = ["2", "0"];

fn graceful(signal: &str) -> io::Result<()> {
    for threads in THREADS {
        graceful_with(signal, threads)?;
    }
    Ok(())
}

fn graceful_with(signal: &str, threads: &str) -> io::Result<()> {
    let mut example = Example::start("", &[("SERVICEGROUP_THREADS", threads)]);
    let mut stream = example.start_work(800);
    example.signal(signal);
    let text = read_to_close(&mut stream);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("connection: close\r\n") && text.ends_with("worked for 800 ms\n"), "{text}");
    let status = example.wait(common::PATIENCE);
    let log = example.log();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains(&format!("received SIG{signal}")), "{log}");
    assert!(log.contains("service server: drained 1 connection(s) in"), "{log}");
    Ok(())
}

#[test]
fn sigterm_drains_requests_in_flight_and_exits_0() -> io::Result<()> {
    graceful("TERM")
}

#[test]
fn sigint_drains_requests_in_flight_and_exits_0() -> io::Result<()> {
    graceful("INT")
}

#[test]
fn a_second_signal_during_the_drain_exits_at_once() -> io::Result<()> {
    for ((signal, number), threads) in [("INT", 2), ("TERM", 15)].into_iter().zip(THREADS) {
        let mut example = Example::start("", &[("SERVICEGROUP_THREADS", threads)]);
        let _stream = example.start_work(20_000);
        example.signal(signal);
        eventually("the first signal is handled", || example.metric("servicegroup_shutting_down 1\n"));
        let start = Instant::now();
        example.signal(signal);
        let status = example.wait(common::PATIENCE);
        assert_eq!(status.signal(), Some(number), "ended by the signal's default action: {status:?}");
        assert!(start.elapsed() < Duration::from_secs(10), "did not wait for the 20 s request");
        assert!(example.log().contains("during the drain; exiting now"), "{}", example.log());
    }
    Ok(())
}

#[test]
fn a_bad_environment_value_is_reported_and_the_exit_is_nonzero() -> io::Result<()> {
    let output = std::process::Command::new(common::process::example_server())
        .env("SERVICEGROUP_WRITE_TIMEOUT_MS", "soon")
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SERVICEGROUP_WRITE_TIMEOUT_MS") && stderr.contains("soon"), "{stderr}");
    Ok(())
}
