//! Where listeners come from: an address the group binds (TCP, a Unix socket path, a Linux
//! abstract socket), a listener the caller hands over ([`Listener`]), or systemd's socket
//! activation (`LISTEN_FDS`, see sd_listen_fds(3)). Knows nothing of HTTP: it yields
//! accepted streams and the peer each came from.
//!
//! A Unix socket file the group created is removed when its listener closes, unless another
//! process has replaced it since. A reuse-port listener turns new connections away before
//! it closes (see [`Bound::turn_away`]), so that closing it loses none.

use std::fmt;
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_io::Async;

use crate::config::Addr;
use crate::error::{Error, Result};

/// Listen backlog of a socket the group binds itself with `SO_REUSEPORT`: the figure nginx
/// and Go use on Linux is the kernel's cap (`somaxconn`, 4096 today); asking for more is
/// harmless, the kernel caps it.
const BACKLOG: i32 = 4096;

/// How long a closing reuse-port listener keeps accepting after it turned new connections
/// away: handshakes already under way complete in about one round trip, and this covers
/// round trips up to half a second. It stays well under the first SYN retransmission (1 s),
/// so a client turned away retries once the listener is gone and reaches its successor.
pub(crate) const TURN_AWAY_SETTLE: Duration = Duration::from_millis(500);

/// A listening socket you bound yourself, for [`Config::addr`](crate::Config::addr) or
/// [`Config::debug_addr`](crate::Config::debug_addr) (through [`Addr::Listener`], or `.into()`
/// from the listener).
///
/// Made from a `std::net::TcpListener`, an `async_net::TcpListener`, a
/// `std::os::unix::net::UnixListener` or an `async_net::unix::UnixListener`. Binding it, and
/// its errors, stay yours; everything else (timeouts, drain, metrics) is as for an address
/// the group binds. The group takes it when built, and closes it when the drain starts: keep
/// no other handle to it (an `async_net` clone, a `try_clone`), or new connections queue
/// unanswered until you drop yours.
///
/// ```
/// # fn main() -> servicegroup::Result<()> {
/// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
/// let mut config = servicegroup::Config::default();
/// config.addr = listener.into();
/// config.debug_addr = None;
/// # config.handle_signals = false;
/// let group = servicegroup::Group::new(|_req| async { servicegroup::http::Response::new("hi".into()) }, config)?;
/// assert!(group.addr().tcp().is_some());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Listener(Arc<Mutex<Option<Handed>>>);

/// A listener as handed over, before the group registers it with the reactor.
enum Handed {
    /// A std TCP listener.
    Tcp(TcpListener),
    /// A std Unix listener.
    Unix(UnixListener),
    /// An async-net TCP listener (its shared inner socket).
    AsyncTcp(Arc<Async<TcpListener>>),
    /// An async-net Unix listener.
    AsyncUnix(Arc<Async<UnixListener>>),
}

impl Listener {
    /// Wraps a listener as handed over.
    fn handed(handed: Handed) -> Listener {
        Listener(Arc::new(Mutex::new(Some(handed))))
    }

    /// Takes the socket out (once), registered with the reactor.
    fn take(&self) -> io::Result<Socket> {
        let handed = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        match handed {
            None => {
                Err(io::Error::other("this Listener was already taken by another Group (clones of a Config share it)"))
            }
            Some(Handed::Tcp(l)) => Ok(Socket::Tcp(Arc::new(Async::new(l)?))),
            Some(Handed::Unix(l)) => Ok(Socket::Unix(Arc::new(Async::new(l)?))),
            Some(Handed::AsyncTcp(l)) => Ok(Socket::Tcp(l)),
            Some(Handed::AsyncUnix(l)) => Ok(Socket::Unix(l)),
        }
    }

