//! The example server under a process manager: listening sockets passed as systemd passes
//! them (fds 3 and 4, `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`), and through the real
//! `systemd-socket-activate`; readiness and the watchdog on `NOTIFY_SOCKET`; a restart on
//! the same port with `SO_REUSEPORT` that no client notices; and PID 1 of its own PID
//! namespace, as in a container.
//!
//! Every test here spawns processes, some with sockets whose close-on-exec flag is cleared
//! so the child inherits them: they run one at a time ([`serial`]) so that no other child
//! inherits those too.

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::process::{example_server, Example};
use common::PATIENCE;

/// Held by each test: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh directory for one test's sockets.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sg-systemd-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Lets a child inherit `socket`.
fn inheritable(socket: &impl std::os::fd::AsFd) {
    socket2::SockRef::from(socket).set_cloexec(false).expect("clear FD_CLOEXEC");
}

/// The shell lines that move `fds` to 3, 4, ... and set the activation variables for the
/// process the shell then execs (`$$` is that process: `exec` keeps the pid).
fn activation_prefix(fds: &[i32], names: Option<&str>) -> String {
    // Through fds 100.. first, so that a socket already at 3 or 4 is not overwritten.
    let mut script = String::from("exec");
    for (i, fd) in fds.iter().enumerate() {
        script.push_str(&format!(" {}<&{fd} {fd}<&-", 100 + i));
    }
    for i in 0..fds.len() {
        script.push_str(&format!(" {}<&{} {}<&-", 3 + i, 100 + i, 100 + i));
    }
    script.push_str(&format!("; export LISTEN_PID=$$ LISTEN_FDS={}", fds.len()));
    if let Some(names) = names {
        script.push_str(&format!(" LISTEN_FDNAMES={names}"));
    }
    script.push(';');
    script
}

/// GET `path` with `Connection: close`; the whole response.
fn get(addr: SocketAddr, path: &str) -> String {
    common::exchange(addr, format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
}

#[test]
fn fds_3_and_4_passed_as_systemd_does_serve_the_service_and_the_debug_server() -> io::Result<()> {
    let _serial = serial();
    let service = TcpListener::bind("127.0.0.1:0")?;
    let debug = TcpListener::bind("127.0.0.1:0")?;
    let (service_addr, debug_addr) = (service.local_addr()?, debug.local_addr()?);
    inheritable(&service);
    inheritable(&debug);
    // Named the other way round from their order, to show the names decide.
    let prefix = activation_prefix(&[debug.as_raw_fd(), service.as_raw_fd()], Some("debug:service"));
    let mut example = Example::start(&prefix, &[]);
    drop((service, debug));
    assert_eq!(example.addr, service_addr, "the service serves on the fd named service");
    assert_eq!(example.debug_addr, Some(debug_addr), "the debug server on the fd named debug");
    let log = example.log();
    assert!(log.contains("socket activation: the service server takes fd 4"), "{log}");
    assert!(log.contains("socket activation: the debug server takes fd 3"), "{log}");
    assert!(get(service_addr, "/").ends_with("\r\n\r\nhello"));
    assert!(get(debug_addr, "/healthz").starts_with("HTTP/1.1 200 OK\r\n"));
    example.signal("TERM");
    assert!(example.wait(PATIENCE).success(), "{}", example.log());
    assert_eq!(
        TcpStream::connect(service_addr).unwrap_err().kind(),
        io::ErrorKind::ConnectionRefused,
        "the inherited listener closed with the process"
    );
    Ok(())
}

#[test]
fn a_single_unnamed_fd_is_the_service() -> io::Result<()> {
    let _serial = serial();
    let service = TcpListener::bind("127.0.0.1:0")?;
    let service_addr = service.local_addr()?;
    inheritable(&service);
    let prefix = activation_prefix(&[service.as_raw_fd()], None);
    let mut example = Example::start(&prefix, &[("SERVICEGROUP_DEBUG_ADDR", "off")]);
    drop(service);
    assert_eq!(example.addr, service_addr);
    assert!(get(service_addr, "/ping").ends_with("pong"));
    example.signal("TERM");
    assert!(example.wait(PATIENCE).success(), "{}", example.log());
    Ok(())
}

/// Runs the example with `prefix` and expects it to fail at start; returns its log.
fn fails_to_start(prefix: &str) -> String {
    let script = format!("{prefix} exec \"$0\"");
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg(example_server())
        .env("SERVICEGROUP_ADDR", "127.0.0.1:0")
        .env("SERVICEGROUP_DEBUG_ADDR", "off")
        .stdin(Stdio::null())
        .output()
        .expect("spawn");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "it must not start: {log}");
    log
}

