//! With `threads = 0` the group starts no thread at all. Alone in its binary, so that no
//! other test's threads are counted.

mod common;

use std::io;
use std::time::Duration;

use common::{app, config};
use servicegroup::Group;

/// The names of this process's threads.
fn threads() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap().trim().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn embedded_mode_starts_no_thread() -> io::Result<()> {
    let (handler, _) = app();
    let mut cfg = config();
    cfg.threads = 0;
    cfg.debug_addr = Some("127.0.0.1:0".parse().unwrap());
    // The reactor's own thread (async-io starts one when nothing else drives it) is not the
    // group's: start it first, so that what is counted is the group's alone.
    futures_lite::future::block_on(async_io::Timer::after(Duration::from_millis(1)));
    let group = Group::new(handler, cfg).expect("bind");
    let (addr, debug, shutdown) =
        (group.addr().tcp().unwrap(), group.debug_addr().unwrap().tcp().unwrap(), group.shutdown());
    let before = threads();
    let (result, after) = smol::block_on(async {
        let client = async {
            let a = async_io::Async::<std::net::TcpStream>::connect(addr).await.unwrap();
            let b = async_io::Async::<std::net::TcpStream>::connect(debug).await.unwrap();
            async_io::Timer::after(Duration::from_millis(50)).await;
            let during = threads();
            drop((a, b));
            shutdown.start();
            during
        };
        futures_lite::future::zip(group.run(), client).await
    });
    result.map_err(io::Error::other)?;
    assert_eq!(after, before, "threads while serving the service and the debug server, against before");
    assert!(!after.iter().any(|name| name.starts_with("servicegroup")), "{after:?}");
    Ok(())
}
