//! Stop signals and the in-flight counter. Nothing here knows about HTTP.
//!
//! A [`Latch`] is a one-shot signal any number of tasks can wait for. A [`Counter`] counts
//! RAII [`Guard`]s (one per open connection) and lets a task wait until the count drops below
//! a bound: below 1 is "drained", below `max_connections` is "room to accept". Guards delay
//! completion, never the signal: starting a shutdown never waits for anything.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use event_listener::{Event, EventListener};
use slab::Slab;

/// A one-shot signal: once set it stays set, and every waiter wakes.
#[derive(Clone, Default)]
pub(crate) struct Latch(Arc<LatchInner>);

/// The flag and the waiters of a [`Latch`].
#[derive(Default)]
struct LatchInner {
    /// Set once, never cleared.
    set: AtomicBool,
    /// Woken when `set` becomes true.
    event: Event,
    /// Long-lived waiters ([`Slot`]s), woken when `set` becomes true. One array, so that a
    /// waiter costs a slot rather than an allocation: thousands of idle connections each
    /// wait on the drain for their whole life.
    slots: Mutex<Slab<Option<Waker>>>,
}

/// A long-lived place to wait on a [`Latch`]; gives its slot back when dropped.
pub(crate) struct Slot {
    /// The latch.
    latch: Latch,
    /// The slot index once registered; [`UNREGISTERED`] before (a plain `usize`: thousands of
    /// idle connections each hold one).
    index: usize,
}

/// A [`Slot`]'s index before it is registered.
const UNREGISTERED: usize = usize::MAX;

impl Slot {
    /// Ready once the latch is set; otherwise keeps `cx`'s waker in the slot.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.latch.is_set() {
            return Poll::Ready(());
        }
        {
            let mut slots = self.latch.0.slots.lock().unwrap_or_else(PoisonError::into_inner);
            if self.index == UNREGISTERED {
                self.index = slots.insert(None);
            }
            match &mut slots[self.index] {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
        }
        // Re-check: `set` may have emptied the slots before this waker went in.
        if self.latch.is_set() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.index != UNREGISTERED {
            self.latch.0.slots.lock().unwrap_or_else(PoisonError::into_inner).try_remove(self.index);
        }
    }
}

impl Latch {
    /// Sets the latch; returns whether this call was the one that set it.
    pub(crate) fn set(&self) -> bool {
        let first = !self.0.set.swap(true, Ordering::SeqCst);
        if first {
            self.0.event.notify(usize::MAX);
            let wakers: Vec<Waker> = {
                let mut slots = self.0.slots.lock().unwrap_or_else(PoisonError::into_inner);
                slots.iter_mut().filter_map(|(_, waker)| waker.take()).collect()
            };
            wakers.into_iter().for_each(Waker::wake);
        }
        first
    }

    /// A long-lived place to wait on this latch (see [`Slot`]).
    pub(crate) fn slot(&self) -> Slot {
        Slot { latch: self.clone(), index: UNREGISTERED }
    }

    /// Whether the latch is set.
    pub(crate) fn is_set(&self) -> bool {
        self.0.set.load(Ordering::SeqCst)
    }

    /// Registers interest before a later [`Latch::is_set`] check, so that no wake-up is lost
    /// between checking and waiting.
    pub(crate) fn listen(&self) -> EventListener {
        self.0.event.listen()
    }

    /// Resolves once the latch is set: check, listen, re-check, await.
    pub(crate) fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let latch = self.clone();
        async move {
            while !latch.is_set() {
                let listener = latch.listen();
                if latch.is_set() {
                    break;
                }
                listener.await;
            }
        }
    }
}

/// A handle to start a graceful shutdown from code, and to observe one.
///
/// Get it from [`Group::shutdown`](crate::Group::shutdown). Starting a shutdown is what
/// SIGINT and SIGTERM do: readiness turns to 503 at once, then (after
/// `Config::drain_delay`) the listener closes, idle connections close, and requests in flight
/// finish. Cloning is cheap; every clone controls the same group.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Set when shutdown starts.
    latch: Latch,
}

impl Shutdown {
    /// Starts a graceful shutdown. Idempotent; returns immediately.
    pub fn start(&self) {
        if self.latch.set() {
            log::debug!("graceful shutdown started");
        }
    }

