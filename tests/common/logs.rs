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

/// Access-log lines whose peer is `peer`.
pub fn access_lines(peer: std::net::SocketAddr) -> Vec<String> {
    let field = format!("peer={peer} ");
    records()
        .into_iter()
        .filter(|r| r.target == "servicegroup::access" && r.message.starts_with(&field))
        .map(|r| r.message)
        .collect()
}
