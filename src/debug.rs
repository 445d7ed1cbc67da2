//! The debug server's routes: pprof CPU profiles and flamegraphs, metrics, health and
//! readiness, plus the user's own. It is served by the same connection loop as the service,
//! on its own listener (loopback by default) with its own timeouts.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::body::Body;
use crate::handler::Handler;
use crate::metrics::Metrics;
use crate::server::clock::{Activity, Clock, Row};
use crate::server::conn::PeerGone;
use crate::shutdown::{Counter, Latch, Shutdown};

/// Longest CPU profile, in seconds; the debug server's write timeout is sized from it.
pub const MAX_PROFILE_SECONDS: u64 = 300;

/// Profile length when the request does not say (Go's default).
const DEFAULT_PROFILE_SECONDS: u64 = 30;

/// The debug server's write timeout: the longest profile plus time to symbolize and send it.
pub(crate) const DEBUG_WRITE_TIMEOUT: Duration = Duration::from_secs(MAX_PROFILE_SECONDS + 60);

/// The debug server's header-read and idle timeouts.
pub(crate) const DEBUG_TIMEOUT: Duration = Duration::from_secs(30);

/// A boxed response future.
pub(crate) type BoxResponse = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// A user's debug route.
pub(crate) type Route = Box<dyn Fn(Request<Body>) -> BoxResponse + Send + Sync>;

/// Boxes a handler as a route.
pub(crate) fn route(handler: impl Handler) -> Route {
    Box::new(move |req| Box::pin(handler.call(req)))
}

/// Rows `/debug/connections` shows at most (the totals count every connection): a page a
/// browser renders at once, and a bounded cost for one scrape of 15,000 connections.
pub(crate) const MAX_CONNECTION_ROWS: usize = 1_000;

/// A user debug route: its exact path, its one line for the index, and its handler.
pub(crate) struct UserRoute {
    /// The exact path.
    pub(crate) path: String,
    /// What it shows, for the index.
    pub(crate) about: String,
    /// The handler.
    pub(crate) route: Route,
}

/// What the debug routes read.
pub(crate) struct State {
    /// User routes; checked before the built-in ones.
    pub(crate) routes: Vec<UserRoute>,
    /// The service's counters.
    pub(crate) metrics: Arc<Metrics>,
    /// The service's open connections.
    pub(crate) connections: Counter,
    /// The clock whose slots describe every service connection.
    pub(crate) clock: Clock,
    /// Set when the service's drain starts.
    pub(crate) draining: Latch,
    /// Readiness turns to 503 once this starts.
    pub(crate) shutdown: Shutdown,
}

/// The built-in routes and their line in the index (link, label, what it shows).
const BUILT_IN: [(&str, &str, &str); 9] = [
    (
        "/debug/pprof/profile?seconds=30",
        "/debug/pprof/profile?seconds=N",
        "CPU profile (gzipped pprof protobuf; <code>go tool pprof URL</code>)",
    ),
    ("/debug/pprof/flamegraph?seconds=10", "/debug/pprof/flamegraph?seconds=N", "CPU flamegraph (SVG)"),
    ("/debug/pprof/cmdline", "/debug/pprof/cmdline", "command line"),
    (
        "/debug/connections",
        "/debug/connections",
        "open service connections: peer, phase, request in flight, ages (<code>?format=json</code>)",
    ),
    ("/metrics", "/metrics", "Prometheus metrics"),
    ("/debug/vars", "/debug/vars", "the same figures as JSON"),
    ("/healthz", "/healthz", "liveness (200 while the process runs)"),
    ("/readyz", "/readyz", "readiness (503 once shutdown starts)"),
    ("/", "/ or /debug/pprof/", "this index"),
];

/// The debug server's handler.
#[derive(Clone)]
pub(crate) struct Debug(pub(crate) Arc<State>);

impl Handler for Debug {
    type Future = BoxResponse;

