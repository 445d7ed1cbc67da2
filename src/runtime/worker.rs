//! One own thread: a queue of tasks it runs, and (on Linux) the reactor its sockets are in.
//! Knows nothing of HTTP.
//!
//! The thread takes turns: it runs the tasks that are ready (those it woke itself first, then
//! those woken from other threads), then asks its reactor for events, waiting only if nothing
//! is left to run. A task woken on its own thread (by the reactor's events, or by another task)
//! goes on a queue no other thread touches; one woken elsewhere (a deadline, the drain, a
//! handler's channel) goes on a locked queue, and wakes the thread if it waits. Tasks are
//! `async-task` tasks, as async-executor's are, so their handles cancel them the same way.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_task::{Runnable, Task};

/// Tasks run per turn, at most, before the thread looks for I/O again: a busy turn never
/// keeps events from being read for long.
const TURN: usize = 128;

/// Numbers workers, so that a thread knows whether a task is its own.
static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// The worker running on this thread (its id; 0 for none), and the tasks it woke itself.
    static LOCAL: RefCell<(usize, VecDeque<Runnable>)> = const { RefCell::new((0, VecDeque::new())) };
}

/// A thread's scheduler, shared with whatever wakes its tasks.
pub(crate) struct Worker {
    /// Its number (see [`LOCAL`]).
    id: usize,
    /// Tasks woken on other threads; `None` once the thread has ended (a task woken then is
    /// dropped, which cancels it).
    remote: Mutex<Option<Vec<Runnable>>>,
    /// Whether `remote` may hold tasks: checked without the lock on every turn.
    has_remote: AtomicBool,
    /// Asks the thread to end.
    stop: AtomicBool,
    /// Where its sockets wait for I/O.
    #[cfg(target_os = "linux")]
    pub(crate) reactor: Arc<super::reactor::Reactor>,
    /// The thread, to unpark it (without a reactor of its own, it parks when idle).
    #[cfg(not(target_os = "linux"))]
    thread: std::sync::OnceLock<std::thread::Thread>,
}

impl Worker {
    /// A worker whose thread is yet to start.
    pub(crate) fn new() -> io::Result<Arc<Worker>> {
        Ok(Arc::new(Worker {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            remote: Mutex::new(Some(Vec::new())),
            has_remote: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            #[cfg(target_os = "linux")]
            reactor: Arc::new(super::reactor::Reactor::new()?),
            #[cfg(not(target_os = "linux"))]
            thread: std::sync::OnceLock::new(),
        }))
    }