    /// Where it is bound, if it is still here.
    fn local_addr(&self) -> Option<Addr> {
        let handed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match handed.as_ref()? {
            Handed::Tcp(l) => l.local_addr().ok().map(Addr::Tcp),
            Handed::AsyncTcp(l) => l.get_ref().local_addr().ok().map(Addr::Tcp),
            Handed::Unix(l) => l.local_addr().ok().map(|a| unix_addr(&a)),
            Handed::AsyncUnix(l) => l.get_ref().local_addr().ok().map(|a| unix_addr(&a)),
        }
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.local_addr() {
            Some(addr) => write!(f, "listener on {addr}"),
            None => f.write_str("listener (taken)"),
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Listener {
        Listener::handed(Handed::Tcp(l))
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Listener {
        Listener::handed(Handed::Unix(l))
    }
}

impl From<async_net::TcpListener> for Listener {
    fn from(l: async_net::TcpListener) -> Listener {
        Listener::handed(Handed::AsyncTcp(l.into()))
    }
}

impl From<async_net::unix::UnixListener> for Listener {
    fn from(l: async_net::unix::UnixListener) -> Listener {
        Listener::handed(Handed::AsyncUnix(l.into()))
    }
}

/// A listening socket registered with the reactor.
enum Socket {
    /// TCP.
    Tcp(Arc<Async<TcpListener>>),
    /// A Unix stream socket.
    Unix(Arc<Async<UnixListener>>),
}

impl Socket {
    /// Where it is bound.
    fn local_addr(&self) -> io::Result<Addr> {
        match self {
            Socket::Tcp(l) => l.get_ref().local_addr().map(Addr::Tcp),
            Socket::Unix(l) => l.get_ref().local_addr().map(|a| unix_addr(&a)),
        }
    }
}

/// The [`Addr`] of a Unix socket address.
fn unix_addr(addr: &std::os::unix::net::SocketAddr) -> Addr {
    if let Some(path) = addr.as_pathname() {
        return Addr::Unix(path.to_path_buf());
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::linux::net::SocketAddrExt;
        if let Some(name) = addr.as_abstract_name() {
            return Addr::Abstract(String::from_utf8_lossy(name).into_owned());
        }
    }
    Addr::Unix(PathBuf::new())
}

/// Who is on the other end of a connection, as logs, the access log and the connections
/// view name it.
#[derive(Debug, Clone)]
pub(crate) enum Peer {
    /// A TCP client's address.
    Tcp(SocketAddr),
    /// A Unix socket client: unnamed as a rule, so named by the socket it came in on
    /// (`unix:/run/app.sock`). Shared by every connection of that listener.
    Unix(Arc<str>),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{addr}"),
            Peer::Unix(label) => f.write_str(label),
        }
    }
}

/// An accepted connection, its socket non-blocking and in no reactor yet (the runtime
/// registers it where its task will run).
pub(crate) enum Accepted {
    /// Over TCP, from this address.
    Tcp(TcpStream, SocketAddr),
    /// Over a Unix socket.
    Unix(UnixStream, Peer),
}

/// A listener ready to accept, and what closing it must clean up.
pub(crate) struct Bound {
    /// `"service"` or `"debug"`, for logs and errors.
    pub(crate) name: &'static str,
    /// The socket.
    socket: Socket,
    /// Where it is bound (port 0 resolved).
    addr: Addr,
    /// The peer every Unix connection shows as.
    unix_peer: Peer,
    /// The socket file the group created, removed when this drops.
    _file: Option<SocketFile>,
    /// Bound by the group with `SO_REUSEPORT`: turned away before it closes.
    reuse_port: bool,
}

impl Bound {
    /// Binds `addr` for the `name` server (or takes the [`Listener`] it holds); the error
    /// names the server and the address.
    pub(crate) fn bind(name: &'static str, addr: &Addr, reuse_port: bool) -> Result<Bound> {
        let bind_error = |source| Error::Bind { server: name, addr: addr.to_string(), source };
        let (socket, file, reuse_port) = match addr {
            Addr::Tcp(a) => {
                let listener = if reuse_port { bind_reuse_port(*a) } else { TcpListener::bind(a) };
                (
                    Socket::Tcp(Arc::new(Async::new(listener.map_err(bind_error)?).map_err(bind_error)?)),
                    None,
                    reuse_port,
                )
            }
            Addr::Unix(path) => {
                let (listener, file) = bind_unix(path).map_err(bind_error)?;
                (Socket::Unix(Arc::new(Async::new(listener).map_err(bind_error)?)), Some(file), false)
            }
            Addr::Abstract(name) => {
                let listener = bind_abstract(name).map_err(bind_error)?;
                (Socket::Unix(Arc::new(Async::new(listener).map_err(bind_error)?)), None, false)
            }
            Addr::Listener(listener) => (listener.take().map_err(bind_error)?, None, false),
        };
        Bound::new(name, socket, file, reuse_port).map_err(bind_error)
    }

    /// A bound listener over `socket`.
    fn new(name: &'static str, socket: Socket, file: Option<SocketFile>, reuse_port: bool) -> io::Result<Bound> {
        let addr = socket.local_addr()?;
        let unix_peer = Peer::Unix(addr.to_string().into());
        Ok(Bound { name, socket, addr, unix_peer, _file: file, reuse_port })
    }