    fn call(&self, req: Request<Body>) -> BoxResponse {
        let state = &self.0;
        let path = req.uri().path();
        if let Some(user) = state.routes.iter().find(|r| r.path == path) {
            return (user.route)(req);
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let known = matches!(
                path,
                "/" | "/debug/pprof"
                    | "/debug/pprof/"
                    | "/debug/pprof/profile"
                    | "/debug/pprof/flamegraph"
                    | "/debug/pprof/cmdline"
                    | "/debug/connections"
                    | "/metrics"
                    | "/debug/vars"
                    | "/healthz"
                    | "/readyz"
            );
            if known {
                let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
                response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
                return Box::pin(async { response });
            }
        }
        let snapshot = || state.metrics.snapshot(state.connections.count(), state.shutdown.is_started());
        let response = match path {
            "/" | "/debug/pprof" | "/debug/pprof/" => typed(StatusCode::OK, "text/html; charset=utf-8", index(state)),
            "/debug/pprof/profile" | "/debug/pprof/flamegraph" => {
                let svg = path.ends_with("flamegraph");
                // The profile stops early when the drain starts (and sends what it has) or
                // when its client goes away (and frees the profiler).
                let gone = req.extensions().get::<PeerGone>().map(|gone| Box::pin(gone.0.wait()) as Signal);
                let stop = Stop { drain: Box::pin(state.shutdown.started()), gone };
                return match seconds(req.uri().query()) {
                    Ok(seconds) => Box::pin(profile::take(seconds, svg, stop)),
                    Err(message) => Box::pin(async move { text(StatusCode::BAD_REQUEST, message) }),
                };
            }
            "/debug/pprof/cmdline" => {
                let args: Vec<String> = std::env::args().collect();
                text(StatusCode::OK, args.join("\0"))
            }
            "/debug/connections" => connections(state, req.uri().query()),
            "/metrics" => typed(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", snapshot().prometheus()),
            "/debug/vars" => typed(StatusCode::OK, "application/json", snapshot().json()),
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if state.shutdown.is_started() => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
            "/readyz" => text(StatusCode::OK, "ready\n"),
            _ => text(StatusCode::NOT_FOUND, "not found; see / for the debug endpoints\n"),
        };
        Box::pin(async { response })
    }
}

/// What ends a profile before its time.
#[cfg_attr(not(feature = "pprof"), allow(dead_code))]
pub(crate) struct Stop {
    /// The group's shutdown started: finish now, with what was sampled.
    drain: Signal,
    /// The client went away, when the connection watches for that: give up.
    gone: Option<Signal>,
}

/// A future that resolves when something has happened.
type Signal = Pin<Box<dyn Future<Output = ()> + Send>>;

#[cfg(test)]
impl Stop {
    /// Nothing stops the profile early.
    fn never() -> Stop {
        Stop { drain: Box::pin(futures_lite::future::pending()), gone: None }
    }
}

/// The `seconds` query parameter, checked.
fn seconds(query: Option<&str>) -> Result<u64, String> {
    let raw = query.unwrap_or("").split('&').find_map(|pair| pair.strip_prefix("seconds="));
    match raw {
        None => Ok(DEFAULT_PROFILE_SECONDS),
        Some(raw) => match raw.parse::<u64>() {
            Ok(n) if (1..=MAX_PROFILE_SECONDS).contains(&n) => Ok(n),
            _ => Err(format!("seconds must be a whole number from 1 to {MAX_PROFILE_SECONDS}, got {raw:?}\n")),
        },
    }
}

/// The index page: every route, the application's included, one line each.
fn index(state: &State) -> String {
    let mut page = String::from(
        "<!doctype html><html><head><title>servicegroup debug</title></head><body>\n\
         <h1>servicegroup debug server</h1>\n<ul>\n",
    );
    for (link, label, about) in BUILT_IN {
        let _ = writeln!(page, "<li><a href=\"{link}\">{label}</a>: {about}</li>");
    }
    if !state.routes.is_empty() {
        page.push_str("</ul>\n<h2>Added by the application</h2>\n<ul>\n");
    }
    for user in &state.routes {
        let (path, about) = (html(&user.path), html(&user.about));
        let _ = writeln!(page, "<li><a href=\"{path}\">{path}</a>: {about}</li>");
    }
    page.push_str("</ul></body></html>\n");
    page
}

/// Text escaped for HTML.
fn html(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Text escaped for a JSON string.
fn json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// `/debug/connections`: every open service connection (the first [`MAX_CONNECTION_ROWS`])
/// and totals per phase; HTML, or JSON with `?format=json`; `?refresh=N` reloads the page
/// every N seconds.
fn connections(state: &State, query: Option<&str>) -> Response<Body> {
    let param = |name: &str| query.unwrap_or("").split('&').find_map(|p| p.strip_prefix(name)?.strip_prefix('='));
    let listing = state.clock.connections(MAX_CONNECTION_ROWS);
    let draining = state.draining.is_set();
    // In flight once the drain has started: what the drain is waiting for.
    let phase = |row: &Row| match row.activity {
        Activity::ReadingHead | Activity::InHandler | Activity::Writing if draining => {
            format!("draining ({})", row.activity.as_str())
        }
        activity => activity.as_str().to_string(),
    };
    let total: usize = listing.totals.iter().sum();
    let peer = |row: &Row| row.peer.as_ref().map_or_else(|| "-".to_string(), |p| p.to_string());
    if param("format") == Some("json") {
        let mut out =
            format!("{{\"total\":{total},\"shown\":{},\"draining\":{draining},\"phases\":{{", listing.rows.len());
        for (i, activity) in Activity::ALL.iter().enumerate() {
            let _ = write!(out, "{}\"{}\":{}", if i == 0 { "" } else { "," }, activity.as_str(), listing.totals[i]);
        }
        out.push_str("},\"connections\":[");
        for (i, row) in listing.rows.iter().enumerate() {
            let request = row.current.as_deref().map_or("null".to_string(), |r| format!("\"{}\"", json(r)));
            let _ = write!(
                out,
                "{}{{\"peer\":\"{}\",\"phase\":\"{}\",\"request\":{request},\"age_ms\":{},\"phase_ms\":{},\"requests\":{}}}",
                if i == 0 { "" } else { "," },
                json(&peer(row)),
                phase(row),
                row.age.as_millis(),
                row.in_activity.as_millis(),
                row.requests
            );
        }
        out.push_str("]}\n");
        return typed(StatusCode::OK, "application/json", out);
    }
    let refresh = param("refresh").and_then(|n| n.parse::<u32>().ok()).filter(|n| (1..=3600).contains(n));
    let mut page = String::from("<!doctype html><html><head><title>servicegroup connections</title>");
    if let Some(n) = refresh {
        let _ = write!(page, "<meta http-equiv=\"refresh\" content=\"{n}\">");
    }
    let _ = write!(
        page,
        "</head><body>\n<h1>Open service connections: {total}</h1>\n<p>{}",
        if draining { "The drain has started. " } else { "" }
    );
    let counts: Vec<String> =
        Activity::ALL.iter().zip(listing.totals).map(|(a, n)| format!("{}: {n}", a.as_str())).collect();
    let _ = writeln!(
        page,
        "{}. <a href=\"?format=json\">JSON</a>, <a href=\"?refresh=2\">refresh every 2 s</a></p>",
        counts.join(", ")
    );
    if listing.rows.len() < total {
        let _ = writeln!(page, "<p>Showing the first {} of {total}.</p>", listing.rows.len());
    }
    page.push_str(
        "<table border=\"1\" cellpadding=\"4\">\n<tr><th>peer</th><th>phase</th><th>request in flight</th>\
                   <th>in phase</th><th>age</th><th>requests</th></tr>\n",
    );
    for row in &listing.rows {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1?}</td><td>{:.1?}</td><td>{}</td></tr>",
            html(&peer(row)),
            phase(row),
            row.current.as_deref().map_or(String::new(), html),
            row.in_activity,
            row.age,
            row.requests
        );
    }
    page.push_str("</table></body></html>\n");
    typed(StatusCode::OK, "text/html; charset=utf-8", page)
}

