//! Configuration: safe defaults, each limit a documented constant, overridable from the
//! environment.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::listen::Listener;

/// Where the service listens by default: every interface, port 8080.
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 8080));

/// Where the debug server listens by default: loopback only, so profiles and metrics never
/// leave the host unless you say so.
pub const DEFAULT_DEBUG_ADDR: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 6060));

/// Default for all three connection timeouts and the shutdown deadline: 30 s is long enough
/// for slow mobile clients and short enough that a slowloris cannot hold a connection for long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest request head by default: 64 KiB, far above what browsers send (large cookie jars
/// stay under 16 KiB) and small enough that 10,000 slow clients hold at most 640 MiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;

/// Most header fields by default: 100, the figure hyper and nginx use.
pub const DEFAULT_MAX_HEADERS: usize = 100;

/// Largest body [`Body::bytes`](crate::Body::bytes) reads by default: 2 MiB, enough for JSON
/// APIs; stream larger uploads through `AsyncRead` instead.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 2 * 1024 * 1024;

/// Where a server listens: an address the group binds, or a listener you bound yourself.
///
/// Parsed from text (`"0.0.0.0:8080".parse()`, and the `SERVICEGROUP_ADDR` and
/// `SERVICEGROUP_DEBUG_ADDR` variables): `host:port` (IPv4, `[IPv6]` or `localhost`) for TCP,
/// `unix:/path` for a Unix socket file, `unix:@name` for a Linux abstract socket. Displays
/// the same way. A [`Listener`] converts with `.into()`, as do std's and async-net's
/// listeners themselves.
///
/// Under systemd socket activation (`LISTEN_FDS` set for this process), the sockets systemd
/// passes take the place of these addresses; see [`Group::new`](crate::Group::new).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Addr {
    /// A TCP address. Port 0 picks a free port; [`Group::addr`](crate::Group::addr) says
    /// which.
    Tcp(SocketAddr),
    /// A Unix stream socket at this path. A socket file nobody accepts on (left by a process
    /// that crashed) is replaced; a live one, or a file that is not a socket, is an error. The
    /// file is removed when the listener closes. Peers show in logs as `unix:PATH`.
    Unix(PathBuf),
    /// A Unix stream socket in Linux's abstract namespace, named without the leading `@`: no
    /// file to clean up, gone with the process.
    Abstract(String),
    /// A listener you bound yourself; see [`Listener`].
    Listener(Listener),
}

impl Addr {
    /// The TCP address, if this is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Addr::Tcp(addr) => Some(*addr),
            _ => None,
        }
    }
}

/// Connecting to a group's address: `TcpStream::connect(group.addr())`. Any address other
/// than [`Addr::Tcp`] is an error (`InvalidInput`) saying it is not a TCP address.
impl std::net::ToSocketAddrs for Addr {
    type Iter = std::option::IntoIter<SocketAddr>;

    fn to_socket_addrs(&self) -> std::io::Result<Self::Iter> {
        match self.tcp() {
            Some(addr) => Ok(Some(addr).into_iter()),
            None => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{self} is not a TCP address"))),
        }
    }
}

impl FromStr for Addr {
    type Err = Error;

    /// Parses `host:port`, `unix:/path` or `unix:@name`; the error says which forms exist.
    fn from_str(text: &str) -> Result<Addr> {
        let trimmed = text.trim();
        let bad = |expected| Error::Config { name: "address", value: text.to_string(), expected };
        if let Some(rest) = trimmed.strip_prefix("unix:") {
            return match rest.strip_prefix('@') {
                Some("") => Err(bad("a name after unix:@")),
                Some(name) => Ok(Addr::Abstract(name.to_string())),
                None if rest.is_empty() => Err(bad("a path after unix:, like unix:/run/app.sock")),
                None => Ok(Addr::Unix(PathBuf::from(rest))),
            };
        }
        let parsed = match trimmed.strip_prefix("localhost:") {
            Some(port) => port.parse::<u16>().ok().map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
            None => trimmed.parse().ok(),
        };
        parsed
            .map(Addr::Tcp)
            .ok_or_else(|| bad("an address like 0.0.0.0:8080, [::]:8080, unix:/run/app.sock or unix:@name"))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(addr) => write!(f, "{addr}"),
            Addr::Unix(path) => write!(f, "unix:{}", path.display()),
            Addr::Abstract(name) => write!(f, "unix:@{name}"),
            Addr::Listener(listener) => write!(f, "{listener}"),
        }
    }
}

