//! servicegroup answering every request with `hello`, with its default timeouts on
//! (`TIMEOUTS=off` switches all three off, to measure what they cost).
//!
//! Environment: `PORT` (default 3000), `THREADS` (default 2), `TIMEOUTS`, `ACCESS_LOG=1` (the
//! access log on, written through a per-thread 64 KiB buffer to stderr, as a production
//! access log is buffered), and `MODE`, where
//! the connections run (the crate docs' table of runtimes):
//! - `threads` (default): `Group::run` on `THREADS` threads of the group's own;
//! - `executor`: `Group::run_on` an application `Executor` run by `THREADS` threads;
//! - `inline`: `Group::run` with `threads = 0`, under `smol::block_on` on the main thread.

use std::io::Write;
use std::sync::Arc;

use servicegroup::http::{Request, Response};
use servicegroup::{Body, Config, Group};

/// Writes records through a per-thread buffer to stderr.
struct BufferedStderr;

thread_local! {
    static OUT: std::cell::RefCell<std::io::BufWriter<std::io::Stderr>> =
        std::cell::RefCell::new(std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr()));
}

impl log::Log for BufferedStderr {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            OUT.with(|out| {
                let _ = writeln!(out.borrow_mut(), "{}", record.args());
            });
        }
    }

    fn flush(&self) {}
}

fn main() {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3000);
    let threads = std::env::var("THREADS").ok().and_then(|p| p.parse().ok()).unwrap_or(2);
    let mode = std::env::var("MODE").unwrap_or_else(|_| "threads".into());
    let mut config = Config::default();
    config.addr = std::net::SocketAddr::from(([127, 0, 0, 1], port)).into();
    config.debug_addr = None;
    config.threads = if mode == "inline" { 0 } else { threads };
    if std::env::var("TIMEOUTS").as_deref() == Ok("off") {
        config.header_read_timeout = None;
        config.write_timeout = None;
        config.idle_timeout = None;
    }
    if std::env::var("ACCESS_LOG").as_deref() == Ok("1") {
        config.access_log = true;
        log::set_logger(&BufferedStderr).unwrap();
        log::set_max_level(log::LevelFilter::Info);
    }
    config.shutdown_timeout = std::time::Duration::from_secs(1);
    let group = Group::new(|_req: Request<Body>| async { Response::new(Body::from("hello")) }, config).unwrap();
    eprintln!("sg_server ({mode}) listening on {}", group.addr());
    if mode == "executor" {
        let ex = Arc::new(smol::Executor::new());
        let (stop, stopped) = smol::channel::bounded::<()>(1);
        let helpers: Vec<_> = (1..threads.max(1))
            .map(|_| {
                let (ex, stopped) = (ex.clone(), stopped.clone());
                std::thread::spawn(move || smol::block_on(ex.run(stopped.recv())))
            })
            .collect();
        let server = ex.spawn({
            let ex = ex.clone();
            async move { group.run_on(&ex).await }
        });
        let _ = smol::block_on(ex.run(server));
        drop(stop);
        helpers.into_iter().for_each(|h| drop(h.join()));
    } else {
        let _ = smol::block_on(group.run());
    }
}