#[test]
fn an_fd_that_is_not_a_listening_stream_socket_is_an_error_naming_it() -> io::Result<()> {
    let _serial = serial();
    let datagram = std::net::UdpSocket::bind("127.0.0.1:0")?;
    inheritable(&datagram);
    let log = fails_to_start(&activation_prefix(&[datagram.as_raw_fd()], Some("service")));
    assert!(log.contains("socket activation: fd 3: it is not a stream socket"), "{log}");

    // A stream socket that was bound but never listens.
    let idle = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    idle.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    inheritable(&idle);
    let log = fails_to_start(&activation_prefix(&[idle.as_raw_fd()], Some("service")));
    assert!(log.contains("socket activation: fd 3: it is a stream socket that is not listening"), "{log}");

    // Two sockets, one named for neither server.
    let (a, b) = (TcpListener::bind("127.0.0.1:0")?, TcpListener::bind("127.0.0.1:0")?);
    inheritable(&a);
    inheritable(&b);
    let log = fails_to_start(&activation_prefix(&[a.as_raw_fd(), b.as_raw_fd()], Some("service:metrics")));
    assert!(log.contains("socket activation: fd 4: it is named \"metrics\""), "{log}");
    Ok(())
}

#[test]
fn systemd_socket_activate_starts_the_example_on_the_first_connection_over_a_unix_socket() -> io::Result<()> {
    let _serial = serial();
    let dir = temp_dir("activate");
    let path = dir.join("app.sock");
    let mut child = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&path)
        .args(["--fdname=service", "-E", "SERVICEGROUP_DEBUG_ADDR=off", "-E", "RUST_LOG=info"])
        .arg(example_server())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = lines.next().expect("a line from systemd-socket-activate")?;
    assert!(listening.contains("Listening on"), "{listening}");
    // The first connection starts the server (systemd-socket-activate execs it with fd 3).
    let text = common::process::curl_unix(&path, "http://localhost/ping");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("pong"), "{text}");
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line?;
        log.push_str(&line);
        log.push('\n');
        if line.contains("example_server: serving") {
            break;
        }
    }
    assert!(log.contains("socket activation: the service server takes fd 3"), "{log}");
    assert!(log.contains(&format!("serving unix:{}", path.display())), "{log}");
    let status = Command::new("kill").args(["-s", "TERM", &child.id().to_string()]).status()?;
    assert!(status.success());
    let exit = child.wait()?;
    assert!(exit.success(), "{exit:?}");
    Ok(())
}

/// A datagram socket standing in for systemd's notification socket.
struct Manager {
    /// Bound at `path`.
    socket: UnixDatagram,
    /// Its path, for `NOTIFY_SOCKET`.
    path: PathBuf,
}

impl Manager {
    fn new(test: &str) -> Manager {
        let path = temp_dir(test).join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        Manager { socket, path }
    }

