//! `run` works when awaited from the common smol-family `block_on`s, and from inside a smol
//! task next to the application's own tasks.

mod common;

use std::io;
use std::thread::JoinHandle;

use common::{app, config, get, Client};
use servicegroup::Group;

/// Runs a group with `block_on`, serves one request, shuts down, and returns `run`'s result.
fn serve_once(block_on: fn(Group) -> JoinHandle<servicegroup::Result<()>>) -> io::Result<()> {
    let (handler, _) = app();
    let group = Group::new(handler, config()).expect("bind");
    let (addr, shutdown) = (group.addr(), group.shutdown());
    let thread = block_on(group);
    assert_eq!(Client::new(addr).request(&get("/")).text(), "hello");
    shutdown.start();
    thread.join().unwrap().map_err(io::Error::other)
}

#[test]
fn runs_under_smol_block_on() -> io::Result<()> {
    serve_once(|group| std::thread::spawn(move || smol::block_on(group.run())))
}

#[test]
fn runs_under_futures_lite_block_on() -> io::Result<()> {
    serve_once(|group| std::thread::spawn(move || futures_lite::future::block_on(group.run())))
}

#[test]
fn runs_under_async_io_block_on() -> io::Result<()> {
    serve_once(|group| std::thread::spawn(move || async_io::block_on(group.run())))
}

#[test]
fn runs_as_a_task_on_a_smol_executor() -> io::Result<()> {
    serve_once(|group| {
        std::thread::spawn(move || {
            let ex = smol::Executor::new();
            let task = ex.spawn(group.run());
            smol::block_on(ex.run(task))
        })
    })
}
