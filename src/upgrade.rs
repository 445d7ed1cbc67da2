//! Protocol upgrades: WebSocket and other `101 Switching Protocols` hand-offs (RFC 9110 §7.8),
//! and `CONNECT` tunnels (§9.3.6).
//!
//! A handler takes a connection in two steps. [`on`] checks that the request offers an
//! upgrade and hands out its [`OnUpgrade`] (once). [`OnUpgrade::accept`] returns the response
//! to answer with (`101` with `Upgrade` and `Connection: upgrade`, or `200` to a `CONNECT`;
//! add fields such as `Sec-WebSocket-Accept` to it) and takes the function that speaks the
//! new protocol. Once that head is written, the connection calls the function with the
//! [`Upgraded`] stream (carrying any bytes the client sent right behind its request) and runs
//! the future it returns on the connection's own task, in whichever runtime the group uses:
//! nothing to spawn.
//!
//! ```
//! use futures_lite::{AsyncReadExt, AsyncWriteExt};
//! use servicegroup::{http::Request, http::Response, upgrade, Body};
//!
//! /// Echoes every byte of a connection upgraded to the made-up protocol `echo`.
//! async fn handler(mut request: Request<Body>) -> Response<Body> {
//!     let offer = match upgrade::on(&mut request) {
//!         Ok(offer) => offer,
//!         Err(e) => return e.to_response(), // 400, saying why
//!     };
//!     offer.accept(|mut stream| async move {
//!         let draining = stream.draining(); // resolves when the server starts draining
//!         let mut draining = std::pin::pin!(draining);
//!         let mut buf = [0; 1024];
//!         loop {
//!             let n = futures_lite::future::or(stream.read(&mut buf), async {
//!                 draining.as_mut().await;
//!                 Ok(0)
//!             })
//!             .await;
//!             match n {
//!                 Ok(n) if n > 0 && stream.write_all(&buf[..n]).await.is_ok() => {}
//!                 _ => break,
//!             }
//!         }
//!     })
//! }
//! # fn main() { let _ = handler; }
//! ```
//!
//! What the connection guarantees:
//! - **Only offered upgrades.** [`on`] fails ([`Error::NotUpgradable`], answer 400) unless the
//!   request is HTTP/1.1 with an `Upgrade` field named in `Connection`, or a `CONNECT`. An
//!   `h2c` or any other offer the handler does not take is ignored: the request is served as
//!   plain HTTP/1.1 (§7.8).
//! - **Only through `accept`.** A `101` the handler built itself gets a 500 instead (the
//!   connection would otherwise switch to a protocol nobody speaks); a `2xx` to a `CONNECT`
//!   that was not accepted gets 405. If the handler changes the status of `accept`'s response
//!   to anything else, that response is sent as usual and the protocol function is never
//!   called: the connection stays HTTP/1.1.
//! - **No body left behind.** Accepting before the request body was read to its end is
//!   answered with 500 and logged: the body's bytes would otherwise be read as the new
//!   protocol's.
//! - **Timeouts.** Once upgraded, the header-read, write and idle timeouts no longer apply;
//!   `Config::upgraded_idle_timeout` (default off) closes a connection that has read and
//!   written nothing for that long.
//! - **Drain.** An upgraded connection counts as open until its protocol future ends and the
//!   [`Upgraded`] stream is dropped (even one moved to another task). When the drain starts,
//!   [`Upgraded::draining`] resolves: send a WebSocket close 1001 "going away" then. At the
//!   shutdown deadline the connection is cut like any other (its socket is shut down, the
//!   protocol future dropped) and counted in what `run` reports. `/metrics` shows
//!   `servicegroup_upgraded_connections_open` and `_total`.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};

use crate::body::Body;
use crate::error::Error;
use crate::h1::decode::connection_names;
use crate::server::clock::Tick;
use crate::shutdown::Latch;

/// Takes the upgrade `request` offers: a protocol switch (`Upgrade` named in `Connection`,
/// HTTP/1.1) or a `CONNECT`. Fails with [`Error::NotUpgradable`], whose message says why,
/// for any other request, and for a second call on the same request.
pub fn on(request: &mut Request<Body>) -> Result<OnUpgrade, Error> {
    if request.extensions_mut().remove::<Offer>().is_some() {
        let protocol = match request.method() == Method::CONNECT {
            true => None,
            false => request.headers().get(header::UPGRADE).cloned(),
        };
        return Ok(OnUpgrade { protocol });
    }
    Err(Error::NotUpgradable(why_not(request)))
}

/// Why a request holds no upgrade offer.
fn why_not(request: &Request<Body>) -> &'static str {
    if request.version() != Version::HTTP_11 {
        "only HTTP/1.1 requests can switch protocols (RFC 9110 §7.8)"
    } else if !request.headers().contains_key(header::UPGRADE) {
        "it has no `Upgrade` field naming a protocol"
    } else if !connection_names(request.headers(), b"upgrade") {
        "its `Connection` field does not name `upgrade` (RFC 9110 §7.8)"
    } else {
        "its offer was already taken (call upgrade::on once per request) or it did not come from this server"
    }
}

/// A request's upgrade offer, taken by [`on`]: answer with [`OnUpgrade::accept`], or drop it
/// and answer as usual.
#[derive(Debug)]
pub struct OnUpgrade {
    /// The client's `Upgrade` field; `None` for a `CONNECT`.
    protocol: Option<HeaderValue>,
}

