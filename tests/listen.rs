//! Where listeners come from: Unix socket paths (stale files replaced, live ones refused,
//! files removed after `run`), Linux abstract sockets, and listeners the caller bound
//! (std and async-net), served like an address the group binds.

mod common;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use common::{app, config, Server, PATIENCE};
use servicegroup::{Addr, Group};

/// A fresh directory for one test's socket files.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sg-listen-{}-{test}-{:?}", std::process::id(), common::runtime()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The config for serving at Unix socket `path`.
fn unix_config(path: &Path) -> servicegroup::Config {
    let mut cfg = config();
    cfg.addr = format!("unix:{}", path.display()).parse().expect("a unix: address");
    cfg
}

/// Sends `request` over `stream` and reads until the server closes.
fn exchange(mut stream: impl Read + Write, request: &[u8]) -> String {
    stream.write_all(request).expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

/// A Unix connection with a read timeout as a safety net.
fn unix_connect(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// GET / with `Connection: close`.
const GET_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";

in_every_runtime! {
    fn a_unix_socket_serves_and_its_file_is_removed_when_run_returns() -> io::Result<()> {
        let dir = temp_dir("serve");
        let path = dir.join("app.sock");
        let (handler, _) = app();
        let server = Server::start(handler, unix_config(&path));
        assert_eq!(server.bound.to_string(), format!("unix:{}", path.display()));
        assert!(server.bound.tcp().is_none());
        let response = exchange(unix_connect(&path), GET_CLOSE);
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\nhello"), "{response}");
        assert!(path.exists());
        server.stop().expect("clean shutdown");
        assert!(!path.exists(), "the socket file is removed when run returns");
        Ok(())
    }
}

in_every_runtime! {
    fn a_stale_socket_file_is_replaced() -> io::Result<()> {
        let dir = temp_dir("stale");
        let path = dir.join("app.sock");
        // A process that crashed leaves its socket file behind, and nothing accepts on it.
        drop(std::os::unix::net::UnixListener::bind(&path)?);
        assert!(path.exists());
        assert_eq!(UnixStream::connect(&path).unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
        let (handler, _) = app();
        let server = Server::start(handler, unix_config(&path));
        assert!(exchange(unix_connect(&path), GET_CLOSE).ends_with("hello"));
        server.stop().expect("clean shutdown");
        assert!(!path.exists());
        Ok(())
    }
}

#[test]
fn a_live_socket_file_is_an_error_that_says_so_and_is_left_alone() -> io::Result<()> {
    let dir = temp_dir("live");
    let path = dir.join("app.sock");
    let live = std::os::unix::net::UnixListener::bind(&path)?;
    let (handler, _) = app();
    let err = Group::new(handler, unix_config(&path)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("another process is accepting connections on this socket"), "{text}");
    assert!(text.contains(&format!("unix:{}", path.display())), "names the address: {text}");
    assert!(text.contains("service server"), "{text}");
    // The live socket still works: nothing removed it.
    let client = UnixStream::connect(&path)?;
    let (_accepted, _) = live.accept()?;
    drop(client);
    Ok(())
}

#[test]
fn a_file_that_is_not_a_socket_is_an_error_and_is_kept() -> io::Result<()> {
    let dir = temp_dir("regular");
    let path = dir.join("app.sock");
    std::fs::write(&path, "precious")?;
    let (handler, _) = app();
    let text = Group::new(handler, unix_config(&path)).unwrap_err().to_string();
    assert!(text.contains("not a socket"), "{text}");
    assert_eq!(std::fs::read_to_string(&path)?, "precious");
    Ok(())
}

#[test]
fn the_debug_server_takes_a_unix_socket_and_unix_peers_show_as_the_socket_path() -> io::Result<()> {
    let dir = temp_dir("debug");
    let (service, debug) = (dir.join("app.sock"), dir.join("debug.sock"));
    let mut cfg = unix_config(&service);
    cfg.debug_addr = Some(format!("unix:{}", debug.display()).parse().unwrap());
    let (handler, _) = app();
    let group = Group::new(handler, cfg).expect("bind");
    assert_eq!(group.debug_addr().unwrap().to_string(), format!("unix:{}", debug.display()));
    let server = Server::from_group(group);
    // A keep-alive connection to the service stays open, and is listed by its socket.
    let mut open = unix_connect(&service);
    open.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut first = [0; 12];
    open.read_exact(&mut first)?;
    assert_eq!(&first, b"HTTP/1.1 200");
    let listing = exchange(
        unix_connect(&debug),
        b"GET /debug/connections?format=json HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    );
    assert!(listing.starts_with("HTTP/1.1 200 OK\r\n"), "{listing}");
    let expected = format!("\"peer\":\"unix:{}\"", service.display());
    assert!(listing.contains(&expected), "expected {expected} in {listing}");
    drop(open);
    server.stop().expect("clean shutdown");
    assert!(!service.exists() && !debug.exists(), "both socket files are removed");
    Ok(())
}

#[test]
fn curl_speaks_to_the_unix_socket() -> io::Result<()> {
    let dir = temp_dir("curl");
    let path = dir.join("app.sock");
    let (handler, _) = app();
    let server = Server::start(handler, unix_config(&path));
    let text = common::process::curl_unix(&path, "http://localhost/");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("hello"), "{text}");
    server.stop().expect("clean shutdown");
    Ok(())
}

#[test]
fn an_abstract_unix_socket_serves_without_a_file() -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("sg-listen-test-{}", std::process::id());
    let mut cfg = config();
    cfg.addr = format!("unix:@{name}").parse().unwrap();
    assert!(matches!(&cfg.addr, Addr::Abstract(n) if *n == name));
    let (handler, _) = app();
    let server = Server::start(handler, cfg);
    assert_eq!(server.bound.to_string(), format!("unix:@{name}"));
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let stream = UnixStream::connect_addr(&addr)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    assert!(exchange(stream, GET_CLOSE).ends_with("hello"));
    server.stop().expect("clean shutdown");
    assert!(UnixStream::connect_addr(&addr).is_err(), "gone once run returned");
    Ok(())
}

in_every_runtime! {
    fn listeners_the_caller_bound_serve_and_close_when_the_drain_starts() -> io::Result<()> {
        let service = std::net::TcpListener::bind("127.0.0.1:0")?;
        let service_addr = service.local_addr()?;
        let debug = smol::block_on(async_net::TcpListener::bind("127.0.0.1:0"))?;
        let debug_addr = debug.local_addr()?;
        let mut cfg = config();
        cfg.addr = service.into();
        cfg.debug_addr = Some(debug.into());
        assert_eq!(cfg.addr.to_string(), format!("listener on {service_addr}"));
        let (handler, _) = app();
        let server = Server::start(handler, cfg);
        assert_eq!(server.addr, service_addr);
        assert_eq!(server.debug_addr, Some(debug_addr));
        assert!(common::exchange(service_addr, GET_CLOSE).ends_with("hello"));
        let health = common::exchange(debug_addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
        server.stop().expect("clean shutdown");
        let refused = std::net::TcpStream::connect(service_addr).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused, "the group closed the listener it was given");
        Ok(())
    }
}

in_every_runtime! {
    fn an_async_net_unix_listener_serves() -> io::Result<()> {
        let dir = temp_dir("async-net-unix");
        let path = dir.join("app.sock");
        let listener = async_net::unix::UnixListener::bind(&path)?;
        let mut cfg = config();
        cfg.addr = listener.into();
        let (handler, _) = app();
        let server = Server::start(handler, cfg);
        assert_eq!(server.bound.to_string(), format!("unix:{}", path.display()));
        assert!(exchange(unix_connect(&path), GET_CLOSE).ends_with("hello"));
        server.stop().expect("clean shutdown");
        Ok(())
    }
}

#[test]
fn a_listener_serves_one_group_and_a_second_is_told_it_was_taken() -> io::Result<()> {
    let mut cfg = config();
    cfg.addr = std::net::TcpListener::bind("127.0.0.1:0")?.into();
    let copy = cfg.clone();
    let (handler, _) = app();
    let first = Group::new(handler, cfg).expect("the first group takes it");
    let (handler, _) = app();
    let text = Group::new(handler, copy).unwrap_err().to_string();
    assert!(text.contains("already taken by another Group"), "{text}");
    drop(first);
    Ok(())
}

#[test]
fn addresses_parse_and_display_the_same_way() {
    for text in ["127.0.0.1:8080", "[::1]:0", "unix:/run/app.sock", "unix:relative.sock", "unix:@name"] {
        assert_eq!(text.parse::<Addr>().unwrap().to_string(), text);
    }
    assert_eq!("localhost:81".parse::<Addr>().unwrap().to_string(), "127.0.0.1:81");
    for bad in ["unix:", "unix:@", "8080", "example.com:80"] {
        let text = bad.parse::<Addr>().unwrap_err().to_string();
        assert!(text.contains(bad), "{text}");
    }
}

/// Serves `tag` on every path but `/hold`, which counts itself in `holding` and waits for
/// `gate` to close.
fn tagged(
    tag: &'static str,
    holding: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    gate: smol::channel::Receiver<()>,
) -> impl servicegroup::Handler {
    move |req: servicegroup::http::Request<servicegroup::Body>| {
        let (holding, gate) = (holding.clone(), gate.clone());
        async move {
            if req.uri().path() == "/hold" && tag == "a" {
                holding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = gate.recv().await;
            }
            servicegroup::http::Response::new(servicegroup::Body::from(tag))
        }
    }
}

#[test]
fn a_reuse_port_listener_serves_its_backlog_when_it_closes_instead_of_resetting_it() -> io::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (release, gate) = smol::channel::bounded::<()>(1);
    let holding = Arc::new(AtomicUsize::new(0));
    // A admits one connection at a time: while one is held, new ones wait in its backlog.
    let mut cfg = config();
    cfg.reuse_port = true;
    cfg.max_connections = Some(1);
    let a = Server::start(tagged("a", holding.clone(), gate.clone()), cfg);
    let mut cfg = config();
    cfg.reuse_port = true;
    cfg.addr = a.addr.into();
    let b = Server::start(tagged("b", holding.clone(), gate), cfg);
    assert_eq!(b.addr, a.addr, "both on one port");

    // Hold A's one connection: Linux spreads connections between A and B by their ports, so
    // open connections until A has one (B answers /hold at once).
    let mut held = None;
    while held.is_none() {
        let mut stream = common::connect(a.addr);
        stream.write_all(b"GET /hold HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
        stream.set_nonblocking(true)?;
        let mut first = [0; 1];
        loop {
            if holding.load(Ordering::SeqCst) == 1 {
                held = Some(stream);
                break;
            }
            match stream.read(&mut first) {
                Ok(_) => break, // B answered; try another connection
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => return Err(e),
            }
        }
    }
    let mut held = held.unwrap();
    held.set_nonblocking(false)?;

    // Twenty more: those that land on A wait in its backlog (B answers its own at once).
    let mut waiting = Vec::new();
    for _ in 0..20 {
        let mut stream = common::connect(a.addr);
        stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
        waiting.push(stream);
    }
    // A drains: its listener closes with that backlog queued on it.
    a.shutdown.start();
    let mut from_a = 0;
    for mut stream in waiting {
        let response = common::read_to_close(&mut stream);
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "a queued connection was lost: {response:?}");
        from_a += usize::from(response.ends_with("\r\n\r\na"));
    }
    assert!(from_a > 0, "some connections waited in A's backlog and A served them while closing");
    drop(release);
    assert!(common::read_to_close(&mut held).ends_with("a"));
    a.join().expect("A drained cleanly");
    b.stop().expect("B drained cleanly");
    Ok(())
}
