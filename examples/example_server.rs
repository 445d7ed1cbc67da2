//! The example server, modelled on the Go package's: run it with
//!
//! ```text
//! cargo run --example example_server
//! ```
//!
//! and try `curl localhost:8080/`. It is configured by `Config::from_env` (for example
//! `SERVICEGROUP_ADDR=127.0.0.1:3000`, `SERVICEGROUP_HEADER_READ_TIMEOUT_MS=1000`) and serves:
//!
//! - `GET /` → `hello`
//! - `GET /ping` → `pong`
//! - `GET /work?ms=N` → waits N ms (default 3000), then answers: start one and press Ctrl-C to
//!   watch the graceful drain let it finish
//! - `POST /echo` → the request body, streamed back, any size
//! - `GET /ws` → a WebSocket echo (text and binary messages), built on `async-tungstenite`
//!   over [`servicegroup::upgrade`]; when the server drains it closes with 1001 "going away"
//!
//! HEAD works wherever GET does; other methods get 405 with `Allow`, other paths 404. The
//! debug server listens on `127.0.0.1:6060`: open `/debug/pprof/flamegraph?seconds=5` while
//! loading `/work`.

use std::process::ExitCode;
use std::time::Duration;

use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use async_tungstenite::tungstenite::Message;
use async_tungstenite::WebSocketStream;
use futures_lite::StreamExt;
use servicegroup::http::{header, HeaderValue, Method, Request, Response, StatusCode};
use servicegroup::{upgrade, Body, Config, Group};

/// Routes a request.
async fn handle(req: Request<Body>) -> Response<Body> {
    let (allow, allowed) = match req.uri().path() {
        "/" | "/ping" | "/work" => ("GET, HEAD", req.method() == Method::GET || req.method() == Method::HEAD),
        "/echo" => ("POST", req.method() == Method::POST),
        "/ws" => ("GET", req.method() == Method::GET),
        _ => return text(StatusCode::NOT_FOUND, "not found\n".into()),
    };
    if !allowed {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into());
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
        return response;
    }
    match req.uri().path() {
        "/" => text(StatusCode::OK, "hello".into()),
        "/ping" => text(StatusCode::OK, "pong".into()),
        "/work" => work(req.uri().query()).await,
        "/ws" => websocket(req),
        _ => echo(req),
    }
}

/// Waits `ms` milliseconds (from the query, default 3000), then answers.
async fn work(query: Option<&str>) -> Response<Body> {
    let ms = match query.unwrap_or("").split('&').find_map(|pair| pair.strip_prefix("ms=")) {
        None => 3000,
        Some(raw) => match raw.parse::<u64>() {
            Ok(ms) => ms,
            Err(_) => return text(StatusCode::BAD_REQUEST, format!("ms must be a whole number, got {raw:?}\n")),
        },
    };
    async_io::Timer::after(Duration::from_millis(ms)).await;
    text(StatusCode::OK, format!("worked for {ms} ms\n"))
}

/// Streams the request body back, with its content type.
fn echo(req: Request<Body>) -> Response<Body> {
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let mut response = Response::new(req.into_body());
    let content_type = content_type.unwrap_or(HeaderValue::from_static("application/octet-stream"));
    response.headers_mut().insert(header::CONTENT_TYPE, content_type);
    response
}

/// Takes a WebSocket handshake (RFC 6455 §4.2) and echoes every text and binary message;
/// tungstenite answers pings. When the server starts draining it sends close 1001 and waits
/// for the client's close (the shutdown deadline bounds the wait).
fn websocket(mut req: Request<Body>) -> Response<Body> {
    let is_websocket =
        req.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).filter(|_| is_websocket) else {
        return text(
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake needs Upgrade: websocket and Sec-WebSocket-Key\n".into(),
        );
    };
    if req.headers().get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
        let mut response = text(StatusCode::UPGRADE_REQUIRED, "only WebSocket version 13 is spoken here\n".into());
        response.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return response;
    }
    let accept_key = derive_accept_key(key.as_bytes());
    let offer = match upgrade::on(&mut req) {
        Ok(offer) => offer,
        Err(e) => return e.to_response(),
    };
    let mut response = offer.accept(|stream| async move {
        let draining = stream.draining();
        let mut draining = std::pin::pin!(draining);
        let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
        loop {
            let next = futures_lite::future::or(async { Some(ws.next().await) }, async {
                draining.as_mut().await;
                None
            });
            match next.await {
                Some(Some(Ok(message @ (Message::Text(_) | Message::Binary(_))))) => {
                    if ws.send(message).await.is_err() {
                        return;
                    }
                }
                Some(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
                Some(Some(Ok(Message::Close(_)) | Err(_)) | None) => return,
                None => break,
            }
        }
        let going_away = CloseFrame { code: CloseCode::Away, reason: "server shutting down".into() };
        if ws.close(Some(going_away)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    });
    let accept_key = HeaderValue::from_str(&accept_key).expect("base64 is a valid header value");
    response.headers_mut().insert(header::SEC_WEBSOCKET_ACCEPT, accept_key);
    response
}

/// A plain-text response.
fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Prints `log` records at info level and above (debug with `SERVICEGROUP_LOG=debug`).
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("{:<5} {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

fn main() -> ExitCode {
    let level = match std::env::var("SERVICEGROUP_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        _ => log::LevelFilter::Info,
    };
    let _ = log::set_logger(&StderrLogger).map(|()| log::set_max_level(level));

    let group = match Config::from_env().and_then(|config| Group::new(handle, config)) {
        Ok(group) => group,
        Err(e) => {
            eprintln!("example_server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url = |addr: servicegroup::Addr| match addr.tcp() {
        Some(tcp) => format!("http://{tcp}/"),
        None => addr.to_string(),
    };
    match group.debug_addr() {
        Some(debug) => log::info!("example_server: serving {} (debug server on {})", url(group.addr()), url(debug)),
        None => log::info!("example_server: serving {} (debug server off)", url(group.addr())),
    }
    match smol::block_on(group.run()) {
        Ok(()) => {
            log::info!("example_server: shut down cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("example_server: {e}");
            ExitCode::FAILURE
        }
    }
}
