//! What an operator reads: the access log (captured by a test logger, field by field) and
//! the live connections view on the debug server, in HTML and JSON.

#[macro_use]
mod common;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::logs;
use common::{app, config, connect, eventually, get, read_to_close, Client, Server};
use servicegroup::Config;

/// The test app with the access log on, after `configure`.
fn logged_server(configure: impl FnOnce(&mut Config)) -> Server {
    logs::install(log::LevelFilter::Info);
    let (handler, _) = app();
    let mut cfg = config();
    cfg.access_log = true;
    configure(&mut cfg);
    Server::start(handler, cfg)
}

/// The one access-log line for the connection from `peer`, once it is written.
fn the_line(peer: SocketAddr) -> String {
    eventually("the access-log line is written", || !logs::access_lines(peer).is_empty());
    let lines = logs::access_lines(peer);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    lines[0].clone()
}

/// The value of `name=` in a logfmt line (quoted values unquoted, escapes left as they are).
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line
        .find(&format!(" {name}="))
        .map(|i| i + name.len() + 2)
        .or_else(|| line.starts_with(&format!("{name}=")).then_some(name.len() + 1))?;
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        return quoted.find('"').map(|end| &quoted[..end]);
    }
    Some(rest.split(' ').next().unwrap_or(""))
}

/// Asserts the line's fields, and that `duration_us` is a number.
fn assert_fields(line: &str, expected: &[(&str, Option<&str>)]) {
    for (name, value) in expected {
        assert_eq!(field(line, name), *value, "{name} in {line}");
    }
    let micros = field(line, "duration_us").expect("duration_us");
    assert!(micros.parse::<u64>().is_ok(), "{line}");
}

in_every_runtime! {
    fn a_normal_exchange_is_logged_field_by_field() -> io::Result<()> {
        let server = logged_server(|_| {});
        let mut client = Client::over(logs::connect_as_new_peer(server.addr));
        let peer = client.stream.local_addr()?;
        assert_eq!(client.request(&get("/?q=1&r=2")).text(), "hello");
        let line = the_line(peer);
        assert_fields(&line, &[
            ("peer", Some(&peer.to_string())),
            ("method", Some("GET")),
            ("path", Some("/?q=1&r=2")),
            ("version", Some("HTTP/1.1")),
            ("status", Some("200")),
            ("bytes", Some("5")),
            ("end", None),
        ]);
        assert!(!line.to_ascii_lowercase().contains("host"), "no headers in the log: {line}");
        Ok(())
    }
}

in_every_runtime! {
    fn a_header_read_timeout_is_logged_as_408() -> io::Result<()> {
        let server = logged_server(|c| c.header_read_timeout = Some(Duration::from_millis(200)));
        let mut stream = logs::connect_as_new_peer(server.addr);
        let peer = stream.local_addr()?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")?;
        assert!(read_to_close(&mut stream).starts_with("HTTP/1.1 408 "));
        let line = the_line(peer);
        assert_fields(&line, &[
            ("method", Some("-")),
            ("path", Some("-")),
            ("status", Some("408")),
            ("bytes", Some("0")),
            ("end", Some("header_read_timeout")),
        ]);
        Ok(())
    }
}

in_every_runtime! {
    fn a_write_timeout_is_logged_as_503() -> io::Result<()> {
        let server = logged_server(|c| c.write_timeout = Some(Duration::from_millis(200)));
        let mut stream = logs::connect_as_new_peer(server.addr);
        let peer = stream.local_addr()?;
        stream.write_all(&get("/sleep?ms=5000"))?;
        assert!(read_to_close(&mut stream).starts_with("HTTP/1.1 503 "));
        let line = the_line(peer);
        assert_fields(&line, &[
            ("path", Some("/sleep?ms=5000")),
            ("status", Some("503")),
            ("end", Some("write_timeout")),
        ]);
        Ok(())
    }
}

in_every_runtime! {
    fn a_panicking_handler_is_logged_as_500() -> io::Result<()> {
        let server = logged_server(|_| {});
        let mut stream = logs::connect_as_new_peer(server.addr);
        let peer = stream.local_addr()?;
        stream.write_all(&get("/panic"))?;
        assert!(read_to_close(&mut stream).starts_with("HTTP/1.1 500 "));
        let line = the_line(peer);
        assert_fields(&line, &[("path", Some("/panic")), ("status", Some("500")), ("end", Some("panic"))]);
        Ok(())
    }
}

in_every_runtime! {
    fn a_client_gone_mid_response_is_logged_with_what_was_sent() -> io::Result<()> {
        let server = logged_server(|_| {});
        let mut stream = logs::connect_as_new_peer(server.addr);
        let peer = stream.local_addr()?;
        stream.write_all(&get("/big-stream?bytes=200000000"))?;
        let mut first = [0u8; 64 * 1024];
        stream.read_exact(&mut first)?;
        drop(stream);
        let line = the_line(peer);
        assert_fields(&line, &[("path", Some("/big-stream?bytes=200000000")), ("status", Some("200")), ("end", Some("client_gone"))]);
        let bytes: u64 = field(&line, "bytes").unwrap().parse().unwrap();
        assert!(bytes > 0 && bytes < 200_000_000, "{line}");
        Ok(())
    }
}

in_every_runtime! {
    fn an_exchange_cut_by_the_shutdown_deadline_is_logged_as_cut() -> io::Result<()> {
        let server = logged_server(|c| c.shutdown_timeout = Duration::from_millis(100));
        let mut stream = logs::connect_as_new_peer(server.addr);
        let peer = stream.local_addr()?;
        stream.write_all(&get("/sleep?ms=60000"))?;
        std::thread::sleep(Duration::from_millis(100));
        assert!(server.stop().is_err(), "the deadline cut a connection");
        let line = the_line(peer);
        assert_fields(&line, &[("path", Some("/sleep?ms=60000")), ("status", Some("-")), ("end", Some("cut"))]);
        Ok(())
    }
}