    /// The next message.
    fn next(&self) -> String {
        let mut buf = [0; 4096];
        let n = self.socket.recv(&mut buf).expect("a notification before the patience ran out");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

#[test]
fn readiness_stopping_status_and_the_watchdog_reach_the_notify_socket_in_order() -> io::Result<()> {
    let _serial = serial();
    let manager = Manager::new("notify");
    let path = manager.path.to_str().unwrap().to_string();
    let mut example = Example::start("", &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "200000")]);
    let ready = manager.next();
    assert!(ready.starts_with("READY=1\n"), "the first message is READY=1: {ready:?}");
    assert!(ready.contains(&format!("STATUS=serving http://{}", example.addr)), "{ready:?}");
    // Ready means accepting: a request now is served.
    assert!(get(example.addr, "/ping").ends_with("pong"));
    // The watchdog beats every 100 ms (half of WATCHDOG_USEC).
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(manager.next(), "WATCHDOG=1");
    }
    assert!(started.elapsed() >= Duration::from_millis(150), "three beats take at least two intervals");
    // A request in flight when the drain starts.
    let mut slow = example.start_work(600);
    example.signal("TERM");
    let mut response = String::new();
    slow.read_to_string(&mut response)?;
    assert!(response.contains("worked for 600 ms"), "{response}");
    assert!(example.wait(PATIENCE).success(), "{}", example.log());
    // Everything it sent is queued on the socket; read it in order.
    manager.socket.set_nonblocking(true)?;
    let mut after = Vec::new();
    let mut buf = [0; 4096];
    while let Ok(n) = manager.socket.recv(&mut buf) {
        after.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let log = example.log();
    let stopping = after.iter().position(|m| m.starts_with("STOPPING=1")).unwrap_or_else(|| panic!("{after:?}\n{log}"));
    assert!(after[..stopping].iter().all(|m| m == "WATCHDOG=1"), "only beats before STOPPING: {after:?}");
    assert_eq!(after[stopping], "STOPPING=1\nSTATUS=draining 1 connections", "{after:?}");
    assert_eq!(after.last().unwrap(), "STATUS=drained", "{after:?}\n{log}");
    let during = &after[stopping + 1..after.len() - 1];
    assert!(during.iter().all(|m| m == "WATCHDOG=1" || m.starts_with("STATUS=draining")), "{after:?}");
    assert!(during.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2, "the watchdog beats while draining: {after:?}");
    Ok(())
}

/// Clients that open a new connection per request, back to back, and count what failed.
struct Clients {
    /// Set to stop them.
    stop: Arc<AtomicBool>,
    /// Requests answered 200.
    served: Arc<AtomicUsize>,
    /// What went wrong, one line per failure.
    failures: Arc<Mutex<Vec<String>>>,
    /// The threads.
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Clients {
    fn start(addr: SocketAddr, n: usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..n)
            .map(|_| {
                let (stop, served, failures) = (stop.clone(), served.clone(), failures.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match one_request(addr) {
                            Ok(()) => served.fetch_add(1, Ordering::SeqCst),
                            Err(e) => {
                                failures.lock().unwrap().push(e.to_string());
                                0
                            }
                        };
                    }
                })
            })
            .collect();
        Clients { stop, served, failures, threads }
    }

    /// Stops them; the failures.
    fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.served.load(Ordering::SeqCst), failures)
    }
}

/// One request on a new connection; an error for anything but a whole 200 response.
fn one_request(addr: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, PATIENCE)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.write_all(b"GET /ping HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if response.starts_with("HTTP/1.1 200 OK\r\n") && response.ends_with("pong") {
        Ok(())
    } else {
        Err(io::Error::other(format!("unexpected response {response:?}")))
    }
}

/// Access-log lines (one per request) in a process's log.
fn served_by(example: &Example) -> usize {
    example.log().lines().filter(|line| line.contains("path=\"/ping\"")).count()
}