impl From<SocketAddr> for Addr {
    fn from(addr: SocketAddr) -> Addr {
        Addr::Tcp(addr)
    }
}

impl From<Listener> for Addr {
    fn from(listener: Listener) -> Addr {
        Addr::Listener(listener)
    }
}

/// `.into()` straight from a listener type, through [`Listener`].
macro_rules! addr_from_listener {
    ($($listener:ty),*) => {$(
        impl From<$listener> for Addr {
            fn from(listener: $listener) -> Addr {
                Addr::Listener(listener.into())
            }
        }
    )*};
}
addr_from_listener!(
    std::net::TcpListener,
    std::os::unix::net::UnixListener,
    async_net::TcpListener,
    async_net::unix::UnixListener
);

/// How the server behaves. Start from [`Config::default`] or [`Config::from_env`] and change
/// fields:
///
/// ```
/// use std::time::Duration;
/// let mut config = servicegroup::Config::default();
/// config.addr = "127.0.0.1:3000".parse().unwrap();
/// config.write_timeout = Some(Duration::from_secs(5));
/// config.debug_addr = None; // no debug server
/// # drop(config);
/// ```
///
/// A timeout of `None` is switched off. Switching off timeouts on a public port lets one slow
/// client hold a connection forever; do it only behind a proxy that enforces its own.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Service address (`SERVICEGROUP_ADDR`): TCP, a Unix socket, or your own listener (see
    /// [`Addr`]). Port 0 picks a free port; see [`Group::addr`](crate::Group::addr).
    pub addr: Addr,
    /// Debug server address (`SERVICEGROUP_DEBUG_ADDR`; `off` disables it), or `None` for no
    /// debug server. To expose it to Kubernetes probes, bind the pod IP or `0.0.0.0` and keep
    /// the port off any Service or Ingress.
    pub debug_addr: Option<Addr>,
    /// Bind the service's TCP address with `SO_REUSEPORT` (`SERVICEGROUP_REUSE_PORT=1`;
    /// default off), so that a new process can start on the same port before this one
    /// drains: start the new one, wait for its readiness, then send this one SIGTERM. Linux
    /// shares new connections among every process bound so; when this one's drain starts, it
    /// turns new connections away (they reach the others a second later, when their SYN is
    /// retried) and accepts for half a second more what was already on its way, so closing
    /// loses none. Not used for Unix sockets and listeners you pass in.
    pub reuse_port: bool,
    /// Time allowed to read a request head, from its first byte (for a connection's first
    /// request: from accept). On expiry the client gets 408 if it sent anything, and the
    /// connection closes (`SERVICEGROUP_HEADER_READ_TIMEOUT_MS`, 0 = off).
    pub header_read_timeout: Option<Duration>,
    /// Time allowed for everything after the head: reading the body, running the handler and
    /// writing the response. On expiry the handler's future is dropped; the client gets 503
    /// if no response head was sent yet, and the connection closes
    /// (`SERVICEGROUP_WRITE_TIMEOUT_MS`, 0 = off).
    pub write_timeout: Option<Duration>,
    /// Time a keep-alive connection may wait for its next request to start before it is
    /// closed (`SERVICEGROUP_IDLE_TIMEOUT_MS`, 0 = off).
    pub idle_timeout: Option<Duration>,
    /// Time an upgraded connection (a WebSocket, a `CONNECT` tunnel; see
    /// [`upgrade`](crate::upgrade)) may go without a byte read or written before it is closed
    /// (`SERVICEGROUP_UPGRADED_IDLE_TIMEOUT_MS`, 0 = off). Default off: once upgraded, the
    /// protocol owns its liveness (WebSocket pings, say) and the other timeouts no longer
    /// apply; set this so a dead peer cannot hold a connection forever.
    pub upgraded_idle_timeout: Option<Duration>,
    /// How long a graceful shutdown may drain before the remaining connections and members are
    /// cut (`SERVICEGROUP_SHUTDOWN_TIMEOUT_MS`). Counted from the end of `drain_delay`. Zero
    /// cuts whatever is open at once; a drain that cuts nothing is never an error.
    pub shutdown_timeout: Duration,
    /// After shutdown starts, keep accepting and serving this long (every response carrying
    /// `Connection: close`) so load balancers can stop sending traffic first
    /// (`SERVICEGROUP_DRAIN_DELAY_MS`). Default 0.
    pub drain_delay: Duration,
    /// Largest request head in bytes; larger heads get 431.
    pub max_header_bytes: usize,
    /// Most header fields in a request (at most 256); more get 431.
    pub max_headers: usize,
    /// Largest body [`Body::bytes`](crate::Body::bytes) reads; larger bodies give
    /// [`Error::BodyTooLarge`], which a handler answers with 413.
    pub max_body_bytes: u64,
    /// Most connections open at once; when reached, new connections wait in the listen
    /// backlog until one closes. `None`: no limit.
    pub max_connections: Option<usize>,
    /// Threads that run connections (`SERVICEGROUP_THREADS`). Default: one per core. With 0
    /// the group starts no thread at all: connections, the debug server, deadlines and the
    /// drain all run inside the future [`Group::run`](crate::Group::run) returns, on whatever
    /// polls it (see the crate docs' table of runtimes). Ignored by
    /// [`Group::run_on`](crate::Group::run_on), which uses the caller's executor. Each
    /// thread serves the connections placed on it, and a connection waits while its thread
    /// waits for a core: on a machine whose cores are kept busy by other processes too, fewer
    /// threads than cores, or `Group::run_on` an executor whose threads share every
    /// connection's tasks, can give a shorter latency tail (the README's Performance section
    /// measures both).
    pub threads: usize,
    /// Whether to log one line per exchange (`SERVICEGROUP_ACCESS_LOG=1`): logfmt, through the
    /// `log` facade on target `servicegroup::access` at info level. Default off; when off
    /// nothing is formatted. The line's fields are listed in the crate docs.
    pub access_log: bool,
    /// Whether [`Group::run`](crate::Group::run) handles SIGINT and SIGTERM (graceful
    /// shutdown; a second signal exits at once). Turn off when the application handles
    /// signals itself and calls [`Shutdown::start`](crate::Shutdown::start).
    pub handle_signals: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: Addr::Tcp(DEFAULT_ADDR),
            debug_addr: Some(Addr::Tcp(DEFAULT_DEBUG_ADDR)),
            reuse_port: false,
            header_read_timeout: Some(DEFAULT_TIMEOUT),
            write_timeout: Some(DEFAULT_TIMEOUT),
            idle_timeout: Some(DEFAULT_TIMEOUT),
            upgraded_idle_timeout: None,
            shutdown_timeout: DEFAULT_TIMEOUT,
            drain_delay: Duration::ZERO,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_connections: None,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            access_log: false,
            handle_signals: true,
        }
    }
}

