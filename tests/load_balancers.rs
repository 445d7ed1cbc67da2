//! Rolling restarts behind real load balancers, HAProxy and nginx, configured as the README's
//! "Behind a load balancer" section shows: two example servers, keep-alive clients sending a
//! mix of quick, slow and body-carrying requests through the proxy, and each server in turn
//! stopped with SIGTERM and started again on the same ports. No request may fail, every old
//! process must exit 0, and no connection may hold a drain past its last response.
//!
//! Both proxies come from Debian (`.ci/run` installs them).

mod common;

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::Example;
use common::{eventually, Client, PATIENCE};

/// HAProxy checks `/readyz` this often, and marks a server down after this many failures.
const CHECK_INTERVAL_MS: u64 = 100;
const FALL: u64 = 2;

/// The servers keep serving (with `Connection: close`) this long after SIGTERM: more than the
/// interval times the fall count, as the README recommends.
const DRAIN_DELAY_MS: u64 = 500;

/// nginx's upstream keep-alive timeout: below the drain delay.
const NGINX_KEEPALIVE_MS: u64 = DRAIN_DELAY_MS / 2;

/// Keep-alive clients sending through the proxy.
const CLIENTS: usize = 12;

/// A drain must end this soon after the last response its server sent.
const DRAIN_AFTER_LAST_RESPONSE: Duration = Duration::from_secs(1);

/// A free loopback port for a backend or the proxy's front. Port 0 will not do: a port the
/// kernel hands out is in its ephemeral range, where the proxies' upstream connections, the
/// health checks and the clients take their source ports, so one of them may hold it by the
/// time a backend binds it (CI saw a backend fail to start that way). So the port comes from
/// below that range, distinct for each call in this process (the two tests run in parallel),
/// and free when picked.
fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (low, span) = (10_000, ephemeral_low.saturating_sub(10_000).max(1000));
    let start = std::process::id() % span;
    for _ in 0..span {
        let port = (low + (start + NEXT.fetch_add(1, Ordering::SeqCst)) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{}", low + span)
}

/// One backend: its fixed ports and the running example server.
struct Backend {
    port: u16,
    debug_port: u16,
    server: Option<Example>,
}

impl Backend {
    fn start(&mut self) {
        let (addr, debug) = (format!("127.0.0.1:{}", self.port), format!("127.0.0.1:{}", self.debug_port));
        let drain_delay = DRAIN_DELAY_MS.to_string();
        let env = [
            ("SERVICEGROUP_ADDR", addr.as_str()),
            ("SERVICEGROUP_DEBUG_ADDR", debug.as_str()),
            ("SERVICEGROUP_DRAIN_DELAY_MS", drain_delay.as_str()),
            ("SERVICEGROUP_SHUTDOWN_TIMEOUT_MS", "10000"),
        ];
        self.server = Some(Example::start("", &env));
    }
}

/// A proxy in the foreground, killed when dropped.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `program` with `args` until dropped; waits until it accepts on `front`.
fn start_proxy(program: &str, args: &[&std::ffi::OsStr], front: u16) -> Proxy {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} could not start ({e}): `apt-get install -y {program}` (.ci/run does)"));
    let proxy = Proxy(child);
    let addr: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
    eventually("the proxy accepts connections", || TcpStream::connect(addr).is_ok());
    proxy
}

/// HAProxy: health checks on `/readyz` of each debug port, the backend's name in `X-Backend`.
fn haproxy(front: u16, backends: &[Backend], dir: &std::path::Path) -> Proxy {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("    server s{i} 127.0.0.1:{} check port {}\n", b.port, b.debug_port))
        .collect();
    let config = format!(
        "global\n    maxconn 1000\n\
         defaults\n    mode http\n    timeout connect 1s\n    timeout client 10s\n    timeout server 10s\n    \
         timeout http-keep-alive 10s\n    option http-keep-alive\n    retries 0\n\
         frontend fe\n    bind 127.0.0.1:{front}\n    default_backend be\n\
         backend be\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n    \
         http-response set-header X-Backend %s\n    \
         default-server inter {CHECK_INTERVAL_MS}ms fall {FALL} rise 1\n{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    start_proxy("haproxy", &["-db".as_ref(), "-f".as_ref(), path.as_os_str()], front)
}

