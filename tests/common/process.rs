//! Runs the example server as a child process and reads its addresses from its log.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The example server's binary, which `cargo test` builds next to the test binaries.
pub fn example_server() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    let path = dir.join("examples").join("example_server");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test` (it builds the examples) or `cargo build --examples`",
        path.display()
    );
    path
}

/// `curl --include URL` over the Unix socket at `path`; the response, once curl succeeded.
pub fn curl_unix(path: &std::path::Path, url: &str) -> String {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "20", "--unix-socket"])
        .arg(path)
        .args(["--include", url])
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running example server.
pub struct Example {
    /// The process.
    pub child: Child,
    /// The service address.
    pub addr: SocketAddr,
    /// The debug address, when enabled.
    pub debug_addr: Option<SocketAddr>,
    /// Everything it logged so far.
    pub log: Arc<Mutex<String>>,
}

impl Example {
    /// Starts the example through `bash -c "<prefix> exec <server>"` with extra environment
    /// (bash: its redirections take fds above 9).
    pub fn start(shell_prefix: &str, env: &[(&str, &str)]) -> Example {
        let script = format!("{shell_prefix} exec \"$0\"");
        let mut command = Command::new("bash");
        command.arg("-c").arg(script).arg(example_server());
        for (k, v) in env {
            command.env(k, v);
        }
        Example::spawn(command)
    }

    /// Spawns `command` (which runs the example server, with `SERVICEGROUP_ADDR` and
    /// `SERVICEGROUP_DEBUG_ADDR` at loopback port 0 unless it sets them) and waits for its
    /// start line.
    pub fn spawn(mut command: Command) -> Example {
        let set = |command: &Command, name: &str| command.get_envs().any(|(k, _)| k == name);
        if !set(&command, "SERVICEGROUP_ADDR") {
            command.env("SERVICEGROUP_ADDR", "127.0.0.1:0");
        }
        if !set(&command, "SERVICEGROUP_DEBUG_ADDR") {
            command.env("SERVICEGROUP_DEBUG_ADDR", "127.0.0.1:0");
        }
        let mut child =
            command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
        let log = Arc::new(Mutex::new(String::new()));
        let (lines, first) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + super::PATIENCE;
        let line = loop {
            let Ok(line) = first.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
                let _ = child.kill();
                let status = child.wait();
                panic!("the example server never said where it listens ({status:?}); log:\n{}", log.lock().unwrap());
            };
            if line.contains("serving http://") {
                break line;
            }
        };
        let url = |after: &str| -> Option<SocketAddr> {
            let rest = &line[line.find(after)? + after.len()..];
            rest[..rest.find('/')?].parse().ok()
        };
        let addr = url("serving http://").expect("service address");
        let debug_addr = url("debug server on http://");
        Example { child, addr, debug_addr, log }
    }

    /// Sends a signal by name (`TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let script = format!("kill -s {name} {}", self.child.id());
        let status = Command::new("sh").arg("-c").arg(script).status().expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, up to `patience`.
    pub fn wait(&mut self, patience: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the example server did not exit; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the debug server's `/metrics` has `line` (a whole line, with its newline).
    pub fn metric(&self, line: &str) -> bool {
        let debug = self.debug_addr.expect("the example's debug server");
        super::exchange(debug, b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").contains(line)
    }

    /// Starts `/work?ms=N` on a new connection and waits until it is in the handler (by the
    /// debug server's `servicegroup_requests_in_flight`).
    pub fn start_work(&self, ms: u64) -> std::net::TcpStream {
        use std::io::Write;
        let mut stream = super::connect(self.addr);
        stream.write_all(&super::get(&format!("/work?ms={ms}"))).unwrap();
        super::eventually("the request is in flight", || self.metric("servicegroup_requests_in_flight 1\n"));
        stream
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
