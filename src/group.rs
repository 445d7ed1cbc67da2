//! The public [`Group`]: the service server, the debug server, signal handling and the
//! user's members, run together under the supervisor.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_executor::Executor;
use async_io::Timer;
use futures_lite::future::pending;
use futures_lite::FutureExt;

use crate::config::{Addr, Config};
use crate::debug::{self, Debug, UserRoute};
use crate::error::{BoxError, Error, Result};
use crate::h1::decode::Limits;
use crate::handler::Handler;
use crate::listen::{self, Bound};
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::runtime::{CancelOnDrop, Pool, Runtime, Tasks};
use crate::server::clock::Clock;
use crate::server::conn::{Context, Settings};
use crate::server::{Drained, Server};
use crate::shutdown::{Counter, Latch, Shutdown};
use crate::signal::Signals;
use crate::supervisor::{supervise, Member};

/// The service server, bound, waiting for what `run` provides: where its tasks run, where
/// they are kept, its counters and the group's clock.
type Service = Box<
    dyn for<'a> FnOnce(
            &'a Runtime<'a>,
            &'a Arc<Tasks>,
            Arc<Metrics>,
            Clock,
        ) -> Pin<Box<dyn Future<Output = Drained> + Send + 'a>>
        + Send,
>;

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
    /// The service's bound address.
    addr: Addr,
    /// Set when the service's drain starts.
    service_drain: Latch,
    /// The service's open connections.
    service_connections: Counter,
    /// The debug server's listener, if enabled.
    debug: Option<Bound>,
    /// The service manager's notification socket, if `NOTIFY_SOCKET` names one.
    notifier: Option<Notifier>,
    /// User debug routes.
    routes: Vec<UserRoute>,
    /// User members.
    members: Vec<Member<'static>>,
}

impl Group {
    /// Checks `config` and binds the service and debug listeners, so a busy port or a bad
    /// value is reported here, before anything runs. Nothing is accepted until
    /// [`Group::run`].
    ///
    /// Under systemd socket activation (`LISTEN_FDS` set, and `LISTEN_PID` this process or
    /// unset), the listeners come from fds 3.. instead: the one named `service` in
    /// `LISTEN_FDNAMES` (or the only one) replaces `Config::addr`, the one named `debug`
    /// replaces `Config::debug_addr`; the variables are unset, so children do not inherit
    /// them, and the log says which fd went where. An fd that is not a listening stream
    /// socket is an [`Error::Activation`] naming it.
    ///
    /// When `NOTIFY_SOCKET` is set, [`Group::run`] tells the service manager `READY=1` once
    /// it accepts, `STOPPING=1` and `STATUS=draining N connections` when the drain starts, and
    /// `WATCHDOG=1` every half `WATCHDOG_USEC` while it runs (sd_notify(3); `Type=notify`).
    pub fn new(handler: impl Handler, config: Config) -> Result<Group> {
        config.validate()?;
        let activated = listen::activated()?;
        let listener = match activated.service {
            Some(listener) => listener,
            None => Bound::bind("service", &config.addr, config.reuse_port)?,
        };
        let debug = match activated.debug {
            Some(listener) => Some(listener),
            None => config.debug_addr.as_ref().map(|addr| Bound::bind("debug", addr, false)).transpose()?,
        };
        let addr = listener.addr().clone();
        let notifier = Notifier::from_env();
        let shutdown = Shutdown::default();
        let service_drain = Latch::default();
        let service_connections = Counter::default();
        let settings = Settings {
            limits: Limits { max_head_bytes: config.max_header_bytes, max_headers: config.max_headers },
            header_read_timeout: config.header_read_timeout,
            write_timeout: config.write_timeout,
            idle_timeout: config.idle_timeout,
            upgraded_idle_timeout: config.upgraded_idle_timeout,
            max_body_bytes: config.max_body_bytes,
            linger: Some(crate::server::conn::LINGER),
            watch_peer: false,
            listed: true,
            access_log: config.access_log,
        };
        let (close_responses, close_idle) = (shutdown.latch().clone(), service_drain.clone());
        let (connections, max_connections) = (service_connections.clone(), config.max_connections);
        let service: Service = Box::new(move |runtime, tasks, metrics, clock| {
            let ctx = Context { handler, settings, close_responses, close_idle, metrics, clock };
            Box::pin(Server::new(listener, ctx, connections, max_connections).run(runtime, tasks))
        });
        Ok(Group {
            config,
            shutdown,
            service,
            addr,
            service_drain,
            service_connections,
            debug,
            notifier,
            routes: Vec::new(),
            members: Vec::new(),
        })
    }

