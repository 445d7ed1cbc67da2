//! The public [`Group`]: the service server, the debug server, signal handling and the
//! user's members, run together under the supervisor.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use async_executor::Executor;
use futures_lite::future::pending;
use futures_lite::FutureExt;

use crate::config::Config;
use crate::debug::{self, Debug, Route};
use crate::error::{BoxError, Error, Result};
use crate::h1::decode::Limits;
use crate::handler::Handler;
use crate::metrics::Metrics;
use crate::server::clock::Clock;
use crate::server::conn::{Context, Settings};
use crate::server::{Listener, Server, Workers};
use crate::shutdown::{Counter, Latch, Shutdown};
use crate::signal::Signals;
use crate::supervisor::{supervise, Member};

/// The service server, waiting for an executor to run on.
type Service = Box<dyn FnOnce(Arc<Executor<'static>>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Name of the service server member, in logs and errors.
const SERVICE: &str = "service server";

/// Name of the debug server member.
const DEBUG: &str = "debug server";

/// A service server, a debug server and your own long-running tasks, run as one unit: when
/// any member ends, all are stopped, and [`Group::run`] returns what ended the group.
///
/// [`run`](crate::run) is `Group::new(handler, config)?.run().await`; build a `Group` yourself
/// to add members, debug routes, read the bound addresses, or shut down from code:
///
/// ```no_run
/// # async fn example() -> servicegroup::Result<()> {
/// use servicegroup::{Body, Config, Group, http::Response};
///
/// let mut group = Group::new(|_req| async { Response::new(Body::from("hello")) }, Config::default())?;
/// let shutdown = group.shutdown();
/// group.add("ticker", async move {
///     // Runs until the group stops; `started()` resolves when it does.
///     shutdown.started().await;
///     Ok::<(), std::io::Error>(())
/// });
/// group.run().await
/// # }
/// # fn main() { let _ = example; }
/// ```
pub struct Group {
    /// The configuration.
    config: Config,
    /// The group's shutdown handle.
    shutdown: Shutdown,
    /// The service server.
    service: Service,
    /// The clock behind its deadlines.
    service_clock: Clock,
    /// The service's bound address.
    addr: SocketAddr,
    /// Set when the service's drain starts.
    service_drain: Latch,
    /// The service's open connections.
    service_connections: Counter,
    /// The service's counters, shown by the debug server.
    metrics: Arc<Metrics>,
    /// The debug server's listener, if enabled.
    debug: Option<Listener>,
    /// User debug routes.
    routes: Vec<(String, Route)>,
    /// User members.
    members: Vec<Member>,
}

impl Group {
    /// Checks `config` and binds the service and debug listeners, so a busy port or a bad
    /// value is reported here, before anything runs. Nothing is accepted until
    /// [`Group::run`].
    pub fn new(handler: impl Handler, config: Config) -> Result<Group> {
        config.validate()?;
        let listener = Listener::bind("service", config.addr)?;
        let debug = config.debug_addr.map(|addr| Listener::bind("debug", addr)).transpose()?;
        let addr = listener.addr();
        let shutdown = Shutdown::default();
        let service_drain = Latch::default();
        let metrics = Arc::new(Metrics::default());
        let ctx = Context {
            handler,
            settings: Settings {
                limits: Limits { max_head_bytes: config.max_header_bytes, max_headers: config.max_headers },
                header_read_timeout: config.header_read_timeout,
                write_timeout: config.write_timeout,
                idle_timeout: config.idle_timeout,
                max_body_bytes: config.max_body_bytes,
                linger: Some(crate::server::conn::LINGER),
                watch_peer: false,
            },
            close_responses: shutdown.latch().clone(),
            close_idle: service_drain.clone(),
            metrics: metrics.clone(),
            clock: Default::default(),
        };
        let server = Server::new(listener, ctx, config.max_connections);
        let service_connections = server.connections();
        let service_clock = server.clock();
        let service: Service = Box::new(move |ex| Box::pin(server.run(ex)));
        Ok(Group {
            config,
            shutdown,
            service,
            service_clock,
            addr,
            service_drain,
            service_connections,
            metrics,
            debug,
            routes: Vec::new(),
            members: Vec::new(),
        })
    }

    /// The address the service server is bound to (with the real port when `Config::addr`
    /// asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the debug server is bound to, if it is enabled.
    pub fn debug_addr(&self) -> Option<SocketAddr> {
        self.debug.as_ref().map(Listener::addr)
    }

    /// A handle to start a graceful shutdown from code, and for members to observe it.
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Adds a member: a task that runs as long as the group. When it returns, `Ok` or `Err`,
    /// or panics, the group stops, and an error or panic becomes [`Group::run`]'s error,
    /// naming the member. Members should watch [`Shutdown::started`] and return when it
    /// resolves; a member still running at the shutdown deadline is dropped.
    pub fn add<F, E>(&mut self, name: impl Into<String>, member: F) -> &mut Group
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let future = Box::pin(async move { member.await.map_err(Into::into) });
        self.members.push(Member { name: name.into(), future });
        self
    }

    /// Serves `handler` at `path` (an exact match) on the debug server, like adding to Go's
    /// `DefaultServeMux`. A path of a built-in endpoint replaces it.
    pub fn debug_route(&mut self, path: impl Into<String>, handler: impl Handler) -> &mut Group {
        self.routes.push((path.into(), debug::route(handler)));
        self
    }

    /// Runs the group until it stops, then drains.
    ///
    /// The group stops when a member ends, when SIGINT or SIGTERM arrives (unless
    /// `Config::handle_signals` is off), or when [`Shutdown::start`] is called. Then, in order:
    /// readiness turns to 503 and responses carry `Connection: close`; after
    /// `Config::drain_delay` the service listener closes and idle connections close; requests
    /// in flight finish; the debug server drains last. `run` returns as soon as everything is
    /// done, or at `Config::shutdown_timeout` (after the drain delay), cutting what is left.
    ///
    /// Returns `Ok(())` after a clean shutdown started by a signal, [`Shutdown::start`] or a
    /// member returning `Ok`; the member's error if one failed (or panicked); otherwise
    /// [`Error::ShutdownTimedOut`] if the deadline cut connections or members.
    pub async fn run(self) -> Result<()> {
        let Group {
            config,
            shutdown,
            service,
            service_clock,
            addr: _,
            service_drain,
            service_connections,
            metrics,
            debug,
            routes,
            members,
        } = self;
        let workers = Workers::start(config.threads)?;
        // The clock threads stop when these guards drop, as run returns.
        let mut clocks = vec![service_clock.start("service").map_err(Error::Io)?];
        let service_drained = Latch::default();
        let mut all = Vec::with_capacity(members.len() + 2);

        // The service drains after the delay; the debug server after the service.
        let ex = workers.executor().clone();
        let drain_delay = config.drain_delay;
        let (started, drained) = (shutdown.started(), service_drained.clone());
        all.push(Member {
            name: SERVICE.into(),
            future: Box::pin(async move {
                let trigger = async {
                    started.await;
                    if !drain_delay.is_zero() {
                        log::info!("service server: serving for the drain delay of {drain_delay:?} before draining");
                        async_io::Timer::after(drain_delay).await;
                    }
                    service_drain.set();
                    pending::<()>().await;
                };
                service(ex).or(trigger).await;
                drained.set();
                Ok(())
            }),
        });
        let mut debug_connections = Counter::default();
        if let Some(listener) = debug {
            let drain = Latch::default();
            let state =
                debug::State { routes, metrics, connections: service_connections.clone(), shutdown: shutdown.clone() };
            let ctx = Context {
                handler: Debug(Arc::new(state)),
                settings: Settings {
                    limits: Limits {
                        max_head_bytes: crate::DEFAULT_MAX_HEADER_BYTES,
                        max_headers: crate::DEFAULT_MAX_HEADERS,
                    },
                    header_read_timeout: Some(debug::DEBUG_TIMEOUT),
                    write_timeout: Some(debug::DEBUG_WRITE_TIMEOUT),
                    idle_timeout: Some(debug::DEBUG_TIMEOUT),
                    max_body_bytes: crate::DEFAULT_MAX_BODY_BYTES,
                    linger: Some(crate::server::conn::LINGER),
                    watch_peer: true,
                },
                close_responses: drain.clone(),
                close_idle: drain.clone(),
                metrics: Arc::new(Metrics::default()),
                clock: Default::default(),
            };
            let server = Server::new(listener, ctx, None);
            debug_connections = server.connections();
            clocks.push(server.clock().start("debug").map_err(Error::Io)?);
            let ex = workers.executor().clone();
            let service_drained = service_drained.wait();
            all.push(Member {
                name: DEBUG.into(),
                future: Box::pin(async move {
                    let trigger = async {
                        service_drained.await;
                        drain.set();
                        pending::<()>().await;
                    };
                    server.run(ex).or(trigger).await;
                    Ok(())
                }),
            });
        }
        all.extend(members);

        let signals = if config.handle_signals { Some(Signals::new().map_err(Error::Io)?) } else { None };
        let handle_signals = {
            let shutdown = shutdown.clone();
            async move {
                if let Some(signals) = signals {
                    signals.handle(shutdown).await;
                }
                pending().await
            }
        };
        let grace = config.drain_delay + config.shutdown_timeout;
        let outcome = supervise(all, shutdown.latch(), grace).or(handle_signals).await;
        let cut = service_connections.count() + debug_connections.count();
        workers.stop().await;

        // The servers may be "unfinished" only because the deadline came first (a zero
        // timeout): what counts as cut is open connections and the user's members.
        let members: Vec<String> =
            outcome.unfinished.into_iter().filter(|name| name != SERVICE && name != DEBUG).collect();
        if cut == 0 && members.is_empty() {
            return outcome.result;
        }
        let timed_out = Error::ShutdownTimedOut { connections: cut, members, timeout: config.shutdown_timeout };
        match outcome.result {
            Ok(()) => Err(timed_out),
            Err(e) => {
                log::error!("{timed_out}");
                Err(e)
            }
        }
    }
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let members: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
        f.debug_struct("Group")
            .field("addr", &self.addr)
            .field("debug_addr", &self.debug_addr())
            .field("members", &members)
            .field("shutdown", &self.shutdown)
            .finish_non_exhaustive()
    }
}
