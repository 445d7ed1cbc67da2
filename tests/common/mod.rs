//! Shared helpers for the black-box tests: a server on loopback port 0 in a background thread,
//! and a raw-socket client that reads responses byte-exactly.
#![allow(dead_code)]

pub mod logs;
pub mod process;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;

use servicegroup::{Config, Group, Handler, Shutdown};

/// How long a client waits for bytes before the test fails instead of hanging. Generous: it
/// only fires when the server is broken.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Where a test's group runs its connections: the three modes of the crate docs' table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `Group::run` with 2 threads of the group's own.
    Threads,
    /// `Group::run_on` an application executor run by 2 threads.
    Executor,
    /// `Group::run` with `threads = 0`: everything inside the future.
    Inline,
}

thread_local! {
    /// The mode of the test running on this thread.
    static RUNTIME: std::cell::Cell<Runtime> = const { std::cell::Cell::new(Runtime::Threads) };
}

/// Runs `test` with its servers in `runtime` (the [`in_every_runtime!`] macro calls this).
pub fn in_runtime<T>(runtime: Runtime, test: impl FnOnce() -> T) -> T {
    RUNTIME.with(|mode| mode.set(runtime));
    test()
}

/// The mode of the test running on this thread.
pub fn runtime() -> Runtime {
    RUNTIME.with(std::cell::Cell::get)
}

