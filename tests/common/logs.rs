//! A logger that keeps every record, for tests that assert what was logged.

use std::sync::{Mutex, OnceLock};

/// One captured record.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its level.
    pub level: log::Level,
    /// Its target.
    pub target: String,
    /// Its message.
    pub message: String,
}

/// Keeps records at `max` and above.
struct Capture(Mutex<Vec<Record>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let record =
            Record { level: record.level(), target: record.target().to_string(), message: record.args().to_string() };
        self.0.lock().unwrap().push(record);
    }

    fn flush(&self) {}
}

/// The capturing logger, installed on first use with `max` as the level.
fn capture(max: log::LevelFilter) -> &'static Capture {
    static LOGGER: OnceLock<&'static Capture> = OnceLock::new();
    LOGGER.get_or_init(|| {
        let logger: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(logger).expect("no other logger in this test binary");
        log::set_max_level(max);
        logger
    })
}

/// Installs the logger (once per binary).
pub fn install(max: log::LevelFilter) {
    capture(max);
}

/// Everything logged so far.
pub fn records() -> Vec<Record> {
    capture(log::LevelFilter::Trace).0.lock().unwrap().clone()
}

/// A connection to `addr` (on loopback) from a peer address no other connection in this
/// binary has had: its own source IP in 127.0.0.0/8, so the access lines matched by
/// [`access_lines`] are its own. A peer's port alone is not enough: the capture is shared by
/// every test in the binary, and the kernel reuses a closed connection's local port for a
/// connection to another server.
pub fn connect_as_new_peer(addr: std::net::SocketAddr) -> std::net::TcpStream {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(n < 250 * 250, "out of loopback source addresses");
    let source = std::net::Ipv4Addr::new(127, 1 + (n / 250) as u8, 2 + (n % 250) as u8, 1);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&std::net::SocketAddr::from((source, 0)).into()).expect("bind a loopback source address");
    socket.connect(&addr.into()).expect("connect");
    super::as_client(socket.into())
}

/// Access-log lines whose peer is `peer`.
pub fn access_lines(peer: std::net::SocketAddr) -> Vec<String> {
    let field = format!("peer={peer} ");
    records()
        .into_iter()
        .filter(|r| r.target == "servicegroup::access" && r.message.starts_with(&field))
        .map(|r| r.message)
        .collect()
}
