//! The crate's one error type, and the one place where failures become status codes.

use std::fmt;
use std::io;
use std::time::Duration;

use http::StatusCode;

use crate::h1::decode::DecodeError;

/// A boxed error from a group member.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which timeout expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Phase {
    /// Reading a request head took longer than `Config::header_read_timeout`.
    HeaderRead,
    /// Reading the body, running the handler and writing the response took longer than
    /// `Config::write_timeout`.
    Write,
    /// A keep-alive connection sent nothing for `Config::idle_timeout`.
    Idle,
    /// An upgraded connection read and wrote nothing for `Config::upgraded_idle_timeout`.
    Upgraded,
}

impl Phase {
    /// All phases, in the order the debug server lists them.
    pub const ALL: [Phase; 4] = [Phase::HeaderRead, Phase::Write, Phase::Idle, Phase::Upgraded];

    /// The phase's name in metrics (`header_read`, `write`, `idle`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::HeaderRead => "header_read",
            Phase::Write => "write",
            Phase::Idle => "idle",
            Phase::Upgraded => "upgraded",
        }
    }
}

/// Everything that can go wrong, with messages that say what to fix.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A listener could not be bound.
    Bind {
        /// `"service"` or `"debug"`.
        server: &'static str,
        /// The address that was asked for, as [`Addr`](crate::Addr) displays it
        /// (`0.0.0.0:8080`, `unix:/run/app.sock`, ...).
        addr: String,
        /// Why the operating system refused.
        source: io::Error,
    },
    /// systemd's socket activation (`LISTEN_FDS`) handed over something the group cannot
    /// serve on.
    Activation {
        /// The file descriptor concerned, if one is.
        fd: Option<usize>,
        /// What is wrong with it, and what to change.
        why: String,
    },
    /// A configuration value is invalid.
    Config {
        /// The environment variable or `Config` field.
        name: &'static str,
        /// The value that was given.
        value: String,
        /// What a valid value looks like.
        expected: &'static str,
    },
    /// An I/O error, for example while reading a request body.
    Io(io::Error),
    /// The request body is malformed (for example an invalid chunk); answer 400.
    BadRequest(&'static str),
    /// A whole-body read went over its limit; answer 413.
    BodyTooLarge {
        /// The limit, in bytes (`Config::max_body_bytes` for request bodies).
        limit: u64,
    },
    /// A connection timeout expired.
    TimedOut(Phase),
    /// [`upgrade::on`](crate::upgrade::on) was called for a request that cannot be upgraded
    /// (the message says why); answer 400 ([`Error::to_response`]).
    NotUpgradable(&'static str),
    /// A group member returned an error, which ended the group.
    Member {
        /// The name the member was added with.
        name: String,
        /// What it returned.
        source: BoxError,
    },
    /// A group member panicked, which ended the group.
    Panicked {
        /// The name the member was added with.
        name: String,
        /// The panic message.
        message: String,
    },
    /// The graceful shutdown deadline passed with connections or members still running;
    /// they were cut.
    ShutdownTimedOut {
        /// Connections that were still open and were closed.
        connections: usize,
        /// Members (by name) that were still running and were dropped.
        members: Vec<String>,
        /// The deadline (`Config::shutdown_timeout`, after `Config::drain_delay`).
        timeout: Duration,
    },
}

impl Error {
    /// Whether this is a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::TimedOut(_) | Error::ShutdownTimedOut { .. })
    }

    /// Whether a whole-body read went over its limit.
    pub fn is_body_too_large(&self) -> bool {
        matches!(self, Error::BodyTooLarge { .. })
    }

    /// The status a handler should answer with when a body read fails with this error:
    /// 400 for a malformed body, 413 for one over the limit, 408/503 for timeouts, 500 otherwise.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) | Error::NotUpgradable(_) => StatusCode::BAD_REQUEST,
            Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::TimedOut(Phase::HeaderRead) => StatusCode::REQUEST_TIMEOUT,
            Error::TimedOut(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A plain-text response with [`Error::status`] and this error's message.
    pub fn to_response(&self) -> http::Response<crate::Body> {
        let mut response = http::Response::new(crate::Body::from(format!("{self}\n")));
        *response.status_mut() = self.status();
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
        response
    }
}

/// The status the connection answers a request it could not decode with.
pub(crate) fn decode_status(error: &DecodeError) -> StatusCode {
    match error {
        DecodeError::Malformed(_) => StatusCode::BAD_REQUEST,
        DecodeError::HeadTooLarge | DecodeError::TooManyHeaders => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        DecodeError::UnsupportedVersion => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
        DecodeError::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
        DecodeError::UnsupportedExpectation => StatusCode::EXPECTATION_FAILED,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bind { server, addr, source } => write!(
                f,
                "could not bind the {server} server to {addr}: {source}; choose a free address \
                 ({})",
                if *server == "debug" {
                    "Config::debug_addr or SERVICEGROUP_DEBUG_ADDR; `off` disables the debug server"
                } else {
                    "Config::addr or SERVICEGROUP_ADDR"
                }
            ),
            Error::Activation { fd: Some(fd), why } => write!(f, "socket activation: fd {fd}: {why}"),
            Error::Activation { fd: None, why } => write!(f, "socket activation: {why}"),
            Error::Config { name, value, expected } => write!(f, "invalid {name}={value:?}: expected {expected}"),
            Error::Io(e) => write!(f, "i/o error: {e}"),
            Error::BadRequest(why) => write!(f, "bad request: {why}"),
            Error::NotUpgradable(why) => write!(f, "this request cannot be upgraded: {why}"),
            Error::BodyTooLarge { limit } => {
                write!(f, "request body is larger than the {limit}-byte limit (Config::max_body_bytes)")
            }
            Error::TimedOut(phase) => {
                let what = match phase {
                    Phase::HeaderRead => "reading the request head took longer than the header read timeout",
                    Phase::Write => "the exchange took longer than the write timeout",
                    Phase::Idle => "the keep-alive connection was idle longer than the idle timeout",
                    Phase::Upgraded => "the upgraded connection was idle longer than the upgraded idle timeout",
                };
                f.write_str(what)
            }
            Error::Member { name, source } => write!(f, "group member `{name}` failed: {source}"),
            Error::Panicked { name, message } => {
                write!(f, "group member `{name}` panicked: {message}")
            }
            Error::ShutdownTimedOut { connections, members, timeout } => {
                write!(f, "graceful shutdown did not finish within {timeout:?}: cut {connections} open connection(s)")?;
                if !members.is_empty() {
                    write!(f, " and dropped member(s) {}", members.join(", "))?;
                }
                f.write_str(" (raise Config::shutdown_timeout or SERVICEGROUP_SHUTDOWN_TIMEOUT_MS)")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Bind { source, .. } => Some(source),
            Error::Io(e) => Some(e),
            Error::Member { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(e) => e,
            Error::BadRequest(_) => io::Error::new(io::ErrorKind::InvalidData, e),
            Error::TimedOut(_) => io::Error::new(io::ErrorKind::TimedOut, e),
            e => io::Error::other(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_fix() {
        let e = Error::Bind {
            server: "service",
            addr: "0.0.0.0:8080".into(),
            source: io::Error::from(io::ErrorKind::AddrInUse),
        };
        let text = e.to_string();
        assert!(text.contains("0.0.0.0:8080") && text.contains("SERVICEGROUP_ADDR"), "{text}");
        let e = Error::Config { name: "SERVICEGROUP_THREADS", value: "lots".into(), expected: "a whole number" };
        assert_eq!(e.to_string(), "invalid SERVICEGROUP_THREADS=\"lots\": expected a whole number");
    }

    #[test]
    fn statuses() {
        assert_eq!(Error::BadRequest("x").status(), 400);
        assert_eq!(Error::BodyTooLarge { limit: 1 }.status(), 413);
        assert_eq!(Error::TimedOut(Phase::HeaderRead).status(), 408);
        assert_eq!(Error::TimedOut(Phase::Write).status(), 503);
        assert!(Error::TimedOut(Phase::Idle).is_timeout());
        assert_eq!(decode_status(&DecodeError::HeadTooLarge), 431);
        assert_eq!(decode_status(&DecodeError::UnsupportedVersion), 505);
        assert_eq!(decode_status(&DecodeError::UnsupportedExpectation), 417);
    }
}
