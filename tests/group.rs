//! Group members: the first to end stops the group, and `run` says which one and why.

#[macro_use]
mod common;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{app, config, get, Client, Server};
use servicegroup::{Error, Group};

fn group() -> Group {
    let (handler, _) = app();
    Group::new(handler, config()).expect("bind")
}

async fn sleep(ms: u64) {
    async_io::Timer::after(Duration::from_millis(ms)).await;
}

in_every_runtime! {
    fn with_no_members_the_servers_run_until_shutdown() -> io::Result<()> {
        let server = Server::from_group(group());
        assert_eq!(Client::new(server.addr).request(&get("/")).text(), "hello");
        assert!(!server.is_finished());
        server.stop().map_err(io::Error::other)
    }
}

in_every_runtime! {
    fn a_failing_member_ends_the_group_and_is_named() -> io::Result<()> {
        let mut group = group();
        group.add("worker", async {
            sleep(50).await;
            Err(io::Error::other("queue connection lost"))
        });
        let result = Server::from_group(group).join();
        match result {
            Err(e @ Error::Member { .. }) => {
                assert_eq!(e.to_string(), "group member `worker` failed: queue connection lost")
            }
            other => panic!("{other:?}"),
        }
        Ok(())
    }
}

in_every_runtime! {
    fn a_member_that_returns_ok_ends_the_group_cleanly() -> io::Result<()> {
        let mut group = group();
        group.add("batch", async {
            sleep(20).await;
            Ok::<(), io::Error>(())
        });
        Server::from_group(group).join().map_err(io::Error::other)
    }
}

in_every_runtime! {
    fn a_panicking_member_ends_the_group_and_is_named() -> io::Result<()> {
        let mut group = group();
        group.add("crashy", async {
            sleep(20).await;
            if true {
                panic!("invariant broken");
            }
            Ok::<(), io::Error>(())
        });
        match Server::from_group(group).join() {
            Err(e @ Error::Panicked { .. }) => {
                assert_eq!(e.to_string(), "group member `crashy` panicked: invariant broken")
            }
            other => panic!("{other:?}"),
        }
        Ok(())
    }
}

in_every_runtime! {
    fn with_many_members_the_first_error_wins_and_the_rest_see_the_stop() -> io::Result<()> {
        let mut group = group();
        let cleaned = Arc::new(AtomicBool::new(false));
        let (shutdown, flag) = (group.shutdown(), cleaned.clone());
        group
            .add("first", async {
                sleep(30).await;
                Err("first failure")
            })
            .add("second", async {
                sleep(300).await;
                Err("second failure")
            })
            .add("watcher", async move {
                shutdown.started().await;
                flag.store(true, Ordering::SeqCst);
                Ok::<(), io::Error>(())
            });
        let result = Server::from_group(group).join();
        assert_eq!(result.unwrap_err().to_string(), "group member `first` failed: first failure");
        assert!(cleaned.load(Ordering::SeqCst), "the watcher saw the stop and cleaned up");
        Ok(())
    }
}

in_every_runtime! {
    fn a_member_that_ignores_the_stop_is_dropped_at_the_deadline() -> io::Result<()> {
        let (handler, _) = app();
        let mut cfg = config();
        cfg.shutdown_timeout = Duration::from_millis(200);
        let mut group = Group::new(handler, cfg).map_err(io::Error::other)?;
        group.add("stubborn", async {
            futures_lite::future::pending::<()>().await;
            Ok::<(), io::Error>(())
        });
        match Server::from_group(group).stop() {
            Err(Error::ShutdownTimedOut { connections: 0, members, .. }) => assert_eq!(members, ["stubborn"]),
            other => panic!("{other:?}"),
        }
        Ok(())
    }
}

in_every_runtime! {
    fn user_debug_routes_are_served_on_the_debug_port() -> io::Result<()> {
        use servicegroup::http::{Request, Response};
        use servicegroup::Body;
        let (handler, _) = app();
        let mut cfg = config();
        cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
        let mut group = Group::new(handler, cfg).map_err(io::Error::other)?;
        group.debug_route("/debug/cache", "entries in the cache", |_req: Request<Body>| async { Response::new(Body::from("cache: 42 entries")) });
        let server = Server::from_group(group);
        let debug = server.debug_addr.unwrap();
        assert_eq!(Client::new(debug).request(&get("/debug/cache")).text(), "cache: 42 entries");
        // Not on the public port.
        assert_eq!(Client::new(server.addr).request(&get("/debug/cache")).status, 404);
        let index = Client::new(debug).request(&get("/debug/pprof/")).text();
        assert!(index.contains("/debug/cache"), "{index}");
        Ok(())
    }
}