impl Config {
    /// The defaults, overridden by these environment variables when set:
    ///
    /// | variable | field | value |
    /// |---|---|---|
    /// | `SERVICEGROUP_ADDR` | `addr` | `host:port` (e.g. `0.0.0.0:8080`), `unix:/path` or `unix:@name` |
    /// | `SERVICEGROUP_DEBUG_ADDR` | `debug_addr` | as `SERVICEGROUP_ADDR`, or `off` |
    /// | `SERVICEGROUP_REUSE_PORT` | `reuse_port` | `1` or `0` (also `true`, `false`) |
    /// | `SERVICEGROUP_HEADER_READ_TIMEOUT_MS` | `header_read_timeout` | milliseconds, 0 = off |
    /// | `SERVICEGROUP_WRITE_TIMEOUT_MS` | `write_timeout` | milliseconds, 0 = off |
    /// | `SERVICEGROUP_IDLE_TIMEOUT_MS` | `idle_timeout` | milliseconds, 0 = off |
    /// | `SERVICEGROUP_UPGRADED_IDLE_TIMEOUT_MS` | `upgraded_idle_timeout` | milliseconds, 0 = off |
    /// | `SERVICEGROUP_SHUTDOWN_TIMEOUT_MS` | `shutdown_timeout` | milliseconds (0: cut what is open at once) |
    /// | `SERVICEGROUP_DRAIN_DELAY_MS` | `drain_delay` | milliseconds |
    /// | `SERVICEGROUP_THREADS` | `threads` | a whole number; 0 = no threads of its own |
    /// | `SERVICEGROUP_ACCESS_LOG` | `access_log` | `1` or `0` (also `true`, `false`) |
    ///
    /// A value that does not parse is an [`Error::Config`] naming the variable and the value.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Config::from_env`] over any lookup function (tests use a map).
    pub(crate) fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut config = Config::default();
        let parse_ms = |name: &'static str| -> Result<Option<Duration>> {
            get(name)
                .map(|value| {
                    value.trim().parse::<u64>().map(Duration::from_millis).map_err(|_| Error::Config {
                        name,
                        value,
                        expected: "a whole number of milliseconds (0 switches a timeout off)",
                    })
                })
                .transpose()
        };
        let timeout = |name, current: Option<Duration>| -> Result<Option<Duration>> {
            Ok(match parse_ms(name)? {
                Some(d) if d.is_zero() => None,
                Some(d) => Some(d),
                None => current,
            })
        };
        if let Some(value) = get("SERVICEGROUP_ADDR") {
            config.addr = parse_addr("SERVICEGROUP_ADDR", value)?;
        }
        if let Some(value) = get("SERVICEGROUP_DEBUG_ADDR") {
            config.debug_addr = match value.trim() {
                "off" | "" => None,
                _ => Some(parse_addr("SERVICEGROUP_DEBUG_ADDR", value)?),
            };
        }
        config.header_read_timeout = timeout("SERVICEGROUP_HEADER_READ_TIMEOUT_MS", config.header_read_timeout)?;
        config.write_timeout = timeout("SERVICEGROUP_WRITE_TIMEOUT_MS", config.write_timeout)?;
        config.idle_timeout = timeout("SERVICEGROUP_IDLE_TIMEOUT_MS", config.idle_timeout)?;
        config.upgraded_idle_timeout = timeout("SERVICEGROUP_UPGRADED_IDLE_TIMEOUT_MS", config.upgraded_idle_timeout)?;
        if let Some(d) = parse_ms("SERVICEGROUP_SHUTDOWN_TIMEOUT_MS")? {
            config.shutdown_timeout = d;
        }
        if let Some(d) = parse_ms("SERVICEGROUP_DRAIN_DELAY_MS")? {
            config.drain_delay = d;
        }
        let flag = |name: &'static str, current: bool| -> Result<bool> {
            match get(name) {
                None => Ok(current),
                Some(value) => match value.trim() {
                    "1" | "true" => Ok(true),
                    "0" | "false" => Ok(false),
                    _ => Err(Error::Config { name, value, expected: "1 or 0 (true or false)" }),
                },
            }
        };
        config.access_log = flag("SERVICEGROUP_ACCESS_LOG", config.access_log)?;
        config.reuse_port = flag("SERVICEGROUP_REUSE_PORT", config.reuse_port)?;
        if let Some(value) = get("SERVICEGROUP_THREADS") {
            config.threads = match value.trim().parse::<usize>() {
                Ok(n) => n,
                _ => {
                    return Err(Error::Config {
                        name: "SERVICEGROUP_THREADS",
                        value,
                        expected: "a whole number of threads (0: none, everything runs inside `run`'s future)",
                    })
                }
            };
        }
        Ok(config)
    }

    /// Checks values no type can rule out, naming the field to fix.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |name, value: String, expected| Err(Error::Config { name, value, expected });
        if self.max_header_bytes == 0 {
            return bad("Config::max_header_bytes", "0".into(), "at least 1 byte");
        }
        if self.max_headers == 0 || self.max_headers > crate::h1::decode::MAX_HEADERS {
            return bad("Config::max_headers", self.max_headers.to_string(), "between 1 and 256");
        }
        if self.max_connections == Some(0) {
            return bad("Config::max_connections", "Some(0)".into(), "None or at least 1");
        }
        Ok(())
    }
}