#[test]
fn a_restart_on_the_same_port_with_reuse_port_loses_no_connection_and_no_request() -> io::Result<()> {
    let _serial = serial();
    let env = [("SERVICEGROUP_REUSE_PORT", "1"), ("SERVICEGROUP_ACCESS_LOG", "1"), ("SERVICEGROUP_DEBUG_ADDR", "off")];
    let mut old = Example::start("", &env);
    let addr = old.addr;
    let clients = Clients::start(addr, 16);
    common::eventually("the old process serves", || served_by(&old) > 50);

    // The recipe: start the new process on the same port, wait for its readiness, then
    // SIGTERM the old one.
    let manager = Manager::new("reuse-port");
    let port = addr.to_string();
    let notify = manager.path.to_str().unwrap().to_string();
    let mut env_new = env.to_vec();
    env_new.push(("SERVICEGROUP_ADDR", &port));
    env_new.push(("NOTIFY_SOCKET", &notify));
    let mut new = Example::start("", &env_new);
    assert!(manager.next().starts_with("READY=1"));
    common::eventually("both processes serve", || served_by(&new) > 50);
    let old_before_term = served_by(&old);
    old.signal("TERM");
    assert!(old.wait(PATIENCE).success(), "{}", old.log());
    // Clients turned away by the old listener retry their SYN a second later: keep going
    // past that, so any of them that failed would be counted.
    let after = served_by(&new);
    std::thread::sleep(Duration::from_millis(1500));
    let (served, failures) = clients.stop();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the hand-over: {:?}",
        failures.len(),
        served + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(served_by(&new) > after, "the new process went on serving");
    assert!(old_before_term > 50);
    let old_log = old.log();
    assert!(old_log.contains("turning new connections away"), "{old_log}");
    new.signal("TERM");
    assert!(new.wait(PATIENCE).success(), "{}", new.log());
    Ok(())
}

/// The example server as PID 1 of a new PID namespace (what a container runs): there, a
/// signal without a handler does nothing, so only the server's own handling can stop it.
fn as_pid_1(signal: &str) -> io::Result<()> {
    let _serial = serial();
    let mut command = Command::new("unshare");
    command.args(["--pid", "--fork", "--mount-proc", "--kill-child"]).arg(example_server());
    let mut example = Example::spawn(command);
    // unshare forks the server as PID 1 of the namespace and waits for it; signal the server.
    let unshare = example.child.id();
    let children = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))?;
    let server: u32 = children.split_whitespace().next().expect("unshare's child").parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{server}/status"))?;
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).expect("NSpid").to_string();
    assert!(nspid.trim_end().ends_with("\t1"), "the server is PID 1 in its namespace: {nspid}");
    // In the handler before the signal, so the drain has a request to finish.
    let mut slow = example.start_work(300);
    let sent = Command::new("kill").args(["-s", signal, &server.to_string()]).status()?;
    assert!(sent.success());
    let mut response = String::new();
    slow.read_to_string(&mut response)?;
    assert!(response.contains("worked for 300 ms"), "the request in flight finished: {response}");
    let exit = example.wait(PATIENCE);
    assert!(exit.success(), "{exit:?}: {}", example.log());
    assert!(example.log().contains("drained"), "{}", example.log());
    Ok(())
}

#[test]
fn as_pid_1_of_a_pid_namespace_sigterm_drains_and_exits_0() -> io::Result<()> {
    as_pid_1("TERM")
}

#[test]
fn as_pid_1_of_a_pid_namespace_sigint_drains_and_exits_0() -> io::Result<()> {
    as_pid_1("INT")
}

#[test]
fn the_example_systemd_units_verify() -> io::Result<()> {
    let _serial = serial();
    // systemd-analyze checks that ExecStart= exists: point it at the example built here.
    let dir = temp_dir("units");
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd");
    for name in ["servicegroup-example.socket", "servicegroup-example.service"] {
        let text = std::fs::read_to_string(units.join(name))?;
        let text = text.replace("/usr/local/bin/example_server", example_server().to_str().unwrap());
        std::fs::write(dir.join(name), text)?;
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("servicegroup-example.socket"))
        .arg(dir.join("servicegroup-example.service"))
        .output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    let service = std::fs::read_to_string(units.join("servicegroup-example.service"))?;
    for line in ["Type=notify", "WatchdogSec=", "KillSignal=SIGTERM", "TimeoutStopSec=45s"] {
        assert!(service.contains(line), "{line} in the .service");
    }
    Ok(())
}
