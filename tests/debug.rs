//! The debug server over loopback: profiles, flamegraphs, metrics, health and readiness.

#[macro_use]
mod common;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, connect, eventually, exchange, get, read_to_close, Client, Server};
use servicegroup::http::{Request, Response};
use servicegroup::Body;

/// `/burn?ms=N` spins the CPU for N ms in a recognisable function; `/panic` panics; `/slow`
/// sleeps 500 ms; anything else says hello.
fn app() -> impl servicegroup::Handler {
    |req: Request<Body>| async move {
        match req.uri().path() {
            "/burn" => Response::new(Body::from(burn_cpu_for_the_profile(Duration::from_millis(20)).to_string())),
            "/panic" => panic!("on purpose"),
            "/slow" => {
                async_io::Timer::after(Duration::from_millis(500)).await;
                Response::new(Body::from("slow"))
            }
            _ => Response::new(Body::from("hello")),
        }
    }
}

#[inline(never)]
fn burn_cpu_for_the_profile(budget: Duration) -> u64 {
    let start = Instant::now();
    let mut x = 0u64;
    while start.elapsed() < budget {
        for i in 0..10_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
    x
}

/// The profiler is process-wide: tests that take profiles take turns.
#[cfg(feature = "pprof")]
static PROFILER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn debug_server() -> Server {
    let mut cfg = config();
    cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
    Server::start(app(), cfg)
}

/// GET `path` on a new connection; the parsed response.
fn fetch(addr: SocketAddr, path: &str) -> common::Response {
    Client::new(addr).request(&get(path))
}

/// Keeps a client burning CPU on the service until dropped.
struct Load(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut client = Client::new(addr);
            while !flag.load(Ordering::SeqCst) {
                assert_eq!(client.request(&get("/burn")).status, 200);
            }
        });
        Load(stop, Some(thread))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
        let _ = self.1.take().unwrap().join();
    }
}

in_every_runtime! {
    #[cfg(feature = "pprof")]
    fn a_cpu_profile_is_gzipped_pprof_with_samples_of_the_busy_handler() -> io::Result<()> {
        use pprof::protos::Message;
        let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
        let server = debug_server();
        let debug = server.debug_addr.unwrap();
        let load = Load::start(server.addr);
        let response = fetch(debug, "/debug/pprof/profile?seconds=2");
        drop(load);
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.header("content-type"), Some("application/octet-stream"));
        let gz = &response.body;
        assert_eq!(&gz[..3], &[0x1f, 0x8b, 8], "gzip magic");
        let raw = miniz_oxide::inflate::decompress_to_vec(&gz[10..gz.len() - 8]).expect("deflate stream");
        let isize = u32::from_le_bytes(gz[gz.len() - 4..].try_into().unwrap());
        assert_eq!(isize as usize, raw.len());
        let profile = pprof::protos::Profile::decode(raw.as_slice()).expect("pprof protobuf");
        assert!(!profile.sample.is_empty(), "no samples");
        assert!(
            profile.string_table.iter().any(|s| s.contains("burn_cpu_for_the_profile")),
            "the busy handler is not in the profile"
        );
        Ok(())
    }
}

in_every_runtime! {
    #[cfg(feature = "pprof")]
    fn a_flamegraph_is_svg() -> io::Result<()> {
        let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
        let server = debug_server();
        let debug = server.debug_addr.unwrap();
        let load = Load::start(server.addr);
        let svg = fetch(debug, "/debug/pprof/flamegraph?seconds=1");
        drop(load);
        assert_eq!((svg.status, svg.header("content-type")), (200, Some("image/svg+xml")));
        let text = svg.text();
        assert!(text.starts_with("<?xml") && text.contains("<svg"), "{}", &text[..text.len().min(200)]);
        assert!(text.contains("burn_cpu_for_the_profile"), "the busy handler is not in the flamegraph");
        Ok(())
    }
}

in_every_runtime! {
    #[cfg(feature = "pprof")]
    fn a_flamegraph_of_an_idle_process_is_still_an_svg() -> io::Result<()> {
        let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
        let server = debug_server();
        let svg = fetch(server.debug_addr.unwrap(), "/debug/pprof/flamegraph?seconds=1");
        assert_eq!((svg.status, svg.header("content-type")), (200, Some("image/svg+xml")));
        assert!(svg.text().contains("<svg"), "{:?}", svg.text());
        Ok(())
    }
}

