//! Production-safe HTTP/1.1 services for smol and async-std, from the first line.
//!
//! ```no_run
//! # async fn example() -> servicegroup::Result<()> {
//! # let handler = |_req| async { servicegroup::http::Response::new(servicegroup::Body::empty()) };
//! servicegroup::run(handler, servicegroup::Config::default()).await
//! # }
//! # fn main() { let _ = example; }
//! ```
//!
//! serves `handler` over HTTP/1.1 on `0.0.0.0:8080` with header-read, write and idle
//! timeouts enforced; runs a debug server on `127.0.0.1:6060` (pprof CPU profiles and
//! flamegraphs, Prometheus metrics, health and readiness) where the public can't reach it;
//! and on SIGINT or SIGTERM stops accepting, lets requests in flight finish, and returns —
//! cutting what is left after a deadline. Add your own long-running tasks with [`Group`]:
//! when any member of the group ends, all are stopped.
//!
//! # How it works
//!
//! A small hand-written HTTP/1.1 connection loop (RFC 9112) runs each connection as a task
//! (where: see [Runtimes](#runtimes)). It races each phase of a connection against one
//! deadline: waiting for a request (idle timeout), reading its head (header-read timeout), and
//! everything after (write timeout: body, handler, response). Setting a deadline is an atomic
//! store; one sweeper per group wakes the connections whose deadline has passed. A supervisor
//! races the group's members against a shared stop signal, and a counter of open connections
//! tells the drain when it is done. It depends on smol's building blocks (async-io,
//! async-executor and the `async-task` under it, futures-lite), `http` for types and
//! `httparse` for parsing; no tokio, no hyper.
//!
//! # Runtimes
//!
//! The same group runs in any of three places; nothing else changes (timeouts, drain,
//! signals, metrics and the debug server behave the same in each, and the test suite runs
//! every black-box test in all three):
//!
//! | mode | how | threads started | what it costs | pick it when |
//! |---|---|---|---|---|
//! | own threads (default) | [`Group::run`], `Config::threads = N` (default: one per core) | N, plus one deadline sweeper | each thread runs its own tasks and (on Linux) waits on its own edge-triggered epoll set; a new connection goes to the thread with the fewest open connections and stays there, its socket in that thread's set, so no request or wake-up moves between threads and per-thread counters are never shared (async-io's reactor still serves the listeners, and whatever your handlers await of async-io) | the process is mainly this service |
//! | the caller's executor | [`Group::run_on`]`(&executor)` | none | tasks run on the application's threads, which async-executor balances (a woken task may move between them); deadlines sleep on one async-io timer | the application already runs an [`async_executor::Executor`] (or `smol::Executor`) on its threads and should share them |
//! | inside `run`'s future | [`Group::run`], `Config::threads = 0` (`SERVICEGROUP_THREADS=0`) | none | everything runs on the thread polling the future: one core at most | embedding in a smol or async-std application next to its own tasks, tests, small sidecars |
//!
//! The embedded mode works under `smol::block_on`, as a task on a `smol::Executor`, under
//! `async_std::task::block_on` or `spawn`, and under `futures_lite::future::block_on`; a
//! handler can await the host's timers and channels. `bench/run.py --modes-only` measures
//! the modes side by side (README, "Performance").
//!
//! Where the servers listen is an [`Addr`]: a TCP address, a Unix socket path (`unix:/path`),
//! a Linux abstract socket (`unix:@name`), or a [`Listener`] you bound yourself, made from a
//! std or an `async_net` TCP or Unix listener (async-net's listener types are the ones a
//! smol application already holds; the accept loop then uses the `Async` inside). Under
//! systemd socket activation the group takes the sockets systemd passes instead, and with
//! `NOTIFY_SOCKET` set it reports readiness, stopping and the watchdog (see [`Group::new`]).
//! Each accepted connection's socket joins the reactor of the thread its task runs on: on
//! own threads (Linux) that thread's epoll set, otherwise async-io's (an `async_io::Async`).
//!
//! # Examples
//!
//! Bind port 0, send a request, check the answer, shut down:
//!
//! ```
//! use std::io::{Read, Write};
//! use servicegroup::{Body, Config, Group, http::Response};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = Config::default();
//! config.addr = "127.0.0.1:0".parse()?;
//! config.debug_addr = None;
//! config.handle_signals = false;
//! let group = Group::new(|_req| async { Response::new(Body::from("hello")) }, config)?;
//! let (addr, shutdown) = (group.addr(), group.shutdown());
//! let server = std::thread::spawn(move || smol::block_on(group.run()));
//!
//! let mut client = std::net::TcpStream::connect(addr)?;
//! client.write_all(b"GET / HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n")?;
//! let mut response = String::new();
//! client.read_to_string(&mut response)?;
//! assert!(response.starts_with("HTTP/1.1 200 OK\r\n"));
//! assert!(response.ends_with("\r\n\r\nhello"));
//!
//! shutdown.start();
//! server.join().unwrap()?;
//! # Ok(())
//! # }
//! ```
//!
//! # Public API
//!
//! Everything public, and why it is:
//!
//! - [`run`]: the one-line server; [`Group`]: the same with members ([`Group::add`]),
//!   debug routes ([`Group::debug_route`]), the bound addresses ([`Group::addr`],
//!   [`Group::debug_addr`]), a [`Shutdown`] handle, and where to run ([`Group::run`],
//!   [`Group::run_on`]).
//! - [`Addr`] and [`Listener`]: where the service and debug servers listen.
//! - [`Config`] and the `DEFAULT_*` constants it starts from ([`DEFAULT_ADDR`],
//!   [`DEFAULT_DEBUG_ADDR`], [`DEFAULT_TIMEOUT`], [`DEFAULT_MAX_HEADER_BYTES`],
//!   [`DEFAULT_MAX_HEADERS`], [`DEFAULT_MAX_BODY_BYTES`]); [`DRAIN_LIMIT`] and
//!   [`MAX_PROFILE_SECONDS`], the two fixed limits a user can run into.
//! - [`Handler`]: what serves requests (any async `Fn(Request<Body>) -> Response<Body>`);
//!   [`Body`]: request and response bodies; [`http`]: the `http` crate, re-exported so the
//!   versions match.
//! - [`Error`], [`Phase`], [`Result`], [`BoxError`]: what can fail, and how to answer it.
//! - [`Shutdown`]: start a graceful shutdown from code, or wait for one.
//! - [`upgrade`]: take a connection for WebSocket or another protocol (`101`), or a
//!   `CONNECT` tunnel, still tracked by the drain.
//!
//! The fuzzing entry points are compiled only with the `fuzzing` feature (for `fuzz/` and
//! this crate's tests) and are not part of the API.
//!
//! # Operability
//!
//! With `Config::access_log` (`SERVICEGROUP_ACCESS_LOG=1`) each exchange logs one logfmt line
//! through the `log` facade, target `servicegroup::access`, level info:
//!
//! ```text
//! peer=10.0.0.7:51234 method=GET path="/work?ms=5" version=HTTP/1.1 status=200 bytes=18 duration_us=5127
//! peer=10.0.0.7:51240 method=- path=- version=- status=408 bytes=0 duration_us=30001244 end=header_read_timeout
//! ```
//!
//! `bytes` counts response body bytes; `end` appears only when the exchange did not end
//! normally: `header_read_timeout`, `write_timeout`, `client_gone`, `cut` (by the shutdown
//! deadline) or `panic`. Headers and bodies are never logged. When off, nothing is built.
//!
//! The debug server's `/debug/connections` shows every open service connection: peer, phase
//! (idle, reading head, in handler, writing, closing; "draining" once the drain waits on it),
//! the request in flight, how long it has been in that phase, its age and the requests it
//! served, as an HTML table or, with `?format=json`, JSON (the first 1,000 rows, with totals
//! per phase over all). Otherwise the crate logs little on its own: one info line at start,
//! one per served profile, one when the service has drained; per-request events are trace.
//! (pprof-rs logs "starting/stopping cpu profiler" at info on target `pprof::profiler`;
//! filter that target in your logger to silence it.)
//!
//! # Timeouts
//!
//! | phase | `Config` field | on expiry |
//! |---|---|---|
//! | waiting for the first request, reading a head | `header_read_timeout` | 408 if any byte arrived, then close; else close |
//! | reading the body, running the handler, writing the response | `write_timeout` | 503 if no response head was sent yet, then close; else close |
//! | waiting for the next request on a keep-alive connection | `idle_timeout` | close |
//!
//! Set a timeout to `None` (or its `SERVICEGROUP_*_MS` variable to 0) to switch it off.
//!
//! # Cancel safety
//!
//! A handler's future is dropped, not polled to completion, when the write timeout expires,
//! when the client's connection fails while the response is written, or when the shutdown
//! deadline passes. Dropping runs destructors but nothing after the last `.await`: do not
//! rely on code after an await to release a lock, finish a transaction or send a message.
//! Use RAII guards, or spawn work that must finish onto your own executor. The request body
//! becomes unreadable once its exchange ends, so a task that keeps the body gets an error.
//! [`Group::run`] and [`Group::run_on`] may be dropped: every connection task is cancelled
//! (its connection closed) and the listeners close; the group's threads end after the tasks
//! they are polling.
//!
//! # Shutdown
//!
//! The *signal* (SIGINT, SIGTERM, [`Shutdown::start`], or a member ending) is instant: it
//! never waits. The *drain* follows it: readiness reports 503 at once; after
//! `Config::drain_delay` the listener closes and idle connections close; requests in flight
//! run to completion, their responses carrying `Connection: close`; `run` returns when the
//! last connection closes, or at `Config::shutdown_timeout`, reporting what was cut. A second
//! SIGINT or SIGTERM during the drain ends the process at once. SIGKILL cannot be caught by
//! any process.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod access;
mod body;
mod config;
mod debug;
mod error;
mod group;
mod h1;
mod handler;
mod listen;
mod metrics;
mod notify;
mod runtime;
mod server;
mod shutdown;
mod signal;
mod supervisor;
pub mod upgrade;