in_every_runtime! {
    fn nothing_is_logged_with_the_access_log_off() -> io::Result<()> {
        logs::install(log::LevelFilter::Info);
        let (handler, _) = app();
        let server = Server::start(handler, config());
        let mut client = Client::over(logs::connect_as_new_peer(server.addr));
        let peer = client.stream.local_addr()?;
        assert_eq!(client.request(&get("/")).text(), "hello");
        drop(client);
        server.stop().map_err(io::Error::other)?;
        let ours = logs::access_lines(peer);
        assert!(ours.is_empty(), "{ours:?}");
        Ok(())
    }
}

/// A server with the debug server on.
fn debug_server() -> Server {
    let (handler, _) = app();
    let mut cfg = config();
    cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
    Server::start(handler, cfg)
}

/// GET `path` from the debug server; the body.
fn debug_get(server: &Server, path: &str) -> String {
    let response = Client::new(server.debug_addr.unwrap()).request(&get(path));
    assert_eq!(response.status, 200, "{path}: {}", response.text());
    response.text()
}

in_every_runtime! {
    fn the_connections_view_shows_a_request_parked_in_its_handler() -> io::Result<()> {
        let server = debug_server();
        let mut idle = Client::new(server.addr);
        assert_eq!(idle.request(&get("/")).text(), "hello");
        let idle_peer = idle.stream.local_addr()?;
        let mut busy = connect(server.addr);
        let busy_peer = busy.local_addr()?;
        busy.write_all(&get("/sleep?ms=3000"))?;
        let row = |json: &str, peer: SocketAddr| -> Option<String> {
            let start = json.find(&format!("{{\"peer\":\"{peer}\""))?;
            Some(json[start..start + json[start..].find('}')? + 1].to_string())
        };
        eventually("the slow request shows in the view", || {
            row(&debug_get(&server, "/debug/connections?format=json"), busy_peer)
                .is_some_and(|r| r.contains("\"request\":\"GET /sleep?ms=3000\""))
        });
        let json = debug_get(&server, "/debug/connections?format=json");
        let busy_row = row(&json, busy_peer).unwrap();
        assert!(busy_row.contains("\"phase\":\"in handler\"") && busy_row.contains("\"requests\":1"), "{busy_row}");
        let idle_row = row(&json, idle_peer).expect("the idle connection is listed");
        assert!(idle_row.contains("\"phase\":\"idle\"") && idle_row.contains("\"request\":null"), "{idle_row}");
        assert!(json.starts_with("{\"total\":2,\"shown\":2,\"draining\":false,\"phases\":{\"idle\":1,"), "{json}");
        assert!(json.contains("\"in handler\":1"), "{json}");
        let html = debug_get(&server, "/debug/connections");
        let busy_html = format!("<tr><td>{busy_peer}</td><td>in handler</td><td>GET /sleep?ms=3000</td>");
        assert!(html.contains(&busy_html), "{html}");
        assert!(html.contains(&format!("<tr><td>{idle_peer}</td><td>idle</td><td></td>")), "{html}");
        assert!(!html.contains("<script"), "readable without JavaScript");
        // The debug server's own connections are not listed.
        assert!(!json.contains(&server.debug_addr.unwrap().to_string()));
        Ok(())
    }
}

#[test]
fn the_connections_view_is_capped_at_1000_rows_with_totals_for_all() -> io::Result<()> {
    let server = debug_server();
    let open: Vec<std::net::TcpStream> = (0..2000).map(|_| connect(server.addr)).collect();
    eventually("every connection is accepted", || {
        debug_get(&server, "/debug/connections?format=json").starts_with("{\"total\":2000,")
    });
    let json = debug_get(&server, "/debug/connections?format=json");
    assert!(json.starts_with("{\"total\":2000,\"shown\":1000,"), "{}", &json[..200]);
    assert!(json.contains("\"phases\":{\"idle\":2000,"), "{}", &json[..200]);
    assert_eq!(json.matches("{\"peer\":").count(), 1000);
    let html = debug_get(&server, "/debug/connections");
    assert!(html.contains("Showing the first 1000 of 2000."));
    assert_eq!(html.matches("<tr><td>").count(), 1000);
    drop(open);
    Ok(())
}

#[test]
fn the_debug_index_lists_every_route_with_a_line() -> io::Result<()> {
    let (handler, _) = app();
    let mut cfg = config();
    cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
    let mut group = servicegroup::Group::new(handler, cfg).expect("bind");
    group.debug_route("/debug/cache", "entries in the <cache>", |_req| async {
        servicegroup::http::Response::new(servicegroup::Body::from("42"))
    });
    let server = Server::from_group(group);
    let index = debug_get(&server, "/debug/pprof/");
    for route in [
        "/debug/pprof/profile",
        "/debug/pprof/flamegraph",
        "/debug/pprof/cmdline",
        "/debug/connections",
        "/metrics",
        "/debug/vars",
        "/healthz",
        "/readyz",
    ] {
        let line = index
            .lines()
            .find(|l| l.contains(&format!(">{route}")))
            .unwrap_or_else(|| panic!("{route} missing:\n{index}"));
        assert!(line.contains("</a>: ") && line.len() > route.len() * 2 + 30, "{line}");
    }
    assert!(index.contains("<a href=\"/debug/cache\">/debug/cache</a>: entries in the &lt;cache&gt;</li>"), "{index}");
    Ok(())
}