/// Parses an [`Addr`] from the variable `name`; the error names the variable.
fn parse_addr(name: &'static str, value: String) -> Result<Addr> {
    value.parse().map_err(|e| match e {
        Error::Config { expected, .. } => Error::Config { name, value, expected },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.addr.to_string(), "0.0.0.0:8080");
        assert_eq!(c.debug_addr.as_ref().unwrap().to_string(), "127.0.0.1:6060");
        assert_eq!(c.header_read_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.write_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.max_header_bytes, 64 * 1024);
        assert_eq!(c.max_headers, 100);
        assert_eq!(c.threads, std::thread::available_parallelism().unwrap().get(), "one thread per core");
        c.validate().unwrap();
        let same = from(&[]).unwrap();
        assert_eq!(format!("{same:?}"), format!("{c:?}"));
    }

    #[test]
    fn environment_overrides() {
        let c = from(&[
            ("SERVICEGROUP_ADDR", "127.0.0.1:0"),
            ("SERVICEGROUP_DEBUG_ADDR", "off"),
            ("SERVICEGROUP_HEADER_READ_TIMEOUT_MS", "250"),
            ("SERVICEGROUP_WRITE_TIMEOUT_MS", "0"),
            ("SERVICEGROUP_IDLE_TIMEOUT_MS", "1000"),
            ("SERVICEGROUP_SHUTDOWN_TIMEOUT_MS", "5"),
            ("SERVICEGROUP_DRAIN_DELAY_MS", "7"),
            ("SERVICEGROUP_THREADS", "3"),
        ])
        .unwrap();
        assert_eq!(c.addr.to_string(), "127.0.0.1:0");
        assert!(c.debug_addr.is_none());
        assert_eq!(c.header_read_timeout, Some(Duration::from_millis(250)));
        assert_eq!(c.write_timeout, None);
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(1)));
        assert_eq!(c.shutdown_timeout, Duration::from_millis(5));
        assert_eq!(c.drain_delay, Duration::from_millis(7));
        assert_eq!(c.threads, 3);
        assert_eq!(from(&[("SERVICEGROUP_THREADS", "0")]).unwrap().threads, 0, "0: no threads of its own");
        assert!(from(&[("SERVICEGROUP_ACCESS_LOG", "1")]).unwrap().access_log);
        assert!(from(&[("SERVICEGROUP_REUSE_PORT", "true")]).unwrap().reuse_port);
        assert!(!Config::default().reuse_port);
        let c = from(&[("SERVICEGROUP_ADDR", "unix:/run/app.sock"), ("SERVICEGROUP_DEBUG_ADDR", "unix:@app-debug")])
            .unwrap();
        assert!(matches!(&c.addr, Addr::Unix(path) if path.to_str() == Some("/run/app.sock")));
        assert!(matches!(&c.debug_addr, Some(Addr::Abstract(name)) if name == "app-debug"));
        assert!(!Config::default().access_log);
        let c = from(&[("SERVICEGROUP_DEBUG_ADDR", "[::1]:9000"), ("SERVICEGROUP_ADDR", "localhost:81")]).unwrap();
        assert_eq!(c.debug_addr.unwrap().to_string(), "[::1]:9000");
        assert_eq!(c.addr.to_string(), "127.0.0.1:81");
    }

    #[test]
    fn bad_values_name_the_variable_and_the_value() {
        let table = [
            ("SERVICEGROUP_ADDR", "8080"),
            ("SERVICEGROUP_DEBUG_ADDR", "nowhere"),
            ("SERVICEGROUP_HEADER_READ_TIMEOUT_MS", "1s"),
            ("SERVICEGROUP_WRITE_TIMEOUT_MS", "-1"),
            ("SERVICEGROUP_IDLE_TIMEOUT_MS", "ten"),
            ("SERVICEGROUP_SHUTDOWN_TIMEOUT_MS", "1.5"),
            ("SERVICEGROUP_DRAIN_DELAY_MS", "x"),
            ("SERVICEGROUP_THREADS", "two"),
            ("SERVICEGROUP_ACCESS_LOG", "yes"),
            ("SERVICEGROUP_REUSE_PORT", "on"),
            ("SERVICEGROUP_ADDR", "unix:"),
            ("SERVICEGROUP_DEBUG_ADDR", "unix:@"),
        ];
        for (name, value) in table {
            let text = from(&[(name, value)]).unwrap_err().to_string();
            assert!(text.contains(name) && text.contains(value), "{text}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let c = Config { max_headers: 1000, ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("Config::max_headers"));
    }
}