/// Turns one test function into three tests, `NAME::threads`, `NAME::executor` and
/// `NAME::inline`, each running it with its servers in that mode. Attributes (`cfg`, ...)
/// carry over to each.
#[macro_export]
macro_rules! in_every_runtime {
    ($(#[$meta:meta])* fn $name:ident() $(-> $ret:ty)? $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$meta])*
            #[test]
            fn threads() $(-> $ret)? {
                common::in_runtime(common::Runtime::Threads, || $body)
            }
            $(#[$meta])*
            #[test]
            fn executor() $(-> $ret)? {
                common::in_runtime(common::Runtime::Executor, || $body)
            }
            $(#[$meta])*
            #[test]
            fn inline() $(-> $ret)? {
                common::in_runtime(common::Runtime::Inline, || $body)
            }
        }
    };
}

/// A config for tests: loopback port 0, no debug server, no signal handling, and the threads
/// of this test's mode (2, or 0 inline).
pub fn config() -> Config {
    let mut config = Config::default();
    config.addr = "127.0.0.1:0".parse().unwrap();
    config.debug_addr = None;
    config.handle_signals = false;
    config.threads = if runtime() == Runtime::Inline { 0 } else { 2 };
    config
}

/// A running group.
pub struct Server {
    /// The service address (unspecified, port 0, when it is not TCP: see `bound`).
    pub addr: SocketAddr,
    /// The service address as the group reports it.
    pub bound: servicegroup::Addr,
    /// The debug address, when enabled and TCP.
    pub debug_addr: Option<SocketAddr>,
    /// Starts the graceful shutdown.
    pub shutdown: Shutdown,
    /// The thread running `Group::run`.
    thread: Option<JoinHandle<servicegroup::Result<()>>>,
}

impl Server {
    /// Starts `handler` with `config`.
    pub fn start(handler: impl Handler, config: Config) -> Server {
        Server::from_group(Group::new(handler, config).expect("bind"))
    }

    /// Starts a group built by the test, in this test's mode.
    pub fn from_group(group: Group) -> Server {
        let (bound, shutdown) = (group.addr(), group.shutdown());
        let addr = bound.tcp().unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
        let debug_addr = group.debug_addr().and_then(|a| a.tcp());
        let thread = match runtime() {
            Runtime::Threads | Runtime::Inline => {
                std::thread::spawn(move || futures_lite::future::block_on(group.run()))
            }
            Runtime::Executor => std::thread::spawn(move || {
                // An application's executor, run by this thread and one more.
                let ex = std::sync::Arc::new(smol::Executor::new());
                let (stop, stopped) = smol::channel::bounded::<()>(1);
                let helper = {
                    let ex = ex.clone();
                    std::thread::spawn(move || smol::block_on(ex.run(stopped.recv())))
                };
                let server = ex.spawn({
                    let ex = ex.clone();
                    async move { group.run_on(&ex).await }
                });
                let result = smol::block_on(ex.run(server));
                drop(stop);
                let _ = helper.join();
                result
            }),
        };
        Server { addr, bound, debug_addr, shutdown, thread: Some(thread) }
    }

    /// Starts a graceful shutdown and returns what `run` returned.
    pub fn stop(mut self) -> servicegroup::Result<()> {
        self.shutdown.start();
        self.thread.take().unwrap().join().expect("run panicked")
    }

    /// Waits for `run` to return without starting a shutdown.
    pub fn join(mut self) -> servicegroup::Result<()> {
        self.thread.take().unwrap().join().expect("run panicked")
    }

    /// Whether `run` has returned.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// A new client connection.
    pub fn connect(&self) -> TcpStream {
        connect(self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.shutdown.start();
            let _ = thread.join();
        }
    }
}

/// Connects with a read timeout as a safety net.
pub fn connect(addr: SocketAddr) -> TcpStream {
    as_client(TcpStream::connect(addr).expect("connect"))
}

/// A connected stream set up as the tests' clients are: a read timeout as a safety net, and
/// no Nagle delay.
pub fn as_client(stream: TcpStream) -> TcpStream {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Sends `request` on a new connection and reads until the server closes it.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = connect(addr);
    stream.write_all(request).unwrap();
    read_to_close(&mut stream)
}

/// Reads until the server closes the connection (EOF or reset).
pub fn read_to_close(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading until close: {e} (after {:?})", String::from_utf8_lossy(&bytes)),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether the server has closed the connection: a read returns EOF or a reset.
pub fn is_closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header fields, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// The head exactly as received.
    pub head: String,
}

impl Response {
    /// The first value of a header field.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// How many times a header field appears.
    pub fn count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n == name).count()
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client that reads responses one at a time from a keep-alive connection.
pub struct Client {
    /// The connection.
    pub stream: TcpStream,
    /// Bytes read past the last response.
    buf: Vec<u8>,
}

impl Client {
    /// Connects.
    pub fn new(addr: SocketAddr) -> Client {
        Client::over(connect(addr))
    }

    /// Speaks over a connection made elsewhere.
    pub fn over(stream: TcpStream) -> Client {
        Client { stream, buf: Vec::new() }
    }

    /// Sends bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends a request and reads its response.
    pub fn request(&mut self, bytes: &[u8]) -> Response {
        self.send(bytes);
        self.response()
    }

    /// Reads one response (not to a HEAD request).
    pub fn response(&mut self) -> Response {
        self.read_response(false)
    }

    /// Reads one response to a HEAD request (no body, whatever the framing says).
    pub fn head_response(&mut self) -> Response {
        self.read_response(true)
    }

    /// Reads more bytes; panics at EOF.
    fn fill(&mut self) {
        let mut buf = [0u8; 16 * 1024];
        let n = self.stream.read(&mut buf).expect("read");
        assert!(n > 0, "connection closed mid-response; have {:?}", String::from_utf8_lossy(&self.buf));
        self.buf.extend_from_slice(&buf[..n]);
    }

    /// Reads bytes until `n` are buffered.
    fn need(&mut self, n: usize) {
        while self.buf.len() < n {
            self.fill();
        }
    }

    /// Reads one response.
    fn read_response(&mut self, head_request: bool) -> Response {
        let (status, headers, head_len) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut fields);
            match parsed.parse(&self.buf).expect("well-formed response head") {
                httparse::Status::Complete(len) => {
                    let headers: Vec<(String, String)> = parsed
                        .headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect();
                    break (parsed.code.unwrap(), headers, len);
                }
                httparse::Status::Partial => self.fill(),
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_len]).into_owned();
        self.buf.drain(..head_len);
        let mut response = Response { status, headers, body: Vec::new(), head };
        let length = response.header("content-length").map(|v| v.parse::<usize>().expect("numeric content-length"));
        let chunked = response.header("transfer-encoding").is_some();
        assert!(!(length.is_some() && chunked), "both Content-Length and Transfer-Encoding:\n{}", response.head);
        if head_request || status / 100 == 1 || status == 204 || status == 304 {
            return response;
        }
        if let Some(len) = length {
            self.need(len);
            response.body = self.buf.drain(..len).collect();
        } else if chunked {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    self.fill();
                };
                let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).expect("chunk size");
                self.buf.drain(..line_end + 2);
                if size == 0 {
                    self.need(2);
                    assert_eq!(&self.buf[..2], b"\r\n", "no trailers expected");
                    self.buf.drain(..2);
                    break;
                }
                self.need(size + 2);
                response.body.extend(self.buf.drain(..size));
                assert_eq!(self.buf.drain(..2).collect::<Vec<_>>(), b"\r\n");
            }
        } else {
            // Close-delimited.
            let mut rest = Vec::new();
            self.stream.read_to_end(&mut rest).unwrap();
            self.buf.extend(rest);
            response.body = std::mem::take(&mut self.buf);
        }
        response
    }

    /// The bytes read past the last response (after a 101: the new protocol's first bytes).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Whether the server closed the connection with nothing more to read.
    pub fn is_closed(&mut self) -> bool {
        self.buf.is_empty() && is_closed(&mut self.stream)
    }
}