/// nginx (open source: no active health checks): upstream keep-alive with an idle timeout
/// shorter than the drain delay (so nginx has dropped its idle connections to a draining
/// server before that server closes them), the next upstream on a refused connection (safe
/// for any method: nothing was sent), servers never marked down (`max_fails=0`: a server
/// being restarted costs a refused connect, and never leaves nginx with no live upstream),
/// the upstream's address in `X-Backend`.
fn nginx(front: u16, backends: &[Backend], dir: &std::path::Path) -> Proxy {
    let servers: String =
        backends.iter().map(|b| format!("        server 127.0.0.1:{} max_fails=0;\n", b.port)).collect();
    let d = dir.display();
    let config = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    \
         fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n    \
         upstream app {{\n{servers}        keepalive 32;\n        keepalive_timeout {NGINX_KEEPALIVE_MS}ms;\n    }}\n    \
         server {{\n        listen 127.0.0.1:{front};\n        location / {{\n            \
         proxy_pass http://app;\n            proxy_http_version 1.1;\n            \
         proxy_set_header Connection \"\";\n            proxy_next_upstream error timeout;\n            \
         add_header X-Backend $upstream_addr always;\n        }}\n    }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let error_log = dir.join("nginx-startup.log");
    start_proxy("nginx", &["-e".as_ref(), error_log.as_os_str(), "-c".as_ref(), path.as_os_str()], front)
}

/// What the clients saw: for each response, which backend sent it (`X-Backend`, the last
/// one if the proxy tried several) and when it was complete.
#[derive(Default)]
struct Seen {
    responses: Vec<(String, Instant)>,
    failures: Vec<String>,
}

/// One keep-alive client: GET /ping, GET /work?ms=100 and POST /echo of 1 KiB, in turn,
/// until `stop`. Every response must be a 200 with the right body. The POST's body follows
/// its head a moment later, as a streaming client sends it (and as the proxy then forwards
/// it: in its own segment, after the handler started waiting for it).
fn client(addr: SocketAddr, id: usize, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let payload: Vec<u8> = (0..1024).map(|i| b'a' + ((i + id) % 26) as u8).collect();
    let echo = format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n", payload.len()).into_bytes();
    let requests: [(&[u8], &[u8], &[u8]); 3] = [
        (b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n", b"", b"pong"),
        (b"GET /work?ms=100 HTTP/1.1\r\nHost: t\r\n\r\n", b"", b"worked for 100 ms\n"),
        (&echo, &payload, &payload),
    ];
    let mut conn = Client::new(addr);
    let mut turn = id;
    while !stop.load(Ordering::SeqCst) {
        let (head, body, expected) = requests[turn % requests.len()];
        turn += 1;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            conn.send(head);
            if !body.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
            }
            conn.request(body)
        }));
        let mut seen = seen.lock().unwrap();
        match outcome {
            Ok(r) if r.status == 200 && r.body == expected => {
                let backend = r.header("x-backend").and_then(|b| b.rsplit(", ").next()).unwrap_or("");
                seen.responses.push((backend.to_string(), Instant::now()));
            }
            Ok(r) => {
                seen.failures.push(format!("client {id}: {} {:?}\n{}", r.status, r.text(), r.head));
                drop(seen);
                conn = Client::new(addr);
            }
            Err(_) => {
                seen.failures.push(format!("client {id}: the connection failed mid-request"));
                drop(seen);
                conn = Client::new(addr);
            }
        }
    }
}

#[test]
fn a_rolling_restart_behind_haproxy_fails_no_request_and_every_drain_ends_promptly() -> io::Result<()> {
    rolling_restart("haproxy", haproxy, |i, _| format!("s{i}"))
}

#[test]
fn a_rolling_restart_behind_nginx_fails_no_request_and_every_drain_ends_promptly() -> io::Result<()> {
    rolling_restart("nginx", nginx, |_, backend| format!("127.0.0.1:{}", backend.port))
}

/// Starts two backends behind the proxy `start` configures, then restarts each twice under
/// load. `label` is how the proxy names backend `i` in `X-Backend`.
fn rolling_restart(
    name: &str,
    start: fn(u16, &[Backend], &std::path::Path) -> Proxy,
    label: fn(usize, &Backend) -> String,
) -> io::Result<()> {
    let dir = std::env::temp_dir().join(format!("servicegroup-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut backends: Vec<Backend> =
        (0..2).map(|_| Backend { port: free_port(), debug_port: free_port(), server: None }).collect();
    backends.iter_mut().for_each(Backend::start);
    let labels: Vec<String> = backends.iter().enumerate().map(|(i, b)| label(i, b)).collect();
    let front = free_port();
    let _proxy = start(front, &backends, &dir);
    let addr: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || client(addr, id, stop, seen))
        })
        .collect();
    let served_by = |backend: usize, since: Instant| {
        seen.lock().unwrap().responses.iter().any(|(b, at)| *b == labels[backend] && *at > since)
    };
    let start = Instant::now();
    eventually("both backends serve through the proxy", || served_by(0, start) && served_by(1, start));

    for round in 0..2 {
        for (i, backend) in backends.iter_mut().enumerate() {
            let mut old = backend.server.take().unwrap();
            let signalled = Instant::now();
            old.signal("TERM");
            let status = old.wait(PATIENCE);
            let exited = Instant::now();
            let log = old.log();
            assert!(status.success(), "round {round}, s{i}: {status:?}\n{log}");
            assert!(!log.contains("cut"), "round {round}, s{i} cut connections:\n{log}");
            let last = seen.lock().unwrap().responses.iter().filter(|(b, _)| *b == labels[i]).map(|&(_, at)| at).max();
            let last = last.expect("the backend served something");
            // The drain delay itself runs from the signal; past it, only a stuck connection
            // could keep the process alive.
            let drained_at = last.max(signalled + Duration::from_millis(DRAIN_DELAY_MS));
            assert!(
                exited.saturating_duration_since(drained_at) < DRAIN_AFTER_LAST_RESPONSE,
                "round {round}, s{i}: exited {:?} after its last response and {:?} after the signal\n{log}",
                exited - last,
                exited - signalled
            );
            drop(old);
            backend.start();
            let restarted = Instant::now();
            eventually("the restarted backend serves through the proxy", || served_by(i, restarted));
        }
    }

    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().expect("client thread");
    }
    let seen = seen.lock().unwrap();
    assert!(seen.failures.is_empty(), "{} failed request(s):\n{}", seen.failures.len(), seen.failures.join("\n"));
    assert!(seen.responses.len() > 100, "only {} responses", seen.responses.len());
    let _ = std::fs::remove_dir_all(&dir);
    let _ = io::stderr().flush();
    Ok(())
}