impl OnUpgrade {
    /// The protocols the client offered (its `Upgrade` field, e.g. `websocket`), or `None`
    /// for a `CONNECT`.
    pub fn protocol(&self) -> Option<&HeaderValue> {
        self.protocol.as_ref()
    }

    /// Whether the request is a `CONNECT` (a tunnel, answered `200` rather than `101`).
    pub fn is_connect(&self) -> bool {
        self.protocol.is_none()
    }

    /// The response that switches the connection: `101 Switching Protocols` with `Upgrade`
    /// set to the first protocol the client offered (replace it to pick another) and
    /// `Connection: upgrade`, or `200 OK` to a `CONNECT`. Return it from the handler, with any
    /// fields added. Once its head is written, the connection calls `serve` with the stream
    /// and runs the future it returns until it ends.
    pub fn accept<F, Fut>(self, serve: F) -> Response<Body>
    where
        F: FnOnce(Upgraded) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut response = Response::new(Body::empty());
        match &self.protocol {
            Some(offered) => {
                *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                let first = offered.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii).find(|p| !p.is_empty());
                if let Some(Ok(first)) = first.map(HeaderValue::from_bytes) {
                    response.headers_mut().insert(header::UPGRADE, first);
                }
            }
            None => *response.status_mut() = StatusCode::OK,
        }
        let serve: Serve = Box::new(move |stream| Box::pin(serve(stream)));
        response.extensions_mut().insert(Accepted(Arc::new(Mutex::new(Some(serve)))));
        response
    }
}

/// The protocol function a handler accepted with, boxed.
pub(crate) type Serve = Box<dyn FnOnce(Upgraded) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// In a request's extensions when the client offers an upgrade; [`on`] takes it.
#[derive(Debug, Clone)]
pub(crate) struct Offer;

/// In the extensions of [`OnUpgrade::accept`]'s response: the protocol to run. (Extensions
/// must be `Clone`; the function is taken once.)
#[derive(Clone)]
pub(crate) struct Accepted(Arc<Mutex<Option<Serve>>>);

impl Accepted {
    /// The protocol function, the first time.
    pub(crate) fn take(&self) -> Option<Serve> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// The connection's stream as the upgraded protocol sees it: bytes already read come first.
pub(crate) trait Tunnel: Send + Sync {
    /// Reads into `buf`; `Ok(0)` at end of stream.
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    /// Writes from `bufs` in order.
    fn poll_write_vectored(&self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>>;
    /// Shuts the sending side.
    fn shutdown_write(&self);
}

/// What the connection and its [`Upgraded`] stream share.
pub(crate) struct Link {
    /// The last byte read or written, as a [`Tick`]'s nanoseconds (kept only when `timed`;
    /// the upgrade until then).
    active: AtomicU64,
    /// Whether an idle timeout applies (otherwise nothing reads the clock).
    timed: bool,
    /// Set when the stream is dropped.
    dropped: Latch,
}

impl Link {
    /// A link for a connection upgraded at `started`.
    pub(crate) fn new(started: Tick, timed: bool) -> Link {
        Link { active: AtomicU64::new(started.nanos()), timed, dropped: Latch::default() }
    }

    /// The last time a byte was read or written.
    pub(crate) fn last_active(&self) -> Tick {
        Tick::from_nanos(self.active.load(Relaxed))
    }

    /// Resolves once the stream has been dropped.
    pub(crate) fn dropped(&self) -> impl Future<Output = ()> + Send + 'static {
        self.dropped.wait()
    }

    /// Records activity.
    fn touch(&self) {
        if self.timed {
            self.active.store(Tick::now().nanos(), Relaxed);
        }
    }
}

/// An upgraded connection: read and write the new protocol's bytes.
///
/// Reads start with any bytes the client sent right behind its request. Writes go straight to
/// the socket (`flush` has nothing to do); `close` shuts the sending side. Dropping it closes
/// the connection once the protocol future has ended too.
pub struct Upgraded {
    /// The connection's stream.
    io: Arc<dyn Tunnel>,
    /// Activity and drop, for the connection.
    link: Arc<Link>,
    /// The server's drain signal.
    drain: Latch,
}

impl Upgraded {
    /// The stream over `io`, reporting to `link`, told of the drain by `drain`.
    pub(crate) fn new(io: Arc<dyn Tunnel>, link: Arc<Link>, drain: Latch) -> Upgraded {
        Upgraded { io, link, drain }
    }

    /// Resolves once the server's drain has started (after `Config::drain_delay`): time to
    /// tell the peer, e.g. with a WebSocket close frame 1001 "going away", and end. The
    /// connection is cut at the shutdown deadline otherwise. Independent of the stream (it can
    /// be awaited after the stream moved into a protocol library).
    pub fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        self.drain.wait()
    }

    /// Whether the server's drain has started.
    pub fn is_draining(&self) -> bool {
        self.drain.is_set()
    }
}

impl std::fmt::Debug for Upgraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgraded").field("draining", &self.is_draining()).finish_non_exhaustive()
    }
}

impl Drop for Upgraded {
    fn drop(&mut self) {
        self.link.dropped.set();
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(self.io.poll_read(cx, buf))?;
        if n > 0 {
            self.link.touch();
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(self.io.poll_write_vectored(cx, bufs))?;
        if n > 0 {
            self.link.touch();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.shutdown_write();
        Poll::Ready(Ok(()))
    }
}
