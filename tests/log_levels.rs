//! What the crate logs on its own, above trace: one line at start, one per served profile,
//! one when the drain is done; nothing per request. Alone in its binary: the logger is
//! process-wide.

mod common;

use std::io;

use common::logs;
use common::{app, config, get, Client, Server};

#[test]
fn start_profile_and_drain_log_one_info_line_each_and_requests_none() -> io::Result<()> {
    logs::install(log::LevelFilter::Trace);
    let (handler, _) = app();
    let mut cfg = config();
    cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
    let server = Server::start(handler, cfg);
    let (addr, debug) = (server.addr, server.debug_addr.unwrap());
    let mut client = Client::new(addr);
    for _ in 0..10 {
        assert_eq!(client.request(&get("/")).text(), "hello");
    }
    drop(client);
    let profile = Client::new(debug).request(&get("/debug/pprof/profile?seconds=1"));
    assert_eq!(profile.status, if cfg!(feature = "pprof") { 200 } else { 501 });
    server.stop().map_err(io::Error::other)?;

    let ours: Vec<logs::Record> =
        logs::records().into_iter().filter(|r| r.target.starts_with("servicegroup")).collect();
    let info: Vec<&str> = ours.iter().filter(|r| r.level <= log::Level::Info).map(|r| r.message.as_str()).collect();
    let mut expected = vec![format!("serving http://{addr} (debug server on http://{debug}; 2 thread(s))")];
    if cfg!(feature = "pprof") {
        assert!(info.iter().any(|m| m.starts_with("served a 1.0 s CPU profile (")), "{info:#?}");
        expected.push(info.iter().find(|m| m.starts_with("served a ")).unwrap().to_string());
    }
    assert!(info.last().is_some_and(|m| m.starts_with("service server: drained ")), "{info:#?}");
    expected.push(info.last().unwrap().to_string());
    assert_eq!(info, expected, "info and above, in order");
    // Per request, only trace (the access log is off).
    let debug_lines: Vec<&str> =
        ours.iter().filter(|r| r.level == log::Level::Debug).map(|r| r.message.as_str()).collect();
    assert!(debug_lines.iter().all(|m| !m.contains("GET") && !m.contains("accepted")), "{debug_lines:#?}");
    Ok(())
}