/// A plain-text response.
fn text(status: StatusCode, body: impl Into<Body>) -> Response<Body> {
    typed(status, "text/plain; charset=utf-8", body)
}

/// A response with a content type.
fn typed(status: StatusCode, content_type: &'static str, body: impl Into<Body>) -> Response<Body> {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(feature = "pprof")]
mod profile {
    //! CPU profiles with pprof-rs: one at a time, the wait an awaited timer.

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use http::header::{self, HeaderValue};
    use http::{Response, StatusCode};
    use pprof::protos::Message;

    use futures_lite::FutureExt;

    use super::{text, typed, Stop};
    use crate::body::Body;

    /// Sampling rate: 99 Hz, off the beat of 100 Hz timers (pprof-rs' advice).
    const FREQUENCY: i32 = 99;

    /// The profiler is process-wide (SIGPROF): one profile at a time.
    static PROFILING: AtomicBool = AtomicBool::new(false);

    /// Frees [`PROFILING`] however the profile ends, cancellation included.
    struct Turn;

    impl Drop for Turn {
        fn drop(&mut self) {
            PROFILING.store(false, Ordering::SeqCst);
        }
    }

    /// Profiles the whole process for `seconds`, or until `stop`; a pprof protobuf, or an SVG
    /// flamegraph.
    pub(in crate::debug) async fn take(seconds: u64, svg: bool, stop: Stop) -> Response<Body> {
        if PROFILING.swap(true, Ordering::SeqCst) {
            return text(StatusCode::CONFLICT, "a CPU profile is already being taken; retry when it finishes\n");
        }
        let _turn = Turn;
        let guard = match pprof::ProfilerGuardBuilder::default()
            .frequency(FREQUENCY)
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
        {
            Ok(guard) => guard,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("could not start the profiler: {e}\n")),
        };
        let started = std::time::Instant::now();
        let full = async {
            async_io::Timer::after(Duration::from_secs(seconds)).await;
            true
        };
        let drain = async {
            stop.drain.await;
            true
        };
        let gone = async {
            match stop.gone {
                Some(gone) => gone.await,
                None => futures_lite::future::pending().await,
            }
            false
        };
        if !full.or(drain).or(gone).await {
            log::info!("CPU profile abandoned by its client after {:?}", started.elapsed());
            return text(StatusCode::SERVICE_UNAVAILABLE, "the client went away\n");
        }
        let seconds = started.elapsed().as_secs_f64();
        let report = match guard.report().build() {
            Ok(report) => report,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("could not build the profile: {e}\n")),
        };
        drop(guard);
        let samples: isize = report.data.values().sum();
        log::info!(
            "served a {seconds:.1} s CPU profile ({samples} samples{})",
            if svg { ", as a flamegraph" } else { "" }
        );
        if svg {
            if report.data.is_empty() {
                // inferno draws nothing at all for no samples; a browser should see why.
                let empty = format!(
                    "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" \
                     width=\"640\" height=\"40\"><text x=\"10\" y=\"25\">No CPU samples in {seconds:.1} s: \
                     the process was idle.</text></svg>\n"
                );
                return typed(StatusCode::OK, "image/svg+xml", empty);
            }
            let mut out = Vec::new();
            if let Err(e) = report.flamegraph(&mut out) {
                return text(StatusCode::INTERNAL_SERVER_ERROR, format!("could not draw the flamegraph: {e}\n"));
            }
            return typed(StatusCode::OK, "image/svg+xml", out);
        }
        let profile = match report.pprof() {
            Ok(profile) => profile.encode_to_vec(),
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("could not encode the profile: {e}\n")),
        };
        let mut response = typed(StatusCode::OK, "application/octet-stream", gzip(&profile));
        response
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment; filename=\"profile\""));
        response
    }

    /// Wraps raw deflate in a gzip member (RFC 1952), which `go tool pprof` expects.
    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
        out.extend(miniz_oxide::deflate::compress_to_vec(data, 6));
        out.extend(crc32(data).to_le_bytes());
        out.extend((data.len() as u32).to_le_bytes());
        out
    }

    /// CRC-32 (IEEE), bit by bit: profiles are small and this runs once per profile.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_second_profile_is_refused_while_one_runs() {
            use futures_lite::future::{block_on, poll_once};
            let mut first = Box::pin(take(1, false, Stop::never()));
            assert!(block_on(poll_once(&mut first)).is_none(), "the first profile is running");
            assert_eq!(block_on(take(1, true, Stop::never())).status(), StatusCode::CONFLICT);
            drop(first);
            // Cancelling the first gives the turn back.
            let mut third = Box::pin(take(1, false, Stop::never()));
            assert!(block_on(poll_once(&mut third)).is_none());
        }

        #[test]
        fn crc32_check_value() {
            assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        }

        #[test]
        fn gzip_round_trips() {
            let data = b"profile data profile data profile data".repeat(10);
            let gz = gzip(&data);
            assert_eq!(&gz[..3], &[0x1f, 0x8b, 8]);
            let body = &gz[10..gz.len() - 8];
            assert_eq!(miniz_oxide::inflate::decompress_to_vec(body).unwrap(), data);
            assert_eq!(&gz[gz.len() - 8..gz.len() - 4], &crc32(&data).to_le_bytes());
        }
    }
}

#[cfg(not(feature = "pprof"))]
mod profile {
    //! Without the `pprof` feature, the profile routes say how to get them.

    use http::{Response, StatusCode};

    use crate::body::Body;

    /// Explains that profiles need the `pprof` feature.
    pub(in crate::debug) async fn take(_seconds: u64, _svg: bool, _stop: super::Stop) -> Response<Body> {
        super::text(
            StatusCode::NOT_IMPLEMENTED,
            "CPU profiles need the `pprof` feature of servicegroup (on by default); \
             this binary was built without it\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_bounded() {
        assert_eq!(seconds(None), Ok(30));
        assert_eq!(seconds(Some("seconds=5")), Ok(5));
        assert_eq!(seconds(Some("a=b&seconds=300")), Ok(300));
        for bad in ["seconds=0", "seconds=301", "seconds=x", "seconds=-1", "seconds="] {
            assert!(seconds(Some(bad)).unwrap_err().contains("from 1 to 300"), "{bad}");
        }
    }
}