    /// Where it is bound.
    pub(crate) fn addr(&self) -> &Addr {
        &self.addr
    }

    /// The next connection. Cancel safe: dropping the future accepts nothing.
    pub(crate) async fn accept(&self) -> io::Result<Accepted> {
        match &self.socket {
            Socket::Tcp(l) => {
                let (stream, peer) = l.read_with(|l| l.accept()).await?;
                stream.set_nonblocking(true)?;
                let _ = stream.set_nodelay(true);
                Ok(Accepted::Tcp(stream, peer))
            }
            Socket::Unix(l) => {
                let (stream, _) = l.read_with(|l| l.accept()).await?;
                stream.set_nonblocking(true)?;
                Ok(Accepted::Unix(stream, self.unix_peer.clone()))
            }
        }
    }

    /// Whether closing it needs [`Bound::turn_away`] first.
    pub(crate) fn is_reuse_port(&self) -> bool {
        self.reuse_port
    }

    /// Stops new connections from joining this listener's queue, while handshakes under way
    /// complete: a socket filter drops every SYN that is not a SYN-ACK, and the client
    /// retransmits it a second later, when this listener has closed and the other members
    /// of its `SO_REUSEPORT` group take it. Without this, Linux resets every connection still
    /// queued on a reuse-port listener when it closes (unless `net.ipv4.tcp_migrate_req=1`).
    /// The caller keeps accepting for [`TURN_AWAY_SETTLE`], then closes.
    pub(crate) fn turn_away(&self) -> io::Result<()> {
        let Socket::Tcp(listener) = &self.socket else { return Ok(()) };
        turn_away_syns(listener.get_ref())
    }
}

/// Binds a TCP listener with `SO_REUSEPORT` (and `SO_REUSEADDR`, as std does).
fn bind_reuse_port(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Attaches the filter of [`Bound::turn_away`].
#[cfg(target_os = "linux")]
fn turn_away_syns(listener: &TcpListener) -> io::Result<()> {
    use socket2::{SockFilter, SockRef};
    // Classic BPF over the TCP header (a socket filter sees the packet from there):
    // A = flags byte; A &= SYN|ACK; a bare SYN is dropped (return 0), anything else kept.
    const LD_B_ABS: u16 = 0x30;
    const AND_K: u16 = 0x54;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let program = [
        SockFilter::new(LD_B_ABS, 0, 0, 13),
        SockFilter::new(AND_K, 0, 0, 0x12),
        SockFilter::new(JEQ_K, 0, 1, 0x02),
        SockFilter::new(RET_K, 0, 0, 0),
        SockFilter::new(RET_K, 0, 0, u32::MAX),
    ];
    SockRef::from(listener).attach_filter(&program)
}

/// Elsewhere `SO_REUSEPORT` balances differently; nothing to turn away.
#[cfg(not(target_os = "linux"))]
fn turn_away_syns(_listener: &TcpListener) -> io::Result<()> {
    Ok(())
}

/// A socket file the group created: removed on drop if it is still the same file.
struct SocketFile {
    /// Its path.
    path: PathBuf,
    /// Device and inode when bound: another process may have replaced it since.
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let same = fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if same {
            match fs::remove_file(&self.path) {
                Ok(()) => log::debug!("removed socket file {}", self.path.display()),
                Err(e) => log::warn!("could not remove socket file {}: {e}", self.path.display()),
            }
        }
    }
}

/// Binds a Unix socket at `path`. A socket file nobody accepts on (left by a process that
/// crashed) is replaced; a live one, or a file that is not a socket, is an error that says so.
fn bind_unix(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way; remove it or choose another path",
            ))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is accepting connections on this socket; stop it or choose another path",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("replacing stale socket file {} (nothing accepts on it)", path.display());
                fs::remove_file(path)?;
            }
            Err(e) => return Err(e),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    let meta = fs::symlink_metadata(path)?;
    Ok((listener, SocketFile { path: path.to_path_buf(), id: (meta.dev(), meta.ino()) }))
}

/// Binds a Unix socket in Linux's abstract namespace: no file, gone with the last process
/// holding it.
#[cfg(target_os = "linux")]
fn bind_abstract(name: &str) -> io::Result<UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    UnixListener::bind_addr(&addr)
}