/// Entry points for `fuzz/` and for replaying its corpus in `cargo test`: compiled only with
/// the `fuzzing` feature, which the fuzz crate and this crate's own tests turn on, so the
/// public API (and `cargo doc`) never holds them.
#[cfg(feature = "fuzzing")]
#[path = "fuzz.rs"]
pub mod __fuzz;

pub use body::Body;
pub use config::{
    Addr, Config, DEFAULT_ADDR, DEFAULT_DEBUG_ADDR, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_HEADER_BYTES, DEFAULT_TIMEOUT,
};
pub use debug::MAX_PROFILE_SECONDS;
pub use error::{BoxError, Error, Phase, Result};
pub use group::Group;
pub use handler::Handler;
pub use listen::Listener;
pub use server::conn::DRAIN_LIMIT;
pub use shutdown::Shutdown;

/// The `http` crate this crate's types come from (`Request`, `Response`, `StatusCode`, ...),
/// re-exported so your versions match.
pub use http;

/// Serves `handler` with `config` until a signal or a fatal error; see [`Group::run`].
///
/// Equivalent to `Group::new(handler, config)?.run().await`.
pub async fn run(handler: impl Handler, config: Config) -> Result<()> {
    Group::new(handler, config)?.run().await
}

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
struct ReadmeDoctests;