    /// Whether a shutdown has started.
    pub fn is_started(&self) -> bool {
        self.latch.is_set()
    }

    /// Resolves once a shutdown has started. Group members await it to clean up and return.
    pub fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        self.latch.wait()
    }

    /// The latch behind this handle.
    pub(crate) fn latch(&self) -> &Latch {
        &self.latch
    }
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown").field("started", &self.is_started()).finish()
    }
}

/// Counts live [`Guard`]s.
#[derive(Clone, Default)]
pub(crate) struct Counter(Arc<CounterInner>);

/// The count and its waiters.
#[derive(Default)]
struct CounterInner {
    /// Live guards.
    count: AtomicUsize,
    /// Woken whenever a guard drops.
    dropped: Event,
}

/// Keeps a [`Counter`] one higher while it lives. Take it first thing in a task so that
/// every way out of the task, panics and cancellation included, releases it.
pub(crate) struct Guard(Arc<CounterInner>);

impl Counter {
    /// Takes a guard.
    pub(crate) fn guard(&self) -> Guard {
        self.0.count.fetch_add(1, Ordering::SeqCst);
        Guard(self.0.clone())
    }

    /// Counts one more, without a guard: the caller calls [`Counter::release`] once for it.
    pub(crate) fn acquire(&self) {
        self.0.count.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts one less (see [`Counter::acquire`]), waking the waiters.
    pub(crate) fn release(&self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.dropped.notify(usize::MAX);
    }

    /// Live guards now.
    pub(crate) fn count(&self) -> usize {
        self.0.count.load(Ordering::SeqCst)
    }

    /// Resolves once fewer than `bound` guards are live: check, listen, re-check, await.
    pub(crate) async fn wait_below(&self, bound: usize) {
        while self.count() >= bound {
            let listener = self.0.dropped.listen();
            if self.count() < bound {
                break;
            }
            listener.await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.dropped.notify(usize::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};

    #[test]
    fn latch_wakes_every_waiter_and_stays_set() {
        let latch = Latch::default();
        let mut a = Box::pin(latch.wait());
        let mut b = Box::pin(latch.wait());
        assert!(block_on(poll_once(&mut a)).is_none());
        assert!(block_on(poll_once(&mut b)).is_none());
        assert!(latch.set());
        assert!(!latch.set());
        block_on(a);
        block_on(b);
        block_on(latch.wait());
    }

    #[test]
    fn slots_are_woken_reused_and_freed() {
        use futures_lite::future::poll_fn;
        let latch = Latch::default();
        let mut a = latch.slot();
        let mut b = latch.slot();
        assert!(block_on(poll_once(poll_fn(|cx| a.poll(cx)))).is_none());
        assert!(block_on(poll_once(poll_fn(|cx| b.poll(cx)))).is_none());
        let freed = b.index;
        drop(b);
        let mut c = latch.slot();
        assert!(block_on(poll_once(poll_fn(|cx| c.poll(cx)))).is_none());
        assert_eq!(c.index, freed, "the freed slot was reused");
        assert_eq!(latch.0.slots.lock().unwrap().len(), 2);
        let waiter = std::thread::spawn(move || block_on(poll_fn(|cx| a.poll(cx))));
        std::thread::sleep(std::time::Duration::from_millis(20));
        latch.set();
        waiter.join().unwrap();
        block_on(poll_fn(|cx| c.poll(cx)));
    }

    #[test]
    fn counter_waits_for_the_bound() {
        let counter = Counter::default();
        block_on(counter.wait_below(1));
        let g1 = counter.guard();
        let g2 = counter.guard();
        assert_eq!(counter.count(), 2);
        let mut drained = Box::pin(counter.wait_below(1));
        let mut room = Box::pin(counter.wait_below(2));
        assert!(block_on(poll_once(&mut drained)).is_none());
        assert!(block_on(poll_once(&mut room)).is_none());
        drop(g1);
        block_on(room);
        assert!(block_on(poll_once(&mut drained)).is_none());
        drop(g2);
        block_on(drained);
    }

    #[test]
    fn shutdown_handle_is_shared_by_clones() {
        let a = Shutdown::default();
        let b = a.clone();
        let mut started = Box::pin(b.started());
        assert!(block_on(poll_once(&mut started)).is_none());
        a.start();
        assert!(b.is_started());
        block_on(started);
    }
}