/// Abstract sockets are Linux's alone.
#[cfg(not(target_os = "linux"))]
fn bind_abstract(_name: &str) -> io::Result<UnixListener> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "abstract Unix sockets (unix:@name) exist on Linux only"))
}

/// Listeners systemd handed over (sd_listen_fds(3)).
#[derive(Default)]
pub(crate) struct Activated {
    /// The fd named `service`, or the only one.
    pub(crate) service: Option<Bound>,
    /// The fd named `debug`.
    pub(crate) debug: Option<Bound>,
}

/// First fd passed (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: usize = 3;

/// Takes the listeners systemd passed, if `LISTEN_FDS` is set and `LISTEN_PID` is this
/// process (or unset): fds 3.., matched by `LISTEN_FDNAMES` (`service`, `debug`; a single fd
/// of another name, or none, is the service). Unsets the three variables so children do not
/// inherit them. An fd that is not a listening stream socket, or a name that says nothing,
/// is an error naming it.
pub(crate) fn activated() -> Result<Activated> {
    let lookup = |name| std::env::var(name).ok();
    let Some(count) = lookup("LISTEN_FDS") else { return Ok(Activated::default()) };
    if let Some(pid) = lookup("LISTEN_PID").filter(|pid| !pid.is_empty()) {
        if pid.trim() != std::process::id().to_string() {
            log::debug!("LISTEN_FDS is for process {pid}, not this one; ignored");
            return Ok(Activated::default());
        }
    }
    let names: Vec<String> =
        lookup("LISTEN_FDNAMES").map(|n| n.split(':').map(str::to_owned).collect()).unwrap_or_default();
    let count: usize = count.trim().parse().map_err(|_| Error::Activation {
        fd: None,
        why: format!("LISTEN_FDS={count:?} is not a number of file descriptors"),
    })?;
    // listenfd reads LISTEN_FDS and LISTEN_PID again, and unsets them; the names are ours.
    let mut fds = listenfd::ListenFd::from_env();
    std::env::remove_var("LISTEN_FDNAMES");
    let mut activated = Activated::default();
    for index in 0..count {
        let fd = LISTEN_FDS_START + index;
        let name = names.get(index).map(String::as_str).unwrap_or("");
        let role = match name {
            "service" => "service",
            "debug" => "debug",
            _ if count == 1 => "service",
            _ => {
                return Err(Error::Activation {
                    fd: Some(fd),
                    why: format!(
                        "it is named {name:?}; with more than one socket, name them `service` and \
                         `debug` (FileDescriptorName= in the .socket units, or LISTEN_FDNAMES)"
                    ),
                })
            }
        };
        let bound = adopt(&mut fds, index, role).map_err(|why| Error::Activation { fd: Some(fd), why })?;
        let slot = if role == "service" { &mut activated.service } else { &mut activated.debug };
        if slot.is_some() {
            return Err(Error::Activation { fd: Some(fd), why: format!("a second socket is named {role:?}") });
        }
        log::info!("socket activation: the {role} server takes fd {fd} ({})", bound.addr);
        *slot = Some(bound);
    }
    Ok(activated)
}

/// Takes fd `index` as a listening stream socket for the `role` server, or says why not.
fn adopt(fds: &mut listenfd::ListenFd, index: usize, role: &'static str) -> std::result::Result<Bound, String> {
    let not_stream = "it is not a stream socket (TCP or Unix); use ListenStream= in the .socket unit";
    let socket = match fds.take_tcp_listener(index) {
        Ok(Some(l)) => {
            check_listening(&l)?;
            Socket::Tcp(Arc::new(Async::new(l).map_err(|e| e.to_string())?))
        }
        Ok(None) => return Err("it was not passed (LISTEN_FDS counts fewer)".into()),
        Err(_) => match fds.take_unix_listener(index) {
            Ok(Some(l)) => {
                check_listening(&l)?;
                Socket::Unix(Arc::new(Async::new(l).map_err(|e| e.to_string())?))
            }
            _ => return Err(not_stream.into()),
        },
    };
    Bound::new(role, socket, None, false).map_err(|e| e.to_string())
}

/// Errs unless `socket` is listening (`SO_ACCEPTCONN`).
fn check_listening(socket: &impl std::os::fd::AsFd) -> std::result::Result<(), String> {
    match socket2::SockRef::from(socket).is_listener() {
        Ok(true) => Ok(()),
        Ok(false) => Err("it is a stream socket that is not listening; use ListenStream= in the .socket unit".into()),
        Err(e) => Err(format!("cannot tell whether it is listening: {e}")),
    }
}
