//! The access log: one logfmt line per exchange, through the `log` facade on target
//! `servicegroup::access` at info level, and only when `Config::access_log` is on (nothing is
//! built or formatted otherwise).
//!
//! Fields, in order (nginx's `log_format` names where they fit; HAProxy's termination state in
//! the spirit of `end`):
//!
//! `peer=ADDR method=GET path="/target?query" version=HTTP/1.1 status=200 bytes=BODY_BYTES
//! duration_us=N` and, when the exchange did not end normally, `end=` one of
//! `header_read_timeout`, `write_timeout` (or `idle_timeout`), `client_gone`, `cut` (by the
//! shutdown deadline) or `panic`. A request refused before it was parsed (400, 408, 431, ...)
//! has `method=- path=- version=-`. Headers and bodies are never logged.

use std::fmt::{self, Write as _};

use http::{Method, Uri, Version};

use crate::error::Phase;
use crate::listen::Peer;
use crate::server::clock::Tick;

/// The log target.
pub(crate) const TARGET: &str = "servicegroup::access";

/// How an exchange ended, when it did not end normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// A timeout expired.
    TimedOut(Phase),
    /// The client went away (a read or write failed).
    ClientGone,
    /// The shutdown deadline cut the connection.
    Cut,
    /// The handler panicked.
    Panicked,
}

impl End {
    /// The `end=` value.
    fn as_str(self) -> &'static str {
        match self {
            End::TimedOut(Phase::HeaderRead) => "header_read_timeout",
            End::TimedOut(Phase::Write) => "write_timeout",
            End::TimedOut(Phase::Idle) => "idle_timeout",
            End::TimedOut(Phase::Upgraded) => "upgraded_idle_timeout",
            End::ClientGone => "client_gone",
            End::Cut => "cut",
            End::Panicked => "panic",
        }
    }
}

/// One exchange's line, written when finished, or with `end=cut` if it is dropped unfinished
/// (the connection's task was cut). Boxed, so that an exchange without one holds a pointer
/// only (the connection's task lives as long as the connection).
pub(crate) struct Entry(Box<Fields>);

/// What an [`Entry`] knows before the exchange ends.
struct Fields {
    /// The client.
    peer: Option<Peer>,
    /// Method, target and version, if a head was parsed.
    request: Option<(Method, String, Version)>,
    /// When the exchange started.
    started: Tick,
    /// Set once written.
    written: bool,
}

impl Entry {
    /// An exchange of the request `method uri version` from `peer`, started at `started`.
    pub(crate) fn new(peer: Option<Peer>, method: &Method, uri: &Uri, version: Version, started: Tick) -> Self {
        let target = uri.path_and_query().map_or_else(|| uri.to_string(), |p| p.as_str().to_owned());
        Entry(Box::new(Fields { peer, request: Some((method.clone(), target, version)), started, written: false }))
    }

    /// A request refused before a head was parsed.
    pub(crate) fn refused(peer: Option<Peer>, started: Tick) -> Self {
        Entry(Box::new(Fields { peer, request: None, started, written: false }))
    }

    /// Writes the line.
    pub(crate) fn finish(mut self, status: Option<u16>, bytes: u64, end: Option<End>) {
        self.write(status, bytes, end);
    }

    /// Formats and logs the line.
    fn write(&mut self, status: Option<u16>, bytes: u64, end: Option<End>) {
        self.0.written = true;
        let line = Line { entry: &self.0, status, bytes, end, micros: self.0.started.elapsed().as_micros() };
        log::info!(target: TARGET, "{line}");
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if !self.0.written {
            self.write(None, 0, Some(End::Cut));
        }
    }
}

/// An entry's fields, formatted when the logger asks.
struct Line<'a> {
    /// The entry.
    entry: &'a Fields,
    /// Status sent, if any.
    status: Option<u16>,
    /// Response body bytes sent.
    bytes: u64,
    /// How it ended, if not normally.
    end: Option<End>,
    /// Duration.
    micros: u128,
}

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.entry.peer {
            Some(peer) => write!(f, "peer={peer}")?,
            None => f.write_str("peer=-")?,
        }
        match &self.entry.request {
            Some((method, target, version)) => {
                write!(f, " method={method} path=")?;
                quoted(f, target)?;
                write!(f, " version={version:?}")?;
            }
            None => f.write_str(" method=- path=- version=-")?,
        }
        match self.status {
            Some(status) => write!(f, " status={status}")?,
            None => f.write_str(" status=-")?,
        }
        write!(f, " bytes={} duration_us={}", self.bytes, self.micros)?;
        if let Some(end) = self.end {
            write!(f, " end={}", end.as_str())?;
        }
        Ok(())
    }
}

/// A logfmt quoted value: `"` and `\` escaped, control bytes as `\xNN`.
fn quoted(f: &mut fmt::Formatter<'_>, value: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in value.chars() {
        match c {
            '"' | '\\' => write!(f, "\\{c}")?,
            c if c.is_control() => write!(f, "\\x{:02x}", c as u32)?,
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(entry: &Entry, status: Option<u16>, bytes: u64, end: Option<End>) -> String {
        Line { entry: &entry.0, status, bytes, end, micros: 42 }.to_string()
    }

    #[test]
    fn lines_are_logfmt() {
        let peer = Some(Peer::Tcp("127.0.0.1:5000".parse().unwrap()));
        let uri: Uri = "/a%20b?x=1".parse().unwrap();
        let mut entry = Entry::new(peer, &Method::POST, &uri, Version::HTTP_11, Tick::now());
        assert_eq!(entry.0.request.as_ref().unwrap().1, "/a%20b?x=1");
        // Targets are quoted and escaped, whatever they hold.
        entry.0.request.as_mut().unwrap().1 = "/a%20b?x=\"1\"".into();
        assert_eq!(
            line(&entry, Some(200), 5, None),
            "peer=127.0.0.1:5000 method=POST path=\"/a%20b?x=\\\"1\\\"\" version=HTTP/1.1 status=200 bytes=5 duration_us=42"
        );
        assert_eq!(
            line(&entry, Some(503), 0, Some(End::TimedOut(Phase::Write))),
            "peer=127.0.0.1:5000 method=POST path=\"/a%20b?x=\\\"1\\\"\" version=HTTP/1.1 status=503 bytes=0 duration_us=42 \
             end=write_timeout"
        );
        entry.0.written = true;
        let mut refused = Entry::refused(None, Tick::now());
        assert_eq!(
            line(&refused, Some(408), 0, None),
            "peer=- method=- path=- version=- status=408 bytes=0 duration_us=42"
        );
        refused.0.written = true;
    }
}