/// Asks for a 60 s profile on a new connection; returns once it holds the profiler.
#[cfg(feature = "pprof")]
fn start_long_profile(debug: SocketAddr) -> std::net::TcpStream {
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < common::PATIENCE, "the long profile never got the profiler");
        let mut stream = connect(debug);
        stream.write_all(&get("/debug/pprof/profile?seconds=60")).unwrap();
        // Let the server read it first, so the probe below rarely takes the profiler instead.
        std::thread::sleep(Duration::from_millis(50));
        // Only the long profile can hold the profiler now (tests that profile take turns).
        if fetch(debug, "/debug/pprof/flamegraph?seconds=1").status == 409 {
            return stream;
        }
        // The probe won the race: the long profile was refused, or started after the probe;
        // dropping its connection stops it. Try again once the profiler is free.
        drop(stream);
        eventually("the profiler is free", || fetch(debug, "/debug/pprof/flamegraph?seconds=1").status == 200);
    }
}

in_every_runtime! {
    #[cfg(feature = "pprof")]
    fn a_profile_whose_client_goes_away_frees_the_profiler_within_a_second() -> io::Result<()> {
        let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
        let server = debug_server();
        let debug = server.debug_addr.unwrap();
        let abandoned = start_long_profile(debug);
        drop(abandoned);
        let start = Instant::now();
        eventually("the profiler is free again", || fetch(debug, "/debug/pprof/flamegraph?seconds=1").status == 200);
        // The last probe itself took 1 s.
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
        Ok(())
    }
}

in_every_runtime! {
    #[cfg(feature = "pprof")]
    fn a_profile_in_progress_at_the_drain_returns_what_it_has() -> io::Result<()> {
        let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
        let server = debug_server();
        let debug = server.debug_addr.unwrap();
        let mut profiling = start_long_profile(debug);
        std::thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        server.shutdown.start();
        let text = read_to_close(&mut profiling);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{}", &text[..text.len().min(300)]);
        assert!(text.contains("content-type: application/octet-stream\r\n"), "{}", &text[..text.len().min(300)]);
        server.join().map_err(io::Error::other)?;
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        Ok(())
    }
}

in_every_runtime! {
    #[cfg(feature = "pprof")]
    fn of_two_concurrent_profiles_one_is_refused() -> io::Result<()> {
        let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
        let server = debug_server();
        let debug = server.debug_addr.unwrap();
        // Both ask for 2 s at the same moment: whichever arrives first holds the profiler.
        let both: Vec<_> =
            (0..2).map(|_| std::thread::spawn(move || fetch(debug, "/debug/pprof/profile?seconds=2"))).collect();
        let mut statuses: Vec<u16> = both.into_iter().map(|t| t.join().unwrap().status).collect();
        statuses.sort();
        assert_eq!(statuses, [200, 409]);
        // The turn is given back: the next profile runs.
        assert_eq!(fetch(debug, "/debug/pprof/profile?seconds=1").status, 200);
        Ok(())
    }
}

in_every_runtime! {
    fn profile_seconds_are_bounded() -> io::Result<()> {
        let server = debug_server();
        let debug = server.debug_addr.unwrap();
        for bad in ["0", "301", "many"] {
            let response = fetch(debug, &format!("/debug/pprof/profile?seconds={bad}"));
            assert_eq!(response.status, 400, "{bad}");
            assert!(response.text().contains("from 1 to 300"), "{}", response.text());
        }
        Ok(())
    }
}

