//! Where the group runs: embedded (`threads = 0`) under every common host, on the caller's
//! executor, and on its own threads; fair placement across threads; and dropping the group's
//! future closes every connection, in every mode.

#[macro_use]
mod common;

use std::future::Future;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{app, config, connect, eventually, exchange, get, is_closed, Client, Runtime, PATIENCE};
use futures_lite::FutureExt;
use servicegroup::http::{Request, Response};
use servicegroup::{Body, Group};

/// `run`'s future, boxed, for the hosts below.
type RunFuture = Pin<Box<dyn Future<Output = servicegroup::Result<()>> + Send>>;

/// A handler that awaits an async-std timer, then asks an application task (over an
/// `async_channel`) for a number, and the application task that answers: the group's future
/// and the task are driven together by the host.
fn app_sharing_a_channel() -> (impl servicegroup::Handler, impl Future<Output = ()> + Send) {
    let (ask, asked) = smol::channel::unbounded::<smol::channel::Sender<u64>>();
    let handler = move |_req: Request<Body>| {
        let ask = ask.clone();
        async move {
            async_std::task::sleep(Duration::from_millis(1)).await;
            let (reply, answer) = smol::channel::bounded(1);
            ask.send(reply).await.expect("the application task is running");
            let n = answer.recv().await.expect("the application task answers");
            Response::new(Body::from(format!("app says {n}")))
        }
    };
    let task = async move {
        let mut count = 0;
        // Ends when the group (and with it the handler's sender) is gone.
        while let Ok(reply) = asked.recv().await {
            count += 1;
            let _ = reply.send(count).await;
        }
    };
    (handler, task)
}

/// Runs an embedded group (`threads = 0`) next to an application task under `host`, serves
/// three requests that go through the task, shuts down, and checks `run`'s result.
fn embedded_under(host: fn(RunFuture) -> JoinHandle<servicegroup::Result<()>>) -> io::Result<()> {
    let (handler, task) = app_sharing_a_channel();
    let mut cfg = config();
    cfg.threads = 0;
    let group = Group::new(handler, cfg).expect("bind");
    let (addr, shutdown) = (group.addr().tcp().unwrap(), group.shutdown());
    let run = async move {
        let (result, ()) = futures_lite::future::zip(group.run(), task).await;
        result
    };
    let thread = host(Box::pin(run));
    let mut client = Client::new(addr);
    for n in 1..=3 {
        assert_eq!(client.request(&get("/")).text(), format!("app says {n}"));
    }
    shutdown.start();
    thread.join().expect("the host panicked").map_err(io::Error::other)
}

#[test]
fn embedded_under_smol_block_on() -> io::Result<()> {
    embedded_under(|run| std::thread::spawn(move || smol::block_on(run)))
}

#[test]
fn embedded_as_a_task_on_the_applications_smol_executor() -> io::Result<()> {
    embedded_under(|run| {
        std::thread::spawn(move || {
            let ex = smol::Executor::new();
            // The application's own task, next to the group's.
            let ticks = Arc::new(AtomicUsize::new(0));
            let ticker = ex.spawn({
                let ticks = ticks.clone();
                async move {
                    loop {
                        async_io::Timer::after(Duration::from_millis(1)).await;
                        ticks.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
            let result = smol::block_on(ex.run(ex.spawn(run)));
            assert!(ticks.load(Ordering::SeqCst) > 0, "the application's task ran beside the group");
            drop(ticker);
            result
        })
    })
}

#[test]
fn embedded_under_async_std_block_on() -> io::Result<()> {
    embedded_under(|run| std::thread::spawn(move || async_std::task::block_on(run)))
}

#[test]
fn embedded_as_an_async_std_task() -> io::Result<()> {
    embedded_under(|run| std::thread::spawn(move || async_std::task::block_on(async_std::task::spawn(run))))
}

#[test]
fn embedded_under_futures_lite_block_on() -> io::Result<()> {
    embedded_under(|run| std::thread::spawn(move || futures_lite::future::block_on(run)))
}

/// Requests served per thread, from the debug server's metrics.
fn thread_requests(debug: std::net::SocketAddr) -> Vec<u64> {
    let text = exchange(debug, b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    text.lines()
        .filter(|l| l.starts_with("servicegroup_thread_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn own_threads_share_64_keep_alive_connections_fairly() -> io::Result<()> {
    let (handler, _) = app();
    let mut cfg = config();
    cfg.threads = 2;
    cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
    let server = common::Server::start(handler, cfg);
    let debug = server.debug_addr.unwrap();
    // 64 connections opened at once by one client, then 20 requests on each in turn.
    let mut clients: Vec<Client> = (0..64).map(|_| Client::new(server.addr)).collect();
    for _ in 0..20 {
        for client in &mut clients {
            client.send(&get("/"));
        }
        for client in &mut clients {
            assert_eq!(client.response().text(), "hello");
        }
    }
    let counts = thread_requests(debug);
    let total: u64 = counts.iter().sum();
    assert_eq!((counts.len(), total), (2, 64 * 20), "{counts:?}");
    for (thread, &n) in counts.iter().enumerate() {
        assert!(n * 100 <= total * 60, "thread {thread} served {n} of {total}: {counts:?}");
    }
    Ok(())
}

/// Runs `group` in this test's mode until `abandon` fires, then drops its future (and in
/// caller's-executor mode keeps the executor running, as an application would).
fn run_until_abandoned(group: Group, abandon: smol::channel::Receiver<()>) -> JoinHandle<()> {
    let abandoned = async move {
        let _ = abandon.recv().await;
        Ok(())
    };
    match common::runtime() {
        Runtime::Threads | Runtime::Inline => std::thread::spawn(move || {
            let _ = futures_lite::future::block_on(group.run().or(abandoned));
        }),
        Runtime::Executor => std::thread::spawn(move || {
            let ex = Arc::new(smol::Executor::new());
            let server = ex.spawn({
                let ex = ex.clone();
                async move { group.run_on(&ex).or(abandoned).await }
            });
            // The application goes on running its executor after dropping the group.
            smol::block_on(ex.run(async {
                let _ = server.await;
                async_io::Timer::after(PATIENCE).await;
            }));
        }),
    }
}

in_every_runtime! {
    fn dropping_the_groups_future_closes_every_connection() -> io::Result<()> {
        let (handler, calls) = app();
        let group = Group::new(handler, config()).expect("bind");
        let addr = group.addr().tcp().unwrap();
        let (abandon, abandoned) = smol::channel::bounded(1);
        let _thread = run_until_abandoned(group, abandoned);
        let mut idle = Client::new(addr);
        assert_eq!(idle.request(&get("/")).text(), "hello");
        let mut busy = connect(addr);
        busy.write_all(&get("/sleep?ms=60000"))?;
        eventually("the slow request is in its handler", || calls.load(Ordering::SeqCst) == 2);
        let start = Instant::now();
        abandon.try_send(()).unwrap();
        assert!(idle.is_closed(), "the idle connection was closed");
        assert!(is_closed(&mut busy), "the busy connection was closed");
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        eventually("the listener is closed", || std::net::TcpStream::connect(addr).is_err());
        Ok(())
    }
}
