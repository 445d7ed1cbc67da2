//! Where connection tasks run. Knows nothing of HTTP.
//!
//! [`Runtime`] is the one place that says which mode is in use; every other module spawns
//! through it and is mode-blind:
//!
//! - **own threads** (`Config::threads` ≥ 1): a [`Pool`] of threads, each running its own
//!   tasks ([`worker`]) and, on Linux, waiting on its own epoll set ([`reactor`]). A new
//!   connection is placed on the thread with the fewest open connections and its socket
//!   joins that thread's set: its events wake its task on the thread that runs it, no request
//!   is handed between threads, and per-thread state (metric shards, buffer pools) is touched
//!   by one thread only;
//! - **the caller's executor** ([`Group::run_on`](crate::Group::run_on)): tasks are spawned
//!   on it, and run on whatever threads run it;
//! - **inside `run`'s future** (`Config::threads = 0`): an executor of the group's own,
//!   driven by the future [`Group::run`](crate::Group::run) returns, from whatever polls it.
//!
//! Connections' sockets are a [`Stream`]: in async-io's reactor, or in the own thread's.
//!
//! A server's spawned tasks are kept in its [`Tasks`], so that cutting them at the shutdown
//! deadline, or dropping the group's future, cancels every one: cancellation is drop.

#[cfg(target_os = "linux")]
pub(crate) mod reactor;
mod worker;

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_executor::{Executor, Task};
use async_io::Async;
use slab::Slab;
use worker::Worker;

use crate::error::{Error, Result};
use crate::shutdown::Counter;

/// Where a group's tasks run.
pub(crate) enum Runtime<'a> {
    /// The group's own threads.
    Pool(&'a Pool),
    /// One executor: the caller's, or the group's own driven by `run`'s future.
    Executor(&'a Executor<'static>),
}

impl Runtime<'_> {
    /// How many places tasks can be put (threads in a pool; 1 otherwise): metrics keep one
    /// shard per place.
    pub(crate) fn places(&self) -> usize {
        match self {
            Runtime::Pool(pool) => pool.workers.len(),
            Runtime::Executor(_) => 1,
        }
    }

    /// Whether the group has threads of its own (the deadline sweeper may then be one).
    pub(crate) fn has_threads(&self) -> bool {
        matches!(self, Runtime::Pool(_))
    }

    /// Registers an accepted connection's socket (non-blocking) with the reactor of
    /// `place`, where its task will run: the thread's own (own threads on Linux), else
    /// async-io's.
    pub(crate) fn stream<T: AsFd>(&self, place: usize, io: T) -> io::Result<Stream<T>> {
        match self {
            #[cfg(target_os = "linux")]
            Runtime::Pool(pool) => Ok(Stream::Own(pool.workers[place].reactor.register(io)?)),
            _ => Ok(Stream::Shared(Async::new_nonblocking(io)?)),
        }
    }

    /// Spawns the task `make` builds in `place` (from [`Tasks::place`]), and keeps it in
    /// `tasks` (and counted in its counter) until the [`Done`] it is handed drops. The task
    /// must hold that `Done` for its whole life, which is cheaper than a wrapper future: a
    /// future that awaits one it captured holds it twice over.
    pub(crate) fn spawn<F>(&self, tasks: &Arc<Tasks>, place: usize, make: impl FnOnce(Done) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut inner = tasks.lock();
        let entry = inner.tasks.vacant_entry();
        tasks.open.acquire();
        let done = Done { tasks: tasks.clone(), key: entry.key() as u32, place: place as u32 };
        let future = make(done);
        let first = match self {
            Runtime::Pool(pool) => {
                let (first, task) = pool.workers[place].spawn(future);
                entry.insert(task);
                Some(first)
            }
            Runtime::Executor(ex) => {
                entry.insert(ex.spawn(future));
                None
            }
        };
        inner.loads[place] += 1;
        // Scheduled once the handle is kept and the lock released: the task may run (and
        // end, or be dropped by a stopped thread) at once.
        drop(inner);
        if let Some(first) = first {
            first.schedule();
        }
    }
}

/// A connection's socket, in the reactor of the thread its task runs on.
pub(crate) enum Stream<T: AsFd> {
    /// async-io's (one for the process): the caller's executor, inside `run`'s future, and
    /// own threads outside Linux.
    Shared(Async<T>),
    /// The own thread's.
    #[cfg(target_os = "linux")]
    Own(reactor::Source<T>),
}

impl<T: AsFd> Stream<T> {
    /// The socket.
    pub(crate) fn get_ref(&self) -> &T {
        match self {
            Stream::Shared(io) => io.get_ref(),
            #[cfg(target_os = "linux")]
            Stream::Own(io) => io.get_ref(),
        }
    }
}

/// Held by a spawned task for its whole life; when it drops (the task ended, or was
/// cancelled), the task is forgotten and stops counting, in that order, so that a drain that
/// saw zero finds no task left to cut. Small: every idle connection holds one.
pub(crate) struct Done {
    /// The registry.
    tasks: Arc<Tasks>,
    /// The task's key in it.
    key: u32,
    /// Where it runs.
    place: u32,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.tasks.finished(self.key as usize, self.place as usize);
    }
}

/// The tasks one server has spawned, and how many run in each place.
pub(crate) struct Tasks {
    /// Locked to spawn, to finish and to cut: once per connection, never per request.
    inner: Mutex<TasksInner>,
    /// Counts the tasks (a server's open connections: the drain waits for zero).
    open: Counter,
}