/// Polls `condition` every few milliseconds until it holds; panics after [`PATIENCE`].
pub fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A GET request for `path`.
pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
}

/// The test application on a server configured by `configure` (on top of [`config`]).
pub fn app_server(configure: impl FnOnce(&mut Config)) -> Server {
    let (handler, _) = app();
    let mut cfg = config();
    configure(&mut cfg);
    Server::start(handler, cfg)
}

/// The test application: routes by path, and counts the requests its handler saw.
pub fn app() -> (impl Handler, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use servicegroup::http::{header, HeaderValue, Response, StatusCode};
    use servicegroup::Body;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let handler = move |mut req: servicegroup::http::Request<Body>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let query = req.uri().query().unwrap_or("").to_string();
            let number = |name: &str| -> u64 {
                query.split('&').find_map(|p| p.strip_prefix(name)?.strip_prefix('=')?.parse().ok()).unwrap_or(0)
            };
            let path = req.uri().path().to_string();
            match path.as_str() {
                "/" => Response::new(Body::from("hello")),
                // Reads the whole body and answers with its length.
                "/len" => match req.body_mut().bytes().await {
                    Ok(bytes) => Response::new(Body::from(bytes.len().to_string())),
                    Err(e) => e.to_response(),
                },
                // Reads the whole body on a thread of its own (another executor: a bare
                // block_on), and answers with its length.
                "/len-elsewhere" => {
                    let (tx, rx) = smol::channel::bounded(1);
                    let mut body = std::mem::take(req.body_mut());
                    std::thread::spawn(move || {
                        let n = futures_lite::future::block_on(Body::bytes(&mut body)).map(|b| b.len());
                        let _ = tx.send_blocking(n.map_err(|e| e.to_string()));
                    });
                    match rx.recv().await {
                        Ok(Ok(n)) => Response::new(Body::from(n.to_string())),
                        other => Response::new(Body::from(format!("{other:?}"))),
                    }
                }
                // Streams the body back.
                "/echo" => Response::new(req.into_body()),
                // Never reads the body.
                "/ignore" => Response::new(Body::from("ignored")),
                "/sleep" => {
                    let ms = number("ms");
                    async_io::Timer::after(Duration::from_millis(ms)).await;
                    Response::new(Body::from(format!("slept {ms}")))
                }
                "/stream" => {
                    let chunks = ["first,", "second,", "third"].map(|c| Ok(bytes::Bytes::from(c)));
                    Response::new(Body::from_stream(futures_lite::stream::iter(chunks)))
                }
                "/reader" => Response::new(Body::from_reader(&b"from a reader"[..], None)),
                "/sized-reader" => Response::new(Body::from_reader(&b"sized"[..], Some(5))),
                "/big" => Response::new(Body::from(vec![b'x'; number("bytes") as usize])),
                "/big-stream" => {
                    let n = number("bytes") as usize;
                    Response::new(Body::from_reader(futures_lite::io::repeat(b'y').take(n as u64), None))
                }
                "/nocontent" => {
                    let mut r = Response::new(Body::from("must not be sent"));
                    *r.status_mut() = StatusCode::NO_CONTENT;
                    r
                }
                "/notmodified" => {
                    let mut r = Response::new(Body::empty());
                    *r.status_mut() = StatusCode::NOT_MODIFIED;
                    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("42"));
                    r
                }
                "/close" => {
                    let mut r = Response::new(Body::from("bye"));
                    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                    r
                }
                "/panic" => panic!("handler panicked on purpose"),
                "/count" => Response::new(Body::from("counted")),
                _ => {
                    let mut r = Response::new(Body::from("not found"));
                    *r.status_mut() = StatusCode::NOT_FOUND;
                    r
                }
            }
        }
    };
    (handler, calls)
}