in_every_runtime! {
    fn metrics_count_requests_timeouts_rejections_and_panics() -> io::Result<()> {
        let mut cfg = config();
        cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
        cfg.header_read_timeout = Some(Duration::from_millis(100));
        let server = Server::start(app(), cfg);
        let debug = server.debug_addr.unwrap();
        assert_eq!(fetch(server.addr, "/").status, 200);
        assert!(exchange(server.addr, b"GET / HTTP/1.1\r\nHost : x\r\n\r\n").starts_with("HTTP/1.1 400 "));
        assert!(exchange(server.addr, &get("/panic")).starts_with("HTTP/1.1 500 "));
        assert_eq!(read_to_close(&mut connect(server.addr)), "", "closed at the header timeout");
        let expected = [
            "servicegroup_connections_accepted_total 4",
            "servicegroup_responses_total{class=\"2xx\"} 1",
            "servicegroup_responses_total{class=\"4xx\"} 1",
            "servicegroup_responses_total{class=\"5xx\"} 1",
            "servicegroup_timeouts_total{phase=\"header_read\"} 1",
            "servicegroup_timeouts_total{phase=\"write\"} 0",
            "servicegroup_rejected_requests_total{reason=\"bad_request\"} 1",
            "servicegroup_handler_panics_total 1",
            "servicegroup_request_duration_seconds_count 2",
            "servicegroup_shutting_down 0",
            "servicegroup_requests_in_flight 0",
        ];
        eventually("the metrics settle", || {
            let text = fetch(debug, "/metrics").text();
            expected.iter().all(|line| text.lines().any(|l| l == *line))
        });
        let metrics = fetch(debug, "/metrics");
        assert_eq!(metrics.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
        assert!(metrics
            .text()
            .contains(&format!("servicegroup_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))));
        let vars = fetch(debug, "/debug/vars");
        assert_eq!(vars.header("content-type"), Some("application/json"));
        let json = vars.text();
        for part in ["\"connections_accepted\":4", "\"handler_panics\":1", "\"header_read\":1", "\"bad_request\":1"] {
            assert!(json.contains(part), "{part} missing from {json}");
        }
        Ok(())
    }
}

in_every_runtime! {
    fn health_stays_up_and_readiness_turns_503_when_shutdown_starts() -> io::Result<()> {
        let server = debug_server();
        let debug = server.debug_addr.unwrap();
        assert_eq!(fetch(debug, "/healthz").text(), "ok\n");
        assert_eq!(fetch(debug, "/readyz").status, 200);
        // Keep the service draining so the debug server stays up.
        let mut stream = connect(server.addr);
        stream.write_all(&get("/slow"))?;
        eventually("the slow request is in flight", || fetch(debug, "/metrics").text().contains("in_flight 1\n"));
        server.shutdown.start();
        let ready = fetch(debug, "/readyz");
        assert_eq!((ready.status, ready.text().as_str()), (503, "shutting down\n"));
        assert_eq!(fetch(debug, "/healthz").status, 200);
        assert!(read_to_close(&mut stream).ends_with("slow"));
        Ok(())
    }
}

in_every_runtime! {
    fn index_cmdline_and_methods() -> io::Result<()> {
        let server = debug_server();
        let debug = server.debug_addr.unwrap();
        let index = fetch(debug, "/debug/pprof/");
        assert_eq!(index.header("content-type"), Some("text/html; charset=utf-8"));
        for link in ["/debug/pprof/profile", "/debug/pprof/flamegraph", "/metrics", "/debug/vars", "/healthz", "/readyz"] {
            assert!(index.text().contains(link), "{link}");
        }
        let cmdline = fetch(debug, "/debug/pprof/cmdline").text();
        let exe = std::env::args().next().unwrap();
        assert!(cmdline.starts_with(&exe), "{cmdline:?}");
        let post = Client::new(debug).request(b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
        assert_eq!((post.status, post.header("allow")), (405, Some("GET, HEAD")));
        assert_eq!(fetch(debug, "/nope").status, 404);
        // The debug endpoints are not on the service port.
        assert_eq!(fetch(server.addr, "/metrics").text(), "hello");
        Ok(())
    }
}

in_every_runtime! {
    fn the_debug_server_can_be_switched_off() -> io::Result<()> {
        let server = Server::start(app(), config());
        assert_eq!(server.debug_addr, None);
        Ok(())
    }
}

in_every_runtime! {
    #[cfg(not(feature = "pprof"))]
    fn without_the_pprof_feature_the_profile_routes_say_what_is_missing() -> io::Result<()> {
        let server = debug_server();
        let debug = server.debug_addr.unwrap();
        for path in ["/debug/pprof/profile?seconds=1", "/debug/pprof/flamegraph?seconds=1"] {
            let response = fetch(debug, path);
            assert_eq!(response.status, 501);
            assert!(response.text().contains("`pprof` feature"), "{}", response.text());
        }
        assert_eq!(fetch(debug, "/metrics").status, 200);
        Ok(())
    }
}