/// See [`Tasks`].
struct TasksInner {
    /// Tasks still running; dropping one cancels it.
    tasks: Slab<Task<()>>,
    /// Tasks running in each place.
    loads: Vec<usize>,
    /// Where the search for the least loaded place starts, rotating so that ties (one
    /// connection at a time) spread over every place.
    next: usize,
}

impl TasksInner {
    /// The place with the fewest tasks; among equals, the next in turn.
    fn least_loaded(&mut self) -> usize {
        let n = self.loads.len();
        let start = self.next % n;
        let place = (0..n).map(|i| (start + i) % n).min_by_key(|&i| self.loads[i]).unwrap_or(0);
        self.next = place + 1;
        place
    }
}

impl Tasks {
    /// The place for the next task: the least loaded one.
    pub(crate) fn place(&self) -> usize {
        self.lock().least_loaded()
    }

    /// An empty set for a runtime with `places` places, counting its tasks in `open`.
    pub(crate) fn new(places: usize, open: Counter) -> Arc<Tasks> {
        let inner = TasksInner { tasks: Slab::new(), loads: vec![0; places.max(1)], next: 0 };
        Arc::new(Tasks { inner: Mutex::new(inner), open })
    }

    /// Locks; a panic elsewhere leaves the data consistent.
    fn lock(&self) -> MutexGuard<'_, TasksInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A task ended, or was cut: forget its handle if it is still kept (detaching: it is
    /// this very task), then stop counting it.
    fn finished(&self, key: usize, place: usize) {
        {
            let mut inner = self.lock();
            if let Some(task) = inner.tasks.try_remove(key) {
                inner.loads[place] -= 1;
                task.detach();
            }
        }
        self.open.release();
    }

    /// Cancels every task still running and waits until each has stopped (its future
    /// dropped, its connection closed); returns how many there were.
    pub(crate) async fn cut(&self) -> usize {
        let tasks = {
            let mut inner = self.lock();
            inner.loads.iter_mut().for_each(|load| *load = 0);
            std::mem::take(&mut inner.tasks)
        };
        let cut = tasks.len();
        for (_, task) in tasks {
            task.cancel().await;
        }
        cut
    }

    /// Cancels every task without waiting (the group's future is being dropped).
    pub(crate) fn cancel_all(&self) {
        let tasks = std::mem::take(&mut self.lock().tasks);
        drop(tasks);
    }
}

/// Cancels every task of a [`Tasks`] when dropped: the group's future was dropped before its
/// servers finished.
pub(crate) struct CancelOnDrop<'a>(pub(crate) &'a Tasks);

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        self.0.cancel_all();
    }
}

/// Threads, each running its own tasks (and on Linux waiting on its own epoll set) until
/// stopped.
pub(crate) struct Pool {
    /// One per thread; only that thread runs its tasks.
    workers: Vec<Arc<Worker>>,
    /// Threads still running.
    running: Counter,
}

impl Pool {
    /// Starts `threads` threads (at least one).
    pub(crate) fn start(threads: usize) -> Result<Pool> {
        let mut pool = Pool { workers: Vec::new(), running: Counter::default() };
        for i in 0..threads.max(1) {
            let worker = Worker::new().map_err(Error::Io)?;
            pool.workers.push(worker.clone());
            let running = pool.running.guard();
            std::thread::Builder::new()
                .name(format!("servicegroup-{i}"))
                .spawn(move || {
                    worker.run();
                    drop(running);
                })
                .map_err(Error::Io)?;
        }
        Ok(pool)
    }

    /// Stops the threads and waits until they have returned.
    pub(crate) async fn stop(self) {
        self.workers.iter().for_each(|w| w.stop());
        self.running.wait_below(1).await;
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Dropped without `stop` (the group's future was dropped): the threads still end.
        self.workers.iter().for_each(|w| w.stop());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    #[test]
    fn tasks_go_to_the_least_loaded_place_and_ties_take_turns() {
        let mut inner = TasksInner { tasks: Slab::new(), loads: vec![0, 0, 0], next: 0 };
        let order: Vec<usize> = (0..6).map(|_| inner.least_loaded()).collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2], "with no load, places take turns");
        inner.loads = vec![5, 1, 3];
        assert_eq!(inner.least_loaded(), 1);
        inner.loads = vec![2, 2, 2];
        inner.next = 2;
        assert_eq!(inner.least_loaded(), 2);
    }

    #[test]
    fn cut_cancels_what_is_running_and_counts_it() {
        let ex = Executor::new();
        let tasks = Tasks::new(1, Counter::default());
        let runtime = Runtime::Executor(&ex);
        let (stopped, finished) = (Counter::default(), Counter::default());
        for _ in 0..3 {
            let guard = stopped.guard();
            runtime.spawn(&tasks, 0, |done| async move {
                let _done = done;
                let _guard = guard;
                futures_lite::future::pending::<()>().await;
            });
        }
        let guard = finished.guard();
        runtime.spawn(&tasks, 0, |done| async move {
            let _done = done;
            drop(guard)
        });
        block_on(ex.run(async {
            finished.wait_below(1).await;
            assert_eq!(tasks.lock().tasks.len(), 3, "the finished task removed itself");
            assert_eq!(tasks.cut().await, 3);
        }));
        assert_eq!(stopped.count(), 0, "every cut task was dropped");
        assert_eq!(tasks.open.count(), 0, "and no longer counts");
        assert_eq!(tasks.lock().loads, [0]);
    }
}