    /// The address the service server is bound to: with the real port when `Config::addr`
    /// asked for port 0, and where a listener passed in or by systemd is bound
    /// ([`Addr::tcp`] gives the TCP address, if it is one).
    pub fn addr(&self) -> Addr {
        self.addr.clone()
    }

    /// The address the debug server is bound to, if it is enabled.
    pub fn debug_addr(&self) -> Option<Addr> {
        self.debug.as_ref().map(|debug| debug.addr().clone())
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
    /// `DefaultServeMux`; the debug server's index lists it with `about`, one line saying what
    /// it shows. A path of a built-in endpoint replaces it.
    pub fn debug_route(
        &mut self,
        path: impl Into<String>,
        about: impl Into<String>,
        handler: impl Handler,
    ) -> &mut Group {
        self.routes.push(UserRoute { path: path.into(), about: about.into(), route: debug::route(handler) });
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
    /// Connections run on `Config::threads` threads of the group's own, or with `threads =
    /// 0` inside this future, on whatever polls it (see the crate docs' table of runtimes;
    /// [`Group::run_on`] uses your executor instead).
    ///
    /// Returns `Ok(())` after a clean shutdown started by a signal, [`Shutdown::start`] or a
    /// member returning `Ok`; the member's error if one failed (or panicked); otherwise
    /// [`Error::ShutdownTimedOut`] if the deadline cut connections or members.
    pub async fn run(self) -> Result<()> {
        match self.config.threads {
            0 => {
                let ex = Executor::new();
                ex.run(self.serve(&Runtime::Executor(&ex), "no threads of its own")).await
            }
            threads => {
                let pool = Pool::start(threads)?;
                let result = self.serve(&Runtime::Pool(&pool), &format!("{threads} thread(s)")).await;
                pool.stop().await;
                result
            }
        }
    }

    /// [`Group::run`], with every connection task spawned on `ex`, so that an application
    /// already running an executor on its threads shares them with the server. The
    /// accept loops, the supervisor, deadlines and the drain run inside this future; spawn it
    /// on `ex` too, or await it anywhere else, as long as something runs `ex` (its threads,
    /// or `ex.run(..)`): connections, and cutting them at the shutdown deadline, need it.
    /// `Config::threads` is not used.
    ///
    /// ```
    /// # fn main() -> servicegroup::Result<()> {
    /// use std::sync::Arc;
    /// use servicegroup::{Body, Config, Group, http::Response};
    ///
    /// let mut config = Config::default();
    /// config.addr = "127.0.0.1:0".parse().unwrap();
    /// config.debug_addr = None;
    /// config.handle_signals = false;
    /// let group = Group::new(|_req| async { Response::new(Body::from("hello")) }, config)?;
    /// let shutdown = group.shutdown();
    ///
    /// let ex = Arc::new(smol::Executor::new());
    /// let server = ex.spawn({
    ///     let ex = ex.clone();
    ///     async move { group.run_on(&ex).await }
    /// });
    /// shutdown.start(); // for the example: stop at once
    /// smol::block_on(ex.run(server))
    /// # }
    /// ```
    pub async fn run_on(self, ex: &Executor<'static>) -> Result<()> {
        self.serve(&Runtime::Executor(ex), "on the caller's executor").await
    }

    /// Runs everything through `runtime` (described as `mode` in the start line) until the
    /// group stops and drains.
    async fn serve(self, runtime: &Runtime<'_>, mode: &str) -> Result<()> {
        let debug_addr = self.debug_addr();
        let Group {
            config,
            shutdown,
            service,
            addr,
            service_drain,
            service_connections,
            debug,
            notifier,
            routes,
            members,
        } = self;
        let places = runtime.places();
        let metrics = Arc::new(Metrics::new(places));
        // One clock for both servers. Its sweeper is a thread when the group has threads of
        // its own (the guard stops it as this returns), else a future raced below.
        let clock = Clock::default();
        let _sweeper = if runtime.has_threads() { Some(clock.start("group").map_err(Error::Io)?) } else { None };
        let debug_connections = Counter::default();
        let service_tasks = Tasks::new(places, service_connections.clone());
        let debug_tasks = Tasks::new(places, debug_connections.clone());
        // If this future is dropped before the servers finish, their connections go with it.
        let _cancel = (CancelOnDrop(&service_tasks), CancelOnDrop(&debug_tasks));
        let service_drained = Latch::default();
        let mut all = Vec::with_capacity(members.len() + 2);

        // The service drains after the delay; the debug server after the service.
        let drain_delay = config.drain_delay;
        let (started, drained) = (shutdown.started(), service_drained.clone());
        let service_drain_view = service_drain.clone();
        let serving = service(runtime, &service_tasks, metrics.clone(), clock.clone());
        let serving = async { Some(serving.await) };
        all.push(Member {
            name: SERVICE.into(),
            future: Box::pin(async move {
                let trigger = async {
                    started.await;
                    if !drain_delay.is_zero() {
                        log::debug!("service server: serving for the drain delay of {drain_delay:?} before draining");
                        async_io::Timer::after(drain_delay).await;
                    }
                    service_drain.set();
                    pending().await
                };
                if let Some(done) = serving.or(trigger).await {
                    log::info!(
                        "service server: drained {} connection(s) in {:.1?} after the listener closed",
                        done.connections,
                        done.took
                    );
                }
                drained.set();
                Ok(())
            }),
        });
        if let Some(listener) = debug {
            let drain = Latch::default();
            let state = debug::State {
                routes,
                metrics,
                connections: service_connections.clone(),
                clock: clock.clone(),
                draining: service_drain_view,
                shutdown: shutdown.clone(),
            };
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
                    upgraded_idle_timeout: Some(debug::DEBUG_TIMEOUT),
                    max_body_bytes: crate::DEFAULT_MAX_BODY_BYTES,
                    linger: Some(crate::server::conn::LINGER),
                    watch_peer: true,
                    listed: false,
                    access_log: false,
                },
                close_responses: drain.clone(),
                close_idle: drain.clone(),
                metrics: Arc::new(Metrics::new(places)),
                clock: clock.clone(),
            };
            let serving = Server::new(listener, ctx, debug_connections, None).run(runtime, &debug_tasks);
            let service_drained = service_drained.wait();
            all.push(Member {
                name: DEBUG.into(),
                future: Box::pin(async move {
                    let trigger = async {
                        service_drained.await;
                        drain.set();
                        pending().await
                    };
                    serving.or(trigger).await;
                    Ok(())
                }),
            });
        }
        log::info!(
            "serving {} ({}; {})",
            url(&addr),
            debug_addr.map_or("debug server off".into(), |a| format!("debug server on {}", url(&a))),
            mode
        );
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
        let sweep = async {
            if !runtime.has_threads() {
                clock.sweep().await;
            }
            pending().await
        };
        let notify = async {
            if let Some(notifier) = &notifier {
                notify(notifier, &addr, &shutdown, &service_connections).await;
            }
            pending().await
        };
        let grace = config.drain_delay + config.shutdown_timeout;
        let outcome = supervise(all, shutdown.latch(), grace).or(handle_signals).or(sweep).or(notify).await;
        // What the deadline left running is cut here, and closed before `run` returns.
        let cut = service_tasks.cut().await + debug_tasks.cut().await;
        if let Some(notifier) = &notifier {
            notifier.send(&match cut {
                0 => "STATUS=drained".to_string(),
                n => format!("STATUS=shutdown deadline: cut {n} connections"),
            });
        }

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

/// How the start line names an address: a URL for TCP, the address itself otherwise.
fn url(addr: &Addr) -> String {
    match addr {
        Addr::Tcp(addr) => format!("http://{addr}"),
        other => other.to_string(),
    }
}

/// How often the status line follows the count of connections left while draining.
const STATUS_EVERY: Duration = Duration::from_millis(250);

/// Tells the service manager: ready (the caller polls this after the servers started
/// accepting), the watchdog's heartbeat while this is polled, and, once shutdown starts,
/// stopping and how many service connections are left (the caller says the last word:
/// drained, or cut at the deadline). Never returns.
async fn notify(notifier: &Notifier, addr: &Addr, shutdown: &Shutdown, connections: &Counter) {
    notifier.send(&format!("READY=1\nSTATUS=serving {}", url(addr)));
    let heartbeat = || async {
        match notifier.watchdog() {
            Some(every) => loop {
                Timer::after(every).await;
                notifier.send("WATCHDOG=1");
            },
            None => pending().await,
        }
    };
    heartbeat().or(shutdown.started()).await;
    let mut left = connections.count();
    notifier.send(&format!("STOPPING=1\nSTATUS=draining {left} connections"));
    let status = async {
        loop {
            Timer::after(STATUS_EVERY).await;
            let now = connections.count();
            if now != left {
                left = now;
                notifier.send(&format!("STATUS=draining {left} connections"));
            }
        }
    };
    heartbeat().or(status).await
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
