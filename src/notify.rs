//! The service manager's readiness protocol (sd_notify(3)): `READY=1`, `STOPPING=1`,
//! `STATUS=...` and `WATCHDOG=1`, one datagram each to the Unix socket `NOTIFY_SOCKET` names
//! (a path, or `@name` in Linux's abstract namespace). Knows nothing of HTTP.
//!
//! Written here rather than taken from the `sd-notify` crate: that crate reconnects from the
//! environment for every message and has no abstract-namespace addresses; this is one
//! connected datagram socket, opened once.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connected notification socket, and the watchdog interval if one is asked for.
pub(crate) struct Notifier {
    /// Connected to `NOTIFY_SOCKET`.
    socket: UnixDatagram,
    /// Half of `WATCHDOG_USEC`, when the watchdog is on for this process.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier when `NOTIFY_SOCKET` is set (a failure to connect is logged, and gives
    /// none: readiness is the manager's business, never a reason not to serve).
    pub(crate) fn from_env() -> Option<Notifier> {
        let target = std::env::var_os("NOTIFY_SOCKET")?;
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
        );
        match connect(&target) {
            Ok(socket) => {
                log::debug!("notifying the service manager at {}", target.to_string_lossy());
                Some(Notifier { socket, watchdog })
            }
            Err(e) => {
                log::warn!("NOTIFY_SOCKET={}: cannot connect: {e}; not notifying", target.to_string_lossy());
                None
            }
        }
    }

    /// How often to send `WATCHDOG=1`, if at all.
    pub(crate) fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (`KEY=value` lines). A manager that stopped listening is logged only.
    pub(crate) fn send(&self, state: &str) {
        if let Err(e) = self.socket.send(state.as_bytes()) {
            log::debug!("could not notify the service manager ({state:?}): {e}");
        }
    }
}

/// Half of `WATCHDOG_USEC` (as sd_watchdog_enabled(3) advises), when it is set, positive and
/// `WATCHDOG_PID` is unset or this process.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if pid.is_some_and(|pid| pid.trim() != std::process::id().to_string()) {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// A datagram socket connected to `target`: a path, or `@name` for an abstract socket.
fn connect(target: &std::ffi::OsStr) -> io::Result<UnixDatagram> {
    let socket = UnixDatagram::unbound()?;
    let bytes = target.as_encoded_bytes();
    match bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            socket.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)?;
        }
        #[cfg(not(target_os = "linux"))]
        Some(_) => return Err(io::Error::new(io::ErrorKind::Unsupported, "abstract sockets exist on Linux only")),
        None => socket.connect(target)?,
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_runs_at_half_its_interval_for_this_process_only() {
        let me = std::process::id().to_string();
        assert_eq!(watchdog_interval(Some("2000000"), None), Some(Duration::from_secs(1)));
        assert_eq!(watchdog_interval(Some("2000000"), Some(&me)), Some(Duration::from_secs(1)));
        assert_eq!(watchdog_interval(Some("2000000"), Some("1")), None, "another process's watchdog");
        assert_eq!(watchdog_interval(Some("0"), None), None);
        assert_eq!(watchdog_interval(Some("soon"), None), None);
        assert_eq!(watchdog_interval(None, Some(&me)), None);
    }

    #[test]
    fn messages_arrive_as_one_datagram_each_at_a_path_and_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("sg-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier { socket: connect(path.as_os_str()).unwrap(), watchdog: None };
        notifier.send("READY=1\nSTATUS=serving");
        notifier.send("STOPPING=1");
        let mut buf = [0; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        let _ = std::fs::remove_dir_all(&dir);

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("sg-notify-test-{}", std::process::id());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            let receiver = UnixDatagram::bind_addr(&addr).unwrap();
            let socket = connect(std::ffi::OsStr::new(&format!("@{name}"))).unwrap();
            Notifier { socket, watchdog: None }.send("WATCHDOG=1");
            let n = receiver.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"WATCHDOG=1");
        }
    }
}
