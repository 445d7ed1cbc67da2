//! Listening and accepting: one task and one drain guard per connection, spawned through the
//! group's runtime.

pub(crate) mod clock;
pub(crate) mod conn;
mod exchange;
mod stream;

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use async_io::Timer;
use futures_lite::FutureExt;

use crate::handler::Handler;
use crate::listen::{Accepted, Bound, Peer, TURN_AWAY_SETTLE};
use crate::runtime::{Runtime, Stream, Tasks};
use crate::shutdown::Counter;
use conn::Context;

/// First pause after a failed accept (EMFILE, ENFILE, ENOBUFS, ECONNABORTED, ...).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);

/// Longest pause between failed accepts; the pause doubles up to this.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A listener, the context its connections share, and the count of open connections (kept by
/// the runtime's [`Tasks`], one task per connection).
pub(crate) struct Server<H> {
    /// Where connections come from.
    listener: Bound,
    /// What every connection shares.
    ctx: Arc<Context<H>>,
    /// Open connections: the drain waits for zero, `max_connections` for room.
    connections: Counter,
    /// See `Config::max_connections`.
    max_connections: Option<usize>,
}

impl<H: Handler> Server<H> {
    /// A server that will accept on `listener`, counting its open connections in
    /// `connections`.
    pub(crate) fn new(
        listener: Bound,
        ctx: Context<H>,
        connections: Counter,
        max_connections: Option<usize>,
    ) -> Server<H> {
        Server { listener, ctx: Arc::new(ctx), connections, max_connections }
    }

    /// Accepts connections, each a task spawned through `runtime` and kept in `tasks`, until
    /// the context's `close_idle` latch is set; closes the listener (new connections are
    /// refused from then on), and resolves once every connection has closed, saying how
    /// many were open then and how long they took.
    pub(crate) async fn run(self, runtime: &Runtime<'_>, tasks: &Arc<Tasks>) -> Drained {
        let Server { listener, ctx, connections, max_connections } = self;
        let name = listener.name;
        accept_loop(listener, &ctx, &connections, max_connections, runtime, tasks).await;
        let open = connections.count();
        let since = std::time::Instant::now();
        log::debug!("{name} server: listener closed; draining {open} connection(s)");
        connections.wait_below(1).await;
        Drained { connections: open, took: since.elapsed() }
    }
}

/// What a server's drain did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drained {
    /// Connections open when the listener closed.
    pub(crate) connections: usize,
    /// Time until the last of them closed.
    pub(crate) took: Duration,
}

/// Accepts until the drain starts. Accept errors never end the loop: it backs off and retries.
/// A reuse-port listener then turns new connections away and accepts what was already on
/// its way for [`TURN_AWAY_SETTLE`] more. The listener closes as this returns.
async fn accept_loop<H: Handler>(
    listener: Bound,
    ctx: &Arc<Context<H>>,
    connections: &Counter,
    max_connections: Option<usize>,
    runtime: &Runtime<'_>,
    tasks: &Arc<Tasks>,
) {
    let stop = ctx.close_idle.clone();
    let mut backoff = None;
    let spawn = |accepted| match accepted {
        Accepted::Tcp(stream, peer) => start(runtime, tasks, ctx, stream, Peer::Tcp(peer)),
        Accepted::Unix(stream, peer) => start(runtime, tasks, ctx, stream, peer),
    };
    log::debug!("{} server: listening on {}", listener.name, listener.addr());
    // Listen, then check: the one listener serves every wait of the loop (it only fires once,
    // and the loop ends then), so no accept pays for registering one.
    let mut closing = stop.listen();
    loop {
        if stop.is_set() {
            break;
        }
        // With max_connections reached, leave new connections in the backlog.
        if let Some(max) = max_connections {
            if !matches!(room(connections, max, &mut closing).await, Some(())) {
                break;
            }
        }
        let accepted = async { Some(listener.accept().await) }.or(async {
            (&mut closing).await;
            None
        });
        match accepted.await {
            None => break,
            Some(Ok(accepted)) => {
                backoff = None;
                spawn(accepted);
            }
            Some(Err(e)) => {
                let pause = backoff.map_or(ACCEPT_BACKOFF_MIN, |d: Duration| (d * 2).min(ACCEPT_BACKOFF_MAX));
                backoff = Some(pause);
                log::warn!("{} server: accept failed: {e}; retrying in {pause:?}", listener.name);
                let slept = async {
                    Timer::after(pause).await;
                    true
                };
                if !slept
                    .or(async {
                        (&mut closing).await;
                        false
                    })
                    .await
                {
                    break;
                }
            }
        }
    }
    if listener.is_reuse_port() {
        match listener.turn_away() {
            Ok(()) => {
                log::info!(
                    "{} server: turning new connections away (SO_REUSEPORT); accepting for {TURN_AWAY_SETTLE:?} more",
                    listener.name
                );
                let until = std::time::Instant::now() + TURN_AWAY_SETTLE;
                let settled = || async move {
                    Timer::at(until).await;
                    None
                };
                while let Some(accepted) = async { Some(listener.accept().await) }.or(settled()).await {
                    match accepted {
                        Ok(accepted) => spawn(accepted),
                        Err(_) => {
                            Timer::after(ACCEPT_BACKOFF_MIN).await;
                        }
                    }
                }
            }
            Err(e) => log::warn!("{} server: could not turn new connections away before closing: {e}", listener.name),
        }
    }
    log::debug!("{} server: stopped accepting", listener.name);
}

/// Starts serving an accepted connection from `peer`: its socket joins the reactor of the
/// place its task will run in, and the task is spawned there.
fn start<T, H: Handler>(runtime: &Runtime<'_>, tasks: &Arc<Tasks>, ctx: &Arc<Context<H>>, stream: T, peer: Peer)
where
    T: AsFd,
    Stream<T>: conn::Io,
{
    log::trace!("{peer}: accepted");
    let place = tasks.place();
    match runtime.stream(place, stream) {
        Ok(stream) => {
            let ctx = ctx.clone();
            runtime.spawn(tasks, place, move |done| conn::serve(stream, Some(peer), ctx, place, done));
        }
        Err(e) => log::warn!("{peer}: closed at once: its socket could not be registered: {e}"),
    }
}

/// Waits until fewer than `max` connections are open (`Some`), or the drain starts (`None`).
async fn room(connections: &Counter, max: usize, closing: &mut event_listener::EventListener) -> Option<()> {
    let room = async {
        connections.wait_below(max).await;
        Some(())
    };
    room.or(async {
        closing.await;
        None
    })
    .await
}