    /// A task running `future` on this worker's thread, and the first step to schedule once
    /// the caller has stored the handle (so that nothing runs, or is dropped, before that).
    pub(crate) fn spawn<F>(self: &Arc<Self>, future: F) -> (Runnable, Task<()>)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let worker = self.clone();
        async_task::spawn(future, move |runnable| worker.schedule(runnable))
    }

    /// Queues a woken task: on this worker's own thread, without a lock; from elsewhere,
    /// behind one, waking the thread if it waits.
    fn schedule(&self, runnable: Runnable) {
        let mut runnable = Some(runnable);
        // (`try_with`: while this thread's storage is being destroyed, it runs no worker.)
        let _ = LOCAL.try_with(|local| {
            let mut local = local.borrow_mut();
            if local.0 == self.id {
                local.1.extend(runnable.take());
            }
        });
        if let Some(runnable) = runnable {
            self.push_remote(runnable);
        }
    }

    /// Queues a task woken on another thread.
    fn push_remote(&self, runnable: Runnable) {
        {
            let mut remote = lock(&self.remote);
            match remote.as_mut() {
                Some(queue) => queue.push(runnable),
                // The thread has ended (after the runtime cut every task it spawned, so only
                // a task that escaped the cut gets here): dropping the runnable cancels the
                // task and drops its future, on a thread of its own, since whoever woke it
                // may hold locks that the future's drop takes.
                None => {
                    drop(remote);
                    let _ = std::thread::Builder::new().name("servicegroup-drop".into()).spawn(move || drop(runnable));
                    return;
                }
            }
        }
        if !self.has_remote.swap(true, Ordering::SeqCst) {
            self.wake();
        }
    }

    /// Ends the thread's wait for I/O, if it waits.
    fn wake(&self) {
        #[cfg(target_os = "linux")]
        self.reactor.wake();
        #[cfg(not(target_os = "linux"))]
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    /// Asks the thread to end once its turn is over; tasks still pending are dropped by their
    /// handles (the runtime cuts them before it stops its threads).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        #[cfg(target_os = "linux")]
        self.reactor.notify();
        #[cfg(not(target_os = "linux"))]
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    /// The thread's body: turns until stopped.
    pub(crate) fn run(self: Arc<Self>) {
        LOCAL.with(|local| local.borrow_mut().0 = self.id);
        #[cfg(not(target_os = "linux"))]
        let _ = self.thread.set(std::thread::current());
        #[cfg(target_os = "linux")]
        let (mut events, mut wakers) = (vec![super::reactor::NO_EVENT; super::reactor::EVENTS], Vec::new());
        loop {
            // 1. Run what is ready, up to a turn's worth.
            let mut ran = 0;
            while ran < TURN {
                let Some(runnable) = self.next() else { break };
                // A task's panic is its own (the connection loop catches its own); the thread
                // goes on with the others.
                if catch_unwind(AssertUnwindSafe(|| runnable.run())).is_err() {
                    log::error!("a task panicked on {}", std::thread::current().name().unwrap_or("a worker thread"));
                }
                ran += 1;
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            // 2. Look for I/O; wait for it only if nothing is ready to run.
            let idle = ran < TURN && LOCAL.with(|local| local.borrow().1.is_empty());
            if idle {
                self.set_sleeping(true);
            }
            let block = idle && !self.has_remote.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst);
            #[cfg(target_os = "linux")]
            {
                if let Err(e) = self.reactor.poll(&mut events, &mut wakers, block) {
                    log::error!("epoll_wait failed: {e}");
                }
                if idle {
                    self.set_sleeping(false);
                }
                wakers.drain(..).for_each(std::task::Waker::wake);
            }
            #[cfg(not(target_os = "linux"))]
            {
                if block {
                    std::thread::park();
                }
                if idle {
                    self.set_sleeping(false);
                }
            }
        }
        // 3. Nothing runs here any more: what is queued is dropped (cancelled), and so is
        //    anything woken from now on.
        let remote = lock(&self.remote).take();
        drop(remote);
        let local = LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            local.0 = 0;
            std::mem::take(&mut local.1)
        });
        drop(local);
    }

    /// The next task to run: those this thread woke, then those woken elsewhere.
    fn next(&self) -> Option<Runnable> {
        if let Some(runnable) = LOCAL.with(|local| local.borrow_mut().1.pop_front()) {
            return Some(runnable);
        }
        if !self.has_remote.load(Ordering::Relaxed) || !self.has_remote.swap(false, Ordering::SeqCst) {
            return None;
        }
        let mut remote = lock(&self.remote);
        let queue = remote.as_mut()?;
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            local.1.extend(queue.drain(..));
            local.1.pop_front()
        })
    }

    /// Marks the thread as waiting (or not), for [`Worker::wake`].
    fn set_sleeping(&self, sleeping: bool) {
        #[cfg(target_os = "linux")]
        self.reactor.set_sleeping(sleeping);
        #[cfg(not(target_os = "linux"))]
        let _ = sleeping;
    }
}

/// Locks `m`; a panic elsewhere leaves the data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Starts `worker`'s thread.
    fn start(worker: &Arc<Worker>) -> std::thread::JoinHandle<()> {
        let worker = worker.clone();
        std::thread::spawn(move || worker.run())
    }

    #[test]
    fn tasks_spawned_and_woken_from_other_threads_run_on_the_worker() {
        let worker = Worker::new().unwrap();
        let thread = start(&worker);
        let (tx, rx) = std::sync::mpsc::channel();
        let (unblock, blocked) = smol::channel::bounded::<()>(1);
        let (first, task) = worker.spawn(async move {
            let name = std::thread::current().id();
            // Waits for a wake-up that comes from the test's thread.
            blocked.recv().await.unwrap();
            tx.send((name, std::thread::current().id())).unwrap();
        });
        first.schedule();
        std::thread::sleep(Duration::from_millis(20));
        futures_lite::future::block_on(unblock.send(())).unwrap();
        let (before, after) = rx.recv_timeout(Duration::from_secs(5)).expect("the task ran");
        assert_eq!(before, after, "woken from elsewhere, it still runs on its worker");
        assert_eq!(before, thread.thread().id());
        futures_lite::future::block_on(task);
        worker.stop();
        thread.join().unwrap();
    }

    #[test]
    fn a_stopped_worker_drops_what_is_left_and_what_is_woken_later() {
        /// Counts its drops.
        struct Dropped(Arc<AtomicUsize>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let worker = Worker::new().unwrap();
        let thread = start(&worker);
        let dropped = Arc::new(AtomicUsize::new(0));
        let (wake, waiting) = smol::channel::bounded::<()>(1);
        let guard = Dropped(dropped.clone());
        let (first, task) = worker.spawn(async move {
            let _guard = guard;
            let _ = waiting.recv().await;
            futures_lite::future::pending::<()>().await;
        });
        task.detach();
        first.schedule();
        std::thread::sleep(Duration::from_millis(20));
        worker.stop();
        thread.join().unwrap();
        assert_eq!(dropped.load(Ordering::SeqCst), 0, "a task waiting for a wake-up is not dropped by the stop");
        // Woken after its thread ended: dropped, not leaked.
        futures_lite::future::block_on(wake.send(())).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while dropped.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }
}
